"""Shared test helpers: run the real hopcat entry point, and small loopback targets.

The targets are threads in the test process, bounded by socket timeouts, so a hopcat bug shows up
as a failed assertion rather than a hung test run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

HOPCAT = [sys.executable, "-m", "hopcat"]
CHUNK = 1 << 16


def pattern(size: int, seed: int) -> bytes:
    """Deterministic, non-repeating-looking data: a lost or reordered block changes the digest."""
    block = hashlib.sha256(f"{seed}".encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    out = bytearray()
    for index in range(reps):
        out += hashlib.sha256(block[:32] + index.to_bytes(8, "big")).digest() + block[32:]
    return bytes(out + block[:rest])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.lower().endswith("_proxy") or k.startswith(("SOCKS", "CONNECT_", "HOPCAT_")))
    }
    env.update(extra)
    return env


def run_hopcat(
    *args: str, input: bytes | None = b"", timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*HOPCAT, *args], input=input, capture_output=True, timeout=timeout, env=env or clean_env()
    )


class Exchange:
    """One connection: send ``down`` while reading everything the client sends.

    ``close_after_up``: None -> read to the client's EOF, then close (waits for our FIN);
    an int -> close once that many bytes arrived (the peer closes first, stdin may stay open).
    ``half_close``: shut our sending side after ``down`` is sent but keep reading to EOF.
    """

    def __init__(
        self,
        down: bytes = b"",
        *,
        close_after_up: int | None = None,
        half_close: bool = False,
        reply_digest: bool = False,
        family: int = socket.AF_INET,
        idle: bool = False,
    ) -> None:
        self.down = down
        self.close_after_up = close_after_up
        self.half_close = half_close
        self.reply_digest = reply_digest
        self.idle = idle
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.listener = socket.create_server((host, 0), family=family)
        self.listener.settimeout(30)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.saw_eof = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                if self.idle:
                    self.done.wait(30)
                    return
                sender = None
                if self.down and not self.reply_digest:
                    sender = threading.Thread(target=self._send, args=(conn,), daemon=True)
                    sender.start()
                elif self.half_close:
                    conn.shutdown(socket.SHUT_WR)
                while self.close_after_up is None or len(self.received) < self.close_after_up:
                    data = conn.recv(CHUNK)
                    if not data:
                        self.saw_eof = True
                        break
                    self.received += data
                if sender is not None:
                    sender.join(30)
                if self.reply_digest:
                    conn.sendall(f"{len(self.received)} {sha256(self.received)}\n".encode())
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
        finally:
            self.done.set()

    def _send(self, conn: socket.socket) -> None:
        try:
            conn.sendall(self.down)
            if self.half_close:
                conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self.done.set()
        self._thread.join(30)
        self.listener.close()


@contextlib.contextmanager
def exchange(*args: object, **kwargs: object) -> Iterator[Exchange]:
    server = Exchange(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


def silent_listener(host: str = "127.0.0.1") -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full, so further SYNs go unanswered (a "silent" host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(4):
        filler = socket.socket(family)
        filler.setblocking(False)
        filler.connect_ex((host, port))
        fillers.append(filler)
    return listener, fillers, port


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that is bound but not listening: connecting to it is refused while this is open."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


class Certificates(NamedTuple):
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost."""

    ca: Path  # trust this (``cafile=``)
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA and a certificate it signed for 127.0.0.1 and localhost (EC P-256, two
    days), made with the openssl program: (ca.crt, cert, key) in ``directory``."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
        "-subj", "/CN=hopcat test CA")  # fmt: skip
    run("req", *curve, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return Certificates(ca_crt, crt, key)


# -- scripted proxies: small in-test servers for what no real proxy does on demand -------------


class ScriptedServer:
    """A loopback listener running ``handler(conn)`` on a thread per connection; ``close()``
    closes every connection and joins the threads. ``accepted`` counts connections."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.listener = socket.create_server((host, 0), backlog=1024)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            conn.settimeout(30)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass  # the client went away: many tests are about exactly that
        except BaseException as exc:  # an assertion in a handler: surfaced by close()
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(10)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_exact(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def recv_until(conn: socket.socket, end: bytes, limit: int = 65536) -> bytes:
    """Byte by byte through ``end``: nothing past it is consumed."""
    data = bytearray()
    while not data.endswith(end):
        data += recv_exact(conn, 1)
        if len(data) > limit:
            raise ValueError(f"no {end!r} in {limit} bytes")
    return bytes(data)


def socks5_accept(
    conn: socket.socket, send: Callable[[bytes], None], *, auth: bool = False
) -> tuple[str, int]:
    """The server side of a SOCKS5 greeting (and RFC 1929 auth, any user accepted when
    ``auth``) and CONNECT request; returns the requested host and port (no reply sent)."""
    _version, count = recv_exact(conn, 2)
    methods = recv_exact(conn, count)
    if auth:
        assert 2 in methods, methods
        send(b"\x05\x02")
        _version, ulen = recv_exact(conn, 2)
        recv_exact(conn, ulen)
        recv_exact(conn, recv_exact(conn, 1)[0])
        send(b"\x01\x00")
    else:
        send(b"\x05\x00")
    _version, _command, _reserved, atyp = recv_exact(conn, 4)
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(conn, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(conn, 16))
    else:
        host = recv_exact(conn, recv_exact(conn, 1)[0]).decode()
    return host, int.from_bytes(recv_exact(conn, 2), "big")


def socks4_accept(conn: socket.socket) -> tuple[str, int]:
    """The server side of a SOCKS4 or 4a CONNECT request; returns host and port (no reply)."""
    head = recv_exact(conn, 8)
    port = int.from_bytes(head[2:4], "big")
    recv_until(conn, b"\0")  # user id
    if head[4:7] == b"\0\0\0" and head[7]:  # SOCKS4a: the name follows
        return recv_until(conn, b"\0")[:-1].decode(), port
    return socket.inet_ntoa(head[4:8]), port


def http_accept(conn: socket.socket) -> tuple[str, int, bytes]:
    """Read an HTTP CONNECT head; returns host, port and the whole head (no reply)."""
    head = recv_until(conn, b"\r\n\r\n")
    target = head.split(b" ", 2)[1].decode()
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port), head


SOCKS5_SUCCESS = b"\x05\x00\x00\x01" + bytes(6)  # bound 0.0.0.0:0
HTTP_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions ended (half-closes passed on)."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(60)
