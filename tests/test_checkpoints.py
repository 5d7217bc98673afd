"""Automatic checkpoints: a stopped run's uncommitted work becomes one commit on its branch, with
real git and real files. The clone is treated as the agent left it: hostile."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agentic_dispatch.checkpoints import Checkpoint, checkpoint
from agentic_dispatch.errors import CheckpointError, UnsafePathError

BRANCH = "agent/fix-things"
REF = f"refs/heads/{BRANCH}"
Plant = Callable[[Path, Path], None]  # what the "agent" leaves in (clone, a folder outside it)
# Git the test runs itself: no user configuration, no hooks or fsmonitor from the clone's config.
SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *SAFE, *args], cwd=cwd, env=_env(), capture_output=True, text=True, check=True)
    return done.stdout


def make_clone(tmp_path: Path) -> tuple[Path, str]:
    """A workspace's ``repo/`` on the run's branch with two committed files; returns (clone, tip)."""
    clone = tmp_path / "ws" / "repo"
    clone.mkdir(parents=True)
    git(clone, "init", "-q", "-b", "main")
    (clone / "keep.txt").write_text("keep\n", encoding="utf-8")
    (clone / "edit.txt").write_text("before\n", encoding="utf-8")
    (clone / "gone.txt").write_text("to be deleted\n", encoding="utf-8")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "start")
    git(clone, "checkout", "-qb", BRANCH)
    return clone, git(clone, "rev-parse", "HEAD").strip()


def work_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "checkpoints"


def tree_files(clone: Path, commit: str) -> dict[str, str]:
    """path → ``<mode> <blob contents>`` of ``commit``, read without filters."""
    out: dict[str, str] = {}
    for line in git(clone, "ls-tree", "-r", commit).splitlines():
        meta, path = line.split("\t", 1)
        mode, _, blob = meta.split()
        out[path] = f"{mode} {git(clone, 'cat-file', 'blob', blob)}"
    return out


def clone_state(clone: Path) -> dict[str, bytes]:
    """Every file under the clone's ``.git`` and its bytes (to tell that nothing changed)."""
    state: dict[str, bytes] = {}
    for folder, _, names in os.walk(clone / ".git"):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                state[str(path)] = b"link to " + os.fsencode(os.readlink(path))
            else:
                state[str(path)] = path.read_bytes() if path.is_file() else b"special"
    return state


def run_bounded(target: Callable[[], object], bound: float = 60.0) -> object:
    """Run ``target()`` on a thread and wait at most ``bound`` seconds for it (a hang fails the test)."""
    result: list[object] = []

    def body() -> None:
        try:
            result.append(target())
        except BaseException as e:  # handed back to the test
            result.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"still running after {bound} s: it hangs"
    return result[0]


def test_uncommitted_new_modified_and_deleted_files_become_one_checkpoint_commit_on_the_branch(tmp_path: Path) -> None:
    clone, tip = make_clone(tmp_path)
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")
    (clone / "gone.txt").unlink()
    (clone / "src").mkdir()
    (clone / "src" / "new.py").write_text("print('new')\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert isinstance(made, Checkpoint)
    assert made.files == 3 and made.left_out == ()
    assert git(clone, "rev-parse", REF).strip() == made.commit
    assert git(clone, "rev-parse", f"{made.commit}^").strip() == tip
    assert git(clone, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s", BRANCH).strip() == (
        "agentic-dispatch <agentic-dispatch@localhost>|agentic-dispatch <agentic-dispatch@localhost>|"
        "agentic-dispatch: automatic checkpoint (timeout)"
    )
    assert tree_files(clone, made.commit) == {
        "edit.txt": "100644 after\n",
        "keep.txt": "100644 keep\n",
        "src/new.py": "100644 print('new')\n",
    }
    assert git(clone, "status", "--porcelain") == ""
    assert git(clone, "fsck", "--no-dangling").strip() == ""
    assert list(work_dir(tmp_path).iterdir()) == [], "the throw-away repository is gone"


def test_a_clone_with_nothing_uncommitted_gets_no_checkpoint_and_nothing_changes(tmp_path: Path) -> None:
    clone, tip = make_clone(tmp_path)
    git(clone, "status", "--porcelain")  # the index's stat data is fresh, as the agent's git leaves it
    before = clone_state(clone)

    assert checkpoint(clone, BRANCH, "cancel", work_dir(tmp_path)) is None

    assert clone_state(clone) == before
    assert git(clone, "rev-parse", REF).strip() == tip


def test_hooks_fsmonitor_and_filter_drivers_the_agent_configured_never_run(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    marker = tmp_path / "ran"
    program = tmp_path / "evil.sh"
    program.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\ncat\n', encoding="utf-8")
    program.chmod(0o755)
    hooks = clone / ".git" / "hooks"
    for hook in ("post-index-change", "pre-commit", "post-commit", "reference-transaction", "post-checkout"):
        (hooks / hook).write_text(program.read_text(encoding="utf-8"), encoding="utf-8")
        (hooks / hook).chmod(0o755)
    with (clone / ".git" / "config").open("a", encoding="utf-8") as f:
        f.write(
            f"[core]\n\tfsmonitor = {program}\n\thooksPath = {hooks}\n\tattributesFile = {clone}/attrs\n"
            f'[filter "evil"]\n\tclean = {program} clean\n\tsmudge = {program} smudge\n\trequired = true\n'
            f'[filter "lfs"]\n\tclean = {program} lfs\n\tprocess = {program} process\n\trequired = true\n'
        )
    (clone / "attrs").write_text("* filter=evil\n", encoding="utf-8")
    (clone / ".gitattributes").write_text("* filter=evil\n", encoding="utf-8")
    (clone / "src").mkdir()
    (clone / "src" / ".gitattributes").write_text("*.txt filter=lfs\n", encoding="utf-8")
    (clone / "src" / "data.txt").write_text("raw contents\n", encoding="utf-8")
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "shutdown", work_dir(tmp_path))

    assert made is not None
    assert not marker.exists(), marker.read_text(encoding="utf-8")
    files = tree_files(clone, made.commit)
    assert files["src/data.txt"] == "100644 raw contents\n" and files["edit.txt"] == "100644 after\n"


def test_a_filter_driver_in_the_users_global_git_config_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone, _ = make_clone(tmp_path)
    marker = tmp_path / "ran"
    home = tmp_path / "user"
    home.mkdir()
    (home / ".gitconfig").write_text(
        f"[filter \"lfs\"]\n\tclean = sh -c 'touch {marker}; cat'\n\trequired = true\n", encoding="utf-8"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    (clone / ".gitattributes").write_text("* filter=lfs\n", encoding="utf-8")
    (clone / "big.bin").write_text("not a pointer\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "disk cap", work_dir(tmp_path))

    assert made is not None
    assert not marker.exists()
    assert tree_files(clone, made.commit)["big.bin"] == "100644 not a pointer\n"


def test_info_exclude_entries_and_gitignore_files_are_honoured(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    (clone / ".git" / "info").mkdir(exist_ok=True)
    (clone / ".git" / "info" / "exclude").write_text("/BLOCKED.md\n/AGENTS.md\n", encoding="utf-8")
    (clone / "BLOCKED.md").write_text("a question\n", encoding="utf-8")
    (clone / "AGENTS.md").write_text("instructions\n", encoding="utf-8")
    (clone / "lib").mkdir()
    (clone / "lib" / ".gitignore").write_text("*.o\n", encoding="utf-8")
    (clone / "lib" / "x.o").write_text("object\n", encoding="utf-8")
    (clone / "lib" / "x.c").write_text("int x;\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert made is not None
    assert set(tree_files(clone, made.commit)) == {"edit.txt", "gone.txt", "keep.txt", "lib/.gitignore", "lib/x.c"}
    assert git(clone, "status", "--porcelain") == ""


def _link_the_ref_file(clone: Path, outside: Path) -> None:
    ref = clone / ".git" / REF
    (outside / "tip").write_text(ref.read_text(encoding="utf-8"), encoding="utf-8")
    ref.unlink()
    ref.symlink_to(outside / "tip")


def _link_the_ref_folder(clone: Path, outside: Path) -> None:
    folder = clone / ".git" / "refs" / "heads" / "agent"
    (outside / "fix-things").write_text((folder / "fix-things").read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "fix-things").unlink()
    folder.rmdir()
    folder.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("plant", [_link_the_ref_file, _link_the_ref_folder], ids=["ref-file", "ref-folder"])
def test_a_link_in_refs_heads_is_refused_and_nothing_is_written_through_it(tmp_path: Path, plant: Plant) -> None:
    clone, _ = make_clone(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(clone, outside)
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}

    with pytest.raises(UnsafePathError):
        checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def _link_an_object_folder(clone: Path, outside: Path) -> None:
    objects = clone / ".git" / "objects"  # a fan-out folder the clone has none of yet (its hashes vary by the clock)
    free = next(name for name in (f"{n:02x}" for n in range(256)) if not (objects / name).exists())
    (objects / free).symlink_to(outside, target_is_directory=True)


def _link_an_object(clone: Path, outside: Path) -> None:
    (outside / "secret").write_text("secret\n", encoding="utf-8")
    (clone / ".git" / "objects" / "ff").mkdir(exist_ok=True)
    (clone / ".git" / "objects" / "ff" / ("0" * 38)).symlink_to(outside / "secret")


def _alternates(clone: Path, outside: Path) -> None:
    (clone / ".git" / "objects" / "info" / "alternates").write_text(f"{outside}\n", encoding="utf-8")


@pytest.mark.parametrize("plant", [_link_an_object_folder, _link_an_object, _alternates])
def test_a_link_or_alternates_in_the_object_folder_is_refused_and_nothing_is_written(
    tmp_path: Path, plant: Plant
) -> None:
    clone, _ = make_clone(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(clone, outside)
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")
    before_outside = {p.name: p.read_bytes() for p in outside.iterdir()}
    before = clone_state(clone)

    with pytest.raises(UnsafePathError):
        checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before_outside
    assert clone_state(clone) == before


def test_a_link_in_place_of_the_index_is_replaced_never_written_through(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n", encoding="utf-8")
    (clone / ".git" / "index").unlink()
    (clone / ".git" / "index").symlink_to(victim)
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    assert checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path)) is not None

    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert not (clone / ".git" / "index").is_symlink()
    assert git(clone, "status", "--porcelain") == ""


def test_a_fifo_in_the_work_tree_does_not_hang_and_is_left_out(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    os.mkfifo(clone / "pipe")
    (clone / "gone.txt").unlink()
    os.mkfifo(clone / "gone.txt")  # a tracked file the agent replaced with a FIFO
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    made = run_bounded(lambda: checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path)))

    assert isinstance(made, Checkpoint), made
    assert sorted(made.left_out) == ["gone.txt", "pipe"]
    assert set(tree_files(clone, made.commit)) == {"edit.txt", "keep.txt"}


@pytest.mark.parametrize("name", [".gitignore", ".gitattributes"])
def test_a_fifo_where_git_reads_its_rules_is_refused_without_hanging(tmp_path: Path, name: str) -> None:
    clone, tip = make_clone(tmp_path)
    (clone / "sub").mkdir()
    os.mkfifo(clone / "sub" / name)
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    raised = run_bounded(lambda: checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path)))

    assert isinstance(raised, UnsafePathError), raised
    assert raised.path == clone / "sub" / name
    assert git(clone, "rev-parse", REF).strip() == tip


def test_a_branch_only_in_packed_refs_is_checkpointed(tmp_path: Path) -> None:
    clone, tip = make_clone(tmp_path)
    git(clone, "pack-refs", "--all")
    assert not (clone / ".git" / REF).exists()
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert made is not None
    assert (clone / ".git" / REF).read_text(encoding="utf-8") == f"{made.commit}\n"
    assert git(clone, "rev-parse", f"{BRANCH}^").strip() == tip
    assert git(clone, "status", "--porcelain") == ""


def test_symlinks_in_the_work_tree_are_committed_as_links_never_followed(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n", encoding="utf-8")
    (clone / "to-secret").symlink_to(secret)
    (clone / "to-folder").symlink_to(tmp_path, target_is_directory=True)

    made = checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert made is not None
    files = tree_files(clone, made.commit)
    assert files["to-secret"] == f"120000 {secret}" and files["to-folder"] == f"120000 {tmp_path}"
    assert "host secret" not in "".join(files.values())


def test_files_over_the_size_limit_are_left_out_and_a_tracked_one_keeps_the_tips_version(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    (clone / "dump [1].bin").write_bytes(b"x" * 4096)
    (clone / "edit.txt").write_bytes(b"y" * 4096)
    (clone / "keep.txt").write_text("changed a little\n", encoding="utf-8")

    made = checkpoint(clone, BRANCH, "disk cap", work_dir(tmp_path), max_file_bytes=1024)

    assert made is not None
    assert sorted(made.left_out) == ["dump [1].bin", "edit.txt"]
    files = tree_files(clone, made.commit)
    assert files["edit.txt"] == "100644 before\n" and files["keep.txt"] == "100644 changed a little\n"
    assert "dump [1].bin" not in files
    assert git(clone, "status", "--porcelain", "-uall").splitlines() == [" M edit.txt", '?? "dump [1].bin"']


def test_a_head_on_another_branch_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    clone, tip = make_clone(tmp_path)
    git(clone, "checkout", "-qb", "elsewhere")
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    with pytest.raises(CheckpointError, match="HEAD is not on"):
        checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert git(clone, "rev-parse", REF).strip() == tip


def test_a_branch_tip_that_is_not_a_commit_is_refused_with_a_checkpoint_error(tmp_path: Path) -> None:
    clone, _ = make_clone(tmp_path)
    (clone / ".git" / REF).write_text("ab" * 20 + "\n", encoding="utf-8")
    (clone / "edit.txt").write_text("after\n", encoding="utf-8")

    with pytest.raises(CheckpointError, match="cat-file failed"):
        checkpoint(clone, BRANCH, "timeout", work_dir(tmp_path))

    assert list(work_dir(tmp_path).iterdir()) == [], "the throw-away repository is gone after a failure too"
