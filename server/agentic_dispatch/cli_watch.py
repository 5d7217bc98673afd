"""The command line's live commands: ``watch``, ``logs [-f]``, ``events [--follow]``, ``insights``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeAlias

from rich.console import Console
from rich.live import Live

from .cli_views import emit, print_change, print_insights, status_view
from .errors import InvalidInputError
from .models import ACTIVE_STATUSES
from .service import Dispatcher

__all__ = ["add_watch_commands"]

Make = Callable[[argparse.Namespace], Dispatcher]
_Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
FOLLOW_POLL_SECONDS = 0.5


def cmd_watch(args: argparse.Namespace, make: Make) -> int:
    """The status table, updated as runs change (a terminal); change lines as they come (a pipe)."""
    svc = make(args)
    console = Console(highlight=False)
    cursor: str | None = None
    names = args.workspace or None
    if not console.is_terminal:
        while True:
            result = svc.watch(names, args.interval, cursor, on_change=print_change)
            cursor = result.cursor
            sys.stdout.flush()
    with Live(status_view(svc.status(limit=args.limit)), console=console, auto_refresh=False) as live:
        while True:
            result = svc.watch(names, args.interval, cursor)
            cursor = result.cursor
            live.update(status_view(svc.status(limit=args.limit)), refresh=True)


def cmd_logs(args: argparse.Namespace, make: Make) -> int:
    """The log's tail; with ``-f``, what follows as it comes, until the run ends."""
    svc = make(args)
    svc.reconcile()
    out = sys.stdout
    result = svc.logs(args.workspace, args.tail)
    out.write(result.text)
    while args.follow:
        out.flush()
        active = svc.record(args.workspace).status in ACTIVE_STATUSES
        result = svc.logs(args.workspace, since_bytes=result.end)
        out.write(result.text)
        if not result.text:
            if not active:
                return 0
            time.sleep(FOLLOW_POLL_SECONDS)
            svc.reconcile()
    return 0


def cmd_events(args: argparse.Namespace, make: Make) -> int:
    """The transitions in the events log (one workspace's, with ``--workspace``); ``--follow`` waits for more."""
    svc = make(args)
    names = {args.workspace} if args.workspace else None
    changes, cursor = svc.changes(0, names)  # an unknown workspace is named before anything prints
    for change in changes[-args.last :] if args.last else changes:
        print_change(change)
    while args.follow:
        sys.stdout.flush()
        result = svc.watch(sorted(names) if names else None, 30, str(cursor), on_change=print_change)
        cursor = int(result.cursor)
    return 0


def cmd_insights(args: argparse.Namespace, make: Make) -> int:
    report = make(args).insights(args.days)
    if args.json:
        emit(report, True)
    else:
        print_insights(report)
    return 0


def add_watch_commands(sub: _Sub, make: Make) -> None:
    """Register the live commands; ``make`` builds the service from the parsed arguments."""
    w = sub.add_parser("watch", help="the status table, updated live as runs change (Ctrl-C to stop)")
    w.add_argument("workspace", nargs="*", help="workspaces to watch (default: everything queued or running)")
    w.add_argument("--interval", type=float, default=10.0, help="longest wait between refreshes, seconds")
    w.add_argument("--limit", type=int, default=30)
    w.set_defaults(func=lambda a: cmd_watch(_checked(a, "interval", 0.1, 50), make))

    lg = sub.add_parser("logs", help="an agent's log (masked); -f follows it until the run ends")
    lg.add_argument("workspace")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--tail", type=int, default=200, help="lines to show first")
    lg.set_defaults(func=lambda a: cmd_logs(a, make))

    ev = sub.add_parser("events", help="the transitions of every run (dispatched, started, blocked, ...)")
    ev.add_argument("--workspace")
    ev.add_argument("--last", type=int, default=0, help="only the last N")
    ev.add_argument("-f", "--follow", action="store_true", help="wait for more")
    ev.set_defaults(func=lambda a: cmd_events(a, make))

    ins = sub.add_parser("insights", help="per agent: runs, success rate, durations, tokens, cost, failures")
    ins.add_argument("--days", type=float, default=7.0)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=lambda a: cmd_insights(a, make))


def _checked(args: argparse.Namespace, name: str, low: float, high: float) -> argparse.Namespace:
    value = getattr(args, name)
    if not low <= value <= high:
        raise InvalidInputError(name, f"must be {low:g} to {high:g}.")
    return args
