"""Runs on a Docker Swarm (``[runtime] engine = "swarm"``), each figure against a baseline on the same
swarm in the same run. The swarm is the tests' (tests/engines.py): a manager and two workers, each a
Docker engine in namespaces of its own on this machine, holding the shell image.

* dispatch → the agent's task running on the swarm, against ``docker service create --replicas 1
  --restart-condition none`` (the service a run is) of the same image and command by hand, to its
  task running (target ≤ 1.3×). Each start begins on a quiet swarm: the task and container of the
  one before are gone from every node, so neither pays for the other's clean-up;
* 20 ``shell`` runs of ``sleep 3`` spread over the 3 nodes, against the same 20 runs held to one node
  (``placement = ["node.role == manager"]``), with the same per-node room: each run reserves one CPU
  and every node offers this machine's CPUs, so a node takes that many runs at once. The ratio (wall
  time, 3 nodes / 1 node) shows the runs really spread: ideally 1/3.

    .venv/bin/python -m bench.swarm [--quick]    (or bench/run, with the others)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docker
import docker.types
from bench.dispatch_overhead import make_repo
from bench.figures import Row, fresh_root, ms

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.images import default_image_tag
from agentic_dispatch.runtime.swarm import SwarmRuntime
from agentic_dispatch.service import Dispatcher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import engines


def _config(swarm: engines.Swarm, extra: str = "") -> str:
    return (
        f'drain_interval_seconds = 1\n[runtime]\nengine = "swarm"\ngateway_listen = "{swarm.host_address}:0"\n{extra}'
    )


def _service(swarm: engines.Swarm) -> Dispatcher:
    settings, paths = load_settings()
    runtime = SwarmRuntime(docker_host=swarm.docker_host, placement=settings.runtime.placement)
    svc = Dispatcher(settings, paths, runtime)
    svc.start()
    return svc


def _until(api: docker.APIClient, service_id: str, states: tuple[str, ...], deadline: float) -> None:
    """Until the service's task is in one of ``states``."""
    while True:
        tasks = api.tasks(filters={"service": service_id})
        if tasks and tasks[0]["Status"]["State"] in states:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the task never reached {states}: {tasks}")
        time.sleep(0.02)


def _quiet(swarm: engines.Swarm, deadline: float) -> None:
    """Until no node holds a container and the manager no task or service."""
    while swarm.leftovers():
        if time.monotonic() > deadline:
            raise RuntimeError("the swarm never became quiet")
        time.sleep(0.05)


def start_rows(swarm: engines.Swarm, repo: Path, runs: int) -> list[Row]:
    """Dispatch → task running, against a service made by hand → task running, one of each in turn (a busy
    moment of the machine falls on both alike), each job left to finish before the next starts."""
    api = docker.APIClient(base_url=swarm.docker_host, version="1.41", timeout=60)
    ours, by_hand = [], []
    try:
        with fresh_root(_config(swarm)):
            svc = _service(swarm)
            try:
                for i in range(runs):
                    _quiet(swarm, time.monotonic() + 120)
                    t0 = time.perf_counter()
                    res = svc.dispatch(DispatchRequest(repo=str(repo), task="sleep 2", agent="shell"))
                    service_id = svc.record(res.workspace).container_id
                    if service_id is None:
                        raise RuntimeError(f"the run did not start: {svc.record(res.workspace).reason}")
                    _until(api, service_id, ("running", "complete"), time.monotonic() + 120)
                    ours.append(time.perf_counter() - t0)
                    if svc.wait(res.workspace, 120).status != Status.COMPLETED:
                        raise RuntimeError(f"a run ended {svc.record(res.workspace).status}")

                    _quiet(swarm, time.monotonic() + 120)
                    t0 = time.perf_counter()
                    made = api.create_service(
                        docker.types.TaskTemplate(
                            docker.types.ContainerSpec(swarm.image, command=["sleep", "2"]),
                            restart_policy=docker.types.RestartPolicy(condition="none"),
                        ),
                        name=f"by-hand-{i}",
                        mode=docker.types.ServiceMode("replicated", replicas=1),
                    )
                    _until(api, made["ID"], ("running", "complete"), time.monotonic() + 120)
                    by_hand.append(time.perf_counter() - t0)
                    _until(api, made["ID"], ("complete",), time.monotonic() + 120)
                    api.remove_service(made["ID"])
            finally:
                svc.close()
    finally:
        api.close()
    o, b = statistics.median(ours), statistics.median(by_hand)
    return [
        Row("swarm: dispatch → agent's task running", ms(o), f"{ms(b)} (service create)", f"{o / b:.2f}x", "<= 1.3x")
    ]


def _wall(swarm: engines.Swarm, repo: Path, runs: int, extra: str) -> tuple[float, set[str]]:
    with fresh_root(_config(swarm, f"{extra}[limits]\ntotal = {runs}\n[resources]\ncpus = 1\n")):
        svc = _service(swarm)
        try:
            t0 = time.perf_counter()
            names = [
                svc.dispatch(DispatchRequest(repo=str(repo), task="sleep 3", agent="shell")).workspace
                for _ in range(runs)
            ]
            records = [svc.wait(name, 600) for name in names]
            wall = time.perf_counter() - t0
        finally:
            svc.close()
    bad = [r for r in records if r.status != Status.COMPLETED]
    if bad:
        raise RuntimeError(f"{len(bad)} run(s) did not complete: {bad[0].reason}")
    return wall, {str(r.node) for r in records}


def spread_rows(swarm: engines.Swarm, repo: Path, runs: int) -> list[Row]:
    """``runs`` runs over every node, against the same runs on the manager alone."""
    spread, nodes = _wall(swarm, repo, runs, "")
    one, _ = _wall(swarm, repo, runs, 'placement = ["node.role == manager"]\n')
    return [
        Row(
            f"swarm: {runs} runs on {len(nodes)} nodes (wall)",
            f"{spread:.1f} s",
            f"{one:.1f} s (1 node)",
            f"{spread / one:.2f}x",
            f"~{1 / len(swarm.nodes):.2f}x",
        )
    ]


def rows(quick: bool = False) -> list[Row]:
    client = docker.from_env()
    try:
        template = engines.engine_template(client, default_image_tag())
    finally:
        client.close()
    with tempfile.TemporaryDirectory(prefix="agentic-bench-repo-") as tmp, engines.swarm(template) as swarm:
        repo = Path(tmp) / "repo"
        make_repo(repo)
        before = os.environ.get("AGENTIC_DISPATCH_IMAGE")
        os.environ["AGENTIC_DISPATCH_IMAGE"] = swarm.image  # the shell image every node holds
        try:
            return [*start_rows(swarm, repo, 3 if quick else 8), *spread_rows(swarm, repo, 8 if quick else 20)]
        finally:
            if before is None:
                del os.environ["AGENTIC_DISPATCH_IMAGE"]
            else:
                os.environ["AGENTIC_DISPATCH_IMAGE"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    for row in rows(args.quick):
        print(f"{row.figure:48} {row.ours:>12} {row.baseline:>22} {row.ratio:>8} {row.target:>8}")


if __name__ == "__main__":
    main()
