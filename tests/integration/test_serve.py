"""``hopcat serve`` with real clients: curl, ncat, nc.openbsd, ssh, hopcat's own client, chains.

Each test starts its own server (``serve`` fixture: ``python -m hopcat serve 127.0.0.1:0``,
readiness through ``--ready-file``). Our server passes a client's half-close on, so a
DigestServer (read to EOF, answer the digest) proves stdin EOF travels and the answer comes back;
chains through microsocks use FramedEcho instead, since microsocks drops the tunnel at a FIN.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    socks4_connect,
    socks5_connect,
    wait_closed,
)

from support import clean_env, closed_port, pattern, run_hopcat, sha256

Serve = Callable[..., ServeProcess]
USER, PASSWORD = "alice", "s3cret-pw:with-colon"
BULK = 4 << 20


def curl(need: Callable[..., str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", *args],
        capture_output=True, timeout=30, env=clean_env(),
    )  # fmt: skip


# --------------------------------------------------------------------------- curl


CURL_MODES = [
    ("--socks4", "127.0.0.1", "socks4"),
    ("--socks4a", "localhost", "socks4a"),
    ("--socks5", "127.0.0.1", "socks5"),
    ("--socks5-hostname", "localhost", "socks5"),
    ("--proxy-http", "localhost", "http"),
]


@pytest.mark.parametrize(("flag", "host", "proto"), CURL_MODES, ids=[m[0] for m in CURL_MODES])
def test_curl_every_protocol(serve: Serve, need: Callable[..., str], http_target: peers.HttpTarget,
                             flag: str, host: str, proto: str) -> None:  # fmt: skip
    server = serve()
    url = f"http://{host}:{http_target.port}/path-{proto}"
    if flag == "--proxy-http":
        args = ["-p", "-x", f"http://{server.hostport}", url]
    else:
        args = [flag, server.hostport, url]
    result = curl(need, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == http_target.body
    line = server.wait_log("result=ok")
    assert f"proto={proto} " in line
    assert f"dest={host}:{http_target.port}" in line


@pytest.mark.parametrize("mode", ["socks5", "socks5h", "http"])
def test_curl_with_credentials(serve: Serve, need: Callable[..., str],
                               http_target: peers.HttpTarget, mode: str) -> None:  # fmt: skip
    server = serve("--auth", f"{USER}:{PASSWORD}", "--auth", "bob:other")
    proxy = f"{mode}://{server.hostport}"
    extra = ["-p"] if mode == "http" else []
    ok = curl(need, *extra, "-x", proxy, "--proxy-user", f"{USER}:{PASSWORD}", http_target.url)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == http_target.body
    wrong = curl(need, *extra, "-x", proxy, "--proxy-user", f"{USER}:nope", http_target.url)
    assert wrong.returncode != 0
    missing = curl(need, *extra, "-x", proxy, http_target.url)
    assert missing.returncode != 0
    log = server.wait_log("result=auth-failed", count=2)
    assert f"user={USER} " in log
    assert PASSWORD not in log and "nope" not in log


def test_curl_ipv6_listener_and_target(serve: Serve, need: Callable[..., str],
                                       http_target_v6: peers.HttpTarget) -> None:  # fmt: skip
    server = serve(listen=("[::1]:0",))
    assert server.hostport.startswith("[::1]:")
    result = curl(need, "--socks5-hostname", server.hostport, http_target_v6.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == http_target_v6.body
    assert f"dest=[::1]:{http_target_v6.port}" in server.wait_log("result=ok")


def test_several_listen_addresses(serve: Serve, need: Callable[..., str],
                                  http_target: peers.HttpTarget) -> None:  # fmt: skip
    if not peers.ipv6_available():
        pytest.skip("no IPv6 loopback")
    server = serve(listen=("127.0.0.1:0", "[::1]:0"))
    assert len(server.addresses) == 2
    for address in server.addresses:
        result = curl(need, "--socks5", address, http_target.url)
        assert result.returncode == 0, (address, result.stderr)


# --------------------------------------------------------------------------- ncat, nc.openbsd


@pytest.mark.parametrize("proxy_type", ["socks4", "socks5", "http"])
def test_ncat_through_serve(serve: Serve, need: Callable[..., str],
                            digest_server: peers.DigestServer, proxy_type: str) -> None:  # fmt: skip
    server = serve()
    data = pattern(BULK, 3)
    result = subprocess.run(
        [need("ncat"), "--proxy", server.hostport, "--proxy-type", proxy_type,
         digest_server.host, str(digest_server.port)],
        input=data, capture_output=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)


@pytest.mark.parametrize("proxy_type", ["socks5", "http"])
def test_ncat_with_proxy_auth(serve: Serve, need: Callable[..., str],
                              digest_server: peers.DigestServer, proxy_type: str) -> None:  # fmt: skip
    server = serve("--auth", f"{USER}:{PASSWORD}")
    result = subprocess.run(
        [need("ncat"), "--proxy", server.hostport, "--proxy-type", proxy_type,
         "--proxy-auth", f"{USER}:{PASSWORD}", digest_server.host, str(digest_server.port)],
        input=b"hello", capture_output=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(b"hello")
    assert f"user={USER} " in server.wait_log("result=ok")


@pytest.mark.parametrize("x_type", ["5", "4", "connect"])
def test_nc_openbsd_through_serve(serve: Serve, need: Callable[..., str],
                                  digest_server: peers.DigestServer, x_type: str) -> None:  # fmt: skip
    server = serve()
    data = pattern(BULK, 4)
    result = subprocess.run(
        [need("nc.openbsd", "netcat-openbsd"), "-N", "-X", x_type, "-x", server.hostport,
         digest_server.host, str(digest_server.port)],
        input=data, capture_output=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)


@pytest.mark.parametrize("x_type", ["5", "connect"])
def test_ssh_proxycommand_nc_openbsd(serve: Serve, need: Callable[..., str],
                                     sshd: peers.SshServer, x_type: str) -> None:  # fmt: skip
    server = serve()
    nc = need("nc.openbsd", "netcat-openbsd")
    command = f"{nc} -X {x_type} -x {server.hostport} %h %p"
    data = pattern(1 << 20, 5)
    result = subprocess.run(
        [*sshd.ssh_argv("-o", f"ProxyCommand={command}"), "sha256sum"],
        input=data, capture_output=True, timeout=60, env=peers.peer_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == sha256(data)
    assert f"dest=127.0.0.1:{sshd.port} result=ok" in server.wait_log("result=ok")


# --------------------------------------------------------------------------- hopcat's own client


@pytest.mark.parametrize("scheme", ["socks4", "socks4a", "socks5", "socks5h", "http"])
def test_hopcat_client_half_close(serve: Serve, digest_server: peers.DigestServer,
                                  scheme: str) -> None:  # fmt: skip
    server = serve()
    data = pattern(BULK, 6)
    host = "localhost" if scheme in ("socks4a", "socks5h") else digest_server.host
    result = run_hopcat("-x", server.url(scheme), host, str(digest_server.port), input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)
    line = server.wait_log("result=ok")
    assert f"up={len(data)} down=65 " in line


def test_download_and_banner_first(serve: Serve, source_server: Callable[..., peers.SourceServer],
                                   banner_server: peers.BannerServer) -> None:  # fmt: skip
    server = serve()
    data = pattern(BULK, 7)
    source = source_server(data)
    result = run_hopcat("-x", server.url("socks5"), source.host, str(source.port), input=None)
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(data)
    result = run_hopcat("-x", server.url("http"), banner_server.host, str(banner_server.port),
                        input=b"echo me")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == banner_server.banner + b"echo me"


def test_chain_of_hopcat_servers(serve: Serve, digest_server: peers.DigestServer) -> None:
    """client -> C (socks5) -> B (http) -> A (socks4a) -> target, plus a client-side chain."""
    a = serve()
    b = serve("--via", a.url("socks4a"))
    c = serve("--via", b.url("http"))
    data = pattern(BULK, 8)
    result = run_hopcat("-x", c.url("socks5h"), "localhost", str(digest_server.port), input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)
    for server in (a, b, c):
        assert "result=ok" in server.wait_log("result=ok")
    # A client-side chain (hopcat -x -x -x), no --via involved; three servers, since a server
    # refuses to connect to itself (a proxy loop).
    d, e = serve(), serve()
    result = run_hopcat("-x", a.url("socks5"), "-x", d.url("http"), "-x", e.url("socks4"),
                        digest_server.host, str(digest_server.port), input=data)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)


def test_via_dante_and_microsocks(serve: Serve, danted: peers.Daemon, microsocks: peers.Daemon,
                                  digest_server: peers.DigestServer,
                                  framed_echo: peers.FramedEcho) -> None:  # fmt: skip
    through_dante = serve("--via", danted.url)
    data = pattern(BULK, 9)
    result = run_hopcat("-x", through_dante.url("socks5"), digest_server.host,
                        str(digest_server.port), input=data)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == digest_server.answer_for(data)

    # hopcat serve -> Dante -> microsocks -> target, framed (microsocks drops the tunnel at a FIN).
    chained = serve("--via", danted.url, "--via", microsocks.url)
    sock = connect(chained)
    with sock:
        assert socks5_connect(sock, framed_echo.host, framed_echo.port) == 0
        for size in (1, 70000, BULK):
            payload = pattern(size, size)
            assert peers.framed_roundtrip(sock, payload) == peers.frame_reply(payload)
    # And our server as a hop behind microsocks in a client-side chain.
    result = run_hopcat("-x", microsocks.url, "-x", through_dante.url("socks5"),
                        "--no-shutdown", "-q", "2", framed_echo.host, str(framed_echo.port),
                        input=peers.frame(b"x" * 1000))  # fmt: skip
    assert result.stdout == peers.frame_reply(b"x" * 1000), result.stderr


def test_via_upstream_refusal_is_passed_on(serve: Serve, danted: peers.Daemon) -> None:
    server = serve("--via", danted.url)
    with closed_port() as port:
        sock = connect(server)
        with sock:
            assert socks5_connect(sock, "127.0.0.1", port) == 5  # Dante's "refused", passed on
        sock = connect(server)
        with sock:
            assert http_connect(sock, "127.0.0.1", port)[0] == 502
    server.wait_log("result=refused", count=2)


# --------------------------------------------------------------------------- protocol answers


def test_unsupported_commands_get_their_answer(serve: Serve) -> None:
    server = serve("--no-forward")  # forwarding: test_serve_forward.py
    with connect(server) as sock:  # BIND (UDP ASSOCIATE is served: test_serve_udp.py)
        assert socks5_connect(sock, "127.0.0.1", 9, command=2) == 7
        assert wait_closed(sock) == b""
    with connect(server) as sock:
        assert socks4_connect(sock, "127.0.0.1", 9, command=2) == 91
    with connect(server) as sock:
        sock.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        answer = wait_closed(sock)
        assert answer.startswith(b"HTTP/1.1 405 ")
        assert b"Allow: CONNECT\r\n" in answer
    log = server.wait_log("result=unsupported", count=3)
    assert "BIND is not supported" in log
    assert "GET is not supported" in log


def test_failures_get_the_right_codes(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--deny", f"127.0.0.1:{digest_server.port}", "--connect-timeout", "3")
    with closed_port() as port:
        cases = [
            ("127.0.0.1", port, 5, 502, "refused"),
            ("127.0.0.1", digest_server.port, 2, 403, "denied"),
            ("name.invalid", 80, 4, 502, "dns-error"),
        ]
        for host, target_port, socks5_code, http_status, result in cases:
            with connect(server) as sock:
                assert socks5_connect(sock, host, target_port) == socks5_code, result
            with connect(server) as sock:
                assert http_connect(sock, host, target_port)[0] == http_status, result
            with connect(server) as sock:
                assert socks4_connect(sock, host, target_port) == 91, result
            server.wait_log(f"result={result}", count=3)


def test_pipelined_bytes_reach_the_target_first(
    serve: Serve, banner_server: peers.BannerServer
) -> None:
    """Greeting, request and payload in one write (SOCKS5, SOCKS4a, HTTP): nothing lost."""
    server = serve()
    port = banner_server.port.to_bytes(2, "big")
    requests = {
        "socks5": b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port,
        "socks4a": b"\x04\x01" + port + b"\x00\x00\x00\x01\x00127.0.0.1\x00",
        "http": f"CONNECT 127.0.0.1:{banner_server.port} HTTP/1.1\r\n\r\n".encode(),
    }
    replies = {
        "socks5": 2 + 10,
        "socks4a": 8,
        "http": len(b"HTTP/1.1 200 Connection established\r\n\r\n"),
    }
    for name, request in requests.items():
        with connect(server) as sock:
            sock.sendall(request + b"early bytes")
            answer = recv_exact(
                sock, replies[name] + len(banner_server.banner) + len(b"early bytes")
            )
            assert answer[replies[name] :] == banner_server.banner + b"early bytes", name


def test_json_logs_never_hold_secrets(
    serve: Serve, digest_server: peers.DigestServer, tmp_path: Path
) -> None:
    auth_file = tmp_path / "users"
    auth_file.write_text(f"# users\n{USER}:{PASSWORD}\n")
    auth_file.chmod(0o600)
    server = serve("--auth-file", str(auth_file), "--log-format", "json")
    for password in (PASSWORD, "wrong-secret"):
        result = run_hopcat("-x", f"socks5://{USER}:{password}@{server.hostport}",
                            digest_server.host, str(digest_server.port), input=b"hi")  # fmt: skip
        assert (result.returncode == 0) == (password == PASSWORD), result.stderr
    server.wait_log('"result":"auth-failed"')
    records = server.json_log()
    tunnels = [r for r in records if r["event"] == "tunnel"]
    assert [r["result"] for r in tunnels] == ["ok", "auth-failed"]
    ok = tunnels[0]
    assert ok["user"] == USER and ok["proto"] == "socks5" and ok["up"] == 2 and ok["down"] == 65
    assert ok["dest"] == f"{digest_server.host}:{digest_server.port}"
    assert isinstance(ok["duration"], float) and ok["client"].startswith("127.0.0.1:")
    assert records[0]["event"] == "listen" and records[0]["auth"] == "required"
    text = server.log()
    assert PASSWORD not in text and "wrong-secret" not in text


# --------------------------------------------------------------------------- safe defaults


def test_refuses_open_non_loopback_listener() -> None:
    result = subprocess.run([sys.executable, "-m", "hopcat", "serve", "0.0.0.0:0"],
                            capture_output=True, timeout=30, env=clean_env())  # fmt: skip
    assert result.returncode == 64
    message = result.stderr.decode()
    assert "refusing to listen on 0.0.0.0:0 without authentication" in message
    assert "--allow-open" in message and "--auth" in message


def test_exposed_listener_with_auth_denies_local_destinations(
    serve: Serve, digest_server: peers.DigestServer,
) -> None:  # fmt: skip
    server = serve("--auth", f"{USER}:{PASSWORD}", "--deny-client", "0.0.0.0/0",
                   "--allow-client", "127.0.0.0/8", listen=("0.0.0.0:0",))  # fmt: skip
    # Clients: loopback only would be rule order "allow then deny"; here the deny comes first.
    with connect(server) as sock:
        assert wait_closed(sock, 5) == b""  # denied client: closed at once
    server2 = serve("--auth", f"{USER}:{PASSWORD}", "--allow-client", "127.0.0.0/8",
                    "--deny-client", "*", listen=("0.0.0.0:0",))  # fmt: skip
    with connect(server2) as sock:
        code = socks5_connect(sock, "127.0.0.1", digest_server.port, user=USER, password=PASSWORD)
        assert code == 2  # loopback destinations are denied by default when exposed
    server3 = serve("--allow-open", "--allow-client", "127.0.0.0/8", "--deny-client", "*",
                    "--allow", f"127.0.0.1:{digest_server.port}", listen=("0.0.0.0:0",))  # fmt: skip
    result = run_hopcat(
        "-x", server3.url("socks5"), "127.0.0.1", str(digest_server.port), input=b"x"
    )
    assert result.stdout == digest_server.answer_for(b"x"), result.stderr


def test_bad_options_exit_64() -> None:
    for args in (["--deny", "10.0.0.0/40"], ["--auth", "nopassword"], ["--via", "ftp://x"],
                 ["--max-conns", "x"], ["--bogus"], ["--via-insecure"],
                 ["--via", "https://proxy:443", "--via-cacert", "/nonexistent/ca.pem"]):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "hopcat", "serve", "127.0.0.1:0", *args],
                                capture_output=True, timeout=30, env=clean_env())  # fmt: skip
        assert result.returncode == 64, (args, result.stderr)
        assert result.stderr.startswith(b"hopcat: "), result.stderr
        assert b"nopassword" not in result.stderr


def test_address_in_use_exit_69(serve: Serve) -> None:
    server = serve()
    result = subprocess.run([sys.executable, "-m", "hopcat", "serve", server.hostport],
                            capture_output=True, timeout=30, env=clean_env())  # fmt: skip
    assert result.returncode == 69
    assert (
        result.stderr.decode() == f"hopcat: listen on {server.hostport}: address already in use\n"
    )


def test_ready_fd_reports_the_bound_address(need: Callable[..., str]) -> None:
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hopcat", "serve", "127.0.0.1:0", "--ready-fd", str(write_end)],
        pass_fds=(write_end,), stderr=subprocess.DEVNULL, env=clean_env(),
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            address = ready.read().decode().strip()  # EOF once written: no polling needed
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_help(need: Callable[..., str]) -> None:
    result = subprocess.run([sys.executable, "-m", "hopcat", "serve", "--help"],
                            capture_output=True, timeout=30, env=clean_env())  # fmt: skip
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in ("--auth", "--auth-file", "--allow-open", "--allow", "--deny", "--via",
                   "--max-conns", "--handshake-timeout", "--idle-timeout", "--log-format",
                   "--ready-fd", "--ready-file", "--grace", "--auth-scheme",
                   "--nonce-lifetime"):  # fmt: skip
        assert option in text, option
    assert text.startswith("usage: hopcat serve")


# --------------------------------------------------------------------------- the relay


@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_backpressure_and_both_half_closes(serve: Serve, source_server: Callable[..., peers.SourceServer],
                                           digest_server: peers.DigestServer, relay: str) -> None:  # fmt: skip
    """A client that does not read for a while (the pipe or buffer fills, reading the target
    stops), a target that half-closes first while the client keeps uploading, and a client that
    half-closes first: every byte arrives, each way, in splice and in copy mode."""
    server = serve(*(["--no-splice"] if relay == "copy" else []))
    down = pattern(32 << 20, 11)
    up = pattern(3 << 20, 12)
    source = source_server(down, half_close_only=True)  # sends, SHUT_WR, reads our upload to EOF
    with connect(server) as sock:
        assert socks5_connect(sock, source.host, source.port) == 0
        time.sleep(0.5)  # not reading: the server must stop reading the target, not buffer 32 MiB
        received = bytearray()
        view = memoryview(up)
        shut = False
        while True:  # upload after the target's FIN too: the other direction stays open
            if view:
                view = view[sock.send(view[:65536]) :]
            elif not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        while view:
            view = view[sock.send(view) :]
        if not shut:  # once only: a second shutdown on a closed connection is ENOTCONN
            sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) == b""
    assert sha256(bytes(received)) == sha256(down)
    assert source.received_sha256 == sha256(up)
    line = server.wait_log("result=ok")
    assert f"up={len(up)} down={len(down)} " in line
    half_close = run_hopcat("-x", server.url("socks5"), digest_server.host, str(digest_server.port),
                            input=up)  # fmt: skip
    assert half_close.stdout == digest_server.answer_for(up), half_close.stderr


def test_reset_by_the_target_is_passed_on(serve: Serve) -> None:
    """A target that resets mid-stream: the client sees a reset too, not a clean end."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def target() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"partial answer")
        conn.recv(1)  # wait for the client's byte, then abort with RST
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    server = serve()
    try:
        with connect(server) as sock:
            assert socks5_connect(sock, "127.0.0.1", port) == 0
            assert recv_exact(sock, 14) == b"partial answer"
            sock.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                while sock.recv(100):
                    pass
    finally:
        thread.join(10)
        listener.close()
    assert 'result=reset reason="target: connection reset by peer"' in server.wait_log(
        "result=reset"
    )
