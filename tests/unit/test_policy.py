"""hopcat.server.policy: rule parsing and evaluation order, defaults, credentials, auth files."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest

from hopcat.errors import UsageError
from hopcat.server.policy import (
    CredentialStore,
    Policy,
    RuleSet,
    parse_auth_file,
    parse_auth_option,
    parse_client_rule,
    parse_dest_rule,
    parse_ipv4_spelling,
    parse_ports,
    parse_rules_file,
    resolver_form,
)


def dest_policy(*rules: tuple[str, str], restrict_local: bool = False) -> Policy:
    parsed = [parse_dest_rule(text, action == "allow") for action, text in rules]
    return Policy(RuleSet((), parsed), restrict_local=restrict_local)


def numeric(host: str) -> str | None:
    """The address getaddrinfo reads ``host`` as without a lookup (the server's literal parser)."""
    try:
        infos = socket.getaddrinfo(host, 0, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    return str(infos[0][4][0])


def decide(policy: Policy, host: str, port: int, address: str | None = None) -> bool:
    """The decision the server makes: a literal at once; a name by check_name, then by every
    address it resolved to."""
    wire = resolver_form(host)
    assert wire is not None
    literal = numeric(wire)
    if literal is not None:
        return policy.check_address(None, ipaddress.ip_address(literal), port)
    name = wire.lower().rstrip(".")
    early = policy.check_name(name, port)
    if early is not None:
        return early
    assert address is not None, f"{host}: needs an address"
    return policy.check_address(name, ipaddress.ip_address(address), port)


# --------------------------------------------------------------------------- ports


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", ((0, 65535),)),
        ("443", ((443, 443),)),
        ("8000-8100", ((8000, 8100),)),
        ("22,80,443,8000-8100", ((22, 22), (80, 80), (443, 443), (8000, 8100))),
    ],
)
def test_parse_ports(text: str, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_ports(text, what="x") == expected


@pytest.mark.parametrize(
    "text", ["", "a", "80-", "-80", "90-80", "65536", "1,,2", "\uff11\uff12"]
)  # fullwidth digits
def test_parse_ports_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ports(text, what="x")


# --------------------------------------------------------------------------- destination rules


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("*", "glob"),
        ("*.example.com", "glob"),
        ("*.example.com:443", "glob"),
        (":22", "glob"),
        ("10.0.0.0/8", "network"),
        ("10.0.0.0/8:22", "network"),
        ("192.0.2.7:80,443", "network"),
        ("::1", "network"),
        ("2001:db8::/32", "network"),
        ("[2001:db8::/32]:443", "network"),
        ("[2001:db8::]/32:443", "network"),
        ("[::1]:22", "network"),
    ],
)
def test_parse_dest_rule_kinds(text: str, kind: str) -> None:
    rule = parse_dest_rule(text, True)
    assert (rule.glob is not None) == (kind == "glob")
    assert (rule.network is not None) == (kind == "network")


@pytest.mark.parametrize(
    "text",
    ["", "exa mple.com", "10.0.0.0/33", "[::1", "[::1]x", "host:99999", "a\nb", "ü*.example"],
)
def test_parse_dest_rule_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_dest_rule(text, False)


def test_first_matching_rule_wins() -> None:
    policy = dest_policy(("allow", "git.example.com:22"), ("deny", "*.example.com"), ("allow", "*"))
    assert decide(policy, "git.example.com", 22) is True
    assert decide(policy, "git.example.com", 443) is False
    assert decide(policy, "www.example.com", 443) is False
    assert decide(policy, "example.org", 443) is True


def test_globs_ignore_case_and_trailing_dot() -> None:
    policy = dest_policy(("deny", "*.Example.COM"))
    assert decide(policy, "WWW.example.com.", 80) is False
    assert decide(policy, "www.example.org", 80) is True


def test_port_ranges() -> None:
    policy = dest_policy(("allow", "*:80,443,8000-8100"), ("deny", "*"))
    assert [decide(policy, "h.example", p) for p in (80, 443, 8000, 8050, 8100, 22, 8101)] == [
        True, True, True, True, True, False, False,
    ]  # fmt: skip


def test_networks_match_resolved_addresses() -> None:
    policy = dest_policy(("deny", "10.0.0.0/8"))
    assert policy.check_name("internal.example", 443) is None  # needs the addresses
    assert decide(policy, "internal.example", 443, "10.1.2.3") is False
    assert decide(policy, "public.example", 443, "192.0.2.1") is True
    assert decide(policy, "10.9.9.9", 443) is False  # a literal is decided at once


def test_glob_before_network_decides_without_resolving() -> None:
    policy = dest_policy(("allow", "*.corp.example"), ("deny", "10.0.0.0/8"))
    assert policy.check_name("db.corp.example", 5432) is True
    assert policy.check_name("other.example", 5432) is None


@pytest.mark.parametrize(
    "spelling",
    ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.0.1", "::ffff:127.0.0.1",
     "::ffff:7f00:1", "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11"],
)  # fmt: skip
def test_address_rules_see_every_spelling(spelling: str) -> None:
    # Each is a literal to getaddrinfo (full-width digits after IDNA folding): no lookup, no
    # escape from the rule.
    for rule in ("127.0.0.0/8", "127.0.0.1", "127.*", "[::ffff:127.0.0.1]", "2130706433"):
        policy = dest_policy(("deny", rule), ("allow", "*"))
        assert decide(policy, spelling, 80) is False, (rule, spelling)
    assert decide(dest_policy(restrict_local=True), spelling, 80) is False


@pytest.mark.parametrize(
    "text", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "00", "0x7f.0.1", "1.2.3",
             "10.0.0.1", "0X0A.0.0.1", "4294967295", "08.1", "0x", "1.2.3.4.5", "256.1",
             "1.16777216", "127.0.0.1.", "", "a.b", "1 .2", "0x1g", "\uff11"],
)  # fmt: skip
def test_ipv4_spellings_agree_with_getaddrinfo(text: str) -> None:
    spelled = parse_ipv4_spelling(text)
    expected = numeric(text) if text and text.isascii() else None
    assert (str(spelled) if spelled is not None else None) == expected


def test_names_are_compared_as_the_resolver_sees_them() -> None:
    policy = dest_policy(("deny", "*.example.com"), ("deny", "bad.example"), ("allow", "*"))
    for host in ("WWW.EXAMPLE.COM.", "\uff57\uff57\uff57.example.com",
                 "www\u3002example\uff0ecom", "www\uff61example.com",
                 "\uff22\uff21\uff24.example"):  # fmt: skip
        assert decide(policy, host, 443, "192.0.2.1") is False, host
    assert decide(policy, "good.example", 443, "192.0.2.1") is True
    assert resolver_form("\u00fc.example") == "xn--tda.example"
    assert resolver_form("a" * 64 + ".\u00fc") is None  # IDNA refuses: no resolver would look it up


def test_rule_patterns_are_folded_like_names() -> None:
    policy = dest_policy(
        ("deny", "\u00fc.example"), ("deny", "*.\uff25\uff38.org"),
        ("deny", "\uff11\uff10\uff0e\uff10\uff0e\uff10\uff0e\uff10/8"),
    )  # fmt: skip
    assert decide(policy, "xn--tda.example", 80, "192.0.2.1") is False
    assert decide(policy, "\u00dc.example", 80, "192.0.2.1") is False
    assert decide(policy, "a.ex.org", 80, "192.0.2.1") is False
    assert decide(policy, "db.example", 80, "10.1.2.3") is False  # the rule is 10.0.0.0/8


def test_ipv4_globs_match_dialled_addresses() -> None:
    policy = dest_policy(("deny", "10.*:22"), ("deny", "192.168.?.*"))
    assert decide(policy, "167772161", 22) is False  # 10.0.0.1
    assert decide(policy, "db.example", 22, "10.9.8.7") is False
    assert decide(policy, "db.example", 23, "10.9.8.7") is True
    assert decide(policy, "db.example", 80, "::ffff:192.168.1.5") is False
    assert decide(policy, "db.example", 80, "192.168.10.5") is True


def test_ipv4_mapped_addresses_match_ipv4_rules() -> None:
    policy = dest_policy(("deny", "127.0.0.0/8"))
    assert decide(policy, "::ffff:127.0.0.1", 80) is False
    assert policy.check_address("x", ipaddress.ip_address("::ffff:127.0.0.2"), 80) is False


def test_ipv6_rules() -> None:
    policy = dest_policy(("allow", "[2001:db8::/32]:443"), ("deny", "2001:db8::/32"))
    assert decide(policy, "2001:db8::1", 443) is True
    assert decide(policy, "2001:db8::1", 80) is False
    assert decide(policy, "2001:db9::1", 80) is True
    assert decide(policy, "v6.example", 80, "2001:db8::5") is False


def test_unresolvable_upstream_names_skip_network_rules() -> None:
    policy = dest_policy(("deny", "10.0.0.0/8"), ("deny", "*.blocked.example"))
    assert policy.check_name("db.internal", 22, resolvable=False) is True
    assert policy.check_name("x.blocked.example", 22, resolvable=False) is False
    assert policy.check_address(None, ipaddress.ip_address("10.0.0.1"), 22) is False


def test_zone_ids_do_not_hide_link_local_addresses() -> None:
    policy = dest_policy(("deny", "fe80::/10"), ("allow", "*"))
    assert policy.check_address(None, ipaddress.ip_address("fe80::1%eth0"), 22) is False
    assert (
        dest_policy(restrict_local=True).check_address(None, ipaddress.ip_address("fe80::1%2"), 22)
        is False
    )


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("::1:22", "[::1]:22"),
        ("fe80::1:443", "[fe80::1]:443"),
        ("2001:db8::/32:443", "[2001:db8::/32]:443"),
        ("fe80::*", "network"),
        ("2001:db8:*:443", "network"),
        ("[::1]22", "':PORTS'"),
    ],
)
def test_ambiguous_or_unsupported_rules_are_refused(text: str, hint: str) -> None:
    with pytest.raises(UsageError, match=re.escape(hint)):
        parse_dest_rule(text, False)


def test_unbracketed_ipv6_without_ports_is_accepted() -> None:
    for text in ("2001:db8::1", "::1", "2001:db8::/32", "::ffff:127.0.0.1", "1:2:3:4:5:6:7:8"):
        assert parse_dest_rule(text, False).network is not None, text


# --------------------------------------------------------------------------- defaults


def test_loopback_server_allows_everything_by_default() -> None:
    policy = dest_policy(restrict_local=False)
    assert decide(policy, "127.0.0.1", 22) is True
    assert decide(policy, "localhost", 22) is True


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("0.0.0.0", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("192.0.2.1", True),
        ("10.0.0.1", True),
        ("2001:db8::1", True),
    ],
)
def test_exposed_server_denies_local_destinations_by_default(address: str, allowed: bool) -> None:
    policy = dest_policy(restrict_local=True)
    assert decide(policy, address, 80) is allowed
    assert decide(policy, "name.example", 80, address) is allowed


HOST = frozenset(map(ipaddress.ip_address, ("127.0.0.1", "192.0.2.2", "::1", "fd00::2")))


@pytest.mark.parametrize(
    "address",
    ["192.0.2.2", "fd00::2", "::ffff:192.0.2.2", "64:ff9b::7f00:1", "64:ff9b::c000:202",
     "2002:7f00:1::1", "2002:c000:202::", "fd00:ec2::254", "100.100.100.200", "0.1.2.3"],
)  # fmt: skip
def test_exposed_server_denies_every_address_of_the_host(address: str) -> None:
    policy = dest_policy(restrict_local=True)
    policy.host_addresses = HOST
    assert decide(policy, address, 80) is False
    assert decide(policy, "name.example", 80, address) is False
    # Another host's addresses in the same networks stay reachable.
    assert decide(policy, "192.0.2.3", 80) is True
    assert decide(policy, "64:ff9b::c000:203", 80) is True


def test_name_globs_never_reopen_protected_addresses() -> None:
    policy = dest_policy(("allow", "*"), ("allow", "*.corp.example"), restrict_local=True)
    policy.host_addresses = HOST
    assert policy.check_name("app.corp.example", 443) is None  # depends on the addresses
    assert decide(policy, "app.corp.example", 443, "10.1.2.3") is True
    for address in ("127.0.0.1", "192.0.2.2", "169.254.169.254"):
        assert decide(policy, "app.corp.example", 443, address) is False
    # An address rule does reopen one, even after a name glob that matched.
    policy = dest_policy(("allow", "*.corp.example"), ("allow", "127.0.0.1:8080"),
                         restrict_local=True)  # fmt: skip
    assert decide(policy, "app.corp.example", 8080, "127.0.0.1") is True
    assert decide(policy, "localhost", 8080, "127.0.0.1") is True
    assert decide(policy, "localhost", 8081, "127.0.0.1") is False


@pytest.mark.parametrize(
    ("bound", "dest", "loops"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "0.0.0.0", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("127.0.0.1", "::1", False),
        ("0.0.0.0", "192.0.2.2", True),
        ("0.0.0.0", "127.0.0.9", True),
        ("0.0.0.0", "192.0.2.3", False),
        ("::", "fd00::2", True),
        ("::", "::1", True),
        ("::", "192.0.2.2", False),  # the IPv6 listener is IPV6_V6ONLY
        ("::1", "::", True),
        ("192.0.2.2", "192.0.2.2", True),
        ("192.0.2.2", "127.0.0.1", False),
    ],
)
def test_the_server_itself_is_never_a_destination(bound: str, dest: str, loops: bool) -> None:
    port = 1080
    policy = dest_policy(("allow", "*"), ("allow", "0.0.0.0/0"), ("allow", "::/0"))
    policy.host_addresses = HOST
    policy.listeners = ((ipaddress.ip_address(bound), port),)
    assert decide(policy, dest, port) is not loops
    assert decide(policy, "self.example", port, dest) is not loops
    assert decide(policy, dest, port + 1) is True
    assert policy.check_name("self.example", port) is None  # a name may be this server
    assert policy.check_name("self.example", port + 1) is True


def test_exposed_server_default_can_be_overridden() -> None:
    policy = dest_policy(("allow", "127.0.0.1:8080"), restrict_local=True)
    assert decide(policy, "127.0.0.1", 8080) is True
    assert decide(policy, "127.0.0.1", 22) is False


def test_deny_everything_else() -> None:
    policy = dest_policy(("allow", "*.example.com:443"), ("deny", "*"))
    assert decide(policy, "a.example.com", 443) is True
    assert decide(policy, "192.0.2.1", 443) is False


# --------------------------------------------------------------------------- client rules


def test_client_rules_in_order() -> None:
    rules = RuleSet(
        [
            parse_client_rule("10.0.0.13", False),
            parse_client_rule("10.0.0.0/8", True),
            parse_client_rule("*", False),
        ]
    )
    policy = Policy(rules, restrict_local=True)
    assert policy.client_allowed("10.0.0.13") is False
    assert policy.client_allowed("10.2.3.4") is True
    assert policy.client_allowed("192.0.2.1") is False
    assert policy.client_allowed("::1") is False


def test_no_client_rules_allow_all() -> None:
    assert Policy(RuleSet(), restrict_local=True).client_allowed("203.0.113.9") is True


def test_client_rule_rejects_names() -> None:
    with pytest.raises(UsageError, match="not an IP address"):
        parse_client_rule("example.com", True)


# --------------------------------------------------------------------------- rules file


def test_rules_file() -> None:
    rules = parse_rules_file(
        "# comment\n\nallow *.example.com:443  # trailing comment\n"
        "deny 10.0.0.0/8\nallow-client 127.0.0.0/8\ndeny-client *\n",
        "rules.txt",
    )
    assert [r.text for r in rules.destinations] == ["*.example.com:443", "10.0.0.0/8"]
    assert [(r.allow, r.text) for r in rules.clients] == [(True, "127.0.0.0/8"), (False, "*")]


@pytest.mark.parametrize("line", ["permit *", "allow", "allow a b", "deny 10.0.0.0/99"])
def test_rules_file_errors_name_the_line(line: str) -> None:
    with pytest.raises(UsageError, match=r"rules\.txt line 2"):
        parse_rules_file(f"allow *\n{line}\n", "rules.txt")


# --------------------------------------------------------------------------- credentials


def test_credentials() -> None:
    store = CredentialStore([("alice", "s3cret:with:colons"), ("bob", "pw")])
    assert store.check("alice", "s3cret:with:colons")
    assert not store.check("alice", "s3cret")
    assert not store.check("alice", "pw")
    assert not store.check("carol", "pw")
    assert not store.check("", "")
    assert len(store) == 2 and "bob" in store


def test_credentials_non_utf8_never_match() -> None:
    store = CredentialStore([("alice", "pässword")])
    assert store.check("alice", "pässword")
    assert not store.check("alice", "p\udce4ssword")  # Latin-1 bytes as surrogate escapes


def test_credentials_keep_no_plaintext() -> None:
    store = CredentialStore([("alice", "hunter2-plaintext")])
    assert "hunter2" not in repr(vars(store) if hasattr(store, "__dict__") else store._users)


def test_auth_option() -> None:
    assert parse_auth_option("alice:pa:ss") == ("alice", "pa:ss")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(UsageError) as info:
            parse_auth_option(bad)
        assert "pw" not in str(info.value)


def test_auth_file() -> None:
    text = "# users\nalice:one:two\r\n\n  # indented comment\nbob: spaced \n"
    assert parse_auth_file(text, "users") == [("alice", "one:two"), ("bob", " spaced")]  # trailing blanks: an editor's


@pytest.mark.parametrize("line", ["nocolon", ":pw", "user:", "alice:again"])
def test_auth_file_errors_never_quote_passwords(line: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_auth_file(f"alice:topsecret\n{line}\n", "users")
    assert "users line 2" in str(info.value)
    assert "topsecret" not in str(info.value) and "pw" not in str(info.value).replace(
        "password", ""
    )
