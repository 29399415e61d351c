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


def test_crlf_line_endings_reach_the_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, "-C", "127.0.0.1", str(server.getsockname()[1])],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=clean_env())  # fmt: skip
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            assert proc.stdin is not None
            proc.stdin.write(b"EHLO me\nMAIL FROM:<a@b>\r\nQUIT\n")
            proc.stdin.close()
            got = b""
            while chunk := conn.recv(4096):
                got += chunk
        assert proc.wait(10) == 0
    assert got == b"EHLO me\r\nMAIL FROM:<a@b>\r\nQUIT\r\n"


def test_interval_paces_the_lines_sent() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, "-i", "0.3", "127.0.0.1", str(server.getsockname()[1])],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=clean_env())  # fmt: skip
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            assert proc.stdin is not None
            proc.stdin.write(b"one\ntwo\nthree")
            proc.stdin.close()
            arrivals = []
            got = b""
            while chunk := conn.recv(4096):
                got += chunk
                arrivals.append(time.monotonic())
        assert proc.wait(10) == 0
    assert got == b"one\ntwo\nthree"
    assert len(arrivals) == 3 and arrivals[2] - arrivals[0] >= 0.55, arrivals
