"""``zchat``: the command-line client (pipe mode, one-shot ``--send``, interactive)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from client import render
from client.commands import Commands, last_events
from client.lib import (
    SETTLE_S,
    UNSENT,
    BrokerUnreachable,
    Client,
    CurveKeys,
    Event,
    RequestError,
    ZchatError,
    parse_hosts,
)
from client.saved import SavedToken
from zchat import __version__, envargs
from zchat import protocol as p
from zchat.protocol import ErrorCode, ProtocolError

#: Pipe mode stops reading input while this many messages await their ack.
SEND_WINDOW = 1000
#: At end of input, give up waiting for acks after this long with none.
ACK_WAIT_S = SETTLE_S
#: Pipe mode: an input line longer than this (in bytes) is no message and no command (a
#: text is at most p.MAX_TEXT_CHARS characters of at most 4 bytes, behind a /msg NAME at
#: most): only its start is kept until it ends, and it is refused. Kept whole, input with
#: no newline in sight (a binary file, a runaway writer) grew memory without bound, and
#: each read copied all of it again (a 32 MiB line took 7 s, 64 MiB four times that).
MAX_LINE_BYTES = 4 * p.MAX_TEXT_CHARS + 64
#: How much of such a line is kept, to say which one it was.
LONG_LINE_START = 256
#: Output goes in pieces of at most PIPE_BUF bytes, which a pipe that says it has room
#: takes without blocking, and whole: a line of that size is one write, which POSIX does
#: not interleave with another writer's (two zchats into one pipe). A longer line goes in
#: pieces of this many characters (UTF-8: at most PIPE_BUF bytes).
OUT_PIECE = select.PIPE_BUF // 4
#: While stdout has no room: how long to wait for it between two turns of the client.
WRITABLE_POLL_MS = 100
#: After a signal that stops us, how long stdout may have no room before it is given up.
STOP_OUTPUT_WAIT_S = 2.0


@dataclass
class _LongLine:
    """A pipe-mode input line over MAX_LINE_BYTES: its start, its size, and whether it was
    blank (whitespace only: skipped, as shorter blank lines are)."""

    start: bytes
    size: int
    blank: bool


class _Lines:
    """Pipe mode's input cut into lines, with bounded memory (see MAX_LINE_BYTES)."""

    def __init__(self) -> None:
        self._pending = b""
        #: The line under way once it is over MAX_LINE_BYTES (only its start is kept).
        self._long: _LongLine | None = None

    def feed(self, chunk: bytes) -> list[bytes | _LongLine]:
        """The lines that ``chunk`` ends."""
        first, *rest = chunk.split(b"\n")
        self._add(first)
        if not rest:
            return []
        *whole, last = rest
        lines = [self._take(), *(_long(line) if len(line) > MAX_LINE_BYTES else line for line in whole)]
        self._add(last)
        return lines

    def end(self) -> list[bytes | _LongLine]:
        """End of input: the last line, if it had no newline."""
        return [self._take()] if self._pending or self._long is not None else []

    def _add(self, piece: bytes) -> None:
        if self._long is not None:
            self._long.size += len(piece)
            self._long.blank = self._long.blank and not piece.strip()
        elif len(self._pending) + len(piece) > MAX_LINE_BYTES:
            self._long, self._pending = _long(self._pending + piece), b""
        else:
            self._pending += piece

    def _take(self) -> bytes | _LongLine:
        line: bytes | _LongLine = self._long if self._long is not None else self._pending
        self._pending, self._long = b"", None
        return line


def _piece(text: str) -> str:
    """The start of ``text`` that goes in one write (see OUT_PIECE): its first PIPE_BUF
    characters if they are at most PIPE_BUF bytes (a line of up to PIPE_BUF bytes: whole),
    else its first OUT_PIECE."""
    piece = text[: select.PIPE_BUF]
    if len(piece) > OUT_PIECE and len(piece.encode("utf-8", "surrogatepass")) > select.PIPE_BUF:
        return text[:OUT_PIECE]
    return piece


def _long(line: bytes) -> _LongLine:
    return _LongLine(line[:LONG_LINE_START], len(line), not line.strip())


def _count(text: str) -> int:
    """A number of events, 0 or more, as a flag's ``type``."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number} is not a count (0 or more)")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = envargs.Parser(
        prog="zchat",
        description="Chat through a zchat broker. With a terminal on stdin: interactive. "
        "With a pipe: every input line is sent, every event is printed as one line.",
        epilog="Lines starting with / are commands: /msg NAME TEXT, /me ACTION, /join ROOM, /leave [ROOM], "
        "/switch ROOM, /who [ROOM], /rooms, /history [N], /lastlog TEXT (interactive), /help, /quit [TEXT] "
        "(//TEXT sends a text starting with /). The session's resume token is kept in "
        "$XDG_STATE_HOME/zchat/sessions (~/.local/state), so that a zchat killed and started again "
        "takes its session (and name) back at once.",
    )
    parser.add_argument(
        "--name",
        required=True,
        help="your name: 1-32 of A-Z a-z 0-9 _ . - (unique regardless of case: while bob is online, nobody can be Bob)",
    )
    parser.add_argument(
        "--host",
        default=envargs.default("ZCHAT_HOST", "127.0.0.1"),
        metavar="H[,H...]",
        help="broker address: HOST, HOST:PORT or HOST:PORT:PUBPORT (IPv6 in brackets, [::1]:5555); "
        "several, separated by commas, are tried in order and the client fails over to the next "
        "when it loses one (ZCHAT_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=envargs.port,
        default=envargs.default("ZCHAT_PORT", 5555),
        help="request port of addresses without one (ZCHAT_PORT; default 5555)",
    )
    parser.add_argument(
        "--pub-port",
        type=envargs.port,
        default=envargs.default("ZCHAT_PUB_PORT", 5556),
        help="room event port of addresses without one (ZCHAT_PUB_PORT; default 5556)",
    )
    parser.add_argument("--room", default="general", help="room to join first (default general)")
    parser.add_argument(
        "--backlog",
        type=_count,
        default=50,
        help="show this many of the room's latest events from before your join, then your join; 0: neither "
        "(default 50)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="pipe mode and --send: print each event as one JSON object per line (the terminal shows text)",
    )
    parser.add_argument(
        "--send",
        metavar="TEXT",
        help="send TEXT to the room as it is (a text starting with / too), wait for its ack, exit",
    )
    parser.add_argument(
        "--dump",
        type=_count,
        metavar="N",
        help="print the room's last N events and exit, without joining it: nobody sees you come and go, "
        "and the room's history gets no join and leave of yours",
    )
    parser.add_argument(
        "--no-commands",
        action="store_true",
        help="pipe mode: every input line is a message, one starting with / too "
        "(for logs and other text that is not yours: no line runs as a command)",
    )
    parser.add_argument(
        "--key",
        default=envargs.default("ZCHAT_KEY", None),
        metavar="FILE",
        help="your CURVE secret key, NAME.key_secret from zchat-keygen, for a broker run with --keys (ZCHAT_KEY)",
    )
    parser.add_argument(
        "--broker-key",
        default=envargs.default("ZCHAT_BROKER_KEY", None),
        metavar="FILE",
        help="the broker's public key, broker.key (ZCHAT_BROKER_KEY)",
    )
    parser.add_argument("--no-color", action="store_true", help="interactive: no colours (also when NO_COLOR is set)")
    parser.add_argument(
        "--no-bell", action="store_true", help="interactive: no terminal bell on a mention of your name or a DM"
    )
    parser.add_argument("--version", action="version", version=f"zchat {__version__}")
    return parser


class Printer:
    """Writes events and notices; flushes per line so pipes see them at once."""

    def __init__(self, as_json: bool, on_a_terminal: bool = False) -> None:
        self.as_json = as_json
        #: An EIO writing stdout then means the terminal is gone (main() ends as after a SIGHUP).
        self.on_a_terminal = on_a_terminal
        #: Lines and commands refused or failed so far (pipe mode exits 1 if any).
        self.failures = 0
        #: stdout failed (not a reader that went away): events could not be shown; exit 1.
        self.output_failed = False
        #: Set once stdout takes no more: its reader went away (`zchat ... | head`), or it
        #: fails (a full disk, closed). Events are no longer shown; pipe mode reads no
        #: more input and ends once what it read is acknowledged.
        self.out_gone = False
        #: Called while stdout cannot take more (its reader is slow, or paused): keeps the
        #: session alive meanwhile (see :meth:`_wait_writable`).
        self.waiting: Callable[[], object] | None = None
        #: Events taken from the client and not shown yet: a signal that stops us while
        #: they are shown leaves the rest here, for the stop to show (see :meth:`show`).
        self.queue: deque[Event] = deque()
        #: The rest of a line whose writing a signal cut short: written before the next one.
        self._rest = ""
        #: Once a signal asked us to stop: when to give up on a stdout that has no room
        #: (time.monotonic()); its reader may never read again (see :meth:`stopping`).
        self._give_up_at: float | None = None
        self._stop_reason = ""

    def show(self, events: Iterable[Event]) -> None:
        """Show ``events``, in order, after those a stop left in :attr:`queue`."""
        self.queue.extend(events)
        if self._rest:  # a line a signal cut short: its rest goes now, even with no event after it
            self._write("")
        while self.queue:
            event = self.queue[0]
            if self.out_gone or event.type in ("error", "status"):
                self.queue.popleft()
                self.event(event)  # (on stderr)
                continue
            line = self._line(event)  # a stop while it is rendered leaves the event queued
            # Out of the queue as its line goes into _rest, with no call between the two
            # (CPython runs a signal's handler after a call, or at a loop's turn): a stop
            # neither loses the event nor shows it twice.
            self._rest += line + "\n"
            self.queue.popleft()
            self._write("")

    def stopping(self, why: str) -> None:
        """A signal (``why``) asked us to stop: from now on, a stdout without room for
        STOP_OUTPUT_WAIT_S is given up (said on stderr), rather than waited for without end."""
        self._give_up_at = time.monotonic() + STOP_OUTPUT_WAIT_S
        self._stop_reason = why

    def event(self, event: Event, *, history: bool = False) -> None:
        """Show ``event``; with ``history``, one read from the room's history (--dump), not a
        join's backlog: marked so in JSON (see render.json_line)."""
        if event.type == "error":
            # Counted when it answers a line of ours (it carries that line's text);
            # not a retried hello's name_taken or the like, which the client rides out.
            (self.fail if event.text is not None else self.err)(render.error_text(event))
            return
        if event.type == "status":
            self.err(event.text or "")
            if self.as_json and event.event in ("skipped", "renumbered"):
                # A gap in what a --json reader (an archiver, a bot) gets: said in its stream too.
                self.out(render.json_line(event))
            return
        self.out(self._line(event, history=history))

    def _line(self, event: Event, *, history: bool = False) -> str:
        return render.json_line(event, history=history) if self.as_json else render.text_line(event)

    def out(self, line: str) -> None:
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        """Write ``text`` after the rest of a line a signal cut short (:attr:`_rest`)."""
        if self.out_gone:
            return
        stream = sys.stdout
        try:
            if stream is None:  # started with stdout closed (`>&-`)
                raise OSError(errno.EBADF, "stdout is closed")
            self._rest += text
            # In pieces a pipe with room takes whole (PIPE_BUF bytes at most), each once it has room.
            while self._rest:
                self._wait_writable(stream)
                piece = _piece(self._rest)
                # Taken from _rest as it goes to the stream, with no call between the two
                # (see show): a stop right after the write does not write it again; one
                # during the flush leaves it in the stream's buffer, for the next flush.
                self._rest = self._rest[len(piece) :]
                stream.write(piece)
                stream.flush()
        except OSError as exc:
            if self.on_a_terminal and exc.errno in (errno.EIO, errno.ENXIO):
                raise  # the terminal is gone: main() ends as after a SIGHUP
            self.out_gone = True
            if stream is not None:
                _mute(stream)
            if exc.errno != errno.EPIPE:
                # Events this user asked for cannot be shown: a failure, not a reader that is done.
                self.output_failed = True
                self.err(f"cannot write to stdout: {exc.strerror or exc}; events are no longer shown")

    def _wait_writable(self, stream: TextIO) -> None:
        """Until ``stream`` has room, keep calling :attr:`waiting`. A blocked write would
        stop the client: no ping, and a reader that pauses for 3 heartbeats (15 s: a
        consumer busy with a line, a pager) cost the session (a leave, a new session,
        DMs sent meanwhile lost, its name free to take)."""
        if self.waiting is None:
            return
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
        except (OSError, ValueError):  # not a file (a test's capture): nothing to wait for
            return
        while not poller.poll(WRITABLE_POLL_MS):
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                raise OSError(
                    errno.EAGAIN, f"its reader read nothing for {STOP_OUTPUT_WAIT_S:g} s after {self._stop_reason}"
                )
            self.waiting()

    @staticmethod
    def err(line: str) -> None:
        if sys.stderr is None:  # started with stderr closed (`2>&-`): nowhere to say it
            return
        try:
            sys.stderr.write(f"zchat: {line}\n")
            sys.stderr.flush()
        except OSError:
            # Nowhere left to say it (a closed terminal, a reader that went away): go on
            # quietly, so the exit status still tells what happened.
            _mute(sys.stderr)

    def fail(self, line: str) -> None:
        """An error that answers a line or a command: said, and counted."""
        self.failures += 1
        self.err(line)


class _Terminated(Exception):
    """SIGTERM (a service stopped) or SIGHUP (the terminal closed): leave as after a
    Ctrl-C, saying bye, so that the name is free at once and the rooms see us leave."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: FrameType | None) -> None:
    for sig in TERMINATING:  # once: a second signal must not cut the bye short
        signal.signal(sig, signal.SIG_IGN)
    raise _Terminated(signum)


#: Signals that end zchat as Ctrl-C does, with a bye (the terminal UI handles them in its loop).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def terminating_signals() -> list[signal.Signals]:
    """TERMINATING less those already ignored: under nohup, SIGHUP stays ignored."""
    return [sig for sig in TERMINATING if signal.getsignal(sig) != signal.SIG_IGN]


def _catch_terminating() -> None:
    for sig in terminating_signals():
        signal.signal(sig, _terminate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = envargs.resolve(parser, parser.parse_args(argv))
    # An EIO later means a lost terminal only if we had one (not a failing file or disk).
    # A character device, not isatty(): a terminal already hung up is no tty any more.
    on_a_terminal = any(_is_char_device(fd) for fd in (0, 1, 2))
    printer = Printer(args.json, on_a_terminal)
    try:
        room = p.parse_room(args.room)
    except ProtocolError as exc:
        printer.err(exc.message)
        return 2
    if args.send is not None and args.dump is not None:
        printer.err("--send and --dump do not go together: one sends, the other only reads")
        return 2
    if args.send is not None:
        # Bytes that are not UTF-8 become U+FFFD, as in pipe mode's lines (Python hands
        # them over as lone surrogates, which no message can carry).
        with contextlib.suppress(UnicodeError):
            args.send = args.send.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if not args.send.strip():  # (pipe mode skips blank lines too)
            printer.err(f"--send: the text is {'blank' if args.send else 'empty'}: nothing to send")
            return 2
        try:
            p.check_text(args.send)
        except ProtocolError as exc:
            printer.err(f"--send: {exc.message}")
            return 2
    saved: SavedToken | None = None

    def unsaved() -> None:
        """Let go of the token file (and its lock) of a run that had no session."""
        if saved is not None:
            saved.close()

    try:
        curve = None
        if args.key or args.broker_key:
            if not (args.key and args.broker_key):
                given, missing = ("key", "--key"), ("broker_key", "--broker-key")
                if not args.key:
                    given, missing = missing, given
                other = f"{missing[1]} (or ZCHAT_{missing[0].upper()})"
                printer.err(f"{envargs.given_as(args, *given)} needs {other} too: they go together")
                return 2
            curve = CurveKeys.load(args.key, args.broker_key)
        # The session of a zchat of this name that was killed here is taken back at once.
        saved = SavedToken.open(args.name, parse_hosts(args.host, args.port, args.pub_port)[0])
        client = Client(
            args.name,
            port=args.port,
            pub_port=args.pub_port,
            hosts=args.host,
            curve=curve,
            resume=saved.read() if saved is not None else None,
        )
        if saved is not None:
            client.on_resume_token = saved.write
    except RequestError as exc:
        unsaved()
        printer.err(exc.message)
        return 2
    except ValueError as exc:
        unsaved()
        printer.err(f"{envargs.given_as(args, 'host', '--host')}: {exc}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C as its sockets connect (libzmq's connect may take a while)
        unsaved()
        return 130
    try:
        client.connect()
    except KeyboardInterrupt:  # Ctrl-C while it connects: no line was read yet
        _close(client)
        unsaved()
        return 130
    except BrokerUnreachable as exc:
        printer.err(f"{exc} (is zchat-broker running there?)" if exc.maybe_down else str(exc))
        client.close(settle=0)
        unsaved()
        return 1
    except RequestError as exc:
        if exc.code == "name_taken":
            # The broker says who holds the name, and for how long if it can tell.
            also = ""
            if args.send is not None or args.dump is not None:
                # Most often its user, chatting under that name in a terminal: a script's
                # --send is a session of its own, not a line typed into that one.
                also = " (--send and --dump connect as a client of their own: not under the name of a running zchat)"
            printer.err(f"the broker at {client.endpoint}: {exc.message}; pick another with --name{also}")
        elif exc.code == "auth_failed":
            printer.err(exc.message)  # it says which broker, and what about the keys
        else:
            printer.err(f"the broker at {client.endpoint} refused us: {exc.message}")
        client.close(settle=0)
        unsaved()
        return 1
    printer.waiting = lambda: _keep_alive(client)
    for stale in client.resumed_rooms:
        # The session a zchat of this name left when it was killed (its saved token): this
        # run is in its own rooms; in the others it would be listed and hear nothing.
        if stale != room:
            with contextlib.suppress(ZchatError):
                client.leave(stale)
    # (stdin is None when started with it closed, `<&-`: read as empty input)
    interactive = args.send is None and args.dump is None and sys.stdin is not None and sys.stdin.isatty()
    if not interactive:
        _catch_terminating()
    try:
        if args.send is not None:
            return _send_once(client, room, args.send, printer)
        if args.dump is not None:
            return _dump(client, room, args.dump, printer)
        # The member list is not shown here (the terminal asks `who` for completion): not asked for.
        client.join(room, backlog=args.backlog, members=False)
        if interactive:
            from client.interactive import run_interactive  # noqa: PLC0415  (prompt_toolkit only when needed)

            return run_interactive(client, room, args.backlog, color=not args.no_color, bell=not args.no_bell)
        return _run_pipe(client, room, args, printer)
    except BrokerUnreachable as exc:
        printer.err(str(exc))
        return 1
    except ZchatError as exc:  # RequestError, and a client closed under us
        printer.err(f"{exc.code}: {exc.message}")
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one must not cut the list short
        printer.stopping("SIGINT")
        _say_unacked(client, printer, "SIGINT")
        return 130
    except OSError as exc:
        if not (on_a_terminal and exc.errno in (errno.EIO, errno.ENXIO)):
            raise
        # Our terminal went away (before the interactive client took it over, or in pipe
        # mode): end as SIGHUP would, quietly; the bye still goes (below).
        _mute(sys.stdout, sys.stderr)
        return 128 + signal.SIGHUP
    except _Terminated as exc:
        printer.stopping(signal.Signals(exc.signum).name)
        _say_unacked(client, printer, signal.Signals(exc.signum).name)
        return 128 + exc.signum
    finally:
        _close(client)
        if saved is not None:
            saved.close()


def _keep_alive(client: Client) -> None:
    """A turn of the client (pings, acks, a reconnect) while output waits for its reader."""
    if client.state != "closed":
        client.pump(0)


def _close(client: Client) -> None:
    """Close (and say bye) with Ctrl-C, SIGTERM and SIGHUP ignored meanwhile: one that
    comes during the close (it is what they ask for) must not cut the bye short with a
    traceback."""
    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, *TERMINATING):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect it from there
        client.close(settle=0)
        return
    try:
        client.close(settle=0)
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # (None: a handler Python did not install; left ignored)
                signal.signal(signum, handler)


def _is_char_device(fd: int) -> bool:
    try:
        return stat.S_ISCHR(os.fstat(fd).st_mode)
    except OSError:
        return False


def _mute(*streams: TextIO) -> None:
    """Point ``streams`` at /dev/null: Python would otherwise fail once more flushing
    them at exit, with a warning nobody can read."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in streams:
        if stream is None:  # (closed at start: nothing to flush)
            continue
        with contextlib.suppress(OSError, ValueError):
            os.dup2(null, stream.fileno())
    os.close(null)


def terminal_gone(exc: OSError) -> bool:
    """Whether ``exc`` from a read or write of the terminal means it is gone (a closed
    ssh connection or terminal window): a pty whose other end closed fails with EIO."""
    return exc.errno in (errno.EIO, errno.ENXIO, errno.EPIPE)


def _say_unacked(client: Client, printer: Printer, why: str) -> None:
    """Stopped early: what had arrived is shown (own lines acknowledged among it, so
    that every line is either shown as sent or listed), then each message the broker
    has not acknowledged, on stderr, to copy."""
    client.release_own()  # acknowledged, waiting for earlier events of their room: shown too
    try:
        printer.show(client.drain_events())  # (after what the stop cut short: Printer.queue)
    except OSError:
        # The terminal is gone (Printer.out raises for that): what is left goes to stderr,
        # and the exit status stays the signal's.
        printer.out_gone = True
        _mute(sys.stdout)
    if client.unacked:
        printer.err(f"{why}: {client.unacked} message(s) not acknowledged {not_acknowledged_why(client)}:")
        for line in unsent_lines(client):
            printer.err(line)


#: Sent, not acknowledged: some may have been stored all the same (the broker was slow,
#: or its acks were lost). A script that sends them again as they are may post them twice.
MAY_HAVE_ARRIVED = "(they may have arrived; check the room before sending them again)"
#: Refused to the end by a broker that held them back (``unavailable``: its disk nearly
#: full, say; or ``rate_limited``): a message it refused so was not stored, and those
#: behind it were not sent.
NOT_STORED = "(the broker answered {code}: not stored; send them again later)"


#: None of them arrived (typed while the broker was away, or refused): sending them again is safe.
NONE_ARRIVED = "(none of them arrived: send them again)"
#: Some were marked as not arrived; of the others, nothing is known.
SOME_MAY_HAVE_ARRIVED = "(those not marked may have arrived; check the room before sending them again)"


def _mark(event: Event) -> str:
    """What is known of one message left, before its text (see Client.unacknowledged)."""
    if event.code == ErrorCode.UNDELIVERED:
        return " (not delivered: they are away)"
    if event.code == UNSENT:
        return " (not stored)" if event.room else " (not delivered)"
    return ""


def not_acknowledged_why(client: Client) -> str:
    """What the user may conclude of the messages ``client`` has not had acknowledged."""
    if (code := client.held_back) is not None:
        return NOT_STORED.format(code=code)
    marked = [bool(_mark(event)) for event in client.unacknowledged()]
    if marked and all(marked):
        return NONE_ARRIVED
    return SOME_MAY_HAVE_ARRIVED if any(marked) else MAY_HAVE_ARRIVED


def unsent_lines(client: Client) -> list[str]:
    """Each message the broker never acknowledged, a line each, for the user to copy."""
    return [
        f"  {'#' + event.room if event.room else 'to ' + str(event.to)}"
        # (Before the text, which stays the line's end, as typed, for copying.)
        f"{_mark(event)}: {event.text}"
        for event in client.unacknowledged()
    ]


def _send_once(client: Client, room: str, text: str, printer: Printer) -> int:
    try:
        for event in client.drain_events():  # what connect() said (a room event port that does not answer)
            if event.type == "status":
                printer.event(event)
        client.join(room, members=False)
        client.drain_events()
        try:
            printer.event(client.send_wait(room, text))
            if printer.output_failed:  # stored, but its line could not be shown
                return 1
        except BrokerUnreachable as exc:
            # The library would keep it queued, but this one-shot ends here: say what is known.
            for event in client.drain_events():
                if event.type == "status":  # why it waited (a broker whose disk is nearly full)
                    printer.event(event)
            if exc.held and (code := client.held_back) is not None:
                # Its last answer was a refusal, and it has not gone again since: not stored.
                printer.err(f"not sent: the broker held it back ({code}) until the timeout; nothing was stored")
            else:
                printer.err(f"no ack from {client.endpoint} in time: the message may or may not have been stored")
            return 1
    except RequestError as exc:
        printer.err(f"not sent: {exc.code}: {exc.message}")
        return 1
    return 0


def _dump(client: Client, room: str, count: int, printer: Printer) -> int:
    """--dump: the room's last ``count`` events from its history; no join, so no presence."""
    top, events = last_events(client, room, count)
    if top == 0:  # (a mistyped name looks just like this: say so rather than print nothing)
        printer.err(f"#{room} has no events: nobody has joined it")
    shown = 0
    for event in events:
        if printer.out_gone:
            break
        # Not "backlog" (from before your join): --dump joins nothing. Read from the
        # room's history, as /history's are, and marked as they are.
        printer.event(event, history=True)
        shown += 1
    if top > 0 and count > 0 and shown == 0:  # numbered, but every event deleted: not an empty output alone
        printer.err(f"#{room}: none of its {top} events is kept by the broker any more (its retention)")
    for event in client.drain_events():
        if event.type == "status" and event.event == "no_room_events":
            continue  # it reads no room events
        printer.event(event)
    return 1 if printer.failures or printer.output_failed else 0


def _run_pipe(client: Client, room: str, args: argparse.Namespace, printer: Printer) -> int:
    def out(line: str) -> None:
        # A command's answer after the events that came before it (the ack of a line
        # written before the command comes before its answer): output in input order.
        printer.show(client.drain_events())
        printer.out(line)

    commands = Commands(client, room, out, printer.fail, as_json=args.json, backlog=args.backlog, strict=True)
    commands.literal = args.no_commands
    if sys.stdin is None:  # started with stdin closed (`<&-`): no lines, as from an empty file
        return _finish(client, printer)
    fd = sys.stdin.fileno()
    lines = _Lines()
    reading = True
    while reading and not printer.out_gone:
        printer.show(client.drain_events())
        if client.state == "closed":  # closed under us (session_moved): the event said why
            return 1
        # Back-pressure: stop reading input while too much is unacknowledged.
        want = [fd] if client.unacked < SEND_WINDOW else []
        if not client.pump(0.5, want):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            reading = False
        # Every line read is handled, even once stdout has gone (its reader left): what
        # was read is sent. Only input not read yet is left.
        for raw in lines.feed(chunk) if chunk else lines.end():
            if isinstance(raw, _LongLine):
                if not raw.blank:
                    commands.too_long(raw.start.decode("utf-8", errors="replace"), raw.size)
            elif not commands.handle(raw.decode("utf-8", errors="replace")):
                reading = False
                break
    return _finish(client, printer)


def _finish(client: Client, printer: Printer) -> int:
    """End of input: every line sent is acknowledged and shown before we close
    (see :meth:`Client.settling`); say so if some were not."""
    for _ in client.settling(ACK_WAIT_S):
        printer.show(client.drain_events())
    printer.show(client.drain_events())
    if client.unacked:
        printer.err(
            f"{client.unacked} message(s) not acknowledged {not_acknowledged_why(client)}: "
            f"no progress for {ACK_WAIT_S:g} s:"
        )
        for line in unsent_lines(client):
            printer.err(line)
        return 1
    if printer.failures:
        printer.err(f"{printer.failures} line(s) or command(s) refused or failed (above)")
        return 1
    return 1 if printer.output_failed else 0  # (said when it happened)


if __name__ == "__main__":
    sys.exit(main())
