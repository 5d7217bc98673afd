"""What one delivery attempt came to, and small helpers the deliverers share."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Literal
from urllib.parse import urlsplit

from ..models import Delivery

__all__ = ["MAX_RETRY_AFTER_SECONDS", "Outcome", "redact_url", "retry_after_seconds"]

# A Retry-After further away than this is cut to it: an entry must not sleep for a year.
MAX_RETRY_AFTER_SECONDS = 86_400.0


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery attempt, as the outbox acts on it.

    * ``delivered``: done (``detail`` says what went where; ``delivery`` for a branch);
      the ledger records it and the entry is removed.
    * ``transient``: try again later (``retry_after``: the other side asked for that delay).
    * ``permanent``: a person must act (``what_to_do``); never retried blindly.
    """

    kind: Literal["delivered", "transient", "permanent"]
    reason: str = ""
    what_to_do: str | None = None
    retry_after: float | None = None
    delivery: Delivery | None = None
    detail: str | None = None

    @classmethod
    def delivered(cls, detail: str, delivery: Delivery | None = None) -> Outcome:
        return cls("delivered", detail=detail, delivery=delivery)

    @classmethod
    def transient(cls, reason: str, retry_after: float | None = None) -> Outcome:
        return cls("transient", reason=reason, retry_after=retry_after)

    @classmethod
    def permanent(cls, reason: str, what_to_do: str) -> Outcome:
        return cls("permanent", reason=reason, what_to_do=what_to_do)


def redact_url(url: str) -> str:
    """``url`` without a password in it (``https://user:secret@host/x`` → ``https://user:***@host/x``)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@") if password else url


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The delay an HTTP ``Retry-After`` header asks for (delta seconds or an HTTP date), at most a day.

    ``None`` when the header is missing or unreadable; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, origin unknown
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), MAX_RETRY_AFTER_SECONDS)
