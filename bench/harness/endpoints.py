"""Loopback endpoints that are never the limit: each measures its own CPU (RUSAGE_THREAD).

Data is a memfd of real zeros (no holes), sent with splice(2) into a pipe or sendfile(2) into a
socket; received data is discarded with recv(MSG_TRUNC) or spliced into /dev/null. Nothing is
copied through Python.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO

from .common import HOST, MiB
from .procs import ToolRun, kill_and_reap, read_tail, self_cpu, spawn, thread_cpu, wait_exit

ZERO_BYTES = 8 * MiB  # size of the zero memfd; every send starts at its offset 0
IO_CHUNK = 1 * MiB  # receive / splice request size
BANNER = b"SSH-2.0-OpenSSH_9.2 hopcat-bench\r\n"
_NO_SPLICE = (errno.EINVAL, errno.ENOSYS)  # e.g. a file system without splice: plain copies


def zero_memfd() -> int:
    fd = os.memfd_create("hopcat-bench-zeros", os.MFD_CLOEXEC)
    block = bytes(MiB)
    for _ in range(ZERO_BYTES // MiB):
        os.write(fd, block)
    return fd


def send_zeros(out_fd: int, zero_fd: int, total: int) -> int:
    """sendfile ``total`` zero bytes into a socket."""
    sent = 0
    while sent < total:
        sent += os.sendfile(out_fd, zero_fd, 0, min(total - sent, ZERO_BYTES))
    return sent


def recv_discard(sock: socket.socket, buf: bytearray, total: int = -1, flags: int = 0) -> int:
    """recv into buf until EOF (or ``total`` bytes); the count. With MSG_TRUNC in flags the kernel
    discards the data and buf is never written."""
    recv_into, n, count = sock.recv_into, len(buf), 0
    while count != total:
        k = recv_into(buf, n if total < 0 else min(n, total - count), flags)
        if not k:
            break
        count += k
    return count


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """SO_RCVBUF, past the sysctl limit as root (SO_RCVBUFFORCE)."""
    force = getattr(socket, "SO_RCVBUFFORCE", None) if os.geteuid() == 0 else None
    try:
        sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def make_listener(rcvbuf: int = 0, backlog: int = 16) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        # Set before listen() so accept() inherits it (and the window scale that follows from it).
        set_rcvbuf(s, rcvbuf)
    s.bind((HOST, 0))
    s.listen(backlog)
    return s


class Endpoint(threading.Thread):
    """One side of a run, in a thread; ``work`` sets ``count``; errors are reported, not raised."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.count = 0
        self.cpu = 0.0
        self.t_done: float | None = None  # perf_counter when its job was complete
        self.error: str | None = None
        self.abort_reason: str | None = None

    def run(self) -> None:
        c0 = thread_cpu()
        try:
            self.work()
        except BaseException as e:  # a failed run, reported with the others
            self.error = f"{self.name}: {self.abort_reason or f'{type(e).__name__}: {e}'}"
        finally:
            if self.t_done is None:
                self.t_done = time.perf_counter()
            self.cpu = thread_cpu() - c0

    def work(self) -> None:
        raise NotImplementedError

    def abort(self, reason: str = "aborted") -> None:
        self.abort_reason = self.abort_reason or reason


class ConnectingListener:
    """Stands in for a listening socket when the tool under test listens (listen mode): its
    ``accept()`` connects to the tool's port, retrying until the tool listens."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.timeout = 10.0
        self.conn: socket.socket | None = None
        self.closed = False

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout or 10.0

    def accept(self) -> tuple[socket.socket, object]:
        deadline = time.monotonic() + self.timeout
        while not self.closed:
            sock = socket.socket()
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            try:
                sock.connect((HOST, self.port))
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the tool never listened on {HOST}:{self.port}") from None
                time.sleep(0.002)
                continue
            self.conn = sock
            return sock, (HOST, self.port)
        raise RuntimeError("aborted")

    def getsockname(self) -> tuple[str, int]:
        return HOST, self.port

    def shutdown(self, how: int) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


class ServerEndpoint(Endpoint):
    def __init__(self, name: str, lst: socket.socket, accept_timeout: float) -> None:
        super().__init__(name)
        self.lst = lst
        self.accept_timeout = accept_timeout
        self.conn: socket.socket | None = None
        self._aborted = False

    def accept(self) -> socket.socket:
        self.lst.settimeout(self.accept_timeout)
        conn, _ = self.lst.accept()
        conn.setblocking(True)
        self.conn = conn
        if self._aborted:
            conn.close()
            raise RuntimeError("aborted")
        return conn

    def linger(self, conn: socket.socket) -> None:
        """Close for good once the client has gone (no RST if it sent anything), bounded."""
        conn.settimeout(self.accept_timeout)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        conn.close()

    def abort(self, reason: str = "aborted") -> None:
        super().abort(reason)
        self._aborted = True
        for s in (self.lst, self.conn):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Sink(ServerEndpoint):
    """Upload sink: accept one connection, discard until EOF, count the bytes."""

    def __init__(self, lst: socket.socket, accept_timeout: float, trunc: bool = True) -> None:
        super().__init__("sink", lst, accept_timeout)
        self.flags = socket.MSG_TRUNC if trunc else 0
        self.buf = bytearray(IO_CHUNK)

    def work(self) -> None:
        conn = self.accept()
        self.count = recv_discard(conn, self.buf, flags=self.flags)
        self.t_done = time.perf_counter()
        conn.close()


class Feeder(Endpoint):
    """Upload feeder: splice ``total`` bytes of a ZERO_BYTES memfd (the zeros, or any other
    content: its bytes in order, from its start again at its end) into a pipe's write end, then
    close it."""

    def __init__(self, wfd: int, total: int, zero_fd: int) -> None:
        super().__init__("feeder")
        self.wfd, self.total, self.zero_fd = wfd, total, zero_fd

    def work(self) -> None:
        remaining = self.total
        try:
            try:
                while remaining:
                    offset = (self.total - remaining) % ZERO_BYTES
                    k = os.splice(
                        self.zero_fd, self.wfd, min(remaining, ZERO_BYTES - offset),
                        offset_src=offset,
                    )  # fmt: skip
                    if not k:
                        raise RuntimeError("splice returned 0")
                    remaining -= k
            except OSError as e:
                if e.errno not in _NO_SPLICE:
                    raise
                while remaining:
                    offset = (self.total - remaining) % ZERO_BYTES
                    block = os.pread(self.zero_fd, min(remaining, IO_CHUNK, ZERO_BYTES - offset),
                                     offset)  # fmt: skip
                    remaining -= os.write(self.wfd, block)
        finally:
            self.count = self.total - remaining
            os.close(self.wfd)
        self.t_done = time.perf_counter()


class Source(ServerEndpoint):
    """Download source: accept, sendfile ``total`` zero bytes, half-close, then close."""

    def __init__(self, lst: socket.socket, accept_timeout: float, total: int, zero_fd: int) -> None:
        super().__init__("source", lst, accept_timeout)
        self.total, self.zero_fd = total, zero_fd

    def work(self) -> None:
        conn = self.accept()
        self.count = send_zeros(conn.fileno(), self.zero_fd, self.total)
        conn.shutdown(socket.SHUT_WR)  # FIN now: "the server closes"
        self.t_done = time.perf_counter()
        self.linger(conn)


class Reader(Endpoint):
    """Download reader: splice the tool's stdout pipe into /dev/null until EOF; with ``check``,
    read it through Python instead and keep its SHA-256 (``digest``)."""

    def __init__(self, rfd: int, devnull_w: int, check: bool = False) -> None:
        super().__init__("reader")
        self.rfd, self.devnull_w = rfd, devnull_w
        self.hash = hashlib.sha256() if check else None
        self.digest: str | None = None

    def work(self) -> None:
        try:
            if self.hash is not None or not self._spliced():
                self._copied()
        finally:
            os.close(self.rfd)
        if self.hash is not None:
            self.digest = self.hash.hexdigest()
        self.t_done = time.perf_counter()

    def _spliced(self) -> bool:
        """False where the pipe cannot be spliced: the rest is to be copied."""
        try:
            while k := os.splice(self.rfd, self.devnull_w, IO_CHUNK):
                self.count += k
        except OSError as e:
            if e.errno not in _NO_SPLICE:
                raise
            return False
        return True

    def _copied(self) -> None:
        buf = bytearray(IO_CHUNK)
        view = memoryview(buf)
        while k := os.readv(self.rfd, [buf]):
            self.count += k
            if self.hash is not None:
                self.hash.update(view[:k])


class BannerServer(threading.Thread):
    """First-byte target: greets each connection it accepts with BANNER (``greet``), keeps it
    until ``drop_conns``. One client at a time, as the runs come."""

    def __init__(self, name: str = "banner") -> None:
        super().__init__(name=name, daemon=True)
        self.lst = make_listener()
        self.port: int = self.lst.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.error: str | None = None

    def run(self) -> None:
        self.lst.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.lst.accept()
            except OSError:  # including the timeout that lets it see stop
                continue
            self.keep(conn)
            try:
                self.greet(conn)
            except OSError as e:
                self.error = f"{type(e).__name__}: {e}"

    def keep(self, conn: socket.socket) -> None:
        with self.lock:
            self.conns.append(conn)

    def greet(self, conn: socket.socket) -> None:
        conn.sendall(BANNER)

    def take_error(self) -> str | None:
        error, self.error = self.error, None
        return error

    def drop_conns(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            c.close()

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.lst.close()
        self.drop_conns()


# --------------------------------------------------------------------------- running the tool


def run_tool(
    run: ToolRun, env: dict[str, str], stdin: int, stdout: int, close: Sequence[int],
    endpoints: Sequence[Endpoint], server: ServerEndpoint, timeout: float, errf: IO[bytes],
) -> list[str]:  # fmt: skip
    """Start the endpoints, spawn ``run.argv`` (stderr into errf), close the fds in ``close``
    (the tool holds them now: EOF and EPIPE reach the endpoints), wait at most ``timeout`` for it
    (then kill it) and for the endpoints; record its exit in the run. Returns the errors so far:
    the exit's and the endpoints'."""
    for ep in endpoints:
        ep.start()
    h0, t0 = self_cpu(), time.perf_counter()
    try:
        pid: int | None = spawn(run.argv, env, stdin, stdout, errf.fileno())
    except OSError as e:
        pid, server.error = None, f"spawn failed: {e}"
        server.abort("spawn failed")
    for fd in close:
        os.close(fd)
    ex = None
    if pid is not None:
        ex = wait_exit(pid, timeout)
        if ex.timed_out:
            server.abort("tool timed out")
        # The tool has exited: a connection it made is already in the accept queue, so a server
        # still waiting in accept() will never get one.
        deadline = time.perf_counter() + 1.0
        for ep in endpoints:
            if isinstance(ep, ServerEndpoint):
                while ep.conn is None and ep.is_alive() and time.perf_counter() < deadline:
                    time.sleep(0.005)
                if ep.conn is None and ep.is_alive():
                    ep.abort("the tool never connected")
    for ep in endpoints:
        ep.join(10)
        if ep.is_alive():
            ep.abort("still running 10s after the tool exited")
            ep.join(5)
    run.harness_cpu = self_cpu() - h0
    errors = [] if ex is None else run.record_exit(ex, t0, [ep.t_done for ep in endpoints])
    errors += [f"{ep.name} still running" for ep in endpoints if ep.is_alive()]
    return errors + [ep.error for ep in endpoints if ep.error]


def first_byte(run: ToolRun, env: dict[str, str], server: BannerServer, timeout: float) -> None:
    """A latency run: spawn ``run.argv`` and time it to the first bytes of the banner on its
    stdout; its stdin stays open until it is killed."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with tempfile.TemporaryFile() as errf:
        t0 = time.perf_counter()
        try:
            pid: int | None = spawn(run.argv, env, in_r, out_w, errf.fileno())
        except OSError as e:
            run.error, pid = f"spawn failed: {e}", None
        os.close(in_r)
        os.close(out_w)
        if pid is not None:
            p = select.poll()
            p.register(out_r, select.POLLIN)
            ready = p.poll(int(timeout * 1000))
            t1 = time.perf_counter()
            data = os.read(out_r, 4096) if ready else b""
            kill_and_reap(pid)
            if not ready:
                run.error = f"no output within {timeout:.0f}s"
            elif not data:
                run.error = "stdout closed without output"
            elif not BANNER.startswith(data[: len(BANNER)]):
                run.error = f"unexpected output {data[:40]!r}"
            else:
                run.wall, run.ok = t1 - t0, True
            if run.error and (server_error := server.take_error()):
                run.error += f"; server: {server_error}"
            if run.error and (tail := read_tail(errf)):
                run.error += f"; stderr: {tail}"
        os.close(in_w)
        os.close(out_r)
    server.drop_conns()
