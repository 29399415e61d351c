"""hopcat ssh-config with the real ssh: the stanza it prints, ssh reading it (tokenizer,
%-tokens, shell) and connecting through a real proxy, and --check replaying what ssh does.

The awkward cases are real: a proxy user whose URL is percent-encoded (``dom\\us'er %``, as a
Windows domain account is), and hopcat installed under a directory whose name has a blank, a
quote, ``#``, ``$`` and ``%``, every one of which ssh or the shell would otherwise change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest

import hopcat
from hopcat.cli._sshconfig import ssh_word
from support import clean_env, run_hopcat

ROOT = Path(__file__).resolve().parents[2]
AWKWARD_DIR = "my tools' #1 $HOME 100%"
PROXY_USER = "dom\\us'er %"
PROXY_PASSWORD = "pw %s 'x'"
needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None,
                               reason="OpenSSH client not installed (apt-get install openssh-client)")


def test_stanza_uses_fdpass_and_never_writes_the_password() -> None:
    result = run_hopcat("ssh-config", "--host", "*.corp", "-x", "socks5h://alice:s3cret@127.0.0.1:1080")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    lines = text.splitlines()
    assert lines[0] == "Host *.corp"
    assert lines[1].startswith("    ProxyCommand /")
    assert lines[1].endswith(" -x socks5h://alice@127.0.0.1:1080 -F %h %p")
    assert lines[2] == "    ProxyUseFdpass yes"
    assert "s3cret" not in text and b"s3cret" not in result.stderr
    assert b"HOPCAT_PROXY_PASSWORD" in result.stderr


def test_https_hop_gets_no_fdpass() -> None:
    result = run_hopcat("ssh-config", "-x", "https://proxy.example:443")
    assert result.returncode == 0
    assert b"ProxyUseFdpass" not in result.stdout and b" -F " not in result.stdout
    assert b"TLS session" in result.stderr


def test_ssh_config_rejects_operands() -> None:
    result = run_hopcat("ssh-config", "-x", "socks5h://p", "host", "22")
    assert result.returncode == 64
    assert result.stderr == b"hopcat: ssh-config takes no HOST PORT: ssh fills in %h %p\n"


def test_refused_option_says_why() -> None:
    result = run_hopcat("ssh-config", "-x", "socks5h://p", "-d")
    assert result.returncode == 64
    assert result.stderr.startswith(b"hopcat: ssh-config: -d/--no-stdin does not belong in a "
                                    b"ProxyCommand: ")


# --------------------------------------------------------------------------- with the real ssh


@pytest.fixture
def installed_hopcat(tmp_path: Path) -> Path:
    """The shipped bin/hopcat, installed as pip would (#! this interpreter) in AWKWARD_DIR."""
    directory = tmp_path / AWKWARD_DIR
    directory.mkdir()
    script = directory / "hopcat"
    body = (ROOT / "bin" / "hopcat").read_text().split("\n", 1)[1]
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    return script


def hopcat_env(**extra: str) -> dict[str, str]:
    """Where the hopcat under test can be imported from, for ssh's ProxyCommand too."""
    return clean_env(PYTHONPATH=str(Path(hopcat.__file__).parents[1]), **extra)


def check(config: Path, host: str = "x") -> subprocess.CompletedProcess[bytes]:
    return run_hopcat("ssh-config", "--check", host, "--config", str(config), env=hopcat_env())


@needs_ssh
def test_awkward_words_reach_the_program_as_written(tmp_path: Path) -> None:
    """ssh's own tokenizer, its %-expansion and the shell all leave each word as it was."""
    dump = tmp_path / AWKWARD_DIR / "dump"
    dump.parent.mkdir()
    out = tmp_path / "argv.json"
    dump.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    dump.chmod(0o755)
    words = ["dom\\", "a'b", "it's\\'", "100%", "%h", "#x", "$HOME", "${HOME}", "`id`", " two  words ",
             '"q"', "*", "~", "", "tab\there", "ünï"]
    line = " ".join(ssh_word(w) for w in [str(dump), *words]) + " %h %p"
    config = tmp_path / "config"
    config.write_text(f"Host x\n    HostName 127.0.0.1\n    ProxyCommand {line}\n")
    subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "x", "true"],
                   capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert json.loads(out.read_text()) == [*words, "127.0.0.1", "22"]


@pytest.fixture
def awkward_proxy(tmp_path: Path) -> Iterator[peers.Daemon]:
    """microsocks whose one user is PROXY_USER (its URL is percent-encoded)."""
    microsocks = shutil.which("microsocks")
    if microsocks is None:
        pytest.skip("microsocks not installed (apt-get install microsocks)")
    daemon = peers.start_daemon(
        "microsocks", tmp_path / "microsocks",
        lambda port: [microsocks, "-i", "127.0.0.1", "-p", str(port), "-u", PROXY_USER,
                      "-P", PROXY_PASSWORD],
        scheme="socks5",
    )
    try:
        yield daemon
    finally:
        daemon.stop()


# Every option ssh-config carries; with -F, the relay options are accepted and have no effect.
CARRIED = ["-4", "-s", "127.0.0.1", "-n", "--connect-timeout", "20", "-w", "120", "-q", "30",
           "-N", "--no-shutdown", "--keep-sending", "--keepalive", "--nagle", "--proxy-dns",
           "remote", "--no-proxy", "--proxy-insecure", "--debug", "-v"]


@needs_ssh
@pytest.mark.parametrize("mode", ["fdpass", "relay"])
def test_stanza_works_in_real_ssh_through_a_proxy(
    mode: str, sshd: peers.SshServer, awkward_proxy: peers.Daemon, installed_hopcat: Path,
    tmp_path: Path,
) -> None:
    cacert = installed_hopcat.parent / "ca bundle.pem"
    cacert.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    url = f"socks5h://dom%5Cus%27er%20%25@127.0.0.1:{awkward_proxy.port}"
    made = subprocess.run(
        [str(installed_hopcat), "ssh-config", "--host", "127.0.0.1", "-x", url, *CARRIED,
         "--proxy-cacert", str(cacert), *(["--no-fdpass"] if mode == "relay" else [])],
        capture_output=True, timeout=30, env=hopcat_env(),
    )
    assert made.returncode == 0, made.stderr
    text = made.stdout.decode()
    assert "dom%%5Cus%%27er%%20%%25@" in text and ("ProxyUseFdpass yes" in text) == (mode == "fdpass")
    config = tmp_path / "config"
    config.write_bytes(made.stdout)
    ssh = sshd.ssh_options()
    ssh[ssh.index("-F") + 1] = str(config)
    result = subprocess.run(
        [*ssh, sshd.destination, "echo", "through"], capture_output=True, timeout=120,
        stdin=subprocess.DEVNULL, env=hopcat_env(HOPCAT_PROXY_PASSWORD=PROXY_PASSWORD),
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"through\n"
    verdict = check(config, "127.0.0.1")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert verdict.stdout.decode().startswith(f"127.0.0.1: ssh uses hopcat ({installed_hopcat}) via ")


@needs_ssh
def test_check_reads_the_stanza_back_through_ssh(tmp_path: Path) -> None:
    made = run_hopcat("ssh-config", "--host", "*.internal", "-x", "socks5h://127.0.0.1:1080")
    config = tmp_path / "config"
    config.write_bytes(made.stdout)
    used = check(config, "git.internal")
    assert used.returncode == 0, used.stderr
    assert used.stdout.decode().startswith("git.internal: ssh uses hopcat (")
    assert used.stdout.decode().rstrip().endswith("via socks5h://127.0.0.1:1080; ProxyUseFdpass yes")
    direct = check(config, "example.org")
    assert direct.returncode == 1
    assert direct.stdout == b"example.org: ssh connects directly (no ProxyCommand)\n"


@needs_ssh
@pytest.mark.parametrize(
    ("proxy_command", "extra", "verdict"),
    [
        # What ssh-config wrote before: ssh stops at "%5" (percent_expand: unknown key).
        ("{hopcat} -x socks5h://dom%5Cuser@127.0.0.1:1080 -F %h %p", "ProxyUseFdpass yes",
         "%5 is not one of ssh's %-tokens"),
        # shlex.quote's spelling of a value ending in a backslash: ssh says "invalid quotes".
        ("{hopcat} -x 'socks5h://127.0.0.1:1080' --proxy-cacert '/tmp/ca\\' %h %p", "",
         "invalid quotes"),
        ("/opt/my tools/hopcat -x socks5h://127.0.0.1:1080 %h %p", "",
         "not the hopcat the command names"),
        ("{hopcat} -x socks5h://127.0.0.1:1080 %h %p", "ProxyUseFdpass yes", "without hopcat -F"),
        ("{hopcat} -x socks5h://127.0.0.1:1080 -F %h %p", "", "-F without ProxyUseFdpass"),
        ("{hopcat} -x socks5h://127.0.0.1:1080 #-F %h %p", "", "operands [] instead of"),
        ("{hopcat} -x socks5h://127.0.0.1:1080 %h", "", "operands ['x'] instead of"),
        ("{hopcat} -x https://127.0.0.1 -F %h %p", "ProxyUseFdpass yes", "-F with a TLS hop"),
        ("{hopcat} --proxy-dns nowhere -x socks5h://127.0.0.1:1080 %h %p", "", "would refuse"),
    ],
)
def test_check_reports_a_stanza_ssh_would_mangle(
    proxy_command: str, extra: str, verdict: str, installed_hopcat: Path, tmp_path: Path,
) -> None:
    command = proxy_command.format(hopcat=ssh_word(str(installed_hopcat)))
    config = tmp_path / "config"
    config.write_text(f"Host x\n    ProxyCommand {command}\n" + (f"    {extra}\n" if extra else ""))
    result = check(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.decode().startswith("x: broken: ")
    assert verdict in result.stdout.decode()


@needs_ssh
def test_check_follows_exec_env_and_the_shell(installed_hopcat: Path, tmp_path: Path) -> None:
    """Words the shell changes are checked as changed: $VAR expanded, exec and env looked past."""
    config = tmp_path / "config"
    config.write_text(f"Host x\n    ProxyCommand exec env ALL_PROXY=$PROXY_FOR_TEST "
                      f"{ssh_word(str(installed_hopcat))} %h %p\n")
    result = run_hopcat("ssh-config", "--check", "x", "--config", str(config),
                        env=hopcat_env(PROXY_FOR_TEST="socks5h://127.0.0.1:1081"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.decode().rstrip().endswith("via socks5h://127.0.0.1:1081; ProxyUseFdpass no")
