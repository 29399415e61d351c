"""hopcat as a library: proxied connections shaped like ``socket.create_connection``.

The same engine as the command line (``hopcat.net.engine``) under a blocking driver: every hop
kind (socks4, socks4a, socks5, socks5h, http, https), chains of any length, names sent to the
proxy by default, and exact reads, so the returned socket's next byte is the target's first
byte even when it came in the same segment as the last proxy reply.

Errors are the CLI's, and all network-side ones are ``OSError`` (see ``hopcat.errors``): a
refusal or a malformed reply is a ``ConnectionError`` with ``.hop``, ``.proxy`` (password
redacted), ``.code`` and, where one fits, ``.errno``; a timeout is a ``TimeoutError``; bad
arguments are ``ValueError``.

Timeouts: ``timeout`` is one deadline over the whole open (local name lookups, every hop, TLS),
never per read, so a proxy that trickles bytes cannot stretch it. Left out, the open is bounded
by ``DEFAULT_TIMEOUT_S`` and the socket returned is blocking; given, the socket keeps it as its
timeout, as ``socket.create_connection`` does. ``None`` means no deadline at all.

Nothing here reads the environment: ``Chain.from_env`` applies ALL_PROXY / NO_PROXY as the CLI
does, when asked.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from hopcat._url import ProxyURL, parse_proxy_url

if TYPE_CHECKING:
    import ssl

    from hopcat.net.engine import HopInfo
    from hopcat.net.nested_tls import NestedTLSSocket
    from hopcat.net.udp_socks5 import Socks5Association

    # What a tunnel carries: a socket, or the TLS sessions of TLS hops (and the target's).
    TunnelSocket = socket.socket | NestedTLSSocket

__all__ = ["DEFAULT_TIMEOUT_S", "Chain", "Proxy", "Tunnel", "create_connection", "open_tunnel",
           "open_udp"]

# Long enough for a chain of slow proxies, short enough that a dead one is reported.
DEFAULT_TIMEOUT_S = 30.0


class _Default:
    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()


class Proxy:
    """One proxy, from a URL such as ``socks5h://user:pw@proxy:1080``. Immutable."""

    __slots__ = ("_url",)

    def __init__(self, url: ProxyURL) -> None:
        self._url = url

    @classmethod
    def from_url(cls, url: str, *, auth_schemes: str | None = None) -> Proxy:
        """Parse ``scheme://[user[:password]@]host[:port]``; ValueError when it is not one.

        ``auth_schemes`` (HTTP proxies): the schemes a 407 may be answered with, in order, as
        the CLI's ``--proxy-auth-scheme`` takes them (``"ntlm,digest"``; ``"basic"`` alone
        sends Basic with the first request); default: Negotiate, NTLM, Digest, Basic."""
        parsed = parse_proxy_url(url, origin="")
        parsed.origin = ""
        if auth_schemes is not None:
            from hopcat.net.proxy_auth import parse_scheme_list

            if parsed.protocol != "http":
                raise ValueError("auth_schemes is for HTTP proxies")
            parsed.auth_schemes = parse_scheme_list(auth_schemes)
        return cls(parsed)

    @property
    def scheme(self) -> str:
        """socks4, socks4a, socks5, socks5h, http, https, or one of the SOCKS ones + ``+tls``."""
        return self._url.scheme

    @property
    def tls(self) -> bool:
        """Whether the proxy is spoken to over TLS (https, socks5+tls, ...)."""
        return self._url.tls

    @property
    def host(self) -> str:
        """The proxy's host: a name or an address (IPv6 without brackets)."""
        return self._url.host

    @property
    def port(self) -> int:
        """The proxy's port (the scheme's default when the URL has none)."""
        return self._url.port

    @property
    def username(self) -> str | None:
        """The user name from the URL, or None; the password is never exposed."""
        return self._url.username

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``."""
        return self._url.label()

    @overload
    def connect(
        self, host: str, port: int, timeout: float | None = ..., *, ssl: None = None,
        **options: Any,
    ) -> socket.socket: ...

    @overload
    def connect(
        self, host: str, port: int, timeout: float | None = ..., *, ssl: ssl.SSLContext,
        **options: Any,
    ) -> TunnelSocket: ...

    def connect(
        self, host: str, port: int, timeout: float | None = _DEFAULT, *,
        ssl: ssl.SSLContext | None = None, **options: Any,
    ) -> TunnelSocket:
        """``create_connection((host, port), timeout, via=self, **options)``: python-socks'
        ``Proxy.from_url(url).connect(host, port)`` shape."""
        return create_connection((host, port), timeout, via=self, ssl=ssl, **options)

    def _copy(self) -> ProxyURL:
        url = self._url
        copy = ProxyURL(url.scheme, url.host, url.port, url.username, url.password, url.origin)
        copy.auth_schemes = url.auth_schemes
        return copy

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        mine, theirs = self._url, other._url
        return (mine.scheme, mine.host, mine.port, mine.username, mine.password) == (
            theirs.scheme, theirs.host, theirs.port, theirs.username, theirs.password
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash((self._url.scheme, self._url.host, self._url.port, self._url.username))

    def __repr__(self) -> str:
        return f"Proxy({self.url!r})"


class Chain(Sequence[Proxy]):
    """Proxies in order, first hop first. Immutable and reusable; an empty chain means direct.

    A chain is always true, even empty: asyncssh (``tunnel=chain``) tests its tunnel's truth,
    and an empty chain must be dialled by hopcat (directly, as asked), not skipped silently.
    """

    __slots__ = ("_proxies",)

    def __init__(self, proxies: Iterable[Proxy | str] = ()) -> None:
        items = []
        for proxy in proxies:
            if isinstance(proxy, str):
                proxy = Proxy.from_url(proxy)
            elif not isinstance(proxy, Proxy):
                raise TypeError(f"a chain holds Proxy objects or URL strings, not {proxy!r}")
            items.append(proxy)
        self._proxies = tuple(items)

    @classmethod
    def from_urls(cls, urls: Iterable[str]) -> Chain:
        """A chain of ``Proxy.from_url(url)`` for each URL, first hop first."""
        return cls(Proxy.from_url(url) for url in urls)

    @classmethod
    def from_env(cls, host: str, env: Mapping[str, str] | None = None) -> Chain:
        """The proxy the CLI would use for ``host`` from ALL_PROXY (all_proxy), SOCKS5_SERVER,
        SOCKS_SERVER or SOCKS4_SERVER, unless NO_PROXY (no_proxy) exempts it, with the user and
        password the CLI would take from the environment (never a prompt); ``env`` defaults to
        ``os.environ``. Empty when none applies. ValueError when a user has no password."""
        import os

        from hopcat._environment import (
            fill_users,
            password_from_environment,
            proxies_from_environment,
        )
        from hopcat.errors import UsageError

        environ = os.environ if env is None else env
        hops, _why = proxies_from_environment(environ, host)
        fill_users(hops, environ)
        for hop in hops:
            if hop.username is not None and hop.password is None and hop.protocol != "socks4":
                hop.password = password_from_environment(hop, environ)
                if hop.password is None:
                    raise UsageError(
                        f"proxy {hop.label()}: a user is given but no password; set "
                        "HOPCAT_PROXY_PASSWORD"
                    )
            hop.origin = ""
        return cls(Proxy(hop) for hop in hops)

    @overload
    def __getitem__(self, index: int) -> Proxy: ...

    @overload
    def __getitem__(self, index: slice) -> Chain: ...

    def __getitem__(self, index: int | slice) -> Proxy | Chain:
        if isinstance(index, slice):
            return Chain(self._proxies[index])
        return self._proxies[index]

    def __len__(self) -> int:
        return len(self._proxies)

    def __iter__(self) -> Iterator[Proxy]:
        return iter(self._proxies)

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and self._proxies == other._proxies

    def __hash__(self) -> int:
        return hash(self._proxies)

    def __repr__(self) -> str:
        return f"Chain([{', '.join(repr(proxy.url) for proxy in self._proxies)}])"

    def fresh_hops(self) -> list[ProxyURL]:
        """Fresh copies of the hops for one open: the engine never shares the caller's objects."""
        return [proxy._copy() for proxy in self._proxies]

    async def create_connection(
        self, protocol_factory: Any, host: str, port: int, **options: Any
    ) -> tuple[Any, Any]:
        """asyncssh's tunnel protocol: ``asyncssh.connect(host, tunnel=chain)`` opens the SSH
        connection through this chain (``hopcat.aio.create_connection``)."""
        from hopcat.aio import create_connection as aio_create_connection

        return await aio_create_connection(protocol_factory, host, port, via=self, **options)


Via = str | Proxy | Chain | Sequence[str | Proxy]


def as_chain(via: Via) -> Chain:
    """``via`` as a Chain: a URL, a Proxy, a Chain, or a sequence of URLs and Proxies."""
    if isinstance(via, Chain):
        return via
    if isinstance(via, (str, Proxy)):
        return Chain([via])
    if isinstance(via, Sequence):
        return Chain(via)
    raise TypeError(f"via must be a proxy URL, a Proxy, a Chain or a sequence of them, not {via!r}")


class Tunnel:
    """An open tunnel: ``sock`` (its next byte is the target's first), and what each hop did.

    A context manager that closes the socket, unless ``detach()`` took it.
    """

    __slots__ = ("hops", "sock")

    def __init__(self, sock: TunnelSocket, hops: tuple[HopInfo, ...]) -> None:
        self.sock: TunnelSocket | None = sock
        self.hops = hops

    def start_tls(
        self, context: ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> TunnelSocket:
        """TLS to the target over the tunnel; the TLS socket replaces ``sock`` and is returned.
        After a TLS hop it is a ``NestedTLSSocket`` (TLS inside the proxy's TLS)."""
        sock = self._socket()
        if server_hostname is not None:  # it goes into SNI: checked before any wire format
            from hopcat._endpoint import validate_host

            server_hostname = validate_host(server_hostname, what="server_hostname")
        self.sock = _wrap_target(sock, context, server_hostname)
        return self.sock

    def detach(self) -> TunnelSocket:
        """The socket, now the caller's to close."""
        sock = self._socket()
        self.sock = None
        return sock

    def close(self) -> None:
        """Close the socket (nothing if it was detached or is already closed)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _socket(self) -> TunnelSocket:
        if self.sock is None:
            raise ValueError("the tunnel is closed or detached")
        return self.sock

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tunnel({self.sock!r}, hops={list(self.hops)!r})"


def open_tunnel(
    host: str,
    port: int,
    *,
    via: Via,
    timeout: float | None = _DEFAULT,
    source_address: tuple[str, int] | None = None,
    proxy_dns: str = "remote",
    family: int = 0,
    ssl: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
) -> Tunnel:
    """Open a tunnel to host:port through ``via`` (see ``create_connection``)."""
    from hopcat.net.chain import open_tunnel as open_chain
    from hopcat.net.dial import dial_tcp

    chain = as_chain(via)
    if ssl is not None and server_hostname:  # it goes into SNI: checked before anything is sent
        from hopcat._endpoint import validate_host

        server_hostname = validate_host(server_hostname, what="server_hostname")
    limit = DEFAULT_TIMEOUT_S if timeout is _DEFAULT else timeout
    deadline = float("inf") if limit is None else time.monotonic() + limit
    source, source_port = None, 0
    if source_address is not None:
        source, source_port = source_address
        source = source or None  # socket.create_connection's ("", port): any local address
    info: tuple[HopInfo, ...] = ()
    sock: TunnelSocket
    if len(chain) == 0:
        sock = _full_socket(dial_tcp(host, port, deadline=deadline, family=family, source=source,
                                     source_port=source_port))  # fmt: skip
    else:
        opened = open_chain(
            chain.fresh_hops(), host, port, deadline=deadline, family=family, source=source,
            proxy_dns=proxy_dns, exact=True, context=proxy_ssl, headers=list(proxy_headers),
            delayed_acks=False, source_port=source_port,
        )  # fmt: skip
        sock, info = _full_socket(opened.sock), opened.hops
        if opened.layers is not None:
            from hopcat.net.nested_tls import NestedTLSSocket

            sock = NestedTLSSocket(sock, opened.layers)
    tunnel = Tunnel(sock, info)
    try:
        for level, option, value in socket_options:
            sock.setsockopt(level, option, value)
        if ssl is not None:
            sock.settimeout(_left(deadline))
            try:
                tunnel.start_tls(ssl, server_hostname or host)
            except TimeoutError as exc:  # the socket's timeout: the rest of the deadline
                raise _target_tls_timeout(exc) from None
        tunnel._socket().settimeout(None if timeout is _DEFAULT else timeout)
    except BaseException:
        tunnel.close()
        raise
    return tunnel


@overload
def create_connection(
    address: tuple[str, int],
    timeout: float | None = _DEFAULT,
    source_address: tuple[str, int] | None = None,
    *,
    via: Via,
    proxy_dns: str = "remote",
    family: int = 0,
    ssl: None = None,
    server_hostname: str | None = None,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
) -> socket.socket: ...


@overload
def create_connection(
    address: tuple[str, int],
    timeout: float | None = _DEFAULT,
    source_address: tuple[str, int] | None = None,
    *,
    via: Via,
    proxy_dns: str = "remote",
    family: int = 0,
    ssl: ssl.SSLContext,
    server_hostname: str | None = None,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
) -> TunnelSocket: ...


def create_connection(
    address: tuple[str, int],
    timeout: float | None = _DEFAULT,
    source_address: tuple[str, int] | None = None,
    *,
    via: Via,
    proxy_dns: str = "remote",
    family: int = 0,
    ssl: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
) -> TunnelSocket:
    """Connect to ``address`` (host, port) through ``via``: a proxy URL, a ``Proxy``, a
    ``Chain`` or a sequence of them (an empty ``Chain`` connects directly).

    Returns a connected socket whose next byte is the target's first; with ``ssl`` (an
    SSLContext), a TLS socket to the target (``server_hostname`` defaults to the target's host),
    its handshake within the same deadline; after an https:// hop that is a ``NestedTLSSocket``
    (TLS inside the proxy's TLS, with the SSLSocket methods clients use). ``proxy_ssl`` is the context for an https:// proxy
    (default: the system's CAs), ``proxy_headers`` go into every HTTP CONNECT, and
    ``socket_options`` (level, option, value) are set on the socket once it is connected.
    ``source_address`` (host, port) is bound before connecting, as ``socket.create_connection``
    does (``""``: any local address, port 0: any port); through proxies it is the connection
    to the first hop's.
    """
    host, port = address
    tunnel = open_tunnel(
        host, port, via=via, timeout=timeout, source_address=source_address,
        proxy_dns=proxy_dns, family=family, ssl=ssl, server_hostname=server_hostname,
        proxy_ssl=proxy_ssl, proxy_headers=proxy_headers, socket_options=socket_options,
    )  # fmt: skip
    return tunnel.detach()


def open_udp(
    host: str,
    port: int,
    *,
    via: Via,
    timeout: float | None = _DEFAULT,
    source_address: str | None = None,
    proxy_dns: str = "remote",
    family: int = 0,
    proxy_ssl: ssl.SSLContext | None = None,
    proxy_headers: Iterable[tuple[str, str]] = (),
) -> Socks5Association:
    """A UDP association with host:port through ``via``, whose last proxy must be SOCKS5
    (RFC 1928 UDP ASSOCIATE; ValueError otherwise, and for an empty chain: direct UDP needs no
    proxy). Earlier proxies carry the TCP control connection only; datagrams go from here to
    the relay address the SOCKS5 proxy answers, which must be reachable from here.

    The result's ``send(data)`` sends one datagram; ``recv(timeout=None)`` returns the next
    one's payload from the target (datagrams from elsewhere, fragments and malformed ones are
    dropped and counted in ``stats``), raising ConnectionResetError once the proxy closed the
    control connection (the association is over). Close it (or use ``with``) to end the
    association. ``timeout`` bounds the open only; ``source_address`` is the local address
    both sockets are bound to.
    """
    from hopcat.net.udp_socks5 import open_association

    chain = as_chain(via)
    if len(chain) == 0:
        from hopcat.errors import UsageError

        raise UsageError("open_udp needs a SOCKS5 proxy; for UDP without one use a UDP socket")
    limit = DEFAULT_TIMEOUT_S if timeout is _DEFAULT else timeout
    deadline = float("inf") if limit is None else time.monotonic() + limit
    return open_association(
        chain.fresh_hops(), host, port, deadline=deadline, family=family,
        source=source_address or None, proxy_dns=proxy_dns, context=proxy_ssl,
        headers=list(proxy_headers),
    )  # fmt: skip


def _left(deadline: float) -> float | None:
    if deadline == float("inf"):
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        from hopcat.errors import HopcatTimeoutError

        raise HopcatTimeoutError("no time left for the TLS handshake with the target")
    return left


def _target_tls_timeout(exc: TimeoutError) -> TimeoutError:
    """The deadline during the TLS handshake with the target, as a HopcatTimeoutError."""
    from hopcat.errors import HopcatTimeoutError

    if isinstance(exc, HopcatTimeoutError):
        return exc
    return HopcatTimeoutError("no TLS handshake with the target before the timeout")


def _full_socket(raw: Any) -> socket.socket:
    """The engine works on ``_socket.socket`` (cheaper to import); callers expect the module's
    class (makefile, sendfile, context manager)."""
    if isinstance(raw, socket.socket):
        return raw
    return socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())


def _wrap_target(
    sock: TunnelSocket, context: ssl.SSLContext | None, server_hostname: str | None
) -> TunnelSocket:
    import ssl as ssl_module

    from hopcat.net.nested_tls import NestedTLSSocket

    context = context or ssl_module.create_default_context()
    if isinstance(sock, NestedTLSSocket):
        sock.start_tls(context, server_hostname)
        return sock
    if isinstance(sock, ssl_module.SSLSocket):
        raise ValueError("TLS is already running to the target")
    return context.wrap_socket(sock, server_hostname=server_hostname)
