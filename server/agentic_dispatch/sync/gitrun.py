"""Running git on the host for delivery, and reading what ``git push`` answered.

Every command gets a clean environment (no ``GIT_DIR`` or config handed down from a parent
git, no prompt, English messages to parse), ``-c`` overrides that keep settings from running
programs or following pointers, and a deadline after which its whole process group is killed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..gitops import GIT_ENV, HOST_GIT_OVERRIDES, dubious_ownership
from .outcome import Outcome

__all__ = ["FETCH_CONFIG", "PUSH_CONFIG", "GitResult", "classify_push", "git_error", "run_git"]

# Settings for every git command of a delivery: no hooks, no fsmonitor, no signature programs
# (gitops.HOST_GIT_OVERRIDES), no auxiliary files read from object folders, no gc, no
# submodules, and every object received checked.
_COMMON = (
    *HOST_GIT_OVERRIDES,
    "core.commitGraph=false",
    "core.multiPackIndex=false",
    "pack.useBitmaps=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "fetch.writeCommitGraph=false",
    "fetch.recurseSubmodules=false",
    "submodule.recurse=false",
    "transfer.fsckObjects=true",
    "fetch.fsckObjects=true",
    "receive.fsckObjects=true",
    "protocol.allow=never",
)
# Fetching is only ever from a folder the server made.
FETCH_CONFIG = (*_COMMON, "protocol.file.allow=always")
PUSH_CONFIG = (
    *_COMMON,
    "protocol.file.allow=always",
    "protocol.ssh.allow=always",
    "protocol.https.allow=always",
    "protocol.http.allow=always",
    "protocol.git.allow=always",
    "push.recurseSubmodules=no",
    "push.followTags=false",
    "push.gpgSign=false",
)
# Variables that would point git at another repository or hand it configuration.
_DROPPED_ENV = frozenset(
    {
        "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
        "GIT_QUARANTINE_PATH", "GIT_PREFIX", "GIT_SHALLOW_FILE", "GIT_GRAFT_FILE", "GIT_REPLACE_REF_BASE",
        "GIT_CEILING_DIRECTORIES", "GIT_DISCOVERY_ACROSS_FILESYSTEM", "GIT_EXEC_PATH",
    }
)  # fmt: skip


@dataclass(frozen=True)
class GitResult:
    """How a git command ended; ``returncode`` is ``None`` when it ran past its deadline."""

    returncode: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV and not k.startswith("GIT_CONFIG_")}
    env.update(GIT_ENV)
    env.update({"LC_ALL": "C", "LANGUAGE": "C", "GIT_NO_REPLACE_OBJECTS": "1", "GIT_OPTIONAL_LOCKS": "0"})
    return env


def run_git(
    args: list[str], config: tuple[str, ...], timeout: float, *, env: Mapping[str, str] | None = None
) -> GitResult:
    """Run ``git -c <config>... <args>`` (no shell) and wait at most ``timeout`` seconds; ``env``
    is set on top of the clean environment (a checkpoint's identity, no global configuration).

    Raises:
        OSError: git cannot be started.
    """
    argv = ["git"]
    for item in config:
        argv += ["-c", item]
    with subprocess.Popen(
        [*argv, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**_env(), **(env or {})},
        start_new_session=True,  # its own process group: ssh or a remote helper is killed with it
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return GitResult(None, out.decode(errors="replace"), err.decode(errors="replace"))
    return GitResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def git_error(result: GitResult, limit: int = 3) -> str:
    """The last few meaningful lines git printed on stderr, on one line."""
    lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("hint:")]
    return " / ".join(lines[-limit:]) if lines else f"git exited with status {result.returncode}"


_HTTP_STATUS = re.compile(r"returned error: (\d{3})")
# A ref the receiving side could not lock: another git process holds it (or crashed holding it).
_REF_LOCKED = re.compile(r"cannot lock ref|failed to lock|Unable to create '[^'\n]*\.lock': File exists")
_LOCK_FILE = re.compile(r"Unable to create '(?P<path>[^'\n]*\.lock)': File exists")
_PERMANENT = re.compile(
    r"permission denied|authentication failed|could not read (username|password)|terminal prompts disabled"
    r"|repository not found|does not appear to be a git repository|host key verification failed"
    r"|access denied|not found|invalid username or password|unsupported protocol|transport '.*' not allowed",
    re.IGNORECASE,
)
_WHAT_TO_DO = {
    "non-fast-forward": "the repository has a different {branch} that is not an ancestor of this run's branch. "
    "Compare the two; then delete or rename theirs and retry, or retry with force to overwrite it.",
    "checked out": "{branch} is checked out in {remote}: check out another branch there, then retry.",
    "refused": "the repository refused the push (its hooks or rules): fix that there, then retry "
    "(or push the branch by hand from the workspace).",
    "ownership": "trust that repository (git config --global --add safe.directory, as the reason says) or give it "
    "to the user agentic-dispatch runs as; then retry.",
    "access": "set up git credentials for {remote} on this machine (a credential helper or the SSH agent) so that "
    "`git push` works without a prompt, and check the repository exists and you may push to it; then retry.",
}


def _ref_locked(result: GitResult, branch: str, remote: str) -> Outcome | None:
    """A push refused because the branch's ref is locked there: transient, naming the lock file.

    Git is updating the ref in that repository (a commit, a fetch, an editor waiting on a commit
    message), so the delivery waits and tries again; a lock left by a crashed git stays until a
    person removes it, which the reason says how to do.
    """
    if not _REF_LOCKED.search(result.stderr):
        return None
    lock = _LOCK_FILE.search(result.stderr)
    if lock is None:
        return Outcome.transient(f"push to {remote}: {branch} is locked there ({git_error(result)}); retrying later")
    path = os.path.normpath(lock["path"])  # git writes '<repo>/.git/./refs/...'
    return Outcome.transient(
        f"push to {remote}: {branch} is locked there, {path} exists (another git process is updating it); "
        "retrying later. If no git runs there and it stays, a crashed git left it: remove that file"
    )


def _rejected(summary: str, reason: str, branch: str, remote: str) -> Outcome:
    if "remote failure" in summary:  # the other side failed to say how it went: try again
        return Outcome.transient(reason)
    if any(k in summary for k in ("non-fast-forward", "fetch first", "stale info", "already exists")):
        key = "non-fast-forward"
        reason = f"rejected as non-fast-forward: {branch} in {remote} has commits this run's branch lacks ({reason})"
    elif "checked out" in summary or "checked out" in reason:
        key = "checked out"
    else:
        key = "refused"
    return Outcome.permanent(reason, _WHAT_TO_DO[key].format(branch=branch, remote=remote))


def classify_push(result: GitResult, ref: str, branch: str, remote: str) -> tuple[str, Outcome | None]:
    """Read ``git push --porcelain``: ``(summary, None)`` when ``ref`` was updated (or already
    there), else ``("", outcome)``: transient (network, timeout, HTTP 408/429/5xx, the ref locked by
    another git there) or permanent (rejected: non-fast-forward, checked out, hook or server refusal;
    no access; a repository git refuses as another user's).
    """
    if result.returncode is None:
        return "", Outcome.transient(f"git push to {remote} timed out")
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[1].endswith(":" + ref) or not parts[0]:
            continue
        flag, summary = parts[0][0], parts[2]
        if flag in " +*=":  # updated, forced, created, or there already
            return summary, None
        locked = _ref_locked(result, branch, remote)
        if locked is not None:
            return "", locked
        return "", _rejected(summary, f"push to {remote} rejected: {summary}; {git_error(result)}", branch, remote)
    ownership = dubious_ownership(result.stderr)
    if ownership is not None:
        return "", Outcome.permanent(f"push to {remote} refused: {ownership}", _WHAT_TO_DO["ownership"])
    locked = _ref_locked(result, branch, remote)
    if locked is not None:
        return "", locked
    reason = f"push to {remote} failed: {git_error(result)}"
    status = _HTTP_STATUS.search(result.stderr)
    if status is not None:
        code = int(status.group(1))
        if code in (408, 429) or code >= 500:
            return "", Outcome.transient(reason)
        return "", Outcome.permanent(reason, _WHAT_TO_DO["access"].format(remote=remote))
    if _PERMANENT.search(result.stderr):
        return "", Outcome.permanent(reason, _WHAT_TO_DO["access"].format(remote=remote))
    return "", Outcome.transient(reason)  # network trouble, or something new: retried with backoff
