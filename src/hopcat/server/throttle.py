"""Failed logins, counted per client, and the penalty that slows password guessing.

A client (an IPv4 address, or an IPv6 /64: one host usually holds a whole /64) may fail
``FREE_FAILURES`` logins in a row. Each further failure starts a penalty, 1 s doubling up to
``MAX_PENALTY_S``, during which that client's logins are refused without the password being
looked at: a guess made then is wasted, so guessing goes no faster than the penalties allow, and
parallel connections do not help (they share the client's count). A success clears the count;
failures are forgotten ``FORGET_AFTER_S`` after the last one.

Other clients are never affected: the count is per client, a refusal costs no waiting (no
connection is held open to delay it) and the table is bounded (``MAX_CLIENTS``; the oldest entry
goes first), so it is no lever against anyone but the guesser itself and those sharing its
address (a NAT).
"""

from __future__ import annotations

FREE_FAILURES = 5
FIRST_PENALTY_S = 1.0
MAX_PENALTY_S = 60.0
FORGET_AFTER_S = 600.0
MAX_CLIENTS = 4096


def client_key(ip: str) -> str:
    """The address a count is kept for: IPv4 as is, IPv6 by its /64."""
    if ":" not in ip:
        return ip
    import ipaddress

    try:
        return str(ipaddress.ip_network(f"{ip.split('%', 1)[0]}/64", strict=False))
    except ValueError:
        return ip


class LoginThrottle:
    """Per-client failure counts and penalties; times are the caller's clock (seconds)."""

    __slots__ = ("_clients",)

    def __init__(self) -> None:
        # key -> [consecutive failures, penalty end, time of the last failure]
        self._clients: dict[str, list[float]] = {}

    def penalty_left(self, ip: str, now: float) -> float:
        """Seconds this client's logins are still refused unchecked (0: check them)."""
        key = client_key(ip)
        entry = self._clients.get(key)
        if entry is None:
            return 0.0
        if now - entry[2] > FORGET_AFTER_S:
            del self._clients[key]
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, ip: str, now: float) -> float:
        """Count a wrong password; the penalty it starts in seconds, or 0."""
        key = client_key(ip)
        entry = self._clients.pop(key, None)  # re-inserted last: the dict is oldest first
        if entry is None or now - entry[2] > FORGET_AFTER_S:
            entry = [0.0, 0.0, now]
        entry[0] += 1
        entry[2] = now
        penalty_s = 0.0
        if entry[0] > FREE_FAILURES:
            penalty_s = min(MAX_PENALTY_S, FIRST_PENALTY_S * 2 ** (entry[0] - FREE_FAILURES - 1))
            entry[1] = now + penalty_s
        self._clients[key] = entry
        if len(self._clients) > MAX_CLIENTS:
            del self._clients[next(iter(self._clients))]
        return penalty_s

    def succeeded(self, ip: str) -> None:
        if self._clients:
            self._clients.pop(client_key(ip), None)

    def failures(self, ip: str) -> int:
        entry = self._clients.get(client_key(ip))
        return 0 if entry is None else int(entry[0])
