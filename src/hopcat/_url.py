"""Proxy URLs: ``scheme://[user[:password]@]host[:port]``, and how to show them without secrets.

Schemes and what they mean here:

=========  =========  ============================================================
scheme     default    target names
=========  =========  ============================================================
socks4     1080       resolved locally (SOCKS4 carries only IPv4 addresses)
socks4a    1080       sent to the proxy (remote DNS)
socks5     1080       sent to the proxy (remote DNS): unlike curl, where socks5://
                      resolves locally and only socks5h:// sends the name
socks5h    1080       sent to the proxy (remote DNS)
http       3128       sent to the proxy in the CONNECT line (ncat's default port)
https      443        as http, over TLS to the proxy
socks5+tls 1080       as socks5, over TLS to the proxy (also socks5h+tls, socks4+tls,
                      socks4a+tls; gost's spelling; pproxy's ``+ssl`` and ``http+tls``
                      are read as these)
=========  =========  ============================================================

``--proxy-dns local|remote|both|none`` overrides the name policy for every type that can carry one
(``none``: addresses only). Ambiguous input is refused rather than guessed: a bare IPv6 address
(``::1:1080``: is 1080 the port?), ``/ ? #`` unencoded in a user or password (they end the host
part of a URL), an empty user before ``@``.
Parsed by hand rather than with urllib.parse, which costs several ms of imports at start-up.
"""

from __future__ import annotations

from hopcat._endpoint import (
    check_unicode,
    format_hostport,
    parse_port,
    split_hostport,
    validate_host,
)
from hopcat.errors import UsageError

DEFAULT_PORTS = {"socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080, "http": 3128,
                 "https": 443, "socks4+tls": 1080, "socks4a+tls": 1080, "socks5+tls": 1080,
                 "socks5h+tls": 1080}  # fmt: skip
# Other tools' spellings of the same schemes (pproxy writes TLS as "+ssl", gost "+tls").
SCHEME_ALIASES = {"http+tls": "https", "http+ssl": "https", "https+tls": "https",
                  "socks4+ssl": "socks4+tls", "socks4a+ssl": "socks4a+tls",
                  "socks5+ssl": "socks5+tls", "socks5h+ssl": "socks5h+tls"}  # fmt: skip
# --proxy-dns; the first is the default. "none" (ncat's): resolve nowhere, targets must be addresses.
PROXY_DNS_POLICIES = ("remote", "local", "both", "none")
PROTOCOL_OF_SCHEME = {"socks4": "socks4", "socks4a": "socks4", "socks5": "socks5",
                      "socks5h": "socks5", "http": "http", "https": "http",
                      "socks4+tls": "socks4", "socks4a+tls": "socks4", "socks5+tls": "socks5",
                      "socks5h+tls": "socks5"}  # fmt: skip


class ProxyURL:
    """One hop of a chain. ``origin`` says where it came from, for -v (e.g. "-x", "ALL_PROXY").
    ``auth_schemes``: for an HTTP proxy, the authentication schemes to answer a 407 with, in
    order (``hopcat.net.proxy_auth.SCHEMES``); None for all in hopcat's order."""

    __slots__ = ("auth_schemes", "host", "origin", "password", "port", "scheme", "username")

    def __init__(
        self, scheme: str, host: str, port: int, username: str | None = None,
        password: str | None = None, origin: str = "",
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.origin = origin
        self.auth_schemes: tuple[str, ...] | None = None

    @property
    def protocol(self) -> str:
        """'socks4', 'socks5' or 'http': which state machine speaks to this proxy."""
        return PROTOCOL_OF_SCHEME[self.scheme]

    @property
    def tls(self) -> bool:
        """Whether the proxy is spoken to over TLS (https://, socks5+tls://, ...)."""
        return self.scheme == "https" or self.scheme.endswith("+tls")

    @property
    def plain_scheme(self) -> str:
        """The scheme without its TLS: socks5h for socks5h+tls, http for https."""
        return "http" if self.scheme == "https" else self.scheme.removesuffix("+tls")

    @property
    def carries_names(self) -> bool:
        return self.plain_scheme != "socks4"

    def label(self) -> str:
        """The URL as it may be shown: the password is never printed, only that there is one."""
        return self._url(":***" if self.password is not None else "")

    def without_password(self) -> str:
        """The URL as it may be written into a file: no password, not even a mark."""
        return self._url("")

    def _url(self, password_part: str) -> str:
        userinfo = "" if self.username is None else f"{_quote(self.username)}{password_part}@"
        return f"{self.scheme}://{userinfo}{format_hostport(self.host, self.port)}"

    def __repr__(self) -> str:
        return f"ProxyURL({self.label()!r})"


# Characters that end a URL's authority (RFC 3986 section 3.2) and so must be percent-encoded in a
# user name or password.
_URL_DELIMITERS = (("/", "%2F"), ("?", "%3F"), ("#", "%23"))


def _percent_decode(text: str, what: str, field: str) -> str:
    check_unicode(text, f"{what}: {field}")  # before encoding it below, and percent-free text too
    if "%" not in text:
        return text
    raw = bytearray()
    index = 0
    encoded = text.encode("utf-8")
    while index < len(encoded):
        byte = encoded[index]
        if byte == 0x25:  # '%'
            pair = encoded[index + 1 : index + 3]
            try:
                raw.append(int(pair, 16))
            except ValueError:
                raise UsageError(f"{what}: bad percent-escape in the user or password") from None
            if len(pair) != 2:
                raise UsageError(f"{what}: bad percent-escape in the user or password")
            index += 3
        else:
            raw.append(byte)
            index += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what}: the user or password is not UTF-8 after percent-decoding") from None


def _quote(text: str) -> str:
    return "".join(
        ch if (ch.isascii() and ch.isalnum()) or ch in "-._~" else
        "".join(f"%{byte:02X}" for byte in ch.encode())
        for ch in text
    )


def parse_proxy_url(
    text: str, *, origin: str = "", default_scheme: str | None = None, default_port: int | None = None
) -> ProxyURL:
    """Parse one proxy URL; ``default_scheme`` allows a bare ``[user@]host[:port]``.

    Error messages never quote the text, since it may carry a password.
    """
    what = f"proxy {origin}".rstrip() if origin else "proxy"
    scheme, sep, rest = text.partition("://")
    if not sep:
        if default_scheme is None:
            raise UsageError(
                f"{what}: expected a URL like socks5h://HOST:PORT or http://HOST:PORT"
            )
        scheme, rest = default_scheme, text
    scheme = scheme.lower()
    scheme = SCHEME_ALIASES.get(scheme, scheme)
    if scheme not in DEFAULT_PORTS:
        raise UsageError(
            f"{what}: unknown scheme {scheme!r} (use socks4, socks4a, socks5, socks5h, http or "
            "https; socks5+tls and the others +tls for SOCKS over TLS)"
        )
    userinfo, at, hostport = rest.rpartition("@")
    for char, escape in _URL_DELIMITERS:
        if char in userinfo:
            # In a URL these end the host part, so "u:p/w@h" has no single reading.
            raise UsageError(
                f"{what}: the user or password contains {char!r}: percent-encode it as {escape}"
            )
    hostport = hostport.removesuffix("/")
    if any(char in hostport for char, _escape in _URL_DELIMITERS):
        raise UsageError(f"{what}: a proxy URL has no path, query or fragment")
    username = password = None
    if at:
        user_text, colon, pass_text = userinfo.partition(":")
        if not user_text:
            raise UsageError(f"{what}: empty user name before '@' (drop the '@' for no user)")
        username = _percent_decode(user_text, what, "the user name")
        if colon:
            password = _percent_decode(pass_text, what, "the password")
    host_text, port_text = split_hostport(hostport, what=what)
    if ":" in host_text and not host_text.startswith("["):
        # "::1:1080" is a valid address by itself: is 1080 the port or its last group?
        raise UsageError(
            f"{what}: an IPv6 address needs brackets, e.g. [{host_text}] or [{host_text}]:PORT"
        )
    host = validate_host(host_text, what=f"{what} host")
    if port_text is not None:
        port = parse_port(port_text, what=f"{what} port")
    else:
        port = default_port if default_port is not None and not sep else DEFAULT_PORTS[scheme]
    return ProxyURL(scheme, host, port, username, password, origin)
