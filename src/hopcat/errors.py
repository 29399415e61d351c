"""The exception hierarchy and the exit codes the CLI maps it to.

Library code raises these and never prints or exits; the CLI turns one into a single stderr line
(``hopcat: <str(error)>``) and ``error.exit_code``. Classes that mirror an OS condition also derive
from the matching builtin, so library callers can keep writing ``except OSError`` or
``except TimeoutError``.

Exit codes follow sysexits(3) where one fits; the proxy codes sit just above that range.
"""

from __future__ import annotations


class ExitCode:
    """Plain ints rather than an IntEnum: importing enum costs ~5 ms on every ssh connection."""

    OK = 0
    USAGE = 64  # EX_USAGE: bad flag, URL, host or port
    NO_HOST = 68  # EX_NOHOST: the target's (or a local resolve's) name did not resolve
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the target refused or was unreachable
    SOFTWARE = 70  # EX_SOFTWARE: a bug in hopcat (run with --debug for the traceback)
    IO = 74  # EX_IOERR: reading or writing failed while relaying
    TIMEOUT = 75  # EX_TEMPFAIL: connect, handshake or idle timeout
    PROXY_PROTOCOL = 76  # EX_PROTOCOL: a proxy sent something malformed or closed mid-handshake
    PROXY_AUTH = 77  # EX_NOPERM: a proxy rejected our credentials or offered no usable method
    PROXY_UNREACHABLE = 80  # could not reach a proxy (resolve or TCP connect to the hop failed)
    PROXY_REFUSED = 81  # a proxy answered but refused to connect to the next hop / target
    INTERRUPTED = 130  # SIGINT


class HopcatError(Exception):
    """Base of every error hopcat raises on purpose.

    ``where`` is filled in by the layer that knows the context (e.g. which hop of a chain), so
    lower layers can raise without knowing it.
    """

    exit_code: int = ExitCode.SOFTWARE

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(HopcatError):
    """Bad command line, URL, host or port: nothing was sent anywhere."""

    exit_code = ExitCode.USAGE


class ResolveError(HopcatError, OSError):
    exit_code = ExitCode.NO_HOST


class ConnectError(HopcatError, ConnectionError):
    """A TCP connect failed (refused, unreachable). Carries the errno when there is one."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, message: str, *, errno: int | None = None, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.errno = errno


class HopcatTimeoutError(HopcatError, TimeoutError):
    exit_code = ExitCode.TIMEOUT


class RelayError(HopcatError, OSError):
    """Reading or writing failed while bytes were being relayed."""

    exit_code = ExitCode.IO


class ProtocolError(HopcatError):
    """Base for malformed or out-of-order protocol data. A machine that raised it is poisoned."""

    exit_code = ExitCode.PROXY_PROTOCOL


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol cannot carry (e.g. a 300-byte hostname)."""

    exit_code = ExitCode.USAGE


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol, too many of them, or closed too early."""


class ProxyError(HopcatError):
    """A proxy answered and refused. ``code`` is the wire reply code or HTTP status."""

    exit_code = ExitCode.PROXY_REFUSED

    def __init__(self, message: str, *, code: int | None = None, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.code = code


class ProxyAuthError(ProxyError):
    """407, an RFC 1929 failure status, or no acceptable authentication method."""

    exit_code = ExitCode.PROXY_AUTH


class ProxyUnreachableError(ConnectError):
    """Could not open the TCP connection to a proxy (as opposed to the proxy refusing the target)."""

    exit_code = ExitCode.PROXY_UNREACHABLE
