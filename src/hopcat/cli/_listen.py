"""Listen mode (``hopcat -l``) and Unix sockets (``-U``): the other half of a netcat.

``hopcat -l [ADDR] PORT`` (or nc's ``-l -p PORT [-s ADDR]``) accepts one connection and relays
it with stdin and stdout under the connect mode's end-of-stream rules (``hopcat.relay.pump``),
then exits with the relay's outcome. ``-k`` accepts the next connection when one ends, one at a
time as nc does; stdout stays open between them, and a connection that fails is reported and
does not end the listener. Without ADDR the listener takes every address, IPv6 and IPv4 on one
dual-stack socket where the system has IPv6 (``-4``: IPv4 only, ``-6``: IPv6 only).

ncat's ``--allow``/``--deny`` (addresses or CIDR networks, comma-separated, repeatable) are the
server's client rules (``hopcat.server.policy``): a denied client is closed at once and the
listener goes on waiting; with any ``--allow``, clients it does not name are denied.

Unix sockets: ``-U PATH`` connects to a stream socket, ``-l -U PATH`` listens on one; ``@name``
is a Linux abstract name. A listener creates its socket file and removes it when it ends, unless
another file has replaced it meanwhile. A socket file already at PATH is never unlinked: a
program still listening there is "in use", one nobody listens on is "stale" (remove it by hand),
anything else is "not a socket". Each is one line and exit 69.

``-v`` says where hopcat listens and who connected; ``--ready-fd``/``--ready-file`` announce the
bound address as ``hopcat serve`` does (``hopcat._ready``).
"""

from __future__ import annotations

import errno
import os
import socket

from hopcat._endpoint import format_hostport, parse_port, validate_host
from hopcat.errors import ExitCode, HopcatError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from typing import NoReturn

    from hopcat.cli import Timeline
    from hopcat.cli._args import Options
    from hopcat.cli._sockopts import Tuning
    from hopcat.net.tls import TLSLayers
    from hopcat.server.policy import Policy

    Relay = Callable[[socket.socket], int]

BACKLOG = 16
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


class ListenError(HopcatError):
    """The listener could not be set up: the address is in use, not ours, or a stale socket."""

    exit_code = ExitCode.UNAVAILABLE


# ------------------------------------------------------------------------------ listening sockets
def listening_socket(options: Options) -> tuple[socket.socket, str, str | None]:
    """The listener, how -v names it, and the Unix socket file it created (None: none)."""
    if options.unix:
        if len(options.operands) != 1 or options.source_port is not None:
            raise UsageError("-l -U takes one operand, the socket's PATH (@name: abstract)")
        return _unix_listener(options.operands[0], socket_tuning(options))
    address, port = listen_address(options)
    return _tcp_listener(address, port, options), "", None


def listen_address(options: Options) -> tuple[str | None, int]:
    """-l's [ADDR] PORT (or nc's -p PORT with -s ADDR): the address (None: every one), the port."""
    operands = list(options.operands)
    address = options.source
    if options.source_port is not None:
        if len(operands) > 1 or (operands and address is not None):
            raise UsageError("-l -p PORT takes no operand, or only the address to listen on")
        if operands:
            address = operands[0]
        port_text = options.source_port
    elif len(operands) == 2 and address is None:
        address, port_text = operands
    elif len(operands) == 1:
        port_text = operands[0]
    else:
        raise UsageError("-l takes [ADDR] PORT (or nc's -p PORT, with -s ADDR)")
    port = parse_port(port_text, what="port", allow_zero=True)
    if address is not None:
        address = validate_host(address, what="listen address")
    return address, port


def _tcp_listener(address: str | None, port: int, options: Options) -> socket.socket:
    tuning = socket_tuning(options)
    from hopcat.cli._args import address_family

    family = address_family(options)
    if address is None:
        if family != socket.AF_INET:
            try:
                return _bind_tcp(socket.AF_INET6, ("::", port), tuning,
                                 v6only=family == socket.AF_INET6)  # fmt: skip
            except OSError as exc:
                if family == socket.AF_INET6 or exc.errno not in _NO_IPV6:
                    raise _listen_error(f"[::]:{port}", exc) from None
                # No IPv6 here: IPv4 alone.
        try:
            return _bind_tcp(socket.AF_INET, ("0.0.0.0", port), tuning)
        except OSError as exc:
            raise _listen_error(f"0.0.0.0:{port}", exc) from None
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if options.numeric else 0)
    try:
        infos = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        from hopcat.errors import ResolveError
        from hopcat.net.dial import describe_oserror

        raise ResolveError(f"listen address {address}: {describe_oserror(exc)}") from None
    info = infos[0]
    try:
        return _bind_tcp(info[0], info[4], tuning, v6only=True)
    except OSError as exc:
        raise _listen_error(format_hostport(address, port), exc) from None


def _bind_tcp(
    family: int, sockaddr: tuple[object, ...], tuning: Tuning | None, *, v6only: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if tuning is not None:
            tuning.apply(sock, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_error(where: str, exc: OSError) -> ListenError:
    from hopcat.net.dial import describe_oserror

    return ListenError(f"listen on {where}: {describe_oserror(exc)}")


def socket_tuning(options: Options) -> Tuning | None:
    """nc's -I/-O/-T/-M/-D for the listener (accepted connections inherit them) or a -U
    connection; None when none was given."""
    from hopcat.cli._args import wants_tuning

    if not wants_tuning(options):
        return None
    from hopcat.cli._sockopts import Tuning

    return Tuning(options)


def unix_address(path: str) -> str | bytes:
    """A Unix socket address: ``@name`` is Linux's abstract namespace (a leading NUL byte)."""
    if not path or path == "@":
        raise UsageError("-U needs a socket path (or @name for an abstract one)")
    if "\0" in path:
        raise UsageError("-U: a socket path cannot contain a NUL byte")
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def _unix_listener(path: str, tuning: Tuning | None) -> tuple[socket.socket, str, str | None]:
    address = unix_address(path)
    sock = _unix_socket(tuning)
    try:
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(_occupied(path)) from None
            raise _listen_error(path, exc) from None
        try:
            sock.listen(BACKLOG)
        except OSError as exc:
            if not isinstance(address, bytes):
                os.unlink(path)  # ours: bound a moment ago
            raise _listen_error(path, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock, path, None if isinstance(address, bytes) else path


def _unix_socket(tuning: Tuning | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if tuning is not None:
        try:
            tuning.apply(sock, socket.AF_UNIX)
        except BaseException:
            sock.close()
            raise
    return sock


def _occupied(path: str) -> str:
    """Why PATH cannot be bound, without touching what is there."""
    import stat

    if path.startswith("@"):
        return f"listen on {path}: the abstract name is in use"
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return f"listen on {path}: address in use"
    if not stat.S_ISSOCK(mode):
        return f"listen on {path}: the path exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener with a full backlog must not hang us
    try:
        probe.connect(path)
    except BlockingIOError:
        pass  # someone listens there, too busy to take us
    except ConnectionRefusedError:
        return (
            f"listen on {path}: a stale socket file (nothing listens on it); "
            "remove it if it is yours"
        )
    except OSError:
        return f"listen on {path}: address in use"
    finally:
        probe.close()
    return f"listen on {path}: in use by another program"


# ------------------------------------------------------------------------------ accepting
def client_policy(options: Options) -> Policy | None:
    """ncat's --allow/--deny as the server's client rules; None when there are none."""
    if not options.allow and not options.deny:
        return None
    if options.unix:
        raise UsageError("--allow/--deny name network clients; a Unix socket has none (-U)")
    from hopcat.server.policy import Policy, RuleSet, parse_client_rule

    rules = []
    for flag, allow, texts in (("--deny", False, options.deny), ("--allow", True, options.allow)):
        for text in texts:
            for item in text.split(","):
                if not item.strip():
                    raise UsageError(f"{flag} {text!r}: an empty item")
                rules.append(parse_client_rule(item.strip(), allow, what=flag))
    if options.allow:
        rules.append(parse_client_rule("*", False))
    return Policy(RuleSet(rules), restrict_local=False)


def serve_connections(
    listener: socket.socket, options: Options, trace: Callable[[str], None], relay: Relay,
    policy: Policy | None,
) -> int:
    """Accept and relay, once or (-k) until a signal; the last relay's exit code."""
    code = 0
    while True:
        conn, peer = _accept(listener, trace, options)
        who = _describe_peer(peer)
        if not _allowed(policy, peer):
            trace(f"refused {who} (--allow/--deny)")
            conn.close()
            continue
        trace(f"connection from {who}")
        try:
            code = relay(conn)
        except HopcatError as exc:
            if not options.keep_open:
                raise
            from hopcat.cli import _fail

            message = str(exc)  # a TLS failure names the client itself
            code = _fail(message if who in message else f"{who}: {message}", exc.exit_code)
        finally:
            conn.close()
        if not options.keep_open:
            return code


def serve_children(
    listener: socket.socket, argv: list[str], limit: int, policy: Policy | None,
    trace: Callable[[str], None], options: Options, tls: _ListenerTLS | None = None,
) -> NoReturn:
    """``-l -k`` with exec: a child per connection, at most ``limit`` at once, until a signal.
    Children are watched with pidfds in the listener's poll (no SIGCHLD handler, no busy loop);
    at the limit the listener is left unread, so clients wait in the backlog. With --tls the
    child is a fork of hopcat that does the handshake and relays for the program."""
    import select

    from hopcat.cli._exec import ExecError, exit_status, spawn

    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    listening = False
    try:
        while True:
            if len(children) < limit and not listening:
                poller.register(listener.fileno(), select.POLLIN)
                listening = True
            elif len(children) >= limit and listening:
                poller.unregister(listener.fileno())
                listening = False
            for fd, _events in poller.poll():
                if fd != listener.fileno():
                    pid = children.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    _pid, status = os.waitpid(pid, 0)
                    trace(f"pid {pid} exited with status {exit_status(status)}")
                    continue
                conn, peer = _accept(listener, trace, options)
                with conn:
                    who = _describe_peer(peer)
                    if not _allowed(policy, peer):
                        trace(f"refused {who} (--allow/--deny)")
                        continue
                    try:
                        pid = spawn(argv, conn) if tls is None else _fork_tls_child(argv, conn, tls)
                    except ExecError as exc:  # out of processes for now: this client only
                        from hopcat.cli import _fail

                        _fail(f"{who}: {exc}", exc.exit_code)
                        continue
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError as exc:  # out of descriptors after all: wait for this one
                    trace(f"pid {pid}: {os.strerror(exc.errno or 0).lower()}; waiting for it")
                    _pid, status = os.waitpid(pid, 0)
                    trace(f"pid {pid} exited with status {exit_status(status)}")
                    continue
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                trace(f"connection from {who}: {argv[0]} is pid {pid}")
    finally:
        for pidfd in children:
            os.close(pidfd)


def _fork_tls_child(argv: list[str], conn: socket.socket, tls: _ListenerTLS) -> int:
    """A hopcat process for one TLS client of ``-l -k --tls --exec``: handshake, program, relay."""
    from hopcat.cli._exec import ExecError

    try:
        pid = os.fork()
    except OSError as exc:
        raise ExecError(f"cannot fork: {os.strerror(exc.errno or 0).lower()}") from None
    if pid:
        return pid
    code = 70
    try:
        from hopcat.cli._exec import run_child

        code = run_child(argv, conn, tls.accept(conn))
    except HopcatError as exc:
        from hopcat.cli import _fail

        code = _fail(str(exc), exc.exit_code)
    finally:
        os._exit(code)  # whatever happened: a forked child must never return into the listener


def _allowed(policy: Policy | None, peer: object) -> bool:
    if policy is None or not isinstance(peer, tuple):
        return True
    return policy.client_allowed(str(peer[0]))  # the policy unmaps ::ffff:a.b.c.d itself


def _accept(
    listener: socket.socket, trace: Callable[[str], None], options: Options
) -> tuple[socket.socket, object]:
    """The next connection, tuned as a dialled one is (TCP_NODELAY unless --nagle, --keepalive);
    accept errors handled by ``hopcat._accept``'s rules, the same as hopcat serve's."""
    import time

    from hopcat._accept import LISTENER_BROKEN, OUT_OF_RESOURCES, next_backoff

    pause_s = 0.0
    while True:
        try:
            conn, peer = listener.accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                pause_s = next_backoff(pause_s)
                trace(f"accept: {os.strerror(exc.errno or 0).lower()}; retrying in {pause_s:g} s")
                time.sleep(pause_s)
            elif exc.errno in LISTENER_BROKEN:
                raise _listen_error("the listener", exc) from None
            continue  # that connection is gone (ECONNABORTED, EPERM...), not the listener
        pause_s = 0.0
        if conn.family != socket.AF_UNIX:
            from hopcat.net.dial import tune_socket

            try:
                tune_socket(conn, nodelay=not options.nagle, keepalive=options.keepalive)
            except OSError:
                conn.close()  # reset before we could set it up: the next one
                continue
        return conn, peer


def _describe_peer(peer: object) -> str:
    if isinstance(peer, tuple):
        return format_hostport(_unmapped_host(str(peer[0])), int(peer[1]))
    return "a local process" if not peer else f"{peer!r}"


def _unmapped_host(host: str) -> str:
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; rules and people mean a.b.c.d.
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def bound_name(listener: socket.socket, unix_path: str) -> str:
    if listener.family == socket.AF_UNIX:
        return unix_path
    host, port = listener.getsockname()[:2]
    return format_hostport(str(host), int(port))


def file_identity(path: str) -> tuple[int, int, int]:
    status = os.lstat(path)
    return status.st_dev, status.st_ino, status.st_ctime_ns


def remove_socket_file(path: str, identity: tuple[int, int, int] | None) -> None:
    """Unlink the socket file we created, unless another file has taken its place (an inode
    number alone is soon reused)."""
    try:
        if identity is not None and file_identity(path) == identity:
            os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------ the mode
def main(options: Options, trace: Timeline) -> int:
    """``-l`` (TCP or, with -U, a Unix socket) or ``-U PATH`` to connect."""
    from hopcat.cli import relay_connected

    for note in options.notes:
        trace(note)
    if not options.listen:
        return _connect_unix(options, trace)
    ready_fd = ready_fd_of(options.ready_fd)
    policy = client_policy(options)
    from hopcat.cli._exec import exec_argv

    argv = exec_argv(options)
    limit = 0
    if argv is not None:
        from hopcat.cli._exec import max_conns

        limit = max_conns(options)
    elif options.max_conns is not None:
        raise UsageError("--max-conns bounds the children of -k with --exec/--sh-exec")
    listener, unix_path, created = listening_socket(options)
    try:
        identity = file_identity(created) if created else None
    except OSError:
        identity = None
    try:
        name = bound_name(listener, unix_path)
        trace(f"listening on {name}")
        # Before readiness: a certificate that will not load fails the start, not a client.
        tls = _tls_for_listener(listener, options, trace) if options.tls else None
        if ready_fd is not None or options.ready_file is not None:
            from hopcat._ready import announce_ready

            announce_ready([name], ready_fd=ready_fd, ready_file=options.ready_file)

        if argv is not None and options.keep_open:
            serve_children(listener, argv, limit, policy, trace, options, tls)
        if argv is not None:
            command = argv

            def relay(conn: socket.socket) -> int:
                from hopcat.cli._exec import run_child

                if tls is None:
                    return run_child(command, conn)
                return run_child(command, conn, tls.accept(conn))
        else:
            # -C/-i: one feeding thread for the whole process, whose pipe every client's relay
            # reads in turn (a thread per client would race the last one for stdin).
            if (options.crlf or options.interval_s) and not options.no_stdin:
                from hopcat.cli._lines import paced_stdin

                shared_in = paced_stdin(options.crlf, options.interval_s or 0.0)
            else:
                shared_in = 0

            def relay(conn: socket.socket) -> int:
                layers = None if tls is None else tls.accept(conn)
                return relay_connected(conn, options, trace, close_output=not options.keep_open,
                                       in_fd=shared_in, layers=layers)  # fmt: skip

        return serve_connections(listener, options, trace, relay, policy)
    finally:
        listener.close()
        if created:
            remove_socket_file(created, identity)


class _ListenerTLS:
    """-l --tls: the server context (made before the first client) and each client's
    handshake, within the connect timeout."""

    def __init__(self, context: ssl.SSLContext, options: Options, trace: Timeline) -> None:
        from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S

        self.context = context
        self.trace = trace
        timeout_s = options.connect_timeout_s
        self.timeout_s = DEFAULT_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s

    def accept(self, conn: socket.socket) -> TLSLayers:
        from hopcat.cli._tls import accept_tls

        who = f"client {_describe_peer(conn.getpeername())}"
        return accept_tls(conn, self.context, who, timeout_s=self.timeout_s, trace=self.trace)


def _tls_for_listener(listener: socket.socket, options: Options, trace: Timeline) -> _ListenerTLS:
    from hopcat.cli._tls import listen_context

    names = ["localhost", "127.0.0.1", "::1"]
    if listener.family != socket.AF_UNIX:
        address = _unmapped_host(str(listener.getsockname()[0]))
        if address not in names and address not in ("0.0.0.0", "::"):
            names.append(address)
    return _ListenerTLS(listen_context(options, names, trace), options, trace)


def ready_fd_of(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isdigit() and text.isascii()):
        raise UsageError(f"--ready-fd takes a descriptor number, not {text!r}")
    from hopcat._ready import check_ready_fd

    return check_ready_fd(int(text))


def _connect_unix(options: Options, trace: Timeline) -> int:
    from hopcat.cli import relay_connected
    from hopcat.errors import ConnectError
    from hopcat.net.dial import describe_oserror

    if len(options.operands) != 1:
        raise UsageError("-U takes one operand, the socket's PATH (@name: abstract)")
    path = options.operands[0]
    from hopcat.cli._exec import exec_argv

    argv = exec_argv(options)
    target_tls = None
    if options.tls:
        from hopcat.cli import _tls

        target_tls = _tls.connect_context(options)
        _tls.warn_insecure(options)
    sock = _unix_socket(socket_tuning(options))
    try:
        try:
            sock.connect(unix_address(path))
        except OSError as exc:
            raise ConnectError(f"connect to {path}: {describe_oserror(exc)}",
                               errno=exc.errno) from None  # fmt: skip
        trace(f"connected to {path}")
        layers = None
        if target_tls is not None:
            import time

            from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S
            from hopcat.net.chain import Tunnel

            timeout_s = options.connect_timeout_s
            timeout_s = DEFAULT_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
            deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
            tunnel = Tunnel(sock, b"", None)
            _tls.start_client(tunnel, *target_tls, path, None, deadline=deadline, trace=trace)
            layers = tunnel.layers
        if argv is not None:
            from hopcat.cli._exec import run_child

            return run_child(argv, sock, layers)
        return relay_connected(sock, options, trace, layers=layers)
    finally:
        sock.close()
