"""Negotiate (RFC 4559) tokens from the system's GSSAPI library, called through ctypes.

Kerberos is not something to reimplement, and every machine with curl or ssh already has a
GSSAPI library (MIT's ``libgssapi_krb5.so.2`` on Linux, Heimdal's elsewhere, the GSS framework
on macOS), so hopcat loads it at run time and stays free of compiled dependencies. Only the
initiator side is here: six functions of RFC 2744, enough for an HTTP client.

One :class:`NegotiateContext` per proxy hop and connection. ``step(None)`` gives the first token
for ``Proxy-Authorization: Negotiate``; a ``Negotiate <token>`` in a later 407 goes into
``step(token)``. Squid's CONNECT 200 carries no final token, so a caller must accept a 2xx while
``complete`` is still false: mutual authentication of the proxy is asked for but cannot be
required.

Credentials are the user's: a ticket cache (``kinit``, a domain login) or a client keytab, found
by the library through ``KRB5CCNAME``, ``KRB5_CLIENT_KTNAME`` and ``KRB5_CONFIG``, which MIT reads
once per process. Credential delegation is never requested: a proxy has no business with the
user's ticket-granting ticket.

This module is imported only when a proxy offers Negotiate; ctypes is imported when a library is
loaded. Tokens are never put in messages or logs.
"""

from __future__ import annotations

import functools
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

LIBRARY_ENV = "HOPCAT_GSSAPI_LIBRARY"
"""A path or soname to load instead of the usual candidates; if it does not load, there is none."""

_CANDIDATES = ("libgssapi_krb5.so.2", "libgssapi.so.3")  # MIT, Heimdal
_MACOS_FRAMEWORK = "/System/Library/Frameworks/GSS.framework/GSS"

# DER contents (no tag, no length) of the two OIDs. The host-based-service OID is 10 bytes;
# a 9-byte encoding of it is rejected as "a supplied name was of an unsupported type".
_NT_HOSTBASED_SERVICE = bytes.fromhex("2a864886f71201020104")  # 1.2.840.113554.1.2.1.4
_SPNEGO_MECH = bytes.fromhex("2b0601050502")  # 1.3.6.1.5.5.2

# RFC 2744 section 3.9 (status codes) and 5.19 (request flags).
_GSS_C_MUTUAL_FLAG = 2
_GSS_C_SEQUENCE_FLAG = 8
_GSS_S_CONTINUE_NEEDED = 1
_GSS_ERROR_MASK = 0xFFFF0000  # calling and routine errors; the low bits are informational
_GSS_S_FAILURE = 13 << 16  # "Unspecified GSS failure": the minor status says what happened
_GSS_C_GSS_CODE = 1
_GSS_C_MECH_CODE = 2
_MAX_STATUS_MESSAGES = 8  # gss_display_status is called in a loop; never trust it to end


class GSSAPIError(Exception):
    """GSSAPI could not produce a token: no library, no credentials, unknown service, ...

    ``major`` and ``minor`` are the status codes (0 when no library call failed); the message is
    one line rendered by the library itself.
    """

    def __init__(self, message: str, major: int = 0, minor: int = 0) -> None:
        super().__init__(message)
        self.major = major
        self.minor = minor


def principal_hint(host: str) -> str:
    """The service principal a ticket is asked for, for messages: ``HTTP/<host>``."""
    return f"HTTP/{host}"


class _Library:
    """A loaded GSSAPI library with the six functions typed, and the structs and OIDs it takes."""

    def __init__(self, cdll: Any) -> None:
        import ctypes

        self.ctypes = ctypes
        uint32 = ctypes.c_uint32
        # MIT's gssapi.h packs its structs to 2 bytes under __APPLE__ on x86_64 (#pragma pack);
        # "ms" is that layout and keeps Python 3.14 from warning about _pack_ without _layout_.
        packing: dict[str, Any] = {}
        if sys.platform == "darwin" and os.uname().machine == "x86_64":
            packing = {"_pack_": 2, "_layout_": "ms"}
        buffer_fields = [("length", ctypes.c_size_t), ("value", ctypes.c_void_p)]
        oid_fields = [("length", uint32), ("elements", ctypes.c_void_p)]
        self.Buffer: Any = type(
            "gss_buffer_desc", (ctypes.Structure,), {**packing, "_fields_": buffer_fields}
        )
        self.OID: Any = type(
            "gss_OID_desc", (ctypes.Structure,), {**packing, "_fields_": oid_fields}
        )
        self._oid_storage: list[Any] = []
        self.hostbased_service = self._oid(_NT_HOSTBASED_SERVICE)
        self.spnego = self._oid(_SPNEGO_MECH)

        def bind(name: str, *argtypes: Any) -> Any:
            function = getattr(cdll, name)  # AttributeError: not a GSSAPI library
            function.argtypes = argtypes
            function.restype = uint32  # the major status
            return function

        p = ctypes.POINTER
        u32p, voidp = p(uint32), ctypes.c_void_p
        bufp: Any = p(self.Buffer)
        oidp: Any = p(self.OID)
        # RFC 2744 argument order; "p(voidp)" arguments are handles the library fills in.
        self.import_name = bind("gss_import_name", u32p, bufp, oidp, p(voidp))
        self.init_sec_context = bind(
            "gss_init_sec_context",
            u32p, voidp, p(voidp), voidp, oidp, uint32, uint32, voidp, bufp, p(oidp), bufp, u32p, u32p,
        )  # fmt: skip
        self.release_buffer = bind("gss_release_buffer", u32p, bufp)
        self.release_name = bind("gss_release_name", u32p, p(voidp))
        self.delete_sec_context = bind("gss_delete_sec_context", u32p, p(voidp), bufp)
        self.display_status = bind(
            "gss_display_status", u32p, uint32, ctypes.c_int, oidp, u32p, bufp
        )

    def _oid(self, der: bytes) -> Any:
        # The struct points into this buffer: it has to live as long as the library object.
        storage = self.ctypes.create_string_buffer(der, len(der))
        self._oid_storage.append(storage)
        return self.OID(len(der), self.ctypes.cast(storage, self.ctypes.c_void_p))

    def status_text(self, code: int, kind: int) -> list[str]:
        """The library's messages for one status code (a major or a minor one)."""
        ctypes = self.ctypes
        texts: list[str] = []
        context = ctypes.c_uint32(0)
        for _ in range(_MAX_STATUS_MESSAGES):
            minor = ctypes.c_uint32(0)
            text = self.Buffer()
            major = self.display_status(
                ctypes.byref(minor), code, kind, None, ctypes.byref(context), ctypes.byref(text)
            )
            if major & _GSS_ERROR_MASK:
                break
            try:
                raw = ctypes.string_at(text.value, text.length) if text.value else b""
            finally:
                self.release_buffer(ctypes.byref(minor), ctypes.byref(text))
            # MIT counts the terminating NUL in the length.
            message = " ".join(raw.split(b"\0", 1)[0].decode("utf-8", "replace").split())
            if message:
                texts.append(message)
            if context.value == 0:
                break
        return texts

    def error(self, major: int, minor: int) -> GSSAPIError:
        texts = self.status_text(major, _GSS_C_GSS_CODE)
        minor_texts = self.status_text(minor, _GSS_C_MECH_CODE) if minor else []
        # "Unspecified GSS failure. Minor code may provide more information" says nothing when
        # the minor code does.
        if major & _GSS_ERROR_MASK == _GSS_S_FAILURE and minor_texts:
            texts = []
        detail = "; ".join(texts + minor_texts) or f"major status {major:#x}, minor status {minor}"
        return GSSAPIError(f"GSSAPI: {detail}", major, minor)


def load_library() -> object | None:
    """The system's GSSAPI library, or None; loaded once per process (per ``LIBRARY_ENV`` value).

    Candidates in order: MIT's and Heimdal's sonames, whatever ``find_library`` finds (it may run
    ldconfig or a compiler, hence last but one), the macOS GSS framework. ``HOPCAT_GSSAPI_LIBRARY``
    replaces the list.
    """
    return _load(os.environ.get(LIBRARY_ENV) or None)


@functools.cache
def _load(override: str | None) -> _Library | None:
    import ctypes
    import ctypes.util

    def candidates() -> Iterator[str]:
        if override is not None:
            yield override
            return
        yield from _CANDIDATES
        found = ctypes.util.find_library("gssapi_krb5")
        if found:
            yield found
        if sys.platform == "darwin":
            yield _MACOS_FRAMEWORK

    for name in candidates():
        try:
            return _Library(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


class NegotiateContext:
    """One GSSAPI security context with the service ``HTTP@<host>``, through SPNEGO.

    ``step(None)`` first, then ``step(token)`` with each token the proxy sends back; every step
    returns the token to send (possibly empty once the context is complete). Raises
    :class:`GSSAPIError` when no library loads, when the name cannot be imported and when the
    library refuses a step (no credentials, service unknown to the KDC, a bad token). ``close()``
    frees the library's handles; the context is also a context manager.
    """

    def __init__(self, host: str, *, library: object | None = None) -> None:
        loaded = library if library is not None else load_library()
        if loaded is None:
            raise GSSAPIError(
                "GSSAPI: no GSSAPI library could be loaded "
                "(install MIT Kerberos' libgssapi-krb5-2 or Heimdal's libgssapi3-heimdal)"
            )
        if not isinstance(loaded, _Library):
            raise TypeError("library must be what load_library() returned")
        self._lib = loaded
        ctypes = loaded.ctypes
        self.host = host
        self.complete = False
        self._context = ctypes.c_void_p()
        self._name = ctypes.c_void_p()
        self._closed = False
        text = f"HTTP@{host}".encode()
        storage = ctypes.create_string_buffer(text, len(text))
        name_buffer = loaded.Buffer(len(text), ctypes.cast(storage, ctypes.c_void_p))
        minor = ctypes.c_uint32(0)
        major = loaded.import_name(
            ctypes.byref(minor),
            ctypes.byref(name_buffer),
            ctypes.byref(loaded.hostbased_service),
            ctypes.byref(self._name),
        )
        if major & _GSS_ERROR_MASK:
            raise loaded.error(major, minor.value)

    def step(self, token: bytes | None = None) -> bytes:
        """The next token to send, given the proxy's last one (None or b"" at the start)."""
        if self._closed:
            raise ValueError("NegotiateContext.step() after close()")
        lib = self._lib
        ctypes = lib.ctypes
        if token:
            storage = ctypes.create_string_buffer(token, len(token))
            input_token = lib.Buffer(len(token), ctypes.cast(storage, ctypes.c_void_p))
        else:
            input_token = lib.Buffer(0, None)
        output_token = lib.Buffer()
        minor = ctypes.c_uint32(0)
        major = lib.init_sec_context(
            ctypes.byref(minor),
            None,  # the default credentials: the user's ticket cache or client keytab
            ctypes.byref(self._context),
            self._name,
            ctypes.byref(lib.spnego),
            _GSS_C_MUTUAL_FLAG | _GSS_C_SEQUENCE_FLAG,
            0,  # the default lifetime
            None,  # no channel bindings
            ctypes.byref(input_token),
            None,  # actual mechanism, returned flags and lifetime are not needed
            ctypes.byref(output_token),
            None,
            None,
        )
        result = b""
        if output_token.value:
            try:
                result = ctypes.string_at(output_token.value, output_token.length)
            finally:
                lib.release_buffer(ctypes.byref(ctypes.c_uint32(0)), ctypes.byref(output_token))
        if major & _GSS_ERROR_MASK:
            raise lib.error(major, minor.value)
        self.complete = not major & _GSS_S_CONTINUE_NEEDED
        return result

    def close(self) -> None:
        """Delete the security context and release the name; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        lib = self._lib
        ctypes = lib.ctypes
        minor = ctypes.c_uint32(0)
        if self._context:
            lib.delete_sec_context(ctypes.byref(minor), ctypes.byref(self._context), None)
        if self._name:
            lib.release_name(ctypes.byref(minor), ctypes.byref(self._name))

    def __enter__(self) -> NegotiateContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "complete" if self.complete else "open"
        return f"<NegotiateContext {principal_hint(self.host)} {state}>"
