"""Which proxies to use: command-line flags of hopcat, nc, ncat and connect-proxy, then the
environment; and where each proxy's password comes from.

Precedence: any proxy flag on the command line wins and the environment is not read for proxies;
``--no-proxy`` ignores the environment; otherwise the environment's proxy, users and passwords
apply as ``hopcat._environment`` reads them (shared with ``hopcat.Chain.from_env``).

Passwords never have to be on argv: after the environment's variables comes a prompt on
/dev/tty. Never from stdin: that is ssh's data.
"""

from __future__ import annotations

import os

from hopcat._endpoint import check_unicode
from hopcat._environment import password_from_environment
from hopcat._url import ProxyURL, parse_proxy_url
from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from hopcat.cli._args import Options

NC_TYPES = {"4": "socks4", "5": "socks5", "connect": "http"}
NCAT_TYPES = {"socks4": "socks4", "socks4a": "socks4a", "socks5": "socks5", "http": "http"}


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


def apply_auth_schemes(hops: list[ProxyURL], options: Options) -> None:
    """``--proxy-auth-scheme``: the schemes every HTTP hop may answer a 407 with."""
    if options.proxy_auth_scheme is None:
        return
    from hopcat.net.proxy_auth import parse_scheme_list

    try:
        schemes = parse_scheme_list(options.proxy_auth_scheme)
    except ValueError as exc:
        raise UsageError(f"--proxy-auth-scheme: {exc}") from None
    http_hops = [hop for hop in hops if hop.protocol == "http"]
    if not http_hops:
        raise UsageError("--proxy-auth-scheme is for HTTP proxies, and no hop is one")
    for hop in http_hops:
        hop.auth_schemes = schemes


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


def fill_passwords(
    hops: list[ProxyURL], environ: Mapping[str, str],
    prompt: Callable[[str], str | None] = _prompt_on_tty,
) -> None:
    for hop in hops:
        if hop.username is None or hop.password is not None or hop.protocol == "socks4":
            continue  # SOCKS4 carries a user id and no password
        hop.password = password_from_environment(hop, environ)
        if hop.password is None:
            hop.password = prompt(f"hopcat: password for {hop.label()}: ")
            if hop.password is None:
                raise UsageError(
                    f"proxy {hop.label()}: a user is given but no password; set "
                    "HOPCAT_PROXY_PASSWORD (or run where hopcat can prompt on a terminal)"
                )
