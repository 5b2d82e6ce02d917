"""IRC: ngircd with flood penalties off, through a minimal raw-socket client (RFC 2812 lines)."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

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

CONFIG = """\
[Global]
Name = bench.irc
Info = zchat bench
AdminInfo1 = bench
AdminInfo2 = bench
AdminEMail = bench@localhost
Listen = 127.0.0.1
Ports = {port}
MotdPhrase = bench
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxNickLength = 31
MaxPenaltyTime = 0
PingTimeout = 600
PongTimeout = 600
[Options]
DNS = no
Ident = no
PAM = no
"""


class Line:
    """One IRC connection: a socket and the partial line received so far."""

    def __init__(self, port: int, nick: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.write(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n")

    def write(self, text: str) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(text.encode())
        finally:
            self.sock.setblocking(False)

    def lines(self) -> list[bytes]:
        """Every complete line available now (answers PING on the way); raises EOFError when closed."""
        try:
            chunk = self.sock.recv(262144)
        except BlockingIOError:
            return []
        if not chunk:
            raise EOFError
        *done, self.buf = (self.buf + chunk).split(b"\r\n")
        for line in done:
            if line.startswith(b"PING "):
                self.write("PONG " + line[5:].decode() + "\r\n")
        return done


def _await_code(conns: list[Line], code: bytes, deadline: float, what: str) -> None:
    """Read every connection until each has seen a line with numeric ``code``."""
    waiting = {c.sock: c for c in conns}
    while waiting:
        readable, _, _ = select.select(list(waiting), [], [], min(until(deadline, what), 0.2))
        for s in readable:
            if any(line.split(b" ", 2)[1:2] == [code] for line in waiting[s].lines()):
                del waiting[s]


class IrcMembers(SocketMembers):
    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.conns: list[Line] = []

    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        self.conns = [Line(self.port, f"m{m.index}") for m in members]
        _await_code(self.conns, b"001", deadline, "IRC welcomes (001)")
        phases = {"connected": time.monotonic()}
        for c, m in zip(self.conns, members, strict=True):
            c.write(f"JOIN #{m.room}\r\n")
        _await_code(self.conns, b"366", deadline, "IRC joins (366 end of NAMES)")
        phases["joined"] = time.monotonic()
        for i, c in enumerate(self.conns):
            self.watch(c.sock, i)
        return phases

    def readable(self, fileobj: socket.socket, index: int, sink: PayloadSink) -> bool:
        try:
            for line in self.conns[index].lines():
                sink(index, line)
        except (EOFError, OSError):
            self.unwatch(fileobj)
        return False

    def close(self) -> None:
        for c in self.conns:
            c.sock.close()


class IrcSender(Sender):
    """One connection per room, joined to it, writing PRIVMSG lines."""

    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.conns: dict[str, Line] = {}

    def connect(self, rooms: list[str], deadline: float) -> None:
        self.conns = {room: Line(self.port, f"s{i}") for i, room in enumerate(rooms)}
        conns = list(self.conns.values())
        _await_code(conns, b"001", deadline, "IRC welcome (001)")
        for room, c in self.conns.items():
            c.write(f"JOIN #{room}\r\n")
        _await_code(conns, b"366", deadline, "IRC join (366)")

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        by_room: dict[str, list[str]] = {}
        for m in batch:
            by_room.setdefault(m.room, []).append(f"PRIVMSG #{m.room} :{m.text}\r\n")
        for room, lines in by_room.items():
            self.conns[room].write("".join(lines))

    def pump(self, timeout: float, ack: AckSink) -> None:
        socks = {c.sock: c for c in self.conns.values()}
        readable, _, _ = select.select(list(socks), [], [], timeout)
        for s in readable:
            try:
                socks[s].lines()
            except EOFError:
                self.errors["disconnected"] += 1
                del self.conns[next(r for r, c in self.conns.items() if c.sock is s)]

    def close(self) -> None:
        for c in self.conns.values():
            c.sock.close()


class Ngircd(Target):
    name = "ngircd"
    label = "IRC (ngircd, penalties off, raw-socket client)"
    #: An IRC line is at most 512 bytes, prefix and command included.
    max_text = 400
    #: ngircd accepts about 10 connections a second (listen backlog 10, SYN retries after 1 s).
    max_idle_clients = 200

    def check(self) -> None:
        require("ngircd", "socket")

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        conf = workdir / "ngircd.conf"
        conf.write_text(CONFIG.format(port=port))
        conf.chmod(0o644)
        workdir.chmod(0o755)
        argv = [require("ngircd", "socket"), "-n", "-f", str(conf)]
        proc, _ = start_server(self.name, argv, port=port, log_path=workdir / "server.log", cpus=cpus)
        shown = "ngircd -n -f ngircd.conf  # [Limits] MaxPenaltyTime = 0, MaxConnectionsIP = 0, MaxJoins = 0"
        return Server(self.name, proc, {"port": port}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return IrcMembers(spec)

    def sender(self, spec: ClientSpec) -> Sender:
        return IrcSender(spec)

    def versions(self) -> dict[str, str]:
        return {"ngircd": program_version(["ngircd", "--version"]), "IRC client": "raw socket (bench/targets/irc_t.py)"}
