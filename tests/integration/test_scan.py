"""``hopcat -z HOST PORTS``: nc's port scan, against real ports on loopback: listening (open),
bound but not listening (closed: refused), and a listener whose accept queue is full (silent:
Linux drops the SYNs, so the connect times out: filtered). Direct, through Dante, microsocks and
``hopcat serve``, and side by side with nc.openbsd."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import peers
import pytest

from support import HOPCAT, clean_env, run_hopcat, silent_listener

LINE = re.compile(
    r"^(?:Connection to 127\.0\.0\.1 (?P<open>\d+) port \[tcp/[^\]]+\] succeeded!"
    r"|hopcat: connect to 127\.0\.0\.1 port (?P<port>\d+) \(tcp\) .* \[(?P<state>\w+)\])$"
)
TIMEOUT = "0.5"


class Ports:
    def __init__(self) -> None:
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        self.open = sorted(sock.getsockname()[1] for sock in self.listeners)
        self.bound: list[socket.socket] = []
        for _ in range(2):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.bound.append(sock)
        self.closed = sorted(sock.getsockname()[1] for sock in self.bound)
        self.silent_listener, self.fillers, port = silent_listener()
        self.silent = [port]

    @property
    def spec(self) -> str:
        return ",".join(str(port) for port in self.open + self.closed + self.silent)

    def close(self) -> None:
        for sock in [*self.listeners, *self.bound, self.silent_listener, *self.fillers]:
            sock.close()


@pytest.fixture(scope="module")
def ports() -> Iterator[Ports]:
    made = Ports()
    yield made
    made.close()


def states(stderr: bytes) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"open": [], "closed": [], "filtered": [], "failed": []}
    for line in stderr.decode().splitlines():
        match = LINE.match(line)
        assert match, line
        if match["open"]:
            found["open"].append(int(match["open"]))
        else:
            found[match["state"]].append(int(match["port"]))
    return found


def scan(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return run_hopcat("-z", "--connect-timeout", TIMEOUT, *args, timeout=timeout)


def test_exact_lists_in_port_order(ports: Ports) -> None:
    result = scan("-vv", "127.0.0.1", ports.spec)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    found = states(result.stderr)
    assert found == {"open": ports.open, "closed": ports.closed, "filtered": ports.silent,
                     "failed": []}  # fmt: skip
    printed = [int(m) for m in re.findall(rb" (\d+) (?:port|\(tcp\))", result.stderr)]
    assert printed == sorted(printed)


def test_quiet_without_v_and_exit_code_as_nc(ports: Ports) -> None:
    result = scan("127.0.0.1", ports.spec)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    result = scan("127.0.0.1", ",".join(map(str, ports.closed + ports.silent)))
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")
    result = scan("-v", "127.0.0.1", ports.spec)
    assert states(result.stderr)["open"] == ports.open
    assert b"refused" not in result.stderr


def test_every_range_syntax(ports: Ports) -> None:
    first, second, third = ports.open
    ours = set(ports.open + ports.closed + ports.silent)
    for argv in (
        [f"{first}-{first + 2},{second},{third},{third}"],  # ranges and lists in one operand
        [f"{first}-{first + 2}", str(second), f"{third},{third}"],  # a repeat is scanned once
        [f"{first}-{first}", f"{second}-{second}", f"{third}"],
    ):
        for order in ([], ["-r"]):  # -r shuffles the probes, never the output
            result = scan("-v", *order, "127.0.0.1", *argv)
            assert result.returncode == 0, result.stderr
            found = states(result.stderr)["open"]
            assert found == sorted(found)
            assert [port for port in found if port in ours] == ports.open


@pytest.mark.parametrize("spec", ["0", "65536", "99999999", "5-3", "", "1,,2", ",22", "x", "1-",
                                  "-5", "22-x", "1-2-3", " 22", "\uff12\uff12"])  # fmt: skip
def test_bad_ranges_exit_64_with_one_line(spec: str) -> None:
    result = run_hopcat("-z", "--", "127.0.0.1", spec)  # "--": "-5" is an operand
    assert result.returncode == 64, result.stderr
    assert result.stderr.count(b"\n") == 1 and result.stderr.startswith(b"hopcat: ")


def test_scan_options_need_z_and_valid_values() -> None:
    for argv in (["-r"], ["--max-parallel", "4"]):
        result = run_hopcat(*argv, "127.0.0.1", "1")
        assert result.returncode == 64 and b"-z" in result.stderr, result.stderr
    for argv in (["--max-parallel", "0"], ["--max-parallel", "x"], ["-i", "-1"], ["-l"], ["-U"],
                 ["-e", "cat"], ["-p", "5000"], ["-F"], ["-s", "127.0.0.1"]):  # fmt: skip
        result = run_hopcat("-z", *argv, "127.0.0.1", "1")
        assert result.returncode == 64 and result.stderr.count(b"\n") == 1, result.stderr


def test_bounded_parallelism_and_interval(ports: Ports) -> None:
    result = scan("-vv", "--max-parallel", "1", "127.0.0.1", ports.spec)
    assert states(result.stderr)["open"] == ports.open
    started = time.monotonic()
    result = scan("-v", "-i", "0.2", "127.0.0.1", ",".join(map(str, ports.open)))
    assert time.monotonic() - started >= 0.4  # two gaps between three ports
    assert states(result.stderr)["open"] == ports.open


def test_a_wide_range_is_quick_and_exact(ports: Ports) -> None:
    low = min(ports.open + ports.closed) - 500
    high = max(ports.open + ports.closed) + 500
    low, high = max(low, 1), min(high, 65535)
    started = time.monotonic()
    result = scan("-v", "127.0.0.1", f"{low}-{high}")
    assert result.returncode == 0, result.stderr
    found = set(states(result.stderr)["open"])
    assert set(ports.open) <= found
    assert not found & set(ports.closed + ports.silent)
    assert time.monotonic() - started < 15


def test_same_answers_as_nc_openbsd(ports: Ports, need: Callable[..., str]) -> None:
    nc = need("nc.openbsd", "netcat-openbsd")
    port = ports.open[0]
    span = f"{port - 2}-{port + 2}"
    theirs = subprocess.run([nc, "-zvv", "-w", "1", "127.0.0.1", span], capture_output=True,
                            timeout=30, env=clean_env())  # fmt: skip
    ours = scan("-vv", "127.0.0.1", span)
    assert ours.returncode == theirs.returncode
    # Same lines, ours with the state at the end and hopcat's name in front.
    theirs_lines = theirs.stderr.decode().replace(f"{nc.rsplit('/', 1)[-1]}: ", "").splitlines()
    ours_lines = [re.sub(r" \[\w+\]$", "", line.removeprefix("hopcat: "))
                  for line in ours.stderr.decode().splitlines()]  # fmt: skip
    assert ours_lines == theirs_lines


# -- through proxies: each port is one CONNECT; the proxy's reply says open, closed or filtered --


@pytest.fixture
def serve_url(serve: Callable[..., Any]) -> str:
    # A short connect timeout: the silent port leaves serve connecting when the scan gives up.
    return str(serve("--connect-timeout", "1", "--grace", "0").url("socks5"))


@pytest.mark.parametrize("proxy", ["danted", "microsocks", "serve_url"])
def test_through_proxies(ports: Ports, proxy: str, request: pytest.FixtureRequest) -> None:
    value = request.getfixturevalue(proxy)
    url = value if isinstance(value, str) else value.url
    result = scan("-vv", "-x", url, "127.0.0.1", ports.spec)
    assert result.returncode == 0, result.stderr
    found = states(result.stderr)
    assert found == {"open": ports.open, "closed": ports.closed, "filtered": ports.silent,
                     "failed": []}, result.stderr  # fmt: skip
    assert b"(socks5 reply 5)" in result.stderr


def test_a_chain_of_two(ports: Ports, danted: peers.Daemon, microsocks: peers.Daemon) -> None:
    result = scan("-vv", "-x", danted.url, "-x", microsocks.url, "127.0.0.1", ports.spec)
    found = states(result.stderr)
    assert found["open"] == ports.open and found["closed"] == ports.closed, result.stderr


def test_an_unreachable_proxy_stops_the_scan_with_its_code(ports: Ports) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        url = f"socks5h://127.0.0.1:{dead.getsockname()[1]}"
        result = scan("-vv", "-x", url, "127.0.0.1", ports.spec)
    assert result.returncode == 80, result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr


def test_interrupted_scan_is_one_line(ports: Ports) -> None:
    with subprocess.Popen([*HOPCAT, "-zvv", "--connect-timeout", "30", "127.0.0.1",
                           str(ports.silent[0])], stderr=subprocess.PIPE, env=clean_env()) as proc:
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert err == b"hopcat: interrupted (SIGINT)\n"


def test_through_an_http_proxy_refused_is_failed(ports: Ports, tinyproxy_shared: peers.Daemon) -> None:
    """tinyproxy answers 500 to a refusal and to other failures alike: open or not, no more."""
    result = scan("-vv", "-x", tinyproxy_shared.url, "127.0.0.1", ports.spec)
    assert result.returncode == 0, result.stderr
    found = states(result.stderr)
    assert found == {"open": ports.open, "closed": [], "filtered": ports.silent,
                     "failed": ports.closed}, result.stderr  # fmt: skip
    assert b"(http reply 500)" in result.stderr
