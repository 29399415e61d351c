"""``hopcat -u``: nc's UDP mode against real peers on loopback (nc.openbsd, socat) and small
in-process UDP sockets; datagram boundaries, -W, -q, -w, -v, -l, -k, IPv6, exit codes.

Boundaries are made deterministic by giving hopcat a SOCK_SEQPACKET socket as stdin: each read
of it returns exactly one message, so N messages must leave as N datagrams of those sizes.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import HOPCAT, clean_env, run_hopcat

TIMEOUT_S = 10.0


class Echo:
    """A UDP socket on loopback that records each datagram's size and sends it back (or not)."""

    def __init__(self, family: int = socket.AF_INET, *, answer: bool = True) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.host, self.port = self.sock.getsockname()[:2]
        self.answer = answer
        self.sizes: list[int] = []
        self.senders: set[object] = set()
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sizes.append(len(data))
            self.senders.add(sender)
            if self.answer:
                self.sock.sendto(data, sender)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def closed_udp_port() -> int:
    return free_udp_port()  # nothing bound there: loopback answers with ICMP port unreachable


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_line(stream: object, what: str) -> bytes:
    fd = stream.fileno()  # type: ignore[attr-defined]
    assert select.select([fd], [], [], TIMEOUT_S)[0], f"nothing from {what}"
    return os.read(fd, 65536)


@contextlib.contextmanager
def hopcat(
    *args: str, stdin: int | None = subprocess.PIPE, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*HOPCAT, *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env or clean_env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def peer(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean_env())
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


# -- connect mode against real peers ---------------------------------------------------------------

def test_against_nc_openbsd_listening(need: Callable[..., str]) -> None:
    nc = need("nc.openbsd", "netcat-openbsd")
    port = free_udp_port()
    with peer([nc, "-u", "-l", "127.0.0.1", str(port)]) as server:
        time.sleep(0.2)  # nc prints nothing when bound: give it the moment to bind
        with hopcat("-u", "-W", "1", "127.0.0.1", str(port)) as client:
            assert client.stdin is not None and server.stdin is not None
            client.stdin.write(b"ping\n")
            client.stdin.flush()
            assert read_line(server.stdout, "nc") == b"ping\n"
            server.stdin.write(b"pong\n")
            server.stdin.flush()
            code, out, err = finish(client)
    assert (code, out) == (0, b"pong\n"), err


def test_against_socat_udp_listen_echo(need: Callable[..., str]) -> None:
    socat = need("socat")
    port = free_udp_port()
    with peer([socat, "-b", "65536", f"UDP-LISTEN:{port},bind=127.0.0.1", "PIPE"]):
        time.sleep(0.2)
        with hopcat("-u", "-W", "2", "-v", "127.0.0.1", str(port)) as client:
            assert client.stdin is not None
            for line in (b"one\n", b"two two\n"):
                client.stdin.write(line)
                client.stdin.flush()
                time.sleep(0.1)
            code, out, err = finish(client)
    assert (code, out) == (0, b"one\ntwo two\n"), err
    assert b"sent 2 datagrams (12 bytes), received 2 (12 bytes)" in err, err


def test_against_socat_recvfrom_fork_echo(need: Callable[..., str]) -> None:
    socat = need("socat")
    port = free_udp_port()
    with peer([socat, f"UDP-RECVFROM:{port},bind=127.0.0.1,fork", "EXEC:tr a-z A-Z"]):
        time.sleep(0.2)
        with hopcat("-u", "-W", "1", "127.0.0.1", str(port)) as client:
            assert client.stdin is not None
            client.stdin.write(b"shout\n")
            client.stdin.flush()
            code, out, err = finish(client)
    assert (code, out) == (0, b"SHOUT\n"), err


# -- boundaries -----------------------------------------------------------------------------------

SIZES = [1, 7, 512, 1400, 9000, 32768, 65507]


def test_each_read_is_one_datagram_both_ways(echo: Echo) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, hopcat("-u", "-W", str(len(SIZES)), "-v", echo.host, str(echo.port),
                stdin=theirs.fileno()) as client:
        theirs.close()
        for size in SIZES:
            ours.send(bytes([size % 251]) * size)
        code, out, err = finish(client)
    assert code == 0, err
    assert echo.sizes == SIZES
    assert out == b"".join(bytes([size % 251]) * size for size in SIZES)
    total = sum(SIZES)
    assert f"sent {len(SIZES)} datagrams ({total} bytes), received {len(SIZES)}".encode() in err


def test_stdin_from_a_pipe_with_pauses(echo: Echo) -> None:
    with hopcat("-u", "-q", "1", echo.host, str(echo.port)) as client:
        assert client.stdin is not None
        for size in (3, 300, 3000):
            client.stdin.write(b"x" * size)
            client.stdin.flush()
            wait_for(lambda size=size: size in echo.sizes, f"a datagram of {size} bytes")  # type: ignore[misc]
        client.stdin.close()
        client.stdin = None
        code, out, err = finish(client)
    assert code == 0 and echo.sizes == [3, 300, 3000] and len(out) == 3303, err


# -- ends -----------------------------------------------------------------------------------------

def test_stdin_eof_keeps_receiving_until_q(echo: Echo) -> None:
    started = time.monotonic()
    result = run_hopcat("-u", "-q", "0.5", echo.host, str(echo.port), input=b"hi", timeout=30)
    assert result.returncode == 0 and result.stdout == b"hi", result.stderr
    assert time.monotonic() - started >= 0.5


def test_idle_timeout_is_the_ordinary_end(echo: Echo) -> None:
    result = run_hopcat("-u", "-v", "-w", "0.5", echo.host, str(echo.port), input=b"q", timeout=30)
    assert result.returncode == 0 and result.stdout == b"q", result.stderr
    assert b"(-w): done" in result.stderr


def test_port_unreachable_is_exit_69_with_a_line() -> None:
    port = closed_udp_port()
    result = run_hopcat("-u", "-w", "5", "127.0.0.1", str(port), input=b"anyone?", timeout=30)
    assert result.returncode == 69, result.stderr
    assert result.stderr.decode().startswith(f"hopcat: udp 127.0.0.1:{port}: nothing listens")
    assert result.stderr.count(b"\n") == 1


def test_stdout_reader_gone_after_stdin_eof_is_quiet(echo: Echo) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*HOPCAT, "-u", echo.host, str(echo.port)], input=b"x",
                              stdout=write_end, stderr=subprocess.PIPE, env=clean_env(),
                              timeout=30)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr


def test_ipv6() -> None:
    try:
        server = Echo(socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on loopback")
    try:
        result = run_hopcat("-u", "-6", "-W", "1", "::1", str(server.port), input=b"six",
                            timeout=30)
    finally:
        server.close()
    assert result.returncode == 0 and result.stdout == b"six", result.stderr


# -- listen mode ----------------------------------------------------------------------------------

def ready_port(path: Path) -> int:
    wait_for(path.exists, "--ready-file")
    return int(path.read_text().strip().rsplit(":", 1)[1])


def test_listen_against_nc_openbsd(need: Callable[..., str], tmp_path: Path) -> None:
    nc = need("nc.openbsd", "netcat-openbsd")
    ready = tmp_path / "ready"
    with hopcat("-u", "-l", "-q", "0", "-v", "--ready-file", str(ready), "127.0.0.1", "0") as server:
        port = ready_port(ready)
        with peer([nc, "-u", "127.0.0.1", str(port)]) as client:
            assert client.stdin is not None and server.stdin is not None
            client.stdin.write(b"hi\n")
            client.stdin.flush()
            assert read_line(server.stdout, "hopcat -u -l") == b"hi\n"
            server.stdin.write(b"back\n")
            server.stdin.close()
            server.stdin = None
            code, _out, err = finish(server)
            assert read_line(client.stdout, "nc") == b"back\n"
    assert code == 0, err
    assert b"locked on to it" in err


def test_listen_locks_on_to_the_first_sender(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with hopcat("-u", "-l", "-W", "2", "--ready-file", str(ready), "127.0.0.1", "0") as server:
        port = ready_port(ready)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            # The stranger's datagram may be queued before hopcat locks on (then hopcat drops
            # it) or arrive after (then the kernel does): either way it is not relayed.
            first.sendto(b"1", ("127.0.0.1", port))
            other.sendto(b"stranger", ("127.0.0.1", port))
            time.sleep(0.2)
            first.sendto(b"2", ("127.0.0.1", port))
            code, out, err = finish(server)
    assert (code, out) == (0, b"12"), err


def test_listen_keep_open_takes_every_sender_and_answers_the_latest(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with hopcat("-u", "-l", "-k", "-v", "--ready-file", str(ready), "127.0.0.1", "0") as server:
        port = ready_port(ready)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two:
            one.sendto(b"a", ("127.0.0.1", port))
            assert read_line(server.stdout, "hopcat") == b"a"
            two.sendto(b"b", ("127.0.0.1", port))
            assert read_line(server.stdout, "hopcat") == b"b"
            assert server.stdin is not None
            server.stdin.write(b"to-two")
            server.stdin.flush()
            two.settimeout(TIMEOUT_S)
            assert two.recvfrom(100)[0] == b"to-two"
        server.terminate()
        code, _out, err = finish(server)
    assert code == 143, err


# -- usage ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["-W", "1", "127.0.0.1", "9"], "-W is for UDP: add -u"),
        (["-b", "127.0.0.1", "9"], "-b is for UDP: add -u"),
        (["-u", "-W", "0", "127.0.0.1", "9"], "-W takes a positive number"),
        (["-u", "--tls", "127.0.0.1", "9"], "-u does not take --tls"),
        (["-u", "-x", "http://127.0.0.1:1", "127.0.0.1", "9"], "UDP goes through SOCKS5 only"),
        (["-u", "-x", "socks4a://127.0.0.1:1", "127.0.0.1", "9"], "UDP goes through SOCKS5 only"),
        (["-u", "-p", "5000", "-x", "socks5h://127.0.0.1:1", "127.0.0.1", "9"],
         "-u through a proxy: -p is not supported"),
        (["-u", "-b", "-x", "socks5h://127.0.0.1:1", "127.0.0.1", "9"],
         "-u through a proxy: -b is not supported"),
        (["-u", "127.0.0.1"], "-u: expected HOST PORT"),
    ],
)
def test_usage_errors(argv: list[str], words: str) -> None:
    result = run_hopcat(*argv, timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 64 and words in err and err.count("\n") == 1, err


# -- -z -u ----------------------------------------------------------------------------------------

def test_scan_udp_open_closed_and_silent() -> None:
    answering = Echo()
    silent = Echo(answer=False)
    closed = closed_udp_port()
    try:
        ports = ",".join(str(p) for p in sorted((answering.port, silent.port, closed)))
        result = run_hopcat("-z", "-u", "-vv", "-w", "0.5", "127.0.0.1", ports, timeout=30)
    finally:
        answering.close()
        silent.close()
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert f"Connection to 127.0.0.1 {answering.port} port [udp/" in err
    assert f"hopcat: udp 127.0.0.1 port {silent.port}: no answer [open|filtered]" in err
    assert f"port {closed} (udp) failed: port unreachable [closed]" in err
    assert silent.sizes == [0]  # one empty datagram, as the probe


def test_scan_udp_only_closed_ports_is_exit_1() -> None:
    result = run_hopcat("-z", "-u", "127.0.0.1", str(closed_udp_port()), timeout=30)
    assert result.returncode == 1 and result.stderr == b""


def test_scan_udp_through_a_proxy_is_refused() -> None:
    result = run_hopcat("-z", "-u", "-x", "socks5h://127.0.0.1:1080", "127.0.0.1", "53",
                        timeout=30)
    assert result.returncode == 64 and b"-z -u through a proxy" in result.stderr


def test_broadcast_needs_b() -> None:
    # 127.255.255.255 is the loopback network's broadcast address: nothing leaves the host.
    refused = run_hopcat("-u", "-q", "0", "127.255.255.255", "9", input=b"x", timeout=30)
    assert refused.returncode == 69 and b"needs -b" in refused.stderr, refused.stderr
    allowed = run_hopcat("-u", "-b", "-q", "0", "-v", "127.255.255.255", "9", input=b"x",
                         timeout=30)
    assert allowed.returncode == 0 and b"sent 1 datagram (1 bytes)" in allowed.stderr


# -- through SOCKS5 (UDP ASSOCIATE): Dante, and hopcat serve --------------------------------------

THROUGH_SIZES = [1, 1200, 8192, 60000]


@pytest.mark.parametrize("proxy", ["danted_udp", "danted_udp_auth", "serve"])
def test_through_socks5_each_read_is_one_datagram(
    request: pytest.FixtureRequest, echo: Echo, proxy: str
) -> None:
    env = clean_env()
    if proxy == "serve":
        server = request.getfixturevalue("serve")()
        url = f"socks5h://{server.host}:{server.port}"
    else:
        daemon = request.getfixturevalue(proxy)
        url = daemon.url_as("socks5h", auth=False)
        if daemon.username:
            user = daemon.username
            url = url.replace("socks5h://", f"socks5h://{user}@")
            env["HOPCAT_PROXY_PASSWORD"] = daemon.password
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, hopcat("-u", "-W", str(len(THROUGH_SIZES)), "-v", "-x", url, echo.host,
                              str(echo.port), stdin=theirs.fileno(), env=env) as client:  # fmt: skip
        theirs.close()
        for size in THROUGH_SIZES:
            ours.send(bytes([size % 251]) * size)
            wait_for(lambda size=size: size in echo.sizes, f"a datagram of {size} bytes")  # type: ignore[misc]
        code, out, err = finish(client)
    assert code == 0, err
    assert echo.sizes == THROUGH_SIZES
    assert out == b"".join(bytes([size % 251]) * size for size in THROUGH_SIZES)
    assert b"UDP association: datagrams go to the relay" in err
    if proxy == "danted_udp_auth":
        assert request.getfixturevalue(proxy).password.encode() not in err


def test_through_socks5_the_proxy_ending_the_association_is_one_line(
    echo: Echo, tmp_path: Path
) -> None:
    import peers

    daemon = peers.start_danted(tmp_path, udp=True)
    try:
        with hopcat("-u", "-x", daemon.url_as("socks5h"), echo.host, str(echo.port)) as client:
            assert client.stdin is not None
            client.stdin.write(b"one")
            client.stdin.flush()
            wait_for(lambda: echo.sizes == [3], "the first datagram")
            daemon.stop()
            code, _out, err = finish(client)
    finally:
        daemon.stop()
    assert code == 74 and err.count(b"\n") == 1, err
    assert b"the proxy ended the UDP association" in err


def test_q_ends_it_under_a_steady_stream(tmp_path: Path) -> None:
    """-q's end comes on time however busy the socket is (it was checked only when a poll
    found nothing)."""
    ready = tmp_path / "ready"
    with hopcat("-u", "-l", "-k", "-q", "0.5", "--ready-file", str(ready), "127.0.0.1", "0",
                stdin=subprocess.DEVNULL) as server:  # fmt: skip
        port = ready_port(ready)
        stop = threading.Event()

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                while not stop.is_set():
                    sender.sendto(b"busy", ("127.0.0.1", port))
                    time.sleep(0.0005)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        started = time.monotonic()
        try:
            assert server.stdout is not None
            while server.poll() is None and time.monotonic() - started < 10:
                os.read(server.stdout.fileno(), 65536)  # keep stdout drained
        finally:
            stop.set()
            flooder.join(5)
        code, _out, err = finish(server)
    assert code == 0, err
    assert time.monotonic() - started < 5
