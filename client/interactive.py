"""The interactive terminal client: events print above a prompt that typing keeps intact.

prompt_toolkit owns the terminal; the client's sockets are read from the same
thread (an asyncio task), so no zmq socket is ever shared between threads.
"""

from __future__ import annotations

import asyncio

from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from client import render
from client.commands import Commands
from client.lib import Client, Event

PUMP_INTERVAL_S = 0.03


def run_interactive(client: Client, room: str, backlog: int) -> int:
    return asyncio.run(_main(client, room, backlog))


async def _main(client: Client, room: str, backlog: int) -> int:
    def show(line: str) -> None:
        print(line, flush=True)

    def show_err(line: str) -> None:
        print(f"zchat: {line}", flush=True)

    def show_event(event: Event) -> None:
        if event.type == "error":
            show_err(f"{event.code}: {event.message}")
        else:
            show(render.text_line(event))

    commands = Commands(client, room, show, show_err, backlog=max(0, backlog))
    session: PromptSession[str] = PromptSession()

    async def pump() -> None:
        while True:
            client.pump(0)
            for event in client.drain_events():
                show_event(event)
            await asyncio.sleep(PUMP_INTERVAL_S)

    with patch_stdout(raw=True):
        task = asyncio.create_task(pump())
        try:
            while True:
                try:
                    line = await session.prompt_async(lambda: f"[#{commands.current or '-'}] {client.name}> ")
                except EOFError:
                    break
                except KeyboardInterrupt:
                    break
                if not commands.handle(line):
                    break
        finally:
            task.cancel()
    return 0
