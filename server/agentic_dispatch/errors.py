"""Errors raised by agentic-dispatch.

Every error the package raises on purpose derives from :class:`DispatchError`; its
message is written for the person (or model) who has to act on it, and ends with
what to do next. Third-party errors (GitPython, the Docker SDK, pydantic) are
translated at the module that calls the library, with ``raise ... from e``.

    DispatchError
    ├── InvalidInputError        a caller-supplied value is malformed (bad name, empty task, unknown agent)
    │   └── MissingVariablesError    a plan template needs variables that were not given
    ├── RepoError                the repository cannot be resolved, fetched or cloned
    ├── CheckpointError          git could not keep a stopped run's uncommitted work as a commit
    ├── WorkspaceNotFoundError   no workspace by that name
    ├── StateError               the operation does not fit the workspace's status (resume a running one)
    ├── CorruptRecordError       a status.json that cannot be read back; it is reported, never overwritten
    ├── UnsafePathError          an agent left a link (or a non-file) where the server reads or writes
    ├── ConfigError              the config file is invalid (one line per problem)
    ├── RuntimeUnavailableError  the container engine or the agent image is missing
    └── LaunchError              the engine refused this one container (bad resource limit, name clash ...)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = [
    "AgentNotReadyError",
    "CheckpointError",
    "ConfigError",
    "CorruptRecordError",
    "DispatchError",
    "InvalidInputError",
    "LaunchError",
    "MissingVariablesError",
    "RepoError",
    "RuntimeUnavailableError",
    "StateError",
    "UnsafePathError",
    "WorkspaceNotFoundError",
    "describe_state_failure",
]


class DispatchError(Exception):
    """Root of every error agentic-dispatch raises on purpose."""


class InvalidInputError(DispatchError, ValueError):
    """A caller-supplied value is malformed. Also a ``ValueError``, so a pydantic validator that
    raises it reports it as that field's problem (the request model's constraints are validators).

    Attributes:
        field: the argument that was wrong (``repo``, ``branch``, ``agent`` ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class MissingVariablesError(InvalidInputError):
    """A template references variables the caller did not supply."""

    def __init__(self, template: str, missing: list[str]) -> None:
        names = ", ".join(sorted(missing))
        super().__init__(
            "variables",
            f"template {template!r} needs variables that were not given: {names}. "
            "Pass them in `variables` (a mapping of name to text) and dispatch again.",
        )
        self.template = template
        self.missing = sorted(missing)


class RepoError(DispatchError):
    """The repository cannot be resolved, fetched or cloned."""


class CheckpointError(DispatchError):
    """The uncommitted work in a clone could not be kept as a checkpoint commit (git failed or ran
    out of time, or the branch is not what a checkpoint can build on). Nothing in the clone changed.

    Attributes:
        clone: the clone (a workspace's ``repo/`` folder).
        reason: what went wrong.
    """

    def __init__(self, clone: Path, reason: str) -> None:
        super().__init__(
            f"cannot keep the uncommitted work in {clone} as a checkpoint: {reason}. The work is still in its "
            "work tree: look at it there (git status), commit it by hand or fix what the reason names, then try again."
        )
        self.clone = clone
        self.reason = reason


class WorkspaceNotFoundError(DispatchError):
    """No workspace has that name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no workspace named {name!r}. Call agentic_status to list workspaces and use a name it shows."
        )
        self.name = name


class StateError(DispatchError):
    """The operation does not fit the workspace's current status."""


class CorruptRecordError(DispatchError):
    """A status.json could not be parsed. The file is left as it is."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path} is not a valid workspace record ({reason}); it was left untouched. "
            "Inspect or remove that file by hand."
        )
        self.path = path
        self.reason = reason


class ConfigError(DispatchError):
    """The config file is invalid. The message holds one line per problem."""

    def __init__(self, path: Path | None, problems: list[str]) -> None:
        where = str(path) if path else "settings"
        super().__init__("\n".join(f"{where}: {p}" for p in problems))
        self.path = path
        self.problems = problems


class RuntimeUnavailableError(DispatchError):
    """The container engine cannot be reached or the agent image is missing."""


class LaunchError(DispatchError):
    """The engine refused to start one run's container; other runs may still start."""


class AgentNotReadyError(DispatchError):
    """An agent cannot run here: its CLI is missing from the image or it has no credentials.

    The message is the doctor's reason, naming the agent and what to set or build.
    """


class UnsafePathError(DispatchError):
    """An agent left a symbolic link, a folder or a special file where the server reads or writes.

    The server never follows such a link: it could point anywhere on the host.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}. Remove it (the agent made it inside its workspace), then try again.")
        self.path = path
        self.problem = problem


def describe_state_failure(e: OSError | sqlite3.Error) -> str:
    """What a front end says when the file system fails under the server (a full disk, a folder
    made read-only, the index's database full): what happened, and what to do."""
    what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
    return (
        f"the server could not read or write its own files: {what}{where}. Free disk space, or fix the "
        "permissions of the agentic-dispatch root, then try again; nothing was lost."
    )
