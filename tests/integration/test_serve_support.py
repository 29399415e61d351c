"""Helpers for the ``hopcat serve`` tests (this module holds no tests).

``ServeProcess`` runs the real entry point (``python -m hopcat serve``) as a subprocess in its own
session, on a free port chosen by the server (``127.0.0.1:0``), and waits for readiness through
``--ready-file`` with bounded polling; its log (stderr) goes to a file in ``tmp_path``. The
``serve`` fixtures (``serve_factory``) are factories; at teardown every server is stopped by pid (SIGTERM, then
SIGKILL) and its log printed, which pytest shows with a failing test.

Raw protocol clients (``socks5_connect``, ``socks4_connect``, ``http_connect``) speak exactly
what a test wants on a plain socket, for the cases no real client produces (hostile input,
pipelined bytes, unsupported commands).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from support import HOPCAT, clean_env

# Run the servers on another interpreter, e.g. a venv with uvloop installed (hopcat itself is
# then taken from this checkout's src/): HOPCAT_TEST_SERVE_PYTHON=bench/.venv-uvloop/bin/python
SERVE_PYTHON = os.environ.get("HOPCAT_TEST_SERVE_PYTHON")
SRC = str(Path(__file__).resolve().parents[2] / "src")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 10.0


class ServeProcess:
    """A running ``hopcat serve``; ``.host``/``.port`` of its first listener."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        listen: tuple[str, ...] = ("127.0.0.1:0",),
        preexec_fn: Callable[[], None] | None = None,
        name: str = "serve",
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_path = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        python = [SERVE_PYTHON, "-m", "hopcat"] if SERVE_PYTHON else HOPCAT
        self.argv = [*python, "serve", *listen, "--ready-file", str(self.ready_path), *args]
        extra = env or {}
        env = clean_env(PYTHONPATH=SRC, **extra) if SERVE_PYTHON else clean_env(**extra)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True, preexec_fn=preexec_fn,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"hopcat serve did not start ({self.argv}):\n{self.log()}")
            time.sleep(0.02)
        lines = self.ready_path.read_text().splitlines()
        self.addresses = [line for line in lines if not line.startswith("forward ")]
        # --forward listeners: "forward LISTEN TARGET" lines -> LISTEN, in order.
        self.forwards = [line.split()[1] for line in lines if line.startswith("forward ")]
        host, _, port = (self.addresses or self.forwards)[0].rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def hostport(self) -> str:
        return self.addresses[0]

    def url(
        self, scheme: str = "socks5h", user: str | None = None, password: str | None = None
    ) -> str:
        auth = f"{user}:{password}@" if user is not None else ""
        return f"{scheme}://{auth}{self.hostport}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"

    def json_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def wait_log(self, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until ``needle`` appears ``count`` times in the log; the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{needle!r} x{count} not in the log after {timeout} s:\n{text}"
                )
            time.sleep(0.02)

    def tunnel_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "event=tunnel" in line]

    def pids(self) -> list[int]:
        """The server's process and its children (--workers)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [self.pid, *map(int, f.read().split())]
        except OSError:
            return [self.pid]

    def fds(self) -> list[str]:
        """What each open descriptor of the server's processes is (socket:[...], pipe:[...],
        a path)."""
        out = []
        for pid in self.pids():
            base = f"/proc/{pid}/fd"
            with contextlib.suppress(OSError):
                for fd in os.listdir(base):
                    with contextlib.suppress(OSError):
                        out.append(os.readlink(f"{base}/{fd}"))
        return out

    def count_fds(self) -> tuple[int, int]:
        """(all descriptors, sockets) of the server process."""
        fds = self.fds()
        return len(fds), sum(1 for target in fds if target.startswith("socket:"))

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def serve_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Body of each test module's ``serve`` fixture:
    ``serve(*options, listen=("127.0.0.1:0",))`` -> a started ServeProcess."""
    started: list[ServeProcess] = []

    def start(*args: str, **kwargs: Any) -> ServeProcess:
        server = ServeProcess(tmp_path, *args, name=f"serve{len(started)}", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        code = server.stop()
        print(f"--- hopcat serve {server.argv[3:]} (exit {code}) log:\n{server.log()}")


# --------------------------------------------------------------------------- raw clients


def connect(server: ServeProcess, source: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT_S)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((server.host, server.port))
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes: {data!r}")
        data += chunk
    return data


def recv_until_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def socks5_address(host: str, port: int) -> bytes:
    for family, atyp in ((socket.AF_INET, 1), (socket.AF_INET6, 4)):
        with contextlib.suppress(OSError):
            return bytes((atyp,)) + socket.inet_pton(family, host) + port.to_bytes(2, "big")
    name = host.encode()
    return bytes((3, len(name))) + name + port.to_bytes(2, "big")


def socks5_connect(
    sock: socket.socket, host: str, port: int, *, user: str | None = None,
    password: str | None = None, command: int = 1,
) -> int:  # fmt: skip
    """Greeting, optional RFC 1929, request; the reply code (0 = success)."""
    sock.sendall(b"\x05\x01\x02" if user is not None else b"\x05\x01\x00")
    method = recv_exact(sock, 2)
    if method[1] == 0xFF:
        return -1
    if method[1] == 2:
        assert user is not None and password is not None
        sock.sendall(b"\x01" + bytes((len(user),)) + user.encode() + bytes((len(password),))
                     + password.encode())  # fmt: skip
        status = recv_exact(sock, 2)
        if status[1] != 0:
            return -2
    sock.sendall(b"\x05" + bytes((command,)) + b"\x00" + socks5_address(host, port))
    head = recv_exact(sock, 4)
    rest = {1: 4, 4: 16}.get(head[3])
    if rest is None:
        rest = recv_exact(sock, 1)[0]
    recv_exact(sock, rest + 2)
    return head[1]


def socks4_connect(sock: socket.socket, host: str, port: int, command: int = 1) -> int:
    """SOCKS4 (IPv4 literal) or 4a (a name); the CD byte of the reply (90 = granted)."""
    try:
        address, name = socket.inet_aton(host), b""
    except OSError:
        address, name = b"\0\0\0\1", host.encode() + b"\0"
    sock.sendall(b"\x04" + bytes((command,)) + port.to_bytes(2, "big") + address + b"me\0" + name)
    return recv_exact(sock, 8)[1]


def http_connect(sock: socket.socket, host: str, port: int, headers: str = "") -> tuple[int, str]:
    """CONNECT and read the response head byte by byte; (status, head)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"EOF in the response head: {head!r}")
        head += chunk
    return int(head.split()[1]), head.decode("latin-1")


def wait_closed(sock: socket.socket, timeout: float = IO_TIMEOUT_S) -> bytes:
    """Read until the server closes; what arrived. Fails if it stays open past ``timeout``."""
    sock.settimeout(timeout)
    return recv_until_eof(sock)
