"""HTTP authentication for the CONNECT client, sans I/O: challenges, Basic and Digest.

The flow around it (in http_connect): a 407 carries one or more ``Proxy-Authenticate`` header
values; ``parse_challenges()`` turns them into ``Challenge`` objects; the client picks a scheme
and answers with a ``Proxy-Authorization`` value from ``basic_authorization()`` (RFC 7617) or
``DigestClient.authorization()`` (RFC 7616), on the same connection or a new one.

Challenges follow RFC 9110 section 11: each header value is a list of challenges, a challenge is
a scheme token followed by a token68 (``Negotiate YIIB==``) or by comma-separated ``name=value``
parameters whose values are tokens or quoted strings (with ``\\"`` escapes and commas inside).
Parameters after a comma belong to the challenge before them; empty list elements are skipped.
Header values are taken as http_connect decodes heads, Latin-1 (one character per byte), so the
Digest code gets back the exact bytes of a realm or nonce for its hashes.

Digest: MD5, SHA-256 and SHA-512-256 (RFC 7616 section 6.1), their ``-sess`` variants, qop=auth
or no qop (the RFC 2069 form), opaque, userhash and nc counted per nonce. ``choose()`` takes the
strongest challenge hopcat can answer: RFC 7616 section 3.7 lets local policy override the
server's order. Not done: qop=auth-int (no proxy offers it), the ``username*`` form (a non-ASCII
user name goes into the quoted string as UTF-8, as curl sends it and Squid expects).

The server side (``hopcat serve``) uses the same parser for a Digest ``Proxy-Authorization``
(credentials have a challenge's grammar), and these pure pieces: ``digest_challenge()``,
``make_nonce()`` / ``nonce_time()`` (stateless nonces: a time and a salt signed with HMAC, so
the server keeps no table of what it handed out), ``digest_hash()`` for HA1 and
``digest_response()`` for the value a client must have sent. It offers MD5 and SHA-256 with
qop=auth only; the caller compares in constant time and keeps the secret, the clock and the
nc bookkeeping.

Errors: a malformed challenge raises RemoteProtocolError naming the position, never a value;
unusable local input (a control character in a user name) raises LocalProtocolError. Nothing
here reads a clock or a random source: the caller passes the cnonce, a nonce's time and salt.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_CHALLENGES",
    "MAX_PARAMS",
    "Challenge",
    "DigestClient",
    "basic_authorization",
    "digest_challenge",
    "digest_hash",
    "digest_response",
    "make_nonce",
    "nonce_time",
    "parse_challenges",
]

# A 407 from a real proxy holds a handful of challenges with a few parameters each; these bound
# what a hostile one can make us build.
MAX_CHALLENGES = 32
MAX_PARAMS = 64

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHARS = frozenset("!#$%&'*+-.^_`|~" + _ALNUM)  # RFC 9110 section 5.6.2
_TOKEN68_CHARS = frozenset("-._~+/" + _ALNUM)  # RFC 9110 section 11.2, before the "=" padding
_WHITESPACE = " \t"


class Challenge:
    """One challenge: ``scheme`` as sent, ``name`` lower-cased, and either ``token68`` or
    ``params`` (lower-cased names, unquoted values), or neither for a bare scheme."""

    __slots__ = ("name", "params", "scheme", "token68")

    def __init__(
        self, scheme: str, token68: str | None = None, params: dict[str, str] | None = None
    ) -> None:
        self.scheme = scheme
        self.name = scheme.lower()
        self.token68 = token68
        self.params: dict[str, str] = {} if params is None else params

    def __repr__(self) -> str:
        # Nonces and tokens are not passwords, but they are credentials' raw material: names only.
        if self.token68 is not None:
            return f"<Challenge {self.scheme} token68 of {len(self.token68)} chars>"
        return f"<Challenge {self.scheme} params={list(self.params)}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Challenge):
            return NotImplemented
        return (self.scheme, self.token68, self.params) == (
            other.scheme,
            other.token68,
            other.params,
        )


def parse_challenges(values: list[str]) -> list[Challenge]:
    """The challenges in ``values`` (each one Proxy-Authenticate or WWW-Authenticate header
    value, Latin-1 decoded), in order; RemoteProtocolError when one is malformed or there are
    more than MAX_CHALLENGES challenges or MAX_PARAMS parameters in one."""
    challenges: list[Challenge] = []
    for value in values:
        _parse_value(value, challenges)
    return challenges


def _malformed(what: str, pos: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed authentication challenge: {what} at character {pos + 1}")


def _skip(text: str, pos: int, chars: str | frozenset[str]) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _parse_value(text: str, out: list[Challenge]) -> None:
    # Each pass of the loop reads one list element: a challenge's start (scheme, then a token68 or
    # its first parameter) or one more parameter of the current challenge.
    current: Challenge | None = None
    pos = 0
    while True:
        pos = _skip(text, pos, " \t,")
        if pos == len(text):
            return
        start = pos
        pos = _skip(text, pos, _TCHARS)
        if pos == start:
            raise _malformed("expected a scheme or parameter name", start)
        after = _skip(text, pos, _WHITESPACE)
        if after < len(text) and text[after] == "=":
            if current is None:
                raise _malformed("parameter before any scheme", start)
            if current.token68 is not None:
                raise _malformed("parameter after a token68", start)
            pos = _parse_param(text, start, current)
            continue
        if len(out) == MAX_CHALLENGES:
            raise RemoteProtocolError(f"more than {MAX_CHALLENGES} authentication challenges")
        current = Challenge(text[start:pos])
        out.append(current)
        if after == len(text) or text[after] == ",":
            pos = after
            continue
        if after == pos:
            raise _malformed("expected a space after the scheme", pos)
        # A token68 is a whole list element; otherwise this is the first parameter.
        end = _skip(text, _skip(text, after, _TOKEN68_CHARS), "=")
        rest = _skip(text, end, _WHITESPACE)
        if end > after and (rest == len(text) or text[rest] == ","):
            current.token68 = text[after:end]
            pos = rest
        else:
            pos = _parse_param(text, after, current)


def _parse_param(text: str, pos: int, challenge: Challenge) -> int:
    """Read ``name BWS "=" BWS (token / quoted-string)`` at ``pos`` into ``challenge``; return
    the position of the comma (or end) after it."""
    start = pos
    pos = _skip(text, pos, _TCHARS)
    name = text[start:pos].lower()
    pos = _skip(text, pos, _WHITESPACE)
    if not name or pos == len(text) or text[pos] != "=":
        raise _malformed("expected name=value", start)
    pos = _skip(text, pos + 1, _WHITESPACE)
    if pos < len(text) and text[pos] == '"':
        value, pos = _parse_quoted(text, pos)
    else:
        value_start = pos
        pos = _skip(text, pos, _TCHARS)
        if pos == value_start:
            raise _malformed("expected a parameter value", pos)
        value = text[value_start:pos]
    pos = _skip(text, pos, _WHITESPACE)
    if pos < len(text) and text[pos] != ",":
        raise _malformed("expected ',' after a parameter", pos)
    # RFC 9110 section 11.2: each parameter name occurs once; which one would count is unclear.
    if name in challenge.params:
        raise _malformed("repeated parameter", start)
    if len(challenge.params) == MAX_PARAMS:
        raise RemoteProtocolError(f"more than {MAX_PARAMS} parameters in one challenge")
    challenge.params[name] = value
    return pos


def _parse_quoted(text: str, pos: int) -> tuple[str, int]:
    """The unescaped content of the quoted-string at ``pos`` and the position after it."""
    chars: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == '"':
            return "".join(chars), pos + 1
        if char == "\\":
            pos += 1
            if pos == len(text):
                break
            char = text[pos]
        if (char < " " and char != "\t") or char == "\x7f":
            raise _malformed("control character in a quoted string", pos)
        chars.append(char)
        pos += 1
    raise _malformed("unterminated quoted string", pos)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _has_control(text: str) -> bool:
    return any((char < " " and char != "\t") or char == "\x7f" for char in text)


def basic_authorization(username: str, password: str | None) -> str:
    """``Basic <base64(user:pass)>`` per RFC 7617, with UTF-8 as its section 2.1 charset."""
    import binascii  # only authenticated connections pay for it

    if not isinstance(username, str) or not isinstance(password, str | None):
        raise LocalProtocolError("username and password must be strings")
    if ":" in username:
        raise LocalProtocolError("an HTTP Basic username cannot contain ':' (RFC 7617)")
    try:
        raw = f"{username}:{password or ''}".encode()
    except UnicodeError:
        raise LocalProtocolError("username or password is not valid Unicode") from None
    return "Basic " + binascii.b2a_base64(raw, newline=False).decode("ascii")


# RFC 7616 section 6.1 algorithms, weakest first, with their hashlib names.
_DIGEST_HASHES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
_DIGEST_STRENGTH = list(_DIGEST_HASHES)


def _hash_available(name: str) -> bool:
    import hashlib

    return name in hashlib.algorithms_available


def _digest_kind(challenge: Challenge) -> tuple[str, bool, bool] | None:
    """(algorithm without -sess, is -sess, uses qop=auth) when hopcat can answer ``challenge``."""
    params = challenge.params
    if challenge.name != "digest" or "realm" not in params or "nonce" not in params:
        return None
    algorithm = params.get("algorithm", "MD5").upper()
    sess = algorithm.endswith("-SESS")
    base = algorithm[: -len("-SESS")] if sess else algorithm
    if base not in _DIGEST_HASHES or not _hash_available(_DIGEST_HASHES[base]):
        # RFC 7616 section 3.3: a challenge with an unknown algorithm is ignored; so is one
        # this Python's hashlib cannot compute (sha512_256 needs OpenSSL 1.1.1 or later).
        return None
    qop = params.get("qop")
    if qop is None:
        # -sess mixes in a cnonce that only the qop form sends: the server could not check it.
        return None if sess else (base, False, False)
    if "auth" not in (item.strip(_WHITESPACE).lower() for item in qop.split(",")):
        return None
    return base, sess, True


def _wire(text: str) -> bytes:
    """The bytes a proxy sent for a challenge value: heads are decoded as Latin-1. Text beyond
    Latin-1 was decoded by someone else, and UTF-8 is the best guess at its bytes."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _echo(text: str, what: str) -> str:
    """A challenge value to send back: the caller encodes the request head as UTF-8."""
    try:
        return _wire(text).decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"the Digest challenge's {what} is not UTF-8") from None


class DigestClient:
    """Answers Digest challenges (RFC 7616) for one user; counts nc per nonce across answers."""

    __slots__ = ("_counts", "_password", "_user", "_username")

    def __init__(self, username: str, password: str) -> None:
        if not isinstance(username, str) or not isinstance(password, str):
            raise LocalProtocolError("username and password must be strings")
        if _has_control(username):
            raise LocalProtocolError("a Digest username cannot contain control characters")
        try:
            # charset=UTF-8 (RFC 7616 section 4) asks for UTF-8; without it the encoding is
            # unspecified, and UTF-8 is what htdigest files written on today's systems hold.
            self._user = username.encode()
            self._password = password.encode()
        except UnicodeError:
            raise LocalProtocolError("username or password is not valid Unicode") from None
        self._username = username
        self._counts: dict[bytes, int] = {}

    def __repr__(self) -> str:
        return f"<DigestClient user={self._username!r}>"

    @staticmethod
    def choose(challenges: list[Challenge]) -> Challenge | None:
        """The strongest Digest challenge hopcat can answer (the first of equals), or None."""
        best: Challenge | None = None
        best_strength = -1
        for challenge in challenges:
            kind = _digest_kind(challenge)
            if kind is not None and _DIGEST_STRENGTH.index(kind[0]) > best_strength:
                best, best_strength = challenge, _DIGEST_STRENGTH.index(kind[0])
        return best

    @staticmethod
    def is_stale(challenge: Challenge) -> bool:
        """True when the proxy refused only the nonce: answer the new one, not a failure."""
        return challenge.params.get("stale", "").lower() == "true"

    def authorization(self, challenge: Challenge, method: str, uri: str, cnonce: str) -> str:
        """The Authorization / Proxy-Authorization value answering ``challenge`` for a request
        ``method uri`` (CONNECT and ``host:port`` for a tunnel), as a str to encode as UTF-8."""
        kind = _digest_kind(challenge)
        if kind is None:
            raise LocalProtocolError("not a Digest challenge hopcat can answer")
        algorithm, sess, use_qop = kind
        if not method or not all(char in _TCHARS for char in method):
            raise LocalProtocolError("the request method must be a token")
        if not uri or _has_control(uri) or _has_control(cnonce) or (use_qop and not cnonce):
            raise LocalProtocolError("the request target and cnonce must be non-empty text")

        def digest(*parts: bytes) -> bytes:
            return digest_hash(algorithm, *parts)

        params = challenge.params
        realm, nonce = _wire(params["realm"]), _wire(params["nonce"])
        ha1 = digest(self._user, realm, self._password)
        if sess:
            ha1 = digest(ha1, nonce, cnonce.encode())
        ha2 = digest(method.encode(), uri.encode())
        if use_qop:
            count = self._counts.get(nonce, 0) + 1
            self._counts[nonce] = count
            nc = f"{count:08x}"
            response = digest(ha1, nonce, nc.encode(), cnonce.encode(), b"auth", ha2)
        else:
            response = digest(ha1, nonce, ha2)
        userhash = params.get("userhash", "").lower() == "true"
        username = digest(self._user, realm).decode() if userhash else self._username
        fields = [
            f"username={_quote(username)}",
            f"realm={_quote(_echo(params['realm'], 'realm'))}",
            f"nonce={_quote(_echo(params['nonce'], 'nonce'))}",
            f"uri={_quote(uri)}",
            f'response="{response.decode()}"',
        ]
        if "algorithm" in params:
            fields.append(f"algorithm={params['algorithm']}")  # known, so a token
        if "opaque" in params:
            fields.append(f"opaque={_quote(_echo(params['opaque'], 'opaque'))}")
        if use_qop:
            fields += ["qop=auth", f"nc={nc}", f"cnonce={_quote(cnonce)}"]
        if userhash:
            fields.append("userhash=true")
        return "Digest " + ", ".join(fields)


def digest_hash(algorithm: str, *parts: bytes) -> bytes:
    """``H(part:part:...)`` in lower-case hex (RFC 7616 section 3.4.1) for ``algorithm`` (MD5,
    SHA-256 or SHA-512-256, without -sess)."""
    import hashlib  # only Digest pays for OpenSSL's bindings

    data = b":".join(parts)
    return hashlib.new(_DIGEST_HASHES[algorithm], data, usedforsecurity=False).hexdigest().encode()


def digest_challenge(realm: str, nonce: str, algorithm: str, *, stale: bool = False) -> str:
    """A server's ``Proxy-Authenticate`` value offering ``algorithm`` with qop=auth."""
    nonce = _quote(nonce)
    value = f'Digest realm={_quote(realm)}, qop="auth", algorithm={algorithm}, nonce={nonce}'
    return value + ", stale=true" if stale else value


# A server nonce: "<time in hex>.<salt in hex>.<HMAC-SHA-256 of both, first 128 bits in hex>".
_NONCE_MAC_CHARS = 32


def _nonce_mac(secret: bytes, stamp: str) -> str:
    import hmac

    return hmac.new(secret, stamp.encode("ascii"), "sha256").hexdigest()[:_NONCE_MAC_CHARS]


def make_nonce(secret: bytes, now_s: float, salt: bytes) -> str:
    """A nonce that ``nonce_time(secret, ...)`` will date to ``now_s`` (whole seconds); the salt
    (random, from the caller) keeps two nonces of the same second apart."""
    stamp = f"{int(now_s):x}.{salt.hex()}"
    return f"{stamp}.{_nonce_mac(secret, stamp)}"


def nonce_time(secret: bytes, nonce: str) -> int | None:
    """When a nonce made by ``make_nonce(secret, ...)`` was made, or None when it was not made
    with this secret (forged, altered, or from before a restart)."""
    import hmac

    stamp, dot, mac = nonce.rpartition(".")
    when, dot2, salt = stamp.partition(".")
    if not (dot and dot2 and when and salt) or len(when) > 16 or when.strip("0123456789abcdef"):
        return None
    if not hmac.compare_digest(_nonce_mac(secret, stamp).encode(), mac.encode("utf-8", "replace")):
        return None
    return int(when, 16)


def digest_response(
    algorithm: str, ha1: bytes, nonce: str, nc: str, cnonce: str, method: str, uri: str
) -> bytes:
    """The ``response`` a client answering with qop=auth must send (RFC 7616 section 3.4.1),
    in lower-case hex, from the user's ``ha1`` (``digest_hash(algorithm, user, realm,
    password)``); the fields are those of the client's Proxy-Authorization, as received."""
    ha2 = digest_hash(algorithm, method.encode(), _wire(uri))
    return digest_hash(algorithm, ha1, _wire(nonce), nc.encode(), _wire(cnonce), b"auth", ha2)
