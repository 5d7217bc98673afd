"""Who may call ``serve --transport http``, and which Host names it answers to.

The bearer token is the value of the variable ``[http] token_env`` names (``AGENTIC_DISPATCH_HTTP_TOKEN``),
else ``[http] token``, else, with ``--allow-remote`` only, one generated once and kept in
``state/http-token`` (mode 0600). On a loopback address with none configured there is no token.
The Host names are the bind address's (with the loopback names when it is loopback or every address)
plus ``--allowed-host`` and ``[http] allowed_hosts``; the MCP SDK refuses a request naming another Host
or Origin. This module does not import the SDK: ``mcp_server`` turns an :class:`HttpPlan` into it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .errors import ConfigError, InvalidInputError

__all__ = ["TOKEN_FILE", "HttpPlan", "HttpSettings", "check_allowed_host", "check_token", "is_loopback", "plan_http"]

log = logging.getLogger(__name__)

TOKEN_FILE = "http-token"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 512
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an Authorization header carries unchanged
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # underscores: container and compose names
_MAKE_ONE = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def check_token(value: str) -> str:
    """``value``, if it can serve as the bearer token (the message never repeats it).

    Raises:
        ValueError: shorter than 16 characters, or holding a space or a character outside visible ASCII.
    """
    if len(value) < MIN_TOKEN_LENGTH:
        raise ValueError(f"is {len(value)} characters; a token needs at least {MIN_TOKEN_LENGTH} ({_MAKE_ONE})")
    if len(value) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(value):
        raise ValueError(f"must be at most {MAX_TOKEN_LENGTH} visible ASCII characters, no spaces ({_MAKE_ONE})")
    return value


def check_allowed_host(value: str) -> str:
    """``value`` as a Host header carries it: NAME, NAME:PORT, an IP address or [IPv6]:PORT, lower case.

    Raises:
        ValueError: a URL, a path, a wildcard, a malformed name, a port outside 1..65535.
    """
    text = value.strip().lower()
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(text).version == 6:
            return f"[{text}]"
    problem = (
        f"{value!r} is not a host name or IP address with an optional :PORT "
        "(e.g. box.example.org, box.example.org:8765, 192.0.2.7, [2001:db8::7]:8765)"
    )
    match = _HOST.fullmatch(text)
    if match is None or (match.group(2) and not 0 < int(match.group(2)) < 65536):
        raise ValueError(problem)
    name = match.group(1)
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError as e:
            raise ValueError(problem) from e
    elif not all(_LABEL.fullmatch(label) for label in name.removesuffix(".").split(".")):
        raise ValueError(problem)
    return text


class HttpSettings(BaseModel):
    """The config file's ``[http]``: the bearer token and the Host names served besides the bind address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: Annotated[str, AfterValidator(check_token)] | None = Field(default=None, description="prefer token_env")
    token_env: str = Field(
        default="AGENTIC_DISPATCH_HTTP_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="wins over token"
    )
    allowed_hosts: list[Annotated[str, AfterValidator(check_allowed_host)]] = Field(
        default_factory=list, description="NAME or NAME:PORT, as clients write it in the server's URL"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_every_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _host_header(host: str, port: int) -> str:
    try:
        bracketed = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        bracketed = host.lower()
    return f"{bracketed}:{port}"


def answered_hosts(host: str, port: int, added: Sequence[str]) -> tuple[str, ...]:
    """The Host header values served: the bind address (every address means loopback only, until
    names are added), the loopback names on loopback, and each added value. An added name without a
    port stands for itself on ``port`` and on its scheme's default port (behind a proxy)."""
    hosts = [] if _is_every_address(host) else [_host_header(host, port)]
    if is_loopback(host) or _is_every_address(host):
        hosts += [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    for name in added:
        match = _HOST.fullmatch(name)
        hosts += [name] if match is not None and match.group(2) else [f"{name}:{port}", name]
    return tuple(dict.fromkeys(hosts))


@dataclass(frozen=True)
class HttpPlan:
    """What ``serve --transport http`` needs: where, the token (None: no authentication), the Host names."""

    host: str
    port: int
    token: str | None
    allowed_hosts: tuple[str, ...]

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(f"{scheme}://{host}" for host in self.allowed_hosts for scheme in ("http", "https"))

    @property
    def url(self) -> str:
        """The server's own base URL (the first name it answers to)."""
        return f"http://{self.allowed_hosts[0]}"


def plan_http(
    host: str,
    port: int,
    *,
    allow_remote: bool,
    added_hosts: Sequence[str],
    settings: HttpSettings,
    state_dir: Path,
    config_file: Path | None = None,
) -> HttpPlan:
    """Check the command line's HTTP options and find the token.

    Raises:
        InvalidInputError: a bad port, ``--allowed-host`` or token variable; a non-loopback host
            without ``--allow-remote``.
        ConfigError: the token file cannot be read or made, or is readable by others.
    """
    if not 0 < port < 65536:
        raise InvalidInputError("--port", f"must be between 1 and 65535, got {port}.")
    if not is_loopback(host) and not allow_remote:
        raise InvalidInputError(
            "--host",
            f"{host} is reachable from other machines. Add --allow-remote to serve there: every caller must then "
            "send the server's bearer token (authentication: `Authorization: Bearer <token>`; one is generated "
            "when none is configured). Or serve on 127.0.0.1 and reach it through an SSH tunnel.",
        )
    added = []
    for value in added_hosts:
        try:
            added.append(check_allowed_host(value))
        except ValueError as e:
            raise InvalidInputError("--allowed-host", str(e)) from e
    hosts = answered_hosts(host, port, [*added, *settings.allowed_hosts])
    token = _configured_token(settings, config_file)
    if token is None and allow_remote:
        token = _stored_token(state_dir / TOKEN_FILE, sign_in=f"http://{hosts[0]}/?token=")
    return HttpPlan(host, port, token, hosts)


def _configured_token(settings: HttpSettings, config_file: Path | None) -> str | None:
    raw = os.environ.get(settings.token_env, "").strip()
    if raw:
        try:
            return check_token(raw)
        except ValueError as e:
            raise InvalidInputError(settings.token_env, f"{e}; or unset it") from e
    if settings.token and config_file is not None:
        with contextlib.suppress(OSError):
            if config_file.stat().st_mode & 0o077:
                log.warning(
                    "%s holds [http] token and other users may read it: chmod 600 it, or set %s instead",
                    config_file,
                    settings.token_env,
                )
    return settings.token


def _stored_token(path: Path, sign_in: str) -> str:
    """The token kept in ``path``; made, and shown once on stderr (as the end of the board's sign-in
    link ``sign_in``), when there is none."""
    token = _read_token_file(path)
    if token is not None:
        return token
    token, made = _create_token_file(path)
    if made:
        print(
            f"agentic-dispatch: HTTP callers must send `Authorization: Bearer <token>`. A token was generated and "
            f"saved in {path} (only you can read it); it is shown this once, as the end of the board's sign-in "
            f"link:\n{sign_in}{token}",
            file=sys.stderr,
            flush=True,
        )
    return token


def _read_token_file(path: Path) -> str | None:
    fix = "delete it and start again to get a new token"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, [f"cannot read the HTTP token ({e.strerror}): {fix}"]) from e
    with os.fdopen(fd, encoding="ascii", errors="replace") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(path, [f"the HTTP token file must be yours and readable by you alone (0600): {fix}"])
        text = f.read(MAX_TOKEN_LENGTH + 2).strip()
    try:
        return check_token(text)
    except ValueError as e:
        raise ConfigError(path, [f"the HTTP token {e}: {fix}"]) from e


def _create_token_file(path: Path) -> tuple[str, bool]:
    """Write a new token to a private temporary file, then link it into place: the file is 0600
    from its first instant and whole when it appears. A token another server made first wins."""
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            other = _read_token_file(path)
            if other is not None:
                return other, False
            raise
    except OSError as e:
        problem = f"cannot create the HTTP token file ({e.strerror}); set a token ([http] token_env) instead"
        raise ConfigError(path, [problem]) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return token, True
