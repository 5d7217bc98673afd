"""Retention: `clean` removes finished workspaces whose work went home and nothing else; insights
still count what it removed; a dispatch is refused below the disk floor, and status notes a nearly
full disk. Real clones, real deliveries into a real repository, real files; no engine."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult

from agentic_dispatch import cli
from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import StateError
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.models import CheckpointInfo, DispatchRequest, Status, WorkspaceRecord
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

from .conftest import call, git

NOW = datetime.now(UTC)


def _ago(days: float) -> str:
    return (NOW - timedelta(days=days)).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _workspace(
    store: StatusStore,
    origin: Path,
    slug: str,
    status: Status,
    days_ago: float = 30,
    commit: bool = True,
    checkpoint: bool = False,
) -> str:
    """A workspace of ``origin`` with a real clone on its own branch (one commit beyond main when
    ``commit``), its record ``status``, finished ``days_ago`` days ago."""
    name = f"local/user-repo/{slug}"
    ws = store.paths(name)
    ws.dir.mkdir(parents=True)
    git(ws.dir, "clone", "-q", str(origin), "repo")
    branch = f"agentic/{slug}"
    git(ws.repo, "checkout", "-q", "-b", branch)
    if commit or checkpoint:
        (ws.repo / f"{slug}.txt").write_text("work\n", encoding="utf-8")
        git(ws.repo, "add", ".")
        git(ws.repo, "-c", "user.name=A", "-c", "user.email=a@example.com", "commit", "-qm", "agent work")
    finished = status not in (Status.QUEUED, Status.RUNNING)
    store.create(
        WorkspaceRecord(
            name=name,
            status=status,
            agent="shell",
            repo=str(origin),
            org="local",
            repo_name="user-repo",
            origin_url=str(origin),
            task=f"task {slug}",
            branch=branch,
            base_branch="main",
            template="coding",
            timeout_seconds=60,
            runs=1,
            created_at=_ago(days_ago + 1),
            started_at=_ago(days_ago + 0.01),
            finished_at=_ago(days_ago) if finished else None,
            checkpoint=CheckpointInfo(commit=git(ws.repo, "rev-parse", "HEAD"), why="cancelled")
            if checkpoint
            else None,
        )
    )
    return name


@pytest.fixture
def svc(no_engine: str) -> Dispatcher:
    settings, paths = load_settings()
    return Dispatcher(settings, paths, DockerRuntime())


@pytest.fixture
def root(svc: Dispatcher, user_repo: Path) -> dict[str, str]:
    """One workspace of each kind, all finished (or started) 30 days ago but one."""
    store = StatusStore.of(svc.paths)
    names = {
        "delivered": _workspace(store, user_repo, "delivered", Status.COMPLETED),
        "undelivered": _workspace(store, user_repo, "undelivered", Status.COMPLETED),
        "empty": _workspace(store, user_repo, "empty", Status.COMPLETED, commit=False),
        "failed": _workspace(store, user_repo, "failed", Status.FAILED),
        "checkpoint": _workspace(store, user_repo, "checkpoint", Status.CANCELLED, checkpoint=True),
        "blocked": _workspace(store, user_repo, "blocked", Status.BLOCKED),
        "running": _workspace(store, user_repo, "running", Status.RUNNING),
        "queued": _workspace(store, user_repo, "queued", Status.QUEUED),
        "recent": _workspace(store, user_repo, "recent", Status.COMPLETED, days_ago=1, commit=False),
    }
    assert svc.sync(names["delivered"]).delivered == [names["delivered"]]
    return names


def _left(svc: Dispatcher, names: dict[str, str]) -> set[str]:
    """Which of ``names`` still have a folder, and the index agrees."""
    on_disk = {k for k, n in names.items() if svc.store.paths(n).dir.exists()}
    svc.store.catch_up()
    indexed = {i.name for i in svc.store.query(None)}
    assert {names[k] for k in on_disk} == indexed & set(names.values()), "the index says what the disk says"
    return on_disk


def test_clean_removes_only_finished_work_that_went_home_and_says_what_it_kept_and_freed(
    svc: Dispatcher, root: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["clean", "--older-than", "7d"]) == 0
    out = capsys.readouterr().out

    assert _left(svc, root) == {"undelivered", "checkpoint", "blocked", "running", "queued", "recent"}
    for gone in ("delivered", "empty", "failed"):
        assert f"removed {root[gone]} (" in out, out
    assert f"kept {root['undelivered']}: its branch agentic/undelivered was not delivered" in out
    assert f"kept {root['checkpoint']}: its automatic checkpoint" in out
    assert f"kept {root['blocked']}: it is blocked" in out
    assert "removed 3 workspace(s), freed " in out and "--force" in out
    assert root["recent"] not in out, "what is newer than --older-than is not looked at"


def test_clean_dry_run_removes_nothing_and_prints_what_would_go_with_its_size(
    svc: Dispatcher, root: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["clean", "--older-than", "7d", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert _left(svc, root) == set(root), "a dry run removes nothing"
    would = {r["workspace"]: r for r in report["removed"]}
    assert set(would) == {root["delivered"], root["empty"], root["failed"]}
    assert all(r["bytes"] > 0 for r in would.values())
    assert report["bytes_freed"] == sum(r["bytes"] for r in would.values())
    assert would[root["delivered"]]["why"].startswith("delivered")
    assert would[root["empty"]]["why"] == "nothing to deliver: no commit beyond main"
    assert report["dry_run"] is True

    assert cli.main(["clean", "--older-than", "7d", "--dry-run"]) == 0
    assert f"would remove {root['delivered']} (completed" in capsys.readouterr().out


def test_clean_force_removes_undelivered_finished_work_but_never_queued_running_or_blocked(
    svc: Dispatcher, root: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["clean", "--older-than", "0", "--force"]) == 0
    out = capsys.readouterr().out

    assert _left(svc, root) == {"blocked", "running", "queued"}
    assert f"removed {root['undelivered']} (completed" in out and "forced: its branch" in out
    assert f"kept {root['blocked']}: it is blocked" in out


def test_clean_keep_leaves_the_newest_finished_workspaces(
    svc: Dispatcher, user_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {d: _workspace(svc.store, user_repo, f"old-{d}", Status.FAILED, days_ago=d) for d in (3, 5, 9)}
    assert cli.main(["clean", "--keep", "1"]) == 0
    assert _left(svc, {str(d): n for d, n in names.items()}) == {"3"}
    assert "removed 2 workspace(s)" in capsys.readouterr().out


def test_insights_still_count_the_runs_clean_removed(svc: Dispatcher, user_repo: Path) -> None:
    for slug, status in (("a", Status.COMPLETED), ("b", Status.FAILED), ("c", Status.CANCELLED)):
        _workspace(svc.store, user_repo, slug, status, days_ago=2, commit=False)
    before = svc.insights(7).agents
    assert [(r.agent, r.runs, r.completed, r.failed, r.cancelled) for r in before] == [("shell", 3, 1, 1, 1)]

    report = svc.clean(older_than_days=1)

    assert len(report.removed) == 3 and not any(svc.store.paths(r.workspace).dir.exists() for r in report.removed)
    assert svc.insights(7).agents == before
    again = Dispatcher(svc.settings, svc.paths, svc.runtime)  # another process reads the same state
    assert again.insights(7).agents == before
    assert again.insights(1).agents == [], "a removed run counts in the window it finished in, not when removed"


def test_the_timer_cleans_with_retention_settings_at_most_once_an_hour(
    no_engine: str, isolated_home: Path, user_repo: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text("[retention]\nolder_than_days = 7\n", encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    first = _workspace(svc.store, user_repo, "first", Status.FAILED)
    start = NOW.timestamp()

    report = svc.retention.tick(now=start)
    assert report is not None and [r.workspace for r in report.removed] == [first]
    second = _workspace(svc.store, user_repo, "second", Status.FAILED)
    assert svc.retention.tick(now=start + 1800) is None, "within the hour: nothing"
    assert svc.store.paths(second).dir.exists()
    report = svc.retention.tick(now=start + 3600)
    assert report is not None and [r.workspace for r in report.removed] == [second]


def test_the_timer_removes_nothing_without_retention_settings(svc: Dispatcher, user_repo: Path) -> None:
    name = _workspace(svc.store, user_repo, "old", Status.FAILED, days_ago=400)
    assert svc.retention.tick() is None
    assert svc.store.paths(name).dir.exists()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MiB tmpfs holding the root (needs root, as CI runs); unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(disk / "root"))
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_dispatch_below_the_disk_floor_is_refused_before_anything_is_cloned(
    small_disk: Path, no_engine: str, user_repo: Path
) -> None:
    settings, paths = load_settings()  # the default floor, 2 GiB, is more than the disk holds
    svc = Dispatcher(settings, paths, DockerRuntime())
    with pytest.raises(StateError) as e:
        svc.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell", issue=1))
    message = str(e.value)
    assert "MiB is free" in message and "floor of 2.0 GiB" in message and "min_free_gib" in message
    assert "agentic-dispatch clean" in message
    assert _entries(paths.workspaces) == [] and _entries(paths.mirrors) == [] and _entries(paths.staging) == []


def test_status_notes_a_disk_over_90_percent_full(small_disk: Path, no_engine: str) -> None:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    assert not any("full" in n for n in svc.status().notes)
    st = os.statvfs(small_disk)
    with (small_disk / "filler").open("wb") as f:
        f.write(b"\0" * int(st.f_bavail * st.f_frsize * 0.95))
    notes = [n for n in svc.status().notes if "% full" in n]
    assert len(notes) == 1 and "agentic-dispatch clean" in notes[0], svc.status().notes


def test_the_clean_tool_removes_what_the_command_does_and_refuses_a_negative_age_saying_why(
    svc: Dispatcher, root: dict[str, str]
) -> None:
    """agentic_clean is `clean` for a host: the same rules, the same report, the arguments checked by their types."""

    async def session() -> tuple[CallToolResult, dict[str, Any], dict[str, Any]]:
        async with Client(build_server(lambda: svc)) as client:
            refused = await client.call_tool("agentic_clean", {"older_than_days": -1})
            would = await call(client, "agentic_clean", older_than_days=7, dry_run=True)
            done = await call(client, "agentic_clean", older_than_days=7)
        return refused, would, done

    refused, would, done = anyio.run(session)

    text = " ".join(getattr(c, "text", "") for c in refused.content)
    assert refused.is_error and "older_than_days" in text and "greater than or equal to 0" in text, text
    assert {r["workspace"] for r in would["removed"]} == {root["delivered"], root["empty"], root["failed"]}
    assert would["dry_run"] is True and would["bytes_freed"] > 0
    assert {r["workspace"] for r in done["removed"]} == {r["workspace"] for r in would["removed"]}
    assert done["bytes_freed"] == would["bytes_freed"]
    assert done["kept"][root["undelivered"]].startswith("its branch agentic/undelivered was not delivered")
    assert _left(svc, root) == {"undelivered", "checkpoint", "blocked", "running", "queued", "recent"}
