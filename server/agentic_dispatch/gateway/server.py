"""The run gateway: the HTTP endpoint through which network-transfer runs fetch their workspace and
send their results back. It serves runs only (never MCP, never a person) and lives in the
server's process, on ``[runtime] gateway_listen``, over TLS when ``[runtime.gateway_tls]`` is set.

Every request names a workspace (``/w/<workspace, URL-quoted>/...``) and carries that run's
bearer token (:mod:`.tokens`). It is served only while that run is the workspace's current one
and is running; otherwise nothing is said beyond the refusal. Routes:

    GET  inputs?phase=agent|qa          the job's inputs (see :mod:`.transfer`)
    POST log?phase=...&offset=N         the next bytes of the job's log; answers {"received": n}
    POST results?phase=...              the job's results, applied once; answers {"applied": bool}
    GET  git/info/refs, POST git/git-upload-pack, git/git-receive-pack   the clone (see :mod:`.git_http`)

Bodies are capped (``resources.workspace_max_bytes``; 8 MiB for a log chunk), chunked or not.

The servers of one root share one gateway port (``SO_REUSEPORT``; the kernel gives each connection to
one of them): tokens and run state are on the root's disk, so each serves every run of the root, and
a run outlives the server that started it. A server of another root is refused the port
(:class:`_PortClaim`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import ssl
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import platformdirs

from ..config import APP_NAME, RuntimeSettings, Settings
from ..errors import DispatchError, InvalidInputError, WorkspaceNotFoundError
from ..fileio import exclusive_lock, shared_lock, try_exclusive_lock, write_atomic
from ..models import Status
from ..store import StatusStore, WorkspacePaths
from .git_http import GitRequest, serve_git
from .tokens import token_run
from .transfer import PHASES, TransferError, UploadRefused, append_log, apply_results, pack_inputs, refuse_results

__all__ = ["RunGateway"]

log = logging.getLogger(__name__)

LOG_CHUNK_MAX = 8 * 1024 * 1024
SOCKET_TIMEOUT = 300.0
PORT_FILE = "gateway-port.json"  # in state/: the port a gateway_listen of port 0 took last


class _TooLarge(Exception):
    pass


class _CutOff(ConnectionError):
    """The body ended before its length (the connection broke): the client sends it again."""


class _Body:
    """The request body (``Content-Length`` or chunked), read as it arrives, at most ``limit`` bytes."""

    def __init__(self, rfile: BufferedIOBase, length: int | None, chunked: bool, limit: int | None) -> None:
        self.rfile, self.left, self.chunked, self.limit = rfile, length, chunked, limit
        self.total, self.chunk_left, self.done = 0, 0, False

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while (n < 0 or len(out) < n) and not self.done:
            want = (1 << 20) if n < 0 else n - len(out)
            piece = self._read_some(want)
            if not piece:
                break
            out += piece
        self.total += len(out)
        if self.limit and self.total > self.limit:
            raise _TooLarge
        return bytes(out)

    def _read_some(self, want: int) -> bytes:
        if not self.chunked:
            if self.left is None or self.left <= 0:
                self.done = True
                return b""
            piece = self.rfile.read(min(want, self.left))
            self.left -= len(piece)
            if not piece:
                raise _CutOff
            return piece
        if self.chunk_left == 0:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                self.chunk_left = int(line, 16)
            except ValueError as e:
                raise _CutOff from e
            if self.chunk_left == 0:
                while self.rfile.readline(1024).strip():  # trailers, then the blank line
                    pass
                self.done = True
                return b""
        piece = self.rfile.read(min(want, self.chunk_left))
        if not piece:
            raise _CutOff
        self.chunk_left -= len(piece)
        if self.chunk_left == 0:
            self.rfile.readline(16)  # the CRLF after the chunk
        return piece


class _PortClaim:
    """A root's hold on a gateway port, shared by the root's servers for as long as each listens.

    A claim is a shared ``flock`` on a file per port in the user's cache folder, beside a note of the
    root that holds it; the first holder writes the note. A server of another root finds the port
    held under another note and is refused it, as if it were in use: with ``SO_REUSEPORT`` it could
    otherwise listen there too and take half of the other root's runs' connections.
    """

    def __init__(self, folder: Path, port: int, root: Path) -> None:
        """Claim ``port`` for ``root`` in ``folder`` (:meth:`folder`).

        Raises:
            OSError: another root's gateway holds the port (``EADDRINUSE``), or the claim cannot be made.
        """
        lock, note = folder / f"{port}.lock", folder / f"{port}.root"
        self._held = contextlib.ExitStack()
        with exclusive_lock(folder / "claims.lock"):  # one claim decided at a time
            with try_exclusive_lock(lock) as alone:
                if alone is not None:  # no server holds the port: this root's now
                    write_atomic(note, str(root))
                else:
                    holder = "a root it does not name"
                    with contextlib.suppress(OSError):
                        holder = note.read_text(encoding="utf-8")
                    if holder != str(root):
                        raise OSError(
                            errno.EADDRINUSE,
                            f"port {port} is the run gateway of another root ({holder}); give this root's "
                            "[runtime] gateway_listen another port",
                        )
            self._held.enter_context(shared_lock(lock))  # still under claims.lock: nobody decided between

    @staticmethod
    def folder() -> Path | None:
        """Where claims are made; ``None`` (said in the log) when it cannot be: the gateway then
        listens alone on its port, as a server of another root would have to."""
        folder = platformdirs.user_cache_path(APP_NAME) / "gateway-ports"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            log.warning(
                "cannot claim the run gateway's port in %s (%s): this server's gateway does not share its port, "
                "so a second server of this root cannot listen there",
                folder, e.strerror or e,
            )  # fmt: skip
            return None
        return folder

    def release(self) -> None:
        self._held.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], gateway: RunGateway, tls: ssl.SSLContext | None, shared: bool) -> None:
        self.gateway, self.tls = gateway, tls
        self.allow_reuse_port = shared  # this root's other servers listen on the same port (see _PortClaim)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(SOCKET_TIMEOUT)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:  # the handshake in this request's own thread, never in accept's
            secure = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("run gateway: TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            # A streamed answer ends with the connection: TLS's close_notify tells the client it is
            # whole (git's TLS library calls a connection closed without it an error).
            with contextlib.suppress(OSError, ValueError):
                secure.settimeout(2)
                secure.unwrap()
            secure.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection; a streamed answer ends with it

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("run gateway: %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _answer(self, status: int, payload: dict[str, Any] | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else json.dumps(payload or {}).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        self._answer(status, {"error": why})

    def _body(self, limit: int | None) -> _Body:
        length = self.headers.get("Content-Length")
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        size = int(length) if length and length.isdigit() else None
        if size is not None and limit and size > limit:
            raise _TooLarge
        return _Body(self.rfile, size, chunked, limit)

    def _serve(self) -> None:
        import git

        gw = self.server.gateway
        parts = urlsplit(self.path)
        segments = parts.path.split("/")
        if len(segments) < 4 or segments[1] != "w":
            self._refuse(HTTPStatus.NOT_FOUND, "not a run's address")
            return
        name, route = unquote(segments[2]), "/".join(segments[3:])
        query = parse_qs(parts.query)
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        try:
            ws = gw.store.paths(name)
        except InvalidInputError:
            self._refuse(HTTPStatus.NOT_FOUND, "not a run's address")
            return
        run = token_run(ws, token) if token else None
        if run is None:
            self._refuse(HTTPStatus.UNAUTHORIZED, "no valid token for this workspace")
            return
        try:
            rec = gw.store.read(name)
        except (WorkspaceNotFoundError, DispatchError):
            self._refuse(HTTPStatus.FORBIDDEN, "this run is over")
            return
        if rec.status != Status.RUNNING or rec.runs != run:
            self._refuse(HTTPStatus.FORBIDDEN, "this run is over")
            return
        phase = (query.get("phase") or ["agent"])[0]
        if phase not in PHASES:
            self._refuse(HTTPStatus.BAD_REQUEST, f"phase must be one of {', '.join(PHASES)}")
            return
        try:
            self._route(gw, ws, name, route, phase, query, rec.branch, rec.phase == "agent", run)
        except _TooLarge:
            self.close_connection = True
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "larger than resources.workspace_max_bytes")
        except (_CutOff, TimeoutError):
            self.close_connection = True
            log.info("run gateway: the %s of %s was cut off; its container sends it again", route, name)
            with contextlib.suppress(OSError):
                self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "the request was cut off; send it again")
        except UploadRefused as e:
            self._refuse(HTTPStatus.BAD_REQUEST, str(e))
        except TransferError as e:
            self._refuse(HTTPStatus.CONFLICT, str(e))
        except (OSError, git.GitCommandError, DispatchError) as e:
            log.warning("run gateway: %s %s of %s failed: %s", self.command, route, name, e)
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "the server could not serve this now; try again")

    def _route(
        self,
        gw: RunGateway,
        ws: WorkspacePaths,
        name: str,
        route: str,
        phase: str,
        query: dict[str, list[str]],
        branch: str,
        agent_phase: bool,
        run: int,
    ) -> None:
        limit = gw.settings.resources.workspace_max_bytes or None
        if route == "inputs" and self.command == "GET":
            with gw.store.locked(name):  # its git status writes the clone's index, as a results upload does
                inputs = pack_inputs(ws, branch, phase, limit)
            self._answer(HTTPStatus.OK, body=inputs)
        elif route == "log" and self.command == "POST":
            offset = (query.get("offset") or ["x"])[0]
            if not offset.isdigit():
                self._refuse(HTTPStatus.BAD_REQUEST, "offset must be a byte count")
                return
            data = self._body(LOG_CHUNK_MAX).read()
            self._answer(HTTPStatus.OK, {"received": append_log(ws, run, phase, int(offset), data)})
        elif route == "results" and self.command == "POST":
            with tempfile.TemporaryFile() as spool:
                body = self._body(limit)
                while chunk := body.read(1 << 20):
                    spool.write(chunk)
                spool.seek(0)
                with gw.store.locked(name):
                    try:
                        applied = apply_results(ws, run, phase, spool, limit)
                    except UploadRefused as e:
                        refuse_results(ws, run, phase, str(e))
                        raise
            self._answer(HTTPStatus.OK, {"applied": applied})
        elif route.startswith("git/"):
            self._git(gw, ws, route[4:], f"refs/heads/{branch}" if agent_phase and phase == "agent" else None, limit)
        else:
            self._refuse(HTTPStatus.NOT_FOUND, f"{self.command} {route} is not served")

    def _git(self, gw: RunGateway, ws: WorkspacePaths, path: str, allowed: str | None, limit: int | None) -> None:
        parts = urlsplit(self.path)
        body = self._body(limit) if self.command == "POST" else None
        req = GitRequest(
            method=self.command,
            path=path,
            query=parts.query,
            content_type=self.headers.get("Content-Type") or "",
            content_encoding=(self.headers.get("Content-Encoding") or "").lower(),
            git_protocol=self.headers.get("Git-Protocol") or "",
            body=body,
        )
        answer = serve_git(ws.repo, req, allowed, limit, gw.git_home)
        self.send_response(answer.status)
        for key, value in answer.headers:
            self.send_header(key, value)
        self.end_headers()
        for chunk in answer.body:
            self.wfile.write(chunk)


class RunGateway:
    """The gateway's listener; :attr:`url` is where containers reach it once started."""

    def __init__(self, settings: Settings, store: StatusStore, state_dir: Path) -> None:
        self.settings = settings
        self.store = store
        self.runtime: RuntimeSettings = settings.runtime
        self._port_file = state_dir / PORT_FILE
        self._root = state_dir.parent.resolve()
        self._claim: _PortClaim | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._home: tempfile.TemporaryDirectory[str] | None = None
        self.git_home = Path(tempfile.gettempdir())  # git's $HOME for the gateway's git, made empty by start()

    def start(self) -> None:
        """Listen on ``[runtime] gateway_listen``.

        Raises:
            OSError: the address cannot be bound (in use, not this machine's).
            ssl.SSLError: the certificate or key cannot be loaded.
        """
        listen = self.runtime.gateway_listen or "127.0.0.1:0"
        host, _, port = listen.rpartition(":")
        tls = None
        if self.runtime.gateway_tls is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.runtime.gateway_tls.cert, self.runtime.gateway_tls.key)
        self._server = self._bind(host.strip("[]"), int(port), tls)
        self._home = tempfile.TemporaryDirectory(prefix="agentic-gateway-")
        self.git_home = Path(self._home.name)
        self._thread = threading.Thread(target=self._server.serve_forever, name="run-gateway", daemon=True)
        self._thread.start()
        log.info("run gateway listening on %s (containers reach it at %s)", self.address, self.url)

    def _bind(self, host: str, port: int, tls: ssl.SSLContext | None) -> _Server:
        """The listener on ``host:port``, shared with this root's other servers. Port 0 means any free
        port, but the one this root's gateway took last time is tried first: the runs a restarted
        server left running reach their gateway again (its URL is in their environment), as they do
        with a fixed port, and a second server of the root listens where the first does.

        Raises:
            OSError: the address cannot be bound, or another root's gateway holds the port.
        """
        if port != 0:
            return self._listen(host, port, tls)
        last = self._last_port(host)
        if last is not None:
            try:
                return self._remember(host, self._listen(host, last, tls))
            except OSError as e:
                log.warning(
                    "the run gateway cannot take port %s on %s again (%s): it takes another; runs started before "
                    "this server restarted cannot send their results back (give gateway_listen a fixed port)",
                    last, host, e.strerror or e,
                )  # fmt: skip
        folder = _PortClaim.folder()
        server = _Server((host, 0), self, tls, shared=folder is not None)
        try:
            self._claim = _PortClaim(folder, server.server_address[1], self._root) if folder else None
        except BaseException:
            server.server_close()
            raise
        return self._remember(host, server)

    def _listen(self, host: str, port: int, tls: ssl.SSLContext | None) -> _Server:
        """Claim ``port`` for this root, then listen on it.

        Raises:
            OSError: another root's gateway holds the port, or it cannot be bound.
        """
        folder = _PortClaim.folder()
        claim = _PortClaim(folder, port, self._root) if folder else None
        try:
            server = _Server((host, port), self, tls, shared=claim is not None)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        self._claim = claim
        return server

    def _last_port(self, host: str) -> int | None:
        try:
            last = json.loads(self._port_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or not ours to trust: any free port
            return None
        port = last.get("port") if isinstance(last, dict) and last.get("host") == host else None
        return port if isinstance(port, int) and 0 < port < 65536 else None

    def _remember(self, host: str, server: _Server) -> _Server:
        """Note the port ``server`` took on ``host`` (as gateway_listen names it) for the next start."""
        try:
            write_atomic(self._port_file, json.dumps({"host": host, "port": server.server_address[1]}) + "\n")
        except OSError as e:  # the gateway works; only a restart would take another port
            log.warning("cannot note the run gateway's port in %s: %s", self._port_file, e)
        return server

    @property
    def address(self) -> str:
        assert self._server is not None, "the gateway is not started"
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def url(self) -> str:
        """The base URL containers use: ``gateway_url`` as configured (its port filled in when it
        names none and the gateway took any free port), else the listening address."""
        assert self._server is not None, "the gateway is not started"
        port = self._server.server_address[1]
        scheme = "https" if self.runtime.gateway_tls is not None else "http"
        if self.runtime.gateway_url is None:
            host = str(self._server.server_address[0])
            shown = f"[{host}]" if ":" in host else host
            return f"{scheme}://{shown}:{port}"
        parts = urlsplit(self.runtime.gateway_url.rstrip("/"))
        if parts.port is None:
            parts = parts._replace(netloc=f"{parts.netloc}:{port}")
        return parts.geturl()

    def run_url(self, workspace: str) -> str:
        """Where run ``workspace``'s container finds its own part of the gateway."""
        return f"{self.url}/w/{quote(workspace, safe='')}"

    def ca_pem(self) -> str | None:
        """The CA (PEM) containers verify the gateway with, when one is configured."""
        tls = self.runtime.gateway_tls
        if tls is None or tls.ca is None:
            return None
        return tls.ca.read_text(encoding="ascii")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if self._home is not None:
            with contextlib.suppress(OSError):
                self._home.cleanup()
            self._home = None
