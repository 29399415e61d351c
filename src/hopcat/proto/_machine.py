"""What all protocol machines share: the state enum, the driver contract, poisoning, validation.

States name the message a machine is waiting for, which is the same in both roles (a SOCKS5 client
in ``REPLY`` waits for the reply a server in ``REPLY_DECISION`` is about to send), so one enum
serves every protocol and role. Each machine class maps the states it can be in to a handler in
one table (``_HANDLERS``); ``next_event()`` runs handlers until one returns an event or NEED_DATA.
The ``*_DECISION`` states wait for the server code (``accept_credentials()``, ``reply_*()``),
not for the peer. ``DONE`` and ``CLOSED`` are final: the handshake succeeded, or a refusal is
queued. ``ERROR`` is entered whenever any call raises; every later call raises too, so a driver
can never act on a half-parsed handshake.

Driver contract (identical for every machine):

- after constructing, and after every ``next_event()``, write ``data_to_send()`` to the peer;
- ``receive_data(data)`` appends bytes; ``b""`` means EOF;
- ``next_event()`` returns NEED_DATA or an event; in a final state it keeps returning the final
  event (``Established`` or ``Rejected``);
- ``trailing_data`` holds the bytes received after the handshake once the state is DONE.

A client adds the read sizes (``bytes_needed()``, ``handshake_prefix_len()``), a server the
answers to its events (``accept_credentials()``, ``reply_success()``, ``reply_failure()``,
``abort_reply()``): the two roles are typed as ``ClientMachine`` and ``ServerMachine`` below, and
``hopcat.proto.client_machine()`` / ``server_machine()`` make one for a protocol.

Nothing here touches a socket, a clock or the environment.
"""

from __future__ import annotations

# _socket and no enum: each would cost milliseconds of imports on every ssh connection.
import _socket as socket

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._buffer import ReceiveBuffer
from ._events import NEED_DATA, Event, NeedData

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

    _M = TypeVar("_M", bound="Machine")
    _P = ParamSpec("_P")
    _R = TypeVar("_R")

    # A handler returns an event, NEED_DATA, or None after a transition that produced no event.
    Step = Event | NeedData | None
    HandlerTable = dict["State", Callable[[Any], Step]]
    SizeTable = dict["State", Callable[[bytes | bytearray], int]]

    # The two roles as types. Protocols, not base classes: a role is a contract over what the
    # machines already share (Machine) plus what each server adds, and a Protocol states it
    # without a second class hierarchy or abstract methods that only raise. They exist for the
    # type checker alone: typing costs milliseconds of imports that ssh's ProxyCommand would pay
    # on every connection (tests/integration/test_startup.py), so nothing here is defined at run
    # time, and code names these types only in annotations (``from __future__ import
    # annotations``) or under TYPE_CHECKING.

    class Role(Protocol):
        """What every machine offers its driver: the contract in the module docstring."""

        @property
        def state(self) -> State: ...
        @property
        def trailing_data(self) -> bytes: ...
        def data_to_send(self) -> bytes: ...
        def receive_data(self, data: bytes) -> None: ...
        def next_event(self) -> Event | NeedData: ...

    class ClientMachine(Role, Protocol):
        """A client handshake (Socks4Client, Socks5Client, HttpConnectClient); it ends in
        ``Established`` or raises. The read sizes let a driver stop exactly at its end."""

        def bytes_needed(self) -> int | None: ...
        def handshake_prefix_len(self, data: bytes) -> int: ...

    class ServerMachine(Role, Protocol):
        """A server handshake (Socks4Server, Socks5Server, HttpConnectServer): the server code
        answers ``Credentials`` with ``accept_credentials()`` and ``Request`` with
        ``reply_success()`` or ``reply_failure(code)``, whose code is the protocol's own (SOCKS4
        CD, SOCKS5 REP, HTTP status); ``abort_reply()`` ends a handshake given up midway."""

        def accept_credentials(self, ok: bool) -> None: ...
        def reply_success(
            self, bound_host: str | None = None, bound_port: int | None = None
        ) -> None: ...
        def reply_failure(self, code: int) -> None: ...
        def abort_reply(self, http_status: int = 400) -> bytes: ...


# Messages shown to a user quote peer text; this keeps a hostile peer from filling the terminal.
MAX_QUOTED_CHARS = 200


class _Symbol:
    """A named constant compared by identity: what Enum gives, without importing enum."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class State(_Symbol):
    __slots__ = ()
    GREETING: ClassVar[State]  # server waits for the SOCKS5 method offer
    METHOD_REPLY: ClassVar[State]  # client waits for the SOCKS5 method selection
    AUTH_REQUEST: ClassVar[State]  # server waits for RFC 1929 username/password
    AUTH_DECISION: ClassVar[State]  # server code must call accept_credentials()
    AUTH_REPLY: ClassVar[State]  # client waits for the RFC 1929 status
    REQUEST: ClassVar[State]  # server waits for the CONNECT/BIND request (or HTTP request head)
    REPLY_DECISION: ClassVar[State]  # server code must call reply_success()/reply_failure()
    REPLY: ClassVar[State]  # client waits for the final reply (or HTTP response head)
    BODY: ClassVar[State]  # HTTP client drains the body of a 407 before answering it
    RETRY_DECISION: ClassVar[State]  # HTTP client code must call retry() with credentials
    DONE: ClassVar[State]  # handshake succeeded; the rest is payload
    CLOSED: ClassVar[State]  # a refusal is queued; flush it and close
    ERROR: ClassVar[State]  # poisoned by an exception


for _name in (
    "GREETING",
    "METHOD_REPLY",
    "AUTH_REQUEST",
    "AUTH_DECISION",
    "AUTH_REPLY",
    "REQUEST",
    "REPLY_DECISION",
    "REPLY",
    "BODY",
    "RETRY_DECISION",
    "DONE",
    "CLOSED",
    "ERROR",
):
    setattr(State, _name, State(_name))


def _guard(
    refusal: type[ProtocolError],
) -> Callable[[Callable[Concatenate[_M, _P], _R]], Callable[Concatenate[_M, _P], _R]]:
    """Make a method refuse to run on a poisoned machine, and poison it when it raises.

    ``refusal`` is what a call on a poisoned machine raises: RemoteProtocolError for the calls
    that consume peer input (the peer broke it), LocalProtocolError for the rest.
    """

    def decorate(method: Callable[Concatenate[_M, _P], _R]) -> Callable[Concatenate[_M, _P], _R]:
        def guarded(machine: _M, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            if machine._state is State.ERROR:
                raise refusal("machine is in error state")
            try:
                return method(machine, *args, **kwargs)
            except BaseException:
                # Where it broke is kept apart from ERROR: a server role still answers the peer
                # with the refusal that fits the message it was waiting for (abort_reply()).
                machine._failed_in = machine._state
                machine._state = State.ERROR
                raise

        guarded.__name__ = method.__name__
        guarded.__qualname__ = method.__qualname__
        guarded.__doc__ = method.__doc__
        return guarded

    return decorate


_inbound = _guard(RemoteProtocolError)
_outbound = _guard(LocalProtocolError)


class Machine:
    """Base of every client and server machine; see the module docstring for the contract."""

    __slots__ = ("_failed_in", "_final", "_inbox", "_outbox", "_state")

    # Who is on the other end, for "<peer> closed the connection during the handshake".
    _PEER: ClassVar[str] = "proxy"
    _HANDLERS: ClassVar[HandlerTable] = {}
    # For the exactly framed (SOCKS) protocols: state -> smallest total length of the awaited
    # message given the bytes so far (exact once enough of it is known). None: not framed.
    _SIZES: ClassVar[SizeTable | None] = None

    def __init__(self, state: State) -> None:
        self._state = state
        self._failed_in = state
        self._inbox = ReceiveBuffer()
        self._outbox = bytearray()
        self._final: Event | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} state={self._state.name}>"

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended (payload for the relay); b"" until DONE."""
        return bytes(self._inbox.data) if self._state is State.DONE else b""

    @_outbound
    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (b"" when nothing is pending)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    @_inbound
    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the peer; b"" means the peer closed (EOF)."""
        if self._inbox.eof:
            if data:
                raise LocalProtocolError("receive_data() called with data after EOF")
            return
        if data:
            self._inbox.feed(data)
        else:
            self._inbox.eof = True

    @_inbound
    def next_event(self) -> Event | NeedData:
        """Advance as far as the buffered bytes allow; return an event or NEED_DATA."""
        while True:
            result = self._HANDLERS[self._state](self)
            if result is not None:
                return result

    @_outbound
    def bytes_needed(self) -> int | None:
        """How many more bytes the message being awaited needs, as far as it is known yet.

        Exact for SOCKS (a driver that reads exactly this many never reads past the handshake);
        0 when next_event() can make progress without reading; None for HTTP, whose head has no
        length (use handshake_prefix_len() on peeked bytes instead).
        """
        if self._SIZES is None:
            return None
        size = self._SIZES.get(self._state)
        if size is None:
            return 0
        return max(0, size(self._inbox.data) - len(self._inbox))

    @_outbound
    def handshake_prefix_len(self, data: bytes) -> int:
        """How many leading bytes of ``data`` (the next bytes from the peer, e.g. peeked) belong to
        the handshake; the rest must be left for whoever takes the connection over."""
        return self._prefix_len(data)

    def _prefix_len(self, data: bytes) -> int:
        # Framed protocols: the awaited message's size over buffered + new bytes. A proxy cannot
        # send its next handshake message before it has our next one, so for a client one message
        # is the whole answer. (A server's client may pipeline; there this counts only the
        # message being awaited, which is still never too much.)
        assert self._SIZES is not None
        size = self._SIZES.get(self._state)
        if size is None:
            return 0
        have = len(self._inbox)
        return min(len(data), max(0, size(self._inbox.data + data) - have))

    # Helpers for handlers.

    def _wait(self) -> NeedData:
        """NEED_DATA, unless the peer already closed: then the handshake can never finish."""
        if self._inbox.eof:
            raise RemoteProtocolError(
                f"{self._PEER} closed the connection during the handshake", peer_closed=True
            )
        return NEED_DATA

    def _take_message(self) -> bytes | None:
        """Remove and return the awaited message once complete per ``_SIZES``, else None."""
        assert self._SIZES is not None
        size = self._SIZES[self._state](self._inbox.data)
        if len(self._inbox) < size:
            return None
        return self._inbox.take(size)

    def _finish(self, state: State, event: Event) -> Event:
        self._state = state
        self._final = event
        return event

    def _on_final(self) -> Step:
        return self._final

    def _on_decision(self) -> Step:
        if self._state is State.AUTH_DECISION:
            raise LocalProtocolError("call accept_credentials() before next_event()")
        raise LocalProtocolError("call reply_success() or reply_failure() before next_event()")

    def _abort_state(self) -> State:
        """The state a server role answers from when the handshake is given up: the current
        one, or the one it was in when an error poisoned it."""
        return self._failed_in if self._state is State.ERROR else self._state

    def _take_unsent(self) -> bytes:
        """What was queued before the handshake was given up (e.g. a method selection), unguarded
        so that a poisoned machine still yields it."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def _expect(self, state: State, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{call} is not valid in state {self._state.name}")


# Host and port validation, shared by every client constructor (before any byte is produced).


class HostKind(_Symbol):
    __slots__ = ()
    IPV4: ClassVar[HostKind]
    IPV6: ClassVar[HostKind]
    NAME: ClassVar[HostKind]


for _name in ("IPV4", "IPV6", "NAME"):
    setattr(HostKind, _name, HostKind(_name))


def sanitize(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """Peer-supplied text made safe for a one-line message: no control characters, bounded."""
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    return text if len(text) <= limit else text[:limit] + "..."


def check_port(port: object) -> int:
    # bool is an int subclass, but True as a port is always a bug upstream.
    if not isinstance(port, int) or isinstance(port, bool):
        raise LocalProtocolError(f"port must be an integer, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise LocalProtocolError(f"port {port} is out of range (0-65535)")
    return port


def check_host(host: object) -> tuple[HostKind, str, bytes]:
    """Classify and encode a target host: (kind, text for an HTTP authority, wire bytes).

    IP literals come back packed (4 or 16 bytes) with their text; names come back as ASCII (IDNA
    encoded when needed, using the stdlib's IDNA 2003 codec, loaded only for non-ASCII names).
    A name is at most 255 bytes, the SOCKS5 DOMAINNAME limit, applied to every protocol so a host
    that works through one proxy type works through all.
    """
    if not isinstance(host, str):
        raise LocalProtocolError(f"host must be a string, not {type(host).__name__}")
    if not host:
        raise LocalProtocolError("empty host name")
    if host[0] == "[" and host[-1] == "]":
        inner = host[1:-1]
        try:
            return HostKind.IPV6, inner, socket.inet_pton(socket.AF_INET6, inner)
        except (OSError, ValueError):
            raise LocalProtocolError(f"invalid IPv6 address {sanitize(host)!r}") from None
    if not host.isprintable() or " " in host:
        raise LocalProtocolError(
            f"host name {sanitize(host)!r} contains a space or control character"
        )
    try:
        return HostKind.IPV4, host, socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    if ":" in host:
        try:
            return HostKind.IPV6, host, socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise LocalProtocolError(f"invalid IPv6 address {sanitize(host)!r}") from None
    if "[" in host or "]" in host:
        raise LocalProtocolError(f"host name {sanitize(host)!r} contains '[' or ']'")
    if host.isascii():
        encoded = host.encode("ascii")
    else:
        try:
            encoded = host.encode("idna")
        except UnicodeError as exc:
            raise LocalProtocolError(
                f"host name {sanitize(host)!r} cannot be IDNA-encoded ({sanitize(str(exc))})"
            ) from None
    if len(encoded) > 255:
        raise LocalProtocolError(f"host name is {len(encoded)} bytes long; the limit is 255")
    return HostKind.NAME, encoded.decode("ascii"), encoded


def encode_field(value: object, what: str, *, minimum: int, maximum: int) -> bytes:
    """UTF-8 encode a credential or user id and check its length in bytes."""
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a string, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeError:
        raise LocalProtocolError(f"{what} is not valid Unicode") from None
    if not minimum <= len(encoded) <= maximum:
        raise LocalProtocolError(
            f"{what} must be {minimum} to {maximum} bytes of UTF-8, not {len(encoded)}"
        )
    return encoded


def decode_name(raw: bytes) -> str:
    """A host name received from a client (SOCKS5 ATYP 3, SOCKS4a), checked for sanity.

    Clients send ASCII (IDNA) names; UTF-8 is tolerated because getaddrinfo IDNA-encodes it.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("host name in request is not UTF-8") from None
    if not name or not name.isprintable() or " " in name:
        raise RemoteProtocolError(f"invalid host name in request: {sanitize(name)!r}")
    return name


def version_hint(byte: int) -> str:
    """Name the protocol a wrong first byte suggests, and the scheme that speaks it."""
    if byte == 0x48:  # 'H' of "HTTP/1.1 400 Bad Request"
        return ": this looks like an HTTP proxy: use http://"
    if byte == 0x05:
        return ": this looks like a SOCKS5 proxy: use socks5h://"
    if byte in (0x00, 0x04):
        return ": this looks like a SOCKS4 proxy: use socks4a://"
    if byte in (0x15, 0x16):  # TLS record types: alert, handshake (RFC 8446 section 5.1)
        return ": this looks like a TLS server: use https://"
    return ""
