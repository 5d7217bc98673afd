"""The QA gate's container: after an agent ends ``completed``, the repository's tests run in a
fresh container from the same image, on the same clone, with the run's limits and the gate's own
timeout. The record stays ``running`` (``phase = "qa"``, its container the gate's) until that
container exits; the verdict is the run lifecycle's (``service/lifecycle.py``): ``completed``
with ``qa.state = "passed"``, or ``failed`` with the test summary as the reason, so
``agentic_resume`` sends the agent back to fix it.

Using the run's own container slot and record means the exit watcher, the timer's timeouts,
cancel and the restart reconciliation all cover the gate as they cover the agent.
"""

from __future__ import annotations

import logging
import re

from ... import safefs
from ...agents import CONTAINER_LOGS, CONTAINER_WORKDIR, agent_base
from ...config import Settings
from ...credentials import redact
from ...errors import UnsafePathError
from ...models import WorkspaceRecord
from ...qa import QaCommand, detect_test_command
from ...runtime.base import Mount, Runtime
from ...store import WorkspacePaths
from ..catalog import AgentCatalog
from ..containers import container_spec, hand_over
from .network import NetworkJobs

__all__ = ["QaGate"]

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
# The line most test runners end with: "3 passed", "1 failed, 2 passed in 0.1s", "FAIL", "ok ...".
_SUMMARY = re.compile(r"\b(passed|failed|error|errors|FAIL|ok|test result|tests?)\b")


class QaGate:
    """Finds the gate's command, starts its container and reads its output."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        catalog: AgentCatalog,
        root_id: str,
        network: NetworkJobs | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.catalog = catalog
        self.root_id = root_id
        self.network = network  # set: the gate's container fetches the clone through the run gateway

    def command(self, ws: WorkspacePaths) -> QaCommand | None:
        """The configured command, else the one the repository's files point to."""
        if self.settings.qa.command:
            return QaCommand(self.settings.qa.command, "[qa] command in the config file")
        return detect_test_command(ws.repo)

    def start(self, ws: WorkspacePaths, rec: WorkspaceRecord, command: str) -> str:
        """Start the gate's container for run ``rec.runs``; its id.

        Raises:
            LaunchError, RuntimeUnavailableError: the engine cannot or will not start it.
            UnsafePathError, OSError: its log file cannot be written.
        """
        log_name = f"qa-run{rec.runs}.log"
        env = {"HOME": "/tmp", "AGENTIC_LOG": f"{CONTAINER_LOGS}/{log_name}", "PYTHONDONTWRITEBYTECODE": "1"}
        safefs.write_text(ws.logs, ws.logs / log_name, f"=== QA gate of run {rec.runs}: {command} ===\n")
        if self.network is not None:
            env |= self.network.prepare(ws, rec.name, rec.runs, "qa", ws.logs / log_name, rec.branch)
            mounts = []
        else:
            # no agent home: no credentials
            mounts = [Mount(ws.repo, CONTAINER_WORKDIR), Mount(ws.logs, CONTAINER_LOGS)]
            hand_over(ws.logs)  # the gate runs as the agent's uid and appends to that file
        image = self.settings.qa.image or rec.image or self.catalog.image
        spec = container_spec(
            self.settings,
            self.root_id,
            rec,
            image,
            ["/bin/bash", "-c", command],
            env,
            mounts,
            phase="qa",
            network=self.network is not None,
        )
        return self.runtime.start(spec)

    def verdict(self, ws: WorkspacePaths, rec: WorkspaceRecord) -> tuple[str, str]:
        """The end of the gate's output (key values masked: the tests may print what the agent left)
        and the test runner's own summary line."""
        tail = redact(self._tail(ws, rec.runs), self.catalog.secrets(agent_base(rec.agent))) or ""
        return tail, self._summary(tail)

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
