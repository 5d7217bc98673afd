"""File primitives of the outbox: atomic JSON files, a durable append. Its per-entry locks are
:mod:`..fileio`'s (``exclusive_lock``, ``try_exclusive_lock``)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..fileio import fsync_dir, write_atomic

__all__ = ["append_line", "read_json", "remove", "write_json"]


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
