"""Repository resolution, the mirror cache and workspace preparation, with real git."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import InvalidInputError, RepoError
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.workspace import resolve_repo

from .conftest import git

TEMPLATE = "https://git.example/{org}/{repo}.git"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def git_daemon(tmp_path: Path, user_repo: Path) -> Iterator[tuple[str, Path]]:
    """A real network remote (git daemon) whose log shows every fetch made from it."""
    base = tmp_path / "served"
    base.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(user_repo), str(base / "proj.git"))
    port = _free_port()
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "git",
                "daemon",
                "--verbose",
                "--export-all",
                "--reuseaddr",
                f"--base-path={base}",
                "--listen=127.0.0.1",
                f"--port={port}",
                str(base),
            ],
            stderr=out,
        )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "git daemon did not start"
            time.sleep(0.05)
    yield f"git://127.0.0.1:{port}/proj.git", log
    proc.terminate()
    proc.wait(5)


def test_two_dispatches_on_one_remote_fetch_it_once_and_clone_the_second_from_the_mirror(
    docker_env: str, git_daemon: tuple[str, Path]
) -> None:
    url, log = git_daemon
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    first = svc.dispatch(DispatchRequest(repo=url, task="true", agent="shell", dry_run=True))
    second = svc.dispatch(DispatchRequest(repo=url, task="echo hi", agent="shell"))
    uploads = [ln for ln in log.read_text().splitlines() if "upload-pack" in ln]
    assert len(uploads) == 1, f"expected one fetch from the remote, the daemon saw: {uploads}"
    assert first.dry_run and second.workspace.startswith("local/proj/")
    repo = Path(second.repo_path)
    assert git(repo, "remote", "get-url", "origin") == url, "origin must point at the real remote"


def test_a_remote_repo_that_does_not_exist_is_a_repo_error_and_leaves_no_mirror(
    isolated_home: Path, git_daemon: tuple[str, Path]
) -> None:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    missing = git_daemon[0].replace("proj.git", "missing.git")
    with pytest.raises(RepoError, match=r"cannot clone .*missing\.git"):
        svc.dispatch(DispatchRequest(repo=missing, task="x", agent="shell", dry_run=True))
    assert not any(paths.mirrors.glob("*.git*"))
    assert not any(paths.workspaces.rglob("*"))


def test_dispatch_from_a_named_branch_starts_the_agent_branch_at_its_tip(isolated_home: Path, user_repo: Path) -> None:
    git(user_repo, "checkout", "-q", "feature")
    (user_repo / "feature.txt").write_text("f\n")
    git(user_repo, "add", ".")
    git(user_repo, "commit", "-q", "-m", "feature work")
    git(user_repo, "checkout", "-q", "main")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    res = svc.dispatch(
        DispatchRequest(repo=str(user_repo), task="fix it", agent="shell", branch="feature", dry_run=True)
    )
    assert res.workspace == "local/user-repo/feature"
    assert "feature" in res.prompt and "feature work" in (res.prompt or "")


@pytest.mark.parametrize(
    ("given", "org", "name", "url"),
    [
        ("acme/widgets", "acme", "widgets", "https://git.example/acme/widgets.git"),
        ("https://github.com/acme/widgets.git", "acme", "widgets", "https://github.com/acme/widgets.git"),
        ("git@github.com:acme/widgets.git", "acme", "widgets", "git@github.com:acme/widgets.git"),
        ("ssh://git@host:2222/team/svc", "team", "svc", "ssh://git@host:2222/team/svc"),
    ],
)
def test_repo_references_resolve_to_org_name_and_fetch_url(given: str, org: str, name: str, url: str) -> None:
    ref = resolve_repo(given, None, TEMPLATE)
    assert (ref.org, ref.name, ref.fetch_url) == (org, name, url)


@pytest.mark.parametrize(
    ("given", "threat"),
    [
        ("--upload-pack=touch /tmp/pwned", "option injection through the repo argument"),
        ("ext::sh -c touch% /tmp/pwned", "remote helper transport running a command"),
        ("../../etc", "relative path traversal"),
        ("acme/../../etc", "traversal through org/repo"),
        ("", "empty value"),
    ],
)
def test_dangerous_repo_references_are_refused(given: str, threat: str) -> None:
    with pytest.raises(InvalidInputError):
        resolve_repo(given, None, TEMPLATE)
