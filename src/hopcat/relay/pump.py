"""The relay: stdin -> socket ("up") and socket -> stdout ("down") in one poll loop, no threads.

Each direction is a Flow that moves bytes one of three ways, chosen per direction at start:

* ``splice``: one end is a pipe (the ProxyCommand case: ssh hands us two pipes) and the other a
  pipe or socket. ``splice(2)`` moves pages between them inside the kernel; the pipe itself is the
  buffer, so nothing is held in userspace.
* ``splice via pipe``: both ends are sockets (library and server use). An intermediate pipe of
  our own sits in the middle: socket -> pipe, pipe -> socket.
* ``copy``: anything else (a tty, a regular file, a platform without splice, or a kernel that
  refuses the first splice: see ``hopcat.relay.splice``): read into a 256 KiB buffer, write it
  out. Through TLS (a TLS hop, ``--tls``) the network side is a ``TLSWire``: records are
  decrypted and encrypted on memory BIOs (``hopcat.net.tls``), up to 256 KiB per wakeup.

A download spliced from a socket coalesces its wakeups once it is a bulk transfer: after one
wakeup moved ``COALESCE_TRIGGER_BYTES``, the socket's SO_RCVLOWAT makes poll wait for
``COALESCE_BYTES`` (or the peer's FIN or an error), and a tail below that is flushed
``COALESCE_WAIT_S`` after the last splice even while stdin keeps the loop busy; a flush that
finds less than the trigger goes back to one wakeup per segment. Interactive traffic never
coalesces, and a burst's tail waits at most 2 ms.

End-of-stream policy (the reason this tool exists; nc and ncat get parts of it wrong):

* stdin EOF: once every byte read from stdin has been sent, ``shutdown(SHUT_WR)`` the socket so
  the peer sees our FIN, and keep delivering socket -> stdout, so a request/response exchange
  still gets its answer. Through TLS, the innermost session's close_notify instead (a FIN under
  a TLS hop's session would be a protocol violation): the TLS 1.3 half-close; a TLS 1.2 peer
  answers with its own close_notify after what it still had to send. A peer's FIN without
  close_notify ends the stream too (``-v`` says it may be truncated: only the protocol inside
  can tell); an alert or a bad record is an error (exit 82). ``no_shutdown`` skips the FIN
  (microsocks and tinyproxy tear the whole tunnel down on a client FIN). ``quit_after_eof_s``
  (nc's -q) exits that long after stdin EOF.
* peer FIN: once every byte received has reached stdout, close stdout, then keep sending stdin
  for as long as it has data ready, and exit as soon as it is idle or at its EOF. ssh never
  closes our stdin, and waiting for its EOF is the ProxyCommand hang people hit with nc and old
  ncat; leaving ready bytes behind is the silent loss of ``hopcat host port < file`` against a
  server that half-closes first and then reads. "Idle" means: nothing of stdin's is held by us
  (copy mode: our buffer is empty; splice via pipe: our pipe is empty; splice: nothing is held
  anyway, but a send that waits for room in the socket is not idle) and a poll with timeout 0
  finds stdin not readable. A regular file or /dev/null is always readable, so it is sent to its
  end; a pipe, socket or tty is sent for as long as its writer keeps it non-empty. A writer that
  pauses after the peer's FIN loses the race (it gets EPIPE): ``keep_sending`` waits for stdin's
  EOF instead, for servers that half-close and still read.
* If the peer stops reading too (RST, EPIPE) while stdin still has bytes, that is an error
  naming how many bytes were sent and how many of stdin's were left: never a quiet exit 0.
* stdout's reader gone (EPIPE) is an error naming the bytes delivered, unless stdin has ended
  too: at its EOF, or its writer gone with nothing unread within ``WRITER_LEFT_GRACE_MS``.
  Then whoever ran us closed both ends (ssh at its exit closes them one after the other, in
  either order) and the session ends quietly.
* POLLHUP without POLLIN (a pipe whose writer left) still means "read until EOF": the read, not
  the poll flag, decides that the stream ended.
* ``idle_timeout_s`` (-w): no byte moved either way for that long -> HopcatTimeoutError. Any
  timeout up to the largest float works: poll() waits at most ``MAX_POLL_MS`` at a time.

Idle waits are always in poll(): a flow never asks poll for an event it cannot act on (a full
pipe of our own stops asking for its socket's POLLIN; a splice that could not move asks whether
the destination is full), so "ready but nothing moved" cannot repeat.

State of the process is restored on every way out, exceptions included (the CLI turns signals
into exceptions for this): O_NONBLOCK on stdin and stdout, which share their open file
description with the shell and whoever else holds the pipe, is put back as found, stdout's
before it is closed at the peer's EOF. Pipes grown with F_SETPIPE_SZ stay grown.

Errors: EAGAIN waits for the next poll; EINTR is retried by Python (PEP 475); partial writes keep
the rest buffered; EPIPE/ECONNRESET become RelayError naming the side and how many bytes were not
delivered. A byte that was read is either written or reported, never dropped silently.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket
import errno
import os
import select
import stat
import time

from hopcat.errors import HopcatError, HopcatTimeoutError, RelayError
from hopcat.relay.splice import (
    HAVE_SPLICE,
    MAX_SPLICE_BYTES,
    SPLICE_FLAGS,
    Splicer,
    grow_pipe,
    open_pipe,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hopcat.net.tls import TLSLayers

COPY_BUFFER_BYTES = 256 * 1024
# Coalescing a bulk download (see Flow.coalesce_from): once one wakeup finds
# COALESCE_TRIGGER_BYTES, poll wakes us only at COALESCE_BYTES queued (SO_RCVLOWAT), at the
# peer's FIN or error, or COALESCE_WAIT_S after the last splice, whichever is first; a wait that
# ends with less than the trigger queued ends the coalescing.
COALESCE_TRIGGER_BYTES = 32 * 1024
COALESCE_BYTES = 256 * 1024
COALESCE_WAIT_S = 0.002
MAX_POLL_MS = 2**31 - 1  # poll() takes a C int: longer waits are done in several polls

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
WRITER_LEFT_GRACE_MS = 100


class RelayOptions:
    __slots__ = (
        "close_output",
        "idle_timeout_s",
        "keep_sending",
        "no_shutdown",
        "quit_after_eof_s",
        "read_stdin",
        "splice",
    )

    def __init__(
        self,
        *,
        no_shutdown: bool = False,
        keep_sending: bool = False,
        quit_after_eof_s: float | None = None,
        idle_timeout_s: float | None = None,
        read_stdin: bool = True,
        close_output: bool = True,
        splice: bool = True,
    ) -> None:
        self.close_output = close_output
        self.splice = splice  # False: copy even where splice(2) works (what other platforms get)
        self.no_shutdown = no_shutdown
        self.keep_sending = keep_sending
        self.quit_after_eof_s = quit_after_eof_s
        self.idle_timeout_s = idle_timeout_s
        self.read_stdin = read_stdin


class RelayStats:
    __slots__ = ("bytes_down", "bytes_up", "path_down", "path_up", "seconds")

    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.path_up = ""
        self.path_down = ""
        self.seconds = 0.0


def fd_kind(fd: int) -> str:
    """'pipe', 'socket', 'tty', 'file' or 'other' (e.g. /dev/null); 'closed' if fd is not open."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode) and os.isatty(fd):
        return "tty"
    return "other"


def _is_writable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


class Flow:
    """One direction: bytes from ``src`` to ``dst`` until src's EOF has been delivered.

    Invariant: ``buffered`` (copy mode: bytes in our buffer; pipe mode: bytes sitting in our
    intermediate pipe) are bytes read from src and not yet written to dst. ``finished`` is True
    only once src has reported EOF and ``buffered`` is zero.
    """

    def __init__(
        self, name: str, src: int, dst: int, mode: str, tls: TLSWire | None = None
    ) -> None:
        self.name = name
        # The network side through TLS sessions ("up" writes to it, "down" reads from it):
        # those bytes go through the sessions, so both flows copy.
        self.tls = tls
        self.src = src
        self.dst = dst
        self.mode = mode  # "splice", "splice via pipe" or "copy"
        self._splicer = Splicer(mode != "copy")
        self.src_eof = False
        self.finished = False
        self.moved = 0  # bytes written to dst
        self.buffered = 0
        self.waiting_for_dst = False  # splice mode: last EAGAIN was dst being full
        # Splice via pipe: our pipe refused more. Its capacity is counted in pages, not bytes
        # (a socket's small segments take a page each), so only the refusal tells.
        self.pipe_full = False
        self._src_socket: socket.socket | None = None  # set by coalesce_from()
        self.coalescing = False
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._start = 0
        self._pipe_r = -1
        self._pipe_w = -1
        # Splice mode waits on exactly one of these; built once, so the poll loop can tell
        # "interest unchanged" by identity.
        self._wants_src = ((src, select.POLLIN),)
        self._wants_dst = ((dst, select.POLLOUT),)
        if mode == "copy":
            self._use_copy()
        elif mode == "splice via pipe":
            self._pipe_r, self._pipe_w = open_pipe()

    def _use_copy(self) -> None:
        """Copy from now on: asked for, or the first splice was refused (so nothing is held)."""
        self._close_pipe()
        self.mode = "copy"
        self._buffer = bytearray(COPY_BUFFER_BYTES)
        self._view = memoryview(self._buffer)

    def _close_pipe(self) -> None:
        for fd in (self._pipe_r, self._pipe_w):
            if fd >= 0:
                os.close(fd)
        self._pipe_r = self._pipe_w = -1

    def close(self) -> None:
        self._close_pipe()
        if self._view is not None:
            self._view.release()
            self._view = None

    def interest(self) -> Sequence[tuple[int, int]]:
        """(fd, poll events) this flow is waiting for right now."""
        if self.finished:
            return []
        if self.mode == "splice":
            return self._wants_dst if self.waiting_for_dst else self._wants_src
        wanted: list[tuple[int, int]] = []
        tls = self.tls if self.name == "up" else None
        # A write stalled by a TLS 1.2 renegotiation waits for the down flow's reads, not POLLOUT.
        if (self.buffered and not (tls and tls.stalled)) or (tls and tls.out):
            wanted.append((self.dst, select.POLLOUT))
        has_room = not self.buffered if self.mode == "copy" else not self.pipe_full
        if not self.src_eof and has_room:
            wanted.append((self.src, select.POLLIN))
        return wanted

    def holds_bytes(self) -> bool:
        """True while bytes of src's wait for room in dst (so src is not idle)."""
        return bool(self.buffered) or self.waiting_for_dst or self._records_held()

    def _records_held(self) -> bool:
        """Up through TLS: records made from src's bytes wait for room in the socket."""
        return self.tls is not None and self.name == "up" and bool(self.tls.out)

    def on_ready(self, fd: int) -> None:
        """Move what can be moved without blocking. Raises OSError from the side that failed."""
        if self.finished:
            return
        if self.mode == "splice":
            self._splice_direct()
        elif self.mode == "copy":
            if fd == self.dst and self._records_held():
                self.tls.flush()  # type: ignore[union-attr]
            if fd == self.src and not self.buffered and not self.src_eof:
                self._copy_read()
            if self.buffered:
                self._copy_write()
        else:
            if fd == self.src and not self.src_eof:
                self._splice_in()
            if self.buffered:
                self._splice_out()
        if self.src_eof and not self.buffered and not self._records_held():
            self.finished = True

    # -- splice: one end is a pipe --------------------------------------------------------------
    def _splice_direct(self) -> None:
        # One splice per wakeup: poll is level-triggered and reports what is left, and stopping
        # here saves the EAGAIN probe (a splice plus a poll) that would otherwise end every turn.
        self.waiting_for_dst = False
        try:
            count = self._splicer.splice_once(self.src, self.dst, MAX_SPLICE_BYTES)
        except BlockingIOError:
            # Ambiguous: src empty or dst full. Ask dst, so we never spin on a writable dst.
            self.waiting_for_dst = not _is_writable_now(self.dst)
            return
        if count is None:
            self._use_copy()  # this kernel/fd pair cannot splice: copy instead
            return
        if count == 0:
            self.src_eof = True
        self.moved += count
        if self._src_socket is not None and (count >= COALESCE_TRIGGER_BYTES) != self.coalescing:
            self._set_coalescing(not self.coalescing)

    def coalesce_from(self, sock: socket.socket) -> None:
        """Let a bulk download from ``sock`` wake us per COALESCE_BYTES instead of per segment.

        A proxy that writes small chunks (microsocks: 1 KiB at a time) otherwise wakes us for
        every segment, and a wakeup's fixed cost in Python is most of our CPU per GiB. Only a
        flow that already moved a large chunk in one wakeup coalesces, so interactive traffic
        (ssh keystrokes) never waits; a burst's tail waits at most COALESCE_WAIT_S.
        """
        self._src_socket = sock

    def _set_coalescing(self, on: bool) -> None:
        assert self._src_socket is not None
        try:
            self._src_socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVLOWAT, COALESCE_BYTES if on else 1
            )
        except OSError:
            self._src_socket = None  # not a socket that takes it: wake per segment
            on = False
        self.coalescing = on

    def flush_coalesced(self) -> None:
        """The bounded wait is over: move what is queued below the low-water mark."""
        before = self.moved
        self.on_ready(self.src)
        if self.coalescing and self.moved - before < COALESCE_TRIGGER_BYTES:
            self._set_coalescing(False)  # the burst is over, or the flow is slow

    # -- splice via our own pipe: socket -> pipe -> socket --------------------------------------
    def _splice_in(self) -> None:
        try:
            count = self._splicer.splice_once(self.src, self._pipe_w, MAX_SPLICE_BYTES)
        except BlockingIOError:
            # src was reported readable, so with bytes in our pipe this is the pipe being full:
            # stop asking for src until _splice_out makes room, or poll would return at once.
            self.pipe_full = self.buffered > 0
            return
        if count is None:
            self._use_copy()  # refused before any byte went into the pipe: copy instead
            return
        if count == 0:
            self.src_eof = True
        self.buffered += count

    def _splice_out(self) -> None:
        while self.buffered:
            try:
                count = os.splice(self._pipe_r, self.dst, self.buffered, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return
            self.buffered -= count
            self.moved += count
            self.pipe_full = False

    # -- copy: through a userspace buffer -------------------------------------------------------
    def _copy_read(self) -> None:
        assert self._view is not None
        try:
            if self.tls is not None and self.name == "down":
                count = self.tls.recv_into(self._view)
            else:
                count = os.readv(self.src, [self._view])
        except BlockingIOError:
            return
        except OSError as exc:
            # A pty whose other side closed reports EIO: that is its end of file.
            if exc.errno != errno.EIO:
                raise
            count = 0
        if count == 0:
            self.src_eof = True
        self._start = 0
        self.buffered = count

    def _copy_write(self) -> None:
        assert self._view is not None
        while self.buffered:
            chunk = self._view[self._start : self._start + self.buffered]
            try:
                if self.tls is not None and self.name == "up":
                    count = self.tls.send(chunk)
                else:
                    count = os.write(self.dst, chunk)
            except BlockingIOError:
                return
            self._start += count
            self.buffered -= count
            self.moved += count


class TLSStreamError(OSError):
    """A TLS session failed mid-stream (an alert, a bad record): exit 82 (76 for a TLS
    proxy's session), not 74. ``who``: whose session it was (``TLSLayers.labels``)."""

    who = ""


class TLSWire:
    """The network side of a relay through TLS sessions: ``recv_into`` gives plaintext,
    ``send`` takes it; records the socket could not take yet wait in ``out`` (one chunk's worth
    at most: ``send`` takes nothing more until they are gone)."""

    __slots__ = ("_ssl", "layers", "more", "out", "sock", "stalled")

    def __init__(self, sock: socket.socket, layers: TLSLayers) -> None:
        import ssl

        self._ssl = ssl  # for its exceptions; imported only for a TLS relay
        self.sock = sock
        self.layers = layers
        self.out = memoryview(b"")
        # Records may wait in the sessions, where poll cannot see them: the last read filled
        # its buffer, or they came with the handshake's last flight (a client's request).
        self.more = layers.buffered()
        # A write refused until the peer's handshake messages are read: a TLS 1.2 peer
        # renegotiating (SSL_write wants to read). Cleared by every read.
        self.stalled = False

    def recv_into(self, view: memoryview) -> int:
        ssl = self._ssl
        self.more = self.stalled = False
        try:
            while True:
                try:
                    count = self.layers.read_into(view)
                    break
                except ssl.SSLWantReadError:
                    # A read can owe the peer an answer (a renegotiation's next message): it
                    # goes out before we wait for the peer, or both sides would wait.
                    self._queue(self.layers.wire_out())
                    self.layers.feed(self.sock.recv(COPY_BUFFER_BYTES))  # BlockingIOError: wait
            self._queue(self.layers.wire_out())  # ... or an answer to a KeyUpdate
        except ssl.SSLError as exc:
            raise self._failure(exc) from None
        # A full buffer may leave records behind; an end seen after some bytes is told next.
        self.more = count == len(view) or self.layers.end_pending()
        return count

    def send(self, view: memoryview) -> int:
        if self.out:
            self.flush()
            if self.out:
                raise BlockingIOError
        try:
            count = self.layers.write(view)
            self.out = memoryview(self.layers.wire_out())
        except self._ssl.SSLWantReadError:
            self.stalled = True  # the same bytes are offered again after the next read
            self._queue(self.layers.wire_out())
            raise BlockingIOError from None
        except self._ssl.SSLError as exc:
            raise self._failure(exc) from None
        self.flush()
        return count

    def _queue(self, records: bytes) -> None:
        if records:
            self.out = memoryview(bytes(self.out) + records)
            self.flush()

    def _failure(self, exc: BaseException) -> TLSStreamError:
        from hopcat.net.tls import reason_text

        reason = reason_text(exc) if isinstance(exc, self._ssl.SSLError) else str(exc)
        error = TLSStreamError(errno.EPROTO, reason)
        error.who = self.layers.failed or self.layers.labels[-1]
        return error

    def flush(self) -> None:
        """Send what the socket takes now of the records waiting."""
        try:
            while self.out:
                self.out = self.out[self.sock.send(self.out) :]
        except BlockingIOError:
            pass

    def close_notify(self) -> None:
        """The half-close: the innermost session's close_notify, after every record before it."""
        self.layers.close_notify()
        self.more = self.more or self.layers.buffered()  # it decrypts what was here: see there
        self.out = memoryview(bytes(self.out) + self.layers.wire_out())
        self.flush()


def close_tls(sock: socket.socket, layers: TLSLayers) -> None:
    """Before ``sock`` closes: every TLS session's close_notify, if the socket takes it now."""
    try:
        sock.setblocking(False)
        sock.send(layers.close_all())
    except OSError:
        pass  # the peer is gone or not reading: it learns of the end from the close anyway


def choose_mode(src_kind: str, dst_kind: str, allow_splice: bool = True) -> str:
    if not (HAVE_SPLICE and allow_splice):
        return "copy"
    spliceable = ("pipe", "socket")
    if src_kind in spliceable and dst_kind in spliceable:
        return "splice" if "pipe" in (src_kind, dst_kind) else "splice via pipe"
    return "copy"


def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting for POLLOUT when fd is non-blocking and full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()


def relay(
    sock: socket.socket,
    in_fd: int = 0,
    out_fd: int = 1,
    *,
    options: RelayOptions | None = None,
    initial_down: bytes = b"",
    trace: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    layers: TLSLayers | None = None,
) -> RelayStats:
    """Relay in_fd -> sock and sock -> out_fd under the module's end-of-stream policy.

    ``layers``: the TLS sessions on ``sock`` (TLS hops, TLS to the target); the relay reads and
    writes through the innermost.

    ``initial_down`` holds bytes the peer sent before the relay started (a proxy's trailing data);
    they reach out_fd before anything else. Returns byte counts; raises RelayError or
    HopcatTimeoutError. Does not close ``sock`` or in_fd; closes out_fd once the peer's EOF has
    been delivered when ``options.close_output`` is set (so the reader sees EOF right then).
    Whatever ends it, in_fd and out_fd get back the O_NONBLOCK state they came with.
    """
    opts = options or RelayOptions()
    stats = RelayStats()
    started = clock()
    sock_fd = sock.fileno()
    in_kind = fd_kind(in_fd) if opts.read_stdin else "closed"
    out_kind = fd_kind(out_fd)
    for fd, kind in ((in_fd, in_kind), (out_fd, out_kind)):
        if kind == "pipe":
            grow_pipe(fd)

    if initial_down:
        try:
            write_all(out_fd, initial_down)
        except OSError as exc:
            raise RelayError(f"writing to stdout: {os.strerror(exc.errno or 0).lower()}") from None
    tls = TLSWire(sock, layers) if layers else None
    net_kind = "tls" if tls is not None else "socket"
    up = Flow("up", in_fd, sock_fd, choose_mode(in_kind, net_kind, opts.splice), tls)
    try:
        down = Flow("down", sock_fd, out_fd, choose_mode(net_kind, out_kind, opts.splice), tls)
    except BaseException:
        up.close()  # its pipe, when out of descriptors for the second one
        raise
    down.moved = len(initial_down)
    if down.mode == "splice" and net_kind == "socket":
        down.coalesce_from(sock)
    if in_kind == "closed":
        up.src_eof = up.finished = True

    # Pipes and sockets share their open file description (and so O_NONBLOCK) with the shell and
    # whoever else holds them, who would see EAGAIN after we exit: remember the flags as found,
    # all of them before changing any, since stdin and stdout can be one description (inetd,
    # socat EXEC). ttys are left blocking (poll says when they are ready); files never block.
    found_blocking: dict[int, bool] = {}
    # stdout that is stdin's very socket must keep O_NONBLOCK until stdin is done with it.
    out_is_in = (
        out_kind == in_kind == "socket"
        and os.fstat(out_fd).st_ino == os.fstat(in_fd).st_ino
    )

    stdin_eof_handled = peer_eof_handled = False
    quit_at: float | None = None
    last_activity = started

    def handle_transitions(now: float) -> None:
        """Act once on each end of stream, right after the pump that revealed it."""
        nonlocal stdin_eof_handled, peer_eof_handled, quit_at
        if down.finished and not peer_eof_handled:
            peer_eof_handled = True
            if trace:
                trace(f"peer closed; {down.moved} bytes delivered to stdout")
            if opts.close_output and out_fd != in_fd:
                was_blocking = found_blocking.pop(out_fd, None)
                if was_blocking is not None and not out_is_in:
                    os.set_blocking(out_fd, was_blocking)
                os.close(out_fd)
        if up.finished and not stdin_eof_handled:
            stdin_eof_handled = True
            if opts.read_stdin:
                _after_stdin_eof(sock, opts, trace, up)
                if opts.quit_after_eof_s is not None:
                    quit_at = now + opts.quit_after_eof_s

    timers = opts.quit_after_eof_s is not None or opts.idle_timeout_s is not None
    poller = select.poll()
    registered: dict[int, int] = {}
    last_down_wants: Sequence[tuple[int, int]] | None = None
    last_up_wants: Sequence[tuple[int, int]] | None = None
    last_down_moved = -1
    flush_at = 0.0  # while down.coalescing: when the tail below the low-water mark is flushed
    try:
        for fd, kind in ((in_fd, in_kind), (out_fd, out_kind)):
            if kind in ("pipe", "socket") and fd not in found_blocking:
                found_blocking[fd] = os.get_blocking(fd)
        sock.setblocking(False)
        for fd in found_blocking:
            os.set_blocking(fd, False)
        handle_transitions(started)
        # Invariant at the top of each round: every unfinished flow states what it waits for, each
        # end of stream seen so far has been acted on, and the loop condition is the policy's
        # exit rule from the module header (with the idle exit below). The round is kept lean:
        # with a proxy that delivers in small bursts, its fixed cost is most of hopcat's CPU per
        # GiB; what the peer's FIN adds (a zero-timeout poll) is paid only after it.
        while not (down.finished and up.finished):
            down_wants = down.interest()
            up_wants = up.interest()
            if down_wants is not last_down_wants or up_wants is not last_up_wants:
                last_down_wants, last_up_wants = down_wants, up_wants
                wanted = dict(down_wants)
                for fd, events in up_wants:
                    wanted[fd] = wanted.get(fd, 0) | events
                for fd in registered.keys() - wanted.keys():
                    poller.unregister(fd)
                for fd, events in wanted.items():
                    if registered.get(fd) != events:
                        poller.register(fd, events)  # registers or modifies
                registered = wanted
            timeout_ms = None
            # After the peer's FIN, stdin is sent only while it has bytes ready: ask with a zero
            # timeout, and nothing ready is the end (unless bytes of ours wait for the socket).
            idle_probe = down.finished and not opts.keep_sending and not up.holds_bytes()
            if idle_probe:
                timeout_ms = 0
            elif timers:
                now = clock()
                deadlines = [] if quit_at is None else [quit_at]
                if opts.idle_timeout_s is not None:
                    deadlines.append(last_activity + opts.idle_timeout_s)
                if deadlines:
                    wait_ms = (min(deadlines) - now) * 1000
                    timeout_ms = 0 if wait_ms <= 0 else int(min(wait_ms, MAX_POLL_MS) + 0.999)
            # Records already inside the TLS sessions: poll cannot see them.
            tls_pending = tls is not None and not down.finished and not down.buffered and tls.more
            if tls_pending:
                timeout_ms = 0
            if down.coalescing:
                if last_down_moved != down.moved:
                    last_down_moved = down.moved
                    flush_at = clock() + COALESCE_WAIT_S
                wait_ms = max(0, int((flush_at - clock()) * 1000 + 0.999))
                if timeout_ms is None or wait_ms < timeout_ms:
                    timeout_ms = wait_ms
            ready = poller.poll(timeout_ms)
            if down.coalescing:
                now = clock()
                if now >= flush_at:
                    # The bounded wait is over (even if stdin kept waking us): flush the tail.
                    try:
                        down.flush_coalesced()
                    except OSError as exc:
                        if _session_over(exc, up, in_fd, opts.read_stdin, trace):
                            return stats
                        raise _relay_error(down, exc) from None
                    last_activity = now
                    if down.finished:
                        handle_transitions(now)
                        continue
            if tls_pending:
                ready.append((sock_fd, select.POLLIN))
            if not ready:
                if idle_probe:
                    if trace:
                        trace(f"stdin idle after the peer's EOF; {up.moved} bytes sent")
                    break
                now = clock()
                if quit_at is not None and now >= quit_at:
                    if trace:
                        trace(f"quitting {opts.quit_after_eof_s:g} s after stdin EOF (-q)")
                    break
                if opts.idle_timeout_s is not None and now - last_activity >= opts.idle_timeout_s:
                    raise HopcatTimeoutError(f"idle for {opts.idle_timeout_s:g} s, closing (-w)")
                continue
            if timers:
                last_activity = clock()
            ready_fds = {fd for fd, _events in ready}
            # Down first: the peer's EOF is acted on (stdout closed) before stdin is pumped in
            # the same round, and a send that fails after it is then reported with its counts.
            for flow, wants in ((down, down_wants), (up, up_wants)):
                for fd, _events in wants:
                    if fd in ready_fds:
                        try:
                            flow.on_ready(fd)
                        except OSError as exc:
                            if flow is down and _session_over(
                                exc, up, in_fd, opts.read_stdin, trace
                            ):
                                return stats
                            raise _relay_error(flow, exc) from None
                        break
                if flow.finished:
                    handle_transitions(last_activity if timers else 0.0)
        if trace and tls is not None and tls.layers.ragged_end:
            trace("the peer closed without a TLS close_notify: what came may be truncated "
                  "(only the protocol inside can tell)")  # fmt: skip
    finally:
        stats.bytes_up, stats.bytes_down = up.moved, down.moved
        stats.path_up, stats.path_down = up.mode, down.mode  # a splice may have fallen back
        stats.seconds = clock() - started
        up.close()
        down.close()
        for fd, was_blocking in found_blocking.items():
            try:
                os.set_blocking(fd, was_blocking)
            except OSError:
                pass
    return stats


def _session_over(
    exc: OSError, up: Flow, in_fd: int, read_stdin: bool, trace: Callable[[str], None] | None
) -> bool:
    """Whether a failed write to stdout is the ordinary end of a session: stdout's reader left
    after stdin ended, or as stdin's writer left with nothing unread. Whoever ran us (ssh, at
    its exit) closed both ends, in either order. Checked wherever stdout is written: a write
    held back to coalesce small ones (``Flow.flush_coalesced``) fails the same way."""
    if exc.errno != errno.EPIPE:
        return False
    if read_stdin:
        _forward_rest(up, in_fd)
    if not (up.finished or (read_stdin and writer_left(in_fd))):
        return False
    if trace:
        trace("stdout's reader went away and stdin ended; ending quietly")
    return True


def _forward_rest(up: Flow, in_fd: int) -> None:
    """Pass on what stdin holds already, before a failed write to stdout is judged: ssh writes
    its last messages and exits in the same moment our read of the peer's last bytes fails, and
    those unread bytes would otherwise make its ordinary exit look like a reader gone early."""
    for _ in range(64):  # a writer still writing is not one that left: bounded
        if up.finished or (not up.buffered and not _bytes_ready(in_fd)):
            return
        try:
            up.on_ready(in_fd)
        except OSError:
            return


def writer_left(fd: int) -> bool:
    """Whether ``fd`` (stdin) has hung up with nothing left to read, now or within
    ``WRITER_LEFT_GRACE_MS``: ssh closes our stdout and our stdin one after the other when it
    exits, and the EPIPE on stdout can come first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _fd, events in poller.poll(WRITER_LEFT_GRACE_MS):
        return bool(events & select.POLLHUP) and not _bytes_ready(fd)
    return False


def _bytes_ready(fd: int) -> int:
    """Bytes ``fd`` could still be read for (to report what a failed send left behind); 0 if
    unknown. Only on the error path: it costs imports and syscalls."""
    import sys

    try:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode):
            return max(0, status.st_size - os.lseek(fd, 0, os.SEEK_CUR))
        import fcntl
        import termios

        answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(answer, sys.byteorder)
    except (OSError, ImportError):
        return 0


def _relay_error(flow: Flow, exc: OSError) -> HopcatError:
    if isinstance(exc, TLSStreamError):
        from hopcat.errors import RemoteProtocolError, TLSError

        counts = f"{flow.moved} bytes {'sent' if flow.name == 'up' else 'received'}"
        message = f"TLS with {exc.who}: {exc.strerror} mid-stream (after {counts})"
        # A TLS proxy's session is the chain's, like a TLS failure in its handshake (exit 76).
        return RemoteProtocolError(message) if exc.who.startswith("proxy ") else TLSError(message)
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    if exc.errno == errno.EPROTO and exc.strerror:
        reason = exc.strerror  # TLS: the library's reason says more than "protocol error"
    lost = f"; {flow.buffered} bytes not delivered" if flow.buffered else ""
    if flow.name == "up":
        side = "sending to the peer" if exc.errno in _GONE else "reading stdin or sending"
        left = flow.buffered + _bytes_ready(flow.src)
        unsent = f"; {left} bytes of stdin not sent" if left else ""
        return RelayError(f"{side}: {reason} (after {flow.moved} bytes sent{unsent})")
    if exc.errno == errno.EPIPE:
        return RelayError(
            f"writing to stdout: {reason}, the reader went away (after {flow.moved} bytes{lost})"
        )
    if exc.errno == errno.ECONNRESET:
        return RelayError(f"receiving from the peer: {reason} (after {flow.moved} bytes received)")
    return RelayError(
        f"receiving from the peer or writing stdout: {reason} (after {flow.moved} bytes)"
    )


def _after_stdin_eof(
    sock: socket.socket,
    opts: RelayOptions,
    trace: Callable[[str], None] | None,
    up: Flow,
) -> None:
    if opts.no_shutdown:
        if trace:
            trace(f"stdin EOF after {up.moved} bytes; not sending FIN (--no-shutdown)")
        return
    if up.tls is not None:
        # A bare FIN under a TLS hop's session is a protocol violation (proxies answer with an
        # alert and tear the tunnel down): the innermost session's close_notify says it.
        try:
            up.tls.close_notify()
        except OSError as exc:
            if exc.errno not in _GONE:
                raise RelayError(
                    f"half-closing the TLS session: {os.strerror(exc.errno or 0).lower()}"
                ) from None
        if up.tls.out:
            up.finished = False  # until the socket has taken the close_notify
        if trace:
            trace(f"stdin EOF after {up.moved} bytes; sent TLS close_notify to the peer")
        return
    try:
        # The base class's shutdown, not the SSLSocket override: that one discards the TLS
        # state, and the peer's answer still has to be decrypted.
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError as exc:
        if exc.errno not in _GONE:
            raise RelayError(
                f"half-closing the connection: {os.strerror(exc.errno or 0).lower()}"
            ) from None
    if trace:
        trace(f"stdin EOF after {up.moved} bytes; sent FIN to the peer")
