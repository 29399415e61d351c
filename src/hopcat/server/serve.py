"""The server: listeners, limits, the periodic sweep, signals, reloading, and the event loop.

One process, one thread running an asyncio event loop (uvloop's when it is installed and not
turned off); every connection is a ``handler.Conn`` driven by readiness callbacks, and every
``--via`` upstream open a task on the same loop (``hopcat.server.upstream``: the tunnel engine
under the asyncio driver). Threads exist only in one small pool, made on first use: 16 for
``getaddrinfo`` (there is no portable non-blocking resolver), for destination names and for
--via hop names alike; an IP literal never reaches it. No thread per connection. Its threads
are daemons (``DaemonPool``): a lookup stuck on a DNS server that never answers must not keep
the process alive after the grace period, which ``concurrent.futures.ThreadPoolExecutor`` would,
since it joins its threads at exit.

Fair shares: one client address has at most ``LOOKUPS_PER_CLIENT`` lookups in flight, well below
the pool's size (``FairPool``), and at most ``upstream.UPSTREAM_OPENS_PER_CLIENT`` --via opens
(``upstream.Opens``; the server at most ``upstream.UPSTREAM_OPENS``); its further ones wait in a
queue of its own, and freed slots go to the waiting clients in turn. A client that asks for
names served by a slow DNS server, or for destinations a slow upstream takes its time over,
therefore slows only itself. The resolver is a parameter (``resolver``, getaddrinfo by default),
so tests can script one.

Facts about the host that the policy needs (``Policy.host_addresses``, ``Policy.listeners``)
are read at start, on SIGHUP and every ``HOST_REFRESH_S``: interface addresses change (DHCP,
VPNs). ``--via`` chains whose last hop runs on this host (``via_dials_here``) dial destinations
from here, so names are resolved here to check them (see ``handler``).

Limits:

* ``--max-conns``: client connections at once (handshaking, connecting, relaying, lingering).
  At the limit the listeners stop being read, so further clients wait in the kernel's backlog
  instead of being dropped, and accepting resumes as soon as one connection ends.
* ``--max-conns-per-client``: per client address; one more is closed right after accept.
* Client rules: a denied client is closed right after accept.
* EMFILE/ENFILE/ENOBUFS/ENOMEM from accept(): the listeners pause for 50 ms, doubling up to 2 s
  while it persists, with one log line per pause. Level-triggered readiness would otherwise spin
  on the connection left in the backlog. Other accept errors (ECONNABORTED, EPERM from a
  firewall, ...) concern one connection and are skipped.
* Deadlines (handshake, connect, linger) and the idle timeout are checked by one sweep every
  ``SWEEP_INTERVAL_S``, not by a timer per connection.

TLS listeners (``tls://``) put a ``hopcat.server.tls.Terminator`` between the client and its
Conn; everything else is the same. --forward listeners make Conns that start connecting to their
fixed target at once (no handshake, no authentication: hence loopback unless --allow-open);
client rules, limits, destination rules, --via, timeouts and draining are the proxy's.

Signals: SIGTERM or SIGINT closes the listeners and the connections still in their handshake,
lets established tunnels finish for up to ``--grace`` seconds, then closes what is left and
exits 0; a second signal ends everything at once. SIGHUP rereads ``--auth-file``, ``--rules``
and the TLS listeners' certificate files; on an error the old configuration stays and the error
is logged. Rule changes apply to connections accepted (client rules) or requesting (destination
rules) afterwards, a certificate to TLS clients accepted afterwards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import ipaddress
import os
import queue
import signal
import socket
import threading

from hopcat._accept import OUT_OF_RESOURCES, next_backoff
from hopcat._endpoint import format_hostport
from hopcat._ready import announce_ready
from hopcat.errors import ExitCode, HopcatError, UsageError
from hopcat.proto.http_connect import AUTH_CHALLENGE as BASIC_CHALLENGE
from hopcat.server.digest import ALGORITHMS as DIGEST_ALGORITHMS
from hopcat.server.digest import REALM as DIGEST_REALM
from hopcat.server.digest import DigestAuth, NonceCounts
from hopcat.server.handler import CONNECTING, UDP, Conn, strerror
from hopcat.server.ifaddrs import host_addresses
from hopcat.server.log import Logger
from hopcat.server.metrics import Store
from hopcat.server.policy import (
    CredentialStore,
    Policy,
    parse_auth_file,
    parse_rules_file,
)
from hopcat.server.relay import Engine, ReceiveCap
from hopcat.server.throttle import LoginThrottle
from hopcat.server.upstream import Opens

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Sequence
    from typing import Any, ParamSpec, TypeVar

    from hopcat._url import ProxyURL
    from hopcat.net.dial import SockAddr
    from hopcat.server.cli import ServeOptions
    from hopcat.server.metrics import Slot
    from hopcat.server.tls import TLSFront

    P = ParamSpec("P")
    T = TypeVar("T")
    AddrInfo = tuple[Any, ...]  # getaddrinfo's (family, type, proto, canonname, sockaddr)
    Resolver = Callable[[str, int], Sequence[AddrInfo]]

SWEEP_INTERVAL_S = 0.25
ACCEPT_BATCH = 64  # accepts per readiness callback, so one listener cannot starve the rest
LIMIT_LOG_INTERVAL_S = 1.0  # at most one line per second about refused clients (floods)
RESOLVER_WORKERS = 16
LOOKUPS_PER_CLIENT = 4  # below RESOLVER_WORKERS: one client cannot hold every resolver thread
HOST_REFRESH_S = 10.0
PROTOCOLS = "socks4,socks4a,socks5,http-connect"


class ServeError(HopcatError):
    """The server could not start (e.g. the address is in use)."""

    exit_code = ExitCode.UNAVAILABLE


# --------------------------------------------------------------------------- configuration


def _read_text(path: str, what: str) -> str:
    """A configuration file as editors write it: a UTF-8 BOM (Notepad) is dropped; CRLF and
    trailing blanks are the parsers' business."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().removeprefix("\ufeff")
    except OSError as exc:
        raise UsageError(f"{what} {path}: {os.strerror(exc.errno or 0).lower()}") from None


def load_config(
    options: ServeOptions, *, previous_rules_empty: bool = True
) -> tuple[CredentialStore, Policy, list[str]]:
    """Credentials and policy from the options and the files they name; warnings to log.
    ``previous_rules_empty``: on a reload, whether the --rules file held no rule before."""
    warnings: list[str] = []
    users = list(options.auth)
    if options.auth_file is not None:
        text = _read_text(options.auth_file, "--auth-file")
        from_file = parse_auth_file(text, options.auth_file)
        if not from_file:
            # An empty file is usually one being written (or truncated by mistake): nobody could
            # log in, so it is refused, and on SIGHUP the users loaded before stay.
            raise UsageError(f"--auth-file {options.auth_file} holds no user:password line")
        if not text.endswith("\n"):
            warnings.append(
                f"--auth-file {options.auth_file} does not end with a newline: if it was being "
                "written, SIGHUP again once it is complete (write such files atomically: "
                "a temporary file, then mv)"
            )
        users += from_file
        try:
            mode = os.stat(options.auth_file).st_mode
        except OSError:
            mode = 0
        if mode & 0o077:
            warnings.append(
                f"--auth-file {options.auth_file} is readable by group or others "
                f"(mode {mode & 0o777:o}); chmod 600 it"
            )
    rules = options.rules
    if options.rules_file is not None:
        text = _read_text(options.rules_file, "--rules")
        file_rules = parse_rules_file(text, options.rules_file)
        if not file_rules.clients and not file_rules.destinations and not previous_rules_empty:
            # A rules file that lost its rules (truncated, being written) would open everything.
            raise UsageError(f"--rules {options.rules_file} holds no rule any more")
        rules = rules + file_rules
    policy = Policy(rules, restrict_local=not options.loopback_only)
    digest = options.auth_required and "digest" in options.auth_schemes
    store = CredentialStore(users, digest_algorithms=DIGEST_ALGORITHMS if digest else (),
                            digest_realm=DIGEST_REALM)  # fmt: skip
    return store, policy, warnings


# --------------------------------------------------------------------------- listening


def bind_listeners(
    addresses: Sequence[tuple[int, SockAddr]], *, reuse_port: bool = False, listen: bool = True,
    what: str = "listen on",
) -> list[socket.socket]:
    """Bind and listen on every (family, sockaddr); all or nothing. ``reuse_port``: with
    SO_REUSEPORT (--workers: every worker has listeners of its own on the same addresses);
    ``listen=False``: only bound, to reserve the addresses."""
    listeners: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # [::] must not also take IPv4 (that is 0.0.0.0's job, and the rules say which).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                where = format_hostport(str(sockaddr[0]), int(sockaddr[1]))
                raise ServeError(f"{what} {where}: {os.strerror(exc.errno or 0).lower()}") from None
            if listen:
                sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (a proxy needs two per tunnel); the new limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return int(soft)
    except (ImportError, OSError, ValueError):
        return -1


# --------------------------------------------------------------------------- the host


def getaddrinfo(host: str, port: int) -> Sequence[AddrInfo]:
    """The default resolver: the system's, for TCP."""
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def listening_on(
    listeners: Sequence[socket.socket],
) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of each listener, as the policy's loop check wants them."""
    bound = []
    for sock in listeners:
        name = sock.getsockname()
        bound.append((ipaddress.ip_address(str(name[0]).partition("%")[0]), int(name[1])))
    return bound


def via_dials_here(hops: Sequence[ProxyURL], policy: Policy) -> bool:
    """Whether the last hop of a --via chain runs on this host, so that it dials destinations
    from here. Hop k is dialled by hop k-1: an address of this host reaches this host from
    anywhere, a loopback or unspecified address reaches whoever dialled it. A hop whose name does
    not resolve here counts as local: resolving the destination here is the safe mistake.

    A hop dialled from here that is this server itself would make every request a loop: that
    is refused before serving (UsageError, exit 64)."""
    here = True  # we dial the first hop
    for index, hop in enumerate(hops, 1):
        try:
            infos = getaddrinfo(hop.host, hop.port)
        except (OSError, UnicodeError):
            here = True
            continue
        addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
        if here and any(policy.is_listener(address, hop.port) for address in addresses):
            raise UsageError(
                f"--via #{index} {hop.label()} is this server itself: every request would loop"
            )
        local = [a for a in addresses if a in policy.host_addresses and not a.is_loopback]
        if local:
            here = True
        elif not any(address.is_loopback or address.is_unspecified for address in addresses):
            here = False
    return here


class DaemonPool(concurrent.futures.Executor):
    """A thread pool whose threads are daemons, for ``loop.run_in_executor``: see the module
    docstring. Threads start on demand up to ``workers`` and then stay."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, functools.partial(fn, *args, **kwargs)))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1  # an idle thread takes it, or below zero: it waits for one
        return future

    def _work(self) -> None:
        """Invariant: ``_idle`` is the threads free for a new job minus the jobs queued."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, job = item
            if future.set_running_or_notify_cancel():
                try:
                    result = job()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel the jobs not started and let idle threads end; busy ones end with their job
        or with the process."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _thread in self._threads:
            self._queue.put(None)


class FairPool:
    """Jobs for connections on a DaemonPool (made on first use), at most ``per_client`` running
    for one client address; its further jobs wait in a FIFO of its own, and a job whose
    connection is no longer connecting when its turn comes is dropped. The future a job returns
    is never failed for a job that did not run."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, workers: int, per_client: int, name: str
    ) -> None:
        self._loop = loop
        self._workers = workers
        self.per_client = per_client
        self._name = name
        self._pool: DaemonPool | None = None
        self.running: dict[str, int] = {}  # by client address
        self._waiting: dict[
            str, collections.deque[tuple[Conn, asyncio.Future[Any], Callable[[], Any]]]
        ] = {}

    def submit(
        self, conn: Conn, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        result: asyncio.Future[T] = self._loop.create_future()
        client = conn.client_ip
        waiting = self._waiting.get(client)
        if waiting is None:
            waiting = self._waiting[client] = collections.deque()
        waiting.append((conn, result, functools.partial(fn, *args, **kwargs)))
        self._start(client)
        return result

    def _start(self, client: str) -> None:
        waiting = self._waiting[client]
        while waiting and self.running.get(client, 0) < self.per_client:
            conn, result, job = waiting.popleft()
            if conn.phase not in (CONNECTING, UDP):
                continue  # it timed out or went away while waiting its turn
            if self._pool is None:
                self._pool = DaemonPool(self._workers, self._name)
            self.running[client] = self.running.get(client, 0) + 1
            running = self._loop.run_in_executor(self._pool, job)
            running.add_done_callback(functools.partial(self._finished, client, result))
        if not waiting:
            del self._waiting[client]

    def _finished(
        self, client: str, result: asyncio.Future[Any], done: asyncio.Future[Any]
    ) -> None:
        left = self.running[client] - 1
        if left:
            self.running[client] = left
        else:
            del self.running[client]
        # The pool shut down (and the server with it), or the waiter cancelled its wait (an
        # upstream open given up while it resolves a hop's name).
        if not done.cancelled() and not result.done():
            exc = done.exception()
            if exc is not None:
                result.set_exception(exc)
            else:
                result.set_result(done.result())
        if client in self._waiting:
            self._start(client)

    def shutdown(self) -> None:
        self._waiting.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the server


class Server:
    """State shared by every connection of one event loop; see the module docstring."""

    def __init__(
        self,
        options: ServeOptions,
        listeners: list[socket.socket],
        loop: asyncio.AbstractEventLoop,
        logger: Logger,
        credentials: CredentialStore,
        policy: Policy,
        *,
        resolver: Resolver = getaddrinfo,
        tls: TLSFront | None = None,
        tls_listeners: Sequence[socket.socket] = (),
        forwards: dict[int, tuple[str, int]] | None = None,
        metrics: Slot | None = None,
        digest_secret: bytes | None = None,
        digest_counts: NonceCounts | None = None,
    ) -> None:
        """``listeners``: every listener, ``tls_listeners`` among them those whose clients
        speak TLS (``tls``: their certificate), ``forwards`` the fixed target of each --forward
        listener by its descriptor; ``metrics``: where to count (--metrics); ``digest_secret``:
        the Digest nonces' key and ``digest_counts`` their counts seen (--workers: one for all,
        since a client's next connection, or a replayed answer, may reach another worker)."""
        self.options = options
        self.metrics = Store(1).slot(0) if metrics is None else metrics
        self.listeners = listeners
        self.tls = tls
        self.tls_fds = frozenset(sock.fileno() for sock in tls_listeners)
        self.forwards = forwards or {}
        self.family = options.family
        self.loop = loop
        self.logger = logger
        self.credentials = credentials
        self.resolver = resolver
        self.listening = listening_on(listeners)
        self.host_addresses = host_addresses()
        self._host_checked_at = loop.time()
        self.policy = self._placed(policy)
        self.logins = LoginThrottle()
        self.rules_file_empty = _rules_file_empty(options, policy)
        limit = options.max_receive_buffer
        self.engine = Engine(
            loop,
            splice=not options.no_splice,
            receive_cap=ReceiveCap.for_limit(limit) if limit else None,
        )
        self.auth_required = options.auth_required
        # The HTTP 407's challenges, in --auth-scheme order; Digest's get a fresh nonce each.
        self.digest: DigestAuth | None = None
        if self.auth_required and "digest" in options.auth_schemes:
            self.digest = DigestAuth(
                loop.time, lifetime_s=options.nonce_lifetime_s, secret=digest_secret,
                counts=digest_counts,
            )  # fmt: skip
        self.via: list[ProxyURL] = options.via
        # Whether names must be resolved here: always when dialling, through --via only when
        # the last hop dials from this host (see handler).
        self.resolves_names = not self.via or via_dials_here(self.via, self.policy)
        self.handshake_timeout = options.handshake_timeout_s
        self.connect_timeout = options.connect_timeout_s
        self.idle_timeout = options.idle_timeout_s
        self.max_conns = options.max_conns
        self.max_per_client = options.max_conns_per_client
        self.pending: set[Conn] = set()  # handshaking, connecting, lingering
        self.tunnels: set[Conn] = set()  # relaying
        self.per_client: dict[str, int] = {}
        self.udp_per_client: dict[str, int] = {}  # UDP associations by client address
        self.udp_idle_timeout = options.udp_idle_timeout_s
        self.count = 0
        self.served = 0
        self.accepting = False
        self.paused_for: str | None = None  # "max-conns" or "backoff" while paused
        self.stopping = False
        self._backoff_s = 0.0
        self._resume_handle: asyncio.TimerHandle | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._grace_handle: asyncio.TimerHandle | None = None
        self._next_idle_check = 0.0
        self._limit_logged_at = -1e9
        self._suppressed: dict[str, int] = {}  # refusals not logged one by one, by result
        self.resolving = FairPool(loop, RESOLVER_WORKERS, LOOKUPS_PER_CLIENT, "hopcat-resolve")
        self.opens = Opens(loop, self.via, options.connect_timeout_s, context=options.via_context)
        self.done: asyncio.Future[int] = loop.create_future()

    # -- accepting ------------------------------------------------------------------------
    def start(self) -> None:
        self._resume_accepting()
        self._sweep_handle = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _resume_accepting(self) -> None:
        if self.accepting or self.stopping:
            return
        self.accepting = True
        self.paused_for = None
        for listener in self.listeners:
            self.loop.add_reader(listener.fileno(), self._on_accept, listener)

    def _pause_accepting(self, why: str) -> None:
        if not self.accepting:
            return
        self.accepting = False
        self.paused_for = why
        for listener in self.listeners:
            self.loop.remove_reader(listener.fileno())

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._back_off(exc)
                    return
                continue  # ECONNABORTED, EPROTO, EPERM...: that connection is gone, not us
            self._backoff_s = 0.0
            fd = listener.fileno()
            self._admit(sock, address, fd in self.tls_fds, self.forwards.get(fd))
            if not self.accepting:
                return

    def _back_off(self, exc: OSError) -> None:
        self._backoff_s = next_backoff(self._backoff_s)
        self.metrics.backed_off()
        self._pause_accepting("backoff")
        self.logger.log(
            "accept-error", error=os.strerror(exc.errno or 0).lower(), connections=self.count,
            pause=self._backoff_s,
        )  # fmt: skip
        self._resume_handle = self.loop.call_later(self._backoff_s, self._end_backoff)

    def _end_backoff(self) -> None:
        self._resume_handle = None
        if self.paused_for != "backoff":
            return
        if self.count < self.max_conns:
            self._resume_accepting()
        else:
            self.paused_for = "max-conns"  # release() resumes once a connection ends

    def _admit(
        self, sock: socket.socket, address: SockAddr, tls: bool = False,
        fixed: tuple[str, int] | None = None,
    ) -> None:  # fmt: skip
        ip = str(address[0])
        peer = format_hostport(ip, int(address[1]))
        if not self.policy.client_allowed(ip):
            sock.close()
            self._log_refusal(peer, "client-denied", "client address not allowed by the rules")
            return
        have = self.per_client.get(ip, 0)
        if self.max_per_client and have >= self.max_per_client:
            sock.close()
            self._log_refusal(
                peer, "limit", f"{have} connections from this client (--max-conns-per-client)"
            )
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()  # reset before we got to it
            return
        terminator = None
        if tls:
            assert self.tls is not None
            from hopcat.server.tls import Terminator

            try:
                terminator = Terminator(self.loop, self.tls, sock, self.engine.receive_cap)
            except OSError as exc:  # no descriptors for its socketpair
                sock.close()
                self._log_refusal(peer, "no-resources", f"TLS: {strerror(exc)}")
                return
            conn = Conn(self, terminator.outer, peer, ip, terminator)
        else:
            conn = Conn(self, sock, peer, ip, fixed=fixed)
        self.per_client[ip] = have + 1
        self.count += 1
        self.served += 1
        self.pending.add(conn)
        if self.count >= self.max_conns:
            self._pause_accepting("max-conns")
            self.logger.log(
                "limit", reason=f"{self.count} connections (--max-conns); accepting paused"
            )
        conn.start()
        if terminator is not None:
            terminator.start(conn)

    def _log_refusal(self, peer: str, result: str, reason: str) -> None:
        """One line per refused connection, but at most one a second: a flood of refusals
        would otherwise be a flood of log lines. The sweep reports what was left out."""
        self.metrics.ended(result)
        now = self.loop.time()
        if now - self._limit_logged_at < LIMIT_LOG_INTERVAL_S:
            self._suppressed[result] = self._suppressed.get(result, 0) + 1
            return
        self._limit_logged_at = now
        self.logger.tunnel(client=peer, result=result, reason=reason, duration=0.0)

    def _log_suppressed(self, now: float) -> None:
        if self._suppressed and now - self._limit_logged_at >= LIMIT_LOG_INTERVAL_S:
            counts = ",".join(f"{result}:{n}" for result, n in sorted(self._suppressed.items()))
            self._suppressed.clear()
            self._limit_logged_at = now
            self.logger.log("refusals", unlogged=counts)

    # -- bookkeeping called by Conn ---------------------------------------------------------
    def to_relay(self, conn: Conn) -> None:
        self.pending.discard(conn)
        if conn not in self.tunnels:  # a forwarding connection comes here once per request
            self.tunnels.add(conn)
            self.metrics.opened("socks5-udp" if conn.udp is not None else conn.protocol)

    def _left_relay(self, conn: Conn) -> None:
        if conn in self.tunnels:
            self.tunnels.remove(conn)
            self.metrics.closed("socks5-udp" if conn.udp is not None else conn.protocol)

    def to_pending(self, conn: Conn) -> None:
        self._left_relay(conn)
        self.pending.add(conn)

    def release(self, conn: Conn) -> None:
        self.pending.discard(conn)
        self._left_relay(conn)
        self.metrics.ended(conn.result, conn.bytes_up, conn.bytes_down)
        self.count -= 1
        left = self.per_client.get(conn.client_ip, 1) - 1
        if left > 0:
            self.per_client[conn.client_ip] = left
        else:
            self.per_client.pop(conn.client_ip, None)
        udp = conn.udp
        if udp is not None:
            left = self.udp_per_client.get(conn.client_ip, 1) - 1
            if left > 0:
                self.udp_per_client[conn.client_ip] = left
            else:
                self.udp_per_client.pop(conn.client_ip, None)
        if conn.forward is None:  # a forwarder logs each request itself
            self._log_tunnel(conn)
        if self.paused_for == "max-conns" and self.count < self.max_conns:
            self._resume_accepting()
        if self.stopping:
            self._maybe_done()

    def _log_tunnel(self, conn: Conn) -> None:
        udp = conn.udp
        self.logger.tunnel(
            client=conn.peer,
            user=conn.user,
            proto=conn.protocol,
            dest=conn.dest,
            result=conn.result,
            reason=conn.reason,
            up=conn.bytes_up,
            down=conn.bytes_down,
            duration=self.loop.time() - conn.started,
            tls=conn.tls.version if conn.tls is not None else None,
            udp=format_hostport(*udp.bound) if udp is not None else None,
            dgrams_up=udp.datagrams_up if udp is not None else None,
            dgrams_down=udp.datagrams_down if udp is not None else None,
            dropped=udp.dropped_total if udp is not None else None,
            drops=udp.drops_text() if udp is not None else None,
        )

    def http_challenges(self, *, stale: bool = False) -> list[str]:
        """The Proxy-Authenticate values of a 407, in --auth-scheme order (Digest: fresh nonce)."""
        values: list[str] = []
        for scheme in self.options.auth_schemes:
            if scheme == "digest" and self.digest is not None:
                values += self.digest.challenges(stale=stale)
            elif scheme == "basic":
                values.append(BASIC_CHALLENGE)
        return values

    def lookup(self, conn: Conn, host: str, port: int) -> asyncio.Future[Sequence[AddrInfo]]:
        """Resolve ``host`` for ``conn`` on the resolver threads, within its client's share."""
        return self.resolving.submit(conn, self.resolver, host, port)

    def _placed(self, policy: Policy) -> Policy:
        """``policy`` told where this server runs: the host's addresses and its listeners."""
        policy.host_addresses = self.host_addresses
        policy.listeners = tuple(self.listening)
        return policy

    def _refresh_host(self, now: float) -> None:
        self._host_checked_at = now
        self.host_addresses = host_addresses()
        self.policy.host_addresses = self.host_addresses

    # -- the sweep ----------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Deadlines of pending connections; idle tunnels. Invariant: reschedules itself."""
        now = self.loop.time()
        self._log_suppressed(now)
        if now - self._host_checked_at >= HOST_REFRESH_S:
            self._refresh_host(now)
        if self.pending:
            for conn in [c for c in self.pending if c.deadline <= now]:
                conn.on_deadline()
        timeouts = [t for t in (self.idle_timeout, self.udp_idle_timeout) if t]
        if timeouts and now >= self._next_idle_check:
            self._next_idle_check = now + min(1.0, min(timeouts) / 4)
            for conn in list(self.tunnels):
                limit = self.idle_timeout if conn.udp is None else self.udp_idle_timeout
                if conn.active:
                    conn.active = False
                    conn.idle_since = now
                elif limit and now - conn.idle_since >= limit:
                    what = "data" if conn.udp is None else "datagram"
                    conn.close("idle-timeout", f"no {what} either way for {limit:g} s")
        self._sweep_handle = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    # -- signals ------------------------------------------------------------------------------
    def stop(self, signame: str) -> None:
        if self.stopping:
            self.logger.log("shutdown", signal=signame, reason="second signal: closing everything")
            self._close_all("shutdown", "server stopped")
            return
        self.stopping = True
        grace = self.options.grace_s
        self.logger.log(
            "shutdown", signal=signame, tunnels=len(self.tunnels), grace=float(grace),
            served=self.served,
        )  # fmt: skip
        if self.accepting:
            self._pause_accepting("stopping")
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        for listener in self.listeners:
            listener.close()
        for conn in list(self.pending):
            conn.close("shutdown", "server stopping")
        for conn in [c for c in self.tunnels if c.udp is not None]:
            conn.close("shutdown", "server stopping")  # an association has no end to wait for
        if self.tunnels:
            self._grace_handle = self.loop.call_later(
                grace, self._close_all, "shutdown", f"grace period of {grace:g} s over"
            )
        self._maybe_done()

    def _close_all(self, result: str, reason: str) -> None:
        for conn in list(self.tunnels) + list(self.pending):
            conn.close(result, reason)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self.tunnels and not self.pending and not self.done.done():
            self.done.set_result(0)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """asyncio's own error reports (a callback raised), as one of our log lines."""
        exc = context.get("exception")
        self.logger.log(
            "error", reason=str(context.get("message")),
            exception=f"{type(exc).__name__}: {exc}" if exc is not None else None,
        )  # fmt: skip

    def reload(self) -> None:
        try:
            credentials, policy, warnings = load_config(
                self.options, previous_rules_empty=self.rules_file_empty
            )
        except HopcatError as exc:
            self.logger.log("reload", result="error", reason=str(exc))
            return
        if self.tls is not None:
            try:
                self.tls.reload()
            except HopcatError as exc:
                self.logger.log("reload", result="error", reason=str(exc))
                return
        self._refresh_host(self.loop.time())
        self.credentials, self.policy = credentials, self._placed(policy)
        self.rules_file_empty = _rules_file_empty(self.options, policy)
        for warning in warnings:
            self.logger.log("warning", reason=warning)
        self.logger.log(
            "reload", result="ok", users=len(credentials),
            rules=len(policy.rules.destinations) + len(policy.rules.clients),
        )  # fmt: skip

    # -- running --------------------------------------------------------------------------------
    async def serve(self, on_ready: Callable[[], None] = lambda: None) -> int:
        """Serve until stopped; ``on_ready`` runs once signals are handled and accepts are on,
        so whoever it tells can stop us right away."""
        loop = self.loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.set_exception_handler(self._on_loop_error)
        self.start()
        on_ready()
        try:
            return await self.done
        finally:
            await self.opens.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for handle in (self._sweep_handle, self._grace_handle, self._resume_handle):
                if handle is not None:
                    handle.cancel()
            for listener in self.listeners:
                listener.close()
            self.engine.close()
            self.resolving.shutdown()
            self._log_suppressed(float("inf"))
            self.logger.log("stopped", served=self.served)
            self.logger.flush()


def _rules_file_empty(options: ServeOptions, policy: Policy) -> bool:
    """Whether the --rules file contributed no rule (all rules came from the command line)."""
    rules = policy.rules
    return len(rules.clients) + len(rules.destinations) == len(options.rules.clients) + len(
        options.rules.destinations
    )


def new_event_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """``auto``: uvloop when importable, else asyncio's default loop."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise UsageError(
                    "--event-loop uvloop: uvloop is not installed (pip install 'hopcat[uvloop]')"
                ) from None
        else:
            return uvloop.new_event_loop(), "uvloop"
    import asyncio

    return asyncio.new_event_loop(), "asyncio"


def listen_addresses(options: ServeOptions) -> list[tuple[int, SockAddr]]:
    """Every address served, in the order that tells the listeners apart: the proxy ones
    (--listen), the tls:// ones, the --forward ones."""
    forwards = [(family, sockaddr) for family, sockaddr, _target in options.forwards]
    return options.bind_addresses + options.tls_addresses + forwards


def ready_lines(options: ServeOptions, names: Sequence[SockAddr]) -> list[str]:
    """The --ready-fd/--ready-file lines for listeners bound to ``names`` (in
    ``listen_addresses`` order): HOST:PORT, tls://HOST:PORT, then "forward HOST:PORT TARGET",
    so that readers of the older lines are unchanged."""
    plain = len(options.bind_addresses)
    proxies = plain + len(options.tls_addresses)
    lines = []
    for index, name in enumerate(names):
        address = format_hostport(str(name[0]), int(name[1]))
        if index >= proxies:
            target = options.forwards[index - proxies][2]
            lines.append(f"forward {address} {format_hostport(*target)}")
        else:
            lines.append(("tls://" if index >= plain else "") + address)
    return lines


def report_ready(options: ServeOptions, addresses: list[str]) -> None:
    """Tell whoever started us where we listen: --ready-fd (then closed), --ready-file (atomic)."""
    announce_ready(addresses, ready_fd=options.ready_fd, ready_file=options.ready_file)


class Startup:
    """What is read and checked once, before anything serves (and before workers fork)."""

    def __init__(self, options: ServeOptions, resolver: Resolver) -> None:
        self.credentials, self.policy, self.warnings = load_config(options)
        self.rules_file_empty = _rules_file_empty(options, self.policy)
        self.digest_secret = os.urandom(32)
        self.digest_counts = (
            NonceCounts() if options.auth_required and "digest" in options.auth_schemes else None
        )
        self.tls: TLSFront | None = None
        if options.tls_addresses:
            from hopcat.net.tls import TLSSettings
            from hopcat.server.tls import TLSFront

            self.tls = TLSFront(TLSSettings(
                cert=options.tls_cert, key=options.tls_key, ca=options.tls_ca,
                verify_client=options.tls_verify_client,
            ))  # fmt: skip
        self.resolver = resolver
        self.fd_limit = raise_fd_limit()

    def reload(self, options: ServeOptions) -> None:
        """SIGHUP under --workers: what a worker forked from now on starts with is what the
        running ones reload (a bad file keeps the previous configuration, as they do)."""
        try:
            credentials, policy, warnings = load_config(
                options, previous_rules_empty=self.rules_file_empty
            )
            if self.tls is not None:
                self.tls.reload()
        except HopcatError:
            return  # every worker logs the error
        self.credentials, self.policy, self.warnings = credentials, policy, warnings
        self.rules_file_empty = _rules_file_empty(options, policy)


def run(options: ServeOptions, *, resolver: Resolver = getaddrinfo) -> int:
    """Bind, serve until stopped by a signal, return the exit code."""
    from hopcat.server.metrics import Endpoint, Store, bind_metrics

    startup = Startup(options, resolver)
    metrics_sock = bind_metrics(options.metrics_address) if options.metrics_address else None
    try:
        if options.workers > 1:
            from hopcat.server.workers import Supervisor

            return Supervisor(options, startup, metrics_sock).run()
        listeners = bind_listeners(listen_addresses(options))
    except BaseException:
        if metrics_sock is not None:
            metrics_sock.close()
        raise
    store = Store(1)

    def setup(server: Server) -> Callable[[], None]:
        if metrics_sock is None:
            return lambda: None
        endpoint = Endpoint(metrics_sock, store, supervised=False)
        server.loop.run_until_complete(endpoint.start())
        server.logger.log("metrics", address=endpoint.address)
        return endpoint.close

    try:
        return serve_on(
            options, startup, listeners, store.slot(0), setup=setup,
            ready=lambda addresses: report_ready(options, addresses),
        )  # fmt: skip
    finally:
        if options.ready_file is not None:
            try:
                os.unlink(options.ready_file)  # a stale file must not look like a ready server
            except OSError:
                pass


def serve_on(
    options: ServeOptions,
    startup: Startup,
    listeners: list[socket.socket],
    metrics: Slot,
    *,
    ready: Callable[[list[str]], None],
    setup: Callable[[Server], Callable[[], None]] = lambda server: lambda: None,
    log_fields: dict[str, object] | None = None,
) -> int:
    """Serve on ``listeners`` (bound to ``listen_addresses(options)``, in that order) on a new
    event loop until stopped; ``ready`` gets the addresses once accepting. ``setup`` runs with
    the server before that and returns what undoes it. Takes the listeners over (closes them)."""
    proxies = len(options.bind_addresses) + len(options.tls_addresses)
    tls_listeners = listeners[len(options.bind_addresses) : proxies]
    targets = [target for _family, _sockaddr, target in options.forwards]
    forwards = {
        sock.fileno(): target for sock, target in zip(listeners[proxies:], targets, strict=True)
    }
    logger = Logger(fmt=options.log_format, quiet=options.quiet, fields=log_fields)
    try:
        loop, loop_name = new_event_loop(options.event_loop)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    teardown: Callable[[], None] = lambda: None  # noqa: E731
    try:
        server = Server(
            options, listeners, loop, logger, startup.credentials, startup.policy,
            resolver=startup.resolver, tls=startup.tls, tls_listeners=tls_listeners,
            forwards=forwards, metrics=metrics, digest_secret=startup.digest_secret,
            digest_counts=startup.digest_counts,
        )  # fmt: skip
        logger.attach(loop)
        addresses = ready_lines(options, [sock.getsockname() for sock in listeners])
        for sock, line in zip(listeners, addresses, strict=True):
            target = forwards.get(sock.fileno())
            address, forward = line.split(" ")[1:] if target is not None else (line, None)
            logger.log(
                "listen", address=address, protocols=PROTOCOLS if forward is None else "forward",
                forward=forward,
                auth="required" if options.auth_required and forward is None else "none",
                via=" -> ".join(hop.label() for hop in options.via) or None,
                loop=loop_name, pid=os.getpid(),
            )  # fmt: skip
        for warning in startup.warnings:
            logger.log("warning", reason=warning)
        if options.max_receive_buffer and server.engine.receive_cap is None:
            logger.log(
                "warning",
                reason=f"receive buffers are left to the kernel's autotuning: --max-receive-buffer "
                f"{options.max_receive_buffer} is over twice net.core.rmem_max and this process "
                "lacks CAP_NET_ADMIN (raise net.core.rmem_max, or lower the option)",
            )
        needed = (4 if tls_listeners else 2) * options.max_conns + 64  # TLS: and a socketpair
        if 0 < startup.fd_limit < needed:
            logger.log(
                "warning",
                reason=f"the descriptor limit ({startup.fd_limit}) is below what --max-conns "
                f"{options.max_conns} may need ({needed}); accepts will back off at the limit",
            )
        logger.flush()
        teardown = setup(server)
        return loop.run_until_complete(server.serve(lambda: ready(addresses)))
    finally:
        teardown()
        logger.attach(None)
        loop.close()
