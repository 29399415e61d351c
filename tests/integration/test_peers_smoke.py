"""The fixtures work: each target and daemon exercised with real peer clients (not hopcat).

curl, nc.openbsd, ncat, connect-proxy, ssh and git go through every proxy fixture to the Python
targets. These tests are also the executable record of PEERS.md: half-close passes through Dante
and ``ssh -D``; through microsocks, tinyproxy and ncat's HTTP proxy the clients keep stdin open
until the answer is in.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest

TIMEOUT_S = 30
ENV = peers.peer_env()


def run(argv: list[str], *, input: bytes = b"", env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    return subprocess.run(
        argv, input=input, capture_output=True, timeout=TIMEOUT_S, env=env or ENV, cwd=cwd
    )


def converse(argv: list[str], send: bytes, expect_len: int, tmp_path: Path) -> bytes:
    """Run ``argv``, write ``send``, keep stdin open until ``expect_len`` bytes came out, then EOF.

    This is how to talk through proxies that tear the tunnel down on a client's half-close.
    Returns everything the program wrote to stdout.
    """
    errpath = tmp_path / f"stderr-{time.monotonic_ns()}"
    with open(errpath, "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=ENV
        )
    out = bytearray()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(send)
        proc.stdin.flush()
        deadline = time.monotonic() + TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while len(out) < expect_len:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                out += data
        proc.stdin.close()
        # Whatever follows our EOF (e.g. the rest of an echo) is read until the program exits.
        out += proc.stdout.read()
        proc.wait(TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    assert len(out) >= expect_len, (
        f"{argv}: got {bytes(out)!r}; stderr: {errpath.read_text(errors='replace')}"
    )
    return bytes(out)


def curl(need: Callable[..., str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return run([need("curl"), "-q", "-sS", "--max-time", "20", *args])


# --------------------------------------------------------------------------- targets alone


@pytest.mark.parametrize("host", [peers.LOOPBACK_V4, peers.LOOPBACK_V6])
def test_digest_server(host: str, target_factory: Callable[..., peers.DigestServer]) -> None:
    srv = target_factory(peers.DigestServer, host)
    data = os.urandom(300_000)
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer == peers.DigestServer.answer_for(data)
    assert (srv.received_len, srv.received_sha256) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("half_close_only", [False, True])
def test_source_server(
    half_close_only: bool, source_server: Callable[..., peers.SourceServer]
) -> None:
    data, upload = os.urandom(1_000_000), os.urandom(500_000)
    srv = source_server(data, half_close_only=half_close_only)
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S) as s:
        if half_close_only:
            s.sendall(upload)  # the server reads while it sends: no deadlock either way
            s.shutdown(socket.SHUT_WR)
        got = b"".join(iter(lambda: s.recv(65536), b""))
    assert got == data
    rec = srv.last
    assert rec.error is None and rec.sent_len == len(data)
    if half_close_only:
        assert rec.received_sha256 == hashlib.sha256(upload).hexdigest()


@pytest.mark.parametrize("host", [peers.LOOPBACK_V4, peers.LOOPBACK_V6])
def test_banner_server(host: str, target_factory: Callable[..., peers.BannerServer]) -> None:
    srv = target_factory(peers.BannerServer, b"SSH-2.0-Hi\r\n", host)
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)
        got = b"".join(iter(lambda: s.recv(65536), b""))
    assert got == b"SSH-2.0-Hi\r\nping\n"
    assert srv.received_len == 5


@pytest.mark.parametrize("host", [peers.LOOPBACK_V4, peers.LOOPBACK_V6])
def test_framed_echo(host: str, target_factory: Callable[..., peers.FramedEcho]) -> None:
    srv = target_factory(peers.FramedEcho, host)
    payloads = [b"", b"x", os.urandom(200_000)]
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT_S) as s:
        for p in payloads:
            assert peers.framed_roundtrip(s, p) == peers.frame_reply(p)
    rec = srv.last
    assert rec.error is None
    assert rec.frames == [(len(p), hashlib.sha256(p).hexdigest()) for p in payloads]


def test_http_target(http_target: peers.HttpTarget) -> None:
    with socket.create_connection((http_target.host, http_target.port), timeout=TIMEOUT_S) as s:
        s.sendall(b"GET /x HTTP/1.0\r\n\r\n")
        got = b"".join(iter(lambda: s.recv(65536), b""))
    assert got.startswith(b"HTTP/1.0 200") and got.endswith(http_target.body)
    assert http_target.paths == ["/x"]


def test_peer_env_drops_proxy_variables() -> None:
    env = peers.peer_env({"http_proxy": "x", "HTTPS_PROXY": "x", "ALL_PROXY": "x", "no_proxy": "x",
                          "SOCKS5_SERVER": "x", "CONNECT_PASSWORD": "x", "PATH": "/bin"})  # fmt: skip
    assert env == {"PATH": "/bin"}


# --------------------------------------------------------------------------- Dante


@pytest.mark.peer("danted")
def test_danted_socks5_curl(
    danted: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    assert danted.url.startswith("socks5://127.0.0.1:")
    res = curl(need, "--socks5-hostname", danted.hostport, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body


@pytest.mark.peer("danted")
def test_danted_socks4_curl(
    danted: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-x", danted.url_as("socks4"), http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body


@pytest.mark.peer("danted")
def test_danted_passes_half_close(
    danted: peers.Daemon, digest_server: peers.DigestServer, need: Callable[..., str]
) -> None:
    data = os.urandom(100_000)
    res = run([need("nc.openbsd"), "-N", "-X", "5", "-x", danted.hostport,
               digest_server.host, str(digest_server.port)], input=data)  # fmt: skip
    assert res.stdout == peers.DigestServer.answer_for(data), res.stderr
    assert digest_server.received_len == len(data)


@pytest.mark.peer("danted")
def test_danted_socks4_ncat_banner(
    danted: peers.Daemon,
    banner_server: peers.BannerServer,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    out = converse([need("ncat"), "--proxy", danted.hostport, "--proxy-type", "socks4",
                    banner_server.host, str(banner_server.port)],
                   b"ping\n", len(banner_server.banner) + 5, tmp_path)  # fmt: skip
    assert out == banner_server.banner + b"ping\n"


@pytest.mark.peer("danted")
def test_danted_username_auth(
    danted_auth: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    assert (
        danted_auth.url
        == f"socks5://{peers.PEER_USER}:{peers.PEER_PASSWORD}@{danted_auth.hostport}"
    )
    res = curl(need, "-x", danted_auth.url.replace("socks5://", "socks5h://"), http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    wrong = curl(
        need, "-x", f"socks5h://{peers.PEER_USER}:wrong@{danted_auth.hostport}", http_target.url
    )
    none = curl(need, "-x", danted_auth.url_as("socks5h", auth=False), http_target.url)
    assert wrong.returncode != 0 and none.returncode != 0
    assert http_target.paths == ["/"]


@pytest.mark.peer("danted")
def test_danted_username_auth_ncat(
    danted_auth: peers.Daemon,
    banner_server: peers.BannerServer,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    out = converse([need("ncat"), "--proxy", danted_auth.hostport, "--proxy-type", "socks5",
                    "--proxy-auth", f"{peers.PEER_USER}:{peers.PEER_PASSWORD}",
                    banner_server.host, str(banner_server.port)],
                   b"ping\n", len(banner_server.banner) + 5, tmp_path)  # fmt: skip
    assert out == banner_server.banner + b"ping\n"


@pytest.mark.peer("danted")
def test_danted_v6(
    danted_v6: peers.Daemon, http_target_v6: peers.HttpTarget, http_target: peers.HttpTarget,
    need: Callable[..., str],
) -> None:  # fmt: skip
    assert danted_v6.url.startswith("socks5://[::1]:")
    for target in (http_target_v6, http_target):
        res = curl(need, "-x", danted_v6.url_as("socks5h"), target.url)
        assert res.returncode == 0, res.stderr
        assert res.stdout == target.body


@pytest.mark.peer("danted")
def test_danted_v4_reaches_v6_target(
    danted: peers.Daemon, digest_server_v6: peers.DigestServer, need: Callable[..., str]
) -> None:
    res = run([need("nc.openbsd"), "-N", "-X", "5", "-x", danted.hostport, "::1",
               str(digest_server_v6.port)], input=b"six")  # fmt: skip
    assert res.stdout == peers.DigestServer.answer_for(b"six"), res.stderr


# --------------------------------------------------------------------------- microsocks


@pytest.mark.peer("microsocks")
def test_microsocks_curl(
    microsocks: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "--socks5-hostname", microsocks.hostport, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    assert "connected to" in microsocks.log()


@pytest.mark.peer("microsocks")
def test_microsocks_nc_banner(
    microsocks: peers.Daemon,
    banner_server: peers.BannerServer,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    out = converse([need("nc.openbsd"), "-N", "-X", "5", "-x", microsocks.hostport,
                    banner_server.host, str(banner_server.port)],
                   b"ping\n", len(banner_server.banner) + 5, tmp_path)  # fmt: skip
    assert out.startswith(banner_server.banner + b"ping\n")


@pytest.mark.peer("microsocks")
def test_microsocks_framed(
    microsocks: peers.Daemon,
    framed_echo: peers.FramedEcho,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    payload = os.urandom(50_000)
    out = converse([need("connect-proxy"), "-S", microsocks.hostport,
                    framed_echo.host, str(framed_echo.port)],
                   peers.frame(payload), peers.FRAME_REPLY, tmp_path)  # fmt: skip
    assert out[: peers.FRAME_REPLY] == peers.frame_reply(payload)
    assert framed_echo.last.frames == [(len(payload), hashlib.sha256(payload).hexdigest())]


@pytest.mark.peer("microsocks")
def test_microsocks_auth(
    microsocks_auth: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-x", microsocks_auth.url_as("socks5h"), http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    none = curl(need, "-x", microsocks_auth.url_as("socks5h", auth=False), http_target.url)
    assert none.returncode != 0


# --------------------------------------------------------------------------- tinyproxy


@pytest.mark.peer("tinyproxy")
def test_tinyproxy_curl(
    tinyproxy: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-p", "-x", tinyproxy.url, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    assert "CONNECT 127.0.0.1:" in tinyproxy.log()


@pytest.mark.peer("tinyproxy")
def test_tinyproxy_ncat_banner(
    tinyproxy: peers.Daemon,
    banner_server: peers.BannerServer,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    out = converse([need("ncat"), "--proxy", tinyproxy.hostport, "--proxy-type", "http",
                    banner_server.host, str(banner_server.port)],
                   b"ping\n", len(banner_server.banner) + 5, tmp_path)  # fmt: skip
    assert out.startswith(banner_server.banner + b"ping\n")


@pytest.mark.peer("tinyproxy")
def test_tinyproxy_auth(
    tinyproxy_auth: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-p", "-x", tinyproxy_auth.url, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    none = curl(need, "-p", "-x", tinyproxy_auth.url_as("http", auth=False), http_target.url)
    assert none.returncode != 0 and b"407" in none.stderr


# --------------------------------------------------------------------------- ncat --proxy-type http


@pytest.mark.peer("ncat")
def test_ncat_http_curl(
    ncat_http: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-p", "-x", ncat_http.url, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body


@pytest.mark.peer("ncat")
def test_ncat_http_nc_banner(
    ncat_http: peers.Daemon,
    banner_server: peers.BannerServer,
    need: Callable[..., str],
    tmp_path: Path,
) -> None:
    out = converse([need("nc.openbsd"), "-N", "-X", "connect", "-x", ncat_http.hostport,
                    banner_server.host, str(banner_server.port)],
                   b"ping\n", len(banner_server.banner) + 5, tmp_path)  # fmt: skip
    assert out.startswith(banner_server.banner + b"ping\n")


@pytest.mark.peer("ncat")
def test_ncat_http_auth(
    ncat_http_auth: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    res = curl(need, "-p", "-x", ncat_http_auth.url, http_target.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target.body
    none = curl(need, "-p", "-x", ncat_http_auth.url_as("http", auth=False), http_target.url)
    assert none.returncode != 0 and b"407" in none.stderr


# --------------------------------------------------------------------------- IPv6 listeners


@pytest.mark.parametrize("fixture", ["microsocks_v6", "tinyproxy_v6", "ncat_http_v6"])
def test_v6_proxies_curl(
    fixture: str, request: pytest.FixtureRequest, http_target_v6: peers.HttpTarget,
    need: Callable[..., str],
) -> None:  # fmt: skip
    proxy: peers.Daemon = request.getfixturevalue(fixture)
    assert proxy.host == "::1" and proxy.hostport.startswith("[::1]:")
    scheme_args = ["-p"] if proxy.scheme == "http" else []
    url = proxy.url if proxy.scheme == "http" else proxy.url_as("socks5h")
    res = curl(need, *scheme_args, "-x", url, http_target_v6.url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == http_target_v6.body


# --------------------------------------------------------------------------- sshd, ssh -D, git


@pytest.mark.peer("sshd")
def test_sshd_echo(sshd: peers.SshServer) -> None:
    res = run([*sshd.ssh_argv(), "echo", "ok"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ok\n"


@pytest.mark.peer("sshd")
def test_sshd_echo_v6(sshd: peers.SshServer) -> None:
    if not sshd.ipv6:
        pytest.skip("IPv6 loopback (::1) not available")
    res = run([*sshd.ssh_argv(host="::1"), "echo", "ok"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ok\n"


@pytest.mark.peer("sshd")
def test_sshd_via_proxycommand_through_ssh_socks(
    sshd: peers.SshServer, ssh_socks: peers.Daemon, need: Callable[..., str]
) -> None:
    proxy_command = f"{need('nc.openbsd')} -X 5 -x {ssh_socks.hostport} %h %p"
    res = run([*sshd.ssh_argv("-o", f"ProxyCommand={proxy_command}"), "echo", "ok"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ok\n"


@pytest.mark.peer("sshd")
def test_sshd_via_proxycommand_through_danted(
    sshd: peers.SshServer, danted: peers.Daemon, need: Callable[..., str]
) -> None:
    proxy_command = f"{need('nc.openbsd')} -X 5 -x {danted.hostport} %h %p"
    res = run([*sshd.ssh_argv("-o", f"ProxyCommand={proxy_command}"), "echo", "ok"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ok\n"


@pytest.mark.peer("sshd")
def test_git_clone_over_ssh(
    sshd: peers.SshServer, tmp_path: Path, need: Callable[..., str]
) -> None:
    git = need("git")
    repo = tmp_path / "src"
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    assert run([git, "init", "-q", str(repo)]).returncode == 0
    res = run([git, *ident, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "hello"])
    assert res.returncode == 0, res.stderr
    env = {**ENV, "GIT_SSH_COMMAND": sshd.git_ssh_command()}
    res = run([git, "clone", "-q", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{repo}",
               str(tmp_path / "clone")], env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = run([git, "-C", str(tmp_path / "clone"), "log", "--format=%s"])
    assert log.stdout == b"hello\n"


@pytest.mark.peer("ssh")
def test_ssh_socks_curl(
    ssh_socks: peers.Daemon, http_target: peers.HttpTarget, need: Callable[..., str]
) -> None:
    for url in (
        ssh_socks.url_as("socks5h"),
        ssh_socks.url_as("socks4"),
        ssh_socks.url_as("socks4a"),
    ):
        res = curl(need, "-x", url, http_target.url.replace("127.0.0.1", "localhost"))
        assert res.returncode == 0, (url, res.stderr)
        assert res.stdout == http_target.body


@pytest.mark.peer("ssh")
def test_ssh_socks_passes_half_close(
    ssh_socks: peers.Daemon, digest_server: peers.DigestServer, need: Callable[..., str]
) -> None:
    data = os.urandom(100_000)
    res = run([need("nc.openbsd"), "-N", "-X", "5", "-x", ssh_socks.hostport,
               digest_server.host, str(digest_server.port)], input=data)  # fmt: skip
    assert res.stdout == peers.DigestServer.answer_for(data), res.stderr
