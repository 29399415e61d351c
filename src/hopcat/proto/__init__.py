"""Sans-I/O proxy protocol machines, and the one place that picks a machine for a protocol.

Each protocol module is imported only when a machine of its kind is made: the client's start-up
pays for the protocol its proxy speaks and no other (tests/integration/test_startup.py).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._machine import ClientMachine, ServerMachine

# What ``client_machine`` speaks for each name; the scheme of a proxy URL maps onto these as
# hopcat._url describes (socks5h -> socks5, https -> http once TLS is up).
CLIENT_PROTOCOLS = ("socks4", "socks4a", "socks5", "http")
SERVER_PROTOCOLS = ("socks4", "socks5", "http")


def client_machine(
    protocol: str,
    host: str,
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> ClientMachine:
    """The client machine asking a ``protocol`` proxy to connect to ``host``:``port``.

    ``socks4`` sends only IPv4 addresses and refuses a name (LocalProtocolError); ``socks4a``
    sends names for the proxy to resolve, and ``username`` as its user id (SOCKS4 has no
    password). ``headers`` are extra CONNECT request headers (``http`` only). An unknown protocol
    is a ValueError.
    """
    if protocol == "socks5":
        from .socks5 import Socks5Client

        return Socks5Client(host, port, username=username, password=password)
    if protocol in ("socks4", "socks4a"):
        from .socks4 import Socks4Client

        return Socks4Client(host, port, user_id=username or "", socks4a=protocol == "socks4a")
    if protocol == "http":
        from .http_connect import HttpConnectClient

        return HttpConnectClient(host, port, username=username, password=password, headers=headers)
    raise ValueError(f"no client machine for protocol {protocol!r} (one of {CLIENT_PROTOCOLS})")


def server_machine(
    protocol: str, *, require_auth: bool = False, http_challenges: Sequence[str] | None = None
) -> ServerMachine:
    """The server machine for a client speaking ``protocol`` (what ``detect.detect`` names).

    With ``require_auth`` a SOCKS5 or HTTP client must authenticate; a SOCKS4 machine has no way
    to ask, so the server code refuses its ``Request`` itself. ``http_challenges``: the
    Proxy-Authenticate values of an HTTP 407 (see ``HttpConnectServer``).
    """
    if protocol == "socks5":
        from .socks5 import Socks5Server

        return Socks5Server(require_auth=require_auth)
    if protocol == "socks4":
        from .socks4 import Socks4Server

        return Socks4Server()
    if protocol == "http":
        from .http_connect import HttpConnectServer

        return HttpConnectServer(require_auth=require_auth, challenges=http_challenges)
    raise ValueError(f"no server machine for protocol {protocol!r} (one of {SERVER_PROTOCOLS})")
