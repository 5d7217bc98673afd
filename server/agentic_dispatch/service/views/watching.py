"""Watching many runs: the events log is the change feed.

Every transition is one line of ``events/events.jsonl`` (dispatched, queued, started, blocked,
completed, failed, cancelled, resumed, and the deliveries). A cursor is a byte offset into that
file, so a caller chaining watches misses nothing between two calls, a cursor outlives a server
restart, and another server's changes on the same root are seen too (they append to the file).

Also what the MCP front end's resources read (the workspace list, one row, the last prompt) and
:meth:`Watching.follow`, which the front end's subscription feed calls to tail that file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from ...errors import InvalidInputError, WorkspaceNotFoundError
from ...models import (
    ACTIVE_STATUSES,
    MAX_LISTED,
    MAX_WATCH_SECONDS,
    Change,
    EventKind,
    Status,
    WatchResult,
    WorkspaceRow,
)
from ...safefs import read_range
from ...store import StatusStore
from .status import Reports

__all__ = [
    "MAX_LISTED",
    "MAX_PROMPT_BYTES",
    "MAX_WATCH_SECONDS",
    "ListedWorkspace",
    "Watching",
    "WorkspaceList",
    "describe",
]

MAX_PROMPT_BYTES = 60 * 1024  # of a prompt file in one reply


class ListedWorkspace(BaseModel):
    name: str
    status: str
    agent: str | None = None
    updated_at: str | None = None


class WorkspaceList(BaseModel):
    """The workspaces, most recently updated first (at most ``MAX_LISTED``)."""

    workspaces: list[ListedWorkspace]
    total: int = Field(description="how many workspaces there are")
    note: str | None = None


class Watching:
    """Changes since a cursor, and waiting (bounded) for the next one."""

    def __init__(self, store: StatusStore, finished: threading.Condition, reports: Reports):
        self.store = store
        self._finished = finished  # notified after each run that ends in this process
        self._rows = reports.rows  # the status rows of these workspaces

    def _end(self) -> int:
        return self.store.events.size()

    def parse_cursor(self, cursor: str | None) -> int:
        """Raises:
        InvalidInputError: not a cursor agentic_watch returned.
        """
        if cursor is None:
            return self._end()
        if not cursor.isdigit() or len(cursor) > 18 or int(cursor) > self._end():
            raise InvalidInputError(
                "cursor",
                f"{cursor[:40]!r} is not a cursor of this server; pass the one agentic_watch returned, or none.",
            )
        return int(cursor)

    def changes(self, since: int, names: set[str] | None) -> tuple[list[Change], int]:
        """The transitions logged after byte ``since`` (of ``names``' workspaces, when given) and the
        offset after the last whole line read."""
        events, end = self.store.events.read(since)
        out = [
            Change(
                at=e.at,
                workspace=e.workspace,
                kind=e.kind.value,
                status=e.status,
                runs=e.runs,
                # "no activity for N s", why an attempt is retried, why a queued run still waits
                reason=e.reason if e.kind in (EventKind.STALLED, EventKind.RETRYING, EventKind.QUEUED) else None,
            )
            for e in events
            if names is None or e.workspace in names
        ]
        return out, end

    def watch(
        self,
        workspaces: list[str] | None,
        timeout: float,
        cursor: str | None,
        on_change: Callable[[Change], None],
        poll: Callable[[], None] | None = None,
    ) -> WatchResult:
        """Wait until a watched workspace changes (or ``timeout``); return the changes since ``cursor``.

        No ``workspaces``: everything queued or running now (and what is dispatched meanwhile).

        Raises:
            InvalidInputError: a bad timeout or cursor, or a malformed name.
            WorkspaceNotFoundError: a named workspace does not exist.
        """
        if not 0 <= timeout <= MAX_WATCH_SECONDS:
            raise InvalidInputError(
                "timeout_seconds", f"must be 0 to {MAX_WATCH_SECONDS} (hosts cut longer calls off)."
            )
        start = self.parse_cursor(cursor)
        for name in workspaces or []:
            self.store.read(name)  # a bad or unknown name is named before any wait
        names = set(workspaces) if workspaces else None
        watched = sorted(names) if names else [i.name for i in self.store.active()]
        settled = bool(watched) and not self._any_active(watched)
        if settled:
            timeout = 0  # everything watched has finished: nothing changes until someone acts
        deadline = time.monotonic() + timeout
        found, end = self.changes(start, names)
        while not found and time.monotonic() < deadline:
            if poll is not None:  # no exit watcher in this process: look at the containers
                poll()
            with self._finished:
                self._finished.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            found, end = self.changes(start, names)
        found = [self.explain(c) for c in found]
        for change in found:
            on_change(change)
        watched = sorted(set(watched) | {c.workspace for c in found})
        return WatchResult(
            changes=found,
            cursor=str(end),
            workspaces=self._rows(watched),
            timed_out=not found,
            message=self._message(found, watched, settled),
        )

    def single(self, workspace: str, start: int, row: WorkspaceRow) -> WatchResult:
        """What a wait for one workspace saw: its changes since byte ``start``, and its row now."""
        found, end = self.changes(start, {workspace})
        found = [self.explain(c) for c in found]
        active = row.status in ACTIVE_STATUSES
        message = "; ".join(describe(c) for c in found) or f"{workspace}: {row.status}, no change"
        if active:
            message += "; still active: call again (with the cursor) to go on waiting"
        return WatchResult(changes=found, cursor=str(end), workspaces=[row], timed_out=active, message=message)

    def follow(self, since: int | None) -> tuple[list[Change], int]:
        """The changes after byte ``since`` (``None``: from now on) and the offset to pass next time;
        a log that shrank (replaced by hand) is followed from its new end."""
        end = self._end()
        if since is None or since > end:
            return [], end
        return self.changes(since, None)

    def row(self, workspace: str) -> WorkspaceRow:
        """One workspace's status row.

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: no such workspace.
        """
        rows = self._rows([workspace]) if self.store.exists(workspace) else []
        if not rows:
            raise WorkspaceNotFoundError(workspace)
        return rows[0]

    def listing(self, limit: int = MAX_LISTED) -> WorkspaceList:
        """Name, status, agent and last update of the ``limit`` most recently updated workspaces."""
        self.store.catch_up()
        total = sum(self.store.counts().values())
        rows = [
            ListedWorkspace(name=i.name, status="unreadable")
            if i.record is None
            else ListedWorkspace(
                name=i.name, status=i.record.status.value, agent=i.record.agent, updated_at=i.record.updated_at
            )
            for i in self.store.query(None, limit)
        ]
        note = None
        if total > len(rows):
            note = f"the {len(rows)} most recently updated of {total}; agentic_status filters by status"
        return WorkspaceList(workspaces=rows, total=total, note=note)

    def prompt(self, workspace: str) -> str:
        """The exact prompt of the workspace's last run (its first ``MAX_PROMPT_BYTES``).

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: no such workspace.
            UnsafePathError: the prompt file is a link or not a regular file.
        """
        rec = self.store.read(workspace)
        ws = self.store.paths(workspace)
        got = read_range(ws.dir, ws.prompt(rec.runs), 0, MAX_PROMPT_BYTES)
        if got is None:
            return f"(run {rec.runs} of {workspace} has no prompt file)"
        data, _, size = got
        text = data.decode("utf-8", errors="replace")
        if size > len(data):
            text += f"\n\n(cut: the first {len(data)} of {size} bytes; the whole file is {ws.prompt(rec.runs)})"
        return text

    def _any_active(self, names: list[str]) -> bool:
        for name in names:
            try:
                if self.store.read(name).status in (Status.QUEUED, Status.RUNNING):
                    return True
            except (WorkspaceNotFoundError, ValueError):
                continue
        return False

    def explain(self, change: Change) -> Change:
        """``change`` with the question or reason it had (while that run is still the workspace's last)."""
        if change.kind not in (Status.BLOCKED, Status.FAILED, Status.CANCELLED):
            return change
        try:
            rec = self.store.read(change.workspace)
        except (WorkspaceNotFoundError, ValueError):
            return change
        if rec.runs != change.runs:
            return change
        return change.model_copy(update={"question": rec.question, "reason": rec.reason})

    @staticmethod
    def _message(found: list[Change], watched: list[str], settled: bool) -> str:
        if found:
            return "; ".join(describe(c) for c in found)
        if settled:
            return f"the {len(watched)} watched workspace(s) have all finished: nothing changes until one is resumed."
        if not watched:
            return "nothing is queued or running: nothing to watch. Dispatch something, or name workspaces."
        return f"no change in {len(watched)} watched workspace(s); call again with the cursor to go on watching."


def describe(change: Change) -> str:
    """One line for a person: ``org/repo/task-5: blocked — Which database?``."""
    text = f"{change.workspace}: {change.kind}"
    why = change.question or change.reason
    return f"{text} — {why[:200]}" if why else text
