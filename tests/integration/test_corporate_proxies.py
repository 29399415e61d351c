"""hopcat through the proxies of corporate networks, real ones on loopback (fixtures:
corporate_peers.py, recipes: ../shared/CORPORATE-PROXIES.md): Squid with Basic, Digest (stale
nonces), NTLM (the fake helper, and Samba's winbindd checking NTLMv2 for real), Negotiate with
an MIT KDC, all four behind negotiate_wrapper; Apache with Digest; ncat's Digest proxy.

Each proxy: the scheme hopcat chose and the TCP connections it used (from -v), ssh through it
with a hash check, a wrong password (one line, exit 77, one answer), chains with a SOCKS hop in
front. Passwords reach hopcat through HOPCAT_PROXY_PASSWORD, never argv, and never appear in -v.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers
import pytest
from test_serve_support import ServeProcess, connect, socks5_connect

from support import clean_env, pattern, sha256

TIMEOUT_S = 30.0
SSH_PAYLOAD = 1 << 20


@dataclass(frozen=True)
class Case:
    fixture: str
    scheme: str  # as -v names it: "authenticated with <scheme>"
    connections: int = 1
    kerberos: str = ""  # "ticket" or "no ticket": the realm's client environment
    user: str | None = None  # instead of the fixture's
    host: str | None = None  # instead of the fixture's url_host


CASES = {
    "basic-squid": Case("squid_basic", "Basic"),
    "digest-squid": Case("squid_digest", "Digest"),
    "digest-apache": Case("apache_digest", "Digest"),
    "digest-ncat": Case("ncat_http_auth", "Digest", connections=2),  # closes after its 407
    "ntlm-fake-squid": Case("squid_ntlm_fake", "NTLM"),
    "ntlm-fake-squid-no-keepalive": Case("squid_ntlm_fake_close", "NTLM", connections=2),
    "ntlmv2-samba": Case("samba_ntlm", "NTLM"),
    "ntlmv2-samba-domain": Case("samba_ntlm", "NTLM", user="HOPCATPROXY\\nobody"),
    "negotiate-squid": Case("squid_negotiate", "Negotiate", kerberos="ticket"),
    "multi-ticket": Case("squid_multi", "Negotiate", kerberos="ticket"),
    "multi-no-ticket": Case("squid_multi", "NTLM", kerberos="no ticket"),
    # Addressed by IP, the service principal HTTP/127.0.0.1 is unknown: NTLM instead.
    "multi-by-address": Case("squid_multi", "NTLM", kerberos="ticket", host="127.0.0.1"),
    "negotiate-only-no-ticket": Case(
        "squid_negotiate_wrapper_only", "NTLM under the Negotiate name", kerberos="no ticket"
    ),
}


def proxy_of(request: pytest.FixtureRequest, case: Case) -> Any:
    return request.getfixturevalue(case.fixture)


def url_and_env(request: pytest.FixtureRequest, case: Case, proxy: Any,
                password: str | None = None) -> tuple[str, dict[str, str]]:  # fmt: skip
    """The -x URL (user only) and the environment carrying the password and Kerberos files."""
    env = clean_env()
    if case.kerberos:
        realm = request.getfixturevalue("krb5_realm")
        kerberos = realm.client_env() if case.kerberos == "ticket" else realm.no_ticket_env()
        env.update({k: v for k, v in kerberos.items() if k.startswith("KRB5")})
    user = case.user or proxy.username
    host = case.host or getattr(proxy, "url_host", proxy.host)
    userinfo = ""
    if user is not None and case.fixture != "squid_negotiate":
        userinfo = urllib.parse.quote(user, safe="") + "@"
        env["HOPCAT_PROXY_PASSWORD"] = password if password is not None else proxy.password
    return f"http://{userinfo}{peers.format_hostport(host, proxy.port)}", env


def banner_through(url: str, env: dict[str, str], target: peers.BannerServer, *,
                   before: str | None = None, verbose: bool = True,
                   extra: tuple[str, ...] = ()) -> tuple[int, bytes, str]:  # fmt: skip
    """hopcat (-v) through ``url`` (and the hop ``before`` it) to the banner target, stdin held
    open until the banner came (Squid ends a tunnel at the client's FIN, before the target's
    bytes are through)."""
    hops = ["-x", before, "-x", url] if before else ["-x", url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hopcat", *(["-v"] if verbose else []), *extra, *hops, target.host,
         str(target.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    received = b""
    deadline = time.monotonic() + TIMEOUT_S
    while len(received) < len(target.banner) and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            received += chunk
    try:
        _, err = proc.communicate(b"", timeout=TIMEOUT_S)  # closes stdin: EOF for hopcat
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, received, err.decode(errors="replace")


@pytest.mark.parametrize("name", list(CASES))
def test_the_scheme_chosen_and_the_connections_used(
    request: pytest.FixtureRequest, banner_server: peers.BannerServer, name: str
) -> None:
    case = CASES[name]
    proxy = proxy_of(request, case)
    url, env = url_and_env(request, case, proxy)
    code, received, err = banner_through(url, env, banner_server)
    assert code == 0 and received == banner_server.banner, err
    plural = "s" if case.connections > 1 else ""
    assert f"(authenticated with {case.scheme}, {case.connections} TCP connection{plural})" in err
    if proxy.password:
        assert proxy.password not in err
    if name == "multi-by-address":
        assert "Negotiate skipped: GSSAPI: Server HTTP/127.0.0.1@HOPCAT.TEST not found" in err


# Every proxy that checks a password (ntlm_fake_auth takes any); on the four-scheme Squid without
# a ticket, NTLM's refusal ends it: Digest and Basic are not shown the same wrong password.
WRONG = ["basic-squid", "digest-squid", "digest-apache", "digest-ncat", "ntlmv2-samba",
         "multi-no-ticket", "negotiate-only-no-ticket"]  # fmt: skip


@pytest.mark.parametrize("name", WRONG)
def test_a_wrong_password_is_one_answer_one_line_and_77(
    request: pytest.FixtureRequest, banner_server: peers.BannerServer, name: str
) -> None:
    case = CASES[name]
    proxy = proxy_of(request, case)
    url, env = url_and_env(request, case, proxy, password="not-the-password")
    code, received, err = banner_through(url, env, banner_server)
    assert code == 77 and received == b"", err
    assert err.count("answering with") == 1, err
    last = err.splitlines()[-1]
    assert "credentials rejected" in last and "not-the-password" not in err
    code, _, err = banner_through(url, env, banner_server, verbose=False)
    assert code == 77 and err.count("\n") == 1, err


def test_squids_443_rule_is_named_before_any_credentials(
    squid_acl_443: Any, banner_server: peers.BannerServer
) -> None:
    env = clean_env(HOPCAT_PROXY_PASSWORD=squid_acl_443.password)
    user = urllib.parse.quote(squid_acl_443.username, safe="")
    url = f"http://{user}@{squid_acl_443.hostport}"
    code, _, err = banner_through(url, env, banner_server)
    assert code == 81, err
    assert "allow CONNECT only to port 443" in err and "SSL_ports" in err
    assert "answering with" not in err


@pytest.mark.parametrize(("name", "connections"), [("ntlmv2-samba", 1), ("digest-ncat", 2)])
def test_a_socks_hop_in_front(
    request: pytest.FixtureRequest, danted: peers.Daemon, banner_server: peers.BannerServer,
    name: str, connections: int,
) -> None:  # fmt: skip
    """NTLM's legs stay on the one connection through the SOCKS hop; ncat's closing 407 is
    answered on a new connection through the SOCKS hop again."""
    case = CASES[name]
    proxy = proxy_of(request, case)
    url, env = url_and_env(request, case, proxy)
    code, received, err = banner_through(url, env, banner_server, before=danted.url_as("socks5h"))
    assert code == 0 and received == banner_server.banner, err
    plural = "s" if connections > 1 else ""
    assert f"hop 2/2: CONNECT {banner_server.host}:{banner_server.port}: " in err
    assert f"{connections} TCP connection{plural})" in err


SSH_CASES = [name for name in CASES if name != "ntlmv2-samba-domain"]  # same as without


@pytest.mark.parametrize("name", SSH_CASES)
def test_ssh_through_it(
    request: pytest.FixtureRequest, sshd: peers.SshServer, name: str
) -> None:
    """ssh speaks first (its banner goes into hopcat's stdin before the proxy's 2xx): held back,
    it cannot spoil the retry after a 407; then 1 MiB up, hashed by the far end."""
    case = CASES[name]
    proxy = proxy_of(request, case)
    url, env = url_and_env(request, case, proxy)
    command = f"{sys.executable} -m hopcat -x {url.replace('%', '%%')} %h %p"
    payload = pattern(SSH_PAYLOAD, 12)
    result = subprocess.run(
        [*sshd.ssh_argv("-o", f"ProxyCommand={command}"), "sha256sum"], input=payload,
        capture_output=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.split()[0].decode() == sha256(payload)
    assert result.stderr == b""


# -- the other drivers of the engine: hopcat serve --via (asyncio sockets), hopcat.aio ------------


@pytest.mark.parametrize("name", ["ntlm-fake-squid-no-keepalive", "ntlmv2-samba", "negotiate-squid",
                                  "digest-ncat"])  # fmt: skip
def test_serve_via_an_authenticating_proxy(
    request: pytest.FixtureRequest, serve: Any, banner_server: peers.BannerServer, name: str
) -> None:
    """serve's upstream opens run the same plan on its event loop: NTLM's legs, a reconnect after
    a closing 407, GSSAPI in a worker thread (it may wait for the KDC)."""
    case = CASES[name]
    proxy = proxy_of(request, case)
    url, env = url_and_env(request, case, proxy)
    extra = {k: v for k, v in env.items() if k.startswith(("KRB5", "HOPCAT_PROXY_PASSWORD"))}
    server: ServeProcess = serve("--via", url, env=extra)
    with connect(server) as sock:
        assert socks5_connect(sock, banner_server.host, banner_server.port) == 0
        sock.sendall(b"ping")
        received = b""
        while len(received) < len(banner_server.banner) + 4:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received == banner_server.banner + b"ping"
    server.wait_log("result=ok")


def test_the_asyncio_library_reconnects_after_a_closing_407(
    squid_ntlm_fake_close: Any, banner_server: peers.BannerServer
) -> None:
    import hopcat.aio

    proxy = squid_ntlm_fake_close
    url = proxy.url()

    async def main() -> bytes:
        reader, writer = await hopcat.aio.open_connection(
            banner_server.host, banner_server.port, via=url, timeout=TIMEOUT_S
        )
        data = await reader.readexactly(len(banner_server.banner))
        writer.close()
        return data

    assert asyncio.run(main()) == banner_server.banner


def test_a_tls_hop_is_redone_on_the_new_connection(
    squid_ntlm_fake_close: Any, certificates: Any, tmp_path: Path,
    banner_server: peers.BannerServer,
) -> None:  # fmt: skip
    """https:// in front of a proxy that closes after its 407: the second connection gets its own
    TLS session (the first one's must not be reused)."""
    front = peers.start_socat_tls(tmp_path, squid_ntlm_fake_close.daemon, certificates.cert,
                                  certificates.key)  # fmt: skip
    try:
        user = urllib.parse.quote(squid_ntlm_fake_close.username, safe="")
        env = clean_env(HOPCAT_PROXY_PASSWORD=squid_ntlm_fake_close.password)
        code, received, err = banner_through(
            f"https://{user}@{front.hostport}", env, banner_server,
            extra=("--proxy-cacert", str(certificates.ca)),
        )  # fmt: skip
    finally:
        front.stop()
    assert code == 0 and received == banner_server.banner, err
    assert "(authenticated with NTLM, 2 TCP connections)" in err
