#!/usr/bin/env python3
"""Port-scan benchmark: ``hopcat -z`` against ``nc.openbsd -z`` and ``nmap -sT`` (stdlib only).

Every tool scans 127.0.0.1 over ``--ports`` (default 1-65535) with a TCP connect scan, while
``--listeners`` sockets of this process listen on random loopback ports among the closed rest;
repetitions are interleaved (rep 1: every tool, rep 2: in a rotated order, ...). Reported per
tool: median wall time, ports per second, and exactness against what the kernel says is
listening on 127.0.0.1 (/proc/net/tcp, read before and after each run: a port that appeared or
went away meanwhile, another program's doing on a shared machine, is left out of the count).

Commands (open ports read from each tool's own output):
    hopcat -zv 127.0.0.1 PORTS             ("Connection to ... succeeded!" lines, stderr)
    nc.openbsd -zv 127.0.0.1 PORTS         (the same lines; nc scans one port at a time)
    nmap -sT -n -Pn -p PORTS -oG - 127.0.0.1   (grepable output)

Usage: python3 bench/scan.py [--ports 1-65535] [--reps 3] [--listeners 20]
       [--tools hopcat,nc,nmap] [--hopcat CMD] [--via dante] [--json FILE]

``--via dante`` scans through a fresh Dante: hopcat's and nc's own ``-x``, and nmap under
proxychains4, the way people scan through a SOCKS proxy (use a smaller --ports range: every port
is a connection through the proxy).

Progress goes to stderr, the Markdown report to stdout. No filtered (silent) ports: every tool
would then measure its own timeout. The machine is shared: compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import daemons
from harness.common import (
    HOST,
    log,
    machine_line,
    machine_meta,
    md_table,
    median,
    rotated,
    write_json,
)
from harness.tools import hopcat_command

SUCCEEDED = re.compile(r"^Connection to 127\.0\.0\.1 (\d+) port \[tcp/[^\]]*\] succeeded!$", re.M)
NMAP_OPEN = re.compile(r"(\d+)/open/tcp")
RUN_TIMEOUT_S = 1800


def listening_ports() -> set[int]:
    """Ports with a TCP listener that 127.0.0.1 reaches (bound to it or to any IPv4 address)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]  # noqa: SIM115
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port = fields[1].split(":")
            reaches = address in ("0100007F", "00000000") or (
                table.endswith("6") and address == "0" * 32
            )
            if fields[3] == "0A" and reaches:  # TCP_LISTEN
                ports.add(int(port, 16))
    return ports


def commands(
    tools: list[str], hopcat: list[str], spec: str, proxy_port: int | None, workdir: Path
) -> dict[str, list[str]]:
    """Each tool's command line; through the SOCKS5 proxy at ``proxy_port`` when given: hopcat's
    and nc's own -x, nmap under proxychains4 (the way people scan through a proxy)."""
    nc = shutil.which("nc.openbsd") or "nc.openbsd"
    nmap = [shutil.which("nmap") or "nmap", "-sT", "-n", "-Pn", "-p", spec, "-oG", "-", HOST]
    if proxy_port is None:
        table = {"hopcat": [*hopcat, "-zv", HOST, spec], "nc": [nc, "-zv", HOST, spec],
                 "nmap": nmap}  # fmt: skip
    else:
        conf = workdir / "proxychains.conf"
        conf.write_text(f"strict_chain\nquiet_mode\ntcp_read_time_out 5000\n"
                        f"tcp_connect_time_out 5000\n[ProxyList]\nsocks5 {HOST} {proxy_port}\n")
        table = {
            "hopcat": [*hopcat, "-zv", "-x", f"socks5h://{HOST}:{proxy_port}", HOST, spec],
            "nc": [nc, "-zv", "-X", "5", "-x", f"{HOST}:{proxy_port}", HOST, spec],
            "nmap": [shutil.which("proxychains4") or "proxychains4", "-q", "-f", str(conf), *nmap],
        }
    return {tool: table[tool] for tool in tools}


def listen_in(ports: range, count: int) -> list[socket.socket]:
    """``count`` listeners on free ports of ``ports``, at random."""
    import random

    listeners: list[socket.socket] = []
    for port in random.sample(ports, min(len(ports), count * 20)):
        if len(listeners) == count:
            break
        try:
            listeners.append(socket.create_server((HOST, port)))
        except OSError:
            continue  # taken
    return listeners


def run_one(argv: list[str], env: dict[str, str]) -> tuple[float, set[int], int]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - started
    if any(os.path.basename(arg) == "nmap" for arg in argv[:5]):  # proxychains4 ... nmap too
        found = {int(port) for port in NMAP_OPEN.findall(done.stdout)}
    else:
        found = {int(port) for port in SUCCEEDED.findall(done.stderr)}
    return seconds, found, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", default="1-65535", help="the port range (default 1-65535)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--listeners", type=int, default=20, help="open ports added (default 20)")
    parser.add_argument("--tools", default="hopcat,nc,nmap", help="default hopcat,nc,nmap")
    parser.add_argument("--hopcat", metavar="CMD", help="hopcat command (see bench/README.md)")
    parser.add_argument("--via", choices=["dante"],
                        help="scan through a fresh Dante (nmap under proxychains4)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw runs as JSON")
    args = parser.parse_args()
    meta = machine_meta()
    hopcat, hopcat_env, missing = hopcat_command(args.hopcat)
    tools = []
    for tool in args.tools.split(","):
        program = {"nc": "nc.openbsd", "nmap": "nmap"}.get(tool)
        if tool == "hopcat" and hopcat is None:
            log(f"hopcat skipped: {missing}")
        elif program is not None and shutil.which(program) is None:
            log(f"{tool} skipped: {program} not installed")
        else:
            tools.append(tool)
    low, _, high = args.ports.partition("-")
    span = int(high or low) - int(low) + 1
    workdir = Path(tempfile.mkdtemp(prefix="hopcat-bench-scan-"))
    proxy = daemons.start("dante", workdir / "dante") if args.via else None
    if proxy is not None and "nmap" in tools and shutil.which("proxychains4") is None:
        log("nmap skipped: proxychains4 not installed (apt-get install proxychains4)")
        tools.remove("nmap")
    argvs = commands(tools, hopcat or [], args.ports, proxy.port if proxy else None, workdir)
    listeners = listen_in(range(int(low), int(high or low) + 1), args.listeners)
    runs: dict[str, list[dict[str, object]]] = {tool: [] for tool in tools}
    try:
        for rep in range(args.reps):
            for tool in rotated(tools, rep):
                before = listening_ports()
                seconds, found, code = run_one(argvs[tool], {**os.environ, **hopcat_env})
                after = listening_ports()
                in_range = range(int(low), int(high or low) + 1)
                stable = {port for port in before & after if port in in_range}
                unstable = (before ^ after) & set(in_range)
                found -= unstable
                run = {"seconds": seconds, "exit": code, "expected": len(stable),
                       "missed": sorted(stable - found), "extra": sorted(found - stable)}  # fmt: skip
                runs[tool].append(run)
                log(f"rep {rep + 1} {tool}: {seconds:.2f} s, {len(found)} open, "
                    f"missed {run['missed']}, extra {run['extra']}")  # fmt: skip
    finally:
        for sock in listeners:
            sock.close()
        if proxy is not None:
            proxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for tool in tools:
        times = [float(str(run["seconds"])) for run in runs[tool]]
        exact = sum(not run["missed"] and not run["extra"] for run in runs[tool])
        rows.append([tool, f"{median(times):.2f}", f"{min(times):.2f}-{max(times):.2f}",
                     f"{span / median(times):,.0f}", f"{exact}/{len(times)}",
                     " ".join([os.path.basename(argvs[tool][0]), *argvs[tool][1:]])])  # fmt: skip
    print("# hopcat port-scan benchmark\n")
    print(f"- command: `{meta['command']}`")
    print(machine_line(meta))
    via = f" through Dante {daemons.version('dante')}" if args.via else ""
    print(f"- {span} ports on {HOST}{via}, {len(listeners)} extra listeners, {args.reps} reps\n")
    print(md_table(["tool", "wall s (median)", "range", "ports/s", "exact runs", "command"],
                   rows, right={1, 2, 3, 4}))  # fmt: skip
    write_json(args.json, {"meta": meta, "commands": argvs, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
