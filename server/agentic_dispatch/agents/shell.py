"""The ``shell`` agent: the task text is a bash script. No model involved."""

from __future__ import annotations

from pathlib import Path

from ..models import RunSummary
from .base import CONTAINER_RUN, CONTAINER_WORKDIR, LaunchPlan, LoginFile, RunContext, log_runs

__all__ = ["ShellAgent"]


class ShellAgent:
    """Runs the task text as a bash script in the container. Useful for scripted jobs across
    repositories, and to test the machinery without an LLM."""

    base = "shell"
    description = "runs the task text as a bash script (no LLM)"
    cli: str | None = None
    key_env: tuple[str, ...] = ()
    login_files: tuple[LoginFile, ...] = ()

    def plan(self, ctx: RunContext) -> LaunchPlan:
        env = {"AGENTIC_RUN": str(ctx.run), **ctx.env}
        if ctx.answer is not None:
            env["AGENTIC_ANSWER_FILE"] = f"{CONTAINER_WORKDIR}/ANSWER.md"
        return LaunchPlan(argv=["/bin/bash", f"{CONTAINER_RUN}/task.sh"], env=env)

    def summarize(self, log_path: Path) -> RunSummary | None:
        runs = log_runs(log_path)
        if not runs:
            return None
        lines = [ln for ln in runs[-1] if ln.strip()]
        return RunSummary(final_message=lines[-1] if lines else None)

    def has_session(self, home: Path, session_id: str) -> bool:
        return False
