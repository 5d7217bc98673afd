"""The service: one :class:`Dispatcher` that both front ends (MCP, CLI) call.

It ties the layers together: validates input at the boundary, prepares workspaces,
renders prompts, asks the scheduler what may start, starts containers through the
runtime, and finalises runs when their containers exit. Every method blocks; async
callers run them on a worker thread.

Background work (only when :meth:`Dispatcher.start` is called, i.e. in a server):
one thread follows the runtime's exit events; one timer thread drains the queue,
enforces timeouts and reconciles records with containers (for events missed while
nothing was listening). A one-shot CLI call reconciles once instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from . import safefs
from .agents import (
    AGENTS,
    CONTAINER_HOME,
    CONTAINER_LOGS,
    CONTAINER_RUN,
    CONTAINER_WORKDIR,
    RUN_HEADER,
    Agent,
    AgentSpec,
    RunContext,
    agent_base,
    parse_agent_spec,
)
from .config import IMAGE_ENV, Limits, Paths, Settings, config_file_path
from .credentials import Credentials, redact, resolve_credentials
from .errors import (
    AgentNotReadyError,
    ConfigError,
    InvalidInputError,
    LaunchError,
    RuntimeUnavailableError,
    StateError,
    UnsafePathError,
)
from .models import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    AgentCheck,
    CancelResult,
    CleanupReport,
    DispatchRequest,
    DispatchResult,
    DoctorReport,
    PoolHoldRow,
    QueueState,
    RunSummary,
    Status,
    StatusReport,
    SyncReport,
    WorkspaceRecord,
    WorkspaceRow,
    utcnow,
)
from .naming import check_component, check_git_ref, generated_id, slugify
from .prompts import MANAGED_FILES, PromptContext, PromptLibrary, detect_repo_facts, prompt_hash
from .runtime.base import (
    LABEL_AGENT,
    LABEL_ROOT,
    LABEL_RUN,
    LABEL_WORKSPACE,
    ContainerInfo,
    ContainerSpec,
    ExitEvent,
    Mount,
    Runtime,
)
from .runtime.images import default_image_tag
from .scheduler import Scheduler
from .store import Listed, StatusStore, WorkspacePaths
from .workspace import MirrorCache, clone_workspace, exclude_paths, file_lock, recent_log, resolve_repo

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

MAX_TASK_CHARS = 100_000
MAX_ANSWER_CHARS = 50_000
# BLOCKED.md is the agent's question; more than this is not a question.
MAX_QUESTION_BYTES = 64 * 1024
# A prompt travels on the CLI's command line; Linux caps one argument at 128 KiB.
MAX_PROMPT_BYTES = 120_000
# What `doctor` runs in the image to read each CLI's version (one container for all).
_VERSIONS_SCRIPT = (
    'for c in "$@"; do if v=$("$c" --version 2>&1); then printf "%s\\t%s\\n" "$c" "$(printf "%s" "$v" | head -n1)"; '
    'else printf "%s\\t!%s\\n" "$c" "$(printf "%s" "$v" | tail -n1)"; fi; done'
)
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}  # noqa: S104 (names, not a bind)


def _parse_time(ts: str | None) -> float | None:
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _tail(ws: WorkspacePaths, base: str, lines: int) -> str:
    """The last ``lines`` lines of the agent's log (the logs folder is writable by the agent)."""
    try:
        data = safefs.tail_text(ws.logs, ws.log(base), 64 * 1024) or ""
    except UnsafePathError as e:
        return f"(the log cannot be shown: {e})"
    return "\n".join(data.splitlines()[-lines:])


class Dispatcher:
    """The one service object: dispatch, status, resume, sync."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        runtime: Runtime,
        agents: dict[str, Agent] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.runtime = runtime
        self.agents = agents if agents is not None else AGENTS
        known = ", ".join(sorted(self.agents))
        problems = [
            f"agents.{n}: unknown agent; the known ones are {known}"
            for n in sorted(set(settings.agents) - set(self.agents))
        ]
        if agent_base(settings.default_agent) not in self.agents:
            problems.append(f"default_agent: unknown agent {settings.default_agent!r}; the known ones are {known}")
        self.prompts = PromptLibrary(paths.user_prompts, paths.user_workspace_templates)
        if settings.default_template not in self.prompts.names("task"):
            problems.append(
                f"default_template: no template {settings.default_template!r}; "
                f"there are {', '.join(self.prompts.names('task'))}"
            )
        if problems:
            raise ConfigError(paths.config_file or config_file_path(), problems)
        paths.ensure()
        self.store = StatusStore(paths.workspaces, paths.events)
        self.mirrors = MirrorCache(paths.mirrors, settings.mirror_max_age_seconds)
        self.scheduler = Scheduler(self._effective_limits(), paths.state, self.store.events_file)
        self._cli_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._finished = threading.Condition()
        self._stalled: str | None = None  # why queued work cannot start, from the last drain
        self._remove_stale_staging()

    def credentials(self, base: str) -> Credentials:
        """``base``'s credentials as the server's environment and the host home give them now."""
        return resolve_credentials(self.agents[base], self.settings.agents.get(base), os.environ, Path.home())

    def _effective_limits(self) -> Limits:
        """The configured limits, with a pool of 1 for agents whose login file is mounted read-write
        (two CLIs refreshing one token file at once would corrupt it)."""
        limits = self.settings.limits
        serial = [b for b in self.agents if self.credentials(b).mounts]
        if not serial:
            return limits
        pools = dict(limits.pools)
        for b in serial:
            pools[b] = min(pools.get(b, 1), 1)
        return limits.model_copy(update={"pools": pools})

    def _remove_stale_staging(self) -> None:
        """A dispatch cut off mid-way (crash, kill) leaves its staging folder; nothing refers to it."""
        staging = self.paths.state / "staging"
        if not staging.is_dir():
            return
        for d in staging.iterdir():
            if time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)

    # =====================================================================================
    # lifecycle
    # =====================================================================================
    @property
    def image(self) -> str:
        return os.environ.get(IMAGE_ENV) or self.settings.image or default_image_tag()

    @property
    def root_labels(self) -> dict[str, str]:
        return {LABEL_ROOT: self.paths.root_id}

    def start(self) -> None:
        """Start the background threads (exit watcher, timer) and reconcile once."""
        if self._threads:
            return
        watcher = threading.Thread(
            target=self.runtime.watch_exits,
            args=(self.root_labels, self._on_exit, self._stop),
            name="agentic-exit-watcher",
            daemon=True,
        )
        timer = threading.Thread(target=self._timer_loop, name="agentic-timer", daemon=True)
        self._threads = [watcher, timer]
        for t in self._threads:
            t.start()

    def close(self, timeout: float = 5) -> None:
        """Stop background threads. Running containers keep running; the next start reconciles them."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # the one top-level boundary of this background task
                log.exception("reconcile failed; retrying on the next tick")
            wait = self._next_wakeup()
            self._wake.wait(wait)
            self._wake.clear()

    def _next_wakeup(self) -> float:
        """Sleep until the drain interval or the earliest run deadline, whichever is sooner."""
        wait = self.settings.drain_interval_seconds
        now = time.time()
        for item in self.store.list():
            rec = item.record
            if rec is None or rec.status != Status.RUNNING:
                continue
            started = _parse_time(rec.started_at)
            if started is not None:
                wait = min(wait, max(0.2, started + rec.timeout_seconds - now + 0.1))
        return wait

    # =====================================================================================
    # dispatch
    # =====================================================================================
    def dispatch(self, req: DispatchRequest) -> DispatchResult:
        """Prepare a workspace and start (or queue) an agent on it; returns at once.

        Raises:
            InvalidInputError: a bad argument (nothing is written).
            RepoError: the repository cannot be found or fetched (nothing is written).
            RuntimeUnavailableError: no container engine or no agent image.
        """
        task = req.task.strip()
        if not task:
            raise InvalidInputError("task", "is empty. Say what the agent should do.")
        if len(task) > MAX_TASK_CHARS:
            raise InvalidInputError("task", f"is {len(task)} characters; the limit is {MAX_TASK_CHARS}.")
        spec = parse_agent_spec(req.agent or self.settings.default_agent, self.agents)
        template = req.template or self.settings.default_template
        self.prompts.check(template, req.persona, req.plan_template, req.variables)
        if req.branch is not None:
            check_git_ref("branch", req.branch)
        if req.tag is not None:
            check_component("tag", req.tag)
        for field, value in (("issue", req.issue), ("pr", req.pr)):
            if value is not None and value <= 0:
                raise InvalidInputError(field, f"must be a positive number, got {value}.")
        timeout = req.timeout_seconds or self.settings.timeout_seconds
        if timeout <= 0:
            raise InvalidInputError("timeout_seconds", "must be positive.")
        if req.idempotency_key is not None:
            if not req.idempotency_key.strip() or len(req.idempotency_key) > 200:
                raise InvalidInputError("idempotency_key", "must be 1 to 200 characters.")
            with self._key_lock(req.idempotency_key):
                existing = self._find_by_key(req.idempotency_key)
                if existing is not None:
                    return self._result(existing)
                return self._dispatch(req, spec, template, timeout)
        return self._dispatch(req, spec, template, timeout)

    def _key_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return file_lock(self.paths.state / "keys" / f"{digest}.lock")

    def _find_by_key(self, key: str) -> WorkspaceRecord | None:
        for item in self.store.list():
            if item.record is not None and item.record.idempotency_key == key:
                return item.record
        return None

    def _dispatch(self, req: DispatchRequest, spec: AgentSpec, template: str, timeout: int) -> DispatchResult:
        task = req.task.strip()
        ref = resolve_repo(req.repo, req.org, self.settings.repo_url_template)  # a bad repo is named first
        if not req.dry_run:
            self.preflight(spec.base)

        if req.issue:
            slug = f"task-{req.issue}"
        elif req.pr:
            slug = f"pr-{req.pr}"
        elif req.branch:
            slug = slugify(req.branch, 60)
        else:
            slug = generated_id()
        name = f"{ref.org}/{ref.name}/{slug}"
        target = self.store.paths(name)
        if target.dir.exists():
            raise InvalidInputError(
                "workspace",
                f"{name} exists already. Call agentic_resume on it, or dispatch with another issue/pr/branch.",
            )

        mirror = self.mirrors.ensure(ref, req.branch)
        staging = self.paths.state / "staging" / generated_id()
        staging.mkdir(parents=True)
        try:
            ws = WorkspacePaths(staging)
            branch, base_branch = clone_workspace(mirror, ws.repo, ref.fetch_url, req.branch, slugify(task))
            record = WorkspaceRecord(
                name=name,
                status=Status.QUEUED,
                agent=str(spec),
                repo=req.repo,
                org=ref.org,
                repo_name=ref.name,
                origin_url=ref.fetch_url,
                task=task,
                branch=branch,
                base_branch=base_branch,
                template=template,
                persona=req.persona,
                plan_template=req.plan_template,
                issue=req.issue,
                pr=req.pr,
                tag=req.tag,
                priority=req.priority,
                timeout_seconds=timeout,
                image=self.image,
                runs=1,
                queued_ns=time.time_ns(),
                idempotency_key=None if req.dry_run else req.idempotency_key,
            )
            prompt = self._prepare_run(ws, record, req.variables)
            if req.dry_run:
                return DispatchResult(
                    workspace=name,
                    status="dry_run",
                    agent=str(spec),
                    branch=branch,
                    path=str(target.dir),
                    repo_path=str(target.repo),
                    log_path=str(target.log(spec.base)),
                    commands=[],
                    prompt=prompt,
                    dry_run=True,
                )
            target.dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(target.dir)
            except OSError as e:
                raise InvalidInputError("workspace", f"{name} was created by another dispatch just now.") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self.store.locked(name):
            self.store.write(record)
        self.store.event(record, "dispatched")
        self.drain()
        return self._result(self.store.read(name))

    def preflight(self, base: str | None = None) -> None:
        """Check the engine is reachable and the agent image is present; with ``base``, also that
        the agent's CLI runs in the image and its credentials are found (what `doctor` checks).

        Raises:
            RuntimeUnavailableError: no engine or no image, with what to do about it.
            AgentNotReadyError: the agent cannot run; the doctor's reason.
        """
        self.runtime.check()
        if not self.runtime.image_exists(self.image):
            raise RuntimeUnavailableError(
                f"the agent image {self.image!r} is not built. Run `agentic-dispatch image build` "
                "(or set `image` in the config file), then dispatch again."
            )
        if base is not None:
            problems = self._agent_check(base, self.cli_versions()).problems
            if problems:
                raise AgentNotReadyError(" ".join(problems) + " (`agentic-dispatch doctor` checks every agent.)")

    def cli_versions(self, fresh: bool = False) -> dict[str, str]:
        """Each CLI's ``--version`` line in the agent image; a value starting with ``!`` is the error.

        Read once per image (the result is kept in ``state/cli-versions.json`` by image id).
        """
        clis = sorted({a.cli for a in self.agents.values() if a.cli})
        image_id = self.runtime.image_id(self.image)
        if image_id is None or not clis:
            return {}
        cache = self.paths.state / "cli-versions.json"
        with self._cli_lock:
            try:
                known = json.loads(cache.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                known = {}
            entry = known.get(image_id)
            if fresh or not isinstance(entry, dict) or not set(clis) <= set(entry):
                _, output = self.runtime.run_once(self.image, ["/bin/sh", "-c", _VERSIONS_SCRIPT, "versions", *clis])
                entry = dict.fromkeys(clis, "!the version check did not run")
                for line in output.splitlines():
                    name, _, version = line.partition("\t")
                    if name in entry:
                        entry[name] = version.strip() or "!no output"
                known = {image_id: entry}  # only the current image matters
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(known, indent=2), encoding="utf-8")
                tmp.replace(cache)
            return {str(k): str(v) for k, v in entry.items()}

    def _agent_check(self, base: str, versions: dict[str, str] | None, blocker: str | None = None) -> AgentCheck:
        """``base``'s problems: ``blocker`` (no engine or no image: ``versions`` is then None and the
        CLI is not checked), its credentials, and its CLI's version in the image."""
        agent = self.agents[base]
        creds = self.credentials(base)
        problems = [p for p in (blocker, creds.problem) if p]
        version = versions.get(agent.cli) if agent.cli and versions is not None else None
        if agent.cli and versions is not None and (version is None or version.startswith("!")):
            why = version[1:] if version else "not checked"
            problems.append(
                f"{base}: the {agent.cli} CLI does not run in the image {self.image} ({why}). "
                "Rebuild it with `agentic-dispatch image build`."
            )
            version = None
        return AgentCheck(agent=base, ok=not problems, cli_version=version, credentials=creds.found, problems=problems)

    def doctor(self, agents: list[str] | None = None) -> DoctorReport:
        """Check, per agent: engine reachable, image present, CLI version in the image, credentials."""
        names = [parse_agent_spec(a, self.agents).base for a in agents] if agents else sorted(self.agents)
        try:
            self.runtime.check()
            engine = "reachable"
        except RuntimeUnavailableError as e:
            checks = [self._agent_check(n, None, str(e)) for n in names]
            return DoctorReport(ok=False, engine="not reachable", image=self.image, agents=checks)
        if not self.runtime.image_exists(self.image):
            problem = f"the agent image {self.image} is not built; run `agentic-dispatch image build`."
            checks = [self._agent_check(n, None, problem) for n in names]
            return DoctorReport(ok=False, engine=engine, image=f"{self.image} (missing)", agents=checks)
        versions = self.cli_versions(fresh=True)
        checks = [self._agent_check(n, versions) for n in names]
        return DoctorReport(ok=all(c.ok for c in checks), engine=engine, image=self.image, agents=checks)

    def _prepare_run(
        self, ws: WorkspacePaths, record: WorkspaceRecord, variables: dict[str, str], prompt: str | None = None
    ) -> str:
        """Write the instruction files, the prompt and the task script for run ``record.runs``.

        ``prompt`` is the one :meth:`_render_prompt` made (rendered here when not given).

        Raises:
            InvalidInputError: the prompt is too long to pass to a CLI (nothing is written).
        """
        if prompt is None:
            prompt = self._render_prompt(ws, record, variables)
        for d in (ws.meta, ws.logs, ws.home, ws.meta / "run"):
            d.mkdir(parents=True, exist_ok=True)
        rules = self.prompts.rules_text({"branch": record.branch, "base_branch": record.base_branch or "HEAD"})
        written: list[str] = []
        # the workspace template named like the task template (yours or ours), else `default`
        for fname, text in self.prompts.render_workspace_files(record.template, {"rules": rules}).items():
            dest = ws.repo / fname
            tracked = os.path.lexists(dest) and fname not in self._managed_instruction_files(ws)
            if not tracked:  # never overwrite the repository's own instruction files
                safefs.write_text(ws.repo, dest, text)
                written.append(fname)
        (ws.meta / "instruction-files").write_text("\n".join(written), encoding="utf-8")
        exclude_paths(ws.repo, [*MANAGED_FILES, *written])
        ws.prompt(record.runs).write_text(prompt, encoding="utf-8")
        run_dir = ws.meta / "run"
        (run_dir / "prompt.md").write_text(prompt, encoding="utf-8")
        (run_dir / "task.sh").write_text(record.task + "\n", encoding="utf-8")
        record.prompt_sha256 = prompt_hash(prompt)
        if variables:
            (ws.meta / "variables.json").write_text(json.dumps(variables, indent=2), encoding="utf-8")
        return prompt

    def _render_prompt(
        self, ws: WorkspacePaths, record: WorkspaceRecord, variables: dict[str, str], native: bool = False
    ) -> str:
        """The prompt of run ``record.runs``; on a native resume (the CLI's session already holds the
        task) just the new message with the question and the answer. Writes nothing.

        Raises:
            InvalidInputError: the prompt is too long to pass to a CLI.
        """
        if native:
            prompt = self.prompts.answer_message(record.question, record.answer)
        else:
            ctx = PromptContext(
                task=record.task,
                repo=f"{record.org}/{record.repo_name}",
                branch=record.branch,
                base_branch=record.base_branch or "HEAD",
                template=record.template,
                repo_facts=detect_repo_facts(ws.repo),
                git_log=recent_log(ws.repo),
                persona=record.persona,
                plan_template=record.plan_template,
                variables=variables,
                issue=record.issue,
                pr=record.pr,
                question=record.question if record.answer is not None else None,
                answer=record.answer,
            )
            prompt = self.prompts.render(ctx)
        size = len(prompt.encode())
        if size > MAX_PROMPT_BYTES:
            what = "answer" if record.runs > 1 else "task"
            raise InvalidInputError(
                what, f"makes a prompt of {size} bytes; agents take at most {MAX_PROMPT_BYTES}. Shorten the {what}."
            )
        return prompt

    @staticmethod
    def _managed_instruction_files(ws: WorkspacePaths) -> set[str]:
        try:
            return set((ws.meta / "instruction-files").read_text(encoding="utf-8").split())
        except FileNotFoundError:
            return set()

    # =====================================================================================
    # starting and finishing runs
    # =====================================================================================
    def drain(self) -> list[str]:
        """Start every queued workspace that has a free slot now. Returns the names started.

        A run that cannot start for a reason of its own (the engine refuses its container, a
        file the agent left is unsafe) ends ``failed`` with that reason, and the drain goes on.
        When the engine or the image is missing nothing can start: the queue waits, and
        :meth:`status` says why.
        """
        started: list[str] = []
        with self.scheduler.admission():
            # Login files may appear after the server started (a `codex login` meanwhile):
            # the serialised pools follow what is on disk now.
            self.scheduler.limits = self._effective_limits()
            records = [i.record for i in self.store.list() if i.record is not None]
            stalled = None
            for rec in self.scheduler.pick(records):
                try:
                    self._launch(rec.name)
                    started.append(rec.name)
                except RuntimeUnavailableError as e:
                    log.warning("cannot start %s: %s", rec.name, e)
                    stalled = f"queued work cannot start: {e}"
                    break
                except (LaunchError, UnsafePathError, OSError) as e:
                    self._fail_queued(rec.name, f"the run could not start: {e}")
                except Exception as e:  # a bug: logged, and the run still ends with a reason
                    log.exception("cannot start %s", rec.name)
                    self._fail_queued(rec.name, f"the run could not start: {e}")
            self._stalled = stalled
        return started

    def _fail_queued(self, name: str, reason: str) -> None:
        def apply(rec: WorkspaceRecord) -> bool:
            if rec.status != Status.QUEUED:
                return False
            rec.status = Status.FAILED
            rec.finished_at = utcnow()
            rec.question = f"{reason}. Fix that, then call agentic_resume to run it again."
            return True

        try:
            self.store.update(name, apply)
        except Exception:  # the record itself is unreadable: status reports it as such
            log.exception("cannot mark %s failed", name)

    def _container_name(self, record: WorkspaceRecord) -> str:
        base = slugify(f"{record.org}-{record.repo_name}-{record.name.rsplit('/', 1)[-1]}", 80)
        return f"agentic-{base}-r{record.runs}-{self.paths.root_id[:6]}"

    def _launch(self, name: str) -> None:
        """Start the container for a queued workspace (under the admission lock)."""
        with self.store.locked(name) as ws:
            record = self.store.read(name)
            if record.status != Status.QUEUED:
                return
            spec = parse_agent_spec(record.agent, self.agents)
            agent = self.agents[spec.base]
            labels = {
                **self.root_labels,
                LABEL_WORKSPACE: name,
                LABEL_RUN: str(record.runs),
                LABEL_AGENT: record.agent,
            }
            # A crash between starting a container and recording it leaves a labelled container:
            # adopt it instead of starting the same run twice.
            existing = self.runtime.list({**self.root_labels, LABEL_WORKSPACE: name, LABEL_RUN: str(record.runs)})
            for c in existing:
                if not c.started:  # created but never started: start afresh
                    self.runtime.remove(c.id)
            existing = [c for c in existing if c.started]
            if existing:
                container_id = existing[0].id
            else:
                prompt = (ws.meta / "run" / "prompt.md").read_text(encoding="utf-8")
                cfg = self.settings.agents.get(spec.base)
                creds = self.credentials(spec.base)
                plan = agent.plan(
                    RunContext(
                        task=record.task,
                        prompt=prompt,
                        model=spec.model or (cfg.model if cfg else None),
                        run=record.runs,
                        answer=record.answer,
                        question=record.question,
                        resume_session=record.resume_session,
                        base_url=_container_url(cfg.base_url) if cfg and cfg.base_url else None,
                        max_retries=cfg.max_retries if cfg else None,
                        env=creds.env,
                    )
                )
                # The agent home is the agent's to write: every path in it goes through safefs.
                for rel, text in plan.home_files.items():
                    safefs.write_text(ws.home, ws.home / rel, text, mode=0o600)
                for source, rel in creds.copies:  # after the agent's own files: the user's files win
                    safefs.copy_file(ws.home, source, ws.home / rel, mode=0o600, keep_newer=True)
                file_mounts = []
                for source, rel in creds.mounts:
                    # the mount point, made by us so it is owned by the host user
                    safefs.ensure_file(ws.home, ws.home / rel, mode=0o600)
                    file_mounts.append(Mount(source, f"{CONTAINER_HOME}/{rel}"))
                log_file = ws.log(spec.base)
                header = f"{RUN_HEADER}{record.runs} of {name} ({record.agent}) at {utcnow()} ===\n"
                safefs.append_text(ws.logs, log_file, header)
                env = {
                    "HOME": CONTAINER_HOME,
                    "AGENTIC_WORKSPACE": name,
                    "AGENTIC_LOG": f"{CONTAINER_LOGS}/{log_file.name}",
                    **plan.env,
                }
                command = [
                    "/bin/sh",
                    "-c",
                    'exec "$@" >>"$AGENTIC_LOG" 2>&1',  # output lands in the log as it comes; exit code kept
                    "agentic-run",
                    *plan.argv,
                ]
                res = self.settings.resources
                container_id = self.runtime.start(
                    ContainerSpec(
                        image=record.image or self.image,
                        command=command,
                        name=self._container_name(record),
                        workdir=CONTAINER_WORKDIR,
                        user=f"{os.getuid()}:{os.getgid()}",
                        env=env,
                        mounts=[
                            Mount(ws.repo, CONTAINER_WORKDIR),
                            Mount(ws.home, CONTAINER_HOME),
                            Mount(ws.logs, CONTAINER_LOGS),
                            Mount(ws.meta / "run", CONTAINER_RUN, read_only=True),
                            *file_mounts,
                        ],
                        labels=labels,
                        memory=res.memory or None,
                        cpus=res.cpus,
                        pids=res.pids,
                        network=res.network,
                    )
                )
            self.scheduler.note_start(record.agent)
            record.status = Status.RUNNING
            record.container_id = container_id
            record.started_at = utcnow()
            record.finished_at = None
            record.exit_code = None
            self.store.write(record)
        self.store.event(record, "started", container_id=container_id)
        self._wake.set()  # the timer recomputes the nearest deadline

    def _on_exit(self, event: ExitEvent) -> None:
        name = event.labels.get(LABEL_WORKSPACE)
        if not name:
            return
        try:
            self.finalise(name, event.container_id, event.exit_code)
        except Exception:  # the background boundary: never let one bad record stop the watcher
            log.exception("cannot finalise %s", name)
        try:
            self.drain()
        except Exception:
            log.exception("cannot drain the queue after %s exited", name)

    def finalise(self, name: str, container_id: str, exit_code: int | None) -> bool:
        """Apply the final-status rule to a run whose container has exited (or was stopped).

        Returns ``False`` when the record had already moved on (idempotent).
        """
        changed = False

        def apply(rec: WorkspaceRecord) -> bool:
            nonlocal changed
            if rec.status != Status.RUNNING or rec.container_id != container_id:
                return False
            ws = self.store.paths(name)
            base = agent_base(rec.agent)
            secrets = list(self.credentials(base).env.values())  # a CLI may echo its key: never repeat it
            rec.exit_code = exit_code
            rec.finished_at = utcnow()
            rec.summary = self._summarize(base, ws, secrets)
            try:
                question = redact(self._blocked_question(ws), secrets) or ""
                unsafe = None
            except UnsafePathError as e:
                question, unsafe = "", str(e)
            stop_status, stop_reason = rec.stop_status, rec.stop_reason
            rec.stop_status = rec.stop_reason = None
            if stop_status == Status.CANCELLED:
                rec.status = Status.CANCELLED
                rec.question = stop_reason
            elif unsafe is not None:
                rec.status = Status.FAILED
                rec.question = f"the agent's BLOCKED.md cannot be read: {unsafe}"
            elif question:
                rec.status = Status.BLOCKED
                rec.question = question
            elif stop_status is not None:
                rec.status = stop_status
                rec.question = stop_reason
            elif exit_code != 0:
                rec.status = Status.FAILED
                rec.question = self._failure_reason(rec, ws, exit_code, secrets)
            else:
                rec.status = Status.COMPLETED
                rec.question = None
            changed = True
            return True

        rec = self.store.update(name, apply)
        if changed:
            self.runtime.remove(container_id)
            if rec.status == Status.FAILED and rec.started_at:
                ran = time.time() - (_parse_time(rec.started_at) or time.time())
                if self.scheduler.note_failure(rec.agent, ran):
                    log.warning("pool %s paused after repeated fast failures", agent_base(rec.agent))
            with self._finished:
                self._finished.notify_all()
        return changed

    @staticmethod
    def _blocked_question(ws: WorkspacePaths) -> str:
        """The text of ``repo/BLOCKED.md`` (its first 64 KiB), or ``""`` when there is none.

        Raises:
            UnsafePathError: the agent left a link or a non-file there.
        """
        text = safefs.read_text(ws.repo, ws.repo / "BLOCKED.md", MAX_QUESTION_BYTES)
        return (text or "").strip()

    def _summarize(self, base: str, ws: WorkspacePaths, secrets: Iterable[str]) -> RunSummary | None:
        try:
            safefs.check_file(ws.logs, ws.log(base))  # only a regular file is parsed
        except UnsafePathError as e:
            log.warning("not reading the log of %s: %s", ws.dir, e)
            return None
        summary = self.agents[base].summarize(ws.log(base))
        if summary is None:
            return None
        return summary.model_copy(
            update={"final_message": redact(summary.final_message, secrets), "error": redact(summary.error, secrets)}
        )

    def _stop_run(self, name: str, status: Status, reason: str, container_id: str | None = None) -> bool:
        """Stop a running workspace's container and finalise it as ``status`` with ``reason``.

        With ``container_id``, only that run is stopped (a timeout decided on an older view of the
        record must not stop the run a resume started since).
        """

        def mark(rec: WorkspaceRecord) -> bool:
            if rec.status != Status.RUNNING or (container_id is not None and rec.container_id != container_id):
                return False
            rec.stop_status, rec.stop_reason = status, reason
            return True

        rec = self.store.update(name, mark)
        if rec.status != Status.RUNNING or rec.container_id is None:
            return False
        self.runtime.stop(rec.container_id, timeout=5)
        info = self.runtime.inspect(rec.container_id)
        self.finalise(name, rec.container_id, info.exit_code if info else None)
        return True

    def _failure_reason(
        self, rec: WorkspaceRecord, ws: WorkspacePaths, exit_code: int | None, secrets: Iterable[str]
    ) -> str:
        if exit_code is None:
            why = "the agent container ended without an exit code"
        elif exit_code == 137:
            why = "the agent was killed (exit code 137: out of memory or stopped)"
        else:
            why = f"the agent exited with code {exit_code}"
        if rec.summary and rec.summary.error:
            why += f": {rec.summary.error}"
        last = [ln for ln in _tail(ws, agent_base(rec.agent), 5).splitlines() if ln]
        if last and not last[-1].startswith(RUN_HEADER) and not (rec.summary and rec.summary.error):
            why += f". Last output: {last[-1][:300]}"
        return redact(why, secrets) or why

    def reconcile(self) -> None:
        """Match every running record with its container; enforce timeouts; drain the queue."""
        now = time.time()
        listed = self.store.list()
        for item in listed:
            rec = item.record
            if rec is None or rec.status != Status.RUNNING or rec.container_id is None:
                continue
            info = self.runtime.inspect(rec.container_id)
            if info is None:
                self._fail_vanished(rec)
            elif not info.running:
                self.finalise(rec.name, rec.container_id, info.exit_code)
            else:
                started = _parse_time(rec.started_at) or now
                if now - started > rec.timeout_seconds:
                    self._stop_run(
                        rec.name,
                        Status.FAILED,
                        f"timed out after {rec.timeout_seconds} s; the container was stopped and the log so far kept",
                        rec.container_id,
                    )
        self._adopt_started(listed)
        self.drain()

    @staticmethod
    def _queued_runs(listed: list[Listed]) -> set[tuple[str, str]]:
        """(workspace, run) of every queued record: the labels its container will carry."""
        return {(i.record.name, str(i.record.runs)) for i in listed if i.record and i.record.status == Status.QUEUED}

    def _adopt_started(self, listed: list[Listed]) -> None:
        """Record the runs whose container started but whose record still says ``queued``.

        A server killed between starting a container and writing the record leaves that; the
        run is adopted whatever the limits say (it is running already), never started twice.
        ``_launch`` re-reads each record under its lock, so an older ``listed`` is safe.
        """
        queued = self._queued_runs(listed)
        if not queued:
            return
        started = {
            c.labels.get(LABEL_WORKSPACE)
            for c in self.runtime.list(self.root_labels)
            if (c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)) in queued and c.started
        }
        if started:
            with self.scheduler.admission():
                for name in sorted(n for n in started if n):
                    try:
                        self._launch(name)  # finds the container and adopts it
                    except Exception:
                        log.exception("cannot adopt the running container of %s", name)

    def _fail_vanished(self, rec: WorkspaceRecord) -> None:
        def apply(r: WorkspaceRecord) -> bool:
            if r.status != Status.RUNNING or r.container_id != rec.container_id:
                return False
            r.status = Status.FAILED
            r.finished_at = utcnow()
            r.question = (
                f"the agent container {str(rec.container_id)[:12]} vanished (removed outside agentic-dispatch); "
                "its work so far is in the workspace. Resume to run again."
            )
            return True

        self.store.update(rec.name, apply)

    # =====================================================================================
    # status, wait, resume, sync
    # =====================================================================================
    def status(
        self, workspace: str | None = None, status: str | None = None, limit: int = 50, log_lines: int = 0
    ) -> StatusReport:
        """Counts per status and a row per workspace (newest first)."""
        if workspace is not None:
            self.store.paths(workspace)  # validates the name
        if status is not None and status not in {s.value for s in Status}:
            raise InvalidInputError("status", f"unknown status {status!r}; use one of {', '.join(Status)}.")
        if limit < 1:
            raise InvalidInputError("limit", "must be at least 1.")
        counts: dict[str, int] = {s.value: 0 for s in Status}
        rows: list[WorkspaceRow] = []
        listed = self.store.list()
        if workspace is not None and not any(i.name == workspace for i in listed):
            self.store.read(workspace)  # raises WorkspaceNotFoundError with the recovery hint
        for item in listed:
            if workspace is not None and item.name != workspace:
                continue
            rec = item.record
            if rec is None:
                counts["unreadable"] = counts.get("unreadable", 0) + 1
                rows.append(
                    WorkspaceRow(
                        name=item.name,
                        repo="?",
                        agent="?",
                        status="unreadable",
                        runs=0,
                        branch="?",
                        error=str(item.error),
                    )
                )
                continue
            counts[rec.status.value] += 1
            if status is not None and rec.status.value != status:
                continue
            tail = None
            if log_lines > 0:
                base = agent_base(rec.agent)
                tail = redact(_tail(self.store.paths(rec.name), base, log_lines), self.credentials(base).env.values())
            rows.append(
                WorkspaceRow(
                    name=rec.name,
                    repo=rec.repo,
                    agent=rec.agent,
                    status=rec.status,
                    runs=rec.runs,
                    branch=rec.branch,
                    question=rec.question,
                    started_at=rec.started_at,
                    updated_at=rec.updated_at,
                    finished_at=rec.finished_at,
                    exit_code=rec.exit_code,
                    summary=rec.summary,
                    log_tail=tail,
                )
            )
        rows.sort(key=lambda r: r.updated_at or "", reverse=True)
        frozen = self.scheduler.state().frozen
        notes = ["the queue is frozen: new dispatches wait until agentic_dispatch_start"] if frozen else []
        if self._stalled and counts[Status.QUEUED.value]:
            notes.append(self._stalled)
        holds = [
            PoolHoldRow(
                pool=h.pool,
                reason=h.reason,
                until=datetime.fromtimestamp(h.until, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
                if h.until
                else None,
            )
            for h in self.scheduler.holds()
        ]
        try:
            orphans = self.orphans()
        except RuntimeUnavailableError as e:
            orphans, notes = [], [*notes, str(e)]
        return StatusReport(
            counts=counts, workspaces=rows[:limit], frozen=frozen, holds=holds, orphans=orphans, notes=notes
        )

    def wait(self, workspace: str, timeout: float) -> WorkspaceRecord:
        """Block until ``workspace`` leaves queued/running or ``timeout`` passes; return its record."""
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:
                rec = self.store.read(workspace)
                left = deadline - time.monotonic()
                if rec.status not in ACTIVE_STATUSES or left <= 0:
                    return rec
                if not self._threads:  # no watcher in this process: look at the container ourselves
                    self.reconcile()
                    rec = self.store.read(workspace)
                    if rec.status not in ACTIVE_STATUSES:
                        return rec
                self._finished.wait(min(left, 1.0))

    def resume(self, workspace: str, answer: str | None = None, agent: str | None = None) -> DispatchResult:
        """Run the agent again in the same workspace and branch; ``runs`` goes up by one.

        Raises:
            WorkspaceNotFoundError: no such workspace.
            StateError: the workspace is queued, running or cancelled.
            InvalidInputError: a bad agent or an over-long answer.
        """
        if answer is not None and len(answer) > MAX_ANSWER_CHARS:
            raise InvalidInputError("answer", f"is {len(answer)} characters; the limit is {MAX_ANSWER_CHARS}.")
        spec = parse_agent_spec(agent, self.agents) if agent else None
        current = self.store.read(workspace)  # before any lock: an unknown name must leave nothing behind
        self.preflight(spec.base if spec else agent_base(current.agent))
        with self.store.locked(workspace) as ws:
            rec = self.store.read(workspace)
            if rec.status not in RESUMABLE_STATUSES:
                raise StateError(
                    f"{workspace} is {rec.status}; only blocked, failed or completed workspaces can be resumed. "
                    + (
                        "Wait for it with agentic_status, or cancel it first."
                        if rec.status in ACTIVE_STATUSES
                        else "Dispatch the task again instead."
                    )
                )
            # Native resume: continue the CLI's own session when the agent home still has it;
            # otherwise a fresh session gets the whole task with the question and the answer.
            new_agent = str(spec) if spec is not None else rec.agent
            base = agent_base(new_agent)
            # The last session the CLI reported; a run cut off before its CLI said anything
            # (killed, timed out) leaves the session it was resuming as the last one known.
            session = (rec.summary.session_id if rec.summary else None) or rec.resume_session
            native = (
                session is not None
                and base == agent_base(rec.agent)
                and self.agents[base].has_session(ws.home, session)
            )
            answer = answer.strip() if answer is not None and answer.strip() else None
            nxt = rec.model_copy(
                update={
                    "agent": new_agent,
                    "answer": answer,
                    "resume_session": session if native else None,
                    "runs": rec.runs + 1,
                    "status": Status.QUEUED,
                    "queued_ns": time.time_ns(),
                    "container_id": None,
                    "exit_code": None,
                    "finished_at": None,
                }
            )
            variables = self._saved_variables(ws)
            prompt = self._render_prompt(ws, nxt, variables, native)  # may refuse; nothing changed yet
            blocked = ws.repo / "BLOCKED.md"
            if os.path.lexists(blocked):  # moved as it is: a rename never follows a link
                blocked.rename(ws.meta / f"BLOCKED-run{rec.runs}.md")
            answer_file = ws.repo / "ANSWER.md"
            if answer is not None:
                safefs.write_text(ws.repo, answer_file, answer + "\n")
            else:
                answer_file.unlink(missing_ok=True)
            rec = nxt
            # The prompt of the new run carries the question and the answer; the record does not
            # (a queued or running workspace has no open question).
            self._prepare_run(ws, rec, variables, prompt)
            rec.question = None
            self.store.write(rec)
        self.store.event(rec, "resumed")
        self.drain()
        return self._result(self.store.read(workspace))

    def cancel(self, workspace: str) -> CancelResult:
        """Cancel a workspace: a queued one never starts, a running one is stopped; others are left as they are."""
        self.store.paths(workspace)

        def dequeue(rec: WorkspaceRecord) -> bool:
            if rec.status != Status.QUEUED:
                return False
            rec.status = Status.CANCELLED
            rec.question = "cancelled before it started"
            rec.finished_at = utcnow()
            return True

        with self.scheduler.admission():  # so a drain cannot start it while we look
            rec = self.store.read(workspace)
            if rec.status == Status.QUEUED:
                rec = self.store.update(workspace, dequeue)
                return CancelResult(
                    workspace=workspace, status=rec.status, changed=True, message="removed from the queue"
                )
        if rec.status == Status.RUNNING and self._stop_run(workspace, Status.CANCELLED, "cancelled while running"):
            rec = self.store.read(workspace)
            return CancelResult(
                workspace=workspace,
                status=rec.status,
                changed=True,
                message="the container was stopped; the work so far stays in the workspace",
            )
        rec = self.store.read(workspace)
        return CancelResult(
            workspace=workspace,
            status=rec.status,
            changed=False,
            message=f"nothing to cancel: the workspace is {rec.status}",
        )

    def freeze(self, now: bool = False) -> QueueState:
        """Stop starting work (new dispatches queue); with ``now``, also stop running agents."""
        self.scheduler.set_frozen(True)
        stopped = []
        if now:
            for item in self.store.list():
                running = item.record is not None and item.record.status == Status.RUNNING
                if running and self._stop_run(
                    item.name, Status.CANCELLED, "stopped by agentic_dispatch_shutdown(now=true)"
                ):
                    stopped.append(item.name)
        return QueueState(
            frozen=True,
            stopped=stopped,
            message="frozen: new dispatches queue and nothing starts until agentic_dispatch_start"
            + (f"; stopped {len(stopped)} running agent(s)" if now else "; running agents go on"),
        )

    def unfreeze(self) -> QueueState:
        self.scheduler.set_frozen(False)
        started = self.drain()
        return QueueState(frozen=False, message=f"unfrozen; started {len(started)} queued workspace(s)")

    def _orphan_containers(self) -> list[ContainerInfo]:
        """Containers labelled with this root that no record knows.

        Not orphans: the container of a running record; one a queued record is about to adopt
        (same workspace and run); one whose workspace's record cannot be read (it is reported
        as unreadable, and its container is left alone until a person has looked).
        """
        listed = self.store.list()
        known = {
            i.record.container_id
            for i in listed
            if i.record is not None and i.record.status == Status.RUNNING and i.record.container_id
        }
        adopting = self._queued_runs(listed)
        unreadable = {i.name for i in listed if i.record is None}
        return [
            c
            for c in self.runtime.list(self.root_labels)
            if c.id not in known
            and (c.labels.get(LABEL_WORKSPACE), c.labels.get(LABEL_RUN)) not in adopting
            and c.labels.get(LABEL_WORKSPACE) not in unreadable
        ]

    def orphans(self) -> list[str]:
        """The orphaned containers, described for a person (id, name, workspace label)."""
        return [f"{c.id[:12]} {c.name} ({c.labels.get(LABEL_WORKSPACE, '?')})" for c in self._orphan_containers()]

    def cleanup(self) -> CleanupReport:
        """Remove the orphaned containers :meth:`orphans` reports."""
        removed = []
        with self.scheduler.admission():  # no container starts (here or in another server) while we look
            for c in self._orphan_containers():
                self.runtime.remove(c.id)
                removed.append(f"{c.id[:12]} {c.name}")
        return CleanupReport(removed=removed, message=f"removed {len(removed)} orphaned container(s)")

    @staticmethod
    def _saved_variables(ws: WorkspacePaths) -> dict[str, str]:
        try:
            data = json.loads((ws.meta / "variables.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def sync(self, workspace: str | None = None) -> SyncReport:
        """Result delivery is not built yet: report plainly what would be delivered."""
        if workspace is not None:
            self.store.read(workspace)
        pending = [
            i.record.name
            for i in self.store.list()
            if i.record is not None
            and i.record.status not in ACTIVE_STATUSES
            and (workspace is None or i.record.name == workspace)
        ]
        return SyncReport(
            delivered=[],
            pending=pending,
            next_retry_at=None,
            message=(
                "Sync is not implemented yet: nothing was pushed and no record was reported. The work is safe in "
                "each workspace's repo/ folder; push a branch by hand with `git -C <repo_path> push origin <branch>`."
            ),
        )

    # =====================================================================================
    def _result(self, rec: WorkspaceRecord) -> DispatchResult:
        ws = self.store.paths(rec.name)
        base = agent_base(rec.agent)
        log_path = ws.log(base)
        return DispatchResult(
            workspace=rec.name,
            status=rec.status.value,
            agent=rec.agent,
            branch=rec.branch,
            path=str(ws.dir),
            repo_path=str(ws.repo),
            log_path=str(log_path),
            commands=[
                f"agentic-dispatch status {rec.name}",
                f"tail -f {log_path}",
                f"git -C {ws.repo} log --oneline {rec.base_branch or 'HEAD'}..{rec.branch}"
                if rec.base_branch and rec.base_branch != "HEAD"
                else f"git -C {ws.repo} log --oneline -n 10",
                f"docker ps --filter label={LABEL_WORKSPACE}={rec.name}",
            ],
        )


def _container_url(url: str) -> str:
    """``url`` as a container reaches it: loopback names mean the host, not the container."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _LOOPBACK_HOSTS:
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + "host.docker.internal" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
