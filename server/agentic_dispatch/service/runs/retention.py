"""Retention: finished workspaces whose work went home are removed, oldest first; a dispatch is
refused while the disk is nearly full.

Every workspace is a full clone, kept until it is removed here. :meth:`Retention.clean`
(``agentic-dispatch clean``; the timer too, at most once an hour, when ``[retention]`` says what to
keep) removes a finished workspace only when nothing of it is still to go home:

* never a queued, running or blocked one, not even with ``force``;
* a completed one when the ledger says its branch's tip was delivered, or its branch has no commit
  beyond the one it started from;
* a failed or cancelled one (sync never delivers its branch) unless it holds an automatic
  checkpoint that was not delivered;
* none that still has deliveries in the outbox.

``force`` lifts the last three. A removal holds the workspace's lock, appends the record to
``state/retired.jsonl`` (insights still count the run from there), moves the folder into staging
whole, deletes it there, and drops it from the index. The mirror, the events log and the ledger stay.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from pydantic import ValidationError

from ...config import Paths, RetentionSettings
from ...errors import (
    CorruptRecordError,
    DispatchError,
    InvalidInputError,
    StateError,
    UnsafePathError,
    WorkspaceNotFoundError,
)
from ...fileio import exclusive_lock
from ...models import ACTIVE_STATUSES, CleanReport, RemovedWorkspace, Status, WorkspaceRecord, parse_time, utcnow
from ...naming import generated_id
from ...store import StatusStore
from ...sync.shim import read_ref_value
from ..delivery import ResultDelivery
from .disk_cap import measure

__all__ = ["DEFAULT_OLDER_THAN_DAYS", "LOW_DISK_FRACTION", "Retention", "check_disk_floor", "disk_note", "read_retired"]

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_OLDER_THAN_DAYS = 7.0  # what `clean` removes when neither it nor [retention] says
LOW_DISK_FRACTION = 0.9  # status notes a disk fuller than this
RETENTION_INTERVAL_SECONDS = 3600.0  # the timer cleans at most this often (across processes)
MAX_RETIRED_BYTES = 64 << 20  # insights read at most this much of the newest retired records
_NO_CAP = 1 << 62
_DAY = 86_400.0


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def _disk(path: Path) -> tuple[int, float] | None:
    """Free bytes (for an unprivileged user) and the used fraction as ``df`` shows it; ``None``
    when the file system cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    used = st.f_blocks - st.f_bfree
    whole = used + st.f_bavail
    return st.f_bavail * st.f_frsize, (used / whole if whole else 0.0)


def disk_note(path: Path) -> str | None:
    """A status note when the file system under ``path`` is over 90 % full (one ``statvfs``)."""
    got = _disk(path)
    if got is None or got[1] <= LOW_DISK_FRACTION:
        return None
    return (
        f"the state root's disk is {math.floor(got[1] * 100)}% full ({_size(got[0])} free): remove finished, "
        "delivered workspaces with agentic-dispatch clean (--dry-run shows what would go)"
    )


def check_disk_floor(path: Path, min_free_gib: float) -> None:
    """Refuse new work while the file system under ``path`` has less than ``min_free_gib`` free.

    Raises:
        StateError: too little free space, saying how much there is, the floor, and what to do.
    """
    floor = int(min_free_gib * GIB)
    got = _disk(path) if floor > 0 else None
    if got is not None and got[0] < floor:
        raise StateError(
            f"only {_size(got[0])} is free on the disk of {path}, below the floor of {_size(floor)} "
            "([retention] min_free_gib); nothing was cloned. Remove finished, delivered workspaces with "
            "agentic-dispatch clean (--dry-run first shows what would go), or free space otherwise, then "
            "dispatch again."
        )


def read_retired(path: Path) -> list[WorkspaceRecord]:
    """The records of removed workspaces (the newest :data:`MAX_RETIRED_BYTES` of them); a line
    that cannot be read is skipped."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - MAX_RETIRED_BYTES))
            data = f.read(MAX_RETIRED_BYTES)
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        try:
            out.append(WorkspaceRecord.model_validate(json.loads(line)["record"]))
        except (ValueError, KeyError, TypeError, ValidationError):
            continue  # a line cut off (a crash, or the window's first line)
    return out


def _finished(rec: WorkspaceRecord) -> float:
    return parse_time(rec.finished_at) or parse_time(rec.updated_at) or 0.0


class Retention:
    """Removing finished workspaces whose work went home."""

    def __init__(self, settings: RetentionSettings, paths: Paths, store: StatusStore, delivery: ResultDelivery) -> None:
        self.settings = settings
        self.store = store
        self.delivery = delivery
        self.retired = paths.retired
        self.staging = paths.staging
        self._stamp = paths.state / "retention.stamp"  # its mtime: when the timer last cleaned

    def clean(
        self,
        older_than_days: float | None = None,
        keep: int | None = None,
        dry_run: bool = False,
        force: bool = False,
        now: float | None = None,
    ) -> CleanReport:
        """Remove, oldest first, the finished workspaces that finished more than ``older_than_days``
        ago and are not among the ``keep`` newest, whose work went home (with ``force``: also what
        did not). Neither given: ``[retention]``'s values, else 7 days.

        Raises:
            InvalidInputError: a negative age or count.
        """
        if older_than_days is not None and not older_than_days >= 0:
            raise InvalidInputError("older_than_days", "must be 0 or more.")
        if keep is not None and keep < 0:
            raise InvalidInputError("keep", "must be 0 or more.")
        if older_than_days is None and keep is None:
            older_than_days, keep = self.settings.older_than_days, self.settings.keep
            if older_than_days is None and keep is None:
                older_than_days = DEFAULT_OLDER_THAN_DAYS
        now = time.time() if now is None else now
        self.store.refresh()
        finished = [s.value for s in Status if s not in ACTIVE_STATUSES]
        records = sorted((i.record for i in self.store.query(finished) if i.record), key=_finished, reverse=True)
        newest = {r.name for r in [r for r in records if r.status != Status.BLOCKED][: keep or 0]}
        cutoff = now - older_than_days * _DAY if older_than_days is not None else math.inf
        pending = {e.workspace for e in self.delivery.outbox.entries()}
        report = CleanReport(dry_run=dry_run, message="")
        for rec in reversed(records):  # oldest first
            if _finished(rec) <= cutoff and rec.name not in newest:
                self._one(rec.name, force, dry_run, pending, report)
        verb = "would free" if dry_run else "freed"
        report.message = (
            f"{'would remove' if dry_run else 'removed'} {len(report.removed)} workspace(s), {verb} "
            f"{_size(report.bytes_freed)}; kept {len(report.kept)} that may not go"
            + ("" if force or not report.kept else " (--force removes the undelivered ones)")
        )
        return report

    def tick(self, now: float | None = None) -> CleanReport | None:
        """What the timer does: with ``[retention]`` set, a clean at most once an hour (a stamp file
        says when the last was, so also across processes and restarts); else nothing."""
        if self.settings.older_than_days is None and self.settings.keep is None:
            return None
        now = time.time() if now is None else now
        try:
            if now - self._stamp.stat().st_mtime < RETENTION_INTERVAL_SECONDS:
                return None
        except FileNotFoundError:
            pass
        self._stamp.parent.mkdir(parents=True, exist_ok=True)
        self._stamp.touch()
        os.utime(self._stamp, (now, now))
        report = self.clean(now=now)
        for r in report.removed:
            log.info("retention removed %s (%s, %d bytes)", r.workspace, r.why, r.bytes)
        return report

    def _one(self, name: str, force: bool, dry_run: bool, pending: set[str], report: CleanReport) -> None:
        """Decide on ``name`` under its lock (a resume may have queued it since) and remove it if it may go."""
        try:
            with self.store.locked(name) as ws:
                rec = self.store.read(name)
                why, may_go = self._verdict(rec, pending, force)
                if not may_go:
                    report.kept[name] = why
                    return
                size = measure(ws.dir, _NO_CAP)
                if not dry_run:
                    self._remove(rec, ws.dir, size)
        except (WorkspaceNotFoundError, CorruptRecordError):
            return  # gone meanwhile, or unreadable: status reports it, a person decides
        except (OSError, DispatchError) as e:
            log.warning("cannot remove the workspace %s: %s", name, e)
            report.kept[name] = f"cannot be removed: {e}"
            return
        if not dry_run:
            self.store.forget(name)
        report.removed.append(
            RemovedWorkspace(workspace=name, status=rec.status.value, finished_at=rec.finished_at, bytes=size, why=why)
        )
        report.bytes_freed += size

    def _verdict(self, rec: WorkspaceRecord, pending: set[str], force: bool) -> tuple[str, bool]:
        """(why, whether it may go)."""
        if rec.status in ACTIVE_STATUSES:
            return f"it is {rec.status.value}", False
        if rec.status == Status.BLOCKED:
            return "it is blocked: its agent waits for an answer (agentic-dispatch resume)", False
        why, left = self._what_is_left(rec, pending)
        if left is None:
            return why, True
        return (f"forced: {left}", True) if force else (left, False)

    def _what_is_left(self, rec: WorkspaceRecord, pending: set[str]) -> tuple[str, str | None]:
        """(why it may go, what of it is still to go home: ``None`` when nothing)."""
        if rec.name in pending:
            return "", "it has deliveries in the outbox (agentic-dispatch sync shows them)"
        repo = self.store.paths(rec.name).repo
        base_ref = f"refs/remotes/origin/{rec.base_branch}" if rec.base_branch and rec.base_branch != "HEAD" else None
        try:
            tip = read_ref_value(repo, f"refs/heads/{rec.branch}")
            base = read_ref_value(repo, base_ref) if base_ref else None
        except UnsafePathError as e:
            return "", f"its branch cannot be read ({e})"
        delivery = self.delivery.delivery_of(rec)
        sent = delivery.commit if delivery else None
        if rec.checkpoint is not None and sent not in (tip, rec.checkpoint.commit):
            return "", f"its automatic checkpoint {rec.checkpoint.commit[:12]} was not delivered"
        if sent is not None and sent == tip:
            return f"delivered ({sent[:12]})", None
        if rec.status != Status.COMPLETED:
            return f"nothing to deliver: it ended {rec.status.value}", None
        if tip is not None and tip == base:
            return f"nothing to deliver: no commit beyond {rec.base_branch}", None
        return "", f"its branch {rec.branch} was not delivered (agentic-dispatch sync delivers it)"

    def _remove(self, rec: WorkspaceRecord, folder: Path, size: int) -> None:
        """Keep the record for insights, then take the folder away whole and delete it.

        Raises:
            OSError: the record could not be kept, or the folder could not be moved or deleted.
        """
        line = json.dumps({"removed_at": utcnow(), "bytes": size, "record": rec.model_dump(mode="json")}) + "\n"
        self.retired.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.retired):  # the file is its own lock file, as the events log
            fd = os.open(self.retired, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        self.staging.mkdir(parents=True, exist_ok=True)
        trash = self.staging / f"removed-{generated_id()}"
        try:
            folder.rename(trash)  # the workspace is gone at once; what rmtree leaves, stale staging removes
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.rmtree(folder)  # workspaces on another file system than state/: delete in place
            return
        shutil.rmtree(trash, onerror=lambda _f, path, e: log.warning("cannot delete %s yet: %s", path, e[1]))
