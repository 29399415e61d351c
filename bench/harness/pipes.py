"""The pipe-relay scenario engine behind bench/relay.py and bench/proxies.py.

A run is one tool moving N bytes between a pipe and a loopback socket, directly or through a
proxy (a *route*):

* up       a feeder splices N zero bytes into the tool's stdin pipe and closes it; the tool
           connects (through the route) to a sink that discards with MSG_TRUNC; the run passes
           when the sink got exactly N bytes and the tool exited 0 by itself
* down     a source sendfiles N bytes and closes; the tool's stdout pipe is spliced into
           /dev/null, its stdin stays open until it has exited
* latency  spawn -> first byte of a banner readable on the tool's stdout; then the tool is killed

Runs are interleaved: each repetition runs every (route, tool) pair once per direction, and the
starting route and tool rotate. Each pair first gets an untimed 16 MiB warm-up run per direction
(and one latency run). Once a pair times out in a direction, its later runs there are not
started. A route with a daemon also gets that daemon's process-group CPU over each run.

A scenario script declares its tables (``Column`` lists) and defaults and calls ``main``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import daemons
from .common import (
    HOST,
    GiB,
    MiB,
    arg_parser,
    human_size,
    log,
    machine_line,
    machine_meta,
    md_table,
    median,
    p90,
    parse_size,
    pct,
    rotated,
    stop_on_signals,
    write_json,
)
from .endpoints import (
    BANNER,
    BannerServer,
    ConnectingListener,
    Endpoint,
    Feeder,
    Reader,
    ServerEndpoint,
    Sink,
    Source,
    first_byte,
    make_listener,
    run_tool,
    zero_memfd,
)
from .procs import ToolRun, reap_all
from .tools import BASELINE, TOOL_ALIASES, TOOL_KINDS, Proxy, Tool, resolve_tool

MODES = ("up", "down", "latency")
THROUGHPUT_MODES = ("up", "down")
WARMUP_BYTES = 16 * MiB
DIRECT = "direct"  # the route without a proxy
# The proxied download path's target (ISSUE 8), reported by --ratios: hopcat against nc.openbsd.
TARGET_THROUGHPUT = 1.0  # at least nc.openbsd's throughput
TARGET_TOOL_CPU = 0.5  # at most half its CPU per GiB
TARGET_PROXY_CPU = 1.0  # and the proxy working no harder in hopcat's rows than in nc's

# Why a tool uses a fallback protocol, or none, with a proxy: (tool key, proxy key) -> text.
COMBO_NOTES: dict[tuple[str, str], str] = {
    ("socat", "dante"): "socat 1.7 has no SOCKS5 and Dante 1.4.2 does not implement SOCKS4a: "
    "socat uses SOCKS4 with the IPv4 target",
    ("socat", "microsocks"): "socat 1.7 has no SOCKS5 and microsocks speaks only SOCKS5",
}


@dataclass
class Route:
    key: str  # --proxy name, or DIRECT
    name: str  # display name
    daemon: daemons.Daemon | None = None
    schemes: tuple[str, ...] = ("-",)  # protocols the proxy speaks, preferred first

    def scheme_for(self, tool: Tool) -> str | None:
        if self.daemon is None:
            return "-"
        return next((s for s in self.schemes if s in tool.kind.schemes), None)

    def proxy(self, scheme: str) -> Proxy | None:
        return None if self.daemon is None else Proxy(scheme, HOST, self.daemon.port)


@dataclass
class Run(ToolRun):
    route: str = DIRECT
    scheme: str = "-"  # protocol the tool spoke to the proxy
    src_cpu: float | None = None  # feeder (up) / source server (down)
    dst_cpu: float | None = None  # sink server (up) / stdout reader (down)
    proxy_cpu: float | None = None  # the proxy's process group during the run
    src_count: int | None = None
    dst_count: int | None = None

    def cpu_detail(self, gib: float) -> str:
        extra = "" if self.proxy_cpu is None else f"  proxy {self.proxy_cpu / gib:.3f}"
        src, dst = (self.src_cpu or 0) / gib, (self.dst_cpu or 0) / gib
        return f"src {src:.3f}  dst {dst:.3f} CPU-s/GiB{extra}"


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.timeout: float = args.timeout
        self.rcvbuf: int = args.rcvbuf
        self.trunc: bool = not args.no_trunc
        self.listen: bool = args.listen
        self.zero_fd = zero_memfd()
        self.devnull_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


# --------------------------------------------------------------------------- one run


def run_throughput(ctx: Ctx, tool: Tool, run: Run, proxy: Proxy | None) -> None:
    """One up or down run (run.mode) of run.nbytes; fills in run."""
    up = run.mode == "up"
    lst: Any
    if ctx.listen:  # the tool listens; the endpoint connects to it
        port = daemons.peers.pick_port(HOST)
        lst = ConnectingListener(port, ctx.rcvbuf if up else 0)
        argv = tool.listen_command(run.mode, port)
    else:
        lst = make_listener(ctx.rcvbuf if up else 0)
        argv = tool.command(run.mode, lst.getsockname()[1], proxy)
    if argv is None:
        lst.close()
        run.error = "mode not supported by tool"
        return
    run.argv = argv
    in_r, in_w = os.pipe()  # the tool's stdin; down: open until the tool has exited
    server: ServerEndpoint
    if up:
        server = Sink(lst, ctx.timeout, ctx.trunc)
        endpoints: tuple[Endpoint, Endpoint] = (Feeder(in_w, run.nbytes, ctx.zero_fd), server)
        stdout, close = ctx.devnull_w, (in_r,)  # the feeder owns (and closes) in_w
    else:
        out_r, out_w = os.pipe()
        server = Source(lst, ctx.timeout, run.nbytes, ctx.zero_fd)
        endpoints = (server, Reader(out_r, ctx.devnull_w))  # the reader owns out_r
        stdout, close = out_w, (in_r, out_w)
    with tempfile.TemporaryFile() as errf:
        errors = run_tool(run, tool.env, in_r, stdout, close, endpoints, server, ctx.timeout, errf)
        src, dst = endpoints
        run.src_cpu, run.dst_cpu = src.cpu, dst.cpu
        run.src_count, run.dst_count = src.count, dst.count
        if run.dst_count != run.nbytes:
            errors.append(f"received {run.dst_count} bytes, expected {run.nbytes}")
        run.conclude(errors, errf)
    if not up:
        os.close(in_w)
    lst.close()


def run_latency(ctx: Ctx, tool: Tool, run: Run, proxy: Proxy | None, server: BannerServer) -> None:
    argv = tool.command("latency", server.port, proxy)
    if argv is None:
        run.error = "mode not supported by tool"
        return
    run.argv = argv
    first_byte(run, tool.env, server, min(ctx.timeout, 20.0))


# --------------------------------------------------------------------------- interleaving


class Matrix:
    """Every (route, tool) pair that can talk, run interleaved; a pair that timed out in a mode is
    not started there again."""

    def __init__(self, ctx: Ctx, tools: list[Tool], routes: list[Route]) -> None:
        self.ctx, self.tools, self.routes = ctx, tools, routes
        self.hung: dict[tuple[str, str, str], str] = {}  # (route, tool, mode) -> first timeout
        self.runs: list[Run] = []
        self.banner: BannerServer | None = None
        self.schemes = {(t.key, r.key): r.scheme_for(t) for r in routes for t in tools}
        for (tkey, rkey), scheme in self.schemes.items():
            if scheme is None:
                log(f"skipping {tkey} via {rkey}: {COMBO_NOTES.get((tkey, rkey))}")

    def pairs(self, i: int) -> list[tuple[Route, Tool]]:
        return [
            (r, t)
            for r in rotated(self.routes, i)
            for t in rotated(self.tools, i)
            if self.schemes[(t.key, r.key)] is not None
        ]

    def run(self, route: Route, tool: Tool, mode: str, rep: int, size: int, label: str) -> Run:
        scheme = self.schemes[(tool.key, route.key)] or "-"
        run = Run(tool.name, mode, rep, nbytes=size, route=route.key, scheme=scheme)
        hung = self.hung.get((route.key, tool.key, mode))
        if hung:
            run.error = f"not run, an earlier run timed out ({hung})"
            return run
        d = route.daemon
        c0 = d.cpu() if d is not None else 0.0
        if mode == "latency":
            assert self.banner is not None
            run.nbytes = len(BANNER)
            run_latency(self.ctx, tool, run, route.proxy(scheme), self.banner)
        else:
            run_throughput(self.ctx, tool, run, route.proxy(scheme))
        # The endpoints have all N bytes (or failed) by now: the proxy's share of the run is done.
        if d is not None:
            run.proxy_cpu = d.cpu() - c0
        if run.error and run.error.startswith(("timeout", "no output within")):
            self.hung[(route.key, tool.key, mode)] = f"{label}: {run.error}"
        via = f"{route.name:10} " if route.daemon is not None else ""
        if mode != "latency" or not run.ok or (rep and (rep % 10 == 0 or rep == 1)):
            what = "" if mode == "latency" else f"{mode:4} "
            log(f"[{label}] {what}{via}{tool.name:13} {run.describe()}")
        return run

    def measure(
        self, modes: list[str], reps: int, size: int, latency_runs: int, warmup: bool
    ) -> None:
        thr = [m for m in modes if m in THROUGHPUT_MODES]
        if thr and warmup:
            for mode in thr:
                for route, tool in self.pairs(0):
                    self.run(route, tool, mode, 0, min(size, WARMUP_BYTES), "warm-up")
        for rep in range(1, reps + 1 if thr else 1):
            for mode in thr:
                for route, tool in self.pairs(rep - 1):
                    self.runs.append(self.run(route, tool, mode, rep, size, f"rep {rep}/{reps}"))
        if "latency" not in modes or not latency_runs:
            return
        self.banner = BannerServer()
        self.banner.start()
        try:
            for i in [*([0] if warmup else []), *range(1, latency_runs + 1)]:
                for route, tool in self.pairs(max(i - 1, 0)):
                    run = self.run(route, tool, "latency", i, 0, f"latency {i}/{latency_runs}")
                    if i:
                        self.runs.append(run)
        finally:
            self.banner.close()


# --------------------------------------------------------------------------- summary


def _stats(rs: list[Run], mode: str) -> dict[str, Any]:
    good = [r for r in rs if r.ok]
    s: dict[str, Any] = {"tool": rs[0].tool, "mode": mode, "runs": len(rs), "ok": len(good)}
    if errs := [r.error for r in rs if r.error]:
        s["first_error"] = errs[0]
    counts = [r.dst_count for r in rs if r.dst_count is not None]
    if counts and mode != "latency":
        s["recv_min"], s["recv_expected"] = min(counts), rs[0].nbytes
    if not good:
        return s
    if mode == "latency":
        ms = [(r.wall or 0) * 1e3 for r in good]
        s.update(median_ms=median(ms), p90_ms=p90(ms), min_ms=min(ms), max_ms=max(ms))
        return s
    gib = good[0].nbytes / GiB
    rates = [r.nbytes / (r.wall or 1) / 1e6 for r in good]

    def med(value: Callable[[Run], float | None], per: str) -> float:
        return median([(value(r) or 0) / (gib if per == "gib" else (r.wall or 1)) for r in good])

    s.update(
        bytes=good[0].nbytes,
        mb_s=median(rates),
        mb_s_min=min(rates),
        mb_s_max=max(rates),
        wall_s=median([r.wall or 0 for r in good]),
        tool_user_gib=med(lambda r: r.tool_user, "gib"),
        tool_sys_gib=med(lambda r: r.tool_sys, "gib"),
        harness_cpu_gib=med(lambda r: r.harness_cpu, "gib"),
        sum_core=med(
            lambda r: (r.tool_cpu or 0) + (r.proxy_cpu or 0) + (r.src_cpu or 0) + (r.dst_cpu or 0),
            "wall",
        ),
    )
    cpu: dict[str, Callable[[Run], float | None]] = {
        "tool": lambda r: r.tool_cpu,
        "proxy": lambda r: r.proxy_cpu,  # None on the direct route
        "src": lambda r: r.src_cpu,
        "dst": lambda r: r.dst_cpu,
    }
    for who, value in cpu.items():
        if all(value(r) is not None for r in good):
            s[f"{who}_cpu_gib"], s[f"{who}_core"] = med(value, "gib"), med(value, "wall")
    s["busiest"] = max((w for w in cpu if f"{w}_core" in s), key=lambda w: s[f"{w}_core"])
    return s


def summarize(
    runs: list[Run], tools: list[Tool], routes: list[Route], modes: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """route key -> "tool key/mode" -> medians over the passing runs (and counts, first error)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for route in routes:
        per = out.setdefault(route.key, {})
        for tool in tools:
            for mode in modes:
                rs = [r for r in runs if (r.route, r.tool, r.mode) == (route.key, tool.name, mode)]
                if rs:
                    per[f"{tool.key}/{mode}"] = _stats(rs, mode)
    return out


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    route: Route
    tool: Tool
    mode: str
    scheme: str
    s: dict[str, Any]  # the summary entry


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row], str]
    right: bool = True
    measured: bool = True  # blank (the first one: FAIL) when no run passed


@dataclass(frozen=True)
class Table:
    title: str
    intro: str  # may use {cores}: nproc x 100
    columns: list[Column]


def cpu_cell(key: str) -> Callable[[Row], str]:
    """``x.xxx (NN%)``: CPU-s per GiB and share of one core of tool, proxy, src or dst."""

    def cell(row: Row) -> str:
        s = row.s
        return (
            f"{s[key + '_cpu_gib']:.3f} ({pct(s[key + '_core'])})" if key + "_cpu_gib" in s else "-"
        )

    return cell


def received(row: Row) -> str:
    s = row.s
    if "recv_min" not in s:
        return ""
    got, exp = s["recv_min"], s["recv_expected"]
    return "all" if got == exp else f"{got / MiB:.1f} MiB ({got / exp:.1%})"


# Columns the scenario tables are made of.
PROXY = Column("proxy", lambda r: r.route.name, right=False, measured=False)
TOOL = Column("tool", lambda r: r.tool.name, right=False, measured=False)
PROTO = Column("proto", lambda r: r.scheme, right=False, measured=False)
DIR = Column("dir", lambda r: r.mode, right=False, measured=False)
MB_S = Column("MB/s", lambda r: f"{r.s['mb_s']:.0f}")
MB_S_RANGE = Column("MB/s min-max", lambda r: f"{r.s['mb_s_min']:.0f}-{r.s['mb_s_max']:.0f}")
WALL = Column("wall s", lambda r: f"{r.s['wall_s']:.3f}")
TOOL_CPU = Column("tool CPU-s/GiB (%core)", cpu_cell("tool"))
TOOL_USR_SYS = Column(
    "tool usr/sys", lambda r: f"{r.s['tool_user_gib']:.2f}/{r.s['tool_sys_gib']:.2f}"
)
PROXY_CPU = Column("proxy CPU-s/GiB (%core)", cpu_cell("proxy"))
SRC_CPU = Column("src CPU-s/GiB (%core)", cpu_cell("src"))
DST_CPU = Column("dst CPU-s/GiB (%core)", cpu_cell("dst"))
SUM_CORE = Column("Σ%core", lambda r: pct(r.s["sum_core"]))
BUSIEST = Column("busiest", lambda r: r.s["busiest"], right=False)
RECEIVED = Column("received", received, measured=False)
OK = Column("ok", lambda r: f"{r.s['ok']}/{r.s['runs']}", measured=False)
FIRST_BYTE = Column("first byte median ms", lambda r: f"{r.s['median_ms']:.2f}")
P90 = Column("p90 ms", lambda r: f"{r.s['p90_ms']:.2f}")
MS_RANGE = Column("min-max ms", lambda r: f"{r.s['min_ms']:.2f}-{r.s['max_ms']:.2f}")


def render(table: Table, rows: list[Row], data_key: str, meta: dict[str, Any]) -> list[str]:
    cells = []
    for row in rows:
        line, failed = [], data_key not in row.s
        for c in table.columns:
            if failed and c.measured:
                line.append("" if any(x.measured for x in table.columns[: len(line)]) else "FAIL")
            else:
                line.append(c.cell(row))
        cells.append(line)
    right = {i for i, c in enumerate(table.columns) if c.right}
    cores = (meta["affinity"] or meta["nproc"] or 1) * 100
    out = [table.title, ""]
    if table.intro:
        out += [table.intro.format(cores=cores), ""]
    return [*out, md_table([c.header for c in table.columns], cells, right), ""]


@dataclass(frozen=True)
class Scenario:
    """What a pipe-relay script declares: its title, defaults and tables."""

    title: str
    doc: str
    default_tools: str
    throughput: Table
    latency: Table
    default_proxies: str | None = None  # None: direct only, no --proxy option
    listen: bool = False  # the tools listen (-l) and the endpoints connect to them


class Result:
    def __init__(
        self,
        scenario: Scenario,
        args: argparse.Namespace,
        meta: dict[str, Any],
        tools: list[Tool],
        skipped: list[Tool],
        routes: list[Route],
        proxy_errors: dict[str, str],
        matrix: Matrix,
    ) -> None:
        self.scenario, self.args, self.meta = scenario, args, meta
        self.tools, self.skipped, self.routes = tools, skipped, routes
        self.proxy_errors, self.matrix = proxy_errors, matrix
        self.summary = summarize(matrix.runs, tools, routes, args.modes)
        self.proxied = scenario.default_proxies is not None

    def rows(self, mode: str) -> list[Row]:
        return [
            Row(r, t, mode, self.matrix.schemes.get((t.key, r.key)) or "", s)
            for r in self.routes
            for t in self.tools
            if (s := self.summary[r.key].get(f"{t.key}/{mode}")) is not None
        ]

    def via(self, route: Route) -> str:
        return f" via {route.name}" if self.proxied else ""

    def header(self) -> list[str]:
        meta, args = self.meta, self.args
        out = [self.scenario.title, "", f"- command: `{meta['command']}`", machine_line(meta)]
        out.append(
            f"- size={human_size(args.size)} per run, reps={args.reps}, "
            f"latency runs={args.latency_runs}, timeout={args.timeout:.0f}s, "
            f"sink {'recv_into' if args.no_trunc else 'MSG_TRUNC'}, "
            f"sink SO_RCVBUF={args.rcvbuf or 'autotune'}"
        )
        for t in self.tools:
            version = meta["versions"].get(t.name)
            out.append(
                f"- {t.name}: `{shlex.join(t.argv or [])}`"
                + (f" (env {t.env})" if t.env else "")
                + (f" — {version}" if version else "")
            )
        out += [f"- SKIPPED {t.name}: {t.missing}" for t in self.skipped]
        if not self.proxied:
            return [*out, ""]
        for key in args.proxy_keys:
            route = next((r for r in self.routes if r.key == key), None)
            if key == DIRECT:
                out.append("- direct: no proxy (the tools' plain form), for comparison")
            elif route is None or route.daemon is None:
                out.append(f"- SKIPPED proxy {key}: {self.proxy_errors.get(key, 'not started')}")
            else:
                d = route.daemon
                left = f"; LEFT RUNNING after stop: pids {d.leftover}" if d.leftover else ""
                name = " ".join(filter(None, (route.name, meta["proxy_versions"].get(key))))
                out.append(
                    f"- proxy {name}: `{shlex.join(d.argv)}` on {d.hostport}, pid {d.pid}{left}"
                )
        names = {r.key: r.name for r in self.routes}
        for (tkey, rkey), scheme in self.matrix.schemes.items():
            tname = TOOL_KINDS[tkey].name
            if scheme is None:
                why = COMBO_NOTES.get((tkey, rkey), "no common protocol")
                out.append(f"- SKIPPED {tname} via {names[rkey]}: {why}")
            elif (tkey, rkey) in COMBO_NOTES:
                out.append(f"- {tname} via {names[rkey]}: {COMBO_NOTES[(tkey, rkey)]}")
        return [*out, ""]

    def ratio_lines(self) -> list[str]:
        base = next((t for t in self.tools if t.key == BASELINE), None)
        if base is None:
            return []
        label = "tool CPU/GiB" if self.proxied else "CPU/GiB"
        lines = []
        for route in self.routes:
            summ = self.summary[route.key]
            for t in self.tools:
                parts = []
                for mode in (m for m in self.args.modes if m in THROUGHPUT_MODES):
                    s, b = summ.get(f"{t.key}/{mode}"), summ.get(f"{base.key}/{mode}")
                    if t is not base and s and b and "mb_s" in s and "mb_s" in b:
                        parts.append(
                            f"{mode}: throughput {s['mb_s'] / b['mb_s']:.2f}x, "
                            f"{label} {s['tool_cpu_gib'] / b['tool_cpu_gib']:.2f}x"
                        )
                s, b = summ.get(f"{t.key}/latency"), summ.get(f"{base.key}/latency")
                if t is not base and s and b and "median_ms" in s and "median_ms" in b:
                    parts.append(f"first byte {s['median_ms'] / b['median_ms']:.2f}x")
                if parts:
                    where = f"{route.name}: " if self.proxied else ""
                    lines.append(f"- {where}{t.name} vs {base.name}: " + "; ".join(parts))
        if not lines:
            return []
        per = " per proxy" if self.proxied else ""
        return [
            f"## Ratios vs {base.name}{per} (medians; >1 throughput = faster, "
            ">1 CPU/latency = costlier)",
            "",
            *lines,
            "",
        ]

    def hopcat_ratios(self) -> dict[str, dict[str, dict[str, float | bool]]]:
        """route -> mode -> hopcat's figures as ratios of nc.openbsd's (--ratios)."""
        out: dict[str, dict[str, dict[str, float | bool]]] = {}
        for route in self.routes:
            summ = self.summary[route.key]
            for mode in (m for m in self.args.modes if m in THROUGHPUT_MODES):
                h, n = summ.get(f"hopcat/{mode}"), summ.get(f"{BASELINE}/{mode}")
                if not (h and n and "mb_s" in h and "mb_s" in n):
                    continue
                r: dict[str, float | bool] = {
                    "throughput": h["mb_s"] / n["mb_s"],
                    "tool_cpu": h["tool_cpu_gib"] / n["tool_cpu_gib"],
                }
                if "proxy_cpu_gib" in h and "proxy_cpu_gib" in n:
                    r["proxy_cpu_hopcat"] = h["proxy_cpu_gib"]
                    r["proxy_cpu_nc"] = n["proxy_cpu_gib"]
                    if n["proxy_cpu_gib"] > 0:  # 0: under one clock tick at a small --size
                        r["proxy_cpu"] = h["proxy_cpu_gib"] / n["proxy_cpu_gib"]
                r["target_met"] = (
                    r["throughput"] >= TARGET_THROUGHPUT
                    and r["tool_cpu"] <= TARGET_TOOL_CPU
                    and float(r.get("proxy_cpu", 0.0)) <= TARGET_PROXY_CPU
                )
                out.setdefault(route.key, {})[mode] = r
        return out

    def hopcat_ratio_table(self) -> list[str]:
        ratios = self.hopcat_ratios()
        rows = []
        for route in self.routes:
            for mode, r in ratios.get(route.key, {}).items():
                proxy = [
                    f"{r[k]:.3f}" if k in r else "-" for k in ("proxy_cpu_hopcat", "proxy_cpu_nc")
                ]
                proxy.append(f"{r['proxy_cpu']:.2f}x" if "proxy_cpu" in r else "-")
                target = ("met" if r["target_met"] else "NOT met") if mode == "down" else ""
                rows.append(
                    [
                        route.name,
                        mode,
                        f"{r['throughput']:.2f}x",
                        f"{r['tool_cpu']:.2f}x",
                        *proxy,
                        target,
                    ]
                )
        if not rows:
            return []
        base = TOOL_KINDS[BASELINE].name
        headers = [
            "proxy",
            "dir",
            "throughput",
            "tool CPU/GiB",
            "proxy CPU-s/GiB, hopcat's rows",
            f"proxy CPU-s/GiB, {base}'s rows",
            "proxy CPU/GiB",
            "download target",
        ]
        intro = (
            f"hopcat's medians as multiples of {base}'s in the same run. Download target: "
            f"throughput >= {TARGET_THROUGHPUT:.2f}x, tool CPU/GiB <= {TARGET_TOOL_CPU:.2f}x, "
            f"and the proxy's own CPU/GiB in hopcat's rows <= {TARGET_PROXY_CPU:.2f}x "
            f"its CPU/GiB in {base}'s."
        )
        return [
            f"## hopcat vs {base}",
            "",
            intro,
            "",
            md_table(headers, rows, set(range(2, 7))),
            "",
        ]

    def report(self) -> str:
        out = self.header()
        failures: list[str] = []
        thr_rows = [row for m in THROUGHPUT_MODES if m in self.args.modes for row in self.rows(m)]
        if thr_rows:
            out += render(self.scenario.throughput, thr_rows, "mb_s", self.meta)
        lat_rows = self.rows("latency") if "latency" in self.args.modes else []
        if "latency" in self.args.modes:
            out += render(self.scenario.latency, lat_rows, "median_ms", self.meta)
        for row in [*thr_rows, *lat_rows]:
            if err := row.s.get("first_error"):
                failures.append(f"- {row.tool.name} {row.mode}{self.via(row.route)}: {err}")
        out += self.ratio_lines()
        if self.args.ratios:
            out += self.hopcat_ratio_table()
        if failures:
            out += ["## Failures", "", *failures, ""]
        return "\n".join(out)

    def json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "skipped": {t.name: t.missing for t in self.skipped},
            "proxies": {
                r.key: {
                    "port": r.daemon.port,
                    "pid": r.daemon.pid,
                    "argv": r.daemon.argv,
                    "leftover": r.daemon.leftover,
                }
                for r in self.routes
                if r.daemon is not None
            },
            "proxy_errors": self.proxy_errors,
            "schemes": {f"{t}/{p}": s for (t, p), s in self.matrix.schemes.items()},
            "summary": self.summary,
            "ratios": self.hopcat_ratios(),
            "runs": [dict(asdict(r), tool_cpu=r.tool_cpu) for r in self.matrix.runs],
        }


# --------------------------------------------------------------------------- command line


def _names(
    ap: argparse.ArgumentParser,
    option: str,
    text: str,
    choices: Sequence[str],
    aliases: dict[str, str] | None = None,
) -> list[str]:
    out: list[str] = []
    for k in (x.strip() for x in text.split(",")):
        k = (aliases or {}).get(k, k)
        if k and k not in choices:
            ap.error(f"{option}: unknown {k!r}; choose from {', '.join(choices)}")
        if k and k not in out:
            out.append(k)
    if not out:
        ap.error(f"{option}: give at least one of {', '.join(choices)}")
    return out


def parse_args(scenario: Scenario, argv: list[str] | None) -> argparse.Namespace:
    ap = arg_parser(scenario.doc, reps=5)
    ap.add_argument(
        "--latency-runs", type=int, default=40, help="first-byte runs per tool (default 40)"
    )
    ap.add_argument(
        "--tools",
        default=scenario.default_tools,
        help=f"comma list from {','.join(TOOL_KINDS)} (default {scenario.default_tools})",
    )
    proxy_choices = [*daemons.SERVERS, DIRECT]
    if scenario.default_proxies is not None:
        ap.add_argument(
            "--proxy",
            metavar="LIST",
            default=scenario.default_proxies,
            help=f"comma list from {','.join(proxy_choices)}; direct = the tools' rows "
            f"without a proxy (default {scenario.default_proxies})",
        )
    ap.add_argument("--only", default="up,down" if scenario.listen else "up,down,latency",
                    help="comma list of up,down,latency")
    ap.add_argument("--timeout", type=float, help="per-run timeout in s (default 30 + size/20MB/s)")
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
    ap.add_argument(
        "--ratios",
        action="store_true",
        help=f"add hopcat's figures as ratios of {TOOL_KINDS[BASELINE].name}'s, with "
        "the proxy's CPU in both rows and the download-path target",
    )
    args = ap.parse_args(argv)
    args.listen = scenario.listen
    if args.listen and "latency" in args.only.split(","):
        ap.error("listen mode measures up and down only (--only up,down)")
    if args.timeout is None:
        args.timeout = 30 + args.size / 20e6
    args.modes = _names(ap, "--only", args.only, MODES)
    args.tool_keys = _names(ap, "--tools", args.tools, list(TOOL_KINDS), TOOL_ALIASES)
    args.proxy_keys = _names(ap, "--proxy", getattr(args, "proxy", DIRECT), proxy_choices)
    if args.reps < 1 or args.latency_runs < 0 or args.size < 1:
        ap.error("--reps must be >= 1, --latency-runs >= 0, --size >= 1")
    return args


def main(scenario: Scenario, argv: list[str] | None = None) -> int:
    args = parse_args(scenario, argv)
    resolved = [resolve_tool(k, args.hopcat) for k in args.tool_keys]
    tools = [t for t in resolved if t.argv is not None]
    skipped = [t for t in resolved if t.argv is None]
    for t in skipped:
        log(f"skipping {t.name}: {t.missing}")
    # Tools must not obey the caller's proxy settings (ALL_PROXY, SOCKS5_SERVER, CONNECT_USER...).
    for key in [
        k
        for k in os.environ
        if k.upper().endswith("_PROXY") or k.upper().startswith(("SOCKS", "CONNECT_"))
    ]:
        del os.environ[key]
    meta = machine_meta()
    meta.update(
        size=args.size,
        reps=args.reps,
        latency_runs=args.latency_runs,
        timeout=args.timeout,
        msg_trunc=not args.no_trunc,
        rcvbuf=args.rcvbuf,
        versions={t.name: t.version() for t in tools},
        proxy_versions={k: daemons.version(k) for k in args.proxy_keys if k != DIRECT},
    )
    routes: list[Route] = []
    proxy_errors: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="hopcat-bench-"))
    matrix = None
    with stop_on_signals():
        try:
            for key in args.proxy_keys:
                if key == DIRECT:
                    routes.append(Route(DIRECT, DIRECT))
                    continue
                server = daemons.SERVERS[key]
                try:
                    d = daemons.start(key, workdir / key)
                except RuntimeError as e:
                    proxy_errors[key] = str(e)
                    log(f"skipping proxy {server.name}: {e}")
                    continue
                log(f"started {server.name} on {d.hostport} (pid {d.pid})")
                routes.append(Route(key, server.name, d, server.schemes))
            matrix = Matrix(Ctx(args), tools, routes)
            matrix.measure(args.modes, args.reps, args.size, args.latency_runs, not args.no_warmup)
        except KeyboardInterrupt as e:
            log(f"interrupted ({e or 'SIGINT'}): reporting what was measured")
        finally:
            reap_all()
            for r in routes:
                if r.daemon is not None:
                    r.daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    if matrix is None:
        return 1
    for r in routes:  # a proxy that died during the run is worth a line
        if r.daemon is not None and r.daemon.returncode not in (None, 0, -signal.SIGTERM):
            proxy_errors.setdefault(r.key, f"exited with status {r.daemon.returncode}")
    result = Result(scenario, args, meta, tools, skipped, routes, proxy_errors, matrix)
    print(result.report())
    write_json(args.json, result.json())
    return 0
