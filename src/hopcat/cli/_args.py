"""Command-line parsing: a table of options and a small GNU-style parser.

Not argparse: it costs several ms of imports on every ssh connection, and nc's habits (``-X5``,
``-xhost:port``, ``-vv``, options after operands) are easier to honour with a table we own.
"""

from __future__ import annotations

from hopcat._endpoint import is_ip_literal
from hopcat._url import PROXY_DNS_POLICIES
from hopcat.cli._scan import scan_options
from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_CONNECT_TIMEOUT_S = 30.0

# (short, long, metavar or "" for a flag, attribute, help). Order is the order in --help.
OPTION_TABLE: tuple[tuple[str, str, str, str, str], ...] = (
    ("4", "", "", "ipv4_only", "use IPv4 addresses only"),
    ("6", "", "", "ipv6_only", "use IPv6 addresses only"),
    ("s", "source", "ADDR", "source", "connect from this local IP address"),
    ("n", "", "", "numeric", "numeric addresses only: never resolve names, proxies' included"),
    (
        "",
        "connect-timeout",
        "SECS",
        "connect_timeout_s",
        f"give up connecting after SECS, whole attempt (default {DEFAULT_CONNECT_TIMEOUT_S:g}; 0 = none)",
    ),
    (
        "w",
        "idle-timeout",
        "SECS",
        "idle_timeout_s",
        "exit after SECS with no data either way; also the connect timeout, as in nc "
        "(with ncat's or connect-proxy's flags -w is their connect timeout only)",
    ),
    ("q", "quit-after-eof", "SECS", "quit_after_eof_s", "exit SECS after stdin EOF (nc's -q)"),
    ("N", "", "", "shutdown_flag", "half-close after stdin EOF (the default; accepted for nc)"),
    (
        "",
        "no-shutdown",
        "",
        "no_shutdown",
        "never half-close: some proxies (microsocks, tinyproxy) drop the tunnel on a FIN",
    ),
    (
        "",
        "keep-sending",
        "",
        "keep_sending",
        "after the peer's EOF keep sending stdin until it ends (servers that half-close)",
    ),
    ("d", "no-stdin", "", "no_stdin",
     "do not read stdin (nc); with -S/-H, -d is connect-proxy's debug and means -v"),
    ("C", "crlf", "", "crlf", "send CRLF line endings: each LF of stdin goes out as CR LF (nc, ncat)"),
    ("I", "recv-buf", "BYTES", "recv_buf", "socket receive buffer size, SO_RCVBUF (nc)"),
    ("O", "send-buf", "BYTES", "send_buf", "socket send buffer size, SO_SNDBUF (nc)"),
    ("T", "tos", "KEYWORD|N", "tos",
     "IP ToS / IPv6 traffic class: lowdelay, throughput, reliability, af11-af43, cs0-cs7, ef... (nc)"),
    ("M", "ttl", "TTL", "ttl", "IP TTL / IPv6 hop limit, 1-255 (nc)"),
    ("D", "debug-socket", "", "so_debug", "SO_DEBUG on the socket (nc)"),
    ("", "keepalive", "", "keepalive", "enable TCP keepalive (idle 60 s, interval 15 s, 4 probes)"),
    ("", "nagle", "", "nagle", "leave Nagle's algorithm on (TCP_NODELAY is set by default)"),
    ("x", "", "URL", "proxies",
     "proxy URL (below); repeat for a chain, first hop first; nc: -x HOST[:PORT] with -X"),
    ("X", "", "4|5|connect", "nc_proxy_type", "nc: protocol for a bare -x HOST[:PORT] (default 5)"),
    ("P", "", "USER", "nc_proxy_user", "nc: proxy user name (password from HOPCAT_PROXY_PASSWORD or a prompt)"),
    ("", "proxy", "HOST[:PORT]", "proxies", "ncat: proxy (a URL works too); bare = HTTP unless --proxy-type"),
    ("", "proxy-type", "TYPE", "ncat_proxy_type", "ncat: socks4, socks4a, socks5 or http for --proxy"),
    ("", "proxy-auth", "USER[:PASS]", "proxy_auth", "ncat: proxy credentials (prefer the password in the environment)"),
    ("", "proxy-auth-scheme", "LIST", "proxy_auth_scheme",
     "HTTP proxies: answer a 407 with these, in order: negotiate,ntlm,digest,basic or any (default); "
     "basic alone goes up front"),
    ("", "proxy-password-file", "FILE", "proxy_password_file",
     "proxies' password: FILE's first line (chmod 600; before the environment's)"),
    ("", "proxy-password-command", "CMD", "proxy_password_command",
     "proxies' password: the first line /bin/sh -c CMD prints, run per hop (HOPCAT_PROXY_URL "
     "says which)"),
    ("S", "", "[USER@]HOST[:PORT]", "proxies",
     "connect-proxy: SOCKS5 proxy (port 1080; -4: SOCKS4; user from SOCKS5_USER, SOCKS_USER, CONNECT_USER)"),
    ("H", "", "[USER@]HOST[:PORT]", "proxies",
     "connect-proxy: HTTP proxy (default port 80; user from HTTP_PROXY_USER, CONNECT_USER)"),
    ("", "proxy-dns", "local|remote|both|none", "proxy_dns",
     "where target names are resolved (default remote: sent to the proxy; none: addresses only)"),
    ("", "no-proxy", "", "no_proxy", "ignore proxies in the environment (ALL_PROXY, SOCKS5_SERVER, ...)"),
    ("F", "fdpass", "", "fdpass",
     "pass the connected socket to ssh over stdout and exit (ProxyUseFdpass yes)"),
    ("z", "scan", "", "scan",
     "port scan, as nc -z: HOST PORTS (22, 20-25, 80,443); -v: open ports, -vv: all"),
    ("r", "random-order", "", "random_order", "-z: scan the ports in random order"),
    ("i", "interval", "SECS", "interval_s",
     "wait SECS after each line sent (nc); with -z between ports, one at a time"),
    ("", "max-parallel", "N", "max_parallel",
     "-z: at most N connects in flight (default 512 within the fd limit; 32 through proxies)"),
    ("", "proxy-cacert", "FILE", "proxy_cacert", "CA bundle to verify TLS proxies' certificates (https://, socks5+tls://)"),
    ("", "proxy-insecure", "", "proxy_insecure", "do not verify TLS proxies' certificates"),
    ("c", "tls", "", "tls",
     "TLS to the target once the tunnel is open, through any chain (nc -c; ncat --ssl); with -l: "
     "a TLS listener"),
    ("", "tls-ca", "FILE", "tls_ca",
     "trust the CAs in FILE instead of the system's (nc -R; ncat --ssl-trustfile)"),
    ("", "tls-servername", "NAME", "tls_servername",
     "the name for SNI and the certificate check (default HOST; ncat --ssl-servername)"),
    ("", "tls-cert", "FILE", "tls_cert",
     "a client certificate (PEM; nc -C, ncat --ssl-cert); with -l the server's"),
    ("", "tls-key", "FILE", "tls_key", "its key, if not in --tls-cert's file (nc -K; ncat --ssl-key)"),
    ("", "tls-alpn", "LIST", "tls_alpn", "ALPN protocols to offer, comma-separated (ncat --ssl-alpn)"),
    ("", "tls-pin", "sha256:HEX", "tls_pin",
     "trust the peer's certificate by its SHA-256, as -v prints it (nc -H); with --tls-ca, both"),
    ("", "tls-min-version", "1.2|1.3", "tls_min_version", "the oldest TLS version accepted (default 1.2)"),
    ("", "tls-insecure", "", "tls_insecure", "do not check the peer's certificate (warned about)"),
    ("", "tls-verify-client", "", "tls_verify_client",
     "with -l --tls: require a client certificate signed by --tls-ca"),
    ("", "ssl-verify", "", "ssl_verify", "ncat: verify the certificate (hopcat always does)"),
    ("l", "listen", "", "listen",
     "listen: -l [ADDR] PORT (or -p PORT), or -l -U PATH; relay the connection (nc, ncat)"),
    ("k", "keep-open", "", "keep_open",
     "with -l: accept the next connection when one ends, one at a time (nc -k)"),
    ("p", "source-port", "PORT", "source_port",
     "connect from this local port (nc; the first hop's through proxies); with -l the port to listen on"),
    ("U", "unixsock", "", "unix",
     "the operand is a Unix socket PATH (@name: abstract): connect, or listen with -l"),
    ("", "allow", "ADDR[,ADDR]", "allow",
     "with -l: accept only these clients (addresses or CIDR networks; ncat)"),
    ("", "deny", "ADDR[,ADDR]", "deny", "with -l: refuse these clients (ncat)"),
    ("e", "exec", "CMD", "exec_cmd",
     "run CMD (split on blanks, no shell) with the connection as its stdin and stdout (ncat)"),
    ("", "sh-exec", "CMD", "sh_exec", "the same through /bin/sh -c CMD (ncat)"),
    ("", "max-conns", "N", "max_conns",
     "with -l -k and an exec: children at once (default 100, ncat's)"),
    ("", "ready-fd", "N", "ready_fd", "with -l: write the bound address to fd N, then close it"),
    ("", "ready-file", "PATH", "ready_file",
     "with -l: write the bound address to PATH (atomically) once listening"),
    ("u", "udp", "", "udp",
     "UDP: each read of stdin is one datagram (nc -u); with -l: lock on to the first sender; "
     "with -z: a UDP probe"),
    ("W", "recv-count", "N", "recv_count", "with -u: exit after N datagrams received (nc)"),
    ("b", "broadcast", "", "broadcast", "with -u: allow sending to a broadcast address (nc)"),
    ("v", "verbose", "", "verbose", "timeline on stderr, in ms since start"),
    ("", "debug", "", "debug", "show a traceback on unexpected errors"),
    ("h", "help", "", "help", "show this help and exit"),
    ("V", "version", "", "version", "show the version and exit"),
)

_ROWS = {f"-{row[0]}": row for row in OPTION_TABLE if row[0]}
_ROWS.update({f"--{row[1]}": row for row in OPTION_TABLE if row[1]})
# ncat's names for the TLS options.
_ALIASES = {"--ssl": "--tls", "--ssl-trustfile": "--tls-ca", "--ssl-servername": "--tls-servername",
            "--ssl-cert": "--tls-cert", "--ssl-key": "--tls-key", "--ssl-alpn": "--tls-alpn"}  # fmt: skip
_ROWS.update({alias: _ROWS[name] for alias, name in _ALIASES.items()})
_TLS_OPTIONS = (("tls_ca", "--tls-ca"), ("tls_servername", "--tls-servername"),
                ("tls_cert", "--tls-cert"), ("tls_key", "--tls-key"), ("tls_alpn", "--tls-alpn"),
                ("tls_pin", "--tls-pin"), ("tls_min_version", "--tls-min-version"),
                ("tls_insecure", "--tls-insecure"), ("tls_verify_client", "--tls-verify-client"))  # fmt: skip
_FLOAT_OPTIONS = frozenset(
    {"connect_timeout_s", "idle_timeout_s", "quit_after_eof_s", "interval_s"}
)
_COUNTED = frozenset({"verbose"})
_LISTS = frozenset({"proxies"})  # (flag as typed, value) pairs, in command-line order
_REPEATED = frozenset({"allow", "deny"})  # values in command-line order


class Options:
    """Parsed options: one explicit object passed down, no globals."""

    ipv4_only: bool
    ipv6_only: bool
    source: str | None
    numeric: bool
    connect_timeout_s: float | None
    idle_timeout_s: float | None
    quit_after_eof_s: float | None
    shutdown_flag: bool
    no_shutdown: bool
    keep_sending: bool
    no_stdin: bool
    crlf: bool
    recv_buf: str | None
    send_buf: str | None
    tos: str | None
    ttl: str | None
    so_debug: bool
    keepalive: bool
    nagle: bool
    proxies: list[tuple[str, str]]
    nc_proxy_type: str | None
    nc_proxy_user: str | None
    ncat_proxy_type: str | None
    proxy_auth: str | None
    proxy_auth_scheme: str | None
    proxy_password_file: str | None
    proxy_password_command: str | None
    proxy_dns: str | None
    no_proxy: bool
    proxy_cacert: str | None
    proxy_insecure: bool
    tls: bool
    tls_ca: str | None
    tls_servername: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_alpn: str | None
    tls_pin: str | None
    tls_min_version: str | None
    tls_insecure: bool
    tls_verify_client: bool
    ssl_verify: bool
    fdpass: bool
    listen: bool
    keep_open: bool
    source_port: str | None
    unix: bool
    allow: list[str]
    deny: list[str]
    ready_fd: str | None
    ready_file: str | None
    exec_cmd: str | None
    sh_exec: str | None
    max_conns: str | None
    scan: bool
    random_order: bool
    interval_s: float | None
    max_parallel: str | None
    udp: bool
    recv_count: str | None
    broadcast: bool
    verbose: int
    debug: bool
    help: bool
    version: bool
    operands: list[str]
    spelled: set[str]  # every flag as typed ("-d", "--no-stdin"): some letters depend on company
    notes: list[str]  # how a flag from another tool's family was read, for -v
    connect_proxy_socks4: bool  # -4 with -S: connect-proxy's SOCKS4

    def __init__(self) -> None:
        for _short, _long, metavar, attr, _help in OPTION_TABLE:
            if attr in _COUNTED:
                setattr(self, attr, 0)
            elif attr in _LISTS or attr in _REPEATED:
                setattr(self, attr, [])
            else:
                setattr(self, attr, None if metavar else False)
        self.operands = []
        self.spelled = set()
        self.notes = []
        self.connect_proxy_socks4 = False


def _metavar_of(flag: str) -> str | None:
    row = _ROWS.get(flag)
    return None if row is None else row[2]


# ncat's time suffixes ("500ms", "2m"), so its command lines keep their meaning.
_TIME_UNITS_S = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def _seconds(value: str, flag: str) -> float:
    number, scale = value, 1.0
    for suffix, unit_s in _TIME_UNITS_S:
        if value.endswith(suffix):
            number, scale = value[: -len(suffix)], unit_s
            break
    try:
        if not number.strip() or number != number.strip() or "_" in number:
            raise ValueError
        seconds = float(number) * scale
    except ValueError:
        raise UsageError(f"{flag} takes a number of seconds, not {value!r}") from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise UsageError(f"{flag} takes a finite number of seconds")
    return seconds


def _store(
    options: Options, row: tuple[str, str, str, str, str], flag: str, value: str | None
) -> None:
    attr = row[3]
    options.spelled.add(flag)
    if value is None:
        if attr in _COUNTED:
            setattr(options, attr, getattr(options, attr) + 1)
        else:
            setattr(options, attr, True)
    elif attr in _LISTS:
        getattr(options, attr).append((flag, value))
    elif attr in _REPEATED:
        getattr(options, attr).append(value)
    elif attr in _FLOAT_OPTIONS:
        setattr(options, attr, _seconds(value, flag))
    else:
        setattr(options, attr, value)


def parse_args(argv: Sequence[str]) -> Options:
    options = Options()
    for flag, value in scan_options(argv, _metavar_of, see="see hopcat --help"):
        if flag:
            _store(options, _ROWS[flag], flag, value)
        else:
            options.operands.append(value or "")
    _borrowed_letters(options)
    if options.ipv4_only and options.ipv6_only:
        raise UsageError("-4 and -6 exclude each other")
    for attr, flag in (("connect_timeout_s", "--connect-timeout"), ("idle_timeout_s", "-w")):
        value = getattr(options, attr)
        if value is not None and value < 0:
            raise UsageError(f"{flag} must not be negative")
    if options.source is not None and not is_ip_literal(options.source):
        raise UsageError(f"-s takes a local IP address, not {options.source!r}")
    if options.proxy_dns is not None and options.proxy_dns not in PROXY_DNS_POLICIES:
        raise UsageError(f"--proxy-dns takes {', '.join(PROXY_DNS_POLICIES)}")
    listen_only = [flag for attr, flag in (
        ("keep_open", "-k"), ("allow", "--allow"), ("deny", "--deny"),
        ("ready_fd", "--ready-fd"), ("ready_file", "--ready-file"), ("max_conns", "--max-conns"),
    ) if getattr(options, attr)]  # fmt: skip
    if listen_only and not options.listen:
        raise UsageError(f"{listen_only[0]} works with -l (listen mode) only")
    if options.fdpass and (options.exec_cmd is not None or options.sh_exec is not None):
        raise UsageError("-F hands the socket to ssh; --exec hands it to a program: pick one")
    if options.listen and (options.proxies or options.fdpass):
        raise UsageError("-l listens here: it takes no proxy (-x) and no -F")
    if options.unix and (options.proxies or options.fdpass or options.source):
        raise UsageError("-U talks to a local Unix socket: it takes no proxy, -F or -s")
    if not options.scan:
        for attr, flag in (("random_order", "-r"), ("max_parallel", "--max-parallel")):
            if getattr(options, attr) not in (None, False):
                raise UsageError(f"{flag} is for a port scan: add -z")
    else:
        for attr, flag in (("listen", "-l"), ("unix", "-U"), ("exec_cmd", "-e"),
                           ("sh_exec", "--sh-exec"), ("source_port", "-p"), ("fdpass", "-F"),
                           ("source", "-s"), ("crlf", "-C"), ("recv_buf", "-I"),
                           ("send_buf", "-O"), ("tos", "-T"), ("ttl", "-M"), ("so_debug", "-D")):
            if getattr(options, attr) not in (None, False):
                what = "UDP" if options.udp else "TCP"
                raise UsageError(f"-z scans {what} ports from here: it takes no {flag}")
    _check_udp(options)
    _check_tls(options)
    if options.proxy_password_file is not None and options.proxy_password_command is not None:
        raise UsageError("--proxy-password-file and --proxy-password-command exclude each other")
    if options.proxy_password_file == "" or options.proxy_password_command == "":
        raise UsageError("--proxy-password-file and --proxy-password-command take a non-empty value")
    if options.interval_s is not None and options.interval_s < 0:
        raise UsageError("-i must not be negative")
    if options.quit_after_eof_s is not None and options.quit_after_eof_s < 0:
        options.quit_after_eof_s = None  # nc: a negative -q means wait forever
    return options


def _check_udp(options: Options) -> None:
    if not options.udp:
        for attr, flag in (("recv_count", "-W"), ("broadcast", "-b")):
            if getattr(options, attr) not in (None, False):
                raise UsageError(f"{flag} is for UDP: add -u")
        return
    if options.scan:
        for attr, flag in (("recv_count", "-W"), ("broadcast", "-b")):
            if getattr(options, attr) not in (None, False):
                raise UsageError(f"-z -u sends one probe per port: it takes no {flag}")
        return
    for attr, flag, why in (
        ("unix", "-U", "a Unix socket path is not a UDP target"),
        ("fdpass", "-F", "ssh's ProxyCommand needs a byte stream, not datagrams"),
        ("exec_cmd", "-e", "a program would see a byte stream, not datagrams"),
        ("sh_exec", "--sh-exec", "a program would see a byte stream, not datagrams"),
        ("tls", "--tls", "TLS needs a byte stream (DTLS is not supported)"),
        ("crlf", "-C", "each read of stdin is one datagram, sent as it is"),
        ("interval_s", "-i", "each read of stdin is one datagram, sent as it is"),
        ("keepalive", "--keepalive", "it is a TCP option"),
        ("nagle", "--nagle", "it is a TCP option"),
        ("keep_sending", "--keep-sending", "UDP has no end of stream to keep sending after"),
        ("no_shutdown", "--no-shutdown", "UDP has no half-close"),
        ("allow", "--allow", "-u -l locks on to the first sender"),
        ("deny", "--deny", "-u -l locks on to the first sender"),
        ("max_conns", "--max-conns", "it bounds --exec children"),
    ):
        if getattr(options, attr) not in (None, False, []):
            raise UsageError(f"-u does not take {flag}: {why}")


def _check_tls(options: Options) -> None:
    given = [flag for attr, flag in _TLS_OPTIONS if getattr(options, attr) not in (None, False)]
    if not options.tls:
        if given:
            raise UsageError(f"{given[0]} is a TLS option: add --tls (-c)")
        return
    if options.fdpass:
        raise UsageError("-F hands ssh the socket, but with --tls the TLS session lives in hopcat: "
                         "drop -F (ProxyUseFdpass no)")  # fmt: skip
    if options.scan:
        raise UsageError("-z only tells whether ports accept TCP: it takes no --tls")
    if options.tls_verify_client and not options.listen:
        raise UsageError("--tls-verify-client is for a listener: add -l")
    if options.listen and (options.tls_servername or options.tls_alpn or options.tls_pin):
        flag = next(flag for attr, flag in _TLS_OPTIONS[1:7:1]
                    if attr in ("tls_servername", "tls_alpn", "tls_pin") and getattr(options, attr))  # fmt: skip
        raise UsageError(f"{flag} is for a TLS client: -l --tls takes --tls-cert, --tls-key, "
                         "--tls-ca, --tls-verify-client and --tls-min-version")  # fmt: skip
    if options.listen and options.tls_insecure:
        raise UsageError("--tls-insecure is for a TLS client (a listener checks client "
                         "certificates only with --tls-verify-client)")  # fmt: skip


def wants_tuning(options: Options) -> bool:
    """Whether any of nc's socket options (-I -O -T -M -D) was given: their module is imported
    only then."""
    return bool(options.recv_buf or options.send_buf or options.tos or options.ttl
                or options.so_debug)  # fmt: skip


def positive_int(text: str, flag: str) -> int:
    """A count given on the command line: decimal digits, at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"{flag} takes a positive number, not {text!r}")
    return int(text)


def fd_budget(wanted: int, margin: int = 32) -> int:
    """``wanted`` descriptors at once, within the soft RLIMIT_NOFILE less ``margin`` (the
    listener, stdio, a connection being handed over)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - margin))


def address_family(options: Options) -> int:
    """-4 or -6 as an address family (AF_UNSPEC: either)."""
    import _socket

    if options.ipv4_only:
        return _socket.AF_INET
    return _socket.AF_INET6 if options.ipv6_only else _socket.AF_UNSPEC


def _borrowed_letters(options: Options) -> None:
    """Read the letters the tools disagree on the way the tool the line was copied from does.

    A ProxyCommand copied from connect-proxy (-S/-H) or ncat (--proxy...) must not change meaning
    silently: connect-proxy's -d is debug output (nc's: do not read stdin, which would starve
    ssh) and its -4 picks SOCKS4 for -S (nc's: IPv4 only); for ncat and connect-proxy -w is the
    connect timeout only (nc's: also idle).
    The long spellings (--no-stdin, --idle-timeout, --connect-timeout) always mean hopcat's.
    """
    flags = {flag for flag, _value in options.proxies}
    connect_proxy = bool(flags & {"-S", "-H"})
    ncat = "--proxy" in flags or bool(options.spelled & {"--proxy-type", "--proxy-auth"})
    if "-d" in options.spelled and connect_proxy:
        if "--no-stdin" not in options.spelled:
            options.no_stdin = False
        options.verbose += 1
        options.notes.append("-d with -S/-H is connect-proxy's debug output: read as -v "
                             "(--no-stdin is hopcat's 'do not read stdin')")
    if "-4" in options.spelled and "-S" in flags:
        options.ipv4_only = False
        options.connect_proxy_socks4 = True
        options.notes.append("-4 with -S is connect-proxy's SOCKS4: -S speaks socks4:// "
                             "(not IPv4-only; write -x socks5h://... -4 for that)")
    if "-w" in options.spelled and (connect_proxy or ncat):
        family = "connect-proxy" if connect_proxy else "ncat"
        if options.connect_timeout_s is None:
            options.connect_timeout_s = options.idle_timeout_s
        if "--idle-timeout" not in options.spelled:
            options.idle_timeout_s = None
        options.notes.append(f"-w with {family}'s flags is its connect timeout only, not an idle "
                             "timeout (--idle-timeout SECS for that)")


def help_text(prog: str = "hopcat") -> str:
    lines = [
        f"usage: {prog} [options] HOST PORT",
        f"       {prog} -l [options] [ADDR] PORT   |   {prog} [-l] -U PATH",
        f"       {prog} -u [options] HOST PORT   |   {prog} -u -l [options] [ADDR] PORT",
        f"       {prog} -z [-v|-vv] [options] HOST PORTS",
        f"       {prog} ssh-config [--host PATTERN] [proxy options] | --check HOST",
        "",
        "Open a TCP connection to HOST PORT and relay stdin/stdout over it, built for",
        "OpenSSH's ProxyCommand: true half-close, zero-copy splice(2), nothing lost.",
        "",
        "options:",
    ]
    for short, long, metavar, _attr, text in OPTION_TABLE:
        names = ", ".join(
            n for n in (f"-{short}" if short else "", f"--{long}" if long else "") if n
        )
        if metavar:
            names += f" {metavar}"
        lines.append(f"  {names:<26} {text}" if len(names) <= 26 else f"  {names}\n  {'':<26} {text}")
    lines += [
        "",
        "Proxy URLs: socks4|socks4a|socks5|socks5h|http|https://[USER[:PASS]@]HOST[:PORT]",
        "(names go to the proxy, remote DNS, for every type but socks4); socks5+tls:// and the",
        "other SOCKS schemes with +tls speak SOCKS over TLS.",
        "",
        "In ~/.ssh/config:",
        "  Host *.internal",
        "      ProxyCommand hopcat -x socks5h://127.0.0.1:1080 %h %p",
        "",
        "Environment: ALL_PROXY, SOCKS5_SERVER, SOCKS_SERVER, SOCKS4_SERVER, NO_PROXY;",
        "passwords, after the URL's and the --proxy-password-* options: HOPCAT_PROXY_PASSWORD,",
        "then SOCKS5_PASSWD, SOCKS5_PASSWORD (SOCKS5) or HTTP_PROXY_PASSWORD (HTTP), then",
        "CONNECT_PASSWORD, then a /dev/tty prompt or, without a terminal, an askpass program",
        "(HOPCAT_ASKPASS, or SSH_ASKPASS with DISPLAY as ssh; SSH_ASKPASS_REQUIRE as ssh).",
        "",
        "Exit codes: 0 ok (-z: a port open), 1 no port open (-z), 64 usage, 68 name not resolved,",
        "69 refused/unreachable, 70 internal error, 74 I/O error while relaying, 75 timeout,",
        "76 proxy protocol error, 77 proxy authentication failed (or no password obtained),",
        "80 proxy unreachable, 81 proxy refused the target, 82 TLS with the target or client",
        "failed, 130 interrupted.",
    ]
    return "\n".join(lines) + "\n"
