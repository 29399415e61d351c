"""Open a tunnel to host:port through a chain of proxies, hop by hop, under one deadline.

The TCP connection goes to the first proxy; each proxy is then asked to connect to the next one
(or, at the last hop, to the target), over the same socket. An ``https://`` hop wraps the socket
in TLS before its CONNECT; everything after it rides inside that TLS session.

Names: a target name goes to the proxy (remote DNS) whenever that hop's protocol can carry one
(SOCKS4a, SOCKS5, HTTP) unless ``proxy_dns`` says "local" (resolve here, send the address),
"both" (resolve here, fall back to sending the name) or "none" (ncat's: addresses only, names are
refused). SOCKS4 cannot carry names, so its targets are resolved here. ``numeric_only`` (-n)
forbids every lookup here, the first proxy's name included. A scoped IPv6 target
(``fe80::1%eth0``) is refused: the zone names one of our interfaces, not the proxy's.

Wrong scheme: a proxy of another protocol either answers at once (its first byte names it, see
``version_hint``), closes, or waits silently for the rest of a request it cannot parse (an HTTP
proxy given a SOCKS5 greeting or a TLS ClientHello waits for a line feed). When the first proxy
closes without a byte, or stays silent for ``SILENT_PROXY_PROBE_S`` where any proxy of the
expected kind answers at once (the SOCKS5 method selection, the TLS ServerHello), a second
connection asks it in the protocol it probably speaks, and the error names the scheme to use.
The first connection is left alone, so a merely slow proxy is never disturbed.

Errors name the hop: ``proxy socks5://127.0.0.1:1080 (hop 1/2): host unreachable (reply 4) for
git.example:22``.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket
import time

from hopcat._endpoint import format_hostport, is_ip_literal, split_scope
from hopcat._url import PROXY_DNS_POLICIES
from hopcat.errors import (
    ConnectError,
    HopcatError,
    HopcatTimeoutError,
    ProtocolError,
    ProxyError,
    ProxyUnreachableError,
    RemoteProtocolError,
    ResolveError,
    UsageError,
)
from hopcat.net.dial import describe_oserror, dial_tcp, resolve, wait_s
from hopcat.net.drive import run_handshake

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence

    from hopcat._url import ProxyURL
    from hopcat.proto._events import Event

# Any SOCKS5 proxy answers a greeting, and any TLS server a ClientHello, without asking anyone
# else: silence this long is worth a look on a second connection (which costs the proxy nothing).
SILENT_PROXY_PROBE_S = 1.5
# What the look sends: a request every HTTP proxy answers at once without connecting anywhere
# (RFC 9110 section 9.3.7), and a SOCKS5 greeting offering "no authentication".
_HTTP_PROBE = b"OPTIONS * HTTP/1.0\r\n\r\n"
_SOCKS5_PROBE = b"\x05\x01\x00"
# What we sent first, per expected protocol, for the message.
_FIRST_MESSAGE = {"socks5": "SOCKS5 greeting", "socks4": "SOCKS4 request", "tls": "TLS handshake",
                  "http": "CONNECT request"}


class Tunnel:
    """An open path to the target. ``trailing`` holds target bytes that came with the last reply."""

    __slots__ = ("sock", "tls", "trailing")

    def __init__(self, sock: socket.socket, trailing: bytes, tls: bool) -> None:
        self.sock = sock
        self.trailing = trailing
        self.tls = tls


def _client_machine(hop: ProxyURL, host: str, port: int) -> object:
    if hop.protocol == "socks5":
        from hopcat.proto.socks5 import Socks5Client

        return Socks5Client(host, port, username=hop.username, password=hop.password)
    if hop.protocol == "socks4":
        from hopcat.proto.socks4 import Socks4Client

        return Socks4Client(host, port, user_id=hop.username or "", socks4a=hop.scheme == "socks4a")
    from hopcat.proto.http_connect import HttpConnectClient

    return HttpConnectClient(host, port, username=hop.username, password=hop.password)


def _tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
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


def _probe(address: tuple, family: int, data: bytes, deadline: float,  # type: ignore[type-arg]
           clock: Callable[[], float]) -> bytes:
    """The first bytes a second connection to ``address`` gets back for ``data`` (b"" if none)."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.settimeout(min(SILENT_PROXY_PROBE_S, wait_s(deadline, clock)))
        probe.connect(address)
        probe.sendall(data)
        return probe.recv(16)
    except OSError:
        return b""
    finally:
        probe.close()


class _Diagnosis:
    """Looks at the first proxy on a second connection when the first one tells nothing."""

    __slots__ = ("address", "clock", "deadline", "expected", "family")

    def __init__(self, sock: socket.socket, expected: str, deadline: float,
                 clock: Callable[[], float]) -> None:
        self.address = sock.getpeername()
        self.family = sock.family
        self.expected = expected  # "socks5", "socks4", "http" or "tls"
        self.deadline = deadline
        self.clock = clock

    def __call__(self, what: str) -> None:
        """``what`` is "silent" or "closed"; raise a better error, or return to go on as before."""
        if what == "silent" and self.expected == "http":
            return  # its answer waits for the proxy's connect to the target: silence proves nothing
        # A SOCKS4 answer also waits for the target; a proxy that answers a SOCKS5 greeting as
        # well speaks SOCKS and is merely slow.
        if (
            self.expected != "http" and self._answers(_HTTP_PROBE, b"HTTP/")
            and not (what == "silent" and self.expected == "socks4"
                     and self._answers(_SOCKS5_PROBE, b"\x05"))
        ):  # fmt: skip
            kind = "plain HTTP" if self.expected == "tls" else "HTTP"
            raise self._wrong_scheme(what, kind, "http://")
        if what == "closed" and self.expected in ("http", "tls") and self._answers(
            _SOCKS5_PROBE, b"\x05"
        ):
            raise self._wrong_scheme(what, "SOCKS5", "socks5h://")
        if what == "closed" and self.expected == "http":
            answer = _probe(self.address, self.family, _client_hello(), self.deadline, self.clock)
            if answer[:1] in (b"\x15", b"\x16"):  # TLS alert or handshake record
                raise self._wrong_scheme(what, "TLS", "https://")

    def _answers(self, probe: bytes, prefix: bytes) -> bool:
        answer = _probe(self.address, self.family, probe, self.deadline, self.clock)
        return answer[: len(prefix)] == prefix

    def _wrong_scheme(self, what: str, kind: str, scheme: str) -> RemoteProtocolError:
        first = _FIRST_MESSAGE[self.expected]
        if what == "silent":
            answer = f"no answer to the {first} after {SILENT_PROXY_PROBE_S:g} s"
        else:
            answer = f"the proxy closed the connection without answering the {first}"
        article = "an" if kind == "HTTP" else "a"
        return RemoteProtocolError(
            f"{answer}, and a new connection gets {article} {kind} answer: this looks like "
            f"{article} {kind} proxy: use {scheme}"
        )


def _client_hello() -> bytes:
    """A TLS ClientHello as the ssl module writes it, for a probe (only failures pay the import)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # the hello is written; the answer would be read next
    return outgoing.read()


def _wrap_tls(
    sock: socket.socket, hop: ProxyURL, context: ssl.SSLContext, deadline: float,
    clock: Callable[[], float], diagnose: _Diagnosis | None,
) -> socket.socket:
    import socket as socket_module  # ssl wants the full socket class; only TLS chains pay for it

    # A certificate names the address, never this host's zone of it.
    name = split_scope(hop.host)[0] or hop.host
    plain = socket_module.socket(fileno=sock.detach())
    try:
        wrapped = context.wrap_socket(plain, server_hostname=name, do_handshake_on_connect=False)
    except ValueError as exc:  # a name the ssl module will not put into SNI
        plain.close()
        raise UsageError(f"{hop.host}: cannot be used as a TLS server name ({exc})") from None
    try:
        _tls_handshake(wrapped, deadline, clock, diagnose)
    except BaseException:
        wrapped.close()
        raise
    wrapped.settimeout(None)
    return wrapped


def _tls_handshake(
    wrapped: ssl.SSLSocket, deadline: float, clock: Callable[[], float],
    diagnose: _Diagnosis | None,
) -> None:
    import ssl

    quiet = diagnose is not None
    while True:
        wrapped.settimeout(min(SILENT_PROXY_PROBE_S, wait_s(deadline, clock)) if quiet
                           else wait_s(deadline, clock))
        try:
            wrapped.do_handshake()
            return
        except ssl.SSLCertVerificationError as exc:
            raise RemoteProtocolError(
                f"TLS certificate not trusted: {exc.verify_message} "
                "(--proxy-cacert FILE to trust its CA, --proxy-insecure to skip the check)"
            ) from None
        except TimeoutError:
            if clock() >= deadline:
                raise HopcatTimeoutError("no TLS handshake before the connect timeout") from None
            if quiet and diagnose is not None:
                quiet = False
                diagnose("silent")
        except (ssl.SSLError, OSError) as exc:
            # A reset, an EOF or garbage where a ServerHello belongs: perhaps not a TLS server.
            if diagnose is not None:
                diagnose("closed")
            why = getattr(exc, "reason", None) or describe_oserror(exc)
            raise ProtocolError(f"TLS handshake failed: {why}") from None


def _target_for_hop(
    hop: ProxyURL, host: str, port: int, proxy_dns: str, family: int, deadline: float,
    clock: Callable[[], float], trace: Callable[[str], None], numeric_only: bool,
) -> str:
    """The address or name this hop is asked to connect to."""
    if split_scope(host)[0]:
        raise UsageError(
            f"{host}: a scoped address names an interface of this host, which means nothing to a "
            "proxy; give the address without its %zone if the proxy shares that link"
        )
    if is_ip_literal(host):
        return host
    if proxy_dns == "none":
        raise UsageError(f"{host}: --proxy-dns none sends only addresses, and this is a name")
    local = proxy_dns in ("local", "both") or not hop.carries_names
    if not local:
        return host
    if numeric_only:
        why = (f"--proxy-dns {proxy_dns} resolves them here" if hop.carries_names
               else "SOCKS4 carries only addresses (socks4a:// sends the name)")
        raise UsageError(f"{host}: -n forbids looking up names here, and {why}")
    try:
        infos = resolve(host, port, family=family, deadline=deadline, clock=clock)
    except ResolveError:
        if proxy_dns == "both" and hop.carries_names:
            trace(f"resolve {host} locally failed; sending the name to the proxy (--proxy-dns both)")
            return host
        raise
    if not hop.carries_names:
        infos = [info for info in infos if info[0] == socket.AF_INET]
        if not infos:
            raise ResolveError(f"resolve {host}: no IPv4 address, and SOCKS4 carries only IPv4 (use socks4a://)")
    address = str(infos[0][4][0])
    trace(f"resolved {host} locally: {address}")
    return address


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
    trace: Callable[[str], None] = lambda _message: None,
    clock: Callable[[], float] = time.monotonic,
    timeout_label: str = "",
) -> Tunnel:
    """Connect to host:port through ``hops`` (at least one). Raises HopcatError subclasses."""
    if proxy_dns not in PROXY_DNS_POLICIES:
        raise UsageError(f"--proxy-dns must be one of {', '.join(PROXY_DNS_POLICIES)}")
    if sum(hop.tls for hop in hops) > 1:
        raise UsageError("at most one https:// proxy per chain (TLS inside TLS is not supported)")
    context = _tls_context(cafile, insecure) if any(hop.tls for hop in hops) else None
    sock = _dial_first_hop(hops, deadline, family, source, nodelay, keepalive, numeric_only,
                           trace, clock, timeout_label)
    carry = b""
    tls = False
    try:
        for index, hop in enumerate(hops):
            if hop.tls:
                assert context is not None
                tls = True
            sock, carry = _cross_hop(
                sock, carry, hops, index, host, port, deadline=deadline, family=family,
                proxy_dns=proxy_dns, numeric_only=numeric_only, exact=exact and not tls,
                context=context, trace=trace, clock=clock, timeout_label=timeout_label,
            )
    except BaseException:
        sock.close()
        raise
    return Tunnel(sock, carry, tls)


def _dial_first_hop(
    hops: Sequence[ProxyURL], deadline: float, family: int, source: str | None, nodelay: bool,
    keepalive: bool, numeric_only: bool, trace: Callable[[str], None], clock: Callable[[], float],
    timeout_label: str,
) -> socket.socket:
    count = len(hops)
    first = hops[0]
    where = f"proxy {first.label()} (hop 1/{count})"
    started = clock()
    trace(f"hop 1/{count}: {first.label()}" + (f" (from {first.origin})" if first.origin else ""))
    try:
        sock = dial_tcp(
            first.host, first.port, deadline=deadline, family=family, source=source,
            nodelay=nodelay, keepalive=keepalive, numeric_only=numeric_only, trace=trace,
            clock=clock, timeout_label=timeout_label,
        )
    except ConnectError as exc:
        raise ProxyUnreachableError(f"unreachable: {exc.message}", where=where) from None
    except HopcatError as exc:
        exc.where = where
        raise
    trace(f"hop 1/{count}: TCP connected in {(clock() - started) * 1000:.1f} ms")
    return sock


def _cross_hop(
    sock: socket.socket, carry: bytes, hops: Sequence[ProxyURL], index: int, host: str, port: int,
    *, deadline: float, family: int, proxy_dns: str, numeric_only: bool, exact: bool,
    context: ssl.SSLContext | None, trace: Callable[[str], None], clock: Callable[[], float],
    timeout_label: str,
) -> tuple[socket.socket, bytes]:
    """Ask hop ``index`` for the next hop (or the target); return the socket and trailing bytes."""
    count = len(hops)
    hop = hops[index]
    number = index + 1
    prefix = f"hop {number}/{count}"
    where = f"proxy {hop.label()} ({prefix})"
    if index:
        trace(f"{prefix}: {hop.label()}" + (f" (from {hop.origin})" if hop.origin else ""))
    last = number == count
    next_host, next_port = (host, port) if last else (hops[index + 1].host, hops[index + 1].port)
    # Only the first hop can be looked at on a second connection: later ones sit behind others.
    diagnose = None
    try:
        step_started = clock()
        if hop.tls:
            assert context is not None
            if index == 0:
                diagnose = _Diagnosis(sock, "tls", deadline, clock)
            sock = _wrap_tls(sock, hop, context, deadline, clock, diagnose)
            trace(f"{prefix}: TLS {sock.version()} in {(clock() - step_started) * 1000:.1f} ms")  # type: ignore[attr-defined]
            step_started = clock()
        elif index == 0:
            diagnose = _Diagnosis(sock, hop.protocol, deadline, clock)
        wire_host = _target_for_hop(hop, next_host, next_port, proxy_dns, family, deadline, clock,
                                    trace, numeric_only)
        machine = _client_machine(hop, wire_host, next_port)
        if carry:
            machine.receive_data(carry)  # type: ignore[attr-defined]

        def on_event(event: Event) -> None:
            trace(f"{prefix}: {event.describe()} after {(clock() - step_started) * 1000:.1f} ms")

        established = run_handshake(
            sock, machine, deadline=deadline, clock=clock, exact=exact, on_event=on_event,
            diagnose=None if hop.tls else diagnose, silence_s=SILENT_PROXY_PROBE_S,
        )
    except ProxyError as exc:
        exc.message = f"{exc.message} for {format_hostport(next_host, next_port)}"
        exc.where = where
        raise
    except HopcatError as exc:
        if isinstance(exc, HopcatTimeoutError) and timeout_label:
            exc.message = f"{exc.message} ({timeout_label})"
        exc.where = where
        raise
    bound = ""
    if established.bound_host is not None:
        bound = f", bound {format_hostport(established.bound_host, established.bound_port or 0)}"
    trace(
        f"{prefix}: CONNECT {format_hostport(wire_host, next_port)}: "
        f"{established.detail}{bound} in {(clock() - step_started) * 1000:.1f} ms"
    )
    return sock, machine.trailing_data  # type: ignore[attr-defined]
