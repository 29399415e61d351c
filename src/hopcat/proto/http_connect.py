"""HTTP CONNECT tunnels (RFC 9110 section 9.3.6, framing per RFC 9112), both roles, sans I/O.

The client sends one request head and waits for the response head::

    REPLY --(2xx)--> DONE          1xx (not 101): skipped, stay in REPLY (RFC 9110 section 15.2)
          --(407, 401)--> ProxyAuthError      --(other)--> ProxyError(code=status)

or, made with ``challenges=True`` (the tunnel engine, which answers with
``hopcat.net.proxy_auth``)::

    REPLY --(407, 401; reusable)--> BODY --(drained)--> RETRY_DECISION --retry()--> REPLY
          --(407, 401; the proxy closes)--> CLOSED: AuthChallenge(reusable=False)

Empty lines before a status line are skipped, and the status line's parts may be separated by
several spaces or tabs (lenient as RFC 9112 section 2.2 allows; real proxies send both).
A head ends at the first empty line. RFC 9112 section 2.2 allows a bare LF as line terminator,
so both ``\\r\\n\\r\\n`` and ``\\n\\n`` end one. Heads are capped at ``MAX_HEAD_BYTES`` (all heads of a
handshake together) and ``MAX_HEADER_LINES``. A head has no length field, so ``bytes_needed()`` is
None: a driver that must not over-read peeks and consumes ``handshake_prefix_len(peeked)`` bytes,
which ends exactly after the final head even when its terminator straddles two reads. Bytes after
a 2xx head are tunnel payload (``trailing_data``); RFC 9110 says a 2xx CONNECT response has no
body whatever its headers claim, so Content-Length and Transfer-Encoding are ignored.

The request target is the authority form ``host:port`` (``[v6]:port``), validated before any byte
exists. Credentials given to the machine go as Basic (RFC 7617, UTF-8) with the first request;
a 407 names the schemes the proxy wants. A Squid 403 for a port other than 443 names Squid's stock
"CONNECT only to 443" rule and its fix.
Peer text (reason phrase, header values) is sanitized before it goes into an error message.

The server parses one request head (``REQUEST``), hands ``Credentials`` from a Basic
Proxy-Authorization header, or ``DigestCredentials`` from a Digest one, to the server code when
authentication is required (answering 407 itself when there is none usable), then a
``Request``; any method other than CONNECT comes through with the host and port of an
absolute ``http://`` URL (``host=""`` for any other target) and its raw head in ``head``, for
the server code to forward (``hopcat.server.forward``) or answer ``reply_failure(405)``. Every
failure response carries ``Connection: close`` (a client answers a 407 on a new connection) and
a one-line text/plain body. A request head it cannot take is refused by ``abort_reply()`` with
the status its error names (400; 414 for a request line over ``MAX_REQUEST_LINE_BYTES``, 431 for
a head over ``MAX_HEAD_BYTES`` or ``MAX_HEADER_LINES``, 505 for a version other than 1.x),
answered as soon as the bytes so far show it, not after the whole head.

The server's 407 carries the ``challenges`` it was made with, one Proxy-Authenticate header
each (Basic only by default); the schemes they name are the ones whose credentials it takes.
Digest challenges hold a nonce, which needs a clock and a secret: the server code makes them
(``http_auth.digest_challenge``) and verifies the answers.
"""

from __future__ import annotations

import _socket as socket  # see _machine.py: no socket module

from ..errors import LocalProtocolError, ProxyAuthError, ProxyError, RemoteProtocolError
from ._buffer import ReceiveBuffer, find_head_end
from ._events import (
    NEED_DATA,
    AuthChallenge,
    Credentials,
    DigestCredentials,
    Established,
    Event,
    Rejected,
    Request,
)
from ._machine import (
    HostKind,
    Machine,
    State,
    _outbound,
    check_host,
    check_port,
    sanitize,
    version_hint,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import ClassVar, NoReturn

    from ._machine import HandlerTable, Step

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_LINES",
    "MAX_HEAD_BYTES",
    "MAX_REQUEST_LINE_BYTES",
    "NEED_DATA",
    "AuthChallenge",
    "Credentials",
    "DigestCredentials",
    "Established",
    "HttpConnectClient",
    "HttpConnectServer",
    "Rejected",
    "Request",
]

MAX_HEAD_BYTES = 64 * 1024
# A 407's body is drained to reuse the connection (Squid's error page is about 3 KiB); past this
# the connection is not worth saving.
MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
# A server's cap on its request line: RFC 9112 section 3 asks for at least 8000 octets.
MAX_REQUEST_LINE_BYTES = 8192

# RFC 9110 section 5.6.2 token characters (header names, methods, auth schemes).
_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR_BYTES = frozenset(_TCHARS.encode("ascii"))
# RFC 3986 reg-name: unreserved, sub-delims and percent-encoding.
_REG_NAME_CHARS = "-._~!$&'()*+,;=%0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE64_CHARS = "+/=0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

STATUS_TEXT: dict[int, str] = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_SUCCESS_RESPONSE = b"HTTP/1.1 200 Connection established\r\n\r\n"
# The server's Basic challenge, its only one unless it is given others (RFC 9110 section 11.7.1).
AUTH_CHALLENGE = 'Basic realm="hopcat"'


def _is_token(text: str) -> bool:
    # strip() removes every leading and trailing character in the set: all of them, if all are.
    return bool(text) and not text.strip(_TCHARS)


def _is_http1(version: str) -> bool:
    return len(version) == 8 and version.startswith("HTTP/1.") and version[7] in "0123456789"


def _split_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Start line and (name, value) pairs of a complete head (terminator included)."""
    # Latin-1 maps every byte to a character, so decoding cannot fail; obs-text stays visible.
    lines = head.decode("latin-1").split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    # The head ends with LF, empty line, LF: the last two items are the empty line and "".
    header_lines = lines[1:-2]
    if len(header_lines) > MAX_HEADER_LINES:
        raise RemoteProtocolError(f"more than {MAX_HEADER_LINES} header lines", http_status=431)
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        if line[:1] in (" ", "\t"):
            # obs-fold (RFC 9112 section 5.2): a recipient may replace it with a space.
            if not headers:
                raise RemoteProtocolError("header continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip(" \t"))
            continue
        name, colon, value = line.partition(":")
        if not colon or not _is_token(name):
            raise RemoteProtocolError(f"malformed header line {sanitize(line)!r}")
        headers.append((name, value.strip(" \t")))
    return lines[0], headers


def _header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def _parse_status_line(line: str) -> tuple[int, str]:
    """``HTTP/1.x SP code SP reason``, tolerating runs of spaces or tabs between the parts: several
    proxies pad them (socat once failed a user's proxy over exactly ``HTTP/1.0  200 OK``)."""
    version, rest = line[:8], line[8:]
    code = rest.lstrip(" \t")[:3]
    after = rest.lstrip(" \t")[3:]
    if (
        not _is_http1(version) or rest[:1] not in (" ", "\t") or len(code) != 3
        or not (code.isascii() and code.isdigit()) or after[:1] not in ("", " ", "\t")
    ):  # fmt: skip
        raise RemoteProtocolError(f"malformed HTTP status line {sanitize(line)!r}")
    return int(code), after.strip(" \t")


def _leading_blank_len(data: bytes | bytearray) -> int:
    """Length of the empty lines (CRLF or LF) before a status line: some proxies send one after
    the previous message, and RFC 9112 section 2.2 asks recipients to ignore them. A lone CR at
    the end is left: its LF may still be on the way."""
    index = 0
    while True:
        if data[index : index + 1] == b"\n":
            index += 1
        elif data[index : index + 2] == b"\r\n":
            index += 2
        else:
            return index


def _as_utf8(text: str) -> str:
    # Heads are decoded as Latin-1 so that parsing never fails; a reason phrase in UTF-8 reads
    # better decoded as such in an error message.
    return text.encode("latin-1").decode("utf-8", "replace")


def _is_interim(head: bytes | bytearray) -> bool:
    # "HTTP/1.1 1xx": informational responses precede the real one (101 is final: it would
    # switch protocols, which a CONNECT never asks for).
    code = bytes(head[8:]).lstrip(b" \t")[:3]
    return code[:1] == b"1" and code != b"101"


def _auth_schemes(headers: list[tuple[str, str]], name: str) -> list[str]:
    """Scheme names offered in ``name`` (Proxy-Authenticate) headers, e.g. ["Basic", "Digest"].

    A header may list several challenges separated by commas, and challenges have comma-separated
    parameters (which contain '='); a part whose first word is a token without '=' is a scheme.
    """
    schemes: list[str] = []
    for value in _header_values(headers, name):
        for part in value.split(","):
            words = part.split()
            if words and _is_token(words[0]) and "=" not in words[0]:
                scheme = sanitize(words[0], 40)  # a token: ASCII only
                if scheme.lower() not in (s.lower() for s in schemes):
                    schemes.append(scheme)
    return schemes[:5]


class HttpConnectClient(Machine):
    """Client role: ``CONNECT host:port`` through an HTTP proxy.

    ``headers`` are added to the request after ``Host`` and ``Proxy-Authorization``; a ``Host``
    or ``Proxy-Authorization`` among them replaces ours. A username (password defaults to "")
    adds Basic credentials up front; ``authorization`` is a ready Proxy-Authorization value
    instead (what an authentication scheme computed).

    With ``challenges`` a 407 (or 401) is not an error but an ``AuthChallenge`` event: its body
    is drained first when the connection can carry another request (Content-Length or chunked,
    at most ``MAX_BODY_BYTES``), and then ``retry(authorization)`` sends the request again on it;
    otherwise the machine is CLOSED and the caller answers on a new connection. The request then
    says ``Proxy-Connection: keep-alive``, which HTTP/1.0 proxies need to keep the connection
    (Squid 2.7 closed it without, and NTLM broke: curl/curl#954).
    """

    __slots__ = ("_body_left", "_challenge", "_chunked", "_head_budget", "_port", "_request_lines",
                 "_scanned", "_sent_credentials", "_want_challenges")  # fmt: skip
    _SIZES: ClassVar[None] = None

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        authorization: str | None = None,
        challenges: bool = False,
    ) -> None:
        kind, text, _ = check_host(host)
        check_port(port)
        authority = f"[{text}]:{port}" if kind is HostKind.IPV6 else f"{text}:{port}"
        extra = [_check_header(item) for item in headers or ()]
        given = {name.lower() for name, _ in headers or ()}
        lines = [f"CONNECT {authority} HTTP/1.1"]
        if "host" not in given:
            lines.append(f"Host: {authority}")
        if challenges and "proxy-connection" not in given:
            lines.append("Proxy-Connection: keep-alive")
        if username is not None:
            if authorization is not None:
                raise LocalProtocolError("credentials and an authorization both given")
            from .http_auth import basic_authorization

            authorization = basic_authorization(username, password)
        elif password is not None:
            raise LocalProtocolError("a password was given without a username")
        if authorization is not None and "proxy-authorization" in given:
            raise LocalProtocolError("credentials and a Proxy-Authorization header both given")
        super().__init__(State.REPLY)
        self._port = port
        self._request_lines = (lines, extra)
        self._want_challenges = challenges
        self._sent_credentials = authorization is not None or "proxy-authorization" in given
        self._scanned = 0
        self._head_budget = MAX_HEAD_BYTES
        self._body_left = 0  # Content-Length bytes of a 407 still to drain; -1 while chunked
        self._chunked: _ChunkedBody | None = None
        self._challenge: AuthChallenge | None = None
        self._queue_request(authorization)

    def _queue_request(self, authorization: str | None) -> None:
        lines, extra = self._request_lines
        if authorization is not None:
            _check_header(("Proxy-Authorization", authorization))
            lines = [*lines, f"Proxy-Authorization: {authorization}"]
        self._outbox += ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode("utf-8")

    @_outbound
    def retry(self, authorization: str) -> None:
        """Send the request again on this connection with ``authorization`` (after an
        ``AuthChallenge`` whose ``reusable`` is true)."""
        self._expect(State.RETRY_DECISION, "retry()")
        self._sent_credentials = True
        self._challenge = None
        self._queue_request(authorization)
        self._state = State.REPLY

    def _on_reply(self) -> Step:
        blank = _leading_blank_len(self._inbox.data)
        if blank:
            self._inbox.take(blank)
            self._head_budget -= blank
            if self._head_budget < 0:
                raise RemoteProtocolError(f"response head is larger than {MAX_HEAD_BYTES} bytes")
        buf = self._inbox.data
        if not buf or buf == b"\r":
            return self._wait()
        _check_response_start(buf)
        end = find_head_end(buf, self._scanned)
        if end == -1:
            self._scanned = len(buf)
            if len(buf) > self._head_budget:
                raise RemoteProtocolError(f"response head is larger than {MAX_HEAD_BYTES} bytes")
            if self._inbox.eof:
                self._refuse_on_partial_head(buf)
            return self._wait()
        if end > self._head_budget:
            raise RemoteProtocolError(f"response head is larger than {MAX_HEAD_BYTES} bytes")
        head = self._inbox.take(end)
        self._scanned = 0
        self._head_budget -= end
        status_line, headers = _split_head(head)
        status, reason = _parse_status_line(status_line)
        if 100 <= status <= 199 and status != 101:  # interim; 101 would switch protocols
            return None
        if 200 <= status <= 299:
            detail = sanitize(status_line.replace("\t", " "))
            return self._finish(State.DONE, Established(None, None, detail))
        if self._want_challenges and status in (401, 407):
            return self._challenged(status_line, status, reason, headers)
        self._refuse(status, reason, headers)

    def _challenged(
        self, status_line: str, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> Step:
        """Keep the challenge for the caller; drain the body first if the connection can be
        used again (RFC 9112 section 9.3: a response framed by its close ends the connection)."""
        values = _header_values(headers, "proxy-authenticate" if status == 407 else "www-authenticate")
        self._challenge = AuthChallenge(status, sanitize(_as_utf8(reason)), values, True)
        tokens = {
            token.strip(" \t").lower()
            for value in _header_values(headers, "connection") + _header_values(headers, "proxy-connection")
            for token in value.split(",")
        }  # fmt: skip
        keep = "close" not in tokens and (status_line[:8] != "HTTP/1.0" or "keep-alive" in tokens)
        codings = ",".join(_header_values(headers, "transfer-encoding")).lower()
        lengths = {value.strip(" \t") for value in _header_values(headers, "content-length")}
        self._chunked = _ChunkedBody()  # each 407 of a connection has its own body
        if codings:
            # Only chunked as the last coding frames a body; anything else runs to the close.
            keep = keep and codings.replace(" ", "").replace("\t", "").rsplit(",", 1)[-1] == "chunked"
            self._body_left = -1
        elif len(lengths) == 1 and (length := lengths.pop()).isascii() and length.isdigit() and (
            int(length) <= MAX_BODY_BYTES
        ):  # fmt: skip
            self._body_left = int(length)
        else:  # no length (the body runs to the close), several, or too long to drain
            keep = False
        if not keep:
            self._challenge.reusable = False
            return self._finish(State.CLOSED, self._challenge)
        self._state = State.BODY
        return None

    def _on_body(self) -> Step:
        assert self._challenge is not None and self._chunked is not None
        if self._body_left >= 0:
            taken = min(self._body_left, len(self._inbox))
            self._inbox.take(taken)
            self._body_left -= taken
            done = self._body_left == 0
        else:
            done = self._chunked.drain(self._inbox)
        if done:
            self._state = State.RETRY_DECISION
            return self._challenge
        if self._inbox.eof:  # closed mid-body: the answer needs a new connection
            self._challenge.reusable = False
            return self._finish(State.CLOSED, self._challenge)
        return NEED_DATA

    def _on_retry_decision(self) -> Step:
        raise LocalProtocolError("call retry() before next_event()")

    def _refuse(self, status: int, reason: str, headers: list[tuple[str, str]]) -> NoReturn:
        message = f"HTTP {status} {sanitize(_as_utf8(reason))}".rstrip()
        if status == 403 and self._port != 443 and any(
            value.strip(" \t").startswith("ERR_ACCESS_DENIED")
            for value in _header_values(headers, "x-squid-error")
        ):  # fmt: skip
            # Squid's stock squid.conf says "http_access deny CONNECT !SSL_ports" before any
            # authentication: the commonest reason ssh through a corporate Squid fails.
            message += (
                f" (Squid denied it: its default rules allow CONNECT only to port 443; the "
                f"proxy's admin can add {self._port} to SSL_ports, or reach a service on port "
                "443, e.g. ssh.github.com:443)"
            )
        if status not in (401, 407):
            raise ProxyError(message, protocol="http", code=status)
        # 407 is the proxy's own challenge; some proxies (tinyproxy) answer wrong credentials
        # with 401 and WWW-Authenticate instead, which from a proxy can only mean the same.
        schemes = _auth_schemes(headers, "proxy-authenticate" if status == 407 else "www-authenticate")
        notes = [f"proxy wants {', '.join(schemes)}"] if schemes else []
        if schemes and "basic" not in (s.lower() for s in schemes):
            notes.append("only Basic is supported")
        elif self._sent_credentials:
            notes.append("credentials rejected")
        else:
            notes.append("no credentials were given")
        raise ProxyAuthError(f"{message} ({'; '.join(notes)})", protocol="http", code=status)

    def _refuse_on_partial_head(self, buf: bytearray) -> None:
        # Some proxies close after a failure status line without finishing the head; the status
        # is still the best explanation to give.
        line_end = buf.find(b"\n")
        if line_end == -1:
            return
        status, reason = _parse_status_line(
            bytes(buf[:line_end]).decode("latin-1").removesuffix("\r")
        )
        if not (100 <= status <= 299):
            self._refuse(status, reason, [])

    @_outbound
    def bytes_needed(self) -> int | None:
        """None (a head has no length: see the module docstring), except while draining a 407
        body of known length: what is left of it, so that a driver that cannot peek (through a
        TLS hop) reads it whole instead of a byte or two at a time."""
        if self._state is State.BODY and self._body_left > 0:
            return max(0, self._body_left - len(self._inbox))
        return None

    def _prefix_len(self, data: bytes) -> int:
        if self._state is State.BODY:
            # A proxy sends nothing after its 407 until it has our next request: what comes is
            # body (exactly counted when it has a length).
            if self._body_left < 0:
                return len(data)
            return min(len(data), max(0, self._body_left - len(self._inbox)))
        if self._state is not State.REPLY:
            return 0
        have = len(self._inbox)
        pending = bytes(self._inbox.data) + data
        end = 0
        while True:
            # Each head is searched on its own, as _on_reply will after taking the previous one.
            end += _leading_blank_len(pending[end:])
            found = find_head_end(pending[end:])
            if found == -1:
                return len(data)
            end += found
            if not _is_interim(pending[end - found : end]):
                return min(len(data), max(0, end - have))

    _HANDLERS: ClassVar[HandlerTable] = {
        State.REPLY: _on_reply,
        State.BODY: _on_body,
        State.RETRY_DECISION: _on_retry_decision,
        State.DONE: Machine._on_final,
        State.CLOSED: Machine._on_final,
    }


class _ChunkedBody:
    """Drains a chunked body (RFC 9112 section 7.1) without keeping it: sizes, data, trailers.
    Line ends may be bare LF; extensions are ignored; at most ``MAX_BODY_BYTES`` in all."""

    __slots__ = ("_budget", "_left", "_trailers")

    def __init__(self) -> None:
        self._left = 0  # data bytes of the current chunk still to skip
        self._trailers = False
        self._budget = MAX_BODY_BYTES

    def drain(self, inbox: ReceiveBuffer) -> bool:
        """Consume what ``inbox`` has of the body; True once it ended."""
        while True:
            if self._left:
                taken = min(self._left, len(inbox))
                if not taken:
                    return False
                inbox.take(taken)
                self._left -= taken
                continue
            end = inbox.data.find(b"\n")
            if end == -1:
                if len(inbox) > 1024:
                    raise RemoteProtocolError("a chunk size line of the 407 body is too long")
                return False
            line = bytes(inbox.take(end + 1)).strip(b"\r\n")
            self._budget -= end + 1
            if self._trailers:
                if not line:
                    return True
            elif line:  # empty: the line end after a chunk's data
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF") or len(size_text) > 8:
                    raise RemoteProtocolError("malformed chunk size in the 407 body")
                self._left = int(size_text, 16)
                self._budget -= self._left
                self._trailers = self._left == 0
            if self._budget < 0:
                raise RemoteProtocolError(f"the 407 body is larger than {MAX_BODY_BYTES} bytes")


def _check_response_start(buf: bytearray) -> None:
    """Fail as soon as the first bytes cannot begin a status line, instead of waiting for a head
    that a SOCKS proxy (or anything else) will never send."""
    prefix = bytes(buf[:5])
    if prefix == b"HTTP/"[: len(prefix)]:
        return
    hint = version_hint(prefix[0]) if prefix[0] != 0x48 else ""
    if hint:
        raise RemoteProtocolError(f"not an HTTP response (first byte 0x{prefix[0]:02x}{hint})")
    first_line = bytes(buf[:60]).split(b"\n", 1)[0].decode("latin-1")
    raise RemoteProtocolError(f"not an HTTP response: {sanitize(first_line)!r}")


def _check_header(item: tuple[str, str]) -> str:
    try:
        name, value = item
    except (TypeError, ValueError):
        raise LocalProtocolError("headers must be (name, value) pairs") from None
    if not isinstance(name, str) or not _is_token(name):
        raise LocalProtocolError(f"invalid header name {sanitize(str(name))!r}")
    if not isinstance(value, str) or any((ch < " " and ch != "\t") or ch == "\x7f" for ch in value):
        raise LocalProtocolError(f"header {name} has a value with a control character")
    return f"{name}: {value}"


class HttpConnectServer(Machine):
    """Server role: parse one request head; see the module docstring for the flow.

    ``challenges`` are the Proxy-Authenticate values of a 407, the strongest first (default:
    ``AUTH_CHALLENGE``, Basic); credentials are taken in the schemes they name."""

    __slots__ = (
        "_challenges", "_error", "_pending", "_require_auth", "_scanned", "_schemes", "head"
    )  # fmt: skip
    _PEER = "client"
    _SIZES: ClassVar[None] = None

    def __init__(
        self, *, require_auth: bool = False, challenges: Sequence[str] | None = None
    ) -> None:
        self._challenges = [AUTH_CHALLENGE] if challenges is None else list(challenges)
        for value in self._challenges:
            _check_header(("Proxy-Authenticate", value))
        self._schemes = {value.partition(" ")[0].lower() for value in self._challenges}
        if require_auth and not self._schemes <= {"basic", "digest"}:
            raise LocalProtocolError("the server takes Basic and Digest credentials only")
        super().__init__(State.REQUEST)
        self._require_auth = require_auth
        self._scanned = 0
        self._pending: Request | None = None
        # What the client sent wrong, answered by abort_reply() with its status and message.
        self._error: RemoteProtocolError | None = None
        # A request other than CONNECT, whole and raw: a forwarding proxy parses it again (see
        # hopcat.server.forward) and owns its body's framing.
        self.head: bytes | None = None

    def _on_request(self) -> Step:
        try:
            return self._read_request()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _read_request(self) -> Step:
        buf = self._inbox.data
        if buf and buf[0] not in _TCHAR_BYTES:
            raise RemoteProtocolError(f"not an HTTP request (first byte 0x{buf[0]:02x})")
        if buf and 0x61 <= buf[0] <= 0x7A:  # "a".."z"
            # Methods are case-sensitive and every registered one is upper-case (RFC 9110
            # section 9.1): "connect" is not CONNECT, and a text protocol sent here is no request.
            raise RemoteProtocolError("request line starts with a lower-case letter (not a method)")
        # The request line so far (its CR and LF not counted), looked for no further than needed.
        newline = buf.find(b"\n", 0, MAX_REQUEST_LINE_BYTES + 2)
        line_end = len(buf) if newline == -1 else newline
        if line_end - (buf[line_end - 1 : line_end] == b"\r") > MAX_REQUEST_LINE_BYTES:
            raise RemoteProtocolError(
                f"request line is longer than {MAX_REQUEST_LINE_BYTES} bytes", http_status=414
            )
        end = find_head_end(buf, self._scanned)
        if end == -1:
            self._scanned = len(buf)
            if len(buf) > MAX_HEAD_BYTES:
                raise RemoteProtocolError(
                    f"request head is larger than {MAX_HEAD_BYTES} bytes", http_status=431
                )
            if buf.count(b"\n") > MAX_HEADER_LINES + 1:  # answered now, not 64 KiB later
                raise RemoteProtocolError(
                    f"more than {MAX_HEADER_LINES} header lines", http_status=431
                )
            return self._wait()
        if end > MAX_HEAD_BYTES:
            raise RemoteProtocolError(
                f"request head is larger than {MAX_HEAD_BYTES} bytes", http_status=431
            )
        head = self._inbox.take(end)
        _check_request_head(head)
        request_line, headers = _split_head(head)
        method, target = _parse_request_line(request_line)
        if method == "CONNECT":
            host, port = _parse_authority(target)
        else:
            self.head = bytes(head)
            host, port = http_url_authority(target) or ("", 0)
        request = Request(method, host, port)
        if not self._require_auth:
            self._state = State.REPLY_DECISION
            return request
        authorizations = _header_values(headers, "proxy-authorization")
        if len(authorizations) > 1:
            # Which one counts would be a guess (an intermediary may have added one): refuse.
            raise RemoteProtocolError(
                f"{len(authorizations)} Proxy-Authorization headers (one at most)"
            )
        credentials: Credentials | DigestCredentials | None = None
        scheme = authorizations[0].lstrip(" \t").partition(" ")[0].lower() if authorizations else ""
        if scheme == "digest" and "digest" in self._schemes:
            credentials = _digest_credentials(authorizations[0], method, target)
        elif scheme == "basic" and "basic" in self._schemes:
            credentials = _basic_credentials(authorizations)
        if credentials is None:
            if self._schemes == {"basic"}:
                return self._challenge("no usable Basic Proxy-Authorization header")
            return self._challenge("no usable Proxy-Authorization header for the schemes offered")
        self._pending = request
        self._state = State.AUTH_DECISION
        return credentials

    def _challenge(self, reason: str, challenges: Sequence[str] | None = None) -> Event:
        values = self._challenges if challenges is None else challenges
        lines = [f"Proxy-Authenticate: {value}" for value in values]
        self._outbox += _failure_response(407, None, lines)
        return self._finish(State.CLOSED, Rejected(f"HTTP 407: {reason}", Rejected.AUTHENTICATION))

    def _on_reply_decision(self) -> Step:
        # After accept_credentials(True) the request parsed with the credentials is still due.
        if self._pending is not None:
            request, self._pending = self._pending, None
            return request
        return self._on_decision()

    @_outbound
    def accept_credentials(
        self, ok: bool, *, challenges: Sequence[str] | None = None, reason: str | None = None
    ) -> None:
        """Answer the ``Credentials`` or ``DigestCredentials`` event: go on to the ``Request``,
        or 407 and close; ``challenges`` replace the 407's (a Digest nonce gone stale is
        answered with a fresh one marked ``stale=true``), ``reason`` the Rejected event's."""
        self._expect(State.AUTH_DECISION, "accept_credentials()")
        if challenges is not None:
            for value in challenges:
                _check_header(("Proxy-Authenticate", value))
        if ok:
            self._state = State.REPLY_DECISION
        else:
            self._pending = None
            self._challenge(reason or "credentials rejected", challenges)

    @_outbound
    def reply_success(self, bound_host: str | None = None, bound_port: int | None = None) -> None:
        """200: the tunnel is open. HTTP has nowhere to put a bound address; it is ignored."""
        self._expect(State.REPLY_DECISION, "reply_success()")
        self._outbox += _SUCCESS_RESPONSE
        self._finish(State.DONE, Established(None, None, "HTTP/1.1 200 Connection established"))

    @_outbound
    def reply_failure(self, code: int = 502, reason: str | None = None) -> None:
        """Refuse with HTTP status ``code`` (400..599); 405 adds ``Allow: CONNECT``, 407 the
        machine's challenges."""
        self._expect(State.REPLY_DECISION, "reply_failure()")
        if not isinstance(code, int) or isinstance(code, bool) or not 400 <= code <= 599:
            raise LocalProtocolError(f"HTTP failure status must be 400..599, not {code!r}")
        if reason is not None and (not reason.isascii() or not reason.isprintable()):
            raise LocalProtocolError("reason phrase must be printable ASCII")
        extra = []
        if code == 405:
            extra.append("Allow: CONNECT")
        elif code == 407:
            extra += [f"Proxy-Authenticate: {value}" for value in self._challenges]
        self._outbox += _failure_response(code, reason, extra)
        text = reason if reason is not None else STATUS_TEXT.get(code, "")
        self._finish(State.CLOSED, Rejected(f"HTTP {code} {text}".rstrip(), Rejected.REFUSED))

    def request_bytes(self) -> bytes:
        """In place of a reply, for a forwarding proxy: the request other than CONNECT whole
        (``head``, and every byte that came after it, a body or the next request), for the
        forwarder to parse again and frame."""
        self._expect(State.REPLY_DECISION, "request_bytes()")
        assert self.head is not None
        return self.head + bytes(self._inbox.data)

    def abort_reply(self, http_status: int = 400) -> bytes:
        """The response that ends the handshake with a refusal, whatever state it stopped in:
        ``http_status`` (400 for bad bytes, 408 for a timeout, 503 when the server stops) while
        the request is awaited or undecided, so the client gets an answer instead of a bare EOF.
        A request the machine refused itself is answered with that error's status (400, 414,
        431, 505) and its message as the body: the same text as the server's log line, which
        quotes no header value and no credentials."""
        out = self._take_unsent()
        if self._abort_state() in (State.REQUEST, State.AUTH_DECISION, State.REPLY_DECISION):
            error = self._error
            if error is not None:
                out += _failure_response(error.http_status, None, [], error.message)
            else:
                out += _failure_response(http_status, None, [])
        return out

    _HANDLERS: ClassVar[HandlerTable] = {
        State.REQUEST: _on_request,
        State.AUTH_DECISION: Machine._on_decision,
        State.REPLY_DECISION: _on_reply_decision,
        State.DONE: Machine._on_final,
        State.CLOSED: Machine._on_final,
    }


def _failure_response(
    code: int, reason: str | None, extra: list[str], explanation: str | None = None
) -> bytes:
    """A refusal with a one-line text body (``explanation``, else the reason phrase) that a
    person running curl or ncat by hand can read."""
    text = reason if reason is not None else STATUS_TEXT.get(code, "Error")
    body = (explanation or text).encode("ascii", "backslashreplace") + b"\n"
    lines = [
        f"HTTP/1.1 {code} {text}", *extra, "Content-Type: text/plain", f"Content-Length: {len(body)}",
        "Connection: close",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


_AUTH_SCHEMES = frozenset(("basic", "bearer", "digest", "negotiate", "ntlm"))


def _redacted(text: str) -> str:
    """Client text for a message (which is also the body of the refusal), without secrets: a
    ``user:password@`` in any word (a CONNECT target or an absolute URL) becomes ``***@``, the
    word after an auth scheme name (a header run into the request line) ``***``, and the result
    is sanitized."""
    words = text.split(" ")
    for index, word in enumerate(words):
        if "@" in word:
            words[index] = "***@" + word.rpartition("@")[2]
        elif index and words[index - 1].lower() in _AUTH_SCHEMES and word:
            words[index] = "***"
    return sanitize(" ".join(words))


def _check_request_head(head: bytes) -> None:
    """What a server refuses in a request head before parsing it, with messages that never quote
    a header value (it may be a credential, however mangled): control characters (CR, NUL, ...)
    anywhere but as the line end, obs-fold (RFC 9112 section 5.2 lets a server reject it, and a
    folded Proxy-Authorization is the kind of ambiguity a proxy must not resolve by guessing),
    and header lines that are not ``token: value``."""
    lines = head.decode("latin-1").split("\n")[:-2]
    for number, line in enumerate(lines):
        if line.endswith("\r"):
            line = line[:-1]
        if number == 0:
            if not line.replace("\t", " ").isprintable():
                raise RemoteProtocolError("control character in the request line")
            continue
        if line[:1] in (" ", "\t"):
            raise RemoteProtocolError(f"header line {number} is folded (obs-fold is refused)")
        name, colon, value = line.partition(":")
        if not colon or not _is_token(name):
            raise RemoteProtocolError(f"malformed header line {number} (expected 'name: value')")
        if any((ch < " " and ch != "\t") or ch == "\x7f" for ch in value):
            raise RemoteProtocolError(
                f"header {sanitize(name, 40)} has a control character in its value"
            )


def _parse_request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        raise RemoteProtocolError(f"malformed request line {_redacted(line)!r}")
    method, target, version = parts
    if not _is_http1(version):
        # A well-formed other version is one we do not speak (RFC 9110 section 15.6.6); anything
        # else is not a request line at all.
        well_formed = (
            len(version) == 8 and version.startswith("HTTP/") and version[6] == "."
            and version[5].isdigit() and version[7].isdigit() and version.isascii()
        )  # fmt: skip
        raise RemoteProtocolError(
            f"unsupported HTTP version {sanitize(version)!r}", http_status=505 if well_formed else 400
        )
    return method, target


def http_url_authority(target: str) -> tuple[str, int] | None:
    """(host, port) of an absolute-form ``http://`` request target (port 80 unless given), None
    for any other form or scheme; a malformed authority, or one with userinfo (RFC 9110 section
    4.2.4: a recipient should treat it as an error), raises."""
    if target[:7].lower() != "http://":
        return None
    authority = target[7:]
    for end in "/?#":
        authority = authority.partition(end)[0]
    if "@" in authority:
        raise RemoteProtocolError(f"userinfo in the request URL {_redacted(target)!r} is refused")
    if not authority.endswith("]") and ":" in authority:
        if authority.endswith(":"):
            authority += "80"
        return _parse_authority(authority, "URL authority")
    return _parse_authority(authority + ":80", "URL authority")


def _parse_authority(target: str, what: str = "CONNECT target") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (RFC 9110 section 9.3.6) -> (host without brackets, port);
    ``what`` names it in the errors."""
    parsed = _split_authority(target)
    if isinstance(parsed, tuple):
        return parsed
    if parsed == "no port":  # the message is made only now: every request comes here
        raise RemoteProtocolError(f"{what} {_redacted(target)!r} has no port (host:port)")
    raise RemoteProtocolError(f"malformed {what} {_redacted(target)!r}")


def _split_authority(target: str) -> tuple[str, int] | str:
    """``_parse_authority``'s work: (host, port), or what is wrong ("no port", "malformed")."""
    if target.startswith("["):
        close = target.find("]")
        host, port_text = target[1:close], target[close + 1 :]
        if close != -1 and port_text in ("", ":"):
            return "no port"
        if close == -1 or not port_text.startswith(":"):
            return "malformed"
        port_text = port_text[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            return "malformed"
    else:
        host, colon, port_text = target.rpartition(":")
        if (not colon or not port_text) and not target.strip(_REG_NAME_CHARS + ":"):
            return "no port"
        if not colon or not host or len(host) > 255 or host.strip(_REG_NAME_CHARS):
            return "malformed"
    if not 1 <= len(port_text) <= 5 or not (port_text.isascii() and port_text.isdigit()):
        return "malformed"
    port = int(port_text)
    if port > 65535:
        return "malformed"
    return host, port


def _basic_credentials(values: list[str]) -> Credentials | None:
    """The user and password of the first Proxy-Authorization header, if it is valid Basic."""
    if not values:
        return None
    scheme, _, token = values[0].strip(" \t").partition(" ")
    token = token.strip(" \t")
    if scheme.lower() != "basic" or not token or token.strip(_BASE64_CHARS) or len(token) % 4:
        return None
    import binascii  # only authenticating servers pay for it

    try:
        raw = binascii.a2b_base64(token)
    except binascii.Error:
        return None
    username, colon, password = raw.partition(b":")
    if not colon:
        return None
    return Credentials(
        username.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")
    )


# What a Digest answer to our challenges must hold (RFC 7616 section 3.4): we offer qop=auth only,
# so nc and cnonce are required too.
_DIGEST_FIELDS = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
_HEX = "0123456789abcdefABCDEF"


def _digest_credentials(value: str, method: str, target: str) -> DigestCredentials | None:
    """The fields of a Digest Proxy-Authorization value, when it is well formed and answers a
    challenge of ours (qop=auth, MD5 or SHA-256, no userhash, no -sess); verification is the
    server code's."""
    from .http_auth import parse_challenges  # only Digest servers pay for it

    try:
        parsed = parse_challenges([value])
    except RemoteProtocolError:
        return None
    if len(parsed) != 1 or parsed[0].name != "digest":
        return None
    params = parsed[0].params
    if any(name not in params for name in _DIGEST_FIELDS):
        return None
    algorithm = params.get("algorithm", "MD5").upper()
    nc = params["nc"]
    if (
        algorithm not in ("MD5", "SHA-256") or params["qop"].lower() != "auth"
        or len(nc) != 8 or nc.strip(_HEX) or params.get("userhash", "false").lower() != "false"
    ):  # fmt: skip
        return None
    if method != "CONNECT" and params["uri"].startswith("/") and target[:7].lower() == "http://":
        # A forwarded request: clients (curl) answer for the URL's path, not the whole URL.
        path = target[7:].partition("/")[1:]
        if params["uri"] == "".join(path):
            target = params["uri"]
    return DigestCredentials(
        params["username"], params["realm"], params["nonce"], params["uri"], params["response"],
        algorithm, nc, params["cnonce"], method, target,
    )  # fmt: skip
