"""Review 3: the shared Digest nc table (``NonceCounts``)."""

from __future__ import annotations

import hashlib
import os

from hopcat.proto.http_auth import make_nonce
from hopcat.server.digest import MAX_TRACKED_NONCES, NONCE_PROBES, NonceCounts

SECRET = b"k" * 32
LIFETIME = 300.0


def _slot(nonce: str) -> int:
    # The table's slot for a nonce: an unkeyed hash, so anyone holding nonces can compute it.
    key = int.from_bytes(hashlib.sha256(nonce.encode()).digest()[:8], "big", signed=True) or 1
    return key % MAX_TRACKED_NONCES


def test_a_user_can_evict_a_captured_nonce_and_replay_it() -> None:
    """An authenticated user who captured another user's answer (nonce N, nc=1, already used)
    asks for 407s (free, no login needed) until 8 nonces hash to N's slot (about half a
    million 407s, seconds of work), answers
    them with their own password (newer than N), and N, the oldest, is forgotten: the captured
    answer is then accepted again, well within its lifetime, with the table nearly empty (the
    README says the last 65536 nonces are remembered)."""
    counts = NonceCounts()
    now = 1000
    victim = make_nonce(SECRET, now - 10, os.urandom(8))
    assert counts.advance(victim, now - 10, 1, now, LIFETIME)  # the victim's own login
    assert not counts.advance(victim, now - 10, 1, now, LIFETIME)  # a replay: refused
    home = _slot(victim)
    planted = 0
    asked = 0
    while planted < NONCE_PROBES and asked < 2_000_000:
        asked += 1
        nonce = make_nonce(SECRET, now, os.urandom(8))  # what one more 407 hands out
        if _slot(nonce) == home:  # about 1 in 65536
            assert counts.advance(nonce, now, 1, now, LIFETIME)  # the attacker's own login
            planted += 1
    assert planted == NONCE_PROBES
    assert not counts.advance(victim, now - 10, 1, now, LIFETIME), (
        f"captured answer accepted again after {asked} challenges and {planted} logins"
    )


def test_replays_pass_well_below_the_documented_capacity() -> None:
    """With 40,000 live nonces (61% of MAX_TRACKED_NONCES, about 133 Digest logins a second
    for the 300 s lifetime) some windows of 8 slots are full, and replaying every answer
    gets hundreds accepted."""
    counts = NonceCounts()
    nonces = [os.urandom(12).hex() for _ in range(40_000)]
    for nonce in nonces:
        assert counts.advance(nonce, 1000, 1, 1000, LIFETIME)
    accepted = sum(counts.advance(nonce, 1000, 1, 1000, LIFETIME) for nonce in nonces)
    assert accepted == 0, f"{accepted} replayed answers accepted"
