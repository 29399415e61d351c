"""nc's -C: every bare LF of stdin goes out as CR LF, whatever the read boundaries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hopcat.cli._lines import to_crlf

LINE_BYTES = st.binary(max_size=64).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r"))


def test_examples() -> None:
    assert to_crlf(b"HELO x\nQUIT\r\n", False) == b"HELO x\r\nQUIT\r\n"
    assert to_crlf(b"\n", True) == b"\n"  # the CR came at the end of the previous read
    assert to_crlf(b"\n\n", False) == b"\r\n\r\n"
    assert to_crlf(b"no newline", False) == b"no newline"


@given(LINE_BYTES, LINE_BYTES)
def test_split_reads_give_the_same_bytes(first: bytes, second: bytes) -> None:
    whole = to_crlf(first + second, False)
    assert to_crlf(first, False) + to_crlf(second, first.endswith(b"\r")) == whole


@given(LINE_BYTES)
def test_no_bare_lf_and_nothing_else_changes(data: bytes) -> None:
    out = to_crlf(data, False)
    assert all(out[i - 1 : i] == b"\r" for i in range(len(out)) if out[i : i + 1] == b"\n")
    assert out.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
