"""The events log, ``events/events.jsonl``: one :class:`~.models.Event` per line, appended by every
server on the root and read by watch, the subscription feed, the CLI and the daily-limit count.

Lines are written and read through :class:`~.models.Event` only, so the set of kinds is closed and
a reader skips what it cannot parse. An append takes an ``flock`` on the file, so lines of two
servers never interleave, and first ends a line a crash or a full disk cut off: the next event
is never glued to the broken one (which stays unreadable and is skipped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from .fileio import exclusive_lock
from .models import Event

__all__ = ["EventLog"]

MAX_READ_BYTES = 4 << 20  # of new events per read; the rest comes with the next offset


class EventLog:
    """Append events; read them from a byte offset, or backwards from the end."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, event: Event) -> None:
        """Append ``event`` as one line.

        Raises:
            OSError: the log cannot be written (a full disk, no permission).
        """
        data = (event.model_dump_json(exclude_none=True) + "\n").encode()
        with exclusive_lock(self.path):  # the log is its own lock file: no other file to keep
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size and not self._ends_a_line(size):
                    data = b"\n" + data  # end the line a crash cut off: this event stays readable
                os.write(fd, data)
            finally:
                os.close(fd)

    def _ends_a_line(self, size: int) -> bool:
        with self.path.open("rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def size(self) -> int:
        """The log's length in bytes: the offset of the next event."""
        try:
            return os.stat(self.path).st_size  # noqa: PTH116 (called in loops)
        except FileNotFoundError:
            return 0

    def read(self, since: int, max_bytes: int = MAX_READ_BYTES) -> tuple[list[Event], int]:
        """The events after byte ``since`` and the offset after the last whole line read (a line
        still being written waits for the next read; one that cannot be parsed is skipped)."""
        try:
            with self.path.open("rb") as f:
                f.seek(since)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return [], since
        whole = data[: data.rfind(b"\n") + 1]
        return [e for line in whole.splitlines() if (e := _parse(line)) is not None], since + len(whole)

    def whole_lines_end(self) -> int:
        """The offset just after the last whole line (a line still being written is not counted)."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return 0
        with f:
            pos = f.seek(0, os.SEEK_END)
            while pos > 0:
                step = min(4096, pos)
                pos -= step
                f.seek(pos)
                newline = f.read(step).rfind(b"\n")
                if newline >= 0:
                    return pos + newline + 1
        return 0

    def backwards(self, end: int | None = None, block: int = 64 * 1024) -> Iterator[Event]:
        """The events from the newest to the oldest (the file is read in blocks from its end, or from
        ``end``: an offset just after a line, such as :meth:`whole_lines_end` or :meth:`read` return)."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            pos = f.seek(0, os.SEEK_END) if end is None else end
            rest = b""
            while pos > 0:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + rest
                lines = chunk.split(b"\n")
                rest = lines[0]
                for line in reversed(lines[1:]):
                    if (e := _parse(line)) is not None:
                        yield e
            if (e := _parse(rest)) is not None:
                yield e


def _parse(line: bytes) -> Event | None:
    if not line.strip():
        return None
    try:
        return Event.model_validate_json(line)
    except ValidationError:
        return None
