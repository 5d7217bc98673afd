"""Anthropic Claude Code, headless: ``claude -p --output-format stream-json --verbose``.

From docs/agent-clis.md: the last event is ``result``; its ``subtype`` says ``success``
even on API errors, so ``is_error`` decides. ``usage`` covers this run, while
``total_cost_usd`` is summed over the session (a resumed run's cost is the difference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import RunSummary
from .base import LaunchPlan, LoginFile, RunContext, as_dict, as_int, json_events, log_runs, provider_refusal

__all__ = ["ClaudeAgent"]

INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class ClaudeAgent:
    base = "claude"
    description = "Anthropic Claude Code (claude -p)"
    cli: str | None = "claude"
    key_env: tuple[str, ...] = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
    login_files: tuple[LoginFile, ...] = (LoginFile(".claude/.credentials.json", ".claude/.credentials.json"),)

    def plan(self, ctx: RunContext) -> LaunchPlan:
        argv = [
            "claude",
            "-p",
            ctx.prompt,
            "--output-format",
            "stream-json",
            "--verbose",  # required with stream-json in print mode
            "--dangerously-skip-permissions",  # the container is the sandbox
        ]
        if ctx.model:
            argv += ["--model", ctx.model]
        if ctx.resume_session:
            argv += ["--resume", ctx.resume_session]
        env = {"IS_SANDBOX": "1", **ctx.env}  # allows the permission bypass whatever the uid
        if ctx.base_url:
            env["ANTHROPIC_BASE_URL"] = ctx.base_url
        if ctx.max_retries is not None:
            env["CLAUDE_CODE_MAX_RETRIES"] = str(ctx.max_retries)
        return LaunchPlan(argv=argv, env=env)

    def summarize(self, log_path: Path) -> RunSummary | None:
        runs = log_runs(log_path)
        if not runs:
            return None
        session, result, api_error, status = _events_of(runs[-1])
        refused, after = provider_refusal(api_error, status) if api_error or status is not None else (None, None)
        if result is None:  # killed or crashed before the result event
            return RunSummary(session_id=session, error=api_error, error_status=refused, retry_after_seconds=after)
        usage = as_dict(result.get("usage"))
        inputs = [as_int(usage.get(k)) for k in INPUT_KEYS]
        cost = result.get("total_cost_usd")
        cost = float(cost) if isinstance(cost, int | float) else None
        if cost is not None:  # the session's total: subtract what earlier runs of it reported
            for lines in reversed(runs[:-1]):
                s, r, _ = _result_of(lines)
                if r is not None and s == session and isinstance(r.get("total_cost_usd"), int | float):
                    cost = max(0.0, cost - float(r["total_cost_usd"]))
                    break
        is_error = bool(result.get("is_error"))
        text = result.get("result") if isinstance(result.get("result"), str) else None
        return RunSummary(
            final_message=None if is_error else text,
            turns=as_int(result.get("num_turns")),
            input_tokens=sum(i for i in inputs if i is not None) if inputs[0] is not None else None,
            output_tokens=as_int(usage.get("output_tokens")),
            cost_usd=round(cost, 6) if cost is not None else None,
            session_id=session,
            error=(text or api_error or str(result.get("terminal_reason") or "error")) if is_error else None,
            error_status=refused if is_error else None,
            retry_after_seconds=after if is_error else None,
        )

    def has_session(self, home: Path, session_id: str) -> bool:
        projects = home / ".claude" / "projects"
        return projects.is_dir() and any(projects.glob(f"*/{session_id}.jsonl"))


def _result_of(lines: list[str]) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(session id, the result event, the last API error text) of one run."""
    session, result, api_error, _ = _events_of(lines)
    return session, result, api_error


def _events_of(lines: list[str]) -> tuple[str | None, dict[str, Any] | None, str | None, object]:
    """:func:`_result_of`, and the HTTP status of the last API error (``api_error_status``)."""
    session: str | None = None
    result: dict[str, Any] | None = None
    api_error: str | None = None
    status: object = None
    for ev in json_events(lines):
        if isinstance(ev.get("session_id"), str):
            session = ev["session_id"]
        if ev.get("api_error_status") is not None:
            status = ev["api_error_status"]
        if ev.get("type") == "result":
            result = ev
        elif ev.get("type") == "assistant" and ev.get("error"):
            content = as_dict(ev.get("message")).get("content") or []
            texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
            api_error = " ".join(t for t in texts if t) or str(ev.get("error"))
    return session, result, api_error, status
