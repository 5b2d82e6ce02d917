"""The interactive terminal client: events print above a prompt that typing keeps intact.

prompt_toolkit owns the terminal. One asyncio loop thread does everything: it
runs the prompt, and a task on it pumps the client's sockets every few
milliseconds, so no zmq socket is ever touched from another thread. Events
are printed above the prompt in batches with ``in_terminal`` (erase the
prompt, print, draw the prompt again with the half-typed line and its cursor
as they were, all in one write), so however fast messages arrive the input
line is never broken.

The prompt never returns a line: Enter (and a multi-line paste) hand the line
to :class:`~client.commands.Commands` while the prompt keeps running; /quit,
Ctrl-D on an empty line or Ctrl-C on an empty line end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from prompt_toolkit import PromptSession, search
from prompt_toolkit.application import in_terminal, run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.filters import emacs_insert_mode, is_searching, vi_insert_mode
from prompt_toolkit.formatted_text import FormattedText, StyleAndTextTuples
from prompt_toolkit.input import Input
from prompt_toolkit.input.vt100 import Vt100Input
from prompt_toolkit.input.vt100_parser import Vt100Parser
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.key_binding.bindings.named_commands import get_by_name
from prompt_toolkit.keys import Keys
from prompt_toolkit.output import ColorDepth, Output
from prompt_toolkit.renderer import print_formatted_text
from prompt_toolkit.search import SearchDirection
from prompt_toolkit.shortcuts import CompleteStyle
from prompt_toolkit.styles import Attrs, Style

from client import render
from client.cli import not_acknowledged_why, terminal_gone, terminating_signals, unsent_lines
from client.commands import ALIASES, COMMANDS, Commands
from client.lib import Client, Event, ZchatError
from zchat import protocol as p

#: How often the client's sockets are read (the loop sleeps in between).
PUMP_INTERVAL_S = 0.02
#: Longest a turn of the pump loop shows events (taken SHOW_BATCH at a time, each batch
#: printed before the next is taken) before it lets keys in and the prompt be drawn: a
#: turn showed all the sockets had, and under a flood a key waited behind thousands of
#: lines. The rest wait in the library, which holds at most max_queue of them (and fetches
#: what it dropped once it has room). The printing counts: wrapping and writing a line
#: costs 2-4 times what styling it does, and a slice that timed the styling alone printed
#: some 1,000 lines after its 30 ms (50-120 ms more before a key was read).
SHOW_SLICE_S = 0.03
SHOW_BATCH = 100
SLICE_GAP_S = 0.001
#: Plain copies of the last lines shown (``ChatUI.transcript``).
TRANSCRIPT_LINES = 2000
#: In a room of more members than this, the joins and leaves of those who have not
#: spoken there for FOLD_QUIET_S are summed up in a line every FOLD_EVERY_S (as irssi
#: and weechat hide or fold them in big rooms): 500 members coming back after a broker
#: restart wrote 500 lines, and the chat scrolled away under them.
FOLD_MEMBERS = 50
FOLD_QUIET_S = 600.0
FOLD_EVERY_S = 2.0
#: A paste of more complete lines than this waits for Enter (Ctrl-C drops it), as
#: irssi asks: the wrong clipboard (a log, a config file) must not go to a room at once.
PASTE_CONFIRM_LINES = 5

KEYS_HELP = """\
keys:
  Alt-1 … Alt-9, 0   switch to the 1st … 9th, 10th room you are in (the bar below lists them)
  Alt-A              go to a room that mentioned you (marked ! in the bar), else the first with unread lines
  Tab / Shift-Tab    complete a command, a name or a #room; again: the next / previous match
                     (names: who spoke last first)
  Up / Down          recall earlier lines
  Ctrl-R             search earlier lines (again: further back; Enter: take the line;
                     Ctrl-C or Ctrl-G: cancel)
  Ctrl-A/E, Ctrl-K/U/W, Alt-B/F ...  edit the line as readline does; Ctrl-L redraws it
  PgUp / PgDn        nothing: the chat scrolls up into the terminal's own scrollback
                     (in tmux: copy mode, prefix then [; elsewhere mostly Shift-PgUp)
  Enter / Ctrl-C     on a paste of over 5 lines, held: send it / drop it
  Ctrl-C             clear the line (on an empty line: quit); Ctrl-D on an empty line: quit
  Ctrl-Z             suspend (fg resumes; away for over 15 s, it reconnects and catches up; needs job control)"""

_DIM = "dim" if "dim" in Attrs._fields else ""
#: Readable on dark and light backgrounds: the terminal's own 16 colours, minus black, white, grey.
_PALETTE = (
    "ansired",
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightyellow",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
)
assert len(_PALETTE) == render.PALETTE_SIZE

STYLE = Style.from_dict(
    {
        "time": "ansibrightblack",
        "room": "ansicyan bold",
        "punct": "ansibrightblack",
        **{f"nick.{i}": colour for i, colour in enumerate(_PALETTE)},
        "nick.own": "bold",
        "text": "",
        "text.own": "ansibrightblack",
        "text.mention": "bold ansiyellow",
        "text.dm": "ansimagenta",
        "action": "italic",
        "dm": "ansimagenta bold",
        "dm.own": "ansimagenta",
        "presence": f"ansibrightblack {_DIM}",
        "status": "ansiyellow",
        "info": "ansicyan",
        "error": "ansired bold",
        "prompt.room": "ansicyan bold",
        "prompt.name": "bold",
        "prompt.state": "ansiyellow bold",
        "bottom-toolbar": "reverse",
        "bottom-toolbar.current": "bold",
        "bottom-toolbar.unread": "bold underline",
        "bottom-toolbar.mention": "bold underline ansiyellow",
        "bottom-toolbar.state": "",
        "bottom-toolbar.state.away": "bold",
    }
)

#: Client.state (lib.py) in words for the prompt and the bar.
_STATE_WORDS = {"new": "connecting", "connected": "connected", "reconnecting": "reconnecting", "closed": "disconnected"}


def connection_status(client: object) -> str:
    """The connection state of ``client`` as shown to the user: "connected", "reconnecting", ….

    A client without a ``state`` attribute (a library without reconnect) counts as connected.
    """
    state = getattr(client, "state", "connected")
    return _STATE_WORDS.get(str(state), str(state))


def run_interactive(
    client: Client,
    room: str,
    backlog: int,
    *,
    color: bool = True,
    bell: bool = True,
    input: Input | None = None,
    output: Output | None = None,
) -> int:
    """Run the terminal UI until the user quits; returns the exit status."""
    return asyncio.run(ChatUI(client, room, backlog, color=color, bell=bell, input=input, output=output).run())


def job_control() -> bool:
    """Whether stopping this process could work: a shell with job control started it.

    Such a shell gives each job a process group of its own, while a session leader
    started without one (``tmux new zchat``, ``ssh -t host zchat``) shares its group
    with us; that group is orphaned, and the kernel discards a stop signal sent to it.
    """
    return os.getpgrp() != os.getsid(0)


class _RawInput(Vt100Input):
    """The terminal, kept in raw mode while we print above the prompt.

    prompt_toolkit's ``in_terminal`` switches to cooked mode around a print (it
    expects arbitrary programs to run there). For a few lines of chat that is
    harmful: a key typed at that instant would be echoed into the chat, and
    Ctrl-C would raise SIGINT. In raw mode the key simply waits to be read.
    Only while the process is suspended (Ctrl-Z) does the shell get its terminal
    back as it was.
    """

    suspending = False

    def cooked_mode(self) -> AbstractContextManager[None]:
        return super().cooked_mode() if self.suspending else contextlib.nullcontext()


#: A whole CSI sequence, as a terminal sends for a key: ESC [, parameters, a final byte.
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]\Z")


class _KeyParser(Vt100Parser):
    """prompt_toolkit's parser of the keys typed, which also drops a key it cannot decode.

    Its table lacks some modified keys (Alt-F1 is ESC [ 1 ; 3 P); it read such a
    sequence as Escape and plain characters, and "[1;3P" went into the line.
    """

    def _get_match(self, prefix: str) -> Keys | tuple[Keys, ...] | None:
        match = super()._get_match(prefix)
        if match is None and _CSI.match(prefix):
            return Keys.Ignore
        return match


@dataclass
class _BarRoom:
    """A room's entry in the bar: its place there (1 on), what it shows, and how it ranks
    when they do not all fit (0: the current room, 1: a mention, 2: unread lines, 3: none)."""

    place: int
    rank: int
    style: str
    text: str
    #: Its number and count without the name (" 7:…(2!)"), for a room with activity; "" if none.
    short: str


def _squeezed(entries: list[_BarRoom], width: int) -> StyleAndTextTuples:
    """The rooms of a bar ``width`` cells wide that cannot show them all, as irssi's
    activity list: the current room, then rooms that mentioned you, then rooms with unread
    lines, then the rest (each in bar order, keeping its number), and ``+N`` for the N
    left out. A room with activity whose name does not fit shows its number and count."""
    marker = f" +{len(entries)}"
    free = width - render.text_width(marker)
    kept: dict[int, tuple[str, str]] = {}
    for entry in sorted(entries, key=lambda e: (e.rank, e.place)):
        for text in (entry.text, entry.short if entry.rank in (1, 2) else ""):
            if text and (render.text_width(text) <= free or entry.rank == 0):
                kept[entry.place] = (entry.style, text)
                free -= render.text_width(text)
                break
        else:
            break  # (what ranks lower is not shown before it)
    out: StyleAndTextTuples = [kept[place] for place in sorted(kept)]
    left = [e for e in entries if e.place not in kept]
    if left:
        # In the style of the most pressing room it hides (none, if they have no activity).
        out.append((min(left, key=lambda e: e.rank).style, f" +{len(left)}"))
    return out


class ChatUI:
    """One terminal session: a prompt at the bottom, the chat scrolling above it."""

    def __init__(
        self,
        client: Client,
        room: str | None,
        backlog: int = 0,
        *,
        color: bool = True,
        bell: bool = True,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.client = client
        if input is None and sys.stdin.isatty():
            input = _RawInput(sys.stdin)
        if isinstance(input, Vt100Input):
            input.vt100_parser = _KeyParser(input.vt100_parser.feed_key_callback)
        self.bell = bell
        self.color = color and not os.environ.get("NO_COLOR")
        #: The room whose lines show unlabelled since the last "now talking in" mark.
        self._talking_in = room
        self._hinted = False
        self.commands = Commands(
            client,
            room,
            self._out,
            self._err,
            backlog=max(0, backlog),
            join_names=True,
            show=self._show,
            help_extra=KEYS_HELP,
            lastlog=self.lastlog,
        )
        #: Plain text of the lines shown, newest last (one per event, before wrapping).
        self.transcript: deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        #: Chat events only (messages, DMs, joins and leaves): what /lastlog searches and
        #: shows, each with its date and room (not its own output, nor other notices).
        #: Rendered so when asked: labelled as each came, they cost a flood twice the styling.
        self._said: deque[Event] = deque(maxlen=TRANSCRIPT_LINES)
        #: Per room, the backlog events shown since the last mark of where they end.
        self._backlog: dict[str, int] = {}
        #: The first room when the session this run took back (a killed zchat's saved token)
        #: was in it already: its join published nothing, and its backlog is not from before
        #: a join of ours but from before this start (until a /join or /leave of it).
        self._stayed_in: set[str] = {room} if room is not None and room in client.resumed_rooms else set()
        #: /leave lines that wait for the room's messages to be acknowledged (by room):
        #: run from the pump loop once they are, so the screen never freezes meanwhile.
        self._leaving: dict[str, str] = {}
        #: Names we have exchanged DMs with (for completion), by p.name_key: as a DM from them
        #: spells them, else as we wrote to them (a /msg BOB reaches bob: one name).
        self.dm_peers: dict[str, str] = {}
        #: Who spoke when (a count of the messages seen), by p.name_key, for completion:
        #: latest first, as irssi.
        self._spoke: dict[str, int] = {}
        self._ticks = itertools.count()
        #: When each name last spoke in each room (time.monotonic()), by (room, p.name_key).
        self._spoke_at: dict[tuple[str, str], float] = {}
        #: Folded joins and leaves (see FOLD_MEMBERS) by room, and when their line is due.
        self._folded: dict[str, list[int]] = {}
        #: The time (ms) of each room's last folded event: its summed-up line's time and date.
        self._folded_ts: dict[str, int | None] = {}
        self._fold_due = 0.0
        #: What the last Tab inserted, while the line is as it left it: Tab again cycles.
        self._cycle: _Cycle | None = None
        #: Room -> messages that arrived there while another room was current.
        self.unread: dict[str, int] = {}
        #: Rooms where such a message mentioned us, in the order of their first mention since.
        self.mentioned: dict[str, None] = {}
        #: Lines queued to be shown, and lines printed to the terminal so far.
        self.lines_shown = 0
        self.lines_printed = 0
        self._pending: list[render.Styled] = []
        self._ring = False
        self._quit = False
        #: A paste of many lines, held until Enter sends it or Ctrl-C drops it.
        self._held: list[str] = []
        #: The input line (its history entry, its cursor) when Ctrl-R began a search: Ctrl-C brings it back.
        self._before_search: tuple[int, int] | None = None
        #: Each name's colour, distinct among the people seen while the palette lasts.
        self._colours = render.NickColours()
        #: The date of the last line shown: lines show only the time, so a new date gets a line.
        self._day = render.day(None)
        #: The signal (SIGTERM, SIGHUP) that ended the session, if one did.
        self._signalled = 0
        self._failure: BaseException | None = None
        self._completer = _ChatCompleter(self)
        self.session: PromptSession[str] = PromptSession(
            self.prompt,
            bottom_toolbar=self.toolbar,
            completer=self._completer,
            complete_style=CompleteStyle.READLINE_LIKE,
            complete_while_typing=False,
            erase_when_done=True,
            key_bindings=self._key_bindings(),
            style=STYLE,
            color_depth=None if self.color else ColorDepth.DEPTH_1_BIT,
            input=input,
            output=output,
        )
        # Enter hands the line over and keeps the prompt (and its history) going.
        self.session.default_buffer.accept_handler = self._accept

    # ------------------------------------------------------------ state

    @property
    def current(self) -> str | None:
        return self.commands.current

    @property
    def rooms(self) -> list[str]:
        return self.client.rooms_joined

    def names(self) -> list[str]:
        """Everyone we know of: members of our rooms and DM partners, not us; each once,
        as they spell themselves (names that differ only in case are one name)."""
        joined = set(self.rooms)
        found = dict(self.dm_peers)
        for room, members in self.commands.members.items():
            if room in joined:
                found.update((p.name_key(name), name) for name in members)
        found.pop(p.name_key(self.client.name), None)
        # Who spoke last first (the one being answered, mostly), then by name.
        return sorted(found.values(), key=lambda name: (-self._spoke.get(p.name_key(name), -1), name.lower()))

    def next_active(self) -> str | None:
        """Where Alt-A goes: the room that mentioned us first, else the first in the bar with unread lines."""
        joined = self.rooms
        for room in self.mentioned:
            if room in joined:
                return room
        return next((room for room in joined if self.unread.get(room)), None)

    def switch(self, room: str) -> None:
        self.commands.chose(room)
        self.unread.pop(room, None)
        self.mentioned.pop(room, None)
        if room != self._talking_in:
            # One stream for every room, and lines of the current one carry no label:
            # a mark where that changes says which room the unlabelled lines above are.
            # How the stream reads is said once; later switches only name the room.
            hint = "" if self._hinted else "; lines of other rooms show their #name"
            self._talking_in, self._hinted = room, True
            self._out(f"now talking in #{room}{hint}")
        self.session.app.invalidate()

    # ------------------------------------------------------------ running

    async def run(self) -> int:
        self._learn()
        self._catch_terminating()
        pump = asyncio.create_task(self._pump_loop())
        # A bug in a key handler is said in the chat, which goes on; prompt_toolkit's
        # handler would print a traceback over the screen and wait for Enter.
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        try:
            await self.session.prompt_async(set_exception_handler=False)
        except (EOFError, KeyboardInterrupt):
            pass
        except OSError as exc:
            if not terminal_gone(exc):
                raise
            # A hang-up with no SIGHUP (SIGHUP ignored, or zchat not in the terminal's
            # session): end as SIGHUP does, rather than on a traceback nobody sees.
            self._signalled = int(signal.SIGHUP)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if self._signalled:
            # The terminal may be gone (SIGHUP): no settling; the caller says bye.
            return 128 + self._signalled
        # Joins and leaves summed up but not due yet (up to FOLD_EVERY_S of them): the
        # screen's last lines are what the user reads of the room after quitting.
        self._show_folded(now=True)
        await self._flush()  # what came with the last pump (the app is gone: printed directly)
        if self._held:
            print(f"zchat: a paste of {len(self._held)} lines was held for Enter and not sent", file=sys.stderr)
        if self._failure is not None:
            print(f"zchat: internal error: {self._failure!r}", file=sys.stderr)
            return 1
        if self.client.state == "closed":
            return 1
        return await self._settle()

    def _catch_terminating(self) -> None:
        """SIGTERM and SIGHUP (the terminal closed) quit as /quit does, through the
        loop: raised from a signal handler, they could land anywhere in it (and hang
        prompt_toolkit's cleanup with the terminal left raw)."""
        loop = asyncio.get_running_loop()
        for sig in terminating_signals():
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no add_signal_handler there
                loop.add_signal_handler(sig, self._terminated, int(sig))

    def _terminated(self, signum: int) -> None:
        if not self._signalled:
            self._signalled = signum
            self._quit = True
            if self.session.app.is_running:
                self.session.app.exit(result="")

    async def _settle(self) -> int:
        """Quitting with lines the broker has not acknowledged yet (held by a rate limit,
        or typed while reconnecting): wait for them while they keep going out, and say
        so; Ctrl-C quits at once. 1 if some were never sent."""
        if not self.client.unacked:
            return 0
        print(
            f"zchat: sending {self.client.unacked} message(s) the broker has not acknowledged yet"
            " (Ctrl-C: quit without them)",
            file=sys.stderr,
        )
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            for _ in self.client.settling():
                for event in self.client.drain_events():
                    self._show(event)
                await self._flush()
                await asyncio.sleep(0)  # where a Ctrl-C (asyncio cancels this task) lands
        for event in self.client.drain_events():
            self._show(event)
        await self._flush()
        if self.client.unacked:
            # Sent, but not acknowledged: some may have arrived (the broker was slow, or
            # its acks were lost). "Not sent" would have the user type them again.
            why = not_acknowledged_why(self.client)
            print(f"zchat: {self.client.unacked} message(s) not acknowledged {why}:", file=sys.stderr)
            for line in unsent_lines(self.client):
                print(line, file=sys.stderr)
            return 1
        return 0

    def _learn(self) -> None:
        """Who is in our first room and which rooms exist, for completion."""
        with contextlib.suppress(ZchatError):
            for room in self.rooms:
                self.commands.members[room] = set(self.client.who(room))
            self.commands.known_rooms.update(r["room"] for r in self.client.rooms() if isinstance(r.get("room"), str))

    async def _pump_loop(self) -> None:
        state = connection_status(self.client)
        try:
            while True:
                if self.client.state != "closed":  # (a command's own pumping may have closed it)
                    self.client.pump(0)
                backlog_now: set[str] = set()
                slice_end = time.monotonic() + SHOW_SLICE_S
                while True:
                    events = self.client.drain_events(SHOW_BATCH)
                    more = len(events) == SHOW_BATCH
                    for event in events:
                        if not event.backlog and event.room in self._backlog:
                            self._end_backlog(event.room)  # a live one of that room: it is over
                        self._show(event)
                        if event.backlog and event.room:
                            self._backlog[event.room] = self._backlog.get(event.room, 0) + 1
                            backlog_now.add(event.room)
                    await self._flush()
                    if not more or time.monotonic() >= slice_end:
                        break
                if not more:  # (a backlog may go on in what is still queued)
                    self._mark_backlog_ends(backlog_now)
                self._show_folded()
                for room, line in list(self._leaving.items()):
                    if room not in self.client.rooms_joined:
                        del self._leaving[room]  # left meanwhile (or its rejoin refused)
                    elif not self.client.unacked_in(room) and self.client.state == "connected":
                        del self._leaving[room]
                        self.handle(line)
                now = connection_status(self.client)
                if now != state:
                    state = now
                    self.session.app.invalidate()
                await self._flush()
                if self.client.state == "closed":  # closed under us (session_moved): it said why
                    self._quit = True
                    if self.session.app.is_running:
                        self.session.app.exit(result="")
                    return
                # With events still queued, only the keys and a redraw go first. (A sleep of 0
                # did not let the keys in: the pipe input of the tests waited for the last slice.)
                await asyncio.sleep(SLICE_GAP_S if more else PUMP_INTERVAL_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not a chat condition: end cleanly and say so
            if isinstance(exc, OSError) and terminal_gone(exc):
                self._signalled = int(signal.SIGHUP)
            else:
                self._failure = exc
            if self.session.app.is_running:
                self.session.app.exit(result="")

    async def _flush(self) -> None:
        """Print what is pending above the prompt, in one go, wrapped to the terminal's width.

        ``in_terminal`` erases the prompt, lets us print, and draws the prompt
        again (typed text and cursor as they were) in the same write, with the
        keyboard detached meanwhile; the terminal stays in raw mode (see
        :class:`_RawInput`), so a key typed at that instant waits, unechoed.
        """
        if not self._pending:
            return
        output = self.session.app.output
        async with in_terminal():
            # Taken only now: in_terminal may first wait for an earlier print.
            pending, self._pending = self._pending, []
            ring, self._ring = self._ring, False
            width = output.get_size().columns
            fragments: StyleAndTextTuples = []
            for line in pending:
                for part in render.wrap(line.fragments, width, line.indent):
                    fragments.extend(part)
                    fragments.append(("", "\n"))
            depth = ColorDepth.DEPTH_1_BIT if not self.color else None
            print_formatted_text(output, FormattedText(fragments), STYLE, color_depth=depth)
        output.flush()  # (when no prompt is running; otherwise its redraw has flushed)
        if ring and self.bell:
            output.bell()
        self.lines_printed += len(pending)

    # ------------------------------------------------------------ events and lines

    def _emit(self, line: render.Styled) -> None:
        self._pending.append(line)
        self.transcript.append(line.plain)
        self.lines_shown += 1

    def _show(self, event: Event) -> None:
        """Track what an event tells us (members, unread rooms), then queue its line."""
        if event.type != "presence" and event.room is not None:
            self._flush_folded(event.room)  # what was summed up came before this line
        if event.type == "presence" and event.room and event.name:
            members = self.commands.members.setdefault(event.room, set())
            big = len(members) > FOLD_MEMBERS
            folded = big and self._fold(event.room, event.name, event.event == "join", event.ts)
            if not folded:
                # Summed-up joins and leaves came before this one: shown first, not after it
                # (a room that shrank below FOLD_MEMBERS showed each later leave, then "12 left").
                self._flush_folded(event.room)
            if event.event == "join":
                members.add(event.name)
            else:
                members.discard(event.name)
            if folded:
                return
        elif event.type == "msg" and event.room and event.name:
            self.commands.members.setdefault(event.room, set()).add(event.name)
            self._spoke[p.name_key(event.name)] = next(self._ticks)
            if not event.backlog:
                self._spoke_at[(event.room, p.name_key(event.name))] = time.monotonic()
            if event.room != self.current and not render.is_own(event, self.client.name) and not event.backlog:
                self.unread[event.room] = self.unread.get(event.room, 0) + 1
                self.session.app.invalidate()
        elif event.type == "dm":
            peer = event.to if event.own else event.name
            if peer:
                key = p.name_key(peer)
                if event.own:
                    self.dm_peers.setdefault(key, peer)
                else:
                    self.dm_peers[key] = peer
                self._spoke[key] = next(self._ticks)
        elif event.type == "status":
            self.session.app.invalidate()
        line = render.styled(event, self.client.name, self.current, self._colours)
        self._ring |= line.alert
        if line.alert and event.type == "msg" and event.room and event.room != self.current:
            # The bell rang, but the line scrolls away among the rest: the bar keeps it.
            self.mentioned.setdefault(event.room, None)
        self._mark_day(event.ts)
        self._emit(line)
        if event.type in ("msg", "dm", "presence"):
            self._said.append(event)

    def _fold(self, room: str, name: str, joined: bool, ts: int | None) -> bool:
        """Count a join or leave of a big room into its summed-up line, unless it is ours or
        of someone who spoke there lately (whom a reader may be waiting for, or answering)."""
        now = time.monotonic()
        if p.name_key(name) == p.name_key(self.client.name):
            return False
        spoke = self._spoke_at.get((room, p.name_key(name)))
        if spoke is not None and now - spoke < FOLD_QUIET_S:
            return False
        if not self._folded:
            self._fold_due = now + FOLD_EVERY_S
        self._folded.setdefault(room, [0, 0])[0 if joined else 1] += 1
        self._folded_ts[room] = ts
        return True

    def _show_folded(self, *, now: bool = False) -> None:
        """The summed-up joins and leaves, once their line is due (or ``now``)."""
        if not self._folded or not (now or time.monotonic() >= self._fold_due):
            return
        for room in list(self._folded):
            self._flush_folded(room)

    def _flush_folded(self, room: str) -> None:
        """The room's summed-up joins and leaves, shown now if there are any."""
        if (counts := self._folded.pop(room, None)) is not None:
            # Dated as the last of them: a backlog's from yesterday came before today's
            # "Day changed" line, not after it.
            ts = self._folded_ts.pop(room, None)
            self._mark_day(ts)
            joins, leaves = counts
            self._emit(self._folded_line(room, joins, leaves, ts))

    def _folded_line(self, room: str, joins: int, leaves: int, ts: int | None) -> render.Styled:
        said = [f"{count} {what}" for count, what in ((joins, "joined"), (leaves, "left")) if count]
        members = len(self.commands.members.get(room, ()))
        text = f"-!- #{room}: {', '.join(said)} ({members} members; /who lists them)"
        return render.Styled([("class:time", render.clock(ts) + " "), ("class:presence", text)], 10)

    def _mark_backlog_ends(self, still_coming: set[str]) -> None:
        """After a join's backlog, a line that says where it ends: what follows is live.
        (A pump that brought none of a room's backlog events means its backlog is over.)"""
        for room in [r for r in self._backlog if r not in still_coming]:
            self._end_backlog(room)

    def _end_backlog(self, room: str) -> None:
        n = self._backlog.pop(room)
        # A resumed session in the room all along: what came before is not before a join.
        before = "zchat started again (your session stayed in the room)" if room in self._stayed_in else "you joined"
        self._stayed_in.discard(room)
        self._out(f"#{room}: the {n} event{'' if n == 1 else 's'} above came before {before}; live from here")

    def lastlog(self, text: str) -> None:
        """/lastlog: the chat lines shown so far (the last TRANSCRIPT_LINES) that contain ``text``, any case."""
        folded = text.casefold()
        found = [line for line in map(self._labelled, self._said) if folded in line.plain.casefold()]
        self._out(f'lastlog: {len(found)} chat line{"" if len(found) == 1 else "s"} with "{text}"')
        for line in found:
            self._emit(line)

    def _labelled(self, event: Event) -> render.Styled:
        """A chat line as /lastlog lists it: with its room whatever room is current, and
        dated, since it comes out of its context."""
        line = render.styled(event, self.client.name, None, self._colours)
        day: render.Fragment = ("class:time", render.short_day(event.ts) + " ")
        return render.Styled([day, *line.fragments], line.indent + len(day[1]))

    def _mark_day(self, ts: int | None) -> None:
        """Before a line of another date than the last (a backlog from yesterday, or past
        midnight), a line saying so."""
        date = render.day(ts)
        if date != self._day:
            self._day = date
            self._emit(render.day_changed(date))

    def _out(self, text: str) -> None:
        self._mark_day(None)
        for part in text.splitlines() or [""]:
            self._emit(render.notice(part.removeprefix("-!- ")))

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self._err(f"internal error: {context.get('exception') or context.get('message')!r}")

    def _err(self, text: str) -> None:
        self._mark_day(None)
        self._emit(render.notice(text, error=True))

    def handle(self, line: str) -> None:
        """One line typed (or pasted): a message or a command."""
        if self._quit:
            return
        command, room = self.commands.room_command(line) or ("", "")
        if command == "leave" and room in self.client.rooms_joined and (waiting := self.client.unacked_in(room)):
            # The library's leave would wait for them right here, with the screen frozen
            # (a long paste held by the rate limit takes many seconds). The room is named:
            # a bare /leave means the room current now, not the one current then.
            self._leaving[room] = f"/leave #{room}"
            self._out(f"leaving #{room} once your {waiting} message(s) there are acknowledged")
            return
        if command in ("join", "switch") and self._leaving.pop(room, None) is not None:
            self._out(f"no longer leaving #{room}")
        if command in ("join", "leave"):
            self._stayed_in.discard(room)  # a backlog after this is one of a join of ours
        if command == "leave":
            # Now, with the room's members: once left, we no longer know them (a line due
            # later said 0), and it came among the next room's lines.
            self._flush_folded(room)
        before = self.current
        try:
            keep_going = self.commands.handle(line)
        except Exception as exc:  # never a traceback in the user's face; the chat goes on
            self._err(f"internal error: {exc!r}")
            keep_going = True
        if self.current != before and self.current is not None:
            self.switch(self.current)
        elif command == "switch" and room == before:  # else it looks as if the command did nothing
            self._out(f"already talking in #{room}")
        if not keep_going:
            self._quit = True
            self.session.app.exit(result="")
        self.session.app.invalidate()

    def _accept(self, buffer: Buffer) -> bool:
        text = buffer.text
        held: list[str] = []
        if not (text.startswith("/") and not text.startswith("//")):
            # Enter confirms a held paste, and the line being typed goes after it; a
            # command (/quit, /switch) runs on its own and the paste stays held.
            held, self._held = self._held, []
        for line in held:
            buffer.history.append_string(line)
        for line in [*held, text]:
            self.handle(line)
            if self._quit:
                break
        return False  # clear the line (it is added to the history)

    # ------------------------------------------------------------ prompt, bar, keys

    def prompt(self) -> StyleAndTextTuples:
        state = connection_status(self.client)
        out: StyleAndTextTuples = [
            ("class:prompt.room", f"[#{self.current}]" if self.current else "[no room]"),
            ("", " "),
            ("class:prompt.name", self.client.name),
        ]
        if state != "connected":
            out.append(("class:prompt.state", f" ({state})"))
        out.append(("", "> "))
        return out

    def toolbar(self) -> StyleAndTextTuples:
        state = connection_status(self.client)
        out: StyleAndTextTuples = [
            ("class:bottom-toolbar.state" + (".away" if state != "connected" else ""), f" {state} "),
            ("", "|"),
        ]
        if self._held:
            out += [("class:bottom-toolbar.state.away", f" paste of {len(self._held)} lines: Enter/Ctrl-C "), ("", "|")]
        if self.client.unacked:
            # Lines typed but not acknowledged yet (shown once they are): a broker that
            # went silent shows here at once, not only when the connection is given up.
            out += [("class:bottom-toolbar.state.away", f" sending {self.client.unacked} "), ("", "|")]
        entries: list[_BarRoom] = []
        for i, room in enumerate(self.rooms, 1):
            unread = self.unread.get(room, 0)
            style, rank = ("class:bottom-toolbar.current", 0) if room == self.current else ("", 3)
            count = ""
            if room in self.mentioned:  # "!" says it where the terminal shows no colour
                style, count, rank = "class:bottom-toolbar.mention", f"({unread}!)", 1
            elif unread:
                style, count, rank = "class:bottom-toolbar.unread", f"({unread})", 2
            number = f"{i % 10}:" if i <= 10 else ""  # (Alt-0 is the 10th, as in irssi)
            entries.append(_BarRoom(i, rank, style, f" {number}#{room}{count}", f" {number}…{count}" if number else ""))
        room_width = self.session.app.output.get_size().columns - sum(
            render.text_width(fragment[1]) for fragment in out
        )
        if not entries:  # (an empty slot between two bars read as something missing)
            out += [("class:bottom-toolbar.state.away", " in no room: /join ROOM "), ("", "| /help")]
        elif sum(render.text_width(e.text) for e in entries) <= room_width:
            out += [(e.style, e.text) for e in entries]
            out.append(("", "  | /help"))
        else:
            out += _squeezed(entries, room_width)
        return out

    def _key_bindings(self) -> KeyBindings:
        kb = KeyBindings()

        # Alt-0 is the 10th room (irssi's): unbound, prompt_toolkit took it for the
        # start of a repeat count, and swallowed the next key.
        for digit in range(10):

            @kb.add("escape", str(digit))
            def _alt_digit(event: KeyPressEvent, index: int = (digit - 1) % 10) -> None:
                rooms = self.rooms
                if index < len(rooms):
                    self.switch(rooms[index])

        # irssi's Alt-A: to where something happened, mentions first.
        @kb.add("escape", "a")
        def _active(event: KeyPressEvent) -> None:
            if (room := self.next_active()) is not None:
                self.switch(room)

        # Not in the Ctrl-R search field: names have nothing to do there.
        @kb.add("tab", filter=~is_searching)
        def _tab(event: KeyPressEvent) -> None:
            self.complete(event.current_buffer, 1)

        @kb.add("s-tab", filter=~is_searching)
        def _back_tab(event: KeyPressEvent) -> None:
            self.complete(event.current_buffer, -1)

        # Ctrl-R (Ctrl-S forward) searches the history, as readline does; prompt_toolkit's own
        # start, but noting the line it leaves, which a cancelled search brings back.
        @kb.add("c-r", filter=~is_searching)
        @kb.add("c-s", filter=~is_searching)
        def _search(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            self._before_search = (buffer.working_index, buffer.cursor_position)
            backward = event.key_sequence[0].key == Keys.ControlR
            search.start_search(direction=SearchDirection.BACKWARD if backward else SearchDirection.FORWARD)

        # In the search, Ctrl-C is readline's Ctrl-G: back to the line as it was. (The line
        # is empty while the search field has the cursor: unfiltered, Ctrl-C quit.)
        @kb.add("c-c", filter=is_searching)
        @kb.add("c-g", filter=is_searching)
        def _cancel_search(event: KeyPressEvent) -> None:
            search.stop_search()
            before, self._before_search = self._before_search, None
            if before is not None:
                buffer = event.app.current_buffer
                buffer.go_to_history(before[0])  # (a Ctrl-R again put a found line there)
                buffer.cursor_position = min(before[1], len(buffer.text))

        @kb.add("c-c", filter=~is_searching)
        def _interrupt(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            if self._held:
                self._out(f"paste of {len(self._held)} lines dropped")
                self._held = []
                event.app.invalidate()
            elif buffer.text:
                buffer.reset(append_to_history=False)
            else:
                self._quit = True
                event.app.exit(result="")

        @kb.add("c-z")
        def _suspend(event: KeyPressEvent) -> None:
            # Raw mode turns Ctrl-Z into a key: do what the terminal would (the job
            # stops; `fg` resumes it). The session lives on while stopped for up to
            # 3 heartbeats; after that the client reconnects and catches up.
            terminal = event.app.input
            if not isinstance(terminal, _RawInput) or not hasattr(signal, "SIGTSTP"):
                return
            if not job_control():
                self._err("Ctrl-Z: no shell with job control started zchat, so nothing could resume it; /quit to leave")
                return
            terminal.suspending = True

            def stop() -> None:
                os.kill(0, signal.SIGTSTP)  # the whole process group, as the terminal would

            def resumed(_: object) -> None:
                terminal.suspending = False

            asyncio.ensure_future(run_in_terminal(stop)).add_done_callback(resumed)

        # irssi's Ctrl-L redraws; prompt_toolkit's cleared the screen, and the chat lines
        # above the prompt went with it (they are the terminal's, not ours to redraw).
        @kb.add("c-l")
        def _redraw(event: KeyPressEvent) -> None:
            event.app.invalidate()

        @kb.add(Keys.Vt100MouseEvent)
        def _mouse(event: KeyPressEvent) -> None:
            # No mouse here. A colour escape typed or pasted without bracketed paste
            # (ESC [ 3 1 m) parses as a mouse event, and prompt_toolkit's own handler
            # then fails on it; ours (bound later, so it wins) lets it go.
            pass

        # The chat is printed above the prompt, into the terminal's scrollback: nothing here
        # scrolls, and prompt_toolkit's PgUp/PgDn (the previous/next history line) looked broken.
        @kb.add("pageup")
        @kb.add("pagedown")
        def _page(event: KeyPressEvent) -> None:
            pass

        # A key decoded to a name (Shift-PgUp, Ctrl-F5, …) that nothing is bound to reaches the
        # catch-all binding; prompt_toolkit's inserts the key's data, its escape sequence
        # (^[[5;2~ in the line). Ours drops such keys, and inserts what was typed as text.
        self_insert = get_by_name("self-insert")

        @kb.add(Keys.Any, filter=emacs_insert_mode | vi_insert_mode, save_before=lambda event: not event.is_repeat)
        def _insert(event: KeyPressEvent) -> None:
            if not isinstance(event.key_sequence[0].key, Keys):
                self_insert.call(event)

        @kb.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            self.paste(event.current_buffer, event.data)

        return kb

    def complete(self, buffer: Buffer, step: int) -> None:
        """Tab, as irssi has it: the first match goes in at once, and Tab again (the line
        untouched since) puts the next one in its place; Shift-Tab goes back."""
        cycle = self._cycle
        if cycle is None or buffer.text != cycle.text or buffer.cursor_position != cycle.cursor:
            document = buffer.document
            found = list(self._completer.get_completions(document, CompleteEvent(completion_requested=True)))
            if not found:
                self._cycle = None
                return
            buffer.delete_before_cursor(-found[0].start_position)
            cycle = _Cycle(found, -1 if step > 0 else 0)
        else:
            buffer.delete_before_cursor(len(cycle.matches[cycle.index].text))
        cycle.index = (cycle.index + step) % len(cycle.matches)
        buffer.insert_text(cycle.matches[cycle.index].text)
        cycle.text, cycle.cursor = buffer.text, buffer.cursor_position
        self._cycle = cycle

    def paste(self, buffer: Buffer, data: str) -> None:
        """Pasted text: every complete line is sent as typed (over PASTE_CONFIRM_LINES of them are
        held until Enter); a last line without a newline waits in the input."""
        data = data.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in data:
            buffer.insert_text(data)
            return
        doc = buffer.document
        *lines, last = (doc.text_before_cursor + data).split("\n")
        rest = last + doc.text_after_cursor
        buffer.document = Document(rest, len(last))
        # Its line as the message it sends (a command's checks are its own), its last one too,
        # which waits in the input for Enter: the lines before it go now, or with it.
        long = next(
            (
                (i, n)
                for i, line in enumerate([*lines, rest], 1)
                if (n := len(self.commands.message_text(line) or "")) > p.MAX_TEXT_CHARS
            ),
            None,
        )
        if long is not None:
            # Sent all the same, the others reached the room and this one did not: readers
            # saw the paste with a hole in it. A typed line that long is refused whole too.
            self._err(
                f"paste not sent: its line {long[0]} has {long[1]:,} characters, over the "
                f"{p.MAX_TEXT_CHARS:,} of a message; nothing of it went (split that line, and paste again)"
            )
            buffer.document = doc  # the input line as it was
            return
        lines = [line for line in lines if line.strip()]
        if self._held or len(lines) > PASTE_CONFIRM_LINES:
            self._held += lines  # into the history only if Enter sends them
            # (Its last line, without a newline, waits in the input line: said, or the
            # count looks one short of what Enter sends.)
            command = rest.startswith("/") and not rest.startswith("//")  # (Enter runs one alone)
            last_too = " and the input line after them" if rest.strip() and not command else ""
            self._out(f"paste of {len(self._held)} lines held: Enter sends them{last_too}, Ctrl-C drops them")
            self.session.app.invalidate()
            return
        for line in lines:
            buffer.history.append_string(line)
        for line in lines:
            self.handle(line)
            if self._quit:
                return


@dataclass
class _Cycle:
    """The matches of a Tab, which of them is in the line, and the line it left."""

    matches: list[Completion]
    index: int
    text: str = ""
    cursor: int = 0


class _ChatCompleter(Completer):
    """Commands after a leading /, rooms where a command wants one (or after #), names elsewhere."""

    _ROOM_ARG = frozenset({"join", "switch", "leave", "part", "who", "names"})
    _NAME_ARG = frozenset({"msg", "query"})

    def __init__(self, ui: ChatUI) -> None:
        self.ui = ui

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        word = document.get_word_before_cursor(WORD=True)
        before = document.text_before_cursor[: len(document.text_before_cursor) - len(word)]
        words = before.split()
        start = -len(word)
        if not words:
            if word.startswith("/") and not word.startswith("//"):
                typed = word[1:].lower()
                for name in sorted({*COMMANDS, *ALIASES}):
                    if name.startswith(typed):
                        yield Completion(f"/{name} ", start, display=f"/{name}")
                return
            if word.startswith("#"):
                yield from self._rooms(word, self.ui.rooms)
                return
            # A name first on the line addresses that person, IRC-style: "alice: ".
            yield from self._names(word, ": ")
            return
        command = words[0][1:].lower() if words[0].startswith("/") else None
        if command in self._ROOM_ARG and len(words) == 1:
            joined = self.ui.rooms
            rooms = joined if command in ("switch", "leave", "part") else {*joined, *self.ui.commands.known_rooms}
            yield from self._rooms(word, rooms)
        elif command in self._NAME_ARG and len(words) == 1:
            yield from self._names(word, " ")
        elif word.startswith("#"):
            yield from self._rooms(word, {*self.ui.rooms, *self.ui.commands.known_rooms})
        else:
            yield from self._names(word, " ")

    def _names(self, word: str, suffix: str) -> Iterator[Completion]:
        typed = word.lower()
        for name in self.ui.names():
            if name.lower().startswith(typed):
                yield Completion(name + suffix, -len(word), display=name)

    @staticmethod
    def _rooms(word: str, rooms: Iterable[str]) -> Iterator[Completion]:
        typed = word.removeprefix("#").lower()
        for room in sorted(set(rooms)):
            if room.startswith(typed):
                yield Completion(f"#{room} ", -len(word), display=f"#{room}")
