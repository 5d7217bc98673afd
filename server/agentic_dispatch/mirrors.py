"""The mirror cache: one bare mirror per remote under ``<root>/mirrors``, fetched on reuse unless
fetched very recently (``mirror_max_age_seconds``), and rebuilt from its remote when found damaged.

Mirror operations hold a per-mirror file lock: exclusive to create, fetch or rebuild; shared
while a workspace copies the mirror's files. Only server-run git writes a mirror: workspaces
get their own copies of its object files (see :mod:`.workspace`).

A refused dispatch leaves nothing behind: a mirror that a dispatch has just made, of a repository
no workspace can start from (no commits, an unknown branch, a HEAD on a branch without commits),
is removed again, and so is the lock file of a mirror that could not be made. A mirror that was
there before stays.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DispatchError, InvalidInputError, RepoError
from .fileio import exclusive_lock
from .gitops import FETCH_TIMEOUT_SECONDS, GIT_ENV, dubious_ownership, git_error_text, stderr_lines
from .naming import check_git_ref
from .repos import RepoRef

if TYPE_CHECKING:
    import git  # GitPython is imported where it is used: a host waiting for the server must not wait for it

log = logging.getLogger(__name__)

__all__ = [
    "MirrorCache",
    "MirrorDamaged",
    "branch_exists",
    "dir_id",
    "list_branches",
    "mirror_lock",
    "repair_mirror",
    "start_point",
]


# Where git's stderr shows that objects already in the mirror cannot be read (as opposed to a
# network or remote failure). Lines from the remote ("remote: ...") are not looked at.
_DAMAGE_SIGNS = (
    "is corrupt",
    "inflate:",
    "unable to unpack",
    "non-monotonic index",
    "bad object",
    "hash mismatch",
    "broken link",
    "unable to read",
    "packfile",
    "bad packed object",
    "index file",
    "is too small",
)


def _looks_damaged(e: git.GitCommandError) -> bool:
    """Whether a failed fetch into a mirror says the mirror's own objects cannot be read."""
    own = [ln for ln in stderr_lines(e) if not ln.startswith("remote:")]
    return any(sign in ln for ln in own for sign in _DAMAGE_SIGNS)


def mirror_lock(mirror: Path) -> Path:
    """The lock of one mirror, ``<key>.lock`` beside ``<key>.git``: held exclusively to create, fetch
    or rebuild the mirror, shared while a workspace copies its files."""
    return mirror.with_name(mirror.name.removesuffix(".git") + ".lock")


def _clone_mirror(url: str, mirror: Path) -> None:
    """Clone ``url`` as a bare mirror into ``<mirror>.partial``, then put it in place of ``mirror``
    (a mirror already there is set aside and removed). The caller holds the mirror's lock.

    Raises:
        git.GitCommandError: the clone failed; ``mirror`` is left as it was.
    """
    import git

    tmp = mirror.with_name(mirror.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # The mirror gets its own copies of the objects (this matters for a local repository only;
        # other transports copy anyway): hardlinked files would be shared with the user's repository,
        # and from there with anything else that links them.
        git.Repo.clone_from(
            url,
            tmp,
            mirror=True,
            no_hardlinks=True,
            env=GIT_ENV,
            kill_after_timeout=FETCH_TIMEOUT_SECONDS,
        ).close()
        _pack_loose(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if mirror.exists():
        # Two renames, as a folder cannot replace a non-empty one. A crash between them leaves no
        # mirror (the next ensure clones one) and at most a stale ``.old``, removed by the next rebuild.
        old = mirror.with_name(mirror.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        mirror.rename(old)
        tmp.rename(mirror)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(mirror)
    (mirror / "agentic-fetched-at").touch()


def _rebuild_mirror(url: str, mirror: Path, why: str) -> None:
    """Replace a damaged ``mirror`` by a fresh clone of ``url``. The caller holds the mirror's lock.

    Raises:
        RepoError: the fresh clone failed (the damaged mirror is left in place, to be tried again).
    """
    import git

    try:
        _clone_mirror(url, mirror)
    except git.GitCommandError as e:
        raise RepoError(
            f"the mirror {mirror} is damaged ({why}) and rebuilding it from {url} failed: {git_error_text(e)}. "
            "Check that the repository still exists and that this machine can reach it, then dispatch again."
        ) from e


class MirrorCache:
    """One bare mirror per remote; fetched on reuse unless fetched very recently."""

    def __init__(self, root: Path, max_age_seconds: float) -> None:
        self.root = root
        self.max_age = max_age_seconds
        self.fetches = 0  # remote transfers made by this process (clone or fetch), for observability

    def path(self, ref: RepoRef) -> Path:
        return self.root / f"{ref.mirror_key}.git"

    def ensure(self, ref: RepoRef, need_branch: str | None = None) -> Path:
        """Return an up-to-date mirror of ``ref`` that a workspace can start from (``need_branch``,
        else the branch HEAD names), creating or fetching it.

        A mirror whose fetch fails on its own objects (corrupt or unreadable) is rebuilt from the
        remote: fetching into it again would fail the same way at every dispatch. A mirror this call
        made is removed again, with its lock file, when it has nothing to start from; so is the lock
        of one that could not be made. A mirror that was there before stays.

        Raises:
            InvalidInputError: nothing to start from (see :func:`start_point`), or git refuses a local
                repository another user owns (the message says how to trust it).
            RepoError: the remote cannot be cloned or fetched (the message carries git's reason).
        """
        if need_branch is not None:
            check_git_ref("branch", need_branch)
        mirror = self.path(ref)
        asked = time.time()
        with exclusive_lock(mirror_lock(mirror)) as held:
            created = not mirror.exists()
            try:
                if created:
                    self._create(ref, mirror)
                elif self._stale(ref, mirror, asked, need_branch):
                    self._fetch(ref, mirror)
                    (mirror / "agentic-fetched-at").touch()  # a reused mirror keeps its last fetch's time
                    _pack_loose(mirror)
                start_point(mirror, need_branch)
            except DispatchError:
                if created:  # nobody else has seen it: the lock is ours since before it existed
                    shutil.rmtree(mirror, ignore_errors=True)
                    held.remove_on_release = True
                raise
        return mirror

    def _stale(self, ref: RepoRef, mirror: Path, asked: float, need_branch: str | None) -> bool:
        """Whether ``mirror`` must be fetched for a call made at ``asked``: a local repository is
        always fetched (it is cheap and users expect their latest commit), a remote one once its
        last fetch is older than the max age, either when it lacks ``need_branch``. A fetch that
        ended after the call began (while it waited for the lock) is as new as one it would make:
        concurrent dispatches of one repository share it."""
        stamp = mirror / "agentic-fetched-at"
        fetched = stamp.stat().st_mtime if stamp.exists() else 0.0
        fresh = fetched >= asked or asked - fetched < self.max_age
        lacking = need_branch is not None and not self._has_branch(mirror, need_branch)
        return (ref.kind == "local" and fetched < asked) or not fresh or lacking

    @staticmethod
    def _has_branch(mirror: Path, branch: str) -> bool:
        return (mirror / "refs" / "heads" / branch).exists() or f"refs/heads/{branch}" in _packed_refs(mirror)

    def _create(self, ref: RepoRef, mirror: Path) -> None:
        """Raises:
        InvalidInputError: git refuses the repository as another user's (no mirror is left behind).
        RepoError: the remote cannot be cloned (no mirror is left behind).
        """
        import git

        try:
            self.fetches += 1
            _clone_mirror(ref.fetch_url, mirror)
        except git.GitCommandError as e:
            _refuse_untrusted(e)
            raise RepoError(
                f"cannot clone {ref.fetch_url}: {git_error_text(e)}. "
                "Check that the repository exists and that this machine can reach it "
                "(credentials for private repositories come from your git configuration)."
            ) from e

    def _fetch(self, ref: RepoRef, mirror: Path) -> None:
        """Raises:
        InvalidInputError: git refuses the repository as another user's.
        RepoError: the remote cannot be fetched, or the mirror is damaged and cannot be rebuilt.
        """
        import git

        try:
            self.fetches += 1
            with git.Repo(mirror) as repo:
                # gc.autoDetach=false: an automatic gc after the fetch runs now, under the mirror's
                # lock, not in the background where it could delete packs a workspace is copying.
                repo.git(c="gc.autoDetach=false").fetch(
                    "--prune", "--", "origin", env=GIT_ENV, kill_after_timeout=FETCH_TIMEOUT_SECONDS
                )
        except git.GitCommandError as e:
            _refuse_untrusted(e)
            if not _looks_damaged(e):
                raise RepoError(
                    f"cannot fetch {ref.fetch_url}: {git_error_text(e)}. "
                    "Check that the repository still exists and that this machine can reach it."
                ) from e
            self.fetches += 1
            _rebuild_mirror(ref.fetch_url, mirror, git_error_text(e))


def _refuse_untrusted(e: git.GitCommandError) -> None:
    """Raises:
    InvalidInputError: ``e`` is git refusing a repository another user owns (not a fault of the
        remote or of this machine's network: git's configuration decides, so the user must act).
    """
    ownership = dubious_ownership(str(e.stderr or ""))
    if ownership is not None:
        raise InvalidInputError("repo", f"{ownership}.") from e


def start_point(mirror: Path, branch: str | None) -> str:
    """The branch a workspace of ``mirror`` starts from: ``branch``, else the branch the
    repository's HEAD names (``"HEAD"`` when HEAD is detached: its commit is the start).

    Raises:
        InvalidInputError: ``branch`` is malformed or not in the repository (the message lists the
            branches there); the repository has no commits; its HEAD is on a branch without commits.
    """
    if branch is not None:
        check_git_ref("branch", branch)
        if not branch_exists(mirror, branch):
            known = ", ".join(list_branches(mirror)) or "(none)"
            raise InvalidInputError(
                "branch", f"{branch!r} does not exist in the repository. Existing branches: {known}."
            )
        return branch
    head = (mirror / "HEAD").read_text(encoding="utf-8").strip()  # the mirror is ours: no agent writes it
    if not head.startswith("ref: refs/heads/"):
        return "HEAD"
    name = head.removeprefix("ref: refs/heads/")
    if branch_exists(mirror, name):
        return name
    branches = list_branches(mirror)
    if not branches:
        raise InvalidInputError(
            "repo",
            "the repository has no commits; an agent needs a commit to branch from. "
            "Make an initial commit and dispatch again.",
        )
    raise InvalidInputError(
        "repo",
        f"the repository's HEAD is on {name!r}, which has no commits yet, so an agent has nothing to branch "
        f"from. Commit on {name!r}, or dispatch with branch set to one of: {', '.join(branches)}.",
    )


def _has_loose_objects(repo: Path) -> bool:
    """Whether ``repo``'s object folder holds an object file of its own (not in a pack)."""
    try:
        folders = [e for e in os.scandir(repo / "objects") if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return False
    for folder in folders:
        with os.scandir(folder.path) as entries:
            if any(True for _ in entries):
                return True
    return False


def _pack_loose(mirror: Path) -> None:
    """Put the mirror's loose objects in a pack of their own (``git repack -d``: only the loose ones;
    the packs there stay as they are). A local repository's are all loose when the mirror is made,
    and a fetch of a few objects leaves them loose; every workspace copies the mirror's object files
    one by one (``--no-hardlinks``), and a pack is a few files where loose objects are one per blob:
    a clone of a packed mirror takes about a third of the time. The caller holds the mirror's lock
    (or the mirror is not in place yet). A repack that fails leaves the objects as they were (loose
    objects work, only slower)."""
    import git

    if not _has_loose_objects(mirror):
        return
    try:
        with git.Repo(mirror) as repo:
            repo.git.repack("-d", "-q", env=GIT_ENV, kill_after_timeout=FETCH_TIMEOUT_SECONDS)
    except git.GitCommandError as e:
        log.warning("cannot pack the loose objects of the mirror %s: %s", mirror, git_error_text(e))


def _packed_refs(mirror: Path) -> str:
    try:
        return (mirror / "packed-refs").read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def branch_exists(mirror: Path, branch: str) -> bool:
    return MirrorCache._has_branch(mirror, branch)


def list_branches(mirror: Path, limit: int = 20) -> list[str]:
    import git

    with git.Repo(mirror) as repo:
        return [h.name for h in repo.heads][:limit]


class MirrorDamaged(Exception):
    """A clone or checkout from the mirror failed on the mirror's side (``seen``: the mirror as it was then)."""

    def __init__(self, reason: str, seen: tuple[int, int] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seen = seen


def dir_id(path: Path) -> tuple[int, int] | None:
    """Which folder is at ``path`` now (a rebuilt mirror is a new folder), or None if there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _mirror_url(mirror: Path) -> str:
    """The remote ``mirror`` was cloned from, as git recorded it there (no agent can write the mirror).

    Raises:
        RepoError: the mirror's config does not name its remote.
    """
    import git

    try:
        return str(git.Git(mirror).config("--file", str(mirror / "config"), "--get", "remote.origin.url"))
    except git.GitCommandError as e:
        raise RepoError(
            f"the mirror {mirror} is damaged and does not say which remote it mirrors. "
            "Delete that folder and dispatch again: the mirror is then cloned afresh."
        ) from e


def repair_mirror(mirror: Path, damage: MirrorDamaged) -> None:
    """Rebuild ``mirror`` from its remote after a failed clone, unless another dispatch already did.

    Raises:
        RepoError: the mirror does not name its remote, or the remote cannot be cloned.
    """
    with exclusive_lock(mirror_lock(mirror)):
        if dir_id(mirror) != damage.seen:
            return  # replaced while this dispatch waited for the lock: try the new one
        _rebuild_mirror(_mirror_url(mirror), mirror, damage.reason)
