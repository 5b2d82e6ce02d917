"""Several brokers, one chat, over a real Redis: a single server and a 3-node Redis Cluster.

Every test runs against both (``backplane`` is parametrized); Redis is started
from Debian's ``redis-server`` on loopback with free ports (tests/redis_servers.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq

from broker import backplane as bpmod
from broker.cluster import ClusterCore
from broker.core import Limits
from broker.fanin import FANIN_ENDPOINT, EventListener, InboxListener
from broker.server import Broker, Config
from client.lib import Client, Event, RequestError
from tests.conftest import HOST, BrokerProcess, Raw, bin_path, wait_for
from tests.redis_servers import RedisCluster, RedisServer, redis_available
from zchat import protocol as p

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not redis_available() and not os.environ.get("ZCHAT_TESTS_REQUIRE_ALL"),
        reason="redis-server/redis-cli are not installed (apt install redis-server; .ci/run does)",
    ),
]

HEARTBEAT_MS = 300


@dataclass
class Backend:
    kind: str
    url: str
    servers: RedisServer | RedisCluster

    def flush(self) -> None:
        nodes = self.servers.nodes if isinstance(self.servers, RedisCluster) else [self.servers]
        for node in nodes:
            r = redis.Redis(host=HOST, port=node.port)
            r.flushall()
            r.close()


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend_servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    workdir = tmp_path_factory.mktemp(request.param)
    servers: RedisServer | RedisCluster
    servers = RedisServer(workdir).start() if request.param == "redis" else RedisCluster(workdir).start()
    try:
        yield Backend(request.param, servers.url, servers)
    finally:
        servers.stop()


@pytest.fixture
def backend(backend_servers: Backend) -> Backend:
    backend_servers.flush()
    return backend_servers


@dataclass
class Node:
    """An in-process broker on the backplane."""

    url: str
    heartbeat_ms: int = HEARTBEAT_MS
    sessions_per_host: int = Limits().max_sessions_per_host
    broker: Broker = field(init=False)

    def start(self) -> Node:
        config = Config(
            host=HOST,
            port=0,
            pub_port=0,
            heartbeat_ms=self.heartbeat_ms,
            backplane=self.url,
            limits=Limits(rate=0, join_rate=0, max_sessions_per_host=self.sessions_per_host),
        )
        self.broker = Broker(config, None)
        self.failure: BaseException | None = None

        def run() -> None:
            try:
                self.broker.run()
            except BaseException as exc:
                self.failure = exc
                raise

        self.thread = threading.Thread(target=run, name=f"broker-{self.broker.core_id}", daemon=True)
        self.thread.start()
        return self

    @property
    def address(self) -> str:
        return f"{HOST}:{self.broker.port}:{self.broker.pub_port}"

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "broker thread did not stop"
        assert self.failure is None, f"the broker loop died: {self.failure!r}"


@pytest.fixture
def nodes(backend: Backend) -> Iterator[Callable[[], Node]]:
    started: list[Node] = []

    def make() -> Node:
        node = Node(backend.url).start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(name: str, node: Node, **kwargs: Any) -> Client:
        client = Client(name, HOST, node.broker.port, node.broker.pub_port, **kwargs)
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close(flush_timeout=0.2)


def collect(client: Client, into: list[Event], until: Callable[[], bool], timeout: float = 10.0) -> None:
    def step() -> bool:
        client.pump(0.02)
        into.extend(client.drain_events())
        return until()

    wait_for(step, timeout, what=lambda: [(e.type, e.seq, e.name, e.text) for e in into])


def texts(events: list[Event], room: str = "general") -> list[str]:
    return [e.text or "" for e in events if e.type == "msg" and e.room == room]


# ------------------------------------------------------------------ the chat


def test_two_brokers_one_room_and_dms(nodes: Callable[[], Node], clients: Callable[..., Client]) -> None:
    """alice on A and bob on B chat in one room and by DM; seq is one sequence across both."""
    a, b = nodes(), nodes()
    alice, bob = clients("alice", a), clients("bob", b)
    alice.join("general")
    bob.join("general")
    for i in range(20):
        alice.send("general", f"a{i}")
        bob.send("general", f"b{i}")
    alice.dm("bob", "psst bob")
    bob.dm("alice", "psst alice")
    seen_a: list[Event] = []
    seen_b: list[Event] = []

    def all_in(seen: list[Event]) -> bool:
        return len(texts(seen)) == 40 and any(e.type == "dm" and not e.own for e in seen)

    def both() -> bool:
        # One thread serves both clients: pump bob too, or his session expires (3 heartbeats).
        bob.pump(0)
        seen_b.extend(bob.drain_events())
        return all_in(seen_a) and all_in(seen_b)

    collect(alice, seen_a, both)
    # Each saw every message once, and both agree on one numbering.
    for seen in (seen_a, seen_b):
        assert sorted(texts(seen)) == sorted([f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)])
    by_seq_a = {e.seq: e.text for e in seen_a if e.type == "msg"}
    by_seq_b = {e.seq: e.text for e in seen_b if e.type == "msg"}
    assert by_seq_a == by_seq_b
    # seq is contiguous across both brokers: 2 joins + 40 messages, 1..42, no gap, no reuse.
    events_a, last_a = alice.history("general", 0, 500)
    events_b, last_b = bob.history("general", 0, 500)
    assert [e.seq for e in events_a] == list(range(1, 43)) == [e.seq for e in events_b]
    assert last_a == last_b == 42
    assert [e.text for e in events_a] == [e.text for e in events_b]
    assert [e.text for e in seen_a if e.type == "dm" and not e.own] == ["psst alice"]
    assert [e.text for e in seen_b if e.type == "dm" and not e.own] == ["psst bob"]
    assert alice.who("general") == ["alice", "bob"] == bob.who("general")
    assert {r["room"]: r["seq"] for r in alice.rooms()} == {"general": 42}


def test_dms_never_go_over_pub_or_into_room_logs(
    nodes: Callable[[], Node], clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]], backend: Backend
) -> None:
    a, b = nodes(), nodes()
    spies = []
    for node in (a, b):
        spy = ctx.socket(zmq.SUB)
        spy.setsockopt(zmq.LINGER, 0)
        spy.setsockopt(zmq.SUBSCRIBE, b"")
        spy.connect(f"tcp://{HOST}:{node.broker.pub_port}")
        spies.append(spy)
    alice, bob = clients("alice", a), clients("bob", b)
    alice.join("general")
    bob.join("general")
    alice.dm_wait("bob", "the secret word is swordfish")
    alice.send_wait("general", "public")
    got: list[Event] = []
    collect(bob, got, lambda: "public" in texts(got) and any(e.type == "dm" for e in got))
    frames: list[bytes] = []
    for spy in spies:
        while spy.poll(300):
            frames.extend(spy.recv_multipart())
    assert any(b"public" in f for f in frames), "the spies must hear room traffic, or the check proves nothing"
    assert not any(b"swordfish" in f for f in frames)
    history, _ = bob.history("general", 0, 500)
    assert not any("swordfish" in (e.text or "") for e in history)


def test_names_are_unique_across_brokers(nodes: Callable[[], Node], clients: Callable[..., Client]) -> None:
    a, b = nodes(), nodes()
    alice = clients("alice", a)
    with pytest.raises(RequestError) as refused:
        clients("alice", b)
    # How long a name outlives its client here: HEARTBEAT_MS x 3, or its broker's alive key more.
    assert refused.value.code == "name_taken" and refused.value.message == (
        "the name 'alice' is taken in this chat (a session that ended without a bye holds its name up to 0.9 s, "
        "up to about 1.8 s when its broker stopped)"
    )
    alice.close()
    # Said bye: the name is free again, on any broker (once A has read the bye: close()
    # hands it to the socket and returns, and a busy machine may run B's hello first).
    taken: list[str] = []

    def free_on_b() -> bool:
        try:
            clients("alice", b)
        except RequestError as exc:
            assert exc.code == "name_taken", exc
            taken.append(exc.code)
            return False
        return True

    wait_for(free_on_b, 10, interval=0.1, what=lambda: taken)


def test_a_name_taken_on_the_same_broker_is_said_as_with_one_broker(
    nodes: Callable[[], Node], clients: Callable[..., Client]
) -> None:
    """The holder is a session of this broker: it knows when it was last heard from and
    when it would end. Said as a broker without a backplane says it, not the
    holding times of a session it cannot see."""
    a = nodes()
    clients("alice", a)
    with pytest.raises(RequestError) as refused:
        clients("alice", a)
    assert refused.value.code == "name_taken"
    assert re.match(
        r"the name 'alice' is taken in this chat \(in use by a session heard from \d+ s ago: free once its client "
        r"quits, or, if that client is gone \(killed, say\), in 1 s;",
        refused.value.message,
    ), refused.value.message
    assert "when its broker stopped" not in refused.value.message


def test_names_that_differ_only_in_case_are_one_name_across_brokers(
    nodes: Callable[[], Node], clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Nobody on B can be ALICE while alice is on A, not even with her token; a DM to
    "bob" reaches Bob on the other broker, named as he spells himself."""
    a, b = nodes(), nodes()
    on_a = Raw(ctx, a.broker.port)
    welcome = on_a.request({"type": "hello", "v": 1, "name": "alice", "id": "h1"})
    assert welcome["type"] == "welcome"
    on_b, again_on_a = Raw(ctx, b.broker.port), Raw(ctx, a.broker.port)
    for raw in (on_b, again_on_a):
        for extra in ({}, {"resume": welcome["resume"]}):
            refused = raw.request({"type": "hello", "v": 1, "name": "ALICE", "id": "h2", **extra})
            # Why, as with one broker (not that a session which ended holds the name for a while);
            # on alice's own broker, also when the name frees, as with one broker.
            said = (
                "the name 'ALICE' is taken in this chat ('alice' is in use, and names that differ only in case "
                "are one name"
            )
            assert refused["code"] == "name_taken", refused
            if raw is on_b:
                assert refused["message"] == said + ")", refused
            else:
                assert refused["message"].startswith(said + ": in use by a session heard from"), refused
                assert "free once its client quits" in refused["message"], refused
    bob = clients("Bob", b)
    ack = on_a.request({"type": "dm", "to": "bob", "text": "psst", "id": "d1"})
    assert (ack["type"], ack["to"]) == ("ack", "Bob"), ack  # as its owner spells it, across brokers too
    got: list[Event] = []
    collect(bob, got, lambda: any(e.type == "dm" for e in got))
    [dm] = [e for e in got if e.type == "dm"]
    assert (dm.text, dm.name, dm.to) == ("psst", "alice", "Bob"), dm
    on_a.send({"type": "bye"})
    for raw in (on_a, on_b, again_on_a):
        raw.sock.close(linger=0)


def test_a_dm_for_bob_in_an_inbox_reaches_no_bob_of_another_spelling(
    nodes: Callable[[], Node], ctx: zmq.Context[zmq.Socket[bytes]], backend: Backend
) -> None:
    """A DM routed to bob on A waits in A's inbox (its listener held up by a blip, say)
    while bob quits and Bob takes the name, on A or on B: it was bob's, and Bob never gets
    it. The inbox found its recipient in any case, and A sent it on to the broker of any
    spelling of the name."""
    a, b = nodes(), nodes()
    assert a.broker.backplane is not None and b.broker.backplane is not None
    inboxes = [bpmod.broker_key(node.broker.backplane.id, "inbox") for node in (a, b)]
    body = p.encode(p.dm_event("carol", "s-carol", "bob", "for bob only", 1, "d1"))
    r: Any = bpmod.connect(backend.url)
    try:
        for node in (a, b):
            bob = Raw(ctx, node.broker.port)
            assert bob.request({"type": "hello", "v": 1, "name": "Bob", "id": "h"})["type"] == "welcome"
            # As carol's broker routed it while bob was on A (Backplane.send_to_broker).
            r.xadd(inboxes[0], {"k": "dm", "to": "bob", "b": body})
            wait_for(lambda: not any(r.xlen(inbox) for inbox in inboxes), 5, what=lambda: inboxes)
            assert bob.silent(0.5), bob.recv()
            bob.send({"type": "bye"})
            bob.sock.close(linger=0)
            wait_for(lambda: not r.exists(bpmod.user_key("Bob")), 5)
    finally:
        r.close()


def test_resume_on_another_broker_takes_the_session_over_silently(
    nodes: Callable[[], Node], clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    a, b = nodes(), nodes()
    bob = clients("bob", b)
    bob.join("general")
    on_a = Raw(ctx, a.broker.port)
    welcome = on_a.request({"type": "hello", "v": 1, "name": "carol", "id": "h1"})
    assert welcome["type"] == "welcome" and not welcome["resumed"]
    assert on_a.request({"type": "join", "room": "general", "id": "j1"})["type"] == "joined"
    ack = on_a.request({"type": "msg", "room": "general", "text": "first", "id": "m1"})
    assert ack["type"] == "ack"
    # carol's connection moves to B and resumes with her token.
    on_b = Raw(ctx, b.broker.port)
    assert on_b.request({"type": "hello", "v": 1, "name": "carol", "id": "h2"})["code"] == "name_taken"
    resumed = on_b.request({"type": "hello", "v": 1, "name": "carol", "resume": welcome["resume"], "id": "h3"})
    assert resumed["type"] == "welcome" and resumed["resumed"] and resumed["sender"] == welcome["sender"]
    # Still in #general (no second join event), and her resend of m1 gets the first ack again.
    joined = on_b.request({"type": "join", "room": "general", "id": "j2"})
    assert "carol" in joined["members"]
    again = on_b.request({"type": "msg", "room": "general", "text": "first", "id": "m1"})
    assert (again["type"], again["seq"], again["ts"]) == ("ack", ack["seq"], ack["ts"])
    other = on_b.request({"type": "msg", "room": "general", "text": "not the same", "id": "m1"})
    assert other["type"] == "error" and other["code"] == "bad_envelope"
    assert on_b.request({"type": "msg", "room": "general", "text": "second", "id": "m2"})["seq"] == ack["seq"] + 1
    # A forgets carol without a leave; B keeps her: who still lists her after A's expiry.
    wait_for(lambda: "carol" not in a.broker.core.by_name, 5)
    assert bob.who("general") == ["bob", "carol"]
    events, _ = bob.history("general", 0, 100)
    presence = [(e.name, e.event) for e in events if e.type == "presence"]
    assert presence == [("bob", "join"), ("carol", "join")]
    assert [e.text for e in events if e.type == "msg"] == ["first", "second"]
    # A's old connection is nobody now.
    assert on_a.request({"type": "who", "room": "general", "id": "w"})["code"] == "not_registered"
    on_b.send({"type": "bye"})
    for raw in (on_a, on_b):
        raw.sock.close(linger=0)


def test_a_join_without_the_member_list_counts_the_members_of_every_broker(
    nodes: Callable[[], Node], clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    a, b = nodes(), nodes()
    clients("bob", b).join("general")
    on_a = Raw(ctx, a.broker.port)
    assert on_a.request({"type": "hello", "v": 1, "name": "carol", "id": "h1"})["type"] == "welcome"
    first = on_a.request({"type": "join", "room": "general", "members": False, "id": "j1"})
    again = on_a.request({"type": "join", "room": "general", "members": False, "id": "j2"})
    for joined in (first, again):
        assert (joined["type"], joined["count"], "members" in joined) == ("joined", 2, False), joined
    assert again["seq"] == first["seq"]  # in the room already: nothing published
    assert on_a.request({"type": "join", "room": "general", "id": "j3"})["members"] == ["bob", "carol"]
    on_a.send({"type": "bye"})
    on_a.sock.close(linger=0)


def test_a_dead_brokers_sessions_are_ended_by_a_survivor(
    nodes: Callable[[], Node], clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]], backend: Backend
) -> None:
    """A broker that vanishes (no bye, no expiry of its own) leaves no ghosts behind."""
    a = Node(backend.url).start()
    b = nodes()
    bob = clients("bob", b)
    bob.join("general")
    raw = Raw(ctx, a.broker.port)
    assert raw.request({"type": "hello", "v": 1, "name": "ghost", "id": "h"})["type"] == "welcome"
    assert raw.request({"type": "join", "room": "general", "id": "j"})["type"] == "joined"
    raw.sock.close(linger=0)
    assert bob.who("general") == ["bob", "ghost"]
    # Stop A's loop the hard way: its thread ends without ending any session.
    _vanish(a)
    got: list[Event] = []
    collect(bob, got, lambda: any(e.type == "presence" and e.name == "ghost" and e.event == "leave" for e in got), 15)
    assert bob.who("general") == ["bob"]
    assert clients("ghost", b).name == "ghost"  # the name is free again


def _vanish(node: Node) -> None:
    """Make a broker disappear as a crash would: its alive key is not refreshed, nothing is cleaned up."""
    core: Any = node.broker.core
    core.tick = lambda now: []  # no more heartbeats
    core._end = lambda session, now, reason: []  # a crash ends no session
    node.stop()


def test_backplane_lost_and_back(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Redis restarts: the broker answers 'unavailable' meanwhile, then serves again; no acked message is lost."""
    server = RedisServer(tmp_path / "redis").start()
    node = Node(server.url).start()
    try:
        raw = Raw(ctx, node.broker.port)
        assert raw.request({"type": "hello", "v": 1, "name": "dora", "id": "h"})["type"] == "welcome"
        assert raw.request({"type": "join", "room": "general", "id": "j"})["type"] == "joined"
        acked = [raw.request({"type": "msg", "room": "general", "text": f"t{i}", "id": f"m{i}"}) for i in range(5)]
        assert [a["type"] for a in acked] == ["ack"] * 5
        server.kill()
        refused = raw.request({"type": "msg", "room": "general", "text": "during", "id": "d1"})
        assert (refused["type"], refused["code"], refused["id"]) == ("error", "unavailable", "d1")
        assert raw.request({"type": "ping", "id": "p"})["type"] == "pong"  # the broker itself is alive
        server.start()  # same port, same directory: the AOF brings the log back

        def delivered() -> dict[str, Any] | None:
            reply = raw.request({"type": "msg", "room": "general", "text": "during", "id": "d1"})
            return reply if reply["type"] == "ack" else None

        ack = wait_for(delivered, 15, interval=0.2)
        assert ack["seq"] == acked[-1]["seq"] + 1
        history = raw.request({"type": "history", "room": "general", "after": 0, "id": "hist"})
        texts_ = [e["text"] for e in history["messages"] if e["type"] == "msg"]
        assert texts_ == ["t0", "t1", "t2", "t3", "t4", "during"]
        # Still dora's session after the outage: the name is held, membership kept.
        assert raw.request({"type": "who", "room": "general", "id": "w"})["members"] == ["dora"]
        raw.sock.close(linger=0)
    finally:
        node.stop()
        server.stop()


def test_a_bye_while_the_backplane_is_down_still_reads_as_a_quit(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A session ended while Redis is unreachable gets its leave once Redis is back: with
    the reason it ended for (a bye: "quit"), not as if it had timed out."""
    server = RedisServer(tmp_path / "redis").start()
    node = Node(server.url).start()
    try:
        dora, eve = Raw(ctx, node.broker.port), Raw(ctx, node.broker.port)
        for name, raw in (("dora", dora), ("eve", eve)):
            assert raw.request({"type": "hello", "v": 1, "name": name, "id": "h"})["type"] == "welcome"
            assert raw.request({"type": "join", "room": "general", "id": "j"})["type"] == "joined"
        server.kill()
        eve.send({"type": "bye"})
        assert eve.request({"type": "ping", "id": "p"})["code"] == "not_registered"  # the bye was handled
        server.start()

        def back() -> bool:
            reply = dora.request({"type": "msg", "room": "general", "text": "back", "id": "m1"})
            return reply["type"] == "ack"

        wait_for(back, 15, interval=0.2)

        def eve_left() -> dict[str, Any] | None:
            history = dora.request({"type": "history", "room": "general", "after": 0, "id": "hist"})
            return next((e for e in history["messages"] if e.get("name") == "eve" and e["event"] == "leave"), None)

        left = wait_for(eve_left, 10, interval=0.2)
        assert left.get("reason") == "quit", left
    finally:
        node.stop()
        server.stop()


def test_keys_of_a_room_share_one_slot() -> None:
    """What makes every script a single-slot operation on a Redis Cluster."""
    from redis.crc import key_slot

    for room in ("general", "x", "a-b_c"):
        keys = [bpmod.room_key(room, part) for part in ("seq", "log", "members", "ids:1", "ids:0")]
        assert len({key_slot(k.encode()) for k in keys}) == 1
    assert len({key_slot(bpmod.broker_key("b1", p).encode()) for p in ("names", "inbox", "notices", "alive")}) == 1


# ---------------------------------------------------------------- failover


def test_kill_9_of_a_broker_while_alice_talks(backend: Backend, tmp_path: Path) -> None:
    """alice's client moves from A to B by itself; nothing is lost or shown twice, for her or for bob."""
    extra = ["--backplane", backend.url, "--heartbeat-ms", str(HEARTBEAT_MS), "--rate-limit", "0", "--join-rate", "0"]
    a = BrokerProcess(tmp_path / "a", extra=extra).start()
    b = BrokerProcess(tmp_path / "b", extra=extra).start()
    addr_a, addr_b = f"{HOST}:{a.port}:{a.pub_port}", f"{HOST}:{b.port}:{b.pub_port}"
    alice = Client("alice", hosts=[addr_a, addr_b])
    bob = Client("bob", hosts=[addr_b])
    try:
        alice.connect()
        bob.connect()
        alice.join("general")
        bob.join("general")
        seen_a: list[Event] = []
        seen_b: list[Event] = []
        total = 300
        for i in range(total):
            alice.send("general", f"line {i:03d}")
            if i == 100:
                a.kill()  # SIGKILL, mid-stream: some lines acked, some in flight, some not sent yet
            if i % 10 == 0:
                alice.pump(0.01)
                seen_a.extend(alice.drain_events())
                bob.pump(0)
                seen_b.extend(bob.drain_events())

        def both_done() -> bool:
            # One thread serves both clients here: pump both, or bob's session expires.
            bob.pump(0)
            seen_b.extend(bob.drain_events())
            return alice.unacked == 0 and len(texts(seen_a)) == total and len(texts(seen_b)) == total

        collect(alice, seen_a, both_done, 30)
        expected = [f"line {i:03d}" for i in range(total)]
        assert texts(seen_b) == expected  # once each, in order
        assert texts(seen_a) == expected
        statuses = [e.text or "" for e in seen_a if e.type == "status"]
        assert any(str(b.port) in s for s in statuses), statuses
        events, last = bob.history("general", 0, 500)
        assert [e.seq for e in events] == list(range(1, last + 1))  # contiguous across both brokers
        assert [e.text for e in events if e.type == "msg"] == expected
        # alice never left #general: no leave, and no second join, in the log.
        presence = [(e.name, e.event) for e in events if e.type == "presence"]
        assert presence == [("alice", "join"), ("bob", "join")], "".join(b.log[-30:])
        assert bob.who("general") == ["alice", "bob"]
    finally:
        alice.close(flush_timeout=0.2)
        bob.close(flush_timeout=0.2)
        a.kill()
        b.kill()


@pytest.mark.timeout(60)
def test_dms_sent_while_the_recipients_broker_is_dead_reach_her_on_the_next(backend: Backend, tmp_path: Path) -> None:
    """bob's DMs routed to dead broker A (alice's name is still A's) are handed to alice on B."""
    extra = ["--backplane", backend.url, "--heartbeat-ms", str(HEARTBEAT_MS), "--rate-limit", "0"]
    a = BrokerProcess(tmp_path / "a", extra=extra).start()
    b = BrokerProcess(tmp_path / "b", extra=extra).start()
    alice = Client("alice", hosts=[f"{HOST}:{a.port}:{a.pub_port}", f"{HOST}:{b.port}:{b.pub_port}"])
    bob = Client("bob", hosts=[f"{HOST}:{b.port}:{b.pub_port}"])
    try:
        alice.connect()
        bob.connect()
        a.kill()  # SIGKILL: alice's name stays A's until she resumes elsewhere (or A is reaped)
        acks = [bob.dm_wait("alice", f"while you move {i}") for i in range(3)]
        assert [ack.text for ack in acks] == [f"while you move {i}" for i in range(3)]  # acked: accepted
        got: list[Event] = []
        collect(alice, got, lambda: len([e for e in got if e.type == "dm"]) >= 3, 20)
        assert [e.text for e in got if e.type == "dm"] == [f"while you move {i}" for i in range(3)]
        assert any(e.type == "status" and str(b.port) in (e.text or "") for e in got)
        # The broker's log is read by a thread of the test: wait for the line, do not race it.
        wait_for(lambda: "DM(s) for alice taken from the inbox" in "".join(b.log), 5)
    finally:
        alice.close(flush_timeout=0.2)
        bob.close(flush_timeout=0.2)
        a.kill()
        b.kill()


def test_a_broker_presumed_dead_takes_its_sessions_back(
    nodes: Callable[[], Node], clients: Callable[..., Client], backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """If a live broker's alive key lapses (a stalled loop), survivors may reap its sessions; it re-asserts them."""
    a, b = nodes(), nodes()
    carol, bob = clients("carol", a), clients("bob", b)
    carol.join("general")
    bob.join("general")
    r = redis.Redis.from_url(backend.url) if backend.kind == "redis" else redis.RedisCluster.from_url(backend.url)
    try:
        r.delete(bpmod.broker_key(a.broker.core_id, "alive"))

        def healed() -> bool:
            carol.pump(0)
            bob.pump(0)
            return any("sessions re-asserted" in rec.getMessage() for rec in caplog.records)

        wait_for(healed, 10)
        assert r.hget(bpmod.user_key("carol"), "broker") == a.broker.core_id.encode()
        wait_for(lambda: bob.who("general") == ["bob", "carol"], 10)
        bob.dm_wait("carol", "still there?")
        got: list[Event] = []
        collect(carol, got, lambda: any(e.type == "dm" and e.text == "still there?" for e in got))
    finally:
        r.close()


def test_a_failover_is_not_refused_by_the_per_host_limit(backend: Backend) -> None:
    """Users behind one address failing over to a broker that already has as many from
    that address as --max-sessions-per-host allows: a resume starts no session, so it
    is let in; a hello with a token that resumes nothing is a new session, refused, and
    leaves its name free."""
    a = Node(backend.url, sessions_per_host=1).start()
    b = Node(backend.url).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        token = Raw(ctx, b.broker.port).request(p.hello("ann"))["resume"]
        assert Raw(ctx, a.broker.port).request(p.hello("bob"))["type"] == "welcome"
        moved = Raw(ctx, a.broker.port).request(p.hello("ann", "h1", token))
        assert moved["type"] == "welcome" and moved["resumed"] is True, moved
        refused = Raw(ctx, a.broker.port).request(p.hello("cat", "h2", "no-such-token"))
        assert refused["code"] == "limit_reached", refused
        assert Raw(ctx, b.broker.port).request(p.hello("cat"))["type"] == "welcome"
    finally:
        ctx.destroy(linger=0)
        a.stop()
        b.stop()


def _pull_fanin(ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    """The loop's end of the fan-in, for a listener run alone on ``ctx``."""
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(FANIN_ENDPOINT)
    return pull


def _next_frames(pull: zmq.Socket[bytes], timeout: float) -> list[bytes]:
    assert pull.poll(int(timeout * 1000)), "nothing from the listener"
    return pull.recv_multipart()


def test_an_inbox_entry_stays_in_redis_until_the_loop_has_handled_it(
    backend: Backend, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The listener deleted each DM as it handed it to the loop: a broker stopping (SIGTERM)
    read one in its last 200 ms, after its loop had stopped, and lost it, acknowledged.
    Left in the inbox, it goes to the broker its recipient resumes on."""
    pull, stop = _pull_fanin(ctx), threading.Event()
    listener = InboxListener(ctx, backend.url, stop, "gone")
    r: Any = bpmod.connect(backend.url)
    inbox = bpmod.broker_key("gone", "inbox")
    try:
        listener.start()
        r.xadd(inbox, {"k": "dm", "to": "alice", "b": b"body"})
        frames = _next_frames(pull, 5)
        assert frames[:4] == [b"in", b"dm", b"alice", b"body"] and frames[4] == inbox.encode()
    finally:
        stop.set()
        listener.join(5)
        pull.close(0)
    assert r.xlen(inbox) == 1  # handed to a loop that never handled it: still there
    r.close()


def test_a_dm_handled_by_the_loop_leaves_the_inbox(
    nodes: Callable[[], Node], clients: Callable[..., Client], backend: Backend
) -> None:
    a, b = nodes(), nodes()
    alice, bob = clients("alice", a), clients("bob", b)
    bob.dm_wait("alice", "through A's inbox")
    got: list[Event] = []
    collect(alice, got, lambda: any(e.type == "dm" for e in got))
    assert a.broker.backplane is not None
    r: Any = bpmod.connect(backend.url)
    try:
        inbox = bpmod.broker_key(a.broker.backplane.id, "inbox")
        wait_for(lambda: r.xlen(inbox) == 0, 5, what=lambda: r.xlen(inbox))
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_a_listener_reconnects_at_once_after_each_new_loss(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """The wait before reconnecting doubled at each loss and never went back (listen() only
    ends by raising): after five blips, every later one held cross-broker events for 5 s."""
    server = RedisServer(tmp_path / "redis").start()
    pull, stop = _pull_fanin(ctx), threading.Event()
    listener = EventListener(ctx, server.url, stop)
    admin = redis.Redis(host=HOST, port=server.port)
    waits = []
    try:
        listener.start()
        assert _next_frames(pull, 5) == [b"sync"]
        for _ in range(7):
            started = time.monotonic()
            assert admin.client_kill_filter(_type="pubsub") == 1
            assert _next_frames(pull, 10) == [b"sync"]  # subscribed again
            waits.append(time.monotonic() - started)
        # Each takes BACKOFF_FIRST_S (0.1 s) and a reconnect; without the reset the waits
        # double (0.1 ... 1.6, 3.2, 5 s by the 7th). The bound leaves a loaded machine 2 s
        # for the reconnect itself (1.0 s left it 0.9 s for any one of seven).
        assert max(waits) < 2.5, waits
        back = [r for r in caplog.records if r.getMessage() == "zchat-events: backplane connection back"]
        assert len(back) == 7  # each loss logged is followed by its recovery
    finally:
        stop.set()
        listener.join(5)
        pull.close(0)
        admin.close()
        server.stop()


def test_a_backplane_address_that_is_no_redis_url_is_refused_at_start(tmp_path: Path) -> None:
    """http:// and unix:// (which redis-py suggests) ended in a traceback, exit 1; a
    password in the address went into the log."""
    for url, why in (
        ("http://127.0.0.1:6379/0", "it must be redis://HOST[:PORT][/DB]"),
        ("unix:///tmp/redis.sock", "it must be redis://HOST[:PORT][/DB]"),
        ("redis://127.0.0.1:6379/x", "its port must be an integer 1-65535, and its database an integer"),
        ("redis://:hunter2@127.0.0.1:abc/0", "its port must be an integer 1-65535"),
        ("redis://127.0.0.1:99999/0", "its port must be an integer 1-65535"),
    ):
        result = subprocess.run(
            [bin_path("zchat-broker"), "--port", "0", "--pub-port", "0", "--backplane", url],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 2, (url, result.stderr)
        assert why in result.stderr and "Traceback" not in result.stderr, (url, result.stderr)
        assert "hunter2" not in result.stderr


def test_a_backplane_password_is_never_in_the_log(tmp_path: Path) -> None:
    """The ready line printed the URL as given: redis://:hunter2@…"""
    server = RedisServer(tmp_path / "redis", password="hunter2").start()
    broker = BrokerProcess(tmp_path / "d", extra=["--backplane", f"redis://:hunter2@{HOST}:{server.port}/0"])
    try:
        broker.start()
        ready = [line for line in broker.log if " ready: " in line]
        assert ready and f"backplane redis://:***@{HOST}:{server.port}/0" in ready[0], broker.log
        assert "keeping the newest 100000 events of each room)" in ready[0]
    finally:
        broker.kill()
        server.stop()
    assert "hunter2" not in "".join(broker.log)
    assert bpmod.shown_url("redis://h/0?password=hunter2&db=1") == "redis://h/0?password=***&db=1"


@contextlib.contextmanager
def dm_parked(
    backend: Backend, clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]], heartbeat_ms: int = 5000
) -> Iterator[tuple[Node, Node, dict[str, Any]]]:
    """Brokers A and B; "bot" on A vanished without a bye (its client restarting) and
    bob on B sent it a DM, acked, which A could not hand to it. Yields A, B and the
    bot's first welcome."""
    a, b = Node(backend.url, heartbeat_ms=heartbeat_ms).start(), Node(backend.url, heartbeat_ms=heartbeat_ms).start()
    try:
        bob = clients("bob", b)
        first = Raw(ctx, a.broker.port)
        welcome = first.request({"type": "hello", "v": 1, "name": "bot", "id": "h1"})
        assert welcome["type"] == "welcome"
        first.sock.close(linger=0)  # the process dies: no bye
        wait_for(lambda: not a.broker._peers, 5, what=lambda: a.broker._peers)  # A saw it go
        assert bob.dm_wait("bot", "while you restart").text == "while you restart"  # acked
        assert isinstance(a.broker.core, ClusterCore)
        core = a.broker.core
        wait_for(lambda: "bot" in core._parked, 5)  # it could not go to the old connection
        yield a, b, welcome
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def parked(
    backend: Backend, clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[tuple[Node, Node, dict[str, Any]]]:
    with dm_parked(backend, clients, ctx) as nodes:
        yield nodes


def _resume(ctx: zmq.Context[zmq.Socket[bytes]], node: Node, welcome: dict[str, Any]) -> Raw:
    raw = Raw(ctx, node.broker.port)
    resumed = raw.request({"type": "hello", "v": 1, "name": "bot", "resume": welcome["resume"], "id": "h2"})
    assert resumed["type"] == "welcome" and resumed["resumed"], resumed
    return raw


def test_a_dm_for_a_client_that_is_restarting_waits_for_its_resume(
    parked: tuple[Node, Node, dict[str, Any]], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A bot restarted by its supervisor resumes its session with its token a few seconds
    later. A DM sent to it meanwhile from another broker came to its broker's inbox, went
    to a connection that was gone, and was lost: acked to its sender, never delivered."""
    a, _b, welcome = parked
    again = _resume(ctx, a, welcome)
    dm = again.recv()
    assert (dm["type"], dm["from"], dm["text"]) == ("dm", "bob", "while you restart")
    assert again.silent()  # once
    again.send({"type": "bye"})
    again.sock.close(linger=0)


def test_a_dm_parked_on_one_broker_reaches_a_resume_on_the_other(
    parked: tuple[Node, Node, dict[str, Any]], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    _a, b, welcome = parked
    again = _resume(ctx, b, welcome)
    dm = again.recv()
    assert (dm["type"], dm["text"]) == ("dm", "while you restart")
    again.send({"type": "bye"})
    again.sock.close(linger=0)


def test_a_dm_parked_for_a_session_that_ends_goes_and_no_later_session_gets_it(
    backend: Backend, clients: Callable[..., Client], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    with dm_parked(backend, clients, ctx, heartbeat_ms=400) as (a, _b, _welcome):
        assert isinstance(a.broker.core, ClusterCore)
        core = a.broker.core
        r: Any = bpmod.connect(backend.url)
        try:
            inbox = bpmod.broker_key(core.bp.id, "inbox")
            # The session expires (3 heartbeats) without coming back: its DM goes with it.
            wait_for(lambda: "bot" not in core.by_name and r.xlen(inbox) == 0, 10, what=lambda: r.xlen(inbox))
        finally:
            r.close()
        later = Raw(ctx, a.broker.port)
        assert later.request({"type": "hello", "v": 1, "name": "bot", "id": "h3"})["type"] == "welcome"
        assert later.silent(0.5)  # a new session of the name: nothing of the old one's
        later.send({"type": "bye"})
        later.sock.close(linger=0)


def test_a_parked_dm_whose_hand_over_fails_is_handed_over_at_a_later_tick(
    parked: tuple[Node, Node, dict[str, Any]], ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name left the parked set before the hand-over, which a Redis blip then failed:
    the DM stayed in the inbox with nothing pointing at it."""
    a, _b, welcome = parked
    assert isinstance(a.broker.core, ClusterCore)
    bp = a.broker.core.bp
    waiting = bp.waiting_dms
    failures = [redis.ConnectionError("a blip")]

    def blip(broker: str, name: str) -> list[tuple[bytes, bytes]]:
        if failures:
            raise failures.pop()
        return waiting(broker, name)

    monkeypatch.setattr(bp, "waiting_dms", blip)
    again = _resume(ctx, a, welcome)
    dm = again.recv(timeout=10)
    assert (dm["type"], dm["text"]) == ("dm", "while you restart") and not failures
    again.send({"type": "bye"})
    again.sock.close(linger=0)
