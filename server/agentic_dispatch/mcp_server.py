"""The MCP front end: thin tools over :class:`~agentic_dispatch.service.Dispatcher`.

The only module that imports ``mcp``. Each tool validates nothing itself beyond its
typed signature: it forwards to the service and turns the service's
:class:`~agentic_dispatch.errors.DispatchError` into a tool error the model can act on.
Tools are plain functions: the SDK runs them on a worker thread, which keeps the
blocking Docker and git calls off the event loop.

Start-up is what a host waits for: the answers to ``initialize`` and ``tools/list`` need the
SDK and the tools' signatures (``models``), nothing of the service. The service
(:class:`~.mcp_tools.LazyDispatcher`) is built on a worker thread once the tools have been listed
(or :data:`START_AFTER_SECONDS` after the server starts, or at the first call that needs it).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast

import anyio
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, InputRequiredResult, ToolAnnotations
from mcp_types import Tool as McpTool
from pydantic import AnyHttpUrl, Field

from .errors import DispatchError
from .mcp_tools import LazyDispatcher, register_tool
from .mcp_watch import WatchFeed, register_watch
from .models import (
    MAX_REVIEW_ROUNDS,
    AgeDays,
    BranchName,
    CancelResult,
    CleanReport,
    Count,
    DependsOn,
    DispatchRequest,
    DispatchResult,
    DoctorReport,
    IdempotencyKey,
    LockKey,
    PositiveNumber,
    Priority,
    QueueState,
    RetryPolicy,
    Scope,
    ScopeMode,
    StatusReport,
    SyncReport,
    Tag,
    Task,
    WorkspaceName,
)

if TYPE_CHECKING:
    from .board import Board
    from .http_auth import HttpPlan
    from .service import Dispatcher
else:
    # At run time the tools' context holds a LazyDispatcher (every Dispatcher method, waiting for the service
    # first); the SDK only reads that a tool's first parameter is a Context.
    Dispatcher = LazyDispatcher

__all__ = ["StaticTokenVerifier", "build_server", "run_http"]

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

INSTRUCTIONS = """\
agentic-dispatch runs coding agents (codex, claude, gemini, or `shell` for a plain script) in Docker containers,
each in its own git clone of a repository on its own branch. agentic_dispatch returns at once; follow a run with
agentic_watch (waits with progress) or agentic_status. A `blocked` workspace has a question: answer it with
agentic_resume. Results stay in the workspace until agentic_sync brings them home. Dispatches chain: depends_on
waits for other workspaces to complete, base_workspace starts from another's branch, review_of reviews one (with
review_rounds, the coder is sent back and reviewed again), retry tries failures again by cause."""

Ctx = Context[Dispatcher]


def _svc(ctx: Ctx) -> Dispatcher:
    return ctx.request_context.lifespan_context


# Dispatch and resume prepare a workspace on a worker thread (fetch, clone, files, start). The SDK runs
# plain tools on anyio's default pool (40 threads): a burst of dispatches would hold every thread and
# leave status and watch waiting for seconds. They get their own few threads instead.
PREPARING_AT_ONCE = 8

# The service starts building when the first tools/list has been answered (hosts list the tools right after
# initialize), or this long after the server started serving when nobody lists them (an HTTP server with no
# client yet still reconciles, times runs out and delivers results).
START_AFTER_SECONDS = 1.0


def _version() -> str:
    """The installed package's version, for ``serverInfo`` (read from its metadata: about a millisecond)."""
    try:
        return version("agentic-dispatch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class StaticTokenVerifier:
    """The SDK's ``TokenVerifier`` for one fixed bearer token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(errors="replace"), self._token):
            return None
        return AccessToken(token=token, client_id="agentic-dispatch-http", scopes=[])


def run_http(server: MCPServer[Dispatcher], http: HttpPlan) -> None:
    """Serve streamable HTTP; the SDK refuses a Host or Origin header that names none of ``http``'s hosts."""
    log.info(
        "serving http://%s:%s/mcp (%s); Host names served: %s (add more with --allowed-host)",
        http.host,
        http.port,
        "bearer token required" if http.token else "no token: loopback only",
        ", ".join(http.allowed_hosts),
    )
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(http.allowed_hosts),
        allowed_origins=list(http.allowed_origins),
    )
    server.run("streamable-http", host=http.host, port=http.port, transport_security=security)


class _StrictServer(MCPServer[Dispatcher]):
    """Refuses arguments a tool does not take. The SDK drops them silently, so a misspelt ``dry_run``
    (``dryrun``) would launch a real run instead of a dry one. Tells the lifespan when the tools have
    been listed (``tools_listed``): the service may start building then."""

    tools_listed: anyio.Event | None = None  # the running lifespan's

    async def list_tools(self) -> list[McpTool]:
        tools = await super().list_tools()
        if self.tools_listed is not None:
            self.tools_listed.set()
        return tools

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Dispatcher, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        known = next((t.input_schema.get("properties", {}) for t in await self.list_tools() if t.name == name), None)
        unknown = sorted(set(arguments) - set(known)) if known is not None else []
        if unknown:
            raise ToolError(
                f"{name} takes no argument named {', '.join(map(repr, unknown))}; its arguments are "
                f"{', '.join(sorted(known or {})) or '(none)'}. Fix the name (or leave it out) and call again."
            )
        return await super().call_tool(name, arguments, context)


def build_server(
    make_dispatcher: Callable[[], Dispatcher],
    *,
    token: str | None = None,
    issuer_url: str = "http://127.0.0.1",
    board: Board | None = None,
) -> MCPServer[Dispatcher]:
    """Build the MCP server. ``make_dispatcher`` is called on a worker thread once the tools have been
    listed (see :class:`~.mcp_tools.LazyDispatcher`); a failure is logged and retried by the next call.

    With a ``token``, HTTP callers must send ``Authorization: Bearer <token>``: the SDK's bearer
    middleware asks :class:`StaticTokenVerifier` and answers 401 with ``WWW-Authenticate`` otherwise.
    The SDK wants an issuer with a verifier; the server names itself. No resource URL is set, so no
    OAuth metadata route is served and no client is sent to look for an authorization server.

    With a ``board`` (HTTP only), its routes are served beside ``/mcp`` and it reads the same service."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[Dispatcher]) -> AsyncIterator[Dispatcher]:
        service = LazyDispatcher(make_dispatcher)
        server.tools_listed = anyio.Event()
        if board is not None:
            board.attach(cast("Dispatcher", service))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(come_up, service, server.tools_listed)
                try:
                    yield cast("Dispatcher", service)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            server.tools_listed = None
            if board is not None:
                board.detach()
            await anyio.to_thread.run_sync(service.close)

    async def come_up(service: LazyDispatcher, listed: anyio.Event) -> None:
        """Build the service in the background once the tools are listed, then feed the resource subscriptions."""
        with anyio.move_on_after(START_AFTER_SECONDS):
            await listed.wait()
        try:
            await anyio.to_thread.run_sync(service.ready)
        except DispatchError as e:  # a bad config: each tool call says so too, and builds again
            log.error("the service cannot start (each tool call says why, and tries again): %s", e)
        except Exception:  # this background task's boundary: each tool call reports it too, and builds again
            log.exception("the service cannot start; each tool call tries again")
        while not service.is_up:  # a later call's build may succeed
            await anyio.sleep(START_AFTER_SECONDS)
        async with feed.running(cast("Dispatcher", service)):  # resource change notifications while it runs
            await anyio.sleep_forever()

    limiter: list[anyio.CapacityLimiter] = []  # made on first use, in the server's event loop

    async def _preparing(fn: Callable[[], T]) -> T:
        if not limiter:
            limiter.append(anyio.CapacityLimiter(PREPARING_AT_ONCE))
        return await anyio.to_thread.run_sync(fn, limiter=limiter[0])

    auth = AuthSettings(issuer_url=AnyHttpUrl(issuer_url), resource_server_url=None) if token else None
    feed = WatchFeed()
    server = _StrictServer(
        name="agentic-dispatch",
        version=_version(),
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        token_verifier=StaticTokenVerifier(token) if token else None,
        auth=auth,
        subscriptions=feed.bus,
    )

    def tool(name: str, annotations: ToolAnnotations) -> Callable[[F], F]:
        return register_tool(server, name, annotations)

    @tool(
        name="agentic_dispatch",
        annotations=ToolAnnotations(
            title="Dispatch a coding agent",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def agentic_dispatch(
        ctx: Ctx,
        repo: Annotated[str, Field(description="absolute path to a local git repo, a git URL, or org/repo")],
        task: Annotated[Task, Field(description="what the agent should do (for agent `shell`: a bash script)")],
        agent: Annotated[
            str | None, Field(description="agent spec base[:model]: codex, claude, gemini, shell; default from config")
        ] = None,
        org: Annotated[str | None, Field(description="organisation, when repo is a bare name")] = None,
        template: Annotated[
            str | None, Field(description="prompt template: coding, conventions, security, review, verify")
        ] = None,
        plan_template: Annotated[str | None, Field(description="plan template from prompts/plans")] = None,
        variables: Annotated[
            dict[str, str] | None, Field(description="values for the plan template's $variables")
        ] = None,
        persona: Annotated[str | None, Field(description="persona from prompts/personas")] = None,
        issue: Annotated[PositiveNumber | None, Field(description="issue number; names the workspace task-N")] = None,
        pr: Annotated[PositiveNumber | None, Field(description="pull request number; names the workspace pr-N")] = None,
        branch: Annotated[
            BranchName | None, Field(description="existing branch to start from (default: the repo's HEAD)")
        ] = None,
        tag: Annotated[Tag | None, Field(description="a label of yours, kept on the record")] = None,
        priority: Annotated[
            Literal["critical", "high", "normal", "low"], Field(description="queue order when slots are full")
        ] = "normal",
        timeout_seconds: Annotated[PositiveNumber | None, Field(description="stop the run after this long")] = None,
        idempotency_key: Annotated[
            IdempotencyKey | None,
            Field(description="the same key again returns the existing workspace instead of a new run"),
        ] = None,
        lock: Annotated[
            LockKey | None,
            Field(
                description="runs with the same lock key never overlap (e.g. one shared database); "
                "a queued one waits and agentic_status says for which"
            ),
        ] = None,
        scope: Annotated[
            Scope | None,
            Field(
                description="globs of the paths the run may change, from the repository's root (git wildmatch: "
                "'src/**', 'tests/**', '!src/gen/**'); changes outside are listed in agentic_status "
                "(default: the server's [defaults] scope, else none)"
            ),
        ] = None,
        scope_mode: Annotated[
            ScopeMode | None,
            Field(
                description="'fail': a run that changed paths outside its scope ends failed with them listed "
                "(default: the server's [defaults] scope_mode, else 'warn')"
            ),
        ] = None,
        depends_on: Annotated[
            DependsOn | None,
            Field(
                description="workspaces that must end completed before this one starts (it waits queued, and "
                "agentic_status says for what); cancelling one of them cancels this one"
            ),
        ] = None,
        base_workspace: Annotated[
            WorkspaceName | None,
            Field(
                description="a workspace of the same repository whose branch, as it ends, this one's branch starts "
                "from (so it sees that agent's commits; implies depends_on it)"
            ),
        ] = None,
        retry: Annotated[
            RetryPolicy | None,
            Field(
                description='retries by cause, e.g. {"max": 2, "on": ["provider", "crash"]}: classes provider, '
                "timeout, crash, lost, qa; a retry continues the agent's session (default: [retry] in the config)"
            ),
        ] = None,
        review_of: Annotated[
            WorkspaceName | None,
            Field(
                description="review that workspace's branch once it completes (template `review`, persona `reviewer` "
                "by default); the verdict, from REVIEW.md, shows on both workspaces' rows"
            ),
        ] = None,
        review_rounds: Annotated[
            int,
            Field(
                ge=0,
                le=MAX_REVIEW_ROUNDS,
                description="with review_of: after 'changes requested', send the reviewed agent back with the "
                "comments and review again, up to this many more rounds",
            ),
        ] = 0,
        dry_run: Annotated[bool, Field(description="prepare and return the prompt without launching")] = False,
        qa: Annotated[
            bool | None,
            Field(description="run the repository's tests after the agent ends completed (default: [qa] enabled)"),
        ] = None,
    ) -> DispatchResult:
        """Hand a coding task to an agent running in its own container, on its own branch of a fresh clone.

        Returns at once with the workspace name and status `running` (or `queued` when all slots are busy),
        never waiting for the agent. Follow it with agentic_watch or agentic_status; answer a `blocked` one
        with agentic_resume. The caller's own checkout is never touched."""
        req = DispatchRequest(
            repo=repo,
            task=task,
            agent=agent,
            org=org,
            template=template,
            plan_template=plan_template,
            variables=variables or {},
            persona=persona,
            issue=issue,
            pr=pr,
            branch=branch,
            tag=tag,
            priority=Priority(priority),
            timeout_seconds=timeout_seconds,
            idempotency_key=idempotency_key,
            lock=lock,
            scope=scope,
            scope_mode=scope_mode,
            depends_on=depends_on,
            base_workspace=base_workspace,
            retry=retry,
            review_of=review_of,
            review_rounds=review_rounds,
            dry_run=dry_run,
            qa=qa,
        )
        return await _preparing(lambda: _svc(ctx).dispatch(req))

    @tool(
        name="agentic_status",
        annotations=ToolAnnotations(
            title="Workspace status", read_only_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    def agentic_status(
        ctx: Ctx,
        workspace: Annotated[str | None, Field(description="one workspace (org/repo/name); default all")] = None,
        status: Annotated[
            Literal["queued", "running", "completed", "failed", "blocked", "cancelled"] | None,
            Field(description="only workspaces with this status"),
        ] = None,
        limit: Annotated[int, Field(description="at most this many rows, newest first", ge=1, le=1000)] = 50,
        log_lines: Annotated[int, Field(description="include this many lines of each agent's log", ge=0, le=500)] = 0,
        chain: Annotated[
            bool,
            Field(description="with a workspace: the rows of its whole chain (what it depends on, it, its dependents)"),
        ] = False,
    ) -> StatusReport:
        """Counts per status and one row per workspace: agent, status, runs, `question` (a blocked agent's
        question) or `reason` (why it failed or was cancelled), branch, times, exit code, the agent's run summary,
        `depends_on`/`dependents` (a pipeline's edges) and `waiting_for`, and optionally its log tail."""
        return _svc(ctx).status(workspace, status, limit, log_lines, chain=chain)

    @tool(
        name="agentic_resume",
        annotations=ToolAnnotations(
            title="Resume a workspace",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def agentic_resume(
        ctx: Ctx,
        workspace: Annotated[str, Field(description="the workspace name agentic_dispatch returned")],
        answer: Annotated[
            str | None, Field(description="answer to a blocked agent's question (written to ANSWER.md)")
        ] = None,
        agent: Annotated[str | None, Field(description="run a different agent spec this time")] = None,
    ) -> DispatchResult:
        """Run the agent again in the same workspace and branch: answer a `blocked` agent, or retry a `failed`
        or `completed` one. Returns at once; `runs` goes up by one."""
        return await _preparing(lambda: _svc(ctx).resume(workspace, answer, agent))

    @tool(
        name="agentic_sync",
        annotations=ToolAnnotations(
            title="Deliver results home",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=True,
        ),
    )
    def agentic_sync(
        ctx: Ctx,
        workspace: Annotated[str | None, Field(description="one workspace; default: every finished one")] = None,
        force: Annotated[
            bool,
            Field(description="with a workspace: its branch may overwrite a different branch of the same name"),
        ] = False,
        include_checkpoints: Annotated[
            bool,
            Field(description="also deliver branches that end in an automatic checkpoint of a stopped run"),
        ] = False,
    ) -> SyncReport:
        """Bring results home: each completed run's branch `agent/...` goes into the repository it was dispatched
        from (a local repository gets only that ref; a remote gets a push to the origin recorded at dispatch), and,
        when an endpoint is configured, each finished run's record is posted there. Delivers what is due now and
        returns what was delivered, what is pending (attempts, next try, last error), what needs a person's
        attention (why, what to do) and what was given up. Naming a workspace also retries its deliveries that
        needed attention. A branch that ends in an automatic checkpoint (the uncommitted work of a stopped
        run) is held back unless `include_checkpoints`. Safe to call again: nothing is delivered twice."""
        return _svc(ctx).sync(workspace, force, include_checkpoints=include_checkpoints)

    @tool(
        name="agentic_clean",
        annotations=ToolAnnotations(
            title="Remove finished workspaces",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    def agentic_clean(
        ctx: Ctx,
        older_than_days: Annotated[
            AgeDays | None,
            Field(description="only what finished longer ago than this many days (0: any age)"),
        ] = None,
        keep: Annotated[Count | None, Field(description="always keep this many of the most recently finished")] = None,
        dry_run: Annotated[bool, Field(description="remove nothing; return what would go")] = False,
        force: Annotated[
            bool, Field(description="also remove finished work that was not delivered (never queued, running, blocked)")
        ] = False,
    ) -> CleanReport:
        """Free disk space: remove, oldest first, finished workspaces whose work went home (its branch delivered by
        agentic_sync, or nothing to deliver). Never a queued, running or blocked one; with `force` also finished
        ones that were not delivered. Neither `older_than_days` nor `keep`: the server's [retention] values, else
        7 days. Returns each removal with the bytes freed and each workspace kept with why. The events, the
        mirrors and agentic_insights keep counting removed runs."""
        return _svc(ctx).clean(older_than_days, keep, dry_run, force)

    @tool(
        name="agentic_cancel",
        annotations=ToolAnnotations(
            title="Cancel a workspace",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    def agentic_cancel(
        ctx: Ctx, workspace: Annotated[str, Field(description="the workspace to cancel")]
    ) -> CancelResult:
        """Cancel a workspace: a queued one never starts; a running one's container is stopped (its work so far
        stays in the workspace). Cancelling a finished or already cancelled workspace changes nothing."""
        return _svc(ctx).cancel(workspace)

    @tool(
        name="agentic_dispatch_shutdown",
        annotations=ToolAnnotations(
            title="Freeze the queue",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    def agentic_dispatch_shutdown(
        ctx: Ctx,
        now: Annotated[bool, Field(description="also stop running agents (they end `cancelled`)")] = False,
    ) -> QueueState:
        """Freeze the queue: new dispatches are accepted but queue, and nothing starts until agentic_dispatch_start.
        Running agents go on unless `now` is true. The frozen state survives restarts."""
        return _svc(ctx).freeze(now)

    @tool(
        name="agentic_doctor",
        annotations=ToolAnnotations(
            title="Check the agents can run", read_only_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    def agentic_doctor(
        ctx: Ctx,
        agents: Annotated[
            list[str] | None, Field(description="agents to check, e.g. ['codex', 'claude']; default all")
        ] = None,
    ) -> DoctorReport:
        """Check, per agent, that it can run here: container engine reachable, agent image present, the CLI's
        version in the image, and which credentials were found (named, never shown). A problem says what to
        set or build. agentic_dispatch refuses an agent that fails these checks."""
        return _svc(ctx).doctor(agents)

    @tool(
        name="agentic_dispatch_start",
        annotations=ToolAnnotations(
            title="Unfreeze the queue",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    def agentic_dispatch_start(ctx: Ctx) -> QueueState:
        """Unfreeze the queue and start queued work that has a free slot."""
        return _svc(ctx).unfreeze()

    register_watch(server, feed)  # agentic_watch, _logs, _diff, _insights; the agentic:// resources
    for path, methods, endpoint in board.routes() if board is not None else []:
        server.custom_route(path, methods=methods)(endpoint)  # the board checks its own requests (board/auth.py)
    return server
