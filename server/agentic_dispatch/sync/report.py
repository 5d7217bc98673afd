"""The sync report: where each workspace's deliveries stand, from the outbox's files."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..models import Delivery, OutboxEntryRow, SyncReport
from .entry import OutboxEntry

__all__ = ["build_report", "done_row", "entry_row"]

# A workspace is listed once, under the state of its worst delivery.
_ORDER = ("attention", "dead-lettered", "pending", "delivered")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def entry_row(e: OutboxEntry) -> OutboxEntryRow:
    """The row of an entry still in the queue."""
    return OutboxEntryRow(
        id=e.id,
        workspace=e.workspace,
        run=e.run,
        kind=e.kind,
        state=e.state,
        attempts=e.attempts,
        next_attempt_at=iso(e.next_attempt_at) if e.state == "pending" else None,
        last_error=e.last_error,
        what_to_do=e.what_to_do,
    )


def done_row(data: dict[str, Any], state: str) -> OutboxEntryRow:
    """The row of a ledger file (``delivered``) or a dead-letter file (``dead-lettered``).

    Raises:
        KeyError, TypeError, ValueError (pydantic's ValidationError): the file lacks a field.
    """
    delivery = data.get("delivery")
    return OutboxEntryRow(
        id=data["id"],
        workspace=data["workspace"],
        run=data["run"],
        kind=data["kind"],
        state=state,
        attempts=data.get("attempts", 0),
        last_error=data.get("reason"),
        delivered_at=data.get("delivered_at"),
        detail=data.get("detail"),
        delivery=Delivery.model_validate(delivery) if delivery else None,
    )


def _describe(row: OutboxEntryRow) -> str:
    what = f"{row.workspace} ({'branch' if row.kind == 'git' else 'record'} of run {row.run})"
    if row.state == "attention":
        return f"{what} needs attention: {row.last_error}" + (f" — {row.what_to_do}" if row.what_to_do else "")
    if row.state == "dead-lettered":
        return f"{what} was given up after {row.attempts} attempts: {row.last_error}"
    return f"{what} is pending ({row.attempts} attempts so far, next at {row.next_attempt_at}): {row.last_error}"


def build_report(rows: list[OutboxEntryRow], unreadable: list[str]) -> SyncReport:
    """A report of ``rows``: each workspace under its worst state, the next retry, what needs a person."""
    worst: dict[str, str] = {}
    for row in rows:
        current = worst.get(row.workspace)
        if current is None or _ORDER.index(row.state) < _ORDER.index(current):
            worst[row.workspace] = row.state
    by_state = {state: sorted(w for w, s in worst.items() if s == state) for state in _ORDER}
    pending_at = [r.next_attempt_at for r in rows if r.state == "pending" and r.next_attempt_at]
    counts = ", ".join(f"{len(by_state[s])} {s}" for s in reversed(_ORDER) if by_state[s]) or "nothing to deliver"
    lines = [f"Deliveries by workspace: {counts}."]
    lines += [_describe(r) for r in rows if r.state != "delivered" and (r.state != "pending" or r.last_error)]
    if unreadable:
        lines.append(f"Unreadable outbox entries (left as they are): {', '.join(unreadable)}.")
    return SyncReport(
        delivered=by_state["delivered"],
        pending=by_state["pending"],
        attention=by_state["attention"],
        dead_lettered=by_state["dead-lettered"],
        next_retry_at=min(pending_at) if pending_at else None,
        message="\n".join(lines),
        details={"unreadable": unreadable} if unreadable else {},
        entries=rows,
    )
