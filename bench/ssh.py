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
import json
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
import peers  # noqa: E402  (start_sshd, start_danted, peer_env)

MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP_SIZE = 16 * MiB
RUSAGE_WAIT_S = 5.0  # after ssh exits, how long the wrapper may take to report the tool's rusage
DIRECTIONS = ("down", "up")
ALL_TOOLS = ("direct", "hopcat", "hopcat-F", "nc", "nc-F", "ncat", "connect")

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


# --------------------------------------------------------------------------- tools


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


def hopcat_argv(cmd: str | None) -> tuple[list[str] | None, dict[str, str], str | None]:
    """(argv, extra env, missing reason) for hopcat, as bench/relay.py picks it."""
    if cmd:
        argv = shlex.split(cmd)
        path = shutil.which(argv[0]) if os.sep not in argv[0] else argv[0]
        if not path or not os.access(path, os.X_OK):
            return None, {}, f"--hopcat command not found: {argv[0]}"
        return [path, *argv[1:]], {}, None
    if os.access(REPO / ".venv/bin/hopcat", os.X_OK):
        return [str(REPO / ".venv/bin/hopcat")], {}, None
    if (REPO / "src/hopcat").is_dir():
        pp = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": str(REPO / "src") + (os.pathsep + pp if pp else "")}
        return [sys.executable, "-m", "hopcat"], env, None
    return None, {}, f"no {REPO}/.venv/bin/hopcat and no {REPO}/src/hopcat"


def make_tools(names: list[str], proxy_hostport: str, hopcat_cmd: str | None) -> list[Tool]:
    hp = proxy_hostport
    tools: list[Tool] = []
    for name in names:
        if name == "direct":
            tools.append(Tool(name, None))
            continue
        if name in ("hopcat", "hopcat-F"):
            argv, env, missing = hopcat_argv(hopcat_cmd)
            fd = name == "hopcat-F"
            if argv is not None:
                argv = [*argv, *(["-F"] if fd else []), "-x", f"socks5h://{hp}"]
            tools.append(Tool(name, argv, fdpass=fd, env=env, missing=missing))
            continue
        exe = {
            "nc": "nc.openbsd",
            "nc-F": "nc.openbsd",
            "ncat": "ncat",
            "connect": "connect-proxy",
        }[name]
        path = shutil.which(exe)
        if path is None:
            tools.append(Tool(name, None, missing=f"{exe} not installed"))
            continue
        tail = {
            "nc": ["-X", "5", "-x", hp],
            "nc-F": ["-F", "-X", "5", "-x", hp],
            "ncat": ["--proxy", hp, "--proxy-type", "socks5"],
            "connect": ["-S", hp],
        }[name]
        tools.append(Tool(name, [path, *tail], fdpass=name.endswith("-F")))
    return tools


# --------------------------------------------------------------------------- measuring


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


def group_cpu(pgid: int) -> float:
    """utime+stime+cutime+cstime of every live process in a process group (Dante and children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # after the command: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14)
        if int(fields[2]) == pgid:
            total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def wait_pid(pid: int, timeout: float) -> tuple[int, float] | None:
    """Reap pid within timeout: (exit code, user+sys CPU incl. reaped children) or None."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        _, status, ru = os.wait4(pid, 0)
        return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime
    finally:
        os.close(fd)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.env = peers.peer_env()
        log("starting sshd and Dante on 127.0.0.1 ...")
        self.sshd = peers.start_sshd(workdir / "sshd")
        self.dante = peers.start_danted(workdir / "dante")
        self.wrapper_path = workdir / "rusage_wrapper.py"
        self.wrapper_path.write_text(WRAPPER)
        self.seq = 0

    def close(self) -> None:
        for daemon in (self.dante, self.sshd):
            with contextlib.suppress(Exception):
                daemon.stop()

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
        dante0 = group_cpu(self.dante.pid)
        start = time.perf_counter()
        with tempfile.TemporaryFile() as err:
            if direction == "up":
                feeder = subprocess.Popen(
                    ["head", "-c", str(size), "/dev/zero"],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
                stdin = feeder.stdout
            else:
                stdin = subprocess.DEVNULL
            with open(os.devnull, "wb") as null:
                ssh = subprocess.Popen(
                    argv, stdin=stdin, stdout=null, stderr=err, env=env, start_new_session=True
                )
            if feeder is not None and feeder.stdout is not None:
                feeder.stdout.close()
            done = wait_pid(ssh.pid, timeout)
            run.wall = time.perf_counter() - start
            if done is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ssh.pid, signal.SIGKILL)
                os.waitpid(ssh.pid, 0)
                run.error = f"timed out after {timeout:.0f}s"
            else:
                code, ssh_cpu = done
                run.ssh_cpu = ssh_cpu
                if code != 0:
                    run.error = f"ssh exit {code}"
            ssh.returncode = 0  # reaped above; keep Popen from warning
            if feeder is not None:
                try:
                    feeder.wait(10)
                except subprocess.TimeoutExpired:
                    feeder.kill()
                    feeder.wait(10)
                if feeder.returncode != 0 and not run.error:
                    run.error = f"head exit {feeder.returncode}"
            run.dante_cpu = group_cpu(self.dante.pid) - dante0
            if rusage_file is not None:
                self._read_rusage(run, rusage_file, tool)
            if not run.error:
                run.ok = True
            else:
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


# --------------------------------------------------------------------------- report


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": MiB, "g": GiB}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def human_size(n: int) -> str:
    for unit, m in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def md_table(headers: list[str], rows: list[list[str]], text_cols: int = 2) -> str:
    """Markdown table; the first ``text_cols`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < text_cols else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join(
        "-" * (w + 2) if i < text_cols else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([line(headers), sep + "|", *(line(r) for r in rows)])


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[Run], tools: list[Tool], directions: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tool in tools:
        per: dict[str, dict] = {}
        for d in directions:
            rs = [r for r in runs if r.tool == tool.name and r.direction == d]
            ok = [r for r in rs if r.ok]
            entry: dict = {"runs": len(rs), "ok": len(ok)}
            if ok:
                gib = ok[0].size / GiB if d != "setup" else None
                if d == "setup":
                    entry["wall_ms"] = med([r.wall * 1000 for r in ok])
                else:
                    rates = [r.size / r.wall / MB for r in ok]
                    entry["wall_s"] = med([r.wall for r in ok])
                    entry["mbps"], entry["min"], entry["max"] = med(rates), min(rates), max(rates)
                for key in ("ssh_cpu", "tool_cpu", "dante_cpu"):
                    vals = [getattr(r, key) for r in ok if getattr(r, key) is not None]
                    if vals:
                        entry[key] = med(vals) / gib if gib else med(vals)
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

    # Throughput and connection setup.
    headers = ["tool", "ProxyCommand"]
    for d in dirs:
        headers += [f"{d} MB/s (min-max)", "vs direct"]
        if setup:
            headers += [f"{d} net MB/s", "vs direct"]
    if setup:
        headers += ["setup ms", "vs direct"]
    headers.append("ok")

    def net(name: str, d: str) -> float | None:
        """MB/s over (median wall - median setup): the transfer without connection setup."""
        wall = summary[name][d].get("wall_s")
        setup_ms = summary[name].get("setup", {}).get("wall_ms")
        if wall is None or setup_ms is None or wall <= setup_ms / 1000:
            return None
        return float(args.size / (wall - setup_ms / 1000) / MB)

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
    lines.append(md_table(headers, rows))
    lines.append("")

    # CPU per GiB moved.
    headers = ["tool"]
    for who in ("tool", "Dante", "ssh"):
        headers += [f"{who} CPU-s/GiB {d}" for d in dirs]
    rows = []
    for tool in tools:
        s = summary[tool.name]
        row = [tool.name]
        for key in ("tool_cpu", "dante_cpu", "ssh_cpu"):
            row += [fmt(s[d].get(key), ".2f") for d in dirs]
        rows.append(row)
    lines.append(md_table(headers, rows, text_cols=1))
    lines += [
        "",
        "MB/s = size / wall of the whole ssh command (1 MB = 10^6 B), connection setup "
        "included; net MB/s = size / (median wall - median setup), an estimate of the transfer "
        "alone; tool CPU = the ProxyCommand program (for -F only its start and hand-off); "
        "Dante CPU = its process group; ssh CPU = the ssh client (fd-passing ProxyCommand "
        "subtracted). The remote sshd's CPU is not measured.",
    ]
    for name, why in meta.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {why}")
    failures = [r for r in runs if not r.ok]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.tool} {r.direction} rep {r.rep}: {r.error}" for r in failures]
    return "\n".join(lines) + "\n"


def version_line(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL
        )
        text = (cp.stdout + cp.stderr).strip()
        if text:
            return text.splitlines()[0][:80]
    return "?"


def machine_meta(hopcat: str) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": version_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "openssh": version_line(["ssh", "-V"]),
        "dante": version_line(
            [shutil.which("danted", path="/usr/sbin:/sbin:/usr/bin") or "danted", "-v"]
        ),
        "hopcat": hopcat,
    }


# --------------------------------------------------------------------------- main


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        type=parse_size,
        default=GiB,
        help="bytes per run (K/M/G = KiB/MiB/GiB; default 1G)",
    )
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"any of {','.join(ALL_TOOLS)}")
    p.add_argument("--only", default="down,up,setup", help="any of down,up,setup")
    p.add_argument(
        "--cipher", default="aes128-gcm@openssh.com", help="ssh -c (default aes128-gcm@openssh.com)"
    )
    p.add_argument(
        "--hopcat", help="hopcat command (default <repo>/.venv/bin/hopcat, else python -m hopcat)"
    )
    p.add_argument(
        "--no-cpu", action="store_true", help="run ProxyCommands bare, without the rusage wrapper"
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 16 MiB run per tool")
    p.add_argument(
        "--timeout", type=float, default=0, help="seconds per run (default 60 + size / 20 MB/s)"
    )
    p.add_argument("--json", help="write raw runs and the summary here")
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    args.tool_names = [x for x in args.tools.split(",") if x]
    bad = [x for x in args.only if x not in (*DIRECTIONS, "setup")]
    bad += [x for x in args.tool_names if x not in ALL_TOOLS]
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

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="hopcat-bench-ssh-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        bench = Bench(args, workdir)
        try:
            tools = make_tools(args.tool_names, bench.dante.hostport, args.hopcat)
            for t in tools:
                if t.missing:
                    log(f"skipping {t.name}: {t.missing}")
            active = [t for t in tools if not t.missing]
            hop_argv, _hop_env, hop_missing = hopcat_argv(args.hopcat)
            meta = machine_meta(hop_missing or shlex.join(hop_argv or []))
            meta["skipped"] = {t.name: t.missing for t in tools if t.missing}
            dirs = [d for d in ("down", "up", "setup") if d in args.only]
            if not args.no_warmup:
                for t in active:
                    for d in dirs:
                        r = bench.run(t, d, WARMUP_SIZE, -1)
                        log(f"warm-up {t.name:9} {d:5} {'ok' if r.ok else 'FAIL ' + r.error}")
            for rep in range(args.reps):
                k = rep % len(active)
                for t in active[k:] + active[:k]:  # rotate: no tool always goes first
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
            bench.close()
    text = report(args, meta, active, summary, runs, sample)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}, indent=2
            )
        )
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
