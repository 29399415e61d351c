"""Listen mode (``hopcat -l``, ``-k``, ``--allow``/``--deny``) and Unix sockets (``-U``) with real
clients and servers: nc.openbsd, ncat, socat and curl on loopback.

hopcat runs as a subprocess with stdin from a file and stdout to a file; it says where it listens
through ``--ready-file``. Every byte is checked by SHA-256 both ways, for sizes around the relay's
buffer boundaries and both close orders (the client half-closes first, or hopcat's stdin ends
first).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest

from support import HOPCAT, clean_env, pattern, run_hopcat, sha256

READY_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 60.0
SIZES = [0, 1, 65535, 65536, 65537, 16 << 20]


class Listener:
    """``hopcat -l ...`` in the background: its stdin a file of ``down`` bytes, its stdout and
    stderr files; ``address`` from --ready-file."""

    def __init__(self, tmp: Path, args: list[str], down: bytes = b"", stdin: bool = True) -> None:
        self.tmp = tmp
        self.out = tmp / "listener.out"
        self.err = tmp / "listener.err"
        ready = tmp / "ready"
        source = tmp / "listener.in"
        source.write_bytes(down)
        with open(source, "rb") as stdin_file, open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*HOPCAT, "-l", "--ready-file", str(ready), *args],
                stdin=stdin_file if stdin else subprocess.DEVNULL, stdout=out, stderr=err,
                env=clean_env(),
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"hopcat -l did not get ready: {self.err.read_bytes()!r}")
            time.sleep(0.02)
        self.address = ready.read_text().strip()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def wait(self) -> int:
        try:
            return self.proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"hopcat -l still running: {self.err.read_bytes()!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(*args: str, down: bytes = b"", stdin: bool = True) -> Listener:
        listener = Listener(tmp_path, list(args), down, stdin)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def client_argv(client: str, need: Callable[..., str], host: str, port: int) -> list[str]:
    """A client that sends stdin, half-closes at its EOF and prints what it receives."""
    if client == "nc.openbsd":
        return [need("nc.openbsd", "netcat-openbsd"), "-N", host, str(port)]
    if client == "ncat":
        return [need("ncat"), host, str(port)]
    return [need("socat"), "-t", "30", "STDIO", f"TCP:{host}:{port}"]


# The 16 MiB case runs with nc.openbsd only, to keep the suite short.
CLIENT_CASES = [pytest.param(client, size, id=f"{client}-{size}B")
                for client in ("nc.openbsd", "ncat", "socat") for size in SIZES
                if size <= 1 << 20 or client == "nc.openbsd"]  # fmt: skip


@pytest.mark.parametrize(("client", "size"), CLIENT_CASES)
def test_one_client_both_ways(
    listen: Callable[..., Listener], need: Callable[..., str], client: str, size: int
) -> None:
    down, up = pattern(size, 1), pattern(size + 7, 2)
    listener = listen("127.0.0.1", "0", down=down)
    result = subprocess.run(client_argv(client, need, "127.0.0.1", listener.port), input=up,
                            capture_output=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert listener.wait() == 0, listener.err.read_bytes()
    assert sha256(result.stdout) == sha256(down)
    assert sha256(listener.out.read_bytes()) == sha256(up)


def test_the_client_closes_first_while_stdin_stays_open(
    listen: Callable[..., Listener], tmp_path: Path
) -> None:
    """stdin a pipe nobody closes: the client's FIN, then its data delivered, ends hopcat."""
    ready = tmp_path / "ready-pipe"
    read_end, write_end = os.pipe()
    out = tmp_path / "pipe.out"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen([*HOPCAT, "-l", "--ready-file", str(ready), "127.0.0.1", "0"],
                                stdin=read_end, stdout=stdout, env=clean_env())  # fmt: skip
    os.close(read_end)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        port = int(ready.read_text().strip().rsplit(":", 1)[1])
        up = pattern(300_000, 3)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(up)
            conn.shutdown(socket.SHUT_WR)
            assert proc.wait(RUN_TIMEOUT_S) == 0
        assert out.read_bytes() == up
    finally:
        os.close(write_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keep_open_serves_twenty_clients_in_turn(listen: Callable[..., Listener]) -> None:
    listener = listen("-k", "127.0.0.1", "0", stdin=False)
    sent = []
    for index in range(20):
        payload = pattern(1000 + index, index)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # stdin is empty: each client gets our FIN
        sent.append(payload)
    deadline = time.monotonic() + 10
    while listener.out.stat().st_size < sum(map(len, sent)):
        assert time.monotonic() < deadline, "not every client's bytes reached stdout"
        time.sleep(0.02)
    assert listener.out.read_bytes() == b"".join(sent)
    assert listener.proc.poll() is None  # -k: still listening


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback (::1) here")
def test_no_address_listens_on_ipv6_and_ipv4(listen: Callable[..., Listener]) -> None:
    listener = listen("-k", "0", stdin=False)
    assert listener.address.startswith("[::]:")
    for host in ("::1", "127.0.0.1"):
        with socket.create_connection((host, listener.port), timeout=10) as conn:
            conn.sendall(host.encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""
    deadline = time.monotonic() + 10
    while listener.out.read_bytes().count(b"\n") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert listener.out.read_bytes() == b"::1\n127.0.0.1\n"


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback (::1) here")
def test_allow_and_deny_decide_on_the_client_address(listen: Callable[..., Listener]) -> None:
    listener = listen("-k", "-v", "--deny", "127.0.0.0/8", "--allow", "::1,10.0.0.0/8", "0",
                      stdin=False)  # fmt: skip
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as refused:
        refused.sendall(b"denied\n")
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: a reset
            assert refused.recv(1) == b""  # closed at once, nothing relayed
    with socket.create_connection(("::1", listener.port), timeout=10) as allowed:
        allowed.sendall(b"allowed\n")
        allowed.shutdown(socket.SHUT_WR)
        assert allowed.recv(1) == b""
    deadline = time.monotonic() + 10
    while b"allowed" not in listener.out.read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert listener.out.read_bytes() == b"allowed\n"
    assert b"refused 127.0.0.1:" in listener.err.read_bytes()


def test_curl_gets_the_scripted_answer(listen: Callable[..., Listener], need: Callable[..., str]) -> None:
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    listener = listen("127.0.0.1", "0", down=answer)
    result = subprocess.run([need("curl"), "-sS", "--max-time", "20",
                             f"http://127.0.0.1:{listener.port}/path"],
                            capture_output=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert result.stdout == b"hello", result.stderr
    listener.wait()
    assert listener.out.read_bytes().startswith(b"GET /path HTTP/1.1\r\n")


def test_nc_style_port_flag_and_source_address(listen: Callable[..., Listener]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = listen("-p", str(port), "-s", "127.0.0.1", down=b"hi")
    assert listener.address == f"127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(10) == b"hi"
    assert listener.wait() == 0


def test_a_port_in_use_is_one_line_and_exit_69() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_hopcat("-l", "127.0.0.1", str(port))
    assert result.returncode == 69
    assert result.stderr.decode() == f"hopcat: listen on 127.0.0.1:{port}: address already in use\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "127.0.0.1", "1"], "-k works with -l (listen mode) only"),
        (["-l", "1", "2", "3"], "-l takes [ADDR] PORT"),
        (["-l", "-x", "socks5h://127.0.0.1:1", "1"], "-l listens here: it takes no proxy"),
        (["-l", "--allow", "not-an-address", "1"], "--allow"),
        (["-l", "-U", "--allow", "127.0.0.1", "/tmp/x.sock"], "a Unix socket has none"),
        (["-U", "a", "b"], "-U takes one operand"),
        (["-l", "--ready-fd", "99999999999999999999", "0"], "not an open descriptor"),
        (["serve", "127.0.0.1:0", "--ready-fd", "99999999999999999999"], "not an open descriptor"),
        (["-l", "--allow", "1.2.3.4/99", "0"], "--allow '1.2.3.4/99'"),
    ],
)
def test_bad_listen_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = run_hopcat(*args)
    assert result.returncode == 64, result.stderr
    assert message in result.stderr.decode() and result.stderr.count(b"\n") == 1


# ------------------------------------------------------------------------------ Unix sockets
def _wait_for_path(path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("client", ["socat", "nc.openbsd"])
def test_unix_listen_with_real_clients(
    listen: Callable[..., Listener], need: Callable[..., str], tmp_path: Path, client: str
) -> None:
    path = tmp_path / "hopcat.sock"
    down, up = pattern(2 << 20, 4), pattern(3 << 20, 5)
    listener = listen("-U", str(path), down=down)
    assert listener.address == str(path)
    argv = ([need("socat"), "-t", "30", "STDIO", f"UNIX-CONNECT:{path}"] if client == "socat"
            else [need("nc.openbsd", "netcat-openbsd"), "-N", "-U", str(path)])  # fmt: skip
    result = subprocess.run(argv, input=up, capture_output=True, timeout=RUN_TIMEOUT_S)
    assert listener.wait() == 0, listener.err.read_bytes()
    assert sha256(result.stdout) == sha256(down)
    assert sha256(listener.out.read_bytes()) == sha256(up)
    assert not path.exists()  # the socket file hopcat made is gone


@contextlib.contextmanager
def socat_unix_server(need: Callable[..., str], address: str, reply: bytes, tmp: Path) -> Iterator[Path]:
    """socat listening on ``address`` (UNIX-LISTEN or ABSTRACT-LISTEN): it sends ``reply`` and
    writes what it receives to the returned file."""
    got = tmp / "socat.got"
    reply_file = tmp / "socat.reply"
    reply_file.write_bytes(reply)
    proc = subprocess.Popen(
        [need("socat"), "-t", "30", address, f"SYSTEM:cat {reply_file}; cat > {got}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield got
        proc.wait(RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unix_connect_to_socat(need: Callable[..., str], tmp_path: Path) -> None:
    path = tmp_path / "socat.sock"
    down, up = pattern(1 << 20, 6), pattern(1 << 20, 7)
    with socat_unix_server(need, f"UNIX-LISTEN:{path}", down, tmp_path) as got:
        _wait_for_path(path)
        result = run_hopcat("-U", str(path), input=up, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(down)
    assert sha256(got.read_bytes()) == sha256(up)


def test_unix_abstract_names(listen: Callable[..., Listener], need: Callable[..., str]) -> None:
    name = f"hopcat-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = listen("-U", f"@{name}", down=b"from hopcat")
    result = subprocess.run([need("socat"), "-t", "30", "STDIO", f"ABSTRACT-CONNECT:{name}"],
                            input=b"to hopcat", capture_output=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert listener.wait() == 0
    assert result.stdout == b"from hopcat"
    assert listener.out.read_bytes() == b"to hopcat"
    client = run_hopcat("-U", f"@{name}-nobody")
    assert client.returncode == 69 and b"connection refused" in client.stderr


def test_unix_socket_files_are_never_unlinked_for_us(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(stale))  # bound, never listening, closed: a stale file stays behind
    result = run_hopcat("-l", "-U", str(stale))
    assert result.returncode == 69
    assert b"a stale socket file (nothing listens on it)" in result.stderr
    assert stale.exists()

    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(live))
        other.listen(1)
        result = run_hopcat("-l", "-U", str(live))
    assert result.returncode == 69 and b"in use by another program" in result.stderr

    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    result = run_hopcat("-l", "-U", str(plain))
    assert result.returncode == 69 and b"exists and is not a socket" in result.stderr
    assert plain.read_text() == "not a socket"


# ------------------------------------------------------------------------------ exec
@pytest.mark.parametrize("client", ["nc.openbsd", "ncat"])
def test_sh_exec_cat_echoes_for_real_clients(
    listen: Callable[..., Listener], need: Callable[..., str], client: str
) -> None:
    up = pattern(1 << 20, 8)
    listener = listen("127.0.0.1", "0", "--sh-exec", "cat", stdin=False)
    result = subprocess.run(client_argv(client, need, "127.0.0.1", listener.port), input=up,
                            capture_output=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert listener.wait() == 0
    assert sha256(result.stdout) == sha256(up)


def test_keep_open_gives_each_of_twenty_concurrent_clients_its_own_child(
    listen: Callable[..., Listener],
) -> None:
    listener = listen("-k", "127.0.0.1", "0", "--sh-exec", 'echo "pid $$"; cat', stdin=False)
    clients = [socket.create_connection(("127.0.0.1", listener.port), timeout=10)
               for _ in range(20)]  # fmt: skip
    try:
        pids = set()
        for index, conn in enumerate(clients):  # all twenty connected before any finishes
            conn.sendall(f"client {index}\n".encode())
            conn.shutdown(socket.SHUT_WR)
        for index, conn in enumerate(clients):
            got = b""
            while chunk := conn.recv(4096):
                got += chunk
            first, second = got.decode().splitlines()
            assert second == f"client {index}"
            pids.add(first)
        assert len(pids) == 20
    finally:
        for conn in clients:
            conn.close()


def test_max_conns_bounds_the_children(listen: Callable[..., Listener]) -> None:
    listener = listen("-k", "--max-conns", "2", "127.0.0.1", "0", "--sh-exec", "cat", stdin=False)
    first, second, third = (socket.create_connection(("127.0.0.1", listener.port), timeout=10)
                            for _ in range(3))  # fmt: skip
    try:
        for conn in (first, second, third):
            conn.sendall(b"x")
        assert first.recv(1) == b"x" and second.recv(1) == b"x"
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):
            third.recv(1)  # in the backlog: no child until one of the two ends
        first.shutdown(socket.SHUT_WR)
        assert first.recv(1) == b""
        third.settimeout(10)
        assert third.recv(1) == b"x"
    finally:
        for conn in (first, second, third):
            conn.close()


def test_exec_exit_status_is_hopcats(listen: Callable[..., Listener]) -> None:
    listener = listen("127.0.0.1", "0", "--sh-exec", "exit 3", stdin=False)
    socket.create_connection(("127.0.0.1", listener.port), timeout=10).close()
    assert listener.wait() == 3
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = subprocess.Popen([*HOPCAT, "--sh-exec", "kill -TERM $$", "127.0.0.1",
                                 str(server.getsockname()[1])], env=clean_env())  # fmt: skip
        conn, _ = server.accept()
        conn.close()
        assert proc.wait(RUN_TIMEOUT_S) == 128 + 15


def test_exec_through_a_proxy_gets_the_targets_first_byte(
    danted: peers.Daemon, banner_server: peers.BannerServer
) -> None:
    """The tunnel is read exactly, so the program reads the banner that came with the reply."""
    url = danted.url_as("socks5h")
    banner = banner_server.banner
    port = str(banner_server.port)
    result = run_hopcat("-x", url, "--exec", f"head -c {len(banner)}", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""  # the program's stdout is the socket, not ours
    result = run_hopcat("-x", url, "--sh-exec", f"head -c {len(banner)} >&2", "127.0.0.1", port)
    assert result.returncode == 0 and result.stderr == banner


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-e", "no-such-program-here", "127.0.0.1", "1"], "command not found"),
        (["-e", "true", "--sh-exec", "true", "127.0.0.1", "1"], "exclude each other"),
        (["-F", "-e", "true", "127.0.0.1", "1"], "pick one"),
        (["-l", "--max-conns", "2", "1"], "--max-conns bounds the children"),
        (["-l", "-k", "--max-conns", "0", "-e", "true", "1"], "--max-conns takes"),
    ],
)
def test_bad_exec_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = run_hopcat(*args)
    assert result.returncode == 64, result.stderr
    assert message in result.stderr.decode() and result.stderr.count(b"\n") == 1


def test_ssh_through_nc_to_a_listening_hopcat_that_execs_hopcat(
    listen: Callable[..., Listener], sshd: peers.SshServer, peer_env: dict[str, str],
    need: Callable[..., str],
) -> None:
    """An ssh byte stream end to end: ssh's ProxyCommand is nc.openbsd to ``hopcat -l --exec``,
    whose program is another hopcat connecting to sshd; 8 MiB through and its digest back."""
    import shlex
    import sys

    forward = shlex.join([sys.executable, "-m", "hopcat", "127.0.0.1", str(sshd.port)])
    listener = listen("127.0.0.1", "0", "--exec", forward, stdin=False)
    proxy = f"ProxyCommand={need('nc.openbsd', 'netcat-openbsd')} 127.0.0.1 {listener.port}"
    up = pattern(8 << 20, 9)
    result = subprocess.run([*sshd.ssh_argv("-o", proxy), "sha256sum"], input=up,
                            capture_output=True, timeout=RUN_TIMEOUT_S, env=peer_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == sha256(up)
    assert listener.wait() == 0


def test_an_exec_child_dies_of_sigpipe_when_its_client_leaves(
    listen: Callable[..., Listener],
) -> None:
    """The program gets SIGPIPE's default action back (Python ignores it): a writer whose client
    left dies instead of looping on EPIPE for ever."""
    listener = listen("127.0.0.1", "0", "--sh-exec", "while :; do echo tick; done", stdin=False)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as conn:
        assert conn.recv(5) == b"tick\n"
    assert listener.wait() == 128 + 13


def test_a_unix_socket_with_a_full_backlog_is_in_use_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(path))
        busy.listen(0)
        waiting = []
        for _ in range(4):  # fill the backlog: the next connect would block
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(str(path))
            waiting.append(client)
        try:
            result = run_hopcat("-l", "-U", str(path), timeout=10)
        finally:
            for client in waiting:
                client.close()
    assert result.returncode == 69 and b"in use by another program" in result.stderr
