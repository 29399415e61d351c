"""SOCKS5 machine: RFC 1928 / RFC 1929 byte vectors for every message, reply code and ATYP."""

from __future__ import annotations

import pytest

from hopcat.errors import (
    LocalProtocolError,
    ProtocolError,
    ProxyAuthError,
    ProxyError,
    RemoteProtocolError,
)
from hopcat.proto import socks5
from hopcat.proto._events import (
    NEED_DATA,
    Credentials,
    Established,
    Event,
    NeedData,
    Rejected,
    Request,
)
from hopcat.proto._machine import Machine, State
from hopcat.proto.socks5 import Socks5Client, Socks5Server

BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"
# Reply 0 with BND 10.0.0.1:4660 (RFC 1928 section 6, ATYP 1).
OK_REPLY = bytes.fromhex("05 00 00 01 0a000001 1234")


def events_until_blocked(machine: Machine) -> list[Event | NeedData]:
    events: list[Event | NeedData] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA or event in events:
            return events
        events.append(event)


def connected_client(**kwargs: str) -> Socks5Client:
    client = Socks5Client("example.com", 22, **kwargs)
    client.data_to_send()
    client.receive_data(b"\x05\x00")
    assert client.next_event() == socks5.MethodSelected(0)
    client.data_to_send()
    return client


# Client: what goes on the wire.


def test_greeting_offers_only_no_auth_without_credentials() -> None:
    client = Socks5Client("example.com", 22)
    assert client.data_to_send() == b"\x05\x01\x00"
    assert client.data_to_send() == b""


def test_greeting_offers_userpass_with_credentials() -> None:
    client = Socks5Client("example.com", 22, username="user", password="pass")
    assert client.data_to_send() == b"\x05\x02\x00\x02"


def test_request_is_sent_only_after_the_method_selection() -> None:
    # microsocks drops a request that arrives together with the greeting.
    client = Socks5Client("example.com", 22)
    assert client.data_to_send() == b"\x05\x01\x00"
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b""
    client.receive_data(b"\x05\x00")
    assert client.next_event() == socks5.MethodSelected(socks5.Method.NO_AUTHENTICATION_REQUIRED)
    assert client.data_to_send() == b"\x05\x01\x00\x03\x0bexample.com\x00\x16"


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("192.0.2.7", 80, "05 01 00 01 c0000207 0050"),
        ("::1", 22, "05 01 00 04 00000000000000000000000000000001 0016"),
        ("[2001:db8::5]", 443, "05 01 00 04 20010db8000000000000000000000005 01bb"),
        ("ssh.example", 65535, "05 01 00 03 0b 7373682e6578616d706c65 ffff"),
        ("h", 0, "05 01 00 03 01 68 0000"),
    ],
)
def test_connect_request_for_every_address_type(host: str, port: int, wire: str) -> None:
    client = Socks5Client(host, port)
    client.data_to_send()
    client.receive_data(b"\x05\x00")
    client.next_event()
    assert client.data_to_send() == bytes.fromhex(wire)


def test_non_ascii_name_is_idna_encoded() -> None:
    client = Socks5Client("bücher.example", 22)
    client.data_to_send()
    client.receive_data(b"\x05\x00")
    client.next_event()
    name = b"xn--bcher-kva.example"
    assert client.data_to_send() == b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x16"


def test_userpass_subnegotiation_rfc1929() -> None:
    client = Socks5Client("10.1.2.3", 8080, username="alice", password="s3cr3t!")
    assert client.data_to_send() == b"\x05\x02\x00\x02"
    client.receive_data(b"\x05\x02")
    assert client.next_event() == socks5.MethodSelected(socks5.Method.USERNAME_PASSWORD)
    assert client.data_to_send() == b"\x01\x05alice\x07s3cr3t!"
    assert client.bytes_needed() == 2
    client.receive_data(b"\x01\x00")
    assert client.next_event() == socks5.AuthSucceeded()
    assert client.data_to_send() == bytes.fromhex("05 01 00 01 0a010203 1f90")
    client.receive_data(OK_REPLY)
    assert client.next_event() == Established("10.0.0.1", 0x1234, "reply 0 succeeded")


def test_userpass_offered_but_proxy_chooses_no_auth() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    client.data_to_send()
    client.receive_data(b"\x05\x00")
    assert client.next_event() == socks5.MethodSelected(0)
    assert client.data_to_send().startswith(b"\x05\x01\x00\x03")


def test_utf8_credentials_are_counted_in_bytes() -> None:
    client = Socks5Client("example.com", 22, username="é" * 127, password="x")
    client.data_to_send()
    client.receive_data(b"\x05\x02")
    client.next_event()
    assert client.data_to_send()[:2] == b"\x01\xfe"
    with pytest.raises(LocalProtocolError, match="1 to 255 bytes"):
        Socks5Client("example.com", 22, username="é" * 128, password="x")


# Client: replies.


@pytest.mark.parametrize(
    ("reply", "host", "port"),
    [
        ("05 00 00 01 00000000 0000", "0.0.0.0", 0),
        ("05 00 00 01 7f000001 d431", "127.0.0.1", 54321),
        ("05 00 00 04 fe800000000000000000000000000001 0050", "fe80::1", 80),
        ("05 00 00 03 09 6c6f63616c686f7374 0438", "localhost", 1080),
        ("05 00 00 03 00 0016", "", 22),
        ("05 00 ff 01 01020304 0001", "1.2.3.4", 1),  # RSV is not checked
    ],
)
def test_success_reply_for_every_address_type(reply: str, host: str, port: int) -> None:
    client = connected_client()
    client.receive_data(bytes.fromhex(reply))
    assert client.next_event() == Established(host, port, "reply 0 succeeded")
    assert client.state is State.DONE
    assert client.trailing_data == b""


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (1, "general SOCKS server failure"),
        (2, "connection not allowed by ruleset"),
        (3, "network unreachable"),
        (4, "host unreachable"),
        (5, "connection refused"),
        (6, "TTL expired"),
        (7, "command not supported"),
        (8, "address type not supported"),
    ],
)
def test_every_failure_reply_code(code: int, text: str) -> None:
    client = connected_client()
    client.receive_data(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ProxyError) as info:
        client.next_event()
    assert type(info.value) is ProxyError
    assert info.value.code == code
    assert str(info.value) == f"{text} (reply {code})"


def test_unassigned_reply_code() -> None:
    client = connected_client()
    client.receive_data(bytes.fromhex("05 09 00 01 00000000 0000"))
    with pytest.raises(ProxyError, match=r"^unassigned reply code 9$"):
        client.next_event()


def test_refusal_reported_after_two_bytes_even_if_the_proxy_closes() -> None:
    client = connected_client()
    client.receive_data(b"\x05\x04")
    with pytest.raises(ProxyError, match=r"host unreachable \(reply 4\)"):
        client.next_event()


def test_refusal_with_garbage_address_type_is_still_a_refusal() -> None:
    client = connected_client()
    client.receive_data(b"\x05\x05\x00\x00")
    with pytest.raises(ProxyError, match=r"connection refused"):
        client.next_event()


def test_success_reply_with_unknown_address_type_is_a_protocol_error() -> None:
    client = connected_client()
    client.receive_data(b"\x05\x00\x00\x02\x00\x00")
    with pytest.raises(RemoteProtocolError, match="unknown address type 0x02"):
        client.next_event()


def test_no_acceptable_methods() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    client.receive_data(b"\x05\xff")
    with pytest.raises(ProxyAuthError) as info:
        client.next_event()
    assert str(info.value) == (
        "proxy accepted none of our authentication methods (offered: no authentication, username/password)"
    )
    plain = Socks5Client("example.com", 22)
    plain.receive_data(b"\x05\xff")
    with pytest.raises(ProxyAuthError, match=r"\(offered: no authentication\)$"):
        plain.next_event()


def test_userpass_required_but_no_credentials() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"\x05\x02")
    with pytest.raises(ProxyAuthError, match="supply a username"):
        client.next_event()


def test_method_we_did_not_offer() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"\x05\x01")
    with pytest.raises(RemoteProtocolError, match=r"0x01 \(GSSAPI\), which we did not offer"):
        client.next_event()


@pytest.mark.parametrize("status", [1, 2, 0xFF])
def test_authentication_failure(status: int) -> None:
    client = Socks5Client("example.com", 22, username="u", password="wrong")
    client.receive_data(b"\x05\x02")
    client.next_event()
    client.receive_data(bytes([1, status]))
    with pytest.raises(ProxyAuthError) as info:
        client.next_event()
    assert str(info.value) == f"authentication failed (RFC 1929 status {status})"
    assert info.value.code == status


def test_auth_reply_with_socks_version_byte_is_tolerated() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    client.receive_data(b"\x05\x02\x05\x00")
    assert events_until_blocked(client) == [socks5.MethodSelected(2), socks5.AuthSucceeded()]


def test_auth_reply_with_bad_version() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    client.receive_data(b"\x05\x02\x02\x00")
    client.next_event()
    with pytest.raises(RemoteProtocolError, match="not an RFC 1929 reply"):
        client.next_event()


def test_http_proxy_answering_a_greeting_gets_a_hint() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert str(info.value) == "not a SOCKS5 reply (version byte 0x48: this looks like an HTTP proxy: use http://)"


def test_wrong_version_is_detected_from_the_first_byte() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"\x00")
    with pytest.raises(RemoteProtocolError, match=r"0x00: this looks like a SOCKS4 proxy"):
        client.next_event()


def test_wrong_version_in_the_final_reply() -> None:
    client = connected_client()
    client.receive_data(b"\x04\x00")
    with pytest.raises(RemoteProtocolError, match="not a SOCKS5 reply"):
        client.next_event()


@pytest.mark.parametrize("received", [b"", b"\x05", b"\x05\x00\x05\x00\x00\x03\x05abc"])
def test_eof_during_the_handshake(received: bytes) -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(received)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        events_until_blocked(client)
    assert str(info.value) == "proxy closed the connection during the handshake"


def test_eof_right_after_a_complete_reply_is_fine() -> None:
    client = connected_client()
    client.receive_data(OK_REPLY)
    client.receive_data(b"")
    assert isinstance(client.next_event(), Established)


# Framing: exact byte counts and trailing data.


@pytest.mark.parametrize(
    ("reply", "needs"),
    [
        ("05 00 00 01 7f000001 0016", [4, 3, 2, 1, 6, 5, 4, 3, 2, 1]),
        ("05 00 00 04" + " 00" * 16 + " 0016", [4, 3, 2, 1, *range(18, 0, -1)]),
        ("05 00 00 03 03 616263 0016", [4, 3, 2, 1, 1, 5, 4, 3, 2, 1]),
    ],
)
def test_bytes_needed_tracks_the_reply_byte_by_byte(reply: str, needs: list[int]) -> None:
    client = connected_client()
    data = bytes.fromhex(reply)
    seen = []
    for i in range(len(data)):
        seen.append(client.bytes_needed())
        client.receive_data(data[i : i + 1])
        assert client.next_event() is NEED_DATA or i == len(data) - 1
    assert seen == needs
    assert client.state is State.DONE
    assert client.bytes_needed() == 0


def test_bytes_needed_through_the_whole_handshake() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    assert client.bytes_needed() == 2
    client.receive_data(b"\x05")
    assert client.bytes_needed() == 1
    client.receive_data(b"\x02")
    assert client.bytes_needed() == 0
    client.next_event()
    assert client.bytes_needed() == 2
    client.receive_data(b"\x01\x00")
    client.next_event()
    assert client.bytes_needed() == 4


def test_banner_in_the_same_read_as_the_reply_is_trailing_data() -> None:
    client = connected_client()
    client.receive_data(OK_REPLY + BANNER)
    assert isinstance(client.next_event(), Established)
    assert client.trailing_data == BANNER
    client.receive_data(b"more")
    assert client.trailing_data == BANNER + b"more"
    assert isinstance(client.next_event(), Established)  # final event repeats


def test_whole_transcript_in_one_read() -> None:
    client = Socks5Client("example.com", 22, username="u", password="p")
    client.receive_data(b"\x05\x02" + b"\x01\x00" + OK_REPLY + BANNER)
    events = events_until_blocked(client)
    assert [type(e) for e in events] == [socks5.MethodSelected, socks5.AuthSucceeded, Established]
    assert client.trailing_data == BANNER


def test_trailing_data_is_empty_before_done() -> None:
    client = connected_client()
    client.receive_data(OK_REPLY[:5])
    assert client.trailing_data == b""


def test_handshake_prefix_len() -> None:
    client = Socks5Client("example.com", 22)
    assert client.handshake_prefix_len(b"\x05\x00" + b"junk") == 2
    client.receive_data(b"\x05")
    assert client.handshake_prefix_len(b"\x00junk") == 1
    client.receive_data(b"\x00")
    assert client.handshake_prefix_len(b"junk") == 0
    client.next_event()
    reply = bytes.fromhex("05 00 00 03 05 6c6f63616c 0016")
    assert client.handshake_prefix_len(reply + BANNER) == len(reply)
    assert client.handshake_prefix_len(reply[:3]) == 3
    assert client.handshake_prefix_len(reply[:5]) == 5
    client.receive_data(reply[:4])
    assert client.handshake_prefix_len(reply[4:] + BANNER) == len(reply) - 4
    client.receive_data(reply[4:])
    assert client.handshake_prefix_len(BANNER) == 0
    client.next_event()
    assert client.handshake_prefix_len(BANNER) == 0


# Poisoning.


def test_any_error_poisons_the_machine() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"\x05\xff")
    with pytest.raises(ProxyAuthError):
        client.next_event()
    assert client.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="machine is in error state"):
        client.next_event()
    with pytest.raises(RemoteProtocolError, match="machine is in error state"):
        client.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match="machine is in error state"):
        client.data_to_send()
    with pytest.raises(LocalProtocolError, match="machine is in error state"):
        client.bytes_needed()
    assert client.trailing_data == b""


def test_data_after_eof_is_a_local_error() -> None:
    client = Socks5Client("example.com", 22)
    client.receive_data(b"")
    client.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(LocalProtocolError, match="after EOF"):
        client.receive_data(b"\x05")
    assert client.state is State.ERROR


# Validation before any byte is produced.


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("", "empty host name"),
        ("a b", "space or control character"),
        ("a\r\nb", "space or control character"),
        ("a\x00b", "space or control character"),
        ("a\tb", "space or control character"),
        ("x" * 256, "256 bytes long; the limit is 255"),
        ("1::2::3", "invalid IPv6 address"),
        ("[example.com]", "invalid IPv6 address"),
        ("a]b", "contains '\\[' or '\\]'"),
        ("a" * 64 + ".é", "cannot be IDNA-encoded"),
    ],
)
def test_bad_hosts_are_refused_in_the_constructor(host: str, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        Socks5Client(host, 22)


def test_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63] * 4)[:255]
    client = Socks5Client(name, 22)
    client.receive_data(b"\x05\x00")
    client.next_event()
    client.data_to_send()
    assert client.data_to_send() == b""


@pytest.mark.parametrize("port", [-1, 65536, True, "22", 22.0, None])
def test_bad_ports_are_refused(port: object) -> None:
    with pytest.raises(LocalProtocolError, match="port"):
        Socks5Client("example.com", port)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("", "p", "username must be 1 to 255 bytes"),
        ("u", "", "password must be 1 to 255 bytes"),
        ("u", None, "password must be 1 to 255 bytes"),
        ("u" * 256, "p", "username must be 1 to 255 bytes"),
        ("u", "p" * 256, "password must be 1 to 255 bytes"),
        (None, "p", "password was given without a username"),
        ("\udc80", "p", "not valid Unicode"),
    ],
)
def test_bad_credentials_are_refused(
    username: str | None, password: str | None, message: str
) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        Socks5Client("example.com", 22, username=username, password=password)


# Wire message classes round-trip.


def test_message_classes_encode_and_parse() -> None:
    assert socks5.Greeting((0, 2)).to_bytes() == b"\x05\x02\x00\x02"
    assert socks5.Greeting.parse(b"\x05\x02\x00\x02").methods == (0, 2)
    assert socks5.UserPassRequest.parse(b"\x01\x01u\x02pw").password == b"pw"
    request = socks5.CommandRequest.parse(bytes.fromhex("05 02 00 03 01 68 0050"))
    assert (request.command, request.atyp, request.address, request.port) == (2, 3, b"h", 80)
    reply = socks5.CommandReply(0, 4, bytes(16), 7)
    assert socks5.CommandReply.parse(reply.to_bytes()).host == "::"


# Server role.


def server_after_greeting(*, require_auth: bool = False) -> Socks5Server:
    server = Socks5Server(require_auth=require_auth)
    server.receive_data(b"\x05\x02\x00\x02")
    return server


def test_server_selects_no_auth() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00")
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b"\x05\x00"
    assert server.state is State.REQUEST


def test_server_full_flow_with_auth() -> None:
    server = server_after_greeting(require_auth=True)
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b"\x05\x02"
    assert server.bytes_needed() == 2
    server.receive_data(b"\x01\x05alice\x07s3cr3t!")
    assert server.next_event() == Credentials("alice", "s3cr3t!")
    with pytest.raises(
        LocalProtocolError, match=r"reply_success\(\) is not valid in state GREETING"
    ):
        Socks5Server().reply_success()
    server.accept_credentials(True)
    assert server.data_to_send() == b"\x01\x00"
    server.receive_data(bytes.fromhex("05 01 00 03 0b 6578616d706c652e636f6d 0016") + b"hello")
    assert server.next_event() == Request("CONNECT", "example.com", 22)
    server.reply_success("192.0.2.1", 40000)
    assert server.data_to_send() == bytes.fromhex("05 00 00 01 c0000201 9c40")
    assert server.next_event() == Established("192.0.2.1", 40000, "reply 0 succeeded")
    assert server.trailing_data == b"hello"


def test_server_rejects_credentials() -> None:
    server = server_after_greeting(require_auth=True)
    server.receive_data(b"\x01\x01u\x01p")
    assert server.next_event() == Credentials("u", "p")
    server.accept_credentials(False)
    assert server.data_to_send() == b"\x05\x02\x01\x01"
    assert server.next_event() == Rejected("authentication failed (RFC 1929 status 1)", Rejected.AUTHENTICATION)
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    ("greeting", "require_auth"),
    [(b"\x05\x01\x00", True), (b"\x05\x01\x02", False), (b"\x05\x00", False)],
)
def test_server_no_acceptable_method(greeting: bytes, require_auth: bool) -> None:
    server = Socks5Server(require_auth=require_auth)
    server.receive_data(greeting)
    event = server.next_event()
    assert isinstance(event, Rejected)
    assert "no acceptable authentication method" in event.reason
    assert server.data_to_send() == b"\x05\xff"
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    ("request_hex", "command", "host", "port"),
    [
        ("05 01 00 01 7f000001 0016", "CONNECT", "127.0.0.1", 22),
        ("05 01 00 04 00000000000000000000000000000001 0050", "CONNECT", "::1", 80),
        ("05 01 00 03 04 686f7374 01bb", "CONNECT", "host", 443),
        ("05 02 00 01 00000000 0000", "BIND", "0.0.0.0", 0),
        ("05 03 00 01 00000000 0000", "UDP_ASSOCIATE", "0.0.0.0", 0),
    ],
)
def test_server_parses_every_command_and_address_type(
    request_hex: str, command: str, host: str, port: int
) -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00" + bytes.fromhex(request_hex))
    assert server.next_event() == Request(command, host, port)
    assert server.data_to_send() == b"\x05\x00"


def test_server_refuses_unsupported_command_on_request() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00" + bytes.fromhex("05 02 00 01 00000000 0000"))
    assert server.next_event() == Request("BIND", "0.0.0.0", 0)
    server.reply_failure(socks5.Reply.COMMAND_NOT_SUPPORTED)
    assert server.data_to_send() == b"\x05\x00" + bytes.fromhex("05 07 00 01 00000000 0000")
    assert server.next_event() == Rejected("command not supported (reply 7)", Rejected.REFUSED)


def test_server_answers_unknown_command_with_reply_7() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00\x05\x09\x00\x01")
    event = server.next_event()
    assert isinstance(event, Rejected)
    assert event.reason == "unknown command 0x09: command not supported (reply 7)"
    assert server.data_to_send() == b"\x05\x00" + bytes.fromhex("05 07 00 01 00000000 0000")


def test_server_answers_unknown_address_type_with_reply_8() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00\x05\x01\x00\x02")
    event = server.next_event()
    assert isinstance(event, Rejected)
    assert "address type not supported (reply 8)" in event.reason
    assert server.data_to_send()[-10:] == bytes.fromhex("05 08 00 01 00000000 0000")


@pytest.mark.parametrize(
    ("bound", "wire"),
    [
        ((None, None), "05 00 00 01 00000000 0000"),
        (("::1", 1), "05 00 00 04 00000000000000000000000000000001 0001"),
        (("proxy.example", 2), "05 00 00 03 0d 70726f78792e6578616d706c65 0002"),
    ],
)
def test_server_reply_success_bound_address(
    bound: tuple[str | None, int | None], wire: str
) -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00" + bytes.fromhex("05 01 00 01 7f000001 0016"))
    server.next_event()
    server.data_to_send()
    server.reply_success(*bound)
    assert server.data_to_send() == bytes.fromhex(wire)


def test_server_misuse_poisons() -> None:
    server = Socks5Server(require_auth=True)
    server.receive_data(b"\x05\x01\x02\x01\x01u\x01p")
    assert isinstance(server.next_event(), Credentials)
    with pytest.raises(LocalProtocolError, match="accept_credentials"):
        server.next_event()
    assert server.state is State.ERROR


@pytest.mark.parametrize("code", [0, 256, -1, True])
def test_server_reply_failure_code_range(code: int) -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x01\x00" + bytes.fromhex("05 01 00 01 7f000001 0016"))
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.reply_failure(code)


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x01\x00\x16",  # SOCKS4 client
        b"GET / HTTP/1.1\r\n",
        b"\x05\x01\x00\x04\x01\x00\x01",  # request with wrong version
        b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x16",  # empty domain name
        b"\x05\x01\x00\x05\x01\x00\x03\x02\xff\xfe\x00\x16",  # not UTF-8
        b"\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x16",  # space in name
    ],
)
def test_server_rejects_malformed_input(data: bytes) -> None:
    server = Socks5Server()
    server.receive_data(data)
    with pytest.raises(ProtocolError):
        events_until_blocked(server)


def test_server_eof_message_names_the_client() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05")
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"^client closed the connection"):
        server.next_event()


def test_server_bytes_needed() -> None:
    server = Socks5Server(require_auth=True)
    assert server.bytes_needed() == 2
    server.receive_data(b"\x05\x03")
    assert server.bytes_needed() == 3
    server.receive_data(b"\x00\x01\x02")
    server.next_event()
    assert server.bytes_needed() == 2
    server.receive_data(b"\x01\x03")
    assert server.bytes_needed() == 4
    server.receive_data(b"abc")
    assert server.bytes_needed() == 1
    server.receive_data(b"\x02")
    assert server.bytes_needed() == 2
