"""Stalled agents: a running agent whose log and work tree have not changed for
``limits.stall_seconds`` is reported (:class:`.lifecycle.Stalled`), and with
``limits.stall_action = "stop"`` stopped.

What counts as activity (a change of any of these since the last look):

* the agent's log: its size and mtime (the CLIs write their JSON events there as they work, so
  an agent that thinks, calls a tool or gets an answer shows up here first);
* the mtime of the clone's top folder and of its first :data:`MAX_TOP_FOLDERS` folders (a file
  made, removed or renamed there, as editors and git do when they write a file whole); the
  folders are listed again only when the top folder's mtime moved (:class:`TopListing`);
* git's own files in the clone: ``index``, ``HEAD``, ``logs/HEAD``, ``packed-refs`` and the
  ``refs/heads`` folder (an add, a commit, a checkout, a new branch).

Not counted: a file rewritten in place, or anything deeper in the tree, with nothing else
changing (the CLIs log every tool call, so work shows in the log anyway). That is the price of a
bounded look: no walk of the tree, no ``stat`` per file, a dozen or two calls per workspace (a
``stat`` of each of a 200-file top folder's files cost 4 ms per workspace, 200 ms a tick at 50). Nothing
is read, and no link is followed (every folder is opened with ``O_NOFOLLOW`` from one the server
trusts, every entry is ``lstat``-ed).

When activity was last seen is kept in memory, keyed by the container's id, not in the record:
at 50 running agents a record write per changed workspace per tick would be 50 atomic writes
(and index updates) every tick, and a restarted server then starts every run's clock afresh
(its first look is the baseline), so a restart never marks every run stalled at once. Only the
verdict, ``stalled_since``, is in the record, written through the lifecycle once per stall.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...agents import agent_base
from ...config import Settings
from ...models import Status, WorkspaceRecord
from ...store import StatusStore, WorkspacePaths
from .lifecycle import Stalled, StallEnded

__all__ = ["MAX_TOP_FOLDERS", "StallWatch", "TopListing", "activity_signature"]

MAX_TOP_FOLDERS = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Git's files whose change means the agent used git; (folders on the way, the entry).
_GIT_FILES: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "index"),
    ((), "HEAD"),
    ((), "packed-refs"),
    (("logs",), "HEAD"),
    (("refs",), "heads"),
)


@contextlib.contextmanager
def _folder(path: str, dir_fd: int | None = None) -> Iterator[int | None]:
    """An fd of the folder ``path`` (relative to ``dir_fd``), reached without following a link;
    ``None`` when it is missing, a link or not a folder."""
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _stamp(name: str, dir_fd: int) -> tuple[int, int]:
    """(mtime in ns, size) of the entry ``name`` in ``dir_fd``, not following a link; (0, 0) when gone."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0, 0
    return st.st_mtime_ns, st.st_size


def _git_stamps(git_fd: int, folders: Sequence[str], name: str) -> tuple[int, int]:
    if not folders:
        return _stamp(name, git_fd)
    with _folder(folders[0], git_fd) as fd:
        return (0, 0) if fd is None else _git_stamps(fd, folders[1:], name)


@dataclass
class TopListing:
    """The folders at the top of a clone as last listed, and the top folder's mtime then: listed again
    only once that mtime moves (a folder made, removed or renamed there moves it). Listing a
    200-entry top folder was most of a look. A listing made within a second of that mtime is not
    kept: a change in the same clock tick would leave the mtime as it is."""

    mtime_ns: int = -1
    folders: tuple[str, ...] = ()

    def of(self, repo: int, mtime_ns: int) -> tuple[str, ...]:
        if mtime_ns != self.mtime_ns:
            with os.scandir(repo) as entries:  # the entry's type comes with the listing: no call
                names = [e.name for e in entries if e.is_dir(follow_symlinks=False) and e.name != ".git"]
            self.folders = tuple(sorted(names)[:MAX_TOP_FOLDERS])
            self.mtime_ns = mtime_ns if time.time_ns() - mtime_ns > 1_000_000_000 else -1
        return self.folders


def activity_signature(ws: WorkspacePaths, base: str, listing: TopListing | None = None) -> int:
    """A number that changes whenever the agent of ``ws`` shows activity (the module's docstring
    says what counts); bounded work, no file read. ``listing`` keeps the clone's top folders from
    one look to the next."""
    stamps: list[tuple[int, int]] = []
    with _folder(str(ws.logs)) as logs:
        stamps.append((0, 0) if logs is None else _stamp(ws.log(base).name, logs))
    with _folder(str(ws.repo)) as repo:
        if repo is not None:
            mtime_ns = os.fstat(repo).st_mtime_ns
            stamps.append((mtime_ns, 0))
            stamps += [_stamp(name, repo) for name in (listing or TopListing()).of(repo, mtime_ns)]
            with _folder(".git", repo) as git:
                if git is not None:
                    stamps += [_git_stamps(git, folders, name) for folders, name in _GIT_FILES]
    return hash(tuple(stamps))


@dataclass
class _Seen:
    signature: int
    changed: float  # time.monotonic() when the signature last changed (or was first seen)
    changed_wall: float  # the same moment, time.time()
    looked: float  # time.monotonic() of the last look
    reported: bool = False  # a stall was reported since the last change


class StallWatch:
    """The timer's stall check: one look per running agent, at most once per ``stall_seconds / 10``."""

    def __init__(self, settings: Settings, store: StatusStore) -> None:
        self.seconds = settings.limits.stall_seconds
        self.stop = settings.limits.stall_action == "stop"
        self.store = store
        self._seen: dict[str, _Seen] = {}  # container id -> what its workspace looked like
        # container id -> its workspace's folders (resolving them was half of a look) and top listing
        self._where: dict[str, tuple[WorkspacePaths, TopListing]] = {}
        self._lock = threading.Lock()  # the timer and a CLI `wait` may reconcile at once

    def observe(self, rec: WorkspaceRecord, force: bool = False) -> Stalled | StallEnded | None:
        """Look at the running agent of ``rec`` (unless looked at within ``stall_seconds / 10``,
        or ``force``): what changed about its stall, or ``None``."""
        cid = rec.container_id
        if not self.seconds or rec.status != Status.RUNNING or rec.phase != "agent" or cid is None:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(cid)
            if seen is not None and not force and now - seen.looked < self.seconds / 10:
                return None
            where = self._where.get(cid)
        if where is None:
            where = (self.store.paths(rec.name), TopListing())
            with self._lock:
                self._where[cid] = where
        signature = activity_signature(where[0], agent_base(rec.agent), where[1])
        with self._lock:
            seen = self._seen.get(cid)
            if seen is None or seen.signature != signature:
                self._seen[cid] = _Seen(signature, now, time.time(), now)
                return StallEnded(cid) if seen is not None and rec.stalled_since is not None else None
            seen.looked = now
            quiet = now - seen.changed
            if quiet < self.seconds or (rec.stalled_since is not None and (not self.stop or rec.stop_status)):
                return None
            seen.reported = True
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen.changed_wall))
        return Stalled(cid, since, math.floor(quiet), stop=self.stop)

    def next_due(self) -> float | None:
        """Seconds until the next look that could find a stall (the timer wakes for it), or ``None``."""
        now = time.monotonic()
        with self._lock:
            due = [
                max(s.changed + self.seconds, s.looked + self.seconds / 10) - now
                for s in self._seen.values()
                if not s.reported
            ]
        return min(due, default=None)

    def retain(self, container_ids: set[str]) -> None:
        """Forget the containers no running record names any more."""
        with self._lock:
            for cid in [c for c in self._seen if c not in container_ids]:
                del self._seen[cid]
            for cid in [c for c in self._where if c not in container_ids]:
                del self._where[cid]
