"""The asyncio Happy Eyeballs (hopcat.aio._dial.dial) over real loopback listeners, 127.0.0.1 and
::1: refusals, a silent address raced by a good one after the RFC 8305 delay, the deadline, and
cancellation that leaves no descriptor behind."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from hopcat.aio._dial import dial
from hopcat.errors import ConnectError, HopcatTimeoutError
from support import closed_port, silent_listener

T = TypeVar("T")
V4, V6 = "127.0.0.1", "::1"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind((V6, 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def candidate(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    if ":" in host:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def open_fds() -> int:
    gc.collect()  # a leaked socket object would be closed here, with a ResourceWarning
    return len(os.listdir("/proc/self/fd"))


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run ``scenario`` on a fresh loop; the loop's own descriptors are gone when it returns."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), 10)

    return asyncio.run(bounded())


@contextmanager
def listening(host: str) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        yield listener


@contextmanager
def silent(host: str) -> Iterator[int]:
    listener, fillers, port = silent_listener(host)
    try:
        yield port
    finally:
        for sock in (listener, *fillers):
            sock.close()


@pytest.fixture
def no_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before, "a descriptor was left open"


@needs_ipv6
def test_first_refused_then_second_wins_at_once(no_leak: None) -> None:
    with closed_port(V4) as refused, listening(V6) as good:
        port = good.getsockname()[1]

        async def scenario() -> tuple[socket.socket, float]:
            started = time.monotonic()
            sock = await dial([candidate(V4, refused), candidate(V6, port)], timeout=5)
            return sock, time.monotonic() - started

        sock, elapsed = run(scenario)
        with sock:
            assert sock.getpeername()[:2] == (V6, port)
            assert not sock.getblocking()
    assert elapsed < 0.2, "a refusal must start the next attempt without waiting for the delay"


@needs_ipv6
def test_every_address_refused_keeps_the_errno_and_names_each(no_leak: None) -> None:
    with closed_port(V4) as a, closed_port(V6) as b:

        async def scenario() -> None:
            await dial([candidate(V4, a), candidate(V6, b)], where="example.test:22")

        with pytest.raises(ConnectError) as caught:
            run(scenario)
    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ECONNREFUSED
    assert str(error).startswith("connect to example.test:22: every address failed")
    assert f"{V4}:{a}: connection refused" in str(error)
    assert f"[{V6}]:{b}: connection refused" in str(error)


def test_one_refused_address_is_named_plainly(no_leak: None) -> None:
    with closed_port(V4) as port, pytest.raises(ConnectError) as caught:
        run(lambda: dial([candidate(V4, port)]))
    assert str(caught.value) == f"connect to {V4}:{port}: connection refused"
    assert caught.value.errno == errno.ECONNREFUSED


@needs_ipv6
@pytest.mark.parametrize(("silent_host", "good_host"), [(V4, V6), (V6, V4)])
def test_silent_address_loses_to_the_next_after_the_delay(
    no_leak: None, silent_host: str, good_host: str
) -> None:
    with silent(silent_host) as quiet, listening(good_host) as good:
        port = good.getsockname()[1]

        async def scenario() -> tuple[socket.socket, float]:
            started = time.monotonic()
            sock = await dial([candidate(silent_host, quiet), candidate(good_host, port)])
            return sock, time.monotonic() - started

        sock, elapsed = run(scenario)
        with sock:
            assert sock.getpeername()[:2] == (good_host, port)
    assert 0.25 <= elapsed < 2, elapsed


@needs_ipv6
def test_timeout_spans_the_whole_race(no_leak: None) -> None:
    with silent(V4) as first, silent(V6) as second:

        async def scenario() -> None:
            await dial([candidate(V4, first), candidate(V6, second)], timeout=0.6)

        started = time.monotonic()
        with pytest.raises(HopcatTimeoutError) as caught:
            run(scenario)
        elapsed = time.monotonic() - started
    assert isinstance(caught.value, TimeoutError)
    assert (
        str(caught.value) == f"connect to {V4}:{first}: timed out after 0.6 s (2 addresses tried)"
    )
    assert 0.55 <= elapsed < 2, elapsed


def test_deadline_on_the_loop_clock(no_leak: None) -> None:
    with silent(V4) as port:

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            await dial([candidate(V4, port)], deadline=loop.time() + 0.3, timeout=60)

        with pytest.raises(HopcatTimeoutError) as caught:
            run(scenario)
    assert str(caught.value) == f"connect to {V4}:{port}: timed out"


@needs_ipv6
def test_cancelled_while_connecting_closes_every_attempt(no_leak: None) -> None:
    """Cancelled with two attempts under way: nothing stays open, and the cancellation is not
    turned into a timeout."""
    with silent(V4) as first, silent(V6) as second:

        async def scenario() -> None:
            task = asyncio.ensure_future(
                dial([candidate(V4, first), candidate(V6, second)], timeout=5)
            )
            await asyncio.sleep(0.4)  # past the 250 ms delay: both attempts are open
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(scenario)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_cancelled_around_the_win_closes_the_winner(no_leak: None, turns: int) -> None:
    """Cancelled after ``turns`` loop iterations against a listener that answers at once: at 1
    the connect has completed in the same iteration as the cancel, before the dial could return
    the socket. Whatever the timing, the caller gets the socket or nothing stays open."""
    with listening(V4) as good:
        port = good.getsockname()[1]

        async def scenario() -> socket.socket | None:
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(dial([candidate(V4, port)]))
            cancel_in(loop, turns, task.cancel)
            try:
                return await task
            except asyncio.CancelledError:
                return None

        sock = run(scenario)
        if sock is not None:
            sock.close()


def cancel_in(loop: asyncio.AbstractEventLoop, turns: int, cancel: Callable[[], object]) -> None:
    """Call ``cancel`` as a timer due ``turns`` iterations from now: timers run after the I/O
    callbacks of their iteration, so a connect that completes in it is seen first."""
    if turns == 0:
        cancel()
    else:
        loop.call_soon(lambda: loop.call_later(0, cancel_in, loop, turns - 1, cancel))


def test_no_candidates_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        run(lambda: dial([]))
