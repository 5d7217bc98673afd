"""The status index never says other than the records: whatever happened to the records or to
the index, agentic_status reports exactly what parsing every status.json would."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import InvalidInputError
from agentic_dispatch.index import StatusIndex
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

STATUSES = [Status.COMPLETED, Status.FAILED, Status.BLOCKED, Status.CANCELLED]


def _record(i: int, status: Status = Status.COMPLETED) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=f"org/repo{i % 3}/w-{i:04d}",
        status=status,
        agent="shell",
        repo="org/repo",
        org="org",
        repo_name=f"repo{i % 3}",
        origin_url="https://example.invalid/org/repo.git",
        task="true",
        branch=f"agent/w-{i}",
        template="coding",
        timeout_seconds=60,
        runs=1,
    )


@pytest.fixture
def svc(no_engine: str) -> Iterator[Dispatcher]:
    """A service over 40 records, with no engine reachable: status and the index never need one."""
    settings, paths = load_settings()
    service = Dispatcher(settings, paths, DockerRuntime())
    for i in range(40):
        service.store.create(_record(i, STATUSES[i % len(STATUSES)]))
    yield service
    service.close()


def _truth(store: StatusStore) -> tuple[dict[str, int], list[str]]:
    """What parsing every record says: counts per status, and the names newest first."""
    listed = store.list()
    counts: dict[str, int] = {}
    for item in listed:
        key = item.record.status.value if item.record else "unreadable"
        counts[key] = counts.get(key, 0) + 1
    order = sorted(
        (i for i in listed if i.record), key=lambda i: (i.record.updated_at if i.record else "", i.name), reverse=True
    )
    return counts, [i.name for i in order]


def _assert_status_is_the_truth(svc: Dispatcher) -> None:
    report = svc.status(limit=1000)
    counts, names = _truth(svc.store)
    assert {k: v for k, v in report.counts.items() if v} == counts
    readable = [r.name for r in report.workspaces if r.status != "unreadable"]
    assert sorted(readable) == sorted(names)
    assert [r.updated_at for r in report.workspaces if r.status != "unreadable"] == sorted(
        (r.updated_at or "" for r in report.workspaces if r.status != "unreadable"), reverse=True
    )


def _write_behind_the_index(store: StatusStore, record: WorkspaceRecord) -> None:
    """What a person (or an older server) editing the file leaves: the new record, no word to the index."""
    path = store.paths(record.name).status
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)


def test_status_agrees_with_the_records_after_they_are_written_through_the_store(svc: Dispatcher) -> None:
    _assert_status_is_the_truth(svc)
    report = svc.status(status="failed", limit=3)
    assert len(report.workspaces) == 3 and all(r.status == "failed" for r in report.workspaces)
    assert report.counts["failed"] == 10


def test_pages_of_one_status_follow_each_other_newest_first_without_a_gap_or_an_overlap(svc: Dispatcher) -> None:
    whole = [r.name for r in svc.status(status="failed", limit=1000).workspaces]
    pages = [[r.name for r in svc.status(status="failed", limit=4, offset=o).workspaces] for o in (0, 4, 8, 12)]
    assert [len(p) for p in pages] == [4, 4, 2, 0]
    assert [n for p in pages for n in p] == whole
    with pytest.raises(InvalidInputError, match="offset"):
        svc.status(offset=-1)


def test_a_record_written_by_another_process_is_seen_at_once(svc: Dispatcher) -> None:
    code = (
        "import sys; from pathlib import Path; from agentic_dispatch.store import StatusStore;"
        "from agentic_dispatch.models import WorkspaceRecord;"
        "s = StatusStore(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]));"
        "r = WorkspaceRecord.model_validate_json(sys.stdin.read());"
        "s.write(r)"
    )
    rec = _record(7, Status.BLOCKED)
    subprocess.run(
        [sys.executable, "-c", code, str(svc.paths.workspaces), str(svc.paths.events), str(svc.paths.index_file)],
        input=rec.model_dump_json(),
        text=True,
        check=True,
    )
    assert svc.store.read(rec.name).status == Status.BLOCKED
    _assert_status_is_the_truth(svc)
    assert svc.status(status="blocked", limit=100).counts["blocked"] == 11


def test_a_crash_between_the_record_write_and_the_index_update_is_seen_by_the_next_status(svc: Dispatcher) -> None:
    svc.status()  # the index is in step
    rec = svc.store.read(_record(1).name)
    svc.store.index.mark_dirty(rec.name)  # what StatusStore.write does first; then it replaces the file ...
    _write_behind_the_index(
        svc.store, rec.model_copy(update={"status": Status.QUEUED, "updated_at": "2099-01-01T00:00:00Z"})
    )  # ... and the process dies before it updates the row
    report = svc.status(limit=1)
    assert report.workspaces[0].name == rec.name and report.workspaces[0].status == Status.QUEUED
    _assert_status_is_the_truth(svc)


def test_a_deleted_workspace_disappears_from_counts_and_rows(svc: Dispatcher) -> None:
    svc.status()
    gone = svc.store.paths(_record(2).name).dir
    shutil.rmtree(gone)
    report = svc.status(limit=1000)
    assert _record(2).name not in [r.name for r in report.workspaces]
    assert sum(report.counts.values()) == 39
    _assert_status_is_the_truth(svc)


def test_a_removed_index_is_rebuilt_from_the_records(svc: Dispatcher) -> None:
    svc.status()
    index = svc.store.index.path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    other = Dispatcher(svc.settings, svc.paths, svc.runtime)  # a fresh server: no open connection
    _assert_status_is_the_truth(other)
    assert index.exists()


def test_a_corrupted_index_is_set_aside_and_rebuilt(svc: Dispatcher) -> None:
    svc.status()
    index = svc.store.index.path
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"this is not a database" * 100)
    other = Dispatcher(svc.settings, svc.paths, svc.runtime)
    _assert_status_is_the_truth(other)
    assert Path(f"{index}.broken").read_bytes().startswith(b"this is not a database")


def test_an_edit_behind_the_stores_back_is_seen_once_the_timer_refreshes_and_by_a_new_server(
    svc: Dispatcher,
) -> None:
    svc.status()
    rec = svc.store.read(_record(4).name)
    _write_behind_the_index(svc.store, rec.model_copy(update={"status": Status.BLOCKED, "question": "by hand"}))
    svc.recovery._refreshed = float("-inf")  # the minute since the timer's last refresh has passed
    svc.reconcile()
    _assert_status_is_the_truth(svc)
    _write_behind_the_index(svc.store, rec)
    fresh = Dispatcher(svc.settings, svc.paths, svc.runtime)
    fresh.reconcile()  # what a server (and a one-shot CLI status) does first
    _assert_status_is_the_truth(fresh)


def test_an_unreadable_record_is_counted_as_unreadable_until_it_is_repaired(svc: Dispatcher) -> None:
    name = _record(3).name
    path = svc.store.paths(name).status
    good = path.read_bytes()
    path.write_text("{ broken", encoding="utf-8")
    svc.store.refresh()  # a hand edit: the timer's refresh (or a server's start) finds it
    report = svc.status(limit=1000)
    assert report.counts["unreadable"] == 1
    assert [r.name for r in report.workspaces if r.status == "unreadable"] == [name]
    assert svc.store.unreadable() == [name]
    path.write_bytes(good)
    svc.store.refresh()
    assert svc.status().counts.get("unreadable", 0) == 0
    _assert_status_is_the_truth(svc)


def test_an_idempotency_key_is_found_through_the_index_and_checked_against_the_record(svc: Dispatcher) -> None:
    name = _record(5).name
    with svc.store.locked(name):
        svc.store.write(svc.store.read(name).model_copy(update={"idempotency_key": "key-5"}))
    assert (found := svc.store.with_key("key-5")) is not None and found.name == name
    data = json.loads(svc.store.paths(name).status.read_text(encoding="utf-8"))
    data["idempotency_key"] = "another"
    _write_behind_the_index(svc.store, WorkspaceRecord.model_validate(data))
    assert svc.store.with_key("key-5") is None, "a stale index row never stands in for the record"


def test_a_workspace_made_behind_the_index_just_after_a_status_is_seen_by_the_next_one(svc: Dispatcher) -> None:
    """Status lists only repository folders whose mtime moved; one changed in the same clock tick as
    the last listing keeps its mtime, so such a listing is never trusted."""
    repo_dir = svc.paths.workspaces / "org" / "repo1"
    os.utime(repo_dir, ns=(time.time_ns(), time.time_ns()))
    svc.status()
    listed = repo_dir.stat().st_mtime_ns
    new = _record(41, Status.BLOCKED).model_copy(update={"name": "org/repo1/w-new"})
    _write_behind_the_index(svc.store, new)  # no index row, no dirty mark: only the folder tells
    os.utime(repo_dir, ns=(listed, listed))  # the change fell in the clock tick of the listing
    assert new.name in [r.name for r in svc.status(limit=1000).workspaces]
    _assert_status_is_the_truth(svc)


def test_a_whole_repository_folder_removed_drops_its_workspaces(svc: Dispatcher) -> None:
    svc.status()
    shutil.rmtree(svc.paths.workspaces / "org" / "repo2")
    report = svc.status(limit=1000)
    assert not [r.name for r in report.workspaces if r.name.startswith("org/repo2/")]
    _assert_status_is_the_truth(svc)


def test_an_index_opened_while_another_process_holds_its_new_file_for_writing_waits_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Two processes making the index at once: one holds the new file's rollback-journal write lock while the
    other puts it into WAL mode, and SQLite says "database is locked" at once, without its busy wait (seen
    about once in 30 starts of 12 processes). The second waits for the first instead."""
    path = tmp_path / "index.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE first_one (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO first_one VALUES (1)")  # its write lock, held until the timer commits
    done = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    done.start()
    try:
        StatusIndex(path).mark_dirty("o/r/w-1")
    finally:
        done.join()
        other.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT dirty FROM records WHERE name = 'o/r/w-1'").fetchone() == (1,)
