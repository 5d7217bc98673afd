"""What an agent leaves in its workspace cannot reach the host through the server.

The agent runs as the host user with its repo, home and logs folders mounted read-write.
It can plant symbolic links there, rewrite ``.git/config``, or rewrite git object files.
The server must never follow such a link, never run a program the agent configured, and
never share a file with the user's own repository.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import docker
import pytest

from agentic_dispatch import safefs
from agentic_dispatch.errors import UnsafePathError
from agentic_dispatch.mirrors import MirrorCache
from agentic_dispatch.models import DispatchRequest, Status
from agentic_dispatch.repos import resolve_repo
from agentic_dispatch.runtime.base import LABEL_AGENT, LABEL_ROOT, LABEL_RUN, LABEL_WORKSPACE
from agentic_dispatch.service import Dispatcher
from agentic_dispatch.workspace import recent_log

from .conftest import git


# -- safefs --------------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path: Path) -> Path:
    d = tmp_path / "mounted"
    d.mkdir()
    return d


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    f = tmp_path / "host-secret.txt"
    f.write_text("HOST-ONLY-CONTENT\n", encoding="utf-8")
    return f


def test_reads_refuse_a_link_to_a_host_file(base: Path, host_file: Path) -> None:
    (base / "BLOCKED.md").symlink_to(host_file)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safefs.read_text(base, base / "BLOCKED.md", 1000)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safefs.tail_text(base, base / "BLOCKED.md", 1000)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safefs.check_file(base, base / "BLOCKED.md")


def test_reads_refuse_a_linked_folder_on_the_way(base: Path, tmp_path: Path, host_file: Path) -> None:
    (base / "sub").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="sub is a symbolic link"):
        safefs.read_text(base, base / "sub" / host_file.name, 1000)


def test_reads_refuse_a_fifo_instead_of_hanging(base: Path) -> None:
    os.mkfifo(base / "BLOCKED.md")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        safefs.read_text(base, base / "BLOCKED.md", 1000)


def test_reads_stop_at_the_limit_and_a_missing_file_is_none(base: Path) -> None:
    (base / "big.md").write_text("x" * 10_000, encoding="utf-8")
    assert safefs.read_text(base, base / "big.md", 100) == "x" * 100
    assert safefs.tail_text(base, base / "big.md", 10) == "x" * 10
    assert safefs.read_text(base, base / "missing.md", 100) is None
    assert safefs.read_text(base, base / "no" / "such" / "folder.md", 100) is None


def test_writes_replace_a_link_and_leave_its_target_alone(base: Path, host_file: Path) -> None:
    (base / "ANSWER.md").symlink_to(host_file)
    safefs.write_text(base, base / "ANSWER.md", "the answer\n")
    assert host_file.read_text(encoding="utf-8") == "HOST-ONLY-CONTENT\n"
    assert not (base / "ANSWER.md").is_symlink()
    assert (base / "ANSWER.md").read_text(encoding="utf-8") == "the answer\n"


def test_writes_and_appends_refuse_a_linked_folder(base: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / ".gemini").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"\.gemini is a symbolic link"):
        safefs.write_text(base, base / ".gemini" / "settings.json", "{}")
    with pytest.raises(UnsafePathError):
        safefs.append_text(base, base / ".gemini" / "log", "x")
    with pytest.raises(UnsafePathError):
        safefs.ensure_file(base, base / ".gemini" / "auth.json")
    assert list(outside.iterdir()) == []


def test_a_link_written_replaces_a_link_and_removing_one_never_reaches_its_target(
    base: Path, host_file: Path, tmp_path: Path
) -> None:
    (base / "notes").symlink_to(host_file)
    safefs.write_link(base, base / "notes", "docs/notes.md")
    assert (base / "notes").readlink() == Path("docs/notes.md")
    assert host_file.read_text(encoding="utf-8") == "HOST-ONLY-CONTENT\n"
    (base / "gone").symlink_to(host_file)
    assert safefs.remove_file(base, base / "gone") is True
    assert host_file.exists() and not (base / "gone").is_symlink()
    assert safefs.remove_file(base, base / "never" / "there") is False
    assert not (base / "never").exists()  # finding out made no folder
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("x", encoding="utf-8")
    (base / "linked").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        safefs.remove_file(base, base / "linked" / "x")
    with pytest.raises(UnsafePathError):
        safefs.write_link(base, base / "linked" / "y", "/etc/passwd")
    assert sorted(p.name for p in outside.iterdir()) == ["x"]


def test_append_refuses_a_link_and_writes_nothing_through_it(base: Path, host_file: Path) -> None:
    (base / "agent.log").symlink_to(host_file)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safefs.append_text(base, base / "agent.log", "=== run 2\n")
    assert host_file.read_text(encoding="utf-8") == "HOST-ONLY-CONTENT\n"


def test_copies_are_private_from_the_start_and_keep_a_newer_copy(base: Path, tmp_path: Path) -> None:
    source = tmp_path / "credentials.json"
    source.write_text('{"token": "old"}', encoding="utf-8")
    target = base / ".claude" / ".credentials.json"
    assert safefs.copy_file(base, source, target, mode=0o600, keep_newer=True)
    assert target.stat().st_mode & 0o777 == 0o600
    target.write_text('{"token": "refreshed by the CLI"}', encoding="utf-8")
    os.utime(source, (1, 1))  # the host file is older than the CLI's refreshed copy
    assert not safefs.copy_file(base, source, target, mode=0o600, keep_newer=True)
    assert "refreshed" in target.read_text(encoding="utf-8")


def test_paths_outside_the_base_are_refused(base: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="not inside"):
        safefs.write_text(base, tmp_path / "elsewhere.txt", "x")
    with pytest.raises(UnsafePathError, match="not inside"):
        safefs.read_text(base, base / ".." / "elsewhere.txt", 10)


# -- git on the host -----------------------------------------------------------------------
def _signed_looking_commit(repo: Path) -> None:
    """Make HEAD a commit with a (fake) signature, so `git log --show-signature` calls gpg."""
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    parent = git(repo, "rev-parse", "HEAD")
    body = (
        f"tree {tree}\nparent {parent}\n"
        "author A <a@example.com> 1700000000 +0000\ncommitter A <a@example.com> 1700000000 +0000\n"
        "gpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n -----END PGP SIGNATURE-----\n\nsigned\n"
    )
    sha = subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
        cwd=repo,
        input=body,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    git(repo, "update-ref", "HEAD", sha)


def test_reading_the_log_never_runs_a_program_the_agent_configured(user_repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran-on-the-host"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n", encoding="utf-8")
    script.chmod(0o755)
    _signed_looking_commit(user_repo)
    # What an agent can write into its clone's .git/config from inside the container:
    git(user_repo, "config", "log.showSignature", "true")
    git(user_repo, "config", "gpg.program", str(script))
    git(user_repo, "config", "core.fsmonitor", str(script))
    subprocess.run(["git", "log", "-n1"], cwd=user_repo, capture_output=True, check=False)
    assert marker.exists(), "the set-up must be one where a plain `git log` runs the program"
    marker.unlink()

    assert "signed" in recent_log(user_repo)
    assert not marker.exists(), "recent_log ran a program named in the repository's config"


def test_a_mirror_of_a_local_repository_shares_no_file_with_it(user_repo: Path, tmp_path: Path) -> None:
    def inodes(folder: Path) -> set[int]:
        return {p.stat().st_ino for p in folder.rglob("*") if p.is_file()}

    ref = resolve_repo(str(user_repo), None, "https://example.invalid/{org}/{repo}.git")
    mirror = MirrorCache(tmp_path / "mirrors", 60).ensure(ref)
    shared = inodes(user_repo / ".git" / "objects") & inodes(mirror / "objects")
    assert not shared, "the mirror hardlinks the user's object files; an agent could rewrite them"


# -- through the service, in real containers -----------------------------------------------
@pytest.mark.docker
def test_links_an_agent_plants_are_not_followed_when_its_run_ends(
    dispatcher: Dispatcher, user_repo: Path, host_file: Path
) -> None:
    task = f'ln -s {host_file} BLOCKED.md && rm -f "$AGENTIC_LOG" && ln -s {host_file} "$AGENTIC_LOG"'
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    rec = dispatcher.wait(res.workspace, 60)
    assert rec.status == Status.FAILED, rec
    assert rec.reason and "BLOCKED.md" in rec.reason and "symbolic link" in rec.reason
    report = dispatcher.status(res.workspace, log_lines=20)
    assert "HOST-ONLY-CONTENT" not in report.model_dump_json()
    assert report.workspaces[0].log_tail and "symbolic link" in report.workspaces[0].log_tail


@pytest.mark.docker
def test_resume_writes_its_files_in_place_of_links_without_touching_their_targets(
    dispatcher: Dispatcher, user_repo: Path, host_file: Path
) -> None:
    task = (
        f"if [ ! -e .planted ]; then touch .planted; ln -s {host_file} ANSWER.md; "
        f"rm -f AGENTS.md && ln -s {host_file} AGENTS.md; fi; cat ANSWER.md 2>/dev/null; exit 0"
    )
    res = dispatcher.dispatch(DispatchRequest(repo=str(user_repo), task=task, agent="shell"))
    assert dispatcher.wait(res.workspace, 60).status == Status.COMPLETED
    dispatcher.resume(res.workspace, answer="the answer")
    rec = dispatcher.wait(res.workspace, 60)
    assert rec.status == Status.COMPLETED, rec
    assert rec.runs == 2
    assert host_file.read_text(encoding="utf-8") == "HOST-ONLY-CONTENT\n"
    repo = Path(res.repo_path)
    assert not (repo / "ANSWER.md").is_symlink() and not (repo / "AGENTS.md").is_symlink()
    log = Path(res.log_path).read_text(encoding="utf-8")
    assert "the answer" in log  # the second run read the answer the server wrote


@pytest.mark.docker
def test_the_container_is_the_boundary_no_privilege_no_socket_no_server_state_inside(
    dispatcher: Dispatcher, user_repo: Path, docker_client: docker.DockerClient
) -> None:
    res = dispatcher.dispatch(
        DispatchRequest(repo=str(user_repo), task="while [ ! -f go ]; do sleep 0.1; done", agent="shell")
    )
    rec = dispatcher.store.read(res.workspace)
    attrs = docker_client.api.inspect_container(rec.container_id)
    host = attrs["HostConfig"]
    try:
        assert host["Init"] is True and host["Privileged"] is False
        assert "no-new-privileges" in (host.get("SecurityOpt") or [])
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
        expected_user = "1000:1000" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
        assert attrs["Config"]["User"] == expected_user
        labels = attrs["Config"]["Labels"]
        assert labels[LABEL_WORKSPACE] == res.workspace and labels[LABEL_RUN] == "1"
        assert labels[LABEL_ROOT] == dispatcher.paths.root_id and labels[LABEL_AGENT] == "shell"
        mounts = {m["Source"]: m for m in attrs["Mounts"]}
        assert not any("docker.sock" in src or "/.ssh" in src for src in mounts), mounts
        ws = Path(res.path)
        writable = [Path(src) for src, m in mounts.items() if m["RW"]]
        assert sorted(writable) == sorted([ws / "repo", ws / ".meta" / "home", ws / ".meta" / "logs"])
        status = ws / "status.json"
        assert not any(status.is_relative_to(w) for w in writable), "status.json is inside a writable mount"
    finally:
        (Path(res.repo_path) / "go").touch()
    assert dispatcher.wait(res.workspace, 30).status == Status.COMPLETED
