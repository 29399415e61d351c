"""SOCKS4 and SOCKS4a, both roles, sans I/O.

References: "SOCKS: A protocol for TCP proxy across firewalls" (Ying-Da Lee, the SOCKS4 spec) and
"SOCKS 4A: A Simple Extension to SOCKS 4 Protocol" (the 4a extension). There is one request and
one 8-byte reply, so the client has a single state::

    REPLY --(CD 90)--> DONE        any other CD, malformed bytes or early EOF raise (ERROR)

and the server two, ``REQUEST --> REPLY_DECISION --> DONE / CLOSED``.

SOCKS4 carries only an IPv4 address. SOCKS4a lets the proxy resolve a name: DSTIP is set to the
invalid address 0.0.0.x (x != 0) and the name follows the USERID, NUL-terminated. The client picks
4a automatically for names unless told not to; it never sends an IPv6 address (use SOCKS5).
The reply's version byte should be 0, but some servers echo 4; both are accepted. A refusal is
reported as soon as the CD byte arrives. The server bounds USERID and the 4a name at 255 bytes
each (the spec sets no limit) and does no identd lookups, so it never sends 92 or 93 by itself.

Not done: BIND's second reply.
"""

from __future__ import annotations

import _socket as socket  # see _machine.py: no socket module, no enum

from ..errors import LocalProtocolError, ProxyAuthError, ProxyError, RemoteProtocolError
from ._events import NEED_DATA, Established, Rejected, Request
from ._machine import (
    HostKind,
    Machine,
    State,
    _outbound,
    check_host,
    check_port,
    decode_name,
    encode_field,
    version_hint,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

    from ._machine import HandlerTable, SizeTable, Step

__all__ = [
    "NEED_DATA",
    "Command",
    "CommandReply",
    "CommandRequest",
    "Established",
    "Rejected",
    "Reply",
    "Request",
    "Socks4Client",
    "Socks4Server",
    "describe_reply",
]

SOCKS_VERSION = 4
# The spec says VN is 0 in replies; some servers send 4 and clients accept it.
REPLY_VERSIONS = (0, 4)
# USERID and the 4a host name are unbounded in the spec; a server has to stop somewhere.
MAX_FIELD_BYTES = 255
# SOCKS4a: "0.0.0.x with x nonzero" means "a name follows"; 0.0.0.1 is what every client sends.
SOCKS4A_MARKER = bytes((0, 0, 0, 1))


class Command:
    """CD field of a request."""

    CONNECT = 1
    BIND = 2


COMMAND_NAMES: dict[int, str] = {Command.CONNECT: "CONNECT", Command.BIND: "BIND"}


class Reply:
    """CD field of a reply."""

    REQUEST_GRANTED = 90
    REQUEST_REJECTED_OR_FAILED = 91
    IDENTD_UNREACHABLE = 92
    IDENTD_USER_MISMATCH = 93


REPLY_TEXT: dict[int, str] = {
    Reply.REQUEST_GRANTED: "request granted",
    Reply.REQUEST_REJECTED_OR_FAILED: "request rejected or failed",
    Reply.IDENTD_UNREACHABLE: (
        "request rejected because SOCKS server cannot connect to identd on the client"
    ),
    Reply.IDENTD_USER_MISMATCH: (
        "request rejected because the client program and identd report different user-ids"
    ),
}

_COMMANDS = frozenset(COMMAND_NAMES)


def describe_reply(code: int) -> str:
    """``request rejected or failed (reply 91)``."""
    text = REPLY_TEXT.get(code)
    return f"{text} (reply {code})" if text else f"unassigned reply code {code}"


def _is_socks4a(head: bytes | bytearray) -> bool:
    return head[4:7] == b"\0\0\0" and head[7] != 0


class CommandRequest:
    """CONNECT or BIND, client to server.

        +----+----+----+----+----+----+----+----+----+----+....+----+
        | VN | CD | DSTPORT |      DSTIP        | USERID       |NULL|
        +----+----+----+----+----+----+----+----+----+----+....+----+
           1    1      2              4           variable       1

    SOCKS4a appends the host name and another NUL, with DSTIP = 0.0.0.x (x != 0).
    """

    __slots__ = ("address", "command", "hostname", "port", "user_id")

    def __init__(
        self, command: int, port: int, address: bytes, user_id: bytes, hostname: bytes | None
    ) -> None:
        self.command = command
        self.port = port
        self.address = address
        self.user_id = user_id
        self.hostname = hostname

    def to_bytes(self) -> bytes:
        head = bytes((SOCKS_VERSION, self.command)) + self.port.to_bytes(2, "big") + self.address
        name = b"" if self.hostname is None else self.hostname + b"\0"
        return head + self.user_id + b"\0" + name

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        # Both variable fields end in NUL: while it has not arrived, one more byte is the most we
        # know we need. A field over the limit returns what is buffered so parse() raises.
        size = len(buf)
        if size < 9:
            return 9
        user_end = buf.find(b"\0", 8, 8 + MAX_FIELD_BYTES + 1)
        if user_end == -1:
            return size + 1 if size < 8 + MAX_FIELD_BYTES + 1 else size
        if not _is_socks4a(buf):
            return user_end + 1
        name_start = user_end + 1
        name_end = buf.find(b"\0", name_start, name_start + MAX_FIELD_BYTES + 1)
        if name_end == -1:
            return size + 1 if size < name_start + MAX_FIELD_BYTES + 1 else size
        return name_end + 1

    @classmethod
    def parse(cls, data: bytes) -> CommandRequest:
        if data[0] != SOCKS_VERSION:
            raise RemoteProtocolError(f"not a SOCKS4 request (version byte 0x{data[0]:02x})")
        user_end = data.find(b"\0", 8)
        if user_end == -1 or user_end - 8 > MAX_FIELD_BYTES:
            raise RemoteProtocolError(f"SOCKS4 user id is longer than {MAX_FIELD_BYTES} bytes")
        hostname = None
        if _is_socks4a(data):
            name_end = data.find(b"\0", user_end + 1)
            if name_end == -1 or name_end - user_end - 1 > MAX_FIELD_BYTES:
                raise RemoteProtocolError(
                    f"SOCKS4a host name is longer than {MAX_FIELD_BYTES} bytes"
                )
            hostname = data[user_end + 1 : name_end]
        port = int.from_bytes(data[2:4], "big")
        return cls(data[1], port, data[4:8], data[8:user_end], hostname)


class CommandReply:
    """Reply, server to client. DSTPORT and DSTIP matter only for BIND.

    +----+----+----+----+----+----+----+----+
    | VN | CD | DSTPORT |      DSTIP        |
    +----+----+----+----+----+----+----+----+
       1    1      2              4
    """

    __slots__ = ("address", "port", "reply")

    def __init__(self, reply: int, port: int, address: bytes) -> None:
        self.reply = reply
        self.port = port
        self.address = address

    def to_bytes(self) -> bytes:
        return bytes((0, self.reply)) + self.port.to_bytes(2, "big") + self.address

    @staticmethod
    def size(buf: bytes | bytearray) -> int:
        return 8

    @classmethod
    def parse(cls, data: bytes) -> CommandReply:
        _check_reply_version(data[0])
        return cls(data[1], int.from_bytes(data[2:4], "big"), data[4:8])


def _check_reply_version(byte: int) -> None:
    if byte not in REPLY_VERSIONS:
        hint = version_hint(byte)
        raise RemoteProtocolError(f"not a SOCKS4 reply (version byte 0x{byte:02x}{hint})")


class Socks4Client(Machine):
    """Client role: CONNECT to ``host``:``port`` through a SOCKS4 or SOCKS4a proxy.

    ``socks4a``: None picks SOCKS4 for an IPv4 literal and SOCKS4a for a name; False refuses names
    (for SOCKS4-only servers; resolve locally instead); True is the same as None, since an IPv4
    literal needs no resolving and plain SOCKS4 is understood by every server.
    """

    __slots__ = ("_request",)

    def __init__(
        self, host: str, port: int, *, user_id: str = "", socks4a: bool | None = None
    ) -> None:
        kind, _, address = check_host(host)
        check_port(port)
        user = encode_field(user_id, "SOCKS4 user id", minimum=0, maximum=MAX_FIELD_BYTES)
        if b"\0" in user:
            raise LocalProtocolError("SOCKS4 user id contains a NUL byte")
        if kind is HostKind.IPV6:
            raise LocalProtocolError("SOCKS4 cannot carry an IPv6 address; use socks5")
        if kind is HostKind.NAME:
            if socks4a is False:
                raise LocalProtocolError(
                    "SOCKS4 needs an IPv4 address, not a host name;"
                    " use socks4a to have the proxy resolve it"
                )
            request = CommandRequest(Command.CONNECT, port, SOCKS4A_MARKER, user, address)
        else:
            if address[:3] == b"\0\0\0" and address[3]:
                # 0.0.0.x (x != 0) is SOCKS4a's "a host name follows" marker: a server would wait
                # for a name that never comes.
                raise LocalProtocolError(
                    f"SOCKS4 cannot ask for {host}: 0.0.0.1-0.0.0.255 mean SOCKS4a"
                )
            request = CommandRequest(Command.CONNECT, port, address, user, None)
        super().__init__(State.REPLY)
        self._outbox += request.to_bytes()

    def _on_reply(self) -> Step:
        buf = self._inbox.data
        if buf:
            _check_reply_version(buf[0])
        if len(buf) >= 2 and buf[1] != Reply.REQUEST_GRANTED:
            code = buf[1]
            if code in (Reply.IDENTD_UNREACHABLE, Reply.IDENTD_USER_MISMATCH):
                raise ProxyAuthError(describe_reply(code), protocol="socks4", code=code)
            raise ProxyError(describe_reply(code), protocol="socks4", code=code)
        data = self._take_message()
        if data is None:
            return self._wait()
        reply = CommandReply.parse(data)
        host = socket.inet_ntop(socket.AF_INET, reply.address)
        return self._finish(State.DONE, Established(host, reply.port, _SUCCESS_DETAIL))

    _HANDLERS: ClassVar[HandlerTable] = {State.REPLY: _on_reply, State.DONE: Machine._on_final}
    _SIZES: ClassVar[SizeTable] = {State.REPLY: CommandReply.size}


_SUCCESS_DETAIL = "reply 90 request granted"


class Socks4Server(Machine):
    """Server role for SOCKS4 and SOCKS4a requests (told apart by DSTIP, per request)."""

    __slots__ = ()
    _PEER = "client"

    def __init__(self) -> None:
        super().__init__(State.REQUEST)

    def _on_request(self) -> Step:
        buf = self._inbox.data
        if buf and buf[0] != SOCKS_VERSION:
            raise RemoteProtocolError(f"not a SOCKS4 request (version byte 0x{buf[0]:02x})")
        if len(buf) >= 2 and buf[1] not in _COMMANDS:
            code = Reply.REQUEST_REJECTED_OR_FAILED
            self._outbox += CommandReply(code, 0, bytes(4)).to_bytes()
            reason = f"unknown command {buf[1]}: {describe_reply(code)}"
            return self._finish(State.CLOSED, Rejected(reason, Rejected.UNSUPPORTED))
        data = self._take_message()
        if data is None:
            return self._wait()
        request = CommandRequest.parse(data)
        if request.hostname is None:
            host = socket.inet_ntop(socket.AF_INET, request.address)
        else:
            host = decode_name(request.hostname)
        user_id = request.user_id.decode("utf-8", "surrogateescape")
        self._state = State.REPLY_DECISION
        return Request(COMMAND_NAMES[request.command], host, request.port, user_id)

    @_outbound
    def accept_credentials(self, ok: bool) -> None:
        """Part of the server role; SOCKS4 has no authentication, so there is never a
        ``Credentials`` event to answer and a call is out of turn, as in any other state."""
        self._expect(State.AUTH_DECISION, "accept_credentials()")

    @_outbound
    def reply_success(self, bound_host: str | None = None, bound_port: int | None = None) -> None:
        """Grant the request. Only an IPv4 ``bound_host`` fits in the reply; others send 0.0.0.0
        (the client ignores the address for CONNECT anyway)."""
        self._expect(State.REPLY_DECISION, "reply_success()")
        port = 0 if bound_port is None else check_port(bound_port)
        address = bytes(4)
        if bound_host is not None:
            kind, _, packed = check_host(bound_host)
            if kind is HostKind.IPV4:
                address = packed
        self._outbox += CommandReply(Reply.REQUEST_GRANTED, port, address).to_bytes()
        host = socket.inet_ntop(socket.AF_INET, address)
        self._finish(State.DONE, Established(host, port, _SUCCESS_DETAIL))

    @_outbound
    def reply_failure(self, code: int = Reply.REQUEST_REJECTED_OR_FAILED) -> None:
        """Refuse the request with CD ``code`` (91, 92 or 93)."""
        self._expect(State.REPLY_DECISION, "reply_failure()")
        if code not in (91, 92, 93) or isinstance(code, bool):
            raise LocalProtocolError(f"SOCKS4 failure reply code must be 91..93, not {code!r}")
        self._outbox += CommandReply(code, 0, bytes(4)).to_bytes()
        self._finish(State.CLOSED, Rejected(describe_reply(code), Rejected.REFUSED))

    def abort_reply(self, http_status: int = 400) -> bytes:
        """The bytes that end the handshake with a refusal (bad bytes, a timeout, the server
        stopping): reply 91 while a request is awaited or undecided, so the client gets an answer
        instead of a bare EOF. ``http_status`` is for HttpConnectServer's same method."""
        out = self._take_unsent()
        if self._abort_state() in (State.REQUEST, State.REPLY_DECISION):
            out += CommandReply(Reply.REQUEST_REJECTED_OR_FAILED, 0, bytes(4)).to_bytes()
        return out

    _HANDLERS: ClassVar[HandlerTable] = {
        State.REQUEST: _on_request,
        State.REPLY_DECISION: Machine._on_decision,
        State.DONE: Machine._on_final,
        State.CLOSED: Machine._on_final,
    }
    _SIZES: ClassVar[SizeTable] = {State.REQUEST: CommandRequest.size}
