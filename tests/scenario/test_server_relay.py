"""hopcat serve in-process: the handler and the relay on an asyncio loop in the test, loopback
sockets, no subprocess. How tunnels end (FIN only when complete, a reset otherwise), resets
noticed on stalled tunnels, refusals answered, failed logins throttled."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from hopcat.server.cli import finish, parse_args
from hopcat.server.log import Logger
from hopcat.server.serve import Server, bind_listeners, load_config
from hopcat.server.throttle import FREE_FAILURES

WAIT_S = 10.0


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, server: Server, log: Path) -> None:
        self.loop = loop
        self.server = server
        self.log_path = log
        self.address = server.listeners[0].getsockname()[:2]

    def log(self) -> str:
        self.server.logger.flush()
        return self.log_path.read_text()

    async def until(self, check: Callable[[], bool]) -> None:
        deadline = self.loop.time() + WAIT_S
        while not check():
            assert self.loop.time() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)

    async def client(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        await self.loop.sock_connect(sock, self.address)
        return sock

    async def recv_exact(self, sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = await asyncio.wait_for(self.loop.sock_recv(sock, size - len(data)), WAIT_S)
            assert chunk, f"EOF after {data!r}"
            data += chunk
        return data

    async def read_to_end(self, sock: socket.socket) -> tuple[int, str]:
        """Bytes read until the end, and how it ended: "fin" or "reset"."""
        total = 0
        try:
            while chunk := await asyncio.wait_for(self.loop.sock_recv(sock, 1 << 20), WAIT_S):
                total += len(chunk)
        except ConnectionResetError:
            return total, "reset"
        return total, "fin"


def run_server(
    tmp_path: Path, *args: str
) -> Callable[[Callable[[Harness], Awaitable[None]]], None]:
    """Run ``scenario(harness)`` against a Server on a fresh loop, then stop it."""

    def runner(scenario: Callable[[Harness], Awaitable[None]]) -> None:
        options = finish(parse_args(["127.0.0.1:0", *args]))
        credentials, policy, _warnings = load_config(options)
        listeners = bind_listeners(options.bind_addresses)
        loop = asyncio.new_event_loop()
        log = tmp_path / "serve.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        logger = Logger(fd=fd)
        try:
            server = Server(options, listeners, loop, logger, credentials, policy)
            server.start()
            harness = Harness(loop, server, log)
            loop.run_until_complete(asyncio.wait_for(scenario(harness), 30))
            server._close_all("shutdown", "test over")
        finally:
            server.engine.close()
            for listener in listeners:
                listener.close()
            loop.close()
            logger.flush()
            os.close(fd)

    return runner


@asynccontextmanager
async def target_server(
    loop: asyncio.AbstractEventLoop,
) -> AsyncIterator[tuple[int, asyncio.Queue[socket.socket]]]:
    """A loopback listener; accepted sockets (non-blocking) arrive on the queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    accepted: asyncio.Queue[socket.socket] = asyncio.Queue()

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            await accepted.put(sock)

    task = asyncio.ensure_future(accept())
    try:
        yield listener.getsockname()[1], accepted
    finally:
        task.cancel()
        listener.close()


async def open_tunnel(h: Harness, port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = await h.client(source)
    request = (
        b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
    )
    await h.loop.sock_sendall(sock, request)
    reply = await h.recv_exact(sock, 2 + 10)
    assert reply[:4] == b"\x05\x00\x05\x00", reply
    return sock


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def fill(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, reader_gone: asyncio.Event | None = None
) -> int:
    """Write until the kernel refuses more for a while: the tunnel is stalled. With
    ``reader_gone``, a pause counts only once the reader has stopped (a loaded machine can
    pause a reader that is still reading)."""
    sent = 0
    chunk = b"x" * 65536
    idle = 0
    while idle < 20:
        try:
            sent += sock.send(chunk)
            idle = 0
        except BlockingIOError:
            if reader_gone is None or reader_gone.is_set():
                idle += 1
            await asyncio.sleep(0.01)
    return sent


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_clean_end_is_a_fin(tmp_path: Path, splice: bool) -> None:
    async def scenario(h: Harness) -> None:
        async with target_server(h.loop) as (port, accepted):
            client = await open_tunnel(h, port)
            target = await accepted.get()
            await h.loop.sock_sendall(target, b"y" * 300_000)
            target.close()
            client.shutdown(socket.SHUT_WR)
            assert await h.read_to_end(client) == (300_000, "fin")
            await h.until(lambda: not h.server.tunnels)
            client.close()
        assert "result=ok" in h.log()

    run_server(tmp_path, *([] if splice else ["--no-splice"]))(scenario)


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_reset_noticed_while_the_other_direction_is_stalled(tmp_path: Path, splice: bool) -> None:
    """The client never reads (down is stalled: the relay waits on the client, not the target);
    the target's reset must still end the tunnel at once and reach the client as a reset."""

    async def scenario(h: Harness) -> None:
        async with target_server(h.loop) as (port, accepted):
            client = await open_tunnel(h, port)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            target = await accepted.get()
            await fill(h.loop, target)
            assert h.server.tunnels
            reset(target)
            await h.until(lambda: not h.server.tunnels)
            _total, how = await h.read_to_end(client)
            assert how == "reset"
            client.close()
        assert "result=reset" in h.log()
        assert "target: connection reset by peer" in h.log()

    run_server(tmp_path, *([] if splice else ["--no-splice"]))(scenario)


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_a_stalled_reader_pins_no_more_than_the_receive_cap(tmp_path: Path, splice: bool) -> None:
    """Rule 17: the client reads fast (autotuning grows the server's target-side buffer), then
    stops; the target keeps sending. What the server holds for it stays within the cap."""
    cap = 1 << 20

    async def scenario(h: Harness) -> None:
        assert h.server.engine.receive_cap is not None, "no way to cap here (rmem_max, no root)"
        async with target_server(h.loop) as (port, accepted):
            client = await open_tunnel(h, port)
            target = await accepted.get()
            reader_gone = asyncio.Event()
            sending = asyncio.ensure_future(fill(h.loop, target, reader_gone))
            got = 0
            while got < 64 << 20:
                got += len(await asyncio.wait_for(h.loop.sock_recv(client, 1 << 20), WAIT_S))
            reader_gone.set()
            await sending  # the client stopped reading: the target is blocked
            (conn,) = h.server.tunnels
            assert conn.target is not None
            rcvbuf = conn.target.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            queued = struct.unpack("i", fcntl.ioctl(conn.target, termios.FIONREAD, b"\0" * 4))[0]
            assert rcvbuf == cap, f"target-side receive buffer {rcvbuf}, not locked at {cap}"
            assert queued <= cap, f"{queued} bytes queued on the target side"
            client.close()
            target.close()

    run_server(tmp_path, "--max-receive-buffer", "1M", *([] if splice else ["--no-splice"]))(
        scenario
    )


def test_idle_timeout_resets_both_sides(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        async with target_server(h.loop) as (port, accepted):
            client = await open_tunnel(h, port)
            target = await accepted.get()
            await h.until(lambda: not h.server.tunnels)
            assert (await h.read_to_end(client))[1] == "reset"
            assert (await h.read_to_end(target))[1] == "reset"
            client.close()
            target.close()
        assert "result=idle-timeout" in h.log()

    run_server(tmp_path, "--idle-timeout", "0.3")(scenario)


def test_grace_over_resets_a_stream_cut_short(tmp_path: Path) -> None:
    """SIGTERM's grace ends while the target is still sending to a slow reader: the client must
    see a reset, never a FIN that would make the cut download look complete."""

    async def scenario(h: Harness) -> None:
        async with target_server(h.loop) as (port, accepted):
            client = await open_tunnel(h, port)
            target = await accepted.get()
            await fill(h.loop, target)
            h.server.stop("SIGTERM")
            await h.until(lambda: not h.server.tunnels)
            _total, how = await h.read_to_end(client)
            assert how == "reset"
            client.close()
            target.close()
        assert "grace period of 0.2 s over" in h.log()

    run_server(tmp_path, "--grace", "0.2")(scenario)


def test_refusals_are_answered_and_logins_throttled(tmp_path: Path) -> None:
    async def login(h: Harness, password: bytes, source: str = "127.0.0.1") -> bytes:
        sock = await h.client(source)
        auth = b"\x01\x05alice" + bytes((len(password),)) + password
        await h.loop.sock_sendall(sock, b"\x05\x01\x02" + auth)
        answer = await h.recv_exact(sock, 4)
        sock.close()
        return answer

    async def scenario(h: Harness) -> None:
        # A malformed RFC 1929 sub-negotiation gets status 1, not a bare EOF.
        sock = await h.client()
        await h.loop.sock_sendall(sock, b"\x05\x01\x02\x07\x05alice")
        assert await h.recv_exact(sock, 4) == b"\x05\x02\x01\x01"
        sock.close()
        for _ in range(FREE_FAILURES + 1):
            assert await login(h, b"guess-1x") == b"\x05\x02\x01\x01"
        # Within the penalty even the right password is refused, unchecked...
        assert await login(h, b"s3cr3t-pw") == b"\x05\x02\x01\x01"
        # ...but only for that client: another address logs in at once.
        assert await login(h, b"s3cr3t-pw", source="127.0.0.2") == b"\x05\x02\x01\x00"
        await h.until(lambda: not h.server.pending)
        log = h.log()
        assert "event=limit client=127.0.0.1 failures=6" in log
        assert "result=auth-throttled" in log
        assert "s3cr3t-pw" not in log and "guess-1x" not in log

    run_server(tmp_path, "--auth", "alice:s3cr3t-pw")(scenario)
