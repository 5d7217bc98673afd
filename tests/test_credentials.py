"""Credentials: keys by name, login files copied or mounted, Codex's auth.json never shared by
concurrent containers, parent-session variables never passed on."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agentic_dispatch.agents import AGENTS, RunContext
from agentic_dispatch.config import AgentSettings, HostFile, load_settings
from agentic_dispatch.credentials import redact, resolve_credentials
from agentic_dispatch.errors import ConfigError, InvalidInputError
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git


def _login(home: Path, rel: str, text: str = '{"token": "t"}') -> Path:
    path = home / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_an_api_key_in_the_environment_is_passed_by_name_and_login_files_are_then_not_needed(tmp_path: Path) -> None:
    _login(tmp_path, ".claude/.credentials.json")
    creds = resolve_credentials(AGENTS["claude"], None, {"ANTHROPIC_API_KEY": "k-123456", "OTHER": "x"}, tmp_path)
    assert creds.ok
    assert creds.env == {"ANTHROPIC_API_KEY": "k-123456"}
    assert creds.copies == [] and creds.mounts == []
    assert creds.found == ["ANTHROPIC_API_KEY (environment)"]


def test_claude_and_gemini_login_files_are_copied_and_codex_auth_is_mounted(tmp_path: Path) -> None:
    claude = _login(tmp_path, ".claude/.credentials.json")
    gemini = _login(tmp_path, ".gemini/oauth_creds.json")
    codex = _login(tmp_path, ".codex/auth.json")
    c = resolve_credentials(AGENTS["claude"], None, {}, tmp_path)
    assert (
        c.ok
        and c.copies == [(claude, ".claude/.credentials.json")]
        and c.found == ["~/.claude/.credentials.json (copied)"]
    )
    g = resolve_credentials(AGENTS["gemini"], None, {}, tmp_path)
    assert g.ok and g.copies == [(gemini, ".gemini/oauth_creds.json")]
    x = resolve_credentials(AGENTS["codex"], None, {}, tmp_path)
    assert x.ok and x.copies == [] and x.mounts == [(codex, ".codex/auth.json")]


def test_codex_runs_are_serialised_when_its_auth_file_is_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings, paths = load_settings()
    assert Dispatcher(settings, paths, DockerRuntime()).scheduler.limits.pools.get("codex") is None
    _login(tmp_path, ".codex/auth.json")
    assert Dispatcher(settings, paths, DockerRuntime()).scheduler.limits.pools["codex"] == 1
    monkeypatch.setenv("OPENAI_API_KEY", "sk-123456")  # with a key the file is not used: no serialising
    assert Dispatcher(settings, paths, DockerRuntime()).scheduler.limits.pools.get("codex") is None


def test_missing_credentials_say_what_to_set_and_a_configured_file_that_is_missing_is_named(tmp_path: Path) -> None:
    creds = resolve_credentials(AGENTS["codex"], None, {}, tmp_path)
    assert not creds.ok
    assert creds.problem is not None and "codex: no credentials found. Set OPENAI_API_KEY" in creds.problem
    cfg = AgentSettings(files=[HostFile(source=tmp_path / "nope.json", target=".claude/.credentials.json")])
    creds = resolve_credentials(AGENTS["claude"], cfg, {"ANTHROPIC_API_KEY": "k-123456"}, tmp_path)
    assert creds.problem is not None and str(tmp_path / "nope.json") in creds.problem
    assert resolve_credentials(AGENTS["shell"], None, {}, tmp_path).ok  # no model, no key


def test_config_refuses_parent_session_variables_bad_targets_and_unknown_agents(
    isolated_home: Path, tmp_path: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    cfg = isolated_home / "config.toml"
    cfg.write_text('[agents.claude]\nenv = ["CLAUDECODE"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="CLAUDECODE belongs to the parent session"):
        load_settings()
    cfg.write_text('[agents.claude]\nfiles = [{source = "/x", target = "../escape"}]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="relative to the agent's home"):
        load_settings()
    cfg.write_text('[agents.copilot]\nmodel = "x"\n', encoding="utf-8")
    settings, paths = load_settings()
    with pytest.raises(ConfigError, match=r"agents\.copilot: unknown agent"):
        Dispatcher(settings, paths, DockerRuntime())


def test_a_key_variable_that_is_set_but_left_out_of_the_configured_env_is_named_with_where_to_add_it(
    tmp_path: Path,
) -> None:
    cfg = AgentSettings(env=["HTTPS_PROXY"])
    creds = resolve_credentials(AGENTS["claude"], cfg, {"ANTHROPIC_API_KEY": "k-123456"}, tmp_path)
    assert creds.problem is not None
    assert "ANTHROPIC_API_KEY is set in the server's environment" in creds.problem
    assert "Add 'ANTHROPIC_API_KEY' to [agents.claude] env in the config file" in creds.problem
    assert "Set ANTHROPIC_API_KEY" not in creds.problem


def test_every_key_variable_that_is_set_is_passed(tmp_path: Path) -> None:
    environ = {"ANTHROPIC_API_KEY": "k-123456", "CLAUDE_CODE_OAUTH_TOKEN": "t-123456"}
    assert resolve_credentials(AGENTS["claude"], None, environ, tmp_path).env == environ


def _ctx(creds_env: dict[str, str], **kw: Any) -> RunContext:
    return RunContext(task="t", prompt="p", model=None, run=1, env=creds_env, **kw)


def test_a_gemini_key_set_only_as_google_api_key_reaches_the_cli_as_gemini_api_key(tmp_path: Path) -> None:
    """Gemini CLI's gemini-api-key auth reads GEMINI_API_KEY only; GOOGLE_API_KEY is its Vertex AI variable."""
    creds = resolve_credentials(AGENTS["gemini"], None, {"GOOGLE_API_KEY": "AIza-123456"}, tmp_path)
    assert creds.ok
    plan = AGENTS["gemini"].plan(_ctx(creds.env))
    assert plan.env == {"GEMINI_API_KEY": "AIza-123456"}
    settings = json.loads(plan.home_files[".gemini/settings.json"])
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"


def test_gemini_attempts_are_clamped_to_the_cli_cap_of_ten() -> None:
    for retries, attempts in ((0, 1), (9, 10), (20, 10)):
        plan = AGENTS["gemini"].plan(_ctx({"GEMINI_API_KEY": "k-123456"}, max_retries=retries))
        assert json.loads(plan.home_files[".gemini/settings.json"])["general"]["maxAttempts"] == attempts


def _codex_provider(argv: list[str]) -> dict[str, Any]:
    (option,) = [a for a in argv if a.startswith("model_providers.agentic=")]
    value: dict[str, Any] = tomllib.loads("p = " + option.partition("=")[2])["p"]
    return value


def test_codex_with_its_login_and_retries_or_a_base_url_keeps_the_login_as_its_credential() -> None:
    """Without OPENAI_API_KEY the provider must use auth.json (requires_openai_auth), and leave the base URL
    to Codex (chatgpt.com/backend-api/codex for a ChatGPT login) unless one is configured."""
    provider = _codex_provider(AGENTS["codex"].plan(_ctx({}, max_retries=2)).argv)
    assert provider["requires_openai_auth"] is True and provider["request_max_retries"] == 2
    assert "env_key" not in provider and "base_url" not in provider
    provider = _codex_provider(AGENTS["codex"].plan(_ctx({}, base_url="http://gw:4000/v1")).argv)
    assert provider["requires_openai_auth"] is True and provider["base_url"] == "http://gw:4000/v1"
    keyed = _codex_provider(AGENTS["codex"].plan(_ctx({"OPENAI_API_KEY": "sk-123456"}, max_retries=0)).argv)
    assert keyed["env_key"] == "OPENAI_API_KEY" and keyed["base_url"] == "https://api.openai.com/v1"
    assert "requires_openai_auth" not in keyed


def test_redact_hides_every_secret_value() -> None:
    assert redact("key sk-abcdef and sk-abcdef!", ["sk-abcdef"]) == "key *** and ***!"
    assert redact(None, ["sk-abcdef"]) is None


def test_env_passthrough_copied_and_mounted_files_reach_the_container(
    docker_env: str, user_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real container: a named variable arrives, a copied file is private, a mounted file is the host's."""
    copied = _login(tmp_path, "host/copied.json", "copied-content")
    mounted = _login(tmp_path, "host/mounted.json", "before")
    monkeypatch.setenv("MY_TOKEN", "token-value-123")
    monkeypatch.setenv("NOT_NAMED", "must-not-pass")
    shell = AgentSettings(
        env=["MY_TOKEN"],
        files=[
            HostFile(source=copied, target="creds/copied.json"),
            HostFile(source=mounted, target="creds/mounted.json", mode="mount"),
        ],
    )
    settings, paths = load_settings()
    dispatcher = Dispatcher(settings.model_copy(update={"agents": {"shell": shell}}), paths, DockerRuntime())
    task = (
        'printf "%s|%s|%s" "$MY_TOKEN" "${NOT_NAMED:-absent}" "$(cat $HOME/creds/copied.json)" > seen.txt && '
        "echo after > $HOME/creds/mounted.json && echo changed > $HOME/creds/copied.json && "
        "git add seen.txt && git commit -qm seen"
    )
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = dispatcher.wait(res.workspace, 60)  # no background threads: wait reconciles itself
    assert rec.status == "completed", rec.reason
    assert git(Path(res.repo_path), "show", f"{res.branch}:seen.txt") == "token-value-123|absent|copied-content"
    assert mounted.read_text(encoding="utf-8").strip() == "after"  # the mount is the host file itself
    assert copied.read_text(encoding="utf-8") == "copied-content"  # the copy is the workspace's own
    assert "token-value-123" not in (Path(res.path) / "status.json").read_text(encoding="utf-8")


def test_a_resume_refused_for_an_over_long_prompt_changes_nothing(dispatcher: Dispatcher, user_repo: Path) -> None:
    res = dispatcher.dispatch(
        DispatchRequest(repo=str(user_repo), task="echo 'Which one?' > BLOCKED.md", agent="shell")
    )
    assert dispatcher.wait(res.workspace, 60).status == "blocked"
    ws = Path(res.path)
    before = (ws / "status.json").read_text(encoding="utf-8")
    huge = "\U0001f600" * 40_000  # 40 000 characters (under the answer limit), 160 000 bytes of prompt
    with pytest.raises(InvalidInputError, match=r"answer.*bytes"):
        dispatcher.resume(res.workspace, answer=huge)
    assert (ws / "status.json").read_text(encoding="utf-8") == before
    assert (ws / "repo" / "BLOCKED.md").is_file() and not (ws / "repo" / "ANSWER.md").exists()
    assert dispatcher.resume(res.workspace, answer="the first").status in ("queued", "running")
