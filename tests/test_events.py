"""The events log: one typed line per event, a closed set of kinds, and a cut-off line that never
swallows the next event."""

from __future__ import annotations

from pathlib import Path

from agentic_dispatch.events import EventLog
from agentic_dispatch.models import Event, EventKind


def _event(workspace: str, kind: EventKind = EventKind.STARTED) -> Event:
    return Event(kind=kind, workspace=workspace, agent="shell", status="running", runs=1)


def test_an_event_after_a_line_cut_off_by_a_crash_is_read_and_the_broken_line_skipped(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.append(_event("acme/app/one"))
    with log.path.open("ab") as f:  # a crash or a full disk mid-append: half a line, no newline
        f.write(b'{"at": "2026-12-06T10:00:00Z", "kind": "comp')
    log.append(_event("acme/app/two", EventKind.COMPLETED))
    events, end = log.read(0)
    assert [(e.workspace, e.kind) for e in events] == [
        ("acme/app/one", EventKind.STARTED),
        ("acme/app/two", EventKind.COMPLETED),
    ]
    assert end == log.size()
    assert [e.workspace for e in log.backwards()] == ["acme/app/two", "acme/app/one"]


def test_a_line_of_an_unknown_kind_is_skipped_by_every_reader(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.path.write_text(
        '{"at": "x", "kind": "status", "workspace": "a/b/c", "status": "running"}\n'
        '{"at": "x", "kind": "started", "workspace": "a/b/c", "status": "running"}\n',
        encoding="utf-8",
    )
    events, _ = log.read(0)
    assert [e.kind for e in events] == [EventKind.STARTED]
    assert [e.kind for e in log.backwards()] == [EventKind.STARTED]


def test_a_line_still_being_written_waits_for_the_next_read(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.append(_event("acme/app/one"))
    whole = log.size()
    with log.path.open("ab") as f:
        f.write(b'{"at": "x", "kind": "started"')
    events, end = log.read(0)
    assert len(events) == 1 and end == whole


def test_reading_backwards_crosses_block_boundaries(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    names = [f"acme/app/task-{i}" for i in range(200)]
    for name in names:
        log.append(_event(name))
    assert [e.workspace for e in log.backwards(block=97)] == names[::-1]
