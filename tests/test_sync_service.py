"""Sync through the service: real dispatches in real containers, then delivery home with real git
and a real HTTP listener; a real server process killed with deliveries pending."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import Endpoint, git, serve_process, snapshot, wait_for

CLI_DISPATCH = ("--agent", "shell", "--wait", "60", "--json")
COMMIT = "echo 'from the agent' > agent.txt && git add agent.txt && git commit -qm 'Agent work'"


def _bare_origin(tmp_path: Path, source: Path) -> Path:
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(source), str(origin))
    return origin


def _config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


def _finished(svc: Dispatcher, repo: str, task: str) -> tuple[str, Path]:
    res = svc.dispatch(DispatchRequest(repo=repo, task=task, agent="shell"))
    rec = svc.wait(res.workspace, 60)
    assert rec.status == Status.COMPLETED, rec.reason
    return res.workspace, Path(res.repo_path)


def test_a_run_dispatched_from_a_local_path_lands_in_that_repository_and_nothing_else_there_changes(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    (user_repo / "scratch.txt").write_text("uncommitted work of the user\n", encoding="utf-8")
    git(user_repo, "add", "scratch.txt")  # staged, so the index holds it
    refs, head, status = snapshot(user_repo)
    index = (user_repo / ".git" / "index").read_bytes()

    name, clone = _finished(dispatcher, str(user_repo), COMMIT)
    branch = dispatcher.store.read(name).branch
    report = dispatcher.sync(name)

    assert report.delivered == [name], report.message
    tip = git(clone, "rev-parse", branch)
    assert git(user_repo, "rev-parse", f"refs/heads/{branch}") == tip
    after = dict(
        line.split(" ", 1) for line in git(user_repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    )
    assert after.pop(f"refs/heads/{branch}") == tip
    assert "\n".join(f"{k} {v}" for k, v in sorted(after.items())) == refs, "only that one ref is new"
    assert git(user_repo, "rev-parse", "HEAD") == head
    assert git(user_repo, "status", "--porcelain", "--ignored") == status
    assert (user_repo / ".git" / "index").read_bytes() == index
    assert (user_repo / "scratch.txt").read_text(encoding="utf-8") == "uncommitted work of the user\n"
    row = dispatcher.status(name).workspaces[0]
    assert row.delivery is not None and row.delivery.commit == tip and row.delivery.remote == str(user_repo)
    assert any(f"main..{branch}" in c and str(user_repo) in c for c in row.delivery_commands), row.delivery_commands
    assert dispatcher.sync(name).delivered == [name], "a second sync delivers nothing new and says it is home"


def test_a_remote_run_is_pushed_to_the_recorded_origin_though_the_agent_rewrote_its_remote_and_added_hooks(
    dispatcher: Dispatcher, user_repo: Path, tmp_path: Path
) -> None:
    origin = _bare_origin(tmp_path, user_repo)
    decoy = tmp_path / "decoy.git"
    git(tmp_path, "init", "-q", "--bare", str(decoy))
    marker = tmp_path / "hook-ran-on-the-host"
    hook = f"#!/bin/sh\ntouch {marker}\n"
    task = (
        f"{COMMIT} && git remote set-url origin {decoy} && git config remote.origin.pushurl {decoy} && "
        f"git config url.{decoy}.insteadOf file:// && git config core.hooksPath .git/hooks && "
        f"for h in pre-push post-checkout reference-transaction fsmonitor-watchman; do "
        f"printf '{hook}' > .git/hooks/$h && chmod +x .git/hooks/$h; done && "
        "git config core.fsmonitor .git/hooks/fsmonitor-watchman"
    )
    before = git(origin, "for-each-ref", "--format=%(refname) %(objectname)")
    name, clone = _finished(dispatcher, f"file://{origin}", task)
    branch = dispatcher.store.read(name).branch

    report = dispatcher.sync(name)

    assert report.delivered == [name], report.message
    assert git(origin, "rev-parse", f"refs/heads/{branch}") == git(clone, "rev-parse", branch)
    after = git(origin, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    assert sorted(set(after) - set(before.splitlines())) == [f"refs/heads/{branch} {git(clone, 'rev-parse', branch)}"]
    assert git(decoy, "for-each-ref") == "", "the URL the agent wrote is never pushed to"
    assert not marker.exists(), "no hook of the agent's ran on the host"


def test_a_same_named_branch_that_diverged_needs_attention_is_not_retried_until_asked_and_force_overwrites(
    dispatcher: Dispatcher, user_repo: Path
) -> None:
    name, clone = _finished(dispatcher, str(user_repo), COMMIT)
    branch = dispatcher.store.read(name).branch
    git(user_repo, "branch", branch, "feature")  # theirs: not an ancestor of the agent's
    (user_repo / "other.txt").write_text("x\n", encoding="utf-8")
    theirs = git(user_repo, "commit-tree", "-p", "feature", "-m", "their own", git(user_repo, "write-tree"))
    git(user_repo, "update-ref", f"refs/heads/{branch}", theirs)
    (user_repo / "other.txt").unlink()

    first = dispatcher.sync(name)
    assert first.attention == [name], first.message
    (row,) = [r for r in first.entries if r.kind == "git"]
    assert "rejected" in (row.last_error or "") and "non-fast-forward" in (row.last_error or ""), row
    assert row.what_to_do and "force" in row.what_to_do
    again = dispatcher.sync()  # a sync of everything does not retry it blindly
    assert [r.attempts for r in again.entries if r.kind == "git"] == [row.attempts]
    assert git(user_repo, "rev-parse", f"refs/heads/{branch}") == theirs

    forced = dispatcher.sync(name, force=True)
    assert forced.delivered == [name], forced.message
    assert git(user_repo, "rev-parse", f"refs/heads/{branch}") == git(clone, "rev-parse", branch)


def test_auto_sync_posts_each_finished_run_once_after_the_endpoint_failed_three_times(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path, endpoint: Endpoint
) -> None:
    endpoint.script = [(500, {})] * 3
    _config(
        isolated_home,
        f'[sync]\nauto = true\npush = false\nendpoint = "{endpoint.url}"\nbackoff_seconds = [0.2, 0.4, 0.8]\n',
    )
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    try:
        name, _ = _finished(svc, str(user_repo), COMMIT)
        key = f"{name}:1"
        wait_for(lambda: endpoint.accepted.get(key) == 1, 30, "the record to be accepted")
        report = svc.sync(name)
    finally:
        svc.close()
    assert endpoint.keys() == [key] * 4, "three refusals, then the one that was accepted"
    assert endpoint.accepted == {key: 1}
    (dispatch,) = endpoint.requests[-1]["body"]["dispatches"]
    assert dispatch["workspace"] == name and dispatch["status"] == "completed" and dispatch["runs"] == 1
    assert report.delivered == [name]
    events = [json.loads(line) for line in paths.events.joinpath("events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events if e["workspace"] == name][-1] == "delivered"


@pytest.fixture
def server_env(docker_env: str, isolated_home: Path) -> Iterator[dict[str, str]]:
    yield {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "server")}


def test_a_server_killed_with_records_pending_delivers_each_exactly_once_after_a_restart(
    server_env: dict[str, str], isolated_home: Path, user_repo: Path, endpoint: Endpoint
) -> None:
    endpoint.script = [(503, {})] * 1000  # down until the test says otherwise
    _config(
        isolated_home,
        f'[sync]\nauto = true\npush = false\nendpoint = "{endpoint.url}"\nbackoff_seconds = [0.2]\n'
        "flush_interval_seconds = 0.5\n",
    )
    first = serve_process(server_env)
    names = []
    try:
        for task in ("true", "echo two"):
            out = subprocess.run(
                [sys.executable, "-m", "agentic_dispatch", "dispatch", str(user_repo), task, *CLI_DISPATCH],
                env=server_env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            names.append(json.loads(out)["workspaces"][0]["name"])
        keys = {f"{n}:1" for n in names}
        wait_for(lambda: keys <= set(endpoint.keys()), 30, "both records to be tried while the endpoint is down")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert endpoint.accepted == {}

    with endpoint.lock:
        endpoint.script = []  # back up
    second = serve_process(server_env)
    try:
        wait_for(lambda: set(endpoint.accepted) == keys, 30, "both records to be accepted after the restart")
        subprocess.run(
            [sys.executable, "-m", "agentic_dispatch", "sync", "--wait", "1"],
            env=server_env,
            check=True,
            capture_output=True,
        )
    finally:
        assert second.stdin is not None
        second.stdin.close()
        second.wait(20)
    assert endpoint.accepted == dict.fromkeys(keys, 1)
