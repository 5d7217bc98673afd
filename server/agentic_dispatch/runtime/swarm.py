"""The Docker Swarm runtime: each job of a run is one service of one task on a swarm, reached
through a manager (``[runtime] engine = "swarm"``, the manager as ``DOCKER_HOST``
or ``[runtime] docker_host``). Swarm decides where a run goes; the server's limits decide what
starts. Every node may be another machine: nothing of the server's disk is mounted (network
transfer), the run's credentials travel as a Swarm secret of its own, never in the service's
environment, and the exit, the node and a node lost are read from the swarm's task and node state.

A job is a ``replicated`` service of one replica with restart condition none, not a
``replicated-job`` one: both run their task once, but an engine before Docker 24 keeps every task of
a removed ``replicated-job`` service, and its container on the node, for good (moby/moby#44312), and
a run's container holds its clone. Removing a replicated service removes its task and container.

A "container id" here is the service's id: :meth:`SwarmRuntime.inspect`, :meth:`~SwarmRuntime.stop`
and :meth:`~SwarmRuntime.remove` take it, :meth:`~SwarmRuntime.list` and the exit watcher report it.

What Swarm does not do as a local engine does: it does not fail a task whose node went away
(the task stays ``running`` until the node returns), so a task on a node that is down or gone is
reported lost here (:attr:`ContainerInfo.lost`); it reports no out-of-memory kill (an OOM shows
as exit code 137); ``no-new-privileges``, the init process and ``host-gateway`` are not service
options (the first is the nodes' daemon setting, see the README).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.types

from ..errors import LaunchError, RuntimeUnavailableError
from .base import LABEL_PREFIX, ContainerInfo, ContainerSpec, ExitEvent
from .docker import ENGINE_CALL_TIMEOUT, ENGINE_ERRORS, DockerRuntime

__all__ = ["LABEL_SECRET_OF", "SECRET_FILE", "SECRET_TARGET", "STRAY_SECRET", "SwarmRuntime"]

log = logging.getLogger(__name__)

# Where a job's secret appears in its container (``agentic-run`` reads it): a JSON object of the
# variables the job's CLI gets in its environment.
SECRET_TARGET = "agentic-env"  # pragma: allowlist secret (a file name, not a secret)
SECRET_FILE = f"/run/secrets/{SECRET_TARGET}"
LABEL_SECRET_OF = f"{LABEL_PREFIX}.secret-of"  # on a run's secret: the service's name
STRAY_SECRET = "secret:"  # pragma: allowlist secret (how list() names a run's secret whose service is gone)
# How often the exit watcher looks at the swarm's tasks (there is no event for a task's end).
WATCH_INTERVAL = 1.0
# A task in one of these states has ended for good (restart condition none: no other follows).
_FINAL = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})
# The states of a task that no node has taken yet.
_UNPLACED = frozenset({"new", "allocated", "pending"})
_NAME_MAX = 63  # a service's name is a DNS label


def _service_name(name: str) -> str:
    """``name`` as a service's name: at most 63 characters, a long one cut and told apart by a hash."""
    if len(name) <= _NAME_MAX:
        return name
    return f"{name[: _NAME_MAX - 9].rstrip('-_.')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _bytes(size: str) -> int:
    """A size as Docker writes it (``512m``, ``2g``, ``1048576``) in bytes."""
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    text = size.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _in_registry(image: str) -> bool:
    """``image`` names a registry (``registry.lan:5000/agent:tag``), not only a local name."""
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


class SwarmRuntime(DockerRuntime):
    """Runs each job as a Swarm service of one task (one replica, never restarted) through a manager.

    Every method raises :class:`RuntimeUnavailableError` when the manager cannot be reached or
    does not answer within its bound; :meth:`start` raises :class:`LaunchError` when the swarm
    refuses the service (and leaves neither it nor its secret behind).
    """

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        docker_host: str | None = None,
        placement: list[str] | None = None,
        stop_grace: float = 30.0,
    ) -> None:
        super().__init__(client, docker_host)
        self.placement = list(placement or [])
        self.stop_grace = stop_grace  # the services' stop grace period: a stopped job sends its work back
        self._nodes: dict[str, tuple[str, str]] = {}  # node id → (hostname, state), from the last look

    @property
    def local(self) -> bool:
        return False  # a task may run on any node: nothing of this machine's disk or loopback is its

    def describe(self) -> str:
        return f"the swarm managed by {super().describe()}"

    def check(self) -> None:
        """Raise :class:`RuntimeUnavailableError` when the manager cannot be reached or is no manager."""
        try:
            # Every dispatch asks. The swarm's record answers only on a manager of an active swarm,
            # and is a part of what info gathers (info also lists the nodes and counts containers
            # and images: about 7 times as long on a manager). Refused, info says why.
            self._api.inspect_swarm()
            return
        except docker.errors.APIError:
            pass
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        try:
            info = self._api.info()
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise RuntimeUnavailableError(
                f"{super().describe()} is not a manager of an active swarm (its swarm state: "
                f"{swarm.get('LocalNodeState') or 'none'}). Point DOCKER_HOST (or [runtime] docker_host) at a "
                "manager, or run `docker swarm init` there."
            )

    # -- the image ------------------------------------------------------------------------------
    def image_exists(self, image: str) -> bool:
        """On the manager, or in its registry (where the nodes pull it from)."""
        return super().image_exists(image) or self._distribution_problem(image) is None

    def image_problem(self, image: str) -> str | None:
        if not _in_registry(image):
            return (
                f"the image {image} is in no registry, so only nodes that hold it already can run it: push it with "
                "`agentic-dispatch image push REGISTRY` and set `image` in the config to the name it prints"
            )
        problem = self._distribution_problem(image)
        if problem is not None:
            return (
                f"the image {image} cannot be found in its registry ({problem}): push it with "
                "`agentic-dispatch image push REGISTRY`, or check that the manager reaches the registry"
            )
        return None

    def _distribution_problem(self, image: str) -> str | None:
        """What the manager's registry lookup of ``image`` said when it failed, or ``None``."""
        if not _in_registry(image):
            return "in no registry"
        try:
            self._api.inspect_distribution(image)
        except docker.errors.APIError as e:
            return str(e.explanation or e)
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        return None

    def run_once(self, image: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        """As on one engine, on the manager: an image only in the registry is pulled there first."""
        if not super().image_exists(image) and _in_registry(image):
            try:
                self.client.images.pull(image)
            except ENGINE_ERRORS as e:
                raise RuntimeUnavailableError(f"the manager cannot pull {image}: {e}") from e
        return super().run_once(image, command, timeout)

    # -- start ---------------------------------------------------------------------------------
    def start(self, spec: ContainerSpec) -> str:
        """Create the job's secret and its service; return the service's id.

        Raises:
            RuntimeUnavailableError: the manager is gone, or is no manager.
            LaunchError: the swarm refused the service or its secret; neither is left behind.
        """
        if spec.mounts:
            raise LaunchError("a swarm job cannot mount this machine's folders: runs on a swarm use network transfer")
        name = _service_name(spec.name)
        secret_id: str | None = None
        try:
            secret_id = self._make_secret(name, spec)
            made = self.client.api.create_service(
                self._task(spec, secret_id),
                name=name,
                labels=spec.labels,
                mode=docker.types.ServiceMode("replicated", replicas=1),
            )
        except docker.errors.APIError as e:
            self._drop_secret(secret_id)
            if e.status_code == 503:  # not a manager (any more), or the swarm has no quorum
                raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
            raise LaunchError(f"the swarm refused the run's service: {e.explanation}") from e
        except ENGINE_ERRORS as e:
            self._drop_secret(secret_id)
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        return str(made["ID"])

    def _make_secret(self, name: str, spec: ContainerSpec) -> str | None:
        """The job's secret: its credential variables as one JSON object (``None`` when it has none)."""
        values = {k: v for k, v in spec.env.items() if k in spec.secret_env}
        if not values:
            return None
        made = self.client.api.create_secret(
            name=self._secret_name(name),
            data=json.dumps(values).encode(),
            labels={**spec.labels, LABEL_SECRET_OF: name},
        )
        return str(made["ID"])

    @staticmethod
    def _secret_name(service: str) -> str:
        return _service_name(f"{service}-secret")

    def _task(self, spec: ContainerSpec, secret_id: str | None) -> docker.types.TaskTemplate:
        """The job's one task: run once (restart condition none), its limits, placement and secret."""
        secrets = []
        if secret_id is not None:
            uid, _, gid = spec.user.partition(":")
            name = self._secret_name(_service_name(spec.name))
            secrets.append(docker.types.SecretReference(secret_id, name, SECRET_TARGET, uid, gid or uid, 0o400))
        container = docker.types.ContainerSpec(
            spec.image,
            command=spec.command,
            env={k: v for k, v in spec.env.items() if k not in spec.secret_env},
            workdir=spec.workdir,
            user=spec.user,
            labels=spec.labels,
            secrets=secrets,
            cap_drop=list(spec.cap_drop),
            cap_add=list(spec.cap_add) or None,
            init=True,
            stop_grace_period=int(self.stop_grace * 1e9),
            open_stdin=False,
            tty=False,
        )
        task = docker.types.TaskTemplate(
            container,
            resources=self._resources(spec),
            restart_policy=docker.types.RestartPolicy(condition="none", max_attempts=0),
            placement=docker.types.Placement(constraints=self.placement) if self.placement else None,
            networks=[spec.network] if spec.network else None,
        )
        if spec.pids:
            task.setdefault("Resources", {}).setdefault("Limits", {})["Pids"] = spec.pids
        return task

    @staticmethod
    def _resources(spec: ContainerSpec) -> docker.types.Resources | None:
        """The run's CPUs and memory as both the limit and the reservation: Swarm places a job only
        on a node with that much not reserved by others."""
        if not spec.cpus and not spec.memory:
            return None
        nano = int(spec.cpus * 1e9) if spec.cpus else None
        memory = _bytes(spec.memory) if spec.memory else None
        return docker.types.Resources(cpu_limit=nano, mem_limit=memory, cpu_reservation=nano, mem_reservation=memory)

    def _drop_secret(self, secret_id: str | None) -> None:
        if secret_id is None:
            return
        try:
            self._api.remove_secret(secret_id)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as e:  # a secret left is found by its label (cleanup)
            log.debug("cannot remove secret %s: %s", secret_id[:12], e)

    # -- state -----------------------------------------------------------------------------------
    def _node_map(self) -> dict[str, tuple[str, str]]:
        nodes = self._api.nodes()
        self._nodes = {
            str(n["ID"]): (
                str((n.get("Description") or {}).get("Hostname") or n["ID"][:12]),
                str((n.get("Status") or {}).get("State") or "unknown"),
            )
            for n in nodes
        }
        return self._nodes

    @staticmethod
    def _service_info(
        service: dict[str, Any], tasks: list[dict[str, Any]], nodes: dict[str, tuple[str, str]]
    ) -> ContainerInfo:
        spec = service.get("Spec") or {}
        labels = {str(k): str(v) for k, v in (spec.get("Labels") or {}).items()}
        sid, name = str(service["ID"]), str(spec.get("Name", ""))
        if not tasks:
            if (spec.get("Mode") or {}).get("Replicated", {}).get("Replicas") == 0:  # stopped, its task gone
                return ContainerInfo(sid, name, labels, running=False, exit_code=None)
            # just created: the orchestrator has not made its task yet
            return ContainerInfo(sid, name, labels, running=True, exit_code=None, waiting="no task yet")
        task = max(tasks, key=lambda t: str(t.get("CreatedAt", "")))
        status = task.get("Status") or {}
        state = str(status.get("State", ""))
        node_id = str(task.get("NodeID") or "")
        hostname, node_state = nodes.get(node_id, (None, "gone")) if node_id else (None, "")
        if state in _FINAL:
            code = (status.get("ContainerStatus") or {}).get("ExitCode")
            err = str(status.get("Err") or status.get("Message") or state)
            if code is None or state == "rejected":  # it never ran (its image, its mounts): no exit to report
                where = f" on node {hostname}" if hostname else ""
                lost = f"the swarm could not run the job{where}: {err}"
                return ContainerInfo(sid, name, labels, running=False, exit_code=None, node=hostname, lost=lost)
            return ContainerInfo(
                sid,
                name,
                labels,
                running=False,
                exit_code=int(code),
                error=None if state == "complete" else err,
                node=hostname,
            )
        if state in _UNPLACED or not node_id:
            why = str(status.get("Err") or status.get("Message") or state)
            return ContainerInfo(sid, name, labels, running=True, exit_code=None, waiting=why)
        if node_state in ("down", "gone", "disconnected"):
            what = "left the swarm" if node_state == "gone" else f"is {node_state}"
            lost = f"the node {hostname or node_id[:12]} it ran on {what}"
            return ContainerInfo(sid, name, labels, running=False, exit_code=None, node=hostname, lost=lost)
        return ContainerInfo(sid, name, labels, running=True, exit_code=None, node=hostname)

    def inspect(self, container_id: str) -> ContainerInfo | None:
        if container_id.startswith(STRAY_SECRET):
            return None
        try:
            service = self._api.inspect_service(container_id)
            tasks = self._api.tasks(filters={"service": container_id})
            nodes = self._node_map()
        except docker.errors.NotFound:
            self._health.up()
            return None
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        return self._service_info(service, [t for t in tasks if t.get("ServiceID") == service["ID"]], nodes)

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        """Every service with ``labels``, and every run secret with them whose service is gone (a
        start cut off between the two): the latter as ``secret:<id>``, never running, so a sweep
        removes it with its ended run's leftovers or reports it as an orphan."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            services, tasks = self._services_and_tasks(filters)
            nodes = self._node_map() if tasks else {}  # none to place (a start looking for its own leftovers)
            secrets = self._api.secrets(filters=filters)
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        by_service: dict[str, builtins.list[dict[str, Any]]] = {}
        for t in tasks:
            by_service.setdefault(str(t.get("ServiceID")), []).append(t)
        found = [self._service_info(s, by_service.get(str(s["ID"]), []), nodes) for s in services]
        names = {info.name for info in found}
        for secret in secrets:
            spec = secret.get("Spec") or {}
            own = {str(k): str(v) for k, v in (spec.get("Labels") or {}).items()}
            if own.pop(LABEL_SECRET_OF, None) not in names:
                found.append(ContainerInfo(f"{STRAY_SECRET}{secret['ID']}", str(spec.get("Name")), own, False, None))
        return found

    def _services_and_tasks(
        self, filters: dict[str, builtins.list[str]]
    ) -> tuple[builtins.list[dict[str, Any]], builtins.list[dict[str, Any]]]:
        """The services with ``filters`` and their tasks. A service removed between the two looks (a
        run ending) makes the engine refuse the second, naming it ("service ID not found"): it is left
        out and the tasks of the others asked again (each refusal leaves one out, so this ends)."""
        services = self._api.services(filters=filters)
        while services:
            try:
                return services, self._api.tasks(filters={"service": [s["ID"] for s in services]})
            except docker.errors.NotFound as e:
                gone = [s for s in services if str(s["ID"]) in str(e.explanation)]
                if not gone:
                    raise
                services = [s for s in services if s not in gone]
        return [], []

    # -- stop and remove ---------------------------------------------------------------------------
    def stop(self, container_id: str, timeout: float = 10) -> None:
        """Stop the job: its service is scaled to no replica, so the swarm stops the container
        (SIGTERM, SIGKILL after its stop grace period); :meth:`inspect` reads the task's exit code while
        the swarm still lists the task (once it is gone, the job has ended with no code). Returns when
        the task has ended, or after ``timeout`` and the call bound (a stray secret has nothing to stop).
        """
        if container_id.startswith(STRAY_SECRET):
            return
        try:
            if self._halt(container_id):
                self._wait_ended(container_id, timeout + ENGINE_CALL_TIMEOUT)
        except docker.errors.NotFound:
            return
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()

    def _halt(self, service_id: str) -> bool:
        """Scale the job's service to no replica: the swarm stops its task and starts none. ``False``
        when its task has ended already.

        Raises:
            docker.errors.NotFound: the service is gone.
        """
        info = self.inspect(service_id)
        if info is None:
            raise docker.errors.NotFound(f"service {service_id} is gone")
        if not info.running:
            return False
        service = self._api.inspect_service(service_id)
        spec = service["Spec"]
        # A service an earlier version made as a job (a mode cannot change): it is told to complete no task.
        if "ReplicatedJob" in (spec.get("Mode") or {}):
            none: dict[str, Any] = {"ReplicatedJob": {"MaxConcurrent": 0, "TotalCompletions": 0}}
        else:
            none = {"Replicated": {"Replicas": 0}}
        self._api.update_service(  # the spec as it is but the mode (docker-py's merge adds what jobs refuse)
            service_id,
            service["Version"]["Index"],
            task_template=spec["TaskTemplate"],
            name=spec["Name"],
            labels=spec.get("Labels"),
            mode=none,
            fetch_current_spec=False,
        )
        return True

    def _wait_ended(self, service_id: str, seconds: float) -> None:
        pause = threading.Event()  # never set: a bounded wait between two looks
        for _ in range(max(1, int(seconds / 0.25))):
            info = self.inspect(service_id)
            if info is None or not info.running or info.waiting is not None:
                return
            pause.wait(0.25)

    @staticmethod
    def _secrets_of(service: dict[str, Any]) -> builtins.list[str]:
        container = ((service.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}
        return [str(s["SecretID"]) for s in container.get("Secrets") or [] if s.get("SecretID")]

    def remove(self, container_id: str) -> None:
        """Remove the job's service and its secret (or a stray secret :meth:`list` reported); a job still
        running is stopped first (its stop grace period at most)."""
        if container_id.startswith(STRAY_SECRET):
            self._drop_secret(container_id.removeprefix(STRAY_SECRET))
            return
        try:
            service = self._api.inspect_service(container_id)
            if self._halt(container_id):
                self._wait_ended(container_id, self.stop_grace + ENGINE_CALL_TIMEOUT)
            self._api.remove_service(container_id)
        except docker.errors.NotFound:
            self._health.up()
            return
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        for secret in self._secrets_of(service):
            self._drop_secret(secret)
        self._health.up()

    # -- exits -------------------------------------------------------------------------------------
    def watch_exits(self, labels: dict[str, str], on_exit: Callable[[ExitEvent], None], stop: threading.Event) -> None:
        """Look at the tasks of every run's service each :data:`WATCH_INTERVAL` (Swarm has no event
        for a task's end) and report each service whose task ended, once. A task on a node that went
        away did not exit: it is reported once as lost (:attr:`ExitEvent.lost`), so the timer settles
        it now rather than at its next tick."""
        reported: set[str] = set()
        while not stop.is_set():
            try:
                infos = self.list(labels)
            except RuntimeUnavailableError:  # logged once per outage
                stop.wait(WATCH_INTERVAL * 2)
                continue
            present = set()
            for info in infos:
                present.add(info.id)
                if (info.running and info.lost is None) or info.id in reported or info.id.startswith(STRAY_SECRET):
                    continue
                reported.add(info.id)
                try:
                    on_exit(ExitEvent(info.id, dict(info.labels), info.exit_code, node=info.node, lost=info.lost))
                except Exception:  # the watcher's boundary: one bad report never stops it
                    log.exception("reporting the end of service %s failed", info.id[:12])
            reported &= present
            stop.wait(WATCH_INTERVAL)
