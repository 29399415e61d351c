"""Happy Eyeballs (RFC 8305) on an asyncio event loop: the dialer of ``hopcat serve`` and of
library callers. The CLI's blocking one is ``hopcat.net.dial``; this one races on the loop's
callbacks, with no task or future per attempt.

Theory of operation. The caller hands in the (family, sockaddr) candidates already ordered
(``interleave_families``: section 4) and already checked: nothing is resolved here, so the server
dials exactly the addresses its rules allowed and a second lookup cannot slip another one in
(DNS rebinding). Section 5: start the first connect; after ``stagger_s`` (the recommended 250 ms
"Connection Attempt Delay") without a winner, or at once when an attempt fails, start the next.
The first connect to complete wins; every other attempt is closed then and there.

Two forms of the one race:

* ``Dialer``: callbacks, for the server, which drives each connection by callbacks rather than
  a task (see ``hopcat.server.handler``). ``on_done`` is called once, unless ``cancel()`` came
  first; ``cancel()`` closes every attempt.
* ``dial()``: a coroutine with the blocking dialer's errors: ``ConnectError`` naming each
  address and carrying the errno that explains the failure best, ``HopcatTimeoutError`` at the
  deadline (one deadline over the whole race). Cancelled at its await, it closes every socket it
  opened, a winner that came in meanwhile included, and the cancellation stays a
  ``CancelledError``: it is never turned into a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from hopcat.errors import HopcatTimeoutError
from hopcat.net.dial import (
    CONNECT_ATTEMPT_DELAY_S,
    connect_failed,
    connected_to_itself,
    sockaddr_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    Candidate = tuple[int, tuple[Any, ...]]  # (family, sockaddr)
    Failure = tuple[tuple[Any, ...], int]  # (sockaddr, errno)
    OnDone = Callable[[socket.socket | None, list[Failure]], None]


class Dialer:
    """Connect to the first of ``candidates`` that answers, RFC 8305 style.

    ``on_done(sock, [])`` with a connected non-blocking socket, or ``on_done(None, failures)``
    with each (sockaddr, errno) that failed. Exactly one call, possibly from ``start()`` itself,
    unless ``cancel()`` came first.
    """

    __slots__ = ("_attempts", "_candidates", "_done", "_index", "_loop", "_on_done", "_stagger_s",
                 "_timer", "failures")  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        candidates: Sequence[Candidate],
        on_done: OnDone,
        *,
        stagger_s: float = CONNECT_ATTEMPT_DELAY_S,
    ) -> None:
        self._loop = loop
        self._candidates = candidates
        self._on_done = on_done
        self._stagger_s = stagger_s
        self._index = 0
        self._attempts: dict[int, tuple[socket.socket, tuple[Any, ...]]] = {}
        self.failures: list[Failure] = []
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    @property
    def started(self) -> int:
        """How many candidates have been tried so far."""
        return self._index

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        """Start attempts until one is under way or won, or no candidate is left."""
        self._timer = None
        while self._index < len(self._candidates) and not self._done:
            family, sockaddr = self._candidates[self._index]
            self._index += 1
            if self._attempt(family, sockaddr):
                if self._index < len(self._candidates) and not self._done:
                    self._timer = self._loop.call_later(self._stagger_s, self._next)
                return
        if not self._attempts and not self._done:
            self._finish(None)

    def _attempt(self, family: int, sockaddr: tuple[Any, ...]) -> bool:
        """Start one connect; False when it failed at once (recorded in ``failures``)."""
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
        except OSError as exc:  # no such family here (EAFNOSUPPORT), out of descriptors
            if sock is not None:
                sock.close()
            self.failures.append((sockaddr, exc.errno or 0))
            return False
        if code == 0 and connected_to_itself(sock, sockaddr):
            code = errno.ECONNREFUSED
        if code == 0:
            self._finish(sock)
            return True
        if code != errno.EINPROGRESS:
            sock.close()
            self.failures.append((sockaddr, code))
            return False
        fd = sock.fileno()
        self._attempts[fd] = (sock, sockaddr)
        self._loop.add_writer(fd, self._on_writable, fd)
        return True

    def _on_writable(self, fd: int) -> None:
        self._loop.remove_writer(fd)
        sock, sockaddr = self._attempts.pop(fd)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0 and connected_to_itself(sock, sockaddr):
            code = errno.ECONNREFUSED
        if code == 0:
            self._finish(sock)
            return
        sock.close()
        self.failures.append((sockaddr, code))
        # RFC 8305: a failure starts the next attempt at once instead of after the delay.
        if self._timer is not None:
            self._timer.cancel()
        self._next()

    def _finish(self, sock: socket.socket | None) -> None:
        self.cancel()
        self._on_done(sock, [] if sock is not None else self.failures)

    def cancel(self) -> None:
        """Stop racing and close every attempt still under way; ``on_done`` is not called."""
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd, (sock, _sockaddr) in self._attempts.items():
            self._loop.remove_writer(fd)
            sock.close()
        self._attempts.clear()


async def dial(
    candidates: Sequence[Candidate],
    *,
    timeout: float | None = None,
    deadline: float | None = None,
    where: str | None = None,
    stagger_s: float = CONNECT_ATTEMPT_DELAY_S,
) -> socket.socket:
    """Connect to the first of ``candidates`` ((family, sockaddr), in the order to try) that
    answers, on the running loop; return the connected socket, non-blocking and with no option
    set (``hopcat.net.dial.tune_socket`` sets the CLI's).

    ``timeout`` (seconds) and ``deadline`` (a ``loop.time()`` value, for a caller whose budget
    spans more than this race) bound the whole race; the earlier wins, neither means no limit.
    ``where`` names the destination in errors (default: the first candidate's address).
    Raises ConnectError when every address failed, HopcatTimeoutError at the deadline, and
    ValueError for no candidates.
    """
    if not candidates:
        raise ValueError("no address to dial")
    loop = asyncio.get_running_loop()
    label = where or sockaddr_text(candidates[0][1])
    outcome: asyncio.Future[socket.socket] = loop.create_future()
    dialer = Dialer(
        loop, candidates, lambda sock, failures: _settle(outcome, label, sock, failures),
        stagger_s=stagger_s,
    )  # fmt: skip
    timer = _arm_deadline(loop, outcome, dialer, label, timeout, deadline)
    try:
        dialer.start()
        return await outcome
    except BaseException:
        _discard(outcome)
        raise
    finally:
        dialer.cancel()
        if timer is not None:
            timer.cancel()


def _arm_deadline(
    loop: asyncio.AbstractEventLoop,
    outcome: asyncio.Future[socket.socket],
    dialer: Dialer,
    where: str,
    timeout: float | None,
    deadline: float | None,
) -> asyncio.TimerHandle | None:
    """A timer ending the race at the earlier of ``deadline`` and ``timeout`` from now."""
    timeout_at = None if timeout is None else loop.time() + timeout
    limits = [limit for limit in (deadline, timeout_at) if limit is not None]
    if not limits:
        return None
    limit = min(limits)
    budget = f" after {timeout:g} s" if limit == timeout_at else ""
    return loop.call_at(limit, _time_out, outcome, dialer, f"{where}: timed out{budget}")


def _settle(
    outcome: asyncio.Future[socket.socket],
    where: str,
    sock: socket.socket | None,
    failures: list[Failure],
) -> None:
    if outcome.done():  # cancelled while a connect completed: nobody will take the socket
        if sock is not None:
            sock.close()
    elif sock is not None:
        outcome.set_result(sock)
    else:
        labelled = [(sockaddr_text(sockaddr), code) for sockaddr, code in failures]
        outcome.set_exception(connect_failed(where, labelled))


def _time_out(outcome: asyncio.Future[socket.socket], dialer: Dialer, what: str) -> None:
    tried = dialer.started
    dialer.cancel()
    if not outcome.done():
        count = f" ({tried} addresses tried)" if tried > 1 else ""
        outcome.set_exception(HopcatTimeoutError(f"connect to {what}{count}"))


def _discard(outcome: asyncio.Future[socket.socket]) -> None:
    """The race was abandoned (cancelled, or a bug): close a winner that came in meanwhile."""
    if outcome.done() and not outcome.cancelled() and outcome.exception() is None:
        outcome.result().close()
