"""Proxies, users and passwords from the environment, read the same way by the command line and
by ``hopcat.Chain.from_env`` (never implicitly by the library).

Proxies: ``all_proxy``/``ALL_PROXY`` (curl's spelling, a URL; bare ``host:port`` means http as in
curl), then connect-proxy's ``SOCKS5_SERVER``, ``SOCKS_SERVER`` (SOCKS5) and ``SOCKS4_SERVER``.
``no_proxy``/``NO_PROXY`` (comma-separated names, domain suffixes, ``*``, IP addresses or CIDR
blocks) exempts targets from them.

Users: connect-proxy's proxies (``-S``, ``-H`` and its ``SOCKS*_SERVER`` variables) without a
``user@`` take the user from its environment as connect-proxy does: ``SOCKS5_USER`` or
``SOCKS4_USER``, then ``SOCKS_USER`` (SOCKS), or ``HTTP_PROXY_USER`` (HTTP), then ``CONNECT_USER``.
(connect-proxy would then fall back to the login name; hopcat sends no user it was not given.)

Passwords: a hop with a user and no password takes it from ``HOPCAT_PROXY_PASSWORD``, then
connect-proxy's ``SOCKS5_PASSWD`` or ``SOCKS5_PASSWORD`` (SOCKS5) or ``HTTP_PROXY_PASSWORD``
(HTTP), then ``CONNECT_PASSWORD``.
"""

from __future__ import annotations

from hopcat._endpoint import check_unicode
from hopcat._url import ProxyURL, parse_proxy_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

ENV_PROXY_VARIABLES = (
    ("all_proxy", "http"), ("ALL_PROXY", "http"), ("SOCKS5_SERVER", "socks5"),
    ("SOCKS_SERVER", "socks5"), ("SOCKS4_SERVER", "socks4"),
)
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


def password_variable(hop: ProxyURL, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """For a hop with a user and no password: (the variable that holds its password, the
    password), or None."""
    return _first_set(environ, PASSWORD_VARIABLES[hop.protocol])


def password_from_environment(hop: ProxyURL, environ: Mapping[str, str]) -> str | None:
    """The password variable's value for a hop with a user and no password, or None."""
    found = password_variable(hop, environ)
    return None if found is None else found[1]
