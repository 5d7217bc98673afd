"""Pipelines on real containers (the ``shell`` agent): a run that waits for others to complete,
what it says while it waits, cancelling a chain, and a chain kept across a server SIGKILLed."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import docker
import pytest
from rich.console import Console

from agentic_dispatch.cli_views import print_status
from agentic_dispatch.errors import InvalidInputError
from agentic_dispatch.models import RetryPolicy, Status, parse_time
from agentic_dispatch.service import Dispatcher

from .conftest import git, make_user_repo, serve_process, wait_for
from .test_lock_keys import engine_intervals
from .test_scheduler import _cli, new_dispatcher, shell, write_config

pytestmark = pytest.mark.docker

# The agent waits until the test lets it go (a file in its logs folder), then commits one file.
HOLD = "until [ -e /agentic/logs/go ]; do sleep 0.1; done; "
COMMIT = "echo {0} > {0}.txt && git add {0}.txt && git commit -qm 'add {0}'"
# Fails (exit 3) until the test leaves /agentic/logs/ok, then commits.
FAILS_UNTIL_OK = "[ -e /agentic/logs/ok ] || exit 3; " + COMMIT.format("a")


def release(svc: Dispatcher, workspace: str, flag: str = "go") -> None:
    (svc.store.paths(workspace).logs / flag).write_text("", encoding="utf-8")


def table(svc: Dispatcher, workspace: str, chain: bool = False) -> str:
    out = io.StringIO()
    print_status(svc.status(workspace, chain=chain), False, Console(file=out, width=300, highlight=False))
    return out.getvalue()


def test_a_run_that_depends_on_another_waits_queued_naming_it_and_starts_only_after_it_completed(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\n")
    svc = new_dispatcher(docker_client)
    since = int(time.time()) - 1
    try:
        a = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("a")))
        b = svc.dispatch(shell(user_repo, COMMIT.format("b"), depends_on=[a.workspace]))
        assert (a.status, b.status) == ("running", "queued")  # free slots, and still it waits

        row_a, row_b = svc.status(a.workspace).workspaces[0], svc.status(b.workspace).workspaces[0]
        assert row_b.waiting_for == f"{a.workspace} (running) to complete"
        assert row_b.depends_on == [a.workspace] and row_a.dependents == [b.workspace]
        watched = svc.watch([b.workspace], timeout=0).workspaces[0]
        assert watched.waiting_for == row_b.waiting_for and watched.depends_on == [a.workspace]
        assert f"waiting for {a.workspace} (running) to complete" in table(svc, b.workspace)
        assert [r.name for r in svc.status(b.workspace, chain=True).workspaces] == [a.workspace, b.workspace]
        assert f"dependents: {b.workspace}" in table(svc, a.workspace)

        release(svc, a.workspace)
        assert svc.wait(a.workspace, 60).status == Status.COMPLETED
        assert svc.wait(b.workspace, 60).status == Status.COMPLETED
        assert svc.status(b.workspace).workspaces[0].waiting_for is None
    finally:
        svc.close()
    events = engine_intervals(docker_client, since)
    assert events.index(("die", a.workspace)) < events.index(("start", b.workspace))


def test_a_failed_dependency_leaves_its_dependent_waiting_with_what_to_do_and_once_resumed_and_completed_it_runs(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        a = svc.dispatch(shell(user_repo, HOLD + FAILS_UNTIL_OK))
        b = svc.dispatch(shell(user_repo, COMMIT.format("b"), depends_on=[a.workspace]))
        release(svc, a.workspace)  # a fails once b waits for it
        assert svc.wait(a.workspace, 60).status == Status.FAILED
        svc.drain()  # whatever a drain decides now, b must not start

        b_row = svc.status(b.workspace).workspaces[0]
        assert b_row.status == Status.QUEUED
        assert b_row.waiting_for is not None
        assert b_row.waiting_for.startswith(f"{a.workspace}, which ended failed (the agent exited with code 3")
        assert f"agentic_resume {a.workspace}" in b_row.waiting_for and f"cancel {b.workspace}" in b_row.waiting_for
        told = [why for kind, why in events_of(svc, b.workspace) if kind == "queued" and why]
        # b's queued lines: what it waited for at dispatch, then that a ended failed (a watch on b wakes)
        assert told == [f"{a.workspace} (running) to complete", b_row.waiting_for]

        release(svc, a.workspace, "ok")
        svc.resume(a.workspace)
        done = svc.wait(a.workspace, 60)
        assert done.status == Status.COMPLETED and done.runs == 2
        after = svc.wait(b.workspace, 60)
        assert after.status == Status.COMPLETED and after.runs == 1
    finally:
        svc.close()


def test_cancelling_a_workspace_cancels_the_runs_waiting_for_it_down_the_chain_each_with_the_reason(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        a = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("a")))
        b = svc.dispatch(shell(user_repo, COMMIT.format("b"), depends_on=[a.workspace]))
        c = svc.dispatch(shell(user_repo, COMMIT.format("c"), depends_on=[b.workspace]))
        other = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("o")))

        result = svc.cancel(a.workspace)

        assert result.also_cancelled == [b.workspace, c.workspace]
        assert svc.store.read(a.workspace).status == Status.CANCELLED
        for name, upstream in ((b.workspace, a.workspace), (c.workspace, b.workspace)):
            rec = svc.store.read(name)
            assert rec.status == Status.CANCELLED and rec.started_at is None
            assert f"cancelled because {upstream}, which it waited for" in (rec.reason or "")
        assert svc.store.read(other.workspace).status == Status.RUNNING  # not in the chain: untouched
    finally:
        svc.close()


def test_a_dispatch_depending_on_an_unknown_workspace_or_based_on_another_repository_is_refused_keeping_nothing(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, tmp_path: Path
) -> None:
    svc = new_dispatcher(docker_client, start=False)
    with pytest.raises(InvalidInputError, match="depends_on: there is no workspace local/user-repo/nope"):
        svc.dispatch(shell(user_repo, "true", depends_on=["local/user-repo/nope"]))
    with pytest.raises(InvalidInputError, match="base_workspace: there is no workspace local/user-repo/nope"):
        svc.dispatch(shell(user_repo, "true", base_workspace="local/user-repo/nope"))
    assert svc.status().counts == dict.fromkeys(svc.status().counts, 0)
    first = svc.dispatch(shell(user_repo, "true"))
    (tmp_path / "other").mkdir()
    other = make_user_repo(tmp_path / "other").rename(tmp_path / "other" / "second-repo")
    wrong = f"base_workspace: {first.workspace} is a workspace of local/user-repo, not of local/second-repo"
    with pytest.raises(InvalidInputError, match=wrong):
        svc.dispatch(shell(other, "true", base_workspace=first.workspace))
    assert [r.name for r in svc.status().workspaces] == [first.workspace]
    with pytest.raises(InvalidInputError, match="review_rounds: needs review_of"):
        svc.dispatch(shell(user_repo, "true", review_rounds=1))
    with pytest.raises(InvalidInputError, match="base_workspace: a reviewer starts from the branch it reviews"):
        svc.dispatch(shell(user_repo, "true", review_of=first.workspace, base_workspace="local/user-repo/other"))
    with pytest.raises(InvalidInputError, match="review_of: there is no workspace local/user-repo/nope"):
        svc.dispatch(shell(user_repo, "true", review_of="local/user-repo/nope"))
    assert [r.name for r in svc.status().workspaces] == [first.workspace]


def test_a_chain_waiting_when_the_server_is_sigkilled_runs_each_step_once_under_the_next_server(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    since = int(time.time()) - 1
    server = serve_process(dict(os.environ))
    try:
        a = _cli("dispatch", str(user_repo), HOLD + COMMIT.format("a"), "--agent", "shell")
        b = _cli(
            "dispatch", str(user_repo), COMMIT.format("b"), "--agent", "shell", "--depends-on", str(a["workspace"])
        )
        assert (a["status"], b["status"]) == ("running", "queued")
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    svc = new_dispatcher(docker_client, start=False)
    assert svc.store.read(str(b["workspace"])).depends_on == [a["workspace"]]
    assert svc.status(str(a["workspace"])).workspaces[0].dependents == [b["workspace"]]
    chain = _cli("status", str(b["workspace"]), "--chain")["workspaces"]
    assert [(r["name"], r["status"]) for r in chain] == [(a["workspace"], "running"), (b["workspace"], "queued")]
    release(svc, str(a["workspace"]))
    container = str(svc.store.read(str(a["workspace"])).container_id)
    wait_for(lambda: docker_client.api.inspect_container(container)["State"]["Running"] is False, 30, "a to exit")

    svc.start()  # the restart: settles a, then starts b
    try:
        assert svc.wait(str(a["workspace"]), 30).status == Status.COMPLETED
        done = svc.wait(str(b["workspace"]), 60)
        assert done.status == Status.COMPLETED and done.runs == 1
    finally:
        svc.close()
    starts = [w for kind, w in engine_intervals(docker_client, since) if kind == "start"]
    assert starts.count(str(a["workspace"])) == 1 and starts.count(str(b["workspace"])) == 1


def test_a_chain_a_then_b_then_c_from_b_runs_in_order_and_c_starts_from_the_commits_of_b_final_run(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\n")
    svc = new_dispatcher(docker_client)
    since = int(time.time()) - 1
    # b commits once per run, so its final commit says which run made it
    b_task = 'echo "$AGENTIC_RUN" >> b.txt && git add b.txt && git commit -qm "b run $AGENTIC_RUN"'
    try:
        a = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("a")))
        b = svc.dispatch(shell(user_repo, b_task, depends_on=[a.workspace], branch="feature"))
        held = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("h")))
        c_task = "git log --format=%s > seen.txt && " + COMMIT.format("c")
        c = svc.dispatch(shell(user_repo, c_task, base_workspace=b.workspace, depends_on=[held.workspace]))
        assert (a.status, b.status, held.status, c.status) == ("running", "queued", "running", "queued")
        assert svc.store.read(c.workspace).depends_on == [held.workspace, b.workspace]
        assert svc.status(b.workspace).workspaces[0].dependents == [c.workspace]

        release(svc, a.workspace)
        assert svc.wait(b.workspace, 60).status == Status.COMPLETED
        svc.resume(b.workspace)  # b's final commit is its second run's, made after c was dispatched
        assert svc.wait(b.workspace, 60).runs == 2
        assert svc.store.read(c.workspace).status == Status.QUEUED  # still waiting for `held`

        release(svc, held.workspace)
        done = svc.wait(c.workspace, 60)
        assert done.status == Status.COMPLETED
    finally:
        svc.close()
    seen = (Path(c.repo_path) / "seen.txt").read_text(encoding="utf-8").splitlines()
    assert seen[:2] == ["b run 2", "b run 1"] and "add a" not in seen  # b's work on its own start, not a's
    b_tip = git(Path(b.repo_path), "rev-parse", "HEAD")
    assert done.base_workspace == b.workspace and done.base_commit == b_tip
    assert git(Path(c.repo_path), "rev-parse", f"{done.branch}~1") == b_tip  # c's own commit on top of b's end
    assert done.branch != svc.store.read(b.workspace).branch
    events = engine_intervals(docker_client, since)
    assert events.index(("die", a.workspace)) < events.index(("start", b.workspace))
    starts = [w for kind, w in events if kind == "start"]
    assert starts.index(c.workspace) > len(starts) - 2  # c started last


def test_the_copy_of_a_base_workspaces_branch_is_made_before_the_admission_lock_not_under_it(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    """Copying the base's branch is a fetch from its clone, which may take a while; every start on the
    root waits for the admission lock, so the copy is made before it. Here the test holds that lock (as
    another server would) while the base completes: the follow-up's branch moves to the base's end all
    the same, and the run starts once the lock is free."""
    svc = new_dispatcher(docker_client)
    try:
        base = svc.dispatch(shell(user_repo, HOLD + COMMIT.format("a")))
        follow = svc.dispatch(shell(user_repo, COMMIT.format("b"), base_workspace=base.workspace))
        clone = svc.store.paths(follow.workspace).repo
        branch = svc.store.read(follow.workspace).branch
        with svc.scheduler.admission():
            release(svc, base.workspace)
            assert svc.wait(base.workspace, 60).status == Status.COMPLETED
            base_tip = git(svc.store.paths(base.workspace).repo, "rev-parse", "HEAD")
            wait_for(lambda: git(clone, "rev-parse", branch) == base_tip, 60, "the follow-up's branch to move")
            assert (clone / "a.txt").read_text(encoding="utf-8") == "a\n"  # its work tree with it
            assert svc.store.read(follow.workspace).status == Status.QUEUED  # no start while the lock is held
        done = svc.wait(follow.workspace, 60)
    finally:
        svc.close()
    assert done.status == Status.COMPLETED and done.base_commit == base_tip
    assert git(clone, "rev-parse", f"{done.branch}~1") == base_tip


# -- retries ------------------------------------------------------------------------------------
CRASHES_ONCE = '[ "$AGENTIC_RUN" -ge 2 ] || exit 3; ' + COMMIT.format("r")


def events_of(svc: Dispatcher, workspace: str) -> list[tuple[str, str | None]]:
    changes, _ = svc.changes(0, {workspace})
    return [(c.kind, c.reason) for c in changes]


def test_a_crash_retried_by_policy_completes_on_the_second_run_and_status_shows_the_attempts(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[retry]\nbackoff_seconds = 0\n")
    svc = new_dispatcher(docker_client)
    try:
        res = svc.dispatch(shell(user_repo, CRASHES_ONCE, retry=RetryPolicy(max=1, on=["crash"])))
        done = svc.wait(res.workspace, 60)
        row = svc.status(res.workspace).workspaces[0]
    finally:
        svc.close()
    assert done.status == Status.COMPLETED and done.runs == 2
    assert row.retry is not None and (row.retry.attempt, row.retry.last_class) == (2, "crash")
    assert row.retry.history == ["attempt 1: crash: the agent exited with code 3"]
    kinds = [k for k, _ in events_of(svc, res.workspace)]
    assert kinds == ["dispatched", "started", "retrying", "started", "completed"]
    assert "started attempt 2 of 2 on its own" in (Path(res.path) / ".meta" / "prompt-2.md").read_text(encoding="utf-8")


def test_a_failure_of_a_class_the_policy_does_not_list_is_not_retried(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, '[retry]\nmax = 3\non = ["provider", "lost"]\nbackoff_seconds = 0\n')
    svc = new_dispatcher(docker_client)
    try:
        res = svc.dispatch(shell(user_repo, CRASHES_ONCE))  # the config's policy: crashes are not listed
        done = svc.wait(res.workspace, 60)
    finally:
        svc.close()
    assert done.status == Status.FAILED and done.runs == 1 and done.reason == "the agent exited with code 3"
    assert done.retry is not None and done.retry.attempt == 1 and done.retry.history == []
    assert "retrying" not in [k for k, _ in events_of(svc, res.workspace)]


def test_a_retry_waiting_its_backoff_when_the_server_is_sigkilled_runs_once_when_due_under_the_next_server(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[retry]\nbackoff_seconds = 4\n")
    since = int(time.time()) - 1
    server = serve_process(dict(os.environ))
    try:
        res = _cli("dispatch", str(user_repo), CRASHES_ONCE, "--agent", "shell", "--retry", "1", "--retry-on", "crash")
        name = str(res["workspace"])
        probe = new_dispatcher(docker_client, start=False)
        wait_for(lambda: probe.store.read(name).retry.next_at is not None, 60, "the retry to be scheduled")  # type: ignore[union-attr]
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    svc = new_dispatcher(docker_client, start=False)
    scheduled = svc.store.read(name)
    assert scheduled.status == Status.QUEUED and scheduled.runs == 2 and scheduled.retry is not None
    next_at = scheduled.retry.next_at
    assert next_at is not None and scheduled.retry.failed_at is not None
    assert parse_time(next_at) - parse_time(scheduled.retry.failed_at) >= 4  # type: ignore[operator]
    row = svc.status(name).workspaces[0]
    assert row.waiting_for == f"attempt 2 of 2 at {next_at}, after a crash failure"

    svc.start()  # the restart: the timer wakes when the retry falls due
    try:
        done = svc.wait(name, 60)
    finally:
        svc.close()
    assert done.status == Status.COMPLETED and done.runs == 2
    assert done.started_at is not None and done.started_at >= next_at  # not before its time (recorded times)
    starts = [w for kind, w in engine_intervals(docker_client, since) if kind == "start"]
    assert starts.count(name) == 2  # the first attempt and the retry, nothing twice


# -- review loops -------------------------------------------------------------------------------
CODER = (
    'if [ -f ANSWER.md ]; then grep -q "rename x" ANSWER.md && echo fixed > fix.txt && git add fix.txt '
    "&& git commit -qm 'fix what the review found'; else " + COMMIT.format("a") + "; fi"
)
REVIEWER = (
    "if [ -f fix.txt ]; then printf 'approved\\nlooks good now\\n' > REVIEW.md; "
    "else printf 'changes requested\\nrename x to y in a.txt\\n' > REVIEW.md; fi"
)


def test_a_review_asking_for_changes_sends_the_coder_back_with_the_comments_and_a_second_round_approves(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\n")
    svc = new_dispatcher(docker_client)
    try:
        coder = svc.dispatch(shell(user_repo, CODER))
        first = svc.dispatch(shell(user_repo, REVIEWER, review_of=coder.workspace, review_rounds=1))
        wait_for(
            lambda: (r := svc.store.read(first.workspace).review) is not None and r.next_reviewer is not None,
            90,
            "the first review to be followed up",
        )
        reviewed = svc.store.read(first.workspace)
        assert reviewed.status == Status.COMPLETED and reviewed.review is not None
        assert (reviewed.review.verdict, reviewed.review.round) == ("changes requested", 1)
        assert reviewed.review.comments == "rename x to y in a.txt"
        second = str(reviewed.review.next_reviewer)
        done = svc.wait(second, 90)
        fixed = svc.wait(coder.workspace, 30)
        rows = {r.name: r for r in svc.status(coder.workspace, chain=True).workspaces}
    finally:
        svc.close()
    assert second.endswith("-round-2") and done.status == Status.COMPLETED
    assert fixed.status == Status.COMPLETED and fixed.runs == 2  # sent back once, with the comments
    assert "rename x to y in a.txt" in (Path(coder.path) / ".meta" / "prompt-2.md").read_text(encoding="utf-8")
    assert done.review is not None and (done.review.verdict, done.review.round) == ("approved", 2)
    assert done.review.comments == "looks good now" and done.review_of == coder.workspace
    # Both rows carry the review: the coder's shows its latest one, each reviewer its own.
    coder_row = rows[coder.workspace]
    assert coder_row.review is not None
    assert (coder_row.review.verdict, coder_row.review.round, coder_row.review.reviewer) == ("approved", 2, second)
    assert rows[first.workspace].review is not None and rows[first.workspace].review.verdict == "changes requested"
    assert set(rows) == {coder.workspace, first.workspace, second}
    # The verdict stays out of the branch, and the second reviewer saw the fix.
    clone = svc.store.paths(second).repo
    assert "REVIEW.md" not in git(clone, "ls-files") and git(clone, "status", "--porcelain") == ""
    assert (clone / "fix.txt").exists()


def test_a_reviewer_that_leaves_a_link_for_its_verdict_fails_and_the_target_is_never_read(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        coder = svc.dispatch(shell(user_repo, COMMIT.format("a")))
        reviewer = svc.dispatch(shell(user_repo, "ln -s /etc/passwd REVIEW.md", review_of=coder.workspace))
        done = svc.wait(reviewer.workspace, 60)
        row = svc.status(coder.workspace).workspaces[0]
    finally:
        svc.close()
    assert done.status == Status.FAILED and "REVIEW.md cannot be read" in (done.reason or "")
    assert "root:" not in (done.reason or "") and done.review is None
    assert row.review is not None and row.review.verdict is None and row.review.reviewer == reviewer.workspace


def test_a_run_that_timed_out_and_one_whose_container_was_killed_from_outside_are_retried_by_their_class(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\n[retry]\nbackoff_seconds = 0\n")
    svc = new_dispatcher(docker_client)
    slow_once = '[ "$AGENTIC_RUN" -ge 2 ] || sleep 300; ' + COMMIT.format("t")
    try:
        timed = svc.dispatch(shell(user_repo, slow_once, timeout_seconds=2, retry=RetryPolicy(max=1, on=["timeout"])))
        killed = svc.dispatch(shell(user_repo, slow_once, retry=RetryPolicy(max=1, on=["lost"])))
        container = svc.store.read(killed.workspace).container_id
        assert container is not None
        docker_client.containers.get(container).kill()  # as an engine restart would
        results = {name: svc.wait(name, 60) for name in (timed.workspace, killed.workspace)}
    finally:
        svc.close()
    for name, cls in ((timed.workspace, "timeout"), (killed.workspace, "lost")):
        done = results[name]
        assert done.status == Status.COMPLETED and done.runs == 2, (name, done.reason)
        assert done.retry is not None and done.retry.last_class == cls
