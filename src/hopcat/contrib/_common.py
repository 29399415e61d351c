"""What the adapters share: the route every connection of a client takes, and the sorting of
hopcat's errors into the few kinds HTTP clients tell apart.

The kinds, and what each adapter raises for them (hopcat's error is always the ``__cause__``):

===========  =====================  ==============  ==========================  ===============
kind         hopcat raised          httpx           aiohttp                     requests
===========  =====================  ==============  ==========================  ===============
timeout      HopcatTimeoutError     ConnectTimeout  ConnectionTimeoutError      ConnectTimeout
proxy        ProxyError,            ProxyError      ClientProxyConnectionError  ProxyError
             RemoteProtocolError
unreachable  ProxyUnreachableError  ConnectError    ClientProxyConnectionError  ProxyError
other        ConnectError,          ConnectError    ClientConnectorError        ConnectionError
             ResolveError, ...
===========  =====================  ==============  ==========================  ===============

"proxy" is a proxy that answered and refused (ProxyAuthError too), or answered wrongly (a TLS
handshake with an https:// proxy included); "unreachable" is the TCP connect to a proxy failing.
httpx's own proxy support draws that line the same way (its ProxyError is a proxy's answer, a
proxy it cannot reach a ConnectError) and requests' calls both a ProxyError; aiohttp's calls an
unreachable proxy a ClientProxyConnectionError, and here so is a refusal (its own
ClientHttpProxyError is an HTTP response, which a SOCKS refusal is not). "other" is a direct connect (an empty Chain) failing, and a ResolveError: a name that did
not resolve here may be the target's (``proxy_dns="local"``) as well as a proxy's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from hopcat.client import as_chain
from hopcat.errors import (
    HopcatError,
    ProxyError,
    ProxyUnreachableError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from hopcat.client import Chain, Via

Kind = Literal["timeout", "proxy", "unreachable", "other"]

# How far down a consumer's chain of wrapped exceptions hopcat's error may sit (httpx: two).
CAUSE_DEPTH = 8


class Route:
    """The chain every connection of one client goes through, with the options of each open.

    Immutable: a client's pools share it across threads and tasks.
    """

    __slots__ = ("chain", "proxy_dns", "proxy_headers", "proxy_ssl")

    def __init__(
        self,
        via: Via,
        *,
        proxy_dns: str = "remote",
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.chain: Chain = as_chain(via)
        self.proxy_dns = proxy_dns
        self.proxy_ssl = proxy_ssl
        self.proxy_headers = tuple(proxy_headers)

    @property
    def tls_hop(self) -> bool:
        """An https:// hop: the tunnel arrives as TLS, and TLS to the target nests inside it."""
        return any(proxy.tls for proxy in self.chain)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``hopcat.open_tunnel`` and ``hopcat.aio.create_connection``."""
        return {
            "via": self.chain, "proxy_dns": self.proxy_dns, "proxy_ssl": self.proxy_ssl,
            "proxy_headers": self.proxy_headers,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"Route({self.chain!r})"


def kind_of(error: OSError) -> Kind:
    """Which of the module docstring's kinds a failure to open a tunnel is."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ProxyUnreachableError):
        return "unreachable"
    if isinstance(error, (ProxyError, RemoteProtocolError)):
        return "proxy"
    return "other"


def hopcat_cause(exc: BaseException) -> HopcatError | None:
    """hopcat's error under a consumer's exception, following ``__cause__`` and ``__context__``
    (a consumer may re-raise with ``from None``, which keeps only the context)."""
    current: BaseException | None = exc
    for _ in range(CAUSE_DEPTH):
        if current is None:
            return None
        if isinstance(current, HopcatError):
            return current
        current = current.__cause__ or current.__context__
    return None


def cause_to_hopcat(exc: BaseException) -> None:
    """Make hopcat's error, wherever it sits under ``exc``, its direct ``__cause__``."""
    cause = hopcat_cause(exc)
    if cause is not None and cause is not exc:
        exc.__cause__ = cause
