"""Properties of hopcat serve's Digest (hypothesis).

- Any user name and password (control characters aside), any CONNECT target: hopcat's Digest
  client answers the server's challenges, the server machine parses the answer and
  ``DigestAuth`` accepts it, for each algorithm; with another password it refuses.
- Random text as a Digest Proxy-Authorization gives a 407 or a DigestCredentials event that
  ``DigestAuth.check`` refuses; nothing raises.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopcat.proto._events import DigestCredentials, Rejected
from hopcat.proto.http_auth import DigestClient, parse_challenges
from hopcat.proto.http_connect import HttpConnectServer
from hopcat.server.digest import OK, WRONG, DigestAuth
from hopcat.server.policy import CredentialStore

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF).filter(lambda c: c != "\x7f"),
    min_size=1,
    max_size=20,
)
hosts = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=30)


def machine_event(challenges: list[str], target: str, authorization: str) -> object:
    server = HttpConnectServer(require_auth=True, challenges=challenges)
    head = f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {authorization}\r\n\r\n"
    server.receive_data(head.encode("utf-8"))
    return server.next_event()


@SETTINGS
@given(
    user=text.filter(lambda u: ":" not in u), password=text, host=hosts, port=st.integers(1, 65535)
)
def test_client_answers_are_accepted(user: str, password: str, host: str, port: int) -> None:
    auth = DigestAuth(lambda: 100.0, secret=b"s" * 32)
    store = CredentialStore([(user, password)], digest_algorithms=auth.algorithms)
    target = f"{host}:{port}"
    for index in range(len(auth.algorithms)):
        # A fresh nonce each time: the challenges of one 407 share theirs, answered once.
        challenges = auth.challenges()
        challenge = challenges[index]
        for secret, expected in ((password + "x", WRONG), (password, OK)):
            value = DigestClient(user, secret).authorization(
                parse_challenges([challenge])[0], "CONNECT", target, "cn"
            )
            event = machine_event(challenges, target, value)
            assert isinstance(event, DigestCredentials)
            assert auth.check(event, store.digest_ha1)[0] == expected


@SETTINGS
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(lambda c: c != "\x7f")))
def test_random_answers_are_refused(value: str) -> None:
    auth = DigestAuth(lambda: 100.0, secret=b"s" * 32)
    store = CredentialStore([("alice", "pw")], digest_algorithms=auth.algorithms)
    server = HttpConnectServer(require_auth=True, challenges=auth.challenges())
    server.receive_data(
        b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Digest "
        + value.encode("latin-1")
        + b"\r\n\r\n"
    )
    event = server.next_event()
    if isinstance(event, DigestCredentials):
        assert auth.check(event, store.digest_ha1)[0] == WRONG
    else:
        assert isinstance(event, Rejected) and event.kind == Rejected.AUTHENTICATION
