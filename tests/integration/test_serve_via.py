"""``hopcat serve --via``: upstream opens run on the server's own event loop (the asyncio driver
of the tunnel engine), on asyncio's loop and on uvloop's when it is importable.

Real upstreams (Dante, microsocks) carry data both ways; a scripted SOCKS5 upstream
(``ScriptedUpstream``) stalls handshakes or glues the target's first bytes to its reply, and
counts what the server does with its connections: how many threads the server needs for 50
opens at once (``/proc/PID/task``), and how soon it closes upstream connections whose clients
left.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    SERVE_PYTHON,
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    serve_factory,
    socks5_connect,
)

from support import closed_port, pattern, sha256

Serve = Callable[..., ServeProcess]
OPENS = 50
LEFT_CLOSED_S = 3.0  # clients that left: their upstream connections closed within this
BANNER = b"SSH-2.0-glued-to-the-reply\r\n"


def _uvloop_importable() -> bool:
    python = SERVE_PYTHON or sys.executable
    probe = subprocess.run([python, "-c", "import uvloop"], capture_output=True, timeout=30)
    return probe.returncode == 0


LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(
        not _uvloop_importable(), reason="uvloop is not installed (pip install 'hopcat[uvloop]')"
    )),
]  # fmt: skip


@pytest.fixture(params=LOOPS)
def event_loop_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def serve(tmp_path: Path, event_loop_name: str) -> Iterator[Serve]:
    """``hopcat serve`` subprocesses on the parametrised event loop."""
    factory = serve_factory(tmp_path)
    start = next(factory)

    def on_loop(*args: str, **kwargs: object) -> ServeProcess:
        return start("--event-loop", event_loop_name, *args, **kwargs)

    yield on_loop
    next(factory, None)


class ScriptedUpstream:
    """A SOCKS5 upstream (no authentication). A request for ``BANNER_PORT`` is granted with the
    target's first bytes in the same segment as the reply, then the tunnel echoes; any other
    request is held unanswered until the server closes the connection. Counts the connections
    accepted, the requests it holds, and when the server closed each held one."""

    BANNER_PORT = 4242

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.url = f"socks5://127.0.0.1:{self.port}"
        self.accepted = 0
        self.held = 0
        self.closed_at: list[float] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            recv_exact(conn, 3)
            conn.sendall(b"\x05\x00")
            head = recv_exact(conn, 4)
            size = {1: 4, 4: 16}.get(head[3]) or recv_exact(conn, 1)[0]
            port = int.from_bytes(recv_exact(conn, size + 2)[-2:], "big")
            if port == self.BANNER_PORT:
                conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92" + BANNER)
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            with self._lock:
                self.held += 1
            try:
                conn.recv(1)  # b"" or a reset: the server let go of it
            finally:
                with self._lock:
                    self.held -= 1
                    if not self._stopping:
                        self.closed_at.append(time.monotonic())
        except (OSError, EOFError):
            pass
        finally:
            conn.close()

    def wait_held(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.held < count:
            assert time.monotonic() < deadline, f"{self.held} of {count} requests reached us"
            time.sleep(0.01)

    def close(self) -> None:
        self._stopping = True
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    yield scripted
    scripted.close()


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def stalled_clients(server: ServeProcess, count: int) -> list[socket.socket]:
    """``count`` clients, each from its own address (so no per-client share holds one back),
    each asking for a target the scripted upstream never answers for."""
    clients = []
    for index in range(count):
        sock = connect(server, source=f"127.0.0.{index + 2}")
        clients.append(sock)
        sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x09")
        assert recv_exact(sock, 2) == b"\x05\x00"
    return clients


# --------------------------------------------------------------------------- the numbers


def test_concurrent_opens_use_no_extra_threads(serve: Serve, upstream: ScriptedUpstream) -> None:
    server = serve("--via", upstream.url, "--connect-timeout", "30")
    before = threads_of(server.pid)
    clients = stalled_clients(server, OPENS)
    try:
        upstream.wait_held(OPENS)
        during = threads_of(server.pid)
        print(f"server threads: {before} before, {during} with {OPENS} upstream opens in flight")
        assert during == before
    finally:
        for sock in clients:
            sock.close()


def test_clients_that_leave_cancel_their_upstream_opens(
    serve: Serve, upstream: ScriptedUpstream
) -> None:
    count = 20
    server = serve("--via", upstream.url, "--connect-timeout", "30")
    sockets_idle = server.count_fds()[1]
    clients = stalled_clients(server, count)
    upstream.wait_held(count)
    left = time.monotonic()
    for sock in clients:
        sock.close()
    deadline = left + LEFT_CLOSED_S
    while len(upstream.closed_at) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    closed = [at - left for at in upstream.closed_at]
    print(f"upstream connections closed within {LEFT_CLOSED_S:g} s of {count} clients leaving: "
          f"{len(closed)}" + (f" (last after {max(closed):.3f} s)" if closed else ""))  # fmt: skip
    assert len(closed) == count
    server.wait_log("result=client-closed", count=count)
    assert server.count_fds()[1] == sockets_idle  # no upstream socket left behind


def test_server_shutdown_cancels_upstream_opens(serve: Serve, upstream: ScriptedUpstream) -> None:
    server = serve("--via", upstream.url, "--connect-timeout", "30")
    clients = stalled_clients(server, 5)
    try:
        upstream.wait_held(5)
        assert server.stop() == 0
        log = server.log()
        assert "Task was destroyed" not in log and "ResourceWarning" not in log, log
        assert "result=shutdown" in log
    finally:
        for sock in clients:
            sock.close()


# --------------------------------------------------------------------------- data and answers


def echo_both_ways(sock: socket.socket, banner: bytes, data: bytes) -> bytes:
    """Upload ``data`` from a thread while reading the banner and the echo; what came back."""
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    received = recv_exact(sock, len(banner) + len(data))
    sender.join(10)
    return received


@pytest.mark.parametrize("chain", ["dante", "microsocks", "dante+microsocks"])
def test_via_real_upstreams_carry_data_both_ways(
    serve: Serve, danted: peers.Daemon, microsocks: peers.Daemon,
    banner_server: peers.BannerServer, chain: str,
) -> None:  # fmt: skip
    hops = {"dante": [danted.url], "microsocks": [microsocks.url],
            "dante+microsocks": [danted.url, microsocks.url]}[chain]  # fmt: skip
    server = serve(*[arg for hop in hops for arg in ("--via", hop)])
    data = pattern(4 << 20, 21)
    with connect(server) as sock:
        assert socks5_connect(sock, banner_server.host, banner_server.port) == 0
        received = echo_both_ways(sock, banner_server.banner, data)
    assert received[: len(banner_server.banner)] == banner_server.banner
    assert sha256(received[len(banner_server.banner) :]) == sha256(data)
    server.wait_log("result=ok")


@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_target_bytes_glued_to_the_upstream_reply_reach_the_client_first(
    serve: Serve, upstream: ScriptedUpstream, protocol: str
) -> None:
    server = serve("--via", upstream.url)
    with connect(server) as sock:
        if protocol == "socks5":
            assert socks5_connect(sock, "127.0.0.1", ScriptedUpstream.BANNER_PORT) == 0
        else:
            assert http_connect(sock, "127.0.0.1", ScriptedUpstream.BANNER_PORT)[0] == 200
        assert recv_exact(sock, len(BANNER)) == BANNER
        sock.sendall(b"after the banner")
        assert recv_exact(sock, 16) == b"after the banner"
    line = server.wait_log("result=ok")
    assert f"down={len(BANNER) + 16} " in line


def test_upstream_refusals_are_mapped_by_hop(serve: Serve, danted: peers.Daemon) -> None:
    """The last hop's SOCKS5 refusal is passed on; an earlier hop's is the upstream's failure,
    which says nothing about the target."""
    with closed_port() as port:
        last = serve("--via", danted.url)
        with connect(last) as sock:
            assert socks5_connect(sock, "127.0.0.1", port) == 5
        with connect(last) as sock:
            assert http_connect(sock, "127.0.0.1", port)[0] == 502
        log = last.wait_log("result=refused", count=2)
        assert "(hop 1/1)" in log
        earlier = serve("--via", danted.url, "--via", f"socks5://127.0.0.1:{port}")
        with connect(earlier) as sock:
            assert socks5_connect(sock, "127.0.0.1", 9) == 1
        log = earlier.wait_log("result=upstream-refused")
        assert "(hop 1/2)" in log


def test_a_stalled_first_hop_times_out_naming_it(serve: Serve) -> None:
    """A first hop whose accept queue is full drops our SYNs: the connect timeout, naming the
    hop, within the connect timeout (plus the sweep's slack)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            fill.append(sock)
        server = serve("--via", f"socks5://127.0.0.1:{port}", "--connect-timeout", "1")
        started = time.monotonic()
        with connect(server) as sock:
            assert socks5_connect(sock, "127.0.0.1", 9) == 4
        assert time.monotonic() - started < 2.5
        log = server.wait_log("result=timeout")
        assert f"proxy socks5://127.0.0.1:{port} (hop 1/1): connect to 127.0.0.1:{port}: " \
            "timed out (--connect-timeout 1 s)" in log
    finally:
        for sock in fill:
            sock.close()
        listener.close()


def test_target_first_bytes_are_not_held_behind_a_delayed_ack(
    serve: Serve, microsocks: peers.Daemon, banner_server: peers.BannerServer
) -> None:
    """microsocks writes the target's banner right after its reply, without TCP_NODELAY: Nagle
    holds the banner until the reply is acknowledged, so the open quick-ACKs (a delayed ACK
    would cost ~40 ms per connection; measured 44 ms without, 1 ms with)."""
    server = serve("--via", microsocks.url)
    request = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + banner_server.port.to_bytes(2, "big")
    best = float("inf")
    for _ in range(5):
        with connect(server) as sock:
            started = time.perf_counter()
            sock.sendall(request)
            recv_exact(sock, 12 + len(banner_server.banner))
            best = min(best, time.perf_counter() - started)
    assert best < 0.02, f"{best * 1000:.1f} ms from request to banner"
