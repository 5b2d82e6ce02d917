"""Command-line flags that also read an environment variable, for both commands.

A variable is only a default: a flag given on the command line wins over it,
and a bad variable must not stop ``--help``, ``--version`` or a run whose flag
overrides it. So a variable's text is kept as :class:`FromEnv` while argparse
parses (argparse would convert a ``str`` default itself, and its error would not
name the variable), then :func:`resolve` converts and checks what is left of them
exactly as their flags are converted and checked, naming the variable on error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals say what went wrong, not only what is missing:
    a value starting with ``-`` (``--send -x``, taken for a flag) says how to give one;
    a room written ``--room #dev`` unquoted (the shell's comment) says to quote it; and
    a missing required flag names the flags not recognized (``--nmae bob``: a typo)."""

    #: Flags whose value people write with a leading ``#``.
    ROOM_FLAGS = frozenset({"--room"})

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message)
        if missing is not None:
            flag = missing.group(1)
            hint = "give it one"
            if flag in self.ROOM_FLAGS:
                # (The shell dropped "#dev" and what followed as a comment.)
                hint += f": a # starts a comment in the shell, so write {flag} dev or {flag} '#dev'"
            message += f" ({hint}; a value that starts with - goes as {flag}=VALUE)"
        elif message.startswith("the following arguments are required") and (unknown := self._unknown_flags()):
            message += f" (and not recognized: {', '.join(unknown)}; a typo?)"
        super().error(message)

    def _unknown_flags(self) -> list[str]:
        """The flags given that no option takes, even as the abbreviation argparse allows."""
        known = list(self._option_string_actions)
        unknown = []
        for arg in getattr(self, "_argv", []):
            if arg == "--":
                break
            if not arg.startswith("-") or arg == "-" or " " in arg or re.match(r"-\.?\d", arg):
                continue  # a value: -5, -.5, and what argparse takes as one for its space ("-x y")
            flag = arg.split("=", 1)[0]
            if not any(option.startswith(flag) for option in known):
                unknown.append(flag)
        return unknown


@dataclass(frozen=True)
class FromEnv:
    """A flag's default as read from ``variable``, not converted yet."""

    variable: str
    text: str


def default(variable: str, fallback: Any) -> Any:
    """``fallback``, or the text of ``variable`` (set and not empty) to be checked by :func:`resolve`."""
    text = os.environ.get(variable)
    return fallback if text is None or text == "" else FromEnv(variable, text)


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Convert the defaults that came from variables with their flag's ``type`` and
    ``choices``; a bad one exits 2 (as a bad flag does) with a line naming it.
    Which settings came from variables is kept for :func:`given_as`."""
    sources: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        value = getattr(args, action.dest, None)
        if not isinstance(value, FromEnv):
            continue
        try:
            converted = action.type(value.text) if callable(action.type) else value.text
            if action.choices is not None and converted not in action.choices:
                raise argparse.ArgumentTypeError(f"choose one of {', '.join(map(str, action.choices))}")
        except argparse.ArgumentTypeError as exc:
            parser.exit(2, f"{parser.prog}: {value.variable}={value.text!r}: {exc}\n")
        except ValueError:
            what = "a whole number" if action.type is int else "a number"
            parser.exit(2, f"{parser.prog}: {value.variable}={value.text!r}: not {what}\n")
        setattr(args, action.dest, converted)
        sources[action.dest] = value.variable
    setattr(args, _SOURCES, sources)
    return args


_SOURCES = "_zchat_from_env"


def given_as(args: argparse.Namespace, dest: str, flag: str) -> str:
    """How a setting was given, for an error about its value: its variable if it
    came from the environment (after :func:`resolve`), else ``flag``."""
    sources: dict[str, str] = getattr(args, _SOURCES, {})
    return sources.get(dest, flag)


def port(text: str) -> int:
    """A port to connect to, 1-65535, as a flag's ``type`` (libzmq would take 99999 as 34463)."""
    try:
        number = int(text)
    except ValueError:
        # (Not resolve()'s "not a number", which did not say what a port is.)
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (an integer 1-65535)") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (an integer 1-65535)")
    return number
