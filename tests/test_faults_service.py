"""Faults a hostile tester found in the service, each reproduced through the service itself: a
dispatch that reports an error must leave nothing that will ever run; the same task to several
agents must not share a branch; an idempotency key names one request."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentic_dispatch.errors import InvalidInputError, StateError
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.service import Dispatcher

from .conftest import git

COMMIT = "echo \"$AGENTIC_WORKSPACE\" > who.txt && git add who.txt && git commit -qm 'agent work'"


def _shell(repo: Path, task: str, **kw: object) -> DispatchRequest:
    return DispatchRequest(repo=str(repo), task=task, agent="shell", **kw)  # type: ignore[arg-type]


def test_a_dispatch_whose_event_cannot_be_written_fails_clearly_and_leaves_nothing_that_will_run(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    """Before: the record was written, then the event line failed: the caller saw a bare error while
    the queued record existed and the timer started it; a retry ran it twice."""
    events = dispatcher.store.events.path
    events.parent.mkdir(parents=True, exist_ok=True)
    events.mkdir()  # the events log is a folder: no append can succeed, as root or not
    try:
        with pytest.raises(StateError, match="nothing was kept") as refused:
            dispatcher.dispatch(_shell(user_repo, "true", issue=7))
        assert "dispatch again" in str(refused.value)
        name = "local/user-repo/task-7"
        assert not dispatcher.store.paths(name).dir.exists(), "no folder is left to be started"
        assert dispatcher.status().counts.get("queued", 0) == 0
        dispatcher.reconcile()  # the timer finds nothing to start
        assert dispatcher.status().counts.get("running", 0) == 0
    finally:
        events.rmdir()
    again = dispatcher.dispatch(_shell(user_repo, "true", issue=7))  # the name is free: the retry is one run
    assert again.workspace == "local/user-repo/task-7"
    assert dispatcher.wait(again.workspace, 60).status == Status.COMPLETED


def test_the_same_task_to_three_agents_gets_three_branches_and_each_is_delivered_without_force(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    """Before: best-of-N gave three workspaces on one ``agent/<slug>``; the second delivery needed
    attention, and the advised force replaced the first agent's delivered branch."""
    names = [dispatcher.dispatch(_shell(user_repo, COMMIT)).workspace for _ in range(3)]
    branches = {n: dispatcher.store.read(n).branch for n in names}
    assert len(set(branches.values())) == 3, branches
    for name in names:
        assert dispatcher.wait(name, 60).status == Status.COMPLETED
    report = dispatcher.sync()
    assert sorted(report.delivered) == sorted(names), report.message
    assert report.attention == []
    for name, branch in branches.items():
        shown = git(user_repo, "show", f"refs/heads/{branch}:who.txt").strip()
        assert shown == name, "each branch holds its own agent's work"


def test_a_branch_the_user_already_has_is_not_reused_for_a_new_workspace(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    first = dispatcher.dispatch(_shell(user_repo, "true", issue=3))
    taken = dispatcher.store.read(first.workspace).branch
    assert dispatcher.wait(first.workspace, 60).status == Status.COMPLETED
    git(user_repo, "branch", taken.replace("task-3", "task-4"), "main")  # the user made one of the next name
    second = dispatcher.dispatch(_shell(user_repo, "true", issue=4))
    branch = dispatcher.store.read(second.workspace).branch
    assert branch != taken.replace("task-3", "task-4") and branch.startswith("agent/task-4-"), branch


def test_an_idempotency_key_reused_for_other_work_is_refused_naming_what_differs(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    first = dispatcher.dispatch(_shell(user_repo, "true", idempotency_key="job-1"))
    same = dispatcher.dispatch(_shell(user_repo, "true", idempotency_key="job-1"))
    assert same.workspace == first.workspace
    with pytest.raises(InvalidInputError, match=r"idempotency_key.*another task") as refused:
        dispatcher.dispatch(_shell(user_repo, "echo other", idempotency_key="job-1"))
    assert first.workspace in str(refused.value) and "new key" in str(refused.value)
    assert len([i for i in dispatcher.store.list() if i.record]) == 1, "nothing new was made"


def test_a_force_never_overwrites_a_branch_delivered_for_another_workspace(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    """Workspaces made before branches were unique per workspace can share one; the force the
    attention advised replaced the first agent's delivered branch, leaving its commit on no branch."""
    first, second = (dispatcher.dispatch(_shell(user_repo, COMMIT)).workspace for _ in range(2))
    for name in (first, second):
        assert dispatcher.wait(name, 60).status == Status.COMPLETED
    shared = dispatcher.store.read(first).branch
    assert dispatcher.sync(first).delivered == [first]
    delivered = git(user_repo, "rev-parse", f"refs/heads/{shared}")
    clone = dispatcher.store.paths(second).repo  # as an older server named it: the same branch
    git(clone, "-c", f"safe.directory={clone}", "branch", "-m", dispatcher.store.read(second).branch, shared)
    dispatcher.store.update(second, lambda r: setattr(r, "branch", shared))

    attention = dispatcher.sync(second)
    assert attention.attention == [second], attention.message
    with pytest.raises(StateError, match=rf"holds the delivery of {first}"):
        dispatcher.sync(second, force=True)
    assert git(user_repo, "rev-parse", f"refs/heads/{shared}") == delivered
