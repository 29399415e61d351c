"""SOCKS4/4a machine: byte vectors from the SOCKS4 spec and the 4a extension, every reply code."""

from __future__ import annotations

import pytest

from hopcat.errors import (
    LocalProtocolError,
    ProtocolError,
    ProxyAuthError,
    ProxyError,
    RemoteProtocolError,
)
from hopcat.proto import socks4
from hopcat.proto._events import NEED_DATA, Established, Rejected, Request
from hopcat.proto._machine import State
from hopcat.proto.socks4 import Socks4Client, Socks4Server

BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"
GRANTED = bytes.fromhex("00 5a 0000 00000000")


# Client requests.


def test_socks4_request_for_an_ipv4_literal() -> None:
    # The spec's CONNECT: VN 4, CD 1, DSTPORT, DSTIP, USERID "Fred", NUL.
    client = Socks4Client("66.102.7.99", 80, user_id="Fred")
    assert client.data_to_send() == bytes.fromhex("04 01 0050 42660763 46726564 00")
    assert client.data_to_send() == b""


def test_socks4a_request_for_a_name() -> None:
    client = Socks4Client("example.com", 22, user_id="Fred")
    assert client.data_to_send() == (
        bytes.fromhex("04 01 0016 00000001 46726564 00") + b"example.com\x00"
    )


def test_empty_user_id() -> None:
    assert Socks4Client("10.0.0.1", 1).data_to_send() == bytes.fromhex("04 01 0001 0a000001 00")


def test_socks4a_true_with_an_ipv4_literal_sends_plain_socks4() -> None:
    client = Socks4Client("10.0.0.1", 22, socks4a=True)
    assert client.data_to_send() == bytes.fromhex("04 01 0016 0a000001 00")


def test_non_ascii_name_is_idna_encoded() -> None:
    client = Socks4Client("bücher.example", 22)
    assert client.data_to_send().endswith(b"\x00xn--bcher-kva.example\x00")


def test_socks4_only_refuses_names() -> None:
    with pytest.raises(LocalProtocolError) as info:
        Socks4Client("example.com", 22, socks4a=False)
    assert "SOCKS4 needs an IPv4 address" in str(info.value)
    assert "use socks4a" in str(info.value)


@pytest.mark.parametrize("host", ["::1", "[2001:db8::1]"])
def test_ipv6_is_refused(host: str) -> None:
    with pytest.raises(LocalProtocolError, match="IPv6"):
        Socks4Client(host, 22)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user_id": "a\x00b"}, "NUL"),
        ({"user_id": "u" * 256}, "0 to 255 bytes"),
        ({"user_id": 7}, "must be a string"),
    ],
)
def test_bad_user_ids(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        Socks4Client("10.0.0.1", 22, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["", "a b", "x\r\ny", "x" * 256])
def test_bad_hosts(host: str) -> None:
    with pytest.raises(LocalProtocolError):
        Socks4Client(host, 22)


@pytest.mark.parametrize("port", [-1, 65536, False, 1.5])
def test_bad_ports(port: object) -> None:
    with pytest.raises(LocalProtocolError, match="port"):
        Socks4Client("10.0.0.1", port)  # type: ignore[arg-type]


# Client replies.


@pytest.mark.parametrize("version", [0, 4])
def test_granted(version: int) -> None:
    client = Socks4Client("example.com", 22)
    client.receive_data(bytes([version, 90]) + bytes.fromhex("1f90 c0000201"))
    assert client.next_event() == Established("192.0.2.1", 8080, "reply 90 request granted")
    assert client.state is State.DONE


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (91, ProxyError, "request rejected or failed (reply 91)"),
        (
            92,
            ProxyAuthError,
            "request rejected because SOCKS server cannot connect to identd on the client"
            " (reply 92)",
        ),
        (
            93,
            ProxyAuthError,
            "request rejected because the client program and identd report different user-ids"
            " (reply 93)",
        ),
        (94, ProxyError, "unassigned reply code 94"),
        (0, ProxyError, "unassigned reply code 0"),
    ],
)
def test_every_failure_code(code: int, error: type[ProxyError], text: str) -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(bytes([0, code, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ProxyError) as info:
        client.next_event()
    assert type(info.value) is error
    assert str(info.value) == text
    assert info.value.code == code


def test_refusal_is_reported_after_two_bytes() -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(b"\x00\x5b")
    client.receive_data(b"")
    with pytest.raises(ProxyError, match="reply 91"):
        client.next_event()


@pytest.mark.parametrize(
    ("first", "hint"),
    [(b"H", "looks like an HTTP proxy: use http://"), (b"\x05", "looks like a SOCKS5 proxy"), (b"\x01", "")],
)
def test_wrong_version_byte(first: bytes, hint: str) -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(first)
    with pytest.raises(RemoteProtocolError, match="not a SOCKS4 reply") as info:
        client.next_event()
    assert hint in str(info.value)


@pytest.mark.parametrize("received", [b"", b"\x00", b"\x00\x5a\x00\x16\x7f\x00\x00"])
def test_eof_during_the_handshake(received: bytes) -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(received)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"^proxy closed the connection during"):
        client.next_event()


def test_bytes_needed_and_prefix_len() -> None:
    client = Socks4Client("10.0.0.1", 22)
    assert client.bytes_needed() == 8
    assert client.handshake_prefix_len(GRANTED + BANNER) == 8
    client.receive_data(GRANTED[:3])
    assert client.next_event() is NEED_DATA
    assert client.bytes_needed() == 5
    assert client.handshake_prefix_len(GRANTED[3:] + BANNER) == 5
    assert client.handshake_prefix_len(GRANTED[3:5]) == 2
    client.receive_data(GRANTED[3:])
    assert client.bytes_needed() == 0
    assert client.handshake_prefix_len(BANNER) == 0


def test_trailing_banner_is_kept() -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(GRANTED + BANNER)
    assert isinstance(client.next_event(), Established)
    assert client.trailing_data == BANNER


def test_error_poisons() -> None:
    client = Socks4Client("10.0.0.1", 22)
    client.receive_data(b"\x00\x5b" + bytes(6))
    with pytest.raises(ProxyError):
        client.next_event()
    with pytest.raises(RemoteProtocolError, match="error state"):
        client.next_event()
    with pytest.raises(LocalProtocolError, match="error state"):
        client.handshake_prefix_len(b"")


# Server role.


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            bytes.fromhex("04 01 0050 42660763 46726564 00"),
            Request("CONNECT", "66.102.7.99", 80, "Fred"),
        ),
        (
            bytes.fromhex("04 01 0016 00000001 00") + b"example.com\x00",
            Request("CONNECT", "example.com", 22),
        ),
        (
            bytes.fromhex("04 01 0016 000000ff 7573 00") + b"h\x00",
            Request("CONNECT", "h", 22, "us"),
        ),
        (bytes.fromhex("04 02 0000 0a000001 00"), Request("BIND", "10.0.0.1", 0)),
        (bytes.fromhex("04 01 0016 00000000 00"), Request("CONNECT", "0.0.0.0", 22)),
    ],
)
def test_server_parses_socks4_and_socks4a(wire: bytes, expected: Request) -> None:
    server = Socks4Server()
    server.receive_data(wire + b"payload")
    assert server.next_event() == expected
    assert server.state is State.REPLY_DECISION
    server.reply_success()
    assert server.data_to_send() == GRANTED
    assert server.trailing_data == b"payload"


def test_server_request_split_byte_by_byte() -> None:
    wire = bytes.fromhex("04 01 0016 00000001 414243 00") + b"host.example\x00"
    server = Socks4Server()
    needs = []
    for i in range(len(wire)):
        needs.append(server.bytes_needed())
        server.receive_data(wire[i : i + 1])
        event = server.next_event()
    assert event == Request("CONNECT", "host.example", 22, "ABC")
    assert needs[:9] == [9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert set(needs[9:]) == {1}


def test_server_reply_success_with_bound_address() -> None:
    server = Socks4Server()
    server.receive_data(bytes.fromhex("04 01 0016 0a000001 00"))
    server.next_event()
    server.reply_success("192.0.2.9", 1234)
    assert server.data_to_send() == bytes.fromhex("00 5a 04d2 c0000209")
    assert server.next_event() == Established("192.0.2.9", 1234, "reply 90 request granted")


def test_server_reply_success_with_ipv6_bound_address_sends_zeros() -> None:
    server = Socks4Server()
    server.receive_data(bytes.fromhex("04 01 0016 0a000001 00"))
    server.next_event()
    server.reply_success("::1", 5)
    assert server.data_to_send() == bytes.fromhex("00 5a 0005 00000000")


@pytest.mark.parametrize("code", [91, 92, 93])
def test_server_reply_failure(code: int) -> None:
    server = Socks4Server()
    server.receive_data(bytes.fromhex("04 02 0016 0a000001 00"))
    server.next_event()
    server.reply_failure(code)
    assert server.data_to_send() == bytes([0, code]) + bytes(6)
    assert server.next_event() == Rejected(socks4.describe_reply(code), Rejected.REFUSED)
    assert server.state is State.CLOSED


@pytest.mark.parametrize("code", [90, 94, 0])
def test_server_reply_failure_code_range(code: int) -> None:
    server = Socks4Server()
    server.receive_data(bytes.fromhex("04 02 0016 0a000001 00"))
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.reply_failure(code)


def test_server_unknown_command_is_refused_with_91() -> None:
    server = Socks4Server()
    server.receive_data(b"\x04\x03")
    event = server.next_event()
    assert isinstance(event, Rejected)
    assert "unknown command 3" in event.reason
    assert server.data_to_send() == bytes.fromhex("00 5b 0000 00000000")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x05\x01\x00", "not a SOCKS4 request"),
        (bytes.fromhex("04 01 0016 0a000001") + b"u" * 256, "user id is longer than 255"),
        (bytes.fromhex("04 01 0016 0a000001") + b"u" * 300 + b"\x00", "user id is longer"),
        (bytes.fromhex("04 01 0016 00000001 00") + b"h" * 256, "host name is longer than 255"),
        (bytes.fromhex("04 01 0016 00000001 00 00"), "invalid host name"),
        (bytes.fromhex("04 01 0016 00000001 00 ff00"), "not UTF-8"),
    ],
)
def test_server_rejects_malformed_requests(wire: bytes, message: str) -> None:
    server = Socks4Server()
    server.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        server.next_event()


def test_server_longest_fields_are_accepted() -> None:
    server = Socks4Server()
    name = b"h" * 255
    server.receive_data(bytes.fromhex("04 01 0016 00000001") + b"u" * 255 + b"\x00" + name + b"\0")
    event = server.next_event()
    assert isinstance(event, Request)
    assert event.host == name.decode()
    assert event.user_id == "u" * 255


def test_server_eof() -> None:
    server = Socks4Server()
    server.receive_data(bytes.fromhex("04 01 0016 0a000001 41"))
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"^client closed the connection"):
        server.next_event()


def test_message_classes_round_trip() -> None:
    request = socks4.CommandRequest(2, 80, bytes(3) + b"\x01", b"me", b"x.example")
    parsed = socks4.CommandRequest.parse(request.to_bytes())
    assert (parsed.command, parsed.port, parsed.user_id, parsed.hostname) == (
        2,
        80,
        b"me",
        b"x.example",
    )
    assert socks4.CommandReply.parse(GRANTED).reply == 90


def test_client_refuses_the_socks4a_marker_range() -> None:
    with pytest.raises(LocalProtocolError, match="SOCKS4a"):
        Socks4Client("0.0.0.7", 22)
    assert Socks4Client("0.0.0.0", 22).data_to_send()[4:8] == b"\0\0\0\0"
