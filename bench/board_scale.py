"""The board's first byte with a long history, against the same server's floor measured in the same run.

For N workspaces (finished records written straight to disk, as bench/status_scale.py makes them), a real
``agentic-dispatch serve --transport http`` with a token; one signed-in request warms it (the first status
builds the index); then, over plain HTTP, the time from sending ``GET /`` to the response's first byte
(median of repeated requests: six columns of 20 cards from the index, the queue's state), against the
same for the board's stylesheet (``GET /static/board.css``: the HTTP stack, the checks, no service call).

Prints the figures and the ratio; never fails.

    .venv/bin/python bench/board_scale.py [--workspaces 1000 10000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "server")]

from bench.figures import Row, fresh_root  # noqa: E402
from bench.status_scale import make_records  # noqa: E402

from agentic_dispatch.config import load_settings  # noqa: E402
from agentic_dispatch.store import StatusStore  # noqa: E402

TOKEN = "bench-token-0123456789abcdefghij"  # pragma: allowlist secret
TARGET_MS = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_byte_ms(port: int, path: str) -> float:
    """Milliseconds from sending ``GET path`` to the status line and headers having arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.connect()
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        elapsed = (time.perf_counter() - t0) * 1000
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}")
        return elapsed
    finally:
        conn.close()


def _serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENTIC_DISPATCH_HOME": str(home), "AGENTIC_DISPATCH_HTTP_TOKEN": TOKEN}
    argv = [sys.executable, "-m", "agentic_dispatch", "serve", "--transport", "http", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.1)


def one_size(n: int, repeat: int) -> tuple[float, float, float]:
    """(board median ms, stylesheet median ms, warm-up ms) at ``n`` workspaces."""
    with fresh_root() as tmp:
        home = tmp / "home"
        make_records(StatusStore.of(load_settings()[1]), n)
        port = _free_port()
        proc = _serve(home, port)
        try:
            warm = first_byte_ms(port, "/")  # waits for the service, builds the index
            board = statistics.median(first_byte_ms(port, "/") for _ in range(repeat))
            floor = statistics.median(first_byte_ms(port, "/static/board.css") for _ in range(repeat))
        finally:
            proc.terminate()
            proc.wait(15)
    return board, floor, warm


def board_rows(sizes: list[int], repeat: int = 15) -> list[Row]:
    rows = []
    for n in sizes:
        board, floor, warm = one_size(n, repeat)
        print(
            f"board at {n:>6} workspaces: first byte {board:6.1f} ms   stylesheet {floor:5.1f} ms   "
            f"ratio {board / floor:5.1f}x   first request (builds the index) {warm:.0f} ms   "
            f"(target <= {TARGET_MS:.0f} ms)",
            file=sys.stderr,
        )
        rows.append(
            Row(f"board first byte at {n} workspaces", f"{board:.0f} ms", f"{floor:.1f} ms (stylesheet)",
                f"{board / floor:.1f}x", f"<= {TARGET_MS:.0f} ms")
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspaces", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    for row in board_rows(args.workspaces, args.repeat):
        print(f"{row.figure}: {row.ours} (baseline {row.baseline}, {row.ratio}; target {row.target})")


if __name__ == "__main__":
    main()
