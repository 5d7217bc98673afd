"""The run lifecycle as a table: (state, happening) → (state, event, effects), without Docker.

Each row names a state a record is in, a happening, and what must come out. The executor that
carries the effects out is tested through the service elsewhere (tests marked ``docker``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from agentic_dispatch.models import (
    EventKind,
    FailureClass,
    OutOfScope,
    QaResult,
    RetryState,
    ReviewInfo,
    RunSummary,
    Status,
    WorkspaceRecord,
    parse_time,
)
from agentic_dispatch.service.runs.lifecycle import (
    Cancelled,
    Checkpoint,
    CountFailure,
    Dispatched,
    Exited,
    Happening,
    LaunchFailed,
    Placed,
    PrepareRetry,
    QaExited,
    QaLaunchFailed,
    QaStarted,
    RemoveContainer,
    Resumed,
    ReviewFollowedUp,
    Settled,
    Stalled,
    StallEnded,
    Started,
    StartQa,
    StopContainer,
    StopRequested,
    Vanished,
    Waiting,
    new_record,
    transition,
)

NOW = "2026-12-06T10:00:00Z"
CID = "c0ffee" * 10
OUTSIDE = OutOfScope(paths=["README.md", "docs/x.md"], count=2)
SCOPED = {"scope": ["src/**"], "base_commit": "b" * 40}
LATER = "2026-12-06T10:00:31Z"  # NOW + 30 s, the first backoff
ALL_CLASSES: list[FailureClass] = ["provider", "timeout", "crash", "lost", "qa"]


def retrying(on: list[FailureClass] | None = None, attempt: int = 1, **update: object) -> dict[str, object]:
    """A record's retry state: two retries of ``on`` (every class by default), at ``attempt``."""
    state = RetryState(max=2, on=ALL_CLASSES if on is None else on, attempt=attempt, backoff_seconds=1)
    if attempt > 1:
        state.history = [f"attempt {n}: crash: the agent exited with code 3" for n in range(1, attempt)]
    return {"retry": state, **update}


PROVIDER_429 = RunSummary(error="API Error: Request rejected (429)", error_status=429, session_id="s-1")
PROVIDER_429_WAIT = PROVIDER_429.model_copy(update={"retry_after_seconds": 90})


def _rec(status: Status = Status.QUEUED, **update: object) -> WorkspaceRecord:
    rec = new_record(
        name="acme/app/task-1", agent="codex", repo="acme/app", org="acme", repo_name="app", origin_url="x",
        task="t", branch="agent/t", template="coding", timeout_seconds=60, runs=1,
    )  # fmt: skip
    return rec.model_copy(update={"status": status, **update})


def running(**update: object) -> WorkspaceRecord:
    return _rec(Status.RUNNING, container_id=CID, started_at="2026-12-06T09:59:00Z", **update)


def qa_running(**update: object) -> WorkspaceRecord:
    return running(phase="qa", qa_enabled=True, qa=QaResult(state="running", command="pytest"), **update)


def kinds(effects: list[object]) -> list[str]:
    return [type(e).__name__ for e in effects]


# state, happening, → status, phase, event kinds, effect kinds, and what the record says
TABLE: list[tuple[str, WorkspaceRecord, Happening, Status, str, list[EventKind], list[str], dict[str, object]]] = [
    ("a dispatch is queued", _rec(), Dispatched(), Status.QUEUED, "agent", [EventKind.DISPATCHED], [], {}),
    ("no slot: it waits", _rec(), Waiting(), Status.QUEUED, "agent", [EventKind.QUEUED], [], {}),
    ("a dependency that ended without completing is said on a queued line", _rec(depends_on=["acme/app/task-0"]),
     Waiting("acme/app/task-0, which ended failed"), Status.QUEUED, "agent", [EventKind.QUEUED], [], {}),
    ("a queued run starts", _rec(), Started(CID), Status.RUNNING, "agent", [EventKind.STARTED], [],
     {"container_id": CID, "started_at": NOW}),
    ("a first start from a base workspace records where its branch now starts", _rec(base_commit="a" * 40),
     Started(CID, base_commit="c" * 40), Status.RUNNING, "agent", [EventKind.STARTED], [],
     {"base_commit": "c" * 40}),
    ("a run that cannot start fails with the reason", _rec(), LaunchFailed("no such image"), Status.FAILED, "agent",
     [EventKind.FAILED], ["Settled"], {"reason": "no such image", "question": None, "finished_at": NOW}),
    ("a queued run is cancelled", _rec(), Cancelled("cancelled before it started"), Status.CANCELLED, "agent",
     [EventKind.CANCELLED], ["Settled"], {"reason": "cancelled before it started"}),
    ("a stop marks the record and stops the container", running(), StopRequested(Status.FAILED, "timed out"),
     Status.RUNNING, "agent", [], ["StopContainer"], {"stop_status": Status.FAILED, "stop_reason": "timed out"}),
    ("BLOCKED.md blocks the run with its question", running(), Exited(CID, 0, question="Which database?"),
     Status.BLOCKED, "agent", [EventKind.BLOCKED], ["RemoveContainer", "Settled"],
     {"question": "Which database?", "reason": None, "exit_code": 0}),
    ("exit 3 fails the run with a reason naming the code and no question", running(), Exited(CID, 3),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled", "CountFailure"],
     {"reason": "the agent exited with code 3", "question": None, "exit_code": 3}),
    ("exit 0 completes the run", running(), Exited(CID, 0), Status.COMPLETED, "agent", [EventKind.COMPLETED],
     ["RemoveContainer", "Settled"], {"reason": None, "question": None}),
    ("a cancel wins over BLOCKED.md", running(stop_status=Status.CANCELLED, stop_reason="cancelled while running"),
     Exited(CID, 143, question="?"), Status.CANCELLED, "agent", [EventKind.CANCELLED],
     ["RemoveContainer", "Checkpoint", "Settled"], {"reason": "cancelled while running", "stop_status": None}),
    ("a timeout the server asked for fails the run with its reason, uncounted",
     running(stop_status=Status.FAILED, stop_reason="timed out after 5 s"), Exited(CID, 143), Status.FAILED,
     "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"], {"reason": "timed out after 5 s"}),
    ("SIGTERM from outside (an engine restart) names the signal and is not counted", running(), Exited(CID, 143),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"], {}),
    ("out of memory is the run's own failure and counts", running(), Exited(CID, 137, oom_killed=True),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled", "CountFailure"], {}),
    ("an unreadable BLOCKED.md fails the run", running(), Exited(CID, 0, unsafe_question="is a symbolic link"),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"], {}),
    ("exit 0 with the QA gate on and a command starts the gate", running(qa_enabled=True),
     Exited(CID, 0, qa_command=("pytest", "pyproject.toml")), Status.RUNNING, "qa", [],
     ["RemoveContainer", "StartQa"], {}),
    ("exit 0 with the QA gate on and no command completes, skipped", running(qa_enabled=True), Exited(CID, 0),
     Status.COMPLETED, "agent", [EventKind.COMPLETED], ["RemoveContainer", "Settled"], {}),
    ("the gate's container runs", qa_running(), QaStarted("qa" * 32, NOW, 600), Status.RUNNING, "qa", [], [],
     {"container_id": "qa" * 32}),
    ("a gate that cannot start fails the run", qa_running(), QaLaunchFailed("no image"), Status.FAILED, "agent",
     [EventKind.FAILED], ["Settled"], {}),
    ("tests pass: completed", qa_running(), QaExited(CID, 0, "3 passed", "3 passed"), Status.COMPLETED, "agent",
     [EventKind.COMPLETED], ["RemoveContainer", "Settled"], {"reason": None}),
    ("tests fail: failed with the summary, uncounted", qa_running(), QaExited(CID, 1, "1 failed", "1 failed"),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Settled"], {}),
    ("a vanished container fails the run", running(), Vanished(CID), Status.FAILED, "agent", [EventKind.FAILED],
     ["Checkpoint", "Settled"], {}),
    ("a container on a lost node fails the run naming the node, and its service is removed", running(),
     Vanished(CID, "the node node1 it ran on is down"), Status.FAILED, "agent", [EventKind.FAILED],
     ["RemoveContainer", "Checkpoint", "Settled"], {}),
    ("a job no node has taken yet is running and says it waits for a node", running(),
     Placed(CID, None, "no suitable node (insufficient resources on 3 nodes)"), Status.RUNNING, "agent", [], [],
     {"placement": "no suitable node (insufficient resources on 3 nodes)", "node": None}),
    ("a job placed on a node records the node and waits no more",
     running(placement="no suitable node (insufficient resources on 3 nodes)"), Placed(CID, "node2"),
     Status.RUNNING, "agent", [], [], {"node": "node2", "placement": None}),
    ("the run's exit records the node it ran on", running(), Exited(CID, 0, node="node1"), Status.COMPLETED,
     "agent", [EventKind.COMPLETED], ["RemoveContainer", "Settled"], {"node": "node1"}),
    ("a new start forgets the last run's node", _rec(node="node1"), Started(CID), Status.RUNNING, "agent",
     [EventKind.STARTED], [], {"node": None, "placement": None}),
    ("a failed run is resumed", _rec(Status.FAILED, reason="exit 3", exit_code=3, finished_at=NOW),
     Resumed("claude", "use sqlite", None, 7), Status.QUEUED, "agent", [EventKind.RESUMED], [],
     {"runs": 2, "agent": "claude", "answer": "use sqlite", "reason": None, "exit_code": None, "finished_at": None}),
    ("a silent agent is shown stalled, with one event line", running(), Stalled(CID, NOW, 600), Status.RUNNING,
     "agent", [EventKind.STALLED], [], {"stalled_since": NOW, "stop_status": None}),
    ("a silent agent with stall_action stop is marked to fail and stopped", running(), Stalled(CID, NOW, 600, True),
     Status.RUNNING, "agent", [EventKind.STALLED], ["StopContainer"],
     {"stalled_since": NOW, "stop_status": Status.FAILED}),
    ("a stalled agent stopped later (the action changed) gets no second event", running(stalled_since=NOW),
     Stalled(CID, NOW, 900, True), Status.RUNNING, "agent", [], ["StopContainer"], {"stop_status": Status.FAILED}),
    ("activity again clears the stall", running(stalled_since=NOW), StallEnded(CID), Status.RUNNING, "agent", [], [],
     {"stalled_since": None}),
    ("a stalled run stopped for its stall fails with the reason and keeps its work",
     running(stalled_since=NOW, stop_status=Status.FAILED, stop_reason="the agent stalled for 600 s"),
     Exited(CID, 143), Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"],
     {"reason": "the agent stalled for 600 s", "stalled_since": None}),
    ("a stalled run that ends on its own is no longer stalled", running(stalled_since=NOW), Exited(CID, 0),
     Status.COMPLETED, "agent", [EventKind.COMPLETED], ["RemoveContainer", "Settled"], {"stalled_since": None}),
    ("changes outside the scope (warn) complete the run and are listed", running(**SCOPED),
     Exited(CID, 0, out_of_scope=OUTSIDE), Status.COMPLETED, "agent", [EventKind.COMPLETED],
     ["RemoveContainer", "Settled"], {"out_of_scope": OUTSIDE, "reason": None}),
    ("changes outside the scope (fail) fail a run that would complete, uncounted", running(**SCOPED, scope_mode="fail"),
     Exited(CID, 0, out_of_scope=OUTSIDE), Status.FAILED, "agent", [EventKind.FAILED],
     ["RemoveContainer", "Checkpoint", "Settled"], {"out_of_scope": OUTSIDE}),
    ("changes outside the scope (fail) fail it before the QA gate starts",
     running(**SCOPED, scope_mode="fail", qa_enabled=True),
     Exited(CID, 0, qa_command=("pytest", "pyproject.toml"), out_of_scope=OUTSIDE), Status.FAILED, "agent",
     [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"], {"qa": None}),
    ("nothing outside the scope (fail) completes the run", running(**SCOPED, scope_mode="fail"),
     Exited(CID, 0, out_of_scope=OutOfScope(paths=[], count=0)), Status.COMPLETED, "agent", [EventKind.COMPLETED],
     ["RemoveContainer", "Settled"], {"reason": None}),
    ("a non-zero exit outside the scope (fail) fails for its exit, counted", running(**SCOPED, scope_mode="fail"),
     Exited(CID, 3, out_of_scope=OUTSIDE), Status.FAILED, "agent", [EventKind.FAILED],
     ["RemoveContainer", "Checkpoint", "Settled", "CountFailure"], {"reason": "the agent exited with code 3"}),
    ("a blocked agent outside the scope (fail) is blocked, the paths listed", running(**SCOPED, scope_mode="fail"),
     Exited(CID, 0, question="Which?", out_of_scope=OUTSIDE), Status.BLOCKED, "agent", [EventKind.BLOCKED],
     ["RemoveContainer", "Settled"], {"out_of_scope": OUTSIDE}),
    ("a crash with retries left queues the next attempt, its work kept, counted", running(**retrying()),
     Exited(CID, 3), Status.QUEUED, "agent", [EventKind.RETRYING],
     ["RemoveContainer", "Checkpoint", "PrepareRetry", "CountFailure"],
     {"runs": 2, "reason": None, "finished_at": None, "container_id": None}),
    ("a provider's 429 is retried no sooner than its Retry-After, in the same session",
     running(**retrying(["provider"])), Exited(CID, 1, summary=PROVIDER_429_WAIT),
     Status.QUEUED, "agent", [EventKind.RETRYING], ["RemoveContainer", "Checkpoint", "PrepareRetry", "CountFailure"],
     {"resume_session": "s-1"}),
    ("a class the policy does not list is never retried", running(**retrying(["provider"])), Exited(CID, 3),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled", "CountFailure"],
     {"reason": "the agent exited with code 3"}),
    ("spent retries fail the run with every attempt's reason", running(**retrying(attempt=3)), Exited(CID, 3),
     Status.FAILED, "agent", [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled", "CountFailure"],
     {"reason": "the agent exited with code 3 (every attempt: attempt 1: crash: the agent exited with code 3 | "
               "attempt 2: crash: the agent exited with code 3 | attempt 3: crash: the agent exited with code 3)"}),
    ("a timeout the server asked for is retried as a timeout",
     running(**retrying(["timeout"]), stop_status=Status.FAILED, stop_reason="timed out after 5 s",
             stop_cause="timeout"), Exited(CID, 143), Status.QUEUED, "agent", [EventKind.RETRYING],
     ["RemoveContainer", "Checkpoint", "PrepareRetry"], {"stop_status": None, "stop_cause": None}),
    ("a cancel is never retried", running(**retrying(), stop_status=Status.CANCELLED, stop_reason="cancelled"),
     Exited(CID, 143), Status.CANCELLED, "agent", [EventKind.CANCELLED], ["RemoveContainer", "Checkpoint", "Settled"],
     {}),
    ("a failed QA gate resumes the agent with the test output", qa_running(**retrying(["qa"])),
     QaExited(CID, 1, "E assert 1 == 2\n1 failed", "1 failed"), Status.QUEUED, "agent", [EventKind.RETRYING],
     ["RemoveContainer", "PrepareRetry"], {"qa": None, "runs": 2}),
    ("a vanished container is retried as lost", running(**retrying(["lost"])), Vanished(CID), Status.QUEUED, "agent",
     [EventKind.RETRYING], ["Checkpoint", "PrepareRetry"], {}),
    ("network results that never came back are retried as lost", running(**retrying(["lost"])),
     Exited(CID, 0, transfer_failure="its container ended before its results came back", transfer_lost=True),
     Status.QUEUED, "agent", [EventKind.RETRYING], ["RemoveContainer", "Checkpoint", "PrepareRetry"], {}),
    ("network results the gateway refused fail the run, never retried", running(**retrying(["lost"])),
     Exited(CID, 0, transfer_failure="the run gateway refused its results: too large"), Status.FAILED, "agent",
     [EventKind.FAILED], ["RemoveContainer", "Checkpoint", "Settled"], {}),
    ("a resume starts the attempts afresh", _rec(Status.FAILED, **retrying(attempt=3)),
     Resumed("codex", None, None, 7), Status.QUEUED, "agent", [EventKind.RESUMED], [], {}),
    ("a reviewer's verdict is kept with its round", running(review_of="acme/app/task-0", review_round=2),
     Exited(CID, 0, review=("changes requested", "rename x")), Status.COMPLETED, "agent", [EventKind.COMPLETED],
     ["RemoveContainer", "Settled"],
     {"review": ReviewInfo(reviewer="acme/app/task-1", reviewed="acme/app/task-0", round=2,
                           verdict="changes requested", comments="rename x")}),
    ("a reviewer that wrote no verdict fails, saying what REVIEW.md must hold", running(review_of="acme/app/task-0"),
     Exited(CID, 0, review_problem="REVIEW.md's first line is 'LGTM'"), Status.FAILED, "agent", [EventKind.FAILED],
     ["RemoveContainer", "Checkpoint", "Settled"], {"review": None}),
    ("a followed-up review names the next round's reviewer",
     _rec(Status.COMPLETED, review_of="acme/app/task-0",
          review=ReviewInfo(reviewer="acme/app/task-1", reviewed="acme/app/task-0", round=1, verdict="approved")),
     ReviewFollowedUp("acme/app/task-1-round-2"), Status.COMPLETED, "agent", [], [], {}),
    ("a resume forgets the last run's paths outside the scope",
     _rec(Status.FAILED, **SCOPED, scope_mode="fail", out_of_scope=OUTSIDE), Resumed("codex", None, None, 7),
     Status.QUEUED, "agent", [EventKind.RESUMED], [], {"out_of_scope": None}),
]  # fmt: skip


def test_a_run_lost_with_its_node_fails_with_a_reason_naming_the_node_and_saying_it_is_not_run_again() -> None:
    out = transition(running(), Vanished(CID, "the node node1 it ran on is down"), NOW)
    assert out is not None and out.record.reason is not None
    assert out.record.reason.startswith("the node node1 it ran on is down")
    assert "not run again" in out.record.reason


def test_a_placement_seen_again_changes_nothing() -> None:
    placed = running(node="node2")
    assert transition(placed, Placed(CID, "node2"), NOW) is None
    assert transition(placed, Placed("other" * 10, "node1"), NOW) is None  # another run's job


@pytest.mark.parametrize(("rec", "happening", "status", "phase", "events", "effects", "fields"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])  # fmt: skip
def test_the_lifecycle_table(
    rec: WorkspaceRecord,
    happening: Happening,
    status: Status,
    phase: str,
    events: list[EventKind],
    effects: list[str],
    fields: dict[str, object],
) -> None:
    before = rec.model_copy(deep=True)
    out = transition(rec, happening, NOW)
    assert out is not None
    assert (out.record.status, out.record.phase) == (status, phase)
    assert [kind for kind, _ in out.events] == events
    assert kinds(out.effects) == effects  # type: ignore[arg-type]
    for name, value in fields.items():
        assert getattr(out.record, name) == value, name
    assert rec == before  # the function is pure: the record it was given is unchanged
    if status != before.status and status not in (Status.QUEUED, Status.RUNNING):
        assert out.record.finished_at == NOW and [e for e in out.effects if isinstance(e, Settled)]


def test_a_retry_waits_its_backoff_says_why_to_the_agent_and_records_each_attempt() -> None:
    out = transition(running(**retrying()), Exited(CID, 3, summary=RunSummary(session_id="s-1")), NOW)
    assert out is not None
    r = out.record.retry
    assert r is not None and (r.attempt, r.last_class, r.failed_at) == (2, "crash", NOW)
    assert r.history == ["attempt 1: crash: the agent exited with code 3"]
    due = parse_time(r.next_at)
    assert due is not None and 1 <= due - parse_time(NOW) <= 2  # 1 s, plus at most a quarter, to whole seconds
    assert out.record.resume_session == "s-1" and out.record.answer is not None
    assert "attempt 2 of 3" in out.record.answer and "crash failure" in out.record.answer
    line = dict(out.events)[EventKind.RETRYING]
    assert line["reason"] == f"crash: the agent exited with code 3; attempt 2 of 3 at {r.next_at}"
    prepare = next(e for e in out.effects if isinstance(e, PrepareRetry))
    assert prepare.question == "the agent exited with code 3" and prepare.answer == out.record.answer

    slow = transition(
        running(**retrying(["provider"])),
        Exited(CID, 1, summary=PROVIDER_429_WAIT),
        NOW,
    )
    assert slow is not None and slow.record.retry is not None
    assert parse_time(slow.record.retry.next_at) == parse_time(NOW) + 90  # the provider's Retry-After wins

    qa = transition(qa_running(**retrying(["qa"])), QaExited(CID, 1, "E assert 1 == 2\n1 failed", "1 failed"), NOW)
    assert qa is not None and qa.record.answer is not None and "E assert 1 == 2" in qa.record.answer


def test_spent_retries_say_so_in_the_failed_event_line() -> None:
    out = transition(running(**retrying(attempt=3)), Exited(CID, 3), NOW)
    assert out is not None
    assert dict(out.events)[EventKind.FAILED]["reason"] == "retries spent: 3 attempts, the last ended crash"


# happenings that do not apply to the record as it is: nothing changes, nothing is written
IGNORED: list[tuple[str, WorkspaceRecord, Happening]] = [
    ("a second report of one exit", _rec(Status.COMPLETED, container_id=CID), Exited(CID, 0)),
    ("an exit of another run's container", running(), Exited("other", 1)),
    ("a stop decided for an older run", running(), StopRequested(Status.FAILED, "timed out", "older")),
    ("a start of a run that is not queued", running(), Started("other")),
    ("a cancel of a finished run", _rec(Status.COMPLETED), Cancelled("x")),
    ("a resume of a running run", running(), Resumed("codex", None, None, 1)),
    ("a resume of a cancelled run", _rec(Status.CANCELLED), Resumed("codex", None, None, 1)),
    ("a gate verdict while the agent runs", running(), QaExited(CID, 0, "", "")),
    ("an agent exit reported while the gate runs", qa_running(), Exited(CID, 0)),
    ("a vanished container of another run", running(), Vanished("other")),
    ("no slot for a run that started meanwhile", running(), Waiting()),
    ("a second stall report of one stall", running(stalled_since=NOW), Stalled(CID, NOW, 700)),
    ("a stall of another run's container", running(), Stalled("other", NOW, 600)),
    ("a stall of the QA gate (it has its own timeout)", qa_running(), Stalled(CID, NOW, 600)),
    ("a stall of a finished run", _rec(Status.FAILED, container_id=CID), Stalled(CID, NOW, 600)),
    ("a stall of a stopping run", running(stalled_since=NOW, stop_status=Status.CANCELLED), Stalled(CID, NOW, 6, True)),
    ("activity of a run that was not stalled", running(), StallEnded(CID)),
]


@pytest.mark.parametrize(("rec", "happening"), [row[1:] for row in IGNORED], ids=[row[0] for row in IGNORED])
def test_happenings_that_do_not_apply_change_nothing(rec: WorkspaceRecord, happening: Happening) -> None:
    assert transition(rec, happening, NOW) is None


USED = RunSummary(input_tokens=300, output_tokens=40, cost_usd=0.5)
# state, happening, → (tokens, cost_usd) on the line that ends the run; None: neither
USAGE: list[tuple[str, WorkspaceRecord, Happening, tuple[int | None, float | None] | None]] = [
    ("an agent that exits says what it used", running(), Exited(CID, 0, summary=USED), (340, 0.5)),
    ("so does a blocked one", running(), Exited(CID, 0, summary=USED, question="Which?"), (340, 0.5)),
    ("a stopped one: what it used until then", running(stop_status=Status.CANCELLED, stop_reason="cancelled"),
     Exited(CID, 143, summary=USED), (340, 0.5)),
    ("a CLI that reported the cost alone", running(), Exited(CID, 0, summary=RunSummary(cost_usd=1.25)), (None, 1.25)),
    ("a CLI that reported nothing", running(), Exited(CID, 0), None),
    ("the gate's verdict: what this run's agent used", qa_running(summary=USED), QaExited(CID, 1, "1 failed", ""),
     (340, 0.5)),
    ("a vanished agent reported nothing (the summary on the record is the last run's)", running(summary=USED),
     Vanished(CID), None),
    ("a queued run cancelled never ran", _rec(summary=USED), Cancelled("cancelled before it started"), None),
]  # fmt: skip


@pytest.mark.parametrize(("rec", "happening", "usage"), [r[1:] for r in USAGE], ids=[r[0] for r in USAGE])
def test_the_line_that_ends_a_run_carries_what_that_run_used_for_the_daily_budgets(
    rec: WorkspaceRecord, happening: Happening, usage: tuple[int | None, float | None] | None
) -> None:
    out = transition(rec, happening, NOW)
    assert out is not None
    [line] = [extra for kind, extra in out.events if kind == out.record.status.value]
    assert (line.get("tokens"), line.get("cost_usd")) == (usage or (None, None))
    assert ("tokens" in line) == (usage is not None), "a run that reported nothing says nothing"


def test_a_failure_reason_names_the_signal_and_who_may_have_sent_it() -> None:
    out = transition(running(), Exited(CID, 143), NOW)
    assert out is not None and out.record.reason is not None
    assert "SIGTERM" in out.record.reason and "exit code 143" in out.record.reason
    assert "engine" in out.record.reason and "Resume" in out.record.reason


def test_a_failure_reason_carries_the_clis_own_error_else_its_last_line() -> None:
    said = transition(running(), Exited(CID, 1, summary=RunSummary(error="rate limited")), NOW)
    last = transition(running(), Exited(CID, 1, last_output="Traceback: boom"), NOW)
    assert said is not None and said.record.reason == "the agent exited with code 1: rate limited"
    assert last is not None and last.record.reason == "the agent exited with code 1. Last output: Traceback: boom"


def test_a_scope_failure_lists_the_paths_and_how_many_more_in_its_reason() -> None:
    many = OutOfScope(paths=["README.md", "docs/x.md"], count=7)
    out = transition(running(**SCOPED, scope_mode="fail"), Exited(CID, 0, out_of_scope=many), NOW)
    assert out is not None and out.record.reason is not None
    assert "7 path(s) outside the dispatch's scope: README.md, docs/x.md and 5 more" in out.record.reason
    assert "agentic_resume" in out.record.reason


def test_the_effects_of_a_fast_failure_name_the_agent_and_when_it_started() -> None:
    out = transition(running(), Exited(CID, 2), NOW)
    assert out is not None
    assert CountFailure("codex", "2026-12-06T09:59:00Z") in out.effects
    assert out.effects[0] == RemoveContainer(CID)


def test_a_run_stopped_before_its_agent_was_done_keeps_its_work_as_a_checkpoint_saying_why() -> None:
    timed_out = running(stop_status=Status.FAILED, stop_reason="timed out after 5 s; the container was stopped")
    out = transition(timed_out, Exited(CID, 143), NOW)
    assert out is not None and Checkpoint("timed out after 5 s") in out.effects
    for done in (Exited(CID, 0), Exited(CID, 0, question="Which DB?")):  # completed, blocked: the agent's own end
        out = transition(running(), done, NOW)
        assert out is not None and not [e for e in out.effects if isinstance(e, Checkpoint)]


def test_starting_the_qa_gate_asks_for_its_command_and_keeps_the_run_running() -> None:
    out = transition(running(qa_enabled=True), Exited(CID, 0, qa_command=("make test", "Makefile")), NOW)
    assert out is not None and StartQa("make test") in out.effects
    assert out.record.qa is not None and out.record.qa.source == "Makefile" and out.record.finished_at is None


def test_a_stall_stop_says_the_agent_stalled_for_how_long_and_what_to_do() -> None:
    out = transition(running(), Stalled(CID, "2026-12-06T09:49:00Z", 612, stop=True), NOW)
    assert out is not None and out.effects == [StopContainer(CID)]
    reason = out.record.stop_reason or ""
    assert reason.startswith("the agent stalled for 612 s") and "2026-12-06T09:49:00Z" in reason and "resume" in reason
    assert out.events == [(EventKind.STALLED, {"container_id": CID, "reason": "no activity for 612 s"})]


def test_a_stop_names_the_container_it_stops() -> None:
    out = transition(running(), StopRequested(Status.CANCELLED, "cancelled"), NOW)
    assert out is not None and out.effects == [StopContainer(CID)]


def test_an_old_record_keeps_reading_correctly_its_failure_reason_moves_out_of_question() -> None:
    old = _rec(Status.FAILED).model_dump(mode="json") | {"question": "the agent exited with code 3"}
    del old["reason"]
    rec = WorkspaceRecord.model_validate(old)
    assert rec.reason == "the agent exited with code 3" and rec.question is None
    blocked = WorkspaceRecord.model_validate(old | {"status": "blocked", "question": "Which DB?"})
    assert blocked.question == "Which DB?" and blocked.reason is None


def test_no_module_but_the_lifecycle_assigns_a_runs_status() -> None:
    """The same check as the project's status_owners tool: assignments to ``.status`` and
    ``status=`` given to a record or a ``model_copy(update=...)``, anywhere under server/."""
    server = Path(__file__).resolve().parents[1] / "server"
    owners = set()
    for path in server.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple | ast.List) else [t])]
                if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in flat):
                    owners.add(path.name)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in {
                "WorkspaceRecord",
                "model_copy",
            }:
                for kw in node.keywords:
                    is_dict = isinstance(kw.value, ast.Dict)
                    if kw.arg == "status" or (kw.arg == "update" and is_dict and any(
                        isinstance(k, ast.Constant) and k.value == "status" for k in kw.value.keys  # type: ignore[attr-defined]
                    )):  # fmt: skip
                        owners.add(path.name)
    assert owners == {"lifecycle.py"}
