"""What a typed line means: a message to the current room or an IRC-style command.

Shared by pipe mode and the interactive terminal, so both understand the same
lines. Output goes through callables, so this module never prints. A wrong
command gets one line of usage on ``err``, never an exception.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from client import render
from client.lib import Client, Event, MemberList, ZchatError
from zchat import protocol as p
from zchat.protocol import ProtocolError

HELP = """\
commands:
  TEXT               send TEXT to the current room (//TEXT sends a text starting with /)
  /me ACTION         an action in the current room, shown as * NAME ACTION
  /msg NAME TEXT     direct message to NAME (/msg #ROOM TEXT: to a room you are in)
  /join ROOM         join ROOM and make it the current room
  /switch ROOM       make ROOM (one you are in) the current room
  /leave [ROOM]      leave ROOM (default: the current room)
  /who [ROOM]        who is in ROOM (default: the current room)
  /rooms             list rooms
  /history [N]       the last N events of the current room (default 20, at most 10,000)
  /lastlog TEXT      the chat lines shown so far (the last 2,000) that contain TEXT (any case; terminal only)
  /help              this help
  /quit [TEXT]       leave the chat (TEXT first said in the current room, as IRC's quit message)
  (IRC's spellings work too: /j, /part, /query, /names, /action, /exit)"""

#: The argument hint of each command, for usage lines and completion.
USAGE = {
    "me": "/me ACTION",
    "msg": "/msg NAME TEXT",
    "join": "/join ROOM",
    "switch": "/switch ROOM",
    "leave": "/leave [ROOM]",
    "who": "/who [ROOM]",
    "rooms": "/rooms",
    "history": "/history [N]",
    "lastlog": "/lastlog TEXT",
    "help": "/help",
    "quit": "/quit [TEXT]",
}
#: The most words each command takes after its name; more are refused with its usage line,
#: never ignored. Commands not listed take a text (/me, /msg, /lastlog): any number.
#: (Not /quit: "/quit see you" is IRC's quit with a message: said in the room, then it quits.)
MAX_WORDS = {"join": 1, "switch": 1, "leave": 1, "who": 1, "rooms": 0, "history": 1, "help": 0}
#: Several words where one room goes: what a room name is (it has no spaces).
ROOM_RULE = "a room name has no spaces: 1-32 of a-z 0-9 _ -"
#: Other spellings people bring from IRC.
ALIASES = {"j": "join", "part": "leave", "exit": "quit", "query": "msg", "names": "who", "action": "me"}
COMMANDS = tuple(USAGE)
HISTORY_DEFAULT = 20
#: /history N shows at most this many (a mistyped 1000000 would fill the screen for minutes).
HISTORY_MAX = 10_000


#: After a /join or /switch that failed, plain lines handled within this many seconds
#: are not sent to the room before: typed or pasted while it was under way (a broker
#: that stalled makes a join wait up to 5 s), they may be meant for the room it named.
HOLD_AFTER_FAILURE_S = 2.0
#: A held line that comes again at least this much later was sent again by the user
#: (Up, Enter), not repeated within one paste.
RESENT_AFTER_S = 0.3


def _more(members: MemberList) -> str:
    """What a member list leaves out, said after it: a room of more than 10,000 lists only the first."""
    return f" and {members.total - len(members)} more ({members.total} in all)" if members.truncated else ""


def _who_data(room: str, members: MemberList) -> dict[str, object]:
    """A member list's ``--json`` object: with ``count`` when it is not all of them."""
    data: dict[str, object] = {"type": "who", "room": room, "members": members}
    if members.truncated:
        data["count"] = members.total
    return data


def _rooms(rooms: list[str]) -> str:
    return ", ".join(f"#{room}" for room in rooms)


def last_events(client: Client, room: str, count: int) -> tuple[int, Iterator[Event]]:
    """The room's last seq, and its last ``count`` events from its history, oldest first,
    read page by page (one reply holds at most ``MAX_HISTORY_LIMIT``) as they are taken."""
    _, top = client.history(room, 0, 1)

    def pages() -> Iterator[Event]:
        after = max(0, top - count)
        while after < top:
            events, _ = client.history(room, after, min(top - after, p.MAX_HISTORY_LIMIT))
            events = [e for e in events if e.seq is not None and after < e.seq <= top]
            if not events:
                return
            yield from events
            after = events[-1].seq or top

    return top, pages()


@dataclass
class Commands:
    """Interprets lines for one client; ``current`` is the room plain text goes to."""

    client: Client
    current: str | None
    out: Callable[[str], None]
    err: Callable[[str], None]
    as_json: bool = False
    backlog: int = 0
    #: How events fetched by /history are shown (default: a line on ``out``).
    show: Callable[[Event], None] | None = None
    #: Appended to /help (the interactive client lists its keys there).
    help_extra: str = ""
    #: Members of rooms as last learnt from /join and /who (the UI adds presence).
    members: dict[str, set[str]] = field(default_factory=dict)
    #: Rooms seen in /rooms and /join replies.
    known_rooms: set[str] = field(default_factory=set)
    #: Pipe mode: after a /join or /switch that failed, plain lines are refused rather
    #: than sent to the room before (a script's lines meant for the new room).
    strict: bool = False
    #: The terminal: a /join also lists who is in the room, as IRC clients do.
    join_names: bool = False
    #: The terminal's /lastlog: shows the chat lines shown so far that contain a text (None: not here).
    lastlog: Callable[[str], None] | None = None
    #: What the last /join or /switch asked for, when it failed (None: it did not), and
    #: when (time.monotonic()). Lines handled within HOLD_AFTER_FAILURE_S of it are not
    #: sent: typed (or pasted) while the command was under way, they may be meant for
    #: that room. In pipe mode every line is refused until a /join or /switch succeeds.
    failed: str | None = None
    failed_at: float = 0.0
    #: The lines that hold refused, and when: one sent again later (RESENT_AFTER_S: not a
    #: repeat within the same paste, such as two '---') is the user's answer ("yes, here"),
    #: and goes, as the refusal says; the hold stays for the others.
    held_back: dict[str, float] = field(default_factory=dict)
    #: Pipe mode's --no-commands: every line is a message, one starting with / too
    #: (a log streamed into a room must not run its lines as commands).
    literal: bool = False

    def handle(self, line: str) -> bool:
        """Act on one line; False means the user asked to quit."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return True
        text = self.message_text(line)
        command = text is None
        try:
            if text is None:
                return self._command(line)
            self._say(text)
        except (ZchatError, ProtocolError) as exc:  # refused, or the broker is away: say so, go on
            self._refused(line, command, exc)
        return True

    def message_text(self, line: str) -> str | None:
        """The text ``line`` sends as a message (``//`` sends one ``/``); None for a command."""
        if self.literal or not line.startswith("/"):
            return line
        return line[1:] if line.startswith("//") else None

    def too_long(self, start: str, size: int) -> None:
        """Refuse, without acting on it, a line of ``size`` bytes that begins with ``start``:
        longer than any message or command can be (pipe mode keeps only its start)."""
        command = not self.literal and start.startswith("/") and not start.startswith("//")
        limit = f"the limit is {p.MAX_TEXT_CHARS} characters"
        self._refused(start, command, ProtocolError(p.ErrorCode.TOO_LARGE, f"a line of {size} bytes, {limit}"))

    def _refused(self, line: str, command: bool, exc: ZchatError | ProtocolError) -> None:
        # A script's lines are many and the error comes after them: say which one it
        # was, as the broker's refusals of sent lines do (render.error_text).
        where = "" if command or self.current is None else f"#{self.current}: "
        tag = f" [{render.clean(where + render.excerpt(line))}]" if self.strict else ""
        self.err(f"{exc.code}: {exc.message}{tag}")

    def room_command(self, line: str) -> tuple[str, str] | None:
        """(command, room) if ``line`` is a /join, /switch or /leave (aliases too) of one
        valid room (/leave without one: the current room), else None: as :meth:`handle` reads it."""
        line = line.rstrip("\r\n")
        if self.literal or not line.startswith("/") or line.startswith("//"):
            return None
        name, _, rest = line[1:].partition(" ")
        name, args = ALIASES.get(name.lower(), name.lower()), rest.split()
        if name not in ("join", "switch", "leave") or len(args) > 1:
            return None
        target = args[0] if args else self.current if name == "leave" else None
        try:
            return (name, p.parse_room(target)) if target is not None else None
        except ProtocolError:
            return None

    def _say(self, text: str, *, action: bool = False) -> None:
        # A script's many lines: a refusal says which (the terminal's user just typed it).
        which = f" [{render.clean(render.excerpt(text))}]" if self.strict else ""
        if self.failed is not None:
            if self.strict:
                self.err(
                    f"not sent: {self.failed!r} failed; lines are refused until a /join or /switch succeeds{which}"
                )
                return
            now = time.monotonic()
            if self.current is not None and now - self.failed_at < HOLD_AFTER_FAILURE_S:
                first = self.held_back.setdefault(text, now)
                if now - first < RESENT_AFTER_S:
                    self.err(
                        f"not sent: {self.failed!r} failed just before, and this line may have been meant for it; "
                        f"send it again to write it in #{self.current}"
                    )
                    return
                del self.held_back[text]  # sent again: it goes
            else:
                self.failed = None
                self.held_back.clear()
        if self.current is None:
            self.err(f"{self._no_current()}: /join ROOM first{which}")
            return
        if action:
            self.client.send(self.current, text, action=True)
        else:
            self.client.send(self.current, text)

    def _no_current(self) -> str:
        """Why there is no current room: none joined, or (pipe mode) the last /join or
        /switch failed, while the rooms joined before are still joined."""
        if self.failed is not None and self.client.rooms_joined:
            return f"no current room since {self.failed!r} failed (still in {_rooms(self.client.rooms_joined)})"
        return "not in a room"

    def _no_room(self, line: str) -> None:
        """``line`` (a /join or /switch) failed: what follows must not go to the room before."""
        self.failed, self.failed_at = line, time.monotonic()
        self.held_back.clear()
        if self.strict:
            self.current = None

    def chose(self, room: str) -> None:
        """The user chose the room to write in (a /join, a /switch, a key): lines go there."""
        self.current, self.failed = room, None
        self.held_back.clear()

    def _usage(self, name: str, args: list[str] | None = None) -> None:
        """The command's usage line; with more words than it takes, what is wrong with them."""
        most = MAX_WORDS.get(name)
        rule = ""
        if most is not None and len(args or ()) > most:
            why = "it takes no arguments" if most == 0 else ROOM_RULE if "ROOM" in USAGE[name] else "one number at most"
            rule = f" ({why})"
        self.err(f"usage: {USAGE[name]}{rule}")

    def _command(self, line: str) -> bool:
        name, _, raw = line[1:].partition(" ")
        rest = raw.strip()
        typed = name = name.lower()
        name = ALIASES.get(name, name)
        args = rest.split()
        if len(args) > MAX_WORDS.get(name, len(args)):
            # More words than the command takes: said, never ignored ("/rooms x", "/help me").
            self._usage(name, args)
            if name in ("join", "switch"):
                self._no_room(line)
            return True
        if name == "quit":
            if raw.strip():
                # IRC shows a quit message in the quit line; zchat's leave carries no text,
                # so it is said in the room first (the close waits for its ack), not lost.
                try:
                    self._say(raw.strip())
                except (ZchatError, ProtocolError) as exc:
                    # Quits all the same (a pipe's later lines must not be sent), saying so.
                    self.err(f"not sent, quitting anyway: {exc.code}: {exc.message}")
            return False
        if name == "help":
            text = HELP + ("\n" + self.help_extra if self.help_extra else "")
            self._info(text, {"type": "help", "text": text})
        elif name == "me":
            if not rest:
                self._usage(name)
            else:
                # As typed after "/me ", as a plain line is sent as typed (its spaces too).
                self._say(raw, action=True)
        elif name == "msg":
            # TEXT as typed after "NAME " (its spaces too), as /me and a plain line send theirs.
            to, _, text = raw.lstrip(" ").partition(" ")
            if not to or not text.strip():
                if typed == "query":
                    # (irssi's /query NAME opens a window for NAME: zchat has none.)
                    self.err("usage: /query NAME TEXT (as /msg: zchat opens no query window; each DM is one such line)")
                else:
                    self._usage(name)
            elif to.startswith("#"):
                # As irssi's /msg #channel: to a room we are in, wherever the current one is.
                room = p.parse_room(to)
                if room not in self.client.rooms_joined:
                    self.err(f"/msg {to}: you are not in #{room} (/join #{room} first)")
                else:
                    self.client.send(room, text)
            else:
                self.client.dm(to, text)
        elif name == "join":
            if not args:
                self._usage(name)
                self._no_room(line)
            else:
                try:
                    room = p.parse_room(args[0])
                    members = self.client.join(room, backlog=self.backlog)
                except (ZchatError, ProtocolError):
                    self._no_room(line)
                    raise
                self.members[room] = set(members)
                self.known_rooms.add(room)
                self.chose(room)
                if self.join_names:
                    self._info(f"-!- #{room}: {', '.join(members)}{_more(members)}", _who_data(room, members))
        elif name == "switch":
            if not args:
                self._usage(name)
                self._no_room(line)
            else:
                try:
                    room = p.parse_room(args[0])
                except ProtocolError:
                    self._no_room(line)
                    raise
                if room not in self.client.rooms_joined:
                    self.err(f"not in #{room}: /join #{room} first")
                    self._no_room(line)
                else:
                    self.chose(room)
        elif name == "leave":
            target = args[0] if args else self.current
            if target is None:
                self.err(f"{self._no_current()}: nothing to leave (/leave ROOM)")
            else:
                room = p.parse_room(target)
                self.client.leave(room)
                self.members.pop(room, None)
                if room == self.current:
                    joined = self.client.rooms_joined
                    self.current = joined[-1] if joined else None
        elif name == "who":
            target = args[0] if args else self.current
            if target is None:
                self.err(f"{self._no_current()}: /who ROOM")
            else:
                room = p.parse_room(target)
                members = self.client.who(room)
                if room in self.client.rooms_joined:
                    self.members[room] = set(members)
                self._info(f"-!- #{room}: {', '.join(members) or 'nobody'}{_more(members)}", _who_data(room, members))
        elif name == "rooms":
            rooms = self.client.rooms()
            self.known_rooms.update(r["room"] for r in rooms if isinstance(r.get("room"), str))
            text = "\n".join(
                f"-!- #{r['room']}: {r['members']} online, {r['seq']} event{'' if r['seq'] == 1 else 's'}"
                for r in rooms
            )
            if rooms.truncated:
                text += f"\n-!- and more rooms than the {len(rooms)} listed"
            self._info(text or "-!- no rooms yet", {"type": "rooms", "rooms": rooms, "truncated": rooms.truncated})
        elif name == "history":
            self._history(args)
        elif name == "lastlog":
            if not rest:
                self._usage(name)
            elif self.lastlog is None:
                self.err("/lastlog searches what the terminal client has shown; here, search your own output")
            else:
                self.lastlog(rest)
        else:
            # A typo (/jion, /mgs) gets the command it most likely meant, as git and
            # shells do: "/help lists them" alone sent the user to read the list.
            near = difflib.get_close_matches(name, [*COMMANDS, *ALIASES], n=1, cutoff=0.6)
            self.err(f"unknown command /{name}; {f'did you mean /{near[0]}? ' if near else ''}/help lists them")
        return True

    def _history(self, args: list[str]) -> None:
        count = HISTORY_DEFAULT
        if args and not (args[0].isdigit() and int(args[0]) > 0):
            self.err(f"usage: {USAGE['history']} (N: how many events, 1 to {HISTORY_MAX:,}; {args[0]!r} is not)")
            return
        if args:
            count = min(int(args[0]), HISTORY_MAX)
        room = self.current
        if room is None:
            self.err(f"{self._no_current()}: /join or /switch first")
            return
        _, pages = last_events(self.client, room, count)
        events = list(pages)
        if not self.as_json:
            self.out(f"-!- #{room}: the last {len(events)} event{'' if len(events) == 1 else 's'}")
        for event in events:
            if self.show is not None:
                self.show(event)
            else:
                self.out(render.json_line(event, history=True) if self.as_json else render.text_line(event))

    def _info(self, text: str, data: dict[str, object]) -> None:
        self.out(json.dumps(data, ensure_ascii=False, separators=(",", ":")) if self.as_json else text)
