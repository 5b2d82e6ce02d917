"""zchat itself and the two limits it is measured against: a naive forwarder and raw PUB->SUB.

All three deliver the same two-frame ``[room\\0, msgpack envelope]`` to raw SUB
sockets, so subscribers and message sizes are identical.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import sys
import time
from pathlib import Path
from typing import ClassVar

import msgpack
import zmq

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
    TargetUnavailable,
    until,
)

#: Matches the ready line of zchat-broker and of bench.naive.
READY = r"ready: requests on (tcp://[\d.]+:\d+), room events on (tcp://[\d.]+:\d+)"
#: Each session pings this often (the broker ends sessions silent for 3 heartbeats).
#: The pings of a worker's sessions are spread over the period, as independent
#: clients' timers are: all at once, they were a burst of 500 requests every 4 s
#: that no real population of clients sends.
PING_EVERY_S = 4.0


def topic(room: str) -> bytes:
    return room.encode() + b"\x00"


def pick(endpoints: dict[str, str | int], key: str, i: int) -> str:
    """Client ``i``'s address among several brokers' (comma-separated): round-robin."""
    options = str(endpoints[key]).split(",")
    return options[i % len(options)]


def brokers(endpoints: dict[str, str | int]) -> int:
    return len(str(endpoints["router"]).split(","))


def _context() -> zmq.Context[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 65536)
    return ctx


class ReadySet:
    """Which of many ZeroMQ sockets may have input, in O(ready) rather than zmq_poll's O(sockets).

    epoll on each socket's ZMQ_FD, which signals "check ZMQ_EVENTS"; a socket
    that may still hold input (a capped read, or a send that consumed the
    signal) is marked with :meth:`again` and returned by the next :meth:`wait`.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.by_fd: dict[int, tuple[zmq.Socket[bytes], int]] = {}
        self.hot: dict[zmq.Socket[bytes], int] = {}

    def add(self, sock: zmq.Socket[bytes], data: int) -> None:
        fd = int(sock.getsockopt(zmq.FD))
        self.epoll.register(fd, select.EPOLLIN)
        self.by_fd[fd] = (sock, data)
        self.hot[sock] = data

    def again(self, sock: zmq.Socket[bytes], data: int) -> None:
        self.hot[sock] = data

    def wait(self, timeout: float) -> list[tuple[zmq.Socket[bytes], int]]:
        events = self.epoll.poll(0 if self.hot else timeout)
        ready, self.hot = self.hot, {}
        for fd, _ in events:
            sock, data = self.by_fd[fd]
            ready[sock] = data
        return [(s, d) for s, d in ready.items() if int(s.getsockopt(zmq.EVENTS)) & zmq.POLLIN]

    def close(self) -> None:
        self.epoll.close()


def _replies(frame: bytes) -> list[dict[str, object]]:
    """The envelopes in one frame from zchat: itself, or a ``batch``'s items (unchecked: the bench trusts it)."""
    env = msgpack.unpackb(frame)
    items: list[dict[str, object]] = env["items"] if env.get("type") == "batch" else [env]
    return items


def _request_all(socks: list[zmq.Socket[bytes]], envs: list[bytes], want: str, deadline: float) -> None:
    """Send one request on each socket; wait until each has answered with type ``want``."""
    ready = ReadySet()
    for i, (sock, env) in enumerate(zip(socks, envs, strict=True)):
        sock.send(env)
        ready.add(sock, i)
    waiting = set(range(len(socks)))
    while waiting:
        left = until(deadline, f"{len(waiting)} of {len(socks)} replies {want!r}")
        for sock, i in ready.wait(min(left, 0.5)):
            while True:
                try:
                    reply = msgpack.unpackb(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if reply.get("type") == "error":
                    raise RuntimeError(f"broker refused: {reply.get('code')}: {reply.get('message')}")
                if reply.get("type") == want:
                    waiting.discard(i)
    ready.close()


class ZmqMembers(Members):
    """Raw SUB sockets; with ``hello``, each member is also a session (DEALER: hello + join)."""

    def __init__(self, spec: ClientSpec, hello: bool, dealer: bool) -> None:
        self.spec = spec
        self.hello = hello and spec.sessions
        self.dealer = dealer and spec.sessions
        self.ctx = _context()
        self.ready = ReadySet()
        self.subs: list[zmq.Socket[bytes]] = []
        self.dealers: list[zmq.Socket[bytes]] = []
        self.ping_started = 0.0
        self.pinged = 0

    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        phases: dict[str, float] = {}
        if self.dealer:
            for m in members:
                d = self.ctx.socket(zmq.DEALER)
                d.connect(pick(self.spec.endpoints, "router", m.index))
                self.dealers.append(d)
            phases["connected"] = time.monotonic()
        if self.hello:
            packb = msgpack.packb
            _request_all(
                self.dealers,
                [packb({"type": "hello", "v": 1, "name": f"m{m.index}"}) for m in members],
                "welcome",
                deadline,
            )
            phases["welcome"] = time.monotonic()
            _request_all(self.dealers, [packb({"type": "join", "room": m.room}) for m in members], "joined", deadline)
            phases["joined"] = time.monotonic()
            self.ping_started = time.monotonic()
        for m in members:
            s = self.ctx.socket(zmq.SUB)
            s.connect(pick(self.spec.endpoints, "pub", m.index))
            s.subscribe(topic(m.room))
            self.ready.add(s, len(self.subs))
            self.subs.append(s)
        phases["subscribed"] = time.monotonic()
        return phases

    def pump(self, timeout: float, sink: PayloadSink) -> None:
        for sock, index in self.ready.wait(timeout):
            for _ in range(256):
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # As received, not decoded (for every target alike): the recorder
                # counts each send time stamped in it, so a zchat ``batch`` frame
                # counts each of its events.
                sink(index, sock.recv())
            else:
                self.ready.again(sock, index)
        if self.hello:
            self._ping()

    def roundtrips(self, rounds: int, deadline: float) -> None:
        """Every DEALER sends a ping and waits for its answer (zchat: pong; the echo: the ping), ``rounds`` times."""
        ping = msgpack.packb({"type": "ping"})
        for d in self.dealers:
            while d.poll(0):
                d.recv()  # answers to the pings of pump()
        for _ in range(rounds):
            for d in self.dealers:
                d.send(ping)
            for d in self.dealers:
                if not d.poll(until(deadline, "round trips") * 1000):
                    raise RuntimeError("no answer to a ping in time")
                reply = d.recv()
                if self.hello:
                    # zchat may batch this pong with one of pump()'s still on its way.
                    if any(env.get("type") != "pong" for env in _replies(reply)):
                        raise RuntimeError(f"expected pongs, got {_replies(reply)!r}")
                elif reply != ping:
                    raise RuntimeError(f"the echo answered {reply!r}")
        self.ping_started, self.pinged = time.monotonic(), 0

    def _ping(self) -> None:
        """Ping the sessions whose turn has come: each one once per PING_EVERY_S, evenly spread."""
        n = len(self.dealers)
        due = int((time.monotonic() - self.ping_started) / PING_EVERY_S * n)
        if due <= self.pinged:
            return
        ping = msgpack.packb({"type": "ping"})
        for k in range(self.pinged, due):
            d = self.dealers[k % n]
            while d.poll(0):
                d.recv()
            d.send(ping, zmq.NOBLOCK)
        self.pinged = due

    def close(self) -> None:
        if self.hello:
            bye = msgpack.packb({"type": "bye"})
            for d in self.dealers:
                with contextlib.suppress(zmq.ZMQError):
                    d.send(bye, zmq.NOBLOCK)
        self.ctx.destroy(linger=100)


class ZchatSender(Sender):
    """One session per room and broker (DEALER: hello, join, then msg with an id; acks come back).

    With several brokers, each room's messages go to its sessions in turn.
    """

    acks = True

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.spec = spec
        self.ctx = _context()
        self.socks: dict[str, list[zmq.Socket[bytes]]] = {}
        self.turn: dict[str, int] = {}
        self.ready = ReadySet()
        self.pack = msgpack.Packer().pack

    def connect(self, rooms: list[str], deadline: float) -> None:
        n = brokers(self.spec.endpoints)
        names, joins, socks = [], [], []
        for i, room in enumerate(rooms):
            self.socks[room] = []
            self.turn[room] = 0
            for b in range(n):
                sock = self.ctx.socket(zmq.DEALER)
                sock.connect(pick(self.spec.endpoints, "router", b))
                self.socks[room].append(sock)
                socks.append(sock)
                names.append(f"s{i}" if n == 1 else f"s{i}b{b}")
                joins.append(room)
        pack = self.pack
        _request_all(socks, [pack({"type": "hello", "v": 1, "name": name}) for name in names], "welcome", deadline)
        _request_all(socks, [pack({"type": "join", "room": room}) for room in joins], "joined", deadline)
        for i, sock in enumerate(socks):
            self.ready.add(sock, i)

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        pack, socks, turn, ready = self.pack, self.socks, self.turn, self.ready
        for m in batch:
            mine = socks[m.room]
            t = turn[m.room]
            sock = mine[t % len(mine)]
            turn[m.room] = t + 1
            sock.send(pack({"type": "msg", "room": m.room, "text": m.text, "id": m.id}))
            ready.again(sock, 0)  # a send may consume the ZMQ_FD signal of a reply

    def pump(self, timeout: float, ack: AckSink) -> None:
        for sock, i in self.ready.wait(timeout):
            for _ in range(4096):
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for reply in _replies(frame):
                    kind = reply.get("type")
                    if kind == "ack":
                        ack(int(reply["id"]), True)
                    elif kind == "error":
                        self.errors[str(reply.get("code"))] += 1
                        if "id" in reply:
                            ack(int(reply["id"]), False)
            else:
                self.ready.again(sock, i)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


class NaiveSender(Sender):
    """One DEALER sending bare msg envelopes (the naive forwarder has no sessions and no acks)."""

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.ctx = _context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(str(spec.endpoints["router"]))
        self.pack = msgpack.Packer().pack

    def connect(self, rooms: list[str], deadline: float) -> None:
        pass

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        pack, send = self.pack, self.sock.send
        for m in batch:
            send(pack({"type": "msg", "room": m.room, "text": m.text, "id": m.id}))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


class RawPublisher(Sender):
    """The sender is the PUB: what a broker would publish, with no broker at all."""

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.ctx = _context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.bind(f"tcp://127.0.0.1:{spec.endpoints['pub_port']}")
        self.pack = msgpack.Packer().pack
        self.seq = 0

    def connect(self, rooms: list[str], deadline: float) -> None:
        pass

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        pack, send = self.pack, self.sock.send
        for m in batch:
            self.seq += 1
            env = {
                "type": "msg",
                "room": m.room,
                "seq": self.seq,
                "ts": time.time_ns() // 1_000_000,
                "from": "s0",
                "sender": "0123456789abcdef",
                "text": m.text,
                "id": m.id,
            }
            send(topic(m.room), zmq.SNDMORE)
            send(pack(env))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _zmq_versions() -> dict[str, str]:
    return {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version))}


class Zchat(Target):
    def __init__(self, durability: str = "full") -> None:
        self.durability = durability
        self.name = "zchat" if durability == "full" else f"zchat-{durability}"
        self.label = f"zchat (durability={durability})"

    def check(self) -> None:
        pass

    def command(self, data: Path) -> list[str]:
        script = Path(sys.executable).with_name("zchat-broker")
        head = [str(script)] if script.exists() else [shutil.which("zchat-broker") or "zchat-broker"]
        return [
            *head,
            *("--host", "127.0.0.1", "--port", "0", "--pub-port", "0", "--data", str(data)),
            *("--durability", self.durability, "--log-level", "warning"),
        ]

    #: Per-session limits off, as for a trusted bot; the harness counts rate_limited errors if any remain.
    #: The connection gate stays on, as by default (its handshake and its memory are measured as a
    #: user gets them): with the per-host limit off its burst is twice --max-sessions, 200,000, so no
    #: bench client waits for its turn, though all come from 127.0.0.1.
    ENV: ClassVar[dict[str, str]] = {
        "ZCHAT_RATE_LIMIT": "0",
        "ZCHAT_JOIN_RATE": "0",
        "ZCHAT_MAX_SESSIONS": "100000",
        "ZCHAT_MAX_SESSIONS_PER_HOST": "0",
    }

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        argv = self.command(workdir / "data")
        proc, match = start_server(
            self.name, argv, ready=READY, log_path=workdir / "server.log", env=self.ENV, cpus=cpus
        )
        assert match is not None
        env = " ".join(f"{k}={v}" for k, v in self.ENV.items())
        shown = f"{env} zchat-broker " + " ".join(argv[1:]).replace(str(workdir / "data"), "$DATA")
        return Server(self.name, proc, {"router": match[1], "pub": match[2]}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return ZmqMembers(spec, hello=True, dealer=True)

    def sender(self, spec: ClientSpec) -> Sender:
        return ZchatSender(spec)

    def versions(self) -> dict[str, str]:
        from zchat import __version__

        return {"zchat": __version__, **_zmq_versions()}


class Naive(Target):
    name = "naive"
    label = "naive forwarder (bench/naive.py)"
    #: Extra arguments of bench.naive.
    flags: tuple[str, ...] = ()

    def check(self) -> None:
        pass

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        argv = [sys.executable, "-m", "bench.naive", *self.flags, "--port", "0", "--pub-port", "0"]
        proc, match = start_server(self.name, argv, ready=READY, log_path=workdir / "server.log", cpus=cpus)
        assert match is not None
        shown = " ".join(["python -m bench.naive", *self.flags])
        return Server(self.name, proc, {"router": match[1], "pub": match[2]}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return ZmqMembers(spec, hello=False, dealer=True)

    def sender(self, spec: ClientSpec) -> Sender:
        return NaiveSender(spec)


class ZmqEcho(Naive):
    """libzmq alone (``bench.naive --echo``): what a client's two connections cost any ZeroMQ broker."""

    name = "zmq-echo"
    label = "libzmq alone (ROUTER echo + PUB, bench/naive.py --echo)"
    flags = ("--echo",)

    def sender(self, spec: ClientSpec) -> Sender:
        raise TargetUnavailable("the echo server takes no load; it is for the idle benchmark")

    def versions(self) -> dict[str, str]:
        return _zmq_versions()


class RawPubSub(Target):
    name = "raw"
    label = "raw pyzmq PUB->SUB (no broker)"
    has_server = False

    def check(self) -> None:
        pass

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        return Server(self.name, None, {"pub_port": port, "pub": f"tcp://127.0.0.1:{port}"}, "(sender binds PUB)")

    def members(self, spec: ClientSpec) -> Members:
        return ZmqMembers(spec, hello=False, dealer=False)

    def sender(self, spec: ClientSpec) -> Sender:
        return RawPublisher(spec)
