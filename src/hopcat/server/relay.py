"""The established tunnel: two sockets relayed on the event loop's readiness callbacks.

Each direction is a ``Half`` ("up": client -> target, "down": target -> client) that moves bytes
one of two ways:

* splice (Linux): ``splice(src -> pipe)`` then ``splice(pipe -> dst)``. The bytes stay in the
  kernel; the pipe is the only buffer. Pipes come from a ``PipePool`` and go back to it as soon
  as they are empty, so an idle tunnel holds no pipe at all: a pipe belongs to a Half only while
  bytes sit in it because dst was full. This keeps an idle tunnel down to two sockets and a few
  small Python objects, and the pool's pipes (grown to 1 MiB, fewer wakeups per MiB) are reused
  across tunnels instead of created per chunk.
* copy: ``recv_into`` one buffer shared by every tunnel of the engine, ``send`` at once; what dst
  did not take is kept in ``pending`` (a bytes object, only while dst is full). Used when splice
  is missing or refused (the engine's ``Splicer`` probes once: a first splice answered
  EINVAL/ENOSYS switches every tunnel over for good, see ``hopcat.relay.splice``), and for a
  chunk when no pipe can be opened (EMFILE: the tunnel keeps going, just copying).

``pending`` also carries the bytes that must go first: the handshake reply and the target's bytes
that came with an upstream proxy's reply (down), the client's bytes that came after its request
(up).

States of a Half, and the one callback each registers (level-triggered, so a callback that
leaves data behind is simply called again)::

    WRITING --(pending and pipe empty)--> READING --(dst took it all)--> READING
       ^                                     |
       +------------(dst full)---------------+
    READING --(src EOF, nothing in flight)--> DONE   (dst gets shutdown(SHUT_WR))

READING has a reader on src and no writer; WRITING has a writer on dst and no reader on src (that
is the backpressure: a full dst stops reading src). End of stream follows the relay policy of
``hopcat.relay.pump``: a FIN from one side becomes ``shutdown(SHUT_WR)`` towards the other once
every byte before it is delivered, and the other direction keeps going; the tunnel ends when both
Halves are DONE. Every other end is an abort, decided by the owner: an error on either side
(reset, EPIPE, or POLLERR/POLLHUP seen by the engine's error watch while that direction waits
on the other socket), the idle timeout, the grace period over. Both sockets then close with
SO_LINGER 0, so neither peer takes a cut stream for a whole one, and what the kernel still
queues for them is freed at once.

Nothing here blocks, allocates per idle tunnel, or starts a thread.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

from hopcat.relay.splice import MAX_SPLICE_BYTES, SPLICE_FLAGS, Splicer, open_pipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import asyncio
    from typing import Protocol

    class Owner(Protocol):
        """What a Half reports to: the connection (``handler.Conn``)."""

        active: bool  # set on every readiness callback: the idle sweep clears and checks it

        def half_done(self, half: Half) -> None: ...

        def half_failed(self, half: Half, exc: OSError, side: str) -> None: ...

        def crashed(self, exc: Exception) -> None: ...

        def socket_failed(self, fd: int) -> None: ...


IDLE_PIPES_KEPT = 64  # pipes kept open for reuse; more are closed when given back
COPY_BUFFER_BYTES = 256 * 1024
# After a splice that filled this much, more is probably waiting: go round again before
# returning to the event loop (saves a wakeup per chunk on bulk transfers).
BIG_CHUNK_BYTES = 64 * 1024
ROUNDS_PER_WAKEUP = 8

ERROR_EVENTS_PER_WAKEUP = 64
# Unsent bytes a socket's send queue may hold toward a reader that stopped (see bound_buffers).
NOTSENT_LOWAT_BYTES = 512 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 0)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 0)
_HAVE_EPOLL = hasattr(select, "epoll")
_LINGER_RESET = struct.pack("ii", 1, 0)
# Out of descriptors or kernel memory: not this tunnel's fault, fall back to copying.
_NO_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)

# Half states.
IDLE = 0  # not started
READING = 1
WRITING = 2
DONE = 3


class PipePool:
    """Non-blocking pipes (read fd, write fd), handed out empty and given back empty."""

    __slots__ = ("_idle", "created")

    def __init__(self) -> None:
        self._idle: list[tuple[int, int]] = []
        self.created = 0

    def take(self) -> tuple[int, int] | None:
        """An empty pipe, or None when none can be opened (fd limit): the caller copies."""
        if self._idle:
            return self._idle.pop()
        try:
            pipe = open_pipe()
        except OSError as exc:
            if exc.errno in _NO_RESOURCES:
                return None
            raise
        self.created += 1
        return pipe

    def give(self, pipe: tuple[int, int]) -> None:
        """Return a pipe that is empty (the caller guarantees it)."""
        if len(self._idle) < IDLE_PIPES_KEPT:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())


class Engine:
    """What every tunnel on one event loop shares: the loop, the splicer (its probe's answer
    holds for every tunnel: they are all TCP sockets and our pipes), the pipe pool, the copy
    buffer, and the error watch.

    The error watch is an epoll set holding every relayed socket with no events asked for, so it
    reports only POLLERR and POLLHUP (always reported). The relay registers a reader on a Half's
    src only while it may read, so a direction stalled on a full dst does not watch its src, and
    the other direction may be waiting on the other socket: a reset on a stalled tunnel would go
    unnoticed until the stalled peer read, with the tunnel and its kernel buffers kept meanwhile.
    The set's own descriptor sits on the event loop as one reader for all tunnels.
    """

    __slots__ = (
        "_errors", "_view", "_watched", "buffer", "loop", "pool", "receive_cap", "splicer",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        splice: bool = True,
        receive_cap: ReceiveCap | None = None,
    ) -> None:
        self.loop = loop
        self.pool = PipePool()
        self.splicer = Splicer(splice)
        self.receive_cap = receive_cap
        self.buffer = bytearray(COPY_BUFFER_BYTES)
        self._view = memoryview(self.buffer)
        self._errors: select.epoll | None = None
        self._watched: dict[int, Owner] = {}

    def watch(self, fd: int, owner: Owner) -> None:
        """Report POLLERR/POLLHUP on ``fd`` to ``owner.socket_failed`` until ``unwatch``."""
        if not _HAVE_EPOLL:
            return  # elsewhere a reset is seen at the next read or write, as before
        if self._errors is None:
            self._errors = select.epoll()
            self.loop.add_reader(self._errors.fileno(), self._on_errors)
        self._errors.register(fd, 0)
        self._watched[fd] = owner

    def unwatch(self, fd: int) -> None:
        """Before ``fd`` is closed: its number may come back as another tunnel's socket."""
        if self._watched.pop(fd, None) is not None:
            assert self._errors is not None
            try:
                self._errors.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the set

    def _on_errors(self) -> None:
        assert self._errors is not None
        for fd, _events in self._errors.poll(0, ERROR_EVENTS_PER_WAKEUP):
            owner = self._watched.get(fd)
            if owner is None:
                continue
            try:
                owner.socket_failed(fd)
            except Exception as exc:  # a bug: end that tunnel rather than spin on its events
                owner.crashed(exc)

    def close(self) -> None:
        self.pool.close()
        if self._errors is not None:
            self.loop.remove_reader(self._errors.fileno())
            self._errors.close()
            self._errors = None
        self._watched.clear()


class Half:
    """One direction of a tunnel; see the module docstring for the states."""

    __slots__ = (
        "dst",
        "dst_fd",
        "engine",
        "inflight",
        "moved",
        "name",
        "owner",
        "pending",
        "pipe",
        "src",
        "src_fd",
        "state",
        "uncapped",
    )

    def __init__(
        self,
        engine: Engine,
        owner: Owner,
        name: str,
        src: _socket.socket,
        dst: _socket.socket,
        pending: bytes = b"",
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.name = name
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pending = pending
        self.pipe: tuple[int, int] | None = None
        self.inflight = 0  # bytes in self.pipe
        self.moved = 0  # bytes written to dst
        self.state = IDLE
        self.uncapped = engine.receive_cap is not None

    def start(self) -> None:
        """Deliver ``pending`` (if any), then relay. May report to the owner before returning."""
        flushed = self._flush()
        if flushed:
            self._enter_reading()
        elif flushed is not None:
            self._enter_writing()

    # -- state changes: exactly one callback registered per state --------------------------------
    def _enter_reading(self) -> None:
        if self.state == WRITING:
            self.engine.loop.remove_writer(self.dst_fd)
        self.state = READING
        self.engine.loop.add_reader(self.src_fd, self._on_readable)

    def _enter_writing(self) -> None:
        if self.state == READING:
            self.engine.loop.remove_reader(self.src_fd)
        self.state = WRITING
        self.engine.loop.add_writer(self.dst_fd, self._on_writable)

    def _finish(self) -> None:
        """src reached EOF and everything before it is delivered: pass the FIN on."""
        loop = self.engine.loop
        if self.state == READING:
            loop.remove_reader(self.src_fd)
        elif self.state == WRITING:
            loop.remove_writer(self.dst_fd)
        self.state = DONE
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is gone already: nothing to tell it
                self.owner.half_failed(self, exc, "dst")
                return
        self.owner.half_done(self)

    def unregister(self) -> None:
        """Drop this Half's callback and return its pipe; the owner closes the sockets."""
        loop = self.engine.loop
        if self.state == READING:
            loop.remove_reader(self.src_fd)
        elif self.state == WRITING:
            loop.remove_writer(self.dst_fd)
        self.state = DONE
        if self.pipe is not None:
            if self.inflight:
                self.engine.pool.discard(self.pipe)  # holds bytes nobody will read
            else:
                self.engine.pool.give(self.pipe)
            self.pipe = None
            self.inflight = 0

    # -- callbacks ------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        # Invariant: READING, so pending is empty and no pipe holds bytes.
        self.owner.active = True
        try:
            engine = self.engine
            if engine.splicer.usable:
                pipe = engine.pool.take()
                if pipe is not None:
                    self._splice_rounds(pipe)
                    return
            self._copy_round()
        except Exception as exc:  # a bug: end this tunnel, never spin on a level-triggered fd
            self.owner.crashed(exc)

    def _splice_rounds(self, pipe: tuple[int, int]) -> None:
        src_fd, dst_fd, pool = self.src_fd, self.dst_fd, self.engine.pool
        splice_once = self.engine.splicer.splice_once
        for _ in range(ROUNDS_PER_WAKEUP):
            try:
                count = splice_once(src_fd, pipe[1], MAX_SPLICE_BYTES)
            except BlockingIOError:
                pool.give(pipe)
                return
            except OSError as exc:
                pool.give(pipe)
                self.owner.half_failed(self, exc, "src")
                return
            if count is None:
                # This kernel or socket type cannot splice: copy from now on, everywhere.
                pool.give(pipe)
                self._copy_round()
                return
            if count == 0:
                pool.give(pipe)
                self._finish()
                return
            if self.uncapped:
                self._cap_receive_buffer()
            sent = 0
            try:
                while sent < count:
                    sent += os.splice(pipe[0], dst_fd, count - sent, flags=SPLICE_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.moved += sent
                self.pipe, self.inflight = pipe, count - sent
                self.owner.half_failed(self, exc, "dst")
                return
            self.moved += sent
            if sent < count:
                # dst is full: keep the pipe (it holds the rest) and wait for dst instead of src.
                self.pipe, self.inflight = pipe, count - sent
                self._enter_writing()
                return
            if count < BIG_CHUNK_BYTES:
                break
        pool.give(pipe)

    def _copy_round(self) -> None:
        view = self.engine._view
        try:
            count = self.src.recv_into(view)
        except BlockingIOError:
            return
        except OSError as exc:
            self.owner.half_failed(self, exc, "src")
            return
        if count == 0:
            self._finish()
            return
        if self.uncapped:
            self._cap_receive_buffer()
        try:
            sent = self.dst.send(view[:count])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.owner.half_failed(self, exc, "dst")
            return
        self.moved += sent
        if sent < count:
            self.pending = bytes(view[sent:count])
            self._enter_writing()

    def _cap_receive_buffer(self) -> None:
        # After every read until capped: autotuning grows the buffer during a read, at most
        # once per round trip, and a small read may be the one that grows it past the cap.
        cap = self.engine.receive_cap
        assert cap is not None
        if cap.apply(self.src):
            self.uncapped = False

    def _on_writable(self) -> None:
        # Invariant: WRITING; the bytes in flight are in pending (first) or in the pipe.
        self.owner.active = True
        try:
            if self._flush():
                self._enter_reading()
        except Exception as exc:
            self.owner.crashed(exc)

    def _flush(self) -> bool | None:
        """Write pending, then the pipe: True when all is out, False when dst is full, None when
        the write failed (already reported to the owner)."""
        try:
            while self.pending:
                sent = self.dst.send(self.pending)
                self.moved += sent
                self.pending = self.pending[sent:]
            while self.inflight:
                assert self.pipe is not None
                sent = os.splice(self.pipe[0], self.dst_fd, self.inflight, flags=SPLICE_FLAGS)
                self.moved += sent
                self.inflight -= sent
        except BlockingIOError:
            return False
        except OSError as exc:
            self.owner.half_failed(self, exc, "dst")
            return None
        if self.pipe is not None:
            self.engine.pool.give(self.pipe)
            self.pipe = None
        return True


def bound_buffers(sock: _socket.socket) -> None:
    """Bound what a stalled reader pins in this socket's send queue, without fixing the buffer
    sizes (SO_SNDBUF would turn autotuning off and cost bulk throughput): with TCP_NOTSENT_LOWAT
    a write stops once this much is queued and unsent, so a peer that stopped reading leaves at
    most that here, besides what it acknowledged into its own buffer. Measured per stalled tunnel
    on loopback, the server's client-side socket went from 3.8 MiB to 0.7 MiB (128 KiB gave
    0.17 MiB but cost bulk throughput on a loaded machine; 512 KiB did not). The receive side
    is left to autotuning: TCP_WINDOW_CLAMP does not hold once autotuning grows the buffer, and
    SO_RCVBUF would end autotuning. Best effort: where the option is missing nothing changes."""
    if _TCP_NOTSENT_LOWAT:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
        except OSError:
            pass


class ReceiveCap:
    """The most a relayed socket's receive buffer may hold, enforced once autotuning reaches it.

    A tunnel whose reader stopped pins its source socket's whole receive buffer, and autotuning
    grows that buffer with the rate the relay reads, up to net.ipv4.tcp_rmem's maximum (6 to 32
    MiB): splice reads so fast that a stalled tunnel pinned 11-20 MiB on loopback, copying 1-3
    MiB. A fixed SO_RCVBUF from the start would end autotuning for every tunnel, so slow ones
    would advertise the whole cap at once; instead the buffer is left to grow and, the first
    time a read finds it at the cap, fixed there (SO_RCVBUF locks it: autotuning stops for
    that socket). The kernel counts the buffer doubled (payload plus bookkeeping), as getsockopt
    reports it, and so is ``limit``.

    SO_RCVBUF is bounded by net.core.rmem_max (208 KiB on many systems): where half the cap is
    above it, SO_RCVBUFFORCE is used, which needs CAP_NET_ADMIN. ``for_limit`` returns None when
    neither can set it, rather than shrink a fast tunnel's buffer far below the cap."""

    __slots__ = ("limit", "option")

    def __init__(self, limit: int, option: int) -> None:
        self.limit = limit
        self.option = option

    @classmethod
    def for_limit(cls, limit: int) -> ReceiveCap | None:
        half = limit // 2
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for option in (socket.SO_RCVBUF, _SO_RCVBUFFORCE):
                if not option:
                    continue
                try:
                    probe.setsockopt(socket.SOL_SOCKET, option, half)
                except OSError:
                    continue  # EPERM: SO_RCVBUFFORCE without CAP_NET_ADMIN
                if probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= half * 2:
                    return cls(half * 2, option)
            return None
        finally:
            probe.close()

    def apply(self, sock: _socket.socket) -> bool:
        """Fix ``sock``'s buffer at the limit if it reached it; True when nothing is left to do."""
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < self.limit:
                return False
            sock.setsockopt(socket.SOL_SOCKET, self.option, self.limit // 2)
        except OSError:
            pass  # the socket is failing: the relay hears of it at its next read or write
        return True


def reset_on_close(sock: _socket.socket) -> None:
    """Make close() send RST: the peer must not take an aborted tunnel for a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
