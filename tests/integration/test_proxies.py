"""hopcat's proxy client against real proxies on loopback, and against a hostile one.

Fixture choice follows peers.py: Dante and ``ssh -D`` pass a client's half-close on, so a
DigestServer proves stdin EOF travels; microsocks, tinyproxy and ncat's HTTP proxy tear the
tunnel down at a client FIN, so through them uploads are framed (FramedEcho) and stdin stays open
until the answer is in, as ssh does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time

import peers
import pytest

from support import HOPCAT, clean_env, closed_port, pattern, run_hopcat, sha256

BULK = 8 << 20


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*HOPCAT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env or clean_env(),
    )


def framed_upload(proxy_args: list[str], target: peers.FramedEcho, size: int = BULK,
                  env: dict[str, str] | None = None) -> None:
    """Upload through a proxy that drops the tunnel at a FIN: answer first, then close stdin."""
    data = pattern(size, 21)
    proc = _popen(*proxy_args, target.host, str(target.port), env=env)
    assert proc.stdin and proc.stdout and proc.stderr
    writer = threading.Thread(target=proc.stdin.write, args=(peers.frame(data),), daemon=True)
    writer.start()
    answer = proc.stdout.read(peers.FRAME_REPLY)
    writer.join(30)
    proc.stdin.close()
    rest = proc.stdout.read()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(30) == 0, err
    assert answer == peers.frame_reply(data), err
    assert rest == b""


def download(proxy_args: list[str], source: peers.SourceServer, data: bytes,
             env: dict[str, str] | None = None) -> bytes:
    """The target sends and closes; stdin stays open; hopcat must exit with every byte out."""
    proc = _popen(*proxy_args, source.host, str(source.port), env=env)
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        out = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(30) == 0, err
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    assert sha256(out) == sha256(data), err
    return out


def half_close_roundtrip(proxy_args: list[str], digest: peers.DigestServer, size: int = BULK) -> None:
    data = pattern(size, 22)
    result = run_hopcat(*proxy_args, digest.host, str(digest.port), input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (sha256(data) + "\n").encode()


# -- Dante: SOCKS4 and SOCKS5, with and without username auth ---------------------------------

@pytest.mark.parametrize("scheme", ["socks4", "socks5", "socks5h"])
def test_dante_half_close_and_download(danted: peers.Daemon, digest_server: peers.DigestServer,
                                       source_server, scheme: str) -> None:  # type: ignore[no-untyped-def]
    half_close_roundtrip(["-x", danted.url_as(scheme)], digest_server)
    data = pattern(BULK, 23)
    download(["-x", danted.url_as(scheme)], source_server(data), data)


def test_dante_username_auth(danted_auth: peers.Daemon, digest_server: peers.DigestServer) -> None:
    half_close_roundtrip(["-x", danted_auth.url], digest_server)


def test_dante_wrong_password_exit_77(danted_auth: peers.Daemon, digest_server: peers.DigestServer) -> None:
    url = danted_auth.url_as("socks5", auth=False).replace("://", f"://{peers.PEER_USER}:wrong@")
    result = run_hopcat("-x", url, digest_server.host, str(digest_server.port))
    assert result.returncode == 77, result.stderr
    err = result.stderr.decode()
    assert err.startswith(f"hopcat: proxy socks5://{peers.PEER_USER}:***@{danted_auth.hostport} (hop 1/1): ")
    assert "wrong" not in err and err.count("\n") == 1


def test_password_from_environment_not_argv(danted_auth: peers.Daemon,
                                             digest_server: peers.DigestServer) -> None:
    env = clean_env(HOPCAT_PROXY_PASSWORD=peers.PEER_PASSWORD)
    data = b"secret-free argv"
    result = subprocess.run(
        [*HOPCAT, "-X", "5", "-x", danted_auth.hostport, "-P", peers.PEER_USER,
         digest_server.host, str(digest_server.port)],
        input=data, capture_output=True, timeout=30, env=env, stdin=None,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (sha256(data) + "\n").encode()


def test_dante_refusal_names_the_hop_exit_81(danted: peers.Daemon) -> None:
    # The fixture's rules allow only 127.0.0.0/8 destinations: Dante refuses without connecting.
    result = run_hopcat("-x", danted.url_as("socks5"), "192.0.2.1", "9")
    assert result.returncode == 81, result.stderr
    err = result.stderr.decode()
    assert err.startswith(f"hopcat: proxy socks5://{danted.hostport} (hop 1/1): ")
    assert err.rstrip().endswith("for 192.0.2.1:9") and err.count("\n") == 1


# -- ssh -D: SOCKS4a and SOCKS5 -----------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["socks4a", "socks5h"])
def test_ssh_dynamic_forward(ssh_socks: peers.Daemon, digest_server: peers.DigestServer,
                             scheme: str) -> None:
    # "localhost" makes socks4a/socks5h carry a name: ssh resolves it on the far side.
    data = pattern(BULK, 24)
    result = run_hopcat("-x", ssh_socks.url_as(scheme), "localhost", str(digest_server.port), input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (sha256(data) + "\n").encode()


# -- microsocks: SOCKS5 with and without auth (tears down at FIN) -----------------------------

def test_microsocks(microsocks: peers.Daemon, framed_echo: peers.FramedEcho, source_server) -> None:  # type: ignore[no-untyped-def]
    framed_upload(["-x", microsocks.url_as("socks5h")], framed_echo)
    data = pattern(BULK, 25)
    download(["-x", microsocks.url_as("socks5h")], source_server(data), data)


def test_microsocks_auth(microsocks_auth: peers.Daemon, framed_echo: peers.FramedEcho) -> None:
    framed_upload(["-x", microsocks_auth.url_as("socks5h")], framed_echo)


def test_microsocks_auth_missing_exit_77(microsocks_auth: peers.Daemon,
                                         framed_echo: peers.FramedEcho) -> None:
    result = run_hopcat("-x", microsocks_auth.url_as("socks5", auth=False), framed_echo.host,
                        str(framed_echo.port))
    assert result.returncode == 77, result.stderr
    assert b"authentication" in result.stderr and result.stderr.count(b"\n") == 1


# -- HTTP CONNECT: tinyproxy and ncat ------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tinyproxy", "tinyproxy_auth", "ncat_http", "ncat_http_auth"])
def test_http_connect_proxies(fixture: str, request: pytest.FixtureRequest,
                              framed_echo: peers.FramedEcho, source_server) -> None:  # type: ignore[no-untyped-def]
    proxy: peers.Daemon = request.getfixturevalue(fixture)
    framed_upload(["-x", proxy.url], framed_echo)
    data = pattern(BULK, 26)
    download(["-x", proxy.url], source_server(data), data)


def test_http_proxy_auth_required_exit_77(tinyproxy_auth: peers.Daemon,
                                          framed_echo: peers.FramedEcho) -> None:
    result = run_hopcat("-x", tinyproxy_auth.url_as("http", auth=False), framed_echo.host,
                        str(framed_echo.port))
    assert result.returncode == 77, result.stderr
    assert b"407" in result.stderr and result.stderr.count(b"\n") == 1


def test_ncat_style_flags(ncat_http_auth: peers.Daemon, framed_echo: peers.FramedEcho) -> None:
    framed_upload(
        ["--proxy", ncat_http_auth.hostport, "--proxy-type", "http", "--proxy-auth",
         f"{peers.PEER_USER}:{peers.PEER_PASSWORD}"],
        framed_echo,
    )


def test_connect_proxy_style_flags(microsocks: peers.Daemon, tinyproxy: peers.Daemon,
                                   framed_echo: peers.FramedEcho) -> None:
    framed_upload(["-S", microsocks.hostport], framed_echo, size=1 << 20)
    framed_upload(["-H", tinyproxy.hostport], framed_echo, size=1 << 20)


def test_all_proxy_environment_and_no_proxy(microsocks: peers.Daemon,
                                            framed_echo: peers.FramedEcho) -> None:
    env = clean_env(ALL_PROXY=microsocks.url_as("socks5h"))
    proc = subprocess.run(
        [*HOPCAT, "-v", "--no-shutdown", "-q", "0.5", framed_echo.host, str(framed_echo.port)],
        input=peers.frame(b"abc"), capture_output=True, timeout=30, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == peers.frame_reply(b"abc")
    assert b"(from ALL_PROXY)" in proc.stderr
    env["NO_PROXY"] = "127.0.0.0/8"
    proc = subprocess.run(
        [*HOPCAT, "-v", "--no-shutdown", "-q", "0.5", framed_echo.host, str(framed_echo.port)],
        input=peers.frame(b"abc"), capture_output=True, timeout=30, env=env,
    )
    assert proc.returncode == 0 and b"NO_PROXY exempts 127.0.0.1 from ALL_PROXY" in proc.stderr


# -- chains, IPv6, banners ---------------------------------------------------------------------

def test_two_hop_chain_dante_then_ssh_socks(danted: peers.Daemon, ssh_socks: peers.Daemon,
                                            digest_server: peers.DigestServer) -> None:
    half_close_roundtrip(["-x", danted.url_as("socks5"), "-x", ssh_socks.url_as("socks5h")],
                         digest_server)


def test_three_hop_chain_mixed_protocols(danted: peers.Daemon, tinyproxy: peers.Daemon,
                                         microsocks: peers.Daemon, banner_server: peers.BannerServer) -> None:
    args = ["-v", "-x", danted.url_as("socks5"), "-x", tinyproxy.url, "-x", microsocks.url_as("socks5h")]
    proc = _popen(*args, banner_server.host, str(banner_server.port))
    assert proc.stdin and proc.stdout and proc.stderr
    banner = proc.stdout.read(len(b"SSH-2.0-Test\r\n"))
    payload = pattern(1 << 20, 27)
    writer = threading.Thread(target=proc.stdin.write, args=(payload,), daemon=True)
    writer.start()
    echoed = bytearray()
    while len(echoed) < len(payload):
        chunk = proc.stdout.read1(1 << 16)  # type: ignore[attr-defined]
        assert chunk, proc.stderr.read()
        echoed += chunk
    writer.join(30)
    proc.stdin.close()
    proc.wait(30)
    err = proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    assert banner == b"SSH-2.0-Test\r\n"
    assert sha256(bytes(echoed)) == sha256(payload)
    for hop in ("hop 1/3", "hop 2/3", "hop 3/3"):
        assert f"{hop}: CONNECT" in err, err


def test_banner_in_same_segment_as_reply_is_kept(ssh_socks: peers.Daemon,
                                                 banner_server: peers.BannerServer) -> None:
    proc = _popen("-x", ssh_socks.url_as("socks5h"), banner_server.host, str(banner_server.port))
    out, err = proc.communicate(b"", timeout=30)
    assert proc.returncode == 0, err
    assert out == b"SSH-2.0-Test\r\n"


def test_ipv6_proxy_and_target(danted_v6: peers.Daemon, digest_server_v6: peers.DigestServer) -> None:
    half_close_roundtrip(["-x", danted_v6.url_as("socks5")], digest_server_v6, size=1 << 20)


# -- errors: unreachable proxy, bad hostnames, a hostile proxy ----------------------------------

def test_unreachable_proxy_exit_80() -> None:
    with closed_port() as port:
        result = run_hopcat("-x", f"socks5h://u:pw@127.0.0.1:{port}", "example.test", "22")
    assert result.returncode == 80
    assert result.stderr.decode() == (
        f"hopcat: proxy socks5h://u:***@127.0.0.1:{port} (hop 1/1): unreachable: "
        f"connect to 127.0.0.1:{port}: connection refused\n"
    )


class HostileProxy:
    """Accepts one connection, reads what the client sends first, then misbehaves."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.first_bytes = b""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                self.first_bytes = conn.recv(4096)
                b = self.behaviour
                if b == "close":
                    return
                if b == "garbage":
                    conn.sendall(os.urandom(64))
                elif b == "wrong-version":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                elif b == "huge-head":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n")
                elif b == "socks5-half-reply":
                    conn.sendall(b"\x05\x00")
                    conn.recv(4096)
                    conn.sendall(b"\x05\x00\x00")
                    return
                elif b == "stall":
                    time.sleep(5)
                    return
                time.sleep(1)
            except OSError:
                pass

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux).
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(15)


@pytest.mark.parametrize(
    ("scheme", "behaviour", "code", "words"),
    [
        ("socks5", "close", 76, "closed the connection during the handshake"),
        ("socks5", "garbage", 76, ""),
        ("socks5", "wrong-version", 76, "HTTP proxy"),
        ("socks5", "socks5-half-reply", 76, "closed the connection during the handshake"),
        ("socks4", "close", 76, "closed the connection during the handshake"),
        ("http", "close", 76, "closed the connection during the handshake"),
        ("http", "garbage", 76, ""),
        ("http", "huge-head", 76, ""),
        ("socks5", "stall", 75, "connect timeout"),
        ("http", "stall", 75, "connect timeout"),
    ],
)
def test_hostile_proxy(scheme: str, behaviour: str, code: int, words: str) -> None:
    proxy = HostileProxy(behaviour)
    try:
        started = time.monotonic()
        result = run_hopcat("--connect-timeout", "1.5", "-x", f"{scheme}://127.0.0.1:{proxy.port}",
                            "127.0.0.1", "22", timeout=20)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert err.startswith(f"hopcat: proxy {scheme}://127.0.0.1:{proxy.port} (hop 1/1): ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert elapsed < 10


@pytest.mark.parametrize("host", ["evil\r\nX-Injected: 1", "a\x01b", "x" * 256])
def test_bad_target_names_refused_before_any_byte(host: str) -> None:
    proxy = HostileProxy("close")
    try:
        result = run_hopcat("-x", f"http://127.0.0.1:{proxy.port}", host, "22", timeout=20)
    finally:
        proxy.close()
    assert result.returncode == 64, result.stderr
    assert proxy.first_bytes == b""


# -- wrong scheme, wrong credentials, copied command lines (issue 8 rules 5 and 7) ----------------

@pytest.mark.parametrize(
    ("fixture", "scheme", "hint"),
    [
        ("tinyproxy", "socks5h", "this looks like an HTTP proxy: use http://"),
        ("tinyproxy", "https", "this looks like a plain HTTP proxy: use http://"),
        ("ncat_http", "socks4a", "this looks like an HTTP proxy: use http://"),
        ("danted", "http", "this looks like a SOCKS5 proxy: use socks5h://"),
        ("danted", "https", "this looks like a SOCKS5 proxy: use socks5h://"),
        ("microsocks", "socks4", "this looks like a SOCKS5 proxy: use socks5h://"),
        ("microsocks", "http", "this looks like a SOCKS5 proxy: use socks5h://"),
    ],
)
def test_wrong_scheme_fails_fast_with_a_hint(fixture: str, scheme: str, hint: str,
                                             request: pytest.FixtureRequest) -> None:
    proxy: peers.Daemon = request.getfixturevalue(fixture)
    started = time.monotonic()
    result = run_hopcat("-x", f"{scheme}://{proxy.hostport}", "127.0.0.1", "22", timeout=30)
    elapsed = time.monotonic() - started
    err = result.stderr.decode()
    assert result.returncode == 76, err
    assert hint in err and err.count("\n") == 1, err
    assert elapsed < 10, "must not wait for the 30 s connect timeout"


def test_tinyproxy_401_for_wrong_credentials_is_77(tinyproxy_auth: peers.Daemon,
                                                   framed_echo: peers.FramedEcho) -> None:
    result = run_hopcat("-x", f"http://{peers.PEER_USER}:wrong@{tinyproxy_auth.hostport}",
                        framed_echo.host, str(framed_echo.port))
    err = result.stderr.decode()
    assert result.returncode == 77, err
    assert "HTTP 401" in err and "credentials rejected" in err and "wrong" not in err


def test_connect_proxy_environment_users(tinyproxy_auth: peers.Daemon, microsocks_auth: peers.Daemon,
                                         framed_echo: peers.FramedEcho) -> None:
    env = clean_env(HTTP_PROXY_USER=peers.PEER_USER, HTTP_PROXY_PASSWORD=peers.PEER_PASSWORD)
    framed_upload(["-H", tinyproxy_auth.hostport], framed_echo, size=1 << 16, env=env)
    env = clean_env(SOCKS5_USER=peers.PEER_USER, SOCKS5_PASSWORD=peers.PEER_PASSWORD)
    framed_upload(["-S", microsocks_auth.hostport], framed_echo, size=1 << 16, env=env)
    env = clean_env(CONNECT_USER=peers.PEER_USER, CONNECT_PASSWORD=peers.PEER_PASSWORD)
    framed_upload(["-S", microsocks_auth.hostport], framed_echo, size=1 << 16, env=env)


def test_connect_proxy_debug_flag_keeps_stdin(microsocks: peers.Daemon,
                                              framed_echo: peers.FramedEcho) -> None:
    # "connect-proxy -d -S proxy %h %p" copied into a ProxyCommand: -d is its debug output, so
    # stdin must still be read (nc's -d would starve ssh).
    framed_upload(["-d", "-S", microsocks.hostport], framed_echo, size=1 << 16)
