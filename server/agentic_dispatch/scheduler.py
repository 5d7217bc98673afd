"""Scheduling: which queued workspace may start now.

Pools are agent bases. A workspace may start when the global cap, its pool's cap and
its model's cap all have room and the queue is not frozen; queued work starts in
priority order (critical > high > normal > low), then oldest first. Decisions are
taken under an admission lock that spans processes (``flock`` on
``<root>/state/admission.lock``), so two servers sharing a root never start the same
workspace twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import Limits
from .models import Priority, Status, WorkspaceRecord, utcnow

__all__ = ["Scheduler", "SchedulerState"]

_PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}


@dataclass
class SchedulerState:
    """Persisted scheduling state (survives restarts)."""

    frozen: bool = False
    frozen_at: str | None = None


def _base(agent: str) -> str:
    return agent.partition(":")[0]


class Scheduler:
    """Slot accounting and queue order; the service does the starting."""

    def __init__(self, limits: Limits, state_dir: Path) -> None:
        self.limits = limits
        self.state_dir = state_dir
        self._thread_lock = threading.RLock()
        self._state_file = state_dir / "scheduler.json"

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold the admission lock (threads here and other processes on the same root)."""
        with self._thread_lock:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.state_dir / "admission.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # -- persisted state -------------------------------------------------------------------
    def state(self) -> SchedulerState:
        try:
            data = json.loads(self._state_file.read_text(encoding="utf-8"))
            return SchedulerState(**data)
        except FileNotFoundError:
            return SchedulerState()
        except (ValueError, TypeError):
            # A broken state file must not stop the queue; it is kept aside for inspection.
            with contextlib.suppress(OSError):
                self._state_file.rename(self._state_file.with_suffix(".broken"))
            return SchedulerState()

    def _save(self, state: SchedulerState) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.__dict__, indent=2), encoding="utf-8")
        os.replace(tmp, self._state_file)

    def set_frozen(self, frozen: bool) -> SchedulerState:
        with self.admission():
            state = self.state()
            state.frozen = frozen
            state.frozen_at = utcnow() if frozen else None
            self._save(state)
            return state

    # -- decisions -------------------------------------------------------------------------
    @staticmethod
    def order(queued: list[WorkspaceRecord]) -> list[WorkspaceRecord]:
        return sorted(queued, key=lambda r: (_PRIORITY_RANK[r.priority], r.created_at, r.name))

    def pick(self, records: list[WorkspaceRecord]) -> list[WorkspaceRecord]:
        """The queued records that may start now, in start order (call under :meth:`admission`)."""
        if self.state().frozen:
            return []
        running = [r for r in records if r.status == Status.RUNNING]
        total = len(running)
        pools = Counter(_base(r.agent) for r in running)
        models = Counter(r.agent for r in running)
        chosen: list[WorkspaceRecord] = []
        for rec in self.order([r for r in records if r.status == Status.QUEUED]):
            base = _base(rec.agent)
            if total >= self.limits.total:
                break
            if base in self.limits.pools and pools[base] >= self.limits.pools[base]:
                continue
            if rec.agent in self.limits.models and models[rec.agent] >= self.limits.models[rec.agent]:
                continue
            chosen.append(rec)
            total += 1
            pools[base] += 1
            models[rec.agent] += 1
        return chosen
