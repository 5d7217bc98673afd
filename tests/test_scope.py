"""A dispatch's scope: the paths a run's branch changed outside its globs are listed on its status row,
and with ``scope_mode = "fail"`` a run that would complete fails, naming them. The matcher and the
server-side read of a branch's changes are tested without the engine; the runs with real containers
and the `shell` agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import ConfigError
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.scope import changed_paths, outside
from agentic_dispatch.service import Dispatcher

from .conftest import git

COMMIT_IN_AND_OUT = (
    "mkdir -p src && echo 'x = 1' > src/app.py && echo 'changed' >> README.md && git add -A && git commit -qm 'work'"
)


def test_globs_are_gits_wildmatch_anchored_at_the_root() -> None:
    paths = ["src/a.py", "src/deep/b.py", "srcx/c.py", "README.md", "docs/x.md", "tests/t.py", "src/gen/g.py"]
    assert outside(paths, ["src/**", "tests/**"]) == ["README.md", "docs/x.md", "srcx/c.py"]
    assert outside(paths, ["*.md"]) == sorted(set(paths) - {"README.md"}), "*.md is the root's only"
    assert outside(paths, ["**/*.md", "src"]) == ["srcx/c.py", "tests/t.py"], "a folder covers what it holds"
    assert outside(paths, ["src/**", "!src/gen/**"]) == sorted(set(paths) - {"src/a.py", "src/deep/b.py"})
    assert outside(["src/a.py", "src/a.py"], ["docs/**"]) == ["src/a.py"], "each path once"


def test_a_rename_counts_as_both_its_paths_and_git_never_runs_in_the_clone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "u@example.com")
    git(repo, "config", "user.name", "U")
    (repo / "old.txt").write_text("a body long enough to be seen as the same file\n" * 5, encoding="utf-8")
    (repo / "keep.txt").write_text("keep\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "mv", "old.txt", "src-new.txt")
    (repo / "added.txt").write_text("new\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "work")
    # A hook or fsmonitor the clone's config names would run if git ran there: none may.
    git(repo, "config", "core.fsmonitor", f"touch {tmp_path / 'ran'}; false")
    changed = changed_paths(repo, base, "main", tmp_path / "shims")
    assert sorted(changed) == ["added.txt", "old.txt", "src-new.txt"]
    assert outside(changed, ["src-*"]) == ["added.txt", "old.txt"]
    assert not (tmp_path / "ran").exists()
    assert list((tmp_path / "shims").iterdir()) == [], "the shim is gone"


def test_a_run_that_commits_outside_its_scope_is_listed_and_still_completes_by_default(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    req = DispatchRequest(repo=str(user_repo), task=COMMIT_IN_AND_OUT, agent="shell", scope=["src/**", "tests/**"])
    name = dispatcher.dispatch(req).workspace
    rec = dispatcher.wait(name, 60)
    assert rec.status == Status.COMPLETED, rec
    row = dispatcher.status(name).workspaces[0]
    assert row.out_of_scope is not None
    assert (row.out_of_scope.paths, row.out_of_scope.count) == (["README.md"], 1)


def test_a_run_with_scope_mode_fail_that_commits_outside_its_scope_fails_naming_the_path(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    req = DispatchRequest(
        repo=str(user_repo), task=COMMIT_IN_AND_OUT, agent="shell", scope=["src/**"], scope_mode="fail"
    )
    name = dispatcher.dispatch(req).workspace
    rec = dispatcher.wait(name, 60)
    assert rec.status == Status.FAILED, rec
    assert rec.reason is not None and "outside the dispatch's scope: README.md" in rec.reason
    row = dispatcher.status(name).workspaces[0]
    assert row.out_of_scope is not None and row.out_of_scope.paths == ["README.md"]


def test_a_run_with_scope_mode_fail_that_stays_inside_its_scope_completes(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    req = DispatchRequest(
        repo=str(user_repo), task=COMMIT_IN_AND_OUT, agent="shell", scope=["src/**", "*.md"], scope_mode="fail"
    )
    name = dispatcher.dispatch(req).workspace
    rec = dispatcher.wait(name, 60)
    assert rec.status == Status.COMPLETED, rec
    assert rec.out_of_scope is not None and rec.out_of_scope.count == 0


def test_uncommitted_work_a_stopped_run_left_outside_its_scope_is_listed_from_its_checkpoint(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    task = "mkdir -p src && echo 1 > src/ok.py && echo 2 > notes.txt && sleep 120"
    req = DispatchRequest(repo=str(user_repo), task=task, agent="shell", scope=["src/**"], timeout_seconds=3)
    name = dispatcher.dispatch(req).workspace
    rec = dispatcher.wait(name, 60)
    assert rec.status == Status.FAILED and rec.checkpoint is not None, rec
    assert rec.out_of_scope is not None and rec.out_of_scope.paths == ["notes.txt"]


DEFAULTS = '[defaults]\nscope = ["src/**"]\nscope_mode = "fail"\n'


@pytest.fixture
def with_defaults(isolated_home: Path, docker_env: str, docker_client: docker.DockerClient) -> Iterator[Dispatcher]:
    """A service whose config gives dispatches a default scope and mode."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(DEFAULTS, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def test_a_dispatch_that_gives_no_scope_gets_the_configs_default_scope_and_mode(
    with_defaults: Dispatcher, user_repo: Path
) -> None:
    name = with_defaults.dispatch(DispatchRequest(repo=str(user_repo), task=COMMIT_IN_AND_OUT, agent="shell")).workspace
    rec = with_defaults.wait(name, 60)
    assert (rec.scope, rec.scope_mode) == (["src/**"], "fail")
    assert rec.status == Status.FAILED and rec.reason is not None and "scope: README.md" in rec.reason, rec


def test_a_dispatchs_own_scope_and_mode_replace_the_configs_defaults(
    with_defaults: Dispatcher, user_repo: Path
) -> None:
    req = DispatchRequest(repo=str(user_repo), task=COMMIT_IN_AND_OUT, agent="shell", scope=["*.md"], scope_mode="warn")
    rec = with_defaults.wait(with_defaults.dispatch(req).workspace, 60)
    assert (rec.scope, rec.scope_mode) == (["*.md"], "warn")
    assert rec.status == Status.COMPLETED and rec.out_of_scope is not None, rec
    assert rec.out_of_scope.paths == ["src/app.py"]


def test_a_default_scope_glob_a_dispatch_would_refuse_is_a_config_error_naming_the_file(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    cfg = isolated_home / "config.toml"
    cfg.write_text('[defaults]\nscope = ["src/**", "../secrets/**"]\nscope_mode = "strict"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(cfg)) for line in lines), lines
    assert "defaults.scope" in lines[0] and "no leading '/', no '..'" in lines[0], lines
    assert "defaults.scope_mode" in lines[1], lines
