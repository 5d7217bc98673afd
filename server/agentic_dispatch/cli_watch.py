"""The command line's commands that look at runs: ``watch``, ``logs [-f]``, ``diff``, ``events [--follow]``,
``insights``.

Their arguments are declared (and checked, by their types) with the others in :mod:`.cli`; each
command here takes the parsed arguments and ``make``, which builds the service from them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live

from .cli_views import emit, print_change, print_insights, status_view
from .models import ACTIVE_STATUSES
from .service import Dispatcher

__all__ = ["Make", "cmd_diff", "cmd_events", "cmd_insights", "cmd_logs", "cmd_watch"]

Make = Callable[[argparse.Namespace], Dispatcher]
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


def cmd_diff(args: argparse.Namespace, make: Make) -> int:
    """The branch's changes (as ``agentic_diff``): what is said about them, the stat, then the patch."""
    result = make(args).diff(args.workspace, args.stat, args.path)
    if args.json:
        emit(result, True)
        return 0
    said = [result.note] if result.note else []
    if result.checkpoint is not None:
        cp = result.checkpoint
        said.append(f"the branch ends in an automatic checkpoint ({cp.commit[:12]}, {cp.why}, {cp.at})")
    for line in said:
        print(f"# {line}")
    print(f"# {result.branch} against {result.base}")
    print(result.stat.rstrip("\n") or "(no changes)")
    if result.patch:
        print()
        print(result.patch.rstrip("\n"))
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
    """Per agent, the runs that finished in the last ``--days``: a table, or the report as JSON."""
    report = make(args).insights(args.days)
    if args.json:
        emit(report, True)
    else:
        print_insights(report)
    return 0
