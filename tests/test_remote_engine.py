"""Runs on an engine that does not share the server's disk: a Docker engine of the test's own in its
own network and mount namespaces (the temp dir, where every workspace lives, is empty there),
reached over TCP with TLS verified by its own CA (with a CA bundle in REQUESTS_CA_BUNDLE that does
not hold it), the whole agent image loaded. Runs default to network transfer there and go through a
run gateway over TLS at the host's end of the engine's veth pair."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git, wait_for
from .engines import RemoteEngine
from .model_server import ModelServer, Say, Shell

# docker-py leaves its socket to the garbage collector when connect() fails (the engine's start is
# probed until it answers): that ResourceWarning is docker-py's (see tests/test_runtime_faults.py).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket.socket fd=\d+, family=1:pytest.PytestUnraisableExceptionWarning",
    "ignore::ResourceWarning",
)


@pytest.fixture(autouse=True)
def _collect_docker_py_sockets() -> Iterator[None]:
    yield
    gc.collect()


def _config(engine: RemoteEngine, extra: str = "") -> str:
    cert, key = engine.tls.server("gateway")
    return (
        f'[runtime]\ngateway_listen = "{engine.host_address}:0"\n'
        f'[runtime.gateway_tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{engine.tls.ca}"\n{extra}'
    )


@pytest.fixture
def on_remote(
    remote_engine: RemoteEngine, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Dispatcher, RemoteEngine]]:
    """The service with the remote engine chosen the Docker way (DOCKER_HOST and its TLS variables)."""
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", remote_engine.image)
    monkeypatch.setenv("DOCKER_HOST", remote_engine.docker_host)
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    monkeypatch.setenv("DOCKER_CERT_PATH", str(remote_engine.tls.client_dir))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # a proxy's bundle: it must not replace the engine's CA
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(_config(remote_engine), encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime())
    svc.start()
    yield svc, remote_engine
    svc.close()


def _mounts(engine: RemoteEngine, container_id: str) -> list[Any]:
    client = engine.client()
    try:
        return list(client.api.inspect_container(container_id)["Mounts"])
    finally:
        client.close()


def test_a_run_on_an_engine_that_shares_no_disk_commits_completes_and_is_delivered_home(
    on_remote: tuple[Dispatcher, RemoteEngine], user_repo: Path
) -> None:
    svc, engine = on_remote
    assert not svc.runtime.local
    task = "echo remote > work.txt && git add work.txt && git commit -qm 'made remotely' && sleep 1"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    wait_for(lambda: svc.record(res.workspace).status != Status.QUEUED, 60, "the run to start")
    cid = svc.record(res.workspace).container_id
    assert cid is not None
    assert _mounts(engine, cid) == []
    rec = svc.wait(res.workspace, 180)
    assert rec.status == Status.COMPLETED, rec.reason
    report = svc.sync(res.workspace, wait=60)
    assert report.delivered == [res.workspace], report.message
    assert git(user_repo, "log", "-1", "--format=%s", rec.branch) == "made remotely"


def test_a_remote_run_that_exits_3_fails_with_exit_code_3(
    on_remote: tuple[Dispatcher, RemoteEngine], user_repo: Path
) -> None:
    svc, _ = on_remote
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="exit 3", agent="shell"))
    rec = svc.wait(res.workspace, 180)
    assert rec.status == Status.FAILED
    assert rec.exit_code == 3


def test_a_blocked_remote_run_is_answered_and_resumed(
    on_remote: tuple[Dispatcher, RemoteEngine], user_repo: Path
) -> None:
    svc, _ = on_remote
    task = (
        "if [ -f ANSWER.md ]; then cp ANSWER.md answer.txt && git add answer.txt && git commit -qm answered; "
        "else echo 'Which port?' > BLOCKED.md; fi"
    )
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 180)
    assert rec.status == Status.BLOCKED, rec.reason
    assert rec.question == "Which port?"
    svc.resume(res.workspace, answer="8080")
    rec = svc.wait(res.workspace, 180)
    assert rec.status == Status.COMPLETED, rec.reason
    assert git(svc.store.paths(res.workspace).repo, "show", f"{rec.branch}:answer.txt") == "8080"


def test_a_real_claude_run_on_the_remote_engine_resumes_its_own_session(
    remote_engine: RemoteEngine, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, user_repo: Path
) -> None:
    with ModelServer(host=remote_engine.host_address) as model:
        model.script([Shell("printf 'Which licence?' > BLOCKED.md"), Say("I am blocked on the licence.")])
        monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", remote_engine.image)
        monkeypatch.setenv("DOCKER_HOST", remote_engine.docker_host)
        monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
        monkeypatch.setenv("DOCKER_CERT_PATH", str(remote_engine.tls.client_dir))
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-remote-claude-key")
        isolated_home.mkdir(parents=True, exist_ok=True)
        agent = (
            f'[agents.claude]\nbase_url = "http://{remote_engine.host_address}:{model.port}"\n'
            'model = "claude-sonnet-4-5"\nmax_retries = 0\n'
        )
        (isolated_home / "config.toml").write_text(agent + _config(remote_engine), encoding="utf-8")
        settings, paths = load_settings()
        svc = Dispatcher(settings, paths, DockerRuntime())
        svc.start()
        try:
            res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="Add a licence", agent="claude"))
            blocked = svc.wait(res.workspace, 240)
            assert blocked.status == Status.BLOCKED, blocked.reason
            assert blocked.summary is not None and blocked.summary.session_id
            first_calls = len(model.model_requests)
            model.script(
                [
                    Shell("cp ANSWER.md LICENCE.txt && git add LICENCE.txt && git commit -q -m 'Add the licence'"),
                    Say("Added the licence."),
                ]
            )
            svc.resume(res.workspace, answer="MIT, please")
            final = svc.wait(res.workspace, 240)
        finally:
            svc.close()
        assert final.status == Status.COMPLETED, final.reason
        assert final.summary is not None
        assert final.summary.session_id == blocked.summary.session_id, "the resumed run started a new session"
        resumed = str(model.model_requests[first_calls].body)
        assert "I am blocked on the licence." in resumed  # the first run's turns came back with its home
        assert git(svc.store.paths(res.workspace).repo, "show", f"{final.branch}:LICENCE.txt") == "MIT, please"
        assert model.errors == []
