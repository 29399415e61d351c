"""The few fields of an X.509 certificate that -v shows, read from its DER form.

``SSLObject.getpeercert()`` decodes only a certificate that was verified; with --tls-insecure or
a pin it returns nothing, and a user checking an unknown server needs the subject most. The
standard library has no DER parser, so this walks the structure (RFC 5280 section 4.1) as far as
the subject and no further.
"""

from __future__ import annotations

# Attribute type OIDs (2.5.4.x, encoded) and the short names OpenSSL prints for them.
_NAMES = {b"\x55\x04\x03": "CN", b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU",
          b"\x55\x04\x06": "C", b"\x55\x04\x07": "L", b"\x55\x04\x08": "ST"}  # fmt: skip


def _element(data: bytes, at: int) -> tuple[int, bytes, int]:
    """(tag, contents, offset after it) of the element at ``at``."""
    tag = data[at]
    length = data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[at : at + count], "big")
        at += count
    return tag, data[at : at + length], at + length


def _children(data: bytes) -> list[tuple[int, bytes]]:
    items, at = [], 0
    while at < len(data):
        tag, contents, at = _element(data, at)
        items.append((tag, contents))
    return items


def _name(data: bytes) -> str:
    parts = []
    for _set_tag, rdn in _children(data):
        for _seq_tag, pair in _children(rdn):
            (_oid_tag, oid), (_value_tag, value) = _children(pair)[:2]
            label = _NAMES.get(oid)
            if label is not None:
                parts.append(f"{label}={value.decode('utf-8', 'replace')}")
    return ", ".join(parts)


def _time(tag: int, value: bytes) -> str:
    text = value.decode("ascii", "replace")
    if tag == 0x17:  # UTCTime: two-digit years, 1950-2049 (RFC 5280 section 4.1.2.5.1)
        text = ("19" if text[:2] >= "50" else "20") + text
    return f"{text[0:4]}-{text[4:6]}-{text[6:8]} {text[8:10]}:{text[10:12]}:{text[12:14]} UTC"


def summary(der: bytes) -> tuple[str, str, str]:
    """(subject, issuer, notAfter) as text; empty strings for what cannot be read."""
    try:
        _tag, certificate, _end = _element(der, 0)
        _tag, tbs, _end = _element(certificate, 0)
        fields = _children(tbs)
        if fields and fields[0][0] == 0xA0:  # [0] version, absent in v1 certificates
            fields = fields[1:]
        issuer, validity, subject = fields[2][1], fields[3][1], fields[4][1]
        not_after = _children(validity)[1]
        return _name(subject), _name(issuer), _time(*not_after)
    except (IndexError, ValueError):
        return "", "", ""
