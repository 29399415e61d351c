"""``--workers N``: N processes serving, one supervisor.

The supervisor loads and checks the configuration once (a bad file fails once, with the usual
message and exit code), binds every listen address with SO_REUSEPORT without listening (to learn
the port that port 0 picked, and to keep it reserved: a socket that does not listen gets no
connection), then forks the workers. Each worker binds listeners of its own on those exact
addresses with SO_REUSEPORT and runs the one-process server (``serve.serve_on``) on its own
event loop. The kernel then hashes each new connection to one listener: no worker is woken for
a connection another takes (no thundering herd), and a busy worker cannot starve the others of
accepts, which a shared listening socket would allow. The cost: the split is by hash, not by
load, so the limits are split evenly (``split_limits``).

Readiness: each worker writes a byte on a pipe once it accepts; the supervisor announces
(--ready-fd/--ready-file) when every worker has. A worker that exits before that fails the start:
the others are stopped and the supervisor exits with that worker's code.

Signals go to the supervisor and are passed on through a control pipe per worker, one byte each:
``T``/``I`` drain (SIGTERM/SIGINT), ``t``/``i`` end everything at once (a second signal), ``H``
reload. A pipe rather than kill(): a signal sent to the whole process group (Ctrl-C in a
terminal, systemd's KillMode=control-group) also reaches the workers directly, and the drain
command is idempotent, so the duplicate is not taken for a second signal (workers ignore SIGINT
and treat SIGTERM as a drain too, so a SIGTERM sent to one worker alone drains it; only the
supervisor's second signal ends everything at once). The end of the pipe tells a worker that its
supervisor is gone (killed with SIGKILL): it drains and exits instead of living on unsupervised.

A worker that exits while no stop was asked for is restarted in its slot (log line with the new
pid), at once if it had run for ``STABLE_S``, else after a pause that doubles up to
``RESTART_MAX_S``, so a worker that crashes at start does not spin.

Log lines: every worker writes its own on the inherited stderr, each with ``worker=K``; the
logger writes whole lines of at most PIPE_BUF bytes per write(2), so lines never mix.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal

from hopcat._ready import announce_ready
from hopcat.errors import ExitCode, HopcatError
from hopcat.server.ifaddrs import host_addresses
from hopcat.server.log import Logger
from hopcat.server.metrics import Endpoint, Store
from hopcat.server.serve import (
    ServeError,
    bind_listeners,
    listen_addresses,
    listening_on,
    ready_lines,
    serve_on,
    via_dials_here,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from hopcat.net.dial import SockAddr
    from hopcat.server.cli import ServeOptions
    from hopcat.server.serve import Server, Startup

STABLE_S = 10.0
CLEAN_EXIT_WAIT_S = 1.0  # for the stop signal that made a worker exit 0 (see _exited)
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 30.0
_DRAIN = {"SIGTERM": b"T", "SIGINT": b"I"}
_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_COMMANDS = {
    ord("T"): ("SIGTERM", False), ord("I"): ("SIGINT", False),
    ord("t"): ("SIGTERM", True), ord("i"): ("SIGINT", True),
}  # fmt: skip


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name of its own
        return f"SIG{number}"


def ceil_share(limit: int, workers: int) -> int:
    return -(-limit // workers)


def split_limits(options: ServeOptions, workers: int) -> ServeOptions:
    """A worker's options: each limit L becomes ceil(L/N), 0 (no limit) stays 0. Per client
    address too: SO_REUSEPORT hashes each connection on its own (the client's port is in the
    hash), so one client's connections spread over every worker."""
    mine = copy.copy(options)
    mine.max_conns = ceil_share(options.max_conns, workers)
    mine.max_conns_per_client = ceil_share(options.max_conns_per_client, workers)
    mine.max_udp_per_client = ceil_share(options.max_udp_per_client, workers)
    return mine


class Worker:
    """The supervisor's record of one worker slot."""

    __slots__ = ("control", "index", "pid", "ready", "ready_pipe", "restart_s", "started")

    def __init__(self, index: int) -> None:
        self.index = index  # 0-based; logged as index + 1
        self.pid = 0  # 0: not running
        self.control = -1
        self.ready_pipe = -1
        self.ready = False
        self.started = 0.0
        self.restart_s = 0.0


class Supervisor:
    def __init__(
        self, options: ServeOptions, startup: Startup, metrics_sock: socket.socket | None
    ) -> None:
        self.options = options
        self.startup = startup
        self.metrics_sock = metrics_sock
        self.count = options.workers
        self.store = Store(self.count + 1)  # the last slot is the supervisor's own
        self.workers = [Worker(i) for i in range(self.count)]
        self.logger = Logger(fmt=options.log_format, quiet=options.quiet)
        self.loop = asyncio.new_event_loop()
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.reserved: list[socket.socket] = []
        self.addresses: list[tuple[int, SockAddr]] = []
        self.announced = False
        self.stopping = 0  # signals received
        self.code = 0  # the exit code: the first failure seen while stopping
        self.restarts: dict[int, asyncio.TimerHandle] = {}

    # -- the supervisor ----------------------------------------------------------------------
    def run(self) -> int:
        options = self.options
        loop = self.loop
        endpoint = None
        try:
            # First as one process would (listening, no SO_REUSEPORT): a port in use, by
            # another server or by two of our own addresses, is refused as it is without
            # --workers, instead of joining a SO_REUSEPORT group and taking a share of its
            # connections. Then the group's reservation on exactly the ports found.
            probes = bind_listeners(listen_addresses(options))
            self.addresses = [(sock.family, sock.getsockname()) for sock in probes]
            for sock in probes:
                sock.close()
            self.reserved = bind_listeners(self.addresses, reuse_port=True, listen=False)
            if options.via:  # a chain that loops back here: refused once, not by every worker
                policy = self.startup.policy
                policy.host_addresses = host_addresses()
                policy.listeners = tuple(listening_on(self.reserved))
                via_dials_here(options.via, policy)
            if self.metrics_sock is not None:
                endpoint = Endpoint(self.metrics_sock, self.store, supervised=True)
                loop.run_until_complete(endpoint.start())
                self.logger.log("metrics", address=endpoint.address)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            loop.add_signal_handler(signal.SIGCHLD, self.reap)
            self.logger.log("workers", count=self.count, pid=os.getpid())
            for worker in self.workers:
                self.spawn(worker)
            return loop.run_until_complete(self.done)
        finally:
            if endpoint is not None:
                endpoint.close()
            elif self.metrics_sock is not None:
                self.metrics_sock.close()
            for sock in self.reserved:
                sock.close()
            for handle in self.restarts.values():
                handle.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.remove_signal_handler(signum)
            loop.close()
            if self.announced:
                self.logger.log("stopped", code=self.code)
                if options.ready_file is not None:
                    try:
                        os.unlink(options.ready_file)
                    except OSError:
                        pass

    def spawn(self, worker: Worker) -> None:
        self.restarts.pop(worker.index, None)
        try:
            control_r, control_w, ready_r, ready_w, pid = _fork()
        except OSError as exc:  # out of processes or descriptors
            reason = f"worker {worker.index + 1}: fork: {os.strerror(exc.errno or 0).lower()}"
            if not self.announced:
                self.send_all(b"t")  # the ones forked already must not serve unsupervised
                raise ServeError(reason) from None
            worker.restart_s = min(RESTART_MAX_S, worker.restart_s * 2 or RESTART_FIRST_S)
            self.logger.log("error", reason=reason, restart_in=worker.restart_s)
            self.restarts[worker.index] = self.loop.call_later(
                worker.restart_s, self.spawn, worker
            )
            return
        if pid == 0:
            code = int(ExitCode.SOFTWARE)
            try:
                os.close(control_w)
                os.close(ready_r)
                code = self._worker(worker.index, control_r, ready_w)
            except HopcatError as exc:
                _say(str(exc))
                code = exc.exit_code
            except BaseException as exc:  # the child must never return into the supervisor's code
                _say(f"worker {worker.index + 1}: internal error: {type(exc).__name__}: {exc}")
            finally:
                os._exit(code)
        os.close(control_r)
        os.close(ready_w)
        os.set_blocking(control_w, False)  # a stuck worker must not stall the supervisor
        worker.pid, worker.control, worker.ready_pipe = pid, control_w, ready_r
        worker.ready = False
        worker.started = self.loop.time()
        self.loop.add_reader(ready_r, self._on_ready, worker)
        self.logger.log("worker-start", worker=worker.index + 1, pid=pid)

    def _on_ready(self, worker: Worker) -> None:
        try:
            data = os.read(worker.ready_pipe, 1)
        except OSError:
            data = b""
        self._close_ready(worker)
        if not data:
            return  # it failed to start: reap() sees it exit
        worker.ready = True
        if not self.announced and not self.stopping and all(w.ready for w in self.workers):
            self.announced = True
            addresses = ready_lines(self.options, [name for _family, name in self.addresses])
            self.logger.log("ready", workers=self.count, pid=os.getpid())
            announce_ready(
                addresses, ready_fd=self.options.ready_fd, ready_file=self.options.ready_file
            )

    def _close_ready(self, worker: Worker) -> None:
        if worker.ready_pipe >= 0:
            self.loop.remove_reader(worker.ready_pipe)
            os.close(worker.ready_pipe)
            worker.ready_pipe = -1

    def send(self, worker: Worker, command: bytes) -> None:
        if worker.control < 0:
            return
        try:
            os.write(worker.control, command)
        except OSError:
            pass  # it is exiting (EPIPE) or not reading (EAGAIN): reap() will tell

    def send_all(self, command: bytes) -> None:
        for worker in self.workers:
            self.send(worker, command)

    def reload(self) -> None:
        self.startup.reload(self.options)
        self.send_all(b"H")

    def stop(self, signame: str) -> None:
        self.stopping += 1
        running = [w for w in self.workers if w.pid]
        self.logger.log(
            "shutdown", signal=signame, workers=len(running),
            reason="second signal: closing everything" if self.stopping > 1 else None,
        )  # fmt: skip
        for handle in self.restarts.values():
            handle.cancel()
        self.restarts.clear()
        command = _DRAIN[signame]
        self.send_all(command if self.stopping == 1 else command.lower())
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not any(w.pid for w in self.workers) and not self.restarts and not self.done.done():
            self.done.set_result(self.code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._exited(worker, os.waitstatus_to_exitcode(status))

    def _exited(self, worker: Worker, code: int) -> None:
        self._close_ready(worker)
        os.close(worker.control)
        worker.control = -1
        worker.pid, pid = 0, worker.pid
        self.store.clear_gauges(worker.index)
        status = f"signal:{_signal_name(-code)}" if code < 0 else f"exit:{code}"
        exit_code = 128 - code if code < 0 else code
        if code == 0 and not self.stopping:
            # A worker exits 0 only after a drain: a stop signal sent to the whole process group
            # (systemd's KillMode=control-group, timeout(1)) reached it before the supervisor's
            # own copy is handled. That copy is on its way; a worker told to stop on its own is
            # restarted after CLEAN_EXIT_WAIT_S unless it arrives.
            self.logger.log("worker-exit", worker=worker.index + 1, pid=pid, status=status)
            self.restarts[worker.index] = self.loop.call_later(
                CLEAN_EXIT_WAIT_S, self._restart, worker
            )
            return
        if self.stopping or not self.announced:
            self.logger.log("worker-exit", worker=worker.index + 1, pid=pid, status=status)
            if exit_code and not self.code:
                self.code = exit_code
            if not self.announced and not self.stopping:
                # The start failed: whatever the others do, this server is not serving.
                self.code = self.code or int(ExitCode.SOFTWARE)
                self.stopping = 2
                for handle in self.restarts.values():
                    handle.cancel()
                self.restarts.clear()
                self.send_all(b"t")
            self._maybe_done()
            return
        lived = self.loop.time() - worker.started
        worker.restart_s = (
            0.0 if lived >= STABLE_S else min(RESTART_MAX_S, worker.restart_s * 2 or RESTART_FIRST_S)
        )
        self.logger.log(
            "worker-exit", worker=worker.index + 1, pid=pid, status=status,
            restart_in=worker.restart_s,
        )  # fmt: skip
        self.restarts[worker.index] = self.loop.call_later(
            worker.restart_s, self._restart, worker
        )

    def _restart(self, worker: Worker) -> None:
        self.restarts.pop(worker.index, None)
        if self.stopping:
            self._maybe_done()
            return
        self.store.slot(self.count).restarted()
        self.spawn(worker)

    # -- a worker (in the forked child) ------------------------------------------------------
    def _worker(self, index: int, control: int, ready_pipe: int) -> int:
        # Forked from inside the supervisor's loop: none of its state is ours.
        asyncio.events._set_running_loop(None)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Until the server's handlers are in: a stop or reload sent to the whole group reaches
        # this worker through its control pipe as well, so the direct copy may be ignored.
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # blocked by _fork
        for other in self.workers:
            for fd in (other.control, other.ready_pipe):
                if fd >= 0:
                    os.close(fd)
        for sock in self.reserved:
            sock.close()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        if self.options.ready_fd is not None and not self.announced:
            os.close(self.options.ready_fd)  # the supervisor's to write and close
        options = split_limits(self.options, self.count)
        listeners = bind_listeners(self.addresses, reuse_port=True)

        served: list[Server] = []

        def setup(server: Server) -> Callable[[], None]:
            served.append(server)
            server.loop.add_reader(control, _on_control, server, control)

            def undo() -> None:
                server.loop.remove_reader(control)

            return undo

        def ready(addresses: list[str]) -> None:
            del addresses  # the supervisor announces its own
            server = served[0]
            server.loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            server.loop.add_signal_handler(signal.SIGTERM, _drain, server, "SIGTERM")
            os.write(ready_pipe, b"r")
            os.close(ready_pipe)

        return serve_on(
            options, self.startup, listeners, self.store.slot(index), ready=ready,
            setup=setup, log_fields={"worker": index + 1},
        )  # fmt: skip


def _fork() -> tuple[int, int, int, int, int]:
    """Two pipes (control, ready) and a child: (control_r, control_w, ready_r, ready_w, pid)."""
    control_r, control_w = os.pipe()
    try:
        ready_r, ready_w = os.pipe()
    except OSError:
        os.close(control_r)
        os.close(control_w)
        raise
    # Signals stay blocked across fork() until the child has dropped the supervisor's wakeup
    # socket: a signal run by the inherited handler would be written into that very socket
    # and acted on by the supervisor as its own. The child unblocks them in _worker.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        for fd in (control_r, control_w, ready_r, ready_w):
            os.close(fd)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    return control_r, control_w, ready_r, ready_w, pid


def _drain(server: Server, signame: str) -> None:
    """Drain, once: a signal to the process group reaches a worker both directly and through
    its supervisor, and that is one signal, not two."""
    if not server.stopping:
        server.stop(signame)


def _on_control(server: Server, fd: int) -> None:
    """A command from the supervisor (see the module docstring)."""
    try:
        data = os.read(fd, 64)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        server.loop.remove_reader(fd)
        _drain(server, "supervisor-gone")
        return
    for byte in data:
        if byte == ord("H"):
            server.reload()
            continue
        signame, at_once = _COMMANDS.get(byte, ("", False))
        if not signame:
            continue
        _drain(server, signame)
        if at_once:
            server.stop(signame)  # the second time: everything ends now


def _say(message: str) -> None:
    try:
        os.write(2, f"hopcat: {message}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass

