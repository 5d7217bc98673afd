"""The facade: one :class:`Dispatcher` that both front ends (MCP, CLI) call.

It checks the configuration against what exists, builds the parts (each a one-job module
of this package that receives what it uses), and runs the background lifecycle. Every
method blocks; async callers run them on a worker thread.

Background work (only when :meth:`Dispatcher.start` is called, i.e. in a server): one thread
follows the runtime's exit events (→ ``finalise``, then ``drain``); one timer thread runs
``reconcile`` (timeouts, missed exits, adoption, drain) and wakes early for the nearest
deadline; one sync thread flushes the delivery outbox. A one-shot CLI call reconciles once
instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..agents import AGENTS, Agent, agent_base
from ..config import Paths, Settings, config_file_path
from ..errors import ConfigError, DispatchError
from ..mirrors import MirrorCache
from ..models import (
    CancelResult,
    Change,
    CleanReport,
    CleanupReport,
    DiffResult,
    DispatchRequest,
    DispatchResult,
    DoctorReport,
    InsightsReport,
    LogsResult,
    QueueState,
    Status,
    StatusReport,
    SyncReport,
    WatchResult,
    WorkspaceRecord,
    WorkspaceRow,
)
from ..prompts import PromptLibrary
from ..runtime.base import LABEL_WORKSPACE, ExitEvent, Runtime
from ..scheduler import Scheduler, UsageMeter, dependency_wait
from ..store import StatusStore
from .catalog import AgentCatalog
from .delivery import ResultDelivery
from .intake.dispatch import Intake
from .intake.preflight import Preflight
from .intake.reviews import ReviewLoop
from .run_files import RunFiles
from .runs.control import Control
from .runs.executor import RunLifecycle
from .runs.launch import QueueDrainer
from .runs.lifecycle import Waiting
from .runs.network import NetworkJobs
from .runs.qa_gate import QaGate
from .runs.recovery import Recovery
from .runs.retention import Retention
from .views.insights import Insights
from .views.inspection import Inspector
from .views.status import Reports
from .views.watching import Watching, WorkspaceList

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


def _network_jobs(settings: Settings, paths: Paths, runtime: Runtime, store: StatusStore) -> NetworkJobs | None:
    """How runs get their workspace: mounted from this disk (``None``), or through the run gateway
    (``[runtime] transfer``; by default the gateway for an engine on another machine)."""
    transfer = settings.runtime.transfer or ("mount" if runtime.local else "network")
    if transfer == "mount":
        return None
    from ..gateway.server import RunGateway  # its HTTP and git machinery: only for network transfer

    rt = settings.runtime
    return NetworkJobs(RunGateway(settings, store, paths.state), rt.stop_grace_seconds, rt.gateway_patience_seconds)


class Dispatcher:
    """The one service object: dispatch, status, resume, cancel, sync, and the background loops."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        runtime: Runtime,
        agents: dict[str, Agent] | None = None,
    ) -> None:
        """Raises:
        ConfigError: the settings name an agent or template that does not exist (one line each).
        """
        self.settings = settings
        self.paths = paths
        self.runtime = runtime
        self.agents = agents if agents is not None else AGENTS
        self.prompts = PromptLibrary(paths.user_prompts, paths.user_workspace_templates)
        self._check_config()
        paths.ensure()
        self.catalog = AgentCatalog(settings, self.agents)
        self.store = StatusStore.of(paths)
        self.mirrors = MirrorCache(paths.mirrors, settings.mirror_max_age_seconds)
        self.scheduler = Scheduler(
            self.catalog.effective_limits(), paths.state, self.store.events_file, UsageMeter(self.store.events)
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        finished = threading.Condition()

        self.preflight = Preflight(runtime, self.catalog, paths.cli_versions)
        self.delivery = ResultDelivery(settings.sync, paths, self.store)
        self.network = network = _network_jobs(settings, paths, runtime, self.store)
        qa = QaGate(settings, runtime, self.catalog, paths.root_id, network)
        run_files = RunFiles(self.prompts)
        store, scheduler, catalog, scratch = self.store, self.scheduler, self.catalog, paths.checkpoints
        self.runs = RunLifecycle(
            store, runtime, scheduler, catalog, qa, self.delivery, finished, scratch, run_files, network
        )
        self.drainer = QueueDrainer(
            settings, store, scheduler, runtime, catalog, self.runs, paths.root_id, self._wake, scratch, network
        )
        self.retention = Retention(settings.retention, paths, self.store, self.delivery)
        self.recovery = Recovery(self.store, runtime, self.scheduler, self.drainer, self.runs, self.retention)
        self.reports = Reports(
            self.store, self.scheduler, self.catalog, self.drainer, self.recovery, self.delivery, finished
        )
        self.intake = Intake(settings, paths, store, catalog, self.mirrors, self.preflight, run_files, self.runs)
        self.reviews = ReviewLoop(store, self.intake, self.runs)
        self.control = Control(self.store, self.scheduler, self.drainer, self.runs)
        self.watching = Watching(self.store, finished, self.reports)
        self.inspector = Inspector(self.store, self.catalog)
        self.stats = Insights(self.store, paths.retired)
        self.recovery.remove_stale_staging(paths.staging)

    def _check_config(self) -> None:
        known = ", ".join(sorted(self.agents))
        problems = [
            f"agents.{n}: unknown agent; the known ones are {known}"
            for n in sorted(set(self.settings.agents) - set(self.agents))
        ]
        if agent_base(self.settings.default_agent) not in self.agents:
            problems.append(f"default_agent: unknown agent {self.settings.default_agent!r}; the known ones are {known}")
        templates = self.prompts.names("task")
        if self.settings.default_template not in templates:
            problems.append(
                f"default_template: no template {self.settings.default_template!r}; there are {', '.join(templates)}"
            )
        if problems:
            raise ConfigError(self.paths.config_file or config_file_path(), problems)

    # -- background lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the background threads (exit watcher, timer) and, with network transfer, the run
        gateway; the timer reconciles at once.

        Raises:
            OSError, ssl.SSLError: the run gateway cannot listen (its address, its certificate).
        """
        if self._threads:
            return
        if self.network is not None:
            if self.settings.runtime.gateway_listen is None and not self.runtime.local:
                log.warning(
                    "runs on %s use network transfer and [runtime] gateway_listen is not set: the run gateway "
                    "listens on 127.0.0.1, which that engine's containers cannot reach. Set gateway_listen (and "
                    "gateway_url) to an address they reach (README: Running agents on another machine)",
                    self.runtime.describe(),
                )
            self.network.start()
        watcher = threading.Thread(
            target=self.runtime.watch_exits,
            args=(self.drainer.root_labels, self._on_exit, self._stop),
            name="agentic-exit-watcher",
            daemon=True,
        )
        timer = threading.Thread(target=self._timer_loop, name="agentic-timer", daemon=True)
        sync = threading.Thread(target=self.delivery.run, args=(self._stop,), name="agentic-sync", daemon=True)
        self._threads = [watcher, timer, sync]
        for t in self._threads:
            t.start()

    def close(self, timeout: float = 5) -> None:
        """Stop background threads. Running containers keep running; the next start reconciles them."""
        self._stop.set()
        self._wake.set()
        self.delivery.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        if self.network is not None:
            self.network.close()

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.recovery.reconcile()
            except Exception:  # the one top-level boundary of this background task
                log.exception("reconcile failed; retrying on the next tick")
            self._follow_reviews()
            self._wake.wait(self.recovery.next_wakeup(self.settings.drain_interval_seconds))
            self._wake.clear()

    def _on_exit(self, event: ExitEvent) -> None:
        name = event.labels.get(LABEL_WORKSPACE)
        if not name:
            return
        if event.lost is not None:  # the timer's reconcile settles a lost run (Vanished): now, not at its tick
            self._wake.set()
            return
        try:
            self.runs.finish(name, event.container_id, event.exit_code, node=event.node)
        except Exception:  # the background boundary: never let one bad record stop the watcher
            log.exception("cannot settle %s", name)
        try:
            self.drainer.drain()
        except Exception:
            log.exception("cannot drain the queue after %s exited", name)
        self._follow_reviews()

    def _follow_reviews(self) -> None:
        """The next round of each review loop whose reviewer asked for changes, then a drain."""
        try:
            if self.reviews.follow_up():
                self.drainer.drain()
        except Exception:  # a background boundary: the next tick looks again
            log.exception("cannot follow up the review loops; the timer tries again")

    def _start_queued(self, result: DispatchResult) -> DispatchResult:
        """After a dispatch or resume: start what may start. The run is queued already, so a drain
        that fails here is not the caller's error: the timer drains again."""
        try:
            self.drainer.drain()
        except Exception:
            log.exception("cannot drain the queue after %s; the timer tries again", result.workspace)
        try:
            # still queued: say so in the events log, with what it waits for when that is a dependency
            rec = self.runs.apply(result.workspace, lambda r: Waiting(dependency_wait(r, self.store.find)))
        except (DispatchError, OSError) as e:  # the run is recorded; a missing "queued" line is not an error
            log.warning("cannot note that %s waits for a slot: %s", result.workspace, e)
            rec = None
        queued = self.intake.result(rec if rec is not None else self.store.read(result.workspace))
        hold = self.scheduler.hold_on(queued.agent) if queued.status == Status.QUEUED.value else None
        if hold is not None:  # say at once why it waits (a budget, a daily limit, a pause), not only in status
            queued = queued.model_copy(update={"held": hold.describe()})
        return queued

    # -- what the front ends call: the only way in ---------------------------------------------
    def dispatch(self, req: DispatchRequest) -> DispatchResult:
        """Prepare a workspace for ``req`` and queue its run; start it if a slot is free. Returns at
        once (``running`` or ``queued``; ``dry_run``: the prompt, nothing kept).

        Raises:
            InvalidInputError: a bad argument: an unknown agent or template, a key reused for other work.
            RepoError: the repository cannot be found or fetched.
            RuntimeUnavailableError: no container engine or no agent image.
            AgentNotReadyError: the agent cannot run here (its CLI or credentials).
            StateError: the workspace could not be recorded, or the disk has less free space than
                ``[retention] min_free_gib`` (nothing is kept).
        """
        result = self.intake.dispatch(req)
        return result if result.dry_run else self._start_queued(result)

    def resume(
        self, workspace: str, answer: str | None = None, agent: str | None = None, blocked_run: int | None = None
    ) -> DispatchResult:
        """Queue the next run of a blocked, failed or completed workspace (same branch, same CLI
        session when it still exists), with ``answer`` written to ``ANSWER.md``. With ``blocked_run``,
        only while it is still blocked on that run (an answer to the question that run asked).

        Raises:
            WorkspaceNotFoundError: no such workspace.
            CorruptRecordError: its status.json cannot be read.
            StateError: it is queued, running or cancelled; or not blocked on ``blocked_run`` any more.
            InvalidInputError: a bad agent or an over-long answer.
            UnsafePathError: the agent left a link or a folder where ANSWER.md goes.
            RuntimeUnavailableError, AgentNotReadyError: as :meth:`dispatch`.
        """
        return self._start_queued(self.intake.resume(workspace, answer, agent, blocked_run))

    def status(
        self,
        workspace: str | None = None,
        status: str | None = None,
        limit: int = 50,
        log_lines: int = 0,
        offset: int = 0,
        chain: bool = False,
    ) -> StatusReport:
        """Counts per status and a row per workspace, newest first (``offset`` skips that many: the
        board's pages), with what holds the queue and what the timer last saw of the engine. Never
        calls the engine. With ``chain``: the rows of ``workspace``'s chain (what it depends on, it,
        what depends on it), in that order.

        Raises:
            InvalidInputError: a bad workspace name, status, limit or offset; ``chain`` without a workspace.
            WorkspaceNotFoundError: ``workspace`` does not exist.
        """
        return self.reports.status(workspace, status, limit, log_lines, offset, chain)

    def wait(self, workspace: str, timeout: float) -> WorkspaceRecord:
        """Block until ``workspace`` leaves queued/running or ``timeout`` passes; its record then.

        Raises:
            WorkspaceNotFoundError: no such workspace.
        """
        # Without an exit watcher in this process (a CLI call), look at the container ourselves.
        return self.reports.wait(workspace, timeout, poll=None if self._threads else self.recovery.reconcile)

    def watch(
        self,
        workspaces: list[str] | None,
        timeout: float,
        cursor: str | None = None,
        on_change: Callable[[Change], None] = lambda _: None,
    ) -> WatchResult:
        """Wait (at most ``timeout``) until a watched workspace changes; the changes since ``cursor``,
        each also handed to ``on_change``.

        Raises:
            InvalidInputError: a bad timeout or cursor, or a malformed name.
            WorkspaceNotFoundError: a named workspace does not exist.
        """
        return self.watching.watch(
            workspaces, timeout, cursor, on_change, poll=None if self._threads else self.recovery.reconcile
        )

    def watch_cursor(self, cursor: str | None) -> int:
        """The byte offset a watch cursor names (``None``: the events log's end, i.e. from now on).

        Raises:
            InvalidInputError: not a cursor agentic_watch returned.
        """
        return self.watching.parse_cursor(cursor)

    def watch_one_result(self, workspace: str, since: int, row: WorkspaceRow) -> WatchResult:
        """What a wait for one workspace saw: its changes since byte ``since``, with its ``row`` now."""
        return self.watching.single(workspace, since, row)

    def changes(self, since: int, workspaces: set[str] | None = None) -> tuple[list[Change], int]:
        """The transitions after byte ``since`` of the events log (of ``workspaces``, when given), each
        with its question or reason, and the offset to read on from.

        Raises:
            InvalidInputError: a malformed workspace name.
            WorkspaceNotFoundError: a named workspace does not exist.
        """
        for name in sorted(workspaces or ()):
            self.store.read(name)
        found, end = self.watching.changes(since, workspaces)
        return [self.watching.explain(c) for c in found], end

    def follow(self, since: int | None) -> tuple[list[Change], int]:
        """The changes after byte ``since`` (``None``: from now on) and the offset to pass next time."""
        return self.watching.follow(since)

    def workspace_list(self, limit: int) -> WorkspaceList:
        """Name, status, agent and last update of the ``limit`` most recently updated workspaces."""
        return self.watching.listing(limit)

    def row(self, workspace: str) -> WorkspaceRow:
        """One workspace's status row.

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: no such workspace.
        """
        return self.watching.row(workspace)

    def prompt(self, workspace: str) -> str:
        """The exact prompt of the workspace's last run (bounded).

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: no such workspace.
            UnsafePathError: the prompt file is a link or not a regular file.
        """
        return self.watching.prompt(workspace)

    def record(self, workspace: str) -> WorkspaceRecord:
        """The workspace's record as it is now.

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: no such workspace.
            CorruptRecordError: its status.json cannot be read.
        """
        return self.store.read(workspace)

    def logs(self, workspace: str, tail: int = 200, since_bytes: int | None = None) -> LogsResult:
        """A bounded piece of the agent's log, key values masked: the last ``tail`` lines, or what
        follows ``since_bytes``.

        Raises:
            InvalidInputError: a bad name, tail or offset.
            WorkspaceNotFoundError: no such workspace.
        """
        return self.inspector.logs(workspace, tail, since_bytes)

    def diff(self, workspace: str, stat_only: bool = False, path: str | None = None) -> DiffResult:
        """The branch against the commit it started from: the stat, then the patch, cut to fit.

        Raises:
            InvalidInputError: a bad name or path.
            WorkspaceNotFoundError: no such workspace.
        """
        return self.inspector.diff(workspace, stat_only, path)

    def insights(self, window_days: float = 7.0) -> InsightsReport:
        """Per agent spec, the runs that finished in the window: outcomes, durations, tokens, cost.

        Raises:
            InvalidInputError: a window outside what is allowed.
        """
        return self.stats.report(window_days)

    def doctor(self, agents: list[str] | None = None) -> DoctorReport:
        """Whether each agent can run here (engine, image, CLI, credentials) and what to do if not.

        Raises:
            InvalidInputError: an unknown agent.
        """
        return self.preflight.doctor(agents)

    def cancel(self, workspace: str) -> CancelResult:
        """A queued workspace never starts; a running one is stopped (or, while the engine does not
        answer, marked and stopped by the timer once it does); a finished one is left alone.

        Raises:
            WorkspaceNotFoundError: no such workspace.
            CorruptRecordError: its status.json cannot be read.
        """
        return self.control.cancel(workspace)

    def freeze(self, now: bool = False) -> QueueState:
        """Stop starting work (persisted); with ``now``, also stop the running agents."""
        return self.control.freeze(now)

    def unfreeze(self) -> QueueState:
        """Start work again: clear the frozen flag, lift the pools' pauses, start what has a slot."""
        return self.control.unfreeze()

    def reconcile(self) -> None:
        """What the timer does, once: settle exited and vanished runs, timeouts, adoption, the engine
        sweep, the drain, the next round of review loops. While the engine cannot be reached it decides
        nothing and says so in status."""
        self.recovery.reconcile()
        self._follow_reviews()

    def drain(self) -> list[str]:
        """Start every queued workspace that has a free slot now; the names started."""
        return self.drainer.drain()

    def orphans(self) -> list[str]:
        """Containers labelled with this root that no record knows, from one look at the engine.

        Raises:
            RuntimeUnavailableError: the engine cannot be reached.
        """
        return self.recovery.orphans()

    def cleanup(self) -> CleanupReport:
        """Remove the orphaned containers :meth:`orphans` reports.

        Raises:
            RuntimeUnavailableError: the engine cannot be reached.
        """
        return self.recovery.cleanup()

    def sync(
        self, workspace: str | None = None, force: bool = False, wait: float = 0.0, include_checkpoints: bool = False
    ) -> SyncReport:
        """Bring finished runs home (of ``workspace``, when given) and report every delivery. A branch
        that ends in an automatic checkpoint goes only with ``include_checkpoints``.

        Raises:
            WorkspaceNotFoundError: ``workspace`` does not exist.
            InvalidInputError: ``force`` without a workspace, or a negative ``wait``.
            StateError: ``force`` where the branch holds another workspace's delivery.
        """
        return self.delivery.sync(workspace, force, wait, include_checkpoints)

    def clean(
        self, older_than_days: float | None = None, keep: int | None = None, dry_run: bool = False, force: bool = False
    ) -> CleanReport:
        """Remove, oldest first, finished workspaces (older than ``older_than_days``, beyond the ``keep``
        newest; neither given: ``[retention]``'s values, else 7 days) whose work went home: their branch
        delivered, or nothing to deliver. Never a queued, running or blocked one; with ``force`` also
        undelivered ones. Each removal and the bytes freed are reported; ``dry_run`` removes nothing.
        The events log, the mirrors and the ledger stay; insights still count removed runs.

        Raises:
            InvalidInputError: a negative age or count.
        """
        return self.retention.clean(older_than_days, keep, dry_run, force)
