"""The agent image carries its CLIs' versions as a label, so a dispatch learns them without
starting a container; an image without the label is asked once and remembered."""

from __future__ import annotations

import io
import json
import py_compile
import shutil
import time
from collections.abc import Iterator

import docker
import pytest

from agentic_dispatch.config import load_settings
from agentic_dispatch.runtime.docker import DockerRuntime
from agentic_dispatch.runtime.images import (
    AGENT_CLIS,
    CLI_VERSIONS_LABEL,
    _recipe_dir,
    _stamp_versions,
    default_image_tag,
)
from agentic_dispatch.service import Dispatcher


def _copy_of(client: docker.DockerClient, image: str, tag: str, labels: dict[str, str] | None = None) -> str:
    """A cheap image of our own: the agent image under another tag, with ``labels`` replaced."""
    dockerfile = f"FROM {client.images.get(image).id}\n".encode()
    for _ in client.api.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, decode=True, labels=labels or {}):
        pass
    return tag


@pytest.fixture
def scratch_tags(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        docker_client.images.remove(tag, force=True)


def _containers_created(client: docker.DockerClient, since: int, image: str) -> list[str]:
    events = client.events(since=since, until=int(time.time()) + 1, decode=True, filters={"event": "create"})
    return [e["id"] for e in events if e.get("from") == image]


def test_an_image_build_stamps_each_cli_s_version_on_the_image(
    agent_image: str, docker_client: docker.DockerClient, scratch_tags: list[str]
) -> None:
    tag = _copy_of(docker_client, agent_image, "agentic-dispatch-test:stamp", {CLI_VERSIONS_LABEL: ""})
    scratch_tags.append(tag)
    _stamp_versions(docker_client, tag, lambda _: None)
    versions = json.loads(docker_client.images.get(tag).labels[CLI_VERSIONS_LABEL])
    assert set(versions) == set(AGENT_CLIS)
    assert versions["claude"].startswith("2.") and "codex" in versions["codex"], versions
    assert not any(v.startswith("!") for v in versions.values()), versions


def test_a_dispatch_reads_the_cli_versions_from_the_label_without_starting_a_container(
    agent_image: str, docker_client: docker.DockerClient, scratch_tags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    said = {"claude": "claude 9.9.9 (from the label)", "codex": "codex-cli 9.9.9", "gemini": "9.9.9"}
    tag = _copy_of(docker_client, agent_image, "agentic-dispatch-test:labelled", {CLI_VERSIONS_LABEL: json.dumps(said)})
    scratch_tags.append(tag)
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", tag)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-000000")
    settings, paths = load_settings()
    svc = Dispatcher(settings, paths, DockerRuntime(docker_client))
    since = int(time.time()) - 1
    versions = svc.preflight.cli_versions()
    svc.preflight.check("claude")  # what a dispatch of claude asks before it writes anything
    assert versions == said
    assert _containers_created(docker_client, since, tag) == []
    assert not (paths.state / "cli-versions.json").exists()


def test_an_image_without_the_label_is_asked_once_and_the_answer_kept_by_image_id(
    agent_image: str, docker_client: docker.DockerClient, scratch_tags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = _copy_of(docker_client, agent_image, "agentic-dispatch-test:unlabelled", {CLI_VERSIONS_LABEL: ""})
    scratch_tags.append(tag)
    monkeypatch.setenv("AGENTIC_DISPATCH_IMAGE", tag)
    settings, paths = load_settings()
    since = int(time.time()) - 1
    first = Dispatcher(settings, paths, DockerRuntime(docker_client)).preflight.cli_versions()
    again = Dispatcher(settings, paths, DockerRuntime(docker_client)).preflight.cli_versions()
    assert first == again and first["claude"].startswith("2.")
    assert len(_containers_created(docker_client, since, tag)) == 1
    assert docker_client.images.get(tag).id in json.loads((paths.state / "cli-versions.json").read_text())


def test_the_image_tag_is_the_recipe_s_not_a_byte_compiled_copy_of_agentic_run_beside_it() -> None:
    """``python -m py_compile images/agent/agentic-run`` (a syntax check) leaves a ``__pycache__`` in the
    recipe; it gave another tag, so the next test run built the whole image again under it."""
    recipe = _recipe_dir()
    before = default_image_tag()
    cached = recipe / "__pycache__"
    assert not cached.exists(), "a byte-compiled file was left in the recipe before this test"
    py_compile.compile(str(recipe / "agentic-run"), cfile=str(cached / "agentic-run.cpython.pyc"), doraise=True)
    try:
        assert default_image_tag() == before
    finally:
        shutil.rmtree(cached)
