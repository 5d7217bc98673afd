"""Settings: where state lives and what the optional TOML config file may say.

All state sits under one root (``AGENTIC_DISPATCH_HOME``, else the platform's user
data dir). The config file is optional: defaults make a fresh install work. It is
``AGENTIC_DISPATCH_CONFIG`` if set, else ``config.toml`` in the config dir (the
root itself when ``AGENTIC_DISPATCH_HOME`` is set, so a test or a second install
never reads the user's own file). A file named (``--config``, the variable) must be there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .http_auth import HttpSettings
from .models import MAX_RETRIES, FailureClass, Scope, ScopeMode

__all__ = [
    "APP_NAME",
    "IMAGE_ENV",
    "AgentSettings",
    "HostFile",
    "HttpSettings",
    "Limits",
    "Paths",
    "QaSettings",
    "Resources",
    "RetentionSettings",
    "RetrySettings",
    "RuntimeSettings",
    "Settings",
    "SyncSettings",
    "builtin_dir",
    "config_file_path",
    "load_settings",
]

APP_NAME = "agentic-dispatch"
HOME_ENV = "AGENTIC_DISPATCH_HOME"
CONFIG_ENV = "AGENTIC_DISPATCH_CONFIG"
IMAGE_ENV = "AGENTIC_DISPATCH_IMAGE"
SYNC_MAX_ATTEMPTS_ENV = "AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS"
SYNC_BACKOFF = (1.0, 5.0, 15.0, 60.0, 300.0)  # seconds before the 1st, 2nd, ... retry of a delivery

# Variables a parent agent session sets (Claude Code refuses to start inside one, and the
# others change behaviour). Agent containers start from an empty environment, and these
# may not be passed through even by name.
PARENT_SESSION_ENV = frozenset(
    {
        "CLAUDECODE",
        "CLAUDE_CODE_ENTRYPOINT",
        "CLAUDE_CODE_SSE_PORT",
        "CODEX_SANDBOX",
        "CODEX_SANDBOX_NETWORK_DISABLED",
        "CODEX_THREAD_ID",
        "GEMINI_CLI",
    }
)

# Variables the container needs as agentic-dispatch or the image sets them (or leaves unset).
# Passing the server's value by name would override that, so the config may not name them.
RESERVED_ENV = {
    "HOME": "the agent home must be /agentic/home, where its sessions and login files are",
    "PATH": "the image's PATH is where the agent CLIs are",
    "NODE_EXTRA_CA_CERTS": "the image points it at the CA bundle that holds the host's certificates",
    "IS_SANDBOX": "Claude Code needs it to allow the permission bypass",
    "GEMINI_CLI_NO_RELAUNCH": "without it Gemini CLI ignores the stop signal",
    "CODEX_HOME": "Codex must keep its sessions and auth.json in the agent home",
    "CLAUDE_CONFIG_DIR": "Claude Code must keep its sessions and login in the agent home",
    "GEMINI_CLI_HOME": "Gemini CLI must keep its sessions and settings in the agent home",
}
RESERVED_ENV_PREFIX = "AGENTIC_"  # AGENTIC_LOG, AGENTIC_WORKSPACE, AGENTIC_RUN, ... and the server's own settings

# Gemini CLI caps general.maxAttempts at 10 (attempts = retries + 1).
GEMINI_MAX_RETRIES = 9
# Codex refreshes its ChatGPT login in auth.json in place; two copies in two containers would
# each rotate the refresh token and log each other out.
CODEX_AUTH_FILE = ".codex/auth.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Model):
    """Concurrency caps. A dispatch that finds no free slot is queued."""

    total: Annotated[int, Field(ge=1, description="containers running at once, all agents together")] = 4
    # At least 1: a limit of 0 would never start that work, and nothing would say why it waits.
    pools: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per agent base, e.g. {codex = 2}"
    )
    models: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per base:model, e.g. {'claude:opus' = 1}"
    )
    daily: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="starts per pool per UTC day, e.g. {codex = 100}"
    )
    pacing_seconds: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="minimum delay between two starts in a pool"
    )
    daily_tokens: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="input + output tokens per pool or base:model per UTC day, as the runs that finished that "
        "day reported them; reached, new starts wait until 00:00 UTC, e.g. {codex = 2000000}",
    )
    daily_cost_usd: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="cost in USD per pool or base:model per UTC day, as the runs that finished that day "
        "reported it; reached, new starts wait until 00:00 UTC, e.g. {'claude:opus' = 50}",
    )
    fast_fail_count: Annotated[int, Field(ge=1)] = 3
    fast_fail_window_seconds: Annotated[float, Field(gt=0)] = 60.0
    fast_fail_pause_seconds: Annotated[float, Field(ge=0)] = 1800.0
    stall_seconds: Annotated[
        int,
        Field(
            ge=0,
            description="a running agent whose log and work tree have not changed for this long is shown as "
            "stalled; 0 turns the check off",
        ),
    ] = 600
    stall_action: Literal["warn", "stop"] = Field(
        default="warn", description="warn: show it and write one `stalled` event; stop: also stop it (it fails)"
    )


class Resources(_Model):
    """Resource limits applied to every agent container."""

    memory: str | None = Field(
        default="4g",
        pattern=r"^(\d+[bkmgBKMG]?)?$",
        description="Docker memory limit: bytes with an optional unit b, k, m or g (e.g. '4g'); empty for none",
    )
    cpus: float | None = Field(default=None, gt=0)
    pids: int | None = Field(default=1024, ge=16)
    network: str | None = Field(default=None, description="Docker network name; default bridge")
    workspace_max_bytes: int | None = Field(
        default=20 * 1024**3,
        ge=0,
        description="a running workspace that grows past this many bytes on disk (its clone, agent home "
        "and logs) is stopped and fails; checked on every timer tick; 0 turns the check off",
    )


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class HostFile(_Model):
    """A login or settings file from the host that an agent needs in its home."""

    source: Path = Field(description="file on the host; '~' is expanded")
    target: str = Field(description="where it goes, relative to the agent's home, e.g. '.codex/auth.json'")
    mode: Literal["copy", "mount"] = Field(
        default="copy",
        description="copy: a private copy per workspace (safe for concurrent runs); "
        "mount: the host file itself, read-write, and that agent's runs are serialised",
    )

    @field_validator("target")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts or value.startswith("~"):
            raise ValueError("must be a path relative to the agent's home, without '..' (e.g. '.claude/x.json')")
        return value

    @model_validator(mode="after")
    def _codex_auth_is_never_copied(self) -> HostFile:
        codex_auth = Path(self.target).as_posix() == CODEX_AUTH_FILE or (
            self.source.name == "auth.json" and self.source.parent.name == ".codex"
        )
        if codex_auth and self.mode == "copy":
            raise ValueError(
                "Codex's auth.json must not be copied (Codex refreshes it in place, so copies in concurrent "
                'containers log each other out): use mode = "mount", or set OPENAI_API_KEY instead'
            )
        return self


class AgentSettings(_Model):
    """Per-agent settings: credentials, provider and retries. Every key is optional."""

    env: list[Annotated[str, Field(pattern=ENV_NAME)]] | None = Field(
        default=None,
        description="names of environment variables passed from the server to the agent "
        "(the values are never written anywhere); default: the agent's own API key variables",
    )
    files: list[HostFile] | None = Field(
        default=None, description="host files put in the agent's home; default: the agent's login files, if present"
    )
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="custom provider base URL (a gateway such as LiteLLM, a local model server); "
        "localhost means the host",
    )
    model: str | None = Field(default=None, description="model used when the agent spec names none")
    max_retries: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="provider retries per request (gemini: at most 9); default: the CLI's own"
    )

    @field_validator("env")
    @classmethod
    def _passable(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name in PARENT_SESSION_ENV:
                raise ValueError(f"{name} belongs to the parent session and is never passed to an agent")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} cannot be passed to an agent: {RESERVED_ENV[name]}")
            if name.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(f"{name}: names starting with {RESERVED_ENV_PREFIX} are agentic-dispatch's own")
        return value


class SyncSettings(_Model):
    """Where results go home: the branch to its repository, the dispatch record to an endpoint.

    ``max_attempts``: tries before an entry is dead-lettered (``AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS``
    overrides it); ``backoff_seconds``: the waits before the 1st, 2nd, ... retry (the last repeats).
    """

    push: bool = True
    auto: bool = Field(default=False, description="enqueue delivery as each run ends (else on agentic_sync)")
    endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$", description="POST to <it>/v1/agent/sync")
    token_env: str = Field(default="AGENTIC_DISPATCH_SYNC_TOKEN", pattern=ENV_NAME, description="the bearer token")
    max_attempts: Annotated[int, Field(ge=1)] = 100
    agent_id: str = Field(default_factory=lambda: f"{APP_NAME}@{socket.gethostname() or 'localhost'}", min_length=1)
    backoff_seconds: tuple[Annotated[float, Field(ge=0)], ...] = Field(default=SYNC_BACKOFF, min_length=1)
    flush_interval_seconds: Annotated[float, Field(gt=0)] = 30.0  # longest wait of the flush loop between passes
    http_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    git_timeout_seconds: Annotated[float, Field(gt=0)] = 900.0


class QaSettings(_Model):
    """The QA gate: the repository's tests, run in a fresh container after an agent ends ``completed``."""

    enabled: bool = Field(default=False, description="the default; a dispatch's `qa` argument wins")
    command: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="shell command in the clone; default: detected (pytest, npm test, go test, ...)"
    )
    timeout_seconds: Annotated[int, Field(ge=1)] = 900
    image: str | None = Field(default=None, description="image with the test toolchain; default: the agent image")


class RetentionSettings(_Model):
    """Removing finished workspaces whose work went home (``agentic-dispatch clean``), and the disk floor."""

    older_than_days: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="the timer (hourly) removes what finished longer ago; unset: the timer removes none"
    )
    keep: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="the newest finished workspaces the timer always keeps; unset: no count"
    )
    min_free_gib: Annotated[float, Field(ge=0)] = Field(
        default=2.0, description="a dispatch is refused while the root has less free space; 0 turns it off"
    )


class Defaults(_Model):
    """What a dispatch gets when it does not say."""

    scope: Scope | None = Field(
        default=None,
        description="globs of the paths a run may change (as a dispatch's `scope`); unset: no scope",
    )
    scope_mode: ScopeMode = Field(default="warn", description="as a dispatch's `scope_mode`")


class GatewayTls(_Model):
    """The run gateway's certificate: containers reach it over TLS."""

    cert: Path = Field(description="PEM certificate (chain) the gateway presents")
    key: Path = Field(description="its PEM private key")
    ca: Path | None = Field(
        default=None,
        description="PEM CA the containers verify the gateway with (a private CA's, or a self-signed certificate "
        "itself); default: the image's CA certificates",
    )


def _listen_host(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT, e.g. '10.0.0.5:8790' (port 0: any free port)")
    return host.strip("[]"), int(port)


def _private(host: str) -> bool:
    """Loopback, RFC 1918 and link-local addresses: where plain HTTP may carry a run's files."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_loopback or address.is_link_local or (address.is_private and not address.is_unspecified)


class RuntimeSettings(_Model):
    """Where runs execute and how a run gets its workspace (README "Running agents on another machine")."""

    engine: Literal["docker", "swarm"] = Field(
        default="docker",
        description="docker: each run is a container on one engine; swarm: each run is a one-task service on "
        "the Docker Swarm whose manager docker_host (or DOCKER_HOST) names (network transfer is implied)",
    )
    placement: list[Annotated[str, Field(min_length=3, max_length=200, pattern=r"^\S.*(==|!=).*\S$")]] = Field(
        default_factory=list,
        description="swarm: placement constraints every run's service gets, as `docker service create --constraint` "
        "takes them (node.labels.agents == true)",
    )
    docker_host: str | None = Field(
        default=None,
        pattern=r"^(unix|tcp|ssh|npipe)://\S+$",
        description="the Docker engine, as DOCKER_HOST writes it (tcp://host:2376, ssh://user@host); "
        "default: DOCKER_HOST, else the local socket. TLS as Docker reads it: DOCKER_TLS_VERIFY, DOCKER_CERT_PATH",
    )
    transfer: Literal["mount", "network"] | None = Field(
        default=None,
        description="mount: the workspace is bind-mounted (the engine shares this machine's disk); network: the "
        "container fetches it from the run gateway and sends its results back; default: mount for a local "
        "engine, network for a remote one",
    )
    gateway_listen: str | None = Field(
        default=None, description="HOST:PORT the run gateway listens on (network transfer); port 0: any free port"
    )
    gateway_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="the gateway's URL as containers reach it; default: http(s)://<gateway_listen>",
    )
    gateway_tls: GatewayTls | None = None
    gateway_patience_seconds: Annotated[float, Field(ge=1)] = Field(
        default=60.0,
        description="network transfer: how long a run's container keeps trying the gateway (a server restarting, a "
        "network blip) before it gives up",
    )
    stop_grace_seconds: Annotated[float, Field(ge=1)] = Field(
        default=30.0,
        description="network transfer: how long a stopped run's container has to send its work back "
        "before it is killed",
    )

    @model_validator(mode="after")
    def _gateway(self) -> RuntimeSettings:
        if self.engine == "swarm" and self.transfer == "mount":
            raise ValueError(
                'engine = "swarm" runs jobs on any node of the swarm, which cannot mount this machine\'s disk: '
                'remove transfer = "mount" (network transfer is implied)'
            )
        if self.placement and self.engine != "swarm":
            raise ValueError('placement constrains the nodes of a swarm: set engine = "swarm", or remove placement')
        if self.gateway_listen is not None:
            host, _ = _listen_host(self.gateway_listen)
            if self.gateway_tls is None and not _private(host):
                raise ValueError(
                    f"gateway_listen {self.gateway_listen!r} is not a loopback or private address: a run's files "
                    "would cross the network in the clear. Set [runtime.gateway_tls] cert and key, or listen on a "
                    "private address"
                )
        if self.gateway_url is not None and self.gateway_tls is None and self.gateway_url.startswith("http:"):
            host = self.gateway_url.split("://", 1)[1].split("/", 1)[0].rpartition(":")[0].strip("[]") or ""
            if host and not _private(host) and not host.endswith(".internal"):
                raise ValueError(f"gateway_url {self.gateway_url!r} is plain HTTP to a public address: use https")
        return self


DEFAULT_RETRY_ON: tuple[FailureClass, ...] = ("provider", "lost")  # not the agent's own failings


class RetrySettings(_Model):
    """Retries by cause, for every dispatch that does not give its own ``retry``: a failed attempt of a
    listed class runs again (the next run of the workspace, continuing the agent's session) after a
    backoff that doubles from ``backoff_seconds`` up to ``max_backoff_seconds``, with up to a quarter
    added as jitter; a provider's Retry-After, when the CLI reports one, is waited for at least."""

    max: Annotated[int, Field(ge=0, le=MAX_RETRIES)] = Field(
        default=0, description="attempts after the first (0: none)"
    )
    on: list[FailureClass] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON), description="the failure classes retried"
    )
    backoff_seconds: Annotated[float, Field(ge=0)] = 30.0
    max_backoff_seconds: Annotated[float, Field(ge=0)] = 900.0


class Settings(_Model):
    """The contents of the config file, with defaults for every key."""

    root: Path | None = Field(default=None, description="state root; AGENTIC_DISPATCH_HOME wins over it")
    default_agent: str = "codex"
    default_template: str = "coding"
    image: str | None = Field(default=None, description="agent image; default: the image `image build` makes")
    timeout_seconds: Annotated[int, Field(ge=1)] = 3600
    repo_url_template: str = "https://github.com/{org}/{repo}.git"
    mirror_max_age_seconds: Annotated[float, Field(ge=0)] = 60.0
    drain_interval_seconds: Annotated[float, Field(gt=0)] = 15.0
    limits: Limits = Field(default_factory=Limits)
    resources: Resources = Field(default_factory=Resources)
    agents: dict[str, AgentSettings] = Field(default_factory=dict)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    qa: QaSettings = Field(default_factory=QaSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("repo_url_template")
    @classmethod
    def _url_template(cls, value: str) -> str:
        try:
            value.format(org="org", repo="repo")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"may use only {{org}} and {{repo}} ({e!r} is not one of them)") from e
        if "{repo}" not in value:
            raise ValueError("must contain {repo}, e.g. 'https://git.example/{org}/{repo}.git'")
        return value

    @field_validator("agents")
    @classmethod
    def _gemini_retries(cls, value: dict[str, AgentSettings]) -> dict[str, AgentSettings]:
        gemini = value.get("gemini")
        if gemini is not None and gemini.max_retries is not None and gemini.max_retries > GEMINI_MAX_RETRIES:
            raise ValueError(
                f"gemini.max_retries is at most {GEMINI_MAX_RETRIES} (Gemini CLI makes at most 10 attempts)"
            )
        return value


@dataclass(frozen=True)
class Paths:
    """Every place agentic-dispatch reads or writes, derived from one root."""

    root: Path
    config_dir: Path
    config_file: Path | None = None  # the file the settings came from (it need not exist)

    @property
    def workspaces(self) -> Path:
        return self.root / "workspaces"

    @property
    def mirrors(self) -> Path:
        return self.root / "mirrors"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def events(self) -> Path:
        return self.root / "events"

    # -- what lies in state/ (each domain part that owns a sub-folder of it names that itself:
    #    outbox/ and outgoing/ in sync/, scheduler.json and admission.lock in scheduler.py,
    #    http-token in http_auth.py, gateway-port.json in gateway/server.py)
    @property
    def staging(self) -> Path:
        """Where a dispatch builds its workspace before moving it into place whole."""
        return self.state / "staging"

    @property
    def key_locks(self) -> Path:
        """One lock file per idempotency key being dispatched."""
        return self.state / "keys"

    @property
    def index_file(self) -> Path:
        """The status index (SQLite)."""
        return self.state / "index.sqlite"

    @property
    def checkpoints(self) -> Path:
        """Where the server builds automatic checkpoint commits (throw-away repositories)."""
        return self.state / "checkpoints"

    @property
    def retired(self) -> Path:
        """One line per workspace ``clean`` removed: its last record, which insights still count."""
        return self.state / "retired.jsonl"

    @property
    def cli_versions(self) -> Path:
        """The CLI versions of images without the label, by image id."""
        return self.state / "cli-versions.json"

    @property
    def user_prompts(self) -> Path:
        return self.config_dir / "prompts"

    @property
    def user_workspace_templates(self) -> Path:
        return self.config_dir / "workspace_templates"

    @property
    def root_id(self) -> str:
        """A short stable id of this root, used to label containers it owns."""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    def ensure(self) -> None:
        """Create the state folders.

        Raises:
            ConfigError: one cannot be made (a file in its place, no permission): the root is unusable.
        """
        for d in (self.workspaces, self.mirrors, self.state, self.events):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    None,
                    [
                        f"state root {self.root}: cannot create the folder {d} ({e.strerror}). Remove what is "
                        f"in its way, or point {HOME_ENV} (or `root` in the config file) at a folder you may write"
                    ],
                ) from e


def builtin_dir(name: Literal["prompts", "workspace_templates", "images"]) -> Path:
    """Where a bundled data folder is: inside the installed wheel, else in the source checkout."""
    packaged = Path(__file__).parent / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name


def _default_config_dir() -> Path:
    home = os.environ.get(HOME_ENV)
    if home:
        try:
            return Path(home).expanduser().resolve()
        except (OSError, RuntimeError):  # not a usable path: load_settings says so when it works out the root
            return Path(home)
    return Path(platformdirs.user_config_dir(APP_NAME))


def config_file_path() -> Path:
    """The config file that :func:`load_settings` reads (it need not exist)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        try:
            return Path(explicit).expanduser()
        except RuntimeError:  # ~unknown-user: no such file, as the reader will find
            return Path(explicit)
    return _default_config_dir() / "config.toml"


CONFIG_MAX_BYTES = 1 << 20  # a config file is a few KiB; more is a mistake, not a config


def _read_config(path: Path) -> dict[str, object] | None:
    """The TOML table in ``path``; ``None`` when there is no file there.

    Only a regular file is read (a link to one is fine), at most :data:`CONFIG_MAX_BYTES`: a FIFO
    would block the reader until someone writes to it, a device would never end.

    Raises:
        ConfigError: ``path`` is not a regular file, cannot be read, is too large, not UTF-8 or not TOML.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; its type is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            raise ConfigError(path, [f"is {kind}, not a regular file. Point {CONFIG_ENV} or --config at a TOML file"])
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from e
    finally:
        os.close(fd)
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(path, [f"is larger than {CONFIG_MAX_BYTES} bytes; a config file is a few lines of TOML"])
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, [f"is not UTF-8 text ({e.reason} at byte {e.start})"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from e


def _state_root(settings: Settings, config_file: Path) -> Path:
    """The state root: ``AGENTIC_DISPATCH_HOME``, else ``root`` from the config file, else the user data dir.

    Raises:
        ConfigError: the root named is not a folder (a file, a link loop); the message names where it came from.
    """
    home = os.environ.get(HOME_ENV)
    if home:
        given, where, source = Path(home), f"{HOME_ENV}={home!r}", None
    elif settings.root is not None:
        given, where, source = settings.root, f"root = {str(settings.root)!r}", config_file
    else:
        given, where, source = Path(platformdirs.user_data_dir(APP_NAME)), "the user data folder", None
    try:
        root = given.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: ~unknown-user, or a loop of links
        raise ConfigError(source, [f"{where} cannot be read as a path ({e}); name a folder"]) from e
    if root.exists() and not root.is_dir():
        raise ConfigError(
            source, [f"{where}: {root} is not a folder. Name a folder for the state (it is created if missing)"]
        )
    return root


def _render_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see README 'Configuration')"
        problems.append(f"{where}: {msg}")
    return problems


def _apply_env_overrides(settings: Settings) -> Settings:
    """Settings the environment overrides: ``AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS``.

    Raises:
        ConfigError: the variable is set and is not a whole number of at least 1.
    """
    raw = os.environ.get(SYNC_MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return settings
    if not raw.isdecimal() or int(raw) < 1:
        problem = f"{SYNC_MAX_ATTEMPTS_ENV}={raw!r}: must be a whole number of at least 1 (or unset it)"
        raise ConfigError(None, [problem])
    return settings.model_copy(update={"sync": settings.sync.model_copy(update={"max_attempts": int(raw)})})


def load_settings(path: Path | None = None) -> tuple[Settings, Paths]:
    """Read the config file (if any) and work out the state paths.

    Raises:
        ConfigError: the file is not a regular file, not valid TOML or does not fit :class:`Settings`;
            the message has one line per problem, each starting with the file path. Also when
            ``AGENTIC_DISPATCH_SYNC_MAX_ATTEMPTS`` is set to something other than a whole number >= 1,
            or the state root is not a folder; and when a file named (``path``, or the variable) is not
            there: a typo must not mean the defaults, with another root and another agent.
    """
    named = path is not None or bool(os.environ.get(CONFIG_ENV))
    path = path or config_file_path()
    data = _read_config(path)
    if data is None and named:
        raise ConfigError(
            path,
            [
                f"there is no file there. Name an existing TOML file (an empty one means the defaults) with "
                f"--config or {CONFIG_ENV}, or neither to read config.toml in the config dir"
            ],
        )
    data = data or {}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, _render_validation_error(e)) from e
    settings = _apply_env_overrides(settings)
    root = _state_root(settings, path)
    return settings, Paths(root=root, config_dir=_default_config_dir(), config_file=path)
