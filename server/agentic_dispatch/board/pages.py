"""The board's HTML: pure functions from the service's result models to text (every value escaped).

No template engine and no build step: a page is a few f-strings over :func:`html.escape`, styled by
``static/board.css`` and made live by ``static/board.js`` (both files of this package, served by the
board itself; nothing is fetched from elsewhere, and the Content-Security-Policy forbids it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote, urlencode

from ..models import DiffResult, InsightRow, InsightsReport, LogsResult, StatusReport, WorkspaceRow

__all__ = [
    "COLUMNS",
    "PAGE",
    "Column",
    "board_page",
    "columns_html",
    "error_page",
    "facts_html",
    "insights_page",
    "run_page",
    "signin_page",
    "toolbar",
]

PAGE = 20  # cards per column page
COLUMNS = ("queued", "running", "blocked", "failed", "completed", "cancelled")
TITLES = {
    "queued": "Queued",
    "running": "Running",
    "blocked": "Blocked",
    "failed": "Failed",
    "completed": "Completed",
    "cancelled": "Cancelled",
}
MAX_CARD_TEXT = 280
INSIGHT_HEADINGS = (
    *("Agent", "Runs", "Completed", "Failed", "Blocked", "Cancelled"),
    *("Success", "p50", "p90", "Tokens in", "Tokens out", "Cost"),
)


@dataclass(frozen=True)
class Column:
    """One status's page of rows: the status (``key``), its rows, how many there are, where the page starts."""

    key: str
    rows: list[WorkspaceRow]
    total: int
    offset: int


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def card_id(name: str) -> str:
    """A stable element id for a workspace (names hold slashes)."""
    return "w" + hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:12]


def run_href(name: str) -> str:
    return "/run/" + quote(name)


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(ts: str | None, now: datetime | None = None) -> str:
    """``ts`` as a person reads it: 45s, 12m, 3h, 2d."""
    then = _parse(ts)
    if then is None:
        return "—"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cut(text: str, limit: int = MAX_CARD_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def usage(row: WorkspaceRow) -> str | None:
    """Tokens and cost as the CLI reported them, or ``None``."""
    s = row.summary
    if s is None:
        return None
    parts = []
    if s.input_tokens is not None or s.output_tokens is not None:
        parts.append(f"{(s.input_tokens or 0) + (s.output_tokens or 0):,} tokens")
    if s.cost_usd is not None:
        parts.append(f"${s.cost_usd:.2f}")
    return " · ".join(parts) or None


def phases(row: WorkspaceRow) -> list[str]:
    """What a running or queued run is doing or waiting for, in words."""
    out = []
    if row.qa is not None and row.qa.state == "running" and row.status == "running":
        out.append("QA")
    if row.placement:
        out.append(f"waiting for a node: {row.placement}")
    elif row.node and row.status == "running":
        out.append(f"on node {row.node}")
    if row.stalled_since:
        out.append(f"stalled since {row.stalled_since}")
    if row.waiting_for:
        out.append(f"waiting for {row.waiting_for}")
    retry = row.retry
    if retry is not None and (retry.attempt > 1 or retry.next_at):
        out.append(
            f"attempt {retry.attempt} of {retry.max + 1}" + (f", next at {retry.next_at}" if retry.next_at else "")
        )
    if row.review is not None:
        out.append(_review(row))
    if row.sync:
        out.append(f"sync: {row.sync}")
    if row.error:
        out.append(row.error)
    return out


def _review(row: WorkspaceRow) -> str:
    """A review in words: who reviews whom, the round, the verdict (pending while there is none)."""
    r = row.review
    assert r is not None
    verdict = r.verdict or "pending"
    who = f"reviews {r.reviewed}" if r.reviewer == row.name else f"reviewed by {r.reviewer}"
    return f"review round {r.round}: {verdict} ({who})"


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{_e(name)}" value="{_e(value)}">'


def action_form(verb: str, label: str, workspace: str | None, back: str, extra: str = "") -> str:
    """A POST form with one button whose accessible name is ``label``."""
    target = _hidden("workspace", workspace) if workspace is not None else ""
    return (
        f'<form class="act" method="post" action="/actions/{verb}">{target}{_hidden("back", back)}{extra}'
        f'<button type="submit" class="btn btn-{verb}">{_e(label)}</button></form>'
    )


def row_actions(row: WorkspaceRow, back: str) -> str:
    """The buttons a run's status allows: answer a blocked one, resume a failed one, cancel, sync."""
    status, name, cid = str(row.status), row.name, card_id(row.name)
    if status == "blocked":
        field = (
            f'<label class="answer-label" for="answer-{cid}">Your answer</label>'
            f'<textarea id="answer-{cid}" name="answer" rows="2" required></textarea>'
        )
        return action_form("answer", "Answer", name, back, field)
    if status == "failed":
        return action_form("resume", "Resume", name, back)
    if status in ("queued", "running"):
        return action_form("cancel", "Cancel", name, back)
    if status == "completed":
        return action_form("sync", "Sync", name, back)
    return ""


def card(row: WorkspaceRow, back: str) -> str:
    cid = card_id(row.name)
    status = str(row.status)
    when = row.finished_at or row.started_at or row.updated_at
    bits = [f'<time datetime="{_e(when or "")}">{_e(age(when))}</time>', f"run {row.runs}"]
    text = ""
    if row.question:
        text = f'<p class="question"><span class="tag">Question</span> {_e(_cut(row.question))}</p>'
    elif row.reason:
        text = f'<p class="reason">{_e(_cut(row.reason))}</p>'
    used = usage(row)
    return (
        f'<article class="card s-{_e(status)}" id="{cid}" data-workspace="{_e(row.name)}" '
        f'data-version="{_e(f"{status}|{row.updated_at}|{row.runs}")}" aria-labelledby="t-{cid}">'
        f'<h3 id="t-{cid}"><a href="{_e(run_href(row.name))}">{_e(row.name)}</a></h3>'
        f'<p class="meta"><span class="repo">{_e(row.repo)}</span> · <span class="agent">{_e(row.agent)}</span></p>'
        f'<p class="meta">{" · ".join(bits)}{f" · {_e(used)}" if used else ""}</p>'
        + "".join(f'<p class="phase">{_e(p)}</p>' for p in phases(row))
        + text
        + row_actions(row, back)
        + "</article>"
    )


def _pager(col: Column, query: dict[str, str]) -> str:
    links = []
    key = f"{col.key}_offset"
    if col.offset > 0:
        newer = {**query, key: str(max(0, col.offset - PAGE))}
        links.append(f'<a href="/?{_e(urlencode(newer))}">Newer</a>')
    if col.offset + len(col.rows) < col.total:
        older = {**query, key: str(col.offset + PAGE)}
        links.append(f'<a href="/?{_e(urlencode(older))}">Older</a>')
    shown = f"{col.offset + 1}–{col.offset + len(col.rows)} of {col.total}" if col.rows else f"0 of {col.total}"
    return f'<nav class="pager" aria-label="{_e(TITLES[col.key])} pages"><span>{shown}</span>{"".join(links)}</nav>'


def columns_html(cols: Sequence[Column], query: dict[str, str], back: str) -> str:
    """The columns (what the live refresh replaces)."""
    out = []
    for col in cols:
        cards = "".join(card(r, back) for r in col.rows) or '<p class="empty">None</p>'
        out.append(
            f'<section class="column c-{col.key}" aria-labelledby="h-{col.key}" data-status="{col.key}">'
            f'<h2 id="h-{col.key}">{TITLES[col.key]} <span class="count">{col.total}</span></h2>'
            f'<div class="cards">{cards}</div>{_pager(col, query)}</section>'
        )
    return "".join(out)


def _layout(title: str, body: str, *, cursor: int | None = None, nav: bool = True, signed: bool = True) -> str:
    data = f' data-cursor="{cursor}"' if cursor is not None else ""
    links = (
        '<nav class="top" aria-label="Pages"><a href="/">Board</a><a href="/insights">Insights</a>'
        + ('<form class="act plain" method="post" action="/signout"><button type="submit">Sign out</button></form>'
           if signed else "")
        + "</nav>"
        if nav
        else ""
    )  # fmt: skip
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        f"<title>{_e(title)} · agentic-dispatch</title>"
        '<link rel="stylesheet" href="/static/board.css"><script src="/static/board.js" defer></script>'
        f'</head><body{data}><a class="skip" href="#main">Skip to content</a>'
        f'<header><span class="brand">agentic-dispatch</span>{links}</header>'
        f'<main id="main">{body}</main><div id="notice" role="status" aria-live="polite"></div></body></html>'
    )


def toolbar(report: StatusReport, back: str) -> str:
    """Queue state and the actions on everything: freeze/unfreeze, sync all."""
    frozen = report.frozen
    state = "The queue is frozen: nothing new starts." if frozen else "The queue is running."
    toggle = (
        action_form("unfreeze", "Unfreeze queue", None, back)
        if frozen
        else action_form("freeze", "Freeze queue", None, back)
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes if not n.startswith("the queue is frozen"))
    holds = "".join(
        f"<li>{_e(h.pool)}: {_e(h.reason)}{f' until {_e(h.until)}' if h.until else ''}</li>" for h in report.holds
    )
    return (
        f'<div class="toolbar" id="toolbar"><p class="queue {"frozen" if frozen else ""}">{state}</p>{toggle}'
        f'{action_form("sync", "Sync all", None, back)}</div>'
        + (f'<ul class="notes">{notes}{holds}</ul>' if notes or holds else "")
    )  # fmt: skip


def board_page(report: StatusReport, cols: Sequence[Column], query: dict[str, str], back: str, cursor: int) -> str:
    body = (
        '<h1 class="visually-hidden">Board</h1>'
        f'<div id="toolbar-wrap">{toolbar(report, back)}</div>'
        f'<div class="board" id="columns">{columns_html(cols, query, back)}</div>'
    )
    return _layout("Board", body, cursor=cursor)


def _dl(items: Iterable[tuple[str, str | None]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items if v) + "</dl>"


def _link_for(remote: str, branch: str) -> str | None:
    """A web address for a delivered branch, when the remote is one a browser can open."""
    if not remote.startswith(("https://", "http://")):
        return None
    return remote.removesuffix(".git") + "/tree/" + quote(branch)


def facts_html(row: WorkspaceRow, back: str) -> str:
    """A run's facts and the actions its status allows (what the live refresh replaces)."""
    s = row.summary
    delivery = None
    if row.delivery is not None:
        d = row.delivery
        href = _link_for(d.remote, d.branch)
        where = f'<a href="{_e(href)}">{_e(d.remote)}</a>' if href else f"<code>{_e(d.remote)}</code>"
        delivery = (
            f"{where} · branch <code>{_e(d.branch)}</code> · commit <code>{_e(d.commit[:12])}</code> · {_e(d.at)}"
        )
    commands = "".join(f"<li><code>{_e(c)}</code></li>" for c in row.delivery_commands)
    items: list[tuple[str, str | None]] = [
        ("Status", f'<span class="badge s-{_e(row.status)}">{_e(row.status)}</span>'),
        ("Question", f'<span class="question">{_e(row.question)}</span>' if row.question else None),
        ("Reason", _e(row.reason) if row.reason else None),
        ("Repository", _e(row.repo)),
        ("Agent", _e(row.agent)),
        ("Branch", f"<code>{_e(row.branch)}</code>"),
        ("Runs", _e(row.runs)),
        ("Started", _e(row.started_at) if row.started_at else None),
        ("Updated", _e(row.updated_at) if row.updated_at else None),
        ("Finished", _e(row.finished_at) if row.finished_at else None),
        ("Exit code", _e(row.exit_code) if row.exit_code is not None else None),
        ("Phase", _e(", ".join(phases(row))) if phases(row) else None),
        ("Tokens in / out", f"{s.input_tokens or 0:,} / {s.output_tokens or 0:,}" if s and s.input_tokens else None),
        ("Cost", f"${s.cost_usd:.4f}" if s and s.cost_usd is not None else None),
        ("Agent's last message", _e(_cut(s.final_message, 2000)) if s and s.final_message else None),
        ("QA", _e(f"{row.qa.state}{f': {row.qa.reason}' if row.qa.reason else ''}") if row.qa else None),
        ("Checkpoint", _e(f"{row.checkpoint.commit[:12]} ({row.checkpoint.why})") if row.checkpoint else None),
        ("Outside its scope", _e(", ".join(row.out_of_scope.paths)) if row.out_of_scope else None),
        ("Review", _e(_review(row)) if row.review else None),
        ("Review comments", _e(_cut(row.review.comments, 4000)) if row.review and row.review.comments else None),
        ("Node", _e(row.node) if row.node else None),
        ("Depends on", _links(row.depends_on)),
        ("Started from", _links([row.base_workspace] if row.base_workspace else [])),
        ("Waited for by", _links(row.dependents)),
        (
            "Earlier attempts",
            "<br>".join(_e(h) for h in row.retry.history) if row.retry and row.retry.history else None,
        ),
        ("Delivery", delivery),
        ("Look at it", f"<ul>{commands}</ul>" if commands else None),
    ]
    actions = row_actions(row, back)
    if str(row.status) == "blocked":  # a blocked run may also be resumed without an answer, or cancelled
        actions += action_form("resume", "Resume", row.name, back)
    return f'<div class="actions">{actions}</div>{_dl(items)}'


def _links(names: list[str]) -> str | None:
    return ", ".join(f'<a href="{_e(run_href(n))}">{_e(n)}</a>' for n in names) or None


def _patch_html(patch: str) -> str:
    """A unified diff with its lines marked: added, removed, hunk headers, file headers."""
    out = []
    for line in patch.splitlines():
        cls = ""
        if line.startswith(("+++", "---", "diff ", "index ")):
            cls = "file"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        out.append(f'<span class="{cls}">{_e(line)}\n</span>' if cls else f"<span>{_e(line)}\n</span>")
    return "".join(out)


def run_page(row: WorkspaceRow, log: LogsResult | str, diff: DiffResult | str, prompt: str, cursor: int) -> str:
    """A run's page: facts, live log tail, diff (stat, then the patch), the prompt."""
    back = run_href(row.name)
    if isinstance(log, str):
        log_html = f'<p class="note">{_e(log)}</p><pre id="log" tabindex="0"></pre>'
    else:
        note = f'<p class="note">{_e(log.note)}</p>' if log.note else ""
        log_html = f'{note}<pre id="log" tabindex="0" aria-label="Agent log" data-end="{log.end}">{_e(log.text)}</pre>'
    if isinstance(diff, str):
        diff_html = f'<p class="note">{_e(diff)}</p>'
    else:
        note = f'<p class="note">{_e(diff.note)}</p>' if diff.note else ""
        patch = f'<pre class="patch" tabindex="0">{_patch_html(diff.patch)}</pre>' if diff.patch else ""
        stat = diff.stat.strip() or "No committed changes yet."
        diff_html = f'<p>{_e(diff.base[:12])}..{_e(diff.branch)}</p><pre class="stat">{_e(stat)}</pre>{note}{patch}'
    body = (
        f'<h1 data-workspace="{_e(row.name)}" id="run-title">{_e(row.name)}</h1>'
        f'<section aria-labelledby="facts-h"><h2 id="facts-h">Facts</h2><div id="facts">{facts_html(row, back)}</div>'
        "</section>"
        f'<section aria-labelledby="log-h"><h2 id="log-h">Log</h2>{log_html}</section>'
        f'<section aria-labelledby="diff-h"><h2 id="diff-h">Changes</h2>{diff_html}</section>'
        f'<section aria-labelledby="prompt-h"><h2 id="prompt-h">Prompt</h2>'
        "<details><summary>The prompt of the last run</summary>"
        f'<pre tabindex="0">{_e(prompt)}</pre></details></section>'
    )
    return _layout(row.name, body, cursor=cursor)


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _chart(rows: list[InsightRow]) -> str:
    """Per agent: a bar for the success rate, its figure beside it, and the p50 / p90 durations as a
    bar inside an outline (inline SVG, no script). Every figure stands on the page's background, never
    on a bar, and every bar stands out from what it is drawn on (board.css)."""
    if not rows:
        return ""
    bar_h, gap, label_w, bar_w, width = 14, 10, 170, 180, 600
    durations = label_w + bar_w + 50  # after the success rate's figure
    longest = max((r.p90_seconds or r.p50_seconds or 0) for r in rows) or 1
    parts, y = [], 20
    parts.append(f'<text x="{label_w}" y="12" class="axis">success rate</text>')
    parts.append(f'<text x="{durations}" y="12" class="axis">duration p50 / p90</text>')
    for r in rows:
        ok = round(bar_w * r.success_rate)
        p50 = round(bar_w * (r.p50_seconds or 0) / longest)
        p90 = round(bar_w * (r.p90_seconds or 0) / longest)
        parts.append(f'<text x="0" y="{y + 11}" class="label">{_e(_cut(r.agent, 24))}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="{bar_h}" class="track"/>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{ok}" height="{bar_h}" class="ok"/>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 11}" class="value">{r.success_rate:.0%}</text>')
        parts.append(f'<rect x="{durations}" y="{y}" width="{p90}" height="{bar_h}" class="p90"/>')
        parts.append(f'<rect x="{durations}" y="{y + 3}" width="{p50}" height="{bar_h - 6}" class="p50"/>')
        y += bar_h + gap
    desc = "; ".join(
        f"{r.agent}: {r.success_rate:.0%} success, p50 {_seconds(r.p50_seconds)}, p90 {_seconds(r.p90_seconds)}"
        for r in rows
    )
    return (
        f'<svg class="chart" role="img" aria-label="{_e(desc)}" viewBox="0 0 {width} {y}" width="{width}" '
        f'height="{y}">{"".join(parts)}</svg>'
    )


def insights_page(report: InsightsReport) -> str:
    head = "".join(f"<th scope='col'>{h}</th>" for h in INSIGHT_HEADINGS)
    rows = "".join(
        f"<tr><th scope='row'>{_e(r.agent)}</th><td>{r.runs}</td><td>{r.completed}</td><td>{r.failed}</td>"
        f"<td>{r.blocked}</td><td>{r.cancelled}</td><td>{r.success_rate:.0%}</td><td>{_seconds(r.p50_seconds)}</td>"
        f"<td>{_seconds(r.p90_seconds)}</td><td>{'—' if r.input_tokens is None else f'{r.input_tokens:,}'}</td>"
        f"<td>{'—' if r.output_tokens is None else f'{r.output_tokens:,}'}</td>"
        f"<td>{'—' if r.cost_usd is None else f'${r.cost_usd:.2f}'}</td></tr>"
        for r in report.agents
    )
    windows = "".join(
        f'<a href="/insights?days={d}"{" aria-current=page" if d == report.window_days else ""}>{d:g} days</a>'
        for d in (1, 7, 30)
    )
    failures = "".join(
        f"<li><strong>{_e(r.agent)}</strong>: {_e('; '.join(r.top_failures))}</li>"
        for r in report.agents
        if r.top_failures
    )
    table = (
        f"<table><caption>Runs finished since {_e(report.since)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if report.agents
        else "<p>No run finished in this window.</p>"
    )
    body = (
        f'<h1>Insights</h1><nav class="windows" aria-label="Window">{windows}</nav>{_chart(report.agents)}{table}'
        + (f"<h2>Most common failures</h2><ul>{failures}</ul>" if failures else "")
    )
    return _layout("Insights", body)


def signin_page(next_path: str, problem: str | None = None) -> str:
    """The sign-in form: nothing of the service's data."""
    error = f'<p class="error" role="alert">{_e(problem)}</p>' if problem else ""
    body = (
        "<h1>Sign in</h1><p>This board shows the runs of an agentic-dispatch server. Paste its HTTP token (what MCP "
        "clients send as <code>Authorization: Bearer</code>), or open the sign-in link the server printed.</p>"
        f'{error}<form class="signin" method="post" action="/signin">{_hidden("next", next_path)}'
        '<label for="token">Token</label><input id="token" name="token" type="password" required '
        'autocomplete="current-password" autofocus><button type="submit">Sign in</button></form>'
    )
    return _layout("Sign in", body, nav=False)


def error_page(title: str, message: str, back: str) -> str:
    body = f'<h1>{_e(title)}</h1><p class="error" role="alert">{_e(message)}</p><p><a href="{_e(back)}">Back</a></p>'
    return _layout(title, body)
