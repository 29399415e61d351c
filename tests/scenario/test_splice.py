"""The splice core on real descriptors: the probe's answer (refused -> None and remembered; once
bytes moved, an error is an error), EAGAIN left to the caller, pipes as both relays get them, and
the CLI relay's fallback to copying when a destination refuses splice."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopcat.relay.pump import Flow
from hopcat.relay.splice import HAVE_SPLICE, PIPE_SIZE_BYTES, Splicer, open_pipe

pytestmark = pytest.mark.skipif(not HAVE_SPLICE, reason="no os.splice on this platform")

F_GETPIPE_SZ = 1032  # fcntl.h


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    fds = open_pipe()
    yield fds
    for fd in fds:
        os.close(fd)


def test_a_refused_first_splice_answers_none_and_is_remembered() -> None:
    # Neither end a pipe: the kernel answers EINVAL, as it does for a descriptor it cannot splice.
    a, b = socket.socketpair()
    with a, b:
        splicer = Splicer()
        assert splicer.usable
        assert splicer.splice_once(a.fileno(), b.fileno(), 4096) is None
        assert not splicer.usable


def test_once_bytes_moved_einval_is_an_error(pipe: tuple[int, int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello")
        splicer = Splicer()
        assert splicer.splice_once(b.fileno(), pipe[1], 4096) == 5
        with pytest.raises(OSError) as caught:
            splicer.splice_once(a.fileno(), b.fileno(), 4096)
        assert caught.value.errno == errno.EINVAL
        assert splicer.usable


def test_eagain_is_raised_and_decides_nothing(pipe: tuple[int, int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        splicer = Splicer()
        with pytest.raises(BlockingIOError):
            splicer.splice_once(b.fileno(), pipe[1], 4096)
        assert splicer.usable and not splicer.proven


def test_splicing_turned_off_is_not_usable() -> None:
    assert not Splicer(False).usable


def test_open_pipe_is_non_blocking_close_on_exec_and_grown(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        assert not os.get_blocking(fd)
        assert not os.get_inheritable(fd)
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if limit < PIPE_SIZE_BYTES and os.geteuid() != 0:
        pytest.skip(f"pipe-max-size is {limit}: the pipe stays at the default")
    assert fcntl.fcntl(pipe[1], F_GETPIPE_SZ) == PIPE_SIZE_BYTES


def test_cli_flow_copies_when_its_destination_refuses_splice(tmp_path: Path) -> None:
    """A pair chosen for splicing whose first splice is refused (a file opened O_APPEND answers
    EINVAL) is copied instead, with no byte lost."""
    read_fd, write_fd = open_pipe()
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    flow = Flow("down", read_fd, out, "splice")
    try:
        os.write(write_fd, b"first")
        flow.on_ready(read_fd)
        assert flow.mode == "copy"
        os.write(write_fd, b" second")
        os.close(write_fd)
        write_fd = -1
        while not flow.finished:
            flow.on_ready(read_fd)
    finally:
        flow.close()
        for fd in (read_fd, write_fd, out):
            if fd >= 0:
                os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"first second"
    assert flow.moved == len(b"first second")
