"""``hopcat serve -4`` / ``-6``: destinations of one address family only (as ncat's -4/-6).

A name is dialled at its addresses of that family (``localhost`` is 127.0.0.1 only here, so -6
finds none: SOCKS5 reply 4, logged as a resolution failure); an IP literal of the other family
is refused without a connect: SOCKS5 reply 8 (address type not supported), SOCKS4 91, HTTP 502
(ncat answers 504, its code for every failed connect), result ``wrong-family``. Targets are
loopback servers on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    serve_factory,
    socks4_connect,
    socks5_connect,
)

Serve = Callable[..., ServeProcess]

pytestmark = pytest.mark.skipif(not peers.ipv6_available(), reason="no IPv6 loopback (::1)")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


def reached(server: ServeProcess, host: str, target: peers.BannerServer) -> int:
    """SOCKS5 CONNECT to host:target.port; the reply code, and on success the banner read."""
    with connect(server) as sock:
        code = socks5_connect(sock, host, target.port)
        if code == 0:
            assert recv_exact(sock, len(target.banner)) == target.banner
        return code


def refusals(server: ServeProcess) -> list[dict[str, str]]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "tunnel" and line["result"] != "ok"]


def test_ipv4_only(
    serve: Serve, banner_server: peers.BannerServer, banner_server_v6: peers.BannerServer
) -> None:
    server = serve("-4", "--log-format", "json")
    assert reached(server, "127.0.0.1", banner_server) == 0
    assert reached(server, "localhost", banner_server) == 0
    assert reached(server, "::ffff:127.0.0.1", banner_server) == 0  # IPv4 on the wire
    assert reached(server, "::1", banner_server_v6) == 8
    with connect(server) as sock:
        status, head = http_connect(sock, "::1", banner_server_v6.port)
    assert status == 502, head
    server.wait_log('"result":"wrong-family"', count=2)
    for line in refusals(server):
        assert (line["result"], line["reason"]) == ("wrong-family", "::1 is not an IPv4 address (-4)")
    assert not banner_server_v6.records


def test_ipv6_only(
    serve: Serve, banner_server: peers.BannerServer, banner_server_v6: peers.BannerServer
) -> None:
    server = serve("-6", "--log-format", "json")
    assert reached(server, "::1", banner_server_v6) == 0
    assert reached(server, "127.0.0.1", banner_server) == 8
    with connect(server) as sock:
        assert socks4_connect(sock, "127.0.0.1", banner_server.port) == 91
    assert reached(server, "localhost", banner_server) == 4
    server.wait_log('"result":"dns-error"')
    reasons = {line["result"]: line["reason"] for line in refusals(server)}
    assert reasons == {
        "wrong-family": "127.0.0.1 is not an IPv6 address (-6)",
        "dns-error": "resolve localhost: no IPv6 address (-6)",
    }
    # An IPv4-mapped IPv6 address is IPv4 on the wire.
    assert reached(server, "::ffff:127.0.0.1", banner_server) == 8
    assert not banner_server.records


def test_families_exclude_each_other() -> None:
    from support import run_hopcat

    result = run_hopcat("serve", "-4", "-6")
    assert result.returncode == 64 and b"-4 and -6 exclude each other" in result.stderr


def test_udp_datagrams_of_the_other_family_are_dropped(serve: Serve) -> None:
    from test_serve_udp import UdpEcho, association, tunnel_line

    echo4, echo6 = UdpEcho("127.0.0.1"), UdpEcho("::1")
    try:
        server = serve("-6")
        with association(server) as client:
            client.send("127.0.0.1", echo4.port, b"v4")
            client.send("localhost", echo4.port, b"v4 by name")
            client.send("::1", echo6.port, b"v6")
            assert client.receive().data == b"v6"
            assert client.silent()
        assert echo4.received == [] and [data for _source, data in echo6.received] == [b"v6"]
        line = tunnel_line(server)
        assert " dropped=2 drops=denied:2" in line, line  # by -6, not by a failed lookup
        assert 'event=udp-denied client=' in server.log() and 'reason="no IPv6 address (-6)"' in server.log()
    finally:
        echo4.close()
        echo6.close()
