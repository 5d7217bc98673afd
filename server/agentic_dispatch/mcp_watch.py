"""The MCP front end of watching many agents: ``agentic_watch``, ``agentic_logs``, ``agentic_diff``,
``agentic_insights``, the ``agentic://workspaces`` resources, and their change notifications.

Thin like :mod:`.mcp_server`: argument plumbing over :class:`~agentic_dispatch.service.Dispatcher`
(the logic is in the service's views: ``service/views/``). :class:`WatchFeed` holds the
subscription bus the server is built with and, while the server runs, follows the events log and
publishes ``ResourceUpdated`` / ``ResourcesListChanged`` for ``subscriptions/listen`` clients
(protocol 2026-07-28), and ``notifications/resources/updated`` to sessions that used the older
``resources/subscribe``.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.elicitation import AcceptedElicitation, render_elicitation_schema
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourcesListChanged, ResourceUpdated, ServerEvent
from mcp_types import (
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmptyResult,
    InputRequiredResult,
    SubscribeRequestParams,
    ToolAnnotations,
    UnsubscribeRequestParams,
)
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field

from .errors import DispatchError, InvalidInputError, WorkspaceNotFoundError
from .mcp_tools import register_tool
from .models import (
    ACTIVE_STATUSES,
    MAX_LISTED,
    MAX_TAIL_LINES,
    MAX_WATCH_SECONDS,
    MAX_WINDOW_DAYS,
    AskedPerson,
    Change,
    DiffResult,
    InsightsReport,
    LogsResult,
    WatchResult,
    WorkspaceRow,
)

if TYPE_CHECKING:
    from .service import Dispatcher
else:  # what the tools' context holds at run time (see mcp_server); the service is imported when it is built
    from .mcp_tools import LazyDispatcher as Dispatcher

__all__ = ["LIST_URI", "PersonAnswer", "WatchFeed", "WorkspaceWatch", "register_watch", "status_uri"]

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Ctx = Context[Dispatcher]

HEARTBEAT_SECONDS = 5.0  # a progress notification at least this often while a watch waits
FOLLOW_SECONDS = 0.25  # how often the feed looks at the events log
LIST_URI = "agentic://workspaces"
_ONE = LIST_URI + "/{org}/{repo}/{slug}"


def status_uri(workspace: str) -> str:
    """The status resource of a workspace: ``agentic://workspaces/org/repo/task-5/status``."""
    return f"{LIST_URI}/{workspace}/status"


def _svc(ctx: Ctx) -> Dispatcher:
    return ctx.request_context.lifespan_context


async def _run(fn: Callable[[], T]) -> T:
    """A blocking service call on a worker thread."""
    return await anyio.to_thread.run_sync(fn)


def _read(fn: Callable[[], T]) -> T:
    """A service call for a resource: an unknown or malformed workspace is ``-32602`` with the advice."""
    try:
        return fn()
    except (WorkspaceNotFoundError, InvalidInputError) as e:
        raise ResourceNotFoundError(f"{e} (The list is at {LIST_URI}.)") from e
    except DispatchError as e:
        raise ResourceError(str(e)) from e


class WorkspaceWatch(WorkspaceRow, WatchResult):
    """``agentic_watch(workspace=...)``: the watch result, plus that workspace's row at the top level,
    as the one-workspace form returned before the cursor existed."""


class WatchFeed:
    """The subscription side of the server: its bus, and the task that feeds it while the server runs."""

    def __init__(self) -> None:
        self.bus = InMemorySubscriptionBus()
        self._dispatcher: Dispatcher | None = None
        # resources/subscribe (2025 sessions): URIs per client connection, forgotten with the connection
        self._legacy: weakref.WeakKeyDictionary[Connection, set[str]] = weakref.WeakKeyDictionary()

    def dispatcher(self) -> Dispatcher:
        """The running server's service (for the static list resource, which gets no context)."""
        if self._dispatcher is None:
            raise ResourceError("the server is still starting; read the resource again in a moment")
        return self._dispatcher

    @asynccontextmanager
    async def running(self, dispatcher: Dispatcher) -> AsyncIterator[None]:
        """Follow the events log while the body runs (the server's lifespan); stop cleanly after."""
        self._dispatcher = dispatcher
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow, dispatcher)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._dispatcher = None

    async def _follow(self, dispatcher: Dispatcher) -> None:
        offset: int | None = None  # the first look starts at the log's end: changes from now on
        while True:
            pause = FOLLOW_SECONDS
            try:
                changes, offset = await anyio.to_thread.run_sync(dispatcher.follow, offset)
                if changes:
                    await self.publish(changes)
            except Exception:  # the feed's boundary: a bad look is logged and a later one tries again
                log.exception("the resource subscription feed failed; trying again in %s s", HEARTBEAT_SECONDS)
                pause = HEARTBEAT_SECONDS
            await anyio.sleep(pause)

    async def publish(self, changes: list[Change]) -> None:
        """Tell subscribers which resources these changes touched: each workspace's status and the list,
        and (a workspace appeared) that the resource list changed."""
        uris = [*dict.fromkeys(status_uri(c.workspace) for c in changes), LIST_URI]
        events: list[ServerEvent] = [ResourceUpdated(uri=u) for u in uris]
        if any(c.kind == "dispatched" for c in changes):
            events.insert(0, ResourcesListChanged())
        for event in events:
            await self.bus.publish(event)
        for connection, wanted in list(self._legacy.items()):
            for uri in (u for u in uris if u in wanted):
                with anyio.move_on_after(5):  # best effort (it never raises); a stuck client is skipped
                    await connection.send_resource_updated(uri)

    async def subscribe(self, ctx: ServerRequestContext[Any], params: SubscribeRequestParams) -> EmptyResult:
        """``resources/subscribe`` (protocol 2025-11-25 and before): this connection gets this URI's updates."""
        self._legacy.setdefault(_connection(ctx), set()).add(params.uri)
        return EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams) -> EmptyResult:
        self._legacy.get(_connection(ctx), set()).discard(params.uri)
        return EmptyResult()


def _connection(ctx: ServerRequestContext[Any]) -> Connection:
    """The client connection a request came on. The context's session is built per request and only
    hands out the connection privately: subscriptions outlive the request, so they hang on this."""
    return ctx.session._connection


class _Progress:
    """Progress notifications of one call: strictly increasing (seconds waited), one message each."""

    def __init__(self, ctx: Ctx, total: float) -> None:
        self._ctx = ctx
        self._total = total or None
        self._t0 = time.monotonic()
        self._last = -1.0

    async def send(self, message: str) -> None:
        self._last = round(max(time.monotonic() - self._t0, self._last + 0.001), 3)
        await self._ctx.report_progress(self._last, self._total, message)

    async def heartbeat(self, message: str) -> None:
        """Hosts cut calls that stay quiet too long: say we are still waiting."""
        while True:
            await anyio.sleep(HEARTBEAT_SECONDS)
            await self.send(message)


async def _watch_many(
    ctx: Ctx, svc: Dispatcher, names: list[str] | None, timeout: float, cursor: str | None
) -> WatchResult:
    progress = _Progress(ctx, timeout)

    def on_change(change: Change) -> None:  # on the worker thread: hand it to the event loop
        from .service import describe  # the service is up: it called this

        anyio.from_thread.run(progress.send, describe(change))

    def watch() -> WatchResult | Exception:
        try:
            return svc.watch(names, timeout, cursor, on_change)
        except (DispatchError, OSError, sqlite3.Error) as e:
            return e  # handed back, not raised inside the task group (it would come out as a group)

    what = f"{len(names)} workspace(s)" if names else "everything queued or running"
    async with anyio.create_task_group() as tg:
        tg.start_soon(progress.heartbeat, f"watching {what}: no change yet")
        outcome = await anyio.to_thread.run_sync(watch, abandon_on_cancel=True)  # read-only: a cancel frees at once
        tg.cancel_scope.cancel()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def _wait_one(ctx: Ctx, svc: Dispatcher, workspace: str, timeout: float, cursor: str | None) -> WorkspaceWatch:
    """The one-workspace form: wait (progress every 5 s at most) until it leaves queued/running."""
    start = await _run(lambda: svc.watch_cursor(cursor))
    progress = _Progress(ctx, timeout)
    deadline = time.monotonic() + timeout
    while True:
        step = max(0.0, min(deadline - time.monotonic(), HEARTBEAT_SECONDS))
        rec = await _run(functools.partial(svc.wait, workspace, step))
        await progress.send(f"{workspace}: {rec.status}")
        if rec.status not in ACTIVE_STATUSES or time.monotonic() >= deadline:
            break
    row = (await _run(lambda: svc.status(workspace, log_lines=20))).workspaces[0]
    result = await _run(lambda: svc.watch_one_result(workspace, start, row))
    return WorkspaceWatch(**row.model_dump(), **result.model_dump())


# -- asking the person (agentic_watch(ask=true)) -------------------------------------------------
ASK_IN_RESULT_VERSION = "2026-07-28"  # from this protocol on, elicitation rides an InputRequiredResult
MAX_QUESTION_CHARS = 4000  # of a question shown in the host's form
NO_ELICITATION = "this host cannot ask the person (it declared no form elicitation): answer with agentic_resume"
Watch = Callable[[str | None, float], Awaitable[WatchResult]]


class PersonAnswer(BaseModel):
    """The form the host shows the person: one text answer."""

    answer: str = Field(min_length=1, description="Your answer to the agent's question; the run resumes with it")


@dataclass(frozen=True)
class _Question:
    workspace: str
    runs: int
    question: str

    @property
    def message(self) -> str:
        text = self.question if len(self.question) <= MAX_QUESTION_CHARS else self.question[:MAX_QUESTION_CHARS] + "…"
        return (
            f"{self.workspace} is blocked and asks:\n\n{text}\n\nYour answer resumes the run. "
            "Decline to leave the answer to the assistant."
        )


def _can_elicit(ctx: Ctx) -> bool:
    """Whether the client declared form elicitation (a bare ``elicitation: {}`` is form, as before modes)."""
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def _questions(result: WatchResult) -> list[_Question]:
    """The watched runs that became blocked and still are, on that same run (one question each)."""
    now = {r.name: r for r in result.workspaces}
    found: dict[str, _Question] = {}
    for c in result.changes:
        row = now.get(c.workspace)
        if c.kind == "blocked" and c.question and row is not None and row.status == "blocked" and row.runs == c.runs:
            found[c.workspace] = _Question(c.workspace, c.runs, c.question)
    return list(found.values())


async def _settle(svc: Dispatcher, q: _Question, action: str, answer: str | None) -> AskedPerson:
    """Resume ``q``'s run with the person's answer (when they gave one, and it still waits for it)."""
    if action != "accept" or not answer:
        outcome: Literal["cancelled", "declined"] = "cancelled" if action == "cancel" else "declined"
        return AskedPerson(workspace=q.workspace, question=q.question, outcome=outcome)

    def resume() -> str:
        return str(svc.resume(q.workspace, answer, blocked_run=q.runs).status)

    try:
        resumed = await _run(resume)
    except DispatchError as e:
        return AskedPerson(
            workspace=q.workspace, question=q.question, outcome="not resumed", answer=answer, note=str(e)
        )
    return AskedPerson(workspace=q.workspace, question=q.question, outcome="answered", answer=answer, resumed=resumed)


def _reported(result: WatchResult, asked: list[AskedPerson]) -> WatchResult:
    said = "; ".join(f"asked the person about {a.workspace}: {a.outcome}" for a in asked)
    return result.model_copy(
        update={"asked": asked, "message": f"{result.message}; {said}" if said else result.message}
    )


async def _watch_and_ask(
    ctx: Ctx, svc: Dispatcher, watch: Watch, cursor: str | None, timeout: float
) -> WatchResult | InputRequiredResult:
    """The watch; then each run that became blocked has its question put to the person.

    Protocol 2026-07-28 and later: the questions go back as an ``InputRequiredResult`` (the client asks and
    calls again with the answers and our ``request_state``: where the watch started, which runs were asked).
    Before: each is a mid-call ``elicitation/create`` request. Either way an answered run is resumed and the
    watch is read again from where it started, so the result carries the resume too."""
    if ctx.request_state is not None:
        start, asked_runs = _parse_state(ctx.request_state)
        responses = ctx.input_responses or {}
        asked = [
            await _answered(svc, name, runs, responses.get(f"answer-{i}")) for i, (name, runs) in enumerate(asked_runs)
        ]
        return _reported(await watch(str(start), 0), asked)
    start = await _run(lambda: svc.watch_cursor(cursor))
    result = await watch(str(start), timeout)
    questions = _questions(result)
    if not questions:
        return result
    if ctx.protocol_version is not None and is_version_at_least(ctx.protocol_version, ASK_IN_RESULT_VERSION):
        schema = render_elicitation_schema(PersonAnswer)
        requests = {
            f"answer-{i}": ElicitRequest(params=ElicitRequestFormParams(message=q.message, requested_schema=schema))
            for i, q in enumerate(questions)
        }
        state = json.dumps({"start": start, "asked": [[q.workspace, q.runs] for q in questions]})
        return InputRequiredResult(input_requests=dict(requests), request_state=state)
    asked = []
    for q in questions:
        try:
            got = await ctx.elicit(q.message, PersonAnswer)
        except ValueError:  # accepted with content that does not fit the form: nothing to resume with
            asked.append(AskedPerson(workspace=q.workspace, question=q.question, outcome="declined", note="no answer"))
            continue
        answer = got.data.answer if isinstance(got, AcceptedElicitation) else None
        asked.append(await _settle(svc, q, got.action, answer))
    return _reported(await watch(str(start), 0), asked)


async def _answered(svc: Dispatcher, name: str, runs: int, reply: object) -> AskedPerson:
    """What came of one question asked in an ``InputRequiredResult``: the client's reply to it (none: cancelled)."""
    row = await _run(lambda: svc.row(name))
    question = _Question(name, runs, row.question or "")
    if not isinstance(reply, ElicitResult):
        return await _settle(svc, question, "cancel", None)
    answer = (reply.content or {}).get("answer")
    return await _settle(svc, question, reply.action, answer if isinstance(answer, str) else None)


def _parse_state(raw: str) -> tuple[int, list[tuple[str, int]]]:
    """Raises:
    ToolError: not the request_state this tool returned.
    """
    try:
        state = json.loads(raw)
        start = int(state["start"])
        asked = [(str(name), int(runs)) for name, runs in state["asked"]]
    except (ValueError, TypeError, KeyError) as e:
        raise ToolError("request_state is not one agentic_watch returned; call it again without one.") from e
    return start, asked


def register_watch(server: MCPServer[Dispatcher], feed: WatchFeed) -> None:
    """Register the watching tools and the workspace resources on ``server`` (built with
    ``subscriptions=feed.bus``; its lifespan runs ``feed.running(dispatcher)``)."""

    def tool(name: str, title: str) -> Callable[[F], F]:
        """A read-only, idempotent tool (see :func:`.mcp_tools.register_tool`)."""
        annotations = ToolAnnotations(title=title, read_only_hint=True, idempotent_hint=True, open_world_hint=False)
        return register_tool(server, name, annotations)

    # resources/subscribe is no MCPServer API (it went in 2026-07-28); the lowlevel server still serves
    # it to older sessions, which is how hosts on 2025-11-25 subscribe.
    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, feed.subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, feed.unsubscribe)

    @tool("agentic_watch", "Watch workspaces")
    async def agentic_watch(
        ctx: Ctx,
        workspaces: Annotated[
            list[str] | None,
            Field(
                description="workspaces to watch; default: all queued or running (and new dispatches)", max_length=500
            ),
        ] = None,
        timeout_seconds: Annotated[
            float,
            Field(
                description="return after this long without a change (hosts cut calls at about 60 s)",
                ge=0,
                le=MAX_WATCH_SECONDS,
            ),
        ] = 30,
        cursor: Annotated[
            str | None,
            Field(
                description="the `cursor` the previous agentic_watch returned: report what changed since",
                max_length=40,
            ),
        ] = None,
        workspace: Annotated[
            str | None, Field(description="wait for this one workspace to stop running (instead of `workspaces`)")
        ] = None,
        ask: Annotated[
            bool,
            Field(
                description="when a watched run becomes blocked, ask the person its question through the host "
                "(if the host can show a form) and resume the run with their answer; if they decline, it stays "
                "blocked for you to answer"
            ),
        ] = False,
    ) -> WatchResult | InputRequiredResult:
        """Wait until one of many workspaces changes state (started, blocked, completed, failed, cancelled, …)
        or `timeout_seconds` pass, with a progress notification per change and every 5 s while waiting.
        Returns `changes` (each with the blocked `question` or the failure's `reason`), `workspaces` (the
        watched ones as they are now), `timed_out` and a `cursor`. To follow runs without missing anything, call
        again with `cursor` set to the one returned: changes that happened between two calls are reported by the
        next.

        With `workspace` instead: wait until that one workspace leaves queued/running and return its row
        (with the last 20 log lines) at the top level, as well as the fields above.

        With `ask`: a run that became blocked has its question put to the person (MCP elicitation); `asked` says
        what they answered (the run was resumed with it: the only change this tool makes, on the person's own
        answer) or that they declined (answer it yourself)."""
        if workspace is not None and workspaces:
            raise ToolError("give `workspace` (wait for one run to end) or `workspaces` (watch many), not both.")
        svc = _svc(ctx)

        async def watch(since: str | None, wait: float) -> WatchResult:
            if workspace is not None:
                return await _wait_one(ctx, svc, workspace, wait, since)
            return await _watch_many(ctx, svc, workspaces, wait, since)

        if ask and _can_elicit(ctx):
            return await _watch_and_ask(ctx, svc, watch, cursor, timeout_seconds)
        result = await watch(cursor, timeout_seconds)
        if ask and _questions(result):
            return result.model_copy(update={"message": f"{result.message}; {NO_ELICITATION}"})
        return result

    @tool("agentic_logs", "Read an agent's log")
    def agentic_logs(
        ctx: Ctx,
        workspace: Annotated[str, Field(description="the workspace (org/repo/name)")],
        tail: Annotated[int, Field(description="the last this many lines", ge=1, le=MAX_TAIL_LINES)] = 200,
        since_bytes: Annotated[
            int | None, Field(description="instead of the tail: what follows this byte offset (a previous `end`)", ge=0)
        ] = None,
    ) -> LogsResult:
        """The agent's log (all its runs; key values masked): the last `tail` lines, or with `since_bytes` what
        follows that offset. A reply holds at most about 60 KiB: then `truncated` is true and `note` says which
        bytes you got; read on with `since_bytes` set to the `end` returned (or back, with an earlier offset)."""
        return _svc(ctx).logs(workspace, tail, since_bytes)

    @tool("agentic_diff", "Show an agent's changes")
    def agentic_diff(
        ctx: Ctx,
        workspace: Annotated[str, Field(description="the workspace (org/repo/name)")],
        stat_only: Annotated[bool, Field(description="only the list of changed files with line counts")] = False,
        path: Annotated[
            str | None, Field(description="only this file or folder, as the stat names it", max_length=1024)
        ] = None,
    ) -> DiffResult:
        """What the agent's branch changed since it left its base branch (committed work): the `--stat`, then
        the patch. The reply stays under 64 KiB: a longer patch is cut (`truncated`, with a `note`); ask for
        one file at a time with `path` (the stat lists them), or just the stat with `stat_only`."""
        return _svc(ctx).diff(workspace, stat_only, path)

    @tool("agentic_insights", "How the agents did")
    def agentic_insights(
        ctx: Ctx,
        window_days: Annotated[
            float, Field(description="runs that finished in the last this many days", gt=0, le=MAX_WINDOW_DAYS)
        ] = 7,
    ) -> InsightsReport:
        """Per agent spec, the runs that finished in the window: how many, completed / failed / blocked /
        cancelled, success rate, median and p90 duration, tokens and cost where the CLI reports them, and the
        most common failure reasons."""
        return _svc(ctx).insights(window_days)

    _register_resources(server, feed)


def _register_resources(server: MCPServer[Dispatcher], feed: WatchFeed) -> None:
    json = "application/json"

    @server.resource(LIST_URI, name="workspaces", title="Workspaces", mime_type=json)
    def workspaces() -> str:
        """Every workspace (name, status, agent, updated_at), most recently updated first; at most 200, with a
        note when there are more. Subscribe to hear when one changes or a new one appears."""

        return _read(lambda: feed.dispatcher().workspace_list(MAX_LISTED)).model_dump_json(indent=1)

    @server.resource(_ONE + "/status", name="workspace-status", title="Workspace status", mime_type=json)
    def workspace_status(ctx: Ctx, org: str, repo: str, slug: str) -> str:
        """The workspace's status row (as agentic_status shows it). Subscribe to hear when it changes."""
        return _read(lambda: _svc(ctx).row(f"{org}/{repo}/{slug}")).model_dump_json(indent=1)

    @server.resource(_ONE + "/log", name="workspace-log", title="Agent log (tail)", mime_type="text/plain")
    def workspace_log(ctx: Ctx, org: str, repo: str, slug: str) -> str:
        """The last 200 lines of the agent's log (at most about 60 KiB, key values masked); agentic_logs
        reads the rest."""
        got = _read(lambda: _svc(ctx).logs(f"{org}/{repo}/{slug}"))
        return f"[{got.note}]\n{got.text}" if got.note else got.text

    @server.resource(_ONE + "/prompt", name="workspace-prompt", title="Last run's prompt", mime_type="text/markdown")
    def workspace_prompt(ctx: Ctx, org: str, repo: str, slug: str) -> str:
        """The exact prompt the agent's last run was given (at most 60 KiB)."""
        return _read(lambda: _svc(ctx).prompt(f"{org}/{repo}/{slug}"))

    @server.resource(_ONE + "/diff", name="workspace-diff", title="Agent's changes", mime_type=json)
    def workspace_diff(ctx: Ctx, org: str, repo: str, slug: str) -> str:
        """The branch's changes since its base: stat and patch, under 64 KiB (agentic_diff takes a path)."""
        return _read(lambda: _svc(ctx).diff(f"{org}/{repo}/{slug}")).model_dump_json(indent=1)
