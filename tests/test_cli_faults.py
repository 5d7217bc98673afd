"""The command line's answers to bad input, driven in process through ``cli.main``: bad input and
configuration exit 2 with a clear message and no traceback, and a refused dispatch leaves nothing on
disk. Real git, real files; nothing here reaches a container engine unless marked ``docker``."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agentic_dispatch import cli

from .conftest import empty_git_home, needs_root

OTHER_UID = 12345  # a user that is not the one the tests run as
WAIT = 20.0  # upper bound of a wait on another thread


@pytest.fixture(autouse=True)
def no_engine_and_no_user_git_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """No container engine reachable unless the test is marked ``docker`` (a command that reached
    one would fail, not start a container), and an empty git home (no safe.directory = * from the
    machine's own config)."""
    if request.node.get_closest_marker("docker") is None:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    empty_git_home(tmp_path, monkeypatch)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def repo_with_commits(tmp_path: Path) -> Path:
    repo = tmp_path / "user-repo"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "README.md").write_text("hello\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    git(repo, "branch", "feature")
    return repo


def left_behind(home: Path) -> list[str]:
    """What a refused dispatch could leave: mirrors, locks, workspaces, staging folders."""
    found: list[str] = []
    for folder in ("mirrors", "workspaces", "state/staging"):
        if (home / folder).exists():
            found += [str(p.relative_to(home)) for p in (home / folder).rglob("*")]
    return sorted(found)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def dry_dispatch(repo: str, *extra: str) -> list[str]:
    return ["dispatch", repo, "echo hi", "--agent", "shell", "--dry-run", *extra]


# ---------------------------------------------------------------------------------------------
# #14 and #20: repositories that cannot be dispatched from


def _a_file(tmp_path: Path) -> tuple[str, list[str]]:
    path = tmp_path / "a-file"
    path.write_text("not a repository\n", encoding="utf-8")
    return str(path), []


def _a_plain_folder(tmp_path: Path) -> tuple[str, list[str]]:
    (tmp_path / "plain").mkdir()
    return str(tmp_path / "plain"), []


def _missing(tmp_path: Path) -> tuple[str, list[str]]:
    return str(tmp_path / "missing"), []


def _no_commits(tmp_path: Path) -> tuple[str, list[str]]:
    git(tmp_path, "init", "-q", "-b", "main", str(tmp_path / "empty"))
    return str(tmp_path / "empty"), []


def _unborn_head(tmp_path: Path) -> tuple[str, list[str]]:
    repo = repo_with_commits(tmp_path)
    git(repo, "checkout", "-q", "--orphan", "fresh")
    return str(repo), []


def _unknown_branch(tmp_path: Path) -> tuple[str, list[str]]:
    return str(repo_with_commits(tmp_path)), ["--branch", "nope"]


@pytest.mark.parametrize(
    "make",
    [_a_file, _a_plain_folder, _missing, _no_commits, _unborn_head, _unknown_branch],
    ids=["file", "plain-folder", "missing", "no-commits", "unborn-head", "unknown-branch"],
)
def test_a_repository_that_cannot_be_dispatched_from_exits_2_and_leaves_nothing_on_disk(
    tmp_path: Path,
    isolated_home: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], tuple[str, list[str]]],
) -> None:
    repo, extra = make(tmp_path)

    code, err = run(dry_dispatch(repo, *extra), capsys)

    assert code == 2, err
    assert err.startswith("error: ") and ("repo" in err or "branch" in err), err
    assert left_behind(isolated_home) == []


def test_a_refused_dispatch_leaves_a_mirror_made_before_it_alone(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(repo_with_commits(tmp_path))
    assert run(dry_dispatch(repo), capsys)[0] == 0
    mirrors = sorted(os.listdir(isolated_home / "mirrors"))
    assert any(m.endswith(".git") for m in mirrors)

    code, err = run(dry_dispatch(repo, "--branch", "nope"), capsys)

    assert code == 2 and "Existing branches: feature, main" in err, err
    assert sorted(os.listdir(isolated_home / "mirrors")) == mirrors
    assert [p for p in left_behind(isolated_home) if not p.startswith("mirrors/")] == []


def test_an_unreachable_org_repo_exits_1_and_leaves_neither_a_mirror_nor_its_lock(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(
        f'repo_url_template = "http://127.0.0.1:{port}/{{org}}/{{repo}}.git"\n', encoding="utf-8"
    )

    code, err = run(dry_dispatch("acme/widgets"), capsys)

    assert code == 1 and "cannot clone" in err, err
    assert left_behind(isolated_home) == []


@needs_root("giving a repository to another uid needs root")
def test_a_repository_another_user_owns_exits_2_saying_what_git_said_and_what_to_do(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = repo_with_commits(tmp_path)
    subprocess.run(["chown", "-R", f"{OTHER_UID}:{OTHER_UID}", str(repo)], check=True)

    code, err = run(dry_dispatch(str(repo)), capsys)

    assert code == 2, err
    assert "dubious ownership" in err and "safe.directory" in err and "chown" in err, err
    assert left_behind(isolated_home) == []


# ---------------------------------------------------------------------------------------------
# #14: each argument checked once, at the boundary, before anything happens


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["dispatch", "/r", "t", "--wait", "-1"], "--wait"),
        (["dispatch", "/r", "t", "--wait", "nan"], "--wait"),
        (["dispatch", "/r", "t", "--timeout", "0"], "--timeout"),
        (["dispatch", "/r", "t", "--timeout", "-5"], "--timeout"),
        (["dispatch", "/r", "t", "--issue", "0"], "--issue"),
        (["dispatch", "/r", "t", "--pr", "-2"], "--pr"),
        (["sync", "--wait", "-1"], "--wait"),
        (["status", "--limit", "0"], "--limit"),
        (["status", "--log-lines", "-1"], "--log-lines"),
    ],
)
def test_a_bad_number_is_refused_before_anything_is_dispatched_or_written(
    isolated_home: Path, capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    code, err = run(argv, capsys)

    assert code == 2, err
    assert option in err, err
    assert not isolated_home.exists()  # no dispatcher was made: nothing was read, written or started


def test_a_task_on_stdin_that_is_not_utf8_exits_2_naming_the_task(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = str(repo_with_commits(tmp_path))
    stdin = io.TextIOWrapper(io.BytesIO(b"fix the \xff\xfe bug\n"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)

    code, err = run(["dispatch", repo, "-", "--agent", "shell", "--dry-run"], capsys)

    assert code == 2 and "task" in err and "UTF-8" in err, err
    assert left_behind(isolated_home) == []


@pytest.mark.parametrize(
    ("args", "name"),
    [(["echo \udcff"], "task"), (["echo hi", "--var", "a=\udcff"], "--var"), (["echo hi", "--tag", "\udcff"], "--tag")],
)
def test_an_argument_that_is_not_utf8_exits_2_naming_it(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str], args: list[str], name: str
) -> None:
    # Python hands bytes that are not UTF-8 in argv over as lone surrogates ('\udcff' for 0xff).
    repo = str(repo_with_commits(tmp_path))

    code, err = run(["dispatch", repo, *args, "--agent", "shell", "--dry-run"], capsys)

    assert code == 2 and name in err and "UTF-8" in err, err
    assert left_behind(isolated_home) == []


# ---------------------------------------------------------------------------------------------
# #13 and #16: configuration that cannot be used


def test_a_home_that_is_a_file_exits_2_with_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "a-file"
    home.write_text("", encoding="utf-8")
    monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home))

    code, err = run(dry_dispatch(str(repo_with_commits(tmp_path))), capsys)

    assert code == 2 and err.startswith("configuration error") and "AGENTIC_DISPATCH_HOME" in err, err


@pytest.mark.parametrize(
    "command",
    [["status"], ["clean", "--dry-run"], ["doctor"], ["image", "tag"], ["dispatch"]],
    ids=lambda c: c[0],
)
def test_a_config_path_that_names_no_file_exits_2_naming_it_and_reads_no_defaults(
    command: list[str], tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a misspelt --config silently meant the defaults, with whatever root and agents they give."""
    missing = tmp_path / "confg.toml"
    argv = dry_dispatch(str(repo_with_commits(tmp_path))) if command[0] == "dispatch" else command

    code, err = run(["--config", str(missing), *argv], capsys)

    assert code == 2, err
    assert f"--config: '{missing}': there is no file there" in err and "leave --config out" in err, err
    assert not isolated_home.exists(), "nothing was read or made under the state root"


def test_a_config_variable_that_names_no_file_exits_2_naming_it(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("AGENTIC_DISPATCH_CONFIG", str(missing))

    code, err = run(["status"], capsys)

    assert code == 2 and err.startswith("configuration error") and f"{missing}: there is no file there" in err, err
    assert "AGENTIC_DISPATCH_CONFIG" in err and not isolated_home.exists(), err


def test_serve_with_a_config_path_that_names_no_file_exits_2_before_it_answers_anything(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", "--config", str(missing), "serve"],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", err
    assert str(missing) in err and "there is no file there" in err and "Traceback" not in err, err


def test_a_config_file_that_is_a_fifo_exits_2_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    argv = ["--config", str(fifo), *dry_dispatch(str(repo_with_commits(tmp_path)))]
    codes: list[int] = []
    done = threading.Event()

    def main() -> None:
        try:
            codes.append(cli.main(argv))
        finally:
            done.set()

    threading.Thread(target=main, daemon=True).start()
    finished = done.wait(WAIT)
    if not finished:  # unblock the reader so the thread ends
        with open(fifo, "w", encoding="utf-8") as writer:
            writer.write("")
        done.wait(WAIT)
    err = capsys.readouterr().err
    assert finished, "reading a FIFO as the config file blocked"
    assert codes == [2] and str(fifo) in err and "not a regular file" in err, err


def test_a_pool_limit_of_zero_exits_2_naming_the_file_and_the_key(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    isolated_home.mkdir()
    cfg = isolated_home / "config.toml"
    cfg.write_text("[limits]\npools = { shell = 0 }\n", encoding="utf-8")

    code, err = run(dry_dispatch(str(repo_with_commits(tmp_path))), capsys)

    assert code == 2 and f"{cfg}: limits.pools.shell" in err, err


# ---------------------------------------------------------------------------------------------
# #12: an index that cannot be opened


@pytest.mark.docker
def test_status_with_a_folder_in_place_of_the_index_sets_it_aside_and_answers(
    docker_env: str, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["status"], capsys)[0] == 0
    index = isolated_home / "state" / "index.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    (index / "inside").mkdir(parents=True)

    code, err = run(["status", "--json"], capsys)

    assert code == 0, err
    assert index.is_file() and (isolated_home / "state" / "index.sqlite.broken" / "inside").is_dir()
