"""The client tools under test: where each one is, its version, its command line per direction.

A direction (mode) is ``up`` (stdin -> socket, exit after stdin EOF), ``down`` (socket -> stdout,
stdin left open, exit when the server closes) or ``latency`` (the bidirectional form).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .common import HOST, REPO, first_line, package_version


@dataclass(frozen=True)
class Proxy:
    """Where a tool is told to go: scheme "socks5" (remote DNS, socks5h), "socks4" (IPv4
    target), "socks4a" or "http" (CONNECT)."""

    scheme: str
    host: str
    port: int


# builder(base argv, mode, target host, target port, proxy) -> argv, or None when the tool cannot
# do that mode or speak that proxy protocol.
Builder = Callable[[list[str], str, str, int, "Proxy | None"], "list[str] | None"]


def build_hopcat(
    base: list[str], mode: str, host: str, port: int, proxy: Proxy | None
) -> list[str]:
    # One command in every mode, as ssh runs it: upload relies on the half-close after stdin EOF,
    # download on exiting when the server closes although stdin is still open.
    argv = list(base)
    if proxy is not None:
        scheme = "socks5h" if proxy.scheme == "socks5" else proxy.scheme
        argv += ["-x", f"{scheme}://{proxy.host}:{proxy.port}"]
    return [*argv, host, str(port)]


def build_nc_openbsd(
    base: list[str], mode: str, host: str, port: int, proxy: Proxy | None
) -> list[str]:
    # -N: shutdown(SHUT_WR) after stdin EOF; -d: do not read stdin.
    argv = [*base, *{"up": ["-N"], "down": ["-d"]}.get(mode, [])]
    if proxy is not None:
        kind = {"socks5": "5", "socks4": "4", "socks4a": "4", "http": "connect"}[proxy.scheme]
        argv += ["-X", kind, "-x", f"{proxy.host}:{proxy.port}"]
    return [*argv, host, str(port)]


def build_ncat(base: list[str], mode: str, host: str, port: int, proxy: Proxy | None) -> list[str]:
    argv = [*base, *{"up": ["--send-only"], "down": ["--recv-only"]}.get(mode, [])]
    if proxy is not None:
        kind = "socks4" if proxy.scheme == "socks4a" else proxy.scheme
        argv += ["--proxy", f"{proxy.host}:{proxy.port}", "--proxy-type", kind]
        if proxy.scheme in ("socks5", "socks4a"):
            argv += ["--proxy-dns", "remote"]
    return [*argv, host, str(port)]


def build_socat(
    base: list[str], mode: str, host: str, port: int, proxy: Proxy | None
) -> list[str] | None:
    if proxy is None:
        target = f"TCP:{host}:{port}"
    elif proxy.scheme in ("socks4", "socks4a"):  # socks4: host must be an IPv4 address
        target = f"{proxy.scheme.upper()}:{proxy.host}:{host}:{port},socksport={proxy.port}"
    elif proxy.scheme == "http":
        target = f"PROXY:{proxy.host}:{host}:{port},proxyport={proxy.port}"
    else:
        return None  # socat 1.7 has no SOCKS5 address type
    if mode == "up":
        return [*base, "-u", "STDIN", target]
    if mode == "down":
        return [*base, "-u", target, "STDOUT"]
    return [*base, "STDIO", target]


def build_connect_proxy(
    base: list[str], mode: str, host: str, port: int, proxy: Proxy | None
) -> list[str]:
    argv = list(base)  # without a proxy connect-proxy relays directly
    if proxy is not None and proxy.scheme == "http":
        argv += ["-H", f"{proxy.host}:{proxy.port}"]
    elif proxy is not None:
        argv += ["-S", f"{proxy.host}:{proxy.port}"]
        argv += {"socks4": ["-4"], "socks4a": ["-4", "-R", "remote"]}.get(proxy.scheme, [])
    return [*argv, host, str(port)]


def build_listen(key: str, base: list[str], mode: str, host: str, port: int) -> list[str] | None:
    """The tool listening on host:port for one connection: ``up`` sends its stdin to the client
    and half-closes at its EOF, ``down`` writes what the client sends to stdout."""
    up = mode == "up"
    if key == "hopcat":
        return [*base, "-l", host, str(port)]
    if key == "nc":
        return [*base, "-l", "-N" if up else "-d", host, str(port)]
    if key == "ncat":
        return [*base, "-l", "--send-only" if up else "--recv-only", host, str(port)]
    if key == "socat":
        listen = f"TCP-LISTEN:{port},bind={host},reuseaddr"
        return [*base, "-u", "STDIN", listen] if up else [*base, "-u", listen, "STDOUT"]
    return None  # connect-proxy cannot listen


@dataclass(frozen=True)
class ToolKind:
    name: str  # display name
    program: str | None  # None: hopcat (see hopcat_command)
    package: str | None  # Debian package, for the version when the program has no --version
    version_flag: str | None
    build: Builder
    schemes: tuple[str, ...] = ("socks5", "socks4", "socks4a", "http")  # proxy protocols


TOOL_KINDS: dict[str, ToolKind] = {
    "hopcat": ToolKind("hopcat", None, None, "--version", build_hopcat),
    "nc": ToolKind("nc.openbsd", "nc.openbsd", "netcat-openbsd", None, build_nc_openbsd),
    "ncat": ToolKind("ncat", "ncat", None, "--version", build_ncat),
    "socat": ToolKind("socat", "socat", None, "-V", build_socat, ("socks4", "socks4a", "http")),
    "connect": ToolKind(
        "connect-proxy", "connect-proxy", "connect-proxy", None, build_connect_proxy
    ),
}
TOOL_ALIASES = {"nc.openbsd": "nc", "netcat": "nc", "connect-proxy": "connect"}
BASELINE = "nc"  # ratios are against nc.openbsd


def hopcat_command(cmd: str | None) -> tuple[list[str] | None, dict[str, str], str | None]:
    """(argv, extra environment, why missing): ``cmd`` (--hopcat) if given, else
    <repo>/.venv/bin/hopcat, else ``python -m hopcat`` with PYTHONPATH=<repo>/src."""
    if cmd:
        argv = shlex.split(cmd)
        path = shutil.which(argv[0]) if os.sep not in argv[0] else argv[0]
        if not path or not os.access(path, os.X_OK):
            return None, {}, f"--hopcat command not found: {argv[0]}"
        return [path, *argv[1:]], {}, None
    if os.access(REPO / ".venv/bin/hopcat", os.X_OK):
        return [str(REPO / ".venv/bin/hopcat")], {}, None
    if (REPO / "src/hopcat").is_dir():
        pp = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": str(REPO / "src") + (os.pathsep + pp if pp else "")}
        return [sys.executable, "-m", "hopcat"], env, None
    return None, {}, f"no {REPO}/.venv/bin/hopcat and no {REPO}/src/hopcat"


@dataclass
class Tool:
    key: str  # name used with --tools
    kind: ToolKind
    argv: list[str] | None  # resolved base command; None when unavailable
    env: dict[str, str]  # extra environment
    missing: str | None = None  # why it is unavailable

    @property
    def name(self) -> str:
        return self.kind.name

    def command(self, mode: str, port: int, proxy: Proxy | None = None) -> list[str] | None:
        assert self.argv is not None
        return self.kind.build(self.argv, mode, HOST, port, proxy)

    def listen_command(self, mode: str, port: int) -> list[str] | None:
        assert self.argv is not None
        return build_listen(self.key, self.argv, mode, HOST, port)

    def version(self) -> str | None:
        if self.argv is not None and self.kind.version_flag:
            return first_line([*self.argv, self.kind.version_flag], {**os.environ, **self.env})
        return package_version(self.kind.package) if self.kind.package else None


def resolve_tool(key: str, hopcat_cmd: str | None = None) -> Tool:
    kind = TOOL_KINDS[key]
    if kind.program is None:
        argv, env, missing = hopcat_command(hopcat_cmd)
        return Tool(key, kind, argv, env, missing)
    path = shutil.which(kind.program)
    return Tool(
        key, kind, [path] if path else None, {}, None if path else f"{kind.program} not installed"
    )
