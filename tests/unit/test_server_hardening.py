"""hopcat serve's server roles and files: refusals answered, secrets kept out of messages and
logs, files handled safely, failed logins throttled (issue 8, rules 14-16)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hopcat._ready import write_ready_file
from hopcat.errors import ProtocolError, UsageError
from hopcat.proto.http_connect import HttpConnectServer
from hopcat.proto.socks4 import Socks4Server
from hopcat.proto.socks5 import Socks5Server
from hopcat.server.cli import finish, parse_args
from hopcat.server.log import Logger, redact
from hopcat.server.policy import parse_auth_file
from hopcat.server.serve import Server, load_config
from hopcat.server.throttle import FREE_FAILURES, LoginThrottle

SOCKS5_FAILURE = b"\x05\x01\x00\x01" + bytes(6)
SOCKS4_FAILURE = b"\x00\x5b" + bytes(6)


def fail(machine: object, data: bytes) -> bytes:
    """Feed ``data``; it must raise a protocol error; return the refusal the machine offers."""
    with pytest.raises(ProtocolError):
        machine.receive_data(data)  # type: ignore[attr-defined]
        machine.next_event()  # type: ignore[attr-defined]
        machine.receive_data(b"")  # type: ignore[attr-defined]
        machine.next_event()  # type: ignore[attr-defined]
    return machine.abort_reply(400)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"\x06", b"\x05\xff"),  # bad version in the greeting
        (b"\x05\x02\x00", b"\x05\xff"),  # greeting cut short
        (b"\x05\x01\x00\x04", b"\x05\x00" + SOCKS5_FAILURE),  # bad request version
        (b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00" + SOCKS5_FAILURE),  # empty name
    ],
)
def test_socks5_protocol_errors_get_a_reply(data: bytes, answer: bytes) -> None:
    assert fail(Socks5Server(), data) == answer


def test_socks5_malformed_subnegotiation_gets_status_1() -> None:
    machine = Socks5Server(require_auth=True)
    assert fail(machine, b"\x05\x01\x02\x05\x05alice\x02pw") == b"\x05\x02\x01\x01"


def test_socks4_protocol_errors_get_91() -> None:
    assert fail(Socks4Server(), b"\x04\x01\x00\x50\x00\x00\x00\x01me\x00\x00") == SOCKS4_FAILURE
    assert fail(Socks4Server(), b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300) == SOCKS4_FAILURE


def test_abort_in_other_states() -> None:
    machine = Socks5Server()
    assert machine.abort_reply(408) == b"\x05\xff"  # timed out before the greeting
    http = HttpConnectServer()
    assert http.abort_reply(408).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    http = HttpConnectServer()
    http.receive_data(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
    http.next_event()
    assert http.abort_reply(503).startswith(b"HTTP/1.1 503 ")  # the server is stopping


SECRET = "dXNlcjpzM2NyM3Q="  # base64 of user:s3cr3t


@pytest.mark.parametrize(
    "head",
    [
        f"Proxy-Authorization: Basic {SECRET}\r\nProxy-Authorization: Basic {SECRET}\r\n",
        f"proxy-AUTHORIZATION: Basic {SECRET}\r\nProxy-Authorization: Basic {SECRET}\r\n",
        f"Proxy-Authorization : Basic {SECRET}\r\n",
        f"Proxy-Authorization: Basic\r\n {SECRET}\r\n",
        f"Proxy-Authorization: Basic {SECRET}\rX-Evil: 1\r\n",
        f"Proxy-Authorization: Basic {SECRET}\x00\r\n",
        f"X-Note: a\x01b\r\nProxy-Authorization: Basic {SECRET}\r\n",
        f"Proxy-Authorization Basic {SECRET}\r\n",
    ],
)
def test_bad_http_heads_are_400_without_quoting_secrets(head: str) -> None:
    machine = HttpConnectServer(require_auth=True)
    data = f"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n{head}\r\n".encode()
    with pytest.raises(ProtocolError) as info:
        machine.receive_data(data)
        machine.next_event()
    assert SECRET not in str(info.value) and "s3cr3t" not in str(info.value)
    assert machine.abort_reply(400).startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(
    "line",
    [
        "CONNECT user:s3cr3t@example.com:443 HTTP/1.1",
        "CONNECT user:s3cr3t@example.com:443 extra HTTP/1.1",
        "GET http://user:s3cr3t@example.com/ HTTP/1.1 x",
    ],
)
def test_userinfo_in_a_request_line_is_redacted(line: str) -> None:
    machine = HttpConnectServer()
    with pytest.raises(ProtocolError) as info:
        machine.receive_data(f"{line}\r\n\r\n".encode())
        machine.next_event()
    assert "s3cr3t" not in str(info.value)
    assert "***@" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "malformed header line 'Proxy-Authorization: Basic dXNlcjpzM2NyM3Q='",
        "resolve user:s3cr3t@example.com: name not known",
        "bearer s3cr3t",
    ],
)
def test_log_values_are_redacted(text: str, tmp_path: Path) -> None:
    assert "s3cr3t" not in redact(text) and "dXNlcjpzM2NyM3Q=" not in redact(text)
    for fmt in ("text", "json"):
        path = tmp_path / fmt
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        Logger(fd=fd, fmt=fmt).log("tunnel", reason=text, dest="user:s3cr3t@h:1")
        os.close(fd)
        assert "s3cr3t" not in path.read_text()


def test_redaction_leaves_addresses_alone() -> None:
    for text in ("[::1]:80", "fe80::1:22", "user@host:22", "10.0.0.1:443"):
        assert redact(text) == text


def test_login_throttle_is_per_client_and_grows() -> None:
    throttle = LoginThrottle()
    for _ in range(FREE_FAILURES):
        assert throttle.failed("192.0.2.1", 0.0) == 0
    assert throttle.failed("192.0.2.1", 0.0) == 1.0
    assert throttle.failed("192.0.2.1", 0.5) == 2.0
    assert throttle.penalty_left("192.0.2.1", 1.0) == pytest.approx(1.5)
    assert throttle.penalty_left("192.0.2.2", 1.0) == 0
    # One IPv6 host holds a /64: its addresses share a count.
    for _ in range(FREE_FAILURES + 1):
        throttle.failed(f"2001:db8::{_ + 1}", 0.0)
    assert throttle.penalty_left("2001:db8::ffff", 0.5) > 0
    assert throttle.penalty_left("2001:db8:0:1::1", 0.5) == 0
    throttle.succeeded("192.0.2.1")
    assert throttle.penalty_left("192.0.2.1", 1.0) == 0


def test_auth_file_as_editors_write_it(tmp_path: Path) -> None:
    assert parse_auth_file("alice:pw one \t\r\nbob:x:y\r\n", "f") == [
        ("alice", "pw one"),
        ("bob", "x:y"),
    ]
    path = tmp_path / "users"
    path.write_bytes(b"\xef\xbb\xbfalice:pw\r\n")
    options = finish(parse_args(["--auth-file", str(path)]))
    credentials, _policy, _warnings = load_config(options)
    assert credentials.check("alice", "pw")


def test_reload_keeps_the_old_users_and_rules(tmp_path: Path) -> None:
    users, rules = tmp_path / "users", tmp_path / "rules"
    users.write_text("alice:pw\n")
    rules.write_text("deny 10.0.0.0/8\n")
    options = finish(parse_args(["--auth-file", str(users), "--rules", str(rules)]))
    credentials, policy, _ = load_config(options)
    log = tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    logger = Logger(fd=fd)
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        server = Server(options, [], loop, logger, credentials, policy)
        for users_text, rules_text in (("", "deny 10.0.0.0/8\n"), ("alice", "deny 10.0.0.0/8\n"),
                                       ("alice:pw\n", ""), ("alice:pw\n", "deny 10.0.0.0/8 x\n")):  # fmt: skip
            users.write_text(users_text)
            rules.write_text(rules_text)
            server.reload()
            last = log.read_text().splitlines()[-1]
            assert server.credentials is credentials and server.policy is policy, last
            assert "event=reload result=error" in last
        users.write_text("bob:pw2\n")
        rules.write_text("deny 10.0.0.0/8\n")
        server.reload()
        assert server.credentials.check("bob", "pw2")
    finally:
        server.engine.close()
        loop.close()
        os.close(fd)


def test_auth_file_without_users_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# nobody yet\n")
    with pytest.raises(UsageError, match="holds no user"):
        load_config(finish(parse_args(["--auth-file", str(path)])))


def test_ready_file_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    ready = tmp_path / "ready"
    ready.symlink_to(victim)
    write_ready_file(str(ready), b"127.0.0.1:1080\n")
    assert victim.read_text() == "precious\n"
    assert not ready.is_symlink() and ready.read_text() == "127.0.0.1:1080\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "victim"]


def test_via_password_not_on_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOPCAT_PROXY_PASSWORD", raising=False)
    with pytest.raises(UsageError, match="HOPCAT_PROXY_PASSWORD") as info:
        finish(parse_args(["--via", "socks5://alice@127.0.0.1:1"]))
    assert "s3cr3t" not in str(info.value)
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t\n")
    options = finish(
        parse_args(["--via", "http://alice@127.0.0.1:1", "--via-password-file", str(secret)])
    )
    assert options.via[0].password == "s3cr3t"
    monkeypatch.setenv("HOPCAT_PROXY_PASSWORD", "from-env")
    assert finish(parse_args(["--via", "socks5://alice@127.0.0.1:1"])).via[0].password == "from-env"


@pytest.mark.parametrize(
    ("text", "size"), [("0", 0), ("65536", 65536), ("512k", 512 << 10), ("8M", 8 << 20)]
)
def test_max_receive_buffer_sizes(text: str, size: int) -> None:
    assert parse_args(["--max-receive-buffer", text]).max_receive_buffer == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5M", "8MB", "\uff11M", "8T"])
def test_max_receive_buffer_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UsageError, match="--max-receive-buffer takes a size"):
        parse_args(["--max-receive-buffer", text])


def test_tls_listen_addresses_are_kept_apart() -> None:
    options = finish(parse_args(["127.0.0.1:1080", "TLS://127.0.0.1:8443", "tls://[::1]:8443",
                                 "tls://8444", "--tls-cert", "cert.pem"]))  # fmt: skip
    assert [sockaddr[1] for _family, sockaddr in options.bind_addresses] == [1080]
    assert [(sockaddr[0], sockaddr[1]) for _family, sockaddr in options.tls_addresses] == [
        ("127.0.0.1", 8443), ("::1", 8443), ("127.0.0.1", 8444)
    ]
    assert options.loopback_only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tls://127.0.0.1:8443"], "needs --tls-cert"),
        (["127.0.0.1:1080", "--tls-verify-client"], "--tls-verify-client is for tls://"),
        (["https://127.0.0.1:8443"], "the only scheme is tls://"),
        (["tls://0.0.0.0:8443", "--tls-cert", "c.pem"], "without authentication"),
    ],
)
def test_tls_listen_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        finish(parse_args(argv))
