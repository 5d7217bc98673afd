"""Data shapes shared by the layers: the workspace record (``status.json``) and the
service's results. Plain pydantic; nothing here knows about MCP or Docker."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInputError
from .naming import check_component, check_git_ref, split_workspace_name

__all__ = [
    "ACTIVE_STATUSES",
    "FAILURE_CLASSES",
    "FINAL_STATUSES",
    "MAX_DEPENDENCIES",
    "MAX_KEY_CHARS",
    "MAX_LISTED",
    "MAX_LOCK_CHARS",
    "MAX_RETRIES",
    "MAX_REVIEW_ROUNDS",
    "MAX_SCOPE_CHARS",
    "MAX_SCOPE_GLOBS",
    "MAX_TAIL_LINES",
    "MAX_TASK_CHARS",
    "MAX_WATCH_SECONDS",
    "MAX_WINDOW_DAYS",
    "RESUMABLE_STATUSES",
    "AgeDays",
    "AgentCheck",
    "AskedPerson",
    "BranchName",
    "CancelResult",
    "Change",
    "CheckpointInfo",
    "CleanReport",
    "CleanupReport",
    "Count",
    "Delivery",
    "DependsOn",
    "DiffResult",
    "DispatchRequest",
    "DispatchResult",
    "DoctorReport",
    "Event",
    "EventKind",
    "FailureClass",
    "IdempotencyKey",
    "InsightRow",
    "InsightsReport",
    "LockKey",
    "LogsResult",
    "OutOfScope",
    "OutboxEntryRow",
    "PoolHoldRow",
    "PositiveNumber",
    "Priority",
    "QaResult",
    "QueueState",
    "Registry",
    "RemovedWorkspace",
    "RetryPolicy",
    "RetryState",
    "ReviewInfo",
    "RunSummary",
    "Scope",
    "ScopeGlob",
    "ScopeMode",
    "Status",
    "StatusReport",
    "SyncReport",
    "Tag",
    "Task",
    "Verdict",
    "WatchResult",
    "WorkspaceName",
    "WorkspaceRecord",
    "WorkspaceRow",
    "parse_time",
    "problems",
    "utcnow",
]


def utcnow() -> str:
    """Now, as an ISO-8601 UTC timestamp with second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(ts: str | None) -> float | None:
    """An ISO timestamp from a record as epoch seconds (``None`` stays ``None``)."""
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset({Status.QUEUED, Status.RUNNING})
FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.BLOCKED, Status.CANCELLED})
RESUMABLE_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.BLOCKED})


class Priority(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class RunSummary(BaseModel):
    """What an agent CLI reported about its run, parsed from its event stream."""

    final_message: str | None = None
    turns: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    session_id: str | None = None
    error: str | None = None
    error_status: int | None = Field(
        default=None, description="the HTTP status of the provider's refusal the run ended with, when the CLI said"
    )
    retry_after_seconds: float | None = Field(
        default=None, description="how long the provider asked to wait (Retry-After), when the CLI said"
    )

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens, counting what the CLI reported; ``None`` when it reported neither."""
        said = [t for t in (self.input_tokens, self.output_tokens) if t is not None]
        return sum(said) if said else None


# Why a run failed, for retries: the provider refused or was overloaded (the CLI's own error events), the run
# timed out, the agent crashed (a non-zero exit, out of memory), its container was lost (vanished, or killed from
# outside), or the QA gate failed.
FailureClass = Literal["provider", "timeout", "crash", "lost", "qa"]
FAILURE_CLASSES: tuple[FailureClass, ...] = ("provider", "timeout", "crash", "lost", "qa")
MAX_RETRIES = 10


class RetryPolicy(BaseModel):
    """Retries of one dispatch: up to ``max`` more attempts, for the failure classes in ``on`` only."""

    model_config = ConfigDict(extra="forbid")

    max: int = Field(ge=0, le=MAX_RETRIES, description="attempts after the first (0: none)")
    on: list[FailureClass] | None = Field(
        default=None, description="the failure classes retried (default: [retry] on); any other failure is final"
    )


MAX_REVIEW_ROUNDS = 10
Verdict = Literal["approved", "changes requested"]


class ReviewInfo(BaseModel):
    """A review: the reviewer's verdict on another workspace's branch (its ``REVIEW.md``), and its round."""

    reviewer: str = Field(description="the reviewer's workspace")
    reviewed: str = Field(description="the workspace under review")
    round: int = Field(description="the round, from 1")
    verdict: Verdict | None = Field(default=None, description="approved or changes requested; none while pending")
    comments: str | None = Field(default=None, description="the rest of REVIEW.md")
    next_reviewer: str | None = Field(
        default=None, description="changes requested, rounds left: the workspace that reviews the fixed branch"
    )


class RetryState(BaseModel):
    """A workspace's retries: its policy, the attempt it is at, and what ended the earlier ones."""

    max: int
    on: list[FailureClass]
    backoff_seconds: float = Field(default=30.0, description="the wait before the first retry (doubling after)")
    max_backoff_seconds: float = Field(default=900.0, description="the longest wait between attempts")
    attempt: int = Field(default=1, description="the attempt the current (or last) run is, from 1")
    last_class: FailureClass | None = Field(default=None, description="the class of the last attempt's failure")
    next_at: str | None = Field(default=None, description="queued: when the next attempt may start")
    failed_at: str | None = Field(default=None, description="when the last attempt failed")
    history: list[str] = Field(default_factory=list, description="each failed attempt: its class and reason")


class Delivery(BaseModel):
    """Where a finished run's branch was delivered (sync): which commit, to which repository, when."""

    remote: str = Field(description="the repository it went to: the local path, or the origin URL (no password)")
    branch: str
    commit: str
    at: str = Field(default_factory=utcnow)


class CheckpointInfo(BaseModel):
    """An automatic checkpoint: the uncommitted work a stopped run left, kept as a commit on its branch."""

    commit: str
    why: str = Field(description="how the run ended: timed out, cancelled, stopped, ...")
    at: str = Field(default_factory=utcnow)
    files: int = Field(default=0, description="how many paths it changed")


class OutOfScope(BaseModel):
    """Paths the run's branch changed beyond its base (commits and any checkpoint) that its scope does not cover."""

    paths: list[str] = Field(description="the first of them, sorted (a rename counts both its paths)")
    count: int = Field(description="how many there are in all")


class QaResult(BaseModel):
    """The QA gate of one run: the repository's tests, run after the agent ended ``completed``."""

    state: Literal["running", "passed", "failed", "skipped"]
    command: str | None = None
    source: str | None = Field(default=None, description="why this command: the config, or what the repo holds")
    exit_code: int | None = None
    output_tail: str | None = Field(default=None, description="the end of the gate's output")
    reason: str | None = Field(default=None, description="failed: the test summary; skipped: why")
    started_at: str | None = None
    finished_at: str | None = None
    timeout_seconds: int | None = None


class WorkspaceRecord(BaseModel):
    """The contents of a workspace's ``status.json``. One writer at a time (the service)."""

    model_config = ConfigDict(extra="allow")

    name: str
    status: Status
    agent: str
    repo: str
    org: str
    repo_name: str
    origin_url: str
    task: str
    branch: str
    base_branch: str | None = None
    template: str
    persona: str | None = None
    plan_template: str | None = None
    issue: int | None = None
    pr: int | None = None
    tag: str | None = None
    priority: Priority = Priority.NORMAL
    timeout_seconds: int
    image: str | None = None
    prompt_sha256: str | None = None
    container_id: str | None = None
    pid: int | None = None
    created_at: str = Field(default_factory=utcnow)
    queued_ns: int | None = Field(
        default=None,
        description="when it last entered the queue (ns since the epoch); orders dispatches within a second",
    )
    started_at: str | None = None
    updated_at: str = Field(default_factory=utcnow)
    finished_at: str | None = None
    exit_code: int | None = None
    question: str | None = Field(default=None, description="blocked: the agent's question (BLOCKED.md); else none")
    reason: str | None = Field(
        default=None, description="failed or cancelled: why (the exit code, the timeout, the cancel, the launch error)"
    )
    answer: str | None = None
    runs: int = 0
    pr_url: str | None = None
    summary: RunSummary | None = None
    idempotency_key: str | None = None
    stop_status: Status | None = Field(default=None, description="set just before the server stops a run itself")
    stop_reason: str | None = None
    resume_session: str | None = Field(
        default=None, description="the CLI session the queued run continues (native resume); None: a fresh session"
    )
    qa_enabled: bool = Field(default=False, description="run the QA gate after the agent ends completed")
    phase: Literal["agent", "qa"] = Field(default="agent", description="what the running container does")
    node: str | None = Field(default=None, description="a swarm's node the last run's agent ran on")
    placement: str | None = Field(
        default=None, description="running on a swarm: why no node has taken its job yet (it waits for a node)"
    )
    qa: QaResult | None = None
    stalled_since: str | None = Field(
        default=None, description="running: the agent's last activity seen, when none since for limits.stall_seconds"
    )
    checkpoint: CheckpointInfo | None = Field(
        default=None, description="the last automatic checkpoint of a stopped run's uncommitted work"
    )
    lock_key: str | None = Field(
        default=None, description="runs with the same lock key never overlap (every run of this workspace)"
    )
    base_commit: str | None = Field(default=None, description="the commit the branch started from, read at dispatch")
    scope: list[str] | None = Field(default=None, description="globs of the paths the run may change")
    scope_mode: Literal["warn", "fail"] = "warn"
    out_of_scope: OutOfScope | None = Field(
        default=None, description="the last run's changes outside its scope (when it has one)"
    )
    depends_on: list[str] = Field(
        default_factory=list, description="workspaces that must end completed before a run of this one starts"
    )
    base_workspace: str | None = Field(
        default=None,
        description="the workspace whose branch, as it ended, this one's branch starts from (at its first start)",
    )
    stop_cause: Literal["timeout"] | None = Field(default=None, description="why the server stops it, for retries")
    retry: RetryState | None = None
    review_of: str | None = Field(default=None, description="the workspace this one reviews")
    review_rounds: int = Field(default=0, description="review rounds after the first: fix, then review again")
    review_round: int = Field(default=1, description="a reviewer's round, from 1")
    review: ReviewInfo | None = Field(default=None, description="a reviewer's verdict, once it ended")

    @model_validator(mode="after")
    def _question_is_only_a_question(self) -> WorkspaceRecord:
        """Records written before ``reason`` existed kept a failure's or a cancel's reason in
        ``question``: read them as they are meant (the file itself is left as it is)."""
        if self.status != Status.BLOCKED and self.question and self.reason is None:
            self.reason, self.question = self.question, None
        return self


MAX_TASK_CHARS = 100_000
MAX_KEY_CHARS = 200

# The bounds of the reading tools, declared once: the tools' schemas, the CLI's argument types and
# the service's checks all use these (listing the tools must not import the service).
MAX_WATCH_SECONDS = 50  # a watch's longest wait: hosts cut tool calls off at about 60 s
MAX_TAIL_LINES = 5000  # lines of a log in one look
MAX_WINDOW_DAYS = 366  # the insights window
MAX_LISTED = 200  # workspaces in one listing, newest first
MAX_LOCK_CHARS = 100
MAX_SCOPE_GLOBS = 50
MAX_SCOPE_CHARS = 200
MAX_DEPENDENCIES = 20


def _task(text: str) -> str:
    text = text.strip()
    if not text:
        raise InvalidInputError("task", "is empty. Say what the agent should do.")
    if len(text) > MAX_TASK_CHARS:
        raise InvalidInputError("task", f"is {len(text)} characters; the limit is {MAX_TASK_CHARS}.")
    return text


def _key(key: str) -> str:
    if not key.strip() or len(key) > MAX_KEY_CHARS:
        raise InvalidInputError("idempotency_key", f"must be 1 to {MAX_KEY_CHARS} characters.")
    return key


def _lock_key(key: str) -> str:
    key = key.strip()  # "db " and "db" are one lock
    if not key or len(key) > MAX_LOCK_CHARS or not key.isprintable():
        raise InvalidInputError(
            "lock",
            f"must be 1 to {MAX_LOCK_CHARS} printable characters (letters, digits, punctuation, spaces); "
            "no control characters such as newlines or tabs.",
        )
    return key


def _workspace_name(name: str) -> str:
    """A workspace another argument names (``org/repo/slug``); whether it exists is the service's to say."""
    try:
        return "/".join(split_workspace_name(name))
    except InvalidInputError:
        raise InvalidInputError(
            "workspace", f"{name!r} is not a workspace name; names look like 'org/repo/task-12' (see agentic_status)."
        ) from None


def _scope_glob(glob: str) -> str:
    glob = glob.strip()  # git's matcher ignores trailing spaces anyway
    if not glob or len(glob) > MAX_SCOPE_CHARS or not glob.isprintable():
        raise InvalidInputError("scope", f"each glob must be 1 to {MAX_SCOPE_CHARS} printable characters.")
    if glob.removeprefix("!").startswith("/") or ".." in glob.removeprefix("!").split("/"):
        raise InvalidInputError(
            "scope", f"{glob!r}: globs are relative to the repository's root: no leading '/', no '..'."
        )
    import pathspec  # the matcher of scope.py; imported here only when a scope is given

    try:
        pathspec.PathSpec.from_lines("gitignore", ["/" + glob.removeprefix("!")])
    except ValueError as e:
        raise InvalidInputError("scope", f"{glob!r} is not a glob git's wildmatch reads ({e}).") from None
    if glob == "!":
        raise InvalidInputError("scope", "'!' alone names no path; '!src/gen/**' takes paths back out.")
    return glob


# The constraints of a dispatch, declared once: the request model, the MCP tool's parameters and the
# command line's argument types are all made from these.
Task = Annotated[str, AfterValidator(_task)]
PositiveNumber = Annotated[int, Field(gt=0)]
BranchName = Annotated[str, AfterValidator(lambda v: check_git_ref("branch", v))]
Tag = Annotated[str, AfterValidator(lambda v: check_component("tag", v))]
IdempotencyKey = Annotated[str, AfterValidator(_key)]
LockKey = Annotated[str, AfterValidator(_lock_key)]
ScopeGlob = Annotated[str, AfterValidator(_scope_glob)]
Scope = Annotated[list[ScopeGlob], Field(min_length=1, max_length=MAX_SCOPE_GLOBS)]
ScopeMode = Literal["warn", "fail"]
# What `clean` keeps: finished longer ago than an age (in days), beyond a count of the newest.
AgeDays = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
WorkspaceName = Annotated[str, AfterValidator(_workspace_name)]
# Where `image push` puts the agent image: a registry's host[:port], optionally with a path (registry.lan:5000/team).
Registry = Annotated[
    str,
    Field(
        max_length=255,
        pattern=r"^(localhost(:[0-9]{1,5})?|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?"
        r"|[A-Za-z0-9-]+:[0-9]{1,5})(/[a-z0-9]+([._-][a-z0-9]+)*)*$",
    ),
]
DependsOn = Annotated[list[WorkspaceName], Field(min_length=1, max_length=MAX_DEPENDENCIES)]


class DispatchRequest(BaseModel):
    """Everything a caller may say about a dispatch, each value checked as the model is built
    (a malformed one raises ``ValidationError``). What needs the server's knowledge (the agent, the
    templates, the repository) is checked by the service. A field it does not have is refused, not
    ignored: a misspelt ``timout_seconds`` would otherwise run without the limit the caller meant."""

    model_config = ConfigDict(extra="forbid")

    repo: str
    task: Task
    agent: str | None = None
    org: str | None = None
    template: str | None = None
    plan_template: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    persona: str | None = None
    issue: PositiveNumber | None = None
    pr: PositiveNumber | None = None
    branch: BranchName | None = None
    tag: Tag | None = None
    priority: Priority = Priority.NORMAL
    timeout_seconds: PositiveNumber | None = None
    idempotency_key: IdempotencyKey | None = None
    lock: LockKey | None = None
    scope: Scope | None = None
    scope_mode: ScopeMode | None = None  # None: [defaults] scope_mode
    depends_on: DependsOn | None = None
    base_workspace: WorkspaceName | None = None
    retry: RetryPolicy | None = None
    review_of: WorkspaceName | None = None
    review_rounds: Annotated[int, Field(ge=0, le=MAX_REVIEW_ROUNDS)] = 0
    dry_run: bool = False
    qa: bool | None = None


def problems(e: ValidationError) -> str:
    """A validation error of a request, one line per problem, each naming its field."""
    lines = []
    for err in e.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidInputError):
            lines.append(str(cause))  # names its field already
        else:
            where = ".".join(str(p) for p in err["loc"]) or "request"
            lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


class DispatchResult(BaseModel):
    """What a dispatch returns at once."""

    workspace: str = Field(description="workspace name: pass it to agentic_status / agentic_resume")
    status: str = Field(description="running, queued, or dry_run (prepared, nothing launched, nothing kept)")
    agent: str
    branch: str
    path: str = Field(description="the workspace folder on the server's machine")
    repo_path: str = Field(description="the git clone the agent works in")
    log_path: str
    commands: list[str] = Field(description="commands a person can run to look at the work")
    prompt: str | None = Field(default=None, description="the assembled prompt (dry runs only)")
    dry_run: bool = False
    held: str | None = Field(
        default=None,
        description="queued: what holds its pool or model now and until when (a daily budget or start limit, a "
        "pause); it starts when that ends",
    )


class WorkspaceRow(BaseModel):
    """One workspace, as agentic_status shows it."""

    name: str
    repo: str
    agent: str
    status: Status | str
    runs: int
    branch: str
    question: str | None = Field(default=None, description="blocked: the agent's question")
    reason: str | None = Field(default=None, description="failed or cancelled: why")
    started_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    summary: RunSummary | None = None
    log_tail: str | None = None
    stalled_since: str | None = Field(
        default=None,
        description="running: no output in its log and no change in its work tree since then (limits.stall_seconds)",
    )
    node: str | None = Field(default=None, description="a swarm: the node its last run's agent ran (or runs) on")
    placement: str | None = Field(
        default=None, description="running on a swarm: it waits for a node, and why no node has taken it yet"
    )
    qa: QaResult | None = Field(default=None, description="the QA gate of the last run, when it is on")
    delivery: Delivery | None = Field(default=None, description="where sync delivered the branch")
    checkpoint: CheckpointInfo | None = Field(
        default=None, description="uncommitted work a stopped run left, kept as a commit on its branch"
    )
    out_of_scope: OutOfScope | None = Field(
        default=None, description="paths the branch changed outside the dispatch's scope (the first ones, and a count)"
    )
    sync: str | None = Field(default=None, description="deliveries still to make, and where they stand")
    delivery_commands: list[str] = Field(default_factory=list, description="commands to look at the delivered branch")
    error: str | None = Field(default=None, description="set when the record itself could not be read")
    waiting_for: str | None = Field(
        default=None,
        description="queued: what it waits for besides a slot: 'lock <key> held by <workspace>', or the "
        "workspaces it depends on that have not completed (and what to do when one of them ended otherwise)",
    )
    depends_on: list[str] = Field(default_factory=list, description="workspaces that must complete before it runs")
    base_workspace: str | None = Field(
        default=None, description="the workspace whose branch, as it ended, this one's branch started from"
    )
    base_commit: str | None = Field(default=None, description="the commit its branch started from")
    retry: RetryState | None = Field(
        default=None, description="retries: the attempt, the last failure's class, the next try, each attempt's reason"
    )
    review: ReviewInfo | None = Field(
        default=None,
        description="a reviewer's verdict, or on a reviewed workspace its latest review: verdict, round, reviewer",
    )
    dependents: list[str] = Field(default_factory=list, description="workspaces that wait for this one to complete")


class StatusReport(BaseModel):
    """Counts per status and one row per workspace, newest first."""

    counts: dict[str, int]
    workspaces: list[WorkspaceRow]
    frozen: bool = False
    holds: list[PoolHoldRow] = Field(default_factory=list, description="pools that start nothing now, and until when")
    orphans: list[str] = Field(
        default_factory=list, description="labelled containers no record knows; remove with `agentic-dispatch cleanup`"
    )
    notes: list[str] = Field(default_factory=list)


class PoolHoldRow(BaseModel):
    pool: str
    reason: str
    until: str | None = None


class CancelResult(BaseModel):
    """What agentic_cancel did."""

    workspace: str
    status: str
    changed: bool
    message: str
    also_cancelled: list[str] = Field(
        default_factory=list, description="queued workspaces that waited for this one, cancelled with it"
    )


class QueueState(BaseModel):
    """What agentic_dispatch_shutdown / agentic_dispatch_start did."""

    frozen: bool
    stopped: list[str] = Field(default_factory=list)
    message: str


class CleanupReport(BaseModel):
    removed: list[str] = Field(default_factory=list)
    message: str


class RemovedWorkspace(BaseModel):
    """A finished workspace that ``clean`` removed (or, in a dry run, would remove)."""

    workspace: str
    status: str
    finished_at: str | None = None
    bytes: int = Field(description="what its folder took on disk")
    why: str = Field(description="why it could go: delivered, nothing to deliver, or forced")


class CleanReport(BaseModel):
    """What ``clean`` removed (or would), what it kept and why, and the bytes freed."""

    dry_run: bool = False
    removed: list[RemovedWorkspace] = Field(default_factory=list)
    kept: dict[str, str] = Field(default_factory=dict, description="workspace -> why it stays")
    bytes_freed: int = 0
    message: str


class OutboxEntryRow(BaseModel):
    """One delivery of one run (its branch, or its record), as the sync report shows it."""

    id: str
    workspace: str
    run: int
    kind: str = Field(description="git (the branch) or record (the dispatch record posted to the endpoint)")
    state: str = Field(description="delivered, pending, attention (a person must act) or dead-lettered")
    attempts: int = 0
    next_attempt_at: str | None = Field(default=None, description="pending: when it is tried next")
    last_error: str | None = None
    what_to_do: str | None = Field(default=None, description="attention: what a person should do")
    delivered_at: str | None = None
    detail: str | None = Field(default=None, description="delivered: what went where")
    delivery: Delivery | None = None


class SyncReport(BaseModel):
    """What agentic_sync did."""

    delivered: list[str] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list)
    next_retry_at: str | None = None
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
    attention: list[str] = Field(default_factory=list, description="workspaces with a delivery a person must fix")
    dead_lettered: list[str] = Field(
        default_factory=list, description="workspaces with a delivery given up after its attempts ran out"
    )
    entries: list[OutboxEntryRow] = Field(default_factory=list, description="one row per run and kind")


class AgentCheck(BaseModel):
    """Doctor's findings for one agent. Never holds a secret: credentials are named, not shown."""

    agent: str
    ok: bool
    cli_version: str | None = None
    credentials: list[str] = Field(
        default_factory=list, description="what was found, e.g. 'OPENAI_API_KEY (environment)'"
    )
    problems: list[str] = Field(default_factory=list, description="what is wrong and what to do about it")


class DoctorReport(BaseModel):
    """Whether each agent can run here: engine, image, CLI in the image, credentials."""

    ok: bool
    engine: str
    image: str
    agents: list[AgentCheck]


class EventKind(StrEnum):
    """Every kind of line in the events log (a closed set: readers skip what they do not know)."""

    DISPATCHED = "dispatched"
    QUEUED = "queued"  # dispatched or resumed, and no slot yet
    STARTED = "started"
    RESUMED = "resumed"
    RETRYING = "retrying"  # a failed attempt is tried again (the line carries the class and the reason)
    STALLED = "stalled"  # a running agent showed no activity for ``limits.stall_seconds`` (once per stall)
    # a run's status changed to one of these (the line carries ``previous``)
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"
    # deliveries (sync)
    DELIVERED = "delivered"
    NEEDS_ATTENTION = "needs-attention"
    DEAD_LETTERED = "dead-lettered"


class Event(BaseModel):
    """One line of ``events/events.jsonl``: written and read through this model only."""

    model_config = ConfigDict(extra="ignore")

    at: str = Field(default_factory=utcnow)
    kind: EventKind
    workspace: str
    agent: str = ""
    status: str = Field(description="the workspace's status right after it")
    runs: int = 0
    previous: str | None = None
    container_id: str | None = None
    reason: str | None = None
    delivery: str | None = Field(default=None, description="deliveries: git or record")
    run: int | None = Field(default=None, description="deliveries: the run delivered")
    entry: str | None = Field(default=None, description="deliveries: the outbox entry")
    tokens: int | None = Field(default=None, description="a run's end: the tokens (in + out) its agent reported")
    cost_usd: float | None = Field(default=None, description="a run's end: the cost its agent reported")


class Change(BaseModel):
    """One transition from the events log: a workspace moved (or its delivery did)."""

    at: str
    workspace: str
    kind: str = Field(description="dispatched, queued, started, blocked, completed, failed, cancelled, resumed, ...")
    status: str = Field(description="the workspace's status right after it")
    runs: int = 0
    question: str | None = Field(default=None, description="blocked: the question (while that run is the last)")
    reason: str | None = Field(default=None, description="failed or cancelled: why (while that run is the last)")


class AskedPerson(BaseModel):
    """agentic_watch(ask=true): a blocked run's question put to the person through the host (MCP elicitation)."""

    workspace: str
    question: str
    outcome: Literal["answered", "declined", "cancelled", "not resumed"] = Field(
        description="answered: the run was resumed with the person's answer; declined or cancelled: it is still "
        "blocked, for you to answer with agentic_resume; not resumed: the answer came but the resume failed (note)"
    )
    answer: str | None = None
    resumed: str | None = Field(default=None, description="answered: the run's status right after the resume")
    note: str | None = None


class WatchResult(BaseModel):
    """What agentic_watch saw: the changes since the cursor, and where each watched workspace stands."""

    changes: list[Change]
    cursor: str = Field(description="pass it to the next agentic_watch: no change in between is missed")
    workspaces: list[WorkspaceRow] = Field(description="the watched workspaces as they are now")
    timed_out: bool
    message: str
    asked: list[AskedPerson] = Field(
        default_factory=list,
        description="ask=true: the blocked runs whose question the person was asked, and what came of it",
    )


class LogsResult(BaseModel):
    """A bounded piece of an agent's log (key values masked)."""

    workspace: str
    text: str
    start: int = Field(description="byte offset of the text in the log")
    end: int = Field(description="byte offset after it: pass it as since_bytes to read on")
    size: int = Field(description="the log's size now")
    truncated: bool
    note: str | None = None


class DiffResult(BaseModel):
    """The agent's branch against its base: the stat, then the patch (bounded)."""

    workspace: str
    base: str
    branch: str
    stat: str
    patch: str | None = None
    truncated: bool = False
    note: str | None = None
    checkpoint: CheckpointInfo | None = Field(
        default=None, description="the automatic checkpoint of a stopped run's uncommitted work the branch holds"
    )


class InsightRow(BaseModel):
    """Finished runs of one agent spec (``base:model``) over the window."""

    agent: str
    runs: int
    completed: int
    failed: int
    blocked: int
    cancelled: int
    success_rate: float = Field(description="completed / runs")
    p50_seconds: float | None = None
    p90_seconds: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    top_failures: list[str] = Field(default_factory=list, description="the most common failure reasons, counted")


class InsightsReport(BaseModel):
    window_days: float
    since: str
    agents: list[InsightRow]
