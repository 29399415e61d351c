"""A ``--via`` chain through TLS hops (``https://``, ``socks5+tls://``): the client side of
``hopcat.server.tls``.

The open (``hopcat.server.upstream``) leaves the upstream socket with its TLS sessions
(``hopcat.net.tls.TLSLayers``, one per TLS hop, outermost first) and the plaintext that came
with the last proxy reply. A ``Bridge`` owns that socket, the sessions and one end of a
``socketpair``; the other end is the Conn's target, so the relay between the client and the pair
is the plain one, splice included, and only the hop between the pair and the upstream copies::

    client --relay--> Conn's target =pair=> inner --plaintext--> sessions --records--> upstream
    client <--relay-- Conn's target <=pair= inner <--plaintext-- sessions <--records-- upstream

Backpressure: plaintext the pair did not take (``held``) stops the reading of the upstream, and
records waiting for the upstream (``out``, from ``OUT_LIMIT`` on) stop the reading of the pair;
each resumes once its bytes are gone. Plaintext the sessions decrypted already (during the open,
or in a read) waits where no poll can see it, so it is taken at the start and whenever the pair
has room again.

Ends, both ways, each once every byte before it is delivered: the pair's EOF (the client's FIN,
passed on by the relay) becomes the innermost session's close_notify towards the upstream, while
the other direction keeps flowing (the TLS 1.3 half-close); the innermost session's end (the
target's FIN as the last proxy passes it on: close_notify, or a FIN without one) becomes
shutdown(SHUT_WR) of the pair, which the relay passes on to the client. Once both are done, every
session sends its close_notify, innermost first (``TLSLayers.close_all``), and the bridge is
``finished``: the Conn waits for that before it closes cleanly.

Failures in the relay are the target's, as on a plain upstream: a reset, a bad record or an
alert ends the Conn with result ``reset`` and the upstream is reset, except once both streams
have ended: a proxy that closes as soon as its session is over resets the connection when the
last close_notify comes in, and that lost nothing.
"""

from __future__ import annotations

import socket
import ssl

from hopcat.server.handler import guarded, strerror
from hopcat.server.relay import bound_buffers, reset_on_close

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio

    from hopcat.net.tls import TLSLayers
    from hopcat.server.handler import Conn

READ_BYTES = 256 * 1024  # plaintext from the pair per wakeup, and from the sessions
UPSTREAM_READ_BYTES = 64 * 1024
OUT_LIMIT = 256 * 1024  # records waiting for the upstream before the pair stops being read


class Bridge:
    """One client's TLS upstream; see the module docstring. ``outer`` is the Conn's target."""

    __slots__ = (
        "_reading_inner", "_reading_sock", "_writing_inner", "_writing_sock", "closed",
        "closing", "conn", "down_done", "fd", "finished", "held", "inner", "inner_ended",
        "layers", "loop", "notify", "out", "outer", "sock", "up_done", "upstream_ended", "view",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, layers: TLSLayers
    ) -> None:
        """Raises OSError when no pair can be made (out of descriptors)."""
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.layers = layers
        self.inner = inner
        self.outer = outer
        self.view = memoryview(bytearray(READ_BYTES))
        self.conn: Conn | None = None
        self.upstream_ended = False  # the innermost stream ended (close_notify, or a FIN)
        self.held = b""  # plaintext for the pair that it did not take yet
        self.down_done = False  # ... and the pair was shut down after every byte before it
        self.out = bytearray()  # records for the upstream that its socket did not take yet
        self.inner_ended = False  # the pair's EOF was read and close_notify made
        self.notify = 0  # the close_notify record's size, at the end of ``out``
        self.up_done = False  # ... and every record up to the close_notify sent
        self.closing = False  # both done: every session's close_notify is in ``out``
        self.finished = False  # ... and sent
        self.closed = False
        self._reading_sock = self._writing_sock = False
        self._reading_inner = self._writing_inner = False
        bound_buffers(sock)

    def start(self, conn: Conn) -> None:
        """The Conn relays from ``outer``: move what the open left (decrypted plaintext, records
        owed to the upstream) and wait for the rest."""
        self.conn = conn
        self.out += self.layers.wire_out()
        self._pump_down()
        self._flush_out()
        self._update()

    def crashed(self, exc: Exception) -> None:
        if self.conn is not None:
            self.conn.crashed(exc)

    # -- upstream -> pair -----------------------------------------------------------------
    @guarded
    def _on_sock_readable(self) -> None:
        try:
            data = self.sock.recv(UPSTREAM_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.upstream_failed(exc)
            return
        self.layers.feed(data)
        self._pump_down()
        self._flush_out()
        self._update()

    def _pump_down(self) -> None:
        """Decrypted plaintext into the pair, until it is full or the sessions have no more."""
        if self.held or self.down_done or self.closed:
            return
        layers, view, inner = self.layers, self.view, self.inner
        while True:
            try:
                count = layers.read_into(view)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self._fail(f"target: TLS: {exc.reason or exc}")
                return
            if not count:
                self.upstream_ended = True
                break
            try:
                sent = inner.send(view[:count])
            except BlockingIOError:
                sent = 0
            if sent < count:
                self.held = bytes(view[sent:count])
                break
        self.out += layers.wire_out()  # a read can owe the upstream an answer (KeyUpdate)
        if layers.ended:
            self.upstream_ended = True
            self._end_down()

    def _end_down(self) -> None:
        if self.held or self.down_done:
            return
        self.down_done = True
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
            self._pump_down()
            if self.layers.ended:
                self._end_down()
            self._flush_out()
        self._update()

    # -- pair -> upstream -----------------------------------------------------------------
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
            self._fail(f"target: TLS: {exc.reason or exc}")
            return
        records = layers.wire_out()
        if not count:
            self.notify = len(records)
        self.out += records
        self._flush_out()
        self._update()

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
                self.upstream_failed(exc)
                return
            del out[:sent]
        if self.inner_ended and not self.out and not self.up_done:
            self.up_done = True
            self._check_finished()
        elif self.closing and not self.out and not self.finished:
            self._finish()

    def upstream_failed(self, exc: OSError) -> None:
        """The upstream socket failed: a read, a write, or the error watch. Once both streams
        ended (or all that is left is our close_notify) that is the proxy's end and lost
        nothing; otherwise it is the target's reset."""
        if self.closing or (self.upstream_ended and self.inner_ended and len(self.out) <= self.notify):
            self.out.clear()
            self.up_done = True
            self._end_down()
            self._finish()
            return
        self._fail(f"target: {strerror(exc)}")

    # -- state ------------------------------------------------------------------------------
    def _update(self) -> None:
        """Register exactly the callbacks the state calls for (level-triggered)."""
        if self.closed:
            return
        loop = self.loop
        want = not self.upstream_ended and not self.held and not self.finished
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
        want = not self.inner_ended and len(self.out) < OUT_LIMIT
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
        if self.up_done and self.down_done and not self.closing:
            self.closing = True
            self.out += self.layers.wire_out()
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

    def _fail(self, reason: str) -> None:
        if not self.closed and self.conn is not None:
            self.conn.close("reset", reason)  # which closes us

    def close(self, *, abort: bool) -> None:
        """Called by the Conn as it closes. ``abort``: reset the upstream (the tunnel did not end
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
