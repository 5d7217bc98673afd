"""The QA gate's command: the configured one, else the test runner the repository uses.

The repository is the agent's by the time the gate runs, so it is read through
:mod:`safefs` (no link followed, bounded reads); what is found only chooses among fixed
commands, never runs text taken from the repository on the host.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import safefs
from .errors import UnsafePathError

__all__ = ["QaCommand", "detect_test_command"]

_MAKE_TEST_TARGET = re.compile(r"^test\s*:", re.MULTILINE)


@dataclass(frozen=True)
class QaCommand:
    """A shell command the gate runs in the workspace's clone, and why it was chosen."""

    command: str
    source: str


def _regular(repo: Path, name: str) -> bool:
    try:
        return safefs.check_file(repo, repo / name)
    except UnsafePathError:
        return False


def _text(repo: Path, name: str) -> str:
    try:
        return safefs.read_text(repo, repo / name, 1 << 20) or ""
    except (UnsafePathError, OSError):
        return ""


def _node_command(repo: Path) -> QaCommand | None:
    try:
        pkg = json.loads(_text(repo, "package.json") or "{}")
    except ValueError:
        return None
    scripts = pkg.get("scripts") if isinstance(pkg, dict) else None
    if not isinstance(scripts, dict) or "test" not in scripts:
        return None
    runner = "pnpm" if _regular(repo, "pnpm-lock.yaml") else "yarn" if _regular(repo, "yarn.lock") else "npm"
    return QaCommand(f"{runner} test", "package.json has a test script")


def detect_test_command(repo: Path) -> QaCommand | None:
    """The test command of the repository in ``repo``, or ``None`` when none is recognised.

    Looked for in this order: pytest (``pytest.ini``, ``conftest.py``, a ``[tool.pytest`` section,
    or a ``tests/`` folder beside Python packaging files), a ``test`` script in ``package.json``,
    ``go.mod``, ``Cargo.toml``, a ``test:`` target in the ``Makefile``.
    """
    python = any(_regular(repo, n) for n in ("pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"))
    pytest_config = _regular(repo, "pytest.ini") or _regular(repo, "conftest.py")
    if pytest_config or "[tool.pytest" in _text(repo, "pyproject.toml") or (python and (repo / "tests").is_dir()):
        return QaCommand("python3 -m pytest -q", "the repository uses pytest")
    if _regular(repo, "package.json") and (node := _node_command(repo)):
        return node
    if _regular(repo, "go.mod"):
        return QaCommand("go test ./...", "go.mod")
    if _regular(repo, "Cargo.toml"):
        return QaCommand("cargo test", "Cargo.toml")
    if _regular(repo, "Makefile") and _MAKE_TEST_TARGET.search(_text(repo, "Makefile")):
        return QaCommand("make test", "the Makefile has a test target")
    return None
