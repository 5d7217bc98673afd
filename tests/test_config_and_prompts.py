"""Settings from the optional TOML file, and prompt assembly from templates."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import ConfigError, InvalidInputError, MissingVariablesError
from agentic_dispatch.prompts import PromptContext, PromptLibrary, detect_repo_facts
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher


def test_no_config_file_gives_working_defaults_under_the_home_root(isolated_home: Path) -> None:
    settings, paths = load_settings()
    assert paths.root == isolated_home.resolve()
    assert settings.limits.total >= 1 and settings.timeout_seconds == 3600
    assert paths.workspaces == isolated_home.resolve() / "workspaces"


def test_config_errors_are_reported_one_line_per_problem_with_the_file_path(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    cfg = isolated_home / "config.toml"
    cfg.write_text('timeout_seconds = -5\ncolour = "blue"\n[limits]\ntotal = "many"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith(str(cfg)) for line in lines)
    text = str(info.value)
    assert "timeout_seconds" in text and "colour: unknown key" in text and "limits.total" in text


def test_values_that_would_only_fail_at_dispatch_time_are_config_errors_at_start(
    isolated_home: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "elsewhere.toml"  # given with --config: errors must name this file
    cfg.write_text('repo_url_template = "https://git.example/{owner}/{name}.git"\n[resources]\nmemory = "lots"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(cfg)) for line in lines), lines
    assert "repo_url_template" in lines[0] and "{org} and {repo}" in lines[0]
    assert "resources.memory" in lines[1]

    cfg.write_text('default_agent = "copilot"\ndefault_template = "poem"\n')
    settings, paths = load_settings(cfg)
    with pytest.raises(ConfigError) as info:
        Dispatcher(
            settings, paths, DockerRuntime(docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41"))
        )
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(cfg)) for line in lines), lines
    assert "default_agent" in lines[0] and "shell" in lines[0]
    assert "default_template" in lines[1] and "coding" in lines[1]


def test_broken_toml_is_a_config_error_naming_the_file(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text("this is = = not toml", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()


def test_config_file_values_are_used(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text(
        'default_agent = "shell"\n[limits]\ntotal = 2\npools = {codex = 1}\n', encoding="utf-8"
    )
    settings, _ = load_settings()
    assert settings.default_agent == "shell" and settings.limits.pools == {"codex": 1}


def _config_error(isolated_home: Path, text: str) -> str:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    return str(info.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("HOME", "agent home must be /agentic/home"),
        ("PATH", "where the agent CLIs are"),
        ("IS_SANDBOX", "permission bypass"),
        ("CODEX_HOME", "sessions and auth.json in the agent home"),
        ("AGENTIC_LOG", "names starting with AGENTIC_ are agentic-dispatch's own"),
    ],
)
def test_agent_env_may_not_name_a_variable_the_container_needs_and_the_error_says_which_and_why(
    isolated_home: Path, name: str, why: str
) -> None:
    text = _config_error(isolated_home, f'[agents.claude]\nenv = ["ANTHROPIC_API_KEY", "{name}"]\n')
    assert len(text.splitlines()) == 1, text
    assert "agents.claude.env" in text and name in text and why in text


def test_gemini_max_retries_over_the_cli_cap_is_a_config_error_but_other_agents_may_use_it(isolated_home: Path) -> None:
    text = _config_error(isolated_home, "[agents.gemini]\nmax_retries = 10\n")
    assert "gemini.max_retries is at most 9" in text and len(text.splitlines()) == 1
    (isolated_home / "config.toml").write_text(
        "[agents.gemini]\nmax_retries = 9\n[agents.claude]\nmax_retries = 20\n", encoding="utf-8"
    )
    settings, _ = load_settings()
    assert settings.agents["gemini"].max_retries == 9 and settings.agents["claude"].max_retries == 20


def test_codex_auth_json_may_be_mounted_but_never_copied(isolated_home: Path) -> None:
    for files in (
        '[{source = "~/.codex/auth.json", target = ".codex/auth.json"}]',
        '[{source = "/secrets/codex-auth.json", target = ".codex/auth.json", mode = "copy"}]',
        '[{source = "~/.codex/auth.json", target = "elsewhere/auth.json", mode = "copy"}]',
    ):
        text = _config_error(isolated_home, f"[agents.codex]\nfiles = {files}\n")
        assert "agents.codex.files.0" in text and "must not be copied" in text, text
        assert 'mode = "mount"' in text and "OPENAI_API_KEY" in text
    (isolated_home / "config.toml").write_text(
        '[agents.codex]\nfiles = [{source = "~/.codex/auth.json", target = ".codex/auth.json", mode = "mount"}]\n',
        encoding="utf-8",
    )
    settings, _ = load_settings()
    files = settings.agents["codex"].files
    assert files is not None and files[0].mode == "mount"


def _library(isolated_home: Path) -> PromptLibrary:
    return PromptLibrary(isolated_home / "prompts", isolated_home / "workspace_templates")


def _ctx(**kw: object) -> PromptContext:
    base: dict[str, object] = {
        "task": "Fix the bug",
        "repo": "acme/app",
        "branch": "agent/fix",
        "base_branch": "main",
        "template": "coding",
    }
    base.update(kw)
    return PromptContext(**base)  # type: ignore[arg-type]


def test_a_plan_template_with_missing_variables_names_all_of_them(isolated_home: Path) -> None:
    lib = _library(isolated_home)
    with pytest.raises(MissingVariablesError) as info:
        lib.check("coding", None, "feature", {"goal": "faster"})
    assert info.value.missing == ["acceptance", "area"]
    assert "acceptance, area" in str(info.value)


def test_prompt_carries_task_persona_plan_facts_and_the_rules(isolated_home: Path) -> None:
    lib = _library(isolated_home)
    prompt = lib.render(
        _ctx(
            persona="senior-engineer",
            plan_template="bugfix",
            variables={"symptom": "crash on save"},
            repo_facts="Language: Python",
            git_log="abc123 initial",
        )
    )
    for expected in (
        "Fix the bug",
        "senior software engineer",
        "crash on save",
        "Language: Python",
        "abc123 initial",
        "BLOCKED.md",
        "agent/fix",
    ):
        assert expected in prompt, expected
    assert "$" not in prompt


def test_every_builtin_task_template_renders(isolated_home: Path) -> None:
    lib = _library(isolated_home)
    assert set(lib.names("task")) >= {"coding", "conventions", "security", "review", "verify"}
    for name in lib.names("task"):
        assert "Fix the bug" in lib.render(_ctx(template=name))


def test_a_user_template_wins_over_the_builtin_one_of_the_same_name(isolated_home: Path) -> None:
    (isolated_home / "prompts").mkdir(parents=True)
    (isolated_home / "prompts" / "coding.md").write_text("MINE: $task\n$rules\n", encoding="utf-8")
    assert lib_render(isolated_home).startswith("MINE: Fix the bug")


def lib_render(isolated_home: Path) -> str:
    return _library(isolated_home).render(_ctx())


def test_unknown_template_lists_the_known_ones(isolated_home: Path) -> None:
    with pytest.raises(InvalidInputError, match="Known: coding"):
        _library(isolated_home).check("nope", None, None, {})


def test_resume_prompt_carries_the_question_and_the_answer(isolated_home: Path) -> None:
    prompt = _library(isolated_home).render(_ctx(question="Which DB?", answer="PostgreSQL"))
    assert "Which DB?" in prompt and "PostgreSQL" in prompt


def test_repo_facts_detect_language_and_commands(tmp_path: Path) -> None:
    (tmp_path / "go.mod").write_text("module x\n")
    assert "Go" in detect_repo_facts(tmp_path) and "go test ./..." in detect_repo_facts(tmp_path)
    (tmp_path / "package.json").write_text('{"scripts": {"test": "vitest"}}')
    assert "npm test" in detect_repo_facts(tmp_path)
