"""The command line a person reads: the status table against workspaces in known states, events,
logs and insights, through the real `agentic-dispatch` program."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import (
    CheckpointInfo,
    Event,
    EventKind,
    OutOfScope,
    RunSummary,
    Status,
    WorkspaceRecord,
    utcnow,
)
from agentic_dispatch.store import StatusStore

KNOWN = {
    "acme/api/task-1": (Status.BLOCKED, "Which database should the service use: PostgreSQL or SQLite?", None),
    "acme/api/task-2": (Status.FAILED, "the agent exited with code 2: tests failed", None),
    "acme/web/pr-7": (Status.COMPLETED, None, "Added the login page and its tests."),
    "acme/web/task-9": (Status.CANCELLED, "cancelled before it started", None),
}


def _cli(*args: str, columns: int = 160) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def known(no_engine: str) -> StatusStore:
    """Records of every kind, and no engine reachable: the table never needs one."""
    _, paths = load_settings()
    store = StatusStore.of(paths)
    for name, (status, question, said) in KNOWN.items():
        org, repo, slug = name.split("/")
        rec = WorkspaceRecord(
            name=name, status=status, agent="claude:sonnet" if "api" in name else "codex", repo=f"{org}/{repo}",
            org=org, repo_name=repo, origin_url=f"https://example.invalid/{org}/{repo}.git", task="t",
            branch=f"agent/{slug}", template="coding", timeout_seconds=60, runs=2 if status == Status.FAILED else 1,
            question=question if status == Status.BLOCKED else None,
            reason=None if status == Status.BLOCKED else question, started_at=utcnow(), finished_at=utcnow(),
            summary=RunSummary(final_message=said, input_tokens=100, output_tokens=20) if said else None,
        )  # fmt: skip
        store.create(rec)
        store.events.append(
            Event(kind=EventKind(status.value), workspace=name, agent=rec.agent, status=status.value, runs=rec.runs)
        )
    return store


def test_the_status_table_shows_counts_then_one_line_per_workspace_with_what_needs_a_person(known: StatusStore) -> None:
    out = _cli("status").splitlines()
    assert out[0].split() == ["completed", "1", "failed", "1", "blocked", "1", "cancelled", "1"]
    header = next(i for i, line in enumerate(out) if line.split()[:4] == ["age", "agent", "status", "runs"])
    rows = {line.split()[4]: line for line in out[header + 1 :] if line.strip()}
    assert set(rows) == set(KNOWN)
    for name, (status, question, said) in KNOWN.items():
        fields = rows[name].split()
        assert fields[2] == status.value and fields[0].endswith("s"), rows[name]  # just now: seconds old
        assert (question or said or "") in rows[name], rows[name]
    assert rows["acme/api/task-2"].split()[1:4] == ["claude:sonnet", "failed", "2"]


def test_a_row_shows_its_paths_out_of_scope_and_its_checkpoint_before_the_words_that_may_be_cut(
    known: StatusStore,
) -> None:
    name = "acme/web/task-12"
    known.create(
        WorkspaceRecord(
            name=name, status=Status.CANCELLED, agent="codex", repo="acme/web", org="acme", repo_name="web",
            origin_url="https://example.invalid/acme/web.git", task="t", branch="agent/task-12", template="coding",
            timeout_seconds=60, runs=1, reason="cancelled by agentic_cancel " + "x" * 200, finished_at=utcnow(),
            scope=["src/**"], out_of_scope=OutOfScope(paths=[".github/ci.yml", "setup.py"], count=3),
            checkpoint=CheckpointInfo(commit="0123456789abcdef" * 2 + "01234567", why="cancelled", files=4),
        )
    )  # fmt: skip

    line = next(line for line in _cli("status", columns=100).splitlines() if name in line)
    one = _cli("status", name).splitlines()

    assert "cancelled" in line and "[3 out of scope] [checkpoint 01234567] " in line and "…" in line, line
    assert "out of scope: 3 path(s): .github/ci.yml, setup.py and 1 more" in one, one
    assert any(s.startswith("checkpoint: 0123456789ab (cancelled; 4 path(s), at ") for s in one), one


def test_a_narrow_terminal_cuts_the_question_not_the_status(known: StatusStore) -> None:
    out = _cli("status", columns=70).splitlines()
    line = next(line for line in out if "acme/api/task-1" in line)
    assert "blocked" in line and "…" in line and len(line) <= 70
    assert "PostgreSQL or SQLite?" not in line


def test_events_lists_the_transitions_of_one_workspace(known: StatusStore) -> None:
    out = _cli("events", "--workspace", "acme/api/task-1").splitlines()
    assert len(out) == 1 and "acme/api/task-1: blocked — Which database" in out[0]


def test_insights_counts_runs_and_outcomes_per_agent(known: StatusStore) -> None:
    out = _cli("insights")
    api = next(line for line in out.splitlines() if line.startswith("claude:sonnet"))
    assert api.split()[:5] == ["claude:sonnet", "2", "0", "1", "1"]
    web = next(line for line in out.splitlines() if line.startswith("codex"))
    assert web.split()[:3] == ["codex", "2", "50"]
    assert "claude:sonnet failed: 1× the agent exited with code …: tests failed" in out
