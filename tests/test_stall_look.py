"""The stall check's look at a workspace (``service/runs/stalls.py``), on real folders: what it sees,
and that the clone's top folders are listed again only when the top folder changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agentic_dispatch.service.runs.stalls import TopListing, activity_signature
from agentic_dispatch.store import WorkspacePaths


def _workspace(tmp_path: Path) -> WorkspacePaths:
    ws = WorkspacePaths(tmp_path / "w")
    ws.logs.mkdir(parents=True)
    (ws.repo / ".git").mkdir(parents=True)
    for i in range(3):
        (ws.repo / f"file{i}.txt").write_text("x", encoding="utf-8")
    (ws.repo / "src").mkdir()
    return ws


def _age(path: Path, seconds: float) -> None:
    """Set ``path``'s mtime ``seconds`` back: a folder last changed that long ago."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(then, then))


def test_a_listing_is_kept_while_the_top_folder_is_unchanged_and_a_change_below_it_is_still_seen(
    tmp_path: Path,
) -> None:
    ws = _workspace(tmp_path)
    _age(ws.repo, 5)
    listing = TopListing()
    first = activity_signature(ws, "shell", listing)
    assert listing.folders == ("src",)
    assert listing.mtime_ns == ws.repo.stat().st_mtime_ns, "a listing of a folder changed 5 s ago is kept"
    assert activity_signature(ws, "shell", listing) == first, "nothing changed: the same signature"
    (ws.repo / "src" / "new.py").write_text("y", encoding="utf-8")  # inside a kept folder
    _age(ws.repo, 5)  # the top folder itself did not change
    assert activity_signature(ws, "shell", listing) != first


def test_a_folder_made_at_the_top_is_listed_and_then_watched(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    _age(ws.repo, 5)
    listing = TopListing()
    activity_signature(ws, "shell", listing)
    (ws.repo / "docs").mkdir()
    _age(ws.repo, 3)  # moved, and not within the listing's clock tick
    before = activity_signature(ws, "shell", listing)
    assert listing.folders == ("docs", "src")
    (ws.repo / "docs" / "a.md").write_text("z", encoding="utf-8")
    _age(ws.repo, 3)
    assert activity_signature(ws, "shell", listing) != before, "a change in the new folder is seen"


def test_a_listing_made_within_a_second_of_the_top_folder_s_change_is_not_kept(tmp_path: Path) -> None:
    """A folder made later in the same clock tick would leave the mtime as it was: the listing
    made in that tick cannot be trusted, and the next look lists again."""
    ws = _workspace(tmp_path)
    listing = TopListing()
    activity_signature(ws, "shell", listing)  # the top folder was changed just now
    assert listing.mtime_ns == -1
    mtime = ws.repo.stat().st_mtime_ns
    (ws.repo / "late").mkdir()
    os.utime(ws.repo, ns=(mtime, mtime))  # the same tick: the mtime did not move
    activity_signature(ws, "shell", listing)
    assert "late" in listing.folders
