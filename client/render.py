"""Turning events into lines for people (text) and programs (JSON). No I/O here."""

from __future__ import annotations

import json
import time
import unicodedata

from client.lib import Event


def clean(text: str) -> str:
    """Neutralise control characters so nobody can drive our terminal with escape codes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\t":
            out.append("    ")
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


def text_line(event: Event) -> str:
    """One line for a person, irssi-style."""
    when = clock(event.ts)
    name = clean(event.name or "?")
    text = clean(event.text or "")
    if event.type == "msg":
        return f"{when} #{event.room} <{name}> {text}"
    if event.type == "presence":
        verb = "joined" if event.event == "join" else "left"
        return f"{when} -!- {name} {verb} #{event.room}"
    if event.type == "dm":
        if event.own:
            return f"{when} -> *{clean(event.to or '?')}* {text}"
        return f"{when} *{name}* {text}"
    if event.type == "error":
        return f"error {event.code}: {clean(event.message or '')}"
    return f"{when} {event.type}"


def json_line(event: Event) -> str:
    return json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
