"""The board's routes: pages, the live change stream, and the actions, over the Dispatcher facade only.

A front end like the MCP tools (and served by the same process, beside ``/mcp``): each handler checks
the request (:class:`~.auth.Gate`), calls documented :class:`~agentic_dispatch.service.Dispatcher`
methods on a worker thread, and renders what they return (:mod:`.pages`). The live stream
(``GET /events``) is the events log itself: each message carries the log's byte offset as its SSE
``id``, so a browser that reconnects sends it back as ``Last-Event-ID`` and gets every change since.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import anyio
import anyio.to_thread
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from ..errors import DispatchError, InvalidInputError, StateError, WorkspaceNotFoundError
from ..http_auth import HttpPlan
from ..models import StatusReport
from .auth import Gate
from .pages import (
    COLUMNS,
    PAGE,
    Column,
    board_page,
    columns_html,
    error_page,
    facts_html,
    insights_page,
    run_page,
    signin_page,
    toolbar,
)

if TYPE_CHECKING:
    from ..service import Dispatcher

__all__ = ["Board", "Endpoint"]

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, "Dispatcher"], Awaitable[Response]]

FOLLOW_SECONDS = 0.25  # how often a stream looks at the events log: a change shows within a second
PING_SECONDS = 15  # a comment line this often keeps proxies from closing a quiet stream
MAX_OFFSET = 10_000_000
STATIC = {"board.css": "text/css; charset=utf-8", "board.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = {
    # Everything comes from this server; no inline script, no frames, no form posting elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # a ?token= URL is never sent elsewhere ("no-referrer" would make form posts carry "Origin: null")
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


async def _call(fn: Callable[[], T]) -> T:
    """A blocking service call on a worker thread."""
    return await anyio.to_thread.run_sync(fn)


def _status_of(e: DispatchError) -> int:
    if isinstance(e, WorkspaceNotFoundError):
        return 404
    if isinstance(e, InvalidInputError):
        return 400
    return 409 if isinstance(e, StateError) else 500


def _local_path(value: object, default: str = "/") -> str:
    """``value`` if it is a path on this server (a redirect target), else ``default``: never ``//host``,
    ``/\\host``, nor a path with a control character or space (browsers drop tabs and newlines from a URL,
    so ``/<tab>/host`` would become ``//host``)."""
    if (
        isinstance(value, str)
        and value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and not any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in value)
    ):
        return value
    return default


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _offsets(request: Request) -> dict[str, int]:
    out = {}
    for status in COLUMNS:
        raw = request.query_params.get(f"{status}_offset", "")
        if raw.isdigit() and 0 < int(raw) <= MAX_OFFSET:
            out[status] = int(raw)
    return out


class Board:
    """The board's routes and the service they read, attached by the server's lifespan."""

    def __init__(self, plan: HttpPlan) -> None:
        self.gate = Gate(plan)
        self.plan = plan
        self._svc: Dispatcher | None = None
        self._static: dict[str, bytes] = {}

    def attach(self, svc: Dispatcher) -> None:
        """Serve ``svc`` (the server's lifespan calls this before the first request)."""
        self._svc = svc

    def detach(self) -> None:
        self._svc = None

    @property
    def url(self) -> str:
        return self.plan.url + "/"

    def announcement(self) -> str:
        """The line ``serve`` prints on stderr: where the board is and how a browser signs in (never the
        token itself: a configured one is the user's to paste; a generated one was shown as a link once)."""
        if self.gate.open:
            return (
                f"the board is at {self.url} (no token: every user and program on this machine may open it; "
                "set AGENTIC_DISPATCH_HTTP_TOKEN to require one)"
            )
        return f"the board is at {self.url} ; sign a browser in once with {self.url}?token=<the server's token>"

    def routes(self) -> list[tuple[str, list[str], Endpoint]]:
        """``(path, methods, endpoint)`` of every route of the board."""
        return [
            ("/", ["GET"], self._guarded(self._board, "page")),
            ("/columns", ["GET"], self._guarded(self._columns, "data")),
            ("/events", ["GET"], self._guarded(self._events, "data")),
            ("/run/{name:path}", ["GET"], self._guarded(self._run, "page")),
            ("/run-facts/{name:path}", ["GET"], self._guarded(self._facts, "data")),
            ("/run-log/{name:path}", ["GET"], self._guarded(self._log, "data")),
            ("/insights", ["GET"], self._guarded(self._insights, "page")),
            ("/actions/{verb}", ["POST"], self._guarded(self._act, "action")),
            ("/signin", ["POST"], self._signin),
            ("/signout", ["POST"], self._signout),
            ("/static/{file}", ["GET"], self._asset),
        ]

    # -- checks --------------------------------------------------------------------------------
    def _guarded(self, handler: Handler, kind: str) -> Endpoint:
        """``handler`` behind the checks: Host/Origin, signed in (or signing in with ``?token=``)."""

        async def endpoint(request: Request) -> Response:
            refused = self.gate.refuse_foreign(request, action=kind == "action")
            if refused is None:
                refused = self._unsigned(request, kind)
            if refused is not None:
                return _secured(refused)
            svc = self._svc
            if svc is None:
                return _secured(PlainTextResponse("the server is starting; try again in a moment", 503))
            try:
                response = await handler(request, svc)
            except DispatchError as e:
                response = self._failure(request, e, kind)
            return _secured(response)

        return endpoint

    def _unsigned(self, request: Request, kind: str) -> Response | None:
        """The answer to a request that is not signed in (``None``: it is, or it signs in now)."""
        token = request.query_params.get("token")
        if kind == "page" and token is not None:
            if not self.gate.token_matches(token):
                return HTMLResponse(signin_page(request.url.path, "That is not this server's token."), 401)
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{rest}" if rest else "")
            return self.gate.sign_in(RedirectResponse(target, 303), request)
        if self.gate.signed_in(request):
            return None
        if kind == "page":
            wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return HTMLResponse(signin_page(wanted), 401)
        return PlainTextResponse("sign in first (the server's token)", 401)

    def _failure(self, request: Request, e: DispatchError, kind: str) -> Response:
        status = _status_of(e)
        if kind != "page" or _wants_json(request):
            return JSONResponse({"ok": False, "message": str(e)}, status)
        return HTMLResponse(error_page("That did not work", str(e), "/"), status)

    # -- pages ---------------------------------------------------------------------------------
    async def _load(self, svc: Dispatcher, request: Request) -> tuple[StatusReport, list[Column], dict[str, str]]:
        offsets = _offsets(request)

        def load() -> tuple[StatusReport, list[Column]]:
            cols, first = [], None
            for status in COLUMNS:
                report = svc.status(status=status, limit=PAGE, offset=offsets.get(status, 0))
                first = first or report
                # a record that cannot be read shows once, with the failed ones
                keep = {status, "unreadable"} if status == "failed" else {status}
                rows = [r for r in report.workspaces if str(r.status) in keep]
                cols.append(Column(status, rows, report.counts.get(status, 0), offsets.get(status, 0)))
            assert first is not None
            return first, cols

        report, cols = await _call(load)
        return report, cols, {f"{k}_offset": str(v) for k, v in offsets.items()}

    async def _board(self, request: Request, svc: Dispatcher) -> Response:
        cursor = await _call(lambda: svc.watch_cursor(None))  # read first: nothing after it is missed
        report, cols, query = await self._load(svc, request)
        back = "/" + (f"?{urlencode(query)}" if query else "")
        return HTMLResponse(board_page(report, cols, query, back, cursor))

    async def _columns(self, request: Request, svc: Dispatcher) -> Response:
        report, cols, query = await self._load(svc, request)
        back = "/" + (f"?{urlencode(query)}" if query else "")
        return JSONResponse({"columns": columns_html(cols, query, back), "toolbar": toolbar(report, back)})

    async def _run(self, request: Request, svc: Dispatcher) -> Response:
        name = request.path_params["name"]
        cursor = await _call(lambda: svc.watch_cursor(None))
        row = await _call(lambda: svc.row(name))

        def optional(fn: Callable[[], T]) -> T | str:
            try:
                return fn()
            except DispatchError as e:  # a part that cannot be shown says why; the page still shows
                return str(e)

        log = await _call(lambda: optional(lambda: svc.logs(name, tail=200)))
        diff = await _call(lambda: optional(lambda: svc.diff(name)))
        prompt = await _call(lambda: optional(lambda: svc.prompt(name)))
        return HTMLResponse(run_page(row, log, diff, prompt, cursor))

    async def _facts(self, request: Request, svc: Dispatcher) -> Response:
        name = request.path_params["name"]
        row = await _call(lambda: svc.row(name))
        return JSONResponse({"facts": facts_html(row, "/run/" + name), "status": str(row.status)})

    async def _log(self, request: Request, svc: Dispatcher) -> Response:
        name = request.path_params["name"]
        raw = request.query_params.get("since", "")
        since = int(raw) if raw.isdigit() and len(raw) < 19 else None
        got = await _call(lambda: svc.logs(name, tail=200, since_bytes=since))
        return JSONResponse(got.model_dump(mode="json"))

    async def _insights(self, request: Request, svc: Dispatcher) -> Response:
        raw = request.query_params.get("days", "7")
        try:
            days = float(raw)
        except ValueError as e:
            raise InvalidInputError("days", f"{raw[:20]!r} is not a number of days") from e
        report = await _call(lambda: svc.insights(days))
        return HTMLResponse(insights_page(report))

    # -- the live stream -----------------------------------------------------------------------
    async def _events(self, request: Request, svc: Dispatcher) -> Response:
        """Server-sent events: one ``changes`` message per batch of events-log lines, its ``id`` the offset
        after them. Starts at ``Last-Event-ID`` (a reconnect), else ``?cursor=`` (the page's), else now."""
        given = request.headers.get("last-event-id") or request.query_params.get("cursor") or None
        reset = False
        try:
            cursor = await _call(lambda: svc.watch_cursor(given))
        except InvalidInputError:  # an offset from another log (replaced since): start now, say so
            cursor, reset = await _call(lambda: svc.watch_cursor(None)), True

        async def stream() -> AsyncIterator[ServerSentEvent]:
            at = cursor
            yield ServerSentEvent(json.dumps({"cursor": at, "reset": reset}), event="ready", id=str(at))
            while True:
                changes, end = await anyio.to_thread.run_sync(svc.follow, at)
                if changes:
                    data = json.dumps([c.model_dump(mode="json") for c in changes])
                    yield ServerSentEvent(data, event="changes", id=str(end))
                elif end < at:  # the log was replaced: what the page shows may be stale
                    yield ServerSentEvent(json.dumps({"cursor": end, "reset": True}), event="ready", id=str(end))
                at = end
                await anyio.sleep(FOLLOW_SECONDS)

        return EventSourceResponse(stream(), ping=PING_SECONDS, headers={"Cache-Control": "no-store"})

    # -- actions -------------------------------------------------------------------------------
    async def _act(self, request: Request, svc: Dispatcher) -> Response:
        form = await request.form()
        verb = request.path_params["verb"]
        raw = form.get("workspace")
        workspace = raw.strip() if isinstance(raw, str) and raw.strip() else None
        answer = form.get("answer")
        act: dict[str, Callable[[], Any]] = {
            "answer": lambda: svc.resume(_named(workspace), _answer(answer)),
            "resume": lambda: svc.resume(_named(workspace)),
            "cancel": lambda: svc.cancel(_named(workspace)),
            "sync": lambda: svc.sync(workspace),
            "freeze": lambda: svc.freeze(),
            "unfreeze": lambda: svc.unfreeze(),
        }
        if verb not in act:
            return PlainTextResponse(f"no action {verb[:40]!r}; there are {', '.join(act)}", 404)
        result = await _call(act[verb])
        message = getattr(result, "message", None) or f"{result.workspace}: {result.status}"
        if _wants_json(request):
            return JSONResponse({"ok": True, "message": message})
        return RedirectResponse(_local_path(form.get("back")), 303)

    async def _signin(self, request: Request) -> Response:
        refused = self.gate.refuse_foreign(request, action=True)
        if refused is not None:
            return _secured(refused)
        form = await request.form()
        token, target = form.get("token"), _local_path(form.get("next"))
        if not isinstance(token, str) or not self.gate.token_matches(token.strip()):
            return _secured(HTMLResponse(signin_page(target, "That is not this server's token."), 401))
        return _secured(self.gate.sign_in(RedirectResponse(target, 303), request))

    async def _signout(self, request: Request) -> Response:
        refused = self.gate.refuse_foreign(request, action=True)
        if refused is not None:
            return _secured(refused)
        return _secured(self.gate.sign_out(RedirectResponse("/", 303)))

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["file"]
        refused = self.gate.refuse_foreign(request, action=False)
        if refused is not None or name not in STATIC:
            return _secured(refused or PlainTextResponse("not found", 404))
        if name not in self._static:
            self._static[name] = (files(__package__ or "agentic_dispatch.board") / "static" / name).read_bytes()
        response = Response(self._static[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})
        return _secured(response)


def _named(workspace: str | None) -> str:
    if workspace is None:
        raise InvalidInputError("workspace", "this action needs the workspace it is for.")
    return workspace


def _answer(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInputError("answer", "write the answer to the agent's question first.")
    return raw.strip()


def _secured(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response
