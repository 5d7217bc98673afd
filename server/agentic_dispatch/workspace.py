"""Workspace preparation (GitPython): each workspace is a local clone of its repository's mirror
with its own copy of the object files (``--no-hardlinks``: the agent can write everything in its
clone, so no file of it may be the mirror's), needing nothing outside the workspace at run time,
with ``origin`` pointing at the real remote and a fresh ``agent/<slug>`` branch. A clone that
trips on a damaged mirror gets the mirror rebuilt and is tried once more.

Also here: the server-managed exclude entries, and the host-side git the server runs in a clone
after an agent has written to it (always with :data:`.gitops.HOST_GIT_OVERRIDES`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from . import safefs
from .errors import RepoError
from .gitops import GIT_ENV, HOST_GIT_OVERRIDES, file_lock, git_error_text, host_git, safe_directory
from .mirrors import MirrorDamaged, dir_id, mirror_lock, repair_mirror, start_point
from .naming import check_git_ref, slugify
from .sync.gitrun import FETCH_CONFIG, git_error, run_git
from .sync.shim import check_objects, read_ref_value, remove_stale_shims, shim_repository

if TYPE_CHECKING:
    import git  # GitPython is imported where it is used: a host waiting for the server must not wait for it

__all__ = [
    "bounded_git",
    "clone_workspace",
    "commits_ahead",
    "exclude_paths",
    "recent_log",
    "start_from_workspace",
    "task_slug",
]

_OBJECT_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_BASE_REF = "refs/agentic/base"


# Failures of a clone from the mirror that are this machine's, not the mirror's: rebuilding the
# mirror would not help (and would need the same disk).
_LOCAL_TROUBLE = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _clone_failure(mirror: Path, e: git.GitCommandError, seen: tuple[int, int] | None) -> Exception:
    """What a git failure while staging from ``mirror`` means: this machine's trouble, or a damaged mirror."""
    reason = git_error_text(e)
    if any(sign in str(e.stderr or "") for sign in _LOCAL_TROUBLE):
        return RepoError(f"cannot clone the mirror {mirror}: {reason}. Free some disk space and dispatch again.")
    return MirrorDamaged(reason, seen)


def _stage(mirror: Path, dest: Path, origin_url: str, start_branch: str | None, task_slug: str) -> tuple[str, str]:
    """One attempt at ``clone_workspace`` (see there).

    Raises:
        MirrorDamaged: git failed on the mirror's side (``dest`` may be left half made).
        InvalidInputError: the repository has no commit to start from (see :func:`.mirrors.start_point`).
        RepoError: this machine is out of disk.
    """
    import git

    identity = _Identity(dest.parent)  # looked up while the clone is made
    try:
        # Shared: copies run side by side, but never while a fetch or a rebuild changes the mirror's files.
        with file_lock(mirror_lock(mirror), shared=True):
            seen = dir_id(mirror)
            start_branch = start_point(mirror, start_branch)  # before copying anything
            # The clone's HEAD on the start branch (a detached HEAD is cloned detached): the agent's
            # branch starts where HEAD is, so no git process has to name the start commit.
            on_start = [f"--branch={start_branch}"] if start_branch != "HEAD" else None
            try:
                # --no-hardlinks: the agent can rewrite every file of its clone in place (it runs as the host
                # user); a hardlinked object file would carry that write into the mirror and every later
                # workspace. Copying costs about one mirror of disk per workspace (bench/mirror_isolation.py).
                repo = git.Repo.clone_from(
                    str(mirror), dest, multi_options=on_start, no_checkout=True, no_hardlinks=True, env=GIT_ENV
                )
            except git.GitCommandError as e:
                raise _clone_failure(mirror, e, seen) from e
        with repo:
            try:
                branch = f"agent/{task_slug}"
                existing = {r.remote_head for r in repo.remote("origin").refs}
                n = 2
                while branch in existing:
                    branch = f"agent/{task_slug}-{n}"
                    n += 1
                # The checkout reads the start commit's whole tree: a missing or corrupt object there fails it.
                repo.git.checkout("-b", branch, "HEAD", "--")
                # The container has no global git config: put an identity in the clone itself (the host
                # user's when they have one, so commits look like theirs; otherwise a clear agent identity).
                name, email = identity.result()
                with repo.config_writer() as cw:  # one write, no git process: `remote set-url` sets this key
                    cw.set_value('remote "origin"', "url", origin_url)
                    cw.set_value("user", "name", name)
                    cw.set_value("user", "email", email)
            except git.GitCommandError as e:
                raise _clone_failure(mirror, e, seen) from e
    finally:
        identity.close()
    return branch, start_branch


def clone_workspace(
    mirror: Path,
    dest: Path,
    origin_url: str,
    start_branch: str | None,
    task_slug: str,
) -> tuple[str, str]:
    """Clone ``mirror`` into ``dest`` (its own copy of every object file) and check out a new
    ``agent/<slug>`` branch.

    A clone or checkout that fails on the mirror's side (a corrupt or missing object) gets the
    mirror rebuilt from its remote, under the mirror's lock, and is tried once more: a damaged
    mirror would otherwise fail every later dispatch of the repository.

    Returns:
        ``(branch, base_branch)``: the agent branch and the branch it starts from.

    Raises:
        InvalidInputError: ``start_branch`` does not exist in the repository, the repository has no
            commits, or its HEAD is on a branch without commits.
        RepoError: the clone failed (also after rebuilding the mirror), or the mirror could not be
            rebuilt.
    """
    try:
        return _stage(mirror, dest, origin_url, start_branch, task_slug)
    except MirrorDamaged as e:
        damage = e
    shutil.rmtree(dest, ignore_errors=True)
    repair_mirror(mirror, damage)
    try:
        return _stage(mirror, dest, origin_url, start_branch, task_slug)
    except MirrorDamaged as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise RepoError(
            f"cannot clone the mirror {mirror}: {e.reason}, even after rebuilding it from its remote. "
            "Check that the remote repository itself is sound (git fsck there) and that this machine's "
            "disk is healthy, then dispatch again."
        ) from e


def start_from_workspace(
    clone: Path, branch: str, base_clone: Path, base_branch: str, scratch: Path, timeout: float = 900
) -> str:
    """Move ``branch`` of ``clone`` (checked out, and no agent has worked in it yet) to the tip of
    ``base_branch`` in another workspace's clone ``base_clone``, with its work tree. Returns that commit.

    ``base_clone`` is an agent's, so no git runs in it (as delivery, :mod:`.sync.git_delivery`): its
    ref is read through :mod:`.safefs`, its object folder checked, and a throw-away shim of ours under
    ``scratch`` borrows its objects, from which ``clone`` fetches them (every object checked), into
    files of its own: nothing of one workspace is shared with the other.

    Raises:
        RepoError: the branch cannot be read there, or git refused its objects (what to do is said).
        UnsafePathError: a link or a special file on the way in ``base_clone``.
    """
    check_git_ref("base_branch", base_branch)
    tip = read_ref_value(base_clone, f"refs/heads/{base_branch}")
    if tip is None or not _OBJECT_ID.match(tip):
        raise RepoError(
            f"the branch {base_branch} of {base_clone} holds no commit to start from "
            f"({'missing' if tip is None else repr(tip[:60])}); make it point at a commit, then resume this workspace."
        )
    if read_ref_value(clone, f"refs/heads/{branch}") == tip:
        return tip  # moved there already (a copy made before the run's start)
    try:
        objects = check_objects(base_clone)
    except FileNotFoundError as e:
        raise RepoError(f"{base_clone} has no objects folder: its clone is incomplete; restore it, then resume") from e
    config = (*FETCH_CONFIG, safe_directory(clone))
    scratch.mkdir(parents=True, exist_ok=True)
    remove_stale_shims(scratch)
    with shim_repository(scratch, objects, timeout) as shim:
        (shim / "refs" / "heads" / "base").write_text(f"{tip}\n", encoding="utf-8")
        args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules"]
        fetch = run_git(["-C", str(clone), *args, "--", str(shim), f"+refs/heads/base:{_BASE_REF}"], config, timeout)
    if not fetch.ok:
        raise RepoError(
            f"cannot copy {base_branch} from {base_clone}: {git_error(fetch)}. Look at that clone (git fsck)."
        )
    moved = run_git(["-C", str(clone), "reset", "--quiet", "--hard", tip, "--"], config, timeout)
    run_git(["-C", str(clone), "update-ref", "-d", _BASE_REF], config, timeout)
    if not moved.ok:
        raise RepoError(f"cannot move {branch} to {tip[:12]}: {git_error(moved)}")
    return tip


class _Identity:
    """The user's name and email as git resolves them outside any repository (the system's and the
    user's config: all a fresh clone has, but for an ``includeIf`` on the repository's path), each
    with a default; one git process for both, started at once and read by :meth:`result`."""

    def __init__(self, folder: Path) -> None:
        # The ceiling: git looks for a repository in ``folder`` (there is none) but never goes up into
        # its parent, so a repository above (a home kept in git) lends none of its config.
        env = {**os.environ, **GIT_ENV, "GIT_CEILING_DIRECTORIES": str(folder.parent)}
        argv = ["git", "config", "--null", "--get-regexp", r"^user\.(name|email)$"]
        folder.mkdir(parents=True, exist_ok=True)  # the clone's parent: made by the clone anyway
        self._proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def result(self) -> tuple[str, str]:
        """``(name, email)``; the last value of each wins, as with ``git config --get``. Neither set
        (git prints nothing and exits 1), or no answer in a minute: the defaults."""
        try:
            listed, _ = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            listed = b""
        found: dict[str, str] = {}
        for entry in listed.decode("utf-8", "replace").split("\0"):
            key, _, value = entry.partition("\n")
            found[key] = value
        name = found.get("user.name") or "agentic-dispatch agent"
        return name, found.get("user.email") or "agent@agentic-dispatch.invalid"

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def exclude_paths(repo_dir: Path, names: list[str]) -> None:
    """Keep server-managed files (BLOCKED.md, ANSWER.md, our instruction files) out of commits.

    Raises:
        UnsafePathError: the agent left a link at ``.git/info/exclude`` or a folder above it.
    """
    exclude = repo_dir / ".git" / "info" / "exclude"
    current = safefs.read_text(repo_dir, exclude, 1 << 20) or ""
    missing = [f"/{n}" for n in names if f"/{n}" not in current.splitlines()]
    if missing:
        safefs.append_text(repo_dir, exclude, "\n# managed by agentic-dispatch\n" + "\n".join(missing) + "\n")


def recent_log(repo_dir: Path, n: int = 10) -> str:
    import git

    with git.Repo(repo_dir) as repo:
        try:
            return str(host_git(repo).log(f"-n{n}", "--no-show-signature", "--format=%h %s (%an, %ar)"))
        except git.GitCommandError:
            return ""


def commits_ahead(repo_dir: Path, base: str) -> int:
    """How many commits HEAD has that ``origin/<base>`` lacks."""
    import git

    with git.Repo(repo_dir) as repo:
        try:
            return int(host_git(repo).rev_list("--count", f"refs/remotes/origin/{base}..HEAD"))
        except git.GitCommandError:
            return 0


def task_slug(task: str) -> str:
    return slugify(task)


def bounded_git(repo_dir: Path, args: list[str], limit: int, timeout: float = 60) -> tuple[str, bool]:
    """What host-side git prints in an agent's clone, at most ``limit`` bytes: ``(text, truncated)``.

    Carries the host-git overrides (the agent's config runs no program here), refuses external diff
    drivers and textconv (a ``.gitattributes`` plus ``diff.<x>.command`` would otherwise run one),
    and stops reading (and kills git) at the limit, so a huge diff costs no more than the limit.
    """
    argv = ["git"]
    for item in (*HOST_GIT_OVERRIDES, safe_directory(repo_dir), "diff.external=", "core.attributesFile=/dev/null"):
        argv += ["-c", item]
    argv += ["-C", str(repo_dir), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {
        "LC_ALL": "C",
        "GIT_NO_REPLACE_OBJECTS": "1",
    }
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as proc:
        assert proc.stdout is not None
        data = proc.stdout.read(limit + 1)
        truncated = len(data) > limit
        if truncated:
            proc.kill()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            truncated = True
    return data[:limit].decode("utf-8", errors="replace"), truncated
