"""The outbox's entry: one delivery (a run's branch, or a run's record) still to make."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..naming import split_workspace_name

__all__ = ["EnqueueResult", "EventSink", "FlushResult", "Kind", "OutboxEntry", "entry_id"]

Kind = Literal["git", "record"]
# What enqueue did: queued (new), already-queued (pending already), requeued (forced afresh), or why
# it did nothing: attention (a person must act first), delivered (in the ledger), dead-lettered.
EnqueueResult = Literal["queued", "already-queued", "requeued", "attention", "delivered", "dead-lettered"]


class OutboxEntry(BaseModel):
    """One entry file of the outbox (``<state>/outbox/<id>.json``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    workspace: str
    run: int
    kind: Kind
    created_ns: int  # orders the queue: oldest first
    attempts: int = 0
    next_attempt_at: float  # epoch seconds
    last_error: str | None = None
    state: Literal["pending", "attention"] = "pending"
    what_to_do: str | None = None  # attention: what a person should do
    force: bool = False  # git: the push may overwrite the branch
    payload: dict[str, Any] | None = None  # record: the dispatch record as it was at enqueue time


# Called after a change is on disk: (event kind: "delivered" | "needs-attention" | "dead-lettered",
# the entry, the reason or what was delivered).
EventSink = Callable[[str, OutboxEntry, str | None], None]


@dataclass
class FlushResult:
    """What one flush pass did, by entry id."""

    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # another server (or thread) was delivering it
    unreadable: list[str] = field(default_factory=list)


def entry_id(workspace: str, run: int, kind: Kind) -> str:
    """The id (and file name) of the entry for ``kind`` of run ``run`` of ``workspace``.

    Raises:
        InvalidInputError: ``workspace`` is not a workspace name.
    """
    slug = split_workspace_name(workspace)[2]
    digest = hashlib.sha256(f"{workspace}\n{run}\n{kind}".encode()).hexdigest()[:12]
    return f"{slug}-r{run}-{kind}-{digest}"
