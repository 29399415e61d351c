"""The host's own addresses, for the server's default deny: every address of every interface.

getifaddrs(3) through ctypes: the one call that lists IPv4 and IPv6 addresses (secondary ones
and aliases included) on Linux, the BSDs and macOS alike, where the stdlib only offers interface
names. Only the first four fields of ``struct ifaddrs`` are read, and of each ``sockaddr`` its
family and address bytes, whose offsets are the same everywhere except for the family field
(BSD-style sockaddrs start with a length byte).

If getifaddrs is unavailable, the addresses the host name resolves to stand in: less complete,
which the caller's loopback and unspecified networks partly cover.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BSD_SOCKADDR = not sys.platform.startswith("linux")
_IPV4_OFFSET = 4  # sockaddr_in: family (2), port (2), address (4)
_IPV6_OFFSET = 8  # sockaddr_in6: family (2), port (2), flow info (4), address (16)


def host_addresses() -> frozenset[IPAddress]:
    """Every IPv4 and IPv6 address configured on the host's interfaces (without zone ids)."""
    try:
        return _from_getifaddrs()
    except (ImportError, OSError, AttributeError):
        return _from_host_name()


def _from_getifaddrs() -> frozenset[IPAddress]:
    import ctypes

    class IfAddrs(ctypes.Structure):
        pass

    IfAddrs._fields_ = [
        ("ifa_next", ctypes.POINTER(IfAddrs)),
        ("ifa_name", ctypes.c_char_p),
        ("ifa_flags", ctypes.c_uint),
        ("ifa_addr", ctypes.c_void_p),
    ]
    # The process's own symbols include libc's: no find_library, which may run ldconfig.
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: set[IPAddress] = set()
    try:
        entry = head
        while entry:
            sockaddr = entry.contents.ifa_addr
            if sockaddr:
                if _BSD_SOCKADDR:
                    family = ctypes.c_uint8.from_address(sockaddr + 1).value
                else:
                    family = ctypes.c_uint16.from_address(sockaddr).value
                if family == socket.AF_INET:
                    found.add(ipaddress.IPv4Address(ctypes.string_at(sockaddr + _IPV4_OFFSET, 4)))
                elif family == socket.AF_INET6:
                    found.add(ipaddress.IPv6Address(ctypes.string_at(sockaddr + _IPV6_OFFSET, 16)))
            entry = entry.contents.ifa_next
    finally:
        libc.freeifaddrs(head)
    return frozenset(found)


def _from_host_name() -> frozenset[IPAddress]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(
        ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)
    )
