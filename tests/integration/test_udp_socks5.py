"""UDP through SOCKS5 with the library (``hopcat.open_udp``, ``hopcat.aio.
create_datagram_endpoint``) through Dante serving UDP ASSOCIATE, to a UDP echo on loopback:
datagram boundaries, content both ways, many datagrams, the association's end, and chains."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import peers
import pytest

import hopcat
import hopcat.aio
from hopcat.errors import ProxyError, UsageError
from hopcat.proto import socks5_udp
from support import Certificates

SIZES = (1, 1200, 60000)
MANY = 2000
WINDOW = 32  # datagrams in flight: well inside the default socket buffers, so none is lost


@pytest.fixture(params=["danted_udp", "danted_udp_auth"])
def dante(request: pytest.FixtureRequest) -> peers.Daemon:
    daemon: peers.Daemon = request.getfixturevalue(request.param)
    return daemon


def _payloads() -> list[bytes]:
    return [os.urandom(size) for size in SIZES]


def _digest(parts: list[bytes]) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


def test_boundaries_and_content(dante: peers.Daemon, udp_echo: peers.UdpEcho) -> None:
    sent = _payloads()
    with hopcat.open_udp(udp_echo.host, udp_echo.port, via=dante.url, timeout=10) as udp:
        assert udp.relay[0] == "127.0.0.1"
        received = []
        for payload in sent:
            udp.send(payload)
            received.append(udp.recv(5))
        assert [len(data) for data in received] == list(SIZES)
        assert _digest(received) == _digest(sent)
        assert (udp.stats.sent, udp.stats.received, udp.stats.dropped) == (3, 3, {})
        assert udp.stats.bytes_sent == udp.stats.bytes_received == sum(SIZES)


def test_many_datagrams(danted_udp: peers.Daemon, udp_echo: peers.UdpEcho) -> None:
    sent = [os.urandom(1200) for _ in range(MANY)]
    received: list[bytes] = []
    lost = 0
    with hopcat.open_udp(udp_echo.host, udp_echo.port, via=danted_udp.url, timeout=10) as udp:
        in_flight = 0
        for payload in sent:
            udp.send(payload)
            in_flight += 1
            if in_flight == WINDOW:
                for _ in range(in_flight):
                    try:
                        received.append(udp.recv(2))
                    except TimeoutError:
                        lost += 1
                in_flight = 0
        for _ in range(in_flight):
            try:
                received.append(udp.recv(2))
            except TimeoutError:
                lost += 1
    # UDP may reorder in principle; on loopback through one relay it does not, but compare as
    # sets of digests so that only loss fails the test.
    assert lost == 0, f"{lost} of {MANY} datagrams lost on loopback"
    assert sorted(map(_digest1, received)) == sorted(map(_digest1, sent))


def _digest1(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.made: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def test_asyncio_boundaries_and_content(dante: peers.Daemon, udp_echo: peers.UdpEcho) -> None:
    sent = _payloads()

    async def main() -> None:
        transport, protocol = await hopcat.aio.create_datagram_endpoint(
            _Collect, udp_echo.host, udp_echo.port, via=dante.url, timeout=10
        )
        assert protocol.made is transport
        received = []
        try:
            for payload in sent:
                transport.sendto(payload)
                async with asyncio.timeout(5):
                    data, addr = await protocol.queue.get()
                assert addr == (udp_echo.host, udp_echo.port)
                received.append(data)
            transport.sendto(b"to the target", (udp_echo.host, udp_echo.port))
            async with asyncio.timeout(5):
                assert (await protocol.queue.get())[0] == b"to the target"
            with pytest.raises(ValueError):
                transport.sendto(b"x", ("127.0.0.1", 9))
            assert transport.get_protocol() is protocol  # as asyncio's own transports answer
            other = _Collect()
            transport.set_protocol(other)
            transport.sendto(b"to the other protocol")
            async with asyncio.timeout(5):
                assert (await other.queue.get())[0] == b"to the other protocol"
            transport.set_protocol(protocol)
        finally:
            transport.close()
        async with asyncio.timeout(5):
            assert await protocol.lost is None
        assert [len(data) for data in received] == list(SIZES)
        assert _digest(received) == _digest(sent)
        assert transport.stats.received == 5

    asyncio.run(main())


def test_closing_ours_ends_it_at_the_proxy(
    danted_udp: peers.Daemon, udp_echo: peers.UdpEcho
) -> None:
    udp = hopcat.open_udp(udp_echo.host, udp_echo.port, via=danted_udp.url, timeout=10)
    udp.send(b"before")
    assert udp.recv(5) == b"before"
    # The same UDP socket (same port) outlives the association: only the control connection
    # closes, and the relay must stop carrying its datagrams.
    kept = socket.socket(fileno=os.dup(udp.fileno()))
    udp.close()
    with kept:
        kept.settimeout(1)
        wait_until_dropped = time.monotonic() + 5
        while time.monotonic() < wait_until_dropped:
            kept.send(socks5_udp.pack(udp_echo.host, udp_echo.port, b"after"))
            try:
                kept.recv(65536)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                break  # the relay's port is closed: ended just as well
        else:
            pytest.fail("the relay still carries datagrams after the control connection closed")
    assert udp_echo.received >= 1


def test_proxy_ending_ends_ours(tmp_path: Path, udp_echo: peers.UdpEcho) -> None:
    try:
        daemon = peers.start_danted(tmp_path / "danted", udp=True)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        udp = hopcat.open_udp(udp_echo.host, udp_echo.port, via=daemon.url, timeout=10)

        async def main() -> Any:
            return await hopcat.aio.create_datagram_endpoint(
                _Collect, udp_echo.host, udp_echo.port, via=daemon.url, timeout=10
            )

        loop = asyncio.new_event_loop()
        try:
            transport, protocol = loop.run_until_complete(main())
            daemon.stop()
            with pytest.raises(ConnectionResetError, match="association is over"):
                udp.recv(10)
            assert loop.run_until_complete(asyncio.wait_for(protocol.lost, 10)) is None
            assert transport.is_closing()
        finally:
            loop.close()
            udp.close()
    finally:
        daemon.stop()


def test_chain_connect_then_udp_associate(
    danted: peers.Daemon, danted_udp: peers.Daemon, udp_echo: peers.UdpEcho
) -> None:
    payload = os.urandom(1200)
    via = [danted.url, danted_udp.url]
    with hopcat.open_udp(udp_echo.host, udp_echo.port, via=via, timeout=10) as udp:
        assert [hop.label for hop in udp.hops] == via
        udp.send(payload)
        assert udp.recv(5) == payload


def test_last_hop_not_socks5_refused(danted_udp: peers.Daemon, udp_echo: peers.UdpEcho) -> None:
    with pytest.raises(UsageError, match="UDP goes through SOCKS5 only") as caught:
        hopcat.open_udp(udp_echo.host, udp_echo.port, via=danted_udp.url_as("socks4"))
    assert caught.value.exit_code == os.EX_USAGE

    async def main() -> None:
        await hopcat.aio.create_datagram_endpoint(
            _Collect, udp_echo.host, udp_echo.port, via=danted_udp.url_as("socks4")
        )

    with pytest.raises(UsageError, match="UDP goes through SOCKS5 only"):
        asyncio.run(main())


def test_socks5_over_tls_last_hop(
    tmp_path: Path, certificates: Certificates, danted_udp: peers.Daemon,
    udp_echo: peers.UdpEcho,
) -> None:  # fmt: skip
    """The control connection inside TLS (socat's TLS in front of Dante), the datagrams in the
    clear to the relay, as RFC 1928 has them; the control connection's TLS stays quiet."""
    try:
        front = peers.start_socat_tls(tmp_path / "socat", danted_udp, certificates.cert,
                                      certificates.key)  # fmt: skip
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    sent = _payloads()
    try:
        context = certificates.client_context()
        via = front.url_as("socks5h+tls")

        async def main() -> list[bytes]:
            transport, protocol = await hopcat.aio.create_datagram_endpoint(
                _Collect, udp_echo.host, udp_echo.port, via=via, proxy_ssl=context, timeout=10
            )
            received = []
            try:
                for payload in sent:
                    transport.sendto(payload)
                    async with asyncio.timeout(5):
                        received.append((await protocol.queue.get())[0])
            finally:
                transport.close()
            async with asyncio.timeout(5):  # the TLS session's close included
                assert await protocol.lost is None
            return received

        with hopcat.open_udp(udp_echo.host, udp_echo.port, via=via, proxy_ssl=context) as udp:
            for payload in sent:
                udp.send(payload)
                assert udp.recv(5) == payload
            with pytest.raises(TimeoutError):
                udp.recv(0.3)  # no byte on the control connection reads as its end
        assert _digest(asyncio.run(main())) == _digest(sent)
    finally:
        front.stop()


def test_ipv6(tmp_path: Path) -> None:
    """Over IPv6 the request announces [::]:0: Dante refuses 0.0.0.0 from an IPv6 client with
    reply 8 (no IPv4 address amongst its internal ones)."""
    try:
        daemon = peers.start_danted(tmp_path / "danted", host=peers.LOOPBACK_V6, udp=True)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    payload = os.urandom(1200)
    try:
        with peers.UdpEcho(peers.LOOPBACK_V6) as echo:
            with hopcat.open_udp(echo.host, echo.port, via=daemon.url, timeout=10) as udp:
                assert udp.relay[0] == "::1"
                udp.send(payload)
                assert udp.recv(5) == payload

            async def main() -> tuple[bytes, Any]:
                transport, protocol = await hopcat.aio.create_datagram_endpoint(
                    _Collect, echo.host, echo.port, via=daemon.url, timeout=10
                )
                try:
                    transport.sendto(payload)
                    async with asyncio.timeout(5):
                        return await protocol.queue.get()
                finally:
                    transport.close()
                    async with asyncio.timeout(5):
                        await protocol.lost

            assert asyncio.run(main()) == (payload, (echo.host, echo.port))
    finally:
        daemon.stop()


def test_proxy_refusing_udp_associate(danted: peers.Daemon, udp_echo: peers.UdpEcho) -> None:
    """Dante without an ``udpassociate`` rule refuses: a ProxyError naming the hop and UDP."""
    with pytest.raises(ProxyError, match=r"\(reply 2\) for UDP to 127\.0\.0\.1:") as caught:
        hopcat.open_udp(udp_echo.host, udp_echo.port, via=danted.url, timeout=10)
    assert caught.value.hop == 1
    assert str(caught.value).startswith(f"proxy {danted.url} (hop 1/1): ")
