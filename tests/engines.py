"""A second Docker engine for tests: one that a test may stop, kill, freeze and start again
without touching the engine every other test (and the developer) uses.

Each :class:`SecondEngine` is a ``dockerd`` of its own inside a network namespace of its own
(``ip netns add``), with its own data root, exec root, pid file, cgroup parent and config
file. The API socket is a unix socket in the engine's directory: a socket file is reachable
from the host's namespace, so the host's docker-py talks to it with
``docker.DockerClient(base_url=engine.base_url)``. Inside its namespace the engine keeps
its own default bridge (``docker0`` there is not the host's), so containers start exactly as
they do on a normal engine, ``host-gateway`` included. A ``dockerd`` started in the host's
namespace would be a hazard: with ``--bridge=none`` it deletes the main engine's ``docker0``.

The namespace has no link to the host's network: containers on this engine reach nothing
outside it (the server and the host reach it through the socket), so images are loaded, never
pulled or built. The image a test gets is the agent image without its three CLIs (the ``shell``
agent uses none of them): loading the whole agent image takes about 30 s per engine, this one
is made once per agent image into a template data root (:func:`engine_template`, about 25 s)
that each engine starts from a clone of (well under a second).

``close()`` (run by the context manager, also when the test fails) leaves nothing behind:
the engine, its containerd, shims and container processes, its mounts, cgroups, namespace
and files. Engines whose test process died are swept at the next :func:`second_engine`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests
import requests.exceptions

from agentic_dispatch.runtime.images import CLI_VERSIONS_LABEL

__all__ = [
    "EngineError",
    "EngineTemplate",
    "RemoteEngine",
    "SecondEngine",
    "Swarm",
    "SwarmNode",
    "engine_template",
    "export_shell_image",
    "remote_engine",
    "second_engine",
    "swarm",
]

# Names carry the test process's pid, so a sweep can tell a live engine from a leftover.
PREFIX = "ad-engine"
NETNS_DIR = Path("/run/netns")
TEMPLATES = Path(tempfile.gettempdir()) / f"{PREFIX}-templates"  # kept across runs: see engine_template
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A template another test process may still clone from is kept this long after it was last taken.
TEMPLATE_IDLE_SECONDS = 6 * 3600
# A remote engine's folder: not under the temp dir, which its own mount namespace hides.
REMOTE_BASE = Path("/var/tmp")
START_TIMEOUT = 60.0  # a start on a machine loaded with other test runs
STOP_TIMEOUT = 60.0  # dockerd stops its containers (10 s each at most) before it exits

_counter = iter(range(1_000_000))


class EngineError(RuntimeError):
    """The second engine did not do what the test asked (start, stop, load); the message has its log."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split(") ")[-1][:1] != "Z"
    return False


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class SecondEngine:
    """One extra ``dockerd``. Not started by the constructor: call :meth:`start`.

    Attributes:
        name: the network namespace's name, also the cgroup parent's.
        dir: the engine's own directory (data root, exec root, socket, log).
        socket: the API socket; :attr:`base_url` is its ``unix://`` URL.
        image: the tag of the shell image once :meth:`import_image` loaded one, else ``None``.
    """

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.dir = directory
        self.data_root = directory / "data"
        self.exec_root = directory / "exec"
        self.socket = directory / "docker.sock"
        self.pidfile = directory / "dockerd.pid"
        self.log_path = directory / "dockerd.log"
        self.image: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[docker.DockerClient] = []

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        """The running ``dockerd``'s pid (``None`` when it is not running)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def client(self, timeout: float = 60) -> docker.DockerClient:
        """A docker-py client of this engine (closed by :meth:`close`). The API version is
        fixed, so making one needs no answer from the engine (it may be stopped or frozen)."""
        client = docker.DockerClient(base_url=self.base_url, timeout=timeout, version="1.41")
        self._clients.append(client)
        return client

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start ``dockerd`` (again) on the same data root and wait until it answers.

        Raises:
            EngineError: it exited or did not answer within :data:`START_TIMEOUT`.
        """
        if self.pid is not None:
            raise EngineError(f"{self.name} is already running")
        # dockerd's own containerd dies with it (SIGKILL on parent death) and is reparented to
        # pid 1, which here may reap it late: while it is a zombie the new dockerd takes it for a
        # live containerd, waits for its socket and gives up. A real init reaps at once; do its part.
        containerd_pid = self.exec_root / "containerd" / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            if not _alive(int(containerd_pid.read_text(encoding="utf-8"))):
                containerd_pid.unlink()
        config = self.dir / "daemon.json"
        # Our own (empty) config file: the host's /etc/docker/daemon.json may name hosts or roots.
        config.write_text("{}\n", encoding="utf-8")
        argv = [
            # nsenter, not `ip netns exec`: the latter remounts /sys and dockerd then finds no cgroups.
            "nsenter",
            f"--net={NETNS_DIR / self.name}",
            *self._wrapper(),
            "dockerd",
            f"--config-file={config}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host={self.base_url}",
            # Container cgroups apart from the main engine's (/docker), so teardown finds every process.
            f"--cgroup-parent=/{self.name}",
            *self._extra_args(),
        ]
        with self.log_path.open("ab") as log:
            # nsenter execs dockerd in place (only the network namespace changes): this pid is dockerd's.
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        probe = docker.APIClient(base_url=self.base_url, timeout=5, version="1.41")
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EngineError(f"dockerd {self.name} exited ({self._proc.returncode}):\n{self.log_tail()}")
                with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    raise EngineError(f"dockerd {self.name} did not answer in {START_TIMEOUT}s:\n{self.log_tail()}")
                time.sleep(0.05)
        finally:
            probe.close()

    def _wrapper(self) -> list[str]:
        """What runs between nsenter and dockerd (each part execs the next: the pid stays dockerd's)."""
        return []

    def _extra_args(self) -> list[str]:
        return []

    def stop(self) -> None:
        """Stop ``dockerd`` as an administrator would (SIGTERM) and wait for it to exit. Like any
        engine without live-restore, it stops its containers and its containerd first."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.thaw()
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise EngineError(f"dockerd {self.name} did not stop in {STOP_TIMEOUT}s:\n{self.log_tail()}") from e

    def kill(self) -> None:
        """SIGKILL ``dockerd`` (a crash). Its containerd, shims and containers keep running, as they
        would on a real host; :meth:`start` finds them again."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(STOP_TIMEOUT)

    def freeze(self) -> None:
        """SIGSTOP ``dockerd``: its socket still accepts connections but nothing answers (a hung engine)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT ``dockerd`` after :meth:`freeze`."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Frozen inside the block, thawed after it (also when the block raises)."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    # -- images ----------------------------------------------------------------------------
    def import_image(self, rootfs_tar: Path, tag: str, changes: list[str]) -> str:
        """Import a flattened root file system as ``tag``, with ``changes`` (Dockerfile lines:
        ``USER``, ``ENV`` ...) as its configuration (see :func:`export_shell_image`).

        Raises:
            EngineError: the engine did not take it.
        """
        api = docker.APIClient(base_url=self.base_url, timeout=300, version="1.41")
        repository, _, version = tag.rpartition(":")
        try:
            with rootfs_tar.open("rb") as f:
                # import_image_from_data streams the open file (chunked upload), never all of it in memory.
                answer = api.import_image_from_data(f, repository=repository, tag=version, changes=changes)
        except docker.errors.APIError as e:
            raise EngineError(f"importing {tag} into {self.name} failed: {e}") from e
        finally:
            api.close()
        if "error" in str(answer).lower():
            raise EngineError(f"importing {tag} into {self.name} failed: {answer}")
        self.image = tag
        return tag

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Tear everything down, whatever state the engine is in (frozen, killed, stopped)."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.thaw()
            self._remove_containers()
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        _teardown(self.name, self.dir)

    def _remove_containers(self) -> None:
        """Remove containers through the API first: a clean stop then has none to wait for."""
        api = docker.APIClient(base_url=self.base_url, timeout=30, version="1.41")
        try:
            for c in api.containers(all=True):
                api.remove_container(c["Id"], force=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            pass  # best effort: the kill below does the rest
        finally:
            api.close()


def _netns_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split()]


def _cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory under this engine's cgroup parent, deepest first."""
    found: list[Path] = []
    if CGROUP_ROOT.is_dir():
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / name
            if top.is_dir():
                found.extend(p for p in top.rglob("*") if p.is_dir())
                found.append(top)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(dirs: list[Path]) -> list[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (d / "cgroup.procs").read_text(encoding="utf-8").split())
    return sorted(pids)


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if point == str(directory) or point.startswith(f"{directory}/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def _teardown(name: str, directory: Path) -> None:
    """Kill what is left of the engine ``name`` and remove its mounts, cgroups, namespace and files."""
    if (NETNS_DIR / name).exists():
        # After a SIGKILL of dockerd its containerd and shims live on in the namespace.
        leftovers = _netns_pids(name)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        _wait_gone(leftovers, 10)
    # Container processes live in network namespaces of their own but in our cgroups.
    cgroups = _cgroup_dirs(name)
    for _ in range(50):
        pids = _cgroup_pids(cgroups)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids, 2)
    for d in cgroups:
        with contextlib.suppress(OSError):
            d.rmdir()
    for point in _mounts_under(directory):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    if (NETNS_DIR / name).exists():
        _ip("netns", "del", name, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def _sweep_stale() -> None:
    """Remove engines and templates left by test processes that died before their teardown ran."""
    names = {ns.split(" ")[0] for ns in _ip("netns", "list", check=False).stdout.splitlines()}
    for base in (Path(tempfile.gettempdir()), REMOTE_BASE):
        names.update(p.name for p in base.glob(f"{PREFIX}-*"))
    for name in sorted(names):
        parts = name.split("-")
        if name.startswith(f"{PREFIX}-") and len(parts) > 2 and parts[2].isdigit() and not _alive(int(parts[2])):
            base = REMOTE_BASE if (REMOTE_BASE / name).exists() else Path(tempfile.gettempdir())
            _teardown(name, base / name)
            _ip("link", "del", _veth_host(name), check=False)


def _new_name(kind: str = "") -> tuple[str, Path]:
    name = f"{PREFIX}-{os.getpid()}-{kind}{next(_counter)}"
    # A short path under the temp dir: a unix socket path must stay under 108 bytes.
    directory = Path(tempfile.gettempdir()) / name
    directory.mkdir(mode=0o700)
    return name, directory


@dataclass(frozen=True)
class EngineTemplate:
    """The data root of a stopped engine that holds :attr:`image`; each engine made from it
    starts with a clone of it instead of loading the image again."""

    data_root: Path
    image: str


@contextlib.contextmanager
def second_engine(template: EngineTemplate | None = None) -> Iterator[SecondEngine]:
    """A started second engine (with ``template``'s image when given), torn down when the block
    ends, also when it raises.

    Raises:
        EngineError: the engine did not come up.
    """
    _sweep_stale()
    name, directory = _new_name()
    engine = SecondEngine(name, directory)
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        if template is not None:
            with _template_lock(fcntl.LOCK_SH):  # no other test process prunes it meanwhile
                _clone_data_root(template.data_root, engine.data_root)
            engine.image = template.image
        engine.start()
        yield engine
    finally:
        engine.close()


@contextlib.contextmanager
def _template_lock(kind: int) -> Iterator[None]:
    TEMPLATES.mkdir(mode=0o700, exist_ok=True)
    with (TEMPLATES / ".lock").open("a", encoding="utf-8") as f:
        fcntl.flock(f, kind)
        yield


def engine_template(client: docker.DockerClient, agent_image: str, with_clis: bool = False) -> EngineTemplate:
    """The template holding the shell image made from ``agent_image`` (see
    :func:`export_shell_image`), tagged ``agentic-dispatch-shell:<agent image id>``.

    Made once per agent image and kept (about 400 MB under the temp dir) for later test runs
    and concurrent ones: making it takes about 25 s, cloning it well under one. Templates of
    other agent images that no test process used for :data:`TEMPLATE_IDLE_SECONDS` are removed
    when a new one is made (test runs of other checkouts, with other images, may be using theirs).

    Raises:
        EngineError: the export, the import or the engine failed.
    """
    try:
        image_id = str(client.images.get(agent_image).id).removeprefix("sha256:")[:12]
    except docker.errors.DockerException as e:
        raise EngineError(f"the agent image {agent_image} is not on the main engine: {e}") from e
    root = TEMPLATES / (f"{image_id}-full" if with_clis else image_id)
    template = EngineTemplate(root / "data", f"agentic-dispatch-{'full' if with_clis else 'shell'}:{image_id}")
    with _template_lock(fcntl.LOCK_EX):
        if (root / "ready").exists():
            (root / "ready").touch()  # in use: see TEMPLATE_IDLE_SECONDS
            return template
        for old in TEMPLATES.iterdir():
            if old.is_dir() and not old.name.startswith(image_id) and _idle(old):
                shutil.rmtree(old, ignore_errors=True)
        _sweep_stale()
        _, directory = _new_name("template-")
        try:
            rootfs = directory / "rootfs.tar"
            changes = export_shell_image(client, agent_image, rootfs, with_clis)
            with second_engine() as engine:
                engine.import_image(rootfs, template.image, changes)
                engine.stop()  # no mounts left: its data root can be moved and cloned
                root.mkdir()
                engine.data_root.rename(template.data_root)
            (root / "ready").write_text(f"{agent_image}\n", encoding="utf-8")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return template


def _idle(template_root: Path) -> bool:
    try:
        return time.time() - (template_root / "ready").stat().st_mtime > TEMPLATE_IDLE_SECONDS
    except FileNotFoundError:
        return True  # never finished: a leftover


def _clone_data_root(template: Path, dest: Path) -> None:
    """Copy ``template`` to ``dest``, sharing the image layers' file contents.

    The layers' files (``overlay2/<layer>/diff``) are never written once a layer exists: the
    engine mounts them read-only under each container's own upper layer and only ever deletes
    them. They are hard-linked, which makes a clone of a 380 MB image take well under a second
    where a copy takes several. Everything else (the engine's databases, which it rewrites in
    place) is copied, so no two engines share a writable file.
    """
    subprocess.run(["cp", "-a", "--link", str(template), str(dest)], check=True, capture_output=True)
    for root, dirs, files in os.walk(dest):
        rel = Path(root).relative_to(dest).parts
        if len(rel) == 2 and rel[0] == "overlay2":
            dirs[:] = [d for d in dirs if d != "diff"]
        for f in files:
            path = Path(root) / f
            if path.is_symlink() or not path.is_file():
                continue
            tmp = path.with_name(f"{f}.clone-tmp")
            shutil.copy2(path, tmp)
            tmp.replace(path)


def export_shell_image(client: docker.DockerClient, agent_image: str, dest: Path, with_clis: bool = False) -> list[str]:
    """Write ``dest``: the agent image's file system without the three agent CLIs (``/opt/agent``,
    about 1 GB that only the CLI agents use), and return the agent image's configuration (user,
    working directory, environment, labels) as Dockerfile lines for :meth:`SecondEngine.import_image`
    (``docker export`` flattens the layers and drops it). What the ``shell`` agent uses is as it
    is in the agent image: bash, git and its system config, the ``agent`` user. The CLI-versions
    label is not carried: those CLIs are not there.

    Raises:
        EngineError: the main engine could not export the image.
    """
    try:
        config = client.api.inspect_image(agent_image)["Config"] or {}
        container = client.containers.create(agent_image, ["/bin/true"], network_disabled=True)
    except docker.errors.DockerException as e:
        raise EngineError(f"cannot export {agent_image}: {e}") from e
    try:
        stream = container.export(chunk_size=1024 * 1024)
        with (
            dest.open("wb") as out,
            tarfile.open(fileobj=_ChunkReader(stream), mode="r|") as src,
            tarfile.open(fileobj=out, mode="w|") as dst,
        ):
            for member in src:
                if not with_clis and (member.name == "opt/agent" or member.name.startswith("opt/agent/")):
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    finally:
        container.remove(force=True)
    changes = [f"USER {config['User']}"] if config.get("User") else []
    changes += [f"WORKDIR {config['WorkingDir']}"] if config.get("WorkingDir") else []
    for variable in config.get("Env") or []:
        key, _, value = variable.partition("=")
        changes.append(f"ENV {key}={json.dumps(value)}")
    for key, value in (config.get("Labels") or {}).items():
        if key != CLI_VERSIONS_LABEL or with_clis:
            changes.append(f"LABEL {json.dumps(key)}={json.dumps(value)}")
    return changes


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (what docker-py's export yields)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# -- an engine on "another machine" ----------------------------------------------------------
def _veth_host(name: str) -> str:
    """The host's end of an engine's veth pair (at most 15 characters)."""
    return f"adh{abs(hash(name)) % 10**10}"


@dataclass(frozen=True)
class Tls:
    """Certificates made by a test: a CA, the engine's server certificate, a client's, the gateway's."""

    dir: Path

    @property
    def client_dir(self) -> Path:
        """A ``DOCKER_CERT_PATH``: ca.pem, cert.pem, key.pem."""
        return self.dir / "client"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def server(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"


def make_tls(directory: Path, servers: dict[str, str]) -> Tls:
    """A CA and, per ``servers`` entry (name → IP address), a server certificate for that address,
    plus a client certificate (Docker's ``--tlsverify`` asks for one)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentic-dispatch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem(key)

    directory.mkdir(parents=True, exist_ok=True)
    tls = Tls(directory)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    tls.ca.write_bytes(ca_pem)
    for name, address in servers.items():
        cert, key = leaf(name, [x509.IPAddress(ipaddress.ip_address(address))], ExtendedKeyUsageOID.SERVER_AUTH)
        cert_path, key_path = tls.server(name)
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        key_path.chmod(0o600)
    cert, key = leaf("client", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    tls.client_dir.mkdir()
    (tls.client_dir / "ca.pem").write_bytes(ca_pem)
    (tls.client_dir / "cert.pem").write_bytes(cert)
    (tls.client_dir / "key.pem").write_bytes(key)
    (tls.client_dir / "key.pem").chmod(0o600)
    return tls


class RemoteEngine(SecondEngine):
    """A second engine as if on another machine: it shares no disk with the server (its own mount
    namespace, where the temp dir — every test's root, workspaces and repositories — is an empty
    tmpfs), it is reached over TCP with TLS at :attr:`address`, and its containers reach the host
    only at :attr:`host_address` (the host's end of a veth pair), where a run gateway listens."""

    def __init__(self, name: str, directory: Path, subnet: int) -> None:
        super().__init__(name, directory)
        self.host_address = f"10.231.{subnet}.1"
        self.address = f"10.231.{subnet}.2"
        self.tls = make_tls(directory / "tls", {"engine": self.address, "gateway": self.host_address})

    @property
    def docker_host(self) -> str:
        return f"tcp://{self.address}:2376"

    def _wrapper(self) -> list[str]:
        # A mount namespace of its own (unshare execs in place): the temp dir is hidden there.
        hide = 'mount -t tmpfs tmpfs /tmp && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "-"]

    def _extra_args(self) -> list[str]:
        cert, key = self.tls.server("engine")
        return [
            f"--host={self.docker_host}",
            "--tlsverify",
            f"--tlscacert={self.tls.ca}",
            f"--tlscert={cert}",
            f"--tlskey={key}",
        ]


def _free_subnet() -> int:
    used = _ip("-o", "addr", "show", check=False).stdout
    for _ in range(200):
        n = int.from_bytes(os.urandom(1), "big") % 250 + 1
        if f"10.231.{n}." not in used:
            return n
    raise EngineError("no free 10.231.N.0/24 for a remote engine")


@contextlib.contextmanager
def remote_engine(template: EngineTemplate) -> Iterator[RemoteEngine]:
    """A started :class:`RemoteEngine` holding ``template``'s image, torn down when the block ends
    (also when it raises).

    Raises:
        EngineError: the engine did not come up.
    """
    _sweep_stale()
    name = f"{PREFIX}-{os.getpid()}-remote{next(_counter)}"
    directory = REMOTE_BASE / name
    directory.mkdir(mode=0o700)
    subnet = _free_subnet()
    veth = _veth_host(name)
    peer = veth.replace("adh", "adn", 1)
    engine = RemoteEngine(name, directory, subnet)
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("addr", "add", f"{engine.host_address}/24", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", name, "addr", "add", f"{engine.address}/24", "dev", peer)
        _ip("-n", name, "link", "set", peer, "up")
        _ip("-n", name, "route", "add", "default", "via", engine.host_address)
        with _template_lock(fcntl.LOCK_SH):
            _clone_data_root(template.data_root, engine.data_root)
        engine.image = template.image
        engine.start()
        yield engine
    finally:
        engine.close()
        _ip("link", "del", veth, check=False)


# -- a swarm of engines, each "another machine" -------------------------------------------------
SWARM_NODES = 3  # a manager and two workers


class SwarmNode(SecondEngine):
    """One engine of a test swarm: its own network, mount and UTS namespaces (its own hostname, its
    own ``/etc/docker``, so every node has its own name and engine id; the temp dir hidden), on a
    bridge shared with the other nodes and the host at :attr:`address`. Each starts with the shell
    image cloned from the template; the nodes have no route beyond their bridge, so a task's pull
    of an image that is in no registry fails at once and the node runs the image it holds (as
    Swarm does when a registry is down), while an image in the test registry is pulled."""

    def __init__(self, name: str, directory: Path, address: str, hostname: str, registry: str) -> None:
        super().__init__(name, directory)
        self.address = address
        self.hostname = hostname
        self.registry = registry

    def _extra_args(self) -> list[str]:
        return [f"--insecure-registry={self.registry}"]  # the test registry speaks plain HTTP

    def _wrapper(self) -> list[str]:
        own = 'mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /etc/docker && hostname "$AD_HOSTNAME" && exec "$@"'
        return [
            "env",
            f"AD_HOSTNAME={self.hostname}",
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            own,
            "-",
        ]


@dataclass
class Swarm:
    """A manager and workers joined into one swarm (see :func:`swarm`).

    Attributes:
        nodes: the manager first, then the workers.
        host_address: the host's address on the nodes' bridge: where a run gateway listens for them.
        image: the shell image every node holds.
        registry: ``HOST:PORT`` of a registry (the distribution registry, plain HTTP) the nodes reach.
    """

    name: str
    nodes: list[SwarmNode]
    host_address: str
    image: str
    switch: str
    registry: str

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    @property
    def docker_host(self) -> str:
        """The manager as ``DOCKER_HOST`` names it (its API socket, reachable from the host)."""
        return self.manager.base_url

    def node(self, hostname: str) -> SwarmNode:
        return next(n for n in self.nodes if n.hostname == hostname)

    def cut_off(self, node: SwarmNode) -> None:
        """The machine is gone: its link to the others is down and its engine killed (its containers
        live on, unreachable, as they would on a machine that lost its network)."""
        _ip("-n", self.switch, "link", "set", _node_port(self.name, self.nodes.index(node)), "down")
        node.kill()

    def services(self) -> list[dict[str, object]]:
        api = docker.APIClient(base_url=self.docker_host, timeout=30, version="1.41")
        try:
            return list(api.services())
        finally:
            api.close()

    def placement(self, services: dict[str, str]) -> dict[str, str]:
        """The node (its hostname) each of ``services`` (key -> service id) has a running task on."""
        api = docker.APIClient(base_url=self.docker_host, timeout=30, version="1.41")
        try:
            hostnames = {n["ID"]: n["Description"]["Hostname"] for n in api.nodes()}
            running = {t["ServiceID"]: t["NodeID"] for t in api.tasks() if t["Status"]["State"] == "running"}
        finally:
            api.close()
        return {key: hostnames[running[sid]] for key, sid in services.items() if sid in running}

    def leftovers(self, label: str | None = None, value: str | None = None) -> list[str]:
        """What of the runs labelled ``label=value`` (without a label: of anything) the swarm still
        holds: their services, the manager's tasks and the containers on the nodes still up (the disk a
        finished run would otherwise keep on a node: its writable layer holds its clone)."""

        def ours(labels: dict[str, str] | None) -> bool:
            return label is None or (labels or {}).get(label) == value

        only = {"label": f"{label}={value}"} if label is not None else {}
        api = docker.APIClient(base_url=self.docker_host, timeout=30, version="1.41")
        try:
            found = [f"service {s['Spec']['Name']}" for s in api.services(filters=only)]
            found += [
                f"task {t['ID'][:12]} ({t['Status']['State']})"
                for t in api.tasks()
                if ours(((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels"))
            ]
        finally:
            api.close()
        for node in (n for n in self.nodes if n.pid is not None):
            # The plain listing: docker-py's containers.list() inspects each, and one may go in between.
            with contextlib.closing(docker.APIClient(base_url=node.base_url, timeout=30, version="1.41")) as client:
                listed = client.containers(all=True, filters=only)
                found += [f"container {c['Names'][0]} on {node.hostname}" for c in listed]
        return found


def _node_port(name: str, index: int) -> str:
    """The switch's end of node ``index``'s veth (at most 15 characters)."""
    return f"ads{abs(hash(name)) % 10**8}p{index}"


def _free_swarm_subnet() -> int:
    used = _ip("-o", "addr", "show", check=False).stdout + "".join(
        _ip("-n", ns.split(" ")[0], "-o", "addr", "show", check=False).stdout
        for ns in _ip("netns", "list", check=False).stdout.splitlines()
        if ns.startswith(PREFIX)
    )
    for _ in range(200):
        n = int.from_bytes(os.urandom(1), "big") % 250 + 1
        if f"10.232.{n}." not in used:
            return n
    raise EngineError("no free 10.232.N.0/24 for a swarm")


@contextlib.contextmanager
def swarm(template: EngineTemplate, workers: int = SWARM_NODES - 1) -> Iterator[Swarm]:
    """A started swarm of one manager and ``workers`` workers, each a :class:`SwarmNode` holding
    ``template``'s image, on a bridge of its own (in a namespace of its own: the host's FORWARD
    policy would drop node-to-node traffic) that the host joins at ``10.232.N.1``. Nodes report
    to the manager every second, so a lost one is ``down`` within seconds. Everything is torn
    down when the block ends, also when it raises.

    Raises:
        EngineError: an engine did not come up, or the swarm did not form.
    """
    _sweep_stale()
    base = f"{PREFIX}-{os.getpid()}-swarm{next(_counter)}"
    switch = f"{base}-sw"
    subnet = _free_swarm_subnet()
    host_address = f"10.232.{subnet}.1"
    veth = _veth_host(switch)
    nodes: list[SwarmNode] = []
    registry = f"{host_address}:5000"
    made = Swarm(base, nodes, host_address, template.image, switch, registry)
    registry_proc: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "adsw-tmp")
        _ip("link", "set", "adsw-tmp", "netns", switch)
        _ip("-n", switch, "link", "set", "adsw-tmp", "name", "uplink", "master", "br0", "up")
        _ip("addr", "add", f"{host_address}/24", "dev", veth)
        _ip("link", "set", veth, "up")
        for i in range(workers + 1):
            name = f"{base}-{i}"
            directory = REMOTE_BASE / name
            directory.mkdir(mode=0o700)
            node = SwarmNode(name, directory, f"10.232.{subnet}.{i + 2}", f"node{i}" if i else "manager", registry)
            nodes.append(node)
            port = _node_port(base, i)
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            with _template_lock(fcntl.LOCK_SH):
                _clone_data_root(template.data_root, node.data_root)
            node.image = template.image
            node.start()
        manager = nodes[0].client()
        try:
            manager.swarm.init(
                advertise_addr=nodes[0].address,
                listen_addr=f"{nodes[0].address}:2377",
                dispatcher_heartbeat_period=1_000_000_000,
            )
            token = manager.swarm.attrs["JoinTokens"]["Worker"]
            for node in nodes[1:]:
                node.client().swarm.join(
                    remote_addrs=[f"{nodes[0].address}:2377"],
                    join_token=token,
                    listen_addr=f"{node.address}:2377",
                    advertise_addr=node.address,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while sum(n["Status"]["State"] == "ready" for n in manager.api.nodes()) < len(nodes):
                if time.monotonic() > deadline:
                    raise EngineError(f"the swarm's nodes are not all ready: {manager.api.nodes()}")
                time.sleep(0.1)
        except docker.errors.DockerException as e:
            raise EngineError(f"the swarm did not form: {e}\n{nodes[0].log_tail()}") from e
        registry_proc = _start_registry(nodes[0].dir / "registry", registry)
        yield made
    finally:
        if registry_proc is not None:
            registry_proc.terminate()
            registry_proc.wait(STOP_TIMEOUT)
        for node in reversed(nodes):
            node.close()
        _ip("netns", "del", switch, check=False)
        _ip("link", "del", veth, check=False)


def _start_registry(directory: Path, address: str) -> subprocess.Popen[bytes]:
    """Debian's ``docker-registry`` (the distribution registry) on ``address``, storing in ``directory``;
    returned once it answers.

    Raises:
        EngineError: it exited or did not answer within :data:`START_TIMEOUT`.
    """
    directory.mkdir()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {directory / 'data'}\nhttp:\n  addr: {address}\n",
        encoding="utf-8",
    )
    log = directory / "registry.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise EngineError(f"the registry exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(requests.exceptions.RequestException):
            if requests.get(f"http://{address}/v2/", timeout=2).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise EngineError(f"the registry did not answer in {START_TIMEOUT}s")
        time.sleep(0.05)
