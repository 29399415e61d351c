"""Who gets through which corporate proxy: hopcat, curl, cntlm, proxytunnel and ncat (issue 12).

Every client opens one tunnel through each authenticating proxy of ``corporate_peers.py`` (and
ncat's Digest proxy, ``peers.start_ncat_http(auth=True)``, the ``ncat_http_auth`` fixture's
starter) to a banner server, or for curl to an HTTP target, and the outcome becomes a cell:
"yes", "no: <why>", or "—" where the client has none of the schemes the proxy offers. The
recipes, and why each peer fails where it does, are in CORPORATE-PROXIES.md sections 4.8, 4.10
and 8 (row E1 of section 9).

- hopcat: ``hopcat -v -x http://USER@proxy:P 127.0.0.1 PORT``, the password in
  HOPCAT_PROXY_PASSWORD; stdin stays open until the banner arrives (Squid tears a tunnel down at
  the client's FIN), then closes. Its cells must all be "yes"; its ``-v`` lines give the scheme,
  the TCP connections and the 407s seen, checked against ``HOPCAT_FLOW``.
- curl: ``-p`` (CONNECT) with ``--proxy-anyauth``, and with the scheme flag of the row. The
  credentials go in a config on stdin (``-K -``), not on argv.
- cntlm (NTLM proxies): a local cntlm (``Auth NTLMv2``, its password in a 0600 config file) with
  curl through it.
- proxytunnel (Basic and NTLM proxies): ``-F passfile`` (wgetrc format), ``-N -t DOMAIN`` for NTLM.
- ncat (Basic and Digest proxies): ``--proxy-type http --proxy-auth user:pass``.

The peers' cells are observations, not judgements: the test asserts they equal ``EXPECTED``
(each cell commented with its reason), so a change in a peer's behaviour is noticed. The whole
table is computed once per module, sequentially (each cell takes a few tens of milliseconds;
Samba's helpers run one at a time anyway). As a script (root, for Samba) it prints both tables in
Markdown::

    PYTHONPATH=src python tests/integration/test_corporate_side_by_side.py --table
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import corporate_peers as cp
import kdc
import peers
import pytest

pytestmark = pytest.mark.timeout(120)

CLIENT_TIMEOUT_S = 5.0  # per client invocation; every cell takes well under a second
BANNER = b"SSH-2.0-hopcat-side-by-side\r\n"
MISSING = "—"  # the client has none of the schemes this proxy offers
HOPCAT = [sys.executable, "-m", "hopcat"]


@dataclass(frozen=True)
class Row:
    """One proxy as a user meets it: which fixture, what it offers, whether there is a ticket."""

    key: str
    title: str
    fixture: str
    schemes: tuple[str, ...]
    curl_flag: str  # the scheme flag a curl user would pick for this proxy
    ticket: bool | None = None  # Kerberos rows: with a ticket (client keytab) or without


ROWS = [
    Row("basic", "Squid, basic_ncsa_auth", "squid_basic", ("Basic",), "--proxy-basic"),
    Row("digest", "Squid, digest_file_auth", "squid_digest", ("Digest",), "--proxy-digest"),
    Row("ntlm-fake", "Squid, ntlm_fake_auth", "squid_ntlm_fake", ("NTLM",), "--proxy-ntlm"),
    Row("ntlm-fake-close", "Squid, ntlm_fake_auth, first 407 closes", "squid_ntlm_fake_close",
        ("NTLM",), "--proxy-ntlm"),
    Row("samba-ntlm", "Squid + Samba ntlm_auth (NTLMv2 checked)", "samba_ntlm", ("NTLM",),
        "--proxy-ntlm"),
    Row("negotiate", "Squid + MIT KDC, with a ticket", "squid_negotiate", ("Negotiate",),
        "--proxy-negotiate", ticket=True),
    Row("multi-ticket", "Squid, four schemes, with a ticket", "squid_multi",
        ("Negotiate", "NTLM", "Digest", "Basic"), "--proxy-negotiate", ticket=True),
    # A curl user without a ticket would pick the strongest password scheme: NTLM.
    Row("multi-no-ticket", "Squid, four schemes, no ticket", "squid_multi",
        ("Negotiate", "NTLM", "Digest", "Basic"), "--proxy-ntlm", ticket=False),
    Row("wrapper-no-ticket", "Squid negotiate_wrapper (Kerberos or NTLM), no ticket",
        "squid_negotiate_wrapper_only", ("Negotiate",), "--proxy-negotiate", ticket=False),
    Row("apache-digest", "Apache mod_proxy_connect", "apache_digest", ("Digest",),
        "--proxy-digest"),
    Row("ncat-digest", "ncat, closes after its 407", "ncat_http_auth",
        ("Basic", "Digest"), "--proxy-digest"),
]  # fmt: skip


@dataclass(frozen=True)
class Seat:
    """Where a client finds a proxy and what it logs in with."""

    host: str  # as written in the client's command: localhost for Kerberos
    port: int
    username: str | None
    password: str | None
    domain: str | None
    env: dict[str, str]  # KRB5* variables for Kerberos rows, else empty

    @property
    def hostport(self) -> str:
        return peers.format_hostport(self.host, self.port)

    def login(self) -> tuple[str, str]:
        """(domain, user) for tools that take them apart: ``CORP\\alice`` or the proxy's domain."""
        user = self.username or ""
        domain, sep, name = user.partition("\\")
        return (domain, name) if sep else (self.domain or "", user)

    def userpass(self) -> str:
        return f"{self.username or ''}:{self.password or ''}"


@dataclass(frozen=True)
class Outcome:
    """A cell: ``verdict`` is compared with EXPECTED; ``detail`` only shows in the table."""

    verdict: str
    detail: str = ""
    scheme: str = ""  # hopcat: the scheme its -v line names
    connections: int = 0  # hopcat: TCP connections to the proxy
    challenges: int = 0  # hopcat: 407s seen

    @property
    def word(self) -> str:
        return f"{self.verdict} ({self.detail})" if self.detail else self.verdict


@dataclass(frozen=True)
class Targets:
    banner: peers.BannerServer
    http: peers.HttpTarget
    workdir: Path


# --------------------------------------------------------------------------- running a client


@dataclass(frozen=True)
class Ran:
    returncode: int | None  # None: killed at the timeout
    stdout: bytes
    stderr: str


def run_stdio(argv: list[str], env: dict[str, str], expect: bytes, stdin: bytes = b"") -> Ran:
    """Run a ProxyCommand-style client: stdin open until ``expect`` arrived on stdout (or the
    client ended, or the timeout passed), then closed; the client then has the rest of the
    timeout to finish."""
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()
    err = bytearray()
    try:
        if stdin:
            proc.stdin.write(stdin)
            proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            open_streams = 2
            while open_streams and time.monotonic() < deadline:
                if expect in out and not proc.stdin.closed:
                    proc.stdin.close()
                for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                    data = os.read(key.fd, 65536)
                    if data:
                        key.data.extend(data)
                    else:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            returncode: int | None = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return Ran(returncode, bytes(out), err.decode(errors="replace"))


def client_env(seat: Seat, **extra: str) -> dict[str, str]:
    """No proxy variables, no HOPCAT_* and no Kerberos settings but the row's."""
    env = {k: v for k, v in peers.peer_env().items() if not k.startswith(("KRB5", "HOPCAT_"))}
    env.update(seat.env)
    env.update(extra)
    return env


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# --------------------------------------------------------------------------- the clients

HOPCAT_DONE = re.compile(r"\(authenticated with (.+?), (\d+) TCP connections?\)")
HOPCAT_407 = re.compile(r"^hopcat: \[[^]]*\] hop \d+/\d+: HTTP 407 ", re.MULTILINE)


def hopcat(row: Row, seat: Seat, targets: Targets) -> Outcome:
    user = f"{urllib.parse.quote(seat.username, safe='')}@" if seat.username else ""
    url = f"http://{user}{seat.hostport}"
    extra = {"HOPCAT_PROXY_PASSWORD": seat.password} if seat.password else {}
    ran = run_stdio([*HOPCAT, "-v", "-x", url, targets.banner.host, str(targets.banner.port)],
                    client_env(seat, **extra), BANNER)  # fmt: skip
    done = HOPCAT_DONE.search(ran.stderr)
    challenges = len(HOPCAT_407.findall(ran.stderr))
    if ran.stdout == BANNER and ran.returncode == 0 and done:
        return Outcome("yes", scheme=done[1], connections=int(done[2]), challenges=challenges)
    errors = [line for line in ran.stderr.splitlines() if not line.startswith("hopcat: [")]
    return Outcome("no", f"exit {ran.returncode}: {errors[-1] if errors else ran.stderr[-200:]}",
                   challenges=challenges)  # fmt: skip


def _curl_config(userpass: str) -> bytes:
    quoted = userpass.replace("\\", "\\\\").replace('"', '\\"')
    return f'proxy-user = "{quoted}"\n'.encode()


CURL_ERROR = re.compile(r"^curl: \(\d+\) (.*)$", re.MULTILINE)


def run_curl(proxy: str, targets: Targets, env: dict[str, str], *flags: str,
             userpass: str | None = None) -> Outcome:  # fmt: skip
    curl = peers.require_program("curl")
    argv = [curl, "-q", "-sS", "--max-time", str(CLIENT_TIMEOUT_S), "-p", "-x", proxy, *flags,
            "-w", "\n%{http_connect}", targets.http.url]  # fmt: skip
    config = b""
    if userpass is not None:
        argv[1:1] = ["-K", "-"]
        config = _curl_config(userpass)
    try:
        res = subprocess.run(argv, input=config, capture_output=True, env=env,
                             timeout=CLIENT_TIMEOUT_S + 2)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome("no", "timed out")
    body, _, status = res.stdout.decode(errors="replace").rpartition("\n")
    if res.returncode == 0 and body == targets.http.body.decode():
        return Outcome("yes")
    error = CURL_ERROR.search(res.stderr.decode(errors="replace"))
    said = error[1] if error else f"exit {res.returncode}"
    # "CONNECT tunnel failed, response 407" says no more than the verdict.
    return Outcome(f"no: {status}", "" if said.startswith("CONNECT tunnel failed") else said)


def curl_anyauth(row: Row, seat: Seat, targets: Targets) -> Outcome:
    return run_curl(f"http://{seat.hostport}", targets, client_env(seat), "--proxy-anyauth",
                    userpass=seat.userpass())  # fmt: skip


def curl_scheme(row: Row, seat: Seat, targets: Targets) -> Outcome:
    # curl's Negotiate takes the ticket, never a password ("-U :" in its manual).
    userpass = ":" if row.curl_flag == "--proxy-negotiate" else seat.userpass()
    outcome = run_curl(f"http://{seat.hostport}", targets, client_env(seat), row.curl_flag,
                       userpass=userpass)  # fmt: skip
    return Outcome(outcome.verdict, ", ".join(filter(None, [row.curl_flag, outcome.detail])))


def cntlm(row: Row, seat: Seat, targets: Targets) -> Outcome:
    program = peers.require_program("cntlm", "cntlm")
    domain, user = seat.login()
    workdir = Path(tempfile.mkdtemp(prefix=f"cntlm-{row.key}-", dir=targets.workdir))
    conf = workdir / "cntlm.conf"

    def make_argv(port: int) -> list[str]:
        conf.touch(0o600)
        conf.write_text(f'Username {user}\nDomain {domain}\nPassword "{seat.password}"\n'
                        f"Auth NTLMv2\nProxy {peers.LOOPBACK_V4}:{seat.port}\n"
                        f"Listen {peers.LOOPBACK_V4}:{port}\n")  # fmt: skip
        return [program, "-f", "-c", str(conf)]

    daemon = peers.start_daemon("cntlm", workdir, make_argv, scheme="http")
    try:
        outcome = run_curl(daemon.url, targets, client_env(seat))
    finally:
        daemon.stop()
    said = CNTLM_SAYS.search(daemon.log())
    return Outcome(outcome.verdict, f"cntlm: '{said[1]}'") if said else outcome


# What cntlm logs when it gives up on a CHALLENGE (it then sends the CONNECT with no Type 3).
CNTLM_SAYS = re.compile(r"^cntlm\[\d+\]: (No target info block.*)$", re.MULTILINE)


PT_BASIC = re.compile(r"Proxy-Authorization: Basic (\S+)")
PT_REASONS = {  # what proxytunnel says -> the cell
    "only NTLMv2 is supported": "NTLM: 'only NTLMv2 is supported'",
    "Incorrect message type": "NTLM: 'Incorrect message type'",
}


def proxytunnel(row: Row, seat: Seat, targets: Targets) -> Outcome:
    program = peers.require_program("proxytunnel", "proxytunnel")
    ntlm = "Basic" not in row.schemes
    domain, user = seat.login()
    passfile = Path(tempfile.mkstemp(prefix=f"proxytunnel-{row.key}-", dir=targets.workdir)[1])
    passfile.write_text(f"proxy_user = {user if ntlm else seat.username}\n"
                        f"proxy_passwd = {seat.password}\n")  # fmt: skip
    argv = [program, "-v", "-F", str(passfile), "-p", f"{peers.LOOPBACK_V4}:{seat.port}",
            "-d", targets.banner.hostport, *(["-N", "-t", domain] if ntlm else [])]  # fmt: skip
    ran = run_stdio(argv, client_env(seat), BANNER)
    how = "NTLM" if ntlm else "Basic"
    if ran.stdout.endswith(BANNER):  # -v writes nothing to stdout, the tunnel does
        return Outcome("yes", how)
    for said, reason in PT_REASONS.items():
        if said in ran.stderr:
            return Outcome("no", reason)
    sent = PT_BASIC.search(ran.stderr)
    if sent and seat.password and " " in seat.password:
        decoded = base64.b64decode(sent[1]).decode(errors="replace")
        if decoded == f"{seat.username}:{seat.password.split(' ')[0]}":
            return Outcome("no: 407", "password cut at its space")
    status = re.findall(r"<- HTTP/1\.[01] (\d{3})", ran.stderr)
    return Outcome(f"no: {status[-1]}" if status else "no", f"{how}, exit {ran.returncode}")


def ncat(row: Row, seat: Seat, targets: Targets) -> Outcome:
    program = peers.require_program("ncat", "ncat")
    argv = [program, "--proxy", f"{peers.LOOPBACK_V4}:{seat.port}", "--proxy-type", "http",
            "--proxy-auth", seat.userpass(), targets.banner.host, str(targets.banner.port)]  # fmt: skip
    ran = run_stdio(argv, client_env(seat), BANNER)
    if ran.stdout == BANNER:
        return Outcome("yes")
    return Outcome("no", _first_line(ran.stderr) or f"exit {ran.returncode}")


@dataclass(frozen=True)
class Client:
    key: str
    title: str
    run: Callable[[Row, Seat, Targets], Outcome]
    speaks: tuple[str, ...]  # the schemes it can answer; a row offering none of them is "—"


ALL = ("Negotiate", "NTLM", "Digest", "Basic")
CLIENTS = [
    Client("hopcat", "hopcat", hopcat, ALL),
    Client("curl-anyauth", "curl --proxy-anyauth", curl_anyauth, ALL),
    Client("curl-scheme", "curl, scheme flag", curl_scheme, ALL),
    Client("cntlm", "cntlm + curl", cntlm, ("NTLM",)),
    Client("proxytunnel", "proxytunnel", proxytunnel, ("NTLM", "Basic")),
    Client("ncat", "ncat", ncat, ("Digest", "Basic")),
]

# --------------------------------------------------------------------------- expectations

# hopcat: every row "yes", with (scheme, TCP connections, 407s seen). It probes without
# credentials, so every scheme costs one 407 more than a client sending them up front.
HOPCAT_FLOW: dict[str, tuple[str, int, int]] = {
    "basic": ("Basic", 1, 1),
    "digest": ("Digest", 1, 1),
    "ntlm-fake": ("NTLM", 1, 2),  # the bare offer, then the CHALLENGE
    "ntlm-fake-close": ("NTLM", 2, 2),  # the bare offer closes; Type 1/2/3 on the second
    "samba-ntlm": ("NTLM", 1, 2),
    "negotiate": ("Negotiate", 1, 1),  # one token; Squid's 200 carries none back
    "multi-ticket": ("Negotiate", 1, 1),
    "multi-no-ticket": ("NTLM", 1, 2),  # Negotiate skipped without a ticket (no extra leg)
    "wrapper-no-ticket": ("NTLM under the Negotiate name", 1, 2),
    "apache-digest": ("Digest", 1, 1),
    "ncat-digest": ("Digest", 2, 1),  # ncat's 407 closes: the answer on a second connection
}

# The peers, as observed with curl 7.88.1, cntlm 0.92.3, proxytunnel 1.10.20210128 and ncat
# 7.93 (Debian 12). Only the verdicts are compared; the details are for the reader.
EXPECTED: dict[tuple[str, str], str] = {
    # curl --proxy-anyauth probes and picks the strongest scheme offered.
    ("basic", "curl-anyauth"): "yes",
    ("digest", "curl-anyauth"): "yes",
    ("ntlm-fake", "curl-anyauth"): "yes",
    ("ntlm-fake-close", "curl-anyauth"): "yes",  # reconnects on Connection: close
    ("samba-ntlm", "curl-anyauth"): "yes",
    ("negotiate", "curl-anyauth"): "yes",
    ("multi-ticket", "curl-anyauth"): "yes",  # picks Negotiate, the ticket works
    # Picks Negotiate, cannot make a token without a ticket, never falls back (curl#3726).
    ("multi-no-ticket", "curl-anyauth"): "no: 407",
    # The only offer is Negotiate; curl has no raw NTLM under that name.
    ("wrapper-no-ticket", "curl-anyauth"): "no: 407",
    ("apache-digest", "curl-anyauth"): "yes",
    # ncat's HTTP/1.0 407 closes without saying so: curl answers on the dead connection.
    ("ncat-digest", "curl-anyauth"): "no: 407",
    # curl with the flag a user would pick for the proxy.
    ("basic", "curl-scheme"): "yes",
    ("digest", "curl-scheme"): "yes",
    ("ntlm-fake", "curl-scheme"): "yes",  # Type 1 up front, no probe
    ("ntlm-fake-close", "curl-scheme"): "yes",  # Type 1 up front: never meets the closing 407
    ("samba-ntlm", "curl-scheme"): "yes",
    ("negotiate", "curl-scheme"): "yes",
    ("multi-ticket", "curl-scheme"): "yes",
    ("multi-no-ticket", "curl-scheme"): "yes",  # --proxy-ntlm: the user chose for curl
    ("wrapper-no-ticket", "curl-scheme"): "no: 407",  # no ticket: no Negotiate token
    ("apache-digest", "curl-scheme"): "yes",
    ("ncat-digest", "curl-scheme"): "no: 407",  # the same dead connection as anyauth
    # cntlm (Auth NTLMv2) as a local proxy, curl through it.
    # The fake helper's CHALLENGE has no TargetInfo: cntlm logs "No target info block. Cannot do
    # NTLMv2!", sends the CONNECT again with no Type 3 and passes the bare 407 on to curl.
    ("ntlm-fake", "cntlm"): "no: 407",
    ("ntlm-fake-close", "cntlm"): "no: 407",
    ("samba-ntlm", "cntlm"): "yes",  # real NTLMv2, checked by Samba
    ("multi-ticket", "cntlm"): "yes",  # uses the NTLM offer; tickets play no part
    ("multi-no-ticket", "cntlm"): "yes",
    # proxytunnel: Basic where offered, else NTLM (-N).
    # -F and -P cut the password at its space ('s3cret pass' is sent as 's3cret'); the same
    # password in PROXYPASS (the environment) goes through whole.
    ("basic", "proxytunnel"): "no: 407",
    ("ntlm-fake", "proxytunnel"): "no",  # the fake helper's CHALLENGE is malformed (4.5)
    ("ntlm-fake-close", "proxytunnel"): "no",
    ("samba-ntlm", "proxytunnel"): "no",  # Samba's CHALLENGE: "only NTLMv2 is supported"
    ("multi-ticket", "proxytunnel"): "yes",  # Basic; nobody's password has no space
    ("multi-no-ticket", "proxytunnel"): "yes",
    ("ncat-digest", "proxytunnel"): "yes",  # Basic up front: never meets the closing 407
    # ncat: Basic or Digest, whichever is stronger; it reconnects after a closing 407.
    ("basic", "ncat"): "yes",
    ("digest", "ncat"): "yes",
    ("multi-ticket", "ncat"): "yes",  # picks Digest
    ("multi-no-ticket", "ncat"): "yes",
    ("apache-digest", "ncat"): "yes",
    ("ncat-digest", "ncat"): "yes",
}


def applies(client: Client, row: Row) -> bool:
    return any(scheme in client.speaks for scheme in row.schemes)


# --------------------------------------------------------------------------- the table

Table = dict[tuple[str, str], Outcome]  # (row key, client key) -> outcome


def seat_of(row: Row, proxy: Any, realm: kdc.Realm | None) -> Seat:
    env: dict[str, str] = {}
    if row.ticket is not None and realm is not None:
        full = realm.client_env() if row.ticket else realm.no_ticket_env()
        env = {k: v for k, v in full.items() if k.startswith("KRB5")}
    host = proxy.url_host if isinstance(proxy, cp.AuthProxy) else proxy.host
    return Seat(host, proxy.port, proxy.username, proxy.password,
                getattr(proxy, "domain", None), env)  # fmt: skip


def _cell(client: Client, row: Row, seat: Seat, targets: Targets) -> Outcome:
    try:
        return client.run(row, seat, targets)
    except peers.PeerUnavailable as exc:
        return Outcome("skipped", str(exc))
    except Exception as exc:  # the harness failed, not the client: show it in the cell
        return Outcome("harness error", f"{type(exc).__name__}: {exc}")


def build_table(proxies: dict[str, Any], realm: kdc.Realm | None, targets: Targets) -> Table:
    """``proxies`` maps a fixture name to its running proxy, or to a skip reason (a str)."""
    table: Table = {}
    for row in ROWS:
        proxy = proxies[row.fixture]
        if row.ticket is not None and realm is None:
            proxy = "no Kerberos realm"
        for client in CLIENTS:
            if isinstance(proxy, str):
                table[row.key, client.key] = Outcome("skipped", proxy)
            elif not applies(client, row):
                table[row.key, client.key] = Outcome(MISSING)
            else:
                table[row.key, client.key] = _cell(client, row, seat_of(row, proxy, realm),
                                                   targets)  # fmt: skip
    return table


def markdown(table: Table) -> str:
    headers = ["proxy", "offers", *(client.title for client in CLIENTS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in ROWS:
        cells = [table[row.key, client.key].word for client in CLIENTS]
        lines.append(f"| {row.title} | {', '.join(row.schemes)} | " + " | ".join(cells) + " |")
    flow = ["| proxy | hopcat's scheme | TCP connections | 407s seen | CONNECT requests |",
            "|---|---|---|---|---|"]  # fmt: skip
    for row in ROWS:
        got = table[row.key, "hopcat"]
        if got.verdict == "yes":
            flow.append(f"| {row.title} | {got.scheme} | {got.connections} | {got.challenges} | "
                        f"{got.challenges + 1} |")  # fmt: skip
    legend = (f"yes: the banner (curl: the page) came through; {MISSING}: the client has none "
              "of the schemes the proxy offers.")  # fmt: skip
    return "\n".join([*lines, "", legend, "", *flow])


# --------------------------------------------------------------------------- the tests


def _fixture(request: pytest.FixtureRequest, name: str) -> Any:
    try:
        return request.getfixturevalue(name)
    except pytest.skip.Exception as exc:
        return str(exc) or f"{name} skipped"


@contextlib.contextmanager
def _targets(workdir: Path) -> Iterator[Targets]:
    with peers.BannerServer(BANNER).start() as banner, peers.HttpTarget().start() as http:
        yield Targets(banner, http, workdir)


@pytest.fixture(scope="module")
def table(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Table]:
    workdir = tmp_path_factory.mktemp("side-by-side")
    proxies = {row.fixture: _fixture(request, row.fixture) for row in ROWS
               if row.fixture != "ncat_http_auth"}  # fmt: skip
    realm = _fixture(request, "krb5_realm")
    with contextlib.ExitStack() as stack:
        # ncat_http_auth is function-scoped: its starter, once for the module.
        try:
            proxies["ncat_http_auth"] = stack.enter_context(
                peers.start_ncat_http(workdir / "ncat", auth=True)
            )
        except peers.PeerUnavailable as exc:
            proxies["ncat_http_auth"] = str(exc)
        targets = stack.enter_context(_targets(workdir))
        yield build_table(proxies, realm if isinstance(realm, kdc.Realm) else None, targets)


def _skip_unless_ran(outcome: Outcome) -> None:
    if outcome.verdict == "skipped":
        pytest.skip(outcome.detail)


@pytest.mark.parametrize("row", ROWS, ids=[row.key for row in ROWS])
def test_hopcat_gets_through(table: Table, row: Row) -> None:
    outcome = table[row.key, "hopcat"]
    _skip_unless_ran(outcome)
    assert outcome.word == "yes"
    assert (outcome.scheme, outcome.connections, outcome.challenges) == HOPCAT_FLOW[row.key]


PEER_CELLS = [(row, client) for row in ROWS for client in CLIENTS if client.key != "hopcat"]


@pytest.mark.parametrize(("row", "client"), PEER_CELLS,
                         ids=[f"{row.key}-{client.key}" for row, client in PEER_CELLS])  # fmt: skip
def test_peer_outcome_is_the_recorded_one(table: Table, row: Row, client: Client) -> None:
    outcome = table[row.key, client.key]
    _skip_unless_ran(outcome)
    assert outcome.verdict == EXPECTED.get((row.key, client.key), MISSING), outcome.word


def main(argv: list[str]) -> int:
    if argv != ["--table"]:
        print(f"usage: {Path(__file__).name} --table", file=sys.stderr)
        return 64
    with tempfile.TemporaryDirectory(prefix="hopcat-corporate-") as tmp, \
            contextlib.ExitStack() as stack:  # fmt: skip
        workdir = Path(tmp)

        def start(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            try:
                started = fn(workdir / name, *args, **kwargs)
            except peers.PeerUnavailable as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return str(exc)
            stack.callback(started.stop)
            return started

        realm = start("krb5", kdc.start_realm)
        winbind = start("samba", cp.start_winbind)
        kerberos = isinstance(realm, kdc.Realm)
        samba = not isinstance(winbind, str)
        proxies: dict[str, Any] = {
            "squid_basic": start("basic", cp.start_squid_basic),
            "squid_digest": start("digest", cp.start_squid_digest),
            "squid_ntlm_fake": start("ntlm-fake", cp.start_squid_ntlm_fake),
            "squid_ntlm_fake_close": start("ntlm-fake-close", cp.start_squid_ntlm_fake,
                                           keep_alive=False),
            "samba_ntlm": start("samba-ntlm", cp.start_squid_samba_ntlm, winbind)
            if samba else winbind,
            "squid_negotiate": start("negotiate", cp.start_squid_negotiate, realm)
            if kerberos else realm,
            "squid_multi": start("multi", cp.start_squid_multi, realm, winbind)
            if kerberos and samba else "needs Samba and Kerberos",
            "squid_negotiate_wrapper_only": start("wrapper", cp.start_squid_negotiate_wrapper_only,
                                                  realm, winbind)
            if kerberos and samba else "needs Samba and Kerberos",
            "apache_digest": start("apache", cp.start_apache_digest),
            "ncat_http_auth": start("ncat", peers.start_ncat_http, auth=True),
        }  # fmt: skip
        targets = stack.enter_context(_targets(workdir))
        print(markdown(build_table(proxies, realm if kerberos else None, targets)))
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent), str(here.parents[1] / "src")]
    sys.exit(main(sys.argv[1:]))
