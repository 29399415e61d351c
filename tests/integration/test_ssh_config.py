"""hopcat ssh-config: the stanza it prints, and --check reading it back through ssh -G."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import run_hopcat


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


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed (apt-get install openssh-client)")
def test_check_reads_the_stanza_back_through_ssh(tmp_path: Path) -> None:
    made = run_hopcat("ssh-config", "--host", "*.internal", "-x", "socks5h://127.0.0.1:1080")
    config = tmp_path / "config"
    config.write_bytes(made.stdout)
    used = run_hopcat("ssh-config", "--check", "git.internal", "--config", str(config))
    assert used.returncode == 0, used.stderr
    assert used.stdout.decode().startswith("git.internal: ssh uses hopcat (")
    assert used.stdout.decode().rstrip().endswith("via socks5h://127.0.0.1:1080; ProxyUseFdpass yes")
    direct = run_hopcat("ssh-config", "--check", "example.org", "--config", str(config))
    assert direct.returncode == 1
    assert direct.stdout == b"example.org: ssh connects directly (no ProxyCommand)\n"
