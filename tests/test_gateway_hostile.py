"""The run gateway faces a hostile run: its token opens only its own workspace and run, a push of
any other ref is refused, an upload with paths out of place or past the size cap is refused with
nothing written outside the workspace, and a finished run's token opens nothing."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx2
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher

from .conftest import git, wait_for
from .test_network_transfer import GATEWAY, docker0_address

CAP = 3_000_000


@pytest.fixture
def networked(docker_env: str, docker_client: docker.DockerClient, isolated_home: Path) -> Iterator[Dispatcher]:
    isolated_home.mkdir(parents=True, exist_ok=True)
    config = GATEWAY.format(address=docker0_address(docker_client)) + f"\n[resources]\nworkspace_max_bytes = {CAP}\n"
    (isolated_home / "config.toml").write_text(config, encoding="utf-8")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    svc.start()
    yield svc
    svc.close()


def _running(svc: Dispatcher, docker_client: docker.DockerClient, repo: Path) -> tuple[str, str, str]:
    """A running network run: (workspace, its gateway URL, its token), read as the agent reads them."""
    res = svc.dispatch(DispatchRequest(repo=str(repo), task="sleep 300", agent="shell"))
    wait_for(lambda: svc.record(res.workspace).status == Status.RUNNING, 60, "the run to start")
    cid = svc.record(res.workspace).container_id
    env = dict(e.split("=", 1) for e in docker_client.api.inspect_container(cid)["Config"]["Env"])
    # The container reaches the gateway by the host's name for it; this test, on the host, by its address.
    url = env["AGENTIC_GATEWAY"].replace("host.docker.internal", docker0_address(docker_client))
    return res.workspace, url, env["AGENTIC_TOKEN"]


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_a_token_opens_its_own_workspace_only_and_nothing_without_one(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    a, url_a, token_a = _running(networked, docker_client, user_repo)
    b, url_b, token_b = _running(networked, docker_client, user_repo)
    auth = {"Authorization": f"Bearer {token_a}"}
    assert httpx2.get(f"{url_a}/inputs", headers=auth, timeout=30).status_code == 200
    assert httpx2.get(f"{url_b}/inputs", headers=auth, timeout=30).status_code == 401
    assert httpx2.get(f"{url_b}/inputs", timeout=30).status_code == 401
    assert httpx2.get(f"{url_b}/git/info/refs?service=git-upload-pack", headers=auth, timeout=30).status_code == 401
    networked.cancel(a)
    networked.wait(a, 60)
    assert httpx2.get(f"{url_a}/inputs", headers=auth, timeout=30).status_code == 403  # the run is over
    assert b and token_b


def test_a_push_of_another_ref_or_a_deletion_is_refused(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path, tmp_path: Path
) -> None:
    workspace, url, token = _running(networked, docker_client, user_repo)
    branch = networked.record(workspace).branch
    clone = tmp_path / "agent-clone"
    header = ["-c", f"http.extraHeader=Authorization: Bearer {token}"]
    subprocess.run(["git", *header, "clone", "-q", f"{url}/git", str(clone)], check=True)
    git(clone, "commit", "-q", "--allow-empty", "-m", "sneaky")
    repo = networked.store.paths(workspace).repo
    refs_before = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    for refspec in ("HEAD:refs/heads/main", "HEAD:refs/tags/v1", f":refs/heads/{branch}"):
        pushed = subprocess.run(["git", *header, "-C", str(clone), "push", f"{url}/git", refspec], capture_output=True)
        assert pushed.returncode != 0, refspec
    assert git(repo, "for-each-ref", "--format=%(refname) %(objectname)") == refs_before  # not one ref moved
    # its own branch it may push
    done = subprocess.run(["git", *header, "-C", str(clone), "push", f"{url}/git", f"HEAD:refs/heads/{branch}"])
    assert done.returncode == 0
    assert git(repo, "log", "-1", "--format=%s", branch) == "sneaky"


@pytest.mark.parametrize(
    ("entries", "data"),
    [
        ([_file("tree/../../escaped.txt")], {"tree/../../escaped.txt": b"x"}),
        ([_file("/tmp/escaped-abs.txt")], {"/tmp/escaped-abs.txt": b"x"}),
        ([_link("tree/out", "../../../../escaped-link")], {}),
        ([_link("home/out", "/etc")], {}),
        ([_file("elsewhere/x.txt")], {"elsewhere/x.txt": b"x"}),
    ],
    ids=["dotdot", "absolute", "link-out-of-tree", "absolute-link", "unknown-part"],
)
def test_an_upload_with_paths_out_of_place_is_refused_and_writes_nothing(
    networked: Dispatcher,
    docker_client: docker.DockerClient,
    user_repo: Path,
    entries: list[tarfile.TarInfo],
    data: dict[str, bytes],
) -> None:
    workspace, url, token = _running(networked, docker_client, user_repo)
    ws = networked.store.paths(workspace)
    before = sorted(str(p) for p in ws.dir.parent.rglob("*") if ".git" not in p.parts)
    body = _tar([_file("meta.json"), *entries], {"meta.json": b'{"exit_code": 0}', **data})
    answer = httpx2.post(f"{url}/results", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 400, answer.text
    after = sorted(str(p) for p in ws.dir.parent.rglob("*") if ".git" not in p.parts and "transfer" not in p.parts)
    assert [p for p in after if p not in before] == []
    assert not any(Path(p).name.startswith("escaped") for p in after)
    assert not Path("/tmp/escaped-abs.txt").exists()
    # answered once: a retry is not applied either
    again = httpx2.post(f"{url}/results", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert again.status_code == 200 and again.json() == {"applied": False}


def test_an_upload_of_twice_the_size_cap_is_refused(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    workspace, url, token = _running(networked, docker_client, user_repo)
    big = os.urandom(2 * CAP)  # random: it does not compress below the cap
    body = _tar([_file("meta.json"), _file("tree/big.bin")], {"meta.json": b"{}", "tree/big.bin": big})
    answer = httpx2.post(f"{url}/results", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 413
    assert not (networked.store.paths(workspace).repo / "big.bin").exists()


def test_an_upload_cut_off_midway_is_not_applied_and_the_next_whole_one_is(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    workspace, url, token = _running(networked, docker_client, user_repo)
    parts = urlsplit(f"{url}/results")
    body = _tar([_file("meta.json"), _file("tree/kept.txt")], {"meta.json": b'{"exit_code": 0}', "tree/kept.txt": b"k"})
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode() + body[: len(body) // 2])  # and the connection breaks
    answer = httpx2.post(f"{url}/results", content=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"applied": True}, answer.text
    assert (networked.store.paths(workspace).repo / "kept.txt").read_text() == "k"


def test_the_inputs_are_packed_under_the_workspaces_lock_as_results_are_applied(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path
) -> None:
    """Packing the inputs runs git status in the clone, which writes its index: beside a results upload's
    git reset it left index.lock in the other's way (a 503 seen in CI). Both now hold the workspace's lock."""
    workspace, url, token = _running(networked, docker_client, user_repo)
    got: list[httpx2.Response] = []
    fetch = threading.Thread(
        target=lambda: got.append(httpx2.get(f"{url}/inputs", headers={"Authorization": f"Bearer {token}"}, timeout=60))
    )
    with networked.store.locked(workspace):
        fetch.start()
        fetch.join(2)  # bounded: it must still wait for the lock
        assert fetch.is_alive() and got == []
    fetch.join(60)
    assert [r.status_code for r in got] == [200]


def test_git_request_bodies_sent_chunked_or_gzipped_reach_git_whole(
    networked: Dispatcher, docker_client: docker.DockerClient, user_repo: Path, tmp_path: Path
) -> None:
    """git sends a push larger than its post buffer (1 MiB) chunked, and a fetch's negotiation larger
    than 1 KiB gzipped; the gateway de-chunks and unzips both for git (git's own trace shows it sent them so)."""
    workspace, url, token = _running(networked, docker_client, user_repo)
    branch = networked.record(workspace).branch
    repo = networked.store.paths(workspace).repo
    clone = tmp_path / "agent-clone"
    header = ["-c", f"http.extraHeader=Authorization: Bearer {token}"]
    trace = tmp_path / "curl-trace"
    traced = {**os.environ, "GIT_TRACE_CURL": str(trace), "GIT_TRACE_CURL_NO_DATA": "1"}
    subprocess.run(["git", *header, "clone", "-q", f"{url}/git", str(clone)], check=True)

    (clone / "big.bin").write_bytes(os.urandom(1_500_000))  # random: its pack stays over 1 MiB
    git(clone, "add", "big.bin")
    git(clone, "commit", "-qm", "big")
    push = ["git", *header, "-C", str(clone), "push", f"{url}/git", f"HEAD:refs/heads/{branch}"]
    pushed = subprocess.run(push, env=traced, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    assert "Transfer-Encoding: chunked" in trace.read_text(errors="replace")
    assert git(repo, "rev-parse", branch) == git(clone, "rev-parse", "HEAD")

    for i in range(150):  # commits the gateway's clone lacks: each is a "have" the fetch sends
        git(clone, "commit", "-q", "--allow-empty", "-m", f"local {i}")
    git(repo, "commit", "-q", "--allow-empty", "-m", "moved on")  # a commit to want
    trace.unlink()
    fetch = ["git", *header, "-C", str(clone), "fetch", "-q", f"{url}/git", branch]
    fetched = subprocess.run(fetch, env=traced, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    assert "Content-Encoding: gzip" in trace.read_text(errors="replace")
    assert git(clone, "log", "-1", "--format=%s", "FETCH_HEAD") == "moved on"
