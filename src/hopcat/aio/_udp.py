"""UDP through SOCKS5 on the event loop: ``hopcat.aio.create_datagram_endpoint``.

The engine's plan runs on a ``TransportIO`` (so a TLS last hop works as for TCP); its transport
becomes the control connection, watched by ``_Control``. The datagrams go on a UDP transport
connected to the relay, under ``_Relay``, which unwraps them with the sync API's
``DatagramCodec`` (same drop rules, same counts) and hands the caller's protocol the payload and
the address the relay named. Either side ending ends the other: the control connection closing
closes the UDP transport, and closing ours (``transport.close()``) closes the control
connection, which tells the proxy the association is over (RFC 1928 section 7).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hopcat.net.datagram import DatagramStats
    from hopcat.net.udp_socks5 import DatagramCodec


class Socks5DatagramTransport(asyncio.DatagramTransport):
    """The caller's transport: ``sendto(data)`` (or with the target's address) sends one
    datagram to the target through the relay; ``stats`` counts them. ``get_extra_info`` adds
    ``"relay"`` (host, port) and ``"target"`` to the UDP transport's own keys."""

    def __init__(
        self, udp: asyncio.DatagramTransport, control: asyncio.Transport, codec: DatagramCodec,
        relay: tuple[str, int],
    ) -> None:  # fmt: skip
        super().__init__()
        self._own = {"relay": relay, "target": codec.target}
        self._udp = udp
        self._control = control
        self._codec = codec
        self.stats: DatagramStats = codec.stats

    def sendto(self, data: Any, addr: Any = None) -> None:
        if addr is not None and tuple(addr[:2]) != self._codec.target:
            raise ValueError(f"Invalid address: must be None or {self._codec.target}")
        self._udp.sendto(self._codec.pack(bytes(data)))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._own:
            return self._own[name]
        return self._udp.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._udp.is_closing()

    def close(self) -> None:
        self._control.close()
        self._udp.close()

    def abort(self) -> None:
        self._control.abort()
        self._udp.abort()

    def get_write_buffer_size(self) -> int:
        size: int = self._udp.get_write_buffer_size()  # type: ignore[attr-defined]
        return size

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        relay: _Relay = self._udp.get_protocol()  # type: ignore[assignment]
        relay.caller = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The caller's protocol (the one ``datagram_received`` goes to), as asyncio's own
        transports answer."""
        relay: _Relay = self._udp.get_protocol()  # type: ignore[assignment]
        return relay.caller


class _Relay(asyncio.DatagramProtocol):
    """Under the UDP transport: unwraps what the relay sends for the caller's protocol, and
    tells it ``connection_lost`` once both transports are done (a TLS control connection's
    close takes a round trip: a loop closed before it would find it open)."""

    def __init__(self, codec: DatagramCodec, caller: asyncio.DatagramProtocol) -> None:
        self.codec = codec
        self.caller = caller
        self.transport: Socks5DatagramTransport | None = None  # set before any datagram
        self._udp_lost = self._control_lost = False
        self._exc: Exception | None = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # The UDP transport is connected to the relay: the kernel drops other sources.
        unpacked = self.codec.unpack(data)
        if unpacked is not None:
            self.caller.datagram_received(unpacked.data, (unpacked.host, unpacked.port))

    def error_received(self, exc: Exception) -> None:
        self.caller.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._udp_lost = True
        self._exc = exc
        if self.transport is not None:
            self.transport._control.close()
        self._finish()

    def control_lost(self) -> None:
        self._control_lost = True
        self._finish()

    def _finish(self) -> None:
        if self._udp_lost and self._control_lost:
            self.caller.connection_lost(self._exc)


class _Control(asyncio.Protocol):
    """Under the control connection: its end (or any byte: a SOCKS5 proxy sends none after its
    reply) ends the association."""

    def __init__(self, udp: asyncio.DatagramTransport, relay: _Relay) -> None:
        self.udp = udp
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.udp.close()

    def eof_received(self) -> bool:
        self.udp.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.udp.close()
        self.relay.control_lost()
