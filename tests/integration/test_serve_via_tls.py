"""``hopcat serve --via`` through TLS hops: an https:// or socks5h+tls:// upstream, one or two.

The TLS upstreams are real: a second ``hopcat serve`` on a tls:// listener (an HTTPS proxy and
SOCKS over TLS), socat's OPENSSL-LISTEN in front of tinyproxy (https://) and in front of Dante
(socks5h+tls://). Clients (hopcat, curl) reach local targets through the --via server: a
DigestServer (read to EOF, answer the digest) proves the client's half-close crosses the TLS
hops (as close_notify) and the answer comes back; a SourceServer checks a download.
tinyproxy tears a tunnel down at the client's half-close (see PEERS.md), so through it only
downloads are checked.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_until_eof,
    socks5_connect,
)

from support import (
    HOPCAT,
    Certificates,
    clean_env,
    pattern,
    run_hopcat,
    sha256,
)

BULK = 4 << 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-via-tls")


@pytest.fixture(scope="module")
def tls_proxy(certificates: Certificates, workdir: Path) -> Iterator[int]:
    """A ``hopcat serve`` on a tls:// listener: its port (the certificate names localhost)."""
    server = ServeProcess(workdir, "--tls-cert", str(certificates.cert), "--tls-key",
                          str(certificates.key), listen=("tls://127.0.0.1:0",),
                          name="tls-proxy")  # fmt: skip
    try:
        yield int(server.addresses[0].rpartition(":")[2])
    finally:
        server.stop()
        print(f"--- TLS proxy log:\n{server.log()}")
        assert "Traceback" not in server.log()


@contextlib.contextmanager
def via_server(workdir: Path, certificates: Certificates, *args: str,
               name: str) -> Iterator[ServeProcess]:  # fmt: skip
    """``hopcat serve`` trusting the test CA for its hops: each URL in ``args`` is a --via hop,
    any other argument is passed as it is. Stopped at the end; its log has no traceback."""
    argv = [part for arg in args for part in (("--via", arg) if "://" in arg else (arg,))]
    server = ServeProcess(workdir, *argv, "--via-cacert", str(certificates.ca), name=name)
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def check_both_ways(server: ServeProcess, digest_target: peers.DigestServer,
                    bulk_source: tuple[peers.SourceServer, bytes]) -> None:  # fmt: skip
    """hopcat through ``server``: an upload whose half-close brings the target's digest back,
    and a download; then both tunnels ended cleanly."""
    proxy = f"socks5h://{server.host}:{server.port}"
    data = pattern(BULK, 5)
    result = run_hopcat("-x", proxy, digest_target.host, str(digest_target.port), input=data,
                        timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == peers.DigestServer.answer_for(data)
    target, expected = bulk_source
    result = run_hopcat("-x", proxy, target.host, str(target.port), timeout=60)
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(expected)
    server.wait_log("result=ok", count=2)
    lines = server.tunnel_lines()
    assert f"up={BULK} " in lines[0] and f"down={len(expected)} " in lines[1], lines


@pytest.mark.parametrize(("scheme", "loop"), [("https", "asyncio"), ("socks5h+tls", "auto")])
def test_via_a_serve_tls_listener(certificates: Certificates, workdir: Path, tls_proxy: int,
                                  digest_target: peers.DigestServer,
                                  bulk_source: tuple[peers.SourceServer, bytes], scheme: str,
                                  loop: str) -> None:  # fmt: skip
    """On asyncio's loop and on uvloop where it is installed."""
    with via_server(workdir, certificates, f"{scheme}://localhost:{tls_proxy}", "--event-loop",
                    loop, name=f"via-{scheme}") as server:  # fmt: skip
        check_both_ways(server, digest_target, bulk_source)


def test_via_socat_https_in_front_of_tinyproxy(
    certificates: Certificates, workdir: Path, socat_https: peers.Daemon,
    bulk_source: tuple[peers.SourceServer, bytes],
) -> None:  # fmt: skip
    target, expected = bulk_source
    with via_server(workdir, certificates, socat_https.url, name="via-socat-https") as server:
        proxy = f"socks5h://{server.host}:{server.port}"
        # --no-shutdown: tinyproxy drops the tunnel at the client's FIN (PEERS.md).
        result = run_hopcat("--no-shutdown", "-x", proxy, target.host, str(target.port),
                            timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert sha256(result.stdout) == sha256(expected)
        server.wait_log("result=ok")


def test_via_socks_over_tls_to_dante(
    certificates: Certificates, workdir: Path, socat_socks_tls: peers.Daemon,
    digest_target: peers.DigestServer, bulk_source: tuple[peers.SourceServer, bytes],
) -> None:  # fmt: skip
    with via_server(workdir, certificates, socat_socks_tls.url_as("socks5h+tls"),
                    name="via-socat-dante") as server:  # fmt: skip
        check_both_ways(server, digest_target, bulk_source)


def test_two_tls_hops(
    certificates: Certificates, workdir: Path, tls_proxy: int, socat_socks_tls: peers.Daemon,
    digest_target: peers.DigestServer, bulk_source: tuple[peers.SourceServer, bytes],
) -> None:  # fmt: skip
    """serve's HTTPS proxy, then SOCKS over TLS to Dante inside it: TLS inside TLS."""
    with via_server(workdir, certificates, f"https://localhost:{tls_proxy}",
                    socat_socks_tls.url_as("socks5h+tls"), name="via-two") as server:  # fmt: skip
        check_both_ways(server, digest_target, bulk_source)


def test_target_half_closes_first(certificates: Certificates, workdir: Path, tls_proxy: int) -> None:
    """The target's FIN crosses the TLS hop (close_notify from the proxy, then a FIN to the
    client) while the client's upload goes on, and the upload's end still reaches the target."""
    down, up = pattern(BULK, 13), pattern(BULK, 17)
    with (
        peers.SourceServer(down, half_close_only=True).start() as target,
        via_server(workdir, certificates, f"https://localhost:{tls_proxy}",
                   name="via-half") as server,
    ):  # fmt: skip
        result = run_hopcat("--keep-sending", "-x", f"socks5h://{server.host}:{server.port}",
                            target.host, str(target.port), input=up, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert sha256(result.stdout) == sha256(down)
        record = target.wait_records(1)[0]
        record.done.wait(10)
        assert record.received_len == BULK and record.received_sha256 == sha256(up)
        server.wait_log("result=ok")


def test_a_paused_client_loses_nothing(certificates: Certificates, workdir: Path, tls_proxy: int,
                                       bulk_source: tuple[peers.SourceServer, bytes]) -> None:  # fmt: skip
    """A client that stops reading fills the pair, then the bridge holds the upstream (its
    records wait in the kernel): nothing is lost when it reads again, and no socket is left."""
    target, expected = bulk_source
    with via_server(workdir, certificates, f"https://localhost:{tls_proxy}",
                    name="via-paused") as server:  # fmt: skip
        sockets = server.count_fds()[1]
        with connect(server) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            assert socks5_connect(sock, target.host, target.port) == 0
            time.sleep(1.0)
            received = recv_until_eof(sock, limit=len(expected) + 1)
        assert sha256(received) == sha256(expected)
        server.wait_log("result=ok")
        deadline = time.monotonic() + 5
        while server.count_fds()[1] != sockets and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.count_fds()[1] == sockets


def test_curl_through_serve_via_tls(certificates: Certificates, workdir: Path, tls_proxy: int) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed (apt-get install curl)")
    body = pattern(BULK, 9)
    with (
        peers.HttpTarget(body).start() as target,
        via_server(workdir, certificates, f"https://localhost:{tls_proxy}",
                   name="via-curl") as server,
    ):  # fmt: skip
        fetched = subprocess.run(
            [curl, "-sS", "--max-time", "60", "--socks5-hostname",
             f"{server.host}:{server.port}", target.url],
            capture_output=True, timeout=90, env=clean_env(),
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        assert sha256(fetched.stdout) == sha256(body)
        server.wait_log("result=ok")


def test_untrusted_certificate_is_the_hops_refusal(
    workdir: Path, tls_proxy: int, digest_target: peers.DigestServer
) -> None:
    """No --via-cacert: the system CAs do not know the test CA. The client gets the upstream
    failure's refusal and the log one line naming the hop."""
    hop = f"https://localhost:{tls_proxy}"
    server = ServeProcess(workdir, "--via", hop, name="via-untrusted")
    try:
        with connect(server) as sock:
            assert socks5_connect(sock, digest_target.host, digest_target.port) == 1
        with connect(server) as sock:
            assert http_connect(sock, digest_target.host, digest_target.port)[0] == 502
        server.wait_log("result=upstream-error", count=2)
        lines = server.tunnel_lines()
        assert len(lines) == 2, lines
        for line in lines:
            assert f"proxy {hop} (hop 1/1)" in line and "certificate not trusted" in line, line
            assert "--via-cacert FILE" in line and "--via-insecure" in line, line
    finally:
        server.stop()


def test_a_silent_tls_hop_times_out_naming_it(workdir: Path) -> None:
    """A first hop that accepts and never answers the ClientHello: the handshake waits quietly,
    a probe looks at the hop, the handshake goes on, and the connect timeout names the hop."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: the kernel does
        hop = f"https://127.0.0.1:{silent.getsockname()[1]}"
        # 5 s: past the quiet wait and the probe (1.5 s each), so the handshake's wait ends it.
        server = ServeProcess(workdir, "--via", hop, "--connect-timeout", "5", name="via-silent")
        try:
            started = time.monotonic()
            with connect(server) as sock:
                assert socks5_connect(sock, "127.0.0.1", 9) == 4
            assert 4.5 < time.monotonic() - started < 7
            line = server.wait_log("result=timeout")
            assert f"proxy {hop} (hop 1/1): no TLS handshake before the connect timeout" in line
        finally:
            server.stop()


def test_via_cacert_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    result = subprocess.run(
        [*HOPCAT, "serve", "127.0.0.1:0", "--via", "https://127.0.0.1:9", "--via-cacert",
         str(missing)], capture_output=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 64, result.stderr
    assert f"--via-cacert {missing}" in result.stderr.decode()


def test_http_forwarding_through_a_tls_hop(certificates: Certificates, workdir: Path,
                                           tls_proxy: int) -> None:  # fmt: skip
    """Plain HTTP forwarded through an https:// hop: two origins in turn on one client
    connection, so the chain (and its TLS bridge) is opened, dropped and opened again."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed (apt-get install curl)")
    first, second = pattern(BULK, 12), pattern(1000, 13)
    with (
        peers.HttpTarget(first).start() as one,
        peers.HttpTarget(second).start() as two,
        via_server(workdir, certificates, f"https://localhost:{tls_proxy}",
                   name="via-forward") as server,
    ):  # fmt: skip
        fetched = subprocess.run(
            [curl, "-sS", "--max-time", "60", "-x", f"http://{server.host}:{server.port}",
             one.url, two.url, one.url],
            capture_output=True, timeout=90, env=clean_env(),
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        assert sha256(fetched.stdout) == sha256(first + second + first)
        log = server.wait_log("method=GET", count=3)
        assert log.count("status=200 result=ok") == 3
