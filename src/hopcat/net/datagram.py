"""Datagrams: what the CLI's ``-u`` relays over, directly or through a SOCKS5 UDP association.

``Datagrams`` is the interface (a Protocol for the type checker only, as in
``hopcat.proto._machine``: nothing of typing is imported at run time); ``ConnectedUDP`` is the
direct one, a UDP socket ``connect()``-ed to the target, so the kernel drops datagrams from any
other source and reports the target's ICMP port unreachable. ``DatagramStats`` counts both ways
and what was dropped, for ``-v``.

ICMP port unreachable: Linux queues it on a connected UDP socket and the next ``send`` or
``recv`` fails with ECONNREFUSED. nc.openbsd exits 1 at that without a word; ncat exits 1 with
"Connection refused.". ``ConnectedUDP`` raises it as a ConnectError ("nothing listens on
HOST:PORT (ICMP port unreachable)", exit 69, as a refused TCP connect): ncat's behaviour with
hopcat's exit code, since a line saying why beats a silent exit.
"""

from __future__ import annotations

import _socket as socket
import errno

from hopcat.errors import ConnectError, RelayError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Datagrams(Protocol):
        """One association with one target: each ``send`` is one datagram, each ``receive``
        one datagram's payload."""

        stats: DatagramStats
        max_payload: int  # the largest ``send``: less than 65,507 where a header rides along

        def fileno(self) -> int:
            """Readable when a datagram (or an error) is waiting."""

        def send(self, data: bytes) -> None:
            """One datagram to the target; OSError (or a HopcatError) on failure."""

        def receive(self) -> bytes | None:
            """One datagram's payload from the target; None when what arrived was dropped
            (another source, a fragment, a bad header): counted in ``stats``, not returned."""

        def control_fileno(self) -> int | None:
            """SOCKS5's TCP control connection; None when there is none (direct). Readable
            means it may have ended: ask ``control_ended``."""

        def control_ended(self) -> bool:
            """Whether the control connection ended (the association is over), once its
            fileno polled readable: through a TLS hop a record of the session's own (a TLS 1.3
            KeyUpdate) makes it readable too."""

        def close(self) -> None: ...


# The largest UDP payload over IPv4 (65535 less the IP and UDP headers); over IPv6 without
# jumbograms it is 65527, but nc and socat read at most this much per datagram too.
MAX_DATAGRAM_BYTES = 65507
# A receive buffer any UDP datagram fits (IPv6's largest payload is 65,527), so none is ever cut
# short without a word.
RECEIVE_BYTES = 65536


class DatagramStats:
    """Datagrams and bytes each way, and the datagrams dropped, by reason."""

    __slots__ = ("bytes_received", "bytes_sent", "dropped", "received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.bytes_sent = 0
        self.received = 0
        self.bytes_received = 0
        self.dropped: dict[str, int] = {}

    def count_sent(self, size: int) -> None:
        self.sent += 1
        self.bytes_sent += size

    def count_received(self, size: int) -> None:
        self.received += 1
        self.bytes_received += size

    def count_dropped(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def describe(self) -> str:
        """One line for -v: ``sent 3 datagrams (1200 bytes), received 2 (80 bytes); dropped 1
        (from another source)``."""
        text = (f"sent {self.sent} datagram{'s' * (self.sent != 1)} ({self.bytes_sent} bytes), "
                f"received {self.received} ({self.bytes_received} bytes)")  # fmt: skip
        if self.dropped:
            text += "; dropped " + ", ".join(
                f"{count} ({reason})" for reason, count in sorted(self.dropped.items())
            )
        return text


def udp_error(exc: OSError, where: str, doing: str) -> ConnectError | RelayError:
    """A UDP socket's error as one line: ``where`` names the peer (the target, or a SOCKS5
    relay). ICMP port and host unreachable are a refused connect (exit 69), the rest a relay
    error (74)."""
    from hopcat.net.dial import describe_oserror

    if exc.errno == errno.ECONNREFUSED:
        return ConnectError(f"{where}: nothing listens there (ICMP port unreachable, while "
                            f"{doing})", errno=exc.errno)  # fmt: skip
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ConnectError(f"{where}: {describe_oserror(exc)} (while {doing})", errno=exc.errno)
    if exc.errno == errno.EMSGSIZE:
        return RelayError(f"{where}: datagram too large for the path (while {doing})")
    return RelayError(f"{where}: {doing}: {describe_oserror(exc)}")


class ConnectedUDP:
    """A UDP socket connected to the target: the direct ``Datagrams``. Takes ``sock`` over
    (closed by ``close()``); ``target`` is how messages name the peer. ``peer``: the sockaddr it
    was connected to after datagrams may have queued (a listener locking on): those from any
    other source are dropped, since connect() does not purge what was queued before it."""

    def __init__(
        self, sock: socket.socket, target: str, peer: tuple[object, ...] | None = None
    ) -> None:
        self.sock = sock
        self.target = target
        self.peer = peer
        self.stats = DatagramStats()
        self.max_payload = MAX_DATAGRAM_BYTES
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def control_fileno(self) -> int | None:
        return None

    def control_ended(self) -> bool:
        return False  # no control connection: never asked (control_fileno is None)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except BlockingIOError:
            # The socket's send buffer is full: UDP may drop, and nc drops too (its write
            # fails); counted, so -v shows it.
            self.stats.count_dropped("send buffer full")
            return
        except OSError as exc:
            raise self._error(exc, "sending") from None
        self.stats.count_sent(len(data))

    def receive(self) -> bytes | None:
        try:
            if self.peer is None:
                data = self.sock.recv(RECEIVE_BYTES)
            else:
                data, sender = self.sock.recvfrom(RECEIVE_BYTES)
                if sender[:2] != self.peer[:2]:
                    self.stats.count_dropped("from another source")
                    return None
        except BlockingIOError:
            return None  # woken for nothing (another reader, a checksum failure): nothing lost
        except OSError as exc:
            raise self._error(exc, "receiving") from None
        self.stats.count_received(len(data))
        return data

    def _error(self, exc: OSError, doing: str) -> ConnectError | RelayError:
        return udp_error(exc, f"udp {self.target}", doing)

    def close(self) -> None:
        self.sock.close()


def udp_socket(family: int, *, broadcast: bool = False) -> socket.socket:
    """A UDP socket of ``family``; SO_BROADCAST with ``broadcast`` (nc's -b). A failure is a
    RelayError with its errno (no IPv6 here, EMFILE), never a bare OSError."""
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        from hopcat.net.dial import describe_oserror

        error = RelayError(f"udp socket: {describe_oserror(exc)}")
        error.errno = exc.errno  # for a caller that falls back (no IPv6 here)
        raise error from None
    if broadcast:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        except BaseException:
            sock.close()
            raise
    return sock
