"""The ``hopcat`` command: parse, call the library, turn errors into one line and an exit code.

Start-up matters (ssh runs us once per connection), so this module imports only what the direct
connect-and-relay path needs; anything else is imported inside the branch that uses it.

What the process inherits is guarded here, before anything else runs:

* descriptors 0, 1 and 2 are always open: a closed one gets /dev/null, so no socket of ours can
  land on it (a socket on fd 0 would be relayed back to its own peer). A closed stdin is then
  empty (the peer gets our FIN at once), a closed stdout discards, a closed stderr is silent.
* SIGTERM, SIGHUP and SIGINT (unless inherited as ignored, as under nohup) raise ``Terminated``
  in the client, so every ``finally`` runs on the way out: the relay puts O_NONBLOCK on stdin
  and stdout back, the password prompt turns echo back on. Exit 128 + the signal number with one
  line on stderr, except for SIGHUP: ssh sends it to its ProxyCommand at the end of every
  session, so it ends hopcat quietly. SIGPIPE stays ignored, as Python sets it: a reader that went away is an EPIPE
  the relay reports (exit 74) or, after stdin's EOF, takes as the end of the session.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import signal as _signal  # the same functions, with stubs
    from collections.abc import Sequence

    from hopcat.cli._args import Options
    from hopcat.net.tls import TLSLayers
else:
    import _signal  # already loaded by the interpreter; signal.py would import enum

# What ends hopcat, with its one line ("" for none); the exit code is 128 + the number (shells').
ENDING_SIGNALS: dict[int, str] = {
    _signal.SIGINT: "interrupted (SIGINT)",
    _signal.SIGTERM: "terminated (SIGTERM)",
    _signal.SIGHUP: "",  # how ssh ends its ProxyCommand after every session: not worth a word
}


class Terminated(BaseException):
    """A signal ended hopcat. A BaseException, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_ending_signal(signum: int, _frame: object) -> None:
    # Once: a second signal must not cut short the finally blocks the first one started.
    for other in ENDING_SIGNALS:
        if _signal.getsignal(other) is _on_ending_signal:
            _signal.signal(other, _signal.SIG_IGN)
    raise Terminated(signum)


def _catch_ending_signals() -> None:
    for signum in ENDING_SIGNALS:
        current = _signal.getsignal(signum)
        if current == _signal.SIG_DFL or current is _signal.default_int_handler:
            _signal.signal(signum, _on_ending_signal)


def _reserve_standard_fds() -> None:
    """Open /dev/null onto whichever of 0, 1 and 2 is closed (usually one open and one close)."""
    fd = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor
    while fd <= 2:
        os.set_inheritable(fd, True)  # it stands in for a standard descriptor, also for children
        # Python left sys.std* None for a descriptor closed at start: give them the stand-in.
        stream = open(fd, "r" if fd == 0 else "w", closefd=False)  # noqa: SIM115
        setattr(sys, ("stdin", "stdout", "stderr")[fd], stream)
        fd = os.open(os.devnull, os.O_RDWR)
    os.close(fd)


def _write_fd(fd: int, text: str) -> None:
    """Write all of ``text``, waiting in poll if fd is non-blocking (stdout and stderr can be one
    pipe the relay made non-blocking); raises OSError."""
    from hopcat.relay.pump import write_all

    write_all(fd, text.encode("utf-8", "backslashreplace"))


class Timeline:
    """``-v`` output: one stderr line per event, stamped with ms since hopcat started."""

    def __init__(self, enabled: bool, started: float) -> None:
        self.enabled = enabled
        self.started = started

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed_ms = (time.perf_counter() - self.started) * 1000
            try:
                _write_fd(2, f"hopcat: [{elapsed_ms:9.3f} ms] {message}\n")
            except OSError:
                pass  # stderr's reader went away: the relay goes on, the exit code still tells


def _fail(message: str, code: int) -> int:
    try:
        _write_fd(2, f"hopcat: {message}\n")
    except OSError:
        pass  # nowhere to say it: the exit code still does
    return code


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    _reserve_standard_fds()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return _run(args, started)
    except Terminated as exc:
        line = ENDING_SIGNALS[exc.signum]
        return _fail(line, 128 + exc.signum) if line else 128 + exc.signum
    except KeyboardInterrupt:  # SIGINT before our handler was in place
        return _fail(ENDING_SIGNALS[_signal.SIGINT], 128 + _signal.SIGINT)
    except Exception as exc:
        from hopcat.errors import ExitCode, HopcatError

        if isinstance(exc, HopcatError):
            if debug:
                import traceback

                traceback.print_exc()
            return _fail(str(exc), exc.exit_code)
        if debug:
            raise
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback, "
            "and please report it)",
            ExitCode.SOFTWARE,
        )


def _print(text: str) -> int:
    """Our own output (--help, --version): a reader that stops early (``| head``) is no error."""
    try:
        _write_fd(1, text)
    except BrokenPipeError:
        pass
    except OSError as exc:
        return _fail(f"writing to stdout: {os.strerror(exc.errno or 0).lower()}", 74)
    return 0


def _run(args: list[str], started: float) -> int:
    if args[:1] == ["ssh-config"]:
        from hopcat.cli._sshconfig import main as ssh_config_main

        return ssh_config_main(args[1:])
    if args[:1] == ["serve"]:
        from hopcat.server.cli import main as serve_main

        return serve_main(args[1:])
    _catch_ending_signals()
    from hopcat.cli._args import help_text, parse_args

    options = parse_args(args)
    if options.help:
        return _print(help_text())
    if options.version:
        from hopcat import __version__

        return _print(f"hopcat {__version__}\n")
    if options.scan:
        from hopcat.cli._portscan import run as run_scan

        return run_scan(options)
    from hopcat.errors import UsageError

    if options.udp:
        from hopcat.cli._udp import main as udp_main

        return udp_main(options, Timeline(bool(options.verbose), started))
    if options.listen or options.unix:
        from hopcat.cli._listen import main as listen_main

        return listen_main(options, Timeline(bool(options.verbose), started))
    if len(options.operands) != 2:
        raise UsageError(
            "expected HOST PORT"
            + (f", got {len(options.operands)} operands" if options.operands else "")
            + " (see hopcat --help)"
        )
    return _connect_and_relay(options, Timeline(bool(options.verbose), started))


def _connect_and_relay(options: Options, trace: Timeline) -> int:
    import _socket as socket  # not the socket module: ~10 ms of imports per start

    from hopcat._endpoint import format_hostport, parse_port, validate_host
    from hopcat._environment import fill_users, proxies_from_environment
    from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S, address_family, wants_tuning
    from hopcat.cli._proxy import apply_auth_schemes, fill_passwords, proxies_from_command_line
    from hopcat.errors import UsageError

    for note in options.notes:
        trace(note)
    host = validate_host(options.operands[0], what="host")
    port = parse_port(options.operands[1])
    timeout_s = options.connect_timeout_s
    if timeout_s is None:
        timeout_s = options.idle_timeout_s or DEFAULT_CONNECT_TIMEOUT_S
    family = address_family(options)

    hops = proxies_from_command_line(options)
    why_direct = "direct: proxies in the environment ignored (--no-proxy)"
    if not hops and not options.no_proxy:
        hops, why_direct = proxies_from_environment(os.environ, host)
    for note in fill_users(hops, os.environ):
        trace(note)
    apply_auth_schemes(hops, options)
    fill_passwords(hops, os.environ, password_file=options.proxy_password_file,
                   password_command=options.proxy_password_command, trace=trace)  # fmt: skip
    # The clock starts once the passwords are in: a person typing one into a prompt or an
    # askpass dialog is not the connect being slow. 0 means no timeout; every wait below is
    # capped on its own (dial.MAX_WAIT_S), so an infinite or very distant deadline is safe.
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
    exec_argv = None
    if options.exec_cmd is not None or options.sh_exec is not None:
        from hopcat.cli._exec import command_argv

        exec_argv = command_argv(options)
    if options.fdpass:
        from hopcat.net.fdpass import check_channel

        check_channel(1)
    if options.fdpass and any(hop.tls for hop in hops):
        raise UsageError(
            "-F: a TLS proxy (https://, socks5+tls://) keeps its TLS session inside hopcat, so "
            "the socket cannot be handed to ssh; drop -F (ProxyUseFdpass no) for this chain"
        )
    timeout_label = f"after {timeout_s:g} s"
    initial_down = b""
    target_tls = None
    if options.tls:
        from hopcat.cli import _tls

        target_tls = _tls.connect_context(options)  # its files are read before dialling
        _tls.warn_insecure(options)
    source_port = 0
    if options.source_port is not None:
        source_port = parse_port(options.source_port, what="-p source port")
    socket_factory = None
    if wants_tuning(options):
        from hopcat.cli._sockopts import Tuning

        socket_factory = Tuning(options).factory
    if hops:
        from hopcat.net.chain import open_tunnel

        trace("proxy chain: " + " -> ".join(f"{h.label()} (from {h.origin})" for h in hops))
        tunnel = open_tunnel(
            hops, host, port, deadline=deadline, family=family, source=options.source,
            nodelay=not options.nagle, keepalive=options.keepalive,
            proxy_dns=options.proxy_dns or "remote", numeric_only=options.numeric,
            cafile=options.proxy_cacert,
            insecure=options.proxy_insecure, trace=trace, timeout_label=timeout_label,
            exact=options.fdpass or exec_argv is not None, source_port=source_port,
            socket_factory=socket_factory,
        )
    else:
        from hopcat.net.chain import Tunnel
        from hopcat.net.dial import dial_tcp

        trace(why_direct)
        tunnel = Tunnel(dial_tcp(
            host, port, deadline=deadline, family=family, source=options.source,
            nodelay=not options.nagle, keepalive=options.keepalive, numeric_only=options.numeric,
            trace=trace, timeout_label=timeout_label, source_port=source_port,
            socket_factory=socket_factory or socket.socket,
        ), b"", None)  # fmt: skip
    sock = tunnel.sock
    try:
        if target_tls is not None:
            _tls.start_client(tunnel, *target_tls, host, port, deadline=deadline, trace=trace)
        initial_down = tunnel.trailing
        if trace.enabled:
            local = sock.getsockname()
            remote = sock.getpeername()
            trace(
                f"established {format_hostport(remote[0], remote[1])} "
                f"(local {format_hostport(local[0], local[1])})"
            )
        if options.fdpass:
            from hopcat.net.fdpass import pass_fd

            pass_fd(1, sock.fileno())
            trace("passed the connected socket to ssh (-F); exiting")
            return 0
        if exec_argv is not None:
            from hopcat.cli._exec import run_child

            return run_child(exec_argv, sock, tunnel.layers, initial_down)
        relay_connected(sock, options, trace, initial_down=initial_down, layers=tunnel.layers)
    finally:
        sock.close()
    return 0


def relay_connected(
    sock: _socket.socket, options: Options, trace: Timeline, *, initial_down: bytes = b"",
    close_output: bool = True, in_fd: int | None = None, layers: TLSLayers | None = None,
) -> int:
    """Relay stdin and stdout over the connected ``sock`` (any stream socket) under the
    end-of-stream rules; 0, or a HopcatError raised. ``close_output``: close stdout at the
    peer's EOF (not for a listener that serves the next client on the same stdout). ``in_fd``:
    what to read instead of stdin (a listener's one -C/-i pipe, shared by its clients).
    ``layers``: the TLS sessions on ``sock`` (TLS hops, --tls)."""
    from hopcat.errors import HopcatError
    from hopcat.relay.pump import RelayOptions, relay

    relay_options = RelayOptions(
        no_shutdown=options.no_shutdown or options.no_stdin,
        keep_sending=options.keep_sending,
        quit_after_eof_s=options.quit_after_eof_s,
        idle_timeout_s=options.idle_timeout_s or None,  # -w 0: no idle timeout
        read_stdin=not options.no_stdin,
        close_output=close_output,
    )
    counters = _tcp_counters(sock) if trace.enabled else None
    own_pipe = None
    if in_fd is None:
        in_fd = 0
        if (options.crlf or options.interval_s) and not options.no_stdin:
            from hopcat.cli._lines import paced_stdin

            in_fd = own_pipe = paced_stdin(options.crlf, options.interval_s or 0.0)
    try:
        stats = relay(
            sock, in_fd, 1, options=relay_options, initial_down=initial_down,
            trace=trace if options.verbose else None, layers=layers,
        )
    except HopcatError:
        if counters is not None:
            _trace_counters_at_error(trace, sock, counters, len(initial_down))
        raise
    finally:
        if own_pipe is not None:
            os.close(own_pipe)
        if layers:
            from hopcat.relay.pump import close_tls

            close_tls(sock, layers)
    if trace.enabled:
        seconds = max(stats.seconds, 1e-9)
        trace(
            f"done in {stats.seconds:.3f} s: up {stats.bytes_up} bytes sent "
            f"({stats.bytes_up / seconds / 1e6:.1f} MB/s, {stats.path_up}), "
            f"down {stats.bytes_down} bytes received "
            f"({stats.bytes_down / seconds / 1e6:.1f} MB/s, {stats.path_down})"
        )
    return 0


# struct tcp_info (linux/tcp.h, Linux >= 4.2): u64 tcpi_bytes_acked at 120, tcpi_bytes_received
# at 128. Read directly so the relay needs no bookkeeping for a line only -v prints.
_TCPI_BYTES_ACKED_AT = 120
_TCPI_BYTES_RECEIVED_AT = 128
_TCPI_NEEDED_BYTES = 136


def _tcp_counters(sock: _socket.socket) -> tuple[int, int] | None:
    """(bytes the peer acknowledged, bytes received) by the kernel's count, or None if unknown."""
    import _socket

    option = getattr(_socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(_socket.IPPROTO_TCP, option, _TCPI_NEEDED_BYTES)
    except OSError:
        return None
    if len(info) < _TCPI_NEEDED_BYTES:
        return None
    acked = int.from_bytes(info[_TCPI_BYTES_ACKED_AT:_TCPI_BYTES_RECEIVED_AT], sys.byteorder)
    received = int.from_bytes(info[_TCPI_BYTES_RECEIVED_AT:_TCPI_NEEDED_BYTES], sys.byteorder)
    return acked, received


def _trace_counters_at_error(
    trace: Timeline, sock: _socket.socket, at_start: tuple[int, int], trailing: int
) -> None:
    """After a reset or another relay error: what got through each way, for the -v timeline."""
    now = _tcp_counters(sock)
    if now is None:
        return
    acked, received = now[0] - at_start[0], now[1] - at_start[1] + trailing
    trace(
        f"ended by an error: the peer had acknowledged {acked} bytes sent by us, and we had "
        f"received {received} bytes from it (kernel TCP counters, proxy handshakes excluded)"
    )
