"""The broker core on its own: encoded envelopes in, actions out. No sockets, no store."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest

from broker import core as core_module
from broker.core import (
    WINDOW_SHARDS,
    AckWindow,
    Action,
    Core,
    Direct,
    HistoryQuery,
    Limits,
    Publish,
    Reply,
    SavedSession,
)
from zchat import protocol as p
from zchat.protocol import ErrorCode

HB = 1000
A, B, C = b"id-a", b"id-b", b"id-c"


def enc(**env: Any) -> bytes:
    return p.encode(env)


def make_core(**room_seqs: int) -> Core:
    return Core(epoch="e", heartbeat_ms=HB, room_seqs=dict(room_seqs))


def publishes(actions: list[Action]) -> list[Publish]:
    return [a for a in actions if isinstance(a, Publish)]


def replies(actions: list[Action]) -> list[Reply]:
    return [a for a in actions if isinstance(a, Reply)]


def only_reply(actions: list[Action], identity: bytes) -> dict[str, Any]:
    assert len(actions) == 1, actions
    action = actions[0]
    assert isinstance(action, Reply)
    assert action.identity == identity
    return action.env


def error_code(actions: list[Action], identity: bytes) -> str:
    env = only_reply(actions, identity)
    assert env["type"] == "error"
    assert ErrorCode(env["code"])
    return str(env["code"])


def unmarked(env: dict[str, Any]) -> dict[str, Any]:
    """A large reply without its ``mark`` (which it must have: see test_large_replies_are_marked...)."""
    assert isinstance(env.pop("mark"), str), env
    return env


def hello(core: Core, identity: bytes, name: str, now: int = 0, **extra: Any) -> dict[str, Any]:
    env = only_reply(core.handle(identity, enc(type="hello", v=1, name=name, **extra), now), identity)
    assert env["type"] == "welcome", env
    return env


def join(core: Core, identity: bytes, room: str, now: int = 0) -> list[Action]:
    return core.handle(identity, enc(type="join", room=room), now)


def msg(core: Core, identity: bytes, room: str, text: str, msg_id: str, now: int = 0, **extra: Any) -> list[Action]:
    return core.handle(identity, enc(type="msg", room=room, text=text, id=msg_id, **extra), now)


# --------------------------------------------------------------------------
# hello


def test_hello_welcome() -> None:
    core = make_core()
    actions = core.handle(A, enc(type="hello", v=1, name="alice", id="h1"), 123)
    env = only_reply(actions, A)
    assert env["type"] == "welcome"
    assert env["v"] == 1
    assert env["name"] == "alice"
    assert env["epoch"] == "e"
    assert env["heartbeat_ms"] == HB
    assert env["id"] == "h1"
    assert isinstance(env["sender"], str) and env["sender"]
    assert env["resumed"] is False
    assert isinstance(env["resume"], str) and env["resume"]
    assert core.by_name["alice"].identity == A
    assert core.by_identity[A].name == "alice"


def test_hello_without_id_has_no_id() -> None:
    core = make_core()
    assert "id" not in hello(core, A, "alice")


def test_senders_and_tokens_differ_per_session() -> None:
    core = make_core()
    a, b = hello(core, A, "alice"), hello(core, B, "bob")
    assert a["sender"] != b["sender"]
    assert a["resume"] != b["resume"]


def test_name_taken() -> None:
    core = make_core()
    hello(core, A, "alice")
    actions = core.handle(B, enc(type="hello", v=1, name="alice", id="h2"), 5)
    env = only_reply(actions, B)
    assert env["code"] == "name_taken"
    assert env["id"] == "h2"
    assert core.by_name["alice"].identity == A
    assert B not in core.by_identity


def test_names_that_differ_only_in_case_are_one_name() -> None:
    """Nobody can be Bob beside bob: the second spelling is refused and told why, even
    with the first session's token (a session resumes under its own spelling); once bob
    is gone the name is free in any spelling."""
    core = make_core()
    token = hello(core, A, "bob")["resume"]
    for spelling, extra in (("Bob", {}), ("BOB", {}), ("Bob", {"resume": token})):
        env = only_reply(core.handle(B, enc(type="hello", v=1, name=spelling, id="h", **extra), 5), B)
        assert (env["type"], env["code"], env["id"]) == ("error", "name_taken", "h"), env
        assert f"the name {spelling!r} is taken ('bob' is in use" in env["message"], env
        assert "differ only in case" in env["message"], env
        # ... and when it frees
        assert "free once its client quits, or, if that client is gone (killed, say), in 3 s" in env["message"], env
    assert B not in core.by_identity and core.by_name["bob"].identity == A
    core.handle(A, enc(type="bye"), 6)
    assert hello(core, B, "Bob", now=7)["name"] == "Bob"
    assert core.named("bOB") is core.by_name["Bob"] and core.named("bob") is core.by_name["Bob"]


def test_name_taken_says_whether_a_connected_client_holds_the_name() -> None:
    """A client that lost its name to a live one must not be told it comes free by itself;
    one whose old session is dying is told how long it has left."""
    core = make_core()
    hello(core, A, "alice", now=0)
    live = only_reply(core.handle(B, enc(type="hello", v=1, name="alice"), HB // 2), B)
    assert "in use by a session heard from 0 s ago: free once its client quits" in live["message"], live
    assert "in 3 s" in live["message"], live  # if its client is gone: 3 heartbeats after it was heard
    silent = only_reply(core.handle(B, enc(type="hello", v=1, name="alice"), 2 * HB + 1000), B)
    assert "silent for" in silent["message"] and "ends in" in silent["message"], silent
    assert core.expiry_ms == 3 * HB


def test_a_restored_session_waits_for_its_token_and_ends_unresumed() -> None:
    """Core.restore: the name is held, the rooms keep the member, the token (known by
    its hash) resumes it with its sender, and an unresumed one ends with its leave."""
    core = make_core(general=7)
    saved = [
        SavedSession("alice", "s-alice", hashlib.sha256(b"tok-a").digest(), None, ["general"]),
        SavedSession("bob", "s-bob", hashlib.sha256(b"tok-b").digest(), None, ["general", "gone"]),
        # Saved by a broker that let names differ only in case: the first one keeps the name.
        SavedSession("ALICE", "s-alice2", hashlib.sha256(b"tok-a2").digest(), None, ["general"]),
    ]
    assert core.restore(saved, now=1000) == 2
    assert sorted(core.members["general"]) == ["alice", "bob"]
    assert "gone" not in core.members, "a room with no seq is joined anew"
    assert core.sessions_to_save() == [], "not resumed since the last restart: not saved again"
    hello(core, B, "carol", now=1000)
    dm = only_reply(core.handle(B, enc(type="dm", to="bob", text="hi", id="d1"), 1000), B)
    assert dm["code"] == "no_such_user" and "not back yet" in dm["message"], "a DM goes to no connection"
    refused = only_reply(core.handle(A, enc(type="hello", v=1, name="alice", resume="tok-b"), 1001), A)
    assert refused["code"] == "name_taken" and "before the broker restarted" in refused["message"]
    welcome = only_reply(core.handle(A, enc(type="hello", v=1, name="alice", resume="tok-a"), 1002), A)
    assert (welcome["resumed"], welcome["sender"], welcome["resume"]) == (True, "s-alice", "tok-a")
    rejoined = join(core, A, "general", now=1003)
    assert not publishes(rejoined), "a rejoin of a restored member publishes nothing"
    ended = publishes(core.expire(1000 + core.expiry_ms + 1))
    assert [(a.env["name"], a.env["event"]) for a in ended] == [("bob", "leave")]
    assert "bob" not in core.by_name and "alice" in core.by_name
    assert [s.name for s in core.sessions_to_save()] == ["alice"]  # (carol was silent too)


def test_a_restored_session_is_named_as_such_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Its resume and its end say where it came from, not an empty routing id
    ('session resumed: alice ( -> 00cc4a9b6f)')."""
    caplog.set_level(logging.INFO, logger="zchat.broker")
    core = make_core(general=7)
    saved = [
        SavedSession("alice", "s-alice", hashlib.sha256(b"tok-a").digest(), None, ["general"]),
        SavedSession("bob", "s-bob", hashlib.sha256(b"tok-b").digest(), None, ["general"]),
    ]
    assert core.restore(saved, now=1000) == 2
    only_reply(core.handle(A, enc(type="hello", v=1, name="alice", resume="tok-a"), 1001), A)
    core.expire(1000 + core.expiry_ms + 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session")]
    assert lines == [
        f"session resumed: alice (restored from the last stop -> {A.hex()})",
        "session expired: bob (restored from the last stop)",
    ], lines


def test_second_hello_same_name_same_welcome() -> None:
    core = make_core()
    first = hello(core, A, "alice", 0)
    again = hello(core, A, "alice", 10)
    assert again == first
    assert len(core.by_identity) == 1


def test_second_hello_other_name_already_registered() -> None:
    core = make_core()
    hello(core, A, "alice")
    actions = core.handle(A, enc(type="hello", v=1, name="bob", id="h3"), 5)
    env = only_reply(actions, A)
    assert env["code"] == "already_registered"
    assert env["id"] == "h3"
    assert core.by_identity[A].name == "alice"
    assert "bob" not in core.by_name


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"type": "hello", "v": 2, "name": "alice"}, "unsupported_version"),
        ({"type": "hello", "v": 1, "name": "-alice"}, "bad_name"),
        ({"type": "hello", "v": 1, "name": "a" * 33}, "bad_name"),
    ],
)
def test_bad_hello(env: dict[str, Any], code: str) -> None:
    core = make_core()
    assert error_code(core.handle(A, p.encode(env), 0), A) == code
    assert not core.by_identity
    assert not core.by_name


@pytest.mark.parametrize(
    "env",
    [
        {"type": "join", "room": "general", "id": "x1"},
        {"type": "leave", "room": "general", "id": "x1"},
        {"type": "msg", "room": "general", "text": "hi", "id": "x1"},
        {"type": "dm", "to": "bob", "text": "hi", "id": "x1"},
        {"type": "history", "room": "general", "id": "x1"},
        {"type": "who", "room": "general", "id": "x1"},
        {"type": "rooms", "id": "x1"},
        {"type": "ping", "id": "x1"},
        {"type": "bye", "id": "x1"},
    ],
    ids=lambda env: env["type"],
)
def test_requests_before_hello(env: dict[str, Any]) -> None:
    core = make_core(general=3)
    hello(core, B, "bob")
    actions = core.handle(A, p.encode(env), 0)
    reply = only_reply(actions, A)
    assert reply["code"] == "not_registered"
    assert reply["id"] == "x1"
    assert core.seqs == {"general": 3}
    assert set(core.by_identity) == {B}


# --------------------------------------------------------------------------
# resume


def test_resume_takes_the_session_over() -> None:
    core = make_core()
    first = hello(core, A, "alice")
    join(core, A, "general")
    seq = core.seqs["general"]
    actions = core.handle(B, enc(type="hello", v=1, name="alice", resume=first["resume"], id="h"), 50)
    told, env = (only_reply([action], who) for action, who in zip(actions, (A, B), strict=True))
    # The old connection hears why, once: a second client given the token stops on it.
    assert told["type"] == "error" and told["code"] == "session_moved" and "id" not in told
    assert env["type"] == "welcome"
    assert env["resumed"] is True
    assert env["sender"] == first["sender"]
    assert env["id"] == "h"
    assert core.seqs["general"] == seq  # nobody left or joined
    assert core.by_name["alice"].identity == B
    assert A not in core.by_identity
    assert error_code(core.handle(A, enc(type="ping"), 60), A) == "not_registered"
    # the rooms came along: B may write to general at once
    assert [pub.env["from"] for pub in publishes(msg(core, B, "general", "back", "m1"))] == ["alice"]


@pytest.mark.parametrize("token", ["wrong", "x" * 64, "é", "tok\u00e9n", "😀"])
def test_resume_with_a_wrong_token_is_name_taken(token: str) -> None:
    core = make_core()
    first = hello(core, A, "alice")
    assert first["resume"] != token
    actions = core.handle(B, enc(type="hello", v=1, name="alice", resume=token, id="h"), 1)
    reply = only_reply(actions, B)
    assert reply["code"] == "name_taken"
    assert reply["id"] == "h"
    assert core.by_name["alice"].identity == A


def test_resume_token_for_a_free_name_is_ignored() -> None:
    core = make_core()
    env = hello(core, A, "alice", resume="stale")
    assert env["resumed"] is False
    assert env["resume"] != "stale"


# --------------------------------------------------------------------------
# join / leave


def test_join_publishes_presence_and_replies_joined() -> None:
    core = make_core(general=41)
    hello(core, A, "alice")
    actions = core.handle(A, enc(type="join", room="general", id="j1"), 777)
    assert len(actions) == 2
    pub, reply = actions
    assert isinstance(pub, Publish)
    assert pub.room == "general"
    assert pub.env == {"type": "presence", "room": "general", "seq": 42, "ts": 777, "name": "alice", "event": "join"}
    assert isinstance(reply, Reply)
    assert reply.identity == A
    assert unmarked(reply.env) == {"type": "joined", "room": "general", "members": ["alice"], "seq": 42, "id": "j1"}


def test_join_new_room_starts_at_seq_1_and_lists_members_sorted() -> None:
    core = make_core()
    hello(core, A, "zed")
    hello(core, B, "amy")
    assert publishes(join(core, A, "fresh"))[0].env["seq"] == 1
    actions = join(core, B, "fresh")
    assert publishes(actions)[0].env["seq"] == 2
    joined = replies(actions)[0].env
    assert joined["members"] == ["amy", "zed"]
    assert joined["seq"] == 2


def test_large_replies_are_marked_and_a_session_that_does_not_read_them_is_refused_more() -> None:
    """The budget's rate alone let a session that asks and never reads have the broker
    queue its replies without end (at 1 MiB/s each). Each large reply has a mark, signed
    for the session; a request's ``read`` says the client has read up to one. Past the
    burst of bytes unread, more large replies are refused until it does."""
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(history_bytes=10**9, history_burst=200))
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, B, "general")
    for i in range(10):
        core.members["general"][f"member-{i}"] = core.by_name["bob"]  # a list of 94 bytes
    marks = []
    for i in range(3):
        env = only_reply(core.handle(A, enc(type="who", room="general"), 1000 * i), A)
        assert env["type"] == "who", env
        marks.append(env["mark"])
    assert len(set(marks)) == 3
    refused = only_reply(core.handle(A, enc(type="who", room="general"), 5000), A)
    assert refused["code"] == "rate_limited" and "not read yet" in refused["message"], refused
    # Not read: marks of another session, forged ones, garbage, are nothing.
    bobs = only_reply(core.handle(B, enc(type="who", room="general"), 5000), B)["mark"]
    upto = marks[-1].partition(".")[0]
    for bad in (bobs, f"{upto}.0000000000000000", f"{int(upto, 16) + 1:x}.{marks[-1][-16:]}", "zz", 7, None):
        still = only_reply(core.handle(A, enc(type="who", room="general", read=bad), 5000), A)
        assert still.get("code") == "rate_limited", (bad, still)
    # Read up to the first: the two after it are under the burst, so one more goes; then
    # refused again, until the last is read.
    assert only_reply(core.handle(A, enc(type="ping", read=marks[0]), 5000), A)["type"] == "pong"
    fourth = only_reply(core.handle(A, enc(type="who", room="general"), 5000), A)
    assert fourth["type"] == "who", fourth
    assert only_reply(core.handle(A, enc(type="who", room="general"), 5000), A).get("code") == "rate_limited"
    assert only_reply(core.handle(A, enc(type="who", room="general", read=fourth["mark"]), 5000), A)["type"] == "who"
    # A resume on a new connection: the session starts counting anew (a host, had it one,
    # would owe the rest: see the next test).
    for _ in range(3):
        core.handle(A, enc(type="rooms"), 6000)
    token = core.by_name["alice"].token
    resumed = core.handle(C, enc(type="hello", v=1, name="alice", resume=token), 6000)
    assert [r.env["type"] for r in replies(resumed)] == ["error", "welcome"]  # (session_moved to A)
    assert only_reply(core.handle(C, enc(type="who", room="general"), 6000), C)["type"] == "who"


def test_a_host_owes_what_its_ended_and_moved_sessions_did_not_say_they_read() -> None:
    """A client that says bye and hello in a loop, never reading, started each session
    counting from nothing while the old connections kept their queues: +32 MiB a round.
    What a session did not say it read when it ends or moves is its host's to pay off,
    at the budget's rate; a session's own unread and its host's debt count together."""
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(history_bytes=100, history_burst=200))

    def handle(identity: bytes, now: int, **env: Any) -> dict[str, Any]:
        return only_reply(core.handle(identity, enc(**env), now, None, _From("10.0.0.9")), identity)

    assert handle(A, 0, type="hello", v=1, name="bob")["type"] == "welcome"
    core.handle(A, enc(type="join", room="general"), 0, None, _From("10.0.0.9"))  # (a list of 4 bytes)
    for i in range(9):
        core.members["general"][f"member-{i}"] = core.by_name["bob"]  # a list of 94 bytes
    for _ in range(2):
        assert handle(A, 0, type="who", room="general")["type"] == "who"
    core.handle(A, enc(type="bye"), 0, None, _From("10.0.0.9"))
    # A new session of that host: 192 owed, so one more list, then refused.
    assert handle(B, 0, type="hello", v=1, name="bob2")["type"] == "welcome"
    assert handle(B, 0, type="who", room="general")["type"] == "who"
    refused = handle(B, 0, type="who", room="general")
    assert refused["code"] == "rate_limited" and "not read yet" in refused["message"], refused
    # Paid off at 100 bytes a second: 2 s later, 0 owed and 94 its own.
    last = handle(B, 2000, type="who", room="general")
    assert last["type"] == "who"
    # Another host owes nothing.
    other = only_reply(core.handle(C, enc(type="hello", v=1, name="carol"), 2000, None, _From("10.0.0.7")), C)
    assert other["type"] == "welcome"
    assert (
        only_reply(core.handle(C, enc(type="who", room="general"), 2000, None, _From("10.0.0.7")), C)["type"] == "who"
    )
    # A resume whose hello says what it read leaves nothing owed; one that does not, the rest.
    token = core.by_name["bob2"].token
    resumed = core.handle(
        A, enc(type="hello", v=1, name="bob2", resume=token, read=last["mark"]), 2000, None, _From("10.0.0.9")
    )
    assert [r.env["type"] for r in replies(resumed)] == ["error", "welcome"]
    assert core._debts == {}
    assert handle(A, 2000, type="who", room="general")["type"] == "who"
    core.handle(B, enc(type="hello", v=1, name="bob2", resume=token), 2000, None, _From("10.0.0.9"))
    assert core._debts == {"10.0.0.9": (81, 2000)}  # that last list, not said read


def test_dms_handed_to_a_connection_lately_are_sent_again_to_the_session_resumed() -> None:
    """A connection gone dead without closing still takes DMs (and their authors get
    acks) until its client gives it up: on the new connection they come again."""
    core = make_core()
    assert "in_rooms" not in hello(core, A, "alice")  # a new session: in no room
    hello(core, B, "bob")
    join(core, A, "general")
    token = core.by_name["alice"].token
    old = core.handle(B, enc(type="dm", to="alice", text="old", id="d0"), 0)
    later = 3 * HB + 5000 + 1  # past expiry and the extra: "old" is not kept
    lost = core.handle(B, enc(type="dm", to="alice", text="undelivered", id="d1"), later)
    (direct,) = [a for a in lost if isinstance(a, Direct)]
    core.undelivered(direct, later)  # its author was told: not sent again
    later += core_module.DM_HOLD_MS  # (its author gave it up: the next ones no longer wait for it)
    for i in (2, 3):
        core.handle(B, enc(type="dm", to="alice", text=f"kept {i}", id=f"d{i}"), later)
    assert [a for a in old if isinstance(a, Direct)]
    resumed = core.handle(C, enc(type="hello", v=1, name="alice", resume=token), later + 10)
    got = [(r.identity, r.env["type"], r.env.get("text")) for r in replies(resumed)]
    assert replies(resumed)[1].env["in_rooms"] == ["general"]  # what a restarted client rejoins or leaves
    assert got == [
        (A, "error", None),  # session_moved, to the old connection
        (C, "welcome", None),
        (C, "dm", "kept 2"),
        (C, "dm", "kept 3"),
    ]
    # Sent again once: the next resume has nothing to send.
    again = core.handle(A, enc(type="hello", v=1, name="alice", resume=token), later + 20)
    assert [r.env["type"] for r in replies(again)] == ["error", "welcome"]


def test_dms_refused_by_a_gone_connection_do_not_push_out_those_it_took_before() -> None:
    """A connection takes DMs and then goes: they are lost with it, and come again on the
    resume. Meanwhile every DM to the gone connection is refused (undelivered) and asked
    again by its author. Kept until the loop found it undelivered, each such DM pushed the
    oldest kept one out at the size limit, so those the connection did take were gone
    before the resume (a soak: 310 DMs acked, never received)."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    token = core.by_name["alice"].token
    (taken,) = [
        a for a in core.handle(B, enc(type="dm", to="alice", text="taken", id="d0"), 10) if isinstance(a, Direct)
    ]
    assert core.delivered(taken) == taken.ack
    text = "x" * 1000
    # ~900 KiB of DMs in one pass, each refused: a pass decides them all first.
    pass_ = [
        action
        for i in range(1, 600)
        for action in core.handle(B, enc(type="dm", to="alice", text=text, id=f"d{i}"), 20)
        if isinstance(action, Direct)
    ]
    assert len(pass_) == 599
    for direct in pass_:
        core.undelivered(direct, 20)
    resumed = core.handle(C, enc(type="hello", v=1, name="alice", resume=token), 30)
    again = [r.env.get("text") for r in replies(resumed) if r.identity == C and r.env["type"] == "dm"]
    assert again == ["taken"]


def _dm(core: Core, author: bytes, to: str, msg_id: str, now: int) -> Direct | dict[str, Any]:
    """The Direct a DM is decided to, or the refusal it gets."""
    actions = core.handle(author, enc(type="dm", to=to, text=f"text of {msg_id}", id=msg_id), now)
    directs = [a for a in actions if isinstance(a, Direct)]
    if directs:
        return directs[0]
    return only_reply(actions, author)


def test_a_dm_refused_holds_its_authors_later_dms_to_that_person_until_it_is_resent() -> None:
    """A client sends its DMs without waiting for acks. After a restart the first ones
    reached the broker before their recipient was back (no_such_user) and the later ones
    after (delivered), and the first ones, asked again a second later, came after them
    (a soak with restarts: 700 DMs out of order). Now the later ones wait for the first."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    first = _dm(core, A, "bob", "d1", 10)
    assert isinstance(first, dict) and first["code"] == "no_such_user"
    hello(core, B, "bob")
    later = _dm(core, A, "Bob", "d2", 20)
    assert isinstance(later, dict) and (later["type"], later["code"], later["id"]) == ("error", "undelivered", "d2")
    assert "'d1'" in later["message"]
    other = _dm(core, A, "carol", "d3", 20)  # DMs to anyone else go on
    assert isinstance(other, dict) and other["code"] == "no_such_user"
    again = _dm(core, A, "bob", "d1", 1000)  # asked again: handed over, and the hold ends
    assert isinstance(again, Direct)
    assert core.dm_held(again, 1000) is None
    assert core.delivered(again) == again.ack
    assert isinstance(_dm(core, A, "bob", "d2", 1001), Direct)


def test_a_dm_found_undelivered_holds_the_later_ones_of_its_pass_and_after() -> None:
    """The loop finds a DM undelivered only as it hands the pass's DMs over: the later
    ones to the same person, decided in the same pass, must not be handed over either."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    d1, d2 = _dm(core, A, "bob", "d1", 10), _dm(core, A, "bob", "d2", 10)
    assert isinstance(d1, Direct) and isinstance(d2, Direct)
    assert core.dm_held(d1, 10) is None
    assert core.undelivered(d1, 10)["code"] == "undelivered"  # the connection was gone
    assert core.dm_held(d2, 10) == "d1"
    error = core.undelivered(d2, 10, "d1")
    assert (error["code"], error["id"]) == ("undelivered", "d2") and "'d1'" in error["message"]
    # Asked again out of order (d2 first): refused; d1 then d2: handed over.
    refused = _dm(core, A, "bob", "d2", 1000)
    assert isinstance(refused, dict) and refused["code"] == "undelivered"
    d1 = _dm(core, A, "bob", "d1", 1001)
    assert isinstance(d1, Direct) and core.dm_held(d1, 1001) is None
    core.delivered(d1)
    assert isinstance(_dm(core, A, "bob", "d2", 1002), Direct)


def test_the_dms_behind_a_refused_one_go_in_the_pass_it_is_resent_in_if_it_goes() -> None:
    """A client resends the refused DM and the ones behind it at once: read in one pass,
    the later ones were refused as held (their DM was not handed over yet) and overtaken
    by the ones of the next pass. They are decided, and handed over only if it was."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    core.undelivered(_dm(core, A, "bob", "d1", 10), 10)  # type: ignore[arg-type]
    for takes in (False, True):
        d1, d2 = _dm(core, A, "bob", "d1", 1000), _dm(core, A, "bob", "d2", 1000)
        assert isinstance(d1, Direct) and isinstance(d2, Direct)
        assert core.dm_held(d1, 1000) is None
        if takes:
            core.delivered(d1)
            assert core.dm_held(d2, 1000) is None
        else:
            core.undelivered(d1, 1000)  # gone again: d2 must wait on
            assert core.dm_held(d2, 1000) == "d1"
            core.undelivered(d2, 1000, "d1")


def test_a_dm_hold_runs_from_its_refusal_not_from_its_decision() -> None:
    """A pass may wait seconds for a commit before the loop hands its DMs over: dated
    from when the refused one was decided, the hold was over before it began, and a
    later DM decided meanwhile was handed over ahead of it."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    d1, d2 = _dm(core, A, "bob", "d1", 10), _dm(core, A, "bob", "d2", 10)
    assert isinstance(d1, Direct) and isinstance(d2, Direct)
    handed_at = 10 + core_module.DM_HOLD_MS + 2000
    core.undelivered(d1, handed_at)
    assert core.dm_held(d2, handed_at) == "d1"


@pytest.mark.timeout(20)
def test_refusing_a_backlog_of_dms_to_a_gone_connection_takes_linear_time() -> None:
    """Passes waiting for commits can hold up to 32 x 1,024 DMs, all kept when decided:
    each refusal searched the kept ones from the newest, and 20,000 took 45 s of the
    loop. From the oldest, a refusal finds its DM after those handed over before it."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    directs = [d for i in range(30_000) if isinstance(d := _dm(core, A, "bob", f"d{i}", 10), Direct)]
    assert len(directs) == 30_000
    for direct in directs:
        core.undelivered(direct, 20, "d0" if direct is not directs[0] else None)
    assert not core.by_name["bob"].recent_dms
    assert core.by_name["bob"].recent_dm_bytes == 0


def test_a_dm_hold_ends_when_its_author_gives_the_refused_one_up() -> None:
    """A client that told its author the DM failed does not send it again: the later
    ones go DM_HOLD_MS after its last refusal. A name nobody holds stays no_such_user."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    assert _dm(core, A, "bob", "d1", 10)["code"] == "no_such_user"  # type: ignore[index]
    assert _dm(core, A, "bob", "d2", 20)["code"] == "no_such_user"  # type: ignore[index]
    hello(core, B, "bob")
    assert _dm(core, A, "bob", "d3", 10 + core_module.DM_HOLD_MS - 1)["code"] == "undelivered"  # type: ignore[index]
    assert isinstance(_dm(core, A, "bob", "d3", 10 + core_module.DM_HOLD_MS), Direct)
    # DMs to many names nobody holds leave a bounded trace.
    for i in range(3 * core_module.DM_HOLDS_MAX):
        _dm(core, A, f"ghost{i}", f"g{i}", 10_000)
    session = core.by_name["alice"]
    assert session.dm_holds is not None and len(session.dm_holds) <= core_module.DM_HOLDS_MAX


def test_dms_kept_for_a_resume_are_held_to_their_size_once_handed_over() -> None:
    """What a session keeps of its DMs stays under DM_KEPT_BYTES: the oldest go first."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=0))
    hello(core, A, "alice")
    hello(core, B, "bob")
    text = "x" * 1000
    for i in range(400):
        for action in core.handle(B, enc(type="dm", to="alice", text=text, id=f"d{i}"), 20):
            if isinstance(action, Direct):
                core.delivered(action)
    session = core.by_name["alice"]
    assert session.recent_dms is not None
    assert session.recent_dm_bytes <= core_module.DM_KEPT_BYTES
    assert session.recent_dm_bytes == sum(len(e["text"]) + core_module.DM_KEPT_OVERHEAD for _, e in session.recent_dms)
    assert session.recent_dms[-1][1]["id"] == "d399"
    assert len(session.recent_dms) == core_module.DM_KEPT_BYTES // (1000 + core_module.DM_KEPT_OVERHEAD)


def test_a_join_that_says_members_false_gets_the_count_not_the_list() -> None:
    core = make_core(general=5)
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")
    actions = core.handle(B, enc(type="join", room="general", members=False, id="j1"), 0)
    assert [a.env["name"] for a in publishes(actions)] == ["bob"]  # a join like any other
    assert replies(actions)[0].env == {"type": "joined", "room": "general", "count": 2, "seq": 7, "id": "j1"}
    # Again, in the room already: the same, and nothing published.
    again = core.handle(B, enc(type="join", room="general", members=False), 0)
    assert only_reply(again, B) == {"type": "joined", "room": "general", "count": 2, "seq": 7}
    # members: true is the default.
    listed = core.handle(B, enc(type="join", room="general", members=True), 0)
    assert only_reply(listed, B)["members"] == ["alice", "bob"]


@pytest.mark.parametrize("value", ["no", 0, None, []])
def test_a_join_whose_members_is_not_a_boolean_is_refused(value: Any) -> None:
    core = make_core()
    hello(core, A, "alice")
    actions = core.handle(A, enc(type="join", room="general", members=value, id="j1"), 0)
    assert error_code(actions, A) == "bad_envelope"
    assert "general" not in core.members


def test_rejoin_is_idempotent() -> None:
    core = make_core(general=5)
    hello(core, A, "alice")
    join(core, A, "general")
    actions = join(core, A, "general")
    assert publishes(actions) == []
    env = only_reply(actions, A)
    assert unmarked(env) == {"type": "joined", "room": "general", "members": ["alice"], "seq": 6}
    assert core.seqs["general"] == 6


def test_leave() -> None:
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")
    join(core, B, "general")
    actions = core.handle(A, enc(type="leave", room="general", id="l1"), 9)
    assert [a.env for a in publishes(actions)] == [
        {"type": "presence", "room": "general", "seq": 3, "ts": 9, "name": "alice", "event": "leave"}
    ]
    assert replies(actions) == [Reply(A, {"type": "left", "room": "general", "id": "l1"})]
    assert list(core.members["general"]) == ["bob"]
    assert error_code(msg(core, A, "general", "hi", "m1"), A) == "not_joined"


def test_leave_not_joined() -> None:
    core = make_core(general=2)
    hello(core, A, "alice")
    reply = only_reply(core.handle(A, enc(type="leave", room="general", id="l"), 0), A)
    assert reply["code"] == "not_joined"
    assert reply["id"] == "l"
    assert core.seqs["general"] == 2


def test_bad_room_from_registered_session() -> None:
    core = make_core()
    hello(core, A, "alice")
    assert error_code(join(core, A, "General"), A) == "bad_room"
    assert core.by_identity[A].rooms == set()


# --------------------------------------------------------------------------
# msg


def test_msg_not_joined() -> None:
    core = make_core(general=10)
    hello(core, A, "alice")
    reply = only_reply(msg(core, A, "general", "hi", "m1"), A)
    assert reply["code"] == "not_joined"
    assert reply["id"] == "m1"
    assert core.seqs["general"] == 10


def test_msg_publish_and_ack() -> None:
    core = make_core(general=100)
    welcome = hello(core, A, "alice")
    join(core, A, "general", 0)  # seq 101
    for i, now in enumerate([1000, 1000, 2500]):
        actions = msg(core, A, "general", f"hello {i}", f"m{i}", now, **{"from": "mallory", "sender": "forged"})
        assert len(actions) == 2
        pub, ack = actions
        assert isinstance(pub, Publish)
        assert pub.room == "general"
        assert pub.env == {
            "type": "msg",
            "room": "general",
            "seq": 102 + i,
            "ts": now,
            "from": "alice",
            "sender": welcome["sender"],
            "text": f"hello {i}",
            "id": f"m{i}",
        }
        assert isinstance(ack, Reply)
        assert ack.identity == A
        assert ack.env == {"type": "ack", "id": f"m{i}", "room": "general", "seq": 102 + i, "ts": now}
    assert core.seqs["general"] == 104


def test_msg_action_is_published() -> None:
    core = make_core()
    hello(core, A, "alice")
    join(core, A, "general")
    assert publishes(msg(core, A, "general", "waves", "m1", action=True))[0].env["action"] is True
    assert "action" not in publishes(msg(core, A, "general", "hi", "m2", action=False))[0].env


def test_msg_resend_is_acked_again_without_publish() -> None:
    core = make_core(general=7)
    hello(core, A, "alice")
    join(core, A, "general")
    first = replies(msg(core, A, "general", "once", "m1", 100))[0].env
    assert first["seq"] == 9
    actions = msg(core, A, "general", "once", "m1", 200)
    assert publishes(actions) == []
    assert only_reply(actions, A) == first
    assert core.seqs["general"] == 9
    # a different id is a new message
    assert publishes(msg(core, A, "general", "twice", "m2", 300))[0].env["seq"] == 10


def test_same_id_from_another_name_is_a_new_message() -> None:
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")
    join(core, B, "general")
    seq_a = publishes(msg(core, A, "general", "a", "same"))[0].env["seq"]
    seq_b = publishes(msg(core, B, "general", "b", "same"))[0].env["seq"]
    assert seq_b == seq_a + 1


def test_resend_after_reconnect_is_acked_again() -> None:
    core = make_core()
    hello(core, A, "alice")
    join(core, A, "general")
    first = replies(msg(core, A, "general", "x", "m1", 10))[0].env
    core.handle(A, enc(type="bye"), 20)
    hello(core, B, "alice", 30)
    join(core, B, "general", 30)
    seq = core.seqs["general"]
    actions = msg(core, B, "general", "x", "m1", 40)
    assert publishes(actions) == []
    assert only_reply(actions, B) == first
    assert core.seqs["general"] == seq


def test_recent_acks_from_the_store_are_remembered() -> None:
    stored = {"type": "ack", "from": "alice", "id": "m1", "room": "general", "seq": 5, "ts": 99}
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={"general": 5}, recent_acks=[dict(stored)])
    hello(core, A, "alice")
    join(core, A, "general")
    actions = msg(core, A, "general", "again", "m1")
    assert publishes(actions) == []
    assert only_reply(actions, A) == {"type": "ack", "id": "m1", "room": "general", "seq": 5, "ts": 99}


def test_a_message_stored_twice_is_acked_after_a_restart_as_before_it() -> None:
    """Stored twice (the resend came after the window had passed the first copy), a
    message was acked with its second copy's seq from then on: after a restart too,
    and its one entry in the window lasts as long as any other."""
    first = {"type": "ack", "from": "alice", "id": "m1", "room": "general", "seq": 5, "ts": 99}
    copy = {**first, "seq": 6, "ts": 120}
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={"general": 6}, recent_acks=[dict(first), dict(copy)])
    hello(core, A, "alice")
    join(core, A, "general")
    assert only_reply(msg(core, A, "general", "again", "m1"), A)["seq"] == 6
    assert len(core._acked) == 1
    core._acked.size = 3
    for i in range(2):
        msg(core, A, "general", f"other {i}", f"o{i}")
    assert publishes(msg(core, A, "general", "again", "m1")) == [], "dropped early: still among the last 3"
    msg(core, A, "general", "other 2", "o2")
    assert publishes(msg(core, A, "general", "again", "m1")) != [], "kept past its place: not among the last 3"


def _acked(seq: int) -> tuple[str, int | None, int, str, int | None]:
    return (f"m{seq}", seq, seq, "general", None)


def test_the_resend_window_keeps_the_newest_and_forgets_the_oldest_first() -> None:
    window = AckWindow(1000)
    for i in range(5000):
        assert window.get(("alice", f"m{i}")) is None
        window.put(("alice", f"m{i}"), _acked(i))
    assert len(window) == 1000
    assert [i for i in range(5000) if window.get(("alice", f"m{i}")) is not None] == list(range(4000, 5000))
    assert window.get(("bob", "m4999")) is None
    # Spread over its dicts: none holds more than a few times its share (no one big rebuild).
    assert max(len(shard) for shard in window._shards) < 4 * 1000 // WINDOW_SHARDS


def test_a_forgotten_ack_remembered_again_keeps_its_new_place() -> None:
    """An undelivered DM's ack is forgotten; the resend's ack is remembered anew
    and must last ``size`` messages from then, not from the first attempt."""
    window = AckWindow(10)
    window.put(("alice", "dm"), _acked(0))
    window.forget(("alice", "dm"))
    assert window.get(("alice", "dm")) is None
    for i in range(1, 5):
        window.put(("alice", f"m{i}"), _acked(i))
    window.put(("alice", "dm"), _acked(5))
    # The first place of "dm" leaves the ring here: nothing of it may go with it.
    for i in range(6, 15):
        window.put(("alice", f"m{i}"), _acked(i))
    assert window.get(("alice", "dm")) == _acked(5)
    assert len(window) == 10
    window.put(("alice", "m15"), _acked(15))  # 10 more since the second: now it goes
    assert window.get(("alice", "dm")) is None
    assert window.get(("alice", "m14")) == _acked(14)
    assert len(window) == 10
    window.forget(("alice", "never"))  # not there: no stale place counted
    assert len(window) == 10


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"type": "msg", "room": "general", "text": "", "id": "m"}, "bad_envelope"),
        ({"type": "msg", "room": "general", "text": "x" * 4001, "id": "m"}, "too_large"),
        ({"type": "msg", "room": "general", "text": "x"}, "bad_envelope"),
        ({"type": "msg", "room": "Gen", "text": "x", "id": "m"}, "bad_room"),
        ({"type": "nope", "id": "m"}, "unknown_type"),
    ],
)
def test_bad_msg_from_member(env: dict[str, Any], code: str) -> None:
    core = make_core()
    hello(core, A, "alice")
    join(core, A, "general")
    seq = core.seqs["general"]
    assert error_code(core.handle(A, p.encode(env), 0), A) == code
    assert core.seqs["general"] == seq
    assert A in core.by_identity


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x91\x01", p.encode({"type": "ping", "x": 1.5})])
def test_garbage_from_a_session_keeps_it(frame: bytes) -> None:
    core = make_core()
    hello(core, A, "alice")
    assert error_code(core.handle(A, frame, 0), A) == "bad_envelope"
    assert core.by_identity[A].name == "alice"
    assert only_reply(core.handle(A, enc(type="ping", id="p"), 1), A) == {"type": "pong", "seqs": {}, "id": "p"}


# --------------------------------------------------------------------------
# dm


def test_dm_goes_to_the_recipient_only() -> None:
    core = make_core()
    welcome = hello(core, A, "alice")
    hello(core, B, "bob")
    hello(core, C, "carol")
    join(core, A, "general")
    join(core, B, "general")
    seqs = dict(core.seqs)
    actions = core.handle(A, enc(type="dm", to="bob", text="psst", id="d1", sender="forged", **{"from": "x"}), 55)
    assert publishes(actions) == []
    assert actions == [
        Direct(
            B,
            {
                "type": "dm",
                "from": "alice",
                "sender": welcome["sender"],
                "to": "bob",
                "text": "psst",
                "ts": 55,
                "id": "d1",
            },
            A,
            {"type": "ack", "id": "d1", "to": "bob", "ts": 55},
        )
    ]
    assert core.seqs == seqs


def test_a_dm_the_recipients_connection_could_not_take_is_an_error_and_can_be_resent() -> None:
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    [dm] = core.handle(A, enc(type="dm", to="bob", text="psst", id="d1"), 5)
    assert isinstance(dm, Direct)
    error = core.undelivered(dm, 5)
    assert (error["type"], error["code"], error["id"]) == ("error", "undelivered", "d1")
    assert "bob" in error["message"]
    # Resent: delivered again, not answered with the ack it never got.
    [again] = core.handle(A, enc(type="dm", to="bob", text="psst", id="d1"), 6)
    assert isinstance(again, Direct) and again.identity == B and again.ack["id"] == "d1"
    assert core.delivered(again) == again.ack
    # Once delivered, a resend is only acknowledged again.
    assert only_reply(core.handle(A, enc(type="dm", to="bob", text="psst", id="d1"), 7), A)["type"] == "ack"


@pytest.mark.parametrize("takes", [False, True])
def test_a_dm_sent_again_before_the_loop_handed_it_over_waits_for_its_fate(takes: bool) -> None:
    """A pass may wait for a commit before the loop hands its DMs over. Its author may
    resume on a new connection meanwhile and send the DM again: acknowledged at once
    from the resend window, while the first copy's "undelivered" went to the old
    connection, gone, the DM was lost though its author was told it arrived. Now the
    copy sent again is not answered, and the first copy's answer goes to the author's
    connection of the moment."""
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    token = core.by_name["alice"].token
    [dm] = core.handle(A, enc(type="dm", to="bob", text="psst", id="d1"), 5)
    assert isinstance(dm, Direct) and core.answer_to(dm) == A
    resumed = core.handle(C, enc(type="hello", v=1, name="alice", resume=token), 6)
    assert [r.env["type"] for r in replies(resumed) if r.identity == C] == ["welcome"]
    assert core.handle(C, enc(type="dm", to="bob", text="psst", id="d1"), 7) == []
    # Not another message under the same id, though: that is refused as ever.
    other = core.handle(C, enc(type="dm", to="bob", text="other", id="d1"), 7)
    assert error_code(other, C) == "bad_envelope"
    assert core.answer_to(dm) == C
    if takes:
        assert core.delivered(dm)["type"] == "ack"
        assert only_reply(core.handle(C, enc(type="dm", to="bob", text="psst", id="d1"), 8), C)["type"] == "ack"
    else:
        assert core.undelivered(dm, 8)["code"] == "undelivered"
        [again] = core.handle(C, enc(type="dm", to="bob", text="psst", id="d1"), 9)
        assert isinstance(again, Direct) and again.author == C and core.answer_to(again) == C


def test_the_answer_for_a_dm_goes_only_to_a_connection_that_sent_it() -> None:
    """Its author's session ended while the DM waited, and a new one took the name: the
    answer goes where the DM came from, not to a client that never sent it; or, once
    that one sends it too, to the last that did."""
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    [dm] = core.handle(A, enc(type="dm", to="bob", text="psst", id="d1"), 5)
    assert isinstance(dm, Direct)
    core.handle(A, enc(type="bye"), 6)
    hello(core, C, "alice", 7)
    assert core.answer_to(dm) == A
    assert core.handle(C, enc(type="dm", to="bob", text="psst", id="d1"), 8) == []
    assert core.answer_to(dm) == C
    core.delivered(dm)
    assert core.answer_to(dm) == A  # (asked before it is handed over, as the loop does)


def test_a_dm_finds_its_recipient_in_any_case_and_names_it_as_it_spells_itself() -> None:
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "Bob")
    [dm] = core.handle(A, enc(type="dm", to="bOB", text="psst", id="d1"), 5)
    assert isinstance(dm, Direct) and dm.identity == B
    # The ack names the recipient as the event does: its author's echo shows "Bob", not "bOB".
    assert (dm.env["to"], dm.env["from"], dm.ack["id"], dm.ack["to"]) == ("Bob", "alice", "d1", "Bob")
    # A resend under either spelling is the same message: not refused, it waits for the first.
    for spelling in ("bob", "Bob"):
        assert core.handle(A, enc(type="dm", to=spelling, text="psst", id="d1"), 6) == []
    # Its connection could not take it: the error names the recipient, and a resend goes again.
    error = core.undelivered(dm, 6)
    assert error["code"] == "undelivered" and "Bob" in error["message"]
    [again] = core.handle(A, enc(type="dm", to="BOB", text="psst", id="d1"), 7)
    assert isinstance(again, Direct) and again.identity == B
    core.delivered(again)
    # Handed over: a resend under either spelling is acknowledged again, naming "Bob".
    for spelling in ("bob", "Bob"):
        reply = only_reply(core.handle(A, enc(type="dm", to=spelling, text="psst", id="d1"), 8), A)
        assert (reply["type"], reply["id"], reply["to"]) == ("ack", "d1", "Bob"), reply


def test_dm_to_self() -> None:
    core = make_core()
    hello(core, A, "alice")
    [dm] = core.handle(A, enc(type="dm", to="alice", text="note", id="d"), 1)
    assert isinstance(dm, Direct)
    assert (dm.identity, dm.author) == (A, A)
    assert (dm.env["type"], dm.ack["type"]) == ("dm", "ack")


def test_dm_to_unknown_name() -> None:
    core = make_core()
    hello(core, A, "alice")
    reply = only_reply(core.handle(A, enc(type="dm", to="nobody", text="hi", id="d2"), 0), A)
    assert reply["code"] == "no_such_user"
    assert reply["id"] == "d2"


def test_dm_to_someone_who_left() -> None:
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    core.handle(B, enc(type="bye"), 1)
    assert error_code(core.handle(A, enc(type="dm", to="bob", text="hi", id="d"), 2), A) == "no_such_user"


# --------------------------------------------------------------------------
# history, who, rooms, ping


@pytest.mark.parametrize(
    ("fields", "after", "limit"),
    [
        ({}, 0, p.DEFAULT_HISTORY_LIMIT),
        ({"after": 5, "limit": 10}, 5, 10),
        ({"limit": 100_000}, 0, p.MAX_HISTORY_LIMIT),
        ({"limit": p.MAX_HISTORY_LIMIT + 1}, 0, p.MAX_HISTORY_LIMIT),
    ],
)
def test_history_query(fields: dict[str, int], after: int, limit: int) -> None:
    core = make_core(general=3)
    hello(core, A, "alice")
    actions = core.handle(A, enc(type="history", room="general", id="q", **fields), 0)
    assert actions == [HistoryQuery(A, "general", after, limit, "q", 3)]


def test_history_query_without_id() -> None:
    core = make_core()
    hello(core, A, "alice")
    assert core.handle(A, enc(type="history", room="dev"), 0) == [HistoryQuery(A, "dev", 0, 100, None, 0)]


def test_who() -> None:
    core = make_core()
    hello(core, A, "zed")
    hello(core, B, "amy")
    join(core, A, "general")
    join(core, B, "general")
    env = only_reply(core.handle(A, enc(type="who", room="general", id="w"), 0), A)
    assert unmarked(env) == {"type": "who", "room": "general", "members": ["amy", "zed"], "id": "w"}
    assert unmarked(only_reply(core.handle(A, enc(type="who", room="empty"), 0), A)) == {
        "type": "who",
        "room": "empty",
        "members": [],
    }


def test_rooms() -> None:
    core = make_core(old=17)
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")
    join(core, B, "general")
    join(core, B, "dev")
    env = only_reply(core.handle(A, enc(type="rooms", id="r"), 0), A)
    assert unmarked(env) == {
        "type": "rooms",
        "rooms": [
            {"room": "dev", "members": 1, "seq": 1},
            {"room": "general", "members": 2, "seq": 2},
            {"room": "old", "members": 0, "seq": 17},
        ],
        "truncated": False,
        "id": "r",
    }
    # A room made after a listing is in the next one, in its place; one left stays.
    join(core, A, "alpha")
    core.handle(B, enc(type="leave", room="dev"), 0)
    env = only_reply(core.handle(A, enc(type="rooms"), 0), A)
    assert [(r["room"], r["members"]) for r in env["rooms"]] == [("alpha", 1), ("dev", 0), ("general", 2), ("old", 0)]


@pytest.mark.parametrize("request_id", [None, "p1", "x" * 64])
def test_ping_pong(request_id: str | None) -> None:
    core = make_core()
    hello(core, A, "alice")
    env: dict[str, Any] = {"type": "ping"}
    if request_id is not None:
        env["id"] = request_id
    expected: dict[str, Any] = {"type": "pong", "seqs": {}}
    if request_id is not None:
        expected["id"] = request_id
    assert only_reply(core.handle(A, p.encode(env), 0), A) == expected


def test_a_ping_without_a_session_says_the_disk_alarm_and_a_session_is_not_told_in_its_pong() -> None:
    """The health check's ping (no session) learns that the broker refuses room messages;
    only the word. A session's pong is as it was: its client learns it from its refusals."""
    core = make_core()
    hello(core, B, "bob")
    assert "alarm" not in only_reply(core.handle(A, enc(type="ping", id="h"), 1), A)
    core.store_refusal = "the broker's disk is nearly full; nothing was stored, retry later"
    answer = only_reply(core.handle(A, enc(type="ping", id="h"), 2), A)
    assert answer == {
        "type": "error",
        "code": "not_registered",
        "message": "say hello before 'ping'",
        "id": "h",
        "alarm": "disk",
    }
    assert only_reply(core.handle(B, enc(type="ping", id="p"), 3), B) == {"type": "pong", "seqs": {}, "id": "p"}
    core.store_refusal = None
    assert "alarm" not in only_reply(core.handle(A, enc(type="ping", id="h"), 4), A)


def test_pong_gives_the_seq_of_each_room_of_the_session() -> None:
    """What lets a client see that it lost a room's last events (no later event shows that gap)."""
    core = make_core()
    hello(core, A, "alice")
    hello(core, B, "bob")
    for room in ("ops", "general"):
        core.handle(A, enc(type="join", room=room), 0)
    core.handle(B, enc(type="join", room="general"), 0)
    core.handle(B, enc(type="join", room="elsewhere"), 0)
    core.handle(B, enc(type="msg", room="general", text="hi", id="m1"), 0)
    pong = only_reply(core.handle(A, enc(type="ping"), 1), A)
    assert pong == {"type": "pong", "seqs": {"general": 3, "ops": 1}}
    assert p.decode(p.encode(pong)) == pong


# --------------------------------------------------------------------------
# bye and expiry


def test_bye_leaves_every_room_and_frees_the_name() -> None:
    core = make_core(general=10, dev=20)
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")
    join(core, A, "dev")
    join(core, B, "general")
    actions = core.handle(A, enc(type="bye"), 500)
    assert all(isinstance(a, Publish) for a in actions)
    assert [a.env for a in publishes(actions)] == [
        {"type": "presence", "room": "dev", "seq": 22, "ts": 500, "name": "alice", "event": "leave", "reason": "quit"},
        {
            "type": "presence",
            "room": "general",
            "seq": 13,
            "ts": 500,
            "name": "alice",
            "event": "leave",
            "reason": "quit",
        },
    ]
    assert "alice" not in core.by_name
    assert A not in core.by_identity
    assert list(core.members["general"]) == ["bob"]
    assert "dev" not in core.members
    assert error_code(core.handle(A, enc(type="ping"), 501), A) == "not_registered"
    assert hello(core, C, "alice", 502)["name"] == "alice"


def test_rooms_past_what_a_listing_holds_put_the_ones_people_are_in_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty rooms that sort first (a bot that joined and left a room per line) must not
    hide the rooms people are in: those are listed, then the others by name."""
    monkeypatch.setattr(core_module, "MAX_ROOMS_LISTED", 3)
    core = make_core(a1=1, a2=1, a3=1, a4=1)
    hello(core, A, "alice")
    join(core, A, "zz-team")
    join(core, A, "general")
    env = only_reply(core.handle(A, enc(type="rooms"), 0), A)
    assert [(r["room"], r["members"]) for r in env["rooms"]] == [("a1", 0), ("general", 1), ("zz-team", 1)]
    assert env["truncated"] is True
    # Within what it holds, by name as before.
    monkeypatch.setattr(core_module, "MAX_ROOMS_LISTED", 6)
    env = only_reply(core.handle(A, enc(type="rooms"), 0), A)
    assert [r["room"] for r in env["rooms"]] == ["a1", "a2", "a3", "a4", "general", "zz-team"]
    assert env["truncated"] is False


def test_member_lists_past_what_a_reply_holds_give_the_first_names_and_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A room's whole member list could pass what a client takes in one reply: past
    MAX_MEMBERS_LISTED, joined and who list the first names and say how many there are."""
    monkeypatch.setattr(core_module, "MAX_MEMBERS_LISTED", 2)
    core = make_core()
    for identity, name in ((A, "carol"), (B, "alice"), (C, "bob")):
        hello(core, identity, name)
        actions = join(core, identity, "general")
    joined = next(a.env for a in actions if isinstance(a, Reply) and a.env["type"] == "joined")
    assert (joined["members"], joined["truncated"], joined["count"]) == (["alice", "bob"], True, 3)
    who = only_reply(core.handle(A, enc(type="who", room="general"), 0), A)
    assert (who["members"], who["truncated"], who["count"]) == (["alice", "bob"], True, 3)
    # Within what a reply holds, the whole list and neither key, as before.
    monkeypatch.setattr(core_module, "MAX_MEMBERS_LISTED", 3)
    who = only_reply(core.handle(A, enc(type="who", room="general"), 0), A)
    assert who["members"] == ["alice", "bob", "carol"]
    assert "truncated" not in who and "count" not in who


def test_the_longest_member_list_fits_what_a_client_takes_in_one_reply() -> None:
    names = [f"{i:05d}".ljust(32, "x") for i in range(core_module.MAX_MEMBERS_LISTED)]
    reply = {"type": "who", "room": "r" * 32, "members": names, "truncated": True, "count": 10**9, "id": "i" * 64}
    reply["mark"] = p.mark(10**9, "f" * 16)
    assert len(p.encode(reply)) < p.MAX_REPLY_BYTES


def test_bye_without_rooms() -> None:
    core = make_core()
    hello(core, A, "alice")
    assert core.handle(A, enc(type="bye"), 0) == []
    assert not core.by_name


def test_expire_ends_silent_sessions_only() -> None:
    core = make_core()
    hello(core, A, "alice", 0)
    hello(core, B, "bob", 0)
    hello(core, C, "carol", 0)
    join(core, A, "general", 0)
    join(core, B, "general", 0)
    join(core, A, "dev", 0)
    core.handle(B, enc(type="ping"), 2000)  # bob stays active
    seq_general = core.seqs["general"]
    assert core.expire(3 * HB) == []  # silent exactly 3 x heartbeat: not yet
    assert len(core.by_identity) == 3
    actions = core.expire(3 * HB + 1)
    assert all(isinstance(a, Publish) for a in actions)
    assert sorted((a.room, a.env["name"], a.env["event"], a.env["seq"]) for a in publishes(actions)) == [
        ("dev", "alice", "leave", 2),
        ("general", "alice", "leave", seq_general + 1),
    ]
    assert all(a.env["ts"] == 3 * HB + 1 for a in publishes(actions))
    assert set(core.by_name) == {"bob"}
    assert list(core.members["general"]) == ["bob"]
    # bob expires too once silent long enough
    assert [a.env["name"] for a in publishes(core.expire(2000 + 3 * HB + 1))] == ["bob"]
    assert not core.by_identity
    assert not core.members


T0 = 1_764_054_000_000  # a wall clock's reading, as the loop gives the core
HOUR = 3_600_000


def _to_a(actions: list[Action]) -> list[str]:
    """What alice was answered: each reply's type, or its error code."""
    return [str(r.env.get("code") or r.env["type"]) for r in replies(actions) if r.identity == A]


def _clock_core() -> Core:
    """alice in #general and silent bob, at T0; alice's sends bucket and join bucket used."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=10, burst=2, join_rate=2, join_burst=2))
    hello(core, A, "alice", T0)
    hello(core, B, "bob", T0)
    join(core, A, "general", T0)
    assert _to_a(msg(core, A, "general", "before", "m0", T0)) == ["ack"]
    return core


def test_a_clock_set_back_leaves_rate_limits_their_pace_and_stamps_the_new_time() -> None:
    """Set back an hour, the clock left every bucket an hour in debt: each session's
    messages were refused rate_limited for that hour."""
    core = _clock_core()
    core.clock_stepped(-HOUR)
    now = T0 - HOUR + 100
    acks = [a.env for a in replies(msg(core, A, "general", "after", "m1", now)) if a.identity == A]
    assert [(e["type"], e.get("ts")) for e in acks] == [("ack", now)], acks
    assert _to_a(join(core, A, "dev", now)) == ["joined"]
    # The pace itself is kept: a burst of 2, then 10 a second.
    assert _to_a(msg(core, A, "general", "x", "m2", now)) == ["ack"]
    assert _to_a(msg(core, A, "general", "y", "m3", now)) == ["rate_limited"]


def test_a_clock_set_back_leaves_expiry_its_pace() -> None:
    """A dead session kept its name for the hour the clock went back; alive ones stay."""
    core = _clock_core()
    core.clock_stepped(-HOUR)
    core.handle(A, enc(type="ping"), T0 - HOUR + 2 * HB)  # alice is alive, bob silent
    gone = publishes(core.expire(T0 - HOUR + 3 * HB + 1))
    assert set(core.by_name) == {"alice"}, [a.env for a in gone]


def test_a_clock_set_forward_expires_no_one_alive() -> None:
    """Set forward an hour, every session looked silent for that hour at the next tick."""
    core = _clock_core()
    core.clock_stepped(HOUR)
    assert core.expire(T0 + HOUR + 3 * HB) == []
    assert set(core.by_name) == {"alice", "bob"}
    core.handle(A, enc(type="ping"), T0 + HOUR + 2 * HB)
    core.expire(T0 + HOUR + 3 * HB + 1)
    assert set(core.by_name) == {"alice"}
    # No bucket is filled by the jump either: the burst of 2 is what there is.
    assert _to_a(msg(core, A, "general", "x", "m1", T0 + HOUR)) == ["ack"]
    assert _to_a(msg(core, A, "general", "y", "m2", T0 + HOUR)) == ["rate_limited"]


def test_a_clock_step_moves_holds_debts_and_kept_dms_too() -> None:
    """Every time the core keeps for a timer moves with the clock."""
    core = _clock_core()
    session = core.by_name["alice"]
    session.held_until = T0 + 500
    session.history = core_module.Bucket(5.0, T0)
    core._debts["10.0.0.1"] = (100.0, T0)
    core._keep_dm(core.by_name["bob"], {"type": "dm", "text": "hi"}, T0)
    core.clock_stepped(-HOUR)
    assert session.held_until == T0 - HOUR + 500
    assert session.history.stamp == T0 - HOUR
    assert core._debts["10.0.0.1"] == (100.0, T0 - HOUR)
    assert [ts for ts, _ in core.by_name["bob"].recent_dms or ()] == [T0 - HOUR]
    assert (session.last_seen, session.sends.stamp, session.joins.stamp) == (T0 - HOUR,) * 3


def test_any_request_counts_as_activity() -> None:
    core = make_core()
    hello(core, A, "alice", 0)
    join(core, A, "general", 0)
    now = 0
    requests: list[dict[str, Any]] = [
        {"type": "who", "room": "general"},
        {"type": "rooms"},
        {"type": "history", "room": "general"},
        {"type": "msg", "room": "general", "text": "x", "id": "m"},
        {"type": "hello", "v": 1, "name": "alice"},
    ]
    for request in requests:
        now += 3 * HB
        core.handle(A, p.encode(request), now)
        assert core.expire(now + 3 * HB) == []
        assert A in core.by_identity
    assert len(publishes(core.expire(now + 3 * HB + 1))) == 1


def test_expired_name_is_free_and_old_identity_is_not_registered() -> None:
    core = make_core()
    hello(core, A, "alice", 0)
    core.expire(3 * HB + 1)
    assert error_code(core.handle(A, enc(type="ping"), 3 * HB + 2), A) == "not_registered"
    hello(core, B, "alice", 3 * HB + 3)
    assert core.by_name["alice"].identity == B


# --------------------------------------------------------------------------
# seq across everything


def test_seq_is_contiguous_across_joins_leaves_msgs() -> None:
    core = make_core(general=1000)
    published: list[Publish] = []
    now = 0

    def run(identity: bytes, **env: Any) -> list[Action]:
        nonlocal now
        now += 10
        actions = core.handle(identity, p.encode(env), now)
        published.extend(publishes(actions))
        return actions

    for identity, name in [(A, "alice"), (B, "bob"), (C, "carol")]:
        run(identity, type="hello", v=1, name=name)
    run(A, type="join", room="general")
    run(B, type="join", room="general")
    run(B, type="join", room="dev")
    for i in range(5):
        run(A, type="msg", room="general", text=f"a{i}", id=f"a{i}")
        run(B, type="msg", room="dev", text=f"b{i}", id=f"b{i}")
        run(B, type="msg", room="dev", text=f"b{i}", id=f"b{i}")  # resend: no seq
        run(C, type="msg", room="general", text="not joined", id=f"c{i}")  # error: no seq
    run(C, type="join", room="general")
    run(C, type="join", room="general")  # rejoin: no seq
    run(A, type="leave", room="general")
    run(A, type="leave", room="general")  # not joined: no seq
    run(A, type="join", room="general")
    run(C, type="dm", to="bob", text="private", id="d")  # never a seq
    run(B, type="bye")
    now += 10 * HB
    run(A, type="ping")
    published.extend(publishes(core.expire(now)))  # carol expires

    by_room: dict[str, list[int]] = {}
    for pub in published:
        assert pub.env["room"] == pub.room
        assert pub.env["type"] in {"msg", "presence"}
        by_room.setdefault(pub.room, []).append(pub.env["seq"])
    assert by_room["general"] == list(range(1001, 1001 + len(by_room["general"])))
    assert by_room["dev"] == list(range(1, 1 + len(by_room["dev"])))
    # general: 2 joins, 5 msgs, carol join, alice leave + join, bob leave, carol leave
    assert len(by_room["general"]) == 12
    # dev: bob join, 5 msgs, bob leave
    assert len(by_room["dev"]) == 7
    assert core.seqs == {"general": 1012, "dev": 7}


def test_reject_answers_with_an_error_envelope() -> None:
    core = make_core()
    exc = p.ProtocolError(ErrorCode.RATE_LIMITED, "slow down", "r1")
    assert core.reject(A, exc) == [
        Reply(A, {"type": "error", "code": "rate_limited", "message": "slow down", "id": "r1"})
    ]


def test_a_refused_request_is_still_a_sign_of_life() -> None:
    """A session whose requests are refused (bad text, say) is alive, not silent: it does not expire."""
    core = make_core()
    hello(core, A, "alice", 0)
    refused = only_reply(core.handle(A, enc(type="msg", room="general", text="", id="m1"), 2 * HB), A)
    assert refused["code"] == ErrorCode.BAD_ENVELOPE
    assert core.expire(3 * HB + 1) == []
    assert "alice" in core.by_name
    assert core.expire(5 * HB + 1) == [] and "alice" not in core.by_name  # silent since 2 x HB: now it ends


def test_after_a_rate_limited_refusal_the_session_is_refused_until_that_message_is_back() -> None:
    """So a message already on its way when the refusal reaches the client, however long
    the client takes to read it, is not stored ahead of the refused one (which the client
    resends first)."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=10, burst=1))
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")

    def answer(now: int, **env: Any) -> str:
        reply = [r.env for r in replies(core.handle(A, enc(**env), now)) if r.identity == A]
        if not reply:
            return "delivered"  # a DM: a Direct, not a Reply
        return str(reply[0].get("code") or reply[0]["type"])

    def msg(i: str, now: int) -> str:
        return answer(now, type="msg", room="general", text=i, id=i)

    assert msg("m1", 100) == "ack"
    assert msg("m2", 100) == "rate_limited"  # the bucket is empty
    # Seconds later the bucket is full again, but m2 has not come back: the others wait,
    # DMs too; the refused ones are not remembered as sent.
    assert msg("m3", 3_000) == "rate_limited"
    assert answer(3_100, type="dm", to="bob", text="d1", id="d1") == "rate_limited"
    assert msg("m2", 3_200) == "ack"
    assert msg("m3", 3_300) == "ack"
    assert answer(3_400, type="dm", to="bob", text="d1", id="d1") == "delivered"
    # A client that never resends the refused one is held for at most RATE_HOLD_MAX_MS.
    assert msg("m4", 3_400) == "rate_limited"  # no token left: m4 is the one held now
    assert msg("m5", 3_500) == "rate_limited"
    assert msg("m5", 3_400 + p.RATE_HOLD_MAX_MS) == "ack"


def test_after_a_disk_alarm_refusal_the_session_s_room_messages_wait_for_that_one() -> None:
    """The disk alarm refuses m1 and m2 (sent together); it ends before the client resends
    them, and m2, still on its way, comes first: it is refused, not stored ahead of m1 (a
    CI run saw "during 2" before "during 1"). DMs go on meanwhile, as during the alarm."""
    core = Core(epoch="e", heartbeat_ms=HB, room_seqs={}, limits=Limits(rate=1000, burst=100))
    hello(core, A, "alice")
    hello(core, B, "bob")
    join(core, A, "general")

    def answer(now: int, **env: Any) -> dict[str, Any]:
        reply = [r.env for r in replies(core.handle(A, enc(**env), now)) if r.identity == A]
        return reply[0] if reply else {"type": "delivered"}  # a DM: a Direct, not a Reply

    def msg(i: str, now: int) -> str:
        got = answer(now, type="msg", room="general", text=i, id=i)
        return str(got.get("code") or got["type"])

    core.store_refusal = "the broker's disk is nearly full; nothing was stored, retry later"
    assert msg("m1", 100) == "unavailable"
    assert msg("m2", 100) == "unavailable"
    core.store_refusal = None
    held = answer(200, type="msg", room="general", text="m2", id="m2")
    assert held["code"] == "unavailable" and "(id 'm1') was refused; resend it first" in held["message"]
    assert answer(250, type="dm", to="bob", text="d1", id="d1")["type"] == "delivered"
    first = answer(300, type="msg", room="general", text="m1", id="m1")
    second = answer(300, type="msg", room="general", text="m2", id="m2")
    assert (first["type"], second["type"]) == ("ack", "ack") and first["seq"] < second["seq"]
    # A client that never resends the refused one is held for at most RATE_HOLD_MAX_MS.
    core.store_refusal = "full"
    assert msg("m3", 1_000) == "unavailable"
    core.store_refusal = None
    assert msg("m4", 1_100) == "unavailable"
    assert msg("m4", 1_000 + p.RATE_HOLD_MAX_MS) == "ack"


def test_everyday_refusals_are_info_and_protocol_violations_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """An operator reads warnings as "look at this": a DM to someone offline is not one."""
    core = make_core()
    hello(core, A, "ann")
    caplog.set_level(logging.INFO, logger="zchat.broker")
    assert error_code(core.handle(A, enc(type="dm", to="nobody", text="hi", id="d1"), 1), A) == "no_such_user"
    assert error_code(core.handle(B, enc(type="hello", v=1, name="ann"), 1), B) == "name_taken"
    assert error_code(core.handle(C, enc(type="join", room="general"), 1), C) == "not_registered"
    assert error_code(core.handle(A, b"\xc1", 1), A) == "bad_envelope"
    lines = [r for r in caplog.records if r.getMessage().startswith(("refused", "rejected"))]
    assert [r.getMessage().split(" from ")[0] for r in lines] == ["refused"] * 3 + ["rejected input"]
    levels = [(r.levelname, r.getMessage().split(": ")[1]) for r in lines]
    assert levels == [
        ("INFO", "no_such_user"),
        ("INFO", "name_taken"),
        ("INFO", "not_registered"),
        ("WARNING", "bad_envelope"),
    ]


def test_history_of_a_session_that_ended_before_its_answer_is_refused() -> None:
    """History is answered after the pass's commit: a session that said bye in the same
    pass has no budget left to charge, and gets no history (else asking and saying bye,
    again and again, would have the broker queue replies without end)."""
    core = make_core()
    hello(core, A, "ann")
    (query,) = core.handle(A, enc(type="history", room="general", id="h1"), 1)
    assert isinstance(query, HistoryQuery)
    assert core.history_refused(A, 1) is None
    core.handle(A, enc(type="bye"), 1)
    refused = core.history_refused(A, 1)
    assert refused is not None and refused["code"] == "not_registered"


def test_session_lines_are_bounded_per_second(caplog: pytest.LogCaptureFixture) -> None:
    """hello and bye cost no rate-limit token: in a loop they must not log a line each."""
    core = make_core()
    caplog.set_level(logging.INFO, logger="zchat.broker")
    for i in range(30):
        hello(core, A, "ann", now=1000 + i)
        core.handle(A, enc(type="bye"), 1000 + i)
    hello(core, B, "bob", now=2000)  # the next second: the count of what was left out
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.startswith("session")]) == 21  # 20, then bob's
    assert "... and 40 more session lines not logged" in lines


class _From:
    """A message's connection, as the socket loop hands it over (a zmq.Frame's ``get``)."""

    def __init__(self, host: str) -> None:
        self.host = host

    def get(self, option: str, /) -> object:
        assert option == "Peer-Address"
        return self.host


def test_sessions_per_host_follow_a_resume_and_an_expiry() -> None:
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(max_sessions_per_host=1))

    def hello_from(identity: bytes, name: str, host: str, now: int = 0, **extra: Any) -> dict[str, Any]:
        return only_reply(
            core.handle(identity, enc(type="hello", v=1, name=name, **extra), now, None, _From(host)), identity
        )

    token = hello_from(A, "ann", "10.0.0.1")["resume"]
    refused = hello_from(B, "bob", "10.0.0.1")
    assert refused["code"] == "limit_reached" and "10.0.0.1 has 1 session(s)" in refused["message"]
    # ann moves to another address with her token: the first has room again, the second not.
    moved = core.handle(C, enc(type="hello", v=1, name="ann", resume=token), 0, None, _From("10.0.0.2"))
    assert [r.env["type"] for r in replies(moved)] == ["error", "welcome"] and moved[1].env["resumed"] is True
    assert hello_from(B, "bob", "10.0.0.1")["type"] == "welcome"
    assert hello_from(b"id-d", "cat", "10.0.0.2")["code"] == "limit_reached"
    # Expired sessions free their slots.
    core.expire(10 * HB)
    assert hello_from(b"id-d", "cat", "10.0.0.2", now=10 * HB)["type"] == "welcome"
    assert hello_from(b"id-e", "dan", "10.0.0.1", now=10 * HB)["type"] == "welcome"


def test_the_count_of_lines_left_out_has_the_level_of_those_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Past 20 lines a second the rest are counted: as info when they were info lines (at
    --log-level warning, a warning that counts lines never shown would be noise)."""
    core = make_core()
    hello(core, A, "ann")
    caplog.set_level(logging.INFO, logger="zchat.broker")
    for i in range(25):
        core.handle(A, enc(type="dm", to="nobody", text="hi", id=f"d{i}"), 1000)
    for _ in range(25):
        core.handle(A, b"\xc1", 2000)
    core.handle(A, enc(type="dm", to="nobody", text="hi", id="d99"), 3000)
    core.handle(A, b"\xc1", 3000)
    counts = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("...")]
    assert counts == [
        ("INFO", "... and 5 more refused requests not logged"),
        ("WARNING", "... and 5 more rejected inputs not logged"),
    ]


def test_everyday_refusals_do_not_hide_protocol_violations(caplog: pytest.LogCaptureFixture) -> None:
    """At --log-level warning, 20 refusals (info, not shown) spent the budget of the one
    violation that came after them: it was never shown, only counted."""
    core = make_core()
    hello(core, A, "ann")
    caplog.set_level(logging.WARNING, logger="zchat.broker")
    for i in range(25):
        core.handle(A, enc(type="dm", to="nobody", text="hi", id=f"d{i}"), 1000)
    core.handle(A, b"\xc1", 1000)
    core.handle(A, b"\xc1", 2000)
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(shown) == 2 and all(line.startswith("rejected input") for line in shown), shown
    # At info too: a client that keeps itself refused cannot hide another's violations.
    caplog.clear()
    caplog.set_level(logging.INFO, logger="zchat.broker")
    for i in range(25):
        core.handle(A, enc(type="dm", to="nobody", text="hi", id=f"e{i}"), 5000)
    core.handle(B, b"\xc1", 5000)
    assert any(r.getMessage().startswith("rejected input from 69642d62") for r in caplog.records)


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_host_is_an_ipv4_address_or_an_ipv6_64(address: str, host: str) -> None:
    """One IPv6 host is usually given a /64 and may speak from any address in it."""
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(max_sessions_per_host=1))
    assert core.handle(A, enc(type="hello", v=1, name="ann"), 0, None, _From(address))[0].env["type"] == "welcome"
    refused = core.handle(B, enc(type="hello", v=1, name="bob"), 0, None, _From(address))[0].env
    assert refused["code"] == "limit_reached" and refused["message"].startswith(f"{host} has 1 session(s)")


@pytest.mark.parametrize(
    "env",
    [
        {"type": "hello", "v": 1, "name": "bob", "id": "h"},  # already_registered (step 5)
        {"type": "join", "room": "Bad Room", "id": "j"},  # bad_room (step 2)
        {"type": "nosuch", "id": "n"},  # unknown_type (step 2)
    ],
    ids=lambda env: env["type"],
)
def test_a_refused_request_of_a_session_keeps_it_alive(env: dict[str, Any]) -> None:
    """Every request from the session's connection proves it is there, refused or not;
    a second hello under another name did not (its session expired meanwhile)."""
    core = make_core()
    hello(core, A, "alice", 0)
    assert core.handle(A, p.encode(env), 2 * HB)[0].env["type"] == "error"  # type: ignore[attr-defined]
    assert core.expire(3 * HB + 1) == []
    assert "alice" in core.by_name


def test_a_message_held_for_an_earlier_refusal_names_the_one_to_resend() -> None:
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(rate=1, burst=1))
    hello(core, A, "alice")
    join(core, A, "general")
    assert replies(msg(core, A, "general", "one", "m1"))[0].env["type"] == "ack"
    assert only_reply(msg(core, A, "general", "two", "m2"), A)["code"] == "rate_limited"
    held = only_reply(msg(core, A, "general", "three", "m3"), A)
    assert held["code"] == "rate_limited" and "(id 'm2') was refused; resend it first" in held["message"]


def test_the_messages_held_behind_a_rate_limited_one_are_not_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pipe client streaming faster than the rate limit (`tail -f log | zchat`, as README
    shows) had each message behind a refused one logged as well: 20 lines a second and a
    count, for as long as it streamed (300 lines in, 378 log lines out), all saying what the
    first one had. The refusal itself is still an info line; the held ones are debug."""
    core = Core(epoch="e", heartbeat_ms=HB, limits=Limits(rate=1, burst=1))
    hello(core, A, "alice")
    join(core, A, "general")
    caplog.set_level(logging.INFO, logger="zchat.broker")
    assert replies(msg(core, A, "general", "one", "m1"))[0].env["type"] == "ack"
    for i in range(2, 30):
        assert only_reply(msg(core, A, "general", "more", f"m{i}"), A)["code"] == "rate_limited"
    assert only_reply(msg(core, A, "general", "more", "m99", now=2000), A)["code"] == "rate_limited"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert [line.split(": ", 2)[2] for line in lines] == ["slow down: at most 1 messages a second (burst 1)"], lines
    caplog.set_level(logging.DEBUG, logger="zchat.broker")
    assert only_reply(msg(core, A, "general", "more", "m100", now=2000), A)["code"] == "rate_limited"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("(id 'm2') was refused; resend it first" in line for line in debug), debug


def test_a_hello_under_another_name_than_the_key_refreshes_the_session_too() -> None:
    """With CURVE such a hello is refused (bad_name) before the other hellos: it did not
    refresh the session either."""
    core = Core(epoch="e", heartbeat_ms=HB, authenticated=True)
    core.handle(A, enc(type="hello", v=1, name="alice"), 0, user="alice")
    refused = core.handle(A, enc(type="hello", v=1, name="bob", id="h"), 2 * HB, user="alice")
    assert only_reply(refused, A)["code"] == "bad_name"
    assert core.expire(3 * HB + 1) == []
    assert "alice" in core.by_name


def test_a_leave_says_why_when_it_was_no_leave_request() -> None:
    """As IRC's quit messages: a leave request has no reason; a bye is "quit", a silent
    session "timeout", a revoked key "revoked"."""
    core = make_core(general=1)
    for identity, name in ((A, "alice"), (B, "bob"), (b"\x00c", "carol"), (b"\x00d", "dave")):
        hello(core, identity, name, now=0)
        join(core, identity, "general", now=0)
    left = publishes(core.handle(A, enc(type="leave", room="general"), 10))
    bye = publishes(core.handle(B, enc(type="bye"), 10))
    revoked = publishes(core.revoke(["carol"], 10))
    expired = publishes(core.expire(3 * HB + 1))
    reasons = [(a.env["name"], a.env.get("reason")) for a in left + bye + revoked + expired]
    assert reasons == [("alice", None), ("bob", "quit"), ("carol", "revoked"), ("dave", "timeout")]
    assert all(p.is_presence(p.encode(a.env)) for a in left + bye + revoked + expired)
