"""One client connection, from accept to its log line: handshake, decision, connect, relay.

A ``Conn`` is driven by event-loop callbacks, not a coroutine: per connection that saves a task,
its frames and a future per wait, which is most of the cost of a short tunnel in Python (the
server's tunnels-per-second target). Its phases::

    HANDSHAKE --(Request allowed)--> CONNECTING --(connected)--> RELAY --(both halves done)--> CLOSED
        |                               |                          \\--(reset, idle timeout)--/
        +--(refused / bad bytes)--+-----+--(failure reply)
                                  v
                                LINGER --(client EOF, or LINGER_S)--> CLOSED

A --forward listener's Conn has no handshake and no machine: it starts in CONNECTING with its
fixed target (``fixed``, protocol "forward"), through the same ``connect_to`` as a Request, so
rules, -4/-6, --via, deadlines and logs are the proxy's; a refusal is the end of its stream
(LINGER without an answer), and success relays at once.

HANDSHAKE: the first byte picks the machine (``proto.detect``): SOCKS4/4a, SOCKS5 or HTTP
CONNECT. An HTTP request with another method (plain HTTP forwarding) passes the connection to a
``hopcat.server.forward.Forwarder`` once the machine has authenticated it (phase FORWARD); the
forwarder has each request's origin checked and dialled by ``connect_to``, the path a CONNECT
takes, and ``_established``/``refuse`` hand it the outcome. Every read is fed to the machine and whatever it queues is written back at once (a
handshake reply is a few bytes on a fresh socket: a client that does not take them is dropped).
``Credentials`` are checked against the credential store, ``DigestCredentials`` by
``server.digest`` with the store's HA1s (a stale nonce is answered with a fresh one, not counted
as a failed login), a ``Request`` against the destination rules. The client is not read while connecting: its reader stays registered (so that the relay
can take it over without a system call), and a wake-up meanwhile is looked at with MSG_PEEK.
Bytes sent early make it drop the registration; they wait in the kernel and reach the target
after the machine's ``trailing_data``. An end of stream with nothing before it, or a reset, is a
client that left: the connect (a dial, a lookup, an upstream open) is given up at once. (A
client that half-closes before its tunnel exists and sent nothing is taken as gone too: it could
only be waiting for a target that speaks first.)

CONNECTING: the host is taken in the form the resolver will see (IDNA, ``policy.resolver_form``);
an IP literal in any spelling getaddrinfo accepts is parsed by getaddrinfo itself
(AI_NUMERICHOST) and checked at once; a name is first checked on its own (a deny glob needs no
lookup), then resolved by ``getaddrinfo`` on a small thread pool (the only portable non-blocking
resolver; ``Server.lookup`` keeps each client to its share). Every address is checked against
the rules (``_decide``), and exactly the allowed sockaddrs are raced Happy-Eyeballs style
(``hopcat.aio._dial.Dialer``, RFC 8305: first address first, the next after 250 ms or at once
on a failure): no second lookup, so DNS rebinding cannot slip another address in. With
``--via`` the whole chain is opened on this loop by ``hopcat.server.upstream`` (the tunnel
engine's plan under the asyncio driver, within the client's fair share of upstream opens), for
the checked address when the last hop dials from this host and the rules needed the addresses,
else for the name; the target's bytes that came with the last proxy reply go to the client
first, and a SOCKS5 upstream's refusal (replies 2-6) is passed on to a SOCKS5 client. The reply
carries the target socket's local address (SOCKS) or is a 200 (HTTP).

With -4 or -6 (``Server.family``) only that family's addresses of a name are dialled (none
left: "dns-error"), and a literal of the other family is refused at once ("wrong-family").

Failures get the protocol's own answer: SOCKS5 reply 2 (rules), 3/4 (unreachable, name not
resolved, timeout), 5 (refused), 7 (BIND; UDP ASSOCIATE with --via or --no-udp), 8 (an address
-4/-6 excludes), 1 (anything else); SOCKS4 91; HTTP 403,
405 (methods other than CONNECT with --no-forward), 407 (credentials), 502, 503 (out of
descriptors), 504 (timeout); a request head the machine refuses gets the status of its error
(400 malformed, including a lower-case first letter and a CONNECT without a port, 414 an
overlong request line, 431 an overlong head, 505 another HTTP version) with the log line's
reason as a one-line body. A handshake given up for any other reason (its timeout, the server
stopping) is answered too, with the machine's ``abort_reply``. Then LINGER: our side is shut
down for writing and the
client's leftovers are read and dropped until it closes, so that closing with unread bytes does
not turn the answer into a reset before the client has read it.

UDP: a SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) makes an ``Association``
(``hopcat.server.udp``, which says what is relayed and checked) and answers with its relay
socket's address; the Conn then stays in phase UDP, reading the control connection only to see
it end. Its end (EOF, a reset) ends the association, and any end of the association (the UDP
idle timeout, the server stopping) closes the control connection. Bytes the client sends on it
meanwhile mean nothing in the RFC and are read and dropped. ``--via`` carries TCP only, so
there UDP ASSOCIATE gets reply 7, as with ``--no-udp``; ``--max-udp-per-client`` caps the
associations of one client address (reply 1 past it).

Deadlines (handshake, connect, linger) and the idle timeout are enforced by the server's periodic
sweep over ``deadline``/``active``, not by a timer per connection.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from hopcat._endpoint import format_hostport
from hopcat.aio._dial import Dialer
from hopcat.errors import ProtocolError, RemoteProtocolError
from hopcat.net.dial import interleave_families, main_errno
from hopcat.proto import server_machine
from hopcat.proto._events import NEED_DATA, Credentials, DigestCredentials, Rejected, Request
from hopcat.proto.detect import detect
from hopcat.server.policy import resolver_form
from hopcat.server.relay import DONE, Half, bound_buffers, reset_on_close

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import asyncio
    from collections.abc import Callable, Sequence
    from typing import Any

    from hopcat.net.dial import SockAddr
    from hopcat.proto._machine import ServerMachine
    from hopcat.server.forward import Forwarder
    from hopcat.server.serve import Server
    from hopcat.server.tls import Bridge, Terminator
    from hopcat.server.udp import Association
    from hopcat.server.upstream import Upstream

    # A dial's outcome: a connected socket, or the errno of every failed attempt.
    OnDialed = Callable[[socket.socket | None, list[int] | None], None]

HANDSHAKE_RECV_BYTES = 16384
LINGER_S = 2.0  # how long a refused client may take to read our answer and close
LINGER_MAX_BYTES = 1 << 20  # and how much it may send meanwhile
VIA_GRACE_S = 1.0  # an upstream open reports its own timeout, naming the hop; the backstop

# Phases.
HANDSHAKE = 1
CONNECTING = 2
RELAY = 3
LINGER = 4
CLOSED = 5
UDP = 6  # serving a UDP association; the control connection only watched for its end
FORWARD = 7  # forwarding plain HTTP requests (``hopcat.server.forward`` drives the sockets)

# result -> (SOCKS5 reply code, HTTP status). SOCKS4 has a single failure code, 91.
FAILURE_REPLIES: dict[str, tuple[int, int]] = {
    "denied": (2, 403),
    "net-unreachable": (3, 502),
    "unreachable": (4, 502),
    "dns-error": (4, 502),
    "timeout": (4, 504),
    "refused": (5, 502),
    "unsupported": (7, 405),
    "wrong-family": (8, 502),  # an address of the family -4/-6 excludes
    "auth-failed": (1, 407),
    "no-resources": (1, 503),
    "upstream-unreachable": (1, 502),
    "upstream-refused": (1, 502),
    "upstream-error": (1, 502),
    "error": (1, 502),
}
SOCKS4_FAILURE = 91
_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_FAMILY_FLAGS: dict[int, str] = {socket.AF_INET: "-4", socket.AF_INET6: "-6"}
# The HTTP status for a handshake given up by close(): why it ended -> what the client is told.
_ABORT_STATUS = {"protocol-error": 400, "handshake-timeout": 408, "shutdown": 503}

_CONNECT_ERRORS = {
    errno.ECONNREFUSED: "refused",
    errno.ENETUNREACH: "net-unreachable",
    errno.EHOSTUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.ETIMEDOUT: "timeout",
    errno.EMFILE: "no-resources",
    errno.ENFILE: "no-resources",
    errno.ENOBUFS: "no-resources",
    errno.ENOMEM: "no-resources",
    errno.EADDRNOTAVAIL: "no-resources",  # out of ephemeral ports
}
_FIRST_BYTE_HINTS = {
    0x16: " (a TLS handshake: an https:// or +tls client on a plain listener? TLS clients "
    "need a tls:// listen address)",
}


def strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def numeric_address(host: str, port: int) -> tuple[int, SockAddr] | None:
    """(family, sockaddr) when ``host`` is an IP literal in any spelling getaddrinfo accepts
    (``127.1``, ``0x7f000001``, ``fe80::1%eth0``): its own parser, so no spelling escapes the
    address rules. No lookup: AI_NUMERICHOST."""
    try:
        infos = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_NUMERICHOST
        )
    except (OSError, UnicodeError, ValueError):
        return None
    return infos[0][0], infos[0][4]


def wire_family(family: int, sockaddr: SockAddr) -> int:
    """The family a connect to ``sockaddr`` speaks on the wire, which -4/-6 are about: an
    IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is IPv4 there."""
    return socket.AF_INET if _mapped_ipv4(family, sockaddr) is not None else family


def _mapped_ipv4(family: int, sockaddr: SockAddr) -> str | None:
    if family == socket.AF_INET6 and str(sockaddr[0]).lower().startswith("::ffff:"):
        import ipaddress

        try:
            mapped = ipaddress.IPv6Address(str(sockaddr[0]).partition("%")[0]).ipv4_mapped
        except ValueError:
            return None
        return str(mapped) if mapped is not None else None
    return None


def compared_name(wire: str) -> str:
    """A name in the form rule globs are matched against (see hopcat.server.policy)."""
    return wire.lower().rstrip(".")


def _literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 when ``host`` is an IP literal's text, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """For a connection's event-loop callbacks (Conn's, the TLS pumps'): an exception (a
    bug) ends that connection with a log line instead of leaving it registered, where a
    level-triggered fd would call it again."""

    def callback(self: Conn, *args: object) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            self.crashed(exc)

    callback.__name__ = method.__name__
    callback.__doc__ = method.__doc__
    return callback


def _errors_result(failures: list[tuple[Any, int]]) -> tuple[str, str]:
    """The result for a failed dial and its reason, from the errno that explains it best."""
    code = main_errno([code for _sockaddr, code in failures])
    if code is None:
        return "unreachable", "no address to connect to"
    return _CONNECT_ERRORS.get(code, "error"), os.strerror(code).lower()


class Conn:
    """One client connection; see the module docstring."""

    __slots__ = (
        "_future",
        "_lingered",
        "_name",
        "active",
        "client_ip",
        "deadline",
        "dest",
        "dialer",
        "down",
        "fd",
        "fixed",
        "forward",
        "host",
        "idle_since",
        "machine",
        "peer",
        "phase",
        "port",
        "protocol",
        "reading",
        "reason",
        "requested",
        "result",
        "server",
        "sock",
        "started",
        "target",
        "tls",
        "udp",
        "up",
        "upstream",
        "upstream_code",
        "user",
        "via",
    )

    def __init__(
        self, server: Server, sock: socket.socket, peer: str, client_ip: str,
        tls: Terminator | None = None, fixed: tuple[str, int] | None = None,
    ) -> None:  # fmt: skip
        """``sock``: the client's socket, or with ``tls`` the Conn's end of its pair (see
        ``hopcat.server.tls``); ``peer``/``client_ip`` are the client's, from the accept;
        ``fixed``: the target of a --forward listener's connection."""
        self.server = server
        self.fixed = fixed
        self.sock = sock
        self.tls = tls
        self.fd = sock.fileno()
        self.peer = peer
        self.client_ip = client_ip
        self.started = server.loop.time()
        # The metrics' latencies: uvloop's clock has millisecond steps, cached per iteration.
        self.requested = time.monotonic()  # accepted, until the request is in
        self.deadline = self.started + server.handshake_timeout
        self.phase = HANDSHAKE
        self.machine: ServerMachine | None = None
        self.protocol: str | None = None
        self.user: str | None = None
        self.dest: str | None = None
        self.host = ""
        self.port = 0
        self.result: str | None = None
        self.reason: str | None = None
        self.target: _socket.socket | None = None
        self.dialer: Dialer | None = None
        self.upstream: Upstream | None = None  # the --via open under way
        self.via: Bridge | None = None  # a --via chain through TLS hops: target is its pair's end
        self._future: asyncio.Future[Any] | None = None  # the lookup under way
        self._name: str | None = None  # the destination name as rules compare it, once known
        self.up: Half | None = None
        self.down: Half | None = None
        self.reading = False
        self.active = False
        self.idle_since = self.started
        self.upstream_code: int | None = None
        self.udp: Association | None = None
        self.forward: Forwarder | None = None
        self._lingered = 0

    # -- handshake --------------------------------------------------------------------------
    def start(self) -> None:
        if self.fixed is not None:
            self.protocol = "forward"
            self.connect_to(*self.fixed)
            return
        # Under load the first bytes are usually there by the time we accept: try before waiting.
        self._on_handshake_readable()

    def _read_client(self, callback: Callable[[], None]) -> None:
        self.reading = True
        self.server.loop.add_reader(self.fd, callback)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fd)

    @guarded
    def _on_handshake_readable(self) -> None:
        if self.phase != HANDSHAKE:
            self._on_connecting_readable()
            return
        try:
            data = self.sock.recv(HANDSHAKE_RECV_BYTES)
        except BlockingIOError:
            if not self.reading:
                self._read_client(self._on_handshake_readable)
            return
        except OSError as exc:
            self.close("client-closed", f"during the handshake: {strerror(exc)}")
            return
        machine = self.machine
        if machine is None:
            if not data:
                self.close("client-closed", "closed before sending a request")
                return
            machine = self._pick_machine(data[0])
            if machine is None:
                return
        try:
            machine.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._advance()
        if self.phase == HANDSHAKE and not self.reading:
            self._read_client(self._on_handshake_readable)

    def _on_connecting_readable(self) -> None:
        """The client stirred while we connect. Bytes sent before our reply (optimistic data):
        stop reading; they wait in the kernel for the relay. Most clients send nothing early,
        and then the registration passes to the relay as it is (a callback swap, no system
        call), which is why it is not dropped when the request arrives. An EOF or a reset: the
        client has gone, and so does its connect."""
        try:
            early = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close("client-closed", f"while connecting: {strerror(exc)}")
            return
        if early:
            self._stop_reading()
        else:
            self.close("client-closed", "closed while connecting")

    def _pick_machine(self, first: int) -> ServerMachine | None:
        kind = detect(first)
        if kind is None:
            hint = _FIRST_BYTE_HINTS.get(first, "")
            self.close(
                "protocol-error",
                f"first byte 0x{first:02x} starts no SOCKS4, SOCKS5 or HTTP request{hint}",
            )
            return None
        server = self.server
        challenges = server.http_challenges() if kind == "http" and server.auth_required else None
        machine = server_machine(kind, require_auth=server.auth_required, http_challenges=challenges)
        self.protocol = kind
        self.machine = machine
        return machine

    def _advance(self) -> None:
        """Run the machine as far as the bytes so far allow, answering its events."""
        machine = self.machine
        assert machine is not None
        while self.phase == HANDSHAKE:
            try:
                event = machine.next_event()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            out = machine.data_to_send()
            if out and not self._send_handshake(out):
                return
            if event is NEED_DATA:
                return
            if isinstance(event, Credentials):
                self.user = event.username
                machine.accept_credentials(self.check_login(event))
            elif isinstance(event, DigestCredentials):
                self.user = event.username
                self._answer_digest(event)
            elif isinstance(event, Request):
                self._on_request(event)
                return
            elif isinstance(event, Rejected):
                reason = event.reason
                if self.result is None:
                    self.result, self.reason = _REJECTION_RESULTS[event.kind], reason
                self.linger(self.result, self.reason or reason)
                return

    def _answer_digest(self, answer: DigestCredentials) -> None:
        """Answer the machine's Digest credentials; a right password with an expired nonce gets
        a new nonce marked stale, so the client answers again."""
        from hopcat.proto.http_connect import HttpConnectServer
        from hopcat.server.digest import OK, STALE

        machine = self.machine
        assert isinstance(machine, HttpConnectServer)
        outcome = self.check_digest(answer)
        if outcome == OK:
            machine.accept_credentials(True)
        elif outcome == STALE:
            machine.accept_credentials(
                False, challenges=self.server.http_challenges(stale=True), reason=self.reason
            )
        else:
            machine.accept_credentials(False)

    def check_digest(self, answer: DigestCredentials) -> str:
        """``check_login`` for a Digest answer (see ``server.digest``): OK; STALE, a right
        password with an expired nonce, which is no failed login; or WRONG. ``reason`` says
        why unless OK. The handshake's and the forwarder's later requests' check."""
        from hopcat.server.digest import OK, STALE, WRONG

        digest = self.server.digest
        assert digest is not None
        if self._throttled():
            return WRONG
        outcome, reason = digest.check(answer, self.server.credentials.digest_ha1)
        if outcome == OK:
            self.server.logins.succeeded(self.client_ip)
        elif outcome == STALE:
            self.result, self.reason = "auth-failed", reason
        else:
            self._login_failed(reason)
        return outcome

    def _throttled(self) -> bool:
        """Whether this client failed too often lately: then it is refused without looking
        (see ``throttle``), so guessing goes no faster than the penalties."""
        wait_s = self.server.logins.penalty_left(self.client_ip, self.server.loop.time())
        if wait_s > 0:
            self.result = "auth-throttled"
            self.reason = f"too many failed logins from this client; refused unchecked for {wait_s:.0f} s"
            return True
        return False

    def check_login(self, credentials: Credentials) -> bool:
        """The password check, unless the client is throttled (``reason`` says why not)."""
        if self._throttled():
            return False
        server = self.server
        if server.credentials.check(credentials.username, credentials.password):
            server.logins.succeeded(self.client_ip)
            return True
        self._login_failed("wrong user name or password")
        return False

    def _login_failed(self, reason: str) -> None:
        server = self.server
        logins = server.logins
        self.result, self.reason = "auth-failed", reason
        penalty_s = logins.failed(self.client_ip, server.loop.time())
        if penalty_s:
            server.logger.log(
                "limit", client=self.client_ip, failures=logins.failures(self.client_ip),
                reason=f"failed logins: further logins from this client refused for {penalty_s:g} s",
            )  # fmt: skip

    def _send_handshake(self, data: bytes) -> bool:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close("client-closed", f"during the handshake: {strerror(exc)}")
            return False
        if sent < len(data):
            # A handshake answer is tens of bytes on a fresh connection: only a client that
            # stuffed our send buffer without reading gets here.
            self.close("protocol-error", "the client does not read its answers")
            return False
        return True

    def _protocol_error(self, exc: ProtocolError) -> None:
        # The protocol's refusal first (SOCKS5 general failure or its auth equivalents, SOCKS4
        # 91, HTTP 400): a client that half-closed early still reads why.
        self._send_abort_reply(400)
        if isinstance(exc, RemoteProtocolError) and exc.peer_closed:
            self.close("client-closed", "closed during the handshake")
            return
        self.linger("protocol-error", exc.message)

    def _send_abort_reply(self, http_status: int) -> None:
        """Answer a handshake we give up on (bad bytes, timeout, shutdown, a bug) the way its
        protocol can, instead of a bare EOF; best effort, once."""
        machine = self.machine
        if machine is None:
            return
        self.machine = None
        answer = machine.abort_reply(http_status)
        if answer:
            try:
                self.sock.send(answer)
            except OSError:
                pass

    def _on_request(self, request: Request) -> None:
        server = self.server
        now = time.monotonic()
        server.metrics.handshake(now - self.requested)
        self.requested = now
        host, port = request.host, request.port
        self.host, self.port = host, port
        if self.protocol == "socks4" and host and _literal_family(host) is None:
            self.protocol = "socks4a"
        if host:
            self.dest = format_hostport(host, port)
        if request.command == "UDP_ASSOCIATE" and self.protocol == "socks5":
            self._associate(port)
            return
        if request.command != "CONNECT":
            if getattr(self.machine, "head", None) is None:
                self.refuse("unsupported", f"{request.command} is not supported")
            elif server.options.no_forward:
                self.refuse("unsupported", f"{request.command} is not supported (--no-forward)")
            else:
                self._start_forwarding()
            return
        if server.auth_required and self.protocol in ("socks4", "socks4a"):
            self.refuse("auth-failed", "SOCKS4 carries no password and this server requires one")
            return
        self.connect_to(host, port)

    def _start_forwarding(self) -> None:
        """A plain HTTP request (any method but CONNECT): the forwarder takes the connection
        over, with the request as the client sent it; the machine's work (auth) is done."""
        from hopcat.proto.http_connect import HttpConnectServer

        try:
            from hopcat.server.forward import Forwarder
        except ImportError:  # run from a checkout without its dependencies installed
            self.refuse("unsupported", "plain HTTP forwarding needs h11 (pip install h11)")
            return
        machine = self.machine
        assert isinstance(machine, HttpConnectServer)
        request = machine.request_bytes()
        self.machine = None
        self._stop_reading()
        self.phase = FORWARD
        self.server.to_relay(self)
        self.forward = Forwarder(self, request)

    def connect_to(self, host: str, port: int) -> None:
        """Check ``host``:``port`` against the rules and connect to it, directly or through
        --via: ``_established`` or ``refuse`` follows. Both a CONNECT and each request the
        forwarder sends on (``hopcat.server.forward``) come here."""
        server = self.server
        self.host, self.port = host, port
        self.dest = format_hostport(host, port)
        self._name = None
        self.requested = time.monotonic()  # the connect latency's start (each forwarded request's)
        if self.forward is not None:
            server.to_pending(self)
        wire = resolver_form(host)
        if wire is None:
            self.refuse("dns-error", f"resolve {host}: not a valid host name (IDNA)")
            return
        literal = numeric_address(wire, port)
        mapped = _mapped_ipv4(*literal) if literal is not None else None
        if mapped is not None:  # dialled as the IPv4 address it is: no IPv6 socket needed
            literal = (socket.AF_INET, (mapped, port))
        if literal is not None and server.family and literal[0] != server.family:
            self.refuse("wrong-family", f"{host} is not an {_FAMILY_NAMES[server.family]} "
                        f"address ({_FAMILY_FLAGS[server.family]})")  # fmt: skip
            return
        decision = None
        if literal is None:
            self._name = name = compared_name(wire)
            decision = server.policy.check_name(name, port, resolvable=server.resolves_names)
            if decision is False:
                self.refuse("denied", "destination not allowed by the rules")
                return
        self.phase = CONNECTING
        if not self.reading and self.forward is None:  # watched while connecting (see
            # _on_connecting_readable); the relay takes this registration over
            self._read_client(self._on_handshake_readable)
        loop = server.loop
        self.deadline = loop.time() + server.connect_timeout
        if server.via:
            self.deadline += VIA_GRACE_S
        if literal is not None:
            self._decide(None, [literal])
        elif decision is True and server.via:
            self._start_via(wire, port)  # no address could change the answer
        else:
            future = server.lookup(self, wire, port)
            self._future = future
            future.add_done_callback(self._on_resolved)

    def _associate(self, announced_port: int) -> None:
        """UDP ASSOCIATE: the relay socket, the reply with its address, then phase UDP. The
        request's DST.ADDR is not used: datagrams are taken from the control connection's
        address whatever the client says (a client behind NAT cannot know its own)."""
        from hopcat.server.udp import Association

        server = self.server
        self.dest = None
        if server.options.no_udp:
            self.refuse("unsupported", "UDP ASSOCIATE is disabled on this server (--no-udp)")
            return
        if server.via:
            self.refuse("unsupported", "UDP ASSOCIATE cannot go through --via (TCP only)")
            return
        have = server.udp_per_client.get(self.client_ip, 0)
        cap = server.options.max_udp_per_client
        if cap and have >= cap:
            self.refuse("limit", f"{have} UDP associations from this client (--max-udp-per-client)")
            return
        control = self.tls.sock if self.tls is not None else self.sock
        try:
            self.udp = association = Association(self, control.getsockname(), announced_port)
        except OSError as exc:
            result = _CONNECT_ERRORS.get(exc.errno or 0, "error")
            self.refuse(result, f"UDP relay socket: {strerror(exc)}")
            return
        server.udp_per_client[self.client_ip] = have + 1
        machine = self.machine
        assert machine is not None
        machine.reply_success(*association.bound)
        reply = machine.data_to_send()
        self.machine = None
        self.phase = UDP
        server.metrics.connect(time.monotonic() - self.requested)
        server.to_relay(self)
        self.idle_since = server.loop.time()
        if not self._send_handshake(reply):
            return
        self._stop_reading()
        self._read_client(self._on_control_readable)

    @guarded
    def _on_control_readable(self) -> None:
        try:
            data = self.sock.recv(HANDSHAKE_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close("reset", f"control connection: {strerror(exc)}")
            return
        if not data:
            self.close("ok", None)

    @guarded
    def _on_resolved(self, future: asyncio.Future[Sequence[tuple[Any, ...]]]) -> None:
        if self._future is not future or self.phase != CONNECTING:
            return  # timed out or closed meanwhile
        self._future = None
        try:
            infos = future.result()
        except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: a name IDNA refuses
            if isinstance(exc, socket.gaierror) and exc.strerror:
                why = exc.strerror.lower()
            else:
                why = strerror(exc)
            self.refuse("dns-error", f"resolve {self.host}: {why}")
            return
        families = (self.server.family,) if self.server.family else _FAMILY_NAMES
        candidates = [
            (info[0], info[4])
            for info in interleave_families(list(infos))
            if wire_family(info[0], info[4]) in families
        ]
        if not candidates and self.server.family:
            family = self.server.family
            self.refuse("dns-error", f"resolve {self.host}: no {_FAMILY_NAMES[family]} address "
                        f"({_FAMILY_FLAGS[family]})")  # fmt: skip
            return
        self._decide(self._name, candidates)

    def _decide(self, name: str | None, candidates: list[tuple[int, SockAddr]]) -> None:
        """Check each address to be dialled (a literal, or what ``name`` resolved to) and dial
        the allowed ones: these very sockaddrs, never the name again, since a second lookup may
        answer otherwise (DNS rebinding). Through --via the first allowed address is sent on."""
        import ipaddress

        policy = self.server.policy
        port = self.port
        allowed: list[tuple[int, SockAddr]] = []
        loops = False
        for family, sockaddr in candidates:
            address = ipaddress.ip_address(sockaddr[0])
            if (family, sockaddr) in allowed:
                continue
            if policy.check_address(name, address, port):
                allowed.append((family, sockaddr))
            else:
                loops = loops or policy.is_listener(address, port)
        if not allowed:
            if loops:
                self.refuse("denied", "the destination is this server itself (a proxy loop)")
            elif name is None:
                self.refuse("denied", "destination not allowed by the rules")
            else:
                self.refuse("denied", f"every address of {self.host} is denied by the rules")
            return
        if self.server.via:
            family, sockaddr = allowed[0]
            self._start_via(str(ipaddress.ip_address(sockaddr[0])), port)
        else:
            self._dial(allowed)

    def _dial(self, candidates: list[tuple[int, SockAddr]]) -> None:
        self.dialer = Dialer(self.server.loop, candidates, self._on_dialed)
        self.dialer.start()

    @guarded
    def _on_dialed(self, sock: socket.socket | None, failures: list[tuple[Any, int]]) -> None:
        self.dialer = None
        if sock is None:
            result, why = _errors_result(failures)
            self.refuse(result, f"connect to {self.dest}: {why}")
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bound = sock.getsockname()
        except OSError as exc:
            sock.close()
            self.refuse("error", f"connect to {self.dest}: {strerror(exc)}")
            return
        self._established(sock, str(bound[0]), int(bound[1]))

    def _start_via(self, host: str, port: int) -> None:
        # The connect timeout from the request on, queueing included; the sweep's deadline is
        # VIA_GRACE_S later, so that the open reports its own timeout (naming the hop) first.
        deadline = self.deadline - VIA_GRACE_S
        self.upstream = self.server.opens.open(self, host, port, deadline)

    @guarded
    def upstream_opened(self, sock: socket.socket, trailing: bytes, via: Bridge | None) -> None:
        """The --via chain is open (called by ``self.upstream``, which nothing cancelled):
        ``trailing`` holds the target's bytes that came with the last proxy reply; through TLS
        hops ``sock`` is the end of ``via``'s pair (see ``hopcat.server.tls``)."""
        self.upstream = None
        self.via = via
        self._established(sock, None, None, trailing)
        if via is not None and self.phase in (RELAY, FORWARD):
            self.server.engine.watch(via.fd, self)
            via.start(self)

    @guarded
    def upstream_failed(self, result: str, reason: str, upstream_code: int | None) -> None:
        self.upstream = None
        self.upstream_code = upstream_code
        self.refuse(result, reason)

    def _established(
        self, target: _socket.socket, bound_host: str | None, bound_port: int | None,
        trailing_down: bytes = b"",
    ) -> None:  # fmt: skip
        self.target = target
        self.server.metrics.connect(time.monotonic() - self.requested)
        if self.forward is not None:
            self.phase = FORWARD
            self.server.to_relay(self)
            self.forward.connected(target, trailing_down)
            return
        machine = self.machine
        reply = early = b""  # a fixed forward has no handshake to answer
        if machine is not None:
            machine.reply_success(bound_host, bound_port)
            reply = machine.data_to_send()
            early = machine.trailing_data
        self.machine = None
        self.start_relay(reply, early, trailing_down)

    def start_relay(self, reply: bytes, early: bytes, trailing_down: bytes) -> None:
        """Relay between the client and ``target``: ``reply`` and ``trailing_down`` go to the
        client first, ``early`` (what the client sent already) to the target."""
        target = self.target
        assert target is not None
        self.phase = RELAY
        server = self.server
        server.to_relay(self)
        self.idle_since = server.loop.time()
        engine = server.engine
        self.down = Half(engine, self, "down", target, self.sock, reply + trailing_down)
        self.down.moved = -len(reply)
        self.up = Half(engine, self, "up", self.sock, target, early)
        engine.watch(self.fd, self)
        engine.watch(target.fileno(), self)
        if self.tls is not None:
            engine.watch(self.tls.fd, self)
            self.up.uncapped = False  # its source is the pair; the terminator caps the client
        else:
            bound_buffers(self.sock)
        bound_buffers(target)
        self.down.start()
        if self.phase == RELAY:
            if self.reading and not early:
                self.reading = False  # the up half takes the client's registration over
            else:
                self._stop_reading()
            self.up.start()

    # -- refusals -----------------------------------------------------------------------------
    def refuse(self, result: str, reason: str) -> None:
        """Answer the pending Request with the protocol's failure for ``result``, then linger."""
        socks5_code, http_status = FAILURE_REPLIES.get(result, FAILURE_REPLIES["error"])
        if self.forward is not None:
            self._abandon_connect()
            self.phase = FORWARD
            self.server.to_relay(self)
            self.forward.refused(result, http_status, reason)
            return
        if self.upstream_code is not None:
            socks5_code = self.upstream_code
        machine = self.machine
        answer = b""
        if machine is not None:  # a forward has none: the end of its stream tells the client
            try:
                if self.protocol == "socks5":
                    machine.reply_failure(socks5_code)
                elif self.protocol == "http":
                    machine.reply_failure(http_status)
                else:
                    machine.reply_failure(SOCKS4_FAILURE)
                answer = machine.data_to_send()
            except ProtocolError:
                answer = b""
        self.machine = None
        if answer:
            try:
                self.sock.send(answer)
            except OSError:
                pass
        self.linger(result, reason)

    def _abandon_connect(self) -> None:
        """Stop connecting: close the dial attempts or the upstream open; a lookup's answer, due
        on a resolver thread, will be ignored."""
        if self.dialer is not None:
            self.dialer.cancel()
            self.dialer = None
        if self.upstream is not None:
            self.upstream.cancel()
            self.upstream = None
        self._future = None

    def linger(self, result: str, reason: str) -> None:
        self.result, self.reason = result, reason
        self._abandon_connect()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(result, reason)
            return
        self.phase = LINGER
        self.deadline = self.server.loop.time() + LINGER_S
        self.server.to_pending(self)
        self._read_client(self._on_linger_readable)

    @guarded
    def _on_linger_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._lingered += len(data)
        if not data or self._lingered > LINGER_MAX_BYTES:
            self.close(self.result or "error", self.reason or "")

    def on_deadline(self) -> None:
        """Called by the server's sweep once ``deadline`` has passed."""
        if self.phase == HANDSHAKE:
            timeout = self.server.handshake_timeout
            if self.tls is not None and not self.tls.established:
                self.close("handshake-timeout", f"no TLS handshake within {timeout:g} s")
                return
            self._send_abort_reply(_ABORT_STATUS["handshake-timeout"])
            self.linger("handshake-timeout", f"no complete request within {timeout:g} s")
        elif self.phase == CONNECTING:
            self._abandon_connect()
            self.refuse(
                "timeout",
                f"connect to {self.dest} timed out after {self.server.connect_timeout:g} s",
            )
        elif self.phase == LINGER:
            self.close(self.result or "error", self.reason or "")
        elif self.phase == FORWARD:  # a kept connection waiting for its next request
            self.close("idle-timeout", "no next request in time (keep-alive)")

    # -- relay callbacks ---------------------------------------------------------------------
    def half_done(self, half: Half | None) -> None:
        assert self.up is not None and self.down is not None
        # Through TLS, the clean end waits for the last records to reach the client too.
        tls_done = (self.tls is None or self.tls.finished) and (
            self.via is None or self.via.finished
        )
        if self.up.state == DONE and self.down.state == DONE and self.phase == RELAY and tls_done:
            self.close("ok", None)

    def tls_done(self) -> None:
        """The terminator, or the --via bridge, passed both ends on (see ``hopcat.server.tls``)."""
        if self.phase == RELAY:
            self.half_done(None)

    def half_failed(self, half: Half, exc: OSError, side: str) -> None:
        failed = half.src if side == "src" else half.dst
        who = "client" if failed is self.sock else "target"
        self.close("reset", f"{who}: {strerror(exc)}")

    def socket_failed(self, fd: int) -> None:
        """The engine's error watch saw POLLERR/POLLHUP on one of our sockets, whatever the
        relay was waiting for (a stalled direction does not watch its source)."""
        if fd == self.fd:
            sock: _socket.socket | None = self.sock
        elif self.tls is not None and fd == self.tls.fd:
            sock = self.tls.sock
        elif self.via is not None and fd == self.via.fd:
            sock = self.via.sock
        else:
            sock = self.target
        if sock is None or self.phase != RELAY:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code:
            # Both directions shut down cleanly: nothing to abort, the relay sees the rest.
            self.server.engine.unwatch(fd)
            return
        for pump in (self.tls, self.via):
            if pump is not None and sock is pump.sock:
                self.server.engine.unwatch(fd)
                pump.sock_failed(OSError(code, os.strerror(code)))
                return
        self.active = True
        who = "target" if sock is self.target else "client"
        self.close("reset", f"{who}: {os.strerror(code).lower()}")

    def crashed(self, exc: Exception) -> None:
        import traceback

        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.server.logger.log(
            "error", client=self.peer, reason=f"internal error: {type(exc).__name__}: {exc}",
            traceback=trace,
        )  # fmt: skip
        self.close("error", f"internal error: {type(exc).__name__}")

    # -- the end ------------------------------------------------------------------------------
    def close(self, result: str, reason: str | None) -> None:
        if self.phase == CLOSED:
            return
        self.result, self.reason = result, reason
        self._stop_reading()
        self._abandon_connect()
        if self.forward is not None:
            self.forward.close(result, reason)
        if self.machine is not None and result != "client-closed":
            self._send_abort_reply(_ABORT_STATUS.get(result, 500))
        relayed = self.phase == RELAY
        if relayed:
            self._end_relay(result == "ok")
        if self.udp is not None:
            self.udp.close()
        self.sock.close()
        if self.tls is not None:
            self.tls.close(abort=relayed and result != "ok")
        if self.via is not None:
            self.via.close(abort=result != "ok")
        if self.target is not None:
            self.target.close()
        self.phase = CLOSED
        self.machine = None
        self.server.release(self)

    def _end_relay(self, complete: bool) -> None:
        """Unhook the relay. Only a tunnel whose two directions both ended with a FIN that was
        passed on closes cleanly; any other end (a reset on one side, the idle timeout, the
        grace period over, a bug) resets both peers, so neither takes a cut stream for a whole
        one, and the bytes still queued in the kernel for them are freed at once."""
        engine = self.server.engine
        for half in (self.up, self.down):
            if half is not None:
                half.unregister()
        engine.unwatch(self.fd)
        if self.tls is not None:
            engine.unwatch(self.tls.fd)
        if self.via is not None:
            engine.unwatch(self.via.fd)
        if self.target is not None:
            engine.unwatch(self.target.fileno())
        if not complete:
            reset_on_close(self.sock)
            if self.target is not None:
                reset_on_close(self.target)

    @property
    def bytes_up(self) -> int:
        if self.udp is not None:
            return self.udp.bytes_up
        return self.up.moved if self.up is not None else 0

    @property
    def bytes_down(self) -> int:
        if self.udp is not None:
            return self.udp.bytes_down
        return max(0, self.down.moved) if self.down is not None else 0


# The result for a refusal the machine made on its own, by its kind. REFUSED comes from our own
# reply_failure(), whose caller has set the result already.
_REJECTION_RESULTS = {
    Rejected.UNSUPPORTED: "unsupported",
    Rejected.AUTHENTICATION: "auth-failed",
    Rejected.REFUSED: "rejected",
}
