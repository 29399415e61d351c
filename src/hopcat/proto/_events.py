"""Events the protocol machines hand to their driver, and the NEED_DATA sentinel.

Every machine's ``next_event()`` returns either ``NEED_DATA`` (feed more bytes with
``receive_data()``) or one of these. A client handshake always ends in ``Established``; a server
handshake passes through ``Credentials`` (when authenticating) and ``Request``, and ends in
``Established`` after ``reply_success()`` or ``Rejected`` after a refusal. Protocol modules may add
intermediate events of their own (``socks5.MethodSelected``); drivers may ignore those.

Events are small value objects compared by field, so tests can compare event sequences.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar


class NeedData:
    """Type of ``NEED_DATA``: the machine needs more bytes from the peer before it can go on."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class Event:
    """Base of all events: equality and repr over the fields named in ``_fields``."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    # Defining __eq__ leaves __hash__ None, so events are unhashable: mutable-looking value
    # objects, never dict keys.
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def describe(self) -> str:
        """A phrase for a person (``-v``, logs), never a Python repr."""
        return type(self).__name__


class Established(Event):
    """The handshake succeeded; bytes from now on are payload (see ``trailing_data``).

    ``bound_host``/``bound_port`` are the address a SOCKS proxy reported in its reply (any address
    type; informational, often 0.0.0.0:0). HTTP CONNECT has none, so both are None there.
    ``detail`` is a short human-readable line for a verbose timeline.
    """

    __slots__ = ("bound_host", "bound_port", "detail")
    _fields = __slots__

    def __init__(self, bound_host: str | None, bound_port: int | None, detail: str) -> None:
        self.bound_host = bound_host
        self.bound_port = bound_port
        self.detail = detail

    def describe(self) -> str:
        return self.detail


class Request(Event):
    """Server side: the client asked for ``command`` to ``host``:``port``.

    ``command`` is ``"CONNECT"``, ``"BIND"`` or ``"UDP_ASSOCIATE"`` for SOCKS, and the HTTP method
    for HTTP (only ``"CONNECT"`` carries a target; other methods get ``host=""`` and ``port=0`` and
    should be answered with ``reply_failure(405)``). ``host`` is an IPv4 or IPv6 literal (no
    brackets) or a name exactly as the client sent it. ``user_id`` is the SOCKS4 USERID field.
    The server code answers with ``reply_success()`` or ``reply_failure()``.
    """

    __slots__ = ("command", "host", "port", "user_id")
    _fields = __slots__

    def __init__(self, command: str, host: str, port: int, user_id: str = "") -> None:
        self.command = command
        self.host = host
        self.port = port
        self.user_id = user_id


class Credentials(Event):
    """Server side: the client authenticated with a username and password (RFC 1929 or HTTP Basic).

    Bytes that are not UTF-8 are kept as surrogate escapes, so they never match a configured
    string. The server code answers with ``accept_credentials(ok)``.
    """

    __slots__ = ("password", "username")
    _fields = __slots__

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        # Events end up in logs and test failure output; a password must not.
        return f"Credentials(username={self.username!r}, password='***')"


class DigestCredentials(Event):
    """Server side: the client answered a Digest challenge (RFC 7616) in its HTTP request.

    The fields are those of its ``Proxy-Authorization: Digest ...`` value as received (Latin-1
    decoded, as heads are); ``method`` and ``target`` are its request line's, which the
    ``uri`` field must equal. The machine checks only their form; the server code, which has the
    users and the nonce secret, verifies them and answers with ``accept_credentials(ok)``.
    """

    __slots__ = ("algorithm", "cnonce", "method", "nc", "nonce", "realm", "response", "target",
                 "uri", "username")  # fmt: skip
    _fields = __slots__

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: str,
        uri: str,
        response: str,
        algorithm: str,
        nc: str,
        cnonce: str,
        method: str,
        target: str,
    ) -> None:
        self.username = username
        self.realm = realm
        self.nonce = nonce
        self.uri = uri
        self.response = response
        self.algorithm = algorithm
        self.nc = nc
        self.cnonce = cnonce
        self.method = method
        self.target = target

    def __repr__(self) -> str:
        # The response hash can be attacked offline for the password: never in a log.
        return (
            f"DigestCredentials(username={self.username!r}, algorithm={self.algorithm!r}, "
            f"uri={self.uri!r}, response='***')"
        )


class Rejected(Event):
    """Server side: the handshake ended in a refusal whose bytes are queued in ``data_to_send()``.

    Either the machine refused on its own (no acceptable method, unsupported command or address
    type, missing credentials) or the server code called ``accept_credentials(False)`` or
    ``reply_failure()``. Flush ``data_to_send()`` and close the connection.

    ``kind`` says which, for code that must act on it (``reason`` is for people):
    ``UNSUPPORTED`` a command or address type the machine cannot serve, ``AUTHENTICATION`` no
    acceptable method or no usable or accepted credentials, ``REFUSED`` the server code's
    ``reply_failure()``.
    """

    __slots__ = ("kind", "reason")
    _fields = __slots__

    UNSUPPORTED: ClassVar[str] = "unsupported"
    AUTHENTICATION: ClassVar[str] = "authentication"
    REFUSED: ClassVar[str] = "refused"

    def __init__(self, reason: str, kind: str) -> None:
        self.reason = reason
        self.kind = kind


class AuthChallenge(Event):
    """Client side (HTTP CONNECT made with ``challenges=True``): the proxy asked for credentials.

    ``status`` is 407 (or 401, which from a proxy means the same), ``header_values`` the values of
    every Proxy-Authenticate (WWW-Authenticate for 401) header in order, ``reusable`` whether the
    connection can carry the next request (the body was drained and the proxy keeps the
    connection); when it cannot, the machine is CLOSED and the answer goes on a new connection.
    While ``reusable`` the machine waits for ``retry(authorization)``.
    """

    __slots__ = ("header_values", "reason", "reusable", "status")
    _fields = __slots__

    def __init__(self, status: int, reason: str, header_values: list[str], reusable: bool) -> None:
        self.status = status
        self.reason = reason
        self.header_values = header_values
        self.reusable = reusable

    def __repr__(self) -> str:
        # Challenges carry nonces and NTLM tokens: events end up in logs and test output.
        schemes = [value.split(" ", 1)[0] for value in self.header_values]
        return (f"AuthChallenge(status={self.status}, schemes={schemes}, "
                f"reusable={self.reusable})")  # fmt: skip

    def describe(self) -> str:
        kept = "connection kept" if self.reusable else "connection closed"
        return f"HTTP {self.status} {self.reason} ({kept})".replace("  ", " ")
