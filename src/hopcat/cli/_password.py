"""Where a proxy's password comes from when its URL names a user and no password.

Programs such as VS Code and Sourcetree run ssh, and so hopcat, with no terminal, where a
/dev/tty prompt cannot work. For each hop with a user and no password, first found wins:

1. ``--proxy-password-file FILE``: its first line, the same for every hop. Refused when the
   file is too open, by ssh's rule for private keys: no group or other permission bits on a file
   of ours, no other bits on anyone's (a file shared through its group stays usable).
2. ``--proxy-password-command CMD``: ``/bin/sh -c CMD`` once per hop, its first line of stdout.
   It learns which hop asks from ``HOPCAT_PROXY_URL`` (no password in it), ``HOPCAT_PROXY_USER``,
   ``HOPCAT_PROXY_HOST`` and ``HOPCAT_PROXY_PORT``, so one script serves a whole chain.
3. The environment's variables (``hopcat._environment``): options given on the command line are
   the more specific choice, so they win over an exported ``HOPCAT_PROXY_PASSWORD``.
4. The terminal, or an askpass program, by OpenSSH's rules (readpass.c read_passphrase):
   ``DISPLAY`` or ``WAYLAND_DISPLAY`` allows an askpass; ``SSH_ASKPASS_REQUIRE=force`` allows it
   and prefers it to the terminal, ``prefer`` prefers it when allowed, ``never`` forbids it.
   Without a terminal an allowed askpass runs. The program is ``HOPCAT_ASKPASS`` (which, set on
   purpose for hopcat, allows an askpass as a display does), else ``SSH_ASKPASS``, else ssh's
   default path when it is installed. It gets the prompt as argv[1], as ssh's askpass does.

Programs get no stdin (hopcat's is ssh's data) and their stderr is ours, so their complaints
reach the user; a password travels only through a pipe, never through argv or the environment.
A program that fails, prints nothing or (the command) overruns its timeout ends hopcat with exit
77, the authentication code: the credential was sought and not obtained. A missing or too open
file is a usage error (64), like a missing ``--proxy-cacert``.

``subprocess`` is imported only when a program actually runs: ssh starts hopcat once per
connection, and most connections need no password at all.
"""

from __future__ import annotations

import os

from hopcat.errors import ProxyAuthError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Mapping

    from hopcat._url import ProxyURL

PASSWORD_COMMAND_TIMEOUT_S = 60.0
# ssh's compiled-in askpass when SSH_ASKPASS is unset (_PATH_SSH_ASKPASS_DEFAULT as Debian and
# Ubuntu build it, where the ssh-askpass alternatives point).
SSH_ASKPASS_DEFAULT = "/usr/bin/ssh-askpass"
# A password is one line: more than this from a file is not a password file.
MAX_PASSWORD_FILE_BYTES = 65536


def prompt_on_tty(prompt: str) -> str | None:
    """Read a line from the controlling terminal with echo off; None when there is no terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    import termios

    try:
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO
        os.write(fd, prompt.encode())
        # Echo goes off inside the try: a signal (raised as an exception by the CLI) arriving
        # right after it must still find the finally that turns it back on.
        try:
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
            line = b""
            while not line.endswith(b"\n"):
                chunk = os.read(fd, 1)
                if not chunk:
                    break
                line += chunk
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            os.write(fd, b"\n")
        return line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    except (termios.error, OSError):  # OSError: EIO once the terminal hung up
        return None
    finally:
        os.close(fd)


def askpass_plan(environ: Mapping[str, str]) -> tuple[str | None, bool]:
    """(the askpass program hopcat may run or None, whether it goes before the terminal)."""
    own = environ.get("HOPCAT_ASKPASS", "")
    allowed = bool(own or environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))
    first = False
    require = environ.get("SSH_ASKPASS_REQUIRE", "").lower()  # ssh compares with strcasecmp
    if require == "force":
        first = allowed = True
    elif require == "prefer":
        first = allowed
    elif require == "never":
        allowed = False
    if not allowed:
        return None, False
    program = own or environ.get("SSH_ASKPASS", "")
    if not program and os.access(SSH_ASKPASS_DEFAULT, os.X_OK):
        program = SSH_ASKPASS_DEFAULT
    return (program or None), first


def _first_line(data: bytes) -> bytes:
    """Up to the first CR or LF, as ssh reads an askpass's answer."""
    return data.split(b"\n", 1)[0].split(b"\r", 1)[0]


def check_password_file_permissions(path: str, mode: int, owner: int) -> None:
    """UsageError when a password file with this mode and owner is too open (ssh's key rule)."""
    too_open = mode & (0o077 if owner == os.getuid() else 0o007)
    if too_open:
        raise UsageError(
            f"--proxy-password-file {path}: permissions {mode & 0o777:04o} are too open "
            f"(others can read or change it): chmod 600 {path}"
        )


def read_password_file(path: str) -> str:
    """The first line of ``path``; UsageError when it is missing, too open, empty or not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(
            f"--proxy-password-file {path}: {os.strerror(exc.errno or 0).lower()}"
        ) from None
    try:
        info = os.fstat(fd)
        check_password_file_permissions(path, info.st_mode, info.st_uid)
        data = b""
        while b"\n" not in data and b"\r" not in data and len(data) <= MAX_PASSWORD_FILE_BYTES:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise UsageError(
            f"--proxy-password-file {path}: {os.strerror(exc.errno or 0).lower()}"
        ) from None
    finally:
        os.close(fd)
    line = _first_line(data)
    if len(line) > MAX_PASSWORD_FILE_BYTES:
        raise UsageError(f"--proxy-password-file {path}: the first line is too long for a password")
    if not line:
        raise UsageError(f"--proxy-password-file {path}: the first line is empty")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--proxy-password-file {path}: the password is not valid UTF-8") from None


def hop_environment(environ: Mapping[str, str], hop: ProxyURL) -> dict[str, str]:
    """What a password program is told about the hop asking: never a password."""
    env = dict(environ)
    env.update(HOPCAT_PROXY_URL=hop.without_password(), HOPCAT_PROXY_USER=hop.username or "",
               HOPCAT_PROXY_HOST=hop.host, HOPCAT_PROXY_PORT=str(hop.port))  # fmt: skip
    return env


def run_for_password(
    argv: list[str], env: Mapping[str, str], what: str, *, timeout_s: float | None,
    own_group: bool,
) -> str:
    """Run ``argv`` with no stdin and return its first line of stdout; ProxyAuthError (77)
    naming ``what`` when it cannot run, fails, times out or prints nothing usable.

    ``own_group``: start it in a process group of its own, so a timeout ends the whole pipeline
    a shell started, not only the shell. An askpass stays in ours, as ssh runs it: one that
    reads the terminal would be stopped (SIGTTIN) in a background group.
    """
    import subprocess

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                                process_group=0 if own_group else None)  # fmt: skip
    except OSError as exc:
        raise ProxyAuthError(f"{what} could not be run: {os.strerror(exc.errno or 0).lower()}") from None
    answered = False
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        answered = True
    except subprocess.TimeoutExpired:
        raise ProxyAuthError(
            f"{what} gave no password within {timeout_s:g} s; stopped it"
        ) from None
    finally:
        # Also reached by a signal ending hopcat (an exception here): leave no program behind.
        # The group goes even when the shell itself is gone: what it started may hold the pipe.
        if not answered:
            _stop(proc, own_group)
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        status = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                  else f"exited with status {proc.returncode}")  # fmt: skip
        raise ProxyAuthError(f"{what} {status}: no password")
    line = _first_line(out)
    if not line:
        raise ProxyAuthError(f"{what} printed no password")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyAuthError(f"{what} printed a password that is not valid UTF-8") from None


def _stop(proc: subprocess.Popen[bytes], own_group: bool) -> None:
    import signal

    if own_group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group had ended already
    elif proc.poll() is None:
        proc.kill()
    proc.wait()


class PasswordSources:
    """The sources after the URL's own password, asked in order for each hop.

    ``password_for`` is asked per hop (``fill_passwords`` asks before anything is dialled).
    ``trace`` hears where each password came from, never the password.
    """

    def __init__(
        self, environ: Mapping[str, str], *, password_file: str | None = None,
        password_command: str | None = None,
        prompt: Callable[[str], str | None] = prompt_on_tty,
        trace: Callable[[str], None] | None = None,
        command_timeout_s: float = PASSWORD_COMMAND_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.environ = environ
        self.command_timeout_s = command_timeout_s
        self.password_file = password_file
        self.password_command = password_command
        self.prompt = prompt
        self.trace = trace
        self._from_file: str | None = None

    def password_for(self, hop: ProxyURL, index: int = 1, count: int = 1) -> str:
        """The password for ``hop`` (a user and no password), hop ``index`` (1-based) of
        ``count``; errors carry the hop as the chain's do (``where``, ``hop``, ``proxy``)."""
        try:
            password, source = self._lookup(hop)
            if password is None:
                raise UsageError(
                    "a user is given but no password; set HOPCAT_PROXY_PASSWORD, use "
                    "--proxy-password-file or --proxy-password-command, or run where hopcat can "
                    "prompt on a terminal or run an askpass (HOPCAT_ASKPASS)"
                )
        except (UsageError, ProxyAuthError) as exc:
            exc.where = f"proxy {hop.label()} (hop {index}/{count})"
            exc.hop = index
            exc.proxy = hop.label()
            raise
        if self.trace is not None:
            self.trace(f"password for {hop.label()} from {source}")
        return password

    def _lookup(self, hop: ProxyURL) -> tuple[str | None, str]:
        from hopcat._environment import password_variable

        if self.password_file is not None:
            if self._from_file is None:
                self._from_file = read_password_file(self.password_file)
            return self._from_file, "--proxy-password-file"
        if self.password_command is not None:
            password = run_for_password(
                ["/bin/sh", "-c", self.password_command], hop_environment(self.environ, hop),
                "--proxy-password-command", timeout_s=self.command_timeout_s, own_group=True,
            )
            return password, "--proxy-password-command"
        found = password_variable(hop, self.environ)
        if found is not None:
            return found[1], found[0]
        text = f"hopcat: password for {hop.label()}: "
        program, first = askpass_plan(self.environ)
        if program is None or not first:
            typed = self.prompt(text)
            if typed is not None:
                return typed, "the terminal"
        if program is None:
            return None, ""
        password = run_for_password([program, text], hop_environment(self.environ, hop),
                                    f"the askpass program {program}", timeout_s=None,
                                    own_group=False)  # fmt: skip
        return password, f"the askpass program {program}"
