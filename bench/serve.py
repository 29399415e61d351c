#!/usr/bin/env python3
"""Proxy-server benchmark: ``hopcat serve`` against Dante, microsocks, tinyproxy and pproxy.

Every server is started fresh on a free 127.0.0.1 port (config and log in a temp dir, its own
session so its whole process tree is accounted and stopped), measured, and stopped; repetitions
are interleaved (rep 1: every server, rep 2: every server in a rotated order, ...) and the report
shows medians. SOCKS5 is spoken to every server but tinyproxy (HTTP CONNECT).

Measurements (``--only``, default all):

single    one stream up (client -> target) and one down, ``--size`` bytes each. The client cannot
          be the bottleneck: it sends with sendfile(2) from a memfd and receives with
          recv(MSG_TRUNC) (the kernel discards, nothing is copied); the target does the same. The
          8-byte length goes first so no side depends on how a proxy passes a FIN. Reported: MB/s
          (10^6 bytes/s) and the proxy's CPU seconds per GiB (utime+stime of its process tree
          from /proc, children included).
aggregate ``--streams`` concurrent down streams of ``--stream-size`` each (sendfile / MSG_TRUNC,
          one thread per stream: the syscalls release the GIL): total MB/s and CPU-s/GiB.
tps       new tunnels per second: ``--inflight`` (16) at once, each connect, handshake, read the
          target's banner, close (the target closes first, the client after it has seen the
          end), for ``--tps-seconds``. Client: one thread, non-blocking sockets, requests
          prebuilt; banner target: a separate process with a selectors loop.
idle      memory per idle established tunnel: on a second fresh instance, open ``--idle``
          tunnels (banner read, then left open), and report the growth of the proxy's PSS
          (/proc/PID/smaps_rollup, summed over its process tree) divided by the count, in KiB.
          The descriptor limit is raised to the hard limit for the run (inherited by the
          servers). Kernel socket buffers are not in PSS; pipes are kernel memory too.

pproxy comes from PyPI into ``bench/.venv-pproxy`` (created on first use with pip). The
``hopcat-uvloop`` server (not in the default list) runs hopcat from ``bench/.venv-uvloop``
with uvloop installed there.

Usage:
    python3 bench/serve.py                       # full: 1 GiB, 3 reps, 64x64 MiB, 10 s, 2000 idle
    python3 bench/serve.py --size 64M --reps 1 --stream-size 4M --tps-seconds 2 --idle 300
    python3 bench/serve.py --servers hopcat,dante --only single,tps --json out.json
    python3 bench/serve.py --servers hopcat,hopcat-uvloop --hopcat-args="-q" --only tps

Progress goes to stderr, a Markdown report to stdout. Numbers on a shared 2-core machine are
noisy: compare within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
BANNER = b"SSH-2.0-bench-banner\r\n"
BANNER_PORTS = 32  # target ports the tps client rotates over (see banner_target_main)
CLIENT_ADDRESSES = 32  # and 127.0.0.1..127.0.0.32 as its source addresses
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
ZERO_FILE_BYTES = 64 * MiB  # memfd the senders sendfile from (repeatedly)
TRUNC_BUFFER = bytearray(4 * MiB)  # MSG_TRUNC never writes into it; recv_into needs one

# --------------------------------------------------------------------------- servers


def hopcat_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def ensure_venv(path: Path, packages: list[str]) -> Path:
    """A venv at ``path`` with ``packages`` pip-installed (once); its python."""
    python = path / "bin" / "python"
    stamp = path / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(packages):
        return python
    log(f"creating {path} with {' '.join(packages)} (pip, from PyPI)")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    stamp.write_text(" ".join(packages))
    return python


HOPCAT_EXTRA: list[str] = []  # --hopcat-args


def argv_hopcat(workdir: Path, port: int, python: str | None = None) -> list[str]:
    return [
        python or hopcat_python(), "-m", "hopcat", "serve", f"{HOST}:{port}",
        "--max-conns", "100000", "--max-conns-per-client", "0", *HOPCAT_EXTRA,
    ]  # fmt: skip


def argv_hopcat_uvloop(workdir: Path, port: int) -> list[str]:
    python = ensure_venv(BENCH / ".venv-uvloop", ["uvloop"])
    # hopcat from this checkout, on the uvloop venv's interpreter (env execs: same pid).
    return ["env", f"PYTHONPATH={REPO / 'src'}",
            *argv_hopcat(workdir, port, str(python)), "--event-loop", "uvloop"]  # fmt: skip


def argv_dante(workdir: Path, port: int) -> list[str]:
    lines = [
        "logoutput: stderr",
        f"internal: {HOST} port = {port}",
        f"external: {HOST}",
        "clientmethod: none",
        "socksmethod: none",
    ]
    if os.geteuid() == 0:
        lines += ["user.privileged: root", "user.unprivileged: nobody"]
    lines += [
        "client pass {", "  from: 127.0.0.0/8 to: 127.0.0.0/8", "}",
        "socks pass {", "  from: 127.0.0.0/8 to: 127.0.0.0/8", "  command: connect",
        "  protocol: tcp", "  log: error", "}",
    ]  # fmt: skip
    conf = workdir / "danted.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return [exe("danted"), "-f", str(conf), "-p", str(workdir / "danted.pid")]


def argv_microsocks(workdir: Path, port: int) -> list[str]:
    return [exe("microsocks"), "-i", HOST, "-p", str(port)]


def argv_tinyproxy(workdir: Path, port: int) -> list[str]:
    lines = ["User nobody", "Group nogroup"] if os.geteuid() == 0 else []
    lines += [
        f"Port {port}", f"Listen {HOST}", "Timeout 600", "LogLevel Critical",
        "MaxClients 100000", "Allow 127.0.0.0/8", "DisableViaHeader Yes",
    ]  # fmt: skip
    conf = workdir / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return [exe("tinyproxy"), "-d", "-c", str(conf)]


def argv_pproxy(workdir: Path, port: int) -> list[str]:
    python = ensure_venv(BENCH / ".venv-pproxy", ["pproxy"])
    return [str(python), "-m", "pproxy", "-l", f"socks5://{HOST}:{port}"]


# name -> (argv builder, protocol spoken to it)
SERVERS = {
    "hopcat": (argv_hopcat, "socks5"),
    "hopcat-uvloop": (argv_hopcat_uvloop, "socks5"),
    "dante": (argv_dante, "socks5"),
    "microsocks": (argv_microsocks, "socks5"),
    "tinyproxy": (argv_tinyproxy, "http"),
    "pproxy": (argv_pproxy, "socks5"),
}
DEFAULT_SERVERS = "hopcat,dante,microsocks,tinyproxy,pproxy"


def exe(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{program} is not installed")
    return found


def _stat(pid: str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(name)
            if fields is not None and int(fields[3]) == sid:  # field 6: session
                pids.append(int(name))
    return pids


class Daemon:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.name, self.proc, self.port, self.log_path = name, proc, port, log_path

    def cpu(self) -> float:
        ticks = 0
        for pid in session_pids(self.proc.pid):
            fields = _stat(str(pid))
            if fields is not None:
                ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        return ticks / CLK_TCK

    def pss_kib(self) -> int:
        total = 0
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        return total

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-800:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        # SO_REUSEADDR: a port whose old connections sit in TIME_WAIT is fine for a listener
        # (the servers set it too), and without it bind(0) can run out of ports after many runs.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(name: str, workdir: Path) -> Daemon:
    build, _protocol = SERVERS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    for _attempt in range(5):
        port = free_port()
        argv = build(workdir, port)
        log_path = workdir / f"{name}.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=workdir, start_new_session=True, env=clean_env(),
            )  # fmt: skip
        daemon = Daemon(name, proc, port, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                time.sleep(0.2)  # let multi-process servers finish starting their workers
                return daemon
            time.sleep(0.02)
        daemon.stop()
        if "in use" not in daemon.log_tail().lower():
            break
    raise RuntimeError(f"{name} did not start: {daemon.log_tail()}")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not (k.lower().endswith("_proxy") or k.startswith(("SOCKS", "CONNECT_")))}  # fmt: skip


# --------------------------------------------------------------------------- client side


def handshake_bytes(protocol: str, port: int) -> tuple[list[bytes], list[int]]:
    """What the client sends, step by step, and how many reply bytes each step waits for."""
    if protocol == "socks5":
        request = b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + port.to_bytes(2, "big")
        return [b"\x05\x01\x00", request], [2, 10]
    line = f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    return [line], [-1]  # -1: up to the end of the response head


def open_tunnel(
    proxy_port: int, protocol: str, target_port: int, timeout: float = 10
) -> socket.socket:
    sock = socket.create_connection((HOST, proxy_port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sends, replies = handshake_bytes(protocol, target_port)
    for data, size in zip(sends, replies, strict=True):
        sock.sendall(data)
        if size > 0:
            got = b""
            while len(got) < size:
                chunk = sock.recv(size - len(got))
                if not chunk:
                    raise ConnectionError("proxy closed during the handshake")
                got += chunk
            if got[1] != 0 and len(got) == 10:
                raise ConnectionError(f"SOCKS5 reply {got[1]}")
        else:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)  # byte by byte: the target's bytes must stay in the socket
                if not chunk:
                    raise ConnectionError("proxy closed during the handshake")
                head += chunk
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                raise ConnectionError(f"proxy answered {head.splitlines()[0]!r}")
    return sock


def zero_fd() -> int:
    fd = os.memfd_create("bench-zeros", os.MFD_CLOEXEC)
    chunk = bytes(MiB)
    for _ in range(ZERO_FILE_BYTES // MiB):
        os.write(fd, chunk)
    return fd


def send_zeros(sock: socket.socket, fd: int, total: int) -> None:
    """sendfile ``total`` bytes from the zero memfd, wrapping around its end."""
    sent = 0
    out = sock.fileno()
    while sent < total:
        offset = sent % ZERO_FILE_BYTES
        count = min(total - sent, ZERO_FILE_BYTES - offset)
        sent += os.sendfile(out, fd, offset, count)


def recv_discard(sock: socket.socket, total: int) -> int:
    """recv(MSG_TRUNC) until ``total`` bytes or EOF; the count."""
    got = 0
    while got < total:
        count = sock.recv_into(TRUNC_BUFFER, min(len(TRUNC_BUFFER), total - got), socket.MSG_TRUNC)
        if count == 0:
            break
        got += count
    return got


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return data


class StreamTarget:
    """Per connection: read a 12-byte header (4-byte stream id, direction byte, 7-byte length),
    then either discard that many bytes (up) or, after one more "go" byte, send that many
    (down); record when the last byte arrived (up). The "go" byte lets the aggregate run start
    every stream at once without bytes piling up in the proxy before the clock starts."""

    def __init__(self, zeros: int) -> None:
        self.zeros = zeros
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.port = int(self.listener.getsockname()[1])
        self.finished: dict[int, tuple[float, int]] = {}  # stream id -> (time, bytes)
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                header = recv_exact(conn, 12)
                stream, direction, size = (
                    int.from_bytes(header[:4], "big"),
                    header[4],
                    int.from_bytes(header[5:], "big"),
                )
                if direction == 0:
                    moved = recv_discard(conn, size)
                else:
                    recv_exact(conn, 1)  # "go"
                    send_zeros(conn, self.zeros, size)
                    moved = size
                    recv_exact(conn, 1)  # the client's "done": close only after it has it all
            except OSError:
                moved, stream = -1, -1
            with self.cond:
                self.finished[stream] = (time.perf_counter(), moved)
                self.cond.notify_all()

    def wait(self, stream: int, timeout: float) -> tuple[float, int]:
        with self.cond:
            if not self.cond.wait_for(lambda: stream in self.finished, timeout):
                raise TimeoutError(f"stream {stream} did not finish")
            return self.finished.pop(stream)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def run_stream(daemon: Daemon, protocol: str, target: StreamTarget, stream: int, direction: int,
               size: int, zeros: int) -> tuple[float, float]:  # fmt: skip
    """One stream through the proxy; (seconds from tunnel-open to the last byte, bytes)."""
    sock = open_tunnel(daemon.port, protocol, target.port)
    with sock:
        sock.settimeout(None)
        header = stream.to_bytes(4, "big") + bytes((direction,)) + size.to_bytes(7, "big")
        sock.sendall(header + (b"g" if direction else b""))
        started = time.perf_counter()
        if direction == 0:
            send_zeros(sock, zeros, size)
            ended, moved = target.wait(stream, 600)
        else:
            moved = recv_discard(sock, size)
            ended = time.perf_counter()
            sock.sendall(b"k")
            target.wait(stream, 60)
    if moved != size:
        raise RuntimeError(f"{daemon.name}: stream moved {moved} of {size} bytes")
    return ended - started, float(moved)


_stream_ids = iter(range(1, 1 << 31))


def measure_single(daemon: Daemon, protocol: str, target: StreamTarget, zeros: int,
                   size: int) -> dict[str, float]:  # fmt: skip
    out: dict[str, float] = {}
    for name, direction in (("up", 0), ("down", 1)):
        cpu0 = daemon.cpu()
        seconds, moved = run_stream(
            daemon, protocol, target, next(_stream_ids), direction, size, zeros
        )
        cpu = daemon.cpu() - cpu0
        out[f"{name}_mbps"] = moved / seconds / 1e6
        out[f"{name}_cpu_per_gib"] = cpu / (moved / GiB)
    return out


def measure_aggregate(daemon: Daemon, protocol: str, target: StreamTarget, zeros: int,
                      streams: int, size: int) -> dict[str, float]:  # fmt: skip
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)
    done: list[float] = []

    def one() -> None:
        try:
            sock = open_tunnel(daemon.port, protocol, target.port)
            stream = next(_stream_ids)
            with sock:
                sock.settimeout(None)
                sock.sendall(stream.to_bytes(4, "big") + b"\x01" + size.to_bytes(7, "big"))
                barrier.wait(60)
                sock.sendall(b"g")
                if recv_discard(sock, size) != size:
                    raise RuntimeError("short stream")
                done.append(time.perf_counter())
                sock.sendall(b"k")
                target.wait(stream, 60)
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    cpu0 = daemon.cpu()
    started = time.perf_counter()
    for thread in threads:
        thread.join(600)
    cpu = daemon.cpu() - cpu0
    if errors:
        raise RuntimeError(f"{daemon.name}: aggregate: {errors[0]!r}")
    total = streams * size
    seconds = max(done) - started
    return {"agg_mbps": total / seconds / 1e6, "agg_cpu_per_gib": cpu / (total / GiB)}


def banner_target_main(port_file: str) -> None:
    """Banner targets in their own process, on several ports.

    The first port holds connections open (send BANNER, close at the client's EOF): the idle
    test. The others send BANNER and close at once: the tunnels-per-second test. There the target
    closes first, so the TIME_WAIT state of every connection lands on a listening port (the
    target's, then the proxy's) and tens of thousands of short tunnels do not use up the
    ephemeral ports of 127.0.0.1, which would make proxies that bind before connecting (Dante)
    and the harness itself fail with EADDRINUSE after a few runs.
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    sel = selectors.DefaultSelector()
    ports = []
    for index in range(1 + BANNER_PORTS):
        listener = socket.create_server((HOST, 0), backlog=4096)
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, "hold" if index == 0 else "close")
        ports.append(str(listener.getsockname()[1]))
    Path(port_file + ".tmp").write_text(" ".join(ports))
    os.replace(port_file + ".tmp", port_file)
    while True:
        for key, _ in sel.select():
            if key.data in ("hold", "close"):
                listener = key.fileobj  # type: ignore[assignment]
                for _ in range(64):
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    try:
                        conn.send(BANNER)
                    except OSError:
                        conn.close()
                        continue
                    if key.data == "close":
                        conn.close()
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, None)
            else:
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()


class BannerTarget:
    def __init__(self, workdir: Path) -> None:
        port_file = workdir / "banner.port"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--banner-target", str(port_file)], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("banner target did not start")
            time.sleep(0.01)
        ports = [int(port) for port in port_file.read_text().split()]
        self.port = ports[0]  # holds connections open
        self.ports = ports[1:]  # banner, then close

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def measure_tps(daemon: Daemon, protocol: str, banner_ports: list[int], inflight: int,
                seconds: float) -> dict[str, float]:  # fmt: skip
    """Tunnels per second with ``inflight`` at once: connect, handshake, banner, close.

    The target sends its banner and closes; the client reads the reply and the banner, then
    the end of stream, then closes (see banner_target_main for why the target closes first).
    The client ACKs at once (TCP_QUICKACK after every read): a proxy that leaves Nagle on
    would otherwise wait out our delayed ACK (40 ms) before the banner, which measures the
    client rather than the proxy.
    """
    plans = [handshake_bytes(protocol, port)[0] for port in banner_ports]
    wants = [2, 10 + len(BANNER)] if protocol == "socks5" else [-1]
    sel = selectors.DefaultSelector()
    completed = failed = 0
    errors: dict[str, int] = {}
    address = (HOST, daemon.port)
    launched = 0
    quickack = getattr(socket, "TCP_QUICKACK", None)

    def launch() -> None:
        nonlocal launched
        launched += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Choose the port at connect time, per 4-tuple, not at bind time (Linux).
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.0.{1 + launched % CLIENT_ADDRESSES}", 0))
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, os.strerror(code))
        plan = plans[(launched // CLIENT_ADDRESSES) % len(plans)]
        sel.register(sock, selectors.EVENT_WRITE, [0, b"", plan])  # [step, received, sends]

    for _ in range(inflight):
        launch()
    cpu0 = daemon.cpu()
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, events in sel.select(deadline - now):
            sock = key.fileobj
            state = key.data
            sends = state[2]
            try:
                if events & selectors.EVENT_WRITE:
                    sock.send(sends[0])  # type: ignore[union-attr]
                    sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                data = sock.recv(65536)  # type: ignore[union-attr]
                if quickack is not None and data:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)  # type: ignore[union-attr]
                if state[0] == len(sends):  # banner in: wait for the end the target started
                    if data:
                        raise ConnectionError(f"bytes after the banner: {data[:40]!r}")
                    completed += 1
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    launch()
                    continue
                if not data:
                    raise ConnectionError("closed")
                state[1] += data
                want = wants[state[0]]
                if want == -1:
                    end = state[1].find(b"\r\n\r\n")
                    complete = end != -1 and len(state[1]) >= end + 4 + len(BANNER)
                else:
                    complete = len(state[1]) >= want
                if not complete:
                    continue
                state[0] += 1
                if state[0] < len(sends):
                    state[1] = b""
                    sock.send(sends[state[0]])  # type: ignore[union-attr]
                    continue
                if not state[1].endswith(BANNER):
                    raise ConnectionError(f"bad answer {state[1][:40]!r}")
                continue  # then EOF
            except OSError as exc:
                failed += 1
                errors.setdefault(str(exc), 0)
                errors[str(exc)] += 1
            sel.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            launch()
    elapsed = time.perf_counter() - started
    cpu = daemon.cpu() - cpu0
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    if failed > completed // 100:
        raise RuntimeError(f"{daemon.name}: tps: {failed} failed, {completed} completed: {errors}")
    return {"tps": completed / elapsed, "tps_cpu_ms": cpu / max(completed, 1) * 1000,
            "tps_failed": float(failed)}  # fmt: skip


def measure_idle(daemon: Daemon, protocol: str, banner_port: int, count: int) -> dict[str, float]:
    """PSS growth per idle established tunnel (banner read, then nothing)."""
    warm = [open_tunnel(daemon.port, protocol, banner_port) for _ in range(20)]
    for sock in warm:
        recv_exact(sock, len(BANNER))
        sock.close()
    time.sleep(0.5)
    before = daemon.pss_kib()
    held = []
    try:
        for _ in range(count):
            sock = open_tunnel(daemon.port, protocol, banner_port)
            recv_exact(sock, len(BANNER))
            held.append(sock)
        time.sleep(1.0)
        after = daemon.pss_kib()
    finally:
        for sock in held:
            sock.close()
    return {"idle_kib": (after - before) / count, "pss_before_kib": float(before)}


# --------------------------------------------------------------------------- driver


def log(message: str) -> None:
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


COLUMNS = [
    ("up_mbps", "up MB/s"), ("up_cpu_per_gib", "up CPU-s/GiB"),
    ("down_mbps", "down MB/s"), ("down_cpu_per_gib", "down CPU-s/GiB"),
    ("agg_mbps", "64-stream MB/s"), ("agg_cpu_per_gib", "64-stream CPU-s/GiB"),
    ("tps", "tunnels/s"), ("tps_cpu_ms", "CPU ms/tunnel"), ("idle_kib", "KiB/idle tunnel"),
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=DEFAULT_SERVERS)
    parser.add_argument("--only", default="single,aggregate,tps,idle")
    parser.add_argument("--size", default="1G", help="single-stream size (default 1G)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-size", default="64M")
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--tps-seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--hopcat-args", default="", help="extra options for hopcat serve")
    parser.add_argument("--banner-target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.banner_target:
        banner_target_main(args.banner_target)
        return 0
    HOPCAT_EXTRA.extend(args.hopcat_args.split())
    names = [n for n in args.servers.split(",") if n]
    for name in names:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r} (choose from {', '.join(SERVERS)})")
    only = set(args.only.split(","))
    size = parse_size(args.size)
    stream_size = parse_size(args.stream_size)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    zeros = zero_fd()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    failures: list[str] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hopcat-bench-serve-") as tmp:
        work = Path(tmp)
        banner = BannerTarget(work)
        target = StreamTarget(zeros)
        try:
            for rep in range(args.reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    protocol = SERVERS[name][1]
                    row: dict[str, float] = {}
                    try:
                        if only & {"single", "aggregate", "tps"}:
                            daemon = start_server(name, work / f"{name}-{rep}")
                            try:
                                if "tps" in only:
                                    log(f"rep {rep + 1} {name}: tunnels per second")
                                    row |= measure_tps(daemon, protocol, banner.ports,
                                                       args.inflight, args.tps_seconds)  # fmt: skip
                                if "single" in only:
                                    log(f"rep {rep + 1} {name}: single stream")
                                    row |= measure_single(daemon, protocol, target, zeros, size)
                                if "aggregate" in only:
                                    log(f"rep {rep + 1} {name}: {args.streams} streams")
                                    row |= measure_aggregate(daemon, protocol, target, zeros,
                                                             args.streams, stream_size)  # fmt: skip
                            finally:
                                daemon.stop()
                        if "idle" in only:
                            log(f"rep {rep + 1} {name}: {args.idle} idle tunnels")
                            daemon = start_server(name, work / f"{name}-{rep}-idle")
                            try:
                                row |= measure_idle(daemon, protocol, banner.port, args.idle)
                            finally:
                                daemon.stop()
                    except Exception as exc:
                        failures.append(f"rep {rep + 1} {name}: {exc}")
                        log(f"FAILED: rep {rep + 1} {name}: {exc}")
                    results[name].append(row)
        finally:
            target.close()
            banner.close()
    print(report(results, names, args, load, failures))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "failures": failures}, indent=1))  # fmt: skip
    return 1 if failures else 0


def report(results: dict[str, list[dict[str, float]]], names: list[str], args: argparse.Namespace,
           load: float, failures: list[str]) -> str:  # fmt: skip
    lines = [
        "# hopcat serve benchmark",
        "",
        f"{args.reps} rep(s), interleaved; single stream {args.size}, {args.streams} streams x "
        f"{args.stream_size}, {args.inflight} tunnels in flight for {args.tps_seconds:g} s, "
        f"{args.idle} idle tunnels; {os.cpu_count()} CPUs, load average {load:.2f} at start. "
        "Medians.",
        "",
    ]
    shown = [(key, title) for key, title in COLUMNS
             if any(key in row for rows in results.values() for row in rows)]  # fmt: skip
    titles = [title.replace("64-stream", f"{args.streams}-stream") for _, title in shown]
    lines.append("| server | " + " | ".join(titles) + " |")
    lines.append("|---|" + "---:|" * len(shown))
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        cells = []
        medians[name] = {}
        for key, _title in shown:
            values = [row[key] for row in results[name] if key in row]
            if not values:
                cells.append("-")
                continue
            value = statistics.median(values)
            medians[name][key] = value
            cells.append(f"{value:.0f}" if value >= 100 else f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    hop = medians.get("hopcat", {})
    checks = []
    dante, pproxy = medians.get("dante", {}), medians.get("pproxy", {})
    for key, other, label, better in (
        ("up_mbps", dante, "single stream up >= Dante", "higher"),
        ("down_mbps", dante, "single stream down >= Dante", "higher"),
        ("up_cpu_per_gib", dante, "CPU/GiB up <= Dante", "lower"),
        ("down_cpu_per_gib", dante, "CPU/GiB down <= Dante", "lower"),
        ("tps", dante, "tunnels/s >= Dante", "higher"),
        ("idle_kib", pproxy, "KiB/idle tunnel < pproxy", "lower"),
    ):
        if key in hop and key in other:
            ok = hop[key] >= other[key] if better == "higher" else hop[key] <= other[key]
            checks.append(f"- {label}: {hop[key]:.2f} vs {other[key]:.2f}: "
                          f"{'met' if ok else 'NOT met'}")  # fmt: skip
    if checks:
        lines += ["", "Targets (hopcat vs peer, same run):", *checks]
    if failures:
        lines += ["", "Failures:", *(f"- {failure}" for failure in failures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
