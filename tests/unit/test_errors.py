"""Outcomes are data (issue 9, section 4): every network-side failure is an OSError with an errno
where one fits, bad arguments are ValueErrors, str(e) stays the CLI's one line, and the fields the
server acts on (peer_closed, protocol and code, Rejected.kind) are set where the failure arises.
Also the machine registry in hopcat.proto."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from hopcat.errors import (
    ConnectError,
    HopcatError,
    HopcatTimeoutError,
    LocalProtocolError,
    ProxyAuthError,
    ProxyError,
    ProxyUnreachableError,
    RelayError,
    RemoteProtocolError,
    ResolveError,
    UsageError,
)
from hopcat.proto import client_machine, server_machine
from hopcat.proto._events import NEED_DATA, Credentials, Rejected, Request
from hopcat.proto.http_connect import HttpConnectClient, HttpConnectServer
from hopcat.proto.socks4 import Socks4Client, Socks4Server
from hopcat.proto.socks5 import Socks5Client, Socks5Server
from hopcat.server.upstream import failure as upstream_failure
from support import clean_env

# -- the builtin bases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (UsageError, ValueError),
        (LocalProtocolError, ValueError),
        (ResolveError, OSError),
        (ConnectError, ConnectionError),
        (ProxyUnreachableError, ConnectionError),
        (ProxyError, ConnectionError),
        (ProxyAuthError, ConnectionError),
        (RemoteProtocolError, ConnectionError),
        (HopcatTimeoutError, TimeoutError),
        (RelayError, OSError),
    ],
)
def test_each_error_is_the_builtin_a_caller_catches(cls: type[HopcatError], base: type) -> None:
    error = cls("message")
    assert isinstance(error, base) and isinstance(error, HopcatError)


@pytest.mark.parametrize("cls", [UsageError, LocalProtocolError])
def test_bad_arguments_are_not_network_failures(cls: type[HopcatError]) -> None:
    assert not isinstance(cls("message"), OSError)


@pytest.mark.parametrize("cls", [ProxyError, ProxyAuthError, RemoteProtocolError])
def test_network_failures_are_not_value_errors(cls: type[HopcatError]) -> None:
    assert not isinstance(cls("message"), ValueError)


def test_a_proxy_timeout_is_its_report_not_our_deadline() -> None:
    error = ProxyError("TTL expired (reply 6)", protocol="socks5", code=6)
    assert error.errno == errno.ETIMEDOUT and not isinstance(error, TimeoutError)


# -- str(e) and OSError's own attributes ------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ProxyError("connection refused (reply 5)", protocol="socks5", code=5),
        ProxyAuthError("HTTP 407 Proxy Authentication Required", protocol="http", code=407),
        ConnectError("connect to 127.0.0.1:9: connection refused", errno=errno.ECONNREFUSED),
        RemoteProtocolError("proxy closed the connection during the handshake", peer_closed=True),
    ],
)
def test_oserror_attributes_do_not_garble_the_message(error: HopcatError) -> None:
    assert isinstance(error, OSError)
    assert str(error) == error.message
    assert error.args == (error.message,)
    assert error.strerror is None
    assert "Errno" not in str(error) and "Errno" not in repr(error)
    error.where = "proxy socks5://127.0.0.1:1080 (hop 1/2)"
    assert str(error) == f"proxy socks5://127.0.0.1:1080 (hop 1/2): {error.message}"


def test_every_error_can_be_located() -> None:
    assert HopcatError.hop is None and HopcatError.proxy is None
    error = ResolveError("resolve nowhere.invalid: name or service not known")
    assert (error.hop, error.proxy, error.where) == (None, None, None)
    error.hop, error.proxy = 2, "socks5://user:***@proxy:1080"
    assert (error.hop, error.proxy) == (2, "socks5://user:***@proxy:1080")
    assert ResolveError("x").hop is None  # set on the instance, not the class


# -- errno of a proxy's refusal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "code", "number"),
    [
        ("socks5", 1, None),
        ("socks5", 2, errno.EACCES),
        ("socks5", 3, errno.ENETUNREACH),
        ("socks5", 4, errno.EHOSTUNREACH),
        ("socks5", 5, errno.ECONNREFUSED),
        ("socks5", 6, errno.ETIMEDOUT),
        ("socks5", 7, errno.EOPNOTSUPP),
        ("socks5", 8, errno.EAFNOSUPPORT),
        ("socks5", 9, None),
        ("socks4", 91, errno.ECONNREFUSED),
        ("http", 403, errno.EACCES),
        ("http", 504, errno.ETIMEDOUT),
        ("http", 502, None),
        ("http", 503, None),
        ("http", 5, None),  # a code means something only in its own protocol
        (None, 5, None),
    ],
)
def test_errno_table(protocol: str | None, code: int, number: int | None) -> None:
    assert ProxyError("refused", protocol=protocol, code=code).errno == number


def refusal(machine: Socks4Client | Socks5Client | HttpConnectClient, *replies: bytes) -> ProxyError:
    """Play the proxy's ``replies`` (one per client message) and return the refusal raised."""
    with pytest.raises(ProxyError) as info:
        for reply in replies:
            machine.data_to_send()
            machine.receive_data(reply)
            while machine.next_event() is not NEED_DATA:
                pass
    return info.value


@pytest.mark.parametrize(
    ("code", "number"),
    [(2, errno.EACCES), (3, errno.ENETUNREACH), (4, errno.EHOSTUNREACH),
     (5, errno.ECONNREFUSED), (6, errno.ETIMEDOUT), (1, None)],
)  # fmt: skip
def test_socks5_reply_sets_the_fields(code: int, number: int | None) -> None:
    error = refusal(Socks5Client("example.com", 22), b"\x05\x00", bytes((5, code)))
    assert type(error) is ProxyError
    assert (error.protocol, error.code, error.errno) == ("socks5", code, number)


def test_socks4_reply_sets_the_fields() -> None:
    error = refusal(Socks4Client("192.0.2.1", 22), b"\x00\x5b")
    assert (error.protocol, error.code, error.errno) == ("socks4", 91, errno.ECONNREFUSED)


@pytest.mark.parametrize(
    ("status", "number"), [(403, errno.EACCES), (504, errno.ETIMEDOUT), (502, None)]
)
def test_http_status_sets_the_fields(status: int, number: int | None) -> None:
    head = f"HTTP/1.1 {status} No\r\n\r\n".encode()
    error = refusal(HttpConnectClient("example.com", 22), head)
    assert type(error) is ProxyError
    assert (error.protocol, error.code, error.errno) == ("http", status, number)


@pytest.mark.parametrize(
    ("machine", "replies", "protocol", "code"),
    [
        (lambda: Socks5Client("h", 22), [b"\x05\xff"], "socks5", 0xFF),
        (lambda: Socks5Client("h", 22), [b"\x05\x02"], "socks5", 2),
        (lambda: Socks5Client("h", 22, username="u", password="p"), [b"\x05\x02", b"\x01\x04"],
         "socks5", 4),
        (lambda: Socks4Client("192.0.2.1", 22), [b"\x00\x5c"], "socks4", 92),
        (lambda: Socks4Client("192.0.2.1", 22), [b"\x00\x5d"], "socks4", 93),
        (lambda: HttpConnectClient("h", 22), [b"HTTP/1.1 407 Auth\r\n\r\n"], "http", 407),
        (lambda: HttpConnectClient("h", 22), [b"HTTP/1.1 401 Auth\r\n\r\n"], "http", 401),
    ],
)  # fmt: skip
def test_authentication_refusals_are_eacces(
    machine: object, replies: list[bytes], protocol: str, code: int
) -> None:
    # RFC 1929 status 4 is not SOCKS5 reply 4 (host unreachable): an auth error is EACCES always.
    error = refusal(machine(), *replies)  # type: ignore[operator]
    assert isinstance(error, ProxyAuthError)
    assert (error.protocol, error.code, error.errno) == (protocol, code, errno.EACCES)


# -- peer_closed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine",
    [
        lambda: Socks5Client("h", 22),
        lambda: Socks4Client("192.0.2.1", 22),
        lambda: HttpConnectClient("h", 22),
        lambda: Socks5Server(),
        lambda: Socks4Server(),
        lambda: HttpConnectServer(),
    ],
)
def test_eof_mid_handshake_is_peer_closed(machine: object) -> None:
    m = machine()  # type: ignore[operator]
    m.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        m.next_event()
    assert info.value.peer_closed


@pytest.mark.parametrize(
    ("machine", "data"),
    [
        (lambda: Socks5Client("h", 22), b"\x04\x00"),
        (lambda: Socks4Client("192.0.2.1", 22), b"\x07"),
        (lambda: HttpConnectClient("h", 22), b"SSH-2.0-x\r\n"),
        (lambda: Socks5Server(), b"\x06"),
        (lambda: HttpConnectServer(), b"\x01"),
    ],
)
def test_malformed_bytes_are_not_peer_closed(machine: object, data: bytes) -> None:
    m = machine()  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError) as info:
        m.receive_data(data)
        m.next_event()
    assert not info.value.peer_closed


# -- Rejected.kind ----------------------------------------------------------------------------


def server_events(machine: Socks4Server | Socks5Server | HttpConnectServer, data: bytes) -> object:
    machine.receive_data(data)
    return machine.next_event()


def test_socks5_server_rejection_kinds() -> None:
    rejected = server_events(Socks5Server(require_auth=True), b"\x05\x01\x00")
    assert isinstance(rejected, Rejected) and rejected.kind == Rejected.AUTHENTICATION
    for request in (b"\x05\x09\x00\x01" + bytes(6), b"\x05\x01\x00\x09" + bytes(6)):
        rejected = server_events(Socks5Server(), b"\x05\x01\x00" + request)
        assert isinstance(rejected, Rejected) and rejected.kind == Rejected.UNSUPPORTED
    server = Socks5Server(require_auth=True)
    assert server_events(server, b"\x05\x01\x02\x01\x01u\x01p") == Credentials("u", "p")
    server.accept_credentials(False)
    assert server.next_event() == Rejected(
        "authentication failed (RFC 1929 status 1)", Rejected.AUTHENTICATION
    )


def test_socks4_server_rejection_kinds() -> None:
    rejected = server_events(Socks4Server(), b"\x04\x09\x00\x16\x7f\x00\x00\x01\x00")
    assert isinstance(rejected, Rejected) and rejected.kind == Rejected.UNSUPPORTED
    server = Socks4Server()
    assert server_events(server, b"\x04\x01\x00\x16\x7f\x00\x00\x01\x00") == Request(
        "CONNECT", "127.0.0.1", 22
    )
    with pytest.raises(LocalProtocolError):  # SOCKS4 never asks for credentials
        server.accept_credentials(True)


def test_http_server_rejection_kinds() -> None:
    rejected = server_events(HttpConnectServer(require_auth=True), b"CONNECT h:22 HTTP/1.1\r\n\r\n")
    assert isinstance(rejected, Rejected) and rejected.kind == Rejected.AUTHENTICATION
    server = HttpConnectServer()
    assert server_events(server, b"CONNECT h:22 HTTP/1.1\r\n\r\n") == Request("CONNECT", "h", 22)
    server.reply_failure(403)
    rejected = server.next_event()
    assert isinstance(rejected, Rejected) and rejected.kind == Rejected.REFUSED


# -- the server maps upstream failures by fields ----------------------------------------------


@pytest.mark.parametrize(
    ("error", "result", "upstream_code"),
    [
        (ProxyError("x", protocol="socks5", code=5), "refused", 5),
        (ProxyError("x", protocol="socks5", code=6), "timeout", 6),
        (ProxyError("x", protocol="socks5", code=2), "denied", 2),
        (ProxyError("x", protocol="socks5", code=1), "upstream-refused", None),
        (ProxyError("x", protocol="socks4", code=91), "upstream-refused", None),
        (ProxyError("x", protocol="http", code=403), "denied", None),
        (ProxyError("x", protocol="http", code=504), "timeout", None),
        (ProxyError("x", protocol="http", code=502), "upstream-refused", None),
        # An RFC 1929 status is no reply code, whatever its number.
        (ProxyAuthError("x", protocol="socks5", code=2), "upstream-refused", None),
        (RemoteProtocolError("x", peer_closed=True), "upstream-error", None),
        (HopcatTimeoutError("x"), "timeout", None),
        (ProxyUnreachableError("x"), "upstream-unreachable", None),
    ],
)
def test_via_failure_by_fields(error: HopcatError, result: str, upstream_code: int | None) -> None:
    assert upstream_failure(error, 1) == (result, str(error), upstream_code)


def test_via_failure_of_an_earlier_hop_says_nothing_about_the_target() -> None:
    error = ProxyError("connection refused (reply 5)", protocol="socks5", code=5)
    error.hop = 1
    assert upstream_failure(error, 2)[0] == "upstream-refused"
    error.hop = 2
    assert upstream_failure(error, 2)[::2] == ("refused", 5)


# -- the registry -----------------------------------------------------------------------------


def test_client_machine_picks_by_protocol() -> None:
    assert type(client_machine("socks5", "h", 22, username="u", password="p")) is Socks5Client
    assert type(client_machine("socks4a", "h", 22, username="me")) is Socks4Client
    assert type(client_machine("socks4", "192.0.2.1", 22)) is Socks4Client
    http = client_machine("http", "h", 22, headers=[("X-A", "1")])
    assert type(http) is HttpConnectClient and b"X-A: 1\r\n" in http.data_to_send()
    with pytest.raises(LocalProtocolError):
        client_machine("socks4", "h", 22)  # SOCKS4 proper carries no names
    assert client_machine("socks4a", "h", 22, username="me").data_to_send().endswith(b"me\0h\0")
    with pytest.raises(ValueError, match="socks6"):
        client_machine("socks6", "h", 22)


def test_server_machine_picks_by_protocol() -> None:
    assert type(server_machine("socks5", require_auth=True)) is Socks5Server
    assert type(server_machine("socks4")) is Socks4Server
    assert type(server_machine("http")) is HttpConnectServer
    with pytest.raises(ValueError, match="socks6"):
        server_machine("socks6")


def test_registry_imports_only_the_protocol_it_makes() -> None:
    code = (
        "import sys; from hopcat.proto import client_machine; client_machine('socks5', 'h', 22); "
        "print(sorted(m for m in sys.modules if m.startswith('hopcat.proto.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=clean_env(), timeout=30).stdout  # fmt: skip
    assert "hopcat.proto.socks5" in out
    assert "socks4" not in out and "http_connect" not in out
