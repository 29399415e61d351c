"""Properties of what hopcat reads about TLS without the ssl module's help (hypothesis).

- ``_x509.summary`` reads the subject, issuer and expiry -v shows from any certificate a peer
  sends, verified or not: any bytes give three strings, never an exception; a real certificate
  gives what openssl prints.
- ``--tls-pin`` takes a SHA-256 as hex (colons or not) or base64, the same digest either way;
  anything else is one usage error.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hopcat.errors import UsageError
from hopcat.net._x509 import summary
from hopcat.net.tls import parse_alpn, parse_min_version, parse_pin

SETTINGS = settings(max_examples=500, deadline=None)


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes_summarise_to_three_strings(der: bytes) -> None:
    result = summary(der)
    assert len(result) == 3 and all(isinstance(part, str) for part in result)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certificate made by openssl with a three-part subject."""
    if not shutil.which("openssl"):
        pytest.skip("openssl needed (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("x509")
    cert, key = directory / "c.pem", directory / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "3", "-subj", "/C=DE/O=Example Org/CN=host.example", "-keyout",
         str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


@SETTINGS
@given(noise=st.binary(min_size=1, max_size=40), at=st.integers(min_value=0, max_value=10_000))
def test_a_damaged_certificate_summarises_without_raising(
    sample: Path, noise: bytes, at: int
) -> None:
    der = ssl.PEM_cert_to_DER_cert(sample.read_text())
    at %= len(der)
    assert len(summary(der[:at] + noise + der[at + len(noise) :])) == 3


def test_a_real_certificate_reads_as_openssl_prints_it(sample: Path) -> None:
    subject, issuer, not_after = summary(ssl.PEM_cert_to_DER_cert(sample.read_text()))
    assert subject == issuer == "C=DE, O=Example Org, CN=host.example"
    printed = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-dateopt", "iso_8601",
                              "-in", str(sample)], capture_output=True, text=True, check=True)  # fmt: skip
    assert printed.stdout.strip() == f"notAfter={not_after.replace(' UTC', 'Z')}"


@SETTINGS
@given(st.binary(min_size=32, max_size=32), st.sampled_from(["sha256:", "SHA256:"]),
       st.booleans(), st.booleans())  # fmt: skip
def test_a_pin_reads_the_same_in_every_spelling(
    digest: bytes, prefix: str, colons: bool, upper: bool
) -> None:
    text = digest.hex().upper() if upper else digest.hex()
    if colons:
        text = ":".join(text[i : i + 2] for i in range(0, len(text), 2))
    assert parse_pin(prefix + text) == digest
    assert parse_pin(prefix + base64.b64encode(digest).decode()) == digest


@SETTINGS
@given(st.text(max_size=80))
def test_any_other_pin_text_is_one_usage_error(text: str) -> None:
    try:
        digest = parse_pin(text)
    except UsageError:
        return
    assert len(digest) == 32 and text.lower().startswith("sha256:")


def test_pin_matches_the_fingerprint_minus_v_prints() -> None:
    der = b"any certificate bytes"
    printed = hashlib.sha256(der).hexdigest().upper()
    assert parse_pin(f"sha256:{printed}") == hashlib.sha256(der).digest()


@pytest.mark.parametrize(("text", "value"), [("1.2", "1.2"), ("TLSv1.3", "1.3"), ("tls1.2", "1.2")])
def test_min_version_spellings(text: str, value: str) -> None:
    assert parse_min_version(text) == value


@pytest.mark.parametrize("text", ["1.1", "1.0", "3", "", "tls"])
def test_min_version_refuses_what_it_cannot_enforce(text: str) -> None:
    with pytest.raises(UsageError):
        parse_min_version(text)


def test_alpn_lists() -> None:
    assert parse_alpn("h2,http/1.1") == ("h2", "http/1.1")
    for bad in ("", "h2,", "h2,,x", "é", "x" * 256):
        with pytest.raises(UsageError):
            parse_alpn(bad)
