"""Control: cancel one workspace; freeze and unfreeze the queue."""

from __future__ import annotations

from ..models import CancelResult, QueueState, Status, WorkspaceRecord, utcnow
from ..scheduler import Scheduler
from ..store import StatusStore
from .drain import QueueDrainer
from .finalise import Finaliser

__all__ = ["Control"]


class Control:
    """Stopping work a person asked to stop."""

    def __init__(self, store: StatusStore, scheduler: Scheduler, drainer: QueueDrainer, finaliser: Finaliser) -> None:
        self.store = store
        self.scheduler = scheduler
        self.drainer = drainer
        self.finaliser = finaliser

    def cancel(self, workspace: str) -> CancelResult:
        """Cancel a workspace: a queued one never starts, a running one is stopped; others are left as they are.

        Raises:
            WorkspaceNotFoundError: no such workspace.
        """
        self.store.paths(workspace)

        def dequeue(rec: WorkspaceRecord) -> bool:
            if rec.status != Status.QUEUED:
                return False
            rec.status = Status.CANCELLED
            rec.question = "cancelled before it started"
            rec.finished_at = utcnow()
            return True

        with self.scheduler.admission():  # so a drain cannot start it while we look
            rec = self.store.read(workspace)
            if rec.status == Status.QUEUED:
                rec = self.store.update(workspace, dequeue)
                return CancelResult(
                    workspace=workspace, status=rec.status, changed=True, message="removed from the queue"
                )
        if rec.status == Status.RUNNING and self.finaliser.stop_run(
            workspace, Status.CANCELLED, "cancelled while running"
        ):
            rec = self.store.read(workspace)
            return CancelResult(
                workspace=workspace,
                status=rec.status,
                changed=True,
                message="the container was stopped; the work so far stays in the workspace",
            )
        rec = self.store.read(workspace)
        return CancelResult(
            workspace=workspace,
            status=rec.status,
            changed=False,
            message=f"nothing to cancel: the workspace is {rec.status}",
        )

    def freeze(self, now: bool = False) -> QueueState:
        """Stop starting work (new dispatches queue); with ``now``, also stop running agents."""
        self.scheduler.set_frozen(True)
        stopped = []
        if now:
            for item in self.store.active():
                running = item.record is not None and item.record.status == Status.RUNNING
                if running and self.finaliser.stop_run(
                    item.name, Status.CANCELLED, "stopped by agentic_dispatch_shutdown(now=true)"
                ):
                    stopped.append(item.name)
        return QueueState(
            frozen=True,
            stopped=stopped,
            message="frozen: new dispatches queue and nothing starts until agentic_dispatch_start"
            + (f"; stopped {len(stopped)} running agent(s)" if now else "; running agents go on"),
        )

    def unfreeze(self) -> QueueState:
        """Start work again: clear the frozen flag and start what has a slot."""
        self.scheduler.set_frozen(False)
        started = self.drainer.drain()
        return QueueState(frozen=False, message=f"unfrozen; started {len(started)} queued workspace(s)")
