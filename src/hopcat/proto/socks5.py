"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), both roles, sans I/O.

Client states (``_machine.State``)::

    METHOD_REPLY --(method 0x00)------------------------------> REPLY --(reply 0)--> DONE
         |                                                        ^
         +--(method 0x02)--> AUTH_REPLY --(RFC 1929 status 0)-----+
    anything else (0xFF, a refusal, malformed bytes, early EOF) raises and enters ERROR.

The client sends its greeting alone and the CONNECT request only after the method selection
arrives (and after authentication, when chosen): RFC 1928 section 3 has the server choose a method
before it reads a request, and some servers (microsocks) drop a request that arrived together
with the greeting. Every message is framed exactly (``bytes_needed()``): 2 bytes of method
selection, 2 of RFC 1929 status, then the reply: a 4-byte head, then 4 (IPv4), 16 (IPv6) or
1 + n (domain) address bytes and 2 of port. A refusal is reported as soon as the reply code is
known, because some servers close right after a short failure reply.

Server states::

    GREETING --(0x00 chosen)------------------------------------------> REQUEST
        |  --(0x02 chosen)--> AUTH_REQUEST --> AUTH_DECISION --(ok)-----^    |
        |                                          \\--(not ok)--> CLOSED     v
        +--(no acceptable method: 0xFF)--> CLOSED        REPLY_DECISION --> DONE / CLOSED

An unknown command is answered with reply 7 and an unknown address type with reply 8 by the
machine itself (it cannot even frame the address); BIND and UDP ASSOCIATE are handed to the server
code as a ``Request`` like CONNECT, to be refused with ``reply_failure(7)`` unless it supports
them.

Not done: GSSAPI (RFC 1961) and other methods; BIND's second reply. The bound address in a
CONNECT reply is parsed for the timeline; a UDP ASSOCIATE reply's is the relay's address. The
datagram header is ``hopcat.proto.socks5_udp``.
"""

from __future__ import annotations

import _socket as socket  # see _machine.py: no socket module, no enum

from ..errors import LocalProtocolError, ProxyAuthError, ProxyError, RemoteProtocolError
from ._events import NEED_DATA, Credentials, Established, Event, Rejected, Request
from ._machine import (
    HostKind,
    Machine,
    State,
    _outbound,
    check_host,
    check_port,
    decode_name,
    encode_field,
    sanitize,
    version_hint,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

    from ._machine import HandlerTable, SizeTable, Step

__all__ = [
    "NEED_DATA",
    "AddressType",
    "AuthSucceeded",
    "Command",
    "CommandReply",
    "CommandRequest",
    "Credentials",
    "Established",
    "Greeting",
    "Method",
    "MethodSelected",
    "MethodSelection",
    "Rejected",
    "Reply",
    "Request",
    "Socks5Client",
    "Socks5Server",
    "UserPassRequest",
    "UserPassStatus",
    "describe_reply",
]

SOCKS_VERSION = 5
# RFC 1929 section 2: the username/password sub-negotiation has its own version number.
USERPASS_VERSION = 1


class Method:
    """Authentication methods (RFC 1928 section 3)."""

    NO_AUTHENTICATION_REQUIRED = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command:
    """CMD field of a request (RFC 1928 section 4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


COMMAND_NAMES: dict[int, str] = {
    Command.CONNECT: "CONNECT",
    Command.BIND: "BIND",
    Command.UDP_ASSOCIATE: "UDP_ASSOCIATE",
}


class AddressType:
    """ATYP field (RFC 1928 section 5)."""

    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply:
    """REP field of a reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_SOCKS_SERVER_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED_BY_RULESET = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


REPLY_TEXT: dict[int, str] = {
    Reply.SUCCEEDED: "succeeded",
    Reply.GENERAL_SOCKS_SERVER_FAILURE: "general SOCKS server failure",
    Reply.CONNECTION_NOT_ALLOWED_BY_RULESET: "connection not allowed by ruleset",
    Reply.NETWORK_UNREACHABLE: "network unreachable",
    Reply.HOST_UNREACHABLE: "host unreachable",
    Reply.CONNECTION_REFUSED: "connection refused",
    Reply.TTL_EXPIRED: "TTL expired",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

METHOD_TEXT: dict[int, str] = {
    Method.NO_AUTHENTICATION_REQUIRED: "no authentication",
    Method.GSSAPI: "GSSAPI",
    Method.USERNAME_PASSWORD: "username/password",
}

_SUCCESS_DETAIL = "reply 0 succeeded"
_COMMANDS = frozenset(COMMAND_NAMES)
_ADDRESS_TYPES = frozenset((AddressType.IPV4, AddressType.DOMAINNAME, AddressType.IPV6))
_ATYP_FOR_KIND = {
    HostKind.IPV4: AddressType.IPV4,
    HostKind.IPV6: AddressType.IPV6,
    HostKind.NAME: AddressType.DOMAINNAME,
}


def describe_reply(code: int) -> str:
    """``host unreachable (reply 4)``; codes RFC 1928 leaves unassigned are named as such."""
    text = REPLY_TEXT.get(code)
    return f"{text} (reply {code})" if text else f"unassigned reply code {code}"


def _describe_method(method: int) -> str:
    text = METHOD_TEXT.get(method)
    return f"0x{method:02x} ({text})" if text else f"0x{method:02x}"


# Wire messages. ``size(buf)`` returns the smallest total length the message can have given the
# bytes buffered so far; it is exact once the length fields are in, and ``parse`` takes exactly
# that many bytes. ``size`` never raises: on a bad length or type field it returns what is
# buffered so that ``parse`` runs and raises.


class Greeting:
    """Method offer, client to server (RFC 1928 section 3).

    +----+----------+----------+
    |VER | NMETHODS | METHODS  |
    +----+----------+----------+
    | 1  |    1     | 1 to 255 |
    +----+----------+----------+
    """

    __slots__ = ("methods",)

    def __init__(self, methods: tuple[int, ...]) -> None:
        self.methods = methods

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, len(self.methods), *self.methods))

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        return 2 if len(buf) < 2 else 2 + buf[1]

    @classmethod
    def parse(cls, data: bytes) -> Greeting:
        _check_version(data[0], SOCKS_VERSION, "SOCKS5 greeting")
        return cls(tuple(data[2:]))


class MethodSelection:
    """The server's choice of method, server to client (RFC 1928 section 3).

    +----+--------+
    |VER | METHOD |
    +----+--------+
    | 1  |   1    |
    +----+--------+
    """

    __slots__ = ("method",)

    def __init__(self, method: int) -> None:
        self.method = method

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.method))

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        return 2

    @classmethod
    def parse(cls, data: bytes) -> MethodSelection:
        _check_version(data[0], SOCKS_VERSION, "SOCKS5 reply")
        return cls(data[1])


class UserPassRequest:
    """Username/password, client to server (RFC 1929 section 2).

    +----+------+----------+------+----------+
    |VER | ULEN |  UNAME   | PLEN |  PASSWD  |
    +----+------+----------+------+----------+
    | 1  |  1   | 1 to 255 |  1   | 1 to 255 |
    +----+------+----------+------+----------+
    """

    __slots__ = ("password", "username")

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password

    def to_bytes(self) -> bytes:
        return (
            bytes((USERPASS_VERSION, len(self.username)))
            + self.username
            + bytes((len(self.password),))
            + self.password
        )

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        if len(buf) < 2:
            return 2
        plen_at = 2 + buf[1]
        if len(buf) <= plen_at:
            return plen_at + 1
        return plen_at + 1 + buf[plen_at]

    @classmethod
    def parse(cls, data: bytes) -> UserPassRequest:
        _check_version(data[0], USERPASS_VERSION, "RFC 1929 request")
        plen_at = 2 + data[1]
        return cls(data[2:plen_at], data[plen_at + 1 :])


class UserPassStatus:
    """Authentication result, server to client (RFC 1929 section 2); 0 is success.

    +----+--------+
    |VER | STATUS |
    +----+--------+
    | 1  |   1    |
    +----+--------+
    """

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status

    def to_bytes(self) -> bytes:
        return bytes((USERPASS_VERSION, self.status))

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        return 2

    @classmethod
    def parse(cls, data: bytes) -> UserPassStatus:
        # Some servers put the SOCKS version (5) here instead of the sub-negotiation version (1);
        # curl and Dante's client accept that, and so do we.
        if data[0] not in (USERPASS_VERSION, SOCKS_VERSION):
            raise RemoteProtocolError(f"not an RFC 1929 reply (version byte 0x{data[0]:02x})")
        return cls(data[1])


def _address_size(buf: bytes | bytearray) -> int:
    # Requests and replies share the layout VER, CMD/REP, RSV, ATYP, address, port.
    if len(buf) < 4:
        return 4
    atyp = buf[3]
    if atyp == AddressType.IPV4:
        return 4 + 4 + 2
    if atyp == AddressType.IPV6:
        return 4 + 16 + 2
    if atyp == AddressType.DOMAINNAME:
        return 5 if len(buf) < 5 else 5 + buf[4] + 2
    return 4


def _parse_address(data: bytes) -> tuple[int, bytes, int]:
    """(ATYP, raw address bytes, port) of a request or reply already framed by ``_address_size``."""
    atyp = data[3]
    if atyp == AddressType.DOMAINNAME:
        address = data[5:-2]
    elif atyp in (AddressType.IPV4, AddressType.IPV6):
        address = data[4:-2]
    else:
        raise RemoteProtocolError(f"unknown address type 0x{atyp:02x}")
    return atyp, address, int.from_bytes(data[-2:], "big")


def _pack_address(atyp: int, address: bytes, port: int) -> bytes:
    length = bytes((len(address),)) if atyp == AddressType.DOMAINNAME else b""
    return bytes((atyp,)) + length + address + port.to_bytes(2, "big")


def _address_text(atyp: int, address: bytes) -> str:
    if atyp == AddressType.IPV4:
        return socket.inet_ntop(socket.AF_INET, address)
    if atyp == AddressType.IPV6:
        return socket.inet_ntop(socket.AF_INET6, address)
    return sanitize(address.decode("ascii", "replace"))


class CommandRequest:
    """CONNECT/BIND/UDP ASSOCIATE, client to server (RFC 1928 section 4).

        +----+-----+-------+------+----------+----------+
        |VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |
        +----+-----+-------+------+----------+----------+
        | 1  |  1  | X'00' |  1   | Variable |    2     |
        +----+-----+-------+------+----------+----------+

    DST.ADDR is 4 bytes (ATYP 1), 16 bytes (ATYP 4), or a length byte and that many bytes of
    name (ATYP 3, no terminating NUL).
    """

    __slots__ = ("address", "atyp", "command", "port")

    def __init__(self, command: int, atyp: int, address: bytes, port: int) -> None:
        self.command = command
        self.atyp = atyp
        self.address = address
        self.port = port

    def to_bytes(self) -> bytes:
        head = bytes((SOCKS_VERSION, self.command, 0))
        return head + _pack_address(self.atyp, self.address, self.port)

    size = staticmethod(_address_size)

    @classmethod
    def parse(cls, data: bytes) -> CommandRequest:
        _check_version(data[0], SOCKS_VERSION, "SOCKS5 request")
        return cls(data[1], *_parse_address(data))


class CommandReply:
    """Reply to a request, server to client (RFC 1928 section 6).

    +----+-----+-------+------+----------+----------+
    |VER | REP |  RSV  | ATYP | BND.ADDR | BND.PORT |
    +----+-----+-------+------+----------+----------+
    | 1  |  1  | X'00' |  1   | Variable |    2     |
    +----+-----+-------+------+----------+----------+
    """

    __slots__ = ("address", "atyp", "port", "reply")

    def __init__(self, reply: int, atyp: int, address: bytes, port: int) -> None:
        self.reply = reply
        self.atyp = atyp
        self.address = address
        self.port = port

    @property
    def host(self) -> str:
        return _address_text(self.atyp, self.address)

    def to_bytes(self) -> bytes:
        head = bytes((SOCKS_VERSION, self.reply, 0))
        return head + _pack_address(self.atyp, self.address, self.port)

    size = staticmethod(_address_size)

    @classmethod
    def parse(cls, data: bytes) -> CommandReply:
        _check_version(data[0], SOCKS_VERSION, "SOCKS5 reply")
        return cls(data[1], *_parse_address(data))


def _check_version(byte: int, expected: int, what: str) -> None:
    if byte != expected:
        hint = version_hint(byte) if what == "SOCKS5 reply" else ""
        raise RemoteProtocolError(f"not a {what} (version byte 0x{byte:02x}{hint})")


class MethodSelected(Event):
    """Client side: the proxy chose ``method`` (a ``Method`` value)."""

    __slots__ = ("method",)
    _fields = __slots__

    def __init__(self, method: int) -> None:
        self.method = method

    def describe(self) -> str:
        return f"SOCKS5 method: {METHOD_TEXT.get(self.method, f'0x{self.method:02x}')}"


class AuthSucceeded(Event):
    """Client side: the proxy accepted our username and password."""

    __slots__ = ()

    def describe(self) -> str:
        return "SOCKS5 username/password accepted (RFC 1929 status 0)"


class Socks5Client(Machine):
    """Client role: CONNECT to ``host``:``port`` through a SOCKS5 proxy; with ``command``
    ``Command.UDP_ASSOCIATE``, a UDP association whose datagrams will come from ``host``:``port``
    (0.0.0.0:0 when not known): the reply's bound address (``Established.bound_host``/
    ``bound_port``) is then the relay to send them to (``hopcat.proto.socks5_udp``).

    IPv4 and IPv6 literals are sent as addresses (ATYP 1 and 4), anything else as a name for the
    proxy to resolve (ATYP 3). With a username, both "no auth" and username/password are offered
    and the proxy picks; RFC 1929 limits each to 1..255 bytes, checked here before any byte is
    produced.
    """

    __slots__ = ("_auth_request", "_connect_request", "_offered")

    def __init__(
        self, host: str, port: int, *, username: str | None = None, password: str | None = None,
        command: int = Command.CONNECT,
    ) -> None:  # fmt: skip
        if command not in (Command.CONNECT, Command.UDP_ASSOCIATE):
            raise LocalProtocolError("SOCKS5 client command must be CONNECT or UDP ASSOCIATE")
        kind, _, address = check_host(host)
        check_port(port)
        if username is None:
            if password is not None:
                raise LocalProtocolError("a password was given without a username")
            self._auth_request = b""
            self._offered: tuple[int, ...] = (Method.NO_AUTHENTICATION_REQUIRED,)
        else:
            user = encode_field(username, "RFC 1929 username", minimum=1, maximum=255)
            secret = encode_field(
                "" if password is None else password, "RFC 1929 password", minimum=1, maximum=255
            )
            self._auth_request = UserPassRequest(user, secret).to_bytes()
            self._offered = (Method.NO_AUTHENTICATION_REQUIRED, Method.USERNAME_PASSWORD)
        request = CommandRequest(command, _ATYP_FOR_KIND[kind], address, port)
        self._connect_request = request.to_bytes()
        super().__init__(State.METHOD_REPLY)
        self._outbox += Greeting(self._offered).to_bytes()

    def _on_method_reply(self) -> Step:
        if self._inbox.data:
            _check_version(self._inbox.data[0], SOCKS_VERSION, "SOCKS5 reply")
        data = self._take_message()
        if data is None:
            return self._wait()
        method = MethodSelection.parse(data).method
        if method == Method.NO_ACCEPTABLE_METHODS:
            offered = ", ".join(METHOD_TEXT[m] for m in self._offered)
            raise ProxyAuthError(
                f"proxy accepted none of our authentication methods (offered: {offered})",
                protocol="socks5",
                code=method,
            )
        if method == Method.USERNAME_PASSWORD and not self._auth_request:
            raise ProxyAuthError(
                "proxy requires username/password authentication; supply a username and password",
                protocol="socks5",
                code=method,
            )
        if method not in self._offered:
            raise RemoteProtocolError(
                f"proxy selected authentication method {_describe_method(method)},"
                " which we did not offer"
            )
        if method == Method.USERNAME_PASSWORD:
            self._outbox += self._auth_request
            self._state = State.AUTH_REPLY
        else:
            self._outbox += self._connect_request
            self._state = State.REPLY
        return MethodSelected(method)

    def _on_auth_reply(self) -> Step:
        data = self._take_message()
        if data is None:
            return self._wait()
        status = UserPassStatus.parse(data).status
        if status != 0:
            raise ProxyAuthError(
                f"authentication failed (RFC 1929 status {status})", protocol="socks5", code=status
            )
        self._outbox += self._connect_request
        self._state = State.REPLY
        return AuthSucceeded()

    def _on_reply(self) -> Step:
        buf = self._inbox.data
        if buf:
            _check_version(buf[0], SOCKS_VERSION, "SOCKS5 reply")
        if len(buf) >= 2 and buf[1] != Reply.SUCCEEDED:
            # Report the refusal now: a failure reply's address is irrelevant, some servers send
            # a malformed one, and some close before sending it at all.
            raise ProxyError(describe_reply(buf[1]), protocol="socks5", code=buf[1])
        data = self._take_message()
        if data is None:
            return self._wait()
        reply = CommandReply.parse(data)
        return self._finish(State.DONE, Established(reply.host, reply.port, _SUCCESS_DETAIL))

    _HANDLERS: ClassVar[HandlerTable] = {
        State.METHOD_REPLY: _on_method_reply,
        State.AUTH_REPLY: _on_auth_reply,
        State.REPLY: _on_reply,
        State.DONE: Machine._on_final,
    }
    _SIZES: ClassVar[SizeTable] = {
        State.METHOD_REPLY: MethodSelection.size,
        State.AUTH_REPLY: UserPassStatus.size,
        State.REPLY: CommandReply.size,
    }


class Socks5Server(Machine):
    """Server role. With ``require_auth`` only username/password (0x02) is acceptable; without,
    only "no auth" (0x00). Credentials are handed to the server code as a ``Credentials`` event.
    """

    __slots__ = ("_require_auth",)
    _PEER = "client"

    def __init__(self, *, require_auth: bool = False) -> None:
        super().__init__(State.GREETING)
        self._require_auth = require_auth

    def _on_greeting(self) -> Step:
        if self._inbox.data:
            _check_version(self._inbox.data[0], SOCKS_VERSION, "SOCKS5 greeting")
        data = self._take_message()
        if data is None:
            return self._wait()
        offered = Greeting.parse(data).methods
        wanted = (
            Method.USERNAME_PASSWORD if self._require_auth else Method.NO_AUTHENTICATION_REQUIRED
        )
        if wanted not in offered:
            self._outbox += MethodSelection(Method.NO_ACCEPTABLE_METHODS).to_bytes()
            names = ", ".join(_describe_method(m) for m in offered) or "nothing"
            return self._finish(
                State.CLOSED,
                Rejected(
                    f"client offered no acceptable authentication method (offered: {names})",
                    Rejected.AUTHENTICATION,
                ),
            )
        self._outbox += MethodSelection(wanted).to_bytes()
        auth = wanted == Method.USERNAME_PASSWORD
        self._state = State.AUTH_REQUEST if auth else State.REQUEST
        return None

    def _on_auth_request(self) -> Step:
        if self._inbox.data:
            _check_version(self._inbox.data[0], USERPASS_VERSION, "RFC 1929 request")
        data = self._take_message()
        if data is None:
            return self._wait()
        request = UserPassRequest.parse(data)
        self._state = State.AUTH_DECISION
        return Credentials(
            request.username.decode("utf-8", "surrogateescape"),
            request.password.decode("utf-8", "surrogateescape"),
        )

    @_outbound
    def accept_credentials(self, ok: bool) -> None:
        """Answer the ``Credentials`` event: RFC 1929 status 0, or status 1 and close."""
        self._expect(State.AUTH_DECISION, "accept_credentials()")
        self._outbox += UserPassStatus(0 if ok else 1).to_bytes()
        if ok:
            self._state = State.REQUEST
        else:
            why = "authentication failed (RFC 1929 status 1)"
            self._finish(State.CLOSED, Rejected(why, Rejected.AUTHENTICATION))

    def _on_request(self) -> Step:
        buf = self._inbox.data
        if buf:
            _check_version(buf[0], SOCKS_VERSION, "SOCKS5 request")
        if len(buf) >= 4:
            # Refuse before framing the address: with an unknown ATYP it cannot be framed.
            if buf[1] not in _COMMANDS:
                return self._refuse(Reply.COMMAND_NOT_SUPPORTED, f"unknown command 0x{buf[1]:02x}")
            if buf[3] not in _ADDRESS_TYPES:
                return self._refuse(
                    Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type 0x{buf[3]:02x}"
                )
        data = self._take_message()
        if data is None:
            return self._wait()
        request = CommandRequest.parse(data)
        if request.atyp == AddressType.DOMAINNAME:
            host = decode_name(request.address)
        else:
            host = _address_text(request.atyp, request.address)
        self._state = State.REPLY_DECISION
        return Request(COMMAND_NAMES[request.command], host, request.port)

    def _refuse(self, code: int, why: str) -> Event:
        self._outbox += _failure_reply(code)
        rejected = Rejected(f"{why}: {describe_reply(code)}", Rejected.UNSUPPORTED)
        return self._finish(State.CLOSED, rejected)

    @_outbound
    def reply_success(self, bound_host: str | None = None, bound_port: int | None = None) -> None:
        """Grant the request; ``bound_*`` default to 0.0.0.0:0 (what most servers send)."""
        self._expect(State.REPLY_DECISION, "reply_success()")
        host = "0.0.0.0" if bound_host is None else bound_host
        port = 0 if bound_port is None else check_port(bound_port)
        kind, _, address = check_host(host)
        reply = CommandReply(Reply.SUCCEEDED, _ATYP_FOR_KIND[kind], address, port)
        self._outbox += reply.to_bytes()
        self._finish(State.DONE, Established(host, port, _SUCCESS_DETAIL))

    @_outbound
    def reply_failure(self, code: int = Reply.GENERAL_SOCKS_SERVER_FAILURE) -> None:
        """Refuse the request with reply ``code`` (1..255, e.g. ``Reply.HOST_UNREACHABLE``)."""
        self._expect(State.REPLY_DECISION, "reply_failure()")
        if not isinstance(code, int) or isinstance(code, bool) or not 1 <= code <= 255:
            raise LocalProtocolError(f"SOCKS5 failure reply code must be 1..255, not {code!r}")
        self._outbox += _failure_reply(code)
        self._finish(State.CLOSED, Rejected(describe_reply(code), Rejected.REFUSED))

    def abort_reply(self, http_status: int = 400) -> bytes:
        """The bytes that end the handshake with a refusal, whatever state it stopped in (bad
        bytes, a timeout, the server stopping): "no acceptable methods" to a greeting, RFC 1929
        status 1 to credentials, reply 1 (general failure) to a request, so the client gets an
        answer instead of a bare EOF. Anything queued before (a method selection) goes first.
        ``http_status`` is for HttpConnectServer's same method; SOCKS has one failure here."""
        state = self._abort_state()
        out = self._take_unsent()
        if state is State.GREETING:
            out += MethodSelection(Method.NO_ACCEPTABLE_METHODS).to_bytes()
        elif state in (State.AUTH_REQUEST, State.AUTH_DECISION):
            out += UserPassStatus(1).to_bytes()
        elif state in (State.REQUEST, State.REPLY_DECISION):
            out += _failure_reply(Reply.GENERAL_SOCKS_SERVER_FAILURE)
        return out

    _HANDLERS: ClassVar[HandlerTable] = {
        State.GREETING: _on_greeting,
        State.AUTH_REQUEST: _on_auth_request,
        State.AUTH_DECISION: Machine._on_decision,
        State.REQUEST: _on_request,
        State.REPLY_DECISION: Machine._on_decision,
        State.DONE: Machine._on_final,
        State.CLOSED: Machine._on_final,
    }
    _SIZES: ClassVar[SizeTable] = {
        State.GREETING: Greeting.size,
        State.AUTH_REQUEST: UserPassRequest.size,
        State.REQUEST: CommandRequest.size,
    }


def _failure_reply(code: int) -> bytes:
    return CommandReply(code, AddressType.IPV4, bytes(4), 0).to_bytes()
