"""The Docker runtime (Docker SDK for Python). Every call here blocks: callers keep
them off the event loop. Docker SDK errors are translated at this boundary."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import requests.exceptions

from ..errors import LaunchError, RuntimeUnavailableError
from .base import ContainerInfo, ContainerSpec, ExitEvent

__all__ = ["DockerRuntime"]

log = logging.getLogger(__name__)

_UNREACHABLE = (
    "the Docker engine is not reachable ({reason}). Start it (e.g. `dockerd &` as root, or your "
    "Docker Desktop), or point DOCKER_HOST at one, then try again."
)
_EXITED = re.compile(r"^Exited \((-?\d+)\)")


class DockerRuntime:
    """Runs agent containers on a Docker engine (local socket or ``DOCKER_HOST``)."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.from_env(timeout=60)
                except docker.errors.DockerException as e:
                    raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e
            return self._client

    def check(self) -> None:
        try:
            self.client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e

    def image_exists(self, image: str) -> bool:
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e
        return True

    def image_id(self, image: str) -> str | None:
        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e

    def image_labels(self, image: str) -> dict[str, str]:
        try:
            labels = self.client.images.get(image).labels or {}
        except docker.errors.ImageNotFound:
            return {}
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e
        return {str(k): str(v) for k, v in labels.items()}

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
                result = container.wait(timeout=timeout)
                output = container.logs(stdout=True, stderr=True).decode("utf-8", errors="replace")
                return int(result.get("StatusCode", -1)), output
            finally:
                container.remove(force=True)
        except docker.errors.ImageNotFound as e:
            raise RuntimeUnavailableError(f"the image {image!r} is not on this engine.") from e
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e

    def start(self, spec: ContainerSpec) -> str:
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
            container = self.client.containers.run(spec.image, **kwargs)
        except docker.errors.ImageNotFound as e:
            raise RuntimeUnavailableError(
                f"the agent image {spec.image!r} is not on this engine. Build it with "
                "`agentic-dispatch image build`, or set `image` in the config file."
            ) from e
        except docker.errors.APIError as e:
            raise LaunchError(f"the Docker engine refused to start the container: {e.explanation}") from e
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e
        return str(container.id)

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
            return self._info(self.client.api.inspect_container(container_id))
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e

    def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            summaries = self.client.api.containers(all=True, filters=filters)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e
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
        try:
            self.client.api.stop(container_id, timeout=int(timeout))
        except docker.errors.NotFound:
            return
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise RuntimeUnavailableError(_UNREACHABLE.format(reason=e)) from e

    def remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:
            if e.status_code == 409:  # removal already in progress
                return
            raise RuntimeUnavailableError(f"cannot remove container {container_id[:12]}: {e.explanation}") from e

    def watch_exits(self, labels: dict[str, str], on_exit: Callable[[ExitEvent], None], stop: threading.Event) -> None:
        """One thread for every run: follows the engine's ``die`` events until ``stop`` is set."""
        filters = {"type": "container", "event": "die", "label": [f"{k}={v}" for k, v in labels.items()]}
        since = int(time.time())
        current: list[Any] = []
        closer = threading.Thread(target=_close_on(stop, current), daemon=True, name="docker-events-closer")
        closer.start()
        while not stop.is_set():
            try:
                stream = self.client.events(decode=True, filters=filters, since=since)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                log.warning("cannot follow Docker events (%s); retrying", e)
                stop.wait(2)
                continue
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
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
                if not stop.is_set():
                    log.warning("Docker event stream broke (%s); reconnecting", e)
                    stop.wait(1)
            finally:
                stream.close()


def _close_on(stop: threading.Event, current: list[Any]) -> Callable[[], None]:
    """Closing the stream is the only way to unblock a thread reading Docker events."""

    def run() -> None:
        stop.wait()
        for stream in list(current):
            with contextlib.suppress(OSError, AttributeError):
                stream.close()

    return run
