"""hopcat serve's connection handling in-process: a real ``Server`` on an asyncio loop run by the
test, raw clients on loopback sockets, a scripted resolver (no DNS), an echo target on the same
loop. Covers what a subprocess cannot show: which names reached the resolver, how many lookups
ran at once, which address was dialled.

Clients choose their source address (127.0.0.2, 127.0.0.3, ...) to be different clients to the
server, which keys its per-client limits by address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from hopcat.server.cli import finish, parse_args
from hopcat.server.ifaddrs import host_addresses
from hopcat.server.log import Logger
from hopcat.server.policy import Policy
from hopcat.server.serve import (
    LOOKUPS_PER_CLIENT,
    RESOLVER_WORKERS,
    DaemonPool,
    Server,
    bind_listeners,
    load_config,
)
from hopcat.server.upstream import UPSTREAM_OPENS, UPSTREAM_OPENS_PER_CLIENT

SCENARIO_TIMEOUT_S = 20.0
BOUND_S = 3.0  # how long a client that must not be held up may take, on a loaded machine


class ScriptedResolver:
    """Answers from ``table`` (name -> address); names starting with "slow" block until
    ``release`` is set. Records every call, and the most slow calls ever in flight at once."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.release = threading.Event()
        self.in_flight = 0
        self.slow_in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> Sequence[tuple[Any, ...]]:
        slow = host.startswith("slow")
        with self._lock:
            self.calls.append(host)
            self.in_flight += 1
            self.slow_in_flight += slow
            self.most_in_flight = max(self.most_in_flight, self.slow_in_flight)
        try:
            if slow:
                self.release.wait(SCENARIO_TIMEOUT_S)
            address = self.table.get(host)
            if address is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port) if family == socket.AF_INET else (address, port, 0, 0)
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
        finally:
            with self._lock:
                self.in_flight -= 1
                self.slow_in_flight -= slow


class Scene:
    """A running in-process server plus an echo target, both on ``loop``."""

    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.tmp_path = tmp_path
        self.loop = loop
        self.servers: list[Server] = []
        self.tasks: list[asyncio.Task[int]] = []
        self.echo_port = 0
        self.echo_peers: list[str] = []
        self.clients: list[socket.socket] = []
        self.log_fds: list[int] = []
        self.echo_server: asyncio.Server | None = None

    async def start_echo(self) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.echo_peers.append(str(writer.get_extra_info("peername")[0]))
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        self.echo_port = self.echo_server.sockets[0].getsockname()[1]

    def serve(
        self, *args: str, resolver: Callable[[str, int], Sequence[tuple[Any, ...]]],
        restrict_local: bool | None = None,
    ) -> Server:  # fmt: skip
        options = finish(parse_args(["127.0.0.1:0", *args]))
        credentials, policy, _warnings = load_config(options)
        if restrict_local is not None:
            policy = Policy(policy.rules, restrict_local=restrict_local)
        listeners = bind_listeners(options.bind_addresses)
        log_fd = os.open(self.tmp_path / f"serve{len(self.servers)}.log", os.O_WRONLY | os.O_CREAT)
        self.log_fds.append(log_fd)
        logger = Logger(fmt="text", fd=log_fd)
        server = Server(options, listeners, self.loop, logger, credentials, policy,
                        resolver=resolver)  # fmt: skip
        self.servers.append(server)
        self.tasks.append(self.loop.create_task(server.serve()))
        return server

    def log(self, index: int = 0) -> str:
        return (self.tmp_path / f"serve{index}.log").read_text()

    async def client(self, server: Server, source: str = "127.0.0.2") -> socket.socket:
        """A connected non-blocking client socket from ``source``, closed at the end."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.clients.append(sock)
        sock.setblocking(False)
        sock.bind((source, 0))
        host, port = server.listeners[0].getsockname()[:2]
        await self.loop.sock_connect(sock, (host, port))
        return sock

    async def stop(self) -> None:
        for sock in self.clients:
            sock.close()
        for server in self.servers:
            server.stop("SIGTERM")
            server.stop("SIGTERM")  # the second: close tunnels at once
        await asyncio.gather(*self.tasks)
        for fd in self.log_fds:
            os.close(fd)
        if self.echo_server is not None:
            self.echo_server.close()
            await self.echo_server.wait_closed()


def run_scene(tmp_path: Path, scenario: Callable[[Scene], Coroutine[Any, Any, None]]) -> Scene:
    loop = asyncio.new_event_loop()
    scene = Scene(tmp_path, loop)

    async def main() -> None:
        await scene.start_echo()
        try:
            await asyncio.wait_for(scenario(scene), SCENARIO_TIMEOUT_S)
        finally:
            await scene.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return scene


async def recv_exact(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data


def socks5_request(host: str, port: int) -> bytes:
    """Greeting (no auth) and CONNECT in one buffer; a literal host goes as an address."""
    for family, atyp in ((socket.AF_INET, 1), (socket.AF_INET6, 4)):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        address = bytes((atyp,)) + packed
        break
    else:
        name = host.encode()
        address = bytes((3, len(name))) + name
    return b"\x05\x01\x00" + b"\x05\x01\x00" + address + port.to_bytes(2, "big")


async def socks5(sock: socket.socket, host: str, port: int) -> int:
    """The reply code of a SOCKS5 CONNECT."""
    await asyncio.get_running_loop().sock_sendall(sock, socks5_request(host, port))
    assert await recv_exact(sock, 2) == b"\x05\x00"
    head = await recv_exact(sock, 4)
    await recv_exact(sock, {1: 4, 4: 16}[head[3]] + 2)
    return head[1]


async def socks4(sock: socket.socket, host: str, port: int) -> int:
    try:
        address, name = socket.inet_aton(host), b""
    except OSError:
        address, name = b"\0\0\0\1", host.encode() + b"\0"
    request = b"\x04\x01" + port.to_bytes(2, "big") + address + b"\0" + name
    await asyncio.get_running_loop().sock_sendall(sock, request)
    return (await recv_exact(sock, 8))[1]


async def http(sock: socket.socket, host: str, port: int) -> int:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, request)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await recv_exact(sock, 1)
    return int(head.split()[1])


async def echoes(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"ping")
    return await recv_exact(sock, 4) == b"ping"


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S * 2
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- rule 12


def test_one_client_cannot_hold_every_resolver_thread(tmp_path: Path) -> None:
    assert LOOKUPS_PER_CLIENT < RESOLVER_WORKERS
    resolver = ScriptedResolver({"fast.example": "127.0.0.1"})
    flood = RESOLVER_WORKERS + 8

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=resolver, restrict_local=False)
        hog = [await scene.client(server, "127.0.0.2") for _ in range(flood)]
        for index, sock in enumerate(hog):
            await scene.loop.sock_sendall(sock, socks5_request(f"slow{index}.example", 80))
        await wait_for(lambda: len(resolver.calls) >= LOOKUPS_PER_CLIENT, "the hog's lookups")
        started = time.monotonic()
        other = await scene.client(server, "127.0.0.3")
        assert await socks5(other, "fast.example", scene.echo_port) == 0
        assert await echoes(other)
        assert time.monotonic() - started < BOUND_S
        # The hog never had more than its share in flight; the rest waited their turn.
        assert resolver.most_in_flight == LOOKUPS_PER_CLIENT
        assert sum(name.startswith("slow") for name in resolver.calls) == LOOKUPS_PER_CLIENT
        resolver.release.set()
        await wait_for(lambda: len(resolver.calls) == flood + 1, "the queued lookups")
        assert resolver.most_in_flight <= LOOKUPS_PER_CLIENT
        for sock in [*hog, other]:
            sock.close()

    run_scene(tmp_path, scenario)


def test_a_queued_lookup_is_dropped_when_its_client_leaves(tmp_path: Path) -> None:
    resolver = ScriptedResolver({})

    async def scenario(scene: Scene) -> None:
        server = scene.serve("--connect-timeout", "0.5", resolver=resolver, restrict_local=False)
        socks = [await scene.client(server) for _ in range(LOOKUPS_PER_CLIENT + 3)]
        for index, sock in enumerate(socks):
            await scene.loop.sock_sendall(sock, socks5_request(f"slow{index}.example", 80))
        await wait_for(lambda: "result=timeout" in scene.log(), "connect timeouts")
        resolver.release.set()
        await wait_for(lambda: resolver.in_flight == 0 and not server.resolving.running, "lookups")
        # The queued three timed out before their turn: they never reached the resolver.
        assert len(resolver.calls) == LOOKUPS_PER_CLIENT
        for sock in socks:
            sock.close()

    run_scene(tmp_path, scenario)


class SlowUpstream:
    """A SOCKS5 upstream (no auth, names only) that grants "fast*" names at once, with an echo
    tunnel, and never answers for the others; counts the unanswered requests it holds, the
    names it was asked for in order, and the held connections the server closed."""

    def __init__(self) -> None:
        self.held = 0
        self.most_held = 0
        self.let_go = 0
        self.names: list[str] = []
        self.port = 0
        self.server: asyncio.Server | None = None
        self.release = asyncio.Event()
        self.writers: dict[str, asyncio.StreamWriter] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(3)
            writer.write(b"\x05\x00")
            head = await reader.readexactly(5)
            name = await reader.readexactly(head[4])
            await reader.readexactly(2)
            self.names.append(name.decode())
            if not name.startswith(b"fast"):
                self.held += 1
                self.most_held = max(self.most_held, self.held)
                self.writers[name.decode()] = writer
                released = asyncio.ensure_future(self.release.wait())
                closed = asyncio.ensure_future(reader.read(1))
                done, _ = await asyncio.wait({released, closed}, return_when="FIRST_COMPLETED")
                for future in (released, closed):
                    future.cancel()
                if closed in done:
                    self.let_go += 1
                self.held -= 1
                return
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x01")
            while data := await reader.read(65536):
                writer.write(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_one_client_cannot_hold_every_upstream_open(tmp_path: Path) -> None:
    assert UPSTREAM_OPENS_PER_CLIENT < UPSTREAM_OPENS
    upstream = SlowUpstream()
    flood = UPSTREAM_OPENS_PER_CLIENT + 8

    async def scenario(scene: Scene) -> None:
        await upstream.start()
        try:
            server = scene.serve("--via", f"socks5h://127.0.0.1:{upstream.port}",
                                 resolver=ScriptedResolver({}), restrict_local=False)  # fmt: skip
            for index in range(flood):
                hog = await scene.client(server, "127.0.0.2")
                await scene.loop.sock_sendall(hog, socks5_request(f"slow{index}.example", 80))
            await wait_for(lambda: upstream.held >= UPSTREAM_OPENS_PER_CLIENT, "the hog's opens")
            started = time.monotonic()
            other = await scene.client(server, "127.0.0.3")
            assert await socks5(other, "fast.example", 80) == 0
            assert await echoes(other)
            assert time.monotonic() - started < BOUND_S
            assert upstream.most_held == UPSTREAM_OPENS_PER_CLIENT
        finally:
            await upstream.close()

    run_scene(tmp_path, scenario)


def test_freed_upstream_slots_go_round_robin(tmp_path: Path) -> None:
    """Two slots in all: when one frees, the waiting clients take turns, whoever queued more."""
    upstream = SlowUpstream()

    async def scenario(scene: Scene) -> None:
        await upstream.start()
        try:
            server = scene.serve("--via", f"socks5h://127.0.0.1:{upstream.port}",
                                 resolver=ScriptedResolver({}), restrict_local=False)  # fmt: skip
            server.opens.limit = 2
            for name in ("slow-a1", "slow-a2", "slow-a3", "slow-a4", "fast-b1"):
                sock = await scene.client(server, "127.0.0.3" if "-b" in name else "127.0.0.2")
                await scene.loop.sock_sendall(sock, socks5_request(name, 80))
                await asyncio.sleep(0.05)  # queued in this order
            await wait_for(lambda: upstream.held == 2, "two opens in flight")
            upstream.writers["slow-a1"].close()  # a1 fails: its slot goes to a3, a's next
            await wait_for(lambda: len(upstream.names) == 3, "the third open")
            upstream.writers["slow-a2"].close()  # then to b, although a4 queued before it
            await wait_for(lambda: "fast-b1" in upstream.names, "b's open")
            # b's open succeeds at once, and its slot goes to a4.
            await wait_for(lambda: len(upstream.names) == 5, "the last open")
            assert upstream.names == ["slow-a1", "slow-a2", "slow-a3", "fast-b1", "slow-a4"]
        finally:
            await upstream.close()

    run_scene(tmp_path, scenario)


def test_hop_names_go_through_the_servers_resolver(tmp_path: Path) -> None:
    """The first hop's name is looked up by the server's resolver (its threads, the client's
    share), not by a resolver of the driver's own."""
    resolver = ScriptedResolver({"upstream.example": "127.0.0.1"})
    upstream = SlowUpstream()

    async def scenario(scene: Scene) -> None:
        await upstream.start()
        try:
            server = scene.serve("--via", f"socks5h://upstream.example:{upstream.port}",
                                 resolver=resolver, restrict_local=False)  # fmt: skip
            sock = await scene.client(server)
            assert await socks5(sock, "fast.example", 80) == 0
            assert await echoes(sock)
            assert resolver.calls == ["upstream.example"]
        finally:
            await upstream.close()

    run_scene(tmp_path, scenario)


@pytest.mark.parametrize("how", ["close", "reset", "deadline", "shutdown"])
def test_a_client_that_leaves_cancels_its_upstream_open(tmp_path: Path, how: str) -> None:
    """The upstream connection is closed at once, on this loop, with nothing left behind (a
    ResourceWarning or a pending task would fail the test: warnings are errors here)."""
    upstream = SlowUpstream()

    async def scenario(scene: Scene) -> None:
        await upstream.start()
        try:
            timeout = "0.5" if how == "deadline" else "30"
            server = scene.serve("--via", f"socks5h://127.0.0.1:{upstream.port}",
                                 "--connect-timeout", timeout, resolver=ScriptedResolver({}),
                                 restrict_local=False)  # fmt: skip
            sock = await scene.client(server)
            await scene.loop.sock_sendall(sock, socks5_request("slow.example", 80))
            await wait_for(lambda: upstream.held == 1, "the open")
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            if how in ("close", "reset"):
                sock.close()
            elif how == "shutdown":
                server.stop("SIGTERM")
            await wait_for(lambda: upstream.let_go == 1, "the upstream connection closed")
            assert not server.opens.in_flight
            if how != "shutdown":
                await wait_for(lambda: server.count == 0, "the connection's end")
        finally:
            await upstream.close()

    scene = run_scene(tmp_path, scenario)
    expected = {"close": "client-closed", "reset": "client-closed", "deadline": "timeout",
                "shutdown": "shutdown"}[how]  # fmt: skip
    assert f"result={expected}" in scene.log()
    if how == "deadline":
        assert "(hop 1/1)" in scene.log() and "--connect-timeout 0.5 s" in scene.log()
    assert "event=error" not in scene.log()


# --------------------------------------------------------------------------- rule 10


def test_the_checked_address_is_the_dialled_one(tmp_path: Path) -> None:
    """One lookup per request, and the dial goes to its answer: a resolver that changes its
    answer afterwards (DNS rebinding) changes nothing."""
    resolver = ScriptedResolver({"rebind.example": "127.0.0.1"})

    async def scenario(scene: Scene) -> None:
        server = scene.serve("--deny", "10.0.0.0/8", resolver=resolver, restrict_local=False)
        sock = await scene.client(server)
        original = resolver.__call__

        def rebinding(host: str, port: int) -> Sequence[tuple[Any, ...]]:
            answer = original(host, port)
            resolver.table[host] = "10.0.0.1"  # the next lookup would be denied, or elsewhere
            return answer

        server.resolver = rebinding
        assert await socks5(sock, "rebind.example", scene.echo_port) == 0
        assert await echoes(sock)
        assert resolver.calls == ["rebind.example"]
        sock.close()

    run_scene(tmp_path, scenario)


@pytest.mark.parametrize(
    "host",
    ["\uff42\uff41\uff44.example", "BAD.example.", "bad\u3002example", "bad\uff0eexample",
     "bad\uff61example", "xn--bad-.example"],
)  # fmt: skip
def test_names_are_folded_before_globs(tmp_path: Path, host: str) -> None:
    resolver = ScriptedResolver({"bad.example": "127.0.0.1", "xn--bad-.example": "127.0.0.1"})

    async def scenario(scene: Scene) -> None:
        server = scene.serve("--deny", "bad.example", "--deny", "xn--bad-.example",
                             resolver=resolver, restrict_local=False)  # fmt: skip
        sock = await scene.client(server)
        assert await socks5(sock, host, scene.echo_port) == 2
        assert resolver.calls == []  # decided on the name: no lookup spent
        sock.close()

    run_scene(tmp_path, scenario)


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "::ffff:127.0.0.1",
             "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11", "localhost", "self.example"],
)  # fmt: skip
def test_exposed_server_denies_its_own_host_in_every_spelling(tmp_path: Path, host: str) -> None:
    # An interface's address that no built-in network covers (not loopback, not link-local).
    own = [a for a in host_addresses() if not (a.is_loopback or a.is_link_local)] or [
        ipaddress.ip_address("127.0.0.1")
    ]
    table = {"localhost": "127.0.0.1", "self.example": str(own[0])}
    resolver = ScriptedResolver(table)

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=resolver, restrict_local=True)
        sock = await scene.client(server)
        assert await socks5(sock, host, scene.echo_port) == 2
        sock.close()
        assert scene.echo_peers == []

    run_scene(tmp_path, scenario)


def test_every_host_address_is_denied(tmp_path: Path) -> None:
    """Each of the host's interface addresses as a literal: refused by an exposed server."""

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=ScriptedResolver({}), restrict_local=True)
        assert server.policy.host_addresses, "no interface address found"
        for address in server.policy.host_addresses:
            sock = await scene.client(server)
            assert await socks5(sock, str(address), scene.echo_port) == 2, address
            sock.close()

    run_scene(tmp_path, scenario)


def test_a_local_upstream_gets_the_checked_address(tmp_path: Path) -> None:
    """--via to an upstream on this host: names are resolved and checked here, and the upstream
    is asked for the checked address, so neither 'localhost' nor a rebinding name gets past."""
    resolver = ScriptedResolver({"localhost": "127.0.0.1", "echo.example": "127.0.0.1"})

    async def scenario(scene: Scene) -> None:
        upstream = scene.serve(resolver=ScriptedResolver({}), restrict_local=False)
        up_host, up_port = upstream.listeners[0].getsockname()[:2]
        front = scene.serve("--via", f"socks5h://{up_host}:{up_port}",
                            "--allow", f"127.0.0.1:{scene.echo_port}",
                            resolver=resolver, restrict_local=True)  # fmt: skip
        assert front.resolves_names
        for host, port, code in [
            ("localhost", scene.echo_port + 1, 2), ("127.1", scene.echo_port + 1, 2),
            ("2130706433", 22, 2), ("echo.example", scene.echo_port, 0),
        ]:  # fmt: skip
            sock = await scene.client(front)
            assert await socks5(sock, host, port) == code, host
            if code == 0:
                assert await echoes(sock)
            sock.close()
        await wait_for(lambda: "result=ok" in scene.log(0), "the upstream's log line")
        assert f"dest=127.0.0.1:{scene.echo_port}" in scene.log(0)
        assert "echo.example" not in scene.log(0)

    run_scene(tmp_path, scenario)


# --------------------------------------------------------------------------- rule 11


@pytest.mark.parametrize("protocol", ["socks5", "socks4", "socks4a", "http"])
def test_connect_to_itself_is_refused(tmp_path: Path, protocol: str) -> None:
    resolver = ScriptedResolver({"localhost": "127.0.0.1", "me.example": "::ffff:127.0.0.1"})
    expected = {"socks5": 2, "socks4": 91, "socks4a": 91, "http": 403}[protocol]

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=resolver, restrict_local=False)
        port = server.listeners[0].getsockname()[1]
        hosts = {"socks4": ["127.0.0.1", "0.0.0.0"]}.get(
            protocol, ["127.0.0.1", "localhost", "me.example", "127.1", "0", "::ffff:127.0.0.1"]
        )
        ask = {"socks5": socks5, "socks4": socks4, "socks4a": socks4, "http": http}[protocol]
        for host in hosts:
            if protocol == "socks4a" and host[0].isdigit():
                host = f"{host}."  # still a name to SOCKS4a; denied once resolved
                resolver.table[host] = "127.0.0.1"
            sock = await scene.client(server)
            assert await ask(sock, host, port) == expected, host
            sock.close()
        await wait_for(lambda: scene.log().count("proxy loop") == len(hosts), "log lines")
        assert scene.log().count("result=denied") == len(hosts)

    run_scene(tmp_path, scenario)


def test_pipelined_self_connects_are_one_refusal(tmp_path: Path) -> None:
    """500 self-CONNECTs in one segment: the first is refused and the rest dropped with the
    connection, so nothing multiplies and another client is served at once."""

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=ScriptedResolver({}), restrict_local=False)
        port = server.listeners[0].getsockname()[1]
        flood = await scene.client(server, "127.0.0.2")
        await scene.loop.sock_sendall(flood, socks5_request("127.0.0.1", port) * 500)
        other = await scene.client(server, "127.0.0.3")
        started = time.monotonic()
        assert await socks5(other, "127.0.0.1", scene.echo_port) == 0
        assert await echoes(other)
        assert time.monotonic() - started < BOUND_S
        assert server.served == 2
        flood.close()
        other.close()

    run_scene(tmp_path, scenario)


def test_listener_on_every_address_is_reached_by_each(tmp_path: Path) -> None:
    policy_port = 40000

    async def scenario(scene: Scene) -> None:
        server = scene.serve(resolver=ScriptedResolver({}), restrict_local=False)
        server.policy.listeners = ((ipaddress.ip_address("0.0.0.0"), policy_port),)
        for address in [a for a in server.policy.host_addresses if a.version == 4]:
            sock = await scene.client(server)
            assert await socks5(sock, str(address), policy_port) == 2, address
            sock.close()

    run_scene(tmp_path, scenario)


# --------------------------------------------------------------------------- the thread pool


def test_daemon_pool_runs_every_job_on_at_most_its_threads() -> None:
    pool = DaemonPool(3, "test-pool")
    gate = threading.Event()
    seen: set[str] = set()

    def job(number: int) -> int:
        gate.wait(SCENARIO_TIMEOUT_S)
        seen.add(threading.current_thread().name)
        assert threading.current_thread().daemon  # never joined at exit
        return number * 2

    futures = [pool.submit(job, number) for number in range(50)]
    gate.set()
    assert [f.result(SCENARIO_TIMEOUT_S) for f in futures] == [n * 2 for n in range(50)]
    assert 1 <= len(seen) <= 3
    # Idle threads take new jobs instead of new threads being made.
    assert pool.submit(job, 21).result(SCENARIO_TIMEOUT_S) == 42 and len(seen) <= 3
    gate.clear()
    waiting = [pool.submit(job, number) for number in range(6)]
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    while sum(f.running() for f in waiting) < 3:  # every thread busy
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pool.shutdown(cancel_futures=True)
    assert [f.cancelled() for f in waiting] == [False] * 3 + [True] * 3  # not started: cancelled
    gate.set()
    assert [f.result(SCENARIO_TIMEOUT_S) for f in waiting[:3]] == [0, 2, 4]


# --------------------------------------------------------------------------- Digest nonces


def test_a_stale_digest_nonce_is_answered_again(tmp_path: Path) -> None:
    """hopcat's client answers a nonce that expired between the 407 and its answer (the server's
    clock jumps past the lifetime after the first nonce): a 407 with stale=true and a new nonce,
    answered without a new password, on a third connection. An answer sent again is refused."""
    import hopcat
    from hopcat.proto.http_auth import DigestClient, parse_challenges

    async def scenario(scene: Scene) -> None:
        server = scene.serve("--auth", "alice:digest-pass-7", "--auth-scheme", "digest", resolver=ScriptedResolver({}))
        assert server.digest is not None
        calls: list[int] = []

        def clock() -> float:
            calls.append(1)
            return 5000.0 if len(calls) == 1 else 5000.0 + server.options.nonce_lifetime_s + 1

        server.digest.clock = clock
        host, port = server.listeners[0].getsockname()[:2]
        via = f"http://alice:digest-pass-7@{host}:{port}"
        tunnel = await scene.loop.run_in_executor(
            None, lambda: hopcat.create_connection(("127.0.0.1", scene.echo_port), 10, via=via)
        )
        try:
            await scene.loop.run_in_executor(None, tunnel.sendall, b"ping")
            assert await scene.loop.run_in_executor(None, tunnel.recv, 4) == b"ping"
        finally:
            tunnel.close()
        await wait_for(lambda: "result=ok" in scene.log(), "the tunnel's log line")
        log = scene.log()
        assert log.count("result=auth-failed") == 2, log  # the probe, the stale nonce
        assert "stale=true" in log and "user=alice" in log

        # A recorded answer replayed on a new connection is refused.
        sock = await scene.client(server)
        authority = f"127.0.0.1:{scene.echo_port}"
        await scene.loop.sock_sendall(sock, f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += await recv_exact(sock, 1)
        values = [line.split(": ", 1)[1] for line in head.decode().split("\r\n")
                  if line.startswith("Proxy-Authenticate: ")]  # fmt: skip
        challenge = DigestClient.choose(parse_challenges(values))
        assert challenge is not None and "stale" not in challenge.params
        value = DigestClient("alice", "digest-pass-7").authorization(challenge, "CONNECT", authority, "c1")
        request = f"CONNECT {authority} HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n".encode()
        statuses = []
        for source in ("127.0.0.3", "127.0.0.4"):
            sock = await scene.client(server, source)
            await scene.loop.sock_sendall(sock, request)
            statuses.append(int((await recv_exact(sock, 12)).split()[1]))
            sock.close()
        assert statuses == [200, 407]
        await wait_for(lambda: "replayed" in scene.log(), "the replay's log line")

    scene = run_scene(tmp_path, scenario)
    assert "response=" not in scene.log() and "digest-pass-7" not in scene.log()


# --------------------------------------------------------------------------- UDP ASSOCIATE


class UdpEcho:
    """A UDP echo on the scene's loop; ``received`` lists the payloads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        loop.add_reader(self.sock.fileno(), self._echo)

    def _echo(self) -> None:
        data, source = self.sock.recvfrom(65536)
        self.received.append(data)
        self.sock.sendto(data, source)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def udp_associate(
    scene: Scene, server: Server
) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """A control connection from 127.0.0.2, its UDP socket, the relay's address."""
    control = await scene.client(server)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    scene.clients.append(udp)
    udp.setblocking(False)
    udp.bind(("127.0.0.2", 0))
    host, port = udp.getsockname()
    loop = asyncio.get_running_loop()
    request = b"\x05\x03\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")
    await loop.sock_sendall(control, b"\x05\x01\x00" + request)
    assert await recv_exact(control, 2) == b"\x05\x00"
    reply = await recv_exact(control, 10)
    assert reply[:4] == b"\x05\x00\x00\x01"
    return control, udp, (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:], "big"))


def association_of(server: Server) -> Any:
    (conn,) = [conn for conn in server.tunnels if conn.udp is not None]
    return conn.udp


def test_udp_names_are_resolved_once_per_association(tmp_path: Path) -> None:
    """The first datagram to a name starts its lookup, the next ones wait for it, and every
    later one goes to the checked answer: a resolver that changes its mind (DNS rebinding)
    changes nothing within the association."""
    from hopcat.proto import socks5_udp

    resolver = ScriptedResolver({"udp.example": "127.0.0.1"})

    async def scenario(scene: Scene) -> None:
        echo = UdpEcho(scene.loop)
        original = resolver.__call__

        def rebinding(host: str, port: int) -> Sequence[tuple[Any, ...]]:
            answer = original(host, port)
            resolver.table[host] = "10.0.0.1"
            return answer

        server = scene.serve("--deny", "10.0.0.0/8", resolver=rebinding, restrict_local=False)
        control, udp, relay = await udp_associate(scene, server)
        loop = asyncio.get_running_loop()
        for i in range(3):
            await loop.sock_sendto(udp, socks5_udp.pack("udp.example", echo.port, b"%d" % i), relay)
        await wait_for(lambda: len(echo.received) == 3, "three datagrams through one lookup")
        await loop.sock_sendto(udp, socks5_udp.pack("udp.example", echo.port, b"3"), relay)
        await wait_for(lambda: len(echo.received) == 4, "a fourth to the same address")
        assert sorted(echo.received) == [b"0", b"1", b"2", b"3"]
        assert resolver.calls == ["udp.example"]
        control.close()
        echo.close()

    run_scene(tmp_path, scenario)


def test_exposed_server_drops_datagrams_to_its_host_in_every_spelling(tmp_path: Path) -> None:
    from hopcat.proto import socks5_udp

    spellings = ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "::ffff:127.0.0.1",
                 "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11", "localhost",
                 "169.254.169.254", "self.example"]  # fmt: skip
    resolver = ScriptedResolver({"localhost": "127.0.0.1", "self.example": "::1"})

    async def scenario(scene: Scene) -> None:
        echo = UdpEcho(scene.loop)
        server = scene.serve(resolver=resolver, restrict_local=True)
        control, udp, relay = await udp_associate(scene, server)
        loop = asyncio.get_running_loop()
        for host in spellings:
            await loop.sock_sendto(udp, socks5_udp.pack(host, echo.port, b"no"), relay)
        association = association_of(server)
        await wait_for(
            lambda: association.dropped.get("denied") == len(spellings), "every spelling denied"
        )
        assert echo.received == [] and association.datagrams_up == 0
        control.close()
        echo.close()

    run_scene(tmp_path, scenario)


def test_reloaded_rules_apply_to_a_destination_already_used(tmp_path: Path) -> None:
    """A destination once allowed is remembered, but only under the rules it was checked by."""
    from hopcat.proto import socks5_udp

    async def scenario(scene: Scene) -> None:
        echo = UdpEcho(scene.loop)
        server = scene.serve(resolver=ScriptedResolver({}), restrict_local=False)
        control, udp, relay = await udp_associate(scene, server)
        loop = asyncio.get_running_loop()
        datagram = socks5_udp.pack("127.0.0.1", echo.port, b"x")
        await loop.sock_sendto(udp, datagram, relay)
        await wait_for(lambda: len(echo.received) == 1, "the first datagram")
        options = finish(parse_args(["127.0.0.1:0", "--deny", f"127.0.0.1:{echo.port}"]))
        _credentials, policy, _warnings = load_config(options)
        server.policy = Policy(policy.rules, restrict_local=False)  # as SIGHUP would
        await loop.sock_sendto(udp, datagram, relay)
        association = association_of(server)
        await wait_for(lambda: association.dropped.get("denied") == 1, "the reloaded deny")
        assert len(echo.received) == 1
        control.close()
        echo.close()

    run_scene(tmp_path, scenario)
