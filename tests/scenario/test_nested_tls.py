"""TLS inside TLS for blocking callers: a TLS echo target reached through a TLS-terminating relay
(what an https:// proxy is once CONNECT has been answered)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopcat.net.nested_tls import NestedTLSSocket
from hopcat.net.tls import TLSLayers


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("nested-tls")
    crt, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def _client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture
def through_relay(certificate: tuple[Path, Path]) -> Iterator[NestedTLSSocket]:
    """A TLS session with socat, which terminates it and relays to a TLS echo server."""
    if not shutil.which("socat"):
        pytest.skip("socat needed (apt-get install socat)")
    server_context = _server_context(certificate)
    target = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = target.accept()
        with conn:
            try:
                tls = server_context.wrap_socket(conn, server_side=True)
            except ssl.SSLError:  # the client refused the certificate: a test's point
                return
            with tls:
                while data := tls.recv(65536):
                    tls.sendall(data)

    echoing = threading.Thread(target=echo, daemon=True)
    echoing.start()
    crt, key = certificate
    relay = subprocess.Popen(
        ["socat", "OPENSSL-LISTEN:0,bind=127.0.0.1,reuseaddr,verify=0,"
         f"cert={crt},key={key}", f"TCP:127.0.0.1:{target.getsockname()[1]}"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    outer = None
    try:
        relay_port = _listening_port(relay.pid)
        outer = NestedTLSSocket(
            socket.create_connection(("127.0.0.1", relay_port), timeout=10), TLSLayers()
        )
        outer.start_tls(_client_context(certificate), "localhost", label="proxy socat")
        yield outer
    finally:
        if outer is not None:
            outer.close()
        echoing.join(10)
        relay.terminate()
        relay.wait(10)
        relay.stderr.close()  # type: ignore[union-attr]
        target.close()


def _listening_port(pid: int) -> int:
    """socat's port, bound to 0: read from the process's listening socket."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd) if fd.exists() else ""
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                return int(fields[1].split(":")[1], 16)
        time.sleep(0.02)
    raise AssertionError("socat did not listen")


def _nested(outer: NestedTLSSocket, certificate: tuple[Path, Path]) -> NestedTLSSocket:
    outer.start_tls(_client_context(certificate), "localhost")
    return outer


def test_bytes_cross_both_ways_from_two_threads(
    through_relay: NestedTLSSocket, certificate: tuple[Path, Path]
) -> None:
    nested = _nested(through_relay, certificate)
    assert nested.version() and nested.getpeercert()["subject"]
    payload = os.urandom(6 << 20)
    received = hashlib.sha256()
    count = 0

    def read_all() -> None:
        nonlocal count
        while count < len(payload) and (data := nested.recv(100_000)):
            received.update(data)
            count += len(data)

    reader = threading.Thread(target=read_all)
    reader.start()
    view = memoryview(payload)
    for start in range(0, len(payload), 1 << 20):  # several writes while the reader runs
        nested.sendall(view[start : start + (1 << 20)])
    reader.join(30)
    assert count == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    nested.close()


def test_makefile_serves_http_client_style_reads(
    through_relay: NestedTLSSocket, certificate: tuple[Path, Path]
) -> None:
    nested = _nested(through_relay, certificate)
    lines = b"".join(b"line %d\r\n" % n for n in range(1000))
    nested.sendall(lines)
    with nested.makefile("rb") as stream:
        assert [stream.readline() for _ in range(1000)] == lines.splitlines(keepends=True)
        nested.close()  # the file keeps the connection open until it is closed too
        assert nested.fileno() != -1
    assert nested._sock.fileno() == -1


def test_a_certificate_for_another_name_fails_the_inner_handshake(
    through_relay: NestedTLSSocket, certificate: tuple[Path, Path]
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        through_relay.start_tls(_client_context(certificate), "elsewhere.example")


def test_timeouts_apply_to_each_read(
    through_relay: NestedTLSSocket, certificate: tuple[Path, Path]
) -> None:
    nested = _nested(through_relay, certificate)
    nested.settimeout(0.2)
    assert nested.gettimeout() == 0.2
    with pytest.raises(TimeoutError):
        nested.recv(10)  # the echo server has nothing to say
    with pytest.raises(ValueError, match="blocking"):
        nested.setblocking(False)
