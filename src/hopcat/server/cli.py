"""``hopcat serve``: its options, its help, and the checks made before anything listens.

A small table-driven parser of its own (like ``hopcat.cli._args``, which is tied to the client's
table): ``--name VALUE``, ``--name=VALUE``, ``-q``, ``-h``; repeatable options keep their order,
which matters for the rules (first match wins).

Refused before binding: a listen address beyond loopback without ``--auth``/``--auth-file``,
unless ``--allow-open`` (an open proxy is a gift to anyone who finds it); a --forward listener
beyond loopback unless ``--allow-open`` (it has no authentication at all).

``--auth-scheme`` defaults to ``digest,basic``: Digest for the clients that can (hopcat, ncat,
curl --proxy-digest/--proxy-anyauth), so the password stays off the network, and Basic still
accepted so that clients sending it up front keep working (see ``hopcat.server.digest``).

Readiness for scripts and tests: ``--ready-fd N`` writes the bound addresses (``HOST:PORT``, one a
line, ``[v6]:port`` for IPv6, ``tls://`` before a TLS listener's; then ``forward HOST:PORT
TARGET`` per --forward listener) to fd N and closes it, so the parent reads until EOF;
``--ready-file PATH`` writes the same lines to PATH atomically (rename), so a shell can poll for
the file. Both happen after every listener is listening. Port 0 picks a free port.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from hopcat._endpoint import (
    format_hostport,
    is_ip_literal,
    is_ipv6_literal,
    parse_port,
    split_hostport,
    validate_host,
)
from hopcat.cli._scan import scan_options
from hopcat.errors import UsageError
from hopcat.server.policy import (
    RuleSet,
    parse_auth_option,
    parse_client_rule,
    parse_dest_rule,
    resolver_form,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

    from hopcat._url import ProxyURL
    from hopcat.net.dial import SockAddr

HELP_WIDTH = 100
HELP_INDENT = 31
DEFAULT_LISTEN = "127.0.0.1:1080"
DEFAULT_PORT = 1080
MAX_WORKERS = 256

# (long name, metavar or "" for a flag, attribute, default, help). Order is the order in --help.
OPTION_TABLE: tuple[tuple[str, str, str, object, str], ...] = (
    (
        "auth",
        "USER:PASS",
        "auth",
        None,
        "accept this user (repeatable): SOCKS5 username/password (RFC 1929) and HTTP "
        "Digest or Basic; prefer --auth-file, a command line is visible to other local users",
    ),
    (
        "auth-file",
        "FILE",
        "auth_file",
        None,
        "users from FILE, one user:password a line, plain text (so chmod 600); lines "
        "starting with # are comments; reread on SIGHUP",
    ),
    (
        "auth-scheme",
        "LIST",
        "auth_scheme",
        "digest,basic",
        "what an HTTP client may authenticate with, offered in this order in a 407: digest "
        "(RFC 7616, MD5 and SHA-256; the password never crosses the network), basic (RFC 7617, "
        "the password in clear unless the listener is tls://) (default digest,basic)",
    ),
    (
        "nonce-lifetime",
        "SECS",
        "nonce_lifetime_s",
        300.0,
        "a Digest nonce is good for SECS, then the client is told it is stale and answers a "
        "new one (default 300)",
    ),
    (
        "allow-open",
        "",
        "allow_open",
        False,
        "allow listening beyond loopback without authentication",
    ),
    (
        "allow",
        "DEST",
        "rules",
        None,
        "allow destinations matching DEST = HOST[:PORTS] (repeatable; all rules in order, first "
        "match wins): HOST is *, a glob (*.example.com), an address or CIDR; PORTS 443,8000-8100",
    ),
    ("deny", "DEST", "rules", None, "deny destinations matching DEST"),
    ("allow-client", "CIDR", "rules", None, "accept clients from CIDR (repeatable, in order)"),
    ("deny-client", "CIDR", "rules", None, "refuse clients from CIDR"),
    (
        "rules",
        "FILE",
        "rules_file",
        None,
        "more rules, one a line: allow DEST, deny DEST, allow-client CIDR, deny-client CIDR; "
        "after the command line's; reread on SIGHUP",
    ),
    (
        "via",
        "URL",
        "via",
        None,
        "reach destinations through this proxy (repeatable: a chain, first hop first); "
        "URL is socks4, socks4a, socks5, socks5h, http or https://[USER[:PASS]@]HOST[:PORT] "
        "(socks5+tls://, socks5h+tls://: SOCKS over TLS); give "
        "USER without :PASS and the password comes from --via-password-file or "
        "HOPCAT_PROXY_PASSWORD, not the command line",
    ),
    (
        "via-password-file",
        "FILE",
        "via_password_file",
        None,
        "the password for --via hops with a user and no password: the first line of FILE",
    ),
    (
        "via-cacert",
        "FILE",
        "via_cacert",
        None,
        "CA certificates (PEM) to verify the TLS --via hops' certificates (https://, "
        "socks5+tls://) instead of the system's",
    ),
    ("via-insecure", "", "via_insecure", False, "do not verify the TLS --via hops' certificates"),
    (
        "forward",
        "LISTEN=HOST:PORT",
        "forward",
        None,
        "also listen on LISTEN ([ADDR:]PORT, ADDR 127.0.0.1 unless given, [V6]:PORT) and tunnel "
        "each connection, with no handshake, to HOST:PORT, through --via if given (repeatable): "
        "for programs that cannot use a proxy. Same rules, limits and log lines (proto=forward); "
        "it has no authentication, so beyond loopback it needs --allow-open",
    ),
    (
        "max-conns",
        "N",
        "max_conns",
        4096,
        "client connections at once; further clients wait in the backlog (default 4096)",
    ),
    (
        "max-conns-per-client",
        "N",
        "max_conns_per_client",
        256,
        "connections at once from one client address, 0 = no limit (default 256)",
    ),
    (
        "handshake-timeout",
        "SECS",
        "handshake_timeout_s",
        10.0,
        "close a client that has not sent a complete request after SECS (default 10)",
    ),
    (
        "connect-timeout",
        "SECS",
        "connect_timeout_s",
        10.0,
        "give up connecting to a destination after SECS (default 10)",
    ),
    (
        "ipv4",
        "",
        "ipv4",
        False,
        "connect to IPv4 destinations only: a name is dialled at its IPv4 addresses, an IPv6 "
        "address is refused (SOCKS5 reply 8, SOCKS4 91, HTTP 502); UDP alike",
    ),
    ("ipv6", "", "ipv6", False, "connect to IPv6 destinations only, likewise"),
    (
        "idle-timeout",
        "SECS",
        "idle_timeout_s",
        0.0,
        "close a tunnel with no data either way for SECS (default 0: never)",
    ),
    (
        "grace",
        "SECS",
        "grace_s",
        30.0,
        "on SIGTERM or SIGINT, let open tunnels finish for up to SECS (default 30)",
    ),
    ("log-format", "text|json", "log_format", "text", "log lines as key=value text or JSON"),
    ("quiet", "", "quiet", False, "no line per tunnel (start, stop, reload and errors only)"),
    (
        "ready-fd",
        "N",
        "ready_fd",
        None,
        "when listening, write the bound HOST:PORT lines to fd N and close it",
    ),
    (
        "ready-file",
        "PATH",
        "ready_file",
        None,
        "when listening, write the bound HOST:PORT lines to PATH (atomically)",
    ),
    (
        "event-loop",
        "auto|asyncio|uvloop",
        "event_loop",
        "auto",
        "event loop (default auto: uvloop when installed)",
    ),
    (
        "workers",
        "N|auto",
        "workers",
        "1",
        "serve from N processes (auto: one per CPU this process may run on), each with its own "
        "SO_REUSEPORT listeners, under one supervisor that passes SIGTERM, SIGINT and SIGHUP on "
        "and restarts a worker that dies; limits are split, see below (default 1)",
    ),
    (
        "metrics",
        "HOST:PORT",
        "metrics",
        None,
        "serve Prometheus metrics (counts only) at http://HOST:PORT/metrics (a bare PORT: on "
        "127.0.0.1); --allow-open is needed for an address beyond loopback",
    ),
    (
        "tls-cert",
        "FILE",
        "tls_cert",
        None,
        "the certificate (PEM, its chain after it) of the tls:// listeners; reread on SIGHUP",
    ),
    (
        "tls-key",
        "FILE",
        "tls_key",
        None,
        "its private key (PEM), unless it is in the --tls-cert file",
    ),
    (
        "tls-ca",
        "FILE",
        "tls_ca",
        None,
        "CA certificates (PEM) that client certificates must be signed by",
    ),
    (
        "tls-verify-client",
        "",
        "tls_verify_client",
        False,
        "require a client certificate signed by --tls-ca on the tls:// listeners",
    ),
    ("no-splice", "", "no_splice", False, "relay by copying instead of splice(2)"),
    ("no-udp", "", "no_udp", False, "refuse SOCKS5 UDP ASSOCIATE (reply 7)"),
    (
        "no-forward",
        "",
        "no_forward",
        False,
        "do not forward plain HTTP requests (GET http://...): 405, CONNECT only",
    ),
    (
        "no-via-header",
        "",
        "no_via_header",
        False,
        "do not add 'Via: 1.1 hopcat' to forwarded HTTP requests and responses",
    ),
    (
        "answer-timeout",
        "SECS",
        "answer_timeout_s",
        300.0,
        "a forwarded HTTP request whose origin, owing its answer, is silent for SECS gets 504 "
        "(default 300; a client pausing its upload is --idle-timeout's)",
    ),
    (
        "udp-idle-timeout",
        "SECS",
        "udp_idle_timeout_s",
        120.0,
        "end a UDP association, and its control connection, after SECS with no datagram "
        "relayed either way (default 120; 0: never)",
    ),
    (
        "max-udp-per-client",
        "N",
        "max_udp_per_client",
        64,
        "UDP associations at once from one client address, 0 = no limit (default 64)",
    ),
    (
        "max-receive-buffer",
        "SIZE",
        "max_receive_buffer",
        8 << 20,
        "the most one relayed socket's receive buffer may grow to, as the kernel counts it "
        "(twice the payload); SIZE in bytes or with K, M: what a tunnel whose reader stopped "
        "can pin per direction; 0 = the kernel's limit, net.ipv4.tcp_rmem (default 8M)",
    ),
    ("help", "", "help", False, "show this help and exit"),
)
_BY_LONG = {row[0]: row for row in OPTION_TABLE}
_SHORT = {"q": "quiet", "h": "help", "4": "ipv4", "6": "ipv6"}
_SECONDS = frozenset(
    {
        "handshake_timeout_s",
        "connect_timeout_s",
        "idle_timeout_s",
        "udp_idle_timeout_s",
        "grace_s",
        "nonce_lifetime_s",
        "answer_timeout_s",
    }
)
AUTH_SCHEMES = ("digest", "basic")
_COUNTS = frozenset({"max_conns", "max_conns_per_client", "max_udp_per_client", "ready_fd"})
_SIZES = frozenset({"max_receive_buffer"})
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_LISTS = frozenset({"auth", "rules", "via", "forward"})


class ServeOptions:
    """Parsed options, plus what ``finish()`` derives from them; passed down, never global."""

    auth_file: str | None
    auth_scheme: str
    nonce_lifetime_s: float
    allow_open: bool
    rules_file: str | None
    via_password_file: str | None
    via_cacert: str | None
    via_insecure: bool
    max_conns: int
    max_conns_per_client: int
    handshake_timeout_s: float
    answer_timeout_s: float
    connect_timeout_s: float
    ipv4: bool
    ipv6: bool
    idle_timeout_s: float
    grace_s: float
    log_format: str
    quiet: bool
    ready_fd: int | None
    ready_file: str | None
    event_loop: str
    workers: int
    metrics: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    tls_verify_client: bool
    no_splice: bool
    no_udp: bool
    no_forward: bool
    no_via_header: bool
    udp_idle_timeout_s: float
    max_udp_per_client: int
    max_receive_buffer: int
    help: bool

    def __init__(self) -> None:
        for _long, _metavar, attr, default, _help in OPTION_TABLE:
            if attr not in _LISTS:
                setattr(self, attr, default)
        self.listen: list[str] = []
        self.raw_auth: list[str] = []
        self.raw_rules: list[tuple[str, str]] = []
        self.raw_via: list[str] = []
        self.raw_forwards: list[str] = []
        # Derived by finish():
        self.auth: list[tuple[str, str]] = []
        self.auth_schemes: tuple[str, ...] = AUTH_SCHEMES  # from --auth-scheme, in its order
        self.rules = RuleSet()
        self.via: list[ProxyURL] = []
        self.via_context: ssl.SSLContext | None = None  # for TLS --via hops
        self.bind_addresses: list[tuple[int, SockAddr]] = []
        self.tls_addresses: list[tuple[int, SockAddr]] = []  # tls:// listeners
        # --forward listeners: (family, sockaddr to bind, (target host, target port)).
        self.forwards: list[tuple[int, SockAddr, tuple[str, int]]] = []
        self.family = 0  # AF_INET or AF_INET6 with -4 or -6: the only destinations dialled
        self.loopback_only = True
        self.metrics_address: tuple[int, SockAddr] | None = None

    @property
    def auth_required(self) -> bool:
        return bool(self.auth) or self.auth_file is not None


def _number(text: str, flag: str, *, seconds: bool) -> float:
    try:
        value = float(text) if seconds else int(text)
    except ValueError:
        kind = "a number of seconds" if seconds else "a whole number"
        raise UsageError(f"{flag} takes {kind}, not {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise UsageError(f"{flag} must be a finite number >= 0")
    return value


def _size(text: str, flag: str) -> int:
    digits = text.rstrip("kKmMgG")
    unit = _SIZE_UNITS.get(text[len(digits) :].upper())
    if not digits.isdigit() or not digits.isascii() or unit is None:
        raise UsageError(f"{flag} takes a size in bytes, or with K or M, not {text!r}")
    return int(digits) * unit


def _store(options: ServeOptions, name: str, value: str | None) -> None:
    flag = f"--{name}"
    attr = _BY_LONG[name][2]
    if value is None:
        setattr(options, attr, True)
    elif attr == "auth":
        options.raw_auth.append(value)
    elif attr == "rules":
        options.raw_rules.append((name, value))
    elif attr == "via":
        options.raw_via.append(value)
    elif attr == "forward":
        options.raw_forwards.append(value)
    elif attr in _SECONDS:
        setattr(options, attr, _number(value, flag, seconds=True))
    elif attr in _COUNTS:
        setattr(options, attr, int(_number(value, flag, seconds=False)))
    elif attr in _SIZES:
        setattr(options, attr, _size(value, flag))
    else:
        setattr(options, attr, value)


def _metavar_of(flag: str) -> str | None:
    name = _SHORT.get(flag[1:], "") if not flag.startswith("--") else flag[2:]
    row = _BY_LONG.get(name)
    return None if row is None else row[1]


def parse_args(argv: Sequence[str]) -> ServeOptions:
    options = ServeOptions()
    for flag, value in scan_options(argv, _metavar_of, see="see hopcat serve --help"):
        if not flag:
            options.listen.append(value or "")
        else:
            _store(options, flag[2:] if flag.startswith("--") else _SHORT[flag[1:]], value)
    return options


def _listen_addresses(text: str, *, what: str = "listen address") -> list[tuple[int, SockAddr]]:
    """``PORT``, ``HOST``, ``HOST:PORT``, ``[V6]:PORT`` -> (family, sockaddr) to bind."""
    port_text: str | None
    if text.isdigit():
        host_text, port_text = "127.0.0.1", text
    else:
        host_text, port_text = split_hostport(text, what=what)
    host = validate_host(host_text, what=what)
    port = (
        DEFAULT_PORT
        if port_text is None
        else parse_port(port_text, what=what.replace("address", "port"), allow_zero=True)
    )
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
            socket.AI_PASSIVE,
        )  # fmt: skip
    except socket.gaierror as exc:
        raise UsageError(f"{what} {text!r}: {exc.strerror or exc}") from None
    seen: list[tuple[int, SockAddr]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


def _is_loopback(sockaddr: SockAddr) -> bool:
    address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def finish(options: ServeOptions) -> ServeOptions:
    """Validate and derive: credentials, rules, upstream chain, bind addresses, exposure."""
    from hopcat._url import parse_proxy_url

    options.auth = [parse_auth_option(text) for text in options.raw_auth]
    seen = set()
    for user, _password in options.auth:
        if user in seen:
            raise UsageError(f"--auth: user {user!r} given twice")
        seen.add(user)
    options.auth_schemes = _auth_schemes(options.auth_scheme)
    if options.nonce_lifetime_s <= 0:
        raise UsageError("--nonce-lifetime must be more than 0")
    clients = []
    destinations = []
    for name, value in options.raw_rules:
        if name.endswith("-client"):
            clients.append(parse_client_rule(value, name == "allow-client"))
        else:
            destinations.append(parse_dest_rule(value, name == "allow"))
    options.rules = RuleSet(clients, destinations)
    for index, text in enumerate(options.raw_via, 1):
        options.via.append(parse_proxy_url(text, origin=f"--via #{index}"))
    _fill_via_passwords(options)
    _via_context(options)
    if options.log_format not in ("text", "json"):
        raise UsageError("--log-format takes text or json")
    if options.event_loop not in ("auto", "asyncio", "uvloop"):
        raise UsageError("--event-loop takes auto, asyncio or uvloop")
    if options.max_conns < 1:
        raise UsageError("--max-conns must be at least 1")
    if min(options.handshake_timeout_s, options.connect_timeout_s, options.answer_timeout_s) <= 0:
        raise UsageError("--handshake-timeout, --connect-timeout and --answer-timeout must be above 0")
    options.workers = _workers(str(options.workers))
    if options.metrics is not None:
        text = options.metrics
        if not text.isdigit() and split_hostport(text, what="--metrics address")[1] is None:
            # Not the proxy's default port: the two would clash.
            raise UsageError(f"--metrics {text!r} needs a port (e.g. 127.0.0.1:9464 or 9464)")
        options.metrics_address = _listen_addresses(text)[0]
        if not _is_loopback(options.metrics_address[1]) and not options.allow_open:
            raise UsageError(
                f"refusing to serve --metrics on {options.metrics} beyond loopback: anyone who "
                "can reach it could read the proxy's traffic counts; give --allow-open if that "
                "is really meant"
            )
    if options.ready_fd is not None:
        from hopcat._ready import check_ready_fd

        check_ready_fd(options.ready_fd)
    if options.ipv4 and options.ipv6:
        raise UsageError("-4 and -6 exclude each other (give neither for both families)")
    options.family = socket.AF_INET if options.ipv4 else socket.AF_INET6 if options.ipv6 else 0
    options.forwards = [item for text in options.raw_forwards for item in _forward(text, options)]
    plain: list[tuple[int, SockAddr]] = []
    tls: list[tuple[int, SockAddr]] = []
    # Forwards alone make a forwarding-only server: no proxy port unless one is given.
    for text in options.listen or ([] if options.forwards else [DEFAULT_LISTEN]):
        scheme, sep, rest = text.partition("://")
        if sep and scheme.lower() != "tls":
            raise UsageError(f"listen address {text!r}: the only scheme is tls://")
        addresses = tls if sep else plain
        for item in _listen_addresses(rest if sep else text):
            if item not in addresses:
                addresses.append(item)
    options.bind_addresses, options.tls_addresses = plain, tls
    _check_tls(options)
    exposed = [
        format_hostport(str(sockaddr[0]), int(sockaddr[1]))
        for _family, sockaddr in plain + tls
        if not _is_loopback(sockaddr)
    ]
    open_forwards = [
        format_hostport(str(sockaddr[0]), int(sockaddr[1]))
        for _family, sockaddr, _target in options.forwards
        if not _is_loopback(sockaddr)
    ]
    options.loopback_only = not exposed and not open_forwards
    if open_forwards and not options.allow_open:
        raise UsageError(
            f"refusing to listen for --forward on {', '.join(open_forwards)}: a forward has no "
            "authentication, so anyone who can reach it reaches its target. Listen on loopback, "
            "or give --allow-open if that is really meant (then restrict clients with "
            "--allow-client/--deny-client or a firewall)"
        )
    if exposed and not options.auth_required and not options.allow_open:
        raise UsageError(
            f"refusing to listen on {', '.join(exposed)} without authentication: anyone who can "
            "reach it could use this machine as an open proxy. Give --auth USER:PASS or "
            "--auth-file FILE, or --allow-open if that is really meant (then restrict clients "
            "with --allow-client/--deny-client or a firewall)"
        )
    return options


def _workers(text: str) -> int:
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not text.isdigit() or not text.isascii() or not 1 <= int(text) <= MAX_WORKERS:
        raise UsageError(f"--workers takes a number from 1 to {MAX_WORKERS} or auto, not {text!r}")
    return int(text)


def _forward(text: str, options: ServeOptions) -> list[tuple[int, SockAddr, tuple[str, int]]]:
    """``--forward LISTEN=HOST:PORT`` -> what to bind, with the target checked as a request's
    host would be (no character that a wire format or getaddrinfo would choke on)."""
    example = "(e.g. 127.0.0.1:2222=git.internal:22 or 5432=db:5432)"
    listen, eq, target = text.partition("=")
    if not eq or not listen or not target:
        raise UsageError(f"--forward {text!r}: expected LISTEN=HOST:PORT {example}")
    if "://" in listen or "://" in target:
        raise UsageError(f"--forward {text!r}: plain TCP at both ends, no scheme {example}")
    if not listen.isdigit() and split_hostport(listen, what="--forward listen address")[1] is None:
        raise UsageError(f"--forward {text!r}: the listen address needs a port {example}")
    host_text, port_text = split_hostport(target, what="--forward target")
    if port_text is None:
        raise UsageError(f"--forward {text!r}: the target needs a port {example}")
    host = validate_host(host_text, what="--forward target")
    port = parse_port(port_text, what="--forward target port")
    if resolver_form(host) is None:
        raise UsageError(f"--forward target {host!r} is not a valid host name (IDNA)")
    if options.family and is_ip_literal(host):
        v6 = is_ipv6_literal(host.partition("%")[0])
        if v6 != (options.family == socket.AF_INET6):
            flag = "-4" if options.family == socket.AF_INET else "-6"
            raise UsageError(f"--forward target {host} is excluded by {flag}")
    return [
        (family, sockaddr, (host, port))
        for family, sockaddr in _listen_addresses(listen, what="--forward listen address")
    ]


def _check_tls(options: ServeOptions) -> None:
    """TLS options go with tls:// listeners, both ways (the files are read by ``serve.run``,
    still before anything listens)."""
    given = [
        f"--{name}" for name, attr in (("tls-cert", "tls_cert"), ("tls-key", "tls_key"),
                                       ("tls-ca", "tls_ca"), ("tls-verify-client",
                                       "tls_verify_client"))
        if getattr(options, attr)
    ]  # fmt: skip
    if options.tls_addresses and options.tls_cert is None:
        raise UsageError("a tls:// listen address needs --tls-cert FILE (and --tls-key FILE "
                         "unless the key is in it)")  # fmt: skip
    if given and not options.tls_addresses:
        raise UsageError(f"{given[0]} is for tls:// listen addresses, and none is given "
                         "(e.g. tls://127.0.0.1:8443)")  # fmt: skip


def _via_context(options: ServeOptions) -> None:
    """The TLS --via hops' context, made once here: a bad --via-cacert is a usage error before
    anything is bound."""
    given = options.via_cacert is not None or options.via_insecure
    if not any(hop.tls for hop in options.via):
        if given:
            flag = "--via-cacert" if options.via_cacert is not None else "--via-insecure"
            raise UsageError(f"{flag} is for TLS --via hops (https://, socks5+tls://), and "
                             "none is given")  # fmt: skip
        return
    from hopcat.net.chain import tls_context

    options.via_context = tls_context(options.via_cacert, options.via_insecure,
                                      flag="--via-cacert")  # fmt: skip


def _auth_schemes(text: str) -> tuple[str, ...]:
    schemes = tuple(item.strip().lower() for item in text.split(","))
    if not all(scheme in AUTH_SCHEMES for scheme in schemes) or len(set(schemes)) != len(schemes):
        raise UsageError(f"--auth-scheme takes a list of digest and basic, not {text!r}")
    return schemes


def _fill_via_passwords(options: ServeOptions) -> None:
    """Passwords for --via hops that name a user and no password: --via-password-file, else
    HOPCAT_PROXY_PASSWORD (argv is readable by every local user; a daemon has no terminal to
    prompt on). SOCKS4 carries a user id and no password."""
    hops = [
        hop for hop in options.via
        if hop.username is not None and hop.password is None and hop.protocol != "socks4"
    ]  # fmt: skip
    if not hops:
        return
    if options.via_password_file is not None:
        path = options.via_password_file
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                password = f.readline().removeprefix("\ufeff").rstrip("\r\n")
        except OSError as exc:
            raise UsageError(
                f"--via-password-file {path}: {os.strerror(exc.errno or 0).lower()}"
            ) from None
        if not password:
            raise UsageError(f"--via-password-file {path}: the first line is empty")
    else:
        password = os.environ.get("HOPCAT_PROXY_PASSWORD", "")
        if not password:
            raise UsageError(
                f"--via {hops[0].label()}: a user is given but no password; put it in "
                "--via-password-file FILE or HOPCAT_PROXY_PASSWORD"
            )
    for hop in hops:
        hop.password = password


def help_text() -> str:
    lines = [
        "usage: hopcat serve [options] [LISTEN ...]",
        "",
        "A SOCKS4, SOCKS4a, SOCKS5 and HTTP CONNECT proxy on one port (told apart by the first",
        "byte). LISTEN is PORT, HOST, HOST:PORT or [V6]:PORT; default 127.0.0.1:1080; port 0",
        "picks a free port. CONNECT and SOCKS5 UDP ASSOCIATE are served (UDP under the same",
        "destination rules; not through --via); SOCKS5 BIND gets reply 7, SOCKS4 BIND reply 91.",
        "Plain HTTP requests to absolute http:// URLs are forwarded (see below).",
        "",
        "tls://LISTEN is the same proxy inside TLS (needs --tls-cert): an HTTPS proxy and SOCKS",
        "over TLS (curl --proxy https://..., hopcat -x https://... or -x socks5h+tls://...).",
        "Plain and tls:// addresses may be mixed; --ready-fd/--ready-file write a TLS listener's",
        "address as tls://HOST:PORT.",
        "A TLS client's close_notify is passed on as a FIN and a FIN as close_notify (the TLS 1.3",
        "half-close); the TLS handshake counts against --handshake-timeout.",
        "",
        "options:",
    ]
    import textwrap

    for long, metavar, _attr, _default, text in OPTION_TABLE:
        short = next((f"-{k}, " for k, v in _SHORT.items() if v == long), "")
        names = f"{short}--{long}" + (f" {metavar}" if metavar else "")
        wrapped = textwrap.wrap(text, HELP_WIDTH - HELP_INDENT)
        first = f"  {names:<{HELP_INDENT - 3}} {wrapped[0]}"
        if len(names) > HELP_INDENT - 3:
            first = f"  {names}\n{'':<{HELP_INDENT}}{wrapped[0]}"
        lines.append(first)
        lines += [f"{'':<{HELP_INDENT}}{line}" for line in wrapped[1:]]
    lines += [
        "",
        "Safe defaults: loopback only; listening on any other address needs --auth/--auth-file",
        "or --allow-open. Destinations: rules are checked in order against the name (as the",
        "resolver gets it: IDNA-folded) and against every address that will be dialled (literals",
        "in any spelling, e.g. 127.1 or 2130706433); with no matching rule everything is allowed,",
        "except that a server listening beyond loopback denies every address of this host,",
        "loopback, 0.0.0.0/8, link-local and metadata addresses (169.254.0.0/16, fe80::/10) and",
        "multicast, which only an address rule reopens. The server itself is never a",
        "destination (no proxy loops). End with --deny '*' for deny-by-default.",
        "",
        "Refusals: SOCKS5 reply 2 (rules), 4 (unreachable, timeout, name not found), 5 (refused),",
        "8 (an address -4/-6 excludes), 1 (other); SOCKS4 91; HTTP 403, 407, 502, 503, 504, and",
        "for a request it cannot parse 400 (lower-case method, CONNECT without a port), 414 (a",
        "request line over 8 KiB), 431 (a head over 64 KiB or 100 lines), 505; each with a",
        "one-line text/plain body.",
        "",
        "Plain HTTP: http_proxy=http://127.0.0.1:1080 clients (curl, wget, pip, apt) send",
        "absolute-form requests (GET http://host/path); each is checked (auth, rules on the",
        "addresses dialled) and forwarded over a kept client connection, hop-by-hop headers",
        "removed, Via added (--no-via-header), bodies streamed; a WebSocket upgrade becomes a",
        "tunnel. --no-forward answers them 405.",
        "",
        "Fixed forwards: --forward 127.0.0.1:2222=git.internal:22 --via socks5h://bastion:1080",
        "lets a program that cannot use a proxy connect to 127.0.0.1:2222 and reach git.internal:22",
        "through the chain. The destination rules apply to the target as to any request (a server",
        "exposed with --allow-open denies loopback targets unless --allow reopens them). With",
        "--forward and no LISTEN, only the forwards listen. --ready-fd/--ready-file add a line",
        "'forward LISTEN HOST:PORT' per forward, after the proxy listeners' lines.",
        "",
        "Logs (stderr): one line per connection at its end (per request when forwarding plain",
        "HTTP): client, user, proto, dest, result,",
        "reason, up and down bytes (client->target, target->client), duration in seconds.",
        "TLS clients' lines say tls=VERSION; a failed TLS handshake is result=tls-error.",
        "A forwarded HTTP request has a line of its own, with method= and status= besides.",
        "Signals: SIGTERM/SIGINT stop accepting and drain for --grace; SIGHUP rereads",
        "--auth-file, --rules and the --tls-cert/--tls-key/--tls-ca files.",
        "",
        "--workers N: the supervisor passes each signal on to every worker (a second SIGTERM or",
        "SIGINT ends everything at once), exits once every worker has, and restarts a worker",
        "that dies (waiting longer each time one dies within 10 s of its start). The kernel",
        "spreads connections over the workers' listeners by a hash of each connection, so every",
        "limit is split: each worker takes ceil(L/N) of --max-conns, --max-conns-per-client and",
        "--max-udp-per-client L (0 stays unlimited); failed-login throttling and the resolver",
        "and --via shares are per worker. Log lines carry worker=K (1..N).",
        "",
        "--metrics: GET /metrics answers the Prometheus text format (0.0.4): open tunnels by",
        "protocol, connections by result, bytes each way (counted when a connection or a",
        "forwarded request ends),",
        "handshake and connect latency histograms, authentication failures, rule denials,",
        "accept back-offs, forwarded HTTP requests by status class and, with --workers,",
        "worker restarts; summed over the workers. No",
        "user name, client address or destination is ever in it. Anything else gets 404.",
        "",
        "Example: hopcat serve 127.0.0.1:0 --ready-file /tmp/hopcat.addr",
        '         then: curl --socks5-hostname "$(head -1 /tmp/hopcat.addr)" https://example.com/',
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """``hopcat serve ...``: errors are HopcatErrors, turned into a line and a code by the CLI."""
    options = parse_args(argv)
    if options.help:
        sys.stdout.write(help_text())
        return 0
    finish(options)
    from hopcat.server.serve import run

    return run(options)
