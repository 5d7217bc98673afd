"""Sync: bringing results home (domain layer; the service wires it in).

- :class:`Outbox` (``outbox``): the durable queue under ``<state>/outbox`` — enqueue, flush
  (oldest first, with backoff, a dead letter after ``max_attempts``), retry, ledger, report.
- :class:`GitDeliverer` (``git_delivery``): a finished run's branch to its repository, safely
  (the agent's clone is never a repository git runs in).
- :class:`RecordPoster` (``record_delivery``): a finished run's record to the sync endpoint.
- :class:`Outcome` (``outcome``): what one attempt came to; ``views``: commands and review links.
"""

from .entry import EnqueueResult, EventSink, FlushResult, Kind, OutboxEntry, entry_id
from .git_delivery import GitDeliverer, delivery_target
from .outbox import Outbox
from .outcome import Outcome, redact_url, retry_after_seconds
from .record_delivery import RecordPoster, record_payload
from .views import review_url, view_commands

__all__ = [
    "EnqueueResult",
    "EventSink",
    "FlushResult",
    "GitDeliverer",
    "Kind",
    "Outbox",
    "OutboxEntry",
    "Outcome",
    "RecordPoster",
    "delivery_target",
    "entry_id",
    "record_payload",
    "redact_url",
    "retry_after_seconds",
    "review_url",
    "view_commands",
]
