"""TLSLayers on memory BIOs against an ssl.SSLObject peer: the half-close keeps every byte the
peer sent before it, whatever was still undecrypted when our close_notify went out."""

from __future__ import annotations

import shutil
import ssl

import pytest

from hopcat.net.tls import TLSLayers
from support import Certificates, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    return make_certificates(tmp_path_factory.mktemp("tls-layers"))


def _pair(
    certificates: Certificates, version: ssl.TLSVersion
) -> tuple[TLSLayers, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Our server session and a client's, handshake done: (layers, client, its in, its out)."""
    context = certificates.client_context()
    context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    layers = TLSLayers()
    layers.push(certificates.server_context(), None, label="client", server_side=True)
    done = [False, False]
    while not all(done):
        for index, step in enumerate((client.do_handshake, layers.handshake)):
            try:
                done[index] = step() is not False
            except ssl.SSLWantReadError:
                pass
        if outgoing.pending:
            layers.feed(outgoing.read())
        incoming.write(layers.wire_out())
    assert layers.innermost.version() == client.version()
    return layers, client, incoming, outgoing


def _read_all(layers: TLSLayers) -> bytes:
    buffer = bytearray(1000)  # smaller than what came: several reads
    data = bytearray()
    while count := layers.read_into(memoryview(buffer)):
        data += buffer[:count]
    return bytes(data)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["TLSv1.3", "TLSv1.2"])
def test_close_notify_keeps_what_came_before_it(
    certificates: Certificates, version: ssl.TLSVersion
) -> None:
    layers, client, incoming, outgoing = _pair(certificates, version)
    request = b"GET / HTTP/1.0\r\n\r\n" * 500
    client.write(request)
    layers.feed(outgoing.read())  # here, not yet read: unwrap() used to throw it away
    layers.close_notify()
    assert layers.buffered()
    incoming.write(layers.wire_out())
    assert client.read(10) == b""  # our close_notify
    client.write(b" and more after it")
    layers.feed(outgoing.read())
    layers.feed(b"")  # a FIN without close_notify
    assert _read_all(layers) == request + b" and more after it"
    assert layers.ended and layers.ragged_end


def test_close_notify_after_the_peer_ended_keeps_its_bytes_and_its_end(
    certificates: Certificates,
) -> None:
    layers, client, _incoming, outgoing = _pair(certificates, ssl.TLSVersion.TLSv1_3)
    client.write(b"last words")
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass
    layers.feed(outgoing.read())
    layers.close_notify()
    assert _read_all(layers) == b"last words"
    assert layers.ended and not layers.ragged_end
