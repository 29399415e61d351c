"""aiohttp through hopcat: a connector whose connections are opened by ``hopcat.aio``.

    async with aiohttp.ClientSession(connector=HopcatConnector("socks5h://proxy:1080")) as s:
        async with s.get("https://example.com/") as response: ...

``HopcatConnector`` is an ``aiohttp.TCPConnector`` (limits, keep-alive, ``ssl=`` and
fingerprints as usual) whose connection hook opens a tunnel to the origin with
``hopcat.aio.create_connection`` and then, for https, lets aiohttp start its own TLS on it as it
does through its own proxies; after an https:// hop that TLS runs inside the proxy's
(``loop.start_tls`` over the proxy's TLS transport). Names are resolved where ``proxy_dns``
says (at the proxy by default): aiohttp's resolver and DNS cache are not used.

It overrides aiohttp's private ``_create_connection`` and calls its private
``_start_tls_connection`` and ``_factory``; ``tests/integration/test_contrib.py`` pins all three.
A ``ClientTimeout``'s ``sock_connect`` is hopcat's deadline over the whole open (None: none).
A request's ``proxy=`` (or one from the environment under ``trust_env=True``) is refused with a
ValueError: the connector's ``via`` is the route, and a second proxy would be silently skipped.
Errors: see ``hopcat.contrib._common``; a timeout reaches the session as hopcat's
``TimeoutError``, which aiohttp raises as its ``ConnectionTimeoutError`` (``ServerTimeoutError``
before aiohttp 3.10) from hopcat's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

import hopcat.aio
from hopcat.contrib._common import Route, kind_of
from hopcat.errors import UsageError

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.tracing import Trace

    from hopcat.client import Via

__all__ = ["HopcatConnector"]


class HopcatConnector(aiohttp.TCPConnector):
    """``aiohttp.TCPConnector`` whose connections go through ``via`` (see
    ``hopcat.create_connection``). ``proxy_dns``, ``proxy_ssl`` (the context for an https://
    proxy) and ``proxy_headers`` are hopcat's; every other argument is TCPConnector's, of which
    ``family`` is honoured, ``local_addr`` refused (ValueError), and ``resolver``,
    ``use_dns_cache``, ``ttl_dns_cache``, ``happy_eyeballs_delay`` and ``interleave`` have
    nothing to act on."""

    def __init__(
        self,
        via: Via,
        *,
        proxy_dns: str = "remote",
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_headers: Iterable[tuple[str, str]] = (),
        **connector_options: Any,
    ) -> None:
        if connector_options.get("local_addr") is not None:
            raise UsageError("HopcatConnector: hopcat.aio binds no source address (local_addr)")
        super().__init__(**connector_options)
        self._route = Route(
            via, proxy_dns=proxy_dns, proxy_ssl=proxy_ssl, proxy_headers=proxy_headers
        )

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        if req.proxy:
            raise UsageError(
                f"HopcatConnector goes through {self._route.chain!r}, not the request's proxy "
                f"{req.proxy.with_user(None)}: give no proxy= (or set trust_env=False)"
            )
        host, port = req.url.raw_host, req.port
        assert host is not None and port is not None
        try:
            transport, protocol = await hopcat.aio.create_connection(
                self._factory, host, port, timeout=timeout.sock_connect, family=self.family,
                **self._route.options(),
            )  # fmt: skip
        except TimeoutError:
            raise  # the session raises its ConnectionTimeoutError from it
        except OSError as exc:
            raise _connector_error(req, exc) from exc
        handler: ResponseHandler = protocol
        if req.is_ssl():
            _, handler = await self._start_tls_connection(transport, req, timeout)
        return handler


def _connector_error(req: ClientRequest, error: OSError) -> aiohttp.ClientConnectorError:
    """aiohttp's error for a failed open; its message shows ``os_error.strerror``, which is
    always None on hopcat's errors, so it gets a copy carrying hopcat's line."""
    os_error = OSError(error.errno, str(error))
    kind = kind_of(error)
    if kind in ("proxy", "unreachable"):
        return aiohttp.ClientProxyConnectionError(req.connection_key, os_error)
    return aiohttp.ClientConnectorError(req.connection_key, os_error)
