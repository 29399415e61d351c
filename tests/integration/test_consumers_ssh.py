"""hopcat's library under the SSH libraries people use with it, against the real sshd on loopback.

* paramiko takes a connected socket: ``SSHClient.connect(host, port, sock=hopcat.create_connection(
  (host, port), via=...))``. 32 MiB go each way (``sha256sum`` of an upload, ``cat`` of a file),
  through Dante and through a two-hop chain microsocks -> tinyproxy.
* asyncssh takes ``tunnel=chain``: a ``hopcat.Chain`` has the ``create_connection(protocol_factory,
  host, port)`` asyncssh asks of a tunnel. The host key is checked against the TARGET's name (the
  known_hosts entry for ``[localhost]:PORT``), never the proxy's.
* An empty ``Chain()`` as ``tunnel=`` is dialled by hopcat, directly: asyncssh tests ``if tunnel:``
  and a Chain is always true, so it is not skipped in favour of asyncssh's own connect. A refused
  connect shows it: the error is hopcat's ``ConnectError``, not asyncio's ``ConnectionRefusedError``.
* A proxy's refusal reaches the caller as the ``hopcat.errors.ProxyError`` hopcat raised (an
  ``OSError`` with ``errno``): from ``create_connection`` before paramiko is involved, and out of
  ``asyncssh.connect`` unwrapped.

Every client trusts only the keys we give it: no agent, no ~/.ssh, ``RejectPolicy`` for paramiko.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import shlex
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import peers
import pytest

import hopcat
from hopcat.errors import ConnectError, ProxyError
from support import closed_port, pattern, sha256

paramiko = pytest.importorskip("paramiko")
asyncssh = pytest.importorskip("asyncssh")

pytestmark = pytest.mark.timeout(180)

BULK = 32 << 20  # bytes each way through paramiko
# Each way through asyncssh: smaller, as the tunnel (not asyncssh's throughput) is under test.
ASYNCSSH_PAYLOAD = pattern(4 << 20, 33)
TARGET = "localhost"  # a name, so socks5h carries it and known_hosts must match it
OPEN_TIMEOUT_S = 20.0
SESSION_TIMEOUT_S = 120.0

T = TypeVar("T")

# Proxy routes: id -> [(fixture, scheme), ...], first hop first.
PARAMIKO_ROUTES: dict[str, list[tuple[str, str]]] = {
    "socks5h-dante": [("danted", "socks5h")],
    "socks5h-microsocks+http-tinyproxy": [("microsocks", "socks5h"), ("tinyproxy", "http")],
}


def route_chain(request: pytest.FixtureRequest, route: list[tuple[str, str]]) -> hopcat.Chain:
    return hopcat.Chain.from_urls(
        request.getfixturevalue(fixture).url_as(scheme) for fixture, scheme in route
    )


def host_key_line(sshd: peers.SshServer) -> str:
    """sshd's public host key as known_hosts wants it: ``ssh-ed25519 AAAA...``."""
    return " ".join((sshd.workdir / "host_key.pub").read_text().split()[:2])


@pytest.fixture(scope="session")
def target_known_hosts(sshd: peers.SshServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A known_hosts that names sshd only as ``[localhost]:PORT``, the target's name."""
    path = tmp_path_factory.mktemp("consumers-ssh") / "known_hosts"
    path.write_text(f"[{TARGET}]:{sshd.port} {host_key_line(sshd)}\n")
    return path


@pytest.fixture(scope="module")
def download_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A BULK-sized file sshd (same machine, same user) can ``cat``, and its digest."""
    path = tmp_path_factory.mktemp("consumers-ssh-bulk") / "down.bin"
    data = pattern(BULK, 31)
    path.write_bytes(data)
    path.parent.chmod(0o755)
    return path, sha256(data)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine in a fresh loop, bounded, so a stuck tunnel fails instead of hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            return await make()

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- paramiko


@pytest.fixture
def paramiko_client(target_known_hosts: Path) -> Iterator[Any]:
    client = paramiko.SSHClient()
    client.load_host_keys(str(target_known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    yield client
    client.close()


def paramiko_connect(client: Any, sshd: peers.SshServer, sock: Any) -> None:
    client.connect(
        TARGET, sshd.port, username=sshd.user, key_filename=str(sshd.client_key), sock=sock,
        allow_agent=False, look_for_keys=False, banner_timeout=OPEN_TIMEOUT_S,
        auth_timeout=OPEN_TIMEOUT_S,
    )  # fmt: skip


@pytest.mark.parametrize("route", PARAMIKO_ROUTES)
def test_paramiko_bulk_both_ways(
    request: pytest.FixtureRequest,
    sshd: peers.SshServer,
    paramiko_client: Any,
    download_file: tuple[Path, str],
    route: str,
) -> None:
    chain = route_chain(request, PARAMIKO_ROUTES[route])
    sock = hopcat.create_connection((TARGET, sshd.port), OPEN_TIMEOUT_S, via=chain)
    paramiko_connect(paramiko_client, sshd, sock)

    up = pattern(BULK, 32)
    stdin, stdout, _ = paramiko_client.exec_command("sha256sum", timeout=SESSION_TIMEOUT_S)
    stdin.write(up)
    stdin.channel.shutdown_write()
    assert stdout.read().split()[0].decode() == sha256(up)
    assert stdout.channel.recv_exit_status() == 0

    path, digest = download_file
    _, stdout, _ = paramiko_client.exec_command(
        f"cat {shlex.quote(str(path))}", timeout=SESSION_TIMEOUT_S
    )
    received = hashlib.sha256()
    size = 0
    while chunk := stdout.read(1 << 20):
        received.update(chunk)
        size += len(chunk)
    assert (size, received.hexdigest()) == (BULK, digest)
    assert stdout.channel.recv_exit_status() == 0


def test_paramiko_checks_the_targets_host_key(
    sshd: peers.SshServer, danted: peers.Daemon, tmp_path: Path
) -> None:
    # A key listed for the target's name that is not sshd's: paramiko must refuse the session.
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{TARGET}]:{sshd.port} {other}\n")
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = hopcat.create_connection(
        (TARGET, sshd.port), OPEN_TIMEOUT_S, via=danted.url_as("socks5h")
    )
    try:
        with pytest.raises(paramiko.BadHostKeyException):
            paramiko_connect(client, sshd, sock)
    finally:
        client.close()
        sock.close()


def test_paramiko_never_sees_a_refusal(danted: peers.Daemon) -> None:
    # The proxy refuses before any SSH byte: create_connection raises, paramiko is never called.
    with closed_port() as port, pytest.raises(ProxyError) as caught:
        hopcat.create_connection((TARGET, port), OPEN_TIMEOUT_S, via=danted.url_as("socks5h"))
    assert caught.value.errno == errno.ECONNREFUSED
    assert (caught.value.hop, caught.value.code) == (1, 5)


# --------------------------------------------------------------------------- asyncssh


async def asyncssh_cat(
    sshd: peers.SshServer, tunnel: hopcat.Chain, known_hosts: Path, port: int | None = None
) -> bytes:
    """Open an SSH session to TARGET through ``tunnel``, run ``cat`` on a payload, return what
    came back."""
    async with asyncssh.connect(
        TARGET, port or sshd.port, tunnel=tunnel, known_hosts=str(known_hosts),
        username=sshd.user, client_keys=[str(sshd.client_key)], agent_path=None, config=None,
        connect_timeout=OPEN_TIMEOUT_S,
    ) as conn:  # fmt: skip
        result = await conn.run("cat", input=ASYNCSSH_PAYLOAD, encoding=None)
        assert result.exit_status == 0
        assert isinstance(result.stdout, bytes)
        return result.stdout


def assert_cat_echoed(output: bytes) -> None:
    assert (len(output), sha256(output)) == (len(ASYNCSSH_PAYLOAD), sha256(ASYNCSSH_PAYLOAD))


def test_asyncssh_tunnel_checks_the_targets_host_key(
    sshd: peers.SshServer, danted: peers.Daemon, target_known_hosts: Path
) -> None:
    chain = hopcat.Chain.from_urls([danted.url_as("socks5h")])
    assert_cat_echoed(run_async(lambda: asyncssh_cat(sshd, chain, target_known_hosts)))


@pytest.mark.parametrize("listed", ["target-with-another-key", "proxy-with-sshd-key"])
def test_asyncssh_tunnel_refuses_keys_not_listed_for_the_target(
    sshd: peers.SshServer, danted: peers.Daemon, tmp_path: Path, listed: str
) -> None:
    """A key known under the target's name but different, or sshd's own key known under the
    proxy's name: both must fail, so the check is made against the target's name."""
    if listed == "target-with-another-key":
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        line = f"[{TARGET}]:{sshd.port} {other.strip()}"
    else:
        line = f"[{danted.host}]:{danted.port} {host_key_line(sshd)}"
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(line + "\n")
    chain = hopcat.Chain.from_urls([danted.url_as("socks5h")])
    with pytest.raises(asyncssh.HostKeyNotVerifiable) as caught:
        run_async(lambda: asyncssh_cat(sshd, chain, known_hosts))
    assert f"for host {TARGET}" in str(caught.value)


def test_asyncssh_tunnel_through_two_hops(
    sshd: peers.SshServer, danted: peers.Daemon, tinyproxy: peers.Daemon,
    target_known_hosts: Path,
) -> None:  # fmt: skip
    chain = hopcat.Chain.from_urls([danted.url_as("socks5h"), tinyproxy.url_as("http")])
    assert_cat_echoed(run_async(lambda: asyncssh_cat(sshd, chain, target_known_hosts)))


def test_asyncssh_empty_chain_is_dialled_directly_by_hopcat(
    sshd: peers.SshServer, target_known_hosts: Path
) -> None:
    assert_cat_echoed(run_async(lambda: asyncssh_cat(sshd, hopcat.Chain(), target_known_hosts)))
    # hopcat's ConnectError, not asyncio's ConnectionRefusedError: hopcat made the connect, so
    # asyncssh did not skip the (empty) tunnel and dial on its own.
    with closed_port() as port, pytest.raises(ConnectError) as caught:
        run_async(lambda: asyncssh_cat(sshd, hopcat.Chain(), target_known_hosts, port))
    assert caught.value.errno == errno.ECONNREFUSED


def test_asyncssh_connect_raises_the_proxys_refusal_unchanged(
    sshd: peers.SshServer, danted: peers.Daemon, target_known_hosts: Path
) -> None:
    chain = hopcat.Chain.from_urls([danted.url_as("socks5h")])
    with closed_port() as port, pytest.raises(ProxyError) as caught:
        run_async(lambda: asyncssh_cat(sshd, chain, target_known_hosts, port))
    assert type(caught.value) is ProxyError
    assert caught.value.errno == errno.ECONNREFUSED
    assert (caught.value.hop, caught.value.code) == (1, 5)
