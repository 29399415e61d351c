"""Proxy passwords where there is no terminal to type them into, as VS Code or Sourcetree run ssh:
--proxy-password-file, --proxy-password-command and askpass programs, through the hopcat command
against real proxies (tinyproxy with Basic, microsocks with RFC 1929).

hopcat runs in a session of its own (setsid): without a terminal, or with a pseudo-terminal
made its controlling terminal, which the test types into. The password never shows on any
process's argv or environment in that session (read from /proc while hopcat waits for its
askpass), nor in -v.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import peers
import pytest

from support import HOPCAT, clean_env, closed_port

ASKPASS_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE")
PAYLOAD = b"through the proxy " * 64


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in ASKPASS_VARIABLES}
    env.update(extra)
    return env


def _user_url(proxy: peers.Daemon, scheme: str) -> str:
    """The proxy's URL with its user and without its password."""
    return f"{scheme}://{peers.PEER_USER}@{proxy.hostport}"


def _secret_file(tmp_path: Path, password: str, mode: int = 0o600) -> str:
    path = tmp_path / "proxy-password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return str(path)


def _through(args: list[str], target: peers.FramedEcho, env: dict[str, str]) -> str:
    """One framed exchange through hopcat -v started without a terminal; its stderr."""
    proc = subprocess.Popen(
        [*HOPCAT, "-v", *args, target.host, str(target.port)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        proc.stdin.write(peers.frame(PAYLOAD))
        proc.stdin.flush()
        answer = proc.stdout.read(peers.FRAME_REPLY)
        proc.stdin.close()  # only now: tinyproxy and microsocks drop the tunnel at a FIN
        proc.stdout.read()
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    assert answer == peers.frame_reply(PAYLOAD), err
    assert peers.PEER_PASSWORD not in err, err
    return err


def test_password_file_gets_through_and_beats_the_environment(
    tinyproxy_auth: peers.Daemon, framed_echo: peers.FramedEcho, tmp_path: Path
) -> None:
    path = _secret_file(tmp_path, peers.PEER_PASSWORD)
    err = _through(["-x", _user_url(tinyproxy_auth, "http"), "--proxy-password-file", path],
                   framed_echo, _env(HOPCAT_PROXY_PASSWORD="wrong"))  # fmt: skip
    assert f"password for {_user_url(tinyproxy_auth, 'http')} from --proxy-password-file" in err


def test_password_command_answers_each_hop_of_a_chain(
    microsocks_auth: peers.Daemon, tinyproxy_auth: peers.Daemon, framed_echo: peers.FramedEcho,
    tmp_path: Path,
) -> None:  # fmt: skip
    asked = tmp_path / "asked"
    script = tmp_path / "password-for-hop"
    script.write_text(f'#!/bin/sh\necho "$HOPCAT_PROXY_URL" >> {asked}\ncat {tmp_path}/secret\n')
    script.chmod(0o700)
    (tmp_path / "secret").write_text(peers.PEER_PASSWORD + "\n")
    hops = [_user_url(microsocks_auth, "socks5h"), _user_url(tinyproxy_auth, "http")]
    err = _through(["-x", hops[0], "-x", hops[1], "--proxy-password-command", str(script)],
                   framed_echo, _env())  # fmt: skip
    assert asked.read_text().splitlines() == hops
    for hop in hops:
        assert f"password for {hop} from --proxy-password-command" in err


# Run by hopcat as its askpass: records its argv, and the argv and environment of every process
# in its session (hopcat's, started with setsid) while hopcat waits for the answer.
ASKPASS_SCANNING_PROC = """#!{python}
import os, pathlib, sys
out = pathlib.Path({out!r})
(out / "argv").write_text(repr(sys.argv))
seen = []
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        if os.getsid(int(entry)) != os.getsid(0):
            continue
        seen.append((pathlib.Path(f"/proc/{{entry}}/cmdline").read_bytes(),
                     pathlib.Path(f"/proc/{{entry}}/environ").read_bytes()))
    except OSError:
        pass
(out / "processes").write_text(repr(seen))
sys.stdout.write((out / "secret").read_text())
"""


def test_askpass_without_a_terminal_and_the_password_on_no_argv(
    tinyproxy_auth: peers.Daemon, framed_echo: peers.FramedEcho, tmp_path: Path
) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text(ASKPASS_SCANNING_PROC.format(python=sys.executable, out=str(tmp_path)))
    askpass.chmod(0o700)
    (tmp_path / "secret").write_text(peers.PEER_PASSWORD + "\n")
    url = _user_url(tinyproxy_auth, "http")
    # ssh's own route: SSH_ASKPASS with a display and no terminal.
    err = _through(["-x", url], framed_echo, _env(SSH_ASKPASS=str(askpass), DISPLAY=":0"))
    assert f"password for {url} from the askpass program {askpass}" in err
    assert eval((tmp_path / "argv").read_text()) == [str(askpass), f"hopcat: password for {url}: "]
    processes = eval((tmp_path / "processes").read_text())
    commands = [cmdline.split(b"\0") for cmdline, _environ in processes]
    assert any(b"hopcat" in words for words in commands), commands  # hopcat itself was seen
    assert any(str(askpass).encode() in words for words in commands), commands
    for cmdline, environ in processes:
        assert peers.PEER_PASSWORD.encode() not in cmdline + environ


def _answer(tmp_path: Path, body: str) -> str:
    script = tmp_path / "askpass"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o700)
    return str(script)


def _start_on(terminal: int | None, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """hopcat in a new session, with ``terminal`` (a pty's slave) as its controlling terminal or
    with none; stdin and stdout are pipes, as ssh gives a ProxyCommand."""
    argv = [*HOPCAT, "-v", *args]
    pass_fds: tuple[int, ...] = ()
    if terminal is not None:
        argv = [sys.executable, "-c", "import fcntl, os, sys, termios; os.setsid(); "
                "fcntl.ioctl(int(sys.argv[1]), termios.TIOCSCTTY, 0); os.close(int(sys.argv[1])); "
                "os.execv(sys.argv[2], sys.argv[2:])", str(terminal), *argv]  # fmt: skip
        pass_fds = (terminal,)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, pass_fds=pass_fds,
                            start_new_session=terminal is None)  # fmt: skip


def _type_at_prompt(master: int, slave: int, text: bytes) -> None:
    """Wait for hopcat's prompt and for echo to go off, then type ``text``: typed earlier, it
    would be flushed (TCSAFLUSH) or echoed."""
    shown = b""
    deadline = time.monotonic() + 20
    while b"password for" not in shown and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            shown += os.read(master, 1024)
    assert b"password for" in shown, shown
    while termios.tcgetattr(slave)[3] & termios.ECHO and time.monotonic() < deadline:
        time.sleep(0.01)
    os.write(master, text)


@pytest.mark.parametrize(
    ("terminal", "environ", "source"),
    [
        (False, {"SSH_ASKPASS": "{askpass}", "DISPLAY": ":0"}, "askpass"),
        (False, {"SSH_ASKPASS": "{askpass}", "WAYLAND_DISPLAY": "wayland-0"}, "askpass"),
        (False, {"SSH_ASKPASS": "{askpass}"}, None),  # no display: ssh would not run it
        (False, {"SSH_ASKPASS": "{askpass}", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "never"}, None),
        (False, {"SSH_ASKPASS": "{askpass}", "SSH_ASKPASS_REQUIRE": "force"}, "askpass"),
        (False, {"HOPCAT_ASKPASS": "{askpass}"}, "askpass"),
        (False, {"HOPCAT_ASKPASS": "{askpass}", "SSH_ASKPASS": "/nonexistent", "DISPLAY": ":0"},
         "askpass"),
        (True, {"SSH_ASKPASS": "{askpass}", "DISPLAY": ":0"}, "terminal"),
        (True, {"SSH_ASKPASS": "{askpass}", "SSH_ASKPASS_REQUIRE": "force"}, "askpass"),
        (True, {"SSH_ASKPASS": "{askpass}", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "prefer"},
         "askpass"),
        (True, {"SSH_ASKPASS": "{askpass}", "SSH_ASKPASS_REQUIRE": "prefer"}, "terminal"),
        (True, {"HOPCAT_ASKPASS": "{askpass}"}, "terminal"),
    ],
)
def test_terminal_or_askpass_as_ssh_decides(
    tmp_path: Path, terminal: bool, environ: dict[str, str], source: str | None
) -> None:
    askpass = _answer(tmp_path, "echo from-askpass")
    env = _env(**{name: value.format(askpass=askpass) for name, value in environ.items()})
    master, slave = os.openpty() if terminal else (-1, -1)
    try:
        with closed_port() as port:
            url = f"http://alice@127.0.0.1:{port}"
            proc = _start_on(slave if terminal else None, ["-x", url, "192.0.2.1", "22"], env)
            if source == "terminal":
                _type_at_prompt(master, slave, b"typed\n")
            _out, err_bytes = proc.communicate(timeout=30)
    finally:
        if terminal:
            os.close(master)
            os.close(slave)
    err = err_bytes.decode()
    if source is None:
        assert proc.returncode == 64, err
        assert "a user is given but no password" in err and "HOPCAT_ASKPASS" in err, err
        return
    assert proc.returncode == 80, err  # the password was found; then the proxy was not there
    expected = f"the askpass program {askpass}" if source == "askpass" else "the terminal"
    assert f"password for {url} from {expected}" in err, err
    assert "from-askpass" not in err and "typed" not in err


def _fails(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    with closed_port() as port:
        result = subprocess.run(
            [*HOPCAT, "-x", f"http://alice@127.0.0.1:{port}", *args, "192.0.2.1", "22"],
            stdin=subprocess.PIPE, capture_output=True, env=env, timeout=30, start_new_session=True,
        )  # fmt: skip
    err = result.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1 and err.startswith("hopcat: proxy http://alice@127.0.0.1:"), err
    return result.returncode, err


@pytest.mark.parametrize(
    ("body", "words"),
    [("exit 1", "exited with status 1: no password"), ("echo", "printed no password")],
)
def test_a_cancelled_askpass_is_one_line_and_exit_77(tmp_path: Path, body: str, words: str) -> None:
    askpass = _answer(tmp_path, body)
    code, err = _fails([], _env(HOPCAT_ASKPASS=askpass))
    assert code == 77 and err.rstrip().endswith(f"(hop 1/1): the askpass program {askpass} {words}")


@pytest.mark.parametrize(
    ("command", "words"),
    [("exit 1", "--proxy-password-command exited with status 1: no password"),
     ("true", "--proxy-password-command printed no password"),
     ("no-such-password-program-here 2>/dev/null", "exited with status 127")],
)
def test_a_failing_password_command_is_one_line_and_exit_77(command: str, words: str) -> None:
    code, err = _fails(["--proxy-password-command", command], _env())
    assert code == 77 and words in err, err


def test_a_password_file_others_can_read_is_refused_before_any_dial(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "s3cret", 0o644)
    code, err = _fails(["--proxy-password-file", path], _env())
    assert code == 64, err
    assert f"--proxy-password-file {path}: permissions 0644 are too open" in err
    assert f"chmod 600 {path}" in err and "s3cret" not in err


def test_a_signal_while_the_askpass_is_open_ends_both(tmp_path: Path) -> None:
    """ssh ends its ProxyCommand with a signal when the user gives up: no dialog stays behind."""
    pid_file = tmp_path / "askpass-pid"
    askpass = _answer(tmp_path, f"echo $$ > {pid_file}; exec sleep 30")
    with closed_port() as port:
        proc = _start_on(None, ["-x", f"http://alice@127.0.0.1:{port}", "192.0.2.1", "22"],
                         _env(HOPCAT_ASKPASS=askpass))  # fmt: skip
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.decode().endswith("hopcat: terminated (SIGTERM)\n"), err
    askpass_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{askpass_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # reaped
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the askpass {askpass_pid} outlived hopcat")
