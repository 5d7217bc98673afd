"""State files replaced under the server (by hand, by a crash, by a full disk) give clear tool errors
and CLI messages, never a bare "Error executing tool", a traceback or a hang; nothing is overwritten.
No engine is needed: DOCKER_HOST points nowhere."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from agentic_dispatch import cli
from agentic_dispatch.config import load_settings
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.models import Status, WorkspaceRecord
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

NAME = "acme/app/task-1"


def _record() -> WorkspaceRecord:
    return WorkspaceRecord(
        name=NAME, status=Status.FAILED, agent="shell", repo="acme/app", org="acme", repo_name="app",
        origin_url="https://example.invalid/acme/app.git", task="t", branch="agent/task-1-t", template="coding",
        timeout_seconds=60, runs=1, reason="the agent exited with code 3",
    )  # fmt: skip


def _replace_record(make: Callable[[Path], None]) -> Path:
    _, paths = load_settings()
    store = StatusStore.of(paths)
    store.create(_record())
    path = store.paths(NAME).status
    path.unlink()
    make(path)
    return path


KINDS: dict[str, Callable[[Path], None]] = {"folder": Path.mkdir, "fifo": os.mkfifo}
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("agentic_status", {"workspace": NAME}),
    ("agentic_resume", {"workspace": NAME}),
    ("agentic_cancel", {"workspace": NAME}),
    ("agentic_sync", {"workspace": NAME}),
    ("agentic_logs", {"workspace": NAME}),
    ("agentic_diff", {"workspace": NAME}),
]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_record_that_is_a_folder_or_a_fifo_gives_clear_errors_from_every_tool_and_is_left_alone(
    kind: str, no_engine: str
) -> None:
    path = _replace_record(KINDS[kind])
    server = build_server(lambda: Dispatcher(*load_settings(), DockerRuntime()))

    async def run() -> dict[str, tuple[bool, str, Any]]:
        out = {}
        async with Client(server) as client:
            for tool, args in CALLS:
                with anyio.fail_after(30):  # a FIFO must never be waited on
                    res = await client.call_tool(tool, args)
                text = " ".join(getattr(c, "text", "") for c in res.content)
                out[tool] = (res.is_error, text, res.structured_content)
        return out

    seen = anyio.run(run)
    status_error, _, report = seen.pop("agentic_status")
    assert not status_error and report is not None
    (row,) = report["workspaces"]
    assert row["status"] == "unreadable" and "not a regular file" in row["error"], row
    for tool, (is_error, text, _) in seen.items():
        assert is_error, tool
        assert "not a valid workspace record" in text and "not a regular file" in text, (tool, text)
    assert path.is_dir() if kind == "folder" else path.is_fifo(), "left as it was"


def test_cli_status_of_a_record_that_is_a_folder_reports_it_and_exits_0(
    no_engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _replace_record(Path.mkdir)
    assert cli.main(["status", NAME, "--json"]) == 0
    assert "not a regular file" in capsys.readouterr().out


def test_an_events_log_that_cannot_be_read_is_a_clear_cli_error_and_a_clear_tool_error(
    no_engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a traceback from the CLI, and the SDK's bare "Error executing tool" from MCP."""
    _, paths = load_settings()
    paths.ensure()
    (paths.events / "events.jsonl").mkdir(parents=True)
    assert cli.main(["events"]) == 1
    err = capsys.readouterr().err
    assert "could not read or write its own files" in err and "Traceback" not in err, err

    server = build_server(lambda: Dispatcher(*load_settings(), DockerRuntime()))

    async def run() -> tuple[bool, str]:
        async with Client(server) as client:
            res = await client.call_tool("agentic_watch", {"timeout_seconds": 0, "cursor": "0"})
            return bool(res.is_error), " ".join(getattr(c, "text", "") for c in res.content)

    is_error, text = anyio.run(run)
    assert is_error and "could not read or write its own files" in text and "Free disk space" in text, text
