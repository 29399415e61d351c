"""-F over a real socketpair: the fd arrives, and no byte of the target's is consumed."""

from __future__ import annotations

import os
import socket
import subprocess

from hopcat.net.fdpass import pass_fd
from support import HOPCAT, clean_env, exchange, run_hopcat


def _receive_fd(channel: socket.socket) -> socket.socket:
    msg, fds, _flags, _addr = socket.recv_fds(channel, 1, 1)
    assert msg == b"\0" and len(fds) == 1
    return socket.socket(fileno=fds[0])


def test_direct_fd_handed_over_and_banner_left_in_socket() -> None:
    with exchange(b"SSH-2.0-banner\r\n", close_after_up=5) as server:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            proc = subprocess.run([*HOPCAT, "-F", server.host, str(server.port)], stdout=theirs,
                                  stderr=subprocess.PIPE, timeout=30, env=clean_env())
            assert proc.returncode == 0, proc.stderr
            with _receive_fd(ours) as conn:
                assert conn.recv(64) == b"SSH-2.0-banner\r\n"
                conn.sendall(b"hello")
        server.done.wait(10)
    assert bytes(server.received) == b"hello"


def test_stdout_not_a_unix_socket() -> None:
    result = run_hopcat("-F", "127.0.0.1", "9")
    assert result.returncode == 64
    assert result.stderr == (b"hopcat: -F: stdout is not a Unix socket; use -F only as ssh's "
                             b"ProxyCommand with ProxyUseFdpass yes\n")


def test_https_hop_cannot_be_handed_over() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.run([*HOPCAT, "-F", "-x", "https://127.0.0.1:9", "127.0.0.1", "22"],
                              stdout=theirs, stderr=subprocess.PIPE, timeout=30, env=clean_env())
    assert proc.returncode == 64
    assert b"a TLS proxy (https://, socks5+tls://) keeps its TLS session inside hopcat" in proc.stderr


def test_pass_fd_leaves_the_channel_non_blocking_as_found() -> None:
    """O_NONBLOCK is shared with ssh's end of the channel: hopcat must not change it."""
    ours, ssh_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    passed, _other = socket.socketpair()
    with ours, ssh_end, passed, _other:
        ours.setblocking(False)
        pass_fd(ours.fileno(), passed.fileno())
        assert not os.get_blocking(ours.fileno())
        _msg, fds, _flags, _addr = socket.recv_fds(ssh_end, 1, 1)
        for fd in fds:
            os.close(fd)
