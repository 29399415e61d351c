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
from collections.abc import Iterator
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
