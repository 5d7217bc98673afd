"""The agent interface: how an agent base turns a run into a command line in the container.

An agent spec is ``base[:model]`` (``shell``, ``codex:gpt-5-codex``, ``claude:opus``).
Each base is an :class:`Agent`: it builds a :class:`LaunchPlan` (argv, environment,
files for its home) for a run, reads a :class:`RunSummary` back out of its log, and
knows where its CLI keeps sessions and credentials. The container layout every agent sees:

    /workspace         the workspace's git clone (read-write; the working directory)
    /agentic/home      $HOME: the per-workspace agent home (CLI sessions, settings)
    /agentic/logs      where the run's output is written as it comes
    /agentic/run       read-only: prompt.md and task.sh for this run
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..models import RunSummary

__all__ = [
    "CONTAINER_HOME",
    "CONTAINER_LOGS",
    "CONTAINER_RUN",
    "CONTAINER_WORKDIR",
    "RUN_HEADER",
    "Agent",
    "AgentSpec",
    "LaunchPlan",
    "LoginFile",
    "RunContext",
    "agent_base",
    "as_dict",
    "as_int",
    "json_events",
    "log_runs",
    "provider_refusal",
]

CONTAINER_WORKDIR = "/workspace"
CONTAINER_HOME = "/agentic/home"
CONTAINER_LOGS = "/agentic/logs"
CONTAINER_RUN = "/agentic/run"

# The service writes this line into the agent log before each run; summaries read the last run only.
RUN_HEADER = "=== run "


@dataclass(frozen=True)
class AgentSpec:
    base: str
    model: str | None = None

    def __str__(self) -> str:
        return f"{self.base}:{self.model}" if self.model else self.base


@dataclass(frozen=True)
class RunContext:
    """What an agent needs to know to build its command for one run."""

    task: str
    prompt: str  # the full prompt, or on a native resume the new message (the answer)
    model: str | None
    run: int
    answer: str | None = None
    question: str | None = None
    resume_session: str | None = None  # continue this CLI session instead of starting one
    base_url: str | None = None  # provider base URL as the container reaches it
    max_retries: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # credential variables present for this run


@dataclass
class LaunchPlan:
    """The command line and environment of one run."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    home_files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoginFile:
    """A file a CLI's own login writes on the host, and where it belongs in the agent home."""

    source: str  # relative to the host user's home
    target: str  # relative to the agent home
    mode: Literal["copy", "mount"] = "copy"  # mount: read-write, the agent's runs serialised


class Agent(Protocol):
    base: str
    description: str
    cli: str | None  # the executable in the image (checked by doctor); None: nothing to check
    key_env: tuple[str, ...]  # API key variables the CLI reads, in order of preference
    login_files: tuple[LoginFile, ...]  # the CLI's login files, used when no key variable is set

    def plan(self, ctx: RunContext) -> LaunchPlan: ...

    def summarize(self, log_path: Path) -> RunSummary | None: ...

    def has_session(self, home: Path, session_id: str) -> bool:
        """Whether the agent home still holds the CLI session ``session_id`` (for native resume)."""
        ...


def agent_base(spec: str) -> str:
    """The base of an agent spec already validated: ``claude:opus`` -> ``claude`` (also the pool name)."""
    return spec.partition(":")[0]


def log_runs(log_path: Path) -> list[list[str]]:
    """The agent log split into runs (the lines after each run header)."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    runs: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(RUN_HEADER):
            runs.append([])
        elif runs:
            runs[-1].append(line)
        else:
            runs.append([line])
    return runs


def json_events(lines: list[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects among ``lines`` (stderr noise and partial lines are skipped)."""
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# How the CLIs word a provider's HTTP status in their error text ("last status: 429 Too Many Requests",
# "Request rejected (429)", "HTTP 503"), and a Retry-After they pass on ("retry after 12s", "retry-after: 12").
_STATUS_IN_TEXT = re.compile(r"(?:status:?\s*|\(|HTTP\s+|\bcode:?\s*)([45]\d\d)\b")
_RETRY_AFTER_IN_TEXT = re.compile(r"retry[- ]after:?\s*(\d+(?:\.\d+)?)\s*s?", re.IGNORECASE)


def provider_refusal(text: str | None, status: object = None) -> tuple[int | None, float | None]:
    """``(HTTP status, Retry-After seconds)`` of a provider's refusal as a CLI reported it: ``status``
    when the CLI gave one as a number, else read from its error ``text``; either is ``None`` when not said."""
    code = as_int(status)
    if code is None and text:
        found = _STATUS_IN_TEXT.search(text)
        code = int(found.group(1)) if found else None
    after = _RETRY_AFTER_IN_TEXT.search(text or "")
    return code, float(after.group(1)) if after else None
