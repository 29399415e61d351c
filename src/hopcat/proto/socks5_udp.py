"""The SOCKS5 UDP request header (RFC 1928 section 7), both directions, sans I/O.

Every datagram between a client and the proxy's UDP relay carries::

    +-----+------+------+----------+----------+----------+
    | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    +-----+------+------+----------+----------+----------+
    |  2  |  1   |  1   | Variable |    2     | Variable |
    +-----+------+------+----------+----------+----------+

From the client it names where DATA goes; from the relay, where DATA came from. FRAG 0 is a
whole datagram; fragmentation is optional in the RFC and neither hopcat nor Dante does it, so a
datagram with FRAG != 0 is reported as such for the caller to drop and count (the RFC: "an
implementation that does not support fragmentation MUST drop any datagram whose FRAG field is
other than X'00'"). Malformed headers raise RemoteProtocolError: a relay's datagram that cannot
be read is dropped by the caller, never half-read.
"""

from __future__ import annotations

import _socket as socket  # see _machine.py: no socket module

from ..errors import RemoteProtocolError
from ._machine import HostKind, check_host, check_port, decode_name

__all__ = ["MAX_HEADER_BYTES", "UdpDatagram", "header_size", "pack", "unpack"]

_IPV4, _DOMAINNAME, _IPV6 = 0x01, 0x03, 0x04
_ATYP_FOR_KIND = {HostKind.IPV4: _IPV4, HostKind.IPV6: _IPV6, HostKind.NAME: _DOMAINNAME}
# RSV, FRAG, ATYP, a length byte and a 255-byte name, the port.
MAX_HEADER_BYTES = 4 + 1 + 255 + 2


class UdpDatagram:
    """One datagram from the relay: whom DATA came from (``host`` an address literal, or a name
    as sent), ``frag`` (0: whole), and DATA."""

    __slots__ = ("data", "frag", "host", "port")

    def __init__(self, host: str, port: int, data: bytes, frag: int = 0) -> None:
        self.host = host
        self.port = port
        self.data = data
        self.frag = frag

    def __repr__(self) -> str:
        return f"UdpDatagram({self.host!r}, {self.port}, {len(self.data)} bytes, frag={self.frag})"


def header_size(host: str) -> int:
    """The header's length for a datagram to ``host`` (what DATA may add up to in 65,507)."""
    kind, _, address = check_host(host)
    return 4 + len(address) + (1 if kind is HostKind.NAME else 0) + 2


def pack(host: str, port: int, data: bytes) -> bytes:
    """``data`` to ``host``:``port`` with its header (FRAG 0). The host is checked as for a
    CONNECT (LocalProtocolError): a name goes as ATYP 3, literals as addresses."""
    kind, _, address = check_host(host)
    check_port(port)
    atyp = _ATYP_FOR_KIND[kind]
    length = bytes((len(address),)) if atyp == _DOMAINNAME else b""
    return b"\x00\x00\x00" + bytes((atyp,)) + length + address + port.to_bytes(2, "big") + data


def unpack(datagram: bytes) -> UdpDatagram:
    """The header and DATA of a datagram; RemoteProtocolError when the header is not one."""
    if len(datagram) < 4:
        raise RemoteProtocolError(f"SOCKS5 UDP datagram of {len(datagram)} bytes has no header")
    if datagram[0] or datagram[1]:
        raise RemoteProtocolError("SOCKS5 UDP header with a non-zero RSV field")
    frag, atyp = datagram[2], datagram[3]
    if atyp == _IPV4:
        end = 8
        family = socket.AF_INET
    elif atyp == _IPV6:
        end = 20
        family = socket.AF_INET6
    elif atyp == _DOMAINNAME:
        if len(datagram) < 5 or not datagram[4]:
            raise RemoteProtocolError("SOCKS5 UDP header with an empty or cut name")
        end = 5 + datagram[4]
        family = 0
    else:
        raise RemoteProtocolError(f"SOCKS5 UDP header with unknown address type 0x{atyp:02x}")
    if len(datagram) < end + 2:
        raise RemoteProtocolError("SOCKS5 UDP header cut short")
    host = socket.inet_ntop(family, datagram[4:end]) if family else decode_name(datagram[5:end])
    port = int.from_bytes(datagram[end : end + 2], "big")
    return UdpDatagram(host, port, datagram[end + 2 :], frag)
