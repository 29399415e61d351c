"""TCP dialing with Happy Eyeballs (RFC 8305) and one deadline over the whole attempt.

Theory of operation:

1. Resolve. Literal addresses skip DNS entirely (AI_NUMERICHOST). A name is resolved on a helper
   thread so the deadline holds even when the resolver hangs; getaddrinfo cannot be interrupted,
   so a late answer is simply dropped.
2. Order (RFC 8305 section 4): keep the resolver's preference for the first address, then
   alternate address families so one broken family costs at most one stagger.
3. Race (section 5): start the first connect; every ``stagger_s`` (250 ms, the RFC's recommended
   "Connection Attempt Delay") without a winner, or at once when an attempt fails, start the next.
   The first connect to complete wins; the others are closed before returning.
4. Errors: all attempts failed -> ConnectError naming each address and why, with the errno that
   explains the failure best (``main_errno``); deadline reached -> HopcatTimeoutError. Neither
   leaves a socket open. The asyncio dialer (``hopcat.aio``) raises the same.

The resolver, socket factory and clock are parameters so tests can script a network; the
defaults are the stdlib's.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket
import errno
import os
import select
import time

from hopcat._endpoint import format_hostport, is_ip_literal
from hopcat.errors import ConnectError, HopcatTimeoutError, ResolveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    # (host, port), and (host, port, flowinfo, scope_id) for IPv6: as getaddrinfo gives them.
    SockAddr = tuple[Any, ...]
    AddrInfo = tuple[int, int, int, str, SockAddr]
    Resolver = Callable[[str, int, int, int], Sequence[AddrInfo]]
    Trace = Callable[[str], None]

CONNECT_ATTEMPT_DELAY_S = 0.25  # RFC 8305 section 8 recommends 250 ms
# The longest single wait handed to the kernel or a lock. poll() takes an int of ms (at most
# ~24.8 days) and socket timeouts and Thread.join() have limits of their own; a deadline further
# away (--connect-timeout 0 means none) is reached by waiting again.
MAX_WAIT_S = 86400.0
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_PROBES = 4


def _default_resolver(host: str, port: int, family: int, flags: int) -> Sequence[AddrInfo]:
    # An ASCII name passed as bytes skips CPython's IDNA codec import (re, stringprep: ~2.5 ms).
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    return socket.getaddrinfo(name, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)


def no_trace(_message: str) -> None:
    """A trace that keeps nothing."""


def describe_oserror(exc: BaseException) -> str:
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def resolve(
    host: str,
    port: int,
    *,
    family: int = socket.AF_UNSPEC,
    deadline: float,
    resolver: Resolver = _default_resolver,
    clock: Callable[[], float] = time.monotonic,
    numeric_only: bool = False,
) -> list[AddrInfo]:
    where = format_hostport(host, port)
    if is_ip_literal(host) or numeric_only:
        try:
            return list(resolver(host, port, family, socket.AI_NUMERICHOST))
        except socket.gaierror as exc:
            hint = " (-n allows numeric addresses only)" if numeric_only else ""
            raise ResolveError(f"resolve {where}: {describe_oserror(exc)}{hint}") from None
    # A resolver thread: the only portable way to bound a getaddrinfo that hangs on a dead DNS
    # server. A bare _thread one: the threading module costs ~5 ms of imports on every start, and
    # a thread still stuck at exit must not hold the process (as a daemon thread would not).
    import _thread

    outcome: list[list[AddrInfo] | BaseException] = []
    answered = _thread.allocate_lock()
    answered.acquire()

    def run() -> None:
        try:
            outcome.append(list(resolver(host, port, family, 0)))
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)
        finally:
            answered.release()

    _thread.start_new_thread(run, ())
    while not outcome and clock() < deadline:
        answered.acquire(timeout=wait_s(deadline, clock))
    if not outcome:
        raise HopcatTimeoutError(f"resolve {host}: timed out")
    result = outcome[0]
    if isinstance(result, BaseException):
        if isinstance(result, (socket.gaierror, OSError)):
            raise ResolveError(f"resolve {host}: {describe_oserror(result)}") from None
        raise result
    if not result:
        raise ResolveError(f"resolve {host}: no addresses")
    return result


def wait_s(deadline: float, clock: Callable[[], float]) -> float:
    """Seconds until ``deadline``, at least 0 and at most MAX_WAIT_S: safe for any timeout call."""
    return min(MAX_WAIT_S, max(0.0, deadline - clock()))


def interleave_families(infos: Sequence[AddrInfo]) -> list[AddrInfo]:
    """RFC 8305 section 4: first address as the resolver ranked it, then alternate families."""
    if not infos:
        return []
    first_family = infos[0][0]
    preferred = [info for info in infos if info[0] == first_family]
    others = [info for info in infos if info[0] != first_family]
    ordered: list[AddrInfo] = []
    for index in range(max(len(preferred), len(others))):
        if index < len(preferred):
            ordered.append(preferred[index])
        if index < len(others):
            ordered.append(others[index])
    return ordered


def connected_to_itself(sock: socket.socket, sockaddr: SockAddr | None = None) -> bool:
    """TCP's simultaneous open: a connect to a closed port of this host, from the very port the
    kernel picked as its source, "succeeds" to itself. Nothing listens there; every dialer takes
    it as a refusal (or ``hopcat 127.0.0.1 PORT`` would talk to itself, and a scan would report
    a phantom open port, as nc.openbsd -z does)."""
    try:
        peer = sockaddr if sockaddr is not None else sock.getpeername()
        return bool(sock.getsockname()[:2] == tuple(peer[:2]))
    except OSError:
        return False


def sockaddr_text(sockaddr: SockAddr) -> str:
    return format_hostport(sockaddr[0], sockaddr[1])


def _bind_source(
    sock: socket.socket, family: int, source: str | None, port: int, resolver: Resolver
) -> None:
    address = source if source is not None else ("::" if family == socket.AF_INET6 else "0.0.0.0")
    try:
        infos = resolver(address, port, family, socket.AI_NUMERICHOST | socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConnectError(
            f"source address {source}: not usable for this address family ({describe_oserror(exc)})"
        ) from None
    if port:  # a fixed port is reused connect after connect: TIME_WAIT must not block it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as exc:
        where = format_hostport(address, port) if port else address
        raise ConnectError(
            f"bind source address {where}: {describe_oserror(exc)}", errno=exc.errno
        ) from None


def tune_socket(sock: socket.socket, *, nodelay: bool, keepalive: bool) -> None:
    if nodelay:
        # ssh cannot set this on a socket it does not own, and interactive sessions need it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def dial_tcp(
    host: str,
    port: int,
    *,
    deadline: float,
    family: int = socket.AF_UNSPEC,
    source: str | None = None,
    nodelay: bool = True,
    keepalive: bool = False,
    numeric_only: bool = False,
    trace: Trace = no_trace,
    resolver: Resolver = _default_resolver,
    socket_factory: Callable[[int, int, int], socket.socket] = socket.socket,
    clock: Callable[[], float] = time.monotonic,
    stagger_s: float = CONNECT_ATTEMPT_DELAY_S,
    timeout_label: str = "",
    blocking: bool = True,
    source_port: int = 0,
) -> socket.socket:
    """Connect to host:port before ``deadline`` (a ``clock()`` value); return a blocking socket,
    or with ``blocking=False`` leave it non-blocking (for a caller that polls anyway).

    ``timeout_label`` names the whole budget in a timeout message (e.g. "after 10 s").
    ``source_port`` binds every attempt to that local port (nc's -p), with ``source`` or the
    family's wildcard address.
    """
    where = format_hostport(host, port)
    if not is_ip_literal(host):
        trace(f"resolve {host}")
    infos = resolve(
        host,
        port,
        family=family,
        deadline=deadline,
        resolver=resolver,
        clock=clock,
        numeric_only=numeric_only,
    )
    candidates = interleave_families(infos)
    if not is_ip_literal(host):
        trace(f"resolved {host}: " + ", ".join(info[4][0] for info in candidates))

    failures: list[tuple[str, int]] = []  # (address, the errno it failed with)
    pending: dict[int, tuple[socket.socket, AddrInfo]] = {}
    poller = select.poll()
    next_index = 0
    next_start = clock()

    def start_attempt(info: AddrInfo) -> None:
        addr_family, sock_type, proto, _canon, sockaddr = info
        label = sockaddr_text(sockaddr)
        sock = socket_factory(addr_family, sock_type, proto)
        try:
            if source is not None or source_port:
                _bind_source(sock, addr_family, source, source_port, resolver)
            sock.setblocking(False)
            trace(f"connect {label}")
            code = sock.connect_ex(sockaddr)
        except BaseException:
            sock.close()
            raise
        if code in (0, errno.EINPROGRESS, errno.EAGAIN):
            pending[sock.fileno()] = (sock, info)
            poller.register(sock.fileno(), select.POLLOUT)
        else:
            sock.close()
            trace(f"connect {label}: {os.strerror(code).lower()}")
            failures.append((label, code))

    try:
        while True:
            now = clock()
            if now >= deadline:
                budget = f" {timeout_label}" if timeout_label else ""
                tried = (
                    f" ({len(failures) + len(pending)} addresses tried)"
                    if len(candidates) > 1
                    else ""
                )
                raise HopcatTimeoutError(f"connect to {where}: timed out{budget}{tried}")
            if next_index < len(candidates) and (not pending or now >= next_start):
                start_attempt(candidates[next_index])
                next_index += 1
                next_start = now + stagger_s
                continue
            if not pending:
                break
            wake_at = deadline if next_index >= len(candidates) else min(deadline, next_start)
            timeout_ms = int(min(MAX_WAIT_S, max(0.0, wake_at - now)) * 1000 + 0.999)
            for fd, _events in poller.poll(timeout_ms):
                sock, info = pending.pop(fd)
                poller.unregister(fd)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                label = sockaddr_text(info[4])
                if code == 0 and connected_to_itself(sock, info[4]):
                    code = errno.ECONNREFUSED
                if code == 0:
                    if blocking:
                        sock.setblocking(True)
                    tune_socket(sock, nodelay=nodelay, keepalive=keepalive)
                    return sock
                sock.close()
                trace(f"connect {label}: {os.strerror(code).lower()}")
                failures.append((label, code))
                next_start = clock()  # RFC 8305: a failure starts the next attempt at once
    finally:
        for sock, _info in pending.values():
            sock.close()

    raise connect_failed(where, failures)


def main_errno(codes: Sequence[int]) -> int | None:
    """The errno that best explains a race every address lost: a refusal (something answered
    there), then an unreachable network or host, then the first failure."""
    for wanted in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH):
        if wanted in codes:
            return wanted
    return codes[0] if codes else None


def connect_failed(where: str, failures: Sequence[tuple[str, int]]) -> ConnectError:
    """The error for a lost race: each (address, errno) named, unless there was only one."""
    codes = [code for _address, code in failures]
    if len(failures) == 1:
        message = f"connect to {where}: {os.strerror(codes[0]).lower()}"
    else:
        tried = "; ".join(f"{address}: {os.strerror(code).lower()}" for address, code in failures)
        message = f"connect to {where}: every address failed ({tried})"
    return ConnectError(message, errno=main_errno(codes))
