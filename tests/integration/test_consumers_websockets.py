"""hopcat's library under websockets: a real websockets server on loopback, reached through Dante.

``sock=`` is the supported way to put websockets on a hopcat tunnel: websockets has no hook for a
dialer, and its own ``proxy=`` speaks SOCKS only through python-socks. Both clients take a
connected socket and then speak HTTP and WebSocket over it, with the URI's host in ``Host:`` (and
as the TLS server name for ``wss://``):

* asyncio: ``websockets.asyncio.client.connect(uri, sock=await hopcat.aio.connect_socket(host,
  port, via=...))``
* threads: ``websockets.sync.client.connect(uri, sock=hopcat.create_connection((host, port),
  via=...))``

With ``sock=`` websockets ignores the proxy it would otherwise take from the environment
(``ws_proxy``, ``https_proxy``, ... since websockets 15), so the tunnel is not proxied twice; the
tests set ``ws_proxy`` to a dead port to show it. A proxy's refusal is hopcat's ``ProxyError``
(an ``OSError`` with ``errno``), raised before websockets is called.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator
from typing import Any

import peers
import pytest

import hopcat
import hopcat.aio
from hopcat.errors import ProxyError
from support import closed_port, pattern

asyncio_client = pytest.importorskip("websockets.asyncio.client")
asyncio_server = pytest.importorskip("websockets.asyncio.server")
sync_client = pytest.importorskip("websockets.sync.client")
sync_server = pytest.importorskip("websockets.sync.server")

pytestmark = pytest.mark.timeout(60)

TARGET = "localhost"  # a name, so socks5h carries it to Dante
BIG_MESSAGE = 1 << 20
# websockets refuses messages larger than max_size (1 MiB by default): leave room on both sides.
MAX_SIZE = 4 * BIG_MESSAGE
MESSAGES: list[str | bytes] = ["hello", "", b"\x00\xff" * 3, pattern(BIG_MESSAGE, 41), "bye"]
OPEN_TIMEOUT_S = 20.0


@pytest.fixture
def dead_env_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``ws_proxy`` pointing at a closed port: a client that used it could not connect."""
    with closed_port() as port:
        monkeypatch.setenv("ws_proxy", f"http://127.0.0.1:{port}")
        yield


async def echo(websocket: Any) -> None:
    async for message in websocket:
        await websocket.send(message)


def test_asyncio_client_with_sock_from_connect_socket(
    danted: peers.Daemon, dead_env_proxy: None
) -> None:
    async def exchange() -> list[str | bytes]:
        async with asyncio_server.serve(echo, peers.LOOPBACK_V4, 0, max_size=MAX_SIZE) as server:
            port = server.sockets[0].getsockname()[1]
            sock = await hopcat.aio.connect_socket(
                TARGET, port, via=danted.url_as("socks5h"), timeout=OPEN_TIMEOUT_S
            )
            echoed = []
            async with asyncio_client.connect(
                f"ws://{TARGET}:{port}/", sock=sock, max_size=MAX_SIZE
            ) as ws:
                for message in MESSAGES:
                    await ws.send(message)
                    echoed.append(await ws.recv())
            return echoed

    async def bounded() -> list[str | bytes]:
        async with asyncio.timeout(OPEN_TIMEOUT_S * 2):
            return await exchange()

    assert asyncio.run(bounded()) == MESSAGES


def test_sync_client_with_sock_from_create_connection(
    danted: peers.Daemon, dead_env_proxy: None
) -> None:
    def sync_echo(websocket: Any) -> None:
        for message in websocket:
            websocket.send(message)

    with sync_server.serve(sync_echo, peers.LOOPBACK_V4, 0, max_size=MAX_SIZE) as server:
        serving = threading.Thread(target=server.serve_forever, name="ws-echo")
        serving.start()
        try:
            port = server.socket.getsockname()[1]
            sock = hopcat.create_connection(
                (TARGET, port), OPEN_TIMEOUT_S, via=danted.url_as("socks5h")
            )
            with sync_client.connect(
                f"ws://{TARGET}:{port}/", sock=sock, max_size=MAX_SIZE, open_timeout=OPEN_TIMEOUT_S
            ) as ws:
                echoed = []
                for message in MESSAGES:
                    ws.send(message)
                    echoed.append(ws.recv(timeout=OPEN_TIMEOUT_S))
        finally:
            server.shutdown()
            serving.join(OPEN_TIMEOUT_S)
    assert echoed == MESSAGES


def test_refusal_is_raised_before_websockets_is_called(danted: peers.Daemon) -> None:
    with closed_port() as port:
        with pytest.raises(ProxyError) as from_sync:
            hopcat.create_connection((TARGET, port), OPEN_TIMEOUT_S, via=danted.url_as("socks5h"))
        with pytest.raises(ProxyError) as from_aio:
            asyncio.run(
                hopcat.aio.connect_socket(
                    TARGET, port, via=danted.url_as("socks5h"), timeout=OPEN_TIMEOUT_S
                )
            )
    for caught in (from_sync, from_aio):
        assert caught.value.errno == errno.ECONNREFUSED
        assert (caught.value.hop, caught.value.code) == (1, 5)
