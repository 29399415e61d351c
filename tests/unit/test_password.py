"""Password sources for hops with a user and no password: order, per-hop answers, the password
file's permission rule, the command's failure modes, and when an askpass runs (ssh's rules).

Real files and real /bin/sh commands, in process; tests/integration/test_passwords.py runs the
hopcat command without a terminal against real proxies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hopcat._url import ProxyURL, parse_proxy_url
from hopcat.cli import _sshconfig
from hopcat.cli._args import parse_args
from hopcat.cli._password import PasswordSources, askpass_plan, read_password_file
from hopcat.cli._proxy import fill_passwords
from hopcat.errors import ProxyAuthError, UsageError

WHERE = "proxy http://alice@p:3128 (hop 1/1)"


def _hop(url: str = "http://alice@p:3128") -> ProxyURL:
    return parse_proxy_url(url, origin="-x")


def _no_tty(_prompt: str) -> None:
    return None


def _password_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "proxy-password"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


# -- order ---------------------------------------------------------------------------------------

def test_options_beat_the_environment_and_the_environment_beats_the_prompt(tmp_path: Path) -> None:
    environ = {"HOPCAT_PROXY_PASSWORD": "from-env", "PATH": os.environ["PATH"]}
    notes: list[str] = []
    path = _password_file(tmp_path, b"from-file\n")
    sources = PasswordSources(environ, password_file=path, prompt=_no_tty, trace=notes.append)
    assert sources.password_for(_hop()) == "from-file"
    sources = PasswordSources(environ, password_command="echo from-command", prompt=_no_tty,
                              trace=notes.append)  # fmt: skip
    assert sources.password_for(_hop()) == "from-command"
    sources = PasswordSources(environ, prompt=lambda _p: "typed", trace=notes.append)
    assert sources.password_for(_hop()) == "from-env"
    sources = PasswordSources({}, prompt=lambda _p: "typed", trace=notes.append)
    assert sources.password_for(_hop()) == "typed"
    assert notes == [f"password for http://alice@p:3128 from {source}" for source in (
        "--proxy-password-file", "--proxy-password-command", "HOPCAT_PROXY_PASSWORD",
        "the terminal")]  # fmt: skip


def test_the_two_options_exclude_each_other_and_take_a_value() -> None:
    with pytest.raises(UsageError, match="exclude each other"):
        parse_args(["--proxy-password-file", "f", "--proxy-password-command", "c", "h", "1"])
    for flag in ("--proxy-password-file", "--proxy-password-command"):
        with pytest.raises(UsageError, match="non-empty"):
            parse_args([flag, "", "h", "1"])


def test_each_hop_of_a_chain_asks_the_command_for_its_own(tmp_path: Path) -> None:
    log = tmp_path / "asked"
    command = f'echo "$HOPCAT_PROXY_URL" >> {log}; echo "pw-$HOPCAT_PROXY_USER-$HOPCAT_PROXY_PORT"'
    hops = [_hop("socks5h://bob:given@a:1080"), _hop("socks5h://carol@b:1081"),
            _hop("http://dave@c:3128"), _hop("socks4://erin@d:1082")]  # fmt: skip
    notes: list[str] = []
    fill_passwords(hops, {"PATH": os.environ["PATH"]}, password_command=command, trace=notes.append,
                   prompt=_no_tty)  # fmt: skip
    assert [hop.password for hop in hops] == ["given", "pw-carol-1081", "pw-dave-3128", None]
    # Told which hop asks, by URLs that carry no password; the URL's own and SOCKS4 not asked.
    assert log.read_text().splitlines() == ["socks5h://carol@b:1081", "http://dave@c:3128"]
    assert all("pw-" not in note for note in notes) and len(notes) == 2


def test_a_password_file_serves_every_hop_and_is_read_once(tmp_path: Path) -> None:
    path = _password_file(tmp_path, b"shared\r\nsecond line\n")
    hops = [_hop("socks5h://bob@a:1080"), _hop("http://carol@b:3128")]
    fill_passwords(hops, {}, password_file=path, prompt=_no_tty)
    assert [hop.password for hop in hops] == ["shared", "shared"]


def test_options_without_a_hop_that_needs_them_are_noted(tmp_path: Path) -> None:
    notes: list[str] = []
    fill_passwords([_hop("http://p:3128")], {}, password_file="/nonexistent", trace=notes.append)
    assert notes == ["--proxy-password-file unused: no proxy has a user without a password "
                     "(write user@ in the proxy URL)"]  # fmt: skip


def test_no_source_at_all_is_a_usage_error_naming_the_hop_and_the_ways() -> None:
    with pytest.raises(UsageError) as caught:
        fill_passwords([_hop("socks5h://bob:pw@a:1080"), _hop()], {}, prompt=_no_tty)
    message = str(caught.value)
    assert message.startswith("proxy http://alice@p:3128 (hop 2/2): a user is given but no password")
    assert (caught.value.hop, caught.value.proxy) == (2, "http://alice@p:3128")
    for way in ("HOPCAT_PROXY_PASSWORD", "--proxy-password-file", "--proxy-password-command",
                "HOPCAT_ASKPASS"):
        assert way in message
    assert caught.value.exit_code == 64


# -- the password file ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("content", "password"),
    [(b"s3cret\n", "s3cret"), (b"s3cret", "s3cret"), (b"s3 cret \r\n", "s3 cret "),
     (b"\xc3\xa9t\xc3\xa9\nignored\n", "\u00e9t\u00e9")],
)
def test_the_first_line_of_the_file(tmp_path: Path, content: bytes, password: str) -> None:
    assert read_password_file(_password_file(tmp_path, content)) == password


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o666])
def test_a_file_others_can_open_is_refused(tmp_path: Path, mode: int) -> None:
    path = _password_file(tmp_path, b"s3cret\n", mode)
    with pytest.raises(UsageError) as caught:
        read_password_file(path)
    message = str(caught.value)
    assert message == (f"--proxy-password-file {path}: permissions {mode:04o} are too open "
                       f"(others can read or change it): chmod 600 {path}")  # fmt: skip
    assert "s3cret" not in message


def test_the_permission_rule_is_ssh_s_for_keys() -> None:
    from hopcat.cli._password import check_password_file_permissions as check

    mine, theirs = os.getuid(), os.getuid() + 1
    check("f", 0o100600, mine)
    check("f", 0o100400, mine)
    check("f", 0o100640, theirs)  # shared through its group by another owner: fine
    for mode, owner in ((0o100640, mine), (0o100604, mine), (0o100644, theirs)):
        with pytest.raises(UsageError, match="chmod 600"):
            check("f", mode, owner)


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "the first line is empty"), (b"\nsecond\n", "the first line is empty"),
     (b"\xff\xfe\n", "not valid UTF-8"), (b"x" * 70000, "too long")],
)
def test_a_file_without_a_usable_first_line(tmp_path: Path, content: bytes, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        read_password_file(_password_file(tmp_path, content))


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--proxy-password-file .*/nope: no such file"):
        read_password_file(str(tmp_path / "nope"))


# -- the password command ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("command", "words"),
    [("echo s3cret >&2; exit 3", "--proxy-password-command exited with status 3: no password"),
     ("true", "--proxy-password-command printed no password"),
     ("echo; echo s3cret", "--proxy-password-command printed no password"),
     ("printf '\\377\\n'", "not valid UTF-8"),
     ("kill -9 $$", "--proxy-password-command was killed by signal 9: no password")],
)
def test_a_command_that_gives_no_password_is_exit_77(command: str, words: str) -> None:
    sources = PasswordSources({"PATH": os.environ["PATH"]}, password_command=command,
                              prompt=_no_tty)  # fmt: skip
    with pytest.raises(ProxyAuthError) as caught:
        sources.password_for(_hop())
    assert caught.value.exit_code == 77
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ") and words in message and "s3cret" not in message


@pytest.mark.parametrize(
    "rest", ["sleep 30; echo late", "sleep 30 & exit 0"],  # the shell waits; the shell is gone
)
def test_a_command_that_overruns_is_stopped_with_everything_it_started(
    tmp_path: Path, rest: str
) -> None:
    pid_file = tmp_path / "pid"
    sources = PasswordSources({"PATH": os.environ["PATH"]}, prompt=_no_tty, command_timeout_s=0.5,
                              password_command=f"echo $$ > {pid_file}; {rest}")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ProxyAuthError, match=r"gave no password within 0\.5 s; stopped it"):
        sources.password_for(_hop())
    assert time.monotonic() - started < 10
    group = int(pid_file.read_text())
    # The shell and its sleep, the whole group, got SIGKILL; the orphaned sleep may stay a zombie
    # until whoever adopted it reaps it. SIGKILL takes effect at once, but not synchronously.
    deadline = time.monotonic() + 5
    while _live_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(group) == []


def _live_members(group: int) -> list[str]:
    live = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ... after "(comm)"
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(stat)
    return live


def test_a_command_gets_no_stdin() -> None:
    sources = PasswordSources({"PATH": os.environ["PATH"]}, prompt=_no_tty,
                              password_command="cat; echo after-eof")  # fmt: skip
    assert sources.password_for(_hop()) == "after-eof"


# -- askpass: when, which program, what it is given -----------------------------------------------

@pytest.mark.parametrize(
    ("environ", "plan"),
    [
        ({}, (None, False)),
        ({"SSH_ASKPASS": "/a"}, (None, False)),  # no display: ssh would not run it either
        ({"SSH_ASKPASS": "/a", "DISPLAY": ":0"}, ("/a", False)),
        ({"SSH_ASKPASS": "/a", "DISPLAY": ""}, (None, False)),
        ({"SSH_ASKPASS": "/a", "WAYLAND_DISPLAY": "wayland-0"}, ("/a", False)),
        ({"SSH_ASKPASS": "/a", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "never"}, (None, False)),
        ({"SSH_ASKPASS": "/a", "SSH_ASKPASS_REQUIRE": "force"}, ("/a", True)),
        ({"SSH_ASKPASS": "/a", "SSH_ASKPASS_REQUIRE": "FORCE"}, ("/a", True)),
        ({"SSH_ASKPASS": "/a", "SSH_ASKPASS_REQUIRE": "prefer"}, (None, False)),
        ({"SSH_ASKPASS": "/a", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "prefer"}, ("/a", True)),
        ({"SSH_ASKPASS": "/a", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "other"}, ("/a", False)),
        ({"HOPCAT_ASKPASS": "/h"}, ("/h", False)),
        ({"HOPCAT_ASKPASS": "/h", "SSH_ASKPASS": "/a", "DISPLAY": ":0"}, ("/h", False)),
        ({"HOPCAT_ASKPASS": "/h", "SSH_ASKPASS_REQUIRE": "prefer"}, ("/h", True)),
        ({"HOPCAT_ASKPASS": "/h", "SSH_ASKPASS_REQUIRE": "never"}, (None, False)),
    ],
)
def test_askpass_plan_follows_ssh(environ: dict[str, str], plan: tuple[str | None, bool]) -> None:
    assert askpass_plan(environ) == plan


def _askpass(tmp_path: Path, body: str) -> str:
    script = tmp_path / "askpass"
    script.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {tmp_path}/prompt\n"
                      f"env > {tmp_path}/env\n{body}\n")  # fmt: skip
    script.chmod(0o700)
    return str(script)


def test_without_a_terminal_the_askpass_answers_and_is_told_only_the_prompt(tmp_path: Path) -> None:
    program = _askpass(tmp_path, "echo s3cret")
    notes: list[str] = []
    sources = PasswordSources({"HOPCAT_ASKPASS": program}, prompt=_no_tty, trace=notes.append)
    assert sources.password_for(_hop()) == "s3cret"
    assert (tmp_path / "prompt").read_text() == "hopcat: password for http://alice@p:3128: "
    assert "HOPCAT_PROXY_URL=http://alice@p:3128\n" in (tmp_path / "env").read_text()
    assert notes == [f"password for http://alice@p:3128 from the askpass program {program}"]


def test_with_a_terminal_the_prompt_wins_unless_askpass_is_forced(tmp_path: Path) -> None:
    program = _askpass(tmp_path, "echo from-askpass")
    environ = {"SSH_ASKPASS": program, "DISPLAY": ":0"}
    assert PasswordSources(environ, prompt=lambda _p: "typed").password_for(_hop()) == "typed"
    environ["SSH_ASKPASS_REQUIRE"] = "force"
    asked: list[str] = []
    sources = PasswordSources(environ, prompt=lambda p: asked.append(p) or "typed")  # type: ignore[func-returns-value]
    assert sources.password_for(_hop()) == "from-askpass"
    assert asked == []


@pytest.mark.parametrize(
    ("body", "words"),
    [("exit 1", "exited with status 1: no password"), ("true", "printed no password")],
)
def test_a_cancelled_or_silent_askpass_is_exit_77(tmp_path: Path, body: str, words: str) -> None:
    program = _askpass(tmp_path, body)
    sources = PasswordSources({"HOPCAT_ASKPASS": program}, prompt=_no_tty)
    with pytest.raises(ProxyAuthError) as caught:
        sources.password_for(_hop())
    assert str(caught.value) == f"{WHERE}: the askpass program {program} {words}"


def test_an_askpass_that_cannot_run_is_exit_77(tmp_path: Path) -> None:
    sources = PasswordSources({"HOPCAT_ASKPASS": str(tmp_path / "missing")}, prompt=_no_tty)
    with pytest.raises(ProxyAuthError, match="could not be run: no such file or directory"):
        sources.password_for(_hop())


# -- ssh-config --check looks at the file as hopcat will ----------------------------------------

def test_ssh_config_check_names_a_too_open_password_file(tmp_path: Path) -> None:
    path = _password_file(tmp_path, b"s3cret\n", 0o644)
    argv = ["-x", "http://alice@127.0.0.1:3128", "--proxy-password-file", path, "h", "22"]
    with pytest.raises(_sshconfig._Broken, match=f"chmod 600 {path}"):
        _sshconfig._dry_run(argv, "h", "22", False, {})
    os.chmod(path, 0o600)
    assert [hop.label() for hop in _sshconfig._dry_run(argv, "h", "22", False, {})] == [
        "http://alice@127.0.0.1:3128"]  # fmt: skip
