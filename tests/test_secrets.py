"""A key value given to an agent never leaves its raw log: one distinctive value goes through
dispatch, a blocked question, resume, a failing run, the QA gate, doctor, status with log lines,
watch, logs (also read from an offset inside the key), diff, insights, the workspace resources,
cancel, events and sync (branch and record posted to a real HTTP listener); then every file under
the state root (bytes, recursively, links not followed), every tool reply and every request the
endpoint got are searched for it and for any 10-character piece of its random part. It may appear
only in the raw output of the run's containers: ``.meta/logs/agent-<base>.log`` and
``.meta/logs/qa-run<N>.log``."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client

from agentic_dispatch.config import load_settings
from agentic_dispatch.credentials import CUT_PIECE_MIN, redact
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import Endpoint

PREFIX = "sk-ant-DISTINCT-"
LOG = Path(".meta/logs/agent-shell.log")
RAW_LOGS = re.compile(r"workspaces/[^/]+/[^/]+/[^/]+/\.meta/logs/(agent-[a-z]+|qa-run\d+)\.log")
BLOCKING = (
    'echo "key=$ANTHROPIC_API_KEY"; '
    'if [ -f ANSWER.md ]; then git commit -q --allow-empty -m answered; echo "done $ANTHROPIC_API_KEY"; '
    'else echo "Which key, $ANTHROPIC_API_KEY or another?" > BLOCKED.md; fi'
)
FAILING = 'echo "about to fail"; echo "the key is $ANTHROPIC_API_KEY"; exit 3'
GATED = 'git commit -q --allow-empty -m gated; echo "gated $ANTHROPIC_API_KEY"'


def _files_holding(root: Path, value: bytes) -> list[str]:
    """Every regular file under ``root`` that holds ``value`` (links are not followed)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if value in path.read_bytes():
                found.append(str(path.relative_to(root)))
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
    return sorted(found)


class Replies:
    """Every tool reply of the session, as text."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.texts: list[str] = []

    async def __call__(self, tool: str, **args: Any) -> dict[str, Any]:
        res = await self.client.call_tool(tool, args)
        self.texts.append(json.dumps(res.model_dump(mode="json")))
        assert not res.is_error, f"{tool}: {res.content}"
        assert isinstance(res.structured_content, dict)
        return res.structured_content

    async def resource(self, uri: str) -> None:
        res = await self.client.read_resource(uri)
        self.texts.append(json.dumps(res.model_dump(mode="json")))

    async def final(self, workspace: str) -> dict[str, Any]:
        with anyio.fail_after(90):
            while True:
                row: dict[str, Any] = await self("agentic_watch", workspace=workspace, timeout_seconds=20)
                if row["status"] not in ("queued", "running"):
                    return row


async def _exercise(call: Replies, repo: str) -> dict[str, dict[str, Any]]:
    """Every tool, on runs that print the key: blocked then resumed, failed, failed by the QA gate."""
    blocked = await call("agentic_dispatch", repo=repo, task=BLOCKING, agent="shell")
    failing = await call("agentic_dispatch", repo=repo, task=FAILING, agent="shell")
    gated = await call("agentic_dispatch", repo=repo, task=GATED, agent="shell", qa=True)
    rows = {"blocked": await call.final(blocked["workspace"])}
    rows["failed"] = await call.final(failing["workspace"])
    rows["gated"] = await call.final(gated["workspace"])
    await call("agentic_status", log_lines=50)
    await call("agentic_resume", workspace=blocked["workspace"], answer="Use that one.")
    rows["resumed"] = await call.final(blocked["workspace"])
    await call("agentic_resume", workspace=failing["workspace"])
    rows["failed again"] = await call.final(failing["workspace"])
    await call("agentic_doctor")
    await call("agentic_doctor", agents=["shell"])
    await call("agentic_cancel", workspace=failing["workspace"])
    await call("agentic_sync")
    await call("agentic_dispatch_shutdown")
    await call("agentic_dispatch_start")
    for name in (blocked["workspace"], failing["workspace"], gated["workspace"]):
        await call("agentic_status", workspace=name, log_lines=500)
    await call("agentic_status", log_lines=500)
    await call("agentic_insights")
    for name in (blocked["workspace"], failing["workspace"], gated["workspace"]):
        await call("agentic_logs", workspace=name)
        await call("agentic_logs", workspace=name, since_bytes=0)
        await call("agentic_diff", workspace=name)
        for what in ("status", "log", "prompt", "diff"):
            await call.resource(f"agentic://workspaces/{name}/{what}")
    await call.resource("agentic://workspaces")
    return rows


async def _read_log_from_inside_the_key(call: Replies, workspace: str, log: Path, key: str) -> None:
    """agentic_logs from an offset that cuts the key: the window must not show the rest of it."""
    at = log.read_bytes().index(key.encode())
    for offset in (at + 1, at + 10, at + len(key) // 2, at + len(key) - 8):
        await call("agentic_logs", workspace=workspace, since_bytes=offset)


def test_redact_masks_a_value_and_the_pieces_of_one_a_window_cut() -> None:
    key = PREFIX + "ab12cd34" * 4
    assert redact(f"a {key} b {key}", [key]) == "a *** b ***"
    assert redact(key[12:] + "\nnext line", [key]) == "***\nnext line"  # a log read from inside the key
    assert redact("last line: " + key[:20], [key]) == "last line: ***"  # a log or patch cut inside it
    assert redact(key[-(CUT_PIECE_MIN - 1) :] + " ask-a", [key]) == key[-(CUT_PIECE_MIN - 1) :] + " ask-a"


@pytest.mark.docker
def test_a_key_value_reaches_no_file_reply_or_record_except_the_raw_logs(
    docker_env: str,
    docker_client: docker.DockerClient,
    isolated_home: Path,
    user_repo: Path,
    endpoint: Endpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = PREFIX + secrets.token_hex(20)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        '[agents.shell]\nenv = ["ANTHROPIC_API_KEY"]\n'
        f'[sync]\nendpoint = "{endpoint.url}"\n'
        '[qa]\ncommand = "tail -n 3 /agentic/logs/agent-shell.log; exit 1"\n',
        encoding="utf-8",
    )
    settings, paths = load_settings()
    server = build_server(lambda: Dispatcher(settings, paths, DockerRuntime(docker_client)))

    async def main() -> dict[str, dict[str, Any]]:
        async with Client(server, read_timeout_seconds=120) as client:
            call = Replies(client)
            rows = await _exercise(call, str(user_repo))
            failed = rows["failed again"]["name"]
            await _read_log_from_inside_the_key(call, failed, paths.root / "workspaces" / failed / LOG, key)
            replies.extend(call.texts)
            return rows

    replies: list[str] = []
    rows = anyio.run(main)

    # The runs did what they were meant to, so the key went everywhere it could go.
    assert rows["blocked"]["status"] == "blocked" and "***" in rows["blocked"]["question"], rows["blocked"]
    assert rows["failed"]["status"] == "failed" and "***" in rows["failed"]["reason"], rows["failed"]
    assert rows["gated"]["status"] == "failed" and rows["gated"]["qa"]["state"] == "failed", rows["gated"]
    assert "***" in (rows["gated"]["qa"]["output_tail"] or ""), rows["gated"]["qa"]
    assert rows["resumed"]["status"] == "completed" and rows["resumed"]["runs"] == 2, rows["resumed"]
    assert endpoint.requests, "sync posted no record"
    logs = [p for p in _files_holding(paths.root, key.encode()) if RAW_LOGS.fullmatch(p)]
    assert any("agent-shell.log" in p for p in logs) and any("qa-run" in p for p in logs), logs

    # Not the value, nor a piece of it (any 10 characters of its random part).
    pieces = [key[i : i + 10] for i in range(len(PREFIX), len(key) - 9)]
    leaks = [p for piece in pieces for p in _files_holding(paths.root, piece.encode()) if not RAW_LOGS.fullmatch(p)]
    assert not leaks, f"the key value (or a piece of it) is in {sorted(set(leaks))}"
    leaky = [r[:300] for r in replies if any(piece in r for piece in pieces)]
    assert not leaky, f"tool replies carry the key value or a piece of it: {leaky}"
    posted = [json.dumps(r) for r in endpoint.requests if any(piece in json.dumps(r) for piece in pieces)]
    assert not posted, f"the sync endpoint got the key value or a piece of it: {posted}"
