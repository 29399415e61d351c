#!/usr/bin/env python3
"""Proxy benchmark: hopcat vs nc.openbsd / ncat / connect-proxy / socat through real proxies.

The proxy mode of bench/relay.py (``relay.py --proxy LIST`` and this script are the same
thing; this script only defaults --proxy to dante,microsocks,tinyproxy). For every proxy it
starts a fresh daemon on a free 127.0.0.1 port (config and log in a temp dir), then measures,
interleaved across proxies and tools, with relay.py's endpoints and runners:

* upload    stdin pipe -> tool -> proxy -> TCP sink (counts what arrives)
* download  TCP source -> proxy -> tool -> stdout pipe (the tool's stdin stays open)
* latency   spawn -> first byte of a target banner, through the proxy

plus the proxy's own CPU per GiB, read from /proc before and after each run. The daemons are
stopped at the end (SIGTERM, then SIGKILL to their whole process group) and the report says
whether any process of theirs was left.

Usage: python3 bench/proxies.py [--proxy dante,microsocks,tinyproxy,direct] [--size 1G]
       [--reps 5] [--latency-runs 40] [--tools hopcat,nc,ncat,connect,socat] [--json FILE]

Progress goes to stderr, the Markdown report to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # one module object whether run as a script or imported by relay.py
    sys.modules.setdefault("proxies", sys.modules[__name__])
sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay as R

DEFAULT_PROXIES = "dante,microsocks,tinyproxy"
READY_TIMEOUT_S = 10.0  # a daemon must listen within this
STOP_TIMEOUT_S = 5.0  # after SIGTERM, then SIGKILL
START_ATTEMPTS = 5  # new port when a port race is lost
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Protocols each tool can speak to a proxy (relay.TOOL_TABLE builders). socat 1.7 has no SOCKS5.
TOOL_SCHEMES: dict[str, tuple[str, ...]] = {
    "socat": ("socks4", "socks4a", "http"),
}
ALL_SCHEMES = ("socks5", "socks4", "socks4a", "http")

# Why a tool uses a fallback protocol, or cannot use a proxy at all: (tool key, proxy key) -> text.
COMBO_NOTES: dict[tuple[str, str], str] = {
    ("socat", "dante"): "socat 1.7 has no SOCKS5 and Dante 1.4.2 does not implement SOCKS4a: "
    "socat uses SOCKS4 with the IPv4 target",
    ("socat", "microsocks"): "socat 1.7 has no SOCKS5 and microsocks speaks only SOCKS5",
}


# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------


def clean_environ() -> None:
    """Drop proxy settings (ALL_PROXY, SOCKS5_SERVER, CONNECT_USER, ...) that tools would obey."""
    for key in list(os.environ):
        up = key.upper()
        if up.endswith("_PROXY") or up.startswith(("SOCKS", "CONNECT_")):
            del os.environ[key]


def dante_argv(exe: str, workdir: Path, port: int) -> list[str]:
    # Recipe from /work/shared/PEERS.md. One keyword per line in the rules: Dante 1.4.2
    # rejects "command: connect protocol: tcp" on one line.
    lines = [
        "logoutput: stderr",
        f"internal: {R.HOST} port = {port}",
        f"external: {R.HOST}",
        "clientmethod: none",
        "socksmethod: none",
    ]
    if os.geteuid() == 0:
        lines += ["user.privileged: root", "user.unprivileged: nobody"]
    lines += [
        "client pass {",
        "  from: 127.0.0.0/8 to: 127.0.0.0/8",
        "}",
        "socks pass {",
        "  from: 127.0.0.0/8 to: 127.0.0.0/8",
        "  command: connect",
        "  protocol: tcp",
        "  log: error",
        "}",
    ]
    conf = workdir / "danted.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return [exe, "-f", str(conf), "-p", str(workdir / "danted.pid")]


def microsocks_argv(exe: str, workdir: Path, port: int) -> list[str]:
    return [exe, "-i", R.HOST, "-p", str(port)]


def tinyproxy_argv(exe: str, workdir: Path, port: int) -> list[str]:
    lines = ["User nobody", "Group nogroup"] if os.geteuid() == 0 else []
    lines += [
        f"Port {port}",
        f"Listen {R.HOST}",
        "Timeout 600",
        "LogLevel Critical",
        "MaxClients 100",
        f"Allow {R.HOST}",
        "DisableViaHeader Yes",
    ]  # no ConnectPort line: CONNECT to any port is allowed
    conf = workdir / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return [exe, "-d", "-c", str(conf)]


@dataclass(frozen=True)
class ProxySpec:
    key: str  # name used with --proxy
    name: str  # display name
    program: str | None  # None: no daemon ("direct")
    package: str | None
    schemes: tuple[str, ...]  # protocols it speaks, preferred first
    make_argv: Callable[[str, Path, int], list[str]] | None


SPECS: dict[str, ProxySpec] = {
    "dante": ProxySpec(
        "dante", "Dante", "danted", "dante-server", ("socks5", "socks4"), dante_argv
    ),
    "microsocks": ProxySpec(
        "microsocks", "microsocks", "microsocks", "microsocks", ("socks5",), microsocks_argv
    ),
    "tinyproxy": ProxySpec(
        "tinyproxy", "tinyproxy", "tinyproxy", "tinyproxy", ("http",), tinyproxy_argv
    ),
    "direct": ProxySpec("direct", "direct", None, None, ("-",), None),
}
assert set(SPECS) == set(R.PROXY_KINDS)


def _stat_fields(pid: str) -> list[bytes] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; the comm field may contain spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Pids of the processes in process group pgid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(name)
            if f is not None and int(f[2]) == pgid:  # field 5: pgrp
                out.append(int(name))
    return out


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by process group pgid, dead members included.

    Sum over the group's live processes of utime+stime (all threads of a process, live and
    exited) plus cutime+cstime (children it has reaped; a child that exits moves its time there).
    The daemon is started in its own session, so the group is the daemon and every child it forks
    (Dante's negotiate/request/io processes). Resolution: one clock tick (10 ms).
    """
    ticks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(name)
        if f is not None and int(f[2]) == pgid:
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # fields 14-17
    return ticks / CLK_TCK


def _listen_inodes(port: int) -> set[int]:
    inodes = set()
    want = f"{socket.htonl(0x7F000001):08X}:{port:04X}"  # 127.0.0.1 as /proc/net/tcp prints it
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[1] == want and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((R.HOST, 0))
        return s.getsockname()[1]


class ProxyDaemon:
    def __init__(self, spec: ProxySpec, proc: subprocess.Popen, port: int, log_path: Path):
        self.spec, self.proc, self.port, self.log_path = spec, proc, port, log_path
        self.leftover: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return group_cpu(self.proc.pid)

    def log_tail(self, limit: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join((text[-limit:] if len(text) > limit else text).splitlines())

    def listening(self) -> bool:
        """True when a socket of the daemon's own process listens on 127.0.0.1:port."""
        return bool(_listen_inodes(self.port) & _socket_inodes(self.pid))

    def stop(self) -> list[int]:
        """SIGTERM, bounded wait, SIGKILL; then SIGKILL the rest of its process group.

        Returns the pids of the group still present afterwards (should be empty).
        """
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := group_members(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)  # children of the dead leader are reaped by init
        self.leftover = left
        return left


def start_proxy(spec: ProxySpec, workdir: Path) -> ProxyDaemon:
    """Start spec's daemon on a free loopback port; retry with a new port on a lost race."""
    assert spec.program is not None and spec.make_argv is not None
    exe = shutil.which(spec.program) or shutil.which(spec.program, path="/usr/sbin:/sbin")
    if exe is None:
        raise RuntimeError(f"{spec.program} not installed (apt-get install {spec.package})")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # Dante's unprivileged children read the config (PEERS.md)
    log_path = workdir / f"{spec.key}.log"
    why = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        argv = spec.make_argv(exe, workdir, port)
        with open(log_path, "ab") as logf:
            logf.write(f"--- attempt {attempt}: {shlex.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,  # own process group: CPU accounting and teardown
            )
        d = ProxyDaemon(spec, proc, port, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        delay = 0.005
        while proc.poll() is None and not d.listening() and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        if proc.poll() is None and d.listening():
            return d
        d.stop()
        tail = d.log_tail()
        why = f"{spec.program} did not listen on {R.HOST}:{port} (status {proc.returncode}): {tail}"
        if "in use" not in tail.lower() and "listening sockets" not in tail.lower():
            break
    raise RuntimeError(why)


def proxy_version(spec: ProxySpec) -> str | None:
    if spec.package is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cp = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", spec.package],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return cp.stdout.strip() or None
    return None


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


@dataclass
class ProxyRun:
    proxy: str  # ProxySpec.key
    scheme: str  # protocol the tool spoke to the proxy ("-" for direct)
    run: R.Run
    proxy_cpu: float | None = None  # CPU-s of the proxy's process group during the run


def choose_scheme(tool: R.Tool, spec: ProxySpec) -> str | None:
    if spec.program is None:
        return "-"
    can = TOOL_SCHEMES.get(tool.key, ALL_SCHEMES)
    return next((s for s in spec.schemes if s in can), None)


def timed_run(
    ctx: R.Ctx,
    daemon: ProxyDaemon | None,
    scheme: str,
    fn: Callable[..., R.Run],
    *args: object,
) -> tuple[R.Run, float | None]:
    ctx.proxy = None if daemon is None else R.Proxy(scheme, R.HOST, daemon.port)
    c0 = daemon.cpu() if daemon is not None else None
    r = fn(ctx, *args)
    # The endpoints have all N bytes (or failed) by now: the proxy's share of the run is done.
    cpu = daemon.cpu() - c0 if daemon is not None and c0 is not None else None
    return r, cpu


# --------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------


def summarize(pruns: list[ProxyRun], tools: list[R.Tool], modes: list[str], keys: list[str]):
    """Per proxy: relay.summarize() plus proxy CPU, total %core, busiest process, bytes received."""
    out: dict[str, dict] = {}
    for key in keys:
        mine = [p for p in pruns if p.proxy == key]
        summ = R.summarize([p.run for p in mine], tools, modes)
        for t in tools:
            for mode in ("up", "down"):
                s = summ.get(f"{t.key}/{mode}")
                if s is None:
                    continue
                rs = [p for p in mine if p.run.tool == t.name and p.run.mode == mode]
                counts = [p.run.dst_count for p in rs if p.run.dst_count is not None]
                if counts and rs:
                    s["recv_min"] = min(counts)
                    s["recv_expected"] = rs[0].run.nbytes
                good = [p for p in rs if p.run.ok]
                if not good or "mb_s" not in s:
                    continue
                gib = good[0].run.nbytes / R.GiB
                if all(p.proxy_cpu is not None for p in good):
                    s["proxy_cpu_gib"] = R.median([p.proxy_cpu / gib for p in good])
                    s["proxy_core"] = R.median([p.proxy_cpu / p.run.wall for p in good])
                s["sum_core"] = R.median(
                    [
                        (p.run.tool_cpu + (p.proxy_cpu or 0) + p.run.src_cpu + p.run.dst_cpu)
                        / p.run.wall
                        for p in good
                    ]
                )
                cores = {
                    "tool": s["tool_core"],
                    "proxy": s.get("proxy_core", -1.0),
                    "src": s["src_core"],
                    "dst": s["dst_core"],
                }
                s["busiest"] = max(cores, key=lambda k: cores[k])
        out[key] = summ
    return out


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def report(
    meta: dict,
    tools: list[R.Tool],
    skipped: list[R.Tool],
    modes: list[str],
    keys: list[str],
    daemons: dict[str, ProxyDaemon],
    proxy_errors: dict[str, str],
    schemes: dict[tuple[str, str], str | None],
    summary: dict[str, dict],
) -> str:
    out = ["# hopcat proxy benchmark", ""]
    out.append(f"- command: `{meta['command']}`")
    out.append(
        f"- machine: nproc={meta['nproc']} (affinity {meta['affinity']}), cpu={meta['cpu']}, "
        f"kernel={meta['kernel']}, python={meta['python']}, loadavg at start={meta['loadavg']}"
    )
    out.append(
        f"- size={R.human_size(meta['size'])} per run, reps={meta['reps']}, "
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
    for key in keys:
        spec = SPECS[key]
        if spec.program is None:
            out.append("- direct: no proxy (the tools' plain form), for comparison")
            continue
        ver = meta["proxy_versions"].get(key)
        if key in daemons:
            d = daemons[key]
            left = f"; LEFT RUNNING after stop: pids {d.leftover}" if d.leftover else ""
            out.append(
                f"- proxy {spec.name} {ver or ''}: `{shlex.join(d.proc.args)}` on "
                f"{R.HOST}:{d.port}, pid {d.pid}{left}"
            )
        else:
            out.append(f"- SKIPPED proxy {spec.name}: {proxy_errors.get(key, 'not started')}")
    notes = []
    for (tkey, pkey), scheme in schemes.items():
        tname = next(t.name for t in tools if t.key == tkey)
        if scheme is None:
            why = COMBO_NOTES.get((tkey, pkey), "no common protocol")
            notes.append(f"- SKIPPED {tname} via {SPECS[pkey].name}: {why}")
        elif (tkey, pkey) in COMBO_NOTES:
            notes.append(f"- {tname} via {SPECS[pkey].name}: {COMBO_NOTES[(tkey, pkey)]}")
    out.extend(notes)
    out.append("")

    thr_modes = [m for m in modes if m in ("up", "down")]
    failures: list[str] = []
    if thr_modes:
        out.append("## Throughput through each proxy (medians)")
        out.append("")
        out.append(
            "CPU-s/GiB = (user+sys) CPU seconds per GiB relayed; (%) = share of one core over the "
            "wall time. tool = the client (wait4 rusage); proxy = the proxy's whole process group "
            "(/proc stat, threads and reaped children included); src = feeder (up) / TCP source "
            "(down); dst = TCP sink (up) / stdout reader (down). busiest = the process with the "
            "highest %core, the likely limit; Σ%core near "
            f"{(meta['affinity'] or meta['nproc'] or 1) * 100}% means all cores were busy. "
            "received = the least the sink/reader got over all runs (up through microsocks and "
            "tinyproxy: what survived the proxy's teardown at the client's FIN)."
        )
        out.append("")
        headers = [
            "proxy",
            "tool",
            "proto",
            "dir",
            "MB/s",
            "MB/s min-max",
            "wall s",
            "tool CPU-s/GiB (%core)",
            "proxy CPU-s/GiB (%core)",
            "src CPU-s/GiB (%core)",
            "dst CPU-s/GiB (%core)",
            "Σ%core",
            "busiest",
            "received",
            "ok",
        ]
        rows = []
        for mode in thr_modes:
            for key in keys:
                if key not in summary:
                    continue
                for t in tools:
                    s = summary[key].get(f"{t.key}/{mode}")
                    if s is None:
                        continue
                    ok = f"{s['ok']}/{s['runs']}"
                    recv = ""
                    if "recv_min" in s:
                        exp = s["recv_expected"]
                        recv = (
                            "all"
                            if s["recv_min"] == exp
                            else f"{s['recv_min'] / R.MiB:.1f} MiB ({s['recv_min'] / exp:.1%})"
                        )
                    head = [SPECS[key].name, t.name, schemes.get((t.key, key)) or "", mode]
                    if "mb_s" not in s:
                        rows.append([*head, "FAIL", "", "", "", "", "", "", "", "", recv, ok])
                    else:
                        pc = (
                            f"{s['proxy_cpu_gib']:.3f} ({_pct(s['proxy_core'])})"
                            if "proxy_cpu_gib" in s
                            else "-"
                        )
                        rows.append(
                            [
                                *head,
                                f"{s['mb_s']:.0f}",
                                f"{s['mb_s_min']:.0f}-{s['mb_s_max']:.0f}",
                                f"{s['wall_s']:.3f}",
                                f"{s['tool_cpu_gib']:.3f} ({_pct(s['tool_core'])})",
                                pc,
                                f"{s['src_cpu_gib']:.3f} ({_pct(s['src_core'])})",
                                f"{s['dst_cpu_gib']:.3f} ({_pct(s['dst_core'])})",
                                _pct(s["sum_core"]),
                                s["busiest"],
                                recv,
                                ok,
                            ]
                        )
                    if s.get("first_error"):
                        failures.append(
                            f"- {t.name} {mode} via {SPECS[key].name}: {s['first_error']}"
                        )
        out.append(R.md_table(headers, rows, right=set(range(4, 15)) - {12}))
        out.append("")

    if "latency" in modes:
        out.append("## Spawn to first target byte through each proxy")
        out.append("")
        out.append(
            "The target sends a banner on accept; the tool runs in its bidirectional form with "
            "stdin open; median and p90 (nearest rank) in ms."
        )
        out.append("")
        rows = []
        for key in keys:
            if key not in summary:
                continue
            for t in tools:
                s = summary[key].get(f"{t.key}/latency")
                if s is None:
                    continue
                ok = f"{s['ok']}/{s['runs']}"
                head = [SPECS[key].name, t.name, schemes.get((t.key, key)) or ""]
                if "median_ms" not in s:
                    rows.append([*head, "FAIL", "", "", ok])
                else:
                    rows.append(
                        [
                            *head,
                            f"{s['median_ms']:.2f}",
                            f"{s['p90_ms']:.2f}",
                            f"{s['min_ms']:.2f}-{s['max_ms']:.2f}",
                            ok,
                        ]
                    )
                if s.get("first_error"):
                    failures.append(f"- {t.name} latency via {SPECS[key].name}: {s['first_error']}")
        out.append(
            R.md_table(
                ["proxy", "tool", "proto", "first byte median ms", "p90 ms", "min-max ms", "ok"],
                rows,
                right={3, 4, 5, 6},
            )
        )
        out.append("")

    base = next((t for t in tools if t.key == R.BASELINE), None)
    if base is not None:
        lines = []
        for key in keys:
            if key not in summary:
                continue
            summ = summary[key]
            for t in tools:
                if t is base:
                    continue
                parts = []
                for mode in thr_modes:
                    s, b = summ.get(f"{t.key}/{mode}"), summ.get(f"{base.key}/{mode}")
                    if s and b and "mb_s" in s and "mb_s" in b:
                        parts.append(
                            f"{mode}: throughput {s['mb_s'] / b['mb_s']:.2f}x, "
                            f"tool CPU/GiB {s['tool_cpu_gib'] / b['tool_cpu_gib']:.2f}x"
                        )
                s, b = summ.get(f"{t.key}/latency"), summ.get(f"{base.key}/latency")
                if s and b and "median_ms" in s and "median_ms" in b:
                    parts.append(f"first byte {s['median_ms'] / b['median_ms']:.2f}x")
                if parts:
                    lines.append(
                        f"- {SPECS[key].name}: {t.name} vs {base.name}: " + "; ".join(parts)
                    )
        if lines:
            out.append(
                f"## Ratios vs {base.name} per proxy "
                "(medians; >1 throughput = faster, >1 CPU/latency = costlier)"
            )
            out.append("")
            out.extend(lines)
            out.append("")

    if failures:
        out.append("## Failures")
        out.append("")
        out.extend(failures)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP: stop like Ctrl-C, so the daemons get stopped and the report printed."""


def _on_signal(signum: int, frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def run_proxy_mode(args: argparse.Namespace, tools: list[R.Tool], skipped: list[R.Tool]) -> int:
    """The --proxy mode of relay.main(): args from relay.parse_args(), tools resolved."""
    log = R.log
    clean_environ()
    keys: list[str] = args.proxy_keys
    modes = args.modes
    thr_modes = [m for m in modes if m in ("up", "down")]
    runners = {"up": R.run_upload, "down": R.run_download}
    meta = R.machine_meta(args, tools)
    meta["proxy_versions"] = {k: proxy_version(SPECS[k]) for k in keys}
    ctx = R.Ctx(args)
    pruns: list[ProxyRun] = []
    daemons: dict[str, ProxyDaemon] = {}
    proxy_errors: dict[str, str] = {}
    schemes: dict[tuple[str, str], str | None] = {}
    hung: dict[tuple[str, str, str], str] = {}  # (proxy, tool, mode) that timed out -> error
    workdir = Path(tempfile.mkdtemp(prefix="hopcat-bench-proxies-"))
    live: list[str] = []  # proxies that run (or "direct"), in --proxy order
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}

    def order(seq: list, i: int) -> list:  # rotate the start so nobody always goes first
        k = i % len(seq) if seq else 0
        return seq[k:] + seq[:k]

    def record(key: str, t: R.Tool, mode: str, rep: int, size: int, label: str) -> ProxyRun:
        scheme = schemes[(t.key, key)]
        assert scheme is not None
        if (key, t.name, mode) in hung:
            r = R.Run(
                t.name,
                mode,
                rep,
                nbytes=size,
                error=f"not run, an earlier run timed out ({hung[(key, t.name, mode)]})",
            )
            cpu = None
        else:
            r, cpu = timed_run(ctx, daemons.get(key), scheme, runners[mode], t, rep, size)
            if r.error and r.error.startswith("timeout"):
                hung[(key, t.name, mode)] = f"{label}: {r.error}"
        pr = ProxyRun(key, scheme, r, cpu)
        extra = ""
        if cpu is not None and r.ok:
            extra = f"  proxy {cpu / (r.nbytes / R.GiB):.3f}"
        log(f"[{label}] {mode:4} {SPECS[key].name:10} {t.name:13} {R.describe(r)}{extra}")
        return pr

    try:
        for key in keys:
            spec = SPECS[key]
            if spec.program is None:
                continue
            try:
                daemons[key] = start_proxy(spec, workdir / key)
                log(f"started {spec.name} on {R.HOST}:{daemons[key].port} (pid {daemons[key].pid})")
            except RuntimeError as e:
                proxy_errors[key] = str(e)
                log(f"skipping proxy {spec.name}: {e}")
        live[:] = [k for k in keys if SPECS[k].program is None or k in daemons]
        for key in live:
            for t in tools:
                schemes[(t.key, key)] = choose_scheme(t, SPECS[key])
                if schemes[(t.key, key)] is None:
                    log(f"skipping {t.name} via {SPECS[key].name}: {COMBO_NOTES.get((t.key, key))}")

        def pairs(i: int) -> list[tuple[str, R.Tool]]:
            return [
                (key, t)
                for key in order(live, i)
                for t in order(tools, i)
                if schemes[(t.key, key)] is not None
            ]

        if thr_modes and not args.no_warmup:
            wsize = min(args.size, 16 * R.MiB)
            for mode in thr_modes:
                for key, t in pairs(0):
                    record(key, t, mode, 0, wsize, "warm-up")
        for rep in range(1, args.reps + 1 if thr_modes else 1):
            for mode in thr_modes:
                for key, t in pairs(rep - 1):
                    pruns.append(record(key, t, mode, rep, args.size, f"rep {rep}/{args.reps}"))

        if "latency" in modes and args.latency_runs:
            server = R.BannerServer()
            server.start()
            lat_hung: dict[tuple[str, str], str] = {}
            try:
                warm = [] if args.no_warmup else [0]
                for i in [*warm, *range(1, args.latency_runs + 1)]:
                    for key, t in pairs(max(i - 1, 0)):
                        if (key, t.name) in lat_hung:
                            r = R.Run(
                                t.name,
                                "latency",
                                i,
                                error="not run, an earlier run timed out "
                                f"({lat_hung[(key, t.name)]})",
                            )
                        else:
                            r, _ = timed_run(
                                ctx, daemons.get(key), schemes[(t.key, key)] or "",
                                R.run_latency, t, i, server,
                            )  # fmt: skip
                            if r.error and r.error.startswith("no output within"):
                                lat_hung[(key, t.name)] = f"run {i}: {r.error}"
                        if i == 0:
                            continue  # warm-up
                        pruns.append(ProxyRun(key, schemes[(t.key, key)] or "", r))
                        if not r.ok or i % 10 == 0 or i == 1:
                            log(
                                f"[latency {i}/{args.latency_runs}] {SPECS[key].name:10} "
                                f"{t.name:13} {R.describe(r)}"
                            )
            finally:
                server.close()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}): reporting what was measured")
    finally:
        for pid in list(R._LIVE_PIDS):
            R.kill_and_reap(pid)
        for d in daemons.values():
            left = d.stop()
            if left:
                log(f"WARNING: {d.spec.name} left processes {left}")
        shutil.rmtree(workdir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)

    for key, d in daemons.items():  # a proxy that died during the run is worth a line
        if d.proc.returncode not in (None, 0, -signal.SIGTERM):
            proxy_errors.setdefault(key, f"exited with status {d.proc.returncode}")

    summary = summarize(pruns, tools, modes, live)
    print(report(meta, tools, skipped, modes, keys, daemons, proxy_errors, schemes, summary))
    if args.json:
        data = {
            "meta": meta,
            "skipped": {t.name: t.missing for t in skipped},
            "proxies": {
                k: {"port": d.port, "pid": d.pid, "argv": list(d.proc.args), "leftover": d.leftover}
                for k, d in daemons.items()
            },
            "proxy_errors": proxy_errors,
            "schemes": {f"{t}/{p}": s for (t, p), s in schemes.items()},
            "summary": summary,
            "runs": [
                dict(asdict(p), run=dict(asdict(p.run), tool_cpu=p.run.tool_cpu)) for p in pruns
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--proxy" or a.startswith("--proxy=") for a in argv):
        argv = ["--proxy", DEFAULT_PROXIES, *argv]
    return R.main(argv)


if __name__ == "__main__":
    sys.exit(main())
