"""Pieces of ``hopcat serve --workers``/``--metrics`` that need no process: the limits' split,
whole-line log writes, and the counters' layout and text."""

from __future__ import annotations

import select
import socket

from hopcat.server.cli import finish, parse_args
from hopcat.server.log import Logger
from hopcat.server.metrics import Store, render
from hopcat.server.workers import split_limits


def test_limits_split_by_ceiling() -> None:
    options = finish(parse_args(["--max-conns", "5", "--max-conns-per-client", "0",
                                 "--max-udp-per-client", "3", "--workers", "2"]))  # fmt: skip
    mine = split_limits(options, options.workers)
    assert (mine.max_conns, mine.max_conns_per_client, mine.max_udp_per_client) == (3, 0, 2)
    assert options.max_conns == 5  # the supervisor's copy is left alone


def test_log_writes_hold_whole_lines_up_to_pipe_buf() -> None:
    # SOCK_SEQPACKET keeps write boundaries, so each recv is exactly one write(2).
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        logger = Logger(fd=ours.fileno(), clock=lambda: 0.0)
        lines = 300
        for i in range(lines):  # what one event-loop iteration buffers
            logger._lines.append(f"line {i} " + "x" * (i % 97))
        logger.flush()
        writes = []
        theirs.setblocking(False)
        while True:
            try:
                writes.append(theirs.recv(1 << 16))
            except BlockingIOError:
                break
    assert len(writes) > 1
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
    assert b"".join(writes).decode().splitlines() == [
        f"line {i} " + "x" * (i % 97) for i in range(lines)
    ]


def test_log_fields_follow_the_event() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        Logger(fd=ours.fileno(), fields={"worker": 2}, clock=lambda: 0.0).log("reload", result="ok")
        assert theirs.recv(1000) == b"1970-01-01T00:00:00.000Z event=reload worker=2 result=ok\n"


def test_counters_sum_over_slots() -> None:
    store = Store(3)
    one, two = store.slot(0), store.slot(1)
    one.opened("socks5")
    two.opened("socks5")
    two.opened("weird")
    one.ended("ok", up=10, down=20)
    two.ended("denied")
    two.ended("never-heard-of")
    one.handshake(0.0001)
    two.handshake(30.0)
    store.slot(2).restarted()
    store.clear_gauges(1)
    text = render(store.totals(), supervised=True)
    assert 'hopcat_open_tunnels{protocol="socks5"} 1\n' in text
    assert 'hopcat_open_tunnels{protocol="other"} 0\n' in text
    assert 'hopcat_tunnels_total{result="ok"} 1\n' in text
    assert 'hopcat_tunnels_total{result="other"} 1\n' in text
    assert 'hopcat_bytes_total{direction="up"} 10\n' in text
    assert 'hopcat_rule_denials_total{rule="destination"} 1\n' in text
    assert 'hopcat_handshake_seconds_bucket{le="0.0005"} 1\n' in text
    assert 'hopcat_handshake_seconds_bucket{le="10.0"} 1\n' in text
    assert 'hopcat_handshake_seconds_bucket{le="+Inf"} 2\n' in text
    assert "hopcat_handshake_seconds_count 2\n" in text
    assert "hopcat_worker_restarts_total 1\n" in text
    assert "restarts" not in render(store.totals(), supervised=False)


def test_supervisor_exits_when_a_start_fails_after_a_clean_exit() -> None:
    """Before the start completed, worker 1 exits 0 (a SIGTERM sent to it alone: it drains)
    and _exited schedules its restart in CLEAN_EXIT_WAIT_S; then worker 2 fails to start
    (exit 70). The failure must drop the pending restart, or _maybe_done would wait for it
    forever: the supervisor exits (no worker left, no signal pending)."""
    import asyncio
    import os

    from hopcat.server import workers as workers_mod
    from hopcat.server.workers import Supervisor

    options = finish(parse_args(["--workers", "2", "-q"]))
    supervisor = Supervisor(options, startup=None, metrics_sock=None)  # type: ignore[arg-type]
    loop = supervisor.loop
    fds = []
    try:
        for i, worker in enumerate(supervisor.workers):
            r, w = os.pipe()
            fds.append(r)
            worker.pid, worker.control, worker.ready = 10_000 + i, w, True
        saved = workers_mod.CLEAN_EXIT_WAIT_S
        workers_mod.CLEAN_EXIT_WAIT_S = 0.05
        try:
            supervisor._exited(supervisor.workers[0], 0)  # drained on its own
            supervisor._exited(supervisor.workers[1], 70)  # the start fails
            try:
                code = loop.run_until_complete(asyncio.wait_for(supervisor.done, 1.0))
            except TimeoutError:
                code = None
        finally:
            workers_mod.CLEAN_EXIT_WAIT_S = saved
        assert code == 70, f"supervisor not done; restarts pending: {supervisor.restarts}"
    finally:
        for fd in fds:
            os.close(fd)
        loop.close()
