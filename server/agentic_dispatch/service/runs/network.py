"""Network transfer for a run's jobs (``[runtime] transfer = "network"``): what a job's container is
told to reach the run gateway, and what it means when its results did not come back.

The container gets no mount of this machine's disk; ``images/agent/agentic-run`` fetches the
job's inputs and sends its results through the gateway (:mod:`...gateway`). Each job gets a
fresh token, so a run's token dies with its job.

A login file that is mounted read-write on this machine (Codex's ``auth.json``, which Codex refreshes
in place, and whose old refresh token then stops working) is lent to a network run as a copy in its
home: :func:`lend_logins` notes what the user's file held, and :func:`return_logins` gives the run's
refreshed copy back to the user's file when the run ends, unless that file changed meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ... import safefs
from ...errors import RuntimeUnavailableError, UnsafePathError
from ...fileio import write_atomic
from ...gateway.tokens import issue_token
from ...gateway.transfer import TransferError, begin_job, job_log, received
from ...store import WorkspacePaths

if TYPE_CHECKING:
    from ...gateway.server import RunGateway

__all__ = ["NetworkJobs", "lend_logins", "return_logins"]

log = logging.getLogger(__name__)

_SIGN = "[agentic-run] "
LOGIN_MAX_BYTES = 1 << 20  # a login file is a few KiB; a run's copy past this is not given back


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

    def prepare(self, ws: WorkspacePaths, name: str, run: int, phase: str, log: Path, branch: str) -> dict[str, str]:
        """Make job ``phase`` of run ``run`` known to the gateway (its token, where its log goes);
        the environment its container reaches the gateway with (and clones ``branch`` by, before it
        has fetched the inputs that also name it). Call just before the start.

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
            "AGENTIC_BRANCH": branch,
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


def _lent(ws: WorkspacePaths, run: int) -> Path:
    return ws.meta / f"logins-run{run}.json"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lend_logins(ws: WorkspacePaths, run: int, mounted: list[tuple[Path, str]]) -> None:
    """Note, for each login file that is mounted on this machine (the user's file, its place in the agent
    home), what the user's file and the run's copy held as the run starts (call once the copies are made).

    Raises:
        OSError: the note cannot be written (then the run must not start).
        UnsafePathError: a copy in the home is a link or not a file.
    """
    lent = [
        {"source": str(source), "target": target, "user": _digest(source.read_bytes()), "copy": _copy(ws, target)}
        for source, target in mounted
    ]
    if lent:
        write_atomic(_lent(ws, run), json.dumps(lent) + "\n", mode=0o600)


def _copy(ws: WorkspacePaths, target: str) -> str | None:
    """The digest of the run's copy of a login file, ``None`` when there is none or it is too big to be one.

    Raises:
        UnsafePathError: the copy is a link or not a file.
    """
    got = safefs.read_range(ws.home, ws.home / target, 0, LOGIN_MAX_BYTES + 1)
    return None if got is None or len(got[0]) > LOGIN_MAX_BYTES else _digest(got[0])


def return_logins(name: str, ws: WorkspacePaths, run: int) -> list[str]:
    """Give the copies of the login files lent to run ``run`` of workspace ``name`` back to the user's files,
    where the run changed its copy (a refreshed token) and the user's file is as it was lent; once. Returns
    the targets given back.

    The copy is the agent's (it may be a link, huge, or not what a CLI wrote): it is read through safefs,
    with a size cap. A mounted run could write the user's file itself, so this gives a run no more than that.
    """
    try:
        lent = json.loads(_lent(ws, run).read_text(encoding="utf-8"))
        entries = [(Path(e["source"]), str(e["target"]), str(e["user"]), e["copy"]) for e in lent]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none lent (a mounted run, no login file), given back already, or not a note of ours
    given = []
    for source, target, user, lent_copy in entries:
        try:
            got = safefs.read_range(ws.home, ws.home / target, 0, LOGIN_MAX_BYTES + 1)
            if got is None or len(got[0]) > LOGIN_MAX_BYTES or _digest(got[0]) == lent_copy:
                continue  # gone, too big to be a login, or not refreshed by this run
            path = source.resolve()  # a link stays a link to the file it names
            if _digest(path.read_bytes()) != user:
                log.warning(
                    "%s: its refreshed %s is not given back to %s: that file changed while the run had a copy",
                    name, target, source,
                )  # fmt: skip
                continue
            st = path.stat()
            write_atomic(path, got[0], mode=st.st_mode & 0o777)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(path, st.st_uid, st.st_gid)
            given.append(target)
            log.info("%s: its refreshed %s was given back to %s", name, target, source)
        except (OSError, UnsafePathError) as e:
            log.warning("%s: its %s could not be given back to %s: %s", name, target, source, e)
    _lent(ws, run).unlink(missing_ok=True)
    return given
