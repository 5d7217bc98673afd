"""How the MCP front end registers a tool: the docstring as its description, and the one place where
service errors become tool errors.

A :class:`~.errors.DispatchError` carries advice the model can act on: it becomes a ``ToolError``
with that text. The file system failing under the server (a full disk, a folder made read-only)
becomes one too, saying what happened and what to do, instead of the SDK's bare
"Error executing tool". Anything else is a bug and stays the SDK's unexpected error.
"""

from __future__ import annotations

import functools
import inspect
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import ValidationError

from .errors import DispatchError, describe_state_failure
from .models import problems

__all__ = ["register_tool", "tool_error"]

F = TypeVar("F", bound=Callable[..., Any])


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
