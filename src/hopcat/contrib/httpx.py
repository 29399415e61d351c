"""httpx through hopcat: transports whose connections are opened by hopcat's engine.

    client = httpx.Client(transport=HopcatTransport("socks5h://proxy:1080"))
    async with httpx.AsyncClient(transport=AsyncHopcatTransport(chain)) as client: ...

httpx keeps everything above the connection (HTTP/1.1 and HTTP/2, pooling, keep-alive, TLS
settings and verification from ``verify=``/``cert=``); hopcat opens each connection, as an
httpcore network backend, and httpcore then starts TLS to an https:// origin on it. After an
https:// hop that TLS runs inside the proxy's: ``NestedTLSSocket`` in the blocking transport,
``loop.start_tls`` over the proxy's TLS transport in the asyncio one.

The transports are ``httpx.HTTPTransport`` / ``AsyncHTTPTransport`` with their connection pool
rebuilt on hopcat's backend (httpx has no public hook for a network backend): the pool is the
private ``_pool`` both use, which ``tests/integration/test_contrib.py`` pins. httpx's connect
timeout (``httpx.Timeout(connect=...)``) is hopcat's deadline over the whole open. Errors: see
``hopcat.contrib._common``; the asyncio transport needs asyncio (not trio).
"""

from __future__ import annotations

import select
import ssl
from typing import TYPE_CHECKING, Any

import httpcore
import httpx

import hopcat
from hopcat.contrib._common import Route, cause_to_hopcat, kind_of

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable

    from hopcat.client import Tunnel, Via

__all__ = ["AsyncHopcatTransport", "HopcatTransport"]

# httpcore's failure to connect, by kind (hopcat.contrib._common); httpx maps each to its own.
_CONNECT_ERRORS: dict[str, type[Exception]] = {
    "timeout": httpcore.ConnectTimeout,
    "proxy": httpcore.ProxyError,
    "unreachable": httpcore.ConnectError,
    "other": httpcore.ConnectError,
}


def _connect_error(error: OSError) -> Exception:
    return _CONNECT_ERRORS[kind_of(error)](str(error))


def _pool_options(limits: httpx.Limits | None, **options: Any) -> dict[str, Any]:
    """httpcore pool arguments as httpx's transports build them from theirs."""
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        **options,
    }


class HopcatTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connections go through ``via`` (see ``hopcat.create_connection``).

    ``verify``, ``cert``, ``trust_env`` (for SSL variables only), ``http1``, ``http2``,
    ``limits``, ``retries``, ``local_address`` and ``socket_options`` are httpx's;
    ``proxy_dns``, ``proxy_ssl`` (the context for an https:// proxy) and ``proxy_headers`` are
    hopcat's. httpx's own ``proxy=`` and ``uds=`` do not exist here: ``via`` is the route.
    """

    def __init__(
        self,
        via: Via,
        *,
        proxy_dns: str = "remote",
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_headers: Iterable[tuple[str, str]] = (),
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        retries: int = 0,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> None:
        # Not HTTPTransport.__init__: it would build a pool and an SSL context (~30 ms) only
        # to have them replaced. It sets nothing but _pool, which the tests pin.
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        self._pool = httpcore.ConnectionPool(
            **_pool_options(
                limits, ssl_context=ssl_context, http1=http1, http2=http2, retries=retries,
                local_address=local_address, socket_options=socket_options,
                network_backend=_Backend(Route(
                    via, proxy_dns=proxy_dns, proxy_ssl=proxy_ssl, proxy_headers=proxy_headers,
                )),
            )
        )  # fmt: skip

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError as exc:
            cause_to_hopcat(exc)
            raise


class AsyncHopcatTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connections go through ``via`` on asyncio (uvloop
    too), opened by ``hopcat.aio``; arguments as ``HopcatTransport``'s, except that
    ``local_address`` cannot be given (hopcat.aio binds no source address)."""

    def __init__(
        self,
        via: Via,
        *,
        proxy_dns: str = "remote",
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_headers: Iterable[tuple[str, str]] = (),
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        retries: int = 0,
        socket_options: Iterable[Any] | None = None,
    ) -> None:
        # Not AsyncHTTPTransport.__init__, as in HopcatTransport.
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        self._pool = httpcore.AsyncConnectionPool(
            **_pool_options(
                limits, ssl_context=ssl_context, http1=http1, http2=http2, retries=retries,
                socket_options=socket_options,
                network_backend=_AsyncBackend(Route(
                    via, proxy_dns=proxy_dns, proxy_ssl=proxy_ssl, proxy_headers=proxy_headers,
                )),
            )
        )  # fmt: skip

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            cause_to_hopcat(exc)
            raise


# -- blocking ---------------------------------------------------------------------------------


class _Backend(httpcore.NetworkBackend):
    def __init__(self, route: Route) -> None:
        self._route = route

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            tunnel = hopcat.open_tunnel(
                host, port, timeout=timeout, **self._route.options(),
                source_address=None if local_address is None else (local_address, 0),
                socket_options=socket_options or (),
            )  # fmt: skip
        except OSError as exc:
            raise _connect_error(exc) from exc
        return _Stream(tunnel)


class _Stream(httpcore.NetworkStream):
    """A tunnel as httpcore's stream: the socket, or the TLS to the origin (nested after an
    https:// hop) once ``start_tls`` ran."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._origin_tls = False

    @property
    def _sock(self) -> Any:
        return self._tunnel._socket()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            data: bytes = self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._tunnel.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            self._sock.settimeout(timeout)
            self._tunnel.start_tls(ssl_context, server_hostname)
        except TimeoutError as exc:
            self.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            self.close()
            raise httpcore.ConnectError(str(exc)) from exc
        self._origin_tls = True
        return self

    def get_extra_info(self, info: str) -> Any:
        sock = self._tunnel.sock
        if sock is None:
            return None
        if info == "ssl_object":
            # The origin's TLS only: before start_tls an SSLSocket is the proxy's session.
            return sock if self._origin_tls else None
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "socket":
            return sock
        if info == "is_readable":
            return _readable(sock)
        return None


def _readable(sock: Any) -> bool:
    """Bytes (or the end) are waiting on an idle connection: httpcore then drops it."""
    if hasattr(sock, "pending") and sock.pending():  # SSLSocket, NestedTLSSocket
        return True
    fd = sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


# -- asyncio ----------------------------------------------------------------------------------


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, route: Route) -> None:
        self._route = route

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        import hopcat.aio

        try:
            reader, writer = await hopcat.aio.open_connection(
                host, port, timeout=timeout, **self._route.options()
            )
        except OSError as exc:
            raise _connect_error(exc) from exc
        raw = writer.get_extra_info("socket")
        for option in socket_options or ():
            raw.setsockopt(*option)
        return _AsyncStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._origin_tls = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import asyncio

        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import asyncio

        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        # Aborted, as httpcore's own asyncio streams close TLS (no close_notify exchange): a
        # graceful TLS close waits for the peer's close_notify, up to 30 s per TLS layer, and
        # an event loop that ends first leaves the sockets beneath unclosed. httpcore closes a
        # connection only after a complete exchange or a failure, so no request bytes are lost.
        self._writer.transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        import asyncio

        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._writer.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except OSError as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        self._origin_tls = True
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object") if self._origin_tls else None
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            return self._reader.at_eof() or self._writer.is_closing()
        return None
