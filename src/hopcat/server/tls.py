"""TLS under ``hopcat serve``: a ``tls://`` listener's clients and a ``--via`` chain's TLS hops.

Both put TLS sessions (``hopcat.net.tls.TLSLayers``: SSLObjects on memory BIOs, driven by the
loop's readiness callbacks like the rest of the server) between a TCP socket and one end of a
``socketpair``, and give the other end (``outer``) to the Conn as a plain socket. So the
handshake detection, credentials, rules, limits, relay (splice included) and log line are those
of a plain connection: only the hop between the TLS socket and the pair copies, as it must to
encrypt. ``TLSPump`` is that hop, the same both ways round::

    sock --records--> sessions --plaintext--> inner =pair=> outer (the Conn's)
    sock <--records-- sessions <--plaintext-- inner <=pair= outer

- ``Terminator``: a client of a ``tls://HOST:PORT`` listener (an HTTPS proxy, SOCKS over TLS).
  ``sock`` is the client's, with one server-side session whose handshake the Terminator runs;
  ``outer`` is the Conn's client socket, and the client's address comes from the accept.
- ``Bridge``: a ``--via`` chain through TLS hops (``https://``, ``socks5+tls://``). The open
  (``hopcat.server.upstream``) leaves the upstream socket with its client-side sessions, one per
  TLS hop, outermost first, and the plaintext that came with the last proxy reply; ``sock`` is
  that socket, ``outer`` the Conn's target.

Backpressure: plaintext the pair did not take (``held``) stops the reading of ``sock``, and
records waiting for it (``out``, from ``OUT_LIMIT`` on) stop the reading of the pair; each
resumes once its bytes are gone. Plaintext the sessions decrypted already (in a read, or during
the open) waits where no poll can see it, so it is taken at the start and as soon as the pair
has room again.

Ends, both ways, each as soon as every byte before it is delivered: the end of the TLS stream
(close_notify, or a FIN without one, as curl's and hopcat's clients take it) becomes
shutdown(SHUT_WR) of the pair, which the relay passes on as a FIN; the pair's end (the other
side's FIN, or the Conn's refusal's end) becomes the innermost session's close_notify, while the
other direction keeps flowing: the TLS 1.3 half-close. Once both are done, a bridge's sessions
send their close_notify, innermost first (``TLSLayers.close_all``; a listener's one session sent
its own already), and once every record is gone the pump is ``finished``: the Conn waits for
that before it closes, so the last bytes reach ``sock``'s peer before the connection goes.

Failures: a bad record or an alert, or a failing ``sock``, ends the Conn with result ``reset``
naming the side (``client:`` or ``target:``), as a TCP reset does, and a Conn that ends in any
other way than cleanly resets ``sock`` too. Except where nothing was lost (``sock_failed``):
peers that close as soon as they have what they wanted reset the connection when our last
close_notify comes in. For the listener that is once the client had every byte but our
close_notify; for the bridge, once both streams ended.

The listener's handshake: one that fails ends the connection with one log line (result
``tls-error``; ``client-closed`` for a client that leaves during it); the handshake deadline of
the Conn counts from the accept, so a client that never completes the TLS handshake is dropped
by the sweep like any slow one; a first byte that starts no TLS record (a plain client) is
refused at once, naming the protocol it starts.
"""

from __future__ import annotations

import abc
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

READ_BYTES = 256 * 1024  # plaintext from the pair per wakeup, and from the sessions
SOCK_READ_BYTES = 64 * 1024  # records from ``sock`` per read
OUT_LIMIT = 256 * 1024  # records waiting for ``sock`` before the pair stops being read
_TLS_RECORD = 0x16  # the first byte of a TLS handshake record


class TLSPump(abc.ABC):
    """Bytes between ``sock`` (through ``layers``) and the pair; see the module docstring.
    ``outer`` is the Conn's end of the pair; ``who`` names ``sock``'s side in failures."""

    __slots__ = (
        "_reading_inner", "_reading_sock", "_writing_inner", "_writing_sock", "closed",
        "closing", "conn", "established", "fd", "finished", "held", "inner", "inner_ended",
        "layers", "loop", "notify", "notify_sent", "out", "outer", "pair_shut", "sock",
        "tls_ended", "view",
    )  # fmt: skip

    who: str
    # Whether the end sends every session's close_notify (a bridge's hops): a listener's one
    # session sent its own with the pair's EOF already.
    closes_all = True

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, layers: TLSLayers,
        view: memoryview,
    ) -> None:  # fmt: skip
        """``view``: scratch space for the plaintext one callback moves (nothing keeps it
        between callbacks, so pumps may share it). Raises OSError when no pair can be made (out
        of descriptors)."""
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.layers = layers
        self.inner = inner
        self.outer = outer
        self.view = view
        self.conn: Conn | None = None
        self.established = True  # the sessions' handshakes are done (a Terminator runs its own)
        self.tls_ended = False  # the innermost stream ended (close_notify, or a FIN)
        self.held = b""  # plaintext for the pair that it did not take yet
        self.pair_shut = False  # ... and the pair was shut down after every byte before it
        self.out = bytearray()  # records for ``sock`` that it did not take yet
        self.inner_ended = False  # the pair's EOF was read and close_notify made
        self.notify = 0  # the close_notify record's size, at the end of ``out``
        self.notify_sent = False  # ... and every record up to the close_notify sent
        self.closing = False  # both done: every session's close_notify is in ``out``
        self.finished = False  # ... and sent
        self.closed = False
        self._reading_sock = self._writing_sock = False
        self._reading_inner = self._writing_inner = False
        bound_buffers(sock)

    def crashed(self, exc: Exception) -> None:
        if self.conn is not None:
            self.conn.crashed(exc)

    @abc.abstractmethod
    def sock_failed(self, exc: OSError) -> None:
        """``sock`` failed: a read, a write, or the Conn's error watch."""

    def _recv_failed(self, exc: OSError) -> None:
        self.sock_failed(exc)

    def _took(self, data: bytes) -> bool:
        """Whether to pump once the sessions took ``data`` (b"" at a FIN); False stops here (a
        listener's handshake under way, or failed)."""
        return True

    # -- sock -> pair ---------------------------------------------------------------------
    @guarded
    def _on_sock_readable(self) -> None:
        try:
            data = self.sock.recv(SOCK_READ_BYTES)
        except BlockingIOError:
            self._update()  # a Terminator's start reads before any wakeup
            return
        except OSError as exc:
            self._recv_failed(exc)
            return
        if not data:
            self.tls_ended = True
        try:
            self.layers.feed(data)
        except ssl.SSLError as exc:  # an outer session's bad record or alert (a TLS hop's)
            self._fail("reset", f"{self.who}: TLS: {exc.reason or exc}")
            return
        if self._took(data):
            self._pump_plain()
            self._flush_out()
            self._update()

    def _pump_plain(self) -> None:
        """Decrypted plaintext into the pair, until it is full or the sessions have no more."""
        if self.held or self.pair_shut or self.closed:
            return
        layers, view, inner = self.layers, self.view, self.inner
        while True:
            try:
                count = layers.read_into(view)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._fail("reset", f"{self.who}: TLS: {exc.reason or exc}")
                return
            if not count:
                self.tls_ended = True  # close_notify, or a FIN (layers.ragged_end)
                break
            try:
                sent = inner.send(view[:count])
            except BlockingIOError:
                sent = 0
            if sent < count:
                self.held = bytes(view[sent:count])
                break
        self.out += layers.wire_out()  # a read can owe the peer an answer (KeyUpdate)
        if layers.ended:
            self.tls_ended = True
            self._shut_pair()

    def _shut_pair(self) -> None:
        """The TLS stream ended: once the pair has every byte before it, its FIN."""
        if self.held or self.pair_shut:
            return
        self.pair_shut = True
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
        except OSError:
            self.held = b""  # the Conn reset its end: it is ending us too
            return
        self.held = self.held[sent:]
        if not self.held:
            self._pump_plain()  # which passes on an end found behind the held bytes
            self._flush_out()
        self._update()

    # -- pair -> sock ---------------------------------------------------------------------
    @guarded
    def _on_inner_readable(self) -> None:
        view = self.view
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
            self._fail("reset", f"{self.who}: TLS: {exc.reason or exc}")
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
        take is copied into ``out`` (a bulk transfer saves a copy of every byte)."""
        try:
            sent = self.sock.send(records)
        except OSError:
            sent = 0  # full, or failing: _flush_out says which
        self.out += memoryview(records)[sent:]

    @guarded
    def _on_sock_writable(self) -> None:
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
                self.sock_failed(exc)
                return
            del out[:sent]
        if self.inner_ended and not self.out and not self.notify_sent:
            self.notify_sent = True
            self._check_finished()
        elif self.closing and not self.out and not self.finished:
            self._finish()

    def _only_notify_left(self) -> bool:
        return self.inner_ended and len(self.out) <= self.notify

    # -- state ------------------------------------------------------------------------------
    def _update(self) -> None:
        """Register exactly the callbacks the state calls for (level-triggered)."""
        if self.closed:
            return
        loop = self.loop
        want = not self.tls_ended and not self.held and not self.pair_shut
        if want != self._reading_sock:
            self._reading_sock = want
            if want:
                loop.add_reader(self.fd, self._on_sock_readable)
            else:
                loop.remove_reader(self.fd)
        want = bool(self.out)
        if want != self._writing_sock:
            self._writing_sock = want
            if want:
                loop.add_writer(self.fd, self._on_sock_writable)
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
        """Both streams ended: every session's close_notify, then ``finished`` once sent."""
        if self.pair_shut and self.notify_sent and not self.closing:
            self.closing = True
            self.out += self.layers.wire_out()
            if self.closes_all:
                self.out += self.layers.close_all()
            self._flush_out()
            if not self.out and not self.finished:
                self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.closing = self.finished = True
        self.out.clear()
        if self.conn is not None:
            self.conn.tls_done()

    def _fail(self, result: str, reason: str) -> None:
        if not self.closed and self.conn is not None:
            self.conn.close(result, reason)  # which closes us

    def close(self, *, abort: bool) -> None:
        """Called by the Conn as it closes. ``abort``: reset ``sock`` (the tunnel did not end
        cleanly); else what its socket takes now of the records left goes first."""
        if self.closed:
            return
        self.closed = True
        self._reading_sock = self._writing_sock = False
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


class TLSFront:
    """What the TLS clients of one server share: the context (made again by ``reload``) and the
    pumps' scratch ``view``."""

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


class Terminator(TLSPump):
    """One TLS client of a listener; see the module docstring. ``outer`` is the Conn's client."""

    __slots__ = ("cap", "first", "version")

    who = "client"
    # Not again: after a FIN, which OP_IGNORE_UNEXPECTED_EOF takes for the client's
    # close_notify, a second unwrap sends a second close_notify.
    closes_all = False

    def __init__(
        self, loop: asyncio.AbstractEventLoop, front: TLSFront, sock: socket.socket,
        cap: ReceiveCap | None,
    ) -> None:  # fmt: skip
        """Raises OSError when no pair can be made (out of descriptors)."""
        layers = TLSLayers()
        super().__init__(loop, sock, layers, front.view)
        layers.push(front.context, None, label="client", server_side=True)
        self.cap = cap
        self.established = False
        self.version: str | None = None  # for the log line (a failed session forgets it)
        self.first: int | None = None  # the client's first byte, for a failed handshake's reason

    def start(self, conn: Conn) -> None:
        self.conn = conn
        # The ClientHello has usually come by the time we accept: try before waiting.
        self._on_sock_readable()

    def _recv_failed(self, exc: OSError) -> None:
        if self.established:
            self.sock_failed(exc)
        else:
            self._fail("client-closed", f"during the TLS handshake: {strerror(exc)}")

    def _took(self, data: bytes) -> bool:
        if data and self.first is None:
            self.first = data[0]
            if self.first != _TLS_RECORD:  # no use waiting for a record header that won't come
                self._handshake_failed(ssl.SSLError())
                return False
        if self.cap is not None and self.cap.apply(self.sock):
            self.cap = None
        return self.established or self._handshake()

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
            if self.tls_ended:
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
        elif isinstance(exc, ssl.SSLEOFError) or self.tls_ended:
            self._fail("client-closed", "closed during the TLS handshake")
        else:
            self._fail("tls-error", str(failure(exc, "the client")))

    def sock_failed(self, exc: OSError) -> None:
        """Once the client has every byte of ours but the close_notify, its failing socket is
        its end and nothing was lost: a client that closes as soon as it has its answer (curl;
        hopcat under a TLS hop's session, whose innermost session ends first) resets the
        connection when our close_notify comes in. What it sent before is still read (the
        kernel hands it out before the error), and its stream ends there, as at a FIN.
        Otherwise it is a reset."""
        if not (self.established and (self.notify_sent or self._only_notify_left())):
            self._fail("reset", f"client: {strerror(exc)}")
            return
        self.out.clear()
        if not self.pair_shut:
            self.tls_ended = True
            self.layers.feed(b"")
            self._pump_plain()
        self._flush_out()  # which completes the direction towards the client
        self._update()


class Bridge(TLSPump):
    """One client's TLS upstream for ``--via``; see the module docstring. ``outer`` is the
    Conn's target."""

    __slots__ = ()

    who = "target"

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, layers: TLSLayers
    ) -> None:
        """Raises OSError when no pair can be made (out of descriptors)."""
        super().__init__(loop, sock, layers, memoryview(bytearray(READ_BYTES)))

    def start(self, conn: Conn) -> None:
        """The Conn relays from ``outer``: move what the open left (decrypted plaintext, records
        owed to the upstream) and wait for the rest."""
        self.conn = conn
        self.out += self.layers.wire_out()
        self._pump_plain()
        self._flush_out()
        self._update()

    def sock_failed(self, exc: OSError) -> None:
        """Once both streams ended (or all that is left is our close_notify), the upstream's
        failing socket is the proxy's end and lost nothing: a proxy that closes as soon as its
        session is over resets the connection when the last close_notify comes in. Otherwise it
        is the target's reset."""
        if self.closing or (self.tls_ended and self._only_notify_left()):
            self.out.clear()
            self.notify_sent = True
            self._shut_pair()
            self._finish()
            return
        self._fail("reset", f"target: {strerror(exc)}")
