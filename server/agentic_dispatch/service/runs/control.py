"""Control: cancel one workspace; freeze and unfreeze the queue."""

from __future__ import annotations

from ...models import CancelResult, QueueState, Status
from ...scheduler import Scheduler
from ...store import StatusStore
from .executor import RunLifecycle
from .launch import QueueDrainer
from .lifecycle import Cancelled

__all__ = ["Control"]


class Control:
    """Stopping work a person asked to stop."""

    def __init__(self, store: StatusStore, scheduler: Scheduler, drainer: QueueDrainer, runs: RunLifecycle) -> None:
        self.store = store
        self.scheduler = scheduler
        self.drainer = drainer
        self.runs = runs

    def cancel(self, workspace: str) -> CancelResult:
        """Cancel a workspace: a queued one never starts, a running one is stopped; others are left as they are.

        Raises:
            WorkspaceNotFoundError: no such workspace.
        """
        result = self._cancel_one(workspace)
        if result.status != Status.COMPLETED:  # what waits for it would wait for ever
            result.also_cancelled = self._cancel_dependents(workspace)
            if result.also_cancelled:
                result.message += f"; cancelled {len(result.also_cancelled)} workspace(s) that waited for it"
        return result

    def _cancel_one(self, workspace: str) -> CancelResult:
        with self.scheduler.admission():  # so a drain cannot start it while we look
            done = self.runs.apply(workspace, Cancelled("cancelled before it started"))
        if done is not None:
            return CancelResult(workspace=workspace, status=done.status, changed=True, message="removed from the queue")
        stopped = self.runs.stop(workspace, Status.CANCELLED, "cancelled while running")
        rec = self.store.read(workspace)
        if stopped == "stopped":
            return CancelResult(
                workspace=workspace,
                status=rec.status,
                changed=True,
                message="the container was stopped; the work so far stays in the workspace",
            )
        if stopped == "pending":
            return CancelResult(
                workspace=workspace,
                status=rec.status,
                changed=True,
                message="the cancel is recorded, but the container engine cannot be reached now: the container is "
                "stopped and the run ends cancelled as soon as the engine answers (nothing more to do)",
            )
        return CancelResult(
            workspace=workspace,
            status=rec.status,
            changed=False,
            message=f"nothing to cancel: the workspace is {rec.status}",
        )

    def _cancel_dependents(self, workspace: str) -> list[str]:
        """Cancel the queued runs that wait for ``workspace`` (and, in turn, what waits for them),
        each with the reason; their names."""
        cancelled: list[str] = []
        todo = [workspace]
        while todo:
            upstream = todo.pop(0)
            why = f"cancelled because {upstream}, which it waited for, was cancelled or will not complete"
            with self.scheduler.admission():
                for item in self.store.active():
                    rec = item.record
                    if rec is None or rec.status != Status.QUEUED or upstream not in rec.depends_on:
                        continue
                    if self.runs.apply(rec.name, Cancelled(why)) is not None:
                        cancelled.append(rec.name)
                        todo.append(rec.name)
        return cancelled

    def freeze(self, now: bool = False) -> QueueState:
        """Stop starting work (new dispatches queue); with ``now``, also stop running agents."""
        self.scheduler.set_frozen(True)
        stopped = []
        if now:
            for item in self.store.active():
                running = item.record is not None and item.record.status == Status.RUNNING
                if (
                    running
                    and self.runs.stop(item.name, Status.CANCELLED, "stopped by agentic_dispatch_shutdown(now=true)")
                    != "idle"
                ):
                    stopped.append(item.name)
        return QueueState(
            frozen=True,
            stopped=stopped,
            message="frozen: new dispatches queue and nothing starts until agentic_dispatch_start"
            + (f"; stopped {len(stopped)} running agent(s)" if now else "; running agents go on"),
        )

    def unfreeze(self) -> QueueState:
        """Start work again: clear the frozen flag, lift the pools' fast-failure pauses (a person has
        looked), and start what has a slot."""
        self.scheduler.set_frozen(False)
        paused = sorted(self.scheduler.state().paused_until)
        for pool in paused:
            self.scheduler.resume_pool(pool)
        started = self.drainer.drain()
        lifted = f"; lifted the pause of pool(s) {', '.join(paused)}" if paused else ""
        return QueueState(frozen=False, message=f"unfrozen{lifted}; started {len(started)} queued workspace(s)")
