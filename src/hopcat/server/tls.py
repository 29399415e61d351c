"""TLS listeners (``tls://HOST:PORT``): an HTTPS proxy and SOCKS over TLS on the same engine.

A ``Terminator`` per client owns the client's TCP socket, the TLS session and one end of a
``socketpair``; the other end is what ``handler.Conn`` takes for its client. So the handshake
detection, credentials, rules, limits, relay and log line are those of a plain listener; only
the client's address is given to the Conn from the accept, not read from its socket. The
session is ``hopcat.net.tls.TLSLayers`` (an SSLObject on memory BIOs, server side), driven by
the loop's readiness callbacks like the rest of the server::

    client --records--> session --plaintext--> inner =pair=> Conn's end --relay--> target
    client <--records-- session <--plaintext-- inner <=pair= Conn's end <--relay-- target

The relay between the pair and the target is the plain one, splice included: only the hop
between the client and the pair copies, as it must to encrypt.

Backpressure: plaintext the pair did not take (``held``) stops the reading of the client, and
records waiting for the client (``out``, from ``OUT_LIMIT`` on) stop the reading of the pair;
each resumes once its bytes are gone. Plaintext already decrypted waits in the session, where
no poll can see it, so it is taken as soon as the pair has room again.

Ends, both ways, each as soon as every byte before it is delivered: the client's close_notify
(or a FIN without one, as curl's and hopcat's clients take it) becomes shutdown(SHUT_WR) of the
pair, which the relay passes on to the target as a FIN; the pair's end (the target's FIN, or
our refusal's end) becomes close_notify towards the client, while the other direction keeps
flowing: the TLS 1.3 half-close. A tunnel ends cleanly only once the session has also sent
its close_notify and every record before it (``finished``): the Conn waits for that before it
closes, so the target's last bytes reach the client before the connection goes.

Failures: a TLS handshake that fails ends the connection with one log line (result
``tls-error``; ``client-closed`` for a client that leaves during it); the handshake deadline of
the Conn counts from the accept, so a client that never completes the TLS handshake is dropped
by the sweep like any slow one; a first byte that starts no TLS record (a plain client) is
refused at once, naming the protocol it starts. A bad record or an alert later is a reset of the
client, as a TCP reset is, except a reset once the client had every byte but our close_notify:
clients that close as soon as they have their answer reset the connection when our close_notify
comes in, and that lost nothing (``client_failed``). A Conn that ends in any other way than
cleanly resets the client too.
"""

from __future__ import annotations

import socket
import ssl

from hopcat.net.tls import TLSLayers, TLSSettings, failure, server_context
from hopcat.proto.detect import detect
from hopcat.server.handler import guarded, strerror
from hopcat.server.relay import bound_buffers, reset_on_close

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio

    from hopcat.server.handler import Conn
    from hopcat.server.relay import ReceiveCap

READ_BYTES = 256 * 1024  # plaintext from the pair per wakeup; records from the client per read
CLIENT_READ_BYTES = 64 * 1024
OUT_LIMIT = 256 * 1024  # records waiting for the client before the pair stops being read
_TLS_RECORD = 0x16  # the first byte of a TLS handshake record


class TLSFront:
    """What the TLS clients of one server share: the context (made again by ``reload``) and a
    scratch buffer for the plaintext each callback moves (nothing keeps it between callbacks)."""

    __slots__ = ("context", "settings", "view")

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.context = _context(settings)
        self.view = memoryview(bytearray(READ_BYTES))

    def reload(self) -> None:
        """Read the certificate files again (SIGHUP): new clients get the new context. A
        UsageError leaves the old one in place."""
        self.context = _context(self.settings)


def _context(settings: TLSSettings) -> ssl.SSLContext:
    context = server_context(settings, flag="--tls-cert")
    # A client's FIN without close_notify ends its stream as close_notify does (as our own
    # client takes it, see hopcat.net.tls), not as a fatal error: that would end the session
    # both ways, so the target's last bytes could not follow, and answer with an alert to a
    # client that has usually gone (its kernel resets the connection).
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


class Terminator:
    """One TLS client; see the module docstring. ``outer`` is the Conn's end of the pair."""

    __slots__ = (
        "_reading_client", "_reading_inner", "_writing_client", "_writing_inner", "cap",
        "client_fin", "closed", "conn", "down_done", "established", "fd", "finished", "first",
        "front", "held", "inner", "inner_ended", "layers", "loop", "notify", "out", "outer", "sock",
        "up_done", "version",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, front: TLSFront, sock: socket.socket,
        cap: ReceiveCap | None,
    ) -> None:  # fmt: skip
        """Raises OSError when no pair can be made (out of descriptors)."""
        self.loop = loop
        self.front = front
        self.sock = sock
        self.fd = sock.fileno()
        self.cap = cap
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer.setblocking(False)
        self.inner = inner
        self.outer = outer
        self.layers = TLSLayers()
        self.layers.push(front.context, None, label="client", server_side=True)
        self.conn: Conn | None = None
        self.established = False
        self.version: str | None = None  # for the log line (a failed session forgets it)
        self.first: int | None = None  # the client's first byte, for a failed handshake's reason
        self.client_fin = False  # the client's FIN was read
        self.held = b""  # plaintext for the pair that it did not take yet
        self.up_done = False  # the client's stream ended and the pair was shut down after it
        self.out = bytearray()  # records for the client that its socket did not take yet
        self.inner_ended = False  # the pair's EOF was read and close_notify made
        self.notify = 0  # the close_notify record's size, at the end of ``out``
        self.down_done = False  # ... and every record up to the close_notify sent
        self.finished = False
        self.closed = False
        self._reading_client = self._writing_client = False
        self._reading_inner = self._writing_inner = False
        bound_buffers(sock)

    def start(self, conn: Conn) -> None:
        self.conn = conn
        # The ClientHello has usually come by the time we accept: try before waiting.
        self._on_client_readable()

    def crashed(self, exc: Exception) -> None:
        if self.conn is not None:
            self.conn.crashed(exc)

    # -- client -> pair -------------------------------------------------------------------
    @guarded
    def _on_client_readable(self) -> None:
        try:
            data = self.sock.recv(CLIENT_READ_BYTES)
        except BlockingIOError:
            self._update()
            return
        except OSError as exc:
            if self.established:
                self.client_failed(exc)
            else:
                self._fail("client-closed", f"during the TLS handshake: {strerror(exc)}")
            return
        if not data:
            self.client_fin = True
        elif self.first is None:
            self.first = data[0]
            if self.first != _TLS_RECORD:  # no use waiting for a record header that won't come
                self._handshake_failed(ssl.SSLError())
                return
        if self.cap is not None and self.cap.apply(self.sock):
            self.cap = None
        self.layers.feed(data)
        if not self.established and not self._handshake():
            return
        self._pump_up()
        self._flush_out()
        self._update()

    def _handshake(self) -> bool:
        """One step of the TLS handshake: True once it is done; False while it needs bytes or
        after it failed (then the connection is closed)."""
        layers = self.layers
        try:
            done = layers.handshake()
        except (ssl.SSLError, ValueError) as exc:
            self.out += layers.wire_out()  # the alert, if the session made one
            self._flush_out()
            self._handshake_failed(exc)
            return False
        self.out += layers.wire_out()
        if not done:
            if self.client_fin:
                self._handshake_failed(ssl.SSLEOFError())
                return False
            self._flush_out()
            self._update()
            return False
        self.established = True
        self.version = layers.innermost.version()
        return True

    def _handshake_failed(self, exc: BaseException) -> None:
        if self.first is None:
            self._fail("client-closed", "closed before the TLS handshake")
        elif self.first != _TLS_RECORD:
            kind = detect(self.first)
            what = f"a {kind} request" if kind else "no TLS record"
            self._fail("tls-error", f"not TLS: the first byte 0x{self.first:02x} starts {what} "
                                    "(a plain client on a tls:// listener?)")  # fmt: skip
        elif isinstance(exc, ssl.SSLEOFError) or self.client_fin:
            self._fail("client-closed", "closed during the TLS handshake")
        else:
            self._fail("tls-error", str(failure(exc, "the client")))

    def _pump_up(self) -> None:
        """Decrypted plaintext into the pair, until it is full or the session has no more."""
        if self.held or self.up_done or self.closed:
            return
        layers, view, inner = self.layers, self.front.view, self.inner
        while True:
            try:
                count = layers.read_into(view)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._fail("reset", f"client: TLS: {exc.reason or exc}")
                return
            if not count:
                self.client_fin = True  # close_notify, or a FIN (layers.ragged_end)
                break
            try:
                sent = inner.send(view[:count])
            except BlockingIOError:
                sent = 0
            if sent < count:
                self.held = bytes(view[sent:count])
                break
        self.out += layers.wire_out()  # a read can owe the client an answer (KeyUpdate)
        if layers.ended:
            self._end_up()

    def _end_up(self) -> None:
        """The client's stream ended: once the pair has every byte before it, its FIN."""
        if self.held or self.up_done:
            return
        self.up_done = True
        try:
            self.inner.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the Conn closed its end: it is ending us too
        self._check_finished()

    @guarded
    def _on_inner_writable(self) -> None:
        try:
            sent = self.inner.send(self.held)
        except BlockingIOError:
            return
        self.held = self.held[sent:]
        if not self.held:
            self._pump_up()
            if self.layers.ended:
                self._end_up()
            self._flush_out()
        self._update()

    # -- pair -> client -------------------------------------------------------------------
    @guarded
    def _on_inner_readable(self) -> None:
        view = self.front.view
        try:
            count = self.inner.recv_into(view)
        except BlockingIOError:
            return
        except OSError:
            count = 0  # the Conn reset its end: it is ending us too
        layers = self.layers
        try:
            if count:
                layers.write(view[:count])
            else:
                self.inner_ended = True
                self.out += layers.wire_out()
                layers.close_notify()
        except ssl.SSLError as exc:
            self._fail("reset", f"client: TLS: {exc.reason or exc}")
            return
        records = layers.wire_out()
        if not count:
            self.notify = len(records)
        if self.out:
            self.out += records
        else:
            self._send_first(records)
        self._flush_out()
        self._update()

    def _send_first(self, records: bytes) -> None:
        """Records when none wait before them: sent as they are, only what the socket did not
        take is copied into ``out`` (a bulk download saves a copy of every byte)."""
        try:
            sent = self.sock.send(records)
        except OSError:
            sent = 0  # full, or failing: _flush_out says which
        self.out += memoryview(records)[sent:]

    @guarded
    def _on_client_writable(self) -> None:
        self._flush_out()
        self._update()

    def _flush_out(self) -> None:
        out = self.out
        while out and not self.closed:
            try:
                sent = self.sock.send(out)
            except BlockingIOError:
                return
            except OSError as exc:
                self.client_failed(exc)
                return
            del out[:sent]
        if self.inner_ended and not self.out and not self.down_done:
            self.down_done = True
            self._check_finished()

    def _only_notify_left(self) -> bool:
        return self.inner_ended and len(self.out) <= self.notify

    def client_failed(self, exc: OSError) -> None:
        """The client's socket failed: a read, a write, or the error watch. Once it has every
        byte of ours but the close_notify, that is its end and nothing was lost: a client that
        closes as soon as it has its answer (curl; hopcat under a TLS hop's session, whose
        innermost session ends first) resets the connection when our close_notify comes in.
        What it sent before is still read (the kernel hands it out before the error), and
        its stream ends there, as at a FIN. Otherwise it is a reset."""
        if not (self.established and (self.down_done or self._only_notify_left())):
            self._fail("reset", f"client: {strerror(exc)}")
            return
        self.out.clear()
        if not self.up_done:
            self.client_fin = True
            self.layers.feed(b"")
            self._pump_up()
        self._flush_out()  # which completes the down direction
        self._update()

    # -- state ------------------------------------------------------------------------------
    def _update(self) -> None:
        """Register exactly the callbacks the state calls for (level-triggered)."""
        if self.closed:
            return
        loop = self.loop
        want = not self.client_fin and not self.held and not self.up_done
        if want != self._reading_client:
            self._reading_client = want
            if want:
                loop.add_reader(self.fd, self._on_client_readable)
            else:
                loop.remove_reader(self.fd)
        want = bool(self.out)
        if want != self._writing_client:
            self._writing_client = want
            if want:
                loop.add_writer(self.fd, self._on_client_writable)
            else:
                loop.remove_writer(self.fd)
        want = self.established and not self.inner_ended and len(self.out) < OUT_LIMIT
        if want != self._reading_inner:
            self._reading_inner = want
            if want:
                loop.add_reader(self.inner.fileno(), self._on_inner_readable)
            else:
                loop.remove_reader(self.inner.fileno())
        want = bool(self.held)
        if want != self._writing_inner:
            self._writing_inner = want
            if want:
                loop.add_writer(self.inner.fileno(), self._on_inner_writable)
            else:
                loop.remove_writer(self.inner.fileno())

    def _check_finished(self) -> None:
        if self.up_done and self.down_done and not self.finished:
            self.finished = True
            if self.conn is not None:
                self.conn.tls_done()

    def _fail(self, result: str, reason: str) -> None:
        if not self.closed and self.conn is not None:
            self.conn.close(result, reason)  # which closes us

    def close(self, *, abort: bool) -> None:
        """Called by the Conn as it closes. ``abort``: reset the client (the tunnel did not end
        cleanly); else what the client's socket takes now of the records left goes first."""
        if self.closed:
            return
        self.closed = True
        self._reading_client = self._writing_client = False
        self._reading_inner = self._writing_inner = False
        loop = self.loop
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        loop.remove_reader(self.inner.fileno())
        loop.remove_writer(self.inner.fileno())
        if abort:
            reset_on_close(self.sock)
        elif self.out:
            try:
                self.sock.send(self.out)
            except OSError:
                pass
        self.sock.close()
        self.inner.close()
