"""GNU-style command-line scanning against an option table, shared by ``hopcat`` and ``hopcat serve``.

Long options as ``--name VALUE`` or ``--name=VALUE``; short ones clustered (``-vv``, ``-46``) with a
value attached or separate (``-X5``, ``-x host:port``); ``--`` ends the options; operands may come
before, between or after options, as nc command lines have them.
"""

from __future__ import annotations

from hopcat.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence


def scan_options(
    argv: Sequence[str], metavar_of: Callable[[str], str | None], *, see: str
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(flag, value)`` per option, flag as typed in full (``--name`` or ``-x``) and value
    None for a switch, and ``("", operand)`` per operand, in command-line order.

    ``metavar_of(flag)`` gives the option's metavar, ``""`` for a switch, None if unknown;
    ``see`` completes the unknown-option message (e.g. "see hopcat --help").
    """
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            for operand in argv[index:]:
                yield "", operand
            return
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            flag = f"--{name}"
            metavar = metavar_of(flag)
            if metavar is None:
                raise UsageError(f"unknown option {flag} ({see})")
            if not metavar:
                if eq:
                    raise UsageError(f"{flag} takes no value")
                yield flag, None
                continue
            if not eq:
                if index >= len(argv):
                    raise UsageError(f"{flag} needs a value ({metavar})")
                inline = argv[index]
                index += 1
            yield flag, inline
            continue
        if arg.startswith("-") and len(arg) > 1:
            for position in range(1, len(arg)):
                flag = f"-{arg[position]}"
                metavar = metavar_of(flag)
                if metavar is None:
                    raise UsageError(f"unknown option {flag} ({see})")
                if not metavar:
                    yield flag, None
                    continue
                value = arg[position + 1 :]
                if not value:
                    if index >= len(argv):
                        raise UsageError(f"{flag} needs a value ({metavar})")
                    value = argv[index]
                    index += 1
                yield flag, value
                break
            continue
        yield "", arg
