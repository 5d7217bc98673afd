"""Runs with network transfer (``[runtime] transfer = "network"``) on the local engine: the container
mounts nothing of this disk, fetches its workspace through the run gateway and sends its results
back, and the workspace then holds what a mounted run leaves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git

GATEWAY = '[runtime]\ntransfer = "network"\ngateway_listen = "{address}:0"\ngateway_url = "http://host.docker.internal"\n'


def docker0_address(client: docker.DockerClient) -> str:
    """The host's address on the default bridge: what ``host.docker.internal`` is in a container."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    return str(config.get("Gateway") or "172.17.0.1")


@pytest.fixture
def networked(docker_env: str, docker_client: docker.DockerClient, isolated_home: Path) -> Iterator[Dispatcher]:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        GATEWAY.format(address=docker0_address(docker_client)), encoding="utf-8"
    )
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def test_a_network_run_commits_and_completes_with_no_bind_mount(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = networked
    task = "echo hello > work.txt && git add work.txt && git commit -qm 'agent work' && echo left > loose.txt"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 120)
    ws = svc.store.paths(res.workspace)
    print((ws.logs / "agent-shell.log").read_text())
    assert rec.status == Status.COMPLETED, rec.reason
    assert git(ws.repo, "log", "-1", "--format=%s", rec.branch) == "agent work"
    assert (ws.repo / "work.txt").read_text() == "hello\n"
    assert (ws.repo / "loose.txt").read_text() == "left\n"
