"""Regression tests for what the tool fuzz (tests/test_fuzz_tools.py) found at the tools' boundary;
each failed before its fix with an unexpected exception or by accepting the argument."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError

from agentic_dispatch import cli
from agentic_dispatch.errors import InvalidInputError
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.models import DispatchRequest, problems
from agentic_dispatch.naming import MAX_REF_BYTES, check_git_ref
from agentic_dispatch.repos import resolve_repo
from agentic_dispatch.service import Dispatcher

from .conftest import git

TEMPLATE = "https://example.invalid/{org}/{repo}.git"


def test_an_unknown_argument_is_a_tool_error_naming_the_arguments_the_tool_takes() -> None:
    """The SDK dropped unknown arguments: a misspelt dry_run (`dryrun`) launched a real run.
    (The fuzz sees the tool error through a session; here the server is asked directly.)"""

    def no_service() -> Dispatcher:
        raise AssertionError("the call must be refused before the tool runs")

    server = build_server(no_service)
    with pytest.raises(ToolError) as refused:
        anyio.run(server.call_tool, "agentic_dispatch", {"repo": "/x", "task": "t", "dryrun": True})
    assert "'dryrun'" in str(refused.value) and "dry_run" in str(refused.value) and "Fix the name" in str(refused.value)


@pytest.fixture
def state_root(tmp_path: Path, user_repo: Path) -> Path:
    root = tmp_path / "home"
    clone = root / "workspaces" / "local" / "user-repo" / "w-1" / "repo"
    git(tmp_path, "clone", "-q", str(user_repo), str(clone))
    (tmp_path / "link-into-root").symlink_to(clone)
    return root


def test_a_repository_inside_the_state_root_is_refused_however_it_is_named(state_root: Path, tmp_path: Path) -> None:
    """A workspace clone's git config and objects are the agent's: no dispatch may read from it."""
    clone = state_root / "workspaces" / "local" / "user-repo" / "w-1" / "repo"
    for given in (str(clone), f"file://{clone}", str(tmp_path / "link-into-root"), f"{state_root}/../home/workspaces"):
        with pytest.raises(InvalidInputError, match="inside the agentic-dispatch state root"):
            resolve_repo(given, None, TEMPLATE, state_root)
    assert resolve_repo(str(tmp_path / "user-repo"), None, TEMPLATE, state_root).kind == "local"


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("~no-such-user-agentic/repo", "cannot be read as a path"),  # was RuntimeError
        ("/tmp/repo\x00", "control characters"),  # was ValueError (embedded null byte)
        ("/tmp/a\nb", "control characters"),
    ],
)
def test_a_repo_that_is_no_path_is_an_input_error(given: str, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says):
        resolve_repo(given, None, TEMPLATE)


def test_a_branch_longer_than_a_ref_file_name_may_be_is_an_input_error() -> None:
    """Was OSError (File name too long) from the mirror's refs folder."""
    check_git_ref("branch", "b" * MAX_REF_BYTES)
    with pytest.raises(InvalidInputError, match="at most"):
        check_git_ref("branch", "b" * (MAX_REF_BYTES + 1))
    with pytest.raises(InvalidInputError, match="at most"):
        check_git_ref("branch", "é" * (MAX_REF_BYTES // 2 + 1))


# -- the dispatch constraints are declared once (models.py) -------------------------------------
CONSTRAINED = [
    ("task", "   ", "task: is empty"),
    ("issue", 0, "greater than 0"),
    ("timeout_seconds", 0, "greater than 0"),
    ("branch", "-x", "must not start with '-'"),
    ("tag", "a/b", "is not a valid name"),
    ("idempotency_key", " ", "must be 1 to 200 characters"),
    ("lock", "db\nmigrations", "lock: must be 1 to 100 printable characters"),
    ("scope", ["src/**", "../secrets/**"], "no leading '/', no '..'"),
]
CLI_FLAG = {"issue": "--issue", "timeout_seconds": "--timeout", "branch": "--branch", "tag": "--tag",
            "idempotency_key": "--idempotency-key", "lock": "--lock", "scope": "--scope"}  # fmt: skip


@pytest.mark.parametrize(("field", "value", "says"), CONSTRAINED, ids=[c[0] for c in CONSTRAINED])
def test_a_dispatch_constraint_is_the_request_models_for_the_model_the_tool_and_the_cli(
    field: str, value: object, says: str, no_engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args: dict[str, object] = {"repo": "/nowhere", "task": "x", field: value}
    with pytest.raises(ValidationError) as built:
        DispatchRequest.model_validate(args)
    assert says in problems(built.value)

    def no_service() -> Dispatcher:
        raise AssertionError("the arguments are refused before the tool runs")

    with pytest.raises(ToolError, match=field) as refused:
        anyio.run(build_server(no_service).call_tool, "agentic_dispatch", args)
    assert says in str(refused.value)

    argv = ["dispatch", "/nowhere", str(value) if field == "task" else "x"]
    if field != "task":  # a list is the flag repeated
        argv += [f"{CLI_FLAG[field]}={v}" for v in (value if isinstance(value, list) else [value])]
    assert cli.main(argv) == 2
    assert says in capsys.readouterr().err


def test_a_dispatch_request_refuses_a_field_it_does_not_have_naming_it() -> None:
    """A misspelt limit would otherwise be dropped and the run go without it."""
    with pytest.raises(ValidationError) as built:
        DispatchRequest.model_validate({"repo": "/nowhere", "task": "x", "timout_seconds": 60})
    assert "timout_seconds: Extra inputs are not permitted" in problems(built.value)
