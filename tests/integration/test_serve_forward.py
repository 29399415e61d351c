"""``hopcat serve`` forwarding plain HTTP (absolute-form requests) to real origins, with real
clients (curl, wget, pip, a WebSocket server) and raw sockets for the framing attacks.

The origin (``Origin``) parses with h11 on a thread and records every request exactly as it
arrived (method, target, headers, body) and how many connections it accepted, so each test
asserts what reached the origin, not only what came back.
"""

from __future__ import annotations

import base64
import hashlib
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h11
import peers
import pytest
from test_serve_support import IO_TIMEOUT_S, ServeProcess, serve_factory

from support import ScriptedServer, clean_env, closed_port, pattern, sha256

Serve = Callable[..., ServeProcess]
USER, PASSWORD = "alice", "fwd-s3cret"


class Origin:
    """A threaded HTTP/1.1 origin. Paths: ``/echo`` (the body back), ``/sha`` (the body's
    SHA-256), ``/bytes/N`` (N bytes, Content-Length), ``/chunked/N``, ``/close/N`` (close-
    delimited), ``/status/S``, ``/hop`` (hop-by-hop headers in the response), ``/continue``
    (a 100 before reading the body); anything else: 200 "ok"."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []
        self.connections = 0
        self.raw: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.requests = []
        self.raw = []
        self.connections = 0

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT_S)
        conn = h11.Connection(h11.SERVER)
        raw = bytearray()
        self.raw.append(raw)

        def events() -> Iterator[object]:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    raw.extend(data)
                    conn.receive_data(data)
                    continue
                yield event

        try:
            with sock:
                stream = events()
                while True:
                    request = next(stream)
                    if not isinstance(request, h11.Request):
                        return
                    path = request.target.decode()
                    if path == "/continue":
                        sock.sendall(
                            conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                        )
                    body = b""
                    for event in stream:
                        if isinstance(event, h11.EndOfMessage):
                            break
                        assert isinstance(event, h11.Data)
                        body += event.data
                    self.requests.append(
                        (request.method.decode(), path, list(request.headers.raw_items()), body)
                    )
                    if not self._respond(sock, conn, request, path, body):
                        return
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (OSError, h11.ProtocolError, StopIteration):
            return

    def _respond(self, sock: socket.socket, conn: h11.Connection, request: h11.Request,
                 path: str, body: bytes) -> bool:  # fmt: skip
        status, headers, data = 200, [("Content-Type", "application/octet-stream")], b"ok"
        if path in ("/echo", "/continue"):
            data = body
        elif path == "/sha":
            data = sha256(body).encode()
        elif path.startswith("/bytes/"):
            data = pattern(int(path[7:]), 3)
        elif path.startswith("/status/"):
            status, data = int(path[8:]), b""
        elif path == "/hop":
            headers += [("Connection", "X-Private"), ("X-Private", "1"), ("Keep-Alive", "timeout=5"),
                        ("Proxy-Authenticate", "Basic realm=x"), ("X-Kept", "yes")]  # fmt: skip
        elif path.startswith("/close/"):
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + pattern(int(path[7:]), 4)
            )
            return False
        if path.startswith("/chunked/"):
            sock.sendall(
                conn.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
            )
            data = pattern(int(path[9:]), 5)
            for start in range(0, len(data), 100_000):
                sock.sendall(conn.send(h11.Data(data=data[start : start + 100_000])))
        else:
            if status not in (204, 304):
                headers.append(("Content-Length", str(len(data))))
            sock.sendall(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD" and status not in (204, 304):
                sock.sendall(conn.send(h11.Data(data=data)))
        sock.sendall(conn.send(h11.EndOfMessage()))
        return True

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One open forwarding proxy for the tests that need no options of their own."""
    factory = serve_factory(tmp_path_factory.mktemp("fwd"))
    start = next(factory)
    yield start("--allow-open")
    next(factory, None)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


@pytest.fixture(autouse=True)
def _fresh(origin: Origin) -> None:
    origin.reset()


def curl(need: Callable[..., str], proxy: ServeProcess, *args: str,
         input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "30", "-x", f"http://{proxy.hostport}", *args],
        capture_output=True, timeout=40, env=clean_env(), input=input,
    )  # fmt: skip


def headers_of(origin: Origin, index: int = -1) -> dict[str, str]:
    return {n.decode().lower(): v.decode() for n, v in origin.requests[index][2]}


def read_head(conn: socket.socket) -> bytes:
    """Bytes up to the end of a head (and whatever came with it), or less at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def next_status(conn: h11.Connection, sock: socket.socket) -> int:
    """The status of the next response read from ``sock``, parsed by ``conn`` (which is told
    of a request for it, whatever the test sent)."""
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status


def raw_exchange(
    proxy: ServeProcess, data: bytes, *, responses: int = 1
) -> tuple[list[h11.Response], list[bytes], bool]:
    """Send ``data`` on one connection; read ``responses`` responses (fewer if it closes):
    (heads, bodies, whether the proxy closed the connection after them)."""
    conn = h11.Connection(h11.CLIENT)
    heads: list[h11.Response] = []
    bodies: list[bytes] = []
    with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(data)
        for _ in range(responses):
            # h11 must think it sent a request for each response it parses.
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                    continue
                if isinstance(event, h11.Response):
                    heads.append(event)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            bodies.append(body)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        closed = False
        announced = bool(heads) and (b"connection", b"close") in list(heads[-1].headers)
        try:
            sock.settimeout(3 if announced else 0.2)  # an open one is only probed
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return heads, bodies, closed


# --------------------------------------------------------------------------- real clients


def test_curl_get_head_post_put(proxy: ServeProcess, origin: Origin, need: Callable[..., str],
                                 tmp_path: Path) -> None:  # fmt: skip
    got = curl(need, proxy, f"{origin.base}/bytes/300000")
    assert got.returncode == 0, got.stderr
    assert sha256(got.stdout) == sha256(pattern(300000, 3))
    method, target, _, _ = origin.requests[-1]
    assert (method, target) == ("GET", "/bytes/300000")
    sent = headers_of(origin)
    assert sent["host"] == f"127.0.0.1:{origin.port}" and sent["via"] == "1.1 hopcat"
    assert "proxy-connection" not in sent

    head = curl(need, proxy, "-I", f"{origin.base}/bytes/1234")
    assert head.returncode == 0, head.stderr
    assert b"Content-Length: 1234" in head.stdout and b"Via: 1.1 hopcat" in head.stdout
    assert origin.requests[-1][0] == "HEAD"

    body = pattern(2_500_000, 9)
    (tmp_path / "body").write_bytes(body)
    post = curl(need, proxy, "--data-binary", f"@{tmp_path / 'body'}", f"{origin.base}/sha")
    assert post.returncode == 0, post.stderr
    assert post.stdout.decode() == sha256(body)
    assert headers_of(origin)["content-length"] == str(len(body))

    put = curl(need, proxy, "-T", "-", "-H", "Transfer-Encoding: chunked", f"{origin.base}/echo",
               input=body)  # fmt: skip
    assert put.returncode == 0, put.stderr
    assert sha256(put.stdout) == sha256(body)
    assert origin.requests[-1][0] == "PUT" and headers_of(origin)["transfer-encoding"] == "chunked"
    assert sha256(origin.requests[-1][3]) == sha256(body)

    big = curl(need, proxy, f"{origin.base}/chunked/3000000")
    assert sha256(big.stdout) == sha256(pattern(3_000_000, 5))
    closed = curl(need, proxy, f"{origin.base}/close/700000")
    assert sha256(closed.stdout) == sha256(pattern(700_000, 4))
    log = proxy.wait_log("method=PUT")
    assert "proto=http method=GET dest=127.0.0.1" in log and "status=200 result=ok" in log


def test_curl_keep_alive_several_urls(proxy: ServeProcess, origin: Origin,
                                      need: Callable[..., str]) -> None:  # fmt: skip
    urls = [f"{origin.base}/bytes/{n}" for n in (10, 20000, 30)] + [f"{origin.base}/status/204"]
    got = curl(need, proxy, "-w", "[connects=%{num_connects}]", *urls)
    assert got.returncode == 0, got.stderr
    # One connection to the proxy for all four.
    assert re.findall(rb"\[connects=(\d)\]", got.stdout) == [b"1", b"0", b"0", b"0"]
    assert origin.connections == 1  # and one to the origin, reused
    assert len(origin.requests) == 4


def test_raw_keep_alive_two_origins(proxy: ServeProcess, origin: Origin) -> None:
    other = Origin()
    try:
        requests = b"".join(
            f"GET http://127.0.0.1:{port}/bytes/5 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            for port in (origin.port, origin.port, other.port, origin.port)
        )
        heads, bodies, closed = raw_exchange(proxy, requests, responses=4)
        assert [h.status_code for h in heads] == [200] * 4 and not closed
        assert bodies == [pattern(5, 3)] * 4
        assert (origin.connections, other.connections) == (2, 1)
        assert len(origin.requests) == 3 and len(other.requests) == 1
    finally:
        other.close()


def test_wget(proxy: ServeProcess, origin: Origin, need: Callable[..., str]) -> None:
    result = subprocess.run(
        [need("wget"), "-q", "-O", "-", "--tries=1", "--timeout=20", f"{origin.base}/bytes/100000"],
        capture_output=True, timeout=40, env=clean_env(http_proxy=f"http://{proxy.hostport}"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == pattern(100000, 3)
    assert headers_of(origin)["via"] == "1.1 hopcat"


def test_pip_download(proxy: ServeProcess, tmp_path: Path) -> None:
    wheels = list((Path(sys.prefix) / "lib").glob("python3*/site-packages/h11-*.dist-info"))
    pip = Path(sys.prefix) / "bin" / "pip"
    if not pip.exists() or not wheels:
        pytest.skip("pip or h11 not in this venv")
    simple = tmp_path / "index" / "simple" / "h11"
    simple.mkdir(parents=True)
    _pack_installed_h11(simple)
    wheel = next(simple.glob("*.whl"))
    (simple / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    (simple.parent / "index.html").write_text('<a href="h11/">h11</a>\n')
    index = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(tmp_path / "index")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert index.stdout is not None
        line = index.stdout.readline().decode()
        port = int(line.split(" port ")[1].split(" ")[0])
        out = tmp_path / "out"
        result = subprocess.run(
            [str(pip), "--isolated", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
             "-d", str(out), "--index-url", f"http://127.0.0.1:{port}/simple/",
             "--proxy", f"http://{proxy.hostport}", "h11"],
            capture_output=True, timeout=120, env=clean_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (
            hashlib.sha256((out / wheel.name).read_bytes()).digest()
            == hashlib.sha256(wheel.read_bytes()).digest()
        )
        assert proxy.log().count(f"dest=127.0.0.1:{port} status=200 result=ok") >= 2
    finally:
        index.kill()
        index.wait(10)
        if index.stdout is not None:
            index.stdout.close()


def _pack_installed_h11(directory: Path) -> None:
    """A wheel of the installed h11 (pip wheel needs the sdist, which is not here)."""
    import zipfile

    import h11 as module

    package = Path(module.__file__).parent
    info = next(package.parent.glob("h11-*.dist-info"))
    with zipfile.ZipFile(directory / f"{info.name[:-10]}-py3-none-any.whl", "w") as wheel:
        for path in [*package.rglob("*.py"), *info.iterdir()]:
            if path.is_file():
                wheel.write(path, str(path.relative_to(package.parent)))


def test_websocket_upgrade(proxy: ServeProcess) -> None:
    from websockets.sync.server import serve as ws_serve

    def echo(ws: object) -> None:
        for message in ws:  # type: ignore[attr-defined]
            ws.send(message)  # type: ignore[attr-defined]

    with ws_serve(echo, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        key = base64.b64encode(b"0123456789abcdef").decode()
        head = (f"GET http://127.0.0.1:{port}/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n").encode()  # fmt: skip
        payload = b"hello through hopcat"
        mask = b"\x01\x02\x03\x04"
        frame = (
            bytes([0x81, 0x80 | len(payload)])
            + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
        with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(head)
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += sock.recv(4096)
            response, _, rest = reply.partition(b"\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 101 "), response
            accept = base64.b64encode(
                hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            assert b"\r\nSec-WebSocket-Accept: " + accept in response
            sock.sendall(frame)
            while len(rest) < 2 + len(payload):
                rest += sock.recv(4096)
            assert rest[: 2 + len(payload)] == bytes([0x81, len(payload)]) + payload
        proxy.wait_log("status=101")


def test_via_dante(serve: Serve, origin: Origin, danted: peers.Daemon,
                   need: Callable[..., str]) -> None:  # fmt: skip
    server = serve("--allow-open", "--via", danted.url)
    body = pattern(1_500_000, 11)
    got = curl(need, server, "--data-binary", "@-", f"{origin.base}/echo", f"{origin.base}/bytes/900000",
               input=body)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert sha256(got.stdout) == sha256(body + pattern(900_000, 3))
    assert origin.connections == 1  # the chain's connection was kept for the second request


# --------------------------------------------------------------------------- framing


def test_cl_and_te_together_refused(proxy: ServeProcess, origin: Origin) -> None:
    smuggle = (f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
               "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
               "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n").encode()  # fmt: skip
    heads, _bodies, closed = raw_exchange(proxy, smuggle)
    assert heads[0].status_code == 400 and closed
    assert origin.requests == []


def test_two_content_lengths_refused(proxy: ServeProcess, origin: Origin) -> None:
    data = (f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde").encode()  # fmt: skip
    heads, _bodies, closed = raw_exchange(proxy, data)
    assert heads[0].status_code == 400 and closed
    assert origin.requests == []


def test_obs_fold_and_bare_lf(proxy: ServeProcess, origin: Origin) -> None:
    get = f"GET {origin.base}/bytes/3 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
    # In the first head: refused (the hand-written machine).
    heads, _, closed = raw_exchange(proxy, (get + "X-A: 1\r\n  folded\r\n\r\n").encode())
    assert heads[0].status_code == 400 and closed and origin.requests == []
    # In a later head: h11 unfolds it; the origin gets one line, never the fold.
    heads, _, _ = raw_exchange(
        proxy, (get + "\r\n" + get + "X-A: 1\r\n  folded\r\n\r\n").encode(), responses=2
    )
    assert [h.status_code for h in heads] == [200, 200]
    assert b"\r\n  folded" not in origin.raw[-1] and headers_of(origin)["x-a"] == "1 folded"
    # Bare LF line ends: accepted and written with CRLF.
    origin.reset()
    lf = f"GET {origin.base}/bytes/3 HTTP/1.1\nHost: 127.0.0.1:{origin.port}\nX-B: 2\n\n".encode()
    heads, _, _ = raw_exchange(proxy, lf + lf, responses=2)
    assert [h.status_code for h in heads] == [200, 200]
    assert b"\nX-B: 2\r\n" in origin.raw[-1] and b"\n\n" not in origin.raw[-1]


def test_chunk_size_overflow(proxy: ServeProcess, origin: Origin) -> None:
    start = f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    heads, _, closed = raw_exchange(proxy, (start + "1" * 21 + "\r\nx\r\n0\r\n\r\n").encode())
    assert heads[0].status_code == 400 and closed
    # 2**64 + 1 wraps to 1 in a 64-bit parser; here it is a long chunk, the rest its data.
    wrapped = (
        start + "10000000000000001\r\nx\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(wrapped)
        time.sleep(0.5)
    time.sleep(0.3)
    assert all(target != "/smuggled" for _, target, _, _ in origin.requests)
    assert b"GET /smuggled" not in b"".join(origin.raw).split(b"\r\n\r\n", 1)[0]


def test_body_longer_than_announced(proxy: ServeProcess, origin: Origin) -> None:
    post = f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nContent-Length: 3\r\n\r\n"
    # The extra bytes are a request of their own: parsed and forwarded as such.
    nxt = f"GET {origin.base}/bytes/4 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    heads, bodies, _ = raw_exchange(proxy, (post + "abc" + nxt).encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 200] and bodies == [b"abc", pattern(4, 3)]
    assert [(m, t, b) for m, t, _, b in origin.requests] == [
        ("POST", "/echo", b"abc"),
        ("GET", "/bytes/4", b""),
    ]
    # Garbage after the body: 400, and nothing of it reaches the origin.
    origin.reset()
    heads, bodies, closed = raw_exchange(proxy, (post + "abcGARBAGE\r\n\r\n").encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 400] and closed
    assert [r[3] for r in origin.requests] == [b"abc"] and b"GARBAGE" not in b"".join(origin.raw)


def test_expect_100_continue(proxy: ServeProcess, origin: Origin) -> None:
    for path, wants_100 in (("/continue", True), ("/echo", False)):
        head = (f"POST {origin.base}{path} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
            sock.sendall(head)
            if wants_100:
                got = b""
                while b"\r\n\r\n" not in got:
                    got += sock.recv(4096)
                assert got.startswith(b"HTTP/1.1 100 ")
            else:
                time.sleep(0.3)  # like curl's wait for a 100 that never comes
            sock.sendall(b"hello")
            reply = b""
            while not reply.endswith(b"hello"):
                data = sock.recv(4096)
                assert data, reply
                reply += data
        assert origin.requests[-1][3] == b"hello"


def test_hop_by_hop_dropped(proxy: ServeProcess, origin: Origin) -> None:
    data = (f"GET {origin.base}/hop HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Connection: keep-alive\r\n"
            "Keep-Alive: 300\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
            "Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-End: yes\r\n\r\n").encode()  # fmt: skip
    heads, _, _ = raw_exchange(proxy, data)
    sent = headers_of(origin)
    for name in ("connection", "x-secret", "proxy-connection", "keep-alive", "te", "trailer",
                 "upgrade", "proxy-authorization"):  # fmt: skip
        assert name not in sent, name
    assert sent["x-end"] == "yes" and sent["via"] == "1.1 hopcat"
    back = {n.decode().lower() for n, _ in heads[0].headers.raw_items()}
    assert {"x-private", "keep-alive", "proxy-authenticate"}.isdisjoint(back)
    assert "x-kept" in back


# --------------------------------------------------------------------------- refusals


def test_error_statuses(proxy: ServeProcess, origin: Origin) -> None:
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
        (b"GET ftp://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
        (f"GET {origin.base}/ HTTP/1.1\r\nHost: example.org\r\n\r\n".encode(), 400),
    ]
    with closed_port() as port:
        cases.append(
            (
                f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
                502,
            )
        )
        for data, status in cases:
            heads, bodies, closed = raw_exchange(proxy, data)
            assert heads[0].status_code == status, data
            assert closed and bodies[0]
    # The same on a later request of a kept connection.
    ok = f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    heads, _, closed = raw_exchange(proxy, ok + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", responses=2)
    assert [h.status_code for h in heads] == [200, 400] and closed
    heads, _, closed = raw_exchange(
        proxy, ok + ok[:-4] + b"\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", responses=2
    )
    assert [h.status_code for h in heads] == [200, 431] and closed
    # A head still incomplete past the cap (h11's own limit).
    heads, _, closed = raw_exchange(
        proxy, ok + ok[:-4] + b"\r\nX-Big: " + b"a" * 70000, responses=2
    )
    assert [h.status_code for h in heads] == [200, 431] and closed
    # A URL over 8192 bytes: 414 on the first request (the machine) and a later one (h11) alike.
    long_get = f"GET {origin.base}/{'a' * 8200} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    heads, _, closed = raw_exchange(proxy, long_get.encode())
    assert heads[0].status_code == 414 and closed
    heads, _, closed = raw_exchange(proxy, ok + long_get.encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 414] and closed
    assert origin.requests and all(t == "/bytes/1" for _, t, _, _ in origin.requests)
    log = proxy.wait_log("status=431")
    assert "origin-form request" in log and "Host header names another authority" in log


def test_no_forward_and_rules(serve: Serve, origin: Origin, need: Callable[..., str]) -> None:
    off = serve("--allow-open", "--no-forward")
    heads, _, closed = raw_exchange(
        off, f"GET {origin.base}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    )
    assert heads[0].status_code == 405 and closed
    assert (b"allow", b"CONNECT") in list(heads[0].headers)
    denied = serve("--allow-open", "--deny", f"127.0.0.1:{origin.port}", "--no-via-header")
    got = curl(need, denied, "-w", "%{http_code}", "-o", "/dev/null", f"{origin.base}/bytes/1")
    assert got.stdout == b"403"
    assert origin.requests == []
    denied.wait_log("status=403 result=denied")


def test_auth_basic_and_digest(serve: Serve, origin: Origin, need: Callable[..., str]) -> None:
    server = serve("--auth", f"{USER}:{PASSWORD}")
    urls = [f"{origin.base}/bytes/{n}" for n in (7, 8)]
    for scheme in ("--proxy-basic", "--proxy-digest"):
        got = curl(need, server, scheme, "-U", f"{USER}:{PASSWORD}", *urls)
        assert got.returncode == 0, (scheme, got.stderr)
        assert got.stdout == pattern(7, 3) + pattern(8, 3)
        assert all(
            "proxy-authorization" not in {n.decode().lower() for n, _ in r[2]}
            for r in origin.requests
        )
    wrong = curl(need, server, "-w", "%{http_code}", "-U", f"{USER}:nope", urls[0])
    assert wrong.stdout.endswith(b"407")
    # A later request of a kept connection without credentials: 407, closed.
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    one = f"GET {urls[0]} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
    heads, _, closed = raw_exchange(
        server,
        (one + f"Proxy-Authorization: Basic {auth}\r\n\r\n" + one + "\r\n").encode(),
        responses=2,
    )
    assert [h.status_code for h in heads] == [200, 407] and closed
    log = server.wait_log("status=407")
    assert PASSWORD not in log and auth not in log


def test_connect_after_forwarded_requests(proxy: ServeProcess, origin: Origin) -> None:
    """A CONNECT on a connection that forwarded requests becomes a tunnel, as a first one does."""
    get = f"GET {origin.base}/bytes/2 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    connect = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    inner = f"GET /bytes/6 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(get + connect.encode())
        got = b""
        while got.count(b"\r\n\r\n") < 2:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")
        assert got.endswith(pattern(2, 3) + b"HTTP/1.1 200 Connection established\r\n\r\n")
        sock.sendall(inner.encode())
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert rest.endswith(b"\r\n\r\n" + pattern(6, 3))
    assert [t for _, t, _, _ in origin.requests] == ["/bytes/2", "/bytes/6"]


def test_stop_closes_idle_kept_connections(serve: Serve, origin: Origin) -> None:
    """SIGTERM: a kept connection between requests is closed at once, not after --grace."""
    server = serve("--grace", "60")
    get = f"GET {origin.base}/bytes/2 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(get)
        got = b""
        while not got.endswith(pattern(2, 3)):
            got += sock.recv(65536)
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 5
        assert sock.recv(1) == b""


def test_http10_client_gets_host_added(proxy: ServeProcess, origin: Origin) -> None:
    """HTTP/1.0 without Host: Host is added from the URL; the answer ends with the connection."""
    with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(f"GET {origin.base}/chunked/5000 HTTP/1.0\r\n\r\n".encode())
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    assert body == pattern(5000, 5)  # close-delimited: a 1.0 client knows no chunks
    assert headers_of(origin)["host"] == f"127.0.0.1:{origin.port}"


def test_origin_failures(proxy: ServeProcess, origin: Origin) -> None:
    """An origin that resets mid-response: the client's connection is reset too (a cut body
    never looks complete); one that closes before answering: 502."""

    def cut(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def mute(conn: socket.socket) -> None:
        conn.recv(65536)

    for handler, status in ((cut, 200), (mute, 502)):
        with ScriptedServer(handler) as bad:
            request = (
                f"GET http://127.0.0.1:{bad.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{bad.port}\r\n\r\n"
            )
            with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
                sock.sendall(request.encode())
                got = b""
                try:
                    while chunk := sock.recv(65536):
                        got += chunk
                    reset = False
                except ConnectionResetError:
                    reset = True
            # A reset may take what was received but not yet read with it.
            assert reset == (status == 200)
            assert got.startswith(f"HTTP/1.1 {status} ".encode()) or reset, got[:80]
    log = proxy.wait_log("status=502 result=upstream-error")
    assert "result=reset" in log


def test_full_duplex_echo_does_not_deadlock(proxy: ServeProcess) -> None:
    """An origin that echoes the body as it comes, before the request is over: megabytes each
    way at once, more than the sockets' buffers hold, must flow (no side waits for the other
    to finish first)."""
    size = 12 << 20
    body = pattern(size, 21)

    def echo(conn: socket.socket) -> None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # buffers that fill up soon
            conn.setsockopt(socket.SOL_SOCKET, option, 65536)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        _, _, rest = head.partition(b"\r\n\r\n")
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + rest)
        left = size - len(rest)
        while left:
            data = conn.recv(min(left, 65536))
            assert data
            conn.sendall(data)
            left -= len(data)

    with ScriptedServer(echo) as origin_echo:
        url = f"http://127.0.0.1:{origin_echo.port}/"
        head = f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin_echo.port}\r\nContent-Length: {size}\r\n\r\n"
        with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT_S) as sock:
            received = bytearray()

            def read() -> None:
                while len(received) < size or b"\r\n\r\n" not in received:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    received.extend(data)
                    if b"\r\n\r\n" in received and len(received.partition(b"\r\n\r\n")[2]) >= size:
                        return

            reader = threading.Thread(target=read)
            reader.start()
            sock.sendall(head.encode() + body)
            reader.join(30)
            assert not reader.is_alive()
    assert sha256(bytes(received.partition(b"\r\n\r\n")[2])) == sha256(body)


def test_unknown_transfer_coding_and_missing_host(proxy: ServeProcess, origin: Origin) -> None:
    ok = f"GET {origin.base}/bytes/1 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    gzip = (f"POST {origin.base}/echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
    heads, _, closed = raw_exchange(proxy, (ok + gzip).encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 501] and closed
    no_host = f"GET {origin.base}/bytes/1 HTTP/1.1\r\n\r\n"  # HTTP/1.1 requires Host
    heads, _, closed = raw_exchange(proxy, (ok + no_host).encode(), responses=2)
    assert [h.status_code for h in heads] == [200, 400] and closed
    assert len(origin.requests) == 2


def test_workers_and_metrics(serve: Serve, origin: Origin) -> None:
    """Forwarding under --workers 2, and the requests and their bytes in the metrics (the
    supervisor's sum over the workers)."""
    from test_serve_metrics import scrape, value

    server = serve("--workers", "2", "--metrics", "127.0.0.1:0")
    get = f"GET {origin.base}/bytes/1000 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    missing = f"GET {origin.base}/status/404 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    for _ in range(8):  # several connections: both workers are likely to serve some
        heads, bodies, closed = raw_exchange(server, (get + missing).encode(), responses=2)
        assert [h.status_code for h in heads] == [200, 404] and not closed
        assert bodies[0] == pattern(1000, 3)
    heads, _, closed = raw_exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert heads[0].status_code == 400 and closed
    server.wait_log("event=tunnel", count=17)
    lines = re.findall(r"event=tunnel .* up=(\d+) down=(\d+)", server.log())
    assert len(lines) == 17
    samples = scrape(server)[1]
    assert value(samples, "hopcat_http_requests_total", code="2xx") == 8
    assert value(samples, "hopcat_http_requests_total", code="4xx") == 9
    assert value(samples, "hopcat_bytes_total", direction="up") == sum(int(u) for u, _ in lines)
    down = value(samples, "hopcat_bytes_total", direction="down")
    assert down == sum(int(d) for _, d in lines) > 8 * 1000


def _get_closing(server: ServeProcess, origin: Origin, n: int) -> None:
    request = (f"GET {origin.base}/bytes/{n} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
               "Connection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(pattern(n, 3))


def test_forwarded_request_leaves_no_open_tunnel(serve: Serve, origin: Origin) -> None:
    """One forwarded GET (Connection: close), all done: hopcat_open_tunnels back to 0, and one
    connect observed (one origin dialled)."""
    server = serve("--metrics", "127.0.0.1:0")
    _get_closing(server, origin, 2)
    server.wait_log("event=tunnel")
    from test_serve_metrics import scrape, value

    _types, samples = scrape(server)
    assert (value(samples, "hopcat_open_tunnels", protocol="http"),
            value(samples, "hopcat_connect_seconds_count")) == (0, 1)


def test_connect_after_forwarded_request_leaves_no_open_tunnel(
    serve: Serve, origin: Origin
) -> None:
    server = serve("--metrics", "127.0.0.1:0")
    get = f"GET {origin.base}/bytes/2 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    connect = f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
    inner = f"GET /bytes/6 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(get + connect.encode())
        got = b""
        while got.count(b"\r\n\r\n") < 2:
            got += sock.recv(65536)
        sock.sendall(inner.encode())
        while sock.recv(65536):
            pass
    server.wait_log("event=tunnel", count=3)
    from test_serve_metrics import scrape, value

    _types, samples = scrape(server)
    assert value(samples, "hopcat_open_tunnels", protocol="http") == 0


def test_reloaded_rules_apply_to_a_kept_origin_connection(
    serve: Serve, origin: Origin, tmp_path: Path
) -> None:
    """A kept origin connection was checked by the rules of its dial: after SIGHUP brings rules
    that deny it, the next request on the same client connection is refused (403), not sent on
    over the old connection."""
    rules = tmp_path / "rules"
    rules.write_text("")
    server = serve("--rules", str(rules))
    get = f"GET {origin.base}/bytes/5 HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT_S) as sock:
        conn = h11.Connection(h11.CLIENT)
        sock.sendall(get)
        assert next_status(conn, sock) == 200
        conn.start_next_cycle()
        rules.write_text(f"deny 127.0.0.1:{origin.port}\n")
        server.send_signal(signal.SIGHUP)
        server.wait_log("event=reload result=ok")
        sock.sendall(get)
        assert next_status(conn, sock) == 403
    assert len(origin.requests) == 1
