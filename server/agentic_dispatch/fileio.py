"""Atomic file writes and file locks: the one place the package replaces a file or takes an ``flock``.

Writes: :func:`write_atomic` puts the data in a temporary file in the same folder, fsyncs it,
``os.replace``\\s it over the target and fsyncs the folder, so a reader (or a server that restarts
after a crash) sees the old file or the new one, never half of one. A link at the target is
replaced, never written through. Given an open folder (``dir_fd``), it works inside that folder
whatever its path leads to by then: :mod:`.safefs` relies on it to write where an agent could
swap a folder for a link.

Locks are ``flock``\\s on a lock file (created if missing, with its folder), in four kinds:

* :func:`exclusive_lock`: one holder at a time, waits for its turn;
* :func:`shared_lock`: any number of shared holders, none while an exclusive one holds it;
* :func:`try_exclusive_lock`: exclusive, but yields ``None`` at once when someone holds it;
* :class:`ReentrantFileLock`: exclusive across processes, and re-entrant for the thread that holds it;
* :func:`folder_lock`: exclusive, on an existing folder itself: it never creates anything, so a
  folder removed meanwhile stays removed (a workspace's lock).

An ``flock`` belongs to one open file description, not to a process: two ``open``\\s of the lock
file in one process are two lockers, so a thread that locks again through a second ``open`` waits
for itself forever. :class:`ReentrantFileLock` therefore queues the threads of this process on a
``threading.RLock`` and takes the ``flock`` on the outermost entry only.

A lock file may be removed by its holder when what it guards is finished
(:attr:`HeldLock.remove_on_release`); a lock taken on a file removed or replaced meanwhile is no
lock on the path, so it is dropped and taken again on the file now there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = [
    "LOCK_FILE_MODE",
    "HeldLock",
    "ReentrantFileLock",
    "exclusive_lock",
    "folder_lock",
    "fsync_dir",
    "shared_lock",
    "try_exclusive_lock",
    "write_atomic",
]

LOCK_FILE_MODE = 0o644

# The temporary file must be a new file of ours: O_EXCL refuses an existing one, O_NOFOLLOW a link.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# -- writes -----------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Make a rename, creation or removal in ``folder`` durable.

    Raises:
        OSError: the folder cannot be opened.
    """
    fd = os.open(folder, _FOLDER_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o600, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically and durably.

    The new file has exactly ``mode`` (the umask does not apply) from its first instant. Without
    ``dir_fd``, the folders up to ``path`` are created as needed. With ``dir_fd`` (an open folder),
    ``path`` is a bare file name inside that folder, as with ``os.open(..., dir_fd=)``.

    Raises:
        ValueError: ``dir_fd`` is given and ``path`` is not a bare name.
        OSError: the folder cannot be written, or ``path`` is a folder (``IsADirectoryError``).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if dir_fd is not None:
        if len(path.parts) != 1 or path.name in ("", ".", ".."):
            raise ValueError(f"with dir_fd, {path} must be a bare file name")
        _replace_in(dir_fd, path.name, payload, mode)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, _FOLDER_FLAGS)
    try:
        _replace_in(folder, path.name, payload, mode)
    finally:
        os.close(folder)


def _replace_in(folder: int, name: str, payload: bytes, mode: int) -> None:
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    os.fsync(folder)


# -- locks ------------------------------------------------------------------------------------------
class HeldLock:
    """An exclusive lock this process holds; set :attr:`remove_on_release` to remove the lock
    file as it is released (while still held, so a waiter sees that its file went and retries)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.remove_on_release = False


def _acquire(path: Path, operation: int, mode: int) -> int | None:
    """An fd of ``path`` holding ``flock(operation)``; ``None`` when ``LOCK_NB`` was asked and it is taken.

    Raises:
        OSError: the lock file (or its folder) cannot be created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = path.stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its holder removed it while we waited: lock the file now at the path


def _release(fd: int, held: HeldLock | None = None) -> None:
    try:
        if held is not None and held.remove_on_release:
            with contextlib.suppress(FileNotFoundError):
                held.path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, *, mode: int = LOCK_FILE_MODE) -> Iterator[HeldLock]:
    """Hold ``path``'s lock alone (other threads and processes wait), creating the file with ``mode``.

    Raises:
        OSError: the lock file cannot be created.
    """
    fd = _acquire(path, fcntl.LOCK_EX, mode)
    assert fd is not None  # a blocking flock returns only once it holds the lock
    held = HeldLock(path)
    try:
        yield held
    finally:
        _release(fd, held)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself (not a link to one), waiting for it.

    Raises:
        FileNotFoundError, NotADirectoryError: there is no such folder.
        OSError: it cannot be opened (a link: ``ELOOP``).
    """
    fd = os.open(folder, _FOLDER_FLAGS | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def shared_lock(path: Path, *, mode: int = LOCK_FILE_MODE) -> Iterator[None]:
    """Hold ``path``'s lock with other shared holders; wait while an exclusive holder has it.

    Raises:
        OSError: the lock file cannot be created.
    """
    fd = _acquire(path, fcntl.LOCK_SH, mode)
    assert fd is not None
    try:
        yield
    finally:
        _release(fd)


@contextlib.contextmanager
def try_exclusive_lock(path: Path, *, mode: int = LOCK_FILE_MODE) -> Iterator[HeldLock | None]:
    """Hold ``path``'s lock alone if it is free now; yields ``None`` (without waiting) when it is not.

    Raises:
        OSError: the lock file cannot be created.
    """
    fd = _acquire(path, fcntl.LOCK_EX | fcntl.LOCK_NB, mode)
    if fd is None:
        yield None
        return
    held = HeldLock(path)
    try:
        yield held
    finally:
        _release(fd, held)


class ReentrantFileLock:
    """An exclusive lock on ``path`` for the threads of this process and other processes alike,
    re-entrant for the thread that holds it (use it as ``with lock:``).

    The threads of this process queue on a ``threading.RLock``; the outermost entry takes the
    ``flock`` and the matching exit releases it (see the module's docstring for why a second
    ``flock`` in the same thread would wait for itself).
    """

    def __init__(self, path: Path, *, mode: int = LOCK_FILE_MODE) -> None:
        self.path = path
        self.mode = mode
        self._thread_lock = threading.RLock()
        self._depth = 0  # entries of the thread that holds _thread_lock
        self._fd: int | None = None

    def __enter__(self) -> None:
        """Wait for the lock (other threads first, then other processes).

        Raises:
            OSError: the lock file cannot be created.
        """
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                self._fd = _acquire(self.path, fcntl.LOCK_EX, self.mode)
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                _release(fd)
        finally:
            self._thread_lock.release()
