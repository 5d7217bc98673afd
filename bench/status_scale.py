"""Status and the idle server with a long history, against baselines measured in the same run.

For N workspaces (made here: finished records written straight to disk):
- status: ``agentic_status(limit=20)`` (median of repeated calls, index warm) against reading and
  parsing every ``status.json`` (the baseline: what status did before the index);
- the first status of a fresh server (it builds the index from the records);
- idle: CPU (share of one core) and RSS of a started server over ``--idle`` seconds, against the
  same with no workspaces at all.

Prints ratios with the absolute figures beside them; never fails.

    .venv/bin/python bench/status_scale.py [--workspaces 1000 10000] [--idle 30]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import docker

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

FINISHED = [Status.COMPLETED, Status.FAILED, Status.BLOCKED, Status.CANCELLED]


def make_records(store: StatusStore, n: int) -> None:
    """``n`` finished records, written without fsync (setting up is not what is measured)."""
    for i in range(n):
        rec = WorkspaceRecord(
            name=f"org{i % 7}/repo{i % 41}/w-{i:06d}",
            status=FINISHED[i % len(FINISHED)],
            agent="shell",
            repo="org/repo",
            org=f"org{i % 7}",
            repo_name=f"repo{i % 41}",
            origin_url="https://example.invalid/org/repo.git",
            task="echo hi " * 40,
            branch=f"agent/w-{i}",
            template="coding",
            timeout_seconds=3600,
            runs=1 + i % 3,
            question="a reason or a question " * 10 if i % 2 else None,
            updated_at=f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i // 60) % 60:02d}Z",
        )
        path = store.paths(rec.name).status
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rec.model_dump_json(indent=2), encoding="utf-8")


def median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def idle(client: docker.DockerClient, seconds: float) -> tuple[float, float]:
    """(CPU share of one core, RSS in MB) of a started server on the current root over ``seconds``."""
    settings, paths = load_settings()
    svc = Dispatcher(settings.model_copy(update={"drain_interval_seconds": 5.0}), paths, DockerRuntime(client))
    svc.start()
    try:
        time.sleep(3)  # the start-up reconcile (and index build) is not idle time
        gc.collect()
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        time.sleep(seconds)
        cpu1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rss = rss_mb()
    finally:
        svc.close()
    used = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return used / (t1 - t0), rss


def one_size(client: docker.DockerClient, n: int, idle_seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="agentic-bench-") as home:
        os.environ["AGENTIC_DISPATCH_HOME"] = home
        settings, paths = load_settings()
        store = StatusStore.of(paths)
        make_records(store, n)
        svc = Dispatcher(settings, paths, DockerRuntime(client))
        t0 = time.perf_counter()
        first = svc.status(limit=20)
        build_ms = (time.perf_counter() - t0) * 1000
        assert sum(first.counts.values()) == n, first.counts
        baseline = median_ms(store.list, 3)
        ours = median_ms(lambda: svc.status(limit=20), 7)
        print(
            f"status at {n:>6} workspaces: {ours:7.1f} ms   parse-all baseline {baseline:7.1f} ms   "
            f"ratio {ours / baseline:5.2f}x   (target <= 100 ms and <= 0.25x)"
        )
        print(f"first status of a fresh server at {n} (builds the index): {build_ms:.0f} ms")
        if idle_seconds > 0:
            cpu, rss = idle(client, idle_seconds)
            print(f"idle at {n:>6} workspaces: CPU {cpu * 100:5.2f} % of a core, RSS {rss:5.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspaces", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement per size (0: skip)")
    args = ap.parse_args()
    client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="agentic-bench-") as home:
        os.environ["AGENTIC_DISPATCH_HOME"] = home
        if args.idle > 0:
            cpu, rss = idle(client, args.idle)
            print(f"idle with no workspaces (baseline): CPU {cpu * 100:5.2f} % of a core, RSS {rss:5.0f} MB")
    for n in args.workspaces:
        one_size(client, n, args.idle if n == max(args.workspaces) else 0)


if __name__ == "__main__":
    main()
