"""The status store: atomic writes, and broken records reported, never overwritten."""

from __future__ import annotations

import json
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
    store = StatusStore(tmp_path / "ws", tmp_path / "ev")
    rec = _record()
    with store.locked(rec.name):
        store.write(rec)
    assert store.read(rec.name).status == Status.QUEUED
    folder = store.paths(rec.name).dir
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "status.json"]


def test_a_broken_record_is_reported_by_read_and_list_and_left_untouched(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev")
    good, bad = _record("acme/app/task-1"), _record("acme/app/task-2")
    for r in (good, bad):
        with store.locked(r.name):
            store.write(r)
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


def test_update_records_status_changes_in_the_events_log(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev")
    rec = _record()
    with store.locked(rec.name):
        store.write(rec)

    def run(r: WorkspaceRecord) -> None:
        r.status = Status.RUNNING

    store.update(rec.name, run)
    events = [json.loads(ln) for ln in store.events_file.read_text().splitlines()]
    assert events[-1]["kind"] == events[-1]["status"] == "running" and events[-1]["previous"] == "queued"


def test_reading_a_missing_workspace_says_how_to_find_the_right_name(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev")
    with pytest.raises(WorkspaceNotFoundError, match="agentic_status"):
        store.read("acme/app/task-9")


def test_a_record_that_is_not_utf8_is_reported_as_corrupt_not_raised(tmp_path: Path) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev")
    rec = _record()
    with store.locked(rec.name):
        store.write(rec)
    path = store.paths(rec.name).status
    path.write_bytes(b'{"status": "\xff\xfe"}')
    with pytest.raises(CorruptRecordError, match="not UTF-8"):
        store.read(rec.name)
    (listed,) = store.list()
    assert listed.record is None and listed.error is not None and "not UTF-8" in str(listed.error)
    assert path.read_bytes() == b'{"status": "\xff\xfe"}'
