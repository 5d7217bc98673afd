"""Daily budgets (``[limits] daily_tokens`` / ``daily_cost_usd``): the scheduler on its own, without
Docker (the events log of a real root, whose lines that end runs carry what they used, and a clock the
test sets), then one dispatch to an over-budget pool on a real engine, and a resumed run's usage counted
by a restarted server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest

from agentic_dispatch.config import Limits, Paths, load_settings
from agentic_dispatch.models import DispatchRequest, Event, EventKind, RunSummary, Status, WorkspaceRecord, utcnow
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.scheduler import Scheduler, UsageMeter
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

from .model_server import ModelServer, Say, Shell

NOW = datetime(2025, 3, 10, 15, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2025, 3, 11, tzinfo=UTC).timestamp()  # when today's budgets reset
TODAY = "2025-03-10T09:00:00Z"
YESTERDAY = "2025-03-09T23:59:59Z"


def root(tmp_path: Path) -> tuple[StatusStore, Paths]:
    paths = Paths(root=tmp_path / "root", config_dir=tmp_path / "config")
    paths.ensure()
    return StatusStore.of(paths), paths


def scheduler(paths: Paths, store: StatusStore, **limits: object) -> Scheduler:
    return Scheduler(Limits(**limits), paths.state, store.events_file, UsageMeter(store.events))  # type: ignore[arg-type]


def record(
    slug: str,
    agent: str = "codex",
    status: Status = Status.COMPLETED,
    finished_at: str | None = TODAY,
) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=f"acme/app/{slug}",
        status=status,
        agent=agent,
        repo="acme/app",
        org="acme",
        repo_name="app",
        origin_url="https://example.invalid/a.git",
        task=f"task {slug}",
        branch=f"agent/{slug}",
        template="coding",
        timeout_seconds=60,
        runs=1,
        created_at="2025-03-09T08:00:00Z",
        finished_at=finished_at,
    )


def used(tokens_in: int, tokens_out: int, cost: float | None = None) -> RunSummary:
    return RunSummary(input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)


def ended(
    store: StatusStore,
    slug: str,
    agent: str = "codex",
    at: str = TODAY,
    summary: RunSummary | None = None,
    status: Status = Status.COMPLETED,
    previous: Status = Status.RUNNING,
) -> None:
    """The line the run lifecycle writes when a run of ``slug`` ends (tests/test_lifecycle.py: what it carries)."""
    store.events.append(
        Event(
            at=at, kind=EventKind(status.value), workspace=f"acme/app/{slug}", agent=agent, status=status.value,
            previous=previous.value, tokens=summary.tokens if summary else None,
            cost_usd=summary.cost_usd if summary else None,
        )
    )  # fmt: skip


def test_a_pool_whose_runs_today_reported_more_tokens_than_its_budget_holds_new_starts_until_midnight_utc(
    tmp_path: Path,
) -> None:
    store, paths = root(tmp_path)
    ended(store, "done-1", summary=used(400, 200))
    ended(store, "done-2", summary=used(500, 100))
    sched = scheduler(paths, store, daily_tokens={"codex": 1000})
    waiting, other = record("next", status=Status.QUEUED, finished_at=None), record("sh", "shell", Status.QUEUED, None)

    [hold] = sched.holds(now=NOW)
    assert hold.pool == "codex"
    assert hold.until == MIDNIGHT
    assert "daily budget reached, resets at 00:00 UTC" in hold.reason
    assert "limits.daily_tokens codex: 1,200 / 1,000 tokens" in hold.reason
    assert sched.hold_on("codex:gpt-5", now=NOW) == hold
    assert "codex held until 2025-03-11T00:00:00Z" in hold.describe()
    assert [r.name for r in sched.pick([waiting, other], now=NOW)] == ["acme/app/sh"]  # only the held pool waits


def test_runs_that_finished_yesterday_do_not_count_against_todays_budget(tmp_path: Path) -> None:
    store, paths = root(tmp_path)
    ended(store, "old", at=YESTERDAY, summary=used(5000, 5000))
    ended(store, "new", summary=used(10, 20))
    sched = scheduler(paths, store, daily_tokens={"codex": 1000})

    [use] = sched.budgets(now=NOW)
    assert (use.used, use.runs, use.reached) == (30, 1, False)
    assert sched.holds(now=NOW) == []
    assert [r.name for r in sched.pick([record("next", status=Status.QUEUED, finished_at=None)], now=NOW)] == [
        "acme/app/next"
    ]


def test_the_next_utc_day_releases_a_pool_held_by_its_budget(tmp_path: Path) -> None:
    store, paths = root(tmp_path)
    ended(store, "done", summary=used(900, 900, cost=3.0))
    sched = scheduler(paths, store, daily_tokens={"codex": 1000}, daily_cost_usd={"codex": 2.5})
    waiting = record("next", status=Status.QUEUED, finished_at=None)
    assert {h.reason.split(": ")[1].split(" ")[0] for h in sched.holds(now=NOW)} == {
        "limits.daily_tokens",
        "limits.daily_cost_usd",
    }
    assert sched.pick([waiting], now=NOW) == []

    assert sched.holds(now=MIDNIGHT) == []
    assert [r.name for r in sched.pick([waiting], now=MIDNIGHT)] == ["acme/app/next"]


def test_runs_that_reported_no_usage_are_counted_as_unknown_never_guessed(tmp_path: Path) -> None:
    store, paths = root(tmp_path)
    ended(store, "silent")  # e.g. the shell agent, or a CLI cut off before it said anything
    ended(store, "cost-only", summary=RunSummary(cost_usd=1.25))
    ended(store, "tokens-only", summary=used(100, 50))
    sched = scheduler(paths, store, daily_tokens={"codex": 1000}, daily_cost_usd={"codex": 10})

    tokens, cost = sorted(sched.budgets(now=NOW), key=lambda b: b.budget, reverse=True)
    assert (tokens.budget, tokens.used, tokens.runs, tokens.unknown) == ("daily_tokens", 150, 3, 2)
    assert (cost.budget, cost.used, cost.runs, cost.unknown) == ("daily_cost_usd", 1.25, 3, 2)
    assert tokens.describe() == (
        "limits.daily_tokens codex: 150 / 1,000 tokens used today (3 runs finished, 2 reported no usage: unknown)"
    )
    assert "$1.25 / $10.00" in cost.describe()


def test_a_model_budget_holds_that_model_only_and_a_pool_budget_holds_every_model_of_the_pool(
    tmp_path: Path,
) -> None:
    store, paths = root(tmp_path)
    ended(store, "opus", "claude:opus", summary=used(800, 400))
    sched = scheduler(paths, store, daily_tokens={"claude:opus": 1000, "claude": 5000})
    opus = record("o", "claude:opus", Status.QUEUED, None)
    sonnet = record("s", "claude:sonnet", Status.QUEUED, None)

    assert [h.pool for h in sched.holds(now=NOW)] == ["claude:opus"]
    assert [r.name for r in sched.pick([opus, sonnet], now=NOW)] == ["acme/app/s"]
    assert {b.key: b.used for b in sched.budgets(now=NOW)} == {"claude": 1200, "claude:opus": 1200}


def test_every_run_of_the_day_counts_once_also_a_resumed_workspaces_earlier_runs_and_after_a_restart(
    tmp_path: Path,
) -> None:
    """The meter reads the day's lines once, then what was appended since; a new one (a restarted server)
    counts the same runs from the same log."""
    store, paths = root(tmp_path)
    ended(store, "task-1", at="2025-03-10T08:00:00Z", summary=used(300, 100), status=Status.BLOCKED)
    ended(store, "never-ran", status=Status.CANCELLED, previous=Status.QUEUED)  # no run: not counted
    sched = scheduler(paths, store, daily_tokens={"codex": 1000})
    assert [(b.used, b.runs) for b in sched.budgets(now=NOW)] == [(400, 1)]

    ended(store, "task-1", at="2025-03-10T10:00:00Z", summary=used(200, 50))  # its resumed run
    assert [(b.used, b.runs) for b in sched.budgets(now=NOW)] == [(650, 2)]
    assert [(b.used, b.runs) for b in sched.budgets(now=NOW)] == [(650, 2)], "a second look counts nothing twice"
    restarted = scheduler(paths, store, daily_tokens={"codex": 1000})
    assert [(b.used, b.runs) for b in restarted.budgets(now=NOW)] == [(650, 2)]


def test_a_line_still_being_written_is_counted_once_it_is_whole(tmp_path: Path) -> None:
    store, paths = root(tmp_path)
    ended(store, "first", summary=used(100, 0))
    line = Event(at=TODAY, kind=EventKind.COMPLETED, workspace="acme/app/second", agent="codex", status="completed",
                 previous="running", tokens=500).model_dump_json(exclude_none=True).encode()  # fmt: skip
    with store.events_file.open("ab") as f:
        f.write(line[:20])
    sched = scheduler(paths, store, daily_tokens={"codex": 1000})
    assert [(b.used, b.runs) for b in sched.budgets(now=NOW)] == [(100, 1)]
    with store.events_file.open("ab") as f:
        f.write(line[20:] + b"\n")
    assert [(b.used, b.runs) for b in sched.budgets(now=NOW)] == [(600, 2)]


def test_without_budgets_nothing_is_counted_and_nothing_holds(tmp_path: Path) -> None:
    store, paths = root(tmp_path)
    ended(store, "done", summary=used(700, 700))
    sched = scheduler(paths, store)
    assert sched.budgets(now=NOW) == []
    assert sched.holds(now=NOW) == []


def test_a_dispatch_to_a_pool_over_its_token_budget_is_queued_says_so_and_status_shows_the_days_use(
    docker_env: str, docker_client: docker.DockerClient, user_repo: Path, isolated_home: Path
) -> None:
    """The shell agent reports no usage, so the day's use is a run's end seeded in the root's events log."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text("[limits]\ndaily_tokens = {shell = 1000}\n", encoding="utf-8")
    settings, paths = load_settings()
    paths.ensure()
    ended(StatusStore.of(paths), "earlier", "shell", at=utcnow(), summary=used(1500, 500))
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    try:
        result = svc.dispatch(DispatchRequest(repo=str(user_repo), task="touch ran.txt", agent="shell"))
        assert result.status == "queued"
        assert result.held is not None and result.held.startswith("shell held until ")
        assert "limits.daily_tokens shell: 2,000 / 1,000 tokens used today" in result.held
        assert "T00:00:00Z" in result.held  # it resets at the next UTC midnight

        report = svc.status()
        assert "budget limits.daily_tokens shell: 2,000 / 1,000 tokens used today (1 run finished)" in report.notes
        hold = next(h for h in report.holds if h.pool == "shell")
        assert "daily budget reached" in hold.reason and hold.until is not None and hold.until.endswith("T00:00:00Z")
        svc.reconcile()  # a drain on the timer's path starts nothing either
        assert svc.store.read(result.workspace).status == Status.QUEUED
        assert not (Path(result.repo_path) / "ran.txt").exists()
    finally:
        svc.close()


def test_a_resumed_runs_usage_on_the_same_utc_day_still_counts_after_a_restart(
    docker_env: str,
    docker_client: docker.DockerClient,
    user_repo: Path,
    isolated_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claude Code against the scripted model: a run that blocks, then its resumed run. The record keeps only
    the last run's summary; the day's use is both runs, before and after a new service on the same root."""
    (tmp_path / "user-home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))  # no login files of the machine's user
    monkeypatch.setenv("ANTHROPIC_API_KEY", f"sk-test-{uuid.uuid4().hex}")
    with ModelServer() as model:
        model.script([Shell("printf 'Which licence?' > BLOCKED.md", usage=(100, 20)), Say("Blocked.", usage=(200, 30))])
        isolated_home.mkdir(parents=True, exist_ok=True)
        (isolated_home / "config.toml").write_text(
            f'[agents.claude]\nbase_url = "http://127.0.0.1:{model.port}"\nmodel = "claude-sonnet-4-5"\n'
            "max_retries = 0\n[limits]\ndaily_tokens = {claude = 100000}\n",
            encoding="utf-8",
        )
        settings, paths = load_settings()
        svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
        svc.start()
        try:
            name = svc.dispatch(DispatchRequest(repo=str(user_repo), task="Add a licence", agent="claude")).workspace
            assert svc.wait(name, 120).status == Status.BLOCKED
            model.script([Say("Added the MIT licence.", usage=(40, 2))])
            svc.resume(name, "MIT")
            rec = svc.wait(name, 120)
            before = [n for n in svc.status().notes if n.startswith("budget ")]
        finally:
            svc.close()

    assert rec.status == Status.COMPLETED and rec.runs == 2, rec
    assert rec.summary is not None and rec.summary.tokens == 42, "the record holds the last run's usage only"
    assert before == ["budget limits.daily_tokens claude: 392 / 100,000 tokens used today (2 runs finished)"]
    restarted = Dispatcher(settings, paths, DockerRuntime(docker_client))
    assert [n for n in restarted.status().notes if n.startswith("budget ")] == before
