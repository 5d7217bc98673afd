"""The status index: a SQLite table (WAL) beside the records, so counts, filters and the newest
page come from one query instead of parsing every ``status.json``.

``status.json`` stays the truth. Writers mark their row dirty before they replace the record
file and clean it after, so a crash in between leaves a row the next look re-reads.
:meth:`StatusIndex.catch_up` (every status) lists the workspace folders, names only, and reads
the new ones, the dirty ones, and drops the gone ones. :meth:`StatusIndex.refresh` (the timer,
once a minute) also stats every record file and re-reads those whose size or mtime differ from
the row's: what an editor or an older server changed behind the index. An index that cannot be
opened or read (not a database, a foreign schema, a folder or anything else that is not a regular
file at its path) is set aside and rebuilt from the records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .models import WorkspaceRecord

__all__ = ["IndexRow", "StatusIndex"]

log = logging.getLogger(__name__)

# A folder listed within this long of its mtime may have changed again in the same clock tick.
RACY_NS = 1_000_000_000

T = TypeVar("T")

SCHEMA_VERSION = 4
UNREADABLE = "unreadable"
BUSY_SECONDS = 30.0  # how long a connection waits for another's lock before it gives up
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    agent TEXT,
    finished_at TEXT,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_status ON records (status, updated_at);
CREATE INDEX IF NOT EXISTS records_updated ON records (updated_at);
CREATE INDEX IF NOT EXISTS records_finished ON records (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_key ON records (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_dirty ON records (name) WHERE dirty = 1;
CREATE TABLE IF NOT EXISTS edges (
    dependent TEXT NOT NULL,
    dependency TEXT NOT NULL,
    PRIMARY KEY (dependency, dependent)
);
CREATE INDEX IF NOT EXISTS edges_dependent ON edges (dependent);
"""


@dataclass(frozen=True)
class IndexRow:
    """What the index knows of one record file."""

    name: str
    status: str  # a Status value, or "unreadable"
    updated_at: str
    idempotency_key: str | None
    agent: str | None
    finished_at: str | None
    mtime_ns: int
    size: int
    depends_on: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, record: WorkspaceRecord | None, st: os.stat_result) -> IndexRow:
        if record is None:
            return cls(name, UNREADABLE, "", None, None, None, st.st_mtime_ns, st.st_size)
        return cls(
            name,
            record.status.value,
            record.updated_at,
            record.idempotency_key,
            record.agent,
            record.finished_at,
            st.st_mtime_ns,
            st.st_size,
            tuple(record.depends_on),
        )


def _remove(path: Path) -> None:
    """Remove whatever is at ``path`` (a folder with its contents; a link, not what it points at)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def folders(root: Path) -> Iterator[tuple[str, str]]:
    """``(org/repo/slug, folder path)`` of every workspace folder under ``root`` (names only; links
    are not followed: a workspace folder is ours, never a link)."""
    for repo_dir, _ in _repo_folders(root):
        for slug in _slugs(root, repo_dir):
            yield f"{repo_dir}/{slug}", f"{root}/{repo_dir}/{slug}"


def _repo_folders(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(org/repo, its stat)`` of every repository folder under ``root`` (links not followed)."""
    with contextlib.suppress(FileNotFoundError):
        for org in os.scandir(root):
            if not org.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for repo in os.scandir(org.path):
                    if repo.is_dir(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            yield f"{org.name}/{repo.name}", repo.stat(follow_symlinks=False)


def _slugs(root: Path, repo_dir: str) -> set[str]:
    """The workspace folders of one repository folder."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(f"{root}/{repo_dir}") as it:
        return {e.name for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")}
    return set()


def scan(root: Path, file_name: str) -> dict[str, os.stat_result]:
    """``org/repo/slug`` → the stat of its record file, for every workspace under ``root``."""
    found: dict[str, os.stat_result] = {}
    for name, folder in folders(root):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            # a str path: this runs once per workspace, no Path objects in the loop
            found[name] = os.stat(folder + "/" + file_name, follow_symlinks=False)  # noqa: PTH116
    return found


def _write_ahead_log(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (it stays so). Another connection may hold it in the rollback journal's
    write lock while it is new (another process creating it at the same moment): SQLite then answers
    "database is locked" at once, without its busy wait, so this waits here, as long as the busy timeout.

    Raises:
        sqlite3.OperationalError: still locked after :data:`BUSY_SECONDS`, or another failure.
    """
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


class StatusIndex:
    """The index database; one connection per thread, safe across processes (WAL, busy timeout)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._generation = 0  # bumped when the file is replaced, so threads reopen it
        self._guard = threading.Lock()
        # catch_up's view of the repository folders: "org/repo" -> (mtime_ns, listed at ns, slugs)
        self._listed: dict[str, tuple[int, int, set[str]]] = {}
        self._listed_generation = 0
        self._listed_once = False

    # -- the connection ----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        """A connection to the index file.

        Raises:
            sqlite3.DatabaseError: the file (or its ``-wal``/``-shm``) is not a database file: a
                folder, a link, a FIFO ... (SQLite would call a folder "unable to open", which
                reads like a passing trouble), or a database of another schema.
            sqlite3.OperationalError: it cannot be opened now (locked, no permission, disk full).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            try:
                mode = os.lstat(f"{self.path}{suffix}").st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                raise sqlite3.DatabaseError(f"{self.path}{suffix} is not a regular file")
        conn = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=True)
        _write_ahead_log(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"index schema {version}, expected {SCHEMA_VERSION}")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "generation", -1) != self._generation:
            if conn is not None:
                conn.close()
            conn = self._open()
            self._local.conn, self._local.generation = conn, self._generation
        return conn

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` on this thread's connection. An index that turns out unreadable (not a database,
        a foreign schema) is set aside and started afresh; the next :meth:`refresh` refills it."""
        try:
            return work(self._conn())
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):  # locked, busy, disk full: not the file's fault
                raise
            self._reset(str(e))
            return work(self._conn())

    def _reset(self, why: str) -> None:
        with self._guard:
            log.warning("the status index %s is unreadable (%s): rebuilding it from the records", self.path, why)
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None
            for suffix in ("", "-wal", "-shm"):
                current, aside = Path(f"{self.path}{suffix}"), Path(f"{self.path}.broken{suffix}")
                if os.path.lexists(current):
                    with contextlib.suppress(FileNotFoundError):  # another process set it aside just now
                        _remove(aside)  # an older broken copy: a rename cannot put a folder over it
                        current.replace(aside)
            self._generation += 1

    # -- changes -------------------------------------------------------------------------------
    def put(self, rows: list[IndexRow]) -> None:
        """Insert or replace ``rows`` (one transaction)."""
        if not rows:
            return
        values = [
            (r.name, r.status, r.updated_at, r.idempotency_key, r.agent, r.finished_at, r.mtime_ns, r.size)
            for r in rows
        ]

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")  # one transaction: a rebuild of 10,000 rows is one write
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO records (name, status, updated_at, idempotency_key, agent, finished_at, "
                    "mtime_ns, size, dirty) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    values,
                )
                db.executemany("DELETE FROM edges WHERE dependent = ?", [(r.name,) for r in rows])
                db.executemany(
                    "INSERT OR IGNORE INTO edges (dependent, dependency) VALUES (?, ?)",
                    [(r.name, d) for r in rows for d in r.depends_on],
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        self._run(work)

    def mark_dirty(self, name: str) -> None:
        """Say ``name``'s record file is about to change (a crash before :meth:`put` leaves the mark)."""
        self._run(
            lambda db: db.execute(
                "INSERT INTO records (name, status, mtime_ns, size, dirty) VALUES (?, 'unknown', 0, 0, 1) "
                "ON CONFLICT (name) DO UPDATE SET dirty = 1",
                (name,),
            )
        )

    def remove(self, names: list[str]) -> None:
        if not names:
            return

        def work(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM records WHERE name = ?", [(n,) for n in names])
            db.executemany("DELETE FROM edges WHERE dependent = ?", [(n,) for n in names])

        self._run(work)

    def refresh(self, root: Path, file_name: str, load: Callable[[str, os.stat_result], WorkspaceRecord | None]) -> int:
        """Bring the index in line with the record files under ``root``: rows whose file changed
        (size or mtime) or appeared are re-read with ``load``; rows whose file is gone are dropped.
        Returns how many rows changed."""
        on_disk = scan(root, file_name)
        rows = self._run(lambda db: db.execute("SELECT name, mtime_ns, size, dirty FROM records").fetchall())
        known = {n: (m, s, d) for n, m, s, d in rows}
        stale = [n for n, st in on_disk.items() if known.get(n) != (st.st_mtime_ns, st.st_size, 0)]
        return self._reload(root, file_name, stale, [n for n in known if n not in on_disk], load)

    def catch_up(
        self, root: Path, file_name: str, load: Callable[[str, os.stat_result], WorkspaceRecord | None]
    ) -> int:
        """What every status does first: read the new workspaces and the dirty ones, drop the gone
        ones. Returns how many rows changed.

        A repository's folder (``<org>/<repo>``) changes its mtime when a workspace is added to it
        or removed from it, so only the folders whose mtime moved since this process last listed
        them are listed again (with 10,000 workspaces, listing them all was most of a status). A
        listing made within :data:`RACY_NS` of the folder's mtime is not trusted (a change in the
        same clock tick keeps the mtime): such a folder is listed again next time. Dirty rows come
        from the index itself (a write cut off, by any process)."""
        with self._guard:
            if self._listed_generation != self._generation:
                self._listed.clear()
                self._listed_generation = self._generation
        changed: dict[str, set[str]] = {}  # "org/repo" -> its workspace folders now
        seen: set[str] = set()
        for repo_dir, st in _repo_folders(root):
            seen.add(repo_dir)
            cached = self._listed.get(repo_dir)
            if cached is not None and cached[0] == st.st_mtime_ns and cached[1] - st.st_mtime_ns > RACY_NS:
                continue
            listed_at = time.time_ns()
            names = _slugs(root, repo_dir)
            self._listed[repo_dir] = (st.st_mtime_ns, listed_at, names)
            changed[repo_dir] = names
        for repo_dir in [d for d in self._listed if d not in seen]:  # a whole repository folder went
            changed[repo_dir] = set()
            del self._listed[repo_dir]
        stale: set[str] = set()
        gone: list[str] = []
        for repo_dir, names in changed.items():
            known = self._names_under(repo_dir)
            stale |= {f"{repo_dir}/{n}" for n in names} - known
            gone += sorted(known - {f"{repo_dir}/{n}" for n in names})
        if not self._listed_once:  # rows of repository folders that no longer exist at all
            gone += [n for n in self._all_names() if n.rsplit("/", 1)[0] not in seen]
            self._listed_once = True
        dirty = self._run(lambda db: db.execute("SELECT name FROM records WHERE dirty = 1").fetchall())
        stale |= {str(n) for (n,) in dirty}
        return self._reload(root, file_name, sorted(stale), gone, load)

    def _names_under(self, repo_dir: str) -> set[str]:
        """The indexed workspaces of one ``org/repo`` (a range of the primary key)."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT name FROM records WHERE name > ? AND name < ?", (f"{repo_dir}/", f"{repo_dir}0")
            ).fetchall()
        )
        return {str(n) for (n,) in rows}

    def _all_names(self) -> list[str]:
        return [str(n) for (n,) in self._run(lambda db: db.execute("SELECT name FROM records").fetchall())]

    def _reload(
        self,
        root: Path,
        file_name: str,
        stale: list[str],
        gone: list[str],
        load: Callable[[str, os.stat_result], WorkspaceRecord | None],
    ) -> int:
        rows: list[IndexRow] = []
        for name in stale:
            try:
                st = os.stat(f"{root}/{name}/{file_name}", follow_symlinks=False)  # noqa: PTH116
            except (FileNotFoundError, NotADirectoryError):
                gone.append(name)  # a folder without a record (a dispatch being made, or debris)
                continue
            rows.append(IndexRow.of(name, load(name, st), st))
        self.put(rows)
        self.remove(gone)
        return len(rows) + len(gone)

    # -- queries -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        rows = self._run(lambda db: db.execute("SELECT status, count(*) FROM records GROUP BY status").fetchall())
        return {str(status): int(n) for status, n in rows}

    def names(self, statuses: list[str] | None = None, limit: int | None = None, offset: int = 0) -> list[str]:
        """Workspace names, newest first (by ``updated_at``), of ``statuses`` (all when ``None``), from the
        ``offset``-th on."""
        sql, args = "SELECT name FROM records", []
        if statuses is not None:
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args += statuses
        sql += " ORDER BY updated_at DESC, mtime_ns DESC, name"  # updated_at has whole seconds
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            args += [str(-1 if limit is None else limit), str(offset)]
        return [str(n) for (n,) in self._run(lambda db: db.execute(sql, args).fetchall())]

    def finished_since(self, since: str) -> list[str]:
        """Names of the records that finished at or after ``since`` (an ISO time, as records write it)."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT name FROM records WHERE finished_at >= ? ORDER BY finished_at", (since,)
            ).fetchall()
        )
        return [str(n) for (n,) in rows]

    def finished_at_since(self, since: str) -> list[tuple[str, str]]:
        """``(name, finished_at)`` of the records that finished at or after ``since``, oldest first."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT name, finished_at FROM records WHERE finished_at >= ? ORDER BY finished_at", (since,)
            ).fetchall()
        )
        return [(str(n), str(f)) for n, f in rows]

    def queued_with_dependencies(self) -> list[str]:
        """The queued workspaces whose record says they depend on another (oldest name first)."""
        rows = self._run(
            lambda db: db.execute(
                "SELECT DISTINCT r.name FROM records r JOIN edges e ON e.dependent = r.name "
                "WHERE r.status = 'queued' ORDER BY r.name"
            ).fetchall()
        )
        return [str(n) for (n,) in rows]

    def dependents(self, name: str) -> list[str]:
        """The workspaces whose record says they depend on ``name``."""
        rows = self._run(
            lambda db: db.execute("SELECT dependent FROM edges WHERE dependency = ? ORDER BY dependent", (name,))
        ).fetchall()
        return [str(n) for (n,) in rows]

    def with_key(self, key: str) -> list[str]:
        rows = self._run(lambda db: db.execute("SELECT name FROM records WHERE idempotency_key = ?", (key,)).fetchall())
        return [str(n) for (n,) in rows]
