"""The splice(2) core under both relays (the CLI's poll pump and the server's event-loop relay).

``splice(2)`` moves pages between a pipe and another descriptor inside the kernel, so no byte is
copied through userspace; one end of every call must be a pipe. A relay between two sockets
puts a pipe of its own in the middle (socket -> pipe, pipe -> socket); ssh gives a ProxyCommand
two pipes, so the CLI splices between them and its socket directly.

What is shared here, and nowhere else:

* the sizes: pipes are grown to ``PIPE_SIZE_BYTES`` (F_SETPIPE_SZ, best effort), and one call
  moves at most ``MAX_SPLICE_BYTES``, what such a pipe holds;
* the flags: SPLICE_F_NONBLOCK, since both relays wait in poll or the event loop, never in the
  call (SPLICE_F_MOVE is a hint the kernel has ignored since 2.6.21; passing it costs nothing);
* the probe (``Splicer``): whether splice works for a pair of descriptors is learnt from the
  first call that gets an answer, and remembered. EINVAL there means the kernel cannot splice
  these descriptors (a file system or socket family without splice support, a file opened
  O_APPEND); ENOSYS means the call is missing or filtered out (old kernels, seccomp sandboxes).
  Either way the caller is told "not handled here, copy instead" (None) rather than given an
  error, and ``usable`` turns False so that it copies from then on. Once a call has moved bytes
  (or seen EOF), splice is known to work there, and EINVAL is a real error, raised like any
  other.

EAGAIN is always raised (BlockingIOError): only the caller knows whether its source was empty or
its destination full. Bytes already in a pipe of the caller's own were moved by a probed call,
so the caller splices them out with ``os.splice`` and ``SPLICE_FLAGS`` and keeps the partial
count if that fails.

No asyncio, no socket module: the CLI imports this on every ssh connection.
"""

from __future__ import annotations

import errno
import os

PIPE_SIZE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size: fewer wakeups per MiB
MAX_SPLICE_BYTES = PIPE_SIZE_BYTES
F_SETPIPE_SZ = 1031  # fcntl.h; not exported by Python's fcntl before 3.10 on every platform

HAVE_SPLICE = hasattr(os, "splice")
SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) if HAVE_SPLICE else 0
)
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS)


def grow_pipe(fd: int) -> None:
    """Best effort: a bigger pipe means fewer splice calls per MiB. Refused (over
    pipe-user-pages-soft or pipe-max-size), the default 64 KiB pipe works too."""
    try:
        import fcntl

        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE_BYTES)
    except (OSError, ImportError):
        pass


def open_pipe() -> tuple[int, int]:
    """A new non-blocking, close-on-exec pipe (read fd, write fd), grown where allowed.

    Raises OSError when no pipe can be opened (EMFILE, ENFILE): the caller decides whether that
    is fatal or a reason to copy.
    """
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    grow_pipe(write_fd)
    return read_fd, write_fd


class Splicer:
    """splice(2) for one kind of descriptor pair, with the probe's answer remembered.

    ``usable`` is False once splicing is off (asked for, missing from this Python, or refused by
    the probe): the caller copies. One Splicer per pair whose kinds may differ (the CLI: one per
    direction); one for many pairs of the same kind (the server: TCP sockets and its own pipes).
    """

    __slots__ = ("proven", "usable")

    def __init__(self, enabled: bool = True) -> None:
        self.usable = enabled and HAVE_SPLICE
        self.proven = False  # a call moved bytes or saw EOF: splice works here

    def splice_once(self, src: int, dst: int, size: int) -> int | None:
        """One non-blocking splice of at most ``size`` bytes: the count moved (0 at src's EOF),
        or None for "not handled here, copy instead". Other errors, EAGAIN included, raise."""
        try:
            count = os.splice(src, dst, size, flags=SPLICE_FLAGS)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED and not self.proven:
                self.usable = False
                return None
            raise
        self.proven = True
        return count
