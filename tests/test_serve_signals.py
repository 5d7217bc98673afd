"""`agentic-dispatch serve` and the stop signals: SIGTERM or SIGINT ends it with exit 0 at any moment its own
code runs, from its first line on, and it says when it is ready so that nobody has to guess."""

from __future__ import annotations

import os
import signal

import pytest

from .conftest import SERVE_READY, spawn_serve

STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_sent_the_moment_serve_is_spawned_ends_it_with_exit_0_before_it_serves(
    sig: signal.Signals,
) -> None:
    """No waiting: the signal goes out as soon as the process exists. The parent spawns it with the signal
    blocked (a mask survives exec), so the kernel holds it until serve unblocks it, right after its handlers
    are in place. Without that, the signal would land while the interpreter itself starts, where no handler
    of any program can run yet, and the default action would end the process (-15, or 130 for SIGINT)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        proc, log = spawn_serve(dict(os.environ))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    log.wait_for(f"{sig.name}: shutting down", 10)
    assert not any(SERVE_READY in line for line in log.lines), "it stopped before serving, with nothing to close"


@pytest.mark.docker
@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_serve_says_it_is_ready_and_a_stop_signal_then_ends_it_with_exit_0_and_a_shutdown_line(
    sig: signal.Signals, docker_env: str
) -> None:
    proc, log = spawn_serve(dict(os.environ))
    log.wait_for(SERVE_READY, 60)
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    assert "running agents keep running" in log.wait_for(f"{sig.name}: shutting down", 10)
