"""Least privilege in the agent's container: no Linux capability, never root (under a root server
the image's unprivileged `agent` uid, which the workspace's folders are handed to; otherwise the
host user's uid), files the agent wrote stay the host user's to read and delete, and a workspace
that grows past its size cap is stopped. Real Docker, real containers."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch import safefs
from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import UnsafePathError
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.service.runs.disk_cap import MIN_ENTRY_BYTES, measure
from agentic_dispatch.workspace import commits_ahead, recent_log

from .conftest import needs_root

NO_CAPABILITIES = "0000000000000000"
MIB = 1024 * 1024


def expected_uid() -> int:
    """Under a root server the agent runs as the image's `agent` user; otherwise as the host user."""
    return 1000 if os.getuid() == 0 else os.getuid()


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text, encoding="utf-8")


@pytest.fixture
def configured(docker_env: str, docker_client: docker.DockerClient, isolated_home: Path) -> Iterator[Dispatcher]:
    """A started service whose timer ticks every second, with the QA gate running `id` and a 50 MB
    workspace cap."""
    write_config(
        isolated_home,
        "drain_interval_seconds = 1\n"
        "[resources]\nworkspace_max_bytes = 50000000\n"
        "[qa]\n"
        'command = "echo \\"$(id -u):$(id -g) $(grep CapEff /proc/self/status)\\" > qa-identity.txt"\n',
    )
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def shell(repo: Path, task: str, **kw: object) -> DispatchRequest:
    return DispatchRequest(repo=str(repo), task=task, agent="shell", **kw)  # type: ignore[arg-type]


# -- privileges ----------------------------------------------------------------------------
@pytest.mark.docker
def test_the_agent_runs_with_no_capabilities_and_not_as_root_even_when_the_server_is_root(
    configured: Dispatcher, user_repo: Path
) -> None:
    task = (
        'echo "$(id -u):$(id -g) $(grep CapEff /proc/self/status)" > identity.txt && '
        "git add identity.txt && git commit -qm 'Record the identity'"
    )
    res = configured.dispatch(shell(user_repo, task))
    rec = configured.wait(res.workspace, 60)
    assert rec.status == Status.COMPLETED, rec.reason
    uid_gid, _, caps = (Path(res.repo_path) / "identity.txt").read_text(encoding="utf-8").partition(" ")
    uid = int(uid_gid.split(":")[0])
    assert caps.split() == ["CapEff:", NO_CAPABILITIES]
    if os.getuid() == 0:
        assert uid != 0
    assert uid == expected_uid()
    # the server's own git in the clone (which the agent's uid owns) still works
    repo = Path(res.repo_path)
    assert "Record the identity" in recent_log(repo)
    assert commits_ahead(repo, "main") == 1
    look = next(c for c in res.commands if " log " in c)  # the command the result tells a person to run
    shown = subprocess.run(shlex.split(look), capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "Record the identity" in shown.stdout, shown.stderr


@pytest.mark.docker
def test_the_qa_gate_runs_as_the_agents_uid_with_no_capabilities(configured: Dispatcher, user_repo: Path) -> None:
    res = configured.dispatch(shell(user_repo, "echo done > done.txt", qa=True))
    rec = configured.wait(res.workspace, 90)
    assert rec.status == Status.COMPLETED and rec.qa is not None and rec.qa.state == "passed", rec
    text = (Path(res.repo_path) / "qa-identity.txt").read_text(encoding="utf-8").split()
    assert text[0] == f"{expected_uid()}:{1000 if os.getuid() == 0 else os.getgid()}"
    assert text[1:] == ["CapEff:", NO_CAPABILITIES]


@pytest.mark.docker
def test_a_resumed_run_can_change_the_files_the_server_wrote_for_it(configured: Dispatcher, user_repo: Path) -> None:
    task = (
        "if [ -f ANSWER.md ]; then echo more >> ANSWER.md && echo more >> AGENTS.md && echo resumed > resumed.txt; "
        "else echo 'Which one?' > BLOCKED.md; fi"
    )
    res = configured.dispatch(shell(user_repo, task))
    assert configured.wait(res.workspace, 60).status == Status.BLOCKED
    configured.resume(res.workspace, answer="the first")
    rec = configured.wait(res.workspace, 60)
    assert rec.status == Status.COMPLETED, rec.reason
    repo = Path(res.repo_path)
    assert (repo / "ANSWER.md").read_text(encoding="utf-8") == "the first\nmore\n"
    assert (repo / "resumed.txt").is_file()
    assert "=== run 2" in Path(res.log_path).read_text(encoding="utf-8")


@pytest.mark.docker
def test_files_the_agent_wrote_stay_readable_and_deletable_by_the_host_user(
    configured: Dispatcher, user_repo: Path
) -> None:
    task = "mkdir -m 700 private && echo secret > private/note && chmod 400 private/note && chmod 500 private"
    res = configured.dispatch(shell(user_repo, task))
    assert configured.wait(res.workspace, 60).status == Status.COMPLETED
    note = Path(res.repo_path) / "private" / "note"
    assert note.stat().st_uid == expected_uid()
    assert note.read_text(encoding="utf-8") == "secret\n"
    if os.getuid() != 0:  # the host user owns it, so may open the folder up again (root needs not)
        note.parent.chmod(0o700)
    shutil.rmtree(res.path)
    assert not Path(res.path).exists()


# -- the workspace size cap ----------------------------------------------------------------
@pytest.mark.docker
def test_a_workspace_that_grows_past_its_cap_is_stopped_and_fails_saying_so(
    configured: Dispatcher, user_repo: Path, docker_client: docker.DockerClient
) -> None:
    task = "for i in $(seq 1 20); do head -c 10000000 /dev/zero > big-$i.bin; sleep 0.5; done; sleep 60"
    res = configured.dispatch(shell(user_repo, task))
    # Left alone the task writes for 10 s, then sleeps 60: a run still going after 30 s was not stopped.
    rec = configured.wait(res.workspace, 30)
    assert rec.status == Status.FAILED, rec
    assert "the workspace grew past 50000000 bytes" in (rec.reason or "")
    written = sum(p.stat().st_size for p in Path(res.repo_path).glob("big-*.bin"))
    assert 30_000_000 < written < 200_000_000, "stopped soon after the cap, before it wrote all it meant to"
    assert rec.container_id is not None
    assert not docker_client.containers.list(all=True, filters={"id": rec.container_id}), "the container is gone"


def test_measuring_a_workspace_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"x" * (4 * MIB))
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "small.txt").write_text("hi", encoding="utf-8")
    (ws / "to-folder").symlink_to(outside)
    (ws / "to-file").symlink_to(outside / "big.bin")
    assert measure(ws, 1 << 40) < 64 * 1024


def test_measuring_stops_counting_past_the_cap_and_counts_each_empty_file_as_a_block(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(10):
        (big / f"{i}.bin").write_bytes(b"x" * MIB)
    whole = measure(big, 1 << 40)
    assert whole >= 10 * MIB
    stopped = measure(big, 2 * MIB)
    assert 2 * MIB < stopped <= 3 * MIB + MIN_ENTRY_BYTES, "it went on counting past the cap"
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(300):
        (empty / str(i)).touch()
    assert measure(empty, 1 << 40) == 300 * MIN_ENTRY_BYTES
    assert measure(empty, MIB) > MIB  # a flood of empty files reaches the cap too


@needs_root("only a root server hands folders to another uid")
def test_handing_a_folder_to_the_agent_gives_links_themselves_and_never_what_they_point_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host.txt").write_text("host", encoding="utf-8")
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "file.txt").write_text("mine", encoding="utf-8")
    (ws / "to-folder").symlink_to(outside)
    (ws / "sub" / "to-file").symlink_to(outside / "host.txt")
    assert safefs.chown_tree(ws, 1000, 1000) == 5
    for p in (ws, ws / "sub", ws / "sub" / "file.txt", ws / "to-folder", ws / "sub" / "to-file"):
        assert (p.lstat().st_uid, p.lstat().st_gid) == (1000, 1000), p
    for p in (outside, outside / "host.txt"):
        assert (p.stat().st_uid, p.stat().st_gid) == (0, 0), f"{p} was given away through a link"
    assert safefs.chown_tree(ws, 1000, 1000) == 0, "what is the agent's already is left as it is"
    with pytest.raises(UnsafePathError):
        safefs.chown_tree(ws / "to-folder", 1000, 1000)
