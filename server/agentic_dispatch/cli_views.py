"""What the command line prints: the status table at a glance, changes, insights, deliveries
(``rich``), and every other result as labelled lines.

Plain text when stdout is not a terminal (scripts, pipes), with the same columns; ``--json``
prints the model instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .models import Change, CleanReport, InsightsReport, OutboxEntryRow, StatusReport, SyncReport, WorkspaceRow

__all__ = ["age", "emit", "print_change", "print_clean", "print_insights", "print_status", "print_sync", "status_view"]

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
    """A result as JSON, or for a person: its ``message`` first, then one ``label  value`` line per
    field that says something (a default, ``None`` or an empty list is left out), lists and
    multi-line text indented under their label."""
    out = console or Console(highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(obj.model_dump_json()) if out.is_terminal else print(obj.model_dump_json(indent=2))
        return
    fields = obj.model_dump(exclude_defaults=True, exclude_none=True)
    message = fields.pop("message", None)
    if isinstance(message, str) and message:
        out.print(message, markup=False)
    _print_fields(out, fields, "")


def _words(value: Any) -> str:
    """A value as a person reads it: ``yes``/``no`` for booleans, ``-`` for nothing."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_words(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_words(v) for v in value)
    return str(value)


def _print_fields(out: Console, fields: dict[str, Any], indent: str) -> None:
    """Scalars aligned as ``label  value`` lines, then each list, mapping or multi-line text under
    its label; empty ones are left out."""
    scalars = {k: v for k, v in fields.items() if not isinstance(v, list | dict) and "\n" not in str(v)}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        out.print(f"{indent}{key.replace('_', ' '):<{width}}  {_words(value)}", markup=False)
    for key, value in fields.items():
        if key in scalars or not value:
            continue
        out.print(f"{indent}{key.replace('_', ' ')}:", markup=False)
        if isinstance(value, dict):
            _print_fields(out, value, indent + "  ")
        else:
            lines = [_words(v) for v in value] if isinstance(value, list) else str(value).splitlines()
            for line in lines:
                out.print(f"{indent}  {line}".rstrip(), markup=False)


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
    """The line's last column: the question, the failure reason, what a queued run waits for, the
    delivery, or what the agent said."""
    if row.error:
        return f"unreadable: {row.error}"
    if row.waiting_for:
        return f"waiting for {row.waiting_for}"
    if row.placement:
        return f"waiting for a node: {row.placement}"
    if row.stalled_since:
        return f"stalled: no activity for {age(row.stalled_since)} (since {row.stalled_since})"
    why = row.question or row.reason
    if why:
        return why.strip().splitlines()[0] if why.strip() else ""
    if row.sync:
        return f"sync: {row.sync}"
    if row.summary and row.summary.final_message:
        lines = row.summary.final_message.strip().splitlines()
        return lines[0] if lines else ""
    return row.branch


def _marks(row: WorkspaceRow) -> str:
    """What the last column starts with, so that cutting it never hides them: the swarm node it ran on,
    the count of paths changed outside the scope, and an automatic checkpoint of uncommitted work."""
    marks = []
    if row.node:
        marks.append(f"[on {row.node}]")
    if row.out_of_scope and row.out_of_scope.count:
        marks.append(f"[{row.out_of_scope.count} out of scope]")
    if row.checkpoint:
        marks.append(f"[checkpoint {row.checkpoint.commit[:8]}]")
    return "".join(f"{m} " for m in marks)


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
            Text(_marks(row) + _what(row)),  # the agent's words: never read as markup
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
        if row.checkpoint:
            cp = row.checkpoint
            out.print(f"checkpoint: {cp.commit[:12]} ({cp.why}; {cp.files} path(s), at {cp.at})", markup=False)
        if row.out_of_scope and row.out_of_scope.count:
            oos = row.out_of_scope
            more = f" and {oos.count - len(oos.paths)} more" if oos.count > len(oos.paths) else ""
            out.print(f"out of scope: {oos.count} path(s): {', '.join(oos.paths)}{more}", markup=False)
        if row.depends_on:
            out.print(f"depends on: {', '.join(row.depends_on)}", markup=False)
        if row.dependents:
            out.print(f"dependents: {', '.join(row.dependents)} (status --chain shows them all)", markup=False)
        if row.review:
            rv = row.review
            out.print(
                f"review round {rv.round} by {rv.reviewer}: {rv.verdict or 'pending'}"
                + (f" (round {rv.round + 1}: {rv.next_reviewer})" if rv.next_reviewer else ""),
                markup=False,
            )
        if row.retry:
            rt = row.retry
            out.print(
                f"retry: attempt {rt.attempt} of {rt.max + 1} (on {', '.join(rt.on)})"
                + (f", next at {rt.next_at}" if row.status == "queued" and rt.next_at else ""),
                markup=False,
            )
            for line in rt.history:
                out.print(f"  {line}", markup=False)
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


_DELIVERY_STYLE = {"delivered": "green", "pending": "cyan", "attention": "bold yellow", "dead-lettered": "bold red"}


def _where_it_stands(row: OutboxEntryRow) -> str:
    """The sync table's last column: what was delivered where, or when the next try is and why."""
    if row.state == "delivered":
        return row.detail or f"at {row.delivered_at}"
    if row.state == "pending":
        return f"next try {row.next_attempt_at or 'now'}" + (f": {row.last_error}" if row.last_error else "")
    reason = (row.last_error or "").strip()
    return reason.splitlines()[0] if reason else row.state


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def print_clean(report: CleanReport, as_json: bool, console: Console | None = None) -> None:
    """The clean report: one line per workspace removed (or, in a dry run, that would be) with its
    size and why it could go, one per workspace kept with why, then the total."""
    out = console or Console(highlight=False)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    verb = "would remove" if report.dry_run else "removed"
    for r in report.removed:
        finished = f", finished {r.finished_at}" if r.finished_at else ""
        out.print(
            f"{verb} {r.workspace} ({r.status}{finished}): {_bytes(r.bytes)}; {r.why}", markup=False, soft_wrap=True
        )
    for name, why in report.kept.items():
        out.print(f"kept {name}: {why}", markup=False, soft_wrap=True)
    out.print(report.message, markup=False, soft_wrap=True)


def print_sync(report: SyncReport, as_json: bool, console: Console | None = None) -> None:
    """The sync report: the counts, one line per delivery (workspace, run, branch or record, state,
    tries, where it stands, cut to the terminal's width), then in full what needs a person."""
    out = console or Console(highlight=False)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    counts, *explained = report.message.splitlines() or [""]
    out.print(counts, markup=False)
    if report.entries:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", expand=True)
        widths = {"workspace": max(len(r.workspace) for r in report.entries), "run": 3, "kind": 6, "state": 13}
        for column, width in {**widths, "tries": 5}.items():
            table.add_column(
                column, no_wrap=True, min_width=width, justify="right" if column in ("run", "tries") else "left"
            )
        table.add_column("where it stands", no_wrap=True, overflow="ellipsis", ratio=1, min_width=1)
        for row in report.entries:
            table.add_row(
                row.workspace,
                str(row.run),
                "branch" if row.kind == "git" else row.kind,
                Text(row.state, style=_DELIVERY_STYLE.get(row.state, "")),
                str(row.attempts),
                Text(_where_it_stands(row)),  # git's and the endpoint's words: never read as markup
            )
        out.print(table)
    for line in explained:  # the full reason and what to do, for each delivery a person must see to
        out.print(line, markup=False, soft_wrap=True)
