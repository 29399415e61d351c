"""TLS on every path: sessions stacked on one connection, run on memory BIOs.

``TLSLayers`` is sans-I/O. It holds one ``ssl.SSLObject`` per TLS session on a connection,
outermost first: an ``https://`` or ``socks5+tls://`` hop's session, then the next TLS hop's
inside it, then the target's (``--tls``). The caller moves bytes between the socket and the
stack (``feed`` what came, send what ``wire_out`` returns); a record of an inner session is
plaintext to the session around it. So any number of TLS hops, and TLS to the target through
them, is one loop, and the blocking driver, the relay and the listener share it.

Why memory BIOs and not ``SSLSocket``: a socket can carry one session only, and
``SSLSocket.unwrap`` ends reading too. On a BIO, ``unwrap`` sends close_notify and the session
still reads: the TLS 1.3 half-close (RFC 8446 section 6.1), which lets a request/response
exchange end its request the way a TCP FIN does. A TLS 1.2 peer answers with its own
close_notify, which ends the stream after what it sent before.

The end of a stream: close_notify (``SSLZeroReturnError``) is a clean end. A TCP FIN without one
(``SSLEOFError``) may be a truncation; whether it is, only the protocol inside can tell (an HTTP
body with a length can, a shell session cannot), so it ends the stream too and ``ragged_end``
says it happened (curl's choice). Any other ``SSLError`` (an alert, a bad record) is a failure.

Contexts: ``client_context`` and ``server_context`` build them from ``TLSSettings`` with
verification on by default; ``check_pin`` and ``describe`` run after a handshake.
"""

from __future__ import annotations

import os
import ssl

from hopcat.errors import HopcatError, TLSError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# A read takes whole records: 16 KiB each at most, several per call.
RECORD_BYTES = 16 * 1024 + 256
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSLayers:
    """TLS sessions on one connection, outermost first; see the module docstring."""

    __slots__ = ("_held", "_held_end", "_incoming", "_outgoing", "ended", "failed", "labels",
                 "ragged_end", "sessions")  # fmt: skip

    def __init__(self) -> None:
        self.sessions: list[ssl.SSLObject] = []
        self.labels: list[str] = []  # whose session each is, for errors ("proxy ...", "target")
        self.failed: str | None = None  # the label of the session whose record or alert failed
        self._incoming: list[ssl.MemoryBIO] = []
        self._outgoing: list[ssl.MemoryBIO] = []
        self.ended = False  # the innermost session's stream ended (what is left reads as b"")
        self.ragged_end = False  # ... by a FIN without close_notify
        # Plaintext decrypted before our close_notify (see there), read before anything else;
        # then the end found behind it, if any: "clean", "ragged", or the failure to raise.
        self._held = bytearray()
        self._held_end: str | ssl.SSLError | None = None

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def innermost(self) -> ssl.SSLObject:
        return self.sessions[-1]

    def push(
        self, context: ssl.SSLContext, server_hostname: str | None, *, label: str,
        server_side: bool = False, received: bytes = b"",
    ) -> ssl.SSLObject:  # fmt: skip
        """Start a session inside the current innermost one (or on the wire); its handshake is
        run by ``handshake``. ``received``: its peer's bytes that came already (with a proxy's
        reply). ValueError: a name the ssl module will not put into SNI."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if received:
            incoming.write(received)
        session = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.sessions.append(session)
        self.labels.append(label)
        self.ended = self.ragged_end = False  # they are about the innermost session
        self._incoming.append(incoming)
        self._outgoing.append(outgoing)
        return session

    def handshake(self) -> bool:
        """One step of the innermost session's handshake: True once it is complete, False when
        it needs bytes from the peer (send ``wire_out`` first). Raises ``ssl.SSLError``."""
        try:
            self.sessions[-1].do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def feed(self, data: bytes) -> None:
        """Bytes from the wire; ``b""`` is its end (a FIN)."""
        if data:
            self._incoming[0].write(data)
        else:
            self._incoming[0].write_eof()
        self._lift()

    def _lift(self) -> None:
        """Move each outer session's plaintext (the records of the one inside) inward."""
        for index in range(len(self.sessions) - 1):
            inner = self._incoming[index + 1]
            if inner.eof:
                continue
            session = self.sessions[index]
            while True:
                try:
                    chunk = session.read(RECORD_BYTES * 4)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    inner.write_eof()
                    break
                except ssl.SSLError:
                    self.failed = self.labels[index]
                    raise
                if not chunk:
                    inner.write_eof()
                    break
                inner.write(chunk)

    def read_into(self, view: memoryview) -> int:
        """Plaintext of the innermost session into ``view``: as many records as are here and
        fit. 0 at the end of the stream (see ``ragged_end``). ``ssl.SSLWantReadError`` when no
        byte is here yet; ``ssl.SSLError`` on a failure."""
        size = len(view)
        total = 0
        if self._held:
            total = min(size, len(self._held))
            view[:total] = self._held[:total]
            del self._held[:total]
            if self._held:
                return total
        if self._held_end is not None:
            end, self._held_end = self._held_end, None
            if isinstance(end, ssl.SSLError):
                if total:
                    self._held_end = end  # the bytes before it first
                    return total
                raise end
            self.ended = True
            self.ragged_end = end == "ragged"
            return total
        if self.ended:
            return 0
        session = self.sessions[-1]
        while total < size:
            try:
                # With a buffer, read returns a count (typeshed says bytes); 0 at close_notify.
                count: int = session.read(size - total, view[total:])  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                if total:
                    return total
                raise
            except ssl.SSLZeroReturnError:
                count = 0
            except ssl.SSLEOFError:
                self.ragged_end = True
                count = 0
            except ssl.SSLError as exc:
                self.failed = self.labels[-1]
                if not total:
                    raise
                self._held_end = exc  # an alert or a bad record: the bytes before it first
                return total
            if not count:
                self.ended = True  # the next call says so: the bytes before come first
                return total
            total += count
        return total

    def end_pending(self) -> bool:
        """Whether the next ``read_into`` tells an end or a failure without another byte from
        the wire (it was found behind the bytes the last one returned)."""
        return self.ended or self._held_end is not None

    def buffered(self) -> bool:
        """Whether the innermost session may have plaintext, or its end, without another byte
        from the wire (a poll on the socket cannot see it)."""
        return self.ended or bool(self._held or self._held_end is not None
                                  or self.sessions[-1].pending() or self._incoming[-1].pending)

    def write(self, data: bytes | memoryview) -> int:
        """Encrypt ``data`` in the innermost session (all of it: BIOs never refuse)."""
        written: int = self.sessions[-1].write(data)
        return written

    def close_notify(self) -> None:
        """Send the innermost session's close_notify and keep reading (the half-close)."""
        # unwrap() calls SSL_shutdown twice, and the second call reads on for the peer's
        # close_notify: application data it meets there fails the session (OpenSSL's
        # APPLICATION_DATA_AFTER_CLOSE_NOTIFY), its bytes lost and the stream then read as a
        # ragged end: silent truncation of whatever the peer had sent and we had not read yet
        # (a request that came with the handshake's last flight). So what is here is
        # decrypted first and held for read_into, and the second call finds nothing to read.
        self._hold_plaintext()
        try:
            self.sessions[-1].unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify has not come: expected, we go on reading
        except ssl.SSLError:
            pass  # the session already failed or ended: nothing to say any more

    def close_all(self) -> bytes:
        """Every session's close_notify, innermost first, wrapped by the ones around it: what
        to send before the connection closes, so no peer takes the end for a truncation."""
        for index in range(len(self.sessions) - 1, -1, -1):
            try:
                self.sessions[index].unwrap()
            except ssl.SSLError:
                pass  # sent, not answered (the usual case), or the session already failed
            if index and (records := self._outgoing[index].read()):
                try:
                    self.sessions[index - 1].write(records)
                except ssl.SSLError:
                    pass  # that session failed: nothing more can go through it
        return self._outgoing[0].read()

    def _hold_plaintext(self) -> None:
        if self.ended or self._held_end is not None:
            return
        session = self.sessions[-1]
        while True:
            try:
                chunk = session.read(RECORD_BYTES * 4)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLEOFError:
                self._held_end = "ragged"
                return
            except ssl.SSLError as exc:
                self.failed = self.labels[-1]
                self._held_end = exc
                return
            if not chunk:
                self._held_end = "clean"
                return
            self._held += chunk

    def wire_out(self) -> bytes:
        """Every record made so far, wrapped by the sessions around it: what goes to the wire."""
        for index in range(len(self.sessions) - 1, 0, -1):
            data = self._outgoing[index].read()
            if data:
                self.sessions[index - 1].write(data)
        return self._outgoing[0].read()


class TLSSettings:
    """The TLS options of a client or listener (the CLI's --tls-*, serve's listen options)."""

    __slots__ = ("alpn", "ca", "cert", "insecure", "key", "min_version", "pin", "servername",
                 "verify_client")  # fmt: skip

    def __init__(
        self, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
        servername: str | None = None, alpn: Sequence[str] = (), pin: bytes | None = None,
        min_version: str | None = None, insecure: bool = False, verify_client: bool = False,
    ) -> None:  # fmt: skip
        self.ca = ca
        self.cert = cert
        self.key = key
        self.servername = servername
        self.alpn = tuple(alpn)
        self.pin = pin
        self.min_version = min_version
        self.insecure = insecure
        self.verify_client = verify_client


def parse_pin(text: str) -> bytes:
    """``sha256:HEX`` (colons allowed, as -v prints it and nc -H takes it) or ``sha256:BASE64``:
    the SHA-256 of the peer certificate's DER form."""
    kind, sep, value = text.partition(":")
    if not sep or kind.lower() != "sha256":
        raise UsageError(f"--tls-pin takes sha256:HEX or sha256:BASE64, not {text!r}")
    digest = None
    compact = value.replace(":", "")
    if len(compact) == 64:
        try:
            digest = bytes.fromhex(compact)
        except ValueError:
            digest = None
    if digest is None:
        import base64
        import binascii

        try:
            digest = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            digest = None
    if digest is None or len(digest) != 32:
        raise UsageError(f"--tls-pin {text}: not a SHA-256 digest (64 hex digits or 44 base64)")
    return digest


def parse_min_version(text: str) -> str:
    value = text.lower().removeprefix("tlsv").removeprefix("tls")
    if value not in MIN_VERSIONS:
        raise UsageError(f"--tls-min-version takes 1.2 or 1.3, not {text!r}")
    return value


def parse_alpn(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or any(len(name.encode()) > 255 or not name.isascii() for name in names):
        raise UsageError(f"--tls-alpn takes comma-separated protocol names, not {text!r}")
    return names


def _load(context: ssl.SSLContext, settings: TLSSettings, *, ca_flag: str, cert_flag: str) -> None:
    if settings.min_version:
        context.minimum_version = MIN_VERSIONS[settings.min_version]
    if settings.alpn:
        context.set_alpn_protocols(list(settings.alpn))
    if settings.cert or settings.key:
        key_flag = cert_flag.replace("cert", "key")
        if not settings.cert:
            raise UsageError(f"{key_flag} needs {cert_flag} too")
        # OpenSSL's error does not say which of the two files it could not read. Looked at,
        # not opened: a key from a pipe (``--tls-key <(...)``) can be read only once.
        for flag, path in ((cert_flag, settings.cert), (key_flag, settings.key)):
            if path is not None and not os.access(path, os.R_OK):
                why = "no such file" if not os.path.exists(path) else "not readable"
                raise UsageError(f"{flag} {path}: {why}")
        try:
            context.load_cert_chain(settings.cert, settings.key)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                why = "the private key does not belong to the certificate"
            elif settings.key:
                why = f"no PEM certificate in it, or no PEM private key in {settings.key}"
            else:
                why = (f"it needs a PEM certificate and its private key (or the key in "
                       f"{key_flag} FILE)")  # fmt: skip
            raise UsageError(f"{cert_flag} {settings.cert}: {why}") from None
        except OSError as exc:
            raise UsageError(f"{cert_flag} {settings.cert}: {_describe(exc)}") from None
    if settings.ca:
        try:
            context.load_verify_locations(cafile=settings.ca)
        except ssl.SSLError as exc:
            raise UsageError(f"{ca_flag} {settings.ca}: not a PEM CA bundle ({exc.reason or exc})") from None
        except OSError as exc:
            raise UsageError(f"{ca_flag} {settings.ca}: {_describe(exc)}") from None


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """Verification against the system CAs (or ``ca`` alone), name checked; a pin replaces the
    CA check unless a CA file is given too; ``insecure`` checks nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not settings.ca:
        context.load_default_certs()
    _load(context, settings, ca_flag="--tls-ca", cert_flag="--tls-cert")
    if settings.insecure or (settings.pin is not None and not settings.ca):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_context(settings: TLSSettings, *, flag: str = "--tls-cert") -> ssl.SSLContext:
    """A listener's context from ``cert``/``key`` (``ephemeral_certificate`` when there are
    none); ``verify_client`` demands a client certificate signed by ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(context, settings, ca_flag="--tls-ca", cert_flag=flag)
    if settings.verify_client:
        if not settings.ca:
            raise UsageError("--tls-verify-client needs --tls-ca FILE: the CA client "
                             "certificates must be signed by")  # fmt: skip
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def ephemeral_certificate(context: ssl.SSLContext, names: Sequence[str]) -> bytes:
    """Load a throwaway self-signed certificate for ``names`` into ``context``, as ncat does
    without --ssl-cert; return its DER form (for the fingerprint). Made by the openssl command:
    the standard library cannot sign."""
    import os
    import shutil
    import subprocess
    import tempfile

    openssl = shutil.which("openssl")
    if openssl is None:
        raise UsageError("-l --tls without --tls-cert makes a throwaway certificate with the "
                         "openssl command, which is not installed: give --tls-cert/--tls-key")  # fmt: skip
    alt_names = ",".join(
        ("IP:" if _is_address(name) else "DNS:") + name for name in names
    )
    with tempfile.TemporaryDirectory(prefix="hopcat-tls-") as directory:
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        command = [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=hopcat ephemeral", "-keyout", key, "-out", cert,
            "-addext", f"subjectAltName={alt_names}",
        ]  # fmt: skip
        made = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if made.returncode != 0:
            why = made.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
            raise UsageError(f"making a throwaway certificate with openssl: {why[0]}")
        context.load_cert_chain(cert, key)
        with open(cert, encoding="ascii") as pem:
            return ssl.PEM_cert_to_DER_cert(pem.read())


def _is_address(name: str) -> bool:
    from hopcat._endpoint import is_ip_literal

    return is_ip_literal(name)


def peer_der(session: ssl.SSLObject) -> bytes | None:
    der: bytes | None = session.getpeercert(binary_form=True)
    return der


def check_pin(session: ssl.SSLObject, pin: bytes, who: str) -> None:
    import hashlib

    der = peer_der(session)
    if der is None or hashlib.sha256(der).digest() != pin:
        got = fingerprint(der) if der else "no certificate"
        raise TLSError(f"TLS with {who}: certificate pin mismatch (got sha256:{got})")


def fingerprint(der: bytes) -> str:
    import hashlib

    return hashlib.sha256(der).hexdigest().upper()


def describe(session: ssl.SSLObject) -> str:
    """For -v: protocol, cipher, ALPN, and the peer certificate's subject, issuer, expiry and
    SHA-256 (read from the certificate itself, so unverified ones show too)."""
    cipher = session.cipher()
    parts = [f"{session.version()} {cipher[0] if cipher else '?'}"]
    alpn = session.selected_alpn_protocol()
    if alpn:
        parts.append(f"ALPN {alpn}")
    der = peer_der(session)
    if der:
        from hopcat.net._x509 import summary

        subject, issuer, not_after = summary(der)
        parts.append(f"subject {subject or '?'}, issuer {issuer or '?'}, expires "
                     f"{not_after or '?'}, sha256:{fingerprint(der)}")  # fmt: skip
    else:
        parts.append("no peer certificate")
    return "; ".join(parts)


def failure(exc: BaseException, who: str, *, peer: str = "server") -> HopcatError:
    """A handshake's failure as one line naming ``who`` ("the target example.org:443");
    ``peer``: what the other side should have been ("server", or a listener's "client")."""
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        hint = " (--tls-ca FILE to trust its CA, --tls-insecure to skip the check)"
        if peer == "client":
            hint = " (--tls-ca FILE: the CA that signs client certificates)"
        elif "mismatch" in verify_message.lower():  # "Hostname mismatch", "IP address mismatch"
            hint = " (--tls-servername NAME for the name it has)"
        return TLSError(f"TLS with {who}: certificate not trusted: {verify_message}{hint}")
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return TLSError(f"TLS with {who}: the peer closed during the handshake (not a TLS {peer}?)")
    if isinstance(exc, ssl.SSLError):
        reason = reason_text(exc)
        if reason in ("wrong version number", "http request", "https proxy request"):
            reason += f" (not a TLS {peer}?)"
        return TLSError(f"TLS with {who}: handshake failed: {reason}")
    if isinstance(exc, HopcatError):
        return exc
    return TLSError(f"TLS with {who}: handshake failed: {_describe(exc)}")


def reason_text(exc: ssl.SSLError) -> str:
    """OpenSSL's reason as words ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "decryption failed or
    bad record mac"; "TLSV1_ALERT_PROTOCOL_VERSION": "alert protocol version")."""
    reason = exc.reason
    if not reason:
        return str(exc)
    words = reason.lower().replace("_", " ")
    for prefix in ("sslv3 ", "tlsv1 ", "tlsv13 "):
        words = words.removeprefix(prefix)
    return words


def _describe(exc: BaseException) -> str:
    from hopcat.net.dial import describe_oserror

    return describe_oserror(exc)
