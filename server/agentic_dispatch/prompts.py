"""Prompt assembly from templates, and the instruction files dropped into a workspace.

Templates are ``string.Template`` text (``$name``). Built-in ones ship with the
package (``prompts/`` and ``workspace_templates/``); a user's own live in the config
dir under the same names and win on a clash. A template that references a variable
nobody supplied is an error naming *all* the missing variables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Literal

from . import safefs
from .config import builtin_dir
from .errors import InvalidInputError, MissingVariablesError, UnsafePathError
from .naming import check_component

__all__ = [
    "MANAGED_FILES",
    "PromptContext",
    "PromptLibrary",
    "detect_repo_facts",
    "prompt_hash",
]

Kind = Literal["task", "persona", "plan"]
_KIND_DIRS: dict[Kind, str] = {"task": ".", "persona": "personas", "plan": "plans"}
MANAGED_FILES = ("BLOCKED.md", "ANSWER.md", "REVIEW.md")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


@dataclass
class PromptContext:
    """The facts a prompt is assembled from."""

    task: str
    repo: str
    branch: str
    base_branch: str
    template: str
    repo_facts: str = ""
    git_log: str = ""
    persona: str | None = None
    plan_template: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    issue: int | None = None
    pr: int | None = None
    question: str | None = None
    answer: str | None = None


class PromptLibrary:
    """Finds templates (user dir first, then the built-in ones) and renders prompts."""

    def __init__(self, user_prompts: Path, user_workspace_templates: Path) -> None:
        self.prompt_dirs = [user_prompts, builtin_dir("prompts")]
        self.workspace_template_dirs = [user_workspace_templates, builtin_dir("workspace_templates")]

    # -- lookup ----------------------------------------------------------------------------
    def names(self, kind: Kind) -> list[str]:
        found: set[str] = set()
        for base in self.prompt_dirs:
            d = base / _KIND_DIRS[kind]
            if d.is_dir():
                found.update(p.stem for p in d.glob("*.md") if not p.stem.startswith("_"))
        return sorted(found)

    def load(self, kind: Kind, name: str) -> str:
        """The text of template ``name`` of ``kind``.

        Raises:
            InvalidInputError: no such template (the message lists the ones there are).
        """
        field_name = {"task": "template", "persona": "persona", "plan": "plan_template"}[kind]
        check_component(field_name, name)
        for base in self.prompt_dirs:
            path = base / _KIND_DIRS[kind] / f"{name}.md"
            if path.is_file():
                return path.read_text(encoding="utf-8")
        known = ", ".join(self.names(kind)) or "(none)"
        raise InvalidInputError(field_name, f"no {kind} template named {name!r}. Known: {known}.")

    # -- rendering -------------------------------------------------------------------------
    def check(self, template: str, persona: str | None, plan_template: str | None, variables: dict[str, str]) -> None:
        """Validate names and variables before any work is done on disk.

        Raises:
            InvalidInputError: an unknown template, persona or plan.
            MissingVariablesError: the plan template needs variables not in ``variables``.
        """
        self.load("task", template)
        if persona is not None:
            self.load("persona", persona)
        for key in variables:
            if not key.isidentifier():
                raise InvalidInputError("variables", f"{key!r} is not a valid variable name (use letters, _).")
        if plan_template is not None:
            text = self.load("plan", plan_template)
            _substitute(f"plans/{plan_template}", text, {**_placeholder_values(), **variables})

    def render(self, ctx: PromptContext) -> str:
        """Assemble the full prompt for ``ctx``.

        Raises:
            InvalidInputError, MissingVariablesError: as :meth:`check`.
        """
        values = {
            "task": ctx.task.strip(),
            "repo": ctx.repo,
            "branch": ctx.branch,
            "base_branch": ctx.base_branch,
            "repo_facts": ctx.repo_facts.strip() or "(nothing detected)",
            "git_log": ctx.git_log.strip() or "(no commits)",
            "issue": f"#{ctx.issue}" if ctx.issue else "",
            "pr": f"#{ctx.pr}" if ctx.pr else "",
        }
        values["rules"] = self.rules_text(values)
        values["persona"] = (
            _substitute(f"personas/{ctx.persona}", self.load("persona", ctx.persona), values).strip()
            if ctx.persona
            else ""
        )
        values["plan"] = (
            _substitute(
                f"plans/{ctx.plan_template}", self.load("plan", ctx.plan_template), {**values, **ctx.variables}
            ).strip()
            if ctx.plan_template
            else ""
        )
        prompt = _substitute(ctx.template, self.load("task", ctx.template), values)
        if ctx.answer is not None:
            resume = {**values, "question": (ctx.question or "(none)").strip(), "answer": ctx.answer.strip()}
            prompt += "\n\n" + _substitute("resume", self._special("_resume"), resume)
        return _tidy(prompt)

    def answer_message(self, question: str | None, answer: str | None) -> str:
        """The new message of a native resume: the CLI session already holds the task."""
        values = {"question": (question or "(none)").strip(), "answer": (answer or "(no answer was given)").strip()}
        return _tidy(_substitute("answer", self._special("_answer"), values))

    def _rules(self) -> str:
        return self._special("_rules")

    def _special(self, name: str) -> str:
        for base in self.prompt_dirs:
            path = base / f"{name}.md"
            if path.is_file():
                return path.read_text(encoding="utf-8")
        raise FileNotFoundError(f"built-in prompt {name}.md is missing from the installation")

    def render_workspace_files(self, name: str, values: dict[str, str]) -> dict[str, str]:
        """The instruction files of workspace template ``name`` (falls back to ``default``)."""
        files: dict[str, str] = {}
        for chosen in (name, "default"):
            for base in reversed(self.workspace_template_dirs):  # user files override built-in ones
                d = base / chosen
                if d.is_dir():
                    for p in sorted(d.iterdir()):
                        if p.is_file():
                            text = p.read_text(encoding="utf-8")
                            files[p.name] = _substitute(f"workspace_templates/{chosen}/{p.name}", text, values)
            if files:
                return files
        return files

    def rules_text(self, values: dict[str, str]) -> str:
        return _substitute("rules", self._rules(), values)


def _placeholder_values() -> dict[str, str]:
    names = ["task", "repo", "branch", "base_branch", "repo_facts", "git_log", "issue", "pr", "rules", "persona"]
    return dict.fromkeys(names, "")


def _substitute(name: str, text: str, values: dict[str, str]) -> str:
    template = Template(text)
    if not template.is_valid():
        raise InvalidInputError("template", f"{name} has a stray '$' (write '$$' for a literal dollar sign).")
    missing = [v for v in template.get_identifiers() if v not in values]
    if missing:
        raise MissingVariablesError(name, missing)
    return template.substitute(values)


def _tidy(text: str) -> str:
    lines = text.strip().splitlines()
    out: list[str] = []
    for line in lines:
        if line.strip() == "" and out and out[-1].strip() == "":
            continue
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


def detect_repo_facts(repo_dir: Path) -> str:
    """A few lines on the repository's language and how to build and test it."""
    facts: list[str] = []

    def has(*names: str) -> bool:
        return any((repo_dir / n).exists() for n in names)

    if has("pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"):
        facts.append("Language: Python")
        test = "pytest" if has("tests", "test", "pytest.ini", "conftest.py") else "python -m unittest"
        facts.append(f"Build: pip install -e .   Test: {test}")
    if has("package.json"):
        try:
            # the agent may have left a link here (on resume): read it only as a regular file
            pkg = json.loads(safefs.read_text(repo_dir, repo_dir / "package.json", 1 << 20) or "{}")
        except (OSError, ValueError, UnsafePathError):
            pkg = {}
        scripts = pkg.get("scripts", {}) if isinstance(pkg, dict) else {}
        lang = "TypeScript" if has("tsconfig.json") else "JavaScript"
        facts.append(f"Language: {lang} (Node)")
        runner = "pnpm" if has("pnpm-lock.yaml") else "yarn" if has("yarn.lock") else "npm"
        build = f"{runner} run build" if "build" in scripts else f"{runner} install"
        test = f"{runner} test" if "test" in scripts else "(no test script)"
        facts.append(f"Build: {build}   Test: {test}")
    if has("go.mod"):
        facts += ["Language: Go", "Build: go build ./...   Test: go test ./..."]
    if has("Cargo.toml"):
        facts += ["Language: Rust", "Build: cargo build   Test: cargo test"]
    if has("pom.xml"):
        facts += ["Language: Java (Maven)", "Build: mvn -q package   Test: mvn -q test"]
    if has("build.gradle", "build.gradle.kts"):
        facts += ["Language: Java/Kotlin (Gradle)", "Build: ./gradlew build   Test: ./gradlew test"]
    if has("Makefile") and not facts:
        facts += ["Build: make   Test: make test"]
    if not facts:
        facts.append("Language: not detected (look at the files to find out)")
    return "\n".join(facts)
