"""Finishing runs: the final-status rule, applied once a run's container has exited or was stopped.

Non-empty ``repo/BLOCKED.md`` → ``blocked`` (its text is the question); a stop the server
asked for → its status and reason; non-zero exit → ``failed`` with the reason; else
``completed`` — or, with the QA gate on, the gate's run first (``service/qa.py``), whose verdict
settles the record when its container exits. :meth:`Finaliser.finalise` is idempotent: the exit watcher, the timer and a
second server may all call it for one run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from .. import safefs
from ..agents import RUN_HEADER, agent_base
from ..credentials import redact
from ..errors import UnsafePathError
from ..models import RunSummary, Status, WorkspaceRecord, utcnow
from ..runtime.base import Runtime
from ..scheduler import Scheduler
from ..store import StatusStore, WorkspacePaths
from .catalog import AgentCatalog
from .common import log_tail, parse_time
from .qa import QaGate

__all__ = ["MAX_QUESTION_BYTES", "Finaliser"]

log = logging.getLogger(__name__)

# BLOCKED.md is the agent's question; more than this is not a question.
MAX_QUESTION_BYTES = 64 * 1024


class Finaliser:
    """Turns an exited container into a final record; stops runs the server decides to end."""

    def __init__(
        self,
        store: StatusStore,
        runtime: Runtime,
        scheduler: Scheduler,
        catalog: AgentCatalog,
        qa: QaGate,
        finished: threading.Condition,
        on_final: Callable[[WorkspaceRecord], None],
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.scheduler = scheduler
        self.catalog = catalog
        self.qa = qa
        self._finished = finished  # notified after each run that ends (waiters re-read their record)
        self._on_final = on_final  # after a run ends for good (delivery, when sync is automatic)

    def finalise(self, name: str, container_id: str, exit_code: int | None) -> bool:
        """Apply the final-status rule to a run whose container has exited (or was stopped).

        Returns ``False`` when the record had already moved on (idempotent).
        """
        changed = False

        def apply(rec: WorkspaceRecord) -> bool:
            nonlocal changed
            if rec.status != Status.RUNNING or rec.container_id != container_id:
                return False
            self._apply_final_state(rec, exit_code)
            changed = True
            return True

        rec = self.store.update(name, apply)
        if not changed:
            return False
        self.runtime.remove(container_id)
        if rec.status == Status.RUNNING:  # the agent is done and the QA gate now runs
            return True
        if rec.status == Status.FAILED and rec.started_at and (rec.qa is None or rec.qa.state != "failed"):
            ran = time.time() - (parse_time(rec.started_at) or time.time())
            if self.scheduler.note_failure(rec.agent, ran):
                log.warning("pool %s paused after repeated fast failures", agent_base(rec.agent))
        with self._finished:
            self._finished.notify_all()
        try:
            self._on_final(rec)
        except Exception:  # delivery is retried from the outbox; the run's end stands
            log.exception("after %s ended", name)
        return True

    def _apply_final_state(self, rec: WorkspaceRecord, exit_code: int | None) -> None:
        ws = self.store.paths(rec.name)
        stop_status, stop_reason = rec.stop_status, rec.stop_reason
        rec.stop_status = rec.stop_reason = None
        rec.finished_at = utcnow()
        if rec.phase == "qa":
            self.qa.conclude(ws, rec, exit_code, (stop_status, stop_reason))
            return
        base = agent_base(rec.agent)
        secrets = self.catalog.secrets(base)  # a CLI may echo its key: never repeat it
        rec.exit_code = exit_code
        rec.summary = self._summarize(base, ws, secrets)
        try:
            question = redact(self._blocked_question(ws), secrets) or ""
            unsafe = None
        except UnsafePathError as e:
            question, unsafe = "", str(e)
        if stop_status == Status.CANCELLED:
            rec.status, rec.question = Status.CANCELLED, stop_reason
        elif unsafe is not None:
            rec.status, rec.question = Status.FAILED, f"the agent's BLOCKED.md cannot be read: {unsafe}"
        elif question:
            rec.status, rec.question = Status.BLOCKED, question
        elif stop_status is not None:
            rec.status, rec.question = stop_status, stop_reason
        elif exit_code != 0:
            rec.status, rec.question = Status.FAILED, self._failure_reason(rec, ws, exit_code, secrets)
        else:
            rec.status, rec.question = Status.COMPLETED, None
            if rec.qa_enabled:
                self.qa.begin(ws, rec)  # may leave the record running, now with the gate's container

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

    @staticmethod
    def _failure_reason(rec: WorkspaceRecord, ws: WorkspacePaths, exit_code: int | None, secrets: Iterable[str]) -> str:
        if exit_code is None:
            why = "the agent container ended without an exit code"
        elif exit_code == 137:
            why = "the agent was killed (exit code 137: out of memory or stopped)"
        else:
            why = f"the agent exited with code {exit_code}"
        if rec.summary and rec.summary.error:
            why += f": {rec.summary.error}"
        last = [ln for ln in log_tail(ws, agent_base(rec.agent), 5).splitlines() if ln]
        if last and not last[-1].startswith(RUN_HEADER) and not (rec.summary and rec.summary.error):
            why += f". Last output: {last[-1][:300]}"
        return redact(why, secrets) or why

    def stop_run(self, name: str, status: Status, reason: str, container_id: str | None = None) -> bool:
        """Stop a running workspace's container and finalise it as ``status`` with ``reason``.

        The mark is written before the container is stopped, so whichever of the exit watcher and
        this call finalises first, the run ends as asked (never as a plain exit 143). With
        ``container_id``, only that run is stopped (a timeout decided on an older view of the
        record must not stop the run a resume started since).
        """

        marked = False

        def mark(rec: WorkspaceRecord) -> bool:
            nonlocal marked
            if rec.status != Status.RUNNING or (container_id is not None and rec.container_id != container_id):
                return False
            rec.stop_status, rec.stop_reason = status, reason
            marked = True
            return True

        rec = self.store.update(name, mark)
        if not marked or rec.container_id is None:  # another run now, or nothing running
            return False
        self.runtime.stop(rec.container_id, timeout=5)
        info = self.runtime.inspect(rec.container_id)
        self.finalise(name, rec.container_id, info.exit_code if info else None)
        return True
