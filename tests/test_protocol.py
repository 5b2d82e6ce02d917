"""The wire module on its own: builders, decode, validation, limits. No sockets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from zchat import protocol as p
from zchat.protocol import ErrorCode, ProtocolError


def pack(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def code_of(frame: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        p.decode_request(frame)
    assert isinstance(info.value.code, ErrorCode)
    return info.value.code


def error_of(frame: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        p.decode_request(frame)
    return info.value


def ping_with(value_bytes: bytes) -> bytes:
    """A ``ping`` envelope whose ``x`` field is the given raw msgpack bytes."""
    return b"\x82\xa4type\xa4ping\xa1x" + value_bytes


VALID_MSG: dict[str, Any] = {"type": "msg", "room": "general", "text": "hi", "id": "m1"}


# --------------------------------------------------------------------------
# builders round-trip


BUILT: list[tuple[str, dict[str, Any]]] = [
    ("error", p.error(ErrorCode.BAD_ROOM, "no such room")),
    ("error-id", p.error(ErrorCode.TOO_LARGE, "big", "r7")),
    ("hello", p.hello("alice")),
    ("hello-id", p.hello("alice", "r1")),
    ("hello-resume", p.hello("alice", "r1", "tok-en_1")),
    ("welcome", p.welcome("alice", "abcd", "ep", 5000, "tok", False, None)),
    ("welcome-id", p.welcome("alice", "abcd", "ep", 5000, "tok", True, "r2")),
    ("msg", p.msg_event("general", 12, 1_700_000_000_000, "alice", "abcd", "héllo ✓", "m1")),
    ("msg-action", p.msg_event("general", 13, 1, "alice", "abcd", "waves", "m2", True)),
    ("presence-join", p.presence_event("general", 1, 5, "bob", "join")),
    ("presence-leave", p.presence_event("dev", 2**40, 5, "bob", "leave")),
    ("dm", p.dm_event("alice", "abcd", "bob", "psst", 9, "d1")),
]


@pytest.mark.parametrize(("label", "env"), BUILT, ids=[label for label, _ in BUILT])
def test_builder_round_trip(label: str, env: dict[str, Any]) -> None:
    frame = p.encode(env)
    assert p.decode(frame) == env
    assert p.Encoder()(env) == frame
    assert isinstance(env["type"], str)


def test_builder_shapes() -> None:
    assert p.error(ErrorCode.NOT_JOINED, "m", "r") == {"type": "error", "code": "not_joined", "message": "m", "id": "r"}
    assert "id" not in p.error(ErrorCode.NOT_JOINED, "m")
    assert p.hello("bob") == {"type": "hello", "v": 1, "name": "bob"}
    assert p.hello("bob", "i", "t") == {"type": "hello", "v": 1, "name": "bob", "resume": "t", "id": "i"}
    assert p.welcome("bob", "s", "e", 10, "t", False, "x") == {
        "type": "welcome",
        "v": 1,
        "name": "bob",
        "sender": "s",
        "epoch": "e",
        "heartbeat_ms": 10,
        "resume": "t",
        "resumed": False,
        "id": "x",
    }
    assert "id" not in p.welcome("bob", "s", "e", 10, "t", True, None)
    assert p.msg_event("r", 1, 2, "a", "s", "t", "i") == {
        "type": "msg",
        "room": "r",
        "seq": 1,
        "ts": 2,
        "from": "a",
        "sender": "s",
        "text": "t",
        "id": "i",
    }
    assert "action" not in p.msg_event("r", 1, 2, "a", "s", "t", "i", False)
    assert p.msg_event("r", 1, 2, "a", "s", "t", "i", True)["action"] is True
    assert p.presence_event("r", 1, 2, "a", "join") == {
        "type": "presence",
        "room": "r",
        "seq": 1,
        "ts": 2,
        "name": "a",
        "event": "join",
    }
    assert p.dm_event("a", "s", "b", "t", 3, "i") == {
        "type": "dm",
        "from": "a",
        "sender": "s",
        "to": "b",
        "text": "t",
        "ts": 3,
        "id": "i",
    }


@pytest.mark.parametrize("resume", [None, "t", "r" * p.MAX_ID_CHARS])
@pytest.mark.parametrize("request_id", [None, "r1"])
def test_hello_builder_is_a_valid_request(request_id: str | None, resume: str | None) -> None:
    env = p.decode_request(p.encode(p.hello("alice", request_id, resume)))
    assert env["name"] == "alice"
    assert env["v"] == p.VERSION
    assert env.get("id") == request_id
    assert env.get("resume") == resume


def test_protocol_error_to_envelope() -> None:
    exc = ProtocolError(ErrorCode.NAME_TAKEN, "taken", "r9")
    assert exc.to_envelope() == {"type": "error", "code": "name_taken", "message": "taken", "id": "r9"}
    assert "id" not in ProtocolError(ErrorCode.NAME_TAKEN, "taken").to_envelope()
    assert p.decode(p.encode(exc.to_envelope()))["code"] == "name_taken"


@pytest.mark.parametrize(
    "code",
    [
        "bad_envelope",
        "unsupported_version",
        "bad_name",
        "name_taken",
        "not_registered",
        "unknown_type",
        "bad_room",
        "not_joined",
        "no_such_user",
        "too_large",
        "rate_limited",
    ],
)
def test_design_error_codes_exist(code: str) -> None:
    assert ErrorCode(code) == code


# --------------------------------------------------------------------------
# valid requests


VALID_REQUESTS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"type": "hello", "v": 1, "name": "alice"}, {"type": "hello", "v": 1, "name": "alice"}),
    (
        {"type": "hello", "v": 1, "name": "Bob_2.x-y", "id": "h"},
        {"type": "hello", "v": 1, "name": "Bob_2.x-y", "id": "h"},
    ),
    ({"type": "join", "room": "general"}, {"type": "join", "room": "general"}),
    ({"type": "join", "room": "a-b_c9", "id": "j"}, {"type": "join", "room": "a-b_c9", "id": "j"}),
    (
        {"type": "hello", "v": 1, "name": "alice", "resume": "abc"},
        {"type": "hello", "v": 1, "name": "alice", "resume": "abc"},
    ),
    ({"type": "leave", "room": "general"}, {"type": "leave", "room": "general"}),
    ({**VALID_MSG, "action": True}, {**VALID_MSG, "action": True}),
    ({**VALID_MSG, "action": False}, {**VALID_MSG, "action": False}),
    (dict(VALID_MSG), dict(VALID_MSG)),
    (
        {"type": "msg", "room": "general", "text": "x", "id": "m", "from": "mallory", "sender": "fake"},
        {"type": "msg", "room": "general", "text": "x", "id": "m", "from": "mallory", "sender": "fake"},
    ),
    ({"type": "dm", "to": "bob", "text": "psst", "id": "d1"}, {"type": "dm", "to": "bob", "text": "psst", "id": "d1"}),
    ({"type": "history", "room": "general"}, {"type": "history", "room": "general", "after": 0, "limit": 100}),
    (
        {"type": "history", "room": "general", "after": 7, "limit": 3},
        {"type": "history", "room": "general", "after": 7, "limit": 3},
    ),
    (
        {"type": "history", "room": "general", "limit": 10_000},
        {"type": "history", "room": "general", "after": 0, "limit": p.MAX_HISTORY_LIMIT},
    ),
    (
        {"type": "history", "room": "general", "limit": p.MAX_HISTORY_LIMIT},
        {"type": "history", "room": "general", "after": 0, "limit": p.MAX_HISTORY_LIMIT},
    ),
    (
        {"type": "history", "room": "general", "after": 2**63 - 1, "limit": 1},
        {"type": "history", "room": "general", "after": 2**63 - 1, "limit": 1},
    ),
    ({"type": "who", "room": "general"}, {"type": "who", "room": "general"}),
    ({"type": "rooms"}, {"type": "rooms"}),
    ({"type": "ping"}, {"type": "ping"}),
    ({"type": "ping", "id": "p" * p.MAX_ID_CHARS}, {"type": "ping", "id": "p" * p.MAX_ID_CHARS}),
    ({"type": "bye"}, {"type": "bye"}),
    # unknown extra keys are ignored; nil and nested values within the depth limit are fine
    ({"type": "ping", "x": None, "y": [1, "a", True], "z": {"k": [None]}}, None),
]


@pytest.mark.parametrize(("env", "expected"), VALID_REQUESTS, ids=[str(e) for e, _ in VALID_REQUESTS])
def test_decode_request_accepts(env: dict[str, Any], expected: dict[str, Any] | None) -> None:
    got = p.decode_request(pack(env))
    assert got == (env if expected is None else expected)


def test_every_design_request_type_is_known() -> None:
    design = {"hello", "join", "leave", "msg", "dm", "history", "who", "rooms", "ping", "bye"}
    assert design == p.REQUEST_TYPES


@pytest.mark.parametrize("text", ["x" * p.MAX_TEXT_CHARS, "é" * p.MAX_TEXT_CHARS, "😀" * p.MAX_TEXT_CHARS, " "])
def test_text_limit_counts_characters(text: str) -> None:
    assert p.decode_request(pack({**VALID_MSG, "text": text}))["text"] == text
    assert p.check_text(text) == text


def test_frame_at_exact_limit_is_accepted() -> None:
    base = len(pack({"type": "ping", "pad": ""}))
    # str8/16 headers grow with the length; find the padding that lands exactly on the limit.
    for n in range(p.MAX_FRAME_BYTES - base - 8, p.MAX_FRAME_BYTES - base + 1):
        frame = pack({"type": "ping", "pad": "x" * n})
        if len(frame) == p.MAX_FRAME_BYTES:
            break
    assert len(frame) == p.MAX_FRAME_BYTES
    assert p.decode_request(frame)["type"] == "ping"
    assert code_of(pack({"type": "ping", "pad": "x" * (n + 1)})) == ErrorCode.TOO_LARGE


def test_decode_with_larger_limit_for_replies() -> None:
    env = {"type": "history", "room": "general", "seq": 1, "messages": [], "pad": "x" * (p.MAX_FRAME_BYTES + 10)}
    frame = p.encode(env)
    with pytest.raises(ProtocolError) as info:
        p.decode(frame)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert p.decode(frame, p.MAX_REPLY_BYTES) == env


# --------------------------------------------------------------------------
# malformed input, generic (decode level)


def _nested(levels: int) -> object:
    """``levels`` lists nested inside each other: 1 -> [], 2 -> [[]], ..."""
    value: object = []
    for _ in range(levels - 1):
        value = [value]
    return value


MALFORMED: list[tuple[str, bytes, ErrorCode]] = [
    # not msgpack at all, or not one object
    ("empty", b"", ErrorCode.BAD_ENVELOPE),
    ("never-used-byte", b"\xc1", ErrorCode.BAD_ENVELOPE),
    ("json", b'{"type": "ping"}', ErrorCode.BAD_ENVELOPE),
    ("text", b"hello world", ErrorCode.BAD_ENVELOPE),
    ("trailing-byte", pack({"type": "ping"}) + b"\x00", ErrorCode.BAD_ENVELOPE),
    ("two-envelopes", pack({"type": "ping"}) * 2, ErrorCode.BAD_ENVELOPE),
    ("truncated-map", b"\x82\xa4type\xa4ping", ErrorCode.BAD_ENVELOPE),
    ("truncated-str", b"\x81\xa4type\xa4pi", ErrorCode.BAD_ENVELOPE),
    ("truncated-int", ping_with(b"\xcf\x00\x00"), ErrorCode.BAD_ENVELOPE),
    # wrong top-level type
    ("list", pack(["type", "ping"]), ErrorCode.BAD_ENVELOPE),
    ("empty-list", pack([]), ErrorCode.BAD_ENVELOPE),
    ("int", pack(1), ErrorCode.BAD_ENVELOPE),
    ("negative-int", pack(-1), ErrorCode.BAD_ENVELOPE),
    ("str", pack("ping"), ErrorCode.BAD_ENVELOPE),
    ("nil", pack(None), ErrorCode.BAD_ENVELOPE),
    ("bool", pack(True), ErrorCode.BAD_ENVELOPE),
    ("bin", pack(b"ping"), ErrorCode.BAD_ENVELOPE),
    ("float", pack(1.5), ErrorCode.BAD_ENVELOPE),
    # type
    ("empty-map", pack({}), ErrorCode.BAD_ENVELOPE),
    ("missing-type", pack({"room": "general"}), ErrorCode.BAD_ENVELOPE),
    ("int-type", pack({"type": 1}), ErrorCode.BAD_ENVELOPE),
    ("nil-type", pack({"type": None}), ErrorCode.BAD_ENVELOPE),
    ("bool-type", pack({"type": True}), ErrorCode.BAD_ENVELOPE),
    ("list-type", pack({"type": ["ping"]}), ErrorCode.BAD_ENVELOPE),
    ("map-type", pack({"type": {"ping": 1}}), ErrorCode.BAD_ENVELOPE),
    ("bin-type", pack({"type": b"ping"}), ErrorCode.BAD_ENVELOPE),
    # size
    ("frame-too-large", pack({"type": "ping", "pad": "x" * p.MAX_FRAME_BYTES}), ErrorCode.TOO_LARGE),
    ("garbage-too-large", b"\xc1" * (p.MAX_FRAME_BYTES + 1), ErrorCode.TOO_LARGE),
    ("text-too-large-in-big-frame", pack({**VALID_MSG, "text": "x" * 70_000}), ErrorCode.TOO_LARGE),
    # huge length headers with a few bytes after
    ("str32-4GiB", b"\xdb\xff\xff\xff\xffabc", ErrorCode.BAD_ENVELOPE),
    ("bin32-4GiB", b"\xc6\xff\xff\xff\xffabc", ErrorCode.BAD_ENVELOPE),
    ("array32-4GiB", b"\xdd\xff\xff\xff\xff\x01\x02", ErrorCode.BAD_ENVELOPE),
    ("map32-4GiB", b"\xdf\xff\xff\xff\xff\xa1a\x01", ErrorCode.BAD_ENVELOPE),
    ("ext32-4GiB", b"\xc9\xff\xff\xff\xff\x01abc", ErrorCode.BAD_ENVELOPE),
    ("inner-str32-4GiB", ping_with(b"\xdb\xff\xff\xff\xffabc"), ErrorCode.BAD_ENVELOPE),
    ("inner-array32-4GiB", ping_with(b"\xdd\xff\xff\xff\xff\xc0\xc0"), ErrorCode.BAD_ENVELOPE),
    ("inner-map32-4GiB", ping_with(b"\xdf\xff\xff\xff\xff\xa1a\x01"), ErrorCode.BAD_ENVELOPE),
    ("map-count-lies", b"\x8f\xa4type\xa4ping", ErrorCode.BAD_ENVELOPE),
    ("array16-lies", ping_with(b"\xdc\xff\xff\x01"), ErrorCode.BAD_ENVELOPE),
    # nesting
    ("depth-beyond-max", pack({"type": "ping", "x": _nested(p.MAX_DEPTH + 1)}), ErrorCode.BAD_ENVELOPE),
    ("maps-beyond-max", pack({"type": "ping", "x": {"a": {"b": {"c": {"d": {}}}}}}), ErrorCode.BAD_ENVELOPE),
    ("lists-5000-deep", ping_with(b"\x91" * 5000 + b"\xc0"), ErrorCode.BAD_ENVELOPE),
    ("lists-60000-deep", ping_with(b"\x91" * 60_000 + b"\xc0"), ErrorCode.BAD_ENVELOPE),
    ("top-lists-5000-deep", b"\x91" * 5000 + b"\xc0", ErrorCode.BAD_ENVELOPE),
    ("maps-5000-deep", b"\x81\xa1k" * 5000 + b"\xc0", ErrorCode.BAD_ENVELOPE),
    ("unterminated-deep", b"\x91" * 3000, ErrorCode.BAD_ENVELOPE),
    # non-string keys
    ("int-key", b"\x82\xa4type\xa4ping\x01\x01", ErrorCode.BAD_ENVELOPE),
    ("negative-int-key", b"\x82\xa4type\xa4ping\xff\x01", ErrorCode.BAD_ENVELOPE),
    ("nil-key", b"\x82\xa4type\xa4ping\xc0\x01", ErrorCode.BAD_ENVELOPE),
    ("bool-key", b"\x82\xa4type\xa4ping\xc3\x01", ErrorCode.BAD_ENVELOPE),
    ("float-key", b"\x82\xa4type\xa4ping\xcb" + b"\x00" * 8 + b"\x01", ErrorCode.BAD_ENVELOPE),
    ("bin-key", b"\x82\xa4type\xa4ping\xc4\x01x\x01", ErrorCode.BAD_ENVELOPE),
    ("bin-type-key", b"\x81\xc4\x04type\xa4ping", ErrorCode.BAD_ENVELOPE),
    ("list-key", b"\x82\xa4type\xa4ping\x90\x01", ErrorCode.BAD_ENVELOPE),
    ("map-key", b"\x82\xa4type\xa4ping\x80\x01", ErrorCode.BAD_ENVELOPE),
    ("nested-int-key", ping_with(b"\x81\x01\x02"), ErrorCode.BAD_ENVELOPE),
    ("nested-bin-key", ping_with(b"\x81\xc4\x01k\x02"), ErrorCode.BAD_ENVELOPE),
    ("int-key-in-list", ping_with(b"\x91\x81\x01\x02"), ErrorCode.BAD_ENVELOPE),
    # bin values
    ("bin-value", pack({"type": "ping", "x": b"\x00\x01"}), ErrorCode.BAD_ENVELOPE),
    ("empty-bin-value", pack({"type": "ping", "x": b""}), ErrorCode.BAD_ENVELOPE),
    ("bin-in-list", pack({"type": "ping", "x": [1, b"a"]}), ErrorCode.BAD_ENVELOPE),
    ("bin-text", pack({**VALID_MSG, "text": b"hi"}), ErrorCode.BAD_ENVELOPE),
    ("bin-room", pack({"type": "join", "room": b"general"}), ErrorCode.BAD_ENVELOPE),
    # ext values
    ("fixext1", ping_with(b"\xd4\x05\x00"), ErrorCode.BAD_ENVELOPE),
    ("fixext2", ping_with(b"\xd5\x05\x00\x00"), ErrorCode.BAD_ENVELOPE),
    ("fixext16", ping_with(b"\xd8\x05" + b"\x00" * 16), ErrorCode.BAD_ENVELOPE),
    ("ext8-empty", ping_with(b"\xc7\x00\x05"), ErrorCode.BAD_ENVELOPE),
    ("ext8", ping_with(b"\xc7\x03\x05abc"), ErrorCode.BAD_ENVELOPE),
    ("ext-packed", pack({"type": "ping", "x": msgpack.ExtType(5, b"ab")}), ErrorCode.BAD_ENVELOPE),
    ("ext-in-list", pack({"type": "ping", "x": [msgpack.ExtType(1, b"")]}), ErrorCode.BAD_ENVELOPE),
    ("ext-top-level", b"\xd4\x05\x00", ErrorCode.BAD_ENVELOPE),
    # the msgpack timestamp ext (-1) in its three widths
    ("timestamp32", ping_with(b"\xd6\xff\x00\x00\x00\x00"), ErrorCode.BAD_ENVELOPE),
    ("timestamp64", ping_with(b"\xd7\xff" + b"\x00" * 8), ErrorCode.BAD_ENVELOPE),
    ("timestamp96", ping_with(b"\xc7\x0c\xff" + b"\x00" * 12), ErrorCode.BAD_ENVELOPE),
    ("timestamp-packed", pack({"type": "ping", "x": msgpack.Timestamp(0)}), ErrorCode.BAD_ENVELOPE),
    ("timestamp-ts", pack({"type": "ping", "ts": msgpack.Timestamp(1, 2)}), ErrorCode.BAD_ENVELOPE),
    # floats
    ("float64", pack({"type": "ping", "x": 1.5}), ErrorCode.BAD_ENVELOPE),
    ("float32", ping_with(b"\xca\x3f\xc0\x00\x00"), ErrorCode.BAD_ENVELOPE),
    ("nan", pack({"type": "ping", "x": float("nan")}), ErrorCode.BAD_ENVELOPE),
    ("float-in-map", pack({"type": "ping", "x": {"y": 0.0}}), ErrorCode.BAD_ENVELOPE),
    ("float-after", pack({"type": "history", "room": "general", "after": 1.0}), ErrorCode.BAD_ENVELOPE),
    ("float-v", pack({"type": "hello", "v": 1.0, "name": "alice"}), ErrorCode.BAD_ENVELOPE),
    # invalid UTF-8 in a str
    ("utf8-value", ping_with(b"\xa2\xff\xfe"), ErrorCode.BAD_ENVELOPE),
    ("utf8-key", b"\x82\xa4type\xa4ping\xa2\xff\xfe\x01", ErrorCode.BAD_ENVELOPE),
    ("utf8-type", b"\x81\xa4type\xa4pin\xff", ErrorCode.BAD_ENVELOPE),
    ("utf8-overlong-nul", ping_with(b"\xa2\xc0\x80"), ErrorCode.BAD_ENVELOPE),
    ("utf8-surrogate", ping_with(b"\xa3\xed\xa0\x80"), ErrorCode.BAD_ENVELOPE),
    ("utf8-truncated-seq", ping_with(b"\xa2\xe2\x82"), ErrorCode.BAD_ENVELOPE),
    ("utf8-text", b"\x84\xa4type\xa3msg\xa4room\xa7general\xa2id\xa1m\xa4text\xa2\xc3\x28", ErrorCode.BAD_ENVELOPE),
    # ints beyond signed 64-bit
    ("uint64-max", pack({"type": "ping", "x": 2**64 - 1}), ErrorCode.BAD_ENVELOPE),
    ("int64-max-plus-1", pack({"type": "ping", "x": 2**63}), ErrorCode.BAD_ENVELOPE),
    ("uint64-in-list", pack({"type": "ping", "x": [2**63]}), ErrorCode.BAD_ENVELOPE),
    ("uint64-after", pack({"type": "history", "room": "general", "after": 2**63}), ErrorCode.BAD_ENVELOPE),
    ("uint64-v", pack({"type": "hello", "v": 2**64 - 1, "name": "alice"}), ErrorCode.BAD_ENVELOPE),
]


@pytest.mark.parametrize(("frame", "code"), [(f, c) for _, f, c in MALFORMED], ids=[label for label, _, _ in MALFORMED])
def test_decode_request_rejects(frame: bytes, code: ErrorCode) -> None:
    assert code_of(frame) == code


@pytest.mark.parametrize(("frame", "code"), [(f, c) for _, f, c in MALFORMED], ids=[label for label, _, _ in MALFORMED])
def test_decode_rejects_the_same(frame: bytes, code: ErrorCode) -> None:
    """Every case in the table is generic, so ``decode`` itself (used for replies too) catches it."""
    with pytest.raises(ProtocolError) as info:
        p.decode(frame)
    assert info.value.code == code
    assert (code is ErrorCode.TOO_LARGE) == (len(frame) > p.MAX_FRAME_BYTES)


@pytest.mark.parametrize("cut", range(len(pack({"type": "hello", "v": 1, "name": "alice", "id": "r1"}))))
def test_every_truncation_is_bad_envelope(cut: int) -> None:
    frame = pack({"type": "hello", "v": 1, "name": "alice", "id": "r1"})
    assert code_of(frame[:cut]) == ErrorCode.BAD_ENVELOPE


def test_signed_64_bit_extremes_are_accepted() -> None:
    env = p.decode_request(pack({"type": "ping", "lo": -(2**63), "hi": 2**63 - 1}))
    assert env["lo"] == -(2**63)
    assert env["hi"] == 2**63 - 1


def test_nesting_below_max_depth_is_accepted() -> None:
    # the envelope (1) holding MAX_DEPTH - 1 nested lists
    env = {"type": "ping", "x": _nested(p.MAX_DEPTH - 2)}
    assert p.decode_request(pack(env)) == env


def test_nesting_of_exactly_max_depth_levels_is_accepted() -> None:
    """``MAX_DEPTH``: "Lists and maps may nest this deep inside the envelope (the envelope is 1)".

    The envelope plus three nested lists is 4 levels, which that sentence (and the
    error text "nested deeper than 4 levels") allows.
    """
    env = {"type": "ping", "x": _nested(p.MAX_DEPTH - 1)}
    assert p.decode_request(pack(env)) == env


# --------------------------------------------------------------------------
# malformed input, per request type


def test_unknown_types() -> None:
    for kind in ["foo", "", "HELLO", "Ping", "ping ", "welcome", "ack", "error", "presence", "x" * 1000]:
        err = error_of(pack({"type": kind, "id": "u1"}))
        assert err.code == ErrorCode.UNKNOWN_TYPE, kind
        assert err.request_id == "u1"


GOOD_NAMES = ["a", "Z", "_", "9", "a" * 32, "_x", "a.b-c_d", "9lives", "x-", "x.", "Alice"]
BAD_NAMES: list[object] = [
    "",
    "a" * 33,
    ".a",
    "-a",
    ".",
    "-",
    "a\n",
    "\na",
    "a b",
    " a",
    "a\x00",
    "é",
    "café",
    "ａ",  # fullwidth a  # noqa: RUF001
    "a/b",
    "a@b",
    "a#b",
    "名前",
]
MISTYPED: list[object] = [None, 1, True, ["a"], {"a": 1}]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert p.is_name(name)
    assert p.decode_request(pack({"type": "hello", "v": 1, "name": name}))["name"] == name
    assert p.decode_request(pack({"type": "dm", "to": name, "text": "t", "id": "d"}))["to"] == name


@pytest.mark.parametrize("name", BAD_NAMES + MISTYPED)
def test_bad_names(name: object) -> None:
    assert not p.is_name(name)
    err = error_of(pack({"type": "hello", "v": 1, "name": name, "id": "h1"}))
    assert err.code == ErrorCode.BAD_NAME
    assert err.request_id == "h1"
    assert code_of(pack({"type": "dm", "to": name, "text": "t", "id": "d"})) == ErrorCode.BAD_NAME


@pytest.mark.parametrize("frame", [pack({"type": "hello", "v": 1}), pack({"type": "dm", "text": "t", "id": "d"})])
def test_missing_name_is_bad_name(frame: bytes) -> None:
    assert code_of(frame) == ErrorCode.BAD_NAME


GOOD_ROOMS = ["general", "a", "9", "_", "-", "-x", "a" * 32, "a-b_c", "0123456789"]
BAD_ROOMS: list[object] = [
    "",
    "a" * 33,
    "General",
    "GENERAL",
    "#general",
    ".x",
    "a.b",
    "gen eral",
    "general\n",
    "\ngeneral",
    "café",
    "ｇeneral",  # noqa: RUF001
    "a/b",
    "a\x00",
]
ROOM_TYPES = ["join", "leave", "who", "history", "msg"]


def _room_request(kind: str, room: object) -> dict[str, Any]:
    env: dict[str, Any] = {"type": kind, "room": room, "id": "q1"}
    if kind == "msg":
        env["text"] = "hi"
    return env


@pytest.mark.parametrize("kind", ROOM_TYPES)
@pytest.mark.parametrize("room", GOOD_ROOMS)
def test_good_rooms(kind: str, room: str) -> None:
    assert p.is_room(room)
    assert p.decode_request(pack(_room_request(kind, room)))["room"] == room


@pytest.mark.parametrize("kind", ROOM_TYPES)
@pytest.mark.parametrize("room", BAD_ROOMS + MISTYPED)
def test_bad_rooms(kind: str, room: object) -> None:
    assert not p.is_room(room)
    err = error_of(pack(_room_request(kind, room)))
    assert err.code == ErrorCode.BAD_ROOM
    assert err.request_id == "q1"


@pytest.mark.parametrize("kind", ROOM_TYPES)
def test_missing_room_is_bad_room(kind: str) -> None:
    env = _room_request(kind, None)
    del env["room"]
    assert code_of(pack(env)) == ErrorCode.BAD_ROOM


FIELD_ERRORS: list[tuple[str, dict[str, Any], ErrorCode]] = [
    # hello: v
    ("hello-no-v", {"type": "hello", "name": "alice"}, ErrorCode.BAD_ENVELOPE),
    ("hello-v-str", {"type": "hello", "v": "1", "name": "alice"}, ErrorCode.BAD_ENVELOPE),
    ("hello-v-true", {"type": "hello", "v": True, "name": "alice"}, ErrorCode.BAD_ENVELOPE),
    ("hello-v-nil", {"type": "hello", "v": None, "name": "alice"}, ErrorCode.BAD_ENVELOPE),
    ("hello-v-2", {"type": "hello", "v": 2, "name": "alice"}, ErrorCode.UNSUPPORTED_VERSION),
    ("hello-v-0", {"type": "hello", "v": 0, "name": "alice"}, ErrorCode.UNSUPPORTED_VERSION),
    ("hello-v-neg", {"type": "hello", "v": -1, "name": "alice"}, ErrorCode.UNSUPPORTED_VERSION),
    ("hello-v-big", {"type": "hello", "v": 2**63 - 1, "name": "alice"}, ErrorCode.UNSUPPORTED_VERSION),
    ("hello-v-2-bad-name", {"type": "hello", "v": 2, "name": ".bad"}, ErrorCode.UNSUPPORTED_VERSION),
    # hello: resume token
    ("hello-resume-empty", {"type": "hello", "v": 1, "name": "a", "resume": ""}, ErrorCode.BAD_ENVELOPE),
    ("hello-resume-long", {"type": "hello", "v": 1, "name": "a", "resume": "t" * 65}, ErrorCode.BAD_ENVELOPE),
    ("hello-resume-int", {"type": "hello", "v": 1, "name": "a", "resume": 5}, ErrorCode.BAD_ENVELOPE),
    ("hello-resume-true", {"type": "hello", "v": 1, "name": "a", "resume": True}, ErrorCode.BAD_ENVELOPE),
    ("hello-resume-list", {"type": "hello", "v": 1, "name": "a", "resume": ["t"]}, ErrorCode.BAD_ENVELOPE),
    # msg: action
    ("msg-action-int", {**VALID_MSG, "action": 1}, ErrorCode.BAD_ENVELOPE),
    ("msg-action-str", {**VALID_MSG, "action": "yes"}, ErrorCode.BAD_ENVELOPE),
    ("msg-action-nil", {**VALID_MSG, "action": None}, ErrorCode.BAD_ENVELOPE),
    # msg: text and id
    ("msg-no-text", {"type": "msg", "room": "general", "id": "m"}, ErrorCode.BAD_ENVELOPE),
    ("msg-empty-text", {**VALID_MSG, "text": ""}, ErrorCode.BAD_ENVELOPE),
    ("msg-int-text", {**VALID_MSG, "text": 5}, ErrorCode.BAD_ENVELOPE),
    ("msg-nil-text", {**VALID_MSG, "text": None}, ErrorCode.BAD_ENVELOPE),
    ("msg-list-text", {**VALID_MSG, "text": ["hi"]}, ErrorCode.BAD_ENVELOPE),
    ("msg-long-text", {**VALID_MSG, "text": "x" * (p.MAX_TEXT_CHARS + 1)}, ErrorCode.TOO_LARGE),
    ("msg-long-emoji-text", {**VALID_MSG, "text": "😀" * (p.MAX_TEXT_CHARS + 1)}, ErrorCode.TOO_LARGE),
    ("msg-no-id", {"type": "msg", "room": "general", "text": "hi"}, ErrorCode.BAD_ENVELOPE),
    ("msg-nil-id", {**VALID_MSG, "id": None}, ErrorCode.BAD_ENVELOPE),
    ("msg-empty-id", {**VALID_MSG, "id": ""}, ErrorCode.BAD_ENVELOPE),
    ("msg-int-id", {**VALID_MSG, "id": 7}, ErrorCode.BAD_ENVELOPE),
    ("msg-long-id", {**VALID_MSG, "id": "i" * (p.MAX_ID_CHARS + 1)}, ErrorCode.BAD_ENVELOPE),
    # dm
    ("dm-no-id", {"type": "dm", "to": "bob", "text": "t"}, ErrorCode.BAD_ENVELOPE),
    ("dm-no-text", {"type": "dm", "to": "bob", "id": "d"}, ErrorCode.BAD_ENVELOPE),
    ("dm-empty-text", {"type": "dm", "to": "bob", "text": "", "id": "d"}, ErrorCode.BAD_ENVELOPE),
    ("dm-long-text", {"type": "dm", "to": "bob", "text": "x" * 4001, "id": "d"}, ErrorCode.TOO_LARGE),
    # history
    ("history-limit-0", {"type": "history", "room": "general", "limit": 0}, ErrorCode.BAD_ENVELOPE),
    ("history-limit-neg", {"type": "history", "room": "general", "limit": -1}, ErrorCode.BAD_ENVELOPE),
    ("history-after-neg", {"type": "history", "room": "general", "after": -1}, ErrorCode.BAD_ENVELOPE),
    ("history-after-str", {"type": "history", "room": "general", "after": "1"}, ErrorCode.BAD_ENVELOPE),
    ("history-limit-str", {"type": "history", "room": "general", "limit": "10"}, ErrorCode.BAD_ENVELOPE),
    ("history-after-nil", {"type": "history", "room": "general", "after": None}, ErrorCode.BAD_ENVELOPE),
    ("history-after-true", {"type": "history", "room": "general", "after": True}, ErrorCode.BAD_ENVELOPE),
    ("history-after-false", {"type": "history", "room": "general", "after": False}, ErrorCode.BAD_ENVELOPE),
    ("history-limit-true", {"type": "history", "room": "general", "limit": True}, ErrorCode.BAD_ENVELOPE),
    ("history-limit-list", {"type": "history", "room": "general", "limit": [1]}, ErrorCode.BAD_ENVELOPE),
    # optional id on any request
    ("ping-empty-id", {"type": "ping", "id": ""}, ErrorCode.BAD_ENVELOPE),
    ("ping-long-id", {"type": "ping", "id": "p" * (p.MAX_ID_CHARS + 1)}, ErrorCode.BAD_ENVELOPE),
    ("ping-int-id", {"type": "ping", "id": 1}, ErrorCode.BAD_ENVELOPE),
    ("ping-true-id", {"type": "ping", "id": True}, ErrorCode.BAD_ENVELOPE),
    ("rooms-list-id", {"type": "rooms", "id": ["x"]}, ErrorCode.BAD_ENVELOPE),
    ("bye-map-id", {"type": "bye", "id": {"x": "y"}}, ErrorCode.BAD_ENVELOPE),
    ("hello-long-id", {"type": "hello", "v": 1, "name": "a", "id": "h" * 65}, ErrorCode.BAD_ENVELOPE),
    ("join-int-id", {"type": "join", "room": "general", "id": 3}, ErrorCode.BAD_ENVELOPE),
]


@pytest.mark.parametrize(
    ("env", "code"), [(e, c) for _, e, c in FIELD_ERRORS], ids=[label for label, _, _ in FIELD_ERRORS]
)
def test_field_errors(env: dict[str, Any], code: ErrorCode) -> None:
    assert code_of(pack(env)) == code


@pytest.mark.parametrize("text", ["", 5, None, b"x", "x" * (p.MAX_TEXT_CHARS + 1)])
def test_check_text_rejects(text: object) -> None:
    with pytest.raises(ProtocolError) as info:
        p.check_text(text)
    expected = ErrorCode.TOO_LARGE if isinstance(text, str) and text else ErrorCode.BAD_ENVELOPE
    assert info.value.code == expected


# --------------------------------------------------------------------------
# request_id on errors


ID_CARRIED: list[tuple[str, dict[str, Any], ErrorCode]] = [
    ("missing-type", {"id": "r1"}, ErrorCode.BAD_ENVELOPE),
    ("int-type", {"type": 3, "id": "r1"}, ErrorCode.BAD_ENVELOPE),
    ("unknown-type", {"type": "nope", "id": "r1"}, ErrorCode.UNKNOWN_TYPE),
    ("bad-version", {"type": "hello", "v": 9, "name": "a", "id": "r1"}, ErrorCode.UNSUPPORTED_VERSION),
    ("bad-name", {"type": "hello", "v": 1, "name": "-a", "id": "r1"}, ErrorCode.BAD_NAME),
    ("bad-room", {"type": "join", "room": "A", "id": "r1"}, ErrorCode.BAD_ROOM),
    ("long-text", {**VALID_MSG, "text": "x" * 4001, "id": "r1"}, ErrorCode.TOO_LARGE),
    ("empty-text", {**VALID_MSG, "text": "", "id": "r1"}, ErrorCode.BAD_ENVELOPE),
    ("bad-limit", {"type": "history", "room": "general", "limit": 0, "id": "r1"}, ErrorCode.BAD_ENVELOPE),
    ("max-len-id", {"type": "join", "room": "A", "id": "r" * p.MAX_ID_CHARS}, ErrorCode.BAD_ROOM),
]


@pytest.mark.parametrize(("env", "code"), [(e, c) for _, e, c in ID_CARRIED], ids=[label for label, _, _ in ID_CARRIED])
def test_request_id_is_carried(env: dict[str, Any], code: ErrorCode) -> None:
    err = error_of(pack(env))
    assert err.code == code
    assert err.request_id == env["id"]
    assert err.to_envelope()["id"] == env["id"]
    assert err.to_envelope()["code"] == str(code)


@pytest.mark.parametrize(
    "env",
    [
        {**VALID_MSG, "extra": 1.5},
        {**VALID_MSG, "extra": b"bin"},
        {**VALID_MSG, "extra": 2**64 - 1},
        {**VALID_MSG, "extra": [[[[]]]]},
    ],
    ids=["float", "bin", "uint64", "deep"],
)
def test_request_id_is_carried_on_value_errors(env: dict[str, Any]) -> None:
    """The map decoded and its ``id`` is a valid string, so the error can be matched to the request."""
    err = error_of(pack(env))
    assert err.code == ErrorCode.BAD_ENVELOPE
    assert err.request_id == "m1"


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",
        b"\x82\xa2id\xa2r1\xa4type",  # truncated: the id was not read as part of a whole envelope
        pack({"type": "ping", "id": ""}),
        pack({"type": "ping", "id": "x" * (p.MAX_ID_CHARS + 1)}),
        pack({"type": "nope", "id": 5}),
        pack({"type": "nope", "id": "x" * (p.MAX_ID_CHARS + 1)}),
        pack({"type": "ping", "id": "r1", "pad": "x" * p.MAX_FRAME_BYTES}),
    ],
)
def test_request_id_absent_when_unreadable(frame: bytes) -> None:
    err = error_of(frame)
    assert err.request_id is None
    assert "id" not in err.to_envelope()


# --------------------------------------------------------------------------
# rooms, topics, history


@pytest.mark.parametrize(
    ("typed", "room"),
    [
        ("#General", "general"),
        ("general", "general"),
        ("#dev", "dev"),
        ("  #Dev-Ops_2 ", "dev-ops_2"),
        ("#" + "A" * 32, "a" * 32),
        ("-x", "-x"),
    ],
)
def test_parse_room(typed: str, room: str) -> None:
    assert p.parse_room(typed) == room


@pytest.mark.parametrize(
    "typed", ["", "#", "##general", "# general", "#gen eral", "#café", "#" + "a" * 33, "#a.b", "a/b"]
)
def test_parse_room_rejects(typed: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_room(typed)
    assert info.value.code == ErrorCode.BAD_ROOM


@pytest.mark.parametrize("room", GOOD_ROOMS)
def test_room_topic_round_trip(room: str) -> None:
    topic = p.room_topic(room)
    assert topic == room.encode() + b"\x00"
    assert p.topic_room(topic) == room


def test_room_topic_is_not_a_prefix_of_another_room() -> None:
    assert not p.room_topic("general").startswith(p.room_topic("gen"))
    assert not p.room_topic("gen-x").startswith(p.room_topic("gen"))
    assert p.room_topic("gen") == b"gen\x00"


@pytest.mark.parametrize(
    ("topic", "code"),
    [
        (b"general", ErrorCode.BAD_ENVELOPE),
        (b"", ErrorCode.BAD_ENVELOPE),
        (b"\xff\x00", ErrorCode.BAD_ENVELOPE),
        (b"\x00", ErrorCode.BAD_ROOM),
        (b"General\x00", ErrorCode.BAD_ROOM),
        (b"general\x00\x00", ErrorCode.BAD_ROOM),
        ("café".encode() + b"\x00", ErrorCode.BAD_ROOM),
    ],
)
def test_topic_room_rejects(topic: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        p.topic_room(topic)
    assert info.value.code == code


@pytest.mark.parametrize("request_id", [None, "h1"])
@pytest.mark.parametrize("count", [0, 1, 3, 300])
def test_encode_history(request_id: str | None, count: int) -> None:
    events: list[dict[str, Any]] = []
    for i in range(count):
        if i % 3 == 0:
            events.append(p.presence_event("general", i + 1, 1000 + i, f"user{i}", "join"))
        else:
            events.append(p.msg_event("general", i + 1, 1000 + i, "alice", "abcd", f"text {i} ✓", f"m{i}"))
    bodies = [p.encode(e) for e in events]
    frame = p.encode_history("general", bodies, count + 7, request_id)
    env = p.decode(frame, p.MAX_REPLY_BYTES)
    expected: dict[str, Any] = {"type": "history", "room": "general", "seq": count + 7, "messages": events}
    if request_id is not None:
        expected["id"] = request_id
    assert env == expected


# --------------------------------------------------------------------------
# batches (broker -> client)


def events(n: int, text: str = "hi") -> list[bytes]:
    return [p.encode({"type": "msg", "room": "r", "seq": i, "text": text}) for i in range(n)]


@pytest.mark.parametrize("n", [2, 15, 16, p.BATCH_MAX_ITEMS])
def test_a_batch_is_the_msgpack_map_it_claims(n: int) -> None:
    """The hand-built header (fixarray, then array 16) packs what msgpack would."""
    bodies = events(n)
    (frame,) = p.batches(bodies)
    assert frame == pack({"type": "batch", "items": [msgpack.unpackb(b) for b in bodies]})
    assert frame.startswith(p.BATCH_HEAD)
    assert p.decode_many(frame) == [msgpack.unpackb(b) for b in bodies]


def test_one_envelope_travels_alone_and_none_sends_nothing() -> None:
    (body,) = events(1)
    assert p.batches([body]) == [body]
    assert p.decode_many(body) == [msgpack.unpackb(body)]
    assert p.batches([]) == []


def test_batches_split_by_count_and_by_bytes_in_order() -> None:
    bodies = events(2 * p.BATCH_MAX_ITEMS + 3)
    frames = p.batches(bodies)
    assert [len(p.decode_many(f)) for f in frames] == [p.BATCH_MAX_ITEMS, p.BATCH_MAX_ITEMS, 3]
    assert [e["seq"] for f in frames for e in p.decode_many(f)] == list(range(len(bodies)))
    big = events(10, "x" * (p.BATCH_MAX_BYTES // 4))
    frames = p.batches(big)
    assert sum(len(b) for b in big[:3]) <= p.BATCH_MAX_BYTES < sum(len(b) for b in big[:4])
    assert [len(p.decode_many(f)) for f in frames] == [3, 3, 3, 1]
    assert [e["seq"] for f in frames for e in p.decode_many(f)] == list(range(10))


def test_an_envelope_larger_than_a_batch_travels_alone() -> None:
    small, huge = events(1)[0], events(1, "x" * p.BATCH_MAX_BYTES)[0]
    frames = p.batches([small, huge, small])
    assert frames == [small, huge, small]


def test_batch_items_count_depth_from_themselves() -> None:
    """A reply at the depth limit is still a valid batch item (the batch adds no level)."""
    deep = {"type": "rooms", "rooms": [{"room": "r", "x": [1]}]}
    (frame,) = p.batches([pack(deep), pack(deep)])
    assert p.decode_many(frame) == [deep, deep]
    too_deep = {"type": "rooms", "rooms": [{"room": "r", "x": [[1]]}]}
    with pytest.raises(ProtocolError) as info:
        p.decode_many(p.batches([pack(too_deep), pack(deep)])[0])
    assert info.value.code == ErrorCode.BAD_ENVELOPE


@pytest.mark.parametrize(
    "frame",
    [
        pack({"type": "batch"}),
        pack({"type": "batch", "items": {"type": "msg"}}),
        pack({"type": "batch", "items": [1]}),
        pack({"type": "batch", "items": [{"seq": 1}]}),
        pack({"type": "batch", "items": [{"type": "msg", "x": 1.5}]}),
        pack({"type": "batch", "items": [{"type": "batch", "items": []}]}),
        pack({"type": "batch", "items": [{"type": "msg"}], "x": b"bin"}),
        pack({"type": "batch", "items": [{"type": "msg"}]}) + b"\x00",
    ],
)
def test_decode_many_refuses_bad_batches(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_many(frame)
    assert info.value.code == ErrorCode.BAD_ENVELOPE


def test_decode_many_tolerates_any_item_count() -> None:
    """The broker sends 2 to BATCH_MAX_ITEMS; a reader does not depend on it."""
    assert p.decode_many(pack({"type": "batch", "items": []})) == []
    assert p.decode_many(pack({"type": "batch", "items": [{"type": "pong"}]})) == [{"type": "pong"}]
    many = [{"type": "pong", "n": i} for i in range(3 * p.BATCH_MAX_ITEMS)]
    assert p.decode_many(pack({"type": "batch", "items": many})) == many


def test_decode_many_keeps_the_reply_size_limit() -> None:
    frame = p.batches(events(2, "x" * 100))[0]
    with pytest.raises(ProtocolError) as info:
        p.decode_many(frame, max_bytes=len(frame) - 1)
    assert info.value.code == ErrorCode.TOO_LARGE


def test_a_batch_is_not_a_request() -> None:
    assert code_of(p.batches([pack(VALID_MSG), pack(VALID_MSG)])[0]) == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\xc1", "a byte that starts no msgpack value"),
        (b"\x91" * 10_000, "nested deeper than"),
        (msgpack.packb({"type": msgpack.ExtType(5, b"abcde")}), "ext types are not allowed"),
        (msgpack.packb({1: 2}), "map keys must be strings"),
        (msgpack.packb({"type": "x"}) + b"\x00", "bytes left over after the map"),
        (msgpack.packb({"type": "hello"})[:-2], "ends in the middle of a value"),
        (b"\x81\xa4type\xa1\xff", "not valid UTF-8"),
        (b"\xdd\xff\xff\xff\xff\x01", "runs past the end of the frame"),
        (msgpack.packb({"type": "x", "y": b"ab"}, use_bin_type=True), "msgpack type bin are not allowed"),
        # msgpack's type names, not Python's ("a msgpack list", "NoneType"): peers are in any language.
        (msgpack.packb(["type", "ping"]), "envelope is a msgpack array, not a map"),
        (msgpack.packb(None), "envelope is a msgpack nil, not a map"),
        (msgpack.packb(5), "envelope is a msgpack integer, not a map"),
    ],
)
def test_a_refused_envelope_says_why_in_the_protocols_words(frame: bytes, says: str) -> None:
    """Not msgpack's own texts, which name its options (max_ext_len, strict_map_key) or are empty."""
    with pytest.raises(p.ProtocolError) as refused:
        p.decode(frame)
    assert refused.value.code == "bad_envelope" and says in refused.value.message


@pytest.mark.parametrize(
    "env",
    [
        {"type": "ping", "id": None},
        {"type": "msg", "room": "general", "text": "hi", "id": None},
        {"type": "hello", "v": 1, "name": "alice", "resume": None, "id": "h1"},
    ],
    ids=["ping", "msg", "hello-resume"],
)
def test_a_nil_id_or_resume_is_refused_not_taken_for_absent(env: dict[str, Any]) -> None:
    """protocol.md: a non-string id or resume is bad_envelope; nil was quietly taken for none
    (a ping with id nil got a pong without one), while a nil action or after was refused."""
    with pytest.raises(p.ProtocolError) as err:
        p.decode_request(p.encode(env))
    assert err.value.code == "bad_envelope" and "must be a string" in err.value.message


def test_a_mark_says_its_count_and_anything_else_is_none() -> None:
    assert p.mark_count(p.mark(0x1F4, "a" * 16)) == 500
    for value in (None, 7, "", "zz.1", "x" * (p.MAX_ID_CHARS + 1), b"1f4.aa"):
        assert p.mark_count(value) == -1, value


def test_the_package_offers_the_client_library_lazily_and_lists_it() -> None:
    """``from zchat import Client`` is the bots' import; ``dir(zchat)`` (a REPL's completion) shows it."""
    import zchat
    from client.lib import Client

    assert zchat.Client is Client
    assert set(zchat.__all__) <= set(dir(zchat))
