"""Property-based fuzzing of every MCP tool, through a real MCP client session (in-memory transport)
to a real service: real git, a real Docker engine and the agent image.

The tools come from tools/list, so a new tool is fuzzed without touching this file. Each call gets
arguments drawn from the tool's input schema mixed with hostile values (any unicode, control
characters, NUL, 100k+ strings, huge/negative/float numbers, path tricks: '..', absolute paths,
links into and out of the state root, '--upload-pack=...', 'ext::sh -c ...', file:// into the state
root, wrong types, unknown arguments, missing required ones). After every call:

- the reply is a result or a tool error whose text says what was wrong (no traceback, no bare
  "Error executing tool X" – the SDK's text for an exception the server did not expect – and no
  error logged by the server or the SDK);
- the server still answers (agentic_status), every folder under workspaces/ has a readable
  status.json, state/staging is empty, no mirror is half-made;
- nothing changed outside the state root (the test's own folders, the user's repository but for
  the agent/* branches sync delivers), and no injected command ran;
- a dispatch never accepts a repository inside the state root (a workspace clone, a mirror).

One server serves the whole module. It is seeded with workspaces that ended completed, blocked and
failed, two in which the agent left hostile files (ANSWER.md a folder, BLOCKED.md and its branch's ref
file links out of the workspace) and one queued. Then the queue is frozen (agentic_dispatch_shutdown),
so accepted dispatches queue and never start; they are cancelled and removed after each call, and the
seeded workspaces are put back as they were. A wait (``timeout_seconds`` of type number) is kept short.

Before the random calls, every tool gets a fixed list of calls (``explicit_cases``): each named trick
in each string argument, an unknown argument, each required one left out.

Profiles (hypothesis settings profiles, chosen with AGENTIC_FUZZ_PROFILE):

- ``ci`` (default): derandomized (fixed seed), 25 random calls per tool (agentic_doctor: 8, as each
  of its calls runs a container) after the fixed ones; the file runs in about 2.5 min on 2 cores.
- ``nightly``: random seed, 2,000 random calls per tool: about 2–3 min per tool (12–22 calls a second;
  ``-s`` prints each tool's figures), agentic_doctor far longer (about 0.4 calls a second)::

      AGENTIC_FUZZ_PROFILE=nightly .venv/bin/pytest -p no:cacheprovider tests/test_fuzz_tools.py
      AGENTIC_FUZZ_PROFILE=nightly .venv/bin/pytest -p no:cacheprovider tests/test_fuzz_tools.py -k agentic_status

  ``AGENTIC_FUZZ_EXAMPLES=N`` overrides the number of examples of either profile. A failure prints
  the arguments (shrunk) and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio
import docker
import pytest
from hypothesis import HealthCheck, given, settings

from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.service import Dispatcher

from .fuzz_harness import FuzzHarness, open_harness
from .fuzz_strategies import explicit_cases, tool_arguments

pytestmark = pytest.mark.docker

_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": list(HealthCheck),
}
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("nightly", max_examples=2000, **_COMMON)  # type: ignore[arg-type]
PROFILE = os.environ.get("AGENTIC_FUZZ_PROFILE", "ci")
CI_EXAMPLES = {"agentic_doctor": 8}  # each call runs a container in the image (about 3 s)
EXAMPLES = int(os.environ.get("AGENTIC_FUZZ_EXAMPLES", "0")) or None


def _registered_tools() -> list[str]:
    """The tools the server registers (no session: its lifespan would need a service); the fuzz
    session checks its own tools/list holds the same."""

    def no_service() -> Dispatcher:
        raise AssertionError("only tools/list is asked")

    return [t.name for t in anyio.run(build_server(no_service).list_tools)]


TOOLS = _registered_tools()


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, agent_image: str, docker_client: docker.DockerClient
) -> Iterator[FuzzHarness]:
    """One server for the whole module (seeding costs seconds): every tool is fuzzed against the
    same seeded workspaces, which are put back after each call."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp, open_harness(tmp, agent_image, docker_client, mp) as h:
        yield h


def test_the_fuzz_covers_every_tool_the_session_lists(harness: FuzzHarness) -> None:
    assert set(harness.schemas) == set(TOOLS) and len(TOOLS) >= 9, sorted(harness.schemas)


@pytest.mark.parametrize("tool", TOOLS)
def test_fuzz_tool(tool: str, harness: FuzzHarness) -> None:
    schema = harness.schemas[tool]
    harness.begin()
    for args in explicit_cases(schema, harness.pools):
        harness.check_call(tool, args)
    profile = settings.get_profile(PROFILE)
    examples = EXAMPLES or (CI_EXAMPLES.get(tool, profile.max_examples) if PROFILE == "ci" else profile.max_examples)

    @settings(profile, max_examples=examples)
    @given(args=tool_arguments(schema, harness.pools))
    def one_call(args: dict[str, Any]) -> None:
        harness.check_call(tool, args)

    one_call()
    harness.report(tool)
