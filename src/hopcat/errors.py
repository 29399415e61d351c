"""The exception hierarchy and the exit codes the CLI maps it to.

Library code raises these and never prints or exits; the CLI turns one into a single stderr line
(``hopcat: <str(error)>``) and ``error.exit_code``. Each class also derives from the builtin a
library caller would catch for the same failure of a plain ``socket.create_connection``:

===========================  ==================  ===============================================
class                        builtin base        what happened
===========================  ==================  ===============================================
UsageError                   ValueError          bad argument, URL, host or port; nothing sent
LocalProtocolError           ValueError          asked to send what the protocol cannot carry
ResolveError                 OSError             a name did not resolve
ConnectError                 ConnectionError     a TCP connect failed (``errno`` set)
ProxyUnreachableError        ConnectionError     ... to a proxy
ProxyError, ProxyAuthError   ConnectionError     a proxy answered and refused (see the table)
RemoteProtocolError          ConnectionError     a peer sent malformed bytes or closed too early
HopcatTimeoutError           TimeoutError        the deadline passed
RelayError                   OSError             reading or writing failed while relaying
TLSError                     ConnectionError     TLS with the target or a listener's client
                                                 failed (certificate, pin, handshake, alert)
===========================  ==================  ===============================================

So ``except OSError`` catches every failure on the network side, as it does around a socket.
``str(error)`` is always hopcat's one line (``HopcatError.__str__`` comes first in each class's
MRO): OSError's ``[Errno N] text`` form never shows, whatever ``errno`` holds, and ``strerror``
stays None.

A proxy's refusal sets ``errno`` as the same failure of a direct connect would, so code that
looks at ``e.errno`` keeps working through a proxy (``ProxyError.errno``, from ``_REPLY_ERRNO``):

=========  ===================================  ==============  ==============================
protocol   code                                 errno           why
=========  ===================================  ==============  ==============================
socks5     1 general SOCKS server failure       None            says nothing about the target
socks5     2 connection not allowed by ruleset  EACCES          a policy said no
socks5     3 network unreachable                ENETUNREACH     the proxy's connect got it
socks5     4 host unreachable                   EHOSTUNREACH    (also: name did not resolve)
socks5     5 connection refused                 ECONNREFUSED
socks5     6 TTL expired                        ETIMEDOUT       also sent for a connect timeout
socks5     7 command not supported              EOPNOTSUPP
socks5     8 address type not supported         EAFNOSUPPORT    e.g. IPv6 to an IPv4-only proxy
socks4     91 request rejected or failed        ECONNREFUSED    refused, or the rules said no
http       403 Forbidden                        EACCES
http       504 Gateway Timeout                  ETIMEDOUT
http       other statuses (502, 503, ...)       None            proxies use them for anything
any        ProxyAuthError                       EACCES          credentials or method refused
=========  ===================================  ==============  ==============================

A proxy's ETIMEDOUT stays a ConnectionError, not a TimeoutError: it is the proxy's report about
its own connect, and hopcat's own deadline did not pass.

Where an error happened is data too: ``hop`` (1-based index in the chain) and ``proxy`` (that
hop's URL, password redacted) are None on every error until the layer that knows the chain sets
them, together with ``where``, the prefix ``str(error)`` shows.

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
    TLS = 82  # TLS with the target or a listener's client failed (certificate, pin, alert)
    INTERRUPTED = 130  # SIGINT


# (protocol, reply code) -> errno name, the table in the module docstring. Names, resolved on
# use: the errno module is imported only when a proxy refuses, not on every start.
_REPLY_ERRNO: dict[tuple[str, int], str] = {
    ("socks5", 2): "EACCES",
    ("socks5", 3): "ENETUNREACH",
    ("socks5", 4): "EHOSTUNREACH",
    ("socks5", 5): "ECONNREFUSED",
    ("socks5", 6): "ETIMEDOUT",
    ("socks5", 7): "EOPNOTSUPP",
    ("socks5", 8): "EAFNOSUPPORT",
    ("socks4", 91): "ECONNREFUSED",
    ("http", 403): "EACCES",
    ("http", 504): "ETIMEDOUT",
}


def _errno_named(name: str | None) -> int | None:
    if name is None:
        return None
    import errno

    number: int = getattr(errno, name)
    return number


class HopcatError(Exception):
    """Base of every error hopcat raises on purpose.

    ``where``, ``hop`` and ``proxy`` are filled in by the layer that knows the context (which hop
    of a chain), so lower layers can raise without knowing it; ``str()`` shows ``where``.
    """

    exit_code: int = ExitCode.SOFTWARE
    hop: int | None = None  # 1-based index of the hop in the chain where it happened
    proxy: str | None = None  # that hop's URL as ProxyURL.label() shows it (no password)

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(HopcatError, ValueError):
    """Bad command line, URL, host or port: nothing was sent anywhere."""

    exit_code = ExitCode.USAGE


class ResolveError(HopcatError, OSError):
    """A name did not resolve here (the target's with local DNS, or a proxy's)."""

    exit_code = ExitCode.NO_HOST


class ConnectError(HopcatError, ConnectionError):
    """A TCP connect failed (refused, unreachable). Carries the errno when there is one."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, message: str, *, errno: int | None = None, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.errno = errno


class HopcatTimeoutError(HopcatError, TimeoutError):
    """The one deadline over the whole open passed; the message names the phase and the hop."""

    exit_code = ExitCode.TIMEOUT


class RelayError(HopcatError, OSError):
    """Reading or writing failed while bytes were being relayed."""

    exit_code = ExitCode.IO


class ProtocolError(HopcatError):
    """Base for malformed or out-of-order protocol data. A machine that raised it is poisoned.

    Raise a subclass: which side broke the protocol decides the builtin base (ValueError for us,
    ConnectionError for the peer).
    """

    exit_code = ExitCode.PROXY_PROTOCOL


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to send something the protocol cannot carry (e.g. a 300-byte hostname)."""

    exit_code = ExitCode.USAGE


class RemoteProtocolError(ProtocolError, ConnectionError):
    """The peer sent bytes that violate the protocol, too many of them, or closed too early.

    ``peer_closed``: the peer ended the connection (EOF) before the handshake was complete, as
    opposed to sending something wrong. ``http_status``: what an HTTP server answers a client
    that sent it (400; 414 for an overlong request line, 431 for an overlong head, 505 for a
    version other than 1.x).
    """

    def __init__(
        self, message: str, *, peer_closed: bool = False, where: str | None = None,
        http_status: int = 400,
    ) -> None:  # fmt: skip
        super().__init__(message, where=where)
        self.peer_closed = peer_closed
        self.http_status = http_status


class ProxyError(HopcatError, ConnectionError):
    """A proxy answered and refused.

    ``code`` is the wire reply code or HTTP status (for a ProxyAuthError from SOCKS5: the selected
    method, or the RFC 1929 status); ``protocol`` ("socks4", "socks5" or "http") says whose code
    it is; ``errno`` is the matching errno of the module docstring's table, or None.
    """

    exit_code = ExitCode.PROXY_REFUSED

    def __init__(
        self, message: str, *, protocol: str | None = None, code: int | None = None,
        where: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, where=where)
        self.protocol = protocol
        self.code = code
        self.errno = self._errno()

    def _errno(self) -> int | None:
        if self.protocol is None or self.code is None:
            return None
        return _errno_named(_REPLY_ERRNO.get((self.protocol, self.code)))


class ProxyAuthError(ProxyError):
    """407 (or 401), an RFC 1929 failure status, SOCKS4's identd refusals (92, 93), or no
    acceptable authentication method. ``errno`` is always EACCES."""

    exit_code = ExitCode.PROXY_AUTH

    def _errno(self) -> int | None:
        return _errno_named("EACCES")


class ProxyUnreachableError(ConnectError):
    """Could not open the TCP connection to a proxy (as opposed to the proxy refusing the target)."""

    exit_code = ExitCode.PROXY_UNREACHABLE


class TLSError(HopcatError, ConnectionError):
    """TLS with the target (``--tls``, ``ssl=``) or a listener's client failed: an untrusted or
    mismatched certificate, a pin mismatch, a failed handshake, an alert mid-stream. (TLS with a
    proxy hop is a RemoteProtocolError: the proxy broke its protocol.)"""

    exit_code = ExitCode.TLS
