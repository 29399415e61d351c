"""Telling whoever started us where we listen (``hopcat serve`` and ``hopcat -l``).

``--ready-fd N``: the bound addresses, one a line (``HOST:PORT``, ``[v6]:PORT``, or a Unix
socket's path), written to fd N, which is then closed, so a parent reads until EOF.
``--ready-file PATH``: the same lines written to PATH atomically, so a shell can poll for it.
"""

from __future__ import annotations

import os

from hopcat.errors import ExitCode, HopcatError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


class ReadyFileError(HopcatError):
    """The --ready-file could not be written."""

    exit_code = ExitCode.UNAVAILABLE


def check_ready_fd(fd: int) -> int:
    """``fd`` if it is an open descriptor; a UsageError otherwise (a number too large for one
    included)."""
    try:
        os.fstat(fd)
    except (OSError, OverflowError):
        raise UsageError(f"--ready-fd {fd}: not an open descriptor") from None
    return fd


def announce_ready(addresses: Sequence[str], *, ready_fd: int | None, ready_file: str | None) -> None:
    text = "".join(f"{address}\n" for address in addresses).encode()
    if ready_fd is not None:
        try:
            os.write(ready_fd, text)
        finally:
            os.close(ready_fd)
    if ready_file is not None:
        write_ready_file(ready_file, text)


def write_ready_file(path: str, text: bytes) -> None:
    """Write ``path`` so that a waiter never reads it half-written and a local attacker cannot
    aim it elsewhere: a fresh temporary name in the same directory, created with O_EXCL and
    O_NOFOLLOW (a symlink planted there is refused, never followed), then renamed over ``path``
    (rename replaces a symlink at ``path`` itself; it does not follow it)."""
    import secrets

    from hopcat.relay.pump import write_all

    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o644)
    except OSError as exc:
        raise ReadyFileError(
            f"--ready-file {path}: {os.strerror(exc.errno or 0).lower()}"
        ) from None
    try:
        write_all(fd, text)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)
        raise
