"""Exec (``-e CMD``/``--exec CMD``, ``--sh-exec CMD``, ncat's names): the connection becomes a
program's stdin and stdout.

The connected socket itself is the child's descriptors 0 and 1 (no relay process in between, so
the program sees a socket: it can half-close it, set options on it, pass it on); stderr stays
hopcat's. ``--exec`` splits CMD on blanks and runs it without a shell, as ncat does;
``--sh-exec`` runs ``/bin/sh -c CMD``. hopcat waits for the child and exits with its status
(128 + N when signal N ended it).

In connect mode the tunnel is opened with exact reads, as for ``-F``, so no byte of the target's
is read by hopcat. Through TLS (a TLS hop, --tls) the session lives in hopcat: the child gets
two pipes and hopcat relays between them and the session until the child's output ends.
In listen mode, without ``-k`` one connection gets one child and hopcat exits with its status;
with ``-k`` every connection gets its own child at once, at most ``--max-conns`` of them
(default 100, ncat's); at the limit the listener is not read, so further clients wait in the
backlog. Children are watched with pidfds in the same poll as the listener: no SIGCHLD handler,
no busy loop, and hopcat never blocks on one child while another is done.
"""

from __future__ import annotations

import os

from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

    from hopcat.cli._args import Options
    from hopcat.net.tls import TLSLayers

DEFAULT_MAX_CONNS = 100


def command_argv(options: Options) -> list[str]:
    """The program to run, checked to be runnable. SIGCHLD goes back to its default: inherited
    as ignored, the kernel would reap our children before we could wait for their status."""
    import signal

    if options.exec_cmd is not None and options.sh_exec is not None:
        raise UsageError("--exec and --sh-exec exclude each other")
    if options.sh_exec is not None:
        if not options.sh_exec.strip():
            raise UsageError("--sh-exec needs a command")
        argv = ["/bin/sh", "-c", options.sh_exec]
    else:
        assert options.exec_cmd is not None
        argv = options.exec_cmd.split()
        if not argv:
            raise UsageError("-e/--exec needs a command")
        _check_runnable(argv[0])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return argv


def _check_runnable(program: str) -> None:
    """Refuse a program that cannot start before anything is dialled or bound."""
    import shutil

    if "/" in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise UsageError(f"-e/--exec {program}: not an executable file")
    elif shutil.which(program) is None:
        raise UsageError(f"-e/--exec {program}: command not found in PATH")


def max_conns(options: Options) -> int:
    """--max-conns, within the descriptor limit (each child costs the parent one pidfd)."""
    from hopcat.cli._args import fd_budget, positive_int

    if options.max_conns is None:
        return fd_budget(DEFAULT_MAX_CONNS)
    return fd_budget(positive_int(options.max_conns, "--max-conns"))


def exec_argv(options: Options) -> list[str] | None:
    """The program of -e/--sh-exec, checked; None when neither was given."""
    if options.exec_cmd is None and options.sh_exec is None:
        return None
    return command_argv(options)


def spawn(argv: list[str], conn: _socket.socket | None, fds: tuple[int, int] = (-1, -1)) -> int:
    """Start ``argv`` with ``conn`` (or the two ``fds``) as its stdin and stdout; its pid."""
    import signal

    if conn is not None:
        conn.setblocking(True)
        fds = (conn.fileno(), conn.fileno())
    # Python ignores SIGPIPE (and SIGXFSZ) and a spawned program would inherit that: a shell
    # loop writing to a client that left would spin on EPIPE for ever instead of dying.
    signals = (signal.SIGPIPE, signal.SIGXFSZ)
    try:
        return os.posix_spawnp(argv[0], argv, dict(os.environ), setsigdef=signals,
                               file_actions=[(os.POSIX_SPAWN_DUP2, fds[0], 0),
                                             (os.POSIX_SPAWN_DUP2, fds[1], 1)])  # fmt: skip
    except OSError as exc:
        from hopcat.net.dial import describe_oserror

        raise ExecError(f"cannot run {argv[0]}: {describe_oserror(exc)}") from None


def exit_status(status: int) -> int:
    """A child's wait status as a shell reports it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_child(
    argv: list[str], conn: _socket.socket, layers: TLSLayers | None = None,
    initial_down: bytes = b"",
) -> int:  # fmt: skip
    """One connection, one child; the child's exit status once it ends. Through TLS sessions
    (``layers``) the child gets pipes, and hopcat relays between them and the sessions."""
    if layers:
        return _run_child_over_tls(argv, conn, layers, initial_down)
    pid = spawn(argv, conn)
    conn.close()  # the child holds it now: its close is the peer's EOF
    return _wait(pid)


def _run_child_over_tls(
    argv: list[str], conn: _socket.socket, layers: TLSLayers, initial_down: bytes
) -> int:
    from hopcat.relay.pump import RelayOptions, close_tls, relay

    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        pid = spawn(argv, None, (to_child_r, from_child_w))
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        raise
    os.close(to_child_r)
    os.close(from_child_w)
    # The relay closes the child's stdin at the peer's end (its EOF); otherwise it is closed
    # here, but only if the number is still that pipe and not a descriptor opened since.
    to_child = os.fstat(to_child_w)
    try:
        # The child may answer after the peer's end (a request, then its reply): wait for its
        # output's end, not only while it is busy.
        relay(conn, from_child_r, to_child_w, layers=layers, initial_down=initial_down,
              options=RelayOptions(keep_sending=True))  # fmt: skip
    finally:
        close_tls(conn, layers)
        os.close(from_child_r)
        try:
            still_ours = os.path.samestat(os.fstat(to_child_w), to_child)
        except OSError:
            still_ours = False
        if still_ours:
            os.close(to_child_w)
    return _wait(pid)


def _wait(pid: int) -> int:
    while True:
        try:
            _pid, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        return exit_status(status)


class ExecError(UsageError):
    """The program could not be started."""
