"""The intake: a request becomes a validated spec, a staged workspace and a queued record;
a resume turns a finished workspace into its next queued run.

Bad input is refused before anything is written; a workspace is built in a staging folder
and renamed into place whole, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

from ... import safefs
from ...agents import AgentSpec, agent_base
from ...config import Paths, Settings
from ...credentials import redact
from ...errors import InvalidInputError, StateError, UnsafePathError
from ...gitops import file_lock
from ...mirrors import MirrorCache
from ...models import (
    ACTIVE_STATUSES,
    RESUMABLE_STATUSES,
    DispatchRequest,
    DispatchResult,
    RetryPolicy,
    RetryState,
    Status,
    WorkspaceRecord,
)
from ...naming import generated_id, slugify
from ...repos import RepoRef, resolve_repo
from ...runtime.base import LABEL_WORKSPACE
from ...store import StatusStore, WorkspacePaths
from ...sync.shim import read_ref_value
from ...workspace import clone_workspace
from ..catalog import AgentCatalog
from ..containers import git_in
from ..run_files import RunFiles
from ..runs.executor import RunLifecycle
from ..runs.lifecycle import Resumed, new_record
from ..runs.retention import check_disk_floor
from .preflight import Preflight

__all__ = ["Intake"]

MAX_ANSWER_CHARS = 50_000
REVIEW_TEMPLATE, REVIEWER_PERSONA = "review", "reviewer"  # a reviewer's defaults
MAX_QUESTION_BYTES = 64 * 1024  # what finalise reads of BLOCKED.md


class Intake:
    """New work and resumed work, up to a queued record; the drain then starts what may start."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        store: StatusStore,
        catalog: AgentCatalog,
        mirrors: MirrorCache,
        preflight: Preflight,
        run_files: RunFiles,
        runs: RunLifecycle,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.store = store
        self.catalog = catalog
        self.mirrors = mirrors
        self.preflight = preflight
        self.run_files = run_files
        self.runs = runs

    def dispatch(self, req: DispatchRequest, *, slug: str | None = None, review_round: int = 1) -> DispatchResult:
        """Prepare a workspace and queue its first run; returns at once. ``slug`` names the workspace and
        ``review_round`` numbers a reviewer's round (a review loop's next round).

        Raises:
            InvalidInputError: a bad argument (nothing is written).
            RepoError: the repository cannot be found or fetched (nothing is written).
            RuntimeUnavailableError: no container engine or no agent image.
            AgentNotReadyError: the agent cannot run here (its CLI or credentials).
            StateError: the workspace could not be recorded (nothing is kept).
        """
        spec = self.catalog.parse(req.agent or self.settings.default_agent)
        req = self._with_base(req)
        self._check_dependencies(req.depends_on or [])
        template = req.template or self.settings.default_template
        self.run_files.prompts.check(template, req.persona, req.plan_template, req.variables)
        timeout = req.timeout_seconds if req.timeout_seconds is not None else self.settings.timeout_seconds
        if req.idempotency_key is None:
            return self._dispatch(req, spec, template, timeout, slug, review_round)
        with self._key_lock(req.idempotency_key):
            existing = self.store.with_key(req.idempotency_key)
            if existing is not None:
                self._same_request(existing, req, str(spec))
                return self.result(existing)
            return self._dispatch(req, spec, template, timeout, slug, review_round)

    def _with_base(self, req: DispatchRequest) -> DispatchRequest:
        """A dispatch with ``base_workspace`` depends on it, and its clone starts from the branch that
        workspace started from (its own branch moves to the base's end when it first starts). A reviewer
        (``review_of``) starts from the reviewed branch, with the review template and persona by default.

        Raises:
            InvalidInputError: no such base workspace, or it is of another repository; a reviewer based
                on another workspace than the one it reviews; review rounds without a workspace to review.
        """
        if req.review_of is None and req.review_rounds:
            raise InvalidInputError("review_rounds", "needs review_of: the workspace to review again after its fix.")
        if req.review_of is not None:
            if req.base_workspace not in (None, req.review_of):
                raise InvalidInputError(
                    "base_workspace",
                    f"a reviewer starts from the branch it reviews ({req.review_of}); leave base_workspace out.",
                )
            req = req.model_copy(
                update={
                    "base_workspace": req.review_of,
                    "template": req.template or REVIEW_TEMPLATE,
                    "persona": req.persona or REVIEWER_PERSONA,
                }
            )
        if req.base_workspace is None:
            return req
        base = self.store.find(req.base_workspace)
        field = "review_of" if req.review_of is not None else "base_workspace"
        if base is None:
            raise InvalidInputError(
                field,
                f"there is no workspace {req.base_workspace} (or its record cannot be read). Name one agentic_status "
                "lists.",
            )
        ref = resolve_repo(req.repo, req.org, self.settings.repo_url_template, self.paths.root)
        if (ref.org, ref.name) != (base.org, base.repo_name):
            raise InvalidInputError(
                field,
                f"{base.name} is a workspace of {base.org}/{base.repo_name}, not of {ref.org}/{ref.name}: "
                f"dispatch on {base.repo} to start from its branch.",
            )
        return req.model_copy(update={"depends_on": list(dict.fromkeys([*(req.depends_on or []), base.name]))})

    def _start_branch(self, req: DispatchRequest) -> str | None:
        """The branch the clone is made from: the one asked for, else a base workspace's own start."""
        base = self.store.find(req.base_workspace) if req.base_workspace else None
        if req.branch is None and base is not None and base.base_branch not in (None, "HEAD"):
            return base.base_branch
        return req.branch

    def _retry_state(self, req: DispatchRequest) -> RetryState | None:
        """The dispatch's retry policy (its own ``retry``, else ``[retry]``), with the backoff from the config."""
        cfg = self.settings.retry
        policy = req.retry or RetryPolicy(max=cfg.max, on=cfg.on)
        on = cfg.on if policy.on is None else policy.on
        if policy.max == 0 or not on:
            return None
        return RetryState(
            max=policy.max,
            on=list(dict.fromkeys(on)),
            backoff_seconds=cfg.backoff_seconds,
            max_backoff_seconds=cfg.max_backoff_seconds,
        )

    def _check_dependencies(self, names: list[str]) -> None:
        """Each workspace a dispatch depends on exists (so a chain can never be a cycle: what it waits
        for was there before it).

        Raises:
            InvalidInputError: one of them does not exist.
        """
        for name in names:
            if not self.store.exists(name):
                raise InvalidInputError(
                    "depends_on",
                    f"there is no workspace {name}. Name workspaces that exist (agentic_status lists them); "
                    "dispatch the first step of a chain before the steps that wait for it.",
                )

    @staticmethod
    def _same_request(existing: WorkspaceRecord, req: DispatchRequest, agent: str) -> None:
        """A key names one request: the same key with another repository, task or agent is a mistake
        the caller must hear about, not a silent answer about other work.

        Raises:
            InvalidInputError: the request differs from the one the key was first used with.
        """
        differs = [
            what
            for what, theirs, ours in (
                ("repo", existing.repo, req.repo),
                ("task", existing.task, req.task),
                ("agent", existing.agent, agent),
            )
            if theirs != ours
        ]
        if differs:
            raise InvalidInputError(
                "idempotency_key",
                f"was first used for {existing.name} with another {', '.join(differs)}. "
                "Use a new key for new work (the same key returns the first dispatch).",
            )

    def _key_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return file_lock(self.paths.key_locks / f"{digest}.lock")

    def _dispatch(
        self,
        req: DispatchRequest,
        spec: AgentSpec,
        template: str,
        timeout: int,
        slug: str | None = None,
        review_round: int = 1,
    ) -> DispatchResult:
        ref = resolve_repo(req.repo, req.org, self.settings.repo_url_template, self.paths.root)  # named first
        check_disk_floor(self.paths.root, self.settings.retention.min_free_gib)  # before anything is cloned
        if not req.dry_run:
            self.preflight.check(spec.base)
        name = f"{ref.org}/{ref.name}/{slug or self._slug(req)}"
        target = self.store.paths(name)
        if target.dir.exists():
            raise InvalidInputError(
                "workspace",
                f"{name} exists already. Call agentic_resume on it, or dispatch with another issue/pr/branch.",
            )
        start_branch = self._start_branch(req)
        mirror = self.mirrors.ensure(ref, start_branch)
        staging = self.paths.staging / generated_id()
        staging.mkdir(parents=True)
        try:
            staged = WorkspacePaths(staging)
            record, prompt = self._stage(staged, mirror, ref, req, name, spec, template, timeout, start_branch)
            record.review_round = review_round
            if req.dry_run:
                return self.result(record, dry_run_prompt=prompt)
            target.dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(target.dir)
            except OSError as e:
                if target.dir.exists():
                    raise InvalidInputError("workspace", f"{name} was created by another dispatch just now.") from e
                raise StateError(
                    f"the workspace {name} could not be moved into place ({e.strerror or e}); nothing was kept. "
                    "Free disk space or fix the permissions of the root, then dispatch again."
                ) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.runs.commit_new(record)  # the record and its event, or the folder removed and an error
        return self.result(record)

    @staticmethod
    def _slug(req: DispatchRequest) -> str:
        if req.issue:
            return f"task-{req.issue}"
        if req.pr:
            return f"pr-{req.pr}"
        if req.branch:
            return slugify(req.branch, 60)
        return generated_id()

    def _stage(
        self,
        ws: WorkspacePaths,
        mirror: Path,
        ref: RepoRef,
        req: DispatchRequest,
        name: str,
        spec: AgentSpec,
        template: str,
        timeout: int,
        start_branch: str | None,
    ) -> tuple[WorkspaceRecord, str]:
        """Clone and write the first run's files into the staging folder ``ws``; the record to commit."""
        task = req.task
        # The workspace's own name leads the branch's: two workspaces of one repository (the same task
        # to three agents) never share a branch, so no delivery can overwrite another's.
        branch_slug = slugify(f"{name.rsplit('/', 1)[-1]}-{task}", 80)
        branch, base_branch = clone_workspace(mirror, ws.repo, ref.fetch_url, start_branch, branch_slug)
        # Read now, while the clone is ours alone: the agent could move its origin refs later.
        base_commit = read_ref_value(ws.repo, f"refs/heads/{branch}")
        record = new_record(
            name=name,
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
            image=self.catalog.image,
            runs=1,
            queued_ns=time.time_ns(),
            idempotency_key=None if req.dry_run else req.idempotency_key,
            lock_key=req.lock,
            base_commit=base_commit,
            scope=req.scope if req.scope is not None else self.settings.defaults.scope,
            scope_mode=req.scope_mode or self.settings.defaults.scope_mode,
            depends_on=list(dict.fromkeys(req.depends_on or [])),
            base_workspace=req.base_workspace,
            retry=self._retry_state(req),
            review_of=req.review_of,
            review_rounds=req.review_rounds,
            qa_enabled=self.settings.qa.enabled if req.qa is None else req.qa,
        )
        return record, self.run_files.prepare(ws, record, req.variables)

    def resume(
        self, workspace: str, answer: str | None = None, agent: str | None = None, blocked_run: int | None = None
    ) -> DispatchResult:
        """Run the agent again in the same workspace and branch; ``runs`` goes up by one. With
        ``blocked_run``, only while the workspace is blocked on that run: an answer to its question.

        Raises:
            WorkspaceNotFoundError: no such workspace.
            StateError: the workspace is queued, running or cancelled (or, with ``blocked_run``, no
                longer blocked on that run).
            InvalidInputError: a bad agent or an over-long answer.
            UnsafePathError: the agent left a link or a folder where ANSWER.md goes.
        """
        if answer is not None and len(answer) > MAX_ANSWER_CHARS:
            raise InvalidInputError("answer", f"is {len(answer)} characters; the limit is {MAX_ANSWER_CHARS}.")
        spec = self.catalog.parse(agent) if agent else None
        current = self.store.read(workspace)  # before any lock: an unknown name must leave nothing behind
        self.preflight.check(spec.base if spec else agent_base(current.agent))
        with self.store.locked(workspace) as ws:
            rec = self.store.read(workspace)
            if blocked_run is not None and (rec.status != Status.BLOCKED or rec.runs != blocked_run):
                raise StateError(
                    f"{workspace} no longer waits for this answer: it is {rec.status}, run {rec.runs} "
                    f"(the question was run {blocked_run}'s). Look at it with agentic_status."
                )
            if rec.status not in RESUMABLE_STATUSES:
                advice = (
                    "Wait for it with agentic_status, or cancel it first."
                    if rec.status in ACTIVE_STATUSES
                    else "Dispatch the task again instead."
                )
                raise StateError(
                    f"{workspace} is {rec.status}; only blocked, failed or completed workspaces can be resumed. "
                    + advice
                )

            def prepare(nxt: WorkspaceRecord) -> None:
                """The new run's files, before its record says it is queued (each step may refuse)."""
                variables = self.run_files.saved_variables(ws)
                # The new run's prompt carries the last question (or failure) and the answer; the
                # record does not (a queued run has no open question).
                asked = nxt.model_copy(update={"question": rec.question or rec.reason})
                prompt = self.run_files.render(ws, asked, variables, nxt.resume_session is not None)
                self._hand_over_answer(ws, rec.runs, nxt.answer, self.catalog.secrets(agent_base(rec.agent)))
                self.run_files.prepare(ws, asked, variables, prompt)

            nxt = self.runs.apply(
                workspace, self._next_run(ws, rec, str(spec) if spec is not None else rec.agent, answer), prepare
            )
        if nxt is None:  # pragma: no cover (checked above, under the same lock)
            raise StateError(f"{workspace} cannot be resumed now; look at it with agentic_status.")
        return self.result(nxt)

    def _next_run(self, ws: WorkspacePaths, rec: WorkspaceRecord, new_agent: str, answer: str | None) -> Resumed:
        """The run after ``rec``. Native resume continues the CLI's own session when the agent home
        still has it; otherwise a fresh session gets the whole task with the question and the answer."""
        base = agent_base(new_agent)
        # The last session the CLI reported; a run cut off before its CLI said anything
        # (killed, timed out) leaves the session it was resuming as the last one known.
        session = (rec.summary.session_id if rec.summary else None) or rec.resume_session
        native = (
            session is not None
            and base == agent_base(rec.agent)
            and self.catalog.agents[base].has_session(ws.home, session)
        )
        answer = answer.strip() if answer is not None and answer.strip() else None
        return Resumed(new_agent, answer, session if native else None, time.time_ns())

    @staticmethod
    def _hand_over_answer(ws: WorkspacePaths, last_run: int, answer: str | None, secrets: list[str]) -> None:
        """Set the last question aside (its key values redacted, as the record showed it) and leave the
        answer where the agent reads it."""
        answer_file = ws.repo / "ANSWER.md"
        if answer is not None:
            safefs.write_text(ws.repo, answer_file, answer + "\n")
        elif os.path.lexists(answer_file):
            if stat.S_ISDIR(os.lstat(answer_file).st_mode):  # the agent made it: not ours to delete
                raise UnsafePathError(answer_file, "is a folder")
            answer_file.unlink()  # never follows a link
        blocked, kept = ws.repo / "BLOCKED.md", ws.meta / f"BLOCKED-run{last_run}.md"
        if os.path.lexists(blocked):  # moved as it is: a rename never follows a link
            blocked.rename(kept)
            if secrets and stat.S_ISREG(os.lstat(kept).st_mode):
                text = safefs.read_text(ws.meta, kept, MAX_QUESTION_BYTES) or ""
                safefs.write_text(ws.meta, kept, redact(text, secrets) or "")

    def result(self, rec: WorkspaceRecord, dry_run_prompt: str | None = None) -> DispatchResult:
        """What dispatch and resume return: where the work is and commands to look at it (a dry
        run: the prompt, and nothing to look at)."""
        ws = self.store.paths(rec.name)
        log_path = ws.log(agent_base(rec.agent))
        if dry_run_prompt is not None:
            return DispatchResult(
                workspace=rec.name,
                status="dry_run",
                agent=rec.agent,
                branch=rec.branch,
                path=str(ws.dir),
                repo_path=str(ws.repo),
                log_path=str(log_path),
                commands=[],
                prompt=dry_run_prompt,
                dry_run=True,
            )
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
                f"{git_in(ws.repo)} log --oneline {rec.base_branch or 'HEAD'}..{rec.branch}"
                if rec.base_branch and rec.base_branch != "HEAD"
                else f"{git_in(ws.repo)} log --oneline -n 10",
                f"docker ps --filter label={LABEL_WORKSPACE}={rec.name}",
            ],
        )
