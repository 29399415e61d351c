"""hopcat for asyncio: proxied connections on the running event loop (uvloop too).

The same engine as the command line and ``hopcat.create_connection``, awaited:

* ``open_connection(host, port, *, via=...)`` -> ``(StreamReader, StreamWriter)``
* ``create_connection(protocol_factory, host, port, *, via=...)`` -> ``(transport, protocol)``
* ``connect_socket(host, port, *, via=...)`` -> a connected non-blocking socket
* ``create_datagram_endpoint(protocol_factory, host, port, *, via=...)`` -> ``(transport,
  protocol)``: UDP through a SOCKS5 proxy (UDP ASSOCIATE), shaped like
  ``loop.create_datagram_endpoint(remote_addr=(host, port))``

Target bytes that arrived glued to the last proxy reply reach the reader, or the protocol's
``data_received``, first; the socket from ``connect_socket`` still holds them (exact reads). An
TLS proxy (https://, socks5+tls://) keeps its TLS session on the transport, so ``connect_socket`` refuses one, and
``ssl=`` (TLS to the target) layers TLS inside it. ``via``, ``timeout``, errors and the default
deadline are as in ``hopcat.client``; a cancellation at any await closes what was opened and stays
a cancellation (never a TimeoutError). ``hopcat.Chain`` is also an asyncssh tunnel
(``asyncssh.connect(host, tunnel=chain)``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from hopcat._endpoint import validate_host
from hopcat.client import _DEFAULT, DEFAULT_TIMEOUT_S, _target_tls_timeout, as_chain
from hopcat.errors import HopcatTimeoutError, UsageError
from hopcat.net.dial import interleave_families

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable

    from hopcat.aio._udp import Socks5DatagramTransport
    from hopcat.client import Chain, Via

__all__ = ["connect_socket", "create_connection", "create_datagram_endpoint", "open_connection"]

STREAM_LIMIT_BYTES = 2**16  # asyncio's own default for StreamReader


async def connect_socket(
    host: str,
    port: int,
    *,
    via: Via,
    timeout: float | None = _DEFAULT,
    proxy_dns: str = "remote",
    family: int = 0,
    proxy_headers: Iterable[tuple[str, str]] = (),
) -> socket.socket:
    """A connected non-blocking socket to host:port through ``via``; its next byte is the
    target's first. A TLS hop cannot be handed out this way (ValueError)."""
    from hopcat.aio._driver import TLS_HOP_REFUSED, SocketIO, run_plan
    from hopcat.net.engine import tunnel_plan

    chain = as_chain(via)
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout)
    if any(proxy.tls for proxy in chain):
        raise UsageError(TLS_HOP_REFUSED)
    if len(chain) == 0:
        return await _dial_direct(host, port, family, deadline)
    io = SocketIO(loop, family)
    plan = tunnel_plan(
        chain.fresh_hops(), host, port, proxy_dns=proxy_dns, family=family, exact=True,
        headers=list(proxy_headers), clock=loop.time,
    )  # fmt: skip
    try:
        await run_plan(plan, io, deadline)
    except BaseException:
        io.close()
        raise
    return io.hand_over(delayed_acks=False)


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    *,
    via: Via,
    timeout: float | None = _DEFAULT,
    proxy_dns: str = "remote",
    family: int = 0,
    ssl: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
    **_asyncssh: Any,
) -> tuple[asyncio.Transport, Any]:
    """Connect to host:port through ``via``; the protocol ``protocol_factory`` makes gets the
    transport, then any target bytes that came with the last proxy reply.

    ``ssl`` (an SSLContext) starts TLS to the target (``server_hostname`` defaults to ``host``);
    ``proxy_ssl`` is the context for TLS proxies (https://, socks5+tls://) (default: the system's CAs). Other
    keyword arguments, which asyncssh passes to a tunnel, are ignored.
    """
    from hopcat.aio._driver import TransportIO, run_plan
    from hopcat.net.engine import tunnel_plan

    chain = as_chain(via)
    if ssl is not None and server_hostname:
        server_hostname = validate_host(server_hostname, what="server_hostname")  # for SNI
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout)
    io = TransportIO(loop, family, context=_proxy_context(chain, proxy_ssl))
    try:
        if len(chain) == 0:
            sock = await _dial_direct(host, port, family, deadline)
            io.transport, _ = await loop.create_connection(lambda: io.protocol, sock=sock)
        else:
            plan = tunnel_plan(
                chain.fresh_hops(), host, port, proxy_dns=proxy_dns, family=family, exact=True,
                headers=list(proxy_headers), clock=loop.time,
            )  # fmt: skip
            await run_plan(plan, io, deadline)
        if ssl is not None:
            try:
                async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
                    await io.upgrade(server_hostname or host, ssl)
            except TimeoutError as exc:  # ours only: an outer cancellation stays one
                raise _target_tls_timeout(exc) from None
        protocol = protocol_factory()
    except BaseException:
        io.close()
        raise
    return _hand_over(io, protocol)


async def open_connection(
    host: str,
    port: int,
    *,
    via: Via,
    limit: int = STREAM_LIMIT_BYTES,
    **options: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` through ``via``; options as ``create_connection``'s."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, via=via, **options)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def create_datagram_endpoint(
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    host: str,
    port: int,
    *,
    via: Via,
    timeout: float | None = _DEFAULT,
    proxy_dns: str = "remote",
    family: int = 0,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
) -> tuple[Socks5DatagramTransport, Any]:
    """A UDP association with host:port through ``via``, whose last proxy must be SOCKS5 (as
    ``hopcat.open_udp``; ValueError otherwise). The transport's ``sendto(data)`` sends one
    datagram to the target; the protocol's ``datagram_received(data, (host, port))`` gets each
    one from it, the address as the relay named it. Datagrams dropped by the rules of
    ``hopcat.net.udp_socks5`` are counted in ``transport.stats``. When the proxy closes the
    control connection the transport closes (``connection_lost``); closing the transport closes
    the control connection, which ends the association at the proxy. ``timeout`` bounds the open.
    """
    from hopcat.aio._driver import TransportIO, run_plan
    from hopcat.aio._udp import Socks5DatagramTransport, _Control, _Relay
    from hopcat.net.engine import check_chain, tunnel_plan
    from hopcat.net.udp_socks5 import ANNOUNCE_UNKNOWN, DatagramCodec, relay_address

    chain = as_chain(via)
    if len(chain) == 0:
        raise UsageError("create_datagram_endpoint needs a SOCKS5 proxy; without one use the "
                         "loop's own")  # fmt: skip
    hops = chain.fresh_hops()
    check_chain(hops, proxy_dns, udp=True)
    loop = asyncio.get_running_loop()
    deadline = _deadline(loop, timeout)
    io = TransportIO(loop, family, context=_proxy_context(chain, proxy_ssl))
    try:
        plan = tunnel_plan(
            hops, host, port, proxy_dns=proxy_dns, family=family, exact=True,
            headers=list(proxy_headers), clock=loop.time, udp=ANNOUNCE_UNKNOWN,
        )  # fmt: skip
        opened = await run_plan(plan, io, deadline)
        control = io.transport
        assert control is not None and opened.relay is not None and opened.target is not None
        peer = control.get_extra_info("peername")
        relay = (relay_address(opened.relay, len(hops), str(peer[0])), opened.relay[1])
        codec = DatagramCodec(opened.target)
        caller = protocol_factory()
        udp, relay_protocol = await loop.create_datagram_endpoint(
            lambda: _Relay(codec, caller), remote_addr=relay
        )
    except BaseException:
        io.close()  # the UDP endpoint is the try's last step: it never needs closing here
        raise
    transport = Socks5DatagramTransport(udp, control, codec, relay)
    relay_protocol.transport = transport
    # The proxy may have closed while the UDP side was being set up.
    ended, lost = io.protocol.eof, io.protocol.closed
    control.set_protocol(_Control(udp, relay_protocol))
    caller.connection_made(transport)
    if lost:
        relay_protocol.control_lost()
    if ended:
        udp.close()
    return transport, caller


def _proxy_context(chain: Chain, proxy_ssl: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The TLS hops' context: the caller's, else the system's CAs when the chain has one."""
    if proxy_ssl is None and any(proxy.tls for proxy in chain):
        import ssl as ssl_module

        return ssl_module.create_default_context()
    return proxy_ssl


def _deadline(loop: asyncio.AbstractEventLoop, timeout: float | None) -> float:
    limit = DEFAULT_TIMEOUT_S if timeout is _DEFAULT else timeout
    return float("inf") if limit is None else loop.time() + limit


async def _dial_direct(host: str, port: int, family: int, deadline: float) -> socket.socket:
    from hopcat.aio._dial import dial
    from hopcat.aio._driver import resolve

    limit = None if deadline == float("inf") else deadline
    try:
        async with asyncio.timeout_at(limit):
            infos = await resolve(asyncio.get_running_loop(), host, port, family)
    except TimeoutError:  # asyncio's, so ours (an outer cancellation stays one)
        raise HopcatTimeoutError(f"resolve {host}: timed out") from None
    candidates = [(info[0], info[4]) for info in interleave_families(infos)]
    return await dial(candidates, deadline=limit, where=f"{host}:{port}")


def _hand_over(io: Any, protocol: Any) -> tuple[asyncio.Transport, Any]:
    """Give the transport to the caller's protocol, buffered bytes and end of stream first."""
    transport: asyncio.Transport = io.transport
    buffering = io.protocol
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if buffering.buffer:
        protocol.data_received(bytes(buffering.buffer))
        buffering.buffer.clear()
    # What the first protocol was told, the caller's is told once, in the same order; a
    # connection_lost still to come (a TLS transport closing after the peer's close_notify)
    # goes to the caller's protocol by itself.
    if buffering.peer_eof and not protocol.eof_received():
        transport.close()
    if buffering.closed:
        protocol.connection_lost(buffering.lost)
    return transport, protocol

