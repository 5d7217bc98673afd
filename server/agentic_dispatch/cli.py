"""The command line's commands: ``agentic-dispatch serve | dispatch | status | resume | doctor | sync | image ...``.

A thin front end over the same :class:`~agentic_dispatch.service.Dispatcher` the MCP
tools use; the arguments are declared and checked in :mod:`.cli_args`. Results go to stdout
(JSON with ``--json``); logs and errors go to stderr. Exit codes: 0 success, 1 failure,
2 bad input or configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .cli_args import build_parser, is_serve
from .errors import ConfigError, DispatchError, InvalidInputError, WorkspaceNotFoundError, describe_state_failure
from .models import DispatchRequest, Priority, RetryPolicy, StatusReport, problems

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


def cmd_watch(args: argparse.Namespace) -> int:
    from .cli_watch import cmd_watch as watch

    return watch(args, _dispatcher)


def cmd_logs(args: argparse.Namespace) -> int:
    from .cli_watch import cmd_logs as logs

    return logs(args, _dispatcher)


def cmd_diff(args: argparse.Namespace) -> int:
    from .cli_watch import cmd_diff as diff

    return diff(args, _dispatcher)


def cmd_events(args: argparse.Namespace) -> int:
    from .cli_watch import cmd_events as events

    return events(args, _dispatcher)


def cmd_insights(args: argparse.Namespace) -> int:
    from .cli_watch import cmd_insights as insights

    return insights(args, _dispatcher)


# What runs each command (the name its parser gives, see cli_args).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "dispatch": cmd_dispatch,
    "status": cmd_status,
    "resume": cmd_resume,
    "cancel": cmd_cancel,
    "freeze": cmd_freeze,
    "unfreeze": cmd_unfreeze,
    "cleanup": cmd_cleanup,
    "clean": cmd_clean,
    "sync": cmd_sync,
    "doctor": cmd_doctor,
    "image build": cmd_image_build,
    "image tag": cmd_image_tag,
    "image push": cmd_image_push,
    "watch": cmd_watch,
    "logs": cmd_logs,
    "diff": cmd_diff,
    "events": cmd_events,
    "insights": cmd_insights,
}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser(serve_only=is_serve(argv)).parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument (2; argparse has said why on stderr)
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.run](args)
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
