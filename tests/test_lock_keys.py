"""Lock keys on real containers: two servers on one root never run two runs with one key at once,
a queued run says which run holds its lock, and a run without a key is never held by them."""

from __future__ import annotations

import io
import time
from pathlib import Path

import docker
import pytest
from rich.console import Console

from agentic_dispatch.cli_views import print_status
from agentic_dispatch.config import load_settings
from agentic_dispatch.models import Status
from agentic_dispatch.runtime.base import LABEL_ROOT, LABEL_WORKSPACE
from agentic_dispatch.service import Dispatcher

from .test_scheduler import new_dispatcher, shell, write_config

pytestmark = pytest.mark.docker

# The agent waits until the test lets it go: the holder runs exactly as long as the test needs.
HOLD = "until [ -e /agentic/logs/go ]; do sleep 0.1; done; echo held > held.txt"


def engine_intervals(client: docker.DockerClient, since: int) -> list[tuple[str, str]]:
    """This root's container start/die events since ``since``, in the engine's order, as (event, workspace)."""
    root = load_settings()[1].root_id
    events = client.events(
        since=since,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "label": [f"{LABEL_ROOT}={root}"], "event": ["start", "die"]},
    )
    return [(ev["status"], ev["Actor"]["Attributes"][LABEL_WORKSPACE]) for ev in events]


def most_at_once(events: list[tuple[str, str]], names: set[str]) -> int:
    running = peak = 0
    for kind, workspace in events:
        if workspace in names:
            running += 1 if kind == "start" else -1
            peak = max(peak, running)
    return peak


def table(svc: Dispatcher, workspace: str) -> str:
    out = io.StringIO()
    print_status(svc.status(workspace), False, Console(file=out, width=300, highlight=False))
    return out.getvalue()


def test_two_servers_never_run_two_runs_with_one_lock_key_at_once_and_an_unkeyed_run_is_not_held(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\n")
    first, second = new_dispatcher(docker_client), new_dispatcher(docker_client)  # two servers, one root
    since = int(time.time()) - 1
    try:
        holder = first.dispatch(shell(user_repo, HOLD, lock="db migrations"))
        assert holder.status == "running"
        waiter = second.dispatch(shell(user_repo, "echo after > after.txt", lock="db migrations "))
        assert waiter.status == "queued"  # a free slot, and still it waits: the other server's run holds "db"

        waits = f"lock db migrations held by {holder.workspace}"
        for svc in (first, second):
            row = svc.status(waiter.workspace).workspaces[0]
            assert row.status == Status.QUEUED and row.waiting_for == waits
            assert f"waiting for {waits}" in table(svc, waiter.workspace)
        assert second.watch([waiter.workspace], timeout=0).workspaces[0].waiting_for == waits

        free = second.dispatch(shell(user_repo, "echo free > free.txt"))
        assert free.status == "running"
        assert second.wait(free.workspace, 60).status == Status.COMPLETED
        assert first.store.read(holder.workspace).status == Status.RUNNING  # the unkeyed run did not wait for it
        assert first.store.read(waiter.workspace).status == Status.QUEUED

        (first.store.paths(holder.workspace).logs / "go").write_text("", encoding="utf-8")
        assert first.wait(holder.workspace, 60).status == Status.COMPLETED
        assert second.wait(waiter.workspace, 60).status == Status.COMPLETED
        assert second.status(waiter.workspace).workspaces[0].waiting_for is None
        assert first.store.read(waiter.workspace).lock_key == "db migrations"
    finally:
        first.close()
        second.close()
    events = engine_intervals(docker_client, since)
    assert most_at_once(events, {holder.workspace, waiter.workspace}) == 1
    # The engine saw the holder die before the waiter started, and the unkeyed run start in between.
    assert events.index(("die", holder.workspace)) < events.index(("start", waiter.workspace))
    assert events.index(("start", holder.workspace)) < events.index(("start", free.workspace))
    assert events.index(("die", free.workspace)) < events.index(("die", holder.workspace))
