"""The command line: ``agentic-dispatch serve | dispatch | status | resume | doctor | sync | image build``.

A thin front end over the same :class:`~agentic_dispatch.service.Dispatcher` the MCP
tools use. Results go to stdout (JSON with ``--json``); logs and errors go to stderr.
Exit codes: 0 success, 1 failure, 2 bad input or configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, get_args

from pydantic import TypeAdapter, ValidationError

from .errors import ConfigError, DispatchError, InvalidInputError, WorkspaceNotFoundError, describe_state_failure
from .models import (
    FAILURE_CLASSES,
    MAX_RETRIES,
    MAX_REVIEW_ROUNDS,
    AgeDays,
    BranchName,
    Count,
    DispatchRequest,
    IdempotencyKey,
    LockKey,
    PositiveNumber,
    Priority,
    Registry,
    RetryPolicy,
    ScopeGlob,
    ScopeMode,
    Status,
    StatusReport,
    Tag,
    WorkspaceName,
    problems,
)

# The settings, the service (with the engine's client and GitPython) and the views (with rich) are imported
# by the commands that use them: `serve` answers its host before it reads or builds any of them.
if TYPE_CHECKING:
    from pydantic import BaseModel

    from .config import Settings
    from .models import CleanReport, SyncReport
    from .runtime.base import Runtime
    from .runtime.docker import DockerRuntime
    from .service import Dispatcher

__all__ = ["main"]

log = logging.getLogger("agentic_dispatch")


def _dispatcher(args: argparse.Namespace) -> Dispatcher:
    from .config import load_settings
    from .service import Dispatcher

    settings, paths = load_settings(Path(args.config) if args.config else None)
    logging.getLogger().setLevel(settings.log_level)
    return Dispatcher(settings, paths, _runtime(settings))


def _runtime(settings: Settings) -> Runtime:
    """The service's runtime: :func:`_engine`'s, made when a call first needs the engine (a status never does)."""
    from .runtime.base import engine_address, is_local_engine
    from .runtime.deferred import DeferredRuntime

    rt = settings.runtime
    local = rt.engine != "swarm" and is_local_engine(engine_address(rt.docker_host))  # a swarm's task runs anywhere
    return DeferredRuntime(lambda: _engine(settings), local=local)


def _engine(settings: Settings) -> DockerRuntime:
    """The runtime ``[runtime] engine`` chooses: one Docker engine, or a swarm through its manager."""
    from .runtime.docker import DockerRuntime
    from .runtime.swarm import SwarmRuntime

    rt = settings.runtime
    if rt.engine == "swarm":
        return SwarmRuntime(docker_host=rt.docker_host, placement=rt.placement, stop_grace=rt.stop_grace_seconds)
    return DockerRuntime(docker_host=rt.docker_host)


def _emit(result: BaseModel, as_json: bool) -> None:
    from .cli_views import emit  # (the views load rich: only the commands that print need them)

    emit(result, as_json)


def _print_status(report: StatusReport, as_json: bool) -> None:
    from .cli_views import print_status

    print_status(report, as_json)


def print_sync(report: SyncReport, as_json: bool) -> None:
    from .cli_views import print_sync as show

    show(report, as_json)


def print_clean(report: CleanReport, as_json: bool) -> None:
    from .cli_views import print_clean as show

    show(report, as_json)


def cmd_serve(args: argparse.Namespace) -> int:
    # The stop signals are handled first, before the MCP SDK's import: a signal that arrives while the
    # server starts ends it cleanly too (exit 0), with no service to close yet.
    made: list[Dispatcher] = []

    def shutdown(signum: int, frame: object) -> None:
        # Stop the background threads and leave at once. Running containers keep running and are
        # reconciled on the next start; every record write is atomic, so nothing is left half-written.
        log.info("%s: shutting down; running agents keep running", signal.Signals(signum).name)
        for d in made:
            d.close(timeout=2)
        logging.shutdown()
        os._exit(0)

    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        signal.signal(sig, shutdown)
    # A parent may spawn the server with these blocked, so that a stop it sends at once is held for the
    # handlers instead of killing the interpreter while it starts; the handlers are in place now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    from .mcp_server import build_server, run_http  # only this command needs the MCP SDK

    def make() -> Dispatcher:  # on a worker thread, once the host has the tools (see mcp_server)
        made.append(_dispatcher(args))  # reads the settings (a bad one: each tool call says what is wrong)
        return made[-1]  # (a build that failed to start is tried again)

    http = None
    if args.transport == "http":  # its plan needs the settings first: a bad config stops it here (exit 2)
        from .config import load_settings
        from .http_auth import plan_http

        settings, paths = load_settings(Path(args.config) if args.config else None)
        http = plan_http(
            args.host,
            args.port,
            allow_remote=args.allow_remote,
            added_hosts=args.allowed_host or [],
            settings=settings.http,
            state_dir=paths.state,
            config_file=paths.config_file,
        )
        logging.getLogger().setLevel(settings.log_level)
    if http is None:
        server = build_server(make)
    else:
        from .board import Board

        board = Board(http)
        server = build_server(make, token=http.token, issuer_url=http.url, board=board)
        print(f"agentic-dispatch: {board.announcement()}", file=sys.stderr, flush=True)
    # Readiness, for whoever started the server (tests wait for this line rather than guess).
    log.info("serving MCP over %s; SIGTERM or SIGINT stops the server", args.transport)
    if http is None:
        server.run("stdio")
    else:
        run_http(server, http)
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    variables: dict[str, str] = {}
    for item in args.var or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError("--var", f"{item!r} is not NAME=VALUE")
        variables[key] = value
    if args.retry_on and args.retry is None:
        raise InvalidInputError("--retry-on", "says which failures to retry; give --retry N too (how many times).")
    task = _read_stdin_task() if args.task == "-" else args.task
    req = DispatchRequest(
        repo=args.repo,
        task=task,
        agent=args.agent,
        org=args.org,
        template=args.template,
        plan_template=args.plan,
        variables=variables,
        persona=args.persona,
        issue=args.issue,
        pr=args.pr,
        branch=args.branch,
        tag=args.tag,
        priority=Priority(args.priority),
        timeout_seconds=args.timeout,
        idempotency_key=args.idempotency_key,
        lock=args.lock,
        scope=args.scope,
        scope_mode=args.scope_mode,
        depends_on=args.depends_on,
        base_workspace=args.base_workspace,
        retry=None if args.retry is None else RetryPolicy(max=args.retry, on=args.retry_on),
        review_of=args.review_of,
        review_rounds=args.review_rounds,
        dry_run=args.dry_run,
        qa=args.qa,
    )
    svc = _dispatcher(args)
    result = svc.dispatch(req)
    if args.wait and not args.dry_run:
        rec = svc.wait(result.workspace, args.wait)
        _print_status(svc.status(rec.name, log_lines=10), args.json)
        return 0 if rec.status == "completed" else 1
    _emit(result, args.json)
    return 0


def _read_stdin_task() -> str:
    """The task from stdin, read as bytes and decoded as UTF-8 (the text stream would turn bad bytes
    into surrogates that fail much later, far from the cause).

    Raises:
        InvalidInputError: stdin is not UTF-8 text.
    """
    if sys.stdin is None:  # started with stdin closed
        raise InvalidInputError("task", "is '-', which reads it from stdin, and this process has no stdin.")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            "task",
            f"stdin is not UTF-8 text ({e.reason} at byte {e.start}). Convert it first, e.g. `iconv -t UTF-8`.",
        ) from e


def cmd_status(args: argparse.Namespace) -> int:
    svc = _dispatcher(args)
    svc.reconcile()  # no server may be watching: bring records up to date with their containers
    _print_status(svc.status(args.workspace, args.status, args.limit, args.log_lines, chain=args.chain), args.json)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    svc = _dispatcher(args)
    svc.reconcile()
    _emit(svc.resume(args.workspace, args.answer, args.agent), args.json)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _emit(_dispatcher(args).cancel(args.workspace), args.json)
    return 0


def cmd_freeze(args: argparse.Namespace) -> int:
    _emit(_dispatcher(args).freeze(args.now), args.json)
    return 0


def cmd_unfreeze(args: argparse.Namespace) -> int:
    _emit(_dispatcher(args).unfreeze(), args.json)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    svc = _dispatcher(args)
    svc.reconcile()
    _emit(svc.cleanup(), args.json)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    report = _dispatcher(args).clean(args.older_than, args.keep, args.dry_run, args.force)
    print_clean(report, args.json)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    report = _dispatcher(args).sync(args.workspace, args.force, args.wait, args.include_checkpoints)
    print_sync(report, args.json)
    return 1 if report.attention or report.dead_lettered else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    report = _dispatcher(args).doctor(args.agent or None)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0 if report.ok else 1
    print(f"engine: {report.engine}")
    print(f"image:  {report.image}")
    for check in report.agents:
        print(f"{check.agent}: {'ok' if check.ok else 'NOT READY'}")
        if check.cli_version:
            print(f"  cli: {check.cli_version}")
        if check.credentials:
            print(f"  credentials: {', '.join(check.credentials)}")
        for problem in check.problems:
            print(f"  problem: {problem}")
    return 0 if report.ok else 1


def cmd_image_build(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .runtime.docker import DockerRuntime
    from .runtime.images import build_image

    settings, _ = load_settings(Path(args.config) if getattr(args, "config", None) else None)
    runtime = DockerRuntime(docker_host=settings.runtime.docker_host)
    print(f"building on the Docker engine at {runtime.describe()}", file=sys.stderr, flush=True)
    runtime.check()
    tag = build_image(
        runtime.client,
        tag=args.tag,
        base=args.base,
        force=args.force,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(tag)
    return 0


def cmd_image_push(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .runtime.images import configured_image, push_image

    settings, _ = load_settings(Path(args.config) if getattr(args, "config", None) else None)
    runtime = _engine(settings)
    image = configured_image(settings.image)
    print(f"pushing {image} from the Docker engine at {runtime.describe()}", file=sys.stderr, flush=True)
    runtime.check()
    pushed = push_image(runtime.client, image, args.registry, lambda line: print(line, file=sys.stderr, flush=True))
    print(f'pushed; set image = "{pushed}" in the config file', file=sys.stderr)
    print(pushed)
    return 0


def cmd_image_tag(args: argparse.Namespace) -> int:
    from .runtime.images import default_image_tag

    print(default_image_tag())
    return 0


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


def _is_serve(argv: Sequence[str] | None) -> bool:
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


def _command(sub: _Sub, name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in the list of commands; ``--help`` shows it with ``description``."""
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}".strip())


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
    )
    cn.add_argument(
        "--older-than", type=_age_days, metavar="AGE", help="only what finished longer ago (7d, 12h, 30m; 0: any)"
    )
    cn.add_argument("--keep", type=_request_field(Count), metavar="N", help="always keep the N most recently finished")
    cn.add_argument("--dry-run", action="store_true", help="remove nothing; print what would go")
    cn.add_argument(
        "--force", action="store_true", help="also remove finished work that was not delivered (never active work)"
    )
    cn.add_argument("--json", action="store_true", help=_JSON_HELP)
    cn.set_defaults(func=cmd_clean)


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
    s.set_defaults(func=cmd_serve)


def _add_dispatch(sub: _Sub) -> None:
    d = _command(
        sub,
        "dispatch",
        "dispatch an agent on a repository",
        "The task gets a workspace (a clone of the repository on its own agent/... branch), a prompt and a "
        "container of its own; this prints the workspace at once, or with --wait its status once the run ends.",
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
    d.add_argument("--json", action="store_true", help=_JSON_HELP)
    d.set_defaults(func=cmd_dispatch)


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
    st.add_argument("--json", action="store_true", help=_JSON_HELP)
    st.set_defaults(func=cmd_status)

    r = _command(
        sub,
        "resume",
        "run a blocked, failed or completed workspace again",
        "In the same workspace: the agent continues its own session with the answer as the next message.",
    )
    r.add_argument("workspace", help=_WORKSPACE_HELP)
    r.add_argument("--answer", help="the answer to the agent's question (written to ANSWER.md)")
    r.add_argument("--agent", help="another agent for this run (default: the workspace's)")
    r.add_argument("--json", action="store_true", help=_JSON_HELP)
    r.set_defaults(func=cmd_resume)

    c = _command(
        sub,
        "cancel",
        "cancel a queued or running workspace",
        "A queued one never starts; a running one's container is stopped; a finished one is left alone.",
    )
    c.add_argument("workspace", help=_WORKSPACE_HELP)
    c.add_argument("--json", action="store_true", help=_JSON_HELP)
    c.set_defaults(func=cmd_cancel)


def _add_queue_commands(sub: _Sub) -> None:
    fr = _command(
        sub,
        "freeze",
        "freeze the queue (new dispatches queue, nothing starts)",
        "The queue stays frozen across restarts until unfreeze.",
    )
    fr.add_argument("--now", action="store_true", help="also stop running agents")
    fr.add_argument("--json", action="store_true", help=_JSON_HELP)
    fr.set_defaults(func=cmd_freeze)

    un = _command(sub, "unfreeze", "unfreeze the queue", "Starts what has a slot and lifts any pool's pause.")
    un.add_argument("--json", action="store_true", help=_JSON_HELP)
    un.set_defaults(func=cmd_unfreeze)

    cl = _command(
        sub,
        "cleanup",
        "remove labelled containers no record knows",
        "status lists them as orphaned containers; nothing else removes them.",
    )
    cl.add_argument("--json", action="store_true", help=_JSON_HELP)
    cl.set_defaults(func=cmd_cleanup)

    sy = _command(
        sub,
        "sync",
        "deliver results home (exit 1 when a delivery needs attention)",
        "A completed run's branch goes to the repository it was dispatched from, and its record to the "
        "configured endpoint; prints a line per delivery and what to do where one needs a person.",
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
    sy.add_argument("--json", action="store_true", help=_JSON_HELP)
    sy.set_defaults(func=cmd_sync)


def _add_setup_commands(sub: _Sub) -> None:
    dr = _command(
        sub,
        "doctor",
        "check each agent can run: engine, image, CLI version, credentials (never printed)",
        "Exit 1 when one cannot, with what to set or build.",
    )
    dr.add_argument("agent", nargs="*", help="agents to check (default: all)")
    dr.add_argument("--json", action="store_true", help=_JSON_HELP)
    dr.set_defaults(func=cmd_doctor)

    im = _command(sub, "image", "the agent image", "Build it, or print the tag the current recipe builds.")
    im_sub = im.add_subparsers(dest="image_command", required=True, title="commands", metavar="COMMAND")
    b = _command(
        im_sub,
        "build",
        "build the agent image (skipped when it is up to date)",
        "Progress goes to stderr; the tag built goes to stdout.",
    )
    b.add_argument("--base", help="base image (default: debian:bookworm-slim, else a locally bootstrapped one)")
    b.add_argument("--tag", help="image tag (default: agentic-dispatch-agent:<recipe hash>)")
    b.add_argument("--force", action="store_true", help="rebuild even when the tag exists")
    b.set_defaults(func=cmd_image_build)
    t = _command(im_sub, "tag", "print the tag the current recipe builds")
    t.set_defaults(func=cmd_image_tag)
    p = _command(
        im_sub,
        "push",
        "push the agent image to a registry (for a swarm: every node pulls it from there)",
        "Progress goes to stderr; the name pushed goes to stdout: set it as the image in the config file.",
    )
    p.add_argument("registry", type=_request_field(Registry), help="the registry: HOST[:PORT][/PATH]")
    p.set_defaults(func=cmd_image_push)


def _add_watch_commands(sub: _Sub) -> None:
    from .cli_watch import cmd_diff, cmd_events, cmd_insights, cmd_logs, cmd_watch
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
    w.set_defaults(func=lambda a: cmd_watch(a, _dispatcher))

    lg = _command(sub, "logs", "an agent's log (masked); -f follows it until the run ends")
    lg.add_argument("workspace", help=_WORKSPACE_HELP)
    lg.add_argument("-f", "--follow", action="store_true", help="print what follows as it comes, until the run ends")
    lg.add_argument(
        "--tail", type=_log_lines, default=200, help=f"lines to show first (1 to {MAX_TAIL_LINES}; default: 200)"
    )
    lg.set_defaults(func=lambda a: cmd_logs(a, _dispatcher))

    df = _command(sub, "diff", "what an agent's branch changed since it started: the stat, then the patch")
    df.add_argument("workspace", help=_WORKSPACE_HELP)
    df.add_argument("--stat", action="store_true", help="only the changed files, with line counts")
    df.add_argument("--path", help="only this file or folder, as the stat names it")
    df.add_argument("--json", action="store_true", help=_JSON_HELP)
    df.set_defaults(func=lambda a: cmd_diff(a, _dispatcher))

    ev = _command(sub, "events", "the transitions of every run (dispatched, started, blocked, ...)")
    ev.add_argument("--workspace", help="only this workspace's")
    ev.add_argument("--last", type=_count, default=0, metavar="N", help="only the last N (default: 0, all)")
    ev.add_argument("-f", "--follow", action="store_true", help="wait for more")
    ev.set_defaults(func=lambda a: cmd_events(a, _dispatcher))

    ins = _command(sub, "insights", "per agent: runs, success rate, durations, tokens, cost, failures")
    ins.add_argument(
        "--days",
        type=_days,
        default=7.0,
        help=f"the runs that finished in the last this many days (at most {MAX_WINDOW_DAYS}; default: 7)",
    )
    ins.add_argument("--json", action="store_true", help=_JSON_HELP)
    ins.set_defaults(func=lambda a: cmd_insights(a, _dispatcher))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser(serve_only=_is_serve(argv)).parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument (2; argparse has said why on stderr)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    except (InvalidInputError, WorkspaceNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DispatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:  # a request built from the arguments: one line per problem
        print(f"error: {problems(e)}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as e:  # the disk under the server (full, read-only): no traceback
        print(f"error: {describe_state_failure(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
