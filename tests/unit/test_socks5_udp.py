"""The SOCKS5 UDP header (RFC 1928 section 7): what is packed unpacks to the same, and what a
relay could send that is not a header is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hopcat.errors import LocalProtocolError, RemoteProtocolError
from hopcat.proto import socks5_udp
from hopcat.proto.socks5 import Command, Socks5Client


@pytest.mark.parametrize(
    ("host", "header"),
    [
        ("192.0.2.7", b"\x00\x00\x00\x01\xc0\x00\x02\x07\x00\x35"),
        ("::1", b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35"),
        ("dns.example", b"\x00\x00\x00\x03\x0bdns.example\x00\x35"),
    ],
)
def test_pack_and_unpack(host: str, header: bytes) -> None:
    datagram = socks5_udp.pack(host, 53, b"query")
    assert datagram == header + b"query"
    assert socks5_udp.header_size(host) == len(header)
    back = socks5_udp.unpack(datagram)
    assert (back.host, back.port, back.data, back.frag) == (host, 53, b"query", 0)


def test_fragments_are_reported_for_the_caller_to_drop() -> None:
    assert socks5_udp.unpack(b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x07x").frag == 1


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x00\x00\x00", b"\x01\x00\x00\x01" + bytes(6), b"\x00\x00\x00\x05" + bytes(8),
     b"\x00\x00\x00\x01\x7f\x00\x00", b"\x00\x00\x00\x03\x00\x00\x35", b"\x00\x00\x00\x03\x05ab"],
)  # fmt: skip
def test_malformed_headers_are_refused(datagram: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        socks5_udp.unpack(datagram)


@given(st.binary(max_size=300))
def test_random_bytes_unpack_or_raise_the_protocol_error(data: bytes) -> None:
    try:
        socks5_udp.unpack(data)
    except RemoteProtocolError:
        pass


def test_names_are_checked_before_they_reach_the_wire() -> None:
    with pytest.raises(LocalProtocolError):
        socks5_udp.pack("bad host", 53, b"")


def test_the_client_asks_for_an_association() -> None:
    client = Socks5Client("0.0.0.0", 0, command=Command.UDP_ASSOCIATE)
    assert client.data_to_send() == b"\x05\x01\x00"
    client.receive_data(b"\x05\x00")
    client.next_event()
    assert client.data_to_send() == b"\x05\x03\x00\x01" + bytes(6)
    client.receive_data(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40")
    event = client.next_event()
    assert (event.bound_host, event.bound_port) == ("127.0.0.1", 40000)  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        Socks5Client("h", 1, command=Command.BIND)
