"""Agents: how each agent base turns a prompt into a command line in the container.

An agent spec is ``base[:model]`` (``shell``, ``codex:gpt-5-codex``, ``claude:opus``).
Each base is an :class:`Agent`: it builds a :class:`LaunchPlan` (argv, environment,
files for its home) for a run, and can read a :class:`RunSummary` back out of its log.
The container layout every agent sees:

    /workspace         the workspace's git clone (read-write; the working directory)
    /agentic/home      $HOME: the per-workspace agent home (CLI sessions, settings)
    /agentic/logs      where the run's output is written as it comes
    /agentic/run       read-only: prompt.md and task.sh for this run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import InvalidInputError
from .models import RunSummary

__all__ = [
    "AGENTS",
    "Agent",
    "AgentSpec",
    "LaunchPlan",
    "RunContext",
    "ShellAgent",
    "parse_agent_spec",
]

CONTAINER_WORKDIR = "/workspace"
CONTAINER_HOME = "/agentic/home"
CONTAINER_LOGS = "/agentic/logs"
CONTAINER_RUN = "/agentic/run"


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
    prompt: str
    model: str | None
    run: int
    answer: str | None = None
    question: str | None = None
    session_id: str | None = None


@dataclass
class LaunchPlan:
    """The command line and environment of one run."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    home_files: dict[str, str] = field(default_factory=dict)


class Agent(Protocol):
    base: str
    description: str

    def plan(self, ctx: RunContext) -> LaunchPlan: ...

    def summarize(self, log_path: Path) -> RunSummary | None: ...


class ShellAgent:
    """Runs the task text as a bash script in the container. No model involved: useful for
    scripted jobs across repositories, and to test the machinery without an LLM."""

    base = "shell"
    description = "runs the task text as a bash script (no LLM)"

    def plan(self, ctx: RunContext) -> LaunchPlan:
        env = {"AGENTIC_RUN": str(ctx.run)}
        if ctx.answer is not None:
            env["AGENTIC_ANSWER_FILE"] = f"{CONTAINER_WORKDIR}/ANSWER.md"
        return LaunchPlan(argv=["/bin/bash", f"{CONTAINER_RUN}/task.sh"], env=env)

    def summarize(self, log_path: Path) -> RunSummary | None:
        try:
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except FileNotFoundError:
            return None
        return RunSummary(final_message=lines[-1] if lines else None)


AGENTS: dict[str, Agent] = {"shell": ShellAgent()}


def parse_agent_spec(spec: str, known: dict[str, Agent] | None = None) -> AgentSpec:
    """Parse ``base[:model]`` and check the base is known.

    Raises:
        InvalidInputError: malformed spec or unknown base (the message lists the known ones).
    """
    known = AGENTS if known is None else known
    value = spec.strip()
    base, _, model = value.partition(":")
    if base not in known:
        names = ", ".join(sorted(known))
        raise InvalidInputError(
            "agent", f"unknown agent {base!r}. Known agents: {names} (optionally with ':model', e.g. 'codex:o3')."
        )
    if ":" in value and (not model or model.startswith("-") or any(c.isspace() for c in model)):
        raise InvalidInputError("agent", f"{value!r}: the model after ':' must be a non-empty name without spaces.")
    return AgentSpec(base, model or None)
