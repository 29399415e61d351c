"""Challenge parsing (RFC 9110 section 11), Basic (RFC 7617) and Digest (RFC 7616) answers."""

from __future__ import annotations

import hashlib

import pytest

from hopcat.errors import LocalProtocolError, RemoteProtocolError
from hopcat.proto.http_auth import (
    MAX_CHALLENGES,
    MAX_PARAMS,
    Challenge,
    DigestClient,
    basic_authorization,
    parse_challenges,
)

# RFC 7616 section 3.9.1: the same nonce offered with SHA-256 first, then MD5.
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC_CHALLENGES = [
    f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
    f'nonce="{RFC_NONCE}", opaque="{RFC_OPAQUE}"',
    f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, '
    f'nonce="{RFC_NONCE}", opaque="{RFC_OPAQUE}"',
]


def params_of(header: str) -> dict[str, str]:
    """The parameters of an Authorization value we produced, parsed back."""
    [challenge] = parse_challenges([header])
    assert challenge.name == "digest"
    return challenge.params


def digest_challenge(**params: str) -> Challenge:
    return Challenge("Digest", params={"realm": "r", "nonce": "n", **params})


# Parsing.


def test_the_corporate_proxies_example_parses_right() -> None:
    values = [
        r'Digest realm="a, b", nonce="x\"y", qop="auth,auth-int", algorithm=SHA-256, '
        r'Digest realm="a", nonce="z", algorithm=MD5',
        "NTLM",
        "Negotiate YIIB==",
        'Basic realm="hopcat-test"',
    ]
    assert parse_challenges(values) == [
        Challenge(
            "Digest",
            params={
                "realm": "a, b",
                "nonce": 'x"y',
                "qop": "auth,auth-int",
                "algorithm": "SHA-256",
            },
        ),
        Challenge("Digest", params={"realm": "a", "nonce": "z", "algorithm": "MD5"}),
        Challenge("NTLM"),
        Challenge("Negotiate", token68="YIIB=="),
        Challenge("Basic", params={"realm": "hopcat-test"}),
    ]


def test_several_challenges_in_one_value_with_empty_elements() -> None:
    parsed = parse_challenges([' , Negotiate, NTLM TlRMTVNTUAACAAAA ,, Basic realm="x" ,'])
    assert [(c.scheme, c.token68, c.params) for c in parsed] == [
        ("Negotiate", None, {}),
        ("NTLM", "TlRMTVNTUAACAAAA", {}),
        ("Basic", None, {"realm": "x"}),
    ]


def test_names_are_lower_cased_and_schemes_kept_as_sent() -> None:
    [challenge] = parse_challenges(['DIGEST Realm=x, NONCE = "y"'])
    assert (challenge.scheme, challenge.name) == ("DIGEST", "digest")
    assert challenge.params == {"realm": "x", "nonce": "y"}


def test_escapes_and_commas_in_quoted_strings() -> None:
    [challenge] = parse_challenges([r'Basic realm="a\\b\"c, d=e", charset=UTF-8'])
    assert challenge.params == {"realm": 'a\\b"c, d=e', "charset": "UTF-8"}


def test_token68_with_padding_versus_a_parameter() -> None:
    assert parse_challenges(["Negotiate abc="])[0].token68 == "abc="
    assert parse_challenges(["Basic realm="])[0].token68 == "realm="  # the grammar says so
    assert parse_challenges(["Negotiate a/b+c=="])[0].token68 == "a/b+c=="
    assert parse_challenges(["Digest abc=def"])[0].params == {"abc": "def"}
    assert parse_challenges(["Digest abc = def"])[0].params == {"abc": "def"}


def test_parameters_after_a_comma_belong_to_the_challenge_before() -> None:
    [challenge] = parse_challenges(['Basic, realm="x"'])
    assert challenge.params == {"realm": "x"}


@pytest.mark.parametrize(
    "value",
    [
        'realm="x"',  # a parameter before any scheme
        'Basic realm="x',  # unterminated
        'Basic realm="x\\',  # ends inside an escape
        "Basic a=b, realm=",  # no value
        "Basic realm=x y",  # two tokens in one element
        'Basic realm="x" "y"',
        "Basic realm=x, realm=y",  # repeated
        "Negotiate abc==, x=y",  # a parameter after a token68
        'Basic"x"',
        'Basic realm="a\x01b"',  # control character
        "@scheme",
    ],
)
def test_malformed_values_raise_without_quoting_them(value: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_challenges([value])
    message = str(caught.value)
    assert message.startswith("malformed authentication challenge")
    assert '"x"' not in message and "realm" not in message and "\x01" not in message


def test_caps() -> None:
    parse_challenges(["Basic, " * (MAX_CHALLENGES // 2), "NTLM, " * (MAX_CHALLENGES // 2)])
    with pytest.raises(RemoteProtocolError, match="more than 32 authentication challenges"):
        parse_challenges(["Basic, " * (MAX_CHALLENGES // 2), "NTLM, " * (MAX_CHALLENGES // 2 + 1)])
    many = ", ".join(f"p{i}=v" for i in range(MAX_PARAMS))
    assert len(parse_challenges([f"Digest {many}"])[0].params) == MAX_PARAMS
    with pytest.raises(RemoteProtocolError, match="more than 64 parameters"):
        parse_challenges([f"Digest {many}, extra=1"])


def test_repr_shows_no_values() -> None:
    text = repr(parse_challenges(['Digest nonce="secret-nonce"', "NTLM c2VjcmV0"]))
    assert "secret" not in text and "c2VjcmV0" not in text
    assert "nonce" in text and "token68 of 8 chars" in text


# Basic.


def test_basic_authorization() -> None:
    # RFC 7617 section 2 and 2.1 examples.
    assert basic_authorization("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    assert basic_authorization("test", "123\u00a3") == "Basic dGVzdDoxMjPCow=="
    assert basic_authorization("user", None) == basic_authorization("user", "")
    with pytest.raises(LocalProtocolError, match="cannot contain ':'"):
        basic_authorization("a:b", "c")


# Digest.


@pytest.mark.parametrize(
    ("index", "response"),
    [
        (0, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        (1, "8ca523f5e9506fed4657c9700eebdbec"),
    ],
)
def test_rfc7616_vectors(index: int, response: str) -> None:
    challenge = parse_challenges(RFC_CHALLENGES)[index]
    client = DigestClient("Mufasa", "Circle of Life")
    header = client.authorization(challenge, "GET", "/dir/index.html", RFC_CNONCE)
    assert header.startswith('Digest username="Mufasa", realm="http-auth@example.org", ')
    assert params_of(header) == {
        "username": "Mufasa",
        "realm": "http-auth@example.org",
        "nonce": RFC_NONCE,
        "uri": "/dir/index.html",
        "response": response,
        "algorithm": ["SHA-256", "MD5"][index],
        "opaque": RFC_OPAQUE,
        "qop": "auth",
        "nc": "00000001",
        "cnonce": RFC_CNONCE,
    }


def reference_response(
    hash_name: str, ha1_parts: list[str], nonce: str, nc: str, cnonce: str, uri: str
) -> str:
    def h(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    ha1 = h(":".join(ha1_parts))
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{h(f'CONNECT:{uri}')}")


def test_sha512_256_with_userhash_and_utf8() -> None:
    # RFC 7616 section 3.9.2's user and realm; its user hash is the RFC's value.
    challenge = Challenge(
        "Digest",
        params={
            "realm": "api@example.org",
            "nonce": "5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK",
            "qop": "auth",
            "algorithm": "SHA-512-256",
            "charset": "UTF-8",
            "userhash": "true",
        },
    )
    cnonce = "NTg6RKcb9boFIAS3KrFK9BGeh+iDa/sm6jUMp2wds69v"
    user = "J\u00e4s\u00f8n Doe"
    header = DigestClient(user, "Secret, or not?").authorization(
        challenge, "CONNECT", "example.com:22", cnonce
    )
    params = params_of(header)
    assert params["username"] == "793263caabb707a56211940d90411ea4a575adeccb7e360aeb624ed06ece9b0b"
    assert params["userhash"] == "true" and params["algorithm"] == "SHA-512-256"
    assert params["response"] == reference_response(
        "sha512_256",
        [user, "api@example.org", "Secret, or not?"],
        challenge.params["nonce"],
        "00000001",
        cnonce,
        "example.com:22",
    )
    assert user not in header


def test_sess_mixes_nonce_and_cnonce_into_ha1() -> None:
    challenge = digest_challenge(algorithm="MD5-sess", qop="auth")
    header = DigestClient("u", "p").authorization(challenge, "CONNECT", "h:22", "cn")
    ha1 = hashlib.md5(b"u:r:p").hexdigest()
    assert params_of(header)["response"] == reference_response(
        "md5", [ha1, "n", "cn"], "n", "00000001", "cn", "h:22"
    )
    assert params_of(header)["algorithm"] == "MD5-sess"


def test_no_qop_gives_the_rfc2069_response() -> None:
    header = DigestClient("u", "p").authorization(digest_challenge(), "CONNECT", "h:22", "cn")
    params = params_of(header)
    ha1, ha2 = hashlib.md5(b"u:r:p").hexdigest(), hashlib.md5(b"CONNECT:h:22").hexdigest()
    assert params["response"] == hashlib.md5(f"{ha1}:n:{ha2}".encode()).hexdigest()
    # The algorithm was not named, so it is not echoed; nothing of qop is sent.
    assert set(params) == {"username", "realm", "nonce", "uri", "response"}


def test_opaque_is_echoed_and_nc_counts_per_nonce() -> None:
    client = DigestClient("u", "p")
    first = digest_challenge(qop="auth", opaque='o"q')
    second = digest_challenge(qop="auth", nonce="other")
    counts = [
        params_of(client.authorization(challenge, "CONNECT", "h:22", "cn"))["nc"]
        for challenge in (first, first, second, first)
    ]
    assert counts == ["00000001", "00000002", "00000001", "00000003"]
    assert params_of(client.authorization(first, "CONNECT", "h:22", "cn"))["opaque"] == 'o"q'


def test_user_names_are_escaped_and_control_characters_refused() -> None:
    header = DigestClient('a"b\\c', "p").authorization(digest_challenge(), "CONNECT", "h:22", "c")
    assert header.startswith(r'Digest username="a\"b\\c", ')
    assert params_of(header)["username"] == 'a"b\\c'
    with pytest.raises(LocalProtocolError, match="control characters"):
        DigestClient("a\r\nX-Injected: 1", "p")


def test_realm_bytes_are_hashed_as_sent() -> None:
    # Heads are decoded as Latin-1: this is the UTF-8 realm "Pröxy" as a proxy sends it.
    realm = "Pr\u00c3\u00b6xy"
    challenge = digest_challenge(realm=realm)
    header = DigestClient("u", "p").authorization(challenge, "CONNECT", "h:22", "c")
    assert 'realm="Pröxy"' in header
    ha1 = hashlib.md5(b"u:Pr\xc3\xb6xy:p").hexdigest()
    ha2 = hashlib.md5(b"CONNECT:h:22").hexdigest()
    assert params_of(header)["response"] == hashlib.md5(f"{ha1}:n:{ha2}".encode()).hexdigest()


def test_choose_picks_the_strongest_usable_challenge() -> None:
    md5 = digest_challenge(qop="auth")
    sha256 = digest_challenge(algorithm="SHA-256", qop="auth")
    sha512 = digest_challenge(algorithm="sha-512-256-SESS", qop="auth-int, auth")
    assert DigestClient.choose([md5, sha256, Challenge("Basic")]) is sha256
    assert DigestClient.choose([md5, sha512, sha256]) is sha512
    # Of equals, the first (RFC 7616 section 3.7: servers list them in order of preference).
    other_md5 = digest_challenge(algorithm="MD5")
    assert DigestClient.choose([md5, other_md5]) is md5


@pytest.mark.parametrize(
    "challenge",
    [
        digest_challenge(algorithm="SHA-1"),  # unknown: ignored
        digest_challenge(algorithm="MD5-sess"),  # -sess needs qop
        digest_challenge(qop="auth-int"),
        Challenge("Digest", params={"realm": "r"}),  # no nonce
        Challenge("Basic", params={"realm": "r", "nonce": "n"}),
    ],
)
def test_unusable_challenges_are_ignored(challenge: Challenge) -> None:
    assert DigestClient.choose([challenge]) is None
    with pytest.raises(LocalProtocolError, match="not a Digest challenge"):
        DigestClient("u", "p").authorization(challenge, "CONNECT", "h:22", "c")


def test_choose_from_a_407_with_an_unknown_algorithm_first() -> None:
    challenges = parse_challenges(
        ['Digest realm="r", nonce="1", algorithm=SHA-3, qop=auth', 'Digest realm="r", nonce="2"']
    )
    assert DigestClient.choose(challenges) is challenges[1]


def test_is_stale() -> None:
    assert DigestClient.is_stale(digest_challenge(stale="TRUE"))
    assert not DigestClient.is_stale(digest_challenge(stale="false"))
    assert not DigestClient.is_stale(digest_challenge())


def test_bad_local_input() -> None:
    client = DigestClient("u", "p")
    with pytest.raises(LocalProtocolError, match="method"):
        client.authorization(digest_challenge(), "CON NECT", "h:22", "c")
    with pytest.raises(LocalProtocolError, match="request target"):
        client.authorization(digest_challenge(), "CONNECT", "h:22\r\n", "c")
    with pytest.raises(LocalProtocolError, match="cnonce"):
        client.authorization(digest_challenge(qop="auth"), "CONNECT", "h:22", "")
    assert "p" not in repr(client).replace("DigestClient", "")
