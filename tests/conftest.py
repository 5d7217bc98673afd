"""Shared fixtures. Every test gets its own empty AGENTIC_DISPATCH_HOME, so no test touches
the real one. Docker fixtures fail (never skip) when the engine or the image is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import docker
import docker.errors
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from agentic_dispatch.config import load_settings
from agentic_dispatch.runtime.base import LABEL_ROOT
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.runtime.images import build_image, default_image_tag
from agentic_dispatch.service import Dispatcher

T = TypeVar("T")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home))
    monkeypatch.delenv("AGENTIC_DISPATCH_CONFIG", raising=False)
    return home


def empty_git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty git home (no global or system config, so no ``safe.directory = *``) and a fixed
    identity for test commits."""
    home = tmp_path / "git-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{var}_NAME", "Tester")
        monkeypatch.setenv(f"{var}_EMAIL", "tester@example.com")
    return home


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip a test that needs root where it cannot run, except in CI (CI runs as root): there it fails."""
    return pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason=why)


# A port nothing listens on: the engine is "unreachable" at once (connection refused).
NO_ENGINE = "tcp://127.0.0.1:9"


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> str:
    """No container engine for this test (and the CLI processes it starts): ``DOCKER_HOST`` points
    nowhere. For what must work without one: status, the CLI table, the index."""
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    return NO_ENGINE


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(
            f"a Docker engine is needed for this test and none is reachable ({e}). "
            "Run the README's test command, which starts one, or start dockerd yourself."
        )
    return client


@pytest.fixture(scope="session")
def agent_image(docker_client: docker.DockerClient) -> str:
    """The agent image, built if missing (a build is skipped when its tag exists)."""
    tag = os.environ.get("AGENTIC_DISPATCH_IMAGE") or default_image_tag()
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        build_image(docker_client, tag=tag, progress=lambda line: print(line, file=sys.stderr))
    return tag


@pytest.fixture
def docker_env(agent_image: str, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The agent image selected for this test; the test's containers are removed afterwards."""
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", agent_image)
    yield agent_image
    _remove_containers(docker_client, load_settings()[1].root_id)


@pytest.fixture
def dispatcher(docker_env: str, docker_client: docker.DockerClient) -> Iterator[Dispatcher]:
    """An in-process service with its background threads running; its containers are removed after."""
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def _remove_containers(client: docker.DockerClient, root_id: str) -> None:
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_ROOT}={root_id}"}):
        c.remove(force=True)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) until ``cond()`` holds; fail naming ``what`` when it does not."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


SERVE_READY = "serving MCP over"  # what `serve` logs once its stop-signal handlers are in place


class ServeLog:
    """What a `serve` subprocess writes to stderr, read as it comes (a full pipe would stall the server)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()

    def read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line containing ``text``; fails when the server's stderr ends or ``timeout`` passes first."""

        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self.ended, timeout)
            line, tail = found(), "\n".join(self.lines[-30:])
        assert line is not None, f"serve never logged {text!r} ({'it ended' if self.ended else f'{timeout}s'}):\n{tail}"
        return line


_serving: list[tuple[subprocess.Popen[bytes], threading.Thread, ServeLog]] = []


def spawn_serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], ServeLog]:
    """`agentic-dispatch serve` on stdio, kept alive by an open stdin (as an MCP host would), and its
    stderr. Returns at once; the server is stopped and its pipes closed after the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentic_dispatch", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    log = ServeLog()
    assert proc.stderr is not None
    reader = threading.Thread(target=log.read, args=(proc.stderr,), daemon=True)
    reader.start()
    _serving.append((proc, reader, log))
    return proc, log


def serve_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """:func:`spawn_serve`, returned once the server says it is ready: a stop signal sent next is handled."""
    proc, log = spawn_serve(env)
    log.wait_for(SERVE_READY, 60)
    return proc


@pytest.fixture(autouse=True)
def _stop_serve_processes() -> Iterator[None]:
    """A server a test spawned does not outlive it (also when the test fails), nor leave its pipes open.
    Its last lines on stderr are printed: pytest shows them with a failed test's report."""
    yield
    while _serving:
        proc, reader, log = _serving.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(30)
        print(f"--- the last lines of serve (pid {proc.pid}) on stderr:", *log.lines[-40:], sep="\n")
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                pipe.close()


def git(cwd: Path, *args: str) -> str:
    # safe.directory: under a root test run, a workspace's clone belongs to the agent's uid
    argv = ["git", "-c", "safe.directory=*", *args]
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A user's own repository with one commit on main and a feature branch."""
    return make_user_repo(tmp_path)


def make_user_repo(parent: Path) -> Path:
    """``parent/user-repo``: one commit on main and a feature branch."""
    repo = parent / "user-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "user@example.com")
    git(repo, "config", "user.name", "User")
    (repo / "README.md").write_text("hello\n", encoding="utf-8")
    (repo / "pyproject.toml").write_text("[project]\nname='x'\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    git(repo, "branch", "feature")
    return repo


def snapshot(repo: Path) -> tuple[str, str, str]:
    """What a user would notice changing in their repo: refs, HEAD, working tree status."""
    return (
        git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
        git(repo, "rev-parse", "HEAD"),
        git(repo, "status", "--porcelain", "--ignored"),
    )


# -- MCP over stdio ------------------------------------------------------------------------
def server_params(extra_env: dict[str, str] | None = None) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if k.startswith(("AGENTIC_DISPATCH_", "DOCKER_", "PATH", "HOME"))}
    env.update(extra_env or {})
    return StdioServerParameters(command=sys.executable, args=["-m", "agentic_dispatch", "serve"], env=env)


def with_stdio_client(fn: Callable[[Client], Awaitable[T]], extra_env: dict[str, str] | None = None) -> T:
    """Start `agentic-dispatch serve` as a subprocess and run ``fn`` with a client connected over stdio."""

    async def main() -> T:
        async with Client(server_params(extra_env), read_timeout_seconds=60) as client:
            return await fn(client)

    return anyio.run(main)


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured content."""
    res = await client.call_tool(tool, args)
    assert not res.is_error, f"{tool} failed: {res.content}"
    assert isinstance(res.structured_content, dict)
    return res.structured_content


async def poll_until_final(client: Client, workspace: str, timeout: float = 60) -> dict[str, Any]:
    """Poll agentic_status until the workspace leaves queued/running (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        report = await call(client, "agentic_status", workspace=workspace, log_lines=20)
        row: dict[str, Any] = report["workspaces"][0]
        if row["status"] not in ("queued", "running"):
            return row
        assert time.monotonic() < deadline, f"{workspace} still {row['status']} after {timeout}s: {row}"
        await anyio.sleep(0.2)


# -- HTTP peers ----------------------------------------------------------------------------
def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


# the record endpoint: a real HTTP listener that answers from a script and counts by Idempotency-Key


@dataclass
class Endpoint:
    url: str
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # answers to come; then 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self) -> list[str]:
        return [r["key"] for r in self.requests]


def _endpoint_handler(ep: Endpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(read_body(self))
            key = self.headers.get("Idempotency-Key", "")
            with ep.lock:
                status, headers = ep.script.pop(0) if ep.script else (200, {})
                ep.requests.append(
                    {"path": self.path, "key": key, "auth": self.headers.get("Authorization"), "body": body}
                )
                if 200 <= status < 300:
                    ep.accepted[key] = ep.accepted.get(key, 0) + 1
            text = json.dumps({"ok": status < 300, "status": status}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    return Handler


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _endpoint_handler(ep))
    ep.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ep
    server.shutdown()
    server.server_close()


# -- a second Docker engine (tests/engines.py) ---------------------------------------------
from . import engines  # noqa: E402  (kept with its fixtures: this section is appended as a unit)


@pytest.fixture(scope="session")
def engine_template(docker_client: docker.DockerClient, agent_image: str) -> engines.EngineTemplate:
    """Every second engine starts from a clone of it (made once per agent image, about 25 s)."""
    return engines.engine_template(docker_client, agent_image)


@pytest.fixture
def second_engine(engine_template: engines.EngineTemplate) -> Iterator[engines.SecondEngine]:
    """A Docker engine of this test's own, which it may stop, kill, freeze and start again; its shell
    image is ``engine.image``. Torn down after the test, also when it fails."""
    with engines.second_engine(engine_template) as engine:
        yield engine


@pytest.fixture(scope="session")
def full_engine_template(docker_client: docker.DockerClient, agent_image: str) -> engines.EngineTemplate:
    """The whole agent image (its CLIs too) for engines that run real CLIs (made once, about 40 s)."""
    return engines.engine_template(docker_client, agent_image, with_clis=True)


@pytest.fixture
def remote_engine(full_engine_template: engines.EngineTemplate) -> Iterator[engines.RemoteEngine]:
    """An engine as if on another machine: no disk shared with the server, TCP with TLS, the whole
    agent image loaded (it has no route out to build). Torn down after the test, also when it fails."""
    with engines.remote_engine(full_engine_template) as engine:
        yield engine


ENGINE_FIXTURES = {"docker_client", "agent_image", "docker_env", "second_engine", "remote_engine", "engine_template"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the engine through a fixture carries the ``docker`` marker, so
    ``-m "not docker"`` runs exactly the tests that need no engine (also with none reachable)."""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)
