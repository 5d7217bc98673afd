"""Name validation and path containment: each case names the threat it stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentic_dispatch.agents import parse_agent_spec
from agentic_dispatch.errors import InvalidInputError
from agentic_dispatch.naming import check_component, check_git_ref, contained, slugify
from agentic_dispatch.store import StatusStore


@pytest.mark.parametrize(
    ("ref", "threat"),
    [
        ("-D", "option injection into git"),
        ("--force", "option injection into git"),
        ("a..b", "revision range smuggled as a branch"),
        ("feature/../../x", "path traversal through a ref"),
        ("bad name", "whitespace"),
        ("x@{1}", "reflog syntax"),
        (".hidden", "leading dot"),
        ("x.lock", "lock file name"),
    ],
)
def test_unsafe_branch_names_are_refused(ref: str, threat: str) -> None:
    with pytest.raises(InvalidInputError, match="branch"):
        check_git_ref("branch", ref)


def test_ordinary_branch_names_are_accepted() -> None:
    for ref in ("main", "feature/login", "release-1.2", "agent/fix_it"):
        assert check_git_ref("branch", ref) == ref


@pytest.mark.parametrize("name", ["..", ".", "-x", "a/b", "", "a b", "../etc", "x" * 200])
def test_unsafe_path_components_are_refused(name: str) -> None:
    with pytest.raises(InvalidInputError):
        check_component("org", name)


def test_a_symlink_inside_the_root_cannot_lead_outside_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(InvalidInputError, match="outside"):
        contained(root, "escape", "x")
    assert contained(root, "a", "b") == (root / "a" / "b").resolve()


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a/b/c/d", "a/../b/c", "-a/b/c"])
def test_workspace_names_that_would_escape_the_root_are_refused(tmp_path: Path, name: str) -> None:
    store = StatusStore(tmp_path / "ws", tmp_path / "ev", tmp_path / "index.sqlite")
    with pytest.raises(InvalidInputError):
        store.paths(name)


def test_slugs_are_short_safe_and_never_empty() -> None:
    assert slugify("Fix the LOGIN bug!!") == "fix-the-login-bug"
    assert slugify("$$$") == "task"
    assert len(slugify("word " * 50)) <= 40


@pytest.mark.parametrize(
    "spec", ["shell:", "shell:\x00", "claude:op us", "claude:-rf", "codex:\x1b[31mred", "gemini:" + "m" * 201]
)
def test_a_model_that_is_not_a_plain_printable_name_is_refused_before_it_reaches_labels_or_a_command_line(
    spec: str,
) -> None:
    with pytest.raises(InvalidInputError, match="the model after ':'"):
        parse_agent_spec(spec)


def test_plain_model_names_are_kept() -> None:
    assert parse_agent_spec("claude:opus").model == "opus"
    assert parse_agent_spec("codex:gpt-5-codex").model == "gpt-5-codex"
    assert parse_agent_spec("gemini:" + "m" * 200).model == "m" * 200
