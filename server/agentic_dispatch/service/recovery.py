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
from pathlib import Path

from ..models import CleanupReport, Status, WorkspaceRecord, utcnow
from ..runtime.base import LABEL_RUN, LABEL_WORKSPACE, ContainerInfo, Runtime
from ..scheduler import Scheduler
from ..store import Listed, StatusStore
from . import disk
from .common import run_deadline
from .drain import QueueDrainer
from .finalise import Finaliser

__all__ = ["Recovery"]

log = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 3600
# How often the timer checks the status index against every record file (a stat each). Writes
# through the store update the index at once; this catches records changed behind its back.
INDEX_REFRESH_SECONDS = 60.0


class Recovery:
    """Reconciliation, timeouts, adoption and orphans."""

    def __init__(
        self,
        store: StatusStore,
        runtime: Runtime,
        scheduler: Scheduler,
        drainer: QueueDrainer,
        finaliser: Finaliser,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.scheduler = scheduler
        self.drainer = drainer
        self.finaliser = finaliser
        self.root_labels = drainer.root_labels
        self._refreshed = -INDEX_REFRESH_SECONDS  # the first reconcile (at start) checks the index

    def reconcile(self) -> None:
        """Match every running record with its container; enforce timeouts; adopt; drain the queue.

        Works on the queued and running records only (from the status index); the index itself is
        checked against every record file once per ``INDEX_REFRESH_SECONDS`` (and by each status).
        """
        now = time.time()
        if time.monotonic() - self._refreshed > INDEX_REFRESH_SECONDS:
            self.store.refresh()
            self._refreshed = time.monotonic()
        listed = self.store.active()
        for item in listed:
            rec = item.record
            if rec is None or rec.status != Status.RUNNING or rec.container_id is None:
                continue
            info = self.runtime.inspect(rec.container_id)
            if info is None:
                self._fail_vanished(rec)
            elif not info.running:
                self.finaliser.finalise(rec.name, rec.container_id, info.exit_code)
            elif (deadline := run_deadline(rec)) is not None and now > deadline[0]:
                self.finaliser.stop_run(rec.name, Status.FAILED, deadline[1], rec.container_id)
            else:  # still running: the workspace's size cap (service/disk.py)
                disk.enforce_cap(self.drainer.settings, self.store, rec, self.finaliser.stop_run)
        self._adopt_started(listed)
        self.drainer.drain()

    def next_wakeup(self, interval: float) -> float:
        """Seconds until the next tick: ``interval``, or sooner for the earliest run deadline."""
        wait = interval
        now = time.time()
        for item in self.store.active():
            rec = item.record
            if rec is None or rec.status != Status.RUNNING:
                continue
            deadline = run_deadline(rec)
            if deadline is not None:
                wait = min(wait, max(0.2, deadline[0] - now + 0.1))
        return wait

    @staticmethod
    def _queued_runs(listed: list[Listed]) -> set[tuple[str, str]]:
        """(workspace, run) of every queued record: the labels its container will carry."""
        return {(i.record.name, str(i.record.runs)) for i in listed if i.record and i.record.status == Status.QUEUED}

    def _adopt_started(self, listed: list[Listed]) -> None:
        """Record the runs whose container started but whose record still says ``queued``.

        A server killed between starting a container and writing the record leaves that; the
        run is adopted whatever the limits say (it is running already), never started twice.
        ``launch`` re-reads each record under its lock, so an older ``listed`` is safe.
        """
        queued = self._queued_runs(listed)
        if not queued:
            return
        started = {
            c.labels.get(LABEL_WORKSPACE)
            for c in self.runtime.list(self.root_labels)
            if (c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)) in queued and c.started
        }
        if started:
            with self.scheduler.admission():
                for name in sorted(n for n in started if n):
                    try:
                        self.drainer.launch(name)  # finds the container and adopts it
                    except Exception:
                        log.exception("cannot adopt the running container of %s", name)

    def _fail_vanished(self, rec: WorkspaceRecord) -> None:
        def apply(r: WorkspaceRecord) -> bool:
            if r.status != Status.RUNNING or r.container_id != rec.container_id:
                return False
            r.status = Status.FAILED
            r.finished_at = utcnow()
            r.question = (
                f"the agent container {str(rec.container_id)[:12]} vanished (removed outside agentic-dispatch); "
                "its work so far is in the workspace. Resume to run again."
            )
            return True

        self.store.update(rec.name, apply)

    def _orphan_containers(self) -> list[ContainerInfo]:
        """Containers labelled with this root that no record knows.

        Not orphans: the container of a running record; one a queued record is about to adopt
        (same workspace and run); one whose workspace's record cannot be read (it is reported
        as unreadable, and its container is left alone until a person has looked).
        """
        listed = self.store.active()
        known = {
            i.record.container_id
            for i in listed
            if i.record is not None and i.record.status == Status.RUNNING and i.record.container_id
        }
        adopting = self._queued_runs(listed)
        unreadable = set(self.store.unreadable())
        return [
            c
            for c in self.runtime.list(self.root_labels)
            if c.id not in known
            and (c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)) not in adopting
            and c.labels.get(LABEL_WORKSPACE) not in unreadable
        ]

    def orphans(self) -> list[str]:
        """The orphaned containers, described for a person (id, name, workspace label).

        Raises:
            RuntimeUnavailableError: the engine cannot be reached.
        """
        return [f"{c.id[:12]} {c.name} ({c.labels.get(LABEL_WORKSPACE, '?')})" for c in self._orphan_containers()]

    def cleanup(self) -> CleanupReport:
        """Remove the orphaned containers :meth:`orphans` reports."""
        removed = []
        with self.scheduler.admission():  # no container starts (here or in another server) while we look
            for c in self._orphan_containers():
                self.runtime.remove(c.id)
                removed.append(f"{c.id[:12]} {c.name}")
        return CleanupReport(removed=removed, message=f"removed {len(removed)} orphaned container(s)")

    @staticmethod
    def remove_stale_staging(staging: Path) -> None:
        """A dispatch cut off mid-way (crash, kill) leaves its staging folder; nothing refers to it."""
        if not staging.is_dir():
            return
        for d in staging.iterdir():
            if time.time() - d.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
