"""Peer servers for the benchmarks, started fresh for a run and stopped by pid.

Starting, readiness (a socket of the started pid in LISTEN) and port-race retries come from the
integration tests' tests/integration/peers.py, and so does the one Dante configuration. Each
server runs in its own session, so its process group is the server and every child it forks
(Dante's negotiate, request and io processes): that group's CPU and memory are read from /proc,
and at the end the whole group is killed and checked to be gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import BENCH, HOST, log, package_version
from .tools import hopcat_command

sys.path.insert(0, str(BENCH.parent / "tests" / "integration"))
import peers

CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 0.2  # after readiness: multi-process servers finish forking their workers
GONE_TIMEOUT_S = 5.0  # for a dead leader's children to be reaped by init
StartError = (peers.PeerUnavailable, peers.PeerStartError)
StartFn = Callable[[Path, list[str]], peers.Daemon]  # (workdir, extra options) -> started peer


def _stat_fields(pid: str) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on; the comm field before it may contain spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def group_stats(pgid: int) -> list[list[bytes]]:
    """The stat fields (from field 3 on) of every live process in process group pgid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (f := _stat_fields(name)) is not None and int(f[2]) == pgid:
            out.append([name.encode(), *f])
    return out


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by a process group, its dead members included.

    Per live process utime+stime (all its threads, exited ones too) plus cutime+cstime (the
    children it has reaped: a child that exits moves its time there, so the sum stays consistent
    between two readings). Resolution: one clock tick (10 ms).
    """
    ticks = sum(int(f[12]) + int(f[13]) + int(f[14]) + int(f[15]) for f in group_stats(pgid))
    return ticks / CLK_TCK


class Daemon:
    """A started server: ``port``, ``pid``, ``argv``; its group's ``cpu()`` and ``pss_kib()``."""

    def __init__(self, key: str, peer: peers.Daemon) -> None:
        self.key, self.peer = key, peer
        self.port: int = peer.port
        self.pid: int = peer.pid
        self.argv: list[str] = list(peer.proc.args)  # type: ignore[arg-type]
        self.leftover: list[int] = []  # pids of its group still there after stop()

    @property
    def hostport(self) -> str:
        return self.peer.hostport

    @property
    def returncode(self) -> int | None:
        return self.peer.proc.returncode

    def cpu(self) -> float:
        return group_cpu(self.pid)

    def pss_kib(self) -> int:
        total = 0
        for f in group_stats(self.pid):
            try:
                with open(f"/proc/{f[0].decode()}/smaps_rollup") as rollup:
                    total += sum(int(ln.split()[1]) for ln in rollup if ln.startswith("Pss:"))
            except OSError:
                continue
        return total

    def log_tail(self, limit: int = 600) -> str:
        text = self.peer.log().strip()
        return " | ".join((text[-limit:] if len(text) > limit else text).splitlines())

    def stop(self) -> list[int]:
        """SIGTERM, bounded wait, SIGKILL, then SIGKILL to its group; the pids left over."""
        self.peer.stop()
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while (left := [int(f[0]) for f in group_stats(self.pid)]) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.leftover = left
        if left:
            log(f"WARNING: {self.key} left processes {left}")
        return left


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


def _with_env(argv: list[str], env: dict[str, str] | None) -> list[str]:
    """argv run through env(1) with extra variables (it execs: the pid stays the server's)."""
    return ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else argv


def _tinyproxy_argv(workdir: Path, port: int) -> list[str]:
    lines = ["User nobody", "Group nogroup"] if peers.is_root() else []
    # No ConnectPort line: CONNECT to any port. MaxClients and 127.0.0.0/8: serve.py's thousands
    # of tunnels from 127.0.0.1-32. LogLevel Critical: no log line per connection in the CPU.
    lines += [
        f"Port {port}",
        f"Listen {HOST}",
        "Timeout 600",
        "LogLevel Critical",
        "MaxClients 100000",
        "Allow 127.0.0.0/8",
        "DisableViaHeader Yes",
    ]
    conf = workdir / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return [peers.require_program("tinyproxy"), "-d", "-c", str(conf)]


def _hopcat_serve_argv(port: int, extra: list[str], python: Path | None = None) -> list[str]:
    argv, env, missing = hopcat_command(None)
    if argv is None:
        raise peers.PeerUnavailable(str(missing))
    if python is not None:  # this checkout's hopcat on another interpreter (the uvloop venv)
        argv, env = [str(python), "-m", "hopcat"], {"PYTHONPATH": str(BENCH.parent / "src")}
    serve = ["serve", f"{HOST}:{port}", "--max-conns", "100000", "--max-conns-per-client", "0"]
    return _with_env([*argv, *serve, *extra], env)


def _start_tinyproxy(workdir: Path, extra: list[str]) -> peers.Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    return peers.start_daemon(
        "tinyproxy", workdir, lambda port: _tinyproxy_argv(workdir, port), scheme="http"
    )


def _start_hopcat(workdir: Path, extra: list[str]) -> peers.Daemon:
    return peers.start_daemon(
        "hopcat", workdir, lambda port: _hopcat_serve_argv(port, extra), scheme="socks5"
    )


def _start_hopcat_workers(workdir: Path, extra: list[str]) -> peers.Daemon:
    workers = [*extra, "--workers", "auto"]
    return peers.start_daemon(
        "hopcat-w", workdir, lambda port: _hopcat_serve_argv(port, workers), scheme="socks5"
    )


def _start_hopcat_uvloop(workdir: Path, extra: list[str]) -> peers.Daemon:
    python = ensure_venv(BENCH / ".venv-uvloop", ["uvloop"])
    uv = [*extra, "--event-loop", "uvloop"]
    return peers.start_daemon(
        "hopcat-uvloop", workdir, lambda port: _hopcat_serve_argv(port, uv, python), scheme="socks5"
    )


def _start_pproxy(workdir: Path, extra: list[str]) -> peers.Daemon:
    python = str(ensure_venv(BENCH / ".venv-pproxy", ["pproxy"]))
    return peers.start_daemon(
        "pproxy",
        workdir,
        lambda port: [python, "-m", "pproxy", "-l", f"socks5://{HOST}:{port}"],
        scheme="socks5",
    )


def _start_pproxy_http(workdir: Path, extra: list[str]) -> peers.Daemon:
    """pproxy as an HTTP proxy: CONNECT and plain forwarding (serve.py's fwd runs)."""
    python = str(ensure_venv(BENCH / ".venv-pproxy", ["pproxy"]))
    return peers.start_daemon(
        "pproxy", workdir, lambda port: [python, "-m", "pproxy", "-l", f"http://{HOST}:{port}"],
        scheme="http",
    )  # fmt: skip


@dataclass(frozen=True)
class Server:
    key: str  # name on the command line (--proxy, --servers)
    name: str  # display name
    package: str | None  # Debian package, for its version
    schemes: tuple[str, ...]  # protocols it speaks, preferred first
    start: StartFn


SERVERS: dict[str, Server] = {
    s.key: s
    for s in (
        Server(
            "dante",
            "Dante",
            "dante-server",
            ("socks5", "socks4"),
            lambda workdir, extra: peers.start_danted(workdir),
        ),
        Server(
            "dante-udp",
            "Dante (UDP ASSOCIATE)",
            "dante-server",
            ("socks5",),
            lambda workdir, extra: peers.start_danted(workdir, udp=True),
        ),
        Server(
            "microsocks",
            "microsocks",
            "microsocks",
            ("socks5",),
            lambda workdir, extra: peers.start_microsocks(workdir),
        ),
        Server("tinyproxy", "tinyproxy", "tinyproxy", ("http",), _start_tinyproxy),
        Server("hopcat", "hopcat serve", None, ("socks5", "http"), _start_hopcat),
        Server(
            "hopcat-uvloop", "hopcat serve (uvloop)", None, ("socks5", "http"), _start_hopcat_uvloop
        ),
        Server(
            "hopcat-w",
            "hopcat serve --workers auto",
            None,
            ("socks5", "http"),
            _start_hopcat_workers,
        ),
        Server("pproxy", "pproxy", None, ("socks5",), _start_pproxy),
        Server("pproxy-http", "pproxy (HTTP)", None, ("http",), _start_pproxy_http),
    )
}


def start(key: str, workdir: Path, extra: list[str] | None = None) -> Daemon:
    """Start server ``key`` on a free 127.0.0.1 port, config and log in workdir; RuntimeError
    (with the reason and the server's log) when it is missing or does not come up."""
    try:
        d = Daemon(key, SERVERS[key].start(workdir, extra or []))
    except StartError as e:
        raise RuntimeError(str(e)) from None
    time.sleep(SETTLE_S)
    return d


def version(key: str) -> str | None:
    package = SERVERS[key].package
    return package_version(package) if package else None
