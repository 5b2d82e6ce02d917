"""MQTT: mosquitto through paho-mqtt, QoS 0 both ways (fire and forget, like a PUB socket)."""

from __future__ import annotations

import select
import socket
import time
from importlib.metadata import version
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

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
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
set_tcp_nodelay true
log_dest stderr
log_type error
"""


def _client(client_id: str, port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False)
    c.connect("127.0.0.1", port, keepalive=60)
    # paho leaves Nagle on; the servers all answer with TCP_NODELAY, so the clients do too.
    _sock(c).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _sock(c: mqtt.Client) -> socket.socket:
    sock = c.socket()
    assert isinstance(sock, socket.socket)
    return sock


def _settle(clients: list[mqtt.Client], done: set[int], deadline: float, what: str) -> None:
    """Run the clients' loops until ``done`` holds every client's index."""
    while len(done) < len(clients):
        until(deadline, what)
        socks = {_sock(c): c for i, c in enumerate(clients) if i not in done}
        readable, _, _ = select.select(list(socks), [], [], 0.1)
        for s in readable:
            socks[s].loop_read(100)


class MqttMembers(SocketMembers):
    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.clients: list[mqtt.Client] = []
        self.inbox: list[tuple[int, bytes]] = []
        self.next_misc = 0.0

    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        connected: set[int] = set()
        subscribed: set[int] = set()
        for i, m in enumerate(members):
            c = _client(f"m{m.index}", self.port)
            c.on_connect = lambda c, u, f, rc, p, i=i: connected.add(i)
            c.on_subscribe = lambda c, u, mid, rc, p, i=i: subscribed.add(i)
            c.on_message = lambda c, u, msg, i=i: self.inbox.append((i, msg.payload))
            self.clients.append(c)
        _settle(self.clients, connected, deadline, "MQTT CONNACKs")
        phases = {"connected": time.monotonic()}
        for c, m in zip(self.clients, members, strict=True):
            c.subscribe(m.room, qos=0)
        _settle(self.clients, subscribed, deadline, "MQTT SUBACKs")
        phases["joined"] = time.monotonic()
        for i, c in enumerate(self.clients):
            self.watch(_sock(c), i)
        self.inbox.clear()
        return phases

    def readable(self, fileobj: socket.socket, index: int, sink: PayloadSink) -> bool:
        # paho reads one packet per loop_read() (and exactly its bytes: nothing stays buffered).
        client, more = self.clients[index], True
        for _ in range(self.BURST):
            rc = client.loop_read()
            if rc == mqtt.MQTT_ERR_AGAIN:
                more = False
                break
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.unwatch(fileobj)
                more = False
                break
        inbox, self.inbox = self.inbox, []
        for i, payload in inbox:
            sink(i, payload)
        return more

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_misc:
            for c in self.clients:
                c.loop_misc()
                if c.want_write():
                    c.loop_write()
            self.next_misc = now + 1.0

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()


class MqttSender(Sender):
    def __init__(self, spec: ClientSpec) -> None:
        super().__init__()
        self.port = int(spec.endpoints["port"])
        self.client: mqtt.Client | None = None

    def connect(self, rooms: list[str], deadline: float) -> None:
        done: set[int] = set()
        self.client = _client("sender", self.port)
        self.client.on_connect = lambda c, u, f, rc, p: done.add(0)
        _settle([self.client], done, deadline, "MQTT CONNACK")

    def send(self, batch: list[Msg], ack: AckSink) -> None:
        c = self.client
        assert c is not None
        for m in batch:
            c.publish(m.room, m.text, qos=0)
        # What the socket did not take yet is written as it drains (TCP pushes back).
        while c.want_write():
            select.select([], [_sock(c)], [], 1.0)
            c.loop_write()

    def pump(self, timeout: float, ack: AckSink) -> None:
        c = self.client
        assert c is not None
        readable, _, _ = select.select([_sock(c)], [], [], timeout)
        if readable:
            c.loop_read(100)
        c.loop_misc()

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()


class Mosquitto(Target):
    name = "mosquitto"
    label = "MQTT (mosquitto + paho-mqtt, QoS 0)"

    def check(self) -> None:
        require("mosquitto", "paho.mqtt")

    def start(self, workdir: Path, cpus: set[int] | None) -> Server:
        port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(CONFIG.format(port=port))
        argv = [require("mosquitto", "paho.mqtt"), "-c", str(conf)]
        proc, _ = start_server(self.name, argv, port=port, log_path=workdir / "server.log", cpus=cpus)
        shown = f"mosquitto -c mosquitto.conf  # {CONFIG.format(port='$PORT').strip().replace(chr(10), '; ')}"
        return Server(self.name, proc, {"port": port}, shown, workdir / "server.log")

    def members(self, spec: ClientSpec) -> Members:
        return MqttMembers(spec)

    def sender(self, spec: ClientSpec) -> Sender:
        return MqttSender(spec)

    def versions(self) -> dict[str, str]:
        line = program_version(["mosquitto", "-h"])
        return {"mosquitto": line, "paho-mqtt": version("paho-mqtt")}
