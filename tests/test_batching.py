"""Batches on the wire: a busy pass sends one frame per room and per client, nothing lost or reordered.

The broker process is stopped (SIGSTOP) while a client sends a burst, so the
burst is waiting when it resumes and its passes are full: the case batching is for.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from broker.hold import PRESENCE_HOLD_MS, PresenceHold
from client.lib import Client, Event
from tests.conftest import HOST, BrokerProcess, Raw, wait_for
from zchat import protocol as p

BURST = 300


@pytest.fixture
def stoppable(tmp_path: Path) -> Iterator[BrokerProcess]:
    # No rate limit: the burst is one client's, above any sane per-session rate.
    broker = BrokerProcess(tmp_path / "data", extra=["--rate-limit", "0"]).start()
    yield broker
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGCONT)
    broker.kill()


def joined(ctx: zmq.Context[zmq.Socket[bytes]], broker: BrokerProcess, name: str) -> Raw:
    raw = Raw(ctx, broker.port)
    assert raw.request(p.hello(name))["type"] == "welcome"
    assert raw.request({"type": "join", "room": "general"})["type"] == "joined"
    return raw


def frames_until(sock: zmq.Socket[bytes], count: int, multipart: bool, timeout_ms: int = 10_000) -> list[bytes]:
    """Bodies of frames read until they carry ``count`` envelopes in all."""
    bodies: list[bytes] = []
    seen = 0
    while seen < count:
        assert sock.poll(timeout_ms), f"only {seen} of {count} envelopes arrived"
        body = sock.recv_multipart()[-1] if multipart else sock.recv()
        bodies.append(body)
        seen += len(p.decode_many(body))
    return bodies


@pytest.mark.timeout(60)
def test_a_burst_goes_out_in_batches_in_order_and_whole(
    stoppable: BrokerProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    alice = joined(ctx, stoppable, "alice")
    spy = ctx.socket(zmq.SUB)
    spy.setsockopt(zmq.LINGER, 0)
    spy.setsockopt(zmq.SUBSCRIBE, b"general\x00")
    spy.connect(f"tcp://{HOST}:{stoppable.pub_port}")
    bob = Client("bob", HOST, stoppable.port, stoppable.pub_port)
    try:
        bob.connect()
        bob.join("general")
        # The spy's subscription is live once it hears anything published after it.
        alice.request({"type": "msg", "room": "general", "text": "warm-up", "id": "w"})
        top = 0
        while not top:
            assert spy.poll(5000), "the spy heard no warm-up"
            top = next((e["seq"] for e in p.decode_many(spy.recv_multipart()[1]) if e.get("text") == "warm-up"), 0)

        assert stoppable.proc is not None
        stoppable.proc.send_signal(signal.SIGSTOP)
        for i in range(BURST):
            alice.send({"type": "msg", "room": "general", "text": f"m{i}", "id": f"m{i}"})
        stoppable.proc.send_signal(signal.SIGCONT)

        pub_frames = frames_until(spy, BURST, multipart=True)
        events = [env for body in pub_frames for env in p.decode_many(body)]
        assert [e["text"] for e in events] == [f"m{i}" for i in range(BURST)]
        assert [e["seq"] for e in events] == list(range(top + 1, top + 1 + BURST))
        assert all(e["type"] == "msg" and e["from"] == "alice" for e in events)
        assert len(pub_frames) < BURST, "a burst read in full passes must go out in batches"
        assert all(len(p.decode_many(body)) <= p.BATCH_MAX_ITEMS for body in pub_frames)
        # A frame of one event is the event itself, as without batches.
        assert all(body.startswith(p.BATCH_HEAD) == (len(p.decode_many(body)) > 1) for body in pub_frames)

        ack_frames = frames_until(alice.sock, BURST, multipart=False)
        acks = [env for body in ack_frames for env in p.decode_many(body)]
        assert [(a["type"], a["id"], a["seq"]) for a in acks] == [("ack", f"m{i}", top + 1 + i) for i in range(BURST)]
        assert len(ack_frames) < BURST, "the acks of one client's pass go out in batches too"

        got: list[Event] = []

        def bob_has_all() -> bool:
            bob.pump(0.05)
            got.extend(e for e in bob.drain_events() if e.type == "msg" and e.text != "warm-up")
            return len(got) >= BURST

        wait_for(bob_has_all, 20, interval=0)
        assert [(e.text, e.seq) for e in got] == [(f"m{i}", top + 1 + i) for i in range(BURST)]
    finally:
        bob.close(0)


@pytest.mark.timeout(60)
def test_history_answer_comes_after_the_replies_owed_before_it(
    stoppable: BrokerProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Two msgs, a history request, a msg, read in one pass: the acks owed before the
    history request go out before its answer, the later ack after it."""
    alice = joined(ctx, stoppable, "alice")
    assert stoppable.proc is not None
    batched = False
    for attempt in range(5):
        stoppable.proc.send_signal(signal.SIGSTOP)
        for rid, text in ((f"a{attempt}-1", "one"), (f"a{attempt}-2", "two")):
            alice.send({"type": "msg", "room": "general", "text": text, "id": rid})
        alice.send({"type": "history", "room": "general", "id": f"h{attempt}"})
        alice.send({"type": "msg", "room": "general", "text": "three", "id": f"a{attempt}-3"})
        stoppable.proc.send_signal(signal.SIGCONT)
        frames = [p.decode_many(body) for body in frames_until(alice.sock, 4, multipart=False)]
        ids = [env["id"] for frame in frames for env in frame]
        assert ids == [f"a{attempt}-1", f"a{attempt}-2", f"h{attempt}", f"a{attempt}-3"]
        history = next(env for frame in frames for env in frame if env["type"] == "history")
        assert [m["text"] for m in history["messages"] if m["type"] == "msg"][-2:] == ["one", "two"]
        # The first two acks in one frame: they (and so the requests after them,
        # read from the same connection) were decided in one pass.
        if [len(frame) for frame in frames] == [2, 1, 1]:
            batched = True
            break
    assert batched, "in 5 tries the burst was never read in one pass"


def test_a_client_cannot_send_a_batch(stoppable: BrokerProcess, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Batches are the broker's; a client's is an unknown request, and nothing in it is done."""
    alice = joined(ctx, stoppable, "alice")
    inner = p.encode({"type": "msg", "room": "general", "text": "smuggled", "id": "s"})
    frame = p.batches([inner, inner])[0]
    reply = alice.request(frame)
    assert (reply["type"], reply["code"]) == ("error", "unknown_type")
    history = alice.request({"type": "history", "room": "general", "id": "h"})
    assert not any(m.get("text") == "smuggled" for m in history["messages"])


# ---------------------------------------------------------------- presence storms


def live_spy(ctx: zmq.Context[zmq.Socket[bytes]], broker: BrokerProcess, alice: Raw) -> tuple[zmq.Socket[bytes], int]:
    """A SUB on #general that is known to hear it, and the room's seq by then."""
    spy = ctx.socket(zmq.SUB)
    spy.setsockopt(zmq.LINGER, 0)
    spy.setsockopt(zmq.SUBSCRIBE, b"general\x00")
    spy.connect(f"tcp://{HOST}:{broker.pub_port}")
    # The spy's subscription is live once it hears anything published after it: until
    # then, a warm-up every 100 ms; then the ones already sent, up to the last one.
    sent = 0
    heard: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while not heard or f"warm-up {sent - 1}" not in heard:
        assert time.monotonic() < deadline, "the spy heard no warm-up"
        if not heard:
            alice.send({"type": "msg", "room": "general", "text": f"warm-up {sent}", "id": f"w{sent}"})
            sent += 1
        if spy.poll(100):
            heard.update((e["text"], e["seq"]) for e in p.decode_many(spy.recv_multipart()[1]))
    return spy, max(heard.values())


STORM = 40


@pytest.mark.timeout(60)
def test_a_join_storm_reaches_the_room_in_a_few_frames_in_order(
    stoppable: BrokerProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Joins one after another, each in a pass of its own: the room hears the first at
    once and the rest batched (broker/hold.py), every one, in seq order, and a message
    after them still after them."""
    alice = joined(ctx, stoppable, "alice")
    spy, top = live_spy(ctx, stoppable, alice)
    joiners = [Raw(ctx, stoppable.port) for _ in range(STORM)]
    for i, raw in enumerate(joiners):
        assert raw.request(p.hello(f"j{i}"))["type"] == "welcome"
    started = time.monotonic()
    for raw in joiners:
        assert raw.request({"type": "join", "room": "general"})["type"] == "joined"
    took_ms = (time.monotonic() - started) * 1000
    assert alice.request({"type": "msg", "room": "general", "text": "after", "id": "a"})["type"] == "ack"

    frames = frames_until(spy, STORM + 1, multipart=True)
    events = [env for body in frames for env in p.decode_many(body)]
    assert [(e["type"], e.get("name") or e.get("from"), e["seq"]) for e in events] == [
        *(("presence", f"j{i}", top + 1 + i) for i in range(STORM)),
        ("msg", "alice", top + 1 + STORM),
    ]
    # One frame per join without the hold (41 here, where the joins take some 50 ms in
    # all); with it, the first join, one frame per 50 ms the joins took, the message.
    most = 3 + int(took_ms // PRESENCE_HOLD_MS)
    assert len(frames) <= most, f"{len(frames)} frames for {STORM} joins in {took_ms:.0f} ms and a message"


def test_presence_hold_lets_a_lone_join_go_and_holds_a_storm() -> None:
    hold = PresenceHold(hold_ms=50)
    enc = p.Encoder()

    def join(name: str, room: str = "r") -> bytes:
        return enc(p.presence_event(room, 1, 0, name, "join"))

    msg = enc(p.msg_event("r", 9, 0, "alice", "s", "hi", "m1", False))
    rooms = {"r": [join("a")]}
    hold.pass_on(rooms, now=1000)
    assert rooms == {"r": [join("a")]}, "a lone join goes at once"
    rooms = {"r": [join("b")], "other": [join("x", "other")]}
    hold.pass_on(rooms, now=1010)
    assert rooms == {"other": [join("x", "other")]}, "the next within 50 ms waits; another room's does not"
    assert hold.due == 1050
    rooms = {"r": [join("c")]}
    hold.pass_on(rooms, now=1049)
    assert rooms == {}
    rooms = {}
    hold.pass_on(rooms, now=1050)
    assert rooms == {"r": [join("b"), join("c")]}, "at its time, what waited goes, in order, as one"
    assert hold.due == math.inf
    rooms = {"r": [join("d")]}
    hold.pass_on(rooms, now=1060)
    assert rooms == {}, "still a storm: 50 ms from the last send"
    rooms = {"r": [msg]}
    hold.pass_on(rooms, now=1061)
    assert rooms == {"r": [join("d"), msg]}, "a message goes at once, after what its room held"
    rooms = {"r": [join("e"), msg]}
    hold.pass_on(rooms, now=1062)
    assert rooms == {"r": [join("e"), msg]}, "a pass with a message holds nothing of its room"
    rooms = {"r": [join("f")]}
    hold.pass_on(rooms, now=1070)
    assert rooms == {}
    hold.pass_on(rooms, now=1071, release_all=True)
    assert rooms == {"r": [join("f")]}, "stopping gives back everything"
    hold.forget(now=1200)
    rooms = {"r": [join("g")]}
    hold.pass_on(rooms, now=1201)
    assert rooms == {"r": [join("g")]}, "after a quiet spell, a join goes at once again"


def test_presence_hold_keeps_each_rooms_time() -> None:
    """Rooms are held and let go each on its own time; a leave is presence too; forget()
    keeps the times of held rooms."""
    hold = PresenceHold(hold_ms=50)
    enc = p.Encoder()

    def ev(room: str, name: str, event: str = "join") -> bytes:
        return enc(p.presence_event(room, 1, 0, name, event))

    rooms = {"a": [ev("a", "x")], "b": [ev("b", "y", "leave")]}
    hold.pass_on(rooms, now=0)
    assert set(rooms) == {"a", "b"}
    rooms = {"a": [ev("a", "x2")]}
    hold.pass_on(rooms, now=10)  # a: held until 50
    assert rooms == {}
    rooms = {"b": [ev("b", "y2", "leave")]}
    hold.pass_on(rooms, now=30)  # b: held until 50 as well (sent at 0)
    assert rooms == {} and hold.due == 50
    hold.forget(now=45)
    rooms = {}
    hold.pass_on(rooms, now=50)
    assert rooms == {"a": [ev("a", "x2")], "b": [ev("b", "y2", "leave")]}
    rooms = {"a": [ev("a", "x3")]}
    hold.pass_on(rooms, now=60)  # a: sent at 50, held until 100
    rooms2 = {"b": [ev("b", "y3")]}
    hold.pass_on(rooms2, now=80)  # b: sent at 50, held until 100
    assert rooms == {} and rooms2 == {} and hold.due == 100
    rooms = {"c": [ev("c", "z")]}
    hold.pass_on(rooms, now=99)
    assert rooms == {"c": [ev("c", "z")]}, "a room with no recent presence is not held by the others'"
    rooms = {}
    hold.pass_on(rooms, now=100)
    assert rooms == {"a": [ev("a", "x3")], "b": [ev("b", "y3")]}
    # Different times: each room is let go at its own.
    rooms = {"b": [ev("b", "y4")]}
    hold.pass_on(rooms, now=160)  # b: quiet since 100, goes; sent at 160
    assert rooms == {"b": [ev("b", "y4")]}
    hold.pass_on({"a": [ev("a", "x4")]}, now=170)  # a: quiet since 100, goes; sent at 170
    hold.pass_on({"b": [ev("b", "y5")]}, now=175)  # b: sent at 160, held until 210
    hold.pass_on({"a": [ev("a", "x5")]}, now=180)  # a: sent at 170, held until 220
    assert hold.due == 210
    hold.forget(now=215)  # held rooms keep their times
    rooms = {}
    hold.pass_on(rooms, now=215)
    assert rooms == {"b": [ev("b", "y5")]}, "b's time is up, not a's"
    assert hold.due == 220
    rooms = {}
    hold.pass_on(rooms, now=220)
    assert rooms == {"a": [ev("a", "x5")]}


@pytest.mark.timeout(60)
def test_presence_held_when_the_broker_stops_still_goes_out(
    stoppable: BrokerProcess, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A join held back (just after another) when SIGTERM comes is not lost with the stop.
    (The loop's last wait ends when the hold does, so it goes out from the loop; the
    release at the end of Broker.run is for a loop that ends by an exception.)"""
    alice = joined(ctx, stoppable, "alice")
    spy, top = live_spy(ctx, stoppable, alice)
    first, second = Raw(ctx, stoppable.port), Raw(ctx, stoppable.port)
    for name, raw in (("j0", first), ("j1", second)):
        assert raw.request(p.hello(name))["type"] == "welcome"
    for raw in (first, second):
        assert raw.request({"type": "join", "room": "general"})["type"] == "joined"
    assert stoppable.proc is not None
    stoppable.proc.send_signal(signal.SIGTERM)  # j1's join is held for 50 ms from j0's
    events = [env for body in frames_until(spy, 2, multipart=True) for env in p.decode_many(body)]
    assert [(e["name"], e["seq"]) for e in events] == [("j0", top + 1), ("j1", top + 2)]
    assert stoppable.proc.wait(10) == 0
