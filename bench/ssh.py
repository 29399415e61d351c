#!/usr/bin/env python3
"""ssh benchmark: bulk ssh through a SOCKS5 proxy (Dante) with each ProxyCommand (stdlib only).

Starts its own sshd and Dante on 127.0.0.1 (tests/integration/peers.py; configs, keys and logs in a
temp dir), then measures, interleaved across tools:

* down  ``ssh HOST 'head -c SIZE /dev/zero' > /dev/null``
* up    ``head -c SIZE /dev/zero | ssh HOST 'cat > /dev/null'``
* setup ``ssh HOST true`` (connection setup: ProxyCommand start, proxy handshake, kex, auth)

with these ProxyCommands (``%h %p`` = 127.0.0.1 and sshd's port, reached through Dante):

    direct     no ProxyCommand: ssh connects itself (the physical limit)
    hopcat     hopcat -x socks5h://H:P %h %p
    hopcat-F   hopcat -F -x socks5h://H:P %h %p            + ProxyUseFdpass yes
    nc         nc.openbsd -X 5 -x H:P %h %p
    nc-F       nc.openbsd -F -X 5 -x H:P %h %p             + ProxyUseFdpass yes
    ncat       ncat --proxy H:P --proxy-type socks5 %h %p
    connect    connect-proxy -S H:P %h %p

Every ssh uses one fixed cipher (``-c aes128-gcm@openssh.com`` by default) and
``-o Compression=no``. Reports medians of MB/s (10^6 bytes/s, whole ssh command wall time), the ratio
to direct ssh, and CPU per GiB of the ProxyCommand tool (a small wrapper execs it and records its
rusage), of Dante (its process group, from /proc) and of the ssh client (wait4).

Usage: python3 bench/ssh.py [--size 1G] [--reps 3] [--tools direct,hopcat,hopcat-F,nc,nc-F,ncat,connect]
       [--only down,up,setup] [--cipher aes128-gcm@openssh.com] [--hopcat CMD] [--no-cpu]
       [--no-warmup] [--timeout S] [--json FILE]

Progress goes to stderr, the Markdown report to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import daemons
from harness.common import (
    MB,
    GiB,
    MiB,
    arg_parser,
    first_line,
    human_size,
    log,
    machine_meta,
    md_table,
    median,
    rotated,
    stop_on_signals,
    write_json,
)
from harness.daemons import peers
from harness.procs import rusage_cpu, wait_exit
from harness.tools import hopcat_command, resolve_tool

WARMUP_SIZE = 16 * MiB
RUSAGE_WAIT_S = 5.0  # after ssh exits, how long the wrapper may take to report the tool's rusage
DIRECTIONS = ("down", "up")
# The rows: name -> (tool, fd passing, ProxyCommand options before "%h %p"; {hp} = Dante's H:P).
ROWS: dict[str, tuple[str, bool, list[str]] | None] = {
    "direct": None,
    "hopcat": ("hopcat", False, ["-x", "socks5h://{hp}"]),
    "hopcat-F": ("hopcat", True, ["-F", "-x", "socks5h://{hp}"]),
    "nc": ("nc", False, ["-X", "5", "-x", "{hp}"]),
    "nc-F": ("nc", True, ["-F", "-X", "5", "-x", "{hp}"]),
    "ncat": ("ncat", False, ["--proxy", "{hp}", "--proxy-type", "socks5"]),
    "connect": ("connect", False, ["-S", "{hp}"]),
}

# Runs the ProxyCommand tool as its child and records the child's rusage (and its own) in a file.
# ssh sends SIGHUP to the ProxyCommand when it exits: forward it, then still reap and record.
# The tool gets SIGPIPE/SIGXFSZ back at their defaults (Python ignores them, exec would keep that).
WRAPPER = r"""
import os, resource, signal, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
_, status, ru = os.wait4(pid, 0)
me = resource.getrusage(resource.RUSAGE_SELF)
with open(out + ".tmp", "w") as f:
    f.write(f"{ru.ru_utime} {ru.ru_stime} {me.ru_utime} {me.ru_stime} {status}\n")
os.rename(out + ".tmp", out)
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Tool:
    name: str
    argv: list[str] | None  # ProxyCommand without %h %p; None for direct ssh
    fdpass: bool = False
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None

    def proxy_command(self, wrapper: list[str] | None) -> str | None:
        if self.argv is None:
            return None
        argv = [*(wrapper or []), *self.argv]
        return shlex.join(a.replace("%", "%%") for a in argv) + " %h %p"


def make_tools(names: list[str], hostport: str, hopcat_cmd: str | None) -> list[Tool]:
    tools = []
    for name in names:
        row = ROWS[name]
        if row is None:
            tools.append(Tool(name, None))
            continue
        key, fdpass, options = row
        tool = resolve_tool(key, hopcat_cmd)
        argv = (
            None if tool.argv is None else [*tool.argv, *(o.format(hp=hostport) for o in options)]
        )
        tools.append(Tool(name, argv, fdpass, tool.env, tool.missing))
    return tools


@dataclass
class Run:
    tool: str
    direction: str  # down, up, setup
    rep: int
    size: int
    ok: bool = False
    wall: float = 0.0
    ssh_cpu: float | None = None
    tool_cpu: float | None = None  # the ProxyCommand tool (wrapper excluded)
    dante_cpu: float | None = None
    error: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.env = peers.peer_env()
        log("starting sshd and Dante on 127.0.0.1 ...")
        self.sshd = peers.start_sshd(workdir / "sshd")
        self.dante = daemons.start("dante", workdir / "dante")
        self.wrapper_path = workdir / "rusage_wrapper.py"
        self.wrapper_path.write_text(WRAPPER)
        self.seq = 0

    def close(self) -> None:
        self.dante.stop()
        self.sshd.stop()

    def ssh_argv(self, tool: Tool, rusage_file: Path | None) -> list[str]:
        opts = ["-T", "-x", "-c", self.args.cipher, "-o", "Compression=no"]
        wrapper = None
        if rusage_file is not None:
            wrapper = [sys.executable, "-I", "-S", str(self.wrapper_path), str(rusage_file)]
        pc = tool.proxy_command(wrapper)
        if pc is not None:
            opts += ["-o", f"ProxyCommand={pc}"]
            if tool.fdpass:
                opts += ["-o", "ProxyUseFdpass=yes"]
        return self.sshd.ssh_argv(*opts)

    def run(self, tool: Tool, direction: str, size: int, rep: int) -> Run:
        run = Run(tool.name, direction, rep, size)
        self.seq += 1
        rusage_file = None
        if tool.argv is not None and not self.args.no_cpu:
            rusage_file = self.workdir / f"rusage-{self.seq}"
        remote = {"down": f"head -c {size} /dev/zero", "up": "cat > /dev/null", "setup": "true"}
        argv = [*self.ssh_argv(tool, rusage_file), remote[direction]]
        env = {**self.env, **tool.env}
        timeout = self.args.timeout or (60 + size / (20 * MB))
        feeder = None
        dante0 = self.dante.cpu()
        start = time.perf_counter()
        with tempfile.TemporaryFile() as err:
            stdin: Any = subprocess.DEVNULL
            if direction == "up":
                feeder = subprocess.Popen(
                    ["head", "-c", str(size), "/dev/zero"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                )
                stdin = feeder.stdout
            ssh = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
            if feeder is not None and feeder.stdout is not None:
                feeder.stdout.close()
            ex = wait_exit(ssh.pid, timeout, group=True)
            ssh.returncode = ex.status  # reaped by wait_exit; keeps Popen from trying again
            run.wall = time.perf_counter() - start
            if ex.timed_out:
                run.error = f"timed out after {timeout:.0f}s"
            else:
                run.ssh_cpu = rusage_cpu(ex.rusage)
                if ex.status != 0:
                    run.error = f"ssh exit {ex.status}"
            if feeder is not None:
                try:
                    feeder.wait(10)
                except subprocess.TimeoutExpired:
                    feeder.kill()
                    feeder.wait(10)
                if feeder.returncode != 0 and not run.error:
                    run.error = f"head exit {feeder.returncode}"
            run.dante_cpu = self.dante.cpu() - dante0
            if rusage_file is not None:
                self._read_rusage(run, rusage_file, tool)
            run.ok = not run.error
            if run.error:
                err.seek(0)
                run.error += ": " + err.read()[-400:].decode(errors="replace").strip()
        return run

    def _read_rusage(self, run: Run, path: Path, tool: Tool) -> None:
        deadline = time.monotonic() + RUSAGE_WAIT_S
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            t_user, t_sys, w_user, w_sys, _status = path.read_text().split()
        except (OSError, ValueError):
            return
        run.tool_cpu = float(t_user) + float(t_sys)
        if tool.fdpass and run.ssh_cpu is not None:
            # ssh waits for a fd-passing ProxyCommand, so its rusage includes wrapper + tool.
            run.ssh_cpu -= run.tool_cpu + float(w_user) + float(w_sys)
        path.unlink()


def summarize(runs: list[Run], tools: list[Tool], directions: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tool in tools:
        per: dict[str, dict] = {}
        for d in directions:
            rs = [r for r in runs if r.tool == tool.name and r.direction == d]
            ok = [r for r in rs if r.ok]
            entry: dict = {"runs": len(rs), "ok": len(ok)}
            if ok:
                if d == "setup":
                    entry["wall_ms"] = median([r.wall * 1000 for r in ok])
                else:
                    rates = [r.size / r.wall / MB for r in ok]
                    entry["wall_s"] = median([r.wall for r in ok])
                    entry["mbps"], entry["min"], entry["max"] = (
                        median(rates),
                        min(rates),
                        max(rates),
                    )
                per_gib = GiB / ok[0].size if d != "setup" else 1.0
                for key in ("ssh_cpu", "tool_cpu", "dante_cpu"):
                    vals = [v for r in ok if (v := getattr(r, key)) is not None]
                    if vals:
                        entry[key] = median(vals) * per_gib
            per[d] = entry
        out[tool.name] = per
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(
    args: argparse.Namespace,
    meta: dict,
    tools: list[Tool],
    summary: dict,
    runs: list[Run],
    sample_argv: list[str],
) -> str:
    lines = [
        f"# ssh through Dante (SOCKS5): {human_size(args.size)}, {args.reps} reps, medians",
        "",
    ]
    lines += [f"- command: `{meta['command']}`"]
    for key in ("date", "nproc", "cpu", "kernel", "loadavg", "git", "openssh", "dante"):
        lines.append(f"- {key}: {meta[key]}")
    lines.append(f"- cipher: `{args.cipher}`, `Compression=no`; hopcat: `{meta['hopcat']}`")
    lines.append(
        f"- ssh (direct; the others add `-o ProxyCommand=...`): `{shlex.join(sample_argv)}`"
    )
    lines.append("")
    direct = summary.get("direct", {})
    dirs = [d for d in DIRECTIONS if d in args.only]
    setup = "setup" in args.only

    def ratio(x: float | None, base: float | None) -> str:
        return fmt(x / base if x and base else None, ".2f")

    def net(name: str, d: str) -> float | None:
        """MB/s over (median wall - median setup): the transfer without connection setup."""
        wall = summary[name][d].get("wall_s")
        setup_ms = summary[name].get("setup", {}).get("wall_ms")
        if wall is None or setup_ms is None or wall <= setup_ms / 1000:
            return None
        return float(args.size / (wall - setup_ms / 1000) / MB)

    # Throughput and connection setup.
    headers = ["tool", "ProxyCommand"]
    for d in dirs:
        headers += [f"{d} MB/s (min-max)", "vs direct"]
        if setup:
            headers += [f"{d} net MB/s", "vs direct"]
    if setup:
        headers += ["setup ms", "vs direct"]
    headers.append("ok")
    rows = []
    for tool in tools:
        pc = "(none)"
        if tool.argv is not None:
            pc = "`" + shlex.join([Path(tool.argv[0]).name, *tool.argv[1:]]) + " %h %p`"
            if tool.fdpass:
                pc += " + ProxyUseFdpass"
        row = [tool.name, pc]
        s = summary[tool.name]
        for d in dirs:
            e = s[d]
            mbps = e.get("mbps")
            cell = f"{mbps:.0f} ({e['min']:.0f}-{e['max']:.0f})" if mbps is not None else "FAIL"
            row += [cell, ratio(mbps, direct.get(d, {}).get("mbps"))]
            if setup:
                n = net(tool.name, d)
                row += [fmt(n, ".0f"), ratio(n, net("direct", d) if "direct" in summary else None)]
        if setup:
            w = s["setup"].get("wall_ms")
            row += [fmt(w, ".0f"), ratio(w, direct.get("setup", {}).get("wall_ms"))]
        measured = [*dirs, *(["setup"] if setup else [])]
        bad = [f"{d} {s[d]['ok']}/{s[d]['runs']}" for d in measured if s[d]["ok"] != s[d]["runs"]]
        row.append(", ".join(bad) if bad else "all")
        rows.append(row)
    lines += [md_table(headers, rows, set(range(2, len(headers)))), ""]

    # CPU per GiB moved.
    headers = ["tool"]
    for who in ("tool", "Dante", "ssh"):
        headers += [f"{who} CPU-s/GiB {d}" for d in dirs]
    rows = []
    for tool in tools:
        s = summary[tool.name]
        rows.append(
            [
                tool.name,
                *(
                    fmt(s[d].get(key), ".2f")
                    for key in ("tool_cpu", "dante_cpu", "ssh_cpu")
                    for d in dirs
                ),
            ]
        )
    lines.append(md_table(headers, rows, set(range(1, len(headers)))))
    lines += [
        "",
        "MB/s = size / wall of the whole ssh command (1 MB = 10^6 B), connection setup "
        "included; net MB/s = size / (median wall - median setup), an estimate of the transfer "
        "alone; tool CPU = the ProxyCommand program (for -F only its start and hand-off); "
        "Dante CPU = its process group; ssh CPU = the ssh client (fd-passing ProxyCommand "
        "subtracted). The remote sshd's CPU is not measured.",
    ]
    lines += [f"- skipped {name}: {why}" for name, why in meta.get("skipped", {}).items()]
    failures = [r for r in runs if not r.ok]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.tool} {r.direction} rep {r.rep}: {r.error}" for r in failures]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = arg_parser((__doc__ or "").split("\n\n")[0], reps=3)
    p.add_argument("--tools", default=",".join(ROWS), help=f"any of {','.join(ROWS)}")
    p.add_argument("--only", default="down,up,setup", help="any of down,up,setup")
    p.add_argument(
        "--cipher", default="aes128-gcm@openssh.com", help="ssh -c (default aes128-gcm@openssh.com)"
    )
    p.add_argument(
        "--no-cpu", action="store_true", help="run ProxyCommands bare, without the rusage wrapper"
    )
    p.add_argument(
        "--timeout", type=float, default=0, help="seconds per run (default 60 + size / 20 MB/s)"
    )
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    args.tool_names = [x for x in args.tools.split(",") if x]
    bad = [x for x in args.only if x not in (*DIRECTIONS, "setup")]
    bad += [x for x in args.tool_names if x not in ROWS]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for program in ("ssh", "danted", "head"):
        try:
            peers.require_program(program)
        except peers.PeerUnavailable as e:
            log(f"cannot run: {e}")
            return 2
    runs: list[Run] = []
    with stop_on_signals(), tempfile.TemporaryDirectory(prefix="hopcat-bench-ssh-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        bench = Bench(args, workdir)
        try:
            tools = make_tools(args.tool_names, bench.dante.hostport, args.hopcat)
            for t in tools:
                if t.missing:
                    log(f"skipping {t.name}: {t.missing}")
            active = [t for t in tools if not t.missing]
            hop_argv, _hop_env, hop_missing = hopcat_command(args.hopcat)
            danted = shutil.which("danted", path="/usr/sbin:/sbin:/usr/bin") or "danted"
            meta: dict[str, Any] = machine_meta()
            meta.update(
                openssh=first_line(["ssh", "-V"]),
                dante=first_line([danted, "-v"]),
                hopcat=hop_missing or shlex.join(hop_argv or []),
                skipped={t.name: t.missing for t in tools if t.missing},
            )
            dirs = [d for d in ("down", "up", "setup") if d in args.only]
            if not args.no_warmup:
                for t in active:
                    for d in dirs:
                        r = bench.run(t, d, WARMUP_SIZE, -1)
                        log(f"warm-up {t.name:9} {d:5} {'ok' if r.ok else 'FAIL ' + r.error}")
            for rep in range(args.reps):
                for t in rotated(active, rep):
                    for d in dirs:
                        size = 0 if d == "setup" else args.size
                        r = bench.run(t, d, size, rep)
                        runs.append(r)
                        rate = (
                            f"{size / r.wall / MB:7.1f} MB/s"
                            if size
                            else f"{r.wall * 1000:7.1f} ms"
                        )
                        log(
                            f"rep {rep + 1}/{args.reps} {t.name:9} {d:5} "
                            f"{rate if r.ok else 'FAIL ' + r.error}"
                        )
            summary = summarize(runs, active, dirs)
            sample = [*bench.ssh_argv(Tool("direct", None), None), "CMD"]
        finally:
            with contextlib.suppress(Exception):
                bench.close()
    print(report(args, meta, active, summary, runs, sample))
    write_json(args.json, {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]})
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
