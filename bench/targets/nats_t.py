"""NATS core pub/sub: nats-server through nats-py (asyncio), no JetStream."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from bench.proc import Server, free_port, start_server
from bench.targets.base import (
    AckSink,
    ClientSpec,
    Member,
    Members,
    Msg,
    PayloadSink,
    Sender,
    Target,
    program_version,
    require,
)


async def _connect(port: int, name: str, errors: list[str]) -> NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(type(exc).__name__)

    return await nats.connect(
        f"nats://127.0.0.1:{port}",
        name=name,
        allow_reconnect=False,
        connect_timeout=10,
        error_cb=on_error,
        max_outstanding_pings=10,
    )


class NatsMembers(Members):
    """Every member a NATS connection with one subscription; one event loop per worker."""

    def __init__(self, spec: ClientSpec) -> None:
        self.port = int(spec.endpoints["port"])
        self.loop = asyncio.new_event_loop()
        self.conns: list[NATS] = []
        self.errors: list[str] = []
        self.sink: PayloadSink = lambda i, data: None

    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        return self.loop.run_until_complete(asyncio.wait_for(self._connect(members), deadline - time.monotonic()))

    async def _connect(self, members: list[Member]) -> dict[str, float]:
        self.conns = list(await asyncio.gather(*(_connect(self.port, f"m{m.index}", self.errors) for m in members)))
        phases = {"connected": time.monotonic()}
        for i, (nc, m) in enumerate(zip(self.conns, members, strict=True)):
            await nc.subscribe(m.room, cb=self._handler(i))
        await asyncio.gather(*(nc.flush() for nc in self.conns))
        phases["joined"] = time.monotonic()
        return phases

    def _handler(self, index: int) -> Any:
        async def on_msg(msg: Any) -> None:
            self.sink(index, msg.data)

        return on_msg

    def pump(self, timeout: float, sink: PayloadSink) -> None:
        self.sink = sink
        self.loop.run_until_complete(asyncio.sleep(timeout))

    def close(self) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(nc.close() for nc in self.conns), return_exceptions=True)

        self.loop.run_until_complete(close_all())


class NatsSender(Sender):
    """Publishes a batch, then flushes (a PING/PONG round trip): the natural NATS back-pressure."""

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.loop = asyncio.new_event_loop()
        self.nc: NATS | None = None
        self.failures: list[str] = []

    def connect(self, rooms: list[str], deadline: float) -> None:
        self.nc = self.loop.run_until_complete(_connect(self.port, "sender", self.failures))

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        self.loop.run_until_complete(self._publish(batch))

    async def _publish(self, batch: list[Msg]) -> None:
        nc = self.nc
        assert nc is not None
        for m in batch:
            await nc.publish(m.room, m.text.encode())
        await nc.flush()

    def pump(self, timeout: float, ack: AckSink) -> None:
        self.loop.run_until_complete(asyncio.sleep(timeout))

    def close(self) -> None:
        if self.nc is not None:
            self.loop.run_until_complete(self.nc.close())


class Nats(Target):
    name = "nats"
    label = "NATS (nats-server + nats-py)"

    def check(self) -> None:
        require("nats-server", "nats")

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        argv = [require("nats-server", "nats"), "-a", "127.0.0.1", "-p", str(port)]
        proc, _ = start_server(self.name, argv, port=port, log_path=workdir / "server.log", cpus=cpus)
        shown = " ".join(["nats-server", *argv[1:]]).replace(str(port), "$PORT")
        return Server(self.name, proc, {"port": port}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return NatsMembers(spec)

    def sender(self, spec: ClientSpec) -> Sender:
        return NatsSender(spec)

    def versions(self) -> dict[str, str]:
        return {"nats-server": program_version(["nats-server", "--version"]), "nats-py": version("nats-py")}
