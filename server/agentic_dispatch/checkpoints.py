"""Keeping a stopped run's uncommitted work as one commit on its branch (an automatic checkpoint).

A run stopped from outside (timeout, cancel, shutdown, the disk cap, a vanished container) may leave
changes in its clone's work tree that no tool shows and delivery never sends. :func:`checkpoint`
commits them on the run's branch. The clone is hostile, as for delivery (:mod:`.sync.git_delivery`):
its ``.git/config`` may name hooks, an fsmonitor or filter drivers, its ``.git`` may hold links and
alternates, its work tree FIFOs and huge files. So:

* no git command runs with the clone as its repository: a throw-away *shim* repository under
  ``work_dir`` (our config; hooks and fsmonitor off; no system or global configuration; ``* -filter``
  in its ``info/attributes``, which outranks every ``.gitattributes``) borrows the clone's objects
  through alternates, and git runs as ``--git-dir=<shim> --work-tree=<clone>`` with the shim's own
  index (a file under ``work_dir``);
* the branch's tip and ``HEAD`` are read from the clone's files through :mod:`.safefs`, and its object
  folder must hold no link and no alternates (:func:`.sync.shim.check_objects`);
* the clone's ``.git/info/exclude`` (where the server lists ``BLOCKED.md`` and the instruction files) is
  read through :mod:`.safefs` and becomes the shim's own; the work tree's ``.gitignore`` files apply;
* before git walks the work tree, the server does: a FIFO or other special file is left out (a tracked
  one becomes a deletion: git can store no FIFO), one named ``.git*`` (which git would open and block
  on) is refused, and a file over ``max_file_bytes`` is left out (a tracked one keeps the tip's version);
* the result comes home without git running in the clone: new objects are copied into
  ``.git/objects`` and ``refs/heads/<branch>`` and ``.git/index`` are replaced, all through
  :mod:`.safefs` (a link is replaced, never written through), so ``git status`` there is clean.

Call it only while no agent runs in the clone (under the workspace's lock).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import safefs
from .errors import CheckpointError, UnsafePathError
from .gitops import HOST_GIT_OVERRIDES
from .naming import check_git_ref
from .sync.gitrun import git_error, run_git
from .sync.shim import check_objects, read_ref_value, remove_stale_shims, shim_repository

__all__ = ["CHECKPOINT_EMAIL", "CHECKPOINT_NAME", "Checkpoint", "checkpoint"]

CHECKPOINT_NAME = "agentic-dispatch"
CHECKPOINT_EMAIL = "agentic-dispatch@localhost"
MAX_FILE_BYTES = 100 << 20
_OBJECT_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_FANOUT = re.compile(r"^[0-9a-f]{2}$")
_LOOSE = re.compile(r"^(?:[0-9a-f]{38}|[0-9a-f]{62})$")
_EXCLUDE_LIMIT = 1 << 20
_HEAD_LIMIT = 4096
# No system or global configuration (a user's filter driver, excludes or attributes file), a fixed identity.
_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": CHECKPOINT_NAME,
    "GIT_AUTHOR_EMAIL": CHECKPOINT_EMAIL,
    "GIT_COMMITTER_NAME": CHECKPOINT_NAME,
    "GIT_COMMITTER_EMAIL": CHECKPOINT_EMAIL,
}
_CONFIG = (
    *HOST_GIT_OVERRIDES,
    "core.attributesFile=/dev/null",
    "core.excludesFile=/dev/null",
    "core.splitIndex=false",
    "core.untrackedCache=false",
    "core.sparseCheckout=false",
    "core.symlinks=true",
    "core.commitGraph=false",
    "commit.gpgSign=false",
    "submodule.recurse=false",
    "gc.auto=0",
    "maintenance.auto=false",
)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint commit made on the branch.

    Attributes:
        commit: the new commit id (the branch's tip now).
        files: how many paths changed in it.
        left_out: work-tree paths not in it: special files (FIFOs, sockets) and files over the size limit.
    """

    commit: str
    files: int
    left_out: tuple[str, ...] = field(default=())


@dataclass
class _Survey:
    """What the server found in the work tree before git walks it (paths relative to the clone)."""

    specials: list[str] = field(default_factory=list)
    oversized: list[str] = field(default_factory=list)


def checkpoint(
    clone: Path,
    branch: str,
    why: str,
    work_dir: Path,
    *,
    timeout: float = 120,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Checkpoint | None:
    """Commit whatever the work tree of ``clone`` (a workspace's ``repo/`` folder) holds beyond the tip
    of ``refs/heads/<branch>`` as one commit on that branch, whose parent is that tip, with the message
    "agentic-dispatch: automatic checkpoint (<why>)" and the identity ``agentic-dispatch
    <agentic-dispatch@localhost>``; ``None`` when there is nothing uncommitted (nothing changes then).
    Afterwards ``git status`` in the clone is clean but for what :attr:`Checkpoint.left_out` names.
    ``work_dir`` is a server-owned folder (created if missing) for the throw-away repository; git gets
    ``timeout`` seconds in all. Call it only while no agent runs in the clone.

    Raises:
        InvalidInputError: ``branch`` is not a valid branch name.
        UnsafePathError: a link or a non-file where the clone's refs, ``HEAD``, ``info/exclude``, objects
            or index are read or written, alternates in its object folder, or a special file named ``.git*``
            in its work tree. Nothing was written.
        CheckpointError: the branch is missing or not a plain commit, ``HEAD`` is not on it, git failed or
            ran out of time, or the branch moved meanwhile. Nothing in the clone changed.
        FileNotFoundError: the clone has no ``.git`` folder.
        OSError: ``work_dir`` cannot be written.
    """
    ref = f"refs/heads/{check_git_ref('branch', branch)}"
    deadline = time.monotonic() + timeout
    tip = _branch_tip(clone, ref)
    _check_head(clone, ref)
    objects = check_objects(clone)
    exclude = safefs.read_text(clone, clone / ".git" / "info" / "exclude", _EXCLUDE_LIMIT) or ""
    survey = _survey(clone, max_file_bytes, deadline, timeout)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_shims(work_dir)
    message = f"agentic-dispatch: automatic checkpoint ({' '.join(why.split())[:200]})"
    with shim_repository(work_dir, objects, timeout) as shim:
        _write_shim_rules(shim, exclude, survey.oversized)
        git = _Git(shim, clone, deadline, timeout, max_file_bytes)
        made = _build(git, tip, survey, message)
        if made is None:
            return None
        commit, files = made
        if _branch_tip(clone, ref) != tip:
            raise CheckpointError(clone, f"{ref} moved while the checkpoint was made (is an agent still running?)")
        _copy_objects(clone, shim)
        safefs.write_text(clone, clone / ".git" / ref, f"{commit}\n")
        safefs.write_text(clone, clone / ".git" / "index", (shim / "index").read_bytes())
    return Checkpoint(commit, files, tuple(survey.specials + survey.oversized))


def _branch_tip(clone: Path, ref: str) -> str:
    """The commit id ``ref`` holds in the clone, read through :mod:`.safefs`.

    Raises:
        UnsafePathError: a link or a non-file on the way.
        CheckpointError: the ref is missing, symbolic, or not an object id.
    """
    value = read_ref_value(clone, ref)
    if value is None:
        raise CheckpointError(clone, f"{ref} does not exist there")
    if not _OBJECT_ID.match(value):
        raise CheckpointError(clone, f"{ref} is not a plain branch (it holds {value[:60]!r})")
    return value


def _check_head(clone: Path, ref: str) -> None:
    """``HEAD`` is on ``ref``: the work tree is that branch's, so the checkpoint's diff is its work.

    Raises:
        UnsafePathError: ``HEAD`` is a link or not a file.
        CheckpointError: ``HEAD`` is missing, detached, or on another branch.
    """
    head = safefs.read_text(clone, clone / ".git" / "HEAD", _HEAD_LIMIT)
    if head is None or head.strip() != f"ref: {ref}":
        shown = "missing" if head is None else repr(head.strip()[:80])
        raise CheckpointError(clone, f"HEAD is not on {ref} (it is {shown}), so the work tree is not that branch's")


def _survey(clone: Path, max_file_bytes: int, deadline: float, timeout: float) -> _Survey:
    """Walk the work tree (never following a link, never opening a file) for what git must not meet.

    Raises:
        UnsafePathError: a special file named ``.git*`` (git would open it, and a FIFO blocks).
        CheckpointError: the walk ran out of time.
    """
    found = _Survey()
    for folder, dirs, names in os.walk(clone):
        if time.monotonic() > deadline:
            raise CheckpointError(clone, f"the work tree took longer than {timeout:.0f} s to walk")
        dirs[:] = [d for d in dirs if d != ".git"]  # git never enters a .git folder
        for name in names + dirs:
            path = Path(folder) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            rel = str(path.relative_to(clone))
            if stat.S_ISREG(st.st_mode):
                if st.st_size > max_file_bytes:
                    found.oversized.append(rel)
            elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                if name.startswith(".git"):
                    raise UnsafePathError(path, "is not a regular file (git would read it, and a FIFO blocks)")
                found.specials.append(rel)
    return found


def _exclude_pattern(rel: str) -> bytes:
    """An ignore pattern matching the one path ``rel`` (from the work tree's root) literally."""
    escaped = "".join("\\" + c if c in "\\*?[]! #" else c for c in rel)
    return os.fsencode("/" + escaped)


def _write_shim_rules(shim: Path, exclude: str, oversized: list[str]) -> None:
    """The shim's ``info/exclude`` (the clone's, and the oversized files) and ``info/attributes``
    (no filter driver runs, whatever a ``.gitattributes`` names)."""
    (shim / "info").mkdir(exist_ok=True)
    lines = [exclude.encode("utf-8"), *(_exclude_pattern(p) for p in oversized if "\n" not in p)]
    (shim / "info" / "exclude").write_bytes(b"\n".join(lines) + b"\n")
    (shim / "info" / "attributes").write_text("* -filter\n", encoding="utf-8")


class _Git:
    """git with the shim as its repository and the clone as its work tree, under one deadline."""

    def __init__(self, shim: Path, clone: Path, deadline: float, timeout: float, max_file_bytes: int) -> None:
        self.shim, self.clone, self.deadline, self.timeout = shim, clone, deadline, timeout
        # Every blob git writes stays a loose object (a bigger one would go to a pack).
        self.config = (*_CONFIG, f"core.bigFileThreshold={max(max_file_bytes + 1, 512 << 20)}")

    def __call__(self, *args: str) -> str:
        """git's standard output.

        Raises:
            CheckpointError: git could not start, failed, or ran past the deadline.
        """
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckpointError(self.clone, f"git ran out of its {self.timeout:.0f} s")
        argv = ["--git-dir", str(self.shim), "--work-tree", str(self.clone), *args]
        try:
            result = run_git(argv, self.config, left, env=_ENV)
        except OSError as e:
            raise CheckpointError(self.clone, f"git could not be started ({e})") from e
        if result.returncode is None:
            raise CheckpointError(self.clone, f"git {args[0]} ran out of the {self.timeout:.0f} s it had")
        if not result.ok:
            raise CheckpointError(self.clone, f"git {args[0]} failed: {git_error(result)}")
        return result.stdout


def _build(git: _Git, tip: str, survey: _Survey, message: str) -> tuple[str, int] | None:
    """Make the checkpoint commit in the shim: ``(commit, paths changed)``, or ``None`` when the
    work tree holds what ``tip`` holds. The shim's index ends up matching the commit.

    Raises:
        CheckpointError: see :class:`_Git`.
    """
    git("cat-file", "-e", f"{tip}^{{commit}}")
    git("read-tree", tip)
    if survey.specials:  # git stores no FIFO: a tracked path that became one is gone from the checkpoint
        git("update-index", "--force-remove", "--", *survey.specials)
    held: list[str] = []
    if survey.oversized:  # too big to keep: a tracked one keeps the tip's version
        tracked = set(git("ls-files", "-z").split("\0"))
        held = [p for p in survey.oversized if p in tracked]
    if held:
        git("update-index", "--skip-worktree", "--", *held)
    git("add", "--all")
    if held:
        git("update-index", "--no-skip-worktree", "--", *held)
    tree = git("write-tree").strip()
    if tree == git("rev-parse", "--verify", f"{tip}^{{tree}}").strip():
        return None
    commit = git("commit-tree", "--no-gpg-sign", "-p", tip, "-m", message, tree).strip()
    changed = git("diff-tree", "-r", "--no-renames", "--name-only", "-z", tip, commit).split("\0")
    return commit, sum(1 for p in changed if p)


def _copy_objects(clone: Path, shim: Path) -> None:
    """Copy the objects git wrote into the shim (the new ones) into the clone's object folder, each
    through :mod:`.safefs`; one the clone has already is left as it is.

    Raises:
        UnsafePathError: a link or a non-file on the way.
    """
    objects = clone / ".git" / "objects"
    for fanout in sorted((shim / "objects").iterdir()):
        if not _FANOUT.match(fanout.name):
            continue
        for loose in sorted(fanout.iterdir()):
            target = objects / fanout.name / loose.name
            if _LOOSE.match(loose.name) and not safefs.check_file(clone, target):
                safefs.write_text(clone, target, loose.read_bytes(), mode=0o444)
