"""A dispatch's scope: which paths its run may change, and which changes of a branch fall outside.

Globs follow git's wildmatch (the ``pathspec`` library, gitignore flavour), anchored at the
repository's root: ``*`` and ``?`` never cross a ``/``, ``**`` spans any number of folders
(``src/**`` is everything under ``src``), ``[abc]`` is a class, a glob naming a folder covers what
it holds, and a leading ``!`` takes paths back out (the last glob that matches a path decides).

What a branch changed is read with server-owned git only, as delivery and checkpoints read it: a
throw-away shim repository borrows the clone's objects (:mod:`.sync.shim`), never the clone's own
configuration, and compares the commit the branch started from with its tip (the agent's commits
and any automatic checkpoint). A rename counts as both of its paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pathspec

from .errors import RepoError
from .gitops import HOST_GIT_OVERRIDES
from .models import OutOfScope
from .naming import check_git_ref
from .sync.gitrun import git_error, run_git
from .sync.shim import check_objects, read_ref_value, remove_stale_shims, shim_repository

__all__ = ["MAX_SHOWN", "changed_paths", "out_of_scope", "outside"]

MAX_SHOWN = 50  # paths listed on a status row; the count says how many there are in all
_OBJECT_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def outside(paths: Iterable[str], globs: Iterable[str]) -> list[str]:
    """The paths (relative to the repository's root) no glob of ``globs`` covers, sorted, each once."""
    # Each glob anchored at the root ("/" after an optional "!"): "*.md" is the root's, as in a pathspec.
    spec = pathspec.PathSpec.from_lines("gitignore", [f"!/{g[1:]}" if g.startswith("!") else f"/{g}" for g in globs])
    return sorted({p for p in paths if not spec.match_file(p)})


def changed_paths(clone: Path, base: str, branch: str, work_dir: Path, *, timeout: float = 60) -> list[str]:
    """Every path ``refs/heads/<branch>`` of ``clone`` (a workspace's ``repo/``) changed since the
    commit ``base``: added, changed, deleted, and both paths of a rename or copy. git never runs with
    the clone as its repository (a shim under ``work_dir`` borrows its objects).

    Raises:
        InvalidInputError: ``branch`` is not a valid branch name.
        UnsafePathError: a link or a non-file where the branch's ref or the objects are read.
        RepoError: the branch or ``base`` is missing or not a commit, or git failed.
        OSError: ``work_dir`` cannot be written.
    """
    ref = f"refs/heads/{check_git_ref('branch', branch)}"
    tip = read_ref_value(clone, ref)
    if tip is None or not _OBJECT_ID.match(tip) or not _OBJECT_ID.match(base):
        raise RepoError(f"{ref} of {clone} or its base {base[:60]!r} is not a plain commit")
    objects = check_objects(clone)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_shims(work_dir)
    with shim_repository(work_dir, objects, timeout) as shim:
        argv = ["--git-dir", str(shim), "diff-tree", "-r", "-z", "-M", "--name-status", "--no-ext-diff", base, tip]
        try:
            result = run_git(argv, HOST_GIT_OVERRIDES, timeout, env=_ENV)
        except OSError as e:
            raise RepoError(f"git could not be started ({e})") from e
        if result.returncode is None or not result.ok:
            raise RepoError(f"git diff-tree in a shim over {clone} failed: {git_error(result)}")
    fields = result.stdout.split("\0")
    paths: list[str] = []
    i = 0
    while i < len(fields) and fields[i]:
        two = fields[i][:1] in ("R", "C")  # a rename or copy: its status, then both paths
        paths.extend(fields[i + 1 : i + (3 if two else 2)])
        i += 3 if two else 2
    return paths


def out_of_scope(clone: Path, base: str, branch: str, globs: list[str], work_dir: Path) -> OutOfScope:
    """What the branch changed since ``base`` outside ``globs``: the first :data:`MAX_SHOWN` paths and the count.

    Raises:
        see :func:`changed_paths`.
    """
    found = outside(changed_paths(clone, base, branch, work_dir), globs)
    return OutOfScope(paths=found[:MAX_SHOWN], count=len(found))
