"""The hop-by-hop plan of a tunnel, without I/O: one engine under the CLI, the library and the
server.

``tunnel_plan`` is a generator. It decides everything protocol-specific (which hop is asked for
what, where a name is resolved, when TLS starts, how many bytes a read may take so that nothing
past the handshake is consumed, how an error is labelled with its hop, how a proxy of the wrong
kind is recognised) and yields *steps* for a driver to carry out on its own I/O model::

    Dial(host, port)            TCP to the first hop (the driver's Happy Eyeballs); -> the
                                connection's address family (None: not told)
    Resolve(host, port, family) a local lookup; -> list of getaddrinfo tuples
    Send(data)                  -> None
    Receive(size, peek, quiet_s)
                                at most ``size`` bytes (b"" at EOF); with ``peek`` leave them
                                queued (MSG_PEEK). With ``quiet_s``, None when nothing arrived
                                in that time (the plan then looks closer and asks again).
    StartTLS(server_name, label, quiet_s, again)
                                a TLS session with the hop ``label`` inside any before it;
                                -> the TLS version, or None if quiet (``again``: go on with the
                                handshake begun by the last StartTLS)
    Probe(data)                 a second connection to the first hop: the first bytes it
                                answers to ``data`` (b"" when none; never an error)
    Call(function, args)        ``function(*args)`` where blocking is allowed (the asyncio
                                driver runs it in a thread): GSSAPI, which may ask a KDC;
                                -> its result (it never raises)

``Dial`` may come again: an HTTP proxy that closes after its 407 gets its answer on a new
connection (``hopcat.net.proxy_auth``), so the driver closes the old one (TLS sessions included)
and the plan crosses the hops before that proxy again.

A driver answers with ``generator.send(result)`` and reports a failure by throwing the exception
into the generator (``TimeoutError`` when its deadline passed, the OSError it got): the plan
turns it into the right HopcatError for the phase and hop. The generator's return value is an
``Opened``. Drivers: ``hopcat.net.chain`` (blocking sockets and poll, for the CLI and the sync
API) and ``hopcat.aio`` (asyncio). One deadline spans the whole plan; drivers enforce it on
every step, so no step can stretch it.

Names: a target name goes to the proxy (remote DNS) whenever that hop's protocol can carry one
(SOCKS4a, SOCKS5, HTTP) unless ``proxy_dns`` says "local" (resolve here, send the address),
"both" (resolve here, fall back to sending the name) or "none" (ncat's: addresses only, names are
refused). SOCKS4 cannot carry names, so its targets are resolved here. ``numeric_only`` (-n)
forbids every lookup here. A scoped IPv6 target (``fe80::1%eth0``) is refused: the zone names
one of our interfaces, not the proxy's.

Exact reads (``exact``): when the connection is handed to someone else afterwards (ssh with
ProxyUseFdpass, a library caller), no byte after the handshake may be consumed. SOCKS replies
have known sizes; an HTTP head is peeked and only its own bytes taken. Through TLS nothing can be
peeked, so the head is read in pieces too short to pass its end: one byte after a line feed (the
next could end the head), two otherwise.

Wrong scheme: a proxy of another protocol either answers at once (its first byte names it),
closes, or waits silently for the rest of a request it cannot parse (an HTTP proxy given a SOCKS5
greeting or a TLS ClientHello waits for a line feed). When the first proxy closes without a byte,
or stays silent for ``SILENT_PROXY_PROBE_S`` where any proxy of the expected kind answers at once,
``Probe`` steps ask it in the protocol it probably speaks, and the error names the scheme to use.
The first connection is left alone, so a merely slow proxy is never disturbed.

Errors name the hop: ``proxy socks5://127.0.0.1:1080 (hop 1/2): host unreachable (reply 4) for
git.example:22``.

UDP (``udp``, RFC 1928 section 7): the last hop is asked UDP ASSOCIATE instead of CONNECT,
announcing the given address as where the datagrams will come from; every hop before it is asked
a CONNECT to the next as usual, so the chain carries the control connection only. A last hop that
is not SOCKS5 is refused before anything is dialled. The target is never sent in the handshake:
it goes into each datagram's header, as a name or as an address resolved here by the same
``proxy_dns`` rules as a CONNECT's (``Opened.target``); ``Opened.relay`` is the relay address the
proxy answered (its bound address, possibly 0.0.0.0 or :: for "my own address"). Given a host
of "", the request announces "not known": 0.0.0.0:0, or [::]:0 where the last hop is reached over
IPv6 (the first hop's connection, or a last hop given as an IPv6 literal), since Dante refuses an
announced address of a family its connection with the client does not have (reply 8).
"""

from __future__ import annotations

from _socket import AF_INET6  # its value differs between systems; _socket costs no import time

from hopcat._endpoint import format_hostport, is_ip_literal, split_scope
from hopcat._url import PROXY_DNS_POLICIES
from hopcat.errors import (
    ConnectError,
    HopcatError,
    HopcatTimeoutError,
    ProxyError,
    ProxyUnreachableError,
    RemoteProtocolError,
    ResolveError,
    UsageError,
)
from hopcat.proto import client_machine
from hopcat.proto._events import AuthChallenge, Established, NeedData
from hopcat.proto._machine import check_host, check_port

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence
    from typing import Any

    from hopcat._url import ProxyURL
    from hopcat.net.proxy_auth import HopAuth
    from hopcat.proto._machine import ClientMachine

    Plan = Generator["Step", Any, "Opened"]
    SubPlan = Generator["Step", Any, Any]

AF_UNSPEC = 0
AF_INET = 2
READ_BYTES = 65536
# How to get past an untrusted TLS hop certificate: the client's options.
TLS_OPTIONS = "--proxy-cacert FILE to trust its CA, --proxy-insecure to skip the check"
# Any SOCKS5 proxy answers a greeting, and any TLS server a ClientHello, without asking anyone
# else: silence this long is worth a look on a second connection (which costs the proxy nothing).
SILENT_PROXY_PROBE_S = 1.5
# What the look sends: a request every HTTP proxy answers at once without connecting anywhere
# (RFC 9110 section 9.3.7), and a SOCKS5 greeting offering "no authentication".
HTTP_PROBE = b"OPTIONS * HTTP/1.0\r\n\r\n"
SOCKS5_PROBE = b"\x05\x01\x00"
# What we sent first, per expected protocol, for the message.
_FIRST_MESSAGE = {"socks5": "SOCKS5 greeting", "socks4": "SOCKS4 request", "tls": "TLS handshake",
                  "http": "CONNECT request"}  # fmt: skip


# -- steps ------------------------------------------------------------------------------------
class Step:
    __slots__ = ()


class Dial(Step):
    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


class Resolve(Step):
    __slots__ = ("family", "host", "port")

    def __init__(self, host: str, port: int, family: int) -> None:
        self.host = host
        self.port = port
        self.family = family


class Send(Step):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Receive(Step):
    __slots__ = ("peek", "quiet_s", "size")

    def __init__(self, size: int, *, peek: bool = False, quiet_s: float = 0.0) -> None:
        self.size = size
        self.peek = peek
        self.quiet_s = quiet_s


class StartTLS(Step):
    __slots__ = ("again", "label", "quiet_s", "server_name")

    def __init__(
        self, server_name: str, *, label: str = "", quiet_s: float = 0.0, again: bool = False
    ) -> None:
        self.server_name = server_name
        self.label = label
        self.quiet_s = quiet_s
        self.again = again


class Probe(Step):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Call(Step):
    __slots__ = ("args", "function")

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function = function
        self.args = args


# -- outcome ----------------------------------------------------------------------------------
class HopInfo:
    """What one hop did: its redacted label, the address it reported binding, ms per phase."""

    __slots__ = ("bound", "connect_ms", "handshake_ms", "label", "tls_ms", "tls_version")

    def __init__(self, label: str) -> None:
        self.label = label
        self.bound: tuple[str, int] | None = None
        self.connect_ms: float | None = None  # TCP to this hop (first hop only)
        self.tls_ms: float | None = None
        self.tls_version: str | None = None
        self.handshake_ms = 0.0

    def __repr__(self) -> str:
        return f"HopInfo({self.label!r}, bound={self.bound}, handshake_ms={self.handshake_ms:.1f})"


class Opened:
    """The plan's result: target bytes that came with the last reply, whether the connection
    now runs inside TLS (a TLS hop), and per-hop information. For a UDP association, ``relay``
    is the relay's address from the last reply and ``target`` the destination as the datagram
    headers name it (a name, or the address it was resolved to here); both None otherwise."""

    __slots__ = ("hops", "relay", "target", "tls", "trailing")

    def __init__(
        self, trailing: bytes, tls: bool, hops: tuple[HopInfo, ...], *,
        relay: tuple[str, int] | None = None, target: tuple[str, int] | None = None,
    ) -> None:  # fmt: skip
        self.trailing = trailing
        self.tls = tls
        self.hops = hops
        self.relay = relay
        self.target = target


# -- the plan ---------------------------------------------------------------------------------
UDP_NEEDS_SOCKS5 = "UDP goes through SOCKS5 only: HTTP CONNECT and SOCKS4 carry TCP"


def check_chain(hops: Sequence[ProxyURL], proxy_dns: str, *, udp: bool = False) -> None:
    """Refuse what no driver could carry out, before anything is sent."""
    if not hops:
        raise UsageError("a tunnel needs at least one proxy")
    if proxy_dns not in PROXY_DNS_POLICIES:
        raise UsageError(f"--proxy-dns must be one of {', '.join(PROXY_DNS_POLICIES)}")
    if udp and hops[-1].protocol != "socks5":
        error = UsageError(f"{UDP_NEEDS_SOCKS5}; the last proxy must be socks5:// or socks5h://")
        _locate(error, hops, len(hops) - 1)
        raise error


def tunnel_plan(
    hops: Sequence[ProxyURL],
    host: str,
    port: int,
    *,
    proxy_dns: str = "remote",
    family: int = AF_UNSPEC,
    numeric_only: bool = False,
    exact: bool = False,
    headers: list[tuple[str, str]] | None = None,
    trace: Callable[[str], None] | None = None,
    clock: Callable[[], float],
    timeout_label: str = "",
    tls_options: str = TLS_OPTIONS,
    udp: tuple[str, int] | None = None,
) -> Plan:
    """Steps that open host:port through ``hops``; see the module docstring. ``trace`` gets the
    -v timeline's lines (None: nothing is formatted, which a library's opens care about).
    ``tls_options``: the caller's options to trust a TLS hop's CA or skip the check (a
    certificate failure's hint: the client's by default, ``hopcat serve`` has its own).
    ``udp``: ask the last hop (SOCKS5) for a UDP association to host:port instead, announcing
    this address as the datagrams' source (``("", 0)``: not known, see the module docstring)."""
    check_chain(hops, proxy_dns, udp=udp is not None)
    count = len(hops)
    infos = tuple(HopInfo(hop.label()) for hop in hops)
    # Whatever can be refused without the network is refused before hop 1 is dialled: a chain
    # must not greet and use its first hops for a request its last one could never send.
    for index, hop in enumerate(hops):
        last = index + 1 == count
        next_host, next_port = (host, port) if last else (hops[index + 1].host, hops[index + 1].port)
        try:
            _check_next(hop, next_host, next_port, proxy_dns, numeric_only)
        except HopcatError as exc:
            _locate(exc, hops, index)
            raise
    first = hops[0]
    if trace is not None:
        origin = f" (from {first.origin})" if first.origin else ""
        trace(f"hop 1/{count}: {first.label()}{origin}")
    started = clock()
    dialled = yield from _dial_first(hops, timeout_label)
    infos[0].connect_ms = (clock() - started) * 1000
    if trace is not None:
        trace(f"hop 1/{count}: TCP connected in {infos[0].connect_ms:.1f} ms")
    auths = _hop_auths(hops, headers, trace, count)
    connections = 1
    carry = b""
    index = 0
    try:
        while index < count:
            tls = any(hop.tls for hop in hops[: index + 1])
            try:
                crossed = yield from _cross_hop(
                    hops, infos[index], index, host, port, carry, proxy_dns=proxy_dns,
                    family=family, numeric_only=numeric_only, exact=exact, tls=tls,
                    headers=headers, trace=trace, clock=clock, tls_options=tls_options,
                    auth=auths[index], connections=connections,
                    udp=None if udp is None else _announced(udp, hops, dialled),
                )  # fmt: skip
            except (HopcatError, TimeoutError) as caught:
                # A bare TimeoutError is a driver's deadline at a step no phase below turns into
                # its own error (a probe of a proxy silent in its TLS handshake): it still gets
                # its hop.
                error = caught if isinstance(caught, HopcatError) else HopcatTimeoutError(
                    "timed out before the proxy answered"
                )  # fmt: skip
                if isinstance(error, HopcatTimeoutError) and timeout_label:
                    error.message = f"{error.message} ({timeout_label})"
                _locate(error, hops, index)
                if error is caught:
                    raise
                raise error from None
            if crossed is not None:
                carry = crossed
                index += 1
                continue
            # The proxy closed after its 407: its answer goes on a new connection, through the
            # hops before it again.
            connections += 1
            if trace is not None:
                trace(f"hop {index + 1}/{count}: connecting again for the answer "
                      f"(TCP connection {connections})")  # fmt: skip
            dialled = yield from _dial_first(hops, timeout_label)
            carry = b""
            index = 0
    finally:
        for auth in auths:
            if auth is not None:
                auth.close()
    relay = target = None
    if udp is not None:
        relay = infos[-1].bound or ("0.0.0.0", 0)
        try:
            wire_host = yield from _target_for_hop(
                hops[-1], host, port, proxy_dns, family, numeric_only, trace
            )
        except HopcatError as exc:
            _locate(exc, hops, count - 1)
            raise
        target = (wire_host, port)
    return Opened(carry, any(hop.tls for hop in hops), infos, relay=relay, target=target)


def _announced(
    udp: tuple[str, int], hops: Sequence[ProxyURL], dialled: int | None
) -> tuple[str, int]:
    """The source a UDP ASSOCIATE announces: ``udp``, or for a host of "" (not known) the
    unspecified address of the family the last hop is reached over, where that is known."""
    if udp[0]:
        return udp
    if len(hops) == 1:
        v6 = dialled == AF_INET6
    else:
        v6 = is_ip_literal(hops[-1].host) and ":" in hops[-1].host
    return ("::" if v6 else "0.0.0.0", udp[1])


def _dial_first(hops: Sequence[ProxyURL], timeout_label: str) -> SubPlan:
    """TCP to the first hop, its failures labelled with it; the connection's family (or None)."""
    first = hops[0]
    try:
        family: int | None = yield Dial(first.host, first.port)
        return family
    except ConnectError as exc:
        unreachable = ProxyUnreachableError(f"unreachable: {exc.message}", errno=exc.errno)
        _locate(unreachable, hops, 0)
        raise unreachable from None
    except HopcatError as exc:
        _locate(exc, hops, 0)
        raise
    except TimeoutError:
        # The asyncio driver's deadline (asyncio.timeout) ended the dial, not the dialer's own.
        label = f" ({timeout_label})" if timeout_label else ""
        timeout = HopcatTimeoutError(
            f"connect to {format_hostport(first.host, first.port)}: timed out{label}"
        )
        _locate(timeout, hops, 0)
        raise timeout from None
    except OSError as exc:  # e.g. the first hop reset right after accepting (getpeername)
        unreachable = ProxyUnreachableError(f"unreachable: {_describe(exc)}", errno=exc.errno)
        _locate(unreachable, hops, 0)
        raise unreachable from None


def _hop_auths(
    hops: Sequence[ProxyURL], headers: list[tuple[str, str]] | None,
    trace: Callable[[str], None] | None, count: int,
) -> list[HopAuth | None]:  # fmt: skip
    """An authentication state per HTTP hop; none where the caller sends its own
    Proxy-Authorization header (its 407 is then the caller's to read)."""
    own = any(name.lower() == "proxy-authorization" for name, _ in headers or ())
    if own or not any(hop.protocol == "http" for hop in hops):
        return [None] * len(hops)
    from hopcat.net.proxy_auth import HopAuth

    auths: list[HopAuth | None] = []
    for index, hop in enumerate(hops):
        hop_trace = None
        if trace is not None:
            hop_trace = _prefixed(trace, f"hop {index + 1}/{count}: ")
        auths.append(HopAuth(hop, trace=hop_trace) if hop.protocol == "http" else None)
    return auths


def _prefixed(trace: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: trace(prefix + line)


def _locate(exc: HopcatError, hops: Sequence[ProxyURL], index: int) -> None:
    """Label ``exc`` with the hop it happened at: for its message and as fields."""
    hop = hops[index]
    exc.where = f"proxy {hop.label()} (hop {index + 1}/{len(hops)})"
    exc.hop = index + 1
    exc.proxy = hop.label()


def _cross_hop(
    hops: Sequence[ProxyURL], info: HopInfo, index: int, host: str, port: int, carry: bytes, *,
    proxy_dns: str, family: int, numeric_only: bool, exact: bool, tls: bool,
    headers: list[tuple[str, str]] | None, trace: Callable[[str], None] | None,
    clock: Callable[[], float], tls_options: str, auth: HopAuth | None, connections: int,
    udp: tuple[str, int] | None = None,
) -> SubPlan:  # fmt: skip
    """Ask hop ``index`` for the next hop (or the target, or with ``udp`` a UDP association);
    return the bytes that came after, or None when the hop's answer to a 407 must go on a new
    connection (``auth.pending``)."""
    count = len(hops)
    hop = hops[index]
    prefix = f"hop {index + 1}/{count}"
    if index and trace is not None:
        trace(f"{prefix}: {hop.label()}" + (f" (from {hop.origin})" if hop.origin else ""))
    last = index + 1 == count
    next_host, next_port = (host, port) if last else (hops[index + 1].host, hops[index + 1].port)
    # Only the first hop can be looked at on a second connection: later ones sit behind others.
    expected = ("tls" if hop.tls else hop.protocol) if index == 0 else None
    step_started = clock()
    if hop.tls:
        info.tls_version = yield from _start_tls(hop, expected, tls_options)
        info.tls_ms = (clock() - step_started) * 1000
        if trace is not None:
            trace(f"{prefix}: TLS {info.tls_version} in {info.tls_ms:.1f} ms")
        step_started = clock()
        expected = None  # the TLS handshake showed the scheme is right
    associate = last and udp is not None
    if udp is not None and associate:
        # The request names where datagrams will come from; the target goes in each one.
        wire_host, wire_port = udp
    else:
        wire_port = next_port
        wire_host = yield from _target_for_hop(
            hop, next_host, next_port, proxy_dns, family, numeric_only, trace
        )
    machine: ClientMachine
    if associate:
        from hopcat.proto.socks5 import Command, Socks5Client

        machine = Socks5Client(wire_host, wire_port, username=hop.username,
                               password=hop.password, command=Command.UDP_ASSOCIATE)  # fmt: skip
    elif auth is not None:
        from hopcat.proto.http_connect import HttpConnectClient

        http = machine = HttpConnectClient(
            wire_host, next_port, headers=headers, authorization=auth.first_authorization(),
            challenges=True,
        )  # fmt: skip
    else:
        machine = client_machine(
            "socks4a" if hop.plain_scheme == "socks4a" else hop.protocol, wire_host, next_port,
            username=hop.username, password=hop.password,
            headers=headers if hop.protocol == "http" else None,
        )  # fmt: skip
    if carry:
        machine.receive_data(carry)

    on_event: Callable[[str], None] | None = None
    if trace is not None:
        tracer = trace

        def on_event(description: str) -> None:
            tracer(f"{prefix}: {description} after {(clock() - step_started) * 1000:.1f} ms")

    try:
        while True:
            outcome = yield from _handshake(machine, exact=exact, tls=tls, expected=expected,
                                            on_event=on_event)  # fmt: skip
            if isinstance(outcome, Established):
                break
            assert auth is not None
            if on_event is not None:
                on_event(outcome.describe())
            expected = None  # it answered as an HTTP proxy
            target = format_hostport(check_host(wire_host)[1], next_port)
            answer = yield from auth.answer(outcome, target)
            if not outcome.reusable:
                auth.pending = answer
                return None
            http.retry(answer)
    except ProxyError as exc:
        what = "for UDP to" if associate else "for"
        exc.message = f"{exc.message} {what} {format_hostport(next_host, next_port)}"
        raise
    established = outcome
    info.handshake_ms = (clock() - step_started) * 1000
    if established.bound_host is not None:
        info.bound = (established.bound_host, established.bound_port or 0)
    scheme = auth.established() if auth is not None else None
    if trace is not None:
        how = ""
        if scheme is not None:
            plural = "s" if connections > 1 else ""
            how = f" ({scheme}, {connections} TCP connection{plural})"
        bound = f", bound {format_hostport(*info.bound)}" if info.bound else ""
        command = "UDP ASSOCIATE from" if associate else "CONNECT"
        trace(
            f"{prefix}: {command} {format_hostport(wire_host, wire_port)}: "
            f"{established.detail}{bound} in {info.handshake_ms:.1f} ms{how}"
        )
    return machine.trailing_data


def _start_tls(hop: ProxyURL, expected: str | None, tls_options: str) -> SubPlan:
    # A certificate names the address, never this host's zone of it.
    name = split_scope(hop.host)[0] or hop.host
    quiet_s = SILENT_PROXY_PROBE_S if expected else 0.0
    again = False
    while True:
        try:
            version = yield StartTLS(name, label=f"proxy {hop.label()}", quiet_s=quiet_s,
                                     again=again)  # fmt: skip
        except TimeoutError:
            raise HopcatTimeoutError("no TLS handshake before the connect timeout") from None
        except OSError as exc:
            verify_message = getattr(exc, "verify_message", None)
            if verify_message is not None:
                raise RemoteProtocolError(
                    f"TLS certificate not trusted: {verify_message} ({tls_options})"
                ) from None
            # A reset, an EOF or garbage where a ServerHello belongs: perhaps not a TLS server.
            if expected:
                yield from _diagnose(expected, "closed")
            why = getattr(exc, "reason", None) or _describe(exc)
            raise RemoteProtocolError(f"TLS handshake failed: {why}") from None
        if version is not None:
            return version
        assert expected is not None
        yield from _diagnose(expected, "silent")
        quiet_s = 0.0
        again = True


def _handshake(
    machine: ClientMachine, *, exact: bool, tls: bool, expected: str | None,
    on_event: Callable[[str], None] | None,
) -> SubPlan:  # fmt: skip
    """Run ``machine`` to Established (or, for an HTTP hop answering 407s, an AuthChallenge)
    over the driver's connection; return that event."""
    answered = False
    tail = b""  # the last bytes fed to the machine, for reads that cannot pass an HTTP head
    try:
        if data := machine.data_to_send():
            yield Send(data)
        while True:
            event = machine.next_event()
            if data := machine.data_to_send():
                yield Send(data)
            if isinstance(event, NeedData):
                quiet_s = SILENT_PROXY_PROBE_S if expected and not answered else 0.0
                chunk = yield from _read(machine, exact=exact, tls=tls, tail=tail, quiet_s=quiet_s)
                if chunk is None:  # silent for quiet_s
                    assert expected is not None
                    yield from _diagnose(expected, "silent")
                    chunk = yield from _read(machine, exact=exact, tls=tls, tail=tail)
                assert chunk is not None  # only a quiet read answers None
                if not chunk and not answered and expected:
                    yield from _diagnose(expected, "closed")
                answered = True
                tail = (tail + chunk)[-2:]
                machine.receive_data(chunk)
                continue
            if isinstance(event, Established | AuthChallenge):
                return event
            if on_event is not None:
                on_event(event.describe())
    except HopcatError:
        raise
    except TimeoutError:
        raise HopcatTimeoutError("no answer from the proxy before the connect timeout") from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        if expected and not answered:
            yield from _diagnose(expected, "closed")
        raise RemoteProtocolError(
            f"the proxy reset the connection during the handshake ({_describe(exc)})"
        ) from None
    except OSError as exc:  # EHOSTUNREACH or ETIMEDOUT mid-handshake; ssl.SSLError on a TLS hop
        # An SSLError's errno is the TLS library's code, not an errno: show its reason.
        why = getattr(exc, "reason", None) or _describe(exc)
        raise RemoteProtocolError(
            f"the connection to the proxy failed during the handshake ({why})"
        ) from None


def _read(
    machine: ClientMachine, *, exact: bool, tls: bool, tail: bytes, quiet_s: float = 0.0
) -> Generator[Step, Any, bytes | None]:
    """The next bytes for ``machine``: whatever came (relay), or exactly the handshake's own."""
    if not exact:
        chunk: bytes | None = yield Receive(READ_BYTES, quiet_s=quiet_s)
        return chunk
    needed = machine.bytes_needed()
    if needed is not None:  # framed (SOCKS): exactly the rest of the awaited message
        chunk = yield Receive(needed, quiet_s=quiet_s)
        return chunk
    if tls:
        # No peeking through TLS: read less than could complete the head's end (LF LF at least).
        chunk = yield Receive(1 if tail.endswith((b"\n", b"\n\r")) else 2, quiet_s=quiet_s)
        return chunk
    peeked: bytes | None = yield Receive(READ_BYTES, peek=True, quiet_s=quiet_s)
    if not peeked:
        return peeked
    size: int = machine.handshake_prefix_len(peeked)
    chunk = yield Receive(size)
    return chunk


def _target_for_hop(
    hop: ProxyURL, host: str, port: int, proxy_dns: str, family: int, numeric_only: bool,
    trace: Callable[[str], None] | None,
) -> SubPlan:  # fmt: skip
    """The address or name this hop is asked to connect to (``_check_next`` has passed it)."""
    if is_ip_literal(host) or not _resolved_here(hop, proxy_dns):
        return host
    try:
        infos = yield Resolve(host, port, family)
    except TimeoutError:  # the asyncio driver's deadline; the blocking resolver raises its own
        raise HopcatTimeoutError(f"resolve {host}: timed out") from None
    except ResolveError:
        if proxy_dns == "both" and hop.carries_names:
            if trace is not None:
                trace(f"resolve {host} locally failed; sending the name to the proxy "
                      "(--proxy-dns both)")  # fmt: skip
            return host
        raise
    if not hop.carries_names:
        infos = [info for info in infos if info[0] == AF_INET]
        if not infos:
            raise ResolveError(
                f"resolve {host}: no IPv4 address, and SOCKS4 carries only IPv4 (use socks4a://)"
            )
    address = str(infos[0][4][0])
    if trace is not None:
        trace(f"resolved {host} locally: {address}")
    return address


def _resolved_here(hop: ProxyURL, proxy_dns: str) -> bool:
    return proxy_dns in ("local", "both") or not hop.carries_names


def _check_next(
    hop: ProxyURL, host: str, port: int, proxy_dns: str, numeric_only: bool
) -> None:
    """Refuse what ``hop`` could never be asked for: a bad name or port for its wire format (too
    long, CR/LF, a space), a scoped address, a name where only addresses may go."""
    if split_scope(host)[0]:
        raise UsageError(
            f"{host}: a scoped address names an interface of this host, which means nothing to a "
            "proxy; give the address without its %zone if the proxy shares that link"
        )
    check_host(host)
    check_port(port)
    if is_ip_literal(host):
        return
    if proxy_dns == "none":
        raise UsageError(f"{host}: --proxy-dns none sends only addresses, and this is a name")
    if numeric_only and _resolved_here(hop, proxy_dns):
        why = (f"--proxy-dns {proxy_dns} resolves them here" if hop.carries_names
               else "SOCKS4 carries only addresses (socks4a:// sends the name)")  # fmt: skip
        raise UsageError(f"{host}: -n forbids looking up names here, and {why}")


# -- telling a proxy of the wrong kind --------------------------------------------------------
def _diagnose(expected: str, what: str) -> SubPlan:
    """``what`` is "silent" or "closed"; raise a better error, or return to go on as before."""
    if what == "silent" and expected == "http":
        return  # its answer waits for the proxy's connect to the target: silence proves nothing
    # A SOCKS4 answer also waits for the target; a proxy that answers a SOCKS5 greeting as well
    # speaks SOCKS and is merely slow.
    if expected != "http" and (yield Probe(HTTP_PROBE))[:5] == b"HTTP/":
        merely_slow = (
            what == "silent" and expected == "socks4"
            and (yield Probe(SOCKS5_PROBE))[:1] == b"\x05"
        )  # fmt: skip
        if not merely_slow:
            kind = "plain HTTP" if expected == "tls" else "HTTP"
            raise _wrong_scheme(expected, what, kind, "http://")
    if what == "closed" and expected in ("http", "tls") and (
        (yield Probe(SOCKS5_PROBE))[:1] == b"\x05"
    ):
        raise _wrong_scheme(expected, what, "SOCKS5", "socks5h://")
    if what == "closed" and expected == "http":
        answer = yield Probe(_client_hello())
        if answer[:1] in (b"\x15", b"\x16"):  # TLS alert or handshake record
            raise _wrong_scheme(expected, what, "TLS", "https://")


def _wrong_scheme(expected: str, what: str, kind: str, scheme: str) -> RemoteProtocolError:
    first = _FIRST_MESSAGE[expected]
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


def _describe(exc: BaseException) -> str:
    from hopcat.net.dial import describe_oserror

    return describe_oserror(exc)
