"""The figures of a server with a long history and many runs, each against a baseline measured in
the same run. ``bench/run`` prints them as one table; each function here returns its rows.

A row: (figure, ours, baseline, ratio, target). Never fails a run: a figure that cannot be
measured says why in its row.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import docker
from bench.dispatch_overhead import make_repo
from bench.status_scale import make_records, rss_mb
from mcp import Client

from agentic_dispatch.config import load_settings
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore


@dataclass
class Row:
    figure: str
    ours: str
    baseline: str
    ratio: str
    target: str


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def fresh_root(config: str = "") -> Iterator[Path]:
    """A new AGENTIC_DISPATCH_HOME (with ``config`` as its config file) for the block."""
    before = os.environ.get("AGENTIC_DISPATCH_HOME")
    with tempfile.TemporaryDirectory(prefix="agentic-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(config, encoding="utf-8")
        os.environ["AGENTIC_DISPATCH_HOME"] = str(home)
        try:
            yield Path(tmp)
        finally:
            if before is None:
                os.environ.pop("AGENTIC_DISPATCH_HOME", None)
            else:
                os.environ["AGENTIC_DISPATCH_HOME"] = before


def new_server(client: docker.DockerClient, start: bool = True) -> Dispatcher:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    if start:
        svc.start()
    return svc


def timed_dispatch(svc: Dispatcher, repo: Path, task: str = "true") -> float:
    t0 = time.perf_counter()
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 120)
    assert rec.status == "completed", rec.reason
    return time.perf_counter() - t0


# -- first dispatch of a fresh server -----------------------------------------------------------
def first_dispatch(client: docker.DockerClient) -> list[Row]:
    """A server started on a root that has the repository's mirror (an earlier server made it):
    its first dispatch against its own warm dispatches (median of 3)."""
    with fresh_root() as tmp:
        repo = tmp / "repo"
        make_repo(repo)
        earlier = new_server(client)
        timed_dispatch(earlier, repo)
        earlier.close()
        (load_settings()[1].state / "cli-versions.json").unlink(missing_ok=True)  # only the label may answer
        svc = new_server(client)
        try:
            first = timed_dispatch(svc, repo)
            warm = statistics.median(timed_dispatch(svc, repo) for _ in range(3))
        finally:
            svc.close()
    return [Row("first dispatch of a fresh server", ms(first), f"{ms(warm)} (warm)", f"{first / warm:.2f}x", "<= 1.2x")]


# -- completion latency -------------------------------------------------------------------------
def completion_latency(client: docker.DockerClient, runs: int = 50) -> list[Row]:
    """Container exit (the engine's die event) → status.json final (its mtime), per run; the
    baseline is when this process's own event stream hears the same die event."""
    died: dict[str, tuple[int, float]] = {}
    stop = threading.Event()

    def listen(since: int) -> None:
        for e in client.events(since=since, decode=True, filters={"event": "die", "type": "container"}):
            died[e["id"]] = (int(e["timeNano"]), time.time_ns() / 1e9)
            if stop.is_set():
                return

    ours: list[float] = []
    heard: list[float] = []
    with fresh_root() as tmp:
        repo = tmp / "repo"
        make_repo(repo)
        svc = new_server(client)
        threading.Thread(target=listen, args=(int(time.time()) - 1,), daemon=True).start()
        try:
            for _ in range(runs):
                res = svc.dispatch(DispatchRequest(repo=str(repo), task="true", agent="shell"))
                container = svc.store.read(res.workspace).container_id or ""
                rec = svc.wait(res.workspace, 60)
                assert rec.status == "completed", rec.reason
                final_ns = Path(res.path, "status.json").stat().st_mtime_ns
                deadline = time.monotonic() + 5
                while container not in died and time.monotonic() < deadline:
                    time.sleep(0.01)
                if container in died:
                    exit_ns, heard_at = died[container]
                    ours.append((final_ns - exit_ns) / 1e9)
                    heard.append(heard_at - exit_ns / 1e9)
        finally:
            stop.set()
            svc.close()
    p50, p95, b95 = pct(ours, 0.5), pct(ours, 0.95), pct(heard, 0.95)
    return [
        Row(f"completion detected, p50 over {len(ours)} runs", ms(p50), ms(pct(heard, 0.5)), "", ""),
        Row(f"completion detected, p95 over {len(ours)} runs", ms(p95), f"{ms(b95)} (event heard)", "", "<= 200 ms"),
    ]


# -- 20 concurrent dispatches of one remote -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remote_fetches(client: docker.DockerClient, n: int = 20) -> list[Row]:
    """``n`` dispatches at once of one repository served by ``git daemon`` (which logs each fetch)."""
    with fresh_root() as tmp:
        make_repo(tmp / "src")
        subprocess.run(["git", "clone", "-q", "--bare", str(tmp / "src"), str(tmp / "serve" / "r.git")], check=True)
        port = _free_port()
        log = tmp / "daemon.log"
        with log.open("w") as out:
            daemon = subprocess.Popen(
                ["git", "daemon", "--verbose", "--export-all", "--reuseaddr", f"--port={port}",
                 f"--base-path={tmp / 'serve'}", str(tmp / "serve")],
                stderr=out,
            )  # fmt: skip
        try:
            time.sleep(0.5)
            svc = new_server(client, start=False)
            svc.scheduler.set_frozen(True)  # only the fetches matter here: nothing starts
            errors: list[str] = []

            def one() -> None:
                try:
                    svc.dispatch(DispatchRequest(repo=f"git://127.0.0.1:{port}/r.git", task="true", agent="shell"))
                except Exception as e:  # a bench reports, never fails
                    errors.append(str(e))

            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            daemon.terminate()
            daemon.wait(10)
        fetches = len(re.findall(r"Request upload-pack", log.read_text()))
    note = f" ({len(errors)} failed: {errors[0][:60]})" if errors else ""
    return [Row(f"{n} concurrent dispatches of one remote: fetches served", f"{fetches}{note}", f"{n} (a clone each)",
                f"{fetches / n:.2f}x", "1 fetch")]  # fmt: skip


# -- a burst of 50 dispatches on one MCP session ----------------------------------------------
def burst(client: docker.DockerClient, n: int = 50, history: int = 10_000) -> list[Row]:
    """``n`` agentic_dispatch calls at once on one in-process MCP session (limits total = n) on a
    root with ``history`` finished workspaces: time until all run, status latency during the
    burst; the baselines are ``n`` plain ``docker run -d`` at once, and status when idle."""
    image = os.environ["AGENTIC_DISPATCH_IMAGE"]
    t0 = time.perf_counter()
    plain = [client.containers.run(image, ["sleep", "30"], detach=True, init=True) for _ in range(n)]
    plain_s = time.perf_counter() - t0
    for c in plain:
        c.remove(force=True)
    with fresh_root(f"[limits]\ntotal = {n}\npools = {{ shell = {n} }}\n") as tmp:
        repo = tmp / "repo"
        make_repo(repo)
        paths = load_settings()[1]
        make_records(StatusStore.of(paths), history)
        result = anyio.run(_burst_session, client, repo, n)
        all_running, during, idle_ms, peak_rss = result
    p95 = pct(during, 0.95) if during else float("nan")
    return [
        Row(f"{n} dispatches on one session: all running", ms(all_running), f"{ms(plain_s)} ({n} docker run -d)",
            f"{all_running / plain_s:.2f}x", ""),
        Row(f"status during the burst (p95 of {len(during)}), {history} workspaces", f"{p95:.0f} ms",
            f"{idle_ms:.0f} ms (idle)", f"{p95 / idle_ms:.2f}x", "<= 250 ms"),
        Row(f"RSS with {history} workspaces and {n} running", f"{peak_rss:.0f} MB", "", "", "<= 120 MB"),
    ]  # fmt: skip


async def _burst_session(client: docker.DockerClient, repo: Path, n: int) -> tuple[float, list[float], float, float]:
    server = build_server(lambda: Dispatcher(*load_settings(), DockerRuntime(client)))
    during: list[float] = []
    async with Client(server) as mcp:
        await mcp.call_tool("agentic_status", {"limit": 20})
        t = time.perf_counter()
        await mcp.call_tool("agentic_status", {"limit": 20})
        idle_ms = (time.perf_counter() - t) * 1000
        done = anyio.Event()

        async def watch_status() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await mcp.call_tool("agentic_status", {"limit": 20})
                during.append((time.perf_counter() - t) * 1000)
                await anyio.sleep(0.05)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_status)
            async with anyio.create_task_group() as burst_group:
                args = {"repo": str(repo), "task": "sleep 60", "agent": "shell"}
                for _ in range(n):
                    burst_group.start_soon(mcp.call_tool, "agentic_dispatch", args)
            while True:
                res = await mcp.call_tool("agentic_status", {"status": "running", "limit": 1})
                if (res.structured_content or {}).get("counts", {}).get("running", 0) >= n:
                    break
                await anyio.sleep(0.05)
            all_running = time.perf_counter() - t0
            done.set()
        peak = rss_mb()
        await mcp.call_tool("agentic_dispatch_shutdown", {"now": True})
    return all_running, during, idle_ms, peak
