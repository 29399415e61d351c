"""hopcat serve's HTTP Digest (RFC 7616): the server machine's part (challenges out, the
Digest answer parsed into an event) and the server's verification (``server.digest``), checked
against the RFC's own example and against answers from hopcat's Digest client."""

from __future__ import annotations

import pytest

from hopcat.errors import LocalProtocolError, UsageError
from hopcat.proto._events import DigestCredentials, Rejected, Request
from hopcat.proto.http_auth import (
    DigestClient,
    digest_challenge,
    digest_hash,
    digest_response,
    make_nonce,
    nonce_time,
    parse_challenges,
)
from hopcat.proto.http_connect import AUTH_CHALLENGE, HttpConnectServer
from hopcat.server.cli import finish, parse_args
from hopcat.server.digest import OK, STALE, WRONG, DigestAuth
from hopcat.server.policy import CredentialStore

SECRET = b"k" * 32
TARGET = "example.net:22"


def test_rfc7616_example_responses() -> None:
    # RFC 7616 section 3.9.1 (a GET: the formulas are the same for CONNECT).
    user, realm, password = b"Mufasa", b"http-auth@example.org", b"Circle of Life"
    nonce, cnonce = (
        "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    expected = {
        "MD5": b"8ca523f5e9506fed4657c9700eebdbec",
        "SHA-256": b"753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
    }
    for algorithm, response in expected.items():
        ha1 = digest_hash(algorithm, user, realm, password)
        got = digest_response(algorithm, ha1, nonce, "00000001", cnonce, "GET", "/dir/index.html")
        assert got == response, algorithm


def test_nonces_are_dated_and_signed() -> None:
    nonce = make_nonce(SECRET, 1234.9, b"\x01\x02")
    assert nonce_time(SECRET, nonce) == 1234
    assert nonce_time(b"other secret", nonce) is None
    stamp, _, mac = nonce.rpartition(".")
    assert nonce_time(SECRET, "4d3" + stamp[3:] + "." + mac) is None  # a later time, same mac
    for junk in ("", "abc", "..", "zz.01.00", nonce + "x", "é" * 40):
        assert nonce_time(SECRET, junk) is None
    assert make_nonce(SECRET, 1, b"a") != make_nonce(SECRET, 1, b"b")


def test_challenge_text() -> None:
    assert digest_challenge("hopcat", "n", "MD5") == (
        'Digest realm="hopcat", qop="auth", algorithm=MD5, nonce="n"'
    )
    assert digest_challenge("hopcat", "n", "SHA-256", stale=True).endswith(", stale=true")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(
    challenge: str, *, password: str = "pw", user: str = "alice", uri: str = TARGET,
    target: str = TARGET,
) -> DigestCredentials:  # fmt: skip
    """What hopcat's client answers to ``challenge``, as the server machine hands it over."""
    value = DigestClient(user, password).authorization(
        parse_challenges([challenge])[0], "CONNECT", uri, "cnonce1"
    )
    server = HttpConnectServer(require_auth=True, challenges=[challenge])
    server.receive_data(
        f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n".encode()
    )
    event = server.next_event()
    assert isinstance(event, DigestCredentials)
    return event


def store() -> CredentialStore:
    return CredentialStore([("alice", "pw")], digest_algorithms=("MD5", "SHA-256"))


@pytest.mark.parametrize("index", [0, 1], ids=["MD5", "SHA-256"])
def test_right_answer_is_accepted_once(index: int) -> None:
    auth = DigestAuth(Clock(), secret=SECRET)
    challenge = auth.challenges()[index]
    event = answer(challenge)
    assert event.algorithm == ("MD5", "SHA-256")[index] and event.uri == event.target == TARGET
    assert "response='***'" in repr(event) and event.response not in repr(event)
    assert auth.check(event, store().digest_ha1) == (OK, "")
    # The same answer again (same nonce, same nc) is a replay.
    outcome, reason = auth.check(event, store().digest_ha1)
    assert outcome == WRONG and "replayed" in reason


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"password": "nope"}, "wrong user name or password"),
        ({"user": "mallory", "password": "pw"}, "wrong user name or password"),
        ({"uri": "other.example:22", "target": "other.example:22"}, None),  # checked: fine
        ({"uri": "other.example:22"}, "Digest uri is not the request target"),
    ],
)
def test_wrong_answers(kwargs: dict[str, str], reason: str | None) -> None:
    auth = DigestAuth(Clock(), secret=SECRET)
    outcome, text = auth.check(answer(auth.challenges()[0], **kwargs), store().digest_ha1)
    assert (outcome, text) == ((OK, "") if reason is None else (WRONG, reason))


def test_foreign_nonce_realm_and_algorithm_are_refused() -> None:
    auth = DigestAuth(Clock(), secret=SECRET, algorithms=("SHA-256",))
    other = DigestAuth(Clock(), secret=b"another server")
    forged = answer(other.challenges()[1])
    assert auth.check(forged, store().digest_ha1) == (
        WRONG,
        "Digest nonce not issued by this server",
    )
    md5 = answer(other.challenges()[0])
    assert auth.check(md5, store().digest_ha1)[1] == "Digest algorithm MD5 was not offered"
    nonce = make_nonce(SECRET, 1000, b"s")
    elsewhere = answer(digest_challenge("elsewhere", nonce, "SHA-256"))
    assert auth.check(elsewhere, store().digest_ha1) == (WRONG, "Digest answer for another realm")


def test_expired_nonce_is_stale_only_with_the_right_password() -> None:
    clock = Clock()
    auth = DigestAuth(clock, secret=SECRET, lifetime_s=60)
    challenge = auth.challenges()[0]
    clock.now += 61
    assert auth.check(answer(challenge), store().digest_ha1)[0] == STALE
    assert auth.check(answer(challenge, password="nope"), store().digest_ha1)[0] == WRONG
    stale = auth.challenges(stale=True)
    assert all(value.endswith("stale=true") for value in stale)
    assert auth.check(answer(stale[1]), store().digest_ha1) == (OK, "")


def test_store_without_digest_knows_no_ha1() -> None:
    ha1, known = CredentialStore([("alice", "pw")]).digest_ha1("alice", "MD5")
    assert not known and len(ha1) == 32
    ha1, known = store().digest_ha1("alice", "SHA-256")
    assert known and ha1 == digest_hash("SHA-256", b"alice", b"hopcat", b"pw")


# --------------------------------------------------------------------------- the machine

DIGEST = 'Digest realm="hopcat", qop="auth", algorithm=MD5, nonce="n1"'


def test_machine_offers_its_challenges_in_order() -> None:
    server = HttpConnectServer(require_auth=True, challenges=[DIGEST, AUTH_CHALLENGE])
    server.receive_data(b"CONNECT h:22 HTTP/1.1\r\n\r\n")
    event = server.next_event()
    assert event == Rejected(
        "HTTP 407: no usable Proxy-Authorization header for the schemes offered",
        Rejected.AUTHENTICATION,
    )
    head, _, body = server.data_to_send().decode().partition("\r\n\r\n")
    assert head.index(f"Proxy-Authenticate: {DIGEST}\r\n") < head.index(
        f"Proxy-Authenticate: {AUTH_CHALLENGE}\r\n"
    )
    assert head.endswith("Connection: close") and body == "Proxy Authentication Required\n"


def test_machine_hands_over_a_digest_answer_and_a_stale_refusal() -> None:
    server = HttpConnectServer(require_auth=True, challenges=[DIGEST])
    server.receive_data(
        b'CONNECT [::1]:22 HTTP/1.1\r\nProxy-Authorization: Digest username="al\\"ice", '
        b'realm="hopcat", nonce="n1", uri="[::1]:22", response="abc", qop=auth, nc=0000000A, '
        b'cnonce="c", opaque="o"\r\n\r\n'
    )
    event = server.next_event()
    assert event == DigestCredentials(
        'al"ice', "hopcat", "n1", "[::1]:22", "abc", "MD5", "0000000A", "c", "CONNECT", "[::1]:22"
    )
    stale = [DIGEST + ", stale=true"]
    server.accept_credentials(False, challenges=stale, reason="nonce expired")
    assert f"Proxy-Authenticate: {stale[0]}\r\n".encode() in server.data_to_send()
    assert server.next_event() == Rejected("HTTP 407: nonce expired", Rejected.AUTHENTICATION)


def test_machine_accepts_then_passes_the_request() -> None:
    server = HttpConnectServer(require_auth=True, challenges=[DIGEST])
    server.receive_data(
        b'CONNECT h:22 HTTP/1.1\r\nProxy-Authorization: Digest username="a", realm="hopcat", '
        b'nonce="n1", uri="h:22", response="abc", qop="auth", nc=00000001, cnonce="c", '
        b"algorithm=sha-256\r\n\r\n"
    )
    event = server.next_event()
    assert isinstance(event, DigestCredentials) and event.algorithm == "SHA-256"
    server.accept_credentials(True)
    assert server.next_event() == Request("CONNECT", "h", 22)


@pytest.mark.parametrize(
    "header",
    [
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", nc=00000001, cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", qop=auth-int, '
        'nc=00000001, cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", qop=auth, nc=1, '
        'cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", qop=auth, '
        'nc=0000000g, cnonce="c"',
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", qop=auth, '
        'nc=00000001, cnonce="c", algorithm=MD5-sess',
        'Digest username="a", realm="r", nonce="n", uri="h:22", response="x", qop=auth, '
        'nc=00000001, cnonce="c", userhash=true',
        'Digest username="a, realm="r"',  # unterminated
        "Digest",
        "Basic dTpw",  # Basic is not offered
    ],
)
def test_machine_refuses_unusable_digest_answers(header: str) -> None:
    server = HttpConnectServer(require_auth=True, challenges=[DIGEST])
    server.receive_data(f"CONNECT h:22 HTTP/1.1\r\nProxy-Authorization: {header}\r\n\r\n".encode())
    event = server.next_event()
    assert isinstance(event, Rejected) and event.kind == Rejected.AUTHENTICATION
    assert server.data_to_send().startswith(b"HTTP/1.1 407 ")


def test_machine_checks_its_challenges() -> None:
    with pytest.raises(LocalProtocolError):
        HttpConnectServer(require_auth=True, challenges=["NTLM"])
    with pytest.raises(LocalProtocolError):
        HttpConnectServer(require_auth=True, challenges=['Basic realm="a\r\nX: y"'])


# --------------------------------------------------------------------------- options


def test_auth_scheme_option() -> None:
    assert finish(parse_args(["--auth", "a:b"])).auth_schemes == ("digest", "basic")
    options = finish(parse_args(["--auth", "a:b", "--auth-scheme", "Basic,digest"]))
    assert options.auth_schemes == ("basic", "digest")
    for bad in ("ntlm", "basic,basic", "", "digest,"):
        with pytest.raises(UsageError, match="--auth-scheme"):
            finish(parse_args(["--auth-scheme", bad]))
    with pytest.raises(UsageError, match="--nonce-lifetime"):
        finish(parse_args(["--nonce-lifetime", "0"]))
