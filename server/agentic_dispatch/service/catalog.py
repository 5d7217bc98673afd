"""The agents this server knows, as the configuration and the machine give them now:
their credentials, the pools that must run one at a time, and the agent image."""

from __future__ import annotations

import os
from pathlib import Path

from ..agents import Agent, AgentSpec, parse_agent_spec
from ..config import Limits, Settings
from ..credentials import Credentials, resolve_credentials
from ..runtime.images import configured_image

__all__ = ["AgentCatalog"]


class AgentCatalog:
    """Agent adapters plus what the settings and the environment say about each."""

    def __init__(self, settings: Settings, agents: dict[str, Agent]) -> None:
        self.settings = settings
        self.agents = agents

    @property
    def image(self) -> str:
        """The agent image: the environment override, the config file's, else the one `image build` makes."""
        return configured_image(self.settings.image)

    def parse(self, spec: str) -> AgentSpec:
        """``base[:model]`` checked against the known agents.

        Raises:
            InvalidInputError: an unknown agent, named with the known ones.
        """
        return parse_agent_spec(spec, self.agents)

    def credentials(self, base: str) -> Credentials:
        """``base``'s credentials as the server's environment and the host home give them now."""
        return resolve_credentials(self.agents[base], self.settings.agents.get(base), os.environ, Path.home())

    def secrets(self, base: str) -> list[str]:
        """The key values ``base`` gets: a CLI may echo them, and nothing we show repeats them."""
        return list(self.credentials(base).env.values())

    def effective_limits(self) -> Limits:
        """The configured limits, with a pool of 1 for agents whose login file is mounted read-write
        (two CLIs refreshing one token file at once would corrupt it)."""
        limits = self.settings.limits
        serial = [b for b in self.agents if self.credentials(b).mounts]
        if not serial:
            return limits
        pools = dict(limits.pools)
        for b in serial:
            pools[b] = min(pools.get(b, 1), 1)
        return limits.model_copy(update={"pools": pools})
