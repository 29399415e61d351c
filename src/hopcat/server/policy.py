"""Who may use the server, where they may go, and whose password is right: pure decisions.

Nothing here touches a socket, a file or a clock: the serving code reads files and resolves
names, and asks this module. Three parts:

Client rules (``--allow-client CIDR`` / ``--deny-client CIDR``)
    Checked once per accepted connection against the client's address. In order, the first rule
    whose network holds the address decides; no match allows.

Destination rules (``--allow DEST`` / ``--deny DEST``)
    ``DEST`` is ``HOST[:PORTS]`` or ``:PORTS``. HOST is ``*``, a glob over names (``*.example.com``,
    matched without case and without a trailing dot, also against the text of an IP literal the
    client sent), an address or a CIDR network (``10.0.0.0/8``, ``::1``, ``[2001:db8::/32]:443``:
    brackets when an IPv6 host has ports). PORTS is ``*`` or a list of ``N`` and ``N-M``
    (``80,443,8000-8100``). In order, the first rule whose host and ports match decides.

    Network rules are checked against the addresses a name resolves to, not against the name:
    ``--deny 10.0.0.0/8`` also stops ``internal.example`` resolving to 10.1.2.3, and ``127.1`` or
    ``::ffff:127.0.0.1`` (IPv4-mapped addresses are matched as the IPv4 address they carry).
    A name is resolved only when a network rule could decide it: glob rules are tried first as
    far as the order allows (``check_name``), then each resolved address is checked in full
    (``check_address``) and only allowed addresses are dialled. Through ``--via`` upstreams the
    name is resolved by the upstream, so network rules match IP-literal destinations only.

    When no rule matches: a server listening only on loopback addresses allows everything (its
    users could reach those hosts anyway). A server listening beyond loopback
    (``restrict_local``) denies the server's own loopback, the unspecified address, link-local
    networks (169.254.0.0/16 holds cloud metadata services; fe80::/10) and multicast, and allows
    everything else. An explicit ``--allow`` placed before reopens any of them; ``--deny '*'`` as
    the last rule makes the policy deny-by-default.

Credentials (``--auth USER:PASS``, ``--auth-file FILE``)
    The file holds one ``user:password`` a line, in plain text (hashing would need a dependency
    such as bcrypt, and a proxy password is a shared secret the server must be able to check
    quickly thousands of times a second; protect the file with mode 600 instead). The user is up
    to the first ``:``, the password is the rest of the line (it may contain ``:``) without
    trailing spaces or tabs, which editors add unseen; blank lines and lines starting with ``#``
    are skipped. Only SHA-256 digests are kept in memory, and a
    check always compares two digests with ``hmac.compare_digest``, for unknown users too, so the
    time taken says nothing about the password or whether the user exists.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import re

from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALL_PORTS: tuple[tuple[int, int], ...] = ((0, 65535),)

# Denied by default when the server listens beyond loopback (see the module docstring).
LOCAL_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "127.0.0.0/8",  # loopback (RFC 1122)
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the server's own services on Linux
        "169.254.0.0/16",  # link-local (RFC 3927), including cloud metadata at 169.254.169.254
        "224.0.0.0/4",  # multicast
        "255.255.255.255/32",  # limited broadcast
        "::1/128",  # loopback
        "::/128",  # unspecified
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)

# Glob characters plus what a host name, an IP literal's text or a reg-name may hold.
_GLOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._*?[]!%~")


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is matched as the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str, *, what: str) -> IPNetwork:
    """``10.0.0.0/8``, ``192.0.2.7``, ``::1``, ``[2001:db8::]/32`` -> a network (host bits ignored)."""
    inner = text
    if inner.startswith("["):
        close = inner.find("]")
        if close == -1:
            raise UsageError(f"{what} {text!r}: missing ']'")
        inner = inner[1:close] + inner[close + 1 :]
    try:
        return ipaddress.ip_network(inner, strict=False)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IP address or CIDR network") from None


def parse_ports(text: str, *, what: str) -> tuple[tuple[int, int], ...]:
    """``*``, ``443``, ``8000-8100`` or a comma-separated list of those -> inclusive ranges."""
    if text == "*":
        return ALL_PORTS
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        low_text, dash, high_text = part.partition("-")
        numbers = (low_text, high_text) if dash else (low_text,)
        if not all(n.isascii() and n.isdigit() and len(n) <= 5 for n in numbers):
            raise UsageError(
                f"{what}: bad port range {part!r} (use N, N-M or a comma-separated list, 0-65535)"
            )
        low = int(low_text)
        high = int(high_text) if dash else low
        if not low <= high <= 65535:
            raise UsageError(f"{what}: bad port range {part!r} (0-65535, low to high)")
        ranges.append((low, high))
    return tuple(ranges)


def _port_in(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= port <= high for low, high in ranges)


class DestRule:
    """One ``--allow``/``--deny`` destination rule: a host matcher and port ranges."""

    __slots__ = ("allow", "glob", "network", "ports", "text")

    def __init__(
        self,
        allow: bool,
        text: str,
        ports: tuple[tuple[int, int], ...],
        *,
        glob: re.Pattern[str] | None = None,
        network: IPNetwork | None = None,
    ) -> None:
        self.allow = allow
        self.text = text
        self.ports = ports
        self.glob = glob
        self.network = network

    def __repr__(self) -> str:
        return f"<DestRule {'allow' if self.allow else 'deny'} {self.text}>"


class ClientRule:
    """One ``--allow-client``/``--deny-client`` rule."""

    __slots__ = ("allow", "network", "text")

    def __init__(self, allow: bool, text: str, network: IPNetwork | None) -> None:
        self.allow = allow
        self.text = text
        self.network = network  # None: every client ("*")

    def __repr__(self) -> str:
        return f"<ClientRule {'allow' if self.allow else 'deny'}-client {self.text}>"


def _split_dest(text: str, what: str) -> tuple[str, str]:
    """``HOST[:PORTS]`` -> (host, ports text); ``[v6 or v6/len]:PORTS``; a bare IPv6 has no ports."""
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise UsageError(f"{what} {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest.startswith("/"):  # "[2001:db8::]/32:443"
            length, colon, ports = rest[1:].partition(":")
            return f"{host}/{length}", ports if colon else "*"
        if not rest:
            return host, "*"
        if not rest.startswith(":") or len(rest) == 1:
            raise UsageError(f"{what} {text!r}: expected ':PORTS' after ']'")
        return host, rest[1:]
    if text.count(":") >= 2:
        return text, "*"  # an unbracketed IPv6 address or network: no ports
    host, colon, ports = text.partition(":")
    return host or "*", ports if colon else "*"


def parse_dest_rule(text: str, allow: bool) -> DestRule:
    what = "--allow" if allow else "--deny"
    if not text:
        raise UsageError(f"{what} needs HOST[:PORTS], e.g. '*.example.com:443' or 10.0.0.0/8")
    host, ports_text = _split_dest(text, what)
    ports = parse_ports(ports_text, what=f"{what} {text!r}")
    if host == "*":
        return DestRule(allow, text, ports, glob=re.compile(".*", re.DOTALL))
    looks_ip = ":" in host or "/" in host or host.replace(".", "").isdigit()
    if looks_ip:
        return DestRule(allow, text, ports, network=parse_network(host, what=what))
    pattern = host.lower().rstrip(".")
    if not pattern or not set(pattern) <= _GLOB_CHARS:
        raise UsageError(
            f"{what} {text!r}: the host must be *, a name glob such as *.example.com, an IP "
            "address or a CIDR network"
        )
    return DestRule(allow, text, ports, glob=re.compile(fnmatch.translate(pattern)))


def parse_client_rule(text: str, allow: bool) -> ClientRule:
    what = "--allow-client" if allow else "--deny-client"
    if text in ("*", "all"):
        return ClientRule(allow, text, None)
    return ClientRule(allow, text, parse_network(text, what=what))


class RuleSet:
    """Client and destination rules, each list in evaluation order."""

    __slots__ = ("clients", "destinations")

    def __init__(
        self, clients: Sequence[ClientRule] = (), destinations: Sequence[DestRule] = ()
    ) -> None:
        self.clients = tuple(clients)
        self.destinations = tuple(destinations)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.clients + other.clients, self.destinations + other.destinations)


_RULE_KEYWORDS = ("allow", "deny", "allow-client", "deny-client")


def parse_rules_file(text: str, source: str) -> RuleSet:
    """A ``--rules`` file: one ``allow DEST``, ``deny DEST``, ``allow-client CIDR`` or
    ``deny-client CIDR`` a line; ``#`` starts a comment; blank lines are skipped."""
    clients: list[ClientRule] = []
    destinations: list[DestRule] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        keyword, _, argument = line.partition(" ")
        argument = argument.strip()
        where = f"{source} line {number}"
        if keyword not in _RULE_KEYWORDS or not argument or " " in argument:
            raise UsageError(
                f"{where}: expected 'allow DEST', 'deny DEST', 'allow-client CIDR' or "
                "'deny-client CIDR'"
            )
        try:
            if keyword.endswith("-client"):
                clients.append(parse_client_rule(argument, keyword == "allow-client"))
            else:
                destinations.append(parse_dest_rule(argument, keyword == "allow"))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return RuleSet(clients, destinations)


class Policy:
    """Decisions over a RuleSet; ``restrict_local`` selects the default described above."""

    __slots__ = ("restrict_local", "rules")

    def __init__(self, rules: RuleSet, *, restrict_local: bool) -> None:
        self.rules = rules
        self.restrict_local = restrict_local

    def client_allowed(self, host: str) -> bool:
        if not self.rules.clients:
            return True
        address = _address(host)
        for rule in self.rules.clients:
            if rule.network is None or (
                address is not None
                and address.version == rule.network.version
                and address in rule.network
            ):
                return rule.allow
        return True

    def check_name(self, host: str, port: int, *, resolvable: bool = True) -> bool | None:
        """Decide before resolving: True/False, or None when the addresses are needed.

        ``host`` is a name or an IP literal's text as the client sent it. With
        ``resolvable=False`` (the name is resolved upstream) network rules never match a name,
        and the answer is never None.
        """
        if not self.rules.destinations and not self.restrict_local:
            return True  # the common loopback set-up: nothing to parse
        name = host.lower().rstrip(".")
        address = _address(host)
        for rule in self.rules.destinations:
            if not _port_in(port, rule.ports):
                continue
            if rule.glob is not None:
                if rule.glob.match(name):
                    return rule.allow
                continue
            assert rule.network is not None
            if address is not None:
                if address.version == rule.network.version and address in rule.network:
                    return rule.allow
                continue
            if resolvable:
                return None  # this rule may match once the name is resolved
        if address is not None:
            return self._default(address)
        if self.restrict_local and resolvable:
            return None
        return True

    def check_address(self, host: str, address: IPAddress, port: int) -> bool:
        """The full decision for dialling ``address``, which ``host`` resolved to (or is)."""
        name = host.lower().rstrip(".")
        address = _unmapped(address)
        for rule in self.rules.destinations:
            if not _port_in(port, rule.ports):
                continue
            if rule.glob is not None:
                if rule.glob.match(name):
                    return rule.allow
            else:
                assert rule.network is not None
                if address.version == rule.network.version and address in rule.network:
                    return rule.allow
        return self._default(address)

    def _default(self, address: IPAddress) -> bool:
        if not self.restrict_local:
            return True
        return not any(address.version == net.version and address in net for net in LOCAL_NETWORKS)


# --------------------------------------------------------------------------- credentials


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class CredentialStore:
    """Users and password digests; ``check()`` takes the same time whoever asks."""

    __slots__ = ("_dummy", "_users")

    def __init__(self, users: Iterable[tuple[str, str]] = ()) -> None:
        self._users: dict[str, bytes] = {}
        for user, password in users:
            self._users[user] = _digest(password)
        self._dummy = _digest("\0hopcat: no such user\0")

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def check(self, username: str, password: str) -> bool:
        expected = self._users.get(username)
        ok = hmac.compare_digest(_digest(password), self._dummy if expected is None else expected)
        return ok and expected is not None


def parse_auth_option(text: str) -> tuple[str, str]:
    """``--auth USER:PASS``. The message never quotes the text: it holds a password."""
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise UsageError("--auth takes USER:PASS (both non-empty)")
    return user, password


def parse_auth_file(text: str, source: str) -> list[tuple[str, str]]:
    """``user:password`` lines (see the module docstring). Messages never quote a line."""
    users: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        # Trailing blanks are what editors leave, not a password's end (documented).
        line = raw.rstrip(" \t\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise UsageError(f"{source} line {number}: expected user:password")
        if user in seen:
            raise UsageError(f"{source} line {number}: user {user!r} appears twice")
        seen.add(user)
        users.append((user, password))
    return users
