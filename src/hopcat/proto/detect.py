"""Tell the three proxy protocols apart by the first byte a client sends.

A server listening for all of them reads one byte (or peeks it) and picks a machine: SOCKS4 and
SOCKS5 requests start with their version byte, and an HTTP request with its method, which is an
uppercase token in practice (RFC 9110 section 9.1 registers only uppercase methods). A lower-case
letter goes to HTTP as well, whose server answers it 400 (as ncat does): it is a person or a
text protocol on the wrong port, who can read why.
"""

from __future__ import annotations


def detect(first_byte: int) -> str | None:
    """``"socks4"``, ``"socks5"``, ``"http"``, or None when the byte fits no protocol."""
    if first_byte == 0x04:
        return "socks4"
    if first_byte == 0x05:
        return "socks5"
    if 0x41 <= first_byte <= 0x5A or 0x61 <= first_byte <= 0x7A:  # "A".."Z", "a".."z"
        return "http"
    return None
