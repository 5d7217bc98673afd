"""Carrying out the run lifecycle: every happening goes through :meth:`RunLifecycle.apply`, which
reads the record under the workspace lock, asks :func:`.lifecycle.transition` what changes, writes
the record and its event lines, then carries out the effects.

Effects that belong to the change itself (starting the QA gate's container) run under the lock,
before the record is written, so no half-made state is ever on disk. Effects that follow it
(removing the exited container, waking waiters, enqueueing the delivery, counting a fast
failure) run after the write, each on its own: one that fails (the engine gone as the run
ends) is logged and never skips the others. A container left behind that way is removed by the
timer later (``recovery``), never called an orphan.

:meth:`RunLifecycle.finish` is idempotent: the exit watcher, the timer and a second server may all
report one exit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, cast

from ... import safefs
from ...agents import RUN_HEADER, agent_base
from ...checkpoints import checkpoint as keep_checkpoint
from ...credentials import redact
from ...errors import DispatchError, LaunchError, RuntimeUnavailableError, StateError, UnsafePathError
from ...models import (
    CheckpointInfo,
    Event,
    OutOfScope,
    RunSummary,
    Status,
    Verdict,
    WorkspaceRecord,
    parse_time,
    utcnow,
)
from ...runtime.base import Runtime
from ...scheduler import Scheduler, dependency_wait
from ...scope import out_of_scope
from ...store import StatusStore, WorkspacePaths, log_tail
from ..catalog import AgentCatalog
from ..delivery import ResultDelivery
from ..run_files import RunFiles
from .lifecycle import (
    Checkpoint,
    CountFailure,
    Dispatched,
    Effect,
    Exited,
    Happening,
    Outcome,
    PrepareRetry,
    QaExited,
    QaLaunchFailed,
    QaStarted,
    RemoveContainer,
    Settled,
    StartQa,
    StopContainer,
    StopRequested,
    Waiting,
    transition,
)
from .network import NetworkJobs, return_logins
from .qa_gate import QaGate

__all__ = ["MAX_QUESTION_BYTES", "RunLifecycle", "StopOutcome"]

StopOutcome = Literal["stopped", "pending", "idle"]

log = logging.getLogger(__name__)

# BLOCKED.md is the agent's question; more than this is not a question.
MAX_QUESTION_BYTES = 64 * 1024


class RunLifecycle:
    """The executor of :mod:`.lifecycle`: the one way a run's state changes."""

    def __init__(
        self,
        store: StatusStore,
        runtime: Runtime,
        scheduler: Scheduler,
        catalog: AgentCatalog,
        qa: QaGate,
        delivery: ResultDelivery,
        finished: threading.Condition,
        checkpoints: Path,
        run_files: RunFiles,
        network: NetworkJobs | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.scheduler = scheduler
        self.catalog = catalog
        self.qa = qa
        self.delivery = delivery
        self._finished = finished  # notified after each run that ends (waiters re-read their record)
        self._checkpoints = checkpoints  # where checkpoint commits are built
        self.network = network  # set: runs fetch and send their workspace through the run gateway
        # How long a stopped container may take: with network transfer it sends its work back first.
        self.stop_grace = network.stop_grace if network is not None else 5.0
        self.run_files = run_files  # a retry's prompt and files

    # -- the one way in ----------------------------------------------------------------------
    def apply(
        self,
        name: str,
        happening: Happening | Callable[[WorkspaceRecord], Happening | None],
        prepare: Callable[[WorkspaceRecord], None] | None = None,
    ) -> WorkspaceRecord | None:
        """Apply ``happening`` (or what ``happening(record)`` makes of the record as it is now) to
        workspace ``name``. ``prepare`` sees the new record under the lock before it is written and
        may refuse by raising. Returns the new record, or ``None`` when nothing applied.

        Raises:
            WorkspaceNotFoundError, CorruptRecordError: the record cannot be read.
            OSError: the record cannot be written (nothing changed then).
        """
        with self.store.locked(name) as ws:
            rec = self.store.read(name)
            h = happening(rec) if callable(happening) else happening
            out = transition(rec, h, utcnow()) if h is not None else None
            if out is None:
                return None
            out = self._during(ws, out)
            if prepare is not None:
                prepare(out.record)
            if out.record != rec:  # a happening that only logs a line (Waiting) rewrites nothing
                self.store.write(out.record)
            self._log_events(out)
        self._after(out)
        return out.record

    def commit_new(self, record: WorkspaceRecord) -> None:
        """Make a staged workspace's first record (queued) and its ``dispatched`` line exist, or
        neither: when either cannot be written the workspace folder is removed whole, so a dispatch
        that reports an error leaves nothing that will ever run (and its name free).

        Raises:
            StateError: the record or its event could not be written (the reason, and what to do).
        """
        out = transition(record, Dispatched(), utcnow())
        assert out is not None  # a new record is queued
        with self.store.locked(record.name) as ws:
            try:
                self.store.write(out.record)
                self._log_events(out, strict=True)
            except OSError as e:
                shutil.rmtree(ws.dir, ignore_errors=True)
                with contextlib.suppress(OSError, sqlite3.Error):  # the index catches up with the folder gone
                    self.store.forget(record.name)
                raise StateError(
                    f"the dispatch of {record.name} could not be recorded ({e.strerror or e}); nothing was kept. "
                    "Free disk space or fix the permissions of the root, then dispatch again."
                ) from e

    # -- happenings that need facts from the workspace ------------------------------------------
    def finish(
        self, name: str, container_id: str, exit_code: int | None, oom_killed: bool = False, node: str | None = None
    ) -> bool:
        """A run's container (the agent's or the QA gate's) exited or was stopped: settle the record.

        Returns ``False`` when the record had already moved on (idempotent).
        """

        def observed(rec: WorkspaceRecord) -> Happening | None:
            if rec.status != Status.RUNNING or rec.container_id != container_id:
                return None  # reported already, or another run now: read nothing
            ws = self.store.paths(name)
            if rec.phase == "qa":
                tail, summary = self.qa.verdict(ws, rec)
                return QaExited(container_id, exit_code, tail, summary)
            return_logins(name, ws, rec.runs)  # a network run's refreshed login, back to the user's file
            return self._exited(ws, rec, container_id, exit_code, oom_killed, node)

        return self.apply(name, observed) is not None

    def stop(
        self,
        name: str,
        status: Status,
        reason: str,
        container_id: str | None = None,
        cause: Literal["timeout"] | None = None,
    ) -> StopOutcome:
        """Stop a running workspace's container; it ends ``status`` with ``reason``.

        The mark is written before the container is stopped, so whichever of the exit watcher and
        this call settles first, the run ends as asked (never as a plain exit 143). With
        ``container_id``, only that run is stopped. ``"pending"``: the mark is written but the
        engine cannot be reached; the timer stops the container (and the run ends as asked) once
        it answers again. ``"idle"``: nothing of that run was running.
        """
        rec = self.apply(name, StopRequested(status, reason, container_id, cause))
        if rec is None or rec.container_id is None:
            return "idle"
        return self.stop_marked(rec.name, rec.container_id)

    def stop_marked(self, name: str, container_id: str) -> StopOutcome:
        """Stop the container of a run marked to stop, and settle the run from its exit."""
        try:
            self.runtime.stop(container_id, timeout=self.stop_grace)
            info = self.runtime.inspect(container_id)
        except RuntimeUnavailableError as e:
            log.warning("cannot stop %s now (%s); the timer tries again", name, e)
            return "pending"
        if info is None:
            self.finish(name, container_id, None)
        else:
            self.finish(name, container_id, info.exit_code, info.oom_killed, info.node)
        return "stopped"

    def _exited(
        self,
        ws: WorkspacePaths,
        rec: WorkspaceRecord,
        container_id: str,
        exit_code: int | None,
        oom: bool,
        node: str | None = None,
    ) -> Exited:
        base = agent_base(rec.agent)
        secrets = self.catalog.secrets(base)  # a CLI may echo its key: never repeat it
        try:
            question, unsafe = redact(self._blocked_question(ws), secrets) or "", None
        except UnsafePathError as e:
            question, unsafe = "", str(e)
        last = [ln for ln in log_tail(ws, base, 5).splitlines() if ln]
        review, review_problem = (
            self._review(ws, secrets) if rec.review_of is not None and exit_code == 0 else (None, None)
        )
        qa_command = None
        if rec.qa_enabled and exit_code == 0 and not question and unsafe is None and rec.stop_status is None:
            found = self.qa.command(ws)
            qa_command = (found.command, found.source) if found is not None else None
        transfer = NetworkJobs.failure(ws, rec.runs, "agent")
        return Exited(
            container_id,
            exit_code,
            summary=self._summarize(base, ws, secrets),
            question=question,
            unsafe_question=unsafe,
            last_output=redact(last[-1], secrets) if last and not last[-1].startswith(RUN_HEADER) else None,
            oom_killed=oom or NetworkJobs.ran_out_of_memory(ws, rec.runs, "agent"),
            qa_command=qa_command,
            out_of_scope=self._out_of_scope(ws, rec),
            transfer_failure=transfer[0] if transfer else None,
            transfer_lost=transfer[1] if transfer else False,
            review=review,
            review_problem=review_problem,
            node=node,
        )

    def _out_of_scope(self, ws: WorkspacePaths, rec: WorkspaceRecord) -> OutOfScope | None:
        """The branch's changes since it started (commits, checkpoint) outside the dispatch's scope;
        ``None`` without a scope, or when they cannot be read (logged: the run ends as it would)."""
        if not rec.scope or rec.base_commit is None:
            return None
        try:
            return out_of_scope(ws.repo, rec.base_commit, rec.branch, rec.scope, self._checkpoints)
        except (DispatchError, OSError) as e:
            log.warning("%s: its changes could not be checked against its scope: %s", rec.name, e)
            return None

    @staticmethod
    def _review(ws: WorkspacePaths, secrets: Iterable[str]) -> tuple[tuple[Verdict, str] | None, str | None]:
        """A reviewer's ``REVIEW.md`` (its first 64 KiB, key values masked): ``((verdict, comments), None)``,
        or ``(None, why there is no verdict)``."""
        try:
            text = safefs.read_text(ws.repo, ws.repo / "REVIEW.md", MAX_QUESTION_BYTES)
        except UnsafePathError as e:
            return None, f"REVIEW.md cannot be read: {e}"
        if text is None:
            return None, "there is no REVIEW.md"
        first, _, rest = text.strip().partition("\n")
        verdict = first.strip().strip("#*` ").lower().rstrip(".:")
        if verdict not in ("approved", "changes requested"):
            return None, f"REVIEW.md's first line is {first.strip()[:80]!r}"
        return (cast("Verdict", verdict), redact(rest.strip(), secrets) or ""), None

    @staticmethod
    def _blocked_question(ws: WorkspacePaths) -> str:
        """The text of ``repo/BLOCKED.md`` (its first 64 KiB), or ``""`` when there is none.

        Raises:
            UnsafePathError: the agent left a link or a non-file there.
        """
        text = safefs.read_text(ws.repo, ws.repo / "BLOCKED.md", MAX_QUESTION_BYTES)
        return (text or "").strip()

    def _summarize(self, base: str, ws: WorkspacePaths, secrets: Iterable[str]) -> RunSummary | None:
        try:
            safefs.check_file(ws.logs, ws.log(base))  # only a regular file is parsed
        except UnsafePathError as e:
            log.warning("not reading the log of %s: %s", ws.dir, e)
            return None
        summary = self.catalog.agents[base].summarize(ws.log(base))
        if summary is None:
            return None
        return summary.model_copy(
            update={"final_message": redact(summary.final_message, secrets), "error": redact(summary.error, secrets)}
        )

    # -- effects ----------------------------------------------------------------------------------
    def _during(self, ws: WorkspacePaths, out: Outcome) -> Outcome:
        """Effects that are part of the change: keep a stopped run's uncommitted work as a checkpoint;
        start the QA gate, and fold in how that went."""
        for effect in out.effects:
            if isinstance(effect, Checkpoint):
                self._checkpoint(ws, out.record, effect.why)
            elif isinstance(effect, PrepareRetry):
                self._prepare_retry(ws, out.record, effect)
        for effect in out.effects:
            if not isinstance(effect, StartQa):
                continue
            rest: list[Effect] = [e for e in out.effects if not isinstance(e, StartQa)]
            try:
                container_id = self.qa.start(ws, out.record, effect.command)
                h: Happening = QaStarted(container_id, utcnow(), self.qa.settings.qa.timeout_seconds)
            except (LaunchError, RuntimeUnavailableError, UnsafePathError, OSError) as e:
                h = QaLaunchFailed(str(e))
            then = transition(out.record, h, utcnow())
            if then is None:  # pragma: no cover (a gate being started always takes either)
                return out
            return Outcome(then.record, out.events + then.events, rest + then.effects)
        return out

    def _prepare_retry(self, ws: WorkspacePaths, rec: WorkspaceRecord, retry: PrepareRetry) -> None:
        """The next attempt's prompt and files: a message to the agent's own session when the agent home
        still holds it (else the whole task, with why the last attempt ended), and ``ANSWER.md``. When
        they cannot be written (logged), the attempt runs with the last run's files."""
        base = agent_base(rec.agent)
        if rec.resume_session is not None and not self.catalog.agents[base].has_session(ws.home, rec.resume_session):
            rec.resume_session = None  # a fresh session, with the whole task
        asked = rec.model_copy(update={"question": retry.question})
        try:
            variables = self.run_files.saved_variables(ws)
            prompt = self.run_files.render(ws, asked, variables, native=rec.resume_session is not None)
            self.run_files.prepare(ws, asked, variables, prompt)
            safefs.write_text(ws.repo, ws.repo / "ANSWER.md", retry.answer + "\n")
        except (DispatchError, OSError) as e:
            log.warning("%s: the files of attempt %s could not be written: %s", rec.name, rec.runs, e)
            return
        rec.prompt_sha256 = asked.prompt_sha256

    def _checkpoint(self, ws: WorkspacePaths, rec: WorkspaceRecord, why: str) -> None:
        """Commit what the work tree holds beyond the branch (server-side git only, never in the
        agent's repository); the record says so. A checkpoint that cannot be made is logged: the
        run ends as it would, its work tree left as it is."""
        try:
            made = keep_checkpoint(ws.repo, rec.branch, why, self._checkpoints)
        except (DispatchError, OSError) as e:
            log.warning("%s: its uncommitted work could not be kept as a checkpoint: %s", rec.name, e)
            return
        if made is not None:
            rec.checkpoint = CheckpointInfo(commit=made.commit, why=why, files=made.files)
            rec.out_of_scope = self._out_of_scope(ws, rec) or rec.out_of_scope  # the checkpoint's paths too

    def _log_events(self, out: Outcome, strict: bool = False) -> None:
        rec = out.record
        for kind, extra in out.events:
            event = Event.model_validate(
                {"kind": kind, "workspace": rec.name, "agent": rec.agent, "status": rec.status.value, "runs": rec.runs}
                | extra
            )
            try:
                self.store.events.append(event)
            except OSError as e:
                if strict:
                    raise
                # the record is the truth and was written; watchers miss this one line
                log.error("cannot write the %s event of %s to the events log: %s", kind, rec.name, e)

    def _after(self, out: Outcome) -> None:
        """Effects that follow the change, each on its own: one failing never skips the others."""
        rec = out.record
        for effect in out.effects:  # in the table's order: the container is gone before waiters wake
            try:
                self._carry_out(rec, effect)
            except DispatchError as e:
                log.warning("%s: %s after it became %s: %s", rec.name, type(effect).__name__, rec.status, e)
            except Exception:  # a bug must not skip the delivery or the waiters
                log.exception("%s: %s failed", rec.name, type(effect).__name__)

    def _tell_dependents(self, name: str) -> None:
        """A workspace ended without completing: each queued run that waits for it gets a ``queued`` line
        saying so and what to do (so a watch on it wakes), as its status row's ``waiting_for`` says."""

        def told(rec: WorkspaceRecord) -> Waiting | None:
            why = dependency_wait(rec, self.store.find)
            return Waiting(why) if why is not None else None

        for dependent in self.store.dependents(name):
            try:
                self.apply(dependent, told)
            except (DispatchError, OSError) as e:  # gone or unreadable: its row says so
                log.warning("cannot tell %s that %s ended: %s", dependent, name, e)

    def _carry_out(self, rec: WorkspaceRecord, effect: object) -> None:
        match effect:
            case Settled():  # a waiter woken last finds the delivery queued and the dependents told
                try:
                    self.delivery.after_run(rec)
                    if rec.status in (Status.FAILED, Status.BLOCKED):
                        self._tell_dependents(rec.name)
                finally:
                    with self._finished:
                        self._finished.notify_all()
            case CountFailure(agent=agent, started_at=started_at):
                ran = time.time() - (parse_time(started_at) or time.time())
                if self.scheduler.note_failure(agent, ran):
                    log.warning("pool %s paused after repeated fast failures", agent_base(agent))
            case RemoveContainer(container_id=cid):
                self.runtime.remove(cid)
            case StopContainer():
                pass  # the caller of :meth:`stop` stops it, and says when it could not
            case Checkpoint() | PrepareRetry():
                pass  # made under the lock, before the record was written (_during)
