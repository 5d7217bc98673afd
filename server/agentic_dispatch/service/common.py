"""Small helpers the service parts share: times, the log tail, container-side URLs."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from .. import safefs
from ..errors import UnsafePathError
from ..store import WorkspacePaths

__all__ = ["container_url", "log_tail", "parse_time"]

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}  # noqa: S104 (names, not a bind)


def parse_time(ts: str | None) -> float | None:
    """An ISO timestamp from a record as epoch seconds (``None`` stays ``None``)."""
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def log_tail(ws: WorkspacePaths, base: str, lines: int) -> str:
    """The last ``lines`` lines of the agent's log (the logs folder is writable by the agent)."""
    try:
        data = safefs.tail_text(ws.logs, ws.log(base), 64 * 1024) or ""
    except UnsafePathError as e:
        return f"(the log cannot be shown: {e})"
    return "\n".join(data.splitlines()[-lines:])


def container_url(url: str) -> str:
    """``url`` as a container reaches it: loopback names mean the host, not the container."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _LOOPBACK_HOSTS:
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + "host.docker.internal" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
