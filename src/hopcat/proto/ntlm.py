"""NTLMv2 client messages (MS-NLMP), sans I/O, for HTTP proxy authentication.

The flow, all legs on one connection (the caller base64-encodes each message into
``Proxy-Authorization: NTLM <...>`` and reads the proxy's reply the same way)::

    negotiate_message()  ->  407 with the CHALLENGE  ->  parse_challenge()
    authenticate_message(challenge, ...)  ->  2xx, or a 407 with a bare "NTLM" (rejected)

The AUTHENTICATE message carries the NTLMv2 response of MS-NLMP section 3.3.2: NTOWFv2 is
HMAC-MD5 keyed with MD4(password), over the upper-cased user and the user's domain; NTProofStr is
HMAC-MD5 keyed with NTOWFv2 over the server challenge and a blob holding the time, the client
challenge and the server's TargetInfo. When the server sends a timestamp (MsvAvTimestamp) the
blob uses it and the LMv2 response is zeroed (section 3.1.5.1.2). The caller passes the client
challenge and its own FILETIME: nothing here reads a clock or a random source.

MD4 (RFC 1320) comes from hashlib when OpenSSL still offers it; OpenSSL 3 moved it to the legacy
provider, so a pure-Python one stands in (it hashes one short password per handshake).

Robustness: TargetName is never read (real servers put garbage in its offset); TargetInfo is used
only when flagged, at offset 48 or later and wholly inside the message, else taken as absent
(Squid's fake helper echoes the flag with no TargetInfo); AV pairs are read up to MsvAvEOL or the
buffer's end. Not done, deliberately: NTLMv1 and LM (broken), the MIC and session keys (no
signing or sealing over a CONNECT tunnel; Samba and pyspnego accept the message without a MIC),
OEM strings (every server since Windows 2000 negotiates Unicode).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "NEGOTIATE_FLAGS",
    "ChallengeMessage",
    "authenticate_message",
    "filetime",
    "md4",
    "negotiate_message",
    "ntowfv2",
    "parse_challenge",
    "split_user",
]

SIGNATURE = b"NTLMSSP\x00"
# MS-NLMP section 2.2.2.5 flags we ask for.
NEGOTIATE_UNICODE = 0x00000001
NEGOTIATE_OEM = 0x00000002
NEGOTIATE_TARGET_INFO = 0x00800000
NEGOTIATE_FLAGS = (
    NEGOTIATE_UNICODE
    | NEGOTIATE_OEM
    | 0x00000004  # REQUEST_TARGET
    | 0x00000200  # NTLM
    | 0x00008000  # ALWAYS_SIGN
    | 0x00080000  # EXTENDED_SESSIONSECURITY
    | NEGOTIATE_TARGET_INFO
    | 0x20000000  # 128
    | 0x80000000  # 56
)  # 0xa0888207
# The NT response (48 bytes + TargetInfo) must fit a 16-bit length.
MAX_TARGET_INFO_BYTES = 0xFFFF - 48
MSV_AV_EOL = 0
MSV_AV_TIMESTAMP = 7
# Seconds from 1601-01-01 (FILETIME's epoch) to 1970-01-01.
FILETIME_EPOCH_OFFSET_S = 11_644_473_600


def md4(data: bytes) -> bytes:
    """MD4 (RFC 1320) of ``data``: hashlib's when available, else the pure-Python one."""
    try:
        return hashlib.new("md4", data).digest()
    except ValueError:  # UnsupportedDigestmodError is a ValueError
        return _md4_pure(data)


def _md4_round1(x: int, y: int, z: int) -> int:
    return (x & y) | (~x & z)


def _md4_round2(x: int, y: int, z: int) -> int:
    return (x & y) | (x & z) | (y & z)


def _md4_round3(x: int, y: int, z: int) -> int:
    return x ^ y ^ z


# RFC 1320 section 3.4: per round, its function, additive constant, word order and shifts.
_MD4_ROUNDS = (
    (_md4_round1, 0, range(16), (3, 7, 11, 19)),
    (_md4_round2, 0x5A827999, (0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), (3, 5, 9, 13)),
    (_md4_round3, 0x6ED9EBA1, (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15), (3, 9, 11, 15)),
)  # fmt: skip


def _md4_pure(data: bytes) -> bytes:
    mask = 0xFFFFFFFF
    bit_length = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    data += b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", bit_length)
    state = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476]
    for offset in range(0, len(data), 64):
        words = struct.unpack_from("<16I", data, offset)
        a, b, c, d = state
        for function, constant, order, shifts in _MD4_ROUNDS:
            for step, index in enumerate(order):
                t = (a + function(b, c, d) + words[index] + constant) & mask
                s = shifts[step % 4]
                # The roles rotate each step (a, d, c, b are updated in turn); after 16 steps
                # every variable is back in its place.
                a, b, c, d = d, ((t << s) | (t >> (32 - s))) & mask, b, c
        state = [(old + new) & mask for old, new in zip(state, (a, b, c, d), strict=True)]
    return struct.pack("<4I", *state)


def split_user(user: str) -> tuple[str, str]:
    """(domain, user name) from ``DOMAIN\\user``, ``user@domain`` or ``user``.

    A UPN (``user@domain``) stays whole with an empty domain: the server can resolve a UPN,
    whereas a NetBIOS domain guessed from its DNS suffix would often be wrong. NTOWFv2 uses the
    user's domain, never the server's TargetName (McAfee Web Gateway sends none).
    """
    domain, backslash, name = user.partition("\\")
    return (domain, name) if backslash else ("", user)


def negotiate_message() -> bytes:
    """The NEGOTIATE message (MS-NLMP section 2.2.1.1), no domain or workstation supplied.

    0 signature | 8 type=1 | 12 flags | 16 domain buffer | 24 workstation buffer | 32
    """
    return SIGNATURE + struct.pack("<II", 1, NEGOTIATE_FLAGS) + bytes(16)


class ChallengeMessage:
    """What the client uses from a CHALLENGE message: ``flags``, ``server_challenge`` (8 bytes),
    ``target_info`` (raw AV pairs, b"" when absent) and ``timestamp`` (MsvAvTimestamp, a FILETIME,
    or None)."""

    __slots__ = ("flags", "server_challenge", "target_info", "timestamp")

    def __init__(
        self,
        flags: int,
        server_challenge: bytes,
        target_info: bytes = b"",
        timestamp: int | None = None,
    ) -> None:
        self.flags = flags
        self.server_challenge = server_challenge
        self.target_info = target_info
        self.timestamp = timestamp

    def __repr__(self) -> str:
        return (
            f"<ChallengeMessage flags={self.flags:#010x} target_info={len(self.target_info)} bytes"
            f" timestamp={self.timestamp}>"
        )


def parse_challenge(data: bytes) -> ChallengeMessage:
    """Parse a CHALLENGE message (MS-NLMP section 2.2.1.2)::

        0 signature | 8 type=2 | 12 TargetName buffer | 20 flags | 24 server challenge
        | 32 reserved | 40 TargetInfo buffer | 48 version (optional) | payload

    Messages of 32 bytes or more are accepted: early servers stopped after the challenge.
    """
    if len(data) < 32 or data[:8] != SIGNATURE:
        raise RemoteProtocolError("the proxy's NTLM challenge is not an NTLMSSP message")
    message_type, flags = struct.unpack_from("<I8xI", data, 8)
    if message_type != 2:
        raise RemoteProtocolError(f"the proxy sent NTLM message type {message_type}, not 2")
    target_info = b""
    if flags & NEGOTIATE_TARGET_INFO and len(data) >= 48:
        length, _, offset = struct.unpack_from("<HHI", data, 40)
        if offset >= 48 and offset + length <= len(data):
            if length > MAX_TARGET_INFO_BYTES:
                raise RemoteProtocolError("the proxy's NTLM TargetInfo is too long to answer")
            target_info = bytes(data[offset : offset + length])
    return ChallengeMessage(flags, bytes(data[24:32]), target_info, _av_timestamp(target_info))


def _av_timestamp(target_info: bytes) -> int | None:
    """MsvAvTimestamp from AV pairs (MS-NLMP section 2.2.2.1): id u16, length u16, value."""
    pos = 0
    while pos + 4 <= len(target_info):
        av_id, length = struct.unpack_from("<HH", target_info, pos)
        value = target_info[pos + 4 : pos + 4 + length]
        if av_id == MSV_AV_EOL or len(value) < length:
            break
        if av_id == MSV_AV_TIMESTAMP and length == 8:
            timestamp: int = struct.unpack("<Q", value)[0]
            return timestamp
        pos += 4 + length
    return None


def filetime(unix_seconds: float) -> int:
    """A Unix time as a Windows FILETIME: 100 ns units since 1601-01-01 UTC."""
    return int((unix_seconds + FILETIME_EPOCH_OFFSET_S) * 10_000_000)


def _utf16(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise LocalProtocolError(f"the NTLM {what} must be a string")
    try:
        return text.encode("utf-16-le")
    except UnicodeError:
        raise LocalProtocolError(f"the NTLM {what} is not valid Unicode") from None


def ntowfv2(password: str, user: str, domain: str) -> bytes:
    """NTOWFv2 (MS-NLMP section 3.3.2): HMAC-MD5(MD4(password), UPPER(user) + domain)."""
    key = md4(_utf16(password, "password"))
    return hmac.new(key, _utf16(user.upper() + domain, "user or domain"), "md5").digest()


def authenticate_message(
    challenge: ChallengeMessage,
    username: str,
    password: str,
    domain: str,
    *,
    client_challenge: bytes,
    timestamp: int,
    workstation: str = "",
) -> bytes:
    """The AUTHENTICATE message (MS-NLMP section 2.2.1.3) answering ``challenge``.

    ``timestamp`` is the local FILETIME (``filetime(time.time())``), used only when the server
    sent none; ``client_challenge`` is 8 random bytes. Layout, no version and no MIC::

        0 signature | 8 type=3 | 12 LM | 20 NT | 28 domain | 36 user | 44 workstation
        | 52 session key (buffers: length u16, max length u16, offset u32) | 60 flags | 64 payload
    """
    if not isinstance(client_challenge, bytes) or len(client_challenge) != 8:
        raise LocalProtocolError("the NTLM client challenge must be 8 bytes")
    key = ntowfv2(password, username, domain)
    server_time = challenge.timestamp
    blob = (
        b"\x01\x01" + bytes(6)
        + struct.pack("<Q", timestamp if server_time is None else server_time)
        + client_challenge + bytes(4) + challenge.target_info + bytes(4)
    )  # fmt: skip
    nt_proof = hmac.new(key, challenge.server_challenge + blob, "md5").digest()
    if server_time is None:
        lm = hmac.new(key, challenge.server_challenge + client_challenge, "md5").digest()
        lm += client_challenge
    else:
        lm = bytes(24)  # section 3.1.5.1.2: with MsvAvTimestamp the LMv2 response is zeros
    fields = [
        lm,
        nt_proof + blob,
        _utf16(domain, "domain"),
        _utf16(username, "user name"),
        _utf16(workstation, "workstation"),
        b"",  # no session key: nothing is signed or sealed
    ]
    header_len = 64
    buffers = b""
    offset = header_len
    for field in fields:
        if len(field) > 0xFFFF:
            raise LocalProtocolError("an NTLM field is longer than 65535 bytes")
        buffers += struct.pack("<HHI", len(field), len(field), offset)
        offset += len(field)
    # Unicode is what we send: keep the server's choices among ours, never OEM.
    flags = (challenge.flags & NEGOTIATE_FLAGS & ~NEGOTIATE_OEM) | NEGOTIATE_UNICODE
    return SIGNATURE + struct.pack("<I", 3) + buffers + struct.pack("<I", flags) + b"".join(fields)
