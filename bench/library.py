#!/usr/bin/env python3
"""Library benchmark: hopcat's API against python-socks and PySocks, all through one Dante.

Usage (an interpreter that has python-socks and PySocks, e.g. the project's venv; hopcat itself
is imported from <repo>/src):

    .venv/bin/python bench/library.py           # full: 5 reps, 40 opens, 2000 x 100 tunnels, 256 MiB
    .venv/bin/python bench/library.py --reps 1 --latency-runs 5 --tunnels 200 --size 8M   # smoke
    .venv/bin/python bench/library.py --only tps --libs hopcat-aio,python-socks-aio --ratios

Libraries (``--libs``): ``hopcat`` (hopcat.create_connection), ``python-socks``
(python_socks.sync.Proxy.connect), ``pysocks`` (socks.socksocket + set_proxy), ``hopcat-aio``
(hopcat.aio.connect_socket), ``python-socks-aio`` (python_socks.async_.asyncio.Proxy.connect).
Every open names the target by address through ``socks5h://`` (``socks5://`` for python-socks,
whose socks5 already leaves names to the proxy), with a 30 s timeout, and reuses one proxy
object per run where the library has one.

Measurements (``--only``, default all), each repetition running every library once, the
starting library rotating between repetitions:

latency  ``--latency-runs`` opens one after another (all libraries): ms from the call until it
         returned a socket (open), and until the target's first banner byte was read (first
         byte); median and p90 (nearest rank) over all repetitions; the benchmark thread's CPU
         per open. The target sends its banner and closes; the client reads to the end.
tps      ``--tunnels`` tunnels, ``--concurrency`` at once on one asyncio loop (the asyncio
         libraries): open, read the banner to the end, close; tunnels per second and the loop
         thread's CPU per tunnel. The banner targets are serve.py's (a separate process on 32
         ports that closes first, so no side runs out of ephemeral ports).
bulk     ``--size`` bytes down (a source sendfiles zeros, then half-closes) and up (a sink
         discards with MSG_TRUNC until EOF) through the socket each library returned, used as a
         caller would: ``recv(256 KiB)`` / ``sendall(1 MiB)`` for the sockets of the blocking
         libraries, an asyncio stream (``asyncio.open_connection(sock=...)``) for the others.
         MB/s (10^6 B/s) from the first byte moved to the last one arriving, the client's CPU
         and Dante's (process group, /proc) per GiB.

``--ratios`` adds hopcat's figures as multiples of each other library's: hopcat against
python-socks and PySocks, hopcat.aio against python-socks asyncio.

Dante is started fresh on a free port (bench/harness/daemons.py, the integration tests' config)
and stopped at the end. Progress goes to stderr, the Markdown report to stdout. On a shared
machine the numbers are noisy: compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import daemons
from harness.common import (
    BENCH,
    HOST,
    GiB,
    MiB,
    human_size,
    log,
    machine_line,
    machine_meta,
    md_table,
    median,
    p90,
    parse_size,
    rotated,
    stop_on_signals,
    write_json,
)
from harness.endpoints import Sink, Source, make_listener, zero_memfd
from harness.procs import thread_cpu
from serve import BannerTarget

sys.path.insert(0, str(BENCH.parent / "src"))

OPEN_TIMEOUT_S = 30.0
RECV_BYTES = 256 * 1024  # what a caller passes to recv() / StreamReader.read()
SEND_CHUNK = bytes(MiB)  # what a caller passes to sendall() / write()
RUN_TIMEOUT_S = 120.0  # a bulk endpoint waits this long for its connection
WARMUP_OPENS = 3
ALL_MEASUREMENTS = ("latency", "tps", "bulk")

SyncOpen = Callable[[str, int], socket.socket]
AsyncOpen = Callable[[str, int], Awaitable[socket.socket]]


# --------------------------------------------------------------------------- the libraries


@dataclass(frozen=True)
class Library:
    key: str
    title: str
    distribution: str  # for its version
    is_async: bool
    # (proxy port) -> an opener; an async library's factory runs inside the event loop
    opener: Callable[[int], Any]
    compare_with: str | None = None  # the hopcat API it is compared with (--ratios)


def hopcat_opener(proxy_port: int) -> SyncOpen:
    import hopcat

    proxy = hopcat.Proxy.from_url(f"socks5h://{HOST}:{proxy_port}")
    return lambda host, port: hopcat.create_connection((host, port), OPEN_TIMEOUT_S, via=proxy)


def python_socks_opener(proxy_port: int) -> SyncOpen:
    from python_socks.sync import Proxy

    proxy = Proxy.from_url(f"socks5://{HOST}:{proxy_port}")
    return lambda host, port: proxy.connect(host, port, timeout=OPEN_TIMEOUT_S)


def pysocks_opener(proxy_port: int) -> SyncOpen:
    import socks

    def connect(host: str, port: int) -> socket.socket:
        sock = socks.socksocket()
        try:
            sock.set_proxy(socks.SOCKS5, HOST, proxy_port, rdns=True)
            sock.settimeout(OPEN_TIMEOUT_S)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def hopcat_aio_opener(proxy_port: int) -> AsyncOpen:
    import hopcat
    import hopcat.aio

    proxy = hopcat.Proxy.from_url(f"socks5h://{HOST}:{proxy_port}")
    return lambda host, port: hopcat.aio.connect_socket(
        host, port, via=proxy, timeout=OPEN_TIMEOUT_S
    )


def python_socks_aio_opener(proxy_port: int) -> AsyncOpen:
    from python_socks.async_.asyncio import Proxy

    proxy = Proxy.from_url(f"socks5://{HOST}:{proxy_port}")
    return lambda host, port: proxy.connect(host, port, timeout=OPEN_TIMEOUT_S)


LIBRARIES = {
    lib.key: lib
    for lib in (
        Library("hopcat", "hopcat", "hopcat", False, hopcat_opener),
        Library("python-socks", "python-socks", "python-socks", False, python_socks_opener,
                compare_with="hopcat"),
        Library("pysocks", "PySocks", "PySocks", False, pysocks_opener, compare_with="hopcat"),
        Library("hopcat-aio", "hopcat.aio", "hopcat", True, hopcat_aio_opener),
        Library("python-socks-aio", "python-socks asyncio", "python-socks", True,
                python_socks_aio_opener, compare_with="hopcat-aio"),
    )
}  # fmt: skip


def version(lib: Library) -> str:
    if lib.distribution == "hopcat":
        import hopcat

        return hopcat.__version__
    return metadata.version(lib.distribution)


def missing(lib: Library) -> str | None:
    """Why ``lib`` cannot run here, or None."""
    module = {"python-socks": "python_socks", "PySocks": "socks", "hopcat": "hopcat"}
    try:
        __import__(module[lib.distribution])
    except ImportError as exc:
        return f"{lib.title}: {exc}"
    return None


# --------------------------------------------------------------------------- latency


def read_to_end(sock: socket.socket) -> int:
    """Read the banner to the target's close; the byte count."""
    count = 0
    while chunk := sock.recv(4096):
        count += len(chunk)
    return count


async def read_to_end_async(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> int:
    count = 0
    while chunk := await loop.sock_recv(sock, 4096):
        count += len(chunk)
    return count


def measure_latency(lib: Library, proxy_port: int, ports: list[int], runs: int) -> dict[str, Any]:
    """``runs`` opens one after another: open ms, first-byte ms, CPU ms per open."""
    opens: list[float] = []
    firsts: list[float] = []
    failures: list[str] = []

    def one_sync(open_tunnel: SyncOpen, port: int) -> None:
        started = time.perf_counter()
        sock = open_tunnel(HOST, port)
        with sock:
            opened = time.perf_counter()
            if not sock.recv(1):
                raise ConnectionError("no banner")
            first = time.perf_counter()
            read_to_end(sock)
        opens.append((opened - started) * 1000)
        firsts.append((first - started) * 1000)

    async def one_async(open_tunnel: AsyncOpen, port: int) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        sock = await open_tunnel(HOST, port)
        with sock:
            opened = time.perf_counter()
            if not await loop.sock_recv(sock, 1):
                raise ConnectionError("no banner")
            first = time.perf_counter()
            await read_to_end_async(loop, sock)
        opens.append((opened - started) * 1000)
        firsts.append((first - started) * 1000)

    cpu0 = thread_cpu()
    if lib.is_async:

        async def all_runs() -> None:
            open_tunnel = lib.opener(proxy_port)
            for index in range(runs):
                try:
                    await one_async(open_tunnel, ports[index % len(ports)])
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        asyncio.run(all_runs())
    else:
        open_tunnel = lib.opener(proxy_port)
        for index in range(runs):
            try:
                one_sync(open_tunnel, ports[index % len(ports)])
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    cpu = thread_cpu() - cpu0
    return {
        "open_ms": opens,
        "first_ms": firsts,
        "cpu_ms_per_open": cpu / max(1, runs) * 1000,
        "failures": failures,
    }


# --------------------------------------------------------------------------- tunnels per second


def measure_tps(
    lib: Library, proxy_port: int, ports: list[int], tunnels: int, concurrency: int
) -> dict[str, Any]:
    """``tunnels`` tunnels, ``concurrency`` at a time on one loop: open, read to end, close."""
    failures: list[str] = []

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        open_tunnel = lib.opener(proxy_port)
        numbers = iter(range(tunnels))

        async def worker() -> None:
            for index in numbers:
                try:
                    sock = await open_tunnel(HOST, ports[index % len(ports)])
                    with sock:
                        if not await read_to_end_async(loop, sock):
                            raise ConnectionError("no banner")
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        cpu0 = thread_cpu()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, thread_cpu() - cpu0

    elapsed, cpu = asyncio.run(run())
    done = tunnels - len(failures)
    return {
        "tps": done / elapsed,
        "cpu_ms_per_tunnel": cpu / max(1, done) * 1000,
        "failures": failures,
    }


# --------------------------------------------------------------------------- bulk


def _download_sync(sock: socket.socket, size: int) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    while chunk := sock.recv(RECV_BYTES):
        count += len(chunk)
    return count, started


def _upload_sync(sock: socket.socket, size: int) -> float:
    chunk = memoryview(SEND_CHUNK)
    started = time.perf_counter()
    left = size
    while left:
        part = chunk[: min(left, len(chunk))]
        sock.sendall(part)
        left -= len(part)
    sock.shutdown(socket.SHUT_WR)
    return started


async def _bulk_async(
    open_tunnel: AsyncOpen, port: int, direction: str, size: int, sink: Sink | None
) -> tuple[int, float, float]:
    """(bytes counted by the client, start, end) through an asyncio stream on the socket."""
    sock = await open_tunnel(HOST, port)
    reader, writer = await asyncio.open_connection(sock=sock, limit=RECV_BYTES)
    try:
        started = time.perf_counter()
        count = 0
        if direction == "down":
            while chunk := await reader.read(RECV_BYTES):
                count += len(chunk)
            return count, started, time.perf_counter()
        left = size
        while left:
            part = SEND_CHUNK[: min(left, len(SEND_CHUNK))]
            writer.write(part)
            await writer.drain()
            left -= len(part)
        writer.write_eof()
        assert sink is not None
        await asyncio.get_running_loop().run_in_executor(None, sink.join, RUN_TIMEOUT_S)
        return size, started, sink.t_done or time.perf_counter()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def measure_bulk(
    lib: Library, daemon: daemons.Daemon, zeros: int, direction: str, size: int
) -> dict[str, Any]:
    listener = make_listener()
    port = listener.getsockname()[1]
    endpoint: Sink | Source = (
        Source(listener, RUN_TIMEOUT_S, size, zeros) if direction == "down"
        else Sink(listener, RUN_TIMEOUT_S)
    )  # fmt: skip
    endpoint.start()
    try:
        dante0, cpu0 = daemon.cpu(), thread_cpu()
        if lib.is_async:

            async def run() -> tuple[int, float, float]:
                sink = endpoint if isinstance(endpoint, Sink) else None
                return await _bulk_async(lib.opener(daemon.port), port, direction, size, sink)

            count, started, ended = asyncio.run(run())
        else:
            with lib.opener(daemon.port)(HOST, port) as sock:
                if direction == "down":
                    count, started = _download_sync(sock, size)
                    ended = time.perf_counter()
                else:
                    started = _upload_sync(sock, size)
                    endpoint.join(RUN_TIMEOUT_S)
                    count, ended = size, endpoint.t_done or time.perf_counter()
        cpu, dante = thread_cpu() - cpu0, daemon.cpu() - dante0
        endpoint.join(RUN_TIMEOUT_S)
    finally:
        endpoint.abort()
        listener.close()
    arrived = count if direction == "down" else endpoint.count
    if endpoint.error or arrived != size:
        raise RuntimeError(f"{direction}: {arrived} of {size} bytes; {endpoint.error or ''}")
    return {
        "mbps": size / (ended - started) / 1e6,
        "cpu_per_gib": cpu / (size / GiB),
        "dante_per_gib": dante / (size / GiB),
    }


# --------------------------------------------------------------------------- driver


def run_all(args: argparse.Namespace, libs: list[Library]) -> dict[str, Any]:
    only = set(args.only.split(","))
    results: dict[str, dict[str, list[Any]]] = {lib.key: {} for lib in libs}
    failures: list[str] = []

    def keep(lib: Library, key: str, value: Any) -> None:
        results[lib.key].setdefault(key, []).append(value)

    zeros = zero_memfd()
    with tempfile.TemporaryDirectory(prefix="hopcat-bench-library-") as tmp:
        work = Path(tmp)
        daemon = daemons.start("dante", work / "dante")
        banner = BannerTarget(work)
        try:
            if not args.no_warmup:
                for lib in libs:
                    log(f"warm-up: {lib.title}")
                    measure_latency(lib, daemon.port, banner.ports, WARMUP_OPENS)
            for rep in range(args.reps):
                for lib in rotated(libs, rep):
                    try:
                        if "latency" in only:
                            log(f"rep {rep + 1} {lib.title}: {args.latency_runs} opens")
                            lat = measure_latency(lib, daemon.port, banner.ports, args.latency_runs)
                            for key in ("open_ms", "first_ms"):
                                results[lib.key].setdefault(key, []).extend(lat[key])
                            keep(lib, "cpu_ms_per_open", lat["cpu_ms_per_open"])
                            failures += [f"{lib.title} latency: {f}" for f in lat["failures"]]
                        if "tps" in only and lib.is_async:
                            log(f"rep {rep + 1} {lib.title}: {args.tunnels} tunnels, "
                                f"{args.concurrency} at once")  # fmt: skip
                            tps = measure_tps(
                                lib, daemon.port, banner.ports, args.tunnels, args.concurrency
                            )
                            keep(lib, "tps", tps["tps"])
                            keep(lib, "cpu_ms_per_tunnel", tps["cpu_ms_per_tunnel"])
                            if tps["failures"]:
                                failures.append(
                                    f"{lib.title} tps: {len(tps['failures'])} of {args.tunnels} "
                                    f"failed, first: {tps['failures'][0]}"
                                )
                        if "bulk" in only:
                            for direction in ("down", "up"):
                                log(f"rep {rep + 1} {lib.title}: {direction} "
                                    f"{human_size(args.size)}")  # fmt: skip
                                bulk = measure_bulk(lib, daemon, zeros, direction, args.size)
                                for key, value in bulk.items():
                                    keep(lib, f"{direction}_{key}", value)
                    except Exception as exc:
                        failures.append(f"rep {rep + 1} {lib.title}: {type(exc).__name__}: {exc}")
                        log(f"FAILED: {failures[-1]}")
        finally:
            banner.close()
            left = daemon.stop()
            if left:
                failures.append(f"Dante LEFT RUNNING: {left}")
    return {"results": results, "failures": failures}


def _cell(values: list[float] | None, fmt: str = "{:.2f}") -> str:
    return fmt.format(median(values)) if values else "-"


def _ratio(mine: list[float] | None, theirs: list[float] | None) -> str:
    if not mine or not theirs or not median(theirs):
        return "-"
    return f"{median(mine) / median(theirs):.2f}x"


def report(
    args: argparse.Namespace, libs: list[Library], run: dict[str, Any], meta: dict[str, Any]
) -> str:
    results = run["results"]
    lines = [
        "# hopcat library benchmark (through Dante)",
        "",
        f"- command: `{meta['command']}`",
        machine_line(meta),
        f"- {args.reps} rep(s), interleaved; libraries: "
        + ", ".join(f"{lib.title} {version(lib)}" for lib in libs),
        f"- Dante {daemons.version('dante') or '?'}",
    ]
    only = set(args.only.split(","))
    if "latency" in only:
        rows = []
        for lib in libs:
            r = results[lib.key]
            opens, firsts = r.get("open_ms"), r.get("first_ms")
            rows.append([
                lib.title,
                _cell(opens), f"{p90(opens):.2f}" if opens else "-",
                _cell(firsts), f"{p90(firsts):.2f}" if firsts else "-",
                _cell(r.get("cpu_ms_per_open")), str(len(opens or [])),
            ])  # fmt: skip
        lines += [
            "",
            f"## Connect latency ({args.latency_runs} opens per rep, one after another)",
            "",
            "open = the call until it returned a socket; first byte = until the target's banner "
            "byte was read; ms, median and p90; CPU = the benchmark thread's per open.",
            "",
            md_table(
                ["library", "open ms", "p90", "first byte ms", "p90", "CPU ms/open", "runs"],
                rows, set(range(1, 7)),
            ),
        ]  # fmt: skip
    async_libs = [lib for lib in libs if lib.is_async]
    if "tps" in only and async_libs:
        rows = []
        for lib in async_libs:
            r = results[lib.key]
            tps = r.get("tps")
            spread = f"{min(tps):.0f}-{max(tps):.0f}" if tps else "-"
            rows.append([lib.title, _cell(tps, "{:.0f}"), spread,
                         _cell(r.get("cpu_ms_per_tunnel"))])  # fmt: skip
        lines += [
            "",
            f"## Tunnels per second ({args.tunnels} tunnels, {args.concurrency} at once, "
            "one asyncio loop)",
            "",
            "Each tunnel: open, read the banner to the target's close, close. CPU = the loop "
            "thread's per tunnel.",
            "",
            md_table(["library", "tunnels/s", "min-max", "CPU ms/tunnel"], rows, {1, 2, 3}),
        ]
    if "bulk" in only:
        rows = []
        for lib in libs:
            r = results[lib.key]
            rows.append([lib.title] + [
                _cell(r.get(f"{d}_{key}"), fmt)
                for d in ("down", "up")
                for key, fmt in (("mbps", "{:.0f}"), ("cpu_per_gib", "{:.2f}"),
                                 ("dante_per_gib", "{:.2f}"))
            ])  # fmt: skip
        lines += [
            "",
            f"## Bulk through the returned socket ({human_size(args.size)} each way)",
            "",
            "MB/s = 10^6 B/s, median; client CPU = the benchmark thread's, Dante's = its process "
            "group's, both in CPU-s per GiB.",
            "",
            md_table(
                ["library", "down MB/s", "client CPU", "Dante CPU", "up MB/s", "client CPU",
                 "Dante CPU"],
                rows, set(range(1, 7)),
            ),
        ]  # fmt: skip
    if args.ratios:
        rows = []
        for lib in libs:
            mine = results.get(lib.compare_with or "")
            if mine is None:
                continue
            theirs = results[lib.key]
            rows.append([
                f"{LIBRARIES[lib.compare_with or ''].title} / {lib.title}",
                _ratio(mine.get("open_ms"), theirs.get("open_ms")),
                _ratio(mine.get("first_ms"), theirs.get("first_ms")),
                _ratio(mine.get("tps"), theirs.get("tps")),
                _ratio(mine.get("down_mbps"), theirs.get("down_mbps")),
                _ratio(mine.get("up_mbps"), theirs.get("up_mbps")),
            ])  # fmt: skip
        lines += [
            "",
            "## hopcat as a multiple of each other library (median / median)",
            "",
            "Below 1.00x is better for the latencies, above 1.00x for tunnels/s and MB/s.",
            "",
            md_table(
                ["", "open ms", "first byte ms", "tunnels/s", "down MB/s", "up MB/s"],
                rows,
                set(range(1, 6)),
            ),
        ]
    if run["failures"]:
        lines += ["", "## Failures", "", *(f"- {f}" for f in run["failures"])]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--libs", default=",".join(LIBRARIES), help="default: all five")
    parser.add_argument("--only", default=",".join(ALL_MEASUREMENTS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--latency-runs", type=int, default=40, help="opens per rep (40)")
    parser.add_argument("--tunnels", type=int, default=2000, help="tunnels per rep (2000)")
    parser.add_argument("--concurrency", type=int, default=100, help="tunnels at once (100)")
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="bulk bytes (256M)")
    parser.add_argument("--ratios", action="store_true", help="hopcat vs each other library")
    parser.add_argument("--no-warmup", action="store_true", help=f"skip {WARMUP_OPENS} opens each")
    parser.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    args = parser.parse_args()
    for name in args.libs.split(","):
        if name not in LIBRARIES:
            parser.error(f"unknown library {name!r} (choose from {', '.join(LIBRARIES)})")
    for name in args.only.split(","):
        if name not in ALL_MEASUREMENTS:
            parser.error(
                f"unknown measurement {name!r} (choose from {', '.join(ALL_MEASUREMENTS)})"
            )
    return args


def main() -> int:
    args = parse_args()
    libs = []
    for name in args.libs.split(","):
        lib = LIBRARIES[name]
        if why := missing(lib):
            log(f"skipping {why}")
        else:
            libs.append(lib)
    meta = machine_meta()
    with stop_on_signals():
        run = run_all(args, libs)
    print(report(args, libs, run, meta))
    write_json(args.json, {"args": vars(args), "meta": meta, **run})
    return 1 if run["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
