"""What a typed line means: a message to the current room or an IRC-style command.

Shared by pipe mode and the interactive terminal, so both understand the same
lines. Output goes through two callables, so this module never prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from client.lib import Client, ZchatError
from zchat.protocol import ProtocolError

HELP = """\
commands:
  TEXT               send TEXT to the current room (//TEXT sends a text starting with /)
  /msg NAME TEXT     direct message to NAME
  /join ROOM         join ROOM and make it the current room
  /leave [ROOM]      leave ROOM (default: the current room)
  /who [ROOM]        who is in ROOM (default: the current room)
  /rooms             list rooms
  /help              this help
  /quit              leave the chat"""


@dataclass
class Commands:
    """Interprets lines for one client; ``current`` is the room plain text goes to."""

    client: Client
    current: str | None
    out: Callable[[str], None]
    err: Callable[[str], None]
    as_json: bool = False
    backlog: int = 0

    def handle(self, line: str) -> bool:
        """Act on one line; False means the user asked to quit."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return True
        try:
            if line.startswith("/") and not line.startswith("//"):
                return self._command(line)
            self._say(line[1:] if line.startswith("//") else line)
        except (ZchatError, ProtocolError) as exc:  # refused, or the broker is away: say so, go on
            self.err(f"{exc.code}: {exc.message}")
        return True

    def _say(self, text: str) -> None:
        if self.current is None:
            self.err("not in a room: /join ROOM first")
            return
        self.client.send(self.current, text)

    def _command(self, line: str) -> bool:
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        name = name.lower()
        if name in ("quit", "exit"):
            return False
        if name == "help":
            self._info(HELP, {"type": "help", "text": HELP})
        elif name == "msg":
            to, _, text = rest.partition(" ")
            if not to or not text.strip():
                self.err("usage: /msg NAME TEXT")
            else:
                self.client.dm(to, text)
        elif name == "join":
            if not rest:
                self.err("usage: /join ROOM")
            else:
                room = rest.split()[0]
                self.client.join(room, backlog=self.backlog)
                self.current = room.removeprefix("#").lower()
        elif name == "leave":
            target = rest.split()[0] if rest else self.current
            if target is None:
                self.err("usage: /leave ROOM")
            else:
                self.client.leave(target)
                left = target.removeprefix("#").lower()
                if left == self.current:
                    joined = self.client.rooms_joined
                    self.current = joined[-1] if joined else None
        elif name == "who":
            target = rest.split()[0] if rest else self.current
            if target is None:
                self.err("usage: /who ROOM")
            else:
                members = self.client.who(target)
                room = target.removeprefix("#").lower()
                self._info(
                    f"-!- #{room}: {', '.join(members) or 'nobody'}", {"type": "who", "room": room, "members": members}
                )
        elif name == "rooms":
            rooms = self.client.rooms()
            text = "\n".join(f"-!- #{r['room']}: {r['members']} online, {r['seq']} events" for r in rooms)
            self._info(text or "-!- no rooms yet", {"type": "rooms", "rooms": rooms})
        else:
            self.err(f"unknown command /{name}; /help lists them")
        return True

    def _info(self, text: str, data: dict[str, object]) -> None:
        self.out(json.dumps(data, ensure_ascii=False, separators=(",", ":")) if self.as_json else text)
