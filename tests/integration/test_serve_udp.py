"""``hopcat serve`` answering SOCKS5 UDP ASSOCIATE (RFC 1928 section 7), with real clients.

- A client written here (TCP control connection, a UDP socket, ``socks5_udp.pack``/``unpack``)
  against a UDP echo: one datagram in, one out, sizes up to 60,000 bytes, SHA-256 both ways, the
  counters of the tunnel line.
- An independent client: Dante's ``socksify`` running ``nc.openbsd -u`` (see PEERS.md). Not
  ``dig``: BIND 9 (libuv) sends with sendmmsg(2), which socksify 1.4 does not wrap, so its
  query reaches the relay with no header and is dropped as malformed (as it should be).
- Hostile: datagrams from another address or port, forbidden destinations (the default deny of
  an exposed server), malformed headers, fragments, a reply too large to wrap, --via and
  --no-udp refused with reply 7, the per-client cap, the idle timeout, and 1,000 associations
  that leave no descriptor behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_serve_support import (
    IO_TIMEOUT_S,
    ServeProcess,
    connect,
    recv_exact,
    serve_factory,
    socks5_address,
    wait_closed,
)

from hopcat.proto import socks5_udp
from support import Certificates, clean_env

Serve = Callable[..., ServeProcess]
BIG_REQUEST = b"send me the largest datagram"
LARGEST_UDP_PAYLOAD = 65507  # IPv4
SILENCE_S = 0.3  # how long a dropped datagram is given to show up anyway


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


class UdpEcho:
    """A UDP echo on 127.0.0.1 in a thread; ``received`` lists (source, payload). BIG_REQUEST
    is answered with the largest datagram IPv4 carries."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)  # fmt: skip
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[tuple[str, int], bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            data, source = self.sock.recvfrom(65536)
            self.received.append((source, data))
            reply = b"x" * LARGEST_UDP_PAYLOAD if data == BIG_REQUEST else data
            self.sock.sendto(reply, source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    target = UdpEcho()
    yield target
    target.close()


class Association:
    """A SOCKS5 UDP client: the control connection and its UDP socket."""

    def __init__(
        self, server: ServeProcess, *, announce: bool = True, user: str | None = None,
        password: str | None = None,
    ) -> None:  # fmt: skip
        self.control = connect(server)
        family = self.control.family
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((server.host, 0))
        self.udp.settimeout(IO_TIMEOUT_S)
        host, port = self.udp.getsockname()[:2] if announce else ("0.0.0.0", 0)
        self.code, self.relay = associate(self.control, host, port, user, password)

    def send(self, host: str, port: int, data: bytes) -> None:
        self.udp.sendto(socks5_udp.pack(host, port, data), self.relay)

    def receive(self, timeout: float = IO_TIMEOUT_S) -> socks5_udp.UdpDatagram:
        self.udp.settimeout(timeout)
        data, source = self.udp.recvfrom(65536)
        assert source[:2] == self.relay
        return socks5_udp.unpack(data)

    def silent(self) -> bool:
        return not select.select([self.udp], [], [], SILENCE_S)[0]

    def close(self) -> None:
        self.control.close()
        self.udp.close()


def associate(
    sock: socket.socket, host: str, port: int, user: str | None = None,
    password: str | None = None,
) -> tuple[int, tuple[str, int]]:  # fmt: skip
    """Greeting (RFC 1929 with ``user``) and UDP ASSOCIATE; (reply code, the relay's address);
    code -2 for a refused login."""
    if user is None:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
    else:
        assert password is not None
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01" + bytes((len(user),)) + user.encode() + bytes((len(password),))
                     + password.encode())  # fmt: skip
        if recv_exact(sock, 2)[1] != 0:
            return -2, ("", 0)
    sock.sendall(b"\x05\x03\x00" + socks5_address(host, port))
    head = recv_exact(sock, 4)
    size = {1: 4, 4: 16}[head[3]]
    raw = recv_exact(sock, size + 2)
    family = socket.AF_INET if size == 4 else socket.AF_INET6
    return head[1], (socket.inet_ntop(family, raw[:size]), int.from_bytes(raw[size:], "big"))


@contextlib.contextmanager
def association(server: ServeProcess, **kwargs: object) -> Iterator[Association]:
    client = Association(server, **kwargs)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        client.close()


def tunnel_line(server: ServeProcess, count: int = 1) -> str:
    server.wait_log("udp=", count=count)
    return [line for line in server.tunnel_lines() if " udp=" in line][count - 1]


# --------------------------------------------------------------------------- relaying


def test_datagrams_keep_their_boundaries_and_bytes(serve: Serve, echo: UdpEcho) -> None:
    server = serve()
    sizes = [1, 2, 60, 512, 1200, 1472, 8192, 16385, 32768, 60000]
    payloads = [os.urandom(size) for size in sizes]
    with association(server) as client:
        assert client.code == 0
        assert client.relay[0] == "127.0.0.1"
        back = []
        for payload in payloads:
            client.send("127.0.0.1", echo.port, payload)
            reply = client.receive()
            assert (reply.host, reply.port, reply.frag) == ("127.0.0.1", echo.port, 0)
            back.append(reply.data)
        # A name is resolved (once) and the reply names the address it came from.
        client.send("localhost", echo.port, b"by name")
        reply = client.receive()
        assert (reply.host, reply.data) == ("127.0.0.1", b"by name")
    sent = [data for _source, data in echo.received]
    assert [len(data) for data in back] == sizes
    digest = hashlib.sha256(b"".join(payloads)).hexdigest()
    assert hashlib.sha256(b"".join(sent[:-1])).hexdigest() == digest
    assert hashlib.sha256(b"".join(back)).hexdigest() == digest
    line = tunnel_line(server)
    total = sum(sizes) + len(b"by name")
    for field in (f"up={total}", f"down={total}", "dgrams_up=11", "dgrams_down=11",
                  "dropped=0", "result=ok", "proto=socks5"):  # fmt: skip
        assert f" {field}" in line, line


def test_socksify_runs_nc_over_udp_through_serve(
    serve: Serve, echo: UdpEcho, need: Callable[..., str], tmp_path: Path
) -> None:
    socksify = need("socksify", "dante-client")
    nc = need("nc.openbsd", "netcat-openbsd")
    server = serve()
    conf = tmp_path / "socks.conf"
    conf.write_text(
        "route {\n"
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {server.port}\n"
        "  proxyprotocol: socks_v5\n  protocol: tcp udp\n  method: none\n}\n"
    )
    env = clean_env(SOCKS_CONF=str(conf), SOCKS_AUTOADD_LANROUTES="no")
    proc = subprocess.Popen(
        [socksify, nc, "-u", "127.0.0.1", str(echo.port)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        got = b""
        for line in (b"first datagram\n", b"second one\n"):
            proc.stdin.write(line)
            proc.stdin.flush()
            deadline = time.monotonic() + IO_TIMEOUT_S
            while not got.endswith(line) and time.monotonic() < deadline:
                if select.select([proc.stdout], [], [], 0.1)[0]:
                    got += os.read(proc.stdout.fileno(), 65536)
        assert got == b"first datagram\nsecond one\n"
    finally:
        proc.kill()
        _out, err = proc.communicate(timeout=IO_TIMEOUT_S)
    assert [data for _source, data in echo.received] == [b"first datagram\n", b"second one\n"]
    line = tunnel_line(server)
    assert " dgrams_up=2 " in line and " dgrams_down=2 " in line, (line, err)


def test_ipv6_and_username_auth(serve: Serve) -> None:
    echo = UdpEcho("::1")
    try:
        server = serve("--auth", "alice:udp-pass-3", listen=("[::1]:0",))
        with association(server, user="alice", password="udp-pass-3") as client:
            assert client.code == 0 and client.relay[0] == "::1"
            client.send("::1", echo.port, b"six")
            reply = client.receive()
            assert (reply.host, reply.port, reply.data) == ("::1", echo.port, b"six")
        with association(server, user="alice", password="wrong") as client:
            assert client.code == -2
    finally:
        echo.close()
    line = tunnel_line(server)
    assert " user=alice " in line and " dgrams_down=1 " in line, line


def test_control_connection_over_tls(
    serve: Serve, echo: UdpEcho, certificates: Certificates
) -> None:
    server = serve("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key),
                   listen=("tls://127.0.0.1:0",))  # fmt: skip
    server.host, _, port = server.hostport.removeprefix("tls://").rpartition(":")
    server.port = int(port)
    context = certificates.client_context()
    with (
        context.wrap_socket(connect(server), server_hostname="127.0.0.1") as control,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(IO_TIMEOUT_S)
        code, relay = associate(control, *udp.getsockname())
        assert code == 0 and relay[0] == "127.0.0.1"
        udp.sendto(socks5_udp.pack("127.0.0.1", echo.port, b"over tls"), relay)
        assert socks5_udp.unpack(udp.recv(65536)).data == b"over tls"
    line = tunnel_line(server)
    assert " result=ok " in line and " tls=TLS" in line and " dgrams_down=1 " in line, line


# --------------------------------------------------------------------------- hostile


def test_datagrams_from_another_address_or_port_are_dropped(serve: Serve, echo: UdpEcho) -> None:
    server = serve()
    with association(server) as client:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_port:
            other_port.sendto(socks5_udp.pack("127.0.0.1", echo.port, b"port"), client.relay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_address:
            other_address.bind(("127.0.0.2", 0))
            other_address.sendto(socks5_udp.pack("127.0.0.1", echo.port, b"addr"), client.relay)
        client.send("127.0.0.1", echo.port, b"mine")
        assert client.receive().data == b"mine"
    assert [data for _source, data in echo.received] == [b"mine"]
    line = tunnel_line(server)
    assert " dropped=2 drops=source:2" in line, line


def test_unannounced_client_is_locked_on_to_its_first_port(serve: Serve, echo: UdpEcho) -> None:
    server = serve()
    with association(server, announce=False) as client:
        client.send("127.0.0.1", echo.port, b"first")
        assert client.receive().data == b"first"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as late:
            late.sendto(socks5_udp.pack("127.0.0.1", echo.port, b"late"), client.relay)
            assert not select.select([late], [], [], SILENCE_S)[0]
    assert [data for _source, data in echo.received] == [b"first"]
    assert " drops=source:1" in tunnel_line(server)


def test_replies_from_elsewhere_are_dropped(serve: Serve, echo: UdpEcho) -> None:
    server = serve()
    with association(server) as client:
        client.send("127.0.0.1", echo.port, b"hello")
        assert client.receive().data == b"hello"
        outbound = echo.received[0][0]  # the relay's outbound socket, as the target sees it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"unsolicited", outbound)
        assert client.silent()
    assert " drops=unsolicited:1" in tunnel_line(server)


def test_an_exposed_server_drops_datagrams_to_its_own_addresses(
    serve: Serve, echo: UdpEcho
) -> None:
    server = serve("--allow-open", "--allow", f"127.0.0.1:{echo.port}",
                   listen=("0.0.0.0:0",))  # fmt: skip
    server.host = "127.0.0.1"
    with association(server) as client:
        assert client.relay[0] == "127.0.0.1"  # bound where the control connection came in
        for host, port in (("127.0.0.1", echo.port + 1 or 1), ("127.1", 9), ("0", echo.port - 1),
                           ("localhost", 9), ("169.254.169.254", 53)):  # fmt: skip
            client.send(host, port, b"forbidden")
        client.send("127.0.0.1", echo.port, b"allowed")
        assert client.receive().data == b"allowed"
        assert client.silent()
    assert [data for _source, data in echo.received] == [b"allowed"]
    line = tunnel_line(server)
    assert " dropped=5 drops=denied:5" in line, line
    log = server.log()
    assert "event=udp-denied" in log and "dest=127.0.0.1:" in log
    assert log.count("event=udp-denied") <= 2  # at most one a second


def test_malformed_headers_fragments_and_oversize_replies_are_dropped(
    serve: Serve, echo: UdpEcho
) -> None:
    server = serve()
    with association(server) as client:
        good = socks5_udp.pack("127.0.0.1", echo.port, b"x")
        for datagram in (b"", b"\x00", b"\x00\x01" + good[2:], b"\x00\x00\x00\x07" + good[4:],
                         b"\x00\x00\x00\x03\x00", good[:6], b"\x00\x00\x01" + good[3:]):  # fmt: skip
            client.udp.sendto(datagram, client.relay)
        client.send("127.0.0.1", echo.port, BIG_REQUEST)  # answered with 65,507 bytes
        assert client.silent()
        client.send("127.0.0.1", echo.port, b"still here")
        assert client.receive().data == b"still here"
    line = tunnel_line(server)
    assert " drops=fragment:1,malformed:6,send:1" in line, line
    assert " dgrams_up=2 dgrams_down=1 " in line, line


@pytest.mark.parametrize(
    "options", [("--no-udp",), ("--via", "socks5://127.0.0.1:9")], ids=["no-udp", "via"]
)
def test_udp_associate_refused_with_reply_7(serve: Serve, options: tuple[str, ...]) -> None:
    server = serve(*options)
    with connect(server) as sock:
        assert associate(sock, "0.0.0.0", 0)[0] == 7
        wait_closed(sock)
    reason = "--no-udp" if options[0] == "--no-udp" else "--via"
    log = server.wait_log("result=unsupported")
    assert "UDP ASSOCIATE" in log and reason in log


def test_associations_per_client_are_capped(serve: Serve) -> None:
    server = serve("--max-udp-per-client", "2")
    with association(server) as one, association(server) as two:
        assert (one.code, two.code) == (0, 0)
        with connect(server) as sock:
            assert associate(sock, "0.0.0.0", 0)[0] == 1
    assert "--max-udp-per-client" in server.wait_log("result=limit")
    with association(server) as again:  # the cap counts open associations only
        assert again.code == 0


def test_the_association_and_its_control_connection_end_together(
    serve: Serve, echo: UdpEcho
) -> None:
    server = serve("--udp-idle-timeout", "0.5")
    with association(server) as client:
        client.send("127.0.0.1", echo.port, b"ping")
        assert client.receive().data == b"ping"
        assert wait_closed(client.control) == b""  # the idle timeout closed it
        client.send("127.0.0.1", echo.port, b"after")
        assert client.silent()
    assert " result=idle-timeout" in tunnel_line(server)
    assert len(echo.received) == 1


def test_a_thousand_associations_leave_no_descriptor(serve: Serve, echo: UdpEcho) -> None:
    server = serve("--max-udp-per-client", "0")
    with association(server) as warm:  # the resolver threads and the log exist from here on
        warm.send("localhost", echo.port, b"warm")
        assert warm.receive().data == b"warm"
    tunnel_line(server)
    before = server.count_fds()
    for i in range(1000):
        with association(server) as client:
            assert client.code == 0
            if i % 50 == 0:  # some with their outbound socket and a lookup
                client.send("localhost", echo.port, b"%d" % i)
                client.receive()
    tunnel_line(server, count=1001)
    assert server.count_fds() == before


# --------------------------------------------------------------------------- hopcat's own client


def test_hopcats_library_through_serve(serve: Serve, echo: UdpEcho) -> None:
    """hopcat.open_udp and hopcat.aio.create_datagram_endpoint against hopcat serve: the client
    of one issue and the server of the other, each checked against real peers elsewhere."""
    import asyncio

    import hopcat
    import hopcat.aio

    server = serve()
    via = f"socks5h://{server.host}:{server.port}"
    payloads = [os.urandom(size) for size in (1, 1200, 60000)]
    with hopcat.open_udp("127.0.0.1", echo.port, via=via, timeout=10) as association:
        for payload in payloads:
            association.send(payload)
            assert association.recv(timeout=5) == payload

    class Collect(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.queue: asyncio.Queue[bytes] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.queue.put_nowait(data)

    async def main() -> list[bytes]:
        transport, protocol = await hopcat.aio.create_datagram_endpoint(
            Collect, "localhost", echo.port, via=via, timeout=10
        )
        back = []
        for payload in payloads:
            transport.sendto(payload)
            back.append(await asyncio.wait_for(protocol.queue.get(), 5))
        transport.close()
        return back

    assert asyncio.run(main()) == payloads
    assert " dgrams_up=3 dgrams_down=3" in tunnel_line(server, 1)
