"""Network transfer for a run's jobs (``[runtime] transfer = "network"``): what a job's container is
told to reach the run gateway, and what it means when its results did not come back.

The container gets no mount of this machine's disk; ``images/agent/agentic-run`` fetches the
job's inputs and sends its results through the gateway (:mod:`...gateway`). Each job gets a
fresh token, so a run's token dies with its job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ... import safefs
from ...errors import RuntimeUnavailableError, UnsafePathError
from ...gateway.tokens import issue_token
from ...gateway.transfer import TransferError, begin_job, job_log, received
from ...store import WorkspacePaths

if TYPE_CHECKING:
    from ...gateway.server import RunGateway

__all__ = ["NetworkJobs"]

_SIGN = "[agentic-run] "


class NetworkJobs:
    """The service's side of network transfer: the gateway, and each job's part of it."""

    def __init__(self, gateway: RunGateway, stop_grace: float, patience: float = 60.0) -> None:
        self.gateway = gateway
        self.stop_grace = stop_grace  # a stopped job sends its work back before it is killed
        self.patience = patience  # how long a job's container keeps trying the gateway
        self.listening = False

    def start(self) -> None:
        """Start the gateway (only a serving process listens: a one-off command never starts runs).

        Raises:
            OSError, ssl.SSLError: the address cannot be bound, or the certificate not loaded.
        """
        if not self.listening:
            self.gateway.start()
            self.listening = True

    def close(self) -> None:
        if self.listening:
            self.gateway.close()
            self.listening = False

    def prepare(self, ws: WorkspacePaths, name: str, run: int, phase: str, log: Path) -> dict[str, str]:
        """Make job ``phase`` of run ``run`` known to the gateway (its token, where its log goes);
        the environment its container reaches the gateway with. Call just before the start.

        Raises:
            RuntimeUnavailableError: no gateway listens in this process (the queue waits for one).
            OSError: the token or the job's state cannot be written.
        """
        if not self.listening:
            raise RuntimeUnavailableError(
                "runs use network transfer and the run gateway does not listen in this process: "
                "start the server (`agentic-dispatch serve`), which drains the queue"
            )
        env = {
            "AGENTIC_GATEWAY": self.gateway.run_url(name),
            "AGENTIC_TOKEN": issue_token(ws, run),
            "AGENTIC_GATEWAY_PATIENCE": f"{self.patience:g}",
        }
        begin_job(ws, run, phase, log)
        ca = self.gateway.ca_pem()
        if ca:
            env["AGENTIC_GATEWAY_CA"] = ca
        return env

    @staticmethod
    def is_network(ws: WorkspacePaths, run: int, phase: str) -> bool:
        try:
            job_log(ws, run, phase)
        except TransferError:
            return False
        return True

    @staticmethod
    def failure(ws: WorkspacePaths, run: int, phase: str) -> tuple[str, bool] | None:
        """Why job ``phase`` of a network run failed on the way back, and whether its results were
        lost on the way (never arrived: a ``lost`` failure, which a retry policy may run again) rather
        than refused; ``None`` when its results are in (and for a mounted job)."""
        if not NetworkJobs.is_network(ws, run, phase):
            return None
        got = received(ws, run, phase)
        if got is None:
            said = _last_word(ws, run, phase)
            why = "its container ended before its results came back through the run gateway"
            return why + (f" ({said})" if said else ""), True
        if got.refused:
            return f"the run gateway refused its results: {got.refused}", False
        if got.push_error:
            return f"its branch could not be sent back: {got.push_error}", False
        return None

    @staticmethod
    def ran_out_of_memory(ws: WorkspacePaths, run: int, phase: str) -> bool:
        """Whether job ``phase`` of a network run said the kernel killed a process of it for want of memory
        (a swarm reports such a job only as killed by a signal)."""
        got = received(ws, run, phase) if NetworkJobs.is_network(ws, run, phase) else None
        return got is not None and got.oom_killed


def _last_word(ws: WorkspacePaths, run: int, phase: str) -> str | None:
    """The last line ``agentic-run`` wrote in the job's log (what went wrong on its side)."""
    log, _ = job_log(ws, run, phase)
    try:
        text = safefs.tail_text(ws.logs, log, 16 * 1024) or ""
    except UnsafePathError:
        return None
    lines = [ln[len(_SIGN) :] for ln in text.splitlines() if ln.startswith(_SIGN)]
    return lines[-1][:300] if lines else None
