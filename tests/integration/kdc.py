"""An MIT Kerberos realm on loopback for the Negotiate tests: a KDC, a service and a user.

``start_realm(directory)`` writes krb5.conf and kdc.conf for realm ``HOPCAT.TEST`` with its KDC on
127.0.0.1 at a free port, creates the database with ``kdb5_util`` and, through ``kadmin.local``
(no kadmind), the user ``alice`` (password ``s3cret``) and the service ``HTTP/localhost``, whose
keys go to ``http.keytab``. ``alice.keytab`` holds alice's own keys (``ktadd -norandkey``): with
``KRB5_CLIENT_KTNAME`` pointing at it MIT's GSSAPI gets the initial ticket by itself, so no
``kinit`` and no password on stdin. Then ``krb5kdc -n`` (no fork: the pid is the KDC) is started
and waited for; the whole setup takes a few hundredths of a second.

A proxy must be addressed as ``localhost``: the service principal is built from the host name
the client uses, and the database has no ``HTTP/127.0.0.1``.

MIT's library reads KRB5_CONFIG and KRB5CCNAME once per process, so a client under test runs as
a subprocess with ``realm.client_env()`` (or ``no_ticket_env()``); an acceptor such as Squid's
``negotiate_kerberos_auth`` gets ``server_env()``. Recipe and measurements:
/work/shared/CORPORATE-PROXIES.md section 4.7.

No root needed. Programs: ``krb5kdc`` and ``kdb5_util`` (krb5-kdc), ``kadmin.local``
(krb5-admin-server); when one is missing, :class:`peers.PeerMissing` names the package.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import peers
import pytest

REALM = "HOPCAT.TEST"
USER = "alice"
PASSWORD = "s3cret"
SERVICE = "HTTP/localhost"  # what HTTP@localhost becomes
SETUP_TIMEOUT_S = 30.0

PACKAGES = {"krb5kdc": "krb5-kdc", "kdb5_util": "krb5-kdc", "kadmin.local": "krb5-admin-server"}


@dataclass
class Realm:
    """A running KDC and the files a client and a server need; ``stop()`` ends the KDC by pid."""

    directory: Path
    krb5_conf: Path
    http_keytab: Path
    client_keytab: Path
    port: int
    proc: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def service_principal(self) -> str:
        return f"{SERVICE}@{REALM}"

    def _base_env(self) -> dict[str, str]:
        env = peers.peer_env()
        for key in [k for k in env if k.startswith("KRB5")]:
            del env[key]  # a developer's own ccache or keytab must not leak in
        env["KRB5_CONFIG"] = str(self.krb5_conf)
        return env

    def client_env(self) -> dict[str, str]:
        """alice's client keytab and a fresh in-memory ticket cache: GSSAPI can make tokens."""
        env = self._base_env()
        env["KRB5_CLIENT_KTNAME"] = f"FILE:{self.client_keytab}"
        env["KRB5CCNAME"] = f"MEMORY:hopcat-{secrets.token_hex(4)}"
        return env

    def no_ticket_env(self) -> dict[str, str]:
        """The realm's configuration but an empty ticket cache and no client keytab."""
        env = self._base_env()
        env["KRB5_CLIENT_KTNAME"] = f"FILE:{self.directory / 'none.keytab'}"
        env["KRB5CCNAME"] = f"FILE:{self.directory / 'empty.ccache'}"
        return env

    def server_env(self) -> dict[str, str]:
        """For an acceptor (Squid's Kerberos helper): the HTTP keytab and no replay cache file."""
        env = self._base_env()
        env["KRB5_KTNAME"] = f"FILE:{self.http_keytab}"
        env["KRB5RCACHETYPE"] = "none"
        return env

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"

    def stop(self) -> None:
        peers._stop_process(self.proc)


def _write_config(directory: Path, port: int) -> tuple[Path, Path]:
    krb5_conf = directory / "krb5.conf"
    # rdns and dns_canonicalize_hostname off: "localhost" must stay "localhost" in the SPN.
    # udp_preference_limit = 1: clients use TCP, the one kind of socket readiness is checked on.
    krb5_conf.write_text(f"""\
[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    udp_preference_limit = 1
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}
[domain_realm]
    localhost = {REALM}
""")
    kdc_conf = directory / "kdc.conf"
    kdc_conf.write_text(f"""\
[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}
[realms]
    {REALM} = {{
        database_name = {directory / "principal"}
        key_stash_file = {directory / "stash"}
        acl_file = {directory / "kadm5.acl"}
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}
[logging]
    kdc = FILE:{directory / "kdc.log"}
""")
    (directory / "kadm5.acl").touch()
    return krb5_conf, kdc_conf


def _admin_env(krb5_conf: Path, kdc_conf: Path) -> dict[str, str]:
    env = {k: v for k, v in peers.peer_env().items() if not k.startswith("KRB5")}
    env["KRB5_CONFIG"] = str(krb5_conf)
    env["KRB5_KDC_PROFILE"] = str(kdc_conf)
    return env


def _run(argv: list[str], env: dict[str, str], directory: Path) -> str:
    result = subprocess.run(
        argv, cwd=directory, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        timeout=SETUP_TIMEOUT_S,
    )  # fmt: skip
    output = (result.stdout + result.stderr).decode(errors="replace")
    if result.returncode != 0:
        raise peers.PeerStartError(f"{' '.join(argv)} failed ({result.returncode}):\n{output}")
    return output


def _create_database(directory: Path, env: dict[str, str], programs: dict[str, str]) -> None:
    kadmin = [programs["kadmin.local"], "-r", REALM, "-q"]
    _run([programs["kdb5_util"], "-r", REALM, "create", "-s", "-P", secrets.token_hex(16)],
         env, directory)  # fmt: skip
    outputs = [
        _run([*kadmin, query], env, directory)
        for query in (
            f"addprinc -pw {PASSWORD} {USER}",
            f"addprinc -randkey {SERVICE}",
            f"ktadd -k {directory / 'http.keytab'} {SERVICE}",
            f"ktadd -norandkey -k {directory / 'alice.keytab'} {USER}",
        )
    ]
    # kadmin.local exits 0 after a failed query: the keytabs are the proof.
    for keytab in ("http.keytab", "alice.keytab"):
        path = directory / keytab
        if not path.exists() or path.stat().st_size == 0:
            raise peers.PeerStartError(f"kadmin.local wrote no {path}:\n" + "".join(outputs))


def start_realm(directory: Path, *, timeout: float = peers.READY_TIMEOUT_S) -> Realm:
    """Create realm HOPCAT.TEST in ``directory`` and start its KDC; PeerMissing without MIT's."""
    programs = {name: peers.require_program(name, package) for name, package in PACKAGES.items()}
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "krb5kdc.out"
    failure = ""
    for attempt in range(1, peers.START_ATTEMPTS + 1):
        port = peers.pick_port()
        krb5_conf, kdc_conf = _write_config(directory, port)
        env = _admin_env(krb5_conf, kdc_conf)
        if attempt == 1:
            _create_database(directory, env, programs)
        with open(log_path, "ab") as out:
            start = out.tell()
            proc = subprocess.Popen(
                [programs["krb5kdc"], "-n", "-r", REALM], cwd=directory, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        realm = Realm(directory, krb5_conf, directory / "http.keytab", directory / "alice.keytab",
                      port, proc, directory / "kdc.log")  # fmt: skip

        def ready(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
            return proc.poll() is not None or peers.listening(proc.pid, peers.LOOPBACK_V4, port)

        try:
            peers.wait_until(ready, timeout, f"krb5kdc to listen on 127.0.0.1:{port}")
        except TimeoutError as e:
            realm.stop()
            raise peers.PeerStartError(f"{e}; log:\n{peers._tail(realm.log())}") from None
        if proc.poll() is None:
            return realm
        realm.stop()
        output = log_path.read_bytes()[start:].decode(errors="replace") + realm.log()
        failure = f"krb5kdc exited ({proc.returncode}):\n{peers._tail(output)}"
        if not peers._says_in_use(output):
            break
    raise peers.PeerStartError(failure)


@pytest.fixture(scope="session")
def krb5_realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    """Realm HOPCAT.TEST with its KDC running (see the module docstring); skips without MIT's KDC."""
    try:
        realm = start_realm(tmp_path_factory.mktemp("krb5"))
    except peers.PeerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield realm
    finally:
        realm.stop()
