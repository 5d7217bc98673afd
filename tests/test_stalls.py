"""Stalled agents on real containers: a run that sleeps silently past ``limits.stall_seconds`` is
shown stalled (its row, one ``stalled`` event), one that keeps writing its log is not, and with
``stall_action = "stop"`` the silent one ends ``failed`` saying it stalled."""

from __future__ import annotations

from pathlib import Path

import docker

from agentic_dispatch.models import Change, DispatchRequest, Status
from agentic_dispatch.service import Dispatcher

from .conftest import wait_for
from .test_scheduler import new_dispatcher, write_config

SILENT = "sleep 120"
CHATTY = "for i in $(seq 1 400); do echo working $i; sleep 0.2; done"


def _changes(svc: Dispatcher, name: str) -> list[Change]:
    return svc.changes(0, {name})[0]


def test_a_silent_run_is_shown_stalled_once_and_a_run_that_keeps_writing_its_log_is_not(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, "[limits]\ntotal = 4\nstall_seconds = 2\n")
    svc = new_dispatcher(docker_client)
    try:
        silent = svc.dispatch(DispatchRequest(repo=str(user_repo), task=SILENT, agent="shell")).workspace
        chatty = svc.dispatch(DispatchRequest(repo=str(user_repo), task=CHATTY, agent="shell")).workspace

        def stalled(name: str) -> list[Change]:
            return [c for c in _changes(svc, name) if c.kind == "stalled"]

        wait_for(lambda: bool(stalled(silent)), 60, "a stalled event for the silent run")
        row = svc.status(workspace=silent).workspaces[0]
        assert row.status == Status.RUNNING and row.stalled_since is not None
        assert stalled(silent)[0].reason is not None and "no activity for" in (stalled(silent)[0].reason or "")
        # the chatty run ran as long as the silent one took to stall, and wrote all along
        assert svc.status(workspace=chatty).workspaces[0].stalled_since is None and not stalled(chatty)

        svc.cancel(silent)
        assert len(stalled(silent)) == 1  # one line per stall, however many ticks saw it
        assert svc.status(workspace=silent).workspaces[0].stalled_since is None  # only a running agent stalls
    finally:
        svc.close()


def test_with_stall_action_stop_a_silent_run_ends_failed_saying_it_stalled(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    write_config(isolated_home, '[limits]\nstall_seconds = 2\nstall_action = "stop"\n')
    svc = new_dispatcher(docker_client)
    try:
        name = svc.dispatch(DispatchRequest(repo=str(user_repo), task=SILENT, agent="shell")).workspace
        rec = svc.wait(name, 60)
        assert rec.status == Status.FAILED, rec
        assert rec.reason is not None and rec.reason.startswith("the agent stalled for "), rec.reason
        assert [c.kind for c in _changes(svc, name)][-2:] == ["stalled", "failed"]
    finally:
        svc.close()
