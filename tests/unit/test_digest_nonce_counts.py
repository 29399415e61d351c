"""The shared Digest nc table (``NonceCounts``): what a second review found against it."""

from __future__ import annotations

import os

from hopcat.proto.http_auth import make_nonce
from hopcat.server.digest import MAX_TRACKED_NONCES, NONCE_SLOTS, NonceCounts

SECRET = b"k" * 32
LIFETIME = 300.0


def _slot_taken(counts: NonceCounts) -> int:
    words = counts._words
    return next(i for i in range(NONCE_SLOTS) if words[i * NonceCounts.ENTRY])


def test_slots_come_from_a_keyed_hash() -> None:
    """Anyone gets nonces from 407s: with a public slot hash, an authenticated user who
    captured another's answer could collect nonces landing on its slots, log in with them and
    crowd it out (the oldest is forgotten), then replay it. Keyed, the slot is the table's
    secret: the same nonce lands elsewhere in another table."""
    nonce = make_nonce(SECRET, 1000, os.urandom(8))
    slots = set()
    for _ in range(3):
        counts = NonceCounts()
        assert counts.advance(nonce, 1000, 1, 1000, LIFETIME)
        slots.add(_slot_taken(counts))
    assert len(slots) > 1  # all three alike: a chance of one in NONCE_SLOTS squared


def test_no_replay_passes_at_the_documented_capacity() -> None:
    """With MAX_TRACKED_NONCES live nonces (218 Digest logins a second for the 300 s lifetime)
    every one is remembered: replaying every answer gets none accepted. (Eight probes in a
    table as large as the capacity let 2% through at 40,000.)"""
    counts = NonceCounts()
    nonces = [os.urandom(12).hex() for _ in range(MAX_TRACKED_NONCES)]
    for nonce in nonces:
        assert counts.advance(nonce, 1000, 1, 1000, LIFETIME)
    accepted = sum(counts.advance(nonce, 1000, 1, 1000, LIFETIME) for nonce in nonces)
    assert accepted == 0, f"{accepted} replayed answers accepted"
