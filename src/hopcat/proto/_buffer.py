"""The receive buffer every machine parses from.

Bytes arrive in arbitrary pieces (a reply split across reads, or a reply and the first payload
bytes in one read), so machines never parse ``receive_data()``'s argument directly: they append it
here and take exactly one message's worth once enough is buffered. Whatever is left after the
last handshake message is the machine's ``trailing_data``.

The buffer itself is not bounded: the driver decides how much it reads. What is bounded is how
much a machine is willing to wait for before a message must be complete (the HTTP head cap, the
SOCKS field lengths), which is checked by the machines against ``len(buffer)``.
"""

from __future__ import annotations


class ReceiveBuffer:
    __slots__ = ("data", "eof")

    def __init__(self) -> None:
        # Parsers read ``data`` in place (indexing, find); only this class removes bytes from it.
        self.data = bytearray()
        self.eof = False

    def __len__(self) -> int:
        return len(self.data)

    def feed(self, data: bytes) -> None:
        self.data += data

    def take(self, size: int) -> bytes:
        chunk = bytes(self.data[:size])
        del self.data[:size]
        return chunk


def find_head_end(data: bytes | bytearray, start: int = 0) -> int:
    """Return the offset just past the empty line that ends an HTTP head, or -1.

    The empty line is CRLF CRLF per RFC 9112 section 2.2, which also lets a recipient accept a bare
    LF as a line terminator; so ``\\n\\n`` and ``\\n\\r\\n`` both end a head. Only line feeds at
    ``start`` or later are examined: a caller scanning a growing buffer passes the previous length,
    because whether an earlier LF ends the head depends only on the bytes before it.
    """
    lf = data.find(b"\n", start)
    while lf != -1:
        if lf >= 1 and data[lf - 1] == 0x0A:
            return lf + 1
        if lf >= 2 and data[lf - 1] == 0x0D and data[lf - 2] == 0x0A:
            return lf + 1
        lf = data.find(b"\n", lf + 1)
    return -1
