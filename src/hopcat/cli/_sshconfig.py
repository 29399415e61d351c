"""``hopcat ssh-config``: write the ssh_config stanza for a proxy setup, or check a host's.

    hopcat ssh-config [--host PATTERN] [--no-fdpass] [proxy options]
    hopcat ssh-config --check HOST [--config FILE]

The stanza names hopcat by absolute path (ssh runs ProxyCommand through the user's shell, whose
PATH may differ), passes ``%h %p``, and uses ``-F`` with ``ProxyUseFdpass yes`` whenever the chain
allows it (no https:// hop), so nothing stays in the data path. Passwords are never written into
the file: the stanza relies on HOPCAT_PROXY_PASSWORD (or a prompt) instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from hopcat.cli._args import parse_args
from hopcat.cli._proxy import proxies_from_command_line
from hopcat.errors import ExitCode, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass

USAGE = """usage: hopcat ssh-config [--host PATTERN] [--no-fdpass] [proxy options]
       hopcat ssh-config --check HOST [--config FILE]

Print an ssh_config stanza that makes ssh (and git, scp, rsync) reach PATTERN through hopcat
with the given proxy options (-x URL ..., or nc/ncat/connect-proxy flags); with --check, ask
`ssh -G HOST` whether ssh uses hopcat for HOST and through which proxies.
"""


def hopcat_path() -> str:
    """How ssh should start this very hopcat: its console script if we run from one."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "hopcat" and os.access(script, os.X_OK):
        return script
    found = shutil.which("hopcat")
    if found:
        return os.path.abspath(found)
    return f"{shlex.quote(sys.executable)} -m hopcat"


def stanza(args: list[str]) -> tuple[str, list[str]]:
    """The stanza text, and notes for stderr (e.g. a password left out)."""
    pattern = "*"
    fdpass = True
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--host":
            if index + 1 >= len(args):
                raise UsageError("--host needs a PATTERN")
            pattern = args[index + 1]
            index += 2
            continue
        if arg == "--no-fdpass":
            fdpass = False
        else:
            rest.append(arg)
        index += 1
    if any(ch in pattern for ch in "\r\n"):
        raise UsageError("--host PATTERN must be one line")
    options = parse_args(rest)
    if options.operands:
        raise UsageError("ssh-config takes no HOST PORT: ssh fills in %h %p")
    hops = proxies_from_command_line(options)
    notes: list[str] = []
    command = [hopcat_path()]
    for hop in hops:
        if hop.password is not None:
            notes.append(
                f"left the password of {hop.label()} out of the file: export HOPCAT_PROXY_PASSWORD "
                "for ssh, or let hopcat prompt on the terminal"
            )
        command += ["-x", shlex.quote(hop.without_password())]
    if options.ipv4_only:
        command.append("-4")
    if options.ipv6_only:
        command.append("-6")
    for flag, value in (
        ("--connect-timeout", options.connect_timeout_s), ("--proxy-dns", options.proxy_dns),
        ("--proxy-cacert", options.proxy_cacert),
    ):
        if value is not None:
            command += [flag, shlex.quote(f"{value:g}" if isinstance(value, float) else value)]
    if options.proxy_insecure:
        command.append("--proxy-insecure")
    use_fdpass = fdpass and not any(hop.tls for hop in hops)
    if fdpass and not use_fdpass:
        notes.append("no ProxyUseFdpass: an https:// hop keeps its TLS session inside hopcat")
    if use_fdpass:
        command.append("-F")
    command += ["%h", "%p"]
    lines = [f"Host {pattern}", f"    ProxyCommand {' '.join(command)}"]
    if use_fdpass:
        lines.append("    ProxyUseFdpass yes")
    return "\n".join(lines) + "\n", notes


def check(host: str, config: str | None = None) -> tuple[bool, str]:
    """Ask ``ssh -G`` how ssh would reach ``host``; (uses hopcat?, one-line verdict)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("--check needs the OpenSSH client (ssh) on PATH")
    try:
        argv = [ssh, "-G", host] if config is None else [ssh, "-F", config, "-G", host]
        result = subprocess.run(argv, capture_output=True, timeout=10,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError("ssh -G did not answer within 10 s") from None
    if result.returncode != 0:
        first = result.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise UsageError(f"ssh -G {host} failed: {first[0] if first else 'exit ' + str(result.returncode)}")
    settings: dict[str, str] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value)
    command = settings.get("proxycommand", "none")
    fdpass = settings.get("proxyusefdpass", "no")
    if command == "none":
        return False, f"{host}: ssh connects directly (no ProxyCommand)"
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    position = next((i for i, word in enumerate(words) if os.path.basename(word) == "hopcat"), None)
    if position is None and "-m" in words and "hopcat" in words:
        position = words.index("hopcat")
    if position is None:
        return False, f"{host}: ssh uses another ProxyCommand: {command}"
    argv = [w.replace("%h", "HOST").replace("%p", "22") for w in words[position + 1 :]]
    try:
        hops = proxies_from_command_line(parse_args(argv))
    except UsageError as exc:
        return True, f"{host}: ssh uses hopcat, but its options are wrong: {exc}"
    route = " -> ".join(hop.label() for hop in hops) if hops else "no proxy on its command line"
    return True, f"{host}: ssh uses hopcat ({words[position]}) via {route}; ProxyUseFdpass {fdpass}"


def main(args: list[str]) -> int:
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if args[:1] == ["--check"]:
        if len(args) == 4 and args[2] == "--config":
            config: str | None = args[3]
        elif len(args) == 2:
            config = None
        else:
            raise UsageError("usage: hopcat ssh-config --check HOST [--config FILE]")
        uses, verdict = check(args[1], config)
        sys.stdout.write(verdict + "\n")
        return ExitCode.OK if uses else 1
    text, notes = stanza(args)
    for note in notes:
        sys.stderr.write(f"hopcat: note: {note}\n")
    sys.stdout.write(text)
    return 0
