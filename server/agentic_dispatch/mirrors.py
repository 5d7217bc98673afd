"""The mirror cache: one bare mirror per remote under ``<root>/mirrors``, fetched on reuse unless
fetched very recently (``mirror_max_age_seconds``), and rebuilt from its remote when found damaged.

Mirror operations hold a per-mirror file lock: exclusive to create, fetch or rebuild; shared
while a workspace copies the mirror's files. Only server-run git writes a mirror: workspaces
get their own copies of its object files (see :mod:`.workspace`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import git

from .errors import RepoError
from .gitops import FETCH_TIMEOUT_SECONDS, GIT_ENV, file_lock, git_error_text, stderr_lines
from .repos import RepoRef

__all__ = ["MirrorCache", "MirrorDamaged", "branch_exists", "dir_id", "list_branches", "mirror_lock", "repair_mirror"]


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
        """Return an up-to-date mirror of ``ref``, creating or fetching it.

        A mirror whose fetch fails on its own objects (corrupt or unreadable) is rebuilt from the
        remote: fetching into it again would fail the same way at every dispatch.

        Raises:
            RepoError: the remote cannot be cloned or fetched (the message carries git's reason).
        """
        mirror = self.path(ref)
        stamp = mirror / "agentic-fetched-at"
        asked = time.time()
        with file_lock(mirror_lock(mirror)):
            if not mirror.exists():
                self._create(ref, mirror)
            else:
                fetched = stamp.stat().st_mtime if stamp.exists() else 0.0
                # A fetch that ended after this call began (while it waited for the lock) is as new
                # as one it would make: concurrent dispatches of one repository share it.
                fresh = fetched >= asked or asked - fetched < self.max_age
                lacking = need_branch is not None and not self._has_branch(mirror, need_branch)
                if (ref.kind == "local" and fetched < asked) or not fresh or lacking:
                    self._fetch(ref, mirror)
                else:
                    return mirror  # reused: the stamp keeps the time of the last real fetch
            stamp.touch()
        return mirror

    @staticmethod
    def _has_branch(mirror: Path, branch: str) -> bool:
        return (mirror / "refs" / "heads" / branch).exists() or f"refs/heads/{branch}" in _packed_refs(mirror)

    def _create(self, ref: RepoRef, mirror: Path) -> None:
        """Raises:
        RepoError: the remote cannot be cloned (no mirror is left behind).
        """
        try:
            self.fetches += 1
            _clone_mirror(ref.fetch_url, mirror)
        except git.GitCommandError as e:
            raise RepoError(
                f"cannot clone {ref.fetch_url}: {git_error_text(e)}. "
                "Check that the repository exists and that this machine can reach it "
                "(credentials for private repositories come from your git configuration)."
            ) from e

    def _fetch(self, ref: RepoRef, mirror: Path) -> None:
        """Raises:
        RepoError: the remote cannot be fetched, or the mirror is damaged and cannot be rebuilt.
        """
        try:
            self.fetches += 1
            with git.Repo(mirror) as repo:
                # gc.autoDetach=false: an automatic gc after the fetch runs now, under the mirror's
                # lock, not in the background where it could delete packs a workspace is copying.
                repo.git(c="gc.autoDetach=false").fetch(
                    "--prune", "--", "origin", env=GIT_ENV, kill_after_timeout=FETCH_TIMEOUT_SECONDS
                )
        except git.GitCommandError as e:
            if not _looks_damaged(e):
                raise RepoError(
                    f"cannot fetch {ref.fetch_url}: {git_error_text(e)}. "
                    "Check that the repository still exists and that this machine can reach it."
                ) from e
            self.fetches += 1
            _rebuild_mirror(ref.fetch_url, mirror, git_error_text(e))


def _packed_refs(mirror: Path) -> str:
    try:
        return (mirror / "packed-refs").read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def branch_exists(mirror: Path, branch: str) -> bool:
    return MirrorCache._has_branch(mirror, branch)


def list_branches(mirror: Path, limit: int = 20) -> list[str]:
    repo = git.Repo(mirror)
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
    with file_lock(mirror_lock(mirror)):
        if dir_id(mirror) != damage.seen:
            return  # replaced while this dispatch waited for the lock: try the new one
        _rebuild_mirror(_mirror_url(mirror), mirror, damage.reason)
