"""Real peers on loopback for the integration tests (stdlib only).

Everything here listens on loopback only (127.0.0.1 or ::1), on a port picked by binding port 0;
configs and logs live in a directory the caller gives (pytest ``tmp_path``). ``conftest.py`` wraps
these helpers in fixtures; this module has no pytest dependency so benchmarks and ad-hoc scripts can
use it too. Recipes and measurements: ``/work/shared/PEERS.md``.

Targets (pure Python, one thread per connection)
------------------------------------------------
Each target takes ``host="127.0.0.1"`` (or ``"::1"``), has ``.start()`` (returns self) and
``.close()``, works as a context manager, and exposes ``.host``, ``.port``, ``.hostport``
(``127.0.0.1:P`` / ``[::1]:P``). Every accepted connection gets a :class:`ConnRecord`
(``received_len``, ``received_sha256``, ``sent_len``, ``frames``, ``error``); use
``target.wait_records(n)`` to wait for n finished connections, or the ``received_len`` /
``received_sha256`` properties for the last one. The server side finishes after the client has seen
its answer, so wait (bounded) before asserting on a record.

``DigestServer()``
    Reads to EOF, then answers ``sha256(received).hexdigest() + "\\n"`` and closes. Proves that stdin
    EOF travels (half-close) and that the answer still comes back.
``SourceServer(data, half_close_only=False)``
    Sends ``data`` and closes. With ``half_close_only=True`` it sends ``data``, shuts down its write
    side and keeps reading until the client's EOF (upload recorded in the ConnRecord), so both
    directions can be checked at once.
``BannerServer(banner=b"SSH-2.0-Test\\r\\n")``
    Speaks first (like sshd), then echoes everything until EOF, then closes. Catches bytes lost after
    a proxy handshake (the banner often arrives in the same segment as the proxy's last reply).
``FramedEcho()``
    Request/response without half-close: reads an 8-byte big-endian length and that many bytes,
    replies with the 32-byte raw sha256 digest; repeats until EOF. Build requests with
    :func:`frame`, expected answers with :func:`frame_reply`. Use it through proxies that tear the
    tunnel down on a client FIN.
``HttpTarget(body=b"hello from hopcat tests\\n")``
    A tiny HTTP/1.0 server answering every GET with ``body`` (for curl through the proxies);
    ``.url`` is ``http://127.0.0.1:P/`` or ``http://[::1]:P/``; ``.paths`` lists requested paths.

Daemons (real programs, stopped by pid)
---------------------------------------
``start_danted / start_microsocks / start_tinyproxy / start_ncat_http / start_sshd / start_ssh_socks``
take a work directory and return a :class:`Daemon` (``SshServer`` for sshd): ``.host``, ``.port``,
``.hostport``, ``.url`` (``socks5://127.0.0.1:P``, ``socks5://hopcattest:...@...``, ``http://...``),
``.url_as(scheme)`` (e.g. ``"socks4a"``), ``.username`` / ``.password``, ``.pid``, ``.log()``
(``.log(since=d.log_size())`` gives only what came after a mark), ``.stop()``. Readiness is bounded
polling of the listening socket (on Linux: the socket must be in LISTEN state and owned by the started
pid, so a port stolen by another process is never mistaken for ours); on failure
:class:`PeerStartError` carries the daemon's log. "Address in use" races are retried with a new port.
A missing program raises :class:`PeerMissing` (a :class:`PeerUnavailable`; conftest turns it into a
skip: ``"<program> not installed (apt-get install <pkg>)"``). Peers get :func:`peer_env`: the
environment without any ``*_proxy``/``*_PROXY``, ``SOCKS*``, ``CONNECT_*`` or ``SSH_AUTH_SOCK``.

Which protocols each speaks, and what it does with a client's half-close (stdin EOF -> FIN), as
measured in PEERS.md -- pick the fixture that fits what a test checks:

=================  ==========================  ===========================================
peer               protocols                   client FIN (half-close)
=================  ==========================  ===========================================
danted 1.4.2       socks4, socks5 (no socks4a) passed on; the answer arrives
ssh -D (9.2)       socks4, socks4a, socks5     passed on; the answer arrives
microsocks 1.0.3   socks5                      tunnel torn down; the answer is lost
tinyproxy 1.11     http CONNECT                tunnel torn down; the answer is lost
ncat 7.93 http     http CONNECT                tunnel torn down; the answer is lost
=================  ==========================  ===========================================

Through the "torn down" ones use :class:`FramedEcho` or :class:`BannerServer` and keep stdin open
until the answer is in (as ssh does). Other quirks found here:

* Dante 1.4.2 does not implement SOCKS4a: a 4a request (0.0.0.x + name) is matched against
  0.0.0.x and blocked ("no rules matched"), reply 91. Use ``ssh -D`` for socks4a.
* Dante's parser rejects ``command: connect protocol: tcp`` on one line (the one-line rule in
  PEERS.md is a syntax error in 1.4.2); one keyword per line works.
* Dante ``socksmethod: username`` checks system users (crypt(3), yescrypt hashes work): the fixture
  creates system user ``hopcattest`` (no home, nologin) and sets its password; needs root. SOCKS4
  requests are refused by that instance (no password in SOCKS4).
* Dante listens on ::1 fine (``internal: ::1``); with ``external: ::1`` as well as 127.0.0.1 every
  instance reaches targets of both families (SOCKS5 ATYP 4 or a name), IPv4 or IPv6 listener alike.
* ``ncat --proxy-type http`` 7.93 ignores the listen address and binds 0.0.0.0 (or ``::``)
  (nmap/nmap PR #2614, unmerged); the fixture adds ``--allow 127.0.0.1`` (``::1``) so only loopback
  clients are served, and ``-4``/``-6`` so it binds one family.
* microsocks drops a CONNECT request sent in the same write as the greeting (PEERS.md), relays
  1 KiB at a time and adds ~40 ms per connection.
* sshd listens on 127.0.0.1 and (when available) ::1 on the same port; known_hosts covers both.
  ``MaxStartups`` is raised so parallel connections under load are not dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import ipaddress
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"

READY_TIMEOUT_S = 10.0  # a daemon must listen within this
STOP_TIMEOUT_S = 5.0  # after SIGTERM, then SIGKILL
START_ATTEMPTS = 5  # new port on "address in use"
CONN_TIMEOUT_S = 60.0  # a target connection idle this long is abandoned
JOIN_TIMEOUT_S = 5.0
LOG_TAIL_BYTES = 8000  # how much of a log goes into an error message

# Credentials used by every "auth" variant. Dante checks system users, hence a real account.
PEER_USER = "hopcattest"
PEER_PASSWORD = "hopcat-pw1"

# How each daemon reports losing a port race; tinyproxy 1.11 says only the second.
_IN_USE_MARKERS = ("in use", "could not create listening sockets")


# --------------------------------------------------------------------------- errors


class PeerUnavailable(Exception):
    """The peer cannot run here (missing program, not root, no IPv6): tests should skip."""


class PeerMissing(PeerUnavailable):
    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"{program} not installed (apt-get install {package})")
        self.program = program
        self.package = package


class PeerStartError(RuntimeError):
    """The peer was there but did not come up; the message carries its log."""


# --------------------------------------------------------------------------- environment


def peer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for peers: no proxy settings that curl, connect-proxy or ssh would pick up."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        up = key.upper()
        if (
            up.endswith("_PROXY")
            or up.startswith("SOCKS")
            or up.startswith("CONNECT_")
            or up == "SSH_AUTH_SOCK"
        ):
            del env[key]
    return env


# Debian package of each program the integration tests use.
PACKAGE_OF = {
    "danted": "dante-server",
    "microsocks": "microsocks",
    "tinyproxy": "tinyproxy",
    "ncat": "ncat",
    "nc.openbsd": "netcat-openbsd",
    "socat": "socat",
    "connect-proxy": "connect-proxy",
    "curl": "curl",
    "git": "git",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
}


def require_program(program: str, package: str | None = None) -> str:
    """Absolute path of ``program`` or PeerMissing (package defaults from PACKAGE_OF)."""
    package = package or PACKAGE_OF.get(program, program)
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        raise PeerMissing(program, package)
    return found


def is_root() -> bool:
    return os.geteuid() == 0


def ipv6_available() -> bool:
    """True when ::1 can be bound (IPv6 loopback configured)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK_V6, 0))
    except OSError:
        return False
    return True


def require_ipv6() -> None:
    if not ipv6_available():
        raise PeerUnavailable("IPv6 loopback (::1) not available")


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pick_port(host: str = LOOPBACK_V4, *also: str) -> int:
    """A port that is free right now on ``host`` (and on every host in ``also``)."""
    for _ in range(50):
        with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if all(_port_free(h, port) for h in also):
            return port
    raise PeerStartError(f"no port free on all of {(host, *also)}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ensure_system_user(name: str = PEER_USER, password: str = PEER_PASSWORD) -> None:
    """Create system user ``name`` (no home, nologin) if needed and set its password. Root only.

    The account is left in place: other test sessions on the machine may be using it.
    """
    if not is_root():
        raise PeerUnavailable(f"creating system user {name} for Dante username auth needs root")
    try:
        pwd.getpwnam(name)
    except KeyError:
        useradd = require_program("useradd", "passwd")
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        try:
            pwd.getpwnam(name)  # a concurrent useradd may have won the race: fine
        except KeyError:
            raise PeerStartError(f"useradd {name} failed") from None
    chpasswd = require_program("chpasswd", "passwd")
    # chpasswd fails when another process holds the shadow lock; retry a few times.
    last = ""
    for attempt in range(10):
        res = subprocess.run(
            [chpasswd], input=f"{name}:{password}\n".encode(),
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        if res.returncode == 0:
            return
        last = res.stderr.decode(errors="replace")
        time.sleep(0.05 * (attempt + 1))
    raise PeerStartError(f"chpasswd for {name} failed: {last}")


# --------------------------------------------------------------------------- readiness


def _proc_net_listeners(host: str, port: int) -> set[int] | None:
    """Inodes of sockets in LISTEN state on host:port (or the wildcard), or None without /proc."""
    fam = family_of(host)
    table = "/proc/net/tcp6" if fam == socket.AF_INET6 else "/proc/net/tcp"
    want = ipaddress.ip_address(host)
    wildcard = ipaddress.ip_address("::" if fam == socket.AF_INET6 else "0.0.0.0")
    try:
        with open(table) as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    inodes: set[int] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        addr_hex, port_hex = fields[1].split(":")
        if int(port_hex, 16) != port:
            continue
        raw = bytes.fromhex(addr_hex)
        # /proc prints each 32-bit word in host (little-endian) order.
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        if ipaddress.ip_address(raw) in (want, wildcard):
            inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int] | None:
    """The sockets of ``pid`` and of its children (``hopcat serve --workers``: they listen)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(child) for child in f.read().split()]
    except OSError:
        pass
    inodes: set[int] = set()
    for owner in pids:
        try:
            names = os.listdir(f"/proc/{owner}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{owner}/fd/{name}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listening(pid: int | None, host: str, port: int) -> bool:
    """True when something (owned by ``pid`` if /proc can tell) listens on host:port."""
    if pid is not None:
        listeners = _proc_net_listeners(host, port)
        owned = _socket_inodes(pid)
        if listeners is not None and owned is not None:
            return bool(listeners & owned)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` with a short backoff until true or raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# --------------------------------------------------------------------------- daemons


class Daemon:
    """A started program: where it listens, its URL, its log; ``stop()`` ends it by pid."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        host: str,
        port: int,
        scheme: str,
        log_path: Path,
        workdir: Path,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.host = host
        self.port = port
        self.scheme = scheme
        self.log_path = log_path
        self.workdir = workdir
        self.username = username
        self.password = password

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def hostport(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def url(self) -> str:
        return self.url_as(self.scheme)

    def url_as(self, scheme: str, *, auth: bool = True) -> str:
        """The proxy URL with another scheme (e.g. ``socks4a``); credentials included if ``auth``."""
        userinfo = ""
        if auth and self.username is not None:
            userinfo = urllib.parse.quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":" + urllib.parse.quote(self.password, safe="")
            userinfo += "@"
        return f"{scheme}://{userinfo}{self.hostport}"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _stop_process(self.proc)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} {self.url}>"


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, bounded wait, SIGKILL; then SIGKILL stragglers left in its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    # start_new_session made pid the group id; children (Dante's workers) may outlive it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _says_in_use(log: str) -> bool:
    low = log.lower()
    return any(m in low for m in _IN_USE_MARKERS)


def _tail(text: str) -> str:
    return text if len(text) <= LOG_TAIL_BYTES else "...\n" + text[-LOG_TAIL_BYTES:]


def start_daemon(
    name: str,
    workdir: Path,
    make_argv: Callable[[int], list[str]],
    *,
    host: str = LOOPBACK_V4,
    scheme: str,
    also_hosts: tuple[str, ...] = (),
    username: str | None = None,
    password: str | None = None,
    cls: type[Daemon] = Daemon,
    cls_kwargs: dict[str, Any] | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:
    """Start ``make_argv(port)`` listening on host:port (and also_hosts:port); retry on port races.

    ``make_argv`` may write config files for the port before returning the argv.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    failure = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = pick_port(host, *also_hosts)
        argv = make_argv(port)
        with open(log_path, "ab") as logf:
            logf.write(f"--- hopcat tests: attempt {attempt}: {' '.join(argv)}\n".encode())
            logf.flush()
            start = logf.tell()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=workdir, env=peer_env(), start_new_session=True,
            )  # fmt: skip
        daemon = cls(
            name, proc, host, port, scheme, log_path, workdir, username, password,
            **(cls_kwargs or {}),
        )  # fmt: skip

        def ready(d: Daemon = daemon, start: int = start) -> bool:
            if d.proc.poll() is not None or _says_in_use(d.log(since=start)):
                return True  # exited or lost a port race (sshd keeps running on ::1): see below
            return all(listening(d.pid, h, d.port) for h in (d.host, *also_hosts))

        try:
            wait_until(ready, timeout, f"{name} to listen on {daemon.hostport}")
        except TimeoutError as e:
            daemon.stop()
            raise PeerStartError(f"{name}: {e}; log {log_path}:\n{_tail(daemon.log())}") from None
        output = daemon.log(since=start)
        if proc.poll() is None and not _says_in_use(output):
            return daemon
        daemon.stop()
        failure = f"{name} did not start (status {proc.returncode}); log {log_path}:\n{_tail(daemon.log())}"
        if not _says_in_use(output):
            break
    raise PeerStartError(failure)


# -- Dante


def start_danted(
    workdir: Path, *, host: str = LOOPBACK_V4, auth: bool = False, udp: bool = False,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:  # fmt: skip
    """danted (SOCKS4/5) on host; ``auth=True``: ``socksmethod: username`` with PEER_USER;
    ``udp=True``: UDP ASSOCIATE served too (PEERS.md: without ``udpreply`` every reply is
    dropped; the relay address it answers is the ``internal:`` one, a new port each time)."""
    danted = require_program("danted", "dante-server")
    if host == LOOPBACK_V6:
        require_ipv6()
    if auth:
        ensure_system_user()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # Dante's unprivileged children may need to read it (PEERS.md)
    v6 = ipv6_available()
    nets = ["127.0.0.0/8"] + (["::1/128"] if v6 else [])
    client_net = "::1/128" if host == LOOPBACK_V6 else "127.0.0.0/8"

    def make_argv(port: int) -> list[str]:
        lines = [
            "logoutput: stderr",
            f"internal: {host} port = {port}",
            "external: 127.0.0.1",
            *(["external: ::1"] if v6 else []),
            "clientmethod: none",
            f"socksmethod: {'username' if auth else 'none'}",
        ]
        if is_root():
            lines += ["user.privileged: root", "user.unprivileged: nobody"]
        lines += ["client pass {", f"  from: {client_net} to: {client_net}", "}"]
        # One keyword per line: Dante 1.4.2 rejects "command: connect protocol: tcp" on one line.
        for dst in nets:
            lines += [
                "socks pass {",
                f"  from: {client_net} to: {dst}",
                "  command: connect",
                "  protocol: tcp",
                "  log: error",
                "}",
            ]
            if udp:
                lines += [
                    "socks pass {",
                    f"  from: {client_net} to: {dst}",
                    "  command: udpassociate udpreply",
                    "  log: error",
                    "}",
                ]
        conf = workdir / "danted.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o644)
        return [danted, "-f", str(conf), "-p", str(workdir / "danted.pid")]

    return start_daemon(
        "danted", workdir, make_argv, host=host, scheme="socks5",
        username=PEER_USER if auth else None, password=PEER_PASSWORD if auth else None,
        timeout=timeout,
    )  # fmt: skip


# -- a UDP target


class UdpEcho:
    """A UDP echo on a thread: each datagram goes back to its sender as it came (its size kept);
    ``received`` counts them, ``sources`` holds who sent them."""

    def __init__(self, host: str = LOOPBACK_V4) -> None:
        self.host = host
        self.port = 0
        self.received = 0
        self.sources: set[tuple[str, int]] = set()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def hostport(self) -> str:
        return format_hostport(self.host, self.port)

    def start(self) -> UdpEcho:
        sock = socket.socket(family_of(self.host), socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.host, 0))
        sock.settimeout(0.1)  # how soon close() is noticed: a blocked recvfrom never wakes
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="udp-echo", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                data, source = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.sources.add(source[:2])
            try:
                self._sock.sendto(data, source)
            except OSError:
                pass  # the sender's port is gone (ICMP): nothing to echo to

    def close(self) -> None:
        if self._sock is not None:
            self._closed.set()
            if self._thread is not None:
                self._thread.join(5)
            self._sock.close()
            self._sock = None

    def __enter__(self) -> UdpEcho:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- microsocks


def start_microsocks(
    workdir: Path, *, host: str = LOOPBACK_V4, auth: bool = False,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:  # fmt: skip
    """microsocks (SOCKS5); ``auth=True``: ``-u PEER_USER -P PEER_PASSWORD``."""
    microsocks = require_program("microsocks", "microsocks")
    if host == LOOPBACK_V6:
        require_ipv6()

    def make_argv(port: int) -> list[str]:
        argv = [microsocks, "-i", host, "-p", str(port)]
        if auth:
            argv += ["-u", PEER_USER, "-P", PEER_PASSWORD]
        return argv

    return start_daemon(
        "microsocks", workdir, make_argv, host=host, scheme="socks5",
        username=PEER_USER if auth else None, password=PEER_PASSWORD if auth else None,
        timeout=timeout,
    )  # fmt: skip


# -- tinyproxy


def start_tinyproxy(
    workdir: Path, *, host: str = LOOPBACK_V4, auth: bool = False,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:  # fmt: skip
    """tinyproxy (HTTP CONNECT to any port); ``auth=True``: ``BasicAuth PEER_USER PEER_PASSWORD``."""
    tinyproxy = require_program("tinyproxy", "tinyproxy")
    if host == LOOPBACK_V6:
        require_ipv6()
    workdir.mkdir(parents=True, exist_ok=True)

    def make_argv(port: int) -> list[str]:
        lines = []
        if is_root():
            lines += ["User nobody", "Group nogroup"]
        lines += [
            f"Port {port}",
            f"Listen {host}",
            "Timeout 600",
            "LogLevel Connect",
            "MaxClients 100",
            "Allow 127.0.0.1",
            *(["Allow ::1"] if ipv6_available() else []),
            "DisableViaHeader Yes",
        ]
        if auth:
            lines.append(f"BasicAuth {PEER_USER} {PEER_PASSWORD}")
        # No ConnectPort line: CONNECT to any port is allowed.
        conf = workdir / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o644)
        return [tinyproxy, "-d", "-c", str(conf)]

    return start_daemon(
        "tinyproxy", workdir, make_argv, host=host, scheme="http",
        username=PEER_USER if auth else None, password=PEER_PASSWORD if auth else None,
        timeout=timeout,
    )  # fmt: skip


# -- ncat as an HTTP proxy


def start_ncat_http(
    workdir: Path, *, host: str = LOOPBACK_V4, auth: bool = False,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:  # fmt: skip
    """``ncat -l HOST PORT --proxy-type http`` (CONNECT); ``auth=True``: ``--proxy-auth U:P``."""
    ncat = require_program("ncat", "ncat")
    if host == LOOPBACK_V6:
        require_ipv6()

    def make_argv(port: int) -> list[str]:
        # ncat 7.93 ignores the listen address in proxy mode and binds the wildcard
        # (nmap/nmap PR #2614): --allow keeps it to loopback clients, -4/-6 to one family.
        argv = [ncat, "-v", "-6" if host == LOOPBACK_V6 else "-4", "-l", host, str(port),
                "--proxy-type", "http", "--allow", host]  # fmt: skip
        if auth:
            argv += ["--proxy-auth", f"{PEER_USER}:{PEER_PASSWORD}"]
        return argv

    return start_daemon(
        "ncat-http", workdir, make_argv, host=host, scheme="http",
        username=PEER_USER if auth else None, password=PEER_PASSWORD if auth else None,
        timeout=timeout,
    )  # fmt: skip


# -- socat: TLS in front of a proxy (an https:// proxy)


def start_socat_tls(
    workdir: Path, backend: Daemon, cert: Path, key: Path, *, timeout: float = READY_TIMEOUT_S
) -> Daemon:
    """``socat OPENSSL-LISTEN`` on 127.0.0.1 relaying to ``backend``: an https:// proxy made of
    a TLS terminator and a plain one (``.url`` is https://, ``backend``'s credentials)."""
    socat = require_program("socat", "socat")

    def make_argv(port: int) -> list[str]:
        return [socat, f"OPENSSL-LISTEN:{port},bind={LOOPBACK_V4},reuseaddr,fork,cert={cert},"
                f"key={key},verify=0", f"TCP:{backend.hostport}"]  # fmt: skip

    return start_daemon(
        "socat-tls", workdir, make_argv, scheme="https", username=backend.username,
        password=backend.password, timeout=timeout,
    )  # fmt: skip


# -- sshd and ssh -D


class SshServer(Daemon):
    """sshd with a throwaway host key and a client key; builds ssh client command lines."""

    def __init__(self, *args: Any, client_key: Path, known_hosts: Path, user: str) -> None:
        super().__init__(*args)
        self.client_key = client_key
        self.known_hosts = known_hosts
        self.user = user
        self.ipv6 = False  # set by start_sshd when ::1 is listened on too

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_options(self) -> list[str]:
        """``ssh`` and its options (no destination): append more options, then a destination."""
        ssh = require_program("ssh", "openssh-client")
        return [
            ssh, "-F", "none", "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=20",
            "-p", str(self.port),
        ]  # fmt: skip

    def ssh_argv(self, *extra: str, host: str | None = None) -> list[str]:
        """Base client argv: ``ssh -F none -i KEY ... [extra options] -p PORT user@host``.

        ``extra`` options go before the destination; append the remote command after it.
        ``host`` may be ``"::1"`` when ``self.ipv6``.
        """
        return [*self.ssh_options(), *extra, f"{self.user}@{host or self.host}"]

    def git_ssh_command(self, *extra: str) -> str:
        """A GIT_SSH_COMMAND value (git appends the destination and command)."""
        import shlex

        return shlex.join([*self.ssh_options(), *extra])


def start_sshd(workdir: Path, *, timeout: float = READY_TIMEOUT_S) -> SshServer:
    """sshd on 127.0.0.1 (and ::1 when available), same port; key login as the current user."""
    sshd = Path("/usr/sbin/sshd")
    if not sshd.exists():
        raise PeerMissing("sshd", "openssh-server")
    keygen = require_program("ssh-keygen", "openssh-client")
    require_program("ssh", "openssh-client")
    if is_root():
        # Privilege separation chroots to /run/sshd; sshd refuses to start without it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    host_key = workdir / "host_key"
    client_key = workdir / "client_key"
    for key, comment in ((host_key, "hopcat-test-host"), (client_key, "hopcat-test-client")):
        if not key.exists():
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                check=True, capture_output=True, timeout=30, env=peer_env(),
            )  # fmt: skip
    shutil.copyfile(workdir / "client_key.pub", workdir / "authorized_keys")
    host_pub = " ".join((workdir / "host_key.pub").read_text().split()[:2])
    known_hosts = workdir / "known_hosts"
    v6 = ipv6_available()
    also = (LOOPBACK_V6,) if v6 else ()

    def make_argv(port: int) -> list[str]:
        names = [f"[{LOOPBACK_V4}]:{port}"] + ([f"[{LOOPBACK_V6}]:{port}"] if v6 else [])
        known_hosts.write_text(f"{','.join(names)} {host_pub}\n")
        lines = [
            f"Port {port}",
            f"ListenAddress {LOOPBACK_V4}",
            *([f"ListenAddress {LOOPBACK_V6}"] if v6 else []),
            f"HostKey {host_key}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "UseDNS no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",  # scp (SFTP mode) and sftp need it
            "PrintLastLog no",
            # Parallel tests under load: the default 10:30:100 drops unauthenticated connections.
            "MaxStartups 200",
            "MaxSessions 200",
            "LoginGraceTime 60",
            # root's .bashrc may be slow; this skips it for remote commands (PEERS.md).
            "SetEnv SHLVL=1",
            "LogLevel INFO",
        ]
        conf = workdir / "sshd_config"
        conf.write_text("\n".join(lines) + "\n")
        return [str(sshd), "-D", "-e", "-f", str(conf)]

    daemon = start_daemon(
        "sshd", workdir, make_argv, host=LOOPBACK_V4, scheme="ssh", also_hosts=also,
        cls=SshServer,
        cls_kwargs={"client_key": client_key, "known_hosts": known_hosts, "user": user},
        timeout=timeout,
    )  # fmt: skip
    assert isinstance(daemon, SshServer)
    daemon.ipv6 = v6
    return daemon


def start_ssh_socks(
    sshd: SshServer, workdir: Path, *, host: str = LOOPBACK_V4,
    timeout: float = READY_TIMEOUT_S,
) -> Daemon:  # fmt: skip
    """``ssh -N -D host:PORT`` against ``sshd``: a SOCKS4/4a/5 proxy (``.url`` is socks5)."""
    if host == LOOPBACK_V6:
        require_ipv6()

    def make_argv(port: int) -> list[str]:
        return sshd.ssh_argv(
            "-N", "-n", "-D", f"{format_hostport(host, port)}",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "ServerAliveInterval=30",
        )  # fmt: skip

    return start_daemon("ssh-D", workdir, make_argv, host=host, scheme="socks5", timeout=timeout)


# --------------------------------------------------------------------------- targets


class ConnRecord:
    """What a target saw on one connection."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.received_len = 0
        self.sent_len = 0
        self.frames: list[tuple[int, str]] = []  # FramedEcho: (payload length, sha256 hex)
        self.error: BaseException | None = None  # e.g. a reset when a proxy tore the tunnel down
        self.done = threading.Event()
        self._hash = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.received_len += len(data)
        self._hash.update(data)

    @property
    def received_sha256(self) -> str:
        return self._hash.hexdigest()

    def __repr__(self) -> str:
        return (
            f"<ConnRecord from {self.peer} received={self.received_len} sent={self.sent_len}"
            f" frames={len(self.frames)} error={self.error!r}>"
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_T = TypeVar("_T", bound="_Target")


class _Target:
    """Accept loop on a thread; ``_serve(conn, record)`` per connection on its own thread."""

    def __init__(self, host: str = LOOPBACK_V4, port: int = 0, *,
                 conn_timeout: float = CONN_TIMEOUT_S) -> None:  # fmt: skip
        self.host = host
        self.family = family_of(host)
        self._want_port = port
        self.port = 0
        self.conn_timeout = conn_timeout
        self.records: list[ConnRecord] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closed = False

    @property
    def hostport(self) -> str:
        return format_hostport(self.host, self.port)

    def start(self: _T) -> _T:
        if self._listener is not None:
            return self
        if self.family == socket.AF_INET6:
            require_ipv6()
        self._listener = socket.create_server(
            (self.host, self._want_port), family=self.family, backlog=128
        )
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{type(self).__name__}:{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def __enter__(self: _T) -> _T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Invariant: runs until close() writes to the wake socket; each accepted socket is in
    # self._conns until its handler closes it.
    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r.fileno() in events:
                return
            try:
                conn, peer = self._listener.accept()
            except OSError:
                continue  # e.g. ECONNABORTED: the client gave up before accept
            conn.settimeout(self.conn_timeout)
            rec = ConnRecord(peer)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self.records.append(rec)
                t = threading.Thread(target=self._run, args=(conn, rec), daemon=True)
                self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket, rec: ConnRecord) -> None:
        try:
            self._serve(conn, rec)
        except Exception as e:  # recorded, never raised: a thread exception would fail the session
            rec.error = e
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            with self._cond:
                rec.done.set()
                self._cond.notify_all()

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        raise NotImplementedError

    def wait_records(self, n: int = 1, timeout: float = 10.0) -> list[ConnRecord]:
        """The first ``n`` finished connection records (waits up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = [r for r in self.records if r.done.is_set()]
                if len(done) >= n:
                    return done[:n]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{type(self).__name__}: {len(done)}/{n} connections finished "
                        f"after {timeout}s: {self.records}"
                    )
                self._cond.wait(left)

    @property
    def last(self) -> ConnRecord:
        """The most recently accepted connection, once finished (waits up to 10 s)."""
        self.wait_records(1)
        with self._lock:
            rec = self.records[-1]
        if not rec.done.wait(10.0):
            raise TimeoutError(f"{type(self).__name__}: last connection not finished: {rec}")
        return rec

    @property
    def received_sha256(self) -> str:
        return self.last.received_sha256

    @property
    def received_len(self) -> int:
        return self.last.received_len

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(JOIN_TIMEOUT_S)
        for c in conns:  # wake handlers blocked in recv/send
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(JOIN_TIMEOUT_S)
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()


def _recv_into_record(conn: socket.socket, rec: ConnRecord) -> bytes:
    data = conn.recv(65536)
    rec.feed(data)
    return data


def _drain_to_eof(conn: socket.socket, rec: ConnRecord) -> None:
    while _recv_into_record(conn, rec):
        pass


class DigestServer(_Target):
    """Reads to EOF, answers ``sha256(received).hexdigest() + "\\n"``, closes."""

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        _drain_to_eof(conn, rec)
        answer = (rec.received_sha256 + "\n").encode()
        conn.sendall(answer)
        rec.sent_len += len(answer)
        conn.shutdown(socket.SHUT_WR)

    @staticmethod
    def answer_for(data: bytes) -> bytes:
        return (sha256_hex(data) + "\n").encode()


class SourceServer(_Target):
    """Sends ``data`` then closes; ``half_close_only=True``: SHUT_WR and read the upload to EOF."""

    def __init__(self, data: bytes, host: str = LOOPBACK_V4, port: int = 0, *,
                 half_close_only: bool = False, conn_timeout: float = CONN_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(host, port, conn_timeout=conn_timeout)
        self.data = data
        self.half_close_only = half_close_only

    def _send_all(self, conn: socket.socket, rec: ConnRecord) -> None:
        view = memoryview(self.data)
        while view:
            n = conn.send(view[: 1 << 20])
            rec.sent_len += n
            view = view[n:]
        conn.shutdown(socket.SHUT_WR)

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        if not self.half_close_only:
            self._send_all(conn, rec)
            # Read what already arrived so close() sends FIN, not RST (which can discard data
            # still queued towards the client).
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while _recv_into_record(conn, rec):
                    pass
            return
        # Send on a helper thread while this one reads: a client may upload and download at once.
        errors: list[BaseException] = []

        def send() -> None:
            try:
                self._send_all(conn, rec)
            except Exception as e:
                errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            _drain_to_eof(conn, rec)
        finally:
            sender.join(self.conn_timeout)
        if errors:
            raise errors[0]


class BannerServer(_Target):
    """Sends ``banner`` first, then echoes everything until EOF, then closes."""

    def __init__(self, banner: bytes = b"SSH-2.0-Test\r\n", host: str = LOOPBACK_V4,
                 port: int = 0, *, conn_timeout: float = CONN_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(host, port, conn_timeout=conn_timeout)
        self.banner = banner

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        conn.sendall(self.banner)
        rec.sent_len += len(self.banner)
        while data := _recv_into_record(conn, rec):
            conn.sendall(data)
            rec.sent_len += len(data)
        conn.shutdown(socket.SHUT_WR)


FRAME_HEADER = 8  # bytes, big-endian payload length
FRAME_REPLY = 32  # bytes, raw sha256 digest of the payload


def frame(payload: bytes) -> bytes:
    """A FramedEcho request: 8-byte big-endian length, then the payload."""
    return len(payload).to_bytes(FRAME_HEADER, "big") + payload


def frame_reply(payload: bytes) -> bytes:
    """What FramedEcho answers to ``frame(payload)``."""
    return hashlib.sha256(payload).digest()


def _recv_exact(conn: socket.socket, n: int, rec: ConnRecord, sink: Callable[[bytes], Any]) -> int:
    """Receive exactly n bytes into rec and ``sink``; returns how many arrived before EOF."""
    got = 0
    while got < n:
        data = conn.recv(min(n - got, 1 << 20))
        if not data:
            return got
        rec.feed(data)
        sink(data)
        got += len(data)
    return got


class FramedEcho(_Target):
    """Per frame (8-byte length + payload) answers the 32-byte sha256 of the payload."""

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        while True:
            header = bytearray()
            try:
                got = _recv_exact(conn, FRAME_HEADER, rec, header.extend)
            except ConnectionResetError:
                return  # torn down at a frame boundary (microsocks & co. on client FIN): fine
            if got == 0:
                return
            if got < FRAME_HEADER:
                raise EOFError(f"EOF inside a frame header after {got} bytes")
            length = int.from_bytes(header, "big")
            hasher = hashlib.sha256()
            if _recv_exact(conn, length, rec, hasher.update) < length:
                raise EOFError(f"EOF inside a {length}-byte frame")
            rec.frames.append((length, hasher.hexdigest()))
            digest = hasher.digest()
            conn.sendall(digest)
            rec.sent_len += len(digest)


def framed_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send one frame on a connected socket and return the 32-byte answer (helper for tests)."""
    sock.sendall(frame(payload))
    answer = b""
    while len(answer) < FRAME_REPLY:
        data = sock.recv(FRAME_REPLY - len(answer))
        if not data:
            raise EOFError(f"EOF after {len(answer)} of {FRAME_REPLY} answer bytes")
        answer += data
    return answer


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True


class HttpTarget:
    """Answers every GET with ``body`` (HTTP/1.0, Content-Length); for curl through proxies."""

    def __init__(self, body: bytes = b"hello from hopcat tests\n", host: str = LOOPBACK_V4) -> None:
        self.body = body
        self.host = host
        self.port = 0
        self.paths: list[str] = []
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def hostport(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.hostport}/"

    def start(self) -> HttpTarget:
        if self._server is not None:
            return self
        if family_of(self.host) == socket.AF_INET6:
            require_ipv6()
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = CONN_TIMEOUT_S

            def do_GET(self) -> None:
                target.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(target.body)))
                self.end_headers()
                self.wfile.write(target.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    super().handle()

        server_cls = type("Server", (_HTTPServer,), {"address_family": family_of(self.host)})
        self._server = server_cls((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        self._server = None

    def __enter__(self) -> HttpTarget:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running(target: Any) -> Iterator[Any]:
    """``with running(DigestServer()) as t:`` -- start, yield, close."""
    target.start()
    try:
        yield target
    finally:
        target.close()
