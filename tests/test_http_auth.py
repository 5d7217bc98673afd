"""HTTP with a token: `agentic-dispatch serve --transport http` started as a subprocess and spoken to
with real HTTP requests (httpx2, the MCP SDK's HTTP client) and the official MCP client."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

TOKEN_ENV = "AGENTIC_DISPATCH_HTTP_TOKEN"
TOKEN = "test-token-0123456789abcdefghijklmnop"
TOOLS = {"agentic_dispatch", "agentic_status", "agentic_resume", "agentic_sync"}
INITIALIZE = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"test","version":"1"}}}'
)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    url: str  # where a client reaches it
    home: Path
    stderr_file: Path
    stdout_file: Path

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "AGENTIC_DISPATCH_CONFIG")}
    return {**env, "AGENTIC_DISPATCH_HOME": str(home), **extra}


def _serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentic_dispatch", "serve", "--transport", "http", *args]


@contextmanager
def serving(home: Path, *args: str, reach: str = "127.0.0.1", **env: str) -> Iterator[Served]:
    """Run the server until the block ends; ``reach`` is the address a client connects to."""
    port = _free_port()
    home.mkdir(parents=True, exist_ok=True)
    out, err = home / f"serve-{port}.stdout", home / f"serve-{port}.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            _serve_argv("--port", str(port), *args), stdout=stdout, stderr=stderr, env=_env(home, **env)
        )
    host = f"[{reach}]" if ":" in reach else reach
    served = Served(proc, port, f"http://{host}:{port}/mcp", home, err, out)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the server exited {proc.returncode}: {served.stderr[-3000:]}"
            try:
                socket.create_connection((reach, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server never listened: {served.stderr[-3000:]}"
                time.sleep(0.2)
        yield served
    finally:
        proc.terminate()
        proc.wait(15)


def post_initialize(url: str, **headers: str) -> httpx2.Response:
    """One MCP initialize request; the body of the answer is not read (an SSE stream on success)."""
    base = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    with httpx2.stream("POST", url, content=INITIALIZE, headers={**base, **headers}, timeout=30) as response:
        if response.status_code != 200:
            response.read()
        return response


def list_tools(url: str, token: str | None = None) -> set[str]:
    """tools/list through the official MCP client, sending the token as a bearer header."""

    async def run() -> set[str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            return {t.name for t in (await client.list_tools()).tools}

    return anyio.run(run)


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine's own that is not loopback (the interface its traffic leaves by)."""
    candidates = []
    for probe in ("192.0.2.1", "198.51.100.1", "10.255.255.254"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((probe, 9))  # no packet is sent: this only picks a route
                candidates.append(sock.getsockname()[0])
            except OSError:
                continue
    with suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    return next((a for a in candidates if not a.startswith(("127.", "0."))), None)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every address, --allow-remote, the token from the environment."""
    home = tmp_path_factory.mktemp("remote") / "home"
    with serving(home, "--host", "0.0.0.0", "--allow-remote", **{TOKEN_ENV: TOKEN}) as served:
        yield served


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The default: 127.0.0.1, nothing configured."""
    home = tmp_path_factory.mktemp("loopback") / "home"
    with serving(home) as served:
        yield served


def test_a_remote_server_answers_401_with_www_authenticate_to_a_missing_or_wrong_token(remote: Served) -> None:
    wrong = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Basic {TOKEN}"}):
        response = post_initialize(remote.url, **headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer "), response.headers
        assert response.json()["error"] == "invalid_token"


def test_a_remote_server_lists_the_tools_to_the_mcp_client_that_sends_the_right_token(remote: Served) -> None:
    assert list_tools(remote.url, TOKEN) >= TOOLS
    assert TOKEN not in remote.stderr, "a token from the environment is never printed"


def test_a_token_server_serves_no_oauth_endpoints(remote: Served) -> None:
    base = remote.url.removesuffix("/mcp")
    for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-authorization-server"):
        assert httpx2.get(base + path, timeout=30).status_code == 404, path


def test_a_foreign_host_or_origin_is_refused_on_every_address_even_with_the_right_token(remote: Served) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert post_initialize(remote.url, **auth).status_code == 200
    assert post_initialize(remote.url, Host=f"localhost:{remote.port}", **auth).status_code == 200
    assert post_initialize(remote.url, Host=f"evil.example:{remote.port}", **auth).status_code == 421
    assert post_initialize(remote.url, Host=f"0.0.0.0:{remote.port}", **auth).status_code == 421
    assert post_initialize(remote.url, Origin="http://evil.example", **auth).status_code == 403


def test_loopback_without_a_configured_token_serves_the_tools_without_a_header(loopback: Served) -> None:
    assert list_tools(loopback.url) >= TOOLS
    assert not (loopback.home / "state" / "http-token").exists(), "no token is made for loopback"


def test_a_foreign_host_or_origin_is_refused_on_loopback(loopback: Served) -> None:
    port = loopback.port
    assert post_initialize(loopback.url).status_code == 200
    assert post_initialize(loopback.url, Host=f"localhost:{port}", Origin=f"http://localhost:{port}").status_code == 200
    assert post_initialize(loopback.url, Host=f"evil.example:{port}").status_code == 421
    assert post_initialize(loopback.url, Host=f"127.0.0.1:{port + 1}").status_code == 421
    assert post_initialize(loopback.url, Origin="http://evil.example").status_code == 403
    assert post_initialize(loopback.url, Origin=f"http://localhost:{port + 1}").status_code == 403


def test_a_foreign_host_or_origin_is_refused_on_the_machines_own_address_and_added_names_are_served(
    tmp_path: Path,
) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind")
    args = ("--host", address, "--allow-remote", "--allowed-host", "Dispatch.Example")
    with serving(tmp_path / "home", *args, reach=address, **{TOKEN_ENV: TOKEN}) as served:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        port = served.port
        assert post_initialize(served.url).status_code == 401
        assert post_initialize(served.url, **auth).status_code == 200
        assert post_initialize(served.url, Host=f"dispatch.example:{port}", **auth).status_code == 200
        assert post_initialize(served.url, Origin=f"http://dispatch.example:{port}", **auth).status_code == 200
        assert post_initialize(served.url, Host=f"evil.example:{port}", **auth).status_code == 421
        assert post_initialize(served.url, Host=f"127.0.0.1:{port}", **auth).status_code == 421
        assert post_initialize(served.url, Origin=f"http://evil.example:{port}", **auth).status_code == 403
        assert list_tools(served.url, TOKEN) >= TOOLS


def test_a_generated_token_is_kept_owner_only_shown_once_on_stderr_and_reused_by_the_next_start(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    token_file = home / "state" / "http-token"
    with serving(home, "--host", "0.0.0.0", "--allow-remote") as first:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text(encoding="ascii").strip()
        assert len(token) >= 32
        assert first.stderr.count(token) == 1, "the generated token is shown once, on stderr"
        assert f"http://127.0.0.1:{first.port}/?token={token}" in first.stderr, "as the board's sign-in link"
        assert str(token_file) in first.stderr
        assert post_initialize(first.url).status_code == 401
        assert list_tools(first.url, token) >= TOOLS
    assert token not in first.stdout_file.read_text(encoding="utf-8"), "stdout never carries the token"
    with serving(home, "--host", "0.0.0.0", "--allow-remote") as second:
        assert token_file.read_text(encoding="ascii").strip() == token, "the next start reuses the token"
        assert list_tools(second.url, token) >= TOOLS
        assert token not in second.stderr, "a token kept from before is not shown again"
    assert not [p.name for p in token_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_configured_token_is_required_on_loopback_too(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\ntoken = "{TOKEN}"\n', encoding="utf-8")
    config.chmod(0o600)
    with serving(tmp_path / "home", AGENTIC_DISPATCH_CONFIG=str(config)) as served:
        assert post_initialize(served.url).status_code == 401
        assert list_tools(served.url, TOKEN) >= TOOLS


def test_a_token_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "state").mkdir(parents=True)
    token_file = home / "state" / "http-token"
    token_file.write_text(TOKEN + "\n", encoding="ascii")
    token_file.chmod(0o644)
    proc = subprocess.run(
        _serve_argv("--host", "0.0.0.0", "--allow-remote"), capture_output=True, text=True, env=_env(home), timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert str(token_file) in proc.stderr and "0600" in proc.stderr and "delete it" in proc.stderr
    assert TOKEN not in proc.stderr


BAD_OPTIONS = [
    (["--host", "0.0.0.0"], {}, "", ["--host", "--allow-remote", "token"]),
    (["--allowed-host", "http://evil.example/"], {}, "", ["--allowed-host", "host name or IP address"]),
    (["--allowed-host", "*"], {}, "", ["--allowed-host", "host name or IP address"]),
    (["--port", "0"], {}, "", ["--port", "between 1 and 65535"]),
    (["--host", "0.0.0.0", "--allow-remote"], {TOKEN_ENV: "short-secret"}, "", [TOKEN_ENV, "at least 16"]),
    ([], {}, '[http]\ntoken = "short-secret"\n', ["http.token", "at least 16"]),
    ([], {}, '[http]\nallowed_hosts = ["evil.example/x"]\n', ["http.allowed_hosts", "host name or IP address"]),
]


@pytest.mark.parametrize(("args", "env", "config", "expected"), BAD_OPTIONS)
def test_bad_http_options_are_refused_before_serving_with_what_to_do(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str, expected: list[str]
) -> None:
    if config:
        (tmp_path / "config.toml").write_text(config, encoding="utf-8")
        env = {**env, "AGENTIC_DISPATCH_CONFIG": str(tmp_path / "config.toml")}
    proc = subprocess.run(_serve_argv(*args), capture_output=True, text=True, env=_env(tmp_path, **env), timeout=60)
    assert proc.returncode == 2, proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in {proc.stderr!r}"
    assert "short-secret" not in proc.stderr, "a rejected token is never echoed"
    assert not (tmp_path / "state" / "http-token").exists()
