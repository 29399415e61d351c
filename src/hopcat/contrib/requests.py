"""requests (and urllib3) through hopcat: an adapter whose connection pools connect through it.

    session = requests.Session()
    adapter = ProxyAdapter("socks5h://proxy:1080")
    session.mount("http://", adapter)
    session.mount("https://", adapter)

``ProxyAdapter`` is a requests ``HTTPAdapter`` (retries, pool sizes, ``verify=``, ``cert=`` as
usual) whose urllib3 ``PoolManager`` makes its pools with connection classes that open their
socket with ``hopcat.create_connection``; urllib3 then does everything else, TLS to an https://
origin and its verification included. After an https:// hop the tunnel is the proxy's TLS
socket, which urllib3 cannot wrap a second time, so there hopcat starts the origin's TLS inside
it (``hopcat.net.nested_tls.NestedTLSSocket``) with the settings urllib3 would have used
(``verify``, ``cert``, CA files, TLS versions, ``server_hostname``); urllib3's
``assert_hostname`` cannot be honoured there and is refused.

It relies on urllib3's ``HTTPConnection._new_conn`` (private, the one place a connection opens
its socket) and ``PoolManager.pool_classes_by_scheme``; ``tests/integration/test_contrib.py``
pins both. requests' connect timeout is hopcat's deadline over the whole open; without one
(requests' default) the open is bounded by ``hopcat.client.DEFAULT_TIMEOUT_S``, reads are not.
``proxies=`` (or proxies requests finds in the environment) are refused
with a ValueError: the adapter's ``via`` is the route, and requests would otherwise send the
other proxy's ``Proxy-Authorization`` to the origin. Errors: see ``hopcat.contrib._common``.
"""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING, Any, cast

import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions
from urllib3.util import ssl_ as urllib3_ssl

import hopcat
from hopcat.client import DEFAULT_TIMEOUT_S
from hopcat.contrib._common import Route, cause_to_hopcat, kind_of
from hopcat.errors import UsageError

if TYPE_CHECKING:
    import socket
    from collections.abc import Iterable

    from hopcat.client import Via

__all__ = ["ProxyAdapter"]


class ProxyAdapter(requests.adapters.HTTPAdapter):
    """``requests.adapters.HTTPAdapter`` whose connections go through ``via`` (see
    ``hopcat.create_connection``). ``proxy_dns``, ``proxy_ssl`` (the context for an https://
    proxy) and ``proxy_headers`` are hopcat's; ``adapter_options`` are HTTPAdapter's
    (``pool_connections``, ``pool_maxsize``, ``max_retries``, ``pool_block``)."""

    def __init__(
        self,
        via: Via,
        *,
        proxy_dns: str = "remote",
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_headers: Iterable[tuple[str, str]] = (),
        **adapter_options: Any,
    ) -> None:
        # Before HTTPAdapter.__init__, which calls init_poolmanager.
        self._route = Route(
            via, proxy_dns=proxy_dns, proxy_ssl=proxy_ssl, proxy_headers=proxy_headers
        )
        super().__init__(**adapter_options)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        # The route reaches each connection through the pool's connection keywords; a pool
        # class with the route bound is what PoolManager calls as pool_cls(host, port, **kw).
        self.poolmanager.pool_classes_by_scheme = {
            "http": cast("type[urllib3.HTTPConnectionPool]",
                         functools.partial(_HTTPConnectionPool, hopcat_route=self._route)),
            "https": cast("type[urllib3.HTTPConnectionPool]",
                          functools.partial(_HTTPSConnectionPool, hopcat_route=self._route)),
        }  # fmt: skip

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        raise UsageError(
            f"ProxyAdapter goes through {self._route.chain!r}, not requests' proxy "
            f"{_redact(proxy)}: give no proxies= (or set session.trust_env = False)"
        )

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().send(request, *args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            cause_to_hopcat(exc)
            raise


def _redact(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _open(conn: urllib3.connection.HTTPConnection, route: Route, **tls: Any) -> Any:
    """The socket for ``conn``, opened by hopcat; ``tls``: hopcat runs the origin's TLS too."""
    # None (requests' default) or urllib3's _DEFAULT_TIMEOUT sentinel would let a proxy that
    # never answers hold the open for ever: it is bounded as hopcat's own opens are.
    timeout = conn.timeout if isinstance(conn.timeout, (int, float)) else DEFAULT_TIMEOUT_S
    try:
        return hopcat.create_connection(
            (conn.host, conn.port), timeout, conn.source_address,
            socket_options=conn.socket_options or (), **tls, **route.options(),
        )  # fmt: skip
    except ssl.SSLError:
        raise  # the origin's TLS: urllib3 makes it its SSLError, requests its SSLError
    except OSError as exc:
        raise _urllib3_error(conn, exc) from exc


def _urllib3_error(conn: Any, error: OSError) -> Exception:
    """The exception urllib3's own _new_conn raises for such a failure, or its ProxyError,
    which requests tells apart as ConnectTimeout, ProxyError and ConnectionError."""
    kind = kind_of(error)
    if kind == "timeout":
        return urllib3.exceptions.ConnectTimeoutError(conn, str(error))
    if kind in ("proxy", "unreachable"):
        return urllib3.exceptions.ProxyError(str(error), error)
    return urllib3.exceptions.NewConnectionError(conn, str(error))


class _ThroughHopcat:
    """What both connection classes add to urllib3's: the socket comes from hopcat."""

    def __init__(self, *args: Any, hopcat_route: Route, **kwargs: Any) -> None:
        self._route = hopcat_route
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        assert isinstance(self, urllib3.connection.HTTPConnection)
        sock: socket.socket = _open(self, self._route)
        return sock


class _HTTPConnection(_ThroughHopcat, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_ThroughHopcat, urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        if not self._route.tls_hop:
            super().connect()  # urllib3's TLS on the plain socket _new_conn gives it
            return
        if self.assert_hostname is not None:
            raise UsageError("assert_hostname cannot be honoured through an https:// proxy")
        context = self._origin_context()
        server_hostname = (self.server_hostname or self.host).rstrip(".")
        sock = _open(self, self._route, ssl=context, server_hostname=server_hostname)
        try:
            if self.assert_fingerprint:
                urllib3_ssl.assert_fingerprint(
                    sock.getpeercert(binary_form=True), self.assert_fingerprint
                )
        except BaseException:
            sock.close()
            raise
        self.sock = sock  # a NestedTLSSocket: the SSLSocket methods http.client uses
        self.is_verified = context.verify_mode == ssl.CERT_REQUIRED or bool(self.assert_fingerprint)

    def _origin_context(self) -> ssl.SSLContext:
        """The context urllib3's _ssl_wrap_socket_and_match_hostname would build and load."""
        cert_reqs = urllib3_ssl.resolve_cert_reqs(self.cert_reqs)
        context = self.ssl_context
        if context is None:
            context = urllib3_ssl.create_urllib3_context(
                ssl_version=urllib3_ssl.resolve_ssl_version(self.ssl_version),
                ssl_minimum_version=self.ssl_minimum_version,
                ssl_maximum_version=self.ssl_maximum_version,
                cert_reqs=cert_reqs,
            )
            if not (self.ca_certs or self.ca_cert_dir or self.ca_cert_data):
                context.load_default_certs()
        if self.assert_fingerprint:
            context.check_hostname = False
        context.verify_mode = cert_reqs
        if self.ca_certs or self.ca_cert_dir or self.ca_cert_data:
            context.load_verify_locations(self.ca_certs, self.ca_cert_dir, self.ca_cert_data)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file, self.key_password)
        context.set_alpn_protocols(urllib3_ssl.ALPN_PROTOCOLS)
        return context


class _HTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection
