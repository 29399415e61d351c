"""hopcat.net.gssapi against a real MIT KDC, its tokens checked by Squid's Kerberos helper.

MIT's library reads KRB5_CONFIG and the ticket cache settings once per process, so every GSSAPI
call runs in a child Python with the realm's environment (``kdc.Realm.client_env()``); the child
prints what the test needs on stdout, one tagged line each. Printing the token is the test's
business: hopcat itself never shows one.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import kdc
import peers
import pytest

import hopcat

TIMEOUT_S = 30
SRC = str(Path(hopcat.__file__).resolve().parents[1])
SQUID_HELPER = "/usr/lib/squid/negotiate_kerberos_auth"

# One leg from the initiator; a second one when the acceptor's token comes back on stdin.
CLIENT = """\
import base64, sys
from hopcat.net import gssapi
try:
    with gssapi.NegotiateContext(sys.argv[1]) as ctx:
        print("TOKEN", base64.b64encode(ctx.step(None)).decode(), ctx.complete, flush=True)
        reply = sys.stdin.readline().strip()
        if reply:
            last = ctx.step(base64.b64decode(reply))
            print("FINAL", len(last), ctx.complete, flush=True)
    ctx.close()  # a second close does nothing
except gssapi.GSSAPIError as e:
    print("ERROR", e, flush=True)
"""


def child_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def run_client(host: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, host], env=child_env(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_token_is_spnego(krb5_realm: kdc.Realm) -> None:
    tag, token, complete = run_client("localhost", krb5_realm.client_env()).split()
    assert tag == "TOKEN"
    raw = base64.b64decode(token)
    # RFC 2743 section 3.1: [APPLICATION 0] wrapping the SPNEGO OID 1.3.6.1.5.5.2.
    assert raw[0] == 0x60
    assert b"\x06\x06\x2b\x06\x01\x05\x05\x02" in raw[:16]
    assert complete == "False"  # mutual authentication asked for: the acceptor has to answer


def test_squid_helper_accepts_token_and_its_answer_completes_the_context(
    krb5_realm: kdc.Realm,
) -> None:
    if not os.access(SQUID_HELPER, os.X_OK):
        pytest.skip(str(peers.PeerMissing(SQUID_HELPER, "squid")))
    with subprocess.Popen(
        [sys.executable, "-c", CLIENT, "localhost"], env=child_env(krb5_realm.client_env()),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as client:  # fmt: skip
        assert client.stdout is not None
        first = client.stdout.readline().split()
        assert first[0] == "TOKEN", first
        helper = subprocess.run(
            [SQUID_HELPER, "-s", krb5_realm.service_principal], input=f"YR {first[1]}\n",
            env=krb5_realm.server_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        # Squid 5's protocol: "OK token=<acceptor's token> user=<client principal> ..."
        answer = dict(f.split("=", 1) for f in helper.stdout.split()[1:] if "=" in f)
        assert helper.stdout.startswith("OK "), helper.stdout + helper.stderr
        assert answer["user"] == "alice@HOPCAT.TEST"
        out, err = client.communicate(answer["token"] + "\n", timeout=TIMEOUT_S)
    assert out.split() == ["FINAL", "0", "True"], err


def test_unknown_service_principal_is_named(krb5_realm: kdc.Realm) -> None:
    line = run_client("127.0.0.1", krb5_realm.client_env())
    assert line.startswith("ERROR GSSAPI: ")
    assert "HTTP/127.0.0.1@HOPCAT.TEST not found in Kerberos database" in line
    assert "\n" not in line


def test_no_ticket_is_about_credentials(krb5_realm: kdc.Realm) -> None:
    line = run_client("localhost", krb5_realm.no_ticket_env())
    assert line.startswith("ERROR GSSAPI: No credentials were supplied")


def test_library_override() -> None:
    # Importing the module costs no ctypes; a library that does not load, or is not GSSAPI,
    # counts as none, and NegotiateContext says so.
    script = """\
import sys
from hopcat.net import gssapi
assert "ctypes" not in sys.modules
print(gssapi.load_library(), gssapi.principal_hint("proxy.example"))
try:
    gssapi.NegotiateContext("localhost")
except gssapi.GSSAPIError as e:
    print(e)
"""
    for name in ("/nonexistent/libgssapi.so", "libc.so.6"):
        env = child_env(peers.peer_env()) | {"HOPCAT_GSSAPI_LIBRARY": name}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "None HTTP/proxy.example",
            "GSSAPI: no GSSAPI library could be loaded "
            "(install MIT Kerberos' libgssapi-krb5-2 or Heimdal's libgssapi3-heimdal)",
        ]
