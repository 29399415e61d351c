"""Properties of the protocol machines (hypothesis).

- Any split of (peer bytes + trailing bytes) into reads gives the same events, the same error and
  the same trailing data.
- A driver that reads only what ``handshake_prefix_len()`` (or, for SOCKS, ``bytes_needed()``)
  allows consumes exactly the handshake and leaves the trailing bytes unread.
- Random bytes into every client and server role raise only ProtocolError or ProxyError
  subclasses, never IndexError, struct.error, UnicodeDecodeError and the like; and a machine that
  raised stays poisoned.
- Client machine -> server machine -> client machine round trips end in Established on both
  sides with the right target and credentials; refusals come back with the right code.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopcat.errors import HopcatError, ProtocolError, ProxyAuthError, ProxyError
from hopcat.proto._events import NEED_DATA, Credentials, Established, Event, Rejected, Request
from hopcat.proto._machine import HostKind, Machine, State, check_host
from hopcat.proto.http_connect import HttpConnectClient, HttpConnectServer
from hopcat.proto.socks4 import Socks4Client, Socks4Server
from hopcat.proto.socks5 import Socks5Client, Socks5Server

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FINAL_STATES = (State.DONE, State.CLOSED)

Outcome = tuple[list[Event], tuple[type[BaseException], str] | None, bytes]


def pump(
    machine: Machine,
    on_event: Callable[[Event], None] | None = None,
    events: list[Event] | None = None,
) -> list[Event]:
    """Events until NEED_DATA or a final state (whose event repeats forever), appended to
    ``events`` as they come so that a caller still has them when a later call raises."""
    events = [] if events is None else events
    while machine.state not in FINAL_STATES:
        event = machine.next_event()
        if event is NEED_DATA:
            break
        assert isinstance(event, Event)
        events.append(event)
        if on_event is not None:
            on_event(event)
    return events


def feed(machine: Machine, chunks: list[bytes], *, eof: bool) -> Outcome:
    events: list[Event] = []
    try:
        for chunk in chunks:
            if chunk:
                machine.receive_data(chunk)
            pump(machine, events=events)
        if eof:
            machine.receive_data(b"")
            pump(machine, events=events)
    except HopcatError as exc:
        return events, (type(exc), str(exc)), b""
    return events, None, machine.trailing_data


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# Strategies for what a proxy sends back.

ports = st.integers(0, 65535)
trailing = st.binary(max_size=40)


@st.composite
def socks5_peer(draw: st.DrawFn) -> tuple[Callable[[], Machine], bytes]:
    creds = draw(st.booleans())
    # Mostly valid transcripts, with every kind of refusal and protocol error mixed in.
    methods = [0, 2, 2, 2, 0xFF, 1] if creds else [0, 0, 0, 0, 2]
    method = draw(st.sampled_from(methods))
    data = bytes([5, method])
    if method == 2:
        data += bytes([draw(st.sampled_from([1, 5])), draw(st.sampled_from([0, 0, 0, 1]))])
    atyp = draw(st.sampled_from([1, 3, 4, 1, 3, 4, 9]))
    if atyp == 1:
        address = draw(st.binary(min_size=4, max_size=4))
    elif atyp == 4:
        address = draw(st.binary(min_size=16, max_size=16))
    else:
        name = draw(st.binary(max_size=255))
        address = bytes([len(name)]) + name
    reply = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 4, 200]))
    data += bytes([5, reply, draw(st.integers(0, 255)), atyp]) + address
    data += draw(ports).to_bytes(2, "big")

    def make() -> Machine:
        if creds:
            return Socks5Client("example.com", 22, username="user", password="pw")
        return Socks5Client("example.com", 22)

    return make, data


@st.composite
def socks4_peer(draw: st.DrawFn) -> tuple[Callable[[], Machine], bytes]:
    head = bytes([draw(st.sampled_from([0, 4, 0, 5])), draw(st.sampled_from([90, 90, 91, 93]))])
    return (lambda: Socks4Client("example.com", 22)), head + draw(st.binary(min_size=6, max_size=6))


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-", min_size=1, max_size=12)
_field_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@st.composite
def http_peer(draw: st.DrawFn) -> tuple[Callable[[], Machine], bytes]:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))

    def head(status: int) -> bytes:
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"]))
        reason = draw(_field_text).encode()
        line = b"%s %d" % (version, status) + (b" " + reason if draw(st.booleans()) else b"")
        fields = draw(st.lists(st.tuples(_token, _field_text), max_size=4))
        lines = [line] + [f"{name}: {value}".encode() for name, value in fields]
        return b"".join(item + eol for item in lines) + eol

    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    final = draw(st.sampled_from([200, 200, 200, 204, 299, 403, 407, 502]))
    data = b"".join(head(status) for status in interim) + head(final)
    return (lambda: HttpConnectClient("example.com", 22)), data


any_peer = st.one_of(socks5_peer(), socks4_peer(), http_peer())


# Any split gives the same result.


@SETTINGS
@given(
    peer=any_peer, extra=trailing, cuts=st.lists(st.integers(0, 400), max_size=8), eof=st.booleans()
)
def test_any_split_gives_the_same_events_and_trailing_data(
    peer: tuple[Callable[[], Machine], bytes], extra: bytes, cuts: list[int], eof: bool
) -> None:
    make, handshake = peer
    whole = handshake + extra
    expected = feed(make(), [whole], eof=eof)
    assert feed(make(), split(whole, cuts), eof=eof) == expected
    assert feed(make(), [bytes([b]) for b in whole], eof=eof) == expected
    events, error, rest = expected
    if error is None and events and isinstance(events[-1], Established):
        assert rest == extra


# Exact reading: the driver never consumes bytes past the handshake.


def drive_exactly(
    machine: Machine, wire: bytes, data: st.DataObject, *, by_bytes_needed: bool
) -> tuple[list[Event], int]:
    """Read from ``wire`` the way net/ does before handing a socket over; return the events and
    how many bytes were consumed."""
    events: list[Event] = []
    position = 0
    while machine.state not in FINAL_STATES:
        event = machine.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, Event)
            events.append(event)
            continue
        if position == len(wire):
            machine.receive_data(b"")
            continue
        if by_bytes_needed:
            wanted = machine.bytes_needed()
            assert wanted is not None and wanted > 0
            count = min(wanted, len(wire) - position)
        else:
            peeked = wire[position : position + data.draw(st.integers(1, len(wire) - position))]
            count = machine.handshake_prefix_len(peeked)
            assert 0 < count <= len(peeked)
        machine.receive_data(wire[position : position + count])
        position += count
    return events, position


@SETTINGS
@given(peer=any_peer, extra=trailing, data=st.data())
def test_exact_reads_stop_at_the_end_of_the_handshake(
    peer: tuple[Callable[[], Machine], bytes], extra: bytes, data: st.DataObject
) -> None:
    make, handshake = peer
    reference, error, _ = feed(make(), [handshake + extra], eof=False)
    modes = [False] if isinstance(make(), HttpConnectClient) else [False, True]
    for by_bytes_needed in modes:
        machine = make()
        try:
            events, consumed = drive_exactly(
                machine, handshake + extra, data, by_bytes_needed=by_bytes_needed
            )
        except HopcatError as exc:
            assert error is not None
            assert (type(exc), str(exc)) == error
            continue
        assert error is None
        assert events == reference
        assert consumed == len(handshake)
        assert machine.trailing_data == b""


# Random bytes raise only protocol or proxy errors.

CLIENTS: list[Callable[[], Machine]] = [
    lambda: Socks5Client("example.com", 22),
    lambda: Socks5Client("10.0.0.1", 22, username="u", password="p"),
    lambda: Socks4Client("example.com", 22, user_id="me"),
    lambda: Socks4Client("10.0.0.1", 22),
    lambda: HttpConnectClient("[::1]", 22),
    lambda: HttpConnectClient("example.com", 22, username="u", password="p"),
]
SERVERS: list[Callable[[], Machine]] = [
    Socks4Server,
    Socks5Server,
    lambda: Socks5Server(require_auth=True),
    HttpConnectServer,
    lambda: HttpConnectServer(require_auth=True),
]
CLIENT_PREFIXES = [b"", b"\x05\x00", b"\x05\x02\x01\x00\x05\x00\x00", b"\x00\x5a", b"HTTP/1.1 "]
SERVER_PREFIXES = [
    b"",
    b"\x05\x01\x00",
    b"\x05\x01\x02\x01",
    b"\x05\x01\x00\x05\x01\x00",
    b"\x04\x01\x00\x16\x00\x00\x00\x01",
    b"CONNECT ",
    b"CONNECT h:1 HTTP/1.1\r\n",
    b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic ",
]


def answer_as_server(machine: Machine, data: st.DataObject) -> Callable[[Event], None]:
    def on_event(event: Event) -> None:
        if isinstance(event, Credentials):
            machine.accept_credentials(data.draw(st.booleans()))  # type: ignore[attr-defined]
        elif isinstance(event, Request):
            if data.draw(st.booleans()):
                machine.reply_success()  # type: ignore[attr-defined]
            else:
                machine.reply_failure()  # type: ignore[attr-defined]

    return on_event


def fuzz(
    machine: Machine, chunks: list[bytes], eof: bool, on_event: Callable[[Event], None] | None
) -> None:
    try:
        for chunk in chunks:
            if chunk:
                machine.receive_data(chunk)
            pump(machine, on_event)
            machine.data_to_send()
        if eof:
            machine.receive_data(b"")
            pump(machine, on_event)
    except (ProtocolError, ProxyError):
        assert machine.state is State.ERROR
        try:
            machine.next_event()
        except ProtocolError as exc:
            assert "error state" in str(exc)
        else:
            raise AssertionError("a poisoned machine answered") from None


@settings(max_examples=500, deadline=None)
@given(
    index=st.integers(0, len(CLIENTS) - 1),
    prefix=st.sampled_from(CLIENT_PREFIXES),
    junk=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 250), max_size=5),
    eof=st.booleans(),
)
def test_random_bytes_into_clients(
    index: int, prefix: bytes, junk: bytes, cuts: list[int], eof: bool
) -> None:
    machine = CLIENTS[index]()
    fuzz(machine, split(prefix + junk, cuts), eof, None)


@settings(max_examples=500, deadline=None)
@given(
    index=st.integers(0, len(SERVERS) - 1),
    prefix=st.sampled_from(SERVER_PREFIXES),
    junk=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 250), max_size=5),
    eof=st.booleans(),
    data=st.data(),
)
def test_random_bytes_into_servers(
    index: int, prefix: bytes, junk: bytes, cuts: list[int], eof: bool, data: st.DataObject
) -> None:
    machine = SERVERS[index]()
    fuzz(machine, split(prefix + junk, cuts), eof, answer_as_server(machine, data))


# Round trips through our own client and server machines.

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.sampled_from(["bücher.example", "例え.テスト", "localhost"]),
)
_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


def same_host(sent: str, received: str) -> bool:
    kind, text, packed = check_host(sent)
    if kind is HostKind.IPV6:
        return socket.inet_pton(socket.AF_INET6, received) == packed
    return received == text


def run_pair(
    client: Machine, server: Machine, on_server_event: Callable[[Event], None]
) -> tuple[list[Event], list[Event]]:
    client_events: list[Event] = []
    server_events: list[Event] = []

    def record(event: Event) -> None:
        server_events.append(event)
        on_server_event(event)

    for _ in range(10):
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server)
        pump(server, record)
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        client_events += pump(client)
        if client.state in FINAL_STATES and server.state in FINAL_STATES:
            break
    # The server's final event follows from its own reply_*() call inside ``record``.
    server_events.append(server.next_event())  # type: ignore[arg-type]
    return client_events, server_events


def make_pair(
    protocol: str, host: str, port: int, credentials: tuple[str, str] | None
) -> tuple[Machine, Machine]:
    auth = credentials is not None
    user, password = credentials or (None, None)
    if protocol == "socks5":
        return Socks5Client(host, port, username=user, password=password), Socks5Server(
            require_auth=auth
        )
    if protocol == "http":
        return HttpConnectClient(host, port, username=user, password=password), HttpConnectServer(
            require_auth=auth
        )
    return Socks4Client(host, port, user_id=user or ""), Socks4Server()


@st.composite
def pair_setups(draw: st.DrawFn) -> tuple[str, str, int, tuple[str, str] | None]:
    protocol = draw(st.sampled_from(["socks4", "socks5", "http"]))
    host = draw(hosts)
    if protocol == "socks4" and check_host(host)[0] is HostKind.IPV6:
        host = "192.0.2.1"
    if protocol == "socks4" and host.startswith("0.0.0.") and host != "0.0.0.0":
        host = "192.0.2.2"  # the SOCKS4a marker range: the client refuses it (test_socks4.py)
    credentials = None
    if draw(st.booleans()):
        user = draw(_text.filter(lambda u: ":" not in u and "\0" not in u))
        credentials = (user, draw(_text))
    return protocol, host, draw(ports), credentials


@SETTINGS
@given(setup=pair_setups(), bound_port=ports, up=trailing, down=trailing)
def test_round_trip(
    setup: tuple[str, str, int, tuple[str, str] | None], bound_port: int, up: bytes, down: bytes
) -> None:
    protocol, host, port, credentials = setup
    client, server = make_pair(protocol, host, port, credentials)

    def answer(event: Event) -> None:
        if isinstance(event, Credentials):
            assert credentials is not None
            assert (event.username, event.password) == credentials
            server.accept_credentials(True)  # type: ignore[attr-defined]
        elif isinstance(event, Request):
            assert event.command == "CONNECT"
            assert same_host(host, event.host)
            assert event.port == port
            if protocol == "socks4":
                assert event.user_id == (credentials[0] if credentials else "")
            server.reply_success("192.0.2.9", bound_port)  # type: ignore[attr-defined]
            server._outbox += down  # the first payload bytes go out right behind the reply

    client_events, server_events = run_pair(client, server, answer)
    assert isinstance(client_events[-1], Established)
    assert isinstance(server_events[-1], Established)
    if protocol != "http":
        assert (client_events[-1].bound_host, client_events[-1].bound_port) == (
            "192.0.2.9",
            bound_port,
        )
    expected_types: list[type[Event]] = [Request]
    if credentials and protocol != "socks4":
        expected_types = [Credentials, Request]
    assert [type(e) for e in server_events[:-1]] == expected_types
    assert client.trailing_data == down
    if up:
        server.receive_data(up)
    assert server.trailing_data == up


@SETTINGS
@given(setup=pair_setups(), data=st.data())
def test_refusals_round_trip(
    setup: tuple[str, str, int, tuple[str, str] | None], data: st.DataObject
) -> None:
    protocol, host, port, credentials = setup
    client, server = make_pair(protocol, host, port, credentials)
    code = data.draw(
        {
            "socks4": st.integers(91, 93),
            "socks5": st.integers(1, 255),
            "http": st.integers(400, 599),
        }[protocol]
    )
    reject_credentials = (
        credentials is not None and protocol != "socks4" and data.draw(st.booleans())
    )

    def answer(event: Event) -> None:
        if isinstance(event, Credentials):
            server.accept_credentials(not reject_credentials)  # type: ignore[attr-defined]
        elif isinstance(event, Request):
            server.reply_failure(code)  # type: ignore[attr-defined]

    try:
        run_pair(client, server, answer)
    except ProxyError as exc:
        assert server.state is State.CLOSED
        assert isinstance(server.next_event(), Rejected)
        if reject_credentials:
            assert isinstance(exc, ProxyAuthError)
            assert exc.code == (407 if protocol == "http" else 1)
        else:
            assert exc.code == code
            auth_codes = {"socks4": (92, 93), "socks5": (), "http": (401, 407)}[protocol]
            assert isinstance(exc, ProxyAuthError) == (code in auth_codes)
    else:
        raise AssertionError("the client did not see the refusal")
