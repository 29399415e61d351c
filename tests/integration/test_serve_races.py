"""Races and timing edges of the server that a review found (each was a bug): a slow
client upload against --answer-timeout, SIGTERM during a forwarded request's dial, a signal
right after fork, rules reloaded during a dial."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_serve_forward import next_status, read_head
from test_serve_support import IO_TIMEOUT_S, ServeProcess, serve_factory

from support import ScriptedServer

Serve = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


def test_answer_timeout_spares_a_slow_client_upload(serve: Serve) -> None:
    """--answer-timeout is "an origin that sends no answer for SECS", but _pump arms it on every
    wait until the response head, whoever is silent: a client streaming a chunked upload with a
    pause longer than SECS (the origin read everything so far and waits for the rest, as it
    must) gets a 504 "the origin sent no answer" and its upload is cut."""
    got_body: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        data = read_head(conn)
        while not data.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        got_body.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    origin = ScriptedServer(handler)
    try:
        server = serve("--answer-timeout", "1")
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(
                f"POST http://127.0.0.1:{origin.port}/up HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{origin.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\nfirst\r\n".encode()
            )
            time.sleep(2.0)  # the client's source is slow (curl -T - from a pipe, say)
            try:
                sock.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
            except OSError:
                pass
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), (answer, server.log())
    finally:
        origin.close()


def test_forwarded_request_being_dialled_at_sigterm_gets_503(serve: Serve) -> None:
    """SIGTERM while a forwarded request's origin is being dialled (here: a --via hop that
    has not answered yet): stop() closes the pending connection and Forwarder.close() sends
    nothing, so the client gets a bare EOF for its request, where a CONNECT in the same state
    gets its 503 (README: "whatever ends a handshake (... the server stopping) gets the
    protocol's own refusal, never a bare EOF")."""

    def mute(conn: socket.socket) -> None:
        conn.recv(64)
        time.sleep(5)

    hop = ScriptedServer(mute)
    try:
        answers = []
        for request in (
            "GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n\r\n",
            "CONNECT example.invalid:80 HTTP/1.1\r\nHost: example.invalid:80\r\n\r\n",
        ):
            server = serve("--via", f"socks5h://127.0.0.1:{hop.port}")
            with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as s:
                s.sendall(request.encode())
                time.sleep(0.5)
                server.send_signal(15)
                answer = b""
                try:
                    while chunk := s.recv(65536):
                        answer += chunk
                except OSError:
                    pass
            answers.append(answer.partition(b"\r\n")[0])
            server.stop(timeout=10)
        assert answers[1].startswith(b"HTTP/1.1 503"), answers  # CONNECT: answered
        assert answers[0].startswith(b"HTTP/1.1 503"), answers  # forwarded GET: bare EOF
    finally:
        hop.close()


_RACE = r'''
import asyncio, os, signal
from hopcat.server.cli import finish, parse_args
from hopcat.server import serve

parent = os.getpid()
real = asyncio.events._set_running_loop
def patched(loop):
    if loop is None and os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # reaches the worker just after fork
    return real(loop)
asyncio.events._set_running_loop = patched
signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
signal.alarm(3)
serve.run(finish(parse_args(["--workers", "2", "-q", "127.0.0.1:0"])))
'''


def test_signal_to_a_new_worker_stays_the_workers(tmp_path: Path) -> None:
    """A signal that reaches a worker between fork() and its set_wakeup_fd(-1) runs the
    inherited C handler, which writes the signal number into the supervisor's wakeup socket
    (the very same socket, shared by fork): the supervisor acts on a signal sent to the worker.
    Here SIGTERM reached each new worker only (a group-wide stop during a restart gives the
    supervisor its own copy as well): the supervisor counts two and ends everything at once
    ("second signal"), where nothing was sent to it."""
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(_RACE)
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=env
    )
    supervisor = [
        line for line in done.stderr.splitlines() if "event=shutdown" in line and "worker=" not in line
    ]
    assert "second signal" not in "\n".join(supervisor), done.stderr


def _slow_socks5_hop(delay_s: float) -> ScriptedServer:
    """A SOCKS5 hop (no auth, CONNECT to an IPv4 address) that waits ``delay_s`` before
    dialling, then relays."""
    import select
    import struct

    def handler(conn: socket.socket) -> None:
        conn.recv(3)
        conn.sendall(b"\x05\x00")
        request = b""
        while len(request) < 10:
            request += conn.recv(10 - len(request))
        host = socket.inet_ntoa(request[4:8])
        (port,) = struct.unpack("!H", request[8:10])
        time.sleep(delay_s)
        target = socket.create_connection((host, port))
        conn.sendall(b"\x05\x00\x00\x01" + b"\x00" * 6)
        with target:
            while True:
                ready, _, _ = select.select([conn, target], [], [], 10)
                if not ready:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (target if src is conn else conn).sendall(data)

    return ScriptedServer(handler)


def test_rules_reloaded_during_the_dial_apply_to_the_kept_connection(
    serve: Serve, tmp_path: Path
) -> None:
    """_connect records origin_policy after the dial, so a SIGHUP that lands while the origin is
    being dialled (here through a --via hop that takes 1.5 s) marks a connection the old rules
    checked as checked by the new ones: the next request to that origin on the same client
    connection reuses it, although the new rules deny it (3df7f6e's check is bypassed)."""
    import signal

    import h11

    def web(conn: socket.socket) -> None:
        while read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    origin = ScriptedServer(web)
    hop = _slow_socks5_hop(1.5)
    try:
        rules = tmp_path / "rules"
        rules.write_text("")
        server = serve("--rules", str(rules), "--via", f"socks5://127.0.0.1:{hop.port}")
        get = (
            f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{origin.port}\r\n\r\n"
        ).encode()
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
            conn = h11.Connection(h11.CLIENT)
            sock.sendall(get)
            time.sleep(0.5)  # the hop is dialling
            rules.write_text(f"deny 127.0.0.1:{origin.port}\n")
            server.send_signal(signal.SIGHUP)
            server.wait_log("event=reload result=ok")
            assert next_status(conn, sock) == 200  # checked and dialled under the old rules: fine
            conn.start_next_cycle()
            sock.sendall(get)
            assert next_status(conn, sock) == 403, server.log()
    finally:
        hop.close()
        origin.close()
