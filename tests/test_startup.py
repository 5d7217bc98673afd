"""Start-up as a host sees it. Codex CLI asks its model about 1.1 s after it spawns a server, with the tools
it has by then: `serve` answers ``initialize`` and ``tools/list`` with nothing of the service loaded (the
engine's client, GitPython and the service's parts come up on a worker thread afterwards, by
themselves), says which version it is, and the first tool call finds the service there. How fast is a
figure for ``bench/startup.py``; these tests hold what makes it fast."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import anyio
from mcp import Client

from agentic_dispatch.config import load_settings
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import ServeLog

# What answering initialize and tools/list must not wait for. (Not rich: the SDK's MCPServer loads it for a
# log handler of its own, a bare SDK server as much as ours; our views, which use it, are listed.)
HEAVY = (
    "git",
    "docker",
    "agentic_dispatch.service",
    "agentic_dispatch.service.facade",
    "agentic_dispatch.runtime.docker",
    "agentic_dispatch.runtime.images",
    "agentic_dispatch.cli_views",
    "agentic_dispatch.cli_watch",
)

# `serve` as the console script runs it, with an audit hook that names the thread that loads each heavy module.
SERVE_NAMING_IMPORTS = f"""
import sys, threading
heavy = {HEAVY!r}
def named(event, args):
    if event == "import" and args[0] in heavy:
        print(f"imported {{args[0]}} on {{threading.current_thread().name}}", file=sys.stderr, flush=True)
sys.addaudithook(named)
from agentic_dispatch.cli import main
sys.exit(main(["serve"]))
"""


class _Stdio:
    """A server process spoken to in JSON-RPC lines, each answer waited for with a bound; its stderr in ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.log = ServeLog()
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self.log.read, args=(proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._id = 0
        self.exit_code: int | None = None

    def hello(self) -> dict[str, Any]:
        """``initialize`` (its result), then ``notifications/initialized``."""
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}
        result = self.request("initialize", params)
        self.notify("notifications/initialized")
        return result

    def close(self) -> None:
        """End of input (the server exits), then its exit code in ``exit_code`` and its pipes closed."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.exit_code = self.proc.wait(60)
        for reader in self._readers:
            reader.join(30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            assert pipe is not None
            pipe.close()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for line in stream:
            self._lines.put(line)

    def notify(self, method: str) -> None:
        self._send({"jsonrpc": "2.0", "method": method})

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._id += 1
        self._send({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params or {}})
        while True:
            message = json.loads(self._lines.get(timeout=60))
            if message.get("id") == self._id:
                assert "result" in message, message
                return dict(message["result"])

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()


@contextmanager
def _serving(argv: list[str]) -> Iterator[_Stdio]:
    """A server spawned as a host spawns one (pipes for stdin, stdout and stderr), ended after the block."""
    server = _Stdio(
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ)
        )
    )
    try:
        yield server
    finally:
        server.close()


def test_serve_answers_initialize_and_tools_list_on_a_thread_that_never_loads_the_service_which_comes_up_by_itself(
    no_engine: str,
) -> None:
    with _serving([sys.executable, "-c", SERVE_NAMING_IMPORTS]) as server:
        info = server.hello()["serverInfo"]
        tools = [t["name"] for t in server.request("tools/list")["tools"]]
        server.log.wait_for("imported agentic_dispatch.service.facade on", 60)  # no tool call asked for it
        status = server.request("tools/call", {"name": "agentic_status", "arguments": {}})
    log = server.log
    assert info == {"name": "agentic-dispatch", "version": version("agentic-dispatch")}
    assert "agentic_dispatch" in tools and "agentic_watch" in tools
    assert status["isError"] is False and status["structuredContent"]["counts"]["running"] == 0, status
    loaded = [line.split(" ", 3)[1::2] for line in log.lines if line.startswith("imported ")]  # [name, thread]
    assert "agentic_dispatch.service.facade" in {name for name, _ in loaded}, log.lines
    on_main = [name for name, thread in loaded if thread == "MainThread"]
    assert on_main == [], f"loaded on the thread that answers initialize and tools/list: {on_main}"
    assert server.exit_code == 0, log.lines[-20:]


# The service as `serve` builds it (not started: its exit watcher is the engine's first user), asked for a status.
STATUS_NAMING_IMPORTS = """
import sys
from agentic_dispatch.cli import _dispatcher, build_parser
_dispatcher(build_parser(serve_only=True).parse_args(["serve"])).status()
print(" ".join(sorted(m for m in ("git", "docker", "requests", "agentic_dispatch.gateway.server") if m in sys.modules)))
"""


def test_the_service_is_built_and_answers_a_status_without_the_engines_client_gitpython_or_the_gateway(
    isolated_home: Path, tmp_path: Path
) -> None:
    """Building the service is what the first tool call waits for: the engine's client and GitPython are
    loaded by the first call that needs them, the run gateway only for network transfer (not for this local
    engine, which is not there either: nothing asks it)."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"}
    done = subprocess.run(
        [sys.executable, "-c", STATUS_NAMING_IMPORTS], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"loaded to answer a status: {done.stdout.strip()}"


def test_serve_on_stdio_with_a_broken_config_answers_its_host_and_each_tool_call_says_what_is_wrong(
    isolated_home: Path, no_engine: str
) -> None:
    """It used to exit 2 before its first answer, and a host showed only that the server failed."""
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text("this is = = not toml", encoding="utf-8")
    with _serving([sys.executable, "-m", "agentic_dispatch", "serve"]) as server:
        server.hello()
        assert "agentic_status" in [t["name"] for t in server.request("tools/list")["tools"]]
        status = server.request("tools/call", {"name": "agentic_status", "arguments": {}})
        said = server.log.wait_for("the service cannot start", 30)  # and the log says so
    assert status["isError"] is True and "not valid TOML" in status["content"][0]["text"], status
    assert "not valid TOML" in said and server.exit_code == 0


def test_a_service_that_cannot_start_fails_each_call_saying_why_and_the_call_after_the_fix_starts_it(
    isolated_home: Path, no_engine: str
) -> None:
    """The settings are read with the service, after the host has the tools: a bad config (here a template
    that does not exist) no longer stops `serve` before its first answer. The tools say what is wrong, and a
    call after the fix needs no restart."""
    isolated_home.mkdir(parents=True)
    config = isolated_home / "config.toml"
    config.write_text('default_template = "poem"\n', encoding="utf-8")
    server = build_server(lambda: Dispatcher(*load_settings(), DockerRuntime()))

    async def scenario() -> tuple[Any, Any]:
        async with Client(server, read_timeout_seconds=60) as client:
            refused = await client.call_tool("agentic_status", {})
            config.write_text('default_template = "coding"\n', encoding="utf-8")
            return refused, await client.call_tool("agentic_status", {})

    refused, answered = anyio.run(scenario)
    assert refused.is_error and "default_template" in refused.content[0].text and "poem" in refused.content[0].text
    assert not answered.is_error and answered.structured_content["counts"]["running"] == 0
