"""How soon a host can talk to the server: spawn → ``initialize`` answered, ours against a bare MCP SDK
server with one tool, measured in the same run.

    .venv/bin/python bench/startup.py [--runs 10]

Each round spawns, in turn, the bare server, ``.venv/bin/agentic-dispatch serve`` and ``scripts/serve``
(set up already: the first, untimed, spawn of it installs what is missing), sends ``initialize`` at once
(as hosts do: the request waits in the pipe) and times its answer, then ``tools/list``'s. Codex CLI sends its
first model request about 1.1 s after it spawns a server: an answer later than that starts the session
without our tools. The floor is the bare server: the MCP SDK's own import is most of it.

The service comes up in the background once the tools are listed. The first tool call, ``agentic_status``:
sent 0.5 s after ``tools/list`` was answered (a host's model takes at least that long to ask for a tool)
against the first call of a server that was given 3 s (surely up: what is left is the service's own first-call
cost, which the next calls do not pay); and sent at once (a script, not a model: it waits for the rest of the
service's start) against the next calls (warm). ``bench/run`` prints the rows in its table. Never fails:
figures, not pass marks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "server")]

from bench.figures import Row, fresh_root, ms  # noqa: E402

CODEX_FIRST_REQUEST = 1.1  # seconds from spawn to Codex CLI's first model request (measured, 0.169)
MODEL_TURN = 0.5  # seconds: the least a model takes to answer the host's request with a tool call
SURELY_UP = 3.0  # seconds after tools/list: the service has come up by then

BARE_SERVER = '''\
from mcp.server.mcpserver import MCPServer

server = MCPServer("bare")


@server.tool()
def echo(text: str) -> str:
    """Say it back."""
    return text


server.run("stdio")
'''


class Session:
    """A server spawned on stdio, spoken to in raw JSON-RPC lines (no client library in the way)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        self._next_id = 0
        self._watchdog = threading.Timer(120, self.proc.kill)  # a server that never answers ends the wait
        self._watchdog.start()

    def send(self, method: str, params: dict[str, Any] | None = None, *, notify: bool = False) -> int:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self._next_id += 1
            message["id"] = self._next_id
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        return self._next_id

    def answer(self, request_id: int) -> dict[str, Any]:
        """The response to ``request_id`` (notifications in between are skipped)."""
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            message = json.loads(line)
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"the server answered with an error: {message['error']}")
                return dict(message["result"])
        raise RuntimeError(f"the server exited ({self.proc.wait()}) without answering")

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], float]:
        """(the result, seconds the request took)."""
        t0 = time.perf_counter()
        result = self.answer(self.send(method, params))
        return result, time.perf_counter() - t0

    def initialize(self) -> tuple[dict[str, Any], float, float]:
        """(the initialize result, seconds from spawn to its answer, seconds from spawn to tools/list's answer)."""
        params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
        result = self.answer(self.send("initialize", params))
        initialized = time.perf_counter() - self.spawned
        self.send("notifications/initialized", notify=True)
        self.answer(self.send("tools/list"))
        return result, initialized, time.perf_counter() - self.spawned

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # end of input: a stdio server exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._watchdog.cancel()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _spawn_to_initialize(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float, str]:
    session = Session(argv, env)
    try:
        result, initialized, listed = session.initialize()
    finally:
        session.close()
    return initialized, listed, str(result.get("serverInfo", {}).get("version", ""))


def _first_call(argv: Sequence[str], env: dict[str, str], after: float) -> tuple[float, float]:
    """(the first agentic_status call's seconds, the median of the next three): sent ``after`` seconds
    after tools/list was answered."""
    session = Session(argv, env)
    try:
        session.initialize()
        time.sleep(after)
        call = {"name": "agentic_status", "arguments": {"limit": 5}}
        first = session.request("tools/call", call)[1]
        warm = statistics.median(session.request("tools/call", call)[1] for _ in range(3))
    finally:
        session.close()
    return first, warm


def startup(runs: int = 10) -> list[Row]:
    """Rows: spawn → initialize answered (and → tools/list answered), ours against the bare SDK server;
    the first tool call against a warm one."""
    venv_bin = Path(sys.executable).parent
    ours_cmd = [str(venv_bin / "agentic-dispatch"), "serve"]
    if not Path(ours_cmd[0]).exists():
        ours_cmd = [sys.executable, "-m", "agentic_dispatch", "serve"]
    commands = {"agentic-dispatch serve": ours_cmd, "scripts/serve": [str(ROOT / "scripts" / "serve")]}
    with tempfile.TemporaryDirectory(prefix="agentic-bench-bare-") as tmp, fresh_root() as _:
        bare = Path(tmp) / "bare_server.py"
        bare.write_text(BARE_SERVER, encoding="utf-8")
        env = dict(os.environ)
        setup = subprocess.run(commands["scripts/serve"], stdin=subprocess.DEVNULL, capture_output=True, env=env)
        if setup.returncode != 0:
            tail = setup.stderr.decode(errors="replace").strip().splitlines()[-1:]
            return [Row("start-up", f"not measured: scripts/serve exited {setup.returncode}: {tail}", "", "", "")]
        timed: dict[str, list[tuple[float, float, str]]] = {"bare": [], **{name: [] for name in commands}}
        for _ in range(runs):  # interleaved, so a busy moment of the machine falls on all three alike
            timed["bare"].append(_spawn_to_initialize([sys.executable, str(bare)], env))
            for name, argv in commands.items():
                timed[name].append(_spawn_to_initialize(argv, env))
        calls: dict[float, list[tuple[float, float]]] = {MODEL_TURN: [], SURELY_UP: [], 0.0: []}
        for _ in range(max(1, runs // 3)):
            for after, samples in calls.items():
                samples.append(_first_call(ours_cmd, env, after))
    base_init = statistics.median(t[0] for t in timed["bare"])
    base_list = statistics.median(t[1] for t in timed["bare"])
    rows = []
    for name in commands:
        init = statistics.median(t[0] for t in timed[name])
        listed = statistics.median(t[1] for t in timed[name])
        rows.append(
            Row(f"spawn -> initialize answered, {name}, median of {runs}", ms(init), f"{ms(base_init)} (bare SDK)",
                f"{init / base_init:.2f}x", "<= 1.15x")
        )  # fmt: skip
        rows.append(
            Row(f"spawn -> tools/list answered, {name}", ms(listed), f"{ms(base_list)} (bare SDK)",
                f"{listed / base_list:.2f}x", f"<= 1.15x (Codex asks its model at {CODEX_FIRST_REQUEST:g} s)")
        )  # fmt: skip
    version = timed["agentic-dispatch serve"][0][2]
    rows.append(Row("serverInfo.version", version or "(empty)", "", "", "the package's version"))
    late, up = (statistics.median(s[0] for s in calls[t]) for t in (MODEL_TURN, SURELY_UP))
    rows.append(
        Row(f"first agentic_status, {MODEL_TURN:g} s after tools/list", ms(late),
            f"{ms(up)} (first call, {SURELY_UP:g} s after)", f"{late / up:.2f}x", "<= 1.2x")
    )  # fmt: skip
    soon, warm = (statistics.median(s[i] for s in calls[0.0]) for i in (0, 1))
    rows.append(
        Row("first agentic_status, at once after tools/list", ms(soon), f"{ms(warm)} (warm)", f"{soon / warm:.2f}x",
            "(waits for the service to come up)")
    )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    for row in startup(args.runs):
        against = f" against {row.baseline} ({row.ratio})" if row.baseline else ""
        print(f"{row.figure}: {row.ours}{against}; target {row.target}")


if __name__ == "__main__":
    main()
