"""How a workspace gets its objects from the mirror, on a large repository: time and disk per workspace
for each way that shares no writable file with the mirror, against a baseline measured in the same run.

Baseline: the old staging clone, `git clone --no-checkout <mirror>`: a local clone, which hardlinks the
mirror's object files into the workspace (an agent could rewrite them and spoil the mirror).
Measured, each as a `--no-checkout` clone of the same mirror:
  (a) `--no-hardlinks`: the mirror's object files copied byte for byte;
  (b) `--shared`: no objects copied, the mirror named in `objects/info/alternates` (the container would
      then need the mirror mounted read-only at the same path);
  (c) `--no-local`: git's own transport, one pack made for the workspace and checked object by object;
and the whole staging step, `clone_workspace` (checkout and config included), against the staging step
before this change (hardlinked clone, then the agent branch checked out).
"Disk" counts the blocks of the workspace's files that are not the mirror's own (a hardlink costs nothing).
Prints ratios; never fails.

    .venv/bin/python bench/mirror_isolation.py [--runs 5] [--commits 20000] [--blob-mib 200]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dispatch_overhead import report

from agentic_dispatch.mirrors import MirrorCache
from agentic_dispatch.repos import resolve_repo
from agentic_dispatch.workspace import clone_workspace

IDENTITY = b"bench <bench@example.com> 1700000000 +0000"


def make_large_repo(path: Path, commits: int, blob_mib: int, seed: int = 7) -> None:
    """A synthetic repository with a long history: text files edited commit after commit (deltas, like
    source code) and, spread over the history, incompressible binary blobs making up ``blob_mib`` MiB."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    rnd = random.Random(seed)
    dirs, per_dir = 20, 50
    texts = {
        f"d{d:02}/f{f:02}.txt": [f"line {i} of d{d} f{f}\n" for i in range(60)]
        for d in range(dirs)
        for f in range(per_dir)
    }
    names = sorted(texts)
    blob_every = 5
    blob_size = max(1, blob_mib * (1 << 20) // max(1, commits // blob_every))
    proc = subprocess.Popen(["git", "-C", str(path), "fast-import", "--quiet"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    out = proc.stdin

    def data(payload: bytes) -> None:
        out.write(b"data %d\n" % len(payload))
        out.write(payload)
        out.write(b"\n")

    for n in range(commits):
        out.write(b"commit refs/heads/main\n")
        out.write(b"committer " + IDENTITY + b"\n")
        data(f"commit {n}".encode())
        if n == 0:
            for name in names:  # the initial tree holds every text file
                out.write(f"M 100644 inline {name}\n".encode())
                data("".join(texts[name]).encode())
        else:
            name = rnd.choice(names)
            lines = texts[name]
            lines[rnd.randrange(len(lines))] = f"edit {n} {rnd.random()}\n"
            out.write(f"M 100644 inline {name}\n".encode())
            data("".join(lines).encode())
        if n % blob_every == 0:
            out.write(f"M 100644 inline bin/b{n % 400:03}.bin\n".encode())
            data(rnd.randbytes(blob_size))
    out.close()
    if proc.wait() != 0:
        raise SystemExit("git fast-import failed")
    subprocess.run(["git", "-C", str(path), "checkout", "-q", "main"], check=True)


def disk_bytes(tree: Path, not_in: set[tuple[int, int]]) -> int:
    """Bytes allocated to files under ``tree`` that are not among the inodes ``not_in`` (nor counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for f in tree.rglob("*"):
        st = f.lstat()
        key = (st.st_dev, st.st_ino)
        if key in not_in or key in seen:
            continue
        seen.add(key)
        total += st.st_blocks * 512
    return total


def inodes(tree: Path) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in (f.lstat() for f in tree.rglob("*"))}


def git_clone(*opts: str) -> Callable[[Path, Path], None]:
    def run(mirror: Path, dest: Path) -> None:
        subprocess.run(["git", "clone", "-q", "--no-checkout", *opts, str(mirror), str(dest)], check=True)

    return run


def old_staging(mirror: Path, dest: Path) -> None:
    """The staging clone before this change: hardlinked objects, then the agent branch checked out."""
    git_clone()(mirror, dest)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", "-b", "agent/bench", "origin/main", "--"], check=True)


def staging(mirror: Path, dest: Path) -> None:
    clone_workspace(mirror, dest, str(mirror), None, "bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--commits", type=int, default=20_000)
    parser.add_argument("--blob-mib", type=int, default=200)
    args = parser.parse_args()
    options: dict[str, Callable[[Path, Path], None]] = {
        "baseline: hardlinked local clone": git_clone(),
        "(a) --no-hardlinks copy": git_clone("--no-hardlinks"),
        "(b) --shared (alternates)": git_clone("--shared"),
        "(c) --no-local (one pack)": git_clone("--no-local"),
        "staging before (hardlinks + checkout)": old_staging,
        "staging now (clone_workspace)": staging,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_large_repo(root / "big", args.commits, args.blob_mib)
        made = time.perf_counter() - t0
        ref = resolve_repo(str(root / "big"), None, "{org}/{repo}")
        mirror = MirrorCache(root / "mirrors", 3600).ensure(ref)
        mirror_inodes = inodes(mirror)
        mirror_mib = disk_bytes(mirror, set()) / (1 << 20)
        print(f"repository: {args.commits} commits, mirror {mirror_mib:.0f} MiB on disk (made in {made:.0f} s)")

        times: dict[str, list[float]] = {label: [] for label in options}
        disk: dict[str, list[int]] = {label: [] for label in options}
        for i in range(args.runs):
            for label, clone in options.items():  # interleaved, so drift in the machine hits every option alike
                dest = root / f"ws-{i}-{len(times[label])}-{abs(hash(label))}"
                os.sync()  # the previous clone's writeback must not land in this one's time
                t = time.perf_counter()
                clone(mirror, dest)
                times[label].append(time.perf_counter() - t)
                disk[label].append(disk_bytes(dest, mirror_inodes))
                shutil.rmtree(dest)

        pairs = [("baseline: hardlinked local clone", label) for label in list(options)[1:4]]
        pairs.append(("staging before (hardlinks + checkout)", "staging now (clone_workspace)"))
        for base, label in pairs:
            print()
            report(base, label, times[base], times[label])
            b, m = statistics.median(disk[base]) / (1 << 20), statistics.median(disk[label]) / (1 << 20)
            print(
                f"disk per workspace: {m:.1f} MiB vs {b:.1f} MiB baseline "
                f"(+{m - b:.1f} MiB, {m / max(b, 0.001):.0f}x; {m / mirror_mib:.2f} of the mirror)"
            )


if __name__ == "__main__":
    main()
