"""Watching many agents through MCP, as a host sees it: the official client (in memory, newest protocol, and
a 2025-era session) against the real server, running real containers on a real Docker engine."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import docker
import mcp_types as types
import pytest
from mcp import Client, MCPDeprecationWarning
from mcp.client.subscriptions import ResourcesListChanged, ResourceUpdated
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from agentic_dispatch import mcp_watch
from agentic_dispatch.config import load_settings
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import call, poll_until_final, with_stdio_client

pytestmark = pytest.mark.docker

WAIT_FOR_GO = "while [ ! -e .go ]; do sleep 0.05; done; rm .go"
MAX_REPLY = 64 * 1024
LIST = "agentic://workspaces"
NEW_TOOLS = ("agentic_watch", "agentic_logs", "agentic_diff", "agentic_insights")


def _go(repo_path: str) -> None:
    (Path(repo_path) / ".go").touch()


@pytest.fixture
def server(docker_env: str, docker_client: docker.DockerClient) -> MCPServer[Dispatcher]:
    settings, paths = load_settings()
    return build_server(lambda: Dispatcher(settings, paths, DockerRuntime(docker_client)))


def _run(server: MCPServer[Dispatcher], fn: Callable[[Client], Any], **client_args: Any) -> Any:
    async def main() -> Any:
        async with Client(server, read_timeout_seconds=120, **client_args) as client:
            return await fn(client)

    return anyio.run(main)


async def _resource(client: Client, uri: str) -> str:
    contents = (await client.read_resource(uri)).contents
    assert len(contents) == 1 and isinstance(contents[0], types.TextResourceContents), contents
    return contents[0].text


async def _dispatch(client: Client, repo: Path, task: str) -> dict[str, Any]:
    return await call(client, "agentic_dispatch", repo=str(repo), task=task, agent="shell")


def test_watch_returns_at_the_first_change_of_two_runs_not_at_its_timeout_and_a_chained_cursor_misses_nothing(
    server: MCPServer[Dispatcher], user_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How soon it returns after a change is a figure, not a pass mark: bench/watch_latency.py measures it."""
    monkeypatch.setattr(mcp_watch, "HEARTBEAT_SECONDS", 0.3)  # (5 s when served)

    async def scenario(client: Client) -> dict[str, Any]:
        a = await _dispatch(client, user_repo, WAIT_FOR_GO)
        b = await _dispatch(client, user_repo, f"{WAIT_FOR_GO}; exit 3")
        messages: list[str] = []
        waiting = [anyio.Event()]  # the newest is set when the current watch says it is still waiting

        async def progress(value: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")
            if "no change yet" in (message or ""):
                waiting[-1].set()

        with anyio.fail_after(10):  # nothing changes: back at its 1 s timeout, having said it is still waiting
            res = await client.call_tool("agentic_watch", {"timeout_seconds": 1}, progress_callback=progress)
        assert isinstance(res.structured_content, dict), res.content
        quiet, heartbeats = res.structured_content, list(messages)
        messages.clear()
        waiting.append(anyio.Event())

        async def touch_once_it_waits() -> None:
            await waiting[-1].wait()
            _go(a["repo_path"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(touch_once_it_waits)
            res = await client.call_tool(
                "agentic_watch", {"timeout_seconds": 20, "cursor": quiet["cursor"]}, progress_callback=progress
            )
        assert not res.is_error and isinstance(res.structured_content, dict), res.content
        first = res.structured_content

        _go(b["repo_path"])  # between two watches
        await poll_until_final(client, b["workspace"])
        second = await call(client, "agentic_watch", timeout_seconds=5, cursor=first["cursor"])
        one = await call(client, "agentic_watch", workspace=b["workspace"], timeout_seconds=1)
        return {
            "a": a["workspace"],
            "b": b["workspace"],
            "quiet": quiet,
            "first": first,
            "messages": messages,
            "heartbeats": heartbeats,
            "second": second,
            "one": one,
        }

    got = _run(server, scenario)
    a, b, quiet, first, second = got["a"], got["b"], got["quiet"], got["first"], got["second"]
    assert quiet["timed_out"] and quiet["changes"] == [], quiet
    assert {r["name"]: r["status"] for r in quiet["workspaces"]} == {a: "running", b: "running"}
    assert len(got["heartbeats"]) >= 2 and "no change yet" in got["heartbeats"][0], got["heartbeats"]
    assert [(c["workspace"], c["kind"]) for c in first["changes"]] == [(a, "completed")], first
    assert f"{a}: completed" in got["messages"], got["messages"]
    assert not first["timed_out"] and {r["name"]: r["status"] for r in first["workspaces"]}[a] == "completed"
    assert [(c["workspace"], c["kind"]) for c in second["changes"]] == [(b, "failed")], second
    assert "exit" in (second["changes"][0]["reason"] or "") and b in second["message"]
    one = got["one"]  # the one-workspace form: its row at the top level, as before, and a cursor
    assert one["name"] == b and one["status"] == "failed" and "log_tail" in one and one["cursor"].isdigit(), one


def test_watch_arguments_are_checked_and_the_service_s_advice_comes_back_as_a_tool_error(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    async def scenario(client: Client) -> list[tuple[bool, str]]:
        out = []
        for args in (
            {"cursor": "not-a-cursor", "timeout_seconds": 0},
            {"timeout_seconds": 51},
            {"workspace": "local/user-repo/w-1", "workspaces": ["local/user-repo/w-2"]},
            {"workspaces": ["local/user-repo/no-such"], "timeout_seconds": 0},
        ):
            res = await client.call_tool("agentic_watch", args)
            out.append((bool(res.is_error), " ".join(getattr(c, "text", "") for c in res.content)))
        for tool, args in (("agentic_logs", {"workspace": "local/user-repo/w-1", "tail": 0}),):
            res = await client.call_tool(tool, args)
            out.append((bool(res.is_error), " ".join(getattr(c, "text", "") for c in res.content)))
        return out

    (cursor, timeout, both, unknown, tail) = _run(server, scenario)
    assert cursor[0] and "not a cursor" in cursor[1], cursor
    assert timeout[0] and "timeout_seconds" in timeout[1], timeout
    assert both[0] and "not both" in both[1], both
    assert unknown[0] and "no workspace named" in unknown[1] and "agentic_status" in unknown[1], unknown
    assert tail[0] and "tail" in tail[1], tail


def test_a_subscribed_client_hears_when_a_run_ends_and_reading_the_status_then_gives_the_new_state(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    async def scenario(client: Client) -> dict[str, Any]:
        run = await _dispatch(client, user_repo, WAIT_FOR_GO)
        uri = f"agentic://workspaces/{run['workspace']}/status"
        before = json.loads(await _resource(client, uri))
        events: list[object] = []
        after: dict[str, Any] = {}
        async with client.listen(resource_subscriptions=[uri], resources_list_changed=True) as sub:
            _go(run["repo_path"])
            with anyio.fail_after(30):
                async for event in sub:  # level triggers: read again on each, until the run has ended
                    events.append(event)
                    if event == ResourceUpdated(uri=uri):
                        after = json.loads(await _resource(client, uri))
                        if after["status"] != "running":
                            break
            other = await _dispatch(client, user_repo, "true")
            with anyio.fail_after(30):
                async for event in sub:
                    events.append(event)
                    if isinstance(event, ResourcesListChanged):
                        break
        listing = json.loads(await _resource(client, "agentic://workspaces"))
        try:
            await client.read_resource("agentic://workspaces/local/user-repo/no-such/status")
            missing = None
        except MCPError as e:
            missing = e
        return {
            "run": run,
            "before": before,
            "after": after,
            "events": events,
            "other": other,
            "listing": listing,
            "missing": missing,
        }

    got = _run(server, scenario)
    assert got["before"]["status"] == "running" and got["before"]["name"] == got["run"]["workspace"]
    assert got["after"]["status"] == "completed", got
    assert ResourcesListChanged() in got["events"], got["events"]
    names = [w["name"] for w in got["listing"]["workspaces"]]
    assert names[0] == got["other"]["workspace"] and got["run"]["workspace"] in names and got["listing"]["total"] == 2
    assert {"name", "status", "agent", "updated_at"} <= set(got["listing"]["workspaces"][0])
    missing = got["missing"]
    assert isinstance(missing, MCPError) and missing.error.code == types.INVALID_PARAMS, missing
    assert "no workspace named" in missing.error.message and "agentic://workspaces" in missing.error.message


def test_a_2025_session_subscribed_with_resources_subscribe_gets_resources_updated(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    updated: list[str] = []
    heard = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(message.params.uri)
            heard.set()

    async def until_not_running(client: Client, uri: str) -> dict[str, Any]:
        """Level triggers: an update may be for an earlier transition; read again on each one."""
        seen = 0
        with anyio.fail_after(30):
            while True:
                await heard.wait()
                while len(updated) == seen:
                    await anyio.sleep(0.02)
                seen = len(updated)
                row: dict[str, Any] = json.loads(await _resource(client, uri))
                if row["status"] != "running":
                    return row

    async def scenario(client: Client) -> tuple[str, dict[str, Any], dict[str, Any]]:
        run = await _dispatch(client, user_repo, WAIT_FOR_GO)
        uri = f"agentic://workspaces/{run['workspace']}/status"
        with warnings.catch_warnings():  # deprecated as of 2026-07-28: this is the 2025 path, on purpose
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            await client.subscribe_resource(uri)
        _go(run["repo_path"])
        return uri, await until_not_running(client, uri), client.server_capabilities.model_dump()

    uri, row, caps = _run(server, scenario, mode="legacy", message_handler=on_message)
    assert caps["resources"]["subscribe"] is True
    assert updated and updated[0] == uri and row["status"] == "completed", (updated, row)


def test_logs_diff_and_the_resources_stay_under_64_kib_for_a_50_mb_log_and_a_diff_of_thousands_of_lines(
    server: MCPServer[Dispatcher], user_repo: Path
) -> None:
    task = (
        "yes 'a line of the agent log that goes on for a while' | head -c 50000000; "
        "seq 1 30000 > numbers.txt && git add numbers.txt && git commit -qm numbers"
    )

    async def scenario(client: Client) -> dict[str, Any]:
        run = await _dispatch(client, user_repo, task)
        final = await poll_until_final(client, run["workspace"], timeout=120)
        out: dict[str, Any] = {"final": final, "run": run}
        for key, tool, args in (
            ("logs", "agentic_logs", {"workspace": run["workspace"]}),
            ("head", "agentic_logs", {"workspace": run["workspace"], "since_bytes": 0}),
            ("diff", "agentic_diff", {"workspace": run["workspace"]}),
            ("stat", "agentic_diff", {"workspace": run["workspace"], "stat_only": True}),
            ("insights", "agentic_insights", {"window_days": 1}),
        ):
            res = await client.call_tool(tool, args)
            assert not res.is_error, res.content
            text = "".join(getattr(c, "text", "") for c in res.content)
            out[key] = (res.structured_content, len(json.dumps(res.structured_content)), len(text))
        base = f"agentic://workspaces/{run['workspace']}"
        for part in ("log", "diff", "prompt"):
            out[part + "_resource"] = await _resource(client, f"{base}/{part}")
        return out

    got = _run(server, scenario)
    assert got["final"]["status"] == "completed", got["final"]
    for key in ("logs", "head", "diff", "stat"):
        _, structured, text = got[key]
        assert structured < MAX_REPLY and text < MAX_REPLY, (key, structured, text)
    logs = got["logs"][0]
    assert logs["truncated"] and logs["size"] > 50_000_000 and "since_bytes=" in logs["note"]
    assert len(logs["text"].splitlines()) == 200
    head = got["head"][0]
    assert head["start"] == 0 and head["truncated"] and "=== run 1" in head["text"]
    diff = got["diff"][0]
    assert "numbers.txt" in diff["stat"] and diff["truncated"] and diff["patch"].startswith("diff --git")
    assert "path=" in diff["note"]
    assert got["stat"][0]["patch"] is None and "numbers.txt" in got["stat"][0]["stat"]
    rows = got["insights"][0]["agents"]
    assert [(r["agent"], r["runs"], r["completed"]) for r in rows] == [("shell", 1, 1)], rows
    for part in ("log_resource", "diff_resource"):
        assert len(got[part].encode()) < MAX_REPLY, part
    assert got["log_resource"].startswith("[bytes ") and "since_bytes=" in got["log_resource"].splitlines()[0]
    assert "numbers.txt" in json.loads(got["diff_resource"])["stat"]
    assert "head -c 50000000" in got["prompt_resource"]


def test_served_over_stdio_a_listener_hears_a_new_workspace_and_its_run_ending(
    docker_env: str, user_repo: Path
) -> None:
    async def scenario(client: Client) -> tuple[list[object], dict[str, Any], str]:
        events: list[object] = []
        async with client.listen(resources_list_changed=True, resource_subscriptions=[LIST]) as sub:
            run = await _dispatch(client, user_repo, "true")
            uri = f"agentic://workspaces/{run['workspace']}/status"
            row: dict[str, Any] = {}
            with anyio.fail_after(30):
                async for event in sub:  # the list changes at each transition of the run
                    events.append(event)
                    row = json.loads(await _resource(client, uri))
                    if row["status"] == "completed" and {ResourcesListChanged(), ResourceUpdated(LIST)} <= set(events):
                        break
        return events, row, client.protocol_version

    events, row, version = with_stdio_client(scenario)  # (30 s for both kinds of event and the end)
    assert version == "2026-07-28" and row["status"] == "completed", (version, row, events)


class _Idle:
    """Stands in for the service when only the lists are asked."""

    class watching:  # the attribute the subscription feed follows
        @staticmethod
        def follow(since: int | None) -> tuple[list[object], int]:
            return [], 0

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_tools_and_resource_templates_are_listed_with_annotations_and_schemas() -> None:
    async def scenario(client: Client) -> tuple[Any, Any, Any]:
        return (
            (await client.list_tools()).tools,
            (await client.list_resources()).resources,
            (await client.list_resource_templates()).resource_templates,
        )

    tools, resources, templates = _run(build_server(_Idle), scenario)  # type: ignore[arg-type]
    by_name = {t.name: t for t in tools}
    for name in NEW_TOOLS:
        tool = by_name[name]
        assert tool.annotations is not None and tool.annotations.read_only_hint is True, name
        assert tool.annotations.idempotent_hint is True and tool.output_schema is not None, name
        assert tool.description and "\n    " not in tool.description, name
    watch = by_name["agentic_watch"]
    assert set(watch.input_schema["properties"]) == {"workspaces", "timeout_seconds", "cursor", "workspace", "ask"}
    assert watch.input_schema["properties"]["timeout_seconds"]["maximum"] == 50
    assert "cursor" in (watch.description or "")
    assert {"changes", "cursor", "workspaces", "timed_out"} <= set(watch.output_schema["properties"])
    assert [r.uri for r in resources] == ["agentic://workspaces"]
    assert {t.uri_template for t in templates} == {
        f"agentic://workspaces/{{org}}/{{repo}}/{{slug}}/{part}" for part in ("status", "log", "prompt", "diff")
    }
