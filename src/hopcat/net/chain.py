"""The blocking driver of the tunnel engine (``hopcat.net.engine``): the CLI's and the sync
library's way to open a tunnel.

Each step the plan yields is carried out on one socket (blocking once the tunnel is open), every
wait bounded by the one deadline (capped per call at ``dial.MAX_WAIT_S`` and waited again, so
any deadline is safe). A TLS hop (``https://``, ``socks5+tls://``) starts a TLS session on
memory BIOs (``hopcat.net.tls.TLSLayers``); everything after it rides inside that session, a
later TLS hop's session and the target's (``start_target_tls``) included.

TCP acknowledgements: around every exchange the socket is in quick-ACK mode (a proxy without
TCP_NODELAY holds the target's first bytes behind its own unacknowledged reply, and our delayed
ACK would cost every connection ~40 ms); once the tunnel is open it goes back to delayed ACKs for
the bulk data that follows (left in quick-ACK mode, a proxy without TCP_NODELAY never has
unacknowledged data, Nagle never coalesces its small writes, and the download arrives as many
small segments, one wakeup each: measured through microsocks, 2.5x fewer splice calls per GiB and
about half hopcat's CPU).
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket
import select
import time

from hopcat.errors import HopcatError, UsageError
from hopcat.net import engine
from hopcat.net.dial import MAX_WAIT_S, describe_oserror, dial_tcp, no_trace, resolve, wait_s
from hopcat.net.engine import (
    READ_BYTES,
    Call,
    Dial,
    HopInfo,
    Probe,
    Receive,
    Resolve,
    Send,
    StartTLS,
    check_chain,
    tunnel_plan,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence
    from typing import Any

    from hopcat._url import ProxyURL
    from hopcat.net.engine import Opened, Plan, Step
    from hopcat.net.tls import TLSLayers

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Tunnel:
    """An open path to the target. ``trailing`` holds target bytes that came with the last
    reply; ``layers`` the TLS sessions on ``sock`` (TLS hops, then the target's once
    ``start_target_tls`` ran), None for none; ``hops`` what each hop did (``engine.HopInfo``)."""

    __slots__ = ("hops", "layers", "sock", "trailing")

    def __init__(
        self, sock: socket.socket, trailing: bytes, layers: TLSLayers | None,
        hops: tuple[HopInfo, ...] = (),
    ) -> None:  # fmt: skip
        self.sock = sock
        self.trailing = trailing
        self.layers = layers
        self.hops = hops


def start_target_tls(
    tunnel: Tunnel, context: ssl.SSLContext, server_name: str | None, *, deadline: float,
    clock: Callable[[], float] = time.monotonic, label: str = "the target",
) -> ssl.SSLObject:  # fmt: skip
    """TLS to the target over an open tunnel (inside the TLS hops' sessions, if any), within
    ``deadline``. Raises the handshake's ``ssl.SSLError``/OSError/TimeoutError for the caller to
    name (``hopcat.net.tls.failure``); ValueError for a name SNI cannot carry. ``label`` names
    the session in errors later on (``TLSLayers.labels``)."""
    return _handshake_on(tunnel, context, server_name, label, deadline, clock, tunnel.trailing)


def accept_target_tls(
    tunnel: Tunnel, context: ssl.SSLContext, *, deadline: float,
    clock: Callable[[], float] = time.monotonic, label: str = "the client",
) -> ssl.SSLObject:  # fmt: skip
    """The server side of a TLS handshake on an accepted connection (a listener's)."""
    return _handshake_on(tunnel, context, None, label, deadline, clock, b"", server_side=True)


def _handshake_on(
    tunnel: Tunnel, context: ssl.SSLContext, server_name: str | None, label: str,
    deadline: float, clock: Callable[[], float], received: bytes, *, server_side: bool = False,
) -> ssl.SSLObject:  # fmt: skip
    from hopcat.net.tls import TLSLayers

    driver = _Driver(deadline, clock, context, None, "")
    driver.sock = tunnel.sock
    driver.layers = tunnel.layers or TLSLayers()
    session = driver.layers.push(context, server_name, label=label, server_side=server_side,
                                 received=received)  # fmt: skip
    tunnel.trailing = b""
    tunnel.sock.setblocking(False)
    try:
        driver.run_handshake()
    finally:
        tunnel.sock.setblocking(True)
    tunnel.layers = driver.layers
    return session


def tls_context(cafile: str | None, insecure: bool, *, flag: str = "--proxy-cacert") -> ssl.SSLContext:
    """TLS hops' context; ``flag`` names the CA option in a usage error."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise UsageError(f"{flag} {cafile}: not a PEM CA bundle ({exc.reason or exc})") from None
    except OSError as exc:
        raise UsageError(f"{flag} {cafile}: {describe_oserror(exc)}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def open_tunnel(
    hops: Sequence[ProxyURL],
    host: str,
    port: int,
    *,
    deadline: float,
    family: int = socket.AF_UNSPEC,
    source: str | None = None,
    nodelay: bool = True,
    keepalive: bool = False,
    proxy_dns: str = "remote",
    numeric_only: bool = False,
    exact: bool = False,
    cafile: str | None = None,
    insecure: bool = False,
    context: ssl.SSLContext | None = None,
    headers: list[tuple[str, str]] | None = None,
    trace: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    timeout_label: str = "",
    delayed_acks: bool = True,
    source_port: int = 0,
    socket_factory: Callable[[int, int, int], socket.socket] | None = None,
) -> Tunnel:
    """Connect to host:port through ``hops`` (at least one). Raises HopcatError subclasses.

    ``context`` is the TLS context for an https:// hop (default: from ``cafile``/``insecure``);
    ``headers`` go into every HTTP CONNECT request. ``delayed_acks``: put the socket back into
    delayed-ACK mode for a relay (see the module docstring); False leaves the kernel's own
    choice, which a caller reading with large recv() calls downloads faster with (measured
    through Dante: 0.8x python-socks' MB/s with delayed ACKs forced, level without).
    """
    check_chain(hops, proxy_dns)
    if context is None and any(hop.tls for hop in hops):
        context = tls_context(cafile, insecure)
    plan = tunnel_plan(
        hops, host, port, proxy_dns=proxy_dns, family=family, numeric_only=numeric_only,
        exact=exact, headers=headers, trace=trace, clock=clock, timeout_label=timeout_label,
    )  # fmt: skip
    driver = _Driver(deadline, clock, context, trace, timeout_label)
    driver.dial_options = {
        "family": family, "source": source, "nodelay": nodelay, "keepalive": keepalive,
        "numeric_only": numeric_only, "source_port": source_port,
    }  # fmt: skip
    if socket_factory is not None:
        driver.dial_options["socket_factory"] = socket_factory
    try:
        opened = driver.run(plan)
    except BaseException:
        driver.close()
        raise
    sock = driver.sock
    assert sock is not None
    sock.setblocking(True)
    if delayed_acks:
        set_quickack(sock, 0)
    return Tunnel(sock, opened.trailing, driver.layers, opened.hops)


class _Driver:
    """Carries out a plan's steps on one socket, waiting in poll."""

    __slots__ = ("clock", "context", "deadline", "dial_options", "layers", "peer", "sock",
                 "timeout_label", "trace")  # fmt: skip

    def __init__(
        self, deadline: float, clock: Callable[[], float], context: ssl.SSLContext | None,
        trace: Callable[[str], None] | None, timeout_label: str,
    ) -> None:  # fmt: skip
        self.deadline = deadline
        self.clock = clock
        self.context = context
        self.trace = trace or no_trace
        self.timeout_label = timeout_label
        self.dial_options: dict[str, Any] = {}  # dial_tcp's keyword arguments for hop 1
        self.sock: socket.socket | None = None
        self.peer: tuple[int, tuple[object, ...]] | None = None  # the first hop, for probes
        self.layers: TLSLayers | None = None  # after a TLS hop: its session, and any inside it

    def run(self, plan: Plan) -> Opened:
        """Drive ``plan`` to its end; return its result."""
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
                outcome = self.carry_out(step)
            except HopcatError as exc:
                failure = exc
            except OSError as exc:  # TimeoutError included: the plan names the phase
                failure = exc

    def carry_out(self, step: Step) -> object:
        if isinstance(step, Receive):
            return self.receive(step)
        if isinstance(step, Send):
            self.send(step.data)
            return None
        if isinstance(step, Resolve):
            return resolve(step.host, step.port, family=step.family, deadline=self.deadline,
                           clock=self.clock)  # fmt: skip
        if isinstance(step, StartTLS):
            return self.start_tls(step)
        if isinstance(step, Probe):
            return self.probe(step.data)
        if isinstance(step, Call):
            return step.function(*step.args)
        assert isinstance(step, Dial)
        self.close()  # a new connection for a proxy that closed after its 407
        self.layers = None
        self.sock = dial_tcp(
            step.host, step.port, deadline=self.deadline, trace=self.trace, clock=self.clock,
            timeout_label=self.timeout_label, blocking=False, **self.dial_options,
        )  # fmt: skip
        self.peer = (self.sock.family, self.sock.getpeername())
        return self.sock.family

    def _timeout(self, limit_s: float = MAX_WAIT_S) -> float:
        left = self.deadline - self.clock()
        if left <= 0:
            raise TimeoutError
        return min(left, limit_s, MAX_WAIT_S)

    # The socket stays non-blocking during the plan: each call is tried first and waits in poll
    # only when it would block (a socket timeout costs an ioctl per call and a poll before every
    # recv, even of bytes already queued). TLS sessions run on memory BIOs over it.
    def send(self, data: bytes) -> None:
        if self.layers is not None:
            self.layers.write(data)
            data = self.layers.wire_out()
        self._send_wire(data)

    def _send_wire(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            view = view[sent:]

    def receive(self, step: Receive) -> bytes | None:
        sock = self.sock
        assert sock is not None
        set_quickack(sock, 1)  # Linux clears it by itself: set again around every exchange
        layers = self.layers
        if layers is None:
            flags = socket.MSG_PEEK if step.peek else 0
            while True:
                try:
                    data: bytes = sock.recv(step.size, flags)
                    return data
                except BlockingIOError:
                    pass
                if not self._wait(select.POLLIN, step.quiet_s):
                    return None
        import ssl

        buffer = bytearray(step.size)
        while True:
            try:
                count = layers.read_into(memoryview(buffer))
            except ssl.SSLWantReadError:
                if not self._pull(step.quiet_s):
                    return None
                continue
            if out := layers.wire_out():  # a read can answer the peer (a TLS 1.3 KeyUpdate)
                self._send_wire(out)
            return bytes(buffer[:count])

    def _pull(self, quiet_s: float = 0.0) -> bool:
        """Feed the TLS sessions what the socket has, waiting for it (False: quiet for
        ``quiet_s``)."""
        assert self.sock is not None and self.layers is not None
        while True:
            try:
                data: bytes = self.sock.recv(READ_BYTES)
            except BlockingIOError:
                if not self._wait(select.POLLIN, quiet_s):
                    return False
                continue
            self.layers.feed(data)
            return True

    def _wait(self, events: int, quiet_s: float = 0.0) -> bool:
        """Poll for ``events`` until the deadline (TimeoutError) or, given ``quiet_s``, until
        then: False if nothing came. True when ready, or on a wait capped at MAX_WAIT_S."""
        assert self.sock is not None
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if poller.poll(int(self._timeout(quiet_s or MAX_WAIT_S) * 1000) + 1):
            return True
        return not quiet_s

    def start_tls(self, step: StartTLS) -> str | None:
        """A TLS session with the hop, inside the ones before it. On the first call for a step
        the session is made; a call after a quiet None goes on with its handshake."""
        from hopcat.net.tls import TLSLayers

        assert self.sock is not None and self.context is not None
        if self.layers is None:
            self.layers = TLSLayers()
        layers = self.layers
        if not step.again:
            try:
                layers.push(self.context, step.server_name, label=step.label)
            except ValueError as exc:  # a name the ssl module will not put into SNI
                raise UsageError(
                    f"{step.server_name}: cannot be used as a TLS server name ({exc})"
                ) from None
        return self.run_handshake(step.quiet_s)

    def run_handshake(self, quiet_s: float = 0.0) -> str | None:
        """Drive the innermost session's handshake to its end: its TLS version, or None when
        the peer stayed quiet for ``quiet_s``."""
        layers = self.layers
        assert layers is not None
        while not self._handshake_step(layers):
            self._send_wire(layers.wire_out())
            if not self._pull(quiet_s):
                if self.clock() >= self.deadline:
                    raise TimeoutError
                return None
        self._send_wire(layers.wire_out())
        if self.trace is not no_trace:
            # -v: what a TLS hop's certificate says (the CLI describes the target's itself).
            from hopcat.net.tls import describe

            self.trace(f"{layers.labels[-1]}: {describe(layers.innermost)}")
        version: str = layers.innermost.version() or "TLS"
        return version

    def _handshake_step(self, layers: TLSLayers) -> bool:
        try:
            return layers.handshake()
        except OSError:
            # The alert a failed handshake makes tells the peer why: send it if it fits now.
            try:
                assert self.sock is not None
                self.sock.send(layers.wire_out())
            except OSError:
                pass
            raise

    def probe(self, data: bytes) -> bytes:
        """The first bytes a second connection to the first hop gets back for ``data``."""
        assert self.peer is not None
        family, address = self.peer
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.settimeout(min(engine.SILENT_PROXY_PROBE_S, wait_s(self.deadline, self.clock)))
            probe.connect(address)
            probe.sendall(data)
            answer: bytes = probe.recv(16)
            return answer
        except OSError:
            return b""
        finally:
            probe.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def set_quickack(sock: socket.socket, value: int) -> None:
    """TCP_QUICKACK on (1) or off (0) where Linux has it; see the module docstring."""
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, value)
        except OSError:
            pass  # not TCP (a socketpair in tests) or an SSL wrapper refusing: only an optimisation
