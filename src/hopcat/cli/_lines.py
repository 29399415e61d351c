"""Line-by-line sending for nc's ``-C`` (CRLF line endings): stdin reaches the relay through a
pipe fed by a thread that rewrites it, so the relay itself (splice, end-of-stream rules) is the
same as without.

``-C`` turns every bare LF into CR LF, across reads, and leaves a CR LF as it is, as a user
typing an SMTP or HTTP dialogue needs. The thread ends at stdin's EOF and closes the pipe, which
is the relay's stdin EOF, so the half-close happens as usual.
"""

from __future__ import annotations

import os


def crlf_stdin() -> int:
    """The read end of a pipe carrying stdin with LF turned into CR LF."""
    import threading

    read_fd, write_fd = os.pipe()
    threading.Thread(target=_rewrite, args=(write_fd,), name="hopcat-crlf", daemon=True).start()
    return read_fd


def to_crlf(data: bytes, after_cr: bool) -> bytes:
    """``data`` with each LF not preceded by CR (``after_cr``: the byte before ``data`` was a
    CR) turned into CR LF."""
    lines = data.split(b"\n")
    out = [lines[0]]
    previous_cr = lines[0].endswith(b"\r") if lines[0] else after_cr
    for line in lines[1:]:
        out.append(b"\n" if previous_cr else b"\r\n")
        out.append(line)
        previous_cr = line.endswith(b"\r") if line else False
    return b"".join(out)


def _rewrite(write_fd: int) -> None:
    import select

    after_cr = False
    try:
        while True:
            try:
                chunk = os.read(0, 65536)
            except BlockingIOError:  # an inherited non-blocking stdin
                select.select([0], [], [])
                continue
            if not chunk:
                return
            data = to_crlf(chunk, after_cr)
            after_cr = chunk.endswith(b"\r")
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
    except OSError:
        return  # the relay has ended (EPIPE) or stdin failed: nothing more to send
    finally:
        os.close(write_fd)
