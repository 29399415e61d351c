"""Running the program under test: spawn, bounded wait with its rusage, cleanup."""

from __future__ import annotations

import abc
import contextlib
import os
import resource
import select
import signal
import time
from dataclasses import dataclass, field
from typing import IO

from .common import MB, GiB

# Children spawned and not reaped yet: killed at the end of a run, on Ctrl-C or a crash.
LIVE_PIDS: set[int] = set()


def spawn(argv: list[str], env: dict[str, str] | None, stdin: int, stdout: int, stderr: int) -> int:
    pid = os.posix_spawn(
        argv[0],
        argv,
        {**os.environ, **(env or {})},
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ],
        # Python ignores SIGPIPE/SIGXFSZ, and ignored dispositions survive exec.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )
    LIVE_PIDS.add(pid)
    return pid


@dataclass
class Exit:
    status: int  # exit code, or -signal
    rusage: resource.struct_rusage
    t_exit: float  # perf_counter when the exit was noticed
    timed_out: bool


def wait_exit(pid: int, timeout: float, *, group: bool = False) -> Exit:
    """Wait (pidfd, no polling) at most ``timeout`` s for pid to exit, else SIGKILL it (its whole
    process group with ``group``); reap it with wait4 for its rusage."""
    pidfd = os.pidfd_open(pid)
    try:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        timed_out = not p.poll(max(0, int(timeout * 1000)))
        t_exit = time.perf_counter()
    finally:
        os.close(pidfd)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    _, wstatus, ru = os.wait4(pid, 0)
    LIVE_PIDS.discard(pid)
    return Exit(os.waitstatus_to_exitcode(wstatus), ru, t_exit, timed_out)


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    LIVE_PIDS.discard(pid)


def reap_all() -> None:
    for pid in list(LIVE_PIDS):
        kill_and_reap(pid)


def rusage_cpu(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    return rusage_cpu(resource.getrusage(resource.RUSAGE_SELF))


def thread_cpu() -> float:
    return rusage_cpu(resource.getrusage(resource.RUSAGE_THREAD))


def read_tail(f: IO[bytes], limit: int = 400) -> str:
    """The end of a captured stderr, on one line."""
    try:
        f.seek(0)
        text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if len(text) > limit:
        text = "..." + text[-limit:]
    return " | ".join(text.splitlines())


@dataclass
class ToolRun(abc.ABC):
    """One run of the tool under test: what every benchmark records of it. Each benchmark's
    run says what else it measured (``cpu_detail``)."""

    tool: str
    mode: str  # up, down, latency
    rep: int  # 0: the warm-up run
    ok: bool = False
    error: str | None = None
    nbytes: int = 0
    wall: float | None = None
    exit_status: int | None = None
    tool_user: float | None = None
    tool_sys: float | None = None
    harness_cpu: float | None = None  # the whole benchmark process (all threads)
    argv: list[str] = field(default_factory=list)

    @property
    def tool_cpu(self) -> float | None:
        if self.tool_user is None or self.tool_sys is None:
            return None
        return self.tool_user + self.tool_sys

    @abc.abstractmethod
    def cpu_detail(self, gib: float) -> str:
        """The other threads' and processes' CPU per GiB, for the progress line."""

    def describe(self) -> str:
        if not self.ok:
            return f"FAIL: {self.error}"
        assert self.wall is not None
        if self.mode == "latency":
            return f"{self.wall * 1e3:8.2f} ms"
        gib = self.nbytes / GiB
        return (
            f"{self.nbytes / self.wall / MB:8.0f} MB/s  wall {self.wall:7.3f}s  "
            f"tool {(self.tool_cpu or 0) / gib:.3f}  {self.cpu_detail(gib)}"
        )

    def record_exit(self, ex: Exit, t0: float, t_done: list[float | None]) -> list[str]:
        """The tool's exit, CPU and wall time (to the last of its exit and the endpoints' jobs
        done); returns what was wrong with the exit."""
        self.exit_status = ex.status
        self.tool_user, self.tool_sys = ex.rusage.ru_utime, ex.rusage.ru_stime
        self.wall = max([ex.t_exit] + [t or ex.t_exit for t in t_done]) - t0
        if ex.timed_out:
            return [f"timeout after {self.wall:.1f}s (killed)"]
        return [f"exit status {ex.status}"] if ex.status != 0 else []

    def conclude(self, errors: list[str], errf: IO[bytes]) -> None:
        """Passed without errors; else failed with them and the tool's stderr."""
        if errors and (tail := read_tail(errf)):
            errors.append(f"stderr: {tail}")
        self.error = "; ".join(errors) or None
        self.ok = not errors
