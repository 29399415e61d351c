"""The half-close matrix, after OpenBSD nc's own regression suite (regress/usr.bin/nc): a small
task runner drives two ends through scripts of "send a line", "read a line", "shut down the
write side" and "wait for EOF", in every order of greeting, EOF and shutdown.

An end is either a plain socket (the peer) or a hopcat driven through its stdin and stdout pipes
("shut" closes its stdin, "eof" waits for its stdout to end). The matrix runs hopcat as the
client against the peer as the server, hopcat as the server (``-l``) against the peer as the
client, and hopcat against hopcat; every hopcat must then exit 0. Last, an idle hopcat must sleep
in poll: its CPU time stays near zero while nothing moves.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import HOPCAT, clean_env

STEP_TIMEOUT_S = 10.0


class SocketEnd:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(STEP_TIMEOUT_S)
        self.pending = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def shut(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def _more(self) -> bytes:
        return self.sock.recv(65536)

    def recv(self, line: str) -> None:
        while b"\n" not in self.pending:
            chunk = self._more()
            assert chunk, f"EOF while waiting for {line!r}"
            self.pending += chunk
        got, self.pending = self.pending.split(b"\n", 1)
        assert got.decode() == line

    def eof(self) -> None:
        while chunk := self._more():
            self.pending += chunk
        assert self.pending == b"", f"unexpected bytes before EOF: {self.pending!r}"

    def close(self) -> None:
        self.sock.close()


class HopcatEnd(SocketEnd):
    """A hopcat process: its stdin pipe is our send side, its stdout pipe our receive side."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin: int | None = proc.stdin.fileno()
        self.stdout = proc.stdout.fileno()
        self.pending = b""

    def send(self, line: str) -> None:
        assert self.stdin is not None
        os.write(self.stdin, line.encode() + b"\n")

    def shut(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.stdin = None

    def _more(self) -> bytes:
        ready, _, _ = select.select([self.stdout], [], [], STEP_TIMEOUT_S)
        assert ready, "hopcat's stdout stayed silent"
        return os.read(self.stdout, 65536)

    def close(self) -> None:
        try:
            code = self.proc.wait(STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("hopcat did not exit at the end of the script")
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        assert code == 0


# Scripts: (end, action, line) with end "a" (hopcat, or the first hopcat) or "b" (the other).
SCRIPTS: dict[str, list[tuple[str, str, str]]] = {
    "b-greets-a-shuts-first": [
        ("b", "send", "hello"), ("a", "recv", "hello"), ("a", "send", "hi"), ("b", "recv", "hi"),
        ("a", "shut", ""), ("b", "eof", ""), ("b", "send", "late"), ("a", "recv", "late"),
        ("b", "shut", ""), ("a", "eof", ""),
    ],
    "a-greets-b-shuts-first": [
        ("a", "send", "hello"), ("b", "recv", "hello"), ("b", "send", "bye"), ("b", "shut", ""),
        ("a", "recv", "bye"), ("a", "eof", ""), ("a", "shut", ""), ("b", "eof", ""),
    ],
    "a-sends-and-shuts-at-once": [
        ("a", "send", "x"), ("a", "shut", ""), ("b", "recv", "x"), ("b", "eof", ""),
        ("b", "send", "y"), ("b", "shut", ""), ("a", "recv", "y"), ("a", "eof", ""),
    ],
    "b-shuts-without-a-word": [
        ("b", "shut", ""), ("a", "eof", ""), ("a", "send", "still here"),
        ("b", "recv", "still here"), ("a", "shut", ""), ("b", "eof", ""),
    ],
    "a-shuts-without-a-word": [
        ("a", "shut", ""), ("b", "eof", ""), ("b", "send", "after"), ("a", "recv", "after"),
        ("b", "shut", ""), ("a", "eof", ""),
    ],
    "both-greet-then-both-shut": [
        ("a", "send", "from a"), ("b", "send", "from b"), ("a", "recv", "from b"),
        ("b", "recv", "from a"), ("a", "shut", ""), ("b", "shut", ""), ("a", "eof", ""),
        ("b", "eof", ""),
    ],
}


def _writes_after_peer_shut(script: list[tuple[str, str, str]]) -> set[str]:
    """The ends that send after the other end shut down: as hopcats they need --keep-sending,
    since by default (the ProxyCommand rule) hopcat ends once the peer's FIN came and its stdin
    has nothing ready."""
    shut: set[str] = set()
    late: set[str] = set()
    for end, action, _line in script:
        if action == "shut":
            shut.add(end)
        elif action == "send" and ({"a", "b"} - {end}) & shut:
            late.add(end)
    return late


def _hopcat(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*HOPCAT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=clean_env())  # fmt: skip


def _listening_hopcat(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = _hopcat(*extra, "-l", "--ready-file", str(ready), "127.0.0.1", "0")
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "hopcat -l did not start"
        time.sleep(0.02)
    return proc, int(ready.read_text().strip().rsplit(":", 1)[1])


def _ends(
    arrangement: str, tmp_path: Path, extra: tuple[str, ...]
) -> Iterator[tuple[SocketEnd, SocketEnd]]:
    if arrangement == "hopcat-client":
        with socket.create_server(("127.0.0.1", 0)) as server:
            proc = _hopcat(*extra, "127.0.0.1", str(server.getsockname()[1]))
            server.settimeout(STEP_TIMEOUT_S)
            conn, _ = server.accept()
        yield HopcatEnd(proc), SocketEnd(conn)
    elif arrangement == "hopcat-server":
        proc, port = _listening_hopcat(tmp_path, *extra)
        yield HopcatEnd(proc), SocketEnd(socket.create_connection(("127.0.0.1", port)))
    else:
        server_proc, port = _listening_hopcat(tmp_path, *extra)
        yield HopcatEnd(_hopcat(*extra, "127.0.0.1", str(port))), HopcatEnd(server_proc)


HOPCAT_ENDS = {"hopcat-client": {"a"}, "hopcat-server": {"a"}, "hopcat-both": {"a", "b"}}
MATRIX = [
    pytest.param(arrangement, script, mode, id=f"{arrangement}-{script}-{mode}")
    for arrangement in HOPCAT_ENDS for script in SCRIPTS for mode in ("default", "keep-sending")
    if mode == "keep-sending" or not _writes_after_peer_shut(SCRIPTS[script]) & HOPCAT_ENDS[arrangement]
]  # fmt: skip


@pytest.mark.parametrize(("arrangement", "script", "mode"), MATRIX)
def test_half_close_matrix(arrangement: str, script: str, mode: str, tmp_path: Path) -> None:
    extra = ("--keep-sending",) if mode == "keep-sending" else ()
    for a, b in _ends(arrangement, tmp_path, extra):
        ends = {"a": a, "b": b}
        try:
            for end, action, line in SCRIPTS[script]:
                step = getattr(ends[end], action)
                step(line) if line else step()
        finally:
            for side in (a, b):
                side.close()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_listener_and_an_idle_relay_sleep_in_poll(tmp_path: Path) -> None:
    proc, port = _listening_hopcat(tmp_path)
    try:
        waiting = _cpu_s(proc.pid)
        time.sleep(1.5)
        assert _cpu_s(proc.pid) - waiting < 0.1, "busy while waiting for a client"
        with socket.create_connection(("127.0.0.1", port)) as conn:
            time.sleep(0.3)  # accepted and relaying, nothing to move either way
            relaying = _cpu_s(proc.pid)
            time.sleep(1.5)
            assert _cpu_s(proc.pid) - relaying < 0.1, "busy while relaying nothing"
            conn.shutdown(socket.SHUT_WR)
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
