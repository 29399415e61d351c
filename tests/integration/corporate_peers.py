"""Authenticating HTTP proxies on loopback: Squid (Basic, Digest, NTLM, Negotiate), Apache (Digest).

The recipes, their measurements and the pitfalls they avoid are in
``/work/shared/CORPORATE-PROXIES.md`` sections 4.1 to 4.11; each starter below names its section.
Like ``peers.py``, every starter is a plain function taking a work directory (configs, logs and
password files live there) and returning a running :class:`AuthProxy`, so fixtures can be
session-scoped and scripts can use them without pytest. The pytest fixtures are at the end of
this module; ``conftest.py`` registers them.

What an :class:`AuthProxy` offers: ``.host`` (``127.0.0.1``, where it listens), ``.port``,
``.hostport``, ``.url(username=..., password=..., host=..., auth=True)`` (``http://`` with the
proxy's credentials percent-encoded unless told otherwise), ``.url_host`` (the name to address it
by: ``localhost`` for the Kerberos ones, whose service principal is ``HTTP/localhost``),
``.username`` / ``.password`` / ``.domain``, ``.schemes`` (what its 407 offers, in order),
``.log(name)`` / ``.cache_log()`` / ``.access_log()`` and ``.log_size(name)`` for "what came after
a mark", ``.report_sections()`` (every log, for a failure report), ``.pid``, ``.stop()``.

Fixtures (all session-scoped; each skips naming the apt package of a missing program)::

    squid_basic                   Basic, alice / 's3cret pass'                      section 4.3
    squid_digest                  Digest MD5, alice / s3cret, stale after 3 uses    section 4.4
    squid_ntlm_fake[_close]       NTLM handshake only, keep_alive on [off]          section 4.5
    squid_acl_443                 stock CONNECT rules (403 but for 443), then Basic section 4.2
    samba_winbind                 Winbind: winbindd in its mount namespace (root)   section 4.6
    samba_ntlm                    NTLMv2 checked by Samba, HOPCATPROXY\\nobody      section 4.6
    squid_negotiate               Negotiate/Kerberos (needs kdc.krb5_realm)         section 4.7
    squid_multi                   Negotiate, NTLM, Digest, Basic (krb5_realm, root) section 4.8
    squid_negotiate_wrapper_only  Negotiate only: Kerberos or raw NTLMSSP (same)    section 4.8
    apache_digest                 Apache mod_proxy_connect, Digest, alice / s3cret  section 4.9

Squids are stopped with SIGKILL: SIGTERM takes 3 to 4.6 s even with ``shutdown_lifetime 0``;
SIGKILL of the ``squid -N`` pid is instant, its helpers exit on stdin EOF (section 4.1) and its
process group is killed too. Each Squid gets its own service name (``-n``): Squid 5.7 creates
``/dev/shm/<service>-cf__*.shm`` even without SMP workers, SIGKILL leaves them behind, and a Squid
of another user meeting them under the default name "squid" dies (``shm_open ... File exists``);
``stop()`` removes them. Measured here: a Squid listens 0.07 to 0.13 s after its start and is gone
4 ms after ``stop()``; Apache 0.02 s and 0.03 s; winbindd accepts a login after 0.4 to 0.5 s.

Root (CI runs as root): Squid drops to ``cache_effective_user proxy`` and Apache to ``www-data``,
so their directories are chowned to those users, and every ancestor of a work directory gets
the others' search bit (``o+x``, never read): pytest's ``/tmp/pytest-of-root`` is 0700, and the
helpers (``basic_ncsa_auth``, ``ntlm_auth``) open files under it as the unprivileged user. Not
root: no ``cache_effective_user``/``User`` lines, no chown, the programs run as the caller; the
Samba fixtures then skip (a mount namespace and winbindd's privileged pipe need root).

Samba (section 4.6): ``libwbclient`` only looks for winbindd at the compiled-in
``/run/samba/winbindd``, so winbindd runs in a private mount namespace (``unshare -m``) where a
temp directory is bind-mounted on ``/run/samba``; every Squid whose helper is ``ntlm_auth`` is
started inside that namespace with ``nsenter -t <winbindd pid> -m``. The host's ``/run/samba`` is
never touched. The namespace ends with its last process.

Kerberos (sections 4.7 and 4.8): a ``Realm`` from ``kdc.py`` (an MIT KDC on loopback) gives the
``krb5.conf`` and the ``HTTP/localhost`` keytab; both are copied into the Squid's directory (it
belongs to ``proxy``). Address these proxies as ``localhost``: as ``127.0.0.1`` the client asks for
``HTTP/127.0.0.1`` and the KDC does not know it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import peers
import pytest

SQUID_REALM = "hopcat-test"  # Basic and Digest realm of every proxy here

BASIC_USER = "alice"
BASIC_PASSWORD = "s3cret pass"  # a space: clients that cut at one (proxytunnel) fail visibly
DIGEST_USER = "alice"
DIGEST_PASSWORD = "s3cret"
NTLM_FAKE_USER = "CORP\\alice"  # ntlm_fake_auth accepts any password
NTLM_FAKE_PASSWORD = "s3cret"
# Samba's SAM user must map to a Unix account: 'nobody' exists everywhere (no useradd needed).
NTLM_USER = "nobody"
NTLM_PASSWORD = "Ntlm-s3cret"
NTLM_DOMAIN = "HOPCATPROXY"  # Samba's netbios name; the NTLM domain its CHALLENGE announces

SQUID_LIB = Path("/usr/lib/squid")
NTLM_AUTH = "/usr/bin/ntlm_auth"
SQUID_USER = "proxy"  # Debian's cache_effective_user
APACHE_USER = "www-data"
SQUID_LOGS = ("cache.log", "access.log")  # and start_daemon's stdout log, <name>.log
APACHE_LOGS = ("error.log", "access.log")
WINBIND_READY_TIMEOUT_S = 15.0  # pipes up and a test login accepted; about 1 s measured

PACKAGE_OF = {
    "squid": "squid",
    "htpasswd": "apache2-utils",
    "ntlm_auth": "winbind",
    "winbindd": "winbind",
    "smbpasswd": "samba-common-bin",
    "apache2": "apache2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "mount": "mount",
}

# The usual tail: nothing passes without credentials (section 4.3).
REQUIRE_AUTH = [
    "acl authed proxy_auth REQUIRED",
    "http_access deny !authed",
    "http_access allow authed",
    "http_access deny all",
]


def _require(program: str) -> str:
    return peers.require_program(program, PACKAGE_OF.get(program, program))


def _require_helper(name: str) -> str:
    path = SQUID_LIB / name
    if not path.exists():
        raise peers.PeerMissing(str(path), "squid")
    return str(path)


# --------------------------------------------------------------------------- files and users


def _open_ancestors(path: Path) -> None:
    """Give every ancestor of ``path`` the others' search bit, so an unprivileged user reaches it."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _give_to(user: str, *paths: Path) -> None:
    """As root, hand ``paths`` (recursively) to ``user``; the daemon drops to it and writes logs."""
    if not peers.is_root():
        return
    for top in paths:
        _open_ancestors(top)
        shutil.chown(top, user, user)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                shutil.chown(Path(dirpath, name), user, user)


def digest_line(user: str, password: str, realm: str = SQUID_REALM) -> str:
    """A ``user:realm:HA1`` line (``digest_file_auth -c``, Apache's AuthUserFile for Digest)."""
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode(), usedforsecurity=False).hexdigest()
    return f"{user}:{realm}:{ha1}\n"


def write_digest_file(path: Path, users: Iterable[tuple[str, str]]) -> Path:
    path.write_text("".join(digest_line(u, p) for u, p in users))
    return path


def write_htpasswd(path: Path, users: Iterable[tuple[str, str]]) -> Path:
    """``htpasswd -m`` ($apr1$ MD5): basic_ncsa_auth does not understand bcrypt (``-B``)."""
    htpasswd = _require("htpasswd")
    for i, (user, password) in enumerate(users):
        flags = "-bcm" if i == 0 else "-bm"
        subprocess.run(
            [htpasswd, flags, str(path), user, password],
            check=True, capture_output=True, timeout=30, env=peers.peer_env(),
        )  # fmt: skip
    return path


# --------------------------------------------------------------------------- the running proxy


SHM_DIR = Path("/dev/shm")


class _SquidDaemon(peers.Daemon):
    """SIGKILL at once, then the process group, then the shared memory Squid leaves behind."""

    def __init__(self, *args: Any, service: str) -> None:
        super().__init__(*args)
        self.service = service

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(peers.STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        # Squid 5.7 creates /dev/shm/<service>-cf__*.shm even without SMP and only a clean
        # shutdown removes them.
        for segment in SHM_DIR.glob(f"{self.service}-*.shm"):
            segment.unlink(missing_ok=True)


class AuthProxy:
    """A running authenticating HTTP proxy (see the module docstring for what it offers)."""

    def __init__(
        self, daemon: peers.Daemon, *, schemes: Sequence[str], username: str | None,
        password: str | None, domain: str | None = None, url_host: str | None = None,
        logs: Sequence[str] = SQUID_LOGS, winbind: Winbind | None = None,
    ) -> None:  # fmt: skip
        self.daemon = daemon
        self.name = daemon.name
        self.host = daemon.host
        self.port = daemon.port
        self.workdir = daemon.workdir
        self.schemes = tuple(schemes)
        self.username = username
        self.password = password
        self.domain = domain
        self.url_host = url_host or daemon.host
        self.logs = (*logs, daemon.log_path.name)
        self.winbind = winbind  # the namespace its ntlm_auth helpers talk to, if any

    @property
    def pid(self) -> int:
        return self.daemon.pid

    @property
    def hostport(self) -> str:
        return peers.format_hostport(self.host, self.port)

    def url(
        self, username: str | None = None, password: str | None = None, *,
        host: str | None = None, auth: bool = True,
    ) -> str:  # fmt: skip
        """``http://user:pass@host:port``: this proxy's credentials unless others are given;
        ``auth=False`` gives none; ``host`` replaces ``url_host``."""
        user = username if username is not None else self.username
        pw = password if password is not None else self.password
        userinfo = ""
        if auth and user is not None:
            userinfo = urllib.parse.quote(user, safe="")
            if pw is not None:
                userinfo += ":" + urllib.parse.quote(pw, safe="")
            userinfo += "@"
        return f"http://{userinfo}{peers.format_hostport(host or self.url_host, self.port)}"

    def log_size(self, name: str | None = None) -> int:
        try:
            return (self.workdir / (name or self.logs[0])).stat().st_size
        except OSError:
            return 0

    def log(self, name: str | None = None, since: int = 0) -> str:
        """A log file of this proxy (default: the first of ``logs``), from byte ``since``."""
        path = self.workdir / (name or self.logs[0])
        try:
            with open(path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"

    def cache_log(self) -> str:
        """Squid's cache.log (helper errors land there); Apache's error.log."""
        return self.log(self.logs[0])

    def access_log(self) -> str:
        return self.log("access.log")

    def report_sections(self) -> list[tuple[str, str]]:
        """(title, tail) for each log (and winbindd's), to attach to a failed test's report."""
        sections = [
            (f"{self.name} {name} ({self.workdir / name})", peers._tail(self.log(name)))
            for name in self.logs
        ]
        return sections + (self.winbind.report_sections() if self.winbind else [])

    def alive(self) -> bool:
        return self.daemon.alive()

    def stop(self) -> None:
        self.daemon.stop()

    def __enter__(self) -> AuthProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<AuthProxy {self.name} pid={self.pid} {self.url(auth=False)} {self.schemes}>"


# --------------------------------------------------------------------------- Squid (4.1)


class Winbind:
    """winbindd in its private mount namespace (section 4.6); ``nsenter_argv()`` joins it."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, smb_conf: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.smb_conf = smb_conf

    @property
    def pid(self) -> int:
        return self.proc.pid

    def nsenter_argv(self) -> list[str]:
        """Prefix that runs a program in winbindd's mount namespace (nsenter execs: same pid)."""
        return [_require("nsenter"), "-t", str(self.pid), "-m"]

    def ntlm_auth_helper(self) -> str:
        """The Squid helper command line for raw NTLMSSP (also what negotiate_wrapper wants)."""
        return f"{NTLM_AUTH} --configfile={self.smb_conf} --helper-protocol=squid-2.5-ntlmssp"

    def log(self) -> str:
        # log.winbindd, log.wb-HOPCATPROXY (the domain child), log. (the test login)
        paths = [self.workdir / "winbindd.stdout", *sorted(self.workdir.glob("log.*"))]
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in paths if p.exists()
        )

    def report_sections(self) -> list[tuple[str, str]]:
        return [(f"winbindd logs ({self.workdir})", peers._tail(self.log()))]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        # --no-process-group keeps the domain child in our session's group: one killpg ends both.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(peers.STOP_TIMEOUT_S)


def _squid_conf(workdir: Path, port: int, auth_lines: Sequence[str]) -> str:
    # Section 4.1: no cache_dir, no shared memory, no DNS for IP targets, no pinger.
    lines = [
        f"http_port {peers.LOOPBACK_V4}:{port}",
        "visible_hostname hopcat-test",
        *([f"cache_effective_user {SQUID_USER}"] if peers.is_root() else []),
        f"pid_filename {workdir}/run.pid",
        f"cache_log {workdir}/cache.log",
        f"access_log stdio:{workdir}/access.log",
        "cache_store_log none",
        "cache deny all",
        "cache_mem 8 MB",
        f"coredump_dir {workdir}",
        "netdb_filename none",
        "pinger_enable off",
        "shutdown_lifetime 0 seconds",
        "logfile_rotate 0",
        "dns_nameservers 127.0.0.1",
        *auth_lines,
    ]
    return "\n".join(lines) + "\n"


def start_squid(
    workdir: Path, auth_lines: Sequence[str], *, schemes: Sequence[str],
    username: str | None = None, password: str | None = None, domain: str | None = None,
    url_host: str | None = None, namespace: Winbind | None = None,
    env: dict[str, str] | None = None, name: str = "squid",
    timeout: float = peers.READY_TIMEOUT_S,
) -> AuthProxy:  # fmt: skip
    """Squid on 127.0.0.1 with the base config of section 4.1 plus ``auth_lines`` (auth_param,
    acl and http_access lines). Files the lines name should already be in ``workdir``.

    ``namespace``: run inside winbindd's mount namespace (for ``ntlm_auth`` helpers).
    ``env``: extra environment for Squid and its helpers (``KRB5_CONFIG``).
    """
    squid = _require("squid")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "squid.conf"
    prefix = [*(namespace.nsenter_argv() if namespace else [])]
    if env:
        # env(1) and nsenter(1) exec, so the pid start_daemon waits on is Squid's own.
        prefix = [shutil.which("env") or "/usr/bin/env", *(f"{k}={v}" for k, v in env.items()),
                  *prefix]  # fmt: skip

    # Squid names its shared memory segments after the service name (default "squid"): Squids
    # sharing one name clash ("shm_open ... File exists" once another user's segment is there).
    service = f"hopcat{secrets.token_hex(6)}"  # alphanumeric only

    def make_argv(port: int) -> list[str]:
        conf.write_text(_squid_conf(workdir, port, auth_lines))
        _give_to(SQUID_USER, workdir)
        # -d 1 copies cache.log's errors to stdout, where start_daemon looks for "in use".
        return [*prefix, squid, "-N", "-d", "1", "-n", service, "-f", str(conf)]

    daemon = peers.start_daemon(
        name, workdir, make_argv, scheme="http", username=username, password=password,
        cls=_SquidDaemon, cls_kwargs={"service": service}, timeout=timeout,
    )  # fmt: skip
    return AuthProxy(
        daemon, schemes=schemes, username=username, password=password, domain=domain,
        url_host=url_host, winbind=namespace,
    )  # fmt: skip


def start_squid_basic(workdir: Path) -> AuthProxy:
    """Section 4.3: Basic via ``basic_ncsa_auth``, alice / 's3cret pass'."""
    helper = _require_helper("basic_ncsa_auth")
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_htpasswd(workdir / "passwd", [(BASIC_USER, BASIC_PASSWORD)])
    lines = _basic_lines(helper, passwd) + REQUIRE_AUTH
    return start_squid(workdir, lines, schemes=["Basic"], username=BASIC_USER,
                       password=BASIC_PASSWORD, name="squid-basic")  # fmt: skip


def _basic_lines(helper: str, passwd: Path) -> list[str]:
    return [
        f"auth_param basic program {helper} {passwd.resolve()}",
        "auth_param basic children 1 startup=1 idle=1",
        f"auth_param basic realm {SQUID_REALM}",
    ]


def _digest_lines(helper: str, passwd: Path, nonce_max_count: int | None) -> list[str]:
    lines = [
        f"auth_param digest program {helper} -c {passwd.resolve()}",
        "auth_param digest children 1 startup=1 idle=1",
        f"auth_param digest realm {SQUID_REALM}",
    ]
    if nonce_max_count is not None:
        lines += [
            "auth_param digest nonce_garbage_interval 1 minute",
            "auth_param digest nonce_max_duration 2 minutes",
            f"auth_param digest nonce_max_count {nonce_max_count}",
            "auth_param digest check_nonce_count on",
            "auth_param digest nonce_strictness off",
        ]
    return lines


def start_squid_digest(workdir: Path, *, nonce_max_count: int = 3) -> AuthProxy:
    """Section 4.4: Digest MD5 qop=auth via ``digest_file_auth -c``, alice / s3cret.

    A nonce serves ``nonce_max_count`` requests (Squid's count is off by one: with 3, nc=2,3,4
    pass), then Squid answers ``407 ... stale=true``; re-answering with the new nonce on the same
    connection gives 200. A wrong password gives a 407 without ``stale=true``.
    """
    helper = _require_helper("digest_file_auth")
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_digest_file(workdir / "passwd", [(DIGEST_USER, DIGEST_PASSWORD)])
    lines = _digest_lines(helper, passwd, nonce_max_count) + REQUIRE_AUTH
    return start_squid(workdir, lines, schemes=["Digest"], username=DIGEST_USER,
                       password=DIGEST_PASSWORD, name="squid-digest")  # fmt: skip


def _ntlm_lines(helper: str, keep_alive: bool = True) -> list[str]:
    return [
        f"auth_param ntlm program {helper}",
        "auth_param ntlm children 1 startup=1 idle=1",
        f"auth_param ntlm keep_alive {'on' if keep_alive else 'off'}",
    ]


def start_squid_ntlm_fake(workdir: Path, *, keep_alive: bool = True) -> AuthProxy:
    """Section 4.5: NTLM handshake via ``ntlm_fake_auth`` (any password passes: the flow and the
    framing are checked, never the crypto). Its CHALLENGE is malformed: it echoes
    NEGOTIATE_TARGET_INFO without a TargetInfo and has a garbage TargetName offset.

    ``keep_alive=False``: the first 407 (a bare ``NTLM`` offer) comes with ``Connection: close``
    and the client must run Type 1/2/3 on a new connection.
    """
    helper = _require_helper("ntlm_fake_auth")
    lines = _ntlm_lines(helper, keep_alive) + REQUIRE_AUTH
    return start_squid(
        workdir, lines, schemes=["NTLM"], username=NTLM_FAKE_USER, password=NTLM_FAKE_PASSWORD,
        name="squid-ntlm-fake" if keep_alive else "squid-ntlm-fake-close",
    )  # fmt: skip


def start_squid_acl_443(workdir: Path, *, tunnel_ports: Iterable[int] = ()) -> AuthProxy:
    """Section 4.2: Debian's stock CONNECT rules, then Basic (alice / 's3cret pass').

    CONNECT to any port but 443 gets ``403 Forbidden`` (``X-Squid-Error: ERR_ACCESS_DENIED``)
    before credentials are asked for. ``tunnel_ports`` are allowed as well (how a corporate
    Squid lets ssh through).
    """
    helper = _require_helper("basic_ncsa_auth")
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_htpasswd(workdir / "passwd", [(BASIC_USER, BASIC_PASSWORD)])
    ports = " ".join(str(p) for p in tunnel_ports)
    lines = [
        "acl SSL_ports port 443",
        "acl Safe_ports port 80 21 443 70 210 1025-65535 280 488 591 777",
        *([f"acl tunnel_ports port {ports}"] if ports else []),
        "http_access deny !Safe_ports",
        f"http_access deny CONNECT !SSL_ports{' !tunnel_ports' if ports else ''}",
        *_basic_lines(helper, passwd),
        *REQUIRE_AUTH,
    ]
    return start_squid(workdir, lines, schemes=["Basic"], username=BASIC_USER,
                       password=BASIC_PASSWORD, name="squid-acl-443")  # fmt: skip


# --------------------------------------------------------------------------- Samba (4.6)


def _smb_conf(sdir: Path) -> str:
    return f"""[global]
    workgroup = HOPCAT
    netbios name = {NTLM_DOMAIN}
    server role = standalone server
    passdb backend = tdbsam:{sdir}/private/passdb.tdb
    private dir = {sdir}/private
    lock directory = {sdir}/lock
    state directory = {sdir}/state
    cache directory = {sdir}/cache
    pid directory = {sdir}/pid
    ncalrpc dir = {sdir}/ncalrpc
    binddns dir = {sdir}/bind-dns
    winbindd socket directory = /run/samba/winbindd
    log file = {sdir}/log.%m
    log level = 1
    ntlm auth = ntlmv2-only
    interfaces = lo
    bind interfaces only = yes
    disable netbios = yes
    load printers = no
    printcap name = /dev/null
    rpc start on demand helpers = no
"""


# Runs as unshare's command: $1 is bind-mounted on /run/samba in the new namespace only, then
# the shell becomes winbindd, so the pid unshare started is winbindd's.
_WINBIND_SCRIPT = 'mount --bind "$1" /run/samba && exec "$2" -F --no-process-group -s "$3"'


def start_winbind(workdir: Path, *, timeout: float = WINBIND_READY_TIMEOUT_S) -> Winbind:
    """Section 4.6: a standalone Samba SAM with ``nobody`` / ``Ntlm-s3cret`` (domain
    HOPCATPROXY, NTLMv2 only) and winbindd in a private mount namespace. Root only."""
    if not peers.is_root():
        raise peers.PeerUnavailable("winbindd in a mount namespace needs root (unshare -m)")
    winbindd = _require("winbindd")
    smbpasswd = _require("smbpasswd")
    ntlm_auth = _require("ntlm_auth")
    unshare, nsenter = _require("unshare"), _require("nsenter")
    _require("mount")
    if not Path("/run/samba").is_dir():
        raise peers.PeerUnavailable("/run/samba missing: the winbind package creates it")
    sdir = workdir.resolve()
    for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc", "bind-dns",
                "run/winbindd"):  # fmt: skip
        (sdir / sub).mkdir(parents=True, exist_ok=True)
    conf = sdir / "smb.conf"
    conf.write_text(_smb_conf(sdir))
    env = peers.peer_env()
    added = subprocess.run(
        [smbpasswd, "-c", str(conf), "-a", "-s", NTLM_USER],
        input=f"{NTLM_PASSWORD}\n{NTLM_PASSWORD}\n".encode(),
        capture_output=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    if added.returncode != 0:
        raise peers.PeerStartError(f"smbpasswd -a {NTLM_USER} failed: {added.stderr.decode()}")
    # The helpers run as 'proxy' and read smb.conf: reachable, not writable.
    conf.chmod(0o644)
    _open_ancestors(conf)
    with open(sdir / "winbindd.stdout", "ab") as out:
        proc = subprocess.Popen(
            [unshare, "-m", "--propagation", "private", "sh", "-c", _WINBIND_SCRIPT, "sh",
             str(sdir / "run"), winbindd, str(conf)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=sdir, env=env,
            start_new_session=True,
        )  # fmt: skip
    winbind = Winbind(proc, sdir, conf)
    privileged = sdir / "state" / "winbindd_privileged"
    check = [nsenter, "-t", str(proc.pid), "-m", ntlm_auth, f"--configfile={conf}",
             f"--username={NTLM_USER}", f"--domain={NTLM_DOMAIN}", f"--password={NTLM_PASSWORD}"]  # fmt: skip
    state = {"last": ""}

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        if not ((privileged / "pipe").is_socket() and (sdir / "run/winbindd/pipe").is_socket()):
            return False
        res = subprocess.run(check, capture_output=True, timeout=30, env=env, check=False)
        state["last"] = (res.stdout + res.stderr).decode(errors="replace").strip()
        return res.returncode == 0

    try:
        peers.wait_until(ready, timeout, "winbindd to accept a test login")
        if proc.poll() is not None:
            raise peers.PeerStartError(f"winbindd exited ({proc.returncode}):\n{winbind.log()}")
    except TimeoutError as e:
        winbind.stop()
        raise peers.PeerStartError(
            f"{e}; ntlm_auth said {state['last']!r}\n{winbind.log()}"
        ) from None
    except BaseException:
        winbind.stop()
        raise
    # ntlm_auth, run by Squid as 'proxy', needs winbindd's privileged pipe for NTLM.
    shutil.chown(privileged, group=SQUID_USER)
    return winbind


def start_squid_samba_ntlm(workdir: Path, winbind: Winbind) -> AuthProxy:
    """Section 4.6: NTLM(v2) really checked by Samba: ``nobody`` / ``Ntlm-s3cret``, domain
    HOPCATPROXY (``HOPCATPROXY\\nobody`` and bare ``nobody`` both pass)."""
    lines = _ntlm_lines(winbind.ntlm_auth_helper()) + REQUIRE_AUTH
    return start_squid(
        workdir, lines, schemes=["NTLM"], username=NTLM_USER, password=NTLM_PASSWORD,
        domain=NTLM_DOMAIN, namespace=winbind, name="squid-samba-ntlm",
    )  # fmt: skip


# --------------------------------------------------------------------------- Kerberos (4.7, 4.8)


class KerberosRealm(Protocol):
    """What the Squid side needs of ``kdc.Realm``."""

    krb5_conf: Path
    http_keytab: Path

    @property
    def service_principal(self) -> str: ...


SPN_HOST = "localhost"  # the proxy's name in its service principal HTTP/localhost


def _kerberos_files(workdir: Path, realm: KerberosRealm) -> tuple[Path, dict[str, str]]:
    """Copy krb5.conf and the HTTP keytab into the Squid directory (it becomes proxy's)."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keytab = workdir / "http.keytab"
    krb5_conf = workdir / "krb5.conf"
    shutil.copyfile(realm.http_keytab, keytab)
    shutil.copyfile(realm.krb5_conf, krb5_conf)
    keytab.chmod(0o600)
    (workdir / "rcache").mkdir(exist_ok=True)
    return keytab, {"KRB5_CONFIG": str(krb5_conf)}


def _kerberos_helper(keytab: Path, realm: KerberosRealm) -> str:
    return (f"{_require_helper('negotiate_kerberos_auth')} -k {keytab}"
            f" -s {realm.service_principal} -c {keytab.parent / 'rcache'}")  # fmt: skip


def _negotiate_lines(program: str) -> list[str]:
    return [
        f"auth_param negotiate program {program}",
        "auth_param negotiate children 1 startup=1 idle=1",
        "auth_param negotiate keep_alive on",
    ]


def start_squid_negotiate(workdir: Path, realm: KerberosRealm) -> AuthProxy:
    """Section 4.7: Negotiate (SPNEGO/Kerberos) via ``negotiate_kerberos_auth``. Address it as
    ``localhost`` (``.url()`` does). Its CONNECT 200 has no final token: the client's context
    stays incomplete. Needs no root beyond the usual chown."""
    keytab, env = _kerberos_files(workdir, realm)
    lines = _negotiate_lines(_kerberos_helper(keytab, realm)) + REQUIRE_AUTH
    return start_squid(workdir, lines, schemes=["Negotiate"], url_host=SPN_HOST, env=env,
                       name="squid-negotiate")  # fmt: skip


def _wrapper_program(keytab: Path, realm: KerberosRealm, winbind: Winbind) -> str:
    # The wrapper hands raw NTLMSSP (tokens starting TlRMTVNT) to --ntlm and the rest to
    # --kerberos; --helper-protocol=gss-spnego on the NTLM side FAILED (section 4.8).
    wrapper = _require_helper("negotiate_wrapper_auth")
    return (f"{wrapper} --ntlm {winbind.ntlm_auth_helper()}"
            f" --kerberos {_kerberos_helper(keytab, realm)}")  # fmt: skip


def start_squid_multi(workdir: Path, realm: KerberosRealm, winbind: Winbind) -> AuthProxy:
    """Section 4.8: one Squid offering Negotiate (Kerberos, or raw NTLMSSP via
    ``negotiate_wrapper_auth``), NTLM (Samba), Digest and Basic, one 407 header each, in that
    order. ``nobody`` / ``Ntlm-s3cret`` passes every password scheme (a client falling back from
    Negotiate needs one credential that works everywhere); alice / s3cret (Digest) and alice /
    's3cret pass' (Basic) pass as in sections 4.4 and 4.3."""
    keytab, env = _kerberos_files(workdir, realm)
    digest_pw = write_digest_file(
        workdir / "digest.pw", [(NTLM_USER, NTLM_PASSWORD), (DIGEST_USER, DIGEST_PASSWORD)]
    )
    basic_pw = write_htpasswd(
        workdir / "basic.pw", [(NTLM_USER, NTLM_PASSWORD), (BASIC_USER, BASIC_PASSWORD)]
    )
    lines = [
        *_negotiate_lines(_wrapper_program(keytab, realm, winbind)),
        *_ntlm_lines(winbind.ntlm_auth_helper()),
        *_digest_lines(_require_helper("digest_file_auth"), digest_pw, None),
        *_basic_lines(_require_helper("basic_ncsa_auth"), basic_pw),
        *REQUIRE_AUTH,
    ]
    return start_squid(
        workdir, lines, schemes=["Negotiate", "NTLM", "Digest", "Basic"], username=NTLM_USER,
        password=NTLM_PASSWORD, domain=NTLM_DOMAIN, url_host=SPN_HOST, namespace=winbind,
        env=env, name="squid-multi",
    )  # fmt: skip


def start_squid_negotiate_wrapper_only(
    workdir: Path, realm: KerberosRealm, winbind: Winbind
) -> AuthProxy:
    """Section 4.8's ``negotiate_wrapper_auth`` line alone: a Negotiate-only proxy. Without a
    ticket a client must send raw NTLMSSP under the name ``Negotiate`` (what Windows does);
    SPNEGO-wrapped NTLM goes to the Kerberos helper and fails. nobody / Ntlm-s3cret."""
    keytab, env = _kerberos_files(workdir, realm)
    lines = _negotiate_lines(_wrapper_program(keytab, realm, winbind)) + REQUIRE_AUTH
    return start_squid(
        workdir, lines, schemes=["Negotiate"], username=NTLM_USER, password=NTLM_PASSWORD,
        domain=NTLM_DOMAIN, url_host=SPN_HOST, namespace=winbind, env=env,
        name="squid-negotiate-wrapper",
    )  # fmt: skip


# --------------------------------------------------------------------------- Apache (4.9)

APACHE_MODULES = Path("/usr/lib/apache2/modules")
# mod_proxy_connect allows only 443 and 563 by default; the targets' ports are ephemeral and a
# session-scoped proxy cannot know them, so the whole unprivileged range is listed.
APACHE_CONNECT_PORTS = ("22", "443", "1024-65535")


def start_apache_digest(
    workdir: Path, *, allow_connect: Iterable[str] = APACHE_CONNECT_PORTS,
    timeout: float = peers.READY_TIMEOUT_S,
) -> AuthProxy:  # fmt: skip
    """Section 4.9: Apache ``mod_proxy_connect`` + ``mod_auth_digest`` (MD5, qop=auth),
    alice / s3cret. Its 407 has a Content-Length and no Connection header (keep-alive); its
    success line is ``HTTP/1.0 200 Connection Established``."""
    apache2 = _require("apache2")
    if not (APACHE_MODULES / "mod_proxy_connect.so").exists():
        raise peers.PeerMissing(str(APACHE_MODULES / "mod_proxy_connect.so"), "apache2")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = write_digest_file(workdir / "digest.pw", [(DIGEST_USER, DIGEST_PASSWORD)])
    conf = workdir / "httpd.conf"
    modules = [
        ("mpm_event", "mod_mpm_event"), ("authn_core", "mod_authn_core"),
        ("authn_file", "mod_authn_file"), ("authz_core", "mod_authz_core"),
        ("authz_user", "mod_authz_user"), ("auth_digest", "mod_auth_digest"),
        ("proxy", "mod_proxy"), ("proxy_connect", "mod_proxy_connect"),
    ]  # fmt: skip

    def make_argv(port: int) -> list[str]:
        lines = [
            f"ServerRoot {workdir}",
            "ServerName localhost",
            f"Listen {peers.LOOPBACK_V4}:{port}",
            f"PidFile {workdir}/httpd.pid",
            f"ErrorLog {workdir}/error.log",
            "LogLevel info auth_digest:debug proxy_connect:debug",
            'LogFormat "%h %u \\"%r\\" %>s %b" common',
            f"CustomLog {workdir}/access.log common",
            # Debian's apache2 has mod_unixd built in; User/Group make sense only as root.
            *([f"User {APACHE_USER}", f"Group {APACHE_USER}"] if peers.is_root() else []),
            "StartServers 1",
            "ServerLimit 1",
            "ThreadsPerChild 8",
            "MaxRequestWorkers 8",
            *(f"LoadModule {m}_module {APACHE_MODULES}/{so}.so" for m, so in modules),
            "ProxyRequests On",
            f"AllowCONNECT {' '.join(allow_connect)}",
            '<Proxy "*">',
            "    AuthType Digest",
            f'    AuthName "{SQUID_REALM}"',
            "    AuthDigestProvider file",
            f"    AuthUserFile {passwd}",
            "    Require valid-user",
            "</Proxy>",
        ]
        conf.write_text("\n".join(lines) + "\n")
        _give_to(APACHE_USER, workdir)
        return [apache2, "-f", str(conf), "-D", "FOREGROUND"]

    daemon = peers.start_daemon(
        "apache2", workdir, make_argv, scheme="http", username=DIGEST_USER,
        password=DIGEST_PASSWORD, timeout=timeout,
    )  # fmt: skip
    return AuthProxy(daemon, schemes=["Digest"], username=DIGEST_USER, password=DIGEST_PASSWORD,
                     logs=APACHE_LOGS)  # fmt: skip


# --------------------------------------------------------------------------- pytest fixtures


def _started(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except peers.PeerUnavailable as e:
        pytest.skip(str(e))


@contextlib.contextmanager
def _running(fn: Callable[..., AuthProxy], *args: Any, **kwargs: Any) -> Iterator[AuthProxy]:
    proxy: AuthProxy = _started(fn, *args, **kwargs)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def squid_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Squid, Basic: alice / 's3cret pass'."""
    with _running(start_squid_basic, tmp_path_factory.mktemp("squid-basic")) as p:
        yield p


@pytest.fixture(scope="session")
def squid_digest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Squid, Digest MD5: alice / s3cret, realm hopcat-test, stale=true after 3 uses of a nonce."""
    with _running(start_squid_digest, tmp_path_factory.mktemp("squid-digest")) as p:
        yield p


@pytest.fixture(scope="session")
def squid_ntlm_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Squid, NTLM handshake only (any password), keep_alive on."""
    with _running(start_squid_ntlm_fake, tmp_path_factory.mktemp("squid-ntlm-fake")) as p:
        yield p


@pytest.fixture(scope="session")
def squid_ntlm_fake_close(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Squid, NTLM handshake only, keep_alive off: the first 407 closes the connection."""
    with _running(start_squid_ntlm_fake, tmp_path_factory.mktemp("squid-ntlm-fake-close"),
                  keep_alive=False) as p:  # fmt: skip
        yield p


@pytest.fixture(scope="session")
def squid_acl_443(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Squid with Debian's stock CONNECT rules (443 only: 403 before auth), then Basic."""
    with _running(start_squid_acl_443, tmp_path_factory.mktemp("squid-acl-443")) as p:
        yield p


@pytest.fixture(scope="session")
def samba_winbind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Winbind]:
    """winbindd in its mount namespace (root only); Squids join it with ``nsenter_argv()``."""
    winbind: Winbind = _started(start_winbind, tmp_path_factory.mktemp("samba"))
    try:
        yield winbind
    finally:
        winbind.stop()


@pytest.fixture(scope="session")
def samba_ntlm(
    samba_winbind: Winbind, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthProxy]:
    """Squid, NTLMv2 checked by Samba: nobody / Ntlm-s3cret, domain HOPCATPROXY (root only)."""
    with _running(start_squid_samba_ntlm, tmp_path_factory.mktemp("squid-samba-ntlm"),
                  samba_winbind) as p:  # fmt: skip
        yield p


@pytest.fixture(scope="session")
def squid_negotiate(
    krb5_realm: KerberosRealm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthProxy]:
    """Squid, Negotiate/Kerberos; address it as localhost; clients use ``krb5_realm.client_env()``."""
    with _running(start_squid_negotiate, tmp_path_factory.mktemp("squid-negotiate"),
                  krb5_realm) as p:  # fmt: skip
        yield p


@pytest.fixture(scope="session")
def squid_multi(
    krb5_realm: KerberosRealm, samba_winbind: Winbind, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthProxy]:
    """Squid offering Negotiate, NTLM, Digest, Basic; nobody / Ntlm-s3cret passes all but Kerberos."""
    with _running(start_squid_multi, tmp_path_factory.mktemp("squid-multi"), krb5_realm,
                  samba_winbind) as p:  # fmt: skip
        yield p


@pytest.fixture(scope="session")
def squid_negotiate_wrapper_only(
    krb5_realm: KerberosRealm, samba_winbind: Winbind, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthProxy]:
    """Squid offering only Negotiate (Kerberos or raw NTLMSSP): nobody / Ntlm-s3cret."""
    with _running(start_squid_negotiate_wrapper_only,
                  tmp_path_factory.mktemp("squid-negotiate-wrapper"), krb5_realm,
                  samba_winbind) as p:  # fmt: skip
        yield p


@pytest.fixture(scope="session")
def apache_digest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthProxy]:
    """Apache mod_proxy_connect with Digest MD5: alice / s3cret; CONNECT to 22, 443, 1024-65535."""
    with _running(start_apache_digest, tmp_path_factory.mktemp("apache-digest")) as p:
        yield p
