"""HTTP CONNECT tunnels (RFC 9110 section 9.3.6, framing per RFC 9112), both roles, sans I/O.

The client sends one request head and waits for the response head::

    REPLY --(2xx)--> DONE          1xx (not 101): skipped, stay in REPLY (RFC 9110 section 15.2)
          --(407, 401)--> ProxyAuthError      --(other)--> ProxyError(code=status)

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
exists. Credentials use Basic (RFC 7617, UTF-8); a 407 names the schemes the proxy wants.
Peer text (reason phrase, header values) is sanitized before it goes into an error message.

The server parses one request head (``REQUEST``), hands ``Credentials`` from a Basic
Proxy-Authorization header to the server code when authentication is required (answering 407
itself when there is none), then a ``Request``; any method other than CONNECT comes through with
``host=""`` for the server code to answer ``reply_failure(405)``. Every failure response carries
``Connection: close``.

Not done: Digest, NTLM or Negotiate; keep-alive and retrying a 407 on the same connection;
absolute-form requests (this is a tunnel, not a forwarding proxy); TLS to the proxy.
"""

from __future__ import annotations

import _socket as socket  # see _machine.py: no socket module

from ..errors import LocalProtocolError, ProxyAuthError, ProxyError, RemoteProtocolError
from ._buffer import find_head_end
from ._events import NEED_DATA, Credentials, Established, Event, Rejected, Request
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
    from typing import ClassVar, NoReturn

    from ._machine import HandlerTable, Step

__all__ = [
    "MAX_HEADER_LINES",
    "MAX_HEAD_BYTES",
    "NEED_DATA",
    "Credentials",
    "Established",
    "HttpConnectClient",
    "HttpConnectServer",
    "Rejected",
    "Request",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINES = 100

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
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_SUCCESS_RESPONSE = b"HTTP/1.1 200 Connection established\r\n\r\n"
# What the server answers a request without usable credentials (RFC 9110 section 11.7.1).
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
        raise RemoteProtocolError(f"more than {MAX_HEADER_LINES} header lines")
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
    adds Basic credentials.
    """

    __slots__ = ("_head_budget", "_scanned", "_sent_credentials")
    _SIZES: ClassVar[None] = None

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        kind, text, _ = check_host(host)
        check_port(port)
        authority = f"[{text}]:{port}" if kind is HostKind.IPV6 else f"{text}:{port}"
        extra = [_check_header(item) for item in headers or ()]
        given = {name.lower() for name, _ in headers or ()}
        lines = [f"CONNECT {authority} HTTP/1.1"]
        if "host" not in given:
            lines.append(f"Host: {authority}")
        if username is not None:
            if "proxy-authorization" in given:
                raise LocalProtocolError("credentials and a Proxy-Authorization header both given")
            lines.append(f"Proxy-Authorization: {_basic_authorization(username, password)}")
        elif password is not None:
            raise LocalProtocolError("a password was given without a username")
        lines += extra
        super().__init__(State.REPLY)
        self._sent_credentials = username is not None or "proxy-authorization" in given
        self._scanned = 0
        self._head_budget = MAX_HEAD_BYTES
        self._outbox += ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

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
        self._refuse(status, reason, headers)

    def _refuse(self, status: int, reason: str, headers: list[tuple[str, str]]) -> NoReturn:
        message = f"HTTP {status} {sanitize(_as_utf8(reason))}".rstrip()
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

    def _prefix_len(self, data: bytes) -> int:
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

    _HANDLERS: ClassVar[HandlerTable] = {State.REPLY: _on_reply, State.DONE: Machine._on_final}


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


def _basic_authorization(username: str, password: str | None) -> str:
    """``Basic <base64(user:pass)>`` per RFC 7617, with UTF-8 as its section 2.1 charset."""
    import binascii  # only authenticated connections pay for it

    if not isinstance(username, str) or not isinstance(password, str | None):
        raise LocalProtocolError("username and password must be strings")
    if ":" in username:
        raise LocalProtocolError("an HTTP Basic username cannot contain ':' (RFC 7617)")
    try:
        raw = f"{username}:{password or ''}".encode()
    except UnicodeError:
        raise LocalProtocolError("username or password is not valid Unicode") from None
    return "Basic " + binascii.b2a_base64(raw, newline=False).decode("ascii")


class HttpConnectServer(Machine):
    """Server role: parse one request head; see the module docstring for the flow."""

    __slots__ = ("_pending", "_require_auth", "_scanned")
    _PEER = "client"
    _SIZES: ClassVar[None] = None

    def __init__(self, *, require_auth: bool = False) -> None:
        super().__init__(State.REQUEST)
        self._require_auth = require_auth
        self._scanned = 0
        self._pending: Request | None = None

    def _on_request(self) -> Step:
        buf = self._inbox.data
        if buf and buf[0] not in _TCHAR_BYTES:
            raise RemoteProtocolError(f"not an HTTP request (first byte 0x{buf[0]:02x})")
        end = find_head_end(buf, self._scanned)
        if end == -1:
            self._scanned = len(buf)
            if len(buf) > MAX_HEAD_BYTES:
                raise RemoteProtocolError(f"request head is larger than {MAX_HEAD_BYTES} bytes")
            return self._wait()
        if end > MAX_HEAD_BYTES:
            raise RemoteProtocolError(f"request head is larger than {MAX_HEAD_BYTES} bytes")
        head = self._inbox.take(end)
        _check_request_head(head)
        request_line, headers = _split_head(head)
        method, target = _parse_request_line(request_line)
        host, port = _parse_authority(target) if method == "CONNECT" else ("", 0)
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
        credentials = _basic_credentials(authorizations)
        if credentials is None:
            return self._challenge("no usable Basic Proxy-Authorization header")
        self._pending = request
        self._state = State.AUTH_DECISION
        return credentials

    def _challenge(self, reason: str) -> Event:
        challenge = [f"Proxy-Authenticate: {AUTH_CHALLENGE}"]
        self._outbox += _failure_response(407, None, challenge)
        return self._finish(State.CLOSED, Rejected(f"HTTP 407: {reason}", Rejected.AUTHENTICATION))

    def _on_reply_decision(self) -> Step:
        # After accept_credentials(True) the request parsed with the credentials is still due.
        if self._pending is not None:
            request, self._pending = self._pending, None
            return request
        return self._on_decision()

    @_outbound
    def accept_credentials(self, ok: bool) -> None:
        """Answer the ``Credentials`` event: go on to the ``Request``, or 407 and close."""
        self._expect(State.AUTH_DECISION, "accept_credentials()")
        if ok:
            self._state = State.REPLY_DECISION
        else:
            self._pending = None
            self._challenge("credentials rejected")

    @_outbound
    def reply_success(self, bound_host: str | None = None, bound_port: int | None = None) -> None:
        """200: the tunnel is open. HTTP has nowhere to put a bound address; it is ignored."""
        self._expect(State.REPLY_DECISION, "reply_success()")
        self._outbox += _SUCCESS_RESPONSE
        self._finish(State.DONE, Established(None, None, "HTTP/1.1 200 Connection established"))

    @_outbound
    def reply_failure(self, code: int = 502, reason: str | None = None) -> None:
        """Refuse with HTTP status ``code`` (400..599); 405 adds ``Allow: CONNECT``, 407 a Basic
        challenge."""
        self._expect(State.REPLY_DECISION, "reply_failure()")
        if not isinstance(code, int) or isinstance(code, bool) or not 400 <= code <= 599:
            raise LocalProtocolError(f"HTTP failure status must be 400..599, not {code!r}")
        if reason is not None and (not reason.isascii() or not reason.isprintable()):
            raise LocalProtocolError("reason phrase must be printable ASCII")
        extra = []
        if code == 405:
            extra.append("Allow: CONNECT")
        elif code == 407:
            extra.append(f"Proxy-Authenticate: {AUTH_CHALLENGE}")
        self._outbox += _failure_response(code, reason, extra)
        text = reason if reason is not None else STATUS_TEXT.get(code, "")
        self._finish(State.CLOSED, Rejected(f"HTTP {code} {text}".rstrip(), Rejected.REFUSED))

    def abort_reply(self, http_status: int = 400) -> bytes:
        """The response that ends the handshake with a refusal, whatever state it stopped in:
        ``http_status`` (400 for bad bytes, 408 for a timeout, 503 when the server stops) while
        the request is awaited or undecided, so the client gets an answer instead of a bare EOF."""
        out = self._take_unsent()
        if self._abort_state() in (State.REQUEST, State.AUTH_DECISION, State.REPLY_DECISION):
            out += _failure_response(http_status, None, [])
        return out

    _HANDLERS: ClassVar[HandlerTable] = {
        State.REQUEST: _on_request,
        State.AUTH_DECISION: Machine._on_decision,
        State.REPLY_DECISION: _on_reply_decision,
        State.DONE: Machine._on_final,
        State.CLOSED: Machine._on_final,
    }


def _failure_response(code: int, reason: str | None, extra: list[str]) -> bytes:
    text = reason if reason is not None else STATUS_TEXT.get(code, "Error")
    lines = [f"HTTP/1.1 {code} {text}", *extra, "Content-Length: 0", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _redacted(text: str) -> str:
    """Client text for a message, without secrets: a ``user:password@`` in any word (a CONNECT
    target or an absolute URL) becomes ``***@``, and the result is sanitized."""
    if "@" in text:
        text = " ".join(
            "***@" + word.rpartition("@")[2] if "@" in word else word for word in text.split(" ")
        )
    return sanitize(text)


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
        raise RemoteProtocolError(f"unsupported HTTP version {sanitize(version)!r}")
    return method, target


def _parse_authority(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (RFC 9110 section 9.3.6) -> (host without brackets, port)."""
    malformed = RemoteProtocolError(f"malformed CONNECT target {_redacted(target)!r}")
    if target.startswith("["):
        close = target.find("]")
        host, port_text = target[1:close], target[close + 1 :]
        if close == -1 or not port_text.startswith(":"):
            raise malformed
        port_text = port_text[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise malformed from None
    else:
        host, colon, port_text = target.rpartition(":")
        if not colon or not host or len(host) > 255 or host.strip(_REG_NAME_CHARS):
            raise malformed
    if not 1 <= len(port_text) <= 5 or not (port_text.isascii() and port_text.isdigit()):
        raise malformed
    port = int(port_text)
    if port > 65535:
        raise malformed
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
