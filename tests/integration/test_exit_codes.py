"""Exit 70 means a bug: every option with good and bad values, and every proxy error path against
a hostile scripted proxy, must end in a documented code with one line, never "internal error".

The option list is read from the option table itself, so a new option without a case here fails
``test_every_option_has_cases``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hopcat.cli._args import OPTION_TABLE
from support import clean_env, closed_port, run_hopcat

DOCUMENTED = {0, 64, 68, 69, 74, 75, 76, 77, 80, 81, 82}


class ScriptedServer:
    """Accepts any number of connections on loopback and hands each to ``_one`` on a thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # close() alone does not wake the thread blocked in accept(); shutdown() does (Linux).
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class HelloTarget(ScriptedServer):
    """Says hello and closes each connection."""

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"hello\n")


@pytest.fixture(scope="module")
def target() -> Iterator[HelloTarget]:
    hello = HelloTarget()
    yield hello
    hello.close()


# (flag, good values, bad values). "{port}" is replaced by the target's port; a flag without a
# value has good = [None] and bad = [].
OPTION_CASES: dict[str, tuple[list[str | None], list[str]]] = {
    "-4": ([None], []),
    "-6": ([None], []),
    "-s": (["127.0.0.1", "::1"], ["256.1.1.1", "not an address", "localhost"]),
    "-n": ([None], []),
    "--connect-timeout": (["0", "0.5", "1e12", "500ms", "1h"], ["-1", "x", "inf", "nan", "1e400"]),
    "-w": (["0", "5", "2m", "1e12"], ["-1", "x", "nan"]),
    "-q": (["0", "-1", "5", "1e12"], ["x", "inf"]),
    "-N": ([None], []),
    "--no-shutdown": ([None], []),
    "--keep-sending": ([None], []),
    "-d": ([None], []),
    "--keepalive": ([None], []),
    "--nagle": ([None], []),
    "-x": ([], ["::1:1080", "socks5h://u:p/w@h", "gopher://h", "socks5h://@h:1", "h:99999"]),
    "-X": ([], ["7"]),
    "-P": ([], ["user"]),
    "--proxy": ([], ["[::1", "h:port"]),
    "--proxy-type": ([], ["gopher"]),
    "--proxy-auth": ([], ["u:p", ":pw"]),
    # Good values need an HTTP proxy (tests/scenario/test_proxy_auth.py); without one: 64.
    "--proxy-auth-scheme": ([], ["kerberos", "", "ntlm,,basic", "basic"]),
    # Unused without a proxy that has a user (tests/integration/test_passwords.py uses them).
    "--proxy-password-file": (["/nonexistent/password"], [""]),
    "--proxy-password-command": (["exit 1"], [""]),
    "-S": ([], ["@h", "h:0"]),
    "-H": ([], ["h:x"]),
    "--proxy-dns": (["local", "remote", "both", "none"], ["sometimes"]),
    "--no-proxy": ([None], []),
    "-F": ([None], []),
    "-z": ([None], []),  # scans the target's port: open, exit 0
    "-r": ([None], []),  # 64 without -z (checked in test_scan.py)
    "-i": (["0.5"], ["x", "nan"]),
    "--max-parallel": (["4"], []),
    "--proxy-cacert": (["/nonexistent/ca.pem"], []),
    "--proxy-insecure": ([None], []),
    # --tls against the plain target: the handshake fails (82). The other TLS options alone are
    # usage errors (they need --tls); tests/integration/test_tls.py checks their values.
    "-c": ([None], []),
    "--tls-ca": ([], ["/etc/hostname"]),
    "--tls-servername": ([], ["example.org"]),
    "--tls-cert": ([], ["/etc/hostname"]),
    "--tls-key": ([], ["/etc/hostname"]),
    "--tls-alpn": ([], ["h2"]),
    "--tls-pin": ([], ["sha256:00"]),
    "--tls-min-version": ([], ["1.3"]),
    "--tls-insecure": ([], [None]),
    "--tls-verify-client": ([], [None]),
    "--ssl-verify": ([None], []),
    # Listen mode (tests/integration/test_listen.py has its own cases): -l on the target's own
    # port is in use (69); the listen-only flags without -l are usage errors. The socket
    # options' effects are checked in test_socket_options.py.
    "-l": ([None], []),
    "-k": ([], [None]),
    "-p": ([], ["0", "70000", "x"]),
    "-C": ([None], []),
    "-I": (["65536"], ["0", "x", "2000000000"]),
    "-O": (["65536"], ["-1"]),
    "-T": (["lowdelay", "ef", "0x10", "184"], ["bogus", "256", "0x100"]),
    "-M": (["1", "255"], ["0", "256", "x"]),
    "-D": ([None], []),
    "-U": ([None], []),
    "--allow": ([], ["127.0.0.1"]),
    "--deny": ([], ["127.0.0.1"]),
    "--ready-fd": ([], ["2"]),
    "--ready-file": ([], ["/tmp/hopcat-ready"]),
    "-e": (["true"], ["no-such-program-here"]),
    "--sh-exec": (["exit 0"], [""]),
    "--max-conns": ([], ["5"]),
    # -u keeps receiving after stdin's EOF, as nc does: its good cases are in test_udp.py.
    # -W and -b without -u are usage errors.
    "-u": ([], []),
    "-W": ([], ["1", "0"]),
    "-b": ([], [None]),
    "-v": ([None], []),
    "--debug": ([None], []),
    "-h": ([None], []),
    "-V": ([None], []),
}


def _flag_of(row: tuple[str, str, str, str, str]) -> str:
    return f"-{row[0]}" if row[0] else f"--{row[1]}"


def test_every_option_has_cases() -> None:
    assert {_flag_of(row) for row in OPTION_TABLE} == set(OPTION_CASES)


def _cases() -> Iterator[object]:
    for flag, (good, bad) in OPTION_CASES.items():
        for value in good:
            marks = ()
            if isinstance(value, type(pytest.param(None))):
                marks, value = value.marks, value.values[0]  # type: ignore[attr-defined]
            yield pytest.param(flag, value, True, marks=marks, id=f"{flag}={value}")
        for value in bad:
            yield pytest.param(flag, value, False, id=f"{flag}={value}!")


def assert_documented(result: object) -> str:
    err = result.stderr.decode(errors="replace")  # type: ignore[attr-defined]
    code = result.returncode  # type: ignore[attr-defined]
    assert code in DOCUMENTED, err
    assert "internal error" not in err and "Traceback" not in err, err
    if code not in (0,) and "-v" not in err:
        assert err.count("\n") >= 1
    return err


@pytest.mark.parametrize(("flag", "value", "good"), list(_cases()))
def test_option_values(target: HelloTarget, flag: str, value: str | None, good: bool) -> None:
    argv = [flag] if value is None else [flag, value]
    result = run_hopcat(*argv, "127.0.0.1", str(target.port), timeout=30)
    err = assert_documented(result)
    if not good:
        assert result.returncode == 64, err
        assert err.count("\n") == 1 and err.startswith("hopcat: "), err


# -- every proxy error path, against a hostile scripted proxy -------------------------------------

class Hostile(ScriptedServer):
    """Misbehaves the same way on every connection (the first, and any diagnosis probe)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        super().__init__()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with conn:
                conn.recv(4096)
                reply = {
                    "garbage": bytes(range(256)) * 4,
                    "http-400": b"HTTP/1.1 400 Bad Request\r\n\r\n",
                    "http-401": b"HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic\r\n\r\n",
                    "socks5-noauth-then-close": b"\x05\x00",
                    "socks5-refuse-all": b"\x05\xff",
                    "socks5-weird-method": b"\x05\x07",
                    "socks4-bad-reply": b"\x00\x5b\x00\x00\x00\x00\x00\x00",
                    "tls-alert": b"\x15\x03\x03\x00\x02\x02\x28",
                    "huge-head": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                }.get(self.behaviour, b"")
                if self.behaviour == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(reply)
        except OSError:
            pass


BEHAVIOURS = ["close", "reset", "garbage", "http-400", "http-401", "socks5-noauth-then-close",
              "socks5-refuse-all", "socks5-weird-method", "socks4-bad-reply", "tls-alert",
              "huge-head"]


@pytest.mark.parametrize("scheme", ["socks4", "socks4a", "socks5h", "http", "https"])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_hostile_proxy_paths(scheme: str, behaviour: str) -> None:
    proxy = Hostile(behaviour)
    try:
        result = run_hopcat("--connect-timeout", "3", "--proxy-insecure", "-x",
                            f"{scheme}://user:pw@127.0.0.1:{proxy.port}", "192.0.2.1", "22",
                            timeout=30)
    finally:
        proxy.close()
    err = assert_documented(result)
    assert result.returncode in (75, 76, 77, 81), err
    assert err.count("\n") == 1 and "(hop 1/1)" in err and ":pw@" not in err, err


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["--proxy-cacert", "/nonexistent/ca.pem", "-x", "https://127.0.0.1:{closed}"], 64,
         "--proxy-cacert /nonexistent/ca.pem: no such file"),
        (["-n", "-x", "socks5h://localhost:{closed}"], 68, "-n"),
        (["--proxy-dns", "none", "-x", "socks5h://127.0.0.1:{hostile}"], 64, "--proxy-dns none"),
        (["-x", "socks5h://127.0.0.1:{hostile}"], 64, "scoped address"),
    ],
)
def test_cli_refusals(tmp_path: Path, argv: list[str], code: int, words: str) -> None:
    proxy = Hostile("socks5-noauth-then-close")
    host = "fe80::1%lo" if "scoped" in words else "target.test"
    try:
        with closed_port() as closed:
            filled = [a.format(closed=closed, hostile=proxy.port) for a in argv]
            result = run_hopcat(*filled, host, "22", timeout=30)
    finally:
        proxy.close()
    err = assert_documented(result)
    assert result.returncode == code and words in err, err


def test_verbose_says_what_got_through_when_a_reset_ends_the_transfer() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            received = 0
            while received < 1000:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            conn.sendall(b"x" * 300)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = run_hopcat("-v", "--no-shutdown", "127.0.0.1", str(listener.getsockname()[1]),
                            input=b"y" * 1000, timeout=30)
    finally:
        thread.join(10)
        listener.close()
    err = assert_documented(result)
    assert result.returncode == 74, err
    assert "ended by an error: the peer had acknowledged " in err, err
    assert "MethodSelected" not in err and "Established(" not in err


BAD_UTF8 = os.fsdecode(b"\xff")  # a byte that is not UTF-8, as a shell passes it


@pytest.mark.parametrize(
    "argv",
    [
        ["127.0.0.1", BAD_UTF8],
        [f"h{BAD_UTF8}", "22"],
        ["xn--\u00e9.com", "22"],
        ["-x", f"socks5h://{BAD_UTF8}:1", "h", "22"],
        ["-x", "socks5h://u%ff:p@h:1", "h", "22"],
        ["-P", BAD_UTF8, "-x", "127.0.0.1:1", "h", "22"],
        ["--proxy-auth", f"u:{BAD_UTF8}", "--proxy", "127.0.0.1:1", "h", "22"],
        ["-s", BAD_UTF8, "h", "22"],
        ["--proxy-cacert", BAD_UTF8, "-x", "https://127.0.0.1:1", "h", "22"],
    ],
)
def test_bytes_that_are_not_utf8_are_a_usage_error(argv: list[str]) -> None:
    err = assert_documented(run_hopcat(*argv, timeout=30))
    assert err.count("\n") == 1 and err.startswith("hopcat: "), err


def test_password_from_the_environment_that_is_not_utf8() -> None:
    with closed_port() as port:
        result = run_hopcat("-x", f"socks5h://u@127.0.0.1:{port}", "h", "22",
                            env=clean_env(HOPCAT_PROXY_PASSWORD=BAD_UTF8))
    err = assert_documented(result)
    assert result.returncode == 64 and "HOPCAT_PROXY_PASSWORD is not valid UTF-8" in err, err


@pytest.mark.parametrize("name", ["", "a\nb", "a b", "x" * 300, "x:y"])
def test_tls_servername_is_checked_before_it_reaches_sni(target: HelloTarget, name: str) -> None:
    """A name for SNI is refused like a host (exit 64), before anything is dialled; and the
    library's server_hostname alike (ValueError; an empty one there means the host's)."""
    result = run_hopcat("--tls", "--tls-servername", name, "127.0.0.1", str(target.port))
    assert result.returncode == 64, result.stderr
    assert result.stderr.startswith(b"hopcat: --tls-servername")
    if not name:
        return
    import ssl

    import hopcat

    with pytest.raises(ValueError, match="server_hostname"):
        hopcat.create_connection(("127.0.0.1", target.port), 10, via=hopcat.Chain(),
                                 ssl=ssl.create_default_context(), server_hostname=name)  # fmt: skip
    import asyncio

    import hopcat.aio

    with pytest.raises(ValueError, match="server_hostname"):
        asyncio.run(hopcat.aio.open_connection("127.0.0.1", target.port, via=hopcat.Chain(),
                                               ssl=ssl.create_default_context(),
                                               server_hostname=name))  # fmt: skip
