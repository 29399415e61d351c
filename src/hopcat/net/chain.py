"""Open a tunnel to host:port through a chain of proxies, hop by hop, under one deadline.

The TCP connection goes to the first proxy; each proxy is then asked to connect to the next one
(or, at the last hop, to the target), over the same socket. An ``https://`` hop wraps the socket
in TLS before its CONNECT; everything after it rides inside that TLS session.

Names: a target name goes to the proxy (remote DNS) whenever that hop's protocol can carry one
(SOCKS4a, SOCKS5, HTTP) unless ``proxy_dns`` says "local" (resolve here, send the address) or
"both" (resolve here, fall back to sending the name). SOCKS4 cannot carry names, so its targets
are always resolved here.

Errors name the hop: ``proxy socks5://127.0.0.1:1080 (hop 1/2): host unreachable (reply 4) for
git.example:22``.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket
import time

from hopcat._endpoint import format_hostport, is_ip_literal
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
from hopcat.net.dial import dial_tcp, resolve
from hopcat.net.drive import run_handshake

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hopcat._url import ProxyURL


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


def _wrap_tls(
    sock: socket.socket, hop: ProxyURL, cafile: str | None, insecure: bool, deadline: float,
    clock: Callable[[], float],
) -> socket.socket:
    import socket as socket_module  # ssl wants the full socket class; only TLS chains pay for it
    import ssl

    sock = socket_module.socket(fileno=sock.detach())
    context = ssl.create_default_context(cafile=cafile)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    sock.settimeout(max(0.001, deadline - clock()))
    try:
        wrapped = context.wrap_socket(sock, server_hostname=hop.host)
    except ssl.SSLCertVerificationError as exc:
        raise RemoteProtocolError(
            f"TLS certificate not trusted: {exc.verify_message} "
            "(--proxy-cacert FILE to trust its CA, --proxy-insecure to skip the check)"
        ) from None
    except ssl.SSLError as exc:
        raise ProtocolError(f"TLS handshake failed: {exc.reason or exc}") from None
    except TimeoutError:
        raise HopcatTimeoutError("no TLS handshake before the connect timeout") from None
    wrapped.settimeout(None)
    return wrapped


def _target_for_hop(
    hop: ProxyURL, host: str, port: int, proxy_dns: str, family: int, deadline: float,
    clock: Callable[[], float], trace: Callable[[str], None],
) -> str:
    """The address or name this hop is asked to connect to."""
    if is_ip_literal(host):
        return host
    local = proxy_dns in ("local", "both") or not hop.carries_names
    if not local:
        return host
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
    count = len(hops)
    first = hops[0]
    where = f"proxy {first.label()} (hop 1/{count})"
    started = clock()
    trace(f"hop 1/{count}: {first.label()}" + (f" (from {first.origin})" if first.origin else ""))
    try:
        sock = dial_tcp(
            first.host, first.port, deadline=deadline, family=family, source=source,
            nodelay=nodelay, keepalive=keepalive, trace=trace, clock=clock,
            timeout_label=timeout_label,
        )
    except ConnectError as exc:
        raise ProxyUnreachableError(f"unreachable: {exc.message}", where=where) from None
    except HopcatError as exc:
        exc.where = where
        raise
    trace(f"hop 1/{count}: TCP connected in {(clock() - started) * 1000:.1f} ms")

    carry = b""
    tls = False
    try:
        for index, hop in enumerate(hops):
            number = index + 1
            where = f"proxy {hop.label()} (hop {number}/{count})"
            if index:
                trace(f"hop {number}/{count}: {hop.label()}" + (f" (from {hop.origin})" if hop.origin else ""))
            next_host, next_port = (hops[index + 1].host, hops[index + 1].port) if number < count else (host, port)
            shown_target = format_hostport(next_host, next_port)
            try:
                step_started = clock()
                if hop.tls:
                    sock = _wrap_tls(sock, hop, cafile, insecure, deadline, clock)
                    tls = True
                    trace(f"hop {number}/{count}: TLS {sock.version()} in {(clock() - step_started) * 1000:.1f} ms")  # type: ignore[attr-defined]
                    step_started = clock()
                wire_host = _target_for_hop(hop, next_host, next_port, proxy_dns, family, deadline, clock, trace)
                machine = _client_machine(hop, wire_host, next_port)
                if carry:
                    machine.receive_data(carry)  # type: ignore[attr-defined]

                def on_event(event: object, number: int = number, since: float = step_started) -> None:
                    trace(f"hop {number}/{count}: {event!r} after {(clock() - since) * 1000:.1f} ms")

                established = run_handshake(
                    sock, machine, deadline=deadline, clock=clock, exact=exact and not tls,
                    on_event=on_event,
                )
            except ProxyError as exc:
                exc.message = f"{exc.message} for {shown_target}"
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
                f"hop {number}/{count}: CONNECT {format_hostport(wire_host, next_port)}: "
                f"{established.detail}{bound} in {(clock() - step_started) * 1000:.1f} ms"
            )
            carry = machine.trailing_data  # type: ignore[attr-defined]
    except BaseException:
        sock.close()
        raise
    return Tunnel(sock, carry, tls)
