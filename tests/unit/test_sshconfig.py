"""hopcat ssh-config, in process: every option decided, every word written as ssh and sh read it.

ssh reads a ProxyCommand three times (see the module header of hopcat.cli._sshconfig): argv_split
checks its quotes, percent_expand replaces %-tokens, the shell splits it. ``argv_split_balanced``
below models the first (OpenSSH misc.c: a backslash escapes a quote or a backslash even inside
quotes, and a space outside them), shlex in POSIX mode the last; the integration tests check the
same words against the real ssh and shell.
"""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hopcat.cli import _sshconfig
from hopcat.cli._args import OPTION_TABLE, parse_args
from hopcat.errors import UsageError

# One sample value per option that takes one, to drive every row of OPTION_TABLE.
SAMPLES = {
    "source": "127.0.0.1", "connect_timeout_s": "0", "idle_timeout_s": "86400.25",
    "quit_after_eof_s": "1.5", "proxy_dns": "local", "proxy_cacert": "/etc/my ca's/b%5C.pem",
    "recv_buf": "262144", "send_buf": "131072", "tos": "lowdelay", "ttl": "64",
    "tls_ca": "/etc/ca.pem", "tls_servername": "ssh.example", "tls_cert": "/etc/me.pem",
    "tls_key": "/etc/me.key", "tls_alpn": "ssh/2.0", "tls_pin": "sha256:" + "ab" * 32,
    "tls_min_version": "1.3", "proxy_auth_scheme": "ntlm,digest",
    "proxy_password_file": "/etc/my proxy's/pass%word",
    "proxy_password_command": 'secret-tool lookup proxy "$HOPCAT_PROXY_HOST" | tr -d \'\\n\' # 100%',
}


def argv_split_balanced(line: str) -> bool:
    """Whether OpenSSH's argv_split accepts ``line`` (it rejects unbalanced quotes only)."""
    quote = ""
    index = 0
    while index < len(line):
        ch = line[index]
        if ch == "\\" and line[index + 1 : index + 2] in ("'", '"', "\\") + ((" ",) if not quote else ()):
            index += 2
            continue
        if not quote and ch in "'\"":
            quote = ch
        elif quote and ch == quote:
            quote = ""
        index += 1
    return not quote


def read_back(line: str) -> list[str]:
    """The words ssh's shell gets from a ProxyCommand line, with %h %p as HOST PORT."""
    assert argv_split_balanced(line), line
    expanded = _sshconfig.percent_expand(line, {"h": "HOST", "p": "22", "n": "HOST", "r": "me"})
    return shlex.split(expanded)


def proxy_command(text: str) -> str:
    (line,) = [row for row in text.splitlines() if row.startswith("    ProxyCommand ")]
    return line.removeprefix("    ProxyCommand ")


def stanza_of(*args: str) -> str:
    pattern, no_fdpass, options = _sshconfig._split_arguments(list(args))
    return _sshconfig.stanza(pattern, no_fdpass, options)[0]


def test_every_option_has_one_decision() -> None:
    groups = [_sshconfig._CARRIED, _sshconfig._FOLDED_INTO_URLS, _sshconfig._DECIDED_HERE,
              frozenset(_sshconfig._REFUSED)]
    attributes = {row[3] for row in OPTION_TABLE}
    decided = [attr for group in groups for attr in group]
    assert sorted(decided) == sorted(set(decided)), "an option in two groups"
    assert set(decided) == attributes


def test_every_carried_option_reaches_hopcat_unchanged() -> None:
    argv = ["-x", "socks5h://dom%5Cuser@127.0.0.1:1080"]
    for short, long, metavar, attr, _help in OPTION_TABLE:
        # -4 and -6 exclude each other, as the two password options do
        if attr not in _sshconfig._CARRIED or attr in ("ipv6_only", "proxy_password_command"):
            continue
        argv += [f"--{long}" if long else f"-{short}"] + ([SAMPLES[attr]] if metavar else [])
    argv.append("-v")  # counted: -vv
    written = parse_args(argv)
    words = read_back(proxy_command(stanza_of(*argv)))
    position = words.index("hopcat") + 1 if "hopcat" in words else 1
    carried = parse_args(words[position:])
    assert carried.operands == ["HOST", "22"]
    for attr in _sshconfig._CARRIED:
        assert getattr(carried, attr) == getattr(written, attr), attr
    assert carried.proxies == [("-x", "socks5h://dom%5Cuser@127.0.0.1:1080")]
    assert not carried.fdpass  # --tls: the session lives in hopcat, no socket to pass


def test_the_password_command_reaches_hopcat_unchanged() -> None:
    """A shell command with quotes, $, | and # survives ssh's two readings, to be run by hopcat's
    own /bin/sh -c; it names where the password is, so it belongs in the file."""
    command = SAMPLES["proxy_password_command"]
    words = read_back(proxy_command(stanza_of("-x", "http://alice@127.0.0.1:3128",
                                              "--proxy-password-command", command)))
    assert parse_args(words[words.index("hopcat") + 1 :]).proxy_password_command == command


def test_without_tls_the_socket_is_passed() -> None:
    words = read_back(proxy_command(stanza_of("-x", "socks5h://127.0.0.1:1080")))
    assert parse_args(words[words.index("hopcat") + 1 :]).fdpass


def test_ipv6_only_and_nc_style_proxy_flags_are_carried() -> None:
    words = read_back(proxy_command(stanza_of("-6", "-X", "connect", "-x", "proxy:8080",
                                              "-P", "dom\\us'er")))
    assert "-6" in words
    assert words[words.index("-x") + 1] == "http://dom%5Cus%27er@proxy:8080"


@pytest.mark.parametrize("flag", ["-d", "--no-stdin", "-V", "--version"])
def test_options_that_break_a_proxy_command_are_refused_with_the_reason(flag: str) -> None:
    with pytest.raises(UsageError, match="does not belong in a ProxyCommand: "):
        stanza_of("-x", "socks5h://p", flag)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x", "https://p", "-F"], "cannot be used with TLS"),
        (["-x", "socks5h://p", "-F", "--no-fdpass"], "--no-fdpass"),
        ([], "needs the proxy on its command line"),
        (["-x", "socks5h://p", "host", "22"], "takes no HOST PORT"),
        (["-x", "socks5h://p", "--host", "a'b"], "quotes, backslashes"),
        (["-x", "socks5h://p", "--host", "#x"], "leading #"),
        (["-x", "socks5h://p", "--host", " "], "needs a PATTERN"),
        (["-x", "socks5h://p", "--proxy-cacert", "a\nb"], "CR, LF or NUL"),
    ],
)
def test_stanzas_ssh_could_not_read_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        stanza_of(*args)


def test_direct_stanza_needs_and_carries_no_proxy() -> None:
    words = read_back(proxy_command(stanza_of("--no-proxy", "-w", "5")))
    assert "--no-proxy" in words and "-x" not in words


def test_host_patterns_are_kept_as_ssh_lists_them() -> None:
    assert stanza_of("-x", "socks5h://p", "--host", "*.corp  !git.corp").startswith(
        "Host *.corp !git.corp\n")


def test_relative_cacert_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    words = read_back(proxy_command(stanza_of("-x", "https://p", "--proxy-cacert", "ca.pem")))
    assert words[words.index("--proxy-cacert") + 1] == "/tmp/ca.pem"


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",))))
def test_any_word_survives_ssh_and_the_shell(word: str) -> None:
    line = f"prog {_sshconfig.ssh_word(word)} %h %p"
    assert read_back(line) == ["prog", word, "HOST", "22"]


@pytest.mark.parametrize("word", ["dom\\", "a'b", "it's\\'", "%h", "100%", "#x", "$HOME", " "])
def test_words_that_broke_shlex_quote(word: str) -> None:
    line = _sshconfig.ssh_word(word)
    assert read_back(line) == [word]


@pytest.mark.parametrize(("command", "broken"), [
    ("hopcat -x socks5h://dom%5Cuser@p %h %p", "%5 is not one of ssh's %-tokens"),
    ("hopcat 100%", "a % at the end"),
])
def test_percent_expand_fails_as_ssh_does(command: str, broken: str) -> None:
    with pytest.raises(_sshconfig._Broken, match=broken):
        _sshconfig.percent_expand(command, {"h": "H", "p": "22"})


def test_idle_timeout_in_a_relay_stanza_comes_with_a_note() -> None:
    pattern, no_fdpass, options = _sshconfig._split_arguments(
        ["-x", "socks5h://p", "-w", "600", "--no-fdpass"])
    notes = _sshconfig.stanza(pattern, no_fdpass, options)[1]
    assert any(note.startswith("-w 600: hopcat will end an ssh session") for note in notes)
