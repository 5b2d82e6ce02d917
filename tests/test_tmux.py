"""The real ``zchat`` in a real terminal: tmux on a private socket, a fixed 100x30 window.

Keys go in with ``send-keys``, the screen comes out with ``capture-pane -p``.
Every wait is a bounded poll; the tmux server is killed in a ``finally``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import re
import shlex
import shutil
import signal
import struct
import subprocess
import termios
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client.lib import Client, Event
from tests.conftest import HOST, BrokerProcess, bin_path, wait_for

WIDTH, HEIGHT = 100, 30


class Tmux:
    """One tmux server on a private socket running ``zchat`` in window 0; its exit status goes to a file."""

    def __init__(
        self,
        broker: BrokerProcess,
        tmp_path: Path,
        name: str,
        *flags: str,
        shell: bool = False,
        term: str = "xterm-256color",
    ) -> None:
        """``shell``: the window runs an interactive bash (job control: Ctrl-Z, ``fg``)
        and ``zchat`` is typed at its prompt; ``term``: the TERM it runs with."""
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is not installed (.ci/run installs it)")
        self.socket = f"zchat-tmux-{uuid.uuid4().hex[:10]}"
        self.exit_file = tmp_path / f"exit-{name}"
        # (PYTHONPATH: the zchat of the code under test, where that is not the one installed;
        # XDG_STATE_HOME: the test's own directory for saved resume tokens (conftest), not
        # ~/.local/state/zchat, where other tests' and runs' tokens, or a user's, are kept.)
        keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "XDG_STATE_HOME")
        env = {k: v for k, v in broker.env().items() if k.startswith("ZCHAT_") or k in keep}
        env.pop("NO_COLOR", None)
        env["TERM"] = term
        env["HISTFILE"] = str(tmp_path / "bash_history")  # the shell's, not in the home directory
        env.setdefault("LANG", "C.UTF-8")
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        zchat = " ".join(shlex.quote(a) for a in (bin_path("zchat"), "--name", name, *flags))
        script = f"{zchat}; echo EXIT=$? > {shlex.quote(str(self.exit_file))}"
        # -f /dev/null: no user configuration; -u: UTF-8 whatever the locale.
        size = ("-x", str(WIDTH), "-y", str(HEIGHT))
        window = "bash --norc --noprofile -i" if shell else f"sh -c {shlex.quote(script)}"
        self.run("-f", "/dev/null", "-u", "new-session", "-d", *size, f"env -i {exports} {window}")
        if shell:
            self.type(script)
            self.keys("Enter")

    def run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", ":0", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", ":0", "-l", text)

    def paste(self, text: str) -> None:
        """Paste as a terminal does: bracketed (``-p``), since zchat asks for it."""
        self.run("set-buffer", "--", text)
        self.run("paste-buffer", "-p", "-t", ":0")

    def screen(self, escapes: bool = False) -> list[str]:
        return self.run("capture-pane", "-p", *(["-e"] if escapes else []), "-t", ":0").splitlines()

    def text(self) -> str:
        return "\n".join(self.screen())

    def exit_status(self) -> str | None:
        return self.exit_file.read_text().strip() if self.exit_file.exists() else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)


class PipeChat:
    """``zchat --json`` in pipe mode: lines in on stdin, events out as JSON."""

    def __init__(self, broker: BrokerProcess, name: str) -> None:
        self.proc = subprocess.Popen(
            [bin_path("zchat"), "--name", name, "--json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=broker.env(),
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def say(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        def found() -> dict[str, Any] | None:
            while True:
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    return None
                seen.append(event)
                if predicate(event):
                    return event

        result: dict[str, Any] = wait_for(found, timeout, what=lambda: seen)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def term(broker_proc: BrokerProcess, tmp_path: Path) -> Iterator[Callable[..., Tmux]]:
    started: list[Tmux] = []

    def start(name: str, *flags: str, shell: bool = False, term: str = "xterm-256color") -> Tmux:
        tmux = Tmux(broker_proc, tmp_path, name, *flags, shell=shell, term=term)
        started.append(tmux)
        wait_for(lambda: any(f"] {name}> " in line + " " for line in tmux.screen()), 15, what=tmux.screen)
        return tmux

    try:
        yield start
    finally:
        for tmux in started:
            tmux.kill()


def says(alice: Tmux, line: str, bob: PipeChat, expect: str | None = None) -> None:
    """``line`` typed in alice's terminal reaches bob (as ``expect``, if given)."""
    alice.type(line)
    alice.keys("Enter")
    got = bob.expect(lambda e: e.get("type") == "msg" and e.get("from") == "alice")
    assert got["text"] == (line if expect is None else expect)


def prompt_line(screen: list[str], name: str) -> list[str]:
    return [line for line in screen if re.match(rf"\[#[a-z0-9_-]*\] {name}(?: \([a-z]+\))?> ", line + " ")]


@pytest.mark.timeout(60)
def test_half_typed_line_survives_a_pipe_client_then_enter_sends_and_quit_exits_0(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    alice = term("alice")
    bob = PipeChat(broker_proc, "bob")
    try:
        half = "half a line: ünïcödé 漢字 😀, not sent yet"
        alice.type(half)
        wait_for(lambda: prompt_line(alice.screen(), "alice") == [f"[#general] alice> {half}"], 10, what=alice.screen)
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        bob.say("incoming 0", "incoming 1", "incoming 2")

        def all_three_and_the_prompt() -> list[str] | None:
            screen = alice.screen()
            text = "\n".join(screen)
            shown = all(f"<bob> incoming {i}" in text for i in range(3))
            # The status bar comes back once the terminal has said where its cursor is.
            return screen if shown and prompt_line(screen, "alice") and "connected" in screen[-1] else None

        screen = wait_for(all_three_and_the_prompt, 10, what=alice.screen)
        # The half-typed line is intact, alone on its own line, below every message.
        assert prompt_line(screen, "alice") == [f"[#general] alice> {half}"], screen
        row = screen.index(f"[#general] alice> {half}")
        assert row > max(i for i, line in enumerate(screen) if "<bob> incoming" in line)
        assert not any(half[:10] in line for i, line in enumerate(screen) if i != row), screen
        assert all(not line for line in screen[row + 1 : -1]), screen  # below it, only the status bar

        alice.keys("Enter")
        got = bob.expect(lambda e: e.get("type") == "msg" and e.get("from") == "alice")
        assert got["text"] == half
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice>"], 10, what=alice.screen)
        wait_for(lambda: f"<alice> {half}" in alice.text(), 10, what=alice.screen)

        alice.type("/quit")
        alice.keys("Enter")
        assert wait_for(alice.exit_status, 10) == "EXIT=0"
    finally:
        bob.stop()


def _pump_until(client: Client, predicate: Callable[[Event], bool], count: int = 1) -> list[Event]:
    found: list[Event] = []

    def check() -> bool:
        client.pump(0.05)
        found.extend(e for e in client.drain_events() if predicate(e))
        return len(found) >= count

    wait_for(check, 10, interval=0, what=lambda: found)
    return found


@pytest.mark.timeout(60)
def test_paste_wrap_rooms_and_alt_keys_in_a_real_terminal(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    alice = term("alice")
    bob = Client("bob", HOST, broker_proc.port, broker_proc.pub_port)
    try:
        bob.connect()
        bob.join("general")
        bob.join("dev")
        wait_for(lambda: "bob joined #general" in alice.text(), 10, what=alice.screen)

        # A multi-line paste: each complete line is a message; the last one waits in the input.
        alice.paste("pasted one\npasted two\npasted three")
        got = _pump_until(bob, lambda e: e.type == "msg" and e.name == "alice", 2)
        assert [e.text for e in got] == ["pasted one", "pasted two"]
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice> pasted three"], 10)
        alice.keys("C-u")

        # A long line with wide characters wraps under the text, nothing cut or lost.
        long_text = "word " * 25 + "漢字かな交じり文😀 " * 6 + "end."
        bob.send_wait("general", long_text)
        wait_for(lambda: "end." in alice.text(), 10, what=alice.screen)
        screen = alice.screen()
        first = next(i for i, line in enumerate(screen) if "<bob> word word" in line)
        indent = " " * len("HH:MM <bob> ")
        rows = [screen[first]]
        for line in screen[first + 1 :]:
            if not line.startswith(indent):
                break
            rows.append(line)
        assert len(rows) >= 3, screen
        assert all(row[len(indent)] != " " for row in rows[1:]), rows
        shown = "".join(row[len(indent) :] for row in rows)
        assert shown.replace(" ", "") == long_text.replace(" ", ""), rows

        # A message of several lines (a bot's, a --send "$(git log -3)") shows as lines under
        # its text (it showed "\x0a"); an escape in it stays neutralised.
        bob.send_wait("general", "three lines:\nsecond one\r\nthird \x1b[31mred")
        wait_for(lambda: "third" in alice.text(), 10, what=alice.screen)
        screen = alice.screen()
        first = next(i for i, line in enumerate(screen) if "<bob> three lines:" in line)
        assert screen[first + 1 : first + 3] == [indent + "second one", indent + "third \\x1b[31mred"], screen

        # /join makes #dev current; Alt-1 and Alt-2 switch; other rooms are labelled.
        alice.type("/join #dev")
        alice.keys("Enter")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#dev] alice>"], 10, what=alice.screen)
        alice.keys("M-1")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice>"], 10, what=alice.screen)
        bob.send_wait("dev", "over in dev")
        wait_for(lambda: "#dev <bob> over in dev" in alice.text(), 10, what=alice.screen)
        wait_for(lambda: any("2:#dev(1)" in line for line in alice.screen()), 10, what=alice.screen)  # unread
        alice.keys("M-2")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#dev] alice>"], 10, what=alice.screen)
        alice.type("/me waves")
        alice.keys("Enter")
        got = _pump_until(bob, lambda e: e.type == "msg" and e.name == "alice" and e.room == "dev")
        assert got[0].action and got[0].text == "waves"
        wait_for(lambda: "* alice waves" in alice.text(), 10, what=alice.screen)

        alice.keys("C-d")
        assert wait_for(alice.exit_status, 10) == "EXIT=0"
    finally:
        bob.close(0)


def test_a_bar_too_narrow_for_every_room_still_shows_a_mention(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    """At 40 columns with 7 rooms the bar used to be cut at the 4th: a mention in the
    7th never showed. It keeps the current room and the mention, and counts the rest."""
    rooms = ["dev", "ops", "qa", "web", "docs", "frontend"]
    alice = term("alice")
    bob = Client("bob", HOST, broker_proc.port, broker_proc.pub_port)
    try:
        bob.connect()
        bob.join("frontend")
        for room in rooms:
            alice.type(f"/join {room}")
            alice.keys("Enter")
            wait_for(lambda r=room: prompt_line(alice.screen(), "alice") == [f"[#{r}] alice>"], 10, what=alice.screen)
        alice.keys("M-1")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice>"], 10, what=alice.screen)
        alice.run("resize-window", "-t", ":0", "-x", "40")
        bob.send_wait("frontend", "alice: over here")
        wait_for(lambda: alice.screen()[-1:] == [" connected | 1:#general 7:…(1!) +5"], 10, what=alice.screen)
        alice.keys("M-7")  # the number the bar shows
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#frontend] alice>"], 10, what=alice.screen)
        wait_for(lambda: alice.screen()[-1:] == [" connected | 1:#general 7:#frontend +5"], 10, what=alice.screen)
        alice.keys("C-d")
        assert wait_for(alice.exit_status, 10) == "EXIT=0"
    finally:
        bob.close(0)


def _colours(lines: list[str]) -> set[str]:
    """Colour parameters of the SGR escapes in ``lines`` (tmux's ``capture-pane -e``)."""
    found = set()
    for params in re.findall(r"\x1b\[([0-9;:]*)m", "\n".join(lines)):
        parts = re.split(r"[;:]", params)
        for i, param in enumerate(parts):
            if not param.isdigit():
                continue
            n = int(param)
            if (30 <= n <= 37 or 40 <= n <= 47 or 90 <= n <= 107) or (n in (38, 48) and i + 1 < len(parts)):
                found.add(param)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags", [(), ("--no-color", "--no-bell")])
def test_colours_and_bell_follow_the_flags(
    term: Callable[..., Tmux], broker_proc: BrokerProcess, flags: tuple[str, ...]
) -> None:
    alice = term("alice", *flags)
    # Another window in front: tmux flags a bell only in a window that is not current.
    alice.run("new-window", "sleep 60")
    bob = Client("bob", HOST, broker_proc.port, broker_proc.pub_port)
    try:
        bob.connect()
        bob.join("general")
        bob.send_wait("general", "a plain message")
        wait_for(lambda: "<bob> a plain message" in alice.text(), 10, what=alice.screen)
        colours = _colours([line for line in alice.screen(escapes=True) if "a plain message" in line])
        assert bool(colours) == (not flags), colours
        bell = alice.run("display", "-p", "-t", ":0", "#{window_bell_flag}").strip()
        assert bell == "0"

        bob.dm_wait("alice", "psst")
        wait_for(lambda: "*bob* psst" in alice.text(), 10, what=alice.screen)
        bob.send_wait("general", "after the dm")  # once this shows, the DM's bell (if any) was written
        wait_for(lambda: "<bob> after the dm" in alice.text(), 10, what=alice.screen)
        bell = alice.run("display", "-p", "-t", ":0", "#{window_bell_flag}").strip()
        assert bell == ("0" if flags else "1")
    finally:
        bob.close(0)


@pytest.mark.timeout(60)
def test_a_raw_escape_sequence_typed_is_dropped_not_a_traceback(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    """ESC [ 3 1 m (colour text pasted without bracketed paste) parses as a mouse event,
    on which prompt_toolkit's own handler failed with a traceback and 'Press ENTER'."""
    alice = term("alice")
    bob = PipeChat(broker_proc, "bob")
    try:
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        wait_for(lambda: prompt_line(alice.screen(), "alice"), 10, what=alice.screen)
        alice.type("x\x1b[31my")
        says(alice, "z", bob, expect="xyz")
        assert "Traceback" not in alice.text() and "Press ENTER" not in alice.text()
    finally:
        bob.stop()


@pytest.mark.timeout(60)
def test_page_keys_put_nothing_in_the_line_and_ctrl_c_in_a_search_cancels_it(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    """As a user found in tmux: Shift-PgUp put ^[[5;2~ in the line, Ctrl-PgUp ^[[5;5~;
    PgUp recalled a history line; Ctrl-C in a Ctrl-R search quit zchat."""
    alice = term("alice", term="tmux-256color")
    bob = PipeChat(broker_proc, "bob")
    try:
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        says(alice, "an earlier line", bob)
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice>"], 10, what=alice.screen)
        alice.type("draft")
        alice.keys("S-PageUp", "C-PageUp", "S-PageDown", "C-PageDown", "PageDown", "PageUp", "M-F1", "C-F5")
        alice.type(".")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice> draft."], 10, what=alice.screen)

        alice.keys("C-u", "C-r")
        alice.type("earl")
        wait_for(lambda: "(reverse-i-search)`earl': an earlier line" in alice.text(), 10, what=alice.screen)
        alice.keys("C-c")
        wait_for(lambda: prompt_line(alice.screen(), "alice") == ["[#general] alice>"], 10, what=alice.screen)
        assert "reverse-i-search" not in alice.text()
        says(alice, "still here", bob)  # not quit
        assert alice.exit_status() is None
    finally:
        bob.stop()


@pytest.mark.timeout(60)
def test_ctrl_z_suspends_and_fg_resumes(term: Callable[..., Tmux], broker_proc: BrokerProcess) -> None:
    """The terminal is in raw mode, so Ctrl-Z arrives as a key: it must stop the job as
    a terminal would (the shell takes over; ``fg`` resumes), not go to the room."""
    alice = term("alice", shell=True)
    bob = PipeChat(broker_proc, "bob")
    try:
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        alice.keys("C-z")
        wait_for(lambda: "Stopped" in alice.text(), 10, what=alice.screen)
        alice.type("fg")
        alice.keys("Enter")
        wait_for(lambda: prompt_line(alice.screen(), "alice"), 10, what=alice.screen)
        says(alice, "after fg", bob)
        # (Its exit status is not ours to read: bash ran the echo when the job stopped.)
    finally:
        bob.stop()


@pytest.mark.timeout(60)
def test_ctrl_z_without_job_control_says_so_and_chat_goes_on(
    term: Callable[..., Tmux], broker_proc: BrokerProcess
) -> None:
    """Started by ``sh -c`` (as ``tmux new zchat`` or ``ssh -t host zchat`` do), the
    client's process group is orphaned: the kernel would drop the stop, so say why."""
    alice = term("alice")
    bob = PipeChat(broker_proc, "bob")
    try:
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        wait_for(lambda: prompt_line(alice.screen(), "alice"), 10, what=alice.screen)
        alice.keys("C-z")
        wait_for(lambda: "no shell with job control" in alice.text(), 10, what=alice.screen)
        says(alice, "still here", bob)
    finally:
        bob.stop()


@pytest.mark.timeout(60)
def test_sigterm_quits_the_terminal_client_with_a_bye(term: Callable[..., Tmux], broker_proc: BrokerProcess) -> None:
    alice = term("alice")
    bob = PipeChat(broker_proc, "bob")
    try:
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        shell = alice.run("list-panes", "-t", ":0", "-F", "#{pane_pid}").strip()
        (zchat,) = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        subprocess.run(["kill", "-TERM", zchat], check=True, timeout=5)
        assert wait_for(alice.exit_status, 10) == "EXIT=143"
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "alice" and e.get("event") == "leave", 5)
    finally:
        bob.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gone", ["after its join", "at once"])
def test_a_terminal_that_goes_away_without_a_sighup_ends_the_client_with_a_bye(
    broker_proc: BrokerProcess, gone: str
) -> None:
    """A closed ssh or a killed terminal emulator whose SIGHUP never reaches zchat (another
    session, or SIGHUP ignored): the client must see its terminal is gone and end, not keep
    the name and a session nobody reads (a client left in that state once grew without bound).
    A pty of our own, with no tmux between, so its end is exactly that: the master closes."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", HEIGHT, WIDTH, 0, 0))
    bob = PipeChat(broker_proc, "bob")
    proc: subprocess.Popen[str] | None = None
    try:
        # Bob first: a join of alice's before his would reach him in his backlog, ahead of his own.
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "bob")
        proc = subprocess.Popen(
            ["sh", "-c", 'trap "" HUP; exec "$0" --name alice', bin_path("zchat")],  # SIGHUP ignored
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,  # to see it end as a hang-up, not on a traceback
            text=True,
            env={**broker_proc.env(), "TERM": "xterm"},
            start_new_session=True,  # and no controlling terminal: the kernel sends it none either
        )
        os.close(slave)
        slave = -1
        if gone == "after its join":
            bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "alice" and e.get("event") == "join")
        # At once: while it connects, before the interactive client takes the terminal
        # (it may then see no terminal at all, and take the pipe-mode path).
        os.close(master)
        master = -1
        assert proc.wait(timeout=10) == 128 + signal.SIGHUP
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
        bob.expect(lambda e: e.get("type") == "presence" and e.get("name") == "alice" and e.get("event") == "leave", 5)
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        bob.stop()
