"""``hopcat serve`` on tls:// listeners: an HTTPS proxy and SOCKS over TLS, against real clients.

hopcat's own ``https://`` and ``socks5h+tls://`` hops and curl's ``--proxy https://`` go through
a TLS listener to local targets. A DigestServer (read to EOF, answer the digest) proves that the
client's close_notify arrives as a FIN and that the answer comes back before ours. The servers
and targets are shared by the module; each test checks its own log lines by client port.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from test_serve_support import ServeProcess

from support import Certificates, clean_env, make_certificates, pattern, run_hopcat, sha256

USER, PASSWORD = "alice", "s3cret"
BULK = 4 << 20
HANDSHAKE_TIMEOUT_S = 1.5
SOCKETS_AT_START: dict[str, int] = {}  # the module's servers' sockets once listening


def tls_hostport(server: ServeProcess) -> str:
    return next(a for a in server.addresses if a.startswith("tls://")).removeprefix("tls://")


def plain_hostport(server: ServeProcess) -> str:
    return next(a for a in server.addresses if not a.startswith("tls://"))


@pytest.fixture(scope="module")
def servers(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServeProcess]]:
    """"open": a plain and a TLS listener, no auth; "auth": a TLS listener needing a user,
    on asyncio's loop."""
    workdir = tmp_path_factory.mktemp("serve-tls")
    tls = ("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key))
    started = {}
    try:
        started["open"] = ServeProcess(
            workdir, *tls, "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S),
            listen=("127.0.0.1:0", "tls://127.0.0.1:0"), name="open",
        )  # fmt: skip
        # On asyncio's own loop: the other runs on uvloop where it is installed.
        started["auth"] = ServeProcess(
            workdir, *tls, "--auth", f"{USER}:{PASSWORD}", "--event-loop", "asyncio",
            listen=("tls://127.0.0.1:0",), name="auth",
        )  # fmt: skip
        for name, server in started.items():
            SOCKETS_AT_START[name] = server.count_fds()[1]
        yield started
    finally:
        for server in started.values():
            code = server.stop()
            print(f"--- hopcat serve {server.argv[3:]} (exit {code}) log:\n{server.log()}")
    for server in started.values():
        assert "Traceback" not in server.log()


def tunnel_line(server: ServeProcess, needle: str, timeout: float = 10.0) -> str:
    """The one tunnel line containing ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.tunnel_lines() if needle in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(lines) == 1, server.log()
    return lines[0]


def ok_lines(server: ServeProcess) -> int:
    return sum("result=ok" in line for line in server.tunnel_lines())


def wait_ok_lines(server: ServeProcess, count: int) -> None:
    server.wait_log("result=ok", count=count)


# --------------------------------------------------------------------------- hopcat's client


HOPS = ["https", "socks5h+tls"]


@pytest.mark.parametrize("scheme", HOPS)
def test_upload_half_close_and_digest(servers: dict[str, ServeProcess], certificates: Certificates,
                                      digest_target: peers.DigestServer, scheme: str) -> None:  # fmt: skip
    """stdin's EOF travels as close_notify, then as a FIN to the target, whose answer comes
    back: the half-close round trip, with several MiB checked on the way."""
    server = servers["open"]
    before = ok_lines(server)
    data = pattern(BULK, 3)
    proxy = f"{scheme}://localhost:{tls_hostport(server).rpartition(':')[2]}"
    result = run_hopcat("--proxy-cacert", str(certificates.ca), "-x", proxy, digest_target.host,
                        str(digest_target.port), input=data, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == peers.DigestServer.answer_for(data)
    wait_ok_lines(server, before + 1)
    line = server.tunnel_lines()[-1]
    assert f"up={BULK} " in line and "tls=TLSv1.3" in line, line


@pytest.mark.parametrize("scheme", HOPS)
def test_download(servers: dict[str, ServeProcess], certificates: Certificates,
                  bulk_source: tuple[peers.SourceServer, bytes], scheme: str) -> None:  # fmt: skip
    target, data = bulk_source
    server = servers["open"]
    before = ok_lines(server)
    result = run_hopcat("--proxy-cacert", str(certificates.ca), "-x", f"{scheme}://{tls_hostport(server)}",
                        target.host, str(target.port), timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(data)
    wait_ok_lines(server, before + 1)
    assert f"down={len(data)} " in server.tunnel_lines()[-1]


def test_chain_of_two_tls_hops_with_auth(servers: dict[str, ServeProcess], certificates: Certificates,
                                         digest_target: peers.DigestServer) -> None:  # fmt: skip
    """https:// into one server, socks5+tls:// with a user into the other: TLS inside TLS."""
    first, second = servers["open"], servers["auth"]
    ok = ok_lines(first), ok_lines(second)
    data = pattern(1 << 20, 5)
    result = run_hopcat(
        "--proxy-cacert", str(certificates.ca), "-x", f"https://{tls_hostport(first)}",
        "-x", f"socks5+tls://{USER}:{PASSWORD}@{tls_hostport(second)}",
        digest_target.host, str(digest_target.port), input=data, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == peers.DigestServer.answer_for(data)
    wait_ok_lines(first, ok[0] + 1)
    wait_ok_lines(second, ok[1] + 1)
    assert f"user={USER} " in second.tunnel_lines()[-1]
    assert f"dest={tls_hostport(second)} " in first.tunnel_lines()[-1]


def test_auth_over_tls(servers: dict[str, ServeProcess], certificates: Certificates,
                       digest_target: peers.DigestServer) -> None:  # fmt: skip
    server = servers["auth"]
    hostport = tls_hostport(server)
    result = run_hopcat("--proxy-cacert", str(certificates.ca), "-x", f"https://{USER}:{PASSWORD}@{hostport}",
                        digest_target.host, str(digest_target.port), input=b"abc")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == peers.DigestServer.answer_for(b"abc")
    wrong = run_hopcat("--proxy-cacert", str(certificates.ca), "-x", f"https://{USER}:nope@{hostport}",
                       digest_target.host, str(digest_target.port))  # fmt: skip
    assert wrong.returncode != 0
    assert wrong.stderr.decode().count("\n") == 1, wrong.stderr
    server.wait_log("result=auth-failed")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_download_ends_with_close_notify(servers: dict[str, ServeProcess], certificates: Certificates,
                                         bulk_source: tuple[peers.SourceServer, bytes],
                                         version: ssl.TLSVersion) -> None:  # fmt: skip
    """The target's FIN arrives as close_notify after its last byte (OpenSSL's client: a
    clean EOF, no SSLEOFError), with TLS 1.2 as with 1.3."""
    target, data = bulk_source
    server = servers["open"]
    context = ssl.create_default_context(cafile=str(certificates.ca))
    context.maximum_version = version
    host, _, port = tls_hostport(server).rpartition(":")
    with socket.create_connection((host, int(port)), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:  # fmt: skip
        assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2"}.get(version, "TLSv1.3")
        tls.sendall(f"CONNECT {target.hostport} HTTP/1.1\r\nHost: {target.hostport}\r\n\r\n".encode())
        received = bytearray()
        while chunk := tls.recv(1 << 20):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert sha256(body) == sha256(data)


def test_target_half_closes_first(servers: dict[str, ServeProcess], certificates: Certificates) -> None:
    """The target sends, FINs, then reads: its FIN reaches the client as close_notify after the
    last byte, and the client's upload still flows afterwards, ended by its close_notify."""
    server = servers["open"]
    down, up = pattern(1 << 20, 11), pattern(2 << 20, 12)
    before = ok_lines(server)
    with peers.SourceServer(down, half_close_only=True).start() as target:
        context = ssl.create_default_context(cafile=str(certificates.ca))
        host, _, port = tls_hostport(server).rpartition(":")
        with socket.create_connection((host, int(port)), timeout=20) as raw:
            tls = context.wrap_socket(raw, server_hostname=host)
            tls.sendall(b"\x05\x01\x00")
            assert tls.recv(2) == b"\x05\x00"
            tls.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(target.host)
                        + target.port.to_bytes(2, "big"))  # fmt: skip
            received = bytearray()
            while chunk := tls.recv(1 << 20):
                received += chunk
            assert received[:2] == b"\x05\x00" and bytes(received[10:]) == down
            tls.sendall(up)  # after the server's close_notify: the TLS 1.3 half-close
            with tls.unwrap() as plain:
                plain.shutdown(socket.SHUT_WR)
                assert plain.recv(10) == b""
        record = target.last
    assert record.received_len == len(up) and record.received_sha256 == sha256(up)
    wait_ok_lines(server, before + 1)
    assert f"up={len(up)} down={len(down)} " in server.tunnel_lines()[-1]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_bare_fin_after_our_close_notify(servers: dict[str, ServeProcess],
                                         certificates: Certificates,
                                         version: ssl.TLSVersion) -> None:  # fmt: skip
    """The target ends first (our close_notify reaches the client), then the client ends its
    upload with a bare FIN, which the session reads as its close_notify: the upload reaches the
    target whole, and nothing follows our close_notify (a second shutdown of the session at the
    end would send a second one)."""
    server = servers["open"]
    down, up = pattern(1 << 16, 15), pattern(1 << 16, 16)
    before = ok_lines(server)
    with peers.SourceServer(down, half_close_only=True).start() as target:
        context = ssl.create_default_context(cafile=str(certificates.ca))
        context.maximum_version = version
        host, _, port = tls_hostport(server).rpartition(":")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
        with socket.create_connection((host, int(port)), timeout=20) as raw:

            def receive() -> None:
                raw.sendall(outgoing.read())
                chunk = raw.recv(1 << 20)
                assert chunk, "the connection ended before our close_notify"
                incoming.write(chunk)

            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    receive()
            tls.write(f"CONNECT {target.hostport} HTTP/1.1\r\n\r\n".encode())
            received = bytearray()
            while True:
                try:
                    chunk = tls.read(1 << 20)
                except ssl.SSLWantReadError:
                    receive()
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:  # close_notify, as SSLObject may say it
                    break
                received += chunk
            tls.write(up)
            raw.sendall(outgoing.read())
            raw.shutdown(socket.SHUT_WR)  # no close_notify before it
            after = incoming.pending
            while chunk := raw.recv(1 << 20):
                after += len(chunk)
        record = target.last
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == down
    assert after == 0, f"{after} bytes after our close_notify"
    assert record.received_len == len(up) and record.received_sha256 == sha256(up)
    wait_ok_lines(server, before + 1)


def test_client_that_pauses_loses_nothing(servers: dict[str, ServeProcess],
                                          certificates: Certificates) -> None:  # fmt: skip
    """A client that stops reading mid-download: the records for it, then the pair, then the
    target wait (backpressure); once it reads again every byte arrives, in order."""
    server = servers["open"]
    data = pattern(16 << 20, 13)
    with peers.SourceServer(data).start() as target:
        context = ssl.create_default_context(cafile=str(certificates.ca))
        host, _, port = tls_hostport(server).rpartition(":")
        with socket.create_connection((host, int(port)), timeout=20) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:  # fmt: skip
            tls.sendall(f"CONNECT {target.hostport} HTTP/1.1\r\n\r\n".encode())
            received = bytearray(tls.recv(65536))
            time.sleep(1.0)
            while chunk := tls.recv(1 << 20):
                received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and sha256(body) == sha256(data)


# --------------------------------------------------------------------------- curl


@pytest.mark.parametrize("trust", ["cacert", "insecure"])
def test_curl_https_proxy(servers: dict[str, ServeProcess], certificates: Certificates,
                          need: Callable[..., str], http_target: peers.HttpTarget,
                          trust: str) -> None:  # fmt: skip
    server = servers["open"]
    before = ok_lines(server)
    port = tls_hostport(server).rpartition(":")[2]
    if trust == "cacert":
        args = ["--proxy", f"https://127.0.0.1:{port}", "--proxy-cacert", str(certificates.ca)]
    else:
        args = ["--proxy", f"https://localhost:{port}", "--proxy-insecure"]
    result = subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", "-p", *args, http_target.url],
        capture_output=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == http_target.body
    wait_ok_lines(server, before + 1)
    assert "proto=http " in server.tunnel_lines()[-1]


def test_curl_client_certificate(certificates: Certificates, need: Callable[..., str], tmp_path: Path,
                                 http_target: peers.HttpTarget) -> None:  # fmt: skip
    server = ServeProcess(
        tmp_path, "--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key),
        "--tls-ca", str(certificates.ca), "--tls-verify-client", listen=("tls://127.0.0.1:0",),
    )  # fmt: skip
    try:
        base = [need("curl"), "-sS", "--max-time", "20", "-p", "--proxy",
                f"https://{tls_hostport(server)}", "--proxy-cacert", str(certificates.ca)]  # fmt: skip
        refused = subprocess.run([*base, http_target.url], capture_output=True, timeout=30,
                                 env=clean_env())  # fmt: skip
        assert refused.returncode != 0
        server.wait_log("result=tls-error")
        # The server's certificate doubles as a client certificate: the same CA signed it.
        result = subprocess.run(
            [*base, "--proxy-cert", str(certificates.cert), "--proxy-key", str(certificates.key),
             http_target.url], capture_output=True, timeout=30, env=clean_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == http_target.body
        server.wait_log("result=ok")
    finally:
        server.stop()
    assert "Traceback" not in server.log()


# --------------------------------------------------------------------------- bad clients


def test_bad_clients_one_line_each(servers: dict[str, ServeProcess], certificates: Certificates,
                                   digest_target: peers.DigestServer) -> None:  # fmt: skip
    server = servers["open"]
    host, _, port = tls_hostport(server).rpartition(":")
    address = (host, int(port))

    # A client that does not trust the name in the certificate aborts its handshake.
    context = ssl.create_default_context(cafile=str(certificates.ca))
    with socket.create_connection(address) as raw:
        wrong_name = raw.getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="wrong.example")
    assert "handshake failed" in tunnel_line(server, f":{wrong_name} ")

    # Plain SOCKS5 on the TLS port: refused at its first byte, not at the timeout.
    with socket.create_connection(address, timeout=5) as plain:
        plain_port = plain.getsockname()[1]
        plain.sendall(b"\x05\x01\x00")
        assert plain.recv(100) == b""
    line = tunnel_line(server, f":{plain_port} ")
    assert "result=tls-error" in line and "socks5 request" in line, line

    # A client that starts a handshake and stalls: dropped at the handshake timeout.
    stalled = socket.create_connection(address)
    stalled_port = stalled.getsockname()[1]
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")
    started = time.monotonic()
    try:
        stalled.settimeout(HANDSHAKE_TIMEOUT_S + 5)
        assert stalled.recv(100) == b""
    finally:
        stalled.close()
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT_S - 0.5
    line = tunnel_line(server, f":{stalled_port} ")
    assert "result=handshake-timeout" in line and "TLS handshake" in line, line

    # Each was one line, and the server still serves.
    result = run_hopcat("--proxy-cacert", str(certificates.ca), "-x", f"https://{tls_hostport(server)}",
                        digest_target.host, str(digest_target.port), input=b"still here")  # fmt: skip
    assert result.stdout == peers.DigestServer.answer_for(b"still here"), result.stderr
    for client_port in (wrong_name, plain_port, stalled_port):
        assert sum(f":{client_port} " in line for line in server.log().splitlines()) == 1


def test_plain_and_tls_listeners_side_by_side(servers: dict[str, ServeProcess],
                                              digest_target: peers.DigestServer) -> None:  # fmt: skip
    server = servers["open"]
    before = ok_lines(server)
    result = run_hopcat("-x", f"socks5h://{plain_hostport(server)}", digest_target.host,
                        str(digest_target.port), input=b"plain")  # fmt: skip
    assert result.stdout == peers.DigestServer.answer_for(b"plain"), result.stderr
    wait_ok_lines(server, before + 1)
    assert "tls=" not in server.tunnel_lines()[-1]


# --------------------------------------------------------------------------- usage and reload


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tls://127.0.0.1:0"], "needs --tls-cert"),
        (["tls://127.0.0.1:0", "--tls-cert", "/nonexistent.pem"], "no such file"),
        (["tls://127.0.0.1:0", "--tls-cert", "KEY"], "needs a PEM certificate and its private key"),
        (["127.0.0.1:0", "--tls-cert", "CERT"], "for tls:// listen addresses"),
        (["tls://127.0.0.1:0", "--tls-cert", "CERT", "--tls-key", "KEY", "--tls-verify-client"],
         "needs --tls-ca"),
        (["ssl://127.0.0.1:0"], "the only scheme is tls://"),
    ],
)
def test_usage_errors(certificates: Certificates, args: list[str], message: str) -> None:
    args = [{"KEY": str(certificates.key), "CERT": str(certificates.cert)}.get(arg, arg) for arg in args]
    result = run_hopcat("serve", *args, timeout=20)
    assert result.returncode == 64, result.stderr
    err = result.stderr.decode()
    assert err.startswith("hopcat: ") and err.count("\n") == 1 and message in err, err


def test_sighup_reloads_the_certificate(tmp_path: Path, digest_target: peers.DigestServer) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = make_certificates(tmp_path / "old")
    new = make_certificates(tmp_path / "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(old.cert.read_bytes())
    key.write_bytes(old.key.read_bytes())
    server = ServeProcess(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                          listen=("tls://127.0.0.1:0",))  # fmt: skip
    try:
        proxy = f"https://{tls_hostport(server)}"

        def works(ca: Path) -> bool:
            result = run_hopcat("--proxy-cacert", str(ca), "-x", proxy, digest_target.host,
                                str(digest_target.port), input=b"x")  # fmt: skip
            return result.stdout == peers.DigestServer.answer_for(b"x")

        assert works(old.ca) and not works(new.ca)
        cert.write_bytes(new.cert.read_bytes())
        key.write_bytes(new.key.read_bytes())
        server.send_signal(signal.SIGHUP)
        server.wait_log("event=reload result=ok")
        assert works(new.ca) and not works(old.ca)
        key.write_text("not a key\n")
        server.send_signal(signal.SIGHUP)
        server.wait_log("event=reload result=error")
        assert works(new.ca)  # the certificate loaded before stays
    finally:
        server.stop()
    assert re.search(r"reload result=error reason=.*--tls-cert", server.log()), server.log()


def test_no_socket_left(servers: dict[str, ServeProcess]) -> None:
    """After every test above (pytest runs them in order), each TLS client's socket and
    socketpair are gone."""
    for name, server in servers.items():
        deadline = time.monotonic() + 5
        while server.count_fds()[1] != SOCKETS_AT_START[name]:
            assert time.monotonic() < deadline, (server.fds(), server.log())
            time.sleep(0.05)
