"""Plain HTTP forwarding: absolute-form requests (``GET http://host/path HTTP/1.1``) sent on to
their origin, and the responses back, over a keep-alive client connection.

A ``Forwarder`` takes a ``handler.Conn`` over once its HTTP machine has parsed a first request
that is not CONNECT (the machine did the authentication; its raw head is handed on). One task
per client connection, none per request: it reads a request, has the Conn check and dial the
origin (``Conn.connect_to``: the rules on the resolved addresses, Happy Eyeballs, the --via
chain, the client's fair share; the very path of CONNECT, not a copy), sends the request on,
and streams both bodies chunk by chunk (a read from one side is written to the other before the
next read: nothing is buffered whole, and a slow reader slows its writer). Each request gets
one log line (the CONNECT line's fields, with ``method`` and ``status``).

Why h11: HTTP/1.1 framing is where request smuggling lives, and h11 (python-hyper) is a small,
well-kept sans-I/O parser that owns it on both sides: one ``h11.Connection`` for the client
(server role), one per origin connection (client role). Every message is parsed by one and
written anew by the other, so no byte of a head, and no body framing, is passed through as the
peer wrote it. Hence:

* Content-Length and Transfer-Encoding are read by h11, which refuses two different lengths,
  any coding but ``chunked`` (501) and a chunk size over 20 hex digits; bodies are re-framed by
  h11 on the way out, so a chunk size that would wrap a C integer is only a long chunk here.
  A request with both Content-Length and Transfer-Encoding is refused (400, connection closed;
  RFC 9112 section 6.3 allows it and it is the classic smuggling vector).
* Bytes past the end of a body are the next request, parsed as such (or refused with 400),
  never sent on as part of this one; after an error the connection is closed.
* Bare LF line ends (RFC 9112 section 2.2 lets a recipient accept them) are accepted and the
  head is written with CRLF; obs-fold is refused in the first head (by the hand-written
  machine) and unfolded into one line by h11 in later heads: never passed on folded.
* Heads are capped at ``MAX_HEAD_BYTES`` (431 past it).

Hop-by-hop fields (RFC 9110 section 7.6.1) are dropped both ways: Connection and every field
it names, Proxy-Connection, Keep-Alive, TE, Trailer, Transfer-Encoding (re-framed), Upgrade
(kept, with ``Connection: Upgrade``, for a WebSocket upgrade), and Proxy-Authorization (never
forwarded) or Proxy-Authenticate. ``Via: 1.1 hopcat`` is added both ways unless
``--no-via-header``. The request goes to the origin in origin form with ``Host`` from the URL;
a Host header naming another authority is refused (400), a missing one (HTTP/1.0) added.

``Expect: 100-continue`` is forwarded and the origin's 100 relayed; the client's body is
forwarded whenever it comes, so an origin that never sends 100 cannot deadlock the exchange.
An origin's 101 to a WebSocket upgrade turns the connection into a tunnel (the server's relay,
with the bytes each side sent early), and so does a CONNECT that follows forwarded requests
on the same connection (checked and dialled as a first one is). The origin connection is kept for the next request to
the same origin when both messages allowed it; before reuse it is checked for an EOF, which
leaves only the race of an origin closing while the request is on its way (a 502).

Every later request is authenticated again (Basic and Digest, the same store and checks; a
failure gets 407 and the connection is closed), and every refusal or failure closes the
connection after its answer: 400/431/414/501 for bad requests, 403 for rules, 407, 502/503/504
as for CONNECT.
"""

from __future__ import annotations

import asyncio
import re
import socket

import h11

from hopcat._endpoint import format_hostport
from hopcat.errors import ProtocolError
from hopcat.proto.http_connect import (
    MAX_HEAD_BYTES,
    MAX_HEADER_LINES,
    MAX_REQUEST_LINE_BYTES,
    STATUS_TEXT,
    _basic_credentials,
    _digest_credentials,
    _parse_authority,
    http_url_authority,
)
from hopcat.server.handler import FORWARD, strerror
from hopcat.server.relay import reset_on_close

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Iterable, Sequence

    from hopcat.server.handler import Conn

    Headers = list[tuple[bytes, bytes]]

RECV_BYTES = 256 * 1024
OUT_BYTES = 64 * 1024
KEEP_ALIVE_S = 75.0  # for a kept client connection's next request (nginx's keepalive_timeout)
VIA = b"1.1 hopcat"
# Hop-by-hop fields (RFC 9110 section 7.6.1), and the proxy's own ones.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)


class Refusal(Exception):
    """A request answered with an error status and the connection closed."""

    def __init__(self, status: int, result: str, reason: str, *, stale: bool = False) -> None:
        super().__init__(reason)
        self.status, self.result, self.reason = status, result, reason
        self.stale = stale


class _Gone(Exception):
    """A socket failed or ended mid-message: ``side`` is "client" or "origin"."""

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(reason)
        self.side, self.reason = side, reason


# --------------------------------------------------------------------------- pure helpers


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The field names listed by the Connection headers, lower-cased."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    names.discard(b"")
    return names


def is_websocket_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    upgrades = [v.strip().lower() for n, v in headers if n.lower() == b"upgrade"]
    return upgrades == [b"websocket"] and b"upgrade" in connection_tokens(headers)


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """``headers`` (names in any case) without the hop-by-hop ones."""
    # Connection may not unname the fields the framing (and the target) depend on: dropping
    # Content-Length from a request whose body h11 is reading would mis-frame it.
    drop = HOP_BY_HOP | (connection_tokens(headers) - {b"content-length", b"host"})
    return [(name, value) for name, value in headers if name.lower() not in drop]


def split_target(target: str) -> tuple[str, str]:
    """An absolute ``http://`` target -> (its authority text, the origin-form target)."""
    rest = target[7:]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:].partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


def host_matches(value: bytes, host: str, port: int) -> bool:
    """Whether a Host header names the URL's authority (case-insensitively, port 80 implied)."""
    try:
        named = http_url_authority("http://" + value.decode("ascii").strip())
    except (ProtocolError, UnicodeError):
        return False
    return named is not None and (named[0].lower(), named[1]) == (host.lower(), port)


def check_head_size(request: h11.Request) -> None:
    """h11 caps a head only while it is incomplete; one that came whole in a read is measured
    here (as written with CRLF), so every head keeps to the first head's cap."""
    size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers.raw_items())
    if request.method[:1].islower():
        raise Refusal(400, "protocol-error", "request line starts with a lower-case letter")
    if len(request.method) + len(request.target) + 10 > MAX_REQUEST_LINE_BYTES:
        raise Refusal(
            414, "protocol-error", f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes"
        )
    if len(request.headers) > MAX_HEADER_LINES:
        raise Refusal(431, "protocol-error", f"more than {MAX_HEADER_LINES} header lines")
    if size > MAX_HEAD_BYTES:
        raise Refusal(431, "protocol-error", f"request head larger than {MAX_HEAD_BYTES} bytes")


def error_response(status: int, text: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A short plain-text response that closes the connection."""
    body = (text + "\n").encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}".encode()]
    lines += [name + b": " + value for name, value in extra]
    lines += [
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _h11_verdict(exc: h11.RemoteProtocolError) -> str:
    """h11's message without the bytes it quotes: a header line of either peer's may hold a
    cookie or a token, and the message goes to the log."""
    return re.sub(r":?\s*(bytearray\()?b['\"].*$", "", str(exc), flags=re.S)


def _h11_refusal(exc: h11.RemoteProtocolError) -> Refusal:
    """h11's verdict on a client's bytes: its status (431 for a head over the cap, 501 for a
    transfer coding it does not know, else 400)."""
    return Refusal(exc.error_status_hint, "protocol-error", f"bad request: {_h11_verdict(exc)}")


# --------------------------------------------------------------------------- the forwarder


class Forwarder:
    """One client connection forwarding plain HTTP requests; see the module docstring."""

    __slots__ = (
        "_client_eof",
        "_connecting",
        "_first",
        "_origin_eof",
        "_out_client",
        "_out_origin",
        "_registered",
        "_responding",
        "_task",
        "cli",
        "conn",
        "down",
        "method",
        "origin",
        "origin_key",
        "origin_policy",
        "started",
        "status",
        "up",
        "upstream",
        "via_header",
    )

    def __init__(self, conn: Conn, data: bytes) -> None:
        """``data``: the first request's head, and whatever the client sent after it."""
        self.conn = conn
        self.cli = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.cli.receive_data(data)
        self.up: h11.Connection | None = None  # the origin connection's parser
        self.origin: _socket.socket | None = None
        self.origin_key: tuple[str, int] | None = None
        self.origin_policy: object = None  # the rules the kept origin connection was checked by
        self.via_header = not conn.server.options.no_via_header
        self._client_eof = self._origin_eof = False
        self._connecting: asyncio.Future[bytes] | None = None
        self._registered: list[tuple[int, bool]] = []  # (fd, writer?) registered on the loop
        self._first = True
        self._out_client = bytearray()
        self._out_origin = bytearray()
        self._responding = False  # response bytes of the request in flight have been sent
        self.method: str | None = None  # the request in flight, not yet logged
        self.status: int | None = None
        self.started = 0.0
        self.upstream = 0
        self.down = 0
        self._task = conn.server.loop.create_task(self._run())

    # -- Conn's calls ------------------------------------------------------------------------
    def connected(self, target: _socket.socket, trailing: bytes) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.set_result(trailing)
        else:
            target.close()

    def refused(self, result: str, status: int, reason: str) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.set_exception(Refusal(status, result, reason))

    def close(self, result: str, reason: str | None) -> None:
        """The Conn is closing (any reason): stop, and log the request in flight."""
        self._unregister()
        if self.method is not None:
            answers = {
                "idle-timeout": (504, "the origin did not answer in time"),
                "shutdown": (503, "the server is stopping"),
            }
            if result in answers and not self._responding:
                self.status, text = answers[result]
                try:
                    self.conn.sock.send(error_response(self.status, text))
                except OSError:
                    pass
            self._log(result, reason)
        if not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()

    # -- the task ----------------------------------------------------------------------------
    async def _run(self) -> None:
        conn = self.conn
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    conn.close("ok", None)
                    return
                await self._exchange(request)
                if self.conn.forward is not self:
                    return  # a WebSocket upgrade: the relay has the connection now
                cli = self.cli
                stopping = conn.server.stopping  # draining: no new request on this connection
                if cli.our_state is h11.DONE and cli.their_state is h11.DONE and not stopping:
                    cli.start_next_cycle()
                    continue
                conn.linger("ok", "")  # Connection: close, HTTP/1.0, or a body left unread
                return
        except Refusal as refusal:
            self._refuse(refusal)
        except _Gone as gone:
            self._broken(gone)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._unregister()
            conn.crashed(exc)

    async def _next_request(self) -> h11.Request | None:
        """The next request head, or None when the client closed between requests.

        Meanwhile the connection is pending, as one in its handshake: its next head must be
        whole within ``KEEP_ALIVE_S`` (the sweep closes it then), and a server that stops
        closes it at once instead of granting it the grace period of a transfer."""
        server = self.conn.server
        if not self._first:
            server.to_pending(self.conn)
            self.conn.deadline = server.loop.time() + KEEP_ALIVE_S
        try:
            return await self._read_request()
        finally:
            if self.conn.forward is self and self.conn.phase == FORWARD:
                server.to_relay(self.conn)

    async def _read_request(self) -> h11.Request | None:
        while True:
            try:
                event = self.cli.next_event()
            except h11.RemoteProtocolError as exc:
                self._start_request("-")
                raise _h11_refusal(exc) from None
            if event is h11.NEED_DATA:
                if self._client_eof:
                    return None
                await self._fill()
                continue
            if isinstance(event, h11.Request):
                self._start_request(event.method.decode("ascii", "replace"))
                check_head_size(event)
                return event
            return None  # ConnectionClosed

    def _start_request(self, method: str) -> None:
        self.method = method
        self.status = None
        self._responding = False
        self.upstream = self.down = 0
        self.started = self.conn.server.loop.time()

    async def _exchange(self, request: h11.Request) -> None:
        conn = self.conn
        conn.dest = None
        target = request.target.decode("latin-1")
        try:
            if request.method == b"CONNECT":
                authority: tuple[str, int] | None = _parse_authority(target)
            else:
                authority = http_url_authority(target)
        except ProtocolError as exc:
            raise Refusal(400, "protocol-error", exc.message) from None
        if authority is None:
            if target.startswith("/") or target == "*":
                raise Refusal(
                    400, "protocol-error",
                    "origin-form request: this is a proxy; ask for an absolute http:// URL",
                )  # fmt: skip
            scheme = target.partition(":")[0][:16] if "://" in target else ""
            if scheme:
                raise Refusal(
                    501, "unsupported", f"{scheme}:// URLs are not forwarded (use CONNECT)"
                )
            raise Refusal(
                400, "protocol-error", f"{request.method.decode()} with an authority-form target"
            )
        host, port = authority
        conn.host, conn.port = host, port
        if not self._first and conn.server.auth_required:
            self._authenticate(request, target)
        self._first = False
        key = (host, port)
        conn.dest = format_hostport(host, port)
        if request.method == b"CONNECT":
            await self._tunnel(key)
            return
        headers = self._request_headers(request, host, port)
        if self.origin is None or self.origin_key != key or not self._reusable():
            await self._connect(key)  # a kept connection: the rules passed it when it was made
        up = self.up
        assert up is not None and self.origin is not None
        _authority, path = split_target(target)
        self._to_origin(up.send(h11.Request(method=request.method, target=path, headers=headers)))
        await self._pump(request)

    def _authenticate(self, request: h11.Request, target: str) -> None:
        """A later request's credentials, checked as the first one's were (see handler)."""
        conn = self.conn
        values = [v.decode("latin-1") for n, v in request.headers if n == b"proxy-authorization"]
        scheme = values[0].lstrip(" \t").partition(" ")[0].lower() if len(values) == 1 else ""
        schemes = conn.server.options.auth_schemes
        conn.reason = None
        ok = False
        if scheme == "basic" and "basic" in schemes:
            credentials = _basic_credentials(values)
            if credentials is not None:
                conn.user = credentials.username
                ok = conn.check_login(credentials)
        elif scheme == "digest" and conn.server.digest is not None:
            from hopcat.server.digest import OK, STALE

            answer = _digest_credentials(values[0], request.method.decode("latin-1"), target)
            if answer is not None:
                conn.user = answer.username
                outcome = conn.check_digest(answer)
                if outcome == STALE:  # as in the handshake: a new nonce, not a failure
                    raise Refusal(407, "auth-failed", conn.reason or "", stale=True)
                ok = outcome == OK
        if not ok:
            raise Refusal(407, "auth-failed", conn.reason or "no usable Proxy-Authorization header")

    def _request_headers(self, request: h11.Request, host: str, port: int) -> Headers:
        headers = list(request.headers)
        names = [name for name, _ in headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise Refusal(
                400,
                "protocol-error",
                "both Content-Length and Transfer-Encoding (refused: request smuggling)",
            )
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) > 1:
            raise Refusal(400, "protocol-error", f"{len(hosts)} Host headers")
        if hosts and not host_matches(hosts[0], host, port):
            raise Refusal(
                400, "protocol-error", "the Host header names another authority than the URL"
            )
        authority = format_hostport(host, port)
        if port == 80:
            authority = authority.removesuffix(":80")
        out: Headers = [(b"Host", authority.encode("latin-1"))]
        out += [(n, v) for n, v in end_to_end(request.headers.raw_items()) if n.lower() != b"host"]
        if b"transfer-encoding" in names:
            out.append((b"Transfer-Encoding", b"chunked"))  # h11 took nothing else
        if is_websocket_upgrade(headers):
            out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        if self.via_header:
            out.append((b"Via", VIA))
        return out

    def _response_headers(self, headers: h11._headers.Headers, status: int) -> Headers:
        out = end_to_end(headers.raw_items())
        if any(name == b"transfer-encoding" for name, _ in headers):
            out = [(n, v) for n, v in out if n.lower() != b"content-length"]  # h11 frames it anew
        if status == 101:
            out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
        elif status >= 200 and self.conn.server.stopping:
            out.append((b"Connection", b"close"))  # draining: this is the connection's last
        if self.via_header:
            out.append((b"Via", VIA))
        return out

    def _reusable(self) -> bool:
        """Whether the kept origin connection is still open (no EOF, no stray bytes)."""
        origin = self.origin
        assert origin is not None
        if self.up is None or self.up.trailing_data[0]:
            return False  # the origin sent more than its last response: not to be trusted
        if self.origin_policy is not self.conn.server.policy:
            return False  # SIGHUP brought other rules: the origin is checked (and dialled) anew
        try:
            origin.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            pass
        return False

    async def _connect(self, key: tuple[str, int]) -> None:
        conn = self.conn
        self._drop_origin()
        loop = conn.server.loop
        self._connecting = future = loop.create_future()
        policy = conn.server.policy  # the rules this dial is checked by (a SIGHUP may land meanwhile)
        conn.connect_to(*key)
        try:
            trailing = await future
        finally:
            self._connecting = None
        self.origin = conn.target
        self.origin_key = key
        self.origin_policy = policy
        self._origin_eof = False
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        if trailing:
            self.up.receive_data(trailing)

    def _drop_origin(self) -> None:
        conn = self.conn
        if conn.via is not None:
            conn.server.engine.unwatch(conn.via.fd)
            conn.via.close(abort=False)
            conn.via = None
        if self.origin is not None:
            self.origin.close()
        self.origin = conn.target = None
        self.up = None
        self.origin_key = None

    async def _pump(self, request: h11.Request) -> None:
        """Stream the request body on and the response back until the response is complete.

        Both directions at once (an origin may answer, or echo, before the body is all in):
        the client is read only while less than OUT_BYTES wait for the origin, and the origin
        only while less than OUT_BYTES wait for the client, so a slow reader on either side
        slows its writer and nothing is buffered whole, and neither side can deadlock the
        other by not reading until it has written."""
        cli, up = self.cli, self.up
        assert up is not None and self.origin is not None
        request_done = response_done = False
        while True:
            # Everything the bytes received so far allow, within the buffers' bounds.
            while not request_done and len(self._out_origin) < OUT_BYTES:
                try:
                    event = cli.next_event()
                except h11.RemoteProtocolError as exc:
                    if self._responding:
                        raise _Gone("client", f"bad request body: {_h11_verdict(exc)}") from None
                    raise _h11_refusal(exc) from None
                if event is h11.NEED_DATA:
                    break
                if not isinstance(event, h11.Data | h11.EndOfMessage):  # ConnectionClosed
                    raise _Gone("client", "closed in the middle of the request body")
                request_done = isinstance(event, h11.EndOfMessage)
                if isinstance(event, h11.EndOfMessage) and event.headers:  # trailers
                    # Hop-by-hop by their own Connection field or by the head's.
                    named = connection_tokens(request.headers.raw_items())
                    kept = [(n, v) for n, v in end_to_end(event.headers.raw_items())
                            if n.lower() not in named]  # fmt: skip
                    event = h11.EndOfMessage(headers=kept)
                self._to_origin(up.send(event))
            while not response_done and len(self._out_client) < OUT_BYTES:
                try:
                    answer = up.next_event()
                except h11.RemoteProtocolError as exc:
                    raise _Gone("origin", f"bad response: {_h11_verdict(exc)}") from None
                if answer is h11.NEED_DATA:
                    break
                if isinstance(answer, h11.InformationalResponse):
                    if answer.status_code == 101 and up.their_state is h11.SWITCHED_PROTOCOL:
                        await self._switch(answer)
                        return
                    if cli.their_http_version != b"1.0":
                        headers = self._response_headers(answer.headers, answer.status_code)
                        info = h11.InformationalResponse(
                            status_code=answer.status_code, headers=headers
                        )
                        self._to_client(cli.send(info))
                elif isinstance(answer, h11.Response):
                    self.status = answer.status_code
                    headers = self._response_headers(answer.headers, answer.status_code)
                    self._responding = True
                    response = h11.Response(
                        status_code=answer.status_code, headers=headers, reason=answer.reason
                    )
                    self._to_client(cli.send(response))
                elif isinstance(answer, h11.Data):
                    self._to_client(cli.send(answer))
                elif isinstance(answer, h11.EndOfMessage):
                    self._to_client(cli.send(h11.EndOfMessage()))
                    response_done = True
                else:  # ConnectionClosed before a response
                    raise _Gone("origin", "closed without a response")
            if response_done:
                break
            # Then the sockets: write what is due, read what may be read, or wait.
            try:
                moved = self._try_send(False)
            except _Gone:
                if not self._out_origin or self._origin_eof:
                    raise
                # The origin stopped taking the body (it may have answered already, a 413
                # say): send it nothing more, and read what it said.
                self._out_origin.clear()
                request_done = moved = True
            moved = self._try_send(True) or moved
            read_client = (
                not request_done and not self._client_eof and len(self._out_origin) < OUT_BYTES
            )
            read_origin = not self._origin_eof and len(self._out_client) < OUT_BYTES
            if read_client and self._recv(True):
                moved = True
            if read_origin and self._recv(False):
                moved = True
            if moved:
                continue
            readers = [self.conn.fd] if read_client else []
            if read_origin:
                readers.append(self.origin.fileno())
            writers = [self.origin.fileno()] if self._out_origin else []
            if self._out_client:
                writers.append(self.conn.fd)
            if not readers and not writers:
                raise _Gone("origin", "ended the exchange unanswered")
            # Until the answer's head, an origin that owes something (the answer, the whole
            # request being in; or taking the body) and is silent is bounded by
            # --answer-timeout even with no --idle-timeout. A client pausing its upload is
            # not the origin's silence (--idle-timeout bounds that).
            owed = not self._responding and (request_done or bool(self._out_origin))
            timeout = self.conn.server.options.answer_timeout_s if owed else None
            await self._wait(readers, writers, timeout)
        if not request_done:
            # Answered before the body was all in: the origin connection is dropped below and
            # the client's is closed after the answer; what is queued for the origin is moot,
            # and an origin that stopped reading must not hold the answer's end.
            self._out_origin.clear()
        await self._flush()
        self._log("ok", None)
        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
        else:
            self._drop_origin()

    async def _tunnel(self, key: tuple[str, int]) -> None:
        """A CONNECT after forwarded requests on the same connection: the tunnel, as on a
        connection that began with it (the same checks and dial), then the server's relay."""
        cli = self.cli
        try:
            event = cli.next_event()
        except h11.RemoteProtocolError as exc:
            raise _h11_refusal(exc) from None
        if not isinstance(event, h11.EndOfMessage):
            raise Refusal(400, "protocol-error", "CONNECT with a body")
        await self._connect(key)
        self.status = 200
        reply = (
            cli.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
            or b""
        )
        await self._hand_to_relay(reply)

    async def _switch(self, answer: h11.InformationalResponse) -> None:
        """The origin switched to WebSocket: relay both ways, with what each side sent early."""
        cli = self.cli
        self.status = 101
        headers = self._response_headers(answer.headers, 101)
        reply = cli.send(h11.InformationalResponse(status_code=101, headers=headers)) or b""
        await self._hand_to_relay(reply)

    async def _hand_to_relay(self, reply: bytes) -> None:
        """The connection becomes a tunnel (a CONNECT, a WebSocket upgrade): ``reply`` sent
        and logged, then the server's relay, with the bytes each side sent past their heads."""
        self.down += len(reply)
        self._responding = True
        await self._flush()
        self._log("ok", None)
        early, _closed = self.cli.trailing_data
        from_origin = self.up.trailing_data[0] if self.up is not None else b""
        self._unregister()
        self.conn.forward = None
        self.conn.start_relay(reply, early, from_origin)

    # -- socket I/O --------------------------------------------------------------------------
    async def _fill(self) -> None:
        """Wait for the client's next bytes (between requests: nothing else is due)."""
        while not self._recv(True):
            await self._wait([self.conn.fd], [])

    def _recv(self, client: bool) -> bool:
        """One read from the client or the origin into its parser; False if nothing came."""
        sock = self.conn.sock if client else self.origin
        assert sock is not None
        try:
            data = sock.recv(RECV_BYTES)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _Gone("client" if client else "origin", strerror(exc)) from None
        self.conn.active = True
        if client:
            self._client_eof = not data
            self.cli.receive_data(data)
        else:
            self._origin_eof = not data
            assert self.up is not None
            self.up.receive_data(data)
        return True

    # Writes are gathered and sent when the forwarder would otherwise wait: a head and its
    # body's first bytes, or a short response whole, go in one send.
    def _to_origin(self, data: bytes | None) -> None:
        if data:
            self.upstream += len(data)
            self._out_origin += data

    def _to_client(self, data: bytes | None) -> None:
        if data:
            self.down += len(data)
            self._out_client += data

    def _try_send(self, client: bool) -> bool:
        """Send what is due to one side without waiting; whether anything went."""
        buffer = self._out_client if client else self._out_origin
        if not buffer:
            return False
        sock = self.conn.sock if client else self.origin
        assert sock is not None
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _Gone("client" if client else "origin", strerror(exc)) from None
        del buffer[:sent]
        self.conn.active = True
        return sent > 0

    async def _flush(self) -> None:
        """Send everything due, waiting as needed."""
        while self._out_origin or self._out_client:
            if self._try_send(False) | self._try_send(True):
                continue
            writers = [self.origin.fileno()] if self._out_origin and self.origin else []
            if self._out_client:
                writers.append(self.conn.fd)
            await self._wait([], writers)

    async def _wait(
        self, readers: list[int], writers: list[int], timeout: float | None = None
    ) -> None:
        """Until one of the descriptors is ready; past ``timeout`` a 504 (see _pump)."""
        loop = self.conn.server.loop
        future = loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        def expire() -> None:
            if not future.done():
                future.set_exception(
                    Refusal(504, "timeout", f"the origin sent no answer in {timeout:g} s")
                )

        timer = loop.call_later(timeout, expire) if timeout is not None else None

        for fd in readers:
            loop.add_reader(fd, wake)
            self._registered.append((fd, False))
        for fd in writers:
            loop.add_writer(fd, wake)
            self._registered.append((fd, True))
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            self._unregister()

    def _unregister(self) -> None:
        loop = self.conn.server.loop
        for fd, writer in self._registered:
            (loop.remove_writer if writer else loop.remove_reader)(fd)
        self._registered.clear()

    # -- endings -----------------------------------------------------------------------------
    def _refuse(self, refusal: Refusal) -> None:
        conn = self.conn
        if self._responding:
            self._broken(_Gone("client", refusal.reason))
            return
        self.status = refusal.status
        extra: Headers = []
        if refusal.status == 407:
            challenges = conn.server.http_challenges(stale=refusal.stale)
            extra = [(b"Proxy-Authenticate", v.encode()) for v in challenges]
        answer = error_response(
            refusal.status,
            refusal.reason if refusal.status != 407 else "proxy authentication required",
            extra,
        )
        try:
            self.down += conn.sock.send(answer)
        except OSError:
            pass
        self._log(refusal.result, refusal.reason)
        conn.linger(refusal.result, refusal.reason)

    def _broken(self, gone: _Gone) -> None:
        conn = self.conn
        if gone.side == "origin" and not self._responding:
            self._refuse(Refusal(502, "upstream-error", f"origin {conn.dest}: {gone.reason}"))
            return
        result = "client-closed" if gone.side == "client" else "reset"
        self._log(result, f"{gone.side}: {gone.reason}")
        reset_on_close(conn.sock)  # a cut response must not look complete
        conn.close(result, f"{gone.side}: {gone.reason}")

    def _log(self, result: str, reason: str | None) -> None:
        conn = self.conn
        server = conn.server
        server.logger.tunnel(
            client=conn.peer, user=conn.user, proto="http", method=self.method,
            dest=conn.dest, status=self.status, result=result, reason=reason,
            up=self.upstream, down=self.down, duration=server.loop.time() - self.started,
            tls=conn.tls.version if conn.tls is not None else None,
        )  # fmt: skip
        server.metrics.request(self.status, self.upstream, self.down)
        self.method = None
