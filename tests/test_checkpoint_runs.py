"""No work is lost on a stop: a run stopped by its timeout, a cancel or `shutdown now` with uncommitted
changes in its work tree ends with them kept as an automatic checkpoint commit on its branch, shown by
status and diff, continued by a resume, and delivered only when asked. Real containers, `shell` agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.service import Dispatcher

from .conftest import git, wait_for

WIP = "echo 'half done' > wip.txt && echo 'changed' >> README.md && touch started && sleep 120"


def _clone_git(svc: Dispatcher, name: str, *args: str) -> str:
    clone = svc.store.paths(name).repo
    return git(clone, "-c", f"safe.directory={clone}", *args)


def _stop_by_timeout(svc: Dispatcher, user_repo: Path) -> str:
    return svc.dispatch(DispatchRequest(repo=str(user_repo), task=WIP, agent="shell", timeout_seconds=3)).workspace


def _stop_by_cancel(svc: Dispatcher, user_repo: Path) -> str:
    name = svc.dispatch(DispatchRequest(repo=str(user_repo), task=WIP, agent="shell")).workspace
    wait_for(lambda: (svc.store.paths(name).repo / "started").exists(), 30, "the agent to start its work")
    svc.cancel(name)
    return name


def _stop_by_shutdown(svc: Dispatcher, user_repo: Path) -> str:
    name = svc.dispatch(DispatchRequest(repo=str(user_repo), task=WIP, agent="shell")).workspace
    wait_for(lambda: (svc.store.paths(name).repo / "started").exists(), 30, "the agent to start its work")
    svc.freeze(now=True)
    svc.unfreeze()
    return name


STOPS: dict[str, tuple[Callable[[Dispatcher, Path], str], Status, str]] = {
    "timeout": (_stop_by_timeout, Status.FAILED, "timed out after 3 s"),
    "cancel": (_stop_by_cancel, Status.CANCELLED, "cancelled while running"),
    "shutdown-now": (_stop_by_shutdown, Status.CANCELLED, "stopped by agentic_dispatch_shutdown(now=true)"),
}


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_stopped_runs_uncommitted_work_is_kept_as_a_checkpoint_commit_saying_why(
    stop: str, dispatcher: Dispatcher, user_repo: Path
) -> None:
    make, status, why = STOPS[stop]
    name = make(dispatcher, user_repo)
    rec = dispatcher.wait(name, 60)
    assert rec.status == status, rec
    assert rec.checkpoint is not None and rec.checkpoint.why == why and rec.checkpoint.files == 3, rec.checkpoint
    tip = _clone_git(dispatcher, name, "rev-parse", rec.branch)
    assert tip == rec.checkpoint.commit
    assert _clone_git(dispatcher, name, "log", "-1", "--format=%s", rec.branch) == (
        f"agentic-dispatch: automatic checkpoint ({why})"
    )
    shown = set(_clone_git(dispatcher, name, "show", "--name-only", "--format=", rec.branch).split())
    assert shown == {"wip.txt", "README.md", "started"}
    assert _clone_git(dispatcher, name, "status", "--porcelain") == "", "the work tree is clean afterwards"
    row = dispatcher.status(name).workspaces[0]
    assert row.checkpoint is not None and row.checkpoint.commit == tip
    diff = dispatcher.diff(name, stat_only=True)
    assert "wip.txt" in diff.stat and diff.checkpoint == rec.checkpoint, diff


def test_a_resume_continues_from_the_checkpoint_and_sync_delivers_one_only_when_asked(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    name = _stop_by_timeout(dispatcher, user_repo)
    rec = dispatcher.wait(name, 60)
    assert rec.status == Status.FAILED and rec.checkpoint is not None
    branch = rec.branch

    held = dispatcher.sync(name)
    assert held.delivered == [] and "checkpoint" in held.message and "include_checkpoints" in held.message
    assert git(user_repo, "branch", "--list", branch) == "", "nothing reached the user's repository"
    asked = dispatcher.sync(name, include_checkpoints=True)
    assert asked.delivered == [name], asked.message
    assert git(user_repo, "rev-parse", f"refs/heads/{branch}") == rec.checkpoint.commit

    dispatcher.resume(name)  # the same task: it stops again, and its branch goes on from the checkpoint
    again = dispatcher.wait(name, 60)
    assert again.runs == 2 and again.checkpoint is not None and again.checkpoint.commit != rec.checkpoint.commit
    ancestor = _clone_git(dispatcher, name, "merge-base", "--is-ancestor", rec.checkpoint.commit, branch)
    assert ancestor == "", "the first checkpoint is an ancestor of the branch after the resumed run"
