"""UDP through SOCKS5 against a scripted proxy: a TCP SOCKS5 server in a thread that answers
UDP ASSOCIATE with a relay address, and a plain UDP socket in the test playing the relay, so
every datagram the client gets back is written by hand (the drop rules of
``hopcat.net.udp_socks5``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

import hopcat
from hopcat.errors import ConnectError, LocalProtocolError, UsageError
from hopcat.proto import socks5_udp

TARGET = ("127.0.0.9", 5353)


class ScriptedSocks5:
    """A SOCKS5 proxy on loopback answering UDP ASSOCIATE with ``relay``; after ``connects``
    CONNECT requests on the same connection (a chain through itself). ``end`` closes the
    control connection."""

    def __init__(self, relay: tuple[str, int], *, connects: int = 0) -> None:
        self.relay = relay
        self.connects = connects
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.end = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            for _ in range(self.connects):
                self._exchange(conn, b"\x01", ("127.0.0.1", 1))
            self._exchange(conn, b"\x03", self.relay)
            self.end.wait(30)

    def _exchange(self, conn: socket.socket, command: bytes, bound: tuple[str, int]) -> None:
        greeting = _recv_exact(conn, 2)
        _recv_exact(conn, greeting[1])
        conn.sendall(b"\x05\x00")
        head = _recv_exact(conn, 4)
        assert head[1:2] == command
        size = {1: 4, 4: 16}.get(head[3]) or _recv_exact(conn, 1)[0]
        self.requests.append(head + _recv_exact(conn, size + 2))
        address = socket.inet_aton(bound[0])
        conn.sendall(b"\x05\x00\x00\x01" + address + bound[1].to_bytes(2, "big"))

    def close(self) -> None:
        self.end.set()
        self.listener.close()
        self._thread.join(5)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


@pytest.fixture
def relay() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def proxy(relay: socket.socket) -> Iterator[ScriptedSocks5]:
    scripted = ScriptedSocks5(relay.getsockname())
    yield scripted
    scripted.close()


def test_drop_rules(proxy: ScriptedSocks5, relay: socket.socket) -> None:
    with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{proxy.port}", timeout=5) as udp:
        # The request announced "not known" (0.0.0.0:0), and the target goes in the header.
        assert proxy.requests == [b"\x05\x03\x00\x01" + bytes(6)]
        udp.send(b"hello")
        datagram, client = relay.recvfrom(65536)
        assert datagram == socks5_udp.pack(*TARGET, b"hello")
        good = socks5_udp.pack(*TARGET, b"answer")
        relay.sendto(b"\x00\x00\x01" + good[3:], client)  # FRAG 1
        relay.sendto(b"\x00\x00\x00\x09junk", client)  # an unknown address type
        relay.sendto(socks5_udp.pack("127.0.0.8", TARGET[1], b"other host"), client)
        relay.sendto(socks5_udp.pack(TARGET[0], TARGET[1] + 1, b"other port"), client)
        relay.sendto(socks5_udp.pack("::ffff:127.0.0.9", TARGET[1], b"mapped"), client)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as third:
            third.sendto(good, client)  # not the relay: the connected socket never sees it
        relay.sendto(good, client)
        assert udp.recv(5) == b"mapped"
        assert udp.recv(5) == b"answer"
        assert udp.stats.dropped == {
            "fragment": 1, "malformed header": 1, "not from the target": 2
        }  # fmt: skip
        assert (udp.stats.sent, udp.stats.bytes_sent) == (1, 5)
        assert (udp.stats.received, udp.stats.bytes_received) == (2, 12)
        assert udp.stats.describe() == (
            "sent 1 datagram (5 bytes), received 2 (12 bytes); dropped 1 (fragment), "
            "1 (malformed header), 2 (not from the target)"
        )
        with pytest.raises(TimeoutError):
            udp.recv(0.2)


def test_receive_reports_each_datagram(proxy: ScriptedSocks5, relay: socket.socket) -> None:
    """The CLI's way: one receive() per readable datagram, None for a dropped one."""
    with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{proxy.port}", timeout=5) as udp:
        udp.send(b"")
        _, client = relay.recvfrom(65536)
        relay.sendto(b"\x00\x00\x02" + socks5_udp.pack(*TARGET, b"x")[3:], client)
        relay.sendto(socks5_udp.pack(*TARGET, b""), client)
        assert udp.receive() is None
        assert udp.receive() == b""
        assert udp.control_fileno() not in (None, udp.fileno())


def test_name_target_accepts_the_address_the_relay_resolved(
    proxy: ScriptedSocks5, relay: socket.socket
) -> None:
    via = f"socks5h://127.0.0.1:{proxy.port}"
    with hopcat.open_udp("dns.example", 53, via=via, timeout=5) as udp:
        udp.send(b"q")
        datagram, client = relay.recvfrom(65536)
        assert datagram == socks5_udp.pack("dns.example", 53, b"q")
        relay.sendto(socks5_udp.pack("192.0.2.1", 54, b"wrong port"), client)
        relay.sendto(socks5_udp.pack("192.0.2.1", 53, b"a"), client)
        assert udp.recv(5) == b"a"
        assert udp.stats.dropped == {"not from the target": 1}


def test_control_connection_end_ends_the_association(
    proxy: ScriptedSocks5, relay: socket.socket
) -> None:
    with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{proxy.port}", timeout=5) as udp:
        proxy.end.set()
        started = time.monotonic()
        with pytest.raises(ConnectionResetError, match="association is over"):
            udp.recv(5)
        assert time.monotonic() - started < 4


def test_oversize_datagram_refused(proxy: ScriptedSocks5, relay: socket.socket) -> None:
    with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{proxy.port}", timeout=5) as udp:
        fits = 65507 - 10
        udp.send(bytes(fits))
        assert len(relay.recvfrom(65536)[0]) == 65507
        with pytest.raises(LocalProtocolError, match="does not fit"):
            udp.send(bytes(fits + 1))
        assert udp.stats.sent == 1


def test_unspecified_relay_is_the_proxy_itself(relay: socket.socket) -> None:
    scripted = ScriptedSocks5(("0.0.0.0", relay.getsockname()[1]))
    try:
        with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{scripted.port}", timeout=5) as udp:
            assert udp.relay == ("127.0.0.1", relay.getsockname()[1])
            udp.send(b"x")
            assert relay.recvfrom(100)[0].endswith(b"x")
    finally:
        scripted.close()


def test_unspecified_relay_through_a_chain_refused(relay: socket.socket) -> None:
    # One scripted proxy plays both hops: a CONNECT to "the next", then UDP ASSOCIATE.
    scripted = ScriptedSocks5(("0.0.0.0", relay.getsockname()[1]), connects=1)
    url = f"socks5://127.0.0.1:{scripted.port}"
    try:
        with pytest.raises(UsageError, match="cannot be known through a chain"):
            hopcat.open_udp(*TARGET, via=[url, url], timeout=5)
    finally:
        scripted.close()


@pytest.mark.parametrize(
    "via",
    [
        ["http://127.0.0.1:1"],
        ["socks4://127.0.0.1:1"],
        ["socks5://127.0.0.1:1", "https://127.0.0.1:1"],
    ],
)
def test_last_hop_not_socks5_refused_before_dialling(via: list[str]) -> None:
    with pytest.raises(UsageError, match="UDP goes through SOCKS5 only") as caught:
        hopcat.open_udp(*TARGET, via=via, timeout=5)
    assert caught.value.hop == len(via)


def test_no_proxy_refused() -> None:
    with pytest.raises(ValueError, match="needs a SOCKS5 proxy"):
        hopcat.open_udp(*TARGET, via=hopcat.Chain())


def test_a_dead_relay_port_is_one_hopcat_error(relay: socket.socket) -> None:
    """ICMP port unreachable from the relay address surfaces as a HopcatError (one line, exit
    69 on the CLI), never a bare OSError (exit 70)."""
    port = relay.getsockname()
    relay.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    scripted = ScriptedSocks5(port)
    try:
        with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{scripted.port}", timeout=5) as udp:
            udp.send(b"into the void")
            with pytest.raises(ConnectError) as info:
                udp.recv(5)
                udp.send(b"again")
            assert "udp relay 127.0.0.1:" in str(info.value)
            assert "ICMP port unreachable" in str(info.value)
    finally:
        scripted.close()


def test_dropped_datagrams_do_not_hold_off_the_timeout(
    proxy: ScriptedSocks5, relay: socket.socket
) -> None:
    with hopcat.open_udp(*TARGET, via=f"socks5://127.0.0.1:{proxy.port}", timeout=5) as udp:
        udp.send(b"")
        _, client = relay.recvfrom(65536)
        stop = threading.Event()

        def flood() -> None:
            fragment = b"\x00\x00\x01" + socks5_udp.pack(*TARGET, b"x")[3:]
            while not stop.is_set():
                relay.sendto(fragment, client)
                time.sleep(0.001)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                udp.recv(0.3)
        finally:
            stop.set()
            flooder.join(5)
        assert time.monotonic() - started < 2
