"""The relay in-process over socketpairs and pipes: every path, both directions, close orders."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from hopcat.relay.pump import RelayOptions, relay
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
