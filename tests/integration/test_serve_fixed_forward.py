"""``hopcat serve --forward LISTEN=HOST:PORT``: fixed forwards, for programs that cannot use a
proxy (a GUI SSH client, a database client), like ssh -L, connect-proxy -p, proxytunnel -a.

Each connection to a forward listener is tunneled, with no handshake, to its fixed target:
directly or through --via, under the same destination rules, limits and log line
(``proto=forward``) as a proxy request. Checked with real programs: ssh and git over ssh
through a forward via Dante to a test sshd, bytes both ways by SHA-256, a refusing target (the
client sees EOF), and the usage errors of bad --forward values.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from test_serve_support import IO_TIMEOUT_S, ServeProcess, recv_exact, serve_factory, wait_closed

from support import pattern, run_hopcat, sha256

Serve = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serve_factory(tmp_path)


def forward_connect(server: ServeProcess, index: int = 0) -> socket.socket:
    host, _, port = server.forwards[index].rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=IO_TIMEOUT_S)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_lines_and_data_both_ways(
    serve: Serve, banner_server: peers.BannerServer, workers: str
) -> None:
    """With --workers the supervisor announces the same lines once every worker listens."""
    target = banner_server.hostport
    server = serve(
        "--workers", workers, "--forward", f"0={target}", "--forward", f"127.0.0.1:0={target}"
    )
    lines = server.ready_path.read_text().splitlines()
    # The proxy listener's line first, unchanged; then one line per forward.
    assert lines[0] == server.hostport and len(lines) == 3
    for line, listen in zip(lines[1:], server.forwards, strict=True):
        assert line == f"forward {listen} {target}" and listen.startswith("127.0.0.1:")
    data = pattern(4 << 20, 7)
    with forward_connect(server, 1) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        received = recv_exact(sock, len(banner_server.banner) + len(data))
        sender.join(IO_TIMEOUT_S)
        sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) == b""
    assert received[: len(banner_server.banner)] == banner_server.banner
    assert sha256(received[len(banner_server.banner) :]) == sha256(data)
    log = server.wait_log("result=ok")
    line = next(line for line in log.splitlines() if "result=ok" in line)
    assert "proto=forward" in line and f"dest={target}" in line
    assert f"up={len(data)}" in line and f"down={len(banner_server.banner) + len(data)}" in line


def test_forwards_alone_drain_on_sigterm_and_time_out_idle(
    serve: Serve, banner_server: peers.BannerServer
) -> None:
    """With no LISTEN operand only the forwards listen; an open forward tunnel outlives SIGTERM
    (drain) and ends at --idle-timeout, as a proxy tunnel does."""
    server = serve("--forward", f"0={banner_server.hostport}", "--idle-timeout", "1",
                   "--grace", "20", listen=())  # fmt: skip
    assert server.addresses == [] and len(server.forwards) == 1
    assert "event=listen" in server.log() and "protocols=forward" in server.log()
    with forward_connect(server) as sock:
        assert recv_exact(sock, len(banner_server.banner)) == banner_server.banner
        server.send_signal(signal.SIGTERM)
        server.wait_log("event=shutdown")
        sock.sendall(b"still here")
        assert recv_exact(sock, 10) == b"still here"
        with pytest.raises(OSError):
            forward_connect(server).close()  # the listener is closed
        started = time.monotonic()
        assert wait_closed(sock) == b""  # reset or FIN once idle for 1 s
        assert 0.5 < time.monotonic() - started < 5
    assert server.proc.wait(IO_TIMEOUT_S) == 0
    assert "proto=forward" in server.wait_log("result=idle")


def test_refused_or_denied_target_ends_in_eof(serve: Serve) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    port = closed.getsockname()[1]
    try:
        server = serve("--forward", f"0=127.0.0.1:{port}", "--forward", "0=192.0.2.1:22",
                       "--deny", "192.0.2.0/24")  # fmt: skip
        for index, result in ((0, "refused"), (1, "denied")):
            with forward_connect(server, index) as sock:
                sock.sendall(b"SSH-2.0-client\r\n")  # a client that speaks first
                assert wait_closed(sock) == b""
            log = server.wait_log(f"result={result}")
            assert "proto=forward" in next(
                line for line in log.splitlines() if f"result={result}" in line
            )
    finally:
        closed.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2222", "expected LISTEN=HOST:PORT"),
        ("2222=db", "the target needs a port"),
        ("=db:5432", "expected LISTEN=HOST:PORT"),
        ("[::1]=db:5432", "the listen address needs a port"),
        ("2222=db:99999", "out of range"),
        ("2222=db:nosuchservice", "neither a number nor a known service name"),
        ("2222=d b:22", "space or control character"),
        ("2222=[db]:22", "brackets are only for IPv6"),
        ("0.0.0.0:2222=db:22", "a forward has no authentication"),
        ("tls://127.0.0.1:2222=db:22", "no scheme"),
    ],
)
def test_bad_forward_values_are_usage_errors(value: str, message: str) -> None:
    result = run_hopcat("serve", "--forward", value, "--auth", "u:p", timeout=IO_TIMEOUT_S)
    stderr = result.stderr.decode()
    assert result.returncode == 64 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("hopcat: ") and message in stderr, stderr


def ssh_options_through(sshd: peers.SshServer, listen: str) -> list[str]:
    """sshd's client options aimed at a forward listener: its port, and the host key filed
    under sshd's own address."""
    options = sshd.ssh_options()
    at = options.index("-p")
    del options[at : at + 2]
    return [*options, "-o", f"HostKeyAlias=[{sshd.host}]:{sshd.port}", "-p",
            listen.rpartition(":")[2]]  # fmt: skip


def test_ssh_and_git_through_a_forward_via_dante(
    serve: Serve, sshd: peers.SshServer, danted: peers.Daemon, peer_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    git = peers.require_program("git")
    server = serve("--via", danted.url, "--forward", f"0={sshd.host}:{sshd.port}")
    listen = server.forwards[0]
    ssh = ssh_options_through(sshd, listen)
    result = subprocess.run(
        [*ssh, f"{sshd.user}@127.0.0.1", "echo", "through-forward"], env=peer_env,
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == b"through-forward\n", result.stderr

    tmp_path.chmod(0o755)
    env = {
        **peer_env, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@hopcat.invalid",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@hopcat.invalid",
        # git adds -p from the URL: the options carry only the host key alias.
        "GIT_SSH_COMMAND": shlex.join(ssh[:-2]),
    }  # fmt: skip

    def git_run(*args: str, cwd: Path | None = None) -> bytes:
        done = subprocess.run([git, *args], env=env, cwd=cwd, capture_output=True, timeout=120,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    seed = tmp_path / "seed"
    git_run("init", "-q", "-b", "main", str(seed))
    (seed / "blob.bin").write_bytes(pattern(1 << 20, 17))
    git_run("add", ".", cwd=seed)
    git_run("commit", "-q", "-m", "seed", cwd=seed)
    clone = tmp_path / "clone"
    git_run("clone", "-q", f"ssh://{sshd.user}@127.0.0.1:{listen.rpartition(':')[2]}{seed}",
            str(clone))  # fmt: skip
    assert (clone / "blob.bin").read_bytes() == (seed / "blob.bin").read_bytes()
    log = server.wait_log("result=ok", count=2)
    lines = [line for line in log.splitlines() if "event=tunnel" in line]
    assert all("proto=forward" in line and "result=ok" in line for line in lines), log


def test_help_names_the_new_options() -> None:
    text = run_hopcat("serve", "--help", timeout=IO_TIMEOUT_S).stdout.decode()
    for option in ("--forward LISTEN=HOST:PORT", "-4, --ipv4", "-6, --ipv6", "Fixed forwards"):
        assert option in text, option
