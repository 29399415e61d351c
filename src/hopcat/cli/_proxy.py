"""Which proxies to use: command-line flags of hopcat, nc, ncat and connect-proxy, then the
environment; and where each proxy's password comes from.

Precedence: any proxy flag on the command line wins and the environment is not read for proxies;
``--no-proxy`` ignores the environment; otherwise the environment's proxy, users and passwords
apply as ``hopcat._environment`` reads them (shared with ``hopcat.Chain.from_env``).

Passwords never have to be on argv: ``hopcat.cli._password`` has the sources after the URL's
(a file, a command, the environment, the terminal, an askpass). Never from stdin: that is ssh's
data.
"""

from __future__ import annotations

from hopcat._endpoint import check_unicode
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


def fill_passwords(
    hops: list[ProxyURL], environ: Mapping[str, str], *, password_file: str | None = None,
    password_command: str | None = None, trace: Callable[[str], None] | None = None,
    prompt: Callable[[str], str | None] | None = None,
) -> None:
    """Give each hop with a user and no password its own, from the sources in
    ``hopcat.cli._password`` (``prompt`` replaces the terminal's, for tests)."""
    count = len(hops)
    needy = [(index, hop) for index, hop in enumerate(hops, 1)
             if hop.username is not None and hop.password is None and hop.protocol != "socks4"]  # fmt: skip
    if not needy:  # SOCKS4 carries a user id and no password
        given = "--proxy-password-file" if password_file is not None else (
            "--proxy-password-command" if password_command is not None else None)
        if trace is not None and given is not None:
            trace(f"{given} unused: no proxy has a user without a password (write user@ in "
                  "the proxy URL)")  # fmt: skip
        return
    from hopcat.cli._password import PasswordSources

    sources = PasswordSources(environ, password_file=password_file,
                              password_command=password_command, trace=trace)  # fmt: skip
    if prompt is not None:
        sources.prompt = prompt
    for index, hop in needy:
        hop.password = sources.password_for(hop, index, count)
