"""The backplane under faults and abuse: outages, foreign publishers, races
between reapers and resumes, trimmed logs, stuck servers, DMs at rest.

Each test was first written against a defect found in review; they run on a
real redis-server (and one on a real 3-node Redis Cluster).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq

from broker import backplane as bpmod
from broker.cluster import BACKOFF_MIN_MS, ClusterCore
from broker.server import Broker, Config
from tests.conftest import HOST, Raw, wait_for
from tests.redis_servers import RedisCluster, RedisServer, redis_available
from tests.test_backplane import Node
from zchat import protocol as p

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not redis_available() and not os.environ.get("ZCHAT_TESTS_REQUIRE_ALL"),
        reason="redis-server/redis-cli are not installed (apt install redis-server; .ci/run does)",
    ),
]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # in case a test stopped it
    server.stop()


def core(url: str, broker_id: str) -> ClusterCore:
    bp = bpmod.Backplane(url, broker_id)
    return ClusterCore(backplane=bp, epoch=bp.register(0), heartbeat_ms=1000)


def req(c: ClusterCore, ident: bytes, env: dict[str, Any], now: int) -> list[dict[str, Any]]:
    actions = c.handle(ident, p.encode(env), now)
    c.flush()
    return [a.env for a in actions if hasattr(a, "env")]


def spy_on(ctx: zmq.Context[zmq.Socket[bytes]], port: int, topic: bytes = b"") -> zmq.Socket[bytes]:
    spy = ctx.socket(zmq.SUB)
    spy.setsockopt(zmq.LINGER, 0)
    spy.setsockopt(zmq.SUBSCRIBE, topic)
    spy.connect(f"tcp://{HOST}:{port}")
    return spy


def heard(spy: zmq.Socket[bytes], quiet_ms: int = 1000) -> list[dict[str, Any]]:
    out = []
    while spy.poll(quiet_ms):
        out.extend(p.decode_many(spy.recv_multipart()[1], p.MAX_REPLY_BYTES))
    return out


def test_a_cluster_outage_does_not_kill_the_broker(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """With every Cluster node gone, redis-py raises RedisClusterException (not a RedisError)."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    node = Node(cluster.url, heartbeat_ms=5000).start()
    try:
        raw = Raw(ctx, node.broker.port)
        assert raw.request({"type": "hello", "v": 1, "name": "dora"})["type"] == "welcome"
        for server in cluster.nodes:
            server.kill()
        reply = raw.request({"type": "join", "room": "general", "id": "j"}, timeout=10)
        assert (reply["type"], reply.get("code")) == ("error", "unavailable")
        # Housekeeping and both listeners meet the outage within a second or two.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert node.thread.is_alive(), f"broker loop died: {node.failure!r}"
            assert all(t.is_alive() for t in node.broker._listeners), "a listener thread died"
            time.sleep(0.1)
        pong = raw.request({"type": "ping", "id": "p"})
        assert pong["type"] == "pong", pong
    finally:
        node.stop()
        cluster.stop()


def test_a_foreign_publish_does_not_kill_the_broker(srv: RedisServer, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    node = Node(srv.url).start()
    try:
        r = redis.Redis(port=srv.port)
        channel = node.broker.backplane.channel if node.broker.backplane else ""
        for junk in (b"hello", b"NOT-A-ROOM 1 x", b"general x y", b"general 5 \xff\xfe"):
            r.publish(channel, junk)
        r.close()
        raw = Raw(ctx, node.broker.port)
        assert raw.request({"type": "hello", "v": 1, "name": "dora"})["type"] == "welcome"
        assert raw.request({"type": "join", "room": "general"})["type"] == "joined"
        assert node.thread.is_alive(), f"broker loop died: {node.failure!r}"
    finally:
        node.stop()


def test_chats_on_different_databases_do_not_hear_each_other(
    srv: RedisServer, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    chat0, chat1 = Node(srv.url).start(), Node(srv.url[:-1] + "1").start()
    try:
        spy = spy_on(ctx, chat1.broker.pub_port)
        spy0 = spy_on(ctx, chat0.broker.pub_port)
        alice = Raw(ctx, chat0.broker.port)
        alice.request({"type": "hello", "v": 1, "name": "alice"})
        alice.request({"type": "join", "room": "secret"})
        assert alice.request({"type": "msg", "room": "secret", "text": "launch code", "id": "m1"})["type"] == "ack"
        assert any(e.get("text") == "launch code" for e in heard(spy0)), "chat 0 must hear it"
        assert not heard(spy, 300)
    finally:
        chat0.stop()
        chat1.stop()


def test_after_redis_lost_its_data_clients_start_over(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """A Redis without persistence restarts empty: seq starts over under a new epoch, and events flow again."""
    server = RedisServer(tmp_path / "a").start()
    node = Node(server.url).start()
    try:
        spy = spy_on(ctx, node.broker.pub_port, b"general\x00")
        raw = Raw(ctx, node.broker.port)
        welcome = raw.request({"type": "hello", "v": 1, "name": "dora"})
        raw.request({"type": "join", "room": "general"})
        for i in range(10):
            assert raw.request({"type": "msg", "room": "general", "text": f"b{i}", "id": f"b{i}"})["type"] == "ack"
        heard(spy, 500)
        server.kill()
        server = RedisServer(tmp_path / "b", port=server.port).start()  # same port, no data

        def session_gone() -> bool:
            return raw.request({"type": "ping", "id": "p"}).get("code") == "not_registered"

        wait_for(session_gone, 15, interval=0.2)
        again = raw.request({"type": "hello", "v": 1, "name": "dora"})
        assert again["type"] == "welcome" and again["epoch"] != welcome["epoch"]
        raw.request({"type": "join", "room": "general"})
        ack = raw.request({"type": "msg", "room": "general", "text": "a0", "id": "a0"})
        assert (ack["type"], ack["seq"]) == ("ack", 2)  # join 1, then this
        assert any(e.get("text") == "a0" for e in heard(spy)), node.broker._published
    finally:
        node.stop()
        server.stop()


def test_a_reaper_leaves_a_session_resumed_elsewhere_alone(srv: RedisServer) -> None:
    a, b, c = (bpmod.Backplane(srv.url, x) for x in "ABC")
    for bp in (a, b, c):
        bp.register(0)
    a.claim("carol", None, "tok", "s1")
    a.presence("join", "general", "carol", b"\x81\xa3seq")
    a.set_rooms("carol", ["general"])
    a.r.delete(bpmod.broker_key("A", "alive"))
    list_names = b.r.srandmember

    def names_then_resume(*args: Any) -> Any:
        names = list_names(*args)
        c.claim("carol", "tok", "tok2", "x")  # carol resumes on C after B listed A's names
        return names

    b.r.srandmember = names_then_resume  # type: ignore[method-assign]
    assert b.reap("A", lambda room, name: b"\x81\xa3seq") == 0
    assert a.r.hget(bpmod.user_key("carol"), "broker") == b"C"
    assert a.r.smembers(bpmod.room_key("general", "members")) == {b"carol"}
    for bp in (a, b, c):
        bp.close()


def test_a_broker_that_came_back_is_not_reaped(srv: RedisServer) -> None:
    a, b = core(srv.url, "A"), core(srv.url, "B")
    req(a, b"a1", {"type": "hello", "v": 1, "name": "carol"}, 1000)
    req(a, b"a1", {"type": "join", "room": "general"}, 1000)
    a.bp.r.delete(bpmod.broker_key("A", "alive"))
    assert b.bp.dead_brokers() == ["A"]
    a.tick(5000)  # A is back before B gets to reap it
    assert b.bp.reap("A", lambda room, name: b"\x81\xa3seq") == 0
    assert a.bp.r.hget(bpmod.user_key("carol"), "broker") == b"A"
    assert a.bp.members("general") == ["carol"]


def test_a_dm_to_another_brokers_user_waits_for_an_earlier_one_refused(srv: RedisServer) -> None:
    """Across brokers too, a DM refused (its recipient not back yet, say after a broker
    died) holds its author's later ones to that person until it is resent: those
    already on their way when the recipient came back were handed over first."""
    a, b = core(srv.url, "A"), core(srv.url, "B")
    try:
        req(a, b"a1", {"type": "hello", "v": 1, "name": "alice"}, 1000)
        (first,) = req(a, b"a1", {"type": "dm", "to": "bob", "text": "one", "id": "d1"}, 1000)
        assert first["code"] == "no_such_user"
        req(b, b"b1", {"type": "hello", "v": 1, "name": "bob"}, 1100)  # bob is back, on B
        (held,) = req(a, b"a1", {"type": "dm", "to": "bob", "text": "two", "id": "d2"}, 1200)
        assert (held["type"], held["code"], held["id"]) == ("error", "undelivered", "d2"), held
        assert "'d1'" in held["message"]
        acks = req(a, b"a1", {"type": "dm", "to": "bob", "text": "one", "id": "d1"}, 2000)
        acks += req(a, b"a1", {"type": "dm", "to": "bob", "text": "two", "id": "d2"}, 2000)
        assert [(r["type"], r["id"]) for r in acks] == [("ack", "d1"), ("ack", "d2")], acks
    finally:
        a.bp.close()
        b.bp.close()


def test_a_resume_back_on_the_first_broker_survives_a_late_takeover_notice(srv: RedisServer) -> None:
    a, b = core(srv.url, "A"), core(srv.url, "B")
    welcome = req(a, b"a1", {"type": "hello", "v": 1, "name": "carol"}, 1000)[0]
    req(a, b"a1", {"type": "join", "room": "general"}, 1000)
    assert req(b, b"b1", {"type": "hello", "v": 1, "name": "carol", "resume": welcome["resume"]}, 2000)[0]["resumed"]
    told, back = req(a, b"a2", {"type": "hello", "v": 1, "name": "carol", "resume": welcome["resume"]}, 2100)
    assert told["code"] == "session_moved"  # to a1, which A still thought was carol
    assert back["resumed"]
    a.inbox("takeover", "carol", b"", 2200)  # B's notice, read late
    assert req(a, b"a2", {"type": "ping", "id": "p"}, 2300)[0]["type"] == "pong"
    assert a.bp.owner("carol") == "A"


def test_a_gap_fill_over_a_trimmed_log_publishes_once_in_order(srv: RedisServer) -> None:
    broker = Broker(Config(host=HOST, port=0, pub_port=0, backplane=srv.url, retention=10), None)
    try:
        assert broker.backplane is not None and isinstance(broker.core, ClusterCore)
        for i in range(500):
            op = "join" if i % 2 == 0 else "leave"
            broker.backplane.presence(op, "general", "x", broker.core._presence_head("general", "x", op, i))
        r = broker.backplane.r
        first = int(r.xrange(bpmod.room_key("general", "log"), count=1)[0][0].split(b"-")[0])
        seq = first + 5
        body = r.xrange(bpmod.room_key("general", "log"), f"{seq}-0", f"{seq}-0")[0][1][b"b"]
        broker._published["general"] = 50  # far behind: 51..first-1 were trimmed away
        out: list[tuple[str, bytes]] = []
        broker._sequence("general", seq, body, out, 0)
        seqs = [p.decode(b, p.MAX_REPLY_BYTES)["seq"] for _, b in out]
        assert max(Counter(seqs).values()) == 1 and seqs == sorted(seqs) and seqs[-1] == seq
        assert seqs == list(range(first, seq + 1))
    finally:
        broker._close_sockets()


def test_history_while_redis_hangs_does_not_stall_the_loop(
    srv: RedisServer, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    node = Node(srv.url, heartbeat_ms=5000).start()
    try:
        alice, bob = Raw(ctx, node.broker.port), Raw(ctx, node.broker.port)
        alice.request({"type": "hello", "v": 1, "name": "alice"})
        bob.request({"type": "hello", "v": 1, "name": "bob"})
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)  # up, but answering nothing
        for i in range(10):
            alice.send({"type": "history", "room": f"r{i}", "after": 0, "id": f"q{i}"})
        started = time.monotonic()
        assert bob.request({"type": "ping", "id": "p"}, timeout=60)["type"] == "pong"
        waited = time.monotonic() - started
        replies = [alice.recv(timeout=10) for _ in range(10)]
        assert {(r["type"], r.get("code")) for r in replies} == {("error", "unavailable")}
        assert waited < 5, f"a ping waited {waited:.1f} s behind history requests"
    finally:
        if srv.proc is not None:
            os.kill(srv.proc.pid, signal.SIGCONT)
        node.stop()


def test_dms_are_not_kept_in_redis_after_delivery(srv: RedisServer, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    a, b = Node(srv.url).start(), Node(srv.url).start()
    try:
        alice, bob = Raw(ctx, a.broker.port), Raw(ctx, b.broker.port)
        alice.request({"type": "hello", "v": 1, "name": "alice"})
        bob.request({"type": "hello", "v": 1, "name": "bob"})
        assert alice.request({"type": "dm", "to": "bob", "text": "hunter2", "id": "d1"})["type"] == "ack"
        assert bob.recv()["text"] == "hunter2"
        assert a.broker.backplane is not None
        inbox = bpmod.broker_key(b.broker.core_id, "inbox")
        wait_for(lambda: not a.broker.backplane.r.xrange(inbox), 5)  # type: ignore[union-attr]
    finally:
        a.stop()
        b.stop()


def test_a_takeover_takes_only_that_names_dms_from_the_old_inbox(srv: RedisServer) -> None:
    a, b = bpmod.Backplane(srv.url, "A"), bpmod.Backplane(srv.url, "B")
    try:
        b.send_to_broker("A", "dm", "alice", b"one")
        b.send_to_broker("A", "dm", "carol", b"for carol")
        b.send_to_broker("A", "takeover", "alice")
        b.send_to_broker("A", "dm", "alice", b"two")
        waiting = b.waiting_dms("A", "alice")
        assert [body for _id, body in waiting] == [b"one", b"two"]
        assert [body for _id, body in b.waiting_dms("A", "alice")] == [b"one", b"two"]  # still there
        b.drop_dms("A", [entry for entry, _body in waiting])
        assert b.waiting_dms("A", "alice") == []  # handed over once
        left = [(f[b"k"], f[b"to"]) for _id, f in a.r.xrange(bpmod.broker_key("A", "inbox"))]
        assert left == [(b"dm", b"carol")]
        notices = [(f[b"k"], f[b"to"]) for _id, f in a.r.xrange(bpmod.broker_key("A", "notices"))]
        assert notices == [(b"takeover", b"alice")]  # a Stream of their own: they never trim DMs away
    finally:
        a.close()
        b.close()


def test_a_resume_whose_dm_rescue_fails_is_still_welcomed_and_the_dms_stay(srv: RedisServer) -> None:
    """Redis failing during the rescue costs the rescue, not the resume, and loses no DM."""
    a, b = core(srv.url, "A"), core(srv.url, "B")
    try:
        welcome = req(a, b"\x00a1", {"type": "hello", "v": 1, "name": "alice"}, 0)[0]
        b.bp.send_to_broker("A", "dm", "alice", b"kept")

        def fails(broker: str, name: str) -> list[tuple[bytes, bytes]]:
            raise redis.exceptions.ConnectionError("Redis went away mid-rescue")

        b.bp.waiting_dms = fails  # type: ignore[method-assign]
        replies = req(b, b"\x00b1", {"type": "hello", "v": 1, "name": "alice", "resume": welcome["resume"]}, 10)
        assert [r["type"] for r in replies] == ["welcome"] and replies[0]["resumed"] is True
        assert [body for _id, body in a.bp.waiting_dms("A", "alice")] == [b"kept"]
    finally:
        a.bp.close()
        b.bp.close()


def _old_session(r: Any, name: str, broker: str, token: str, rooms: str = "") -> None:
    """A live session as a broker from before names were one regardless of case left it:
    its hash under the name as spelt, without a ``name`` field."""
    r.hset(
        f"{bpmod.PREFIX}{{u.{name}}}",
        mapping={"token": bpmod.token_hash(token), "broker": broker, "sender": "s-old", "rooms": rooms},
    )
    r.sadd(bpmod.broker_key(broker, "names"), name)
    for room in rooms.split():
        r.sadd(bpmod.room_key(room, "members"), name)


def test_a_session_of_an_older_broker_resumes_under_its_own_spelling_only(srv: RedisServer) -> None:
    """bob's hash from an older broker has no spelling, and was taken to fit any: BOB
    resumed it with bob's token, a session the DMs routed to bob (the hash's key) then
    missed on its broker."""
    a = core(srv.url, "A")
    _old_session(a.bp.r, "bob", "OLD", "tok")
    refused = req(a, b"a1", {"type": "hello", "v": 1, "name": "BOB", "resume": "tok"}, 1000)[0]
    assert refused["code"] == "name_taken", refused
    assert a.bp.find("BOB") == ("OLD", "bob")  # a DM to BOB goes to bob, as he spells himself
    resumed = req(a, b"a2", {"type": "hello", "v": 1, "name": "bob", "resume": "tok"}, 1000)[0]
    assert resumed["type"] == "welcome" and resumed["resumed"], resumed
    assert a.bp.r.hget(bpmod.user_key("bob"), "name") == b"bob"  # its spelling, from now on


def test_a_stale_name_of_another_spelling_does_not_free_a_live_session(srv: RedisServer) -> None:
    """A's list of its names kept "bob" (the srem after a release, or after a takeover,
    lost to a blip: a stale entry is harmless, the release checks the owner) when Bob took
    the name on A. Ending what that entry names after an outage freed Bob's hash, whose
    owner is A too: B then let BOB in beside him."""
    a, b = core(srv.url, "A"), core(srv.url, "B")
    assert req(a, b"a1", {"type": "hello", "v": 1, "name": "Bob"}, 1000)[0]["type"] == "welcome"
    req(a, b"a1", {"type": "join", "room": "general"}, 1000)
    a.bp.r.sadd(bpmod.broker_key("A", "names"), "bob")
    a.bp.r.delete(bpmod.broker_key("A", "alive"))  # A stalled: it re-asserts its sessions
    a.tick(2000)
    assert a.bp.listed_names() == {"Bob"}
    refused = req(b, b"b1", {"type": "hello", "v": 1, "name": "BOB"}, 2100)[0]
    assert refused["code"] == "name_taken", refused
    assert a.bp.members("general") == ["Bob"]


def test_a_session_of_an_older_broker_under_a_name_with_capitals_is_held_reached_and_resumed(
    srv: RedisServer,
) -> None:
    """An older broker kept Bob's hash under "Bob", where this version looks under "bob".
    While one still had Bob (a rolling upgrade: docs/docker.md), anyone could be Bob on a
    new broker, a DM to Bob from it found nobody, and Bob's own resume there got a new
    session, his rooms forgotten."""
    a = core(srv.url, "A")
    r = a.bp.r
    r.hset(bpmod.BROKERS_KEY, "OLD", 0)
    r.set(bpmod.broker_key("OLD", "alive"), 1)
    _old_session(r, "Bob", "OLD", "tok", "general")
    refused = req(a, b"a1", {"type": "hello", "v": 1, "name": "Bob"}, 1000)[0]
    assert refused["code"] == "name_taken", refused
    assert req(a, b"a2", {"type": "hello", "v": 1, "name": "carol"}, 1000)[0]["type"] == "welcome"
    ack = req(a, b"a2", {"type": "dm", "to": "Bob", "text": "hi", "id": "d1"}, 1000)[0]
    assert ack["type"] == "ack", ack
    inbox = [(f[b"k"], f[b"to"]) for _id, f in r.xrange(bpmod.broker_key("OLD", "inbox"))]
    assert inbox == [(b"dm", b"Bob")]  # for the older broker, as it knows him
    resumed = req(a, b"a3", {"type": "hello", "v": 1, "name": "Bob", "resume": "tok"}, 1000)[0]
    assert resumed["type"] == "welcome" and resumed["resumed"] and resumed["in_rooms"] == ["general"], resumed
    assert resumed["sender"] == "s-old"
    assert not r.exists(f"{bpmod.PREFIX}{{u.Bob}}")  # his hash is one of this version's now
    assert r.hmget(bpmod.user_key("Bob"), "broker", "name") == [b"A", b"Bob"]
    notices = [(f[b"k"], f[b"to"]) for _id, f in r.xrange(bpmod.broker_key("OLD", "notices"))]
    assert notices == [(b"takeover", b"Bob")]
    assert a.bp.members("general") == ["Bob"]


def test_a_dead_older_brokers_sessions_under_names_with_capitals_are_ended(srv: RedisServer) -> None:
    """Its reaper released each name under the key of this version, where an older
    broker's session is not: Carol stayed a member of #general for ever, her hash too."""
    a = core(srv.url, "A")
    r = a.bp.r
    r.hset(bpmod.BROKERS_KEY, "OLD", 0)  # registered, and its alive key gone: dead
    _old_session(r, "Carol", "OLD", "tok", "general")
    a.tick(1000)
    assert a.bp.members("general") == []
    assert not r.exists(f"{bpmod.PREFIX}{{u.Carol}}")
    assert not r.hexists(bpmod.BROKERS_KEY, "OLD")


def test_a_message_refused_by_a_failed_append_is_not_overtaken_by_a_later_one(srv: RedisServer) -> None:
    """m1 was taken, and its append failed (Redis stalled): it is answered unavailable,
    and the broker is down for a backoff, so m2 is refused at the door. Once Redis is
    back, m2 may come first (it was on its way): it is refused until m1 is back, or m2
    would be stored ahead of it. The hold is m1's, the first refused, not m2's."""
    c = core(srv.url, "b1")
    now = int(time.time() * 1000)
    assert req(c, b"A", {"type": "hello", "v": 1, "name": "alice"}, now)[0]["type"] == "welcome"
    assert req(c, b"A", {"type": "join", "room": "general"}, now)[0]["type"] == "joined"
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGSTOP)  # the append waits for its 1 s timeout, and fails
    try:
        first = req(c, b"A", {"type": "msg", "room": "general", "text": "m1", "id": "m1"}, now)
        assert first[0]["code"] == "unavailable", first
        assert req(c, b"A", {"type": "msg", "room": "general", "text": "m2", "id": "m2"}, now)[0]["code"] == (
            "unavailable"
        )
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    later = now + 5_000  # past the backoff, within the hold (RATE_HOLD_MAX_MS)
    wait_for(lambda: c.tick(later) is not None and not c.down, 10)
    held = req(c, b"A", {"type": "msg", "room": "general", "text": "m2", "id": "m2"}, later)[0]
    assert held["code"] == "unavailable" and "(id 'm1') was refused; resend it first" in held["message"], held
    one = req(c, b"A", {"type": "msg", "room": "general", "text": "m1", "id": "m1"}, later)[0]
    two = req(c, b"A", {"type": "msg", "room": "general", "text": "m2", "id": "m2"}, later)[0]
    assert (one["type"], two["type"]) == ("ack", "ack") and one["seq"] < two["seq"], (one, two)


def test_a_clock_set_back_leaves_the_backoff_its_pace(srv: RedisServer) -> None:
    """Set back an hour during the backoff after a failure, the broker did not even try
    the backplane for that hour: it answered unavailable to everything."""
    c = core(srv.url, "b1")
    now = 1_764_054_000_000
    c.backplane_failed(RuntimeError("a blip"), now)
    assert not c.backplane_usable(now)
    c.clock_stepped(-3_600_000)
    assert not c.backplane_usable(now - 3_600_000)
    assert c.backplane_usable(now - 3_600_000 + BACKOFF_MIN_MS)
