"""The command line's grammar: every command of ``agentic-dispatch``, its arguments and their help, and the
check each argument gets as it is parsed, so bad input exits 2 before anything is read, written or started.

Each command's parser names what runs it (``run``, e.g. ``"dispatch"``, ``"image build"``); :mod:`.cli`
holds the commands themselves. Nothing here builds the service: ``--help`` and a bad argument need none.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias, get_args

from pydantic import TypeAdapter, ValidationError

from .models import (
    FAILURE_CLASSES,
    MAX_RETRIES,
    MAX_REVIEW_ROUNDS,
    AgeDays,
    BranchName,
    Count,
    IdempotencyKey,
    LockKey,
    PositiveNumber,
    Priority,
    Registry,
    ScopeGlob,
    ScopeMode,
    Status,
    Tag,
    WorkspaceName,
    problems,
)

__all__ = ["build_parser", "is_serve"]

# Written for a person reading --help (the module's docstring is for whoever reads the code);
# wrapped here, since argparse would break "agentic-dispatch" at its hyphen.
_DESCRIPTION = """\
Hand coding tasks to coding agents (OpenAI Codex, Claude Code, Gemini CLI, or a
plain shell script) and get the results back safely: each task runs in its own
Docker container, on its own branch of its own clone of the repository, never
in your checkout. The same service the MCP server offers (see serve), for a
person at a terminal or for a script."""
_EPILOG = """\
Results go to stdout (with --json, as JSON); logs and errors go to stderr.
Exit codes: 0 success, 1 failure, 2 bad input or configuration.
Run agentic-dispatch COMMAND --help for what a command does and its options."""
_STATUSES = ", ".join(s.value for s in Status)
_JSON_HELP = "print the result as JSON (the fields the MCP tool returns) instead of text"
_WORKSPACE_HELP = "the workspace's name, as dispatch and status print it (org/repo/name)"


def build_parser(*, serve_only: bool = False) -> argparse.ArgumentParser:
    """The command line's parser; with ``serve_only``, only the `serve` command (the others' checks and help
    read the service's bounds: an import that a host waiting for the server's first answer must not wait for)."""
    p = argparse.ArgumentParser(
        prog="agentic-dispatch",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=_config_file,
        help="config file; it must exist (default: AGENTIC_DISPATCH_CONFIG or config.toml in the config dir)",
    )
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    _add_serve(sub)
    if serve_only:
        _text_is_utf8(p)
        return p
    _add_dispatch(sub)
    _add_workspace_commands(sub)
    _add_queue_commands(sub)
    _add_setup_commands(sub)
    _add_watch_commands(sub)
    _add_clean(sub)
    _text_is_utf8(p)
    return p


def is_serve(argv: Sequence[str] | None) -> bool:
    """Whether the command line runs `serve` (after any ``--config``; not a ``--help``), read without the
    whole parser: anything unusual goes to the whole parser, which says what is wrong."""
    words = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    first.add_argument("--config")
    first.add_argument("command", nargs="?")
    try:
        command = first.parse_known_args(words)[0].command
    except argparse.ArgumentError:
        return False
    return command == "serve" and not {"-h", "--help"} & set(words)


def _command(
    sub: _Sub, name: str, summary: str, description: str = "", within: str = "", json: bool = False
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in the list of commands; ``--help`` shows it with ``description``. Its
    ``run`` is its name, after the command it is ``within`` (``image build``): the key of cli.COMMANDS.
    With ``json``, it takes ``--json`` (the machine form of its output)."""
    parser = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}".strip())
    parser.set_defaults(run=f"{within} {name}".strip())
    if json:
        parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    return parser


def _text_is_utf8(parser: argparse.ArgumentParser) -> None:
    """Give every text argument of ``parser`` and its subcommands the :func:`_utf8` type."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _text_is_utf8(subparser)
        elif action.type is None and action.nargs != 0:
            action.type = _utf8


_Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# Argument types: each argument is checked once, here, so bad input exits 2 before anything is read,
# written or started (a negative --wait used to dispatch for real and then fail).
def _utf8(text: str) -> str:
    # Python hands argv bytes that are not UTF-8 over as lone surrogates; records, prompts and the
    # JSON output cannot hold them, and they would fail far from here with a traceback.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"is not UTF-8 text: {shown!r}") from None
    return text


def _config_file(text: str) -> str:
    """``--config``: a file that is there. A path that names nothing is a typo, not a wish for the defaults."""
    try:
        path = Path(_utf8(text)).expanduser()
        path.stat()
    except (OSError, RuntimeError, ValueError) as e:  # missing, unreadable folder, ~no-such-user, a NUL
        missing = isinstance(e, FileNotFoundError | NotADirectoryError)
        why = "there is no file there" if missing else f"cannot be read ({e})"
        raise argparse.ArgumentTypeError(
            f"{text!r}: {why}. Name an existing TOML file (an empty one means the defaults), or leave --config "
            "out to read AGENTIC_DISPATCH_CONFIG or config.toml in the config dir"
        ) from None
    return str(path)


def _whole_number(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"must be {least} to {most}, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _request_field(kind: Any) -> Callable[[str], Any]:
    """An argparse type checking a value as the dispatch request does (the one source: models.py)."""
    adapter: TypeAdapter[Any] = TypeAdapter(kind)

    def check(text: str) -> Any:
        try:
            return adapter.validate_strings(_utf8(text))
        except ValidationError as e:
            raise argparse.ArgumentTypeError(problems(e).replace("\n", "; ")) from None

    return check


def _count(text: str) -> int:
    return _whole_number(text, 0)


def _log_lines(text: str) -> int:
    from .models import MAX_TAIL_LINES

    return _whole_number(text, 1, MAX_TAIL_LINES)  # the most a look at a log returns


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


# A shorter wait between refreshes would only spin; a longer one is more than one watch call waits.
_WATCH_INTERVAL_LEAST = 0.1


def _watch_interval(text: str) -> float:
    from .models import MAX_WATCH_SECONDS

    value = _seconds(text)
    if not _WATCH_INTERVAL_LEAST <= value <= MAX_WATCH_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be {_WATCH_INTERVAL_LEAST:g} to {MAX_WATCH_SECONDS} seconds, got {text!r}"
        )
    return value


def _days(text: str) -> float:
    from .models import MAX_WINDOW_DAYS

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < value <= MAX_WINDOW_DAYS:  # false for nan too
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_WINDOW_DAYS} days, got {text!r}")
    return value


_AGE_UNITS = {"d": 86_400.0, "h": 3600.0, "m": 60.0}


def _age_days(text: str) -> float:
    """``7d``, ``12h``, ``30m`` or a plain number of days, as days (checked as agentic_clean's ``older_than_days``)."""
    unit = _AGE_UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if unit else text) * (unit or 86_400.0) / 86_400.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 7d, 12h or 30m") from None
    return float(_request_field(AgeDays)(str(value)))


def _add_clean(sub: _Sub) -> None:
    cn = _command(
        sub,
        "clean",
        "remove finished workspaces whose work went home, oldest first",
        "A workspace goes when its branch was delivered (sync) or it has nothing to deliver; never a queued, "
        "running or blocked one. Prints each removal and the space freed. The events log, mirrors and "
        "insights stay. With neither --older-than nor --keep: [retention]'s values, else --older-than 7d.",
        json=True,
    )
    cn.add_argument(
        "--older-than", type=_age_days, metavar="AGE", help="only what finished longer ago (7d, 12h, 30m; 0: any)"
    )
    cn.add_argument("--keep", type=_request_field(Count), metavar="N", help="always keep the N most recently finished")
    cn.add_argument("--dry-run", action="store_true", help="remove nothing; print what would go")
    cn.add_argument(
        "--force", action="store_true", help="also remove finished work that was not delivered (never active work)"
    )


def _add_serve(sub: _Sub) -> None:
    s = _command(
        sub,
        "serve",
        "run the MCP server",
        "An MCP host (Claude Code, Cursor, ...) starts it and talks to it over stdio; with --transport http it "
        "serves streamable HTTP on 127.0.0.1 instead. SIGTERM or SIGINT stops it; running agents keep running.",
    )
    s.add_argument(
        "--transport", choices=["stdio", "http"], default="stdio", help="how hosts reach it (default: stdio)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address for --transport http (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port for --transport http (default: 8765)")
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve http on a non-loopback address; callers must then send the bearer token (see README)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME[:PORT]",
        help="a Host name clients use besides the bind address (repeatable; also [http] allowed_hosts)",
    )


def _add_dispatch(sub: _Sub) -> None:
    d = _command(
        sub,
        "dispatch",
        "dispatch an agent on a repository",
        "The task gets a workspace (a clone of the repository on its own agent/... branch), a prompt and a "
        "container of its own; this prints the workspace at once, or with --wait its status once the run ends.",
        json=True,
    )
    d.add_argument("repo", help="the repository: a local path, a git URL, or org/repo")
    d.add_argument("task", help="the task text ('-' reads it from stdin)")
    d.add_argument("--agent", help="codex, claude, gemini or shell, optionally with a model: claude:opus")
    d.add_argument("--org", help="the organisation in the workspace's name (default: from the repository)")
    d.add_argument("--template", help="the prompt template: coding, conventions, security, review, verify, ...")
    d.add_argument("--plan", help="a plan template to add to the prompt")
    d.add_argument("--var", action="append", metavar="NAME=VALUE", help="a plan template variable (repeatable)")
    d.add_argument("--persona", help="a persona to add to the prompt")
    d.add_argument("--issue", type=_request_field(PositiveNumber), help="the issue the task is about")
    d.add_argument("--pr", type=_request_field(PositiveNumber), help="the pull request the task is about")
    d.add_argument("--branch", type=_request_field(BranchName), help="start from this branch")
    d.add_argument("--tag", type=_request_field(Tag), help="a label for the workspace")
    d.add_argument("--priority", choices=[p.value for p in Priority], default="normal", help="queue order")
    d.add_argument(
        "--timeout", type=_request_field(PositiveNumber), help="seconds (default: timeout_seconds in the config)"
    )
    d.add_argument(
        "--idempotency-key",
        type=_request_field(IdempotencyKey),
        help="the same key again returns the existing workspace instead of a second run",
    )
    d.add_argument(
        "--lock",
        type=_request_field(LockKey),
        metavar="KEY",
        help="runs with the same lock key never overlap (also across servers on one root); a queued one waits",
    )
    d.add_argument(
        "--scope",
        action="append",
        type=_request_field(ScopeGlob),
        metavar="GLOB",
        help="a path the run may change, from the repository's root, e.g. 'src/**' (repeatable; git wildmatch; "
        "default: [defaults] scope)",
    )
    d.add_argument(
        "--scope-mode",
        choices=get_args(ScopeMode),
        help="fail: a run that changed paths outside its scope ends failed, listing them "
        "(default: [defaults] scope_mode, else warn)",
    )
    _add_pipeline_arguments(d)
    d.add_argument("--dry-run", action="store_true", help="print the prompt; launch and keep nothing")
    d.add_argument(
        "--qa",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the repository's tests after the agent ends completed (default: [qa] enabled in the config)",
    )
    d.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait up to this long for the run to finish")


def _add_pipeline_arguments(d: argparse.ArgumentParser) -> None:
    """The dispatch's arguments that tie it to other workspaces."""
    d.add_argument(
        "--depends-on",
        action="append",
        type=_request_field(WorkspaceName),
        metavar="WORKSPACE",
        help="start only after this workspace ended completed (repeatable); cancelling it cancels this one",
    )
    d.add_argument(
        "--base-workspace",
        type=_request_field(WorkspaceName),
        metavar="WORKSPACE",
        help="start this workspace's branch from where that one's branch ends (implies --depends-on it)",
    )
    d.add_argument(
        "--retry",
        type=lambda text: _whole_number(text, 0, MAX_RETRIES),
        metavar="N",
        help=f"retry a failed run up to N times (0-{MAX_RETRIES}; default: [retry] max in the config)",
    )
    d.add_argument(
        "--retry-on",
        action="append",
        choices=FAILURE_CLASSES,
        metavar="CLASS",
        help=f"a failure class to retry (repeatable; {', '.join(FAILURE_CLASSES)}; default: [retry] on)",
    )
    d.add_argument(
        "--review-of",
        type=_request_field(WorkspaceName),
        metavar="WORKSPACE",
        help="review that workspace's branch once it completes (template review, persona reviewer by default)",
    )
    d.add_argument(
        "--review-rounds",
        type=lambda text: _whole_number(text, 0, MAX_REVIEW_ROUNDS),
        default=0,
        metavar="N",
        help="with --review-of: on 'changes requested', send the reviewed agent back and review again, N times",
    )


def _add_workspace_commands(sub: _Sub) -> None:
    st = _command(
        sub,
        "status",
        "show workspaces",
        "Counts per status, then one line per workspace, newest first: age, agent, status, runs, and the "
        "question, failure reason or last word; with one workspace, also its figures and log tail.",
        json=True,
    )
    st.add_argument("workspace", nargs="?", help=f"{_WORKSPACE_HELP}; default: all")
    st.add_argument(
        "--status",
        choices=[s.value for s in Status],
        metavar="STATUS",
        help=f"only workspaces in this status: {_STATUSES}",
    )
    st.add_argument("--limit", type=_positive, default=50, help="at most this many workspaces (default: 50)")
    st.add_argument("--log-lines", type=_count, default=0, help="the last this many log lines of each (default: 0)")
    st.add_argument(
        "--chain",
        action="store_true",
        help="with a workspace: its whole pipeline, what it depends on first, then what depends on it",
    )

    r = _command(
        sub,
        "resume",
        "run a blocked, failed or completed workspace again",
        "In the same workspace: the agent continues its own session with the answer as the next message.",
        json=True,
    )
    r.add_argument("workspace", help=_WORKSPACE_HELP)
    r.add_argument("--answer", help="the answer to the agent's question (written to ANSWER.md)")
    r.add_argument("--agent", help="another agent for this run (default: the workspace's)")

    c = _command(
        sub,
        "cancel",
        "cancel a queued or running workspace",
        "A queued one never starts; a running one's container is stopped; a finished one is left alone.",
        json=True,
    )
    c.add_argument("workspace", help=_WORKSPACE_HELP)


def _add_queue_commands(sub: _Sub) -> None:
    fr = _command(
        sub,
        "freeze",
        "freeze the queue (new dispatches queue, nothing starts)",
        "The queue stays frozen across restarts until unfreeze.",
        json=True,
    )
    fr.add_argument("--now", action="store_true", help="also stop running agents")

    _command(sub, "unfreeze", "unfreeze the queue", "Starts what has a slot and lifts any pool's pause.", json=True)

    _command(
        sub,
        "cleanup",
        "remove labelled containers no record knows",
        "status lists them as orphaned containers; nothing else removes them.",
        json=True,
    )

    sy = _command(
        sub,
        "sync",
        "deliver results home (exit 1 when a delivery needs attention)",
        "A completed run's branch goes to the repository it was dispatched from, and its record to the "
        "configured endpoint; prints a line per delivery and what to do where one needs a person.",
        json=True,
    )
    sy.add_argument("workspace", nargs="?", help=f"{_WORKSPACE_HELP}; default: every finished run")
    sy.add_argument("--force", action="store_true", help="the branch may overwrite a different one of its name")
    sy.add_argument(
        "--include-checkpoints",
        action="store_true",
        help="also deliver branches that end in an automatic checkpoint of a stopped run",
    )
    sy.add_argument(
        "--wait", type=_seconds, default=0.0, metavar="SECONDS", help="keep retrying what is pending up to this long"
    )


def _add_setup_commands(sub: _Sub) -> None:
    dr = _command(
        sub,
        "doctor",
        "check each agent can run: engine, image, CLI version, credentials (never printed)",
        "Exit 1 when one cannot, with what to set or build.",
        json=True,
    )
    dr.add_argument("agent", nargs="*", help="agents to check (default: all)")

    im = _command(sub, "image", "the agent image", "Build it, or print the tag the current recipe builds.")
    im_sub = im.add_subparsers(dest="image_command", required=True, title="commands", metavar="COMMAND")
    b = _command(
        im_sub,
        "build",
        "build the agent image (skipped when it is up to date)",
        "Progress goes to stderr; the tag built goes to stdout.",
        within="image",
    )
    b.add_argument("--base", help="base image (default: debian:bookworm-slim, else a locally bootstrapped one)")
    b.add_argument("--tag", help="image tag (default: agentic-dispatch-agent:<recipe hash>)")
    b.add_argument("--force", action="store_true", help="rebuild even when the tag exists")
    _command(im_sub, "tag", "print the tag the current recipe builds", within="image")
    p = _command(
        im_sub,
        "push",
        "push the agent image to a registry (for a swarm: every node pulls it from there)",
        "Progress goes to stderr; the name pushed goes to stdout: set it as the image in the config file.",
        within="image",
    )
    p.add_argument("registry", type=_request_field(Registry), help="the registry: HOST[:PORT][/PATH]")


def _add_watch_commands(sub: _Sub) -> None:
    from .models import MAX_TAIL_LINES, MAX_WATCH_SECONDS, MAX_WINDOW_DAYS

    w = _command(
        sub,
        "watch",
        "the status table, updated live as runs change (Ctrl-C to stop)",
        "Into a pipe, one line per change instead.",
    )
    w.add_argument("workspace", nargs="*", help="workspaces to watch (default: everything queued or running)")
    w.add_argument(
        "--interval",
        type=_watch_interval,
        default=10.0,
        metavar="SECONDS",
        help=f"longest wait between refreshes ({_WATCH_INTERVAL_LEAST:g} to {MAX_WATCH_SECONDS}; default: 10)",
    )
    w.add_argument(
        "--limit", type=_positive, default=30, help="at most this many workspaces in the table (default: 30)"
    )

    lg = _command(sub, "logs", "an agent's log (masked); -f follows it until the run ends")
    lg.add_argument("workspace", help=_WORKSPACE_HELP)
    lg.add_argument("-f", "--follow", action="store_true", help="print what follows as it comes, until the run ends")
    lg.add_argument(
        "--tail", type=_log_lines, default=200, help=f"lines to show first (1 to {MAX_TAIL_LINES}; default: 200)"
    )

    df = _command(sub, "diff", "what an agent's branch changed since it started: the stat, then the patch", json=True)
    df.add_argument("workspace", help=_WORKSPACE_HELP)
    df.add_argument("--stat", action="store_true", help="only the changed files, with line counts")
    df.add_argument("--path", help="only this file or folder, as the stat names it")

    ev = _command(sub, "events", "the transitions of every run (dispatched, started, blocked, ...)")
    ev.add_argument("--workspace", help="only this workspace's")
    ev.add_argument("--last", type=_count, default=0, metavar="N", help="only the last N (default: 0, all)")
    ev.add_argument("-f", "--follow", action="store_true", help="wait for more")

    ins = _command(sub, "insights", "per agent: runs, success rate, durations, tokens, cost, failures", json=True)
    ins.add_argument(
        "--days",
        type=_days,
        default=7.0,
        help=f"the runs that finished in the last this many days (at most {MAX_WINDOW_DAYS}; default: 7)",
    )
