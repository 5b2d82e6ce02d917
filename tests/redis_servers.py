"""Real Redis servers for the backplane tests and benchmarks: one server, or a
3-node Redis Cluster, started from Debian's ``redis-server`` on loopback with
free ports, in a temporary directory, and stopped at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

HOST = "127.0.0.1"


def redis_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port(bus: bool = False) -> int:
    """A free TCP port on loopback; with ``bus``, port + 10000 (the cluster bus) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


@dataclass
class RedisServer:
    """One ``redis-server`` process (AOF with fsync always: an acked message survives a restart)."""

    workdir: Path
    cluster: bool = False
    port: int = 0
    #: --requirepass: clients must AUTH with it.
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(bus=self.cluster)
        args = [
            "redis-server",
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--logfile",
            "redis.log",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.2, password=self.password)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


@dataclass
class RedisCluster:
    """Three masters, no replicas, slots split evenly by ``redis-cli --cluster create``."""

    workdir: Path
    nodes: list[RedisServer] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        self.nodes = [RedisServer(self.workdir / f"node{i}", cluster=True).start() for i in range(3)]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
        # Ready when every node says the cluster is ok (slots assigned, gossip done).
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = redis.Redis(host=HOST, port=node.port)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the Redis Cluster did not become ready")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def url(self) -> str:
        return self.nodes[0].url
