"""``hopcat -z HOST PORTS``: nc's port scan, as a TCP connect scan run in parallel on one loop.

Direct, each port is one race of ``hopcat.aio._dial.Dialer`` (the server's callback Happy
Eyeballs) over the addresses HOST resolved to once; through proxies, each port is one
``hopcat.aio.connect_socket`` through the chain, the proxy's reply telling the port's state.
No second copy of the connect logic: the scan only schedules, times and classifies.

States, as nmap names them:

* open: the connect completed (direct), or the last proxy said it connected (its success reply).
* closed: refused: ECONNREFUSED here, or the proxy's "connection refused" (SOCKS5 reply 5,
  SOCKS4 91; SOCKS4's 91 is also its "rules said no": SOCKS4 cannot tell them apart).
* filtered: no answer within the port's deadline, an unreachable host or network (here or as
  the proxy's SOCKS5 reply 3, 4 or 6, HTTP 504), or the proxy's rules refusing that target
  (SOCKS5 reply 2, HTTP 403): something between us and the port dropped it.
* failed: the last proxy refused for a reason that says nothing about the port (SOCKS5 reply 1
  "general failure", HTTP 500, 502, 503...): shown with -vv and its reason, never counted open.

An error about the chain itself (a proxy unreachable, authentication refused, a hop before the
last refusing the next one, malformed replies) is the same for every port: the scan stops with
that error's line and exit code, as a plain connect would.

Each port has its own deadline (``--connect-timeout``, else ``-w``, else DEFAULT_TIMEOUT_S
direct and DEFAULT_PROXY_TIMEOUT_S through proxies, where it also covers the proxies'
handshakes). Results are printed in port order as soon as every lower port's is known, also with
``-r``, which shuffles the order of the probes only.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import sys
import time
from collections import deque

from hopcat.errors import (
    ConnectError,
    HopcatTimeoutError,
    ProxyAuthError,
    ProxyError,
    UsageError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from hopcat.cli._args import Options
    from hopcat.client import Chain

DEFAULT_TIMEOUT_S = 2.0  # a filtered 1-65535 scan at 512 in flight: about 4 minutes
DEFAULT_PROXY_TIMEOUT_S = 5.0
MAX_PARALLEL_DIRECT = 512
MAX_PARALLEL_PROXY = 32  # proxies limit clients (Dante's child processes, microsocks' threads)
PROGRESS_AFTER_S = 1.0
PROGRESS_EVERY_S = 0.25

OPEN, CLOSED, FILTERED, FAILED = "open", "closed", "filtered", "failed"
# -z -u: no answer can mean a port that ignores an empty datagram or a firewall that dropped it
# (nmap -sU's word for that).
OPEN_FILTERED = "open|filtered"

# errno -> state, for a direct connect and a proxy's reply alike (ProxyError.errno).
# Any other errno (EMFILE, EADDRNOTAVAIL, EAFNOSUPPORT, a proxy's "command not supported") is
# about this host or the chain, not the port: the scan stops with it rather than call the port
# filtered.
_STATE_OF_ERRNO = {
    errno.ECONNREFUSED: CLOSED,
    errno.ECONNRESET: CLOSED,
    errno.ETIMEDOUT: FILTERED,
    errno.EHOSTUNREACH: FILTERED,
    errno.ENETUNREACH: FILTERED,
    errno.EACCES: FILTERED,
    errno.EPERM: FILTERED,  # a local firewall's DROP/REJECT in OUTPUT
}

_LOCAL_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL})


def parse_ports(specs: list[str]) -> list[int]:
    """Ports from nc-style specs: ``22``, ``20-25``, ``80,443`` and any mix; sorted, no repeats.
    UsageError naming the bad token and why."""
    ports: set[int] = set()
    for spec in specs:
        for token in spec.split(","):
            low_text, dash, high_text = token.partition("-")
            label = f"port range {token!r}" if dash else f"port {token!r}"
            low = _port(low_text, label)
            high = _port(high_text, label) if dash else low
            if high < low:
                raise UsageError(f"{label}: reversed (write {high}-{low})")
            ports.update(range(low, high + 1))
    return sorted(ports)


def _port(text: str, label: str) -> int:
    if not text:
        raise UsageError("empty port in the list" if label == "port ''" else f"{label}: empty port")
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{label}: {text!r} is not a port number")
    number = int(text)
    if not 1 <= number <= 65535:
        raise UsageError(f"{label}: {number} is out of 1-65535")
    return number


def default_parallel(proxied: bool) -> int:
    from hopcat.cli._args import fd_budget

    # Through proxies each attempt holds one socket too (to the first hop).
    return fd_budget(MAX_PARALLEL_PROXY if proxied else MAX_PARALLEL_DIRECT)


def service_name(port: int, protocol: str = "tcp") -> str:
    try:
        return socket.getservbyport(port, protocol)
    except OSError:
        return "*"


class Result:
    __slots__ = ("detail", "state")

    def __init__(self, state: str, detail: str) -> None:
        self.state = state
        self.detail = detail  # nc's wording after "failed: " (or "timed out")


def _errno_result(code: int, how: str = "") -> Result:
    text = os.strerror(code)
    if code == errno.ETIMEDOUT and not how:
        return Result(FILTERED, "timed out")
    return Result(_STATE_OF_ERRNO[code], f"{text}{how}")


class Scan:
    """Probe ``ports`` in that order with at most ``parallel`` attempts in flight (one,
    ``interval_s`` apart, with -i); ``report(port, result)`` is called in port order, once each."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ports: list[int],
        probe: Callable[[int, Callable[[Result | BaseException], None]], Callable[[], None]],
        report: Callable[[int, Result], None],
        *,
        parallel: int,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        # (deadline, index) in start order: with one timeout for all, the earliest deadline is
        # always the oldest attempt's, so one timer serves them all (no heap entry per port).
        self.expiry: deque[tuple[float, int]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.ports = ports
        self.probe = probe
        self.report = report
        self.parallel = 1 if interval_s > 0 else parallel
        self.interval_s = interval_s
        self.results: list[Result | None] = [None] * len(ports)
        # Printed in port order whatever the scan order (-r shuffles only the probes).
        self.print_order = sorted(range(len(ports)), key=ports.__getitem__)
        self.started = 0
        self.finished = 0
        self.printed = 0
        self.open = 0
        self.cancels: dict[int, Callable[[], None]] = {}
        self.filling = False
        self.outcome: asyncio.Future[None] = loop.create_future()
        self.silent_state = FILTERED  # what no answer by the deadline means (UDP: OPEN_FILTERED)

    def run(self) -> asyncio.Future[None]:
        self._fill()
        if not self.ports:
            self.outcome.set_result(None)
        return self.outcome

    def _fill(self) -> None:
        # A probe may finish inside probe() (a connect that fails at once: EMFILE, no route): the
        # loop here starts the next one, not a recursive call from _done.
        self.filling = True
        try:
            while len(self.cancels) < self.parallel and self.started < len(self.ports):
                if self.outcome.done():
                    return
                index = self.started
                self.started += 1
                self.cancels[index] = _nothing
                cancel = self.probe(self.ports[index], self._reporter(index))
                if index in self.cancels:
                    self.cancels[index] = cancel
                    while self.expiry and self.expiry[0][1] not in self.cancels:
                        self.expiry.popleft()  # finished in time: keep the queue short
                    self.expiry.append((self.loop.time() + self.timeout_s, index))
                    if self.timer is None:
                        self.timer = self.loop.call_at(self.expiry[0][0], self._expire)
                if self.interval_s > 0:
                    return  # the next one after the delay, from _done
        finally:
            self.filling = False

    def _expire(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.expiry and (self.expiry[0][0] <= now or self.expiry[0][1] not in self.cancels):
            _deadline, index = self.expiry.popleft()
            cancel = self.cancels.get(index)
            if cancel is not None:
                cancel()
                self._done(index, Result(self.silent_state, "timed out"))
        if self.expiry and self.timer is None and not self.outcome.done():
            self.timer = self.loop.call_at(self.expiry[0][0], self._expire)

    def _reporter(self, index: int) -> Callable[[Result | BaseException], None]:
        return lambda result: self._done(index, result)

    def _done(self, index: int, result: Result | BaseException) -> None:
        self.cancels.pop(index, None)
        if self.outcome.done():
            return
        if isinstance(result, BaseException):
            self.stop()
            self.outcome.set_exception(result)
            return
        self.results[index] = result
        self.finished += 1
        self.open += result.state in (OPEN, OPEN_FILTERED)
        while self.printed < len(self.ports):
            at = self.print_order[self.printed]
            ready = self.results[at]
            if ready is None:
                break
            self.report(self.ports[at], ready)
            self.printed += 1
        if self.finished == len(self.ports):
            self.outcome.set_result(None)
        elif self.interval_s > 0:
            self.loop.call_later(self.interval_s, self._fill)
        elif not self.filling:
            self._fill()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for cancel in list(self.cancels.values()):
            cancel()
        self.cancels.clear()


def _nothing() -> None:
    """What cancels a probe that has not returned its own canceller yet."""


def direct_probe(
    loop: asyncio.AbstractEventLoop, addresses: list[tuple[int, tuple[Any, ...]]]
) -> Callable[[int, Callable[[Result | BaseException], None]], Callable[[], None]]:
    """One Happy Eyeballs race per port over ``addresses`` (family, sockaddr with any port)."""
    from hopcat.aio._dial import Dialer
    from hopcat.net.dial import main_errno

    def probe(port: int, done: Callable[[Result | BaseException], None]) -> Callable[[], None]:
        candidates = [(family, (sockaddr[0], port, *sockaddr[2:])) for family, sockaddr in addresses]

        def on_done(sock: socket.socket | None, failures: list[tuple[Any, int]]) -> None:
            if sock is not None:  # the Dialer takes a connection to itself as refused
                sock.close()
                done(Result(OPEN, ""))
                return
            # A refusal from any address means something answered there: closed beats unreachable.
            code = main_errno([code for _sockaddr, code in failures]) or errno.EHOSTUNREACH
            if code not in _STATE_OF_ERRNO:
                done(ConnectError(f"scan stopped at port {port}: {os.strerror(code).lower()}"
                                  + (" (lower --max-parallel)" if code in _LOCAL_LIMITS else ""),
                                  errno=code))  # fmt: skip
                return
            done(_errno_result(code))

        dialer = Dialer(loop, candidates, on_done)
        dialer.start()
        return dialer.cancel

    return probe


def udp_probe(
    loop: asyncio.AbstractEventLoop, addresses: list[tuple[int, tuple[Any, ...]]]
) -> Callable[[int, Callable[[Result | BaseException], None]], Callable[[], None]]:
    """-z -u: one empty datagram per port from a socket connected to it (to HOST's first
    address); a reply is open, ICMP port unreachable (ECONNREFUSED) closed, and silence until the
    port's deadline open|filtered, as nmap -sU says (the Scan's timer reports it)."""
    family, sockaddr = addresses[0]

    def probe(port: int, done: Callable[[Result | BaseException], None]) -> Callable[[], None]:
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE and the like: about this host, not the port
            done(_udp_errno_result(port, exc.errno or 0))
            return _nothing
        sock.setblocking(False)

        def finish(result: Result | BaseException) -> None:
            cancel()
            done(result)

        def on_readable() -> None:
            try:
                sock.recv(1)
            except BlockingIOError:
                return
            except OSError as exc:
                finish(_udp_errno_result(port, exc.errno or 0))
                return
            finish(Result(OPEN, "answered"))

        def cancel() -> None:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()

        try:
            sock.connect((sockaddr[0], port, *sockaddr[2:]))
            sock.send(b"")
        except OSError as exc:
            sock.close()
            done(_udp_errno_result(port, exc.errno or 0))
            return _nothing
        loop.add_reader(sock.fileno(), on_readable)
        return cancel

    return probe


def _udp_errno_result(port: int, code: int) -> Result | BaseException:
    if code == errno.ECONNREFUSED:
        return Result(CLOSED, "port unreachable")
    if code in _STATE_OF_ERRNO:
        return _errno_result(code)
    return ConnectError(f"scan stopped at port {port}: {os.strerror(code).lower()}"
                        + (" (lower --max-parallel)" if code in _LOCAL_LIMITS else ""),
                        errno=code)  # fmt: skip


def proxied_probe(
    loop: asyncio.AbstractEventLoop, host: str, chain: Chain, options: Options, timeout_s: float,
    family: int,
) -> Callable[[int, Callable[[Result | BaseException], None]], Callable[[], None]]:  # fmt: skip
    """One CONNECT through ``chain`` per port; the last proxy's reply classifies the port."""
    from hopcat.aio import connect_socket, create_connection
    from hopcat.net.chain import tls_context

    tls = any(proxy.tls for proxy in chain)
    context = tls_context(options.proxy_cacert, options.proxy_insecure) if tls else None
    last_hop = len(chain)

    async def attempt(port: int) -> Result:
        try:
            if tls:  # the TLS session to the proxy lives on a transport: no bare socket
                transport, _ = await create_connection(
                    asyncio.Protocol, host, port, via=chain, timeout=timeout_s,
                    proxy_dns=options.proxy_dns or "remote", family=family, proxy_ssl=context,
                )  # fmt: skip
                transport.abort()
            else:
                sock = await connect_socket(
                    host, port, via=chain, timeout=timeout_s,
                    proxy_dns=options.proxy_dns or "remote", family=family,
                )  # fmt: skip
                sock.close()
        except ProxyError as exc:
            if exc.hop != last_hop or isinstance(exc, ProxyAuthError):
                raise  # about the chain, not the port
            how = f" ({exc.protocol} reply {exc.code})"
            if exc.errno is None:
                return Result(FAILED, f"{exc.message}{how}")
            if exc.errno not in _STATE_OF_ERRNO:
                raise  # e.g. "address type not supported": the same answer for every port
            return _errno_result(exc.errno, how)
        except HopcatTimeoutError:
            return Result(FILTERED, "timed out")
        return Result(OPEN, "")

    def probe(port: int, done: Callable[[Result | BaseException], None]) -> Callable[[], None]:
        task = loop.create_task(attempt(port))

        def finished(task: asyncio.Task[Result]) -> None:
            if not task.cancelled():
                error = task.exception()
                done(error if error is not None else task.result())

        def cancel() -> None:
            task.cancel()

        task.add_done_callback(finished)
        return cancel

    return probe


class Output:
    """nc's -v lines on stderr, and a progress line there when stderr is a terminal."""

    def __init__(self, shown: str, total: int, verbose: int, protocol: str = "tcp") -> None:
        self.protocol = protocol
        self.shown = shown
        self.total = total
        self.verbose = verbose
        self.progress = sys.stderr.isatty()
        self.progress_shown = False
        self.started = time.monotonic()

    def _write(self, text: str) -> None:
        from hopcat.cli import _write_fd

        try:
            _write_fd(2, text)
        except OSError:
            pass  # stderr's reader went away: the exit code still tells

    def report(self, port: int, result: Result) -> None:
        protocol = self.protocol
        if result.state == OPEN:
            if self.verbose < 1:
                return
            line = (f"Connection to {self.shown} {port} port [{protocol}/"
                    f"{service_name(port, protocol)}] succeeded!")  # fmt: skip
        elif result.state == OPEN_FILTERED:
            if self.verbose < 1:
                return
            line = f"hopcat: udp {self.shown} port {port}: no answer [{OPEN_FILTERED}]"
        else:
            if self.verbose < 2:
                return
            verb = "timed out" if result.detail == "timed out" else f"failed: {result.detail}"
            line = f"hopcat: connect to {self.shown} port {port} ({protocol}) {verb} [{result.state}]"
        self._write(("\r\x1b[K" if self.progress_shown else "") + line + "\n")
        self.progress_shown = False

    def tick(self, scan: Scan) -> None:
        elapsed = time.monotonic() - self.started
        if not self.progress or elapsed < PROGRESS_AFTER_S:
            return
        total = self.total
        rate = scan.finished / elapsed
        eta = f", {(total - scan.finished) / rate:.0f} s left" if rate > 0 else ""
        self._write(f"\r\x1b[Khopcat: scanned {scan.finished}/{total} ports, {scan.open} open{eta}")
        self.progress_shown = True

    def end(self) -> None:
        if self.progress_shown:
            self._write("\r\x1b[K")


def run(options: Options) -> int:
    """The scan as the CLI runs it: exit 0 if any port is open, 1 if none (as nc)."""
    from hopcat._endpoint import is_ip_literal, validate_host
    from hopcat._environment import fill_users, proxies_from_environment
    from hopcat.cli._proxy import apply_auth_schemes, fill_passwords, proxies_from_command_line

    if len(options.operands) < 2:
        raise UsageError("-z: expected HOST PORTS (e.g. 22, 20-25, 80,443; see hopcat --help)")
    host = validate_host(options.operands[0], what="host")
    ports = parse_ports(options.operands[1:])
    from hopcat.cli._args import address_family, positive_int

    if options.max_parallel is not None:
        parallel = positive_int(options.max_parallel, "--max-parallel")

    family = address_family(options)
    hops = proxies_from_command_line(options)
    if not hops and not options.no_proxy:
        hops, _why = proxies_from_environment(os.environ, host)
    if hops and options.udp:
        raise UsageError("-z -u through a proxy: not supported (UDP needs SOCKS5 UDP ASSOCIATE, "
                         "and a proxy does not report ICMP); --no-proxy to scan directly")
    fill_users(hops, os.environ)
    apply_auth_schemes(hops, options)
    fill_passwords(hops, os.environ, password_file=options.proxy_password_file,
                   password_command=options.proxy_password_command)  # fmt: skip
    timeout_s = options.connect_timeout_s
    if timeout_s is None:
        timeout_s = options.idle_timeout_s
    if timeout_s is None or timeout_s == 0:
        timeout_s = DEFAULT_PROXY_TIMEOUT_S if hops else DEFAULT_TIMEOUT_S
    if options.max_parallel is None:
        parallel = default_parallel(bool(hops))
    if options.random_order:
        random.shuffle(ports)
    interval_s = options.interval_s or 0.0

    shown = host
    addresses: list[tuple[int, tuple[Any, ...]]] = []
    if not hops:
        from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S
        from hopcat.net.dial import interleave_families, resolve

        infos = resolve(
            host, 0, family=family, numeric_only=options.numeric,
            deadline=time.monotonic() + DEFAULT_CONNECT_TIMEOUT_S,
        )  # fmt: skip
        addresses = [(info[0], info[4]) for info in interleave_families(infos)]
        if not is_ip_literal(host):
            shown = f"{host} ({addresses[0][1][0]})"
    output = Output(shown, len(ports), options.verbose, "udp" if options.udp else "tcp")
    try:
        opened = asyncio.run(_scan(ports, hops, host, addresses, options, timeout_s, family,
                                   parallel, interval_s, output))
    finally:
        output.end()
    return 0 if opened else 1


async def _scan(
    ports: list[int], hops: list[Any], host: str, addresses: list[tuple[int, tuple[Any, ...]]],
    options: Options, timeout_s: float, family: int, parallel: int, interval_s: float,
    output: Output,
) -> int:  # fmt: skip
    loop = asyncio.get_running_loop()
    if hops:
        from hopcat.client import Chain, Proxy

        probe = proxied_probe(loop, host, Chain(Proxy(hop) for hop in hops), options, timeout_s,
                              family)
    elif options.udp:
        probe = udp_probe(loop, addresses)
    else:
        probe = direct_probe(loop, addresses)
    scan = Scan(loop, ports, probe, output.report, parallel=parallel, interval_s=interval_s,
                timeout_s=timeout_s)
    if options.udp:
        scan.silent_state = OPEN_FILTERED
    ticker = loop.call_later(PROGRESS_AFTER_S, _tick, loop, output, scan)
    try:
        await scan.run()
    finally:
        scan.stop()
        ticker.cancel()
    return scan.open


def _tick(loop: asyncio.AbstractEventLoop, output: Output, scan: Scan) -> None:
    output.tick(scan)
    if output.progress and not scan.outcome.done():
        loop.call_later(PROGRESS_EVERY_S, _tick, loop, output, scan)
