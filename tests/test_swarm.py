"""Runs on a real Docker Swarm (``[runtime] engine = "swarm"``): a manager and two workers, each a
Docker engine in its own network, mount and UTS namespaces (its own hostname, no disk shared with
the server), joined into one swarm on a bridge of their own (tests/engines.py). Every run is a
service of one task placed by the swarm; its workspace travels through the run gateway,
which listens at the host's address on the nodes' bridge.

One swarm serves the module's tests (it comes up in seconds from the shell image's template); the
test that loses a worker brings up its own.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from rich.console import Console

from agentic_dispatch.cli_views import print_status
from agentic_dispatch.config import load_settings
from agentic_dispatch.errors import ConfigError
from agentic_dispatch.models import FINAL_STATUSES, DispatchRequest, Status
from agentic_dispatch.runtime.base import LABEL_ROOT, LABEL_RUN, LABEL_WORKSPACE
from agentic_dispatch.runtime.swarm import LABEL_SECRET_OF, SwarmRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

from . import engines
from .conftest import git, serve_process, wait_for
from .model_server import ModelServer, Say, Shell

# docker-py leaves its socket to the garbage collector when connect() fails (an engine's start is
# probed until it answers): that ResourceWarning is docker-py's (see tests/test_runtime_faults.py).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket fd=\d+, family=1:pytest.PytestUnraisableExceptionWarning",
    "ignore::ResourceWarning",
)


@pytest.fixture(autouse=True)
def _collect_docker_py_sockets() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture(scope="module")
def shared_swarm(engine_template: engines.EngineTemplate) -> Iterator[engines.Swarm]:
    with engines.swarm(engine_template) as made:
        yield made


def _use_swarm(
    swarm: engines.Swarm,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: str = "",
    tick: float = 1,
) -> None:
    """The config of a server whose runs go to ``swarm`` (its manager as DOCKER_HOST), its timer
    ticking every ``tick`` seconds."""
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", swarm.image)
    monkeypatch.setenv("DOCKER_HOST", swarm.docker_host)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f"drain_interval_seconds = {tick}\n"
        f'[runtime]\nengine = "swarm"\ngateway_listen = "{swarm.host_address}:0"\n{extra}',
        encoding="utf-8",
    )


@contextlib.contextmanager
def _service() -> Iterator[Dispatcher]:
    """A started service on the configured swarm (see :func:`_use_swarm`), closed after the block."""
    settings, paths = load_settings()
    runtime = SwarmRuntime(placement=settings.runtime.placement, stop_grace=settings.runtime.stop_grace_seconds)
    svc = Dispatcher(settings, paths, runtime)
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def on_swarm(shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dispatcher]:
    _use_swarm(shared_swarm, isolated_home, monkeypatch, "[limits]\ntotal = 4\n")
    with _service() as svc:
        yield svc


def _most_at_once(svc: Dispatcher, names: set[str]) -> int:
    """The most runs of ``names`` running at once, from the server's events log (started, then an end)."""
    running = peak = 0
    for line in (svc.paths.events / "events.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["workspace"] not in names:
            continue
        if event["kind"] == "started":
            running += 1
        elif event["kind"] in {s.value for s in FINAL_STATUSES} and event.get("previous") == "running":
            running -= 1
        peak = max(peak, running)
    return peak


def _ours(swarm: engines.Swarm, svc: Dispatcher | None = None) -> list[dict[str, object]]:
    """The services of this test's root still on the swarm."""
    root = svc.paths.root_id if svc is not None else load_settings()[1].root_id
    return [s for s in swarm.services() if (s.get("Spec") or {}).get("Labels", {}).get(LABEL_ROOT) == root]  # type: ignore[union-attr, attr-defined]


def _nothing_left(swarm: engines.Swarm, svc: Dispatcher) -> None:
    """Wait until the swarm holds nothing of ``svc``'s runs: no service, no task in the manager, no
    container on a node (a run's container keeps its clone on the node's disk)."""
    root = svc.paths.root_id
    with contextlib.suppress(AssertionError):  # the assertion below says what is left
        wait_for(lambda: swarm.leftovers(LABEL_ROOT, root) == [], 30, "the runs' leftovers to be removed")
    assert swarm.leftovers(LABEL_ROOT, root) == []


def _table(svc: Dispatcher) -> str:
    out = io.StringIO()
    print_status(svc.status(), False, Console(file=out, width=300, highlight=False))
    return out.getvalue()


def test_six_shell_runs_with_total_4_all_complete_on_the_swarm_never_more_than_4_at_once_on_two_nodes_or_more(
    on_swarm: Dispatcher, shared_swarm: engines.Swarm, user_repo: Path
) -> None:
    svc = on_swarm
    names = []
    for i in range(6):
        task = f"echo {i} > run{i}.txt && git add run{i}.txt && git commit -qm 'run {i}' && sleep 2"
        names.append(svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell")).workspace)
    records = [svc.wait(name, 180) for name in names]
    for rec in records:
        assert rec.status == Status.COMPLETED, rec.reason
    assert _most_at_once(svc, set(names)) == 4
    nodes = {rec.node for rec in records}
    assert None not in nodes and nodes <= {n.hostname for n in shared_swarm.nodes}
    assert len(nodes) >= 2, f"every run went to {nodes}"
    table = _table(svc)
    for rec in records:
        assert f"[on {rec.node}]" in next(line for line in table.splitlines() if rec.name in line)
    for i, name in enumerate(names):
        report = svc.sync(name, wait=60)
        assert report.delivered == [name], report.message
        assert git(user_repo, "log", "-1", "--format=%s", records[i].branch) == f"run {i}"
    _nothing_left(shared_swarm, svc)


KEY = "sk-swarm-test-0123456789abcdef"


def test_a_runs_api_key_reaches_its_cli_through_a_swarm_secret_never_in_the_service_and_the_secret_goes_with_it(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    monkeypatch.setenv("TEST_API_KEY", KEY)
    _use_swarm(shared_swarm, isolated_home, monkeypatch, '[agents.shell]\nenv = ["TEST_API_KEY"]\n')
    api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
    try:
        with _service() as svc:
            # The CLI gets the key in its environment: it writes the key's hash (never the key) and waits.
            task = (
                'test -n "$TEST_API_KEY" && printf %s "$TEST_API_KEY" | sha256sum | cut -c1-64 > key.sha && '
                "git add key.sha && git commit -qm key && sleep 3"
            )
            res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
            wait_for(lambda: svc.record(res.workspace).status == Status.RUNNING, 60, "the run to start")
            service_id = svc.record(res.workspace).container_id
            assert service_id is not None
            described = json.dumps(api.inspect_service(service_id))
            assert KEY not in described
            secrets = api.secrets(filters={"label": f"{LABEL_ROOT}={svc.paths.root_id}"})
            assert len(secrets) == 1
            assert "TEST_API_KEY" not in described and "AGENTIC_TOKEN" not in described  # nor the gateway token
            rec = svc.wait(res.workspace, 120)
            assert rec.status == Status.COMPLETED, rec.reason
            expected = hashlib.sha256(KEY.encode()).hexdigest()
            assert git(svc.store.paths(res.workspace).repo, "show", f"{rec.branch}:key.sha") == expected
            wait_for(lambda: _ours(shared_swarm, svc) == [], 30, "the run's service to be removed")
            assert api.secrets(filters={"label": f"{LABEL_ROOT}={svc.paths.root_id}"}) == []
            written = [p for p in svc.paths.root.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
            assert written == [], "the key is in files the server wrote"
    finally:
        api.close()


def test_a_run_no_node_can_take_is_running_waiting_for_a_node_until_one_can(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    _use_swarm(shared_swarm, isolated_home, monkeypatch, 'placement = ["node.labels.agentic-test == yes"]\n')
    api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
    node = next(n for n in api.nodes() if n["Description"]["Hostname"] == "node2")
    try:
        with _service() as svc:
            task = "echo placed > placed.txt && git add placed.txt && git commit -qm placed"
            res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
            waits = lambda: "no suitable node" in (svc.record(res.workspace).placement or "")  # noqa: E731
            wait_for(waits, 60, "the run to say no node suits it")
            rec = svc.record(res.workspace)
            assert rec.status == Status.RUNNING and rec.node is None
            assert "waiting for a node: " in _table(svc)
            spec = dict(node["Spec"], Labels={**node["Spec"].get("Labels", {}), "agentic-test": "yes"})
            api.update_node(node["ID"], node["Version"]["Index"], spec)
            rec = svc.wait(res.workspace, 120)
            assert rec.status == Status.COMPLETED, rec.reason
            assert rec.node == "node2" and rec.placement is None
    finally:
        fresh = api.inspect_node(node["ID"])
        labels = {k: v for k, v in fresh["Spec"].get("Labels", {}).items() if k != "agentic-test"}
        api.update_node(node["ID"], fresh["Version"]["Index"], dict(fresh["Spec"], Labels=labels))
        api.close()


def test_a_worker_lost_mid_run_fails_its_runs_naming_the_node_while_the_others_complete_and_run_once(
    engine_template: engines.EngineTemplate, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    with engines.swarm(engine_template) as own, contextlib.ExitStack() as stack:
        # A timer that ticks once in ten minutes: the lost node is seen by the exit watcher, which wakes it.
        _use_swarm(own, isolated_home, monkeypatch, tick=600)
        svc = stack.enter_context(_service())
        names = []
        for i in range(3):
            # Long enough that all three are still running when the worker is lost.
            task = f"echo {i} > run{i}.txt && git add run{i}.txt && git commit -qm 'run {i}' && sleep 20"
            names.append(svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell")).workspace)
        placed: dict[str, str] = {}  # workspace -> node, as the swarm says (the server learns it at its tick)

        def all_placed() -> bool:
            placed.update(own.placement({n: str(svc.record(n).container_id) for n in names}))
            return len(placed) == len(names)

        wait_for(all_placed, 60, "every run to be placed")
        on_workers = [n for n in names if placed[n] != own.manager.hostname]
        assert on_workers, "the swarm placed every run on the manager"
        lost = own.node(placed[on_workers[0]])
        own.cut_off(lost)
        records = {n: svc.wait(n, 120) for n in names}
        for name, rec in records.items():
            assert rec.node == placed[name]
            if rec.node == lost.hostname:
                assert rec.status == Status.FAILED
                assert rec.reason is not None and f"the node {lost.hostname} it ran on is down" in rec.reason
            else:
                assert rec.status == Status.COMPLETED, rec.reason
        assert any(r.status == Status.COMPLETED for r in records.values()), "every run was on the lost node"
        wait_for(lambda: _ours(own, svc) == [], 30, "the runs' services to be removed")
        for name in names:  # each run started once: never a second task, never a second start
            started = [
                e
                for e in map(json.loads, (svc.paths.events / "events.jsonl").read_text(encoding="utf-8").splitlines())
                if e["workspace"] == name and e["kind"] == "started"
            ]
            assert len(started) == 1


def test_a_server_sigkilled_mid_run_and_restarted_finds_its_service_by_label_and_the_run_completes_with_no_orphan(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    # Port 0: the next server's gateway takes the port this one took, where the job looks. (A port
    # picked free beforehand could be taken, before the server binds it, by one of the many
    # connections the tests make from the same address to the nodes' engines.)
    _use_swarm(shared_swarm, isolated_home, monkeypatch)
    server = serve_process(dict(os.environ))
    task = "echo started; sleep 4; echo k > k.txt && git add k.txt && git commit -qm 'across a crash'"
    out = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", "dispatch", str(user_repo), task, "--agent", "shell", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    workspace = str(json.loads(out.stdout)["workspace"])
    store = StatusStore.of(load_settings()[1])
    log = store.paths(workspace).logs / "agent-shell.log"
    wait_for(lambda: log.exists() and "started" in log.read_text(encoding="utf-8"), 60, "the job to start")
    service_id = store.read(workspace).container_id
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    server = serve_process(dict(os.environ))
    try:
        wait_for(lambda: store.read(workspace).status != Status.RUNNING, 120, "the run to be settled")
        rec = store.read(workspace)
        assert rec.status == Status.COMPLETED, rec.reason
        assert rec.container_id == service_id  # the same job, adopted: never a second one
        assert rec.node in {n.hostname for n in shared_swarm.nodes}
        assert git(store.paths(workspace).repo, "log", "-1", "--format=%s", rec.branch) == "across a crash"
        wait_for(lambda: _ours(shared_swarm) == [], 30, "no ghost, no orphan service")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentic_dispatch", *args], capture_output=True, text=True)


def test_image_push_puts_the_image_in_the_registry_doctor_then_passes_and_a_run_uses_the_pushed_image(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    _use_swarm(shared_swarm, isolated_home, monkeypatch, 'placement = ["node.role == worker"]\n')
    with _service() as svc:
        report = svc.doctor(["shell"])
    assert not report.ok
    assert "is in no registry" in report.image and "image push" in report.image

    pushed = _cli("image", "push", shared_swarm.registry)
    assert pushed.returncode == 0, pushed.stderr
    name = pushed.stdout.strip()
    assert name == f"{shared_swarm.registry}/{shared_swarm.image}"
    assert f'set image = "{name}"' in pushed.stderr

    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", name)
    with _service() as svc:
        report = svc.doctor(["shell"])
        assert report.ok, report
        assert report.image == name
        task = "echo pulled > p.txt && git add p.txt && git commit -qm pulled"
        res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
        service_id = svc.record(res.workspace).container_id
        assert service_id is not None
        api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
        try:
            image = api.inspect_service(service_id)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        finally:
            api.close()
        assert image == name
        rec = svc.wait(res.workspace, 120)
        assert rec.status == Status.COMPLETED, rec.reason
        assert rec.node != shared_swarm.manager.hostname  # a worker pulled it: only the manager was pushed from

    # Only in the registry now, as on a manager that did not push it: a real CLI's dispatch is taken (its
    # CLI is checked where the image is), not refused as if the CLI did not run in an image not read here.
    api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
    try:
        api.remove_image(name)
    finally:
        api.close()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-registry-only")
    with _service() as svc:
        res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="say hello", agent="claude"))
        assert res.status in ("queued", "running"), res
        svc.cancel(res.workspace)
        svc.wait(res.workspace, 120)

    missing = f"{shared_swarm.registry}/agentic-dispatch-missing:1"
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", missing)
    with _service() as svc:
        report = svc.doctor(["shell"])
    assert not report.ok
    assert "not built" in report.agents[0].problems[0] or "cannot be found in its registry" in report.image


def test_a_job_the_swarm_cannot_run_fails_its_run_with_the_swarms_reason_and_the_node(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    only_here = "agentic-dispatch-only-on-the-manager:1"  # in no registry, on no worker
    manager = shared_swarm.manager.client()
    manager.api.tag(shared_swarm.image, *only_here.split(":"))
    _use_swarm(shared_swarm, isolated_home, monkeypatch, 'placement = ["node.role == worker"]\n')
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", only_here)
    try:
        with _service() as svc:
            res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="echo never", agent="shell"))
            rec = svc.wait(res.workspace, 120)
            assert rec.status == Status.FAILED
            assert rec.reason is not None and "the swarm could not run the job on node node" in rec.reason
            assert "No such image" in rec.reason
            wait_for(lambda: _ours(shared_swarm, svc) == [], 30, "the run's service to be removed")
    finally:
        manager.api.remove_image(only_here)


def test_a_swarm_run_that_runs_out_of_memory_fails_saying_so_not_as_stopped_from_outside(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    """A swarm's task status says only that the job was killed (exit 137); the job's cgroup says why, and
    agentic-run sends that back with the results. Without it the run read as stopped from outside (an
    infrastructure failure a retry policy would run again, out of memory again)."""
    _use_swarm(shared_swarm, isolated_home, monkeypatch, '[resources]\nmemory = "96m"\n')
    with _service() as svc:
        res = svc.dispatch(
            DispatchRequest(repo=str(user_repo), task='python3 -c "a = bytearray(400 << 20)"', agent="shell")
        )
        rec = svc.wait(res.workspace, 120)
        log = (svc.store.paths(res.workspace).logs / "agent-shell.log").read_text(encoding="utf-8")
    assert rec.status == Status.FAILED and rec.exit_code == 137, rec.reason
    assert rec.reason is not None and "killed for running out of memory" in rec.reason, rec.reason
    assert "from outside" not in rec.reason
    assert "the job ran out of memory" in log, log[-2000:]


# "replicated-job": what an earlier version made each run; a service of it can still be left behind.
@pytest.mark.parametrize("mode", ["replicated", "replicated-job"])
def test_services_and_secrets_of_this_root_that_no_record_knows_are_orphans_listed_and_removed_by_cleanup(
    on_swarm: Dispatcher, shared_swarm: engines.Swarm, mode: str
) -> None:
    svc = on_swarm
    labels = {LABEL_ROOT: svc.paths.root_id, LABEL_WORKSPACE: "local/nobody/w-gone", LABEL_RUN: "1"}
    api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
    try:
        task = docker.types.TaskTemplate(
            docker.types.ContainerSpec(shared_swarm.image, command=["sleep", "300"]),
            restart_policy=docker.types.RestartPolicy(condition="none"),
        )
        made = api.create_service(task, name="left-by-a-crash", labels=labels, mode=docker.types.ServiceMode(mode))
        secret = api.create_secret(
            name="left-by-a-crash-secret",  # pragma: allowlist secret (a name)
            data=b"{}",
            labels={**labels, LABEL_SECRET_OF: "gone"},  # pragma: allowlist secret (a label)
        )
        orphans = svc.orphans()
        assert any(o.startswith(made["ID"][:12]) and "left-by-a-crash " in o for o in orphans), orphans
        assert any("left-by-a-crash-secret" in o for o in orphans), orphans
        report = svc.cleanup()
        assert len(report.removed) == 2, report
        assert _ours(shared_swarm, svc) == []
        assert [s["ID"] for s in api.secrets(filters={"label": f"{LABEL_ROOT}={svc.paths.root_id}"})] == []
        assert secret["ID"] not in {s["ID"] for s in api.secrets()}
        assert svc.orphans() == []
        _nothing_left(shared_swarm, svc)
    finally:
        api.close()


@pytest.mark.parametrize(
    ("runtime", "said"),
    [
        ('engine = "swarm"\ntransfer = "mount"', "network transfer is implied"),
        ('placement = ["node.labels.agents == true"]', 'set engine = "swarm"'),
        ('engine = "swarm"\nplacement = ["agents"]', "placement"),
        ('engine = "kubernetes"', "engine"),
    ],
)
def test_a_swarm_setting_that_cannot_work_is_a_config_error_naming_it(
    isolated_home: Path, runtime: str, said: str
) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text(f"[runtime]\n{runtime}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert said in str(info.value)


def test_image_push_refuses_a_registry_given_as_a_url_with_exit_2_before_it_asks_any_engine() -> None:
    out = _cli("image", "push", "http://registry.lan:5000")
    assert out.returncode == 2
    assert "registry" in out.stderr and "http://registry.lan:5000" not in out.stdout


def test_a_real_claude_run_on_the_swarm_gets_its_key_from_the_runs_secret_and_completes(
    full_engine_template: engines.EngineTemplate,
    isolated_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    user_repo: Path,
) -> None:
    key = "sk-test-swarm-claude-key"
    with engines.swarm(full_engine_template, workers=1) as own, ModelServer(host=own.host_address) as model:
        model.script(
            [
                Shell("echo MIT > LICENCE.txt && git add LICENCE.txt && git commit -q -m 'Add the licence'"),
                Say("Added the licence."),
            ]
        )
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
        agent = (
            f'[agents.claude]\nbase_url = "http://{own.host_address}:{model.port}"\n'
            'model = "claude-sonnet-4-5"\nmax_retries = 0\n'
        )
        _use_swarm(own, isolated_home, monkeypatch)
        config = isolated_home / "config.toml"
        config.write_text(config.read_text(encoding="utf-8") + agent, encoding="utf-8")
        with _service() as svc:
            res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="Add a licence", agent="claude"))
            wait_for(lambda: svc.record(res.workspace).status != Status.QUEUED, 60, "the run to start")
            service_id = svc.record(res.workspace).container_id
            assert service_id is not None
            api = docker.APIClient(base_url=own.docker_host, version="1.41", timeout=30)
            try:
                with contextlib.suppress(docker.errors.NotFound):  # it may have ended already
                    assert key not in json.dumps(api.inspect_service(service_id))
            finally:
                api.close()
            rec = svc.wait(res.workspace, 240)
        assert rec.status == Status.COMPLETED, rec.reason
        assert git(svc.store.paths(rec.name).repo, "show", f"{rec.branch}:LICENCE.txt") == "MIT"
        assert model.model_requests, "the CLI never reached the model"
        assert all(key in str(r.headers) for r in model.model_requests), "the CLI did not send the key"
        assert model.errors == []


def test_a_cancelled_swarm_run_sends_its_uncommitted_work_back_as_a_checkpoint_and_its_service_goes(
    on_swarm: Dispatcher, shared_swarm: engines.Swarm, user_repo: Path
) -> None:
    svc = on_swarm
    task = "echo unsaved > unsaved.txt; echo ready; sleep 300"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    log = svc.store.paths(res.workspace).logs / "agent-shell.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(encoding="utf-8"), 60, "the agent to write its file")
    svc.cancel(res.workspace)
    rec = svc.wait(res.workspace, 60)
    assert rec.status == Status.CANCELLED
    assert rec.checkpoint is not None, rec.reason
    assert git(svc.store.paths(res.workspace).repo, "show", f"{rec.checkpoint.commit}:unsaved.txt") == "unsaved"
    _nothing_left(shared_swarm, svc)


def test_the_timeout_of_a_run_waiting_for_a_node_counts_and_ends_it_with_its_service(
    shared_swarm: engines.Swarm, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    _use_swarm(shared_swarm, isolated_home, monkeypatch, 'placement = ["node.labels.no-such-label == yes"]\n')
    with _service() as svc:
        res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="echo never", agent="shell", timeout_seconds=3))
        rec = svc.wait(res.workspace, 60)
        assert rec.status == Status.FAILED
        assert "timed out after 3 s" in (rec.reason or "")
        wait_for(lambda: _ours(shared_swarm, svc) == [], 30, "the run's service to be removed")


def test_listing_the_runs_while_one_ends_never_takes_its_removal_for_an_engine_fault(
    shared_swarm: engines.Swarm,
) -> None:
    """A service removed between the list of services and the list of their tasks (a run ending at
    that moment) makes the engine refuse the second look; that is not an engine that went away."""
    runtime = SwarmRuntime(docker_host=shared_swarm.docker_host)
    labels = {LABEL_ROOT: f"listing-{os.getpid()}"}
    api = docker.APIClient(base_url=shared_swarm.docker_host, version="1.41", timeout=30)
    done = threading.Event()
    churned: list[str] = []  # the services made and removed while the runs were listed

    def churn() -> None:
        spec = docker.types.TaskTemplate(docker.types.ContainerSpec(shared_swarm.image, command=["true"]))
        while not done.is_set():
            made = api.create_service(spec, labels=labels, mode=docker.types.ServiceMode("replicated", replicas=0))
            api.remove_service(made["ID"])
            churned.append(made["ID"])

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(300):
            runtime.list(labels)  # raises RuntimeUnavailableError on the refusal
    finally:
        done.set()
        worker.join(60)
        api.close()
        runtime.client.close()
    assert len(churned) >= 20, "too few services came and went to judge"
