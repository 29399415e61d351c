"""Fixtures for the integration tests: real peers and pure-Python targets on loopback.

Everything is implemented in ``peers.py`` (see its docstring for the half-close behaviour of each
proxy and the quirks found). A fixture whose program is missing (or that needs root or IPv6 that
is not there) skips with a reason such as ``danted not installed (apt-get install dante-server)``.
When a test fails, the logs of the daemons and the records of the targets it used are attached to
the report.

Targets (function scope; ``*_v6`` listen on ::1)::

    digest_server[_v6]   DigestServer: read to EOF, answer sha256 hex + "\\n"
    banner_server[_v6]   BannerServer: speaks first, then echoes to EOF
    framed_echo[_v6]     FramedEcho: 8-byte length + payload -> 32-byte sha256
    http_target[_v6]     HttpTarget: GET -> fixed body (for curl)
    udp_echo             UdpEcho: each UDP datagram back to its sender
    source_server        factory: source_server(data, host="127.0.0.1", half_close_only=False)
    target_factory       factory: target_factory(peers.BannerServer, b"hi", host="::1")

Daemons (each a peers.Daemon: .host .port .hostport .url .url_as(scheme) .username .password
.log() .pid)::

    danted, danted_auth, danted_v6        session  socks5 (also socks4); auth = username/password
    danted_udp, danted_udp_auth           session  the same with UDP ASSOCIATE (udpassociate udpreply)
    microsocks, microsocks_auth, microsocks_v6      function  socks5
    tinyproxy, tinyproxy_auth, tinyproxy_v6         function  http (CONNECT)
    microsocks_shared, tinyproxy_shared, tinyproxy_auth_shared
                                          session  the same, for tests that only open tunnels
    ncat_http, ncat_http_auth, ncat_http_v6         function  http (CONNECT)
    sshd                                  session  peers.SshServer: .ssh_argv(*opts) .destination
    ssh_socks                             session  ssh -N -D against sshd: socks5/socks4/socks4a
    socat_https, socat_socks_tls          session  socat's TLS (``certificates``) in front of
                                          tinyproxy_shared (https) and danted (socks5h+tls)

TLS (session): ``certificates`` (support.Certificates: a test CA, a certificate it signed for
127.0.0.1 and localhost, its key) and ``tls`` (tls_peers.TLSFiles: the same, and the wrong-name,
expired, client and other-CA files). Module-scoped targets for tests that share them:
``digest_target`` (DigestServer) and ``bulk_source`` ((SourceServer, its 4 MiB)).

Our own server: ``serve`` (function) is a factory: ``serve(*args)`` starts ``hopcat serve
127.0.0.1:0 *args`` and returns a ``test_serve_support.ServeProcess``.

Helpers: ``peer_env`` (environment without proxy variables), ``need(program)`` (path or skip).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
import tls_peers
from corporate_peers import (  # noqa: F401  (session fixtures, defined once for every module)
    AuthProxy,
    apache_digest,
    samba_ntlm,
    samba_winbind,
    squid_acl_443,
    squid_basic,
    squid_digest,
    squid_multi,
    squid_negotiate,
    squid_negotiate_wrapper_only,
    squid_ntlm_fake,
    squid_ntlm_fake_close,
)
from kdc import krb5_realm  # noqa: F401  (a session fixture, shared by every module)
from test_serve_support import ServeProcess, serve_factory

from support import Certificates, make_certificates, pattern

# --------------------------------------------------------------------------- helpers


def _start(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except peers.PeerUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def peer_env() -> dict[str, str]:
    """Environment for peer programs (and hopcat subprocesses): no proxy variables."""
    return peers.peer_env()


@pytest.fixture(scope="session")
def need() -> Callable[..., str]:
    """``need("curl")`` -> absolute path, or skip "curl not installed (apt-get install curl)"."""

    def need(program: str, package: str | None = None) -> str:
        return str(_start(peers.require_program, program, package))

    return need


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        for name, value in item.funcargs.items():
            if isinstance(value, peers.Daemon):
                report.sections.append((f"{name} log ({value.log_path})", peers._tail(value.log())))
            elif isinstance(value, AuthProxy):
                report.sections.extend(value.report_sections())
            elif isinstance(value, peers._Target):
                report.sections.append((f"{name} connections", "\n".join(map(repr, value.records))))
    return report


# --------------------------------------------------------------------------- targets


@pytest.fixture
def target_factory() -> Iterator[Callable[..., Any]]:
    """Start any peers target class with arguments; all are closed after the test."""
    started: list[Any] = []

    def make(cls: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        target = cls(*args, **kwargs)
        _start(target.start)
        started.append(target)
        return target

    yield make
    for target in reversed(started):
        target.close()


@pytest.fixture
def source_server(target_factory: Callable[..., Any]) -> Callable[..., peers.SourceServer]:
    """``source_server(data, host="127.0.0.1", half_close_only=False)`` -> started SourceServer."""

    def make(data: bytes, host: str = peers.LOOPBACK_V4, **kwargs: Any) -> peers.SourceServer:
        return target_factory(peers.SourceServer, data, host, **kwargs)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def digest_server(target_factory: Callable[..., Any]) -> peers.DigestServer:
    return target_factory(peers.DigestServer)  # type: ignore[no-any-return]


@pytest.fixture
def digest_server_v6(target_factory: Callable[..., Any]) -> peers.DigestServer:
    return target_factory(peers.DigestServer, peers.LOOPBACK_V6)  # type: ignore[no-any-return]


@pytest.fixture
def banner_server(target_factory: Callable[..., Any]) -> peers.BannerServer:
    return target_factory(peers.BannerServer)  # type: ignore[no-any-return]


@pytest.fixture
def banner_server_v6(target_factory: Callable[..., Any]) -> peers.BannerServer:
    return target_factory(peers.BannerServer, host=peers.LOOPBACK_V6)  # type: ignore[no-any-return]


@pytest.fixture
def framed_echo(target_factory: Callable[..., Any]) -> peers.FramedEcho:
    return target_factory(peers.FramedEcho)  # type: ignore[no-any-return]


@pytest.fixture
def framed_echo_v6(target_factory: Callable[..., Any]) -> peers.FramedEcho:
    return target_factory(peers.FramedEcho, peers.LOOPBACK_V6)  # type: ignore[no-any-return]


@pytest.fixture
def udp_echo(target_factory: Callable[..., Any]) -> peers.UdpEcho:
    return target_factory(peers.UdpEcho)  # type: ignore[no-any-return]


@pytest.fixture
def http_target(target_factory: Callable[..., Any]) -> peers.HttpTarget:
    return target_factory(peers.HttpTarget)  # type: ignore[no-any-return]


@pytest.fixture
def http_target_v6(target_factory: Callable[..., Any]) -> peers.HttpTarget:
    return target_factory(peers.HttpTarget, host=peers.LOOPBACK_V6)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- daemons


@contextlib.contextmanager
def _daemon(fn: Callable[..., peers.Daemon], *args: Any, **kwargs: Any) -> Iterator[peers.Daemon]:
    daemon = _start(fn, *args, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()


def _session_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    return factory.mktemp(name)


@pytest.fixture(scope="session")
def danted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    """Dante, no auth, on 127.0.0.1: socks5 (url) and socks4 (url_as("socks4")); not socks4a."""
    with _daemon(peers.start_danted, _session_dir(tmp_path_factory, "danted")) as d:
        yield d


@pytest.fixture(scope="session")
def danted_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    """Dante with ``socksmethod: username`` (system user hopcattest; root only); url has creds."""
    with _daemon(peers.start_danted, _session_dir(tmp_path_factory, "danted-auth"), auth=True) as d:
        yield d


@pytest.fixture(scope="session")
def danted_udp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    """Dante, no auth, on 127.0.0.1, serving UDP ASSOCIATE (and CONNECT) as well."""
    with _daemon(peers.start_danted, _session_dir(tmp_path_factory, "danted-udp"), udp=True) as d:
        yield d


@pytest.fixture(scope="session")
def danted_udp_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    """danted_udp with ``socksmethod: username`` (as danted_auth: root only); url has creds."""
    with _daemon(
        peers.start_danted, _session_dir(tmp_path_factory, "danted-udp-auth"), auth=True, udp=True
    ) as d:
        yield d


@pytest.fixture(scope="session")
def danted_v6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    """Dante, no auth, listening on ::1 (reaches IPv4 and IPv6 loopback targets)."""
    with _daemon(
        peers.start_danted, _session_dir(tmp_path_factory, "danted-v6"), host=peers.LOOPBACK_V6
    ) as d:
        yield d


@pytest.fixture
def microsocks(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_microsocks, tmp_path / "microsocks") as d:
        yield d


@pytest.fixture
def microsocks_auth(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_microsocks, tmp_path / "microsocks-auth", auth=True) as d:
        yield d


@pytest.fixture
def microsocks_v6(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_microsocks, tmp_path / "microsocks-v6", host=peers.LOOPBACK_V6) as d:
        yield d


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_tinyproxy, tmp_path / "tinyproxy") as d:
        yield d


@pytest.fixture
def tinyproxy_auth(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_tinyproxy, tmp_path / "tinyproxy-auth", auth=True) as d:
        yield d


@pytest.fixture
def tinyproxy_v6(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_tinyproxy, tmp_path / "tinyproxy-v6", host=peers.LOOPBACK_V6) as d:
        yield d


@pytest.fixture(scope="session")
def microsocks_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_microsocks, _session_dir(tmp_path_factory, "microsocks")) as d:
        yield d


@pytest.fixture(scope="session")
def tinyproxy_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_tinyproxy, _session_dir(tmp_path_factory, "tinyproxy")) as d:
        yield d


@pytest.fixture(scope="session")
def tinyproxy_auth_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Daemon]:
    with _daemon(
        peers.start_tinyproxy, _session_dir(tmp_path_factory, "tinyproxy-auth"), auth=True
    ) as d:
        yield d


@pytest.fixture
def ncat_http(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_ncat_http, tmp_path / "ncat-http") as d:
        yield d


@pytest.fixture
def ncat_http_auth(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_ncat_http, tmp_path / "ncat-http-auth", auth=True) as d:
        yield d


@pytest.fixture
def ncat_http_v6(tmp_path: Path) -> Iterator[peers.Daemon]:
    with _daemon(peers.start_ncat_http, tmp_path / "ncat-http-v6", host=peers.LOOPBACK_V6) as d:
        yield d


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.SshServer]:
    """sshd on 127.0.0.1 (and ::1 if available, same port); ``sshd.ssh_argv()`` is the client."""
    with _daemon(peers.start_sshd, _session_dir(tmp_path_factory, "sshd")) as d:
        assert isinstance(d, peers.SshServer)
        yield d


@pytest.fixture(scope="session")
def ssh_socks(
    sshd: peers.SshServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[peers.Daemon]:
    """``ssh -N -D 127.0.0.1:PORT`` against ``sshd``: SOCKS5 (url), socks4 and socks4a too."""
    with _daemon(peers.start_ssh_socks, sshd, _session_dir(tmp_path_factory, "ssh-D")) as d:
        yield d


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed to make certificates (apt-get install openssl)")
    return make_certificates(_session_dir(tmp_path_factory, "certificates"))


@pytest.fixture(scope="session")
def tls(certificates: Certificates) -> tls_peers.TLSFiles:
    try:
        return tls_peers.make_tls_files(certificates)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def socat_https(
    certificates: Certificates, tinyproxy_shared: peers.Daemon,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[peers.Daemon]:  # fmt: skip
    """socat's TLS in front of tinyproxy: an https:// proxy made of two independent programs."""
    with _daemon(peers.start_socat_tls, _session_dir(tmp_path_factory, "socat-https"),
                 tinyproxy_shared, certificates.cert, certificates.key) as d:  # fmt: skip
        yield d


@pytest.fixture(scope="session")
def socat_socks_tls(
    certificates: Certificates, danted: peers.Daemon, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[peers.Daemon]:
    """socat's TLS in front of Dante: SOCKS5 over TLS (its URL: ``.url_as("socks5h+tls")``)."""
    with _daemon(peers.start_socat_tls, _session_dir(tmp_path_factory, "socat-socks"), danted,
                 certificates.cert, certificates.key) as d:  # fmt: skip
        yield d


@pytest.fixture(scope="module")
def digest_target() -> Iterator[peers.DigestServer]:
    with peers.DigestServer().start() as target:
        yield target


@pytest.fixture(scope="module")
def bulk_source() -> Iterator[tuple[peers.SourceServer, bytes]]:
    data = pattern(4 << 20, 7)
    with peers.SourceServer(data).start() as target:
        yield target, data


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """A factory of ``hopcat serve`` subprocesses, each stopped by pid at teardown."""
    yield from serve_factory(tmp_path)
