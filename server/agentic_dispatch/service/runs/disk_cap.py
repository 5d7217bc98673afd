"""The workspace size cap: a running workspace that grows past ``resources.workspace_max_bytes``
is stopped and fails, so one agent cannot fill the host's disk.

The agent writes into bind mounts on the host's disk, which no engine limit reaches (Docker's
``--storage-opt size`` caps only a container's own layer, and only on overlay2 over xfs with
project quotas), so the server measures: the timer calls :func:`enforce_cap` for each running
record, and a workspace is measured at most twice per timer interval.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from pathlib import Path

from ...config import Settings
from ...models import Status, WorkspaceRecord
from ...store import StatusStore

__all__ = ["MIN_ENTRY_BYTES", "measure", "over_cap"]

log = logging.getLogger(__name__)

# Every file, folder and link counts at least one block: a flood of empty files reaches the cap
# too, and a walk visits at most cap / MIN_ENTRY_BYTES entries before it stops.
MIN_ENTRY_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FORGET_SECONDS = 3600.0

_checked: dict[str, float] = {}  # workspace folder + container id -> when it was last measured
_checked_lock = threading.Lock()


def measure(top: Path, cap: int) -> int:
    """The bytes ``top`` takes on disk (allocated blocks, each entry at least
    :data:`MIN_ENTRY_BYTES`, each inode once), counted without following any link; the count
    stops as soon as it passes ``cap`` (the result is then only known to be over it).

    A folder is listed only if it is still the one seen in its parent (a folder swapped for a
    link meanwhile is skipped), so the walk never leaves ``top``.

    Raises:
        PermissionError: a folder cannot be read, so the size cannot be known.
    """
    try:
        first = os.lstat(top)
    except FileNotFoundError:
        return 0
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [(str(top), first.st_dev, first.st_ino)]
    while stack:
        path, dev, ino = stack.pop()
        try:
            fd = os.open(path, _DIR_FLAGS)
        except PermissionError:
            raise
        except OSError:
            continue  # gone, or now a link (ELOOP) or a file
        try:
            here = os.fstat(fd)
            if (here.st_dev, here.st_ino) != (dev, ino):
                continue
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += max(st.st_blocks * 512, MIN_ENTRY_BYTES)
                    if total > cap:
                        return total
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((f"{path}/{entry.name}", st.st_dev, st.st_ino))
        finally:
            os.close(fd)
    return total


def _due(key: str, interval: float) -> bool:
    """Whether the workspace ``key`` should be measured now (at most once per ``interval``)."""
    now = time.monotonic()
    with _checked_lock:
        if now - _checked.get(key, -math.inf) < interval:
            return False
        _checked[key] = now
        for old in [k for k, t in _checked.items() if now - t > _FORGET_SECONDS]:
            del _checked[old]
    return True


def over_cap(settings: Settings, store: StatusStore, rec: WorkspaceRecord) -> str | None:
    """Measure the running workspace of ``rec``; past the cap, the reason its run fails (the caller
    stops it), else ``None``. A workspace is measured at most once per half timer interval (the
    CLI's ``wait`` reconciles every second)."""
    cap = settings.resources.workspace_max_bytes
    if not cap or rec.status != Status.RUNNING or rec.container_id is None:
        return None
    ws = store.paths(rec.name)
    if not _due(f"{ws.dir}\0{rec.container_id}", settings.drain_interval_seconds / 2):
        return None
    try:
        size = measure(ws.dir, cap)
    except PermissionError as e:
        reason = (
            f"the workspace's size cannot be checked: {e.filename} cannot be read; the container was stopped. "
            "Make that folder readable (or remove it), then resume."
        )
    except OSError:  # one odd entry must not stop the tick (timeouts, the drain) for every run
        log.exception("cannot measure the workspace %s; trying again on a later tick", ws.dir)
        return None
    else:
        if size <= cap:
            return None
        reason = (
            f"the workspace grew past {cap} bytes (resources.workspace_max_bytes); the container was stopped "
            "and what it wrote kept. Free space in the workspace (or raise the cap), then resume."
        )
    return reason
