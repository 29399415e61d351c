"""The pure helpers of ``hopcat.server.forward``: hop-by-hop fields, targets, Host checks."""

from __future__ import annotations

import h11
import pytest

from hopcat.server.forward import (
    Refusal,
    check_head_size,
    connection_tokens,
    end_to_end,
    error_response,
    host_matches,
    is_websocket_upgrade,
    split_target,
)


def test_end_to_end_drops_hop_by_hop_and_what_connection_names() -> None:
    headers = [
        (b"Host", b"a"), (b"Connection", b"keep-alive, X-Private ,"), (b"X-Private", b"1"),
        (b"Proxy-Connection", b"x"), (b"Keep-Alive", b"300"), (b"TE", b"trailers"),
        (b"Trailer", b"X-T"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic eDp5"), (b"Proxy-Authenticate", b"Basic"),
        (b"X-End", b"yes"), (b"connection", b"x-other"), (b"X-Other", b"2"),
    ]  # fmt: skip
    assert connection_tokens(headers) == {b"keep-alive", b"x-private", b"x-other"}
    assert end_to_end(headers) == [(b"Host", b"a"), (b"X-End", b"yes")]


def test_websocket_upgrade_needs_both_headers() -> None:
    assert is_websocket_upgrade(
        [(b"upgrade", b"WebSocket"), (b"connection", b"keep-alive, Upgrade")]
    )
    assert not is_websocket_upgrade([(b"upgrade", b"websocket")])
    assert not is_websocket_upgrade([(b"upgrade", b"h2c"), (b"connection", b"upgrade")])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://h/", ("h", "/")),
        ("http://h", ("h", "/")),
        ("http://h:81?q=1", ("h:81", "/?q=1")),
        ("http://h/a/b?c#frag", ("h", "/a/b?c")),
        ("http://[::1]:8080/x", ("[::1]:8080", "/x")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


def test_host_matches() -> None:
    assert host_matches(b"Example.COM", "example.com", 80)
    assert host_matches(b"example.com:80", "example.com", 80)
    assert host_matches(b"[::1]:8080", "::1", 8080)
    assert not host_matches(b"example.com", "example.com", 8080)
    assert not host_matches(b"other.example", "example.com", 80)
    assert not host_matches(b"u@example.com", "example.com", 80)
    assert not host_matches(b"\xff", "example.com", 80)


def test_head_size_caps() -> None:
    small = h11.Request(method="GET", target="/", headers=[("Host", "h")])
    check_head_size(small)
    big = h11.Request(method="GET", target="/", headers=[("Host", "h"), ("X", "a" * 70000)])
    with pytest.raises(Refusal) as info:
        check_head_size(big)
    assert info.value.status == 431
    long = h11.Request(method="GET", target="/" + "a" * 70000, headers=[("Host", "h")])
    with pytest.raises(Refusal) as info:
        check_head_size(long)
    assert info.value.status == 414


def test_error_response_is_short_and_closes() -> None:
    answer = error_response(407, "no", [(b"Proxy-Authenticate", b'Basic realm="hopcat"')])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 407 Proxy Authentication Required",
        b'Proxy-Authenticate: Basic realm="hopcat"',
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: 3",
        b"Connection: close",
    ]
    assert body == b"no\n"
