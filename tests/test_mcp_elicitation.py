"""agentic_watch(ask=true): the person answers a blocked agent from the host. The official MCP client's
elicitation callback plays the person, against the real server running real containers: in the newest
protocol (the question comes back in an InputRequiredResult and the client calls again) and in a 2025-era
session (a mid-call elicitation/create request, as Claude Code's hosts do)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import docker
import mcp_types as types
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import StateError
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import call, poll_until_final

pytestmark = pytest.mark.docker

ASK = (
    'if [ -s ANSWER.md ]; then echo "got: $(cat ANSWER.md)"; exit 0; fi; '
    "echo 'Which port should the server listen on?' > BLOCKED.md"
)
Person = Callable[[Any, types.ElicitRequestParams], Awaitable[types.ElicitResult]]


@pytest.fixture
def server(docker_env: str, docker_client: docker.DockerClient) -> MCPServer[Dispatcher]:
    settings, paths = load_settings()
    return build_server(lambda: Dispatcher(settings, paths, DockerRuntime(docker_client)))


def person(reply: types.ElicitResult, asked: list[str]) -> Person:
    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        assert params.requested_schema["properties"]["answer"]["type"] == "string"
        asked.append(params.message)
        return reply

    return elicit


def watch_blocked_run(
    server: MCPServer[Dispatcher], repo: Path, mode: str, one: bool, elicit: Person | None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Dispatch a run that asks, watch it with ask=true; its workspace, the watch result, its row at the end."""

    async def scenario() -> tuple[str, dict[str, Any], dict[str, Any]]:
        async with Client(server, read_timeout_seconds=120, mode=mode, elicitation_callback=elicit) as client:
            before = (await call(client, "agentic_watch", timeout_seconds=0))["cursor"]  # chained from here
            run = await call(client, "agentic_dispatch", repo=str(repo), task=ASK, agent="shell")
            name = run["workspace"]
            target: dict[str, Any] = {"workspace": name} if one else {"workspaces": [name]}
            watched: dict[str, Any] = {"cursor": before}
            with anyio.fail_after(90):
                while not any(c["kind"] == "blocked" for c in watched.get("changes", [])):
                    since = before if one else watched["cursor"]
                    watched = await call(client, "agentic_watch", **target, cursor=since, ask=True, timeout_seconds=30)
            return name, watched, await poll_until_final(client, name, 60)

    return anyio.run(scenario)


@pytest.mark.parametrize(("mode", "one"), [("auto", False), ("legacy", True)], ids=["2026-07-28", "2025-11-25"])
def test_a_blocked_run_is_answered_by_the_person_through_elicitation_and_completes(
    server: MCPServer[Dispatcher], user_repo: Path, mode: str, one: bool
) -> None:
    asked: list[str] = []
    reply = types.ElicitResult(action="accept", content={"answer": "8080, please"})
    name, watched, final = watch_blocked_run(server, user_repo, mode, one, person(reply, asked))

    assert len(asked) == 1 and name in asked[0] and "Which port should the server listen on?" in asked[0], asked
    [report] = watched["asked"]
    assert report["workspace"] == name and report["outcome"] == "answered" and report["answer"] == "8080, please"
    assert report["resumed"] in ("queued", "running") and "asked the person" in watched["message"]
    assert [c["kind"] for c in watched["changes"] if c["workspace"] == name][-1] in ("resumed", "queued", "started")
    assert final["status"] == "completed" and final["runs"] == 2, final
    assert "got: 8080, please" in (final["log_tail"] or ""), final


def test_a_declined_elicitation_leaves_the_run_blocked_for_the_hosts_model(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    asked: list[str] = []
    name, watched, final = watch_blocked_run(
        server, user_repo, "auto", False, person(types.ElicitResult(action="decline"), asked)
    )
    assert len(asked) == 1
    assert [(a["workspace"], a["outcome"], a["answer"]) for a in watched["asked"]] == [(name, "declined", None)]
    assert final["status"] == "blocked" and final["runs"] == 1 and final["question"].startswith("Which port"), final


def test_a_client_without_elicitation_gets_the_watch_as_before_and_the_run_stays_blocked(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    name, watched, final = watch_blocked_run(server, user_repo, "auto", False, None)
    assert all(r["name"] == name for r in watched["workspaces"])
    assert watched["asked"] == [] and "cannot ask the person" in watched["message"]
    blocked = [c for c in watched["changes"] if c["kind"] == "blocked"]
    assert blocked and blocked[0]["question"].startswith("Which port")
    assert final["status"] == "blocked" and final["runs"] == 1


def test_an_answer_given_after_someone_else_resumed_the_run_is_not_used_and_the_report_says_why(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    """While the person reads the form, another caller answers with agentic_resume: the person's answer
    was for a question the run no longer asks, so it resumes nothing. The service holds the condition
    (``resume(blocked_run=N)``), so an answer to run 1's question never starts run 3 either."""
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    asked: list[str] = []

    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        name = asked_about(params)
        asked.append(name)
        await anyio.to_thread.run_sync(lambda: svc.resume(name, "3000"))  # the other caller's answer
        return types.ElicitResult(action="accept", content={"answer": "8080, please"})

    def asked_about(params: types.ElicitRequestParams) -> str:
        return next(word for word in params.message.split() if word.startswith("local/"))

    name, watched, final = watch_blocked_run(build_server(lambda: svc), user_repo, "auto", False, elicit)

    assert asked == [name]
    [report] = watched["asked"]
    assert report["outcome"] == "not resumed" and "no longer waits for this answer" in report["note"], report
    assert final["status"] == "completed" and final["runs"] == 2, final
    assert "got: 3000" in (final["log_tail"] or "") and "8080" not in (final["log_tail"] or ""), final
    with pytest.raises(StateError, match="no longer waits for this answer: it is completed, run 2"):
        svc.resume(name, "late", blocked_run=1)
    assert svc.record(name).runs == 2
