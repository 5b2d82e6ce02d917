"""End to end through a real broker with real client-library clients."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import client.lib as client_lib
from client.lib import BrokerUnreachable, Client, Event, RequestError, ZchatError, _Room
from tests.conftest import HOST, BrokerProcess, Raw, RunningBroker, killed_session, wait_for
from zchat import protocol as p

MakeClient = Callable[..., Client]
ConnectTo = Callable[..., Client]


def collect(client: Client, count: int, timeout: float = 5.0, kind: str | None = None) -> list[Event]:
    """The next ``count`` events (of ``kind``, if given), or fail at the deadline."""
    got: list[Event] = []

    def enough() -> bool:
        client.pump(0.05)
        got.extend(e for e in client.drain_events() if kind is None or e.type == kind)
        return len(got) >= count

    wait_for(enough, timeout, interval=0)
    return got


def stop_hearing(listener: Client, speaker: Client, room: str, via: str) -> None:
    """Unsubscribe ``listener``'s SUB from ``room`` (as a SUB queue that overflowed) and know
    it is applied: unsubscribing is asynchronous, but joining ``via`` subscribes after it on
    the same connection, so once an event of ``via`` (the speaker is in it) arrives, the
    broker has applied both."""
    listener._sub.unsubscribe(p.room_topic(room))
    listener.join(via)
    speaker.send_wait(via, "sentinel")
    assert [e.text for e in collect(listener, 1, kind="msg")] == ["sentinel"]


def drop_first(client: Client, kind: str, room: str) -> list[dict[str, Any]]:
    """Make ``client`` lose the first reply of type ``kind`` about ``room`` on its way
    (as the broker drops what a full queue to a client cannot take). Returns the list
    the dropped reply goes into."""
    dropped: list[dict[str, Any]] = []
    dispatch = client._dispatch

    def lossy(env: dict[str, Any]) -> None:
        if env.get("type") == kind and env.get("room") == room and not dropped:
            dropped.append(env)
            return
        dispatch(env)

    client._dispatch = lossy  # type: ignore[method-assign]
    return dropped


def deaf_to_g(connect_to: Callable[..., Client], broker: RunningBroker) -> tuple[Client, Client]:
    """Alice and bob in #g (bob in #h too), alice's SUB no longer hearing #g (see stop_hearing)."""
    alice, bob = connect_to(broker, "alice"), connect_to(broker, "bob")
    bob.join("g")
    bob.join("h")
    alice.join("g")
    bob.send_wait("g", "hello")
    assert [e.text for e in collect(alice, 1, kind="msg")] == ["hello"]
    stop_hearing(alice, bob, "g", via="h")
    return alice, bob


def shows_and_stores_it_once(alice: Client, bob: Client) -> None:
    """Alice settles (connected, nothing unacknowledged) having shown "only once" and the
    8 "meanwhile" lines after it, each once; the room's history holds it once."""
    got: list[Event] = []

    def settled() -> bool:
        alice.pump(0.05)
        got.extend(e for e in alice.drain_events() if e.type == "msg" and e.room == "g")
        return alice.state == "connected" and alice.unacked == 0 and len(got) >= 9

    wait_for(settled, 15, interval=0)
    assert [e.text for e in got] == ["only once"] + [f"meanwhile {i}" for i in range(8)]
    events, _ = bob.history("g", 0, 100)
    assert [e.text for e in events if e.type == "msg"].count("only once") == 1


def test_two_clients_talk_and_sender_sees_own_message_once(make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("general")
    bob.join("general")
    alice.send("general", "hello bob")
    [seen_by_bob] = collect(bob, 1, kind="msg")
    assert (seen_by_bob.name, seen_by_bob.text, seen_by_bob.room) == ("alice", "hello bob", "general")
    assert not seen_by_bob.own
    # Alice sees hers exactly once (from the ack), never again from the SUB stream.
    mine = collect(alice, 1, kind="msg")
    assert mine[0].own and mine[0].text == "hello bob" and mine[0].seq == seen_by_bob.seq
    bob.send_wait("general", "after")  # something later, so alice's stream has moved on
    later = collect(alice, 1, kind="msg")
    assert [e.text for e in later] == ["after"]


def test_presence_and_who(make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    assert alice.join("#Lobby") == ["alice"]
    assert bob.join("lobby") == ["alice", "bob"]
    [joined] = collect(alice, 1, kind="presence")
    assert (joined.name, joined.event, joined.room) == ("bob", "join", "lobby")
    assert alice.who("lobby") == ["alice", "bob"]
    bob.leave("lobby")
    [left] = collect(alice, 1, kind="presence")
    assert (left.name, left.event) == ("bob", "leave")
    assert alice.who("lobby") == ["alice"]
    rooms = {r["room"]: r for r in alice.rooms()}
    assert rooms["lobby"]["members"] == 1 and rooms["lobby"]["seq"] == joined.seq + 1


def test_seq_is_contiguous_across_senders(make_client: MakeClient) -> None:
    alice, bob, carol = make_client("alice"), make_client("bob"), make_client("carol")
    for c in (alice, bob, carol):
        c.join("room")
    for i in range(50):
        alice.send("room", f"a{i}")
        bob.send("room", f"b{i}")
    events = collect(carol, 100, kind="msg", timeout=10)
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 100))
    assert [e.text for e in events if e.name == "alice"] == [f"a{i}" for i in range(50)]
    assert [e.text for e in events if e.name == "bob"] == [f"b{i}" for i in range(50)]


def test_late_joiner_gets_backlog_once_in_order(make_client: MakeClient) -> None:
    alice = make_client("alice")
    alice.join("general")
    for i in range(30):
        alice.send_wait("general", f"m{i}")
    late = make_client("late")
    late.join("general", backlog=10)
    alice.send_wait("general", "live")
    # seq 1 is alice's join, m0..m29 are 2..31, late's join is 32: the ten events
    # before that join are m20..m29 (the join, its own, is not one of them).
    events = collect(late, 11, kind="msg")
    assert [e.text for e in events] == [f"m{i}" for i in range(20, 30)] + ["live"]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    assert all(e.backlog for e in events[:-1]) and not events[-1].backlog
    late.leave("general")
    late.drain_events()
    # So with a backlog of one: the one event before the join, then the join.
    alice.send_wait("general", "last")
    late.join("general", backlog=1)
    shown = late.drain_events()
    assert [(e.type, e.text or e.event, e.backlog) for e in shown] == [
        ("msg", "last", True),
        ("presence", "join", False),
    ]


def test_next_event_without_a_wait_reads_what_has_arrived(make_client: MakeClient) -> None:
    """A bot that polls, next_event(0) in a loop of its own (or events(0)), heard nothing:
    with no time left the sockets were never read, nor a ping sent, so its session
    even expired."""
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("general")
    bob.join("general")
    bob.send_wait("general", "one")
    got: list[Event] = []

    def polled() -> bool:
        event = alice.next_event(0)
        if event is not None:
            got.append(event)
        return any(e.text == "one" for e in got)

    wait_for(polled, 5, what=lambda: [(e.type, e.text) for e in got])
    bob.send_wait("general", "two")
    wait_for(lambda: any(e.text == "two" for e in alice.events(0)), 5)


@pytest.mark.timeout(30)
def test_a_bot_that_idles_between_its_messages_keeps_its_session(
    short_heartbeat_broker: RunningBroker, connect_to: ConnectTo
) -> None:
    """idle(s), not time.sleep(s): with a sleep longer than 3 heartbeats the session ended
    (a leave published) and what was sent next waited for the bot's next pump."""
    b = short_heartbeat_broker
    bot, watcher = connect_to(b, "bot"), connect_to(b, "watcher")
    bot.join("general")
    watcher.join("general")
    sent = bot.send("general", "one")
    bot.idle(1.5)  # 7 heartbeats of 200 ms: expiry is 600 ms
    assert bot.unacked == 0 and any(e.own and e.id == sent for e in bot.drain_events())
    bot.send("general", "two")
    # Acknowledged while it idles (within 0.5 s here, but a loaded machine may take
    # longer); a session that ended meanwhile shows in the history below as a leave.
    wait_for(lambda: bot.idle(0.05) is None and bot.unacked == 0, 5)
    events, _ = watcher.history("general")
    said = [(e.type, e.event or e.text) for e in events]
    assert [s for s, e in zip(said, events, strict=True) if e.name == "bot"] == [
        ("presence", "join"),
        ("msg", "one"),
        ("msg", "two"),
    ]
    # The watcher, which pumped nothing meanwhile, is what a sleeping bot was.
    assert ("presence", "leave") in [s for s, e in zip(said, events, strict=True) if e.name == "watcher"]


def test_pump_waits_on_a_file_descriptor_of_ours_given_twice(make_client: MakeClient) -> None:
    """pump(timeout, fds) returns the ready ones; an fd listed twice (stdin and a copy of
    its number from another part of a program) raised KeyError, after the poll."""
    alice = make_client("alice")
    r, w = os.pipe()
    try:
        assert alice.pump(0, [r, r]) == []
        os.write(w, b"x")
        assert alice.pump(1, [r, r]) == [r]
        assert alice.pump(0) == [] and alice.state == "connected"
    finally:
        os.close(r)
        os.close(w)


def test_a_resumed_session_that_joins_its_room_again_gets_the_last_n_events(broker: RunningBroker) -> None:
    """Its session was in the room already: the join publishes nothing, and the backlog
    is the room's last N events (none of them dropped for a join of its own)."""
    token = killed_session(broker.port, broker.pub_port, "bot", "general")
    with Client("alice", HOST, broker.port, broker.pub_port) as alice:
        alice.join("general")
        for i in range(6):
            alice.send_wait("general", f"m{i}")
        with Client("bot", HOST, broker.port, broker.pub_port, resume=token) as again:
            again.join("general", backlog=3)
            shown = again.drain_events()
            assert [e.text for e in shown if e.type != "status"] == ["m3", "m4", "m5"]
            assert all(e.backlog for e in shown if e.type != "status")


def test_backlog_larger_than_one_history_page(make_client: MakeClient) -> None:
    alice = make_client("alice")
    alice.join("big")
    for i in range(700):
        alice.send("big", f"m{i}")
    wait_for(lambda: alice.pump(0.05) is not None and alice.unacked == 0, timeout=20)
    late = make_client("late")
    late.join("big", backlog=1000)
    events = [e for e in late.drain_events() if e.type == "msg"]
    assert [e.text for e in events] == [f"m{i}" for i in range(700)]
    # history() too: a reply holds 500 events at most, and a longer read is paged (it
    # returned the first 500, without a word).
    read, top = late.history("big", after=0, limit=1000)
    assert [e.seq for e in read] == list(range(1, top + 1)) and top == 702  # (alice's and late's joins)
    read, _ = late.history("big", after=100, limit=550)
    assert [e.seq for e in read] == list(range(101, 651))


def test_dm_reaches_only_the_recipient(make_client: MakeClient) -> None:
    alice, bob, eve = make_client("alice"), make_client("bob"), make_client("eve")
    for c in (alice, bob, eve):
        c.join("general")
    ack = alice.dm_wait("bob", "psst")
    assert ack.own and ack.to == "bob"
    [dm] = collect(bob, 1, kind="dm")
    assert (dm.name, dm.to, dm.text) == ("alice", "bob", "psst")
    eve.send_wait("general", "marker")
    collect(bob, 1, kind="msg")
    assert not [e for e in eve.drain_events() if e.type == "dm"]


def test_dm_to_nobody_is_refused(make_client: MakeClient) -> None:
    alice = make_client("alice")
    with pytest.raises(RequestError) as err:
        alice.dm_wait("ghost", "hello?")
    assert err.value.code == "no_such_user"


def test_name_taken_and_freed_by_bye(broker: RunningBroker, make_client: MakeClient) -> None:
    make_client("alice").close()
    # bye frees the name at once
    again = make_client("alice")
    with pytest.raises(RequestError) as err:
        make_client("alice")
    assert err.value.code == "name_taken"
    assert again.who("general") == []


def test_nobody_can_be_bob_beside_bob_and_a_dm_finds_him_in_any_case(make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    with pytest.raises(RequestError) as err:
        make_client("Bob")
    assert err.value.code == "name_taken"
    assert "'bob' is in use, and names that differ only in case are one name" in err.value.message
    alice.dm_wait("BOB", "psst")
    [dm] = collect(bob, 1, kind="dm")
    assert (dm.name, dm.to, dm.text) == ("alice", "bob", "psst")


def test_too_long_text_refused_locally_and_next_works(make_client: MakeClient) -> None:
    alice = make_client("alice")
    alice.join("general")
    with pytest.raises(RequestError) as err:
        alice.send("general", "x" * 4001)
    assert err.value.code == "too_large"
    assert alice.send_wait("general", "x" * 4000).seq is not None


def test_history_after_and_limit(make_client: MakeClient) -> None:
    alice = make_client("alice")
    alice.join("h")  # seq 1 is the join
    for i in range(5):
        alice.send_wait("h", f"m{i}")
    events, top = alice.history("h", after=2, limit=2)
    assert top == 6
    assert [(e.seq, e.text) for e in events] == [(3, "m1"), (4, "m2")]


def test_expired_session_publishes_leave(short_heartbeat_broker: RunningBroker, connect_to: ConnectTo) -> None:
    b = short_heartbeat_broker
    watcher, silent = connect_to(b, "watcher"), connect_to(b, "silent")
    watcher.join("general")
    silent.join("general")
    # The silent client stops pumping (so it stops pinging); the watcher keeps going.
    # Its join and its leave may come in one pump, so read on until the leave.
    presences: list[Event] = []
    while not any(e.event == "leave" for e in presences):
        presences += collect(watcher, 1, kind="presence", timeout=5)
    assert [(e.name, e.event) for e in presences] == [("silent", "join"), ("silent", "leave")]
    assert watcher.who("general") == ["watcher"]


def test_a_request_of_several_frames_keeps_its_session_alive(tmp_path: Path) -> None:
    """Every request of a session's connection proves its client is there, refused or not
    (docs/protocol.md): one of two frames, which the loop refuses before the core decodes
    anything, did not, and the session expired under a client that kept talking."""
    broker = RunningBroker(tmp_path / "data", heartbeat_ms=300).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        client = Raw(ctx, broker.port)
        assert client.request(p.hello("alice"))["type"] == "welcome"
        # Twice the expiry (3 heartbeats, 0.9 s) of nothing but such requests.
        until = time.monotonic() + 1.8
        while time.monotonic() < until:
            client.send_frames([p.encode({"type": "ping", "id": "p"}), b"second frame"])
            assert client.recv()["message"] == "expected exactly one frame"
            time.sleep(0.1)  # (a pace, not a wait: at most 1/3 of a heartbeat between them)
        assert client.request({"type": "ping", "id": "last"})["type"] == "pong"
    finally:
        ctx.destroy(linger=0)
        broker.stop()


def test_gap_is_filled_from_history(make_client: MakeClient) -> None:
    """Events lost on the SUB stream (here: dropped by hand) are fetched and shown in order."""
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("g")
    bob.join("g")
    collect(alice, 1, kind="presence")
    bob.send_wait("g", "one")
    collect(alice, 1, kind="msg")
    # Simulate loss: unsubscribe alice's SUB, let two messages pass, resubscribe.
    topic = b"g\x00"
    alice._sub.unsubscribe(topic)
    bob.send_wait("g", "two")
    bob.send_wait("g", "three")
    alice._sub.subscribe(topic)
    wait_for(lambda: alice.pump(0.05) is not None and alice.who("g") == ["alice", "bob"])
    bob.send_wait("g", "four")
    events = collect(alice, 3, kind="msg")
    assert [e.text for e in events] == ["two", "three", "four"]


@pytest.mark.parametrize("alice_talks", [False, True], ids=["quiet", "talking-elsewhere"])
def test_lost_tail_is_fetched_without_a_later_event(
    short_heartbeat_broker: RunningBroker, alice_talks: bool, connect_to: ConnectTo
) -> None:
    """Events lost at the end of a room's stream show no gap; the pong's room seqs do,
    also while alice keeps sending to another room (her pings go on meanwhile)."""
    b = short_heartbeat_broker
    alice, bob = connect_to(b, "alice"), connect_to(b, "bob")
    alice.join("g")
    bob.join("g")
    bob.join("h")
    collect(alice, 1, kind="presence")
    bob.send_wait("g", "one")
    (one,) = collect(alice, 1, kind="msg")
    # As a SUB queue that overflowed: the room's last two events never arrive.
    stop_hearing(alice, bob, "g", via="h")
    fetched: list[tuple[str, int]] = []
    fetch = alice._fetch

    def spy(room: str, state: Any, after: int, limit: int) -> None:
        fetched.append((room, after))
        fetch(room, state, after, limit)

    alice._fetch = spy  # type: ignore[method-assign]
    bob.send_wait("g", "two")
    bob.send_wait("g", "three")
    alice._sub.subscribe(b"g\x00")
    # Nothing is published after them; bob keeps his session alive meanwhile.
    got: list[Event] = []
    said = [0.0]

    def tail_shown() -> bool:
        alice.pump(0.05)
        bob.pump(0)
        if alice_talks and time.monotonic() - said[0] >= 0.1:
            # Twice a heartbeat (0.2 s).
            alice.send("h", "busy")
            said[0] = time.monotonic()
        got.extend(e for e in alice.drain_events() if e.type == "msg" and e.room == "g")
        return len(got) >= 2

    wait_for(tail_shown, 5, interval=0)
    assert [e.text for e in got] == ["two", "three"]
    assert fetched[0] == ("g", one.seq), "the tail must come from history: SUB never had it"


@pytest.mark.timeout(30)
def test_a_history_reply_lost_on_the_way_is_asked_for_again(
    short_heartbeat_broker: RunningBroker, connect_to: ConnectTo
) -> None:
    """The reply that fills a gap is dropped (as the broker drops what a full queue to
    us cannot take): the room's later events wait on it, so it is asked for again."""
    b = short_heartbeat_broker
    alice, bob = connect_to(b, "alice"), connect_to(b, "bob")
    for room in ("g", "h", "k"):
        bob.join(room)
    alice.join("g")
    bob.send_wait("g", "one")
    assert [e.text for e in collect(alice, 1, kind="msg")] == ["one"]
    stop_hearing(alice, bob, "g", via="h")  # SUB loses two and three
    dropped = drop_first(alice, "history", "g")
    bob.send_wait("g", "two")
    bob.send_wait("g", "three")
    alice._sub.subscribe(b"g\x00")
    alice.join("k")
    bob.send_wait("k", "sentinel")
    bob.send_wait("g", "four")
    got: list[Event] = []

    def all_shown() -> bool:
        alice.pump(0.05)
        bob.pump(0)
        got.extend(e for e in alice.drain_events() if e.type == "msg" and e.room == "g")
        return len(got) >= 3

    wait_for(all_shown, 20, interval=0)
    assert dropped, "a history reply was dropped"
    assert [e.text for e in got] == ["two", "three", "four"]


@pytest.mark.timeout(30)
def test_a_message_whose_ack_was_lost_is_not_stored_twice_after_a_long_absence(
    broker: RunningBroker, connect_to: ConnectTo
) -> None:
    """Alice's message is stored but its ack lost with her connection; by the time she
    is back the broker's resend window has moved past it (here 5 messages, normally
    100 000). Her rejoin's catch-up brings the original, which counts as its ack: it
    is not resent, so nobody sees it twice."""
    broker.broker.core._acked.size = 5  # before any message: nothing to evict yet
    # Alice's SUB misses the room from here; she sends, and her connection is cut
    # before she reads the ack (she does not pump meanwhile).
    alice, bob = deaf_to_g(connect_to, broker)
    alice.send("g", "only once")
    shown = collect(bob, 1, kind="msg")
    assert [e.text for e in shown] == ["only once"]
    for i in range(8):
        bob.send_wait("g", f"meanwhile {i}")
    assert alice.unacked == 1
    alice._lost("test: connection cut")
    shows_and_stores_it_once(alice, bob)


@pytest.mark.timeout(30)
def test_a_message_whose_ack_was_lost_is_not_resent_twice_on_a_live_connection(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, connect_to: ConnectTo
) -> None:
    """Alice's message is stored, its ack lost on the way, her SUB misses the room, and
    she stalls past her resend timeout while the broker's resend window (here 5
    messages) moves past it. Before resending she asks where the room stands and
    catches up: the original is there, and counts as its ack. Nobody sees it twice."""
    broker.broker.core._acked.size = 5  # before any message: nothing to evict yet
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 1.0))
    alice, bob = deaf_to_g(connect_to, broker)
    dropped = drop_first(alice, "ack", "g")
    alice.send("g", "only once")
    assert [e.text for e in collect(bob, 1, kind="msg")] == ["only once"]

    def ack_lost() -> bool:
        alice.pump(0.05)
        return bool(dropped)

    wait_for(ack_lost, 5, interval=0)
    for i in range(8):
        bob.send_wait("g", f"meanwhile {i}")
    time.sleep(1.2)  # alice stalls (not pumping) past her resend timeout
    assert alice.unacked == 1
    shows_and_stores_it_once(alice, bob)


@pytest.mark.timeout(30)
def test_a_lost_message_is_resent_once_caught_up_to_where_the_room_stood_after_it(
    short_heartbeat_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, connect_to: ConnectTo
) -> None:
    """Alice's message never reaches the broker. Before resending it she catches up to
    where the first pong after it put the room; every later pong shows the room far
    further on (as in a room busier than she can follow): waiting for those, the
    message would never go."""
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 1.0))
    b = short_heartbeat_broker
    alice, bob = deaf_to_g(connect_to, b)  # she learns of #g's events from history only
    lost: list[dict[str, Any]] = []
    later_pings: set[str] = set()
    covering: list[dict[str, Any]] = []  # pongs to pings sent after the message
    send, dispatch = alice._send, alice._dispatch

    def lossy_send(env: dict[str, Any]) -> None:
        if env["type"] == "msg" and not lost:
            lost.append(env)
            return
        if env["type"] == "ping" and lost:
            later_pings.add(env["id"])
        send(env)

    def moving(env: dict[str, Any]) -> None:
        if env.get("type") == "pong" and env.get("id") in later_pings:
            covering.append(env)
            if len(covering) > 1:
                env["seqs"]["g"] += 1000 * len(covering)  # the room, ever further on
        dispatch(env)

    alice._send = lossy_send  # type: ignore[method-assign]
    alice._dispatch = moving  # type: ignore[method-assign]
    alice.send("g", "lost once")
    for i in range(3):
        bob.send_wait("g", f"after {i}")

    def resent() -> bool:
        alice.pump(0.05)
        bob.pump(0)
        return alice.unacked == 0

    wait_for(resent, 10, interval=0)
    assert len(covering) >= 2, "pongs after the first showed the room further on"
    events, _ = bob.history("g", 0, 100)
    assert [e.text for e in events if e.type == "msg"] == ["hello", "after 0", "after 1", "after 2", "lost once"]


@pytest.mark.timeout(30)
def test_a_message_whose_ack_was_lost_before_leaving_is_acknowledged_by_the_rejoin_backlog(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, connect_to: ConnectTo
) -> None:
    """Alice leaves a room with a message whose ack was lost, and joins it again with a
    backlog, after the broker's resend window (here 5 messages) has passed it: the
    original in the backlog is its ack. Resent, it would be stored twice."""
    broker.broker.core._acked.size = 5  # before any message: nothing to evict yet
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 1.0))
    # A leave now waits for the room's acks (its resend would bring this one): here the
    # room is let go with the message in flight, as a rejoin refused after a reconnect does.
    monkeypatch.setattr(Client, "_settle_room", lambda self, room: None)
    alice, bob = deaf_to_g(connect_to, broker)
    dropped = drop_first(alice, "ack", "g")
    alice.send("g", "only once")

    def ack_lost() -> bool:
        alice.pump(0.05)
        return bool(dropped)

    wait_for(ack_lost, 5, interval=0)
    for i in range(8):
        bob.send_wait("g", f"meanwhile {i}")
    alice.leave("g")
    alice.join("g", backlog=50)
    assert alice.unacked == 0
    mine = [e for e in alice.drain_events() if e.type == "msg" and e.text == "only once"]
    assert len(mine) == 1 and mine[0].own and mine[0].backlog
    events, _ = bob.history("g", 0, 100)
    assert [e.text for e in events if e.type == "msg"].count("only once") == 1


def test_joining_a_room_again_shows_only_what_happened_while_away(make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("qq")
    bob.join("qq")
    alice.send_wait("qq", "one")
    collect(alice, 1, kind="presence")  # bob's join (her own line went to send_wait)
    alice.leave("qq")
    bob.send_wait("qq", "while away")
    alice.join("qq", backlog=50)
    shown = alice.drain_events()
    assert [(e.type, e.name, e.event or e.text) for e in shown] == [
        ("presence", "alice", "leave"),
        ("msg", "bob", "while away"),
        ("presence", "alice", "join"),
    ]
    # Her leave came live, unless the `left` reply overtook it (it travels the other
    # socket) and the room was forgotten first: then it is the backlog's first event.
    # Her join is the moment she joined, not from before it.
    assert [e.backlog for e in shown][1:] == [True, False]


def test_a_join_whose_rejoin_is_refused_mid_backlog_raises(make_client: MakeClient) -> None:
    """The connection is lost while ``join()`` reads the backlog, and the broker refuses
    the rejoin for good (here a ``limit_reached`` put in place of its ``joined``):
    alice is not in the room, so ``join()`` says so instead of returning members."""
    alice, bob = make_client("alice"), make_client("bob")
    bob.join("g")
    for i in range(3):
        bob.send_wait("g", f"m{i}")
    cut: list[str] = []
    dispatch = alice._dispatch

    def faulty(env: dict[str, Any]) -> None:
        if env.get("type") == "history" and not cut:
            cut.append("history")
            alice._lost("test: connection cut mid-backlog")  # the reply is lost with it
            return
        if env.get("type") == "joined" and cut == ["history"]:
            cut.append("rejoin")
            env = p.error(p.ErrorCode.LIMIT_REACHED, "room is full", env.get("id"))
        dispatch(env)

    alice._dispatch = faulty  # type: ignore[method-assign]
    with pytest.raises(RequestError) as refused:
        alice.join("g", backlog=10)
    assert cut == ["history", "rejoin"]
    assert refused.value.code == p.ErrorCode.NOT_JOINED
    assert "g" not in alice.rooms_joined
    errors = [e for e in alice.drain_events() if e.type == "error"]
    assert [e.code for e in errors] == [p.ErrorCode.LIMIT_REACHED]


def test_a_message_stored_twice_shows_once(
    broker: RunningBroker, ctx: zmq.Context[zmq.Socket[bytes]], connect_to: ConnectTo
) -> None:
    """A resend that comes after the broker's resend detection forgot the first copy
    (here after 5 messages, normally 100 000) is stored again; readers show it once."""
    broker.broker.core._acked.size = 5  # before any message: nothing to evict yet
    bob = Client("bob", "127.0.0.1", broker.port, broker.pub_port)
    author = Raw(ctx, broker.port)
    try:
        bob.connect()
        bob.join("g")
        assert author.request(p.hello("alice"))["type"] == "welcome"
        assert author.request({"type": "join", "room": "g"})["type"] == "joined"
        texts = ["resent", *(f"other {i}" for i in range(8)), "resent"]
        ids = ["r1", *(f"o{i}" for i in range(8)), "r1"]
        seqs = [
            author.request({"type": "msg", "room": "g", "text": t, "id": i})["seq"]
            for t, i in zip(texts, ids, strict=True)
        ]
        assert seqs[-1] > seqs[0], "the broker stored the resend again"
        shown = [e.text for e in collect(bob, 9, kind="msg")]
        bob.send_wait("g", "after")  # everything before it has been shown by now
        shown += [e.text for e in bob.drain_events() if e.type == "msg"]
        assert shown == texts[:-1]
        # So does the history a join with ``after`` asks for (by one who saw them, or not).
        bob.leave("g")
        expected = [*texts[:-1], "after"]
        for reader in (bob, connect_to(broker, "carol")):
            reader.join("g", after=0)
            backlog = [e.text for e in until_own_join(reader, "g") if e.type == "msg"]
            assert backlog == expected
            expected.append(reader.send_wait("g", f"live from {reader.name}").text)
            assert "resent" not in [e.text for e in reader.drain_events()]
        # And a plain join's backlog.
        dave = connect_to(broker, "dave")
        dave.join("g", backlog=50)
        assert [e.text for e in dave.drain_events() if e.type == "msg"] == expected
    finally:
        author.sock.close()
        bob.close(0.2)


def test_own_message_waits_for_earlier_events_of_its_room(make_client: MakeClient) -> None:
    """Under pipelined traffic the ack of our message can be read before the SUB events
    that precede it: it is shown in its seq place, after them, once."""
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("r")
    bob.join("r")
    collect(alice, 1, kind="presence")  # bob's join: alice's SUB is live (no more history probes)
    for i in range(5):
        bob.send_wait("r", f"b{i}")  # published; waiting, unread, on alice's SUB
    alice.send("r", "mine")
    # Its ack is in too, unread: the next pump reads the DEALER (the ack) before the SUB.
    wait_for(lambda: alice._dealer.poll(0) and alice._sub.poll(0))
    events = collect(alice, 6, kind="msg")
    assert [e.text for e in events] == ["b0", "b1", "b2", "b3", "b4", "mine"]
    assert [e.own for e in events] == [False] * 5 + [True]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    bob.send_wait("r", "later")  # the SUB copy of "mine" has passed by now: it is not shown again
    assert [e.text for e in collect(alice, 1, kind="msg")] == ["later"]


def test_own_lines_waiting_for_earlier_events_are_released_on_request(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program that stops (a signal in pipe mode) asks for the own messages that are
    acknowledged but wait for an earlier event of their room: stored, they must be shown."""
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("general")
    bob.join("general")
    collect(alice, 1, kind="presence")  # bob's join: alice's SUB is live
    alice._sub.unsubscribe(p.room_topic("general"))  # it misses bob's next line...
    monkeypatch.setattr(alice, "_fetch", lambda *args, **kwargs: None)  # ...and nothing fetches it
    bob.send_wait("general", "bob's line")
    alice.send("general", "alice's line")
    wait_for(lambda: bool(alice.pump(0.02) or True) and alice.unacked == 0)
    assert alice.own_pending == 1
    assert not [e for e in alice.drain_events() if e.type == "msg"]
    alice.release_own()
    assert alice.own_pending == 0
    assert [(e.text, e.own) for e in alice.drain_events() if e.type == "msg"] == [("alice's line", True)]


def test_history_page_overtaken_by_sub_skips_nothing(make_client: MakeClient) -> None:
    """A history reply whose events SUB has already delivered says nothing about the
    events after them: they must not be skipped as if the store had lost them."""
    alice, bob = make_client("alice"), make_client("bob")
    alice.join("r")
    bob.join("r")
    for i in range(5):
        bob.send_wait("r", f"b{i}")
    collect(alice, 5, kind="msg")
    state = alice._rooms["r"]
    last = state.last
    assert last is not None
    # The reply to a fetch "after last - 3" arrives once SUB has delivered those
    # events, while the room has moved on by three more (still on their way).
    old = [
        {"type": "msg", "room": "r", "seq": s, "ts": 1, "from": "bob", "sender": "x", "text": "old", "id": f"o{s}"}
        for s in range(last - 2, last + 1)
    ]
    state.fetching = True
    alice._on_fetched("r", {"type": "history", "room": "r", "seq": last + 3, "messages": old})
    assert state.last == last, "events after the page were skipped"
    for i in range(3):
        bob.send_wait("r", f"c{i}")
    assert [e.text for e in collect(alice, 3, kind="msg")] == ["c0", "c1", "c2"]


def test_empty_history_reply_skips_only_when_confirmed(make_client: MakeClient) -> None:
    """An empty reply while the room is ahead means the store lost those events: skipped
    (rather than stalling the room), but only once a second reply says the same."""
    alice = make_client("alice")
    alice.join("r")
    state = alice._rooms["r"]
    last = state.last
    assert last is not None
    empty = {"type": "history", "room": "r", "seq": last + 3, "messages": []}
    state.fetching, state.fetch_after = True, last
    alice._on_fetched("r", empty)
    assert state.last == last and state.refetch_at > 0, "asked again before skipping"
    state.fetching, state.fetch_after = True, last
    alice._on_fetched("r", dict(empty))
    assert state.last == last + 3
    said = [e for e in alice.drain_events() if e.type == "status" and e.event == "skipped"]
    assert len(said) == 1 and said[0].seq == last + 3 and "missing from the broker's store" in (said[0].text or "")


def test_a_retention_skip_passes_over_only_what_is_gone(make_client: MakeClient) -> None:
    """A reply starting past ``after + 1`` (older events deleted by the broker's retention)
    moves the room on, but not over the events SUB has already brought, nor over an own
    acknowledged message waiting its turn among them."""
    alice = make_client("alice")
    alice.join("r")
    state = alice._rooms["r"]
    last = state.last
    assert last is not None
    alice.drain_events()

    def msg(seq: int) -> dict[str, Any]:
        return {
            "type": "msg",
            "room": "r",
            "seq": seq,
            "ts": 1,
            "from": "bob",
            "sender": "x",
            "text": f"t{seq}",
            "id": f"i{seq}",
        }

    # SUB lost last+1..last+9 and brought last+10..last+30; our own message is last+15.
    for seq in range(last + 10, last + 31):
        state.pending[seq] = msg(seq)
    state.pending[last + 15] = Event(type="msg", room="r", seq=last + 15, name="alice", text="mine", own=True)
    # The broker kept only from last+26 on: the reply to "after last" starts there.
    state.fetching, state.fetch_after = True, last
    alice._on_fetched(
        "r",
        {"type": "history", "room": "r", "seq": last + 35, "messages": [msg(s) for s in range(last + 26, last + 36)]},
    )
    events = alice.drain_events()
    skipped = [e for e in events if e.type == "status"]
    assert len(skipped) == 1 and skipped[0].seq == last + 9, skipped
    assert f"9 events of #r (seq {last + 1}-{last + 9}) are no longer kept" in (skipped[0].text or "")
    shown = [e.text for e in events if e.type == "msg"]
    assert shown == [("mine" if seq == last + 15 else f"t{seq}") for seq in range(last + 10, last + 36)]
    assert state.last == last + 35


# ------------------------------------------------------------ the library's edges


def test_a_client_not_open_refuses_to_send_instead_of_queueing_forever(broker: RunningBroker) -> None:
    fresh = Client("alice", HOST, broker.port, broker.pub_port)

    def calls() -> list[Callable[[], object]]:
        return [
            lambda: fresh.send("general", "x"),
            lambda: fresh.dm("bob", "x"),
            lambda: fresh.join("general"),
            lambda: fresh.leave("general"),
            lambda: fresh.history("general"),
            lambda: fresh.who("general"),
            fresh.rooms,
            fresh.ping,
        ]

    try:
        for call in calls():
            with pytest.raises(ZchatError) as before:
                call()
            assert before.value.code == "not_connected"
        fresh.connect()
        fresh.join("general")
    finally:
        fresh.close()
    for call in calls():
        with pytest.raises(ZchatError) as after:
            call()
        assert after.value.code == "closed"


def test_a_bad_room_name_is_a_request_error(make_client: MakeClient) -> None:
    """Every refusal, the library's own checks included, is a ZchatError with a code."""
    alice = make_client("alice")
    for call in (
        lambda: alice.join("bad room!"),
        lambda: alice.send("bad room!", "x"),
        lambda: alice.history("bad room!"),
        lambda: alice.who("bad room!"),
        lambda: alice.leave("bad room!"),
    ):
        with pytest.raises(RequestError) as refused:
            call()
        assert refused.value.code == "bad_room"


def test_a_send_wait_that_times_out_leaves_the_message_queued_once(tmp_path: Path) -> None:
    """The timeout says the message is still on its way, with its id: it is acknowledged
    once the broker answers, and stored once. (A bot that sent it again posted it twice.)"""
    b = BrokerProcess(tmp_path / "data").start()
    alice = Client("alice", HOST, b.port, b.pub_port)
    try:
        alice.connect()
        alice.join("general")
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BrokerUnreachable) as late:
                alice.send_wait("general", "late", timeout=0.5)
            assert late.value.msg_id is not None and "do not send it again" in late.value.message
        finally:
            b.proc.send_signal(signal.SIGCONT)
        acked = alice.next_event(10)
        while acked is not None and acked.id != late.value.msg_id:
            acked = alice.next_event(10)
        assert acked is not None and acked.own and acked.text == "late"
        events, _ = alice.history("general")
        assert [e.text for e in events if e.type == "msg"] == ["late"]
    finally:
        alice.close(0, settle=0)
        b.kill()


@contextlib.contextmanager
def alice_with_a_message_unsent(tmp_path: Path) -> Iterator[Client]:
    """Alice in #general, her broker killed, one message of hers never acknowledged."""
    b = BrokerProcess(tmp_path / "data").start()
    alice = Client("alice", HOST, b.port, b.pub_port)
    try:
        alice.connect()
        alice.join("general")
        b.kill()
        alice.send("general", "into the void")
        yield alice
    finally:
        alice.close(0, settle=0)


def test_close_says_how_many_messages_it_could_not_send(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with alice_with_a_message_unsent(tmp_path) as alice:
        assert alice.close(settle=0.3) == 1
        assert "1 message(s) not acknowledged" in caplog.text


def test_a_restarted_bot_takes_its_session_back_with_its_resume_token(broker: RunningBroker) -> None:
    """Its process died without a bye: its name is held until the session expires, so a
    plain restart meets name_taken; with the saved token it is back at once."""
    doomed: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    bot = Client("bot", HOST, broker.port, broker.pub_port, context=doomed)
    saved: list[str | None] = []
    bot.on_resume_token = saved.append  # where a bot saves it, before a crash needs it
    bot.connect()
    bot.join("general")
    token = bot.resume_token
    assert token and saved == [token]
    doomed.destroy(linger=0)  # as a SIGKILL would: no bye
    plain = Client("bot", HOST, broker.port, broker.pub_port)
    try:
        with pytest.raises(RequestError) as taken:
            plain.connect()
        assert taken.value.code == "name_taken"
    finally:
        plain.close(0, settle=0)
    again = Client("bot", HOST, broker.port, broker.pub_port, resume=token)
    again.on_resume_token = saved.append
    with again:
        assert again.resume_token == token
        assert saved == [token]  # the same session: the same token, nothing to save again
        again.join("general")
        assert again.send_wait("general", "back").seq is not None
        assert again.who("general") == ["bot"]


def test_a_resumed_sessions_join_shows_its_killed_runs_join_as_from_before(broker: RunningBroker) -> None:
    """The room's newest event is the killed run's join: the join now publishes nothing,
    so that one is from before it, backlog like the rest (it came as this join's own)."""
    with Client("alice", HOST, broker.port, broker.pub_port) as alice:
        alice.join("general")
        for i in range(3):
            alice.send_wait("general", f"m{i}")
        token = killed_session(broker.port, broker.pub_port, "bot", "general")
        with Client("bot", HOST, broker.port, broker.pub_port, resume=token) as again:
            again.join("general", backlog=3)
            shown = [e for e in again.drain_events() if e.type != "status"]
            assert [(e.type, e.text or e.name, e.backlog) for e in shown] == [
                ("msg", "m1", True),
                ("msg", "m2", True),
                ("presence", "bot", True),
            ], shown


def bot_and_a_twin(broker: RunningBroker) -> tuple[Client, Client]:
    """A bot in #general, and a second client that took its session with its resume token."""
    first = Client("bot", HOST, broker.port, broker.pub_port)
    first.connect()
    first.join("general")
    second = Client("bot", HOST, broker.port, broker.pub_port, resume=first.resume_token)
    try:
        second.connect()
    except BaseException:
        first.close(settle=0)
        raise
    return first, second


def test_two_clients_given_one_resume_token_do_not_fight_the_older_one_stops(
    short_heartbeat_broker: RunningBroker,
) -> None:
    """A bot started twice with one saved token: the second takes the session; the first
    used to take it back at its next ping, and so on for ever. Now the first is told
    (session_moved), closes, and says so; the second keeps the session."""
    broker = short_heartbeat_broker
    first, second = bot_and_a_twin(broker)
    try:
        second.join("general")

        def first_closed() -> list[Event]:
            with contextlib.suppress(ZchatError):
                first.pump(0.05)
            return [e for e in first.drain_events() if e.code == "session_moved"] if first.state == "closed" else []

        (moved,) = wait_for(first_closed, 10, what=lambda: first.state)
        assert "another client has this session" in (moved.message or "")
        with pytest.raises(ZchatError) as closed:
            first.send("general", "from the old one")
        assert closed.value.code == "closed" and "another client has this session" in closed.value.message
        # Past 10 heartbeats (the first one's pings): nobody took the session back. (A
        # reconnect of the second's own, on a loaded machine, would resume it: no fight.)
        end = time.monotonic() + 10 * broker.heartbeat_ms / 1000
        while time.monotonic() < end:
            assert second.send_wait("general", "still mine").seq is not None
            second.pump(0.2)
        assert not [e for e in second.drain_events() if e.code == "session_moved"]
        assert first.state == "closed" and broker.broker.core.by_name["bot"].sender == second.sender
    finally:
        second.close(settle=0)
        first.close(settle=0)


def test_a_session_moved_read_while_closing_is_a_clean_close(
    broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The takeover is read by close()'s wait for acks, with a line of ours unsent and its
    not_registered refusal in the same read: close() returns that line as lost, and no
    'reconnecting' is reported before the session_moved (it used to raise KeyError)."""
    first, second = bot_and_a_twin(broker)
    try:
        first.send("general", "late line")
        # Refused before first reads anything: both replies wait in its socket.
        wait_for(lambda: any("say hello before 'msg'" in r.getMessage() for r in caplog.records), 5)
        assert first.close() == 1
        assert [(e.type, e.code) for e in first.drain_events()] == [("error", "session_moved")]
        assert first.close() == 1  # again: the same count, no error
    finally:
        second.close(settle=0)


def test_a_ctrl_c_while_close_waits_still_closes(tmp_path: Path) -> None:
    """close() waits for acks now; interrupted, it still says bye and frees the sockets."""
    with alice_with_a_message_unsent(tmp_path) as alice:
        threading.Timer(0.3, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            alice.close(settle=5)
        assert alice.state == "closed"


def test_a_resume_token_that_cannot_be_one_is_refused_at_once(broker: RunningBroker) -> None:
    with pytest.raises(RequestError) as bad:
        Client("bot", HOST, broker.port, broker.pub_port, resume="x" * 65)
    assert bad.value.code == "bad_envelope"
    with Client("bot", HOST, broker.port, broker.pub_port, resume="") as bot:  # an empty saved file: none
        assert bot.resume_token


def test_a_text_that_is_not_unicode_is_refused_and_the_client_goes_on(make_client: MakeClient) -> None:
    """A line read with errors="surrogateescape" holds lone surrogates, which UTF-8 cannot
    carry: refused before it is queued (queued, it failed every later pump and the close)."""
    alice = make_client("alice")
    alice.join("general")
    for send in (lambda: alice.send("general", "a\udcffb"), lambda: alice.dm("alice", "\ud800")):
        with pytest.raises(RequestError) as err:
            send()
        assert err.value.code == "bad_envelope" and "not valid Unicode" in err.value.message
    assert alice.unacked == 0
    assert alice.send_wait("general", "still here").seq is not None
    alice.ping()


def test_a_leave_waits_for_the_rooms_messages_held_by_the_rate_limit(tmp_path: Path, connect_to: ConnectTo) -> None:
    """Lines written before a leave go out before it, as a server's queue would send them:
    held back by the rate limit, they used to be refused as not_joined after it."""
    from broker.core import Limits

    broker = RunningBroker(tmp_path / "data", limits=Limits(rate=20, burst=5, join_rate=0)).start()
    try:
        alice = connect_to(broker, "alice")
        alice.join("x")
        alice.join("y")
        for i in range(15):
            alice.send("x", f"m{i}")
        alice.send("y", "elsewhere")  # a message to another room does not hold the leave up
        alice.leave("x")
        assert "x" not in alice.rooms_joined
        events = alice.drain_events()
        assert not [e for e in events if e.type == "error"], events
        assert [e.text for e in events if e.type == "msg" and e.room == "x"] == [f"m{i}" for i in range(15)]
        stored, _ = alice.history("x", 0, 100)
        assert [e.text for e in stored if e.type == "msg"] == [f"m{i}" for i in range(15)]
    finally:
        broker.stop()


def until_own_join(client: Client, room: str, timeout: float = 15.0) -> list[Event]:
    """Events of ``room`` as they come, up to and with ``client``'s own join presence."""
    got: list[Event] = []

    def joined() -> bool:
        client.pump(0.05)
        got.extend(client.drain_events())
        return any(e.type == "presence" and e.name == client.name and e.room == room for e in got)

    wait_for(joined, timeout, interval=0, what=lambda: got[-3:])
    return got


def test_a_bot_that_joins_after_the_last_seq_it_logged_misses_nothing_and_gets_nothing_twice(
    make_client: MakeClient,
) -> None:
    alice = make_client("alice")
    alice.join("log")
    acked = [alice.send_wait("log", f"m{i}") for i in range(8)]
    logged = acked[4].seq  # a logger that saw up to m4, then stopped
    assert logged is not None
    bot = make_client("bot")
    bot.join("log", backlog=1, after=logged)
    events = until_own_join(bot, "log")
    assert [e.text for e in events if e.type == "msg"] == ["m5", "m6", "m7"]
    assert [e.seq for e in events] == list(range(logged + 1, logged + 1 + len(events)))  # its own join last
    assert all(e.backlog for e in events[:-1]) and not events[-1].backlog  # (its join is not from before)
    alice.send_wait("log", "live")
    [live] = collect(bot, 1, kind="msg")
    assert live.text == "live" and not live.backlog
    with pytest.raises(ValueError):
        bot.join("other", after=-1)
    # Asked for by the client that saw them (its own among them): given again, as asked.
    alice.leave("log")
    alice.drain_events()
    alice.join("log", after=0)
    again = until_own_join(alice, "log")
    assert [e.text for e in again if e.type == "msg"] == [*(f"m{i}" for i in range(8)), "live"]
    assert all(e.backlog for e in again[:-1]) and not again[-1].backlog


def test_joining_after_a_seq_the_retention_deleted_says_what_is_gone(tmp_path: Path, connect_to: ConnectTo) -> None:
    from broker.store import PRUNE_STEP

    broker = RunningBroker(tmp_path / "data", retention=1).start()
    try:
        alice = connect_to(broker, "alice")
        alice.join("log")  # seq 1
        for i in range(PRUNE_STEP + 5):
            alice.send("log", f"m{i}")
        wait_for(lambda: bool(alice.pump(0.05) or True) and alice.unacked == 0, 10)
        kept, top = alice.history("log", 0, 500)
        first = kept[0].seq
        assert first is not None and first > 3, kept[:3]  # the oldest went
        bot = connect_to(broker, "bot")
        bot.join("log", after=2)
        events = until_own_join(bot, "log")
        assert events[0].type == "status" and events[0].event == "skipped" and events[0].seq == first - 1, events[0]
        assert f"(seq 3-{first - 1}) are no longer kept" in (events[0].text or "")
        assert [e.seq for e in events[1:]] == list(range(first, top + 2))  # kept ones, then the bot's join
    finally:
        broker.stop()


@contextlib.contextmanager
def written_past_the_budget(
    tmp_path: Path, connect_to: ConnectTo, history: tuple[int, int], room: str, texts: list[str]
) -> Iterator[tuple[RunningBroker, Client]]:
    """A broker whose budget of large replies is ``history`` (bytes a second, burst), and
    ``texts`` in ``room``, written (and acknowledged) by ``alice``."""
    from broker.core import Limits

    limits = Limits(rate=0, join_rate=0, history_bytes=history[0], history_burst=history[1])
    broker = RunningBroker(tmp_path / "data", limits=limits).start()
    try:
        alice = connect_to(broker, "alice")
        alice.join(room)
        for text in texts:
            alice.send(room, text)
        wait_for(lambda: bool(alice.pump(0.05) or True) and alice.unacked == 0, 20)
        yield broker, alice
    finally:
        broker.stop()


def test_joining_after_a_seq_far_behind_rides_out_the_history_budget(tmp_path: Path, connect_to: ConnectTo) -> None:
    """More history than the broker's per-session budget lets out at once: pages it
    refuses are asked again, and every event comes once (join() used to raise
    rate_limited, with the pages it had read left queued, again at every retry)."""
    texts = [f"{i:04d} " + "x" * 60 for i in range(1200)]
    with written_past_the_budget(tmp_path, connect_to, (60_000, 20_000), "log", texts) as (broker, _):
        bot = connect_to(broker, "bot")
        refused: list[str] = []
        on_fetched = bot._on_fetched

        def noting(room: str, reply: dict[str, Any]) -> None:
            if reply.get("type") == "error":
                refused.append(str(reply.get("code")))
            on_fetched(room, reply)

        bot._on_fetched = noting  # type: ignore[method-assign]
        bot.join("log", after=1)
        # Acknowledged at once, its event waits behind the catch-up: send_wait answers.
        asked = time.monotonic()
        mine = bot.send_wait("log", "mine")
        assert mine.own and mine.seq == len(texts) + 3  # after the texts and the bot's join
        assert time.monotonic() - asked < 2, "answered on its ack, not at the timeout"
        wait_for(lambda: bool(bot.pump(0.05) or True) and bool(refused), 10)
        # The catch-up has spent the budget of large replies: who waits for it, not fail.
        assert bot.who("log") == ["alice", "bot"]
        events = until_own_join(bot, "log", timeout=30)
        quiet_until = time.monotonic() + 0.5  # what else comes: nothing (mine was answered)
        while time.monotonic() < quiet_until:
            bot.pump(0.05)
        events += bot.drain_events()
        assert [e.text for e in events if e.type == "msg"] == texts  # and "mine" not again
        assert "rate_limited" in refused  # the budget was met, and ridden out


def test_a_backlog_read_past_the_history_budget_waits_for_it(tmp_path: Path, connect_to: ConnectTo) -> None:
    """join(room, backlog=N) reads its backlog in pages; a page the broker's budget of
    large replies refuses is asked again, as the join itself is (the join raised
    rate_limited and dropped a room the broker had it in)."""
    texts = [f"line {i} " + "y" * 80 for i in range(700)]
    with written_past_the_budget(tmp_path, connect_to, (20_000, 30_000), "a", texts) as (broker, _):
        reader = connect_to(broker, "reader")
        assert reader.join("a", backlog=600) == ["alice", "reader"]  # two pages: 500, then 101
        backlog = [e.text for e in reader.drain_events() if e.type == "msg"]
        assert backlog == texts[-600:]  # the 600 events before the reader's join
        assert reader.rooms_joined == ["a"]


def test_leaves_past_the_join_rate_limit_wait_for_it(tmp_path: Path, connect_to: ConnectTo) -> None:
    """Joins and leaves share a rate limit: a leave it refuses is asked again, as a join
    is (leave() raised rate_limited, and the bot stayed in the room)."""
    from broker.core import Limits

    broker = RunningBroker(tmp_path / "data", limits=Limits(rate=0, join_rate=2, join_burst=20)).start()
    try:
        bot = connect_to(broker, "bot")
        for i in range(20):
            bot.join(f"r{i}")  # the whole burst
        for room in ("r0", "r1", "r2"):
            bot.leave(room)
        assert bot.rooms_joined == [f"r{i}" for i in range(3, 20)]
        watcher = connect_to(broker, "watcher")
        assert "bot" not in watcher.who("r0") and "bot" in watcher.who("r3")
    finally:
        broker.stop()


def test_rooms_says_when_the_broker_listed_only_some(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.core

    monkeypatch.setattr(broker.core, "MAX_ROOMS_LISTED", 2)
    alice = make_client("alice")
    alice.join("a")
    alice.join("b")
    listed = alice.rooms()
    assert [r["room"] for r in listed] == ["a", "b"] and not listed.truncated
    alice.join("c")
    listed = alice.rooms()
    assert [r["room"] for r in listed] == ["a", "b"] and listed.truncated


def test_a_member_list_past_what_a_reply_holds_says_how_many_there_are(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_MEMBERS_LISTED members (10,000; 2 here) the broker lists the first by
    name: join() and who() say how many there are, and so do /who and /rooms."""
    import json

    from broker import core as core_module
    from client.commands import Commands

    monkeypatch.setattr(core_module, "MAX_MEMBERS_LISTED", 2)
    for name in ("carol", "alice"):
        make_client(name).join("general")
    bob = make_client("bob")
    members = bob.join("general")
    assert (list(members), members.total, members.truncated) == (["alice", "bob"], 3, True)
    who = bob.who("general")
    assert (list(who), who.total, who.truncated) == (["alice", "bob"], 3, True)
    quiet = bob.join("dev", members=False)
    assert (list(quiet), quiet.total) == ([], 1)
    out: list[str] = []
    err: list[str] = []
    assert Commands(bob, "general", out.append, err.append).handle("/who")
    assert out[-1] == "-!- #general: alice, bob and 1 more (3 in all)"
    assert Commands(bob, "general", out.append, err.append, as_json=True).handle("/who")
    assert json.loads(out[-1]) == {"type": "who", "room": "general", "members": ["alice", "bob"], "count": 3}
    monkeypatch.setattr(core_module, "MAX_ROOMS_LISTED", 1)
    assert Commands(bob, "general", out.append, err.append, as_json=True).handle("/rooms")
    rooms = json.loads(out[-1])
    assert rooms["truncated"] is True and [r["room"] for r in rooms["rooms"]] == ["dev"]
    assert Commands(bob, "general", out.append, err.append).handle("/rooms")
    assert out[-1].splitlines()[-1] == "-!- and more rooms than the 1 listed"
    assert err == []


def _until_quiet(reader: Client) -> None:
    """Pump ``reader`` until a flood has reached it: its SUB brings nothing more for 0.3 s."""

    def quiet() -> bool:
        reader.pump(0)
        return not reader._sub.poll(300)

    wait_for(quiet, 20)


def _read_all(reader: Client, got: list[Event], count: int, timeout: float = 30) -> None:
    """Pump ``reader`` until ``got``, which what it reads is added to, holds ``count`` room messages."""

    def all_in() -> bool:
        reader.pump(0.05)
        got.extend(e for e in reader.drain_events() if e.type == "msg")
        return len(got) >= count

    wait_for(all_in, timeout, what=lambda: len(got))


def _behind_its_room(make_client: MakeClient) -> tuple[Client, list[str]]:
    """A reader in #general with ``max_queue=50`` that has read none of a writer's 300 lines
    there (all acknowledged and come to its socket): it is backed up. The lines, in order."""
    reader = make_client("reader", max_queue=50)
    reader.join("general")
    writer = make_client("writer")
    writer.join("general")
    texts = [f"line {i}" for i in range(300)]
    for text in texts:
        writer.send("general", text)
    wait_for(lambda: writer.pump(0.02) is not None and writer.unacked == 0, 20)
    _until_quiet(reader)
    assert reader._backed_up()
    return reader, texts


def test_one_pump_decodes_a_bounded_number_of_room_events_and_the_next_ones_the_rest(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stall the SUB socket holds thousands of events: one pump(0) decoded them all
    (10,000 kept the terminal's keys waiting 370 ms). It decodes SUB_EVENTS_PER_PUMP now
    (plus the rest of the batch it is in); the next pumps take the rest, in order, all."""
    monkeypatch.setattr(client_lib, "SUB_EVENTS_PER_PUMP", 50)
    reader = make_client("reader")
    reader.join("general")
    writer = make_client("writer")
    writer.join("general")
    texts = [f"line {i}" for i in range(600)]
    for text in texts:
        writer.send("general", text)
    wait_for(lambda: writer.pump(0.02) is not None and writer.unacked == 0, 20)  # the reader stalls meanwhile
    wait_for(lambda: reader._sub.poll(0), 5)
    reader.pump(0)
    first = [e for e in reader.drain_events() if e.type == "msg"]
    assert 0 < len(first) <= 50 + p.BATCH_MAX_ITEMS - 1, len(first)
    got = list(first)
    _read_all(reader, got, len(texts))
    assert [e.text for e in got] == texts


def test_a_reader_behind_its_room_holds_at_most_max_queue_events_and_misses_none(make_client: MakeClient) -> None:
    """A program that pumps without reading its events (a pipe-mode zchat whose stdout
    nobody empties keeps pumping to stay alive) held every event of the room: 80,000
    messages of 2 KB cost a zchat 225 MiB. Now at ``max_queue`` events held, the ones that
    come are dropped, and fetched from history once the program reads: all in the end,
    in order, each once."""
    reader = make_client("reader", max_queue=50)
    reader.join("general")
    writer = make_client("writer")
    writer.join("general")
    texts = [f"line {i}" for i in range(1000)]
    for text in texts:
        writer.send("general", text)
        reader.pump(0)
    wait_for(lambda: writer.pump(0.02) is not None and writer.unacked == 0, 20)

    _until_quiet(reader)
    held = reader.drain_events()
    assert len(held) <= 50, len(held)
    got = [e for e in held if e.type == "msg"]

    _read_all(reader, got, len(texts))
    assert [e.text for e in got] == texts
    seqs = [e.seq for e in got]
    assert seqs == sorted(set(seqs))


def test_a_reader_with_max_queue_events_waiting_behind_a_gap_still_fetches_the_gap(make_client: MakeClient) -> None:
    """The events waiting in a room for an earlier one count towards ``max_queue``, and with
    that many held no history was asked: once they alone were ``max_queue`` (the program had
    read the rest), the gap they wait behind was never fetched and the room stood still for
    good, every later event dropped. A terminal client at 3,000 msg/s of 400-byte lines
    stopped showing the room (35,000 behind, its own line never acknowledged). Now only
    what the program has not read holds history back."""
    reader = make_client("reader", max_queue=50)
    reader.join("general")
    writer = make_client("writer")
    writer.join("general")
    watcher = make_client("watcher")  # (its SUB is fed when the reader's is)
    watcher.join("general")
    texts = [f"line {i}" for i in range(800)]

    def sent(upto: int) -> bool:
        writer.pump(0)
        watcher.pump(0.02)
        return any(e.type == "msg" and e.text == texts[upto - 1] for e in watcher.drain_events())

    # The reader holds 50 unread and drops the rest: a gap of more than a history page (500).
    for text in texts[:700]:
        writer.send("general", text)
        reader.pump(0)
    wait_for(lambda: sent(700), 20)
    wait_for(lambda: not reader.pump(0) and not reader._sub.poll(300), 20)
    got = [e for e in reader.drain_events() if e.type == "msg"]
    assert len(got) <= 50
    # 100 more reach its socket before it pumps again: the first shows the gap (fetched a
    # page at a time) and 50 wait behind it, the rest dropped.
    for text in texts[700:]:
        writer.send("general", text)
    wait_for(lambda: sent(800), 20)

    _read_all(reader, got, len(texts), timeout=10)
    assert [e.text for e in got] == texts


def test_an_event_into_a_room_waiting_behind_a_gap_costs_no_more_with_many_waiting() -> None:
    """Each frame SUB brought into a room scanned every event waiting there for an earlier
    one: behind a gap in a flood (up to max_queue, 10,000, waiting) that scan was much of a
    terminal client's work. Now only a room whose waiting events may be stale is scanned.
    CPU times of the same frames with 10 and with 10,000 waiting; no broker needed."""

    def cost(waiting: int) -> float:
        client = Client("reader", HOST, 1, 2)  # (never connected: nothing is fetched)
        try:
            state = _Room(last=0)  # seq 1 never came: everything after it waits
            state.pending = {seq: {"type": "msg", "room": "general", "seq": seq} for seq in range(2, 2 + waiting)}
            client._rooms["general"] = state
            client._flush("general", state)
            start = time.process_time()
            for _ in range(5000):  # (as after each frame SUB brings)
                client._flush("general", state)
            assert len(state.pending) == waiting and state.last == 0
            return time.process_time() - start
        finally:
            client.close(0)

    few, many = cost(10), cost(10_000)
    assert many < few * 5 + 0.05, (few, many)


def test_a_bot_slow_with_each_event_of_a_long_queue_keeps_its_session(
    short_heartbeat_broker: RunningBroker, connect_to: ConnectTo
) -> None:
    """next_event() pumped only once the queue was empty: a bot that takes 10 ms an event
    and found 200 queued sent no ping for 2 s, and the broker (heartbeat 200 ms) ended its
    session: a leave (timeout) in the room, a new session. Now it pumps while it works."""
    b = short_heartbeat_broker
    bot = connect_to(b, "bot")
    bot.join("general")
    writer = connect_to(b, "writer")
    writer.join("general")
    for i in range(200):
        writer.send("general", f"job {i}")
    wait_for(lambda: writer.pump(0.02) is not None and writer.unacked == 0, 10)
    wait_for(lambda: bot.pump(0.05) is not None and len(bot._events) >= 200, 10)
    handled = 0
    while handled < 200:
        event = bot.next_event(5)
        assert event is not None
        assert event.type != "status", event  # no "connection lost; reconnecting"
        if event.type == "msg":
            handled += 1
            time.sleep(0.01)  # the bot's work on it (not a wait for anything)
    bot.send_wait("general", "done", 5)
    seen = collect(writer, 0)
    while not any(e.type == "msg" and e.text == "done" for e in seen):
        seen += collect(writer, 1)
    leaves = [e for e in seen if e.type == "presence" and e.name == "bot"]
    assert leaves == [], leaves


def test_events_queued_when_the_session_moves_are_still_handed_out_one_by_one(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, connect_to: ConnectTo
) -> None:
    """next_event() takes a turn of the client while it hands out queued events (a bot
    slow with each keeps its session); on a client that is closed (its session moved,
    or close() called) that turn raised ``closed`` before the queued events: a DM read
    just before the takeover, and the session_moved error that says why, were never
    handed out. Now a closed client hands out what it holds, then says it is closed."""
    monkeypatch.setattr(client_lib, "QUEUED_PUMP_S", 0.0)  # the turn is due at every event (a slow bot)
    alice = connect_to(broker, "alice")
    first = Client("bot", HOST, broker.port, broker.pub_port)
    first.connect()
    try:
        alice.dm_wait("bot", "read me")
        wait_for(lambda: first.pump(0.05) is not None and any(e.type == "dm" for e in first._events), 5)
        second = Client("bot", HOST, broker.port, broker.pub_port, resume=first.resume_token)
        second.connect()
        try:

            def first_closed() -> bool:
                if not any(e.code == "session_moved" for e in first._events):
                    first.pump(0.05)
                return first.state == "closed"

            wait_for(first_closed, 10, what=lambda: first.state)
            got = [first.next_event(0), first.next_event(0)]
            assert [(e.type, e.text or e.code) for e in got if e is not None] == [
                ("dm", "read me"),
                ("error", "session_moved"),
            ], got
            with pytest.raises(ZchatError) as closed:
                first.next_event(0)
            assert closed.value.code == "closed"
        finally:
            second.close(settle=0)
    finally:
        first.close(settle=0)


def test_send_wait_of_a_program_behind_its_room_returns_at_the_ack(make_client: MakeClient) -> None:
    """A program with max_queue events unread (a bot that only writes, say) has its own
    acknowledged message wait in its room's order behind a gap that is fetched only once
    it reads: send_wait, which reads nothing, waited its whole timeout (10 s by default)
    for every line. Now it returns the message at its ack; read later, the room still
    comes complete, in order, that message once."""
    reader, texts = _behind_its_room(make_client)
    started = time.monotonic()
    own = reader.send_wait("general", "mine", timeout=20)
    assert time.monotonic() - started < 10, "send_wait waited for its timeout"
    assert own.text == "mine" and own.seq == len(texts) + 3  # after the two joins
    got = [e for e in reader.drain_events() if e.type == "msg"]

    _read_all(reader, got, len(texts))
    assert reader.pump(0.3) is not None
    got.extend(e for e in reader.drain_events() if e.type == "msg")
    assert [e.text for e in got] == texts  # "mine" was handed out by send_wait, not again


def test_a_program_behind_its_room_can_still_write_to_it_after_a_reconnect(make_client: MakeClient) -> None:
    """A rejoin that finds the room ahead made every message to it wait for the catch-up
    from history; a program with max_queue events unread fetches nothing until it reads,
    so a bot that only writes never wrote to that room again (its messages waited, then
    were lost at close). The catch-up only matters for a message that went before the
    loss (it may be stored): with none, what is written after the reconnect goes."""
    reader, texts = _behind_its_room(make_client)
    reader._lost("test: connection cut")
    wait_for(lambda: reader.pump(0.05) is not None and reader._rooms["general"].joined, 20)
    assert reader._backed_up()
    started = time.monotonic()
    own = reader.send_wait("general", "after the reconnect", timeout=20)
    assert time.monotonic() - started < 10, "it waited for a catch-up that does not come"
    assert own.seq == len(texts) + 3
    got = [e for e in reader.drain_events() if e.type == "msg"]

    _read_all(reader, got, len(texts))
    assert [e.text for e in got] == texts


def _reader_texts(reader: Client, texts: list[str], extra: int) -> list[str]:
    """Everything the backed-up ``reader`` shows of its room once it reads: ``texts`` and ``extra`` more."""
    got = [e for e in reader.drain_events() if e.type == "msg"]
    _read_all(reader, got, len(texts) + extra)
    assert reader.pump(0.3) is not None
    got.extend(e for e in reader.drain_events() if e.type == "msg")
    return [e.text or "" for e in got]


def test_a_program_behind_its_room_finds_its_message_whose_ack_was_lost_without_reading(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, make_client: MakeClient
) -> None:
    """A program with max_queue events unread sends a line whose ack is lost. Before it goes
    again the client must know whether the broker stored it (past the broker's resend
    window, here 5 messages, a resend is stored twice): it caught up on the room for that,
    which a program behind its room does not do until it reads, so the line waited, its
    send_wait timing out. Now it pages history for its own line alone, keeping nothing
    else: the original is found and is its ack, while the program still reads nothing;
    read later, the room shows it once, in its place."""
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 1.0))
    broker.broker.core._acked.size = 5  # the resend window has passed the line by the time it goes again
    reader, texts = _behind_its_room(make_client)
    dropped = drop_first(reader, "ack", "general")
    writer = make_client("writer2")
    writer.join("general")
    reader.send("general", "mine")

    def acknowledged() -> bool:
        reader.pump(0.05)
        writer.pump(0)
        if dropped and len(texts) < 310:
            for i in range(10):  # the room moves on past it
                writer.send_wait("general", f"after {i}")
                texts.append(f"after {i}")
        return reader.unacked == 0

    wait_for(acknowledged, 10, interval=0, what=lambda: (bool(dropped), reader.unacked, len(reader._events)))
    assert dropped, "the ack was lost on the way"
    assert reader._backed_up(), "the program read nothing meanwhile"
    got = _reader_texts(reader, texts, 1)
    assert got.count("mine") == 1
    events, _ = writer.history("general", len(texts) - 20, 100)
    assert [e.text for e in events if e.type == "msg"].count("mine") == 1


def test_a_program_behind_its_room_resends_its_lost_message_without_reading(
    monkeypatch: pytest.MonkeyPatch, make_client: MakeClient
) -> None:
    """As above, but the line never reached the broker: the client pages history up to
    where the room stood after it, finds nothing of it, and sends it again, while the
    program still reads nothing. Stored once."""
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 1.0))
    reader, texts = _behind_its_room(make_client)
    lost: list[dict[str, Any]] = []
    send = reader._send

    def lossy_send(env: dict[str, Any]) -> None:
        if env["type"] == "msg" and not lost:
            lost.append(env)
            return
        send(env)

    reader._send = lossy_send  # type: ignore[method-assign]
    reader.send("general", "mine")
    wait_for(lambda: reader.pump(0.05) is not None and reader.unacked == 0, 10, interval=0)
    assert lost, "the first send was lost"
    assert reader._backed_up(), "the program read nothing meanwhile"
    assert _reader_texts(reader, texts, 1).count("mine") == 1


def test_a_program_behind_its_room_finds_its_message_sent_before_a_reconnect_without_reading(
    broker: RunningBroker, make_client: MakeClient
) -> None:
    """A line sent just before the connection is lost (its ack lost with it) makes the rejoin
    catch up on the room before the room's lines go again; a program with max_queue events
    unread fetched nothing until it read, so that line and every later one to the room
    waited. Now the client looks for that line alone in history: found, it is its ack,
    and the next line goes at once."""
    broker.broker.core._acked.size = 5  # (as above)
    reader, texts = _behind_its_room(make_client)
    reader.send("general", "before the cut")
    writer = make_client("writer2")
    writer.join("general")
    wait_for(lambda: any(e.text == "before the cut" for e in writer.history("general", len(texts), 50)[0]), 5)
    reader._lost("test: connection cut")  # before it read the ack
    for i in range(10):
        writer.send_wait("general", f"after {i}")
    started = time.monotonic()
    own = reader.send_wait("general", "after the reconnect", timeout=20)
    assert time.monotonic() - started < 10, "it waited for a catch-up that does not come"
    assert reader.unacked == 0 and reader._backed_up()
    assert own.text == "after the reconnect"
    got = _reader_texts(reader, texts + ["before the cut"] + [f"after {i}" for i in range(10)], 0)
    assert got.count("before the cut") == 1
    events, _ = writer.history("general", len(texts), 100)
    assert [e.text for e in events if e.type == "msg"].count("before the cut") == 1


def test_a_program_behind_its_room_resends_its_message_lost_before_a_reconnect_in_a_room_that_did_not_move(
    make_client: MakeClient,
) -> None:
    """As above, but the line never reached the broker and nobody wrote meanwhile: the
    room's seq at the rejoin is the one the client knew when the line went, so no copy
    can be stored and there is nothing to look for. The rejoin still held the room's
    lines for a catch-up, which nothing then ended: they waited until the program read."""
    reader, texts = _behind_its_room(make_client)
    reader.ping()  # its pong says where the room stands
    lost: list[dict[str, Any]] = []
    send = reader._send

    def lossy_send(env: dict[str, Any]) -> None:
        if env["type"] == "msg" and not lost:
            lost.append(env)
            return
        send(env)

    reader._send = lossy_send  # type: ignore[method-assign]
    reader.send("general", "lost on the way")
    reader._lost("test: connection cut")
    own = reader.send_wait("general", "after the reconnect", timeout=20)
    assert own.text == "after the reconnect"
    wait_for(lambda: reader.pump(0.05) is not None and reader.unacked == 0, 10, interval=0)
    assert reader._backed_up() and lost
    got = _reader_texts(reader, texts, 1)  # (send_wait took its own line)
    assert got[-1] == "lost on the way" and got.count("lost on the way") == 1


def _readme_bot() -> str:
    """The bot of README.md's "Bots: the library", as printed."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Bots: the library", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.timeout(60)
def test_the_readmes_bot_echoes_and_a_sigterm_frees_its_name_at_once(
    broker: RunningBroker, make_client: MakeClient
) -> None:
    """Run as printed (on this broker's ports). Stopped as kill, systemctl and docker
    stop it (SIGTERM), it says bye: without its handler Python exits on the spot, the
    broker holds the name for 15 s, and the restart below is refused ``name_taken``."""
    code = _readme_bot()
    where = f'host="{HOST}"'
    assert where in code
    code = code.replace(where, f"{where}, port={broker.port}, pub_port={broker.pub_port}")
    root = Path(__file__).parent.parent
    alice = make_client("alice")
    alice.join("general", backlog=0)

    def presence(event: str) -> Event:
        got = collect(alice, 1, 15, kind="presence")[0]
        assert (got.name, got.event) == ("echobot", event), got
        return got

    for run in range(2):
        bot = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE, text=True)
        try:
            presence("join")  # (the second time: no name_taken)
            if run == 0:
                alice.send_wait("general", "!echo hi there")
                echoed = collect(alice, 1, 10, kind="msg")[0]
                assert (echoed.name, echoed.text) == ("echobot", "hi there"), echoed
            bot.send_signal(signal.SIGTERM)
            _, err = bot.communicate(timeout=15)
            assert bot.returncode == 0, err
            assert presence("leave").reason == "quit"
        finally:
            if bot.poll() is None:
                bot.kill()
                bot.wait()


@pytest.mark.timeout(60)
def test_events_dropped_past_max_queue_are_fetched_as_soon_as_the_program_reads(
    tmp_path: Path, connect_to: ConnectTo
) -> None:
    """The events that came while the program had max_queue unread are dropped, and
    fetched from history once it reads: then, not when a later event or the next pong
    showed the gap (a heartbeat later, 20 s here: a bot reading with a timeout took the
    room for quiet, with most of its events still to come)."""
    running = RunningBroker(tmp_path / "data", heartbeat_ms=20_000).start()
    try:
        slow = connect_to(running, "slow", max_queue=50)
        fast = connect_to(running, "fast")
        fast.join("flood", backlog=0)
        slow.join("flood", backlog=0)
        for i in range(300):
            fast.send("flood", f"f{i}")
        wait_for(lambda: fast.pump(0.05) is not None and fast.unacked == 0, 20)
        # The slow one holds max_queue events, and has read (and dropped) all the rest.
        wait_for(lambda: slow.pump(0.05) is not None and len(slow._events) >= 50 and not slow._sub.poll(0), 10)
        texts: list[str] = []
        while (event := slow.next_event(timeout=2.0)) is not None and len(texts) < 300:
            if event.type == "msg":
                texts.append(event.text or "")
        assert texts == [f"f{i}" for i in range(300)], (len(texts), texts[-1:])
    finally:
        running.stop()
