"""Credentials: which secrets and login files an agent's container gets.

API keys are passed *by name*: the value is read from the server's environment when a
container starts and goes only into that container's environment - never into
``status.json``, logs, prompts or tool output. Login files the CLIs write on the host
(Claude's ``.credentials.json``, Gemini's OAuth files) are copied into the per-workspace
agent home; Codex's ``auth.json`` is refreshed in place by Codex, so it is never copied to
concurrent containers: it is mounted read-write and that agent's runs are serialised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .agents import Agent
from .config import AgentSettings, HostFile

__all__ = ["Credentials", "redact", "resolve_credentials"]


@dataclass
class Credentials:
    """What one agent gets for its runs. ``env`` holds secret values: never persist it."""

    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[Path, str]] = field(default_factory=list)  # host file -> path in the agent home
    mounts: list[tuple[Path, str]] = field(default_factory=list)  # read-write; the agent's runs are serialised
    found: list[str] = field(default_factory=list)  # descriptions without values, for doctor
    problem: str | None = None  # why the agent cannot run, and what to set

    @property
    def ok(self) -> bool:
        return self.problem is None


def resolve_credentials(
    agent: Agent, cfg: AgentSettings | None, environ: Mapping[str, str], host_home: Path
) -> Credentials:
    """Work out ``agent``'s credentials from its settings, the environment and the host home.

    Every named variable that is set is passed (all of the agent's key variables by default);
    when several key variables are set, the CLI decides which one it uses.
    """
    names = cfg.env if cfg is not None and cfg.env is not None else list(agent.key_env)
    creds = Credentials(env={n: environ[n] for n in names if environ.get(n)})
    creds.found = [f"{n} (environment)" for n in creds.env]
    has_key = any(k in creds.env for k in agent.key_env)
    unlisted = [k for k in agent.key_env if environ.get(k) and k not in names]  # set, but env leaves it out

    if cfg is not None and cfg.files is not None:
        files: Iterable[HostFile] = cfg.files
        explicit = True
    elif has_key:
        files, explicit = (), False  # a key is enough; the login files are not needed
    else:
        files = [HostFile(source=host_home / f.source, target=f.target, mode=f.mode) for f in agent.login_files]
        explicit = False
    missing = []
    for f in files:
        source = f.source.expanduser()
        if not source.is_file():
            if explicit:
                missing.append(str(f.source))
            continue
        (creds.mounts if f.mode == "mount" else creds.copies).append((source, f.target))
        how = "mounted read-write" if f.mode == "mount" else "copied"
        creds.found.append(f"{_home_relative(source, host_home)} ({how})")

    no_credentials = agent.cli is not None and not has_key and not creds.copies and not creds.mounts
    if missing:
        creds.problem = (
            f"{agent.base}: the file(s) {', '.join(missing)} named in [agents.{agent.base}] files do not exist. "
            "Fix the path in the config file, or log in with the CLI on this machine first."
        )
    elif no_credentials and unlisted:
        creds.problem = (
            f"{agent.base}: {unlisted[0]} is set in the server's environment, but [agents.{agent.base}] env "
            f"does not list it, so it is not passed. Add {unlisted[0]!r} to [agents.{agent.base}] env "
            "in the config file."
        )
    elif no_credentials:
        keys = " or ".join(agent.key_env)
        login = agent.login_files[0].source if agent.login_files else None
        creds.problem = (
            f"{agent.base}: no credentials found. Set {keys} in the environment of the agentic-dispatch server"
            + (f", or log in with the {agent.cli} CLI on this machine so ~/{login} exists" if login else "")
            + ". See README 'Agents and credentials'."
        )
    return creds


def _home_relative(path: Path, home: Path) -> str:
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)


# A piece of a value at least this long, cut by the start or the end of a text, is masked too.
CUT_PIECE_MIN = 8


def redact(text: str | None, secrets: Iterable[str]) -> str | None:
    """``text`` with every secret value replaced by ``***`` (values shorter than 6 are left: too ambiguous).

    ``text`` is often a window of a longer one (a log tail, a range of bytes, a patch cut to size), which
    may cut a value in two: a piece of one at its start (the value's end) or at its end (the value's
    start), of at least ``CUT_PIECE_MIN`` characters, is masked too.
    """
    if not text:
        return text
    values = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)
    for value in values:
        text = text.replace(value, "***")
    for value in values:
        text = _mask_cut_pieces(text, value)
    return text


def _mask_cut_pieces(text: str, value: str) -> str:
    for n in range(min(len(value), len(text)) - 1, CUT_PIECE_MIN - 1, -1):  # the longest piece first
        if text.startswith(value[-n:]):
            text = "***" + text[n:]
            break
    for n in range(min(len(value), len(text)) - 1, CUT_PIECE_MIN - 1, -1):
        if text.endswith(value[:n]):
            text = text[:-n] + "***"
            break
    return text
