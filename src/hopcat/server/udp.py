"""A SOCKS5 UDP association (RFC 1928 section 7): the relay behind one UDP ASSOCIATE.

The control connection's ``Conn`` owns one ``Association``; they end together (see handler).
Two kinds of socket, plain non-blocking ones read by the server's loop (``add_reader``): no
transport and no coroutine per association, and the relay's address is known at once, so the
reply goes out in the same callback as the request:

* the relay socket, bound to the address the control connection came in on, port 0; its address
  is the reply's BND.ADDR/BND.PORT. It takes datagrams only from the client's address, and from
  the port the client announced in its request (when it announced one other than 0; otherwise
  from the port of the first datagram that arrives, as Dante does). Each datagram's header names
  the destination; DATA goes to it from
* an outbound socket per address family (made on first use, wildcard address, port 0). What
  comes back is passed to the client, with a header naming its source, only from an address and
  port the client has sent to lately (the last ``MAX_DESTINATIONS``): a reply, not anyone who
  learnt the port.

Destinations are decided as for CONNECT (``Policy.check_name`` and ``check_address``, the same
default deny of the host's own, loopback, link-local and metadata addresses): an IP literal in
any spelling the resolver accepts is checked as the address it is; a name is resolved once per
association (on the server's resolver threads, within the client's fair share) and each
datagram to it goes to its first address the rules allow for that datagram's port, never to a
second lookup's answer. Datagrams to a name being resolved wait (a few per name); past that, or
past ``MAX_NAMES`` names, they are dropped. A destination once allowed (as the client spelt it,
with its port) is remembered with its address, so the next datagrams to it cost a dict lookup,
until the rules are reloaded or the host's addresses change.

Whatever cannot be relayed is dropped and counted by reason, never answered (``source``: from
another address or port; ``malformed``: no valid header; ``fragment``; ``denied``: by the rules;
``dns``: a name that did not resolve, or too many; ``unsolicited``: from where the client has
not sent; ``send``: the send failed, e.g. too large):
UDP has no way to say why. A refused destination also gets a log line, at most one a second per
association. Fragments (FRAG != 0) are dropped, since fragmentation is optional and unused by
the clients we know (Dante, socksify). Datagrams are not queued when a socket is full: the
kernel's send buffer is the queue, and a full one drops, as UDP would.
"""

from __future__ import annotations

import ipaddress
import socket

from hopcat._endpoint import format_hostport
from hopcat.errors import LocalProtocolError, RemoteProtocolError
from hopcat.proto import socks5_udp
from hopcat.server.handler import compared_name, numeric_address, wire_family
from hopcat.server.policy import resolver_form

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Sequence
    from typing import Any

    from hopcat.net.dial import SockAddr
    from hopcat.server.handler import Conn

RECV_BYTES = 65536  # the largest UDP payload is 65,507 (IPv4) or 65,527 (IPv6) bytes
READ_BATCH = 64  # datagrams read per wake-up, so one busy association cannot starve the loop
MAX_NAMES = 256  # names resolved per association
MAX_WAITING = 8  # datagrams held per name while it resolves
# Bytes held in all while names resolve: what a slow resolver can make one association keep
# (the counts above alone would allow 256 x 8 x 64 KiB).
MAX_WAITING_BYTES = 256 * 1024
MAX_DESTINATIONS = 4096  # replies are taken from the most recent this many (address, port)s
DENIED_LOG_INTERVAL_S = 1.0


def _with_port(sockaddr: SockAddr, port: int) -> SockAddr:
    return (sockaddr[0], port, *sockaddr[2:])


class Association:
    """One UDP association; see the module docstring. Counters are read for the log line."""

    __slots__ = (
        "_denied_logged_at",
        "_host_addresses",
        "_names",
        "_outbound",
        "_policy",
        "_routes",
        "_sent_to",
        "_waiting",
        "_waiting_bytes",
        "bound",
        "bytes_down",
        "bytes_up",
        "client",
        "conn",
        "datagrams_down",
        "datagrams_up",
        "dropped",
        "relay",
    )

    def __init__(self, conn: Conn, local: SockAddr, announced_port: int) -> None:
        """``local``: the control connection's local address (the relay binds to its host);
        ``announced_port``: DST.PORT of the request, 0 when the client did not know it.
        OSError when no socket can be had (the caller refuses the request)."""
        self.conn = conn
        family = socket.AF_INET6 if ":" in str(local[0]) else socket.AF_INET
        relay = socket.socket(family, socket.SOCK_DGRAM)
        try:
            relay.setblocking(False)
            relay.bind((local[0], 0, *local[2:]) if family == socket.AF_INET6 else (local[0], 0))
        except OSError:
            relay.close()
            raise
        self.relay = relay
        self.bound: tuple[str, int] = relay.getsockname()[:2]
        # (address, port) datagrams are taken from; the port is None until the first arrives.
        self.client: tuple[str, int | None] = (conn.client_ip, announced_port or None)
        self._outbound: dict[int, socket.socket] = {}
        self._sent_to: dict[tuple[str, int], None] = {}  # oldest first
        self._names: dict[str, list[tuple[int, SockAddr]]] = {}
        self._waiting: dict[str, list[tuple[int, bytes]]] = {}
        self._waiting_bytes = 0
        self._denied_logged_at = -1e9
        # (host as sent, port) -> where it was allowed to go, under _policy and _host_addresses.
        self._routes: dict[tuple[str, int], tuple[int, SockAddr]] = {}
        self._policy = conn.server.policy
        self._host_addresses = self._policy.host_addresses
        self.datagrams_up = self.bytes_up = self.datagrams_down = self.bytes_down = 0
        self.dropped: dict[str, int] = {}
        conn.server.loop.add_reader(relay.fileno(), self._on_client_readable)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drops_text(self) -> str | None:
        """``reason:count,...`` for the log line, None when nothing was dropped."""
        if not self.dropped:
            return None
        return ",".join(f"{why}:{n}" for why, n in sorted(self.dropped.items()))

    def _drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1

    def close(self) -> None:
        loop = self.conn.server.loop
        for sock in (self.relay, *self._outbound.values()):
            loop.remove_reader(sock.fileno())
            sock.close()
        self._outbound.clear()
        self._waiting.clear()
        self._waiting_bytes = 0

    # -- client to destinations --------------------------------------------------------------
    def _on_client_readable(self) -> None:
        try:
            self._read_client()
        except Exception as exc:  # a bug: end the association, not a callback called forever
            self.conn.crashed(exc)

    def _read_client(self) -> None:
        for _ in range(READ_BATCH):
            try:
                datagram, source = self.relay.recvfrom(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError:
                if self.relay.fileno() < 0:
                    return  # closed by a datagram of this batch
                continue  # an ICMP error queued on the socket: that datagram is gone, not us
            self._from_client(datagram, source)

    def _from_client(self, datagram: bytes, source: Any) -> None:
        address, port = str(source[0]), int(source[1])
        want_address, want_port = self.client
        if address != want_address or (want_port is not None and port != want_port):
            self._drop("source")
            return
        if want_port is None:
            self.client = (address, port)
        try:
            parsed = socks5_udp.unpack(datagram)
        except RemoteProtocolError:
            self._drop("malformed")
            return
        if parsed.frag:
            self._drop("fragment")
            return
        policy = self.conn.server.policy
        if policy is not self._policy or policy.host_addresses is not self._host_addresses:
            self._routes.clear()  # reloaded rules, or the host's addresses changed
            self._policy, self._host_addresses = policy, policy.host_addresses
        route = self._routes.get((parsed.host, parsed.port))
        if route is not None:
            self._send_out(*route, parsed.data)
            return
        wire = resolver_form(parsed.host)
        if wire is None:
            self._drop("dns")
            return
        literal = numeric_address(wire, 0)  # CONNECT's parser: no spelling escapes
        if literal is not None:
            self._send_checked(None, parsed.host, [literal], parsed.port, parsed.data)
            return
        name = compared_name(wire)
        server = self.conn.server
        if server.policy.check_name(name, parsed.port) is False:
            self._denied(format_hostport(parsed.host, parsed.port), "not allowed by the rules")
            return
        candidates = self._names.get(name)
        if candidates is not None:
            self._send_checked(name, parsed.host, candidates, parsed.port, parsed.data)
            return
        if self._waiting_bytes + len(parsed.data) > MAX_WAITING_BYTES:
            self._drop("dns")
            return
        waiting = self._waiting.get(name)
        if waiting is not None:
            if len(waiting) < MAX_WAITING:
                waiting.append((parsed.port, parsed.data))
                self._waiting_bytes += len(parsed.data)
            else:
                self._drop("dns")
            return
        if len(self._names) + len(self._waiting) >= MAX_NAMES:
            self._drop("dns")
            return
        self._waiting[name] = [(parsed.port, parsed.data)]
        self._waiting_bytes += len(parsed.data)
        future = server.lookup(self.conn, wire, 0)
        future.add_done_callback(lambda done: self._on_resolved(name, parsed.host, done))

    def _on_resolved(
        self, name: str, host: str, future: asyncio.Future[Sequence[tuple[Any, ...]]]
    ) -> None:
        try:
            self._resolved(name, host, future)
        except Exception as exc:
            self.conn.crashed(exc)

    def _resolved(
        self, name: str, host: str, future: asyncio.Future[Sequence[tuple[Any, ...]]]
    ) -> None:
        waiting = self._waiting.pop(name, None)
        if waiting is None:
            return  # closed meanwhile
        self._waiting_bytes -= sum(len(data) for _port, data in waiting)
        try:
            infos = future.result()
        except (OSError, UnicodeError, ValueError):
            self._names[name] = []
        else:
            self._names[name] = [
                (info[0], info[4]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)
            ]
        for port, data in waiting:
            self._send_checked(name, host, self._names[name], port, data)

    def _send_checked(
        self, name: str | None, host: str, candidates: list[tuple[int, SockAddr]], port: int,
        data: bytes,
    ) -> None:  # fmt: skip
        """Send ``data`` to the first of ``candidates`` the rules allow for ``port``."""
        family = self.conn.server.family
        if not candidates:
            self._drop("dns")
            return
        if family:
            candidates = [item for item in candidates if wire_family(*item) == family]
            if not candidates:
                which = "IPv4 address (-4)" if family == socket.AF_INET else "IPv6 address (-6)"
                self._denied(format_hostport(host, port), f"no {which}")
                return
        policy = self.conn.server.policy
        for family, sockaddr in candidates:
            if policy.check_address(name, ipaddress.ip_address(sockaddr[0]), port):
                if len(self._routes) >= MAX_DESTINATIONS:
                    self._routes.clear()
                route = self._routes[(host, port)] = (family, _with_port(sockaddr, port))
                self._send_out(*route, data)
                return
        why = "not allowed by the rules" if name is None else "every address denied by the rules"
        self._denied(format_hostport(host, port), why)

    def _denied(self, dest: str, why: str) -> None:
        self._drop("denied")
        server = self.conn.server
        now = server.loop.time()
        if now - self._denied_logged_at >= DENIED_LOG_INTERVAL_S:
            self._denied_logged_at = now
            server.logger.log(
                "udp-denied", client=self.conn.peer, dest=dest, reason=why,
                dropped=self.dropped["denied"],
            )  # fmt: skip

    def _send_out(self, family: int, sockaddr: SockAddr, data: bytes) -> None:
        try:
            sock = self._outbound.get(family) or self._open_outbound(family)
            sock.sendto(data, sockaddr)
        except OSError:  # EMSGSIZE, a full buffer (EAGAIN), no route, no descriptor
            self._drop("send")
            return
        key = (str(sockaddr[0]), int(sockaddr[1]))
        if key in self._sent_to:
            del self._sent_to[key]  # to the end: the most recent
        elif len(self._sent_to) >= MAX_DESTINATIONS:
            del self._sent_to[next(iter(self._sent_to))]
        self._sent_to[key] = None
        self.conn.active = True
        self.datagrams_up += 1
        self.bytes_up += len(data)

    def _open_outbound(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError:
            sock.close()
            raise
        self._outbound[family] = sock
        self.conn.server.loop.add_reader(sock.fileno(), self._on_reply_readable, sock)
        return sock

    # -- destinations to the client ----------------------------------------------------------
    def _on_reply_readable(self, sock: socket.socket) -> None:
        try:
            self._read_replies(sock)
        except Exception as exc:
            self.conn.crashed(exc)

    def _read_replies(self, sock: socket.socket) -> None:
        for _ in range(READ_BATCH):
            try:
                data, source = sock.recvfrom(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError:
                if sock.fileno() < 0:
                    return
                continue  # an ICMP error for an earlier datagram
            self._to_client(data, str(source[0]), int(source[1]))

    def _to_client(self, data: bytes, address: str, port: int) -> None:
        client_address, client_port = self.client
        if (address, port) not in self._sent_to or client_port is None:
            self._drop("unsolicited")
            return
        try:
            header_host = address.partition("%")[0]  # the header has no room for a scope
            self.relay.sendto(
                socks5_udp.pack(header_host, port, data), (client_address, client_port)
            )
        except (OSError, LocalProtocolError):  # EMSGSIZE: header and data over 64 KiB
            self._drop("send")
            return
        self.conn.active = True
        self.datagrams_down += 1
        self.bytes_down += len(data)
