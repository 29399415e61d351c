"""open_tunnel in process: scripted proxies on loopback threads, no subprocess.

Each ScriptedProxy runs one function per accepted connection (the first connection, then any
second connection the wrong-scheme diagnosis opens), so a test states what the proxy does in a few
lines: answer SOCKS5, stall, close, reset, speak HTTP.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hopcat._url import parse_proxy_url
from hopcat.errors import (
    HopcatTimeoutError,
    ProtocolError,
    ProxyAuthError,
    ProxyError,
    RemoteProtocolError,
    ResolveError,
    UsageError,
)
from hopcat.net import chain, engine
from hopcat.net.chain import open_tunnel

BANNER = b"SSH-2.0-Scripted\r\n"
Script = Callable[[socket.socket], None]


class ScriptedProxy:
    """Accepts connections on loopback; connection N runs ``scripts[min(N, last)]``."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        workers = []
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            script = self.scripts[min(self.accepted, len(self.scripts) - 1)]
            self.accepted += 1
            worker = threading.Thread(target=self._run, args=(conn, script), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(5)

    def _run(self, conn: socket.socket, script: Script) -> None:
        conn.settimeout(10)
        try:
            with conn:
                script(conn)
        except OSError:
            pass
        except BaseException as exc:  # surfaced by close()
            self.errors.append(exc)

    def url(self, scheme: str, userinfo: str = "") -> str:
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()
        assert not self.errors, self.errors


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., ScriptedProxy]]:
    made: list[ScriptedProxy] = []

    def make(*scripts: Script) -> ScriptedProxy:
        proxy = ScriptedProxy(*scripts)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


def socks5_server(conn: socket.socket, *, reply: int = 0, after: bytes = b"") -> bytes:
    """Answer a no-auth greeting and one CONNECT; return the request's address bytes."""
    greeting = recv_exactly(conn, 2)
    recv_exactly(conn, greeting[1])
    conn.sendall(b"\x05\x00")
    head = recv_exactly(conn, 4)
    size = {1: 4, 4: 16}.get(head[3]) or recv_exactly(conn, 1)[0]
    address = recv_exactly(conn, size + 2)
    conn.sendall(bytes((5, reply, 0, 1, 0, 0, 0, 0, 0, 0)) + after)
    return address


def until_closed(conn: socket.socket) -> None:
    while conn.recv(4096):
        pass


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def tunnel(urls: list[str], host: str = "target.test", port: int = 22, **kwargs: object) -> chain.Tunnel:
    hops = [parse_proxy_url(url) for url in urls]
    kwargs.setdefault("deadline", time.monotonic() + 10)
    return open_tunnel(hops, host, port, **kwargs)  # type: ignore[arg-type]


# -- trailing bytes and exact mode ---------------------------------------------------------------

def test_banner_in_the_reply_segment_comes_back_as_trailing(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        socks5_server(conn, after=BANNER)
        until_closed(conn)

    proxy = proxy_factory(script)
    result = tunnel([proxy.url("socks5h")])
    result.sock.close()
    assert result.trailing == BANNER and result.layers is None


@pytest.mark.parametrize("scheme", ["socks5h", "socks4a", "http"])
def test_exact_mode_leaves_the_banner_in_the_socket(proxy_factory, scheme: str) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        if scheme == "socks5h":
            socks5_server(conn, after=BANNER)
        elif scheme == "socks4a":
            request = b""
            while request.count(b"\0") < 2:
                request += conn.recv(1)
            conn.sendall(b"\x00\x5a\x00\x00\x00\x00\x00\x00" + BANNER)
        else:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n" + BANNER)
        until_closed(conn)

    proxy = proxy_factory(script)
    result = tunnel([proxy.url(scheme)], exact=True)
    sock = socket.socket(fileno=result.sock.detach())
    with sock:
        assert result.trailing == b""
        sock.settimeout(5)
        assert recv_exactly(sock, len(BANNER)) == BANNER


def test_tolerant_http_status_lines(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"\r\nHTTP/1.0  200\tConnection established\r\n\r\n" + BANNER)
        until_closed(conn)

    proxy = proxy_factory(script)
    result = tunnel([proxy.url("http")])
    result.sock.close()
    assert result.trailing == BANNER


# -- errors name the hop ------------------------------------------------------------------------

def test_refusal_at_the_second_hop_names_it(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        assert socks5_server(conn)[:-2] == b"hop2.test"  # hop 1 is asked for hop 2 by name
        read_head(conn)  # hop 2's CONNECT rides through hop 1
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")

    proxy = proxy_factory(script)
    with pytest.raises(ProxyError) as info:
        tunnel([proxy.url("socks5h"), "http://u:secret@hop2.test:3128"])
    assert str(info.value) == (
        "proxy http://u:***@hop2.test:3128 (hop 2/2): HTTP 403 Forbidden for target.test:22"
    )
    assert info.value.exit_code == 81


def test_auth_failures_are_77_for_407_and_401(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def unauthorized(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b'HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm="x"\r\n\r\n')

    proxy = proxy_factory(unauthorized)
    with pytest.raises(ProxyAuthError) as info:
        tunnel([proxy.url("http", "u:wrong@")])
    assert info.value.exit_code == 77
    assert "HTTP 401 Unauthorized (proxy wants Basic; credentials rejected)" in str(info.value)
    assert "wrong" not in str(info.value)


def test_timeout_names_hop_and_budget(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(until_closed)
    with pytest.raises(HopcatTimeoutError) as info:
        tunnel([proxy.url("socks5h")], deadline=time.monotonic() + 0.3, timeout_label="after 0.3 s")
    assert str(info.value).startswith(f"proxy socks5h://127.0.0.1:{proxy.port} (hop 1/1): ")
    assert str(info.value).endswith("(after 0.3 s)")


@pytest.mark.parametrize("deadline", [math.inf, 1e300])
def test_no_or_distant_deadline_is_not_an_overflow(proxy_factory, deadline: float) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        socks5_server(conn)
        until_closed(conn)

    proxy = proxy_factory(script)
    result = tunnel([proxy.url("socks5h")], deadline=deadline)
    result.sock.close()


def test_events_are_described_in_words(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        socks5_server(conn)
        until_closed(conn)

    proxy = proxy_factory(script)
    lines: list[str] = []
    tunnel([proxy.url("socks5h")], trace=lines.append).sock.close()
    text = "\n".join(lines)
    assert "hop 1/1: SOCKS5 method: no authentication after" in text
    assert "MethodSelected" not in text and "Established(" not in text


# -- wrong scheme: found on a second connection ---------------------------------------------------

def http_proxy(conn: socket.socket) -> None:
    """Like tinyproxy: wait for a line, then answer it."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")


def socks5_only(conn: socket.socket) -> None:
    """Like Dante: a SOCKS5 greeting is answered, anything else is closed."""
    if conn.recv(3) == b"\x05\x01\x00":
        conn.sendall(b"\x05\x00")
        until_closed(conn)


@pytest.fixture
def quick_probe(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(engine, "SILENT_PROXY_PROBE_S", 0.3)
    return 0.3


@pytest.mark.parametrize("scheme", ["socks5h", "socks4a"])
def test_socks_to_an_http_proxy_fails_fast_with_a_hint(proxy_factory, quick_probe, scheme: str) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(http_proxy)
    started = time.monotonic()
    with pytest.raises(RemoteProtocolError) as info:
        tunnel([proxy.url(scheme)], deadline=time.monotonic() + 20)
    assert time.monotonic() - started < 5
    assert str(info.value).endswith("this looks like an HTTP proxy: use http://")
    assert info.value.exit_code == 76


def test_http_to_a_socks5_proxy_that_closes_gets_a_hint(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(socks5_only)
    with pytest.raises(RemoteProtocolError) as info:
        tunnel([proxy.url("http")])
    assert str(info.value).endswith("this looks like a SOCKS5 proxy: use socks5h://")


def test_slow_socks4_proxy_that_also_speaks_http_is_waited_for(proxy_factory, quick_probe) -> None:  # type: ignore[no-untyped-def]
    # hopcat serve speaks SOCKS and HTTP on one port: a slow SOCKS4 answer is not a wrong scheme.
    def slow_socks4(conn: socket.socket) -> None:
        request = conn.recv(64)
        time.sleep(quick_probe * 4)
        assert request[:1] == b"\x04"
        conn.sendall(b"\x00\x5a\x00\x00\x00\x00\x00\x00")
        until_closed(conn)

    def multi_protocol(conn: socket.socket) -> None:
        first = conn.recv(64)
        conn.sendall(b"\x05\x00" if first[:1] == b"\x05" else b"HTTP/1.1 400 Bad Request\r\n\r\n")

    proxy = proxy_factory(slow_socks4, multi_protocol)
    tunnel([proxy.url("socks4a")]).sock.close()
    assert proxy.accepted == 3  # the tunnel, then one probe in HTTP and one in SOCKS5


def test_a_slow_first_reply_is_never_disturbed(proxy_factory, quick_probe) -> None:  # type: ignore[no-untyped-def]
    def slow(conn: socket.socket) -> None:
        time.sleep(quick_probe * 3)
        socks5_server(conn, after=BANNER)
        until_closed(conn)

    proxy = proxy_factory(slow, until_closed)
    result = tunnel([proxy.url("socks5h")])
    result.sock.close()
    assert result.trailing == BANNER


# -- TLS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_bad_cacert_is_a_usage_error_before_connecting(proxy_factory, tmp_path: Path,
                                                       content: bytes | None) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(until_closed)
    cafile = tmp_path / "ca.pem"
    if content is not None:
        cafile.write_bytes(content)
    with pytest.raises(UsageError) as info:
        tunnel([proxy.url("https")], cafile=str(cafile))
    assert str(info.value).startswith(f"--proxy-cacert {cafile}: ")
    assert proxy.accepted == 0


def test_reset_during_tls_handshake_is_a_protocol_error(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def reset_after_hello(conn: socket.socket) -> None:
        conn.recv(4096)
        reset(conn)

    proxy = proxy_factory(reset_after_hello)
    with pytest.raises(ProtocolError) as info:
        tunnel([proxy.url("https")], insecure=True)
    assert info.value.exit_code == 76
    assert "TLS handshake failed" in str(info.value)


def test_https_to_a_plain_http_proxy_gets_a_hint(proxy_factory, quick_probe) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(http_proxy)
    with pytest.raises(RemoteProtocolError) as info:
        tunnel([proxy.url("https")], insecure=True)
    assert str(info.value).endswith("this looks like a plain HTTP proxy: use http://")


# -- names: -n, --proxy-dns none, scoped addresses ------------------------------------------------

def test_numeric_only_refuses_a_proxy_name() -> None:
    with pytest.raises(ResolveError) as info:
        tunnel(["socks5h://localhost:1080"], numeric_only=True)
    assert "-n" in str(info.value) and "(hop 1/1)" in str(info.value)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "words"),
    [
        ("socks4", {"numeric_only": True}, "-n forbids looking up names here"),
        ("socks5h", {"numeric_only": True, "proxy_dns": "local"}, "-n forbids"),
        ("socks5h", {"proxy_dns": "none"}, "--proxy-dns none sends only addresses"),
    ],
)
def test_target_names_never_resolved_when_forbidden(proxy_factory, scheme: str, kwargs: dict,
                                                    words: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    proxy = proxy_factory(until_closed)
    with pytest.raises(UsageError) as info:
        tunnel([proxy.url(scheme)], host="localhost", **kwargs)
    assert words in str(info.value)


def test_addresses_pass_with_numeric_only_and_proxy_dns_none(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        seen.append(socks5_server(conn))
        until_closed(conn)

    proxy = proxy_factory(script)
    tunnel([proxy.url("socks5h")], host="127.0.0.1", numeric_only=True).sock.close()
    tunnel([proxy.url("socks5h")], host="10.1.2.3", proxy_dns="none").sock.close()
    proxy.close()  # joins its scripts: a script records the address only after its reply
    assert seen == [bytes((127, 0, 0, 1, 0, 22)), bytes((10, 1, 2, 3, 0, 22))]


def test_scoped_target_is_refused_through_a_proxy(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(until_closed)
    with pytest.raises(UsageError) as info:
        tunnel([proxy.url("socks5h")], host="fe80::1%lo")
    assert "scoped address" in str(info.value)
