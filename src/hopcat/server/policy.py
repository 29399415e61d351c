"""Who may use the server, where they may go, and whose password is right: pure decisions.

Nothing here touches a socket, a file or a clock: the serving code reads files and resolves
names, and asks this module. Three parts:

Client rules (``--allow-client CIDR`` / ``--deny-client CIDR``)
    Checked once per accepted connection against the client's address. In order, the first rule
    whose network holds the address decides; no match allows.

Destination rules (``--allow DEST`` / ``--deny DEST``)
    ``DEST`` is ``HOST[:PORTS]`` or ``:PORTS``. HOST is ``*``, a glob over names
    (``*.example.com``), an IPv4 glob (``10.*``, ``192.168.?.*``), an address or a CIDR network
    (``10.0.0.0/8``, ``::1``, ``[2001:db8::/32]:443``). An IPv6 host with ports needs brackets
    (``[::1]:22``): ``::1:22`` is refused as ambiguous, and so are IPv6 globs (use a network).
    PORTS is ``*`` or a list of ``N`` and ``N-M`` (``80,443,8000-8100``). In order, the first
    rule whose host and ports match decides.

    Rules decide on what will be dialled, never on the client's spelling of it:

    * Names are compared in the form the resolver is given (``resolver_form``): Python hands a
      non-ASCII name to getaddrinfo IDNA-encoded, which folds full-width letters, case and the
      ideographic dots (U+3002, U+FF0E, U+FF61). Globs see that form, lowercased and without a
      trailing dot; rule patterns are folded the same way.
    * Address rules (networks, addresses, IPv4 globs) are matched against the addresses that
      will be dialled: an IP literal in whichever spelling the resolver accepts (``127.1``,
      ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``0``, ``::ffff:127.0.0.1``,
      ``fe80::1%eth0``; the server parses these with the resolver's own numeric parser), or each
      address a name resolves to. IPv4-mapped IPv6 addresses are matched as the IPv4 address
      they carry, since that is what the kernel dials. The server dials exactly the addresses
      it checked, never the name again (DNS rebinding).
    * A name glob matches a literal destination by the address's canonical text (so ``*``
      matches everything).

    ``check_name`` decides from the name alone where the rules allow it (a deny glob needs no
    lookup); ``check_address`` is the whole decision for one address. Through ``--via``
    upstreams that dial from another host, names are resolved there: only name rules apply to
    them (``resolvable=False``).

    Loops: a destination that is one of the server's own listeners (``listeners``; a listener on
    0.0.0.0 or :: is reached through every address of the host and loopback) is denied whatever
    the rules say.

    When no rule matches: a server listening only on loopback addresses allows everything (its
    users could reach those hosts anyway). A server listening beyond loopback
    (``restrict_local``) denies its protected addresses: every address of the host
    (``host_addresses``, its interfaces' addresses), loopback, the unspecified networks,
    link-local (169.254.0.0/16 holds cloud metadata services; fe80::/10), other metadata
    addresses, multicast and broadcast, and NAT64 (64:ff9b::/96) or 6to4 (2002::/16) addresses
    that embed one of those. (Rules match such an address as the IPv6 address it is: a
    translator must not carry it to a non-global IPv4 address, RFC 6052 section 3.1.) Only an
    address rule placed before reopens a protected address (``--allow 127.0.0.1:8080``): a name
    glob, ``*`` included, never does, since a name may resolve to anything. ``--deny '*'`` as the
    last rule makes the policy deny-by-default.

Credentials (``--auth USER:PASS``, ``--auth-file FILE``)
    The file holds one ``user:password`` a line, in plain text (hashing would need a dependency
    such as bcrypt, and a proxy password is a shared secret the server must be able to check
    quickly thousands of times a second; protect the file with mode 600 instead). The user is up
    to the first ``:``, the password is the rest of the line (it may contain ``:``) without
    trailing spaces or tabs, which editors add unseen; blank lines and lines starting with ``#``
    are skipped. Only SHA-256 digests are kept in memory, and a
    check always compares two digests with ``hmac.compare_digest``, for unknown users too, so the
    time taken says nothing about the password or whether the user exists. When HTTP Digest is
    offered, each user's HA1 (``H(user:realm:password)``, RFC 7616 section 3.4.2) is kept too, per
    algorithm: what a Digest check needs, and a password equivalent for this realm only.
"""

from __future__ import annotations

import encodings.idna
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

# Denied by default when the server listens beyond loopback, with the host's own addresses (see
# the module docstring).
LOCAL_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "127.0.0.0/8",  # loopback (RFC 1122)
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the server's own services on Linux
        "169.254.0.0/16",  # link-local (RFC 3927), including cloud metadata at 169.254.169.254
        "100.100.100.200/32",  # Alibaba Cloud's metadata service
        "224.0.0.0/4",  # multicast
        "255.255.255.255/32",  # limited broadcast
        "::1/128",  # loopback
        "::/128",  # unspecified: dials ::1 on Linux
        "fe80::/10",  # link-local
        "fd00:ec2::254/128",  # AWS's IPv6 metadata service
        "ff00::/8",  # multicast
    )
)
# IPv6 prefixes that carry an IPv4 address a translator or relay may dial (RFC 6052, RFC 3056).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_6TO4 = ipaddress.ip_network("2002::/16")

# Glob characters plus what a host name, an IP literal's text or a reg-name may hold.
_GLOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._*?[]!%~")
_WILDCARDS = frozenset("*?[")
_IPV4_GLOB_CHARS = frozenset("0123456789.*?[]!-")
# The dots IDNA (RFC 3490 section 3.1) treats as label separators.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is matched as the IPv4 address, and a
    zone id (``fe80::1%eth0``) says which link, not which address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def resolver_form(host: str) -> str | None:
    """The name as getaddrinfo will receive it: Python passes ASCII as it is and IDNA-encodes the
    rest (nameprep folds case and full-width forms, ideographic dots become dots). None when the
    encoder refuses it, so no resolver would look it up."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def parse_ipv4_spelling(text: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any spelling inet_aton(3) accepts, as getaddrinfo does: one to four
    dot-separated parts, each decimal, octal (leading 0) or hex (0x), the last filling the
    remaining bytes (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``)."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        lowered = part.lower()
        digits, base = part, 10
        if lowered.startswith("0x"):
            digits, base = part[2:], 16
        elif len(part) > 1 and part.startswith("0"):
            digits, base = part[1:], 8
        if not digits or not digits.isascii() or not digits.isalnum():
            return None
        try:
            values.append(int(digits, base))
        except ValueError:
            return None
    *leading, last = values
    if any(value > 255 for value in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _fold_pattern(pattern: str) -> str | None:
    """A name glob in the form names are compared in (``resolver_form``, lowercase, no trailing
    dot); None when a label cannot be IDNA-encoded or mixes non-ASCII with wildcards."""
    labels = []
    for label in pattern.translate(_IDNA_DOTS).split("."):
        if not label.isascii():
            if _WILDCARDS & set(label):
                return None
            try:
                label = encodings.idna.ToASCII(label).decode("ascii")
            except UnicodeError:
                return None
        labels.append(label.lower())
    return ".".join(labels).rstrip(".")


def parse_network(text: str, *, what: str) -> IPNetwork:
    """``10.0.0.0/8``, ``192.0.2.7``, ``::1``, ``[2001:db8::]/32`` -> a network (host bits ignored)."""
    inner = text
    if inner.startswith("["):
        close = inner.find("]")
        if close == -1:
            raise UsageError(f"{what} {text!r}: missing ']'")
        inner = inner[1:close] + inner[close + 1 :]
    address, slash, length = inner.partition("/")
    spelled = parse_ipv4_spelling(address)
    if spelled is not None:
        inner = f"{spelled}{slash}{length}"
    try:
        network = ipaddress.ip_network(inner, strict=False)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IP address or CIDR network") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        # Addresses are matched unmapped (see _unmapped), so rules are too.
        mapped = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


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
    """One ``--allow``/``--deny`` destination rule: a host matcher and port ranges.

    Exactly one matcher: ``glob`` (over names), ``address_glob`` (over IPv4 addresses' dotted
    text) or ``network``."""

    __slots__ = ("address_glob", "allow", "glob", "network", "ports", "text")

    def __init__(
        self,
        allow: bool,
        text: str,
        ports: tuple[tuple[int, int], ...],
        *,
        glob: re.Pattern[str] | None = None,
        address_glob: re.Pattern[str] | None = None,
        network: IPNetwork | None = None,
    ) -> None:
        self.allow = allow
        self.text = text
        self.ports = ports
        self.glob = glob
        self.address_glob = address_glob
        self.network = network

    def matches_address(self, address: IPAddress) -> bool:
        """An address rule's verdict on ``address`` (already unmapped); False for name globs."""
        if self.network is not None:
            return address.version == self.network.version and address in self.network
        if self.address_glob is not None:
            return address.version == 4 and self.address_glob.match(str(address)) is not None
        return False

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
        # An unbracketed IPv6 address or network has no ports; refuse what could be read both
        # ways ("::1:22": the address ::1:22, or ::1 port 22?).
        head, _, last = text.rpartition(":")
        if last.isdigit() and _is_ipv6(head.partition("/")[0]):
            raise UsageError(
                f"{what} {text!r} is ambiguous: write [{head}]:{last} for port {last} of {head}, "
                f"or [{text}] for the address"
            )
        return text, "*"
    host, colon, ports = text.partition(":")
    return host or "*", ports if colon else "*"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_dest_rule(text: str, allow: bool) -> DestRule:
    what = "--allow" if allow else "--deny"
    if not text:
        raise UsageError(f"{what} needs HOST[:PORTS], e.g. '*.example.com:443' or 10.0.0.0/8")
    host, ports_text = _split_dest(text, what)
    ports = parse_ports(ports_text, what=f"{what} {text!r}")
    if host == "*":
        return DestRule(allow, text, ports, glob=re.compile(".*", re.DOTALL))
    if not host.isascii():  # compared as the resolver will see it, and so classified
        host = _fold_pattern(host) or "\0"
    wildcard = bool(_WILDCARDS & set(host))
    if wildcard and set(host) <= _IPV4_GLOB_CHARS and any(c.isdigit() for c in host):
        return DestRule(allow, text, ports, address_glob=re.compile(fnmatch.translate(host)))
    if wildcard and ":" in host:
        raise UsageError(
            f"{what} {text!r}: IPv6 globs are not supported; use a network such as 2001:db8::/32"
        )
    looks_ip = ":" in host or "/" in host or parse_ipv4_spelling(host) is not None
    if looks_ip:
        return DestRule(allow, text, ports, network=parse_network(host, what=what))
    pattern = _fold_pattern(host)
    if not pattern or not set(pattern) <= _GLOB_CHARS:
        raise UsageError(
            f"{what} {text!r}: the host must be *, a name glob such as *.example.com, an IP "
            "address or a CIDR network"
        )
    return DestRule(allow, text, ports, glob=re.compile(fnmatch.translate(pattern)))


def parse_client_rule(text: str, allow: bool, what: str = "") -> ClientRule:
    """An address or CIDR network (``*``/``all``: everyone); ``what`` names the option in
    errors (default: serve's --allow-client/--deny-client)."""
    what = what or ("--allow-client" if allow else "--deny-client")
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
    """Decisions over a RuleSet; ``restrict_local`` selects the default described above.

    ``host_addresses`` (the host's interface addresses) and ``listeners`` (the server's own
    bound addresses and ports) are facts about the host that the server keeps up to date."""

    __slots__ = ("host_addresses", "listeners", "restrict_local", "rules")

    def __init__(
        self, rules: RuleSet, *, restrict_local: bool,
        host_addresses: frozenset[IPAddress] = frozenset(),
        listeners: Sequence[tuple[IPAddress, int]] = (),
    ) -> None:  # fmt: skip
        self.rules = rules
        self.restrict_local = restrict_local
        self.host_addresses = host_addresses
        self.listeners = tuple(listeners)

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

    def check_name(self, name: str, port: int, *, resolvable: bool = True) -> bool | None:
        """What ``check_address`` would answer for every address ``name`` may resolve to, or
        None when that depends on the addresses.

        ``name`` is a name (not an IP literal) in its compared form: ``resolver_form``,
        lowercased, trailing dot removed. With ``resolvable=False`` (an upstream on another
        host resolves it) address rules never match a name, and the answer is never None.
        """
        # An allowing answer waits for the addresses when they could be this server (a loop) or
        # a protected address that only an address rule may reopen.
        unsure = resolvable and (
            self.restrict_local or any(port == bound_port for _bound, bound_port in self.listeners)
        )
        for rule in self.rules.destinations:
            if not _port_in(port, rule.ports):
                continue
            if rule.glob is None:
                if resolvable:
                    return None  # this rule may match once the name is resolved
                continue
            if rule.glob.match(name):
                return None if rule.allow and unsure else rule.allow
        return None if unsure else True

    def check_address(self, name: str | None, address: IPAddress, port: int) -> bool:
        """The full decision for dialling ``address``, which ``name`` (compared form) resolved
        to; ``name`` None for an IP literal, which name globs then see as its canonical text."""
        address = _unmapped(address)
        if self.is_listener(address, port):
            return False
        text = str(address) if name is None else name
        for rule in self.rules.destinations:
            if not _port_in(port, rule.ports):
                continue
            if rule.glob is not None:
                if rule.glob.match(text):
                    if rule.allow and self.restrict_local and self._protected(address):
                        continue  # a name never reopens a protected address
                    return rule.allow
            elif rule.matches_address(address):
                return rule.allow
        return not (self.restrict_local and self._protected(address))

    def is_listener(self, address: IPAddress, port: int) -> bool:
        """Whether dialling ``address``:``port`` would reach this server itself."""
        address = _unmapped(address)
        for bound, bound_port in self.listeners:
            if port != bound_port or address.version != bound.version:
                continue
            if address == bound or address.is_unspecified:
                return True
            if bound.is_unspecified and (address.is_loopback or address in self.host_addresses):
                return True
        return False

    def _protected(self, address: IPAddress) -> bool:
        if address in self.host_addresses or _in_local_networks(address):
            return True
        embedded = None
        if isinstance(address, ipaddress.IPv6Address):
            if address in _NAT64:
                embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            else:
                embedded = address.sixtofour
        return embedded is not None and (
            embedded in self.host_addresses or _in_local_networks(embedded)
        )


def _in_local_networks(address: IPAddress) -> bool:
    return any(address.version == net.version and address in net for net in LOCAL_NETWORKS)


# --------------------------------------------------------------------------- credentials


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class CredentialStore:
    """Users and password digests; ``check()`` takes the same time whoever asks. With
    ``digest_algorithms``, HA1s in ``digest_realm`` for ``digest_ha1()``."""

    __slots__ = ("_dummy", "_ha1", "_realm", "_users")

    def __init__(
        self,
        users: Iterable[tuple[str, str]] = (),
        *,
        digest_algorithms: Iterable[str] = (),
        digest_realm: str = "hopcat",
    ) -> None:
        from hopcat.proto.http_auth import digest_hash

        self._users: dict[str, bytes] = {}
        self._ha1: dict[tuple[str, str], bytes] = {}
        self._realm = digest_realm.encode()
        algorithms = tuple(digest_algorithms)
        for user, password in users:
            self._users[user] = _digest(password)
            raw_user = user.encode("utf-8", "surrogateescape")
            raw_password = password.encode("utf-8", "surrogateescape")
            for name in algorithms:
                self._ha1[user, name] = digest_hash(name, raw_user, self._realm, raw_password)
        self._dummy = _digest("\0hopcat: no such user\0")

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def check(self, username: str, password: str) -> bool:
        expected = self._users.get(username)
        ok = hmac.compare_digest(_digest(password), self._dummy if expected is None else expected)
        return ok and expected is not None

    def digest_ha1(self, username: str, algorithm: str) -> tuple[bytes, bool]:
        """The user's HA1 for ``algorithm`` and True, or a dummy of the same length and False
        (an unknown user, or Digest not enabled), so the caller's work is the same either way."""
        ha1 = self._ha1.get((username, algorithm))
        if ha1 is not None:
            return ha1, True
        from hopcat.proto.http_auth import digest_hash

        return digest_hash(algorithm, self._dummy.hex().encode()), False


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
