"""Looking at one workspace's work: its log and its diff, bounded so a reply stays small.

Both read what the agent wrote: the log through :mod:`safefs` (no link followed), the diff with
host-side git carrying the overrides (no hook, fsmonitor, external diff or textconv of the
agent's runs here). Key values are masked as status masks them.
"""

from __future__ import annotations

import json

from ...agents import agent_base
from ...credentials import redact
from ...errors import InvalidInputError, UnsafePathError
from ...models import MAX_TAIL_LINES, DiffResult, LogsResult
from ...naming import check_git_ref
from ...safefs import read_range
from ...store import StatusStore
from ...workspace import bounded_git
from ..catalog import AgentCatalog

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_TAIL_LINES",
    "Inspector",
]

# Every reply stays under 64 KiB. A tool's result travels twice (the structured content and its
# text copy), each JSON-encoded: the text of a reply fits in this, escapes included.
MAX_REPLY_BYTES = 28 * 1024


def _json_size(data: bytes) -> int:
    return len(json.dumps(data.decode("utf-8", errors="replace")))


def fit(data: bytes, budget: int, keep_end: bool = False) -> bytes:
    """The longest head (``keep_end``: tail) of ``data`` whose text JSON-encodes in ``budget`` bytes
    (a newline is two bytes there, a control character six)."""
    if _json_size(data) <= budget:
        return data
    lo, hi = 0, len(data)  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _json_size(data[len(data) - mid :] if keep_end else data[:mid]) <= budget:
            lo = mid
        else:
            hi = mid
    return data[len(data) - lo :] if keep_end else data[:lo]


class Inspector:
    """``logs`` and ``diff`` of a workspace."""

    def __init__(self, store: StatusStore, catalog: AgentCatalog) -> None:
        self.store = store
        self.catalog = catalog

    def logs(self, workspace: str, tail: int = 200, since_bytes: int | None = None) -> LogsResult:
        """The last ``tail`` lines of the agent's log, or (``since_bytes``) what follows that offset.

        Raises:
            InvalidInputError: a bad ``tail`` or ``since_bytes``.
            WorkspaceNotFoundError: no such workspace.
        """
        if not 1 <= tail <= MAX_TAIL_LINES:
            raise InvalidInputError("tail", f"must be 1 to {MAX_TAIL_LINES} lines.")
        if since_bytes is not None and since_bytes < 0:
            raise InvalidInputError(
                "since_bytes", "must be 0 or more: pass the `end` a previous agentic_logs returned."
            )
        rec = self.store.read(workspace)
        ws = self.store.paths(workspace)
        base = agent_base(rec.agent)
        try:
            got = read_range(ws.logs, ws.log(base), since_bytes, MAX_REPLY_BYTES)
        except UnsafePathError as e:
            return LogsResult(
                workspace=workspace,
                text="",
                start=0,
                end=0,
                size=0,
                truncated=False,
                note=f"(the log cannot be shown: {e})",
            )
        if got is None:
            return LogsResult(workspace=workspace, text="", start=0, end=0, size=0, truncated=False, note="no log yet")
        data, start, size = got
        if since_bytes is None:
            lines = data.splitlines(keepends=True)
            if start > 0 and lines:
                lines = lines[1:]  # the first line was cut by the read: it goes
            data = fit(b"".join(lines[-tail:]), MAX_REPLY_BYTES, keep_end=True)
            start = size - len(data)
        else:
            data = fit(data, MAX_REPLY_BYTES)
        end = start + len(data)
        text = data.decode("utf-8", errors="replace")
        truncated = start > 0 or end < size
        note = None
        if truncated:
            note = (
                f"bytes {start}..{end} of {size}; read on with since_bytes={end}"
                + (f", or back with since_bytes={max(0, start - MAX_REPLY_BYTES)}" if start > 0 else "")
                + f" (at most {MAX_REPLY_BYTES} bytes a call)"
            )
        masked = redact(text, self.catalog.secrets(base)) or ""
        return LogsResult(
            workspace=workspace, text=masked, start=start, end=end, size=size, truncated=truncated, note=note
        )

    def diff(self, workspace: str, stat_only: bool = False, path: str | None = None) -> DiffResult:
        """The agent's branch against the commit it started from: ``--stat`` first, then the patch.

        Raises:
            InvalidInputError: a bad ``path``.
            WorkspaceNotFoundError: no such workspace.
        """
        rec = self.store.read(workspace)
        if path is not None:
            path = self._check_path(path)
        repo = self.store.paths(workspace).repo
        base = (
            f"refs/remotes/origin/{check_git_ref('base_branch', rec.base_branch)}"
            if rec.base_branch and rec.base_branch != "HEAD"
            else None
        )
        branch = f"refs/heads/{check_git_ref('branch', rec.branch)}"
        if base is None:
            return DiffResult(
                workspace=workspace,
                base="?",
                branch=rec.branch,
                stat="",
                note="the run has no base branch to compare with",
            )
        span = f"{base}...{branch}"  # what the branch added since it left its base
        tail = ["--", path] if path else []
        secrets = self.catalog.secrets(agent_base(rec.agent))
        stat, stat_cut = bounded_git(
            repo, ["diff", "--no-ext-diff", "--no-textconv", "--stat=120", span, *tail], MAX_REPLY_BYTES // 4
        )
        result = DiffResult(
            workspace=workspace,
            base=rec.base_branch or "?",
            branch=rec.branch,
            stat=redact(stat, secrets) or "",
            checkpoint=rec.checkpoint,
        )
        if stat_only:
            return result.model_copy(
                update={
                    "truncated": stat_cut,
                    "note": "the stat only; call without stat_only for the patch" if stat else "no changes",
                }
            )
        room = MAX_REPLY_BYTES - len(json.dumps(stat))
        patch, cut = bounded_git(repo, ["diff", "--no-ext-diff", "--no-textconv", "--no-color", span, *tail], room)
        fitted = fit(patch.encode(), room).decode("utf-8", errors="replace")
        cut, patch = cut or len(fitted) < len(patch), fitted
        note = None
        if cut or stat_cut:
            note = f"the patch is cut at {room} bytes; ask for one file with path=... (the stat lists them)"
        return result.model_copy(
            update={"patch": redact(patch, secrets) or "", "truncated": cut or stat_cut, "note": note}
        )

    @staticmethod
    def _check_path(path: str) -> str:
        clean = path.strip()
        parts = clean.split("/")
        if (
            not clean
            or clean.startswith(("/", "-", ":"))
            or ".." in parts
            or "\\" in clean
            or "\x00" in clean
            or len(clean) > 1024
        ):
            raise InvalidInputError(
                "path",
                f"{path[:80]!r} is not a path inside the repository; give one as the stat lists it (e.g. src/app.py).",
            )
        return clean
