"""What the command line prints for a person, driven in process through ``cli.main``: every command's
human output is labelled lines or a table (never a Python dict, list or ``True``), ``--json`` keeps
the model, ``--help`` is plain text, and a bad number for the live commands exits 2 before
anything is read or built. Real git, real files; no engine unless a test asks for Docker."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import docker
import docker.errors
import pytest

from agentic_dispatch import cli
from agentic_dispatch.config import load_settings
from agentic_dispatch.models import Status, SyncReport, WorkspaceRecord, utcnow
from agentic_dispatch.runtime.base import LABEL_ROOT, LABEL_WORKSPACE
from agentic_dispatch.store import StatusStore

from .conftest import empty_git_home, git

# What Python prints for its own values: a person should never see these in human output.
RAW = re.compile(r"\{'|\['|\{\}|\[\]|\bTrue\b|\bFalse\b|\bNone\b")


@pytest.fixture(autouse=True)
def plain_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide, plain terminal, and an empty git home with a fixed identity (no machine config)."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERM", "dumb")
    empty_git_home(tmp_path, monkeypatch)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err


def _record(name: str, repo: str, origin: str, status: Status = Status.COMPLETED) -> WorkspaceRecord:
    org, repo_name, slug = name.split("/")
    return WorkspaceRecord(
        name=name, status=status, agent="shell", repo=repo, org=org, repo_name=repo_name, origin_url=origin,
        task="do the work", branch=f"agent/{slug}", base_branch="main", template="coding", timeout_seconds=60,
        runs=1, exit_code=0, started_at=utcnow(), finished_at=utcnow(),
    )  # fmt: skip


@pytest.fixture
def two_deliveries(no_engine: str, tmp_path: Path) -> Path:
    """Two completed workspaces: one whose branch can be delivered into a local repository, and one
    whose clone lacks its branch (a delivery that needs attention). Returns the local repository."""
    repo = tmp_path / "user-repo"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "README.md").write_text("hello\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    _, paths = load_settings()
    store = StatusStore.of(paths)
    store.create(_record("local/user-repo/task-1", str(repo), str(repo)))
    clone = paths.workspaces / "local" / "user-repo" / "task-1" / "repo"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", "-b", "agent/task-1")
    (clone / "work.txt").write_text("the agent's work\n", encoding="utf-8")
    git(clone, "add", ".")
    git(clone, "commit", "-q", "-m", "work")
    store.create(_record("acme/web/pr-7", "acme/web", "https://example.invalid/acme/web.git"))
    return repo


# ---------------------------------------------------------------------------------------------
# human output: labelled lines and tables


def test_sync_shows_a_row_per_delivery_and_what_to_do_never_a_python_dict(
    two_deliveries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["sync"], capsys)
    assert code == 1  # one delivery needs attention
    assert not RAW.search(out), out
    lines = out.splitlines()
    assert lines[0] == "Deliveries by workspace: 1 delivered, 1 attention."
    header = next(
        i for i, line in enumerate(lines) if line.split()[:5] == ["workspace", "run", "kind", "state", "tries"]
    )
    rows = {f[0]: f for f in (line.split() for line in lines[header + 1 :]) if len(f) > 4 and f[1].isdigit()}
    assert rows["local/user-repo/task-1"][1:4] == ["1", "branch", "delivered"]
    assert f"in {two_deliveries}" in " ".join(rows["local/user-repo/task-1"])
    assert rows["acme/web/pr-7"][1:4] == ["1", "branch", "attention"]
    assert any("needs attention" in line and "recreate agent/pr-7 there, then retry" in line for line in lines)


def test_sync_json_keeps_the_report_model_with_its_entries(
    two_deliveries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["sync", "--json"], capsys)
    assert code == 1
    report = json.loads(out)
    assert set(report) == set(SyncReport.model_fields)
    assert report["delivered"] == ["local/user-repo/task-1"] and report["attention"] == ["acme/web/pr-7"]
    assert {e["state"] for e in report["entries"]} == {"delivered", "attention"}
    assert all(e["id"] for e in report["entries"])


def test_sync_with_nothing_to_deliver_prints_one_sentence(no_engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["sync"], capsys)
    assert code == 0
    assert out.strip() == "Deliveries by workspace: nothing to deliver."


def test_freeze_and_unfreeze_say_what_they_did_in_words(no_engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["freeze"], capsys)
    assert code == 0 and not RAW.search(out), out
    lines = out.splitlines()
    assert lines[0].startswith("frozen: new dispatches queue")
    assert lines[1].split() == ["frozen", "yes"]
    code, out, _ = run(["unfreeze"], capsys)
    assert code == 0 and not RAW.search(out), out
    assert out.splitlines()[1].split() == ["frozen", "no"]


def test_cancel_of_a_finished_workspace_says_it_was_left_alone(
    two_deliveries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["cancel", "acme/web/pr-7"], capsys)
    assert code == 0 and not RAW.search(out), out
    lines = out.splitlines()
    assert lines[0] == "nothing to cancel: the workspace is completed"
    assert [line.split() for line in lines[1:]] == [
        ["workspace", "acme/web/pr-7"],
        ["status", "completed"],
        ["changed", "no"],
    ]


def test_a_dry_run_prints_labelled_lines_and_the_prompt_indented_under_its_heading(
    no_engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "user-repo"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    git(repo, "commit", "-q", "--allow-empty", "-m", "initial")
    code, out, _ = run(["dispatch", str(repo), "echo hi", "--agent", "shell", "--dry-run"], capsys)
    assert code == 0 and not RAW.search(out), out
    lines = out.splitlines()
    labelled = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines[: lines.index("prompt:")] if line}
    assert labelled["status"] == "dry_run" and labelled["agent"] == "shell"
    assert labelled["branch"].startswith("agent/") and labelled["repo"].startswith("path ")  # "repo path  /..."
    prompt = lines[lines.index("prompt:") + 1 :]
    assert prompt[0] == "  # Task" and "  echo hi" in prompt
    assert all(line == "" or line.startswith("  ") for line in prompt)


def test_cleanup_lists_the_orphaned_containers_it_removed(
    docker_env: str, docker_client: docker.DockerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root_id = load_settings()[1].root_id
    orphan = docker_client.containers.create(
        docker_env, ["sleep", "30"], labels={LABEL_ROOT: root_id, LABEL_WORKSPACE: "gone/repo/task-1"}
    )
    code, out, _ = run(["cleanup"], capsys)
    assert code == 0 and not RAW.search(out), out
    lines = out.splitlines()
    assert lines[0] == "removed 1 orphaned container(s)"
    assert lines[1] == "removed:" and lines[2].split()[0] == orphan.id[:12]
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(orphan.id)


# ---------------------------------------------------------------------------------------------
# --help: plain text for a person


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, _ = run([*argv, "--help"], capsys)
    assert code == 0
    return out


def _subcommands() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(cli.build_parser(), [])
    return found


def test_the_top_level_help_describes_the_tool_in_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([], capsys)
    assert "`" not in out and ":class:" not in out, out
    assert "coding agents" in out and "Docker" in out
    assert "exit codes: 0 success, 1 failure, 2 bad input or configuration" in " ".join(out.lower().split())


def test_every_command_has_a_description_and_every_argument_a_help_text_in_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = cli.build_parser()
    missing: list[str] = []
    for argv in _subcommands():
        sub = parser
        for name in argv:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        out = _help(argv, capsys)
        assert "`" not in out, (argv, out)
        if not sub.description:
            missing.append(" ".join(argv))
        missing += [
            f"{' '.join(argv)} {a.dest}"
            for a in sub._actions
            if not a.help and not isinstance(a, argparse._SubParsersAction)
        ]
    assert missing == []


# ---------------------------------------------------------------------------------------------
# bad values (numbers, a status): exit 2 at the boundary, before anything is read or built


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["logs", "acme/web/pr-7", "--tail", "-5"], "--tail"),
        (["logs", "acme/web/pr-7", "--tail", "0"], "--tail"),
        (["logs", "acme/web/pr-7", "--tail", "5001"], "--tail"),
        (["events", "--last", "-1"], "--last"),
        (["events", "--last", "x"], "--last"),
        (["watch", "--interval", "0"], "--interval"),
        (["watch", "--interval", "nan"], "--interval"),
        (["watch", "--interval", "51"], "--interval"),
        (["watch", "--limit", "0"], "--limit"),
        (["insights", "--days", "0"], "--days"),
        (["insights", "--days", "-1"], "--days"),
        (["insights", "--days", "367"], "--days"),
        (["insights", "--days", "inf"], "--days"),
        (["status", "--status", "finished"], "--status"),
        (["clean", "--older-than", "-1d"], "--older-than"),
        (["clean", "--older-than", "infd"], "--older-than"),
        (["clean", "--older-than", "soon"], "--older-than"),
        (["clean", "--keep", "-1"], "--keep"),
        (["clean", "--keep", "1.5"], "--keep"),
    ],
)
def test_a_bad_value_for_a_command_exits_2_naming_the_option_before_anything_is_built(
    argv: list[str], option: str, no_engine: str, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert f"argument {option}:" in err, err
    assert not isolated_home.exists(), "the state root was made before the argument was checked"


def test_the_bounds_themselves_are_accepted(two_deliveries: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["logs", "acme/web/pr-7", "--tail", "5000"], capsys)
    assert code == 0, err
    code, _, err = run(["events", "--last", "0"], capsys)
    assert code == 0, err
    code, out, err = run(["insights", "--days", "366"], capsys)
    assert code == 0 and "366 days" in out, err


def test_an_agents_question_is_shown_as_written_never_read_as_table_markup(
    no_engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The status table's last column holds the agent's own words: ``[red]`` or ``[/]`` in them is text."""
    _, paths = load_settings()
    question = "Use [red]PG[/]?"
    StatusStore.of(paths).create(
        WorkspaceRecord(
            name="acme/app/task-1",
            status=Status.BLOCKED,
            agent="shell",
            repo="acme/app",
            org="acme",
            repo_name="app",
            origin_url="https://example.invalid/a.git",
            task="t",
            branch="agent/task-1-t",
            template="coding",
            timeout_seconds=60,
            runs=1,
            question=question,
        )
    )
    assert cli.main(["status"]) == 0
    assert question in capsys.readouterr().out


def test_diff_prints_the_stat_then_the_patch_and_json_keeps_the_model(
    two_deliveries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["diff", "local/user-repo/task-1"], capsys)
    assert code == 0 and not RAW.search(out), out
    lines = out.splitlines()
    assert lines[0].startswith("# agent/task-1 against ")
    stat_at = next(i for i, line in enumerate(lines) if "work.txt" in line and "|" in line)
    assert lines.index("+the agent's work") > stat_at, out

    code, out, _ = run(["diff", "local/user-repo/task-1", "--stat"], capsys)
    assert code == 0 and "work.txt" in out and "+the agent's work" not in out, out
    code, out, _ = run(["diff", "local/user-repo/task-1", "--json"], capsys)
    assert code == 0 and json.loads(out)["branch"] == "agent/task-1" and "work.txt" in json.loads(out)["patch"]
    code, _, err = run(["diff", "local/user-repo/task-1", "--path", "../etc/passwd"], capsys)
    assert code == 2 and "is not a path inside the repository" in err, err
