"""zchat scaled out: N brokers sharing one chat through one Redis (``zchat-broker --backplane``).

Each message is appended by a Lua script in Redis (seq per room, the room's
Stream) and published on a Redis channel that every broker listens to; each
broker then publishes the room's events on its own PUB socket. Subscribers are
spread round-robin over the brokers (member ``i`` on broker ``i % N``), and the
sender has one session per room on every broker, used in turn.

The harness measures the brokers' CPU summed (``server``) and Redis's apart
(``backplane``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import ClassVar

from bench.proc import Server, ServerError, free_port, start_server
from bench.targets.base import ClientSpec, Members, Sender, program_version, require
from bench.targets.zmq_family import READY, Zchat, ZchatSender, ZmqMembers

#: Redis persistence for the bench: the AOF on, fsynced once a second (docs/scaling.md
#: recommends ``always`` for the promise of ``--durability full``; ``everysec`` may lose
#: the last second of acknowledged messages if Redis's machine fails).
APPENDFSYNC = "everysec"


class ZchatBackplane(Zchat):
    #: Per-session limits off, as for the embedded zchat (there: the same settings by environment).
    LIMITS: ClassVar[list[str]] = [
        *("--rate-limit", "0", "--join-rate", "0"),
        *("--max-sessions", "100000", "--max-sessions-per-host", "0", "--connect-rate", "0"),
    ]

    def __init__(self, brokers: int) -> None:
        super().__init__("full")
        self.brokers = brokers
        self.name = f"zchat-bp-{brokers}"
        self.label = f"zchat, {brokers} broker{'s' * (brokers > 1)} on one Redis backplane"

    def check(self) -> None:
        require("redis-server", "redis")

    def redis_argv(self, workdir: Path, port: int) -> list[str]:
        return [
            require("redis-server", "redis"),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", APPENDFSYNC),
            *("--daemonize", "no", "--dir", str(workdir), "--maxclients", "20000"),
        ]

    def broker_argv(self, url: str) -> list[str]:
        head = self.command(Path("unused"))[0]
        return [
            head,
            *("--host", "127.0.0.1", "--port", "0", "--pub-port", "0", "--backplane", url),
            *self.LIMITS,
            *("--log-level", "warning"),
        ]

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        redis_dir = workdir / "redis"
        redis_dir.mkdir()
        redis_argv = self.redis_argv(redis_dir, port)
        redis, _ = start_server(
            "redis-server", redis_argv, port=port, log_path=workdir / "redis.log", cpus=cpus, timeout=15
        )
        url = f"redis://127.0.0.1:{port}/0"
        brokers = []
        routers, pubs = [], []
        try:
            for i in range(self.brokers):
                proc, match = start_server(
                    f"{self.name} broker {i}",
                    self.broker_argv(url),
                    ready=READY,
                    log_path=workdir / f"broker{i}.log",
                    cpus=cpus,
                )
                assert match is not None
                brokers.append(proc)
                routers.append(match[1])
                pubs.append(match[2])
        except (ServerError, OSError):
            for proc in [*brokers, redis]:
                proc.kill()
                proc.wait()
            raise
        shown = (
            shlex.join(["redis-server", *redis_argv[1:]]).replace(str(port), "$PORT").replace(str(redis_dir), "$DIR")
            + f"; {self.brokers} x zchat-broker "
            + " ".join(self.broker_argv(url)[1:]).replace(str(port), "$PORT")
        )
        return Server(
            self.name,
            brokers[0],
            {"router": ",".join(routers), "pub": ",".join(pubs)},
            shown,
            workdir / "broker0.log",
            others=[*(("server", b) for b in brokers[1:]), ("backplane", redis)],
        )

    def members(self, spec: ClientSpec) -> Members:
        return ZmqMembers(spec, hello=True, dealer=True)

    def sender(self, spec: ClientSpec) -> Sender:
        return ZchatSender(spec)

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {
            **super().versions(),
            "redis-server": program_version(["redis-server", "--version"]),
            "redis-py": version("redis"),
        }
