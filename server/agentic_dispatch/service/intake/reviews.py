"""Review loops: a reviewer (``review_of``) that ends with "changes requested" while its dispatch has
rounds left (``review_rounds``) sends the reviewed workspace back to its agent with the comments, and
dispatches the next round's reviewer, which starts from the reviewed branch once that run completed.

Each step is idempotent, so a server killed half-way finishes the round on its next look: the reviewed
workspace is resumed only while it is finished, the next reviewer's name is fixed by its round (one
that exists is not dispatched again), and the reviewer's record says the round was followed up
(:class:`~..runs.lifecycle.ReviewFollowedUp`) last.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime

from ...errors import DispatchError
from ...models import RESUMABLE_STATUSES, DispatchRequest, RetryPolicy, Status, WorkspaceRecord
from ...store import StatusStore
from ..runs.executor import RunLifecycle
from ..runs.lifecycle import ReviewFollowedUp
from .dispatch import Intake

__all__ = ["ReviewLoop"]

log = logging.getLogger(__name__)

# How far back the first look after a start reads finished runs for a round not yet followed up.
LOOK_BACK_SECONDS = 7 * 86_400
_ROUND_SUFFIX = re.compile(r"-round-\d+$")


class ReviewLoop:
    """Follows up reviewers' verdicts: the next round of a review loop."""

    def __init__(self, store: StatusStore, intake: Intake, runs: RunLifecycle) -> None:
        self.store = store
        self.intake = intake
        self.runs = runs
        self._looked: dict[str, str] = {}  # workspace -> the finished_at already looked at

    def follow_up(self) -> list[str]:
        """Start the next round of every review loop whose reviewer just asked for changes. Returns the
        workspaces queued (the reviewed ones sent back, the next reviewers): the caller drains."""
        since = datetime.fromtimestamp(time.time() - LOOK_BACK_SECONDS, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        queued: list[str] = []
        for name, finished_at in self.store.index.finished_at_since(since):
            if self._looked.get(name) == finished_at:
                continue
            rec = self.store.find(name)
            if rec is not None and self._due(rec):
                try:
                    queued += self._next_round(rec)
                except DispatchError as e:  # the engine away, a repository gone: the next look tries again
                    log.warning("the next review round after %s cannot start now: %s", name, e)
                    continue
            self._looked[name] = finished_at
        return queued

    @staticmethod
    def _due(rec: WorkspaceRecord) -> bool:
        review = rec.review
        return (
            rec.status == Status.COMPLETED
            and review is not None
            and review.verdict == "changes requested"
            and review.next_reviewer is None
            and rec.review_round <= rec.review_rounds
        )

    def _next_round(self, rec: WorkspaceRecord) -> list[str]:
        """Send the reviewed workspace back with the comments, dispatch the next reviewer, say so.

        Raises:
            DispatchError: a step could not be taken now (what was done stays done).
        """
        assert rec.review is not None and rec.review_of is not None
        reviewed, round_ = rec.review_of, rec.review_round + 1
        queued: list[str] = []
        current = self.store.find(reviewed)
        if current is None:
            log.warning("%s reviewed %s, which is gone: no next round", rec.name, reviewed)
            self.runs.apply(rec.name, ReviewFollowedUp("(none: the reviewed workspace is gone)"))
            return queued
        if current.status in RESUMABLE_STATUSES:
            message = (
                f"A reviewer ({rec.name}, round {rec.review_round}) asked for changes:\n\n"
                f"{rec.review.comments or '(no comments)'}\n\nFix what it found and commit; your branch is reviewed "
                f"again (round {round_}) when you end."
            )
            self.intake.resume(reviewed, answer=message)
            queued.append(reviewed)
        slug = f"{_ROUND_SUFFIX.sub('', rec.name.rsplit('/', 1)[-1])}-round-{round_}"
        name = f"{rec.org}/{rec.repo_name}/{slug}"
        if not self.store.exists(name):
            policy = RetryPolicy(max=rec.retry.max, on=rec.retry.on) if rec.retry is not None else None
            request = DispatchRequest(
                repo=rec.repo,
                task=rec.task,
                agent=rec.agent,
                template=rec.template,
                persona=rec.persona,
                priority=rec.priority,
                timeout_seconds=rec.timeout_seconds,
                qa=rec.qa_enabled,
                retry=policy,
                review_of=reviewed,
                review_rounds=rec.review_rounds,
            )
            queued.append(self.intake.dispatch(request, slug=slug, review_round=round_).workspace)
        self.runs.apply(rec.name, ReviewFollowedUp(name))
        return queued
