"""Git plumbing the domain shares: the environment for network git, the overrides for host-side
git in a folder an agent has written to, git's error text, and file locks."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import exclusive_lock, shared_lock

if TYPE_CHECKING:
    import git  # GitPython is imported where it is used: a host waiting for the server must not wait for it

__all__ = [
    "FETCH_TIMEOUT_SECONDS",
    "GIT_ENV",
    "HOST_GIT_OVERRIDES",
    "dubious_ownership",
    "file_lock",
    "git_error_text",
    "host_git",
    "safe_directory",
    "stderr_lines",
]


# Network operations must never wait on a password prompt nobody can answer.
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
    "GIT_ASKPASS": "true",
}


FETCH_TIMEOUT_SECONDS = 900


def stderr_lines(e: git.GitCommandError) -> list[str]:
    stderr = (e.stderr or "").strip().replace("stderr: ", "").strip("' \n")
    return [ln.strip() for ln in stderr.splitlines() if ln.strip()]


_DUBIOUS = re.compile(r"detected dubious ownership in repository at '(?P<path>[^'\n]+)'")


def dubious_ownership(stderr: str) -> str | None:
    """git's refusal of a repository another user owns, said with what to do; ``None`` when
    ``stderr`` says something else. (git's own last lines, "make sure ... the repository exists",
    would send the user looking for the wrong problem.)"""
    m = _DUBIOUS.search(stderr)
    if m is None:
        return None
    path = m["path"]
    return (
        f"git refuses the repository at {path}: detected dubious ownership (it belongs to another user than "
        f"the one agentic-dispatch runs as). If you trust it, run `git config --global --add safe.directory "
        f"{shlex.quote(path)}` as the user agentic-dispatch runs as, or give the repository to that user "
        "(chown -R), then try again"
    )


def git_error_text(e: git.GitCommandError) -> str:
    lines = stderr_lines(e)
    return dubious_ownership("\n".join(lines)) or (lines[-1] if lines else str(e))


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing): exclusive, or ``shared`` with other shared holders.

    The lock is :mod:`.fileio`'s; this name stays for the git-side callers (mirrors, workspaces, delivery).

    Raises:
        OSError: the lock file cannot be created.
    """
    if shared:
        with shared_lock(path):
            yield
    else:
        with exclusive_lock(path):
            yield


HOST_GIT_OVERRIDES = (
    "core.fsmonitor=false",
    "core.hooksPath=/dev/null",
    "log.showSignature=false",
    "gpg.program=false",
    "core.pager=cat",
)


def safe_directory(path: str | os.PathLike[str]) -> str:
    """The ``-c`` value that lets git work in ``path`` though another uid owns it (a root server's
    workspace belongs to the agent's uid). Given on the command line, it is protected configuration
    and concerns this one command; git compares it with the physical path."""
    return f"safe.directory={os.path.realpath(path)}"


def host_git(repo: git.Repo) -> git.Git:
    """``repo.git`` for a command the server runs on the host in a repository an agent has written to.

    The agent controls ``.git/config``; these overrides keep settings that run programs
    (an fsmonitor hook, a signature checker) from running them on the host. Under a root server
    the clone belongs to the agent's uid, which git refuses ("dubious ownership") unless told the
    folder is safe; with the overrides above, reading it is as safe as reading the user's own.
    """
    return repo.git(c=[*HOST_GIT_OVERRIDES, safe_directory(repo.working_dir)])
