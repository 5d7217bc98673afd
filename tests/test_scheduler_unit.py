"""The scheduler on its own, with real state and events files (no Docker): daily limits within one
pick, a state file that cannot be read, and the admission lock taken twice by one thread."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from agentic_dispatch.config import Limits
from agentic_dispatch.models import Priority, RetryState, Status, WorkspaceRecord, parse_time, utcnow
from agentic_dispatch.scheduler import ALL_POOLS, Scheduler, retry_wait

BOUND = 10.0  # seconds a thread gets before the test calls it a deadlock


def new_scheduler(tmp_path: Path, **limits: object) -> Scheduler:
    state = tmp_path / "state"
    return Scheduler(Limits(**limits), state, tmp_path / "events" / "events.jsonl")  # type: ignore[arg-type]


def record(slug: str, agent: str = "shell", status: Status = Status.QUEUED) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=f"org/repo/{slug}",
        status=status,
        agent=agent,
        repo="https://example.invalid/org/repo.git",
        org="org",
        repo_name="repo",
        origin_url="https://example.invalid/org/repo.git",
        task=f"task {slug}",
        branch=f"agent/{slug}",
        template="default",
        timeout_seconds=60,
        created_at="2025-01-01T00:00:00Z",
    )


def log_started(sched: Scheduler, agent: str) -> None:
    """Append a ``started`` line as the store's events log does (the count daily limits read)."""
    sched.events_file.parent.mkdir(parents=True, exist_ok=True)
    with sched.events_file.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"at": utcnow(), "kind": "started", "workspace": "org/repo/old", "agent": agent}) + "\n")


def in_thread(fn: object) -> None:
    """Run ``fn`` in a daemon thread; fail (not hang) if it has not returned within BOUND."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND)
    assert not t.is_alive(), f"still blocked after {BOUND}s: the admission lock deadlocked"
    if errors:
        raise errors[0]


def flock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


# -- daily limits -------------------------------------------------------------------------------
def test_pick_with_one_of_two_daily_starts_used_and_four_queued_starts_only_one(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=8, daily={"shell": 2})
    log_started(sched, "shell")
    queued = [record(f"w{i}") for i in range(4)]

    with sched.admission():
        chosen = sched.pick(queued)

    assert [r.name for r in chosen] == ["org/repo/w0"]


def test_daily_limit_within_one_pick_counts_per_pool_and_leaves_other_pools_alone(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=8, daily={"claude": 2})
    queued = [record(f"c{i}", agent="claude:opus" if i % 2 else "claude") for i in range(4)]
    queued += [record(f"s{i}") for i in range(3)]

    with sched.admission():
        chosen = sched.pick(queued)

    assert sum(r.agent.startswith("claude") for r in chosen) == 2  # both models share the claude pool's limit
    assert sum(r.agent == "shell" for r in chosen) == 3


# -- lock keys ----------------------------------------------------------------------------------
def keyed(slug: str, key: str | None, status: Status = Status.QUEUED, **fields: object) -> WorkspaceRecord:
    return record(slug, status=status).model_copy(update={"lock_key": key, **fields})


def test_pick_starts_no_run_whose_lock_key_is_running_and_the_runs_behind_it_start_in_order(
    tmp_path: Path,
) -> None:
    sched = new_scheduler(tmp_path, total=8)
    records = [
        keyed("holder", "db", Status.RUNNING),
        keyed("waits", "db", priority=Priority.CRITICAL),  # first in order, and still held
        keyed("other-key", "cache", created_at="2025-01-01T00:00:01Z"),
        keyed("second-of-cache", "cache", created_at="2025-01-01T00:00:02Z"),
        keyed("unkeyed", None, created_at="2025-01-01T00:00:03Z"),
    ]

    with sched.admission():
        chosen = sched.pick(records)

    # One run per key: "waits" is skipped (not a barrier), "cache" starts its oldest run only.
    assert [r.name for r in chosen] == ["org/repo/other-key", "org/repo/unkeyed"]
    assert sched.lock_waits(records) == {"org/repo/waits": "lock db held by org/repo/holder"}


def test_pick_starts_a_keyed_run_once_its_holder_has_finished(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=8)
    records = [
        keyed("done", "db", Status.COMPLETED),
        keyed("next", "db", queued_ns=1),
        keyed("after", "db", queued_ns=2),
    ]

    with sched.admission():
        chosen = sched.pick([r for r in records if r.status in (Status.QUEUED, Status.RUNNING)])

    assert [r.name for r in chosen] == ["org/repo/next"]
    assert sched.lock_waits(records) == {}  # queued behind "next", not held by a running run yet


def test_a_waiting_keyed_run_takes_no_slot_from_the_runs_behind_it(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=2)
    records = [keyed("holder", "db", Status.RUNNING), keyed("waits", "db"), keyed("free", None)]

    with sched.admission():
        chosen = sched.pick(records)

    assert [r.name for r in chosen] == ["org/repo/free"]


# -- the state file -----------------------------------------------------------------------------
def test_missing_state_file_means_unfrozen_and_a_state_file_of_an_older_version_is_read(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path)
    assert sched.state().frozen is False
    assert sched.state_problem is None
    sched.state_dir.mkdir(parents=True)
    old = {"frozen": True, "frozen_at": "2025-01-01T00:00:00Z", "paused_until": {"shell": 1}, "retired_key": 3}
    (sched.state_dir / "scheduler.json").write_text(json.dumps(old), encoding="utf-8")

    assert sched.state().frozen is True
    assert sched.state().paused_until == {"shell": 1.0}
    assert sched.state_problem is None


@pytest.mark.parametrize(
    "content",
    [
        '{"frozen": true, "paused_until": {"shell": 99',  # cut short
        "[]",
        '{"frozen": "no"}',
        '{"paused_until": {"shell": "tomorrow"}}',
        b"\xff\xfe not utf-8",
    ],
    ids=["truncated", "not-an-object", "frozen-not-bool", "pause-not-a-time", "not-utf8"],
)
def test_unreadable_state_file_freezes_the_queue_reports_how_to_fix_it_and_is_never_overwritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes
) -> None:
    sched = new_scheduler(tmp_path, total=8)
    sched.state_dir.mkdir(parents=True)
    state_file = sched.state_dir / "scheduler.json"
    original = content.encode() if isinstance(content, str) else content
    state_file.write_bytes(original)
    queued = [record(f"w{i}") for i in range(3)]

    with caplog.at_level(logging.ERROR, logger="agentic_dispatch.scheduler"), sched.admission():
        assert sched.pick(queued) == []

    assert sched.state().frozen is True
    problem = sched.state_problem
    assert problem is not None
    assert str(state_file) in problem and "delete" in problem and "agentic_dispatch_start" in problem
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [problem]  # logged once
    holds = sched.holds()
    assert holds[0].pool == ALL_POOLS and holds[0].reason == problem and holds[0].until is None
    # Nothing but an explicit unfreeze may touch the file.
    with sched.admission():
        sched.note_start("shell")
    assert sched.note_failure("shell", 0.0) is False
    sched.resume_pool("shell")
    assert sched.set_frozen(True).frozen is True
    assert state_file.read_bytes() == original
    assert not (sched.state_dir / "scheduler.json.broken").exists()


def test_state_file_that_cannot_be_opened_freezes_the_queue(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=8)
    (sched.state_dir / "scheduler.json").mkdir(parents=True)  # reading it fails with an OSError

    with sched.admission():
        assert sched.pick([record("w0")]) == []
    assert sched.state_problem is not None and "cannot read" in sched.state_problem


def test_unfreeze_after_a_corrupt_state_file_sets_the_file_aside_and_starts_work_again(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=8)
    sched.state_dir.mkdir(parents=True)
    state_file = sched.state_dir / "scheduler.json"
    state_file.write_text("{garbage", encoding="utf-8")

    state = sched.set_frozen(False)

    assert state.frozen is False
    assert (sched.state_dir / "scheduler.json.broken").read_text(encoding="utf-8") == "{garbage"
    assert json.loads(state_file.read_text(encoding="utf-8"))["frozen"] is False
    assert sched.state_problem is None
    with sched.admission():
        assert [r.name for r in sched.pick([record("w0")])] == ["org/repo/w0"]


# -- dependencies -------------------------------------------------------------------------------
def test_pick_skips_a_run_whose_dependencies_have_not_completed_and_says_what_to_do_when_one_ended_otherwise(
    tmp_path: Path,
) -> None:
    sched = new_scheduler(tmp_path, total=8)
    finished = {
        "org/repo/done": record("done", status=Status.COMPLETED),
        "org/repo/broke": record("broke", status=Status.FAILED).model_copy(update={"reason": "exit 3\nmore"}),
    }
    active = [
        record("upstream", status=Status.RUNNING),
        record("after-running", agent="shell").model_copy(update={"depends_on": ["org/repo/upstream"]}),
        record("after-done").model_copy(update={"depends_on": ["org/repo/done"], "priority": Priority.LOW}),
        record("after-failed").model_copy(update={"depends_on": ["org/repo/done", "org/repo/broke"]}),
        record("after-gone").model_copy(update={"depends_on": ["org/repo/gone"]}),
    ]

    waits = sched.dependency_waits(active, finished.get)
    with sched.admission():
        chosen = sched.pick(active, waiting=waits)

    assert [r.name for r in chosen] == ["org/repo/after-done"]  # a waiting run takes no slot, whatever its order
    assert waits["org/repo/after-running"] == "org/repo/upstream (running) to complete"
    failed = waits["org/repo/after-failed"]
    assert failed.startswith("org/repo/broke, which ended failed (exit 3)")
    assert "agentic_resume org/repo/broke" in failed and "cancel org/repo/after-failed" in failed
    assert "org/repo/done" not in failed  # a completed dependency is not waited for
    assert "org/repo/gone to complete, but it is gone" in waits["org/repo/after-gone"]
    assert "org/repo/after-done" not in waits


# -- retries ------------------------------------------------------------------------------------
def retry_due(slug: str, next_at: str, agent: str = "shell") -> WorkspaceRecord:
    state = RetryState(max=2, on=["crash"], attempt=2, last_class="crash", next_at=next_at)
    return record(slug, agent=agent).model_copy(update={"retry": state, "runs": 2})


def test_a_retry_in_its_backoff_takes_no_slot_and_starts_once_due_unless_its_pool_is_paused(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, total=1, fast_fail_count=1, fast_fail_window_seconds=60)
    now = parse_time("2026-12-06T10:00:00Z")
    assert now is not None
    waiting = retry_due("later", "2026-12-06T10:00:30Z")
    behind = record("fresh").model_copy(update={"created_at": "2026-01-01T00:00:00Z"})  # younger than "later"

    with sched.admission():
        assert [r.name for r in sched.pick([waiting, behind], now=now)] == ["org/repo/fresh"]
        assert [r.name for r in sched.pick([waiting], now=now + 30)] == ["org/repo/later"]
    assert retry_wait(waiting, now) == "attempt 2 of 3 at 2026-12-06T10:00:30Z, after a crash failure"
    assert retry_wait(waiting, now + 30) is None

    assert sched.note_failure("shell", 1.0)  # the pool is paused: its retries wait like any other run
    with sched.admission():
        assert sched.pick([waiting], now=time.time() + 31) == []
    sched.resume_pool("shell")
    with sched.admission():
        assert [r.name for r in sched.pick([waiting])] == ["org/repo/later"]


# -- the admission lock -------------------------------------------------------------------------
def test_admission_taken_again_by_the_same_thread_does_not_deadlock_and_keeps_the_flock_until_the_outer_exit(
    tmp_path: Path,
) -> None:
    sched = new_scheduler(tmp_path)
    lock_file = sched.state_dir / "admission.lock"
    seen: dict[str, bool] = {}

    def nested() -> None:
        with sched.admission():
            with sched.admission():
                seen["inner"] = flock_is_free(lock_file)
            seen["after inner"] = flock_is_free(lock_file)

    in_thread(nested)

    assert seen == {"inner": False, "after inner": False}  # another process would still be kept out
    assert flock_is_free(lock_file)


def test_scheduler_methods_that_take_the_admission_lock_work_inside_it(tmp_path: Path) -> None:
    sched = new_scheduler(tmp_path, fast_fail_count=1)

    def under_admission() -> None:
        with sched.admission():
            sched.set_frozen(True)
            sched.note_failure("shell", 0.0)
            sched.resume_pool("shell")

    in_thread(under_admission)

    assert sched.state().frozen is True


def test_dispatches_in_the_same_second_start_in_the_order_they_were_queued(tmp_path: Path) -> None:
    # Names sort the other way round, so only the queue time can put "z-first" ahead.
    first, second = record("z-first"), record("a-second")
    first.queued_ns, second.queued_ns = 1_000, 2_000
    assert first.created_at == second.created_at
    assert [r.name for r in new_scheduler(tmp_path).pick([second, first])] == [first.name, second.name]
