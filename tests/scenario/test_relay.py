"""The relay in-process over socketpairs and pipes: every path, both directions, close orders."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from hopcat.errors import RelayError
from hopcat.relay.pump import RelayOptions, relay
from hopcat.relay.splice import grow_pipe
from support import pattern, sha256


class Peer:
    """The far end of the network: sends ``down``, reads to EOF, then closes."""

    def __init__(self, sock: socket.socket, down: bytes) -> None:
        self.sock = sock
        self.down = down
        self.received = bytearray()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        sender = threading.Thread(target=self.sock.sendall, args=(self.down,), daemon=True)
        sender.start()
        while data := self.sock.recv(1 << 16):
            self.received += data
        sender.join(30)
        self.sock.close()


def _pump_stdio(write_fd: int, data: bytes, read_fd: int, sink: bytearray) -> list[threading.Thread]:
    def feed() -> None:
        with os.fdopen(write_fd, "wb", closefd=True) as f:
            f.write(data)

    def drain() -> None:
        with os.fdopen(read_fd, "rb", closefd=True) as f:
            while chunk := f.read1(1 << 16):
                sink.extend(chunk)

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
@pytest.mark.parametrize("size", [0, 1, 65536, 3 << 20], ids=lambda n: f"{n}B")
def test_pipes(splice: bool, size: int) -> None:
    up, down = pattern(size, 41), pattern(size + 7, 42)
    ours, theirs = socket.socketpair()
    peer = Peer(theirs, down)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    got = bytearray()
    threads = _pump_stdio(in_w, up, out_r, got)
    with ours:
        stats = relay(ours, in_r, out_w, options=RelayOptions(splice=splice))
    os.close(in_r)
    for thread in [*threads, peer.thread]:
        thread.join(30)
    assert (stats.path_up, stats.path_down) == (("splice", "splice") if splice else ("copy", "copy"))
    assert sha256(bytes(peer.received)) == sha256(up)
    assert sha256(bytes(got)) == sha256(down)
    assert (stats.bytes_up, stats.bytes_down) == (len(up), len(down))


def test_socket_stdio_splices_through_a_pipe_and_initial_bytes_come_first() -> None:
    """stdin/stdout are sockets themselves (inetd style, or a server): socket -> pipe -> socket."""
    up, down = pattern(2 << 20, 43), pattern(1 << 20, 44)
    ours, theirs = socket.socketpair()
    peer = Peer(theirs, down)
    stdin_ours, stdin_theirs = socket.socketpair()
    stdout_ours, stdout_theirs = socket.socketpair()
    got = bytearray()
    threads = _pump_stdio(os.dup(stdin_theirs.fileno()), up, os.dup(stdout_theirs.fileno()), got)
    stdin_theirs.close()
    stdout_theirs.close()
    with ours, stdin_ours, stdout_ours:
        stats = relay(ours, stdin_ours.fileno(), stdout_ours.fileno(), initial_down=b"FIRST",
                      options=RelayOptions(close_output=False))
        stdout_ours.shutdown(socket.SHUT_WR)
    for thread in [*threads, peer.thread]:
        thread.join(30)
    assert (stats.path_up, stats.path_down) == ("splice via pipe", "splice via pipe")
    assert sha256(bytes(peer.received)) == sha256(up)
    assert bytes(got) == b"FIRST" + down


# -- after the peer's FIN: stdin is sent while it has bytes ready, then the relay ends ----------


def _half_closing_peer(sock: socket.socket, received: bytearray, down: bytes = b"") -> threading.Thread:
    """A server that says its piece, half-closes, then reads everything (until our close)."""

    def run() -> None:
        sock.sendall(down)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(1 << 16):
            received.extend(data)
        sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _fill(fd: int, seed: int) -> bytes:
    """Write into fd until it would block; the bytes written (a source left open, all ready)."""
    os.set_blocking(fd, False)
    written = bytearray()
    chunk = pattern(1 << 16, seed)
    try:
        while True:
            written += chunk[: os.write(fd, chunk)]
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    return bytes(written)


def test_regular_file_is_sent_to_its_end_after_the_peer_half_closes(tmp_path: Path) -> None:
    up = pattern(6 << 20, 45)
    (tmp_path / "up").write_bytes(up)
    ours, theirs = socket.socketpair()
    received = bytearray()
    peer = _half_closing_peer(theirs, received, b"ready\n")
    out_r, out_w = os.pipe()
    with ours, open(tmp_path / "up", "rb") as stdin:
        stats = relay(ours, stdin.fileno(), out_w)
    peer.join(30)
    assert os.read(out_r, 100) == b"ready\n"
    os.close(out_r)
    assert stats.bytes_up == len(up)
    assert sha256(bytes(received)) == sha256(up)


@pytest.mark.parametrize(
    ("kind", "splice", "path"),
    [
        ("pipe", True, "splice"),
        ("pipe", False, "copy"),
        ("socket", True, "splice via pipe"),
        ("socket", False, "copy"),
    ],
)
def test_ready_stdin_left_open_is_sent_then_the_relay_ends(kind: str, splice: bool, path: str) -> None:
    """stdin never ends (ssh's habit) but holds bytes when the peer half-closes: they all go out,
    then the relay ends instead of waiting for an EOF that never comes."""
    if kind == "pipe":
        stdin_r, stdin_w = os.pipe()
        grow_pipe(stdin_w)
    else:
        reader, writer = socket.socketpair()
        stdin_r, stdin_w = reader.detach(), writer.detach()
    up = _fill(stdin_w, 46)
    ours, theirs = socket.socketpair()
    received = bytearray()
    peer = _half_closing_peer(theirs, received)
    out_r, out_w = os.pipe()
    try:
        with ours:
            stats = relay(ours, stdin_r, out_w, options=RelayOptions(splice=splice))
        peer.join(30)
        assert stats.path_up == path
        assert (len(received), sha256(bytes(received))) == (len(up), sha256(up))
    finally:
        for fd in (stdin_r, stdin_w, out_r):
            os.close(fd)


def test_producer_that_keeps_writing_after_the_peer_fin() -> None:
    """Everything a producer writes after the peer's FIN arrives, as long as it keeps our stdin
    pipe from running dry; with the pipe left open the relay still ends once it is drained.

    In lockstep, so no timing decides it: the network is a socketpair, whose fixed buffer takes
    at most a few hundred KiB at a time from our 1 MiB pipe (a TCP socket's autotuned one could
    swallow the pipe whole). Fill everything, the peer half-closes, then reads 64 KiB at a time,
    and the producer tops the pipe up after each read."""
    total = 8 << 20
    up = pattern(total, 49)
    ours, theirs = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    outcome: list[object] = []

    def run_relay() -> None:
        try:
            outcome.append(relay(ours, stdin_r, out_w))
        except BaseException as exc:  # surfaced below
            outcome.append(exc)

    written = 0

    def top_up(wait_s: float) -> int:
        """Wait up to wait_s for room in the pipe, then write what fits."""
        nonlocal written
        before = written
        if select.select([], [stdin_w], [], wait_s)[1]:
            with contextlib.suppress(BlockingIOError):
                while written < total:
                    written += os.write(stdin_w, up[written : written + (1 << 16)])
        return written - before

    os.set_blocking(stdin_w, False)
    worker = threading.Thread(target=run_relay, daemon=True)
    worker.start()
    received = bytearray()
    try:
        with ours, theirs:
            theirs.settimeout(30)
            while top_up(0.2):
                pass  # until the pipe and the socketpair are full
            theirs.shutdown(socket.SHUT_WR)
            assert _read_all(out_r) == b""  # the relay saw the FIN and closed stdout
            after_fin = 0
            while len(received) < written or written < total:
                received += theirs.recv(1 << 16)
                after_fin += top_up(0.002)
            worker.join(30)
    finally:
        os.close(stdin_w)  # only now: the relay ended with its stdin still open
        os.close(stdin_r)
        os.close(out_r)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert after_fin > 1 << 20, "the producer kept writing after the peer's FIN"
    assert (len(received), sha256(bytes(received))) == (total, sha256(up))


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_idle_stdin_left_open_does_not_hold_the_relay(kind: str) -> None:
    """The ProxyCommand promise: the peer closes, ssh keeps stdin open and quiet, we end."""
    if kind == "pipe":
        stdin_r, stdin_w = os.pipe()
    else:
        reader, writer = socket.socketpair()
        stdin_r, stdin_w = reader.detach(), writer.detach()
    down = pattern(1 << 20, 47)
    ours, theirs = socket.socketpair()

    def peer() -> None:
        theirs.sendall(down)
        theirs.close()

    threading.Thread(target=peer, daemon=True).start()
    out_r, out_w = os.pipe()
    got = bytearray()
    drainer = threading.Thread(target=lambda: got.extend(_read_all(out_r)), daemon=True)
    drainer.start()
    try:
        with ours:
            relay(ours, stdin_r, out_w, options=RelayOptions(idle_timeout_s=20))
        drainer.join(30)
        assert sha256(bytes(got)) == sha256(down)
    finally:
        for fd in (stdin_r, stdin_w, out_r):
            os.close(fd)


def _read_all(fd: int) -> bytes:
    data = bytearray()
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return bytes(data)


def test_peer_that_stops_reading_is_reported_with_what_was_left(tmp_path: Path) -> None:
    """The peer half-closes, then closes for good: what stdin still had is counted, not lost."""
    up = pattern(8 << 20, 48)
    (tmp_path / "up").write_bytes(up)
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()

    def peer() -> None:
        theirs.shutdown(socket.SHUT_WR)
        theirs.recv(1)  # the relay has started sending
        # Close only once the relay has taken our EOF (it closes stdout then): an AF_UNIX close
        # with our FIN still unread would reach it as a reset instead.
        while os.read(out_r, 1 << 16):
            pass
        theirs.close()

    threading.Thread(target=peer, daemon=True).start()
    with ours, open(tmp_path / "up", "rb") as stdin, pytest.raises(RelayError) as caught:
        relay(ours, stdin.fileno(), out_w)
    os.close(out_r)
    match = re.fullmatch(
        r"sending to the peer: broken pipe \(after (\d+) bytes sent; (\d+) bytes of stdin not sent\)",
        str(caught.value),
    )
    assert match, str(caught.value)
    sent, unsent = map(int, match.groups())
    assert sent + unsent == len(up) and unsent > 0


# -- process state: O_NONBLOCK goes back as found, timeouts of any size --------------------------


def test_stdout_gets_its_blocking_mode_back_before_it_is_closed() -> None:
    """Another holder of stdout's pipe (the shell, the next command) must not inherit EAGAIN."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"bye")
    theirs.close()
    out_r, out_w = os.pipe()
    other_holder = os.dup(out_w)  # the same open file description, as a shell's copy would be
    try:
        with ours:
            relay(ours, os.open(os.devnull, os.O_RDONLY), out_w)
        assert os.get_blocking(other_holder)
        assert os.read(out_r, 10) == b"bye"
    finally:
        os.close(other_holder)
        os.close(out_r)


@pytest.mark.parametrize("close_output", [True, False])
def test_one_socket_as_stdin_and_stdout_is_left_blocking(close_output: bool) -> None:
    """inetd and socat EXEC give one socket as fds 0 and 1: flags read before any is changed."""
    ours, theirs = socket.socketpair()
    client, ours_stdio = socket.socketpair()
    theirs.sendall(b"reply")
    theirs.shutdown(socket.SHUT_WR)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    stdio = ours_stdio.fileno()
    duplicate = os.dup(stdio)
    with ours, client, ours_stdio:
        relay(ours, stdio, duplicate, options=RelayOptions(close_output=close_output))
        if not close_output:
            os.close(duplicate)
        assert os.get_blocking(stdio)
        assert client.recv(100) == b"reply"
        assert theirs.recv(100) == b"request"
    theirs.close()


def test_timeouts_beyond_what_poll_takes_work() -> None:
    """-w and -q values up to the largest float: poll() takes at most ~24.8 days at a time."""
    ours, theirs = socket.socketpair()
    peer = Peer(theirs, b"x" * 1000)
    in_r, in_w = os.pipe()
    os.write(in_w, b"hello")
    os.close(in_w)
    out_r, out_w = os.pipe()
    huge = sys.float_info.max
    with ours:
        stats = relay(ours, in_r, out_w, options=RelayOptions(idle_timeout_s=huge, quit_after_eof_s=huge))
    peer.thread.join(30)
    os.close(in_r)
    assert os.read(out_r, 2000) == b"x" * 1000
    os.close(out_r)
    assert (stats.bytes_up, bytes(peer.received)) == (5, b"hello")


# -- coalescing a bulk download: fewer wakeups, and a tail never waits for more ------------------


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _read_exactly(fd: int, count: int, timeout_s: float) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while len(data) < count:
        if not poller.poll(int(timeout_s * 1000)):
            break
        data += os.read(fd, count - len(data))
    return data


@pytest.mark.parametrize("stdin_busy", [False, True], ids=["stdin-quiet", "stdin-busy"])
def test_tail_after_a_bulk_burst_arrives_at_once(stdin_busy: bool) -> None:
    """After a burst big enough to coalesce, a small tail (an ssh prompt after `cat bigfile`)
    reaches stdout within the bounded wait, whether or not stdin keeps the loop busy."""
    ours, theirs = _tcp_pair()
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    grow_pipe(out_w)
    burst, tail = pattern(4 << 20, 60), b"prompt$ "
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            relay(ours, in_r, out_w)
            result.append(None)
        except BaseException as exc:  # reported by the test below
            result.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    feeder_stop = threading.Event()
    if stdin_busy:
        def feed() -> None:
            while not feeder_stop.is_set():
                os.write(in_w, b"k")
                feeder_stop.wait(0.0005)

        threading.Thread(target=feed, daemon=True).start()
    try:
        theirs.sendall(burst)
        assert sha256(_read_exactly(out_r, len(burst), 10)) == sha256(burst)
        theirs.sendall(tail)
        started = time.monotonic()
        assert _read_exactly(out_r, len(tail), 5) == tail
        assert time.monotonic() - started < 0.5, "the tail waited for more data"
    finally:
        feeder_stop.set()
        theirs.close()
        worker.join(10)
        for fd in (out_r, in_r, in_w):
            os.close(fd)
        ours.close()
    assert result and (result[0] is None or isinstance(result[0], RelayError)), result
