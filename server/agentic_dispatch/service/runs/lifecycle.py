"""The run's life as one state machine: the only code that changes a run's ``status``, ``phase``,
``finished_at``, ``reason`` and ``question``, and that says which event line each change writes.

:func:`transition` is pure: a record and a happening in; the new record, its event lines and the
side effects to carry out out (or ``None`` when the happening does not apply to the record as it
is now: a second report of one exit, a stop for a run a resume has replaced). ``executor.py``
carries the effects out against the engine, the store, the scheduler and the outbox.

    (state, phase)     happening                     → state            effects
    —                  Dispatched                    → queued           event dispatched
    queued             Waiting (no slot after a drain) → queued         event queued
    queued             Waiting(reason): a dependency ended without completing → queued   event queued, the reason
    blocked|failed|completed  Resumed                → queued, runs+1   event resumed
    queued             Started (or adopted)          → running          event started
    queued             LaunchFailed                  → failed           event failed
    queued             Cancelled                     → cancelled        event cancelled
    running            StopRequested                 → running (marked) stop the container
    running, agent     Exited: BLOCKED.md            → blocked          remove, settled
    running, agent     Exited: a stop we asked for   → its status       remove, checkpoint, settled
    running, agent     Exited: non-zero              → failed           remove, checkpoint, settled, count*
    running, agent     Exited: 0, out of scope, fail → failed (the paths) remove, checkpoint, settled
    running, agent     Exited: 0, no QA              → completed        remove, settled
    running, agent     Exited: 0, QA, no command     → completed (qa skipped)
    running, agent     Exited: 0, QA, a command      → running, qa      remove, start the gate
    running, qa        QaStarted                     → running, qa      —
    running, qa        QaLaunchFailed                → failed           settled
    running, qa        Exited                        → completed|failed remove, settled
    running            Placed (a cluster's node, or why none yet) → running, node / placement   —
    running            Vanished                      → failed           checkpoint (agent), settled
    running            Vanished, lost (its node went away) → failed     remove, checkpoint (agent), settled
    running, not stalled  Stalled                    → running, stalled_since   event stalled
                          Stalled, stop              → running, stalled, marked stop the container (ends failed)
    running, stalled   StallEnded (activity again)   → running          —
    running, agent     Exited: 0, a reviewer without a verdict → failed    remove, checkpoint, settled
    completed reviewer ReviewFollowedUp              → completed, review.next_reviewer   —
    running            a failure of a class the retry policy lists, attempts left
                                                     → queued, runs+1, retry.next_at   event retrying;
                                                       remove, checkpoint (agent), count*, prepare the retry

    * a failure counts towards pausing the pool only when it is the agent's or its provider's:
      not a stop the server asked for, not a QA verdict, not a signal from outside (an engine
      restart), not a vanished container.

The event line that ends a run (from running) carries what that run's agent reported: ``tokens``
and ``cost_usd`` of its exit's summary (kept on the record while the QA gate runs), neither when it
reported nothing or its container vanished. The daily budgets count these lines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from ...models import (
    FINAL_STATUSES,
    RESUMABLE_STATUSES,
    EventKind,
    FailureClass,
    OutOfScope,
    QaResult,
    ReviewInfo,
    RunSummary,
    Status,
    Verdict,
    WorkspaceRecord,
    parse_time,
)

__all__ = [
    "Cancelled",
    "Checkpoint",
    "CountFailure",
    "Dispatched",
    "Effect",
    "Exited",
    "Happening",
    "LaunchFailed",
    "Outcome",
    "Placed",
    "PrepareRetry",
    "QaExited",
    "QaLaunchFailed",
    "QaStarted",
    "RemoveContainer",
    "Resumed",
    "ReviewFollowedUp",
    "Settled",
    "StallEnded",
    "Stalled",
    "StartQa",
    "Started",
    "StopContainer",
    "StopRequested",
    "Vanished",
    "Waiting",
    "new_record",
    "run_deadline",
    "transition",
]

# Exit codes of a container whose main process got a signal: 128 + SIGKILL / SIGTERM.
SIGNAL_NAMES = {137: "SIGKILL", 143: "SIGTERM"}


# -- happenings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dispatched:
    """A new workspace enters the queue (its record was built by :func:`new_record`)."""


@dataclass(frozen=True)
class Waiting:
    """The drain after a dispatch or resume found no slot for the run: it waits in the queue. With a
    ``reason``: what it waits for changed (a workspace it depends on ended without completing)."""

    reason: str | None = None


@dataclass(frozen=True)
class Resumed:
    """A person sends a finished workspace's agent back to work: the next run is queued."""

    agent: str
    answer: str | None
    resume_session: str | None
    queued_ns: int


@dataclass(frozen=True)
class Started:
    """The run's container runs (started now, or found running after a crash: adopted)."""

    container_id: str
    adopted: bool = False
    base_commit: str | None = None  # the first start of a dispatch with base_workspace: where its branch now starts


@dataclass(frozen=True)
class LaunchFailed:
    """The queued run's container could not be started, for a reason of its own."""

    reason: str


@dataclass(frozen=True)
class Cancelled:
    """A person cancelled a queued run before it started."""

    reason: str


@dataclass(frozen=True)
class StopRequested:
    """The server decides to stop a running run (cancel, timeout, shutdown, disk cap): the mark is
    written before the container is stopped, so however the exit is seen the run ends as asked."""

    status: Status
    reason: str
    container_id: str | None = None  # only this run (a timeout decided on an older view)
    cause: Literal["timeout"] | None = None  # a timeout may be retried ([retry] on = ["timeout"])


@dataclass(frozen=True)
class Exited:
    """The agent's container exited (or was stopped). The facts were read from the workspace."""

    container_id: str
    exit_code: int | None
    summary: RunSummary | None = None
    question: str = ""  # BLOCKED.md, redacted
    unsafe_question: str | None = None  # why BLOCKED.md could not be read
    last_output: str | None = None  # the log's last line, redacted
    oom_killed: bool = False
    qa_command: tuple[str, str] | None = None  # (command, why), when the QA gate is on and found one
    out_of_scope: OutOfScope | None = None  # when the dispatch has a scope: the branch's changes outside it
    transfer_failure: str | None = None  # network transfer: why its results did not all come back
    transfer_lost: bool = False  # ... because they never arrived (a class `lost` failure: it may be retried)
    review: tuple[Verdict, str] | None = None  # a reviewer's REVIEW.md: the verdict and the comments
    review_problem: str | None = None  # a reviewer's: why REVIEW.md holds no verdict
    node: str | None = None  # a cluster's node it ran on


@dataclass(frozen=True)
class ReviewFollowedUp:
    """A reviewer's "changes requested" was acted on: the reviewed workspace was sent back with the
    comments and ``next_reviewer`` dispatched to review it again."""

    next_reviewer: str


@dataclass(frozen=True)
class QaStarted:
    """The QA gate's container runs."""

    container_id: str
    started_at: str
    timeout_seconds: int


@dataclass(frozen=True)
class QaLaunchFailed:
    reason: str


@dataclass(frozen=True)
class QaExited:
    """The QA gate's container exited (or was stopped)."""

    container_id: str
    exit_code: int | None
    output_tail: str
    summary_line: str


@dataclass(frozen=True)
class Placed:
    """Where the running job's container is on a cluster: its node, or (``node`` ``None``) why no
    node has taken it yet (no room, a placement constraint no node meets). Its timeout counts all along."""

    container_id: str
    node: str | None
    waiting: str | None = None


@dataclass(frozen=True)
class Vanished:
    """The running run's container is gone from the engine (removed behind our back), or with
    ``lost`` will never report an exit (the cluster node it ran on went away: why)."""

    container_id: str
    lost: str | None = None
    node: str | None = None  # the cluster node it was on, when known


@dataclass(frozen=True)
class Stalled:
    """The running agent showed no activity (its log, its work tree) since ``since`` for ``seconds``
    (``limits.stall_seconds`` or more). With ``stop`` (``limits.stall_action = "stop"``) it is also
    marked to stop, as :class:`StopRequested` would, and ends ``failed``."""

    container_id: str
    since: str
    seconds: int
    stop: bool = False


@dataclass(frozen=True)
class StallEnded:
    """A stalled agent shows activity again."""

    container_id: str


Happening = (
    Dispatched
    | Waiting
    | Resumed
    | Started
    | LaunchFailed
    | Cancelled
    | StopRequested
    | Exited
    | QaStarted
    | QaLaunchFailed
    | QaExited
    | Placed
    | Vanished
    | Stalled
    | StallEnded
    | ReviewFollowedUp
)


# -- effects ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoveContainer:
    container_id: str


@dataclass(frozen=True)
class StopContainer:
    container_id: str


@dataclass(frozen=True)
class StartQa:
    """Start the gate's container (then report :class:`QaStarted` or :class:`QaLaunchFailed`)."""

    command: str


@dataclass(frozen=True)
class Checkpoint:
    """Keep the uncommitted work of a run that ended before its agent was done as a commit on its
    branch (before the record is written; its outcome is part of the record)."""

    why: str


@dataclass(frozen=True)
class CountFailure:
    """A fast failure of the agent's own counts towards pausing its pool."""

    agent: str
    started_at: str


@dataclass(frozen=True)
class Settled:
    """The run ended for good: waiters wake, and its delivery is enqueued (``[sync] auto``)."""


@dataclass(frozen=True)
class PrepareRetry:
    """Write the next attempt's files (its prompt: the reason the last attempt ended and ``answer``,
    as a message to the agent's own session when it still exists), before the record is written."""

    question: str
    answer: str


Effect = RemoveContainer | StopContainer | StartQa | Checkpoint | CountFailure | Settled | PrepareRetry


EventFields = dict[str, str | int | float | None]  # what an event line says beyond its kind and the record


@dataclass
class Outcome:
    """What one happening did: the record to write, its event lines, the effects to carry out."""

    record: WorkspaceRecord
    events: list[tuple[EventKind, EventFields]] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)


def run_deadline(rec: WorkspaceRecord) -> tuple[float, str] | None:
    """When the running job of ``rec`` (the agent, or the QA gate) times out, and the reason to give."""
    if rec.phase == "qa" and rec.qa is not None and rec.qa.started_at and rec.qa.timeout_seconds:
        started, limit, what = parse_time(rec.qa.started_at), rec.qa.timeout_seconds, "the QA gate timed out"
    else:
        started, limit, what = parse_time(rec.started_at), rec.timeout_seconds, "timed out"
    if started is None:
        return None
    return started + limit, f"{what} after {limit} s; the container was stopped and the log so far kept"


def new_record(**fields: object) -> WorkspaceRecord:
    """The record of a new workspace, queued (the intake builds it; :class:`Dispatched` commits it)."""
    return WorkspaceRecord.model_validate({**fields, "status": Status.QUEUED, "phase": "agent"})


# -- the table ------------------------------------------------------------------------------------
def transition(rec: WorkspaceRecord, happening: Happening, now: str) -> Outcome | None:
    """The one place a run's state changes. ``rec`` is not modified; ``None``: nothing to do."""
    out = _transition(rec, happening, now)
    retried = out is not None and any(kind == EventKind.RETRYING for kind, _ in out.events)
    if out is not None and rec.status == Status.RUNNING and (out.record.status in FINAL_STATUSES or retried):
        summary = happening.summary if isinstance(happening, Exited) else rec.summary if rec.phase == "qa" else None
        if summary is not None:  # the line that ends the run (or attempt): what it used, for the daily budgets
            ends = EventKind.RETRYING if retried else EventKind(out.record.status.value)
            end = next(extra for kind, extra in out.events if kind == ends)
            end.update(tokens=summary.tokens, cost_usd=summary.cost_usd)
    return out


def _transition(rec: WorkspaceRecord, happening: Happening, now: str) -> Outcome | None:
    new = rec.model_copy(deep=True)
    match happening:
        case Dispatched():
            if rec.status != Status.QUEUED:
                return None
            return Outcome(new, [(EventKind.DISPATCHED, {})])
        case Waiting():
            if rec.status != Status.QUEUED:
                return None
            return Outcome(new, [(EventKind.QUEUED, {"reason": happening.reason} if happening.reason else {})])
        case Resumed():
            return _resumed(new, happening)
        case Started():
            return _started(new, happening, now) if rec.status == Status.QUEUED else None
        case LaunchFailed() | Cancelled():
            if rec.status != Status.QUEUED:
                return None
            failed = isinstance(happening, LaunchFailed)
            return _end(new, Status.FAILED if failed else Status.CANCELLED, happening.reason, now)
        case StopRequested():
            if not _runs(rec, happening.container_id) or rec.container_id is None:
                return None
            new.stop_status, new.stop_reason, new.stop_cause = happening.status, happening.reason, happening.cause
            return Outcome(new, effects=[StopContainer(rec.container_id)])
        case Exited():
            if not _runs(rec, happening.container_id) or rec.phase != "agent":
                return None
            return _agent_exited(new, happening, now)
        case QaStarted() | QaLaunchFailed():
            if rec.status != Status.RUNNING or rec.phase != "qa" or new.qa is None:
                return None
            return _qa_started(new, happening, now)
        case QaExited():
            if not _runs(rec, happening.container_id) or rec.phase != "qa":
                return None
            return _qa_exited(new, happening, now)
        case Placed():
            if not _runs(rec, happening.container_id):
                return None
            new.node, new.placement = happening.node or rec.node, None if happening.node else happening.waiting
            return Outcome(new) if (new.node, new.placement) != (rec.node, rec.placement) else None
        case Vanished():
            return _vanished(new, happening, now) if _runs(rec, happening.container_id) else None
        case Stalled():
            return _stalled(new, happening) if _runs(rec, happening.container_id) and rec.phase == "agent" else None
        case StallEnded():
            if not _runs(rec, happening.container_id) or rec.stalled_since is None:
                return None
            new.stalled_since = None
            return Outcome(new)
        case ReviewFollowedUp():
            if rec.status != Status.COMPLETED or new.review is None or new.review.next_reviewer is not None:
                return None
            new.review.next_reviewer = happening.next_reviewer
            return Outcome(new)
    return None  # pragma: no cover (the match is exhaustive)


def _runs(rec: WorkspaceRecord, container_id: str | None) -> bool:
    """``rec`` is running, and (when named) in that container."""
    return rec.status == Status.RUNNING and (container_id is None or rec.container_id == container_id)


def _end(new: WorkspaceRecord, status: Status, reason: str | None, now: str, question: str | None = None) -> Outcome:
    """``new`` ends as ``status``: one event line, then waiters and delivery."""
    previous = new.status
    new.status, new.finished_at = status, now
    new.reason, new.question, new.placement = reason, question, None
    new.stop_status = new.stop_reason = new.stalled_since = new.stop_cause = None
    return Outcome(new, [(EventKind(status.value), {"previous": previous.value})], [Settled()])


def _started(new: WorkspaceRecord, h: Started, now: str) -> Outcome:
    new.status, new.phase = Status.RUNNING, "agent"
    new.container_id, new.started_at = h.container_id, now
    new.node = new.placement = None
    if h.base_commit is not None:
        new.base_commit = h.base_commit
    new.finished_at = new.exit_code = new.reason = new.question = new.stalled_since = None
    return Outcome(new, [(EventKind.STARTED, {"container_id": h.container_id})])


def _stalled(new: WorkspaceRecord, h: Stalled) -> Outcome | None:
    """One ``stalled`` line per stall; with ``stop``, the stop mark too (once: a run already marked
    to stop, for this or any reason, is left to that stop)."""
    out = Outcome(new)
    if new.stalled_since is None:
        new.stalled_since = h.since
        line: EventFields = {"container_id": h.container_id, "reason": f"no activity for {h.seconds} s"}
        out.events.append((EventKind.STALLED, line))
    if h.stop and new.stop_status is None:
        new.stop_status = Status.FAILED
        new.stop_reason = (
            f"the agent stalled for {h.seconds} s: no output in its log and no change in its work tree since "
            f'{h.since} (limits.stall_seconds, stall_action = "stop"); the container was stopped and its work kept. '
            "Look at its log, then resume with what it was waiting for."
        )
        out.effects.append(StopContainer(h.container_id))
    return out if out.events or out.effects else None


def _qa_started(new: WorkspaceRecord, h: QaStarted | QaLaunchFailed, now: str) -> Outcome:
    assert new.qa is not None
    if isinstance(h, QaStarted):
        new.container_id = h.container_id
        new.qa.state, new.qa.started_at, new.qa.timeout_seconds = "running", h.started_at, h.timeout_seconds
        return Outcome(new)
    new.phase = "agent"
    new.qa.state, new.qa.reason = "failed", f"the gate could not start: {h.reason}"
    reason = f"the QA gate could not start: {h.reason}. Fix that, then call agentic_resume to run it again."
    return _end(new, Status.FAILED, reason, now)


def _vanished(new: WorkspaceRecord, h: Vanished, now: str) -> Outcome:
    what = "QA gate" if new.phase == "qa" else "agent"
    new.phase = "agent"
    new.node = h.node or new.node
    if h.lost is not None:
        reason = (
            f"{h.lost}: the {what} container {h.container_id[:12]} was given up (it is not run again elsewhere); "
            "what it sent back is kept. Resume to run again."
        )
    else:
        reason = (
            f"the {what} container {h.container_id[:12]} vanished (removed outside agentic-dispatch); "
            "its work so far is in the workspace. Resume to run again."
        )
    out = _failed(new, "lost", reason, now)
    if what == "agent":
        out.effects.insert(0, Checkpoint(_short(reason)))
    if h.lost is not None:
        out.effects.insert(0, RemoveContainer(h.container_id))
    return out


def _resumed(new: WorkspaceRecord, h: Resumed) -> Outcome | None:
    if new.status not in RESUMABLE_STATUSES:
        return None
    previous = new.status
    new.agent, new.answer, new.resume_session = h.agent, h.answer, h.resume_session
    new.runs += 1
    new.status, new.phase, new.queued_ns = Status.QUEUED, "agent", h.queued_ns
    new.container_id = new.exit_code = new.finished_at = new.qa = None
    new.question = new.reason = None  # the new run's prompt carries them; a queued run has none
    new.out_of_scope = None  # the new run's exit reads it again
    new.review = None  # a reviewer sent back gives a new verdict
    if new.retry is not None:  # a person sent it back: its attempts count afresh
        new.retry = new.retry.model_copy(
            update={"attempt": 1, "next_at": None, "last_class": None, "failed_at": None, "history": []}
        )
    return Outcome(new, [(EventKind.RESUMED, {"previous": previous.value})])


def _agent_exited(new: WorkspaceRecord, h: Exited, now: str) -> Outcome:
    stop_status, stop_reason = new.stop_status, new.stop_reason
    new.exit_code, new.summary = h.exit_code, h.summary
    new.node = h.node or new.node
    if h.out_of_scope is not None:
        new.out_of_scope = h.out_of_scope
    if new.review_of is not None and h.review is not None:
        verdict, comments = h.review
        new.review = ReviewInfo(
            reviewer=new.name, reviewed=new.review_of, round=new.review_round, verdict=verdict, comments=comments
        )
    remove = RemoveContainer(h.container_id)
    if stop_status == Status.CANCELLED:
        out = _end(new, Status.CANCELLED, stop_reason, now)
    elif h.transfer_failure is not None and stop_status is None:
        why = f"{h.transfer_failure}. What did arrive is kept (the branch if it was pushed, the log as sent); "
        reason = why + "call agentic_resume to run it again"
        out = _failed(new, "lost", reason, now) if h.transfer_lost else _end(new, Status.FAILED, reason, now)
    elif h.unsafe_question is not None:
        out = _end(new, Status.FAILED, f"the agent's BLOCKED.md cannot be read: {h.unsafe_question}", now)
    elif h.question:
        out = _end(new, Status.BLOCKED, None, now, question=h.question)
    elif stop_status == Status.FAILED and new.stop_cause == "timeout":
        out = _failed(new, "timeout", stop_reason or "timed out", now)
    elif stop_status is not None:
        out = _end(new, stop_status, stop_reason, now)
    elif h.exit_code != 0:
        out = _failed(new, _exit_class(h), failure_reason(h), now, h.summary)
        if new.started_at and not _signalled_from_outside(h):
            out.effects.append(CountFailure(new.agent, new.started_at))
    elif new.review_of is not None and h.review is None:
        why = h.review_problem or "there is no REVIEW.md"
        reason = (
            f"the reviewer ended without a verdict: {why}. REVIEW.md's first line must be `approved` or "
            "`changes requested`; call agentic_resume to send it back"
        )
        out = _end(new, Status.FAILED, reason, now)
    elif new.scope_mode == "fail" and h.out_of_scope is not None and h.out_of_scope.count:
        out = _end(new, Status.FAILED, _scope_reason(h.out_of_scope), now)
    elif new.qa_enabled and h.qa_command is not None:
        command, source = h.qa_command
        new.phase, new.stop_status, new.stop_reason = "qa", None, None
        new.qa = QaResult(state="running", command=command, source=source)
        return Outcome(new, effects=[remove, StartQa(command)])
    else:
        out = _end(new, Status.COMPLETED, None, now)
        if new.qa_enabled:
            new.qa = QaResult(state="skipped", reason="no test command configured or recognised in the repository")
    if out.record.status in (Status.FAILED, Status.CANCELLED) or _retrying(out):  # before the agent was done
        out.effects.insert(0, Checkpoint(_short(out.record.reason or _last_failure(out.record))))
    out.effects.insert(0, remove)
    return out


def _scope_reason(found: OutOfScope) -> str:
    """Why a run that changed paths outside its scope failed (``scope_mode = "fail"``), for a person and its agent."""
    more = f" and {found.count - len(found.paths)} more" if found.count > len(found.paths) else ""
    return (
        f"the branch changed {found.count} path(s) outside the dispatch's scope: {', '.join(found.paths)}{more}. "
        "Call agentic_resume to send the agent back to undo them, or dispatch again with a wider scope"
    )


def _short(reason: str | None) -> str:
    """The first clause of a reason, for a checkpoint's commit message."""
    return (reason or "the run ended").split(";")[0].split(". ")[0][:200]


def _signalled_from_outside(h: Exited) -> bool:
    """Killed or terminated by a signal the server did not send (an engine stop or restart, a
    ``docker stop``): the infrastructure's failure, not the agent's. Out of memory is the run's."""
    return h.exit_code in SIGNAL_NAMES and not h.oom_killed


def failure_reason(h: Exited) -> str:
    """Why an agent's non-zero exit failed its run, for a person."""
    code = h.exit_code
    if code is None:
        why = "the agent container ended without an exit code"
    elif h.oom_killed:
        why = f"the agent was killed for running out of memory (exit code {code}); raise resources.memory"
    elif code in SIGNAL_NAMES:
        why = (
            f"the agent was stopped by {SIGNAL_NAMES[code]} (exit code {code}) from outside agentic-dispatch: "
            "the Docker engine stopped or restarted, or someone stopped the container. Resume to run it again"
        )
    else:
        why = f"the agent exited with code {code}"
    if h.summary and h.summary.error:
        why += f": {h.summary.error}"
    elif h.last_output:
        why += f". Last output: {h.last_output[:300]}"
    return why


def _qa_exited(new: WorkspaceRecord, h: QaExited, now: str) -> Outcome:
    qa = new.qa or QaResult(state="running")
    stop_status, stop_reason = new.stop_status, new.stop_reason
    new.phase = "agent"
    qa.exit_code, qa.finished_at, qa.output_tail = h.exit_code, now, h.output_tail
    if stop_status == Status.FAILED and new.stop_cause == "timeout":
        qa.state, qa.reason = "failed", stop_reason
        new.qa = qa
        out = _failed(new, "timeout", stop_reason or "the QA gate timed out", now)
    elif stop_status is not None:
        qa.state, qa.reason = "failed", stop_reason
        new.qa = qa
        out = _end(new, stop_status, stop_reason, now)
    elif h.exit_code == 0:
        qa.state = "passed"
        new.qa = qa
        out = _end(new, Status.COMPLETED, None, now)
    else:
        qa.state, qa.reason = "failed", h.summary_line or f"exit code {h.exit_code}"
        new.qa = qa
        reason = (
            f"the QA gate failed ({qa.command}, exit code {h.exit_code}): {qa.reason}. "
            "Call agentic_resume to send the agent back to fix it."
        )
        tail = f"\n\nThe end of the test output:\n\n{h.output_tail.strip()}" if h.output_tail.strip() else ""
        out = _failed(new, "qa", reason, now, hint=f"Fix what the tests ({qa.command}) found.{tail}")
    out.effects.insert(0, RemoveContainer(h.container_id))
    return out


# -- retries ------------------------------------------------------------------------------------
# Provider statuses that mean "try again later": too many requests, a timeout, overload, a server error.
_PROVIDER_STATUSES = frozenset({408, 409, 429, 529})
JITTER = 0.25  # at most this fraction of the backoff is added, spread by workspace and attempt


def _exit_class(h: Exited) -> FailureClass:
    """The class of an agent's non-zero exit: the provider's refusal (read from the CLI's own error
    events), a kill from outside (the container was lost with the engine), else the agent crashed."""
    status = h.summary.error_status if h.summary else None
    if status is not None and (status in _PROVIDER_STATUSES or status >= 500):
        return "provider"
    if _signalled_from_outside(h):
        return "lost"
    return "crash"


def _failed(
    new: WorkspaceRecord,
    cls: FailureClass,
    reason: str,
    now: str,
    summary: RunSummary | None = None,
    hint: str = "",
) -> Outcome:
    """A run fails with ``reason`` (of class ``cls``): the next attempt is queued when the retry
    policy lists the class and has attempts left; else it ends ``failed``, listing every attempt."""
    r = new.retry
    if r is None or cls not in r.on:
        if r is not None and r.history:
            reason = _every_attempt(new, cls, reason)
        return _end(new, Status.FAILED, reason, now)
    if r.attempt > r.max:
        out = _end(new, Status.FAILED, _every_attempt(new, cls, reason), now)
        out.events[0][1]["reason"] = f"retries spent: {r.max + 1} attempts, the last ended {cls}"
        return out
    return _retry(new, cls, reason, now, summary, hint)


def _every_attempt(new: WorkspaceRecord, cls: FailureClass, reason: str) -> str:
    assert new.retry is not None
    attempts = [*new.retry.history, f"attempt {new.retry.attempt}: {cls}: {reason}"]
    return f"{reason} (every attempt: {' | '.join(attempts)})"


def backoff_seconds(rec: WorkspaceRecord, retry_after: float | None) -> float:
    """How long the next attempt of ``rec`` waits: doubling from its base up to its cap, plus up to
    :data:`JITTER` of that (spread by workspace and attempt, so retries do not all come at once),
    and at least what the provider asked (Retry-After)."""
    assert rec.retry is not None
    r = rec.retry
    delay = min(r.max_backoff_seconds, r.backoff_seconds * 2 ** (r.attempt - 1))
    spread = int.from_bytes(hashlib.sha256(f"{rec.name}:{r.attempt}".encode()).digest()[:4]) / 2**32
    return float(max(delay * (1 + JITTER * spread), retry_after or 0.0))


def _retry(
    new: WorkspaceRecord, cls: FailureClass, reason: str, now: str, summary: RunSummary | None, hint: str
) -> Outcome:
    """The next attempt: the next run of the workspace, queued until its backoff is over."""
    r = new.retry
    assert r is not None
    previous = new.status
    delay = backoff_seconds(new, summary.retry_after_seconds if summary else None)
    due = (parse_time(now) or 0.0) + delay
    next_at = datetime.fromtimestamp(due, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if delay > 0 and next_at == now:  # whole seconds: never earlier than the backoff
        next_at = datetime.fromtimestamp(due + 1, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    history = [*r.history, f"attempt {r.attempt}: {cls}: {reason}"]
    new.retry = r.model_copy(
        update={"attempt": r.attempt + 1, "last_class": cls, "failed_at": now, "next_at": next_at, "history": history}
    )
    session = (summary.session_id if summary else None) or new.resume_session
    answer = (
        f"agentic-dispatch started attempt {r.attempt + 1} of {r.max + 1} on its own: the last attempt ended with a "
        f"{cls} failure ({_CLASS_WORDS[cls]}). Go on with the task from where it stopped; your earlier work is on "
        "this branch." + (f"\n\n{hint}" if hint else "")
    )
    new.runs += 1
    new.status, new.phase, new.queued_ns = Status.QUEUED, "agent", int(due * 1e9)
    new.answer, new.resume_session = answer, session
    new.container_id = new.finished_at = new.qa = new.question = new.reason = None
    new.stop_status = new.stop_reason = new.stalled_since = new.stop_cause = None
    new.out_of_scope = None
    line = f"{cls}: {_short(reason)}; attempt {r.attempt + 1} of {r.max + 1} at {next_at}"
    return Outcome(
        new,
        [(EventKind.RETRYING, {"previous": previous.value, "reason": line})],
        [PrepareRetry(question=reason, answer=answer)],
    )


_CLASS_WORDS: dict[FailureClass, str] = {
    "provider": "the model provider refused or was overloaded",
    "timeout": "it ran out of time",
    "crash": "the agent exited with an error",
    "lost": "its container was lost",
    "qa": "the QA gate failed",
}


def _retrying(out: Outcome) -> bool:
    return any(isinstance(e, PrepareRetry) for e in out.effects)


def _last_failure(rec: WorkspaceRecord) -> str | None:
    return rec.retry.history[-1] if rec.retry and rec.retry.history else None
