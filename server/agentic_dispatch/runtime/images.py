"""Building the agent image (``agentic-dispatch image build``).

The recipe is ``images/agent/Dockerfile``. Its base is an ordinary Debian image
where a registry is reachable; where none is (air-gapped machines, CI sandboxes) a
base is bootstrapped locally with ``debootstrap`` from the machine's own Debian
mirror and imported with ``docker import``. The host's extra CA certificates go into
the image so tools behind an intercepting proxy trust it. The image tag carries a
hash of the recipe and certificates, so an unchanged recipe is never rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import IMAGE_ENV, builtin_dir
from ..errors import RuntimeUnavailableError

# docker-py is imported by the functions that talk to an engine: which image runs use is known without it,
# and the server's first answer to its host must not wait for its import.
if TYPE_CHECKING:
    import docker

__all__ = [
    "AGENT_CLIS",
    "CLI_VERSIONS_LABEL",
    "DEFAULT_BASES",
    "VERSIONS_SCRIPT",
    "build_image",
    "configured_image",
    "default_image_tag",
    "ensure_base_image",
    "parse_versions",
    "push_image",
]

log = logging.getLogger(__name__)

IMAGE_REPO = "agentic-dispatch-agent"
LOCAL_BASE = "agentic-dispatch-base:bookworm"
DEFAULT_BASES = ("debian:bookworm-slim", "debian:bookworm")
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
MIRROR_ENV = "AGENTIC_DISPATCH_DEBIAN_MIRROR"

Progress = Callable[[str], None]

# The CLIs the recipe installs, and the label the build stamps with what each prints for
# --version: a dispatch reads it from the image instead of starting a container to ask.
AGENT_CLIS = ("claude", "codex", "gemini")
CLI_VERSIONS_LABEL = "agentic-dispatch.cli-versions"
# Prints "<cli>\t<first line of --version>", or "<cli>\t!<last line of the error>", per CLI.
VERSIONS_SCRIPT = (
    'for c in "$@"; do if v=$("$c" --version 2>&1); then printf "%s\\t%s\\n" "$c" "$(printf "%s" "$v" | head -n1)"; '
    'else printf "%s\\t!%s\\n" "$c" "$(printf "%s" "$v" | tail -n1)"; fi; done'
)


def parse_versions(output: str, clis: tuple[str, ...] | list[str]) -> dict[str, str]:
    """What :data:`VERSIONS_SCRIPT` printed, per CLI; ``!reason`` where a CLI did not answer."""
    found = dict.fromkeys(clis, "!the version check did not run")
    for line in output.splitlines():
        name, _, version = line.partition("\t")
        if name in found:
            found[name] = version.strip() or "!no output"
    return found


def _stamp_versions(client: docker.DockerClient, tag: str, progress: Progress) -> None:
    """Run each CLI's --version once in the new image and keep the answers as a label on it."""
    output = client.containers.run(
        tag, ["/bin/sh", "-c", VERSIONS_SCRIPT, "versions", *AGENT_CLIS], remove=True, network_disabled=True
    )
    versions = parse_versions(bytes(output).decode("utf-8", errors="replace"), AGENT_CLIS)
    progress(f"CLI versions: {versions}")
    dockerfile = f"FROM {client.images.get(tag).id}\n".encode()
    for chunk in client.api.build(
        fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, decode=True, labels={CLI_VERSIONS_LABEL: json.dumps(versions)}
    ):
        if "error" in chunk:
            raise RuntimeUnavailableError(f"labelling {tag} with its CLI versions failed: {chunk['error'].strip()}")


def _recipe_dir() -> Path:
    return builtin_dir("images") / "agent"


def _extra_certs() -> list[Path]:
    if not EXTRA_CA_DIR.is_dir():
        return []
    return sorted(p for p in EXTRA_CA_DIR.rglob("*.crt") if p.is_file())


def default_image_tag() -> str:
    """``agentic-dispatch-agent:<hash>`` of the recipe and the host's extra CA certificates."""
    h = hashlib.sha256()
    recipe = _recipe_dir()
    for p in sorted(recipe.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:  # a byte-compiled agentic-run is no part of the recipe
            h.update(p.relative_to(recipe).as_posix().encode())
            h.update(p.read_bytes())
    for cert in _extra_certs():
        h.update(cert.read_bytes())
    return f"{IMAGE_REPO}:{h.hexdigest()[:12]}"


def configured_image(image: str | None) -> str:
    """The agent image runs use: ``AGENTIC_DISPATCH_IMAGE``, else ``image`` (the config file's), else the
    tag `image build` makes."""
    return os.environ.get(IMAGE_ENV) or image or default_image_tag()


def _has_image(client: docker.DockerClient, name: str) -> bool:
    import docker.errors

    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def _debian_mirror() -> str | None:
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        try:
            text = src.read_text(encoding="utf-8")
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)\s*\nSuites:\s*bookworm\b", text, re.MULTILINE):
            return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE):
            return m.group(1)
    return None


def _bootstrap_base(client: docker.DockerClient, progress: Progress) -> str:
    mirror = _debian_mirror()
    if shutil.which("debootstrap") is None or os.geteuid() != 0 or mirror is None:
        raise RuntimeUnavailableError(
            "no Debian base image is available: pulling debian:bookworm-slim failed and a local base cannot be "
            "bootstrapped (that needs root, `debootstrap`, and a Debian bookworm mirror in apt's sources or in "
            f"{MIRROR_ENV}). Pull or load a Debian image, or pass --base IMAGE."
        )
    progress(f"bootstrapping a Debian bookworm base from {mirror} (about half a minute)")
    with tempfile.TemporaryDirectory(prefix="agentic-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-5:] + proc.stderr.splitlines()[-5:])
            raise RuntimeUnavailableError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(rootfs, arcname=".")
        buf.seek(0)
        client.api.import_image_from_data(buf.getvalue(), repository=LOCAL_BASE.split(":")[0], tag="bookworm")
    progress(f"imported {LOCAL_BASE}")
    return LOCAL_BASE


def ensure_base_image(client: docker.DockerClient, progress: Progress) -> str:
    """A Debian bookworm base present on the engine: local, pulled, or bootstrapped.

    Raises:
        RuntimeUnavailableError: none can be had.
    """
    import docker.errors

    for name in (*DEFAULT_BASES, LOCAL_BASE):
        if _has_image(client, name):
            return name
    try:
        progress(f"pulling {DEFAULT_BASES[0]}")
        client.images.pull(DEFAULT_BASES[0])
        return DEFAULT_BASES[0]
    except docker.errors.APIError as e:
        progress(f"cannot pull {DEFAULT_BASES[0]} ({e.explanation}); bootstrapping a base instead")
    return _bootstrap_base(client, progress)


def build_image(
    client: docker.DockerClient,
    tag: str | None = None,
    base: str | None = None,
    force: bool = False,
    progress: Progress = log.info,
) -> str:
    """Build the agent image unless an image with its tag exists already; return the tag.

    Raises:
        RuntimeUnavailableError: no base image, or the build failed (the message holds the build's last lines).
    """
    tag = tag or default_image_tag()
    if not force and _has_image(client, tag):
        progress(f"{tag} is present; nothing to build")
        return tag
    base = base or ensure_base_image(client, progress)
    with tempfile.TemporaryDirectory(prefix="agentic-image-") as tmp:
        ctx = Path(tmp)
        shutil.copytree(_recipe_dir(), ctx, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        certs = ctx / "certs"
        certs.mkdir(exist_ok=True)
        (certs / ".keep").touch()
        for i, cert in enumerate(_extra_certs()):
            shutil.copy(cert, certs / f"extra-{i}-{cert.name}")
        progress(f"building {tag} from {base}")
        tail: list[str] = []
        for chunk in client.api.build(
            path=str(ctx),
            tag=tag,
            buildargs={"BASE_IMAGE": base},
            rm=True,
            forcerm=True,
            decode=True,
            labels={"agentic-dispatch.image": "agent"},
        ):
            if "stream" in chunk:
                for line in str(chunk["stream"]).splitlines():
                    if line.strip():
                        tail = [*tail[-19:], line]
                        progress(line)
            if "error" in chunk:
                detail = "\n".join(tail[-10:])
                raise RuntimeUnavailableError(f"building {tag} failed: {chunk['error'].strip()}\n{detail}")
    _stamp_versions(client, tag, progress)
    client.images.get(tag).tag(IMAGE_REPO, "latest")
    return tag


def push_image(client: docker.DockerClient, image: str, registry: str, progress: Progress) -> str:
    """Tag ``image`` (on the engine ``client`` talks to) as ``<registry>/<its name>:<its tag>`` and push
    it there, so that every node of a swarm can pull it; return that name (the ``image`` to configure).

    Raises:
        RuntimeUnavailableError: the image is not on the engine, or the registry refused or cannot be
            reached (an engine reaches a registry over plain HTTP only when it is listed in its
            ``insecure-registries``).
    """
    import docker.errors

    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    target = f"{registry}/{repository.rsplit('/', 1)[-1]}"
    try:
        client.api.tag(image, target, tag)
        for line in client.api.push(target, tag, stream=True, decode=True):
            if line.get("error"):
                raise RuntimeUnavailableError(
                    f"pushing {image} to {registry} failed: {line['error']}. Check that the registry answers and "
                    "that the engine trusts it (a plain-HTTP registry must be in its insecure-registries)."
                )
            if line.get("status") and not line.get("progressDetail"):
                progress(" ".join(str(line[k]) for k in ("id", "status") if line.get(k)))
    except docker.errors.ImageNotFound as e:
        raise RuntimeUnavailableError(
            f"the image {image} is not on this engine: build it (`agentic-dispatch image build`) first."
        ) from e
    except docker.errors.DockerException as e:
        raise RuntimeUnavailableError(f"pushing {image} to {registry} failed: {e}") from e
    return f"{target}:{tag}"
