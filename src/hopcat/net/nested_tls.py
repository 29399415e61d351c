"""TLS sessions of a tunnel as a blocking socket: for callers that want a socket-like object.

A TLS hop (``https://``, ``socks5+tls://``) keeps its session in hopcat (``hopcat.net.tls``:
memory BIOs over the plain socket), and TLS to the target runs inside it; ``NestedTLSSocket``
carries that stack and keeps the parts of the socket interface that clients of a TLS socket use
(``recv``, ``sendall``, ``makefile``, timeouts, the innermost peer's certificate), so
http.client, urllib3 and paramiko work on it unchanged.

Threads: OpenSSL forbids two threads in one SSL object at once, while a reader thread blocked in
``recv`` beside a writer thread is ordinary socket use (paramiko does it). So the socket is kept
non-blocking and every call into the sessions is short and made under a lock; the waiting for
the network happens in ``poll`` with no lock held. Records reach the wire in the order the
sessions made them: the send lock is taken before the sessions are let go.
"""

from __future__ import annotations

import io
import select
import socket
import ssl
import threading
from typing import Any

from hopcat.net.tls import TLSLayers

__all__ = ["NestedTLSSocket"]

RECORD_READ_BYTES = 2**16  # several TLS records per read from the wire


class NestedTLSSocket:
    """The TLS sessions ``layers`` on the connected ``sock``, as a TLS socket to the innermost
    peer (the target once ``start_tls`` ran, else the last TLS hop).

    Behaves like an ``ssl.SSLSocket`` in blocking mode with or without a timeout
    (``settimeout`` applies to each wait for the network). ``fileno()`` is the socket's: a
    select/poll on it can miss bytes already decrypted here, so check ``pending()`` first, as
    with an ``SSLSocket``.
    """

    def __init__(self, sock: socket.socket, layers: TLSLayers) -> None:
        self._sock = sock
        self._layers = layers
        self._session_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._timeout = sock.gettimeout()
        sock.setblocking(False)
        self._makefile_refs = 0
        self._closed = False

    def start_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, *, label: str = "target"
    ) -> None:
        """A TLS session with the peer at the end of the tunnel (``label``: whose it is, for
        errors), inside the current ones."""
        if "target" in self._layers.labels:
            raise ValueError("TLS is already running to the target")
        with self._session_lock:
            self._layers.push(context, server_hostname, label=label)
        self._run(self._handshake_step)

    def _handshake_step(self) -> None:
        if not self._layers.handshake():
            raise ssl.SSLWantReadError

    def do_handshake(self) -> None:
        self._run(self._handshake_step)

    # -- data --------------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._refuse_flags(flags)
        if bufsize == 0:
            return b""
        try:
            data: bytes = self._run(self._layers.innermost.read, bufsize)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # The target closed, cleanly or not: end of stream, as an SSLSocket with its default
            # suppress_ragged_eofs reports it.
            return b""
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._refuse_flags(flags)
        view = memoryview(buffer).cast("B")
        nbytes = nbytes or len(view)
        if nbytes == 0:
            return 0
        data = self.recv(nbytes)
        view[: len(data)] = data
        return len(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._refuse_flags(flags)
        written: int = self._run(self._layers.write, data)
        return written

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._refuse_flags(flags)
        view = memoryview(data).cast("B")
        while view:
            view = view[self._run(self._layers.write, view) :]

    def pending(self) -> int:
        with self._session_lock:
            return self._layers.innermost.pending()

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object over this connection, like ``socket.makefile`` (the connection stays
        open until the file and the socket are both closed)."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        reading, writing, binary = "r" in mode, "w" in mode, "b" in mode
        if not reading and not writing:
            reading = True
        raw = socket.SocketIO(self, ("r" if reading else "") + ("w" if writing else ""))  # type: ignore[arg-type]
        self._makefile_refs += 1
        buffering = io.DEFAULT_BUFFER_SIZE if buffering in (None, -1) else buffering
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        stream: Any
        if reading and writing:
            stream = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            stream = io.BufferedReader(raw, buffering)
        else:
            stream = io.BufferedWriter(raw, buffering)
        if binary:
            return stream
        text = io.TextIOWrapper(stream, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    # -- TLS facts ---------------------------------------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        return self._layers.innermost.context

    @property
    def server_hostname(self) -> str | None:
        return self._layers.innermost.server_hostname

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._layers.innermost.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._layers.innermost.cipher()

    def version(self) -> str | None:
        return self._layers.innermost.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._layers.innermost.selected_alpn_protocol()

    # -- the socket underneath -----------------------------------------------------------------

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> Any:
        if buflen:
            return self._sock.getsockopt(level, option, buflen)
        return self._sock.getsockopt(level, option)

    def settimeout(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("TLS inside TLS works in blocking mode (a timeout above 0 is fine)")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        if not flag:
            raise ValueError("TLS inside TLS works in blocking mode (a timeout above 0 is fine)")
        self._timeout = None

    def shutdown(self, how: int) -> None:
        """SHUT_WR is the innermost session's close_notify, the TLS half-close (reading goes
        on); a TCP FIN would end the TLS hops' sessions under it. SHUT_RDWR also ends the
        connection for both directions."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._session_lock.acquire()
            self._layers.close_notify()
            self._send_made_records()  # releases the session lock
        if how != socket.SHUT_WR:
            self._sock.shutdown(how)

    def close(self) -> None:
        self._closed = True
        if self._makefile_refs == 0:
            self._close_connection()

    def _decref_socketios(self) -> None:
        """Called by ``socket.SocketIO.close``: the last file closed after ``close()`` closes
        the connection, as with a real socket."""
        self._makefile_refs -= 1
        if self._closed and self._makefile_refs <= 0:
            self._close_connection()

    def _close_connection(self) -> None:
        """Every session's close_notify if the socket takes it now (so no peer takes the end
        for a truncation), then the socket."""
        if self._sock.fileno() < 0:
            return
        from hopcat.relay.pump import close_tls

        with self._session_lock:
            close_tls(self._sock, self._layers)
        self._sock.close()

    def __enter__(self) -> NestedTLSSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NestedTLSSocket {', '.join(self._layers.labels)} on {self._sock!r}>"

    # -- moving records --------------------------------------------------------------------------

    def _run(self, operation: Any, *args: Any) -> Any:
        """Run one call into the innermost session to completion, reading from the wire
        whenever it needs more and sending every record it makes."""
        while True:
            self._session_lock.acquire()
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._send_made_records()  # releases the session lock
                self._read_records()
                continue
            except BaseException:
                # An alert for the target may be owed (a failed handshake makes one).
                self._send_made_records()
                raise
            self._send_made_records()
            return result

    def _send_made_records(self) -> None:
        records = self._layers.wire_out()
        if not records:
            self._session_lock.release()
            return
        with self._send_lock:
            self._session_lock.release()
            view = memoryview(records)
            while view:
                view = view[self._socket_call(self._sock.send, view, select.POLLOUT) :]

    def _read_records(self) -> None:
        records = self._socket_call(self._sock.recv, RECORD_READ_BYTES, select.POLLIN)
        with self._session_lock:
            self._layers.feed(records)

    def _socket_call(self, operation: Any, argument: Any, events: int) -> Any:
        """One call on the socket, waiting (unlocked) for it to be ready."""
        while True:
            try:
                return operation(argument)
            except BlockingIOError:
                pass
            poller = select.poll()
            poller.register(self._sock.fileno(), events)
            timeout_ms = None if self._timeout is None else int(self._timeout * 1000) + 1
            if not poller.poll(timeout_ms):
                raise TimeoutError("timed out")

    @staticmethod
    def _refuse_flags(flags: int) -> None:
        if flags:
            raise ValueError("flags are not supported on a TLS connection")
