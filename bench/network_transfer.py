"""Network transfer against mounts, and the run gateway's git against plain smart HTTP, each in one run.

* dispatch → the agent running, of a ``shell`` run, with ``[runtime] transfer = "network"`` against the
  same with mounts, on the same engine, in turns (the network run fetches its inputs and clones its
  branch through the gateway before its job starts; target ≤ 1.5×). The job's first line connects to a
  listener of the bench, which notes the time. Also dispatch → completed (the network run then pushes
  and sends its results back);
* a ``git clone`` of a workspace through the run gateway (its token, its checks) against a ``git clone``
  of the same clone over plain smart HTTP (``git http-backend`` behind the standard library's CGI
  server) on the same machine (target ≤ 1.3×). The repository: 20,000 commits, about 200 MB
  (``--quick``: 2,000 commits, about 20 MB).

    .venv/bin/python -m bench.network_transfer [--quick]    (or bench/run, with the others)
"""

from __future__ import annotations

import argparse
import os
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from http.server import ThreadingHTTPServer
from pathlib import Path

import docker
from bench.dispatch_overhead import make_repo
from bench.figures import Row, fresh_root, ms

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from http.server import CGIHTTPRequestHandler


def bridge_address(client: docker.DockerClient) -> str:
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    return str(config.get("Gateway") or "172.17.0.1")


def network_config(client: docker.DockerClient) -> str:
    return (
        f'[runtime]\ntransfer = "network"\ngateway_listen = "{bridge_address(client)}:0"\n'
        'gateway_url = "http://host.docker.internal"\n'
    )


class _Arrivals(socketserver.ThreadingTCPServer):
    """When each job reached its first line: the job connects to this listener on the host and names
    itself, so "the agent is running" is seen the same way whether its workspace is mounted or fetched."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Arrival)
        self.address = f"{host}/{self.server_address[1]}"
        self.seen: dict[str, float] = {}
        self.arrived = threading.Condition()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def task(self, name: str) -> str:
        return f"echo {name} > /dev/tcp/{self.address}"

    def wait(self, name: str) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: name in self.seen, 300):
                raise RuntimeError(f"job {name} never reported that it runs")
            return self.seen[name]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Arrival(socketserver.StreamRequestHandler):
    server: _Arrivals

    def handle(self) -> None:
        at = time.perf_counter()
        name = self.rfile.readline().decode(errors="replace").strip()
        with self.server.arrived:
            self.server.seen[name] = at
            self.server.arrived.notify_all()


def _dispatch_times(svc: Dispatcher, repo: Path, arrivals: _Arrivals) -> tuple[float, float]:
    """(dispatch → the job running, dispatch → the run completed)."""
    name = uuid.uuid4().hex
    t0 = time.perf_counter()
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=arrivals.task(name), agent="shell"))
    rec = svc.wait(res.workspace, 300)
    if rec.status != Status.COMPLETED:
        raise RuntimeError(f"a run ended {rec.status}: {rec.reason}")
    return arrivals.wait(name) - t0, time.perf_counter() - t0


def _server(client: docker.DockerClient) -> Dispatcher:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    svc.start()
    return svc


def dispatch_rows(client: docker.DockerClient, runs: int) -> list[Row]:
    """A mounted run and a network run in turns, each to its end before the next (a busy moment of the
    machine, such as the clean-up of a benchmark before, falls on both alike)."""
    mounted, network = [], []
    arrivals = _Arrivals(bridge_address(client))
    with tempfile.TemporaryDirectory(prefix="agentic-bench-repo-") as tmp:
        repo = Path(tmp) / "repo"
        make_repo(repo)
        with fresh_root():
            by_mount = _server(client)
            try:
                with fresh_root(network_config(client)):
                    by_network = _server(client)
                    try:
                        for _ in range(runs):
                            mounted.append(_dispatch_times(by_mount, repo, arrivals))
                            network.append(_dispatch_times(by_network, repo, arrivals))
                    finally:
                        by_network.close()
            finally:
                by_mount.close()
                arrivals.close()
    rows = []
    for i, what, target in ((0, "agent running", "<= 1.5x"), (1, "completed", "")):
        m, n = statistics.median(t[i] for t in mounted), statistics.median(t[i] for t in network)
        rows.append(Row(f"dispatch → {what}, network transfer", ms(n), f"{ms(m)} (mounts)", f"{n / m:.2f}x", target))
    return rows


def make_big_repo(path: Path, commits: int, blob_bytes: int) -> None:
    """``commits`` commits, each adding a file of ``blob_bytes`` random bytes (git cannot compress them)."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    proc = subprocess.Popen(["git", "-C", str(path), "fast-import", "--quiet"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(commits):
        blob = os.urandom(blob_bytes)
        message = f"commit {i}".encode()
        proc.stdin.write(b"commit refs/heads/main\ncommitter b <b@b> %d +0000\n" % (1_700_000_000 + i))
        proc.stdin.write(b"data %d\n%s\n" % (len(message), message))
        proc.stdin.write(b"M 644 inline files/%d/%d.bin\ndata %d\n%s\n" % (i % 100, i, len(blob), blob))
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("git fast-import failed")
    subprocess.run(["git", "-C", str(path), "checkout", "-q", "main"], check=True)


def _plain_http(root: Path, clone: Path) -> tuple[ThreadingHTTPServer, str]:
    """A bare copy of ``clone`` served by ``git http-backend`` behind the standard library's CGI
    server: plain smart HTTP, no checks. (Under root the CGI server runs scripts as ``nobody``:
    the copy and its folders are made readable to it.)"""
    root.chmod(0o755)
    root.parent.chmod(0o755)
    subprocess.run(["git", "clone", "-q", "--bare", "--no-hardlinks", str(clone), str(root / "ws")], check=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody", str(root)], check=True)
    cgi = root / "cgi-bin"
    cgi.mkdir()
    script = cgi / "git"
    script.write_text(
        f"#!/bin/sh\nexport GIT_PROJECT_ROOT={root} GIT_HTTP_EXPORT_ALL=1 HOME=/nonexistent\nexec git http-backend\n",
        encoding="utf-8",
    )
    script.chmod(0o755)

    class Handler(CGIHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/cgi-bin/git"


def _clone_seconds(url: str, dest: Path, header: str | None) -> float:
    extra = ["-c", f"http.extraHeader={header}"] if header else []
    t0 = time.perf_counter()
    subprocess.run(["git", *extra, "clone", "-q", "--no-checkout", url, str(dest)], check=True)
    return time.perf_counter() - t0


def fetch_rows(client: docker.DockerClient, commits: int, rounds: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="agentic-bench-big-") as tmp:
        root = Path(tmp)
        repo = root / "big"
        make_big_repo(repo, commits, 10_000)
        with fresh_root(network_config(client)):
            settings, paths = load_settings()
            svc = Dispatcher(settings, paths, DockerRuntime(client))
            svc.start()
            try:
                res = svc.dispatch(DispatchRequest(repo=str(repo), task="sleep 3600", agent="shell"))
                deadline = time.monotonic() + 600
                while svc.record(res.workspace).status != Status.RUNNING:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the run did not start")
                    time.sleep(0.2)
                cid = svc.record(res.workspace).container_id
                env = dict(e.split("=", 1) for e in client.api.inspect_container(cid)["Config"]["Env"])
                gateway = env["AGENTIC_GATEWAY"].replace("host.docker.internal", bridge_address(client)) + "/git"
                header = f"Authorization: Bearer {env['AGENTIC_TOKEN']}"
                clone = svc.store.paths(res.workspace).repo
                served = root / "served"
                served.mkdir()
                plain, url = _plain_http(served, clone)
                ours, base = [], []
                try:
                    for i in range(rounds):
                        base.append(_clone_seconds(f"{url}/ws", root / f"plain-{i}", None))
                        ours.append(_clone_seconds(gateway, root / f"ours-{i}", header))
                finally:
                    plain.shutdown()
                svc.cancel(res.workspace)
            finally:
                svc.close()
    o, b = statistics.median(ours), statistics.median(base)
    label = f"clone of {commits:,} commits (~{commits * 10 // 1000} MB) through the gateway"
    return [Row(label, ms(o), f"{ms(b)} (plain smart HTTP)", f"{o / b:.2f}x", "<= 1.3x")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    client = docker.from_env()
    rows = dispatch_rows(client, 3 if args.quick else 7) + fetch_rows(client, 2000 if args.quick else 20_000, 3)
    for r in rows:
        print(f"{r.figure}: {r.ours} against {r.baseline}: {r.ratio} (target {r.target})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
