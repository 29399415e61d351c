"""Where hopcat meets the operating system: signals, inherited descriptor state, closed standard
descriptors, and idle waits that must cost no CPU. Each runs the real entry point."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import ssl
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import HOPCAT, Certificates, clean_env, closed_port, exchange, pattern


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- signals: exit 128+n with one line, O_NONBLOCK and terminal echo put back ------------------


@pytest.mark.parametrize(
    ("signum", "line"),
    [
        (signal.SIGTERM, b"hopcat: terminated (SIGTERM)\n"),
        (signal.SIGHUP, b""),  # ssh's way to end its ProxyCommand, after every session
        (signal.SIGINT, b"hopcat: interrupted (SIGINT)\n"),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_signal_mid_relay_restores_blocking_pipes(signum: int, line: bytes) -> None:
    """We keep our own ends of hopcat's stdin and stdout pipes: the same open file descriptions,
    as a shell's or the next command's would be. After the signal they must be blocking again."""
    with exchange(idle=True) as server:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        proc = subprocess.Popen(
            [*HOPCAT, server.host, str(server.port)], stdin=in_r, stdout=out_w,
            stderr=subprocess.PIPE, env=clean_env(),
        )
        try:
            _wait_for(lambda: not os.get_blocking(in_r) and not os.get_blocking(out_w),
                      "the relay to make its pipes non-blocking")
            proc.send_signal(signum)
            _out, err = proc.communicate(timeout=30)
            assert (proc.returncode, err) == (128 + signum, line)
            assert os.get_blocking(in_r) and os.get_blocking(out_w)
        finally:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)


def test_sigterm_during_the_password_prompt_turns_echo_back_on() -> None:
    """A pty as controlling terminal; hopcat prompts for a proxy password (a user, no password)."""
    master, slave = pty.openpty()
    # Make the pty the controlling terminal of the new session, then become hopcat.
    take_tty = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    with closed_port() as port:
        proc = subprocess.Popen(
            [sys.executable, "-c", take_tty, "-m", "hopcat", "-x",
             f"socks5://alice@127.0.0.1:{port}", "127.0.0.1", "22"],
            stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env=clean_env(),
        )
        try:
            prompt = b""
            while b"password for" not in prompt:
                assert select.select([master], [], [], 15)[0], f"no prompt, got {prompt!r}"
                prompt += os.read(master, 1024)
            _wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ECHO, "echo off")
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
            assert (proc.returncode, err) == (143, b"hopcat: terminated (SIGTERM)\n")
            assert termios.tcgetattr(slave)[3] & termios.ECHO, "echo left off"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
            os.close(slave)


# -- standard descriptors closed at start: /dev/null stands in, no socket lands on them --------


def _run_with_closed(fds: str, args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """hopcat with some of 0/1/2 closed (``0<&-``): via sh, since Popen always opens all three."""
    closes = " ".join(f"{fd}<&-" if fd == "0" else f"{fd}>&-" for fd in fds)
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {closes}', "sh", *HOPCAT, *args], input=stdin,
        capture_output=True, timeout=60, env=clean_env(),
    )


def test_closed_stdin_means_nothing_to_send() -> None:
    with exchange(b"from the server") as server:
        result = _run_with_closed("0", [server.host, str(server.port)])
        server.done.wait(10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"from the server"
    assert bytes(server.received) == b"", "the server's bytes were sent back to it"
    assert server.saw_eof, "a closed stdin is an empty one: EOF, then FIN"


def test_closed_stdout_discards_and_echoes_nothing_back() -> None:
    with exchange(b"from the server") as server:
        result = _run_with_closed("1", [server.host, str(server.port)], stdin=b"to the server")
        server.done.wait(10)
    assert result.returncode == 0, result.stderr
    assert bytes(server.received) == b"to the server"


def test_all_three_closed() -> None:
    with exchange(b"from the server") as server:
        result = _run_with_closed("012", ["-v", server.host, str(server.port)])
        server.done.wait(10)
    assert result.returncode == 0
    assert bytes(server.received) == b""
    assert server.saw_eof


def test_closed_stderr_failure_keeps_its_exit_code() -> None:
    with closed_port() as port:
        result = _run_with_closed("2", ["127.0.0.1", str(port)])
    assert result.returncode == 69


def test_closed_stdout_help_is_no_internal_error() -> None:
    assert _run_with_closed("1", ["--help"]).returncode == 0


def test_serve_gets_dev_null_for_closed_standard_descriptors(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", *HOPCAT, "serve", "127.0.0.1:0",
         "--ready-file", str(ready)], env=clean_env(),
    )
    try:
        _wait_for(ready.exists, "serve's ready file")
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == os.devnull
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- idle waits cost no CPU --------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_share_over(pid: int, seconds: float) -> float:
    before, started = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # measuring, not synchronising: the window the share is taken over
    return (_cpu_seconds(pid) - before) / (time.monotonic() - started)


def _send_until_stuck(sock: socket.socket, segment: bytes) -> None:
    """Small segments (each a page in a pipe) until nothing has moved for 0.3 s: all full."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(0.3)
    try:
        while True:
            sock.sendall(segment)
    except TimeoutError:
        pass


@pytest.mark.parametrize("kind", ["socket", "pipe", "pty"])
def test_stdout_nobody_reads_costs_no_cpu(kind: str) -> None:
    """The peer sends, stdout is full: socket (splice via pipe), pipe (splice), pty (copy)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    keep: list[object] = []
    if kind == "socket":
        ours, theirs = socket.socketpair()
        keep += [ours, theirs]
        stdout = theirs.fileno()
    elif kind == "pipe":
        out_r, stdout = os.pipe()
        keep += [out_r, stdout]
    else:
        master, stdout = pty.openpty()
        keep += [master, stdout]
    in_r, in_w = os.pipe()
    proc = subprocess.Popen(
        [*HOPCAT, "127.0.0.1", str(listener.getsockname()[1])], stdin=in_r, stdout=stdout,
        stderr=subprocess.PIPE, env=clean_env(),
    )
    try:
        conn, _ = listener.accept()
        with conn:
            _send_until_stuck(conn, pattern(200, 20))
            share = _cpu_share_over(proc.pid, 1.0)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        listener.close()
        os.close(in_r)
        os.close(in_w)
        for item in keep:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()  # type: ignore[attr-defined]
    assert share < 0.1, f"{share:.0%} CPU while waiting"


def test_socket_stdin_to_a_peer_that_does_not_read_costs_no_cpu() -> None:
    """inetd / socat EXEC: stdin is a socket (socket -> our pipe -> socket), the peer is stuck."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    feeder, stdin = socket.socketpair()
    proc = subprocess.Popen(
        [*HOPCAT, "127.0.0.1", str(listener.getsockname()[1])], stdin=stdin.fileno(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(),
    )
    try:
        conn, _ = listener.accept()
        with conn:
            feeder.settimeout(0.3)
            segment = pattern(200, 21)
            try:
                while True:
                    feeder.sendall(segment)
            except TimeoutError:
                pass
            share = _cpu_share_over(proc.pid, 1.0)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        listener.close()
        feeder.close()
        stdin.close()
    assert share < 0.1, f"{share:.0%} CPU while waiting"


@pytest.mark.parametrize("direction", ["down", "up"])
def test_tls_relay_stuck_either_way_costs_no_cpu(
    direction: str, certificates: Certificates
) -> None:
    """Through TLS (records decrypted in hopcat, where poll cannot see them): a full stdout
    pipe while the peer sends, or a peer that stops reading while stdin has more."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.set_blocking(in_w, False)
    proc = subprocess.Popen(
        [*HOPCAT, "--tls", "--tls-ca", str(certificates.ca), "127.0.0.1",
         str(listener.getsockname()[1])], stdin=in_r, stdout=out_w, stderr=subprocess.PIPE,
        env=clean_env(),
    )  # fmt: skip
    try:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            if direction == "down":
                _send_until_stuck(tls, pattern(200, 22))
            else:
                try:  # stdin's pipe full behind a socket the peer does not read
                    while True:
                        os.write(in_w, pattern(65536, 23))
                except BlockingIOError:
                    time.sleep(0.3)  # let the relay fill the socket and settle
            share = _cpu_share_over(proc.pid, 1.0)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        listener.close()
        for fd in (out_r, out_w, in_r, in_w):
            os.close(fd)
    assert share < 0.1, f"{share:.0%} CPU while waiting"
