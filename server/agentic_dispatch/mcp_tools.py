"""How the MCP front end registers a tool: the docstring as its description, the service the tools call
(:class:`LazyDispatcher`: built in the background, so that listing the tools waits for none of it), and
the one place where service errors become tool errors.

A :class:`~.errors.DispatchError` carries advice the model can act on: it becomes a ``ToolError``
with that text. The file system failing under the server (a full disk, a folder made read-only)
becomes one too, saying what happened and what to do, instead of the SDK's bare
"Error executing tool". Anything else is a bug and stays the SDK's unexpected error.
"""

from __future__ import annotations

import functools
import inspect
import sqlite3
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import ValidationError

from .errors import DispatchError, describe_state_failure
from .models import problems

if TYPE_CHECKING:
    from .service import Dispatcher

__all__ = ["LazyDispatcher", "register_tool", "tool_error"]

F = TypeVar("F", bound=Callable[..., Any])


class LazyDispatcher:
    """The service as the tools hold it: a stand-in for the :class:`Dispatcher` that ``make`` builds,
    once, when it is first needed (on the thread that needs it, never the event loop's) or when
    the server starts it in the background.

    Building it imports the engine's client, GitPython and every part of the service; a host waits
    for the answer to ``initialize`` and ``tools/list`` before it lets its model see the tools, so
    those answers must not wait for that. Every method of the Dispatcher is here under its name:
    the call waits until the service is up, then runs on it. A build that fails (a bad config)
    fails the call with its error (a :class:`~.errors.DispatchError` says what to fix), and the
    next call builds again."""

    def __init__(self, make: Callable[[], Dispatcher]) -> None:
        self._make = make
        self._changed = threading.Condition()
        self._built: Dispatcher | None = None
        self._building = False

    @property
    def is_up(self) -> bool:
        """Whether the service has been built and started."""
        return self._built is not None

    def ready(self) -> Dispatcher:
        """The service, built and started first if it is not yet (or waited for, while another thread builds it).

        Raises:
            Exception: what building it raised, e.g. :class:`~.errors.ConfigError`.
        """
        with self._changed:
            while self._building:
                self._changed.wait()
            if self._built is not None:
                return self._built
            self._building = True
        built = None
        try:
            made = self._make()
            made.start()
            built = made
            return made
        finally:
            with self._changed:
                self._built, self._building = built, False
                self._changed.notify_all()

    def close(self) -> None:
        """Stop the service's background threads, if it was built (after a build under way ends)."""
        with self._changed:
            while self._building:
                self._changed.wait()
            built = self._built
        if built is not None:
            built.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:  # looked up when called: on the caller's thread
            return getattr(self.ready(), name)(*args, **kwargs)

        return call


def tool_error(e: Exception) -> ToolError | None:
    """The tool error a failure becomes, or ``None`` for one that is a bug."""
    if isinstance(e, DispatchError):
        return ToolError(str(e))
    if isinstance(e, ValidationError):  # a request model built from the arguments
        return ToolError(problems(e))
    if isinstance(e, OSError | sqlite3.Error):
        return ToolError(describe_state_failure(e))
    return None


def _translating(fn: F) -> F:
    """``fn`` with its failures turned into tool errors (see :func:`tool_error`)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except (DispatchError, ValidationError, OSError, sqlite3.Error) as e:
                raise tool_error(e) or e from e

        return run_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DispatchError, ValidationError, OSError, sqlite3.Error) as e:
            raise tool_error(e) or e from e

    return run  # type: ignore[return-value]


def register_tool(server: MCPServer[Any], name: str, annotations: ToolAnnotations) -> Callable[[F], F]:
    """``server.tool`` with the docstring, dedented, as the description (hosts show it verbatim) and
    the errors translated. The signature the SDK reads is the tool function's own."""

    def register(fn: F) -> F:
        server.tool(name=name, annotations=annotations, description=inspect.cleandoc(fn.__doc__ or ""))(
            _translating(fn)
        )
        return fn

    return register
