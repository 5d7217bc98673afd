"""The containers of runs as the service builds them: who the agent runs as (its uid, the folders
handed to it, git commands a person runs in its clone), container-side URLs, and the spec of one
job's container (the agent's or the QA gate's)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .. import safefs
from ..agents import CONTAINER_WORKDIR
from ..config import Settings
from ..gitops import safe_directory
from ..models import WorkspaceRecord
from ..naming import slugify
from ..runtime.base import LABEL_AGENT, LABEL_ROOT, LABEL_RUN, LABEL_WORKSPACE, ContainerSpec, Mount

__all__ = [
    "AGENT_UID",
    "LABEL_PHASE",
    "agent_owner",
    "container_spec",
    "container_url",
    "git_in",
    "hand_over",
]

# Set on the QA gate's container (the agent's carries none): same workspace and run, another job.
LABEL_PHASE = "agentic-dispatch.phase"

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}  # noqa: S104 (names, not a bind)

# The uid:gid agent containers run as when the server runs as root: the image's unprivileged
# `agent` user. The agent is never root, and the folders it writes are handed to it.
AGENT_UID = AGENT_GID = 1000


def agent_owner() -> tuple[int, int]:
    """The uid:gid of the agent's (and the QA gate's) container: the host user's, so what the agent
    writes stays theirs; under a root server the image's ``agent`` user (:data:`AGENT_UID`)."""
    if os.geteuid() == 0:
        return AGENT_UID, AGENT_GID
    return os.getuid(), os.getgid()


def hand_over(*folders: Path) -> None:
    """Give the agent's folders, and what the server wrote in them since, to the container's
    uid (only under a root server; otherwise they are the host user's already). Call it just
    before a container starts, while none runs on the workspace; links are never followed.

    Raises:
        UnsafePathError: a folder itself is a link.
    """
    uid, gid = agent_owner()
    if uid == os.geteuid():
        return
    for folder in folders:
        safefs.chown_tree(folder, uid, gid)


def git_in(repo: Path) -> str:
    """``git -C <repo>`` as a person on this host types it to look at a workspace's clone (under a
    root server the clone is the agent's uid's, which git refuses without ``safe.directory``)."""
    if agent_owner()[0] == os.geteuid():
        return f"git -C {repo}"
    return f"git -c {safe_directory(repo)} -C {repo}"


def container_url(url: str) -> str:
    """``url`` as a container reaches it: loopback names mean the host, not the container."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _LOOPBACK_HOSTS:
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + "host.docker.internal" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def container_spec(
    settings: Settings,
    root_id: str,
    record: WorkspaceRecord,
    image: str,
    argv: list[str],
    env: dict[str, str],
    mounts: list[Mount],
    phase: str | None = None,
    network: bool = False,
    secret_env: frozenset[str] = frozenset(),
) -> ContainerSpec:
    """The container of one job of run ``record.runs`` (the agent, or with ``phase`` the QA gate):
    the workspace's clone is the working directory, output is appended to ``$AGENTIC_LOG`` as it
    comes (``exec`` keeps the real exit code), it runs as :func:`agent_owner` with no capabilities
    and the configured limits, and its labels find it again after a restart. With ``network``
    the job runs under ``agentic-run``, which fetches its workspace and sends its results back
    through the run gateway (``mounts`` is then empty). ``secret_env`` names the variables of ``env``
    that are credentials (the gateway token is one), for a backend that keeps them apart."""
    res = settings.resources
    base = slugify(f"{record.org}-{record.repo_name}-{record.name.rsplit('/', 1)[-1]}", 80)
    labels = {LABEL_ROOT: root_id, LABEL_WORKSPACE: record.name, LABEL_RUN: str(record.runs), LABEL_AGENT: record.agent}
    if phase is not None:
        labels[LABEL_PHASE] = phase
    return ContainerSpec(
        image=image,
        command=(
            ["agentic-run", phase or "agent", *argv]
            if network
            else ["/bin/sh", "-c", 'exec "$@" >>"$AGENTIC_LOG" 2>&1', f"agentic-{phase or 'run'}", *argv]
        ),
        name=f"agentic-{base}-r{record.runs}{'-' + phase if phase else ''}-{root_id[:6]}",
        workdir=CONTAINER_WORKDIR,
        user="{}:{}".format(*agent_owner()),
        env=env,
        mounts=mounts,
        labels=labels,
        memory=res.memory or None,
        cpus=res.cpus,
        pids=res.pids,
        network=res.network,
        secret_env=frozenset(k for k in (secret_env | {"AGENTIC_TOKEN"}) if k in env),
    )
