"""Faults of the engine under a running service, on a real engine of the test's own (tests/engines.py)
that it stops, freezes and starts again: a run that ends as the engine goes away keeps its
delivery and leaves no orphan; a cancel the engine cannot take says so and happens once it is back;
runs an engine restart kills are the infrastructure's failures, not the agent's."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git, wait_for
from .engines import SecondEngine

COMMIT = "echo done > work.txt && git add work.txt && git commit -qm 'agent work'"

# docker-py leaves its socket to the garbage collector when connect() fails (an engine that is gone):
# that ResourceWarning is docker-py's (see tests/test_runtime_faults.py).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket fd=\d+, family=1:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def _collect_docker_py_sockets() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
def on_second(
    second_engine: SecondEngine, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Dispatcher]:
    """A service on the second engine, without background threads: the test says when it looks."""
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", second_engine.image)
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text("[sync]\nauto = true\n", encoding="utf-8")
    settings, paths = load_settings()
    client = docker.DockerClient(base_url=second_engine.base_url, version="1.41")
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    yield svc
    svc.close()
    client.close()


def _exited(engine: SecondEngine, container_id: str) -> bool:
    client = engine.client()
    try:
        return not client.api.inspect_container(container_id)["State"]["Running"]
    finally:
        client.close()


def test_a_run_that_ends_as_the_engine_goes_away_keeps_its_delivery_and_leaves_no_orphan(
    on_second: Dispatcher, second_engine: SecondEngine, user_repo: Path
) -> None:
    """Before: the exit was recorded, then removing the container raised an untranslated connection
    error that skipped the rest: the completed run was never enqueued for delivery, waiters were not
    woken, and the exited container was later listed as an orphan though its record names it."""
    svc = on_second
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=COMMIT, agent="shell"))
    container = svc.record(res.workspace).container_id
    assert container is not None
    wait_for(lambda: _exited(second_engine, container), 30, "the run to end")
    second_engine.stop()
    # What the exit watcher does with the `die` event it heard just before the engine went away:
    svc.runs.finish(res.workspace, container, 0)

    rec = svc.record(res.workspace)
    assert rec.status == Status.COMPLETED, rec.reason
    delivered = svc.sync(res.workspace, wait=30)  # the local delivery needs no engine
    assert delivered.delivered == [res.workspace], delivered.message
    assert git(user_repo, "show", f"refs/heads/{rec.branch}:work.txt").strip() == "done"

    second_engine.start()
    svc.reconcile()  # the timer's sweep: the container the removal left is ours, and goes
    assert svc.status().orphans == []
    client = second_engine.client()
    try:
        assert not client.containers.list(all=True, filters={"id": container}), "the leftover is removed"
    finally:
        client.close()


def test_a_cancel_while_the_engine_does_not_answer_says_so_and_takes_effect_when_it_does(
    on_second: Dispatcher, second_engine: SecondEngine, user_repo: Path
) -> None:
    """Before: cancel said "try again" although it had already taken effect, and status showed no
    pending cancel meanwhile."""
    svc = on_second
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="sleep 300", agent="shell"))
    assert svc.record(res.workspace).status == Status.RUNNING
    with second_engine.frozen():
        result = svc.cancel(res.workspace)
        assert result.changed and "cannot be reached" in result.message, result.message
        row = svc.status(res.workspace).workspaces[0]
        assert row.status == Status.RUNNING and row.reason is not None and row.reason.startswith("cancelled pending")
    svc.reconcile()  # the engine answers again: the timer carries the cancel out
    rec = svc.record(res.workspace)
    assert rec.status == Status.CANCELLED and rec.reason == "cancelled while running", rec


def test_runs_an_engine_restart_kills_fail_naming_the_signal_and_pause_no_pool(
    on_second: Dispatcher, second_engine: SecondEngine, user_repo: Path
) -> None:
    """Before: each ended "the agent exited with code 143", counted as a fast failure, and three of
    them paused the pool for 30 minutes with nothing to lift it."""
    svc = on_second
    names = [svc.dispatch(DispatchRequest(repo=str(user_repo), task="sleep 300", agent="shell")).workspace]
    names += [svc.dispatch(DispatchRequest(repo=str(user_repo), task="sleep 300", agent="shell")).workspace]
    names += [svc.dispatch(DispatchRequest(repo=str(user_repo), task="sleep 300", agent="shell")).workspace]
    assert all(svc.record(n).status == Status.RUNNING for n in names)
    second_engine.stop()  # a restart: the engine stops its containers
    second_engine.start()
    svc.reconcile()
    for name in names:
        rec = svc.record(name)
        assert rec.status == Status.FAILED, rec
        assert rec.reason is not None and ("SIGTERM" in rec.reason or "SIGKILL" in rec.reason), rec.reason
        assert "engine" in rec.reason
    assert not [h for h in svc.status().holds if "fast failures" in h.reason], svc.status().holds
