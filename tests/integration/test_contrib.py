"""The adapters in hopcat.contrib under their real consumers: httpx (blocking and asyncio),
aiohttp and requests fetching from local HTTP and HTTPS origins through Dante (socks5h, the
name resolved by Dante) and through an https:// proxy (socat's TLS in front of tinyproxy, so TLS
to an https origin runs inside the proxy's TLS; the asyncio ones on uvloop too), and 100
concurrent aiohttp requests through one Dante.

Failures: a proxy that accepts and never answers gives each consumer its own connect timeout,
on time; a refusal, an unreachable proxy and a refused direct connect give each consumer the
exception the table in ``hopcat.contrib._common`` names, with hopcat's error as ``__cause__``.
The private hooks the adapters use in their consumers are pinned here by name and signature, so
a consumer release that renames one fails these tests loudly instead of quietly bypassing the
proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import inspect
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest

import hopcat
from hopcat.errors import (
    ConnectError,
    HopcatTimeoutError,
    ProxyError,
    ProxyUnreachableError,
)
from support import closed_port, make_certificates, pattern

httpx = pytest.importorskip("httpx")
httpcore = pytest.importorskip("httpcore")
aiohttp = pytest.importorskip("aiohttp")
requests = pytest.importorskip("requests")
urllib3 = pytest.importorskip("urllib3")

from hopcat.contrib.aiohttp import HopcatConnector  # noqa: E402
from hopcat.contrib.httpx import AsyncHopcatTransport, HopcatTransport  # noqa: E402
from hopcat.contrib.requests import ProxyAdapter  # noqa: E402

pytestmark = pytest.mark.timeout(60)

CONSUMERS = ["httpx", "httpx-async", "aiohttp", "requests"]
BIG_BYTES = 1 << 20  # one response larger than any buffer on the way
STALL_TIMEOUT_S = 0.5
# What "on time" allows past the deadline: a loaded 2-core machine, the consumer's own slack
# (aiohttp rounds its timeouts up past 5 s only).
STALL_MARGIN_S = 0.5
CONCURRENT = 100


# --------------------------------------------------------------------------- peers


class Origin:
    """An HTTP/1.1 origin on 127.0.0.1 (TLS with ``context``), keep-alive; GET answers
    ``<path> <Host header>\\n``, and /big that line followed by 1 MiB of ``pattern``."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def setup(self) -> None:
                if context is not None:
                    # Here, in the connection's thread, not in the accepting one.
                    with contextlib.suppress(OSError):
                        self.request.do_handshake()
                super().setup()

            def do_GET(self) -> None:
                body = f"{self.path} {self.headers['Host']}\n".encode()
                if self.path == "/big":
                    body += pattern(BIG_BYTES, 7)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    super().handle()

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 2 * CONCURRENT  # a burst of connects must not overflow accept

            def get_request(self) -> tuple[Any, Any]:
                sock, address = super().get_request()
                if context is not None:
                    sock = context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                return sock, address

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.scheme = "http" if context is None else "https"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://localhost:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed (apt-get install openssl)")
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def origins(certificates: tuple[Path, Path, Path]) -> Iterator[dict[str, Origin]]:
    _ca, cert, key = certificates
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    started = {"http": Origin(), "https": Origin(server_context)}
    yield started
    for origin in started.values():
        origin.close()


@pytest.fixture(scope="module")
def tls_proxy(
    certificates: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An https:// proxy: socat's TLS listener in front of tinyproxy; yields its URL."""
    if not shutil.which("socat"):
        pytest.skip("socat not installed (apt-get install socat)")
    _ca, cert, key = certificates
    try:
        tinyproxy = peers.start_tinyproxy(tmp_path_factory.mktemp("tinyproxy"))
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    port = peers.pick_port()
    proc = subprocess.Popen(
        ["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},"
         "verify=0", f"TCP:{tinyproxy.host}:{tinyproxy.port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        peers.wait_until(lambda: peers.listening(proc.pid, "127.0.0.1", port), 10, "socat")
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        tinyproxy.stop()


@pytest.fixture(scope="module")
def stalled_proxy() -> Iterator[str]:
    """A proxy that accepts and never answers; yields its socks5h:// URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield f"socks5h://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


# --------------------------------------------------------------------------- consumers


def fetch(
    consumer: str, via: Any, urls: list[str], *, proxy_ca: Path | None = None,
    origin_ca: Path | None = None, timeout: float = 10.0,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> list[tuple[int, bytes]]:  # fmt: skip
    """GET each URL in turn on one client of ``consumer`` through ``via``; an https:// proxy's
    certificate is checked against the CA file ``proxy_ca``, an origin's against ``origin_ca``
    (None: the system's CAs)."""
    proxy_ssl = None if proxy_ca is None else ssl.create_default_context(cafile=str(proxy_ca))
    verify = True if origin_ca is None else ssl.create_default_context(cafile=str(origin_ca))
    if consumer == "httpx":
        transport = HopcatTransport(via, proxy_ssl=proxy_ssl, verify=verify)
        with httpx.Client(transport=transport, timeout=timeout) as client:
            return [(r.status_code, r.content) for r in map(client.get, urls)]
    if consumer == "httpx-async":
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_httpx_async(via, urls, proxy_ssl, verify, timeout))
    if consumer == "aiohttp":
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_aiohttp(via, urls, proxy_ssl, verify, timeout))
    assert consumer == "requests"
    with requests.Session() as session:
        session.trust_env = False
        adapter = ProxyAdapter(via, proxy_ssl=proxy_ssl)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        ca_file = True if origin_ca is None else str(origin_ca)
        return [(r.status_code, r.content)
                for r in (session.get(url, timeout=timeout, verify=ca_file) for url in urls)]  # fmt: skip


async def _httpx_async(
    via: Any, urls: list[str], proxy_ssl: ssl.SSLContext | None, verify: ssl.SSLContext | bool,
    timeout: float,
) -> list[tuple[int, bytes]]:  # fmt: skip
    transport = AsyncHopcatTransport(via, proxy_ssl=proxy_ssl, verify=verify)
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        return [(r.status_code, r.content) for r in [await client.get(url) for url in urls]]


async def _aiohttp(
    via: Any, urls: list[str], proxy_ssl: ssl.SSLContext | None, verify: ssl.SSLContext | bool,
    timeout: float,
) -> list[tuple[int, bytes]]:  # fmt: skip
    connector = HopcatConnector(via, proxy_ssl=proxy_ssl, ssl=verify)
    client_timeout = aiohttp.ClientTimeout(total=30, sock_connect=timeout)
    answers = []
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        for url in urls:
            async with session.get(url) as response:
                answers.append((response.status, await response.read()))
    return answers


# --------------------------------------------------------------------------- fetching


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("route", ["socks5h", "https-proxy"])
@pytest.mark.parametrize("consumer", CONSUMERS)
def test_fetch_through_a_proxy(
    consumer: str, route: str, scheme: str, origins: dict[str, Origin],
    certificates: tuple[Path, Path, Path], request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    if route == "socks5h":
        via = request.getfixturevalue("danted").url_as("socks5h")
    else:
        via = request.getfixturevalue("tls_proxy")
    origin = origins[scheme]
    ca = certificates[0]
    urls = [origin.url("/one"), origin.url("/big")]
    answers = fetch(consumer, via, urls, proxy_ca=ca, origin_ca=ca)
    host = f"localhost:{origin.port}"
    assert answers[0] == (200, f"/one {host}\n".encode())
    assert answers[1] == (200, f"/big {host}\n".encode() + pattern(BIG_BYTES, 7))


@pytest.mark.parametrize("consumer", ["httpx-async", "aiohttp"])
def test_asyncio_consumers_on_uvloop(
    consumer: str, tls_proxy: str, origins: dict[str, Origin],
    certificates: tuple[Path, Path, Path],
) -> None:  # fmt: skip
    """uvloop's own TLS transports: TLS to the origin inside the https:// proxy's."""
    uvloop = pytest.importorskip("uvloop")
    ca, origin = certificates[0], origins["https"]
    answers = fetch(
        consumer, tls_proxy, [origin.url("/big")], proxy_ca=ca, origin_ca=ca,
        loop_factory=uvloop.new_event_loop,
    )  # fmt: skip
    assert answers == [(200, f"/big localhost:{origin.port}\n".encode() + pattern(BIG_BYTES, 7))]


UNTRUSTED_ORIGIN: dict[str, type[BaseException]] = {
    "httpx": httpx.ConnectError,
    "httpx-async": httpx.ConnectError,
    "aiohttp": aiohttp.ClientConnectorCertificateError,
    "requests": requests.exceptions.SSLError,
}


# On CPython before 3.11.8 and 3.12.2 the asyncio consumers' own TLS inside hopcat's hit
# gh-113214 (a TypeError for the certificate error); hopcat mends its TLS transports for them.
@pytest.mark.parametrize("consumer", CONSUMERS)
def test_origin_certificate_checked_inside_an_https_proxy(
    consumer: str, tls_proxy: str, origins: dict[str, Origin],
    certificates: tuple[Path, Path, Path],
) -> None:  # fmt: skip
    """The proxy is trusted, the origin (same CA) is checked against the system's CAs: the
    nested TLS verifies the origin's certificate, and fails."""
    with pytest.raises(Exception) as caught:
        fetch(consumer, tls_proxy, [origins["https"].url()], proxy_ca=certificates[0])
    assert isinstance(caught.value, UNTRUSTED_ORIGIN[consumer]), repr(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value), caught.value


def test_aiohttp_concurrent_requests_through_one_proxy(
    danted: peers.Daemon, origins: dict[str, Origin]
) -> None:
    origin = origins["http"]

    async def main() -> list[bytes]:
        connector = HopcatConnector(danted.url_as("socks5h"), limit=CONCURRENT)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(index: int) -> bytes:
                async with session.get(origin.url(f"/{index}")) as response:
                    assert response.status == 200
                    return await response.read()

            return await asyncio.gather(*(one(index) for index in range(CONCURRENT)))

    bodies = asyncio.run(main())
    assert bodies == [f"/{index} localhost:{origin.port}\n".encode() for index in range(CONCURRENT)]


# --------------------------------------------------------------------------- failures

TIMEOUTS: dict[str, type[BaseException]] = {
    "httpx": httpx.ConnectTimeout,
    "httpx-async": httpx.ConnectTimeout,
    "aiohttp": aiohttp.ConnectionTimeoutError,
    "requests": requests.ConnectTimeout,
}
PROXY_REFUSED: dict[str, type[BaseException]] = {
    "httpx": httpx.ProxyError,
    "httpx-async": httpx.ProxyError,
    "aiohttp": aiohttp.ClientProxyConnectionError,
    "requests": requests.exceptions.ProxyError,
}
PROXY_UNREACHABLE: dict[str, type[BaseException]] = {
    "httpx": httpx.ConnectError,
    "httpx-async": httpx.ConnectError,
    "aiohttp": aiohttp.ClientProxyConnectionError,
    "requests": requests.exceptions.ProxyError,
}
DIRECT_REFUSED: dict[str, type[BaseException]] = {
    "httpx": httpx.ConnectError,
    "httpx-async": httpx.ConnectError,
    "aiohttp": aiohttp.ClientConnectorError,
    "requests": requests.ConnectionError,
}


def _raised(consumer: str, via: Any, url: str, timeout: float = 10.0) -> BaseException:
    with pytest.raises(Exception) as caught:
        fetch(consumer, via, [url], timeout=timeout)
    return caught.value


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_stalled_proxy_is_the_consumers_connect_timeout(
    consumer: str, stalled_proxy: str, origins: dict[str, Origin]
) -> None:
    started = time.monotonic()
    exc = _raised(consumer, stalled_proxy, origins["http"].url(), timeout=STALL_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert type(exc) is TIMEOUTS[consumer], repr(exc)
    assert isinstance(exc.__cause__, HopcatTimeoutError), repr(exc.__cause__)
    assert exc.__cause__.hop == 1
    assert STALL_TIMEOUT_S <= elapsed < STALL_TIMEOUT_S + STALL_MARGIN_S, elapsed


def test_requests_without_a_timeout_still_bounds_the_open(
    stalled_proxy: str, origins: dict[str, Origin], monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests waits for ever by default; the adapter bounds the open by hopcat's default
    deadline (shortened here)."""
    import hopcat.contrib.requests

    monkeypatch.setattr(hopcat.contrib.requests, "DEFAULT_TIMEOUT_S", STALL_TIMEOUT_S)
    with requests.Session() as session:
        session.trust_env = False
        session.mount("http://", ProxyAdapter(stalled_proxy))
        started = time.monotonic()
        with pytest.raises(requests.ConnectTimeout):
            session.get(origins["http"].url())
    assert time.monotonic() - started < STALL_TIMEOUT_S + STALL_MARGIN_S


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_target_refused_by_the_proxy(consumer: str, danted: peers.Daemon) -> None:
    with closed_port() as port:
        exc = _raised(consumer, danted.url_as("socks5h"), f"http://127.0.0.1:{port}/")
    assert type(exc) is PROXY_REFUSED[consumer], repr(exc)
    cause = exc.__cause__
    assert isinstance(cause, ProxyError), repr(cause)
    assert (cause.hop, cause.code, cause.protocol) == (1, 5, "socks5")
    assert cause.proxy == danted.url_as("socks5h")


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_proxy_unreachable(consumer: str) -> None:
    with closed_port() as port:
        exc = _raised(consumer, f"socks5h://127.0.0.1:{port}", "http://localhost:1/")
    assert type(exc) is PROXY_UNREACHABLE[consumer], repr(exc)
    assert isinstance(exc.__cause__, ProxyUnreachableError), repr(exc.__cause__)
    assert exc.__cause__.hop == 1


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_direct_connect_refused(consumer: str) -> None:
    """An empty Chain connects directly, through hopcat: a refusal is a plain connect error."""
    with closed_port() as port:
        exc = _raised(consumer, hopcat.Chain(), f"http://127.0.0.1:{port}/")
    assert type(exc) is DIRECT_REFUSED[consumer], repr(exc)
    cause = exc.__cause__
    assert type(cause) is ConnectError and cause.hop is None, repr(cause)


def test_requests_refuses_its_own_proxies(danted: peers.Daemon) -> None:
    """A proxy requests picked (proxies=, or the environment) is refused, password unshown."""
    with requests.Session() as session:
        session.mount("http://", ProxyAdapter(danted.url_as("socks5h")))
        with pytest.raises(
            ValueError, match=r"not requests' proxy http://proxy\.invalid:3128"
        ) as caught:
            session.get("http://localhost:1/", proxies={"http": "http://u:pw@proxy.invalid:3128"})
    assert "pw" not in str(caught.value)


def test_aiohttp_refuses_a_request_proxy(danted: peers.Daemon) -> None:
    async def main() -> None:
        connector = HopcatConnector(danted.url_as("socks5h"))
        async with aiohttp.ClientSession(connector=connector) as session:
            await session.get("http://localhost:1/", proxy="http://u:pw@proxy.invalid:3128")

    with pytest.raises(
        ValueError, match=r"not the request's proxy http://proxy\.invalid:3128"
    ) as caught:
        asyncio.run(main())
    assert "pw" not in str(caught.value)
    with pytest.raises(ValueError, match="local_addr"):
        HopcatConnector(danted.url_as("socks5h"), local_addr=("127.0.0.1", 0))


# --------------------------------------------------------------------------- pinned private hooks


def _parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_httpx_transports_hold_their_pool_in_private_pool() -> None:
    """HopcatTransport replaces ``_pool`` instead of calling HTTPTransport.__init__: httpx must
    still keep nothing else there and go through ``self._pool``."""
    for transport_class, method in [
        (httpx.HTTPTransport, httpx.HTTPTransport.handle_request),
        (httpx.AsyncHTTPTransport, httpx.AsyncHTTPTransport.handle_async_request),
    ]:
        assert set(vars(transport_class())) == {"_pool"}, transport_class
        assert "self._pool.handle" in inspect.getsource(method), method
    sync_pool = HopcatTransport("socks5h://127.0.0.1:1")._pool
    async_pool = AsyncHopcatTransport("socks5h://127.0.0.1:1")._pool
    assert type(sync_pool) is httpcore.ConnectionPool
    assert type(async_pool) is httpcore.AsyncConnectionPool
    assert type(sync_pool._network_backend).__module__ == "hopcat.contrib.httpx"


def test_aiohttp_private_hooks() -> None:
    connector_class = aiohttp.TCPConnector
    assert _parameters(connector_class._create_connection) == ["self", "req", "traces", "timeout"]
    assert _parameters(connector_class._start_tls_connection)[:4] == [
        "self", "underlying_transport", "req", "timeout"
    ]  # fmt: skip
    assert "_create_connection(req, traces, timeout)" in inspect.getsource(
        aiohttp.BaseConnector.connect
    )

    async def factory() -> Any:
        connector = HopcatConnector("socks5h://127.0.0.1:1")
        try:
            return connector._factory()
        finally:
            await connector.close()

    assert type(asyncio.run(factory())).__name__ == "ResponseHandler"


def test_urllib3_private_hooks() -> None:
    from urllib3.connection import HTTPConnection, HTTPSConnection

    assert _parameters(HTTPConnection._new_conn) == ["self"]
    assert "self._new_conn()" in inspect.getsource(HTTPConnection.connect)
    assert "self._new_conn()" in inspect.getsource(HTTPSConnection.connect)
    manager = urllib3.PoolManager()
    assert set(manager.pool_classes_by_scheme) == {"http", "https"}
    assert "self.pool_classes_by_scheme[scheme]" in inspect.getsource(manager._new_pool)
