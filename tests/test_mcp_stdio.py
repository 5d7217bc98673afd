"""The server as MCP hosts see it: `agentic-dispatch serve` started as a subprocess, spoken to over
stdio by the official Python client, running real containers on a real Docker engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from .conftest import call, git, poll_until_final, snapshot, with_stdio_client

pytestmark = pytest.mark.docker

COMMIT_TASK = (
    "echo 'made by the agent' > agent-file.txt && git add agent-file.txt && "
    "git commit -q -m 'Add agent-file.txt' && echo committed"
)


def test_tools_list_shows_dispatch_status_resume_and_sync_with_schemas_annotations_and_descriptions(
    isolated_home: Path,
) -> None:
    async def run(client: Client) -> Any:
        return (await client.list_tools()).tools

    tools = {t.name: t for t in with_stdio_client(run)}
    for name in ("agentic_dispatch", "agentic_status", "agentic_resume", "agentic_sync"):
        assert name in tools, f"{name} missing from tools/list: {sorted(tools)}"
        tool = tools[name]
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert tool.annotations is not None
        assert tool.description
        assert "\n    " not in tool.description, f"{name}'s description keeps its docstring indentation"
    assert "repo" in tools["agentic_dispatch"].input_schema["required"]
    assert "task" in tools["agentic_dispatch"].input_schema["required"]
    assert tools["agentic_status"].annotations.read_only_hint is True


def test_http_transport_serves_the_same_tools_on_loopback_and_refuses_an_open_address(
    isolated_home: Path, docker_env: str, user_repo: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    refused = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", "serve", "--transport", "http", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert refused.returncode == 2 and "--host" in refused.stderr and "authentication" in refused.stderr
    server = subprocess.Popen(
        [sys.executable, "-m", "agentic_dispatch", "serve", "--transport", "http", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:

        async def run() -> tuple[list[str], dict[str, Any]]:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=60) as client:
                        names = [t.name for t in (await client.list_tools()).tools]
                        started = await call(
                            client, "agentic_dispatch", repo=str(user_repo), task="true", agent="shell"
                        )
                        return names, await poll_until_final(client, started["workspace"])
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.2)  # the server is still starting

        names, final = anyio.run(run)
    finally:
        server.terminate()
        server.wait(10)
    assert {"agentic_dispatch", "agentic_status", "agentic_resume", "agentic_sync"} <= set(names)
    assert final["status"] == "completed"


def test_shell_dispatch_returns_before_the_agent_finishes_then_completes_with_a_commit_on_the_agent_branch(
    docker_env: str, user_repo: Path, isolated_home: Path
) -> None:
    """The agent waits for a file the test writes only once agentic_dispatch has answered: a dispatch
    that held the call open for the run could never answer (the bound is the client's read timeout)."""
    before = snapshot(user_repo)
    task = f"while [ ! -e .go ]; do sleep 0.1; done; rm .go; {COMMIT_TASK}"

    async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
        started = await call(client, "agentic_dispatch", repo=str(user_repo), task=task, agent="shell")
        (Path(started["repo_path"]) / ".go").touch()
        final = await poll_until_final(client, started["workspace"])
        return started, final

    started, final = with_stdio_client(run)
    assert started["status"] in ("running", "queued")
    assert started["branch"].startswith("agent/")
    assert final["status"] == "completed", final
    assert final["exit_code"] == 0
    assert final["runs"] == 1

    repo = Path(started["repo_path"])
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == started["branch"]
    assert git(repo, "log", "-1", "--format=%s", started["branch"]) == "Add agent-file.txt"
    owner = 1000 if os.getuid() == 0 else os.getuid()  # a root server runs agents as the image's `agent` user
    assert (repo / "agent-file.txt").stat().st_uid == owner, (
        "agent files must belong to the host user (or the agent uid)"
    )
    assert "committed" in final["log_tail"]
    assert snapshot(user_repo) == before, "the user's own repo must not change"
    assert not (user_repo / "agent-file.txt").exists()


def test_task_exiting_3_ends_failed_with_exit_code_3_and_a_reason(docker_env: str, user_repo: Path) -> None:
    async def run(client: Client) -> dict[str, Any]:
        started = await call(
            client, "agentic_dispatch", repo=str(user_repo), task="echo 'about to fail' >&2; exit 3", agent="shell"
        )
        return await poll_until_final(client, started["workspace"])

    final = with_stdio_client(run)
    assert final["status"] == "failed"
    assert final["exit_code"] == 3
    assert "exited with code 3" in final["reason"]
    assert "about to fail" in final["reason"]
    assert final["question"] is None  # question is only ever a blocked agent's question


def test_blocked_agent_is_resumed_with_an_answer_it_can_read_and_completes_with_two_runs(
    docker_env: str, user_repo: Path
) -> None:
    task = (
        "if [ -f ANSWER.md ]; then cp ANSWER.md answer-seen.txt && git add answer-seen.txt && "
        'git commit -q -m "Use the answer" && echo finished; '
        "else echo 'Which database should I use?' > BLOCKED.md; fi"
    )

    async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        started = await call(client, "agentic_dispatch", repo=str(user_repo), task=task, agent="shell")
        blocked = await poll_until_final(client, started["workspace"])
        resumed = await call(client, "agentic_resume", workspace=started["workspace"], answer="Use PostgreSQL.")
        final = await poll_until_final(client, started["workspace"])
        return started, blocked, resumed, final

    started, blocked, resumed, final = with_stdio_client(run)
    assert blocked["status"] == "blocked"
    assert blocked["question"] == "Which database should I use?"
    assert resumed["workspace"] == started["workspace"]
    assert resumed["branch"] == started["branch"]
    assert final["status"] == "completed", final
    assert final["runs"] == 2
    repo = Path(started["repo_path"])
    assert (repo / "answer-seen.txt").read_text(encoding="utf-8").strip() == "Use PostgreSQL."
    assert git(repo, "log", "-1", "--format=%s") == "Use the answer"
    prompt2 = (Path(started["path"]) / ".meta" / "prompt-2.md").read_text(encoding="utf-8")
    assert "Which database should I use?" in prompt2 and "Use PostgreSQL." in prompt2
    # Server-managed files never end up in the agent's commits.
    assert "ANSWER.md" not in git(repo, "log", "--name-only", "--format=")


BAD_INPUTS = [
    ({"repo": "../../etc", "task": "x"}, "relative path"),
    ({"repo": "{repo}", "task": "x", "branch": "-delete-everything"}, "must not start with '-'"),
    ({"repo": "{repo}", "task": "x", "agent": "no-such-agent"}, "Known agents: "),
    ({"repo": "/definitely/not/a/repo", "task": "x"}, "not a git repository"),
    ({"repo": "file:///definitely/not/a/repo.git", "task": "x"}, "not a git repository"),
    ({"repo": "{repo}", "task": "   "}, "task: is empty"),
    ({"repo": "{repo}", "task": "x", "plan_template": "feature", "variables": {"area": "api"}}, "acceptance, goal"),
    ({"repo": "{repo}", "task": "x", "branch": "does-not-exist"}, "Existing branches: "),
]


def test_bad_inputs_return_tool_errors_naming_the_problem_and_create_nothing(
    docker_env: str, user_repo: Path, isolated_home: Path
) -> None:
    before = snapshot(user_repo)

    async def run(client: Client) -> list[tuple[bool, str]]:
        out = []
        for args, _ in BAD_INPUTS:
            args = {k: (v.format(repo=user_repo) if isinstance(v, str) else v) for k, v in args.items()}
            args.setdefault("agent", "shell")
            res = await client.call_tool("agentic_dispatch", args)
            text = " ".join(getattr(c, "text", "") for c in res.content)
            out.append((res.is_error, text))
        return out

    results = with_stdio_client(run)
    for (args, expected), (is_error, text) in zip(BAD_INPUTS, results, strict=True):
        assert is_error, f"{args} should be a tool error, got {text}"
        assert expected in text, f"{args}: {text!r} should mention {expected!r}"
    workspaces = isolated_home / "workspaces"
    assert not any(workspaces.rglob("*")), f"bad input left files: {list(workspaces.rglob('*'))}"
    assert not list((isolated_home / "state").rglob("staging/*")), "a staging folder was left behind"
    mirrors = [p.name for p in (isolated_home / "mirrors").iterdir() if p.suffix == ".git"]
    # Only the valid repo (fetched for the branch check) may have a mirror; nothing for the bad ones.
    assert len(mirrors) <= 1 and not any(p.endswith(".partial") for p in mirrors)
    assert snapshot(user_repo) == before


def test_resume_of_a_running_workspace_and_of_an_unknown_one_are_tool_errors_with_advice(
    docker_env: str, user_repo: Path, isolated_home: Path
) -> None:
    async def run(client: Client) -> tuple[str, str, str]:
        started = await call(client, "agentic_dispatch", repo=str(user_repo), task="sleep 30", agent="shell")
        busy = await client.call_tool("agentic_resume", {"workspace": started["workspace"], "answer": "x"})
        unknown = await client.call_tool("agentic_resume", {"workspace": "local/nope/task-1"})
        other = await client.call_tool("agentic_resume", {"workspace": "local/nope/task-2", "agent": "shell"})
        assert busy.is_error and unknown.is_error and other.is_error
        return busy.content[0].text, unknown.content[0].text, other.content[0].text  # type: ignore[union-attr]

    busy, unknown, other = with_stdio_client(run)
    assert "only blocked, failed or completed" in busy
    assert "agentic_status" in unknown and "agentic_status" in other
    assert not (isolated_home / "workspaces" / "local" / "nope").exists(), "an unknown name left a folder"


def test_agentic_sync_brings_the_branch_into_the_local_repository_and_refuses_bad_input_with_advice(
    docker_env: str, user_repo: Path
) -> None:
    async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any], str, str]:
        started = await call(client, "agentic_dispatch", repo=str(user_repo), task=COMMIT_TASK, agent="shell")
        await poll_until_final(client, started["workspace"])
        report = await call(client, "agentic_sync", workspace=started["workspace"])
        unknown = await client.call_tool("agentic_sync", {"workspace": "local/nope/task-9"})
        forced = await client.call_tool("agentic_sync", {"force": True})
        assert unknown.is_error and forced.is_error
        return started, report, unknown.content[0].text, forced.content[0].text  # type: ignore[union-attr]

    started, report, unknown, forced = with_stdio_client(run)
    assert report["delivered"] == [started["workspace"]], report["message"]
    assert git(user_repo, "log", "-1", "--format=%s", started["branch"]) == "Add agent-file.txt"
    assert "agentic_status" in unknown
    assert "force" in forced and "workspace" in forced
