"""The README's host set-up, fed as printed to the real host CLIs.

Codex CLI and Gemini CLI (the versions ``scripts/_bootstrap.sh`` pins, installed in ``.host-clis/``) run
headless on this machine with the README's snippet as their MCP configuration, in a home of their own. The
scripted model (``tests/model_server.py``) has each call ``agentic_dispatch`` through the host; our server,
started by the host from ``scripts/serve``, runs a ``shell`` task in a real local repository, and our own
status then shows the run completed with its commit. The only stand-in is the model.

The guard tests take one key out of a snippet and show the failure that key prevents, so a CLI version
that no longer needs it (or needs something else) is noticed when the pins move."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from .conftest import git, poll_until_final, with_stdio_client
from .model_server import Call, ModelServer, Say

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "/path/to/agentic-dispatch"
SERVER = "agentic-dispatch"
TASK = "echo made-through-{host} > hosted.txt && git add hosted.txt && git commit -q -m 'Add hosted.txt'"
PROMPT = "Hand the task to a shell agent with agentic_dispatch."
MODEL_KEY = f"scripted-{uuid.uuid4().hex}"  # what the host sends the scripted model; no real key is involved


# -- the README's snippets -------------------------------------------------------------------


def host_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### Add it to your host")
    end = text.find("\n## ", start)
    return text[start : end if end != -1 else len(text)]


def readme_snippet(host: str, lang: str) -> str:
    """The first ``lang`` code block under the README's ``#### host`` heading, with this clone's path."""
    section = host_section()
    start = section.index(f"#### {host}\n")
    end = section.find("\n#### ", start + 1)
    part = section[start : end if end != -1 else len(section)]
    match = re.search(rf"```{lang}\n(.*?)```", part, re.DOTALL)
    assert match, f"no {lang} block under '#### {host}' in README.md"
    assert PLACEHOLDER in match.group(1), f"the {host} snippet no longer names {PLACEHOLDER}"
    return match.group(1).replace(PLACEHOLDER, str(ROOT))


def pinned(name: str) -> str:
    """A version pinned in scripts/_bootstrap.sh (HOST_<NAME>_VERSION)."""
    text = (ROOT / "scripts" / "_bootstrap.sh").read_text(encoding="utf-8")
    match = re.search(rf"^HOST_{name}_VERSION=(\S+)$", text, re.MULTILINE)
    assert match, f"HOST_{name}_VERSION is not set in scripts/_bootstrap.sh"
    return match.group(1)


# -- the hosts, run headless ----------------------------------------------------------------


@pytest.fixture(scope="session")
def host_clis() -> Path:
    """The pinned host CLIs, installed by the same function ``scripts/test`` runs (a no-op once there)."""
    res = subprocess.run(
        ["bash", "-c", "source scripts/_bootstrap.sh && ensure_host_clis"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, f"installing the host CLIs failed:\n{res.stderr[-3000:]}"
    return ROOT / ".host-clis" / "bin"


@pytest.fixture
def user_home(tmp_path: Path, docker_env: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of the host's own: no config or login of the real user. The server the host starts keeps
    its state under it (the default root, as for a user), and our own status reads the same root."""
    home = tmp_path / "user"
    config = home / ".config" / "agentic-dispatch"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(f'image = "{docker_env}"\n', encoding="utf-8")
    monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home / ".local" / "share" / "agentic-dispatch"))
    return home


def host_env(home: Path, host_clis: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would hand the host: its PATH (git, docker, bash), a HOME, and the model's key."""
    env = {"PATH": f"{host_clis}{os.pathsep}{os.environ['PATH']}", "HOME": str(home), "LANG": "C.UTF-8"}
    for name in ("DOCKER_HOST", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {**env, **extra}


def run_host(argv: list[str], env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    """Run a host CLI to its end (bounded); its JSON events, one per stdout line."""
    res = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"{argv[0]} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    events = []
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def run_codex(config: str, model: ModelServer, home: Path, host_clis: Path, cwd: Path) -> list[dict[str, Any]]:
    """``codex exec`` with ``config`` as ``~/.codex/config.toml``; the model provider comes on the command line."""
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(config, encoding="utf-8")
    provider = (
        f'{{name="scripted",base_url="{model.url}/v1",wire_api="responses",env_key="OPENAI_API_KEY",'
        "request_max_retries=0,stream_max_retries=0}"
    )
    argv = ["codex", "exec", "--json", "--skip-git-repo-check", "--disable", "plugins"]
    argv += ["--disable", "unbounded_connection_retries", "-c", "analytics.enabled=false", "-m", "gpt-5.5"]
    argv += ["-c", "model_provider=scripted", "-c", f"model_providers.scripted={provider}", PROMPT]
    return run_host(argv, host_env(home, host_clis, OPENAI_API_KEY=MODEL_KEY), cwd)


def run_gemini(snippet: dict[str, Any], model: ModelServer, home: Path, host_clis: Path, cwd: Path) -> list[Any]:
    """``gemini -p`` with ``snippet`` merged into ``~/.gemini/settings.json`` (the key and the model's
    address are ours: Gemini CLI needs the auth type named to take a base URL)."""
    settings = {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "general": {"maxAttempts": 1, "enableAutoUpdate": False, "enableAutoUpdateNotification": False},
        "privacy": {"usageStatisticsEnabled": False},
        **snippet,
    }
    (home / ".gemini").mkdir(parents=True, exist_ok=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    argv = ["gemini", "-p", PROMPT, "--skip-trust", "-o", "stream-json", "-m", "gemini-2.5-pro"]
    env = host_env(home, host_clis, GEMINI_API_KEY=MODEL_KEY, GOOGLE_GEMINI_BASE_URL=model.url)
    return run_host(argv, env, cwd)


def dispatch_turns(repo: Path, host: str) -> list[Call | Say]:
    task = TASK.format(host=host)
    return [Call("agentic_dispatch", {"repo": str(repo), "task": task, "agent": "shell"}), Say("Dispatched.")]


def assert_run_completed(dispatched: dict[str, Any], host: str) -> None:
    """Our own status (a server of ours, not the host's) shows the run completed, with its commit."""

    async def final(client: Client) -> dict[str, Any]:
        return await poll_until_final(client, dispatched["workspace"], 120)

    row = with_stdio_client(final)
    assert row["status"] == "completed", row
    assert row["exit_code"] == 0
    repo = Path(dispatched["repo_path"])
    assert git(repo, "show", f"{dispatched['branch']}:hosted.txt") == f"made-through-{host}"


def workspaces(home: Path) -> list[Path]:
    return list((home / ".local" / "share" / "agentic-dispatch" / "workspaces").rglob("status.json"))


# -- Codex CLI -------------------------------------------------------------------------------


@pytest.mark.docker
def test_codex_with_the_readme_config_dispatches_through_our_server_and_the_run_completes(
    host_clis: Path, user_home: Path, user_repo: Path, tmp_path: Path
) -> None:
    with ModelServer() as model:
        model.script(dispatch_turns(user_repo, "codex"))
        events = run_codex(readme_snippet("Codex CLI", "toml"), model, user_home, host_clis, tmp_path)
        assert model.errors == []
        last_request = json.dumps(model.model_requests[-1].body)
    calls = [e["item"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "mcp_tool_call"]
    assert [(c["server"], c["tool"], c["status"]) for c in calls] == [(SERVER, "agentic_dispatch", "completed")], calls
    dispatched = calls[0]["result"]["structured_content"]
    assert dispatched["status"] in ("queued", "running"), dispatched
    assert dispatched["workspace"] in last_request, "the tool's result did not reach the model"
    assert_run_completed(dispatched, "codex")


@pytest.mark.docker
def test_codex_without_the_readme_approval_mode_declines_our_tool_and_still_exits_0(
    host_clis: Path, user_home: Path, user_repo: Path, tmp_path: Path
) -> None:
    config = readme_snippet("Codex CLI", "toml")
    without = "\n".join(line for line in config.splitlines() if not line.startswith("default_tools_approval_mode"))
    assert without != config
    with ModelServer() as model:
        model.script(dispatch_turns(user_repo, "codex"))
        events = run_codex(without, model, user_home, host_clis, tmp_path)  # exit 0 is checked there
    calls = [e["item"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "mcp_tool_call"]
    assert [(c["tool"], c["status"]) for c in calls] == [("agentic_dispatch", "failed")], calls
    assert "requires approval" in calls[0]["error"]["message"]
    assert workspaces(user_home) == [], "a declined call dispatched all the same"


# -- Gemini CLI ------------------------------------------------------------------------------


@pytest.mark.docker
def test_gemini_with_the_readme_settings_dispatches_through_our_server_and_the_run_completes(
    host_clis: Path, user_home: Path, user_repo: Path, tmp_path: Path
) -> None:
    with ModelServer() as model:
        model.script(dispatch_turns(user_repo, "gemini"))
        events = run_gemini(json.loads(readme_snippet("Gemini CLI", "json")), model, user_home, host_clis, tmp_path)
        assert model.errors == []
        last_request = json.dumps(model.model_requests[-1].body)
    uses = [e for e in events if e.get("type") == "tool_use"]
    results = [e for e in events if e.get("type") == "tool_result"]
    assert [u["tool_name"] for u in uses] == [f"mcp_{SERVER}_agentic_dispatch"], uses
    assert [r["status"] for r in results] == ["success"], results
    dispatched = json.loads(results[0]["output"])
    assert dispatched["workspace"] in last_request, "the tool's result did not reach the model"
    assert events[-1]["type"] == "result" and events[-1]["status"] == "success", events[-1]
    assert_run_completed(dispatched, "gemini")


@pytest.mark.docker
def test_gemini_without_the_readme_trust_offers_the_model_none_of_our_tools(
    host_clis: Path, user_home: Path, user_repo: Path, tmp_path: Path
) -> None:
    snippet = json.loads(readme_snippet("Gemini CLI", "json"))
    del snippet["mcpServers"][SERVER]["trust"]
    with ModelServer() as model:
        model.script(dispatch_turns(user_repo, "gemini"))
        events = run_gemini(snippet, model, user_home, host_clis, tmp_path)
        offered = json.dumps(model.model_requests[0].body.get("tools"))
    assert f"mcp_{SERVER}_" not in offered
    assert not [e for e in events if e.get("type") == "tool_use"]
    assert workspaces(user_home) == []


# -- the README itself -----------------------------------------------------------------------


def test_the_readme_names_the_host_versions_its_snippets_are_tested_with() -> None:
    section = host_section()
    assert f"Codex CLI {pinned('CODEX')}" in section
    assert f"Gemini CLI {pinned('GEMINI')}" in section
