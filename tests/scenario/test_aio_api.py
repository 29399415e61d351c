"""The library's promises as an API, against scripted proxies on loopback (issue: hopcat as a
Python library): glued bytes reach the caller first, cancellation at any await leaks nothing and
stays a cancellation, one deadline over the whole open, errno and fields of every refusal, a
timeout is always hopcat's ``TimeoutError`` with its hop, no transport left behind when the
caller's protocol factory fails, end of stream delivered under TLS, an empty Chain dials direct.

Every asyncio test runs on asyncio's own loop and, when it is importable, on uvloop's. Descriptor
counts are taken from /proc/self/fd; the scripted servers live in this process, so a count is
polled (bounded) until their threads have closed their side too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

import hopcat
import hopcat.aio
import hopcat.aio._driver
from hopcat.errors import HopcatTimeoutError, ProxyError
from hopcat.net.engine import SILENT_PROXY_PROBE_S
from support import (
    HTTP_ESTABLISHED,
    SOCKS5_SUCCESS,
    Certificates,
    ScriptedServer,
    http_accept,
    make_certificates,
    recv_until,
    relay,
    silent_listener,
    socks4_accept,
    socks5_accept,
)

T = TypeVar("T")
BANNER = b"SSH-2.0-OpenSSH_9.2 scripted-target\r\n"
OPEN_TIMEOUT_S = 10.0
CANCELLED_OPENS = 1000
TRICKLE_GAP_S = 0.15  # between bytes of a trickled reply (12 bytes: 1.8 s if per read) ...
TRICKLE_TIMEOUT_S = 0.6  # ... against this one deadline
QUIET_TIMEOUT_S = 0.5  # shorter than the engine's silent-proxy look (SILENT_PROXY_PROBE_S)
SLACK_S = 0.35  # scheduling on a loaded 2-core machine

try:
    import uvloop
except ImportError:
    uvloop = None

LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed")),
]


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop of the parametrized kind, bounded."""

    def runner(coro: Coroutine[Any, Any, T], limit_s: float = 30) -> T:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, limit_s))

    return runner


@pytest.fixture
def fds_before(run: Callable[[Coroutine[Any, Any, Any]], Any]) -> set[str]:
    """The descriptors open before a test, once the loop kind has done a lookup in this
    process: uvloop keeps a pipe pair of libuv's thread pool from its first use on."""

    async def warm_up() -> None:
        await asyncio.get_running_loop().getaddrinfo("127.0.0.1", 9)

    run(warm_up())
    return open_fds()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    return make_certificates(tmp_path_factory.mktemp("aio-api-tls"))


def open_fds() -> set[str]:
    gc.collect()  # a leaked socket object is closed here, with a ResourceWarning (an error)
    return set(os.listdir("/proc/self/fd"))


def assert_no_new_fds(before: set[str], within_s: float = 5.0) -> None:
    """Our side closes at once; the scripted servers' threads close theirs soon after."""
    deadline = time.monotonic() + within_s
    while True:
        extra = open_fds() - before
        if not extra:
            return
        if time.monotonic() > deadline:
            links = {fd: _readlink(fd) for fd in extra}
            raise AssertionError(f"descriptors left open: {links}")
        time.sleep(0.02)


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


async def until(event: threading.Event, limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not event.is_set():
        assert time.monotonic() < deadline, "the scripted server never got there"
        await asyncio.sleep(0.002)


# --------------------------------------------------------------------------- scripted peers


def banner_target(conn: socket.socket) -> None:
    """Speaks first, then echoes until the client closes."""
    conn.sendall(BANNER)
    while data := conn.recv(65536):
        conn.sendall(data)


def hold(conn: socket.socket) -> None:
    """Reads and never answers until the client closes."""
    while conn.recv(65536):
        pass


def socks5_relay(conn: socket.socket, *, glued: bool = False) -> None:
    host, port = socks5_accept(conn, conn.sendall)
    with socket.create_connection((host, port), timeout=10) as upstream:
        if glued:  # the target's banner leaves in the same segment as our reply
            conn.sendall(SOCKS5_SUCCESS + recv_until(upstream, b"\n"))
        else:
            conn.sendall(SOCKS5_SUCCESS)
        relay(conn, upstream)


def http_relay(conn: socket.socket, *, glued: bool = False) -> None:
    host, port, _head = http_accept(conn)
    with socket.create_connection((host, port), timeout=10) as upstream:
        conn.sendall(HTTP_ESTABLISHED + (recv_until(upstream, b"\n") if glued else b""))
        relay(conn, upstream)


@contextlib.contextmanager
def servers(*handlers: Callable[[socket.socket], None]) -> Iterator[list[ScriptedServer]]:
    started: list[ScriptedServer] = []
    try:
        for handler in handlers:
            started.append(ScriptedServer(handler))
        yield started
    finally:
        for server in reversed(started):
            server.close()


class Recorder(asyncio.Protocol):
    """Every callback in order; ``closed`` resolves at connection_lost."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        if not self.closed.done():
            self.closed.set_result(None)

    def data(self) -> bytes:
        return b"".join(value for kind, value in self.events if kind == "data")

    async def wait_data(self, size: int) -> bytes:
        while len(self.data()) < size:
            await asyncio.sleep(0.002)
        return self.data()


# --------------------------------------------------------------------------- glued bytes


@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_glued_banner_reaches_the_reader_and_data_received_first(
    run: Callable[..., Any], protocol: str
) -> None:
    proxy = socks5_relay if protocol == "socks5" else http_relay
    with servers(banner_target, lambda conn: proxy(conn, glued=True)) as (target, relaying):
        via = f"{protocol}://127.0.0.1:{relaying.port}"

        async def scenario() -> None:
            reader, writer = await hopcat.aio.open_connection(
                "127.0.0.1", target.port, via=via, timeout=OPEN_TIMEOUT_S
            )
            # The banner came with the reply and nothing follows it: it must already be there.
            assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 2) == BANNER
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readexactly(5), 2) == b"ping\n"
            writer.close()
            await writer.wait_closed()

            transport, recorder = await hopcat.aio.create_connection(
                Recorder, "127.0.0.1", target.port, via=via, timeout=OPEN_TIMEOUT_S
            )
            assert recorder.events[0] == ("made", None)
            assert recorder.events[1] == ("data", BANNER)  # before the call returned
            transport.close()
            await recorder.closed

            sock = await hopcat.aio.connect_socket("127.0.0.1", target.port, via=via,
                                                   timeout=OPEN_TIMEOUT_S)  # fmt: skip
            with sock:
                loop = asyncio.get_running_loop()
                assert await loop.sock_recv(sock, 4096) == BANNER

        run(scenario())


# --------------------------------------------------------------------------- cancellation


class Phase:
    """Where an open is stopped: the proxies (or targets) to start, and the arguments of the
    open; ``arrived`` is set once the scripted side is waiting in that phase."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrived = threading.Event()

    def stall(self, conn: socket.socket) -> None:
        self.arrived.set()
        hold(conn)


def _socks5_phase(phase: Phase, stop: str) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        if stop == "greeting":
            conn.recv(3)
            return phase.stall(conn)
        sent: list[bytes] = []

        def send(data: bytes) -> None:
            sent.append(data)
            conn.sendall(data)
            if stop == "auth" and data == b"\x05\x02":
                phase.stall(conn)
                raise ConnectionResetError  # the client is gone: stop here

        socks5_accept(conn, send, auth=stop == "auth")
        phase.stall(conn)

    return handler


def _http_stall(phase: Phase, conn: socket.socket) -> None:
    http_accept(conn)
    phase.stall(conn)


def _https_phase(
    phase: Phase, certificates: Certificates, *, answer: bool
) -> Callable[[socket.socket], None]:
    """An https:// proxy that stalls at its reply, or (``answer``) after it: inside the TLS to
    the target that runs within its own."""
    context = certificates.server_context()

    def handler(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            http_accept(tls)
            if answer:
                tls.sendall(HTTP_ESTABLISHED)
                tls.recv(1)  # the inner ClientHello has begun to arrive; never answered
            phase.stall(tls)

    return handler


def _tls_stall(phase: Phase) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.recv(1)  # the ClientHello has begun to arrive; never answered
        phase.stall(conn)

    return handler


@contextlib.contextmanager
def phase_setup(name: str, certificates: Certificates) -> Iterator[tuple[Phase, dict[str, Any]]]:
    """The phase, and keyword arguments for ``hopcat.aio.open_connection`` stalled in it."""
    phase = Phase(name)
    if name == "dns":  # the first hop by name; the test makes the lookup hang
        yield phase, {"host": "127.0.0.1", "port": 9, "via": "socks5://localhost:1080"}
        return
    if name == "tcp-connect":
        listener, fillers, port = silent_listener()
        try:
            yield phase, {"host": "127.0.0.1", "port": 9, "via": f"socks5://127.0.0.1:{port}"}
        finally:
            for sock in (*fillers, listener):
                sock.close()
        return
    if name == "target-tls":
        with servers(phase.stall) as (target,):
            yield phase, {"host": "127.0.0.1", "port": target.port, "via": hopcat.Chain(),
                          "ssl": certificates.client_context()}  # fmt: skip
        return
    handlers: dict[str, Callable[[socket.socket], None]] = {
        "greeting": _socks5_phase(phase, "greeting"),
        "auth": _socks5_phase(phase, "auth"),
        "reply": _socks5_phase(phase, "reply"),
        "http-reply": lambda conn: _http_stall(phase, conn),
        "proxy-tls": _tls_stall(phase),
        "https-reply": _https_phase(phase, certificates, answer=False),
        "nested-tls": _https_phase(phase, certificates, answer=True),
    }
    if name.startswith("hop2-"):
        inner = handlers[name.removeprefix("hop2-")]
        with servers(inner, socks5_relay) as (second, first):
            scheme = "http" if name == "hop2-http-reply" else "socks5"
            userinfo = "u:p@" if name == "hop2-auth" else ""
            via = [f"socks5://127.0.0.1:{first.port}",
                   f"{scheme}://{userinfo}127.0.0.1:{second.port}"]  # fmt: skip
            yield phase, {"host": "127.0.0.1", "port": 9, "via": via}
        return
    with servers(handlers[name]) as (proxy,):
        scheme = "http" if name == "http-reply" else "socks5"
        extra: dict[str, Any] = {}
        if name in ("proxy-tls", "https-reply", "nested-tls"):
            scheme = "https"
            extra["proxy_ssl"] = certificates.client_context()
        if name == "nested-tls":  # TLS to the target inside the proxy's
            extra["ssl"] = certificates.client_context()
        userinfo = "u:p@" if name == "auth" else ""
        yield phase, {"host": "127.0.0.1", "port": 9,
                      "via": f"{scheme}://{userinfo}127.0.0.1:{proxy.port}", **extra}  # fmt: skip


PHASES = ["dns", "tcp-connect", "greeting", "auth", "reply", "http-reply", "proxy-tls",
          "https-reply", "nested-tls", "hop2-greeting", "hop2-auth", "hop2-reply",
          "hop2-http-reply", "target-tls"]  # fmt: skip
SOCKET_PHASES = ["dns", "tcp-connect", "greeting", "auth", "reply", "http-reply", "hop2-reply"]


async def _start_open(
    entry: str, phase: Phase, options: dict[str, Any], outer: list[asyncio.Timeout]
) -> asyncio.Task[Any]:
    """A task opening through ``options``; returns once it is inside ``phase``."""
    options = dict(options)
    host, port = options.pop("host"), options.pop("port")

    async def opening() -> Any:
        async with asyncio.timeout(None) as scope:
            outer.append(scope)
            if entry == "socket":
                return await hopcat.aio.connect_socket(host, port, timeout=OPEN_TIMEOUT_S,
                                                       **options)  # fmt: skip
            return await hopcat.aio.open_connection(host, port, timeout=OPEN_TIMEOUT_S, **options)

    task = asyncio.create_task(opening())
    if phase.name == "tcp-connect":
        await asyncio.sleep(0.05)  # the SYN goes unanswered: nothing to wait for
    else:
        await until(phase.arrived)
    return task


def _stuck_resolver(arrived: asyncio.Event | None = None) -> Callable[..., Any]:
    """A lookup that never ends, for a first hop given by name: it replaces the driver's
    resolver (the loop's own cannot be replaced on uvloop)."""

    async def stuck(*_args: Any, **_kwargs: Any) -> Any:
        if arrived is not None:
            arrived.set()
        await asyncio.Event().wait()

    return stuck


def _phase_params(names: list[str]) -> list[Any]:
    return [pytest.param(name, id=name) for name in names]


@pytest.mark.parametrize("how", ["cancel", "outer-timeout"])
@pytest.mark.parametrize(
    ("entry", "phase_name"),
    [*(("stream", name) for name in PHASES), *(("socket", name) for name in SOCKET_PHASES)],
)
def test_stopped_at_any_await_closes_everything_and_stays_what_it_was(
    run: Callable[..., Any], loop_kind: str, certificates: Certificates, entry: str,
    phase_name: str, how: str, fds_before: set[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    before = fds_before
    with phase_setup(phase_name, certificates) as (phase, options):
        if phase_name == "dns":
            monkeypatch.setattr(hopcat.aio._driver, "resolve", _stuck_resolver(phase.arrived))

        async def scenario() -> None:
            outer: list[asyncio.Timeout] = []
            task = await _start_open(entry, phase, options, outer)
            assert not task.done()
            if how == "cancel":
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:  # the caller's own asyncio.timeout() expires: its TimeoutError, not ours
                outer[0].reschedule(asyncio.get_running_loop().time())
                with pytest.raises(TimeoutError) as caught:
                    await task
                assert type(caught.value) is TimeoutError, repr(caught.value)

        run(scenario())
    assert_no_new_fds(before)


def test_a_thousand_cancelled_opens_leak_no_descriptor(
    run: Callable[..., Any], fds_before: set[str]
) -> None:
    """Cancelled after 0..9 loop turns or up to 4.5 ms: before the lookup, in it, in the
    connect, with the greeting or request out and the reply pending, on the stream and the
    socket paths."""

    def greeting_then_hold(conn: socket.socket) -> None:
        socks5_accept(conn, conn.sendall)
        hold(conn)

    before = fds_before
    with servers(hold, greeting_then_hold) as (silent, answering):
        urls = [f"socks5://127.0.0.1:{silent.port}", f"socks5://127.0.0.1:{answering.port}",
                f"http://127.0.0.1:{silent.port}"]  # fmt: skip

        async def scenario() -> None:
            for index in range(CANCELLED_OPENS):
                via = urls[index % len(urls)]
                if index % 2:
                    opening = hopcat.aio.connect_socket("127.0.0.1", 9, via=via)
                else:
                    opening = hopcat.aio.open_connection("127.0.0.1", 9, via=via)
                task: asyncio.Task[Any] = asyncio.ensure_future(opening)
                if index % 4 < 2:  # 0..9 loop turns: mostly the lookup and the connect
                    for _ in range(index % 10):
                        await asyncio.sleep(0)
                else:  # up to 4.5 ms: mostly the handshake
                    await asyncio.sleep((index % 10) * 0.0005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        run(scenario(), 120)
        assert silent.accepted + answering.accepted > CANCELLED_OPENS // 4  # past the connect
    assert_no_new_fds(before, within_s=15)


def test_a_failing_protocol_factory_leaves_no_transport(
    run: Callable[..., Any], fds_before: set[str]
) -> None:
    class Refused(Exception):
        pass

    def factory() -> asyncio.Protocol:
        raise Refused

    before = fds_before
    with servers(banner_target, socks5_relay) as (target, relaying):

        async def scenario() -> None:
            for via in (hopcat.Chain(), f"socks5://127.0.0.1:{relaying.port}"):
                with pytest.raises(Refused):
                    await hopcat.aio.create_connection(factory, "127.0.0.1", target.port,
                                                       via=via, timeout=OPEN_TIMEOUT_S)  # fmt: skip
            await asyncio.sleep(0.01)

        run(scenario())
    assert_no_new_fds(before)


# --------------------------------------------------------------------------- deadlines


def _trickle(conn: socket.socket) -> None:
    """A SOCKS5 proxy whose every reply byte comes TRICKLE_GAP_S after the last."""

    def send(data: bytes) -> None:
        for byte in data:
            time.sleep(TRICKLE_GAP_S)
            conn.sendall(bytes([byte]))

    socks5_accept(conn, send)
    send(SOCKS5_SUCCESS)
    hold(conn)


def _sync_open(host: str, port: int, *, via: Any, timeout: float, **options: Any) -> Any:
    return hopcat.create_connection((host, port), timeout, via=via, **options)


_ON_UVLOOP = pytest.mark.skipif(uvloop is None, reason="uvloop not installed")
# The blocking API, and the asyncio stream and socket paths on each loop.
ENTRIES = ["sync", "stream", "socket", pytest.param("stream@uvloop", marks=_ON_UVLOOP),
           pytest.param("socket@uvloop", marks=_ON_UVLOOP)]  # fmt: skip


def _open(entry: str, host: str, port: int, **options: Any) -> Any:
    """Open with one entry point; returns what it returned (the caller closes it)."""
    if entry == "sync":
        return _sync_open(host, port, **options)
    entry, _, loop_kind = entry.partition("@")

    async def opening() -> Any:
        if entry == "socket":
            return await hopcat.aio.connect_socket(host, port, **options)
        _, writer = await hopcat.aio.open_connection(host, port, **options)
        return writer

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(opening())


ALL_ENTRIES = ["sync", "stream", "socket"] + (["stream@uvloop", "socket@uvloop"] if uvloop else [])


def _failures_at_once(
    cases: list[tuple[str, str]], attempt: Callable[[str, str], object]
) -> dict[tuple[str, str], tuple[BaseException | None, float]]:
    """Run ``attempt(entry, variant)`` for every case at once, on threads (these tests mostly
    wait for a deadline: one wait for all); the exception and time of each."""

    def timed(case: tuple[str, str]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            attempt(*case)
        except BaseException as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        return dict(zip(cases, pool.map(timed, cases), strict=True))


def test_one_deadline_over_the_whole_open_a_trickle_cannot_stretch_it() -> None:
    with servers(_trickle) as (proxy,):
        results = _failures_at_once(
            [(entry, "socks5") for entry in ALL_ENTRIES],
            lambda entry, scheme: _open(entry, "127.0.0.1", 9, timeout=TRICKLE_TIMEOUT_S,
                                        via=f"{scheme}://127.0.0.1:{proxy.port}"),
        )  # fmt: skip
    for case, (error, elapsed) in results.items():
        assert isinstance(error, HopcatTimeoutError) and error.hop == 1, (case, error)
        assert TRICKLE_TIMEOUT_S - 0.05 < elapsed < TRICKLE_TIMEOUT_S + SLACK_S, (case, elapsed)


@pytest.mark.parametrize("timeout_s", [QUIET_TIMEOUT_S, SILENT_PROXY_PROBE_S + 0.2])
def test_a_silent_proxy_look_never_outlives_the_deadline(
    certificates: Certificates, timeout_s: float
) -> None:
    """The engine waits SILENT_PROXY_PROBE_S for a first answer before looking closer (a quiet
    read), then asks the proxy again on second connections (probes): a deadline before the
    look, or during the probes, still ends the open on time, as hopcat's TimeoutError."""
    cases = [(entry, scheme) for entry in ALL_ENTRIES for scheme in ("socks5", "https")
             if not (entry.startswith("socket") and scheme == "https")]  # fmt: skip

    def attempt(entry: str, scheme: str) -> None:
        tls = {"proxy_ssl": certificates.client_context()} if scheme == "https" else {}
        _open(entry, "127.0.0.1", 9, via=f"{scheme}://127.0.0.1:{proxy.port}",
              timeout=timeout_s, **tls)  # fmt: skip

    with servers(hold) as (proxy,):
        results = _failures_at_once(cases, attempt)
    for case, (error, elapsed) in results.items():
        assert isinstance(error, HopcatTimeoutError), (case, error)
        assert error.hop == 1 and "(hop 1/1)" in str(error), (case, error)
        assert elapsed < timeout_s + SLACK_S, (case, elapsed)


@pytest.mark.parametrize("phase_name", ["tcp-connect", "greeting", "proxy-tls", "https-reply",
                                        "hop2-reply", "target-tls", "nested-tls", "dns"])  # fmt: skip
def test_every_timeout_is_hopcats_with_its_hop(
    certificates: Certificates, phase_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a bare TimeoutError from deep inside (asyncio's, the ssl module's, a socket's)."""
    entries = ALL_ENTRIES
    if "tls" in phase_name or "https" in phase_name:  # connect_socket carries no TLS
        entries = [entry for entry in entries if not entry.startswith("socket")]
    if phase_name == "dns":  # the blocking API's lookup runs on a thread of its own
        entries = [entry for entry in entries if entry != "sync"]
        monkeypatch.setattr(hopcat.aio._driver, "resolve", _stuck_resolver())

    with phase_setup(phase_name, certificates) as (_phase, options):
        host, port = options.pop("host"), options.pop("port")

        def attempt(entry: str, _variant: str) -> None:
            _open(entry, host, port, timeout=0.3, **options)

        results = _failures_at_once([(entry, "") for entry in entries], attempt)
    for case, (error, _elapsed) in results.items():
        assert isinstance(error, HopcatTimeoutError), (case, error)
        if phase_name in ("target-tls", "nested-tls"):
            assert error.hop is None and "TLS handshake with the target" in str(error)
        else:
            expected = 2 if phase_name.startswith("hop2-") else 1
            assert error.hop == expected and f"(hop {expected}/" in str(error), (case, error)


# --------------------------------------------------------------------------- refusals


def _refusing(protocol: str, code: int) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        if protocol == "socks5":
            socks5_accept(conn, conn.sendall, auth=True)
            conn.sendall(b"\x05" + bytes([code]) + b"\x00\x01" + bytes(6))
        elif protocol == "socks4":
            socks4_accept(conn)
            conn.sendall(b"\x00" + bytes([code]) + bytes(6))
        else:
            http_accept(conn)
            conn.sendall(f"HTTP/1.1 {code} Refused\r\nContent-Length: 0\r\n\r\n".encode())
        hold(conn)

    return handler


REFUSALS = [
    ("socks5", 2, errno.EACCES), ("socks5", 3, errno.ENETUNREACH),
    ("socks5", 4, errno.EHOSTUNREACH), ("socks5", 5, errno.ECONNREFUSED),
    ("socks5", 6, errno.ETIMEDOUT), ("socks4", 91, errno.ECONNREFUSED),
    ("http", 403, errno.EACCES), ("http", 504, errno.ETIMEDOUT),
]  # fmt: skip


@pytest.mark.parametrize("hops", [1, 2])
@pytest.mark.parametrize(("protocol", "code", "expected_errno"), REFUSALS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_refusal_carries_errno_code_hop_and_a_redacted_proxy(
    entry: str, protocol: str, code: int, expected_errno: int, hops: int
) -> None:
    with servers(_refusing(protocol, code), socks5_relay) as (refusing, relaying):
        userinfo = "alice@" if protocol == "socks4" else "alice:s3cret-pw@"
        url = f"{protocol}://{userinfo}127.0.0.1:{refusing.port}"
        via = [f"socks5://127.0.0.1:{relaying.port}", url] if hops == 2 else url
        with pytest.raises(ProxyError) as caught:
            _open(entry, "127.0.0.1", 9, via=via, timeout=OPEN_TIMEOUT_S)
    error = caught.value
    assert isinstance(error, ConnectionError) and not isinstance(error, TimeoutError)
    assert (error.errno, error.code, error.hop) == (expected_errno, code, hops)
    assert error.proxy == url.replace(":s3cret-pw@", ":***@")
    assert "s3cret" not in str(error) and "s3cret" not in repr(error.args)


# --------------------------------------------------------------------------- the sync socket


def test_the_sync_socket_is_blocking_unless_a_timeout_was_given() -> None:
    with servers(banner_target, socks5_relay) as (target, relaying):
        via = f"socks5://127.0.0.1:{relaying.port}"
        for sock in (
            hopcat.create_connection(("127.0.0.1", target.port), via=via),
            hopcat.Proxy.from_url(via).connect("127.0.0.1", target.port),
            hopcat.open_tunnel("127.0.0.1", target.port, via=via).detach(),
        ):
            with sock:
                assert sock.gettimeout() is None and sock.getblocking()
                assert sock.recv(len(BANNER), socket.MSG_WAITALL) == BANNER
        for sock in (
            hopcat.create_connection(("127.0.0.1", target.port), 7.5, via=via),
            hopcat.Proxy.from_url(via).connect("127.0.0.1", target.port, 7.5),
        ):
            with sock:
                assert sock.gettimeout() == 7.5
        with hopcat.create_connection(("127.0.0.1", target.port), None, via=via) as sock:
            assert sock.gettimeout() is None


# --------------------------------------------------------------------------- end of stream


def _tls_proxy_that_closes(certificates: Certificates) -> Callable[[socket.socket], None]:
    """An https:// proxy whose answer, the target's banner and its TLS close_notify come at
    once (a target that said its piece and left)."""
    context = certificates.server_context()

    def handler(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            recv_until(tls, b"\r\n\r\n")
            tls.sendall(HTTP_ESTABLISHED + BANNER)
            tls.unwrap()

    return handler


def _tls_target_that_closes(certificates: Certificates) -> Callable[[socket.socket], None]:
    context = certificates.server_context()

    def handler(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(BANNER)
            tls.unwrap()

    return handler


@pytest.mark.parametrize("where", ["proxy-tls", "target-tls"])
def test_end_of_stream_under_tls_reaches_the_protocol_once(
    run: Callable[..., Any], certificates: Certificates, caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:  # fmt: skip
    handler = _tls_proxy_that_closes if where == "proxy-tls" else _tls_target_that_closes
    with servers(handler(certificates)) as (server,):
        if where == "proxy-tls":
            options: dict[str, Any] = {"host": "127.0.0.1", "port": 9,
                                       "via": f"https://127.0.0.1:{server.port}",
                                       "proxy_ssl": certificates.client_context()}  # fmt: skip
        else:
            options = {"host": "127.0.0.1", "port": server.port, "via": hopcat.Chain(),
                       "ssl": certificates.client_context()}  # fmt: skip

        async def scenario() -> None:
            for _ in range(5):  # the close often arrives before the hand-over: not always
                host, port = options["host"], options["port"]
                rest = {k: v for k, v in options.items() if k not in ("host", "port")}
                transport, recorder = await hopcat.aio.create_connection(
                    Recorder, host, port, timeout=OPEN_TIMEOUT_S, **rest
                )
                await asyncio.wait_for(recorder.closed, 5)
                await asyncio.sleep(0.01)  # a second connection_lost would come by now
                kinds = [kind for kind, _ in recorder.events]
                assert recorder.data() == BANNER
                assert kinds[0] == "made" and kinds[-2:] == ["eof", "lost"], recorder.events
                assert kinds.count("eof") == 1 and kinds.count("lost") == 1, recorder.events
                transport.close()

                reader, writer = await hopcat.aio.open_connection(
                    host, port, timeout=OPEN_TIMEOUT_S, **rest
                )
                assert await asyncio.wait_for(reader.read(), 5) == BANNER
                assert reader.at_eof()
                writer.close()

        with caplog.at_level("WARNING", logger="asyncio"):
            run(scenario())
    assert not caplog.records, [record.getMessage() for record in caplog.records]


def _https_proxy_and_target(certificates: Certificates) -> Callable[[socket.socket], None]:
    """An https:// proxy that is also the target: TLS inside its TLS (memory BIOs), a line,
    then a record no TLS session can decrypt."""
    outer_context, inner_context = certificates.server_context(), certificates.server_context()

    def handler(conn: socket.socket) -> None:
        with outer_context.wrap_socket(conn, server_side=True) as tls:
            http_accept(tls)
            tls.sendall(HTTP_ESTABLISHED)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            inner = inner_context.wrap_bio(incoming, outgoing, server_side=True)
            while True:
                try:
                    inner.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    tls.sendall(outgoing.read())
                    incoming.write(tls.recv(65536))
            inner.write(b"hello\n")
            tls.sendall(outgoing.read())
            time.sleep(0.05)  # the line is read first
            tls.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data, bad MAC
            hold(tls)

    return handler


def test_a_bad_record_inside_tls_in_tls_reaches_the_reader_as_an_ssl_error(
    run: Callable[..., Any], certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """On CPython before 3.11.8 and 3.12.2 asyncio turned this into a TypeError (gh-113214)."""
    with servers(_https_proxy_and_target(certificates)) as (proxy,):

        async def scenario() -> None:
            reader, writer = await hopcat.aio.open_connection(
                "localhost", 9, via=f"https://127.0.0.1:{proxy.port}", timeout=OPEN_TIMEOUT_S,
                proxy_ssl=certificates.client_context(), ssl=certificates.client_context(),
            )  # fmt: skip
            assert await reader.readline() == b"hello\n"
            with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()

        with caplog.at_level("WARNING", logger="asyncio"):
            run(scenario())
    assert not caplog.records, [record.getMessage() for record in caplog.records]


# --------------------------------------------------------------------------- an empty chain


def test_an_empty_chain_as_an_asyncssh_tunnel_connects_directly(run: Callable[..., Any]) -> None:
    with servers(banner_target) as (target,):

        async def scenario() -> None:
            chain = hopcat.Chain()
            assert chain  # asyncssh tests a tunnel's truth: an empty chain is still used
            transport, recorder = await chain.create_connection(
                Recorder, "127.0.0.1", target.port, family=0, local_addr=None
            )
            assert transport.get_extra_info("peername")[:2] == ("127.0.0.1", target.port)
            assert await asyncio.wait_for(recorder.wait_data(len(BANNER)), 5) == BANNER
            transport.close()
            await recorder.closed

        run(scenario())
