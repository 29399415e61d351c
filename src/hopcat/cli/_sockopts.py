"""nc's socket options: ``-I``/``-O`` (receive and send buffer sizes), ``-T`` (ToS or DSCP),
``-M`` (TTL or IPv6 hop limit), ``-D`` (SO_DEBUG). Set on every socket hopcat dials (each Happy
Eyeballs attempt, before its connect, so the buffer sizes shape TCP's window scaling) and on a
listener and the connections it accepts.

``-T`` takes OpenBSD nc's keywords (``lowdelay``, ``throughput``, ``reliability``,
``lowcost``, ``critical``, ``inetcontrol``, ``netcontrol``), the DSCP names (``af11`` to
``af43``, ``cs0`` to ``cs7``, ``ef``, ``va``), or a number from 0 to 255 (``0x`` for hex): the
whole ToS byte, as IP_TOS or IPV6_TCLASS takes it.
"""

from __future__ import annotations

import _socket as socket

from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hopcat.cli._args import Options

# The ToS byte per keyword: RFC 791/1349 precedence and ToS bits, RFC 2474 DSCP names << 2.
TOS_KEYWORDS: dict[str, int] = {
    "lowdelay": 0x10, "throughput": 0x08, "reliability": 0x04, "lowcost": 0x02,
    "critical": 0xA0, "inetcontrol": 0xC0, "netcontrol": 0xE0,
    "af11": 0x28, "af12": 0x30, "af13": 0x38, "af21": 0x48, "af22": 0x50, "af23": 0x58,
    "af31": 0x68, "af32": 0x70, "af33": 0x78, "af41": 0x88, "af42": 0x90, "af43": 0x98,
    "cs0": 0x00, "cs1": 0x20, "cs2": 0x40, "cs3": 0x60, "cs4": 0x80, "cs5": 0xA0, "cs6": 0xC0,
    "cs7": 0xE0, "ef": 0xB8, "va": 0xB0,
}  # fmt: skip
MAX_BUFFER_BYTES = 1 << 30


class Tuning:
    """The options to set, per address family; empty when none was given."""

    __slots__ = ("debug", "receive_buffer", "send_buffer", "tos", "ttl")

    def __init__(self, options: Options) -> None:
        self.receive_buffer = _size(options.recv_buf, "-I")
        self.send_buffer = _size(options.send_buf, "-O")
        self.tos = _tos(options.tos)
        self.ttl = _number(options.ttl, "-M", 1, 255)
        self.debug = options.so_debug

    def apply(self, sock: socket.socket, family: int) -> None:
        from hopcat.errors import ConnectError

        settings = []
        if self.receive_buffer is not None:
            settings.append(("-I", socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer))
        if self.send_buffer is not None:
            settings.append(("-O", socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer))
        v6 = family == socket.AF_INET6
        if self.tos is not None:
            settings.append(("-T", socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                             socket.IPV6_TCLASS if v6 else socket.IP_TOS, self.tos))  # fmt: skip
        if self.ttl is not None:
            settings.append(("-M", socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                             socket.IPV6_UNICAST_HOPS if v6 else socket.IP_TTL, self.ttl))  # fmt: skip
        if self.debug:
            settings.append(("-D", socket.SOL_SOCKET, socket.SO_DEBUG, 1))
        if v6:  # a dual-stack socket's IPv4 clients (mapped addresses) take the IPv4 options
            for level, option, value in (
                (socket.IPPROTO_IP, socket.IP_TOS, self.tos),
                (socket.IPPROTO_IP, socket.IP_TTL, self.ttl),
            ):
                if value is not None:
                    try:
                        sock.setsockopt(level, option, value)
                    except OSError:
                        pass  # an IPv6-only socket: nothing mapped to apply them to
        for flag, level, option, value in settings:
            if family == socket.AF_UNIX and flag in ("-T", "-M"):
                continue  # no IP header on a Unix socket
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:
                from hopcat.net.dial import describe_oserror

                raise ConnectError(f"{flag}: {describe_oserror(exc)}", errno=exc.errno) from None

    def factory(self, family: int, kind: int, proto: int) -> socket.socket:
        """A socket as dial_tcp's ``socket_factory`` makes it, tuned."""
        sock = socket.socket(family, kind, proto)
        try:
            self.apply(sock, family)
        except BaseException:
            sock.close()
            raise
        return sock


def _number(text: str | None, flag: str, low: int, high: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        value = -1
    if not low <= value <= high or not text.isascii():
        raise UsageError(f"{flag} takes a number from {low} to {high}, not {text!r}")
    return value


def _size(text: str | None, flag: str) -> int | None:
    return _number(text, flag, 1, MAX_BUFFER_BYTES)


def _tos(text: str | None) -> int | None:
    if text is None:
        return None
    keyword = TOS_KEYWORDS.get(text.lower())
    if keyword is not None:
        return keyword
    if text[:1].isdigit():
        return _number(text, "-T", 0, 255)
    raise UsageError(
        f"-T takes a number (0-255) or one of {', '.join(TOS_KEYWORDS)}, not {text!r}"
    )
