"""Repository references: what a caller's ``repo`` argument names, where to fetch it from, and
how its workspaces are named. Bad or unsafe references are refused before anything is fetched."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import InvalidInputError
from .naming import check_component

__all__ = ["RepoRef", "resolve_repo", "safe_component"]


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


def resolve_repo(repo: str, org: str | None, url_template: str, state_root: Path | None = None) -> RepoRef:
    """Work out where ``repo`` lives. Accepts an absolute local path to a git repository,
    an ``https://``, ``ssh://``, ``git://``, ``file://`` or ``user@host:path`` URL, or
    ``org/repo`` (or ``repo`` with ``org``) expanded through ``url_template``.

    Raises:
        InvalidInputError: the value is empty, an option (``-x``), a relative path, a path that
            cannot be read as one (NUL, ``~unknown-user``), a local path that is not a git
            repository (missing, a file, a plain folder), a local repository inside ``state_root``
            (a workspace clone an agent controls, a mirror), or a transport git refuses to use
            safely (``ext::``).
    """
    value = repo.strip()
    if not value:
        raise InvalidInputError("repo", "is empty. Pass a local path, a git URL, or org/repo.")
    if any(ord(c) < 32 or ord(c) == 0x7F for c in value):
        raise InvalidInputError("repo", f"{value!r} holds control characters; pass a path, a git URL or org/repo.")
    if value.startswith("-"):
        raise InvalidInputError("repo", f"{value!r} starts with '-', which git would read as an option.")
    if "::" in value.split("/", 1)[0]:
        raise InvalidInputError("repo", f"{value!r} uses a git remote helper transport, which is refused for safety.")
    if org is not None:
        org = check_component("org", org)

    if m := _URL.match(value):
        if m["scheme"] == "file":
            _local_repo(m["rest"] if m["rest"].startswith("/") else "/" + m["rest"], value, state_root)
        o, n = _org_and_name(m["rest"].split("/", 1)[-1] if m["scheme"] != "file" else m["rest"])
        return RepoRef(value, "url", value, org or o, n)
    if m := _SCP_LIKE.match(value):
        o, n = _org_and_name(m["path"])
        return RepoRef(value, "url", value, org or o, n)
    if value.startswith(("/", "~")):
        path = _local_repo(value, value, state_root)
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


def _local_repo(text: str, given: str, state_root: Path | None) -> Path:
    """``text`` resolved: an absolute path to a git repository outside ``state_root``.

    Raises:
        InvalidInputError: not a path (``~unknown-user``, a loop of links), inside ``state_root``, or
            not a git repository (bad input like the others: the caller named the wrong thing).
    """
    import git

    try:
        path = Path(text).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        raise InvalidInputError(
            "repo", f"{given!r} cannot be read as a path ({e}). Pass the absolute path of a local git repository."
        ) from e
    if state_root is not None and path.is_relative_to(state_root.resolve()):
        raise InvalidInputError(
            "repo",
            f"{given!r} is inside the agentic-dispatch state root {state_root}: a workspace clone (its git config "
            "is the agent's) or a mirror is not a repository to dispatch from. Pass the path of your own repository.",
        )
    try:
        git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
        raise InvalidInputError(
            "repo",
            f"{given!r}: {path} is not a git repository (or does not exist). "
            "Pass the path of a folder that holds a git repository.",
        ) from e
    return path
