"""Delivering a finished workspace's branch ``agent/<slug>`` to where the dispatch came from.

The agent's clone is hostile: it wrote ``.git/config`` (remote URLs, ``insteadOf`` rewrites,
hooks, fsmonitor, promisor remotes), and may have crafted refs, objects or pointers out of its
folder (``.git`` as a link or gitfile, ``objects/info/alternates``). So no git command ever runs
with the clone as its repository, and nothing in it is read as configuration:

1. the branch's commit is read from the clone's ref files with :mod:`safefs` (no link followed);
   its object folder is checked to hold no link and no alternates;
2. a throw-away *shim* repository the server makes (its own config, one ref) borrows the clone's
   objects through ``objects/info/alternates``;
3. the server's bare *outgoing* repository for that origin (``<state>/outgoing/<hash>.git``) fetches
   that one ref from the shim with every object fsck-checked;
4. it pushes ``<commit>:refs/heads/<branch>`` (never forced unless asked) to the URL recorded at
   dispatch, or for a local repository to its path with a receive-pack of our own making (hooks
   off, objects checked, the checked-out branch refused), so only that ref changes there.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from ..errors import InvalidInputError, UnsafePathError
from ..gitops import file_lock
from ..models import ACTIVE_STATUSES, Delivery, WorkspaceRecord
from ..naming import check_git_ref
from .gitrun import FETCH_CONFIG, PUSH_CONFIG, GitResult, classify_push, git_error, run_git
from .outcome import Outcome, redact_url
from .shim import NOT_A_FOLDER, check_objects, read_ref_value, remove_stale_shims, shim_repository

__all__ = ["GitDeliverer", "delivery_target"]

_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_URL = re.compile(r"^(?:(?:https?|ssh|git|file)://\S+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^:\s]\S*)$")
# The receive-pack a local repository gets: its hooks stay off, objects are checked, the branch
# checked out there (in any worktree) is never updated, and nothing else runs afterwards.
_LOCAL_RECEIVE_PACK = (
    "git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c receive.fsckObjects=true"
    " -c receive.denyCurrentBranch=refuse -c receive.denyDeleteCurrent=refuse -c receive.autogc=false"
    " -c receive.updateServerInfo=false -c gc.auto=0 -c maintenance.auto=false receive-pack"
)


class _Refused(Exception):
    """The workspace's branch cannot be delivered as it is; a person must look."""

    def __init__(self, reason: str, what_to_do: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.what_to_do = what_to_do


def delivery_target(record: WorkspaceRecord) -> tuple[str, bool]:
    """Where ``record``'s branch goes: ``(path or URL, is_local)``. A dispatch that named a local
    path delivers into that repository; anything else is pushed to the URL recorded at dispatch.

    Raises:
        InvalidInputError: the recorded origin is neither an absolute path nor a URL git may push to.
    """
    origin = record.origin_url.strip()
    if record.repo.strip().startswith(("/", "~")):
        if not origin.startswith("/"):
            raise InvalidInputError("origin_url", f"{origin!r} is not an absolute path")
        return origin, True
    if not _URL.match(origin) or origin.startswith("-"):
        raise InvalidInputError("origin_url", f"{redact_url(origin)!r} is not a URL agentic-dispatch pushes to")
    return origin, False


def _read_ref(clone: Path, ref: str) -> str | None:
    """The commit ``ref`` names in the clone (loose ref, else ``packed-refs``), without following links.

    Raises:
        UnsafePathError: a link or a non-file on the way.
        _Refused: the ref is symbolic or does not hold an object id.
    """
    value = read_ref_value(clone, ref)
    if value is None:
        return None
    if not _SHA.match(value):
        raise _Refused(
            f"{ref} in the workspace's clone is not a plain branch (it holds {value[:60]!r})",
            f"make {ref} point at the commit to deliver (git branch -f), then retry",
        )
    return value


def _base_commit(clone: Path, base_branch: str | None) -> str | None:
    """The commit the run started from as the clone knows it (``origin/<base>``); ``None`` when
    unknown. The agent could change it, which only decides whether there is anything to deliver."""
    if not base_branch or base_branch == "HEAD":
        return None
    try:
        return _read_ref(clone, f"refs/remotes/origin/{check_git_ref('base_branch', base_branch)}")
    except (_Refused, UnsafePathError, InvalidInputError):
        return None


def _check_objects(clone: Path) -> Path:
    """The clone's object folder, checked to hold only real folders and files and no alternates.

    Raises:
        _Refused: a link, a special file, or ``objects/info/alternates`` (pointers out of the clone).
    """
    try:
        return check_objects(clone)
    except UnsafePathError as e:
        if e.problem == NOT_A_FOLDER:
            raise _Refused(f"{e.path} {e.problem}", "restore the clone's .git folder, then retry") from e
        fix = "remove it (agentic-dispatch never follows pointers an agent made out of its workspace), then retry"
        raise _Refused(f"{e.path} {e.problem}", fix) from e


class GitDeliverer:
    """Delivers branches through one outgoing bare repository per origin under ``<state>/outgoing``."""

    def __init__(self, state_dir: Path, timeout_seconds: float = 900.0) -> None:
        self.root = state_dir / "outgoing"
        self.timeout = timeout_seconds

    def deliver(self, record: WorkspaceRecord, clone: Path, *, force: bool = False, run: int | None = None) -> Outcome:
        """Deliver ``record.branch`` from the workspace clone ``clone`` (the ``repo/`` folder) for
        run ``run`` (default: the record's last run).

        Delivered when the branch is there now, has no commits beyond its base (nothing to do), or
        a later run of the workspace exists (that run's entry delivers the branch); transient while
        the workspace runs again (the agent is at work in the clone) or when the origin cannot be
        reached; permanent when the clone is unsafe, the commit or its objects are refused, or the
        push is rejected.

        Raises:
            OSError: the state folder cannot be written.
        """
        if run is not None and record.runs > run:
            return Outcome.delivered(f"superseded: run {record.runs} delivers {record.branch}")
        if record.status in ACTIVE_STATUSES:
            return Outcome.transient(f"the workspace is {record.status} again; its branch goes when that run ends")
        try:
            target, local = delivery_target(record)
            branch = check_git_ref("branch", record.branch)
            tip = _read_ref(clone, f"refs/heads/{branch}")
            if tip is None:
                raise _Refused(f"{branch} does not exist in {clone}", f"recreate {branch} there, then retry")
            base = _base_commit(clone, record.base_branch)
            objects = _check_objects(clone)
        except (InvalidInputError, UnsafePathError) as e:
            return Outcome.permanent(str(e), "fix the workspace (or its record), then retry")
        except _Refused as e:
            return Outcome.permanent(e.reason, e.what_to_do)
        except FileNotFoundError as e:
            return Outcome.permanent(f"{e.filename} is missing", "the workspace's clone is incomplete; restore it")
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_shims(self.root)
        key = hashlib.sha256(target.encode()).hexdigest()[:16]
        with file_lock(self.root / f"{key}.lock"):
            return self._deliver_locked(record, self._outgoing(key), objects, tip, base, target, local, force)

    def _deliver_locked(
        self,
        record: WorkspaceRecord,
        outgoing: Path,
        objects: Path,
        tip: str,
        base: str | None,
        target: str,
        local: bool,
        force: bool,
    ) -> Outcome:
        remote = redact_url(target)
        stash = f"refs/deliver/{hashlib.sha256(record.name.encode()).hexdigest()[:16]}/{record.runs}"
        refused = self._fetch(outgoing, objects, tip, stash)
        if refused is not None:
            return refused
        if base is not None and not self._has_new_commits(outgoing, tip, base):
            self._git(outgoing, ["update-ref", "-d", stash], FETCH_CONFIG)
            return Outcome.delivered(f"nothing to deliver: {record.branch} has no commits beyond {record.base_branch}")
        ref = f"refs/heads/{record.branch}"
        args = ["push", "--porcelain", "--no-verify"]
        if local:
            args.append(f"--receive-pack={_LOCAL_RECEIVE_PACK}")
        result = self._git(outgoing, [*args, "--", target, f"{'+' if force else ''}{tip}:{ref}"], PUSH_CONFIG)
        summary, failed = classify_push(result, ref, record.branch, remote)
        if failed is not None:
            return failed
        self._git(outgoing, ["update-ref", "-d", stash], FETCH_CONFIG)
        self._git(outgoing, ["gc", "--auto", "--quiet"], (*FETCH_CONFIG, "gc.auto=6700", "gc.autoDetach=false"))
        delivery = Delivery(remote=remote, branch=record.branch, commit=tip)
        return Outcome.delivered(f"{record.branch} at {tip[:12]} in {remote} ({summary.strip('[]')})", delivery)

    def _git(self, repo: Path, args: list[str], config: tuple[str, ...]) -> GitResult:
        return run_git(["--git-dir", str(repo), *args], config, self.timeout)

    def _outgoing(self, key: str) -> Path:
        """The outgoing bare repository ``key`` (made on first use). Callers hold its lock.

        Raises:
            OSError: it cannot be made.
        """
        path = self.root / f"{key}.git"
        if not (path / "HEAD").exists():
            shutil.rmtree(path, ignore_errors=True)
            result = run_git(["init", "--quiet", "--bare", "--template=", str(path)], FETCH_CONFIG, self.timeout)
            if not result.ok:
                raise OSError(f"cannot create {path}: {git_error(result)}")
        return path

    def _fetch(self, outgoing: Path, objects: Path, tip: str, stash: str) -> Outcome | None:
        """Copy ``tip`` and its history from the clone's objects into ``outgoing`` (under ``stash``),
        every object checked; ``None`` on success, else why it was refused (permanent)."""
        with shim_repository(self.root, objects, self.timeout) as shim:
            (shim / "refs" / "heads" / "deliver").write_text(f"{tip}\n", encoding="utf-8")
            check = self._git(shim, ["cat-file", "-e", f"{tip}^{{commit}}"], FETCH_CONFIG)
            if not check.ok:
                return Outcome.permanent(
                    f"the branch points at {tip[:12]}, which is not a commit the workspace's clone holds "
                    f"({git_error(check)})",
                    "make the branch point at an existing commit (git branch -f), then retry",
                )
            args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules"]
            fetch = self._git(outgoing, [*args, "--", str(shim), f"+refs/heads/deliver:{stash}"], FETCH_CONFIG)
            if fetch.returncode is None:
                return Outcome.transient(f"copying the branch's objects timed out after {self.timeout:.0f} s")
            if not fetch.ok:
                return Outcome.permanent(
                    f"git refused the branch's objects: {git_error(fetch)}",
                    "inspect the workspace's clone (git fsck), repair or recreate the branch from sound commits, "
                    "then retry",
                )
            return None

    def _has_new_commits(self, outgoing: Path, tip: str, base: str) -> bool:
        """Whether ``tip`` has commits ``base`` lacks (``True`` when that cannot be told)."""
        count = self._git(outgoing, ["rev-list", "--count", tip, "--not", base, "--"], FETCH_CONFIG)
        return not count.ok or count.stdout.strip() != "0"
