"""The -z port list: nc's syntaxes, and one clear refusal per bad item."""

from __future__ import annotations

import pytest

from hopcat.cli._portscan import parse_ports
from hopcat.errors import UsageError


@pytest.mark.parametrize(
    ("specs", "ports"),
    [
        (["22"], [22]),
        (["20-25"], [20, 21, 22, 23, 24, 25]),
        (["443,80"], [80, 443]),
        (["22,20-21,22", "21"], [20, 21, 22]),
        (["1", "65535-65535"], [1, 65535]),
    ],
)
def test_port_lists(specs: list[str], ports: list[int]) -> None:
    assert parse_ports(specs) == ports


def test_the_whole_range() -> None:
    assert parse_ports(["1-65535"]) == list(range(1, 65536))


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("0", "port '0': 0 is out of 1-65535"),
        ("65536", "port '65536': 65536 is out of 1-65535"),
        ("25-20", "port range '25-20': reversed (write 20-25)"),
        ("22,,80", "empty port in the list"),
        ("", "empty port in the list"),
        ("20-", "port range '20-': empty port"),
        ("ssh", "port 'ssh': 'ssh' is not a port number"),
        ("1-2-3", "port range '1-2-3': '2-3' is not a port number"),
        ("+22", "port '+22': '+22' is not a port number"),
    ],
)
def test_bad_items_are_named(spec: str, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_ports([spec])
    assert str(caught.value) == says


def test_a_connection_to_itself_is_recognised() -> None:
    """TCP's simultaneous open: a socket bound to a port and connected to that same port talks
    to itself, which a scan must not report as a listener (nc.openbsd -z does, now and then)."""
    import socket

    from hopcat.net.dial import connected_to_itself as _self_connected

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.connect(("127.0.0.1", port))
        assert _self_connected(sock)
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(
        server.getsockname()
    ) as client:
        assert not _self_connected(client)
