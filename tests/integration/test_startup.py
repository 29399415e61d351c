"""Start-up is a feature: the connect path imports only what it uses."""

from __future__ import annotations

import subprocess
import sys

from support import clean_env, exchange

# socket.py and enum cost ~10 ms together on this platform; _socket is all the client needs.
HEAVY = {"asyncio", "ssl", "argparse", "dataclasses", "typing", "logging", "re", "urllib.parse",
         "threading", "inspect", "encodings.idna", "getopt", "gettext", "socket", "enum",
         "selectors", "ipaddress", "subprocess"}


def _imported(args: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                          timeout=30, env=clean_env(), input=b"")
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


def test_proxy_path_imports_nothing_heavy() -> None:
    baseline = _imported(["-c", "pass"])
    # The "proxy" hangs up at once: the run gets as far as the SOCKS5 handshake, then fails.
    with exchange(close_after_up=0) as proxy:
        loaded = _imported(["-m", "hopcat", "-x", f"socks5h://127.0.0.1:{proxy.port}",
                            "-x", "http://127.0.0.1:2", "127.0.0.1", "22"])
    added = loaded - baseline
    assert not (added & HEAVY), sorted(added & HEAVY)
    assert {"hopcat.net.chain", "hopcat.cli._proxy", "hopcat.proto.socks5"} <= added
