"""OpenAI Codex CLI, headless: ``codex exec --json``.

Facts this relies on are measured in docs/agent-clis.md: usage in ``turn.completed`` is
summed over the whole thread (so a resumed run's own usage is the difference), and
without ``--disable unbounded_connection_retries`` Codex never gives up on a provider
it cannot reach; without ``--disable shell_snapshot`` it writes the shell's environment
(the API key included) to ``~/.codex/shell_snapshots/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models import RunSummary
from .base import LaunchPlan, LoginFile, RunContext, as_dict, as_int, json_events, log_runs, provider_refusal

__all__ = ["CodexAgent"]

PROVIDER = "agentic"  # must not be a built-in provider id (openai, ollama, lmstudio)
# Without an API key the login in auth.json is the credential. Codex refuses to redefine the
# built-in `openai` provider ("model_providers contains reserved built-in provider IDs"), and
# has no other setting for its retries, so retries or a base URL need our own provider with
# the built-in's auth: requires_openai_auth, and no base_url of its own unless one is
# configured (Codex then picks chatgpt.com/backend-api/codex for a ChatGPT login and
# api.openai.com/v1 for a key login). The name "OpenAI" keeps what Codex enables for the
# OpenAI provider only (ModelProviderInfo.is_openai: remote compaction).
OPENAI_NAME = "OpenAI"
# Codex shows this text, not the provider's, for every HTTP 5xx (measured; no log level shows more).
HTTP_5XX_TEXT = "We\u2019re currently experiencing high demand"
WORK_ITEMS = {"command_execution", "agent_message", "file_change", "mcp_tool_call", "web_search"}


class CodexAgent:
    base = "codex"
    description = "OpenAI Codex CLI (codex exec)"
    cli: str | None = "codex"
    key_env: tuple[str, ...] = ("OPENAI_API_KEY",)
    # Codex refreshes auth.json in place: one shared read-write file, so runs are serialised.
    login_files: tuple[LoginFile, ...] = (LoginFile(".codex/auth.json", ".codex/auth.json", "mount"),)

    def plan(self, ctx: RunContext) -> LaunchPlan:
        options = [
            "--json",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",  # the container is the sandbox
            "--disable",
            "plugins",
            "--disable",
            "unbounded_connection_retries",
            # A shell snapshot is a file in the agent home listing the shell's whole environment,
            # API key included: keys must not be written under the workspaces root.
            "--disable",
            "shell_snapshot",
            "-c",
            "analytics.enabled=false",
        ]
        if ctx.model:
            options += ["-m", ctx.model]
        if ctx.base_url or ctx.max_retries is not None:
            provider: dict[str, Any]
            if "OPENAI_API_KEY" in ctx.env:
                provider = {
                    "name": PROVIDER,
                    "base_url": ctx.base_url or "https://api.openai.com/v1",
                    "wire_api": "responses",
                    "env_key": "OPENAI_API_KEY",
                }
            else:  # the login in auth.json (see OPENAI_NAME)
                provider = {"name": OPENAI_NAME, "wire_api": "responses", "requires_openai_auth": True}
                if ctx.base_url:
                    provider["base_url"] = ctx.base_url
            if ctx.max_retries is not None:
                provider["request_max_retries"] = ctx.max_retries
                provider["stream_max_retries"] = ctx.max_retries
            inline = ",".join(f"{k}={json.dumps(v)}" for k, v in provider.items())
            options += ["-c", f"model_provider={PROVIDER}", "-c", f"model_providers.{PROVIDER}={{{inline}}}"]
        if ctx.resume_session:
            argv = ["codex", "exec", "resume", *options, ctx.resume_session, ctx.prompt]
        else:
            argv = ["codex", "exec", *options, ctx.prompt]
        return LaunchPlan(argv=argv, env=dict(ctx.env))

    def summarize(self, log_path: Path) -> RunSummary | None:
        runs = [_Run(lines) for lines in log_runs(log_path)]
        if not runs:
            return None
        this = runs[-1]
        earlier = next((r for r in reversed(runs[:-1]) if r.thread and r.thread == this.thread and r.usage), None)
        inp, out = this.tokens("input_tokens"), this.tokens("output_tokens")
        if earlier is not None and inp is not None and out is not None:  # usage is per thread, not per run
            inp -= earlier.tokens("input_tokens") or 0
            out -= earlier.tokens("output_tokens") or 0
        refused, after = provider_refusal(this.error)
        if refused is None and this.error and HTTP_5XX_TEXT in this.error:
            refused = 503  # Codex's words for any 5xx
        return RunSummary(
            final_message=this.final,
            turns=this.turns or None,
            input_tokens=inp,
            output_tokens=out,
            session_id=this.thread,
            error=this.error,
            error_status=refused,
            retry_after_seconds=after,
        )

    def has_session(self, home: Path, session_id: str) -> bool:
        sessions = home / ".codex" / "sessions"
        return sessions.is_dir() and any(sessions.rglob(f"rollout-*{session_id}.jsonl"))


class _Run:
    """What one run's events say."""

    def __init__(self, lines: list[str]) -> None:
        self.thread: str | None = None
        self.final: str | None = None
        self.turns = 0
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        last_error: str | None = None
        for ev in json_events(lines):
            kind = ev.get("type")
            item = as_dict(ev.get("item"))
            if kind == "thread.started" and isinstance(ev.get("thread_id"), str):
                self.thread = ev["thread_id"]
            elif kind == "item.completed" and item.get("type") in WORK_ITEMS:
                self.turns += 1
                if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                    self.final = item["text"]
            elif kind == "turn.completed" and isinstance(ev.get("usage"), dict):
                self.usage = ev["usage"]
            elif kind == "turn.failed":
                msg = as_dict(ev.get("error")).get("message")
                self.error = str(msg or last_error or "the turn failed")
            elif kind == "error" and isinstance(ev.get("message"), str) and not ev["message"].startswith("Reconn"):
                last_error = ev["message"]  # ("Reconnecting... n/5" is a retry in progress, not the failure)
        if self.error is None and last_error is not None and self.usage is None:
            self.error = last_error
        if self.error and self.error.startswith(HTTP_5XX_TEXT):  # Codex's words for any 5xx: say what it was
            self.error = f"the provider answered with a server error (HTTP 5xx): {self.error}"

    def tokens(self, key: str) -> int | None:
        return as_int(self.usage.get(key)) if self.usage else None
