"""Property tests: the wire module only ever raises ProtocolError, the core keeps its
invariants, and the client's gap fetch never loses an event.

Every property is bounded (``max_examples``, ``deadline=None``) so the whole file
runs in a few seconds: it is pure code, no broker (the client of (e) makes its
sockets but never reaches one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.core import Action, Core, Direct, HistoryQuery, Publish, Reply
from zchat import protocol as p
from zchat.protocol import ErrorCode, ProtocolError

CODES = {str(code) for code in ErrorCode}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# (a) decode_request on hostile input

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10) | ints, children, max_size=5)
    ),
    max_leaves=25,
)

FIELDS = ["v", "name", "room", "text", "id", "to", "after", "limit", "resume", "action", "from", "sender"]
plausible: st.SearchStrategy[Any] = st.sampled_from(
    [
        *[1, 0, 2, -1, 500, 501, 2**63 - 1, True, False, None],
        *["", "alice", "general", "General", "-x", ".x", "x" * 33, "hi", "é", "x" * 65, "x" * 4001],
        *[[], {}, [[[[]]]]],
    ]
)
envelopes = st.fixed_dictionaries(
    {"type": st.sampled_from([*sorted(p.REQUEST_TYPES), "welcome", "nope", ""]) | st.text(max_size=8)},
    optional={key: plausible | values for key in FIELDS},
)


def check_decode(frame: bytes) -> None:
    """``decode_request`` returns a valid request or raises a coded ProtocolError: nothing else."""
    try:
        env = p.decode_request(frame)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert str(exc.code) in CODES
        assert exc.request_id is None or (isinstance(exc.request_id, str) and 0 < len(exc.request_id) <= 64)
        reply = exc.to_envelope()
        assert reply["type"] == "error"
        assert p.decode(p.encode(reply)) == reply
        return
    assert isinstance(env, dict)
    assert env["type"] in p.REQUEST_TYPES
    assert all(isinstance(key, str) for key in env)
    rid = env.get("id")
    assert rid is None or (isinstance(rid, str) and 0 < len(rid) <= p.MAX_ID_CHARS)
    if env["type"] in {"join", "leave", "msg", "history", "who"}:
        assert p.is_room(env["room"])
    if env["type"] == "dm":
        assert p.is_name(env["to"])
    if env["type"] in {"msg", "dm"}:
        assert isinstance(env["text"], str) and 0 < len(env["text"]) <= p.MAX_TEXT_CHARS
        assert isinstance(env["id"], str)
    if env["type"] == "history":
        assert env["after"] >= 0 and 1 <= env["limit"] <= p.MAX_HISTORY_LIMIT
    if env["type"] == "hello":
        assert env["v"] == p.VERSION and p.is_name(env["name"])
    # an accepted request is a fixed point of encode/decode
    assert p.decode_request(p.encode(env)) == env


@FAST
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes(frame: bytes) -> None:
    check_decode(frame)


@FAST
@given(values)
def test_decode_arbitrary_msgpack(value: object) -> None:
    check_decode(msgpack.packb(value, use_bin_type=True))


@FAST
@given(envelopes)
def test_decode_envelope_shaped_maps(env: dict[str, Any]) -> None:
    check_decode(msgpack.packb(env, use_bin_type=True))


def _general_decision(frame: bytes) -> dict[str, Any] | tuple[str, str, str | None]:
    """What the general checks alone decide: the request, or the refusal's code, text and id."""
    try:
        return p.validate_request(p.decode(frame))
    except ProtocolError as exc:
        return (str(exc.code), str(exc), exc.request_id)


msg_shaped = st.builds(
    lambda extra, env: {**extra, **env},
    st.dictionaries(st.text(max_size=5), plausible | values, max_size=2),
    st.fixed_dictionaries(
        {"type": st.just("msg")},
        optional={
            "id": st.text(max_size=70) | plausible,
            "room": st.sampled_from(["general", "a" * 32, "a" * 33, "General", "", "é", "x y"]) | plausible,
            "text": st.text(max_size=30) | st.sampled_from(["x" * 4000, "x" * 4001]) | plausible,
            "action": st.booleans() | plausible,
        },
    ),
)


@FAST
@given(msg_shaped | envelopes, st.booleans())
@example({"type": "msg", "id": "a", "room": "general", "text": "hi", "action": "yes"}, False)
@example({"type": "msg", "id": "a", "room": "general", "text": "hi"}, True)
@example({"type": "msg", "id": "a" * 65, "room": "general", "text": "hi"}, False)
@example({"type": "msg", "id": "a", "room": "general", "text": "x" * 4001}, False)
@example({"type": "msg", "id": "a", "room": "Gen", "text": "hi"}, False)
@example({"type": "msg", "id": "a", "room": "general", "text": "hi", "to": 2**64 - 1}, False)
def test_message_fast_path_decides_as_the_general_checks(env: dict[str, Any], bin_keys: bool) -> None:
    """decode_request's one-pass check of a plain msg accepts exactly what the general
    checks accept, and leaves every refusal (its code, text and id) to them."""
    if bin_keys and env:
        env = {**env, b"x": "y"}  # a bin key: strict_map_key lets it through msgpack
    frame = msgpack.packb(env, use_bin_type=True)
    try:
        fast: dict[str, Any] | tuple[str, str, str | None] = p.decode_request(frame)
    except ProtocolError as exc:
        fast = (str(exc.code), str(exc), exc.request_id)
    assert fast == _general_decision(frame)


@FAST
@given(
    envelopes,
    st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_decode_mutated_frames(env: dict[str, Any], edits: list[tuple[str, int, int]]) -> None:
    frame = bytearray(msgpack.packb(env, use_bin_type=True))
    for op, where, byte in edits:
        i = where % (len(frame) + 1)
        if op == "flip" and i < len(frame):
            frame[i] = byte
        elif op == "cut":
            del frame[i:]
        elif op == "insert":
            frame.insert(i, byte)
        elif op == "delete" and i < len(frame):
            del frame[i]
    check_decode(bytes(frame))


# --------------------------------------------------------------------------
# (b) the core under random sequences of operations

HB = 1000
IDENTS = [b"\x00k0", b"\x00k1", b"\x00k2", b"\x00k3"]
NAMES = ["alice", "bob", "carol", ".bad"]
ROOMS = ["general", "dev", "Bad"]
MSG_IDS = ["m0", "m1", "m2"]
REPLY_TYPES = {"welcome", "joined", "left", "ack", "dm", "who", "rooms", "pong", "error"}

ident_i = st.integers(0, len(IDENTS) - 1)
name_i = st.integers(0, len(NAMES) - 1)
room_i = st.integers(0, len(ROOMS) - 1)
dt = st.integers(0, 20) | st.integers(0, 20) | st.integers(0, 4000)

hellos = st.tuples(st.just("hello"), dt, ident_i, name_i)
joins = st.tuples(st.just("join"), dt, ident_i, room_i)
msgs = st.tuples(st.just("msg"), dt, ident_i, room_i, st.sampled_from(MSG_IDS))
operations = st.one_of(
    # the common operations are listed more than once to weigh them up
    hellos,
    hellos,
    st.tuples(st.just("resume"), dt, ident_i, name_i, st.booleans()),
    joins,
    joins,
    st.tuples(st.just("leave"), dt, ident_i, room_i),
    msgs,
    msgs,
    msgs,
    st.tuples(st.just("dm"), dt, ident_i, name_i),
    st.tuples(st.just("history"), dt, ident_i, room_i, st.integers(1, 2000)),
    st.tuples(st.just("who"), dt, ident_i, room_i),
    st.tuples(st.just("rooms"), dt, ident_i),
    st.tuples(st.just("ping"), dt, ident_i),
    st.tuples(st.just("bye"), dt, ident_i),
    st.tuples(st.just("expire"), st.integers(0, 4000)),
    st.tuples(st.just("garbage"), dt, ident_i, st.binary(max_size=40)),
    st.tuples(st.just("junk"), dt, ident_i, envelopes),
)


@dataclass
class World:
    core: Core = field(default_factory=lambda: Core(epoch="e", heartbeat_ms=HB, room_seqs={"general": 10}))
    now: int = 0
    last_seq: dict[str, int] = field(default_factory=lambda: {"general": 10})
    #: the resume token of each name's live session, as its welcome said
    tokens: dict[str, str] = field(default_factory=dict)
    #: (name, id) -> where that message went ("room" or "@name"): resend detection
    used_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    dm_count: int = 0

    def send(self, identity: bytes, env: dict[str, Any] | bytes) -> list[Action]:
        frame = env if isinstance(env, bytes) else p.encode(env)
        return self.core.handle(identity, frame, self.now)


def check_state(core: Core) -> None:
    assert len(core.by_name) == len(core.by_identity)
    for name, session in core.by_name.items():
        assert session.name == name
        assert core.by_identity[session.identity] is session
    for identity, session in core.by_identity.items():
        assert session.identity == identity
        assert core.by_name[session.name] is session
        for room in session.rooms:
            assert core.members[room][session.name] is session
    for room, members in core.members.items():
        assert members, f"empty member map left for {room}"
        for name, session in members.items():
            assert core.by_name.get(name) is session
            assert room in session.rooms


def check_actions(world: World, actions: list[Action]) -> None:
    core = world.core
    resumed = {a.identity for a in actions if isinstance(a, Reply) and a.env["type"] == "welcome" and a.env["resumed"]}
    for action in actions:
        if isinstance(action, Publish):
            env = action.env
            assert env["type"] in {"msg", "presence"}, env
            assert env["type"] != "dm"
            assert env["room"] == action.room
            assert p.is_room(action.room)
            assert env["seq"] == world.last_seq.get(action.room, 0) + 1, (env, world.last_seq)
            assert env["ts"] == world.now
            world.last_seq[action.room] = env["seq"]
        elif isinstance(action, Reply):
            env = action.env
            assert env["type"] in REPLY_TYPES, env
            if env["type"] == "error":
                assert env["code"] in CODES, env
            # A DM goes as a Direct, whose ack depends on its delivery; a Reply only when
            # a resume sends the session's kept DMs again (acked when they first went).
            assert env["type"] != "dm" or action.identity in resumed, env
            # every reply travels as a valid envelope
            assert p.decode(p.encode(env), p.MAX_REPLY_BYTES) == env
        elif isinstance(action, Direct):
            target = core.by_name.get(action.env["to"])
            assert target is not None and target.identity == action.identity
            assert action.env["type"] == "dm" and action.ack["type"] == "ack"
            assert action.ack["id"] == action.env["id"]
            for env in (action.env, action.ack):
                assert p.decode(p.encode(env), p.MAX_REPLY_BYTES) == env
        else:
            assert isinstance(action, HistoryQuery)
            assert 1 <= action.limit <= p.MAX_HISTORY_LIMIT
            assert action.after >= 0
            assert p.is_room(action.room)
    for room, seq in world.last_seq.items():
        assert core.seqs.get(room, 0) == seq
    for room, seq in core.seqs.items():
        assert world.last_seq.get(room, 0) == seq


def errors(actions: list[Action]) -> list[str]:
    return [a.env["code"] for a in actions if isinstance(a, Reply) and a.env["type"] == "error"]


def reply_envs(actions: list[Action]) -> list[dict[str, Any]]:
    """What the author hears: replies, and a delivered DM's ack."""
    assert all(isinstance(a, Reply | Direct) for a in actions)
    return [a.env if isinstance(a, Reply) else a.ack for a in actions if isinstance(a, Reply | Direct)]


def run_op(world: World, op: tuple[Any, ...]) -> list[Action]:
    core = world.core
    kind = op[0]
    if kind == "expire":
        world.now += op[1]
        before = {s.identity: (s.name, s.last_seen, len(s.rooms)) for s in core.by_identity.values()}
        actions = core.expire(world.now)
        deadline = world.now - 3 * HB
        gone = set(before) - set(core.by_identity)
        assert all(before[i][1] < deadline for i in gone)
        assert all(s.last_seen >= deadline for s in core.by_identity.values())
        assert len(actions) == sum(before[i][2] for i in gone)
        assert all(isinstance(a, Publish) and a.env["event"] == "leave" for a in actions)
        return actions

    world.now += op[1]
    identity = IDENTS[op[2]]
    pre = core.by_identity.get(identity)
    pre_name = pre.name if pre else None
    pre_rooms = set(pre.rooms) if pre else set()

    if kind in {"hello", "resume"}:
        name = NAMES[op[3]]
        env: dict[str, Any] = {"type": "hello", "v": 1, "name": name}
        holder = core.by_name.get(name)
        old_identity = holder.identity if holder is not None else None
        real = kind == "resume" and op[4] and name in world.tokens
        if kind == "resume":
            env["resume"] = world.tokens[name] if real else "not-the-token"
        actions = world.send(identity, env)
        # A resume also tells the connection the session leaves (session_moved).
        told = [a for a in actions if isinstance(a, Reply) and a.identity != identity]
        own = [a for a in actions if a not in told]
        assert own, actions
        reply, *again = reply_envs(own)
        # A resume sends the session's kept DMs again after its welcome (Core._dms_again): only then.
        assert not again or (reply["type"] == "welcome" and reply["resumed"] is True and real), own
        assert all(env["type"] == "dm" for env in again), own
        if not p.is_name(name):
            assert errors(own) == ["bad_name"]
        elif pre is not None:
            assert errors(own) == ([] if pre_name == name else ["already_registered"])
        elif holder is not None:
            if real:
                assert reply["type"] == "welcome" and reply["resumed"] is True
                assert core.by_name[name].identity == identity
                assert holder.identity == identity
                assert [(a.identity, a.env["code"]) for a in told] == [(old_identity, "session_moved")]
            else:
                assert errors(own) == ["name_taken"]
                assert core.by_name[name] is holder
        else:
            assert reply["type"] == "welcome" and reply["resumed"] is False
        assert not told or (holder is not None and real and pre is None)
        if reply["type"] == "welcome":
            world.tokens[name] = reply["resume"]
        return actions

    if kind == "garbage":
        return world.send(identity, op[3])
    if kind == "junk":
        try:
            frame = msgpack.packb(op[3], use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return []
        return world.send(identity, frame)

    if kind in {"join", "leave", "who"}:
        env = {"type": kind, "room": ROOMS[op[3]]}
    elif kind == "msg":
        env = {"type": "msg", "room": ROOMS[op[3]], "text": "hi", "id": op[4], "from": "x", "sender": "y"}
    elif kind == "dm":
        world.dm_count += 1
        env = {"type": "dm", "to": NAMES[op[3]], "text": "psst", "id": f"d{world.dm_count}"}
    elif kind == "history":
        env = {"type": "history", "room": ROOMS[op[3]], "limit": op[4]}
    else:
        env = {"type": kind}
    # An earlier DM of this session to the same person was refused (no_such_user, say, before
    # they came): until it is resent, or DM_HOLD_MS after, later ones are refused undelivered.
    hold = pre.dm_holds.get(p.name_key(env["to"])) if kind == "dm" and pre and pre.dm_holds else None
    dm_held = hold is not None and world.now < hold.until
    actions = world.send(identity, env)

    room = env.get("room")
    if pre is None:
        if room is not None and not p.is_room(room):
            assert errors(actions) == ["bad_room"]
        elif kind == "dm" and not p.is_name(env["to"]):
            assert errors(actions) == ["bad_name"]
        else:
            assert errors(actions) == ["not_registered"]
        return actions
    if room is not None and not p.is_room(room):
        assert errors(actions) == ["bad_room"]
        return actions
    pubs = [a for a in actions if isinstance(a, Publish)]
    # a session over one of the broker's limits gets a coded error and nothing happens
    limited = errors(actions) in (["rate_limited"], ["limit_reached"])
    if limited:
        assert not pubs
        assert core.by_identity[identity].rooms == pre_rooms
    used = world.used_ids.get((pre_name, env.get("id", ""))) if pre_name is not None else None
    if kind == "msg" and used is not None:
        # a (name, id) seen before: the same message is re-acked, another one refused
        if used == room:
            assert [e["type"] for e in reply_envs(actions)] == ["ack"] and not pubs
        else:
            assert errors(actions) == ["bad_envelope"] and not pubs
    elif kind == "msg":
        if room not in pre_rooms:
            assert errors(actions) == ["not_joined"] and not pubs
        elif not limited:
            assert errors(actions) == []
            assert len(pubs) <= 1
            for pub in pubs:
                assert pub.env["from"] == pre_name
                assert pub.env["sender"] == pre.sender
            if pubs:
                world.used_ids[(pre_name, env["id"])] = room
    elif kind == "join" and not limited:
        assert len(pubs) == (0 if room in pre_rooms else 1)
        assert room in core.by_identity[identity].rooms
    elif kind == "leave" and not limited:
        assert errors(actions) == ([] if room in pre_rooms else ["not_joined"])
        assert room not in core.by_identity[identity].rooms
    elif kind == "dm":
        if not p.is_name(env["to"]):
            assert errors(actions) == ["bad_name"]
        elif env["to"] not in core.by_name:
            assert errors(actions) == ["no_such_user"]
        elif dm_held:
            assert errors(actions) == ["undelivered"]
        elif not limited:
            assert [(type(a).__name__, a.env["type"]) for a in actions] == [("Direct", "dm")]
        assert not pubs
    elif kind == "bye":
        assert identity not in core.by_identity
        assert pre_name not in core.by_name
        assert len(pubs) == len(pre_rooms)
        if pre_name is not None:
            world.tokens.pop(pre_name, None)
    elif kind == "ping":
        assert reply_envs(actions) == [{"type": "pong", "seqs": {r: core.seqs[r] for r in pre_rooms}}]
    return actions


#: Three sessions in two rooms to start from, so short sequences reach the interesting states.
PRELUDE: list[tuple[Any, ...]] = [
    ("hello", 0, 0, 0),
    ("hello", 0, 1, 1),
    ("hello", 0, 2, 2),
    ("join", 0, 0, 0),
    ("join", 0, 1, 0),
    ("join", 0, 1, 1),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.booleans(), st.lists(operations, min_size=10, max_size=80))
# A DM to a name nobody holds, then that person comes, then another DM: held (found in CI).
@example(False, [("hello", 0, 1, 1), ("dm", 0, 1, 0), ("hello", 0, 0, 0), ("dm", 0, 1, 0)])
def test_core_random_sequences(prelude: bool, ops: list[tuple[Any, ...]]) -> None:
    world = World()
    for op in (PRELUDE if prelude else []) + ops:
        actions = run_op(world, op)
        check_actions(world, actions)
        check_state(world.core)
        # tokens of sessions that ended (expired, bye) are forgotten by the core
        for name in list(world.tokens):
            if name not in world.core.by_name:
                del world.tokens[name]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=p.MAX_ID_CHARS))
def test_hello_with_any_resume_token_never_raises(token: str) -> None:
    """A stranger presenting any well-formed token for a live name gets ``name_taken``, never a crash."""
    core = Core(epoch="e", heartbeat_ms=HB)
    core.handle(b"owner", p.encode(p.hello("alice")), 0)
    real = core.by_name["alice"].token
    actions = core.handle(b"stranger", p.encode(p.hello("alice", "h", token)), 1)
    assert len(actions) == 1
    reply = actions[0]
    assert isinstance(reply, Reply) and reply.identity == b"stranger"
    if token == real:
        assert reply.env["type"] == "welcome"
    else:
        assert reply.env["type"] == "error"
        assert reply.env["code"] == "name_taken"
        assert core.by_name["alice"].identity == b"owner"


# --------------------------------------------------------------------------
# (e) the client's gap fetch over a history whose start the broker deleted


@dataclass
class _Gap:
    last: int  # the room's last delivered seq
    held: set[int]  # events SUB brought past it, waiting for the gap to fill
    first_kept: int  # the oldest seq the broker's store still has
    top: int  # the room's seq


@st.composite
def _gaps(draw: st.DrawFn) -> _Gap:
    last = draw(st.integers(0, 50))
    top = draw(st.integers(last + 1, last + 60))
    # last + 1 is the gap's start: SUB lost it, or there would be no fetch.
    held = draw(st.sets(st.integers(last + 2, top), max_size=20)) if top >= last + 2 else set()
    first_kept = draw(st.integers(1, top))
    return _Gap(last, held, first_kept, top)


@settings(max_examples=300, deadline=None)
@given(_gaps(), st.integers(1, 60))
def test_a_gap_fetch_never_skips_an_event_it_has_or_one_the_store_has(gap: _Gap, limit: int) -> None:
    """Whatever the client holds and wherever the store now starts, the reply to its fetch
    moves the room on without dropping an event it holds or one the store still has, and
    what it passes over is exactly what neither has, said once."""
    from client.lib import Client, _Room

    client = Client("me", "127.0.0.1", 1, 2)  # never connected: nothing is sent
    try:
        state = client._rooms["r"] = _Room(last=gap.last, joined=True)

        def env(seq: int) -> dict[str, Any]:
            return {"type": "msg", "room": "r", "seq": seq, "ts": 1, "from": "x", "text": f"t{seq}", "id": f"i{seq}"}

        for seq in gap.held:
            state.pending[seq] = env(seq)
        stored = [s for s in range(max(gap.last + 1, gap.first_kept), gap.top + 1)][:limit]
        state.fetching, state.fetch_after = True, gap.last
        client._on_fetched("r", {"type": "history", "room": "r", "seq": gap.top, "messages": [env(s) for s in stored]})
        events = client.drain_events()
        shown = [e.seq for e in events if e.type == "msg"]
        skipped = [e for e in events if e.type == "status" and e.event == "skipped"]
        # Shown in order, each once, from last + 1 on, and never anything but what exists.
        assert shown == sorted(set(shown)) and all(s is not None and s > gap.last for s in shown)
        known = gap.held | set(stored)
        assert set(shown) <= known
        assert min(known) in shown  # and it moves on: the first event it has is shown at once
        # Nothing held or fetched is lost: shown, or still waiting past the new last.
        assert state.last is not None
        assert all(s in shown or (s in state.pending and s > state.last) for s in known)
        # Passed over: only what neither the client nor the store has, in one run, said once.
        passed = set(range(gap.last + 1, state.last + 1)) - set(shown)
        assert not passed & known
        if passed:
            assert len(skipped) == 1 and skipped[0].seq == max(passed)
            assert passed == set(range(min(passed), max(passed) + 1)) and min(passed) == gap.last + 1
            assert min(passed) >= 1 and max(passed) < gap.first_kept  # the store really had none of them
        else:
            assert not skipped
    finally:
        client.close(0)


# (e) the client library reading envelopes of a broker that speaks nonsense

_REPLY_TYPES = ["ack", "error", "joined", "left", "history", "who", "rooms", "pong", "welcome", "msg", "presence", "dm"]
_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
)
_REPLY_KEYS = [
    "id",
    "seq",
    "ts",
    "room",
    "from",
    "to",
    "text",
    "members",
    "messages",
    "rooms",
    "code",
    "seqs",
    "sender",
]


@pytest.fixture
def reader(tmp_path: Any) -> Any:
    from client.lib import Client
    from tests.conftest import HOST, RunningBroker

    broker = RunningBroker(tmp_path / "d").start()
    client = Client("alice", HOST, broker.port, broker.pub_port)
    try:
        client.connect()
        client.join("r")
        yield client
    finally:
        client.close(settle=0)
        broker.stop()


# One client absorbs every example's envelopes, as a long-lived bot would (it may end up
# closed by a session_moved: then the rest checks that a closed client stays quiet).
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    envs=st.lists(
        st.tuples(
            st.sampled_from(_REPLY_TYPES),
            st.fixed_dictionaries({}, optional=dict.fromkeys(_REPLY_KEYS, _ANY_VALUE)),
            st.sampled_from(["own", "room", "none"]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_client_survives_any_envelope_from_its_broker(
    reader: Any, envs: list[tuple[str, dict[str, Any], str]]
) -> None:
    """Whatever well-framed envelope a broker sends (a broker of another version, or a
    false one on an open LAN), the client goes on: no exception out of its reader."""
    from client.lib import ZchatError

    client = reader
    if not client._unacked and client.state == "connected":
        client.send("r", "mine")
    for kind, fields, aim in envs:
        env = {"type": kind, **fields}
        if aim == "own" and client._unacked:
            env["id"] = next(iter(client._unacked))  # as if it answered our message
        if aim == "room":
            env["room"] = "r"
        try:
            client._on_direct(env)
            client.pump(0)
        except ZchatError:
            pass  # a coded error of ours (session_moved, say): a refusal, not a crash
        client.drain_events()
    assert client.state in ("connected", "reconnecting", "closed")
