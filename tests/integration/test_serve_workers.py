"""``hopcat serve --workers 2``: readiness, service, drain, reload, restart, descriptors.

SO_REUSEPORT hashes each connection to one worker (the client's port is in the hash), so a
test that needs both workers opens enough connections to reach both with near certainty
(``SPREAD``: a miss has probability 2**-23) and checks the ``worker=K`` of the log lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from test_serve_hostile import hostile_clients, settled_fds
from test_serve_support import (
    ServeProcess,
    connect,
    http_connect,
    recv_exact,
    recv_until_eof,
    socks5_connect,
    wait_closed,
)

from support import HOPCAT, clean_env, closed_port, make_certificates, pattern

Serve = Callable[..., ServeProcess]
SPREAD = 24
LISTEN = re.compile(r"event=listen worker=(\d+) .* pid=(\d+)")


def worker_pids(server: ServeProcess) -> dict[int, int]:
    """The latest pid of each worker, from its listen lines."""
    return {int(w): int(p) for w, p in LISTEN.findall(server.log())}


def digest_tunnel(server: ServeProcess, target: peers.DigestServer, data: bytes, http: bool) -> None:
    with connect(server) as sock:
        if http:
            assert http_connect(sock, target.host, target.port)[0] == 200
        else:
            assert socks5_connect(sock, target.host, target.port) == 0
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == target.answer_for(data)


def served_by(server: ServeProcess, result: str) -> set[str]:
    return set(re.findall(rf"event=tunnel worker=(\d+) .*result={result}", server.log()))


def test_workers_serve_socks5_and_connect(
    serve: Serve, digest_server: peers.DigestServer
) -> None:
    server = serve("--workers", "2")
    log = server.log()
    # Ready (the file the fixture waited for) only once every worker listens.
    assert log.index("event=ready workers=2") > max(m.start() for m in LISTEN.finditer(log))
    pids = worker_pids(server)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    assert server.pid not in pids.values()
    for i in range(SPREAD):
        digest_tunnel(server, digest_server, pattern(1000 + i, i), http=bool(i % 2))
    server.wait_log("result=ok", count=SPREAD)
    assert served_by(server, "ok") == {"1", "2"}
    assert {"proto=socks5", "proto=http"} <= set(re.findall(r"proto=\w+", server.log()))


def test_sigterm_drains_tunnels_in_every_worker(
    serve: Serve, banner_server: peers.BannerServer
) -> None:
    server = serve("--workers", "2", "--grace", "30")
    tunnels = []
    try:
        for _ in range(SPREAD):
            sock = connect(server)
            tunnels.append(sock)
            assert socks5_connect(sock, banner_server.host, banner_server.port) == 0
            assert recv_exact(sock, len(banner_server.banner)) == banner_server.banner
        server.send_signal(signal.SIGTERM)
        log = server.wait_log("signal=SIGTERM tunnels=", count=2)
        assert sum(map(int, re.findall(r"signal=SIGTERM tunnels=(\d+)", log))) == SPREAD
        assert re.search(r"shutdown worker=1 signal=SIGTERM tunnels=[1-9]", log)
        assert re.search(r"shutdown worker=2 signal=SIGTERM tunnels=[1-9]", log)
        with pytest.raises(ConnectionRefusedError):
            connect(server)
        for i, sock in enumerate(tunnels):  # data still flows in every worker's tunnels
            sock.sendall(b"still here %d" % i)
            assert recv_exact(sock, len(b"still here %d" % i)) == b"still here %d" % i
        assert server.proc.poll() is None
        for sock in tunnels:
            sock.shutdown(socket.SHUT_WR)
            assert wait_closed(sock) == b""
    finally:
        for sock in tunnels:
            sock.close()
    assert server.proc.wait(10) == 0
    log = server.log()
    assert log.count("result=ok") == SPREAD
    assert "second signal" not in log
    assert "event=stopped code=0" in log


def test_sighup_reloads_every_worker(
    serve: Serve, tmp_path: Path, digest_server: peers.DigestServer
) -> None:
    rules = tmp_path / "rules"
    rules.write_text("# nothing denied yet\n")
    server = serve("--workers", "2", "--rules", str(rules))
    digest_tunnel(server, digest_server, b"before", http=False)
    rules.write_text(f"deny 127.0.0.1:{digest_server.port}\n")
    server.send_signal(signal.SIGHUP)
    log = server.wait_log(" result=ok users=", count=2)
    assert "event=reload worker=1 result=ok" in log and "event=reload worker=2 result=ok" in log
    for _ in range(SPREAD):
        with connect(server) as sock:
            assert socks5_connect(sock, digest_server.host, digest_server.port) == 2
    server.wait_log("result=denied", count=SPREAD)
    assert served_by(server, "denied") == {"1", "2"}

    rules.write_text("allow this is not a rule\n")
    server.send_signal(signal.SIGHUP)
    log = server.wait_log("event=reload worker=", count=4)
    assert "event=reload worker=1 result=error" in log
    assert "event=reload worker=2 result=error" in log
    for _ in range(4):  # the previous rules stay in every worker
        with connect(server) as sock:
            assert socks5_connect(sock, digest_server.host, digest_server.port) == 2
    # A worker started after the reload starts with the reloaded rules.
    os.kill(worker_pids(server)[2], signal.SIGKILL)
    server.wait_log("event=listen worker=2", count=2)
    for _ in range(SPREAD):
        with connect(server) as sock:
            assert socks5_connect(sock, digest_server.host, digest_server.port) == 2


def test_killed_worker_is_restarted(serve: Serve, digest_server: peers.DigestServer) -> None:
    server = serve("--workers", "2")
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGKILL)
    server.wait_log(f"event=worker-exit worker=1 pid={pids[1]} status=signal:SIGKILL")
    log = server.wait_log("event=listen worker=1", count=2)
    new = worker_pids(server)
    assert new[1] not in (pids[1], pids[2]) and new[2] == pids[2]
    assert f"event=worker-start worker=1 pid={new[1]}" in log
    for i in range(SPREAD):
        digest_tunnel(server, digest_server, pattern(500, i), http=False)
    server.wait_log("result=ok", count=SPREAD)
    assert served_by(server, "ok") == {"1", "2"}
    server.stop()
    assert server.proc.returncode == 0


def test_descriptors_settle_after_hostile_clients(
    serve: Serve, digest_server: peers.DigestServer
) -> None:
    server = serve("--workers", "2")
    for i in range(4):
        digest_tunnel(server, digest_server, b"warm-up", http=bool(i % 2))
    baseline = settled_fds(server)
    for _ in range(3):
        hostile_clients(server)
    digest_tunnel(server, digest_server, b"after", http=False)
    assert settled_fds(server, baseline) == baseline
    assert served_by(server, "protocol-error") == {"1", "2"}


def test_bad_config_fails_once(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*HOPCAT, "serve", "127.0.0.1:0", "--workers", "2", "--rules", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 64
    assert proc.stderr.count("hopcat:") == 1 and "--rules" in proc.stderr
    assert "event=" not in proc.stderr
    proc = subprocess.run([*HOPCAT, "serve", "--workers", "0"], capture_output=True, text=True,
                          timeout=30, env=clean_env())  # fmt: skip
    assert proc.returncode == 64 and "--workers takes" in proc.stderr
    with socket.socket() as probe:  # a free port, for a --via that is the server itself
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [*HOPCAT, "serve", f"127.0.0.1:{port}", "--workers", "2", "--via",
         f"socks5://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 64 and proc.stderr.count("is this server itself") == 1


def test_supervisor_gone_workers_drain(serve: Serve) -> None:
    """A supervisor killed with SIGKILL leaves no worker behind."""
    server = serve("--workers", "2")
    pids = list(worker_pids(server).values())
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)
    assert server.log().count("signal=supervisor-gone") == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def digest_answerer(server: ServeProcess, target: peers.DigestServer) -> Callable[[int], str]:
    """Ask for a 407 and take its MD5 nonce: the Proxy-Authorization header line (alice,
    s3cret) that answers it with a given nonce count."""
    authority = f"{target.host}:{target.port}"
    with connect(server) as sock:
        status, head = http_connect(sock, target.host, target.port)
    assert status == 407
    challenge = next(line for line in head.split("\r\n") if "algorithm=MD5" in line)
    nonce = re.search(r'nonce="([^"]+)"', challenge)[1]  # type: ignore[index]
    realm = re.search(r'realm="([^"]+)"', challenge)[1]  # type: ignore[index]

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1, ha2 = md5(f"alice:{realm}:s3cret"), md5(f"CONNECT:{authority}")

    def header(nc: int) -> str:
        count = f"{nc:08x}"
        response = md5(f"{ha1}:{nonce}:{count}:c0ffee:auth:{ha2}")
        return (f'Proxy-Authorization: Digest username="alice", realm="{realm}", '
                f'nonce="{nonce}", uri="{authority}", qop=auth, nc={count}, '
                f'cnonce="c0ffee", response="{response}", algorithm=MD5\r\n')  # fmt: skip

    return header


def test_digest_nonce_good_in_every_worker(
    serve: Serve, digest_server: peers.DigestServer
) -> None:
    """A 407's nonce from one worker is answered on a new connection, which may reach the
    other: the nonce key is the server's, not a worker's."""
    server = serve("--workers", "2", "--auth", "alice:s3cret", "--auth-scheme", "digest")
    answer = digest_answerer(server, digest_server)
    for nc in range(1, SPREAD + 1):
        header = answer(nc)
        with connect(server) as sock:
            assert http_connect(sock, digest_server.host, digest_server.port, header)[0] == 200
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == digest_server.answer_for(b"x")
    server.wait_log("result=ok", count=SPREAD)
    assert served_by(server, "ok") == {"1", "2"}


def test_group_signal_is_one_signal(serve: Serve, banner_server: peers.BannerServer) -> None:
    """SIGINT to the whole process group (Ctrl-C in a terminal; systemd sends SIGTERM so) reaches
    the workers directly and through the supervisor: still a drain, not a second signal. A
    second signal to the supervisor then ends everything at once."""
    server = serve("--workers", "2", "--grace", "60")
    tunnels = []
    try:
        for _ in range(4):
            sock = connect(server)
            tunnels.append(sock)
            assert socks5_connect(sock, banner_server.host, banner_server.port) == 0
            assert recv_exact(sock, len(banner_server.banner)) == banner_server.banner
        os.killpg(server.pid, signal.SIGINT)
        server.wait_log("signal=SIGINT tunnels=", count=2)
        time.sleep(0.3)
        assert "second signal" not in server.log()
        for sock in tunnels:
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        for sock in tunnels:
            assert wait_closed(sock) == b""
    finally:
        for sock in tunnels:
            sock.close()
    assert server.log().count("second signal: closing everything") >= 2


def test_tls_and_plain_listeners(
    serve: Serve, tmp_path: Path, banner_server: peers.BannerServer,
    digest_server: peers.DigestServer,
) -> None:  # fmt: skip
    certificates = make_certificates(tmp_path)
    server = serve("--workers", "2", "--tls-cert", str(certificates.cert), "--tls-key",
                   str(certificates.key), listen=("127.0.0.1:0", "tls://127.0.0.1:0"))  # fmt: skip
    assert server.addresses[1].startswith("tls://127.0.0.1:")
    assert server.log().count("address=tls://127.0.0.1:") == 2
    host, port = server.addresses[1].removeprefix("tls://").rsplit(":", 1)
    context = certificates.client_context()
    for i in range(8):
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host) as sock:  # fmt: skip
            assert socks5_connect(sock, banner_server.host, banner_server.port) == 0
            assert recv_exact(sock, len(banner_server.banner)) == banner_server.banner
            data = pattern(2000, i)
            sock.sendall(data)
            assert recv_exact(sock, len(data)) == data
    digest_tunnel(server, digest_server, b"plain", http=True)
    server.wait_log("event=tunnel", count=9)
    assert "tls=TLSv1.3" in server.log()


def test_worker_killed_by_realtime_signal_is_restarted(serve: Serve) -> None:
    """A worker ended by a signal that signal.Signals does not name (SIGRTMIN+6) is restarted
    like any other, with no traceback in the supervisor."""
    server = serve("--workers", "2")
    os.kill(worker_pids(server)[1], signal.SIGRTMIN + 6)
    log = server.wait_log("event=listen worker=1", count=2)
    assert "Traceback" not in log


def test_group_sigterm_with_idle_workers_restarts_nothing(serve: Serve) -> None:
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process at once:
    idle workers drain at once and exit 0. The supervisor must not take that for a crash and
    restart (or count a restart of) any worker."""
    server = serve("--workers", "2")
    os.killpg(server.pid, signal.SIGTERM)
    assert server.proc.wait(10) == 0
    log = server.log()
    assert "restart_in" not in log, log


def test_second_server_on_the_same_port_is_refused(serve: Serve) -> None:
    """Without --workers a second server on a port in use fails at once ("address already in
    use"). With --workers (SO_REUSEPORT), a second hopcat (or any program of the same user that
    sets SO_REUSEPORT) joins the group and silently takes a share of the connections."""
    first = serve("--workers", "2")
    second = subprocess.run(
        [*HOPCAT, "serve", f"127.0.0.1:{first.port}", "--workers", "2"],
        capture_output=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert second.returncode == 69 and b"address already in use" in second.stderr


def test_forward_on_a_proxy_port_is_refused(serve: Serve) -> None:
    """--forward on the proxy's own port: refused without --workers ("address already in use");
    with --workers both bind with SO_REUSEPORT and the kernel splits connections between the
    proxy and the forward."""
    with closed_port() as port:
        result = subprocess.run(
            [*HOPCAT, "serve", f"127.0.0.1:{port}", "--workers", "2",
             "--forward", f"127.0.0.1:{port}=127.0.0.1:9"],
            capture_output=True, timeout=30, env=clean_env(),
        )  # fmt: skip
    assert result.returncode == 69 and b"address already in use" in result.stderr


def test_replayed_digest_answer_refused_in_every_worker(
    serve: Serve, digest_server: peers.DigestServer
) -> None:
    """One Digest answer (nonce, nc=1) sent on many connections is taken once: the workers
    share one table of the counts seen, so a replay is refused whichever worker it reaches."""
    server = serve("--workers", "2", "--auth", "alice:s3cret", "--auth-scheme", "digest")
    header = digest_answerer(server, digest_server)(1)
    accepted = 0
    for _ in range(SPREAD):
        with connect(server) as sock:
            accepted += http_connect(sock, digest_server.host, digest_server.port, header)[0] == 200
    assert accepted == 1, f"one captured Digest answer was accepted {accepted} times"
