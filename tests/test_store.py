"""The status store: atomic writes, and broken records reported, never overwritten."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentic_dispatch.errors import CorruptRecordError, WorkspaceNotFoundError
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.store import StatusStore


def _record(name: str = "acme/app/task-1") -> WorkspaceRecord:
    return WorkspaceRecord(
        name=name,
        status=Status.QUEUED,
        agent="shell",
        repo="acme/app",
        org="acme",
        repo_name="app",
        origin_url="x",
        task="t",
        branch="agent/t",
        template="coding",
        timeout_seconds=60,
    )


def test_write_then_read_round_trips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    rec = _record()
    store.create(rec)
    assert store.read(rec.name).status == Status.QUEUED
    folder = store.paths(rec.name).dir
    assert sorted(p.name for p in folder.iterdir()) == ["status.json"]


def test_a_broken_record_is_reported_by_read_and_list_and_left_untouched(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    good, bad = _record("acme/app/task-1"), _record("acme/app/task-2")
    for r in (good, bad):
        store.create(r)
    path = store.paths(bad.name).status
    path.write_text('{"status": "running", "na', encoding="utf-8")
    with pytest.raises(CorruptRecordError, match="left untouched"):
        store.read(bad.name)
    listed = {i.name: i for i in store.list()}
    assert listed[good.name].record is not None
    assert listed[bad.name].record is None and listed[bad.name].error is not None
    with pytest.raises(CorruptRecordError):
        store.update(bad.name, lambda r: None)
    assert path.read_text(encoding="utf-8") == '{"status": "running", "na'


def test_an_update_that_changes_a_runs_status_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """A run's status changes through the run lifecycle only (service/lifecycle.py)."""
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    rec = _record()
    store.create(rec)
    before = store.paths(rec.name).status.read_bytes()

    def run(r: WorkspaceRecord) -> None:
        r.status = Status.RUNNING

    with pytest.raises(AssertionError, match="lifecycle"):
        store.update(rec.name, run)
    assert store.paths(rec.name).status.read_bytes() == before


def test_a_workspace_folder_deleted_under_the_server_is_not_recreated_by_its_lock(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    rec = _record()
    store.create(rec)
    shutil.rmtree(store.paths(rec.name).dir)
    with pytest.raises(WorkspaceNotFoundError):
        store.update(rec.name, lambda r: None)
    assert not store.paths(rec.name).dir.exists()


def test_the_workspace_lock_is_reentrant_in_a_thread_and_exclusive_across_processes(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    rec = _record()
    store.create(rec)
    folder = store.paths(rec.name).dir
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(folder)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    )
    with store.locked(rec.name), store.locked(rec.name):  # the same thread goes on
        held = subprocess.run([sys.executable, "-c", probe], check=False)
    free = subprocess.run([sys.executable, "-c", probe], check=False)
    assert held.returncode == 3 and free.returncode == 0


def test_reading_a_missing_workspace_says_how_to_find_the_right_name(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    with pytest.raises(WorkspaceNotFoundError, match="agentic_status"):
        store.read("acme/app/task-9")


def test_a_record_that_is_not_utf8_is_a_corrupt_record_error_to_read_and_unreadable_in_the_list_and_left_alone(
    tmp_path: Path,
) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    rec = _record()
    store.create(rec)
    path = store.paths(rec.name).status
    path.write_bytes(b'{"status": "\xff\xfe"}')
    with pytest.raises(CorruptRecordError, match="not UTF-8"):
        store.read(rec.name)
    (listed,) = store.list()
    assert listed.record is None and listed.error is not None and "not UTF-8" in str(listed.error)
    assert path.read_bytes() == b'{"status": "\xff\xfe"}'
