"""Google Gemini CLI, headless: ``gemini -p --yolo -o stream-json``.

From docs/agent-clis.md: ``--skip-trust`` is needed for ``--yolo`` to hold, the API key
needs ``security.auth.selectedType`` in ``~/.gemini/settings.json``, the final message is
the assistant text streamed after the last tool result, and ``stats`` cover this run.

With ``selectedType = "gemini-api-key"`` Gemini CLI reads the key from ``GEMINI_API_KEY``
only (``validateAuthMethod`` and ``createContentGeneratorConfig`` in 0.61.0; it reads
``GOOGLE_API_KEY`` for Vertex AI, which this adapter never selects). A key the server has
only as ``GOOGLE_API_KEY`` is therefore passed to the container as ``GEMINI_API_KEY``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models import RunSummary
from .base import LaunchPlan, LoginFile, RunContext, as_dict, as_int, json_events, log_runs, provider_refusal

__all__ = ["GeminiAgent"]

# Gemini CLI uses min(general.maxAttempts, 10); the config refuses more than 9 retries for
# gemini, and the clamp keeps a plan honest for a context built some other way.
MAX_ATTEMPTS = 10


class GeminiAgent:
    base = "gemini"
    description = "Google Gemini CLI (gemini -p)"
    cli: str | None = "gemini"
    key_env: tuple[str, ...] = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    login_files: tuple[LoginFile, ...] = (
        LoginFile(".gemini/oauth_creds.json", ".gemini/oauth_creds.json"),
        LoginFile(".gemini/google_accounts.json", ".gemini/google_accounts.json"),
    )

    def plan(self, ctx: RunContext) -> LaunchPlan:
        argv = ["gemini", "-p", ctx.prompt, "--yolo", "--skip-trust", "-o", "stream-json"]
        if ctx.model:
            argv += ["-m", ctx.model]  # without it, "auto" adds a routing call to another model
        if ctx.resume_session:
            argv += ["--resume", ctx.resume_session]
        env = dict(ctx.env)
        if "GEMINI_API_KEY" not in env and "GOOGLE_API_KEY" in env:
            env["GEMINI_API_KEY"] = env.pop("GOOGLE_API_KEY")  # the only name gemini-api-key auth reads
        if ctx.base_url:
            env["GOOGLE_GEMINI_BASE_URL"] = ctx.base_url
        api_key = "GEMINI_API_KEY" in env
        general: dict[str, Any] = {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}
        if ctx.max_retries is not None:
            general["maxAttempts"] = min(ctx.max_retries + 1, MAX_ATTEMPTS)
        settings = {
            "security": {"auth": {"selectedType": "gemini-api-key" if api_key else "oauth-personal"}},
            "general": general,
            "privacy": {"usageStatisticsEnabled": False},
        }
        return LaunchPlan(argv=argv, env=env, home_files={".gemini/settings.json": json.dumps(settings, indent=2)})

    def summarize(self, log_path: Path) -> RunSummary | None:
        runs = log_runs(log_path)
        if not runs:
            return None
        session: str | None = None
        chunks: list[str] = []
        tools = 0
        result: dict[str, Any] | None = None
        for ev in json_events(runs[-1]):
            kind = ev.get("type")
            if kind == "init" and isinstance(ev.get("session_id"), str):
                session = ev["session_id"]
            elif kind == "tool_use":
                tools += 1
            elif kind == "tool_result":
                chunks = []
            elif kind == "message" and ev.get("role") == "assistant" and isinstance(ev.get("content"), str):
                chunks.append(ev["content"])
            elif kind == "result":
                result = ev
        final = "".join(chunks).strip() or None
        turns = tools + (1 if final else 0) or None
        if result is None:
            return RunSummary(final_message=final, session_id=session, turns=turns)
        stats = as_dict(result.get("stats"))
        error = None
        if result.get("status") != "success":
            err = result.get("error")
            error = str(err.get("message") if isinstance(err, dict) else err or "error")
        refused, after = provider_refusal(error, as_dict(result.get("error")).get("code"))
        return RunSummary(
            final_message=None if error else final,
            turns=turns,
            input_tokens=as_int(stats.get("input_tokens")),
            output_tokens=as_int(stats.get("output_tokens")),
            session_id=session,
            error=error,
            error_status=refused if error else None,
            retry_after_seconds=after,
        )

    def has_session(self, home: Path, session_id: str) -> bool:
        tmp = home / ".gemini" / "tmp"
        return tmp.is_dir() and any(tmp.glob(f"*/chats/session-*{session_id[:8]}*.json*"))
