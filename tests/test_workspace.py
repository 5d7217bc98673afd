"""Repository resolution, the mirror cache and workspace preparation, with real git."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import InvalidInputError, RepoError
from agentic_dispatch.mirrors import MirrorCache
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.repos import resolve_repo
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.workspace import clone_workspace

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


# -- the mirror and the workspaces share no writable file ------------------------------------
def _objects(repo_git_dir: Path) -> list[Path]:
    return sorted(p for p in (repo_git_dir / "objects").rglob("*") if p.is_file())


def _spoil(files: list[Path]) -> None:
    """What a hostile agent (running as the host user) can do to object files: make them writable and
    overwrite them in place, so the write lands in every hardlink of the same inode."""
    for f in files:
        f.chmod(0o644)
        with f.open("r+b") as out:  # same inode; os.replace would make a new one and prove nothing
            out.write(b"garbage " * 64)
            out.truncate()


def _with_loose_objects(mirror: Path, source: Path) -> None:
    """Make ``mirror`` again as a plain ``git clone --mirror`` of the local ``source``: with its loose
    objects loose (mirrors pack them now; git reads a spoiled loose object and fails, where it passes
    over a pack spoiled whole and fetches its objects again)."""
    shutil.rmtree(mirror)
    git(mirror.parent, "clone", "-q", "--mirror", "--no-hardlinks", str(source), str(mirror))
    assert any(len(f.parent.name) == 2 for f in _objects(mirror))


def _fsck_clean(repo: Path) -> bool:
    return subprocess.run(["git", "fsck", "--full", "--no-dangling"], cwd=repo, capture_output=True).returncode == 0


@pytest.fixture
def packed_and_loose_repo(user_repo: Path) -> Path:
    """The user's repository with both a pack and loose objects (its mirror packs the loose ones)."""
    git(user_repo, "repack", "-adq")
    for i in range(3):
        (user_repo / f"later{i}.txt").write_text(f"later {i}\n", encoding="utf-8")
        git(user_repo, "add", ".")
        git(user_repo, "commit", "-q", "-m", f"later {i}")
    return user_repo


def test_an_agent_that_overwrites_every_object_file_of_its_clone_leaves_the_mirror_and_later_clones_sound(
    tmp_path: Path, packed_and_loose_repo: Path
) -> None:
    ref = resolve_repo(str(packed_and_loose_repo), None, TEMPLATE)
    mirrors = MirrorCache(tmp_path / "mirrors", 3600)
    mirror = mirrors.ensure(ref)
    first = tmp_path / "ws1"
    clone_workspace(mirror, first, ref.fetch_url, None, "one")
    objects = _objects(first / ".git")
    assert any("pack" in f.name for f in objects)
    assert not any(len(f.parent.name) == 2 for f in _objects(mirror)), "the mirror left objects loose"

    _spoil(objects)
    assert not _fsck_clean(first), "the simulated agent must really have spoiled its own clone"

    assert _fsck_clean(mirror), "an agent's writes to its own clone reached the shared mirror"
    second = tmp_path / "ws2"
    branch, base = clone_workspace(mirrors.ensure(ref), second, ref.fetch_url, None, "two")
    assert (branch, base) == ("agent/two", "main")
    assert _fsck_clean(second)
    assert git(second, "rev-parse", "HEAD") == git(packed_and_loose_repo, "rev-parse", "main")


def test_a_workspace_clone_shares_no_object_file_with_the_mirror(tmp_path: Path, packed_and_loose_repo: Path) -> None:
    def inodes(files: list[Path]) -> set[tuple[int, int]]:
        return {(st.st_dev, st.st_ino) for st in (os.lstat(f) for f in files)}

    ref = resolve_repo(str(packed_and_loose_repo), None, TEMPLATE)
    mirror = MirrorCache(tmp_path / "mirrors", 3600).ensure(ref)
    ws = tmp_path / "ws"
    clone_workspace(mirror, ws, ref.fetch_url, None, "task")
    mine, theirs = _objects(ws / ".git"), _objects(mirror)
    assert mine and theirs
    assert not inodes(mine) & inodes(theirs), "the workspace hardlinks the mirror's object files"


def test_a_mirror_spoiled_before_this_fix_is_rebuilt_by_the_next_dispatch_which_then_succeeds(
    isolated_home: Path, packed_and_loose_repo: Path
) -> None:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    svc.dispatch(DispatchRequest(repo=str(packed_and_loose_repo), task="first", agent="shell", dry_run=True))
    (mirror,) = paths.mirrors.glob("*.git")
    _with_loose_objects(mirror, packed_and_loose_repo)  # as mirrors were made then
    _spoil(_objects(mirror))  # as an agent could, through hardlinks, before workspaces had their own copies
    assert not _fsck_clean(mirror)

    res = svc.dispatch(DispatchRequest(repo=str(packed_and_loose_repo), task="second", agent="shell", dry_run=True))
    assert res.dry_run and "later 2" in (res.prompt or "")
    assert _fsck_clean(mirror), "the damaged mirror was left in place"
    assert not list(paths.mirrors.glob("*.partial")) and not list(paths.mirrors.glob("*.old"))


def test_a_damaged_mirror_found_by_the_workspace_clone_is_rebuilt_from_its_remote_and_the_clone_retried(
    tmp_path: Path, packed_and_loose_repo: Path
) -> None:
    ref = resolve_repo(f"file://{packed_and_loose_repo}", None, TEMPLATE)
    mirrors = MirrorCache(tmp_path / "mirrors", 3600)  # fresh for an hour: ensure does not fetch, the clone finds it
    mirror = mirrors.ensure(ref)
    _spoil(_objects(mirror))
    assert mirrors.ensure(ref) == mirror and mirrors.fetches == 1

    ws = tmp_path / "ws"
    branch, base = clone_workspace(mirror, ws, ref.fetch_url, None, "task")
    assert (branch, base) == ("agent/task", "main")
    assert _fsck_clean(ws) and _fsck_clean(mirror)
    assert git(ws, "rev-parse", "HEAD") == git(packed_and_loose_repo, "rev-parse", "main")


def test_a_fetch_that_trips_on_the_mirrors_own_objects_rebuilds_the_mirror(
    tmp_path: Path, packed_and_loose_repo: Path
) -> None:
    ref = resolve_repo(str(packed_and_loose_repo), None, TEMPLATE)
    mirrors = MirrorCache(tmp_path / "mirrors", 3600)
    mirror = mirrors.ensure(ref)
    _with_loose_objects(mirror, packed_and_loose_repo)
    _spoil(_objects(mirror))
    (packed_and_loose_repo / "new.txt").write_text("new\n", encoding="utf-8")
    git(packed_and_loose_repo, "add", ".")
    git(packed_and_loose_repo, "commit", "-q", "-m", "new work")

    assert mirrors.ensure(ref) == mirror  # a local repository is fetched at every ensure
    assert mirrors.fetches == 3, "expected the clone, the failed fetch, and the rebuild"
    assert _fsck_clean(mirror)
    assert git(mirror, "rev-parse", "main") == git(packed_and_loose_repo, "rev-parse", "main")


def test_a_damaged_mirror_whose_remote_is_gone_is_a_repo_error_and_stays_for_a_later_try(
    tmp_path: Path, packed_and_loose_repo: Path
) -> None:
    ref = resolve_repo(f"file://{packed_and_loose_repo}", None, TEMPLATE)
    mirror = MirrorCache(tmp_path / "mirrors", 3600).ensure(ref)
    _spoil(_objects(mirror))
    shutil.rmtree(packed_and_loose_repo)

    with pytest.raises(RepoError, match=r"is damaged .* rebuilding it from file://.* failed"):
        clone_workspace(mirror, tmp_path / "ws", ref.fetch_url, None, "task")
    assert mirror.is_dir() and not (tmp_path / "ws").exists()
    assert not list(mirror.parent.glob("*.partial"))


def _age(stamp: Path, seconds: float) -> None:
    """Move the mirror's last-fetch time ``seconds`` further into the past (as if that much time passed)."""
    then = stamp.stat().st_mtime - seconds
    os.utime(stamp, (then, then))


def test_a_mirror_in_constant_use_is_still_fetched_once_its_last_fetch_is_older_than_its_max_age(
    tmp_path: Path, user_repo: Path
) -> None:
    ref = resolve_repo(f"file://{user_repo}", None, "https://git.example/{org}/{repo}.git")
    mirrors = MirrorCache(tmp_path / "mirrors", 60)
    stamp = mirrors.ensure(ref) / "agentic-fetched-at"  # cloned: fetched now
    _age(stamp, 50)
    mirrors.ensure(ref)  # fetched 50 s ago: fresh, reused as it is
    assert mirrors.fetches == 1
    _age(stamp, 20)  # 70 s since the last fetch; a reuse in between is not a fetch
    mirrors.ensure(ref)
    assert mirrors.fetches == 2


def test_concurrent_dispatches_of_one_local_repository_share_the_fetch_made_while_they_waited(
    tmp_path: Path, user_repo: Path
) -> None:
    """A local repository is fetched at every dispatch; dispatches that wait for the mirror's lock
    while one fetches take that fetch (it is newer than their request) instead of each making one."""
    ref = resolve_repo(str(user_repo), None, "https://git.example/{org}/{repo}.git")
    mirrors = MirrorCache(tmp_path / "mirrors", 60)
    mirrors.ensure(ref)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: mirrors.ensure(ref), range(8)))
    shared = mirrors.fetches
    assert 2 <= shared <= 4, shared  # the clone, then a fetch or a few for eight requests, not eight
    mirrors.ensure(ref)
    assert mirrors.fetches == shared + 1, "a dispatch after them fetches again: users expect their latest commit"


@pytest.mark.parametrize("configured", [True, False], ids=["user-identity", "none-configured"])
def test_a_workspace_commits_as_the_user_git_knows_never_as_a_repository_above_it(
    tmp_path: Path, user_repo: Path, monkeypatch: pytest.MonkeyPatch, configured: bool
) -> None:
    """The clone's identity is the user's own config (system and global), else a clear agent identity;
    a repository the workspaces folder happens to lie in (a home kept in git) lends it nothing."""
    home = tmp_path / "git-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    if configured:
        (home / ".gitconfig").write_text("[user]\n\tname = Ada User\n\temail = ada@example.com\n", encoding="utf-8")
    above = tmp_path / "kept-in-git"
    subprocess.run(["git", "init", "-q", str(above)], check=True)
    git(above, "config", "user.name", "Not The User")
    git(above, "config", "user.email", "above@example.com")
    ref = resolve_repo(str(user_repo), None, TEMPLATE)
    mirror = MirrorCache(tmp_path / "mirrors", 3600).ensure(ref)
    ws = above / "workspaces" / "w"
    ws.parent.mkdir()
    clone_workspace(mirror, ws, ref.fetch_url, "feature", "task")
    identity = (git(ws, "config", "--local", "user.name"), git(ws, "config", "--local", "user.email"))
    expected = (
        ("Ada User", "ada@example.com") if configured else ("agentic-dispatch agent", "agent@agentic-dispatch.invalid")
    )
    assert identity == expected
    assert git(ws, "rev-parse", "--abbrev-ref", "HEAD") == "agent/task"
    assert git(ws, "rev-parse", "HEAD") == git(user_repo, "rev-parse", "feature")
