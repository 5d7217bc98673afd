"""Reading an agent's clone without letting git run in it: its refs, its objects, a shim.

The clone is hostile (see :mod:`.git_delivery`): no git command runs with it as its repository,
and nothing in it is read as configuration. What the server needs of it is read here:

* a ref's value, from the loose ref file or ``packed-refs``, through :mod:`..safefs` (no link followed);
* its object folder, checked to hold only real folders and files and no alternates of its own;
* a throw-away *shim* repository (our config, hooks off) that borrows those objects through
  ``objects/info/alternates``, so git reads the clone's objects and nothing else of it.

Delivery (:mod:`.git_delivery`) and checkpoints (:mod:`..checkpoints`) share these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .. import safefs
from ..errors import UnsafePathError
from .gitrun import FETCH_CONFIG, git_error, run_git

__all__ = [
    "NOT_A_FOLDER",
    "SHIM_CONFIG",
    "check_objects",
    "read_ref_value",
    "remove_stale_shims",
    "shim_repository",
]

_REF_LIMIT = 4096
_PACKED_REFS_LIMIT = 64 << 20
_STALE_SHIM_SECONDS = 86_400
NOT_A_FOLDER = "is not a folder (a link?)"
SHIM_CONFIG = """[core]
\trepositoryformatversion = 0
\tbare = true
\thooksPath = /dev/null
\tfsmonitor = false
\tcommitGraph = false
\tmultiPackIndex = false
[pack]
\tuseBitmaps = false
[gc]
\tauto = 0
"""


def read_ref_value(clone: Path, ref: str) -> str | None:
    """What ``ref`` holds in the clone (loose ref, else ``packed-refs``), stripped, without following
    links; ``None`` when neither has it. The caller checks that it is an object id.

    Raises:
        UnsafePathError: a link or a non-file on the way.
    """
    git_dir = clone / ".git"
    value = safefs.read_text(clone, git_dir.joinpath(*ref.split("/")), _REF_LIMIT)
    if value is None:
        packed = safefs.read_text(clone, git_dir / "packed-refs", _PACKED_REFS_LIMIT) or ""
        value = next((ln.split(" ", 1)[0] for ln in packed.splitlines() if ln.endswith(" " + ref)), None)
    return None if value is None else value.strip()


def check_objects(clone: Path) -> Path:
    """The clone's object folder (absolute), checked to hold only real folders and files and no alternates.

    Raises:
        UnsafePathError: ``.git`` or ``objects`` is not a folder (problem :data:`NOT_A_FOLDER`), or
            the folder holds a link, a special file, or ``info/alternates`` (pointers out of the clone).
        FileNotFoundError: the clone has no ``.git/objects``.
    """
    objects = clone / ".git" / "objects"
    for path in (clone / ".git", objects):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UnsafePathError(path, NOT_A_FOLDER)
    if os.path.lexists(objects / "info" / "alternates"):
        raise UnsafePathError(objects / "info" / "alternates", "points at objects outside the clone")
    for folder, dirs, names in os.walk(objects):
        for name in dirs + names:
            mode = os.lstat(Path(folder) / name).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafePathError(Path(folder) / name, "is a link or a special file")
    return objects.absolute()


def remove_stale_shims(root: Path) -> None:
    """Shims a killed server left under ``root`` (a live one lasts seconds; a day old is surely stale)."""
    cutoff = time.time() - _STALE_SHIM_SECONDS
    for shim in root.glob("shim-*"):
        with contextlib.suppress(FileNotFoundError):
            if shim.stat().st_mtime < cutoff:
                shutil.rmtree(shim, ignore_errors=True)


@contextlib.contextmanager
def shim_repository(root: Path, objects: Path, timeout: float) -> Iterator[Path]:
    """A new bare repository under ``root`` with :data:`SHIM_CONFIG`, borrowing ``objects`` (checked
    by :func:`check_objects`) through its alternates; removed when the block ends, also on failure.

    Raises:
        OSError: it cannot be made.
    """
    shim = Path(tempfile.mkdtemp(prefix="shim-", dir=root))
    try:
        init = run_git(["init", "--quiet", "--bare", "--template=", str(shim)], FETCH_CONFIG, timeout)
        if not init.ok:
            raise OSError(f"cannot create {shim}: {git_error(init)}")
        (shim / "config").write_text(SHIM_CONFIG, encoding="utf-8")
        (shim / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (shim / "objects" / "info" / "alternates").write_text(f"{objects}\n", encoding="utf-8")
        yield shim
    finally:
        shutil.rmtree(shim, ignore_errors=True)
