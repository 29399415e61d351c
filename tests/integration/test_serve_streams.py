"""``hopcat serve`` as a subprocess: client bytes that carry secrets never reach its log, and
a SOCKS5 request cut short is answered (issue 8, rules 14 and 16)."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable

from test_serve_support import ServeProcess, connect, socks5_address, wait_closed

Serve = Callable[..., ServeProcess]
SECRET = "s3cr3t-Xq"
TOKEN = base64.b64encode(f"alice:{SECRET}".encode()).decode()


def test_secrets_in_malformed_requests_stay_out_of_the_log(serve: Serve) -> None:
    server = serve("--auth", f"alice:{SECRET}")
    heads = [
        f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nProxy-Authorization : Basic {TOKEN}\r\n\r\n",
        f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nProxy-Authorization: Basic\r\n {TOKEN}\r\n\r\n",
        f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nproxy-authorization: Basic {TOKEN}\r\n"
        f"Proxy-Authorization: Basic {TOKEN}\r\n\r\n",
        f"CONNECT alice:{SECRET}@127.0.0.1:9 HTTP/1.1\r\n\r\n",
        f"GET http://alice:{SECRET}@example.com/ HTTP/1.1 x\r\n\r\n",
    ]
    for head in heads:
        with connect(server) as sock:
            sock.sendall(head.encode())
            assert wait_closed(sock).startswith(b"HTTP/1.1 400 "), head
    # A SOCKS5 host name carrying userinfo, after a good login: refused, logged redacted.
    with connect(server) as sock:
        auth = b"\x01\x05alice" + bytes((len(SECRET),)) + SECRET.encode()
        request = b"\x05\x01\x00" + socks5_address(f"alice:{SECRET}@nowhere.invalid", 80)
        sock.sendall(b"\x05\x01\x02" + auth + request)
        answer = wait_closed(sock)
        assert answer[:4] == b"\x05\x02\x01\x00" and answer[5] != 0, answer
    server.wait_log("nowhere.invalid")
    server.wait_log("result=protocol-error", count=len(heads))
    log = server.log()
    assert SECRET not in log and TOKEN not in log, log


def test_truncated_subnegotiation_is_answered(serve: Serve) -> None:
    server = serve("--auth", f"alice:{SECRET}")
    with connect(server) as sock:
        sock.sendall(b"\x05\x01\x02\x01\x05ali")
        sock.shutdown(socket.SHUT_WR)
        assert wait_closed(sock) == b"\x05\x02\x01\x01"
