"""Repository resolution, the mirror cache, and workspace preparation (GitPython).

A repository is fetched from its remote into one bare mirror per remote
(``<root>/mirrors``); each workspace is a local clone of that mirror (git hardlinks
the objects, so it is cheap and needs nothing outside the workspace at run time),
with ``origin`` pointing at the real remote and a fresh ``agent/<slug>`` branch.
Mirror operations hold a per-mirror file lock, so concurrent dispatches on one
repository fetch one at a time and a fresh mirror is not fetched again
(``mirror_max_age_seconds``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import git

from . import safefs
from .errors import InvalidInputError, RepoError
from .naming import check_component, check_git_ref, slugify

__all__ = [
    "MirrorCache",
    "RepoRef",
    "clone_workspace",
    "exclude_paths",
    "file_lock",
    "resolve_repo",
    "safe_component",
]

# Network operations must never wait on a password prompt nobody can answer.
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
    "GIT_ASKPASS": "true",
}
FETCH_TIMEOUT_SECONDS = 900

_SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^:\s][^\s]*)$")
_URL = re.compile(r"^(?P<scheme>https|http|ssh|git|file)://(?P<rest>\S+)$")


@dataclass(frozen=True)
class RepoRef:
    """A resolved repository: where to fetch it from and how to name its workspaces."""

    given: str
    kind: Literal["local", "url"]
    fetch_url: str
    org: str
    name: str

    @property
    def mirror_key(self) -> str:
        return hashlib.sha256(self.fetch_url.encode()).hexdigest()[:16] + "-" + self.name


def safe_component(text: str, fallback: str) -> str:
    """Turn a name taken from a URL or path into a safe path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:100]
    return cleaned or fallback


def _org_and_name(path: str) -> tuple[str, str]:
    parts = [p for p in re.split(r"[/:]", path) if p]
    name = parts[-1] if parts else "repo"
    name = name.removesuffix(".git")
    org = parts[-2] if len(parts) >= 2 else "local"
    return safe_component(org, "local"), safe_component(name, "repo")


def resolve_repo(repo: str, org: str | None, url_template: str) -> RepoRef:
    """Work out where ``repo`` lives. Accepts an absolute local path to a git repository,
    an ``https://``, ``ssh://``, ``git://``, ``file://`` or ``user@host:path`` URL, or
    ``org/repo`` (or ``repo`` with ``org``) expanded through ``url_template``.

    Raises:
        InvalidInputError: the value is empty, an option (``-x``), a relative path, or a
            transport git refuses to use safely (``ext::``).
        RepoError: a local path that is not a git repository.
    """
    value = repo.strip()
    if not value:
        raise InvalidInputError("repo", "is empty. Pass a local path, a git URL, or org/repo.")
    if value.startswith("-"):
        raise InvalidInputError("repo", f"{value!r} starts with '-', which git would read as an option.")
    if "::" in value.split("/", 1)[0]:
        raise InvalidInputError("repo", f"{value!r} uses a git remote helper transport, which is refused for safety.")
    if org is not None:
        org = check_component("org", org)

    if m := _URL.match(value):
        if m["scheme"] == "file":
            local = Path(m["rest"] if m["rest"].startswith("/") else "/" + m["rest"])
            _require_git_repo(local, value)
        o, n = _org_and_name(m["rest"].split("/", 1)[-1] if m["scheme"] != "file" else m["rest"])
        return RepoRef(value, "url", value, org or o, n)
    if m := _SCP_LIKE.match(value):
        o, n = _org_and_name(m["path"])
        return RepoRef(value, "url", value, org or o, n)
    if value.startswith(("/", "~")):
        path = Path(value).expanduser().resolve()
        _require_git_repo(path, value)
        _, n = _org_and_name(str(path))
        return RepoRef(value, "local", str(path), org or "local", n)
    if value.startswith(".") or "\\" in value:
        raise InvalidInputError(
            "repo",
            f"{value!r} is a relative path. Pass an absolute path to a local repository, a git URL, or org/repo.",
        )
    parts = value.split("/")
    if len(parts) == 2 or (len(parts) == 1 and org):
        o = check_component("repo", parts[0]) if len(parts) == 2 else str(org)
        n = check_component("repo", parts[-1].removesuffix(".git"))
        try:
            url = url_template.format(org=o, repo=n)
        except (KeyError, IndexError) as e:
            raise InvalidInputError(
                "repo_url_template", f"must use only {{org}} and {{repo}}; got {url_template!r}"
            ) from e
        return RepoRef(value, "url", url, org or o, n)
    raise InvalidInputError(
        "repo",
        f"{value!r} is not a repository reference. Pass an absolute path to a local git repository, "
        "a URL (https://, ssh://, git@host:path, file://), or org/repo.",
    )


def _require_git_repo(path: Path, given: str) -> None:
    try:
        git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
        raise RepoError(
            f"repo {given!r}: {path} is not a git repository (or does not exist). "
            "Pass the path of a folder that holds a git repository."
        ) from e


def _git_error_text(e: git.GitCommandError) -> str:
    stderr = (e.stderr or "").strip().replace("stderr: ", "").strip("' \n")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else str(e)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class MirrorCache:
    """One bare mirror per remote; fetched on reuse unless fetched very recently."""

    def __init__(self, root: Path, max_age_seconds: float) -> None:
        self.root = root
        self.max_age = max_age_seconds
        self.fetches = 0  # remote transfers made by this process (clone or fetch), for observability

    def path(self, ref: RepoRef) -> Path:
        return self.root / f"{ref.mirror_key}.git"

    def ensure(self, ref: RepoRef, need_branch: str | None = None) -> Path:
        """Return an up-to-date mirror of ``ref``, creating or fetching it.

        Raises:
            RepoError: the remote cannot be cloned or fetched (the message carries git's reason).
        """
        mirror = self.path(ref)
        stamp = mirror / "agentic-fetched-at"
        with file_lock(self.root / f"{ref.mirror_key}.lock"):
            if not mirror.exists():
                self._create(ref, mirror)
            else:
                fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < self.max_age
                lacking = need_branch is not None and not self._has_branch(mirror, need_branch)
                if ref.kind == "local" or not fresh or lacking:
                    self._fetch(ref, mirror)
            stamp.touch()
        return mirror

    @staticmethod
    def _has_branch(mirror: Path, branch: str) -> bool:
        return (mirror / "refs" / "heads" / branch).exists() or f"refs/heads/{branch}" in _packed_refs(mirror)

    def _create(self, ref: RepoRef, mirror: Path) -> None:
        tmp = mirror.with_name(mirror.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.fetches += 1
            # A mirror of a local repository gets its own copies of the objects: hardlinked files
            # would be shared with the user's repository all the way into each agent's workspace,
            # where the agent (running as the host user) could rewrite them.
            git.Repo.clone_from(
                ref.fetch_url,
                tmp,
                mirror=True,
                no_hardlinks=ref.kind == "local",
                env=GIT_ENV,
                kill_after_timeout=FETCH_TIMEOUT_SECONDS,
            )
        except git.GitCommandError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RepoError(
                f"cannot clone {ref.fetch_url}: {_git_error_text(e)}. "
                "Check that the repository exists and that this machine can reach it "
                "(credentials for private repositories come from your git configuration)."
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(mirror)

    def _fetch(self, ref: RepoRef, mirror: Path) -> None:
        try:
            self.fetches += 1
            git.Repo(mirror).git.fetch("--prune", "--", "origin", env=GIT_ENV, kill_after_timeout=FETCH_TIMEOUT_SECONDS)
        except git.GitCommandError as e:
            raise RepoError(
                f"cannot fetch {ref.fetch_url}: {_git_error_text(e)}. "
                "Check that the repository still exists and that this machine can reach it."
            ) from e


def _packed_refs(mirror: Path) -> str:
    try:
        return (mirror / "packed-refs").read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def branch_exists(mirror: Path, branch: str) -> bool:
    return MirrorCache._has_branch(mirror, branch)


def list_branches(mirror: Path, limit: int = 20) -> list[str]:
    repo = git.Repo(mirror)
    return [h.name for h in repo.heads][:limit]


def clone_workspace(
    mirror: Path,
    dest: Path,
    origin_url: str,
    start_branch: str | None,
    task_slug: str,
) -> tuple[str, str]:
    """Clone ``mirror`` into ``dest`` and check out a new ``agent/<slug>`` branch.

    Returns:
        ``(branch, base_branch)``: the agent branch and the branch it starts from.

    Raises:
        InvalidInputError: ``start_branch`` does not exist in the repository.
        RepoError: the clone failed, or the repository has no commits.
    """
    if start_branch is not None:
        check_git_ref("branch", start_branch)
        if not branch_exists(mirror, start_branch):
            known = ", ".join(list_branches(mirror)) or "(none)"
            raise InvalidInputError(
                "branch", f"{start_branch!r} does not exist in the repository. Existing branches: {known}."
            )
    try:
        repo = git.Repo.clone_from(str(mirror), dest, no_checkout=True, env=GIT_ENV)
    except git.GitCommandError as e:
        raise RepoError(f"cannot clone the mirror {mirror}: {_git_error_text(e)}") from e
    with repo:
        repo.remote("origin").set_url(origin_url)
        if start_branch is None:
            try:
                start_branch = repo.active_branch.name
            except TypeError:  # detached HEAD in the source
                start_branch = "HEAD"
        try:
            start_commit = repo.commit(f"refs/remotes/origin/{start_branch}" if start_branch != "HEAD" else "HEAD")
        except (git.BadName, ValueError) as e:
            raise RepoError(
                f"the repository has no commits on {start_branch!r}; an agent needs a commit to branch from. "
                "Make an initial commit and dispatch again."
            ) from e
        branch = f"agent/{task_slug}"
        existing = {r.remote_head for r in repo.remote("origin").refs}
        n = 2
        while branch in existing:
            branch = f"agent/{task_slug}-{n}"
            n += 1
        repo.git.checkout("-b", branch, start_commit.hexsha, "--")
        # The container has no global git config: put an identity in the clone itself (the host
        # user's when they have one, so commits look like theirs; otherwise a clear agent identity).
        name, email = _identity(repo)
        with repo.config_writer() as cw:
            cw.set_value("user", "name", name)
            cw.set_value("user", "email", email)
    return branch, start_branch


def _identity(repo: git.Repo) -> tuple[str, str]:
    def get(key: str, default: str) -> str:
        try:
            return str(repo.git.config("--get", key)) or default
        except git.GitCommandError:
            return default

    return get("user.name", "agentic-dispatch agent"), get("user.email", "agent@agentic-dispatch.invalid")


def exclude_paths(repo_dir: Path, names: list[str]) -> None:
    """Keep server-managed files (BLOCKED.md, ANSWER.md, our instruction files) out of commits.

    Raises:
        UnsafePathError: the agent left a link at ``.git/info/exclude`` or a folder above it.
    """
    exclude = repo_dir / ".git" / "info" / "exclude"
    current = safefs.read_text(repo_dir, exclude, 1 << 20) or ""
    missing = [f"/{n}" for n in names if f"/{n}" not in current.splitlines()]
    if missing:
        safefs.append_text(repo_dir, exclude, "\n# managed by agentic-dispatch\n" + "\n".join(missing) + "\n")


_HOST_GIT_OVERRIDES = (
    "core.fsmonitor=false",
    "core.hooksPath=/dev/null",
    "log.showSignature=false",
    "gpg.program=false",
    "core.pager=cat",
)


def _host_git(repo: git.Repo) -> git.Git:
    """``repo.git`` for a command the server runs on the host in a repository an agent has written to.

    The agent controls ``.git/config``; these overrides keep settings that run programs
    (an fsmonitor hook, a signature checker) from running them on the host.
    """
    return repo.git(c=list(_HOST_GIT_OVERRIDES))


def recent_log(repo_dir: Path, n: int = 10) -> str:
    with git.Repo(repo_dir) as repo:
        try:
            return str(_host_git(repo).log(f"-n{n}", "--no-show-signature", "--format=%h %s (%an, %ar)"))
        except git.GitCommandError:
            return ""


def commits_ahead(repo_dir: Path, base: str) -> int:
    """How many commits HEAD has that ``origin/<base>`` lacks."""
    with git.Repo(repo_dir) as repo:
        try:
            return int(_host_git(repo).rev_list("--count", f"refs/remotes/origin/{base}..HEAD"))
        except git.GitCommandError:
            return 0


def task_slug(task: str) -> str:
    return slugify(task)
