"""UDP through a SOCKS5 proxy (RFC 1928 section 7): the association and its datagrams.

``open_association`` runs the engine's plan with ``udp`` (``hopcat.net.engine``): every hop but
the last carries a CONNECT, the last (SOCKS5) is asked UDP ASSOCIATE. The TCP connection that
asked stays open as the *control connection*: the association lives as long as it does, on both
sides (the proxy ends it when the connection closes, and we treat the connection becoming
readable as its end, since a SOCKS5 proxy sends nothing more on it).

Decisions where the RFC leaves a choice:

* What we announce: 0.0.0.0:0, or [::]:0 over IPv6 ("not known", RFC 1928 section 6's words
  for UDP ASSOCIATE; Dante refuses an unspecified address of the other family with reply 8).
  The address the proxy would see our datagrams come from is not known before the control
  connection exists (nor at all behind a NAT or a chain), and a wrong one makes the proxy drop
  every datagram; with zeros Dante (and ``hopcat serve``) take datagrams from the control
  connection's address and lock on to the first port that sends, which is ours since we send
  first.
* The relay address: the reply's bound address. 0.0.0.0 or :: there means "my own address": the
  control connection's peer when the SOCKS5 proxy is the first hop. Behind a chain that peer is
  another proxy, so the proxy's address cannot be known from here and the open is refused. Any
  other relay address must be routable from here: datagrams go to it directly, never through the
  earlier hops (no proxy protocol carries UDP inside TCP).
* The UDP socket is connected to the relay, so the kernel itself drops datagrams from elsewhere;
  ``receive`` checks the source again and counts any that get through (``DROP_SOURCE``).
* Replies: the relay names where each came from. For an address target the header must name that
  address and port (an IPv4-mapped IPv6 address counts as the IPv4 one). For a name target
  (socks5h, or proxy_dns remote) the relay resolved the name and answers with the address it got,
  as Dante does: any address is accepted, the port must match. Datagrams with FRAG != 0 are
  dropped (we do not reassemble, as the RFC allows) and so are malformed headers.
* Sizes: DATA plus header at most 65,507 bytes, the IPv4 UDP payload limit; a larger send is a
  LocalProtocolError before anything is sent.
"""

from __future__ import annotations

import _socket as socket
import select
import time

from hopcat._endpoint import format_hostport, is_ip_literal
from hopcat.errors import LocalProtocolError, RemoteProtocolError, UsageError
from hopcat.net.chain import _Driver, tls_context
from hopcat.net.datagram import MAX_DATAGRAM_BYTES, RECEIVE_BYTES, DatagramStats, udp_error
from hopcat.net.engine import check_chain, tunnel_plan
from hopcat.proto import socks5_udp

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence

    from hopcat._url import ProxyURL
    from hopcat.net.engine import HopInfo
    from hopcat.net.tls import TLSLayers

__all__ = [
    "DatagramCodec",
    "Socks5Association",
    "open_association",
]

_UNSPECIFIED = ("0.0.0.0", "::")
# Why a datagram was dropped (DatagramStats.dropped's keys, shown by -v).
DROP_SOURCE = "not from the relay"
DROP_FRAGMENT = "fragment"
DROP_MALFORMED = "malformed header"
DROP_NOT_TARGET = "not from the target"
# What UDP ASSOCIATE announces as the datagrams' source: "not known" (the module docstring).
ANNOUNCE_UNKNOWN = ("", 0)


class DatagramCodec:
    """The headers of one association's datagrams, both ways, and their counts (the sync and
    asyncio APIs share it): ``pack`` a payload for the target, ``unpack`` a relay's datagram
    into the target's payload and the address the relay named, or None (dropped, counted)."""

    __slots__ = ("_header", "_target_address", "stats", "target")

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stats = DatagramStats()
        self._header = socks5_udp.pack(target[0], target[1], b"")
        self._target_address = _packed(target[0]) if is_ip_literal(target[0]) else None

    @property
    def max_payload(self) -> int:
        """The largest payload one datagram carries with its header."""
        return MAX_DATAGRAM_BYTES - len(self._header)

    def pack(self, data: bytes) -> bytes:
        """``data`` with its header; LocalProtocolError when it cannot fit in one datagram."""
        limit = self.max_payload
        if len(data) > limit:
            raise LocalProtocolError(
                f"a datagram of {len(data)} bytes does not fit: at most {limit} through SOCKS5 "
                f"to {format_hostport(*self.target)}"
            )
        self.stats.count_sent(len(data))
        return self._header + data

    def unpack(self, datagram: bytes) -> socks5_udp.UdpDatagram | None:
        try:
            unpacked = socks5_udp.unpack(datagram)
        except RemoteProtocolError:
            self.stats.count_dropped(DROP_MALFORMED)
            return None
        if unpacked.frag:
            self.stats.count_dropped(DROP_FRAGMENT)
            return None
        if not self._from_target(unpacked.host, unpacked.port):
            self.stats.count_dropped(DROP_NOT_TARGET)
            return None
        self.stats.count_received(len(unpacked.data))
        return unpacked

    def _from_target(self, host: str, port: int) -> bool:
        if port != self.target[1]:
            return False
        if self._target_address is None:  # a name: the relay answers with what it resolved
            return True
        return is_ip_literal(host) and _packed(host) == self._target_address


class Socks5Association:
    """A UDP association through a SOCKS5 proxy to one target (the ``Datagrams`` interface).

    ``send``/``receive`` move one datagram's payload; ``fileno`` is the UDP socket's,
    ``control_fileno`` the control connection's (readable: the association is over). ``recv``
    waits for the next accepted datagram for a library caller. ``relay`` is where datagrams go,
    ``target`` the destination as the headers name it, ``hops`` what each hop did.
    """

    __slots__ = ("_codec", "_control", "_layers", "_relay_packed", "_udp", "_where", "hops",
                 "max_payload", "relay", "stats", "target")

    def __init__(
        self, udp: socket.socket, control: socket.socket, relay: tuple[str, int],
        target: tuple[str, int], *, layers: TLSLayers | None = None, hops: tuple[HopInfo, ...] = (),
    ) -> None:  # fmt: skip
        self._udp = udp
        self._control = control
        self._layers = layers  # a TLS last hop's sessions: kept with the connection they run on
        self.relay = relay
        self.target = target
        self.hops = hops
        self._codec = DatagramCodec(target)
        self.stats = self._codec.stats
        self.max_payload = self._codec.max_payload
        self._relay_packed = (_packed(relay[0]), relay[1])
        self._where = f"udp relay {format_hostport(*relay)}"
        udp.setblocking(False)

    def fileno(self) -> int:
        return self._udp.fileno()

    def control_fileno(self) -> int | None:
        return self._control.fileno()

    def send(self, data: bytes) -> None:
        """One datagram to the target, waiting while the socket's buffer is full;
        LocalProtocolError when it cannot fit in one, ConnectError/RelayError when the relay
        cannot be reached."""
        datagram = self._codec.pack(data)
        while True:
            try:
                self._udp.send(datagram)
                return
            except BlockingIOError:
                select.select([], [self._udp], [])
            except OSError as exc:
                raise udp_error(exc, self._where, "sending") from None

    def receive(self) -> bytes | None:
        """The payload of the datagram waiting, or None when it was dropped (see the module
        docstring) or there was none after all (a datagram with a bad checksum wakes a poll)."""
        try:
            datagram, source = self._udp.recvfrom(RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise udp_error(exc, self._where, "receiving") from None
        if (_packed(source[0]), source[1]) != self._relay_packed:
            self.stats.count_dropped(DROP_SOURCE)
            return None
        unpacked = self._codec.unpack(datagram)
        return None if unpacked is None else unpacked.data

    def recv(self, timeout: float | None = None) -> bytes:
        """The next datagram's payload from the target, skipping dropped ones. TimeoutError
        after ``timeout`` seconds; ConnectionResetError when the control connection ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._udp.fileno(), select.POLLIN)
        poller.register(self._control.fileno(), select.POLLIN)
        while True:
            wait_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(wait_ms))
            if self._udp.fileno() in ready:
                data = self.receive()
                if data is not None:
                    return data  # a dropped one does not stop the deadline below
            if self._control.fileno() in ready and self._control_ended():
                raise ConnectionResetError("the SOCKS5 control connection closed: the UDP "
                                           "association is over")  # fmt: skip
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no datagram from the target before the timeout")

    def control_ended(self) -> bool:
        """After its fileno polled readable: whether the control connection really ended."""
        return self._control_ended()

    def _control_ended(self) -> bool:
        """Whether the readable control connection ended. A SOCKS5 proxy says nothing after its
        reply, so any byte ends it too, except through a TLS hop, whose session may still send
        records of its own (a TLS 1.3 KeyUpdate): those are taken in and the wait goes on."""
        try:
            data = self._control.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data or self._layers is None:
            return True
        import ssl

        self._layers.feed(data)
        try:
            self._layers.read_into(memoryview(bytearray(1)))
        except ssl.SSLWantReadError:
            if out := self._layers.wire_out():
                self._control.send(out)
            return False
        except OSError:  # ssl.SSLError included: a broken session is an ended one
            return True
        return True

    def close(self) -> None:
        self._udp.close()
        self._control.close()

    def __enter__(self) -> Socks5Association:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Socks5Association(relay={format_hostport(*self.relay)}, "
                f"target={format_hostport(*self.target)}: {self.stats.describe()})")  # fmt: skip


def open_association(
    hops: Sequence[ProxyURL],
    host: str,
    port: int,
    *,
    deadline: float,
    family: int = socket.AF_UNSPEC,
    source: str | None = None,
    proxy_dns: str = "remote",
    numeric_only: bool = False,
    cafile: str | None = None,
    insecure: bool = False,
    context: ssl.SSLContext | None = None,
    headers: list[tuple[str, str]] | None = None,
    trace: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    timeout_label: str = "",
) -> Socks5Association:
    """A UDP association to host:port through ``hops`` (the last one SOCKS5), within
    ``deadline``. Raises HopcatError subclasses, UsageError (exit 64) for a last hop that is not
    SOCKS5 and for a relay address that cannot be reached from here (see the module docstring).
    """
    check_chain(hops, proxy_dns, udp=True)
    if context is None and any(hop.tls for hop in hops):
        context = tls_context(cafile, insecure)
    plan = tunnel_plan(
        hops, host, port, proxy_dns=proxy_dns, family=family, numeric_only=numeric_only,
        exact=True, headers=headers, trace=trace, clock=clock, timeout_label=timeout_label,
        udp=ANNOUNCE_UNKNOWN,
    )  # fmt: skip
    driver = _Driver(deadline, clock, context, trace, timeout_label)
    driver.dial_options = {"family": family, "source": source, "numeric_only": numeric_only}
    udp: socket.socket | None = None
    try:
        opened = driver.run(plan)
        control = driver.sock
        assert control is not None and opened.relay is not None and opened.target is not None
        relay_host = relay_address(opened.relay, len(hops), str(control.getpeername()[0]))
        relay_port = opened.relay[1]
        udp = _udp_socket(relay_host, relay_port, source, deadline, clock)
        relay_host = str(udp.getpeername()[0])  # an address, even when the reply gave a name
        if trace is not None:
            trace(f"UDP relay {format_hostport(relay_host, relay_port)}, datagrams to "
                  f"{format_hostport(*opened.target)}")  # fmt: skip
        control.setblocking(True)
        return Socks5Association(udp, control, (relay_host, relay_port), opened.target,
                                 layers=driver.layers, hops=opened.hops)  # fmt: skip
    except BaseException:
        if udp is not None:
            udp.close()
        driver.close()
        raise


def relay_address(relay: tuple[str, int], hop_count: int, control_peer: str) -> str:
    """Where datagrams go: the reply's relay host, or for 0.0.0.0 / :: (the proxy's own
    address) the control connection's peer, which is the proxy only when it is the first hop."""
    if relay[0] not in _UNSPECIFIED:
        return relay[0]
    if hop_count > 1:
        raise UsageError(
            f"the SOCKS5 proxy's UDP relay is {format_hostport(*relay)}, its own address, "
            "which cannot be known through a chain: make it the first proxy, or have it answer "
            "a routable address"
        )
    return control_peer


def _udp_socket(
    host: str, port: int, source: str | None, deadline: float, clock: Callable[[], float]
) -> socket.socket:
    """A UDP socket connected to the relay (a name in the reply is resolved here)."""
    from hopcat.net.dial import resolve

    info = resolve(host, port, deadline=deadline, clock=clock)[0]
    try:
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
    except OSError as exc:
        raise udp_error(exc, f"udp relay {format_hostport(host, port)}", "opening") from None
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(info[4])
    except OSError as exc:
        sock.close()
        raise udp_error(exc, f"udp relay {format_hostport(host, port)}", "connecting") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _packed(address: str) -> bytes:
    """An address's bytes, an IPv4-mapped IPv6 one as its IPv4 (a dual-stack socket's view)."""
    if ":" not in address:
        return socket.inet_pton(socket.AF_INET, address)
    packed: bytes = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return packed[12:]
    return packed
