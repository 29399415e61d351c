"""``hopcat ssh-config``: write the ssh_config stanza for a proxy setup, or check a host's.

    hopcat ssh-config [--host PATTERN] [--no-fdpass] [hopcat options]
    hopcat ssh-config --check HOST [--config FILE]

The stanza names this very hopcat by absolute path (ssh runs ProxyCommand through the user's
shell, whose PATH may differ), passes ``%h %p``, and uses ``-F`` with ``ProxyUseFdpass yes``
whenever the chain allows it (no TLS hop, no --tls), so nothing stays in the data path. Passwords are
never written into the file: the stanza relies on --proxy-password-file or -command (carried: they
say where the password is), HOPCAT_PROXY_PASSWORD, a prompt or an askpass instead.

What ssh does with a ProxyCommand line, and so what the stanza must survive (OpenSSH readconf.c,
misc.c argv_split, sshconnect.c):

1. readconf tokenizes the line with argv_split, which only checks it (the command is kept as
   written) but rejects the whole file on unbalanced quotes. Its quoting is not the shell's:
   a backslash escapes a quote or a backslash *inside* single quotes too, so ``'dom\\'`` is
   balanced for sh and "invalid quotes" for ssh.
2. percent_expand replaces %h %n %p %r and %% over the raw text, quotes or not; any other %x is
   fatal ("unknown key"), so a percent-encoded user name (``dom%5Cuser``) must be written %%5C.
3. ``$SHELL -c "exec COMMAND"`` then splits, expands and unquotes it (``#`` starts a comment,
   ``$`` expands, blanks split words).

Every word is therefore %-escaped and quoted in the one dialect both tokenizers read alike:
plain runs in single quotes, and ``'`` and ``\\`` as ``\\'`` and ``\\\\`` outside them.

Every hopcat option is carried into the stanza, folded into its -x URLs, or refused with the
reason (``_REFUSED``); none is dropped.
``--check`` replays what ssh does: ``ssh -G``, ssh's %-expansion, the shell's word splitting,
then hopcat's own parsing and validation of the words, short of connecting.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from hopcat._environment import proxies_from_environment
from hopcat.cli._args import OPTION_TABLE, parse_args
from hopcat.cli._proxy import proxies_from_command_line
from hopcat.cli._scan import scan_options
from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hopcat._url import ProxyURL
    from hopcat.cli._args import Options

USAGE = """usage: hopcat ssh-config [--host PATTERN] [--no-fdpass] [hopcat options]
       hopcat ssh-config --check HOST [--config FILE]

Print an ssh_config stanza that makes ssh (and git, scp, rsync) reach PATTERN (one or more ssh
Host patterns) through hopcat with the given proxy options (-x URL ..., nc/ncat/connect-proxy
flags, and any hopcat option that applies to a connection).

--check replays what ssh will do for HOST (ssh -G, %-tokens, the shell's word splitting) and
parses the result as hopcat would. Exit 0: ssh uses hopcat and the stanza is sound; 1: ssh does
not use hopcat for HOST; 2: ssh would fail or hand hopcat other words than meant.
"""

CHECK_USES_HOPCAT = 0
CHECK_NOT_HOPCAT = 1
CHECK_BROKEN = 2

# What becomes of each hopcat option in the stanza. Every row of OPTION_TABLE is in exactly one
# of these (tests/unit/test_sshconfig.py holds that), so a new option needs a decision here.
_CARRIED = frozenset({
    "ipv4_only", "ipv6_only", "source", "numeric", "connect_timeout_s", "idle_timeout_s",
    "quit_after_eof_s", "shutdown_flag", "no_shutdown", "keep_sending", "keepalive", "nagle",
    "proxy_dns", "no_proxy", "proxy_cacert", "proxy_insecure", "verbose", "debug",
    "recv_buf", "send_buf", "tos", "ttl", "so_debug", "tls", "tls_ca", "tls_servername",
    "tls_cert", "tls_key", "tls_alpn", "tls_pin", "tls_min_version", "tls_insecure", "ssl_verify",
    "proxy_auth_scheme",
    "proxy_password_file", "proxy_password_command",  # where the password is, not the password
})
# Files ssh runs hopcat with from the user's working directory: written as absolute paths.
_PATHS = frozenset({"proxy_cacert", "tls_ca", "tls_cert", "tls_key", "proxy_password_file"})
# Their values become the -x URLs of the stanza (scheme, user) instead of flags.
_FOLDED_INTO_URLS = frozenset(
    {"proxies", "nc_proxy_type", "nc_proxy_user", "ncat_proxy_type", "proxy_auth"}
)
# Decided by ssh-config itself: -F from the chain and --no-fdpass; -h shows its usage.
_DECIDED_HERE = frozenset({"fdpass", "help"})
_REFUSED = {
    "no_stdin": "ssh writes everything it sends to the server into the ProxyCommand's stdin",
    "version": "it prints the version and exits, so ssh would get no connection",
    "listen": "a ProxyCommand connects to %h %p; it cannot wait for a connection instead",
    "keep_open": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "source_port": "every ssh session would connect from the same port, so a second one at the "
                   "same time (or soon after, in TIME_WAIT) fails",
    "allow": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "deny": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "ready_fd": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "ready_file": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "unix": "ssh gives the ProxyCommand a host and a port (%h %p), not a socket path",
    "exec_cmd": "ssh talks to the ProxyCommand's stdin and stdout, which a program would take",
    "sh_exec": "ssh talks to the ProxyCommand's stdin and stdout, which a program would take",
    "max_conns": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "crlf": "it rewrites the bytes ssh sends, which would break the SSH protocol",
    "interval_s": "it holds back every line of the binary SSH stream",
    "scan": "a port scan gives ssh no connection",
    "random_order": "it belongs to a port scan (-z), which gives ssh no connection",
    "max_parallel": "it belongs to a port scan (-z), which gives ssh no connection",
    "tls_verify_client": "it belongs to listen mode (-l), which a ProxyCommand cannot use",
    "udp": "ssh needs a byte stream from its ProxyCommand; UDP carries datagrams",
    "recv_count": "it belongs to UDP mode (-u), which ssh cannot use",
    "broadcast": "it belongs to UDP mode (-u), which ssh cannot use",
}

# Needs no quoting for the shell nor for ssh's argv_split (% is escaped separately).
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@%+=:,./_-")
# Characters with which the shell could run or redirect something besides the one command:
# --check then splits the words itself instead of asking the shell.
_SHELL_CONTROL = frozenset(";&|<>`\n")


def ssh_word(word: str) -> str:
    """``word`` as one argument of a ProxyCommand line: %-escaped and quoted for ssh and sh."""
    if any(ch in "\r\n\0" for ch in word):
        raise UsageError(f"{word!r}: ssh_config is line-based; a value cannot hold CR, LF or NUL")
    escaped = word.replace("%", "%%")
    if word and all(ch in _PLAIN for ch in word):
        return escaped
    parts: list[str] = []
    run = ""
    for ch in escaped:
        if ch in "'\\":
            if run:
                parts.append(f"'{run}'")
                run = ""
            parts.append("\\" + ch)
        else:
            run += ch
    if run or not parts:
        parts.append(f"'{run}'")
    return "".join(parts)


def hopcat_command() -> list[str]:
    """How ssh should start this very hopcat: its script if we run from one, else ``-m``."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "hopcat" and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "hopcat"]


def _flag(row: tuple[str, str, str, str, str]) -> str:
    """The option as the stanza writes it: the long name, which says what it does."""
    short, long, _metavar, _attr, _help = row
    return f"--{long}" if long else f"-{short}"


def _names(row: tuple[str, str, str, str, str]) -> str:
    """Every spelling of the option, for a message about it."""
    return "/".join(name for name in (f"-{row[0]}" * bool(row[0]), f"--{row[1]}" * bool(row[1]))
                    if name)


def _seconds_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _carried_options(options: Options) -> list[str]:
    """The options of ``options`` as stanza arguments, in --help order; refusals raised."""
    argv: list[str] = []
    for row in OPTION_TABLE:
        attr, metavar = row[3], row[2]
        value = getattr(options, attr)
        if value is None or value is False or value == [] or (type(value) is int and value == 0):
            continue  # not given (0 is an unused counter: 0.0 seconds is a value)
        if attr in _FOLDED_INTO_URLS or attr in _DECIDED_HERE:
            continue
        if attr in _REFUSED:
            raise UsageError(f"ssh-config: {_names(row)} does not belong in a ProxyCommand: "
                             f"{_REFUSED[attr]}")
        if attr not in _CARRIED:
            raise RuntimeError(f"ssh-config has no decision for {_names(row)}")
        if not metavar:
            # A counted switch (-vv) is repeated; any other switch is on.
            argv += [_flag(row)] * (value if type(value) is int else 1)
        elif isinstance(value, float):
            argv += [_flag(row), _seconds_text(value)]
        elif attr in _PATHS:
            argv += [_flag(row), os.path.abspath(value)]
        else:
            argv += [_flag(row), str(value)]
    return argv


def _split_arguments(args: list[str]) -> tuple[str, bool, Options]:
    """(--host PATTERN, --no-fdpass, the hopcat options), scanned as hopcat scans them."""
    from hopcat.cli._args import _metavar_of

    own = {"--host": "PATTERN", "--no-fdpass": "", "--help": ""}

    def metavar_of(flag: str) -> str | None:
        return own[flag] if flag in own else _metavar_of(flag)

    pattern, no_fdpass = "*", False
    rest: list[str] = []
    operands: list[str] = []
    for flag, value in scan_options(args, metavar_of, see="see hopcat ssh-config --help"):
        if flag == "--host":
            pattern = value or ""
        elif flag == "--no-fdpass":
            no_fdpass = True
        elif flag == "--help":
            rest.append("-h")
        elif not flag:
            operands.append(value or "")
        elif value is None:
            rest.append(flag)
        else:
            rest += [f"{flag}={value}"] if flag.startswith("--") else [flag, value]
    options = parse_args(rest)
    if operands and not options.help:
        raise UsageError("ssh-config takes no HOST PORT: ssh fills in %h %p")
    return pattern, no_fdpass, options


def _host_line(pattern: str) -> str:
    # ssh reads Host patterns with the same argv_split: blanks separate patterns (kept, as in
    # ssh_config), quotes, backslashes and a leading # would change them, and no host name
    # has them.
    patterns = pattern.split()
    if not patterns:
        raise UsageError("--host needs a PATTERN")
    for item in patterns:
        if any(ch in "\"'\\" or not ch.isprintable() for ch in item) or item.startswith("#"):
            raise UsageError(f"--host {item!r}: quotes, backslashes, control characters and a "
                             "leading # change what ssh reads; use ssh's * and ? patterns")
    return "Host " + " ".join(patterns)


def stanza(pattern: str, no_fdpass: bool, options: Options) -> tuple[str, list[str]]:
    """The stanza text, and notes for stderr (e.g. a password left out)."""
    host_line = _host_line(pattern)
    hops = proxies_from_command_line(options)
    if not hops and not options.no_proxy:
        raise UsageError("ssh-config needs the proxy on its command line (-x URL ...): the "
                         "environment (ALL_PROXY, ...) is not written into the stanza; "
                         "--no-proxy for a direct hopcat")
    tls = options.tls or any(hop.tls for hop in hops)
    if options.fdpass and (no_fdpass or tls):
        raise UsageError("ssh-config: -F cannot be used " + (
            "with --no-fdpass" if no_fdpass else
            "with TLS (a TLS hop or --tls): the TLS session stays inside hopcat"))
    notes: list[str] = []
    command = hopcat_command()
    for hop in hops:
        if hop.password is not None:
            notes.append(
                f"left the password of {hop.label()} out of the file: use --proxy-password-file "
                "or --proxy-password-command, export HOPCAT_PROXY_PASSWORD for ssh, or let "
                "hopcat prompt (a terminal, or an askpass for GUI programs)"
            )
        command += ["-x", hop.without_password()]
    command += _carried_options(options)
    use_fdpass = not no_fdpass and not tls
    if tls and not no_fdpass:
        notes.append("no ProxyUseFdpass: TLS (a TLS hop or --tls) keeps its TLS session inside hopcat")
    if options.idle_timeout_s and not use_fdpass:
        notes.append(f"-w {_seconds_text(options.idle_timeout_s)}: hopcat will end an ssh session "
                     "quiet for that long (ssh's ServerAliveInterval keeps one busy)")
    if use_fdpass:
        command.append("-F")
    line = " ".join(ssh_word(word) for word in command) + " %h %p"
    lines = [host_line, f"    ProxyCommand {line}"]
    if use_fdpass:
        lines.append("    ProxyUseFdpass yes")
    return "\n".join(lines) + "\n", notes


# --------------------------------------------------------------------------- --check


class _Broken(Exception):
    """The stanza would not work: ssh fails, or hopcat gets other words than meant."""


def ssh_settings(host: str, config: str | None) -> dict[str, str]:
    """``ssh -G HOST``: the settings ssh would use, first value of each key."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("--check needs the OpenSSH client (ssh) on PATH")
    argv = [ssh, "-G", host] if config is None else [ssh, "-F", config, "-G", host]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError("ssh -G did not answer within 10 s") from None
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise _Broken(f"ssh rejects its configuration: {lines[0] if lines else result.returncode}")
    settings: dict[str, str] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value)
    return settings


def percent_expand(command: str, tokens: dict[str, str]) -> str:
    """ssh's percent_expand over a ProxyCommand: %% and ``tokens`` (ssh_config(5) gives a
    ProxyCommand %h %n %p %r), anything else fatal as it is to ssh."""
    out: list[str] = []
    index = 0
    while index < len(command):
        ch = command[index]
        if ch != "%":
            out.append(ch)
            index += 1
            continue
        key = command[index + 1 : index + 2]
        if key == "%":
            out.append("%")
        elif key in tokens and key:
            out.append(tokens[key])
        else:
            shown = f"%{key}" if key else "a % at the end"
            raise _Broken(f"ssh refuses the ProxyCommand: {shown} is not one of ssh's %-tokens "
                          "(%h %n %p %r); a literal % is written %%")
        index += 2
    return "".join(out)


def shell_words(command: str) -> tuple[list[str], str]:
    """The argv the shell makes of ``command``, as ssh's ``$SHELL -c "exec ..."``; and a note.

    The shell itself splits it (``exec printf`` prints the words and runs nothing else) unless
    the text could run or redirect something; then shlex splits the first command.
    """
    if any(ch in _SHELL_CONTROL for ch in command) or "$(" in command:
        return _first_command_words(command), " (shell syntax not evaluated)"
    shell = os.environ.get("SHELL") or "/bin/sh"
    try:
        result = subprocess.run([shell, "-c", "exec printf '%s\\0' " + command],
                                capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _Broken(f"the shell ssh would use ({shell}) failed: {exc}") from None
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise _Broken(f"{shell} cannot run the ProxyCommand: {lines[-1] if lines else 'error'}")
    words = result.stdout.decode("utf-8", "surrogateescape").split("\0")
    return words[:-1], ""


def _first_command_words(command: str) -> list[str]:
    """shlex's words of the first simple command, redirections left out."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise _Broken(f"the shell cannot parse the ProxyCommand: {exc}") from None
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token and all(ch in ";&|" for ch in token):
            break  # the rest is another command
        elif token and all(ch in "<>&" for ch in token):
            skip_next = True  # a redirection and its target; a fd number before it goes too
            if words and words[-1].isdigit():
                words.pop()
        else:
            words.append(token)
    return words


def _command_words(words: list[str]) -> tuple[list[str], dict[str, str]]:
    """The words from the program on, after an ``exec`` or ``env NAME=VALUE ...`` in front,
    and the variables that env sets."""
    assignments: dict[str, str] = {}
    while words and words[0] == "exec":
        words = words[1:]
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
        while words and "=" in words[0] and not words[0].startswith("="):
            name, _, value = words[0].partition("=")
            assignments[name] = value
            words = words[1:]
    return words, assignments


def _hopcat_arguments_at(words: list[str]) -> int | None:
    """Where hopcat's arguments start if ``words`` run hopcat (its script or ``python -m``)."""
    if words and os.path.basename(words[0]) == "hopcat":
        return 1
    if words[1:3] == ["-m", "hopcat"]:
        return 3
    return None


def _dry_run(
    argv: list[str], host: str, port: str, fdpass: bool, environ: dict[str, str]
) -> list[ProxyURL]:
    """What hopcat does with ``argv`` before it connects; the hops, or _Broken saying why not."""
    from hopcat._endpoint import parse_port, validate_host

    try:
        options = parse_args(argv)
        if options.operands != [host, port]:
            raise _Broken(f"hopcat would get the operands {options.operands} instead of "
                          f"{[host, port]} (a word split or left out?)")
        if options.help or options.version or options.no_stdin:
            raise _Broken("hopcat would not connect: -h, -V or -d in the ProxyCommand")
        validate_host(host, what="host")
        parse_port(port)
        hops = proxies_from_command_line(options)
        if not hops and not options.no_proxy:
            hops, _why = proxies_from_environment(environ, host)
    except UsageError as exc:
        raise _Broken(f"hopcat would refuse its options: {exc}") from None
    if options.fdpass and not fdpass:
        raise _Broken("hopcat -F without ProxyUseFdpass yes: ssh would read the passed socket's "
                      "message as the server's banner")
    if fdpass and not options.fdpass:
        raise _Broken("ProxyUseFdpass yes without hopcat -F: ssh would wait for a socket")
    if options.fdpass and any(hop.tls for hop in hops):
        raise _Broken("-F with a TLS hop (https://, socks5+tls://): hopcat keeps that TLS session and cannot pass it")
    for path, flag in ((options.proxy_cacert, "--proxy-cacert"), (options.tls_ca, "--tls-ca"),
                       (options.tls_cert, "--tls-cert"), (options.tls_key, "--tls-key")):
        if path is not None and not os.path.isfile(path):
            raise _Broken(f"{flag} {path}: no such file")
    if options.proxy_password_file is not None:
        from hopcat.cli._password import check_password_file_permissions

        try:
            info = os.stat(options.proxy_password_file)
            check_password_file_permissions(options.proxy_password_file, info.st_mode, info.st_uid)
        except OSError as exc:
            raise _Broken(f"--proxy-password-file {options.proxy_password_file}: "
                          f"{os.strerror(exc.errno or 0).lower()}") from None
        except UsageError as exc:
            raise _Broken(str(exc)) from None
    return hops


def check(host: str, config: str | None = None) -> tuple[int, str]:
    """Replay what ssh does to reach ``host``; (CHECK_* code, one-line verdict)."""
    try:
        settings = ssh_settings(host, config)
        command = settings.get("proxycommand", "none")
        jump = settings.get("proxyjump", "none")
        if jump != "none":
            return CHECK_NOT_HOPCAT, f"{host}: ssh jumps through {jump} (ProxyJump)"
        if command == "none":
            return CHECK_NOT_HOPCAT, f"{host}: ssh connects directly (no ProxyCommand)"
        port = settings.get("port", "22")
        target = settings.get("hostname", host)
        expanded = percent_expand(command, {
            "h": target, "n": host, "p": port, "r": settings.get("user", ""),
        })
        all_words, caveat = shell_words(expanded)
        words, assignments = _command_words(all_words)
        position = _hopcat_arguments_at(words)
        if position is None and any(
            os.path.basename(word) == "hopcat" for word in words[1:] if word != target
        ):
            raise _Broken(f"the shell would run {words[0]!r}, not the hopcat the command names "
                          "(a path with blanks or quotes must be quoted)")
        if position is None:
            return CHECK_NOT_HOPCAT, f"{host}: ssh uses another ProxyCommand: {command}"
        program = words[0] if "/" in words[0] else shutil.which(words[0]) or words[0]
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise _Broken(f"ssh would run {program!r}, which is not an executable file")
        fdpass = settings.get("proxyusefdpass", "no") == "yes"
        hops = _dry_run(words[position:], target, port, fdpass, {**os.environ, **assignments})
    except _Broken as exc:
        return CHECK_BROKEN, f"{host}: broken: {exc}"
    route = "via " + " -> ".join(hop.label() for hop in hops) if hops else "without a proxy"
    shown = " ".join(words[:position])
    return CHECK_USES_HOPCAT, (f"{host}: ssh uses hopcat ({shown}) {route}; ProxyUseFdpass "
                               f"{'yes' if fdpass else 'no'}{caveat}")


def main(args: list[str]) -> int:
    if args[:1] == ["--check"]:
        if len(args) == 4 and args[2] == "--config":
            config: str | None = args[3]
        elif len(args) == 2:
            config = None
        else:
            raise UsageError("usage: hopcat ssh-config --check HOST [--config FILE]")
        code, verdict = check(args[1], config)
        sys.stdout.write(verdict + "\n")
        return code
    pattern, no_fdpass, options = _split_arguments(args)
    if options.help:
        sys.stdout.write(USAGE)
        return 0
    text, notes = stanza(pattern, no_fdpass, options)
    for note in notes:
        sys.stderr.write(f"hopcat: note: {note}\n")
    sys.stdout.write(text)
    return 0
