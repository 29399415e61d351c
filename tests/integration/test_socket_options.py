"""nc's small socket options, checked on the sockets themselves: ``-p`` (source port), ``-I``/``-O``
(buffer sizes, as ``ss -m`` reports them: the kernel doubles the value), ``-T`` (the ToS byte,
as ``ss --tos`` reports it) on dialled and accepted connections, ``-M`` and ``-D`` accepted.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from support import HOPCAT, clean_env, run_hopcat

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="ss needed (apt-get install iproute2)")


@contextmanager
def connected_hopcat(*args: str) -> Iterator[tuple[int, socket.socket]]:
    """hopcat dialling a local server with its stdin held open: (hopcat's local port, the
    server's side of the connection)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, *args, "127.0.0.1", str(server.getsockname()[1])],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=clean_env())  # fmt: skip
        server.settimeout(10)
        try:
            conn, peer = server.accept()
            with conn:
                yield peer[1], conn
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdin is not None
            proc.stdin.close()


def ss_line(port: int, *flags: str) -> str:
    out = subprocess.run(["ss", "-tn", *flags, f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return " ".join(out.splitlines()[1:])


def test_source_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with connected_hopcat("-p", str(port)) as (local_port, _conn):
        assert local_port == port


def test_buffer_sizes() -> None:
    with connected_hopcat("-I", "100000", "-O", "120000") as (local_port, _conn):
        memory = ss_line(local_port, "-m")
    assert re.search(r"\brb200000\b", memory) and re.search(r"\btb240000\b", memory), memory


@pytest.mark.parametrize(("value", "tos"), [("lowdelay", "0x10"), ("af41", "0x88"), ("0xb8", "0xb8")])
def test_tos_on_a_dialled_connection(value: str, tos: str) -> None:
    with connected_hopcat("-T", value) as (local_port, _conn):
        assert f"tos:{tos}" in ss_line(local_port, "--tos")


def test_tos_on_an_accepted_connection(tmp_path: object) -> None:
    from pathlib import Path

    ready = Path(str(tmp_path)) / "ready"
    proc = subprocess.Popen([*HOPCAT, "-l", "-T", "throughput", "--ready-file", str(ready),
                             "127.0.0.1", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=clean_env())  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        port = int(ready.read_text().strip().rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.2)
            assert "tos:0x8" in ss_line(port, "--tos").replace("tos:0x08", "tos:0x8")
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def test_ttl_and_so_debug_are_accepted() -> None:
    with connected_hopcat("-M", "7", "-D") as (_local_port, conn):
        conn.sendall(b"x")


def test_bad_values_are_one_line_and_exit_64() -> None:
    for args in (["-T", "bogus"], ["-M", "0"], ["-I", "0"], ["-p", "70000"]):
        result = run_hopcat(*args, "127.0.0.1", "9")
        assert result.returncode == 64 and result.stderr.count(b"\n") == 1, (args, result.stderr)


def received_from(*args: str, stdin: bytes) -> list[tuple[float, bytes]]:
    """What a server gets from ``hopcat ARGS`` fed ``stdin``: (arrival time, bytes) per read."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, *args, "127.0.0.1", str(server.getsockname()[1])],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=clean_env())  # fmt: skip
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
            reads = []
            while chunk := conn.recv(4096):
                reads.append((time.monotonic(), chunk))
        assert proc.wait(10) == 0
    return reads


def test_crlf_line_endings_reach_the_server() -> None:
    reads = received_from("-C", stdin=b"EHLO me\nMAIL FROM:<a@b>\r\nQUIT\n")
    assert b"".join(data for _at, data in reads) == b"EHLO me\r\nMAIL FROM:<a@b>\r\nQUIT\r\n"


def test_interval_paces_the_lines_sent() -> None:
    reads = received_from("-i", "0.3", stdin=b"one\ntwo\nthree")
    assert [data for _at, data in reads] == [b"one\n", b"two\n", b"three"]
    assert reads[2][0] - reads[0][0] >= 0.55, reads


def test_an_interval_beyond_what_time_t_holds_is_just_long() -> None:
    """-i takes any finite number, as every other wait does: the pause is slept in pieces."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, "-i", "1e12", "127.0.0.1", str(server.getsockname()[1])],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=clean_env())  # fmt: skip
        server.settimeout(10)
        conn, _ = server.accept()
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(b"first\nsecond\n")
        proc.stdin.flush()
        with conn:
            assert conn.recv(100) == b"first\n"
        assert proc.wait(10) == 0
        assert proc.stderr.read() == b""
        proc.stdin.close()
        proc.stderr.close()


def test_a_connection_to_itself_is_refused() -> None:
    """-p P to 127.0.0.1:P with nothing listening: TCP's simultaneous open would connect the
    socket to itself and hopcat would talk to itself; it is a refusal instead."""
    for _attempt in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        result = run_hopcat("-p", port, "127.0.0.1", port, input=b"echo?")
        # The port was free a moment ago; under a loaded suite another test may take it first
        # (seen in CI as "bind source address ...: address already in use"): take another.
        if b"address already in use" not in result.stderr:
            break
    assert result.returncode == 69, result.stderr
    assert result.stderr == f"hopcat: connect to 127.0.0.1:{port}: connection refused\n".encode()
    assert result.stdout == b""
