#!/usr/bin/env python3
"""TLS relay benchmark: hopcat --tls vs ncat --ssl, socat OPENSSL and openssl s_client (stdlib only).

A TLS server of the benchmark's own (a thread: Python's ssl, TLS 1.3 only, a throwaway ECDSA
P-256 certificate signed by a throwaway CA, both made with the openssl program) sits on a loopback
port; each client relays between its stdio pipes and that server, verifying the certificate
against the CA as a careful user would. Interleaved across tools:

* upload    stdin pipe (spliced from a memfd of random bytes) -> tool -> TLS sink (counts)
* download  TLS source (sends N bytes, close_notify, FIN) -> tool -> stdout pipe (spliced to
            /dev/null); the tool's stdin stays open, it must exit by itself
* latency   spawn -> first byte of a banner the server sends right after the handshake,
            readable on the tool's stdout (process start + TCP + TLS handshake + one record)

Every run is checked by byte count; the untimed warm-up run of each tool and direction also by
SHA-256 at both ends. The floor: ``openssl speed`` for the negotiated cipher (16 KiB blocks, one
core), as CPU seconds per GiB, next to each tool's.

Usage: python3 bench/tls.py [--size 1G] [--reps 5] [--latency-runs 30]
       [--tools hopcat,ncat,socat,s_client] [--only up,down,latency] [--quick] [--json FILE]

Progress goes to stderr, the Markdown report to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import select
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.common import (
    HOST,
    MB,
    REPO,
    GiB,
    MiB,
    arg_parser,
    first_line,
    human_size,
    log,
    machine_line,
    machine_meta,
    md_table,
    median,
    p90,
    pct,
    rotated,
    stop_on_signals,
    write_json,
)
from harness.endpoints import (
    BANNER,
    IO_CHUNK,
    ZERO_BYTES,
    BannerServer,
    Endpoint,
    Feeder,
    Reader,
    ServerEndpoint,
    first_byte,
    make_listener,
    run_tool,
)
from harness.procs import ToolRun, reap_all
from harness.tools import hopcat_command

sys.path.insert(0, str(REPO / "tests"))
from support import Certificates, make_certificates

TOOLS = ("hopcat", "ncat", "socat", "s_client")
NAMES = {"hopcat": "hopcat", "ncat": "ncat", "socat": "socat", "s_client": "openssl s_client"}
PEERS = TOOLS[1:]
MODES = ("up", "down", "latency")
WARMUP_BYTES = 16 * MiB
HANDSHAKE_TIMEOUT_S = 10.0
QUICK = {"size": 32 * MiB, "reps": 1, "latency_runs": 5, "speed_seconds": 1}
# What each peer needs to be a relay here, printed under its command line.
PEER_NOTES = {
    "ncat": "ncat 7.93 checks DNS names only, not IP addresses: it connects to 127.0.0.1 and "
    "checks the certificate's DNS name localhost (`--ssl-servername localhost`, also its SNI); "
    "at stdin EOF (`--send-only`) it closes without a close_notify",
    "s_client": "as a relay s_client needs `-quiet` (no session dump on stdout), `-no_ign_eof` "
    "to end an upload at stdin EOF (`-quiet` implies `-ign_eof`), `-nocommands` (else a line of "
    "data starting with Q, R or K quits, renegotiates or sends a KeyUpdate) and "
    "`-verify_return_error` (else it goes on after a failed verification)",
}
# The negotiated TLS 1.3 suite -> the EVP cipher `openssl speed` measures for the floor.
SPEED_CIPHERS = {
    "TLS_AES_256_GCM_SHA384": "aes-256-gcm",
    "TLS_AES_128_GCM_SHA256": "aes-128-gcm",
    "TLS_CHACHA20_POLY1305_SHA256": "chacha20-poly1305",
}


# --------------------------------------------------------------------------- the tools


@dataclass
class Tool:
    key: str
    argv: list[str] | None  # the program (hopcat: its resolved command); None when missing
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None

    @property
    def name(self) -> str:
        return NAMES[self.key]

    def command(self, mode: str, port: int | str, ca: str) -> list[str]:
        """The tool as a stdio relay to the TLS server, the CA as its only trust anchor and the
        server's name checked: one form per direction, as relay.py runs the plain tools."""
        assert self.argv is not None
        base, target = self.argv, [HOST, str(port)]
        if self.key == "hopcat":  # one command in every direction, as ssh would run it
            return [*base, "--tls", "--tls-ca", ca, *target]
        if self.key == "ncat":  # --ssl-servername: PEER_NOTES
            only = {"up": ["--send-only"], "down": ["--recv-only"]}.get(mode, [])
            return [*base, "--ssl", "--ssl-verify", "--ssl-trustfile", ca, "--ssl-servername",
                    "localhost", *only, *target]  # fmt: skip
        if self.key == "socat":
            tls = f"OPENSSL:{HOST}:{port},cafile={ca}"
            if mode == "up":
                return [*base, "-u", "STDIN", tls]
            return [*base, "-u", tls, "STDOUT"] if mode == "down" else [*base, "STDIO", tls]
        eof = ["-no_ign_eof"] if mode == "up" else []  # why each option: PEER_NOTES
        return [*base, "s_client", "-quiet", *eof, "-nocommands", "-verify_return_error",
                "-CAfile", ca, "-verify_ip", HOST, "-connect", f"{HOST}:{port}"]  # fmt: skip

    def version(self) -> str | None:
        if self.argv is None:
            return None
        flag = {"hopcat": ["--version"], "ncat": ["--version"], "socat": ["-V"]}
        argv = [*self.argv, *flag.get(self.key, ["version"])]
        if self.key == "socat":  # its first line is the authors
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
                return next((ln.strip() for ln in out.splitlines() if "version" in ln), None)
            return None
        return first_line(argv, {**os.environ, **self.env})


def resolve(key: str, hopcat_cmd: str | None) -> Tool:
    if key == "hopcat":
        argv, env, missing = hopcat_command(hopcat_cmd)
        return Tool(key, argv, env, missing)
    program = "openssl" if key == "s_client" else key
    path = shutil.which(program)
    return Tool(key, [path] if path else None, {}, None if path else f"{program} not installed")


# --------------------------------------------------------------------------- the TLS server


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only; with the server's preference (Python's default) every client negotiates
    the first suite of OpenSSL's list, TLS_AES_256_GCM_SHA384: the run records each one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def pattern_memfd(pattern: bytes) -> int:
    """The feeder splices from offset 0 of a ZERO_BYTES file: the same random block, repeated."""
    fd = os.memfd_create("hopcat-bench-tls", os.MFD_CLOEXEC)
    os.write(fd, pattern)
    return fd


def expected_sha256(pattern: bytes, total: int) -> str:
    h, view = hashlib.sha256(), memoryview(pattern)
    for start in range(0, total, len(pattern)):
        h.update(view[: min(len(pattern), total - start)])
    return h.hexdigest()


def close_notify(tls: ssl.SSLSocket, timeout: float) -> None:
    """Send our close_notify without waiting for the client's: unwrap() on a non-blocking socket
    stops at "want read" once ours is out."""
    tls.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            tls.unwrap()  # the client's close_notify was already in
            return
        except ssl.SSLWantReadError:
            return
        except ssl.SSLWantWriteError:
            p = select.poll()
            p.register(tls.fileno(), select.POLLOUT)
            if not p.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError("close_notify not sent: the client stopped reading") from None


def nodelay(conn: socket.socket) -> None:
    """As TLS servers do: the session tickets, a banner and a close_notify are small writes
    after others, and with Nagle on each would wait for the client's delayed ACK (40 ms)."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TLSServerEndpoint(ServerEndpoint):
    def __init__(self, name: str, lst: socket.socket, timeout: float, ctx: ssl.SSLContext):
        super().__init__(name, lst, timeout)
        self.ctx = ctx
        self.cipher: str | None = None
        self.tls_version: str | None = None

    def handshake(self) -> ssl.SSLSocket:
        conn = self.accept()
        nodelay(conn)
        tls = self.ctx.wrap_socket(
            conn, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )
        self.conn = tls  # abort() must reach the socket now that the plain one is detached
        if self._aborted:
            tls.close()
            raise RuntimeError("aborted")
        tls.do_handshake()
        cipher = tls.cipher()
        self.cipher, self.tls_version = cipher[0] if cipher else None, tls.version()
        return tls


class TLSSource(TLSServerEndpoint):
    """Download: handshake, send ``total`` bytes of the pattern, close_notify and FIN, then wait
    for the client to go (no RST)."""

    def __init__(self, lst: socket.socket, timeout: float, ctx: ssl.SSLContext, total: int,
                 pattern: bytes) -> None:  # fmt: skip
        super().__init__("TLS source", lst, timeout, ctx)
        self.total, self.pattern = total, pattern

    def work(self) -> None:
        tls = self.handshake()
        view = memoryview(self.pattern)
        while self.count < self.total:
            k = min(len(view), self.total - self.count)
            tls.sendall(view[:k])
            self.count += k
        close_notify(tls, self.accept_timeout)
        self.t_done = time.perf_counter()
        with contextlib.suppress(OSError):  # a client gone already has had every byte
            tls.shutdown(socket.SHUT_WR)  # also drops the TLS layer: what follows reads raw bytes
        self.linger(tls)


class TLSSink(TLSServerEndpoint):
    """Upload: handshake, read until the client's close_notify (then answer with ours, the TLS
    half-close a client may wait for) or its bare FIN; count, and hash when asked."""

    def __init__(self, lst: socket.socket, timeout: float, ctx: ssl.SSLContext,
                 check: bool) -> None:  # fmt: skip
        super().__init__("TLS sink", lst, timeout, ctx)
        self.hash = hashlib.sha256() if check else None
        self.ended: str | None = None

    def work(self) -> None:
        tls = self.handshake()
        buf = bytearray(IO_CHUNK)
        view, h = memoryview(buf), self.hash
        try:
            while k := tls.recv_into(buf):
                self.count += k
                if h is not None:
                    h.update(view[:k])
            self.ended = "close_notify"
        except ssl.SSLEOFError:
            self.ended = "FIN without close_notify"
        self.t_done = time.perf_counter()
        if self.ended == "close_notify":
            tls.settimeout(self.accept_timeout)
            with contextlib.suppress(OSError):
                tls.unwrap()
        tls.close()


class TLSBannerServer(BannerServer):
    """First-byte target: handshake, then the banner in one record."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__("TLS banner")
        self.ctx = ctx
        self.ciphers: collections.Counter[str] = collections.Counter()

    def greet(self, conn: socket.socket) -> None:
        nodelay(conn)
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        tls = self.ctx.wrap_socket(conn, server_side=True)
        self.keep(tls)
        tls.sendall(BANNER)
        self.ciphers[(tls.cipher() or ("?",))[0]] += 1


# --------------------------------------------------------------------------- runs


@dataclass
class Run(ToolRun):
    server_cpu: float | None = None  # the TLS source (down) / sink (up) thread
    pipe_cpu: float | None = None  # the feeder (up) / stdout reader (down) thread
    count: int | None = None  # bytes that arrived (sink / reader)
    cipher: str | None = None
    tls_version: str | None = None
    ended: str | None = None  # upload: how the client ended its stream
    sha256_ok: bool | None = None  # None: not checked (timed runs count bytes only)

    def cpu_detail(self, gib: float) -> str:
        check = {None: "", True: "  sha256 ok"}.get(self.sha256_ok, "  SHA-256 MISMATCH")
        server, pipe = (self.server_cpu or 0) / gib, (self.pipe_cpu or 0) / gib
        return f"server {server:.3f}  pipe {pipe:.3f} CPU-s/GiB  {self.cipher}{check}"


class Bench:
    def __init__(self, args: argparse.Namespace, tools: list[Tool], certs: Certificates) -> None:
        self.args, self.tools = args, tools
        self.ca = str(certs.ca)
        self.ctx = server_context(certs.cert, certs.key)
        self.pattern = os.urandom(ZERO_BYTES)
        self.pattern_fd = pattern_memfd(self.pattern)
        self.devnull_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.runs: list[Run] = []
        self.checks: list[Run] = []
        self.hung: dict[tuple[str, str], str] = {}  # (tool, mode) -> the first timeout
        self.banner: TLSBannerServer | None = None

    def close(self) -> None:
        os.close(self.pattern_fd)
        os.close(self.devnull_w)

    def throughput(self, tool: Tool, run: Run, check: bool) -> None:
        up = run.mode == "up"
        timeout = self.args.timeout
        lst = make_listener()
        run.argv = tool.command(run.mode, lst.getsockname()[1], self.ca)
        in_r, in_w = os.pipe()  # the tool's stdin; down: open until the tool has exited
        server: TLSServerEndpoint
        pipe: Endpoint
        close: tuple[int, ...]
        if up:
            server = TLSSink(lst, timeout, self.ctx, check)
            pipe = Feeder(in_w, run.nbytes, self.pattern_fd)  # owns (and closes) in_w
            stdout, close = self.devnull_w, (in_r,)
        else:
            out_r, out_w = os.pipe()
            server = TLSSource(lst, timeout, self.ctx, run.nbytes, self.pattern)
            pipe = Reader(out_r, self.devnull_w, check)  # owns out_r
            stdout, close = out_w, (in_r, out_w)
        endpoints = (server, pipe)
        with tempfile.TemporaryFile() as errf:
            errors = run_tool(run, tool.env, in_r, stdout, close, endpoints, server, timeout, errf)
            run.server_cpu, run.pipe_cpu = server.cpu, pipe.cpu
            run.cipher, run.tls_version = server.cipher, server.tls_version
            run.count = (server if up else pipe).count
            if isinstance(server, TLSSink):
                run.ended = server.ended
            if run.count != run.nbytes:
                errors.append(f"received {run.count} bytes, expected {run.nbytes}")
            if check and run.count == run.nbytes:  # else the count says it already
                got = server.hash.hexdigest() if isinstance(server, TLSSink) and server.hash else (
                    pipe.digest if isinstance(pipe, Reader) else None
                )
                run.sha256_ok = got == expected_sha256(self.pattern, run.nbytes)
                if not run.sha256_ok:
                    errors.append("SHA-256 of the received bytes differs from the sent ones")
            run.conclude(errors, errf)
        if not up:
            os.close(in_w)
        lst.close()

    def latency(self, tool: Tool, run: Run) -> None:
        assert self.banner is not None
        run.argv = tool.command("latency", self.banner.port, self.ca)
        first_byte(run, tool.env, self.banner, min(self.args.timeout, 20.0))

    def run(self, tool: Tool, mode: str, rep: int, size: int, label: str) -> Run:
        run = Run(tool.key, mode, rep, nbytes=size if mode != "latency" else len(BANNER))
        if hung := self.hung.get((tool.key, mode)):
            run.error = f"not run, an earlier run timed out ({hung})"
            return run
        if mode == "latency":
            self.latency(tool, run)
        else:
            self.throughput(tool, run, check=rep == 0)
        if run.error and run.error.startswith(("timeout", "no output within")):
            self.hung[(tool.key, mode)] = f"{label}: {run.error}"
        if mode != "latency" or not run.ok or rep in (1, 10, 20, 30):
            what = "" if mode == "latency" else f"{mode:4} "
            log(f"[{label}] {what}{tool.name:16} {run.describe()}")
        return run

    def measure(self) -> None:
        args = self.args
        thr = [m for m in args.modes if m != "latency"]
        if not args.no_warmup:  # the warm-up runs are the SHA-256 checks
            for mode in thr:
                for tool in self.tools:
                    size = min(args.size, WARMUP_BYTES)
                    self.checks.append(self.run(tool, mode, 0, size, "warm-up, SHA-256"))
        for rep in range(1, args.reps + 1 if thr else 1):
            for mode in thr:
                for tool in rotated(self.tools, rep - 1):
                    self.runs.append(self.run(tool, mode, rep, args.size, f"rep {rep}/{args.reps}"))
        if "latency" not in args.modes or not args.latency_runs:
            return
        self.banner = TLSBannerServer(self.ctx)
        self.banner.start()
        try:
            for i in [*([0] if not args.no_warmup else []), *range(1, args.latency_runs + 1)]:
                for tool in rotated(self.tools, max(i - 1, 0)):
                    run = self.run(tool, "latency", i, 0, f"latency {i}/{args.latency_runs}")
                    if i:
                        self.runs.append(run)
        finally:
            self.banner.close()


# --------------------------------------------------------------------------- the floor


def openssl_speed(cipher: str, seconds: int, decrypt: bool) -> tuple[list[str], float | None]:
    """(argv, bytes/s) of ``openssl speed -evp CIPHER`` on 16 KiB blocks (one TLS record)."""
    argv = ["openssl", "speed", "-evp", cipher, "-bytes", "16384", "-seconds", str(seconds), "-mr"]
    if decrypt:
        argv.insert(2, "-decrypt")
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 10 + 10)
        for ln in out.stdout.splitlines():
            if ln.startswith("+F:"):
                return argv, float(ln.split(":")[-1])
    return argv, None


def floor(cipher: str | None, seconds: int) -> dict[str, Any]:
    """CPU-s per GiB of the cipher alone, one direction: the client encrypts an upload and
    decrypts a download."""
    evp = SPEED_CIPHERS.get(cipher or "")
    if evp is None:
        return {"error": f"no openssl speed cipher for {cipher}"}
    out: dict[str, Any] = {"cipher": evp}
    for mode, decrypt in (("up", False), ("down", True)):
        argv, rate = openssl_speed(evp, seconds, decrypt)
        out[f"{mode}_argv"] = argv
        if rate:
            out[f"{mode}_mb_s"], out[f"{mode}_cpu_gib"] = rate / MB, GiB / rate
    return out


# --------------------------------------------------------------------------- summary, report


def summarize(runs: list[Run], tools: list[Tool], modes: list[str]) -> dict[str, dict[str, Any]]:
    """"tool/mode" -> medians over the passing runs (and counts, the first error)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        for mode in modes:
            rs = [r for r in runs if (r.tool, r.mode) == (tool.key, mode)]
            if not rs:
                continue
            good = [r for r in rs if r.ok]
            s: dict[str, Any] = {"runs": len(rs), "ok": len(good)}
            if errs := [r.error for r in rs if r.error]:
                s["first_error"] = errs[0]
            out[f"{tool.key}/{mode}"] = s
            if not good:
                continue
            if mode == "latency":
                ms = [(r.wall or 0) * 1e3 for r in good]
                s.update(median_ms=median(ms), p90_ms=p90(ms), min_ms=min(ms), max_ms=max(ms))
                continue
            gib = good[0].nbytes / GiB
            rates = [r.nbytes / (r.wall or 1) / MB for r in good]

            def med(attr: str, per_wall: bool, good: list[Run] = good, gib: float = gib) -> float:
                return median(
                    [(getattr(r, attr) or 0) / ((r.wall or 1) if per_wall else gib) for r in good]
                )

            s.update(
                mb_s=median(rates), mb_s_min=min(rates), mb_s_max=max(rates),
                wall_s=median([r.wall or 0 for r in good]),
                tool_user_gib=med("tool_user", False), tool_sys_gib=med("tool_sys", False),
                ciphers=sorted({f"{r.tls_version} {r.cipher}" for r in good}),
            )  # fmt: skip
            for who in ("tool_cpu", "server_cpu", "pipe_cpu"):
                s[f"{who}_gib"], s[f"{who}_core"] = med(who, False), med(who, True)
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table_rows(summary: dict[str, dict[str, Any]], cells: list[tuple[Tool, str]], keys: int,
               width: int, measured: str, failures: list[str],
               row: Callable[[str, dict[str, Any]], list[str]]) -> list[list[str]]:  # fmt: skip
    """A report table's rows: the first ``keys`` of (tool, mode), ``row``'s cells (FAIL where no
    run passed) up to ``width``, the ok count; each first error goes to ``failures``."""
    rows = []
    for t, mode in cells:
        s = summary.get(f"{t.key}/{mode}")
        if s is None:
            continue
        if err := s.get("first_error"):
            failures.append(f"- {t.name} {mode}: {err}")
        lead = [t.name, mode][:keys]
        body = row(mode, s) if measured in s else ["FAIL", *[""] * (width - keys - 1)]
        rows.append([*lead, *body, f"{s['ok']}/{s['runs']}"])
    return rows


def report(args: argparse.Namespace, meta: dict[str, Any], tools: list[Tool],
           skipped: list[Tool], bench: Bench, summary: dict[str, dict[str, Any]],
           fl: dict[str, Any]) -> str:  # fmt: skip
    out = ["# hopcat TLS relay benchmark", "", f"- command: `{meta['command']}`", machine_line(meta)]
    out.append(
        f"- size={human_size(args.size)} per run, reps={args.reps}, latency runs="
        f"{args.latency_runs}, timeout={args.timeout:.0f}s; server: Python {meta['python']} ssl "
        f"({ssl.OPENSSL_VERSION}) in a thread of this process, TLS 1.3 only, ECDSA P-256 "
        "certificate for IP:127.0.0.1 signed by a throwaway CA (the clients' only trust anchor)"
    )
    ciphers = collections.Counter(f"{r.tls_version} {r.cipher}" for r in bench.runs + bench.checks
                                  if r.cipher)  # fmt: skip
    if bench.banner is not None:
        ciphers.update(f"TLSv1.3 {c}" for c in bench.banner.ciphers)
    out.append("- negotiated: " + (", ".join(f"{c} ({n} runs)" for c, n in ciphers.items())
                                   or "nothing"))  # fmt: skip
    for t in tools:
        version = meta["versions"].get(t.name)
        cmds = sorted({shlex.join(t.command(m, "PORT", "CA")) for m in args.modes}, key=len)
        out.append(
            f"- {t.name}: " + " / ".join(f"`{c}`" for c in cmds)
            + (f" (env {t.env})" if t.env else "") + (f" — {version}" if version else "")
        )  # fmt: skip
        if note := PEER_NOTES.get(t.key):
            out.append(f"  - {note}")
    out += [f"- SKIPPED {t.name}: {t.missing}" for t in skipped]
    out += ["", "## Throughput (medians)", ""]
    out.append(
        "server = the TLS source (down) / sink (up) thread; pipe = the feeder writing the tool's "
        "stdin (up) / the reader draining its stdout (down). CPU-s/GiB = (user+sys) CPU seconds "
        "per GiB relayed; (%) = share of one core over the wall time. vs floor = the tool's "
        "CPU-s/GiB over the cipher's alone (openssl speed, below)."
    )
    out.append("")
    headers = ["tool", "dir", "MB/s", "MB/s min-max", "wall s", "tool CPU-s/GiB (%core)",
               "tool usr/sys", "vs floor", "server CPU-s/GiB (%core)", "pipe CPU-s/GiB (%core)",
               "ok"]  # fmt: skip
    failures: list[str] = []
    thr = [m for m in args.modes if m != "latency"]
    rows = table_rows(summary, [(t, m) for m in thr for t in tools], 2, 10, "mb_s", failures,
                      lambda mode, s: [
                f"{s['mb_s']:.0f}", f"{s['mb_s_min']:.0f}-{s['mb_s_max']:.0f}",
                f"{s['wall_s']:.3f}", f"{s['tool_cpu_gib']:.3f} ({pct(s['tool_cpu_core'])})",
                f"{s['tool_user_gib']:.2f}/{s['tool_sys_gib']:.2f}",
                ratio(s["tool_cpu_gib"], fl.get(f"{mode}_cpu_gib")),
                f"{s['server_cpu_gib']:.3f} ({pct(s['server_cpu_core'])})",
                f"{s['pipe_cpu_gib']:.3f} ({pct(s['pipe_cpu_core'])})",
            ])  # fmt: skip
    if rows:
        out += [md_table(headers, rows, {2, 3, 4, 5, 6, 7, 8, 9}), ""]
    if "latency" in args.modes:
        out += ["## Spawn to first byte (the server sends a banner right after the handshake)",
                ""]  # fmt: skip
        rows = table_rows(summary, [(t, "latency") for t in tools], 1, 4, "median_ms", failures,
                          lambda mode, s: [f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}",
                                           f"{s['min_ms']:.2f}-{s['max_ms']:.2f}"])  # fmt: skip
        out += [md_table(["tool", "first byte median ms", "p90 ms", "min-max ms", "ok"], rows,
                         {1, 2, 3}), ""]  # fmt: skip
    out += ["## The floor: the cipher alone (openssl speed, one core, 16 KiB blocks)", ""]
    if "error" in fl:
        out += [f"- not measured: {fl['error']}", ""]
    else:
        for mode, what in (("up", "encrypt (the client's work on an upload)"),
                           ("down", "decrypt (on a download)")):  # fmt: skip
            if f"{mode}_cpu_gib" not in fl:
                out.append(f"- {what}: `{shlex.join(fl[f'{mode}_argv'])}` gave no figure")
                continue
            h = summary.get(f"hopcat/{mode}", {})
            hop = (f"; hopcat's {mode}: {h['tool_cpu_gib']:.3f} CPU-s/GiB = "
                   f"{ratio(h['tool_cpu_gib'], fl[f'{mode}_cpu_gib'])} the floor"
                   if "tool_cpu_gib" in h else "")  # fmt: skip
            out.append(
                f"- {what}: `{shlex.join(fl[f'{mode}_argv'])}`: {fl[f'{mode}_mb_s']:.0f} MB/s "
                f"= {fl[f'{mode}_cpu_gib']:.3f} CPU-s/GiB{hop}"
            )
        out.append("")
    out += ratio_lines(args, tools, summary)
    if bench.checks:
        out += ["## Content check (the warm-up runs: SHA-256 at both ends)", ""]
        rows = []
        for r in bench.checks:
            sha = {None: "-", True: "ok"}.get(r.sha256_ok, "MISMATCH")
            rows.append([NAMES[r.tool], r.mode, human_size(r.nbytes), str(r.count), sha,
                         r.ended or "-", "ok" if r.ok else "FAIL"])  # fmt: skip
            if not r.ok:
                failures.append(f"- {NAMES[r.tool]} {r.mode} (check run): {r.error}")
        out += [md_table(["tool", "dir", "size", "bytes received", "SHA-256",
                          "the client ended its upload with", "ok"], rows, {2, 3}), ""]  # fmt: skip
    elif thr:
        out += ["- content check: skipped (--no-warmup); the timed runs count bytes only", ""]
    if failures:
        out += ["## Failures", "", *failures, ""]
    return "\n".join(out)


def ratio_lines(args: argparse.Namespace, tools: list[Tool],
                summary: dict[str, dict[str, Any]]) -> list[str]:  # fmt: skip
    """hopcat's medians as multiples of each peer's, and the issue's throughput target."""
    if not any(t.key == "hopcat" for t in tools):
        return []
    lines, ahead = [], []
    thr = [m for m in args.modes if m != "latency"]
    for peer in (t for t in tools if t.key != "hopcat"):
        parts = []
        for mode in thr:
            h, p = summary.get(f"hopcat/{mode}", {}), summary.get(f"{peer.key}/{mode}", {})
            if "mb_s" in h and "mb_s" in p:
                parts.append(f"{mode}: throughput {ratio(h['mb_s'], p['mb_s'])}, CPU/GiB "
                             f"{ratio(h['tool_cpu_gib'], p['tool_cpu_gib'])}")  # fmt: skip
                ahead.append(h["mb_s"] >= p["mb_s"])
        h, p = summary.get("hopcat/latency", {}), summary.get(f"{peer.key}/latency", {})
        if "median_ms" in h and "median_ms" in p:
            parts.append(f"first byte {ratio(h['median_ms'], p['median_ms'])}")
        if parts:
            lines.append(f"- hopcat vs {peer.name}: " + "; ".join(parts))
    if not lines:
        return []
    target = ("met" if all(ahead) else "NOT met") if ahead else "not measured"
    return [
        "## hopcat vs each peer (medians; >1 throughput = faster, >1 CPU/latency = costlier)",
        "",
        *lines,
        f"- target \"ahead of every peer on throughput\" (both directions): {target}",
        "",
    ]


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = arg_parser((__doc__ or "").split("\n\n")[0], reps=5)
    ap.add_argument("--latency-runs", type=int, default=30,
                    help="first-byte runs per tool (default 30)")  # fmt: skip
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    ap.add_argument("--only", default=",".join(MODES), help="comma list of up,down,latency")
    ap.add_argument("--timeout", type=float, help="per-run timeout in s (default 30 + size/20MB/s)")
    ap.add_argument("--speed-seconds", type=int, default=3,
                    help="seconds per openssl speed run for the floor (default 3)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="a check that it works, not a measurement: --size 32M --reps 1 "
                    "--latency-runs 5 --speed-seconds 1 (under ~20 s)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.timeout is None:
        args.timeout = 30 + args.size / 20e6
    args.modes = [m for m in MODES if m in args.only.split(",")]
    args.tool_keys = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [x for x in args.only.split(",") if x not in MODES]
    bad += [t for t in args.tool_keys if t not in TOOLS]
    if bad or not args.modes or not args.tool_keys:
        ap.error(f"unknown or missing: {', '.join(bad) or '--only/--tools'}; "
                 f"--tools from {','.join(TOOLS)}, --only from {','.join(MODES)}")  # fmt: skip
    if args.reps < 1 or args.latency_runs < 0 or args.size < 1 or args.speed_seconds < 1:
        ap.error("--reps, --size and --speed-seconds must be >= 1, --latency-runs >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("openssl") is None:
        log("cannot run: the openssl program makes the certificates (apt-get install openssl)")
        return 2
    resolved = [resolve(k, args.hopcat) for k in dict.fromkeys(args.tool_keys)]
    tools = [t for t in resolved if t.argv is not None]
    skipped = [t for t in resolved if t.argv is None]
    for t in skipped:
        log(f"skipping {t.name}: {t.missing}")
    meta = machine_meta()
    meta.update(size=args.size, reps=args.reps, latency_runs=args.latency_runs,
                timeout=args.timeout, openssl=ssl.OPENSSL_VERSION,
                versions={t.name: t.version() for t in tools})  # fmt: skip
    bench = None
    with stop_on_signals(), tempfile.TemporaryDirectory(prefix="hopcat-bench-tls-") as tmp:
        bench = Bench(args, tools, make_certificates(Path(tmp)))
        try:
            bench.measure()
        except KeyboardInterrupt as e:
            log(f"interrupted ({e or 'SIGINT'}): reporting what was measured")
        finally:
            reap_all()
            bench.close()
    summary = summarize(bench.runs, tools, args.modes)
    negotiated = collections.Counter(r.cipher for r in bench.runs + bench.checks if r.cipher)
    if bench.banner is not None:
        negotiated.update(bench.banner.ciphers)
    cipher = negotiated.most_common(1)[0][0] if negotiated else "TLS_AES_256_GCM_SHA384"
    log(f"the floor: openssl speed for {cipher} ...")
    fl = floor(cipher, args.speed_seconds)
    print(report(args, meta, tools, skipped, bench, summary, fl))
    write_json(args.json, {
        "meta": meta, "skipped": {t.name: t.missing for t in skipped}, "floor": fl,
        "summary": summary,
        "checks": [dict(asdict(r), tool_cpu=r.tool_cpu) for r in bench.checks],
        "runs": [dict(asdict(r), tool_cpu=r.tool_cpu) for r in bench.runs],
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
