"""Review: metrics of forwarded HTTP."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from test_serve_forward import Origin
from test_serve_metrics import scrape, value
from test_serve_support import ServeProcess

from support import pattern

Serve = Callable[..., ServeProcess]


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


def _get(server: ServeProcess, origin: Origin, n: int) -> None:
    request = (f"GET {origin.base}/bytes/{n} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
               "Connection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(pattern(n, 3))


def test_forwarded_request_leaves_no_open_tunnel(serve: Serve, origin: Origin) -> None:
    """One forwarded GET (Connection: close), all done: hopcat_open_tunnels back to 0, and one
    connect observed (one origin dialled)."""
    server = serve("--metrics", "127.0.0.1:0")
    _get(server, origin, 2)
    server.wait_log("event=tunnel")
    _types, samples = scrape(server)
    assert (value(samples, "hopcat_open_tunnels", protocol="http"),
            value(samples, "hopcat_connect_seconds_count")) == (0, 1)


def test_connect_after_forwarded_request_leaves_no_open_tunnel(
    serve: Serve, origin: Origin
) -> None:
    server = serve("--metrics", "127.0.0.1:0")
    get = f"GET {origin.base}/bytes/2 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    connect = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    inner = f"GET /bytes/6 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(get + connect.encode())
        got = b""
        while got.count(b"\r\n\r\n") < 2:
            got += sock.recv(65536)
        sock.sendall(inner.encode())
        while sock.recv(65536):
            pass
    server.wait_log("event=tunnel", count=3)
    _types, samples = scrape(server)
    assert value(samples, "hopcat_open_tunnels", protocol="http") == 0
