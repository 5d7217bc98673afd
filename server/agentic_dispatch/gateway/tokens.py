"""Run tokens: the one credential a network-transfer run holds.

Each run gets a fresh random token (256 bits) when its container is started. Only its SHA-256 is
kept, in the workspace's own ``.meta/gateway-token.json`` (mode 0600, a folder no agent container
mounts), so a restarted server still recognises the runs in flight and nothing on disk opens
anything. A token names one workspace and one run: the gateway accepts it only for that
workspace, and only while that run is the workspace's current, running one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from ..fileio import write_atomic
from ..store import WorkspacePaths

__all__ = ["TOKEN_FILE", "issue_token", "token_run"]

TOKEN_FILE = "gateway-token.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(ws: WorkspacePaths, run: int) -> str:
    """A new token for run ``run`` of ``ws`` (the previous run's stops working).

    Raises:
        OSError: it cannot be recorded (then no container may be started with it).
    """
    token = secrets.token_urlsafe(32)
    ws.meta.mkdir(parents=True, exist_ok=True)
    write_atomic(ws.meta / TOKEN_FILE, json.dumps({"run": run, "sha256": _digest(token)}), mode=0o600)
    return token


def token_run(ws: WorkspacePaths, token: str) -> int | None:
    """The run ``token`` was issued for in ``ws``, or ``None`` when it is not this workspace's."""
    try:
        data = json.loads((ws.meta / TOKEN_FILE).read_text(encoding="utf-8"))
        expected, run = str(data["sha256"]), int(data["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run if hmac.compare_digest(_digest(token), expected) else None
