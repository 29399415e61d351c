"""Tell the three proxy protocols apart by the first byte a client sends.

A server listening for all of them reads one byte (or peeks it) and picks a machine: SOCKS4 and
SOCKS5 requests start with their version byte, and an HTTP request with its method, which is an
uppercase token in practice (RFC 9110 section 9.1 registers only uppercase methods).
"""

from __future__ import annotations


def detect(first_byte: int) -> str | None:
    """``"socks4"``, ``"socks5"``, ``"http"``, or None when the byte fits no protocol."""
    if first_byte == 0x04:
        return "socks4"
    if first_byte == 0x05:
        return "socks5"
    if 0x41 <= first_byte <= 0x5A:  # "A".."Z"
        return "http"
    return None
