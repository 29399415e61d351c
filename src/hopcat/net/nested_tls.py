"""TLS to the target carried inside the TLS session with an https:// proxy, for blocking callers.

``ssl.SSLContext.wrap_socket`` cannot wrap an ``SSLSocket``: a second TLS layer has to run on
memory BIOs, its records sent and received through the outer session. ``NestedTLSSocket`` does
that and keeps the parts of the socket interface that clients of a TLS socket use (``recv``,
``sendall``, ``makefile``, timeouts, the peer's certificate), so http.client, urllib3 and
paramiko work on it unchanged.

Threads: OpenSSL forbids two threads in one SSL object at once, and that holds for the outer
session too, while a reader thread blocked in ``recv`` beside a writer thread is ordinary socket
use (paramiko does it). So the outer socket is kept non-blocking and every call into either
session is short and made under a lock; the waiting for the network happens in ``poll`` with no
lock held. Records reach the wire in the order the inner session made them: the send lock is taken
before the session is let go.
"""

from __future__ import annotations

import io
import select
import socket
import ssl
import threading
from typing import Any

__all__ = ["NestedTLSSocket"]

RECORD_READ_BYTES = 2**16  # several TLS records per outer read


class NestedTLSSocket:
    """A TLS connection to the target whose records travel inside an outer TLS socket.

    Behaves like the ``ssl.SSLSocket`` that ``wrap_socket`` would return on a plain connection,
    in blocking mode with or without a timeout (``settimeout`` applies to each outer read and
    write). ``fileno()`` is the outer socket's: a select/poll on it can miss bytes already
    decrypted here, so check ``pending()`` first, as with an ``SSLSocket``.
    """

    def __init__(
        self, outer: ssl.SSLSocket, context: ssl.SSLContext, server_hostname: str | None
    ) -> None:
        self._outer = outer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._session_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outer_lock = threading.Lock()
        self._timeout = outer.gettimeout()
        outer.setblocking(False)
        self._makefile_refs = 0
        self._closed = False

    def do_handshake(self) -> None:
        self._run(self._tls.do_handshake)

    # -- data --------------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._refuse_flags(flags)
        if bufsize == 0:
            return b""
        try:
            data: bytes = self._run(self._tls.read, bufsize)
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
        written: int = self._run(self._tls.write, data)
        return written

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._refuse_flags(flags)
        view = memoryview(data).cast("B")
        while view:
            view = view[self._run(self._tls.write, view) :]

    def pending(self) -> int:
        with self._session_lock:
            return self._tls.pending()

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
        return self._tls.context

    @property
    def server_hostname(self) -> str | None:
        return self._tls.server_hostname

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def version(self) -> str | None:
        return self._tls.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    # -- the socket underneath -----------------------------------------------------------------

    @property
    def family(self) -> int:
        return self._outer.family

    @property
    def type(self) -> int:
        return self._outer.type

    @property
    def proto(self) -> int:
        return self._outer.proto

    def fileno(self) -> int:
        return self._outer.fileno()

    def getpeername(self) -> Any:
        return self._outer.getpeername()

    def getsockname(self) -> Any:
        return self._outer.getsockname()

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        self._outer.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> Any:
        if buflen:
            return self._outer.getsockopt(level, option, buflen)
        return self._outer.getsockopt(level, option)

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
        self._outer.shutdown(how)

    def close(self) -> None:
        self._closed = True
        if self._makefile_refs == 0:
            self._outer.close()

    def _decref_socketios(self) -> None:
        """Called by ``socket.SocketIO.close``: the last file closed after ``close()`` closes
        the connection, as with a real socket."""
        self._makefile_refs -= 1
        if self._closed and self._makefile_refs <= 0:
            self._outer.close()

    def __enter__(self) -> NestedTLSSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NestedTLSSocket {self._tls.server_hostname!r} inside {self._outer!r}>"

    # -- moving records --------------------------------------------------------------------------

    def _run(self, operation: Any, *args: Any) -> Any:
        """Run one inner-session call to completion, reading records from the proxy session
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
        records = self._outgoing.read()
        if not records:
            self._session_lock.release()
            return
        with self._send_lock:
            self._session_lock.release()
            view = memoryview(records)
            while view:
                # A write that could not go out must be retried with the same bytes (OpenSSL).
                view = view[self._outer_call(self._outer.send, view) :]

    def _read_records(self) -> None:
        records = self._outer_call(self._outer.recv, RECORD_READ_BYTES)
        with self._session_lock:
            if records:
                self._incoming.write(records)
            else:
                self._incoming.write_eof()

    def _outer_call(self, operation: Any, argument: Any) -> Any:
        """One call into the outer session, waiting (unlocked) for the network as it asks."""
        while True:
            with self._outer_lock:
                try:
                    return operation(argument)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
            poller = select.poll()
            poller.register(self._outer.fileno(), events)
            timeout_ms = None if self._timeout is None else int(self._timeout * 1000) + 1
            if not poller.poll(timeout_ms):
                raise TimeoutError("timed out")

    @staticmethod
    def _refuse_flags(flags: int) -> None:
        if flags:
            raise ValueError("flags are not supported on a TLS connection")
