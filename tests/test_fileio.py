"""Atomic writes and file locks (``fileio``), with real files and real processes: a lock held in a
child process is the lock another server on the same root would hold, and a writer that runs out of
room (or is killed) mid-write is a real child hitting its file size limit."""

from __future__ import annotations

import os
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentic_dispatch import fileio
from agentic_dispatch.fileio import (
    ReentrantFileLock,
    exclusive_lock,
    shared_lock,
    try_exclusive_lock,
    write_atomic,
)

BOUND = 30.0  # seconds a child or a thread gets before the test calls it stuck

_HOLD = """
import sys
from pathlib import Path
from agentic_dispatch import fileio
kind, path = sys.argv[1], Path(sys.argv[2])
with {"exclusive": fileio.exclusive_lock, "shared": fileio.shared_lock}[kind](path):
    print("held", flush=True)
    sys.stdin.readline()
"""

_TRY = """
import sys
from pathlib import Path
from agentic_dispatch import fileio
with fileio.try_exclusive_lock(Path(sys.argv[1])) as held:
    print("busy" if held is None else "got")
"""

# A writer whose file size limit is 64 KiB writes 1 MiB: with SIGXFSZ ignored (Python's own
# setting) the write fails (EFBIG) and write_atomic cleans up; with it at the system default the
# kernel kills the writer mid-write.
_WRITE_PAST_LIMIT = """
import resource, signal, sys
from pathlib import Path
from agentic_dispatch.fileio import write_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "error" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_atomic(Path(sys.argv[1]), b"n" * (1 << 20))
except OSError as e:
    print(type(e).__name__, e.errno)
"""


def _readline(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], BOUND)
    assert ready, f"the child said nothing within {BOUND}s"
    return proc.stdout.readline().strip()


@contextmanager
def held_in_child(kind: str, path: Path) -> Iterator[None]:
    """Another process holds ``path``'s lock (``exclusive`` or ``shared``) until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD, kind, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert _readline(proc) == "held"
            yield
        finally:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.close()
            assert proc.wait(BOUND) == 0


def try_in_child(path: Path) -> str:
    """``got`` or ``busy``: what a try-lock of ``path`` in another process finds."""
    done = subprocess.run(
        [sys.executable, "-c", _TRY, str(path)], capture_output=True, text=True, timeout=BOUND, check=True
    )
    return done.stdout.strip()


def in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    """Start ``fn`` on a thread; the event is set once it has returned."""
    finished = threading.Event()

    def run() -> None:
        fn()
        finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, finished


def blocked_flock_waiters(path: Path) -> int:
    """How many ``flock`` waiters the kernel lists as blocked on ``path``'s file (``/proc/locks``)."""
    ino = os.stat(path).st_ino
    lines = Path("/proc/locks").read_text(encoding="ascii").splitlines()
    return sum(1 for ln in lines if "->" in ln and ln.split()[-3].endswith(f":{ino}"))


# -- locks ----------------------------------------------------------------------------------------
def test_an_exclusive_lock_held_by_another_process_makes_a_try_lock_fail_until_it_is_released(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "entry.lock"
    with held_in_child("exclusive", lock), try_exclusive_lock(lock) as held:
        assert held is None
    with try_exclusive_lock(lock) as held:
        assert held is not None


def test_a_shared_lock_lets_another_shared_holder_in_and_keeps_an_exclusive_try_out(tmp_path: Path) -> None:
    lock = tmp_path / "mirror.lock"
    entered = threading.Event()

    def share() -> None:
        with shared_lock(lock):
            entered.set()

    with held_in_child("shared", lock):
        in_thread(share)
        assert entered.wait(BOUND), "a second shared holder waited for the first"
        with try_exclusive_lock(lock) as held:
            assert held is None


def test_an_exclusive_lock_waits_for_the_process_holding_it_and_gets_it_once_released(tmp_path: Path) -> None:
    lock = tmp_path / "mirror.lock"
    got = threading.Event()

    def take() -> None:
        with exclusive_lock(lock):
            got.set()

    with held_in_child("shared", lock):
        _, finished = in_thread(take)
        assert not got.is_set()
    assert finished.wait(BOUND)
    assert got.is_set()


def test_a_lock_file_is_created_with_its_folder_and_mode_0644_unless_told(tmp_path: Path) -> None:
    default, private = tmp_path / "a" / "b" / "x.lock", tmp_path / "y.lock"
    with exclusive_lock(default), shared_lock(private, mode=0o600):
        pass
    assert stat.S_IMODE(default.stat().st_mode) == 0o644 & ~_umask()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_lock_file_removed_on_release_is_gone_and_the_next_holder_makes_a_new_one(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "entry.lock"
    with try_exclusive_lock(lock) as held:
        assert held is not None
        held.remove_on_release = True
    assert not lock.exists()
    with exclusive_lock(lock):
        assert try_in_child(lock) == "busy"


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see a waiter block")
def test_a_waiter_whose_lock_file_its_holder_removed_locks_the_file_now_at_the_path(tmp_path: Path) -> None:
    # Without the check, the waiter would "hold" the removed file while a third process takes the new one.
    lock = tmp_path / "entry.lock"
    waiter_holds, waiter_may_go = threading.Event(), threading.Event()

    def wait_then_hold() -> None:
        with exclusive_lock(lock):
            waiter_holds.set()
            waiter_may_go.wait(BOUND)

    with exclusive_lock(lock) as held:
        _, finished = in_thread(wait_then_hold)
        seen = threading.Event()
        for _ in range(int(BOUND / 0.01)):  # the kernel's list is the only sign the waiter opened the old file
            if blocked_flock_waiters(lock):
                seen.set()
                break
            seen.wait(0.01)
        assert seen.is_set(), "the waiter never blocked on the lock"
        held.remove_on_release = True
    assert waiter_holds.wait(BOUND)
    assert try_in_child(lock) == "busy"
    waiter_may_go.set()
    assert finished.wait(BOUND)


def test_a_reentrant_lock_is_entered_again_by_its_thread_and_keeps_other_processes_out_until_the_outer_exit(
    tmp_path: Path,
) -> None:
    lock_file = tmp_path / "state" / "admission.lock"
    lock = ReentrantFileLock(lock_file)
    seen: dict[str, str] = {}

    def nested() -> None:
        with lock:
            with lock:
                seen["inner"] = try_in_child(lock_file)
            seen["after inner"] = try_in_child(lock_file)

    _, finished = in_thread(nested)
    assert finished.wait(BOUND), "the thread waited for its own lock"
    assert seen == {"inner": "busy", "after inner": "busy"}
    assert try_in_child(lock_file) == "got"


def test_a_reentrant_lock_makes_another_thread_wait_until_the_holder_leaves(tmp_path: Path) -> None:
    lock = ReentrantFileLock(tmp_path / "ws" / ".lock")
    entered = threading.Event()

    def enter() -> None:
        with lock:
            entered.set()

    with lock:
        _, finished = in_thread(enter)
        assert not entered.is_set()
    assert finished.wait(BOUND)


def test_a_reentrant_lock_waits_for_another_process_holding_the_file(tmp_path: Path) -> None:
    lock_file = tmp_path / "admission.lock"
    lock = ReentrantFileLock(lock_file)
    entered = threading.Event()

    def enter() -> None:
        with lock:
            entered.set()

    with held_in_child("exclusive", lock_file):
        _, finished = in_thread(enter)
        assert not entered.is_set()
    assert finished.wait(BOUND)


# -- writes ---------------------------------------------------------------------------------------
def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_write_atomic_replaces_the_file_with_exactly_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    record, state = tmp_path / "status.json", tmp_path / "scheduler.json"
    record.write_text("old", encoding="utf-8")
    previous = os.umask(0o077)
    try:
        write_atomic(record, "new é")
        write_atomic(state, b"{}", mode=0o644)
    finally:
        os.umask(previous)
    assert record.read_text(encoding="utf-8") == "new é"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler.json", "status.json"]


def test_write_atomic_creates_the_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "outbox" / "ledger" / "x.json"
    write_atomic(path, "{}\n")
    assert path.read_text(encoding="utf-8") == "{}\n"


def test_write_atomic_replaces_a_link_at_the_path_and_never_writes_through_it(tmp_path: Path) -> None:
    host_file = tmp_path / "host-only.txt"
    host_file.write_text("HOST", encoding="utf-8")
    link = tmp_path / "ws" / "ANSWER.md"
    link.parent.mkdir()
    link.symlink_to(host_file)
    write_atomic(link, "answer")
    assert host_file.read_text(encoding="utf-8") == "HOST"
    assert not link.is_symlink()
    assert link.read_text(encoding="utf-8") == "answer"


def test_write_atomic_refuses_to_replace_a_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "x", "data")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def _write_past_limit(path: Path, how: str) -> subprocess.CompletedProcess[str]:
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 64 * 1024:
        pytest.fail(f"the file size limit here ({hard} bytes) is below the 64 KiB the test writes")
    return subprocess.run(
        [sys.executable, "-c", _WRITE_PAST_LIMIT, str(path), how], capture_output=True, text=True, timeout=BOUND
    )


def test_a_write_cut_off_by_an_error_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text("the old record\n", encoding="utf-8")
    done = _write_past_limit(path, "error")
    assert done.stdout.split() == ["OSError", "27"], done.stderr  # EFBIG: the writer ran out of room
    assert path.read_text(encoding="utf-8") == "the old record\n"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text("the old record\n", encoding="utf-8")
    done = _write_past_limit(path, "killed")
    assert done.returncode == -signal.SIGXFSZ, done
    assert path.read_text(encoding="utf-8") == "the old record\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "status.json"]
    assert all(n.startswith(".status.json.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_write_atomic_in_an_open_folder_stays_there_when_the_folder_is_swapped_for_a_link(tmp_path: Path) -> None:
    # What safefs relies on: the agent renames the folder away and leaves a link to the host behind.
    host = tmp_path / "host"
    host.mkdir()
    folder = tmp_path / "ws" / ".gemini"
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder.rename(tmp_path / "ws" / "moved")
        folder.symlink_to(host)
        write_atomic(Path("settings.json"), "{}", dir_fd=fd)
    finally:
        os.close(fd)
    assert list(host.iterdir()) == []
    assert (tmp_path / "ws" / "moved" / "settings.json").read_text(encoding="utf-8") == "{}"


def test_write_atomic_in_an_open_folder_takes_a_bare_file_name_only(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for bad in ("sub/x", "..", "/etc/passwd"):
            with pytest.raises(ValueError, match="bare file name"):
                write_atomic(Path(bad), "x", dir_fd=fd)
    finally:
        os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_the_public_names_are_exactly_those_in_all() -> None:
    defined_here = {
        name
        for name, value in vars(fileio).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == fileio.__name__
    }
    assert defined_here | {"LOCK_FILE_MODE"} == set(fileio.__all__)
