"""hopcat: a fast, correct netcat for proxies and OpenSSH's ProxyCommand, and its engine as a
library.

``import hopcat`` stays cheap: the public names load their modules on first use.

* ``hopcat.create_connection((host, port), timeout, *, via=...)``: a proxied
  ``socket.create_connection``
* ``hopcat.open_tunnel(host, port, *, via=...)`` -> ``Tunnel`` (socket, per-hop information)
* ``hopcat.open_udp(host, port, *, via=...)`` -> ``Socks5Association``: UDP through SOCKS5
* ``hopcat.Proxy.from_url(url)``, ``hopcat.Chain.from_urls([...])``, ``Chain.from_env(host)``
* ``hopcat.aio``: the same for asyncio
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hopcat.client import Chain, Proxy, Tunnel, create_connection, open_tunnel, open_udp
    from hopcat.net.udp_socks5 import Socks5Association

__version__ = "0.1.0"
__all__ = ["Chain", "Proxy", "Socks5Association", "Tunnel", "__version__", "create_connection",
           "open_tunnel", "open_udp"]

_LAZY = {"Chain", "Proxy", "Tunnel", "create_connection", "open_tunnel", "open_udp"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from hopcat import client

        return getattr(client, name)
    if name == "Socks5Association":
        from hopcat.net.udp_socks5 import Socks5Association

        return Socks5Association
    if name == "aio":
        import importlib

        return importlib.import_module("hopcat.aio")
    raise AttributeError(f"module 'hopcat' has no attribute {name!r}")
