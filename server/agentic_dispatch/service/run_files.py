"""The files of one run: the prompt (rendered, size-checked), the instruction files the agent
reads, the task script, and the saved template variables a resume renders with again."""

from __future__ import annotations

import json
import os

from .. import safefs
from ..errors import InvalidInputError
from ..models import WorkspaceRecord
from ..prompts import MANAGED_FILES, PromptContext, PromptLibrary, detect_repo_facts, prompt_hash
from ..store import WorkspacePaths
from ..workspace import exclude_paths, recent_log

__all__ = ["MAX_PROMPT_BYTES", "RunFiles"]

# A prompt travels on the CLI's command line; Linux caps one argument at 128 KiB.
MAX_PROMPT_BYTES = 120_000


class RunFiles:
    """Renders prompts and writes what a run reads from its workspace."""

    def __init__(self, prompts: PromptLibrary) -> None:
        self.prompts = prompts

    def render(
        self, ws: WorkspacePaths, record: WorkspaceRecord, variables: dict[str, str], native: bool = False
    ) -> str:
        """The prompt of run ``record.runs``; on a native resume (the CLI's session already holds the
        task) just the new message with the question and the answer. Writes nothing.

        Raises:
            InvalidInputError: the prompt is too long to pass to a CLI.
        """
        if native:
            prompt = self.prompts.answer_message(record.question, record.answer)
        else:
            ctx = PromptContext(
                task=record.task,
                repo=f"{record.org}/{record.repo_name}",
                branch=record.branch,
                base_branch=record.base_branch or "HEAD",
                template=record.template,
                repo_facts=detect_repo_facts(ws.repo),
                git_log=recent_log(ws.repo),
                persona=record.persona,
                plan_template=record.plan_template,
                variables=variables,
                issue=record.issue,
                pr=record.pr,
                question=record.question if record.answer is not None else None,
                answer=record.answer,
            )
            prompt = self.prompts.render(ctx)
        size = len(prompt.encode())
        if size > MAX_PROMPT_BYTES:
            what = "answer" if record.runs > 1 else "task"
            raise InvalidInputError(
                what, f"makes a prompt of {size} bytes; agents take at most {MAX_PROMPT_BYTES}. Shorten the {what}."
            )
        return prompt

    def prepare(
        self, ws: WorkspacePaths, record: WorkspaceRecord, variables: dict[str, str], prompt: str | None = None
    ) -> str:
        """Write the instruction files, the prompt and the task script for run ``record.runs``;
        sets ``record.prompt_sha256``. ``prompt`` is the one :meth:`render` made (rendered here when not given).

        Raises:
            InvalidInputError: the prompt is too long to pass to a CLI (nothing is written).
            UnsafePathError: the agent left a link where an instruction file goes.
        """
        if prompt is None:
            prompt = self.render(ws, record, variables)
        for d in (ws.meta, ws.logs, ws.home, ws.meta / "run"):
            d.mkdir(parents=True, exist_ok=True)
        self._write_instruction_files(ws, record)
        ws.prompt(record.runs).write_text(prompt, encoding="utf-8")
        run_dir = ws.meta / "run"
        (run_dir / "prompt.md").write_text(prompt, encoding="utf-8")
        (run_dir / "task.sh").write_text(record.task + "\n", encoding="utf-8")
        record.prompt_sha256 = prompt_hash(prompt)
        if variables:
            (ws.meta / "variables.json").write_text(json.dumps(variables, indent=2), encoding="utf-8")
        return prompt

    def _write_instruction_files(self, ws: WorkspacePaths, record: WorkspaceRecord) -> None:
        """The workspace template named like the task template (yours or ours), else `default`;
        never over the repository's own instruction files."""
        rules = self.prompts.rules_text({"branch": record.branch, "base_branch": record.base_branch or "HEAD"})
        managed = self._managed_instruction_files(ws)
        written: list[str] = []
        for fname, text in self.prompts.render_workspace_files(record.template, {"rules": rules}).items():
            dest = ws.repo / fname
            if not (os.path.lexists(dest) and fname not in managed):
                safefs.write_text(ws.repo, dest, text)
                written.append(fname)
        (ws.meta / "instruction-files").write_text("\n".join(written), encoding="utf-8")
        exclude_paths(ws.repo, [*MANAGED_FILES, *written])

    @staticmethod
    def _managed_instruction_files(ws: WorkspacePaths) -> set[str]:
        try:
            return set((ws.meta / "instruction-files").read_text(encoding="utf-8").split())
        except FileNotFoundError:
            return set()

    @staticmethod
    def saved_variables(ws: WorkspacePaths) -> dict[str, str]:
        """The template variables the dispatch gave (a resume renders the prompt with them again)."""
        try:
            data = json.loads((ws.meta / "variables.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}
