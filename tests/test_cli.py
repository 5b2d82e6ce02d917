"""The real ``zchat`` and ``zchat-broker`` commands, as subprocesses, in pipe mode."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import queue
import re
import resource
import shlex
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from client.cli import not_acknowledged_why, unsent_lines
from client.lib import UNSENT, Client, Event
from tests.conftest import HOST, READY_RE, BrokerProcess, bin_path, wait_for
from zchat import protocol as p


class Chat:
    """One ``zchat`` process in pipe mode, its output read line by line."""

    def __init__(self, broker: BrokerProcess, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [bin_path("zchat"), "--name", name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=broker.env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.errors.append), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def say(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        for line in lines:
            self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def expect(self, predicate: Any, timeout: float = 10.0) -> list[str]:
        """Lines read until one satisfies ``predicate`` (inclusive), or fail."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected line not seen; got {seen!r}, stderr {self.errors!r}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(line)
            if predicate(line):
                return seen

    def expect_json(self, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        def match(line: str) -> bool:
            data = json.loads(line)
            return all(data.get(k) == v for k, v in fields.items())

        return json.loads(self.expect(match, timeout)[-1])

    def rest(self, timeout: float = 15.0) -> list[str]:
        """Wait for exit; every line not read yet."""
        self.proc.wait(timeout=timeout)
        time.sleep(0)  # let reader threads finish the pipes
        out = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                out.append(self.lines.get(timeout=0.1))
            except queue.Empty:
                if self.proc.stdout is None or self.proc.stdout.closed:
                    break
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


@pytest.fixture
def chats(broker_proc: BrokerProcess) -> Iterator[Any]:
    started: list[Chat] = []

    def start(name: str, *args: str) -> Chat:
        chat = Chat(broker_proc, name, *args)
        started.append(chat)
        return chat

    yield start
    for chat in started:
        chat.stop()


def test_two_pipe_clients_talk_sender_sees_own_once(chats: Any) -> None:
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob", event="join")
    alice = chats("alice", "--json")
    bob.expect_json(type="presence", name="alice", event="join")
    alice.say("hello bob")
    got = bob.expect_json(type="msg", text="hello bob")
    assert got["from"] == "alice" and got["room"] == "general" and isinstance(got["seq"], int)
    assert set(got) >= {"type", "room", "seq", "ts", "from", "text"}
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 0
    alice_lines = [json.loads(line) for line in alice.rest()]
    own = [e for e in alice_lines if e.get("type") == "msg" and e.get("text") == "hello bob"]
    assert len(own) == 1 and own[0]["from"] == "alice" and own[0]["seq"] == got["seq"]
    bob.expect_json(type="presence", name="alice", event="leave")


@pytest.mark.timeout(60)
def test_a_zchat_killed_and_started_again_takes_its_session_back(
    chats: Any, broker_proc: BrokerProcess, tmp_path: Path
) -> None:
    """Killed (SIGKILL, a crash), zchat left its session, and its name, on the broker for
    3 heartbeats: started again at once it met name_taken. It keeps the session's token
    (a secret: its user's only) and takes the session back. A clean exit keeps it (a bye a
    stopping broker never read leaves a session saved for its next start), and the next
    run, its session ended, starts a new one with it."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob", event="join")
    bob.say("/join secret")
    bob.expect_json(type="presence", room="secret", name="bob", event="join")
    sessions = tmp_path / "xdg-state" / "zchat" / "sessions"
    (saved,) = sessions.iterdir()
    assert saved.name == f"bob@{HOST}_{broker_proc.port}"
    assert (stat.S_IMODE(sessions.stat().st_mode), stat.S_IMODE(saved.stat().st_mode)) == (0o700, 0o600)
    token = saved.read_text()
    assert len(token) >= 16
    bob.proc.kill()
    bob.proc.wait(timeout=10)

    def send_as_bob(text: str) -> None:
        run = subprocess.run(
            [bin_path("zchat"), "--name", "bob", "--send", text, "--json"],
            capture_output=True,
            text=True,
            timeout=20,
            env=broker_proc.env(),
            check=False,
        )
        assert run.returncode == 0, run.stderr

    send_as_bob("back")
    assert saved.read_text() == token
    send_as_bob("third")
    assert saved.read_text() not in ("", token)  # a new session's
    with Client("watcher", port=broker_proc.port, pub_port=broker_proc.pub_port) as watcher:
        events, _ = watcher.history("general")
        said = [(e.name, e.event or e.text, e.reason) for e in events if e.name == "bob"]
        assert said == [
            ("bob", "join", None),
            ("bob", "back", None),
            ("bob", "leave", "quit"),
            ("bob", "join", None),
            ("bob", "third", None),
            ("bob", "leave", "quit"),
        ]
        # The killed run's other room: this run is not in it, so it left it (listed there,
        # it would have heard nothing).
        secret, _ = watcher.history("secret")
        assert [(e.name, e.event) for e in secret] == [("bob", "join"), ("bob", "leave")]
        assert watcher.who("secret") == []


@pytest.mark.timeout(60)
def test_a_second_zchat_of_a_name_does_not_take_the_running_ones_session(
    chats: Any, broker_proc: BrokerProcess
) -> None:
    """The token file is locked while a zchat uses it: a second zchat --name bob on the
    same machine says hello without it and meets name_taken; the first chats on."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob", event="join")
    second = subprocess.run(
        [bin_path("zchat"), "--name", "bob", "--send", "mine now"],
        capture_output=True,
        text=True,
        timeout=20,
        env=broker_proc.env(),
        check=False,
    )
    assert second.returncode == 1 and "is taken" in second.stderr, second.stderr
    bob.say("still here")
    bob.expect_json(type="msg", text="still here", own=True)


def test_text_mode_lines(chats: Any) -> None:
    bob = chats("bob")
    bob.expect(lambda line: "bob joined #general" in line)
    alice = chats("alice")
    alice.say("plain text")
    line = bob.expect(lambda line: "plain text" in line)[-1]
    assert "#general <alice> plain text" in line


def test_dm_and_commands_in_pipe_mode(chats: Any) -> None:
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json")
    bob.expect_json(type="presence", name="alice")
    alice.say("/msg bob psst", "/join #side", "/who", "in side", "/leave side", "/quit", "never sent")
    dm = bob.expect_json(type="dm")
    assert (dm["from"], dm["to"], dm["text"]) == ("alice", "bob", "psst")
    assert alice.proc.wait(timeout=15) == 0
    out = [json.loads(line) for line in alice.rest()]
    assert {"type": "who", "room": "side", "members": ["alice"]} in out
    texts = [e.get("text") for e in out if e["type"] in ("msg", "dm")]
    assert "psst" in texts and "in side" in texts and "never sent" not in texts
    side = [e for e in out if e.get("text") == "in side"]
    assert side[0]["room"] == "side"


def test_pipe_mode_prints_in_the_order_of_its_input(chats: Any) -> None:
    """A line, then a command, read in one go: the line's own event comes before the
    command's answer (it was acknowledged before that answer came), and a /history
    that lists it comes after it, rather than the own copy coming last."""
    alice = chats("alice", "--json", "--backlog", "0")
    alice.say("first line", "/who", "second line", "/history 1")
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 0, alice.errors
    out = [json.loads(line) for line in alice.rest()]
    kinds = [(e["type"], e.get("text"), e.get("own", False), e.get("backlog", False), e.get("history")) for e in out]
    assert kinds == [
        ("msg", "first line", True, False, None),
        ("who", None, False, False, None),
        ("msg", "second line", True, False, None),
        # Listed by /history: marked so, not "backlog" (it came after the join).
        ("msg", "second line", False, False, True),
    ], kinds


def test_words_a_command_does_not_take_are_refused_not_ignored(chats: Any) -> None:
    """``/rooms x``, ``/help me``: a usage line on stderr (and exit 1), not the command run
    as if the words were not there; the lines after them go on."""
    alice = chats("alice", "--json", "--backlog", "0")
    alice.say("/rooms x", "/help me", "/history 5 6", "still here")
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 1, alice.errors
    out = [json.loads(line) for line in alice.rest()]
    assert [(e["type"], e.get("text")) for e in out] == [("msg", "still here")], out
    assert alice.errors[:3] == [
        "zchat: usage: /rooms (it takes no arguments)",
        "zchat: usage: /help (it takes no arguments)",
        "zchat: usage: /history [N] (one number at most)",
    ], alice.errors


def test_an_action_keeps_its_spaces_as_a_plain_line_does(chats: Any) -> None:
    """``/me   waves`` sends "  waves" (what follows "/me "), as "   indented" is sent as typed."""
    alice = chats("alice", "--json", "--backlog", "0")
    alice.say("   indented", "/me   waves  ", "/action  bows")
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 0, alice.errors
    out = [json.loads(line) for line in alice.rest()]
    assert [(e.get("text"), e.get("action", False)) for e in out if e["type"] == "msg"] == [
        ("   indented", False),
        ("  waves  ", True),
        (" bows", True),
    ], out


def test_a_dm_keeps_its_spaces_as_a_plain_line_does(chats: Any) -> None:
    """``/msg bob  hi  `` sends " hi  " (what follows "/msg bob "), as /me and a plain
    line send theirs as typed: the trailing spaces were dropped."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json", "--backlog", "0")
    alice.say("/msg bob  hi there   ", "/query  bob tail  ")
    assert [bob.expect_json(type="dm")["text"] for _ in range(2)] == [" hi there   ", "tail  "]
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 0, alice.errors
    out = [json.loads(line) for line in alice.rest()]
    assert [e["text"] for e in out if e["type"] == "dm"] == [" hi there   ", "tail  "], out


def test_a_dm_to_a_name_in_another_case_is_echoed_to_the_name_as_its_owner_spells_it(chats: Any) -> None:
    """``/msg BOB hi`` reaches bob (one name regardless of case); its author's own copy
    said ``to: "BOB"``, where bob's side, /who and the broker say ``bob``."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json", "--backlog", "0")
    alice.say("/msg BOB hi", "/query Bob hi again")
    assert [bob.expect_json(type="dm")["to"] for _ in range(2)] == ["bob", "bob"]
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 0, alice.errors
    out = [json.loads(line) for line in alice.rest()]
    assert [(e["to"], e.get("own")) for e in out if e["type"] == "dm"] == [("bob", True), ("bob", True)], out


def test_json_events_are_one_line_for_every_line_reader(broker_proc: BrokerProcess) -> None:
    """A text with U+0085, U+2028 or U+2029, which json.dumps leaves as they are, was cut
    into three lines by str.splitlines() (what a Python script reading ``--json`` output
    often uses): they are escaped now, and the text reads back the same."""
    text = "a\x85b\u2028c\u2029d"
    run = subprocess.run(
        [bin_path("zchat"), "--name", "alice", "--json", "--backlog", "0"],
        input=(text + "\n").encode(),
        env=broker_proc.env(),
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout.decode()
    assert len(out.splitlines()) == 1, out
    assert json.loads(out)["text"] == text


def test_lastlog_is_for_the_terminal_and_pipe_mode_says_so(chats: Any) -> None:
    alice = chats("alice", "--json")
    alice.say("/lastlog deploy")
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 1, "a refused command makes the exit status 1"
    alice.rest()
    assert any("/lastlog searches what the terminal client has shown" in e for e in alice.errors), alice.errors


def test_over_long_line_is_refused_next_line_delivered(chats: Any) -> None:
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json")
    alice.say("x" * (p.MAX_TEXT_CHARS + 1), "short one")
    got = bob.expect_json(type="msg")
    assert got["text"] == "short one"
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 1, "a refused line makes the exit status 1"
    alice.rest()
    assert any("too_large" in e and str(p.MAX_TEXT_CHARS) in e for e in alice.errors), alice.errors
    assert any("1 line(s) or command(s) refused" in e for e in alice.errors), alice.errors


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]


@pytest.mark.timeout(60)
def test_a_line_too_long_for_any_message_costs_neither_memory_nor_time(chats: Any) -> None:
    """Input with no newline in sight (a binary file) was kept whole, and each read of
    64 KiB copied all of it again: a 32 MiB line took 7 s and ~100 MiB. Now only its start
    is kept; it is refused when it ends (a blank one skipped), and the next line goes."""
    alice = chats("alice", "--json")
    alice.expect_json(type="presence", name="alice")
    before = _peak_rss_kib(alice.proc.pid)
    assert alice.proc.stdin is not None
    piece = "x" * (1 << 20)
    started = time.monotonic()
    for _ in range(32):
        alice.proc.stdin.write(piece)
    alice.say("", " " * 100_000, "after")
    alice.expect_json(type="msg", text="after", own=True)
    took, grew = time.monotonic() - started, _peak_rss_kib(alice.proc.pid) - before
    assert grew < 16 * 1024 and took < 5, (grew, took)
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 1, alice.errors
    alice.rest()
    assert alice.errors[0] == (
        f"zchat: too_large: a line of {32 << 20} bytes, the limit is 4000 characters [#general: {'x' * 39}…]"
    ), alice.errors
    assert alice.errors[1:] == ["zchat: 1 line(s) or command(s) refused or failed (above)"], alice.errors


def test_lines_after_a_refused_join_go_nowhere_and_the_exit_status_says_so(chats: Any) -> None:
    """A script's lines after ``/join ROOM`` are meant for ROOM: if the join fails they
    are refused, not sent to the room before."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json")
    bob.expect_json(type="presence", name="alice")
    alice.say("/join BAD!", "meant for BAD!", "/join side", "in side", "/switch nowhere", "meant for nowhere", "/who")
    alice.close_input()
    assert alice.proc.wait(timeout=15) == 1
    out = [json.loads(line) for line in alice.rest()]
    assert [(e["room"], e["text"]) for e in out if e["type"] == "msg"] == [("side", "in side")]
    refused = [e for e in alice.errors if "lines are refused until a /join or /switch succeeds" in e]
    assert len(refused) == 2 and "'/join BAD!' failed" in refused[0], alice.errors
    # Which room /who means is not known, and the rooms are still joined: said so (it
    # said "not in a room").
    no_room = "zchat: no current room since '/switch nowhere' failed (still in #general, #side): /who ROOM"
    assert alice.errors[-2] == no_room, alice.errors
    carol = chats("carol", "--json")
    carol.say("sentinel")
    seen = [json.loads(line) for line in bob.expect(lambda line: "sentinel" in line)]
    assert not [e for e in seen if e.get("text", "").startswith("meant for")]


def test_many_joins_in_a_row_wait_for_the_join_rate_limit(chats: Any) -> None:
    """25 joins at once exceed the join burst (20): the rest wait their turn."""
    alice = chats("alice", "--json")
    alice.say(*(f"/join r{i}" for i in range(25)), "in r24")
    alice.close_input()
    assert alice.proc.wait(timeout=30) == 0, alice.errors
    mine = [json.loads(line) for line in alice.rest()]
    assert [(e["room"], e["text"]) for e in mine if e["type"] == "msg"] == [("r24", "in r24")]


def test_sigterm_says_bye(chats: Any, broker_proc: BrokerProcess) -> None:
    """A bot stopped by its service manager leaves at once (the name is free, the room
    sees it go) rather than when its session expires (3 heartbeats)."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    alice = chats("alice", "--json")
    bob.expect_json(type="presence", name="alice", event="join")
    start = time.monotonic()
    alice.proc.send_signal(signal.SIGTERM)
    assert alice.proc.wait(timeout=10) == 128 + signal.SIGTERM
    bob.expect_json(type="presence", name="alice", event="leave", timeout=5)
    assert time.monotonic() - start < 5
    again = _send_one(broker_proc, "back", name="alice")
    assert again.returncode == 0, again.stderr


def test_output_read_by_a_reader_that_went_away_ends_quietly_with_a_bye(chats: Any, broker_proc: BrokerProcess) -> None:
    """``zchat --name x | head -1``: once head exits, the next line out fails (EPIPE). The
    client ends quietly with 0, as a filter whose reader is done, and says bye."""
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    head = subprocess.Popen(
        f'{shlex.quote(bin_path("zchat"))} --name alice | head -1; echo "zchat=${{PIPESTATUS[0]}}" >&2',
        shell=True,
        executable="/bin/bash",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=broker_proc.env(),
    )
    try:
        bob.expect_json(type="presence", name="alice", event="join")
        assert head.stdout is not None and head.stdout.readline()  # head's one line; head is gone
        bob.say("anyone there?")  # alice's next line out meets the closed pipe
        bob.expect_json(type="presence", name="alice", event="leave", timeout=10)
        assert head.stdin is not None
        head.stdin.close()
        assert head.wait(timeout=10) == 0
        assert head.stderr is not None
        errors = head.stderr.read()
        assert "Traceback" not in errors and "zchat=0" in errors, errors
    finally:
        if head.poll() is None:
            head.kill()
        head.wait(timeout=10)


def test_late_joiner_sees_backlog_once_in_order(chats: Any, broker_proc: BrokerProcess) -> None:
    writer = chats("writer")
    writer.say(*[f"m{i}" for i in range(20)])
    writer.close_input()
    assert writer.proc.wait(timeout=15) == 0
    late = chats("late", "--json", "--backlog", "15")
    late.close_input()
    assert late.proc.wait(timeout=15) == 0
    events = [json.loads(line) for line in late.rest()]
    msgs = [e for e in events if e["type"] == "msg"]
    seqs = [e["seq"] for e in events if e.get("room") == "general"]
    assert seqs == sorted(set(seqs)), "each once, in seq order"
    # writer's join, m0..m19, writer's leave: the 15 events before late's join are m6..m19 and that leave
    assert [m["text"] for m in msgs] == [f"m{i}" for i in range(6, 20)]
    assert [(e["type"], e.get("backlog", False)) for e in events if e["type"] == "presence"][-2:] == [
        ("presence", True),
        ("presence", False),
    ]


def test_send_once(chats: Any, broker_proc: BrokerProcess) -> None:
    bob = chats("bob", "--json")
    bob.expect_json(type="presence", name="bob")
    result = subprocess.run(
        [bin_path("zchat"), "--name", "carol", "--send", "one shot", "--json"],
        env=broker_proc.env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["text"] == "one shot"
    assert bob.expect_json(type="msg")["from"] == "carol"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def test_unreachable_broker_fails_fast_and_says_where(tmp_path: Path) -> None:
    port = _free_port()
    start = time.monotonic()
    result = subprocess.run(
        [bin_path("zchat"), "--name", "bob", "--host", HOST, "--port", str(port), "--pub-port", str(_free_port())],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 10
    assert f"the zchat broker at tcp://{HOST}:{port}: connection refused" in result.stderr
    # It got no token: no empty file is left behind (one per name and port ever tried was).
    sessions = tmp_path / "xdg-state" / "zchat" / "sessions"
    assert not sessions.exists() or not list(sessions.iterdir())


def test_a_token_file_removed_as_it_is_locked_is_not_taken_for_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run without a token removes its file as it ends (under its lock). Another that
    opened the file just before then locks a file no longer at the path, and a third would
    lock a new one there: two runs of one name, each sure it holds the lock. Locked, the
    file must still be the path's, or it is opened again."""
    from client import saved
    from client.lib import BrokerAddress

    address = BrokerAddress(HOST, 5555, 5556)
    real_flock = fcntl.flock
    removed: list[str] = []

    def flock_after_a_removal(fd: int, op: int) -> None:
        if not removed:  # the first run's close, between this one's open and its lock
            path = next((tmp_path / "s").iterdir())
            path.unlink()
            removed.append(path.name)
        real_flock(fd, op)

    monkeypatch.setattr(saved.fcntl, "flock", flock_after_a_removal)
    opened = saved.SavedToken.open("bob", address, tmp_path / "s")
    assert opened is not None and removed == ["bob@127.0.0.1_5555"]
    assert os.path.samestat(os.fstat(opened._fd), os.stat(opened.path))  # the file at the path
    monkeypatch.setattr(saved.fcntl, "flock", real_flock)
    assert saved.SavedToken.open("bob", address, tmp_path / "s") is None  # locked: the name's one run
    opened.write("a-token")
    opened.close()
    assert opened.path.read_text() == "a-token"  # kept: see test_a_zchat_killed_and_started_again_...
    empty = saved.SavedToken.open("alice", address, tmp_path / "s")
    assert empty is not None
    empty.close()
    assert not empty.path.exists()  # never got a token: removed


def test_name_taken_and_bad_name(chats: Any, broker_proc: BrokerProcess) -> None:
    bob = chats("bob")
    bob.expect(lambda line: "joined" in line)
    taken = "the name 'bob' is taken (in use by a session heard from"
    for name, needle in (("bob", taken), ("-bad", "not a name")):
        result = subprocess.run(
            [bin_path("zchat"), f"--name={name}"],
            input="",
            env=broker_proc.env(),
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert result.returncode != 0
        assert needle in result.stderr, result.stderr


def test_python_dash_m_runs_both_commands() -> None:
    """``python -m broker`` and ``python -m client``: for a Python whose scripts are not on PATH."""
    for module, prog in (("broker", "zchat-broker"), ("client", "zchat")):
        out = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=15, check=False
        )
        assert out.returncode == 0 and out.stdout.startswith(f"{prog} "), (out.stdout, out.stderr)


def test_broker_help_and_bad_port() -> None:
    out = subprocess.run([bin_path("zchat-broker"), "--help"], capture_output=True, text=True, timeout=15, check=True)
    for flag in ("--host", "--port", "--pub-port", "--data", "--log-level", "ZCHAT_DATA"):
        assert flag in out.stdout
    bad = subprocess.run(
        [bin_path("zchat-broker"), "--port", "70000"], capture_output=True, text=True, timeout=15, check=False
    )
    assert bad.returncode == 2 and "70000 is not a port number (an integer 0-65535; 0 picks a free one)" in bad.stderr


def test_broker_arguments_that_cannot_work_are_refused_saying_why(tmp_path: Path) -> None:
    word = _broker_cmd("--port", "abc", "--data", str(tmp_path / "d"))
    expected = "argument --port: 'abc' is not a port number (an integer 0-65535; 0 picks a free one)"
    assert word.returncode == 2 and expected in word.stderr, word.stderr
    same = _broker_cmd("--port", "17572", "--pub-port", "17572", "--data", str(tmp_path / "d"))
    assert same.returncode == 2
    assert "--port and --pub-port (or ZCHAT_PORT and ZCHAT_PUB_PORT) are both 17572" in same.stderr, same.stderr
    assert not (tmp_path / "d").exists(), "refused before anything was opened"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    filed = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(a_file))
    assert filed.returncode == 1 and f"cannot open the store in {a_file}: it is not a directory" in filed.stderr
    assert a_file.read_text() == "not a store"


def test_client_arguments_that_cannot_work_are_refused_saying_why() -> None:
    for args, said in (
        (["--backlog", "-5"], "argument --backlog: -5 is not a count (0 or more)"),
        (["--backlog", "all"], "argument --backlog: 'all' is not a count (0 or more)"),
        (["--send", "  \t "], "zchat: --send: the text is blank: nothing to send"),
        # Taken for a flag: how to give it is said, not only that a value is missing.
        (
            ["--send", "-x"],
            "argument --send: expected one argument (give it one; a value that starts with - goes as --send=VALUE)",
        ),
        # `--room #dev` unquoted: the shell took "#dev" for a comment.
        (["--room"], "(give it one: a # starts a comment in the shell, so write --room dev or --room '#dev';"),
    ):
        result = subprocess.run(
            [bin_path("zchat"), "--name", "bob", "--host", f"{HOST}:1:2", *args],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert result.returncode == 2 and said in result.stderr, (args, result.stderr)
    # A misspelt --name: "--name is required" alone sent the user looking for the wrong thing.
    typo = subprocess.run([bin_path("zchat"), "--nmae", "bob"], capture_output=True, text=True, timeout=15, check=False)
    assert typo.returncode == 2, typo.stderr
    assert "required: --name (and not recognized: --nmae; a typo?)" in typo.stderr, typo.stderr
    # Values that start with "-" are not flags: argparse takes one with a space, or a number.
    for value in ("-x y", "-.5", "--- notes ---"):
        valued = subprocess.run(
            [bin_path("zchat"), "--send", value], capture_output=True, text=True, timeout=15, check=False
        )
        assert "not recognized" not in valued.stderr and "required: --name" in valued.stderr, valued.stderr
    usage = subprocess.run([bin_path("zchat"), "--help"], capture_output=True, text=True, timeout=15, check=True)
    assert "/lastlog TEXT (interactive)" in " ".join(usage.stdout.split())
    assert "pipe mode and --send: print each event as one JSON object" in " ".join(usage.stdout.split())


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("ZCHAT_DURABILITY", "fsync", "ZCHAT_DURABILITY='fsync': choose one of full, normal"),  # was "normal"
        ("ZCHAT_LOG_LEVEL", "verbose", "ZCHAT_LOG_LEVEL='verbose': choose one of debug, info, warning, error"),
        ("ZCHAT_PORT", "99999", "ZCHAT_PORT='99999': 99999 is not a port number (an integer 0-65535"),  # libzmq: 34463
        ("ZCHAT_PUB_PORT", "x", "ZCHAT_PUB_PORT='x': 'x' is not a port number (an integer 0-65535"),
        ("ZCHAT_RATE_LIMIT", "fast", "ZCHAT_RATE_LIMIT='fast': not a number"),
        ("ZCHAT_HEARTBEAT_MS", "5.5", "ZCHAT_HEARTBEAT_MS='5.5': not a whole number"),
        # In range only once parsed: said by the broker, naming the flag and the variable.
        ("ZCHAT_HEARTBEAT_MS", "50", "--heartbeat-ms (or ZCHAT_HEARTBEAT_MS) must be between 100 and 3600000, not 50"),
        ("ZCHAT_HEARTBEAT_MS", "3600001", "--heartbeat-ms (or ZCHAT_HEARTBEAT_MS) must be between 100 and 3600000"),
        ("ZCHAT_RATE_LIMIT", "-1", "--rate-limit (or ZCHAT_RATE_LIMIT) must be 0 (off) or more, not -1.0"),
        ("ZCHAT_JOIN_RATE", "nan", "--join-rate (or ZCHAT_JOIN_RATE) must be 0 (off) or more, not nan"),
        ("ZCHAT_CONNECT_RATE", "-1", "--connect-rate (or ZCHAT_CONNECT_RATE) must be 0 (off) or more, not -1.0"),
        ("ZCHAT_CONNECT_RATE", "nan", "--connect-rate (or ZCHAT_CONNECT_RATE) must be 0 (off) or more, not nan"),
        ("ZCHAT_PUB_HWM", "0", "--pub-hwm (or ZCHAT_PUB_HWM) must be between 1 and 2147483647, not 0"),
        ("ZCHAT_MIN_FREE", "-1", "--min-free (or ZCHAT_MIN_FREE) must be 0 (off) or a number of MiB, not -1.0"),
        ("ZCHAT_MIN_FREE", "nan", "--min-free (or ZCHAT_MIN_FREE) must be 0 (off) or a number of MiB, not nan"),
        ("ZCHAT_RETENTION", "0", "--retention (or ZCHAT_RETENTION) must be at least 1, not 0"),
        # Beyond what libzmq's options hold (they were an OverflowError traceback, exit 1).
        ("ZCHAT_PUB_HWM", "3000000000", "--pub-hwm (or ZCHAT_PUB_HWM) must be between 1 and 2147483647"),
        ("ZCHAT_MAX_MSG_BYTES", str(2**63), "--max-msg-bytes (or ZCHAT_MAX_MSG_BYTES) must be between 65536 and"),
        ("ZCHAT_RETENTION_DAYS", "week", "ZCHAT_RETENTION_DAYS='week': not a number"),
        ("ZCHAT_RETENTION_DAYS", "1e-8", "at least 1 ms (0.0000000116) and at most 1000000, not 1e-08"),
        (
            "ZCHAT_RETENTION_DAYS",
            "0",
            "must be a number of days of at least 1 ms (0.0000000116) and at most 1000000, not 0.0",
        ),
        (
            "ZCHAT_RETENTION_DAYS",
            "inf",
            "must be a number of days of at least 1 ms (0.0000000116) and at most 1000000, not inf",
        ),
        (
            "ZCHAT_RETENTION_DAYS",
            "1e12",
            "must be a number of days of at least 1 ms (0.0000000116) and at most 1000000, not 1000000000000.0",
        ),
    ],
)
def test_a_bad_broker_environment_variable_exits_2_naming_it(
    variable: str, value: str, said: str, tmp_path: Path
) -> None:
    env = {**os.environ, variable: value}
    result = _broker_cmd("--data", str(tmp_path / "d"), env=env)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was opened
    # A variable is only a default: --version and --help still work.
    assert _broker_cmd("--version", env=env).returncode == 0


def test_a_data_or_keys_directory_with_a_tilde_is_in_home_and_logged_absolute(tmp_path: Path) -> None:
    """No shell expands the ~ of --data=~/zc or of systemd's Environment=ZCHAT_DATA=~/zc: it
    made a directory named '~' in the working directory (and its ready line said
    'store ~/zc/zchat.sqlite3'). A relative --data is said as the absolute path it is."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir(parents=True)
    subprocess.run([bin_path("zchat-keygen"), "broker", "--dir", str(home / "keys")], check=True, capture_output=True)
    subprocess.run([bin_path("zchat-keygen"), "health", "--dir", str(home / "keys")], check=True, capture_output=True)
    (home / "keys" / "authorized").mkdir()
    (home / "keys" / "authorized" / "health.key").write_bytes((home / "keys" / "health.key").read_bytes())
    environ = {"HOME": str(home), "ZCHAT_KEYS": "~/keys"}
    broker = BrokerProcess(Path("~/zc"), environ=environ, cwd=cwd).start()
    try:
        # The health check reads the same variable the same way.
        health = [sys.executable, "-m", "broker.health", "--host", HOST, "--port", str(broker.port)]
        env = {**os.environ, **environ}
        checked = subprocess.run(health, env=env, capture_output=True, text=True, timeout=15, check=False)
        assert checked.returncode == 0, checked.stderr
    finally:
        assert broker.kill(signal.SIGTERM) == 0
    assert list(cwd.iterdir()) == []
    assert (home / "zc" / "zchat.sqlite3").exists()
    assert any(f"store {home}/zc/zchat.sqlite3 (" in line for line in broker.log), broker.log
    assert any("CURVE on: 1 authorized user;" in line for line in broker.log), broker.log
    relative = BrokerProcess(Path("rel"), cwd=cwd).start()
    assert relative.kill(signal.SIGTERM) == 0  # (it serves nothing: nothing to wait for)
    assert any(f"store {cwd}/rel/zchat.sqlite3 (" in line for line in relative.log), relative.log
    # The ready line also says what the operator may have set by a variable.
    assert any(
        line.rstrip().endswith("; heartbeat 5000 ms, durability full, disk alarm under 64 MiB free")
        for line in relative.log
    ), relative.log


def test_retention_days_is_for_the_embedded_store_only(tmp_path: Path) -> None:
    result = _broker_cmd("--retention-days", "30", "--backplane", "redis://127.0.0.1:1/0", "--data", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "--retention-days (or ZCHAT_RETENTION_DAYS) applies to the store in --data" in result.stderr


def test_min_free_is_for_the_embedded_store_only(tmp_path: Path) -> None:
    result = _broker_cmd("--min-free", "100", "--backplane", "redis://127.0.0.1:1/0", "--data", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "--min-free (or ZCHAT_MIN_FREE) guards the store in --data" in result.stderr


def test_a_flag_wins_over_a_bad_variable_and_names_are_not_case_sensitive(tmp_path: Path) -> None:
    env = {**os.environ, "ZCHAT_PORT": "99999", "ZCHAT_LOG_LEVEL": "DEBUG", "ZCHAT_DURABILITY": "Normal"}
    broker = BrokerProcess(tmp_path / "d", environ=env).start()  # it passes --port 0
    try:
        health = [sys.executable, "-m", "broker.health", "--host", HOST, "--port", str(broker.port)]
        assert subprocess.run(health, timeout=15, check=False).returncode == 0  # its ping is logged at debug
        wait_for(lambda: any(" DEBUG " in line for line in broker.log), 5, what=lambda: broker.log)
    finally:
        broker.kill()


def test_client_argument_errors_exit_2() -> None:
    env = {**os.environ, "ZCHAT_PORT": "abc"}
    for args, extra_env, needle in (
        # Said as the blank one is, not as the protocol's field check ("'text' is empty").
        (["--send", ""], {}, "zchat: --send: the text is empty: nothing to send"),
        # What a port is, not only "not a number".
        ([], env, "ZCHAT_PORT='abc': 'abc' is not a port number (an integer 1-65535)"),
        ([], {**os.environ, "ZCHAT_PUB_PORT": "99999"}, "ZCHAT_PUB_PORT='99999': 99999 is not a port number"),
        (["--port", "0"], {}, "argument --port: 0 is not a port number (an integer 1-65535)"),
        # What is wrong is named as it was given: the variable, or the flag.
        ([], {**os.environ, "ZCHAT_HOST": "[::1"}, "zchat: ZCHAT_HOST: broker address '[::1': no ']'"),
        (["--host", "[::1"], {}, "zchat: --host: broker address '[::1': no ']'"),
        ([], {**os.environ, "ZCHAT_KEY": "/k"}, "ZCHAT_KEY needs --broker-key (or ZCHAT_BROKER_KEY) too"),
        (["--broker-key", "/b"], {}, "--broker-key needs --key (or ZCHAT_KEY) too"),
    ):
        result = subprocess.run(
            [bin_path("zchat"), "--name", "x", *args],
            input="",
            env=extra_env or None,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_send_or_dump_under_a_name_in_use_says_they_need_a_name_of_their_own(
    chats: Any, broker_proc: BrokerProcess
) -> None:
    """The user chatting as bob who runs --send as bob from a script met name_taken with no word
    that a --send is a session of its own, not a line typed into the running zchat."""
    bob = chats("bob")
    bob.expect(lambda line: "joined" in line)
    for args in (("--send", "build done"), ("--dump", "5")):
        result = _run_zchat(broker_proc, "--name", "Bob", *args)
        assert result.returncode == 1
        assert "is taken" in result.stderr and result.stderr.rstrip().endswith(
            "; pick another with --name (--send and --dump connect as a client of their own: not under the name "
            "of a running zchat)"
        ), result.stderr
    piped = subprocess.run(
        [bin_path("zchat"), "--name", "bob"],
        input="hi",
        env=broker_proc.env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert piped.returncode == 1 and piped.stderr.rstrip().endswith("; pick another with --name"), piped.stderr


def _broker_cmd(*args: str, host: str | None = HOST, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``zchat-broker ARGS`` run to its end (``--host HOST`` first, unless ``host`` is None)."""
    return subprocess.run(
        [bin_path("zchat-broker"), *(["--host", host] if host else []), *args],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
        **kwargs,
    )


def _send_one(broker: BrokerProcess, text: str | bytes, name: str = "carol") -> subprocess.CompletedProcess[str]:
    return _run_zchat(broker, "--name", name, "--send", text)


def _run_zchat(broker: BrokerProcess, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    """``zchat ARGS`` against ``broker``, run to its end (stdin empty)."""
    return subprocess.run(
        [bin_path("zchat"), *args],
        env=broker.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def test_broker_runs_without_redis_installed(tmp_path: Path) -> None:
    """redis-py is the ``backplane`` extra: a plain ``pip install zchat`` has none, and
    the broker must serve without it (only ``--backplane`` needs it, and says so)."""
    stub = tmp_path / "no-redis" / "redis"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("redis-py is not installed (test)")\n')
    without = {"PYTHONPATH": str(stub.parent)}
    broker = BrokerProcess(tmp_path / "d", environ=without).start()
    try:
        sent = _send_one(broker, "no redis here")
        assert sent.returncode == 0, sent.stderr
    finally:
        broker.kill()
    refused = _broker_cmd("--backplane", "redis://127.0.0.1:1/0", env={**os.environ, **without})
    assert refused.returncode == 2
    # From the checkout it was installed from: PyPI's "zchat" is another project.
    assert "pip install '.[backplane]'" in refused.stderr and "zchat[backplane]" not in refused.stderr


def test_a_second_broker_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    """Two brokers on one store would number the same rooms each on its own; the first
    to commit a seq the other had used would stop. The second is refused at start."""
    first = BrokerProcess(tmp_path / "d").start()
    try:
        assert first.proc is not None
        second = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d"))
        assert second.returncode == 1
        assert "in use by another zchat-broker" in second.stderr, second.stderr
        sent = _send_one(first, "still here")
        assert sent.returncode == 0, sent.stderr
    finally:
        first.kill()


def test_a_store_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    """A read-only store (here an immutable file, which root cannot write either; in the field
    another uid's volume or a full disk) used to start, say ready, and stop at the first
    message: under compose, a restart loop. It is now refused before "ready"."""
    BrokerProcess(tmp_path / "d").start().kill(signal.SIGTERM)
    db = tmp_path / "d" / "zchat.sqlite3"
    subprocess.run(["chattr", "+i", str(db)], check=True, timeout=10)
    try:
        refused = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d"))
        assert refused.returncode == 1, refused.stderr
        assert "cannot open the store" in refused.stderr and "readonly" in refused.stderr, refused.stderr
        assert "ready" not in refused.stderr
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True, timeout=10)


def test_a_store_on_a_read_only_mount_is_said_to_be_on_one(tmp_path: Path) -> None:
    """What systemd's ProtectSystem=strict makes of a --data outside ReadWritePaths=: the
    line blamed the modes, '(... (owner uid 0, mode 700) is not usable by root (uid 0))',
    of a directory whose owner and mode were right."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (CI runs as root)")
    source, mount = tmp_path / "source", tmp_path / "mount"
    (source / "d").mkdir(parents=True, mode=0o700)
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mount)], check=False, timeout=10).returncode:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True, timeout=10)
        refused = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(mount / "d"))
        assert refused.returncode == 1, refused.stderr
        assert f"({mount / 'd'} is on a read-only mount" in refused.stderr, refused.stderr
        assert "is not usable by" not in refused.stderr, refused.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=10)


def test_the_store_is_readable_by_its_user_only(tmp_path: Path) -> None:
    """Messages and DMs are in the store: a new data directory is 0700 and the database
    0600; a directory others can read is left as it is, with a warning naming it."""
    BrokerProcess(tmp_path / "new").start().kill(signal.SIGTERM)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "zchat.sqlite3").stat().st_mode & 0o777 == 0o600
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)  # whatever the umask
    broker = BrokerProcess(tmp_path / "open").start()
    try:
        assert any("has mode 755: other users of this machine may read" in line for line in broker.log), broker.log
    finally:
        broker.kill()
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o755


def test_the_broker_raises_its_open_file_limit_as_far_as_it_may(tmp_path: Path) -> None:
    """Shells often start with a soft limit of 1024 files: about 480 clients. The broker
    raises it towards 2 per --max-sessions (up to the hard limit) and says if that is short:
    a warning when the operator chose --max-sessions (flag or variable), an info line with
    the default 10,000 (a warning at every start of every small broker was noise)."""
    broker = BrokerProcess(tmp_path / "d", prefix=["prlimit", "--nofile=256:4096"]).start()
    try:
        assert broker.proc is not None
        limits = Path(f"/proc/{broker.proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+4096\s+4096", limits), limits
        said = [line for line in broker.log if "the open-file limit is 4096" in line]
        assert len(said) == 1 and " INFO the open-file limit is 4096: enough for about 2016 sessions" in said[0], said
        assert "the default --max-sessions is 10000); to serve more, raise it (ulimit -n" in said[0], said
    finally:
        broker.kill()
    for chosen, environ in ((["--max-sessions", "3000"], {}), ([], {"ZCHAT_MAX_SESSIONS": "3000"})):
        short = BrokerProcess(tmp_path / "d", prefix=["prlimit", "--nofile=256:4096"], extra=chosen, environ=environ)
        short.start()
        try:
            given = "--max-sessions 3000" if chosen else "ZCHAT_MAX_SESSIONS=3000"
            needle = (
                " WARNING the open-file limit is 4096: enough for about 2016 sessions (2 connections each), "
                f"fewer than {given}: clients beyond that wait unanswered; raise it (ulimit -n"
            )
            assert any(needle in line for line in short.log), short.log
        finally:
            short.kill()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # raising it would need privileges
    roomy = BrokerProcess(tmp_path / "e", prefix=["prlimit", f"--nofile=256:{hard}"], extra=["--max-sessions", "50"])
    roomy.start()
    try:
        assert roomy.proc is not None
        assert re.search(r"Max open files\s+256\s", Path(f"/proc/{roomy.proc.pid}/limits").read_text())
        assert not any("open-file limit" in line for line in roomy.log)  # 256 serve 50 sessions
    finally:
        roomy.kill()


def test_a_broker_out_of_file_descriptors_says_so(tmp_path: Path) -> None:
    """Out of file descriptors, libzmq retries accept() at once, for ever: the broker
    looked only busy, and new clients went unanswered. Now the log says why."""
    broker = BrokerProcess(tmp_path / "d", prefix=["prlimit", "--nofile=64:64"]).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        # (Too few for any team: a warning, though --max-sessions is the default.)
        assert any(" WARNING the open-file limit is 64: enough for about 0 sessions" in line for line in broker.log)
        # As many connections as the limit itself: the broker holds some 27 files once
        # started, so 40 left it only 3 short, and a start that took 3 fewer (another
        # libzmq, SQLite or Python) would have served them all and never said it.
        socks = [ctx.socket(zmq.DEALER) for _ in range(64)]  # kept: a collected socket closes
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{HOST}:{broker.port}")
        needle = "cannot accept client connections: Too many open files (open-file limit 64; raise it"
        wait_for(lambda: any(needle in line for line in broker.log), 10, what=lambda: broker.log[-3:])
    finally:
        ctx.destroy(linger=0)
        broker.kill()


@pytest.mark.timeout(120)
def test_at_any_low_open_file_limit_the_broker_starts_or_says_why_it_cannot(tmp_path: Path) -> None:
    """Each file the start opens may be the one over the limit. The store writer's thread
    died with a traceback while the broker said it was ready; at 18 files libzmq aborted
    in a bind (SIGABRT, no log line), which CI met. Below 64 the broker now refuses to
    start, with a line; from 64 on it starts."""
    said: dict[int, str] = {}
    for limit in [*range(18, 40, 3), 63, 64, 70]:
        command = ["prlimit", f"--nofile={limit}:{limit}", bin_path("zchat-broker"), "--host", HOST]
        command += ["--port", "0", "--pub-port", "0", "--data", str(tmp_path / str(limit))]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " ready: " in line:
                proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        log = "".join(lines)
        assert "Traceback" not in log and "Exception in thread" not in log, (limit, log)
        ready = " ready: " in log
        assert rc == (0 if ready else 1), (limit, rc, log)
        said[limit] = "ready" if ready else lines[-1].split(" ERROR ", 1)[-1].strip()
        assert not (tmp_path / str(limit)).exists() or ready, (limit, "a refused start made its data directory")
    for limit, why in said.items():
        expected = "ready" if limit >= 64 else f"the open-file limit is {limit}, below the 64 the broker needs to start"
        assert why.startswith(expected), (limit, why)


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    """And a broker that could not listen leaves no empty store behind; a store or a
    file that was there before is kept, whatever it holds."""
    first = BrokerProcess(tmp_path / "d").start()
    try:
        busy = _broker_cmd("--port", str(first.port), "--pub-port", "0", "--data", str(tmp_path / "e"))
        assert busy.returncode == 1
        assert f"cannot listen on {HOST} ports {first.port}/0" in busy.stderr, busy.stderr
        assert (
            "another program has that port (a zchat-broker already running?): stop it, or pick free ports with "
            "--port and --pub-port" in busy.stderr
        ), busy.stderr
        assert "Traceback" not in busy.stderr
        assert list((tmp_path / "e").iterdir()) == []
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "notes.txt").write_text("the operator's")
        _broker_cmd("--port", str(first.port), "--pub-port", "0", "--data", str(tmp_path / "f"))
        assert sorted(path.name for path in (tmp_path / "f").iterdir()) == ["notes.txt"]
        # An SQLite file that is not a zchat store (version 0, no events table) is not ours.
        foreign = sqlite3.connect(tmp_path / "f" / "zchat.sqlite3")
        foreign.execute("CREATE TABLE notes (text TEXT)")
        foreign.execute("INSERT INTO notes VALUES ('precious')")
        foreign.commit()
        foreign.close()
        _broker_cmd("--port", str(first.port), "--pub-port", "0", "--data", str(tmp_path / "f"))
        kept_notes = sqlite3.connect(tmp_path / "f" / "zchat.sqlite3")
        assert kept_notes.execute("SELECT text FROM notes").fetchall() == [("precious",)]
        kept_notes.close()
        # A store with something in it stays, whatever happens to the broker.
        kept = BrokerProcess(tmp_path / "g").start()
        assert _send_one(kept, "keep me").returncode == 0
        kept.kill(signal.SIGTERM)
        busy = _broker_cmd("--port", str(first.port), "--pub-port", "0", "--data", str(tmp_path / "g"))
        assert busy.returncode == 1
        assert (tmp_path / "g" / "zchat.sqlite3").stat().st_size > 0
    finally:
        first.kill()


def test_a_privileged_port_without_the_privilege_says_what_to_do(tmp_path: Path) -> None:
    """A port below 1024 without CAP_NET_BIND_SERVICE said only "Permission denied",
    which sends an operator looking at files. As root (CI), the broker runs with that
    capability taken out of its bounding set, which is what a service user lacks."""
    try:
        first_free = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        pytest.skip("no ip_unprivileged_port_start here")
    if first_free <= 1:
        pytest.skip("every port is unprivileged here")
    low = min(first_free, 1024) - 1
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-net_bind_service"]
    command = [bin_path("zchat-broker"), "--host", HOST, "--port", "0", "--pub-port", str(low)]
    run = subprocess.run(
        [*prefix, *command, "--data", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert "Permission denied" in run.stderr, run.stderr
    assert f"--pub-port {low}: a port below 1024 needs root or CAP_NET_BIND_SERVICE" in run.stderr, run.stderr
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in run.stderr, run.stderr
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in (Path(__file__).parents[1] / "docs/operations.md").read_text()


def test_a_broker_address_from_zchat_host_is_said_to_come_from_there(tmp_path: Path) -> None:
    """zchat reads ZCHAT_HOST as the broker to connect to; exported for it in an
    operator's shell, it moves the broker's address too. The variable stays (a unit may
    set it), and the broker says where the address came from: in its ready line, and
    when it cannot listen there."""
    env = {**os.environ, "ZCHAT_HOST": HOST}
    args = [bin_path("zchat-broker"), "--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d")]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not lines or " ready: " not in lines[-1]:
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line)
        assert lines[-1].rstrip().endswith(f"; address from ZCHAT_HOST={HOST}"), lines[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    # An address of no interface here (TEST-NET-1), as a client's broker address would be.
    away = _broker_cmd(*args[1:], host=None, env={**os.environ, "ZCHAT_HOST": "192.0.2.1"})
    assert away.returncode == 1, away.stderr
    assert "that address came from ZCHAT_HOST, which zchat also reads as the broker to connect to" in away.stderr
    flag = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(tmp_path / "e"), host="192.0.2.1")
    assert flag.returncode == 1 and "cannot listen on 192.0.2.1" in flag.stderr, flag.stderr
    assert "ZCHAT_HOST" not in flag.stderr


def test_broker_exits_quickly_on_sigterm(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "d").start()
    start = time.monotonic()
    assert broker.kill(signal.SIGTERM) == 0
    assert time.monotonic() - start < 3
    assert any("shutting down" in line for line in broker.log)


#: A store whose retention at open takes as long as a year of events would, inside its
#: transaction (the real _prune_all follows), and says when it is under way.
SLOW_OPEN = """
import sys, time, broker.cli as c
class SlowOpen(c.Store):
    def _prune_all(self, retention):
        with self._immediate() as db:
            db.execute("DELETE FROM events")
            print("pruning", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
        super()._prune_all(retention)
c.Store = SlowOpen
sys.exit(c.main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_store_opens_is_said_and_rolls_the_open_back(tmp_path: Path, sig: signal.Signals) -> None:
    """A `systemctl stop` during a long open (a new --retention on a big store) killed the
    broker without a line in the log, and a Ctrl-C printed a KeyboardInterrupt traceback."""
    first = BrokerProcess(tmp_path / "d").start()
    chat = subprocess.run(
        [bin_path("zchat"), "--name", "a", "--send", "kept"],
        check=False,
        env=first.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert chat.returncode == 0, chat.stderr
    assert first.kill(signal.SIGTERM) == 0
    args = ["--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d"), "--retention", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_OPEN, *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not lines or "pruning" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0, lines
        lines += proc.stderr.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = "".join(lines)
    assert f"{sig.name} received while opening the store; stopped before serving" in log, log
    assert "Traceback" not in log, log
    texts = [row[0] for row in sqlite3.connect(tmp_path / "d" / "zchat.sqlite3").execute("SELECT body FROM events")]
    assert any(b"kept" in body for body in texts), "the open's delete was not rolled back"


#: A broker whose bind takes until a stop has come: Broker() waits (at most 30 s) for
#: the signal that main() keeps for later, as it does for one that comes while binding.
SLOW_BIND = """
import sys, time, broker.cli as c
class SlowBind(c.Broker):
    def __init__(self, *args, **kwargs):
        stops = sys._getframe(1).f_locals["early_stops"]
        print("binding", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 30
        while not stops and time.monotonic() < deadline:
            time.sleep(0.01)
        super().__init__(*args, **kwargs)
c.Broker = SlowBind
sys.exit(c.main())
"""


def test_a_stop_while_the_broker_binds_is_not_followed_by_ready(tmp_path: Path) -> None:
    """A SIGTERM that came while the broker bound its ports was acted on once it could
    stop, but the log said "ready" after "SIGTERM received, shutting down"."""
    args = ["--host", HOST, "--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d")]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BIND, *args], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not lines or "binding" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, lines
        lines += proc.stderr.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = "".join(lines)
    assert "SIGTERM received, shutting down" in log, log
    assert re.search(r"stopped in \d", log), log
    assert " ready: " not in log, log
    assert "Traceback" not in log, log


def test_a_stop_slower_than_expected_logs_every_threads_stack(tmp_path: Path) -> None:
    """The stacks a stuck stop would leave in the log: here the limit is 0.2 s, and the stop
    is held for 1 s before the broker closes its sockets and ends its threads. (At 1 ms the
    dump met threads as they ended: faulthandler reads every thread's frames without the
    GIL, and one run in a review died of SIGSEGV.)"""
    stuck = (
        "import sys, time, broker.cli as c, broker.server as s; c.STOP_STACKS_S = 0.2; "
        "close = s.Broker._close_sockets; "
        "s.Broker._close_sockets = lambda self: (time.sleep(1.0), close(self))[1]; "
        "sys.argv = sys.argv[1:]; sys.exit(c.main())"
    )
    hurried = [sys.executable, "-c", stuck]
    broker = BrokerProcess(tmp_path / "d", prefix=hurried).start()
    assert broker.kill(signal.SIGTERM) == 0
    wait_for(lambda: any("stopped in" in line for line in broker.log), 10)
    log = "".join(broker.log)
    assert "most recent call first" in log and 'File "' in log, log
    # A stop within the limit (the usual one, 5 s) says nothing of the kind.
    calm = BrokerProcess(tmp_path / "e").start()
    assert calm.kill(signal.SIGTERM) == 0
    wait_for(lambda: any("stopped in" in line for line in calm.log), 10)
    assert "most recent call first" not in "".join(calm.log)


def test_sighup_stays_ignored_under_nohup(broker_proc: BrokerProcess) -> None:
    proc = subprocess.Popen(
        ["nohup", bin_path("zchat"), "--name", "bot"],  # nohup execs zchat with SIGHUP ignored
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=broker_proc.env(),
    )
    try:
        assert proc.stdout is not None
        assert "bot joined #general" in proc.stdout.readline()
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_lines_never_acknowledged_are_listed_when_the_client_ends(tmp_path: Path, sig: signal.Signals) -> None:
    """Lines the rate limit still held when a SIGTERM (or a Ctrl-C) came: the user is told
    which, word for word, to send them again (a count alone left them lost)."""
    broker = BrokerProcess(tmp_path / "data", extra=["--rate-limit", "0.1"]).start()
    try:
        bob = Chat(broker, "bob", "--json")
        alice = Chat(broker, "alice", "--json")
        try:
            bob.expect_json(type="presence", name="alice", event="join")
            alice.say(*[f"m{i}" for i in range(60)])  # a burst of 50 passes; the rest is held
            alice.expect_json(type="msg", text="m49")  # her own line, shown once acknowledged
            alice.proc.send_signal(sig)
            assert alice.proc.wait(timeout=10) == 128 + sig
            # Held back by the rate limit, they were not stored, if its refusals had come
            # before the signal; else they had gone, and may have arrived.
            wait_for(
                lambda: re.search(r"#general( \(not stored\))?: m59$", alice.errors[-1] if alice.errors else ""),
                5,
                what=lambda: alice.errors,
            )
            assert any(
                re.match(
                    rf"zchat: {sig.name}: \d+ message\(s\) not acknowledged \((the broker answered rate_limited: "
                    r"not stored; send them again later|they may have arrived; check the room before sending them "
                    r"again)\):$",
                    line,
                )
                for line in alice.errors
            ), alice.errors
            assert not any("#general: m49" in line for line in alice.errors), alice.errors
        finally:
            alice.stop()
            bob.stop()
    finally:
        broker.kill()


@pytest.mark.timeout(60)
def test_lines_a_broker_with_its_disk_alarm_refused_are_said_not_stored_with_why(tmp_path: Path) -> None:
    """The disk alarm (--min-free; here above any disk's free space): the line waits, the
    user is told once why, and on a stop it is listed as not stored, not as "may have
    arrived" (which is right only when the broker may have taken it)."""
    broker = BrokerProcess(tmp_path / "data", extra=["--min-free", "1e9"]).start()
    try:
        alice = Chat(broker, "alice")
        try:
            alice.say("hello there")
            wait_for(
                lambda: any("refuses messages for now" in line for line in alice.errors), 15, what=lambda: alice.errors
            )
            alice.proc.send_signal(signal.SIGTERM)
            assert alice.proc.wait(timeout=10) == 128 + signal.SIGTERM
            wait_for(
                lambda: any("#general (not stored): hello there" in line for line in alice.errors),
                5,
                what=lambda: alice.errors,
            )
            said = [line for line in alice.errors if "refuses messages for now" in line]
            assert len(said) == 1 and "the broker's disk is nearly full" in said[0], alice.errors
            assert "zchat: SIGTERM: 1 message(s) not acknowledged (the broker answered unavailable: not stored; " in (
                "\n".join(alice.errors)
            ), alice.errors
        finally:
            alice.stop()
    finally:
        broker.kill()


@pytest.mark.timeout(60)
def test_send_to_a_broker_with_its_disk_alarm_says_why_and_that_nothing_was_stored(tmp_path: Path) -> None:
    """--send waits for its ack (10 s); refused all along as unavailable, it said "no ack
    in time: may or may not have been stored", though the broker had said why, and that
    nothing was."""
    broker = BrokerProcess(tmp_path / "data", extra=["--min-free", "1e9"]).start()
    try:
        result = _send_one(broker, "one shot")
        assert result.returncode == 1, result.stderr
        assert "refuses messages for now (the broker's disk is nearly full" in result.stderr, result.stderr
        assert "not sent: the broker held it back (unavailable) until the timeout; nothing was stored" in (
            result.stderr
        ), result.stderr
        assert "may or may not" not in result.stderr
    finally:
        broker.kill()


@pytest.mark.timeout(60)
def test_the_health_check_says_the_disk_alarm_and_still_exits_0(tmp_path: Path) -> None:
    """A broker that answers but refuses room messages (its disk alarm) was reported as
    healthy, without a word; it still is (a restart frees no space, and an orchestrator
    that replaces unhealthy containers would make it flap), with a line that says so."""
    alarmed = BrokerProcess(tmp_path / "alarmed", extra=["--min-free", "1e9"]).start()
    fine = BrokerProcess(tmp_path / "fine").start()
    try:
        for broker, said in ((alarmed, True), (fine, False)):
            health = [sys.executable, "-m", "broker.health", "--host", HOST, "--port", str(broker.port)]
            checked = subprocess.run(health, capture_output=True, text=True, timeout=15, check=False)
            assert checked.returncode == 0, checked.stderr
            assert checked.stderr == ""
            if said:
                assert checked.stdout.startswith(
                    "broker.health: healthy, but its disk alarm is on: it refuses room "
                ), checked.stdout
            else:
                assert checked.stdout == ""
    finally:
        alarmed.kill()
        fine.kill()


def test_a_skipped_run_is_also_in_the_json_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """An archiver reading --json must learn of the events it will never get (the broker's
    retention deleted them); other status changes stay on stderr only."""
    from client.cli import Printer
    from client.lib import Event

    text = "930 events of #general (seq 12-941) are no longer kept by the broker (its retention): skipped"
    skipped = Event(type="status", event="skipped", room="general", seq=941, text=text)
    Printer(as_json=True).event(skipped)
    Printer(as_json=True).event(Event(type="status", event="reconnecting", text="reconnecting to x"))
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"type": "status", "event": "skipped", "room": "general", "seq": 941, "text": text}
    ]
    assert text in err and "reconnecting to x" in err
    Printer(as_json=False).event(skipped)
    out, err = capsys.readouterr()
    assert out == "" and text in err


@pytest.mark.parametrize("page", [2, 3, 6])
def test_a_damaged_store_is_refused_in_one_line(tmp_path: Path, page: int) -> None:
    """A page of garbage in the store ("database disk image is malformed") is a line that
    says so and exit 1, as for any store the broker cannot use, not a traceback."""
    from broker.store import Store

    store = Store(tmp_path / "d", "normal", None)
    store.append([("general", i, i, "ann", f"m{i}", b"x" * 200) for i in range(1, 3001)])
    store.close()
    with open(tmp_path / "d" / "zchat.sqlite3", "r+b") as db:
        db.seek(page * 4096)
        db.write(b"\xff" * 4096)
    refused = _broker_cmd("--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d"))
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert "malformed" in refused.stderr and "ready" not in refused.stderr, refused.stderr


def _texts_in(broker: BrokerProcess, room: str) -> list[str]:
    """Every message text stored in ``room``, in seq order (read by a library client)."""
    from client.lib import Client

    reader = Client("reader", HOST, broker.port, broker.pub_port)
    reader.connect()
    try:
        texts: list[str] = []
        after, top = 0, 1
        while after < top:
            events, top = reader.history(room, after, p.MAX_HISTORY_LIMIT)
            if not events:
                break
            texts += [e.text or "" for e in events if e.type == "msg"]
            after = events[-1].seq or top
        return texts
    finally:
        reader.close(settle=0)


@pytest.fixture
def slow_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker whose rate limit holds a burst of lines back for a second or two."""
    broker = BrokerProcess(tmp_path / "data", extra=["--rate-limit", "20", "--rate-burst", "5"]).start()
    yield broker
    broker.kill()


def _lines_through(
    broker: BrokerProcess, workdir: Path, lines: list[str], rest: str
) -> subprocess.CompletedProcess[str]:
    """``zchat --name alice --room r REST`` run by bash in ``workdir``, with ``lines`` in the file ``in``."""
    (workdir / "in").write_text("".join(f"{line}\n" for line in lines))
    return subprocess.run(
        f"{shlex.quote(bin_path('zchat'))} --name alice --room r {rest}",
        shell=True,
        executable="/bin/bash",
        cwd=workdir,
        capture_output=True,
        text=True,
        env=broker.env(),
        timeout=30,
        check=False,
    )


def test_a_reader_that_goes_away_does_not_cost_the_lines_already_read(
    slow_broker: BrokerProcess, tmp_path: Path
) -> None:
    """``zchat < file | head -n 1``: head leaves while the rate limit still holds most of
    the lines zchat has read. It stops reading, sends what it read and ends with 0 (it
    used to end at once, with 0, and most lines were never sent)."""
    lines = [f"line {i}" for i in range(30)]
    run = _lines_through(
        slow_broker, tmp_path, lines, '--backlog 0 < in | head -n 1; echo "zchat=${PIPESTATUS[0]}" >&2'
    )
    assert "zchat=0" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stdout.splitlines()) == 1
    assert _texts_in(slow_broker, "r") == lines


@pytest.mark.parametrize(("redirect", "why"), [("> /dev/full", "No space left on device"), (">&-", "stdout is closed")])
def test_a_stdout_that_fails_is_said_in_one_line_and_ends_the_run(
    slow_broker: BrokerProcess, tmp_path: Path, redirect: str, why: str
) -> None:
    lines = [f"line {i}" for i in range(12)]
    run = _lines_through(slow_broker, tmp_path, lines, f"< in {redirect}")
    assert run.returncode == 1, run.stderr
    assert f"zchat: cannot write to stdout: {why}; events are no longer shown" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "refused or failed" not in run.stderr, run.stderr  # no line was refused
    # It read no more input after the failure; what it had read went, once, in order.
    stored = _texts_in(slow_broker, "r")
    assert stored == lines[: len(stored)]


def _write_more_than_a_pipe_holds(broker: BrokerProcess) -> list[str]:
    """400 lines to #general from a pipe-mode writer, all acknowledged: as JSON events,
    about 140 KiB, more than a pipe's 64 KiB. The lines, in order."""
    lines = [f"{i:03} " + "x" * 250 for i in range(400)]
    writer = subprocess.run(
        [bin_path("zchat"), "--name", "writer", "--no-commands", "--backlog", "0"],
        input="\n".join(lines) + "\n",
        env=broker.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert writer.returncode == 0, writer.stderr
    return lines


@pytest.mark.timeout(60)
def test_a_reader_that_pauses_with_the_pipe_full_does_not_cost_the_session(tmp_path: Path) -> None:
    """stdout's reader pauses (a consumer busy with a line, a pager) while the pipe is full:
    zchat, blocked in its write, sent no ping, and 3 heartbeats later the broker ended its
    session (a leave "timeout", then a new session: DMs sent meanwhile lost, the name free
    to take). Now it keeps the session alive while its output waits."""
    broker = BrokerProcess(tmp_path / "d", extra=["--heartbeat-ms", "300", "--rate-limit", "0"]).start()
    reader = subprocess.Popen(
        [bin_path("zchat"), "--name", "reader", "--json", "--backlog", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=broker.env(),
    )
    try:
        wait_for(lambda: any("session start: reader" in line for line in broker.log), 10)
        lines = _write_more_than_a_pipe_holds(broker)
        # Nobody reads the reader's output for 5 expiry times (proving an absence needs a wait).
        quiet_until = time.monotonic() + 5 * 0.9
        while time.monotonic() < quiet_until and not any("session expired: reader" in x for x in broker.log):
            time.sleep(0.05)
        assert reader.stdin is not None and reader.stdout is not None
        out: list[dict[str, Any]] = []
        for raw in reader.stdout:  # read now: all of it, up to the writer's last line
            out.append(json.loads(raw))
            if out[-1].get("text") == lines[-1]:
                break
        reader.stdin.close()
        assert reader.wait(timeout=15) == 0
        assert [e["text"] for e in out if e["type"] == "msg"] == lines
        assert not any(e["type"] == "presence" and e.get("name") == "reader" for e in out), out[:5]
        assert not any("session expired: reader" in line for line in broker.log)
        assert reader.stderr is not None and reader.stderr.read() == b""
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait(timeout=10)
        broker.kill()


@pytest.mark.timeout(60)
def _bytes_waiting(proc: subprocess.Popen[bytes]) -> Callable[[], int]:
    """How many bytes wait unread in ``proc``'s stdout pipe, asked anew at each call."""

    def waiting() -> int:
        assert proc.stdout is not None
        count = bytearray(4)
        fcntl.ioctl(proc.stdout.fileno(), termios.FIONREAD, count)
        return int.from_bytes(count, sys.byteorder)

    return waiting


@contextlib.contextmanager
def _reader_on_one_page(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    """A broker; ``zchat --json`` in #general with a stdout pipe of one page (4096 bytes)
    that nobody reads yet; and a library client, ``writer``, in #general once the reader
    is there. All stopped at the end."""
    broker = BrokerProcess(tmp_path / "d").start()
    reader = subprocess.Popen(
        [bin_path("zchat"), "--name", "reader", "--json", "--backlog", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=broker.env(),
    )
    writer = Client("writer", HOST, broker.port, broker.pub_port)
    try:
        assert reader.stdout is not None
        fcntl.fcntl(reader.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        writer.connect()
        writer.join("general")
        wait_for(lambda: "reader" in writer.who("general"), 10)
        yield reader, writer
    finally:
        writer.close(settle=0)
        if reader.poll() is None:
            reader.kill()
        reader.wait(timeout=10)
        broker.kill()


def test_a_stop_signal_gives_up_on_a_reader_that_reads_nothing(tmp_path: Path) -> None:
    """SIGTERM while stdout's reader reads nothing (the pipe full): the stop shows what had
    arrived before it lists what was not acknowledged, and waited for the reader without
    end, deaf to more SIGTERMs (they are ignored during the bye). Now it gives the reader
    2 s, says so, and ends with 143."""
    broker = BrokerProcess(tmp_path / "d", extra=["--rate-limit", "0"]).start()
    writer = _run_zchat(broker, "--name", "writer", "--no-commands", "--backlog", "0", "--send", "first")
    assert writer.returncode == 0, writer.stderr
    _write_more_than_a_pipe_holds(broker)
    reader = subprocess.Popen(
        [bin_path("zchat"), "--name", "reader", "--json", "--backlog", "400"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=broker.env(),
    )
    try:
        assert reader.stdout is not None and reader.stderr is not None
        in_the_pipe = _bytes_waiting(reader)
        # Its backlog is being written: more than the pipe holds, so it is stalled, or will be.
        wait_for(lambda: in_the_pipe() >= 40 * 1024, 15, what=in_the_pipe)
        reader.send_signal(signal.SIGTERM)
        assert reader.wait(timeout=10) == 128 + signal.SIGTERM
        assert reader.stderr.read().decode().splitlines() == [
            "zchat: cannot write to stdout: its reader read nothing for 2 s after SIGTERM; events are no longer shown"
        ]
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait(timeout=10)
        broker.kill()


def test_a_stop_signal_writes_the_rest_of_the_line_it_cut_short(tmp_path: Path) -> None:
    """SIGTERM while the last event's line waits for room in stdout: the stop writes the
    rest of that line (its reader reads again within the 2 s it is given). The rest was
    kept for the next line, and with none after it the output ended mid-line: half a
    JSON object, the event lost."""
    # A pipe of one page: full with the first piece of the line, whose rest waits.
    with _reader_on_one_page(tmp_path) as (reader, writer):
        in_the_pipe = _bytes_waiting(reader)
        text = "\u00e9" * p.MAX_TEXT_CHARS  # 8000 bytes: more than the pipe holds
        writer.send_wait("general", text, timeout=10)
        wait_for(in_the_pipe, 10, what=in_the_pipe)  # its line is begun, and waits for room
        reader.send_signal(signal.SIGTERM)
        out, err = reader.communicate(timeout=15)
        assert reader.returncode == 128 + signal.SIGTERM, err
        assert out.endswith(b"\n"), out[-80:]
        assert [json.loads(line)["text"] for line in out.decode().splitlines()] == [text]


def test_a_line_up_to_pipe_buf_bytes_is_written_whole(tmp_path: Path) -> None:
    """A line of at most PIPE_BUF bytes goes to stdout in one write, which POSIX keeps
    whole in a pipe: two zchats into one pipe (one reader for two rooms) never cut into
    each other's lines. Output waiting for room (886cc5f) went in pieces of 1024
    characters: a 2,500-byte line was 3 writes. Seen through a pipe of one page that
    nobody reads: its first write is all it takes."""
    with _reader_on_one_page(tmp_path) as (reader, writer):
        assert reader.stdout is not None
        in_the_pipe = _bytes_waiting(reader)
        text = "\u00e9" * 1200  # 2,400 bytes: its line is more than 1024 characters, less than PIPE_BUF bytes
        writer.send_wait("general", text, timeout=10)
        wait_for(lambda: in_the_pipe() > 2400, 10, what=in_the_pipe)
        line = os.read(reader.stdout.fileno(), 4096)
        assert line.endswith(b"\n") and json.loads(line)["text"] == text, line[-80:]


def test_pipe_mode_with_stderr_closed_still_sends(slow_broker: BrokerProcess, tmp_path: Path) -> None:
    """Started with stderr closed (`2>&-`), its first notice (here: no room events on a
    wrong --pub-port) ended the run with the line unsent (Python's stderr is None)."""
    run = _lines_through(slow_broker, tmp_path, ["hello there"], "--pub-port 1 --backlog 0 < in 2>&-")
    assert run.returncode == 0
    assert _texts_in(slow_broker, "r") == ["hello there"]


def test_pipe_mode_with_stdin_closed_reads_no_lines(slow_broker: BrokerProcess, tmp_path: Path) -> None:
    """Started with stdin closed (`<&-`): as an empty input, not a traceback."""
    run = _lines_through(slow_broker, tmp_path, [], "--backlog 0 <&-")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # (no traceback)


def test_ctrl_c_while_connecting_ends_quietly(tmp_path: Path) -> None:
    """A port that accepts and never speaks: the client waits for its greeting, and a
    Ctrl-C meanwhile ends it with 130 and no traceback."""
    with socket.socket() as mute:
        mute.bind((HOST, 0))
        mute.listen()
        mute.settimeout(10)
        proc = subprocess.Popen(
            [bin_path("zchat"), "--name", "alice", "--host", f"{HOST}:{mute.getsockname()[1]}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = mute.accept()  # it is connecting
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_send_turns_bytes_that_are_not_utf8_into_replacement_characters(broker_proc: BrokerProcess) -> None:
    """As pipe mode does with its lines (it used to fail with a UnicodeEncodeError)."""
    run = _send_one(broker_proc, b"caf\xe9 ok")
    assert run.returncode == 0, run.stderr
    assert _texts_in(broker_proc, "general") == ["caf\ufffd ok"]


def test_no_commands_sends_lines_starting_with_a_slash_as_they_are(broker_proc: BrokerProcess) -> None:
    """``tail -f app.log | zchat --no-commands``: a log line "/leave" is a line of the log.
    A line refused in pipe mode says which line it was."""
    lines = ["/var/log/app rotated", "/leave", "//two slashes", "/quit", "last"]
    run = subprocess.run(
        [bin_path("zchat"), "--name", "app", "--room", "ops", "--no-commands"],
        input="".join(f"{line}\n" for line in [*lines[:2], "y" * 4001, *lines[2:]]),
        env=broker_proc.env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert run.returncode == 1, run.stderr  # the line over the limit
    assert "zchat: too_large: text of 4001 characters, the limit is 4000 [#ops: yyyyyyy" in run.stderr, run.stderr
    assert _texts_in(broker_proc, "ops") == lines


def test_dump_prints_the_last_events_without_joining(chats: Any, broker_proc: BrokerProcess) -> None:
    """``--dump N``: the room's last N events, and nothing of the dumper in the room."""
    writer = chats("writer")
    writer.say(*[f"m{i}" for i in range(20)])
    writer.close_input()
    assert writer.proc.wait(timeout=15) == 0
    for _ in range(2):  # a second dump sees the same: the first left no trace
        run = _run_zchat(broker_proc, "--name", "dumper", "--json", "--dump", "12")
        assert run.returncode == 0, run.stderr
        events = [json.loads(line) for line in run.stdout.splitlines()]
        assert [e.get("text") for e in events] == [*(f"m{i}" for i in range(9, 20)), None]  # the writer's leave last
        # From the room's history, as /history's events: not "backlog" (from before a join of ours).
        assert all(e.get("history") is True and "backlog" not in e for e in events), events
        assert events[-1]["name"] == "writer", events[-1]
    assert "dumper" not in run.stdout
    empty = _run_zchat(broker_proc, "--name", "x", "--dump", "5", "--room", "genral")
    assert (empty.returncode, empty.stdout) == (0, "")
    assert empty.stderr == "zchat: #genral has no events: nobody has joined it\n"
    both = _run_zchat(broker_proc, "--name", "x", "--dump", "1", "--send", "hi")
    assert both.returncode == 2 and "--send and --dump do not go together" in both.stderr


@pytest.mark.timeout(60)
def test_dump_of_a_room_whose_events_the_retention_deleted_says_so(tmp_path: Path) -> None:
    """The room is numbered (seq 3) but keeps no event: it said nothing at all, exit 0,
    as if the dump had failed unnoticed (operator's pass, --retention-days)."""
    broker = BrokerProcess(tmp_path / "d", extra=["--retention-days", "0.0000000116", "--heartbeat-ms", "200"]).start()
    try:
        sent = _run_zchat(broker, "--name", "w", "--send", "gone at once")  # its join, the message, its leave
        assert sent.returncode == 0, sent.stderr
        run = wait_for(
            lambda: (dump := _run_zchat(broker, "--name", "x", "--dump", "5")).stdout == "" and dump,
            15,
            interval=0.2,
        )
        assert run.returncode == 0, run.stderr
        assert run.stderr == "zchat: #general: none of its 3 events is kept by the broker any more (its retention)\n"
    finally:
        broker.kill()


def test_lines_read_with_the_output_that_failed_are_still_sent(broker_proc: BrokerProcess) -> None:
    """The reader leaves; then one read brings a line, a /who (whose answer meets the
    closed pipe) and two more lines: all three lines go (the last two used to be dropped)."""
    proc = subprocess.Popen(
        [bin_path("zchat"), "--name", "alice", "--room", "r", "--backlog", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=broker_proc.env(),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.read(1)  # its join is shown: it is in the room
        proc.stdout.close()  # the reader goes away
        proc.stdin.write(b"a\n/who\nb\nc\n")  # one write, one read
        proc.stdin.close()
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert _texts_in(broker_proc, "r") == ["a", "b", "c"]


def test_a_signal_during_the_final_close_does_not_cut_it_short() -> None:
    """SIGTERM, SIGHUP or Ctrl-C while zchat says its bye (its input done): ignored for
    the close, which they ask for anyway (SIGTERM escaped main() as a traceback)."""
    from client import cli

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *cli.TERMINATING)}
    cli._catch_terminating()
    try:
        closed: list[int] = []

        class Closing:
            def close(self, settle: float) -> None:
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.01)  # (a handler runs at the next bytecode)
                closed.append(1)

        cli._close(Closing())  # type: ignore[arg-type]
        assert closed == [1]
        assert signal.getsignal(signal.SIGTERM) is cli._terminate  # put back after the close
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("codes", "header", "marks"),
    [
        ([None, None], "(they may have arrived; check the room before sending them again)", ["", ""]),
        ([UNSENT, UNSENT], "(none of them arrived: send them again)", [" (not stored)"] * 2),
        (
            [None, UNSENT],
            "(those not marked may have arrived; check the room before sending them again)",
            ["", " (not stored)"],
        ),
        (
            ["undelivered", None],
            "(those not marked may have arrived; check the room before sending them again)",
            [" (not delivered: they are away)", ""],
        ),
    ],
    ids=["went", "never-sent", "mixed", "undelivered"],
)
def test_the_lines_left_say_which_never_left(codes: list[str | None], header: str, marks: list[str]) -> None:
    """Lines typed while the broker was away never left: "they may have arrived; check the
    room" of them sent the user looking for what cannot be there. Each line says what is
    known of it, and the header says what is left to check."""

    class Left:
        held_back = None

        def unacknowledged(self) -> list[Event]:
            return [Event(type="msg", room="general", text=f"m{i}", code=code) for i, code in enumerate(codes)]

    assert not_acknowledged_why(Left()) == header  # type: ignore[arg-type]
    assert unsent_lines(Left()) == [f"  #general{mark}: m{i}" for i, mark in enumerate(marks)]  # type: ignore[arg-type]


def test_what_had_arrived_is_shown_before_the_unsent_lines_are_listed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal between an ack and its line being shown: the line is shown (it was sent),
    not left out of both the output and the list of unsent lines."""
    from client.cli import Printer, _say_unacked
    from client.lib import Event

    class Stopped:
        unacked = 1
        held_back = None  # the broker was holding nothing back

        def __init__(self) -> None:
            self.queued = [Event(type="msg", room="general", seq=7, ts=0, name="alice", text="sent", own=True)]

        def release_own(self) -> None:  # one acknowledged, waiting for an earlier event of its room
            self.queued.append(Event(type="msg", room="general", seq=9, ts=0, name="alice", text="also", own=True))

        def drain_events(self) -> list[Event]:
            queued, self.queued = self.queued, []
            return queued

        def unacknowledged(self) -> list[Event]:
            return [Event(type="msg", room="general", name="alice", text="held")]

    _say_unacked(Stopped(), Printer(as_json=True), "SIGINT")  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert [json.loads(line)["text"] for line in out.splitlines()] == ["sent", "also"]
    assert "SIGINT: 1 message(s) not acknowledged (they may have arrived; " in err and "#general: held" in err

    class GoneTerminal(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

    # Its terminal gone (a pty that hung up): the list still goes to stderr, no OSError
    # escapes (main() would end with 1 and a traceback instead of 128 + the signal).
    monkeypatch.setattr(sys, "stdout", GoneTerminal())
    _say_unacked(Stopped(), Printer(as_json=True, on_a_terminal=True), "SIGHUP")  # type: ignore[arg-type]
    assert "SIGHUP: 1 message(s) not acknowledged (they may have arrived; " in capsys.readouterr().err


def test_a_stop_in_the_midst_of_showing_an_event_shows_it_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipe mode's stop handler raises where the signal finds the printer: while it renders
    an event (taken from the queue already: it was lost), or just after a write (its piece
    not yet taken from what is left: written again by the stop). Both were seen with
    SIGTERM during a backlog of 3,000: a seq missing, or shown twice. Here the handler's
    exception is raised at those two points."""
    from client import render
    from client.cli import Printer, _Terminated
    from client.lib import Event

    events = [Event(type="msg", room="general", seq=seq, ts=0, name="bob", text=f"m{seq}") for seq in (1, 2, 3)]

    def shown_after_a_stop(printer: Printer) -> list[int]:
        with pytest.raises(_Terminated):
            printer.show(events)
        printer.show([])  # what the stop does (_say_unacked): shows what is left
        return [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]

    json_line = render.json_line

    def cut_while_rendering(event: Event, *, history: bool = False) -> str:
        if event.seq == 2 and not rendered:
            rendered.append(event)
            raise _Terminated(signal.SIGTERM)
        return json_line(event, history=history)

    rendered: list[Event] = []
    monkeypatch.setattr(render, "json_line", cut_while_rendering)
    assert shown_after_a_stop(Printer(as_json=True)) == [1, 2, 3]
    monkeypatch.setattr(render, "json_line", json_line)

    real = sys.stdout

    class CutAfterAWrite(io.TextIOBase):
        """A stdout whose write is followed by the handler, once: the piece is written."""

        cut = False

        def write(self, text: str) -> int:
            real.write(text)
            if '"seq":2' in text and not CutAfterAWrite.cut:
                CutAfterAWrite.cut = True
                raise _Terminated(signal.SIGTERM)
            return len(text)

    monkeypatch.setattr(sys, "stdout", CutAfterAWrite())
    assert shown_after_a_stop(Printer(as_json=True)) == [1, 2, 3]


def test_a_broker_host_with_ports_in_it_is_refused_naming_how_it_was_given(tmp_path: Path) -> None:
    """A client's ZCHAT_HOST (HOST:PORT:PUBPORT) exported in the broker's shell was bound
    as 'tcp://[127.0.0.1:47605:47606]' and failed with 'No such device', exit 1."""
    env = {**os.environ, "ZCHAT_HOST": "127.0.0.1:47605:47606"}
    result = _broker_cmd("--data", str(tmp_path / "d"), host=None, env=env)
    assert result.returncode == 2, result.stderr
    assert "ZCHAT_HOST must be one address of this machine to listen on" in result.stderr, result.stderr
    assert "not '127.0.0.1:47605:47606': its ports are --port and --pub-port" in result.stderr
    result = _broker_cmd("--host", "localhost:5000", "--data", str(tmp_path / "d"))
    assert result.returncode == 2 and "--host must be one address" in result.stderr, result.stderr
    # A client's list without ports: 'No such device', exit 1, which systemd's unit restarts.
    env = {**os.environ, "ZCHAT_HOST": "127.0.0.1,10.0.0.5"}
    result = _broker_cmd("--data", str(tmp_path / "d"), host=None, env=env)
    assert result.returncode == 2, result.stderr
    assert "ZCHAT_HOST must be one address of this machine" in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was opened
    result = _broker_cmd("--host", "no-such-host.invalid", "--port", "0", "--pub-port", "0", "--data", str(tmp_path))
    assert result.returncode == 1
    assert "no address or network interface of this machine has that name" in result.stderr, result.stderr


def test_a_broker_takes_an_ipv6_host_in_brackets(tmp_path: Path) -> None:
    """As clients write it ([::1]); it was bound as 'tcp://[[::1]]:PORT'."""
    proc = subprocess.Popen(
        [bin_path("zchat-broker"), "--host", "[::1]", "--port", "0", "--pub-port", "0", "--data", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any(" ready: " in line for line in lines) and proc.poll() is None:
            lines.append(proc.stderr.readline())
        assert any("requests on tcp://[::1]:" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_health_check_takes_a_host_as_the_broker_does(tmp_path: Path) -> None:
    """``--host [::1]`` (as the broker and clients take it) was pinged at 'tcp://[[::1]]:PORT',
    and ``HOST:PORT`` at 'tcp://[HOST:PORT]:5555': after 3 s both said 'no answer ... (down or
    stuck)' about a broker that was serving."""
    broker = BrokerProcess(tmp_path / "data", extra=["--host", "[::1]"]).start()
    try:
        health = [sys.executable, "-m", "broker.health", "--port", str(broker.port), "--timeout", "5"]
        ok = subprocess.run([*health, "--host", "[::1]"], check=False, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(
            [*health, "--host", f"127.0.0.1:{broker.port}"], check=False, capture_output=True, text=True, timeout=30
        )
        assert wrong.returncode == 2, wrong.stderr
        assert "the port goes in --port" in wrong.stderr, wrong.stderr
    finally:
        broker.kill(signal.SIGTERM)


def test_the_health_check_tells_a_port_nobody_listens_on_from_a_silent_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both said 'no answer ... (down or stuck ...)': a stopped broker (or one bound to
    another --host) and a hung one, which an operator mends differently."""
    from broker import health

    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind((HOST, 0))
        free = probe.getsockname()[1]
    assert health.main(["--host", HOST, "--port", str(free), "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"nothing listens at tcp://{HOST}:{free} (connection refused)" in err, err
    with socket.socket() as silent:  # accepts (the kernel does) and never answers
        silent.bind((HOST, 0))
        silent.listen()
        port = silent.getsockname()[1]
        assert health.main(["--host", HOST, "--port", str(port), "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "no answer from" in err and "(down or stuck" in err, err


def test_who_outside_a_room_says_so(slow_broker: BrokerProcess, tmp_path: Path) -> None:
    """/who after /leave: 'not in a room', not the usage line of a mistyped command."""
    run = _lines_through(slow_broker, tmp_path, ["/leave", "/who"], "--backlog 0 < in")
    assert run.returncode == 1
    assert "zchat: not in a room: /who ROOM" in run.stderr, run.stderr
    assert "usage:" not in run.stderr


def test_broker_lines_carry_no_timestamp_of_their_own_in_the_journal(tmp_path: Path) -> None:
    """journald stamps each line: under systemd every line showed two times."""
    log = tmp_path / "stderr"
    for journal in (True, False):
        with log.open("w") as stderr:
            st = os.fstat(stderr.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "1:2"}
            result = subprocess.run(
                [bin_path("zchat-broker"), "--port", "0", "--pub-port", "0", "--backplane", "http://x"],
                stderr=stderr,
                env=env,
                timeout=20,
                check=False,
            )
        assert result.returncode == 2
        line = log.read_text().splitlines()[0]
        if journal:
            assert line.startswith("<3>ERROR --backplane"), line
        else:
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ERROR --backplane", line), line


def test_broker_lines_in_the_journal_carry_their_priority(tmp_path: Path) -> None:
    """Without a "<N>" at the start of each line, journald stored every one at "info":
    `journalctl -p warning` showed none of the broker's warnings, nor a CRITICAL full disk."""
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        st = os.fstat(stderr.fileno())
        proc = subprocess.Popen(
            [bin_path("zchat-broker"), "--host", HOST, "--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d")],
            stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    try:
        wait_for(lambda: " ready: " in log.read_text(), 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("<4>WARNING no --keys") for line in lines), lines
    assert any(line.startswith("<6>INFO zchat-broker ") and " ready: " in line for line in lines), lines
    assert any(line.startswith("<6>INFO stopped in ") for line in lines), lines


#: A broker with a bug: every request it reads raises, which it logs with the traceback.
BUGGY_CORE = """
import sys, broker.cli as c, broker.core as core
def handle(self, *args, **kwargs):
    raise RuntimeError("a bug of ours")
core.Core.handle = handle
sys.exit(c.main())
"""


def test_every_line_of_a_traceback_in_the_journal_carries_the_priority_of_its_record(tmp_path: Path) -> None:
    """Only a record's first line began with "<3>": journald stored each line of its
    traceback at "info", so `journalctl -p err` showed the error without its traceback
    (and the traceback's lines among the info ones)."""
    log = tmp_path / "stderr"
    args = ["--host", HOST, "--port", "0", "--pub-port", "0", "--data", str(tmp_path / "d")]
    with log.open("w") as stderr:
        st = os.fstat(stderr.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-c", BUGGY_CORE, *args],
            stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        ready = wait_for(lambda: READY_RE.search(log.read_text()), 20)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{HOST}:{ready[1]}")
        dealer.send(p.encode({"type": "ping", "id": "x"}))
        assert dealer.poll(10_000), "no answer"
        assert p.decode(dealer.recv(), p.MAX_REPLY_BYTES)["code"] == "internal_error"
        wait_for(lambda: "RuntimeError: a bug of ours" in log.read_text(), 10, what=log.read_text)
    finally:
        ctx.destroy(linger=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "internal error handling a request" in line)
    assert lines[start].startswith("<3>ERROR internal error handling a request"), lines
    end = next(i for i, line in enumerate(lines) if "RuntimeError: a bug of ours" in line)
    traceback = lines[start + 1 : end + 1]
    assert traceback[0] == "<3>Traceback (most recent call last):", lines
    assert all(line.startswith("<3>") for line in traceback), traceback
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
