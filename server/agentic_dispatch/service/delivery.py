"""Delivery: bringing finished runs home through the outbox (``sync/``).

A run that ends for good is enqueued when ``[sync] auto`` is on, or when someone calls
``agentic_sync``: its branch (``completed`` runs, after the QA gate, when ``[sync] push``) and
its record (every finished run, when ``[sync] endpoint`` is set). One background thread
flushes what is due; ``agentic_sync`` flushes on demand. What was delivered is written into
the workspace's record (``delivery``), and every delivery, refusal and dead letter is an event.
"""

from __future__ import annotations

import logging
import threading
import time

from ..config import Paths, SyncSettings
from ..errors import CorruptRecordError, DispatchError, InvalidInputError, StateError, WorkspaceNotFoundError
from ..models import ACTIVE_STATUSES, Delivery, Event, EventKind, Status, SyncReport, WorkspaceRecord
from ..store import StatusStore
from ..sync import (
    GitDeliverer,
    Outbox,
    OutboxEntry,
    Outcome,
    RecordPoster,
    delivery_target,
    record_payload,
    redact_url,
)
from ..sync import view_commands as delivery_view_commands
from ..sync.shim import read_ref_value

__all__ = ["ResultDelivery"]

log = logging.getLogger(__name__)


class ResultDelivery:
    """The outbox, its two deliverers, and the loop that flushes them."""

    def __init__(self, settings: SyncSettings, paths: Paths, store: StatusStore) -> None:
        self.settings = settings
        self.store = store
        self.outbox = Outbox(paths.state, settings, on_event=self._event)
        self.git = GitDeliverer(paths.state, settings.git_timeout_seconds)
        self.poster = RecordPoster(settings)
        self._flushing = threading.Lock()  # one flush at a time in this process (the outbox guards others)
        self._wake = threading.Event()

    # -- what goes in ------------------------------------------------------------------------
    def enqueue_run(self, rec: WorkspaceRecord, force: bool = False, include_checkpoints: bool = False) -> None:
        """Queue what is to be delivered of ``rec``'s last run (no-op for what the ledger has).

        The branch goes when the run completed and its tip is not an automatic checkpoint, or, with
        ``include_checkpoints``, also when the run was stopped and its work kept as a checkpoint."""
        if rec.status in ACTIVE_STATUSES:
            return
        if self.settings.push and self._branch_goes(rec, include_checkpoints):
            self.outbox.enqueue(rec.name, rec.runs, "git", force=force)
        if self.settings.endpoint:
            self.outbox.enqueue(rec.name, rec.runs, "record", payload=record_payload(rec, self.settings.agent_id))
        self._wake.set()

    def _branch_goes(self, rec: WorkspaceRecord, include_checkpoints: bool) -> bool:
        if include_checkpoints:
            return rec.status == Status.COMPLETED or rec.checkpoint is not None
        return rec.status == Status.COMPLETED and not self._ends_in_checkpoint(rec)

    def _ends_in_checkpoint(self, rec: WorkspaceRecord) -> bool:
        """Whether the branch's tip is still the run's automatic checkpoint (a resumed run that
        completed without a commit of its own)."""
        if rec.checkpoint is None:
            return False
        try:
            tip = read_ref_value(self.store.paths(rec.name).repo, f"refs/heads/{rec.branch}")
        except (DispatchError, OSError):
            return False  # the delivery itself will say what is wrong with the clone
        return tip == rec.checkpoint.commit

    def after_run(self, rec: WorkspaceRecord) -> None:
        """A run ended for good: with ``[sync] auto``, its delivery starts now."""
        if self.settings.auto:
            self.enqueue_run(rec)

    # -- delivering ----------------------------------------------------------------------------
    def _deliver(self, entry: OutboxEntry) -> Outcome:
        try:
            rec = self.store.read(entry.workspace)
        except WorkspaceNotFoundError:
            return Outcome.permanent(f"the workspace {entry.workspace} is gone", "nothing is left to deliver")
        except CorruptRecordError as e:
            return Outcome.permanent(str(e), "repair or remove the workspace's status.json, then call agentic_sync")
        if entry.kind == "record":  # it carries where the run's branch went, as the ledger has it now
            return self.poster.deliver(entry, self.outbox.delivery_of(entry.workspace, entry.run))
        return self.git.deliver(rec, self.store.paths(rec.name).repo, force=entry.force, run=entry.run)

    def delivery_of(self, rec: WorkspaceRecord) -> Delivery | None:
        """Where ``rec``'s branch last went (the outbox's ledger is the one record of it)."""
        return self.outbox.delivery_of(rec.name, rec.runs)

    def _event(self, kind: str, entry: OutboxEntry, reason: str | None) -> None:
        try:
            rec = self.store.read(entry.workspace)
        except (WorkspaceNotFoundError, CorruptRecordError):
            return
        event = Event(
            kind=EventKind(kind),
            workspace=rec.name,
            agent=rec.agent,
            status=rec.status.value,
            runs=rec.runs,
            delivery=entry.kind,
            run=entry.run,
            entry=entry.id,
            reason=reason,
        )
        try:
            self.store.events.append(event)
        except OSError as e:  # the outbox holds the truth; watchers miss this one line
            log.error("cannot write the %s event of %s: %s", kind, rec.name, e)

    def flush(self, only: str | None = None, stop: threading.Event | None = None) -> None:
        """Deliver every due entry now (of ``only``'s workspace, when given)."""
        with self._flushing:
            self.outbox.flush(self._deliver, only=only, stop=stop)

    def run(self, stop: threading.Event) -> None:
        """The background loop: flush what is due, then sleep until the next entry is due (at most
        ``[sync] flush_interval_seconds``) or something is enqueued."""
        while not stop.is_set():
            try:
                self.flush(stop=stop)
                due = self.outbox.next_due()
            except Exception:  # the one top-level boundary of this background task
                log.exception("sync flush failed; retrying on the next pass")
                due = None
            wait = self.settings.flush_interval_seconds
            if due is not None:
                wait = min(wait, max(0.05, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    # -- agentic_sync ------------------------------------------------------------------------
    def sync(
        self, workspace: str | None = None, force: bool = False, wait: float = 0.0, include_checkpoints: bool = False
    ) -> SyncReport:
        """Queue every finished run not yet delivered (of ``workspace``, when given), retry that
        workspace's entries that needed attention, deliver what is due now, and report. With
        ``wait``, keep delivering what is pending as it comes due, up to that many seconds.

        ``force`` (one workspace only) lets the branch overwrite one of the same name that is not
        an ancestor of it, in a retry of an entry refused as non-fast-forward too.
        ``include_checkpoints`` delivers also branches that end in an automatic checkpoint (the
        uncommitted work of a stopped run), which are otherwise held back.

        Raises:
            WorkspaceNotFoundError: ``workspace`` does not exist.
            InvalidInputError: ``force`` without a workspace, or a negative ``wait``.
            StateError: ``force`` where the branch holds another workspace's delivery.
        """
        if wait < 0:
            raise InvalidInputError("wait", "must be 0 or more seconds.")
        if force and workspace is None:
            raise InvalidInputError("force", "needs a workspace: name the one whose branch may overwrite theirs.")
        records = [self.store.read(workspace)] if workspace is not None else self._finished_records()
        if force:
            self._check_force(records[0])
        for rec in records:
            self.enqueue_run(rec, force=force, include_checkpoints=include_checkpoints)
        if workspace is not None:
            for entry in self.outbox.entries(workspace):
                if entry.state == "attention":
                    self.outbox.retry(entry.id, force=force)
        self.flush(only=workspace)
        deadline = time.monotonic() + wait
        while (due := self._next_due(workspace)) is not None and time.monotonic() < deadline:
            time.sleep(max(0.0, min(due - time.time(), deadline - time.monotonic())))
            self.flush(only=workspace)
        report = self.outbox.report(workspace)
        if workspace is not None and not report.entries:
            rec = records[0]
            why = "it is still running" if rec.status in ACTIVE_STATUSES else self._nothing_to_deliver(rec)
            report.message = f"{workspace}: nothing to deliver ({why})."
        held = [] if include_checkpoints else [r for r in records if self._held_checkpoint(r)]
        for rec in held[:5]:
            assert rec.checkpoint is not None
            report.message += (
                f" {rec.name}: its branch ends in an automatic checkpoint ({rec.checkpoint.why}, "
                f"{rec.checkpoint.commit[:12]}) and is held back: look at it with agentic_diff, resume the agent, "
                "or sync with include_checkpoints=true to deliver it."
            )
        return report

    def _held_checkpoint(self, rec: WorkspaceRecord) -> bool:
        """A finished run whose branch is held back only because it ends in an automatic checkpoint."""
        if not self.settings.push or rec.checkpoint is None or rec.status in ACTIVE_STATUSES:
            return False
        if self.outbox.is_delivered(rec.name, rec.runs, "git"):
            return False
        return rec.status != Status.COMPLETED or self._ends_in_checkpoint(rec)

    def _check_force(self, rec: WorkspaceRecord) -> None:
        """A force may overwrite a branch of the user's, never one this server delivered for another
        workspace: that would leave the other agent's delivered commit on no branch.

        Raises:
            StateError: the branch holds another workspace's delivery, named with what to do.
        """
        try:
            remote = redact_url(delivery_target(rec)[0])
        except InvalidInputError:
            return  # the delivery itself will say what is wrong with the record
        for row in self.outbox.rows():
            d = row.delivery
            if row.kind == "git" and row.workspace != rec.name and d and (d.remote, d.branch) == (remote, rec.branch):
                raise StateError(
                    f"{rec.branch} in {remote} holds the delivery of {row.workspace} (commit {d.commit[:12]}, "
                    f"{d.at}); a force would leave that agent's work on no branch. Compare the two, then rename "
                    f"or delete that branch there yourself if this one should take its place."
                )

    def _next_due(self, workspace: str | None) -> float | None:
        due = [e.next_attempt_at for e in self.outbox.entries(workspace) if e.state == "pending"]
        return min(due) if due else None

    def _finished_records(self) -> list[WorkspaceRecord]:
        self.store.refresh()
        finished = [s.value for s in Status if s not in ACTIVE_STATUSES]
        return [i.record for i in self.store.query(finished) if i.record is not None]

    def _nothing_to_deliver(self, rec: WorkspaceRecord) -> str:
        if rec.status != Status.COMPLETED and not self.settings.endpoint:
            return f"it ended {rec.status}: only completed runs deliver their branch, and no [sync] endpoint is set"
        return "[sync] push is off and no [sync] endpoint is set"

    # -- what status shows ---------------------------------------------------------------------
    def states(self) -> dict[str, str]:
        """Per workspace with deliveries still to make: where they stand, in a few words."""
        out: dict[str, str] = {}
        for entry in self.outbox.entries():
            what = "branch" if entry.kind == "git" else "record"
            if entry.state == "attention":
                text = f"{what} needs attention: {entry.last_error}"
            else:
                text = f"{what} pending (attempt {entry.attempts + 1})" + (
                    f", last error: {entry.last_error}" if entry.last_error else ""
                )
            out.setdefault(entry.workspace, text)
        return out

    @staticmethod
    def view_commands(rec: WorkspaceRecord, delivery: Delivery | None) -> list[str]:
        """Commands (and a review link) to look at ``rec``'s delivered branch where it went."""
        if delivery is None:
            return []
        try:
            _, local = delivery_target(rec)
        except InvalidInputError:
            return []
        return delivery_view_commands(rec, delivery, local)
