#!/usr/bin/env python3
"""Relay benchmark: hopcat vs nc.openbsd / ncat / socat (stdlib only).

Measures, interleaved across tools, for each tool relaying between a pipe
and a loopback TCP socket:

* upload    stdin pipe (fed from a memfd with splice) -> tool -> TCP sink
* download  TCP source (sendfile from a memfd) -> tool -> stdout pipe (spliced
            to /dev/null); the tool's stdin stays open, it must exit by itself
            when the server closes
* latency   spawn -> first byte of a server banner readable on the tool's stdout

Usage: python3 bench/relay.py [--size 1G] [--reps 5] [--latency-runs 40]
       [--tools hopcat,nc,ncat,socat] [--only up,down,latency] [--json FILE]
       [--proxy dante,microsocks,tinyproxy,direct]   (proxy mode: bench/proxies.py)

Progress goes to stderr, the Markdown report to stdout.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MiB = 1 << 20
GiB = 1 << 30
ZERO_CHUNK = 8 * MiB  # size of the zero-filled memfd used by feeder and source
IO_CHUNK = 1 * MiB  # sink recv / reader splice request size
BANNER = b"SSH-2.0-OpenSSH_9.2 hopcat-bench\r\n"
MODES = ("up", "down", "latency")

# Children we spawned and have not reaped yet (killed on Ctrl-C / crash).
_LIVE_PIDS: set[int] = set()


# --------------------------------------------------------------------------
# Tool table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """A proxy to relay through (--proxy mode, see bench/proxies.py).

    scheme: "socks5" (remote DNS, i.e. socks5h), "socks4" (IPv4 target),
    "socks4a" or "http" (CONNECT).
    """

    scheme: str
    host: str
    port: int


# builder(base_argv, mode, host, port, proxy) -> argv, or None if the tool
# cannot do that mode / proxy type.  mode is one of MODES.
Builder = Callable[[list[str], str, str, int, "Proxy | None"], "list[str] | None"]


def build_hopcat(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None):
    # hopcat is a ProxyCommand-style bidirectional relay: same command in all
    # modes; upload relies on it half-closing after stdin EOF, download on it
    # exiting when the server closes although stdin is still open.
    argv = list(base)
    if proxy is not None:
        scheme = {"socks5": "socks5h", "socks4": "socks4", "socks4a": "socks4a", "http": "http"}[
            proxy.scheme
        ]
        argv += ["-x", f"{scheme}://{proxy.host}:{proxy.port}"]
    return [*argv, host, str(port)]


def build_nc_openbsd(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None):
    argv = list(base)
    if mode == "up":
        argv.append("-N")  # shutdown(SHUT_WR) after stdin EOF
    elif mode == "down":
        argv.append("-d")  # do not read stdin
    if proxy is not None:
        kind = {"socks5": "5", "socks4": "4", "socks4a": "4", "http": "connect"}[proxy.scheme]
        argv += ["-X", kind, "-x", f"{proxy.host}:{proxy.port}"]
    return [*argv, host, str(port)]


def build_ncat(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None):
    argv = list(base)
    if mode == "up":
        argv.append("--send-only")
    elif mode == "down":
        argv.append("--recv-only")
    if proxy is not None:
        kind = {"socks5": "socks5", "socks4": "socks4", "socks4a": "socks4", "http": "http"}[
            proxy.scheme
        ]
        argv += ["--proxy", f"{proxy.host}:{proxy.port}", "--proxy-type", kind]
        if proxy.scheme in ("socks5", "socks4a"):
            argv += ["--proxy-dns", "remote"]
    return [*argv, host, str(port)]


def build_socat(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None):
    if proxy is None:
        target = f"TCP:{host}:{port}"
    elif proxy.scheme == "socks4":  # host must be an IPv4 address
        target = f"SOCKS4:{proxy.host}:{host}:{port},socksport={proxy.port}"
    elif proxy.scheme == "socks4a":
        target = f"SOCKS4A:{proxy.host}:{host}:{port},socksport={proxy.port}"
    elif proxy.scheme == "http":
        target = f"PROXY:{proxy.host}:{host}:{port},proxyport={proxy.port}"
    else:
        return None  # socat 1.7 has no SOCKS5 address type
    if mode == "up":
        return [*base, "-u", "STDIN", target]
    if mode == "down":
        return [*base, "-u", target, "STDOUT"]
    return [*base, "STDIO", target]


def build_connect_proxy(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None):
    # connect-proxy relays directly when no proxy is given.
    argv = list(base)
    if proxy is not None:
        if proxy.scheme == "http":
            argv += ["-H", f"{proxy.host}:{proxy.port}"]
        else:
            argv += ["-S", f"{proxy.host}:{proxy.port}"]
            if proxy.scheme == "socks4":
                argv += ["-4"]
            elif proxy.scheme == "socks4a":
                argv += ["-4", "-R", "remote"]
    return [*argv, host, str(port)]


@dataclass
class Tool:
    key: str  # name used with --tools
    name: str  # display name
    build: Builder
    argv: list[str] | None = None  # resolved base command, None if unavailable
    env: dict[str, str] | None = None  # extra environment
    missing: str | None = None  # why it is unavailable

    def command(self, mode: str, port: int, proxy: Proxy | None = None) -> list[str] | None:
        assert self.argv is not None
        return self.build(self.argv, mode, HOST, port, proxy)


# key -> (display name, executable, builder)
TOOL_TABLE: dict[str, tuple[str, str | None, Builder]] = {
    "hopcat": ("hopcat", None, build_hopcat),
    "nc": ("nc.openbsd", "nc.openbsd", build_nc_openbsd),
    "ncat": ("ncat", "ncat", build_ncat),
    "socat": ("socat", "socat", build_socat),
    "connect": ("connect-proxy", "connect-proxy", build_connect_proxy),
}
TOOL_ALIASES = {"nc.openbsd": "nc", "netcat": "nc", "connect-proxy": "connect"}
DEFAULT_TOOLS = "hopcat,nc,ncat,socat"
DEFAULT_PROXY_TOOLS = "hopcat,nc,ncat,connect,socat"  # --proxy mode
# --proxy names (bench/proxies.py); "direct" adds rows without a proxy for comparison.
PROXY_KINDS = ("dante", "microsocks", "tinyproxy", "direct")
BASELINE = "nc"


def resolve_tool(key: str, hopcat_cmd: str | None) -> Tool:
    name, exe, builder = TOOL_TABLE[key]
    tool = Tool(key=key, name=name, build=builder)
    if key == "hopcat":
        if hopcat_cmd:
            argv = shlex.split(hopcat_cmd)
            path = shutil.which(argv[0]) if os.sep not in argv[0] else argv[0]
            if not path or not os.access(path, os.X_OK):
                tool.missing = f"--hopcat command not found: {argv[0]}"
            else:
                tool.argv = [path, *argv[1:]]
        elif os.access(REPO / ".venv/bin/hopcat", os.X_OK):
            tool.argv = [str(REPO / ".venv/bin/hopcat")]
        elif (REPO / "src/hopcat").is_dir():
            tool.argv = [sys.executable, "-m", "hopcat"]
            pp = os.environ.get("PYTHONPATH")
            tool.env = {"PYTHONPATH": str(REPO / "src") + (os.pathsep + pp if pp else "")}
        else:
            tool.missing = f"no {REPO}/.venv/bin/hopcat and no {REPO}/src/hopcat"
        return tool
    assert exe is not None
    path = shutil.which(exe)
    if path is None:
        tool.missing = f"{exe} not installed"
    else:
        tool.argv = [path]
    return tool


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def spawn(argv: list[str], env: dict[str, str] | None, stdin: int, stdout: int, stderr: int) -> int:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    pid = os.posix_spawn(
        argv[0],
        argv,
        full_env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ],
        # Python ignores SIGPIPE/SIGXFSZ; ignored dispositions survive exec.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )
    _LIVE_PIDS.add(pid)
    return pid


@dataclass
class Exit:
    status: int  # exit code, or -signal
    rusage: resource.struct_rusage
    t_exit: float  # perf_counter when the exit was noticed
    timed_out: bool


def wait_exit(pid: int, timeout: float) -> Exit:
    """Wait for pid to exit (at most timeout s, then SIGKILL); reap with wait4."""
    timed_out = False
    t_exit = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            p = select.poll()
            p.register(pidfd, select.POLLIN)
            ready = p.poll(max(0, int(timeout * 1000)))
            t_exit = time.perf_counter()
        finally:
            os.close(pidfd)
        if not ready:
            timed_out = True
    else:  # fallback: busy-ish polling
        deadline = time.perf_counter() + timeout
        while True:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                t_exit = time.perf_counter()
                break
            if time.perf_counter() > deadline:
                timed_out = True
                break
            time.sleep(0.0005)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, wstatus, ru = os.wait4(pid, 0)
    _LIVE_PIDS.discard(pid)
    if t_exit is None or timed_out:
        t_exit = time.perf_counter()
    return Exit(os.waitstatus_to_exitcode(wstatus), ru, t_exit, timed_out)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    _LIVE_PIDS.discard(pid)


def rusage_cpu(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def thread_cpu() -> float:
    try:
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        return ru.ru_utime + ru.ru_stime
    except (AttributeError, OSError):
        return time.thread_time()


def read_tail(f, limit: int = 400) -> str:
    try:
        f.seek(0)
        data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").strip()
    if len(text) > limit:
        text = "..." + text[-limit:]
    return " | ".join(text.splitlines())


def make_zero_fd(size: int) -> int:
    """A memfd (or /dev/shm file) of `size` zero bytes, really written (no holes)."""
    try:
        fd = os.memfd_create("hopcat-bench-zeros", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd, name = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.unlink(name)
    block = bytes(MiB)
    for _ in range(size // MiB):
        os.write(fd, block)
    return fd


def make_listener(rcvbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        # Must be set before listen() to be inherited (and window-scaled) by accept().
        opt = getattr(socket, "SO_RCVBUFFORCE", None) if os.geteuid() == 0 else None
        try:
            s.setsockopt(socket.SOL_SOCKET, opt or socket.SO_RCVBUF, rcvbuf)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((HOST, 0))
    s.listen(16)
    return s


# --------------------------------------------------------------------------
# Endpoints (threads in the benchmark process; each measures its own CPU)
# --------------------------------------------------------------------------


class Endpoint(threading.Thread):
    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.count = 0
        self.cpu = 0.0
        self.t_done: float | None = None  # perf_counter when its job was complete
        self.error: str | None = None
        self.abort_reason: str | None = None

    def run(self) -> None:
        c0 = thread_cpu()
        try:
            self.work()
        except BaseException as e:  # reported as a failed run
            why = self.abort_reason or f"{type(e).__name__}: {e}"
            self.error = f"{self.name}: {why}"
        finally:
            if self.t_done is None:
                self.t_done = time.perf_counter()
            self.cpu = thread_cpu() - c0

    def work(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def abort(self, reason: str = "aborted") -> None:
        self.abort_reason = self.abort_reason or reason


class ServerEndpoint(Endpoint):
    def __init__(self, name: str, lst: socket.socket, accept_timeout: float):
        super().__init__(name)
        self.lst = lst
        self.accept_timeout = accept_timeout
        self.conn: socket.socket | None = None
        self._aborted = False

    def accept(self) -> socket.socket:
        self.lst.settimeout(self.accept_timeout)
        conn, _ = self.lst.accept()
        conn.setblocking(True)
        self.conn = conn
        if self._aborted:
            conn.close()
            raise RuntimeError("aborted")
        return conn

    def abort(self, reason: str = "aborted") -> None:
        super().abort(reason)
        self._aborted = True
        for s in (self.lst, self.conn):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Sink(ServerEndpoint):
    """Upload sink: accept one connection, discard until EOF, count bytes."""

    def __init__(self, lst: socket.socket, accept_timeout: float, trunc: bool = True):
        super().__init__("sink", lst, accept_timeout)
        self.flags = getattr(socket, "MSG_TRUNC", 0) if trunc else 0

    def work(self) -> None:
        conn = self.accept()
        buf = bytearray(IO_CHUNK)
        recv_into, flags, n, count = conn.recv_into, self.flags, len(buf), 0
        try:
            while True:
                k = recv_into(buf, n, flags)  # MSG_TRUNC: TCP discards, no copy
                if not k:
                    break
                count += k
        finally:
            self.count = count
        self.t_done = time.perf_counter()
        conn.close()


class Feeder(Endpoint):
    """Upload feeder: splice `total` zero bytes from a memfd into a pipe, then close it."""

    def __init__(self, wfd: int, total: int, zero_fd: int):
        super().__init__("feeder")
        self.wfd, self.total, self.zero_fd = wfd, total, zero_fd

    def work(self) -> None:
        remaining = self.total
        try:
            try:
                while remaining:
                    k = os.splice(self.zero_fd, self.wfd, min(remaining, ZERO_CHUNK), offset_src=0)
                    if not k:
                        raise RuntimeError("splice returned 0")
                    remaining -= k
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                mv = memoryview(bytes(IO_CHUNK))  # splice unsupported: plain writes
                while remaining:
                    remaining -= os.write(self.wfd, mv[: min(remaining, IO_CHUNK)])
        finally:
            self.count = self.total - remaining
            os.close(self.wfd)
        self.t_done = time.perf_counter()


class Source(ServerEndpoint):
    """Download source: accept, sendfile `total` zero bytes, half-close, then close."""

    def __init__(self, lst: socket.socket, accept_timeout: float, total: int, zero_fd: int):
        super().__init__("source", lst, accept_timeout)
        self.total, self.zero_fd = total, zero_fd

    def work(self) -> None:
        conn = self.accept()
        fd, remaining = conn.fileno(), self.total
        try:
            while remaining:
                remaining -= os.sendfile(fd, self.zero_fd, 0, min(remaining, ZERO_CHUNK))
        finally:
            self.count = self.total - remaining
        conn.shutdown(socket.SHUT_WR)  # FIN now: "server closes"
        self.t_done = time.perf_counter()
        # Close for good once the client has gone (avoids an RST if it sent
        # anything); bounded by the accept timeout.
        conn.settimeout(self.accept_timeout)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        conn.close()


class Reader(Endpoint):
    """Download reader: splice the tool's stdout pipe into /dev/null until EOF."""

    def __init__(self, rfd: int, devnull_w: int):
        super().__init__("reader")
        self.rfd, self.devnull_w = rfd, devnull_w

    def work(self) -> None:
        count = 0
        try:
            try:
                while True:
                    k = os.splice(self.rfd, self.devnull_w, IO_CHUNK)
                    if not k:
                        break
                    count += k
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                buf = bytearray(IO_CHUNK)
                while True:
                    k = os.readv(self.rfd, [buf])
                    if not k:
                        break
                    count += k
        finally:
            self.count = count
            os.close(self.rfd)
        self.t_done = time.perf_counter()


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    mode: str
    rep: int
    ok: bool = False
    error: str | None = None
    nbytes: int = 0
    wall: float | None = None
    exit_status: int | None = None
    tool_user: float | None = None
    tool_sys: float | None = None
    src_cpu: float | None = None  # feeder (up) / source server (down)
    dst_cpu: float | None = None  # sink server (up) / stdout reader (down)
    harness_cpu: float | None = None  # whole benchmark process (all threads)
    src_count: int | None = None
    dst_count: int | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def tool_cpu(self) -> float | None:
        if self.tool_user is None or self.tool_sys is None:
            return None
        return self.tool_user + self.tool_sys


class Ctx:
    def __init__(self, args: argparse.Namespace):
        self.size: int = args.size
        self.timeout: float = args.timeout
        self.rcvbuf: int = args.rcvbuf
        self.trunc: bool = not args.no_trunc
        self.zero_fd = make_zero_fd(ZERO_CHUNK)
        self.devnull_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.proxy: Proxy | None = None  # set per run by --proxy mode (bench/proxies.py)


def _self_cpu() -> float:
    return rusage_cpu(resource.getrusage(resource.RUSAGE_SELF))


def _finish(
    run: Run,
    ex: Exit | None,
    t0: float,
    h0: float,
    endpoints: Sequence[Endpoint],
    join_timeout: float,
    errf,
) -> None:
    if ex is not None:
        # The tool has exited: a connection it made is already in the accept
        # queue, so a server still waiting in accept() will never get one.
        deadline = time.perf_counter() + 1.0
        for ep in endpoints:
            if isinstance(ep, ServerEndpoint):
                while ep.conn is None and ep.is_alive() and time.perf_counter() < deadline:
                    time.sleep(0.005)
                if ep.conn is None and ep.is_alive():
                    ep.abort("the tool never connected")
    for ep in endpoints:
        ep.join(join_timeout)
        if ep.is_alive():
            ep.abort(f"still running {join_timeout:.0f}s after the tool exited")
            ep.join(5)
    run.harness_cpu = _self_cpu() - h0
    errors = []
    if ex is not None:
        run.exit_status = ex.status
        run.tool_user, run.tool_sys = ex.rusage.ru_utime, ex.rusage.ru_stime
        t_end = max([ex.t_exit] + [ep.t_done or ex.t_exit for ep in endpoints])
        run.wall = t_end - t0
        if ex.timed_out:
            errors.append(f"timeout after {run.wall:.1f}s (killed)")
        elif ex.status != 0:
            errors.append(f"exit status {ex.status}")
    for ep in endpoints:
        if ep.is_alive():
            errors.append(f"{ep.name} still running")
        if ep.error:
            errors.append(ep.error)
    if run.dst_count is not None and run.dst_count != run.nbytes:
        errors.append(f"received {run.dst_count} bytes, expected {run.nbytes}")
    if errors:
        tail = read_tail(errf)
        if tail:
            errors.append(f"stderr: {tail}")
        run.error = "; ".join(errors)
    run.ok = not errors


def run_upload(ctx: Ctx, tool: Tool, rep: int, size: int) -> Run:
    run = Run(tool.name, "up", rep, nbytes=size)
    lst = make_listener(ctx.rcvbuf)
    port = lst.getsockname()[1]
    argv = tool.command("up", port, ctx.proxy)
    if argv is None:
        lst.close()
        run.error = "mode not supported by tool"
        return run
    run.argv = argv
    sink = Sink(lst, ctx.timeout, ctx.trunc)
    r, w = os.pipe()
    feeder = Feeder(w, size, ctx.zero_fd)  # owns (and closes) w
    ex = None
    with tempfile.TemporaryFile() as errf:
        sink.start()
        feeder.start()
        h0 = _self_cpu()
        t0 = time.perf_counter()
        try:
            pid = spawn(argv, tool.env, r, ctx.devnull_w, errf.fileno())
        except OSError as e:
            sink.error = f"spawn failed: {e}"
        else:
            os.close(r)
            r = -1
            ex = wait_exit(pid, ctx.timeout)
            if ex.timed_out:
                sink.abort("tool timed out")
        if r >= 0:
            os.close(r)  # feeder gets EPIPE
            sink.abort("spawn failed")
        _finish(run, ex, t0, h0, (feeder, sink), 10, errf)
    lst.close()
    run.src_cpu, run.dst_cpu = feeder.cpu, sink.cpu
    run.src_count, run.dst_count = feeder.count, sink.count
    if run.ok and run.dst_count != size:  # pragma: no cover - checked in _finish
        run.ok = False
    return run


def run_download(ctx: Ctx, tool: Tool, rep: int, size: int) -> Run:
    run = Run(tool.name, "down", rep, nbytes=size)
    lst = make_listener()
    port = lst.getsockname()[1]
    argv = tool.command("down", port, ctx.proxy)
    if argv is None:
        lst.close()
        run.error = "mode not supported by tool"
        return run
    run.argv = argv
    source = Source(lst, ctx.timeout, size, ctx.zero_fd)
    in_r, in_w = os.pipe()  # tool's stdin: kept open until the tool has exited
    out_r, out_w = os.pipe()
    reader = Reader(out_r, ctx.devnull_w)  # owns (and closes) out_r
    ex = None
    with tempfile.TemporaryFile() as errf:
        source.start()
        reader.start()
        h0 = _self_cpu()
        t0 = time.perf_counter()
        try:
            pid = spawn(argv, tool.env, in_r, out_w, errf.fileno())
        except OSError as e:
            source.error = f"spawn failed: {e}"
            source.abort("spawn failed")
        else:
            os.close(in_r)
            in_r = -1
            os.close(out_w)
            out_w = -1
            ex = wait_exit(pid, ctx.timeout)
            if ex.timed_out:
                source.abort("tool timed out")
        for fd in (in_r, out_w):
            if fd >= 0:
                os.close(fd)
        _finish(run, ex, t0, h0, (source, reader), 10, errf)
        os.close(in_w)
    lst.close()
    run.src_cpu, run.dst_cpu = source.cpu, reader.cpu
    run.src_count, run.dst_count = source.count, reader.count
    return run


class BannerServer(threading.Thread):
    """Latency server: sends BANNER as soon as a connection is accepted."""

    def __init__(self):
        super().__init__(name="banner", daemon=True)
        self.lst = make_listener()
        self.port = self.lst.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []

    def run(self) -> None:
        self.lst.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.lst.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.conns.append(conn)
            with contextlib.suppress(OSError):
                conn.sendall(BANNER)

    def drop_conns(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            c.close()

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.lst.close()
        self.drop_conns()


def run_latency(ctx: Ctx, tool: Tool, rep: int, server: BannerServer) -> Run:
    run = Run(tool.name, "latency", rep, nbytes=len(BANNER))
    argv = tool.command("latency", server.port, ctx.proxy)
    if argv is None:
        run.error = "mode not supported by tool"
        return run
    run.argv = argv
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    timeout = min(ctx.timeout, 20.0)
    with tempfile.TemporaryFile() as errf:
        t0 = time.perf_counter()
        try:
            pid = spawn(argv, tool.env, in_r, out_w, errf.fileno())
        except OSError as e:
            run.error = f"spawn failed: {e}"
            pid = None
        os.close(in_r)
        os.close(out_w)
        if pid is not None:
            p = select.poll()
            p.register(out_r, select.POLLIN)
            ready = p.poll(int(timeout * 1000))
            t1 = time.perf_counter()
            data = os.read(out_r, 4096) if ready else b""
            kill_and_reap(pid)
            if not ready:
                run.error = f"no output within {timeout:.0f}s"
            elif not data:
                run.error = "stdout closed without output"
            elif not BANNER.startswith(data[: len(BANNER)]):
                run.error = f"unexpected output {data[:40]!r}"
            else:
                run.wall = t1 - t0
                run.ok = True
            if run.error:
                tail = read_tail(errf)
                if tail:
                    run.error += f"; stderr: {tail}"
        os.close(in_w)
        os.close(out_r)
    server.drop_conns()
    return run


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def human_size(n: int) -> str:
    for unit, m in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    k = max(0, min(len(s) - 1, -(-9 * len(s) // 10) - 1))  # nearest rank
    return s[k]


def md_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def summarize(runs: list[Run], tools: list[Tool], modes: list[str]) -> dict:
    summary: dict = {}
    for tool in tools:
        for mode in modes:
            rs = [r for r in runs if r.tool == tool.name and r.mode == mode]
            if not rs:
                continue
            good = [r for r in rs if r.ok]
            s: dict = {"tool": tool.name, "mode": mode, "runs": len(rs), "ok": len(good)}
            errs = [r.error for r in rs if r.error]
            if errs:
                s["first_error"] = errs[0]
            if good and mode == "latency":
                ms = [r.wall * 1e3 for r in good]
                s.update(median_ms=median(ms), p90_ms=p90(ms), min_ms=min(ms), max_ms=max(ms))
            elif good:
                gib = good[0].nbytes / GiB
                rates = [r.nbytes / r.wall / 1e6 for r in good]
                s.update(
                    bytes=good[0].nbytes,
                    mb_s=median(rates),
                    mb_s_min=min(rates),
                    mb_s_max=max(rates),
                    wall_s=median([r.wall for r in good]),
                    tool_cpu_gib=median([r.tool_cpu / gib for r in good]),
                    tool_user_gib=median([r.tool_user / gib for r in good]),
                    tool_sys_gib=median([r.tool_sys / gib for r in good]),
                    tool_core=median([r.tool_cpu / r.wall for r in good]),
                    src_cpu_gib=median([r.src_cpu / gib for r in good]),
                    src_core=median([r.src_cpu / r.wall for r in good]),
                    dst_cpu_gib=median([r.dst_cpu / gib for r in good]),
                    dst_core=median([r.dst_cpu / r.wall for r in good]),
                    harness_cpu_gib=median([r.harness_cpu / gib for r in good]),
                )
            summary[f"{tool.key}/{mode}"] = s
    return summary


def report(
    meta: dict, tools: list[Tool], skipped: list[Tool], modes: list[str], summary: dict
) -> str:
    out = ["# hopcat relay benchmark", ""]
    out.append(f"- command: `{meta['command']}`")
    out.append(
        f"- machine: nproc={meta['nproc']} (affinity {meta['affinity']}), cpu={meta['cpu']}, "
        f"kernel={meta['kernel']}, python={meta['python']}, loadavg at start={meta['loadavg']}"
    )
    out.append(
        f"- size={human_size(meta['size'])} per run, reps={meta['reps']}, "
        f"latency runs={meta['latency_runs']}, timeout={meta['timeout']:.0f}s, "
        f"sink {'MSG_TRUNC' if meta['msg_trunc'] else 'recv_into'}, "
        f"sink SO_RCVBUF={'autotune' if not meta['rcvbuf'] else meta['rcvbuf']}"
    )
    for t in tools:
        out.append(
            f"- {t.name}: `{shlex.join(t.argv or [])}`"
            + (f" (env {t.env})" if t.env else "")
            + (f" — {meta['versions'].get(t.name)}" if meta["versions"].get(t.name) else "")
        )
    for t in skipped:
        out.append(f"- SKIPPED {t.name}: {t.missing}")
    out.append("")

    thr_modes = [m for m in modes if m in ("up", "down")]
    notes: list[str] = []
    if thr_modes:
        out.append("## Throughput (medians)")
        out.append("")
        out.append(
            "src = feeder thread writing the tool's stdin (up) / TCP source server (down); "
            "dst = TCP sink server (up) / reader draining the tool's stdout (down). "
            "CPU-s/GiB = (user+sys) CPU seconds per GiB relayed; (%) = share of one core over the wall time."
        )
        out.append("")
        headers = [
            "tool",
            "dir",
            "MB/s",
            "MB/s min-max",
            "wall s",
            "tool CPU-s/GiB (%core)",
            "tool usr/sys",
            "src CPU-s/GiB (%core)",
            "dst CPU-s/GiB (%core)",
            "ok",
        ]
        rows = []
        for mode in thr_modes:
            for t in tools:
                s = summary.get(f"{t.key}/{mode}")
                if s is None:
                    continue
                ok = f"{s['ok']}/{s['runs']}"
                if "mb_s" not in s:
                    rows.append([t.name, mode, "FAIL", "", "", "", "", "", "", ok])
                else:
                    rows.append(
                        [
                            t.name,
                            mode,
                            f"{s['mb_s']:.0f}",
                            f"{s['mb_s_min']:.0f}-{s['mb_s_max']:.0f}",
                            f"{s['wall_s']:.3f}",
                            f"{s['tool_cpu_gib']:.3f} ({s['tool_core'] * 100:.0f}%)",
                            f"{s['tool_user_gib']:.2f}/{s['tool_sys_gib']:.2f}",
                            f"{s['src_cpu_gib']:.3f} ({s['src_core'] * 100:.0f}%)",
                            f"{s['dst_cpu_gib']:.3f} ({s['dst_core'] * 100:.0f}%)",
                            ok,
                        ]
                    )
                if s.get("first_error"):
                    notes.append(f"- {t.name} {mode}: {s['first_error']}")
        out.append(md_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8, 9}))
        out.append("")

    if "latency" in modes:
        out.append("## Spawn to first byte (loopback server sends a banner on accept)")
        out.append("")
        rows = []
        for t in tools:
            s = summary.get(f"{t.key}/latency")
            if s is None:
                continue
            ok = f"{s['ok']}/{s['runs']}"
            if "median_ms" not in s:
                rows.append([t.name, "FAIL", "", "", ok])
            else:
                rows.append(
                    [
                        t.name,
                        f"{s['median_ms']:.2f}",
                        f"{s['p90_ms']:.2f}",
                        f"{s['min_ms']:.2f}-{s['max_ms']:.2f}",
                        ok,
                    ]
                )
            if s.get("first_error"):
                notes.append(f"- {t.name} latency: {s['first_error']}")
        out.append(
            md_table(
                ["tool", "first byte median ms", "p90 ms", "min-max ms", "ok"],
                rows,
                right={1, 2, 3, 4},
            )
        )
        out.append("")

    base = next((t for t in tools if t.key == BASELINE), None)
    if base is not None:
        lines = []
        for t in tools:
            if t is base:
                continue
            parts = []
            for mode in thr_modes:
                s, b = summary.get(f"{t.key}/{mode}"), summary.get(f"{base.key}/{mode}")
                if s and b and "mb_s" in s and "mb_s" in b:
                    parts.append(
                        f"{mode}: throughput {s['mb_s'] / b['mb_s']:.2f}x, "
                        f"CPU/GiB {s['tool_cpu_gib'] / b['tool_cpu_gib']:.2f}x"
                    )
            s, b = summary.get(f"{t.key}/latency"), summary.get(f"{base.key}/latency")
            if s and b and "median_ms" in s and "median_ms" in b:
                parts.append(f"first byte {s['median_ms'] / b['median_ms']:.2f}x")
            if parts:
                lines.append(f"- {t.name} vs {base.name}: " + "; ".join(parts))
        if lines:
            out.append(
                f"## Ratios vs {base.name} (medians; >1 throughput = faster, >1 CPU/latency = costlier)"
            )
            out.append("")
            out.extend(lines)
            out.append("")

    if notes:
        out.append("## Failures")
        out.append("")
        out.extend(notes)
        out.append("")
    return "\n".join(out)


def tool_version(tool: Tool) -> str | None:
    if tool.argv is None:
        return None
    probes = {
        "ncat": [[*tool.argv, "--version"]],
        "socat": [[*tool.argv, "-V"]],
        "hopcat": [[*tool.argv, "--version"]],
        "nc": [["dpkg-query", "-W", "-f", "${Version}", "netcat-openbsd"]],
        "connect": [["dpkg-query", "-W", "-f", "${Version}", "connect-proxy"]],
    }.get(tool.key, [])
    env = dict(os.environ, **(tool.env or {}))
    for argv in probes:
        try:
            cp = subprocess.run(
                argv, capture_output=True, text=True, timeout=5, env=env, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.SubprocessError):
            continue
        text = (cp.stdout or cp.stderr).strip()
        for ln in text.splitlines():
            if ln.strip() and "compiled" not in ln.lower():
                return ln.strip()[:80]
    return None


def machine_meta(args: argparse.Namespace, tools: list[Tool]) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    git = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cp = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        git = cp.stdout.strip() or None
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": git,
        "size": args.size,
        "reps": args.reps,
        "latency_runs": args.latency_runs,
        "timeout": args.timeout,
        "msg_trunc": not args.no_trunc,
        "rcvbuf": args.rcvbuf,
        "versions": {t.name: tool_version(t) for t in tools},
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def describe(run: Run) -> str:
    if run.mode == "latency":
        return f"{run.wall * 1e3:8.2f} ms" if run.ok else f"FAIL: {run.error}"
    if not run.ok:
        return f"FAIL: {run.error}"
    gib = run.nbytes / GiB
    return (
        f"{run.nbytes / run.wall / 1e6:8.0f} MB/s  wall {run.wall:7.3f}s  "
        f"tool {run.tool_cpu / gib:.3f}  src {run.src_cpu / gib:.3f}  "
        f"dst {run.dst_cpu / gib:.3f} CPU-s/GiB"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size",
        type=parse_size,
        default=GiB,
        help="bytes per throughput run; K/M/G suffixes are binary (default 1G)",
    )
    ap.add_argument("--reps", type=int, default=5, help="throughput repetitions (default 5)")
    ap.add_argument(
        "--latency-runs", type=int, default=40, help="first-byte runs per tool (default 40)"
    )
    ap.add_argument(
        "--tools",
        default=None,
        help=f"comma list from {','.join(TOOL_TABLE)} (default {DEFAULT_TOOLS}; "
        f"with --proxy {DEFAULT_PROXY_TOOLS})",
    )
    ap.add_argument(
        "--proxy",
        metavar="LIST",
        default=None,
        help="proxy mode (bench/proxies.py): relay through freshly started proxies, comma list "
        f"from {','.join(PROXY_KINDS)}",
    )
    ap.add_argument("--only", default="up,down,latency", help="comma list of up,down,latency")
    ap.add_argument(
        "--hopcat",
        metavar="CMD",
        default=None,
        help="hopcat command (default <repo>/.venv/bin/hopcat, else "
        "'python3 -m hopcat' with PYTHONPATH=<repo>/src)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write raw runs + summary as JSON")
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per-run timeout in s (default 30 + size/20MB/s)",
    )
    ap.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up run per tool and mode"
    )
    ap.add_argument(
        "--no-trunc",
        action="store_true",
        help="sink copies with recv_into instead of discarding with MSG_TRUNC",
    )
    ap.add_argument(
        "--rcvbuf",
        type=parse_size,
        default=0,
        help="force the sink's SO_RCVBUF (default 0 = kernel autotuning)",
    )
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 30 + args.size / 20e6
    args.modes = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"--only: unknown mode(s) {bad}; choose from {MODES}")
    if args.tools is None:
        args.tools = DEFAULT_PROXY_TOOLS if args.proxy else DEFAULT_TOOLS
    keys = []
    for k in (k.strip() for k in args.tools.split(",")):
        if not k:
            continue
        k = TOOL_ALIASES.get(k, k)
        if k not in TOOL_TABLE:
            ap.error(f"--tools: unknown tool {k!r}; choose from {list(TOOL_TABLE)}")
        if k not in keys:
            keys.append(k)
    args.tool_keys = keys
    args.proxy_keys = []
    if args.proxy is not None:
        for k in (k.strip() for k in args.proxy.split(",")):
            if k and k not in PROXY_KINDS:
                ap.error(f"--proxy: unknown proxy {k!r}; choose from {list(PROXY_KINDS)}")
            if k and k not in args.proxy_keys:
                args.proxy_keys.append(k)
        if not args.proxy_keys:
            ap.error("--proxy: give at least one of " + ",".join(PROXY_KINDS))
    if args.reps < 1 or args.latency_runs < 0 or args.size < 1:
        ap.error("--reps must be >= 1, --latency-runs >= 0, --size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolved = [resolve_tool(k, args.hopcat) for k in args.tool_keys]
    tools = [t for t in resolved if t.argv is not None]
    skipped = [t for t in resolved if t.argv is None]
    for t in skipped:
        log(f"skipping {t.name}: {t.missing}")
    if args.proxy is not None:
        # Proxy mode lives in bench/proxies.py, which imports this module as "relay".
        sys.modules.setdefault("relay", sys.modules[__name__])
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import proxies

        return proxies.run_proxy_mode(args, tools, skipped)
    meta = machine_meta(args, tools)
    ctx = Ctx(args)
    runs: list[Run] = []
    modes = args.modes
    thr_modes = [m for m in modes if m in ("up", "down")]
    runners = {"up": run_upload, "down": run_download}
    hung: dict[tuple[str, str], str] = {}  # (tool, mode) that timed out -> error; not retried

    def order(rep: int) -> list[Tool]:  # rotate the start so no tool always goes first
        k = rep % len(tools) if tools else 0
        return tools[k:] + tools[:k]

    try:
        if thr_modes and tools and not args.no_warmup:
            wsize = min(args.size, 16 * MiB)
            for mode in thr_modes:
                for t in tools:
                    r = runners[mode](ctx, t, 0, wsize)
                    log(f"[warm-up] {mode:4} {t.name:13} {describe(r)}")
                    if r.error and r.error.startswith("timeout"):
                        hung[(t.name, mode)] = f"warm-up: {r.error}"
        for rep in range(1, args.reps + 1 if thr_modes else 1):
            for mode in thr_modes:
                for t in order(rep - 1):
                    if (t.name, mode) in hung:
                        r = Run(
                            t.name,
                            mode,
                            rep,
                            nbytes=args.size,
                            error=f"not run, an earlier run timed out ({hung[(t.name, mode)]})",
                        )
                    else:
                        r = runners[mode](ctx, t, rep, args.size)
                        if r.error and r.error.startswith("timeout"):
                            hung[(t.name, mode)] = f"rep {rep}: {r.error}"
                    runs.append(r)
                    log(f"[rep {rep}/{args.reps}] {mode:4} {t.name:13} {describe(r)}")
        if "latency" in modes and tools and args.latency_runs:
            server = BannerServer()
            server.start()
            try:
                if not args.no_warmup:
                    for t in tools:
                        run_latency(ctx, t, 0, server)
                lat_hung: dict[str, str] = {}
                for i in range(1, args.latency_runs + 1):
                    for t in order(i - 1):
                        if t.name in lat_hung:
                            r = Run(
                                t.name,
                                "latency",
                                i,
                                error=f"not run, an earlier run timed out ({lat_hung[t.name]})",
                            )
                        else:
                            r = run_latency(ctx, t, i, server)
                            if r.error and r.error.startswith("no output within"):
                                lat_hung[t.name] = f"run {i}: {r.error}"
                        runs.append(r)
                        if not r.ok or i % 10 == 0 or i == 1:
                            log(f"[latency {i}/{args.latency_runs}] {t.name:13} {describe(r)}")
            finally:
                server.close()
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        for pid in list(_LIVE_PIDS):
            kill_and_reap(pid)

    summary = summarize(runs, tools, modes)
    print(report(meta, tools, skipped, modes, summary))
    if args.json:
        data = {
            "meta": meta,
            "skipped": {t.name: t.missing for t in skipped},
            "summary": summary,
            "runs": [dict(asdict(r), tool_cpu=r.tool_cpu) for r in runs],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
