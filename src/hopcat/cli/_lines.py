"""Line-by-line sending for nc's ``-C`` (CRLF line endings) and ``-i`` (a pause after each line
sent): stdin reaches the relay through a pipe fed by a thread that rewrites and paces it, so the
relay itself (splice, end-of-stream rules) is the same as without.

``-C`` turns every bare LF into CR LF, across reads, and leaves a CR LF as it is, as a user
typing an SMTP or HTTP dialogue needs. ``-i SECS`` writes one line at a time and waits SECS
after each (a last line without LF goes out at stdin's EOF). The thread ends at stdin's EOF and
closes the pipe, which is the relay's stdin EOF, so the half-close happens as usual.
"""

from __future__ import annotations

import os


def paced_stdin(crlf: bool, interval_s: float) -> int:
    """The read end of a pipe carrying stdin, LF turned into CR LF (``crlf``) and a pause of
    ``interval_s`` after each line (0: none)."""
    import threading

    read_fd, write_fd = os.pipe()
    threading.Thread(target=_rewrite, args=(write_fd, crlf, interval_s), name="hopcat-lines",
                     daemon=True).start()  # fmt: skip
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


def _rewrite(write_fd: int, crlf: bool, interval_s: float) -> None:
    import select

    from hopcat.relay.pump import write_all

    after_cr = False
    partial = b""  # with -i: the start of a line whose LF has not come yet
    try:
        while True:
            try:
                chunk = os.read(0, 65536)
            except BlockingIOError:  # an inherited non-blocking stdin
                select.select([0], [], [])
                continue
            if not chunk:
                if partial:
                    write_all(write_fd, partial)
                return
            data = to_crlf(chunk, after_cr) if crlf else chunk
            after_cr = chunk.endswith(b"\r")
            if not interval_s:
                write_all(write_fd, data)
                continue
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                write_all(write_fd, line + b"\n")
                _pause(interval_s)
    except OSError:
        return  # the relay has ended (EPIPE) or stdin failed: nothing more to send
    finally:
        os.close(write_fd)


def _pause(seconds: float) -> None:
    """Sleep ``seconds``, however long: time.sleep refuses what time_t cannot hold."""
    import time

    from hopcat.net.dial import MAX_WAIT_S

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, MAX_WAIT_S))


