"""With no container engine reachable, the views still answer at once from the records alone and
say the engine is away; nothing is decided about a run while its container cannot be seen. These
tests need no engine: ``DOCKER_HOST`` points at a port nothing listens on."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
from mcp import Client

from agentic_dispatch import cli
from agentic_dispatch.config import load_settings
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore
from tests.conftest import call, server_params

RECORDS = {
    "acme/app/task-1": Status.QUEUED,
    "acme/app/task-2": Status.RUNNING,
    "acme/app/task-3": Status.COMPLETED,
    "acme/web/task-4": Status.FAILED,
}


@pytest.fixture
def records(no_engine: str) -> StatusStore:
    _, paths = load_settings()
    store = StatusStore.of(paths)
    for name, status in RECORDS.items():
        org, repo, _ = name.split("/")
        store.create(
            WorkspaceRecord(
                name=name,
                status=status,
                agent="shell",
                repo=f"{org}/{repo}",
                org=org,
                repo_name=repo,
                origin_url="https://example.invalid/x.git",
                task="t",
                branch=f"agent/{name[-6:]}",
                template="coding",
                timeout_seconds=600,
                runs=1,
                started_at="2026-12-06T10:00:00Z",
                container_id="f" * 64 if status == Status.RUNNING else None,
                reason="the agent exited with code 3" if status == Status.FAILED else None,
            )
        )
    return store


def test_cli_status_with_the_engine_unreachable_lists_every_record_says_so_and_exits_0(
    records: StatusStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {w["name"]: w["status"] for w in report["workspaces"]} == {n: s.value for n, s in RECORDS.items()}
    assert any("engine cannot be reached" in note for note in report["notes"]), report["notes"]
    running = records.read("acme/app/task-2")
    assert running.status == Status.RUNNING and running.reason is None, "nothing is decided while the engine is away"


def test_the_table_with_the_engine_unreachable_says_so_once(
    records: StatusStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot be reached") == 1, out
    assert all(name in out for name in RECORDS)


def test_agentic_status_with_the_engine_unreachable_answers_with_every_record_and_says_so(
    records: StatusStore, no_engine: str
) -> None:
    async def run(client: Client) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:  # the server's first timer tick finds the engine away: wait for it (bounded)
            report = await call(client, "agentic_status")
            if any("cannot be reached" in n for n in report["notes"]) or time.monotonic() > deadline:
                return report
            await anyio.sleep(0.2)

    async def main() -> dict[str, Any]:
        async with Client(server_params({"DOCKER_HOST": no_engine}), read_timeout_seconds=60) as client:
            return await run(client)

    report = anyio.run(main)
    assert {w["name"]: w["status"] for w in report["workspaces"]} == {n: s.value for n, s in RECORDS.items()}
    assert any("cannot be reached" in n for n in report["notes"]), report["notes"]
    failed = next(w for w in report["workspaces"] if w["status"] == "failed")
    assert failed["reason"] == "the agent exited with code 3" and failed["question"] is None


def test_a_pool_paused_after_fast_failures_is_released_by_unfreeze(no_engine: str) -> None:
    """Before: agentic_dispatch_start cleared only the frozen flag; a pause (30 minutes by default)
    could not be lifted by any tool or command."""
    svc = Dispatcher(*load_settings(), DockerRuntime())
    for _ in range(svc.settings.limits.fast_fail_count):
        svc.scheduler.note_failure("shell", 1.0)
    assert [h.pool for h in svc.status().holds if "fast failures" in h.reason] == ["shell"]
    state = svc.unfreeze()
    assert "lifted the pause of pool(s) shell" in state.message, state.message
    assert not [h for h in svc.status().holds if "fast failures" in h.reason]
