"""Proxy URLs, the environment's proxies, NO_PROXY and password sources."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hopcat._environment import fill_users, proxies_from_environment
from hopcat._url import parse_proxy_url
from hopcat.cli._args import parse_args
from hopcat.cli._proxy import fill_passwords, proxies_from_command_line
from hopcat.errors import UsageError


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "user", "password"),
    [
        ("socks5h://127.0.0.1:1080", "socks5h", "127.0.0.1", 1080, None, None),
        ("socks5://proxy", "socks5", "proxy", 1080, None, None),
        ("SOCKS4A://proxy:99", "socks4a", "proxy", 99, None, None),
        ("socks4://u@proxy", "socks4", "proxy", 1080, "u", None),
        ("http://proxy", "http", "proxy", 3128, None, None),
        ("https://proxy/", "https", "proxy", 443, None, None),
        ("http://al%40ice:p%3Ass%2F@[::1]:8080", "http", "::1", 8080, "al@ice", "p:ss/"),
        ("socks5h://user:@h:1", "socks5h", "h", 1, "user", ""),
        ("socks5h://%C3%A9:x@h:1", "socks5h", "h", 1, "\u00e9", "x"),
        ("socks5h://a:b@c@h:1", "socks5h", "h", 1, "a", "b@c"),
        ("socks5h://[fe80::1%25eth0]:1080", "socks5h", "fe80::1%eth0", 1080, None, None),
        ("socks5h://u:p%2Fq%3F%23@h:1", "socks5h", "h", 1, "u", "p/q?#"),
    ],
)
def test_parse_proxy_url(
    text: str, scheme: str, host: str, port: int, user: str | None, password: str | None
) -> None:
    url = parse_proxy_url(text)
    assert (url.scheme, url.host, url.port, url.username, url.password) == (
        scheme,
        host,
        port,
        user,
        password,
    )


@pytest.mark.parametrize(
    "text",
    [
        "ftp://h",
        "socks5h://h:0",
        "socks5h://h:99999",
        "socks5h://h/path",
        "socks5h://[::1",
        "socks5h://a b",
        "socks5h://u:p%zz@h",
        "socks5h://",
        "h:1080",
        "socks5h://h:1:2",
    ],
)
def test_bad_proxy_urls(text: str) -> None:
    with pytest.raises(UsageError):
        parse_proxy_url(text)


def test_label_redacts_password_and_quotes_user() -> None:
    assert parse_proxy_url("http://a%20b:secret@h:1").label() == "http://a%20b:***@h:1"
    assert parse_proxy_url("http://a@h:1").label() == "http://a@h:1"


@given(st.text(min_size=1, max_size=40))
def test_errors_never_quote_the_password(secret: str) -> None:
    marked = f"<{secret}>"
    for text in (f"socks5h://user:{marked}@", f"bogus://user:{marked}@h", f"http://user:{marked}@h:x"):
        try:
            parse_proxy_url(text)
        except UsageError as exc:
            assert marked not in str(exc)


def _hops(*argv: str):  # type: ignore[no-untyped-def]
    return proxies_from_command_line(parse_args([*argv, "target", "22"]))


def test_nc_ncat_and_connect_proxy_flags() -> None:
    assert [h.label() for h in _hops("-x", "p:1")] == ["socks5://p:1"]
    assert [h.label() for h in _hops("-X", "4", "-x", "p")] == ["socks4://p:1080"]
    assert [h.label() for h in _hops("-Xconnect", "-xp:8")] == ["http://p:8"]
    assert [h.label() for h in _hops("--proxy", "p")] == ["http://p:3128"]
    assert [h.label() for h in _hops("--proxy", "p", "--proxy-type", "socks5")] == [
        "socks5://p:1080"
    ]
    assert [h.label() for h in _hops("-S", "u@p")] == ["socks5://u@p:1080"]
    assert [h.label() for h in _hops("-H", "p")] == ["http://p:80"]
    chain = _hops("-x", "socks5h://a:1", "--proxy", "http://b:2", "-x", "socks4a://c:3")
    assert [h.label() for h in chain] == ["socks5h://a:1", "http://b:2", "socks4a://c:3"]
    (hop,) = _hops("--proxy", "p", "--proxy-auth", "u:pw")
    assert (hop.username, hop.password) == ("u", "pw")
    (hop,) = _hops("-X5", "-x", "p", "-P", "u")
    assert (hop.username, hop.password) == ("u", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["-X", "7", "-x", "p"],
        ["-X", "5"],
        ["--proxy-type", "gopher", "--proxy", "p"],
        ["-x", "a:1", "-x", "b:2", "-P", "u"],
        ["--proxy", "p", "--proxy-auth", ":pw"],
        ["-x", "p", "-P", ""],
    ],
)
def test_bad_proxy_flags(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        _hops(*argv)


@pytest.mark.parametrize(
    ("environ", "host", "expected"),
    [
        ({"ALL_PROXY": "socks5h://p:1"}, "t", "socks5h://p:1"),
        ({"all_proxy": "p:1"}, "t", "http://p:1"),
        ({"SOCKS5_SERVER": "u@p"}, "t", "socks5://u@p:1080"),
        ({"SOCKS4_SERVER": "p"}, "t", "socks4://p:1080"),
        ({"ALL_PROXY": "socks5h://p:1", "NO_PROXY": "example.com"}, "git.example.com", None),
        ({"ALL_PROXY": "socks5h://p:1", "NO_PROXY": ".example.com"}, "example.com", None),
        (
            {"ALL_PROXY": "socks5h://p:1", "NO_PROXY": "example.com"},
            "badexample.com",
            "socks5h://p:1",
        ),
        ({"ALL_PROXY": "socks5h://p:1", "no_proxy": "*"}, "t", None),
        ({"ALL_PROXY": "socks5h://p:1", "NO_PROXY": "10.0.0.0/8, ::1"}, "10.1.2.3", None),
        ({"ALL_PROXY": "socks5h://p:1", "NO_PROXY": "10.0.0.0/8"}, "11.1.2.3", "socks5h://p:1"),
        ({"HTTP_PROXY": "http://p:1", "http_proxy": "http://p:1"}, "t", None),
        ({}, "t", None),
    ],
)
def test_environment(environ: dict[str, str], host: str, expected: str | None) -> None:
    hops, why = proxies_from_environment(environ, host)
    assert [h.label() for h in hops] == ([expected] if expected else [])
    assert bool(why) == (expected is None)


def test_password_sources_in_order() -> None:
    def no_tty(_prompt: str) -> None:
        return None

    (hop,) = _hops("-x", "socks5h://u@p:1")
    fill_passwords([hop], {"HOPCAT_PROXY_PASSWORD": "a", "SOCKS5_PASSWD": "b"}, prompt=no_tty)
    assert hop.password == "a"
    (hop,) = _hops("-x", "socks5h://u@p:1")
    fill_passwords([hop], {"SOCKS5_PASSWD": "b", "HTTP_PROXY_PASSWORD": "c"}, prompt=no_tty)
    assert hop.password == "b"
    (hop,) = _hops("-x", "http://u@p:1")
    fill_passwords([hop], {"SOCKS5_PASSWD": "b", "HTTP_PROXY_PASSWORD": "c"}, prompt=no_tty)
    assert hop.password == "c"
    (hop,) = _hops("-x", "http://u@p:1")
    fill_passwords([hop], {}, prompt=lambda prompt: "typed" if "http://u@p:1" in prompt else None)
    assert hop.password == "typed"
    (hop,) = _hops("-x", "http://u@p:1")
    with pytest.raises(UsageError, match="HOPCAT_PROXY_PASSWORD"):
        fill_passwords([hop], {}, prompt=no_tty)
    (hop,) = _hops("-x", "socks4://u@p:1")
    fill_passwords([hop], {}, prompt=no_tty)  # SOCKS4 has a user id and no password
    assert hop.password is None


# -- rule 6: ambiguous input is refused, saying what to write instead ----------------------------

@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("socks5h://::1:1080", "needs brackets, e.g. [::1:1080]"),
        ("socks5h://::1", "needs brackets"),
        ("http://u:pa/ss@h:1", "contains '/': percent-encode it as %2F"),
        ("http://u:pa?ss@h:1", "contains '?': percent-encode it as %3F"),
        ("http://u#x:pass@h:1", "contains '#': percent-encode it as %23"),
        ("socks5h://@h:1", "empty user name"),
        ("socks5h://:pw@h:1", "empty user name"),
        ("socks5h://h:1080x", "neither a number nor a known service"),
        ("socks5h://h:1080/x", "no path, query or fragment"),
    ],
)
def test_ambiguous_proxy_urls_refused(text: str, words: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_proxy_url(text, origin="-x")
    assert words in str(info.value)
    for secret in ("pa/ss", "pa?ss", "pw"):
        assert secret not in str(info.value)


def test_bare_ipv6_proxy_for_nc_flags_needs_brackets_too() -> None:
    with pytest.raises(UsageError, match="brackets"):
        _hops("-x", "::1:1080")
    assert [h.label() for h in _hops("-x", "[::1]:1080")] == ["socks5://[::1]:1080"]


def test_scoped_target_host() -> None:
    from hopcat._endpoint import is_ip_literal, split_scope, validate_host

    assert validate_host("fe80::1%eth0") == "fe80::1%eth0"
    assert split_scope("fe80::1%eth0") == ("fe80::1", "eth0")
    assert is_ip_literal("fe80::1%eth0") and not is_ip_literal("host%eth0")
    with pytest.raises(UsageError):
        validate_host("fe80::1%")


# -- rule 7: lines copied from connect-proxy and ncat keep their meaning -------------------------

def test_connect_proxy_letters() -> None:
    options = parse_args(["-d", "-S", "p", "host", "22"])
    assert options.verbose == 1 and not options.no_stdin and options.notes
    options = parse_args(["-d", "--no-stdin", "-S", "p", "host", "22"])
    assert options.no_stdin
    assert parse_args(["-d", "-x", "p", "host", "22"]).no_stdin  # nc's meaning without -S/-H
    options = parse_args(["-4", "-S", "p", "host", "22"])
    assert not options.ipv4_only
    assert [h.label() for h in proxies_from_command_line(options)] == ["socks4://p:1080"]
    assert parse_args(["-4", "-x", "p", "host", "22"]).ipv4_only


@pytest.mark.parametrize(
    ("argv", "connect", "idle"),
    [
        (["-w", "5", "-x", "p"], None, 5.0),
        (["-w", "5", "--proxy", "p"], 5.0, None),
        (["-w", "5", "-H", "p"], 5.0, None),
        (["-w", "5", "--connect-timeout", "9", "--proxy", "p"], 9.0, None),
        (["--idle-timeout", "5", "--proxy", "p"], None, 5.0),
        (["-w", "500ms", "--proxy", "p"], 0.5, None),
        (["-w", "2m"], None, 120.0),
    ],
)
def test_w_follows_the_flag_family(argv: list[str], connect: float | None, idle: float | None) -> None:
    options = parse_args([*argv, "host", "22"])
    assert (options.connect_timeout_s, options.idle_timeout_s) == (connect, idle)


@pytest.mark.parametrize("value", ["x", "1e400", "nan", "5 s", "", "ms", "1_0"])
def test_bad_seconds(value: str) -> None:
    with pytest.raises(UsageError):
        parse_args(["--connect-timeout", value, "host", "22"])


def test_connect_proxy_user_variables() -> None:

    env = {"SOCKS5_USER": "s5", "SOCKS_USER": "s", "HTTP_PROXY_USER": "h", "CONNECT_USER": "c"}
    hops = _hops("-S", "p", "-H", "q", "-x", "socks5h://r:1")
    notes = fill_users(hops, env)
    assert [h.username for h in hops] == ["s5", "h", None]  # -x is not connect-proxy's
    assert len(notes) == 2 and "SOCKS5_USER" in notes[0]
    (hop,) = _hops("-S", "p")
    fill_users([hop], {"CONNECT_USER": "c"})
    assert hop.username == "c"
    (hop,) = _hops("-S", "given@p")
    fill_users([hop], env)
    assert hop.username == "given"
    hops, _why = proxies_from_environment({"SOCKS4_SERVER": "p"}, "t")
    fill_users(hops, {"SOCKS4_USER": "four", "SOCKS5_USER": "five"})
    assert hops[0].username == "four"


@pytest.mark.parametrize(
    ("url", "environ", "expected"),
    [
        ("socks5h://u@p:1", {"SOCKS5_PASSWORD": "old", "CONNECT_PASSWORD": "c"}, "old"),
        ("socks5h://u@p:1", {"CONNECT_PASSWORD": "c"}, "c"),
        ("http://u@p:1", {"CONNECT_PASSWORD": "c", "SOCKS5_PASSWD": "s"}, "c"),
    ],
)
def test_connect_proxy_password_variables(url: str, environ: dict[str, str], expected: str) -> None:
    (hop,) = _hops("-x", url)
    fill_passwords([hop], environ, prompt=lambda _prompt: None)
    assert hop.password == expected


def test_proxy_dns_none_is_accepted() -> None:
    assert parse_args(["--proxy-dns", "none", "host", "22"]).proxy_dns == "none"


def test_non_utf8_userinfo_with_percent_escapes_is_a_usage_error() -> None:
    """Bytes that were not UTF-8 on the command line, beside a %-escape, must not reach the
    decoder's encode (that was an internal error)."""
    with pytest.raises(UsageError, match="the user name is not valid UTF-8"):
        parse_proxy_url("socks5://u\udcff%41:p@h:1")
    with pytest.raises(UsageError, match="the password is not valid UTF-8"):
        parse_proxy_url("socks5://u:p\udcff%41@h:1")


def test_the_library_reads_the_environment_as_the_cli_does_when_asked() -> None:
    import hopcat

    env = {"SOCKS5_SERVER": "p:1080", "SOCKS5_USER": "u", "SOCKS5_PASSWD": "pw"}
    (proxy,) = hopcat.Chain.from_env("example.com", env)
    assert (proxy.scheme, proxy.username, proxy.url) == ("socks5", "u", "socks5://u:***@p:1080")
    assert hopcat.Chain.from_env("a.example.com", {"ALL_PROXY": "p", "NO_PROXY": "example.com"}) == hopcat.Chain()
    assert hopcat.Chain.from_env("example.com", {}) == hopcat.Chain()
    with pytest.raises(ValueError, match="HOPCAT_PROXY_PASSWORD"):
        hopcat.Chain.from_env("example.com", {"SOCKS5_SERVER": "p", "SOCKS5_USER": "u"})
