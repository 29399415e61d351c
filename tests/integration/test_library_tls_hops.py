"""The library through several TLS hops: an https:// proxy (socat's TLS in front of tinyproxy)
and a SOCKS5-over-TLS one (socat's TLS in front of Dante), then TLS to the target inside both:
three sessions, each inside the one before, in the blocking API and on asyncio."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest

import hopcat
import hopcat.aio
from hopcat.net.nested_tls import NestedTLSSocket
from support import Certificates, make_certificates

PAYLOAD = os.urandom(3 << 20)


@pytest.fixture(scope="module")
def tls_hops(socat_https: peers.Daemon, socat_socks_tls: peers.Daemon) -> list[str]:
    """[https://..., socks5h+tls://...]: two independent TLS terminators in front of real proxies."""
    return [socat_https.url, socat_socks_tls.url_as("socks5h+tls")]


@pytest.fixture
def tls_echo(certificates: Certificates) -> Iterator[int]:
    """A TLS echo server on loopback (one connection); its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(1 << 16):
                    tls.sendall(data)
        except OSError:  # a test that never reaches it knocks without TLS to end it
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(30)
    listener.close()


def _client_context(certificates: Certificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificates.ca))


def test_blocking_api_three_sessions_deep(
    tls_hops: list[str], tls_echo: int, certificates: Certificates
) -> None:
    context = _client_context(certificates)
    sock = hopcat.create_connection(("127.0.0.1", tls_echo), 30, via=tls_hops, proxy_ssl=context,
                                    ssl=context)  # fmt: skip
    assert isinstance(sock, NestedTLSSocket)
    assert sock.getpeercert()["subject"] == ((("commonName", "127.0.0.1"),),)
    received = hashlib.sha256()
    count = 0

    def read_all() -> None:
        nonlocal count
        while count < len(PAYLOAD) and (data := sock.recv(1 << 16)):
            received.update(data)
            count += len(data)

    reader = threading.Thread(target=read_all)
    reader.start()
    sock.sendall(PAYLOAD)
    reader.join(60)
    sock.close()
    assert count == len(PAYLOAD) and received.digest() == hashlib.sha256(PAYLOAD).digest()


def test_asyncio_three_sessions_deep(
    tls_hops: list[str], tls_echo: int, certificates: Certificates
) -> None:
    context = _client_context(certificates)

    async def exchange() -> bytes:
        reader, writer = await hopcat.aio.open_connection(
            "127.0.0.1", tls_echo, via=tls_hops, proxy_ssl=context, ssl=context, timeout=30
        )
        writer.write(PAYLOAD)
        echoed = await reader.readexactly(len(PAYLOAD))
        writer.close()
        await writer.wait_closed()
        return echoed

    assert hashlib.sha256(asyncio.run(exchange())).digest() == hashlib.sha256(PAYLOAD).digest()


def test_untrusted_second_hop_names_that_hop(
    tls_hops: list[str], tls_echo: int, certificates: Certificates, tmp_path: Path
) -> None:
    """The first hop trusted, the second not (a context without the CA for it): the error is
    the second hop's, and nothing reaches the target."""
    other = make_certificates(tmp_path)
    wrong = ssl.create_default_context(cafile=str(other.ca))
    with pytest.raises(ConnectionError) as caught:
        hopcat.create_connection(("127.0.0.1", tls_echo), 30, via=tls_hops, proxy_ssl=wrong)
    assert caught.value.hop == 1  # type: ignore[attr-defined]
    assert "certificate not trusted" in str(caught.value)
    # Unblock the echo server's accept.
    socket.create_connection(("127.0.0.1", tls_echo)).close()


def test_shutdown_write_half_closes_inside_the_sessions(
    tls_hops: list[str], certificates: Certificates
) -> None:
    """``shutdown(SHUT_WR)`` on the blocking API's TLS socket is the target session's
    close_notify: the target reads to its end, answers, and the answer still arrives through
    both TLS hops (a TCP FIN would have ended the hops' sessions)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def digest_server() -> None:
        conn, _ = listener.accept()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        digest = hashlib.sha256()
        with conn:
            while True:
                try:
                    data = tls.read(1 << 16)
                except ssl.SSLWantReadError:
                    conn.sendall(outgoing.read())
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return
                    incoming.write(chunk)
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not data:  # close_notify, when this side has not sent its own
                    break
                digest.update(data)
            tls.write(digest.hexdigest().encode())
            try:
                tls.unwrap()
            except ssl.SSLError:
                pass
            conn.sendall(outgoing.read())

    thread = threading.Thread(target=digest_server, daemon=True)
    thread.start()
    client = _client_context(certificates)
    sock = hopcat.create_connection(("127.0.0.1", listener.getsockname()[1]), 30, via=tls_hops,
                                    proxy_ssl=client, ssl=client)  # fmt: skip
    sock.sendall(PAYLOAD)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while data := sock.recv(1 << 16):
        answer += data
    sock.close()
    thread.join(30)
    listener.close()
    assert answer == hashlib.sha256(PAYLOAD).hexdigest().encode()
