#!/usr/bin/env python3
"""Proxy-server benchmark: ``hopcat serve`` against Dante, microsocks, tinyproxy and pproxy.

Every server is started fresh on a free 127.0.0.1 port (config and log in a temp dir, its own
session so its whole process tree is accounted and stopped), measured, and stopped; repetitions
are interleaved (rep 1: every server, rep 2: every server in a rotated order, ...) and the report
shows medians. SOCKS5 is spoken to every server but tinyproxy (HTTP CONNECT).

Measurements (``--only``, default all):

single    one stream up (client -> target) and one down, ``--size`` bytes each. The client cannot
          be the bottleneck: it sends with sendfile(2) from a memfd and receives with
          recv(MSG_TRUNC) (the kernel discards, nothing is copied); the target does the same. The
          8-byte length goes first so no side depends on how a proxy passes a FIN. Reported: MB/s
          (10^6 bytes/s) and the proxy's CPU seconds per GiB (utime+stime of its process tree
          from /proc, children included).
aggregate ``--streams`` concurrent down streams of ``--stream-size`` each (sendfile / MSG_TRUNC,
          one thread per stream: the syscalls release the GIL): total MB/s and CPU-s/GiB.
tps       new tunnels per second: ``--inflight`` (16) at once, each connect, handshake, read the
          target's banner, close (the target closes first, the client after it has seen the
          end), for ``--tps-seconds``. Client: one thread, non-blocking sockets, requests
          prebuilt; banner target: a separate process with a selectors loop.
idle      memory per idle established tunnel: on a second fresh instance, open ``--idle``
          tunnels (banner read, then left open), and report the growth of the proxy's PSS
          (/proc/PID/smaps_rollup, summed over its process tree) divided by the count, in KiB.
          The descriptor limit is raised to the hard limit for the run (inherited by the
          servers). Kernel socket buffers are not in PSS; pipes are kernel memory too.
stall     kernel memory one stalled download pins (issue 8, rule 17): on a fresh instance, a
          target sends without end, the client reads ``--stall-warm`` at full speed (autotuning
          grows the buffers), then stops reading. After ``STALL_SETTLE_S`` the report sums, over
          the proxy's process group, every TCP socket's receive and send queue (``ss -tmp``
          skmem r + w) and the bytes held in its pipes, in MiB.

fwd       plain HTTP forwarding (``GET http://...`` to the proxy; hopcat, tinyproxy and pproxy
          with ``-l http://``; the SOCKS-only servers are skipped): requests per second with
          ``--inflight`` clients for ``--fwd-seconds``, each request answered with
          ``--fwd-body`` bytes, keep-alive (the next request on the same connection, as long as
          the proxy keeps it) and not (``Connection: close``, a new connection each); then one
          download and one upload (POST with Content-Length) of ``--fwd-size``, in MB/s. The
          origin is a separate process, a thread per connection, sendfile for bodies.

``hopcat-w`` is hopcat serve with ``--workers auto`` (one worker per CPU it may use), so the
multi-core figure stands next to the one-process ``hopcat``; both run on uvloop when the
interpreter has it. pproxy comes from PyPI into ``bench/.venv-pproxy`` (created on first use with pip). The
``hopcat-uvloop`` server (not in the default list) runs hopcat from ``bench/.venv-uvloop``
with uvloop installed there.

Usage:
    python3 bench/serve.py                       # full: 1 GiB, 3 reps, 64x64 MiB, 10 s, 2000 idle
    python3 bench/serve.py --size 64M --reps 1 --stream-size 4M --tps-seconds 2 --idle 300
    python3 bench/serve.py --servers hopcat,dante --only single,tps --json out.json
    python3 bench/serve.py --servers hopcat,hopcat-uvloop --hopcat-args="-q" --only tps
    python3 bench/serve.py --only stall --reps 3
    python3 bench/serve.py --servers hopcat,tinyproxy,pproxy --only fwd
    python3 bench/serve.py --servers hopcat --only fwd --reps 1 --fwd-seconds 1 --fwd-size 8M
    python3 bench/serve.py --servers hopcat --only stall --hopcat-args="--max-receive-buffer 0"

Progress goes to stderr, a Markdown report to stdout. Numbers on a shared 2-core machine are
noisy: compare within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from harness import daemons
from harness.common import HOST, GiB, MiB, log, md_table, median, parse_size, rotated, write_json
from harness.endpoints import BANNER, recv_discard, recv_exact, send_zeros, zero_memfd

BANNER_PORTS = 32  # target ports the tps client rotates over (see banner_target_main)
CLIENT_ADDRESSES = 32  # and 127.0.0.1..127.0.0.32 as its source addresses
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TRUNC_BUFFER = bytearray(4 * MiB)  # MSG_TRUNC never writes into it; recv_into needs one
DEFAULT_SERVERS = "hopcat,hopcat-w,dante,microsocks,tinyproxy,pproxy"
FORWARDING = {"hopcat": "hopcat", "hopcat-w": "hopcat-w", "hopcat-uvloop": "hopcat-uvloop",
              "tinyproxy": "tinyproxy", "pproxy": "pproxy-http"}  # fmt: skip
STALL_SETTLE_S = 3.0
STALL_SIZE = 1 << 50  # "without end": the target is stopped by the proxy going away
_SKMEM = re.compile(r"users:\(\(.*?pid=(\d+),.*?skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+)")


# --------------------------------------------------------------------------- client side


def handshake_bytes(protocol: str, port: int) -> tuple[list[bytes], list[int]]:
    """What the client sends, step by step, and how many reply bytes each step waits for."""
    if protocol == "socks5":
        request = b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + port.to_bytes(2, "big")
        return [b"\x05\x01\x00", request], [2, 10]
    line = f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    return [line], [-1]  # -1: up to the end of the response head


def open_tunnel(
    proxy_port: int, protocol: str, target_port: int, timeout: float = 10
) -> socket.socket:
    sock = socket.create_connection((HOST, proxy_port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sends, replies = handshake_bytes(protocol, target_port)
    for data, size in zip(sends, replies, strict=True):
        sock.sendall(data)
        if size > 0:
            got = recv_exact(sock, size)
            if got[1] != 0 and len(got) == 10:
                raise ConnectionError(f"SOCKS5 reply {got[1]}")
        else:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)  # byte by byte: the target's bytes must stay in the socket
                if not chunk:
                    raise ConnectionError("proxy closed during the handshake")
                head += chunk
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                raise ConnectionError(f"proxy answered {head.splitlines()[0]!r}")
    return sock


def discard(sock: socket.socket, total: int) -> int:
    return recv_discard(sock, TRUNC_BUFFER, total, socket.MSG_TRUNC)


class StreamTarget:
    """Per connection: read a 12-byte header (4-byte stream id, direction byte, 7-byte length),
    then either discard that many bytes (up) or, after one more "go" byte, send that many
    (down); record when the last byte arrived (up). The "go" byte lets the aggregate run start
    every stream at once without bytes piling up in the proxy before the clock starts."""

    def __init__(self, zeros: int) -> None:
        self.zeros = zeros
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.port = int(self.listener.getsockname()[1])
        self.finished: dict[int, tuple[float, int]] = {}  # stream id -> (time, bytes)
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                header = recv_exact(conn, 12)
                stream, direction, size = (
                    int.from_bytes(header[:4], "big"),
                    header[4],
                    int.from_bytes(header[5:], "big"),
                )
                if direction == 0:
                    moved = discard(conn, size)
                else:
                    recv_exact(conn, 1)  # "go"
                    send_zeros(conn.fileno(), self.zeros, size)
                    moved = size
                    recv_exact(conn, 1)  # the client's "done": close only after it has it all
            except OSError:
                moved, stream = -1, -1
            with self.cond:
                self.finished[stream] = (time.perf_counter(), moved)
                self.cond.notify_all()

    def wait(self, stream: int, timeout: float) -> tuple[float, int]:
        with self.cond:
            if not self.cond.wait_for(lambda: stream in self.finished, timeout):
                raise TimeoutError(f"stream {stream} did not finish")
            return self.finished.pop(stream)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def run_stream(
    daemon: daemons.Daemon,
    protocol: str,
    target: StreamTarget,
    stream: int,
    direction: int,
    size: int,
    zeros: int,
) -> tuple[float, float]:
    """One stream through the proxy; (seconds from tunnel-open to the last byte, bytes)."""
    sock = open_tunnel(daemon.port, protocol, target.port)
    with sock:
        sock.settimeout(None)
        header = stream.to_bytes(4, "big") + bytes((direction,)) + size.to_bytes(7, "big")
        sock.sendall(header + (b"g" if direction else b""))
        started = time.perf_counter()
        if direction == 0:
            send_zeros(sock.fileno(), zeros, size)
            ended, moved = target.wait(stream, 600)
        else:
            moved = discard(sock, size)
            ended = time.perf_counter()
            sock.sendall(b"k")
            target.wait(stream, 60)
    if moved != size:
        raise RuntimeError(f"{daemon.key}: stream moved {moved} of {size} bytes")
    return ended - started, float(moved)


_stream_ids = iter(range(1, 1 << 31))


def measure_single(
    daemon: daemons.Daemon, protocol: str, target: StreamTarget, zeros: int, size: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, direction in (("up", 0), ("down", 1)):
        cpu0 = daemon.cpu()
        seconds, moved = run_stream(
            daemon, protocol, target, next(_stream_ids), direction, size, zeros
        )
        cpu = daemon.cpu() - cpu0
        out[f"{name}_mbps"] = moved / seconds / 1e6
        out[f"{name}_cpu_per_gib"] = cpu / (moved / GiB)
    return out


def measure_aggregate(
    daemon: daemons.Daemon, protocol: str, target: StreamTarget, zeros: int, streams: int, size: int
) -> dict[str, float]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)
    done: list[float] = []

    def one() -> None:
        try:
            sock = open_tunnel(daemon.port, protocol, target.port)
            stream = next(_stream_ids)
            with sock:
                sock.settimeout(None)
                sock.sendall(stream.to_bytes(4, "big") + b"\x01" + size.to_bytes(7, "big"))
                barrier.wait(60)
                sock.sendall(b"g")
                if discard(sock, size) != size:
                    raise RuntimeError("short stream")
                done.append(time.perf_counter())
                sock.sendall(b"k")
                target.wait(stream, 60)
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    cpu0 = daemon.cpu()
    started = time.perf_counter()
    for thread in threads:
        thread.join(600)
    cpu = daemon.cpu() - cpu0
    if errors:
        raise RuntimeError(f"{daemon.key}: aggregate: {errors[0]!r}")
    total = streams * size
    seconds = max(done) - started
    return {"agg_mbps": total / seconds / 1e6, "agg_cpu_per_gib": cpu / (total / GiB)}


def banner_target_main(port_file: str) -> None:
    """Banner targets in their own process, on several ports.

    The first port holds connections open (send BANNER, close at the client's EOF): the idle
    test. The others send BANNER and close at once: the tunnels-per-second test. There the target
    closes first, so the TIME_WAIT state of every connection lands on a listening port (the
    target's, then the proxy's) and tens of thousands of short tunnels do not use up the
    ephemeral ports of 127.0.0.1, which would make proxies that bind before connecting (Dante)
    and the harness itself fail with EADDRINUSE after a few runs.
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    sel = selectors.DefaultSelector()
    ports = []
    for index in range(1 + BANNER_PORTS):
        listener = socket.create_server((HOST, 0), backlog=4096)
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, "hold" if index == 0 else "close")
        ports.append(str(listener.getsockname()[1]))
    Path(port_file + ".tmp").write_text(" ".join(ports))
    os.replace(port_file + ".tmp", port_file)
    while True:
        for key, _ in sel.select():
            if key.data in ("hold", "close"):
                listener = key.fileobj  # type: ignore[assignment]
                for _ in range(64):
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    try:
                        conn.send(BANNER)
                    except OSError:
                        conn.close()
                        continue
                    if key.data == "close":
                        conn.close()
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, None)
            else:
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()


class HelperProcess:
    """This script run again as a helper (``flag``: --banner-target, --http-origin), in a
    session of its own; it writes its port(s) to a file once it listens."""

    def __init__(self, workdir: Path, flag: str, what: str) -> None:
        port_file = workdir / f"{flag.strip('-')}.port"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, flag, str(port_file)], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.01)
        self.ports = [int(port) for port in port_file.read_text().split()]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class BannerTarget(HelperProcess):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "--banner-target", "banner target")
        self.port = self.ports[0]  # holds connections open
        self.ports = self.ports[1:]  # banner, then close


def measure_tps(
    daemon: daemons.Daemon, protocol: str, banner_ports: list[int], inflight: int, seconds: float
) -> dict[str, float]:
    """Tunnels per second with ``inflight`` at once: connect, handshake, banner, close.

    The target sends its banner and closes; the client reads the reply and the banner, then
    the end of stream, then closes (see banner_target_main for why the target closes first).
    The client ACKs at once (TCP_QUICKACK after every read): a proxy that leaves Nagle on
    would otherwise wait out our delayed ACK (40 ms) before the banner, which measures the
    client rather than the proxy.
    """
    plans = [handshake_bytes(protocol, port)[0] for port in banner_ports]
    wants = [2, 10 + len(BANNER)] if protocol == "socks5" else [-1]
    sel = selectors.DefaultSelector()
    completed = failed = 0
    errors: dict[str, int] = {}
    address = (HOST, daemon.port)
    launched = 0
    quickack = getattr(socket, "TCP_QUICKACK", None)

    def launch() -> None:
        nonlocal launched
        launched += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Choose the port at connect time, per 4-tuple, not at bind time (Linux).
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.0.{1 + launched % CLIENT_ADDRESSES}", 0))
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, os.strerror(code))
        plan = plans[(launched // CLIENT_ADDRESSES) % len(plans)]
        sel.register(sock, selectors.EVENT_WRITE, [0, b"", plan])  # [step, received, sends]

    for _ in range(inflight):
        launch()
    cpu0 = daemon.cpu()
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, events in sel.select(deadline - now):
            sock = key.fileobj
            state = key.data
            sends = state[2]
            try:
                if events & selectors.EVENT_WRITE:
                    sock.send(sends[0])  # type: ignore[union-attr]
                    sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                data = sock.recv(65536)  # type: ignore[union-attr]
                if quickack is not None and data:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)  # type: ignore[union-attr]
                if state[0] == len(sends):  # banner in: wait for the end the target started
                    if data:
                        raise ConnectionError(f"bytes after the banner: {data[:40]!r}")
                    completed += 1
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    launch()
                    continue
                if not data:
                    raise ConnectionError("closed")
                state[1] += data
                want = wants[state[0]]
                if want == -1:
                    end = state[1].find(b"\r\n\r\n")
                    complete = end != -1 and len(state[1]) >= end + 4 + len(BANNER)
                else:
                    complete = len(state[1]) >= want
                if not complete:
                    continue
                state[0] += 1
                if state[0] < len(sends):
                    state[1] = b""
                    sock.send(sends[state[0]])  # type: ignore[union-attr]
                    continue
                if not state[1].endswith(BANNER):
                    raise ConnectionError(f"bad answer {state[1][:40]!r}")
                continue  # then EOF
            except OSError as exc:
                failed += 1
                errors.setdefault(str(exc), 0)
                errors[str(exc)] += 1
            sel.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            launch()
    elapsed = time.perf_counter() - started
    cpu = daemon.cpu() - cpu0
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    if failed > completed // 100:
        raise RuntimeError(f"{daemon.key}: tps: {failed} failed, {completed} completed: {errors}")
    return {
        "tps": completed / elapsed,
        "tps_cpu_ms": cpu / max(completed, 1) * 1000,
        "tps_failed": float(failed),
    }


# --------------------------------------------------------------------------- HTTP forwarding


def http_origin_main(port_file: str) -> None:
    """The origin of the fwd runs: ``GET /N`` is answered with N zero bytes (Content-Length,
    sendfile), ``POST`` bodies (Content-Length) are discarded and answered with an empty 200;
    keep-alive unless the request says ``Connection: close``. A thread per connection."""
    zeros = zero_memfd()
    listener = socket.create_server((HOST, 0), backlog=4096)
    Path(port_file + ".tmp").write_text(str(listener.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                fields = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                length = int(fields.get("content-length", "0"))
                body, buf = buf[:length], buf[length:]
                if len(body) < length:
                    recv_discard(conn, TRUNC_BUFFER, length - len(body), socket.MSG_TRUNC)
                size = int(path.rsplit("/", 1)[1] or 0) if method == "GET" else 0
                closing = fields.get("connection", "").lower() == "close"
                answer = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                answer += "Connection: close\r\n\r\n" if closing else "\r\n"
                conn.sendall(answer.encode())
                if size:
                    send_zeros(conn.fileno(), zeros, size)
                if closing:
                    return

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class HttpOrigin(HelperProcess):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "--http-origin", "HTTP origin")
        self.port = self.ports[0]


def _response_end(data: bytes | bytearray) -> tuple[int, bool] | None:
    """(the length of the response at the start of ``data``, whether it closes), or None
    while its head is incomplete; a response without Content-Length is an error here."""
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return None
    head = bytes(data[:end]).lower()
    match = re.search(rb"\r\ncontent-length: *(\d+)", head)
    if match is None:
        raise ConnectionError(f"no Content-Length in {head[:80]!r}")
    closes = b"\r\nconnection: close" in head or head.startswith(b"http/1.0")
    return end + 4 + int(match.group(1)), closes


def measure_requests(
    daemon: daemons.Daemon, origin: HttpOrigin, inflight: int, seconds: float, body: int,
    keep_alive: bool,
) -> float:  # fmt: skip
    """Forwarded requests per second, ``inflight`` clients at once (one thread, selectors)."""
    url = f"http://{HOST}:{origin.port}/{body}"
    request = f"GET {url} HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\n"
    request += "\r\n" if keep_alive else "Connection: close\r\n\r\n"
    wire = request.encode()
    sel = selectors.DefaultSelector()
    completed = failed = 0
    reused: set[object] = set()  # connections on their second request or later

    def launch() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((HOST, daemon.port))
        sock.setblocking(False)
        sock.send(wire)
        sel.register(sock, selectors.EVENT_READ, bytearray())

    for _ in range(inflight):
        launch()
    started = time.perf_counter()
    deadline = started + seconds
    while (now := time.perf_counter()) < deadline:
        for key, _events in sel.select(deadline - now):
            sock, got = key.fileobj, key.data
            try:
                data = sock.recv(262144)  # type: ignore[union-attr]
                if not data and not got and sock in reused:
                    # The proxy ended the keep-alive before this request (tinyproxy does after
                    # every response): a client sends it again on a new connection.
                    reused.discard(sock)
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    launch()
                    continue
                if not data:
                    raise ConnectionError("closed before the response ended")
                got += data
                ended = _response_end(got)
                if ended is None or len(got) < ended[0]:
                    continue
                if len(got) > ended[0]:
                    raise ConnectionError("bytes after the response")
                completed += 1
                if keep_alive and not ended[1]:
                    got.clear()
                    reused.add(sock)
                    sock.send(wire)  # type: ignore[union-attr]
                    continue
            except OSError:
                failed += 1
            reused.discard(sock)
            sel.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            launch()
    elapsed = time.perf_counter() - started
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    if failed > completed // 100:
        raise RuntimeError(f"{daemon.key}: fwd: {failed} failed, {completed} completed")
    return completed / elapsed


def measure_forward_bulk(
    daemon: daemons.Daemon, origin: HttpOrigin, zeros: int, size: int
) -> dict[str, float]:
    """One download and one upload of ``size`` bytes through the forwarding proxy, in MB/s."""
    out = {}
    for direction in ("down", "up"):
        with socket.create_connection((HOST, daemon.port), timeout=60) as sock:
            sock.settimeout(None)  # sendfile(2) on a socket in timeout mode gets EAGAIN
            target = f"http://{HOST}:{origin.port}/{size if direction == 'down' else 0}"
            method, extra = (
                ("GET", "") if direction == "down" else ("POST", f"Content-Length: {size}\r\n")
            )
            head = f"{method} {target} HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\n{extra}\r\n"
            started = time.perf_counter()
            sock.sendall(head.encode())
            if direction == "up":
                send_zeros(sock.fileno(), zeros, size)
            got = b""
            while (ended := _response_end(got)) is None:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before the response head")
                got += chunk
            rest = ended[0] - len(got)
            if rest > 0 and discard(sock, rest) != rest:
                raise ConnectionError("response body cut short")
            elapsed = time.perf_counter() - started
        out[f"fwd_{direction}_mbps"] = size / elapsed / 1e6
    return out


def measure_forwarding(
    name: str, workdir: Path, extra: list[str], origin: HttpOrigin, zeros: int,
    args: argparse.Namespace,
) -> dict[str, float]:  # fmt: skip
    row: dict[str, float] = {}
    if name not in FORWARDING:
        return row
    body = parse_size(args.fwd_body)
    for keep_alive, key in ((True, "fwd_rps"), (False, "fwd_rps_close")):
        daemon = daemons.start(FORWARDING[name], workdir / f"fwd-{key}", extra)
        try:
            cpu0 = daemon.cpu()
            started = time.perf_counter()
            row[key] = measure_requests(
                daemon, origin, args.inflight, args.fwd_seconds, body, keep_alive
            )
            row[key + "_cpu_ms"] = (
                (daemon.cpu() - cpu0) / max(row[key] * (time.perf_counter() - started), 1) * 1000
            )
        finally:
            daemon.stop()
    daemon = daemons.start(FORWARDING[name], workdir / "fwd-bulk", extra)
    try:
        row |= measure_forward_bulk(daemon, origin, zeros, parse_size(args.fwd_size))
    finally:
        daemon.stop()
    return row


def measure_idle(
    daemon: daemons.Daemon, protocol: str, banner_port: int, count: int
) -> dict[str, float]:
    """PSS growth per idle established tunnel (banner read, then nothing)."""
    warm = [open_tunnel(daemon.port, protocol, banner_port) for _ in range(20)]
    for sock in warm:
        recv_exact(sock, len(BANNER))
        sock.close()
    time.sleep(0.5)
    before = daemon.pss_kib()
    held = []
    try:
        for _ in range(count):
            sock = open_tunnel(daemon.port, protocol, banner_port)
            recv_exact(sock, len(BANNER))
            held.append(sock)
        time.sleep(1.0)
        after = daemon.pss_kib()
    finally:
        for sock in held:
            sock.close()
    return {"idle_kib": (after - before) / count, "pss_before_kib": float(before)}


def pinned_bytes(pids: set[int]) -> tuple[int, int]:
    """(bytes queued in the TCP sockets of ``pids``, bytes sitting in their pipes)."""
    out = subprocess.run(
        ["ss", "-tmnpH"], capture_output=True, text=True, check=True
    ).stdout.replace("\n\t", " ")
    sockets = sum(int(m[2]) + int(m[3]) for m in _SKMEM.finditer(out) if int(m[1]) in pids)
    pipes = 0
    seen: set[str] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"{fd_dir}/{fd}")
                    if not link.startswith("pipe:") or link in seen:
                        continue
                    seen.add(link)
                    peek = os.open(f"{fd_dir}/{fd}", os.O_RDONLY | os.O_NONBLOCK)
                    try:
                        queued = fcntl.ioctl(peek, termios.FIONREAD, b"\0\0\0\0")
                        pipes += int.from_bytes(queued, sys.byteorder)
                    finally:
                        os.close(peek)
    return sockets, pipes


def measure_stall(
    daemon: daemons.Daemon, protocol: str, target: StreamTarget, warm: int
) -> dict[str, float]:
    """Kernel memory pinned by one download whose reader stopped after ``warm`` bytes."""
    sock = open_tunnel(daemon.port, protocol, target.port)
    with sock:
        sock.settimeout(30)
        header = next(_stream_ids).to_bytes(4, "big") + b"\x01" + STALL_SIZE.to_bytes(7, "big")
        sock.sendall(header + b"g")
        discard(sock, warm)
        time.sleep(STALL_SETTLE_S)
        pids = {int(f[0]) for f in daemons.group_stats(daemon.pid)}
        sockets, pipes = pinned_bytes(pids)
    return {"stall_mib": (sockets + pipes) / MiB, "stall_pipe_mib": pipes / MiB}


# --------------------------------------------------------------------------- driver


COLUMNS = [
    ("up_mbps", "up MB/s"),
    ("up_cpu_per_gib", "up CPU-s/GiB"),
    ("down_mbps", "down MB/s"),
    ("down_cpu_per_gib", "down CPU-s/GiB"),
    ("agg_mbps", "64-stream MB/s"),
    ("agg_cpu_per_gib", "64-stream CPU-s/GiB"),
    ("tps", "tunnels/s"),
    ("tps_cpu_ms", "CPU ms/tunnel"),
    ("idle_kib", "KiB/idle tunnel"),
    ("stall_mib", "MiB/stalled tunnel"),
    ("fwd_rps", "HTTP req/s keep-alive"),
    ("fwd_rps_cpu_ms", "CPU ms/req keep-alive"),
    ("fwd_rps_close", "HTTP req/s new conn"),
    ("fwd_rps_close_cpu_ms", "CPU ms/req new conn"),
    ("fwd_down_mbps", "HTTP down MB/s"),
    ("fwd_up_mbps", "HTTP up MB/s"),
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=DEFAULT_SERVERS)
    parser.add_argument("--only", default="single,aggregate,tps,idle,stall,fwd")
    parser.add_argument("--size", default="1G", help="single-stream size (default 1G)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-size", default="64M")
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--tps-seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--stall-warm", default="256M", help="read before stalling (256M)")
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--hopcat-args", default="", help="extra options for hopcat serve")
    parser.add_argument("--fwd-seconds", type=float, default=10.0, help="per fwd run (10)")
    parser.add_argument("--fwd-body", default="1K", help="fwd response body (1K)")
    parser.add_argument("--fwd-size", default="256M", help="fwd download/upload (256M)")
    parser.add_argument("--banner-target", help=argparse.SUPPRESS)
    parser.add_argument("--http-origin", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.banner_target:
        banner_target_main(args.banner_target)
        return 0
    if args.http_origin:
        http_origin_main(args.http_origin)
        return 0
    hopcat_extra = args.hopcat_args.split()
    names = [n for n in args.servers.split(",") if n]
    for name in names:
        if name not in daemons.SERVERS:
            parser.error(f"unknown server {name!r} (choose from {', '.join(daemons.SERVERS)})")
    only = set(args.only.split(","))
    size = parse_size(args.size)
    stream_size = parse_size(args.stream_size)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    zeros = zero_memfd()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    failures: list[str] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hopcat-bench-serve-") as tmp:
        work = Path(tmp)
        banner = BannerTarget(work)
        target = StreamTarget(zeros)
        origin = HttpOrigin(work) if "fwd" in only else None
        try:
            for rep in range(args.reps):
                for name in rotated(names, rep):
                    protocol = daemons.SERVERS[name].schemes[0]
                    row: dict[str, float] = {}
                    try:
                        if only & {"single", "aggregate", "tps"}:
                            daemon = daemons.start(name, work / f"{name}-{rep}", hopcat_extra)
                            try:
                                if "tps" in only:
                                    log(f"rep {rep + 1} {name}: tunnels per second")
                                    row |= measure_tps(
                                        daemon,
                                        protocol,
                                        banner.ports,
                                        args.inflight,
                                        args.tps_seconds,
                                    )
                                if "single" in only:
                                    log(f"rep {rep + 1} {name}: single stream")
                                    row |= measure_single(daemon, protocol, target, zeros, size)
                                if "aggregate" in only:
                                    log(f"rep {rep + 1} {name}: {args.streams} streams")
                                    row |= measure_aggregate(
                                        daemon, protocol, target, zeros, args.streams, stream_size
                                    )
                            finally:
                                daemon.stop()
                        if "idle" in only:
                            log(f"rep {rep + 1} {name}: {args.idle} idle tunnels")
                            daemon = daemons.start(name, work / f"{name}-{rep}-idle", hopcat_extra)
                            try:
                                row |= measure_idle(daemon, protocol, banner.port, args.idle)
                            finally:
                                daemon.stop()
                        if "stall" in only:
                            log(f"rep {rep + 1} {name}: a stalled download")
                            daemon = daemons.start(name, work / f"{name}-{rep}-stall", hopcat_extra)
                            try:
                                row |= measure_stall(
                                    daemon, protocol, target, parse_size(args.stall_warm)
                                )
                            finally:
                                daemon.stop()
                        if origin is not None and name in FORWARDING:
                            log(f"rep {rep + 1} {name}: HTTP forwarding")
                            row |= measure_forwarding(
                                name, work / f"{name}-{rep}", hopcat_extra, origin, zeros, args
                            )
                    except Exception as exc:
                        failures.append(f"rep {rep + 1} {name}: {exc}")
                        log(f"FAILED: rep {rep + 1} {name}: {exc}")
                    results[name].append(row)
        finally:
            target.close()
            banner.close()
            if origin is not None:
                origin.close()
    print(report(results, names, args, load, failures))
    write_json(args.json, {"args": vars(args), "results": results, "failures": failures})
    return 1 if failures else 0


def report(
    results: dict[str, list[dict[str, float]]],
    names: list[str],
    args: argparse.Namespace,
    load: float,
    failures: list[str],
) -> str:
    lines = [
        "# hopcat serve benchmark",
        "",
        f"{args.reps} rep(s), interleaved; single stream {args.size}, {args.streams} streams x "
        f"{args.stream_size}, {args.inflight} tunnels in flight for {args.tps_seconds:g} s, "
        f"{args.idle} idle tunnels; {os.cpu_count()} CPUs, load average {load:.2f} at start. "
        "Medians.",
        "",
    ]
    shown = [
        (key, title)
        for key, title in COLUMNS
        if any(key in row for rows in results.values() for row in rows)
    ]
    titles = [title.replace("64-stream", f"{args.streams}-stream") for _, title in shown]
    rows = []
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        cells = []
        medians[name] = {}
        for key, _title in shown:
            values = [row[key] for row in results[name] if key in row]
            if not values:
                cells.append("-")
                continue
            value = median(values)
            medians[name][key] = value
            cells.append(f"{value:.0f}" if value >= 100 else f"{value:.2f}")
        rows.append([name, *cells])
    lines.append(md_table(["server", *titles], rows, set(range(1, len(titles) + 1))))
    hop = medians.get("hopcat", {})
    checks = []
    dante, pproxy = medians.get("dante", {}), medians.get("pproxy", {})
    for key, other, label, better in (
        ("up_mbps", dante, "single stream up >= Dante", "higher"),
        ("down_mbps", dante, "single stream down >= Dante", "higher"),
        ("up_cpu_per_gib", dante, "CPU/GiB up <= Dante", "lower"),
        ("down_cpu_per_gib", dante, "CPU/GiB down <= Dante", "lower"),
        ("tps", dante, "tunnels/s >= Dante", "higher"),
        ("idle_kib", pproxy, "KiB/idle tunnel < pproxy", "lower"),
        ("fwd_rps", medians.get("tinyproxy", {}), "HTTP req/s keep-alive >= tinyproxy", "higher"),
        (
            "fwd_rps_close",
            medians.get("tinyproxy", {}),
            "HTTP req/s new conn >= tinyproxy",
            "higher",
        ),
    ):
        if key in hop and key in other:
            ok = hop[key] >= other[key] if better == "higher" else hop[key] <= other[key]
            checks.append(
                f"- {label}: {hop[key]:.2f} vs {other[key]:.2f}: {'met' if ok else 'NOT met'}"
            )
    workers, microsocks = medians.get("hopcat-w", {}), medians.get("microsocks", {})
    for other, factor, label in ((dante, 1.5, "1.5x Dante"), (microsocks, 1.0, "microsocks")):
        if "tps" in workers and "tps" in other:
            ok = workers["tps"] >= factor * other["tps"]
            checks.append(
                f"- tunnels/s with --workers auto >= {label}: {workers['tps']:.2f} vs "
                f"{other['tps']:.2f}: {'met' if ok else 'NOT met'}"
            )
    if checks:
        lines += ["", "Targets (hopcat vs peer, same run):", *checks]
    if failures:
        lines += ["", "Failures:", *(f"- {failure}" for failure in failures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
