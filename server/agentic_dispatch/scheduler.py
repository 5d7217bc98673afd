"""Scheduling: which queued workspace may start now.

Pools are agent bases. A workspace may start when the global cap, its pool's cap and
its model's cap all have room, no running workspace holds its lock key, and the queue
is not frozen; queued work starts in priority order (critical > high > normal > low),
then oldest first (a run waiting for its lock holds back no other). Decisions are
taken under an admission lock that spans processes (``flock`` on
``<root>/state/admission.lock``), so two servers sharing a root never start the same
workspace twice, nor two runs with one lock key at once.

Daily budgets (``[limits] daily_tokens`` / ``daily_cost_usd``, per pool or ``base:model``) count what
the runs that ended since the last UTC midnight reported: the events log's line that ends a run
carries its usage (:class:`UsageMeter`); a run that reported nothing is counted as unknown, never guessed.

The persisted state (``<root>/state/scheduler.json``) fails closed: while it cannot be read
the queue counts as frozen, :attr:`Scheduler.state_problem` says why, and the file is left
as it is until an operator unfreezes (which sets it aside and writes a fresh one).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from .agents import agent_base as _base
from .config import Limits
from .events import EventLog
from .fileio import ReentrantFileLock, write_atomic
from .models import Event, EventKind, Priority, Status, WorkspaceRecord, parse_time, utcnow

__all__ = [
    "ALL_POOLS",
    "BudgetUse",
    "PoolHold",
    "RunUsage",
    "Scheduler",
    "SchedulerState",
    "UsageMeter",
    "dependency_wait",
    "retry_wait",
]

log = logging.getLogger(__name__)

ALL_POOLS = "*"  # the pool of a hold that stops every pool

_PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}


@dataclass
class SchedulerState:
    """Persisted scheduling state (survives restarts)."""

    frozen: bool = False
    frozen_at: str | None = None
    paused_until: dict[str, float] = field(default_factory=dict)  # pool -> epoch seconds
    fast_failures: dict[str, list[float]] = field(default_factory=dict)  # pool -> failure times
    last_start: dict[str, float] = field(default_factory=dict)  # pool -> epoch seconds


_STATE = TypeAdapter(SchedulerState)  # keys of older versions are ignored


@dataclass(frozen=True)
class PoolHold:
    """Why a pool starts nothing right now, and until when."""

    pool: str
    reason: str
    until: float | None

    def describe(self) -> str:
        """E.g. ``codex held until 2025-01-02T00:00:00Z: daily limit of 100 starts reached``."""
        until = ""
        if self.until is not None:
            until = " until " + datetime.fromtimestamp(self.until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{self.pool} held{until}: {self.reason}"


# The lines that end a run (or an attempt a retry follows): each carries what the run used.
_RUN_ENDS = frozenset(
    {EventKind.COMPLETED, EventKind.FAILED, EventKind.BLOCKED, EventKind.CANCELLED, EventKind.RETRYING}
)


@dataclass(frozen=True)
class RunUsage:
    """What one finished run reported about its usage: ``None`` where its CLI said nothing."""

    agent: str
    tokens: int | None  # input + output
    cost_usd: float | None

    @classmethod
    def ended(cls, event: Event) -> RunUsage | None:
        """The usage of the run that ``event`` ended; ``None`` for a line that ends no run (a queued
        workspace cancelled or not launched never ran)."""
        if event.kind not in _RUN_ENDS or event.previous != Status.RUNNING.value:
            return None
        return cls(event.agent, event.tokens, event.cost_usd)


BudgetKind = Literal["daily_tokens", "daily_cost_usd"]


@dataclass(frozen=True)
class BudgetUse:
    """One daily budget against what the runs that finished today reported."""

    key: str  # a pool (agent base) or a base:model
    budget: BudgetKind
    used: float
    limit: float
    runs: int  # runs of this pool or model that finished today
    unknown: int  # of them, those that reported no figure for this budget (not counted)
    resets: float  # the next 00:00 UTC, epoch seconds

    @property
    def reached(self) -> bool:
        return self.used >= self.limit

    def describe(self) -> str:
        """E.g. ``limits.daily_tokens codex: 1,200 / 1,000 tokens used today (3 runs finished, 1 reported no
        usage: unknown)``."""
        used, limit = (
            (f"{self.used:,.0f}", f"{self.limit:,.0f} tokens")
            if self.budget == "daily_tokens"
            else (f"${self.used:,.2f}", f"${self.limit:,.2f}")
        )
        unknown = f", {self.unknown} reported no usage: unknown" if self.unknown else ""
        return (
            f"limits.{self.budget} {self.key}: {used} / {limit} used today "
            f"({self.runs} run{'s' if self.runs != 1 else ''} finished{unknown})"
        )


class UsageMeter:
    """The usage reported by the runs that ended since the last UTC midnight, read from the events log.

    The line that ends a run carries what that run reported (see ``service/runs/lifecycle.py``), and the
    log is append-only and kept: every run counts once, also the earlier runs of a workspace resumed
    since (a resumed Codex or Claude run reports only its own difference) and the runs of one ``clean``
    removed, and a restarted server counts exactly what it counted before. The day's lines are read
    once (backwards from the end to the last midnight), then at each look only what was appended."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self._lock = threading.Lock()
        self._day = ""  # the midnight the runs below are counted from
        self._offset = 0  # the log is read up to here
        self._runs: list[RunUsage] = []

    def today(self, now: float) -> list[RunUsage]:
        since = _midnight_iso(now)
        with self._lock:
            if since != self._day or self.events.size() < self._offset:  # another day, or a log replaced
                self._day, self._offset = since, self.events.whole_lines_end()
                lines = itertools.takewhile(lambda e: e.at >= since, self.events.backwards(self._offset))
                self._runs = [u for e in reversed(list(lines)) if (u := RunUsage.ended(e)) is not None]
            while (read := self.events.read(self._offset))[1] != self._offset:
                events, self._offset = read
                self._runs += [u for e in events if e.at >= since and (u := RunUsage.ended(e)) is not None]
            return list(self._runs)


def budget_uses(limits: Limits, runs: list[RunUsage], now: float) -> list[BudgetUse]:
    """Each configured daily budget against ``runs`` (a key with ``:`` is a model, else a pool)."""
    out: list[BudgetUse] = []
    resets = _next_utc_midnight(now)
    configured: list[tuple[BudgetKind, dict[str, float]]] = [
        ("daily_tokens", {k: float(v) for k, v in limits.daily_tokens.items()}),
        ("daily_cost_usd", dict(limits.daily_cost_usd)),
    ]
    for kind, budgets in configured:
        for key, limit in sorted(budgets.items()):
            mine = [r for r in runs if r.agent == key or (":" not in key and _base(r.agent) == key)]
            figures = [r.tokens if kind == "daily_tokens" else r.cost_usd for r in mine]
            known = [f for f in figures if f is not None]
            out.append(BudgetUse(key, kind, sum(known), limit, len(mine), len(figures) - len(known), resets))
    return out


def retry_wait(rec: WorkspaceRecord, now: float) -> str | None:
    """A queued retry still in its backoff: when it may start, and after what."""
    r = rec.retry
    if rec.status != Status.QUEUED or r is None or r.next_at is None or (parse_time(r.next_at) or 0) <= now:
        return None
    return f"attempt {r.attempt} of {r.max + 1} at {r.next_at}, after a {r.last_class} failure"


def dependency_wait(rec: WorkspaceRecord, lookup: Callable[[str], WorkspaceRecord | None]) -> str | None:
    """What a queued ``rec`` waits for among the workspaces it depends on (``None``: each of them
    ended ``completed``, its QA gate passed where on), said for a person: the ones still at work,
    and the ones that ended otherwise with what to do. ``lookup`` gives a record (``None``: gone or
    unreadable)."""
    if rec.status != Status.QUEUED or not rec.depends_on:
        return None
    at_work: list[str] = []
    ended: list[str] = []
    for name in rec.depends_on:
        dep = lookup(name)
        if dep is None:
            ended.append(
                f"{name} to complete, but it is gone or its record cannot be read: cancel {rec.name} "
                "(agentic_cancel) and dispatch it again without that dependency"
            )
        elif dep.status == Status.COMPLETED:
            continue
        elif dep.status in (Status.QUEUED, Status.RUNNING):
            at_work.append(f"{name} ({dep.status.value})")
        else:
            why = (dep.reason or dep.question or "").strip().splitlines()
            ended.append(
                f"{name}, which ended {dep.status.value}"
                + (f" ({why[0][:200]})" if why else "")
                + f": resume it (agentic_resume {name}) and this one starts once it completes, "
                f"or cancel {rec.name} (agentic_cancel)"
            )
    parts = ([f"{', '.join(at_work)} to complete"] if at_work else []) + ended
    return "; ".join(parts) or None


class Scheduler:
    """Slot accounting and queue order; the service does the starting."""

    def __init__(self, limits: Limits, state_dir: Path, events_file: Path, usage: UsageMeter | None = None) -> None:
        self.limits = limits
        self.usage = usage  # daily budgets count what it finds; without one they count nothing
        self.state_dir = state_dir
        self.events_file = events_file  # daily limits count its "started" lines
        self._admission = ReentrantFileLock(state_dir / "admission.lock")
        self._state_file = state_dir / "scheduler.json"
        self._reported_problem: str | None = None

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold the admission lock (threads here and other processes on the same root).

        Re-entrant within a thread: only the outermost entry takes the ``flock`` (a second
        ``open`` of the lock file would be a new lock that waits for our own).

        Raises:
            OSError: the lock file cannot be created.
        """
        with self._admission:
            yield

    # -- persisted state -------------------------------------------------------------------
    def state(self) -> SchedulerState:
        """The persisted state; frozen (fail closed) while the state file cannot be read."""
        return self._load()[0]

    @property
    def state_problem(self) -> str | None:
        """Why the state file cannot be read (the queue is frozen meanwhile), or None."""
        return self._load()[1]

    def _load(self) -> tuple[SchedulerState, str | None]:
        try:
            text = self._state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return SchedulerState(), self._report(None)
        except (OSError, UnicodeDecodeError) as e:
            return SchedulerState(frozen=True), self._report(f"cannot read it ({e})")
        try:
            # strict: a wrong type (a string for `frozen`) could otherwise lift the freeze or a pause
            return _STATE.validate_json(text, strict=True), self._report(None)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            return SchedulerState(frozen=True), self._report(
                f"it is not valid scheduler state ({where}: {first['msg']})"
            )

    def _report(self, reason: str | None) -> str | None:
        """Turn a read failure into the message status shows; log it once per distinct failure."""
        problem = None
        if reason is not None:
            problem = (
                f"the scheduler state file {self._state_file} is unreadable: {reason}; nothing starts until it "
                "is fixed: repair or delete the file, or run agentic_dispatch_start (the broken file is kept "
                f"as {self._state_file.name}.broken and pool pauses are reset)"
            )
        if problem != self._reported_problem:
            if problem is not None:
                log.error("%s", problem)
            elif self._reported_problem is not None:
                log.warning("the scheduler state file %s is readable again", self._state_file)
            self._reported_problem = problem
        return problem

    def _save(self, state: SchedulerState) -> None:
        write_atomic(self._state_file, json.dumps(state.__dict__, indent=2), mode=0o644)

    def set_frozen(self, frozen: bool) -> SchedulerState:
        """Freeze or unfreeze the queue.

        While the state file is unreadable, freezing changes nothing (the queue is frozen
        already) and unfreezing is the operator's repair: the broken file is renamed to
        ``scheduler.json.broken`` and a fresh state (no pauses) is written.
        """
        with self.admission():
            state, problem = self._load()
            if problem is not None:
                if frozen:
                    return state
                broken = self._state_file.with_name(self._state_file.name + ".broken")
                with contextlib.suppress(FileNotFoundError):  # another server may have repaired it meanwhile
                    os.replace(self._state_file, broken)
                log.warning("unfrozen by the operator: %s set aside as %s", self._state_file, broken)
                state = SchedulerState()
            state.frozen = frozen
            state.frozen_at = utcnow() if frozen else None
            self._save(state)
            self._report(None)
            return state

    def note_start(self, agent: str) -> None:
        """Remember a start for pacing (call under :meth:`admission`). Daily counts come from the events log."""
        state, problem = self._load()
        if problem is not None:
            return  # the broken file is kept for the operator; nothing starts meanwhile anyway
        state.last_start[_base(agent)] = time.time()
        self._save(state)

    def starts_today(self, now: float) -> Counter[str]:
        """Starts per pool since the last UTC midnight, counted from the events log's ``started`` lines."""
        since = _midnight_iso(now)
        counts: Counter[str] = Counter()
        for line in _lines_backwards(self.events_file):
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(event, dict):
                continue
            if str(event.get("at", "")) < since:
                break  # the log is in time order: everything before is an earlier day
            if event.get("kind") == "started":
                counts[_base(str(event.get("agent", "")))] += 1
        return counts

    def note_failure(self, agent: str, seconds_after_start: float) -> bool:
        """Record a failed run; a fast one counts towards pausing its pool. Returns True if the pool got paused."""
        if seconds_after_start > self.limits.fast_fail_window_seconds:
            return False
        with self.admission():
            state, problem = self._load()
            if problem is not None:
                return False  # the queue is frozen meanwhile; the broken file is kept for the operator
            pool, now = _base(agent), time.time()
            window = self.limits.fast_fail_window_seconds
            recent = [t for t in state.fast_failures.get(pool, []) if now - t <= window] + [now]
            paused = len(recent) >= self.limits.fast_fail_count
            if paused:
                state.paused_until[pool] = now + self.limits.fast_fail_pause_seconds
                recent = []
            state.fast_failures[pool] = recent
            self._save(state)
            return paused

    def resume_pool(self, pool: str) -> None:
        """Lift a fast-failure pause. Does nothing while the state file is unreadable (see :meth:`set_frozen`)."""
        with self.admission():
            state, problem = self._load()
            if problem is not None:
                return
            state.paused_until.pop(pool, None)
            state.fast_failures.pop(pool, None)
            self._save(state)

    def budgets(self, now: float | None = None) -> list[BudgetUse]:
        """Each daily budget (``[limits] daily_tokens`` / ``daily_cost_usd``) against today's reported use."""
        if self.usage is None or not (self.limits.daily_tokens or self.limits.daily_cost_usd):
            return []
        now = time.time() if now is None else now
        return budget_uses(self.limits, self.usage.today(now), now)

    def holds(self, pools: set[str] | None = None, now: float | None = None) -> list[PoolHold]:
        """Pools (or models) that start nothing now: all of them while the state file is unreadable
        (pool ``*``); paused after fast failures, at their daily limit or budget, or pacing."""
        state, problem = self._load()
        now = time.time() if now is None else now
        started_today = self.starts_today(now) if self.limits.daily else Counter[str]()
        return self._holds(state, problem, now, started_today, pools, self.budgets(now))

    def hold_on(self, agent: str, now: float | None = None) -> PoolHold | None:
        """The first hold that keeps a run of ``agent`` (``base[:model]``) from starting now, if any."""
        base = _base(agent)
        return next((h for h in self.holds({base}, now) if h.pool in (ALL_POOLS, base, agent)), None)

    def _holds(
        self,
        state: SchedulerState,
        problem: str | None,
        now: float,
        started_today: Counter[str],
        pools: set[str] | None,
        budgets: list[BudgetUse],
    ) -> list[PoolHold]:
        out: list[PoolHold] = [PoolHold(ALL_POOLS, problem, None)] if problem is not None else []
        names = set(pools or set()) | set(state.paused_until) | set(self.limits.daily) | set(self.limits.pacing_seconds)
        for pool in sorted(names):
            until = state.paused_until.get(pool, 0)
            if until > now:
                out.append(PoolHold(pool, f"paused after {self.limits.fast_fail_count} fast failures", until))
                continue
            limit = self.limits.daily.get(pool)
            if limit is not None and started_today[pool] >= limit:
                out.append(PoolHold(pool, f"daily limit of {limit} starts reached", _next_utc_midnight(now)))
                continue
            pace = self.limits.pacing_seconds.get(pool, 0)
            last = state.last_start.get(pool)
            if pace and last is not None and now - last < pace:
                out.append(PoolHold(pool, f"pacing: {pace:g} s between starts", last + pace))
        for b in budgets:
            if b.reached:
                reason = f"daily budget reached, resets at 00:00 UTC: {b.describe()}"
                out.append(PoolHold(b.key, reason, b.resets))
        return out

    # -- decisions -------------------------------------------------------------------------
    @staticmethod
    def order(queued: list[WorkspaceRecord]) -> list[WorkspaceRecord]:
        return sorted(queued, key=lambda r: (_PRIORITY_RANK[r.priority], r.created_at, r.queued_ns or 0, r.name))

    @staticmethod
    def lock_holders(records: list[WorkspaceRecord]) -> dict[str, str]:
        """Lock key -> the running workspace that holds it, among ``records``."""
        return {r.lock_key: r.name for r in records if r.status == Status.RUNNING and r.lock_key is not None}

    @classmethod
    def lock_waits(cls, records: list[WorkspaceRecord]) -> dict[str, str]:
        """Queued workspace -> the lock it waits for (``lock <key> held by <workspace>``), among ``records``
        (pass every queued and running record of the root: a holder may be another server's run)."""
        holders = cls.lock_holders(records)
        return {
            r.name: f"lock {r.lock_key} held by {holders[r.lock_key]}"
            for r in records
            if r.status == Status.QUEUED and r.lock_key is not None and r.lock_key in holders
        }

    @staticmethod
    def dependency_waits(
        records: list[WorkspaceRecord], lookup: Callable[[str], WorkspaceRecord | None]
    ) -> dict[str, str]:
        """Queued workspace -> what it waits for among its dependencies (:func:`dependency_wait`),
        among ``records``; a dependency among them is not looked up again."""
        known = {r.name: r for r in records}

        def find(name: str) -> WorkspaceRecord | None:
            return known[name] if name in known else lookup(name)

        waits = {r.name: dependency_wait(r, find) for r in records if r.status == Status.QUEUED and r.depends_on}
        return {name: why for name, why in waits.items() if why is not None}

    def pick(
        self, records: list[WorkspaceRecord], now: float | None = None, waiting: Mapping[str, str] | None = None
    ) -> list[WorkspaceRecord]:
        """The queued records that may start now, in start order (call under :meth:`admission`).

        ``records`` are the queued and running records of every server on the root: no two runs
        with one lock key are ever running, and a run waiting for its lock is skipped, not a barrier.
        Neither is a run in ``waiting`` (its dependencies have not completed: :meth:`dependency_waits`)."""
        state, problem = self._load()
        if state.frozen or problem is not None:
            return []
        now = time.time() if now is None else now
        # Counted once: starts chosen here are added below, since their "started" lines come later.
        started_today = self.starts_today(now) if self.limits.daily else Counter[str]()
        pools_here = {_base(r.agent) for r in records}
        held = {h.pool for h in self._holds(state, problem, now, started_today, pools_here, self.budgets(now))}
        pacing = self.limits.pacing_seconds
        daily = self.limits.daily
        running = [r for r in records if r.status == Status.RUNNING]
        total = len(running)
        pools = Counter(_base(r.agent) for r in running)
        models = Counter(r.agent for r in running)
        locks = self.lock_holders(running)
        chosen: list[WorkspaceRecord] = []
        waiting = waiting or {}
        for rec in self.order([r for r in records if r.status == Status.QUEUED and r.name not in waiting]):
            if rec.retry is not None and (parse_time(rec.retry.next_at) or 0) > now:
                continue  # a retry still in its backoff: it takes no slot
            base = _base(rec.agent)
            if total >= self.limits.total:
                break
            if base in held or rec.agent in held or (rec.lock_key is not None and rec.lock_key in locks):
                continue
            if base in self.limits.pools and pools[base] >= self.limits.pools[base]:
                continue
            if rec.agent in self.limits.models and models[rec.agent] >= self.limits.models[rec.agent]:
                continue
            chosen.append(rec)
            if rec.lock_key is not None:
                locks[rec.lock_key] = rec.name  # a second run with this key waits for this one
            if pacing.get(base):
                held.add(base)  # one start per pacing interval
            started_today[base] += 1
            if base in daily and started_today[base] >= daily[base]:
                held.add(base)  # this pick used the rest of today's starts
            total += 1
            pools[base] += 1
            models[rec.agent] += 1
        return chosen


def _lines_backwards(path: Path, block: int = 64 * 1024) -> Iterator[str]:
    """The lines of ``path``, last first, reading only as far back as the caller goes."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(0, os.SEEK_END)
        pos, rest = f.tell(), b""
        while pos > 0:
            size = min(block, pos)
            pos -= size
            f.seek(pos)
            chunk = f.read(size) + rest
            lines = chunk.split(b"\n")
            rest = lines.pop(0)  # may continue in the previous block
            for line in reversed(lines):
                if line.strip():
                    yield line.decode("utf-8", errors="replace")
        if rest.strip():
            yield rest.decode("utf-8", errors="replace")


def _midnight_iso(ts: float) -> str:
    """The last 00:00 UTC at or before ``ts``, as records and event lines write times."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT00:00:00Z")


def _next_utc_midnight(ts: float) -> float:
    day = datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()
