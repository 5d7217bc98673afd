"""Faults at the container-engine boundary, reproduced on a real engine of the test's own
(tests/engines.py) that the test stops, kills or freezes: whatever the engine does, the runtime
answers with the project's own errors, promptly, logs an outage once, and leaves no container
behind when a start fails half-way."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from agentic_dispatch.errors import LaunchError, RuntimeUnavailableError
from agentic_dispatch.runtime.base import ContainerSpec, ExitEvent
from agentic_dispatch.runtime.docker import DockerRuntime

from .conftest import wait_for
from .engines import NETNS_DIR, EngineTemplate, SecondEngine, second_engine

# Far above the runtime's own bound on an ordinary call, well below docker-py's 60 s default:
# a call still blocked after this long is one the bound did not cover.
WAIT_BOUND = 30.0
LABELS = {"agentic-dispatch.test": "runtime-faults"}
RUNTIME_LOGGER = "agentic_dispatch.runtime.docker"

Call = Callable[[DockerRuntime, str, str], object]

# docker-py's unix-socket connection leaves its socket to the garbage collector when connect()
# fails (an engine that is gone): a ResourceWarning about that socket is docker-py's, not ours.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket fd=\d+, family=1:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def _collect_docker_py_sockets() -> Iterator[None]:
    """Those sockets hang in reference cycles (exception, traceback, frame) until a collection:
    collect them while this module's filter applies, not in whichever test runs next."""
    yield
    gc.collect()


# The calls that must answer promptly (on a short bound) whatever the engine does.
ORDINARY_CALLS: dict[str, Call] = {
    "check": lambda rt, cid, image: rt.check(),
    "image_exists": lambda rt, cid, image: rt.image_exists(image),
    "image_id": lambda rt, cid, image: rt.image_id(image),
    "image_labels": lambda rt, cid, image: rt.image_labels(image),
    "image_meta": lambda rt, cid, image: rt.image_meta(image),
    "inspect": lambda rt, cid, image: rt.inspect(cid),
    "list": lambda rt, cid, image: rt.list(LABELS),
    "stop": lambda rt, cid, image: rt.stop(cid, timeout=2),
    "remove": lambda rt, cid, image: rt.remove(cid),
}
# Calls that may take long on a healthy engine (a start, a throw-away run): not bounded short,
# but an engine that is gone still makes them raise the project's error.
LONG_CALLS: dict[str, Call] = {
    "start": lambda rt, cid, image: rt.start(sleeper(image, "second")),
    "run_once": lambda rt, cid, image: rt.run_once(image, ["true"]),
}


def sleeper(image: str, name: str, **overrides: object) -> ContainerSpec:
    spec: dict[str, object] = {
        "image": image,
        "command": ["sleep", "300"],
        "name": f"faults-{name}",
        "workdir": "/workspace",
        "user": "1000:1000",
        "labels": LABELS,
    }
    spec.update(overrides)
    return ContainerSpec(**spec)  # type: ignore[arg-type]


def runtime_on(engine: SecondEngine) -> DockerRuntime:
    """A runtime over a client built as the server builds one (docker-py's 60 s timeout)."""
    return DockerRuntime(engine.client(timeout=60))


def outcome_of(call: Call, rt: DockerRuntime, cid: str, image: str) -> str:
    """The name of what ``call`` raised, or ``returned``."""
    try:
        call(rt, cid, image)
    except Exception as e:
        return type(e).__name__
    return "returned"


def outcomes_in_threads(calls: dict[str, Call], rt: DockerRuntime, cid: str, image: str) -> dict[str, str]:
    """Every call at once, each on its own thread; a call not finished after WAIT_BOUND is ``still blocked``."""
    results: dict[str, str] = {}
    threads = {
        name: threading.Thread(target=lambda n=name, c=call: results.__setitem__(n, outcome_of(c, rt, cid, image)))
        for name, call in calls.items()
    }
    for t in threads.values():
        t.daemon = True  # a call the bound did not cover must not hold up the test run's exit
        t.start()
    deadline = time.monotonic() + WAIT_BOUND  # one bound for all: they run at the same time
    for t in threads.values():
        t.join(max(0.0, deadline - time.monotonic()))
    return {name: results.get(name, "still blocked") for name in calls}


def all_raise(names: dict[str, Call] | list[str], error: type[Exception]) -> dict[str, str]:
    return dict.fromkeys(names, error.__name__)


# -- an engine that is gone -----------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_every_runtime_call_on_an_engine_that_is_gone_raises_runtime_unavailable_error(
    second_engine: SecondEngine, how: str
) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    cid = rt.start(sleeper(second_engine.image, "first"))
    # stopped: the socket file is gone (no such file); killed: it stays, nobody listens (refused)
    second_engine.stop() if how == "stopped" else second_engine.kill()

    calls = {**ORDINARY_CALLS, **LONG_CALLS}
    outcomes = {name: outcome_of(call, rt, cid, second_engine.image) for name, call in calls.items()}

    assert outcomes == all_raise(calls, RuntimeUnavailableError)


@pytest.mark.docker
def test_ordinary_runtime_calls_on_a_frozen_engine_raise_runtime_unavailable_error_within_their_bound(
    second_engine: SecondEngine,
) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    cid = rt.start(sleeper(second_engine.image, "first"))

    with second_engine.frozen():
        outcomes = outcomes_in_threads(ORDINARY_CALLS, rt, cid, second_engine.image)

    assert outcomes == all_raise(ORDINARY_CALLS, RuntimeUnavailableError)


@pytest.mark.docker
def test_the_same_runtime_answers_again_once_a_frozen_or_stopped_engine_is_back(second_engine: SecondEngine) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    cid = rt.start(sleeper(second_engine.image, "first"))
    with second_engine.frozen(), pytest.raises(RuntimeUnavailableError):
        rt.inspect(cid)
    info = rt.inspect(cid)
    assert info is not None and info.running

    second_engine.stop()
    with pytest.raises(RuntimeUnavailableError):
        rt.list(LABELS)
    second_engine.start()

    # Started again on the same data root: the container is still there (stopped with the engine).
    assert [c.id for c in rt.list(LABELS)] == [cid]
    info = rt.inspect(cid)
    assert info is not None and not info.running
    rt.remove(cid)
    assert rt.inspect(cid) is None


# -- a container the engine refuses ---------------------------------------------------------
@pytest.mark.docker
def test_a_container_whose_start_fails_after_it_was_created_is_removed_and_the_error_is_a_launch_error(
    second_engine: SecondEngine,
) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    # The engine accepts this container (create) and fails it at start: the user is looked up then.
    spec = sleeper(second_engine.image, "no-user", user="no-such-user")

    with pytest.raises(LaunchError, match="no-such-user"):
        rt.start(spec)

    left = second_engine.client().containers.list(all=True)
    assert [(c.name, c.status) for c in left] == []


@pytest.mark.docker
def test_a_start_refused_at_create_is_a_launch_error_and_leaves_the_engine_usable(second_engine: SecondEngine) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    rt.start(sleeper(second_engine.image, "taken"))

    with pytest.raises(LaunchError):
        rt.start(sleeper(second_engine.image, "taken"))  # the name is in use

    assert [c.name for c in rt.list(LABELS)] == ["faults-taken"]


# -- logging -------------------------------------------------------------------------------
@pytest.mark.docker
def test_an_engine_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
    second_engine: SecondEngine, caplog: pytest.LogCaptureFixture
) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    cid = rt.start(sleeper(second_engine.image, "first"))
    caplog.set_level(logging.INFO, logger=RUNTIME_LOGGER)
    second_engine.stop()

    for _ in range(5):  # a drain tick, the timer, status, ... each ask the engine
        with pytest.raises(RuntimeUnavailableError):
            rt.inspect(cid)
        with pytest.raises(RuntimeUnavailableError):
            rt.list(LABELS)
    second_engine.start()
    rt.list(LABELS)
    rt.inspect(cid)

    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == RUNTIME_LOGGER]
    assert [level for level, _ in records] == ["WARNING", "INFO"], records
    assert not any(r.exc_info for r in caplog.records if r.name == RUNTIME_LOGGER)


@pytest.mark.docker
def test_the_exit_watcher_logs_an_outage_once_and_reports_exits_again_when_the_engine_is_back(
    second_engine: SecondEngine, caplog: pytest.LogCaptureFixture
) -> None:
    assert second_engine.image
    rt = runtime_on(second_engine)
    caplog.set_level(logging.DEBUG, logger=RUNTIME_LOGGER)
    exits: list[ExitEvent] = []
    stop = threading.Event()
    watcher = threading.Thread(target=rt.watch_exits, args=(LABELS, exits.append, stop), daemon=True)
    watcher.start()
    try:
        second_engine.stop()

        def retries() -> int:
            return sum(1 for r in caplog.records if r.name == RUNTIME_LOGGER and r.levelno == logging.DEBUG)

        wait_for(lambda: retries() >= 3, WAIT_BOUND, "the watcher to retry the engine three times")
        second_engine.start()
        cid = rt.start(sleeper(second_engine.image, "exits", command=["sh", "-c", "exit 3"]))
        wait_for(lambda: any(e.container_id == cid for e in exits), WAIT_BOUND, "the exit of the new container")
    finally:
        stop.set()
        watcher.join(WAIT_BOUND)
    assert not watcher.is_alive()

    assert [e.exit_code for e in exits if e.container_id == cid] == [3]
    loud = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == RUNTIME_LOGGER and r.levelno > logging.DEBUG
    ]
    assert [level for level, _ in loud] == ["WARNING", "INFO"], loud


# -- the fixture itself ----------------------------------------------------------------------
class LeftInState(Exception):
    """The test body failed: the engine must be torn down anyway."""


@pytest.mark.docker
@pytest.mark.parametrize("state", ["running", "frozen", "killed", "stopped"])
def test_a_second_engine_leaves_nothing_behind_whatever_state_a_failing_test_left_it_in(
    engine_template: EngineTemplate, state: str
) -> None:
    with pytest.raises(LeftInState), second_engine(engine_template) as engine:
        name, directory = engine.name, engine.dir
        client = engine.client()
        container = client.containers.run(engine.image, ["sleep", "300"], detach=True, init=True)
        container.reload()
        pids = [engine.pid, container.attrs["State"]["Pid"]]
        {"running": lambda: None, "frozen": engine.freeze, "killed": engine.kill, "stopped": engine.stop}[state]()
        raise LeftInState(state)

    assert not (NETNS_DIR / name).exists()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not directory.exists()
    assert str(directory) not in Path("/proc/self/mountinfo").read_text(encoding="utf-8")
    assert not any((hierarchy / name).exists() for hierarchy in Path("/sys/fs/cgroup").iterdir())
    assert [p for p in pids if p and _running(p)] == []


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split(") ")[-1][:1] != "Z"


@pytest.mark.docker
def test_a_second_engine_killed_and_torn_down_leaves_the_main_engine_and_its_bridge_working(
    engine_template: EngineTemplate, docker_client: docker.DockerClient, agent_image: str
) -> None:
    with second_engine(engine_template) as engine:
        engine.client().containers.run(engine.image, ["true"], remove=True)
        engine.kill()

    # A dockerd in the host's namespace could have taken docker0 away: the main engine still starts one.
    assert docker_client.containers.run(agent_image, ["true"], remove=True, network_mode="bridge") == b""
