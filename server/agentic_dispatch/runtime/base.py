"""The runtime seam: what the service needs from a container backend.

The Docker implementation lives in :mod:`agentic_dispatch.runtime.docker` (any Docker engine,
local or remote); another backend (Swarm services, Kubernetes Jobs) implements the same
:class:`Runtime`. A run is described by a :class:`ContainerSpec`: with network transfer it
names nothing on the server's disk (no :class:`Mount`): what goes in is fetched by the
container's ``agentic-run`` from the run gateway (its address and token in ``env``), what comes
back is sent there, and the exit is the backend's to report (:meth:`Runtime.inspect`,
:meth:`Runtime.watch_exits`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = [
    "LABEL_AGENT",
    "LABEL_PREFIX",
    "LABEL_ROOT",
    "LABEL_RUN",
    "LABEL_WORKSPACE",
    "ContainerInfo",
    "ContainerSpec",
    "ExitEvent",
    "Mount",
    "Runtime",
    "engine_address",
    "is_local_engine",
]

LABEL_PREFIX = "agentic-dispatch"
LABEL_ROOT = f"{LABEL_PREFIX}.root"
LABEL_WORKSPACE = f"{LABEL_PREFIX}.workspace"
LABEL_RUN = f"{LABEL_PREFIX}.run"
LABEL_AGENT = f"{LABEL_PREFIX}.agent"


def engine_address(docker_host: str | None) -> str:
    """The engine a client reaches: ``[runtime] docker_host``, else ``DOCKER_HOST``, else the local socket."""
    return docker_host or os.environ.get("DOCKER_HOST") or "unix://"


def is_local_engine(address: str) -> bool:
    """Whether the engine at ``address`` (as a client or ``DOCKER_HOST`` names it) is this machine's."""
    return address.startswith(("unix://", "npipe://", "http+unix://", "http+docker://"))


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one agent container."""

    image: str
    command: list[str]
    name: str
    workdir: str
    user: str
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    memory: str | None = None
    cpus: float | None = None
    pids: int | None = None
    network: str | None = None
    # Linux capabilities: none by default. The agent CLIs, git and the test runners need none
    # (tests/test_container_boundary.py shows a run with an empty effective set).
    cap_drop: tuple[str, ...] = ("ALL",)
    cap_add: tuple[str, ...] = ()
    # The names in ``env`` that are credentials (API keys, the gateway token): a backend that can
    # keep them apart (Swarm secrets) never shows them in its description of the container.
    secret_env: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: dict[str, str]
    running: bool
    exit_code: int | None
    oom_killed: bool = False
    error: str | None = None
    node: str | None = None  # a cluster's node it runs or ran on (its hostname)
    waiting: str | None = None  # running but on no node yet: why (no room, a constraint unmet)
    lost: str | None = None  # it will never report an exit: why (the node it ran on went away)

    @property
    def started(self) -> bool:
        """It runs or has run (a container created but never started is neither)."""
        return self.running or self.exit_code is not None


@dataclass(frozen=True)
class ExitEvent:
    """A container that ended, or (``lost``: why) one that will not end by itself: its node is gone,
    or the engine could not run it. A lost one is settled by the reconciling timer, woken by it."""

    container_id: str
    labels: dict[str, str]
    exit_code: int | None
    node: str | None = None
    lost: str | None = None


class Runtime(Protocol):
    """A container backend.

    Its errors are the project's own: every method raises
    :class:`~agentic_dispatch.errors.RuntimeUnavailableError` when the backend cannot be reached
    or does not answer within a short bound (a start or a throw-away run may take longer), never
    its client library's or a socket's exceptions; :meth:`start` raises
    :class:`~agentic_dispatch.errors.LaunchError` when the backend refuses that one container, and
    leaves none of it behind.
    """

    @property
    def local(self) -> bool:
        """Whether the backend runs containers on this machine (it can mount this disk, and
        ``localhost`` in a container's view may mean this machine)."""
        ...

    def describe(self) -> str:
        """Which engine this is, for a person (``unix:///var/run/docker.sock``, ``tcp://host:2376``)."""
        ...

    def check(self) -> None:
        """Raise :class:`RuntimeUnavailableError` when the backend cannot be reached."""

    def image_exists(self, image: str) -> bool: ...

    def image_problem(self, image: str) -> str | None:
        """Why the machines that run containers cannot all get ``image`` (on a swarm: it is in no
        registry, or not in its registry), for a person; ``None`` when they can."""

    def image_id(self, image: str) -> str | None:
        """The image's content id, or ``None`` when it is not on the engine."""

    def image_labels(self, image: str) -> dict[str, str]:
        """The image's labels (empty when it is not on the engine)."""

    def image_meta(self, image: str) -> tuple[str, dict[str, str]] | None:
        """The image's content id and labels from one look, or ``None`` when it is not on the engine."""

    def run_once(self, image: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        """Run ``command`` in a throw-away container (no network); return (exit code, output)."""

    def start(self, spec: ContainerSpec) -> str:
        """Create and start a container; return its id."""

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's state, or ``None`` when it no longer exists."""

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        """Every container (running or not) carrying all of ``labels``."""

    def stop(self, container_id: str, timeout: float = 10) -> None: ...

    def remove(self, container_id: str) -> None: ...

    def watch_exits(self, labels: dict[str, str], on_exit: Callable[[ExitEvent], None], stop: threading.Event) -> None:
        """Block, calling ``on_exit`` for each container with ``labels`` that exits, until ``stop`` is set."""
