"""The interactive client in a real terminal (tmux): typing survives incoming messages."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.lib import Client
from tests.conftest import HOST, BrokerProcess, bin_path, fill_until, small_file_system, wait_for


class Tmux:
    """One tmux server on a private socket, one fixed-size window."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is not installed (.ci/run installs it)")
        self.socket = f"zchat-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self._run("new-session", "-d", "-x", "100", "-y", "30", f"env {exports} TERM=xterm-256color {command}")

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout

    def keys(self, *keys: str) -> None:
        self._run("send-keys", *keys)

    def type(self, text: str) -> None:
        self._run("send-keys", "-l", text)

    def screen(self) -> list[str]:
        return self._run("capture-pane", "-p").splitlines()

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.fixture
def terminal_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path / "data").start()
    yield broker
    broker.kill()


@pytest.mark.timeout(60)
def test_half_typed_line_survives_incoming_messages(terminal_broker: BrokerProcess, tmp_path: Path) -> None:
    exit_file = tmp_path / "exit"
    env = {k: v for k, v in terminal_broker.env().items() if k.startswith("ZCHAT_")}
    env["PATH"] = os.environ.get("PATH", "")
    command = f"sh -c '{bin_path('zchat')} --name alice; echo $? > {exit_file}'"
    term = Tmux(command, env)
    bob = Client("bob", HOST, terminal_broker.port, terminal_broker.pub_port)
    try:
        wait_for(lambda: any("alice>" in line for line in term.screen()), 15)
        term.type("half a line of mine")
        wait_for(lambda: any(line.endswith("alice> half a line of mine") for line in term.screen()), 5)
        bob.connect()
        bob.join("general")
        for i in range(3):
            bob.send_wait("general", f"incoming {i}")

        def all_three_shown() -> bool:
            text = "\n".join(term.screen())
            return all(f"<bob> incoming {i}" in text for i in range(3))

        wait_for(all_three_shown, 10, what=term.screen)
        screen = term.screen()
        prompt = [line for line in screen if "alice>" in line]
        assert prompt == ["[#general] alice> half a line of mine"], screen
        # The prompt stays below every message: typing is never overwritten.
        assert screen.index(prompt[0]) > max(i for i, line in enumerate(screen) if "<bob> incoming" in line)

        term.keys("Enter")
        received: list[str | None] = []

        def bob_got_it() -> bool:
            bob.pump(0.05)
            received.extend(e.text for e in bob.drain_events() if e.type == "msg" and e.name == "alice")
            return "half a line of mine" in received

        wait_for(bob_got_it, 10, interval=0)
        term.type("/quit")
        term.keys("Enter")
        wait_for(lambda: exit_file.exists() and exit_file.read_text().strip(), 10)
        assert exit_file.read_text().strip() == "0"
    finally:
        bob.close(0)
        term.kill()


@pytest.mark.timeout(90)
def test_a_line_the_disk_alarm_holds_back_is_explained_once_and_sent_when_space_is_back(tmp_path: Path) -> None:
    """The broker's disk alarm (its data on an 8 MiB tmpfs, --min-free 2): the line typed
    meanwhile waits, the terminal says why once (not at each of the client's retries, one a
    second), and the line reaches the room, once, when space is freed."""
    with small_file_system(tmp_path / "small", "8m") as mount:
        broker = BrokerProcess(mount / "data", ["--min-free", "2", "--log-level", "debug"]).start()
        env = {k: v for k, v in broker.env().items() if k.startswith("ZCHAT_")}
        env["PATH"] = os.environ.get("PATH", "")
        term = Tmux(f"{bin_path('zchat')} --name alice", env)
        bob = Client("bob", HOST, broker.port, broker.pub_port)
        try:
            wait_for(lambda: any("alice>" in line for line in term.screen()), 15, what=term.screen)
            bob.connect()
            bob.join("general")
            fill_until(mount / "filler", leave=1 << 20)
            wait_for(lambda: any("disk alarm:" in line for line in broker.log), 10, what=lambda: broker.log)
            term.type("held back")
            term.keys("Enter")

            def refusals() -> int:
                return sum("(alice): unavailable: " in line for line in broker.log)

            wait_for(lambda: refusals() >= 3, 15, what=lambda: broker.log[-5:])  # the first and 2 retries

            def said(what: str) -> list[str]:
                return [line for line in term.screen() if what in line]

            wait_for(lambda: said("refuses messages for now"), 5, what=term.screen)
            assert len(said("refuses messages for now")) == 1, term.screen()
            assert "the broker's disk is nearly full" in " ".join(term.screen())
            (mount / "filler").unlink()
            received: list[str | None] = []

            def bob_got_it() -> bool:
                bob.pump(0.05)
                received.extend(e.text for e in bob.drain_events() if e.type == "msg" and e.name == "alice")
                return "held back" in received

            wait_for(bob_got_it, 15, interval=0)
            wait_for(lambda: said("takes messages again"), 5, what=term.screen)
            bob.pump(0.5)
            received.extend(e.text for e in bob.drain_events() if e.type == "msg" and e.name == "alice")
            assert received == ["held back"]
            assert len(said("refuses messages for now")) == 1, term.screen()
        finally:
            bob.close(0)
            term.kill()
            broker.kill()
