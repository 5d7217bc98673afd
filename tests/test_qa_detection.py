"""The QA gate's test command, found from the repository's own files: a folder of pytest-style test
files is enough, and the search for them stays inside the repository and within bounds, whatever
the agent left there (links out of it, huge or deep trees). Real files, no engine."""

from __future__ import annotations

import os
from pathlib import Path

from agentic_dispatch import qa
from agentic_dispatch.qa import detect_test_command

PYTEST = "python3 -m pytest -q"


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    repo.mkdir(exist_ok=True)
    return repo


def _command(repo: Path) -> str | None:
    found = detect_test_command(repo)
    return None if found is None else found.command


def test_a_tests_folder_of_test_files_without_packaging_files_is_run_with_pytest(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/test_sums.py": "def test_sum():\n    assert 1 + 1 == 2\n", "sums.py": ""})
    found = detect_test_command(repo)
    assert found is not None and found.command == PYTEST
    assert "test_*.py" in found.source


def test_test_files_named_the_other_pytest_way_deep_in_the_tests_folder_are_found(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/unit/api/sums_test.py": "", "tests/unit/README.md": "", "tests/data.json": "{}"})
    assert _command(repo) == PYTEST


def test_a_tests_folder_without_test_files_is_not_taken_for_pytest(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/helpers.py": "", "tests/fixtures/test_data.json": "{}", "tests/testing.py": ""})
    assert _command(repo) is None


def test_an_explicit_test_command_wins_over_test_files_found_alone(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/test_sums.py": "", "Makefile": "test:\n\tpython3 -m unittest\n"})
    assert _command(repo) == "make test"


def test_a_tests_folder_that_is_a_link_out_of_the_repository_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "test_host.py").write_text("", encoding="utf-8")
    repo = _repo(tmp_path, {"README.md": ""})
    (repo / "tests").symlink_to(outside, target_is_directory=True)
    assert _command(repo) is None


def test_links_inside_the_tests_folder_are_neither_entered_nor_counted(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "test_host.py").write_text("", encoding="utf-8")
    repo = _repo(tmp_path, {"tests/README.md": ""})
    (repo / "tests" / "linked").symlink_to(outside, target_is_directory=True)
    (repo / "tests" / "test_linked.py").symlink_to(outside / "test_host.py")
    assert _command(repo) is None


def test_a_fifo_named_like_a_test_file_is_not_a_test_file(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/README.md": ""})
    os.mkfifo(repo / "tests" / "test_pipe.py")
    assert _command(repo) is None


def test_the_search_stops_after_a_bounded_number_of_entries(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"tests/deeper/test_late.py": ""})
    for i in range(qa.MAX_SCANNED_ENTRIES):
        (repo / "tests" / f"data-{i}.txt").touch()
    assert _command(repo) is None  # the test file lies past the bound: not looked at
    (repo / "tests" / "data-0.txt").unlink()
    (repo / "tests" / "data-1.txt").unlink()
    assert _command(repo) == PYTEST  # within the bound it is found


def test_the_search_stops_at_a_bounded_depth(tmp_path: Path) -> None:
    deep = "/".join(f"d{i}" for i in range(qa.MAX_SCANNED_DEPTH))
    repo = _repo(tmp_path, {f"tests/{deep}/test_deep.py": ""})
    assert _command(repo) is None
    shallower = "/".join(f"d{i}" for i in range(qa.MAX_SCANNED_DEPTH - 1))
    repo2 = _repo(tmp_path / "two", {f"tests/{shallower}/test_deep.py": ""})
    assert _command(repo2) == PYTEST
