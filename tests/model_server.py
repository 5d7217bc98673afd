"""A scripted stand-in for the LLM providers that the real agent CLIs talk to.

The three CLIs run unchanged (inside a container) and are pointed at this server:

* Codex CLI   - OpenAI Responses API, ``POST /v1/responses`` (SSE stream).
* Claude Code - Anthropic Messages API, ``POST /v1/messages?beta=true`` (SSE stream).
* Gemini CLI  - Gemini API, ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``.

A test scripts the conversation in a provider-neutral way::

    with ModelServer() as server:
        server.script([Shell("echo hi > f && git add f && git commit -qm x"), Say("done")])
        ...  # run a CLI against server.docker_url (from a container) or server.url
        assert server.model_requests[1].body["input"]  # what the CLI sent

Every *model call* (a request that asks the model for its next turn) consumes the next
scripted turn: ``Shell(cmd)`` answers with a call of the provider's own shell tool
(``exec_command``/``shell`` for codex, ``Bash`` for claude, ``run_shell_command`` for
gemini), ``Call(name, arguments)`` with a call of another tool the CLI offers, such as an
MCP server's (found under the host's prefix; codex's ``tool_search`` is made first when the
tool is deferred behind it), ``Say(text)`` with a final assistant message, ``Fail(status)``
with an HTTP error.
Once the script is exhausted the server answers ``Say("(script exhausted)")`` (or the
``then=`` turn given to :meth:`ModelServer.script`). Side requests the CLIs make besides
the agent loop (token counting, model lists, claude's title/quota calls without tools,
gemini's JSON "next speaker" checks) are answered sensibly without consuming a turn.

Each answer reports token usage ``input=11, output=7`` unless the server or the turn says
otherwise. All requests are recorded in :attr:`ModelServer.requests`.

Standard library only.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "Call",
    "Fail",
    "ModelServer",
    "RecordedRequest",
    "Say",
    "Shell",
    "Turn",
]

DEFAULT_USAGE = (11, 7)
EXHAUSTED_TEXT = "(script exhausted)"


# --------------------------------------------------------------------------- turns


@dataclass(frozen=True)
class Shell:
    """Answer with a call of the provider's shell tool running ``command``."""

    command: str
    usage: tuple[int, int] | None = None


@dataclass(frozen=True)
class Say:
    """Answer with a final assistant message."""

    text: str
    usage: tuple[int, int] | None = None


@dataclass(frozen=True)
class Fail:
    """Answer with an HTTP error in the provider's error format."""

    status: int = 500
    message: str = "scripted failure"
    retry_after: str | None = None  # the Retry-After header's value, when given (e.g. "1" with a 429)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after is not None else {}


@dataclass(frozen=True)
class Call:
    """Answer with a call of the tool the CLI offers as ``name``: an MCP tool by its own name, which
    hosts prefix with their server's (Codex ``mcp__<server>__NAME``, Gemini ``mcp_<server>_NAME``).
    A CLI that keeps the tool behind a tool search (Codex's ``tool_search``) is first answered with
    that search, which does not consume the turn. A tool not offered at all is answered with the
    text ``(no tool NAME was offered)``, so the CLI ends its turn and the test can see why."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    usage: tuple[int, int] | None = None


Turn = Shell | Say | Fail | Call


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str  # path without the query string, e.g. "/v1/messages"
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, the raw text if it is not JSON, or None
    api: str  # "openai", "anthropic", "gemini" or "other"
    model_call: bool  # True when this request consumed a scripted turn
    turn: Turn | None = None  # the turn it was answered with (model calls only)
    time: float = field(default_factory=time.time)

    @property
    def raw_path(self) -> str:
        if not self.query:
            return self.path
        q = "&".join(f"{k}={v}" for k, vs in self.query.items() for v in vs)
        return f"{self.path}?{q}"


# --------------------------------------------------------------------------- server


class ModelServer:
    """A threaded HTTP server speaking the three providers' streaming APIs.

    Bind address defaults to 0.0.0.0 so that containers reach it through
    ``host.docker.internal`` (``extra_hosts={"host.docker.internal": "host-gateway"}``).
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        usage: tuple[int, int] = DEFAULT_USAGE,
    ) -> None:
        self.usage = usage
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of bugs in this server (should stay empty)
        self._lock = threading.Lock()
        self._turns: list[Turn] = []
        self._then: Turn = Say(EXHAUSTED_TEXT)
        self._searched: Turn | None = None  # the Call turn a tool search was answered for
        self._ids = itertools.count(1)
        self._httpd = _QuietServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> ModelServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="model-server", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for clients on this host."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def docker_url(self) -> str:
        """Base URL for clients in a container started with the host-gateway extra host."""
        return f"http://host.docker.internal:{self.port}"

    # -- script
    def script(self, turns: Iterable[Turn], then: Turn | None = None) -> None:
        """Replace the remaining script. ``then`` answers every call after the script
        (default ``Say("(script exhausted)")``; e.g. ``then=Fail(500)`` fails forever)."""
        with self._lock:
            self._turns = list(turns)
            if then is not None:
                self._then = then

    def add(self, *turns: Turn) -> None:
        """Append turns to the script."""
        with self._lock:
            self._turns.extend(turns)

    @property
    def remaining(self) -> list[Turn]:
        with self._lock:
            return list(self._turns)

    @property
    def model_requests(self) -> list[RecordedRequest]:
        """The requests that consumed a scripted turn, in order."""
        with self._lock:
            return [r for r in self.requests if r.model_call]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- internals used by the handler
    def _next_turn(self) -> Turn:
        with self._lock:
            return self._turns.pop(0) if self._turns else self._then

    def _put_back_after_search(self, turn: Call) -> None:
        """Return a turn that a model call took to answer with a tool search instead; one search per turn."""
        with self._lock:
            self._turns.insert(0, turn)
            self._searched = turn

    def _searched_for(self, turn: Call) -> bool:
        with self._lock:
            return self._searched is turn

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def _usage(self, turn: Turn | None) -> tuple[int, int]:
        if isinstance(turn, Shell | Say | Call) and turn.usage is not None:
            return turn.usage
        return self.usage


# --------------------------------------------------------------------------- helpers


def _sse(events: Sequence[tuple[str | None, Any]]) -> bytes:
    out = []
    for name, data in events:
        chunk = ""
        if name is not None:
            chunk += f"event: {name}\n"
        chunk += f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        out.append(chunk)
    return "".join(out).encode()


def _decode_body(raw: bytes, encoding: str) -> Any:
    enc = encoding.lower().strip()
    try:
        if enc == "gzip":
            raw = gzip.decompress(raw)
        elif enc == "deflate":
            raw = zlib.decompress(raw)
    except (OSError, zlib.error):
        return raw.decode("latin-1")
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _not_offered(turn: Call) -> Say:
    return Say(f"(no tool {turn.name} was offered)", usage=turn.usage)


def _is_tool(offered: str, name: str) -> bool:
    """``offered`` is ``name`` or ``name`` under a host's MCP prefix (``mcp__srv__name``, ``mcp_srv_name``)."""
    return offered == name or (offered.startswith("mcp_") and offered.endswith("_" + name))


def _text_of(content: Any) -> str:
    """Flatten provider message content to text (for side-request heuristics)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(c) for c in content)
    if isinstance(content, dict):
        parts = [content.get("text", "")] if isinstance(content.get("text"), str) else []
        for key in ("content", "parts"):
            if key in content:
                parts.append(_text_of(content[key]))
        return " ".join(parts)
    return ""


_SIDE_ANSWERS: dict[str, Any] = {
    "next_speaker": "user",
    "reasoning": "The model has finished its turn.",
    "is_stuck": False,
    "unproductive_state_confidence": 0.0,
    "complexity_score": 10,
    "model_choice": "flash",
}


def _fill_schema(schema: Any, known: dict[str, Any], key: str = "") -> Any:
    """A minimal value satisfying a (Gemini/OpenAPI or JSON) schema."""
    if key in known:
        return known[key]
    if not isinstance(schema, dict):
        return {}
    kind = str(schema.get("type") or "object").lower()
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _fill_schema(v, known, k) for k, v in props.items()}
    if kind == "array":
        return []
    if kind == "integer":
        return 1
    if kind == "number":
        return 0.0
    if kind == "boolean":
        return False
    return ""


# --------------------------------------------------------------------------- handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients (CLIs killed mid-request, keep-alive sockets closed by a finished
        # container) reset connections all the time; that is not a test failure.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    owner: ModelServer
    protocol_version = "HTTP/1.1"
    server_version = "agentic-dispatch-model-server/1"

    # quiet
    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing
    def _read(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            raw = self.rfile.read(length)
        elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = self._read_chunked()
        else:
            raw = b""
        return _decode_body(raw, self.headers.get("Content-Encoding") or "")

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            line = self.rfile.readline().strip()
            size = int(line.split(b";")[0] or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_type.startswith("text/event-stream"):
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        body = self._read() if self.command in ("POST", "PUT", "PATCH") else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        api = _api_of(path)
        rec = RecordedRequest(self.command, path, query, headers, body, api, False)
        self.owner._record(rec)
        try:
            if api == "openai":
                _OpenAI(self, rec).handle()
            elif api == "anthropic":
                _Anthropic(self, rec).handle()
            elif api == "gemini":
                _Gemini(self, rec).handle()
            else:
                self._json(404, {"error": {"message": f"no route for {path}"}})
        except ConnectionError:
            pass
        except Exception:  # a bug in this stand-in: keep it visible to the test
            self.owner.errors.append(traceback.format_exc())
            with contextlib.suppress(ConnectionError):
                self._json(500, {"error": {"message": "model server bug, see server.errors"}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def _api_of(path: str) -> str:
    if path.startswith("/v1/responses") or (path.startswith("/v1/models") and ":" not in path):
        return "openai"
    if path.startswith("/v1/messages") or path.startswith("/api/"):
        return "anthropic"
    if path.startswith("/v1beta/") or path.startswith("/v1alpha/") or ":" in path:
        return "gemini"
    if path.startswith("/v1/"):
        return "openai"
    return "other"


class _Provider:
    def __init__(self, h: _Handler, rec: RecordedRequest) -> None:
        self.h = h
        self.rec = rec
        self.s = h.owner
        self.body: dict[str, Any] = rec.body if isinstance(rec.body, dict) else {}

    def take_turn(self) -> Turn:
        turn = self.s._next_turn()
        self.rec.model_call = True
        self.rec.turn = turn
        return turn


# --------------------------------------------------------------------------- OpenAI


class _OpenAI(_Provider):
    def handle(self) -> None:
        path, method = self.rec.path, self.rec.method
        if path.startswith("/v1/models"):
            model = path[len("/v1/models/") :] if path.startswith("/v1/models/") else ""
            if model:
                self.h._json(200, {"id": model, "object": "model", "owned_by": "test"})
            else:
                # One body that both OpenAI- and Anthropic-style clients accept.
                self.h._json(
                    200,
                    {
                        "object": "list",
                        "data": [],
                        "models": [],
                        "has_more": False,
                        "first_id": None,
                        "last_id": None,
                    },
                )
            return
        if path == "/v1/responses" and method == "POST":
            self.respond()
            return
        self.h._json(404, {"error": {"message": f"no route for {path}", "type": "not_found"}})

    def shell_call(self, command: str) -> tuple[str, str]:
        """Pick the shell tool offered in the request; return (name, arguments JSON)."""
        names = []
        for tool in self.body.get("tools") or []:
            if isinstance(tool, dict):
                names.append(tool.get("name") or (tool.get("function") or {}).get("name"))
        if "exec_command" in names or not names:
            return "exec_command", json.dumps({"cmd": command})
        if "shell_command" in names:
            return "shell_command", json.dumps({"command": command})
        if "shell" in names:
            return "shell", json.dumps({"command": ["bash", "-lc", command]})
        return "exec_command", json.dumps({"cmd": command})

    def offered_tool(self, name: str) -> tuple[str | None, str] | None:
        """(namespace, name) of the function the request offers as ``name``. Codex sends MCP tools
        found by a tool search as a ``namespace`` of functions, in ``tools`` or in the search's output."""
        found: list[Any] = list(self.body.get("tools") or [])
        for item in self.body.get("input") or []:
            if isinstance(item, dict) and item.get("type") == "tool_search_output":
                found.extend(item.get("tools") or [])
        for tool in found:
            if not isinstance(tool, dict):
                continue
            if tool.get("type") == "namespace":
                space = str(tool.get("name"))
                for inner in tool.get("tools") or []:
                    if isinstance(inner, dict) and _is_tool(f"{space}__{inner.get('name')}", name):
                        return space, str(inner.get("name"))
            elif tool.get("type") == "function" and _is_tool(str(tool.get("name")), name):
                return None, str(tool.get("name"))
        return None

    def offers_tool_search(self) -> bool:
        return any(isinstance(t, dict) and t.get("type") == "tool_search" for t in self.body.get("tools") or [])

    def respond(self) -> None:
        turn = self.take_turn()
        if isinstance(turn, Fail):
            self.h._json(
                turn.status,
                {"error": {"message": turn.message, "type": "server_error", "code": None}},
                turn.headers,
            )
            return
        target: tuple[str | None, str] | None = None
        search = False
        if isinstance(turn, Call):
            target = self.offered_tool(turn.name)
            if target is None and self.offers_tool_search() and not self.s._searched_for(turn):
                self.s._put_back_after_search(turn)
                search = True
            elif target is None:
                turn = _not_offered(turn)
        s = self.s
        model = str(self.body.get("model") or "test-model")
        resp_id = s._id("resp")
        inp, out = s._usage(turn)
        usage = {
            "input_tokens": inp,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inp + out,
        }
        base = {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
        }
        events: list[tuple[str | None, Any]] = []
        seq = itertools.count()

        def ev(kind: str, **data: Any) -> None:
            events.append((kind, {"type": kind, "sequence_number": next(seq), **data}))

        ev("response.created", response={**base, "status": "in_progress", "output": []})
        ev("response.in_progress", response={**base, "status": "in_progress", "output": []})
        pending: dict[str, Any]
        item: dict[str, Any]
        if search:
            assert isinstance(turn, Call)
            item = {
                "type": "tool_search_call",
                "id": s._id("ts"),
                "call_id": s._id("call"),
                "status": "completed",
                "execution": "client",
                "arguments": {"query": turn.name, "limit": 8},
            }
            ev("response.output_item.added", output_index=0, item=item)
        elif isinstance(turn, Shell | Call):
            namespace: dict[str, str] = {}
            if isinstance(turn, Shell):
                name, args = self.shell_call(turn.command)
            else:
                assert target is not None
                namespace = {"namespace": target[0]} if target[0] else {}
                name, args = target[1], json.dumps(turn.arguments)
            item_id, call_id = s._id("fc"), s._id("call")
            pending = {
                "type": "function_call",
                "id": item_id,
                "call_id": call_id,
                **namespace,
                "name": name,
                "arguments": "",
                "status": "in_progress",
            }
            item = {**pending, "arguments": args, "status": "completed"}
            ev("response.output_item.added", output_index=0, item=pending)
            ev(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=0,
                delta=args,
            )
            ev(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=0,
                arguments=args,
            )
        else:
            item_id = s._id("msg")
            part: dict[str, Any] = {"type": "output_text", "text": turn.text, "annotations": []}
            pending = {
                "type": "message",
                "id": item_id,
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            item = {**pending, "status": "completed", "content": [part]}
            ev("response.output_item.added", output_index=0, item=pending)
            loc = {"item_id": item_id, "output_index": 0, "content_index": 0}
            ev("response.content_part.added", **loc, part={**part, "text": ""})
            ev("response.output_text.delta", **loc, delta=turn.text)
            ev("response.output_text.done", **loc, text=turn.text)
            ev("response.content_part.done", **loc, part=part)
        ev("response.output_item.done", output_index=0, item=item)
        ev(
            "response.completed",
            response={**base, "status": "completed", "output": [item], "usage": usage},
        )
        self.h._send(200, _sse(events), "text/event-stream")


# --------------------------------------------------------------------------- Anthropic


class _Anthropic(_Provider):
    def handle(self) -> None:
        path, method = self.rec.path, self.rec.method
        if path == "/v1/messages/count_tokens":
            self.h._json(200, {"input_tokens": self.s.usage[0]})
            return
        if path == "/v1/messages" and method == "POST":
            if self.is_side_call():
                self.respond(Say("ok"), consume=False)
            else:
                self.respond(self.take_turn(), consume=True)
            return
        # Other endpoints (e.g. /api/... metadata): an empty success is the least surprising.
        self.h._json(200, {})

    def is_side_call(self) -> bool:
        """Claude's non-agent requests (titles, quota probes, topic checks) carry no tools."""
        return not self.body.get("tools")

    def offered_tool(self, name: str) -> str | None:
        """The tool offered as ``name`` with its schema (Claude Code names MCP tools ``mcp__<server>__<tool>``;
        one deferred behind its tool search is sent with ``defer_loading`` and cannot be called yet)."""
        for tool in self.body.get("tools") or []:
            if isinstance(tool, dict) and not tool.get("defer_loading") and _is_tool(str(tool.get("name")), name):
                return str(tool.get("name"))
        return None

    def respond(self, turn: Turn, consume: bool) -> None:
        s, h = self.s, self.h
        if isinstance(turn, Fail):
            kind = "rate_limit_error" if turn.status == 429 else "api_error"
            h._json(turn.status, {"type": "error", "error": {"type": kind, "message": turn.message}}, turn.headers)
            return
        model = str(self.body.get("model") or "test-model")
        inp, out = s._usage(turn)
        msg_id = s._id("msg")
        name = self.offered_tool(turn.name) if isinstance(turn, Call) else None
        if isinstance(turn, Call) and name is None:
            turn = _not_offered(turn)
        if isinstance(turn, Shell | Call):
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": s._id("toolu"),
                "name": name or "Bash",
                "input": turn.arguments
                if isinstance(turn, Call)
                else {"command": turn.command, "description": "Run a shell command"},
            }
            stop_reason = "tool_use"
        else:
            block = {"type": "text", "text": turn.text}
            stop_reason = "end_turn"
        usage_start = {
            "input_tokens": inp,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if not self.body.get("stream"):
            h._json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [block],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {**usage_start, "output_tokens": out},
                },
            )
            return
        if block["type"] == "tool_use":
            start_block = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            start_block = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        events: list[tuple[str | None, Any]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage_start,
                    },
                },
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": start_block},
            ),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"input_tokens": inp, "output_tokens": out},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        h._send(200, _sse(events), "text/event-stream")


# --------------------------------------------------------------------------- Gemini


class _Gemini(_Provider):
    def handle(self) -> None:
        path = self.rec.path
        model, _, method = path.rpartition("/")[2].partition(":")
        if method == "countTokens":
            self.h._json(200, {"totalTokens": self.s.usage[0]})
            return
        if method in ("streamGenerateContent", "generateContent"):
            stream = method == "streamGenerateContent"
            if self.is_side_call():
                self.respond_side(model, stream)
            else:
                self.respond(self.take_turn(), model, stream)
            return
        if method == "embedContent":
            self.h._json(200, {"embedding": {"values": [0.0] * 8}})
            return
        if method == "batchEmbedContents":
            n = len(self.body.get("requests") or [])
            self.h._json(200, {"embeddings": [{"values": [0.0] * 8}] * n})
            return
        if path.rstrip("/").endswith("/models"):
            self.h._json(200, {"models": []})
            return
        if path.startswith("/v1beta/models/") and not method:
            self.h._json(200, {"name": f"models/{model}", "displayName": model})
            return
        self.h._json(404, {"error": {"code": 404, "message": f"no route for {path}", "status": "NOT_FOUND"}})

    def is_side_call(self) -> bool:
        """Gemini's helper calls (next-speaker checks, routing, loop detection) ask for
        JSON output and offer no tools; the agent loop always offers tools."""
        cfg = self.body.get("generationConfig") or {}
        wants_json = cfg.get("responseMimeType") == "application/json" or bool(
            cfg.get("responseSchema") or cfg.get("responseJsonSchema")
        )
        return wants_json and not self.body.get("tools")

    def usage_meta(self, turn: Turn | None) -> dict[str, int]:
        inp, out = self.s._usage(turn)
        return {"promptTokenCount": inp, "candidatesTokenCount": out, "totalTokenCount": inp + out}

    def reply(self, stream: bool, parts: list[dict[str, Any]], model: str, turn: Turn | None) -> None:
        chunk = {
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": self.usage_meta(turn),
            "modelVersion": model,
            "responseId": self.s._id("gem"),
        }
        if stream:
            self.h._send(200, _sse([(None, chunk)]), "text/event-stream")
        else:
            self.h._json(200, chunk)

    def respond_side(self, model: str, stream: bool) -> None:
        # JSON-mode helper calls: fill the requested schema, with answers that let the
        # CLI carry on ("the user speaks next", "not stuck", a low complexity score).
        cfg = self.body.get("generationConfig") or {}
        schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema") or {}
        text = json.dumps(_fill_schema(schema, _SIDE_ANSWERS))
        self.reply(stream, [{"text": text}], model, None)

    def respond(self, turn: Turn, model: str, stream: bool) -> None:
        if isinstance(turn, Fail):
            status_name = {
                400: "INVALID_ARGUMENT",
                401: "UNAUTHENTICATED",
                403: "PERMISSION_DENIED",
                404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED",
                503: "UNAVAILABLE",
            }.get(turn.status, "INTERNAL")
            self.h._json(
                turn.status,
                {"error": {"code": turn.status, "message": turn.message, "status": status_name}},
                turn.headers,
            )
            return
        if isinstance(turn, Call):
            name = self.offered_tool(turn.name)
            if name is None:
                turn = _not_offered(turn)
        if isinstance(turn, Shell):
            parts: list[dict[str, Any]] = [
                {
                    "functionCall": {
                        "name": "run_shell_command",
                        "args": {"command": turn.command, "description": "Run a shell command"},
                    }
                }
            ]
        elif isinstance(turn, Call):
            parts = [{"functionCall": {"name": name, "args": turn.arguments}}]
        else:
            parts = [{"text": turn.text}]
        self.reply(stream, parts, model, turn)

    def offered_tool(self, name: str) -> str | None:
        """The declared function that is ``name`` (Gemini CLI offers MCP tools as ``mcp_<server>_<tool>``)."""
        for group in self.body.get("tools") or []:
            for decl in (group.get("functionDeclarations") or []) if isinstance(group, dict) else []:
                if isinstance(decl, dict) and _is_tool(str(decl.get("name")), name):
                    return str(decl.get("name"))
        return None
