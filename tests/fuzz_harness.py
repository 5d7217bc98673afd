"""The harness of the tool fuzz (tests/test_fuzz_tools.py): one real server in an MCP client session,
seeded workspaces, and the checks made after every call."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client
from mcp_types import CallToolResult

from agentic_dispatch.config import load_settings
from agentic_dispatch.mcp_server import build_server
from agentic_dispatch.models import WorkspaceRecord
from agentic_dispatch.runtime.base import LABEL_ROOT
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.store import StatusStore

from .conftest import Endpoint, _endpoint_handler, git, make_user_repo
from .fuzz_strategies import Pools

SEEDS = {  # tag (and the status it ends with): task
    "completed": "git commit -q --allow-empty -m seeded && echo done",
    "blocked": "echo 'Which one?' > BLOCKED.md",
    "failed": "echo boom; exit 3",
    # What an agent may leave where the server reads and writes: ends failed (BLOCKED.md is a link).
    "failed-hostile": "mkdir -p ANSWER.md && ln -s /etc/passwd BLOCKED.md && mkfifo fifo && ln -s .. up",
    # Completed, with its branch's ref file turned into a link out of the workspace.
    "completed-hostile": "git commit -q --allow-empty -m x && b=.git/refs/heads/$(git branch --show-current) && "
    "rm $b && ln -s /etc/hostname $b && ln -s /etc/passwd ANSWER.md",
}
ROOT_ENTRIES = {"workspaces", "mirrors", "state", "events", "config.toml"}
CALL_TIMEOUT = 120.0


class _Errors(logging.Handler):
    """Collects every record at ERROR or above (an exception the server or the SDK logged)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class FuzzHarness:
    portal: BlockingPortal
    client: Client
    root: Path
    tmp: Path
    user_repo: Path
    sandbox: Path
    errors: _Errors
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    pools: Pools = field(default_factory=Pools)
    seeded: dict[str, bytes] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    _outside: object = None

    # -- talking to the server ---------------------------------------------------------------
    def call(self, tool: str, args: dict[str, Any]) -> CallToolResult:
        async def run() -> CallToolResult:
            with anyio.fail_after(CALL_TIMEOUT):
                return await self.client.call_tool(tool, args)

        return self.portal.call(run)

    def ok(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        res = self.call(tool, args)
        assert not res.is_error and isinstance(res.structured_content, dict), f"{tool}({args}): {res.content}"
        return res.structured_content

    # -- one fuzzed call ---------------------------------------------------------------------
    def check_call(self, tool: str, args: dict[str, Any]) -> None:
        logged = len(self.errors.records)
        res = self.call(tool, args)  # an exception here escaped the session: the test fails with it
        text = " ".join(getattr(c, "text", "") for c in res.content).strip()
        self.outcomes["error" if res.is_error else "ok"] += 1
        if res.is_error:
            self.reasons[text.split(":", 2)[-1].strip()[:70]] += 1
        shown = _short(args)
        if res.is_error:
            assert text, f"{tool}({shown}): an empty tool error"
            assert "Traceback" not in text and "Internal error" not in text, f"{tool}({shown}): {text[:2000]}"
            assert text != f"Error executing tool {tool}", f"{tool}({shown}): the server crashed (see the log)"
        else:
            assert isinstance(res.structured_content, dict), f"{tool}({shown}): no structured result"
            unknown = set(args) - set(self.schemas[tool].get("properties", {}))
            assert not unknown, f"{tool}({shown}): the unknown argument(s) {sorted(unknown)} were silently ignored"
        new = [r.getMessage() + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in self.errors.records[logged:]]
        assert not new, f"{tool}({shown}) made the server log errors: {new}"
        if tool == "agentic_dispatch" and not res.is_error:
            self._check_dispatched(args, res.structured_content or {})
        self.check_disk(f"{tool}({shown})")
        self.settle()

    def _check_dispatched(self, args: dict[str, Any], result: dict[str, Any]) -> None:
        repo = str(args.get("repo", "")).strip()
        local = repo.removeprefix("file://") if repo.startswith("file://") else repo
        if local.startswith(("/", "~")):
            resolved = Path(local).expanduser().resolve()
            assert not resolved.is_relative_to(self.root), f"a dispatch from inside the state root was accepted: {repo}"
        assert Path(result["path"]).resolve().is_relative_to(self.root / "workspaces"), result

    # -- invariants ----------------------------------------------------------------------------
    def check_disk(self, what: str) -> None:
        staging = self.root / "state" / "staging"
        assert not (staging.exists() and any(staging.iterdir())), f"{what} left {list(staging.iterdir())}"
        assert {p.name for p in self.root.iterdir()} <= ROOT_ENTRIES, f"{what}: {sorted(os.listdir(self.root))}"
        half = [p.name for p in (self.root / "mirrors").iterdir() if p.name.endswith((".partial", ".old"))]
        assert not half, f"{what} left half-made mirrors {half}"
        for depth, path in _walk_workspaces(self.root / "workspaces"):
            if depth < 3:
                assert path.is_dir() and not path.is_symlink(), f"{what}: {path} in the workspaces tree"
                continue
            status = path / "status.json"
            assert status.is_file(), f"{what} left a workspace without status.json: {path}"
            WorkspaceRecord.model_validate_json(status.read_bytes())
        now = self._outside_now()
        assert now == self._outside, f"{what} changed something outside the state root: {_changes(self._outside, now)}"
        assert not Path("/tmp/agentic-fuzz-pwned").exists(), f"{what}: an injected command ran"

    def _outside_now(self) -> object:
        files = []
        for path in sorted(self.tmp.rglob("*")):
            rel = path.relative_to(self.tmp)
            if rel.parts[0] == self.root.name or rel.parts[:2] == (self.user_repo.name, ".git"):
                continue
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            size_and_time = None if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)  # a link's own
            files.append((str(rel), st.st_mode, size_and_time, link))
        refs = [ln for ln in git(self.user_repo, "for-each-ref").splitlines() if "refs/heads/agent/" not in ln]
        repo_state = (refs, git(self.user_repo, "rev-parse", "HEAD"), git(self.user_repo, "status", "--porcelain"))
        return files, repo_state

    def snapshot_outside(self) -> None:
        self._outside = self._outside_now()

    # -- back to the seeded state --------------------------------------------------------------
    def settle(self) -> None:
        """Freeze the queue again, cancel and remove what the call dispatched, put the seeds back."""
        self._bring_back_removed_seeds()
        report = self.ok("agentic_status", {"limit": 1000})
        if not report["frozen"]:
            self.ok("agentic_dispatch_shutdown", {})
        for row in report["workspaces"]:
            name = row["name"]
            if name in self.seeded:
                if row["status"] == "running":
                    self._wait_final(name)
                self._restore(name)
                continue
            if row["status"] in ("queued", "running"):
                self.ok("agentic_cancel", {"workspace": name})
            shutil.rmtree(self.root / "workspaces" / name)

    @property
    def _seed_copies(self) -> Path:
        return self.tmp.with_name(self.tmp.name + "-seeds")  # beside tmp: outside what check_disk compares

    def copy_seeds(self) -> None:
        for name in self.seeded:
            (self._seed_copies / name).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["cp", "-a", str(self.root / "workspaces" / name), str(self._seed_copies / name)], check=True
            )

    def _bring_back_removed_seeds(self) -> None:
        """agentic_clean may remove the finished seeds (with ``force``, or a small ``keep``): their copies go back."""
        for name in self.seeded:
            ws = self.root / "workspaces" / name
            if not ws.exists():
                ws.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", "-a", str(self._seed_copies / name), str(ws)], check=True)

    def _wait_final(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ok("agentic_status", {"workspace": name})["workspaces"][0]["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"{name} did not finish within {timeout}s"
            time.sleep(0.2)

    def _restore(self, name: str) -> None:
        status = self.root / "workspaces" / name / "status.json"
        if status.read_bytes() == self.seeded[name]:
            return
        store = StatusStore(self.root / "workspaces", self.root / "events", self.root / "state" / "index.sqlite")
        with store.locked(name):
            tmp = status.with_name(".status.fuzz.tmp")
            tmp.write_bytes(self.seeded[name])
            tmp.replace(status)

    def begin(self) -> None:
        self.outcomes.clear()
        self.reasons.clear()
        self.started = time.monotonic()

    def report(self, tool: str) -> None:
        took = time.monotonic() - self.started
        calls = sum(self.outcomes.values())
        print(f"\n{tool}: {calls} calls ({dict(self.outcomes)}) in {took:.0f}s, {calls / max(took, 1e-9):.2f}/s")
        if os.environ.get("AGENTIC_FUZZ_VERBOSE"):
            for reason, n in self.reasons.most_common():
                print(f"  {n:5d}  {reason!r}")


def _changes(before: Any, after: Any) -> str:
    """What differs between two looks outside the root (files, then the user's repository)."""
    (files_before, repo_before), (files_after, repo_after) = before, after
    gone = sorted(set(files_before) - set(files_after))
    new = sorted(set(files_after) - set(files_before))
    return f"was {gone}, now {new}" + ("; the user's repository changed" if repo_before != repo_after else "")


def _short(args: dict[str, Any]) -> str:
    text = repr(args)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} chars)"


def _walk_workspaces(top: Path) -> Iterator[tuple[int, Path]]:
    for org in sorted(top.iterdir()) if top.is_dir() else []:
        yield 1, org
        for repo in sorted(org.iterdir()) if org.is_dir() and not org.is_symlink() else []:
            yield 2, repo
            for ws in sorted(repo.iterdir()) if repo.is_dir() and not repo.is_symlink() else []:
                yield 3, ws


def _config(home: Path, endpoint: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        'default_agent = "shell"\n'
        'repo_url_template = "file:///nonexistent-agentic-fuzz/{org}/{repo}.git"\n'
        f'[sync]\nendpoint = "{endpoint}"\nbackoff_seconds = [0.2]\nmax_attempts = 3\n'
        "[limits]\ntotal = 8\n",  # the seeds all start at once
        encoding="utf-8",
    )


def _seed(h: FuzzHarness) -> None:
    """The workspaces of SEEDS, each ended as its tag says, and one waiting in the frozen queue."""
    names = {
        kind: h.ok("agentic_dispatch", {"repo": str(h.user_repo), "task": task, "tag": kind})["workspace"]
        for kind, task in SEEDS.items()
    }
    for kind, name in names.items():
        h._wait_final(name)
        row = h.ok("agentic_status", {"workspace": name})["workspaces"][0]
        assert row["status"] == kind.split("-")[0], f"seed {kind}: {row}"
    h.ok("agentic_dispatch_shutdown", {})
    names["queued"] = h.ok("agentic_dispatch", {"repo": str(h.user_repo), "task": "true"})["workspace"]
    for name in names.values():
        h.seeded[name] = (h.root / "workspaces" / name / "status.json").read_bytes()
    h.copy_seeds()


def _pools(h: FuzzHarness) -> Pools:
    root, repo, box = h.root, str(h.user_repo), h.sandbox
    names = list(h.seeded)
    ws_dirs = [root / "workspaces" / n for n in names]
    (box / "link-into-workspace").symlink_to(ws_dirs[0] / "repo")
    mirrors = sorted(str(p) for p in (root / "mirrors").glob("*.git"))
    paths = [str(root), *(str(root / d) for d in ("workspaces", "mirrors", "state", "events"))]
    paths += [str(d) for d in ws_dirs] + [str(d / "repo") for d in ws_dirs] + mirrors
    paths += [str(p) for p in sorted(box.iterdir())] + [repo + "/..", repo + "/.git", repo + "/./", str(box)]
    tricks = paths + ["file://" + p for p in paths] + ["file://" + repo, "file://" + repo + "/../user-repo"]
    pwned = box / "pwned"
    tricks += [
        f"--upload-pack=touch {pwned}",
        f"--config=core.sshCommand=touch {pwned}",
        f"ext::sh -c touch% {pwned}",
        "ext::sh -c touch% /tmp/agentic-fuzz-pwned",
        f"-oProxyCommand=touch {pwned}",
        f"git@-oProxyCommand=touch%20{pwned}:o/r",
    ]
    variants = [v for n in names for v in (n + "\x00", n.upper(), n + "/", "/" + n, n + "/..", n.replace("/", "//"))]
    tricks += variants + [n.replace("local/", "../") for n in names]
    valid: dict[str, list[Any]] = {
        "repo": [repo, repo, "file://" + repo, str(box / "link-to-user-repo")],
        "task": ["true", "echo fuzz", "exit 3"],
        "agent": ["shell", "shell:m1"],
        "workspace": names,
        "branch": ["main", "feature"],
        "template": ["coding", "review", "security"],
        "persona": ["reviewer"],
        "plan_template": ["bugfix", "feature"],
        "variables": [{}, {"symptom": "it breaks"}, {"goal": "g", "area": "a", "acceptance": "ok"}],
        "answer": ["Use PostgreSQL."],
        "agents": [["shell"], ["shell", "codex"], []],
        "org": ["acme"],
        "tag": ["t1"],
        "idempotency_key": ["k1", "k2"],
        "lock": ["db", "db "],  # one key, written two ways
        "timeout_seconds": [0, 0.1, 1],  # a number only for a wait (agentic_watch): keep calls short
        "workspaces": [names, names[:1], []],
        "path": ["README.md", "pyproject.toml", "."],
    }
    return Pools(valid=valid, tricks=tricks)


def _sandbox(tmp: Path, root: Path, user_repo: Path) -> Path:
    """Links into and out of the state root, next to it (outside it)."""
    box = tmp / "sandbox"
    (box / "outside").mkdir(parents=True)
    (box / "outside" / "keep.txt").write_text("outside\n", encoding="utf-8")
    for name, target in {
        "link-to-root": root,
        "link-to-workspaces": root / "workspaces",
        "link-to-user-repo": user_repo,
        "link-out": Path("/etc"),
        "link-to-outside": box / "outside",
        "link-dangling": box / "nowhere",
    }.items():
        (box / name).symlink_to(target)
    return box


@contextlib.contextmanager
def open_harness(
    tmp: Path, image: str, client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FuzzHarness]:
    """A server on ``tmp/home`` in an MCP session, seeded, the queue frozen, and a snapshot of what is
    outside the state root (``tmp`` holds the user's repository and a sandbox of links too)."""
    home = tmp / "home"
    monkeypatch.setenv("AGENTIC_DISPATCH_HOME", str(home))
    monkeypatch.delenv("AGENTIC_DISPATCH_CONFIG", raising=False)
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", image)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    user_repo = make_user_repo(tmp)
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("mcp", "agentic_dispatch")]
    with _endpoint() as url:
        _config(home, url)
        settings, paths = load_settings()
        server = build_server(lambda: Dispatcher(settings, paths, DockerRuntime(client)))
        for lg in loggers:
            lg.addHandler(errors)
        try:
            with start_blocking_portal() as portal:
                session = portal.wrap_async_context_manager(Client(server, read_timeout_seconds=CALL_TIMEOUT))
                with session as mcp_client:
                    box = _sandbox(tmp, paths.root, user_repo)
                    h = FuzzHarness(portal, mcp_client, paths.root, tmp, user_repo, box, errors)
                    h.schemas = {t.name: t.input_schema for t in portal.call(mcp_client.list_tools).tools}
                    _seed(h)
                    h.pools = _pools(h)
                    h.snapshot_outside()
                    yield h
        finally:
            for lg in loggers:
                lg.removeHandler(errors)
            for c in client.containers.list(all=True, filters={"label": f"{LABEL_ROOT}={paths.root_id}"}):
                c.remove(force=True)


@contextlib.contextmanager
def _endpoint() -> Iterator[str]:
    """A real record endpoint (conftest's) for the sync deliveries."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _endpoint_handler(Endpoint("")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
