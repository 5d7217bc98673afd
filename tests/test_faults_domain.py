"""Faults a hostile tester found in the domain layer, each driven through the domain functions
with real git and real files: a ref lock in the user's repository, a repository another user owns,
an index path taken by something that is not a database, config paths that are not files, a pool
limit of 0, and refused dispatches that used to leave mirrors and locks behind."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from agentic_dispatch.config import SyncSettings, load_settings
from agentic_dispatch.errors import ConfigError, InvalidInputError, RepoError
from agentic_dispatch.mirrors import MirrorCache
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.repos import resolve_repo
from agentic_dispatch.store import StatusStore
from agentic_dispatch.sync import GitDeliverer, Outbox, OutboxEntry, Outcome, entry_id

from .conftest import empty_git_home, needs_root

WS = "org/proj/task-1"
BRANCH = "agent/task-1"
TEMPLATE = "https://git.example/{org}/{repo}.git"
OTHER_UID = 12345  # a user that is not the one the tests run as
WAIT = 20.0  # upper bound of a wait on another thread
ROOT_ONLY = needs_root("giving a repository to another uid needs root")


@pytest.fixture(autouse=True)
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty git home (no global or system config, so no safe.directory = *) and a fixed identity."""
    return empty_git_home(tmp_path, monkeypatch)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(f"{name}\n", encoding="utf-8")
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


def user_repo(tmp_path: Path, commits: bool = True) -> Path:
    repo = tmp_path / "user-repo"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    if commits:
        commit(repo, "README.md")
        git(repo, "branch", "feature")
    return repo


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# #10 a ref lock in the user's repository during a local delivery


def _record(repo: Path) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=WS,
        status=Status.COMPLETED,
        agent="shell",
        repo=str(repo),
        org="org",
        repo_name="proj",
        origin_url=str(repo),
        task="do the work",
        branch=BRANCH,
        base_branch="main",
        template="coding",
        timeout_seconds=60,
        runs=1,
        exit_code=0,
    )


def test_a_ref_lock_in_the_local_repository_is_retried_and_its_reason_names_the_lock_file(tmp_path: Path) -> None:
    repo = user_repo(tmp_path)
    clone = tmp_path / "workspace" / "repo"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", "-b", BRANCH)
    tip = commit(clone, "work.txt")
    lock = repo / ".git" / "refs" / "heads" / "agent" / "task-1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("", encoding="utf-8")  # another git process is updating that ref right now
    deliverer = GitDeliverer(tmp_path / "state")
    rec = _record(repo)

    def deliver(entry: OutboxEntry) -> Outcome:
        return deliverer.deliver(rec, clone, force=entry.force)

    box = Outbox(tmp_path / "state", SyncSettings(backoff_seconds=(1.0,)))
    box.enqueue(WS, 1, "git", now=0.0)
    locked = box.flush(deliver, now=0.0)

    (entry,) = box.entries()
    assert locked.attention == [] and entry.state == "pending", entry
    assert str(lock) in (entry.last_error or ""), entry.last_error
    lock.unlink()  # the other process is done
    assert box.flush(deliver, now=1e9).delivered == [entry_id(WS, 1, "git")]
    assert git(repo, "rev-parse", f"refs/heads/{BRANCH}") == tip


# ---------------------------------------------------------------------------------------------
# #11 a local repository another user owns


@ROOT_ONLY
def test_a_repository_another_user_owns_is_refused_with_gits_reason_and_how_to_trust_it(
    tmp_path: Path, isolated_home: Path, git_home: Path
) -> None:
    repo = user_repo(tmp_path)
    subprocess.run(["chown", "-R", f"{OTHER_UID}:{OTHER_UID}", str(repo)], check=True)
    ref = resolve_repo(str(repo), None, TEMPLATE)
    mirrors = isolated_home / "mirrors"

    with pytest.raises(InvalidInputError) as info:
        MirrorCache(mirrors, 60).ensure(ref)

    text = str(info.value)
    assert "dubious ownership" in text and f"git config --global --add safe.directory {repo}/.git" in text
    assert "chown" in text and "and the repository exists" not in text
    assert files_under(mirrors) == []
    git(tmp_path, "config", "--global", "--add", "safe.directory", f"{repo}/.git")  # what the message says
    assert MirrorCache(mirrors, 60).ensure(ref).is_dir()


@ROOT_ONLY
def test_a_delivery_into_a_repository_another_user_owns_needs_attention_and_says_how_to_trust_it(
    tmp_path: Path,
) -> None:
    repo = user_repo(tmp_path)
    clone = tmp_path / "workspace" / "repo"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", "-b", BRANCH)
    commit(clone, "work.txt")
    subprocess.run(["chown", "-R", f"{OTHER_UID}:{OTHER_UID}", str(repo)], check=True)

    outcome = GitDeliverer(tmp_path / "state").deliver(_record(repo), clone)

    assert outcome.kind == "permanent", outcome
    assert "dubious ownership" in outcome.reason and f"safe.directory {repo}/.git" in outcome.reason
    assert "safe.directory" in (outcome.what_to_do or "")


# ---------------------------------------------------------------------------------------------
# #12 an index path taken by something that is not a database


def _index_record(i: int) -> WorkspaceRecord:
    return _record(Path("/nowhere")).model_copy(update={"name": f"org/proj/w-{i}", "branch": f"agent/w-{i}"})


def _folder(path: Path) -> None:
    (path / "inside").mkdir(parents=True)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link_to_folder(path: Path) -> None:
    target = path.parent / "elsewhere"
    target.mkdir()
    path.symlink_to(target)


@pytest.mark.parametrize("spoil", [_folder, _fifo, _link_to_folder], ids=["folder", "fifo", "link-to-folder"])
def test_anything_at_the_index_path_that_is_not_a_database_is_set_aside_and_the_index_rebuilt(
    tmp_path: Path, spoil: object
) -> None:
    workspaces, events = tmp_path / "root" / "workspaces", tmp_path / "root" / "events"
    index_file = tmp_path / "root" / "state" / "index.sqlite"
    store = StatusStore(workspaces, events, index_file)
    for i in range(3):  # records as any writer leaves them; the index learns of them by looking
        record = _index_record(i)
        store.paths(record.name).status.parent.mkdir(parents=True)
        store.paths(record.name).status.write_text(record.model_dump_json(), encoding="utf-8")
    store.catch_up()
    index = store.index.path
    for round_ in range(2):  # the second time, an older set-aside copy is in the way
        for suffix in ("", "-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        assert callable(spoil)
        spoil(index) if round_ == 0 else _folder(index)
        fresh = StatusStore(workspaces, events, index_file)  # a new server: no connection open yet

        fresh.catch_up()

        assert fresh.counts() == {"completed": 3}
        assert stat.S_ISREG(os.lstat(index).st_mode)
        assert os.path.lexists(f"{index}.broken")


# ---------------------------------------------------------------------------------------------
# #13 config paths that are not what they should be


def test_a_home_that_is_a_file_is_a_config_error_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "a-file"
    home.write_text("not a folder\n", encoding="utf-8")
    monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home))

    with pytest.raises(ConfigError, match=r"AGENTIC_DISPATCH_HOME.*not a folder"):
        load_settings()


def test_a_state_folder_that_cannot_be_made_is_a_config_error_naming_it(isolated_home: Path) -> None:
    isolated_home.mkdir()
    (isolated_home / "state").write_text("in the way\n", encoding="utf-8")
    _, paths = load_settings()

    with pytest.raises(ConfigError, match=r"state"):
        paths.ensure()


def test_a_config_file_that_is_a_fifo_is_refused_at_once_and_never_read(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def load() -> None:
        try:
            load_settings(fifo)
            outcome.append(None)
        except BaseException as e:  # the outcome is the test's to judge
            outcome.append(e)
        done.set()

    threading.Thread(target=load, daemon=True).start()
    finished = done.wait(WAIT)
    if not finished:  # unblock the reader so the thread ends
        with open(fifo, "w", encoding="utf-8") as writer:
            writer.write("")
    assert finished, "reading a FIFO as the config file blocked"
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0]), outcome
    assert str(fifo) in str(outcome[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.mkdir(),
        lambda p: p.write_bytes(b'default_agent = "\xff"\n'),
        lambda p: p.write_bytes(b"# " + b"x" * (2 << 20) + b"\n"),
    ],
    ids=["folder", "not-utf8", "too-big"],
)
def test_a_config_file_that_cannot_be_read_as_toml_text_is_a_config_error_naming_it(
    tmp_path: Path, make: object
) -> None:
    cfg = tmp_path / "config.toml"
    assert callable(make)
    make(cfg)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(info.value).startswith(str(cfg))


def test_a_config_file_reached_through_a_link_is_read(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "agentic.toml"
    real.parent.mkdir()
    real.write_text('default_agent = "shell"\n', encoding="utf-8")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    assert load_settings(link)[0].default_agent == "shell"


# ---------------------------------------------------------------------------------------------
# #16 a pool limit of 0


@pytest.mark.parametrize("table", ["pools = { shell = 0 }", 'models = { "claude:opus" = 0 }'])
def test_a_pool_or_model_limit_of_zero_is_a_config_error_naming_the_file_and_the_key(
    tmp_path: Path, table: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[limits]\n{table}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    (line,) = str(info.value).splitlines()
    key = "limits.pools.shell" if "shell" in table else "limits.models.claude:opus"
    assert line.startswith(f"{cfg}: {key}:") and "1" in line, line


# ---------------------------------------------------------------------------------------------
# #20 a refused dispatch leaves nothing on disk


def _unborn_head(tmp_path: Path) -> Path:
    repo = user_repo(tmp_path)
    git(repo, "checkout", "-q", "--orphan", "fresh")  # HEAD names a branch with no commits yet
    return repo


def test_a_repository_without_commits_is_refused_and_leaves_no_mirror(tmp_path: Path, isolated_home: Path) -> None:
    repo = user_repo(tmp_path, commits=False)
    mirrors = isolated_home / "mirrors"
    with pytest.raises(InvalidInputError, match="no commits"):
        MirrorCache(mirrors, 60).ensure(resolve_repo(str(repo), None, TEMPLATE))
    assert files_under(mirrors) == []


def test_a_head_on_a_branch_without_commits_is_refused_and_leaves_no_mirror(
    tmp_path: Path, isolated_home: Path
) -> None:
    repo = _unborn_head(tmp_path)
    mirrors = isolated_home / "mirrors"
    with pytest.raises(InvalidInputError, match=r"'fresh'.*no commits.*main"):
        MirrorCache(mirrors, 60).ensure(resolve_repo(str(repo), None, TEMPLATE))
    assert files_under(mirrors) == []


def test_an_unknown_branch_is_refused_and_leaves_no_mirror_but_an_older_mirror_stays(
    tmp_path: Path, isolated_home: Path
) -> None:
    ref = resolve_repo(str(user_repo(tmp_path)), None, TEMPLATE)
    mirrors = isolated_home / "mirrors"
    with pytest.raises(InvalidInputError, match=r"'nope' does not exist.*feature, main"):
        MirrorCache(mirrors, 60).ensure(ref, "nope")
    assert files_under(mirrors) == []

    mirror = MirrorCache(mirrors, 60).ensure(ref)  # a good dispatch makes the mirror
    before = (sorted(os.listdir(mirrors)), os.stat(mirror).st_ino)
    with pytest.raises(InvalidInputError, match="'nope' does not exist"):
        MirrorCache(mirrors, 60).ensure(ref, "nope")  # fetched, in case the branch is new, then refused
    assert (sorted(os.listdir(mirrors)), os.stat(mirror).st_ino) == before


def test_an_unreachable_remote_leaves_neither_a_mirror_nor_its_lock(isolated_home: Path) -> None:
    ref = resolve_repo("org/repo", None, f"http://127.0.0.1:{free_port()}/{{org}}/{{repo}}.git")
    mirrors = isolated_home / "mirrors"
    with pytest.raises(RepoError, match="cannot clone"):
        MirrorCache(mirrors, 60).ensure(ref)
    assert files_under(mirrors) == []
