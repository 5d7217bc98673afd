"""A disk that fills under the server: whatever step of a dispatch runs out of space, the dispatch
either succeeds and its record says so, or fails and leaves no workspace folder behind, so its name is
never stuck ("exists already" with no record to resume). The root is a small tmpfs filled in steps."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import DispatchError
from agentic_dispatch.models import DispatchRequest
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

STEP = 4096


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An 8 MiB tmpfs as the root (needs root, as CI runs); unmounted after the test, also on failure."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(disk / "root"))
        (disk / "root").mkdir()  # the disk floor off: this test fills the disk on purpose
        (disk / "root" / "config.toml").write_text("[retention]\nmin_free_gib = 0\n", encoding="utf-8")
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _leave_free(disk: Path, filler: Path, free_bytes: int) -> None:
    """Grow or shrink ``filler`` so that about ``free_bytes`` stay free on ``disk``."""
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - free_bytes)
    with filler.open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * size)


def test_a_dispatch_that_runs_out_of_disk_at_any_step_leaves_no_folder_and_no_stuck_name(
    small_disk: Path, docker_env: str, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    filler = small_disk / "filler"
    succeeded: list[int] = []
    failed: list[int] = []

    def attempt(free: int) -> bool:
        """One dispatch with about ``free`` bytes left; it succeeds whole or leaves nothing."""
        issue = len(succeeded) + len(failed) + 1
        _leave_free(small_disk, filler, free)
        name = f"local/user-repo/task-{issue}"
        try:
            svc.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell", issue=issue))
        except (DispatchError, OSError):
            failed.append(issue)
            assert not svc.store.paths(name).dir.exists(), f"{name}: a failed dispatch left its folder"
            return False
        succeeded.append(issue)
        assert svc.record(name).runs == 1
        return True

    try:
        svc.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell", dry_run=True))  # the mirror
        low, high = 0, 4 << 20
        assert attempt(high), "a dispatch fits in 4 MiB"
        while high - low > STEP:  # the least free space a dispatch needs ...
            middle = (low + high) // 2
            low, high = (low, middle) if attempt(middle) else (middle, high)
        for k in range(1, 25):  # ... then every 4 KiB below it: each step runs out somewhere else
            attempt(high - k * STEP)
        assert failed and succeeded, (failed, succeeded)
        filler.unlink()
        staging = paths.staging
        assert not staging.exists() or not list(staging.iterdir()), "no staging folder is left behind"
        again = svc.dispatch(DispatchRequest(repo=str(user_repo), task="true", agent="shell", issue=failed[-1]))
        assert again.workspace == f"local/user-repo/task-{failed[-1]}", "the name of a failed dispatch is free"
        listed = {r.name for r in svc.status(limit=1000).workspaces}
        assert listed == {f"local/user-repo/task-{n}" for n in [*succeeded, failed[-1]]}
    finally:
        filler.unlink(missing_ok=True)  # space for stopping what started
        svc.freeze(now=True)
        svc.close()
