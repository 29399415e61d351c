"""hopcat's library side by side with python-socks (sync and asyncio) and PySocks (issue 9, §6).

Every library opens the same tunnels through the same proxies: mostly an in-process scripted
proxy that behaves in one awkward but legal way (a reply split into single bytes, the target's
banner in the same segment as the last reply, bytes trickled past the deadline, a refusal), or
that records what a client sent (an IPv6 target, a 255- or 256-byte name, CR/LF in a name); one
baseline row goes through Dante. Each (edge case, library) cell becomes a short outcome word.

hopcat's cells are asserted to be the correct outcome. The other libraries' cells are recorded,
not judged: their test asserts only that the outcome is the one published in ``PUBLISHED`` (and
in the README), so the table cannot drift from what the libraries do. Published outcomes are tied
to the versions in ``PUBLISHED_VERSIONS``; with other versions installed, that comparison skips.

The table is computed once per module, all cells at once on a thread pool (each cell has its own
proxy), so the slow cells (the trickle, the lost banners) overlap. As a script it prints the
table in Markdown::

    PYTHONPATH=src python tests/integration/test_side_by_side.py --table
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import peers
import pytest

BANNER = b"SSH-2.0-OpenSSH_9.2 scripted-target\r\n"
TARGET_PORT = 22
SPLIT_GAP_S = 0.05  # between single bytes of a split reply: long enough to be separate reads
TRICKLE_GAP_S = 0.3  # between bytes of a trickled reply ...
TRICKLE_TIMEOUT_S = 1.0  # ... which passes this deadline after its fourth byte
GIVEN_TIMEOUT_S = 5.0  # every open but the one that checks what an omitted timeout does
BANNER_PAUSE_S = 0.05  # between the last reply and the banner when they are not glued
READ_WINDOW_S = 1.0  # how long a client waits for the banner before it counts as lost
HOLD_S = 10.0  # the longest a scripted proxy waits for a client (nothing hangs forever)
WORKERS = 16

SOCKS5_SUCCESS = b"\x05\x00\x00\x01" + bytes(6)  # bound address 0.0.0.0:0
HTTP_SUCCESS = b"HTTP/1.1 200 Connection established\r\n\r\n"
HTTP_FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
SOCKS5_CONNECTION_REFUSED = 5
CRLF_HOST = "example.com\r\nX-Injected: 1"


def long_name(length: int) -> str:
    """A host name of exactly ``length`` bytes in 63-byte labels (a valid DNS shape)."""
    name = ("x" * 63 + ".") * (length // 64 + 1)
    return name[: length - 1] + "y"


# --------------------------------------------------------------------------- the scripted proxy


@dataclass
class Script:
    """How a scripted proxy answers every connection."""

    protocol: str  # "socks5" or "http"
    gap_s: float = 0.0  # > 0: every reply byte is sent alone, this far apart
    glued: bool = False  # the banner goes out in the same send as the last reply
    refuse: bool = False  # SOCKS5 reply 5 / HTTP 403 instead of success


@dataclass
class Seen:
    """What one connection to the scripted proxy carried from the client."""

    data: bytearray = field(default_factory=bytearray)
    request: bytes = b""  # SOCKS5: ATYP + address + port; HTTP: the request head


class ScriptedProxy:
    """A SOCKS5 or HTTP CONNECT proxy on 127.0.0.1 that plays the target itself: after its
    (successful) reply it sends BANNER, then holds the connection until the client closes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.seen: list[Seen] = []
        self.conns: list[socket.socket] = []
        self.handlers: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed by finish()
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        seen = Seen()
        handler = threading.Thread(target=self._serve, args=(conn, seen), daemon=True)
        with self.lock:
            self.seen.append(seen)
            self.conns.append(conn)
            self.handlers.append(handler)
        handler.start()

    def _serve(self, conn: socket.socket, seen: Seen) -> None:
        conn.settimeout(HOLD_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn, contextlib.suppress(OSError, EOFError):
            if self.script.protocol == "socks5":
                self._socks5(conn, seen)
            else:
                self._http(conn, seen)
            if self.script.refuse:
                return
            if not self.script.glued:
                time.sleep(BANNER_PAUSE_S)
                conn.sendall(BANNER)
            while chunk := conn.recv(4096):  # hold until the client closes
                seen.data += chunk

    def _socks5(self, conn: socket.socket, seen: Seen) -> None:
        _version, methods = _recv_exact(conn, 2, seen)
        _recv_exact(conn, methods, seen)
        self._send(conn, b"\x05\x00", last=False)
        atyp = _recv_exact(conn, 4, seen)[3:]
        if atyp == b"\x03":
            length = _recv_exact(conn, 1, seen)
            address = length + _recv_exact(conn, length[0], seen)
        else:
            address = _recv_exact(conn, 16 if atyp == b"\x04" else 4, seen)
        seen.request = atyp + address + _recv_exact(conn, 2, seen)
        if self.script.refuse:
            self._send(conn, b"\x05" + bytes([SOCKS5_CONNECTION_REFUSED]) + SOCKS5_SUCCESS[2:])
        else:
            self._send(conn, SOCKS5_SUCCESS, last=True)

    def _http(self, conn: socket.socket, seen: Seen) -> None:
        while b"\r\n\r\n" not in seen.data:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError
            seen.data += chunk
        seen.request = bytes(seen.data[: seen.data.index(b"\r\n\r\n") + 4])
        self._send(conn, HTTP_FORBIDDEN if self.script.refuse else HTTP_SUCCESS, last=True)

    def _send(self, conn: socket.socket, reply: bytes, *, last: bool = False) -> None:
        glued = BANNER if last and self.script.glued else b""
        if not self.script.gap_s:
            conn.sendall(reply + glued)
            return
        for index in range(len(reply)):
            time.sleep(self.script.gap_s)
            conn.sendall(reply[index : index + 1])
        if glued:
            conn.sendall(glued)

    def finish(self) -> list[Seen]:
        """Stop accepting, collect connections still in the backlog, wait for every handler
        (cut short by HOLD_S / 2), and return what each connection carried."""
        self.listener.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                conn.setblocking(True)
                self._adopt(conn)
        # close() alone leaves the acceptor blocked in accept(); shutdown() wakes it (Linux).
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(HOLD_S)
        self.listener.close()
        deadline = time.monotonic() + HOLD_S / 2
        for handler in list(self.handlers):
            handler.join(max(0.0, deadline - time.monotonic()))
        for conn in self.conns:  # a client that never closed: wake its handler
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for handler in self.handlers:
            handler.join(HOLD_S)
        return self.seen


def _recv_exact(conn: socket.socket, size: int, seen: Seen) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    seen.data += data
    return data


# --------------------------------------------------------------------------- the clients


@dataclass(frozen=True)
class Request:
    protocol: str  # "socks5" or "http"
    proxy_port: int
    host: str
    port: int
    timeout: float | None  # None: the library's default (the argument left out)


@dataclass
class Attempt:
    error: BaseException | None = None
    seconds: float = 0.0  # until the open returned or raised
    sock_timeout: float | None = None  # gettimeout() of the socket the open returned
    received: bytes = b""  # what came through the tunnel within READ_WINDOW_S


def _read_banner(sock: socket.socket) -> bytes:
    sock.settimeout(READ_WINDOW_S)
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < len(BANNER) and (chunk := sock.recv(len(BANNER) - len(data))):
            data += chunk
    return data


async def _read_banner_async(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(READ_WINDOW_S):
            while len(data) < len(BANNER) and (chunk := await reader.read(len(BANNER) - len(data))):
                data += chunk
    return data


def _timeout_kwargs(request: Request) -> dict[str, Any]:
    return {} if request.timeout is None else {"timeout": request.timeout}


def _open_sync(request: Request, opener: Callable[[], socket.socket]) -> Attempt:
    started = time.monotonic()
    try:
        sock = opener()
    except Exception as exc:
        return Attempt(error=exc, seconds=time.monotonic() - started)
    with sock:
        attempt = Attempt(seconds=time.monotonic() - started, sock_timeout=sock.gettimeout())
        attempt.received = _read_banner(sock)
    return attempt


def _open_async(opener: Callable[[], Any]) -> Attempt:
    """``opener`` is a coroutine function returning a connected non-blocking socket."""

    async def attempt() -> Attempt:
        started = time.monotonic()
        try:
            sock = await opener()
        except Exception as exc:
            return Attempt(error=exc, seconds=time.monotonic() - started)
        result = Attempt(seconds=time.monotonic() - started, sock_timeout=sock.gettimeout())
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            result.received = await _read_banner_async(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return result

    return asyncio.run(attempt())


def hopcat_sync(request: Request) -> Attempt:
    import hopcat

    scheme = "socks5h" if request.protocol == "socks5" else "http"
    via = f"{scheme}://127.0.0.1:{request.proxy_port}"
    return _open_sync(
        request,
        lambda: hopcat.create_connection(
            (request.host, request.port), via=via, **_timeout_kwargs(request)
        ),
    )


def hopcat_aio(request: Request) -> Attempt:
    import hopcat.aio

    scheme = "socks5h" if request.protocol == "socks5" else "http"
    via = f"{scheme}://127.0.0.1:{request.proxy_port}"
    return _open_async(
        lambda: hopcat.aio.connect_socket(
            request.host, request.port, via=via, **_timeout_kwargs(request)
        )
    )


def python_socks_sync(request: Request) -> Attempt:
    from python_socks.sync import Proxy

    # python-socks has no socks5h scheme: its socks5:// sends names to the proxy by default.
    proxy = Proxy.from_url(f"{request.protocol}://127.0.0.1:{request.proxy_port}")
    return _open_sync(
        request, lambda: proxy.connect(request.host, request.port, **_timeout_kwargs(request))
    )


def python_socks_asyncio(request: Request) -> Attempt:
    from python_socks.async_.asyncio import Proxy

    async def connect() -> socket.socket:
        proxy = Proxy.from_url(f"{request.protocol}://127.0.0.1:{request.proxy_port}")
        sock: socket.socket = await proxy.connect(
            request.host, request.port, **_timeout_kwargs(request)
        )
        return sock

    return _open_async(connect)


def pysocks(request: Request) -> Attempt:
    import socks

    def connect() -> Any:  # a socks.socksocket, a socket.socket subclass
        sock = socks.socksocket()
        try:
            kind = socks.SOCKS5 if request.protocol == "socks5" else socks.HTTP
            sock.set_proxy(kind, "127.0.0.1", request.proxy_port, rdns=True)
            if request.timeout is not None:
                sock.settimeout(request.timeout)
            sock.connect((request.host, request.port))
        except BaseException:
            sock.close()
            raise
        return sock

    return _open_sync(request, connect)


@dataclass(frozen=True)
class Client:
    key: str
    title: str
    attempt: Callable[[Request], Attempt]
    distribution: str | None  # the PyPI distribution whose version the outcomes belong to


CLIENTS = [
    Client("hopcat", "hopcat", hopcat_sync, None),
    Client("hopcat-aio", "hopcat.aio", hopcat_aio, None),
    Client("python-socks", "python-socks", python_socks_sync, "python-socks"),
    Client("python-socks-aio", "python-socks asyncio", python_socks_asyncio, "python-socks"),
    Client("pysocks", "PySocks", pysocks, "PySocks"),
]
HOPCAT_CLIENTS = [client for client in CLIENTS if client.distribution is None]
OTHER_CLIENTS = [client for client in CLIENTS if client.distribution is not None]


# --------------------------------------------------------------------------- outcome words


def error_word(error: BaseException) -> str:
    """The class name; for an OSError also its errno (or that it has none)."""
    name = type(error).__name__
    if not isinstance(error, OSError):
        return f"{name} (not OSError)"
    code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else "no errno"
    return f"{name} (OSError, {code})"


def banner_word(attempt: Attempt) -> str:
    if attempt.error is not None:
        return type(attempt.error).__name__
    if attempt.received == BANNER:
        return "ok"
    if not attempt.received:
        return "banner lost"
    if BANNER.startswith(attempt.received):
        return f"banner cut to {len(attempt.received)} B"
    return "reply bytes before banner"


def refused_locally_word(attempt: Attempt, seen: list[Seen], leak: bytes) -> str:
    """For a request that must raise ValueError before any byte goes out."""
    sent = sum(len(s.data) for s in seen)
    if attempt.error is None:
        if any(leak in s.data for s in seen):
            return "sends it"
        return f"sends {sent} B, no error"
    name = "ValueError" if isinstance(attempt.error, ValueError) else type(attempt.error).__name__
    if not seen:
        return f"{name}, no connection"
    return f"{name}, nothing sent" if not sent else f"{name} after {sent} B sent"


def timeout_word(value: float | None) -> str:
    if value is None:
        return "None (blocking)"
    if value == 0.0:
        return "0.0 (non-blocking)"
    return f"{value:g} s"


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    run: Callable[[Client, str | None], str]  # (client, Dante's URL or None) -> outcome word
    correct: str  # hopcat's outcome, asserted
    correct_aio: str | None = None  # where hopcat.aio's correct outcome differs


def scripted(
    client: Client, script: Script, host: str = "127.0.0.1", timeout: float | None = None
) -> tuple[Attempt, list[Seen]]:
    proxy = ScriptedProxy(script)
    request = Request(
        script.protocol, proxy.port, host, TARGET_PORT,
        GIVEN_TIMEOUT_S if timeout is None else timeout,
    )  # fmt: skip
    try:
        attempt = client.attempt(request)
    finally:
        seen = proxy.finish()
    return attempt, seen


def baseline_dante(client: Client, dante_url: str | None) -> str:
    if dante_url is None:
        return "skipped: no danted"
    with peers.BannerServer(banner=BANNER) as target:
        port = int(dante_url.rsplit(":", 1)[1])
        attempt = client.attempt(Request("socks5", port, "127.0.0.1", target.port, GIVEN_TIMEOUT_S))
    return banner_word(attempt)


def banner_case(script: Script) -> Callable[[Client, str | None], str]:
    def run(client: Client, _dante: str | None) -> str:
        return banner_word(scripted(client, script)[0])

    return run


def ipv6_socks5(client: Client, _dante: str | None) -> str:
    attempt, seen = scripted(client, Script("socks5"), host="::1")
    if attempt.error is not None:
        return banner_word(attempt)
    request = seen[0].request if seen else b""
    if request[:1] == b"\x03":
        return f"sends {request[2 : 2 + request[1]].decode(errors='replace')!r} as a name"
    if request[:17] != b"\x04" + ipaddress.IPv6Address("::1").packed:
        return f"wrong request {request.hex()}"
    return banner_word(attempt)


def ipv6_http(client: Client, _dante: str | None) -> str:
    attempt, seen = scripted(client, Script("http"), host="::1")
    if attempt.error is not None:
        return banner_word(attempt)
    head = seen[0].request if seen else b""
    line, *headers = head.split(b"\r\n")
    if not line.startswith(b"CONNECT [::1]:22 HTTP/1."):
        return f"sends {line.decode(errors='replace')!r}"
    for header in headers:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"host" and value.strip() != b"[::1]:22":
            return f"sends Host: {value.strip().decode(errors='replace')}"
    return banner_word(attempt)


def name_255(client: Client, _dante: str | None) -> str:
    name = long_name(255)
    attempt, seen = scripted(client, Script("socks5"), host=name)
    if attempt.error is not None:
        return banner_word(attempt)
    request = seen[0].request if seen else b""
    if request[:1] == b"\x03" and request[1] != len(name):
        return f"length byte {request[1]}, not {len(name)}"
    if request[:2] != b"\x03\xff" or request[2:257] != name.encode():
        return f"wrong request ({len(request)} B)"
    return banner_word(attempt)


def name_256(client: Client, _dante: str | None) -> str:
    name = long_name(256)
    attempt, seen = scripted(client, Script("socks5"), host=name)
    return refused_locally_word(attempt, seen, name.encode()[:200])


def crlf_http(client: Client, _dante: str | None) -> str:
    attempt, seen = scripted(client, Script("http"), host=CRLF_HOST)
    word = refused_locally_word(attempt, seen, b"\r\nX-Injected: 1")
    return "header injected" if word == "sends it" else word


def trickle(client: Client, _dante: str | None) -> str:
    attempt, _ = scripted(client, Script("socks5", gap_s=TRICKLE_GAP_S), timeout=TRICKLE_TIMEOUT_S)
    whole_s = len(b"\x05\x00" + SOCKS5_SUCCESS) * TRICKLE_GAP_S
    if attempt.error is None:
        return f"{banner_word(attempt)} after {whole_s:.1f} s (timeout per read)"
    if isinstance(attempt.error, TimeoutError) and attempt.seconds < TRICKLE_TIMEOUT_S + 0.6:
        return f"TimeoutError at {TRICKLE_TIMEOUT_S:g} s"
    return f"{type(attempt.error).__name__} at {attempt.seconds:.0f} s"


def socket_timeout(timeout: float | None) -> Callable[[Client, str | None], str]:
    def run(client: Client, _dante: str | None) -> str:
        proxy = ScriptedProxy(Script("socks5"))
        try:
            attempt = client.attempt(
                Request("socks5", proxy.port, "127.0.0.1", TARGET_PORT, timeout)
            )
        finally:
            proxy.finish()
        if attempt.error is not None:
            return banner_word(attempt)
        return timeout_word(attempt.sock_timeout)

    return run


def refusal(protocol: str) -> Callable[[Client, str | None], str]:
    def run(client: Client, _dante: str | None) -> str:
        attempt, _ = scripted(client, Script(protocol, refuse=True))
        return "no error" if attempt.error is None else error_word(attempt.error)

    return run


CASES = [
    Case("baseline", "baseline: banner through Dante", baseline_dante, "ok"),
    Case("split-socks5", "SOCKS5 replies split into single bytes",
         banner_case(Script("socks5", gap_s=SPLIT_GAP_S)), "ok"),
    Case("split-http", "HTTP reply split into single bytes",
         banner_case(Script("http", gap_s=SPLIT_GAP_S)), "ok"),
    Case("glued-socks5", "SOCKS5 reply + banner in one segment",
         banner_case(Script("socks5", glued=True)), "ok"),
    Case("glued-http", "HTTP 200 + banner in one segment",
         banner_case(Script("http", glued=True)), "ok"),
    Case("ipv6-socks5", "IPv6 target ::1 via SOCKS5 (ATYP 4)", ipv6_socks5, "ok"),
    Case("ipv6-http", "IPv6 target ::1 via CONNECT ([::1]:22)", ipv6_http, "ok"),
    Case("name-255", "255-byte host name via SOCKS5", name_255, "ok"),
    Case("name-256", "256-byte host name via SOCKS5 (must raise ValueError, send nothing)",
         name_256, "ValueError, no connection"),
    Case("crlf-http", "CR/LF in the host of an HTTP CONNECT (must raise ValueError, send nothing)",
         crlf_http, "ValueError, no connection"),
    Case("trickle", f"SOCKS5 reply trickled {TRICKLE_GAP_S:g} s/byte, timeout "
         f"{TRICKLE_TIMEOUT_S:g} s", trickle, f"TimeoutError at {TRICKLE_TIMEOUT_S:g} s"),
    Case("timeout-given", f"socket's gettimeout() after an open with timeout="
         f"{GIVEN_TIMEOUT_S:g}", socket_timeout(GIVEN_TIMEOUT_S), f"{GIVEN_TIMEOUT_S:g} s",
         "0.0 (non-blocking)"),
    Case("timeout-omitted", "socket's gettimeout() after an open without a timeout",
         socket_timeout(None), "None (blocking)", "0.0 (non-blocking)"),
    Case("refused-socks5", "refusal: SOCKS5 reply 5 (connection refused)", refusal("socks5"),
         "ProxyError (OSError, ECONNREFUSED)"),
    Case("refused-http", "refusal: HTTP 403", refusal("http"), "ProxyError (OSError, EACCES)"),
]  # fmt: skip

# What the other libraries did, as the README publishes it: (python-socks, python-socks asyncio,
# PySocks) per case, for the versions below.
PUBLISHED_VERSIONS = {"python-socks": "3.2.1", "PySocks": "1.7.1"}
PUBLISHED: dict[str, tuple[str, str, str]] = {
    "baseline": ("ok", "ok", "ok"),
    "split-socks5": ("ok", "ok", "ok"),
    "split-http": ("ProxyError", "ProxyError", "reply bytes before banner"),
    "glued-socks5": ("ok", "ok", "ok"),
    "glued-http": ("banner lost", "banner lost", "banner lost"),
    "ipv6-socks5": ("ok", "ok", "ok"),
    "ipv6-http": ("ok", "ok", "sends 'CONNECT ::1:22 HTTP/1.1'"),
    "name-255": ("ok", "ok", "length byte 195, not 255"),
    "name-256": ("ValueError after 3 B sent",) * 3,
    "crlf-http": ("header injected",) * 3,
    "trickle": ("ok after 3.6 s (timeout per read)", "TimeoutError at 1 s",
                "ok after 3.6 s (timeout per read)"),
    "timeout-given": ("5 s", "0.0 (non-blocking)", "5 s"),
    "timeout-omitted": ("60 s", "0.0 (non-blocking)", "None (blocking)"),
    "refused-socks5": ("ProxyError (not OSError)", "ProxyError (not OSError)",
                       "GeneralProxyError (OSError, no errno)"),
    "refused-http": ("ProxyError (not OSError)", "ProxyError (not OSError)",
                     "GeneralProxyError (OSError, no errno)"),
}  # fmt: skip


# --------------------------------------------------------------------------- the table


Table = dict[tuple[str, str], str]  # (case key, client key) -> outcome word


def _cell(case: Case, client: Client, dante_url: str | None) -> str:
    try:
        return case.run(client, dante_url)
    except Exception as exc:  # the harness itself failed: show it in the cell
        return f"harness error: {type(exc).__name__}: {exc}"


def build_table(dante_url: str | None) -> Table:
    cells = [(case, client) for case in CASES for client in CLIENTS]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            (case.key, client.key): pool.submit(_cell, case, client, dante_url)
            for case, client in cells
        }
        return {key: future.result() for key, future in futures.items()}


def markdown(table: Table) -> str:
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("python-socks", "PySocks"))
    headers = ["edge case", *(client.title for client in CLIENTS)]
    rows = [[case.title, *(table[case.key, client.key] for client in CLIENTS)] for case in CASES]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return f"Outcomes ({versions}):\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Table:
    try:
        dante_url: str | None = request.getfixturevalue("danted").url
    except pytest.skip.Exception:
        dante_url = None
    return build_table(dante_url)


@pytest.mark.parametrize(
    ("case", "client"),
    [
        pytest.param(case, client, id=f"{case.key}-{client.key}")
        for case in CASES
        for client in HOPCAT_CLIENTS
    ],
)
def test_hopcat_outcome_is_correct(table: Table, case: Case, client: Client) -> None:
    outcome = table[case.key, client.key]
    if outcome.startswith("skipped"):
        pytest.skip(outcome)
    correct = case.correct_aio if client.key == "hopcat-aio" and case.correct_aio else case.correct
    assert outcome == correct


@pytest.mark.parametrize(
    ("case", "client"),
    [
        pytest.param(case, client, id=f"{case.key}-{client.key}")
        for case in CASES
        for client in OTHER_CLIENTS
    ],
)
def test_other_library_outcome_is_published(table: Table, case: Case, client: Client) -> None:
    assert client.distribution is not None
    installed = metadata.version(client.distribution)
    if installed != PUBLISHED_VERSIONS[client.distribution]:
        pytest.skip(f"published for {client.distribution} "
                    f"{PUBLISHED_VERSIONS[client.distribution]}, installed {installed}")  # fmt: skip
    outcome = table[case.key, client.key]
    if outcome.startswith("skipped"):
        pytest.skip(outcome)
    assert outcome == PUBLISHED[case.key][OTHER_CLIENTS.index(client)]


@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_aio_open_connection_delivers_a_glued_banner(protocol: str) -> None:
    """The stream API (not only connect_socket) hands the glued banner to the reader."""
    import hopcat.aio

    scheme = "socks5h" if protocol == "socks5" else "http"
    proxy = ScriptedProxy(Script(protocol, glued=True))

    async def read() -> bytes:
        reader, writer = await hopcat.aio.open_connection(
            "127.0.0.1", TARGET_PORT, via=f"{scheme}://127.0.0.1:{proxy.port}",
            timeout=GIVEN_TIMEOUT_S,
        )  # fmt: skip
        try:
            return await _read_banner_async(reader)
        finally:
            writer.close()
            await writer.wait_closed()

    try:
        assert asyncio.run(read()) == BANNER
    finally:
        proxy.finish()


@pytest.mark.parametrize(("host", "last_hop"), [(long_name(256), "socks5h"), (CRLF_HOST, "http")],
                         ids=["name-256", "crlf-http"])  # fmt: skip
@pytest.mark.parametrize("client", HOPCAT_CLIENTS, ids=lambda client: client.key)
def test_chain_refuses_a_bad_target_before_the_first_hop(
    client: Client, host: str, last_hop: str
) -> None:
    import hopcat.aio

    first = ScriptedProxy(Script("socks5"))
    via = [f"socks5h://127.0.0.1:{first.port}", f"{last_hop}://127.0.0.2:3128"]
    try:
        with pytest.raises(ValueError):
            if client.key == "hopcat":
                hopcat.create_connection((host, TARGET_PORT), GIVEN_TIMEOUT_S, via=via).close()
            else:
                asyncio.run(hopcat.aio.connect_socket(host, TARGET_PORT, via=via)).close()
    finally:
        seen = first.finish()
    assert [bytes(s.data) for s in seen] in ([], [b""])


def main(argv: list[str]) -> int:
    if argv != ["--table"]:
        print(f"usage: {Path(__file__).name} --table", file=sys.stderr)
        return 64
    with tempfile.TemporaryDirectory(prefix="hopcat-side-by-side-") as tmp:
        try:
            dante: peers.Daemon | None = peers.start_danted(Path(tmp) / "danted")
        except peers.PeerUnavailable as exc:
            print(f"no Dante baseline: {exc}", file=sys.stderr)
            dante = None
        try:
            print(markdown(build_table(dante.url if dante else None)))
        finally:
            if dante is not None:
                dante.stop()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    sys.exit(main(sys.argv[1:]))
