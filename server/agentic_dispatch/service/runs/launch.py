"""Draining the queue: start every queued workspace that has a free slot, each in its container.

:meth:`QueueDrainer.drain` runs after every dispatch, resume and finished run, and on the
timer. Start decisions are taken under the scheduler's admission lock, so two servers on
one root never start the same run or overrun a limit.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from ... import safefs
from ...agents import (
    CONTAINER_HOME,
    CONTAINER_LOGS,
    CONTAINER_RUN,
    CONTAINER_WORKDIR,
    RUN_HEADER,
    RunContext,
)
from ...config import Settings
from ...credentials import Credentials
from ...errors import (
    CorruptRecordError,
    DispatchError,
    LaunchError,
    RepoError,
    RuntimeUnavailableError,
    UnsafePathError,
    WorkspaceNotFoundError,
)
from ...models import Status, WorkspaceRecord, utcnow
from ...runtime.base import LABEL_ROOT, LABEL_RUN, LABEL_WORKSPACE, ContainerSpec, Mount, Runtime
from ...scheduler import Scheduler
from ...store import StatusStore, WorkspacePaths
from ...workspace import start_from_workspace
from ..catalog import AgentCatalog
from ..containers import container_spec, container_url, hand_over
from .executor import RunLifecycle
from .lifecycle import LaunchFailed, Started
from .network import NetworkJobs, lend_logins

__all__ = ["QueueDrainer"]

log = logging.getLogger(__name__)


class QueueDrainer:
    """Picks what may start and starts it: the only place a container for a run is created."""

    def __init__(
        self,
        settings: Settings,
        store: StatusStore,
        scheduler: Scheduler,
        runtime: Runtime,
        catalog: AgentCatalog,
        runs: RunLifecycle,
        root_id: str,
        started: threading.Event,
        scratch: Path,
        network: NetworkJobs | None = None,
    ) -> None:
        self.settings = settings
        self.network = network  # set: containers fetch the workspace through the run gateway
        self.store = store
        self.scheduler = scheduler
        self.runtime = runtime
        self.catalog = catalog
        self.runs = runs
        self.root_id = root_id
        self.root_labels = {LABEL_ROOT: root_id}
        self._started = started  # set after each start: the timer recomputes the nearest deadline
        self.stalled: str | None = None  # why queued work cannot start, from the last drain
        self.scratch = scratch  # where throw-away repositories are made (copying a base workspace's branch)

    def drain(self) -> list[str]:
        """Start every queued workspace that has a free slot now. Returns the names started.

        A run that cannot start for a reason of its own (the engine refuses its container, a
        file the agent left is unsafe) ends ``failed`` with that reason, and the drain goes on.
        When the engine or the image is missing nothing can start: the queue waits, and
        status says why (:attr:`stalled`).
        """
        started: list[str] = []
        self._move_to_bases()
        with self.scheduler.admission():
            # Login files may appear after the server started (a `codex login` meanwhile):
            # the serialised pools follow what is on disk now.
            self.scheduler.limits = self.catalog.effective_limits()
            records = [i.record for i in self.store.active() if i.record is not None]
            waiting = self.scheduler.dependency_waits(records, self.store.find)
            stalled = None
            for rec in self.scheduler.pick(records, waiting=waiting):
                try:
                    if self.launch(rec.name):
                        started.append(rec.name)
                except (WorkspaceNotFoundError, CorruptRecordError) as e:
                    log.warning("not starting %s: %s", rec.name, e)  # gone, or status shows it unreadable
                except RuntimeUnavailableError as e:
                    stalled = f"queued work cannot start: {e}"
                    if stalled != self.stalled:  # one line per change, not one per drain
                        log.warning("%s", stalled)
                    break
                except (LaunchError, UnsafePathError, OSError) as e:
                    self._fail_queued(rec.name, f"the run could not start: {e}")
                except Exception as e:  # a bug: logged, and the run still ends with a reason
                    log.exception("cannot start %s", rec.name)
                    self._fail_queued(rec.name, f"the run could not start: {e}")
            self.stalled = stalled
        return started

    def _move_to_bases(self) -> None:
        """Move the branch of each queued workspace that starts from another's (``base_workspace``)
        and no longer waits for a dependency, before the admission lock is taken: the copy is a fetch
        from the base's clone, which may take a while, and every start on the root waits for that
        lock. :meth:`launch` finds the branch there (the copy is not made twice); a copy that fails
        here is tried there again, and fails the run saying why. (A base is a dependency: the index
        names the few candidates, so a drain reads no record more than it did.)"""
        based = [r for r in self.store.queued_with_dependencies() if r.base_workspace and r.started_at is None]
        if not based:
            return
        waiting = self.scheduler.dependency_waits(based, self.store.find)
        for rec in based:
            if rec.name in waiting:
                continue
            try:
                with self.store.locked(rec.name) as ws:
                    current = self.store.read(rec.name)
                    if current.status == Status.QUEUED:
                        self._start_from_base(ws, current)
            except (DispatchError, OSError) as e:
                log.debug("%s: its base's branch is copied as it starts instead (%s)", rec.name, e)

    def _fail_queued(self, name: str, reason: str) -> None:
        try:
            self.runs.apply(name, LaunchFailed(f"{reason}. Fix that, then call agentic_resume to run it again."))
        except Exception:  # the record itself is unreadable: status reports it as such
            log.exception("cannot mark %s failed", name)

    def launch(self, name: str) -> bool:
        """Start the container of a queued workspace and record it ``running`` (call under the
        admission lock). A container already labelled with this workspace and run is adopted.
        Returns whether it started (``False``: it was not queued any more).

        Raises:
            RuntimeUnavailableError: no engine or no image.
            LaunchError: the engine refused the container.
            UnsafePathError: the agent left a link where the server writes.
            WorkspaceNotFoundError, CorruptRecordError: the record is gone or unreadable.
        """
        with self.store.locked(name) as ws:
            record = self.store.read(name)
            if record.status != Status.QUEUED:
                return False
            adopted = self._adoptable(name, record.runs)
            base_commit = self._start_from_base(ws, record) if adopted is None else None
            container_id = adopted or self._start(ws, record)
            self.scheduler.note_start(record.agent)
            self.runs.apply(name, Started(container_id, adopted=adopted is not None, base_commit=base_commit))
        self._started.set()
        return True

    def _start_from_base(self, ws: WorkspacePaths, record: WorkspaceRecord) -> str | None:
        """Before a workspace with ``base_workspace`` first starts, its branch moves to where that
        workspace's branch ended (it has completed: the run waited for it), whatever happened to it
        since this one was dispatched (a resume): the commit, or ``None`` when there is nothing to do.

        Raises:
            LaunchError: the base workspace's branch cannot be read or copied (the run fails, saying why).
            UnsafePathError: the base workspace's clone holds a link or a special file on the way.
        """
        if record.base_workspace is None or record.started_at is not None:
            return None  # an agent has worked on this branch: it is its own now
        base = self.store.find(record.base_workspace)
        if base is None:
            raise LaunchError(f"its base workspace {record.base_workspace} is gone or unreadable")
        try:
            return start_from_workspace(
                ws.repo, record.branch, self.store.paths(base.name).repo, base.branch, self.scratch
            )
        except RepoError as e:
            raise LaunchError(f"it cannot start from {base.name}'s branch {base.branch}: {e}") from e

    def _adoptable(self, name: str, run: int) -> str | None:
        """A crash between starting a container and recording it leaves a labelled container:
        its id, so the run is adopted rather than started twice. One created but never started
        is removed (the run starts afresh)."""
        existing = self.runtime.list({**self.root_labels, LABEL_WORKSPACE: name, LABEL_RUN: str(run)})
        for c in existing:
            if not c.started:
                self.runtime.remove(c.id)
        started = [c for c in existing if c.started]
        return started[0].id if started else None

    def _start(self, ws: WorkspacePaths, record: WorkspaceRecord) -> str:
        spec = self.catalog.parse(record.agent)
        cfg = self.settings.agents.get(spec.base)
        creds = self.catalog.credentials(spec.base)
        plan = self.catalog.agents[spec.base].plan(
            RunContext(
                task=record.task,
                prompt=(ws.meta / "run" / "prompt.md").read_text(encoding="utf-8"),
                model=spec.model or (cfg.model if cfg else None),
                run=record.runs,
                answer=record.answer,
                question=record.question,
                resume_session=record.resume_session,
                base_url=self._provider_url(cfg.base_url) if cfg and cfg.base_url else None,
                max_retries=cfg.max_retries if cfg else None,
                env=creds.env,
            )
        )
        file_mounts = self._prepare_home(ws, record.runs, plan.home_files, creds, copy_mounted=self.network is not None)
        log_file = ws.log(spec.base)
        safefs.append_text(
            ws.logs, log_file, f"{RUN_HEADER}{record.runs} of {record.name} ({record.agent}) at {utcnow()} ===\n"
        )
        env = {
            "HOME": CONTAINER_HOME,
            "AGENTIC_WORKSPACE": record.name,
            "AGENTIC_LOG": f"{CONTAINER_LOGS}/{log_file.name}",
            **plan.env,
        }
        if self.network is not None:
            env |= self.network.prepare(ws, record.name, record.runs, "agent", log_file, record.branch)
        else:
            hand_over(ws.repo, ws.home, ws.logs)  # staging, resume and the lines above wrote as the server
        container = self._container_spec(ws, record, plan.argv, env, file_mounts)
        keys = set(creds.env.values())  # by value: an agent may pass a key under another name (Gemini)
        secret = container.secret_env | {k for k, v in container.env.items() if v in keys}
        return self.runtime.start(dataclasses.replace(container, secret_env=frozenset(secret)))

    def _provider_url(self, url: str) -> str:
        """The provider's URL as the container reaches it: a loopback name means this machine only
        when the engine runs here (a remote engine's containers need an address they can reach)."""
        return container_url(url) if self.runtime.local else url

    @staticmethod
    def _prepare_home(
        ws: WorkspacePaths, run: int, home_files: dict[str, str], creds: Credentials, copy_mounted: bool = False
    ) -> list[Mount]:
        """Write the agent's own home files, then the user's login copies; return the login mounts.
        The agent home is the agent's to write: every path in it goes through safefs. With
        ``copy_mounted`` (network transfer: nothing of this disk is mounted) the files that are
        mounted otherwise are copied in too, and what the run does to them stays in its home."""
        for rel, text in home_files.items():
            safefs.write_text(ws.home, ws.home / rel, text, mode=0o600)
        copies = [*creds.copies, *creds.mounts] if copy_mounted else creds.copies
        for source, rel in copies:  # after the agent's own files: the user's files win
            safefs.copy_file(ws.home, source, ws.home / rel, mode=0o600, keep_newer=True)
        if copy_mounted:
            lend_logins(ws, run, creds.mounts)  # a refreshed copy goes back to the user's file when the run ends
            return []
        mounts = []
        for source, rel in creds.mounts:
            # the mount point, made by us so it is owned by the host user
            safefs.ensure_file(ws.home, ws.home / rel, mode=0o600)
            hand_over(source.resolve())  # under a root server, the agent's uid must read and refresh it
            mounts.append(Mount(source, f"{CONTAINER_HOME}/{rel}"))
        return mounts

    def _container_spec(
        self,
        ws: WorkspacePaths,
        record: WorkspaceRecord,
        argv: list[str],
        env: dict[str, str],
        file_mounts: list[Mount],
    ) -> ContainerSpec:
        """The agent's container: the workspace's folders mounted, or with network transfer none."""
        image = record.image or self.catalog.image
        if self.network is not None:
            return container_spec(self.settings, self.root_id, record, image, argv, env, [], network=True)
        mounts = [
            Mount(ws.repo, CONTAINER_WORKDIR),
            Mount(ws.home, CONTAINER_HOME),
            Mount(ws.logs, CONTAINER_LOGS),
            Mount(ws.meta / "run", CONTAINER_RUN, read_only=True),
            *file_mounts,
        ]
        return container_spec(self.settings, self.root_id, record, image, argv, env, mounts)
