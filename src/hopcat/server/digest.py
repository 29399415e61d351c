"""HTTP Digest (RFC 7616) for ``hopcat serve``: the challenges it sends and the answers it takes.

Challenges: one per algorithm offered, qop=auth, in the realm ``REALM``, MD5 before SHA-256.
RFC 7616 section 3.7 reads the order as the server's preference, and clients act on it: ncat 7.93
answers the first Digest challenge and gives up ("Error building Proxy-Authorization header")
when that one is SHA-256, and curl 7.88 ignores every Digest challenge after the first. So MD5
first; hopcat's own client takes the strongest it knows (SHA-256) whatever the order. Neither
algorithm stops an eavesdropper from guessing the password offline from one answer (both hashes
are fast); what Digest gives over Basic is that the password itself never crosses the network.

The nonce is stateless (``http_auth.make_nonce``): its time and a random salt signed with
HMAC-SHA-256 under a secret drawn when the server starts, so the server keeps no table of the
nonces it gave out and a restart makes every old nonce unknown.

An answer is accepted when, in this order: its algorithm is one offered, its realm is ours, its
``uri`` is exactly the request target (a captured answer opens no other destination), the nonce
carries our signature and is not from the future, and the response equals the one computed from
the user's HA1 (compared with ``hmac.compare_digest``; an unknown user is checked against a
dummy HA1, so the time taken does not tell whether the user exists). A right response with a
nonce older than ``lifetime_s`` is answered with a new nonce and ``stale=true`` (section 3.3):
the client answers again without asking its user. Replay: the nc of each nonce seen in its
lifetime is remembered (``NonceCounts``) and a count not above the last one is refused. The
table is shared by every worker of ``--workers`` (a client's next connection, or an attacker's
replay, may reach any of them, and the nonce key is theirs in common too): a fixed
open-addressing table in a shared memory mapping, updated under a POSIX record lock, with
``NONCE_SLOTS`` slots for ``MAX_TRACKED_NONCES`` live nonces (kept a quarter full, so a nonce
finds room among its ``NONCE_PROBES`` slots). Where they are all taken by live nonces (far more
logins than that within a lifetime) the oldest is forgotten, and a replay of its answer could
pass. Slots come from a keyed hash: anyone can get nonces from 407s, and with a public hash could
pick ones that crowd out another's. Clients answer a nonce once per connection here (every 407 closes
the connection), and nc starts at 00000001.

Not done: -sess algorithms, SHA-512-256, qop=auth-int, userhash, opaque (nothing to carry: the
nonce is its own state). The response, the nonce secret and HA1 never reach a log or a message.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import mmap
import os

from hopcat.proto.http_auth import digest_challenge, digest_response, make_nonce, nonce_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hopcat.proto._events import DigestCredentials

REALM = "hopcat"
NONCE_LIFETIME_S = 300.0
ALGORITHMS = ("MD5", "SHA-256")  # in the 407's order (see above)
MAX_TRACKED_NONCES = 65536  # live nonces remembered: one Digest login every 4.6 ms for 300 s
NONCE_SLOTS = 4 * MAX_TRACKED_NONCES  # a quarter full at most: probing finds room
NONCE_PROBES = 16  # slots a nonce may take in the table, from the one its hash names
NONCE_SALT_BYTES = 8

# check() outcomes.
OK = "ok"
STALE = "stale"  # the right password for a nonce past its lifetime: answer again
WRONG = "wrong"  # counts as a failed login


class NonceCounts:
    """The last nc of each nonce in use: ``NONCE_SLOTS`` entries of (key, time, nc) in a
    memfd mapping, made before workers fork so that all of them share it. lockf() locks are held
    per process, so the descriptor the workers inherit in common still excludes each other."""

    __slots__ = ("_fd", "_key", "_map", "_words")
    ENTRY = 3  # words: the nonce's key (never 0), its time, its last nc

    def __init__(self) -> None:
        size = NONCE_SLOTS * self.ENTRY * 8
        # The slot hash is keyed: with a public hash, anyone holding nonces (free from 407s)
        # could pick ones that land on another nonce's slots and evict it.
        self._key = os.urandom(16)
        self._fd = os.memfd_create("hopcat-digest-nc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._words = memoryview(self._map).cast("q")

    def advance(self, nonce: str, made: int, nc: int, now: int, lifetime_s: float) -> bool:
        """Record ``nc`` for ``nonce``; False when it is not above the count last recorded."""
        digest = hashlib.blake2b(nonce.encode(), digest_size=8, key=self._key).digest()
        key = int.from_bytes(digest, "big", signed=True) or 1
        words, entry = self._words, self.ENTRY
        first = key % NONCE_SLOTS
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            free = oldest = -1
            for probe in range(NONCE_PROBES):
                at = (first + probe) % NONCE_SLOTS * entry
                if words[at] == key:
                    if nc <= words[at + 2]:
                        return False
                    words[at + 2] = nc
                    return True
                if words[at] == 0 or now - words[at + 1] > lifetime_s:
                    free = at if free == -1 else free
                elif oldest == -1 or words[at + 1] < words[oldest + 1]:
                    oldest = at
            at = free if free != -1 else oldest
            words[at], words[at + 1], words[at + 2] = key, made, nc
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)


class DigestAuth:
    """The nonce secret and the nc bookkeeping of one server (``counts``: shared by the
    workers of --workers); ``clock`` is seconds, monotonic (the system's, the same in every
    worker)."""

    __slots__ = ("_counts", "_secret", "algorithms", "clock", "lifetime_s")

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        lifetime_s: float = NONCE_LIFETIME_S,
        algorithms: Sequence[str] = ALGORITHMS,
        secret: bytes | None = None,
        counts: NonceCounts | None = None,
    ) -> None:
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.algorithms = tuple(algorithms)
        self._secret = os.urandom(32) if secret is None else secret
        self._counts = NonceCounts() if counts is None else counts

    def __repr__(self) -> str:
        return f"<DigestAuth algorithms={self.algorithms} lifetime={self.lifetime_s:g}s>"

    def challenges(self, *, stale: bool = False) -> list[str]:
        """Proxy-Authenticate values for a 407: one fresh nonce, one challenge per algorithm."""
        nonce = make_nonce(self._secret, self.clock(), os.urandom(NONCE_SALT_BYTES))
        return [digest_challenge(REALM, nonce, name, stale=stale) for name in self.algorithms]

    def check(
        self, answer: DigestCredentials, ha1_of: Callable[[str, str], tuple[bytes, bool]]
    ) -> tuple[str, str]:
        """(OK, STALE or WRONG, a reason for the log). ``ha1_of(user, algorithm)`` gives the
        user's HA1 and whether the user exists (a dummy HA1 when not)."""
        if answer.algorithm not in self.algorithms:
            return WRONG, f"Digest algorithm {answer.algorithm} was not offered"
        if answer.realm != REALM:
            return WRONG, "Digest answer for another realm"
        if answer.uri != answer.target:
            return WRONG, "Digest uri is not the request target"
        now = int(self.clock())
        made = nonce_time(self._secret, answer.nonce)
        if made is None or made > now:
            return WRONG, "Digest nonce not issued by this server"
        # Heads are decoded as Latin-1; user names are configured as text (UTF-8 in the file).
        username = answer.username.encode("latin-1").decode("utf-8", "surrogateescape")
        ha1, known = ha1_of(username, answer.algorithm)
        expected = digest_response(
            answer.algorithm, ha1, answer.nonce, answer.nc, answer.cnonce, answer.method, answer.uri
        )
        given = answer.response.lower().encode("utf-8", "replace")
        if not (hmac.compare_digest(expected, given) and known):
            return WRONG, "wrong user name or password"
        if now - made > self.lifetime_s:
            return STALE, "Digest nonce expired; a new one sent (stale=true)"
        return self._count(answer.nonce, made, int(answer.nc, 16), now)

    def _count(self, nonce: str, made: int, nc: int, now: int) -> tuple[str, str]:
        if not self._counts.advance(nonce, made, nc, now, self.lifetime_s):
            return WRONG, "Digest nonce count reused (a replayed answer)"
        return OK, ""
