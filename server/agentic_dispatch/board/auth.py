"""Who may see the board and act on it: the MCP endpoint's bearer token and Host/Origin rules, for a browser.

A browser cannot send ``Authorization: Bearer`` on a link it follows, so it signs in once: the token in a
form (``POST /signin``) or in the first URL (``/?token=...``, as Jupyter prints it). It then holds a cookie
(``HttpOnly``: no script reads it; ``SameSite=Strict``: no other site's page sends it) whose value is derived
from the token (an HMAC), so the token itself never sits in the browser's cookie jar and a new token signs
every browser out. Every request must name a Host the endpoint answers to (421 otherwise, as the SDK
answers on ``/mcp``); an ``Origin`` header, when sent, must be one of the endpoint's (403); an action
(``POST``) must carry one (a browser always does), so no other site's page can make a signed-in browser act.
Without a token (loopback, none configured) nobody signs in and the Host/Origin rules still hold.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..http_auth import HttpPlan

__all__ = ["Gate"]

_SESSION = b"agentic-dispatch board session v1"
COOKIE_MAX_AGE = 30 * 24 * 3600  # a month; a new token ends every session at once


@dataclass(frozen=True)
class Gate:
    """The board's checks, from the plan the MCP endpoint is served with."""

    plan: HttpPlan

    @property
    def open(self) -> bool:
        """No token: loopback with none configured; anyone who reaches the address may use the board."""
        return self.plan.token is None

    @property
    def cookie_name(self) -> str:
        # Browsers share cookies between ports of one host: two servers on 127.0.0.1 keep theirs apart.
        return f"agentic_board_{self.plan.port}"

    def _session_value(self) -> str:
        assert self.plan.token is not None
        return hmac.new(self.plan.token.encode(), _SESSION, hashlib.sha256).hexdigest()

    def refuse_foreign(self, request: Request, *, action: bool) -> Response | None:
        """421 for a Host the endpoint does not answer to, 403 for a foreign Origin (or none, on an action)."""
        if request.headers.get("host", "") not in self.plan.allowed_hosts:
            return PlainTextResponse("Invalid Host header", status_code=421)
        origin = request.headers.get("origin")
        if origin is None and action:
            return PlainTextResponse("An action needs an Origin header (the board's own page sends it)", 403)
        if origin is not None and origin not in self.plan.allowed_origins:
            return PlainTextResponse("Invalid Origin header", status_code=403)
        return None

    def token_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the token (constant time)."""
        if self.plan.token is None:
            return True
        return hmac.compare_digest(candidate.encode(errors="replace"), self.plan.token.encode())

    def signed_in(self, request: Request) -> bool:
        """The board's cookie, or the bearer token an MCP client sends (scripts, curl)."""
        if self.plan.token is None:
            return True
        cookie = request.cookies.get(self.cookie_name, "")
        if cookie and hmac.compare_digest(cookie.encode(errors="replace"), self._session_value().encode()):
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def sign_in(self, response: Response, request: Request) -> Response:
        """``response`` with the session cookie set."""
        if self.plan.token is not None:
            response.set_cookie(
                self.cookie_name,
                self._session_value(),
                max_age=COOKIE_MAX_AGE,
                path="/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    def sign_out(self, response: Response) -> Response:
        response.delete_cookie(self.cookie_name, path="/", httponly=True, samesite="strict")
        return response
