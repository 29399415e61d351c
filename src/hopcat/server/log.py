"""Log lines on stderr: ``key=value`` text (logfmt) or one JSON object a line.

Every line has a timestamp (UTC, ms) and an ``event``: ``tunnel`` (one per client connection, at
its end), ``listen``, ``reload``, ``limit``, ``accept-error``, ``shutdown``, ``error``,
``metrics``; under ``--workers`` the supervisor's ``workers``, ``worker-start``, ``worker-exit``
and ``ready``, and every worker's lines carry ``worker=K`` after the event. Values
that came from a client (user names, host names, reasons quoting them) are escaped, so a line is
always one line; passwords are never handed to the logger at all, and as a last line of defence
every text value is redacted on its way out: a ``user:password@`` (in a CONNECT target, a URL, a
SOCKS host name) becomes ``***@`` and the credentials after an auth scheme name (``Basic ...``)
become ``***``, whichever code path quoted the client's bytes.

Lines are buffered and written once per event-loop iteration: a busy server does one write(2)
for many tunnels, not one each. The write is blocking, as for any daemon's stderr: send it to a
file or a reader that keeps up. Each write holds whole lines and at most ``PIPE_BUF`` bytes
(unless a single line is longer), so the lines of several processes sharing one stderr pipe or
log file (``--workers``) never interleave within a line.
"""

from __future__ import annotations

import json
import os
import re
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

# What a text value may hold unquoted; anything else is written as a JSON string.
_PLAIN = re.compile(r"[A-Za-z0-9\-._:/\[\]@+,*%~]+").fullmatch
MAX_VALUE_CHARS = 300
_USERINFO = re.compile(r"[^\s/@\"'\[\]]*:[^\s/@\"']*@")
_AUTH_TOKEN = re.compile(r"(?i)\b(basic|bearer|digest|negotiate|ntlm)(\s+)\S+")


def redact(text: str) -> str:
    """``text`` without credentials a client may have put in it (see the module docstring)."""
    if "@" in text:
        text = _USERINFO.sub("***@", text)
    if " " in text:
        text = _AUTH_TOKEN.sub(r"\1\2***", text)
    return text


def _text_value(value: object) -> str:
    if type(value) is int:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    text = redact(str(value))
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "..."
    if _PLAIN(text):
        return text
    return json.dumps(text)


class Logger:
    """``log(event, **fields)``; fields whose value is None are left out."""

    __slots__ = (
        "_fd", "_fields", "_format", "_lines", "_loop", "_scheduled", "_second", "clock", "quiet",
    )  # fmt: skip

    def __init__(
        self,
        *,
        fmt: str = "text",
        quiet: bool = False,
        fd: int = 2,
        clock: Callable[[], float] = time.time,
        fields: dict[str, object] | None = None,
    ) -> None:
        """``fields``: on every line, after the event (a worker's number)."""
        self._format = fmt
        self._fields = fields or {}
        self.quiet = quiet
        self._fd = fd
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, and its text
        self.clock = clock

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Buffer lines until the end of the loop iteration (None: write each line at once)."""
        self.flush()
        self._loop = loop

    def tunnel(self, **fields: object) -> None:
        if not self.quiet:
            self.log("tunnel", **fields)

    def _timestamp(self) -> str:
        """UTC with milliseconds; the part up to the second is formatted once a second."""
        now = self.clock()
        second = int(now)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int(now * 1000) % 1000:03d}Z"

    def log(self, event: str, **fields: object) -> None:
        stamp = self._timestamp()
        if self._fields:
            fields = self._fields | fields
        if self._format == "json":
            record: dict[str, object] = {"ts": stamp, "event": event}
            for key, value in fields.items():
                if value is not None:
                    if isinstance(value, float):
                        value = round(value, 3)
                    elif not isinstance(value, int | bool):
                        value = redact(str(value))[:MAX_VALUE_CHARS]
                    record[key] = value
            line = json.dumps(record, separators=(",", ":"))
        else:
            parts = [stamp, f"event={event}"]
            for key, value in fields.items():
                if value is not None:
                    parts.append(f"{key}={_text_value(value)}")
            line = " ".join(parts)
        self._lines.append(line)
        if self._loop is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        chunks: list[bytes] = []
        size = 0
        for line in self._lines:
            data = (line + "\n").encode("utf-8", "backslashreplace")
            if chunks and size + len(data) > select.PIPE_BUF:
                self._write(b"".join(chunks))
                chunks.clear()
                size = 0
            chunks.append(data)
            size += len(data)
        self._lines.clear()
        self._write(b"".join(chunks))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except BlockingIOError:
            pass  # a non-blocking stderr that is full: drop the rest rather than stall tunnels
        except OSError:
            pass  # stderr closed: keep serving
