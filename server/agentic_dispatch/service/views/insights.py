"""Insights: how each agent spec did over a window — runs, success rate, durations, tokens and cost
where the CLI reports them, and the most common failure reasons.

Only the records that finished inside the window are read (the status index finds them), and
those of removed workspaces (``agentic-dispatch clean`` keeps their last record in ``state/retired.jsonl``).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ...errors import CorruptRecordError, InvalidInputError, WorkspaceNotFoundError
from ...models import MAX_WINDOW_DAYS, InsightRow, InsightsReport, Status, WorkspaceRecord, parse_time
from ...store import StatusStore
from ..runs.retention import read_retired

__all__ = [
    "MAX_WINDOW_DAYS",
    "Insights",
]

# Failure reasons differ in numbers, ids and paths; counted by their shape.
_VARIABLE = re.compile(r"\b[0-9a-f]{7,}\b|\d+(\.\d+)?|/\S+")


class Insights:
    def __init__(self, store: StatusStore, retired: Path | None = None) -> None:
        self.store = store
        self.retired = retired

    def report(self, window_days: float = 7.0) -> InsightsReport:
        """Per agent spec, the runs that finished in the last ``window_days``.

        Raises:
            InvalidInputError: a window outside 0 to 366 days.
        """
        if not 0 < window_days <= MAX_WINDOW_DAYS:
            raise InvalidInputError("window_days", f"must be more than 0 and at most {MAX_WINDOW_DAYS}.")
        since = (datetime.now(UTC) - timedelta(days=window_days)).isoformat(timespec="seconds").replace("+00:00", "Z")
        self.store.catch_up()
        by_agent: dict[str, list[WorkspaceRecord]] = {}
        seen: set[tuple[str, str]] = set()
        for name in self.store.index.finished_since(since):
            try:
                rec = self.store.read(name)
            except (WorkspaceNotFoundError, CorruptRecordError):
                continue
            if rec.status not in (Status.QUEUED, Status.RUNNING):
                by_agent.setdefault(rec.agent, []).append(rec)
                seen.add((rec.name, rec.created_at))
        for rec in read_retired(self.retired) if self.retired else []:  # a removal cut off: counted once
            if (rec.name, rec.created_at) not in seen and (rec.finished_at or "") >= since:
                seen.add((rec.name, rec.created_at))
                by_agent.setdefault(rec.agent, []).append(rec)
        rows = [self._row(agent, recs) for agent, recs in sorted(by_agent.items())]
        return InsightsReport(window_days=window_days, since=since, agents=rows)

    @staticmethod
    def _row(agent: str, recs: list[WorkspaceRecord]) -> InsightRow:
        counts = Counter(r.status.value for r in recs)
        durations = sorted(
            end - start
            for r in recs
            if (start := parse_time(r.started_at)) is not None and (end := parse_time(r.finished_at)) is not None
        )
        summaries = [r.summary for r in recs if r.summary is not None]

        def total(values: list[int | float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None

        failures = Counter(
            _VARIABLE.sub("…", (r.reason or "no reason recorded").splitlines()[0])[:160]
            for r in recs
            if r.status == Status.FAILED
        )
        tokens_in = total([s.input_tokens for s in summaries])
        tokens_out = total([s.output_tokens for s in summaries])
        return InsightRow(
            agent=agent,
            runs=len(recs),
            completed=counts[Status.COMPLETED.value],
            failed=counts[Status.FAILED.value],
            blocked=counts[Status.BLOCKED.value],
            cancelled=counts[Status.CANCELLED.value],
            success_rate=round(counts[Status.COMPLETED.value] / len(recs), 3),
            p50_seconds=round(statistics.median(durations), 1) if durations else None,
            p90_seconds=round(durations[min(len(durations) - 1, int(0.9 * len(durations)))], 1) if durations else None,
            input_tokens=int(tokens_in) if tokens_in is not None else None,
            output_tokens=int(tokens_out) if tokens_out is not None else None,
            cost_usd=round(c, 4) if (c := total([s.cost_usd for s in summaries])) is not None else None,
            top_failures=[f"{n}× {reason}" for reason, n in failures.most_common(3)],
        )
