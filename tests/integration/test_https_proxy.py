"""An https:// proxy: TLS to the proxy (socat's OPENSSL-LISTEN in front of tinyproxy)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from test_proxies import download, framed_upload

from support import make_certificates, pattern, run_hopcat


@pytest.fixture
def https_proxy(tinyproxy: peers.Daemon, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    ca, crt, key = make_certificates(tmp_path)
    try:
        socat = peers.start_socat_tls(tmp_path / "socat", tinyproxy, crt, key)
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield socat.port, ca
    finally:
        socat.stop()


def test_https_proxy_verified_with_cacert(https_proxy: tuple[int, Path],
                                          framed_echo: peers.FramedEcho, source_server) -> None:  # type: ignore[no-untyped-def]
    port, ca = https_proxy
    # -q 0: stdin EOF is not passed on through TLS (see README), so quit at it once answered.
    args = ["-q", "0", "--proxy-cacert", str(ca), "-x", f"https://127.0.0.1:{port}"]
    framed_upload(args, framed_echo, size=4 << 20)
    data = pattern(4 << 20, 31)
    download(args, source_server(data), data)


def test_https_proxy_untrusted_certificate(https_proxy: tuple[int, Path],
                                           framed_echo: peers.FramedEcho) -> None:
    port, _ca = https_proxy
    result = run_hopcat("-x", f"https://127.0.0.1:{port}", framed_echo.host, str(framed_echo.port))
    assert result.returncode == 76, result.stderr
    err = result.stderr.decode()
    assert err.startswith(f"hopcat: proxy https://127.0.0.1:{port} (hop 1/1): TLS certificate not trusted")
    assert "--proxy-cacert" in err and err.count("\n") == 1


def test_https_proxy_insecure(https_proxy: tuple[int, Path], framed_echo: peers.FramedEcho) -> None:
    port, _ca = https_proxy
    framed_upload(["-q", "0", "--proxy-insecure", "-x", f"https://127.0.0.1:{port}"], framed_echo,
                  size=1 << 20)


def test_http_scheme_to_a_tls_proxy_gets_a_hint(https_proxy: tuple[int, Path],
                                                framed_echo: peers.FramedEcho) -> None:
    port, _ca = https_proxy
    result = run_hopcat("--connect-timeout", "10", "-x", f"http://127.0.0.1:{port}",
                        framed_echo.host, str(framed_echo.port), timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 76, err
    assert err.count("\n") == 1 and "internal error" not in err
    assert err.endswith("this looks like a TLS proxy: use https://\n"), err


@pytest.mark.parametrize("content", [None, "not a PEM file\n"])
def test_bad_cacert_is_a_usage_error(https_proxy: tuple[int, Path], framed_echo: peers.FramedEcho,
                                     tmp_path: Path, content: str | None) -> None:
    port, _ca = https_proxy
    cafile = tmp_path / "bad.pem"
    if content is not None:
        cafile.write_text(content)
    result = run_hopcat("--proxy-cacert", str(cafile), "-x", f"https://127.0.0.1:{port}",
                        framed_echo.host, str(framed_echo.port))
    err = result.stderr.decode()
    assert result.returncode == 64, err
    assert err.startswith(f"hopcat: --proxy-cacert {cafile}: ") and err.count("\n") == 1


def test_aio_origin_certificate_checked_inside_the_proxys_tls(
    https_proxy: tuple[int, Path], tmp_path: Path
) -> None:
    """TLS to the target inside an https:// proxy's TLS: an origin the caller does not trust is
    a certificate error (an OSError), also on Pythons where asyncio's nested TLS abort raises a
    TypeError instead (CPython gh-113214)."""
    import asyncio
    import ssl
    import threading

    import hopcat.aio

    port, proxy_ca = https_proxy
    (tmp_path / "origin").mkdir()
    _origin_ca, crt, key = make_certificates(tmp_path / "origin")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(crt, key)
    listener = socket.create_server(("127.0.0.1", 0))
    origin_port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                server_context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate: expected

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()

    async def fetch() -> None:
        await hopcat.aio.open_connection(
            "127.0.0.1", origin_port, via=f"https://127.0.0.1:{port}", timeout=10,
            proxy_ssl=ssl.create_default_context(cafile=str(proxy_ca)),
            ssl=ssl.create_default_context(),
        )  # fmt: skip

    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(fetch())
    finally:
        listener.close()
        thread.join(10)
