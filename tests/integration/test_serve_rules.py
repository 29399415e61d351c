"""``hopcat serve`` rules as real clients meet them: what is dialled decides, not how it is spelt.

- Every spelling of the host's own addresses is refused by an exposed server, directly and
  through a ``--via`` upstream on the same host (Dante).
- No proxy loops: a CONNECT to the server itself is refused in every protocol, and a segment of
  500 pipelined self-CONNECTs costs one refusal while another client is served.
- Rules that could be read two ways are refused at start (exit 64, one line).
- A lookup that never finishes does not hold SIGTERM past --grace.

The in-process side (which names reached the resolver, the per-client lookup share, the address
an upstream was asked for) is in tests/scenario/test_server_handler.py.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    SRC,
    ServeProcess,
    connect,
    http_connect,
    socks4_connect,
    socks5_connect,
    wait_closed,
)

from hopcat.server.ifaddrs import host_addresses
from support import clean_env

Serve = Callable[..., ServeProcess]
BOUND_S = 5.0  # a client that must not be held up gets its tunnel within this, on a loaded box

LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0",
                      "::ffff:127.0.0.1", "localhost", "LocalHost",
                      "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # full-width
                      "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11"]  # fmt: skip


def interface_addresses() -> list[str]:
    """The host's addresses beyond loopback and link-local (which built-in networks cover)."""
    return sorted(str(a) for a in host_addresses() if not (a.is_loopback or a.is_link_local))


def run_serve(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "hopcat", "serve", "127.0.0.1:0", *args],
                          capture_output=True, timeout=30, env=clean_env())  # fmt: skip


# --------------------------------------------------------------------------- rule 10


def test_exposed_server_refuses_the_host_in_every_spelling(
    serve: Serve, target_factory: Callable[..., object],
) -> None:  # fmt: skip
    # A target on every address of the host, as a local service bound to 0.0.0.0 would be.
    target = target_factory(peers.DigestServer, "0.0.0.0")
    port = target.port  # type: ignore[attr-defined]
    server = serve("--allow-open", "--allow-client", "127.0.0.0/8", "--deny-client", "*",
                   listen=("0.0.0.0:0",))  # fmt: skip
    for host in LOOPBACK_SPELLINGS + interface_addresses():
        with connect(server) as sock:
            assert socks5_connect(sock, host, port) == 2, host
        with connect(server) as sock:  # an HTTP authority is ASCII: 400 for the others
            assert http_connect(sock, host, port)[0] == (403 if host.isascii() else 400), host
    assert not target.records  # type: ignore[attr-defined]


def test_curl_through_exposed_server(
    serve: Serve, need: Callable[..., str], target_factory: Callable[..., peers.HttpTarget],
) -> None:  # fmt: skip
    http_target = target_factory(peers.HttpTarget, host="0.0.0.0")  # every host address
    server = serve("--allow-open", "--allow-client", "127.0.0.0/8", "--deny-client", "*",
                   listen=("0.0.0.0:0",))  # fmt: skip
    proxy = f"127.0.0.1:{server.port}"
    for mode in (["--socks5-hostname", proxy], ["--proxytunnel", "--proxy", f"http://{proxy}"]):
        for host in ("localhost", "127.1", "2130706433", *interface_addresses()):
            url = f"http://{host}:{http_target.port}/"
            result = subprocess.run(
                [need("curl"), "-sS", "--max-time", "20", *mode, url],
                capture_output=True, timeout=30, env=clean_env(),
            )  # fmt: skip
            assert result.returncode != 0, (mode, host, result.stdout)
            assert b"hello from hopcat tests" not in result.stdout


def test_local_upstream_does_not_reopen_the_host(
    serve: Serve, danted: peers.Daemon, digest_server: peers.DigestServer,
) -> None:  # fmt: skip
    """Through Dante on this host, which resolves names itself, the server still refuses
    localhost and every odd spelling: it resolves and checks them here, and asks Dante for the
    checked address."""
    port = digest_server.port
    server = serve("--allow-open", "--allow-client", "127.0.0.0/8", "--deny-client", "*",
                   "--allow", f"127.0.0.1:{port}", "--via", danted.url_as("socks5h"),
                   listen=("0.0.0.0:0",))  # fmt: skip
    for host in LOOPBACK_SPELLINGS:
        with connect(server) as sock:
            assert socks5_connect(sock, host, port + 1 if port < 65535 else 1) == 2, host
    # The one address the rules reopen is reached by name through Dante.
    with connect(server) as sock:
        assert socks5_connect(sock, "localhost", port) == 0
        sock.sendall(b"through dante")
        sock.shutdown(1)
        assert wait_closed(sock) == digest_server.answer_for(b"through dante")
    assert f"dest=localhost:{port} result=ok" in server.wait_log("result=ok")


@pytest.mark.parametrize(
    ("rule", "hint"),
    [
        ("::1:22", "[::1]:22"),
        ("fe80::*", "use a network"),
        ("[::1]22", "':PORTS'"),
        ("2001:db8::/32:443", "[2001:db8::/32]:443"),
        ("\u00fc*.example", "the host must be"),
    ],
)
def test_bad_rules_are_refused_at_start(tmp_path: Path, rule: str, hint: str) -> None:
    result = run_serve("--deny", rule)
    assert result.returncode == 64, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hopcat: ") and hint in lines[0], lines
    rules = tmp_path / "rules"
    rules.write_text(f"allow *:443\ndeny {rule}\n", encoding="utf-8")
    result = run_serve("--rules", str(rules))
    assert result.returncode == 64, result.stderr
    assert result.stderr.decode().count("\n") == 1 and "line 2" in result.stderr.decode()


# --------------------------------------------------------------------------- rule 11


def test_connect_to_itself_is_refused(serve: Serve, need: Callable[..., str]) -> None:
    server = serve()
    port = server.port
    for host in ("127.0.0.1", "localhost", "127.1", "0", "::ffff:127.0.0.1"):
        with connect(server) as sock:
            assert socks5_connect(sock, host, port) == 2, host
        with connect(server) as sock:
            assert http_connect(sock, host, port)[0] == 403, host
    for host in ("127.0.0.1", "localhost"):
        with connect(server) as sock:
            assert socks4_connect(sock, host, port) == 91, host
    result = subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", "--socks5-hostname", server.hostport,
         f"http://localhost:{port}/"],
        capture_output=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 97, result.stderr  # curl: the proxy refused the CONNECT
    assert "this server itself (a proxy loop)" in server.wait_log("proxy loop", count=13)


def test_listener_on_any_address_is_reached_through_each(serve: Serve) -> None:
    server = serve("--allow-open", "--allow-client", "127.0.0.0/8", "--deny-client", "*",
                   "--allow", "0.0.0.0/0", "--allow", "::/0",
                   listen=("0.0.0.0:0",))  # fmt: skip
    v4 = [a for a in interface_addresses() if ipaddress.ip_address(a).version == 4]
    for host in ["127.0.0.1", "127.0.0.2", "0.0.0.0", *v4]:
        with connect(server) as sock:
            assert socks5_connect(sock, host, server.port) == 2, host


def test_via_to_itself_is_refused_at_start() -> None:
    """Every request would go round: exit 64 with one line, before serving."""
    for _attempt in range(3):  # the port is free when chosen; another process may take it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "hopcat", "serve", f"127.0.0.1:{port}", "--via",
             f"socks5h://localhost:{port}"],
            capture_output=True, timeout=30, env=clean_env(),
        )  # fmt: skip
        if result.returncode != 69:  # 69: the port was taken meanwhile
            break
    assert result.returncode == 64, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "is this server itself" in lines[0], lines


@pytest.mark.parametrize("protocol", ["socks5", "http", "socks4"])
def test_pipelined_self_connects_do_not_lock_others_out(serve: Serve,
        digest_server: peers.DigestServer, protocol: str) -> None:  # fmt: skip
    """500 self-CONNECTs in one segment: before, each tunnel to itself carried the rest on, up
    to the per-client limit, and every other client on the host was refused meanwhile."""
    server = serve("--max-conns-per-client", "256")
    port = server.port
    one = {
        "socks5": b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"),
        "http": f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "socks4": b"\x04\x01" + port.to_bytes(2, "big") + b"\x7f\x00\x00\x01me\x00",
    }[protocol]
    with connect(server) as flood:
        flood.sendall(one * 500)
        # One refusal, then the server closes; before, the tunnels to itself went on instead.
        assert wait_closed(flood, BOUND_S) != b""
    started = time.monotonic()
    with connect(server) as sock:  # the same client address as the flood
        assert socks5_connect(sock, "127.0.0.1", digest_server.port) == 0
        sock.sendall(b"still served")
        sock.shutdown(1)
        assert wait_closed(sock) == digest_server.answer_for(b"still served")
    assert time.monotonic() - started < BOUND_S
    log = server.wait_log("event=tunnel", count=2)
    assert "result=denied" in log and log.count("event=tunnel") == 2, log


# --------------------------------------------------------------------------- rule 12

NEVER_RESOLVES = """
import sys, threading
sys.path.insert(0, {src!r})
from hopcat.server.cli import finish, parse_args
from hopcat.server.serve import run

def never(host, port):
    open({marker!r}, "w").close()
    threading.Event().wait()

sys.exit(run(finish(parse_args(sys.argv[1:])), resolver=never))
"""


def test_a_lookup_that_never_ends_does_not_hold_sigterm(tmp_path: Path) -> None:
    """The real run() with a resolver that never answers (a DNS server that drops queries):
    SIGTERM ends the process within --grace, instead of waiting for the lookup thread."""
    marker, ready = tmp_path / "resolving", tmp_path / "ready"
    script = NEVER_RESOLVES.format(src=SRC, marker=str(marker))
    grace = 1.0
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "127.0.0.1:0", "--ready-file", str(ready),
         "--grace", str(grace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        host, _, port = ready.read_text().split()[0].rpartition(":")
        client = socket.create_connection((host, int(port)), timeout=10)
        with client:
            client.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x0dnever.example\x00\x50")
            while not marker.exists():
                assert time.monotonic() < deadline, "the lookup never started"
                time.sleep(0.02)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(grace + 5)
        assert code == 0
        assert time.monotonic() - stopped < grace + 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
