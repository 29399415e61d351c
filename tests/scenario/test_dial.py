"""Happy eyeballs with a scripted resolver over real loopback sockets."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from hopcat.errors import ConnectError, HopcatTimeoutError, ResolveError
from hopcat.net.dial import dial_tcp, interleave_families
from support import closed_port, silent_listener


def _resolver_for(*sockaddrs: tuple[str, int]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int, family: int, flags: int):  # type: ignore[no-untyped-def]
        return [
            (socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM, 6, "",
             (addr, p) if ":" not in addr else (addr, p, 0, 0))
            for addr, p in sockaddrs
        ]
    return resolve


def test_interleave_starts_with_resolver_preference_then_alternates() -> None:
    v6 = [(socket.AF_INET6, 1, 6, "", (f"::{i}", 1, 0, 0)) for i in range(1, 4)]
    v4 = [(socket.AF_INET, 1, 6, "", (f"10.0.0.{i}", 1)) for i in range(1, 3)]
    order = [info[4][0] for info in interleave_families(v6 + v4)]
    assert order == ["::1", "10.0.0.1", "::2", "10.0.0.2", "::3"]


def test_first_address_refused_second_wins_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as good:
        trace: list[str] = []
        started = time.monotonic()
        with closed_port() as refused:
            sock = dial_tcp(
                "example.test", 1, deadline=time.monotonic() + 5, trace=trace.append,
                socket_factory=socket.socket,
                resolver=_resolver_for(("127.0.0.1", refused), ("127.0.0.1", good.getsockname()[1])),
            )
        elapsed = time.monotonic() - started
        with sock:
            assert sock.getpeername()[1] == good.getsockname()[1]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert elapsed < 0.2, "a refusal must start the next attempt without waiting for the stagger"
    assert any("connection refused" in line for line in trace)


def test_silent_first_address_loses_to_second_after_stagger() -> None:
    listener, fillers, silent_port = silent_listener()
    try:
        with socket.create_server(("127.0.0.1", 0)) as good:
            started = time.monotonic()
            sock = dial_tcp(
                "example.test", 1, deadline=time.monotonic() + 5, stagger_s=0.25,
                socket_factory=socket.socket,
                resolver=_resolver_for(("127.0.0.1", silent_port), ("127.0.0.1", good.getsockname()[1])),
            )
            elapsed = time.monotonic() - started
            with sock:
                assert sock.getpeername()[1] == good.getsockname()[1]
    finally:
        for s in [listener, *fillers]:
            s.close()
    assert 0.2 <= elapsed < 2


def test_every_address_failing_names_each() -> None:
    with closed_port() as a, closed_port() as b, pytest.raises(ConnectError) as info:
        dial_tcp("example.test", 1, deadline=time.monotonic() + 5,
                 resolver=_resolver_for(("127.0.0.1", a), ("127.0.0.1", b)))
    message = str(info.value)
    assert f"127.0.0.1:{a}: connection refused" in message
    assert f"127.0.0.1:{b}: connection refused" in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ECONNREFUSED


def test_deadline_over_all_attempts() -> None:
    listener, fillers, silent_port = silent_listener()
    try:
        started = time.monotonic()
        with pytest.raises(HopcatTimeoutError) as info:
            dial_tcp("example.test", 1, deadline=time.monotonic() + 0.6, timeout_label="after 0.6 s",
                     resolver=_resolver_for(("127.0.0.1", silent_port), ("127.0.0.1", silent_port)))
        elapsed = time.monotonic() - started
    finally:
        for s in [listener, *fillers]:
            s.close()
    assert "timed out after 0.6 s (2 addresses tried)" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert 0.5 < elapsed < 2


def test_ipv6_only_rejects_ipv4_literal() -> None:
    with pytest.raises(ResolveError):
        dial_tcp("127.0.0.1", 22, deadline=time.monotonic() + 1, family=socket.AF_INET6)


def test_source_address_is_bound() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = dial_tcp("127.0.0.1", server.getsockname()[1], deadline=time.monotonic() + 5,
                        source="127.0.0.2", socket_factory=socket.socket)
        with sock:
            assert sock.getsockname()[0] == "127.0.0.2"
