"""Sync: the outbox, branch delivery with real git (file://, smart HTTP through `git http-backend`,
a local repository) and record delivery to a real HTTP listener. Nothing is mocked: time is
passed to the outbox as ``now`` where a schedule is checked, and threads wait on events."""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agentic_dispatch.config import SyncSettings, load_settings
from agentic_dispatch.errors import ConfigError
from agentic_dispatch.models import Delivery, Status, WorkspaceRecord
from agentic_dispatch.sync import (
    GitDeliverer,
    Outbox,
    OutboxEntry,
    Outcome,
    RecordPoster,
    entry_id,
    record_payload,
    retry_after_seconds,
    review_url,
    view_commands,
)

from .conftest import Endpoint, empty_git_home, read_body

WS = "org/proj/task-1"
BRANCH = "agent/task-1"
WAIT = 20.0  # upper bound of every wait on another thread or process


# ---------------------------------------------------------------------------------------------
# git helpers


@pytest.fixture(autouse=True)
def git_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty git home (no user config, no system config) and a fixed identity for test commits."""
    home = empty_git_home(tmp_path, monkeypatch)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return home


def git(cwd: Path, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, input=stdin)
    return done.stdout.decode().strip()


def refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    return dict(line.split(" ", 1) for line in out.splitlines()) if out else {}


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text, encoding="utf-8")
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"change {name}")
    return git(repo, "rev-parse", "HEAD")


def bare_origin(tmp_path: Path, name: str = "origin.git") -> Path:
    """A bare repository with one commit on main."""
    origin = tmp_path / "served" / name
    origin.parent.mkdir(exist_ok=True)
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    seed = tmp_path / f"seed-{name}"
    git(tmp_path, "clone", "-q", str(origin), str(seed))
    git(seed, "checkout", "-q", "-b", "main")
    commit(seed, "README.md", "hello\n")
    git(seed, "push", "-q", "origin", "main")
    return origin


def agent_clone(tmp_path: Path, source: str, with_commit: bool = True) -> tuple[Path, str]:
    """A workspace clone of ``source`` with the agent's branch (and, by default, one new commit on it)."""
    clone = tmp_path / "workspace" / "repo"
    git(tmp_path, "clone", "-q", source, str(clone))
    git(clone, "checkout", "-q", "-b", BRANCH)
    tip = commit(clone, "work.txt", "the agent's work\n") if with_commit else git(clone, "rev-parse", "HEAD")
    return clone, tip


def record(repo: str, origin_url: str, runs: int = 1) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=WS,
        status=Status.COMPLETED,
        agent="shell",
        repo=repo,
        org="org",
        repo_name="proj",
        origin_url=origin_url,
        task="do the work",
        branch=BRANCH,
        base_branch="main",
        template="coding",
        timeout_seconds=60,
        runs=runs,
        exit_code=0,
        started_at="2025-01-01T00:00:00Z",
        finished_at="2025-01-01T00:05:00Z",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# a smart-HTTP git server: `git http-backend` behind http.server


@dataclass
class GitHttp:
    root: Path
    fail_with: list[int] = field(default_factory=list)  # statuses answered to the next requests
    requests: list[str] = field(default_factory=list)


def _git_http_handler(state: GitHttp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._cgi()

        def do_POST(self) -> None:
            self._cgi()

        def _cgi(self) -> None:
            state.requests.append(f"{self.command} {self.path}")
            body = read_body(self)
            if state.fail_with:
                self.send_error(state.fail_with.pop(0))
                return
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ["PATH"],
                "HOME": os.environ["HOME"],
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_PROJECT_ROOT": str(state.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REMOTE_USER": "tester",
                "REMOTE_ADDR": "127.0.0.1",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
            }
            if self.headers.get("Content-Encoding"):
                env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode("latin-1").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def git_http(tmp_path: Path) -> Iterator[tuple[str, GitHttp]]:
    """Smart HTTP over the repositories in ``tmp_path/served`` (push allowed): (base URL, state)."""
    state = GitHttp(tmp_path / "served")
    state.root.mkdir(exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _git_http_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def sync_settings(ep: Endpoint | None = None, **kw: Any) -> SyncSettings:
    values: dict[str, Any] = {"backoff_seconds": (0.5, 1.0, 2.0), "token_env": "TEST_SYNC_TOKEN", **kw}
    if ep is not None:
        values["endpoint"] = ep.url
    return SyncSettings.model_validate(values)


def poster(settings: SyncSettings, token: str | None = "s3cret") -> RecordPoster:
    return RecordPoster(settings, environ={"TEST_SYNC_TOKEN": token} if token else {})


def enqueue_record(box: Outbox, runs: int = 1, now: float = 1000.0) -> str:
    rec = record("org/proj", "https://example.invalid/org/proj.git", runs=runs)
    box.enqueue(WS, runs, "record", payload=record_payload(rec, "test-agent"), now=now)
    return entry_id(WS, runs, "record")


# ---------------------------------------------------------------------------------------------
# branch delivery: where it goes


def test_the_branch_reaches_a_bare_origin_over_file_url_and_nothing_else_changes_there(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path)
    url = f"file://{origin}"
    clone, tip = agent_clone(tmp_path, url)
    before = refs(origin)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "delivered", outcome
    assert outcome.delivery is not None
    assert (outcome.delivery.remote, outcome.delivery.branch, outcome.delivery.commit) == (url, BRANCH, tip)
    assert refs(origin) == {**before, f"refs/heads/{BRANCH}": tip}


def test_the_branch_reaches_an_origin_over_smart_http(tmp_path: Path, git_http: tuple[str, GitHttp]) -> None:
    base_url, server = git_http
    origin = bare_origin(tmp_path)
    git(origin, "config", "http.receivepack", "true")
    url = f"{base_url}/origin.git"
    clone, tip = agent_clone(tmp_path, url)
    before = refs(origin)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "delivered", outcome
    assert refs(origin) == {**before, f"refs/heads/{BRANCH}": tip}
    assert any("git-receive-pack" in r for r in server.requests)


def test_a_branch_without_commits_beyond_its_base_is_not_pushed(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path)
    clone, _ = agent_clone(tmp_path, str(origin), with_commit=False)
    before = refs(origin)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(f"file://{origin}", f"file://{origin}"), clone)

    assert outcome.kind == "delivered" and outcome.delivery is None
    assert "nothing to deliver" in (outcome.detail or "")
    assert refs(origin) == before


def test_a_branch_waits_while_its_workspace_runs_again_and_an_older_runs_delivery_is_superseded(
    tmp_path: Path,
) -> None:
    origin = bare_origin(tmp_path)
    url = f"file://{origin}"
    clone, _ = agent_clone(tmp_path, url)
    resumed = record(url, url, runs=2).model_copy(update={"status": Status.RUNNING})
    before = refs(origin)
    deliverer = GitDeliverer(tmp_path / "state")

    running = deliverer.deliver(resumed, clone, run=2)
    older = deliverer.deliver(resumed, clone, run=1)

    assert running.kind == "transient" and "running" in running.reason
    assert older.kind == "delivered" and "superseded" in (older.detail or "") and older.delivery is None
    assert refs(origin) == before


def _user_repo(tmp_path: Path) -> Path:
    """A user's working repository mid-work: main checked out, a feature branch, a staged change,
    an unstaged change, an untracked file, and a post-receive hook of their own."""
    repo = tmp_path / "user-repo"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    commit(repo, "README.md", "hello\n")
    git(repo, "branch", "feature")
    (repo / "staged.txt").write_text("staged\n", encoding="utf-8")
    git(repo, "add", "staged.txt")
    (repo / "README.md").write_text("hello, edited but not staged\n", encoding="utf-8")
    (repo / "untracked.txt").write_text("mine\n", encoding="utf-8")
    hook = repo / ".git" / "hooks" / "post-receive"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path / 'user-hook-ran'}\n", encoding="utf-8")
    hook.chmod(0o755)
    return repo


def _tree_state(repo: Path) -> dict[str, str]:
    """Every file of the work tree plus HEAD, the index and the config, by content hash."""
    files = [p for p in repo.rglob("*") if p.is_file() and ".git" not in p.relative_to(repo).parts]
    files += [repo / ".git" / "HEAD", repo / ".git" / "index", repo / ".git" / "config"]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_delivery_into_a_local_working_repository_writes_only_that_branch(tmp_path: Path) -> None:
    repo = _user_repo(tmp_path)
    clone, tip = agent_clone(tmp_path, str(repo))
    refs_before, files_before = refs(repo), _tree_state(repo)
    status_before = git(repo, "status", "--porcelain")

    outcome = GitDeliverer(tmp_path / "state").deliver(record(str(repo), str(repo.resolve())), clone)

    assert outcome.kind == "delivered", outcome
    assert refs(repo) == {**refs_before, f"refs/heads/{BRANCH}": tip}
    assert _tree_state(repo) == files_before
    assert git(repo, "status", "--porcelain") == status_before
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert not (tmp_path / "user-hook-ran").exists()
    assert outcome.delivery is not None
    commands = view_commands(record(str(repo), str(repo)), outcome.delivery, local=True)
    assert commands == [f"git -C {repo} log --oneline main..{BRANCH}"]


def test_a_branch_checked_out_in_the_local_repository_is_never_updated(tmp_path: Path) -> None:
    repo = _user_repo(tmp_path)
    clone, _ = agent_clone(tmp_path, str(repo))
    git(repo, "checkout", "-q", "-b", BRANCH)  # the user is on a branch of that name (behind ours)
    refs_before, files_before = refs(repo), _tree_state(repo)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(str(repo), str(repo)), clone)

    assert outcome.kind == "permanent", outcome
    assert "checked out" in outcome.reason and "checked out" in (outcome.what_to_do or "")
    assert refs(repo) == refs_before and _tree_state(repo) == files_before


# ---------------------------------------------------------------------------------------------
# branch delivery: the agent's clone is hostile


def test_a_clone_that_rewrites_its_remote_and_installs_hooks_still_delivers_to_the_recorded_origin_only(
    tmp_path: Path,
) -> None:
    origin = bare_origin(tmp_path)
    evil = bare_origin(tmp_path, "evil.git")
    evil_before = refs(evil)
    url = f"file://{origin}"
    clone, tip = agent_clone(tmp_path, url)
    marker = tmp_path / "host-was-touched"
    script = f'#!/bin/sh\necho "$0" >> {marker}\n'
    hooks = clone / ".githooks"
    hooks.mkdir()
    names = "pre-push post-checkout reference-transaction pre-receive post-update update post-receive pre-commit"
    names += " fsmonitor-watchman push-to-checkout pre-auto-gc"
    for folder in (hooks, clone / ".git" / "hooks"):
        for name in names.split():
            (folder / name).write_text(script, encoding="utf-8")
            (folder / name).chmod(0o755)
    for key, value in {
        "remote.origin.url": str(evil),
        "remote.origin.pushurl": str(evil),
        f"url.{evil}.insteadOf": url,
        f"url.{evil}.pushInsteadOf": url,
        "core.hooksPath": str(hooks),
        "core.fsmonitor": str(hooks / "fsmonitor-watchman"),
        "credential.helper": f"!{hooks / 'pre-push'}",
        "core.sshCommand": str(hooks / "pre-push"),
        "uploadpack.packObjectsHook": str(hooks / "pre-push"),
        "protocol.allow": "always",
    }.items():
        git(clone, "config", key, value)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "delivered", outcome
    assert refs(origin)[f"refs/heads/{BRANCH}"] == tip
    assert refs(evil) == evil_before
    assert not marker.exists(), marker.read_text()


def _crafted_commit(clone: Path) -> str:
    """A commit object without an author line (git's fsck refuses it), made the branch's tip."""
    tree = git(clone, "rev-parse", "HEAD^{tree}")
    parent = git(clone, "rev-parse", "HEAD")
    body = f"tree {tree}\nparent {parent}\ncommitter Tester <t@example.com> 1700000000 +0000\n\nno author\n"
    sha = git(clone, "hash-object", "-t", "commit", "--literally", "-w", "--stdin", stdin=body.encode())
    git(clone, "update-ref", f"refs/heads/{BRANCH}", sha)
    return sha


def _garbage_commit(clone: Path) -> str:
    """A loose object file whose bytes are not an object at all, made the branch's tip."""
    sha = "ab" + "c" * 38
    path = clone / ".git" / "objects" / "ab" / sha[2:]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"this is not a zlib stream")
    (clone / ".git" / "refs" / "heads" / BRANCH).write_text(sha + "\n", encoding="utf-8")
    return sha


@pytest.mark.parametrize("craft", [_crafted_commit, _garbage_commit], ids=["fsck-error", "not-an-object"])
def test_a_crafted_or_corrupt_object_in_the_clone_is_refused_and_never_reaches_the_origin(
    tmp_path: Path, craft: Callable[[Path], str]
) -> None:
    origin = bare_origin(tmp_path)
    url = f"file://{origin}"
    clone, _ = agent_clone(tmp_path, url)
    bad = craft(clone)
    before = refs(origin)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "permanent", outcome
    assert refs(origin) == before
    assert subprocess.run(["git", "cat-file", "-e", bad], cwd=origin, capture_output=True).returncode != 0


def _alternates(clone: Path, tmp_path: Path) -> None:
    other = bare_origin(tmp_path, "private.git")
    (clone / ".git" / "objects" / "info" / "alternates").write_text(f"{other / 'objects'}\n", encoding="utf-8")


def _linked_git_dir(clone: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.git"
    (clone / ".git").rename(real)
    (clone / ".git").symlink_to(real)


def _gitfile(clone: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.git"
    (clone / ".git").rename(real)
    (clone / ".git").write_text(f"gitdir: {real}\n", encoding="utf-8")


def _linked_object(clone: Path, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("secret\n", encoding="utf-8")
    (clone / ".git" / "objects" / "ff").mkdir(exist_ok=True)
    (clone / ".git" / "objects" / "ff" / ("0" * 38)).symlink_to(target)


@pytest.mark.parametrize("pointer", [_alternates, _linked_git_dir, _gitfile, _linked_object])
def test_a_clone_that_points_out_of_its_folder_is_refused(
    tmp_path: Path, pointer: Callable[[Path, Path], None]
) -> None:
    origin = bare_origin(tmp_path)
    url = f"file://{origin}"
    clone, _ = agent_clone(tmp_path, url)
    pointer(clone, tmp_path)
    before = refs(origin)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "permanent", outcome
    assert outcome.what_to_do
    assert refs(origin) == before


# ---------------------------------------------------------------------------------------------
# branch delivery: what the push answered


GitOutbox = tuple[Outbox, Callable[[OutboxEntry], Outcome], list[str]]


def _git_outbox(tmp_path: Path, rec: WorkspaceRecord, clone: Path) -> GitOutbox:
    deliverer = GitDeliverer(tmp_path / "state")
    calls: list[str] = []

    def deliver(entry: OutboxEntry) -> Outcome:
        calls.append(entry.id)
        return deliverer.deliver(rec, clone, force=entry.force)

    return Outbox(tmp_path / "state", sync_settings()), deliver, calls


def test_a_non_fast_forward_push_needs_attention_is_not_retried_and_force_overwrites(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path)
    url = f"file://{origin}"
    clone, tip = agent_clone(tmp_path, url)
    theirs = tmp_path / "someone-else"
    git(tmp_path, "clone", "-q", url, str(theirs))
    git(theirs, "checkout", "-q", "-b", BRANCH)
    their_tip = commit(theirs, "other.txt", "someone else's work\n")
    git(theirs, "push", "-q", "origin", BRANCH)
    box, deliver, calls = _git_outbox(tmp_path, record(url, url), clone)
    box.enqueue(WS, 1, "git", now=0.0)

    first = box.flush(deliver, now=0.0)
    again = box.flush(deliver, now=1e9)

    eid = entry_id(WS, 1, "git")
    assert first.attention == [eid] and again.attention == [] and calls == [eid]
    (entry,) = box.entries()
    assert entry.state == "attention"
    assert "rejected" in (entry.last_error or "") and "fetch first" in (entry.last_error or "")
    assert "force" in (entry.what_to_do or "")
    assert refs(origin)[f"refs/heads/{BRANCH}"] == their_tip
    assert box.enqueue(WS, 1, "git") == "attention"

    assert box.enqueue(WS, 1, "git", force=True, now=2e9) == "requeued"
    assert box.flush(deliver, now=2e9).delivered == [eid]
    assert refs(origin)[f"refs/heads/{BRANCH}"] == tip


def test_a_push_refused_by_the_origins_hook_needs_attention(tmp_path: Path) -> None:
    origin = bare_origin(tmp_path)
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'agent branches are not welcome here' >&2\nexit 1\n", encoding="utf-8")
    hook.chmod(0o755)
    url = f"file://{origin}"
    clone, _ = agent_clone(tmp_path, url)

    outcome = GitDeliverer(tmp_path / "state").deliver(record(url, url), clone)

    assert outcome.kind == "permanent", outcome
    assert "pre-receive hook declined" in outcome.reason
    assert f"refs/heads/{BRANCH}" not in refs(origin)


def test_an_origin_answering_503_or_unreachable_is_a_transient_failure(
    tmp_path: Path, git_http: tuple[str, GitHttp]
) -> None:
    base_url, server = git_http
    origin = bare_origin(tmp_path)
    git(origin, "config", "http.receivepack", "true")
    url = f"{base_url}/origin.git"
    clone, _ = agent_clone(tmp_path, url)
    deliverer = GitDeliverer(tmp_path / "state", timeout_seconds=60)

    server.fail_with = [503]
    busy = deliverer.deliver(record(url, url), clone)
    gone_url = f"http://127.0.0.1:{free_port()}/origin.git"
    gone = deliverer.deliver(record(gone_url, gone_url), clone)

    assert busy.kind == "transient" and "503" in busy.reason, busy
    assert gone.kind == "transient", gone
    assert f"refs/heads/{BRANCH}" not in refs(origin)
    assert deliverer.deliver(record(url, url), clone).kind == "delivered"


def test_review_links_and_commands_for_github_and_gitlab_origins() -> None:
    gh = "https://github.com/acme/widgets/compare/main...agent/x?expand=1"
    assert review_url("https://github.com/acme/widgets.git", "main", "agent/x") == gh
    assert review_url("git@github.com:acme/widgets.git", "main", "agent/x") == gh
    assert review_url("ssh://git@github.com/acme/widgets", "main", "agent/x") == gh
    assert (
        review_url("git@gitlab.com:group/sub/widgets.git", "main", "agent/x")
        == "https://gitlab.com/group/sub/widgets/-/merge_requests/new?merge_request[source_branch]=agent/x"
    )
    assert review_url("/home/me/widgets", "main", "agent/x") is None
    assert review_url("https://git.example/acme/widgets.git", "main", "agent/x") is None
    rec = record("acme/widgets", "https://user:tok@github.com/acme/widgets.git")
    delivery = Delivery(remote="https://user:***@github.com/acme/widgets.git", branch=BRANCH, commit="a" * 40)
    commands = view_commands(rec, delivery, local=False)
    assert commands[-1] == f"https://github.com/acme/widgets/compare/main...{BRANCH}?expand=1"
    assert all("tok" not in c for c in commands)


# ---------------------------------------------------------------------------------------------
# records and the outbox


def test_a_record_refused_three_times_with_500_is_accepted_once_on_the_fourth_attempt_on_schedule(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    endpoint.script = [(500, {}), (500, {}), (500, {})]
    settings = sync_settings(endpoint)
    events: list[tuple[str, str, str | None]] = []
    box = Outbox(tmp_path / "state", settings, on_event=lambda kind, e, why: events.append((kind, e.id, why)))
    eid = enqueue_record(box, now=1000.0)
    delivery = Delivery(remote="https://example.invalid/org/proj.git", branch=BRANCH, commit="c" * 40)

    def deliver(entry: OutboxEntry) -> Outcome:
        return poster(settings).deliver(entry, delivery)

    schedule = []
    for now in (1000.0, 1000.4, 1000.5, 1001.4, 1001.5, 1003.4, 1003.5):
        result = box.flush(deliver, now=now)
        pending = box.entries()
        schedule.append((now, len(endpoint.requests), pending[0].next_attempt_at if pending else None))
        if result.delivered:
            break

    assert schedule == [
        (1000.0, 1, 1000.5),  # 1st attempt: 500, next after backoff[0]
        (1000.4, 1, 1000.5),  # not due: nothing sent
        (1000.5, 2, 1001.5),  # 2nd: 500, next after backoff[1]
        (1001.4, 2, 1001.5),
        (1001.5, 3, 1003.5),  # 3rd: 500, next after backoff[2]
        (1003.4, 3, 1003.5),
        (1003.5, 4, None),  # 4th: accepted
    ]
    assert endpoint.accepted == {f"{WS}:1": 1}
    assert {r["key"] for r in endpoint.requests} == {f"{WS}:1"}
    assert {r["auth"] for r in endpoint.requests} == {"Bearer s3cret"}
    assert {r["path"] for r in endpoint.requests} == {"/v1/agent/sync"}
    body = endpoint.requests[-1]["body"]
    assert body["agent_id"] == "test-agent"
    (dispatch,) = body["dispatches"]
    fields = ("workspace", "branch", "status", "exit_code", "runs")
    assert [dispatch[k] for k in fields] == [WS, BRANCH, "completed", 0, 1]
    assert dispatch["delivery"]["commit"] == "c" * 40
    assert events == [("delivered", eid, f"record accepted by {endpoint.url}/v1/agent/sync (HTTP 200)")]
    assert box.is_delivered(WS, 1, "record")


def test_a_record_answered_429_waits_as_long_as_retry_after_says(tmp_path: Path, endpoint: Endpoint) -> None:
    endpoint.script = [(429, {"Retry-After": "120"})]
    settings = sync_settings(endpoint, backoff_seconds=(0.01,))
    box = Outbox(tmp_path / "state", settings)
    enqueue_record(box, now=1000.0)

    box.flush(poster(settings).deliver, now=1000.0)
    (entry,) = box.entries()
    box.flush(poster(settings).deliver, now=1119.0)
    sent_early = len(endpoint.requests)
    on_time = box.flush(poster(settings).deliver, now=1120.0)

    assert entry.next_attempt_at == 1120.0 and entry.attempts == 1 and "429" in (entry.last_error or "")
    assert sent_early == 1
    assert on_time.delivered and len(endpoint.requests) == 2 and endpoint.accepted == {f"{WS}:1": 1}


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("30", now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert retry_after_seconds(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    assert retry_after_seconds("next tuesday", now) is None
    assert retry_after_seconds("999999999", now) == 86_400.0


def test_a_record_refused_with_400_needs_attention_and_goes_again_only_when_retried(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    endpoint.script = [(400, {})]
    settings = sync_settings(endpoint, token_env="UNSET_TOKEN")
    events: list[str] = []
    box = Outbox(tmp_path / "state", settings, on_event=lambda kind, e, why: events.append(kind))
    eid = enqueue_record(box, now=1000.0)

    assert box.flush(poster(settings, token=None).deliver, now=1000.0).attention == [eid]
    assert box.flush(poster(settings, token=None).deliver, now=1e9).attention == []
    assert box.enqueue(WS, 1, "record") == "attention"
    report = box.report()
    assert report.attention == [WS] and "HTTP 400" in report.message
    (row,) = report.entries
    assert row.state == "attention" and row.what_to_do and "HTTP 400" in (row.last_error or "")
    assert len(endpoint.requests) == 1 and endpoint.requests[0]["auth"] is None

    assert box.retry(eid, now=2e9)
    assert box.flush(poster(settings).deliver, now=2e9).delivered == [eid]
    assert events == ["needs-attention", "delivered"]
    assert endpoint.accepted == {f"{WS}:1": 1}


def test_a_record_whose_attempts_run_out_is_dead_lettered_with_an_event_naming_it_and_why(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    endpoint.script = [(503, {})] * 5
    settings = sync_settings(endpoint, max_attempts=3, backoff_seconds=(1.0,))
    events: list[tuple[str, str, str | None]] = []
    box = Outbox(tmp_path / "state", settings, on_event=lambda kind, e, why: events.append((kind, e.id, why)))
    eid = enqueue_record(box, now=0.0)

    results = [box.flush(poster(settings).deliver, now=t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)]

    assert [len(r.retrying) for r in results] == [1, 1, 0, 0, 0]
    assert results[2].dead_lettered == [eid] and len(endpoint.requests) == 3
    assert box.entries() == []
    (line,) = [json.loads(x) for x in box.dead_letter_file.read_text().splitlines()]
    assert line["id"] == eid and line["workspace"] == WS and line["attempts"] == 3 and "HTTP 503" in line["reason"]
    assert events == [("dead-lettered", eid, line["reason"])]
    assert box.enqueue(WS, 1, "record") == "dead-lettered"
    assert box.report().dead_lettered == [WS]

    assert box.retry(eid, now=10.0)
    endpoint.script = []
    assert box.flush(poster(settings).deliver, now=10.0).delivered == [eid]


def test_the_ledger_keeps_a_delivered_record_from_going_twice_across_restarts_but_a_new_run_goes_again(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    settings = sync_settings(endpoint)
    box = Outbox(tmp_path / "state", settings)
    enqueue_record(box)
    assert len(box.flush(poster(settings).deliver).delivered) == 1

    assert box.enqueue(WS, 1, "record") == "delivered"
    restarted = Outbox(tmp_path / "state", settings)
    assert restarted.enqueue(WS, 1, "record", payload={"x": 1}) == "delivered"
    assert restarted.flush(poster(settings).deliver).delivered == []
    assert endpoint.accepted == {f"{WS}:1": 1}

    enqueue_record(restarted, runs=2, now=0.0)  # the workspace was resumed
    assert len(restarted.flush(poster(settings).deliver).delivered) == 1
    assert endpoint.accepted == {f"{WS}:1": 1, f"{WS}:2": 1}
    assert [r.state for r in restarted.report().entries] == ["delivered", "delivered"]


def test_two_outboxes_on_one_root_never_deliver_the_same_entry_at_once(tmp_path: Path) -> None:
    settings = sync_settings()
    first, second = Outbox(tmp_path / "state", settings), Outbox(tmp_path / "state", settings)
    eid = enqueue_record(first, now=0.0)
    inside, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(entry: OutboxEntry) -> Outcome:
        calls.append(f"first:{entry.id}")
        inside.set()
        assert release.wait(WAIT)
        return Outcome.delivered("ok")

    def fast(entry: OutboxEntry) -> Outcome:
        calls.append(f"second:{entry.id}")
        return Outcome.delivered("ok")

    thread = threading.Thread(target=first.flush, args=(slow,), kwargs={"now": 1.0})
    thread.start()
    assert inside.wait(WAIT)
    during = second.flush(fast, now=1.0)
    release.set()
    thread.join(WAIT)
    after = second.flush(fast, now=1.0)

    assert during.busy == [eid] and during.delivered == []
    assert after.delivered == [] and after.busy == []
    assert calls == [f"first:{eid}"]
    assert first.is_delivered(WS, 1, "record")


def test_two_outboxes_flushing_many_records_together_post_each_exactly_once(tmp_path: Path, endpoint: Endpoint) -> None:
    settings = sync_settings(endpoint)
    boxes = [Outbox(tmp_path / "state", settings) for _ in range(2)]
    for run in range(1, 13):
        enqueue_record(boxes[0], runs=run, now=0.0)
    start = threading.Barrier(2)

    def run(box: Outbox) -> None:
        start.wait(WAIT)
        box.flush(poster(settings).deliver, now=1.0)

    threads = [threading.Thread(target=run, args=(b,)) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)

    assert sorted(endpoint.keys()) == sorted(f"{WS}:{n}" for n in range(1, 13))
    assert boxes[1].entries() == []


_KILLED_FLUSH = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agentic_dispatch.config import SyncSettings
    from agentic_dispatch.sync import Outbox, RecordPoster

    state, url = Path(sys.argv[1]), sys.argv[2]
    settings = SyncSettings(endpoint=url)
    poster = RecordPoster(settings)

    def deliver(entry):
        outcome = poster.deliver(entry)
        print("posted", flush=True)
        sys.stdin.read()  # hangs here, the answer in hand and not yet written down, until killed
        return outcome

    Outbox(state, settings).flush(deliver)
    """
)


def test_a_server_killed_mid_flush_loses_nothing_and_the_retry_carries_the_same_idempotency_key(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    settings = sync_settings(endpoint)
    box = Outbox(tmp_path / "state", settings)
    eid = enqueue_record(box, now=0.0)
    with subprocess.Popen(  # leaving the block closes its pipes
        [sys.executable, "-c", _KILLED_FLUSH, str(tmp_path / "state"), endpoint.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "server")},
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"posted\n"
            assert box.flush(poster(settings).deliver, now=1.0).busy == [eid]  # still held by the other server
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)

    (entry,) = box.entries()
    assert entry.attempts == 0 and not box.is_delivered(WS, 1, "record")
    assert box.flush(poster(settings).deliver, now=1.0).delivered == [eid]
    assert endpoint.keys() == [f"{WS}:1", f"{WS}:1"]  # the endpoint tells the two apart by the key


def test_a_runs_record_waits_for_its_branch_and_then_goes_in_the_same_pass(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "state", sync_settings(backoff_seconds=(5.0,)))
    box.enqueue(WS, 1, "git", now=0.0)
    box.enqueue(WS, 1, "record", payload={"agent_id": "a", "dispatches": []}, now=0.0)
    answers = {"git": [Outcome.transient("origin unreachable"), Outcome.delivered("pushed")]}
    calls: list[str] = []

    def deliver(entry: OutboxEntry) -> Outcome:
        calls.append(entry.kind)
        return answers[entry.kind].pop(0) if entry.kind in answers else Outcome.delivered("posted")

    box.flush(deliver, now=0.0)
    assert calls == ["git"]
    box.flush(deliver, now=5.0)
    assert calls == ["git", "git", "record"]
    assert box.report().delivered == [WS]


def test_a_flush_stops_between_entries_once_shutdown_is_asked(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "state", sync_settings())
    for run in (1, 2):
        enqueue_record(box, runs=run, now=0.0)
    stop = threading.Event()

    def deliver(entry: OutboxEntry) -> Outcome:
        stop.set()  # shutdown is asked while the first entry is delivered
        return Outcome.delivered("ok")

    result = box.flush(deliver, now=1.0, stop=stop)

    assert len(result.delivered) == 1 and len(box.entries()) == 1


def test_an_unreadable_entry_is_left_alone_and_the_others_still_go(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "state", sync_settings())
    enqueue_record(box, now=0.0)
    broken = box.dir / "broken-r1-git-000000000000.json"
    broken.write_text("{not json", encoding="utf-8")

    result = box.flush(lambda e: Outcome.delivered("ok"), now=1.0)

    assert result.unreadable == ["broken-r1-git-000000000000"] and len(result.delivered) == 1
    assert broken.read_text(encoding="utf-8") == "{not json"
    assert "broken-r1-git-000000000000" in box.report().message


def test_the_report_shows_each_workspace_under_its_worst_delivery_and_the_next_try(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "state", sync_settings(backoff_seconds=(60.0,)))
    names = ["org/proj/done", "org/proj/waiting", "org/proj/stuck"]
    for name in names:
        box.enqueue(name, 1, "git", now=0.0)
    answers = {
        "org/proj/done": Outcome.delivered("pushed", Delivery(remote="/r", branch="agent/done", commit="d" * 40)),
        "org/proj/waiting": Outcome.transient("connection refused"),
        "org/proj/stuck": Outcome.permanent("rejected (non-fast-forward)", "compare the branches"),
    }
    box.flush(lambda e: answers[e.workspace], now=0.0)

    report = box.report()

    assert report.delivered == ["org/proj/done"]
    assert report.pending == ["org/proj/waiting"]
    assert report.attention == ["org/proj/stuck"]
    assert report.next_retry_at == "1970-01-01T00:01:00Z"
    rows = {r.workspace: r for r in report.entries}
    assert rows["org/proj/done"].delivery is not None and rows["org/proj/done"].detail == "pushed"
    assert rows["org/proj/waiting"].attempts == 1 and rows["org/proj/waiting"].last_error == "connection refused"
    assert rows["org/proj/stuck"].what_to_do == "compare the branches"
    assert "compare the branches" in report.message and "connection refused" in report.message
    assert box.report("org/proj/stuck").attention == ["org/proj/stuck"]
    assert box.next_due() == 60.0


# ---------------------------------------------------------------------------------------------
# settings


def test_sync_settings_come_from_the_config_file_and_max_attempts_from_the_environment(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        '[sync]\nendpoint = "https://records.example"\nbackoff_seconds = [0.1, 2]\nmax_attempts = 5\n',
        encoding="utf-8",
    )
    settings, _ = load_settings()
    assert settings.sync.backoff_seconds == (0.1, 2.0) and settings.sync.max_attempts == 5
    assert settings.sync.agent_id.startswith("agentic-dispatch@")

    monkeypatch.setenv("AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS", "7")
    assert load_settings()[0].sync.max_attempts == 7

    for bad in ("zero", "0", "-3", "2.5"):
        monkeypatch.setenv("AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS", bad)
        with pytest.raises(ConfigError, match=r"AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS.*whole number"):
            load_settings()


def test_an_endpoint_that_is_not_an_http_url_is_a_config_error(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[sync]\nendpoint = "ftp://records.example"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sync\.endpoint"):
        load_settings()
