"""Which proxies to use: command-line flags of hopcat, nc, ncat and connect-proxy, then the
environment; and where each proxy's password comes from.

Precedence: any proxy flag on the command line wins and the environment is not read for proxies;
``--no-proxy`` ignores the environment; otherwise ``all_proxy``/``ALL_PROXY`` (curl's spelling,
a URL; bare ``host:port`` means http as in curl), then connect-proxy's ``SOCKS5_SERVER``,
``SOCKS_SERVER`` (SOCKS5) and ``SOCKS4_SERVER``. ``no_proxy``/``NO_PROXY`` (comma-separated names,
domain suffixes, ``*``, IP addresses or CIDR blocks) exempts targets from an environment proxy.

Users: connect-proxy's proxies (``-S``, ``-H`` and its ``SOCKS*_SERVER`` variables) without a
``user@`` take the user from its environment as connect-proxy does: ``SOCKS5_USER`` or
``SOCKS4_USER``, then ``SOCKS_USER`` (SOCKS), or ``HTTP_PROXY_USER`` (HTTP), then ``CONNECT_USER``.
(connect-proxy would then fall back to the login name; hopcat sends no user it was not given.)

Passwords never have to be on argv: a hop with a user and no password takes it from
``HOPCAT_PROXY_PASSWORD``, then connect-proxy's ``SOCKS5_PASSWD`` or ``SOCKS5_PASSWORD`` (SOCKS5)
or ``HTTP_PROXY_PASSWORD`` (HTTP), then ``CONNECT_PASSWORD``, then a prompt on /dev/tty. Never
from stdin: that is ssh's data.
"""

from __future__ import annotations

import os

from hopcat._endpoint import check_unicode
from hopcat._url import ProxyURL, parse_proxy_url
from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from hopcat.cli._args import Options

NC_TYPES = {"4": "socks4", "5": "socks5", "connect": "http"}
NCAT_TYPES = {"socks4": "socks4", "socks4a": "socks4a", "socks5": "socks5", "http": "http"}
# connect-proxy's user variables per protocol, first found wins (its determine_relay_user()).
CONNECT_PROXY_USER_VARIABLES = {
    "socks5": ("SOCKS5_USER", "SOCKS_USER", "CONNECT_USER"),
    "socks4": ("SOCKS4_USER", "SOCKS_USER", "CONNECT_USER"),
    "http": ("HTTP_PROXY_USER", "CONNECT_USER"),
}
CONNECT_PROXY_ORIGINS = frozenset({"-S", "-H", "SOCKS5_SERVER", "SOCKS_SERVER", "SOCKS4_SERVER"})
PASSWORD_VARIABLES = {
    "socks5": ("HOPCAT_PROXY_PASSWORD", "SOCKS5_PASSWD", "SOCKS5_PASSWORD", "CONNECT_PASSWORD"),
    "http": ("HOPCAT_PROXY_PASSWORD", "HTTP_PROXY_PASSWORD", "CONNECT_PASSWORD"),
}
ENV_PROXY_VARIABLES = (
    ("all_proxy", "http"), ("ALL_PROXY", "http"), ("SOCKS5_SERVER", "socks5"),
    ("SOCKS_SERVER", "socks5"), ("SOCKS4_SERVER", "socks4"),
)


def _bare_scheme(flag: str, options: Options) -> str:
    if flag == "-x":
        if options.nc_proxy_type is None:
            return "socks5"  # OpenBSD nc: -x without -X speaks SOCKS5
        scheme = NC_TYPES.get(options.nc_proxy_type.lower())
        if scheme is None:
            raise UsageError(f"-X takes 4, 5 or connect, not {options.nc_proxy_type!r}")
        return scheme
    if flag == "--proxy":
        if options.ncat_proxy_type is None:
            return "http"  # ncat: --proxy without --proxy-type speaks HTTP
        scheme = NCAT_TYPES.get(options.ncat_proxy_type.lower())
        if scheme is None:
            raise UsageError(
                f"--proxy-type takes socks4, socks4a, socks5 or http, not {options.ncat_proxy_type!r}"
            )
        return scheme
    if flag == "-S":
        return "socks4" if options.connect_proxy_socks4 else "socks5"
    return "http"


def proxies_from_command_line(options: Options) -> list[ProxyURL]:
    hops = []
    for flag, text in options.proxies:
        default_port = 80 if flag == "-H" else None  # connect-proxy's -H defaults to port 80
        hop = parse_proxy_url(text, origin=flag, default_scheme=_bare_scheme(flag, options),
                              default_port=default_port)
        hops.append(hop)
    if options.nc_proxy_type is not None and not any(f == "-x" for f, _ in options.proxies):
        raise UsageError("-X needs -x HOST[:PORT]")
    if options.ncat_proxy_type is not None and not any(f == "--proxy" for f, _ in options.proxies):
        raise UsageError("--proxy-type needs --proxy HOST[:PORT]")
    user, password = None, None
    if options.proxy_auth is not None:
        user, colon, pass_text = options.proxy_auth.partition(":")
        password = pass_text if colon else None
    if options.nc_proxy_user is not None:
        user = options.nc_proxy_user
    if user is not None:
        if not user:
            raise UsageError("-P / --proxy-auth: empty user name")
        check_unicode(user, "-P / --proxy-auth: the user name")
        if password is not None:
            check_unicode(password, "--proxy-auth: the password")
        if len(hops) != 1:
            raise UsageError("-P / --proxy-auth need exactly one proxy; in a chain put user@ in each URL")
        if hops[0].username is None:
            hops[0].username, hops[0].password = user, password
    return hops


def _no_proxy_matches(host: str, patterns: str) -> bool:
    name = host.lower().rstrip(".")
    for raw in patterns.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            import ipaddress

            try:
                if ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").strip("[]")
        if name == entry or name.endswith("." + entry):
            return True
    return False


def proxies_from_environment(environ: Mapping[str, str], host: str) -> tuple[list[ProxyURL], str]:
    """Hops from the environment (at most one), and a sentence for -v saying why."""
    for variable, default_scheme in ENV_PROXY_VARIABLES:
        value = environ.get(variable, "").strip()
        if not value:
            continue
        for no_variable in ("no_proxy", "NO_PROXY"):
            patterns = environ.get(no_variable, "")
            if patterns and _no_proxy_matches(host, patterns):
                return [], f"direct: {no_variable} exempts {host} from {variable}"
        return [parse_proxy_url(value, origin=variable, default_scheme=default_scheme)], ""
    return [], "direct: no proxy on the command line or in the environment"


def _prompt_on_tty(prompt: str) -> str | None:
    """Read a line from the controlling terminal with echo off; None when there is no terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    import termios

    try:
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO
        os.write(fd, prompt.encode())
        # Echo goes off inside the try: a signal (raised as an exception by the CLI) arriving
        # right after it must still find the finally that turns it back on.
        try:
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
            line = b""
            while not line.endswith(b"\n"):
                chunk = os.read(fd, 1)
                if not chunk:
                    break
                line += chunk
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            os.write(fd, b"\n")
        return line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    except termios.error:
        return None
    finally:
        os.close(fd)


def fill_users(hops: list[ProxyURL], environ: Mapping[str, str]) -> list[str]:
    """Users from connect-proxy's environment for its own proxies; sentences for -v."""
    notes = []
    for hop in hops:
        if hop.username is not None or hop.origin not in CONNECT_PROXY_ORIGINS:
            continue
        found = _first_set(environ, CONNECT_PROXY_USER_VARIABLES[hop.protocol])
        if found is not None:
            variable, hop.username = found
            notes.append(f"{hop.label()}: user from {variable} (connect-proxy's environment)")
    return notes


def _first_set(environ: Mapping[str, str], variables: Sequence[str]) -> tuple[str, str] | None:
    """The first of ``variables`` set to a non-empty value, as (name, value); refused when the
    value is not UTF-8."""
    for variable in variables:
        value = environ.get(variable)
        if value:
            check_unicode(value, variable)
            return variable, value
    return None


def fill_passwords(
    hops: list[ProxyURL], environ: Mapping[str, str],
    prompt: Callable[[str], str | None] = _prompt_on_tty,
) -> None:
    for hop in hops:
        if hop.username is None or hop.password is not None or hop.protocol == "socks4":
            continue  # SOCKS4 carries a user id and no password
        found = _first_set(environ, PASSWORD_VARIABLES[hop.protocol])
        if found is not None:
            hop.password = found[1]
        else:
            hop.password = prompt(f"hopcat: password for {hop.label()}: ")
            if hop.password is None:
                raise UsageError(
                    f"proxy {hop.label()}: a user is given but no password; set "
                    "HOPCAT_PROXY_PASSWORD (or run where hopcat can prompt on a terminal)"
                )
