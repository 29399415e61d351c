"""Drive a sans-I/O client machine over a blocking socket, within a deadline.

Two ways to read:

* relay mode (``exact=False``): read whatever has arrived; bytes after the handshake come back as
  ``trailing_data`` and the relay writes them to stdout first.
* hand-off mode (``exact=True``): the socket goes to someone else afterwards (ssh with
  ProxyUseFdpass, a library caller), so read exactly the handshake and nothing more: the machine
  says how many bytes its current step needs (SOCKS), or we ``MSG_PEEK`` and consume only through
  the end of the response head (HTTP), as OpenBSD nc does. sshd speaks first, so its banner can
  arrive in the same segment as the proxy's last reply; it must stay in the socket.
"""

from __future__ import annotations

# _socket, not socket: the socket module costs ~10 ms of imports (enum, selectors) per start.
import _socket as socket

from hopcat.errors import HopcatError, HopcatTimeoutError, RemoteProtocolError
from hopcat.net.dial import MAX_WAIT_S, describe_oserror, wait_s
from hopcat.proto._events import NEED_DATA, Established

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from hopcat.proto._events import Event

READ_BYTES = 65536


def _remaining(deadline: float, clock: Callable[[], float]) -> float:
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError
    return min(left, MAX_WAIT_S)


def run_handshake(
    sock: socket.socket,
    machine: object,
    *,
    deadline: float,
    clock: Callable[[], float],
    exact: bool = False,
    on_event: Callable[[Event], None] | None = None,
    diagnose: Callable[[str], None] | None = None,
    silence_s: float = 0.0,
) -> Established:
    """Run ``machine`` to Established; its refusals and protocol errors propagate unchanged.

    A stall past ``deadline`` raises HopcatTimeoutError; a reset or close mid-handshake raises
    RemoteProtocolError. The socket's timeout is restored to blocking before returning.
    ``diagnose("silent")`` is called once if the peer's first answer has not begun after
    ``silence_s``, and ``diagnose("closed")`` if the peer closes or resets before its first byte;
    it may raise a better error (a proxy of another protocol) or return to go on as before.
    """
    m = machine  # duck-typed: socks4/socks5/http_connect clients share one interface
    answered = False
    try:
        try:
            _send(sock, m.data_to_send(), deadline, clock)  # type: ignore[attr-defined]
            while True:
                event = m.next_event()  # type: ignore[attr-defined]
                _send(sock, m.data_to_send(), deadline, clock)  # type: ignore[attr-defined]
                if event is NEED_DATA:
                    if diagnose is not None and not answered:
                        _wait_or_call(sock, silence_s, deadline, clock, lambda: diagnose("silent"))
                    data = _read(sock, m, deadline, clock, exact)
                    if not data and not answered and diagnose is not None:
                        diagnose("closed")
                    answered = True
                    m.receive_data(data)  # type: ignore[attr-defined]
                    continue
                if isinstance(event, Established):
                    _quickack(sock)
                    _delayed_acks(sock)
                    return event
                if on_event is not None:
                    on_event(event)
        except HopcatError:
            raise  # the machine's refusals and protocol errors are OSErrors too: not the socket's
        except TimeoutError:
            raise HopcatTimeoutError("no answer from the proxy before the connect timeout") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if diagnose is not None and not answered:
                diagnose("closed")
            raise RemoteProtocolError(
                f"the proxy reset the connection during the handshake ({describe_oserror(exc)})"
            ) from None
        except OSError as exc:  # EHOSTUNREACH or ETIMEDOUT mid-handshake; ssl.SSLError on a TLS hop
            # An SSLError's errno is the TLS library's code, not an errno: show its reason.
            why = getattr(exc, "reason", None) or describe_oserror(exc)
            raise RemoteProtocolError(
                f"the connection to the proxy failed during the handshake ({why})"
            ) from None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


def _quickack(sock: socket.socket) -> None:
    """ACK the proxy's reply at once instead of after the delayed-ACK timer (~40 ms).

    A proxy without TCP_NODELAY (microsocks) holds the target's first bytes behind its own
    unacknowledged reply (Nagle); our delayed ACK then costs every connection ~40 ms. Linux
    clears the flag by itself, so it is set again around every exchange.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests) or an SSL wrapper refusing: only an optimisation


def _wait_or_call(
    sock: socket.socket, quiet_s: float, deadline: float, clock: Callable[[], float],
    call: Callable[[], None],
) -> None:
    """Wait until ``sock`` is readable; if it is still quiet after ``quiet_s``, call ``call``."""
    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    quiet_ms = int(min(quiet_s, wait_s(deadline, clock)) * 1000)
    if not poller.poll(quiet_ms) and clock() < deadline:
        call()


def _delayed_acks(sock: socket.socket) -> None:
    """Back to delayed ACKs once the reply is acknowledged, for the bulk data that follows.

    Left in quick-ACK mode, we ACK every small segment at once, so a proxy without TCP_NODELAY
    (microsocks, tinyproxy) never has unacknowledged data and Nagle never coalesces its small
    writes: the download then arrives as many small segments, one wakeup each. Measured through
    microsocks: 2.5x fewer splice calls per GiB and about half hopcat's CPU (bench/proxies.py).
    Value 0 is the kernel's own mode for a request/response peer (nc sits in it after its
    handshake); it costs the first target byte nothing, since the reply is already acknowledged.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 0)
        except OSError:
            pass  # not TCP or an SSL wrapper refusing: only an optimisation


def _send(sock: socket.socket, data: bytes, deadline: float, clock: Callable[[], float]) -> None:
    if data:
        sock.settimeout(_remaining(deadline, clock))
        sock.sendall(data)
        _quickack(sock)


def _read(
    sock: socket.socket, machine: object, deadline: float, clock: Callable[[], float], exact: bool
) -> bytes:
    while True:
        sock.settimeout(_remaining(deadline, clock))
        try:
            return _read_once(sock, machine, exact)
        except TimeoutError:
            if clock() >= deadline:
                raise
            # A wait is capped at MAX_WAIT_S; a later deadline (or none) means waiting again.


def _read_once(sock: socket.socket, machine: object, exact: bool) -> bytes:
    _quickack(sock)
    if not exact:
        return sock.recv(READ_BYTES)
    needed = machine.bytes_needed()  # type: ignore[attr-defined]
    if needed is not None:
        return sock.recv(needed)
    peeked = sock.recv(READ_BYTES, socket.MSG_PEEK)
    if not peeked:
        return b""
    return sock.recv(machine.handshake_prefix_len(peeked))  # type: ignore[attr-defined]
