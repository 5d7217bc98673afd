"""Reading and writing files inside folders an agent can write to.

The workspace's ``repo/``, the agent home and the logs folder are mounted read-write into
the agent's container, and the agent runs as the host user (under a root server, as an
unprivileged uid the folders are handed to: :func:`chown_tree`). Whatever the agent leaves there
may be a symbolic link to anywhere on the host, a FIFO, or a gigabyte of text. The server
touches those folders only through these functions, which:

* never follow a symbolic link, neither the file itself nor any folder between the trusted
  ``base`` (a folder the server made, or a mount root the agent cannot replace) and the file;
* read only regular files, and at most ``limit`` bytes;
* replace files atomically (:func:`.fileio.write_atomic`: a temporary file in the same folder,
  then ``os.replace``, which replaces a link rather than writing through it), inside the folder
  held open since it was reached link-free, so a folder swapped for a link meanwhile is not followed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import UnsafePathError
from .fileio import write_atomic

__all__ = [
    "append_text",
    "check_file",
    "chown_tree",
    "copy_file",
    "ensure_file",
    "read_range",
    "read_text",
    "remove_file",
    "tail_text",
    "write_link",
    "write_text",
]

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK = "is a symbolic link; agentic-dispatch does not follow links an agent made"


def _check_folders(base: Path, path: Path, create: bool) -> None:
    """Every folder from ``base`` (exclusive) down to ``path``'s parent is a real folder.

    Raises:
        UnsafePathError: ``path`` is not under ``base``, or a folder on the way is a link or a file.
    """
    try:
        rel = path.relative_to(base)
    except ValueError as e:
        raise UnsafePathError(path, f"is not inside {base}") from e
    if not rel.parts or ".." in rel.parts:
        raise UnsafePathError(path, f"is not inside {base}")
    current = base
    for part in rel.parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if not create:
                return  # nothing below can exist either
            current.mkdir()
            continue
        if stat.S_ISLNK(mode):
            raise UnsafePathError(current, _LINK)
        if not stat.S_ISDIR(mode):
            raise UnsafePathError(current, "is not a folder")


def _check_file(path: Path) -> bool:
    """Whether ``path`` exists.

    Raises:
        UnsafePathError: it exists and is not a regular file.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise UnsafePathError(path, _LINK)
    if not stat.S_ISREG(mode):
        raise UnsafePathError(path, "is not a regular file")
    return True


def check_file(base: Path, path: Path) -> bool:
    """Whether the regular file ``path`` exists (reached without following any link).

    Raises:
        UnsafePathError: it (or a folder on the way) is a link, or it is not a regular file.
    """
    _check_folders(base, path, create=False)
    return _check_file(path)


def _open_regular(base: Path, path: Path) -> int | None:
    """An fd of the regular file ``path``, or ``None`` when it does not exist.

    Raises:
        UnsafePathError: it (or a folder on the way) is a link, or it is not a regular file.
    """
    _check_folders(base, path, create=False)
    if not _check_file(path):
        return None
    try:
        fd = os.open(path, _READ_FLAGS)  # O_NOFOLLOW: a link swapped in since the check fails here
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UnsafePathError(path, f"cannot be opened safely ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(path, "is not a regular file")
    return fd


def read_text(base: Path, path: Path, limit: int, from_end: bool = False) -> str | None:
    """The first (``from_end``: the last) ``limit`` bytes of ``path`` as text, or ``None`` when
    it does not exist.

    Raises:
        UnsafePathError: see :func:`_open_regular`.
    """
    got = read_range(base, path, None if from_end else 0, limit)
    return None if got is None else got[0].decode("utf-8", errors="replace")


def read_range(base: Path, path: Path, offset: int | None, limit: int) -> tuple[bytes, int, int] | None:
    """Up to ``limit`` bytes of ``path`` from ``offset`` (``None``: the last ``limit`` bytes), with the
    offset they start at and the file's size then; ``None`` when it does not exist.

    Raises:
        UnsafePathError: see :func:`_open_regular`.
    """
    fd = _open_regular(base, path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - limit) if offset is None else min(offset, size)
        f.seek(start)
        return f.read(limit), start, size


def tail_text(base: Path, path: Path, limit: int) -> str | None:
    """The last ``limit`` bytes of ``path`` as text (see :func:`read_text`)."""
    return read_text(base, path, limit, from_end=True)


def _open_folder(base: Path, path: Path) -> int:
    """An fd of ``path``'s folder, reached from ``base`` one folder at a time, each opened relative
    to the one before without following a link; missing folders are created.

    Holding the folder open is what keeps a write there: a write by path after a check by path
    would follow a link the agent swapped in between.

    Raises:
        UnsafePathError: ``path`` is not under ``base``, or a folder on the way is a link or not a folder.
    """
    _check_folders(base, path, create=False)  # containment first, with the same messages as the readers
    current = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # trusted: the server made it
    where = base
    try:
        for part in path.relative_to(base).parts[:-1]:
            where = where / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=current)
            try:
                child = os.open(part, _FOLDER_FLAGS, dir_fd=current)
            except OSError as e:
                raise UnsafePathError(where, _folder_problem(current, part, e)) from e
            os.close(current)
            current = child
    except BaseException:
        os.close(current)
        raise
    return current


def _folder_problem(parent: int, name: str, error: OSError) -> str:
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return _LINK
    if mode and not stat.S_ISDIR(mode):
        return "is not a folder"
    return f"cannot be opened safely ({error.strerror})"


def write_text(base: Path, path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` atomically and durably, creating folders below ``base`` as needed.

    A link or file the agent left at ``path`` is replaced, never written through; the new
    file has ``mode`` from the start. The write goes through the folder opened link-free
    (:func:`_open_folder`) and :func:`.fileio.write_atomic` given that folder's fd.

    Raises:
        UnsafePathError: a folder on the way is a link or not a folder, or ``path`` is a folder.
        OSError: the folder cannot be written.
    """
    with _replacing(base, path) as folder:
        write_atomic(Path(path.name), text, mode=mode, dir_fd=folder)


@contextlib.contextmanager
def _replacing(base: Path, path: Path) -> Iterator[int]:
    """The fd of ``path``'s folder, reached link-free (:func:`_open_folder`), for replacing ``path``
    in it; ``path`` must not be a folder.

    Raises:
        UnsafePathError: a folder on the way is a link or not a folder, or ``path`` is a folder.
    """
    folder = _open_folder(base, path)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(path.name, dir_fd=folder, follow_symlinks=False).st_mode):
                raise UnsafePathError(path, "is a folder")
        yield folder
    finally:
        os.close(folder)


def append_text(base: Path, path: Path, text: str | bytes) -> None:
    """Append ``text`` (text, or bytes as they are) to the regular file ``path`` (created when
    missing), never through a link.

    Raises:
        UnsafePathError: ``path`` or a folder on the way is a link, or it is not a regular file.
    """
    _check_folders(base, path, create=True)
    _check_file(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise UnsafePathError(path, f"cannot be opened safely ({e.strerror})") from e
    with os.fdopen(fd, "ab") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafePathError(path, "is not a regular file")
        f.write(text.encode("utf-8") if isinstance(text, str) else text)


def write_link(base: Path, path: Path, target: str) -> None:
    """Replace ``path`` with a symbolic link to ``target`` (written as given, never followed),
    atomically, through the folder reached link-free as :func:`write_text` does.

    Raises:
        UnsafePathError: a folder on the way is a link or not a folder, or ``path`` is a folder.
        OSError: the folder cannot be written.
    """
    with _replacing(base, path) as folder:
        temp = f".{path.name}.link-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=folder)
        os.symlink(target, temp, dir_fd=folder)
        os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)


def remove_file(base: Path, path: Path) -> bool:
    """Remove the file or link ``path`` (not a folder), reached link-free; whether it was there.

    Raises:
        UnsafePathError: a folder on the way is a link or not a folder, or ``path`` is a folder.
    """
    if not os.path.lexists(path.parent):
        return False  # nothing to remove (and no folder is made to find that out)
    folder = _open_folder(base, path)
    try:
        os.unlink(path.name, dir_fd=folder)
    except FileNotFoundError:
        return False
    except IsADirectoryError as e:
        raise UnsafePathError(path, "is a folder") from e
    finally:
        os.close(folder)
    return True


def copy_file(base: Path, source: Path, path: Path, mode: int = 0o600, keep_newer: bool = False) -> bool:
    """Copy the host file ``source`` (trusted) to ``path`` under ``base`` as :func:`write_text` does.

    With ``keep_newer``, a copy at ``path`` at least as new as ``source`` is kept: a CLI that
    refreshed its login in its copy must not get the older tokens back. Returns whether it copied.

    Raises:
        UnsafePathError: as :func:`write_text`, or the existing copy is a link or not a file.
    """
    _check_folders(base, path, create=True)
    if keep_newer and _check_file(path) and os.lstat(path).st_mtime >= source.stat().st_mtime:
        return False
    write_text(base, path, source.read_bytes(), mode)
    return True


def ensure_file(base: Path, path: Path, mode: int = 0o600) -> None:
    """Make ``path`` an (empty) regular file unless it is one already; used for mount points.

    Raises:
        UnsafePathError: ``path`` or a folder on the way is a link, or ``path`` is not a regular file.
    """
    _check_folders(base, path, create=True)
    if _check_file(path):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode))
    _check_file(path)


def chown_tree(base: Path, uid: int, gid: int) -> int:
    """Give ``base`` and everything below it to ``uid:gid``, never following a link (a link itself
    is given, not what it points to; a linked folder is not entered). Entries already owned so are
    left as they are (their ctime, which git's index compares, does not change). Returns how many
    entries changed owner. Call it only while no agent runs in ``base``.

    Raises:
        UnsafePathError: ``base`` itself is a link.
        OSError: an entry cannot be changed (not permitted: the server does not run as root).
    """
    changed = 0
    st = os.lstat(base)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(base, _LINK)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(base, uid, gid, follow_symlinks=False)
        changed += 1
    # fwalk holds each folder open and checks it is the one it listed: a folder swapped for a
    # link is not entered.
    for _, dirs, files, dir_fd in os.fwalk(base, follow_symlinks=False):
        for name in dirs + files:  # a link to a folder is listed among dirs (and not entered)
            try:
                est = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (est.st_uid, est.st_gid) != (uid, gid):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                    changed += 1
            except FileNotFoundError:
                continue
    return changed
