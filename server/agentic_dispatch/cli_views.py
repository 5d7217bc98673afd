"""What the command line prints: the status table at a glance, changes, insights (``rich``).

Plain text when stdout is not a terminal (scripts, pipes), with the same columns; ``--json``
prints the model instead.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import BaseModel
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .models import Change, InsightsReport, StatusReport, WorkspaceRow

__all__ = ["age", "emit", "print_change", "print_insights", "print_status", "status_view"]

_STYLE = {
    "running": "bold cyan",
    "queued": "cyan",
    "blocked": "bold yellow",
    "failed": "bold red",
    "completed": "green",
    "cancelled": "dim",
    "unreadable": "bold magenta",
}


def emit(obj: BaseModel, as_json: bool, console: Console | None = None) -> None:
    """A result as JSON, or one ``key: value`` line per field."""
    out = console or Console(highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(obj.model_dump_json()) if out.is_terminal else print(obj.model_dump_json(indent=2))
        return
    for key, value in obj.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            out.print(f"{key}:", markup=False)
            for v in value:
                out.print(f"  {v}", markup=False)
        elif isinstance(value, dict):
            out.print(f"{key}: {json.dumps(value)}", markup=False)
        else:
            out.print(f"{key}: {value}", markup=False)


def age(ts: str | None, now: datetime | None = None) -> str:
    """``2026-11-22T10:00:00Z`` as ``5m``, ``3h``, ``2d`` ago (``-`` when unknown)."""
    if not ts:
        return "-"
    try:
        then = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _what(row: WorkspaceRow) -> str:
    """The line's last column: the question, the failure reason, the delivery, or what the agent said."""
    if row.error:
        return f"unreadable: {row.error}"
    why = row.question or row.reason
    if why:
        return why.strip().splitlines()[0] if why.strip() else ""
    if row.sync:
        return f"sync: {row.sync}"
    if row.summary and row.summary.final_message:
        lines = row.summary.final_message.strip().splitlines()
        return lines[0] if lines else ""
    return row.branch


def status_view(report: StatusReport, now: datetime | None = None) -> RenderableType:
    """Counts on top, then one line per workspace: age, agent, status, runs, name, and the question,
    failure reason or last word, cut to the terminal's width."""
    counts = Text("  ".join(f"{k} {v}" for k, v in report.counts.items() if v) or "no workspaces")
    notes = [Text(f"note: {n}", style="yellow") for n in report.notes]
    notes += [
        Text(f"pool {h.pool}: {h.reason}" + (f" until {h.until}" if h.until else ""), style="yellow")
        for h in report.holds
    ]
    notes += [
        Text(f"orphaned container: {o} (agentic-dispatch cleanup removes it)", style="magenta") for o in report.orphans
    ]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", expand=True)
    # Every column keeps its width but the last, which is cut to what the terminal leaves.
    widths = {
        "age": 4,
        "agent": max((len(r.agent) for r in report.workspaces), default=5),
        "status": 10,
        "runs": 4,
        "workspace": max((len(r.name) for r in report.workspaces), default=9),
    }
    for column, width in widths.items():
        table.add_column(
            column, no_wrap=True, min_width=width, justify="right" if column in ("age", "runs") else "left"
        )
    table.add_column("question / reason / last word", no_wrap=True, overflow="ellipsis", ratio=1, min_width=1)
    for row in report.workspaces:
        status = str(row.status)
        table.add_row(
            age(row.updated_at, now),
            row.agent,
            Text(status, style=_STYLE.get(status, "")),
            str(row.runs),
            row.name,
            _what(row),
        )
    return Group(counts, *notes, table)


def print_status(report: StatusReport, as_json: bool, console: Console | None = None) -> None:
    """The status table; with one workspace, also its summary figures and log tail."""
    out = console or Console(highlight=False)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    out.print(status_view(report))
    if len(report.workspaces) == 1:
        row = report.workspaces[0]
        if row.summary:
            sm = row.summary
            figures = [
                f"{sm.turns} turns" if sm.turns is not None else "",
                f"{sm.input_tokens} in / {sm.output_tokens} out tokens" if sm.input_tokens is not None else "",
                f"${sm.cost_usd:.4f}" if sm.cost_usd is not None else "",
            ]
            out.print(f"figures: {', '.join(f for f in figures if f) or '-'}", markup=False)
        if row.qa:
            out.print(f"qa: {row.qa.state}" + (f" ({row.qa.reason})" if row.qa.reason else ""), markup=False)
        for command in row.delivery_commands:
            out.print(f"  {command}", markup=False)
        for line in (row.log_tail or "").splitlines():
            out.print(f"| {line}", markup=False)


def print_change(change: Change, console: Console | None = None) -> None:
    out = console or Console(highlight=False)
    text = Text(f"{change.at}  {change.workspace}: ")
    text.append(change.kind, style=_STYLE.get(change.kind, "bold"))
    why = change.question or change.reason
    if why and why.strip():
        text.append(f" — {why.strip().splitlines()[0]}")
    out.print(text, no_wrap=True, overflow="ellipsis")


def print_insights(report: InsightsReport, console: Console | None = None) -> None:
    out = console or Console(highlight=False)
    out.print(f"finished runs since {report.since} ({report.window_days:g} days)")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("agent", "runs", "ok %", "failed", "blocked", "p50 s", "p90 s", "tokens in/out", "cost $"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    for r in report.agents:
        tokens = f"{r.input_tokens or 0}/{r.output_tokens or 0}" if r.input_tokens is not None else "-"
        table.add_row(
            r.agent, str(r.runs), f"{r.success_rate * 100:.0f}", str(r.failed), str(r.blocked),
            f"{r.p50_seconds:g}" if r.p50_seconds is not None else "-",
            f"{r.p90_seconds:g}" if r.p90_seconds is not None else "-",
            tokens, f"{r.cost_usd:.2f}" if r.cost_usd is not None else "-",
        )  # fmt: skip
    out.print(table)
    for r in report.agents:
        for failure in r.top_failures:
            out.print(f"  {r.agent} failed: {failure}", markup=False)
