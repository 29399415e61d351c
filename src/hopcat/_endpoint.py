"""Parsing and validation of hosts, ports and ``host:port`` endpoints.

Everything that ends up in a wire format (a SOCKS request, a CONNECT line) or in getaddrinfo goes
through ``validate_host`` first, so a hostname carrying CR/LF/NUL cannot inject headers and a
too-long one fails before any byte is sent.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket

from hopcat.errors import UsageError

MAX_HOSTNAME_BYTES = 255  # the SOCKS5 domain length field is one byte (RFC 1928 section 5)


def split_scope(host: str) -> tuple[str, str]:
    """``fe80::1%eth0`` -> (``fe80::1``, ``eth0``); ("", "") unless a scoped IPv6 literal.

    ssh passes a scoped link-local target as ``%h`` this way; the zone names an interface of this
    host, so it means something to our own connect() and nothing to a proxy.
    """
    address, percent, zone = host.partition("%")
    if not percent or not zone or not zone.isascii() or not is_ipv6_literal(address):
        return "", ""
    if not all(ch.isalnum() or ch in "-_." for ch in zone):
        return "", ""
    return address, zone


def is_ip_literal(host: str) -> bool:
    if "%" in host:
        return bool(split_scope(host)[0])
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


def is_ipv6_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return False
    return True


def check_unicode(text: str, what: str) -> None:
    """Refuse text holding bytes that were not UTF-8 on the command line or in the environment
    (Python keeps them as lone surrogates, which no codec downstream can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None


def validate_host(host: str, *, what: str = "host") -> str:
    """Return ``host`` without IPv6 brackets, or raise UsageError saying what is wrong with it."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1].replace("%25", "%", 1)  # RFC 6874 writes a zone as %25 in a URL
        if not (is_ipv6_literal(inner) or split_scope(inner)[0]):
            raise UsageError(f"{what} {host!r}: brackets are only for IPv6 addresses")
        return inner
    if not host:
        raise UsageError(f"{what} is empty")
    check_unicode(host, what)
    if not host.isascii():
        try:
            host.encode("idna")  # what getaddrinfo and the proxy machines will do with it
        except UnicodeError:
            raise UsageError(f"{what} {host!r} cannot be IDNA-encoded") from None
    if any(ch <= " " or ch == "\x7f" for ch in host):
        raise UsageError(f"{what} {host!r} contains a space or control character")
    if len(host.encode("utf-8", "surrogateescape")) > MAX_HOSTNAME_BYTES:
        raise UsageError(f"{what} is longer than {MAX_HOSTNAME_BYTES} bytes")
    if "%" in host and split_scope(host)[0]:
        return host
    if ":" in host and not is_ipv6_literal(host):
        raise UsageError(f"{what} {host!r} is neither a hostname nor an IP address")
    return host


def parse_port(text: str, *, what: str = "port", allow_zero: bool = False) -> int:
    """A decimal port, or a service name from /etc/services as nc accepts (``ssh`` -> 22)."""
    if text.isdigit() and text.isascii():
        port = int(text)
        if (port == 0 and not allow_zero) or port > 65535:
            raise UsageError(f"{what} {text} is out of range (1-65535)")
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, ValueError):  # ValueError: not encodable (bytes that were not UTF-8)
        raise UsageError(f"{what} {text!r} is neither a number nor a known service name") from None


def split_hostport(text: str, *, what: str = "address") -> tuple[str, str | None]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 literal."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"{what} {text!r}: missing ']'")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":") or len(rest) == 1:
            raise UsageError(f"{what} {text!r}: expected ':PORT' after ']'")
        return host, rest[1:]
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def parse_hostport(
    text: str, default_port: int | None = None, *, what: str = "address"
) -> tuple[str, int]:
    host, port_text = split_hostport(text, what=what)
    if port_text is None:
        if default_port is None:
            raise UsageError(f"{what} {text!r} needs a port (HOST:PORT)")
        return validate_host(host, what=what), default_port
    return validate_host(host, what=what), parse_port(port_text, what=f"{what} port")


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
