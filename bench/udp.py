#!/usr/bin/env python3
"""UDP benchmark: ``hopcat -u`` against ``nc.openbsd -u`` and socat, and ``hopcat serve``'s UDP
ASSOCIATE against Dante's (stdlib only).

Every run moves ``--count`` datagrams of one size (``--sizes``, default 1200 and a DNS-sized 60)
in one direction and counts what arrived: loss is measured, never assumed. Runs are closed-loop:
the sender keeps at most ``--window`` datagrams in flight (sent, not yet counted at the far
end), fewer than any socket buffer on the way holds, so the rate is what the relay sustains
rather than what an unpaced sender overflows. When nothing arrives for STALL_S the datagrams in
flight are written off for the window's sake (the loop goes on) and counted as lost at the end
unless they turn up.

Routes and directions:

direct up     a feeder writes each datagram into one end of an AF_UNIX SOCK_SEQPACKET socketpair
              whose other end is the tool's stdin, so every read(2) of the tool returns exactly
              one datagram (a pipe would let writes coalesce); the tool sends each read as one
              datagram to a UDP sink that counts datagrams and checks each one's size.
              hopcat -u H P / nc.openbsd -u -q 0 H P / socat -u STDIN UDP:H:P
direct down   the tool listens (its UDP socket found in /proc before anything is sent); a UDP
              source sends to it, the tool writes each datagram to its stdout pipe, where
              datagram boundaries are lost: bytes are counted, datagrams = bytes / size.
              hopcat -u -l H P / nc.openbsd -d -u -l H P / socat -u UDP-LISTEN:P,bind=H STDOUT
socks5 up     this script is the SOCKS5 client (TCP control connection, UDP ASSOCIATE announcing
              its UDP socket's address, then prebuilt RFC 1928 datagrams to the relay address of
              the reply) to a UDP sink that counts.
socks5 down   the client sends one datagram to the target through the relay; the target then
              sends the datagrams back to the relay's address it came from; the client counts
              what arrives, with a 10-byte header each.

The endpoints are one thread of this process (send, then drain with non-blocking reads), with
its CPU measured (RUSAGE_THREAD); the ``harness`` column shows whether it was the limit.

Reported per row (medians over interleaved repetitions, the starting row rotating):
datagrams/s and MB/s (10^6 bytes of payload per second) from the first arrival to the last, so
process start-up is not in them; loss % (the worst run in brackets); CPU per million datagrams:
for a tool its wait4 rusage over its whole life (start-up included) and "steady", its threads'
run time (/proc/PID/task/*/schedstat) between the first and the last arrival; for a server its
process group's utime+stime from /proc over the run (daemons.py), association set-up included.
Ratios are against nc.openbsd (direct) and Dante (socks5) in the same run.

Usage:
    python3 bench/udp.py                              # full: 100000 datagrams, 1200 and 60 B, 3 reps
    python3 bench/udp.py --count 2000 --reps 1        # a check that it works
    python3 bench/udp.py --tools hopcat,nc --servers none --sizes 60 --json /tmp/udp.json
    python3 bench/udp.py --tools none --servers hopcat,dante --window 64

Progress goes to stderr, the Markdown report to stdout. Numbers on a shared 2-core machine are
noisy: compare within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from harness import daemons
from harness.common import (
    HOST,
    log,
    machine_line,
    machine_meta,
    md_table,
    median,
    rotated,
    stop_on_signals,
    write_json,
)
from harness.endpoints import recv_exact, set_rcvbuf
from harness.procs import Exit, kill_and_reap, read_tail, reap_all, spawn, thread_cpu, wait_exit
from harness.tools import hopcat_command

STALL_S = 0.25  # nothing arrived for this long: the datagrams in flight are written off
FIRST_TIMEOUT_S = 10.0  # for the first datagram: the tool's start-up (Python) comes first
READY_TIMEOUT_S = 10.0  # a listening tool's UDP socket must appear within this
EXIT_TIMEOUT_S = 1.0  # a tool given stdin EOF (up) or SIGTERM (down) gets this long to exit
SINK_RCVBUF = 32 << 20  # the sink's socket buffer: it never drops what the window lets through
DRAIN_BUFFER = bytearray(1 << 20)
HEADER_V4 = 10  # RFC 1928 section 7: RSV(2) FRAG(1) ATYP(1) IPv4(4) PORT(2)
TOOLS = {"hopcat": "hopcat", "nc": "nc.openbsd", "socat": "socat"}
SERVERS = {"dante": "dante-udp", "hopcat": "hopcat"}  # --servers name -> daemons.SERVERS key
SERVER_NAMES = {"dante": "Dante", "hopcat": "hopcat serve"}
REPLY_TEXT = {
    1: "general failure",
    2: "not allowed by ruleset",
    7: "command not supported",
    8: "address type not supported",
}


class Unavailable(Exception):
    """The row cannot run on this build (hopcat -u refused, UDP ASSOCIATE not supported)."""


@dataclass
class Run:
    route: str  # direct, socks5
    who: str  # tool (direct) or server (socks5) key
    direction: str  # up, down
    size: int
    rep: int  # 0: the warm-up run
    sent: int = 0
    received: int = 0
    datagrams: int = 0  # on the wire at the far end (up, socks5); 0 where a pipe hides them
    wrong_size: int = 0  # of those, not of the size sent: reads merged or split
    span: float = 0.0  # first arrival to last arrival
    cpu: float | None = None  # tool: wait4 user+sys; server: process group over the run
    steady_cpu: float | None = None  # tool: /proc utime+stime, first to last arrival
    harness_cpu: float = 0.0  # the endpoint thread over the loop
    stalls: int = 0
    ok: bool = False
    error: str | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return (self.received - 1) / self.span if self.span > 0 and self.received > 1 else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 1.0


# --------------------------------------------------------------------------- the loop


def closed_loop(
    run: Run,
    count: int,
    window: int,
    send_one: Callable[[], object],
    fd: int,
    drain: Callable[[], int],
    on_first: Callable[[], None] = lambda: None,
) -> None:
    """Send ``count`` datagrams keeping at most ``window`` in flight; ``drain()`` returns the
    total counted at the far end so far (it reads ``fd`` without blocking).

    Invariant: ``sent - received - written_off`` is the number in flight, at most ``window``.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    sent = received = written_off = 0
    t_first = t_last = 0.0
    cpu0 = thread_cpu()
    while received < count:
        burst = min(window - (sent - received - written_off), count - sent)
        for _ in range(burst):
            send_one()
        sent += max(burst, 0)
        timeout = STALL_S if received else FIRST_TIMEOUT_S
        if not poller.poll(timeout * 1000):
            if sent == count or not received:
                break  # the rest is lost, or nothing gets through at all
            written_off = sent - received
            run.stalls += 1
            continue
        now = received
        received = drain()
        if received > now:
            t_last = time.perf_counter()
            if not now:
                t_first = t_last
                on_first()
    run.harness_cpu = thread_cpu() - cpu0
    run.sent, run.received, run.span = sent, received, t_last - t_first


def udp_socket(rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        set_rcvbuf(sock, rcvbuf)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def datagram_counter(
    sock: socket.socket, size: int, run: Run, overhead: int = 0
) -> Callable[[], int]:
    """A drain for a UDP socket: reads datagrams until none is waiting and returns the payload
    bytes so far over ``size`` (the datagrams' worth that arrived, whatever their boundaries);
    run.datagrams counts those on the wire, run.wrong_size those not ``size`` + ``overhead``
    bytes long. MSG_TRUNC: recv returns the real length and copies little."""
    recv_into, trunc, want = sock.recv_into, socket.MSG_TRUNC, size + overhead
    payload = 0

    def drain() -> int:
        nonlocal payload
        while True:
            try:
                n = recv_into(DRAIN_BUFFER, 64, trunc)
            except BlockingIOError:
                return payload // size
            run.datagrams += 1
            payload += n - overhead
            if n != want:
                run.wrong_size += 1

    return drain


# --------------------------------------------------------------------------- direct


def proc_cpu(pid: int) -> float | None:
    """CPU seconds of ``pid`` so far, to the nanosecond: the run time of each of its threads
    (/proc/PID/task/*/schedstat, first field), where utime+stime would count 10 ms ticks."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError):
        return None
    return total / 1e9


def udp_bound(pid: int, port: int) -> bool:
    """True when process ``pid`` holds a UDP socket bound to ``port`` (/proc/net/udp)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[9] in inodes:
                return True
    return False


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tool_argv(key: str, base: list[str], direction: str, port: int) -> list[str]:
    if direction == "up":
        return {
            "hopcat": [*base, "-u", HOST, str(port)],
            "nc": [*base, "-u", "-q", "0", HOST, str(port)],  # -q 0: exit at stdin EOF
            "socat": [*base, "-u", "STDIN", f"UDP:{HOST}:{port}"],
        }[key]
    return {
        "hopcat": [*base, "-u", "-l", HOST, str(port)],
        "nc": [*base, "-d", "-u", "-l", HOST, str(port)],
        "socat": [*base, "-u", f"UDP-LISTEN:{port},bind={HOST}", "STDOUT"],
    }[key]


def run_direct(run: Run, base: list[str], env: dict[str, str], count: int, window: int) -> None:
    """One run of a tool between its endpoints; its stderr is kept for the failure message."""
    with tempfile.TemporaryFile() as errf:
        pids: list[int] = []  # the tool, until it is reaped
        try:
            move = move_up if run.direction == "up" else move_down
            ex, steady = move(run, base, env, count, window, errf, pids)
            pids.clear()
        finally:
            for pid in pids:
                kill_and_reap(pid)
        run.cpu = ex.rusage.ru_utime + ex.rusage.ru_stime
        run.steady_cpu = steady
        errors = []
        # UDP has no end: a tool may wait for replies after stdin EOF, as nc.openbsd does
        # without -q, so one still running is stopped, not failed. Down: stopped with SIGTERM.
        if run.direction == "up" and not ex.timed_out and ex.status != 0:
            errors.append(f"exit status {ex.status}")
        if run.received == 0:
            errors.append("nothing arrived")
        if errors and (tail := read_tail(errf)):
            errors.append(f"stderr: {tail}")
        run.error = "; ".join(errors) or None
        run.ok = not errors


def move_up(
    run: Run, base: list[str], env: dict[str, str], count: int, window: int, errf: IO[bytes],
    pids: list[int],
) -> tuple[Exit, float | None]:  # fmt: skip
    """Feeder -> SEQPACKET stdin -> tool -> UDP sink; the tool's exit and steady CPU."""
    payload = bytes(run.size)
    with udp_socket(SINK_RCVBUF) as sink:
        feed, tool_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with feed:
            run.argv = tool_argv(run.who, base, "up", sink.getsockname()[1])
            null = os.open(os.devnull, os.O_WRONLY)
            pid = spawn(run.argv, env, tool_in.fileno(), null, errf.fileno())
            pids.append(pid)
            os.close(null)
            tool_in.close()
            cpu0 = None

            def mark() -> None:
                nonlocal cpu0
                cpu0 = proc_cpu(pid)

            send = partial(feed.send, payload)
            drain = datagram_counter(sink, run.size, run)
            closed_loop(run, count, window, send, sink.fileno(), drain, mark)
            cpu1 = proc_cpu(pid)
        # The feeder's end is closed: stdin EOF, and the tool should exit.
    steady = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return wait_exit(pid, EXIT_TIMEOUT_S), steady


def move_down(
    run: Run, base: list[str], env: dict[str, str], count: int, window: int, errf: IO[bytes],
    pids: list[int],
) -> tuple[Exit, float | None]:  # fmt: skip
    """UDP source -> listening tool -> stdout pipe counted in bytes; the tool's stdin stays
    open. The tool's exit (a UDP listener never sees an end: SIGTERM) and steady CPU."""
    payload, port = bytes(run.size), free_udp_port()
    run.argv = tool_argv(run.who, base, "down", port)
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    try:
        pid = spawn(run.argv, env, in_r, out_w, errf.fileno())
        pids.append(pid)
        os.close(out_w)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not udp_bound(pid, port):
            if time.monotonic() > deadline or os.waitpid(pid, os.WNOHANG)[0]:
                pids.clear()
                raise RuntimeError(f"no UDP socket on port {port}: {read_tail(errf)}")
            time.sleep(0.01)
        os.set_blocking(out_r, False)
        nbytes = 0

        def drain() -> int:
            nonlocal nbytes
            with contextlib.suppress(BlockingIOError):
                while n := os.readv(out_r, [DRAIN_BUFFER]):
                    nbytes += n
            return nbytes // run.size

        cpu0 = None

        def mark() -> None:
            nonlocal cpu0
            cpu0 = proc_cpu(pid)

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            source.connect((HOST, port))
            closed_loop(run, count, window, partial(source.send, payload), out_r, drain, mark)
        cpu1 = proc_cpu(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        steady = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        return wait_exit(pid, EXIT_TIMEOUT_S), steady
    finally:
        for fd in (out_r, in_r, in_w):
            os.close(fd)


def probe_hopcat_udp(base: list[str], env: dict[str, str]) -> str | None:
    """Why ``hopcat -u`` cannot run (it refuses the option: exit 64), or None."""
    try:
        done = subprocess.run(
            [*base, "-u", HOST, "9"],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=2,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode == os.EX_USAGE:
        line = done.stderr.decode(errors="replace").strip().splitlines()
        return f"hopcat -u refused (exit 64: {line[0] if line else ''})"
    return None


# --------------------------------------------------------------------------- through SOCKS5


def udp_associate(server_port: int, announce: tuple[str, int]) -> tuple[socket.socket, Any]:
    """The control connection and the relay's address; Unavailable on reply 7."""
    ctrl = socket.create_connection((HOST, server_port), timeout=10)
    ctrl.sendall(b"\x05\x01\x00")
    if recv_exact(ctrl, 2) != b"\x05\x00":
        raise ConnectionError("no acceptable method")
    port = announce[1].to_bytes(2, "big")
    ctrl.sendall(b"\x05\x03\x00\x01" + socket.inet_aton(announce[0]) + port)
    _ver, reply, _rsv, atyp = recv_exact(ctrl, 4)
    if reply:
        ctrl.close()
        text = f"UDP ASSOCIATE refused: {REPLY_TEXT.get(reply, 'error')} (reply {reply})"
        raise (Unavailable if reply == 7 else ConnectionError)(text)
    if atyp == 1:
        host = socket.inet_ntoa(recv_exact(ctrl, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(ctrl, 16))
    else:
        host = recv_exact(ctrl, recv_exact(ctrl, 1)[0]).decode()
    relay_port = int.from_bytes(recv_exact(ctrl, 2), "big")
    if host in ("0.0.0.0", "::"):  # RFC 1928: the server's own address
        host = HOST
    return ctrl, (host, relay_port)


def run_socks(run: Run, daemon: daemons.Daemon, count: int, window: int) -> None:
    size = run.size
    payload = bytes(size)
    client = udp_socket(SINK_RCVBUF)
    target = udp_socket(SINK_RCVBUF)
    ctrl = None
    try:
        ctrl, relay = udp_associate(daemon.port, client.getsockname())
        thost, tport = target.getsockname()
        header = b"\x00\x00\x00\x01" + socket.inet_aton(thost) + tport.to_bytes(2, "big")
        packet = header + payload
        # Connected sockets: send() skips parsing an address per datagram (a sixth of the cost
        # of a Python sendto here), and replies come from the relay address anyway.
        client.connect(relay)
        cpu0 = daemon.cpu()
        if run.direction == "up":
            send = partial(client.send, packet)
            closed_loop(
                run, count, window, send, target.fileno(), datagram_counter(target, size, run)
            )
        else:
            # One datagram out first: it opens the way back and shows where replies go to.
            client.send(packet)
            if not select.select([target], [], [], FIRST_TIMEOUT_S)[0]:
                raise ConnectionError("the first datagram never reached the target")
            target.connect(target.recvfrom(65536)[1])
            drain = datagram_counter(client, size, run, HEADER_V4)
            closed_loop(run, count, window, partial(target.send, payload), client.fileno(), drain)
        run.cpu = daemon.cpu() - cpu0
        errors = []
        if run.received == 0:
            errors.append("nothing arrived")
        if run.wrong_size:
            errors.append(f"{run.wrong_size} datagram(s) of the wrong size")
        if daemon.returncode is not None:
            errors.append(f"the server exited (status {daemon.returncode}): {daemon.log_tail()}")
        run.error = "; ".join(errors) or None
        run.ok = not errors
    finally:
        if ctrl is not None:
            ctrl.close()
        client.close()
        target.close()


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Case:
    route: str
    who: str
    direction: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.route} {self.who} {self.direction} {self.size} B"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=100_000, help="datagrams per run (100000)")
    ap.add_argument("--sizes", "--size", default="1200,60", help="payload bytes (1200,60)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    ap.add_argument("--window", type=int, default=32, help="datagrams in flight at most (32)")
    ap.add_argument("--tools", default="hopcat,nc,socat", help="direct rows, or none")
    ap.add_argument("--servers", default="hopcat,dante", help="SOCKS5 rows, or none")
    ap.add_argument("--only", default="up,down", help="directions (up,down)")
    ap.add_argument("--hopcat", metavar="CMD", help="hopcat command (see bench/README.md)")
    ap.add_argument("--hopcat-args", default="", help="extra options for hopcat serve")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    ap.add_argument("--json", metavar="FILE", help="also write the raw runs as JSON")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    directions = [d for d in args.only.split(",") if d in ("up", "down")]
    tools = [t for t in args.tools.split(",") if t and t != "none"]
    servers = [s for s in args.servers.split(",") if s and s != "none"]
    for name, known in [*((t, TOOLS) for t in tools), *((s, SERVERS) for s in servers)]:
        if name not in known:
            ap.error(f"unknown {name!r} (choose from {', '.join(known)})")
    meta = machine_meta()
    unavailable: dict[tuple[str, str], str] = {}
    bases: dict[str, tuple[list[str], dict[str, str]]] = {}
    for tool in tools:
        if tool == "hopcat":
            argv, env, missing = hopcat_command(args.hopcat)
            why = missing if argv is None else probe_hopcat_udp(argv, env)
        else:
            path = shutil.which(TOOLS[tool])
            argv, env, why = ([path] if path else None), {}, (None if path else "not installed")
        if why or argv is None:
            unavailable["direct", tool] = why or "not found"
            log(f"direct {tool}: not available: {why}")
        else:
            bases[tool] = (argv, env)
    cases = [
        Case("direct", t, d, s) for t in tools if t in bases for d in directions for s in sizes
    ]
    cases += [Case("socks5", s, d, z) for s in servers for d in directions for z in sizes]
    runs: list[Run] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hopcat-bench-udp-") as tmp, stop_on_signals():
        try:
            for rep in range(0 if args.no_warmup else -1, args.reps):  # -1: the warm-up
                started: dict[str, daemons.Daemon] = {}  # fresh servers for each repetition
                try:
                    for case in rotated(cases, max(rep, 0)):
                        if (case.route, case.who) in unavailable:
                            continue
                        try:
                            run = run_case(case, rep, args, bases, started, Path(tmp))
                        except Unavailable as exc:
                            unavailable[case.route, case.who] = str(exc)
                            log(f"{case.route} {case.who}: not available: {exc}")
                            continue
                        if rep >= 0:
                            runs.append(run)
                            if not run.ok:
                                failures.append(f"rep {rep + 1} {case.label}: {run.error}")
                        step = "warm-up" if rep < 0 else f"rep {rep + 1}"
                        log(f"{step} {case.label}: {describe(run)}")
                finally:
                    for daemon in started.values():
                        daemon.stop()
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: report what was measured
            failures.append(f"interrupted ({exc or 'SIGINT'})")
        finally:
            reap_all()
    print(report(runs, cases, unavailable, args, meta, failures))
    write_json(
        args.json,
        {
            "meta": meta,
            "args": vars(args),
            "unavailable": {" ".join(k): v for k, v in unavailable.items()},
            "runs": [asdict(r) | {"rate": r.rate, "loss": r.loss} for r in runs],
        },
    )
    return 1 if failures else 0


def run_case(
    case: Case,
    rep: int,
    args: argparse.Namespace,
    bases: dict[str, tuple[list[str], dict[str, str]]],
    started: dict[str, daemons.Daemon],
    work: Path,
) -> Run:
    """One run of ``case`` (the warm-up when rep < 0: 1,000 datagrams at most); a server is
    started on first use in the repetition. Unavailable when the row cannot run at all."""
    run = Run(case.route, case.who, case.direction, case.size, rep + 1)
    count = min(args.count, 1000) if rep < 0 else args.count
    try:
        if case.route == "direct":
            argv, env = bases[case.who]
            run_direct(run, argv, env, count, args.window)
            return run
        if case.who not in started:
            workdir = work / f"{case.who}-{rep + 1}"
            started[case.who] = daemons.start(SERVERS[case.who], workdir, args.hopcat_args.split())
        run_socks(run, started[case.who], count, args.window)
    except (OSError, RuntimeError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    return run


def describe(run: Run) -> str:
    if run.error and not run.received:
        return f"FAIL: {run.error}"
    text = (
        f"{run.rate:9.0f} dgram/s  {run.rate * run.size / 1e6:7.1f} MB/s  "
        f"loss {run.loss * 100:.2f}% ({run.received}/{run.sent})  stalls {run.stalls}"
    )
    if run.cpu is not None and run.received:
        text += f"  CPU {run.cpu / run.received * 1e6:.2f} s/M"
    return text + (f"  FAIL: {run.error}" if run.error else "")


# --------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def busy(run: Run) -> float:
    """CPU over the span between first and last arrival: a tool's steady CPU; a server's CPU
    over its run (the association's set-up is a few ms of it)."""
    return run.steady_cpu if run.steady_cpu is not None else run.cpu or 0.0


def summarize(rows: list[Run]) -> dict[str, float | None]:
    good = [r for r in rows if r.received > 1]
    if not good:
        return {}

    def per_million(values: list[float | None], runs: list[Run]) -> float | None:
        pairs = [v / r.received * 1e6 for v, r in zip(values, runs, strict=True) if v is not None]
        return median(pairs) if pairs else None

    return {
        "rate": median([r.rate for r in good]),
        "rate_min": min(r.rate for r in good),
        "rate_max": max(r.rate for r in good),
        "mbps": median([r.rate * r.size / 1e6 for r in good]),
        "loss": median([r.loss for r in rows]),
        "loss_max": max(r.loss for r in rows),
        "cpu_m": per_million([r.cpu for r in good], good),
        "steady_m": per_million([r.steady_cpu for r in good], good),
        "core": median(cores) if (cores := [busy(r) / r.span for r in good if busy(r)]) else None,
        "harness": median([r.harness_cpu / r.span for r in good if r.span > 0]),
        "wrong": median([r.wrong_size / r.datagrams for r in good if r.datagrams])
        if any(r.datagrams for r in good)
        else None,
        "ok": float(sum(r.ok for r in rows)),
        "n": float(len(rows)),
    }


HEADERS = ["dir", "size B", "dgrams/s", "range", "MB/s", "loss % (worst)", "CPU-s/M dgrams",
           "steady CPU-s/M", "%core", "harness %core", "wrong size", "rate vs {b}", "CPU vs {b}",
           "ok"]  # fmt: skip
LEGENDS = {
    "direct": "CPU-s/M dgrams: the tool's wait4 user+sys over its life per million datagrams "
    "(start-up included); steady: its run time between the first and the last arrival "
    "(schedstat), per million, which the CPU ratio compares; %core: steady CPU over that span; "
    "wrong size: datagrams that reached the sink with another size than written (up only; "
    "nc.openbsd sends two queued writes as one datagram, see bench/README.md; rates count "
    "payload in datagrams' worth).",
    "socks5": "CPU-s/M dgrams: the server's process group (utime+stime from /proc, 10 ms "
    "ticks) over the run, per million datagrams; %core: that CPU over the first-to-last span.",
}


def table_row(case: Case, s: dict[str, float | None], b: dict[str, float | None]) -> list[str]:
    """One row of a report table: ``s`` the row's summary, ``b`` its baseline's (nc, Dante)."""
    name = TOOLS[case.who] if case.route == "direct" else SERVER_NAMES[case.who]
    if not s:
        return [name, case.direction, str(case.size), *["-"] * (len(HEADERS) - 3), "FAIL"]
    rate, base_rate = s["rate"] or 0.0, b.get("rate")
    # A tool's start-up is not per datagram: tools are compared on their steady CPU.
    key = "steady_m" if case.route == "direct" else "cpu_m"
    mine, theirs = s.get(key), b.get(key)

    def percent(x: float | None, digits: int = 0) -> str:
        return "-" if x is None else f"{x * 100:.{digits}f}%"

    return [
        name,
        case.direction,
        str(case.size),
        fmt(rate),
        f"{fmt(s['rate_min'])}-{fmt(s['rate_max'])}",
        fmt(s["mbps"], 1),
        f"{(s['loss'] or 0) * 100:.2f} ({(s['loss_max'] or 0) * 100:.2f})",
        fmt(s["cpu_m"]),
        fmt(s["steady_m"]),
        percent(s["core"]),
        percent(s["harness"]),
        percent(s["wrong"]),
        f"{rate / base_rate:.2f}x" if base_rate else "-",
        f"{mine / theirs:.2f}x" if mine is not None and theirs else "-",
        f"{s['ok']:.0f}/{s['n']:.0f}",
    ]


def report(
    runs: list[Run],
    cases: list[Case],
    unavailable: dict[tuple[str, str], str],
    args: argparse.Namespace,
    meta: dict[str, Any],
    failures: list[str],
) -> str:
    lines = [
        "# hopcat UDP benchmark",
        "",
        f"- command: `{meta['command']}`",
        machine_line(meta),
        f"- {args.count} datagrams per run, at most {args.window} in flight, {args.reps} "
        "interleaved rep(s); medians; MB/s = 10^6 payload bytes per second, first to last "
        "arrival",
    ]
    lines += [f"- {route} {who}: not available: {why}" for (route, who), why in unavailable.items()]
    if any(c.route == "socks5" for c in cases) and (version := daemons.version("dante-udp")):
        lines.append(f"- Dante {version}")
    summaries = {
        case: summarize([r for r in runs if Case(r.route, r.who, r.direction, r.size) == case])
        for case in cases
        if (case.route, case.who) not in unavailable
    }
    for route, base, title in (
        ("direct", "nc", "## Direct: stdin -> tool -> UDP (up), UDP -> tool -> stdout (down)"),
        ("socks5", "dante", "## Through a SOCKS5 server's UDP ASSOCIATE"),
    ):
        rows = [
            table_row(case, s, summaries.get(Case(route, base, case.direction, case.size)) or {})
            for case, s in summaries.items()
            if case.route == route
        ]
        if rows:
            who = "tool" if route == "direct" else "server"
            headers = [who, *(h.format(b="nc" if base == "nc" else "Dante") for h in HEADERS)]
            lines += ["", title, "", LEGENDS[route], ""]
            lines.append(md_table(headers, rows, right=set(range(2, len(headers)))))
    lines += ["", *targets(summaries)]
    if failures:
        lines += ["", "Failures:", *(f"- {f}" for f in failures)]
    return "\n".join(lines) + "\n"


def targets(summaries: dict[Case, dict[str, float | None]]) -> list[str]:
    """The issue's targets: direct at least nc's rate; serve at least Dante's rate at no more
    CPU per datagram."""
    out = ["Targets (issue 14, same run):"]
    for case, s in summaries.items():
        if case.who != "hopcat" or not s:
            continue
        base = Case(
            case.route, "nc" if case.route == "direct" else "dante", case.direction, case.size
        )
        b = summaries.get(base) or {}
        if not b.get("rate"):
            continue
        checks = [("rate", (s["rate"] or 0) >= (b["rate"] or 0))]
        if case.route == "socks5" and s.get("cpu_m") is not None and b.get("cpu_m") is not None:
            checks.append(("CPU/dgram", (s["cpu_m"] or 0) <= (b["cpu_m"] or 0)))
        verdict = ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in checks)
        out.append(
            f"- {case.route} {case.direction} {case.size} B: hopcat {fmt(s['rate'])} "
            f"vs {fmt(b['rate'])} dgrams/s: {verdict}"
        )
    return out if len(out) > 1 else []


if __name__ == "__main__":
    sys.exit(main())
