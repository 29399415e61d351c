"""TLS through proxies and TLS hops (issue 11), against real peers: ``--tls`` to a TLS target
through Dante, tinyproxy and a chain of both; TLS hops made of independent TLS terminators in
front of real proxies (stunnel4 in front of Dante: ``socks5+tls://``, ``socks4+tls://``; socat's
OPENSSL-LISTEN in front of tinyproxy: ``https://``); chains with two TLS hops, with and without
TLS to the target inside them (three sessions, each inside the one before); ssh through hopcat
through an https:// proxy and a SOCKS5-over-TLS one; and the errors on the way.

The target is ``socat OPENSSL-LISTEN ... EXEC:cat`` (or plain ``TCP-LISTEN``): it echoes, so one
run checks every byte both ways by SHA-256, and it ends only after hopcat's close_notify (cat's
stdin ends, cat ends, socat sends its own): the TLS half-close through every chain.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
import tls_peers
from tls_peers import BioSession, TLSFiles, py_tls_server

from support import HOPCAT, clean_env, pattern, run_hopcat, sha256

SIZE = 2 << 20
ECHO = pattern(SIZE, 21)


def _start(name: str, directory: Path, make_argv: Callable[[int], list[str]]) -> tls_peers.Program:
    try:
        return tls_peers.Program(name, directory, make_argv, stdin=Path("/dev/null"))
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def echo_targets(tls: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """{"tls": port, "plain": port}: echo servers (socat forking a cat per connection)."""
    socat = peers.require_program("socat", "socat")
    directory = tmp_path_factory.mktemp("echo")
    secure = _start("echo-tls", directory,
                    lambda port: [socat, tls.socat_listen(port, "fork"), "EXEC:cat"])
    plain = _start("echo-plain", directory, lambda port: [
        socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"])  # fmt: skip
    yield {"tls": secure.port, "plain": plain.port}
    secure.stop()
    plain.stop()


@pytest.fixture(scope="module")
def tls_hops(
    tls: TLSFiles, danted: peers.Daemon, socat_https: peers.Daemon,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, int]]:  # fmt: skip
    """{"stunnel-dante": port, "socat-tinyproxy": port}: TLS terminators in front of proxies."""
    stunnel = peers.require_program("stunnel4", "stunnel4")
    directory = tmp_path_factory.mktemp("tls-hops")

    def stunnel_argv(port: int) -> list[str]:
        config = directory / "stunnel.conf"
        config.write_text(
            "foreground = yes\npid =\ndebug = warning\n[socks]\n"
            f"accept = 127.0.0.1:{port}\nconnect = {danted.hostport}\n"
            f"cert = {tls.cert}\nkey = {tls.key}\n"
        )
        return [stunnel, str(config)]

    in_front_of_dante = _start("stunnel", directory, stunnel_argv)
    yield {"stunnel-dante": in_front_of_dante.port,
           "socat-tinyproxy": socat_https.port}  # fmt: skip
    in_front_of_dante.stop()


def _echo_through(args: list[str], port: int, tmp_path: Path, *, verbose: bool = False) -> str:
    """hopcat ARGS 127.0.0.1 PORT with ECHO on stdin: every byte back, exit 0; its stderr."""
    source = tmp_path / "up"
    source.write_bytes(ECHO)
    with source.open("rb") as stdin:
        result = subprocess.run(
            [*HOPCAT, *(["-v"] if verbose else []), *args, "127.0.0.1", str(port)],
            stdin=stdin, capture_output=True, timeout=60, env=clean_env(),
        )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert len(result.stdout) == len(ECHO) and sha256(result.stdout) == sha256(ECHO), err
    return err


# -- --tls to the target through plain proxies ---------------------------------------------------


@pytest.mark.parametrize("route", ["dante", "tinyproxy", "dante+tinyproxy"])
def test_tls_to_the_target_through_proxies(
    tls: TLSFiles, echo_targets: dict[str, int], danted: peers.Daemon,
    tinyproxy_shared: peers.Daemon, tmp_path: Path, route: str,
) -> None:  # fmt: skip
    hops = {"dante": ["-x", danted.url], "tinyproxy": ["-x", tinyproxy_shared.url]}
    args = [arg for name in route.split("+") for arg in hops[name]]
    err = _echo_through([*args, "--tls", "--tls-ca", str(tls.ca)], echo_targets["tls"], tmp_path,
                        verbose=True)  # fmt: skip
    assert f"TLS with the target 127.0.0.1:{echo_targets['tls']} in " in err, err
    assert "sent TLS close_notify" in err


# -- TLS hops ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hops", "target_tls"), [
    (["socks5+tls://stunnel-dante"], True),
    (["socks4+tls://stunnel-dante"], True),
    (["socks5h+ssl://stunnel-dante"], False),  # pproxy's spelling
    (["https://socat-tinyproxy"], True),  # TLS in TLS
    (["http+tls://socat-tinyproxy"], True),
    (["https://socat-tinyproxy", "socks5h+tls://stunnel-dante"], True),  # three sessions
    (["socks5+tls://stunnel-dante", "https://socat-tinyproxy"], True),
    (["https://socat-tinyproxy", "socks5h+tls://stunnel-dante"], False),
], ids=lambda value: "+".join(value) if isinstance(value, list) else ("tls" if value else "plain"))  # fmt: skip
def test_tls_hops(
    tls: TLSFiles, echo_targets: dict[str, int], tls_hops: dict[str, int], tmp_path: Path,
    hops: list[str], target_tls: bool,
) -> None:  # fmt: skip
    """Without TLS to the target, our close_notify to the innermost hop becomes its FIN to the
    proxy behind it: that is Dante here (tinyproxy drops the tunnel at a FIN: PEERS.md)."""
    args = ["--proxy-cacert", str(tls.ca)]
    for hop in hops:
        scheme, name = hop.split("://")
        args += ["-x", f"{scheme}://127.0.0.1:{tls_hops[name]}"]
    if target_tls:
        args += ["--tls", "--tls-ca", str(tls.ca)]
    err = _echo_through(args, echo_targets["tls" if target_tls else "plain"], tmp_path,
                        verbose=True)  # fmt: skip
    assert "sent TLS close_notify" in err, err
    if target_tls:
        assert "TLS with the target" in err


def test_hopcat_serve_tls_listener_among_independent_tls_hops(
    tls: TLSFiles, echo_targets: dict[str, int], tls_hops: dict[str, int], tmp_path: Path
) -> None:
    """hopcat serve's tls:// listener as the middle of three TLS hops (socat, serve, stunnel),
    TLS to the target inside all of them: four sessions."""
    from test_serve_support import ServeProcess

    server = ServeProcess(tmp_path / "serve", "--tls-cert", str(tls.cert), "--tls-key",
                          str(tls.key), listen=("tls://127.0.0.1:0",))  # fmt: skip
    try:
        serve_hop = server.addresses[0].removeprefix("tls://")
        args = ["--proxy-cacert", str(tls.ca),
                "-x", f"https://127.0.0.1:{tls_hops['socat-tinyproxy']}",
                "-x", f"socks5h+tls://{serve_hop}",
                "-x", f"socks5+tls://127.0.0.1:{tls_hops['stunnel-dante']}",
                "--tls", "--tls-ca", str(tls.ca)]  # fmt: skip
        err = _echo_through(args, echo_targets["tls"], tmp_path, verbose=True)
        assert "hop 3/3: TLS TLSv1.3" in err and "TLS with the target" in err, err
    finally:
        server.stop()
    assert "Traceback" not in server.log()


# -- ssh through TLS hops ------------------------------------------------------------------------


@pytest.mark.parametrize("hop", ["https://socat-tinyproxy", "socks5h+tls://stunnel-dante"])
def test_ssh_through_a_tls_hop(
    tls: TLSFiles, tls_hops: dict[str, int], sshd: peers.SshServer, peer_env: dict[str, str],
    hop: str,
) -> None:  # fmt: skip
    scheme, name = hop.split("://")
    command = shlex.join([sys.executable, "-m", "hopcat", "--proxy-cacert", str(tls.ca), "-x",
                          f"{scheme}://127.0.0.1:{tls_hops[name]}", "%h", "%p"])  # fmt: skip
    up = pattern(4 << 20, 22)
    result = subprocess.run(
        [*sshd.ssh_argv("-o", f"ProxyCommand={command}"), "sha256sum"], input=up,
        capture_output=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == sha256(up)


# -- errors through chains -----------------------------------------------------------------------


def test_target_certificate_failure_through_a_tls_hop_is_82(
    tls: TLSFiles, echo_targets: dict[str, int], tls_hops: dict[str, int]
) -> None:
    port = echo_targets["tls"]
    result = run_hopcat("--proxy-cacert", str(tls.ca), "-x",
                        f"socks5+tls://127.0.0.1:{tls_hops['stunnel-dante']}", "--tls", "127.0.0.1",
                        str(port), timeout=30)  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 82, err
    assert err == (f"hopcat: TLS with the target 127.0.0.1:{port}: certificate not trusted: "
                   "unable to get local issuer certificate (--tls-ca FILE to trust its CA, "
                   "--tls-insecure to skip the check)\n")  # fmt: skip


@pytest.mark.parametrize("hop", ["https://socat-tinyproxy", "socks5+tls://stunnel-dante"])
def test_hop_certificate_failure_is_76(
    tls: TLSFiles, echo_targets: dict[str, int], tls_hops: dict[str, int], hop: str
) -> None:
    scheme, name = hop.split("://")
    url = f"{scheme}://127.0.0.1:{tls_hops[name]}"
    result = run_hopcat("-x", url, "--tls", "--tls-ca", str(tls.ca), "127.0.0.1",
                        str(echo_targets["tls"]), timeout=30)  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 76, err
    assert err.startswith(f"hopcat: proxy {url} (hop 1/1): TLS certificate not trusted"), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_record_from_a_tls_hop_mid_stream_is_76(tls: TLSFiles) -> None:
    """An https:// proxy that answers CONNECT, relays 1000 bytes, then breaks its session."""
    with socket.create_server(("127.0.0.1", 0)) as target:

        def proxy(session: BioSession) -> None:
            head = bytearray()
            while b"\r\n\r\n" not in head:
                head += session.recv()
            session.send(b"HTTP/1.1 200 Connection established\r\n\r\n" + b"y" * 1000)
            session.sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
            while session.sock.recv(65536):
                pass

        with py_tls_server(tls.server_context(), proxy) as server:
            url = f"https://127.0.0.1:{server.port}"
            result = run_hopcat("--proxy-cacert", str(tls.ca), "-x", url, "127.0.0.1",
                                str(target.getsockname()[1]), timeout=30)  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 76, err
    assert result.stdout == b"y" * 1000
    assert err == (f"hopcat: TLS with proxy {url}: decryption failed or bad record mac "
                   "mid-stream (after 1000 bytes received)\n")  # fmt: skip

