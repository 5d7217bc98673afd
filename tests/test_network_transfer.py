"""Runs with network transfer (``[runtime] transfer = "network"``) on the local engine: the container
mounts nothing of this disk, fetches its workspace through the run gateway and sends its results
back, and the workspace then holds what a mounted run leaves."""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.gateway.server import RunGateway
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

from .conftest import git, serve_process, wait_for

GATEWAY = (
    '[runtime]\ntransfer = "network"\ngateway_listen = "{address}:0"\ngateway_url = "http://host.docker.internal"\n'
)


def docker0_address(client: docker.DockerClient) -> str:
    """The host's address on the default bridge: what ``host.docker.internal`` is in a container."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    return str(config.get("Gateway") or "172.17.0.1")


@pytest.fixture
def networked(docker_env: str, docker_client: docker.DockerClient, isolated_home: Path) -> Iterator[Dispatcher]:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(GATEWAY.format(address=docker0_address(docker_client)), encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def test_a_network_run_commits_and_completes_with_no_bind_mount(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = networked
    task = "echo hello > work.txt && git add work.txt && git commit -qm 'agent work' && echo left > loose.txt"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 120)
    ws = svc.store.paths(res.workspace)
    print((ws.logs / "agent-shell.log").read_text())
    assert rec.status == Status.COMPLETED, rec.reason
    assert git(ws.repo, "log", "-1", "--format=%s", rec.branch) == "agent work"
    assert (ws.repo / "work.txt").read_text() == "hello\n"
    assert (ws.repo / "loose.txt").read_text() == "left\n"


def _wait_running(svc: Dispatcher, workspace: str) -> str:
    wait_for(lambda: svc.record(workspace).status == Status.RUNNING, 60, "the run to start")
    cid = svc.record(workspace).container_id
    assert cid is not None
    return cid


def _log(svc: Dispatcher, workspace: str) -> str:
    return (svc.store.paths(workspace).logs / "agent-shell.log").read_text(encoding="utf-8")


def test_a_network_run_mounts_nothing_and_its_branch_is_delivered_home(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = networked
    task = "echo hello > work.txt && git add work.txt && git commit -qm 'agent work' && sleep 2"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    cid = _wait_running(svc, res.workspace)
    assert docker_client.api.inspect_container(cid)["Mounts"] == []
    rec = svc.wait(res.workspace, 120)
    assert rec.status == Status.COMPLETED, rec.reason
    report = svc.sync(res.workspace, wait=60)
    assert report.delivered == [res.workspace], report.message
    assert git(user_repo, "log", "-1", "--format=%s", rec.branch) == "agent work"


def test_a_network_run_that_exits_3_fails_with_exit_code_3_and_its_log_came_back(
    networked: Dispatcher, user_repo: Path
) -> None:
    svc = networked
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="echo about to fail; exit 3", agent="shell"))
    rec = svc.wait(res.workspace, 120)
    assert rec.status == Status.FAILED
    assert rec.exit_code == 3
    assert "about to fail" in _log(svc, res.workspace)


def test_a_blocked_network_run_is_answered_and_resumed_with_its_work_tree(
    networked: Dispatcher, user_repo: Path
) -> None:
    svc = networked
    task = (
        "if [ -f ANSWER.md ]; then cat ANSWER.md > answer-seen.txt; git add -A; git commit -qm answered; "
        "else echo draft > draft.txt; echo 'Which colour?' > BLOCKED.md; fi"
    )
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 120)
    assert rec.status == Status.BLOCKED, rec.reason
    assert rec.question == "Which colour?"
    ws = svc.store.paths(res.workspace)
    assert (ws.repo / "draft.txt").read_text() == "draft\n"  # uncommitted work came back
    svc.resume(res.workspace, answer="blue")
    rec = svc.wait(res.workspace, 120)
    assert rec.status == Status.COMPLETED, rec.reason
    assert rec.runs == 2
    assert "blue" in git(ws.repo, "show", f"{rec.branch}:answer-seen.txt")
    assert git(ws.repo, "show", f"{rec.branch}:draft.txt") == "draft"  # the first run's draft travelled out again


def test_a_network_run_killed_before_it_sends_its_results_fails_saying_so_and_keeps_its_log(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    svc = networked
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task="echo started-work; sleep 300", agent="shell"))
    cid = _wait_running(svc, res.workspace)
    wait_for(lambda: "started-work" in _log(svc, res.workspace), 60, "the log to stream in")
    docker_client.api.kill(cid)  # SIGKILL: no chance to send anything
    rec = svc.wait(res.workspace, 60)
    assert rec.status == Status.FAILED
    assert "ended before its results came back" in (rec.reason or "")
    assert "started-work" in _log(svc, res.workspace)


def test_a_cancelled_network_run_sends_its_uncommitted_work_back_as_a_checkpoint(
    networked: Dispatcher, user_repo: Path
) -> None:
    svc = networked
    task = "echo unsaved > unsaved.txt; echo ready; sleep 300"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    _wait_running(svc, res.workspace)
    wait_for(lambda: "ready" in _log(svc, res.workspace), 60, "the agent to write its file")
    svc.cancel(res.workspace)
    rec = svc.wait(res.workspace, 60)
    assert rec.status == Status.CANCELLED
    assert rec.checkpoint is not None, rec.reason
    ws = svc.store.paths(res.workspace)
    assert git(ws.repo, "show", f"{rec.checkpoint.commit}:unsaved.txt") == "unsaved"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _job_done(client: docker.DockerClient, cid: str) -> bool:
    """The agent's job inside the container has finished (what agentic-run does next is sending back)."""
    try:
        return client.containers.get(cid).exec_run(["test", "-e", "/tmp/job-done"]).exit_code == 0
    except docker.errors.APIError:
        return True  # the container has already exited


def _server(home: Path, client: docker.DockerClient, port: int, extra: str = "") -> Dispatcher:
    config = GATEWAY.format(address=docker0_address(client)).replace(":0", f":{port}") + extra
    (home / "config.toml").write_text(config, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(client))
    svc.start()
    return svc


def test_a_network_run_whose_gateway_never_comes_back_fails_saying_so_and_keeps_its_log(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    port = _free_port(docker0_address(docker_client))
    first = _server(isolated_home, docker_client, port, "gateway_patience_seconds = 3\n")
    res = first.dispatch(DispatchRequest(repo=str(user_repo), task="echo early-output; sleep 3", agent="shell"))
    cid = _wait_running(first, res.workspace)
    wait_for(lambda: "early-output" in _log(first, res.workspace), 60, "the log to stream in")
    assert first.network is not None
    first.network.close()  # the gateway stops; the server goes on
    # no longer running, or already gone: the server goes on, so it settles the run and removes the container
    gave_up = {"id": cid, "status": "running"}
    wait_for(lambda: docker_client.api.containers(filters=gave_up) == [], 240, "the container to give up")
    rec = first.wait(res.workspace, 60)
    first.close()
    assert rec.status == Status.FAILED
    assert "ended before its results came back" in (rec.reason or "")
    assert "early-output" in _log(first, res.workspace)


class _DropFirstClone(socketserver.ThreadingTCPServer):
    """A TCP relay in front of the run gateway that closes, unanswered, the first connection asking for
    the clone's refs (what a server restarting between a run's inputs and its clone looks like to the
    container) and passes every other connection through untouched."""

    daemon_threads = True

    def __init__(self, host: str, upstream: tuple[str, int]) -> None:
        super().__init__((host, 0), _Relay)
        self.upstream = upstream
        self.port = int(self.server_address[1])
        self.dropped = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Relay(socketserver.BaseRequestHandler):
    server: _DropFirstClone

    def handle(self) -> None:
        try:
            first = self.request.recv(65536)
            if b"/git/info/refs" in first.split(b"\r\n", 1)[0] and not self.server.dropped.is_set():
                self.server.dropped.set()
                return  # closed unanswered once the handler returns
            with socket.create_connection(self.server.upstream) as up:
                up.sendall(first)
                back = threading.Thread(target=self._pump, args=(up, self.request), daemon=True)
                back.start()
                self._pump(self.request, up)
                back.join(60)
        except OSError:
            pass  # one side went away (the gateway closes with the test): the other sees the connection closed

    @staticmethod
    def _pump(src: socket.socket, dest: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dest.sendall(data)
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_a_network_run_whose_clone_is_cut_off_once_tries_again_and_completes(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    address = docker0_address(docker_client)
    port = _free_port(address)
    relay = _DropFirstClone(address, (address, port))
    config = GATEWAY.format(address=address).replace(":0", f":{port}")
    config = config.replace('"http://host.docker.internal"', f'"http://host.docker.internal:{relay.port}"')
    (isolated_home / "config.toml").write_text(config, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    try:
        task = "echo c > c.txt && git add c.txt && git commit -qm 'after a cut-off clone'"
        res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
        rec = svc.wait(res.workspace, 120)
        assert relay.dropped.is_set(), "the relay never saw the clone"
        assert rec.status == Status.COMPLETED, rec.reason
        repo = svc.store.paths(res.workspace).repo
        assert git(repo, "log", "-1", "--format=%s", rec.branch) == "after a cut-off clone"
        assert "the clone failed, trying again" in _log(svc, res.workspace)
    finally:
        svc.close()
        relay.close()


def test_the_qa_gate_of_a_network_run_fetches_the_branch_and_its_verdict_comes_back(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, tmp_path: Path
) -> None:
    from .test_qa import FIX_WHEN_ANSWERED, _python_repo

    isolated_home.mkdir(parents=True, exist_ok=True)
    config = GATEWAY.format(address=docker0_address(docker_client)) + "[qa]\nenabled = true\n"
    (isolated_home / "config.toml").write_text(config, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    try:
        repo = _python_repo(tmp_path, expected=3)
        res = svc.dispatch(DispatchRequest(repo=str(repo), task=FIX_WHEN_ANSWERED, agent="shell"))
        rec = svc.wait(res.workspace, 180)
        assert rec.status == Status.FAILED, rec.reason
        assert rec.qa is not None and rec.qa.state == "failed", rec.qa
        assert "1 failed, 1 passed" in (rec.qa.reason or ""), rec.qa
        svc.resume(res.workspace, answer="The test expects the wrong sum: fix it.")
        rec = svc.wait(res.workspace, 180)
        assert rec.status == Status.COMPLETED, rec.reason
        assert rec.qa is not None and rec.qa.state == "passed", rec.qa
    finally:
        svc.close()


def test_a_network_runs_token_is_not_in_the_agents_environment(networked: Dispatcher, user_repo: Path) -> None:
    svc = networked
    task = "env > seen-env.txt && git add seen-env.txt && git commit -qm env"
    res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = svc.wait(res.workspace, 120)
    assert rec.status == Status.COMPLETED, rec.reason
    seen = git(svc.store.paths(res.workspace).repo, "show", f"{rec.branch}:seen-env.txt")
    assert "AGENTIC_GATEWAY=" in seen  # it is the agent's environment
    assert "AGENTIC_TOKEN" not in seen


def test_a_network_run_survives_its_server_being_sigkilled_and_restarted_on_any_free_port(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path
) -> None:
    """With gateway_listen's port 0 (any free port), as the example config has it: the restarted server's
    gateway takes the port it took before, which the run's container still has in its environment."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    config = GATEWAY.format(address=docker0_address(docker_client))
    (isolated_home / "config.toml").write_text(f"drain_interval_seconds = 0.5\n{config}", encoding="utf-8")
    server = serve_process(dict(os.environ))
    task = "echo started; sleep 2; echo k > k.txt && git add k.txt && git commit -qm 'across a crash'"
    out = subprocess.run(
        [sys.executable, "-m", "agentic_dispatch", "dispatch", str(user_repo), f"{task}; touch /tmp/job-done",
         "--agent", "shell", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    workspace = str(json.loads(out.stdout)["workspace"])
    store = StatusStore.of(load_settings()[1])
    log = store.paths(workspace).logs / "agent-shell.log"
    wait_for(lambda: log.exists() and "started" in log.read_text(encoding="utf-8"), 60, "the job to start")
    cid = str(store.read(workspace).container_id)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    wait_for(lambda: _job_done(docker_client, cid), 60, "the job to finish while no server runs")
    server = serve_process(dict(os.environ))
    try:
        wait_for(lambda: store.read(workspace).status != Status.RUNNING, 120, "the run to be settled")
        rec = store.read(workspace)
        assert rec.status == Status.COMPLETED, rec.reason
        assert git(store.paths(workspace).repo, "log", "-1", "--format=%s", rec.branch) == "across a crash"
        # the plain listing: containers.list() inspects each, and the container may go in between
        wait_for(lambda: docker_client.api.containers(all=True, filters={"id": cid}) == [], 30, "no ghost")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_a_gateway_on_any_free_port_takes_the_same_port_after_a_restart_and_another_when_that_one_is_taken(
    isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(GATEWAY.format(address="127.0.0.1"), encoding="utf-8")
    settings, paths = load_settings()
    store = StatusStore.of(paths)

    def started() -> RunGateway:
        gateway = RunGateway(settings, store, paths.state)
        gateway.start()
        return gateway

    first = started()
    port = first.address.rpartition(":")[2]
    first.close()
    again = started()
    assert again.address == f"127.0.0.1:{port}" and again.url == f"http://host.docker.internal:{port}"
    # Someone else holds it while the server is down: another port, and the log says what that costs.
    again.close()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(port)))
        holder.listen()
        third = started()
        try:
            assert third.address != f"127.0.0.1:{port}"
        finally:
            third.close()
    assert "cannot take port" in caplog.text and "give gateway_listen a fixed port" in caplog.text


def _with_login(docker_client: docker.DockerClient, home: Path, login: Path) -> Dispatcher:
    """A started network-transfer service whose shell runs get ``login`` as a mounted login file (as Codex's
    auth.json is): on this machine it would be mounted read-write; a network run gets a copy."""
    home.mkdir(parents=True, exist_ok=True)
    files = f'[agents.shell]\nfiles = [{{source = "{login}", target = ".login/auth.json", mode = "mount"}}]\n'
    (home / "config.toml").write_text(GATEWAY.format(address=docker0_address(docker_client)) + files, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    return svc


def test_a_login_a_network_run_refreshed_goes_back_to_the_users_file_unless_the_user_changed_it_meanwhile(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Codex refreshes auth.json in place and the old refresh token then stops working: a network run's
    refreshed copy must reach the user's file, or the user (and the next run) is logged out."""
    login = tmp_path / "user-home" / "auth.json"
    login.parent.mkdir()
    login.write_text('{"token": "first"}\n', encoding="utf-8")
    refresh = 'grep -q first "$HOME/.login/auth.json" && echo \'{"token": "refreshed"}\' > "$HOME/.login/auth.json"'
    svc = _with_login(docker_client, isolated_home, login)
    try:
        rec = svc.wait(svc.dispatch(DispatchRequest(repo=str(user_repo), task=refresh, agent="shell")).workspace, 120)
        assert rec.status == Status.COMPLETED, rec.reason
        assert login.read_text(encoding="utf-8") == '{"token": "refreshed"}\n'

        # The user logs in again on this machine while a run holds a copy: the run's refresh must not undo it.
        held = "until [ -e /tmp/go ]; do sleep 0.1; done; " + refresh.replace("first", "refreshed").replace(
            '"refreshed"}', '"refreshed twice"}'
        )
        res = svc.dispatch(DispatchRequest(repo=str(user_repo), task=held, agent="shell"))
        cid = _wait_running(svc, res.workspace)
        login.write_text('{"token": "logged in again"}\n', encoding="utf-8")
        docker_client.containers.get(cid).exec_run(["touch", "/tmp/go"])
        rec = svc.wait(res.workspace, 120)
        assert rec.status == Status.COMPLETED, rec.reason
        assert login.read_text(encoding="utf-8") == '{"token": "logged in again"}\n'
        assert "is not given back" in caplog.text and "changed while the run had a copy" in caplog.text
    finally:
        svc.close()


def test_a_second_server_of_the_root_shares_the_gateway_and_takes_the_results_of_a_run_the_first_started(
    docker_env: str, docker_client: docker.DockerClient, isolated_home: Path, user_repo: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    patience = "gateway_patience_seconds = 5\n"  # no other server at the run's address: it gives up soon
    first = _server(isolated_home, docker_client, 0, patience)
    second = _server(isolated_home, docker_client, 0, patience)
    try:
        assert first.network is not None and second.network is not None
        assert second.network.gateway.url == first.network.gateway.url  # one port, both listening
        task = "echo work > work.txt && git add work.txt && git commit -qm 'agent work'; echo waiting; "
        task += "until [ -e /tmp/go ]; do sleep 0.1; done"
        res = first.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
        cid = _wait_running(first, res.workspace)
        # the job runs (its inputs and clone came through the first server's gateway) and its log streams
        wait_for(lambda: "waiting" in _log(first, res.workspace), 60, "the job to run")
        first.close()  # the server that started the run stops; its run goes on
        assert docker_client.containers.get(cid).exec_run(["touch", "/tmp/go"]).exit_code == 0
        rec = second.wait(res.workspace, 120)
        assert rec.status == Status.COMPLETED, rec.reason
        assert git(second.store.paths(res.workspace).repo, "log", "-1", "--format=%s", rec.branch) == "agent work"
    finally:
        first.close()
        second.close()


def test_a_server_of_another_root_is_refused_the_gateway_port_this_root_holds(
    docker_env: str, docker_client: docker.DockerClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port(docker0_address(docker_client))
    homes = [tmp_path / "root-a", tmp_path / "root-b"]
    servers = []
    try:
        for home in homes:
            home.mkdir()
            monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home))
            if home == homes[0]:
                servers.append(_server(home, docker_client, port))
                continue
            with pytest.raises(OSError, match=rf"port {port} is the run gateway of another root \(.*root-a"):
                servers.append(_server(home, docker_client, port))
        monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(homes[0]))
        servers.append(_server(homes[0], docker_client, port))  # its own root's second server shares it
    finally:
        for svc in servers:
            svc.close()
    assert len(servers) == 2


def test_a_server_that_cannot_claim_its_gateway_port_still_listens_alone(
    docker_env: str,
    docker_client: docker.DockerClient,
    isolated_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))  # where the claims would go: cannot be made
    port = _free_port(docker0_address(docker_client))
    svc = _server(isolated_home, docker_client, port)
    try:
        assert svc.network is not None and svc.network.gateway.address.endswith(f":{port}")
        assert "does not share its port" in caplog.text
        with pytest.raises(OSError):  # alone on it: not even this root's second server joins
            _server(isolated_home, docker_client, port)
    finally:
        svc.close()
