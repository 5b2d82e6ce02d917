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
from dataclasses import dataclass
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a value starting with ``-`` (``--send -x``,
    taken for a flag) says how to give one: else it only says a value is missing."""

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message)
        if missing is not None:
            flag = missing.group(1)
            message += f" (give it one; a value that starts with - goes as {flag}=VALUE)"
        super().error(message)


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
