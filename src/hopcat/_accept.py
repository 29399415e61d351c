"""What an accept() error means, for every listener hopcat runs (``hopcat serve``, ``hopcat -l``).

Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the connection stays in the
backlog and would fail again at once, so the listener pauses, 50 ms at first, doubling up to 2 s
while it persists. Any other error (ECONNABORTED, EPROTO, EPERM from a firewall, ...) concerns
that one connection, which is gone: skip it. Only an error about the listening socket itself
(EBADF, EINVAL, ENOTSOCK) ends the listener.
"""

from __future__ import annotations

import errno

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LISTENER_BROKEN = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


def next_backoff(previous_s: float) -> float:
    """The next pause: the first, or twice the last one, at most BACKOFF_MAX_S."""
    return min(BACKOFF_MAX_S, previous_s * 2 or BACKOFF_FIRST_S)
