"""``hopcat serve`` offering HTTP Digest (RFC 7616) to real clients: hopcat's own, ncat (which
speaks only MD5 and takes the first Digest challenge) and curl ``--proxy-digest``, each through to
a target that speaks first (an HTTP server for curl). ``--auth-scheme digest`` makes a success prove Digest was used.
The stale-nonce flow, which needs a clock that jumps, is in tests/scenario/test_server_handler.py.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

import peers
import pytest
from test_serve_support import ServeProcess

from support import clean_env, run_hopcat

Serve = Callable[..., ServeProcess]
USER, PASSWORD = "alice", "digest-s3cret:x"


def probe_407(server: ServeProcess) -> list[str]:
    """The Proxy-Authenticate values of the 407 for a request without credentials."""
    host, _, port = server.hostport.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = sock.recv(1)
            assert chunk, head
            head += chunk
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 407 Proxy Authentication Required"
    assert "Connection: close" in lines
    return [line.split(": ", 1)[1] for line in lines if line.startswith("Proxy-Authenticate: ")]


def assert_no_secrets(server: ServeProcess) -> None:
    log = server.log()
    assert PASSWORD not in log and "response=" not in log and "nonce=" not in log


def test_default_407_offers_digest_md5_sha256_then_basic(serve: Serve) -> None:
    values = probe_407(serve("--auth", f"{USER}:{PASSWORD}"))
    assert [value.split(",")[0] for value in values] == [
        'Digest realm="hopcat"', 'Digest realm="hopcat"', 'Basic realm="hopcat"'
    ]  # fmt: skip
    assert "algorithm=MD5" in values[0] and "algorithm=SHA-256" in values[1]
    assert all('qop="auth"' in value for value in values[:2])
    assert probe_407(serve("--auth", f"{USER}:{PASSWORD}", "--auth-scheme", "basic")) == [
        'Basic realm="hopcat"'
    ]


def test_hopcat_client_uses_digest(serve: Serve, banner_server: peers.BannerServer) -> None:
    server = serve("--auth", f"{USER}:{PASSWORD}", "--auth-scheme", "digest")
    result = run_hopcat("-v", "-x", f"http://{USER}:{PASSWORD}@{server.hostport}",
                        banner_server.host, str(banner_server.port), input=b"")  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout == banner_server.banner
    assert "answering with Digest" in stderr and "authenticated with Digest" in stderr, stderr
    assert "2 TCP connections" in stderr
    assert f"user={USER} " in server.wait_log("result=ok")
    wrong = run_hopcat("-x", f"http://{USER}:nope@{server.hostport}",
                       banner_server.host, str(banner_server.port), input=b"")  # fmt: skip
    assert wrong.returncode == 77, wrong.stderr
    assert b"407" in wrong.stderr and wrong.stderr.count(b"\n") == 1
    # The probes of both runs, then the wrong answer.
    assert "wrong user name or password" in server.wait_log("result=auth-failed", count=3)
    assert_no_secrets(server)


@pytest.mark.parametrize("schemes", ["digest", "digest,basic"])
def test_ncat_chooses_digest(serve: Serve, need: Callable[..., str],
                             banner_server: peers.BannerServer, schemes: str) -> None:  # fmt: skip
    server = serve("--auth", f"{USER}:{PASSWORD}", "--auth-scheme", schemes)

    def ncat(password: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [need("ncat"), "--proxy", server.hostport, "--proxy-type", "http",
             "--proxy-auth", f"{USER}:{password}", banner_server.host, str(banner_server.port)],
            input=b"", capture_output=True, timeout=30, env=clean_env(),
        )  # fmt: skip

    ok = ncat(PASSWORD)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == banner_server.banner
    assert f"user={USER} " in server.wait_log("result=ok")
    wrong = ncat("nope")
    assert wrong.returncode != 0 and b"407" in wrong.stderr
    # The probes of both runs, then the wrong answer.
    assert "wrong user name or password" in server.wait_log("result=auth-failed", count=3)
    assert_no_secrets(server)


def test_curl_proxy_digest(serve: Serve, need: Callable[..., str],
                           http_target: peers.HttpTarget) -> None:  # fmt: skip
    server = serve("--auth", f"{USER}:{PASSWORD}", "--auth-scheme", "digest")

    def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [need("curl"), "-sS", "--max-time", "20", "-p", "-x", f"http://{server.hostport}",
             *args, http_target.url],
            capture_output=True, timeout=30, env=clean_env(),
        )  # fmt: skip

    ok = curl("--proxy-digest", "-U", f"{USER}:{PASSWORD}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == http_target.body
    wrong = curl("--proxy-digest", "-U", f"{USER}:nope")
    assert wrong.returncode != 0
    basic = curl("--proxy-basic", "-U", f"{USER}:{PASSWORD}")  # Basic is not offered
    assert basic.returncode != 0
    # Each client's probe gets a 407 too: 1 (right), 2 (wrong), 1 (Basic sent up front).
    log = server.wait_log("result=auth-failed", count=4)
    assert log.count("result=ok") == 1
    assert_no_secrets(server)
