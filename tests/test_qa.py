"""The QA gate: after an agent ends completed, the repository's tests run in a fresh container
on the same clone; a failing suite fails the workspace with the test summary, and a resume
runs the agent and the gate again. Real git, real containers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.qa import detect_test_command
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git

# The agent fixes the test only once it has an answer: the first run leaves it failing.
FIX_WHEN_ANSWERED = (
    "if [ -f ANSWER.md ]; then sed -i 's/== 3/== 2/' test_math.py && git commit -qam 'Fix the sum'; "
    "else echo 'note' > NOTES.txt && git add NOTES.txt && git commit -qm 'Add notes'; fi"
)


def _python_repo(tmp_path: Path, expected: int) -> Path:
    repo = tmp_path / "py-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "user@example.com")
    git(repo, "config", "user.name", "User")
    (repo / "pyproject.toml").write_text("[project]\nname = 'sums'\n\n[tool.pytest.ini_options]\n", encoding="utf-8")
    (repo / "test_math.py").write_text(
        f"def test_sum():\n    assert 1 + 1 == {expected}\n\n\ndef test_other():\n    assert True\n", encoding="utf-8"
    )
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


def _config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


@pytest.fixture
def svc(docker_env: str, docker_client: docker.DockerClient, isolated_home: Path) -> Iterator[Dispatcher]:
    _config(isolated_home, "[qa]\nenabled = true\n")
    settings, paths = load_settings()
    service = Dispatcher(settings, paths, DockerRuntime(docker_client))
    service.start()
    yield service
    service.close()


def test_a_repository_whose_tests_fail_ends_failed_with_the_test_summary_as_the_reason(
    svc: Dispatcher, tmp_path: Path
) -> None:
    repo = _python_repo(tmp_path, expected=3)
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=FIX_WHEN_ANSWERED, agent="shell"))
    rec = svc.wait(res.workspace, 90)
    assert rec.status == Status.FAILED, rec
    assert rec.exit_code == 0, "the agent itself succeeded: the gate failed the run"
    assert rec.qa is not None and rec.qa.state == "failed" and rec.qa.command == "python3 -m pytest -q"
    assert "1 failed, 1 passed" in (rec.qa.reason or ""), rec.qa
    assert "QA gate failed" in (rec.reason or "") and "1 failed" in (rec.reason or "")
    row = svc.status(res.workspace).workspaces[0]
    assert row.qa is not None and row.qa.state == "failed"
    assert "FAILED test_math.py::test_sum" in (row.qa.output_tail or "")


def test_a_repository_whose_tests_pass_ends_completed_with_qa_passed(svc: Dispatcher, tmp_path: Path) -> None:
    repo = _python_repo(tmp_path, expected=2)
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=FIX_WHEN_ANSWERED, agent="shell"))
    rec = svc.wait(res.workspace, 90)
    assert rec.status == Status.COMPLETED, rec.reason
    assert rec.qa is not None and rec.qa.state == "passed" and rec.qa.exit_code == 0
    assert "2 passed" in (rec.qa.output_tail or "")


def test_resume_after_a_failed_gate_runs_the_agent_and_the_gate_again(svc: Dispatcher, tmp_path: Path) -> None:
    repo = _python_repo(tmp_path, expected=3)
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=FIX_WHEN_ANSWERED, agent="shell"))
    assert svc.wait(res.workspace, 90).status == Status.FAILED
    svc.resume(res.workspace, answer="The test expects the wrong sum: fix it.")
    rec = svc.wait(res.workspace, 90)
    assert rec.status == Status.COMPLETED, rec.reason
    assert rec.runs == 2 and rec.qa is not None and rec.qa.state == "passed"
    assert git(Path(res.repo_path), "log", "-1", "--format=%s") == "Fix the sum"
    logs = sorted(p.name for p in (Path(res.path) / ".meta" / "logs").iterdir())
    assert "qa-run1.log" in logs and "qa-run2.log" in logs, logs


def test_dispatch_with_qa_false_skips_the_gate_the_config_turns_on(svc: Dispatcher, tmp_path: Path) -> None:
    repo = _python_repo(tmp_path, expected=3)
    res = svc.dispatch(DispatchRequest(repo=str(repo), task=FIX_WHEN_ANSWERED, agent="shell", qa=False))
    rec = svc.wait(res.workspace, 90)
    assert rec.status == Status.COMPLETED and rec.qa is None


def test_a_repository_with_no_test_command_completes_with_qa_skipped_and_why(svc: Dispatcher, user_repo: Path) -> None:
    os.remove(user_repo / "pyproject.toml")
    git(user_repo, "commit", "-qam", "no python")
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell"))
    rec = svc.wait(res.workspace, 60)
    assert rec.status == Status.COMPLETED
    assert rec.qa is not None and rec.qa.state == "skipped" and "no test command" in (rec.qa.reason or "")


def test_a_gate_past_its_own_timeout_is_stopped_and_fails_the_run_with_that_reason(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path
) -> None:
    _config(isolated_home, '[qa]\nenabled = true\ncommand = "echo testing; sleep 60"\ntimeout_seconds = 2\n')
    settings, paths = load_settings()
    service = Dispatcher(settings, paths, DockerRuntime(docker_client))
    service.start()
    try:
        res = service.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell"))
        rec = service.wait(res.workspace, 30)
    finally:
        service.close()
    assert rec.status == Status.FAILED and "the QA gate timed out after 2 s" in (rec.reason or "")
    assert rec.qa is not None and rec.qa.state == "failed" and "testing" in (rec.qa.output_tail or "")
    assert (
        docker_client.containers.list(all=True, filters={"label": f"agentic-dispatch.workspace={res.workspace}"}) == []
    )


def test_the_test_command_is_detected_from_the_repository_files(tmp_path: Path) -> None:
    cases = {
        "pytest.ini": ("[pytest]\n", "python3 -m pytest -q"),
        "package.json": ('{"scripts": {"test": "vitest"}}', "npm test"),
        "go.mod": ("module x\n", "go test ./..."),
        "Cargo.toml": ("[package]\n", "cargo test"),
        "Makefile": ("build:\n\ttrue\ntest:\n\ttrue\n", "make test"),
    }
    for name, (text, command) in cases.items():
        repo = tmp_path / name.replace(".", "-")
        repo.mkdir()
        (repo / name).write_text(text, encoding="utf-8")
        found = detect_test_command(repo)
        assert found is not None and found.command == command, (name, found)
    bare = tmp_path / "nothing"
    bare.mkdir()
    (bare / "Makefile").write_text("build:\n\ttrue\n", encoding="utf-8")
    (bare / "package.json").write_text('{"scripts": {"build": "tsc"}}', encoding="utf-8")
    assert detect_test_command(bare) is None


def test_a_link_the_agent_left_in_place_of_package_json_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"scripts": {"test": "steal"}}', encoding="utf-8")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "package.json").symlink_to(outside)
    assert detect_test_command(repo) is None
