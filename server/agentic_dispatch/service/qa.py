"""The QA gate: after an agent ends ``completed``, the repository's tests run in a fresh
container from the same image, on the same clone, with the run's limits and the gate's own
timeout. The record stays ``running`` (``phase = "qa"``, its container the gate's) until
that container exits; then ``completed`` with ``qa.state = "passed"``, or ``failed`` with the
test summary as the reason, so ``agentic_resume`` sends the agent back to fix it.

Using the run's own container slot and record means the exit watcher, the timer's timeouts,
cancel and the restart reconciliation all cover the gate as they cover the agent.
"""

from __future__ import annotations

import logging
import re

from .. import safefs
from ..agents import CONTAINER_LOGS, CONTAINER_WORKDIR, agent_base
from ..config import Settings
from ..credentials import redact
from ..errors import LaunchError, RuntimeUnavailableError, UnsafePathError
from ..models import QaResult, Status, WorkspaceRecord, utcnow
from ..qa import QaCommand, detect_test_command
from ..runtime.base import Mount, Runtime
from ..store import WorkspacePaths
from .catalog import AgentCatalog
from .common import container_spec, hand_over

__all__ = ["QaGate"]

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
# The line most test runners end with: "3 passed", "1 failed, 2 passed in 0.1s", "FAIL", "ok ...".
_SUMMARY = re.compile(r"\b(passed|failed|error|errors|FAIL|ok|test result|tests?)\b")


class QaGate:
    """Starts the gate's container and reads its verdict."""

    def __init__(self, settings: Settings, runtime: Runtime, catalog: AgentCatalog, root_id: str) -> None:
        self.settings = settings
        self.runtime = runtime
        self.catalog = catalog
        self.root_id = root_id

    def command(self, ws: WorkspacePaths) -> QaCommand | None:
        """The configured command, else the one the repository's files point to."""
        if self.settings.qa.command:
            return QaCommand(self.settings.qa.command, "[qa] command in the config file")
        return detect_test_command(ws.repo)

    def begin(self, ws: WorkspacePaths, rec: WorkspaceRecord) -> None:
        """The agent's run ended ``completed``: start the gate (the record stays ``running``), or
        settle the record when there is nothing to run (``skipped``) or the gate cannot start."""
        found = self.command(ws)
        if found is None:
            rec.qa = QaResult(state="skipped", reason="no test command configured or recognised in the repository")
            rec.status, rec.question = Status.COMPLETED, None
            return
        log_name = f"qa-run{rec.runs}.log"
        env = {"HOME": "/tmp", "AGENTIC_LOG": f"{CONTAINER_LOGS}/{log_name}", "PYTHONDONTWRITEBYTECODE": "1"}
        mounts = [Mount(ws.repo, CONTAINER_WORKDIR), Mount(ws.logs, CONTAINER_LOGS)]  # no agent home: no credentials
        image = self.settings.qa.image or rec.image or self.catalog.image
        spec = container_spec(
            self.settings, self.root_id, rec, image, ["/bin/bash", "-c", found.command], env, mounts, phase="qa"
        )
        try:
            safefs.write_text(ws.logs, ws.logs / log_name, f"=== QA gate of run {rec.runs}: {found.command} ===\n")
            hand_over(ws.logs)  # the gate runs as the agent's uid and appends to that file
            container_id = self.runtime.start(spec)
        except (LaunchError, RuntimeUnavailableError, UnsafePathError, OSError) as e:
            rec.qa = QaResult(state="failed", command=found.command, reason=f"the gate could not start: {e}")
            rec.status = Status.FAILED
            rec.question = f"the QA gate could not start: {e}. Fix that, then call agentic_resume to run it again."
            return
        rec.status, rec.phase, rec.finished_at = Status.RUNNING, "qa", None
        rec.container_id = container_id
        rec.qa = QaResult(
            state="running",
            command=found.command,
            source=found.source,
            started_at=utcnow(),
            timeout_seconds=self.settings.qa.timeout_seconds,
        )

    def conclude(
        self, ws: WorkspacePaths, rec: WorkspaceRecord, exit_code: int | None, stop: tuple[Status | None, str | None]
    ) -> None:
        """The gate's container exited (or was stopped): settle the record from its exit code."""
        qa = rec.qa or QaResult(state="running")
        stop_status, stop_reason = stop
        rec.phase = "agent"
        qa.exit_code, qa.finished_at = exit_code, utcnow()
        # The tests may print what the agent left in the clone or its log: never repeat its key.
        qa.output_tail = redact(self._tail(ws, rec.runs), self.catalog.secrets(agent_base(rec.agent))) or ""
        if stop_status is not None:
            qa.state, qa.reason = "failed", stop_reason
            rec.status, rec.question = stop_status, stop_reason
        elif exit_code == 0:
            qa.state = "passed"
            rec.status, rec.question = Status.COMPLETED, None
        else:
            qa.state = "failed"
            qa.reason = self._summary(qa.output_tail) or f"exit code {exit_code}"
            rec.status = Status.FAILED
            rec.question = (
                f"the QA gate failed ({qa.command}, exit code {exit_code}): {qa.reason}. "
                "Call agentic_resume to send the agent back to fix it."
            )
        rec.qa = qa

    @staticmethod
    def _tail(ws: WorkspacePaths, run: int) -> str:
        try:
            return (safefs.tail_text(ws.logs, ws.logs / f"qa-run{run}.log", TAIL_BYTES) or "").strip()
        except UnsafePathError as e:
            return f"(the gate's output cannot be shown: {e})"

    @staticmethod
    def _summary(tail: str) -> str:
        """The test runner's own summary line: the last line that reads like one, else the last line."""
        lines = [ln.strip(" =") for ln in tail.splitlines() if ln.strip(" =")]
        for line in reversed(lines):
            if _SUMMARY.search(line):
                return line[:300]
        return lines[-1][:300] if lines else ""
