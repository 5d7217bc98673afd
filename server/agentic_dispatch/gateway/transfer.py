"""What a network-transfer run takes from its workspace and what it brings back, on the server's
side (the container's side is ``images/agent/agentic-run``).

Going out (:func:`pack_inputs`): the agent home, the run's prompt and task script, and the work
tree's files beyond the branch (the instruction files, ``ANSWER.md``, what an earlier run left
uncommitted), with ``.git/info/exclude`` and the clone's identity; the branch itself goes by git
over the gateway. Coming back: the log as it is written (:func:`append_log`), the branch by a
push, and at the end one archive (:func:`apply_results`) with the agent home, the server-managed
files (``BLOCKED.md``) and the work tree's uncommitted changes. Afterwards the workspace holds
what a mounted run leaves there, so everything that reads it works unchanged.

An uploaded archive is the agent's: it is size-capped, unpacked into a fresh staging folder by
the standard library's ``data`` extraction filter (no absolute paths, no ``..``, no links out of
their own part of the archive, no devices or FIFOs), and placed through :mod:`..safefs`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .. import safefs
from ..errors import DispatchError, UnsafePathError
from ..fileio import write_atomic
from ..gitops import host_git
from ..prompts import MANAGED_FILES
from ..store import WorkspacePaths

__all__ = [
    "PHASES",
    "Received",
    "TransferError",
    "UploadRefused",
    "append_log",
    "apply_results",
    "begin_job",
    "job_log",
    "pack_inputs",
    "received",
    "refuse_results",
]

PHASES = ("agent", "qa")
_SECTIONS = ("home", "managed", "tree")


class TransferError(DispatchError):
    """A request of a run's container that cannot be served as asked."""


class UploadRefused(TransferError):
    """An upload broke a rule (too big, a path out of its place, a device): nothing was applied."""


@dataclass(frozen=True)
class Received:
    """What a job said of itself when it sent its results."""

    exit_code: int | None
    push_error: str | None
    refused: str | None = None  # why the upload was not applied
    oom_killed: bool = False  # the kernel killed a process of the job for want of memory (its cgroup says)


def _folder(ws: WorkspacePaths) -> Path:
    return ws.meta / "transfer"


def _state(ws: WorkspacePaths, run: int, phase: str) -> Path:
    return _folder(ws) / f"run{run}-{phase}.json"


def _marker(ws: WorkspacePaths, run: int, phase: str) -> Path:
    return _folder(ws) / f"run{run}-{phase}.results.json"


def begin_job(ws: WorkspacePaths, run: int, phase: str, log: Path) -> None:
    """Note where job ``phase`` of run ``run`` streams its log, and from which byte (call after the
    server wrote the run's header line, before the container starts).

    Raises:
        OSError: it cannot be written (then the container must not start).
    """
    _folder(ws).mkdir(parents=True, exist_ok=True)
    size = log.stat().st_size if log.is_file() else 0
    write_atomic(_state(ws, run, phase), json.dumps({"log": log.name, "log_base": size}), mode=0o600)


def job_log(ws: WorkspacePaths, run: int, phase: str) -> tuple[Path, int]:
    """The log file job ``phase`` of run ``run`` streams into, and the size it had at the start.

    Raises:
        TransferError: the job was never started with network transfer.
    """
    try:
        data = json.loads(_state(ws, run, phase).read_text(encoding="utf-8"))
        return ws.logs / Path(str(data["log"])).name, int(data["log_base"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferError(f"run {run} ({phase}) was not started with network transfer") from e


def append_log(ws: WorkspacePaths, run: int, phase: str, offset: int, data: bytes) -> int:
    """Append what the job sent from byte ``offset`` of its log; return how many bytes the server
    has now, which is where the job sends from next. A chunk sent again (a retry after a lost
    answer) is not written twice; one that starts past what arrived is not written at all.

    Raises:
        TransferError: the job is not known.
        UnsafePathError: the log file is not a regular file.
    """
    log, base = job_log(ws, run, phase)
    have = max(0, (log.stat().st_size if log.is_file() else 0) - base)
    if offset > have:
        return have
    fresh = data[have - offset :]
    if fresh:
        safefs.append_text(ws.logs, log, fresh)
    return have + len(fresh)


def received(ws: WorkspacePaths, run: int, phase: str) -> Received | None:
    """The results job ``phase`` of run ``run`` sent, or ``None`` when none arrived."""
    try:
        data = json.loads(_marker(ws, run, phase).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    code, error, refused = data.get("exit_code"), data.get("push_error"), data.get("refused")
    return Received(
        code if isinstance(code, int) else None,
        str(error)[:500] if error else None,
        str(refused)[:500] if refused else None,
        oom_killed=data.get("oom_killed") is True,
    )


def refuse_results(ws: WorkspacePaths, run: int, phase: str, why: str) -> None:
    """Record that job ``phase``'s upload broke a rule (nothing of it was applied); a retry of it is
    answered as applied once, not tried again."""
    _folder(ws).mkdir(parents=True, exist_ok=True)
    write_atomic(_marker(ws, run, phase), json.dumps({"exit_code": None, "refused": why}), mode=0o600)


# -- going out ---------------------------------------------------------------------------------
def _repo_git(ws: WorkspacePaths, command: str, *args: str) -> str:
    """Host-side git in the workspace's clone (with the overrides that keep its config inert)."""
    import git

    with git.Repo(ws.repo) as repo:
        return str(getattr(host_git(repo), command)(*args, strip_newline_in_stdout=False))


def _tree_changes(ws: WorkspacePaths) -> tuple[list[str], list[str]]:
    """The work tree's files beyond the branch's last commit: (present, deleted)."""
    out = _repo_git(ws, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames")
    present, deleted = list[str](), list[str]()
    for entry in out.split("\0"):
        if len(entry) < 4:
            continue
        path = entry[3:]
        (present if os.path.lexists(ws.repo / path) else deleted).append(path)
    return present, deleted


def _identity(ws: WorkspacePaths) -> dict[str, str]:
    import git

    found = {}
    for key in ("user.name", "user.email"):
        with contextlib.suppress(git.GitCommandError):
            found[key] = _repo_git(ws, "config", "--get", key).strip()
    return found


class _Budget:
    """Counts the bytes of an archive being made or read against ``limit``."""

    def __init__(self, limit: int | None, what: str) -> None:
        self.limit, self.used, self.what = limit, 0, what

    def take(self, size: int) -> None:
        self.used += size
        if self.limit and self.used > self.limit:
            raise UploadRefused(f"{self.what} is larger than resources.workspace_max_bytes ({self.limit} bytes)")


def _add_tree(tar: tarfile.TarFile, source: Path, arcname: str, budget: _Budget) -> None:
    """Add ``source`` (a folder the agent writes) without following a link, and only regular
    files, folders and links: a FIFO or a device the agent left is not carried."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isreg() or info.isdir() or info.issym()):
            return None
        budget.take(info.size)
        return info

    if source.is_dir() and not source.is_symlink():
        tar.add(str(source), arcname, filter=keep)


def pack_inputs(ws: WorkspacePaths, branch: str, phase: str, limit: int | None) -> bytes:
    """The archive job ``phase`` starts from (see the module's docstring).

    Raises:
        UploadRefused: the inputs are larger than ``limit``.
        git.GitCommandError: the clone cannot be read.
    """
    present, deleted = _tree_changes(ws)
    managed_files = [
        ln.strip()
        for ln in (safefs.read_text(ws.meta, ws.meta / "instruction-files", 1 << 16) or "").splitlines()
        if ln.strip()
    ]
    extra = [n for n in (*MANAGED_FILES, *managed_files) if n not in present]
    exclude = safefs.read_text(ws.repo, ws.repo / ".git" / "info" / "exclude", 1 << 20) or ""
    meta = {
        "branch": branch,
        "origin_url": _repo_git(ws, "config", "--get", "remote.origin.url").strip(),
        "deleted": deleted,
        "managed": list(MANAGED_FILES),
        "exclude_file": exclude,
        **_identity(ws),
    }
    budget = _Budget(limit, "the run's inputs")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        raw = json.dumps(meta).encode("utf-8")
        info = tarfile.TarInfo("meta.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        if phase == "agent":
            _add_tree(tar, ws.home, "home", budget)
            _add_tree(tar, ws.meta / "run", "run", budget)
        for rel in [*present, *extra]:
            path = ws.repo / rel
            try:
                safefs.check_file(ws.repo, path)  # no link on the way there
            except UnsafePathError:
                if not path.is_symlink():
                    continue
            if os.path.lexists(path):
                info = tar.gettarinfo(str(path), f"tree/{rel}")
                if info.isreg():
                    budget.take(info.size)
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                elif info.issym():
                    tar.addfile(info)
    return buf.getvalue()


# -- coming back -------------------------------------------------------------------------------
def _contained(staging: Path) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """The ``data`` filter, applied to each part of the archive as its own root, so a link in the
    agent home cannot point into the work tree's part (or anywhere else)."""

    def check(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo | None:
        section, _, rest = member.name.partition("/")
        if member.name in _SECTIONS and member.isdir():
            (staging / section).mkdir(exist_ok=True)
            return None  # the part's own folder: made here, as the server makes folders
        if member.name == "meta.json":
            if not member.isreg():
                raise UploadRefused("meta.json is not a file")
            return member
        if section not in _SECTIONS or not rest:
            raise UploadRefused(f"{member.name!r} is not a path an upload may hold")
        if member.islnk():
            raise UploadRefused(f"{member.name!r} is a hard link; uploads hold none")
        try:
            inner = tarfile.data_filter(member.replace(name=rest, deep=False), str(staging / section))
        except tarfile.FilterError as e:
            raise UploadRefused(f"{member.name!r}: {e}") from e
        return inner.replace(name=member.name, deep=False)

    return check


def _unpack(archive: IO[bytes], staging: Path, limit: int | None) -> dict[str, object]:
    budget = _Budget(limit, "the upload")
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            members = []
            for member in tar:
                budget.take(member.size)
                members.append(member)
            tar.extractall(staging, members=members, filter=_contained(staging))  # noqa: S202 (filtered)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, UploadRefused):
            raise
        raise UploadRefused(f"the upload is not a readable archive: {e}") from e
    try:
        meta = json.loads((staging / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UploadRefused("the upload holds no readable meta.json") from e
    if not isinstance(meta, dict):
        raise UploadRefused("meta.json is not an object")
    return meta


def _place_tree(ws: WorkspacePaths, staged: Path, deleted: list[str]) -> None:
    """The work tree as the job left it: the branch's tip (pushed), then its uncommitted files."""
    _repo_git(ws, "reset", "--quiet", "--hard", "HEAD")
    _repo_git(ws, "clean", "--quiet", "-d", "--force")  # untracked files of an earlier run; ignored ones stay
    for rel in deleted:
        if Path(rel).parts[:1] != (".git",):  # safefs keeps it inside the clone (no "..", no absolute path)
            with contextlib.suppress(UnsafePathError):
                safefs.remove_file(ws.repo, ws.repo / rel)
    if not staged.is_dir():
        return
    for root, _dirs, files in os.walk(staged):
        for name in files:
            source = Path(root) / name
            dest = ws.repo / source.relative_to(staged)
            _place(ws.repo, source, dest)
        for name in _dirs:  # os.walk lists links to folders among the folders and does not enter them
            source = Path(root) / name
            if source.is_symlink():
                _place(ws.repo, source, ws.repo / source.relative_to(staged))


def _place(base: Path, source: Path, dest: Path) -> None:
    """Put the staged file or link ``source`` at ``dest`` (never through a link); a path the work
    tree cannot take (a folder of the branch's where a file was left) is skipped."""
    if ".git" in dest.relative_to(base).parts[:1]:
        return
    st = os.lstat(source)
    with contextlib.suppress(UnsafePathError):
        if stat.S_ISLNK(st.st_mode):
            safefs.write_link(base, dest, str(source.readlink()))
        elif stat.S_ISREG(st.st_mode):
            safefs.write_text(base, dest, source.read_bytes(), mode=0o755 if st.st_mode & 0o100 else 0o644)


def _place_home(ws: WorkspacePaths, staged: Path) -> None:
    """The agent home as the job left it, in place of the one it started with."""
    if not staged.is_dir():
        return
    old = ws.meta / "transfer" / "home-before"
    shutil.rmtree(old, ignore_errors=True)
    if ws.home.exists() or ws.home.is_symlink():
        ws.home.rename(old)
    staged.rename(ws.home)
    shutil.rmtree(old, ignore_errors=True)


def _place_managed(ws: WorkspacePaths, staged: Path) -> None:
    for name in MANAGED_FILES:
        source = staged / name
        with contextlib.suppress(UnsafePathError):
            if source.is_file() and not source.is_symlink():
                safefs.write_text(ws.repo, ws.repo / name, source.read_bytes())
            else:
                safefs.remove_file(ws.repo, ws.repo / name)


def apply_results(ws: WorkspacePaths, run: int, phase: str, archive: IO[bytes], limit: int | None) -> bool:
    """Apply job ``phase``'s results once (see the module's docstring). Returns ``False`` when this
    job's results were applied already (a retried upload is answered, not applied twice).
    Call it under the workspace's lock.

    Raises:
        UploadRefused: the archive breaks a rule; nothing of it was applied.
        OSError, git.GitCommandError: the workspace cannot be written.
    """
    if received(ws, run, phase) is not None:
        return False
    _folder(ws).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"incoming-{run}-{phase}-", dir=_folder(ws)))
    try:
        meta = _unpack(archive, staging, limit)
        code = meta.get("exit_code")
        deleted = [str(p) for p in meta.get("deleted") or [] if isinstance(p, str)]  # type: ignore[attr-defined]
        if phase == "agent":
            _place_tree(ws, staging / "tree", deleted)
            _place_managed(ws, staging / "managed")
            _place_home(ws, staging / "home")
        marker = {
            "exit_code": code if isinstance(code, int) else None,
            "push_error": meta.get("push_error"),
            "oom_killed": meta.get("oom_killed") is True,
        }
        write_atomic(_marker(ws, run, phase), json.dumps(marker), mode=0o600)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
