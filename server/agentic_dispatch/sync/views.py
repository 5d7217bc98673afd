"""Commands and links a person uses to look at a delivered branch."""

from __future__ import annotations

import re
import shlex
from urllib.parse import quote, urlsplit

from ..models import Delivery, WorkspaceRecord

__all__ = ["review_url", "view_commands"]

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^:\s]\S*)$")


def _host_and_path(origin: str) -> tuple[str, str] | None:
    """``(host, owner/name)`` of an https, ssh or ``git@host:owner/name`` origin; ``None`` otherwise."""
    if m := _SCP_LIKE.match(origin):
        host, path = m["host"], m["path"]
    else:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return None
        if parts.scheme not in ("https", "http", "ssh") or not parts.hostname:
            return None
        host, path = parts.hostname, parts.path
    path = path.strip("/").removesuffix(".git").strip("/")
    return (host.lower(), path) if path.count("/") >= 1 else None


def review_url(origin: str, base: str | None, branch: str) -> str | None:
    """The page that opens a pull request (GitHub) or merge request (GitLab) for ``branch``, or
    ``None`` when the origin is neither kind (or lives on this machine)."""
    found = _host_and_path(origin)
    if found is None:
        return None
    host, path = found
    b = quote(branch, safe="/")
    if "github" in host and path.count("/") == 1:
        return f"https://{host}/{path}/compare/{quote(base or 'HEAD', safe='/')}...{b}?expand=1"
    if "gitlab" in host:
        return f"https://{host}/{path}/-/merge_requests/new?merge_request[source_branch]={b}"
    return None


def view_commands(record: WorkspaceRecord, delivery: Delivery, local: bool) -> list[str]:
    """Commands (and a review link, when the origin has one) to look at what ``delivery`` put where.

    ``local``: the branch went into the repository at ``delivery.remote`` on this machine.
    """
    base = record.base_branch or "HEAD"
    branch = shlex.quote(delivery.branch)
    if local:
        return [f"git -C {shlex.quote(delivery.remote)} log --oneline {shlex.quote(base)}..{branch}"]
    commands = [
        f"git fetch {shlex.quote(delivery.remote)} {branch}",
        f"git log --oneline {shlex.quote(base)}..FETCH_HEAD",
    ]
    url = review_url(record.origin_url, record.base_branch, delivery.branch)
    return [*commands, url] if url else commands
