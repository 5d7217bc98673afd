"""The three real agent CLIs (Codex, Claude Code, Gemini), run headless by the real server in
real containers of the agent image, doing real edits and commits. The only stand-in is the
LLM provider: ``tests/model_server.py`` on the host, scripted turn by turn. Every test also
checks that the API key handed to the server never lands in a file under the root or in a
tool's output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from agentic_dispatch.models import parse_time

from .conftest import call, git, poll_until_final, with_stdio_client
from .model_server import Fail, ModelServer, Say, Shell

pytestmark = pytest.mark.docker


# How each CLI is pointed at the stand-in. base_url uses 127.0.0.1 as a user on the host would;
# the server must translate it to the host as a container reaches it.
CLIS: dict[str, dict[str, str]] = {
    "codex": {"model": "gpt-5.5", "suffix": "/v1", "key": "OPENAI_API_KEY", "header": "authorization"},
    "claude": {"model": "claude-sonnet-4-5", "suffix": "", "key": "ANTHROPIC_API_KEY", "header": "x-api-key"},
    "gemini": {"model": "gemini-2.5-pro", "suffix": "", "key": "GEMINI_API_KEY", "header": "x-goog-api-key"},
}
ALL = pytest.mark.parametrize("agent", sorted(CLIS))


class Setup:
    """One test's server environment: config file, secret, a user home with no login files."""

    def __init__(self, home: Path, tmp: Path, agent: str, port: int) -> None:
        self.agent = agent
        self.home = home
        self.secret = f"sk-test-{uuid.uuid4().hex}"
        cli = CLIS[agent]
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[agents.{agent}]\nbase_url = "http://127.0.0.1:{port}{cli["suffix"]}"\n'
            f'model = "{cli["model"]}"\nmax_retries = 0\n',
            encoding="utf-8",
        )
        user_home = tmp / "user-home"
        user_home.mkdir(exist_ok=True)
        self.env = {cli["key"]: self.secret, "HOME": str(user_home), "CLAUDECODE": "1"}
        self.outputs: list[str] = []  # every tool result, for the secret check

    async def call(self, client: Client, tool: str, **args: Any) -> dict[str, Any]:
        result = await call(client, tool, **args)
        self.outputs.append(json.dumps(result))
        return result

    async def final(self, client: Client, workspace: str, timeout: float = 120) -> dict[str, Any]:
        row = await poll_until_final(client, workspace, timeout)
        self.outputs.append(json.dumps(row))
        return row

    def assert_secret_kept(self) -> None:
        for out in self.outputs:
            assert self.secret not in out, "the API key appeared in a tool's output"
        needle = self.secret.encode()
        for path in self.home.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert needle not in path.read_bytes(), f"the API key was written to {path}"


def _dump(req: Any) -> str:
    return json.dumps(req.body)


@ALL
def test_agent_edits_commits_and_reports_its_summary(
    agent: str, docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    with ModelServer() as model:
        model.script(
            [
                Shell(
                    "echo made-by-the-agent > edited.txt && git add edited.txt && git commit -q -m 'Add edited.txt'",
                    usage=(30, 4),
                ),
                Say("Added edited.txt and committed it.", usage=(40, 6)),
            ]
        )
        setup = Setup(isolated_home, tmp_path, agent, model.port)

        async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
            started = await setup.call(
                client, "agentic_dispatch", repo=str(user_repo), task="Add edited.txt", agent=agent
            )
            return started, await setup.final(client, started["workspace"])

        started, final = with_stdio_client(run, setup.env)
        assert final["status"] == "completed", final
        assert final["exit_code"] == 0
        repo = Path(started["repo_path"])
        assert git(repo, "log", "-1", "--format=%s", started["branch"]) == "Add edited.txt"
        assert git(repo, "show", f"{started['branch']}:edited.txt") == "made-by-the-agent"
        summary = final["summary"]
        assert summary["final_message"] == "Added edited.txt and committed it."
        assert (summary["input_tokens"], summary["output_tokens"]) == (70, 10), summary
        assert summary["turns"] == 2
        assert summary["session_id"]
        assert summary["error"] is None
        # The CLI used the key passed by name, the model from the config, and nothing else was asked.
        calls = model.model_requests
        assert len(calls) == 2
        assert all(setup.secret in r.headers.get(CLIS[agent]["header"], "") for r in calls)
        assert CLIS[agent]["model"] in calls[0].path + _dump(calls[0])
        assert model.errors == []
        setup.assert_secret_kept()


@ALL
def test_blocked_then_resume_continues_the_same_cli_session(
    agent: str, docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    question = "Which licence should the project use?"
    with ModelServer() as model:
        model.script([Shell(f"printf '{question}' > BLOCKED.md"), Say("I am blocked on the licence.")])
        setup = Setup(isolated_home, tmp_path, agent, model.port)

        async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]:
            started = await setup.call(
                client, "agentic_dispatch", repo=str(user_repo), task="Add a licence", agent=agent
            )
            blocked = await setup.final(client, started["workspace"])
            first_run_calls = len(model.model_requests)
            model.script(
                [
                    Shell("cp ANSWER.md LICENCE.txt && git add LICENCE.txt && git commit -q -m 'Add the licence'"),
                    Say("Added the licence."),
                ]
            )
            await setup.call(client, "agentic_resume", workspace=started["workspace"], answer="MIT, please")
            return started, blocked, await setup.final(client, started["workspace"]), first_run_calls

        started, blocked, final, first_run_calls = with_stdio_client(run, setup.env)
        assert blocked["status"] == "blocked", blocked
        assert blocked["question"] == question
        assert final["status"] == "completed", final
        assert final["runs"] == 2
        assert final["summary"]["session_id"] == blocked["summary"]["session_id"], "resume started a new session"
        assert final["summary"]["final_message"] == "Added the licence."
        assert final["summary"]["input_tokens"] == 22, "usage must be this run's, not the session's"
        repo = Path(started["repo_path"])
        assert git(repo, "show", f"{started['branch']}:LICENCE.txt") == "MIT, please"
        # The model received the earlier turns (the shell call that wrote the question) and the answer.
        resumed = _dump(model.model_requests[first_run_calls])
        assert f"printf '{question}'" in resumed, resumed[:2000]  # the first run's tool call
        assert "I am blocked on the licence." in resumed  # and its final message
        assert "MIT, please" in resumed
        assert model.errors == []
        setup.assert_secret_kept()


def test_resume_without_the_cli_session_starts_afresh_with_task_question_and_answer(
    docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    agent = "claude"
    with ModelServer() as model:
        model.script([Shell("printf 'Which port?' > BLOCKED.md"), Say("Blocked.")])
        setup = Setup(isolated_home, tmp_path, agent, model.port)

        async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any], int]:
            started = await setup.call(client, "agentic_dispatch", repo=str(user_repo), task="Open a port", agent=agent)
            blocked = await setup.final(client, started["workspace"])
            # The session store is gone (a cleaned home, another machine): resume must still work.
            home = Path(started["path"]) / ".meta" / "home" / ".claude" / "projects"
            for session_file in home.rglob("*.jsonl"):
                session_file.unlink()
            calls = len(model.model_requests)
            model.script([Say("Using 8080.")])
            await setup.call(client, "agentic_resume", workspace=started["workspace"], answer="Port 8080")
            return blocked, await setup.final(client, started["workspace"]), calls

        blocked, final, calls = with_stdio_client(run, setup.env)
        assert final["status"] == "completed", final
        assert final["summary"]["session_id"] != blocked["summary"]["session_id"]
        fresh = _dump(model.model_requests[calls])
        assert "Open a port" in fresh and "Which port?" in fresh and "Port 8080" in fresh
        assert "Blocked." not in fresh, "a fresh session must not carry the old turns"


def test_a_key_the_agent_prints_is_masked_in_the_question_and_the_log_tail(
    docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    # The agent has its key (it must, to call the provider) and may print it. The raw log then
    # holds it, as the container saw it; no tool output may repeat it.
    agent = "claude"
    with ModelServer() as model:
        model.script([Shell("printenv ANTHROPIC_API_KEY; printenv ANTHROPIC_API_KEY > BLOCKED.md"), Say("Printed.")])
        setup = Setup(isolated_home, tmp_path, agent, model.port)

        async def run(client: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            started = await setup.call(client, "agentic_dispatch", repo=str(user_repo), task="Print it", agent=agent)
            final = await setup.final(client, started["workspace"])
            await setup.call(client, "agentic_status", workspace=started["workspace"], log_lines=200)
            watched = await setup.call(client, "agentic_watch", workspace=started["workspace"], timeout_seconds=1)
            return started, final, watched

        started, final, watched = with_stdio_client(run, setup.env)
    assert final["status"] == "blocked" and final["question"] == "***", final
    assert "***" in str(watched["log_tail"]), "the log tail should show where the key was"
    for out in setup.outputs:
        assert setup.secret not in out, "the API key appeared in a tool's output"
    assert setup.secret in Path(started["log_path"]).read_text(encoding="utf-8"), "the agent did print it"


@ALL
def test_a_run_cut_off_mid_command_leaves_no_key_in_the_cli_s_files(
    agent: str, docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    # Codex snapshots its shell's environment (the key included) into its home unless told not to;
    # a clean exit may tidy up, a cancelled run cannot. So: cancel while the agent's command runs.
    with ModelServer() as model:
        model.script([Shell("touch started && sleep 60"), Say("Done.")])
        setup = Setup(isolated_home, tmp_path, agent, model.port)

        async def run(client: Client) -> dict[str, Any]:
            started = await setup.call(client, "agentic_dispatch", repo=str(user_repo), task="Wait", agent=agent)
            marker = Path(started["repo_path"]) / "started"
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert time.monotonic() < deadline, "the agent never ran its command"
                await anyio.sleep(0.2)
            await setup.call(client, "agentic_cancel", workspace=started["workspace"])
            return await setup.final(client, started["workspace"])

        final = with_stdio_client(run, setup.env)
    assert final["status"] == "cancelled", final
    setup.assert_secret_kept()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@ALL
@pytest.mark.parametrize("failure", ["http-500", "nothing-listening"])
def test_provider_failure_ends_failed_with_the_provider_error(
    agent: str, failure: str, docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    with ModelServer() as model:
        model.script([], then=Fail(500, "scripted overload"))
        port = model.port if failure == "http-500" else _free_port()
        setup = Setup(isolated_home, tmp_path, agent, port)

        async def run(client: Client) -> dict[str, Any]:
            started = await setup.call(client, "agentic_dispatch", repo=str(user_repo), task="Anything", agent=agent)
            return await setup.final(client, started["workspace"], timeout=90)

        final = with_stdio_client(run, setup.env)
    assert final["status"] == "failed", final
    assert final["exit_code"] not in (0, None)
    reason = final["reason"]
    assert final["question"] is None
    assert final["summary"]["error"] and final["summary"]["error"] in reason
    if failure == "http-500":
        expected = {"codex": "HTTP 5xx", "claude": "scripted overload", "gemini": "scripted overload"}[agent]
    else:
        expected = {"codex": "Connection failed", "claude": "Connection", "gemini": "fetch failed"}[agent]
    assert expected in reason, reason
    setup.assert_secret_kept()


def test_doctor_names_the_agent_and_what_to_set_when_a_credential_is_missing(
    docker_env: str, isolated_home: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY")}
    env["HOME"] = str(tmp_path)  # no login files
    env["OPENAI_API_KEY"] = "sk-doctor-test-value"
    res = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", "doctor", "claude", "codex"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res
    assert "claude: NOT READY" in res.stdout
    assert "Set ANTHROPIC_API_KEY" in res.stdout
    assert "codex: ok" in res.stdout
    assert "OPENAI_API_KEY (environment)" in res.stdout
    assert "sk-doctor-test-value" not in res.stdout + res.stderr
    assert "2.1.329 (Claude Code)" in res.stdout  # the CLI version, read from the image


def test_dispatch_refuses_an_agent_without_credentials_with_the_doctors_reason(
    docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    async def run(client: Client) -> Any:
        return await client.call_tool("agentic_dispatch", {"repo": str(user_repo), "task": "x", "agent": "gemini"})

    result = with_stdio_client(run, {"HOME": str(tmp_path)})
    assert result.is_error
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "gemini: no credentials found" in text and "GEMINI_API_KEY" in text, text
    assert not any((isolated_home / "workspaces").rglob("status.json")), "a refused dispatch left a workspace"


def test_doctor_tool_names_found_credentials_without_their_values(
    docker_env: str, isolated_home: Path, tmp_path: Path
) -> None:
    secret = f"sk-test-{uuid.uuid4().hex}"

    async def run(client: Client) -> Any:
        return await client.call_tool("agentic_doctor", {"agents": ["claude", "gemini"]})

    result = with_stdio_client(run, {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": secret})
    assert not result.is_error, result.content
    report = result.structured_content
    assert isinstance(report, dict)
    checks = {c["agent"]: c for c in report["agents"]}
    assert checks["claude"]["ok"] and checks["claude"]["credentials"] == ["ANTHROPIC_API_KEY (environment)"]
    assert checks["claude"]["cli_version"] == "2.1.329 (Claude Code)"
    assert not checks["gemini"]["ok"] and "GEMINI_API_KEY" in checks["gemini"]["problems"][0]
    assert report["ok"] is False
    assert secret not in json.dumps(report) + " ".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("agent", ["claude", "codex"])
def test_a_provider_429_with_retry_after_is_retried_by_policy_and_the_real_cli_continues_its_session(
    agent: str, docker_env: str, user_repo: Path, isolated_home: Path, tmp_path: Path
) -> None:
    with ModelServer() as model:
        model.script([Fail(429, "slow down", retry_after="1"), Say("Done on the second attempt.")])
        setup = Setup(isolated_home, tmp_path, agent, model.port)
        with (isolated_home / "config.toml").open("a", encoding="utf-8") as f:
            f.write("\n[retry]\nbackoff_seconds = 1\n")

        async def run(client: Client) -> dict[str, Any]:
            started = await setup.call(
                client,
                "agentic_dispatch",
                repo=str(user_repo),
                task="Say done",
                agent=agent,
                retry={"max": 1, "on": ["provider"]},
            )
            return await setup.final(client, started["workspace"], timeout=120)

        final = with_stdio_client(run, setup.env)
        turns = [r for r in model.model_requests if r.body.get("tools")]
    assert final["status"] == "completed", final
    assert final["runs"] == 2 and final["summary"]["final_message"] == "Done on the second attempt."
    retry = final["retry"]
    assert retry["attempt"] == 2 and retry["last_class"] == "provider"
    assert "429" in retry["history"][0] and retry["history"][0].startswith("attempt 1: provider: ")
    # The retry waited at least the backoff (and the provider's Retry-After of 1 s), by the recorded times.
    waited = parse_time(retry["next_at"]) - parse_time(retry["failed_at"])  # type: ignore[operator]
    assert waited >= 1
    # The second attempt continued the first's session: the CLI sent the task again with the retry message.
    last = json.dumps(turns[-1].body)
    assert "Say done" in last and "started attempt 2 of 2 on its own" in last and "provider failure" in last
    assert "Continuing an earlier run" not in last  # not a fresh session told the story again: the same one
    setup.assert_secret_kept()
