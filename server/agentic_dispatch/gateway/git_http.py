"""Git's smart HTTP protocol for one workspace's clone, served by git's own ``git http-backend``.

A run's container clones its branch from here and pushes it back. git does the protocol; this
module decides what may happen: the two smart services only (no dumb file access), a push only
of the run's own ``refs/heads/agent/<slug>`` (no other ref, no deletion), its objects checked
(``receive.fsckObjects``) and its size capped (``receive.maxInputSize``). git runs with the
host-side overrides (no hooks, no fsmonitor, no pager), without the system or global config, and
the clone's own config is the server's: a network run's container never writes it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, cast

from ..gitops import HOST_GIT_OVERRIDES, safe_directory
from .transfer import TransferError

__all__ = ["GitAnswer", "GitRequest", "Reader", "serve_git"]

SERVICES = ("git-upload-pack", "git-receive-pack")
ZERO_OID = ("0" * 40, "0" * 64)
_CHUNK = 64 * 1024


class Reader(Protocol):
    """What a request body is read through (a file, a de-chunking or decompressing reader)."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class GitRequest:
    method: str
    path: str  # below the clone: "info/refs", "git-upload-pack", "git-receive-pack"
    query: str
    content_type: str
    content_encoding: str
    git_protocol: str
    body: Reader | None = None


@dataclass
class GitAnswer:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Iterator[bytes] = field(default_factory=lambda: iter(()))


def _pkt_lines(body: Reader) -> tuple[bytes, list[bytes]]:
    """The command section of a receive-pack request (up to its flush packet): (raw bytes, lines)."""
    raw, lines = b"", list[bytes]()
    while True:
        head = body.read(4)
        raw += head
        if len(head) < 4:
            raise TransferError("the push request ended early")
        try:
            size = int(head, 16)
        except ValueError as e:
            raise TransferError("the push request is not git's protocol") from e
        if size == 0:
            return raw, lines
        if size < 4 or size > 65520:
            raise TransferError("the push request is not git's protocol")
        payload = body.read(size - 4)
        raw += payload
        lines.append(payload)
        if len(lines) > 1000:
            raise TransferError("the push names too many refs")


def check_push(commands: list[bytes], allowed_ref: str) -> None:
    """Refuse a push of anything but ``allowed_ref``, and its deletion. A request that names no ref is
    git's probe before a push too large for one buffer (``http.postBuffer``): a flush packet alone,
    which receive-pack answers without reading anything more.

    Raises:
        TransferError: what was refused.
    """
    for line in commands:
        text = line.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip("\n")
        parts = text.split(" ")
        if len(parts) != 3:
            raise TransferError(f"the push holds a line git's protocol does not: {text[:100]!r}")
        _old, new, ref = parts
        if ref != allowed_ref:
            raise TransferError(f"a run may push only {allowed_ref}, not {ref}")
        if new in ZERO_OID:
            raise TransferError(f"a run may not delete {allowed_ref}")


def _backend(clone: Path, push: bool, max_bytes: int | None) -> list[str]:
    settings = [*HOST_GIT_OVERRIDES, safe_directory(clone), "http.getanyfile=false", "http.uploadpack=true"]
    settings.append(f"http.receivepack={'true' if push else 'false'}")
    settings += ["receive.fsckObjects=true", "receive.denyDeletes=true", "receive.denyCurrentBranch=ignore"]
    settings += ["transfer.fsckObjects=true", "receive.advertisePushOptions=false", "uploadpack.allowFilter=true"]
    if max_bytes:
        settings.append(f"receive.maxInputSize={max_bytes}")
    return ["git", *(a for s in settings for a in ("-c", s)), "http-backend"]


def serve_git(clone: Path, req: GitRequest, allowed_ref: str | None, max_bytes: int | None, home: Path) -> GitAnswer:
    """Answer one smart-HTTP request on ``clone`` (a non-bare clone; its ``.git`` is served).
    ``allowed_ref``: the one ref a push may update (``None``: no push now).

    Raises:
        TransferError: the request is not one the gateway serves, or a push it refuses.
    """
    service = req.query.partition("service=")[2].split("&")[0] if req.path == "info/refs" else req.path
    if service not in SERVICES or req.method != ("GET" if req.path == "info/refs" else "POST"):
        raise TransferError(f"{req.method} {req.path} is not served here (git's smart HTTP only)")
    push = service == "git-receive-pack"
    if push and allowed_ref is None:
        raise TransferError("this job may not push (only the agent's job pushes its branch)")
    prefix = b""
    body = req.body
    encoding = req.content_encoding
    if push and req.method == "POST" and body is not None:
        if encoding == "gzip":
            body, encoding = gzip.GzipFile(fileobj=cast(IO[bytes], body), mode="rb"), ""
        prefix, commands = _pkt_lines(body)
        assert allowed_ref is not None
        check_push(commands, allowed_ref)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_PROJECT_ROOT": str(clone.parent),
        "PATH_INFO": f"/{clone.name}/{req.path}",
        "REQUEST_METHOD": req.method,
        "QUERY_STRING": req.query,
        "CONTENT_TYPE": req.content_type,
        "GIT_HTTP_EXPORT_ALL": "1",
        "REMOTE_USER": "agentic-run",
        "REMOTE_ADDR": "gateway",
    }
    if req.git_protocol:
        env["GIT_PROTOCOL"] = req.git_protocol
    if encoding:
        env["HTTP_CONTENT_ENCODING"] = encoding
    argv = _backend(clone, push, max_bytes)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    feeder = threading.Thread(target=_feed, args=(proc, prefix, body), daemon=True)
    feeder.start()
    assert proc.stdout is not None
    status, headers = _cgi_headers(proc.stdout)
    return GitAnswer(status, headers, _stream(proc, feeder))


def _feed(proc: subprocess.Popen[bytes], prefix: bytes, body: Reader | None) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, OSError), proc.stdin:
        if prefix:
            proc.stdin.write(prefix)
        while body is not None:
            chunk = body.read(_CHUNK)
            if not chunk:
                break
            proc.stdin.write(chunk)


def _cgi_headers(out: IO[bytes]) -> tuple[int, list[tuple[str, str]]]:
    status, headers = 200, list[tuple[str, str]]()
    while True:
        line = out.readline(8192).decode("latin-1").rstrip("\r\n")
        if not line:
            return status, headers
        name, _, value = line.partition(":")
        if name.lower() == "status":
            with contextlib.suppress(ValueError):
                status = int(value.strip().split(" ")[0])
        else:
            headers.append((name.strip(), value.strip()))


def _stream(proc: subprocess.Popen[bytes], feeder: threading.Thread) -> Iterator[bytes]:
    assert proc.stdout is not None
    try:
        out = cast(io.BufferedReader, proc.stdout)  # the reader the headers were read through
        while chunk := out.read1(_CHUNK):  # what is there, as soon as it is
            yield chunk
    finally:
        proc.stdout.close()
        feeder.join(timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
