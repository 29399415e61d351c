"""``hopcat -u``: nc's UDP mode, relayed over any ``Datagrams`` (``hopcat.net.datagram``).

One poll loop, no threads, stdin and stdout left blocking (poll says when they are ready, and a
stdout that blocks only makes the kernel drop datagrams, as UDP may):

* each read of stdin (at most 65507 bytes) is one datagram, as in nc: a line from a terminal, a
  whole write from a pipe or a message from a SOCK_SEQPACKET socket;
* each datagram received is written to stdout whole, nothing added;
* stdin's EOF sends nothing (UDP has no FIN) and hopcat keeps receiving, as nc.openbsd does:
  until ``-q SECS`` after the EOF (``-q 0``: at once), ``-W N`` datagrams received, ``-w SECS``
  with no datagram either way, or a signal. UDP has no end of stream, so ``-w``'s expiry is the
  ordinary end of an exchange here: exit 0, as nc's (over TCP hopcat's ``-w`` is exit 75);
* stdout's reader gone (EPIPE) ends quietly once stdin has ended, else is exit 74 with the count,
  as in the TCP relay;
* the association's control connection (SOCKS5) readable: the proxy ended the association, exit
  74 with one line; a direct socket has none;
* ICMP port unreachable from the target ends hopcat with exit 69 (``ConnectedUDP``).

Listen (``-u -l [ADDR] PORT``): bind, wait for the first datagram, ``connect()`` to its sender
(nc's lock-on: the kernel then drops every other source) and relay as above; stdin is read only
from then on, since until then there is nobody to send it to. With ``-k`` the socket stays
unconnected: datagrams from any source are written out (nc.openbsd's ``-u -l -k``) and each
stdin datagram goes to the latest sender (nc sends it nowhere).
"""

from __future__ import annotations

import _socket as socket
import errno
import os
import select
import time

from hopcat.errors import ConnectError, HopcatError, RelayError, UsageError
from hopcat.net.datagram import (
    RECEIVE_BYTES,
    ConnectedUDP,
    udp_error,
    udp_socket,
)
from hopcat.net.dial import sockaddr_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hopcat._url import ProxyURL
    from hopcat.cli import Timeline
    from hopcat.cli._args import Options
    from hopcat.net.datagram import Datagrams

MAX_POLL_MS = 2**31 - 1
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def main(options: Options, trace: Timeline) -> int:
    """``-u`` connect or ``-u -l`` listen: relay until one of the module's ends; 0 or raises."""
    for note in options.notes:
        trace(note)
    received_limit = None
    if options.recv_count is not None:
        from hopcat.cli._args import positive_int

        received_limit = positive_int(options.recv_count, "-W")
    datagrams = _listen(options, trace) if options.listen else _connect(options, trace)
    try:
        relay_datagrams(datagrams, options, trace, received_limit=received_limit)
    finally:
        datagrams.close()
    return 0


def _connect(options: Options, trace: Timeline) -> Datagrams:
    from hopcat._endpoint import parse_port, validate_host
    from hopcat._environment import proxies_from_environment
    from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S
    from hopcat.cli._proxy import proxies_from_command_line

    if len(options.operands) != 2:
        raise UsageError("-u: expected HOST PORT (see hopcat --help)")
    host = validate_host(options.operands[0], what="host")
    port = parse_port(options.operands[1])
    hops = proxies_from_command_line(options)
    if not hops and not options.no_proxy:
        hops, _why = proxies_from_environment(os.environ, host)
    timeout_s = options.connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S
    deadline = time.monotonic() + timeout_s
    return _open_datagrams(options, hops, host, port, deadline, trace)


def _open_datagrams(
    options: Options, hops: list[ProxyURL], host: str, port: int, deadline: float,
    trace: Timeline,
) -> Datagrams:  # fmt: skip
    """The Datagrams to HOST PORT: a connected UDP socket directly, a UDP association through
    a SOCKS5 proxy."""
    if not hops:
        return connect_udp(options, host, port, deadline, trace)
    from hopcat.cli._args import wants_tuning

    # The association's UDP socket is the library's, made for the relay: what these would set
    # on it is refused rather than silently left out.
    for given, flag in ((options.source_port is not None, "-p"), (options.broadcast, "-b"),
                        (wants_tuning(options), "-I/-O/-T/-M/-D")):  # fmt: skip
        if given:
            raise UsageError(f"-u through a proxy: {flag} is not supported (the datagrams go "
                             "to the proxy's relay)")  # fmt: skip
    from hopcat._endpoint import format_hostport
    from hopcat._environment import fill_users
    from hopcat.cli._args import DEFAULT_CONNECT_TIMEOUT_S, address_family
    from hopcat.cli._proxy import apply_auth_schemes, fill_passwords
    from hopcat.net.udp_socks5 import open_association

    for note in fill_users(hops, os.environ):
        trace(note)
    apply_auth_schemes(hops, options)
    fill_passwords(hops, os.environ, password_file=options.proxy_password_file,
                   password_command=options.proxy_password_command, trace=trace)  # fmt: skip
    # As for TCP: the clock starts once the passwords are in.
    deadline = time.monotonic() + (options.connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S)
    association = open_association(
        hops, host, port, deadline=deadline, family=address_family(options),
        source=options.source, proxy_dns=options.proxy_dns or "remote",
        numeric_only=options.numeric, cafile=options.proxy_cacert,
        insecure=options.proxy_insecure, trace=trace if options.verbose else None,
    )  # fmt: skip
    if options.verbose:
        trace(f"UDP association: datagrams go to the relay "
              f"{format_hostport(*association.relay)} for {format_hostport(host, port)}")  # fmt: skip
    return association


def connect_udp(
    options: Options, host: str, port: int, deadline: float, trace: Timeline
) -> ConnectedUDP:
    """A UDP socket connected to the first address of HOST that takes it (a connect sends
    nothing: it fails only without a route or a source address of that family)."""
    from hopcat._endpoint import format_hostport
    from hopcat.cli._args import address_family
    from hopcat.net.dial import connect_failed, describe_oserror, interleave_families, resolve

    infos = interleave_families(resolve(host, port, family=address_family(options),
                                        deadline=deadline, numeric_only=options.numeric))  # fmt: skip
    from hopcat.cli._listen import socket_tuning

    tuning = socket_tuning(options)
    failures: list[tuple[str, int]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        sock = udp_socket(family, broadcast=options.broadcast)
        try:
            if tuning is not None:
                tuning.apply(sock, family)
            if options.source is not None or options.source_port is not None:
                _bind_source(sock, family, options)
            sock.connect(sockaddr)
        except ConnectError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EACCES and not options.broadcast:
                raise ConnectError(f"udp {format_hostport(host, port)}: "
                                   f"{describe_oserror(exc)} (a broadcast address needs -b)",
                                   errno=exc.errno) from None  # fmt: skip
            failures.append((sockaddr_text(sockaddr), exc.errno or 0))
            continue
        except BaseException:
            sock.close()
            raise
        local = sockaddr_text(sock.getsockname())
        trace(f"udp to {sockaddr_text(sockaddr)} (local {local})")
        return ConnectedUDP(sock, format_hostport(host, port))
    raise connect_failed(f"udp {format_hostport(host, port)}", failures)


def _bind_source(sock: socket.socket, family: int, options: Options) -> None:
    from hopcat._endpoint import parse_port

    address = options.source or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    port = 0
    if options.source_port is not None:
        port = parse_port(options.source_port, what="-p source port")
    try:
        info = socket.getaddrinfo(address, port, family, socket.SOCK_DGRAM, 0,
                                  socket.AI_NUMERICHOST | socket.AI_PASSIVE)[0]  # fmt: skip
        sock.bind(info[4])
    except OSError as exc:
        from hopcat.net.dial import describe_oserror

        raise ConnectError(f"bind source address {address} port {port}: "
                           f"{describe_oserror(exc)}", errno=exc.errno) from None  # fmt: skip


# ------------------------------------------------------------------------------ listen
class AnySource(ConnectedUDP):
    """``-u -l -k``: an unconnected socket; every source's datagrams are received, and each one
    sent goes to the latest sender (``peer``)."""

    def __init__(self, sock: socket.socket, trace: Timeline) -> None:
        super().__init__(sock, "the latest sender")
        self.trace = trace

    def send(self, data: bytes) -> None:
        if self.peer is None:
            self.stats.count_dropped("no sender yet")
            return
        try:
            self.sock.sendto(data, self.peer)
        except BlockingIOError:
            self.stats.count_dropped("send buffer full")
            return
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:  # the latest sender left: wait for the next
                self.stats.count_dropped("sender gone (ICMP port unreachable)")
                return
            raise udp_error(exc, f"udp to {sockaddr_text(self.peer)}", "sending") from None
        self.stats.count_sent(len(data))

    def receive(self) -> bytes | None:
        try:
            data, sender = self.sock.recvfrom(RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:  # an earlier sendto's ICMP, queued: not fatal
                return None
            raise udp_error(exc, "udp", "receiving") from None
        if sender != self.peer:
            self.peer = sender
            self.trace(f"datagrams from {_shown(sender)}")
        self.stats.count_received(len(data))
        return data


def _shown(sockaddr: tuple[object, ...]) -> str:
    from hopcat.cli._listen import _unmapped_host

    return sockaddr_text((_unmapped_host(str(sockaddr[0])), sockaddr[1]))


def _listen(options: Options, trace: Timeline) -> Datagrams:
    from hopcat.cli._listen import listen_address, ready_fd_of

    announce_fd = ready_fd_of(options.ready_fd)
    address, port = listen_address(options)
    sock = _bound_udp(address, port, options)
    try:
        name = sockaddr_text(sock.getsockname())
        trace(f"listening on {name} (udp)")
        if announce_fd is not None or options.ready_file is not None:
            from hopcat._ready import announce_ready

            announce_ready([name], ready_fd=announce_fd, ready_file=options.ready_file)
        if options.keep_open:
            return AnySource(sock, trace)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        while True:
            poller.poll()
            try:
                _data, sender = sock.recvfrom(1, socket.MSG_PEEK)
            except OSError:
                continue  # an ICMP error queued for nothing of ours yet: keep waiting
            break
        sock.connect(sender)
        trace(f"datagrams from {_shown(sender)}: locked on to it (nc)")
        return ConnectedUDP(sock, _shown(sender), sender)
    except BaseException:
        sock.close()
        raise


def _bound_udp(address: str | None, port: int, options: Options) -> socket.socket:
    from hopcat._endpoint import format_hostport
    from hopcat.cli._args import address_family
    from hopcat.cli._listen import _listen_error

    family = address_family(options)
    from hopcat.cli._listen import socket_tuning

    tuning = socket_tuning(options)
    candidates: list[tuple[int, tuple[object, ...], bool]] = []
    if address is None:
        if family != socket.AF_INET:
            candidates.append((socket.AF_INET6, ("::", port), family == socket.AF_INET6))
        if family != socket.AF_INET6:
            candidates.append((socket.AF_INET, ("0.0.0.0", port), False))
    else:
        flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if options.numeric else 0)
        try:
            info = socket.getaddrinfo(address, port, family, socket.SOCK_DGRAM, 0, flags)[0]
        except socket.gaierror as exc:
            from hopcat.errors import ResolveError
            from hopcat.net.dial import describe_oserror

            raise ResolveError(f"listen address {address}: {describe_oserror(exc)}") from None
        candidates.append((info[0], info[4], True))
    for index, (fam, sockaddr, v6only) in enumerate(candidates):
        sock = None
        try:
            sock = udp_socket(fam, broadcast=options.broadcast)
            if tuning is not None:
                tuning.apply(sock, fam)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind(sockaddr)
            return sock
        except OSError as exc:  # udp_socket's RelayError too: it carries the errno
            if sock is not None:
                sock.close()
            if index + 1 < len(candidates) and exc.errno in _NO_IPV6:
                continue  # no IPv6 here: IPv4 alone
            where = format_hostport(str(sockaddr[0]), port)
            raise _listen_error(f"{where} (udp)", exc) from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
    raise AssertionError("no candidate address")  # candidates is never empty


# ------------------------------------------------------------------------------ the relay
def relay_datagrams(
    datagrams: Datagrams, options: Options, trace: Timeline, *, received_limit: int | None,
    in_fd: int = 0, out_fd: int = 1,
) -> None:  # fmt: skip
    """The loop of the module header; returns at its ordinary ends, raises HopcatError."""
    from hopcat.relay.pump import write_all

    stats = datagrams.stats
    read, send, max_payload = os.read, datagrams.send, datagrams.max_payload  # the hot path's
    each = options.verbose >= 2
    started = last_activity = time.monotonic()
    idle_s = options.idle_timeout_s or None
    quit_at: float | None = None
    net_fd = datagrams.fileno()
    control_fd = datagrams.control_fileno()
    poller = select.poll()
    poller.register(net_fd, select.POLLIN)
    if control_fd is not None:
        poller.register(control_fd, select.POLLIN)
    reading = not options.no_stdin
    if reading:
        poller.register(in_fd, select.POLLIN)
    try:
        if not reading and options.quit_after_eof_s is not None:
            quit_at = started + options.quit_after_eof_s
        # Invariant: every datagram read from stdin has been handed to send(), every one
        # received to stdout; the deadlines below are the only other ways out.
        while True:
            # The clock is read only where a deadline needs it: a datagram's turn is a few
            # microseconds, and each call here is a measurable share of it (bench/udp.py).
            timeout_ms = None
            if quit_at is not None or idle_s is not None:
                deadlines = [] if quit_at is None else [quit_at]
                if idle_s is not None:
                    deadlines.append(last_activity + idle_s)
                wait_ms = (min(deadlines) - time.monotonic()) * 1000
                timeout_ms = 0 if wait_ms <= 0 else int(min(wait_ms, MAX_POLL_MS) + 0.999)
            ready = poller.poll(timeout_ms)
            if timeout_ms is not None:
                # Checked on every wake-up: a steady stream of datagrams (or of dropped ones)
                # must not hold -q's or -w's end off.
                now = time.monotonic()
                if quit_at is not None and now >= quit_at:
                    trace(f"quitting {options.quit_after_eof_s:g} s after stdin EOF (-q)")
                    break
                if idle_s is not None and now - last_activity >= idle_s:
                    trace(f"no datagram either way for {idle_s:g} s (-w): done")
                    break
            if not ready:
                continue
            moved = stats.sent + stats.received
            fds = [fd for fd, _events in ready]
            if control_fd is not None and control_fd in fds and datagrams.control_ended():
                raise RelayError("the proxy ended the UDP association (its control connection "
                                 f"closed): {stats.describe()}")  # fmt: skip
            if net_fd in fds:
                data = datagrams.receive()
                if data is not None:
                    if each:
                        trace(f"received a datagram of {len(data)} bytes")
                    try:
                        write_all(out_fd, data)
                    except OSError as exc:
                        from hopcat.relay.pump import writer_left  # only on this error path

                        if exc.errno == errno.EPIPE and (not reading or writer_left(in_fd)):
                            # As in the TCP relay: whoever ran us closed both ends, in either
                            # order (stdin's end may not have been read yet).
                            trace("stdout's reader went away after stdin ended; ending quietly")
                            break
                        raise RelayError(f"writing to stdout: {os.strerror(exc.errno or 0).lower()}"
                                         f" (after {stats.received} datagrams received)") from None  # fmt: skip
                    if received_limit is not None and stats.received >= received_limit:
                        trace(f"{stats.received} datagrams received (-W): done")
                        break
            if reading and in_fd in fds:
                try:
                    chunk = read(in_fd, max_payload)
                except BlockingIOError:
                    continue  # stdin inherited non-blocking, and another reader was first
                except OSError as exc:
                    raise RelayError(f"reading stdin: {os.strerror(exc.errno or 0).lower()}"
                                     f" (after {stats.sent} datagrams sent)") from None  # fmt: skip
                if chunk:
                    if each:
                        trace(f"sending a datagram of {len(chunk)} bytes")
                    send(chunk)
                else:
                    reading = False
                    poller.unregister(in_fd)
                    sent = f"{stats.sent} datagram{'s' * (stats.sent != 1)}"
                    trace(f"stdin EOF after {sent}; still receiving (nc)")
                    if options.quit_after_eof_s is not None:
                        quit_at = time.monotonic() + options.quit_after_eof_s
            if idle_s is not None and stats.sent + stats.received != moved:
                last_activity = time.monotonic()  # a datagram either way, not a dropped one
    except HopcatError:
        if trace.enabled:
            trace(f"ended by an error: {stats.describe()}")
        raise
    if trace.enabled:
        trace(f"done in {time.monotonic() - started:.3f} s: {stats.describe()}")
