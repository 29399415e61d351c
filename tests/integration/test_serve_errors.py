"""``hopcat serve``'s refusals as a client sees them on a raw socket, and the log line for each.

The HTTP cases are the HTTP proxy *server* cases of nmap's ``ncat/test/ncat-test.pl`` (ncat
``--proxy-type http``), with the status hopcat answers:

==========================================  =====  =======================================
ncat test                                   ncat   hopcat
==========================================  =====  =======================================
HTTP proxy bad request (``bad``)            400    400 (a lower-case start is no method)
HTTP CONNECT no port number (``h``, ``h:``) 400    400
HTTP CONNECT IPv6 address, no port number   400    400
HTTP CONNECT overlong Request-Line (24000)  413    414 (ncat's test takes 413 or 414)
HTTP CONNECT overlong header (10000 lines)  413    431 (RFC 6585's code for exactly this)
HTTP CONNECT good request                   200    200 (no Host header: nc -X connect
                                                   and other HTTP/1.0 clients send none)
HTTP proxy unknown method (``NOTHING``)     405    forwarded: every method is, as Squid and
                                                   tinyproxy do (WebDAV, extension methods);
                                                   405 with ``--no-forward``
HTTP GET hostname only (``GET host``)       400    400
HTTP GET path only (``GET /``)              400    400 (this is a proxy: an absolute URL)
HTTP CONNECT IPv4-only proxy, v6 target     504    502 (see test_serve_families.py)
==========================================  =====  =======================================

ncat predates RFC 6585 and answers 413 ("Request Entity Too Large", a body code) for any head it
will not read; its own test insists on 413 for the header block, but no client acts on the
difference, and 431 tells an operator reading a capture what was too large. Further cases of
the same kind: a missing or garbled version (400), a well-formed version other than 1.x (505),
a CONNECT port out of range (400), credentials in a CONNECT target or a URL (400, never echoed).
Every refusal has a one-line text/plain
body (the log line's reason, which quotes no header value and no credentials) and
``Connection: close``.

The SOCKS refusals not covered elsewhere: SOCKS5 reply 8 (an unknown address type), reply 4 (a
name that does not resolve) and reply 5 (refused), SOCKS4a 91.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import peers
import pytest
from test_serve_support import (
    IO_TIMEOUT_S,
    ServeProcess,
    connect,
    recv_exact,
    serve_factory,
    socks4_connect,
    socks5_connect,
    wait_closed,
)

NCAT_CASES = [
    ("bad request", b"bad\r\n\r\n", 400, "request line starts with a lower-case letter"),
    ("lower-case method", b"connect 127.0.0.1:9 HTTP/1.1\r\n\r\n", 400, "lower-case letter"),
    ("no port", b"CONNECT 127.0.0.1 HTTP/1.0\r\n\r\n", 400, "has no port"),
    ("no port, colon", b"CONNECT 127.0.0.1: HTTP/1.0\r\n\r\n", 400, "has no port"),
    ("IPv6, no port", b"CONNECT [::1] HTTP/1.0\r\n\r\n", 400, "has no port"),
    ("IPv6, no port, colon", b"CONNECT [::1]: HTTP/1.0\r\n\r\n", 400, "has no port"),
    ("bad port", b"CONNECT 127.0.0.1:65536 HTTP/1.0\r\n\r\n", 400, "malformed CONNECT target"),
    ("no version", b"CONNECT 127.0.0.1:9\r\n\r\n", 400, "malformed request line"),
    ("garbled version", b"CONNECT 127.0.0.1:9 HTTP/x\r\n\r\n", 400, "unsupported HTTP version"),
    ("HTTP/2.0", b"CONNECT 127.0.0.1:9 HTTP/2.0\r\n\r\n", 505, "unsupported HTTP version"),
    ("overlong request line", b"CONNECT " + b"A" * 24000 + b":9 HTTP/1.0\r\n\r\n", 414,
     "request line is longer than 8192 bytes"),
    ("overlong header", b"CONNECT 127.0.0.1:9 HTTP/1.0\r\n" + b"Header: Value\r\n" * 10000
     + b"\r\n", 431, "more than 100 header lines"),
    ("overlong head", b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "request head is larger than 65536 bytes"),
    ("credentials in the target", b"CONNECT user:hunter2@h:9 HTTP/1.1\r\n\r\n", 400,
     "malformed CONNECT target"),
    # Plain HTTP (the forwarder's answers): a proxy is asked for absolute http:// URLs.
    ("GET hostname only", b"GET 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400,
     "authority-form target"),
    ("GET path only", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "origin-form request"),
    ("credentials in the URL", b"GET http://user:hunter2@h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400,
     "userinfo in the request URL"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    factory = serve_factory(tmp_path_factory.mktemp("serve-errors"))
    start = next(factory)
    yield start("--log-format", "json", "--connect-timeout", "3")
    next(factory, None)


def tunnel_line(server: ServeProcess, sock_name: tuple[Any, ...]) -> dict[str, Any]:
    """The log line of the connection made from ``sock_name``."""
    client = f"{sock_name[0]}:{sock_name[1]}"
    deadline = time.monotonic() + IO_TIMEOUT_S
    while True:
        for line in server.json_log():
            if line.get("event") == "tunnel" and line.get("client") == client:
                return line
        assert time.monotonic() < deadline, f"no log line for {client}:\n{server.log()}"
        time.sleep(0.02)


def exchange(server: ServeProcess, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send ``data`` and the end of it, as ncat's test does; the answer and the log line."""
    with connect(server) as sock:
        name = sock.getsockname()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all of it was sent: the answer is waiting
        answer = wait_closed(sock)
    return answer, tunnel_line(server, name)


@pytest.mark.parametrize(
    ("data", "status", "reason"), [case[1:] for case in NCAT_CASES], ids=[c[0] for c in NCAT_CASES]
)
def test_http_refusals(server: ServeProcess, data: bytes, status: int, reason: str) -> None:
    answer, line = exchange(server, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), answer[:200]
    fields = dict(item.split(": ", 1) for item in lines[1:])
    assert fields["Connection"] == "close" and fields["Content-Type"].startswith("text/plain")
    assert int(fields["Content-Length"]) == len(body) and body.count(b"\n") == 1
    assert reason in body.decode() and b"hunter2" not in answer
    assert line["result"] == "protocol-error" and reason in line["reason"], line
    assert line["proto"] == "http" and "hunter2" not in json.dumps(line)


def test_good_request_after_refusals(server: ServeProcess, digest_server: peers.DigestServer) -> None:
    # ncat's "HTTP CONNECT good request", and the server is still well after the bad ones.
    request = f"CONNECT {digest_server.host}:{digest_server.port} HTTP/1.0\r\n\r\nabc".encode()
    with connect(server) as sock:
        sock.sendall(request)  # "abc" before the answer: ncat's "doesn't consume anything after"
        assert recv_exact(sock, 12) == b"HTTP/1.1 200"
        sock.shutdown(socket.SHUT_WR)  # after the answer: a FIN while connecting means "gone"
        answer = wait_closed(sock)
    assert answer.partition(b"\r\n\r\n")[2] == digest_server.answer_for(b"abc")


def test_socks_refusals(server: ServeProcess) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nothing listens on (bound, never listening)
    port = closed.getsockname()[1]
    try:
        with connect(server) as sock:
            assert socks5_connect(sock, "127.0.0.1", port) == 5
        with connect(server) as sock:
            assert socks5_connect(sock, "nonexistent.invalid", 80) == 4
        with connect(server) as sock:
            assert socks4_connect(sock, "nonexistent.invalid", 80) == 91
        with connect(server) as sock:
            name = sock.getsockname()
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x02" + bytes(6))  # address type 2 does not exist
            assert recv_exact(sock, 10)[:2] == b"\x05\x08"
            assert wait_closed(sock) == b""
        line = tunnel_line(server, name)
        assert line["result"] == "unsupported" and "address type" in line["reason"], line
    finally:
        closed.close()


def test_ncat_client_sees_the_refusal(server: ServeProcess) -> None:
    """ncat as the client (``--proxy-type http``): a refused CONNECT ends it with an error
    naming the status, not a hang."""
    ncat = peers.require_program("ncat", "ncat")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        result = subprocess.run(
            [ncat, "--proxy", f"{server.host}:{server.port}", "--proxy-type", "http",
             "127.0.0.1", str(closed.getsockname()[1])],
            input=b"", capture_output=True, timeout=IO_TIMEOUT_S, check=False,
        )  # fmt: skip
    finally:
        closed.close()
    assert result.returncode != 0
    assert b"502" in result.stderr, result.stderr
