"""NTLMv2 messages: RFC 1320 MD4 vectors, MS-NLMP section 4.2.4 vectors, hostile CHALLENGEs."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from hopcat.errors import LocalProtocolError, RemoteProtocolError
from hopcat.proto import ntlm
from hopcat.proto.ntlm import (
    ChallengeMessage,
    authenticate_message,
    filetime,
    md4,
    negotiate_message,
    ntowfv2,
    parse_challenge,
    split_user,
)

# RFC 1320 appendix A.5.
MD4_VECTORS = [
    (b"", "31d6cfe0d16ae931b73c59d7e0c089c0"),
    (b"a", "bde52cb31de33e46245e05fbdbd6fb24"),
    (b"abc", "a448017aaf21d8525fc10ae87aa6729d"),
    (b"message digest", "d9130a8164549fe818874806e1c7014b"),
    (b"abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
    (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        "043f8582f241db351ce627e153e7f0e4",
    ),
    (b"1234567890" * 8, "e33b4ddc9c38f2199c3e7b164fcc0536"),
]


def av_pair(av_id: int, value: bytes) -> bytes:
    return struct.pack("<HH", av_id, len(value)) + value


# MS-NLMP section 4.2.4: the CHALLENGE message of the NTLMv2 example, built from its fields.
SPEC_TARGET_INFO = (
    av_pair(2, "Domain".encode("utf-16-le"))  # MsvAvNbDomainName
    + av_pair(1, "Server".encode("utf-16-le"))  # MsvAvNbComputerName
    + av_pair(0, b"")
)
SPEC_CHALLENGE = (
    b"NTLMSSP\x00"
    + struct.pack("<I", 2)
    + struct.pack("<HHI", 12, 12, 56)  # TargetName "Server"
    + struct.pack("<I", 0xE28A8233)
    + bytes.fromhex("0123456789abcdef")
    + bytes(8)
    + struct.pack("<HHI", len(SPEC_TARGET_INFO), len(SPEC_TARGET_INFO), 68)
    + bytes.fromhex("060070170000000f")  # version 6.0.6000, NTLM revision 15
    + "Server".encode("utf-16-le")
    + SPEC_TARGET_INFO
)  # fmt: skip

# Squid's ntlm_fake_auth (CORPORATE-PROXIES.md section 4.5): 49 bytes, our flags echoed with
# NEGOTIATE_TARGET_INFO, a garbage TargetName offset and "WORKGROUP" where TargetInfo would be.
FAKE_HELPER_CHALLENGE = (
    b"NTLMSSP\x00"
    + struct.pack("<I", 2)
    + struct.pack("<HHI", 9, 9, 0xAAAAAAAE)
    + struct.pack("<I", ntlm.NEGOTIATE_FLAGS)
    + bytes.fromhex("1122334455667788")
    + bytes(8)
    + b"WORKGROUP"
)


def buffers(message: bytes) -> list[bytes]:
    """The six security buffers of an AUTHENTICATE message, bounds-checked."""
    fields = []
    for index in range(6):
        length, max_length, offset = struct.unpack_from("<HHI", message, 12 + 8 * index)
        assert length == max_length and offset >= 64 and offset + length <= len(message)
        fields.append(message[offset : offset + length])
    return fields


@pytest.mark.parametrize(("data", "digest"), MD4_VECTORS)
def test_md4_rfc1320_vectors(data: bytes, digest: str) -> None:
    assert md4(data).hex() == digest
    # The fallback is tested even where hashlib still has MD4.
    assert ntlm._md4_pure(data).hex() == digest


def test_split_user() -> None:
    assert split_user("CORP\\alice") == ("CORP", "alice")
    assert split_user("alice") == ("", "alice")
    # A UPN stays whole: the server resolves it (see split_user's docstring).
    assert split_user("alice@corp.example") == ("", "alice@corp.example")
    assert split_user("CORP\\a\\b") == ("CORP", "a\\b")


def test_negotiate_message() -> None:
    assert negotiate_message() == (
        b"NTLMSSP\x00\x01\x00\x00\x00" + bytes.fromhex("078288a0") + bytes(16)
    )


def test_filetime() -> None:
    assert filetime(0) == 116444736000000000
    assert filetime(1.5) == 116444736015000000


def test_ms_nlmp_ntlmv2_vectors() -> None:
    assert ntowfv2("Password", "User", "Domain").hex() == "0c868a403bfd7a93a3001ef22ef02e3f"
    challenge = parse_challenge(SPEC_CHALLENGE)
    assert challenge.flags == 0xE28A8233
    assert challenge.server_challenge == bytes.fromhex("0123456789abcdef")
    assert challenge.target_info == SPEC_TARGET_INFO
    assert challenge.timestamp is None
    message = authenticate_message(
        challenge, "User", "Password", "Domain", client_challenge=b"\xaa" * 8, timestamp=0,
        workstation="COMPUTER",
    )  # fmt: skip
    lm, nt, domain, user, workstation, session_key = buffers(message)
    assert nt[:16].hex() == "68cd0ab851e51c96aabc927bebef6a1c"  # NTProofStr
    assert nt[16:] == (
        b"\x01\x01" + bytes(6) + bytes(8) + b"\xaa" * 8 + bytes(4) + SPEC_TARGET_INFO + bytes(4)
    )
    assert lm.hex() == "86c35097ac9cec102554764a57cccc19" + "aa" * 8  # LMv2 response
    assert domain == "Domain".encode("utf-16-le")
    assert user == "User".encode("utf-16-le")
    assert workstation == "COMPUTER".encode("utf-16-le")
    assert session_key == b""
    assert message[:12] == b"NTLMSSP\x00\x03\x00\x00\x00"
    flags = struct.unpack_from("<I", message, 60)[0]
    assert flags & ntlm.NEGOTIATE_UNICODE and not flags & ntlm.NEGOTIATE_OEM


def test_server_timestamp_replaces_ours_and_zeroes_lmv2() -> None:
    target_info = av_pair(7, struct.pack("<Q", 0x01D0000000000000)) + av_pair(0, b"")
    challenge = ChallengeMessage(ntlm.NEGOTIATE_FLAGS, bytes(8), target_info, 0x01D0000000000000)
    message = authenticate_message(
        challenge, "u", "p", "", client_challenge=bytes(8), timestamp=filetime(1e9)
    )
    lm, nt, *_ = buffers(message)
    assert lm == bytes(24)
    assert nt[16 + 8 : 16 + 16] == struct.pack("<Q", 0x01D0000000000000)


def test_local_timestamp_when_the_server_sends_none() -> None:
    challenge = ChallengeMessage(ntlm.NEGOTIATE_FLAGS, bytes(8))
    message = authenticate_message(challenge, "u", "p", "D", client_challenge=b"c" * 8, timestamp=5)
    lm, nt, *_ = buffers(message)
    assert lm[16:] == b"c" * 8
    assert nt[16 + 8 : 16 + 16] == struct.pack("<Q", 5)


def test_squid_fake_helper_challenge() -> None:
    assert len(FAKE_HELPER_CHALLENGE) == 49
    challenge = parse_challenge(FAKE_HELPER_CHALLENGE)
    assert challenge.target_info == b"" and challenge.timestamp is None
    assert challenge.server_challenge == bytes.fromhex("1122334455667788")
    authenticate_message(
        challenge, "alice", "s3cret", "CORP", client_challenge=bytes(8), timestamp=1
    )


def challenge_with_target_info(
    target_info: bytes,
    *,
    offset: int = 48,
    length: int | None = None,
    flags: int = ntlm.NEGOTIATE_FLAGS,
) -> bytes:
    length = len(target_info) if length is None else length
    return (
        b"NTLMSSP\x00" + struct.pack("<I", 2) + bytes(8) + struct.pack("<I", flags) + bytes(16)
        + struct.pack("<HHI", length, length, offset) + target_info
    )  # fmt: skip


def test_timestamp_is_read_from_av_pairs() -> None:
    pairs = av_pair(2, b"D\x00") + av_pair(7, struct.pack("<Q", 42)) + av_pair(0, b"")
    challenge = parse_challenge(challenge_with_target_info(pairs))
    assert challenge.target_info == pairs and challenge.timestamp == 42


@pytest.mark.parametrize(
    ("message", "expect_target_info"),
    [
        (challenge_with_target_info(b"abcd", offset=40), False),  # inside the header
        (challenge_with_target_info(b"abcd", offset=0), False),
        (challenge_with_target_info(b"abcd", length=5), False),  # runs past the end
        (challenge_with_target_info(b"abcd", offset=0xFFFFFFFF), False),
        (challenge_with_target_info(b"abcd", flags=0), False),  # not flagged
        (challenge_with_target_info(b"abcd"), True),
        (challenge_with_target_info(b""), False),
    ],
)
def test_target_info_bounds(message: bytes, expect_target_info: bool) -> None:
    assert parse_challenge(message).target_info == (b"abcd" if expect_target_info else b"")


@pytest.mark.parametrize(
    "pairs",
    [
        av_pair(7, struct.pack("<Q", 42))[:-1],  # value cut short
        av_pair(7, b"\x01\x02"),  # wrong length
        av_pair(0, b"") + av_pair(7, struct.pack("<Q", 42)),  # after MsvAvEOL
        b"\x07\x00",  # half a header
        av_pair(2, b"x" * 10)[:8],
    ],
)
def test_broken_av_pairs_give_no_timestamp(pairs: bytes) -> None:
    challenge = parse_challenge(challenge_with_target_info(pairs))
    assert challenge.target_info == pairs and challenge.timestamp is None


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"", "not an NTLMSSP message"),
        (SPEC_CHALLENGE[:31], "not an NTLMSSP message"),
        (b"NTLMSSP\x01" + SPEC_CHALLENGE[8:], "not an NTLMSSP message"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", "not an NTLMSSP message"),
        (negotiate_message(), "message type 1, not 2"),
    ],
)
def test_bad_challenges(message: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        parse_challenge(message)


def test_an_oversized_target_info_is_refused() -> None:
    message = challenge_with_target_info(bytes(ntlm.MAX_TARGET_INFO_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="too long"):
        parse_challenge(message)
    parse_challenge(challenge_with_target_info(bytes(ntlm.MAX_TARGET_INFO_BYTES)))


def test_bad_local_input() -> None:
    challenge = ChallengeMessage(0, bytes(8))
    with pytest.raises(LocalProtocolError, match="8 bytes"):
        authenticate_message(challenge, "u", "p", "", client_challenge=b"short", timestamp=0)
    with pytest.raises(LocalProtocolError, match="password is not valid Unicode"):
        authenticate_message(challenge, "u", "\udc80", "", client_challenge=bytes(8), timestamp=0)
    with pytest.raises(LocalProtocolError, match="longer than 65535"):
        authenticate_message(
            challenge, "u" * 40000, "p", "", client_challenge=bytes(8), timestamp=0
        )


def test_repr_shows_no_challenge_bytes() -> None:
    text = repr(parse_challenge(SPEC_CHALLENGE))
    assert "0123456789abcdef" not in text and "target_info=36 bytes" in text


def test_pyspnego_acceptor_checks_our_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An independent NTLMv2 verifier: pyspnego's acceptor with a user file."""
    spnego = pytest.importorskip(
        "spnego", reason="pyspnego is not installed (pip install pyspnego)"
    )
    users = tmp_path / "ntlm-users"
    users.write_text("HOPCATPROXY:nobody:Ntlm-s3cret\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    for password, accepted in [("Ntlm-s3cret", True), ("wrong", False)]:
        server = spnego.server(protocol="ntlm")
        challenge = parse_challenge(server.step(negotiate_message()))
        assert challenge.timestamp is not None  # so the LMv2 response is zeroed
        domain, user = split_user("HOPCATPROXY\\nobody")
        answer = authenticate_message(
            challenge, user, password, domain, client_challenge=os.urandom(8),
            timestamp=filetime(0), workstation="HOPCAT",
        )  # fmt: skip
        if accepted:
            server.step(answer)
            assert server.complete and server.client_principal == "HOPCATPROXY\\nobody"
        else:
            with pytest.raises(spnego.exceptions.SpnegoError):
                server.step(answer)
