"""How soon ``agentic_watch`` returns once a run ends, against when the run's record says it ended.

    .venv/bin/python bench/watch_latency.py [--runs 10]

Each run waits for a file; an in-process MCP session waits in ``agentic_watch`` (with a cursor) and, once
the watch says it is still waiting, the file is written. Measured from that moment: the watch returning
with the change (ours) and ``status.json`` turning final, its mtime (the baseline: no reader can know
sooner). ``bench/run`` prints the rows in its table. Never fails: a figure, not a pass mark (it was a
test's ``< 1.5 s`` assertion, which a loaded machine could fail with nothing wrong).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "server")]

import anyio  # noqa: E402
import docker  # noqa: E402
from bench.dispatch_overhead import make_repo  # noqa: E402
from bench.figures import Row, fresh_root, ms, pct  # noqa: E402
from mcp import Client  # noqa: E402

from agentic_dispatch import mcp_watch  # noqa: E402
from agentic_dispatch.config import load_settings  # noqa: E402
from agentic_dispatch.mcp_server import build_server  # noqa: E402
from agentic_dispatch.runtime.docker import DockerRuntime  # noqa: E402
from agentic_dispatch.runtime.images import default_image_tag  # noqa: E402
from agentic_dispatch.service import Dispatcher  # noqa: E402

WAIT_FOR_GO = "while [ ! -e .go ]; do sleep 0.05; done"


def watch_latency(client: docker.DockerClient, runs: int = 10) -> list[Row]:
    """Rows: p50 and p95 of (watch returned - file written) against (record final - file written)."""
    heartbeat, mcp_watch.HEARTBEAT_SECONDS = mcp_watch.HEARTBEAT_SECONDS, 0.2  # "still waiting" soon
    try:
        with fresh_root() as tmp:
            repo = tmp / "repo"
            make_repo(repo)
            ours, record = anyio.run(_session, client, repo, runs)
    finally:
        mcp_watch.HEARTBEAT_SECONDS = heartbeat
    if not ours:
        return [Row("agentic_watch after a run ends", "not measured: no run ended", "", "", "")]
    rows = []
    for q in (0.5, 0.95):
        mine, base = pct(ours, q), pct(record, q)
        rows.append(
            Row(f"agentic_watch after a run ends, p{round(q * 100)} of {len(ours)}", ms(mine),
                f"{ms(base)} (record final)", f"{mine / base:.2f}x" if base > 0 else "", "<= 1.5 s")
        )  # fmt: skip
    return rows


async def _session(client: docker.DockerClient, repo: Path, runs: int) -> tuple[list[float], list[float]]:
    server = build_server(lambda: Dispatcher(*load_settings(), DockerRuntime(client)))
    ours: list[float] = []
    record: list[float] = []
    async with Client(server, read_timeout_seconds=120) as mcp:
        for _ in range(runs):
            timed = await _one_run(mcp, repo)
            if timed is not None:
                ours.append(timed[0])
                record.append(timed[1])
    return ours, record


async def _one_run(mcp: Client, repo: Path) -> tuple[float, float] | None:
    """(watch returned, record final), each in seconds after the file was written; None if the run never ended."""
    res = await mcp.call_tool("agentic_dispatch", {"repo": str(repo), "task": WAIT_FOR_GO, "agent": "shell"})
    started = res.structured_content or {}
    now = await mcp.call_tool("agentic_watch", {"timeout_seconds": 0})
    cursor = (now.structured_content or {}).get("cursor")
    waiting = anyio.Event()
    written: list[float] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        if "no change yet" in (message or ""):
            waiting.set()

    async def go() -> None:
        await waiting.wait()
        written.append(time.time())
        (Path(str(started["repo_path"])) / ".go").touch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        res = await mcp.call_tool(
            "agentic_watch", {"timeout_seconds": 30, "cursor": cursor}, progress_callback=progress
        )
        returned = time.time()
        tg.cancel_scope.cancel()
    if (res.structured_content or {}).get("timed_out") or not written:
        return None
    final = Path(str(started["path"]), "status.json").stat().st_mtime
    return returned - written[0], final - written[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    client = docker.from_env()
    os.environ.setdefault("AGENTIC_DISPATCH_IMAGE", default_image_tag())
    for row in watch_latency(client, args.runs):
        print(f"{row.figure}: {row.ours} against {row.baseline} ({row.ratio}; target {row.target})")


if __name__ == "__main__":
    main()
