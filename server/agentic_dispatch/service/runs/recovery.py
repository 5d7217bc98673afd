"""Recovery: bring records and containers back in line, at start and on every timer tick.

A record ``running`` whose container exited is finalised with the real exit code; one whose
container vanished is ``failed`` with the reason; a run past its timeout is stopped. A
container that started while its record still says ``queued`` (a crash in between) is adopted.
Containers labelled with this root that no record knows are orphans: reported, and removed
only by :meth:`Recovery.cleanup`. No ghosts.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import (
    CorruptRecordError,
    DispatchError,
    InvalidInputError,
    RuntimeUnavailableError,
    WorkspaceNotFoundError,
)
from ...models import ACTIVE_STATUSES, CleanupReport, Status, WorkspaceRecord, parse_time, utcnow
from ...runtime.base import LABEL_RUN, LABEL_WORKSPACE, ContainerInfo, Runtime
from ...scheduler import Scheduler
from ...store import Listed, StatusStore
from . import disk_cap
from .executor import RunLifecycle
from .launch import QueueDrainer
from .lifecycle import Placed, Stalled, Vanished, run_deadline
from .retention import Retention
from .stalls import StallWatch

__all__ = ["EngineView", "Recovery"]

log = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 3600
# How often the timer checks the status index against every record file (a stat each). Writes
# through the store update the index at once; this catches records changed behind its back.
INDEX_REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class EngineView:
    """What the timer last saw of the engine, for status (which never asks the engine itself)."""

    problem: str | None = None  # why it cannot be reached, while it cannot
    since: str | None = None
    orphans: list[str] = field(default_factory=list)
    orphans_seen_at: str | None = None


class Recovery:
    """Reconciliation, timeouts, adoption and orphans."""

    def __init__(
        self,
        store: StatusStore,
        runtime: Runtime,
        scheduler: Scheduler,
        drainer: QueueDrainer,
        runs: RunLifecycle,
        retention: Retention | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.scheduler = scheduler
        self.drainer = drainer
        self.runs = runs
        self.retention = retention  # [retention]: the timer cleans, at most once an hour
        self.root_labels = drainer.root_labels
        self._refreshed = -INDEX_REFRESH_SECONDS  # the first reconcile (at start) checks the index
        self.engine = EngineView()
        self.stalls = StallWatch(drainer.settings, store)

    def reconcile(self) -> None:
        """Match every running record with its container; enforce timeouts; adopt; sweep what the
        engine holds (leftovers removed, orphans noted); drain the queue.

        Works on the queued and running records only (from the status index); the index itself is
        checked against every record file once per ``INDEX_REFRESH_SECONDS`` (and by each status).
        While the engine cannot be reached nothing is decided about any run: :attr:`engine`
        says so (status shows it), and the next tick looks again.
        """
        if time.monotonic() - self._refreshed > INDEX_REFRESH_SECONDS:
            self.store.refresh()
            self._refreshed = time.monotonic()
        listed = self.store.active()
        try:
            for item in listed:
                if item.record is not None and item.record.status == Status.RUNNING and item.record.container_id:
                    self._check(item.record, item.record.container_id)
            self.stalls.retain({i.record.container_id for i in listed if i.record and i.record.container_id})
            self._sweep(listed)
        except RuntimeUnavailableError as e:
            self._engine_away(str(e))
            return
        self._engine_back()
        self.drainer.drain()
        if self.retention is not None:
            try:
                self.retention.tick()
            except (OSError, DispatchError) as e:  # the next hour tries again; the runs come first
                log.warning("retention could not clean: %s", e)

    def _check(self, rec: WorkspaceRecord, container_id: str) -> None:
        """One running record against its container."""
        info = self.runtime.inspect(container_id)
        if info is None or info.lost is not None:
            self.runs.apply(rec.name, Vanished(container_id, info.lost, info.node) if info else Vanished(container_id))
            return
        if not info.running:
            self.runs.finish(rec.name, container_id, info.exit_code, info.oom_killed, info.node)
            return
        if (info.node, info.waiting) != (rec.node, rec.placement):  # a cluster placed it, or says why not yet
            rec = self.runs.apply(rec.name, Placed(container_id, info.node, info.waiting)) or rec
        if rec.stop_status is not None:  # a stop the engine did not take (it was away)
            self.runs.stop_marked(rec.name, container_id)
        elif (deadline := run_deadline(rec)) is not None and time.time() > deadline[0]:
            self.runs.stop(rec.name, Status.FAILED, deadline[1], container_id, cause="timeout")
        elif (reason := disk_cap.over_cap(self.drainer.settings, self.store, rec)) is not None:
            self.runs.stop(rec.name, Status.FAILED, reason, container_id)
        elif (stall := self.stalls.observe(rec)) is not None:
            after = self.runs.apply(rec.name, stall)
            if isinstance(stall, Stalled) and after is not None and after.stop_status is not None:
                self.runs.stop_marked(rec.name, container_id)  # ends failed, its work kept as a checkpoint

    def _engine_away(self, problem: str) -> None:
        if self.engine.problem != problem:  # one line per change, not one per tick
            log.warning("the container engine cannot be reached: %s", problem)
        self.engine = EngineView(
            problem=problem,
            since=self.engine.since if self.engine.problem else utcnow(),
            orphans=self.engine.orphans,
            orphans_seen_at=self.engine.orphans_seen_at,
        )

    def _engine_back(self) -> None:
        if self.engine.problem is not None:
            log.warning("the container engine answers again")
            self.engine = EngineView(orphans=self.engine.orphans, orphans_seen_at=self.engine.orphans_seen_at)

    def next_wakeup(self, interval: float) -> float:
        """Seconds until the next tick: ``interval``, or sooner for the earliest run deadline."""
        wait = interval
        now = time.time()
        for item in self.store.active():
            rec = item.record
            if rec is not None and rec.status == Status.QUEUED and rec.retry is not None and rec.retry.next_at:
                wait = min(wait, max(0.2, (parse_time(rec.retry.next_at) or now) - now + 0.1))  # a retry falls due
            if rec is None or rec.status != Status.RUNNING:
                continue
            deadline = run_deadline(rec)
            if deadline is not None:
                wait = min(wait, max(0.2, deadline[0] - now + 0.1))
        if (stall := self.stalls.next_due()) is not None:
            wait = min(wait, max(0.2, stall + 0.1))
        return wait

    @staticmethod
    def _queued_runs(listed: list[Listed]) -> set[tuple[str, str]]:
        """(workspace, run) of every queued record: the labels its container will carry."""
        return {(i.record.name, str(i.record.runs)) for i in listed if i.record and i.record.status == Status.QUEUED}

    def _sweep(self, listed: list[Listed]) -> None:
        """One look at every container of this root: adopt the runs whose container started while
        the record still says ``queued`` (a crash in between); remove what runs that ended for good
        left behind (a removal that failed as they ended); note the orphans for status.

        Raises:
            RuntimeUnavailableError: the engine cannot be reached.
        """
        containers = self.runtime.list(self.root_labels)
        queued = self._queued_runs(listed)
        adopt = sorted(
            {
                name
                for c in containers
                if (name := c.labels.get(LABEL_WORKSPACE)) and (name, c.labels.get(LABEL_RUN)) in queued and c.started
            }
        )
        if adopt:
            with self.scheduler.admission():
                for name in adopt:
                    try:
                        self.drainer.launch(name)  # finds the container and adopts it
                    except Exception:
                        log.exception("cannot adopt the running container of %s", name)
            listed = self.store.active()
        orphans = []
        for c in self._unknown(containers, listed):
            if self._left_over(c):
                self.runtime.remove(c.id)
            else:
                orphans.append(f"{c.id[:12]} {c.name} ({c.labels.get(LABEL_WORKSPACE, '?')})")
        self.engine = EngineView(orphans=orphans, orphans_seen_at=utcnow())

    def _unknown(self, containers: list[ContainerInfo], listed: list[Listed]) -> list[ContainerInfo]:
        """The containers no queued or running record claims.

        Not among them: the container of a running record; one a queued record is about to adopt
        (same workspace and run); one whose workspace's record cannot be read (it is reported as
        unreadable, and its container is left alone until a person has looked).
        """
        known = {
            i.record.container_id
            for i in listed
            if i.record is not None and i.record.status == Status.RUNNING and i.record.container_id
        }
        adopting = self._queued_runs(listed)
        unreadable = set(self.store.unreadable())
        return [
            c
            for c in containers
            if c.id not in known
            and (c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)) not in adopting
            and c.labels.get(LABEL_WORKSPACE) not in unreadable
        ]

    def _left_over(self, c: ContainerInfo) -> bool:
        """A stopped container of a run that has ended, or been replaced since: ours, known, and
        only left because its removal failed (the engine went away as the run ended)."""
        name, run = c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)
        if c.running or not name or not run or not run.isdigit():
            return False
        try:
            rec = self.store.read(name)
        except (WorkspaceNotFoundError, CorruptRecordError, InvalidInputError):
            return False
        return rec.status not in ACTIVE_STATUSES or rec.runs > int(run)

    def orphans(self) -> list[str]:
        """The orphaned containers, described for a person (id, name, workspace label), from one
        look at the engine now.

        Raises:
            RuntimeUnavailableError: the engine cannot be reached.
        """
        self._sweep(self.store.active())
        return self.engine.orphans

    def cleanup(self) -> CleanupReport:
        """Remove the orphaned containers :meth:`orphans` reports."""
        removed = []
        with self.scheduler.admission():  # no container starts (here or in another server) while we look
            listed = self.store.active()
            for c in self._unknown(self.runtime.list(self.root_labels), listed):
                self.runtime.remove(c.id)
                removed.append(f"{c.id[:12]} {c.name}")
        self.engine = EngineView(orphans=[], orphans_seen_at=utcnow())
        return CleanupReport(removed=removed, message=f"removed {len(removed)} orphaned container(s)")

    @staticmethod
    def remove_stale_staging(staging: Path) -> None:
        """A dispatch cut off mid-way (crash, kill) leaves its staging folder; nothing refers to it."""
        if not staging.is_dir():
            return
        for d in staging.iterdir():
            if time.time() - d.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
