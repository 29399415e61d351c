"""Peers for the TLS tests (this module holds no tests): certificates made at test time, real TLS
programs started with a stdin the test controls, hopcat in the background, and a small Python TLS
server on memory BIOs for what no program does on demand (answer after the client's
close_notify, send then close_notify while still reading, break the stream with a bad record).

Why a stdin the test controls: ``openssl s_server``, ``ncat`` and ``socat STDIO`` end the
session at their stdin's EOF, and hopcat ends it at its own (close_notify). A test that wants
every byte both ways keeps both stdins open until both sides have received everything, then
closes one and checks how the other ends.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import peers

from support import HOPCAT, Certificates, ScriptedServer, clean_env

READY_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 30.0
START_ATTEMPTS = 5


class TLSFiles(NamedTuple):
    """Everything a TLS test trusts or presents, made once per session (conftest ``tls``)."""

    ca: Path  # the test CA (hopcat --tls-ca)
    cert: Path  # 127.0.0.1 and localhost, signed by ca
    key: Path
    wrong_name: tuple[Path, Path]  # DNS:other.example only, signed by ca
    expired: tuple[Path, Path]  # 127.0.0.1, signed by ca, expired yesterday
    client: tuple[Path, Path]  # a client certificate signed by ca
    other_ca: Path  # a CA that signed none of these

    @property
    def certificates(self) -> Certificates:
        return Certificates(self.ca, self.cert, self.key)

    def server_context(self, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if maximum is not None:
            context.maximum_version = maximum
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def socat_listen(self, port: int, *options: str) -> str:
        """socat's address for a TLS server on 127.0.0.1:port with ``cert`` (clients not
        verified), and ``options``."""
        return ",".join([f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={self.cert},"
                         f"key={self.key},verify=0", *options])  # fmt: skip


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _signed(directory: Path, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.cnf"
    ext.write_text(extensions)
    _openssl("req", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", subject)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.crt"), "-CAkey",
             str(directory / "ca.key"), "-CAcreateserial", "-out", str(crt), "-days", "2",
             "-extfile", str(ext))  # fmt: skip
    return crt, key


def _expired(directory: Path) -> tuple[Path, Path]:
    """openssl 3.0's x509 cannot set dates in the past (-days > 0, no -not_after): the
    cryptography package (there through paramiko and asyncssh) signs this one."""
    import ipaddress

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # pragma: no cover - a test needing it skips
        return directory / "no-cryptography.crt", directory / "no-cryptography.key"
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    crt_path, key_path = directory / "expired.crt", directory / "expired.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return crt_path, key_path


def make_tls_files(certificates: Certificates) -> TLSFiles:
    """The other files, signed by (or next to) the CA of ``certificates``, in its directory."""
    peers.require_program("openssl", "openssl")
    directory = certificates.ca.parent
    wrong_name = _signed(directory, "other", "/CN=other.example", "subjectAltName=DNS:other.example\n")
    client = _signed(directory, "client", "/CN=hopcat test client", "extendedKeyUsage=clientAuth\n")
    other = directory / "other-ca"
    other.mkdir()
    _openssl("req", "-x509", *_EC, "-keyout", str(other / "ca.key"), "-out", str(other / "ca.crt"),
             "-days", "2", "-subj", "/CN=another CA")  # fmt: skip
    return TLSFiles(certificates.ca, certificates.cert, certificates.key, wrong_name,
                    _expired(directory), client, other / "ca.crt")  # fmt: skip


# -- real programs with a stdin of ours ---------------------------------------------------------


def feed(stdin: IO[bytes] | None, data: bytes) -> threading.Thread:
    """Write ``data`` to a pipe from a thread (it holds 64 KiB), leaving it open."""
    assert stdin is not None

    def write() -> None:
        with contextlib.suppress(OSError, ValueError):  # the reader left; the test closed it
            stdin.write(data)
            stdin.flush()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


class Piped:
    """A subprocess with stdin a pipe (``.stdin``) or a file, stdout and stderr files in
    ``workdir``; ``stop()`` ends it by pid."""

    stdin: IO[bytes] | None

    def spawn(self, workdir: Path, name: str, argv: list[str], stdin: Path | None,
              env: dict[str, str]) -> None:  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        with contextlib.ExitStack() as files:
            source = files.enter_context(open(stdin, "rb")) if stdin else subprocess.PIPE
            self.proc = subprocess.Popen(
                argv, stdin=source, stdout=files.enter_context(open(self.out, "wb")),
                stderr=files.enter_context(open(self.err, "wb")), env=env,
                start_new_session=True,
            )  # fmt: skip
        self.stdin = self.proc.stdin

    def feed(self, data: bytes) -> threading.Thread:
        return feed(self.stdin, data)

    def close_stdin(self) -> None:
        if self.stdin is not None and not self.stdin.closed:
            with contextlib.suppress(OSError):
                self.stdin.close()

    def stop(self) -> None:
        self.close_stdin()
        peers._stop_process(self.proc)  # SIGTERM, then SIGKILL; by pid


class Program(Piped):
    """A listening program started with ``make_argv(port)``, with peer_env()."""

    def __init__(self, name: str, workdir: Path, make_argv: Callable[[int], list[str]], *,
                 stdin: Path | None = None, host: str = peers.LOOPBACK_V4) -> None:  # fmt: skip
        self.name = name
        self.host = host
        for _attempt in range(START_ATTEMPTS):
            self.port = peers.pick_port(host)
            argv = make_argv(self.port)
            self.spawn(workdir, name, argv, stdin, peers.peer_env())
            deadline = time.monotonic() + READY_TIMEOUT_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                if peers.listening(self.proc.pid, host, self.port):
                    return
                time.sleep(0.01)
            self.stop()
            if "in use" not in self.err.read_text(errors="replace").lower():
                break
        raise peers.PeerStartError(f"{name} did not listen: {' '.join(argv)}: "
                                   f"{self.err.read_text(errors='replace')}")  # fmt: skip

    @property
    def hostport(self) -> str:
        return peers.format_hostport(self.host, self.port)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)


@contextlib.contextmanager
def program(name: str, workdir: Path, make_argv: Callable[[int], list[str]],
            **kwargs: Any) -> Iterator[Program]:  # fmt: skip
    started = Program(name, workdir, make_argv, **kwargs)
    try:
        yield started
    finally:
        started.stop()


class Background(Piped):
    """A subprocess (hopcat by default) with clean_env()."""

    def __init__(self, workdir: Path, name: str, argv: list[str], *,
                 stdin: Path | None = None) -> None:  # fmt: skip
        self.spawn(workdir, name, argv, stdin, clean_env())

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout} s: {self.stderr()!r}") from None

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def hopcat(workdir: Path, *args: str, name: str = "hopcat", stdin: Path | None = None) -> Background:
    return Background(workdir, name, [*HOPCAT, *args], stdin=stdin)


def wait_for_size(path: Path, size: int, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    peers.wait_until(lambda: path.exists() and path.stat().st_size >= size, timeout,
                     f"{size} bytes in {what} (has {path.stat().st_size if path.exists() else 0})")  # fmt: skip


def listen_hopcat(workdir: Path, *args: str, stdin: Path | None = None,
                  name: str = "listener") -> tuple[Background, int]:  # fmt: skip
    """``hopcat -l --ready-file ... ARGS`` in the background, and the port it listens on."""
    ready = workdir / f"{name}.ready"
    process = hopcat(workdir, "-l", "--ready-file", str(ready), *args, name=name, stdin=stdin)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (ready.exists() and ready.read_text().endswith("\n")):
        if process.proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise AssertionError(f"hopcat -l did not get ready: {process.stderr()!r}")
        time.sleep(0.01)
    return process, int(ready.read_text().strip().rsplit(":", 1)[1])


# -- a Python TLS peer on memory BIOs -----------------------------------------------------------


class BioSession:
    """One TLS session over a blocking socket through memory BIOs, so that close_notify can be
    sent while reading goes on (ssl's SSLSocket.unwrap reads on and loses data it meets)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:  # fmt: skip
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)  # fmt: skip
        self.held = bytearray()
        self.ended = False

    def flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self, *, flush: bool = True) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()
        if flush:
            self.flush()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 16):
            self.tls.write(view[start : start + (1 << 16)])
            self.flush()

    def recv(self) -> bytes:
        """Plaintext; b"" at close_notify (ssl.SSLEOFError at a FIN without one)."""
        if self.held:
            data = bytes(self.held)
            self.held.clear()
            return data
        if self.ended:
            return b""
        while True:
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            self.flush()
            if not data:
                self.ended = True
            return data

    def recv_all(self) -> bytes:
        received = bytearray()
        while data := self.recv():
            received += data
        return bytes(received)

    def close_notify(self) -> None:
        while not self.ended:  # decrypt what came, so that unwrap finds nothing to read
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                self.ended = True
            self.held += data
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.flush()


class PyTLSServer(ScriptedServer):
    """A loopback TLS server running ``handler(session)`` (a BioSession, handshake done) for each
    connection, on a thread each; ``results`` holds what handlers return, ``failures`` what they
    raised (``wait()`` raises the first; ``close()`` does not: many tests fail the handshake on
    purpose)."""

    def __init__(self, context: ssl.SSLContext, handler: Callable[[BioSession], object]) -> None:
        self.context = context
        self.session_handler = handler
        self.results: list[object] = []
        self.failures: list[BaseException] = []
        self.done = threading.Event()
        super().__init__(self._session, host=peers.LOOPBACK_V4)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(RUN_TIMEOUT_S)
        try:
            session = BioSession(conn, self.context, server_side=True)
            session.handshake()
            self.results.append(self.session_handler(session))
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            self.done.set()

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> object:
        assert self.done.wait(timeout), "the TLS server's handler did not finish"
        if self.failures:
            raise self.failures[0]
        return self.results[0]


@contextlib.contextmanager
def py_tls_server(context: ssl.SSLContext,
                  handler: Callable[[BioSession], object]) -> Iterator[PyTLSServer]:  # fmt: skip
    server = PyTLSServer(context, handler)
    try:
        yield server
    finally:
        server.close()
