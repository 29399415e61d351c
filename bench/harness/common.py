"""Small shared pieces: sizes, statistics, interleaving, Markdown tables, machine facts, output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
HOST = "127.0.0.1"
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6  # throughput is reported in 10^6 bytes per second
T = TypeVar("T")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4KiB``, ``123``: K/M/G/T are binary."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
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
    return s[max(0, min(len(s) - 1, -(-9 * len(s) // 10) - 1))]  # nearest rank


def pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def rotated(seq: Sequence[T], i: int) -> list[T]:
    """seq starting at its i-th element (wrapping): repetition i of an interleaved run, so that no
    candidate always goes first."""
    k = i % len(seq) if seq else 0
    return [*seq[k:], *seq[:k]]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A Markdown table with padded cells; the columns in ``right`` are right-aligned."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    sep = "|".join(
        "-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(headers), f"|{sep}|", *(line(r) for r in rows)])


def arg_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options every throughput benchmark has: --size, --reps, --hopcat, --json, --no-warmup."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size",
        type=parse_size,
        default=GiB,
        help="bytes per throughput run; K/M/G suffixes are binary (default 1G)",
    )
    ap.add_argument(
        "--reps", type=int, default=reps, help=f"interleaved repetitions (default {reps})"
    )
    ap.add_argument(
        "--hopcat",
        metavar="CMD",
        help="hopcat command (default <repo>/.venv/bin/hopcat, else "
        "'python3 -m hopcat' with PYTHONPATH=<repo>/src)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write raw runs and the summary as JSON")
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed 16 MiB warm-up run per tool and direction",
    )
    return ap


def first_line(argv: list[str], env: dict[str, str] | None = None) -> str | None:
    """The first meaningful line a program prints (``--version`` and the like), or None."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL, env=env
        )
        for ln in (cp.stdout or cp.stderr).splitlines():
            if ln.strip() and "compiled" not in ln.lower():
                return ln.strip()[:80]
    return None


def package_version(package: str) -> str | None:
    return first_line(["dpkg-query", "-W", "-f", "${Version}", package])


def machine_meta() -> dict[str, Any]:
    """Facts every report starts with: the command, the machine and its load, the checkout."""
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
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def machine_line(meta: dict[str, Any]) -> str:
    return (
        f"- machine: nproc={meta['nproc']} (affinity {meta['affinity']}), cpu={meta['cpu']}, "
        f"kernel={meta['kernel']}, python={meta['python']}, "
        f"loadavg at start={meta['loadavg']}"
    )


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {path}")


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP: stop like Ctrl-C, so daemons get stopped and the report is printed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    old: dict[int, Callable[..., Any] | int | None] = {
        s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
