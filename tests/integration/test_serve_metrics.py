"""``hopcat serve --metrics``: the Prometheus text format, parsed strictly, and counts that match
what the test did, with one process and with --workers 2."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable

import peers
import pytest
from test_serve_support import ServeProcess, connect, recv_until_eof, socks5_connect

from support import HOPCAT, clean_env, closed_port, pattern

Serve = Callable[..., ServeProcess]
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"({NAME})(?:\{{(.*)\}})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Text format 0.0.4, strictly: HELP and TYPE once per family and before its samples,
    counters named *_total, histograms with cumulative buckets ending in +Inf == _count."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: Samples = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helped, line
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in TYPES and name not in types and name in helped, line
            types[name] = kind
            continue
        assert not line.startswith("#") and line.strip(), line
        match = SAMPLE.fullmatch(line)
        assert match, line
        name, label_text, value = match.groups()
        labels: list[tuple[str, str]] = []
        if label_text is not None:
            end = 0
            while end < len(label_text):
                label = LABEL.match(label_text, end)
                assert label, line
                labels.append((label[1], label[2]))
                end = label.end()
        family = name
        if family not in types:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in types, f"no TYPE before {line}"
        if types[family] == "counter":
            assert name.endswith("_total"), line
        key = (name, tuple(labels))
        assert key not in samples, f"duplicate {line}"
        samples[key] = float(value)
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets = [(dict(k[1])["le"], v) for k, v in samples.items() if k[0] == f"{family}_bucket"]
        assert buckets and buckets[-1][0] == "+Inf", family
        values = [v for _, v in buckets]
        assert values == sorted(values), family
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1]), family
        assert samples[(f"{family}_count", ())] == values[-1]
        assert (f"{family}_sum", ()) in samples
    return types, samples


def metrics_url(server: ServeProcess) -> str:
    match = re.search(r"event=metrics address=(\S+)", server.log())
    assert match, server.log()
    return match[1]


def scrape(server: ServeProcess) -> tuple[dict[str, str], Samples]:
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(labels.items()))]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_counts_match_what_was_done(
    serve: Serve, digest_server: peers.DigestServer, workers: str
) -> None:
    with closed_port() as denied_port:
        server = serve("--workers", workers, "--metrics", "127.0.0.1:0", "--auth", "alice:s3cret",
                       "--deny", f"127.0.0.1:{denied_port}")  # fmt: skip
        tunnels = 9
        sent = 0
        for i in range(tunnels):
            data = pattern(3000 + 997 * i, i)
            with connect(server) as sock:
                assert socks5_connect(sock, digest_server.host, digest_server.port,
                                      user="alice", password="s3cret") == 0  # fmt: skip
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == digest_server.answer_for(data)
            sent += len(data)
        with connect(server) as sock:
            assert socks5_connect(sock, "127.0.0.1", denied_port, user="alice",
                                  password="s3cret") == 2  # fmt: skip
        with connect(server) as sock:
            assert socks5_connect(sock, digest_server.host, digest_server.port, user="alice",
                                  password="wrong") == -2  # fmt: skip
        server.wait_log("event=tunnel", count=tunnels + 2)
        types, samples = scrape(server)
    assert value(samples, "hopcat_tunnels_total", result="ok") == tunnels
    assert value(samples, "hopcat_tunnels_total", result="denied") == 1
    assert value(samples, "hopcat_tunnels_total", result="auth-failed") == 1
    assert sum(v for k, v in samples.items() if k[0] == "hopcat_tunnels_total") == tunnels + 2
    assert value(samples, "hopcat_auth_failures_total") == 1
    assert value(samples, "hopcat_rule_denials_total", rule="destination") == 1
    assert value(samples, "hopcat_rule_denials_total", rule="client") == 0
    assert value(samples, "hopcat_bytes_total", direction="up") == sent
    assert value(samples, "hopcat_bytes_total", direction="down") == tunnels * 65
    assert value(samples, "hopcat_handshake_seconds_count") == tunnels + 1
    assert value(samples, "hopcat_connect_seconds_count") == tunnels
    assert 0 < value(samples, "hopcat_connect_seconds_sum") < tunnels * 5
    assert all(v == 0 for k, v in samples.items() if k[0] == "hopcat_open_tunnels")
    assert value(samples, "hopcat_accept_backoffs_total") == 0
    assert types["hopcat_open_tunnels"] == "gauge"
    assert types["hopcat_handshake_seconds"] == "histogram"
    assert ("hopcat_worker_restarts_total" in types) == (workers == "2")
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        text = response.read().decode()
    assert "alice" not in text and "s3cret" not in text and "127.0.0.1" not in text


def test_open_tunnels_and_restarts_with_workers(
    serve: Serve, banner_server: peers.BannerServer, digest_server: peers.DigestServer
) -> None:
    server = serve("--workers", "2", "--metrics", "127.0.0.1:0")
    with connect(server) as tunnel:
        assert socks5_connect(tunnel, banner_server.host, banner_server.port) == 0
        assert value(scrape(server)[1], "hopcat_open_tunnels", protocol="socks5") == 1
    for i in range(4):
        with connect(server) as sock:
            assert socks5_connect(sock, digest_server.host, digest_server.port) == 0
            sock.sendall(b"x" * i)
            sock.shutdown(socket.SHUT_WR)
            recv_until_eof(sock)
    server.wait_log("event=tunnel", count=5)
    pid = int(re.findall(r"event=listen worker=1 .* pid=(\d+)", server.log())[0])
    os.kill(pid, signal.SIGKILL)
    server.wait_log("event=listen worker=1", count=2)
    samples = scrape(server)[1]
    assert value(samples, "hopcat_worker_restarts_total") == 1
    assert value(samples, "hopcat_tunnels_total", result="ok") == 4  # kept across the restart
    assert value(samples, "hopcat_open_tunnels", protocol="socks5") == 0


def test_only_get_metrics(serve: Serve) -> None:
    server = serve("--metrics", "127.0.0.1:0")
    base = metrics_url(server).removesuffix("/metrics")
    for path, method in (("/", "GET"), ("/metrics/x", "GET"), ("/metrics", "POST"),
                         ("/metrics", "HEAD")):  # fmt: skip
        data = b"" if method == "POST" else None
        request = urllib.request.Request(base + path, method=method, data=data)
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=10)
        assert failure.value.code == 404, (path, method)
        failure.value.close()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n")
        assert recv_until_eof(sock) == b""  # an overlong line: closed, nothing served
    assert scrape(server)[1]  # still serving, and the proxy too
    assert server.proc.poll() is None


def test_metrics_beyond_loopback_needs_allow_open() -> None:
    proc = subprocess.run([*HOPCAT, "serve", "--metrics", "0.0.0.0:0"], capture_output=True,
                          text=True, timeout=30, env=clean_env())  # fmt: skip
    assert proc.returncode == 64 and "--allow-open" in proc.stderr


def test_metrics_address_needs_a_port() -> None:
    # Without one it would take the proxy's default port (1080) and clash with the proxy.
    proc = subprocess.run([*HOPCAT, "serve", "--metrics", "localhost"], capture_output=True,
                          text=True, timeout=30, env=clean_env())  # fmt: skip
    assert proc.returncode == 64 and "needs a port" in proc.stderr
