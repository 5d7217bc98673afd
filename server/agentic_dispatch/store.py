"""The status store: each workspace's ``status.json``, written atomically, one writer at a time.

A write goes to a temp file in the same folder, is fsynced, then ``os.replace``d over
the old file, so a reader sees the old record or the new one and never half of one.
Writers hold the workspace lock: a thread lock inside this process and an ``flock``
on the workspace folder across processes sharing a root.
A record that cannot be parsed is reported as :class:`CorruptRecordError` and left as
it is: nothing here overwrites a file it could not read.

Each write also updates the status index (:mod:`.index`, ``state/index.sqlite``), which answers
counts, filters and the newest page; :meth:`StatusStore.refresh` checks it against the record
files, so it never says other than the records do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from . import safefs
from .config import Paths
from .errors import CorruptRecordError, InvalidInputError, UnsafePathError, WorkspaceNotFoundError
from .events import EventLog
from .fileio import folder_lock, write_atomic
from .index import IndexRow, StatusIndex
from .models import ACTIVE_STATUSES, Status, WorkspaceRecord, utcnow
from .naming import contained, split_workspace_name

__all__ = ["Listed", "StatusStore", "WorkspacePaths", "log_tail"]

STATUS_FILE = "status.json"
MAX_RECORD_BYTES = 4 << 20  # a record is a few KiB; the summary and the question are bounded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkspacePaths:
    """The layout of one workspace folder."""

    dir: Path

    @property
    def status(self) -> Path:
        return self.dir / STATUS_FILE

    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def meta(self) -> Path:
        return self.dir / ".meta"

    @property
    def logs(self) -> Path:
        """Mounted read-write into the container: the agent's output lands here as it comes."""
        return self.meta / "logs"

    @property
    def home(self) -> Path:
        """The per-workspace agent home (CLI sessions, settings), mounted as ``$HOME``."""
        return self.meta / "home"

    def log(self, agent_base: str) -> Path:
        return self.logs / f"agent-{agent_base}.log"

    def prompt(self, run: int) -> Path:
        return self.meta / f"prompt-{run}.md"


def log_tail(ws: WorkspacePaths, base: str, lines: int) -> str:
    """The last ``lines`` lines of the agent's log (the logs folder is writable by the agent)."""
    try:
        data = safefs.tail_text(ws.logs, ws.log(base), 64 * 1024) or ""
    except UnsafePathError as e:
        return f"(the log cannot be shown: {e})"
    return "\n".join(data.splitlines()[-lines:])


@dataclass(frozen=True)
class Listed:
    """One entry of :meth:`StatusStore.list`: a record, or the error reading it."""

    name: str
    record: WorkspaceRecord | None
    error: CorruptRecordError | None = None


class StatusStore:
    """Reads and writes workspace records under ``<root>/workspaces``."""

    def __init__(self, workspaces_root: Path, events_dir: Path, index_file: Path) -> None:
        self.root = workspaces_root
        self.events = EventLog(events_dir / "events.jsonl")
        self.events_file = self.events.path
        self.index = StatusIndex(index_file)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._held = threading.local()  # the workspaces this thread holds (the lock is reentrant)

    @classmethod
    def of(cls, paths: Paths) -> StatusStore:
        """The store of a root, at the places :class:`~.config.Paths` names."""
        return cls(paths.workspaces, paths.events, paths.index_file)

    # -- paths -----------------------------------------------------------------------------
    def paths(self, name: str) -> WorkspacePaths:
        """The folder of workspace ``name`` (``org/repo/slug``), checked to stay under the root.

        Raises:
            InvalidInputError: the name is malformed or escapes the root.
        """
        org, repo, slug = split_workspace_name(name)
        return WorkspacePaths(contained(self.root, org, repo, slug))

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[WorkspacePaths]:
        """Hold the workspace's lock (threads of this process and other processes); a thread that
        holds it already just goes on. The lock is an ``flock`` on the workspace folder itself, so
        taking it never creates anything: a folder deleted meanwhile stays deleted.

        Raises:
            InvalidInputError: a malformed name.
            WorkspaceNotFoundError: there is no such workspace folder.
        """
        paths = self.paths(name)
        held: set[str] = self._held.__dict__.setdefault("names", set())
        if name in held:
            yield paths
            return
        with self._locks_guard:
            tlock = self._locks.setdefault(name, threading.Lock())
        with tlock, contextlib.ExitStack() as stack:
            try:
                stack.enter_context(folder_lock(paths.dir))
            except (FileNotFoundError, NotADirectoryError) as e:
                raise WorkspaceNotFoundError(name) from e
            held.add(name)
            try:
                yield paths
            finally:
                held.discard(name)

    # -- records ---------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.paths(name).status.exists()

    def read(self, name: str) -> WorkspaceRecord:
        """Read one record.

        Raises:
            WorkspaceNotFoundError: there is no such workspace.
            CorruptRecordError: the file exists but is not a valid record.
        """
        path = self.paths(name).status
        data = self._read_file(path)
        if data is None:
            raise WorkspaceNotFoundError(name)
        return self._parse(path, data)

    @staticmethod
    def _read_file(path: Path) -> bytes | None:
        """The bytes of a record file (``None``: there is none). Only a regular file of at most
        :data:`MAX_RECORD_BYTES` is read, without following a link and without waiting on a FIFO:
        a record replaced by a folder, a link or a pipe is reported, never a hang or a traceback.

        Raises:
            CorruptRecordError: something other than such a file is there, or it cannot be read.
        """
        try:
            got = safefs.read_range(path.parent, path, 0, MAX_RECORD_BYTES + 1)
        except UnsafePathError as e:
            raise CorruptRecordError(path, e.problem) from e
        except OSError as e:
            raise CorruptRecordError(path, f"cannot be read: {e.strerror or e}") from e
        if got is None:
            return None
        data, _, size = got
        if size > MAX_RECORD_BYTES:
            raise CorruptRecordError(path, f"is {size} bytes; a record is at most {MAX_RECORD_BYTES}")
        return data

    @staticmethod
    def _parse(path: Path, data: bytes) -> WorkspaceRecord:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptRecordError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
        try:
            return WorkspaceRecord.model_validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            raise CorruptRecordError(path, f"{where}: {first['msg']}") from e

    def write(self, record: WorkspaceRecord) -> None:
        """Write ``record`` atomically. Callers hold :meth:`locked` for the workspace."""
        record.updated_at = utcnow()
        path = self.paths(record.name).status
        path.parent.mkdir(parents=True, exist_ok=True)
        data = record.model_dump_json(indent=2, exclude_none=False) + "\n"
        try:  # before the file changes: a crash from here to the index update leaves this mark
            self.index.mark_dirty(record.name)
        except sqlite3.Error as e:
            log.warning("the status index cannot mark %s (%s); the next refresh catches up", record.name, e)
        write_atomic(path, data)
        try:  # the same step; a crash before this line leaves the dirty mark, re-read on the next look
            self.index.put([IndexRow.of(record.name, record, path.stat())])
        except (sqlite3.Error, OSError) as e:
            log.warning("the status index missed %s (%s); the next refresh catches up", record.name, e)

    def create(self, record: WorkspaceRecord) -> None:
        """Write the record of a workspace whose folder may not exist yet (tests, imports; a dispatch
        moves a staged folder into place and writes its record under :meth:`locked`)."""
        self.paths(record.name).dir.mkdir(parents=True, exist_ok=True)
        with self.locked(record.name):
            self.write(record)

    def forget(self, name: str) -> None:
        """Drop ``name`` from the index (its folder was removed)."""
        self.index.remove([name])

    def update(self, name: str, change: Callable[[WorkspaceRecord], bool | None]) -> WorkspaceRecord:
        """Read, change and write a record under its lock (never its status: that is the run
        lifecycle's, ``service/lifecycle.py``).

        ``change`` mutates the record in place; returning ``False`` skips the write.

        Raises:
            WorkspaceNotFoundError, CorruptRecordError: as :meth:`read`.
        """
        with self.locked(name):
            record = self.read(name)
            before = record.status
            if change(record) is False:
                return record
            if record.status != before:
                raise AssertionError("a run's status changes only through the run lifecycle")
            self.write(record)
        return record

    # -- the index ---------------------------------------------------------------------------
    def _load(self, name: str, _: os.stat_result) -> WorkspaceRecord | None:
        try:
            return self.read(name)
        except (CorruptRecordError, WorkspaceNotFoundError, OSError):
            return None

    def refresh(self) -> int:
        """Bring the index in line with the record files: stats them all and re-reads what changed
        (also behind the store's back). Returns how many index rows changed."""
        return self.index.refresh(self.root, STATUS_FILE, self._load)

    def catch_up(self) -> int:
        """Bring the index in line with what the store and its writers did: new, dirty (a write cut
        off) and deleted workspaces. Lists folders only: cheap enough for every status."""
        return self.index.catch_up(self.root, STATUS_FILE, self._load)

    def counts(self) -> dict[str, int]:
        """Workspaces per status (``unreadable`` for records that cannot be read), from the index."""
        return self.index.counts()

    def query(self, statuses: list[str] | None = None, limit: int | None = None, offset: int = 0) -> list[Listed]:
        """The records of ``statuses`` (all when ``None``; ``"unreadable"`` names the broken ones),
        newest first, from the ``offset``-th on, read in full. A workspace gone since the index saw it
        is dropped from both."""
        out: list[Listed] = []
        gone: list[str] = []
        for name in self.index.names(statuses, limit, offset):
            try:
                out.append(Listed(name, self.read(name)))
            except WorkspaceNotFoundError:
                gone.append(name)
            except CorruptRecordError as e:
                out.append(Listed(name, None, e))
            except OSError as e:
                out.append(Listed(name, None, CorruptRecordError(self.paths(name).status, e.strerror or str(e))))
        self.index.remove(gone)
        return out

    def active(self) -> list[Listed]:
        """The queued and running records: what the timer, the drain and recovery work on."""
        return [i for i in self.query([s.value for s in ACTIVE_STATUSES]) if i.record is not None]

    def unreadable(self) -> list[str]:
        """The names of workspaces whose record cannot be read."""
        return self.index.names(["unreadable"])

    def find(self, name: str) -> WorkspaceRecord | None:
        """The record of ``name``, or ``None`` when there is none or it cannot be read."""
        try:
            return self.read(name)
        except (WorkspaceNotFoundError, CorruptRecordError, InvalidInputError):
            return None

    def dependents(self, name: str) -> list[str]:
        """The workspaces whose ``depends_on`` names ``name``, from the index (oldest name first)."""
        return self.index.dependents(name)

    def queued_with_dependencies(self) -> list[WorkspaceRecord]:
        """The queued records that depend on another workspace (found in the index, then read)."""
        found = (self.find(name) for name in self.index.queued_with_dependencies())
        return [r for r in found if r is not None and r.status == Status.QUEUED]

    def with_key(self, key: str) -> WorkspaceRecord | None:
        """The record dispatched with idempotency key ``key``, if any."""
        for name in self.index.with_key(key):
            with contextlib.suppress(WorkspaceNotFoundError, CorruptRecordError):
                record = self.read(name)
                if record.idempotency_key == key:
                    return record
        return None

    def list(self) -> list[Listed]:
        """Every workspace under the root, readable or not (parses every record: for the index, use
        :meth:`query`)."""
        out: list[Listed] = []
        if not self.root.exists():
            return out
        for status_file in sorted(self.root.glob(f"*/*/*/{STATUS_FILE}")):
            rel = status_file.parent.relative_to(self.root)
            name = "/".join(rel.parts)
            try:
                data = self._read_file(status_file)
                if data is not None:
                    out.append(Listed(name, self._parse(status_file, data)))
            except CorruptRecordError as e:
                out.append(Listed(name, None, e))
        return out
