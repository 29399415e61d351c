"""Load: 2,000 concurrent tunnels through ``hopcat serve``, every byte checked by SHA-256.

All tunnels are opened first (a third each SOCKS5, SOCKS4 and HTTP CONNECT) and held open
together; then every client sends one frame (8-byte length + payload, 1 byte to 48 KiB), the
target answers each with the payload's SHA-256, and the client compares. Bounded: 2,000 tunnels,
about 50 MB each way, and a deadline well inside the test timeout. Client and target are
selector loops in this process (no thread per connection). Run with one process and with
``--workers 2`` (the server's descriptors are then counted over its workers).
"""

from __future__ import annotations

import errno
import hashlib
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable

import pytest
from test_serve_support import ServeProcess

Serve = Callable[..., ServeProcess]
TUNNELS = 2000
MAX_PAYLOAD = 48 * 1024
DEADLINE_S = 90.0


class DigestTarget(threading.Thread):
    """Per connection: read one frame, answer its SHA-256, then wait for EOF and close."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.wake_r, self.wake_w = socket.socketpair()
        self.answered = 0
        self.errors: list[str] = []

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    if key.data is None:
                        while True:
                            try:
                                conn, _ = self.listener.accept()
                            except BlockingIOError:
                                break
                            conn.setblocking(False)
                            sel.register(conn, selectors.EVENT_READ, [bytearray(), False])
                        continue
                    self._on_readable(sel, key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            for key in list(sel.get_map().values()):
                if key.data not in (None, "wake"):
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()

    def _on_readable(self, sel: selectors.BaseSelector, conn: socket.socket, state: list) -> None:  # type: ignore[type-arg]
        buf, answered = state
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.errors.append(f"target recv: {exc}")
            data = b""
        if not data:
            if not answered:
                self.errors.append("target: EOF before a whole frame")
            sel.unregister(conn)
            conn.close()
            return
        if answered:
            self.errors.append("target: bytes after the frame")
            return
        buf += data
        if len(buf) >= 8:
            size = int.from_bytes(buf[:8], "big")
            if len(buf) - 8 >= size:
                if len(buf) - 8 > size:
                    self.errors.append("target: more than one frame")
                conn.send(hashlib.sha256(bytes(buf[8:])).digest())  # 32 bytes: fits at once
                state[1] = True
                buf.clear()
                self.answered += 1

    def close(self) -> None:
        self.wake_w.send(b"x")
        self.join(10)
        for sock in (self.listener, self.wake_r, self.wake_w):
            sock.close()


def handshake(protocol: str, port: int) -> list[tuple[bytes, int]]:
    """(bytes to send, reply length to read; -1 = an HTTP head) per step."""
    if protocol == "socks5":
        return [
            (b"\x05\x01\x00", 2),
            (b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"), 10),
        ]
    if protocol == "socks4":
        return [(b"\x04\x01" + port.to_bytes(2, "big") + b"\x7f\x00\x00\x01load\x00", 8)]
    return [(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode(), -1)]


class Client:
    __slots__ = ("digest", "expect", "inbuf", "out", "protocol", "sock", "step", "steps")

    def __init__(self, protocol: str, port: int, payload: bytes) -> None:
        self.protocol = protocol
        self.steps = handshake(protocol, port)
        self.step = 0
        self.out = b""
        self.inbuf = b""
        self.expect = self.steps[0][1]
        self.digest = hashlib.sha256(payload).digest()
        self.sock = socket.socket()
        self.sock.setblocking(False)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_two_thousand_concurrent_tunnels(serve: Serve, workers: str) -> None:
    server = serve("--max-conns", "5000", "--max-conns-per-client", "0", "--workers", workers)
    target = DigestTarget()
    target.start()
    rng = random.Random(2000)
    block = rng.randbytes(1 << 20)
    payloads = []
    for _ in range(TUNNELS):
        size = rng.randrange(1, MAX_PAYLOAD + 1)
        offset = rng.randrange(0, len(block) - size)
        payloads.append(block[offset : offset + size])
    clients = [
        Client(("socks5", "socks4", "http")[i % 3], target.port, payloads[i])
        for i in range(TUNNELS)
    ]
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + DEADLINE_S
    try:
        # Phase 1: every tunnel open at the same time.
        for client in clients:
            code = client.sock.connect_ex((server.host, server.port))
            assert code in (0, errno.EINPROGRESS), code
            client.out = client.steps[0][0]
            sel.register(client.sock, selectors.EVENT_WRITE, client)
        established = 0
        while established < TUNNELS:
            assert time.monotonic() < deadline, f"only {established} tunnels open"
            for key, events in sel.select(1.0):
                client = key.data
                if events & selectors.EVENT_WRITE:
                    client.out = client.out[client.sock.send(client.out) :]
                    if not client.out:
                        sel.modify(client.sock, selectors.EVENT_READ, client)
                    continue
                data = client.sock.recv(4096)
                assert data, f"{client.protocol}: closed during the handshake"
                client.inbuf += data
                want = client.expect
                done = (b"\r\n\r\n" in client.inbuf) if want == -1 else len(client.inbuf) >= want
                if not done:
                    continue
                if want == -1:
                    assert client.inbuf.startswith(b"HTTP/1.1 200 "), client.inbuf
                elif client.protocol == "socks5":
                    assert client.inbuf[1] == 0, client.inbuf
                else:
                    assert client.inbuf[1] == 90, client.inbuf
                client.inbuf = b""
                client.step += 1
                if client.step < len(client.steps):
                    client.out, client.expect = client.steps[client.step]
                    sel.modify(client.sock, selectors.EVENT_WRITE, client)
                else:
                    sel.unregister(client.sock)
                    established += 1
        sockets = server.count_fds()[1]
        assert sockets >= 2 * TUNNELS, "the server should hold both ends of every tunnel"

        # Phase 2: every client sends its frame and checks the digest.
        for client, payload in zip(clients, payloads, strict=True):
            client.out = len(payload).to_bytes(8, "big") + payload
            client.expect = 32
            sel.register(client.sock, selectors.EVENT_WRITE | selectors.EVENT_READ, client)
        verified = 0
        while verified < TUNNELS:
            assert time.monotonic() < deadline, f"only {verified} tunnels verified"
            for key, events in sel.select(1.0):
                client = key.data
                if events & selectors.EVENT_WRITE and client.out:
                    try:
                        client.out = client.out[client.sock.send(client.out) :]
                    except BlockingIOError:
                        pass
                    if not client.out:
                        sel.modify(client.sock, selectors.EVENT_READ, client)
                if events & selectors.EVENT_READ:
                    data = client.sock.recv(64)
                    assert data, "tunnel closed before the digest"
                    client.inbuf += data
                    if len(client.inbuf) >= 32:
                        assert client.inbuf == client.digest, "digest mismatch: bytes lost"
                        sel.unregister(client.sock)
                        client.sock.close()
                        verified += 1
    finally:
        sel.close()
        for client in clients:
            client.sock.close()
        target.close()
    assert target.errors == []
    assert target.answered == TUNNELS
    log = server.wait_log("result=ok", count=TUNNELS, timeout=30)
    tunnel_lines = [line for line in log.splitlines() if "event=tunnel" in line]
    assert len(tunnel_lines) == TUNNELS
    assert all("result=ok" in line for line in tunnel_lines)
    up = sum(int(line.split(" up=")[1].split()[0]) for line in tunnel_lines)
    down = sum(int(line.split(" down=")[1].split()[0]) for line in tunnel_lines)
    assert up == sum(8 + len(p) for p in payloads)
    assert down == 32 * TUNNELS
