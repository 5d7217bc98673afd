"""Scheduling on real containers: pools and priorities, timeouts, cancel, fast-fail pauses,
restart reconciliation after SIGKILL, and two servers sharing one root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Priority, Status, parse_time
from agentic_dispatch.runtime.base import LABEL_ROOT, LABEL_RUN, LABEL_WORKSPACE
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import serve_process, wait_for

pytestmark = pytest.mark.docker


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


def new_dispatcher(client: docker.DockerClient, start: bool = True) -> Dispatcher:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    if start:
        svc.start()
    return svc


def engine_starts(client: docker.DockerClient, since: int) -> tuple[int, list[str]]:
    """Replay this root's container start/die events since ``since``, as the engine saw them:
    the most containers running at once, and the workspaces in the order they started."""
    root = load_settings()[1].root_id
    events = client.events(
        since=since,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "label": [f"{LABEL_ROOT}={root}"], "event": ["start", "die"]},
    )
    running = peak = 0
    starts: list[str] = []
    for ev in events:
        if ev["status"] == "start":
            running += 1
            starts.append(ev["Actor"]["Attributes"][LABEL_WORKSPACE])
        else:
            running -= 1
        peak = max(peak, running)
    return peak, starts


def shell(repo: Path, task: str, **kw: object) -> DispatchRequest:
    return DispatchRequest(repo=str(repo), task=task, agent="shell", **kw)  # type: ignore[arg-type]


def test_pool_limit_of_two_runs_five_dispatches_at_most_two_at_a_time_in_priority_order_with_full_prompts(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 8\npools = {shell = 2}\n")
    svc = new_dispatcher(docker_client)
    since = int(time.time()) - 1
    try:
        task = "cat /agentic/run/prompt.md > prompt-seen.txt; sleep 1.5"
        first = [svc.dispatch(shell(user_repo, task + f" # filler {i}")) for i in range(2)]
        assert [r.status for r in first] == ["running", "running"]
        queued = {
            p: svc.dispatch(shell(user_repo, task + f" # {p.value}", priority=p))
            for p in (Priority.LOW, Priority.CRITICAL, Priority.HIGH)
        }
        assert all(r.status == "queued" for r in queued.values())
        names = [r.workspace for r in first] + [r.workspace for r in queued.values()]
        for n in names:
            assert svc.wait(n, 60).status == Status.COMPLETED
    finally:
        svc.close()
    peak, starts = engine_starts(docker_client, since)
    assert peak <= 2 and len(starts) == 5
    assert starts[2:] == [queued[p].workspace for p in (Priority.CRITICAL, Priority.HIGH, Priority.LOW)]
    for r in queued.values():
        seen = (Path(r.repo_path) / "prompt-seen.txt").read_text(encoding="utf-8")
        saved = (Path(r.path) / ".meta" / "prompt-1.md").read_text(encoding="utf-8")
        assert seen == saved and "sleep 1.5" in seen and "BLOCKED.md" in seen


def test_a_five_second_timeout_fails_a_sleeping_task_with_the_reason_in_under_ten_seconds(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        res = svc.dispatch(shell(user_repo, "echo started; sleep 60", timeout_seconds=5))
        rec = svc.wait(res.workspace, 10)  # the bound: still running after it, the assertion below fails
    finally:
        svc.close()
    assert rec.status == Status.FAILED and "timed out after 5 s" in (rec.reason or "")
    assert "started" in Path(res.log_path).read_text(encoding="utf-8"), "the log so far is kept"


def test_a_timeout_decided_for_an_older_run_does_not_stop_the_run_that_replaced_it(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    """The timer decides a timeout on a view of the record it read earlier; by the time it stops the
    run, a resume may have started the next one. Only the container it decided on may be stopped."""
    svc = new_dispatcher(docker_client, start=False)
    try:
        res = svc.dispatch(shell(user_repo, "sleep 60"))
        current = svc.store.read(res.workspace).container_id
        assert current is not None
        stopped = svc.runs.stop(res.workspace, Status.FAILED, "timed out", container_id="an-older-run")
        rec = svc.store.read(res.workspace)
        assert stopped == "idle"
        assert rec.status == Status.RUNNING and rec.container_id == current and rec.stop_status is None
        assert docker_client.containers.get(current).status == "running"
    finally:
        svc.cancel(res.workspace)
        svc.close()


def test_cancel_of_running_queued_and_finished_workspaces_and_twice(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 1\n")
    svc = new_dispatcher(docker_client)
    try:
        running = svc.dispatch(shell(user_repo, "sleep 60"))
        queued = svc.dispatch(shell(user_repo, "echo should-never-run > ran.txt"))
        assert (running.status, queued.status) == ("running", "queued")

        q1 = svc.cancel(queued.workspace)
        assert q1.changed and q1.status == "cancelled"
        r1 = svc.cancel(running.workspace)
        assert r1.changed and r1.status == "cancelled"
        assert svc.store.read(running.workspace).reason == "cancelled while running"
        again = svc.cancel(running.workspace)
        assert not again.changed and "nothing to cancel" in again.message

        done = svc.dispatch(shell(user_repo, "true"))
        assert svc.wait(done.workspace, 30).status == Status.COMPLETED
        d1 = svc.cancel(done.workspace)
        assert not d1.changed and d1.status == "completed"
        svc.reconcile()
        assert not (Path(queued.repo_path) / "ran.txt").exists(), "a cancelled queued workspace must never start"
        assert svc.store.read(queued.workspace).status == Status.CANCELLED
        assert (
            docker_client.containers.list(all=True, filters={"label": f"{LABEL_WORKSPACE}={running.workspace}"}) == []
        )
    finally:
        svc.close()


def test_three_fast_failures_pause_the_pool_and_a_fourth_dispatch_queues_with_the_pause_shown(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        for i in range(3):
            r = svc.dispatch(shell(user_repo, f"exit 1 # {i}"))
            assert svc.wait(r.workspace, 30).status == Status.FAILED
        fourth = svc.dispatch(shell(user_repo, "true"))
        assert fourth.status == "queued"
        report = svc.status()
        hold = next(h for h in report.holds if h.pool == "shell")
        assert "fast failures" in hold.reason and hold.until is not None
        until = time.mktime(time.strptime(hold.until, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert 25 * 60 < until - time.time() <= 30 * 60 + 5
        # The pause is persisted: a new service on the same root still holds the pool.
        assert any(h.pool == "shell" for h in new_dispatcher(docker_client, start=False).scheduler.holds())
    finally:
        svc.close()


def _cli(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", *args, "--json"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_after_a_sigkill_restart_finalises_exited_watches_running_and_fails_vanished_containers(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    server = serve_process(dict(os.environ))
    try:
        exits = _cli("dispatch", str(user_repo), "sleep 6; exit 4", "--agent", "shell")
        keeps = _cli(
            "dispatch", str(user_repo), "while [ ! -f go ]; do sleep 0.1; done; echo released", "--agent", "shell"
        )
        removed = _cli("dispatch", str(user_repo), "sleep 300", "--agent", "shell")
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    svc = new_dispatcher(docker_client, start=False)
    rec = svc.store.read(str(removed["workspace"]))
    docker_client.containers.get(str(rec.container_id)).remove(force=True)
    exited_id = str(svc.store.read(str(exits["workspace"])).container_id)
    wait_for(lambda: docker_client.api.inspect_container(exited_id)["State"]["Running"] is False, 30, "exit")

    svc.start()  # the restart: reconciles once, then watches
    try:
        wait_for(
            lambda: all(svc.store.read(str(r["workspace"])).status != Status.RUNNING for r in (exits, removed)),
            10,
            "the exited and the vanished run to be finalised",
        )
        first = svc.store.read(str(exits["workspace"]))
        assert first.status == Status.FAILED and first.exit_code == 4
        third = svc.store.read(str(removed["workspace"]))
        assert third.status == Status.FAILED and "vanished" in (third.reason or "")
        assert svc.store.read(str(keeps["workspace"])).status == Status.RUNNING
        (Path(str(keeps["repo_path"])) / "go").touch()
        second = svc.wait(str(keeps["workspace"]), 30)
        assert second.status == Status.COMPLETED and second.exit_code == 0
        assert "released" in Path(str(keeps["log_path"])).read_text(encoding="utf-8")
        assert not [i for i in svc.store.list() if i.record and i.record.status == Status.RUNNING]
    finally:
        svc.close()


def test_two_servers_on_one_root_run_each_of_ten_queued_dispatches_exactly_once(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "drain_interval_seconds = 0.5\n[limits]\ntotal = 3\n")
    _cli("freeze")
    names = [
        str(
            _cli("dispatch", str(user_repo), f"echo ran >> /agentic/logs/count-{i}; sleep 0.3", "--agent", "shell")[
                "workspace"
            ]
        )
        for i in range(10)
    ]
    since = int(time.time()) - 1
    servers = [serve_process(dict(os.environ)) for _ in range(2)]
    try:
        svc = new_dispatcher(docker_client, start=False)
        assert all(svc.store.read(n).status == Status.QUEUED for n in names)
        svc.scheduler.set_frozen(False)  # unfreeze without draining here: the two servers must do the work
        wait_for(lambda: all(svc.store.read(n).status == Status.COMPLETED for n in names), 120, "all ten to complete")
    finally:
        for s in servers:
            s.terminate()
        # SIGTERM: each server exits cleanly within a few seconds, leaving containers to the next start.
        assert [s.wait(10) for s in servers] == [0, 0]
    for i, n in enumerate(names):
        rec = svc.store.read(n)
        assert rec.runs == 1
        ws = svc.store.paths(n)
        assert (ws.logs / f"count-{i}").read_text(encoding="utf-8") == "ran\n", f"{n} ran more than once"
        assert ws.log("shell").read_text(encoding="utf-8").count("=== run 1") == 1
    # Both servers took work, and together they kept the global cap of 3.
    peak, starts = engine_starts(docker_client, since)
    assert sorted(starts) == sorted(names) and peak <= 3


def test_the_same_idempotency_key_returns_the_existing_workspace_instead_of_a_second_run(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        first = svc.dispatch(shell(user_repo, "echo once >> /agentic/logs/count", idempotency_key="job-42"))
        again = svc.dispatch(shell(user_repo, "echo once >> /agentic/logs/count", idempotency_key="job-42"))
        assert again.workspace == first.workspace
        svc.wait(first.workspace, 30)
        assert len([i for i in svc.store.list() if i.record]) == 1
        assert (svc.store.paths(first.workspace).logs / "count").read_text(encoding="utf-8") == "once\n"
    finally:
        svc.close()


def test_a_frozen_queue_holds_new_dispatches_across_a_restart_until_unfrozen(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        assert svc.freeze().frozen
        held = svc.dispatch(shell(user_repo, "true"))
        assert held.status == "queued"
    finally:
        svc.close()
    restarted = new_dispatcher(docker_client, start=False)  # no timer: only the unfreeze may start it
    try:
        restarted.reconcile()
        assert restarted.store.read(held.workspace).status == Status.QUEUED
        assert restarted.status().frozen
        state = restarted.unfreeze()
        assert not state.frozen and "started 1" in state.message
        assert restarted.wait(held.workspace, 30).status == Status.COMPLETED
    finally:
        restarted.close()


def test_a_labelled_container_no_record_knows_is_reported_and_removed_only_by_cleanup(
    docker_env: str, docker_client: docker.DockerClient
) -> None:
    svc = new_dispatcher(docker_client, start=False)
    stray = docker_client.containers.run(
        docker_env,
        ["sleep", "60"],
        detach=True,
        init=True,
        labels={LABEL_ROOT: svc.paths.root_id, LABEL_WORKSPACE: "local/gone/w-1"},
    )
    svc.reconcile()
    report = svc.status()
    assert any(o.startswith(stray.id[:12]) and "local/gone/w-1" in o for o in report.orphans)
    assert docker_client.containers.get(stray.id).status == "running", "reconcile must not remove it silently"
    cleaned = svc.cleanup()
    assert len(cleaned.removed) == 1 and cleaned.removed[0].startswith(stray.id[:12])
    assert svc.status().orphans == []


def test_a_daily_limit_counted_from_the_events_log_holds_the_pool_until_utc_midnight_across_a_restart(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ndaily = {shell = 2}\n")
    svc = new_dispatcher(docker_client)
    try:
        done = [svc.dispatch(shell(user_repo, "true")) for _ in range(2)]
        for r in done:
            assert svc.wait(r.workspace, 60).status == Status.COMPLETED
        third = svc.dispatch(shell(user_repo, "true"))
        assert third.status == "queued"
    finally:
        svc.close()
    # A new server on the same root counts the same starts (they are in the events log) ...
    svc = new_dispatcher(docker_client)
    try:
        svc.reconcile()
        report = svc.status()
        assert report.counts["queued"] == 1 and report.counts["completed"] == 2
        hold = next(h for h in report.holds if h.pool == "shell")
        assert hold.reason == "daily limit of 2 starts reached"
        tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
        assert hold.until == f"{tomorrow}T00:00:00Z"
    finally:
        svc.close()
    # ... and yesterday's starts do not count: rewrite the log as if they happened a day ago.
    events = isolated_home / "events" / "events.jsonl"
    yesterday = time.strftime("%Y-%m-%dT12:00:00Z", time.gmtime(time.time() - 86400))
    lines = [json.loads(line) for line in events.read_text(encoding="utf-8").splitlines()]
    events.write_text("".join(json.dumps({**e, "at": yesterday}) + "\n" for e in lines), encoding="utf-8")
    svc = new_dispatcher(docker_client)
    try:
        svc.reconcile()
        assert svc.wait(third.workspace, 60).status == Status.COMPLETED
    finally:
        svc.close()


def test_pacing_keeps_the_minimum_gap_between_two_starts_of_a_pool_and_shows_the_hold(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "drain_interval_seconds = 0.5\n[limits]\npacing_seconds = {shell = 3}\n")
    svc = new_dispatcher(docker_client)
    try:
        first = svc.dispatch(shell(user_repo, "true"))
        second = svc.dispatch(shell(user_repo, "true"))
        assert (first.status, second.status) == ("running", "queued")
        hold = next(h for h in svc.status().holds if h.pool == "shell")
        assert hold.reason.startswith("pacing: 3 s")
        wait_for(lambda: svc.store.read(second.workspace).status != Status.QUEUED, 20, "the paced start")
        assert svc.wait(second.workspace, 60).status == Status.COMPLETED
        # the gap as the records hold it (whole seconds): what the scheduler did, not when the test looked
        started = [parse_time(svc.store.read(r.workspace).started_at) for r in (first, second)]
        assert started[0] is not None and started[1] is not None
        assert started[1] - started[0] >= 3 - 1, started
    finally:
        svc.close()


def test_a_queued_run_that_cannot_start_fails_with_the_reason_and_the_queue_goes_on(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        svc.freeze()
        broken = svc.dispatch(shell(user_repo, "echo never"))
        fine = svc.dispatch(shell(user_repo, "echo fine"))
        (Path(broken.path) / ".meta" / "run" / "prompt.md").unlink()  # lost, say, by a disk clean-up
        svc.unfreeze()
        assert svc.wait(fine.workspace, 60).status == Status.COMPLETED
        rec = svc.store.read(broken.workspace)
        assert rec.status == Status.FAILED
        assert rec.reason and "could not start" in rec.reason and "agentic_resume" in rec.reason
        svc.resume(broken.workspace)  # the prompt is made again: the run is not lost
        assert svc.wait(broken.workspace, 60).status == Status.COMPLETED
    finally:
        svc.close()


def _labelled(svc: Dispatcher, workspace: str, run: int = 1) -> dict[str, str]:
    return {LABEL_ROOT: svc.paths.root_id, LABEL_WORKSPACE: workspace, LABEL_RUN: str(run)}


def test_a_container_started_just_before_a_crash_is_adopted_not_orphaned_nor_started_twice(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    # A server killed between starting a container and recording it leaves a queued record
    # and a running container with the record's labels.
    svc = new_dispatcher(docker_client, start=False)
    svc.freeze()
    res = svc.dispatch(shell(user_repo, "echo from-the-server"))
    stray = docker_client.containers.run(
        docker_env,
        ["sh", "-c", "while [ ! -f /tmp/go ]; do sleep 0.1; done"],
        detach=True,
        init=True,
        labels=_labelled(svc, res.workspace),
    )
    assert svc.orphans() == [], "the container of a queued record is not an orphan"
    svc.reconcile()  # frozen: nothing new starts, but a running container is adopted
    rec = svc.store.read(res.workspace)
    assert rec.status == Status.RUNNING and rec.container_id == stray.id
    stray.exec_run(["touch", "/tmp/go"])
    svc.start()
    try:
        rec = svc.wait(res.workspace, 30)
        assert rec.status == Status.COMPLETED and rec.container_id == stray.id
        log = Path(res.log_path)
        assert not log.exists() or "from-the-server" not in log.read_text(encoding="utf-8"), "the run started twice"
    finally:
        svc.close()


def test_a_container_created_but_never_started_is_replaced_not_adopted(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        svc.freeze()
        res = svc.dispatch(shell(user_repo, "echo from-the-server"))
        dead = docker_client.containers.create(docker_env, ["true"], labels=_labelled(svc, res.workspace))
        svc.unfreeze()
        rec = svc.wait(res.workspace, 60)
        assert rec.status == Status.COMPLETED and rec.container_id != dead.id
        assert "from-the-server" in Path(res.log_path).read_text(encoding="utf-8")
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(dead.id)
    finally:
        svc.close()


def test_a_bad_resource_limit_fails_the_run_with_the_engine_s_reason_instead_of_queueing_forever(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[resources]\ncpus = 64\n")  # more CPUs than this machine has
    svc = new_dispatcher(docker_client)
    try:
        rec = svc.wait(svc.dispatch(shell(user_repo, "echo hi")).workspace, 30)
        assert rec.status == Status.FAILED, rec
        assert rec.reason and "refused" in rec.reason and "CPU" in rec.reason.upper()
    finally:
        svc.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_server_cleanly_and_leaves_the_running_agent_running(
    sig: signal.Signals, docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    server = serve_process(dict(os.environ))
    try:
        res = _cli("dispatch", str(user_repo), "while [ ! -f go ]; do sleep 0.1; done", "--agent", "shell")
    finally:
        server.send_signal(sig)
        assert server.wait(10) == 0, "the server must exit cleanly within a few seconds"
    svc = new_dispatcher(docker_client, start=False)
    rec = svc.store.read(str(res["workspace"]))
    assert rec.status == Status.RUNNING
    assert docker_client.api.inspect_container(rec.container_id)["State"]["Running"] is True
    (Path(str(res["repo_path"])) / "go").touch()
    svc.start()  # the next server finalises it
    try:
        assert svc.wait(str(res["workspace"]), 30).status == Status.COMPLETED
    finally:
        svc.close()


def test_shutdown_now_stops_running_agents_queues_new_work_and_start_runs_it(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = new_dispatcher(docker_client)
    try:
        running = svc.dispatch(shell(user_repo, "sleep 60"))
        assert running.status == "running"
        state = svc.freeze(now=True)
        assert state.frozen and state.stopped == [running.workspace]
        rec = svc.store.read(running.workspace)
        assert rec.status == Status.CANCELLED and "shutdown" in (rec.reason or "")
        assert docker_client.containers.list(filters={"label": f"{LABEL_WORKSPACE}={running.workspace}"}) == []
        later = svc.dispatch(shell(user_repo, "echo later"))
        assert later.status == "queued"
        svc.unfreeze()
        assert svc.wait(later.workspace, 60).status == Status.COMPLETED
    finally:
        svc.close()
