"""Review: supervisor edge cases."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from test_serve_support import ServeProcess
from test_serve_workers import worker_pids

Serve = Callable[..., ServeProcess]


def test_worker_killed_by_realtime_signal_is_restarted(serve: Serve) -> None:
    """A worker ended by a signal that signal.Signals does not name (SIGRTMIN+6) is restarted
    like any other, with no traceback in the supervisor."""
    server = serve("--workers", "2")
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGRTMIN + 6)
    log = server.wait_log("event=listen worker=1", count=2)
    assert "Traceback" not in log


def test_group_sigterm_with_idle_workers_restarts_nothing(serve: Serve) -> None:
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process at once:
    idle workers drain at once and exit 0. The supervisor must not take that for a crash and
    restart (or count a restart of) any worker."""
    server = serve("--workers", "2")
    os.killpg(server.pid, signal.SIGTERM)
    assert server.proc.wait(10) == 0
    log = server.log()
    assert "restart_in" not in log, log
