"""Opening the ``--via`` chain for a client: the tunnel engine's plan (``hopcat.net.engine``)
carried out by the asyncio driver (``hopcat.aio._driver.run_plan`` over its socket-level IO) as
a task on the server's own event loop. No thread: an open in flight is a task, a socket and the
driver's timers, so thousands of them cost what thousands of connections cost.

The IO object is the driver's ``SocketIO`` with two changes (``ServerIO``): every name the plan
needs (the first hop's, a SOCKS4 hop's next hop or target) goes through the server's resolver
(``Server.lookup``: its resolver threads, within the client's share of them) unless it is an IP
literal, which is parsed here without a lookup; and the upstream socket gets TCP_NODELAY, as the
server's direct dials do. Reads are not exact: the bytes that came with the last proxy reply (a
target that speaks first, such as an SSH server) come back as ``trailing``, and the relay sends
them to the client before anything else. TLS hops run in the driver too, with the context
made once at start (``--via-cacert``, ``--via-insecure``); their sessions stay with the socket,
and ``hopcat.server.tls.Bridge`` puts them between it and a socketpair whose other end the
relay takes for the upstream. A TLS failure at a hop is that hop's protocol error, reported as
the other upstream failures are.

Deadline: the server's --connect-timeout, counted from the client's request, bounds the whole
open (queueing included); the plan labels a timeout with the hop and the phase.

Fair shares (``Opens``): one client address has at most ``UPSTREAM_OPENS_PER_CLIENT`` opens in
flight and the server at most ``UPSTREAM_OPENS`` (each holds a socket, two while Happy Eyeballs
races, three while a silent first hop is probed); further opens wait in a FIFO per client, and
a freed slot goes to the waiting clients in turn (round robin), so a client whose opens stall
on a slow upstream delays only itself.

Leaving: ``Upstream.cancel()`` (the client closed or reset, its deadline passed, the server is
stopping) drops a queued open, or cancels the running task, whose cancellation closes the
upstream socket and every attempt or probe under way; an open that completed in the meantime has
its socket closed. ``Opens.close()`` waits for the cancelled tasks at shutdown, so none is left
pending when the loop closes.

Failures become (result, reason) from the error's fields (``failure``): never from its text.
"""

from __future__ import annotations

import asyncio
import collections
import socket

from hopcat._endpoint import format_hostport, is_ip_literal
from hopcat.aio._driver import SocketIO, run_plan
from hopcat.errors import (
    HopcatError,
    ProxyAuthError,
    ProxyError,
    ProxyUnreachableError,
    ResolveError,
)
from hopcat.net.dial import describe_oserror, tune_socket
from hopcat.net.engine import tunnel_plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence
    from typing import Any

    from hopcat._url import ProxyURL
    from hopcat.net.tls import TLSLayers
    from hopcat.server.handler import Conn

    # The open chain: the upstream socket, its TLS hops' sessions (None for none), and the
    # target's bytes that came with the last proxy reply.
    _Opened = tuple[socket.socket, TLSLayers | None, bytes]

UPSTREAM_OPENS = 1024
VIA_TLS_OPTIONS = "--via-cacert FILE to trust its CA, --via-insecure to skip the check"
UPSTREAM_OPENS_PER_CLIENT = 8  # well below UPSTREAM_OPENS: one client cannot take every slot

# How upstream SOCKS5 reply codes and HTTP statuses read as our results (a SOCKS5 code is passed
# on as it is to a SOCKS5 client).
_UPSTREAM_SOCKS5 = {2: "denied", 3: "net-unreachable", 4: "unreachable", 5: "refused", 6: "timeout"}
_UPSTREAM_HTTP = {403: "denied", 504: "timeout"}

# Upstream states.
_QUEUED = 1
_RUNNING = 2
_DONE = 3
_CANCELLED = 4


def failure(exc: BaseException, hops: int) -> tuple[str, str, int | None]:
    """(result, reason, SOCKS5 code to pass on or None) for an open that failed with ``exc``
    through a chain of ``hops`` hops; the reason is the error's message, which names the hop.

    An upstream's refusal to reach the target is passed on as what it says; one from an earlier
    hop, or over credentials, says nothing about the target and is "upstream-refused". An error
    that no layer located (``hop`` None) is taken as the last hop's.
    """
    text = str(exc)
    if isinstance(exc, TimeoutError):  # HopcatTimeoutError, or a bare one from an unlabelled step
        return "timeout", text or "timed out", None
    if isinstance(exc, ProxyUnreachableError | ResolveError):
        return "upstream-unreachable", text, None
    if isinstance(exc, ProxyError):
        if isinstance(exc, ProxyAuthError) or exc.hop not in (None, hops):
            return "upstream-refused", text, None
        code = exc.code
        if exc.protocol == "socks5" and code in _UPSTREAM_SOCKS5:
            return _UPSTREAM_SOCKS5[code], text, code
        if exc.protocol == "http" and code in _UPSTREAM_HTTP:
            return _UPSTREAM_HTTP[code], text, None
        return "upstream-refused", text, None
    if isinstance(exc, HopcatError | OSError):
        return "upstream-error", text, None
    return "error", f"{type(exc).__name__}: {text}", None


class ServerIO(SocketIO):
    """The driver's socket-level IO, resolving through the server; see the module docstring."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, conn: Conn, context: ssl.SSLContext | None
    ) -> None:
        super().__init__(loop, context=context)
        self.conn = conn

    async def lookup(self, host: str, port: int, family: int) -> list[tuple[Any, ...]]:
        infos: Sequence[tuple[Any, ...]]
        try:
            if is_ip_literal(host):  # parsed here, never a resolver thread
                infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                           socket.IPPROTO_TCP, socket.AI_NUMERICHOST)  # fmt: skip
            else:
                infos = await self.conn.server.lookup(self.conn, host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            where = format_hostport(host, port)
            raise ResolveError(f"resolve {where}: {describe_oserror(exc)}") from None
        found = [
            info for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6) and family in (0, info[0])
        ]  # fmt: skip
        if not found:
            raise ResolveError(f"resolve {host}: no addresses")
        return found

    def connected(self, sock: socket.socket) -> None:
        super().connected(sock)
        tune_socket(sock, nodelay=True, keepalive=False)


class Upstream:
    """One client's open of the chain: queued, then a task on the loop; ``cancel()`` any time.
    Reports once to its Conn (``upstream_opened`` or ``upstream_failed``) unless cancelled."""

    __slots__ = ("conn", "deadline", "host", "opens", "port", "state", "task")

    def __init__(self, opens: Opens, conn: Conn, host: str, port: int, deadline: float) -> None:
        self.opens = opens
        self.conn = conn
        self.host = host
        self.port = port
        self.deadline = deadline  # loop.time()
        self.state = _QUEUED
        self.task: asyncio.Task[_Opened] | None = None

    def start(self) -> None:
        self.state = _RUNNING
        self.task = self.opens.loop.create_task(self._open())
        self.task.add_done_callback(self._done)

    async def _open(self) -> _Opened:
        opens = self.opens
        io = ServerIO(opens.loop, self.conn, opens.context)
        plan = tunnel_plan(opens.hops, self.host, self.port, clock=opens.loop.time,
                           timeout_label=opens.timeout_label, tls_options=VIA_TLS_OPTIONS)  # fmt: skip
        try:
            opened = await run_plan(plan, io, self.deadline)
        except BaseException:
            io.close()
            raise
        layers = io.layers
        return io.hand_over(delayed_acks=True), layers, opened.trailing

    def _done(self, task: asyncio.Task[_Opened]) -> None:
        self.opens.finished(self, task)
        if task.cancelled():
            return
        exc = task.exception()
        if self.state == _CANCELLED:  # the client left as the open completed
            if exc is None:
                task.result()[0].close()
            return
        self.state = _DONE
        if exc is not None:
            self.conn.upstream_failed(*failure(exc, len(self.opens.hops)))
            return
        sock, layers, trailing = task.result()
        if layers is None:
            self.conn.upstream_opened(sock, trailing, None)
            return
        from hopcat.server.tls import Bridge

        try:
            bridge = Bridge(self.opens.loop, sock, layers)
        except OSError as error:  # out of descriptors for the pair
            sock.close()
            self.conn.upstream_failed("error", f"socketpair: {describe_oserror(error)}", None)
            return
        self.conn.upstream_opened(bridge.outer, trailing, bridge)

    def cancel(self) -> None:
        """Give the open up: nothing reaches the Conn afterwards, and every socket it holds or
        gets is closed."""
        state = self.state
        self.state = _CANCELLED
        if state == _QUEUED:
            self.opens.dequeue(self)
        elif state == _RUNNING and self.task is not None:
            self.task.cancel()


class Opens:
    """The server's upstream opens and their fair shares; see the module docstring."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, hops: Sequence[ProxyURL], connect_timeout: float,
        *, limit: int = UPSTREAM_OPENS, per_client: int = UPSTREAM_OPENS_PER_CLIENT,
        context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        """``context``: the TLS hops' (``--via-cacert``, ``--via-insecure``), made once."""
        self.loop = loop
        self.hops = hops
        self.context = context
        self.timeout_label = f"--connect-timeout {connect_timeout:g} s"
        self.limit = limit
        self.per_client = per_client
        self.running: dict[str, int] = {}  # by client address
        self.in_flight = 0
        self._waiting: dict[str, collections.deque[Upstream]] = {}
        # Clients with an open waiting and a share free, in turn order (a dict keeps order).
        self._turns: dict[str, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def open(self, conn: Conn, host: str, port: int, deadline: float) -> Upstream:
        """Open the chain to host:port for ``conn`` by ``deadline`` (a loop.time()), now or when
        its turn comes."""
        upstream = Upstream(self, conn, host, port, deadline)
        client = conn.client_ip
        waiting = self._waiting.get(client)
        if waiting is None:
            waiting = self._waiting[client] = collections.deque()
        waiting.append(upstream)
        if self.running.get(client, 0) < self.per_client:
            self._turns.setdefault(client, None)
        self._serve()
        return upstream

    def _serve(self) -> None:
        """Start waiting opens while slots are free. Invariant: a client is in ``_turns`` iff it
        has an open waiting and fewer than ``per_client`` running."""
        while self.in_flight < self.limit and self._turns:
            client = next(iter(self._turns))
            del self._turns[client]
            waiting = self._waiting[client]
            upstream = waiting.popleft()
            running = self.running.get(client, 0) + 1
            self.running[client] = running
            self.in_flight += 1
            upstream.start()
            assert upstream.task is not None
            self._tasks.add(upstream.task)
            if not waiting:
                del self._waiting[client]
            elif running < self.per_client:
                self._turns[client] = None  # to the back of the line

    def dequeue(self, upstream: Upstream) -> None:
        client = upstream.conn.client_ip
        waiting = self._waiting[client]
        waiting.remove(upstream)
        if not waiting:
            del self._waiting[client]
            self._turns.pop(client, None)

    def finished(self, upstream: Upstream, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        client = upstream.conn.client_ip
        left = self.running[client] - 1
        if left:
            self.running[client] = left
        else:
            del self.running[client]
        self.in_flight -= 1
        if client in self._waiting:
            self._turns.setdefault(client, None)
        self._serve()

    async def close(self) -> None:
        """At shutdown: cancel what still runs and wait until every task has closed its sockets
        (Conn.close has cancelled most already; their cancellation runs on the loop)."""
        self._waiting.clear()
        self._turns.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
