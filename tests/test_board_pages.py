"""The board's HTML from the service's rows: what the agent wrote is shown as text, never as markup, and the
pipelines' facts (dependencies, retries, reviews) and the pages of a column say what they are."""

from __future__ import annotations

from agentic_dispatch.board.pages import PAGE, Column, card, columns_html, facts_html, run_page
from agentic_dispatch.models import DiffResult, LogsResult, RetryState, ReviewInfo, RunSummary, WorkspaceRow

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def _row(**changes: object) -> WorkspaceRow:
    base: dict[str, object] = {
        "name": "org/repo/task-1",
        "repo": "org/repo",
        "agent": "claude:opus",
        "status": "blocked",
        "runs": 1,
        "branch": "agent/task-1",
    }
    return WorkspaceRow.model_validate(base | changes)


def test_what_the_agent_wrote_is_escaped_on_the_card_the_facts_and_the_run_page() -> None:
    row = _row(question=HOSTILE, summary=RunSummary(final_message=HOSTILE, input_tokens=10, output_tokens=5))
    log = LogsResult(workspace=row.name, text=HOSTILE, start=0, end=10, size=10, truncated=False)
    diff = DiffResult(workspace=row.name, base="abc", branch=row.branch, stat=HOSTILE, patch=f"+{HOSTILE}\n-{HOSTILE}")
    for html in (card(row, "/"), facts_html(row, "/"), run_page(row, log, diff, HOSTILE, 0)):
        assert "<script>" not in html and "<img" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_card_names_its_run_and_its_agent_and_offers_what_its_status_allows() -> None:
    blocked = card(_row(question="Which port?", summary=RunSummary(input_tokens=1200, cost_usd=0.5)), "/")
    assert 'data-workspace="org/repo/task-1"' in blocked and "claude:opus" in blocked
    assert "Which port?" in blocked and "1,200 tokens" in blocked and "$0.50" in blocked
    assert ">Answer</button>" in blocked and 'name="answer"' in blocked and ">Your answer</label>" in blocked
    assert ">Cancel</button>" in card(_row(status="running"), "/")
    assert ">Resume</button>" in card(_row(status="failed", reason="exit 3"), "/")
    assert ">Sync</button>" in card(_row(status="completed"), "/")


def test_dependencies_retries_and_reviews_are_shown_as_the_views_give_them() -> None:
    row = _row(
        status="queued",
        waiting_for="org/repo/task-0 to complete",
        depends_on=["org/repo/task-0"],
        retry=RetryState(max=2, on=[], attempt=2, next_at="2026-12-06T12:00:00Z", history=["transient: 429"]),
        review=ReviewInfo(reviewer="org/repo/rev-1", reviewed="org/repo/task-1", round=2, verdict="changes requested"),
    )
    shown = card(row, "/")
    assert "waiting for org/repo/task-0 to complete" in shown
    assert "attempt 2 of 3, next at 2026-12-06T12:00:00Z" in shown
    assert "review round 2: changes requested (reviewed by org/repo/rev-1)" in shown
    placed = card(_row(status="running", placement="no node has 4 GiB free"), "/")
    assert "waiting for a node: no node has 4 GiB free" in placed
    assert "on node worker-2" in card(_row(status="running", node="worker-2"), "/")
    facts = facts_html(row, "/run/org/repo/task-1")
    assert '<a href="/run/org/repo/task-0">org/repo/task-0</a>' in facts and "transient: 429" in facts


def test_a_column_longer_than_a_page_links_the_older_page_and_back() -> None:
    rows = [_row(name=f"org/repo/task-{i}", status="completed") for i in range(PAGE)]
    first = columns_html([Column("completed", rows, 45, 0)], {}, "/")
    assert f"1–{PAGE} of 45" in first and f'href="/?completed_offset={PAGE}">Older' in first and "Newer" not in first
    last = columns_html([Column("completed", rows[:5], 45, 40)], {"failed_offset": "20"}, "/")
    assert "41–45 of 45" in last and "Older" not in last
    assert 'href="/?failed_offset=20&amp;completed_offset=20">Newer' in last
