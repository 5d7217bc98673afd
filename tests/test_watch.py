"""Watching many runs, the events log, and bounded logs and diffs: through the service, on real
containers and real git."""

from __future__ import annotations

import json
from pathlib import Path

from agentic_dispatch.models import Change, DispatchRequest, Status
from agentic_dispatch.service import Dispatcher

from .conftest import git

WAIT_FOR_GO = "while [ ! -e .go ]; do sleep 0.05; done; rm .go"


def _go(repo_path: str) -> None:
    (Path(repo_path) / ".go").touch()


def test_watch_returns_at_the_first_change_of_many_and_a_chained_cursor_misses_nothing(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    a = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=WAIT_FOR_GO, agent="shell"))
    b = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=f"{WAIT_FOR_GO}; exit 3", agent="shell"))
    assert (a.status, b.status) == ("running", "running")

    quiet = dispatcher.watch(None, 1.0)  # nothing changes: it returns at its timeout with the states
    assert quiet.timed_out and quiet.changes == []
    assert {r.name: r.status for r in quiet.workspaces} == {a.workspace: "running", b.workspace: "running"}

    _go(a.repo_path)
    seen: list[Change] = []
    first = dispatcher.watch(None, 10.0, quiet.cursor, on_change=seen.append)  # 10 s: the bound
    assert not first.timed_out, "it returned at the change, not at its timeout"
    assert [(c.workspace, c.kind) for c in first.changes] == [(a.workspace, "completed")], first
    assert seen == first.changes

    _go(b.repo_path)  # between two watches
    assert dispatcher.wait(b.workspace, 30).status == Status.FAILED
    second = dispatcher.watch(None, 5.0, first.cursor)
    assert [(c.workspace, c.kind) for c in second.changes] == [(b.workspace, "failed")]
    assert "exit" in (second.changes[0].reason or "") and b.workspace in second.message


def test_the_events_log_holds_one_line_per_transition_from_dispatch_to_blocked_to_resume_to_completed(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    task = "if [ -f ANSWER.md ]; then echo done; else echo 'Which database?' > BLOCKED.md; fi"
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    assert dispatcher.wait(res.workspace, 30).status == Status.BLOCKED
    dispatcher.resume(res.workspace, answer="PostgreSQL")
    assert dispatcher.wait(res.workspace, 30).status == Status.COMPLETED
    lines = dispatcher.store.events_file.read_text(encoding="utf-8").splitlines()
    kinds = [e["kind"] for e in map(json.loads, lines) if e["workspace"] == res.workspace]
    assert kinds == ["dispatched", "started", "blocked", "resumed", "started", "completed"]


def test_logs_of_a_50_mb_log_and_a_diff_of_thousands_of_lines_stay_under_64_kib_and_say_how_to_get_the_rest(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    task = (
        "yes 'a line of the agent log that goes on for a while' | head -c 50000000; "
        "seq 1 30000 > numbers.txt && git add numbers.txt && git commit -qm numbers"
    )
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    assert dispatcher.wait(res.workspace, 120).status == Status.COMPLETED

    logs = dispatcher.logs(res.workspace, tail=200)
    assert len(logs.model_dump_json()) < 64 * 1024
    assert logs.truncated and logs.size > 50_000_000 and "since_bytes=" in (logs.note or "")
    assert len(logs.text.splitlines()) == 200
    head = dispatcher.logs(res.workspace, since_bytes=0)
    assert head.start == 0 and head.truncated and "=== run 1" in head.text and len(head.model_dump_json()) < 64 * 1024
    on = dispatcher.logs(res.workspace, since_bytes=head.end)
    assert on.start == head.end

    diff = dispatcher.diff(res.workspace)
    assert len(diff.model_dump_json()) < 64 * 1024
    assert "numbers.txt" in diff.stat and "30000 +" in diff.stat
    assert diff.truncated and diff.patch and diff.patch.startswith("diff --git") and "path=" in (diff.note or "")
    only = dispatcher.diff(res.workspace, stat_only=True)
    assert only.patch is None and "numbers.txt" in only.stat


def test_a_diff_never_runs_a_diff_driver_the_agent_configured(
    dispatcher: Dispatcher, user_repo: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "driver-ran-on-the-host"
    task = (
        f"printf '#!/bin/sh\\ntouch {marker}\\n' > .git/driver && chmod +x .git/driver && "
        "git config diff.evil.command .git/driver && git config diff.evil.textconv .git/driver && "
        "echo '* diff=evil' > .gitattributes && echo change > f.txt && "
        "git add .gitattributes f.txt && git commit -qm change"
    )
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    assert dispatcher.wait(res.workspace, 30).status == Status.COMPLETED
    diff = dispatcher.diff(res.workspace, path="f.txt")
    assert "+change" in (diff.patch or "")
    assert not marker.exists()
    assert git(Path(res.repo_path), "log", "-1", "--format=%s") == "change"
