"""The library's conformance suite: every entry point x every hop kind, against real proxies.

Entry points: ``hopcat.create_connection``, ``hopcat.Proxy.connect`` (one hop),
``hopcat.open_tunnel``, ``hopcat.aio.open_connection`` (also on uvloop when importable),
``hopcat.aio.create_connection`` and ``hopcat.aio.connect_socket`` (which refuses an https://
hop: its TLS session cannot leave hopcat as a bare socket).

Hop kinds: socks4 (Dante), socks4a (``ssh -D``: Dante 1.4.2 has no 4a), socks5 and socks5h with
and without username auth (Dante), socks5h through microsocks, http with and without Basic auth
(tinyproxy), https (socat's TLS in front of tinyproxy), chains of two and three (the three-hop
one starts inside the https hop's TLS), and two scripted proxies in this process that relay to
the target: one sends the target's banner in the same segment as its last reply, one sends
every reply byte on its own.

The target speaks first (a banner, like sshd), then takes ``UP_BYTES`` and answers their SHA-256
and ``DOWN_BYTES`` of its own: both directions are checked by digest, and the banner proves no
byte glued to the last reply was lost. TLS to the target (``ssl=``) runs through an https:// hop
(TLS inside TLS), through a chain that starts with one, and through plain hops.

Daemons are module- or session-scoped; the whole module runs in about ten seconds.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import peers
import pytest

import hopcat
import hopcat.aio
from support import (
    HTTP_ESTABLISHED,
    SOCKS5_SUCCESS,
    Certificates,
    ScriptedServer,
    http_accept,
    pattern,
    recv_exact,
    recv_until,
    relay,
    socks5_accept,
)

BANNER = b"SSH-2.0-OpenSSH_9.2 conformance-target\r\n"
UP_BYTES = 256 << 10
DOWN_BYTES = 256 << 10
UP = pattern(UP_BYTES, 101)
DOWN = pattern(DOWN_BYTES, 202)
HEADER = UP_BYTES.to_bytes(8, "big")
TIMEOUT_S = 20.0
SPLIT_GAP_S = 0.001  # between single reply bytes: each leaves in a segment of its own


def _target_host() -> str:
    """The target by name, so that every hop resolves it where it should (here for socks4, at
    the proxy for the rest), when the name can only mean the target's listener."""
    try:
        addresses = {
            info[4][0] for info in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)
        }
    except OSError:
        return "127.0.0.1"
    return "localhost" if addresses == {"127.0.0.1"} else "127.0.0.1"


TARGET_HOST = _target_host()

try:
    import uvloop
except ImportError:
    uvloop = None


# --------------------------------------------------------------------------- the target


def _serve_target(conn: socket.socket, context: ssl.SSLContext | None) -> None:
    """Banner first; then UP_BYTES in -> their SHA-256 and DOWN out; then wait for the close."""
    if context is not None:
        conn = context.wrap_socket(conn, server_side=True)
    with conn:
        conn.sendall(BANNER)
        size = int.from_bytes(recv_exact(conn, 8), "big")
        digest = hashlib.sha256()
        left = size
        while left:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                raise ConnectionResetError(f"upload cut after {size - left} of {size} bytes")
            digest.update(chunk)
            left -= len(chunk)
        conn.sendall(digest.digest() + DOWN)
        while conn.recv(65536):
            pass


@pytest.fixture(scope="module")
def target() -> Iterator[ScriptedServer]:
    with ScriptedServer(lambda conn: _serve_target(conn, None)) as server:
        yield server


@pytest.fixture(scope="module")
def tls_target(certificates: Certificates) -> Iterator[ScriptedServer]:
    context = certificates.server_context()
    with ScriptedServer(lambda conn: _serve_target(conn, context)) as server:
        yield server


# --------------------------------------------------------------------------- the proxies


class Endpoint:
    """A scripted proxy as the hop table sees a daemon: ``url_as(scheme)``."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server

    def url_as(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.server.port}"


def _scripted(mode: str) -> Callable[[socket.socket], None]:
    """A SOCKS5 (first byte 5) or HTTP CONNECT proxy relaying to the target. ``glued``: the
    target's banner goes out in one send with the last reply; ``split``: every reply byte
    goes out alone."""

    def send(conn: socket.socket, data: bytes) -> None:
        if mode != "split":
            conn.sendall(data)
            return
        for byte in data:
            conn.sendall(bytes([byte]))
            time.sleep(SPLIT_GAP_S)

    def handler(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.recv(1, socket.MSG_PEEK) == b"\x05":
            host, port = socks5_accept(conn, lambda data: send(conn, data))
            reply = SOCKS5_SUCCESS
        else:
            host, port, _head = http_accept(conn)
            reply = HTTP_ESTABLISHED
        with socket.create_connection((host, port), timeout=10) as upstream:
            if mode == "glued":
                # A target that speaks first: its banner rides with our reply. (Under TLS to
                # the target the client speaks first; nothing can be glued, so wait no longer.)
                upstream.settimeout(0.2)
                try:
                    reply += recv_until(upstream, b"\n")
                except TimeoutError:
                    pass
                upstream.settimeout(10)
            send(conn, reply)
            relay(conn, upstream)

    return handler


@pytest.fixture(scope="module")
def glued() -> Iterator[Endpoint]:
    with ScriptedServer(_scripted("glued")) as server:
        yield Endpoint(server)


@pytest.fixture(scope="module")
def split() -> Iterator[Endpoint]:
    with ScriptedServer(_scripted("split")) as server:
        yield Endpoint(server)


# Each hop: (fixture, scheme). The fixture is fetched only by the cases that use it, so a
# missing program skips those cases alone.
HOP_KINDS: dict[str, list[tuple[str, str]]] = {
    "socks4": [("danted", "socks4")],
    "socks4a": [("ssh_socks", "socks4a")],
    "socks5": [("danted", "socks5")],
    "socks5h": [("danted", "socks5h")],
    "socks5-auth": [("danted_auth", "socks5")],
    "socks5h-auth": [("danted_auth", "socks5h")],
    "socks5h-microsocks": [("microsocks_shared", "socks5h")],
    "http": [("tinyproxy_shared", "http")],
    "http-auth": [("tinyproxy_auth_shared", "http")],
    "https": [("socat_https", "https")],
    "chain2": [("danted", "socks5h"), ("tinyproxy_shared", "http")],
    "chain3": [("socat_https", "https"), ("danted_auth", "socks5h"), ("microsocks_shared", "socks5")],
    "glued-socks5": [("glued", "socks5")],
    "glued-http": [("glued", "http")],
    "split-socks5": [("split", "socks5")],
    "split-http": [("split", "http")],
}
TLS_HOP_KINDS = ["https", "chain3", "socks5h", "split-http"]


def _urls(request: pytest.FixtureRequest, kind: str) -> list[str]:
    return [request.getfixturevalue(name).url_as(scheme) for name, scheme in HOP_KINDS[kind]]


# --------------------------------------------------------------------------- the exchange


def _check_sync(sock: Any) -> None:
    """Banner, upload, digest, download on a blocking socket-like object."""

    def read_exact(size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(min(size - len(data), 1 << 20))
            assert chunk, f"the tunnel closed after {len(data)} of {size} bytes"
            data += chunk
        return bytes(data)

    assert read_exact(len(BANNER)) == BANNER
    sock.sendall(HEADER + UP)
    assert read_exact(32) == hashlib.sha256(UP).digest()
    assert hashlib.sha256(read_exact(DOWN_BYTES)).digest() == hashlib.sha256(DOWN).digest()


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.changed = asyncio.Event()
        self.done = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.done = True
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.changed.set()
        self.lost.set_result(exc)

    async def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert not self.done, f"the tunnel closed after {len(self.buffer)} of {size} bytes"
            self.changed.clear()
            await self.changed.wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


async def _check_async(read_exact: Callable[[int], Any], write: Callable[[bytes], Any]) -> None:
    assert await read_exact(len(BANNER)) == BANNER
    await write(HEADER + UP)
    assert await read_exact(32) == hashlib.sha256(UP).digest()
    assert hashlib.sha256(await read_exact(DOWN_BYTES)).digest() == hashlib.sha256(DOWN).digest()


# --------------------------------------------------------------------------- entry points


def _via(urls: list[str]) -> Any:
    return urls[0] if len(urls) == 1 else urls


def _through_create_connection(host: str, port: int, urls: list[str], **tls: Any) -> None:
    with hopcat.create_connection((host, port), TIMEOUT_S, via=_via(urls), **tls) as sock:
        _check_sync(sock)


def _through_proxy_connect(host: str, port: int, urls: list[str], **tls: Any) -> None:
    (url,) = urls
    with hopcat.Proxy.from_url(url).connect(host, port, TIMEOUT_S, **tls) as sock:
        _check_sync(sock)


def _through_open_tunnel(host: str, port: int, urls: list[str], **tls: Any) -> None:
    with hopcat.open_tunnel(host, port, via=hopcat.Chain(urls), timeout=TIMEOUT_S,
                            **tls) as tunnel:  # fmt: skip
        assert len(tunnel.hops) == len(urls)
        assert all(hop.handshake_ms > 0 for hop in tunnel.hops)
        _check_sync(tunnel.sock)


async def _open_connection(host: str, port: int, urls: list[str], **tls: Any) -> None:
    reader, writer = await hopcat.aio.open_connection(host, port, via=_via(urls),
                                                      timeout=TIMEOUT_S, **tls)  # fmt: skip

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        await _check_async(reader.readexactly, write)
    finally:
        writer.close()
        await writer.wait_closed()  # TLS says goodbye over the loop, before it closes


async def _create_connection(host: str, port: int, urls: list[str], **tls: Any) -> None:
    transport, collector = await hopcat.aio.create_connection(
        Collector, host, port, via=hopcat.Chain(urls), timeout=TIMEOUT_S, **tls
    )

    async def write(data: bytes) -> None:
        transport.write(data)

    try:
        await _check_async(collector.read_exact, write)
    finally:
        transport.close()
        await collector.lost


async def _connect_socket(host: str, port: int, urls: list[str], **tls: Any) -> None:
    loop = asyncio.get_running_loop()
    sock = await hopcat.aio.connect_socket(host, port, via=_via(urls), timeout=TIMEOUT_S, **tls)

    async def read_exact(size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await loop.sock_recv(sock, min(size - len(data), 1 << 20))
            assert chunk, f"the tunnel closed after {len(data)} of {size} bytes"
            data += chunk
        return bytes(data)

    async def write(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    with sock:
        assert not sock.getblocking()
        await _check_async(read_exact, write)


def _on_loop(
    opener: Callable[..., Any], factory: Callable[[], Any] | None = None
) -> Callable[..., None]:
    def run(*args: Any, **kwargs: Any) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(opener(*args, **kwargs), TIMEOUT_S * 2))

    return run


ENTRIES: dict[str, Callable[..., None]] = {
    "create_connection": _through_create_connection,
    "Proxy.connect": _through_proxy_connect,
    "open_tunnel": _through_open_tunnel,
    "aio.open_connection": _on_loop(_open_connection),
    "aio.create_connection": _on_loop(_create_connection),
    "aio.connect_socket": _on_loop(_connect_socket),
}
if uvloop is not None:
    ENTRIES["aio.open_connection@uvloop"] = _on_loop(_open_connection, uvloop.new_event_loop)


def _cases(kinds: list[str], *, tls: bool) -> list[Any]:
    cases = []
    for kind in kinds:
        for entry in ENTRIES:
            if entry == "Proxy.connect" and len(HOP_KINDS[kind]) > 1:
                continue  # one proxy
            if tls and entry == "aio.connect_socket":
                continue  # a bare socket carries no TLS of ours
            cases.append(pytest.param(kind, entry, id=f"{kind}-{entry}"))
    return cases


def _tls_options(kind: str, certificates: Certificates) -> dict[str, Any]:
    if any(scheme == "https" for _name, scheme in HOP_KINDS[kind]):
        return {"proxy_ssl": certificates.client_context()}
    return {}


@pytest.mark.parametrize(("kind", "entry"), _cases(list(HOP_KINDS), tls=False))
def test_banner_and_both_directions_arrive_whole(
    request: pytest.FixtureRequest, target: ScriptedServer, certificates: Certificates,
    kind: str, entry: str,
) -> None:  # fmt: skip
    urls = _urls(request, kind)
    options = _tls_options(kind, certificates)
    if entry == "aio.connect_socket" and options:
        with pytest.raises(ValueError, match="a TLS proxy"):
            _on_loop(hopcat.aio.connect_socket)(TARGET_HOST, target.port, via=_via(urls))
        return
    ENTRIES[entry](TARGET_HOST, target.port, urls, **options)


@pytest.mark.parametrize(("kind", "entry"), _cases(TLS_HOP_KINDS, tls=True))
def test_tls_to_the_target_through_the_hops(
    request: pytest.FixtureRequest, tls_target: ScriptedServer, certificates: Certificates,
    kind: str, entry: str,
) -> None:  # fmt: skip
    """``ssl=``: after an https:// hop this is TLS inside the proxy's TLS."""
    urls = _urls(request, kind)
    options = {"ssl": certificates.client_context(), **_tls_options(kind, certificates)}
    ENTRIES[entry](TARGET_HOST, tls_target.port, urls, **options)


def test_tls_to_the_target_checks_its_certificate(
    request: pytest.FixtureRequest, tls_target: ScriptedServer, certificates: Certificates
) -> None:
    """The inner handshake verifies the target as any TLS client does, inside the hop's TLS."""
    urls = _urls(request, "https")
    with pytest.raises(ssl.SSLCertVerificationError):
        _through_create_connection(TARGET_HOST, tls_target.port, urls,
                                   ssl=ssl.create_default_context(),
                                   proxy_ssl=certificates.client_context())  # fmt: skip
    with pytest.raises(ssl.SSLCertVerificationError):
        _on_loop(_open_connection)(TARGET_HOST, tls_target.port, urls,
                                   ssl=ssl.create_default_context(),
                                   proxy_ssl=certificates.client_context())  # fmt: skip


def test_every_entry_point_side_by_side_on_one_loop(
    danted: peers.Daemon, target: ScriptedServer
) -> None:
    """The asyncio entry points share a loop and the sync ones run in threads at the same time:
    nothing is global, nothing crosses between tunnels."""
    url = danted.url_as("socks5h")
    errors: list[BaseException] = []

    def sync_worker() -> None:
        try:
            _through_create_connection(TARGET_HOST, target.port, [url])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync_worker) for _ in range(4)]
    for thread in threads:
        thread.start()

    async def together() -> None:
        await asyncio.gather(*(opener(TARGET_HOST, target.port, [url]) for opener in
                               (_open_connection, _create_connection, _connect_socket) * 3))  # fmt: skip

    asyncio.run(together())
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not errors, errors


@pytest.mark.parametrize("entry", ["create_connection", "aio.open_connection", "aio.connect_socket"])
def test_target_first_bytes_are_not_held_behind_a_delayed_ack(
    microsocks_shared: peers.Daemon, banner_server: peers.BannerServer, entry: str
) -> None:
    """microsocks writes the target's banner right after its reply, without TCP_NODELAY: Nagle
    holds the banner until the reply is acknowledged, so every entry point quick-ACKs while it
    reads the handshake (measured for aio.open_connection: 44 ms to the banner without, 1.7
    ms with)."""
    via = microsocks_shared.url_as("socks5h")
    size = len(banner_server.banner)

    async def aio_open() -> None:
        if entry == "aio.open_connection":
            reader, writer = await hopcat.aio.open_connection("127.0.0.1", banner_server.port,
                                                              via=via)  # fmt: skip
            await reader.readexactly(size)
            writer.close()
            await writer.wait_closed()
            return
        sock = await hopcat.aio.connect_socket("127.0.0.1", banner_server.port, via=via)
        with sock:
            got = b""
            while len(got) < size:
                got += await asyncio.get_running_loop().sock_recv(sock, size - len(got))

    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        if entry == "create_connection":
            with hopcat.create_connection(("127.0.0.1", banner_server.port), 10, via=via) as sock:
                got = b""
                while len(got) < size:
                    got += sock.recv(size - len(got))
        else:
            asyncio.run(aio_open())
        best = min(best, time.perf_counter() - started)
    assert best < 0.02, f"{entry}: {best * 1000:.1f} ms to the banner"


@pytest.mark.parametrize("through", ["direct", "socks5"])
def test_source_address_binds_the_local_port(through: str) -> None:
    """``source_address=(host, port)`` as socket.create_connection takes it: bound before the
    connect (through proxies, the connection to the first hop)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        source_port = probe.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        peers_seen: list[int] = []

        def accept() -> None:
            conn, peer = server.accept()
            with conn:
                peers_seen.append(peer[1])
                if through == "socks5":
                    socks5_accept(conn, conn.sendall)
                    conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x01")
                conn.recv(1)

        thread = threading.Thread(target=accept)
        thread.start()
        port = server.getsockname()[1]
        via = hopcat.Chain() if through == "direct" else f"socks5h://127.0.0.1:{port}"
        target = ("127.0.0.1", port) if through == "direct" else ("target.example", 22)
        sock = hopcat.create_connection(target, 10, ("", source_port), via=via)
        sock.close()
        thread.join(10)
    assert peers_seen == [source_port]


def test_a_connection_to_itself_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError) as caught:
        hopcat.create_connection(("127.0.0.1", port), 10, ("127.0.0.1", port), via=hopcat.Chain())
    assert caught.value.errno == errno.ECONNREFUSED
