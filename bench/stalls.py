"""The stall check's cost: one timer tick's look at ``n`` running agents (their logs and work trees,
``service/runs/stalls.py``), against a whole tick without it (stall_seconds = 0), both measured in
the same run on the same ``n`` real running containers. Never fails.

    .venv/bin/python bench/stalls.py [--agents 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import docker
from bench.dispatch_overhead import make_repo
from bench.figures import Row, fresh_root, new_server

from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.base import LABEL_ROOT

ROUNDS = 20


def stall_check(client: docker.DockerClient, n: int = 50) -> list[Row]:
    """``n`` agents running ``sleep``; the median over :data:`ROUNDS` of a tick without the check and
    of the check of all ``n`` (each forced, as if every one were due at once: the worst tick)."""
    with fresh_root(f"[limits]\ntotal = {n}\npools = {{ shell = {n} }}\n") as tmp:
        repo = tmp / "repo"
        make_repo(repo)
        svc = new_server(client, start=False)
        try:
            for i in range(n):
                svc.dispatch(DispatchRequest(repo=str(repo), task=f"sleep 600 # {i}", agent="shell"))
            running = [r for r in svc.store.active() if r.record and r.record.status == Status.RUNNING]
            recs = [r.record for r in running if r.record is not None]
            watch = svc.recovery.stalls
            seconds, watch.seconds = watch.seconds, 0
            ticks = []
            for _ in range(ROUNDS):
                t = time.perf_counter()
                svc.recovery.reconcile()
                ticks.append(time.perf_counter() - t)
            watch.seconds = seconds
            checks = []
            for _ in range(ROUNDS):
                t = time.perf_counter()
                for rec in recs:
                    watch.observe(rec, force=True)
                checks.append(time.perf_counter() - t)
        finally:
            svc.close()
            for c in client.containers.list(all=True, filters={"label": f"{LABEL_ROOT}={svc.paths.root_id}"}):
                c.remove(force=True)
    tick, check = statistics.median(ticks), statistics.median(checks)
    return [
        Row(f"stall check of {len(recs)} running agents (one tick, all due)", f"{check * 1000:.2f} ms",
            f"{tick * 1000:.1f} ms (a tick without it)", f"{check / tick:.3f}x", "<= 0.05x"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50)
    for row in stall_check(docker.from_env(), ap.parse_args().agents):
        print(f"{row.figure}: {row.ours}; baseline {row.baseline}; ratio {row.ratio}")


if __name__ == "__main__":
    main()
