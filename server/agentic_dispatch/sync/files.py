"""File primitives of the outbox: atomic JSON files, a durable append, per-entry locks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..store import fsync_dir, write_atomic

__all__ = ["append_line", "entry_lock", "read_json", "remove", "write_json"]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file in the same folder,
    fsync, ``os.replace``, fsync of the folder): a reader sees the old file or the new one.

    Raises:
        OSError: the folder cannot be written.
    """
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when the file does not exist.

    Raises:
        ValueError: the file is not UTF-8 JSON holding an object.
        OSError: the file exists but cannot be read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def remove(path: Path) -> None:
    """Remove ``path`` (gone already is fine) and make the removal durable.

    Raises:
        OSError: the file or its folder cannot be changed.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


def append_line(path: Path, data: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it (an audit log that survives a crash).

    Raises:
        OSError: the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path, blocking: bool) -> int | None:
    """An fd holding ``flock`` on ``path``, or ``None`` when someone else holds it (non-blocking).

    The lock file is removed by its holder when the entry is finished; a lock taken on a file
    removed (or replaced) meanwhile is not a lock on the entry, so it is dropped and retried.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = path.stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


@contextlib.contextmanager
def entry_lock(path: Path, blocking: bool = True) -> Iterator[EntryLock | None]:
    """Hold the ``flock`` on ``path`` (threads and processes alike); ``None`` when it is taken and
    ``blocking`` is false. Set ``finished`` on the lock to remove the lock file on release.

    Raises:
        OSError: the lock file cannot be created.
    """
    fd = _lock(path, blocking)
    if fd is None:
        yield None
        return
    held = EntryLock()
    try:
        yield held
    finally:
        if held.finished:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class EntryLock:
    """A held entry lock; ``finished = True`` removes its file when it is released."""

    def __init__(self) -> None:
        self.finished = False
