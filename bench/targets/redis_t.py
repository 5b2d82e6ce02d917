"""Redis pub/sub (redis-server) through redis-py, its usual Python client."""

from __future__ import annotations

import shlex
import socket
import time
from importlib.metadata import version
from pathlib import Path

import redis
from redis.client import PubSub

from bench.proc import Server, free_port, start_server
from bench.targets.base import (
    AckSink,
    ClientSpec,
    Member,
    Members,
    Msg,
    PayloadSink,
    Sender,
    SocketMembers,
    Target,
    program_version,
    require,
    until,
)


class RedisMembers(SocketMembers):
    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.subs: list[PubSub] = []

    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        for m in members:
            ps = redis.Redis(port=self.port, client_name=f"m{m.index}").pubsub()  # type: ignore[no-untyped-call]
            ps.subscribe(m.room)  # connects and sends SUBSCRIBE
            self.subs.append(ps)
        phases = {"connected": time.monotonic()}
        for ps in self.subs:
            while ps.get_message(timeout=until(deadline, "redis SUBSCRIBE confirmations")) is None:
                pass
        phases["joined"] = time.monotonic()
        for i, ps in enumerate(self.subs):
            assert ps.connection is not None
            self.watch(ps.connection._sock, i)  # redis-py exposes no fileno()
        return phases

    def readable(self, fileobj: socket.socket, index: int, sink: PayloadSink) -> bool:
        ps = self.subs[index]
        try:
            for _ in range(self.BURST):
                msg = ps.get_message(timeout=0)
                if msg is None:
                    return False
                if msg["type"] == "message":
                    sink(index, msg["data"])
        except redis.ConnectionError:
            self.unwatch(fileobj)
            return False
        return True

    def close(self) -> None:
        for ps in self.subs:
            ps.close()


class RedisSender(Sender):
    """PUBLISH in a pipeline per batch; each PUBLISH reply counts as the message's ack."""

    acks = True

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.client = redis.Redis(port=int(spec.endpoints["port"]), client_name="sender")

    def connect(self, rooms: list[str], deadline: float) -> None:
        self.client.ping()

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        pipe = self.client.pipeline(transaction=False)
        for m in batch:
            pipe.publish(m.room, m.text)
        for m, _ in zip(batch, pipe.execute(), strict=True):
            ack(m.no, True)


class Redis(Target):
    name = "redis"
    label = "Redis pub/sub (redis-server + redis-py)"

    def check(self) -> None:
        require("redis-server", "redis")

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        argv = [
            require("redis-server", "redis"),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--daemonize", "no", "--dir", str(workdir), "--maxclients", "20000"),
        ]
        proc, _ = start_server(self.name, argv, port=port, log_path=workdir / "server.log", cpus=cpus)
        shown = shlex.join(["redis-server", *argv[1:]]).replace(str(port), "$PORT").replace(str(workdir), "$DIR")
        return Server(self.name, proc, {"port": port}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return RedisMembers(spec)

    def sender(self, spec: ClientSpec) -> Sender:
        return RedisSender(spec)

    def versions(self) -> dict[str, str]:
        out = {"redis-server": program_version(["redis-server", "--version"]), "redis-py": version("redis")}
        try:
            out["hiredis"] = version("hiredis")
        except Exception:
            out["hiredis"] = "not installed"
        return out
