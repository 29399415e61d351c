"""Answering an HTTP proxy's 407: which scheme, with what, and when to give up.

One ``HopAuth`` per HTTP hop of a chain lives as long as the tunnel plan (``hopcat.net.engine``),
across the connections a handshake may need. Nothing is sent until the proxy asks (nc's habit,
and no password travels in clear to a proxy that would have taken Digest or NTLM), unless the
user pinned Basic alone (``--proxy-auth-scheme basic``): then Basic goes with the first request.

Choice, strongest first: Negotiate when GSSAPI can make a token (the user's Kerberos ticket or
client keytab; no password), NTLM (v2), Digest (its strongest offered algorithm), Basic; the
hop's ``auth_schemes`` restrict or reorder that. A scheme that cannot run (no GSSAPI library, no
ticket, an unknown Digest algorithm, no user) is skipped and the next offered one is tried. When
the proxy offers no password scheme but Negotiate and Kerberos cannot run, NTLM goes under the
Negotiate name as Windows does (Squid's negotiate_wrapper takes it; SPNEGO-wrapped NTLM it
refuses).

Bounds: each scheme is answered once, except a Digest ``stale=true`` (a new nonce, same password:
answered once more) and the legs of NTLM and Negotiate on one connection. A password scheme that
is refused ends it: the password is wrong for every scheme, and trying the next one would only
show the proxy the same password again. A refused Kerberos ticket falls back to the password
schemes. At most ``MAX_ANSWERS`` answers per hop.

The connection-oriented schemes (NTLM, Negotiate) must finish on the connection they began on:
a proxy that closes mid-handshake ends it with that said. Basic and Digest answers may go on a
new connection (ncat closes after every 407).
"""

from __future__ import annotations

import os

from hopcat.errors import ProxyAuthError, RemoteProtocolError
from hopcat.net.engine import Call
from hopcat.proto._machine import sanitize

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any

    from hopcat._url import ProxyURL
    from hopcat.net.gssapi import NegotiateContext
    from hopcat.proto._events import AuthChallenge
    from hopcat.proto.http_auth import Challenge, DigestClient

# The schemes hopcat answers, in its order of preference (what --proxy-auth-scheme names).
SCHEMES = ("negotiate", "ntlm", "digest", "basic")
_WIRE_NAMES = {"negotiate": "Negotiate", "ntlm": "NTLM", "digest": "Digest", "basic": "Basic"}
MAX_ANSWERS = 6
_NO_USER = "no user was given (put USER@ in the proxy URL)"


class HopAuth:
    """The authentication state of one HTTP hop; see the module docstring."""

    __slots__ = ("_digest", "_gss", "_last_answer", "_ntlm_wire", "_stage", "answers",
                 "current", "host", "known_good", "order", "password", "pending", "pinned",
                 "random", "skipped", "time", "trace", "username")  # fmt: skip

    def __init__(
        self, hop: ProxyURL, *, trace: Callable[[str], None] | None = None,
        random: Callable[[int], bytes] = os.urandom, time: Callable[[], float] | None = None,
    ) -> None:  # fmt: skip
        self.username = hop.username
        self.password = hop.password or ""
        self.host = hop.host
        self.pinned = hop.auth_schemes is not None
        self.order: tuple[str, ...] = hop.auth_schemes or SCHEMES
        self.trace = trace
        self.random = random
        if time is None:
            import time as time_module

            time = time_module.time
        self.time = time
        self.current: str | None = None  # the scheme answered last
        self._stage = ""  # NTLM: "negotiate" or "authenticate" sent; Negotiate: "token" sent
        self._ntlm_wire = "NTLM"  # or "Negotiate", for NTLM under that name
        self._digest: DigestClient | None = None
        self._gss: NegotiateContext | None = None
        self.skipped: dict[str, str] = {}  # scheme -> why it could not run or was refused
        self.answers = 0
        self.pending: str | None = None  # the answer the next connection's request carries
        self.known_good: str | None = None  # a Basic answer that worked, for a reconnect
        self._last_answer: str | None = None

    def first_authorization(self) -> str | None:
        """What a new connection's first request carries: an answer chosen on the connection
        before, a Basic answer that worked already, preemptive Basic when pinned, or nothing."""
        if self.pending is not None:
            answer, self.pending = self.pending, None
            return answer
        if self.known_good is not None:
            return self.known_good
        if self.order == ("basic",) and self.pinned and self.username is not None:
            from hopcat.proto.http_auth import basic_authorization

            self.current = "basic"
            self._last_answer = basic_authorization(self.username, self.password)
            return self._last_answer
        return None

    def established(self) -> str | None:
        """The proxy said 2xx: which scheme did it (a phrase for -v; None when it asked for
        nothing). The next connection starts afresh: a chain is crossed again when a later hop
        closes after its 407, and this proxy's 407 on it is a new challenge, not a refusal of
        the answer that worked (a Basic answer that worked goes with its first request)."""
        scheme, self.current, self._stage, self.answers = self.current, None, "", 0
        self.close()  # a Kerberos context belongs to one connection
        if scheme is None:
            return None
        if scheme == "basic" and self._last_answer is not None:
            self.known_good = self._last_answer
        name = _WIRE_NAMES[scheme]
        if scheme == "ntlm" and self._ntlm_wire == "Negotiate":
            name = "NTLM under the Negotiate name"
        return f"authenticated with {name}"

    def close(self) -> None:
        if self._gss is not None:
            self._gss.close()
            self._gss = None

    def answer(self, event: AuthChallenge, target: str) -> Generator[Call, Any, str]:
        """The Proxy-Authorization value that answers ``event`` (a CONNECT to ``target``, the
        request target as sent); raises ProxyAuthError when there is none worth sending."""
        from hopcat.proto.http_auth import parse_challenges

        # Header by header: one the parser cannot read (a vendor's odd Negotiate blob) must not
        # hide a usable Basic or Digest in the next.
        challenges: list[Challenge] = []
        unreadable: list[str] = []
        for value in event.header_values:
            try:
                challenges += parse_challenges([value])
            except RemoteProtocolError as exc:
                unreadable.append(str(exc))
        if unreadable and self.trace is not None:
            self.trace(f"ignored an unreadable challenge: {unreadable[0]}")
        if unreadable and not challenges:
            raise RemoteProtocolError(f"HTTP {event.status}: unreadable challenge: {unreadable[0]}")
        offered: dict[str, list[Challenge]] = {}
        for challenge in challenges:
            offered.setdefault(challenge.name, []).append(challenge)
        self.answers += 1
        if self.answers > MAX_ANSWERS:
            raise self._failure(event, offered, f"still asking after {MAX_ANSWERS} answers")
        if self.trace is not None and self.answers == 1:
            names = ", ".join(map(_offer, challenges)) or "no scheme"
            self.trace(f"the proxy asks for credentials (HTTP {event.status}); it offers {names}")
        answer = yield from self._continue(event, offered, target)
        if answer is None:
            answer = yield from self._choose(event, offered, target)
        return answer

    # -- a scheme under way ------------------------------------------------------------------
    def _continue(
        self, event: AuthChallenge, offered: dict[str, list[Challenge]], target: str
    ) -> Generator[Call, Any, str | None]:
        """The next leg of the scheme answered last, or None to choose again (after marking it
        refused or unusable); raises when a refused password ends it."""
        scheme = self.current
        if scheme is None:
            return None
        if scheme == "ntlm":
            token = _token_of(offered.get(self._ntlm_wire.lower(), []))
            if self._stage == "negotiate" and token:
                if not event.reusable:
                    raise self._failure(event, offered, "the proxy closed the connection during "
                                        "the NTLM handshake (it must stay on one connection)")  # fmt: skip
                return self._ntlm_authenticate(token)
            if self._stage == "negotiate":
                self.skipped["ntlm"] = "the proxy did not answer its first message"
                return None
        elif scheme == "negotiate":
            token = _token_of(offered.get("negotiate", []))
            if token and self._gss is not None and not self._gss.complete:
                if not event.reusable:
                    raise self._failure(event, offered, "the proxy closed the connection during "
                                        "the Negotiate handshake")  # fmt: skip
                out, error = yield Call(self._gss_step, _b64decode(token))
                if not error:
                    return "Negotiate " + _b64encode(out)
                self.skipped["negotiate"] = error
            else:
                self.skipped["negotiate"] = "the proxy refused the Kerberos ticket"
            self.current = None
            return None
        elif scheme == "digest":
            from hopcat.proto.http_auth import DigestClient

            assert self._digest is not None
            challenge = DigestClient.choose(offered.get("digest", []))
            if challenge is not None and DigestClient.is_stale(challenge) and self._stage != "stale":
                self._stage = "stale"  # a new nonce for the same password: answered once
                if self.trace is not None:
                    self.trace("the Digest nonce was stale: answering the new one")
                return self._digest.authorization(challenge, "CONNECT", target, self._cnonce())
        rejected = "credentials rejected"
        if len(offered) > 1:
            rejected += f" ({_WIRE_NAMES[scheme]})"
        raise self._failure(event, offered, rejected)

    # -- choosing ----------------------------------------------------------------------------
    def _choose(
        self, event: AuthChallenge, offered: dict[str, list[Challenge]], target: str
    ) -> Generator[Call, Any, str]:
        self.current = None
        self._stage = ""
        for scheme in self.order:
            if scheme in self.skipped:
                continue
            answer: str | None = None
            if scheme == "negotiate" and "negotiate" in offered:
                answer = yield from self._negotiate_first()
            elif scheme == "ntlm" and ("ntlm" in offered or "negotiate" in offered):
                answer = self._ntlm_first(offered)
            elif scheme == "digest" and "digest" in offered:
                answer = self._digest_first(offered["digest"], target)
            elif scheme == "basic" and "basic" in offered:
                answer = self._basic_first()
            if answer is not None:
                self.current = scheme
                if self.trace is not None:
                    why = "first in --proxy-auth-scheme" if self.pinned else "strongest"
                    where = "" if event.reusable else " on a new connection (the proxy closed this)"
                    self.trace(f"answering with {self._wire_label(scheme)} ({why} of those "
                               f"offered that can run here){where}")  # fmt: skip
                self._last_answer = answer
                return answer
            if scheme in self.skipped and self.trace is not None:
                self.trace(f"{_WIRE_NAMES[scheme]} skipped: {self.skipped[scheme]}")
        raise self._failure(event, offered, "")

    def _wire_label(self, scheme: str) -> str:
        if scheme == "ntlm" and self._ntlm_wire == "Negotiate":
            return "NTLM under the Negotiate name (no Kerberos ticket)"
        return _WIRE_NAMES[scheme]

    def _negotiate_first(self) -> Generator[Call, Any, str | None]:
        out, error = yield Call(self._gss_step, None)
        if error:
            self.skipped["negotiate"] = error
            self.close()
            return None
        self._stage = "token"
        return "Negotiate " + _b64encode(out)

    def _ntlm_first(self, offered: dict[str, list[Challenge]]) -> str | None:
        if "ntlm" in offered:
            self._ntlm_wire = "NTLM"
        elif "negotiate" not in self.skipped and "negotiate" in self.order:
            return None  # Negotiate is offered and was not tried: Kerberos goes first
        elif {"digest", "basic"} & offered.keys() & set(self.order):
            # A Negotiate that may be Kerberos alone would refuse NTLM, and a refused password
            # ends the exchange: a scheme the proxy names is the safer answer.
            return None
        else:
            self._ntlm_wire = "Negotiate"
        if self.username is None:
            self.skipped["ntlm"] = _NO_USER
            return None
        from hopcat.proto.ntlm import negotiate_message

        self._stage = "negotiate"
        return f"{self._ntlm_wire} {_b64encode(negotiate_message())}"

    def _ntlm_authenticate(self, token: str) -> str:
        from hopcat.proto.ntlm import authenticate_message, filetime, parse_challenge, split_user

        assert self.username is not None
        challenge = parse_challenge(_b64decode(token))
        domain, user = split_user(self.username)
        message = authenticate_message(
            challenge, user, self.password, domain, client_challenge=self.random(8),
            timestamp=filetime(self.time()),
        )  # fmt: skip
        self._stage = "authenticate"
        return f"{self._ntlm_wire} {_b64encode(message)}"

    def _digest_first(self, challenges: list[Challenge], target: str) -> str | None:
        from hopcat.proto.http_auth import DigestClient

        challenge = DigestClient.choose(challenges)
        if challenge is None:
            offered = sorted({sanitize(c.params.get("algorithm", "MD5"), 40) for c in challenges})
            self.skipped["digest"] = f"no supported algorithm offered ({', '.join(offered)})"
            return None
        if self.username is None:
            self.skipped["digest"] = _NO_USER
            return None
        self._digest = DigestClient(self.username, self.password)
        return self._digest.authorization(challenge, "CONNECT", target, self._cnonce())

    def _basic_first(self) -> str | None:
        if self.username is None:
            self.skipped["basic"] = _NO_USER
            return None
        from hopcat.proto.http_auth import basic_authorization

        return basic_authorization(self.username, self.password)

    def _cnonce(self) -> str:
        return self.random(16).hex()

    def _gss_step(self, token: bytes | None) -> tuple[bytes, str]:
        """One GSSAPI step (run where blocking is allowed: it may ask the KDC for a ticket):
        the token to send, or b"" and why not."""
        from hopcat.net import gssapi

        try:
            if self._gss is None:
                library = gssapi.load_library()
                if library is None:
                    return b"", "no GSSAPI library (install libgssapi-krb5-2)"
                self._gss = gssapi.NegotiateContext(self.host, library=library)
            return self._gss.step(token), ""
        except (gssapi.GSSAPIError, OSError, ValueError) as exc:
            # Whatever the library says, Negotiate is then skipped: a Call step never raises.
            return b"", f"{exc} (service {gssapi.principal_hint(self.host)})"

    def _failure(
        self, event: AuthChallenge, offered: dict[str, list[Challenge]], why: str
    ) -> ProxyAuthError:
        names = ", ".join(challenges[0].scheme for challenges in offered.values()) or "no scheme"
        notes = [f"proxy wants {names}"]
        if why:
            notes.append(why)
        else:
            tried = [f"{_WIRE_NAMES[s]}: {r}" for s, r in self.skipped.items()]
            unsupported = [c[0].scheme for n, c in offered.items() if n not in _WIRE_NAMES]
            allowed = [s for s in offered if s in _WIRE_NAMES and s not in self.order]
            if allowed and self.pinned:
                tried.append(f"--proxy-auth-scheme allows only {', '.join(self.order)}")
            if unsupported and not tried:
                tried.append(f"hopcat does not speak {', '.join(unsupported)}")
            notes.append("; ".join(tried) or "no scheme hopcat can answer")
        message = f"HTTP {event.status} {event.reason}".rstrip()
        return ProxyAuthError(f"{message} ({'; '.join(notes)})", protocol="http",
                              code=event.status)  # fmt: skip


def _offer(challenge: Challenge) -> str:
    """A challenge as -v names it: Digest with its algorithm (several may be offered)."""
    if challenge.name == "digest":
        return f"{challenge.scheme} ({sanitize(challenge.params.get('algorithm', 'MD5'), 40)})"
    return challenge.scheme


def _token_of(challenges: list[Challenge]) -> str | None:
    for challenge in challenges:
        if challenge.token68:
            return challenge.token68
    return None


def _b64encode(data: bytes) -> str:
    import binascii

    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b64decode(text: str) -> bytes:
    import binascii

    try:
        return binascii.a2b_base64(text)
    except binascii.Error:
        raise RemoteProtocolError("the proxy's authentication token is not base64") from None


def parse_scheme_list(text: str) -> tuple[str, ...]:
    """``--proxy-auth-scheme`` / the URL's ``auth=``: comma-separated names from ``SCHEMES``,
    or ``any`` for all in hopcat's order. ValueError names what is wrong."""
    names = [name.strip().lower() for name in text.split(",")]
    if names == ["any"]:
        return SCHEMES
    unknown = [name for name in names if name not in SCHEMES]
    if unknown or not names:
        raise ValueError(f"unknown scheme {unknown[0] if unknown else text!r}: use any or "
                         f"a list of {', '.join(SCHEMES)}")  # fmt: skip
    return tuple(dict.fromkeys(names))
