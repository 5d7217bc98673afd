"""Delivering a finished run's dispatch record to the sync endpoint (``[sync] endpoint``).

One POST per run to ``<endpoint>/v1/agent/sync``: ``{agent_id, dispatches: [ {...} ]}`` with
``Authorization: Bearer <token>`` (the token is read from the variable ``sync.token_env`` names,
at each attempt; no header when it is unset) and ``Idempotency-Key: <workspace>:<run>``, so an
endpoint that got a record whose answer was lost can tell the retry apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx2

from ..config import SyncSettings
from ..models import Delivery, WorkspaceRecord
from .entry import OutboxEntry
from .outcome import Outcome, redact_url, retry_after_seconds

__all__ = ["RecordPoster", "record_payload"]

SYNC_PATH = "/v1/agent/sync"
_BODY_LIMIT = 300


def record_payload(record: WorkspaceRecord, agent_id: str) -> dict[str, Any]:
    """The record the endpoint gets for ``record``'s last run (kept in the outbox entry as it is now)."""
    dispatch = {
        "workspace": record.name,
        "repo": redact_url(record.repo),
        "branch": record.branch,
        "agent": record.agent,
        "status": str(record.status),
        "exit_code": record.exit_code,
        "runs": record.runs,
        "summary": record.summary.model_dump(mode="json") if record.summary else None,
        "delivery": None,  # where the branch went: filled in from the ledger when it is posted
        "started_at": record.started_at,
        "finished_at": record.finished_at,
    }
    return {"agent_id": agent_id, "dispatches": [dispatch]}


def _what_to_do(status: int, url: str, token_env: str) -> str:
    if status in (401, 403):
        return f"check the token in ${token_env} (and that it may post to {url}), then retry"
    if status in (404, 405):
        return f"check sync.endpoint: {url} does not take records"
    if 300 <= status < 400:
        return f"sync.endpoint redirects ({url}): set it to the final address, then retry"
    return "the endpoint refused this record (see its answer); fix the endpoint or the record, then retry"


class RecordPoster:
    """Posts outbox entries of kind ``record`` to the configured endpoint."""

    def __init__(self, settings: SyncSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ

    @property
    def url(self) -> str | None:
        endpoint = self.settings.endpoint
        return None if endpoint is None else endpoint.rstrip("/") + SYNC_PATH

    def deliver(self, entry: OutboxEntry, delivery: Delivery | None = None) -> Outcome:
        """POST ``entry.payload``; ``delivery`` (where the run's branch went, if known now) replaces
        the one the payload had at enqueue time.

        2xx: delivered. 408, 429, 5xx, connection errors, timeouts: transient (``Retry-After``
        honoured). Any other status: permanent.
        """
        url = self.url
        if url is None:
            return Outcome.permanent("no sync endpoint is configured", "set [sync] endpoint, then retry")
        if not entry.payload:
            return Outcome.permanent("the entry holds no record", "enqueue the record again")
        payload = entry.payload
        if delivery is not None:
            dispatches = [{**d, "delivery": delivery.model_dump(mode="json")} for d in payload.get("dispatches", [])]
            payload = {**payload, "dispatches": dispatches}
        headers = {"Idempotency-Key": f"{entry.workspace}:{entry.run}", "User-Agent": "agentic-dispatch"}
        token = self.environ.get(self.settings.token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with httpx2.Client(timeout=self.settings.http_timeout_seconds, follow_redirects=False) as client:
                response = client.post(url, json=payload, headers=headers)
        except httpx2.UnsupportedProtocol as e:
            return Outcome.permanent(f"cannot post to {url}: {e}", "set sync.endpoint to an http(s) URL")
        except (httpx2.TransportError, httpx2.TimeoutException) as e:
            return Outcome.transient(f"cannot reach {url}: {type(e).__name__}: {e}")
        except httpx2.InvalidURL as e:
            return Outcome.permanent(f"cannot post to {url}: {e}", "fix sync.endpoint")
        return self._outcome(response, url)

    def _outcome(self, response: httpx2.Response, url: str) -> Outcome:
        status = response.status_code
        if 200 <= status < 300:
            return Outcome.delivered(f"record accepted by {url} (HTTP {status})")
        body = " ".join(response.text.split())[:_BODY_LIMIT]
        reason = f"{url} answered HTTP {status}" + (f": {body}" if body else "")
        if status in (408, 429) or status >= 500:
            return Outcome.transient(reason, retry_after_seconds(response.headers.get("Retry-After")))
        return Outcome.permanent(reason, _what_to_do(status, url, self.settings.token_env))
