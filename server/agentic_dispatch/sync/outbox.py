"""The outbox: a durable queue of deliveries (a run's branch, a run's record), flushed oldest first.

Layout under ``<state>/outbox/``::

    <id>.json           an entry to deliver: pending, or in need of a person's attention
    ledger/<id>.json    a confirmed delivery; enqueueing that (workspace, run, kind) again is a no-op
    dead/<id>.json      an entry whose attempts ran out (enqueue leaves it alone unless forced)
    dead-letter.jsonl   the audit of those, one line each, with the last reason
    locks/<id>.lock     held (flock) by whoever delivers or changes that entry

An entry is keyed by (workspace, run, kind): a resumed workspace (run + 1) is delivered again.
Every file is written atomically; an entry file goes only after its ledger file is on disk, so a
server killed mid-flush loses nothing and sends nothing twice that it knew it had sent (both
deliveries are idempotent on the other side anyway). Servers sharing a root skip an entry another
one is delivering (non-blocking flock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import SyncSettings
from ..errors import CorruptRecordError, DispatchError
from ..fileio import exclusive_lock, try_exclusive_lock
from ..models import Delivery, OutboxEntryRow, SyncReport, utcnow
from . import files
from .entry import EnqueueResult, EventSink, FlushResult, Kind, OutboxEntry, entry_id
from .outcome import Outcome
from .report import build_report, done_row, entry_row

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    """The durable delivery queue under ``<state>/outbox``; safe to share between servers on one root."""

    def __init__(self, state_dir: Path, settings: SyncSettings, on_event: EventSink | None = None) -> None:
        self.dir = state_dir / "outbox"
        self.settings = settings
        self.on_event = on_event

    # -- paths ---------------------------------------------------------------------------------
    def _entry_path(self, eid: str) -> Path:
        return self.dir / f"{eid}.json"

    def _ledger_path(self, eid: str) -> Path:
        return self.dir / "ledger" / f"{eid}.json"

    def _dead_path(self, eid: str) -> Path:
        return self.dir / "dead" / f"{eid}.json"

    def _lock_path(self, eid: str) -> Path:
        return self.dir / "locks" / f"{eid}.lock"

    @property
    def dead_letter_file(self) -> Path:
        return self.dir / "dead-letter.jsonl"

    def _read(self, eid: str) -> OutboxEntry | None:
        """The entry ``eid``, or ``None`` when there is none.

        Raises:
            ValueError: the file is not a valid entry (pydantic's error is a ``ValueError``).
            OSError: it cannot be read.
        """
        data = files.read_json(self._entry_path(eid))
        return None if data is None else OutboxEntry.model_validate(data)

    def _read_checked(self, eid: str) -> OutboxEntry | None:
        """:meth:`_read`, for callers that change the entry.

        Raises:
            CorruptRecordError: the file is not a valid entry; it is left untouched.
            OSError: it cannot be read.
        """
        try:
            return self._read(eid)
        except ValueError as e:
            raise CorruptRecordError(self._entry_path(eid), str(e).splitlines()[0]) from e

    def _write(self, entry: OutboxEntry) -> None:
        files.write_json(self._entry_path(entry.id), entry.model_dump(mode="json"))

    def _load_all(self, unreadable: list[str] | None = None) -> list[OutboxEntry]:
        """Every readable entry, oldest first; the ids of unreadable ones go to ``unreadable``."""
        out: list[OutboxEntry] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                entry = self._read(path.stem)
            except (ValueError, OSError) as e:  # left as it is, never overwritten
                log.warning("outbox entry %s cannot be read: %s", path, e)
                if unreadable is not None:
                    unreadable.append(path.stem)
                continue
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.created_ns, e.id))

    # -- queries -------------------------------------------------------------------------------
    def is_delivered(self, workspace: str, run: int, kind: Kind) -> bool:
        """Whether the ledger holds that delivery."""
        return self._ledger_path(entry_id(workspace, run, kind)).exists()

    def delivery_of(self, workspace: str, run: int) -> Delivery | None:
        """Where the branch of ``workspace`` last went, as of run ``run``: the ledger of its newest
        delivered branch (the one record of a delivery; status and the endpoint's records read it)."""
        for n in range(run, 0, -1):
            path = self._ledger_path(entry_id(workspace, n, "git"))
            try:
                data = files.read_json(path)
            except (ValueError, OSError) as e:
                log.warning("the ledger file %s cannot be read: %s", path, e)
                continue
            found = data.get("delivery") if data is not None else None
            if found:
                try:
                    return Delivery.model_validate(found)
                except ValidationError as e:
                    log.warning("the ledger file %s holds no delivery: %s", path, e)
        return None

    def entries(self, workspace: str | None = None) -> list[OutboxEntry]:
        """The entries still to deliver (pending or needing attention), oldest first."""
        return [e for e in self._load_all() if workspace is None or e.workspace == workspace]

    def next_due(self) -> float | None:
        """When the earliest pending entry is due (epoch seconds); ``None`` when nothing is pending."""
        due = [e.next_attempt_at for e in self._load_all() if e.state == "pending"]
        return min(due) if due else None

    # -- changes -------------------------------------------------------------------------------
    def enqueue(
        self,
        workspace: str,
        run: int,
        kind: Kind,
        *,
        payload: dict[str, Any] | None = None,
        force: bool = False,
        now: float | None = None,
    ) -> EnqueueResult:
        """Queue the delivery of ``kind`` for run ``run`` of ``workspace`` (due at once).

        A delivery already in the ledger is not queued again, nor is one already queued. With
        ``force``, an entry that needs attention or was dead-lettered is queued afresh (for a
        branch: a push that may overwrite the branch). ``payload`` is kept with the entry (the
        dispatch record as it was when the run finished).

        Raises:
            InvalidInputError: ``workspace`` is not a workspace name.
            CorruptRecordError: the entry's file is not a valid entry; it is left untouched.
            OSError: the outbox folder cannot be written.
        """
        eid = entry_id(workspace, run, kind)
        if self._ledger_path(eid).exists():
            return "delivered"
        if not force:
            existing = self._read_checked(eid)
            if existing is not None:
                return "already-queued" if existing.state == "pending" else "attention"
            if self._dead_path(eid).exists():
                return "dead-lettered"
        with exclusive_lock(self._lock_path(eid)):
            return self._enqueue_locked(eid, workspace, run, kind, payload, force, self._now(now))

    def _enqueue_locked(
        self, eid: str, workspace: str, run: int, kind: Kind, payload: dict[str, Any] | None, force: bool, now: float
    ) -> EnqueueResult:
        if self._ledger_path(eid).exists():
            return "delivered"
        existing = self._read_checked(eid)
        if existing is not None:
            if not force:
                return "already-queued" if existing.state == "pending" else "attention"
            self._write(self._revived(existing, True, now))
            return "requeued"
        if self._dead_path(eid).exists():
            if not force:
                return "dead-lettered"
            files.remove(self._dead_path(eid))
        entry = OutboxEntry(
            id=eid,
            workspace=workspace,
            run=run,
            kind=kind,
            created_ns=time.time_ns(),
            next_attempt_at=now,
            force=force,
            payload=payload,
        )
        self._write(entry)
        return "queued"

    @staticmethod
    def _revived(entry: OutboxEntry, force: bool, now: float) -> OutboxEntry:
        return entry.model_copy(
            update={"state": "pending", "attempts": 0, "next_attempt_at": now, "what_to_do": None, "force": force}
        )

    def retry(self, eid: str, *, force: bool = False, now: float | None = None) -> bool:
        """Queue again, at once and with fresh attempts, an entry that needs attention or was
        dead-lettered (a person fixed the cause). Returns whether there was such an entry.

        Raises:
            OSError: the outbox folder cannot be written.
            CorruptRecordError: the entry (or dead-letter) file is not a valid entry; it is left untouched.
        """
        with exclusive_lock(self._lock_path(eid)):
            entry = self._read_checked(eid)
            if entry is None:
                if self._ledger_path(eid).exists():
                    return False
                try:
                    dead = files.read_json(self._dead_path(eid))
                    if dead is None:
                        return False
                    entry = OutboxEntry.model_validate(dead.get("entry"))
                except ValueError as e:
                    raise CorruptRecordError(self._dead_path(eid), str(e).splitlines()[0]) from e
            elif entry.state == "pending" and not force:
                return False
            self._write(self._revived(entry, force or entry.force, self._now(now)))
            files.remove(self._dead_path(eid))
            return True

    # -- flushing ------------------------------------------------------------------------------
    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else now

    def flush(
        self,
        deliver: Callable[[OutboxEntry], Outcome],
        *,
        now: float | None = None,
        only: str | None = None,
        stop: threading.Event | None = None,
    ) -> FlushResult:
        """Try every due pending entry (of workspace ``only``, if given), oldest first, with ``deliver``.

        A run's record waits while that run's branch is still pending, so the record can say
        where the branch went. ``deliver`` returns an :class:`Outcome`; an error it raises
        (``DispatchError``, ``OSError``) counts as a transient failure. ``stop`` (set at shutdown)
        ends the pass between two entries. ``now`` (epoch seconds) is for tests; by default the
        clock is read after each attempt.

        Raises:
            OSError: the outbox folder cannot be written.
        """
        result = FlushResult()
        entries = self._load_all(result.unreadable)
        branch_pending = {(e.workspace, e.run) for e in entries if e.kind == "git" and e.state == "pending"}
        for entry in entries:
            if stop is not None and stop.is_set():
                break
            if only is not None and entry.workspace != only:
                continue
            if entry.state != "pending" or entry.next_attempt_at > self._now(now):
                continue
            if entry.kind == "record" and (entry.workspace, entry.run) in branch_pending:
                continue
            if self._attempt(entry.id, deliver, now, result) != "pending" and entry.kind == "git":
                branch_pending.discard((entry.workspace, entry.run))
        return result

    def _attempt(
        self, eid: str, deliver: Callable[[OutboxEntry], Outcome], now: float | None, result: FlushResult
    ) -> str:
        """Deliver entry ``eid`` once under its lock; returns its state afterwards."""
        with try_exclusive_lock(self._lock_path(eid)) as lock:
            if lock is None:
                result.busy.append(eid)
                return "pending"
            try:
                entry = self._read(eid)  # again, under the lock: another server may have finished it
            except ValueError:
                result.unreadable.append(eid)
                return "pending"
            if entry is None or self._ledger_path(eid).exists():
                files.remove(self._entry_path(eid))
                lock.remove_on_release = True
                return "delivered"
            if entry.state != "pending" or entry.next_attempt_at > self._now(now):
                return entry.state
            try:
                outcome = deliver(entry)
            except (DispatchError, OSError) as e:
                outcome = Outcome.transient(f"{type(e).__name__}: {e}")
            state = self._apply(entry, outcome, self._now(now), result)
            lock.remove_on_release = state in ("delivered", "dead-lettered")
            return state

    def _apply(self, entry: OutboxEntry, outcome: Outcome, now: float, result: FlushResult) -> str:
        if outcome.kind == "delivered":
            ledger = {
                **self._identity(entry),
                "delivered_at": utcnow(),
                "attempts": entry.attempts + 1,
                "detail": outcome.detail,
                "delivery": outcome.delivery.model_dump() if outcome.delivery else None,
            }
            files.write_json(self._ledger_path(entry.id), ledger)
            files.remove(self._entry_path(entry.id))
            result.delivered.append(entry.id)
            self._event("delivered", entry, outcome.detail)
            return "delivered"
        entry.attempts += 1
        entry.last_error = outcome.reason
        if outcome.kind == "permanent":
            entry.state = "attention"
            entry.what_to_do = outcome.what_to_do
            self._write(entry)
            result.attention.append(entry.id)
            self._event("needs-attention", entry, outcome.reason)
            return "attention"
        if entry.attempts >= self.settings.max_attempts:
            self._dead_letter(entry, outcome.reason)
            result.dead_lettered.append(entry.id)
            return "dead-lettered"
        backoff = self.settings.backoff_seconds
        delay = backoff[min(entry.attempts - 1, len(backoff) - 1)]
        entry.next_attempt_at = now + max(delay, outcome.retry_after or 0.0)
        self._write(entry)
        result.retrying.append(entry.id)
        return "pending"

    def _dead_letter(self, entry: OutboxEntry, reason: str) -> None:
        """Give up on ``entry``: an audit line, a marker that keeps enqueue a no-op, the entry removed."""
        line = {
            "at": utcnow(),
            **self._identity(entry),
            "attempts": entry.attempts,
            "reason": reason,
            "entry": entry.model_dump(mode="json"),
        }
        files.append_line(self.dead_letter_file, line)
        files.write_json(self._dead_path(entry.id), line)
        files.remove(self._entry_path(entry.id))
        self._event("dead-lettered", entry, reason)

    @staticmethod
    def _identity(entry: OutboxEntry) -> dict[str, Any]:
        return {"id": entry.id, "workspace": entry.workspace, "run": entry.run, "kind": entry.kind}

    def _event(self, kind: str, entry: OutboxEntry, reason: str | None) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, entry, reason)
        except (DispatchError, OSError) as e:  # the state is on disk already; an event lost is logged
            log.warning("outbox event %s for %s not recorded: %s", kind, entry.id, e)

    # -- reporting -----------------------------------------------------------------------------
    def rows(self, workspace: str | None = None) -> list[OutboxEntryRow]:
        """One row per (workspace, run, kind) the outbox knows: pending, attention, dead-lettered, delivered."""
        rows = [entry_row(e) for e in self.entries(workspace)]
        for folder, state in ((self.dir / "dead", "dead-lettered"), (self.dir / "ledger", "delivered")):
            for path in sorted(folder.glob("*.json")):
                try:
                    data = files.read_json(path)
                    row = done_row(data, state) if data else None
                except (ValueError, KeyError, TypeError, OSError) as e:
                    log.warning("outbox file %s cannot be read: %s", path, e)
                    continue
                if row is not None and (workspace is None or row.workspace == workspace):
                    rows.append(row)
        return sorted(rows, key=lambda r: (r.workspace, r.run, r.kind))

    def report(self, workspace: str | None = None) -> SyncReport:
        """Where every delivery (of ``workspace``, if given) stands, per workspace and per entry."""
        unreadable: list[str] = []
        self._load_all(unreadable)
        return build_report(self.rows(workspace), unreadable)
