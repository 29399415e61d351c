"""``--metrics HOST:PORT``: the server's counters, served as Prometheus text (format 0.0.4).

Every number lives in a fixed layout of 64-bit integers (``Slot``), one slot per process that
serves clients, all in one ``Store``: a shared anonymous mmap made before any worker is forked,
so a scrape served by the supervisor sums what every worker counted, and a restarted worker
goes on counting in its predecessor's slot (the supervisor zeroes only its gauges, whose
tunnels died with it). Each slot has one writer, the process it belongs to, so an update is a
plain array increment: no lock, no dictionary lookup on the relay's path. Bytes are counted
when a connection ends, from the totals its log line gives, not per read.

What is exposed are counts only: never a user name, a client address, a destination or a
secret. Labels come from fixed lists (protocols, results); anything else is counted as
``other``.

The endpoint answers ``GET /metrics`` and nothing else (404), one request per connection, on
the event loop of whoever serves it, with a deadline and a size cap on the request, so a slow
or hostile scraper cannot hold the proxy up.
"""

from __future__ import annotations

import bisect
import mmap

from hopcat._endpoint import format_hostport

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    import socket

    from hopcat.net.dial import SockAddr

PROTOCOLS = ("socks4", "socks4a", "socks5", "socks5-udp", "http", "forward", "other")
RESULTS = (
    "ok", "client-closed", "reset", "idle-timeout", "shutdown", "handshake-timeout",
    "protocol-error", "tls-error", "auth-failed", "auth-throttled", "denied", "client-denied",
    "limit", "unsupported", "rejected", "dns-error", "net-unreachable", "unreachable", "refused",
    "timeout", "wrong-family", "no-resources", "upstream-unreachable", "upstream-refused", "upstream-error",
    "error", "other",
)  # fmt: skip
# Seconds; a handshake on loopback takes well under a millisecond, a dial across the world 0.3 s.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_PROTOCOL_INDEX = {name: i for i, name in enumerate(PROTOCOLS)}
_RESULT_INDEX = {name: i for i, name in enumerate(RESULTS)}
_OTHER_PROTOCOL = _PROTOCOL_INDEX["other"]
_OTHER_RESULT = _RESULT_INDEX["other"]

# The layout of a slot, in 64-bit integers.
OPEN = 0  # gauges, by protocol
ENDED = OPEN + len(PROTOCOLS)  # counters, by result
BYTES_UP = ENDED + len(RESULTS)
BYTES_DOWN = BYTES_UP + 1
AUTH_FAILURES = BYTES_DOWN + 1
DENIED_DESTINATION = AUTH_FAILURES + 1
DENIED_CLIENT = DENIED_DESTINATION + 1
ACCEPT_BACKOFFS = DENIED_CLIENT + 1
RESTARTS = ACCEPT_BACKOFFS + 1  # only the supervisor's slot counts these
HISTOGRAM = len(BUCKETS) + 2  # a count per bucket and +Inf (not cumulative), then the sum in µs
HANDSHAKE = RESTARTS + 1
CONNECT = HANDSHAKE + HISTOGRAM
REQUESTS = CONNECT + HISTOGRAM  # forwarded plain HTTP requests, by status class
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")  # none: no answer was sent
SLOT_WORDS = REQUESTS + len(STATUS_CLASSES)
WORD = 8

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_LINES = 100
MAX_SCRAPERS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Store:
    """``slots`` slots of counters in one shared anonymous mapping (kept across fork)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * SLOT_WORDS * WORD)  # MAP_SHARED: children see it
        self.words = memoryview(self._map).cast("q")

    def slot(self, index: int) -> Slot:
        return Slot(self.words, index * SLOT_WORDS)

    def clear_gauges(self, index: int) -> None:
        """A worker died: its open tunnels died with it."""
        base = index * SLOT_WORDS
        for i in range(len(PROTOCOLS)):
            self.words[base + OPEN + i] = 0

    def totals(self) -> list[int]:
        words = self.words
        total = [0] * SLOT_WORDS
        for index in range(self.slots):
            base = index * SLOT_WORDS
            for i in range(SLOT_WORDS):
                total[i] += words[base + i]
        return total


class Slot:
    """One process's counters; every method is a few array updates."""

    __slots__ = ("_base", "_words")

    def __init__(self, words: memoryview, base: int) -> None:
        self._words = words
        self._base = base

    def opened(self, protocol: str | None) -> None:
        self._words[self._base + OPEN + _PROTOCOL_INDEX.get(protocol or "", _OTHER_PROTOCOL)] += 1

    def closed(self, protocol: str | None) -> None:
        self._words[self._base + OPEN + _PROTOCOL_INDEX.get(protocol or "", _OTHER_PROTOCOL)] -= 1

    def ended(self, result: str | None, up: int = 0, down: int = 0) -> None:
        words, base = self._words, self._base
        index = _RESULT_INDEX.get(result or "", _OTHER_RESULT)
        words[base + ENDED + index] += 1
        if up:
            words[base + BYTES_UP] += up
        if down:
            words[base + BYTES_DOWN] += down
        if result == "auth-failed":
            words[base + AUTH_FAILURES] += 1
        elif result == "denied":
            words[base + DENIED_DESTINATION] += 1
        elif result == "client-denied":
            words[base + DENIED_CLIENT] += 1

    def request(self, status: int | None, up: int, down: int) -> None:
        """A forwarded HTTP request is done: its status class and its bytes (a forwarding
        connection's own end adds none)."""
        words, base = self._words, self._base
        index = status // 100 - 1 if status is not None and 100 <= status < 600 else 5
        words[base + REQUESTS + index] += 1
        words[base + BYTES_UP] += up
        words[base + BYTES_DOWN] += down

    def backed_off(self) -> None:
        self._words[self._base + ACCEPT_BACKOFFS] += 1

    def restarted(self) -> None:
        self._words[self._base + RESTARTS] += 1

    def handshake(self, seconds: float) -> None:
        self._observe(HANDSHAKE, seconds)

    def connect(self, seconds: float) -> None:
        self._observe(CONNECT, seconds)

    def _observe(self, histogram: int, seconds: float) -> None:
        words, at = self._words, self._base + histogram
        words[at + bisect.bisect_left(BUCKETS, seconds)] += 1
        words[at + len(BUCKETS) + 1] += int(seconds * 1e6)


def render(totals: list[int], *, supervised: bool) -> str:
    """The exposition text of ``Store.totals()``."""
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    family("hopcat_open_tunnels", "gauge", "Tunnels relaying now (UDP: associations), by protocol.")
    for i, protocol in enumerate(PROTOCOLS):
        out.append(f'hopcat_open_tunnels{{protocol="{protocol}"}} {totals[OPEN + i]}')
    family("hopcat_tunnels_total", "counter",
           "Client connections ended, by result (ok: relayed and closed cleanly).")  # fmt: skip
    for i, result in enumerate(RESULTS):
        out.append(f'hopcat_tunnels_total{{result="{result}"}} {totals[ENDED + i]}')
    family("hopcat_bytes_total", "counter",
           "Bytes relayed, counted when the connection (a forwarded request) ends; up is "
           "client to target.")  # fmt: skip
    out.append(f'hopcat_bytes_total{{direction="up"}} {totals[BYTES_UP]}')
    out.append(f'hopcat_bytes_total{{direction="down"}} {totals[BYTES_DOWN]}')
    family("hopcat_auth_failures_total", "counter", "Connections refused for their credentials.")
    out.append(f"hopcat_auth_failures_total {totals[AUTH_FAILURES]}")
    family("hopcat_rule_denials_total", "counter",
           "Connections refused by the rules, by the kind of rule.")  # fmt: skip
    out.append(f'hopcat_rule_denials_total{{rule="destination"}} {totals[DENIED_DESTINATION]}')
    out.append(f'hopcat_rule_denials_total{{rule="client"}} {totals[DENIED_CLIENT]}')
    family("hopcat_accept_backoffs_total", "counter",
           "Pauses of accepting for lack of descriptors or memory.")  # fmt: skip
    out.append(f"hopcat_accept_backoffs_total {totals[ACCEPT_BACKOFFS]}")
    family("hopcat_http_requests_total", "counter",
           "Plain HTTP requests forwarded, by the status class answered (none: no answer).")  # fmt: skip
    for i, code in enumerate(STATUS_CLASSES):
        out.append(f'hopcat_http_requests_total{{code="{code}"}} {totals[REQUESTS + i]}')
    for name, at, text in (
        ("hopcat_handshake_seconds", HANDSHAKE, "From accept to a complete request."),
        ("hopcat_connect_seconds", CONNECT, "From the request to the tunnel established."),
    ):
        family(name, "histogram", text)
        cumulative = 0
        for i, bound in enumerate((*BUCKETS, float("inf"))):
            cumulative += totals[at + i]
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out.append(f"{name}_sum {totals[at + len(BUCKETS) + 1] / 1e6}")
        out.append(f"{name}_count {cumulative}")
    if supervised:
        family("hopcat_worker_restarts_total", "counter",
               "Workers restarted after exiting unbidden.")  # fmt: skip
        out.append(f"hopcat_worker_restarts_total {totals[RESTARTS]}")
    return "\n".join(out) + "\n"


def bind_metrics(address: tuple[int, SockAddr]) -> socket.socket:
    """The metrics listener on (family, sockaddr), listening; a ServeError if it cannot be."""
    from hopcat.server.serve import bind_listeners

    return bind_listeners([address], what="--metrics")[0]


class Endpoint:
    """Serves ``GET /metrics`` on ``sock`` (listening, from ``bind_metrics``) on the running
    event loop."""

    def __init__(self, sock: socket.socket, store: Store, *, supervised: bool) -> None:
        self._sock = sock
        self._store = store
        self._supervised = supervised
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

    async def start(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=8192)

    @property
    def address(self) -> str:
        name = self._sock.getsockname()
        return f"http://{format_hostport(str(name[0]), int(name[1]))}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        self._open += 1
        try:
            if self._open > MAX_SCRAPERS:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    first = await reader.readline()
                    for _ in range(MAX_REQUEST_LINES):
                        if (await reader.readline()).strip() == b"":
                            break
                    else:
                        return
                    parts = first.split()
                    if (
                        len(parts) == 3 and parts[0] == b"GET" and parts[2].startswith(b"HTTP/")
                        and parts[1].partition(b"?")[0] == b"/metrics"
                    ):  # fmt: skip
                        body = render(self._store.totals(), supervised=self._supervised).encode()
                        head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\n"
                    else:
                        body = b"not found: only GET /metrics is served\n"
                        head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    writer.write(head.encode() + body)
                    await writer.drain()
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
                return  # a scraper that left, sent an overlong line or took too long
        finally:
            self._open -= 1
            writer.close()
