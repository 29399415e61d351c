"""Start-up is a feature: the connect path imports only what it uses, also through the `hopcat`
command as an installer writes it."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import clean_env, exchange

ROOT = Path(__file__).resolve().parents[2]

# socket.py and enum cost ~10 ms together on this platform; _socket is all the client needs.
HEAVY = {"asyncio", "ssl", "argparse", "dataclasses", "typing", "logging", "re", "urllib.parse",
         "threading", "inspect", "encodings.idna", "getopt", "gettext", "socket", "enum",
         "selectors", "ipaddress", "subprocess", "h11"}


def _imported(args: list[str], **env: str) -> set[str]:
    """Modules a run imports; ``args`` after ``python``, or a whole argv when it is a script."""
    argv = args if os.path.isabs(args[0]) else [sys.executable, *args]
    proc = subprocess.run(argv, capture_output=True, timeout=30, input=b"",
                          env=clean_env(PYTHONPROFILEIMPORTTIME="1", **env))
    names = set()
    for line in proc.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_direct_connect_path_imports_nothing_heavy() -> None:
    baseline = _imported(["-c", "pass"])
    with exchange(b"hi") as server:
        loaded = _imported(["-m", "hopcat", server.host, str(server.port)])
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)
    assert {"hopcat.cli", "hopcat.net.dial", "hopcat.relay.pump"} <= added


def test_a_target_given_as_a_name_imports_nothing_heavy() -> None:
    baseline = _imported(["-c", "pass"])
    with exchange(b"hi") as server:
        loaded = _imported(["-m", "hopcat", "-4", "localhost", str(server.port)])
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)


def test_proxy_path_imports_nothing_heavy() -> None:
    baseline = _imported(["-c", "pass"])
    # The "proxy" hangs up at once: the run gets as far as the SOCKS5 handshake, then fails.
    with exchange(close_after_up=0) as proxy:
        loaded = _imported(["-m", "hopcat", "-x", f"socks5h://127.0.0.1:{proxy.port}",
                            "-x", "http://127.0.0.1:2", "127.0.0.1", "22"])
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)
    assert {"hopcat.net.chain", "hopcat.cli._proxy", "hopcat._environment", "hopcat.proto.socks5"} <= added


def test_a_password_from_a_file_imports_nothing_heavy(tmp_path: Path) -> None:
    """subprocess only comes in when a password command or an askpass runs."""
    secret = tmp_path / "password"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    baseline = _imported(["-c", "pass"])
    with exchange(close_after_up=0) as proxy:
        loaded = _imported(["-m", "hopcat", "-x", f"socks5h://alice@127.0.0.1:{proxy.port}",
                            "--proxy-password-file", str(secret), "127.0.0.1", "22"])
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)
    assert "hopcat.cli._password" in added


@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                    reason="build backend hatchling not installed (pip install hatchling)")
def test_installed_command_imports_nothing_heavy(tmp_path: Path) -> None:
    """The wheel ships bin/hopcat verbatim: what pip installs is that file, not a generated
    console script (the pip that python -m venv brings writes one that imports re first)."""
    subprocess.run(
        [sys.executable, "-c", f"from hatchling.build import build_wheel; build_wheel({str(tmp_path)!r})"],
        cwd=ROOT, check=True, capture_output=True, timeout=60, env=clean_env(),
    )
    (wheel,) = tmp_path.glob("hopcat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        scripts = [i for i in archive.infolist() if ".data/scripts/" in i.filename]
        assert [i.filename.rsplit("/", 1)[1] for i in scripts] == ["hopcat"]
        assert scripts[0].external_attr >> 16 & stat.S_IXUSR
        assert archive.read(scripts[0]).startswith(b"#!python\n")
        entry_points = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        assert not any(b"console_scripts" in archive.read(n) for n in entry_points)
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=60, env=clean_env(),
    )
    script = target / "bin" / "hopcat"
    assert script.read_bytes().startswith(f"#!{sys.executable}\n".encode())
    baseline = _imported(["-c", "pass"])
    with exchange(b"hi") as server:
        loaded = _imported([str(script), server.host, str(server.port)], PYTHONPATH=str(target))
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)
    assert {"hopcat.cli", "hopcat.net.dial", "hopcat.relay.pump"} <= added
