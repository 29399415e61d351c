"""Properties of the authentication algorithms (hypothesis).

- Any list of challenges, written out as header values in any of the forms RFC 9110 section 11
  allows (quoted or token values, escapes, whitespace, empty list elements, challenges spread over
  several values), parses back to the same challenges.
- Random text into the challenge parser gives challenges or RemoteProtocolError, nothing else;
  whatever Digest challenge choose() picks from them, authorization() answers it.
- Random and mutated CHALLENGE messages give a ChallengeMessage whose TargetInfo lies inside the
  message, or RemoteProtocolError; the AUTHENTICATE message's buffers are contiguous, in bounds and
  as long as what they carry.
- The HTTP CONNECT client's challenge flow (a 407 with a Content-Length or chunked body, the
  retry, the 2xx) ends the same however the proxy's bytes are split, the payload after the 2xx
  intact.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hopcat.errors import RemoteProtocolError
from hopcat.proto import ntlm
from hopcat.proto.http_auth import Challenge, DigestClient, parse_challenges

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(alphabet="!#$%&'*+-.^_`|~" + _ALNUM, min_size=1, max_size=10)
param_names = tokens.map(str.lower)
token68s = st.builds(
    lambda body, pad: body + "=" * pad,
    st.text(alphabet="-._~+/" + _ALNUM, min_size=1, max_size=20),
    st.integers(0, 2),
)
# Header text as http_connect decodes it (Latin-1), without the control characters RFC 9110 bars.
quoted_chars = st.characters(min_codepoint=0x09, max_codepoint=0xFF).filter(
    lambda c: c == "\t" or (c >= " " and c != "\x7f")
)
param_values = st.one_of(tokens, st.text(alphabet=quoted_chars, max_size=20))
whitespace = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def challenges(draw: st.DrawFn) -> Challenge:
    scheme = draw(tokens)
    form = draw(st.sampled_from(["bare", "token68", "params"]))
    if form == "token68":
        return Challenge(scheme, token68=draw(token68s))
    if form == "params":
        return Challenge(
            scheme, params=draw(st.dictionaries(param_names, param_values, min_size=1, max_size=6))
        )
    return Challenge(scheme)


@st.composite
def written(draw: st.DrawFn, challenge: Challenge) -> str:
    """``challenge`` as header text, in one of the many spellings the grammar allows."""
    if challenge.token68 is not None:
        space = draw(st.sampled_from([" ", "  ", " \t"]))
        return f"{challenge.scheme}{space}{challenge.token68}"
    parts = []
    for name, value in challenge.params.items():
        if value and not value.strip("!#$%&'*+-.^_`|~" + _ALNUM) and draw(st.booleans()):
            text = value
        else:
            # Escaping a character that needs none is allowed too (RFC 9110 section 5.6.4).
            text = "".join(
                "\\" + c if c in '"\\' or draw(st.integers(0, 9)) == 0 else c for c in value
            )
            text = f'"{text}"'
        parts.append(f"{name}{draw(whitespace)}={draw(whitespace)}{text}")
    separator = draw(whitespace) + "," + draw(st.sampled_from(["", " ", " , ", ",, "]))
    params = separator.join(parts)
    return f"{challenge.scheme} {params}" if params else challenge.scheme


@SETTINGS
@given(items=st.lists(challenges(), max_size=8), data=st.data())
def test_written_challenges_parse_back(items: list[Challenge], data: st.DataObject) -> None:
    texts = [data.draw(written(challenge)) for challenge in items]
    # Spread the challenges over header values, with empty list elements here and there.
    values: list[str] = []
    for text in texts:
        if not values or data.draw(st.booleans()):
            values.append(data.draw(st.sampled_from(["", " ", ", "])) + text)
        else:
            values[-1] += data.draw(st.sampled_from([", ", ",", " , , ", "\t,"])) + text
    assert parse_challenges(values) == items


# Text made of the pieces challenges are made of, which finds more than random characters.
challenge_text = st.lists(
    st.sampled_from([*'ab=,"\\ \t/+-\x00', "Digest", "realm", "nonce", "qop", "auth"]),
    max_size=30,
).map("".join)


@SETTINGS
@given(values=st.lists(st.one_of(st.text(max_size=40), challenge_text), max_size=4))
def test_random_text_parses_or_raises_remote_protocol_error(values: list[str]) -> None:
    try:
        parsed = parse_challenges(values)
    except RemoteProtocolError:
        return
    chosen = DigestClient.choose(parsed)
    if chosen is not None:
        try:
            header = DigestClient("u", "p").authorization(chosen, "CONNECT", "h:22", "cnonce")
        except RemoteProtocolError:  # a realm, nonce or opaque that is not UTF-8
            return
        assert parse_challenges([header])[0].name == "digest"


@SETTINGS
@given(items=st.lists(challenges(), max_size=6), data=st.data())
def test_digest_answers_parse_back(items: list[Challenge], data: st.DataObject) -> None:
    digest = Challenge(
        "Digest",
        params={
            "realm": data.draw(param_values),
            "nonce": data.draw(param_values),
            "qop": data.draw(st.sampled_from(["auth", "auth,auth-int", "auth-int, auth"])),
            "algorithm": data.draw(st.sampled_from(["MD5", "SHA-256", "SHA-512-256-sess"])),
        },
    )
    user = data.draw(st.text(alphabet=quoted_chars, max_size=10))
    chosen = DigestClient.choose([*items, digest])
    assert chosen is not None
    try:
        header = DigestClient(user, "pw").authorization(chosen, "CONNECT", "h:22", "c")
    except RemoteProtocolError:
        return
    [answer] = parse_challenges([header])
    assert answer.params["uri"] == "h:22" and answer.params["nc"] == "00000001"
    assert answer.params["username"] == user


# NTLM.


def av_pairs(draw: st.DrawFn) -> bytes:
    pairs = b""
    for av_id, value in draw(st.lists(st.tuples(st.integers(0, 10), st.binary(max_size=12)))):
        pairs += struct.pack("<HH", av_id, len(value)) + value
    return pairs + draw(st.sampled_from([b"\x00\x00\x00\x00", b"", b"\x00"]))


@st.composite
def challenge_messages(draw: st.DrawFn) -> bytes:
    """CHALLENGE messages, well-formed or not, from real layouts and garbage alike."""
    target_info = av_pairs(draw)
    header_len = draw(st.sampled_from([32, 40, 48, 56]))
    offset = draw(st.one_of(st.just(header_len), st.integers(0, 80), st.integers(0, 2**32 - 1)))
    length = draw(st.one_of(st.just(len(target_info)), st.integers(0, 0xFFFF)))
    message = (
        b"NTLMSSP\x00" + struct.pack("<I", draw(st.sampled_from([2, 2, 2, 1, 3])))
        + struct.pack("<HHI", *draw(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                                                st.integers(0, 2**32 - 1))))
        + struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        + draw(st.binary(min_size=16, max_size=16))
        + struct.pack("<HHI", length, length, offset)
        + draw(st.binary(min_size=8, max_size=8))
    )[:header_len] + target_info  # fmt: skip
    # Mutations: cut it short, overwrite a byte.
    if draw(st.booleans()):
        message = message[: draw(st.integers(0, len(message)))]
    if message and draw(st.booleans()):
        index = draw(st.integers(0, len(message) - 1))
        message = message[:index] + bytes([draw(st.integers(0, 255))]) + message[index + 1 :]
    return message


def check_authenticate(fields: list[bytes], message: bytes) -> None:
    """The six security buffers point, in order and without gaps, at ``fields``."""
    assert message[:12] == b"NTLMSSP\x00\x03\x00\x00\x00"
    offset = 64
    for index, field in enumerate(fields):
        length, max_length, at = struct.unpack_from("<HHI", message, 12 + 8 * index)
        assert (length, max_length, at) == (len(field), len(field), offset)
        assert message[at : at + length] == field
        offset += length
    assert len(message) == offset


def utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


@SETTINGS
@given(data=st.one_of(challenge_messages(), st.binary(max_size=120)))
def test_challenges_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        challenge = ntlm.parse_challenge(data)
    except RemoteProtocolError:
        return
    assert len(challenge.server_challenge) == 8
    if challenge.target_info:
        length, _, offset = struct.unpack_from("<HHI", data, 40)
        assert offset >= 48 and data[offset : offset + length] == challenge.target_info
    message = ntlm.authenticate_message(
        challenge, "user", "pw", "DOM", client_challenge=bytes(8), timestamp=1
    )
    lm, nt = message[64:88], message[88 : 88 + 48 + len(challenge.target_info)]
    check_authenticate([lm, nt, utf16("DOM"), utf16("user"), b"", b""], message)


names = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)


@SETTINGS
@given(
    user=names, password=names, domain=names, workstation=names,
    target_info=st.binary(max_size=200),
    server_time=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    client_challenge=st.binary(min_size=8, max_size=8), timestamp=st.integers(0, 2**64 - 1),
)  # fmt: skip
def test_authenticate_message_layout(
    user: str,
    password: str,
    domain: str,
    workstation: str,
    target_info: bytes,
    server_time: int | None,
    client_challenge: bytes,
    timestamp: int,
) -> None:
    challenge = ntlm.ChallengeMessage(ntlm.NEGOTIATE_FLAGS, b"\x01" * 8, target_info, server_time)
    message = ntlm.authenticate_message(
        challenge, user, password, domain, client_challenge=client_challenge,
        timestamp=timestamp, workstation=workstation,
    )  # fmt: skip
    nt_len = 16 + 28 + len(target_info) + 4
    lm, nt = message[64:88], message[88 : 88 + nt_len]
    check_authenticate([lm, nt, utf16(domain), utf16(user), utf16(workstation), b""], message)
    used_time = timestamp if server_time is None else server_time
    assert nt[16:] == (
        b"\x01\x01" + bytes(6) + struct.pack("<Q", used_time) + client_challenge + bytes(4)
        + target_info + bytes(4)
    )  # fmt: skip
    if server_time is None:
        assert lm[16:] == client_challenge
    else:
        assert lm == bytes(24)


# -- the client machine's challenge flow: however the bytes are split -------------------------

_BODY = st.binary(max_size=300)


def _framed(body: bytes, chunked: bool, chunk_size: int) -> bytes:
    if not chunked:
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    parts = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    return b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in parts
    ) + b"0\r\n\r\n"


@SETTINGS
@given(body=_BODY, chunked=st.booleans(), chunk_size=st.integers(1, 64),
       cuts=st.lists(st.integers(0, 2000), max_size=8), trailing=st.binary(max_size=40))  # fmt: skip
def test_a_drained_407_then_2xx_splits_anywhere(
    body: bytes, chunked: bool, chunk_size: int, cuts: list[int], trailing: bytes
) -> None:
    from hopcat.proto._events import AuthChallenge, Established
    from hopcat.proto.http_connect import HttpConnectClient

    challenge = (b'HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm="r"\r\n'
                 + _framed(body, chunked, chunk_size))  # fmt: skip
    final = b"HTTP/1.1 200 OK\r\n\r\n" + trailing
    client = HttpConnectClient("target.test", 22, challenges=True)
    client.data_to_send()
    stream = challenge + final
    points = sorted({0, len(stream), *(min(cut, len(stream)) for cut in cuts)})
    events: list[object] = []
    fed = 0
    for start, end in itertools.pairwise(points):
        if events and isinstance(events[-1], Established):
            break  # the rest would be tunnel payload
        client.receive_data(stream[start:end])
        fed = end
        while not (events and isinstance(events[-1], Established)):
            event = client.next_event()
            if not isinstance(event, AuthChallenge | Established):
                break
            events.append(event)
            if isinstance(event, AuthChallenge):
                client.retry("Basic eDp5")
    assert [type(event).__name__ for event in events] == ["AuthChallenge", "Established"]
    assert client.trailing_data + stream[fed:] == trailing
