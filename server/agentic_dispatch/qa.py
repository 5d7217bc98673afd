"""The QA gate's command: the configured one, else the test runner the repository uses.

The repository is the agent's by the time the gate runs, so its files are read through
:mod:`safefs` (no link followed, bounded reads) and its test folders listed link-free and within
bounds; what is found only chooses among fixed commands, never runs text taken from the
repository on the host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import stat
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from . import safefs
from .errors import UnsafePathError

__all__ = ["MAX_SCANNED_DEPTH", "MAX_SCANNED_ENTRIES", "QaCommand", "detect_test_command"]

_MAKE_TEST_TARGET = re.compile(r"^test\s*:", re.MULTILINE)
# pytest's own default for the files it collects (python_files = test_*.py *_test.py).
_PYTEST_FILE = re.compile(r"^(test_.+|.+_test)\.py$")
_TEST_FOLDERS = ("tests", "test")
# The search for test files reads the agent's tree: it lists at most this many entries in all, in
# folders at most this many levels deep (the test folder is level 1), and never enters a link.
MAX_SCANNED_ENTRIES = 5000
MAX_SCANNED_DEPTH = 8
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _is_folder(repo: Path, name: str) -> bool:
    """Whether ``repo/name`` is a real folder (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(repo / name).st_mode)
    except OSError:
        return False


def _listing(parent: int, name: str, depth: int) -> Generator[tuple[str, bool]]:
    """Every entry of the folder ``name`` (opened from the folder fd ``parent``, never through a
    link) and of the folders below it down to :data:`MAX_SCANNED_DEPTH`: its name, and whether it
    is a regular file. Lazy: a caller that stops early lists no more."""
    try:
        fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
    except OSError:  # a link (O_NOFOLLOW), missing, not a folder, or not ours to read
        return
    try:
        folders: list[str] = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    yield entry.name, entry.is_file(follow_symlinks=False)
                    if depth < MAX_SCANNED_DEPTH and entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
        except OSError:  # the folder changed under us or cannot be read: what was listed stands
            return
        for folder in folders:
            yield from _listing(fd, folder, depth + 1)
    finally:
        os.close(fd)


def _python_test_folder(repo: Path) -> str | None:
    """The test folder (``tests/``, ``test/``) holding ``test_*.py`` or ``*_test.py`` files, looked
    for among at most :data:`MAX_SCANNED_ENTRIES` entries, without following links."""
    try:
        top = os.open(repo, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the clone's root: a mount root, ours
    except OSError:
        return None
    try:
        listings = [(name, _listing(top, name, 1)) for name in _TEST_FOLDERS]
        budget = MAX_SCANNED_ENTRIES
        for name, listing in listings:
            with contextlib.closing(listing):  # closes the folders still open when the search stops early
                for entry, is_file in itertools.islice(listing, budget):
                    budget -= 1
                    if is_file and _PYTEST_FILE.match(entry):
                        return name
        return None
    finally:
        os.close(top)


def detect_test_command(repo: Path) -> QaCommand | None:
    """The test command of the repository in ``repo``, or ``None`` when none is recognised.

    Looked for in this order: pytest (``pytest.ini``, ``conftest.py``, a ``[tool.pytest`` section,
    or a ``tests/`` folder beside Python packaging files), a ``test`` script in ``package.json``,
    ``go.mod``, ``Cargo.toml``, a ``test:`` target in the ``Makefile``; last, pytest again for a
    ``tests/`` (or ``test/``) folder holding ``test_*.py`` or ``*_test.py`` files (a bounded search).
    """
    python = any(_regular(repo, n) for n in ("pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"))
    pytest_config = _regular(repo, "pytest.ini") or _regular(repo, "conftest.py")
    if pytest_config or "[tool.pytest" in _text(repo, "pyproject.toml") or (python and _is_folder(repo, "tests")):
        return QaCommand("python3 -m pytest -q", "the repository uses pytest")
    if _regular(repo, "package.json") and (node := _node_command(repo)):
        return node
    if _regular(repo, "go.mod"):
        return QaCommand("go test ./...", "go.mod")
    if _regular(repo, "Cargo.toml"):
        return QaCommand("cargo test", "Cargo.toml")
    if _regular(repo, "Makefile") and _MAKE_TEST_TARGET.search(_text(repo, "Makefile")):
        return QaCommand("make test", "the Makefile has a test target")
    if folder := _python_test_folder(repo):
        return QaCommand("python3 -m pytest -q", f"{folder}/ holds test_*.py or *_test.py files")
    return None
