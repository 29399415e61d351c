"""The blocking driver of the tunnel engine (``hopcat.net.engine``): the CLI's and the sync
library's way to open a tunnel.

Each step the plan yields is carried out on one socket (blocking once the tunnel is open), every
wait bounded by the one deadline (capped per call at ``dial.MAX_WAIT_S`` and waited again, so any deadline is safe). An
``https://`` hop wraps the socket in TLS; everything after it rides inside that session.

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

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Tunnel:
    """An open path to the target. ``trailing`` holds target bytes that came with the last
    reply; ``hops`` what each hop did (``engine.HopInfo``)."""

    __slots__ = ("hops", "sock", "tls", "trailing")

    def __init__(
        self, sock: socket.socket, trailing: bytes, tls: bool, hops: tuple[HopInfo, ...] = ()
    ) -> None:
        self.sock = sock
        self.trailing = trailing
        self.tls = tls
        self.hops = hops


def tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    import ssl

    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise UsageError(f"--proxy-cacert {cafile}: not a PEM CA bundle ({exc.reason or exc})") from None
    except OSError as exc:
        raise UsageError(f"--proxy-cacert {cafile}: {describe_oserror(exc)}") from None
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
    sock.settimeout(None)
    if delayed_acks:
        set_quickack(sock, 0)
    return Tunnel(sock, opened.trailing, opened.tls, opened.hops)


class _Driver:
    """Carries out a plan's steps on one socket, waiting in poll."""

    __slots__ = ("clock", "context", "deadline", "dial_options", "peer", "sock", "timeout_label",
                 "tls", "trace")  # fmt: skip

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
        self.tls = False  # whether sock is an SSLSocket (after an https:// hop)

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
        assert isinstance(step, Dial)
        self.sock = dial_tcp(
            step.host, step.port, deadline=self.deadline, trace=self.trace, clock=self.clock,
            timeout_label=self.timeout_label, blocking=False, **self.dial_options,
        )  # fmt: skip
        self.peer = (self.sock.family, self.sock.getpeername())
        return None

    def _timeout(self, limit_s: float = MAX_WAIT_S) -> float:
        left = self.deadline - self.clock()
        if left <= 0:
            raise TimeoutError
        return min(left, limit_s, MAX_WAIT_S)

    # A plain socket stays non-blocking during the plan: each call is tried first and waits in
    # poll only when it would block (a socket timeout costs an ioctl per call and a poll before
    # every recv, even of bytes already queued). A TLS socket keeps socket timeouts: its reads
    # and writes can each need the other direction.
    def send(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        while view:
            if self.tls:
                sock.settimeout(self._timeout())
            try:
                sent = sock.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            except TimeoutError:
                continue  # a wait is capped at MAX_WAIT_S; _timeout() says when time is up
            view = view[sent:]

    def receive(self, step: Receive) -> bytes | None:
        sock = self.sock
        assert sock is not None
        set_quickack(sock, 1)  # Linux clears it by itself: set again around every exchange
        flags = socket.MSG_PEEK if step.peek else 0
        if not self.tls:
            while True:
                try:
                    data: bytes = sock.recv(step.size, flags)
                    return data
                except BlockingIOError:
                    pass
                if not self._wait(select.POLLIN, step.quiet_s):
                    return None
        pending: int = sock.pending()  # type: ignore[attr-defined]
        if step.quiet_s and not pending and not self._wait(select.POLLIN, step.quiet_s):
            return None
        while True:
            sock.settimeout(self._timeout())
            try:
                data = sock.recv(step.size, flags)
                return data
            except TimeoutError:
                continue

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
        import socket as socket_module  # ssl wants the full socket class; only TLS chains pay
        import ssl

        sock = self.sock
        assert sock is not None and self.context is not None
        if not isinstance(sock, ssl.SSLSocket):
            plain = socket_module.socket(fileno=sock.detach())
            try:
                sock = self.context.wrap_socket(
                    plain, server_hostname=step.server_name, do_handshake_on_connect=False
                )
            except ValueError as exc:  # a name the ssl module will not put into SNI
                plain.close()
                raise UsageError(
                    f"{step.server_name}: cannot be used as a TLS server name ({exc})"
                ) from None
            self.sock = sock
            self.tls = True
        while True:
            sock.settimeout(self._timeout(step.quiet_s or MAX_WAIT_S))
            try:
                sock.do_handshake()
            except TimeoutError:
                if step.quiet_s:
                    if self.clock() >= self.deadline:
                        raise
                    return None
                continue
            sock.settimeout(None)
            version: str = sock.version() or "TLS"
            return version

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
