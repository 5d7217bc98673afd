"""Reports: the status table (counts, one row per workspace, queue notes, holds, orphans)
and waiting for a workspace to leave ``queued``/``running``."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from ...agents import agent_base
from ...credentials import redact
from ...errors import CorruptRecordError, InvalidInputError, WorkspaceNotFoundError
from ...models import (
    ACTIVE_STATUSES,
    PoolHoldRow,
    ReviewInfo,
    Status,
    StatusReport,
    WorkspaceRecord,
    WorkspaceRow,
)
from ...scheduler import Scheduler, retry_wait
from ...store import Listed, StatusStore, log_tail
from ..catalog import AgentCatalog
from ..delivery import ResultDelivery
from ..runs.launch import QueueDrainer
from ..runs.recovery import Recovery
from ..runs.retention import disk_note

__all__ = ["Reports"]


class Reports:
    """What a person or a model reads about the runs."""

    def __init__(
        self,
        store: StatusStore,
        scheduler: Scheduler,
        catalog: AgentCatalog,
        drainer: QueueDrainer,
        recovery: Recovery,
        delivery: ResultDelivery,
        finished: threading.Condition,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.catalog = catalog
        self.drainer = drainer
        self.recovery = recovery
        self.delivery = delivery
        self._finished = finished

    def status(
        self,
        workspace: str | None = None,
        status: str | None = None,
        limit: int = 50,
        log_lines: int = 0,
        offset: int = 0,
        chain: bool = False,
    ) -> StatusReport:
        """Counts per status and a row per workspace (newest first, from the ``offset``-th on: a page);
        with ``chain``, the rows of ``workspace``'s whole chain instead: what it waits for (recursively)
        first, then it, then what waits for it.

        Raises:
            InvalidInputError: a bad workspace name, status, limit or offset; ``chain`` without a workspace.
            WorkspaceNotFoundError: ``workspace`` does not exist.
        """
        if chain:
            if workspace is None:
                raise InvalidInputError("chain", "needs a workspace: the chain of which one?")
            self.store.catch_up()  # the dependents come from the index
            chained = self.rows(self.chain(workspace))
            return self._report({s.value: 0 for s in Status} | Counter(str(r.status) for r in chained), chained)
        if status is not None and status not in {s.value for s in Status}:
            raise InvalidInputError("status", f"unknown status {status!r}; use one of {', '.join(Status)}.")
        if limit < 1:
            raise InvalidInputError("limit", "must be at least 1.")
        if offset < 0:
            raise InvalidInputError("offset", "must be 0 or more.")
        syncing = self.delivery.states()
        if workspace is not None:
            listed = [self._one(workspace)]
            counts: dict[str, int] = {s.value: 0 for s in Status}
            key = listed[0].record.status.value if listed[0].record else "unreadable"
            counts[key] = 1
        else:
            self.store.catch_up()  # new, deleted, and cut-off writes; the timer catches hand edits
            counts = {s.value: 0 for s in Status} | self.store.counts()
            listed = self.store.query(None if status is None else [status, "unreadable"], limit, offset)
        rows: list[WorkspaceRow] = []
        for item in listed:
            if item.record is None:
                rows.append(self._unreadable_row(item))
            elif status is None or item.record.status.value == status:
                rows.append(self._row(item.record, log_lines, syncing.get(item.name)))
        self._add_waits(rows, [i.record for i in listed if i.record is not None])
        return self._report(counts, rows[:limit])

    def chain(self, workspace: str) -> list[str]:
        """``workspace``'s chain: the workspaces it depends on (theirs first), it, then those that depend
        on it (breadth first). A workspace gone or unreadable ends its branch of the walk.

        Raises:
            WorkspaceNotFoundError: ``workspace`` does not exist.
        """
        self.store.read(workspace)
        upstream: list[str] = []

        def up(name: str) -> None:
            rec = self.store.find(name)
            for dep in rec.depends_on if rec is not None else []:
                if dep not in upstream:
                    up(dep)
                    upstream.append(dep)

        up(workspace)
        downstream: list[str] = []
        todo = [workspace]
        while todo:
            for dependent in self.store.dependents(todo.pop(0)):
                if dependent not in downstream and dependent != workspace and dependent not in upstream:
                    downstream.append(dependent)
                    todo.append(dependent)
        return [*upstream, workspace, *downstream]

    def rows(self, names: list[str]) -> list[WorkspaceRow]:
        """The status rows of ``names`` (a workspace gone since is left out), without the table's extras."""
        syncing = self.delivery.states()
        out = []
        records: list[WorkspaceRecord] = []
        for name in names:
            try:
                item = self._one(name)
            except WorkspaceNotFoundError:
                continue
            out.append(self._row(item.record, 0, syncing.get(name)) if item.record else self._unreadable_row(item))
            if item.record is not None:
                records.append(item.record)
        self._add_waits(out, records)
        return out

    def _add_waits(self, rows: list[WorkspaceRow], records: list[WorkspaceRecord]) -> None:
        """Say on each queued row what it waits for besides a slot: the workspaces it depends on that
        have not completed (read directly), else the run that holds its lock key. The holder may be
        any server's run: the root's active records are read only when a listed queued run has a key."""
        now = time.time()
        waits = {r.name: w for r in records if (w := retry_wait(r, now)) is not None}
        waits |= self.scheduler.dependency_waits(records, self.store.find)
        if any(r.status == Status.QUEUED and r.lock_key is not None for r in records):
            held = self.scheduler.lock_waits([i.record for i in self.store.active() if i.record is not None])
            waits = held | waits
        for row in rows:
            row.waiting_for = waits.get(row.name)

    def _one(self, workspace: str) -> Listed:
        """Raises:
        WorkspaceNotFoundError: no such workspace (with the recovery hint).
        """
        try:
            return Listed(workspace, self.store.read(workspace))
        except CorruptRecordError as e:
            return Listed(workspace, None, e)

    @staticmethod
    def _unreadable_row(item: Listed) -> WorkspaceRow:
        return WorkspaceRow(
            name=item.name, repo="?", agent="?", status="unreadable", runs=0, branch="?", error=str(item.error)
        )

    def _row(self, rec: WorkspaceRecord, log_lines: int, sync: str | None) -> WorkspaceRow:
        tail = None
        if log_lines > 0:
            base = agent_base(rec.agent)
            tail = redact(log_tail(self.store.paths(rec.name), base, log_lines), self.catalog.secrets(base))
        delivered = self.delivery.delivery_of(rec)
        dependents = self.store.dependents(rec.name)
        return WorkspaceRow(
            name=rec.name,
            repo=rec.repo,
            agent=rec.agent,
            status=rec.status,
            runs=rec.runs,
            branch=rec.branch,
            question=rec.question,
            reason=rec.reason if rec.stop_status is None else f"{rec.stop_status.value} pending: {rec.stop_reason}",
            started_at=rec.started_at,
            updated_at=rec.updated_at,
            finished_at=rec.finished_at,
            exit_code=rec.exit_code,
            summary=rec.summary,
            log_tail=tail,
            stalled_since=rec.stalled_since if rec.status == Status.RUNNING else None,
            node=rec.node,
            placement=rec.placement if rec.status == Status.RUNNING else None,
            qa=rec.qa,
            delivery=delivered,
            checkpoint=rec.checkpoint,
            out_of_scope=rec.out_of_scope,
            depends_on=rec.depends_on,
            base_workspace=rec.base_workspace,
            base_commit=rec.base_commit,
            retry=rec.retry,
            dependents=dependents,
            review=self._review(rec, dependents),
            sync=sync,
            delivery_commands=self.delivery.view_commands(rec, delivered),
        )

    def _review(self, rec: WorkspaceRecord, dependents: list[str]) -> ReviewInfo | None:
        """A reviewer's review (pending until it ends); for a reviewed workspace, its latest reviewer's."""
        if rec.review_of is not None:
            return rec.review or ReviewInfo(reviewer=rec.name, reviewed=rec.review_of, round=rec.review_round)
        reviewers = [r for d in dependents if (r := self.store.find(d)) is not None and r.review_of == rec.name]
        if not reviewers:
            return None
        latest = max(reviewers, key=lambda r: (r.review_round, r.created_at))
        return latest.review or ReviewInfo(reviewer=latest.name, reviewed=rec.name, round=latest.review_round)

    def _report(self, counts: dict[str, int], rows: list[WorkspaceRow]) -> StatusReport:
        """The rows with what holds the queue: frozen, why queued work cannot start, pool holds, orphans."""
        frozen = self.scheduler.state().frozen
        notes = ["the queue is frozen: new dispatches wait until agentic_dispatch_start"] if frozen else []
        engine = self.recovery.engine  # what the timer last saw: status never waits on the engine
        if engine.problem is not None:
            notes.append(f"the container engine cannot be reached (since {engine.since}): {engine.problem}")
        if self.drainer.stalled and counts[Status.QUEUED.value]:
            notes.append("queued work waits until the engine answers" if engine.problem else self.drainer.stalled)
        holds = [
            PoolHoldRow(
                pool=h.pool,
                reason=h.reason,
                until=datetime.fromtimestamp(h.until, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
                if h.until
                else None,
            )
            for h in self.scheduler.holds()
        ]
        # Each daily budget's use, reached or not: what the runs that finished today reported.
        notes += [f"budget {b.describe()}" for b in self.scheduler.budgets()]
        if (disk := disk_note(self.store.root)) is not None:  # one statvfs
            notes.append(disk)
        orphans = engine.orphans
        if orphans:
            notes.append(
                f"orphaned containers as of {engine.orphans_seen_at}: remove them with agentic-dispatch cleanup"
            )
        return StatusReport(counts=counts, workspaces=rows, frozen=frozen, holds=holds, orphans=orphans, notes=notes)

    def wait(self, workspace: str, timeout: float, poll: Callable[[], None] | None = None) -> WorkspaceRecord:
        """Block until ``workspace`` leaves queued/running or ``timeout`` passes; return its record.

        ``poll`` brings records up to date where no exit watcher runs in this process (a CLI call).

        Raises:
            WorkspaceNotFoundError: no such workspace.
        """
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:
                rec = self.store.read(workspace)
                left = deadline - time.monotonic()
                if rec.status not in ACTIVE_STATUSES or left <= 0:
                    return rec
                if poll is not None:
                    poll()
                    rec = self.store.read(workspace)
                    if rec.status not in ACTIVE_STATUSES:
                        return rec
                self._finished.wait(min(left, 1.0))
