"""The 407 challenge flow against scripted HTTP proxies: what real proxies do that the loopback
daemons of tests/integration/test_corporate_proxies.py cannot be made to do on demand (close
after an NTLM challenge, offer SHA-256 Digest, a stale nonce on the first answer, chunked 407
bodies, LF-only heads), each answer checked with an independent computation here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import time

import pytest
from test_chain import BANNER, ScriptedProxy, proxy_factory, read_head, tunnel, until_closed

from hopcat import aio
from hopcat._url import parse_proxy_url
from hopcat.errors import ProxyAuthError

__all__ = ["proxy_factory"]  # the fixture, imported for this module's tests

OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


def challenge(scheme_line: str, *, close: bool = False, body: bytes = b"denied") -> bytes:
    framing = "Connection: close\r\n" if close else f"Content-Length: {len(body)}\r\n"
    return (
        f"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: {scheme_line}\r\n"
        f"{framing}\r\n"
    ).encode() + (b"" if close else body)


def digest_params(value: str) -> dict[str, str]:
    """The name=value pairs of a Digest answer (this test's own reading of RFC 7616)."""
    assert value.startswith("Digest ")
    params = {}
    for part in value[len("Digest "):].split(", "):
        name, _, raw = part.partition("=")
        params[name] = raw[1:-1] if raw.startswith('"') else raw
    return params


def digest_expected(params: dict[str, str], password: str, algorithm: str = "MD5") -> str:
    hash_name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm]

    def h(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    ha1 = h(f"{params['username']}:{params['realm']}:{password}")
    ha2 = h(f"CONNECT:{params['uri']}")
    return h(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:{params['qop']}:{ha2}")


def test_probe_first_then_basic_on_the_same_connection(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    seen: list[str | None] = []

    def script(conn: socket.socket) -> None:
        seen.append(header(read_head(conn), "Proxy-Authorization"))
        conn.sendall(challenge('Basic realm="x"', body=b"x" * 3000))
        seen.append(header(read_head(conn), "Proxy-Authorization"))
        conn.sendall(OK + BANNER)
        until_closed(conn)

    proxy = proxy_factory(script)
    lines: list[str] = []
    result = tunnel([proxy.url("http", "alice:s3cret%20pass@")], trace=lines.append)
    result.sock.close()
    expected = "Basic " + base64.b64encode(b"alice:s3cret pass").decode()
    assert seen == [None, expected] and proxy.accepted == 1 and result.trailing == BANNER
    text = "\n".join(lines)
    assert "it offers Basic" in text and "authenticated with Basic, 1 TCP connection" in text
    assert "s3cret" not in text


def test_a_proxy_that_closes_after_its_407_is_answered_on_a_new_connection(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    answers: list[dict[str, str]] = []

    def first(conn: socket.socket) -> None:  # ncat: HTTP/1.0, no length, close
        read_head(conn)
        conn.sendall(b'HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic '
                     b'realm="Ncat"\r\nProxy-Authenticate: Digest realm="Ncat", nonce="n1", '
                     b'qop="auth"\r\n\r\n')

    def second(conn: socket.socket) -> None:
        value = header(read_head(conn), "Proxy-Authorization") or ""
        answers.append(digest_params(value))
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + BANNER)
        until_closed(conn)

    proxy = proxy_factory(first, second)
    result = tunnel([proxy.url("http", "alice:s3cret@")], host="::1", port=2222)
    result.sock.close()
    (params,) = answers
    assert proxy.accepted == 2 and params["uri"] == "[::1]:2222" and params["nc"] == "00000001"
    assert params["response"] == digest_expected(params, "s3cret")


def test_the_asyncio_driver_reconnects_too(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def first(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Basic realm="x"', close=True))

    def second(conn: socket.socket) -> None:
        assert (header(read_head(conn), "Proxy-Authorization") or "").startswith("Basic ")
        conn.sendall(OK + BANNER)
        until_closed(conn)

    proxy = proxy_factory(first, second)

    async def main() -> bytes:
        reader, writer = await aio.open_connection(
            "target.test", 22, via=proxy.url("http", "alice:pw@"), timeout=10
        )
        data = await reader.readexactly(len(BANNER))
        writer.close()
        return data

    assert asyncio.run(main()) == BANNER and proxy.accepted == 2


def test_a_wrong_password_is_one_answer_and_exit_77(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    requests: list[bytes] = []

    def script(conn: socket.socket) -> None:
        while True:
            requests.append(read_head(conn))
            conn.sendall(challenge('Digest realm="r", nonce="abc", qop="auth"'))

    proxy = proxy_factory(script)
    with pytest.raises(ProxyAuthError) as info:
        tunnel([proxy.url("http", "alice:wrong@")])
    assert len(requests) == 2 and proxy.accepted == 1
    assert info.value.exit_code == 77
    assert str(info.value).endswith(
        "HTTP 407 Proxy Authentication Required (proxy wants Digest; credentials rejected) "
        "for target.test:22"
    )
    assert "wrong" not in str(info.value)


def test_a_stale_nonce_is_answered_once_more_without_asking(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    nonces: list[str] = []

    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Digest realm="r", nonce="old", qop="auth"'))
        nonces.append(digest_params(header(read_head(conn), "Proxy-Authorization") or "")["nonce"])
        conn.sendall(challenge('Digest realm="r", nonce="new", qop="auth", stale=true'))
        params = digest_params(header(read_head(conn), "Proxy-Authorization") or "")
        nonces.append(params["nonce"])
        assert params["response"] == digest_expected(params, "pw")
        conn.sendall(OK)
        until_closed(conn)

    proxy = proxy_factory(script)
    tunnel([proxy.url("http", "alice:pw@")]).sock.close()
    assert nonces == ["old", "new"]


def test_sha256_digest_is_preferred_over_md5(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    answers: list[dict[str, str]] = []

    def script(conn: socket.socket) -> None:
        read_head(conn)
        body = b"no"
        conn.sendall(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Digest realm="r", nonce="n", qop="auth", algorithm=MD5\r\n'
            b'Proxy-Authenticate: Digest realm="r", nonce="n", qop="auth", algorithm=SHA-256, '
            b'opaque="op"\r\nContent-Length: 2\r\n\r\n' + body
        )
        answers.append(digest_params(header(read_head(conn), "Proxy-Authorization") or ""))
        conn.sendall(OK)
        until_closed(conn)

    proxy = proxy_factory(script)
    tunnel([proxy.url("http", "alice:pw@")]).sock.close()
    (params,) = answers
    assert params["algorithm"] == "SHA-256" and params["opaque"] == "op"
    assert params["response"] == digest_expected(params, "pw", "SHA-256")


def test_ntlm_needs_one_connection_and_says_so(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    type2 = base64.b64encode(
        b"NTLMSSP\x00\x02\x00\x00\x00" + bytes(8) + b"\x05\x82\x8a\xa2" + bytes(range(8)) + bytes(16)
    ).decode()

    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge("NTLM"))
        assert (header(read_head(conn), "Proxy-Authorization") or "").startswith("NTLM TlRMTVNT")
        conn.sendall(challenge(f"NTLM {type2}", close=True))

    proxy = proxy_factory(script)
    with pytest.raises(ProxyAuthError) as info:
        tunnel([proxy.url("http", "CORP%5Calice:pw@")])
    assert "closed the connection during the NTLM handshake" in str(info.value)
    assert proxy.accepted == 1


def test_chunked_407_bodies_and_lf_only_heads_are_drained(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b'HTTP/1.1 407 Auth\nProxy-Authenticate: Basic realm="x"\n'
                     b"Transfer-Encoding: chunked\n\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\n\n" + BANNER)
        until_closed(conn)

    proxy = proxy_factory(script)
    result = tunnel([proxy.url("http", "alice:pw@")], exact=True)
    with socket.socket(fileno=result.sock.detach()) as sock:
        sock.settimeout(5)
        assert result.trailing == b"" and sock.recv(100) == BANNER
    assert proxy.accepted == 1


def test_pinned_basic_goes_up_front(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    seen: list[str | None] = []

    def script(conn: socket.socket) -> None:
        seen.append(header(read_head(conn), "Proxy-Authorization"))
        conn.sendall(OK)
        until_closed(conn)

    proxy = proxy_factory(script)
    hop = parse_proxy_url(proxy.url("http", "alice:pw@"))
    hop.auth_schemes = ("basic",)
    from hopcat.net.chain import open_tunnel

    open_tunnel([hop], "target.test", 22, deadline=time.monotonic() + 10).sock.close()
    assert seen == ["Basic " + base64.b64encode(b"alice:pw").decode()]


def test_restricted_schemes_name_what_was_offered(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Basic realm="x"', close=True))

    proxy = proxy_factory(script)
    hop = parse_proxy_url(proxy.url("http", "alice:pw@"))
    hop.auth_schemes = ("digest", "ntlm")
    from hopcat.net.chain import open_tunnel

    with pytest.raises(ProxyAuthError) as info:
        open_tunnel([hop], "target.test", 22, deadline=time.monotonic() + 10)
    assert "proxy wants Basic; --proxy-auth-scheme allows only digest, ntlm" in str(info.value)
    assert proxy.accepted == 1


def test_negotiate_without_a_gssapi_library_falls_back(proxy_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOPCAT_GSSAPI_LIBRARY", "/nonexistent/libgssapi.so")

    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\n"
            b'Proxy-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n'
        )
        assert (header(read_head(conn), "Proxy-Authorization") or "").startswith("Basic ")
        conn.sendall(OK)
        until_closed(conn)

    proxy = proxy_factory(script)
    lines: list[str] = []
    tunnel([proxy.url("http", "alice:pw@")], trace=lines.append).sock.close()
    assert any("Negotiate skipped: no GSSAPI library" in line for line in lines)


def test_no_user_names_the_fix(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Basic realm="x"'))
        until_closed(conn)

    proxy = proxy_factory(script)
    with pytest.raises(ProxyAuthError) as info:
        tunnel([proxy.url("http")])
    assert "no user was given (put USER@ in the proxy URL)" in str(info.value)


def test_the_proxy_keeps_asking_is_bounded(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        while True:
            read_head(conn)
            conn.sendall(challenge('Digest realm="r", nonce="n", qop="auth", stale=true'))

    proxy: ScriptedProxy = proxy_factory(script)
    with pytest.raises(ProxyAuthError):
        tunnel([proxy.url("http", "alice:pw@")])
    assert proxy.accepted == 1


def test_the_library_restricts_schemes_per_proxy(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    import hopcat

    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Basic realm="x"'))
        until_closed(conn)

    proxy = proxy_factory(script)
    via = hopcat.Proxy.from_url(proxy.url("http", "alice:pw@"), auth_schemes="digest")
    with pytest.raises(ProxyAuthError) as info:
        hopcat.create_connection(("target.test", 22), timeout=10, via=via)
    assert "--proxy-auth-scheme allows only digest" in str(info.value)
    with pytest.raises(ValueError, match="unknown scheme"):
        hopcat.Proxy.from_url("http://h:1", auth_schemes="kerberos")
    with pytest.raises(ValueError, match="for HTTP proxies"):
        hopcat.Proxy.from_url("socks5h://h:1", auth_schemes="basic")


def test_a_chain_crossed_again_answers_the_first_proxy_afresh(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """Hop 2 closes after its 407, so hop 1 (Digest, keep-alive) is crossed again on a new
    connection: its new 407 is a new challenge, not a refusal of the answer that worked."""
    from support import relay

    def hop2_first(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b'HTTP/1.0 407 Auth\r\nProxy-Authenticate: Basic realm="2"\r\n\r\n')

    def hop2_second(conn: socket.socket) -> None:
        assert (header(read_head(conn), "Proxy-Authorization") or "").startswith("Basic ")
        conn.sendall(OK + BANNER)
        until_closed(conn)

    second = proxy_factory(hop2_first, hop2_second)

    def hop1(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(challenge('Digest realm="1", nonce="n", qop="auth"'))
        assert (header(read_head(conn), "Proxy-Authorization") or "").startswith("Digest ")
        conn.sendall(OK)
        with socket.create_connection(("127.0.0.1", second.port)) as upstream:
            relay(conn, upstream)

    first = proxy_factory(hop1)
    lines: list[str] = []
    result = tunnel([first.url("http", "a:pw@"), f"http://b:pw@127.0.0.1:{second.port}"],
                    trace=lines.append)  # fmt: skip
    result.sock.close()
    assert result.trailing == BANNER and first.accepted == 2 and second.accepted == 2
    assert "hop 2/2: CONNECT target.test:22: HTTP/1.1 200 Connection established" in "\n".join(lines)
