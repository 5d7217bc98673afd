"""A runtime made at its first use.

Making one imports the engine's client library (docker-py, requests, urllib3): a tenth of a second
or more that the server's first answer to its host must not wait for, and that a call which never
touches the engine (``agentic_status``) should not pay. :class:`DeferredRuntime` stands in for the
runtime the settings choose until a call needs the engine; whether the engine is this machine's is
known from the settings alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .base import ContainerInfo, ContainerSpec, ExitEvent, Runtime

__all__ = ["DeferredRuntime"]


class DeferredRuntime:
    """The :class:`Runtime` that ``make`` returns, made once, by the first call that needs it.

    Args:
        make: makes the runtime (imports its module; it asks the engine nothing yet).
        local: what the runtime's :attr:`~Runtime.local` will say.
    """

    def __init__(self, make: Callable[[], Runtime], *, local: bool) -> None:
        self._make = make
        self._local = local
        self._lock = threading.Lock()
        self._made: Runtime | None = None

    @property
    def made(self) -> Runtime:
        """The runtime, made now if it is not yet."""
        with self._lock:
            if self._made is None:
                self._made = self._make()
            return self._made

    @property
    def local(self) -> bool:
        return self._local

    def describe(self) -> str:
        return self.made.describe()

    def check(self) -> None:
        self.made.check()

    def image_exists(self, image: str) -> bool:
        return self.made.image_exists(image)

    def image_problem(self, image: str) -> str | None:
        return self.made.image_problem(image)

    def image_id(self, image: str) -> str | None:
        return self.made.image_id(image)

    def image_labels(self, image: str) -> dict[str, str]:
        return self.made.image_labels(image)

    def image_meta(self, image: str) -> tuple[str, dict[str, str]] | None:
        return self.made.image_meta(image)

    def run_once(self, image: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        return self.made.run_once(image, command, timeout)

    def start(self, spec: ContainerSpec) -> str:
        return self.made.start(spec)

    def inspect(self, container_id: str) -> ContainerInfo | None:
        return self.made.inspect(container_id)

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        return self.made.list(labels)

    def stop(self, container_id: str, timeout: float = 10) -> None:
        self.made.stop(container_id, timeout)

    def remove(self, container_id: str) -> None:
        self.made.remove(container_id)

    def watch_exits(self, labels: dict[str, str], on_exit: Callable[[ExitEvent], None], stop: threading.Event) -> None:
        self.made.watch_exits(labels, on_exit, stop)
