"""The Docker runtime (Docker SDK for Python). Every call here blocks: callers keep
them off the event loop.

Every failure of the engine is translated at this boundary: a caller sees
:class:`RuntimeUnavailableError` when the engine cannot be reached or does not answer,
:class:`LaunchError` when it refuses one container, never a docker-py, requests, urllib3
or socket error. Ordinary calls are bounded by :data:`ENGINE_CALL_TIMEOUT`, so a hung
engine holds no caller for long; an outage is logged when it begins and when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.utils
import requests.exceptions
import urllib3.exceptions

from ..errors import LaunchError, RuntimeUnavailableError
from .base import ContainerInfo, ContainerSpec, ExitEvent, engine_address, is_local_engine

__all__ = ["ENGINE_CALL_TIMEOUT", "ENGINE_ERRORS", "START_TIMEOUT", "DockerRuntime", "engine_client"]

log = logging.getLogger(__name__)

# An inspect, a list, a remove or an image lookup takes milliseconds on a healthy engine, even a
# busy one. Its callers (the drain, the timer, status, finalise) hold locks and other work behind
# it, so a hung engine must not keep them for docker-py's 60 s: past this bound the call raises
# RuntimeUnavailableError and the caller tries again later. A stop adds its own grace period.
ENGINE_CALL_TIMEOUT = 5.0
# Creating and starting a container sets up its mounts and network: seconds on a loaded machine.
START_TIMEOUT = 60.0
# How long the exit watcher waits before it asks an engine that is gone again.
EVENTS_RETRY_SECONDS = 2.0

_UNREACHABLE = (
    "the Docker engine is not reachable ({reason}). Start it (e.g. `dockerd &` as root, or your "
    "Docker Desktop), or point DOCKER_HOST at one, then try again."
)
_ENGINE_FAILED = (
    "the Docker engine answered with an error ({reason}). Check it with `docker info` (and its log), then try again."
)
_NO_ANSWER = (
    "the Docker engine did not answer within {seconds:g} s (it may be hung or overloaded). "
    "Check it with `docker info` and restart it if it hangs, then try again."
)
_EXITED = re.compile(r"^Exited \((-?\d+)\)")

# What a call to the engine can raise besides an answer: docker-py's own errors, requests' and
# urllib3's (a connection refused, a socket file gone, a read timed out) and bare socket errors.
ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_TIMEOUTS: tuple[type[BaseException], ...] = (
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    TimeoutError,
)


class _EngineHealth:
    """Logs an outage once when it begins and once when it ends, not at every call that meets it
    (the drain, the timer and the exit watcher each ask the engine every few seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: str | None = None

    def down(self, reason: str) -> None:
        with self._lock:
            began, self._down = self._down is None, reason
        if began:
            log.warning("the Docker engine is unavailable: %s; calls fail until it is back", reason)
        else:
            log.debug("the Docker engine is still unavailable: %s", reason)

    def up(self) -> None:
        with self._lock:
            ended, self._down = self._down is not None, None
        if ended:
            log.info("the Docker engine answers again")


def _is_timeout(e: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:  # docker-py wraps what requests raised
        if isinstance(cause, urllib3.exceptions.NewConnectionError):
            return False  # refused or unresolvable: urllib3 derives it from ConnectTimeoutError all the same
        if isinstance(cause, _TIMEOUTS):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _bounded(client: docker.DockerClient, seconds: float) -> docker.DockerClient:
    """``client`` with another default timeout: the same engine, connection pools, TLS settings
    and API version. docker-py has no per-call timeout on most calls, only one per client, and a
    client handed in (a test's, a remote engine's) cannot be rebuilt from its settings."""
    api = object.__new__(type(client.api))
    api.__dict__.update(client.api.__dict__)
    api.timeout = seconds
    view = object.__new__(type(client))
    view.__dict__.update(client.__dict__)
    view.api = api
    return view


class _EngineAPI(docker.APIClient):  # type: ignore[misc]
    """docker-py's API client, verifying a TLS engine with its own CA only: requests lets
    ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (a proxy's CA) replace the CA from
    ``DOCKER_CERT_PATH``, and the server then fails where the docker CLI works."""

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
        if isinstance(self.verify, str):  # the engine's CA file
            settings["verify"] = self.verify
        return settings


def engine_client(docker_host: str | None, timeout: float) -> docker.DockerClient:
    """A client of the engine chosen the Docker way: ``docker_host`` (``[runtime] docker_host``),
    else ``DOCKER_HOST``, with TLS from ``DOCKER_TLS_VERIFY`` / ``DOCKER_CERT_PATH``, else the local
    socket; a TLS engine is verified with its own CA only (:class:`_EngineAPI`).

    Raises:
        docker.errors.DockerException: the settings are unusable (a missing certificate file), or
            the engine did not tell its API version.
    """
    kwargs = docker.utils.kwargs_from_env()
    if docker_host:
        kwargs["base_url"] = docker_host
    client: docker.DockerClient = docker.DockerClient.__new__(docker.DockerClient)
    client.api = _EngineAPI(timeout=int(timeout), **kwargs)  # what DockerClient.__init__ does, with our class
    return client


class DockerRuntime:
    """Runs agent containers on a Docker engine (local socket, ``DOCKER_HOST`` or ``[runtime]
    docker_host``).

    Every method raises :class:`RuntimeUnavailableError` when the engine cannot be reached or
    does not answer within its bound; :meth:`start` raises :class:`LaunchError` when the engine
    refuses the container.
    """

    def __init__(self, client: docker.DockerClient | None = None, docker_host: str | None = None) -> None:
        self._client = client
        self._docker_host = docker_host
        self._quick = _bounded(client, ENGINE_CALL_TIMEOUT) if client is not None else None
        self._lock = threading.Lock()
        self._health = _EngineHealth()

    @property
    def client(self) -> docker.DockerClient:
        """The client for long calls (a start, a wait, the event stream)."""
        return self._clients()[0]

    def _clients(self) -> tuple[docker.DockerClient, docker.DockerClient]:
        with self._lock:
            if self._client is None:
                try:
                    # Built on the short bound (it asks the engine its API version), then lengthened.
                    client = engine_client(self._docker_host, ENGINE_CALL_TIMEOUT)
                except docker.errors.DockerException as e:
                    raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
                client.api.timeout = START_TIMEOUT
                self._client, self._quick = client, _bounded(client, ENGINE_CALL_TIMEOUT)
            assert self._quick is not None
            return self._client, self._quick

    @property
    def _api(self) -> Any:
        """The low-level API on the short bound, for ordinary calls."""
        return self._clients()[1].api

    def _unavailable(self, e: BaseException, seconds: float) -> RuntimeUnavailableError:
        """The error for an engine that failed to answer; the outage is logged once, not per call."""
        if _is_timeout(e):
            message = _NO_ANSWER.format(seconds=seconds)
            self._health.down(f"no answer within {seconds:g} s")
        elif isinstance(e, docker.errors.APIError):
            # It answered, with an error of its own (a 500): the engine is there but in trouble.
            message = _ENGINE_FAILED.format(reason=e.explanation or e)
            self._health.up()
        else:
            message = _UNREACHABLE.format(reason=e)
            self._health.down(str(e))
        return RuntimeUnavailableError(message)

    @property
    def local(self) -> bool:
        if self._client is not None:
            return is_local_engine(str(self._client.api.base_url))
        return is_local_engine(engine_address(self._docker_host))

    def describe(self) -> str:
        if self._client is not None:
            return str(self._client.api.base_url)
        return self._docker_host or os.environ.get("DOCKER_HOST") or "the local socket (unix:///var/run/docker.sock)"

    def check(self) -> None:
        try:
            self._api.ping()
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()

    def _image_attrs(self, image: str) -> dict[str, Any] | None:
        try:
            attrs: dict[str, Any] = self._api.inspect_image(image)
        except docker.errors.NotFound:  # ImageNotFound, or a 404 docker-py did not recognise as one
            attrs = {}
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        return attrs or None

    def image_exists(self, image: str) -> bool:
        return self._image_attrs(image) is not None

    def image_problem(self, image: str) -> str | None:
        return None  # one engine: the image is on it or not (image_exists)

    def image_id(self, image: str) -> str | None:
        attrs = self._image_attrs(image)
        return str(attrs["Id"]) if attrs else None

    def image_labels(self, image: str) -> dict[str, str]:
        meta = self.image_meta(image)
        return meta[1] if meta else {}

    def image_meta(self, image: str) -> tuple[str, dict[str, str]] | None:
        attrs = self._image_attrs(image)
        if not attrs:
            return None
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        return str(attrs["Id"]), {str(k): str(v) for k, v in labels.items()}

    def run_once(self, image: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        """Run ``command`` in a throw-away container of ``image``; return (exit code, output)."""
        try:
            container = self.client.containers.create(
                image,
                command,
                network_disabled=True,
                init=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
            )
            try:
                container.start()
                try:
                    result = container.wait(timeout=timeout)
                except _TIMEOUTS as e:  # the command's fault, not the engine's: no outage to log
                    raise RuntimeUnavailableError(
                        f"{command[0]} did not finish within {timeout:g} s in a throw-away container of {image!r}."
                    ) from e
                output = container.logs(stdout=True, stderr=True).decode("utf-8", errors="replace")
                return int(result.get("StatusCode", -1)), output
            finally:
                self._discard(str(container.id))
        except docker.errors.ImageNotFound as e:
            raise RuntimeUnavailableError(f"the image {image!r} is not on this engine.") from e
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, START_TIMEOUT) from e

    def start(self, spec: ContainerSpec) -> str:
        """Create and start the container; return its id.

        Raises:
            RuntimeUnavailableError: the engine is gone, or the image is not on it.
            LaunchError: the engine refused the container; none is left behind.
        """
        kwargs: dict[str, Any] = {
            "command": spec.command,
            "name": spec.name,
            "working_dir": spec.workdir,
            "user": spec.user,
            "environment": spec.env,
            "labels": spec.labels,
            "volumes": {str(m.source): {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in spec.mounts},
            "detach": True,
            "init": True,  # so stop() is prompt and zombies are reaped
            "stdin_open": False,  # stdin is /dev/null: CLIs that read a non-TTY stdin must not hang
            "tty": False,
            "privileged": False,
            "cap_drop": list(spec.cap_drop),
            "security_opt": ["no-new-privileges"],
            "extra_hosts": {"host.docker.internal": "host-gateway"},
        }
        if spec.memory:
            kwargs["mem_limit"] = spec.memory
        if spec.cpus:
            kwargs["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.pids:
            kwargs["pids_limit"] = spec.pids
        if spec.network:
            kwargs["network"] = spec.network
        if spec.cap_add:
            kwargs["cap_add"] = list(spec.cap_add)
        try:
            container = self.client.containers.create(spec.image, **kwargs)
        except docker.errors.ImageNotFound as e:
            raise RuntimeUnavailableError(
                f"the agent image {spec.image!r} is not on this engine. Build it with "
                "`agentic-dispatch image build`, or set `image` in the config file."
            ) from e
        except docker.errors.APIError as e:
            raise LaunchError(f"the Docker engine refused to create the container: {e.explanation}") from e
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, START_TIMEOUT) from e
        cid = str(container.id)
        # Created is not started: the user, the working directory, the command and the mounts are
        # checked only now. A container left created would later be listed as an orphan.
        try:
            container.start()
        except docker.errors.APIError as e:
            self._discard(cid)
            raise LaunchError(f"the Docker engine refused to start the container: {e.explanation}") from e
        except ENGINE_ERRORS as e:
            self._discard(cid)
            raise self._unavailable(e, START_TIMEOUT) from e
        self._health.up()
        return cid

    def _discard(self, container_id: str) -> None:
        """Remove a container this runtime made and gave up on; an engine gone meanwhile leaves
        it to orphan detection (it carries the run's labels), which is logged, not raised."""
        try:
            self._api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as e:
            log.debug("cannot remove container %s: %s", container_id[:12], e)

    @staticmethod
    def _info(attrs: dict[str, Any]) -> ContainerInfo:
        state = attrs.get("State") or {}
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        # "created" is not running: a container whose start failed stays created and never exits.
        running = bool(state.get("Running")) or state.get("Status") == "restarting"
        never_ran = state.get("Status") == "created" and not state.get("Error")
        return ContainerInfo(
            id=attrs["Id"],
            name=str(attrs.get("Name", "")).lstrip("/"),
            labels=dict(labels),
            running=running,
            exit_code=None if running or never_ran else int(state.get("ExitCode", -1)),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or None,
        )

    def inspect(self, container_id: str) -> ContainerInfo | None:
        try:
            attrs = self._api.inspect_container(container_id)
        except docker.errors.NotFound:
            self._health.up()
            return None
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        return self._info(attrs)

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            summaries = self._api.containers(all=True, filters=filters)
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()
        # One API call for all: the list's summaries carry what callers need (no inspect per container).
        out = []
        for c in summaries:
            state = str(c.get("State", ""))
            running = state in ("running", "restarting", "paused")
            exited = _EXITED.search(str(c.get("Status", "")))
            out.append(
                ContainerInfo(
                    id=c["Id"],
                    name=str((c.get("Names") or ["?"])[0]).lstrip("/"),
                    labels=dict(c.get("Labels") or {}),
                    running=running,
                    exit_code=None if running or not exited else int(exited.group(1)),
                )
            )
        return out

    def stop(self, container_id: str, timeout: float = 10) -> None:
        # docker-py adds the grace period to the client's bound: the engine may take all of it.
        try:
            self._api.stop(container_id, timeout=int(timeout))
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT + int(timeout)) from e
        self._health.up()

    def remove(self, container_id: str) -> None:
        try:
            self._api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: its removal is already in progress
                raise RuntimeUnavailableError(
                    f"cannot remove container {container_id[:12]}: {e.explanation}. "
                    "Check the engine with `docker info`, then try again."
                ) from e
        except ENGINE_ERRORS as e:
            raise self._unavailable(e, ENGINE_CALL_TIMEOUT) from e
        self._health.up()

    def watch_exits(self, labels: dict[str, str], on_exit: Callable[[ExitEvent], None], stop: threading.Event) -> None:
        """One thread for every run: follows the engine's ``die`` events until ``stop`` is set.

        The stream has no bound (it is quiet while nothing exits); when the engine goes away the
        watcher asks again every :data:`EVENTS_RETRY_SECONDS` from where it left off, logging the
        outage once (shared with every other call of this runtime).
        """
        filters = {"type": "container", "event": "die", "label": [f"{k}={v}" for k, v in labels.items()]}
        since = int(time.time())
        current: list[Any] = []
        closer = threading.Thread(target=_close_on(stop, current), daemon=True, name="docker-events-closer")
        closer.start()
        while not stop.is_set():
            try:
                stream = self.client.events(decode=True, filters=filters, since=since)
            except RuntimeUnavailableError:  # no client could be made; already logged
                stop.wait(EVENTS_RETRY_SECONDS)
                continue
            except ENGINE_ERRORS as e:
                self._unavailable(e, START_TIMEOUT)  # logs the outage when it begins
                stop.wait(EVENTS_RETRY_SECONDS)
                continue
            self._health.up()
            current[:] = [stream]
            if stop.is_set():
                stream.close()
            try:
                for ev in stream:
                    since = int(ev.get("time", since))
                    actor = ev.get("Actor") or {}
                    attrs = actor.get("Attributes") or {}
                    code = attrs.get("exitCode")
                    on_exit(
                        ExitEvent(
                            container_id=str(actor.get("ID") or ev.get("id")),
                            labels={k: v for k, v in attrs.items() if k.startswith("agentic-dispatch")},
                            exit_code=int(code) if code is not None else None,
                        )
                    )
            except ENGINE_ERRORS as e:
                if not stop.is_set():
                    log.debug("the Docker event stream broke (%s); reconnecting", e)
            finally:
                stream.close()
            # docker-py ends the stream quietly when the engine goes away: ask again after a pause,
            # so an engine that is gone is not asked in a tight loop.
            stop.wait(EVENTS_RETRY_SECONDS / 2)


def _close_on(stop: threading.Event, current: list[Any]) -> Callable[[], None]:
    """Closing the stream is the only way to unblock a thread reading Docker events."""

    def run() -> None:
        stop.wait()
        for stream in list(current):
            with contextlib.suppress(OSError, AttributeError):
                stream.close()

    return run
