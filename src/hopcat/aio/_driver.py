"""The asyncio driver of the tunnel engine (``hopcat.net.engine``): the same plan the CLI runs,
its steps awaited on an event loop instead of blocking.

Two ways to carry the steps out:

* ``SocketIO``: on the bare non-blocking socket, in loop callbacks (``_SocketRunner``); reads are
  exact (peeking for an HTTP head) when the plan asks for it, so the socket can be handed over
  with the target's first byte still in it (``connect_socket``; ``hopcat serve --via`` reads
  freely and relays the bytes that came with the last reply first). Quick-ACK on every read,
  as in the blocking driver. TLS hops run on memory BIOs over the socket, as in the blocking
  driver, when the IO has a context: the sessions then go with the socket to whoever takes it
  (``hopcat serve --via`` bridges them to its relay). ``connect_socket`` gives none and refuses
  TLS hops: its caller gets a bare socket, which cannot carry a session out of hopcat.
* ``TransportIO``: on an asyncio transport whose protocol buffers what arrives; ``start_tls``
  upgrades it in place for an https:// hop (and for TLS to the target after it: TLS inside TLS).
  At the end the caller's protocol takes the transport over and gets the buffered bytes first
  (``open_connection``, ``create_connection``).

One deadline spans the whole open: the plan runs under one ``asyncio.timeout_at`` of it and
learns which phase timed out, and a cancellation from outside stays a cancellation (asyncio's own
timeout tells the two apart). Whoever created the IO object closes it when the plan fails or
is cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from hopcat._endpoint import format_hostport, is_ip_literal
from hopcat.errors import HopcatError, ResolveError, UsageError
from hopcat.net import engine
from hopcat.net.chain import set_quickack
from hopcat.net.dial import connect_failed, describe_oserror, interleave_families, sockaddr_text
from hopcat.net.engine import READ_BYTES, Call, Dial, Probe, Receive, Resolve, Send, StartTLS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from hopcat.aio._dial import Dialer
    from hopcat.net.engine import Opened, Plan, Step
    from hopcat.net.tls import TLSLayers

PROBE_ANSWER_BYTES = 16
TLS_HOP_REFUSED = (
    "a TLS proxy (https://, socks5+tls://) keeps its TLS session inside hopcat, so a bare socket "
    "cannot be handed out through it: use hopcat.aio.open_connection or create_connection"
)


async def run_plan(plan: Plan, io: SocketIO | TransportIO, deadline: float) -> Opened:
    """Drive ``plan`` to its end with ``io``; ``deadline`` is a ``loop.time()`` value (inf: none).

    One timer spans the whole plan (a timer per step costs a heap push and a cancel each). When
    it fires, the step under way is cancelled, and ``TimeoutError`` is thrown into the plan so
    that it names the phase; a step it yields after that cannot run either."""
    timeout = asyncio.timeout_at(None if deadline == float("inf") else deadline)
    if isinstance(io, SocketIO):
        runner = _SocketRunner(plan, io)
        try:
            async with timeout:
                runner.advance(None, None)
                return await runner.done
        except TimeoutError:
            if not timeout.expired():
                raise  # the plan's own HopcatTimeoutError
            if runner.done.done() and not runner.done.cancelled():
                return runner.done.result()  # finished just as the deadline came
        finally:
            stopped = runner.stop()
            if stopped is not None:  # let it close what it opened before the caller goes on
                await asyncio.wait({stopped})
    else:
        try:
            async with timeout:
                return await _run_steps(plan, io)
        except TimeoutError:
            if not timeout.expired():
                raise
    while True:
        try:
            plan.throw(TimeoutError())
        except StopIteration:  # pragma: no cover - a plan always asks for I/O before it is done
            raise AssertionError("the tunnel plan finished after its deadline") from None


async def _run_steps(plan: Plan, io: TransportIO) -> Opened:
    outcome: object = None
    failure: BaseException | None = None
    while True:
        try:
            step = plan.throw(failure) if failure is not None else plan.send(outcome)
        except StopIteration as done:
            opened: Opened = done.value
            return opened
        failure = None
        try:
            outcome = await io.carry_out(step)
        except (HopcatError, OSError) as exc:  # TimeoutError included: the plan names the phase
            failure = exc


class _SocketRunner:
    """Runs a plan over a ``SocketIO`` in loop callbacks, as ``hopcat serve`` drives its
    connections: a send, a receive or a TLS handshake step is tried at once and waits only when
    the socket would block, a wait is one reader (or writer) callback that tries again, and one
    future stands for the whole open. Awaiting each step instead costs a future, a task wakeup
    and a loop iteration per step; a SOCKS5 open has five or six of them. The other steps (dial,
    lookup, probe) run as tasks of ``io.carry_out``, so a subclass's lookup (``hopcat serve``'s)
    still applies.

    TLS hops run as in the blocking driver (``hopcat.net.chain``): sessions on memory BIOs
    (``io.layers``), each send encrypted through all of them, each receive decrypted, a
    handshake step fed what the socket has until it completes or its peer was quiet for
    ``quiet_s`` (None; the plan's next StartTLS with ``again`` goes on with it)."""

    __slots__ = ("attempt", "dialer", "done", "io", "loop", "plan", "task", "timer", "unsent",
                 "waiting")  # fmt: skip

    def __init__(self, plan: Plan, io: SocketIO) -> None:
        self.plan = plan
        self.io = io
        self.loop = io.loop
        self.done: asyncio.Future[Opened] = io.loop.create_future()
        self.attempt: Callable[[], object] | None = None  # tried again when the socket is ready
        self.waiting = 0  # what the attempt waits for: _READABLE or _WRITABLE
        self.unsent: memoryview | None = None  # bytes the socket did not take yet
        self.task: asyncio.Task[object] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.dialer: Dialer | None = None

    def advance(self, outcome: object, failure: BaseException | None) -> None:
        """Feed the plan until a step has to wait, or the plan ends."""
        plan = self.plan
        while not self.done.done():
            try:
                step = plan.throw(failure) if failure is not None else plan.send(outcome)
            except StopIteration as stop:
                self.done.set_result(stop.value)
                return
            except BaseException as exc:  # the plan's error (or a bug) goes to the awaiting caller
                self.done.set_exception(exc)
                return
            failure = None
            try:
                if type(step) is Receive:
                    outcome = self._receive(step)
                elif type(step) is Send:
                    outcome = self._send(step.data)
                elif type(step) is StartTLS:
                    outcome = self._start_tls(step)
                elif type(step) is Dial and is_ip_literal(step.host):
                    self.io.close()  # a new connection for a proxy that closed after its 407
                    self.io.layers = None
                    self._dial(step)
                    return
                else:
                    self.task = self.loop.create_task(self.io.carry_out(step))
                    self.task.add_done_callback(self._on_task_done)
                    return
                if outcome is _WAITING:
                    return
            except (HopcatError, OSError) as exc:
                failure = exc

    def _dial(self, step: Dial) -> None:
        """The first hop by address: the loop's Happy Eyeballs in callbacks, no task."""
        from hopcat.aio._dial import Dialer

        where = format_hostport(step.host, step.port)
        try:
            infos = socket.getaddrinfo(step.host, step.port, self.io.family, socket.SOCK_STREAM,
                                       socket.IPPROTO_TCP, socket.AI_NUMERICHOST)  # fmt: skip
        except socket.gaierror as exc:  # e.g. an IPv6 hop under family=AF_INET
            raise ResolveError(f"resolve {where}: {describe_oserror(exc)}") from None
        candidates = [(info[0], info[4]) for info in interleave_families(infos)]

        def on_done(sock: socket.socket | None, failures: list[tuple[Any, int]]) -> None:
            self.dialer = None
            if sock is None:
                labelled = [(sockaddr_text(sockaddr), code) for sockaddr, code in failures]
                self.advance(None, connect_failed(where, labelled))
                return
            try:
                self.io.connected(sock)
            except OSError as exc:
                sock.close()
                self.advance(None, exc)
                return
            self.io.sock = sock
            self.advance(sock.family, None)

        self.dialer = Dialer(self.loop, candidates, on_done)
        self.dialer.start()

    # -- waiting ---------------------------------------------------------------------------
    def _wait(self, events: int, attempt: Callable[[], object], quiet_s: float = 0.0) -> object:
        """Try ``attempt`` again once the socket is ready for ``events``; given ``quiet_s``, the
        step answers None if it stays unready that long."""
        sock = self.io.sock
        assert sock is not None
        self.attempt = attempt
        self.waiting = events
        if events == _READABLE:
            self.loop.add_reader(sock.fileno(), self._on_ready)
        else:
            self.loop.add_writer(sock.fileno(), self._on_ready)
        if quiet_s:
            self.timer = self.loop.call_later(quiet_s, self._on_quiet)
        return _WAITING

    def _on_ready(self) -> None:
        attempt = self.attempt
        assert attempt is not None
        self._stop_waiting()
        try:
            outcome = attempt()
        except (HopcatError, OSError) as exc:
            self.advance(None, exc)
            return
        if outcome is not _WAITING:
            self.advance(outcome, None)

    def _on_quiet(self) -> None:
        self.timer = None
        self._stop_waiting()
        self.advance(None, None)  # a quiet read (or handshake step) answers None

    def _stop_waiting(self) -> None:
        if self.waiting:
            sock = self.io.sock
            if sock is not None:
                if self.waiting == _READABLE:
                    self.loop.remove_reader(sock.fileno())
                else:
                    self.loop.remove_writer(sock.fileno())
            self.waiting = 0
            self.attempt = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- steps on the socket ---------------------------------------------------------------
    def _receive(self, step: Receive) -> object:
        sock = self.io.sock
        assert sock is not None
        set_quickack(sock, 1)  # as the blocking driver does: see hopcat.net.chain
        if self.io.layers is not None:
            return self._receive_tls(step, bytearray(step.size))
        try:
            return sock.recv(step.size, socket.MSG_PEEK if step.peek else 0)
        except BlockingIOError:
            return self._wait(_READABLE, lambda: self._receive(step), step.quiet_s)

    def _receive_tls(self, step: Receive, buffer: bytearray) -> object:
        """Plaintext from the innermost session, feeding the sessions what the socket has. A
        record a read makes (a KeyUpdate's answer) goes out with the next send."""
        layers = self.io.layers
        assert layers is not None
        while True:
            try:
                count = layers.read_into(memoryview(buffer))
            except ssl.SSLWantReadError:
                if not self._pull():
                    return self._wait(
                        _READABLE, lambda: self._receive_tls(step, buffer), step.quiet_s
                    )
                continue
            return bytes(buffer[:count])

    def _pull(self) -> bool:
        """Feed the TLS sessions what the socket has now (False: nothing yet)."""
        sock, layers = self.io.sock, self.io.layers
        assert sock is not None and layers is not None
        try:
            data = sock.recv(READ_BYTES)
        except BlockingIOError:
            return False
        layers.feed(data)
        return True

    def _send(self, data: bytes) -> object:
        layers = self.io.layers
        if layers is not None:
            layers.write(data)
            data = layers.wire_out()
        return None if self._flush(memoryview(data)) else self._wait(_WRITABLE, self._sent)

    def _flush(self, view: memoryview) -> bool:
        """Send it all now (True) or keep the rest in ``unsent``."""
        sock = self.io.sock
        assert sock is not None
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                self.unsent = view
                return False
        self.unsent = None
        return True

    def _sent(self) -> object:
        assert self.unsent is not None
        return None if self._flush(self.unsent) else self._wait(_WRITABLE, self._sent)

    def _start_tls(self, step: StartTLS) -> object:
        """A TLS session with the hop, inside the ones before it (``again``: go on with the
        handshake of the last one)."""
        from hopcat.net.tls import TLSLayers

        io = self.io
        if io.context is None:
            raise UsageError(TLS_HOP_REFUSED)
        if io.layers is None:
            io.layers = TLSLayers()
        if not step.again:
            try:
                io.layers.push(io.context, step.server_name, label=step.label)
            except ValueError as exc:  # a name the ssl module will not put into SNI
                raise UsageError(
                    f"{step.server_name}: cannot be used as a TLS server name ({exc})"
                ) from None
        return self._handshake(step.quiet_s)

    def _handshake(self, quiet_s: float) -> object:
        """Steps of the innermost session's handshake until it is complete (its TLS version) or
        waits for the socket."""
        layers = self.io.layers
        assert layers is not None
        while True:
            if self.unsent is not None and not self._flush(self.unsent):
                return self._wait(_WRITABLE, lambda: self._handshake(quiet_s))
            try:
                done = layers.handshake()
            except OSError:
                self._send_alert()
                raise
            if not self._flush(memoryview(layers.wire_out())):
                return self._wait(_WRITABLE, lambda: self._handshake(quiet_s))
            if done:
                version: str = layers.innermost.version() or "TLS"
                return version
            if not self._pull():
                return self._wait(_READABLE, lambda: self._handshake(quiet_s), quiet_s)

    def _send_alert(self) -> None:
        """The alert a failed handshake makes tells the peer why: sent if it fits now."""
        sock, layers = self.io.sock, self.io.layers
        assert sock is not None and layers is not None
        try:
            sock.send(layers.wire_out())
        except OSError:
            pass

    def _on_task_done(self, task: asyncio.Task[object]) -> None:
        self.task = None
        if task.cancelled():
            return  # stop() cancelled it: nobody waits for the plan any more
        exc = task.exception()
        if exc is None:
            self.advance(task.result(), None)
        elif isinstance(exc, (HopcatError, OSError)):
            self.advance(None, exc)
        elif not self.done.done():
            self.done.set_exception(exc)

    def stop(self) -> asyncio.Task[object] | None:
        """The open is over (done, failed, timed out or cancelled): no callback may follow.
        Returns the step's task it cancelled, if one was running."""
        self._stop_waiting()
        if self.dialer is not None:
            self.dialer.cancel()
            self.dialer = None
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        return task


_WAITING = object()  # a step that waits for the socket; the runner carries on from a callback
_READABLE = 1
_WRITABLE = 2


async def resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int, family: int
) -> list[tuple[Any, ...]]:
    """getaddrinfo, failing as the blocking resolver does: an address is parsed here (the loop's
    getaddrinfo would send even that to a thread), a name goes to the loop's executor."""
    where = format_hostport(host, port)
    try:
        if is_ip_literal(host):
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                       socket.IPPROTO_TCP, socket.AI_NUMERICHOST)  # fmt: skip
        else:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                           proto=socket.IPPROTO_TCP)  # fmt: skip
    except socket.gaierror as exc:
        raise ResolveError(f"resolve {where}: {describe_oserror(exc)}") from None
    if not infos:
        raise ResolveError(f"resolve {host}: no addresses")
    return list(infos)


class _IO:
    """What both ways share: dialing the first hop, resolving, probing the first hop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, family: int) -> None:
        self.loop = loop
        self.family = family
        self.peer: tuple[int, tuple[Any, ...]] | None = None

    async def lookup(self, host: str, port: int, family: int) -> list[tuple[Any, ...]]:
        """Every name the plan needs (the first hop's, a Resolve step's) comes through here, so
        that a caller with its own resolver (``hopcat serve``: its fair shares of resolver
        threads) can take them over. Fails with ResolveError."""
        return await resolve(self.loop, host, port, family)

    async def dial(self, step: Dial) -> socket.socket:
        from hopcat.aio._dial import dial

        infos = await self.lookup(step.host, step.port, self.family)
        candidates = [(info[0], info[4]) for info in interleave_families(infos)]
        sock = await dial(candidates, where=f"{step.host}:{step.port}")
        try:
            self.connected(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def connected(self, sock: socket.socket) -> None:
        """The first hop answered on ``sock`` (a subclass may tune it)."""
        self.peer = (sock.family, sock.getpeername())

    async def probe(self, data: bytes) -> bytes:
        """The first bytes a second connection to the first hop gets back for ``data``."""
        assert self.peer is not None
        family, address = self.peer
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            async with asyncio.timeout(engine.SILENT_PROXY_PROBE_S):
                await self.loop.sock_connect(probe, address)
                await self.loop.sock_sendall(probe, data)
                return await self.loop.sock_recv(probe, PROBE_ANSWER_BYTES)
        except (OSError, TimeoutError):
            return b""
        finally:
            probe.close()


class SocketIO(_IO):
    """Steps on a bare non-blocking socket; exact reads. TLS hops need a ``context``: their
    sessions (``layers``) stay with the socket, so whoever takes the socket over takes them too
    (``hopcat serve --via``); without one a TLS hop is refused, as for ``connect_socket``, whose
    caller gets a bare socket."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, family: int = 0,
        context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        super().__init__(loop, family)
        self.context = context
        self.sock: socket.socket | None = None
        self.layers: TLSLayers | None = None  # after a TLS hop: its session, and any inside it

    async def carry_out(self, step: Step) -> object:
        """The steps other than sends, receives and TLS, which ``_SocketRunner`` does itself."""
        if isinstance(step, Resolve):
            return await self.lookup(step.host, step.port, step.family)
        if isinstance(step, Probe):
            return await self.probe(step.data)
        if isinstance(step, Call):
            return await asyncio.to_thread(step.function, *step.args)
        assert isinstance(step, Dial)
        self.close()  # a new connection for a proxy that closed after its 407
        self.layers = None
        self.sock = await self.dial(step)
        return self.sock.family

    def hand_over(self, *, delayed_acks: bool) -> socket.socket:
        """The open tunnel's socket; this IO object lets go of it. ``delayed_acks``: back to
        delayed ACKs for a relay (see ``hopcat.net.chain``); False leaves the kernel's choice,
        better for a caller reading with large reads."""
        sock = self.sock
        assert sock is not None
        self.sock = None
        if delayed_acks:
            set_quickack(sock, 0)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Buffering(asyncio.Protocol):
    """Holds what arrives until the plan (or, later, the caller's protocol) takes it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.peer_eof = False  # eof_received came: the caller's protocol is owed one too
        self.closed = False  # connection_lost came: the transport will not call it again
        self.tls = False  # under TLS, asyncio closes at EOF whatever eof_received answers
        self.lost: Exception | None = None
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = self.peer_eof = True
        self._wake()
        # Keep a plain transport open: the caller decides (half-close). asyncio warns about a
        # True from a protocol under TLS, where it has no effect.
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self.eof = self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_data(self) -> None:
        """Until bytes are buffered or the peer is done; a connection lost to an error raises."""
        while not self.buffer and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if not self.buffer and self.lost is not None:
            raise self.lost


class TransportIO(_IO):
    """Steps on an asyncio transport; reads take from the protocol's buffer, so they are exact
    for free, and TLS is ``loop.start_tls``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, family: int = 0,
        context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        super().__init__(loop, family)
        self.context = context
        self.transport: asyncio.Transport | None = None
        self.protocol = _Buffering()
        self._tls: asyncio.Task[asyncio.Transport | None] | None = None

    async def carry_out(self, step: Step) -> object:
        if isinstance(step, Receive):
            return await self.receive(step)
        if isinstance(step, Send):
            assert self.transport is not None
            if self.protocol.lost is not None:
                raise self.protocol.lost
            self.transport.write(step.data)
            return None
        if isinstance(step, Resolve):
            return await self.lookup(step.host, step.port, step.family)
        if isinstance(step, Probe):
            return await self.probe(step.data)
        if isinstance(step, StartTLS):
            return await self.start_tls(step)
        if isinstance(step, Call):
            return await asyncio.to_thread(step.function, *step.args)
        assert isinstance(step, Dial)
        if self.transport is not None:  # a new connection for a proxy that closed after its 407
            self.close()
            self.protocol = _Buffering()
        sock = await self.dial(step)
        try:
            self.transport, _ = await self.loop.create_connection(lambda: self.protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        return sock.family

    async def receive(self, step: Receive) -> bytes | None:
        protocol = self.protocol
        if self.transport is not None:
            # Quick-ACK as the other drivers do (hopcat.net.chain): a proxy without TCP_NODELAY
            # holds the target's first bytes until its reply is acknowledged, and a delayed ACK
            # cost every open_connection through microsocks 44 ms of first byte.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                set_quickack(sock, 1)
        if step.quiet_s:
            try:
                async with asyncio.timeout(step.quiet_s):
                    await protocol.wait_data()
            except TimeoutError:
                return None
        await protocol.wait_data()
        data = bytes(protocol.buffer[: step.size])
        if not step.peek:
            del protocol.buffer[: step.size]
        return data

    async def start_tls(self, step: StartTLS) -> str | None:
        return await self.upgrade(step.server_name, self.context, step.quiet_s)

    async def upgrade(
        self, server_name: str, context: ssl.SSLContext | None, quiet_s: float = 0.0
    ) -> str | None:
        """TLS over the current transport (itself perhaps TLS); the version, None when quiet."""
        assert self.transport is not None and context is not None
        self.protocol.tls = True
        if self._tls is None:
            self._tls = asyncio.ensure_future(self.loop.start_tls(
                self.transport, self.protocol, context, server_hostname=server_name
            ))  # fmt: skip
        task = self._tls
        if quiet_s:  # the handshake goes on meanwhile; the next call awaits the same task
            done, _ = await asyncio.wait({task}, timeout=quiet_s)
            if not done:
                return None
        try:
            upgraded = await task
        finally:
            self._tls = None
        if upgraded is None:
            raise ConnectionResetError("the connection closed during the TLS handshake")
        self.transport = upgraded
        _mend_force_close(upgraded)  # TLS may run inside it: ours to the target, or a caller's
        ssl_object = upgraded.get_extra_info("ssl_object")
        version: str = ssl_object.version() if ssl_object is not None else "TLS"
        return version

    def close(self) -> None:
        if self._tls is not None:
            self._tls.cancel()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


def _mend_force_close(transport: asyncio.Transport) -> None:
    """TLS inside TLS on CPython before 3.11.8 and 3.12.2 (gh-113214): the inner session's
    failure (an untrusted certificate, a bad record) reaches the outer session's transport,
    whose ``_force_close`` calls ``SSLProtocol._abort`` with an argument it does not take: a
    TypeError replaces the failure, a handshake raises that, and a reader learns nothing. A
    TLS transport of ours gets the fixed method (close with the failure, so it reaches the
    reader), whoever starts TLS inside it: hopcat (``ssl=``) or the caller (httpx, aiohttp)."""
    from asyncio import sslproto

    if not isinstance(transport, sslproto._SSLProtocolTransport):
        return  # plain TCP, or uvloop's TLS (which passes the failure on)
    if sslproto.SSLProtocol._abort.__code__.co_argcount != 1:
        return  # a fixed CPython: _abort takes the failure
    outer: Any = transport

    def force_close(exc: BaseException | None) -> None:
        outer._closed = True
        session = outer._ssl_protocol
        session._set_state(sslproto.SSLProtocolState.UNWRAPPED)
        if session._transport is not None:
            session._transport._force_close(exc)

    outer._force_close = force_close
