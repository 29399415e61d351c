"""``hopcat serve`` against hostile clients: it answers correctly, keeps serving, leaks nothing.

The bad input: garbage first bytes, truncated greetings, wrong credentials, oversized fields,
random bytes, a slowloris, a thousand half-open connections, a per-client flood, running out of
descriptors. After each, a well-behaved client still gets its tunnel, and the server's descriptor
count (``/proc/PID/fd``: all, and sockets) is what it was before.
"""

from __future__ import annotations

import random
import resource
import socket
import time
from collections.abc import Callable

import peers
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    socks4_connect,
    socks5_connect,
    wait_closed,
)

from support import pattern, run_hopcat

Serve = Callable[..., ServeProcess]
USER, PASSWORD = "mallory-test", "correct horse"


def good_tunnel(server: ServeProcess, digest: peers.DigestServer, **auth: str) -> None:
    """A well-behaved SOCKS5 client still gets through (and leaves no state behind)."""
    with connect(server) as sock:
        assert socks5_connect(sock, digest.host, digest.port, **auth) == 0
        data = pattern(200_000, 1)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) == digest.answer_for(data)


def settled_fds(server: ServeProcess, expected: tuple[int, int] | None = None) -> tuple[int, int]:
    """The server's (descriptors, sockets) once every connection it has seen is closed: the
    ``expected`` counts, or (for a baseline) counts that stayed the same for 0.3 s."""
    deadline = time.monotonic() + 10
    last, since = server.count_fds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        counts = server.count_fds()
        if counts == expected:
            return counts
        if counts != last:
            last, since = counts, time.monotonic()
        elif expected is None and time.monotonic() - since >= 0.3:
            return counts
    return last


GARBAGE = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00" * 16, b"\xff\xfe",
           b"\r\n\r\n", b"get / HTTP/1.1\r\n\r\n", b"\x7fELF"]  # fmt: skip
SOCKS5_FAILURE = b"\x05\x01\x00\x01" + bytes(6)
SOCKS4_FAILURE = b"\x00\x5b" + bytes(6)
# A request cut short by the client's FIN, and the refusal its protocol has for it (rule 16).
TRUNCATED = [(b"\x05", b"\x05\xff"), (b"\x05\x02\x00", b"\x05\xff"),
             (b"\x05\x01\x00\x05\x01\x00\x03\x10abc", b"\x05\x00" + SOCKS5_FAILURE),
             (b"\x04\x01\x00\x50\x7f\x00", SOCKS4_FAILURE),
             (b"\x04\x01\x00\x50\x00\x00\x00\x01me\x00exam", SOCKS4_FAILURE),
             (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x", b"HTTP/1.1 400 ")]  # fmt: skip


def hostile_clients(server: ServeProcess) -> None:
    """One client per GARBAGE and TRUNCATED case, each answered (or dropped) as it should."""
    for data in GARBAGE:
        with connect(server) as sock:
            sock.sendall(data)
            answer = wait_closed(sock)
            assert answer in (b"",) or answer.startswith(b"HTTP/1.1 400 "), (data, answer)
    for data, refusal in TRUNCATED:
        with connect(server) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = wait_closed(sock)
            assert answer.startswith(refusal), (data, answer)


def test_garbage_truncation_and_oversize(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve()
    good_tunnel(server, digest_server)
    baseline = settled_fds(server)

    hostile_clients(server)

    # Oversized: a SOCKS4 user id without its NUL, a 70 KiB HTTP head, too many header lines.
    with connect(server) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300)
        assert wait_closed(sock) == SOCKS4_FAILURE
    for head in (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nX-Big: " + b"a" * 70_000,
                 b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n"):  # fmt: skip
        with connect(server) as sock:
            try:
                sock.sendall(head)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = wait_closed(sock)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    # Unknown SOCKS5 command and address type: the protocol's own replies (7 and 8).
    with connect(server) as sock:
        sock.sendall(b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_exact(sock, 2 + 4)[2:4] == b"\x05\x07"
    with connect(server) as sock:
        sock.sendall(b"\x05\x01\x00\x05\x01\x00\x09")
        assert recv_exact(sock, 2 + 4)[2:4] == b"\x05\x08"
    # A 255-byte name is legal; it does not resolve: reply 4, not a crash.
    with connect(server) as sock:
        assert socks5_connect(sock, ("a" * 63 + ".") * 3 + "b" * 63, 80) == 4

    good_tunnel(server, digest_server)
    assert settled_fds(server, baseline) == baseline
    log = server.log()
    assert log.count("result=protocol-error") >= len(GARBAGE) + 3
    assert "a TLS handshake" in log
    assert server.proc.poll() is None


def test_wrong_credentials(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--auth", f"{USER}:{PASSWORD}")
    with connect(server) as sock:
        assert (
            socks5_connect(sock, "127.0.0.1", digest_server.port, user=USER, password="nope") == -2
        )
        assert wait_closed(sock) == b""
    with connect(server) as sock:
        assert socks5_connect(sock, "127.0.0.1", digest_server.port) == -1  # no auth offered: 0xFF
    with connect(server) as sock:
        assert socks4_connect(sock, "127.0.0.1", digest_server.port) == 91  # SOCKS4 has no password
    import base64

    for credentials in (None, f"{USER}:nope", "no-colon", "\xff:\xfe"):
        with connect(server) as sock:
            header = ""
            if credentials is not None:
                token = base64.b64encode(credentials.encode("latin-1")).decode()
                header = f"Proxy-Authorization: Basic {token}\r\n"
            status, head = http_connect(sock, "127.0.0.1", digest_server.port, header)
            assert status == 407
            assert 'Proxy-Authenticate: Basic realm="hopcat"' in head
    with connect(server) as sock:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        status, _ = http_connect(sock, "127.0.0.1", digest_server.port,
                                 f"Proxy-Authorization: Basic {token}\r\n")  # fmt: skip
        assert status == 200
    good_tunnel(server, digest_server, user=USER, password=PASSWORD)
    log = server.log()
    assert log.count("result=auth-failed") == 7
    assert PASSWORD not in log and "nope" not in log


def test_random_bytes(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--handshake-timeout", "2")
    good_tunnel(server, digest_server)
    baseline = settled_fds(server)
    rng = random.Random(1929)
    for _ in range(150):
        first = rng.choice([0x04, 0x05, 0x43, rng.randrange(256)])
        data = bytes([first]) + rng.randbytes(rng.randrange(0, 600))
        with connect(server) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may answer and close before we are done sending
            wait_closed(sock)
    good_tunnel(server, digest_server)
    assert settled_fds(server, baseline) == baseline


def test_slowloris(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--handshake-timeout", "1")
    request = f"CONNECT 127.0.0.1:{digest_server.port} HTTP/1.1\r\nHost: x\r\n".encode()
    with connect(server) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in request + b"X-Pad: " + b"a" * 100:
            try:
                sock.send(bytes((byte,)))
            except OSError:
                closed_after = time.monotonic() - started
                break
            sock.settimeout(0.15)
            try:
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
        assert closed_after is not None, "still open after a slow, endless head"
        assert 0.9 < closed_after < 3.0
    good_tunnel(server, digest_server)
    assert "result=handshake-timeout" in server.wait_log("result=handshake-timeout")


def test_a_thousand_half_open_connections(serve: Serve, digest_server: peers.DigestServer,
                                          http_target: peers.HttpTarget) -> None:  # fmt: skip
    server = serve("--max-conns-per-client", "0", "--handshake-timeout", "30")
    good_tunnel(server, digest_server)
    baseline = settled_fds(server)
    hostile: list[socket.socket] = []
    try:
        for index in range(1000):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # the flood comes from another loopback address
            sock.settimeout(10)
            sock.connect((server.host, server.port))
            sock.sendall([b"", b"\x05", b"\x04\x01", b"CONNECT 1"][index % 4])
            hostile.append(sock)
        deadline = time.monotonic() + 20
        while server.count_fds()[1] < baseline[1] + 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.count_fds()[1] >= baseline[1] + 1000
        for _ in range(3):
            good_tunnel(server, digest_server)  # still serving, from the other address
        result = run_hopcat("-x", server.url("http"), http_target.host, str(http_target.port),
                            input=b"GET / HTTP/1.0\r\n\r\n")  # fmt: skip
        assert result.stdout.endswith(http_target.body), result.stderr
    finally:
        for sock in hostile:
            sock.close()
    assert settled_fds(server, baseline) == baseline
    assert server.log().count("result=client-closed") >= 1000


def test_per_client_limit_and_client_rules(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--max-conns-per-client", "3", "--deny-client", "127.0.0.3")
    held = [connect(server) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"\x05")  # let the server see each one
        time.sleep(0.3)
        with connect(server) as extra:
            assert wait_closed(extra, 5) == b""  # the 4th from 127.0.0.1: closed at once
        other = connect(server, source="127.0.0.2")  # another client is not limited
        with other:
            assert socks5_connect(other, digest_server.host, digest_server.port) == 0
        with connect(server, source="127.0.0.3") as denied:
            assert wait_closed(denied, 5) == b""
    finally:
        for sock in held:
            sock.close()
    server.wait_log("result=client-closed", count=3)  # the slots are free once it has seen that
    good_tunnel(server, digest_server)
    log = server.wait_log("result=limit")
    if "result=client-denied" not in log:  # refusals are logged at most once a second
        assert "client-denied:1" in server.wait_log("event=refusals unlogged=")


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


def test_out_of_descriptors_at_accept(serve: Serve, digest_server: peers.DigestServer) -> None:
    """EMFILE at accept backs off and logs; once descriptors free up, service resumes."""
    server = serve("--max-conns-per-client", "0", preexec_fn=_low_fd_limit)
    good_tunnel(server, digest_server)
    baseline = settled_fds(server)
    held = []
    try:
        for _ in range(60):
            sock = socket.socket()
            sock.settimeout(10)
            sock.connect((server.host, server.port))  # the kernel's backlog takes them all
            held.append(sock)
        server.wait_log("event=accept-error")
        assert "too many open files" in server.log()
        assert server.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while True:  # the backlog drains after the back-off; then a good client gets through again
        try:
            good_tunnel(server, digest_server)
            break
        except (AssertionError, OSError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert settled_fds(server, baseline) == baseline
