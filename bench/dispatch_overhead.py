"""Dispatch overhead against a baseline measured in the same run.

Baseline: `git clone` of a repository plus `docker run` of the agent image doing `true`.
Measured: an agentic-dispatch `shell` dispatch of `true` on the same repository, from the
call to `completed` (workspace prep, prompt, container, finalise). Prints the ratio; never fails.

    .venv/bin/python bench/dispatch_overhead.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import docker

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.runtime.images import default_image_tag
from agentic_dispatch.service import Dispatcher


def make_repo(path: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    for i in range(200):
        (path / f"file{i}.txt").write_text(f"line {i}\n" * 50)
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(
        ["git", "-C", str(path), "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"], check=True
    )


def time_dispatches(client: docker.DockerClient, repo: Path, task: str, agent: str, runs: int) -> list[float]:
    """Seconds from dispatch to `completed`, per run, through an in-process server on the current root."""
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    svc.start()
    measured = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            res = svc.dispatch(DispatchRequest(repo=str(repo), task=task, agent=agent))
            rec = svc.wait(res.workspace, 120)
            assert rec.status == "completed", rec
            measured.append(time.perf_counter() - t0)
    finally:
        svc.close()
    return measured


def report(baseline_label: str, measured_label: str, baseline: list[float], measured: list[float]) -> None:
    b, m = statistics.median(baseline), statistics.median(measured)
    width = max(len(baseline_label), len(measured_label))
    print(f"{baseline_label:<{width}}: median {b * 1000:.0f} ms over {len(baseline)} runs")
    print(f"{measured_label:<{width}}: median {m * 1000:.0f} ms over {len(measured)} runs")
    print(f"ratio: {m / b:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    image = os.environ.get("AGENTIC_DISPATCH_IMAGE") or default_image_tag()
    client = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = root / "repo"
        make_repo(repo)
        os.environ["AGENTIC_DISPATCH_HOME"] = str(root / "home")
        os.environ["AGENTIC_DISPATCH_IMAGE"] = image

        baseline = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            dest = root / f"plain-{i}"
            subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)
            client.containers.run(image, ["true"], remove=True, volumes={str(dest): {"bind": "/w", "mode": "rw"}})
            baseline.append(time.perf_counter() - t0)

        measured = time_dispatches(client, repo, "true", "shell", args.runs)
    report("baseline (git clone + docker run)", "agentic-dispatch shell dispatch", baseline, measured)


if __name__ == "__main__":
    main()
