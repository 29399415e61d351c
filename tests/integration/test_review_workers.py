"""Review: supervisor edge cases."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from test_serve_support import ServeProcess
from test_serve_workers import worker_pids

Serve = Callable[..., ServeProcess]


def test_worker_killed_by_realtime_signal_is_restarted(serve: Serve) -> None:
    """A worker ended by a signal that signal.Signals does not name (SIGRTMIN+6) is restarted
    like any other, with no traceback in the supervisor."""
    server = serve("--workers", "2")
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGRTMIN + 6)
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
    import subprocess

    from support import HOPCAT, clean_env

    first = serve("--workers", "2")
    proc = subprocess.Popen(
        [*HOPCAT, "serve", f"127.0.0.1:{first.port}", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)
        code = None
    assert code not in (None, 0), "a second server shares the port"


def test_forward_on_a_proxy_port_is_refused(serve: Serve) -> None:
    """--forward on the proxy's own port: refused without --workers ("address already in use");
    with --workers both bind with SO_REUSEPORT and the kernel splits connections between the
    proxy and the forward."""
    import subprocess

    from support import HOPCAT, clean_env

    first = serve()  # only to find a free port number
    port = first.port
    first.stop()
    proc = subprocess.Popen(
        [*HOPCAT, "serve", f"127.0.0.1:{port}", "--workers", "2",
         "--forward", f"127.0.0.1:{port}=127.0.0.1:9"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)
        code = None
    assert code not in (None, 0), "the proxy and the forward share one port"


def test_replayed_digest_answer_refused_in_every_worker(serve: Serve, digest_server) -> None:  # type: ignore[no-untyped-def]
    """One Digest answer (nonce, nc=1) sent on many connections: a single server takes it
    once and refuses each replay; with --workers each worker keeps its own nc table, so the
    replay is taken once per worker."""
    import hashlib
    import re

    from test_serve_support import connect, http_connect
    from test_serve_workers import SPREAD

    server = serve("--workers", "2", "--auth", "alice:s3cret", "--auth-scheme", "digest")
    authority = f"{digest_server.host}:{digest_server.port}"
    with connect(server) as sock:
        status, head = http_connect(sock, digest_server.host, digest_server.port)
    assert status == 407
    challenge = next(line for line in head.split("\r\n") if "algorithm=MD5" in line)
    nonce = re.search(r'nonce="([^"]+)"', challenge)[1]  # type: ignore[index]
    realm = re.search(r'realm="([^"]+)"', challenge)[1]  # type: ignore[index]

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1, ha2 = md5(f"alice:{realm}:s3cret"), md5(f"CONNECT:{authority}")
    response = md5(f"{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}")
    header = (f'Proxy-Authorization: Digest username="alice", realm="{realm}", '
              f'nonce="{nonce}", uri="{authority}", qop=auth, nc=00000001, '
              f'cnonce="c0ffee", response="{response}", algorithm=MD5\r\n')  # fmt: skip
    accepted = 0
    for _ in range(SPREAD):
        with connect(server) as sock:
            accepted += http_connect(sock, digest_server.host, digest_server.port, header)[0] == 200
    assert accepted == 1, f"one captured Digest answer was accepted {accepted} times"
