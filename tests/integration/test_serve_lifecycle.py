"""``hopcat serve`` over time: signals (drain, grace, reload), limits and timeouts."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    socks5_connect,
    wait_closed,
)

from support import silent_listener

Serve = Callable[..., ServeProcess]


def open_echo(server: ServeProcess, banner: peers.BannerServer) -> socket.socket:
    """A tunnel to the banner/echo target, banner already read."""
    sock = connect(server)
    assert socks5_connect(sock, banner.host, banner.port) == 0
    assert recv_exact(sock, len(banner.banner)) == banner.banner
    return sock


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exact(sock, len(data))


def test_sigterm_drains_open_tunnels(serve: Serve, banner_server: peers.BannerServer) -> None:
    server = serve("--grace", "30")
    tunnel = open_echo(server, banner_server)
    with tunnel:
        server.send_signal(signal.SIGTERM)
        server.wait_log("event=shutdown")
        with pytest.raises(ConnectionRefusedError):
            connect(server)  # no longer accepting
        assert echo(tunnel, b"still here") == b"still here"  # the open tunnel keeps working
        assert server.proc.poll() is None
        started = time.monotonic()
        tunnel.shutdown(socket.SHUT_WR)
        assert wait_closed(tunnel) == b""
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    log = server.log()
    assert "event=shutdown signal=SIGTERM tunnels=1" in log
    assert "result=ok" in log and "event=stopped" in log


def test_grace_period_ends_lingering_tunnels(
    serve: Serve, banner_server: peers.BannerServer
) -> None:
    server = serve("--grace", "1")
    tunnel = open_echo(server, banner_server)
    with tunnel:
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert 0.8 < time.monotonic() - started < 5
        assert wait_closed(tunnel) == b""
    assert 'result=shutdown reason="grace period of 1 s over"' in server.log()


def test_second_signal_stops_at_once(serve: Serve, banner_server: peers.BannerServer) -> None:
    server = serve("--grace", "60")
    tunnel = open_echo(server, banner_server)
    with tunnel:
        server.send_signal(signal.SIGINT)
        server.wait_log("event=shutdown")
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert wait_closed(tunnel) == b""


def test_sighup_reloads_auth_file_and_rules(serve: Serve, tmp_path: Path,
                                            digest_server: peers.DigestServer) -> None:  # fmt: skip
    users = tmp_path / "users"
    users.write_text("alice:first-password\n")
    users.chmod(0o600)
    rules = tmp_path / "rules"
    rules.write_text("# nothing denied yet\n")
    server = serve("--auth-file", str(users), "--rules", str(rules))

    def attempt(password: str) -> int:
        with connect(server) as sock:
            return socks5_connect(sock, digest_server.host, digest_server.port, user="alice",
                                  password=password)  # fmt: skip

    assert attempt("first-password") == 0
    users.write_text("alice:second-password\nbob:x\n")
    rules.write_text(f"deny 127.0.0.1:{digest_server.port}\n")
    server.send_signal(signal.SIGHUP)
    server.wait_log("event=reload result=ok users=2 rules=1")
    assert attempt("first-password") == -2
    assert attempt("second-password") == 2  # now denied by the reloaded rules

    rules.write_text("allow this is not a rule\n")
    server.send_signal(signal.SIGHUP)
    log = server.wait_log("event=reload result=error")
    assert "line 1" in log
    assert attempt("second-password") == 2  # the previous configuration stays
    assert "first-password" not in log and "second-password" not in log


def test_idle_timeout(serve: Serve, banner_server: peers.BannerServer) -> None:
    server = serve("--idle-timeout", "1")
    busy = open_echo(server, banner_server)
    idle = open_echo(server, banner_server)
    with busy, idle:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            assert echo(busy, b"ping") == b"ping"  # traffic keeps a tunnel alive
            time.sleep(0.2)
        assert wait_closed(idle, 5) == b""
        assert echo(busy, b"still") == b"still"
    assert "result=idle-timeout" in server.wait_log("result=idle-timeout")


def test_connect_timeout(serve: Serve) -> None:
    listener, fillers, port = silent_listener()
    try:
        server = serve("--connect-timeout", "1")
        with connect(server) as sock:
            started = time.monotonic()
            assert socks5_connect(sock, "127.0.0.1", port) == 4
            assert 0.8 < time.monotonic() - started < 4
        with connect(server) as sock:
            assert http_connect(sock, "127.0.0.1", port)[0] == 504
        server.wait_log("result=timeout", count=2)
    finally:
        for sock in (listener, *fillers):
            sock.close()


def test_max_conns_waits_in_the_backlog(serve: Serve, banner_server: peers.BannerServer) -> None:
    server = serve("--max-conns", "2")
    first = open_echo(server, banner_server)
    second = open_echo(server, banner_server)
    third = connect(server)  # the kernel completes the TCP handshake; we do not accept yet
    with third:
        third.sendall(b"\x05\x01\x00")
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):
            third.recv(2)
        first.close()
        third.settimeout(10)
        assert recv_exact(third, 2) == b"\x05\x00"  # accepted once a slot freed up
    second.close()
    assert "max-conns" in server.wait_log("event=limit")
