"""Turning events into lines for people (text, styled) and programs (JSON). No I/O here.

:func:`text_line` and :func:`json_line` are pipe mode's plain lines. :func:`styled`
is the interactive terminal's line: ``(style, text)`` fragments in prompt_toolkit's
format (plain tuples, so this module does not import prompt_toolkit), with the
indent that :func:`wrap` gives continuation lines. Every text that came over the
wire goes through :func:`clean` first.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
import time
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from client.lib import Event

#: A piece of a styled line: (prompt_toolkit style string, text).
Fragment = tuple[str, str]

#: Names get one of this many colours (``class:nick.0`` … ``class:nick.11``), by a
#: hash of the name that is the same in every process and on every machine.
PALETTE_SIZE = 12

#: The zero-width joiner: terminals disagree on how many cells what it joins takes
#: (tmux counted ``x``+ZWJ+``y`` one cell narrower than we did, and 👩‍💻 as one emoji,
#: and every receiver's prompt moved), so it never reaches the terminal. Between two
#: emoji it is dropped (👩💻: each as wide everywhere); anywhere else shown escaped.
_ZWJ = "\u200d"


def _wide_emoji(ch: str) -> bool:
    code = ord(ch)
    return unicodedata.east_asian_width(ch) == "W" and (code >= 0x1F000 or 0x2600 <= code <= 0x2BFF)


def _joins_emoji(text: str, i: int) -> bool:
    """Whether the ZWJ at ``text[i]`` joins two wide emoji (skin tones and the emoji
    variation selector may stand between the first and the ZWJ: 👩🏽‍💻)."""
    j = i - 1
    while j >= 0 and (text[j] == "\ufe0f" or 0x1F3FB <= ord(text[j]) <= 0x1F3FF):
        j -= 1
    return j >= 0 and i + 1 < len(text) and _wide_emoji(text[j]) and _wide_emoji(text[i + 1])


#: A message's line breaks the terminal shows as breaks, up to this many lines (a text of
#: 4,000 newlines must not push the chat off the screen): past it, escaped as before.
MAX_SHOWN_LINES = 20


def clean_lines(text: str) -> str:
    """:func:`clean`, but a message's first MAX_SHOWN_LINES line breaks are kept as ``\n``
    (a bot's or a ``--send "$(git log -3)"``'s lines read as lines, not ``\x0a``)."""
    if "\n" not in text:
        return clean(text)
    lines = text.replace("\r\n", "\n").split("\n")
    if len(lines) > MAX_SHOWN_LINES:
        lines[MAX_SHOWN_LINES - 1 :] = ["\n".join(lines[MAX_SHOWN_LINES - 1 :])]
    return "\n".join(map(clean, lines))


def clean(text: str) -> str:
    """Neutralise control characters so nobody can drive our terminal with escape codes."""
    if text.isprintable():
        return text
    out = []
    for i, ch in enumerate(text):
        if ch == "\t":
            out.append("    ")
        elif ch == _ZWJ:
            out.append("" if _joins_emoji(text, i) else "\\u200d")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def clock(ts: int | None) -> str:
    t = time.localtime(ts / 1000 if ts is not None else None)
    return time.strftime("%H:%M", t)


#: How the reason of a leave reads (see Event.reason); another is shown as it is.
_LEFT_BECAUSE = {"quit": "quit", "timeout": "timed out", "revoked": "key revoked"}


def presence_text(event: Event, name: str) -> str:
    """``bob joined #dev``, ``bob left #dev``, ``bob left #dev (timed out)``."""
    if event.event == "join":
        return f"{name} joined #{event.room}"
    why = f" ({_LEFT_BECAUSE.get(event.reason) or clean(event.reason)})" if event.reason else ""
    return f"{name} left #{event.room}{why}"


def text_line(event: Event) -> str:
    """One line for a person, irssi-style."""
    when = clock(event.ts)
    name = clean(event.name or "?")
    text = clean(event.text or "")
    if event.type == "msg":
        if event.action:
            return f"{when} #{event.room} * {name} {text}"
        return f"{when} #{event.room} <{name}> {text}"
    if event.type == "presence":
        return f"{when} -!- {presence_text(event, name)}"
    if event.type == "dm":
        if event.own:
            return f"{when} -> *{clean(event.to or '?')}* {text}"
        return f"{when} *{name}* {text}"
    if event.type == "error":
        return f"error {error_text(event)}"
    if event.type == "status":
        return f"{when} -!- {text}"
    return f"{when} {event.type}"


#: Characters json.dumps leaves as they are (with ensure_ascii=False) that some readers
#: take for the end of a line (Python's str.splitlines(), JavaScript before ES2019): escaped,
#: so that one event is one line for every reader. (Inside JSON they can only be in strings.)
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(event: Event, *, history: bool = False) -> str:
    """``event`` as one JSON object, on one line. With ``history``, an event that /history listed:
    marked ``"history": true``, not ``backlog`` (from before your join: /history lists later ones too)."""
    data = event.to_dict()
    if history:
        data.pop("backlog", None)
        data["history"] = True
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_ENDS)


# ------------------------------------------------------------ the terminal UI


def name_colour(name: str) -> int:
    """A stable palette index for ``name`` (crc32: Python's ``hash`` differs per process)."""
    return zlib.crc32(name.encode("utf-8")) % PALETTE_SIZE


class NickColours:
    """Colours for names that people seen in one session do not share while the palette
    lasts: with 12 colours, 5 hashed names share one 62% of the time. A name gets its
    hashed colour, or the next one nobody seen yet has; once given, it keeps it."""

    def __init__(self) -> None:
        self._given: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        colour = self._given.get(name)
        if colour is None:
            first, used = name_colour(name), set(self._given.values())
            free = [i % PALETTE_SIZE for i in range(first, first + PALETTE_SIZE) if i % PALETTE_SIZE not in used]
            colour = self._given[name] = free[0] if free else first
        return colour


def is_own(event: Event, me: str) -> bool:
    """Ours: sent by this session, or (a join's backlog after a restart) by an earlier one
    of our name; names are unique among live sessions, so no one else's live line."""
    return event.own or event.name == me


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` as a word ("bob:", "hi Bob!", not "bobcat")."""
    pattern = r"(?<![\w.-])" + re.escape(name) + r"(?![\w-])"
    return re.search(pattern, text, re.IGNORECASE) is not None


@dataclass(frozen=True, slots=True)
class Styled:
    """One event as the terminal shows it."""

    fragments: list[Fragment]
    #: Continuation lines of a wrapped line start this many cells in (under the text).
    indent: int = 0
    #: A mention of you or a DM to you (the terminal rings the bell for these).
    alert: bool = False

    @property
    def plain(self) -> str:
        return "".join(text for _, text in self.fragments)


def styled(event: Event, me: str, current: str | None, colour: Callable[[str], int] = name_colour) -> Styled:
    """``event`` as styled fragments, irssi-style.

    ``me`` is our name (own messages and mentions look different); a room
    message from a room other than ``current`` is labelled with its room;
    ``colour`` gives a name's palette index.
    """
    when: Fragment = ("class:time", clock(event.ts) + " ")
    name = clean(event.name or "?")
    text = clean_lines(event.text or "") if event.type in ("msg", "dm") else clean(event.text or "")
    fresh = not event.own and not event.backlog
    if event.type == "msg":
        head = [when]
        if event.room != current:
            head.append(("class:room", f"#{event.room} "))
        own = is_own(event, me)
        nick = "class:nick.own" if own else f"class:nick.{colour(name)}"
        mention = not own and mentions(text, me)
        body_style = "class:text.own" if own else "class:text.mention" if mention else "class:text"
        if event.action:
            head += [("class:action", "* "), (nick, name), ("class:action", " ")]
            body_style += " class:action"
        else:
            head += [("class:punct", "<"), (nick, name), ("class:punct", ">"), ("", " ")]
        return Styled([*head, (body_style, text)], _width(head), alert=mention and fresh)
    if event.type == "dm":
        if event.own:
            head = [when, ("class:dm.own", f"-> *{clean(event.to or '?')}*"), ("", " ")]
            return Styled([*head, ("class:text.own", text)], _width(head))
        head = [when, ("class:dm", f"*{name}*"), ("", " ")]
        return Styled([*head, ("class:text.dm", text)], _width(head), alert=fresh)
    if event.type == "presence":
        return Styled([when, ("class:presence", f"-!- {presence_text(event, name)}")], 10)
    if event.type == "status":
        return Styled([when, ("class:status", f"-!- {text}")], 10)
    if event.type == "error":
        return notice(error_text(event), error=True)
    return Styled([when, ("class:info", f"-!- {clean(event.type)}")], 10)


def error_text(event: Event) -> str:
    """``code: message``, and which of our messages it refused, when it answers one: an
    error may come well after the line was typed (a DM ``undelivered``, say)."""
    text = f"{clean(event.code or 'error')}: {clean(event.message or '')}"
    if event.text is None:
        return text
    where = f"DM to {event.to}" if event.to is not None else f"#{event.room}"
    return f"{text} [{clean(where)}: {clean(excerpt(event.text))}]"


def excerpt(text: str, width: int = 40) -> str:
    """The start of ``text``, enough to tell which line an error is about."""
    return text if len(text) <= width else text[: width - 1] + "…"


def day(ts: int | None) -> str:
    """The local date of ``ts`` (ms; None: now), as a day-change line names it."""
    return time.strftime("%a %d %b %Y", time.localtime(ts / 1000 if ts is not None else None))


def short_day(ts: int | None) -> str:
    """``01 Dec``: the date before a line's time where lines of several days meet (/lastlog)."""
    return time.strftime("%d %b", time.localtime(ts / 1000 if ts is not None else None))


def day_changed(date: str) -> Styled:
    """``--- Day changed to Tue 01 Dec 2026``, irssi's mark, with no time of its own."""
    head: list[Fragment] = [("class:info", "--- ")]
    return Styled([*head, ("class:info", f"Day changed to {date}")], _width(head))


def notice(text: str, *, error: bool = False) -> Styled:
    """A line of our own (command output, a refusal): ``-!- text``."""
    head: list[Fragment] = [("class:time", clock(None) + " "), ("class:error" if error else "class:info", "-!- ")]
    return Styled([*head, ("class:error" if error else "class:info", clean(text))], _width(head))


# ------------------------------------------------------------------ wrapping


@functools.lru_cache(maxsize=4096)
def cell_width(ch: str) -> int:
    """Terminal cells ``ch`` takes: 2 for wide (CJK, most emoji), 0 for combining marks.

    Cached: three lookups in the Unicode database a character were most of what wrapping
    a line of another script cost, and a chat uses the same few hundred characters."""
    if unicodedata.combining(ch) or ch == _ZWJ or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    if "\u1160" <= ch <= "\u11ff" or "\ud7b0" <= ch <= "\ud7ff":
        # Hangul's medial vowels and final consonants: with the initial before them they
        # make one syllable of 2 cells (tmux, wcwidth), as Korean decomposed (NFD, as macOS
        # names files) is written. Counted 1 each, such a line wrapped at half the width.
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    if text.isascii():  # (every ASCII character is one cell; see cell_width)
        return len(text)
    return sum(cell_width(ch) for ch in text)


def _width(fragments: list[Fragment]) -> int:
    return sum(text_width(text) for _, text in fragments)


def wrap(fragments: list[Fragment], width: int, indent: int = 0) -> list[list[Fragment]]:
    """Split a styled line into lines of at most ``width`` cells.

    Breaks at the last space that fits (after the first ``indent`` cells, so the
    time and name stay with some text), else between characters; a wide character
    never straddles two lines. Continuation lines start with ``indent`` spaces
    (fewer when the terminal is narrow).
    """
    if any("\n" in text for _, text in fragments):
        # A message's own line breaks (clean_lines): each line after the first starts under
        # the text, as a wrapped one does.
        out: list[list[Fragment]] = []
        for i, hard in enumerate(_split_lines(fragments)):
            out += wrap([("", " " * _fit(width, indent)[1]), *hard] if i else hard, width, indent)
        return out
    if all(text.isascii() for _, text in fragments):
        return _wrap_ascii(fragments, *_fit(width, indent))
    return _wrap_wide(fragments, *_fit(width, indent))


def _split_lines(fragments: list[Fragment]) -> list[list[Fragment]]:
    """``fragments`` cut at each ``\n`` (dropped), each piece keeping its style."""
    lines: list[list[Fragment]] = [[]]
    for style, text in fragments:
        first, *rest = text.split("\n")
        if first:
            lines[-1].append((style, first))
        for piece in rest:
            lines.append([(style, piece)] if piece else [])
    return lines


def _fit(width: int, indent: int) -> tuple[int, int]:
    width = max(width, 2)
    return width, indent if indent <= width // 2 else min(2, width // 2)


def _wrap_cells(fragments: list[Fragment], width: int, indent: int = 0) -> list[list[Fragment]]:
    """:func:`wrap`, a character at a time: any text (wide characters, combining marks)."""
    width, indent = _fit(width, indent)
    lines: list[list[Fragment]] = []
    line: list[Fragment] = []  # one character per fragment while building
    col = 0
    brk = -1  # index in ``line`` of the last space we may break at
    for style, text in fragments:
        for ch in text:
            w = cell_width(ch)
            if col + w > width and line:
                if brk >= 0:
                    rest = line[brk + 1 :]
                    del line[brk:]
                else:
                    rest = []
                lines.append(line)
                line = [("", " ")] * indent + rest
                col = indent + _width(rest)
                brk = -1
            line.append((style, ch))
            col += w
            if ch == " " and col - 1 > indent:
                brk = len(line) - 1
    lines.append(line)
    return [_merge(chars) for chars in lines]


def _wrap_ascii(fragments: list[Fragment], width: int, indent: int) -> list[list[Fragment]]:
    """:func:`wrap` of a line whose every character is one cell, the same lines, by slices.

    wrap's loop costs a few microseconds a character: under a flood of 400-character
    lines it was most of what the terminal client did (3,000 a second could not be shown,
    and keys waited seconds behind them)."""
    text = "".join(t for _, t in fragments)
    starts: list[int] = []  # where each fragment begins in ``text``
    at = 0
    for _, t in fragments:
        starts.append(at)
        at += len(t)
    lines: list[list[Fragment]] = []
    start, lead = 0, 0  # the line's first character in ``text``, and the cells before it
    while True:
        end = start + width - lead  # the first character that does not fit
        if end >= len(text):
            lines.append(_slice(fragments, starts, start, len(text), lead))
            return lines
        # The last space that fits, past the first ``indent`` cells (wrap's rule).
        space = text.rfind(" ", max(start, start + indent - lead + 1), end)
        lines.append(_slice(fragments, starts, start, space if space >= 0 else end, lead))
        start, lead = (space + 1 if space >= 0 else end), indent


def _wrap_wide(fragments: list[Fragment], width: int, indent: int) -> list[list[Fragment]]:
    """:func:`wrap` of any line (wide characters, combining marks), the same lines as the
    character-at-a-time wrap, by slices: :func:`_wrap_ascii` with cells counted by a
    running sum of each character's width instead of by its index."""
    text = "".join(t for _, t in fragments)
    starts: list[int] = []
    at = 0
    for _, t in fragments:
        starts.append(at)
        at += len(t)
    cells = [0, *itertools.accumulate(map(cell_width, text))]  # cells[i]: the width of text[:i]
    n = len(text)
    lines: list[list[Fragment]] = []
    start, lead = 0, 0
    while True:
        # The first character that does not fit (a zero-width one stays with what it marks);
        # at least one, as the character-at-a-time wrap places one on a line however wide.
        end = max(bisect.bisect_right(cells, cells[start] + width - lead, start) - 1, start + 1)
        while end < n and cells[end + 1] == cells[end]:
            end += 1
        if end >= n:
            lines.append(_slice(fragments, starts, start, n, lead))
            return lines
        # The last space that fits, past the first ``indent`` cells: where its cell > indent.
        past = bisect.bisect_right(cells, cells[start] + indent - lead, start, end)
        space = text.rfind(" ", max(start, past), end)
        lines.append(_slice(fragments, starts, start, space if space >= 0 else end, lead))
        start, lead = (space + 1 if space >= 0 else end), indent


def _slice(fragments: list[Fragment], starts: list[int], begin: int, end: int, lead: int) -> list[Fragment]:
    """The characters ``begin`` to ``end`` of the joined ``fragments``, after ``lead`` spaces, as _merge leaves them."""
    out: list[Fragment] = [("", " " * lead)] if lead else []
    # From the fragment ``begin`` is in, to the one ``end`` is in: a wrapped chat line is a
    # few short fragments and a long text, and every line cut from it went through them all.
    first = bisect.bisect_right(starts, begin) - 1
    for i in range(max(first, 0), len(fragments)):
        at = starts[i]
        if at >= end:
            break
        style, t = fragments[i]
        piece = t[begin - at if begin > at else 0 : end - at]
        if not piece:
            continue
        if out and out[-1][0] == style:
            out[-1] = (style, out[-1][1] + piece)
        else:
            out.append((style, piece))
    while out and not out[-1][1].strip() and out[-1][0] == "":
        out.pop()
    return out


def _merge(chars: list[Fragment]) -> list[Fragment]:
    """Join neighbouring characters of the same style back into fragments."""
    out: list[Fragment] = []
    for style, ch in chars:
        if out and out[-1][0] == style:
            out[-1] = (style, out[-1][1] + ch)
        else:
            out.append((style, ch))
    while out and not out[-1][1].strip() and out[-1][0] == "":
        out.pop()  # no trailing blanks (a line of only the indent stays empty)
    return out
