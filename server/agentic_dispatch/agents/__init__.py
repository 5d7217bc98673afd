"""Agent adapters: ``shell`` and the three coding-agent CLIs. See :mod:`.base` for the interface."""

from __future__ import annotations

from ..errors import InvalidInputError
from .base import (
    CONTAINER_HOME,
    CONTAINER_LOGS,
    CONTAINER_RUN,
    CONTAINER_WORKDIR,
    RUN_HEADER,
    Agent,
    AgentSpec,
    LaunchPlan,
    LoginFile,
    RunContext,
    agent_base,
)
from .claude import ClaudeAgent
from .codex import CodexAgent
from .gemini import GeminiAgent
from .shell import ShellAgent

__all__ = [
    "AGENTS",
    "CONTAINER_HOME",
    "CONTAINER_LOGS",
    "CONTAINER_RUN",
    "CONTAINER_WORKDIR",
    "RUN_HEADER",
    "Agent",
    "AgentSpec",
    "ClaudeAgent",
    "CodexAgent",
    "GeminiAgent",
    "LaunchPlan",
    "LoginFile",
    "RunContext",
    "ShellAgent",
    "agent_base",
    "parse_agent_spec",
]

AGENTS: dict[str, Agent] = {a.base: a for a in (ShellAgent(), CodexAgent(), ClaudeAgent(), GeminiAgent())}


MAX_MODEL_CHARS = 200


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
    # The model reaches status.json, container labels and the CLI's command line: a plain name only.
    if ":" in value and (
        not model
        or model.startswith("-")
        or len(model) > MAX_MODEL_CHARS
        or not all(c.isprintable() and not c.isspace() for c in model)
    ):
        raise InvalidInputError(
            "agent",
            f"{value[:80]!r}: the model after ':' must be a name of 1 to {MAX_MODEL_CHARS} printable characters, "
            "without spaces, not starting with '-' (e.g. 'claude:opus').",
        )
    return AgentSpec(base, model or None)
