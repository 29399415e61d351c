"""TLS with the target and TLS listeners against real peers (issue 11): ``hopcat --tls`` against
``openssl s_server``, ``ncat --ssl -l`` and ``socat OPENSSL-LISTEN``; ``hopcat -l --tls`` against
``openssl s_client``, ``ncat --ssl`` and ``curl``; the TLS half-close both ways with TLS 1.3 and
1.2; the errors (exit 82 for TLS with the target or a client, 64 for bad options); ``-v``;
``--exec`` through TLS. Chains with TLS hops are in test_tls_chains.py.

Certificates are made at test time (tls_peers.make_tls_files). Every transfer is checked by
SHA-256 both ways. Programs that end at their stdin's EOF get a stdin the test holds open until
everything has arrived (see tls_peers).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import hashlib
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
import tls_peers
from tls_peers import (
    BioSession,
    TLSFiles,
    hopcat,
    listen_hopcat,
    program,
    py_tls_server,
    wait_for_size,
)

from support import pattern, run_hopcat, sha256

SIZE = 4 << 20
TLS_VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_3, id="TLSv1.3"),
                pytest.param(ssl.TLSVersion.TLSv1_2, id="TLSv1.2")]  # fmt: skip
SOCAT_VERSION = {ssl.TLSVersion.TLSv1_3: (), ssl.TLSVersion.TLSv1_2: ("openssl-max-proto-version=TLS1.2",)}
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n"


def _file_sha(path: Path) -> str:
    return sha256(path.read_bytes())


def _one_line(result: subprocess.CompletedProcess[bytes] | str) -> str:
    err = result if isinstance(result, str) else result.stderr.decode()
    assert err.startswith("hopcat: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


# -- hopcat --tls against TLS servers ------------------------------------------------------------


def _server_argv(name: str, tls: TLSFiles, need: Callable[..., str]) -> Callable[[int], list[str]]:
    cert, key = str(tls.cert), str(tls.key)
    if name == "openssl s_server":
        return lambda port: [need("openssl"), "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                             cert, "-key", key, "-quiet", "-naccept", "1"]  # fmt: skip
    if name == "ncat":
        return lambda port: [need("ncat"), "--ssl", "-l", "127.0.0.1", str(port), "--ssl-cert",
                             cert, "--ssl-key", key]  # fmt: skip
    return lambda port: [need("socat"), tls.socat_listen(port), "STDIO"]


@pytest.mark.parametrize("server", ["openssl s_server", "ncat", "socat"])
def test_client_against_tls_servers_both_ways(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, server: str
) -> None:
    up, down = pattern(SIZE, 1), pattern(SIZE + 3, 2)
    with program(server.split()[-1], tmp_path, _server_argv(server, tls, need)) as peer:
        peer.feed(down)
        client = hopcat(tmp_path, "--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(peer.port))
        try:
            client.feed(up)
            wait_for_size(peer.out, len(up), server)
            wait_for_size(client.out, len(down), "hopcat's stdout")
            client.close_stdin()  # close_notify: the server ends the session
            assert client.wait() == 0, client.stderr()
        finally:
            client.stop()
    assert _file_sha(peer.out) == sha256(up)
    assert _file_sha(client.out) == sha256(down)
    assert client.stderr() == ""


# -- hopcat -l --tls against TLS clients ---------------------------------------------------------


def _client_argv(name: str, tls: TLSFiles, need: Callable[..., str], port: int) -> list[str]:
    if name == "openssl s_client":
        return [need("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile",
                str(tls.ca), "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"]  # fmt: skip
    return [need("ncat"), "--ssl", "127.0.0.1", str(port)]


@pytest.mark.parametrize(("client", "certificate"),
                         [("openssl s_client", "--tls-cert"), ("ncat", "throwaway")])  # fmt: skip
def test_listener_against_tls_clients_both_ways(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, client: str, certificate: str
) -> None:
    up, down = pattern(SIZE, 3), pattern(SIZE + 5, 4)
    cert = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if certificate != "throwaway" else []
    listener, port = listen_hopcat(tmp_path, "--tls", *cert, "127.0.0.1", "0")
    peer = tls_peers.Background(tmp_path, "client", _client_argv(client, tls, need, port))
    try:
        listener.feed(down)
        peer.feed(up)
        wait_for_size(listener.out, len(up), "hopcat's stdout")
        wait_for_size(peer.out, len(down), client)
        listener.close_stdin()  # close_notify: s_client leaves...
        peer.close_stdin()  # ...ncat at its stdin's EOF
        assert listener.wait() == 0, listener.stderr()
        assert peer.wait() == 0, peer.stderr()
    finally:
        listener.stop()
        peer.stop()
    assert _file_sha(listener.out) == sha256(up)
    assert _file_sha(peer.out) == sha256(down)


@pytest.mark.parametrize("certificate", ["--tls-cert", "throwaway"])
def test_curl_gets_an_https_answer_from_stdin(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, certificate: str
) -> None:
    curl = need("curl")
    response = tmp_path / "response"
    response.write_bytes(RESPONSE)
    if certificate == "throwaway":
        args, trust = [], ["-k"]
    else:
        args, trust = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)], ["--cacert", str(tls.ca)]
    listener, port = listen_hopcat(tmp_path, "--tls", *args, "127.0.0.1", "0", stdin=response)
    try:
        result = subprocess.run([curl, "-sS", "--max-time", "20", *trust,
                                 f"https://127.0.0.1:{port}/from-curl"],
                                capture_output=True, timeout=30, env=peers.peer_env())  # fmt: skip
        assert listener.wait() == 0, listener.stderr()
    finally:
        listener.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\n"
    # curl's request came with its Finished more often than not: it must reach stdout anyway.
    assert listener.out.read_bytes().startswith(b"GET /from-curl HTTP/1.1\r\n")
    assert listener.out.read_bytes().endswith(b"\r\n\r\n")


def test_a_request_glued_to_the_finished_is_served(tls: TLSFiles, tmp_path: Path) -> None:
    """The client's request arrives in the same segment as its handshake's last message, and the
    program answers only once it has read it: the relay must see records poll cannot."""
    listener, port = listen_hopcat(tmp_path, "--tls", "--tls-cert", str(tls.cert), "--tls-key",
                                   str(tls.key), "--sh-exec", "read line; echo \"got $line\"",
                                   "127.0.0.1", "0")  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            session = BioSession(sock, tls.client_context(), server_side=False,
                                 server_hostname="127.0.0.1")  # fmt: skip
            session.handshake(flush=False)  # our Finished waits in the BIO...
            session.tls.write(b"hello\n")
            session.flush()  # ...and goes out with the request in one send
            assert session.recv_all() == b"got hello\n"
        assert listener.wait() == 0, listener.stderr()
    finally:
        listener.stop()


@pytest.mark.parametrize(("version", "command"), [("-tls1_2", "r"), ("-tls1_2", "R"), ("-tls1_3", "K")],
                         ids=["TLSv1.2-renegotiation", "TLSv1.2-renegotiation-for-a-cert",
                              "TLSv1.3-key-update-requested"])  # fmt: skip
def test_the_server_renegotiates_or_updates_keys_mid_stream(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, version: str, command: str
) -> None:
    """openssl s_server's commands: the handshake messages it sends mid-stream need answers
    from hopcat's reads (a renegotiation's ClientHello), and a write of ours during the
    renegotiation has to wait for it."""
    openssl = need("openssl")
    with program("s_server", tmp_path, lambda port: [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tls.cert), "-key",
        str(tls.key), version, "-naccept", "1"]) as server:  # fmt: skip
        client = hopcat(tmp_path, "--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port))
        try:
            client.feed(b"first\n").join(10)
            peers.wait_until(lambda: b"first" in server.out.read_bytes(), 10, "first")
            server.feed(f"{command}\n".encode()).join(10)
            time.sleep(0.2)  # its message reaches hopcat before our next write
            client.feed(b"second\n").join(10)
            peers.wait_until(lambda: b"second" in server.out.read_bytes(), 10, "second")
            server.feed(b"from the server\n").join(10)
            wait_for_size(client.out, len(b"from the server\n"), "hopcat's stdout")
            client.close_stdin()
            assert client.wait() == 0, client.stderr()
        finally:
            client.stop()
    assert client.out.read_bytes() == b"from the server\n"
    assert client.stderr() == ""


# -- the TLS half-close --------------------------------------------------------------------------


def _digest_handler(session: BioSession) -> bytes:
    """Read to the client's close_notify, then answer the digest and close_notify."""
    received = session.recv_all()
    session.send(f"{len(received)} {sha256(received)}\n".encode())
    session.close_notify()
    return received


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("server", ["socat", "python"])
def test_request_then_eof_gets_the_answer(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, version: ssl.TLSVersion, server: str
) -> None:
    up = pattern(SIZE, 5)
    if server == "socat":
        socat = need("socat")

        def make_argv(port: int) -> list[str]:
            return [socat, tls.socat_listen(port, *SOCAT_VERSION[version]), "EXEC:sha256sum"]

        with program("socat", tmp_path, make_argv) as peer:
            result = run_hopcat("-v", "--tls", "--tls-ca", str(tls.ca), "127.0.0.1",
                                str(peer.port), input=up)  # fmt: skip
        answer = f"{sha256(up)}  -\n".encode()
    else:
        with py_tls_server(tls.server_context(maximum=version), _digest_handler) as peer:
            result = run_hopcat("-v", "--tls", "--tls-ca", str(tls.ca), "--tls-min-version", "1.2",
                                "127.0.0.1", str(peer.port), input=up)  # fmt: skip
            assert peer.wait() == up
        answer = f"{len(up)} {sha256(up)}\n".encode()
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert result.stdout == answer
    assert f"{version.name.replace('_', '.')} " in err
    assert "sent TLS close_notify" in err


def _send_then_close_handler(down: bytes) -> Callable[[BioSession], str]:
    def handler(session: BioSession) -> str:
        session.send(down)
        session.close_notify()
        return sha256(session.recv_all())  # what the client sends after our close_notify

    return handler


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("server", ["socat", "python"])
def test_server_ends_first_while_the_upload_goes_on(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, version: ssl.TLSVersion, server: str
) -> None:
    up, down = pattern(SIZE, 6), pattern(1000, 7)
    source = tmp_path / "up"
    source.write_bytes(up)
    args = ["-v", "--tls", "--tls-ca", str(tls.ca), "127.0.0.1"]
    if server == "socat":
        (tmp_path / "down").write_bytes(down)
        socat = need("socat")

        def make_argv(port: int) -> list[str]:
            return [socat, "-t", "10", tls.socat_listen(port, *SOCAT_VERSION[version]), "STDIO"]

        with program("socat", tmp_path, make_argv, stdin=tmp_path / "down") as peer:
            client = hopcat(tmp_path, *args, str(peer.port), stdin=source)
            assert client.wait() == 0, client.stderr()
            assert peer.wait() == 0
        assert _file_sha(peer.out) == sha256(up)
    else:
        with py_tls_server(tls.server_context(maximum=version),
                           _send_then_close_handler(down)) as python:  # fmt: skip
            client = hopcat(tmp_path, *args, str(python.port), stdin=source)
            assert client.wait() == 0, client.stderr()
            assert python.wait() == sha256(up)
    assert client.out.read_bytes() == down
    err = client.stderr()
    assert err.index("peer closed") < err.index("sent TLS close_notify"), err
    assert "truncated" not in err


def test_a_fin_without_close_notify_ends_the_stream_quietly(tls: TLSFiles) -> None:
    """Not an error (only the protocol inside can tell a truncation): exit 0, and -v says so."""

    def send_then_fin(session: BioSession) -> None:
        session.send(b"z" * 1000)
        session.sock.shutdown(socket.SHUT_WR)  # a FIN, no close_notify
        while session.sock.recv(65536):  # until hopcat's close_notify and FIN
            pass

    with py_tls_server(tls.server_context(), send_then_fin) as server:
        result = run_hopcat("-v", "--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port),
                            input=b"")  # fmt: skip
        server.wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"z" * 1000
    assert b"closed without a TLS close_notify: what came may be truncated" in result.stderr


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_listener_answers_a_client_that_half_closed(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """socat sends its request, close_notify at its stdin's EOF, and reads on; hopcat -l sends
    its whole stdin after that, then close_notify."""
    request, down = b"a request\n" * 100, pattern(SIZE, 8)
    (tmp_path / "down").write_bytes(down)
    listener, port = listen_hopcat(tmp_path, "-v", "--tls", "--tls-cert", str(tls.cert),
                                   "--tls-key", str(tls.key), "127.0.0.1", "0",
                                   stdin=tmp_path / "down")  # fmt: skip
    max_version = ",openssl-max-proto-version=TLS1.2" if version == ssl.TLSVersion.TLSv1_2 else ""
    try:
        client = subprocess.run(
            [need("socat"), "-t", "10", "STDIO",
             f"OPENSSL:127.0.0.1:{port},cafile={tls.ca}{max_version}"],
            input=request, capture_output=True, timeout=30,
        )  # fmt: skip
        assert listener.wait() == 0, listener.stderr()
    finally:
        listener.stop()
    assert client.returncode == 0, client.stderr
    assert sha256(client.stdout) == sha256(down)
    assert listener.out.read_bytes() == request
    assert "TLS with client 127.0.0.1:" in listener.stderr()
    assert version.name.replace("_", ".") in listener.stderr()


# -- errors --------------------------------------------------------------------------------------


def _failing_handshake(session: BioSession) -> None:
    raise AssertionError("the handshake should have failed")


def _tls_error(*args: str) -> str:
    result = run_hopcat(*args, timeout=30)
    err = _one_line(result)
    assert result.returncode == 82, err
    return err


def _py_server(
    tls: TLSFiles, cert: tuple[Path, Path] | None = None
) -> contextlib.AbstractContextManager[tls_peers.PyTLSServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*(cert or (tls.cert, tls.key)))
    return py_tls_server(context, _failing_handshake)


def test_unknown_ca(tls: TLSFiles) -> None:
    with _py_server(tls) as server:
        err = _tls_error("--tls", "127.0.0.1", str(server.port))  # the system's CAs only
        assert err.startswith(f"hopcat: TLS with the target 127.0.0.1:{server.port}: certificate "
                              "not trusted: unable to get local issuer certificate"), err  # fmt: skip
        assert "--tls-ca FILE" in err
        err = _tls_error("--tls", "--tls-ca", str(tls.other_ca), "127.0.0.1", str(server.port))
        assert "certificate not trusted" in err


def test_wrong_name_hints_at_servername(tls: TLSFiles) -> None:
    with _py_server(tls, tls.wrong_name) as server:
        err = _tls_error("--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port))
        assert err.startswith(f"hopcat: TLS with the target 127.0.0.1:{server.port}: certificate "
                              "not trusted: IP address mismatch"), err  # fmt: skip
        assert "--tls-servername" in err
        err = _tls_error("--tls", "--tls-ca", str(tls.ca), "localhost", str(server.port))
        assert "Hostname mismatch" in err and "--tls-servername" in err, err
    # ... and the name it has works.
    with py_tls_server(_context(tls.wrong_name), _digest_handler) as server:
        result = run_hopcat("--tls", "--tls-ca", str(tls.ca), "--tls-servername", "other.example",
                            "127.0.0.1", str(server.port), input=b"x")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"1 {sha256(b'x')}\n".encode()


def _context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    return context


def test_expired_certificate(tls: TLSFiles) -> None:
    if not tls.expired[0].name.startswith("expired"):
        pytest.skip("the cryptography package is needed to sign an expired certificate")
    with _py_server(tls, tls.expired) as server:
        err = _tls_error("--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port))
        assert "certificate not trusted: certificate has expired" in err, err


def test_pin_mismatch(tls: TLSFiles) -> None:
    with _py_server(tls) as server:
        err = _tls_error("--tls", "--tls-pin", "sha256:" + "00" * 32, "127.0.0.1", str(server.port))
        real = hashlib.sha256(ssl.PEM_cert_to_DER_cert(tls.cert.read_text())).hexdigest().upper()
        assert err == (f"hopcat: TLS with the target 127.0.0.1:{server.port}: certificate pin "
                       f"mismatch (got sha256:{real})\n")  # fmt: skip


def test_not_a_tls_server(banner_server: peers.BannerServer) -> None:
    err = _tls_error("--tls", banner_server.host, str(banner_server.port))
    assert err == (f"hopcat: TLS with the target {banner_server.hostport}: handshake failed: "
                   "wrong version number (not a TLS server?)\n")  # fmt: skip


def test_a_server_that_closes_at_once(tls: TLSFiles) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def close_at_once() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=close_at_once, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        err = _tls_error("--tls", "127.0.0.1", str(port))
        assert err == (f"hopcat: TLS with the target 127.0.0.1:{port}: the peer closed during the "
                       "handshake (not a TLS server?)\n")  # fmt: skip
    finally:
        thread.join(10)
        listener.close()


def test_a_silent_server_times_the_handshake_out(tls: TLSFiles) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog), never answers
        port = listener.getsockname()[1]
        result = run_hopcat("--connect-timeout", "1", "--tls", "--tls-ca", str(tls.ca),
                            "127.0.0.1", str(port), timeout=30)  # fmt: skip
    err = _one_line(result)
    assert result.returncode == 75, err
    assert err == (f"hopcat: TLS with the target 127.0.0.1:{port}: no handshake before the "
                   "connect timeout\n")  # fmt: skip


def test_tls12_server_with_min_version_13(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path
) -> None:
    openssl = need("openssl")
    with program("s_server", tmp_path, lambda port: [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tls.cert), "-key",
        str(tls.key), "-quiet", "-tls1_2"]) as server:  # fmt: skip
        err = _tls_error("--tls", "--tls-ca", str(tls.ca), "--tls-min-version", "1.3",
                         "127.0.0.1", str(server.port))  # fmt: skip
        assert err.startswith(f"hopcat: TLS with the target 127.0.0.1:{server.port}: handshake "
                              "failed: "), err  # fmt: skip
        assert "version" in err.lower(), err
        # Without the floor it works: TLS 1.2 is accepted by default.
        result = run_hopcat("-v", "-q", "0", "--tls", "--tls-ca", str(tls.ca), "127.0.0.1",
                            str(server.port), timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b"TLSv1.2 " in result.stderr


@pytest.mark.parametrize("garbage", [
    pytest.param(b"\x17\x03\x03\x00\x20" + bytes(range(32)), id="bad-record"),
    pytest.param(b"\x15\x03\x03\x00\x02\x02\x50", id="plaintext-alert"),
])  # fmt: skip
def test_a_bad_record_mid_stream(tls: TLSFiles, tmp_path: Path, garbage: bytes) -> None:
    def send_then_garbage(session: BioSession) -> None:
        session.send(b"x" * 1000)
        session.sock.sendall(garbage)
        while session.sock.recv(65536):  # until hopcat gives up
            pass

    with py_tls_server(tls.server_context(), send_then_garbage) as server:
        client = hopcat(tmp_path, "--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port))
        try:
            code = client.wait()
        finally:
            client.stop()
    err = _one_line(client.stderr())
    assert code == 82, err
    assert client.out.read_bytes() == b"x" * 1000
    assert "mid-stream (after 1000 bytes received)" in err, err
    assert f"127.0.0.1:{server.port}" in err, err


def test_listener_requires_a_client_certificate(tls: TLSFiles, tmp_path: Path) -> None:
    args = ["--tls", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-verify-client",
            "--tls-ca", str(tls.ca), "127.0.0.1", "0"]  # fmt: skip
    listener, port = listen_hopcat(tmp_path, "-v", *args, name="with-cert")
    try:
        result = run_hopcat("--tls", "--tls-ca", str(tls.ca), "--tls-cert", str(tls.client[0]),
                            "--tls-key", str(tls.client[1]), "127.0.0.1", str(port),
                            input=b"with a certificate\n")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert listener.wait() == 0, listener.stderr()
        assert listener.out.read_bytes() == b"with a certificate\n"
        assert "CN=hopcat test client" in listener.stderr()
    finally:
        listener.stop()
    listener, port = listen_hopcat(tmp_path, *args, name="without")
    try:
        result = run_hopcat("--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(port), input=b"no\n")
        assert listener.wait() == 82
        err = _one_line(listener.stderr())
        assert err.startswith("hopcat: TLS with client 127.0.0.1:"), err
        assert "certificate" in err.lower(), err
    finally:
        listener.stop()
    assert result.returncode == 82, result.stderr  # the alert reaches the client
    assert result.stdout == b""


def test_keep_open_listener_survives_clients_that_fail_tls(tls: TLSFiles, tmp_path: Path) -> None:
    """-l -k --tls: a silent client (the handshake's time limit), a plain-TCP one and one whose
    handshake fails are each one line naming the client once; the next TLS client is served."""
    listener, port = listen_hopcat(tmp_path, "-k", "--tls", "--tls-cert", str(tls.cert),
                                   "--tls-key", str(tls.key), "--connect-timeout", "1",
                                   "127.0.0.1", "0", stdin=Path("/dev/null"))  # fmt: skip
    try:
        assert run_hopcat("--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(port),
                          input=b"one\n").returncode == 0  # fmt: skip
        with socket.create_connection(("127.0.0.1", port)) as silent:
            silent_port = silent.getsockname()[1]
            peers.wait_until(lambda: "no handshake" in listener.stderr(), 10, "the time limit")
        with socket.create_connection(("127.0.0.1", port)) as plain:
            plain_port = plain.getsockname()[1]
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            peers.wait_until(lambda: "not a TLS client" in listener.stderr(), 10, "the refusal")
        refused = run_hopcat("--tls", "127.0.0.1", str(port), input=b"x")  # no --tls-ca
        assert refused.returncode == 82
        peers.wait_until(lambda: "unknown ca" in listener.stderr(), 10, "the client's alert")
        assert run_hopcat("--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(port),
                          input=b"two\n").returncode == 0  # fmt: skip
        assert listener.proc.poll() is None
    finally:
        listener.stop()
    assert listener.out.read_bytes() == b"one\ntwo\n"
    lines = listener.stderr().splitlines()
    assert lines[0] == (f"hopcat: TLS with client 127.0.0.1:{silent_port}: no handshake in 1 s")
    assert lines[1] == (f"hopcat: TLS with client 127.0.0.1:{plain_port}: handshake failed: "
                        "http request (not a TLS client?)")  # fmt: skip
    assert lines[2].startswith("hopcat: TLS with client 127.0.0.1:") and lines[2].endswith(
        ": handshake failed: alert unknown ca"), lines[2]
    assert lines[3:] == ["hopcat: terminated (SIGTERM)"]


@pytest.mark.parametrize(("args", "message"), [
    (["--tls", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem: "),
    (["--tls", "--tls-ca", "BAD"], "--tls-ca BAD: not a PEM CA bundle"),
    (["--tls-ca", "BAD"], "--tls-ca is a TLS option: add --tls (-c)"),
    (["--tls", "-F"], "-F hands ssh the socket, but with --tls"),
    (["--tls", "--tls-pin", "md5:00"], "--tls-pin takes sha256:HEX or sha256:BASE64"),
    (["--tls", "--tls-min-version", "1.1"], "--tls-min-version takes 1.2 or 1.3"),
    (["--tls", "--tls-cert", "BAD"], "--tls-cert BAD: it needs a PEM certificate and its private key"),
])  # fmt: skip
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a PEM file\n")
    args = [str(bad) if arg == "BAD" else arg for arg in args]
    message = message.replace("BAD", str(bad))
    with peers.DigestServer() as target:  # never reached: the options are checked first
        result = run_hopcat(*args, "127.0.0.1", str(target.port), timeout=30)
        assert target.records == []
    err = _one_line(result)
    assert result.returncode == 64, err
    assert err.startswith(f"hopcat: {message}"), err


def test_listener_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a PEM file\n")
    for args, message in (
        (["--tls-cert", str(bad)], f"--tls-cert {bad}: it needs a PEM certificate and its private"),
        (["--tls-verify-client"], "--tls-verify-client needs --tls-ca FILE"),
        (["--tls-pin", "sha256:" + "00" * 32], "--tls-pin is for a TLS client"),
    ):
        ready = tmp_path / "ready"
        result = run_hopcat("-l", "--ready-file", str(ready), "--tls", *args, "127.0.0.1", "0",
                            timeout=30)  # fmt: skip
        err = _one_line(result)
        assert result.returncode == 64, err
        assert err.startswith(f"hopcat: {message}"), err
        assert not ready.exists()  # never said it was ready


# -- -v ------------------------------------------------------------------------------------------


def test_verbose_describes_the_session_and_its_pin_works(tls: TLSFiles, tmp_path: Path) -> None:
    der = ssl.PEM_cert_to_DER_cert(tls.cert.read_text())
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    not_after = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(tls.cert)],
                               capture_output=True, check=True, text=True).stdout  # fmt: skip
    expires = ssl.cert_time_to_seconds(not_after.strip().split("=", 1)[1])
    with py_tls_server(tls.server_context(), _digest_handler) as server:
        result = run_hopcat("-v", "--tls", "--tls-ca", str(tls.ca), "127.0.0.1", str(server.port),
                            input=b"hi")  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.decode().splitlines() if "TLS with the target" in line)
    match = re.search(r"in [\d.]+ ms: (TLSv1\.[23]) (\S+); subject (.*), issuer (.*), expires "
                      r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC, sha256:([0-9A-F]{64})$", line)  # fmt: skip
    assert match, line
    version, cipher, subject, issuer, when, shown = match.groups()
    assert version == "TLSv1.3" and cipher.startswith("TLS_"), line
    assert (subject, issuer) == ("CN=127.0.0.1", "CN=hopcat test CA")
    assert calendar.timegm(time.strptime(when, "%Y-%m-%d %H:%M:%S")) == expires
    assert shown == fingerprint
    # The pin as -v shows it, with colons (as nc -H takes it), and in base64, without a CA.
    for pin in (shown, ":".join(shown[i : i + 2] for i in range(0, 64, 2)),
                base64.b64encode(bytes.fromhex(shown)).decode()):  # fmt: skip
        with py_tls_server(tls.server_context(), _digest_handler) as server:
            result = run_hopcat("--tls", "--tls-pin", f"sha256:{pin}", "127.0.0.1",
                                str(server.port), input=b"pinned")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"6 {sha256(b'pinned')}\n".encode()


def test_sni_and_alpn(tls: TLSFiles) -> None:
    """The name sent (SNI) is the host, or --tls-servername; none for an address. -v shows the
    protocol --tls-alpn agreed on."""
    seen: list[str | None] = []
    context = _context((tls.cert, tls.key))

    def record(_session: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        seen.append(name)

    context.sni_callback = record
    context.set_alpn_protocols(["h2"])
    with py_tls_server(context, _digest_handler) as server:
        for args in (["localhost"], ["--tls-servername", "localhost", "127.0.0.1"], ["127.0.0.1"]):
            result = run_hopcat("-v", "--tls", "--tls-ca", str(tls.ca), "--tls-alpn",
                                "http/1.1,h2", *args, str(server.port), input=b"x")  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert b"; ALPN h2; subject CN=127.0.0.1" in result.stderr, result.stderr
    assert seen == ["localhost", "localhost", None]


@pytest.mark.parametrize("spelling", [
    ["--ssl", "--ssl-verify", "--ssl-trustfile", "CA", "--ssl-servername", "localhost"],  # ncat
    ["-c", "--tls-ca", "CA"],  # OpenBSD nc's -c
])  # fmt: skip
def test_other_tools_spellings(tls: TLSFiles, spelling: list[str]) -> None:
    with py_tls_server(tls.server_context(), _digest_handler) as server:
        args = [str(tls.ca) if arg == "CA" else arg for arg in spelling]
        result = run_hopcat(*args, "127.0.0.1", str(server.port), input=b"spelt")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"5 {sha256(b'spelt')}\n".encode()


def test_client_certificate_to_openssl_s_server(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path
) -> None:
    """--tls-cert/--tls-key with a server that demands one (s_server -Verify)."""
    openssl = need("openssl")
    with program("s_server", tmp_path, lambda port: [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tls.cert), "-key",
        str(tls.key), "-Verify", "1", "-verify_return_error", "-CAfile", str(tls.ca),
        "-naccept", "1"]) as server:  # fmt: skip
        client = hopcat(tmp_path, "--tls", "--tls-ca", str(tls.ca), "--tls-cert",
                        str(tls.client[0]), "--tls-key", str(tls.client[1]), "127.0.0.1",
                        str(server.port))  # fmt: skip
        try:
            client.feed(b"with my certificate\n")
            peers.wait_until(lambda: b"with my certificate" in server.out.read_bytes(), 10,
                             "the line at s_server")  # fmt: skip
            client.close_stdin()
            assert client.wait() == 0, client.stderr()
        finally:
            client.stop()
        assert b"subject=CN = hopcat test client" in server.out.read_bytes()


def test_throwaway_certificate_fingerprint_pins_the_listener(tmp_path: Path) -> None:
    """-l --tls -v prints the throwaway certificate's fingerprint; a client pins it."""
    listener, port = listen_hopcat(tmp_path, "-v", "--tls", "127.0.0.1", "0", stdin=None)
    try:
        peers.wait_until(lambda: "throwaway" in listener.stderr(), 10, "the fingerprint line")
        shown = re.search(r"--tls-pin (sha256:[0-9A-F]{64})\)", listener.stderr())
        assert shown, listener.stderr()
        listener.feed(b"from the listener\n")
        result = run_hopcat("-v", "--tls", "--tls-pin", shown.group(1), "127.0.0.1", str(port),
                            input=b"from the client\n")  # fmt: skip
        listener.close_stdin()
        assert result.returncode == 0, result.stderr
        assert listener.wait() == 0, listener.stderr()
    finally:
        listener.stop()
    assert result.stdout == b"from the listener\n"
    assert listener.out.read_bytes() == b"from the client\n"
    assert b"subject CN=hopcat ephemeral" in result.stderr


def test_insecure_warns_once(tls: TLSFiles) -> None:
    with py_tls_server(tls.server_context(), _digest_handler) as server:
        result = run_hopcat("--tls", "--tls-insecure", "127.0.0.1", str(server.port), input=b"x")
    assert result.returncode == 0
    assert result.stdout == f"1 {sha256(b'x')}\n".encode()
    err = _one_line(result)
    assert err.startswith("hopcat: warning: --tls-insecure: "), err


# -- --exec through TLS --------------------------------------------------------------------------


def test_exec_over_tls_client(tls: TLSFiles) -> None:
    data = pattern(1 << 20, 9)

    def echo_check(session: BioSession) -> str:
        session.send(data)
        echoed = bytearray()
        while len(echoed) < len(data) and (chunk := session.recv()):
            echoed += chunk
        session.close_notify()  # cat's stdin ends, cat ends, hopcat sends its close_notify
        assert session.recv_all() == b""
        return sha256(bytes(echoed))

    with py_tls_server(tls.server_context(), echo_check) as server:
        result = run_hopcat("--tls", "--tls-ca", str(tls.ca), "--sh-exec", "cat", "127.0.0.1",
                            str(server.port), timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert server.wait() == sha256(data)


def test_listener_keeps_serving_tls_clients_with_exec(
    tls: TLSFiles, need: Callable[..., str], tmp_path: Path
) -> None:
    socat = need("socat")
    listener, port = listen_hopcat(tmp_path, "-k", "--tls", "--tls-cert", str(tls.cert),
                                   "--tls-key", str(tls.key), "--exec", "sha256sum", "127.0.0.1",
                                   "0")  # fmt: skip
    clients = []
    try:
        for index in range(2):  # both at once: a child each
            source = tmp_path / f"up{index}"
            source.write_bytes(pattern(SIZE // 2 + index, 10 + index))
            with source.open("rb") as stdin:
                clients.append(subprocess.Popen(
                    [socat, "-t", "10", "STDIO", f"OPENSSL:127.0.0.1:{port},cafile={tls.ca}"],
                    stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                ))  # fmt: skip
        for index, client in enumerate(clients):
            out, err = client.communicate(timeout=30)
            assert client.returncode == 0, err
            assert out == f"{_file_sha(tmp_path / f'up{index}')}  -\n".encode()
        assert listener.proc.poll() is None  # -k: still listening
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        listener.stop()
