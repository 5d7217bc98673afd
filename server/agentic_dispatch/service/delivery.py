"""Result delivery. Not built yet: :meth:`Delivery.sync` says so and lists what would be delivered."""

from __future__ import annotations

from ..models import ACTIVE_STATUSES, SyncReport
from ..store import StatusStore

__all__ = ["Delivery"]


class Delivery:
    """Bringing results home (a stub until the outbox lands)."""

    def __init__(self, store: StatusStore) -> None:
        self.store = store

    def sync(self, workspace: str | None = None) -> SyncReport:
        """Result delivery is not built yet: report plainly what would be delivered.

        Raises:
            WorkspaceNotFoundError: ``workspace`` does not exist.
        """
        if workspace is not None:
            self.store.read(workspace)
        pending = [
            i.record.name
            for i in self.store.list()
            if i.record is not None
            and i.record.status not in ACTIVE_STATUSES
            and (workspace is None or i.record.name == workspace)
        ]
        return SyncReport(
            delivered=[],
            pending=pending,
            next_retry_at=None,
            message=(
                "Sync is not implemented yet: nothing was pushed and no record was reported. The work is safe in "
                "each workspace's repo/ folder; push a branch by hand with `git -C <repo_path> push origin <branch>`."
            ),
        )
