"""--tls for the command line: the options as ``TLSSettings``, the handshake with the target or
a listener's client, its -v lines and its one-line errors. Imported only when --tls is given."""

from __future__ import annotations

import time

from hopcat.net.tls import (
    TLSSettings,
    check_pin,
    client_context,
    describe,
    failure,
    parse_alpn,
    parse_min_version,
    parse_pin,
    server_context,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import ssl

    from hopcat.cli import Timeline
    from hopcat.cli._args import Options
    from hopcat.net.chain import Tunnel
    from hopcat.net.tls import TLSLayers

INSECURE_WARNING = ("--tls-insecure: the peer's certificate is not checked; anyone on the path "
                    "can read and change this connection")  # fmt: skip


def settings(options: Options) -> TLSSettings:
    servername = options.tls_servername
    if servername is not None:
        # It goes into SNI: refused here like any name before it reaches a wire format.
        from hopcat._endpoint import validate_host

        servername = validate_host(servername, what="--tls-servername")
    return TLSSettings(
        ca=options.tls_ca, cert=options.tls_cert, key=options.tls_key, servername=servername,
        alpn=parse_alpn(options.tls_alpn) if options.tls_alpn is not None else (),
        pin=parse_pin(options.tls_pin) if options.tls_pin is not None else None,
        min_version=(parse_min_version(options.tls_min_version)
                     if options.tls_min_version is not None else None),
        insecure=options.tls_insecure, verify_client=options.tls_verify_client,
    )  # fmt: skip


def warn_insecure(options: Options) -> None:
    if options.tls_insecure:
        from hopcat.cli import _fail

        _fail(f"warning: {INSECURE_WARNING}", 0)


def connect_context(options: Options) -> tuple[ssl.SSLContext, TLSSettings]:
    """The client context, built (and its files read) before anything is dialled."""
    tls = settings(options)
    return client_context(tls), tls


def start_client(
    tunnel: Tunnel, context: ssl.SSLContext, tls: TLSSettings, host: str, port: int | None, *,
    deadline: float, trace: Timeline,
) -> None:  # fmt: skip
    """TLS with the target over ``tunnel`` (inside its TLS hops' sessions); raises TLSError or
    HopcatTimeoutError naming the target. ``port`` None: ``host`` is a Unix socket's path, and
    the name checked is --tls-servername's, else localhost."""
    from hopcat._endpoint import format_hostport, split_scope
    from hopcat.errors import HopcatTimeoutError, UsageError
    from hopcat.net.chain import start_target_tls

    if port is None:
        who, name = f"the target {host}", tls.servername or "localhost"
    else:
        who = f"the target {format_hostport(host, port)}"
        name = tls.servername or split_scope(host)[0] or host
    started = time.monotonic()
    try:
        session = start_target_tls(tunnel, context, name, deadline=deadline, label=who)
    except TimeoutError:
        raise HopcatTimeoutError(f"TLS with {who}: no handshake before the connect timeout") from None
    except OSError as exc:  # before ValueError: ssl.SSLCertVerificationError is both
        raise failure(exc, who) from None
    except ValueError as exc:
        raise UsageError(f"{name}: cannot be used as a TLS server name ({exc}); "
                         "give --tls-servername NAME") from None  # fmt: skip
    if tls.pin is not None:
        check_pin(session, tls.pin, who)
    if trace.enabled:
        trace(f"TLS with {who} in {(time.monotonic() - started) * 1000:.1f} ms: "
              f"{describe(session)}")  # fmt: skip


def listen_context(options: Options, names: list[str], trace: Timeline) -> ssl.SSLContext:
    """The listener's context; a throwaway certificate for ``names`` without --tls-cert."""
    tls = settings(options)
    context = server_context(tls)
    if tls.cert is None:
        from hopcat.net.tls import ephemeral_certificate, fingerprint

        der = ephemeral_certificate(context, names)
        trace(f"TLS: a throwaway self-signed certificate for {', '.join(names)}, "
              f"sha256:{fingerprint(der)} (clients: --tls-pin sha256:{fingerprint(der)})")
    return context


def accept_tls(
    conn: _socket.socket, context: ssl.SSLContext, who: str, *, timeout_s: float, trace: Timeline,
) -> TLSLayers:  # fmt: skip
    """The server side of the handshake with a listener's client."""
    from hopcat.errors import HopcatTimeoutError
    from hopcat.net.chain import Tunnel, accept_target_tls

    started = time.monotonic()
    deadline = started + timeout_s if timeout_s > 0 else float("inf")
    tunnel = Tunnel(conn, b"", None)
    try:
        session = accept_target_tls(tunnel, context, deadline=deadline, label=who)
    except TimeoutError:
        raise HopcatTimeoutError(f"TLS with {who}: no handshake in {timeout_s:g} s") from None
    except OSError as exc:
        raise failure(exc, who, peer="client") from None
    if trace.enabled:
        trace(f"TLS with {who} in {(time.monotonic() - started) * 1000:.1f} ms: "
              f"{describe(session)}")  # fmt: skip
    assert tunnel.layers is not None
    return tunnel.layers

