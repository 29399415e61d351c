"""Hand a connected socket to OpenSSH (``ProxyUseFdpass yes``) and get out of the data path.

ssh runs the ProxyCommand with its stdout connected to one end of a Unix socketpair and waits for
one message carrying a file descriptor (SCM_RIGHTS) and one byte, as OpenBSD nc's ``-F`` sends
it (ssh's ``mm_receive_fd`` reads exactly that). Once sent, ssh owns the TCP connection and
hopcat exits: no process sits between ssh and the network.

The tunnel must have been opened with exact reads (``open_tunnel(..., exact=True)``): a byte of
the target's (say sshd's banner) read here would be lost to ssh.
"""

from __future__ import annotations

import _socket
import os
import sys

from hopcat.errors import RelayError, UsageError

FDPASS_HINT = "use -F only as ssh's ProxyCommand with ProxyUseFdpass yes"


def check_channel(fd: int) -> None:
    """Fail before connecting when ``fd`` cannot carry a descriptor (not a Unix socket)."""
    try:
        probe = _socket.socket(fileno=os.dup(fd))
    except OSError:
        raise UsageError(f"-F: stdout is not a Unix socket; {FDPASS_HINT}") from None
    family = probe.family
    probe.close()
    if family != _socket.AF_UNIX:
        raise UsageError(f"-F: stdout is not a Unix socket; {FDPASS_HINT}")


def pass_fd(channel_fd: int, fd: int) -> None:
    """Send ``fd`` over the Unix socket ``channel_fd`` with a one-byte message."""
    # socket.send_fds does this too, but importing the socket module costs ~10 ms per start.
    channel = _socket.socket(fileno=os.dup(channel_fd))
    # O_NONBLOCK lives in the open file description we share with ssh: put back what we found.
    was_blocking = os.get_blocking(channel_fd)
    try:
        channel.setblocking(True)
        rights = fd.to_bytes(4, sys.byteorder)  # one C int, as SCM_RIGHTS expects
        sent = channel.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    except OSError as exc:
        raise RelayError(
            f"-F: passing the connection to ssh failed: {os.strerror(exc.errno or 0).lower()}"
        ) from None
    finally:
        channel.close()
        if not was_blocking:
            try:
                os.set_blocking(channel_fd, False)
            except OSError:
                pass  # ssh already closed its end: nobody is left to see the flag
    if sent != 1:
        raise RelayError("-F: passing the connection to ssh failed: short write")
