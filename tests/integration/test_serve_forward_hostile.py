"""Plain HTTP forwarding against hostile or broken clients and origins: each test is a bug a
review found (a crash, a desync, a leak into the log, a hang), kept fixed."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_serve_forward import Origin, origin, raw_exchange, read_head  # noqa: F401 (fixture)
from test_serve_support import IO_TIMEOUT_S, ServeProcess, serve_factory

from support import ScriptedServer

Serve = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


def test_connection_naming_content_length_is_harmless(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """``Connection: content-length`` drops Content-Length from the forwarded head (end_to_end),
    h11 then frames the request with no body and ``up.send(Data)`` raises LocalProtocolError,
    which escapes as an internal error with a traceback."""
    server = serve("--allow-open")
    req = (
        f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        "Content-Length: 5\r\nConnection: content-length\r\n\r\nhello"
    ).encode()
    try:
        heads, _, _ = raw_exchange(server, req)
    except Exception:  # h11 on the test's side: the proxy closed without an answer
        heads = []
    time.sleep(0.3)
    log = server.log()
    assert "internal error" not in log and "Traceback" not in log, log
    assert heads and heads[0].status_code in (200, 400)


def test_connect_with_bad_chunked_body_is_refused(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """A CONNECT after a forwarded request, with a malformed chunked body: _tunnel calls
    cli.next_event() unguarded, h11.RemoteProtocolError escapes -> internal error."""
    server = serve("--allow-open")
    get = f"GET {origin.base}/bytes/2 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    connect = (
        f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall((get + connect).encode())
        time.sleep(0.5)
    log = server.log()
    assert "internal error" not in log and "Traceback" not in log, log


def test_h11_error_keeps_credentials_out_of_the_log(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """A later request with a malformed header line: h11's message quotes the whole line, and
    the refusal's reason (log line) carries the credentials in it."""
    server = serve("--allow-open")
    secret = "sid=8f14e45fceea167a5a36dedd4bea2543"  # a session cookie for the origin
    ok = f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    bad = (
        f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Cookie : {secret}\r\n\r\n"
    )
    heads, _, _ = raw_exchange(server, (ok + bad).encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 400]
    server.wait_log("status=400")
    assert secret not in server.log(), server.log()


def test_bad_origin_header_keeps_its_secret_out_of_the_log(serve: Serve) -> None:
    """The same from the other side: an origin's malformed Set-Cookie line is a 502, and the
    log line's reason has h11's verdict without the line it quotes."""
    secret = "sid=1679091c5a880faf6fb5e6087eb1b2dc"

    def handler(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(f"HTTP/1.1 200 OK\r\nSet-Cookie : {secret}\r\n\r\n".encode())

    bad = ScriptedServer(handler)
    try:
        server = serve()
        get = f"GET http://127.0.0.1:{bad.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{bad.port}\r\n\r\n"
        heads, _, _ = raw_exchange(server, get.encode())
        assert heads[0].status_code == 502
        server.wait_log("status=502")
        assert secret not in server.log(), server.log()
    finally:
        bad.close()


def test_origin_extra_bytes_never_answer_the_next_request(serve: Serve) -> None:
    """An origin that sends more than its Content-Length in the same read: the surplus stays in
    h11's buffer, _reusable() only peeks the socket, and the surplus is taken as the answer to
    the client's next request (response desync)."""

    def handler(conn: socket.socket) -> None:
        while head := read_head(conn):
            if head.startswith(b"GET /a "):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
                )
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")

    evil = ScriptedServer(handler)
    try:
        server = serve("--allow-open")
        one = f"GET http://127.0.0.1:{evil.port}/a HTTP/1.1\r\nHost: 127.0.0.1:{evil.port}\r\n\r\n"
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(one.encode())
            got = b""
            while not got.endswith(b"hi"):
                got += sock.recv(65536)
            time.sleep(0.3)
            sock.sendall(one.replace("/a", "/b").encode())
            got = b""
            while got.count(b"\r\n\r\n") < 1 or len(got.partition(b"\r\n\r\n")[2]) < 4:
                got += sock.recv(65536)
        assert got.endswith(b"real"), got
    finally:
        evil.close()


def _digest(method: str, uri: str, nonce: str, nc: int, user: str, password: str) -> str:
    def h(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    cnonce = "0a4f113b"
    ha1, ha2 = h(f"{user}:hopcat:{password}"), h(f"{method}:{uri}")
    response = h(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
    return (
        f'Digest username="{user}", realm="hopcat", nonce="{nonce}", uri="{uri}", '
        f'qop=auth, nc={nc:08x}, cnonce="{cnonce}", response="{response}", algorithm=MD5'
    )


def test_stale_digest_on_kept_connection_is_no_failed_login(
    serve: Serve,
    origin: Origin,  # noqa: F811
) -> None:
    """A right Digest answer with an expired nonce on a later request of a kept connection:
    the handler answers stale=true and does not count it; the forwarder counts a failed login
    and sends no stale=true (a client then asks its user for the password again)."""
    server = serve("--auth", "alice:pw", "--auth-scheme", "digest", "--nonce-lifetime", "1")
    url = f"{origin.base}/bytes/1"
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        head = read_head(sock).decode()
    nonce = head.split('nonce="')[1].split('"')[0]
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
        auth = _digest("GET", url, nonce, 1, "alice", "pw")
        sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        first = read_head(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(2.2)
        auth = _digest("GET", url, nonce, 2, "alice", "pw")
        sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        second = read_head(sock)
    assert second.startswith(b"HTTP/1.1 407"), second
    assert b"stale=true" in second, second
    assert "event=limit" not in server.log()


def test_silent_origin_gets_504_after_answer_timeout(serve: Serve) -> None:
    """With no --idle-timeout (the default), an origin that takes the request and never answers
    is given up after --answer-timeout: the client gets a 504 and the origin connection is
    closed, even when the client has half-closed meanwhile."""
    closed_at: list[float] = []

    def handler(conn: socket.socket) -> None:
        read_head(conn)
        conn.settimeout(6)
        try:
            if conn.recv(1) == b"":
                closed_at.append(time.monotonic())
        except OSError:
            closed_at.append(time.monotonic())

    silent = ScriptedServer(handler)
    try:
        server = serve("--answer-timeout", "1")
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            started = time.monotonic()
            sock.sendall(
                f"GET http://127.0.0.1:{silent.port}/ HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{silent.port}\r\n\r\n".encode()
            )
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 504 ") and b"no answer in 1 s" in answer
        assert 0.9 < time.monotonic() - started < 5
        server.wait_log("status=504")
        deadline = time.monotonic() + IO_TIMEOUT_S
        while not closed_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert closed_at, "origin connection still open"
    finally:
        silent.close()


def test_trailers_lose_hop_by_hop_fields(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """A chunked request's trailer section loses its hop-by-hop fields before it reaches the
    origin: a Proxy-Authorization trailer, and a field the request head's Connection names;
    an end-to-end trailer stays."""
    server = serve("--allow-open")
    req = (
        f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        "Connection: X-Hop\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        "Proxy-Authorization: Basic Ym9iOnNlY3JldA==\r\nX-Hop: 1\r\nX-Sum: 2\r\n\r\n"
    ).encode()
    heads, _, _ = raw_exchange(server, req)
    assert heads[0].status_code == 200
    raw = bytes(origin.raw[-1])
    assert b"Proxy-Authorization" not in raw and b"X-Hop" not in raw, raw
    assert b"X-Sum: 2" in raw, raw


def test_sigterm_drain_does_not_serve_new_requests(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """SIGTERM while a kept connection has a request in flight: its answer says
    ``Connection: close`` and the connection ends after it, so no new request is forwarded
    during the drain and the server stops as soon as the answer is out (not after the 75 s
    keep-alive deadline or --grace)."""

    def handler(conn: socket.socket) -> None:
        while read_head(conn):
            time.sleep(1.0)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    slow = ScriptedServer(handler)
    try:
        server = serve("--allow-open", "--grace", "60")
        get = (
            f"GET http://127.0.0.1:{slow.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{slow.port}\r\n\r\n"
        ).encode()
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(get)
            time.sleep(0.3)
            started = time.monotonic()
            server.send_signal(15)
            got = b""
            while not got.endswith(b"ok"):
                got += sock.recv(65536)
            head = got.partition(b"\r\n\r\n")[0].lower()
            try:
                sock.sendall(get)
                second = sock.recv(65536)
            except OSError:
                second = b""
        assert b"connection: close" in head and second == b"", (head, second)
        assert server.stop(timeout=10) is not None
        assert time.monotonic() - started < 5
    finally:
        slow.close()


def test_host_header_from_the_parsed_authority(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """split_target() cuts the authority at "/" or "?" but not at "#", while http_url_authority()
    (the address dialled and checked) cuts at "#" too: the origin gets a Host header that is not
    the authority that was checked (``Host: 127.0.0.1:P#.evil.example``)."""
    server = serve("--allow-open")
    req = (
        f"GET http://127.0.0.1:{origin.port}#.evil.example/bytes/1 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{origin.port}\r\n\r\n"
    ).encode()
    heads, _, _ = raw_exchange(server, req)
    if heads[0].status_code == 200:
        host = {n.lower(): v for n, v in origin.requests[-1][2]}[b"host"]
        assert host == f"127.0.0.1:{origin.port}".encode(), host


def test_limits_of_later_heads_match_the_first(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """The first head is refused with 431 past MAX_HEADER_LINES (100) header lines; a later
    head on the same connection (parsed by h11) is not."""
    server = serve("--allow-open")
    many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    req = f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
    heads, _, _ = raw_exchange(server, (req + many + "\r\n").encode())
    assert heads[0].status_code == 431
    heads, _, _ = raw_exchange(server, (req + "\r\n" + req + many + "\r\n").encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 431]


def test_later_request_line_checks_match_the_first(serve: Serve, origin: Origin) -> None:  # noqa: F811
    """The first request line is refused for a lower-case method (400) and past 8192 bytes
    counting method and version (414); later ones on the same connection (h11) are forwarded."""
    server = serve("--allow-open")
    ok = f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    lower = f"get {origin.base}/x HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    heads, _, _ = raw_exchange(server, lower.encode())
    assert heads[0].status_code == 400
    heads, _, _ = raw_exchange(server, (ok + lower).encode(), responses=2)
    statuses = [h.status_code for h in heads]
    long_target = f"{origin.base}/" + "a" * (8190 - len(origin.base) - 1)
    long = f"GET {long_target} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    heads, _, _ = raw_exchange(server, long.encode())
    assert heads[0].status_code == 414
    heads, _, _ = raw_exchange(server, (ok + long).encode(), responses=2)
    assert (statuses, [h.status_code for h in heads]) == ([200, 400], [200, 414])


def test_early_answer_while_origin_stops_reading(serve: Serve) -> None:
    """An origin answers a large upload at once and then stops reading (socket kept open):
    the answer is complete, but _pump's final _flush() still waits to push the queued body
    bytes into the origin, with no deadline: the client connection is neither closed nor
    logged, and when the origin finally closes the client gets a reset (result=reset)."""

    def handler(conn: socket.socket) -> None:
        read_head(conn)
        time.sleep(1)  # not reading: the socket buffers toward it fill up
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(4)

    early = ScriptedServer(handler)
    try:
        server = serve("--allow-open")
        size = 200_000_000
        head = (
            f"POST http://127.0.0.1:{early.port}/up HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{early.port}\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(head)

            def upload() -> None:
                try:
                    for _ in range(size // 65536):
                        sock.sendall(b"x" * 65536)
                except OSError:
                    pass

            threading.Thread(target=upload, daemon=True).start()
            got = b""
            while not got.endswith(b"ok"):
                got += sock.recv(65536)
            sock.settimeout(2)
            try:
                ended = sock.recv(65536) == b""
            except TimeoutError:
                ended = False
            except OSError:
                ended = True
            assert ended, "client connection neither closed nor answered 2 s after the answer"
        time.sleep(3)
        assert "result=reset" not in server.log(), server.log()
    finally:
        early.close()
