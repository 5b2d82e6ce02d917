"""zchat wire protocol, version 1: the only module that knows the envelope format.

Pure by design: no zmq import, no I/O, no clock. Both the broker and the client
import it, so a rule written here holds on both sides of the wire.

Every function that reads bytes from the network raises :class:`ProtocolError`
(and nothing else) on bad input; the error carries the coded reason that goes
back to the sender. See ``docs/protocol.md`` for the messages themselves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, Final, Literal, NoReturn

import msgpack

VERSION: Final = 1

#: An encoded envelope may not be larger than this (bytes).
MAX_FRAME_BYTES: Final = 64 * 1024
#: A broker-to-client envelope (a ``history`` reply) may be up to this large.
MAX_REPLY_BYTES: Final = 2 * 1024 * 1024
#: A ``history`` reply stops adding events once their bodies pass this size.
MAX_HISTORY_BYTES: Final = 1024 * 1024
#: Longest chat text, in characters (code points).
MAX_TEXT_CHARS: Final = 4000
#: Longest request ``id``.
MAX_ID_CHARS: Final = 64
#: Most events one ``history`` reply carries; larger limits are clamped.
MAX_HISTORY_LIMIT: Final = 500
DEFAULT_HISTORY_LIMIT: Final = 100
#: After a ``rate_limited`` refusal of a message or DM, the broker refuses the
#: session's others until that one is resent and accepted (so that none already on
#: its way can overtake it), or until this long (ms) after its last refusal.
RATE_HOLD_MAX_MS: Final = 10_000
#: Lists and maps may nest this deep inside the envelope (the envelope is 1).
MAX_DEPTH: Final = 4
#: Values in one request, counting each array item, map key and map value (the
#: envelope's own fields too). A request needs a dozen; 64 KiB of tiny values (65,000
#: empty maps) took 19 ms to check against 4 us for a message, and one connection's
#: flood of them held everyone's replies for seconds.
MAX_REQUEST_VALUES: Final = 1024
#: A ``batch`` carries at most this many envelopes, and at most this many bytes
#: of them (a larger envelope travels alone): enough to make a busy pass one send
#: per room and per client instead of one per event. The byte cap is about the
#: largest single event (4,000 characters of up to 4 bytes), so a queue of N
#: frames (``--pub-hwm``) holds no more bytes than N events could.
BATCH_MAX_ITEMS: Final = 64
BATCH_MAX_BYTES: Final = 16 * 1024

#: One envelope as it travels: a map with ``str`` keys and a ``type``.
Envelope = dict[str, Any]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_ROOM_RE: Final = re.compile(r"[a-z0-9_-]{1,32}")
_MAX_INT: Final = 2**63 - 1
_MIN_INT: Final = -(2**63)


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` envelope."""

    BAD_ENVELOPE = "bad_envelope"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    NOT_REGISTERED = "not_registered"
    ALREADY_REGISTERED = "already_registered"
    UNKNOWN_TYPE = "unknown_type"
    BAD_ROOM = "bad_room"
    NOT_JOINED = "not_joined"
    NO_SUCH_USER = "no_such_user"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    LIMIT_REACHED = "limit_reached"
    #: A bug on the broker's side, never the client's; it is logged there.
    INTERNAL = "internal_error"
    #: The broker cannot reach its backplane (``--backplane``): nothing was
    #: stored or delivered; retry after a moment (or on another broker).
    UNAVAILABLE = "unavailable"
    #: A DM its recipient's connection could not take (it was reconnecting, or
    #: not reading): not delivered; sending it again may be.
    UNDELIVERED = "undelivered"
    #: Sent, unasked, to the connection a session was on when another connection took it
    #: over with its resume token: a second client given the same token. That one must
    #: stop, not take the session back (the two would take it from each other for ever).
    SESSION_MOVED = "session_moved"


class ProtocolError(Exception):
    """Input that breaks the protocol: always the peer's fault, never ours.

    ``request_id`` is the ``id`` of the offending request when it could be read,
    so the error reply can be matched to the request that caused it.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_envelope(self) -> Envelope:
        return error(self.code, self.message, self.request_id)


def _fail(code: ErrorCode, message: str) -> NoReturn:
    raise ProtocolError(code, message)


# --------------------------------------------------------------------------
# names and rooms


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def name_key(name: str) -> str:
    """What makes a name unique: its letters regardless of case, so that nobody can be
    ``Bob`` beside ``bob``. (Names are ASCII, so ``lower()`` is exact.) A session keeps
    the spelling it chose; lookups by name (a DM's ``to``) accept any."""
    return name.lower()


def is_room(value: object) -> bool:
    return isinstance(value, str) and _ROOM_RE.fullmatch(value) is not None


def parse_room(text: str) -> str:
    """A room as a person types it (``#General``) to its wire form (``general``).

    Raises ``ProtocolError(bad_room)`` when no valid room results.
    """
    room = text.strip().removeprefix("#").lower()
    if not is_room(room):
        _fail(
            ErrorCode.BAD_ROOM,
            f"{text!r} is not a room: use 1-32 of a-z 0-9 _ - (a # before it optional, A-Z read as a-z)",
        )
    return room


def tcp_endpoint(host: str, port: int | str) -> str:
    """A ZeroMQ TCP endpoint; an IPv6 address goes in brackets (libzmq reads "::1:5555" as no address)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def bare_host(value: str) -> str | None:
    """A host as ``--host`` takes it, for :func:`tcp_endpoint`: stripped, an IPv6 address
    out of its brackets; None for anything else with a colon (``HOST:PORT``: the port has
    its own option). An empty host is returned empty, for the caller to refuse."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return host


def room_topic(room: str) -> bytes:
    """The PUB/SUB topic of a room: its name and one NUL, so a prefix match is exact."""
    return room.encode() + b"\x00"


def topic_room(topic: bytes) -> str:
    if not topic.endswith(b"\x00"):
        _fail(ErrorCode.BAD_ENVELOPE, "topic does not end in NUL")
    try:
        room = topic[:-1].decode()
    except UnicodeDecodeError:
        _fail(ErrorCode.BAD_ENVELOPE, "topic is not UTF-8")
    if not is_room(room):
        _fail(ErrorCode.BAD_ROOM, "topic is not a room")
    return room


# --------------------------------------------------------------------------
# bytes <-> envelope


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    _fail(ErrorCode.BAD_ENVELOPE, f"msgpack ext type {code} is not allowed")


def _check_value(value: object, depth: int) -> None:
    """Only nil/bool/int/str/list/map, str keys, bounded depth (no bin, float, ext).

    On the broker's hot path, so exact ``type() is`` tests: msgpack only ever
    builds these exact types, and anything else (bytes, float, ExtType,
    Timestamp) falls through to the refusal at the end.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return
    if kind is int:
        # msgpack decodes uint64 up to 2**64-1; keep to signed 64-bit for peers.
        if not _MIN_INT <= value <= _MAX_INT:  # type: ignore[operator]
            _fail(ErrorCode.BAD_ENVELOPE, "integer out of the signed 64-bit range")
        return
    if kind is dict or kind is list:
        if depth > MAX_DEPTH:
            _fail(ErrorCode.BAD_ENVELOPE, f"nested deeper than {MAX_DEPTH} levels")
        if kind is dict:
            for key, item in value.items():  # type: ignore[attr-defined]
                if type(key) is not str:
                    _fail(ErrorCode.BAD_ENVELOPE, "map keys must be strings")
                if type(item) is not str:
                    _check_value(item, depth + 1)
        else:
            for item in value:  # type: ignore[attr-defined]
                _check_value(item, depth + 1)
        return
    _fail(
        ErrorCode.BAD_ENVELOPE,
        f"values of msgpack type {_MSGPACK_NAMES.get(kind.__name__, kind.__name__)} are not allowed",
    )


def _unpack_failure(exc: Exception) -> str:
    """What msgpack's exception means, in the protocol's words (its own texts name its
    options, or are empty)."""
    text = str(exc)
    if isinstance(exc, msgpack.ExtraData):
        return "bytes left over after the map"
    if isinstance(exc, msgpack.StackError):
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(exc, msgpack.FormatError) or not text:
        return "a byte that starts no msgpack value"
    if isinstance(exc, UnicodeDecodeError):
        return "a string that is not valid UTF-8"
    if "max_ext_len" in text:
        return "msgpack ext types are not allowed"
    if "exceeds max_" in text:  # a length header: msgpack bounds each by the frame's size
        return "a length that runs past the end of the frame"
    if "not allowed for map key" in text:  # (the C and the pure-Python unpackers say it differently)
        return "map keys must be strings"
    if "incomplete input" in text:
        return "it ends in the middle of a value"
    return text


#: msgpack's names of the types a value decodes to (Python's would say "list" and
#: "NoneType" to a peer written in any language).
_MSGPACK_NAMES: Final = {
    "dict": "map",
    "list": "array",
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "NoneType": "nil",
    "bytes": "bin",
    "float": "float",
    "ExtType": "ext",
    "Timestamp": "timestamp ext",
}


def _unpack_map(frame: bytes, max_bytes: int) -> Envelope:
    """Size check, then msgpack to a map: no ext, str keys, valid UTF-8, nothing trailing."""
    if len(frame) > max_bytes:
        _fail(ErrorCode.TOO_LARGE, f"envelope of {len(frame)} bytes, the limit is {max_bytes}")
    if not frame:
        _fail(ErrorCode.BAD_ENVELOPE, "empty frame")
    try:
        env = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError, bad UTF-8 and
        # truncated input.
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, f"not a msgpack envelope: {_unpack_failure(exc)}") from None
    if not isinstance(env, dict):
        kind = _MSGPACK_NAMES.get(type(env).__name__, type(env).__name__)
        _fail(ErrorCode.BAD_ENVELOPE, f"envelope is a msgpack {kind}, not a map")
    return env


def _check_envelope(env: Envelope) -> Envelope:
    """The generic rules for one decoded map: allowed values, depth, a str ``type``."""
    try:
        _check_value(env, 1)
    except ProtocolError as exc:
        exc.request_id = _read_id(env)
        raise
    kind = env.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "missing or non-string 'type'", _read_id(env))
    return env


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Bytes from the network to an envelope, with every generic check applied.

    The result is a map with ``str`` keys and a ``str`` ``type``; what the type
    requires is checked by :func:`validate_request` (broker side).
    """
    return _check_envelope(_unpack_map(frame, max_bytes))


def decode_many(frame: bytes, max_bytes: int = MAX_REPLY_BYTES) -> list[Envelope]:
    """A frame from the broker (ROUTER or PUB) to the envelopes it carries, in order.

    One envelope, or the items of a ``batch``: each item is checked as an
    envelope of its own (its depth counted from itself), and a batch inside a
    batch is refused. Clients read every broker frame with this.
    """
    env = _unpack_map(frame, max_bytes)
    if env.get("type") != "batch":
        return [_check_envelope(env)]
    items = env.pop("items", None)
    if type(items) is not list:
        _fail(ErrorCode.BAD_ENVELOPE, "a batch's 'items' must be an array")
    _check_value(env, 1)  # the batch's own other fields, if any
    for item in items:
        if type(item) is not dict:
            _fail(ErrorCode.BAD_ENVELOPE, "a batch item must be a map")
        if _check_envelope(item)["type"] == "batch":
            _fail(ErrorCode.BAD_ENVELOPE, "a batch inside a batch")
    return items


#: What every ``batch`` frame starts with: a reader can tell one without unpacking it.
BATCH_HEAD: Final = b"\x82" + msgpack.packb("type") + msgpack.packb("batch") + msgpack.packb("items")


def batches(bodies: list[bytes]) -> list[bytes]:
    """Frames for encoded envelopes bound for one place: alone, or several in a ``batch``.

    One body goes out as it is (so a quiet chat sends exactly what it would
    without batches); more are packed, in order, into batches of at most
    ``BATCH_MAX_ITEMS`` envelopes and ``BATCH_MAX_BYTES`` of them in all (a body
    larger than that travels alone). The bodies are not re-packed: a batch is a map header,
    an array header and the bodies back to back, as in :func:`encode_history`.
    """
    if len(bodies) == 1:
        return bodies
    frames: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for body in bodies:
        if chunk and (len(chunk) == BATCH_MAX_ITEMS or size + len(body) > BATCH_MAX_BYTES):
            frames.append(_batch(chunk))
            chunk, size = [], 0
        chunk.append(body)
        size += len(body)
    if chunk:
        frames.append(_batch(chunk))
    return frames


#: How :func:`presence_event` encodes: a map of 6 fields (7 with a reason), ``type`` first.
_PRESENCE_HEADS = (b"\x86\xa4type\xa8presence", b"\x87\xa4type\xa8presence")


def is_presence(body: bytes) -> bool:
    """Whether ``body`` is a presence event as this module encodes it, told without decoding.

    Any other encoding of one (another field order) reads as not presence: callers may
    use this to decide when to send an event, never whether or what.
    """
    return body.startswith(_PRESENCE_HEADS)


def _batch(chunk: list[bytes]) -> bytes:
    if len(chunk) == 1:
        return chunk[0]
    n = len(chunk)
    # msgpack array header: fixarray up to 15 items, else array 16 (BATCH_MAX_ITEMS < 2**16).
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return b"".join((BATCH_HEAD, head, *chunk))


def Encoder() -> Callable[[Mapping[str, Any]], bytes]:
    """A packer for envelopes: one reused ``msgpack.Packer`` (about 2x ``packb``).

    The bound ``pack`` itself, with no wrapper around it, since it runs for
    every message. Not thread-safe: each thread (broker loop, client) owns its own.
    """
    pack: Callable[[Mapping[str, Any]], bytes] = msgpack.Packer(use_bin_type=True, datetime=False).pack
    return pack


def encode(env: Mapping[str, Any]) -> bytes:
    """Pack one envelope (for code that is not on a hot path)."""
    data: bytes = msgpack.packb(env, use_bin_type=True)
    return data


# --------------------------------------------------------------------------
# requests (client -> broker)


def _read_id(env: Mapping[str, Any]) -> str | None:
    rid = env.get("id")
    if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS:
        return rid
    return None


def _check_id(env: Envelope, required: bool) -> None:
    if "id" not in env:  # (a nil id is no absent one: it is refused below, as a nil of any field)
        if required:
            _fail(ErrorCode.BAD_ENVELOPE, "'id' is required")
        return
    rid = env["id"]
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        _fail(ErrorCode.BAD_ENVELOPE, f"'id' must be a string of 1-{MAX_ID_CHARS} characters")


def _check_room(env: Envelope, key: str = "room") -> None:
    room = env.get(key)
    if not isinstance(room, str):
        _fail(ErrorCode.BAD_ROOM, f"'{key}' must be a string")
    if not is_room(room):
        _fail(ErrorCode.BAD_ROOM, f"{room[:40]!r} is not a room: use 1-32 of a-z 0-9 _ -")


def _check_name(env: Envelope, key: str) -> None:
    name = env.get(key)
    if not isinstance(name, str):
        _fail(ErrorCode.BAD_NAME, f"'{key}' must be a string")
    if not is_name(name):
        _fail(
            ErrorCode.BAD_NAME,
            f"{name[:40]!r} is not a name: use 1-32 of A-Z a-z 0-9 _ . -, not starting with . or -",
        )


def check_text(text: object) -> str:
    """A chat text: a non-empty ``str`` of at most :data:`MAX_TEXT_CHARS`."""
    if not isinstance(text, str):
        _fail(ErrorCode.BAD_ENVELOPE, "'text' must be a string")
    if not text:
        _fail(ErrorCode.BAD_ENVELOPE, "'text' is empty")
    if len(text) > MAX_TEXT_CHARS:
        _fail(ErrorCode.TOO_LARGE, f"text of {len(text)} characters, the limit is {MAX_TEXT_CHARS}")
    return text


def _check_int(env: Envelope, key: str, default: int, low: int, high: int | None = None) -> None:
    value = env.get(key, default)
    # bool is an int subclass in Python but a distinct msgpack type.
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(ErrorCode.BAD_ENVELOPE, f"'{key}' must be an integer >= {low}")
    env[key] = value if high is None else min(value, high)


def _v_hello(env: Envelope) -> None:
    v = env.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(ErrorCode.BAD_ENVELOPE, "'v' must be an integer")
    if v != VERSION:
        _fail(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {v} is not supported; this broker speaks {VERSION}")
    _check_name(env, "name")
    token = env.get("resume")
    if "resume" in env and (not isinstance(token, str) or not 0 < len(token) <= MAX_ID_CHARS):
        _fail(ErrorCode.BAD_ENVELOPE, f"'resume' must be a string of 1-{MAX_ID_CHARS} characters")


def _v_room(env: Envelope) -> None:
    _check_room(env)


def _v_join(env: Envelope) -> None:
    _check_room(env)
    if not isinstance(env.get("members", True), bool):
        _fail(ErrorCode.BAD_ENVELOPE, "'members' must be a boolean")


def _v_msg(env: Envelope) -> None:
    _check_room(env)
    check_text(env.get("text"))
    if not isinstance(env.get("action", False), bool):
        _fail(ErrorCode.BAD_ENVELOPE, "'action' must be a boolean")


def _v_dm(env: Envelope) -> None:
    _check_name(env, "to")
    check_text(env.get("text"))


def _v_history(env: Envelope) -> None:
    _check_room(env)
    _check_int(env, "after", 0, 0)
    _check_int(env, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)


def _v_none(env: Envelope) -> None:
    pass


#: type -> (validator, is ``id`` required)
_REQUESTS: Final[dict[str, tuple[Callable[[Envelope], None], bool]]] = {
    "hello": (_v_hello, False),
    "join": (_v_join, False),
    "leave": (_v_room, False),
    "msg": (_v_msg, True),
    "dm": (_v_dm, True),
    "history": (_v_history, False),
    "who": (_v_room, False),
    "rooms": (_v_none, False),
    "ping": (_v_none, False),
    "bye": (_v_none, False),
}

REQUEST_TYPES: Final = frozenset(_REQUESTS)


def validate_request(env: Envelope) -> Envelope:
    """Check a decoded envelope against its request type; fills defaults in place.

    Keys a request does not define are ignored (``from`` and ``sender`` among
    them: the broker writes those).
    """
    kind = env["type"]
    spec = _REQUESTS.get(kind)
    try:
        if spec is None:
            _fail(ErrorCode.UNKNOWN_TYPE, f"unknown request type {kind[:40]!r}")
        check, id_required = spec
        _check_id(env, id_required)
        check(env)
    except ProtocolError as exc:
        exc.request_id = _read_id(env)
        raise
    return env


def decode_request(frame: bytes) -> Envelope:
    """Bytes from a client to a valid request envelope, or ``ProtocolError``."""
    env = _unpack_map(frame, MAX_FRAME_BYTES)
    if env.get("type") == "msg" and _plain_msg(env):
        return env
    if _too_many_values(env):
        raise ProtocolError(
            ErrorCode.BAD_ENVELOPE, f"more than {MAX_REQUEST_VALUES} values in one request", _read_id(env)
        )
    return validate_request(_check_envelope(env))


def _too_many_values(env: Envelope) -> bool:
    """Whether ``env`` holds more than MAX_REQUEST_VALUES values; its work is bounded by
    that number, not by the request's size (the checks after it are not)."""
    left = MAX_REQUEST_VALUES
    todo: list[object] = [env]
    while todo:
        value = todo.pop()
        if type(value) is dict:
            left -= 2 * len(value)
            if left < 0:
                return True
            todo.extend(value.values())
        elif type(value) is list:
            left -= len(value)
            if left < 0:
                return True
            todo.extend(value)
    return False


def _plain_msg(env: Envelope) -> bool:
    """Whether ``env`` is a room message of the common shape: every key and value a
    ``str``, a valid ``id``, ``room`` and ``text``, no ``action``. One pass instead of the general
    checks' eight calls (about 0.6 us of the broker's ~12 us per message); those
    accept exactly these too, so ``False`` only means: let them decide, and word
    the refusal."""
    if len(env) > MAX_REQUEST_VALUES // 2:  # (the general checks count the values)
        return False
    for key, value in env.items():
        if type(key) is not str or type(value) is not str:
            return False
    rid, room, text = env.get("id"), env.get("room"), env.get("text")
    return (
        "action" not in env
        and rid is not None
        and 0 < len(rid) <= MAX_ID_CHARS
        and text is not None
        and 0 < len(text) <= MAX_TEXT_CHARS
        and room is not None
        and _ROOM_RE.fullmatch(room) is not None
    )


# --------------------------------------------------------------------------
# envelope builders (one place for every message shape)


def _with_id(env: Envelope, request_id: str | None) -> Envelope:
    if request_id is not None:
        env["id"] = request_id
    return env


def error(code: ErrorCode, message: str, request_id: str | None = None) -> Envelope:
    return _with_id({"type": "error", "code": str(code), "message": message}, request_id)


def hello(name: str, request_id: str | None = None, resume: str | None = None) -> Envelope:
    env: Envelope = {"type": "hello", "v": VERSION, "name": name}
    if resume is not None:
        env["resume"] = resume
    return _with_id(env, request_id)


def welcome(
    name: str,
    sender: str,
    epoch: str,
    heartbeat_ms: int,
    resume: str,
    resumed: bool,
    request_id: str | None,
    rooms: list[str] | None = None,
) -> Envelope:
    """``resume`` is the session's secret token; ``resumed`` says an existing session was
    taken over, and ``rooms`` (with it) which rooms that session is in (``in_rooms``)."""
    env: Envelope = {
        "type": "welcome",
        "v": VERSION,
        "name": name,
        "sender": sender,
        "epoch": epoch,
        "heartbeat_ms": heartbeat_ms,
        "resume": resume,
        "resumed": resumed,
    }
    if rooms is not None:
        # (Not "rooms": a client of before this field took a welcome with it for malformed.)
        env["in_rooms"] = rooms
    return _with_id(env, request_id)


def msg_event(
    room: str, seq: int, ts: int, name: str, sender: str, text: str, msg_id: str, action: bool = False
) -> Envelope:
    """A room message; ``action`` marks an IRC-style ``/me`` (only present when true)."""
    env: Envelope = {
        "type": "msg",
        "room": room,
        "seq": seq,
        "ts": ts,
        "from": name,
        "sender": sender,
        "text": text,
        "id": msg_id,
    }
    if action:
        env["action"] = True
    return env


#: Why a session left its rooms, in a ``leave`` that was not a ``leave`` request: its
#: client said ``bye``, it went silent (or its broker did), its user's key was revoked.
LeaveReason = Literal["quit", "timeout", "revoked"]


def presence_event(room: str, seq: int, ts: int, name: str, event: str, reason: LeaveReason | None = None) -> Envelope:
    env: Envelope = {"type": "presence", "room": room, "seq": seq, "ts": ts, "name": name, "event": event}
    if reason is not None:
        env["reason"] = reason
    return env


def dm_event(name: str, sender: str, to: str, text: str, ts: int, msg_id: str) -> Envelope:
    return {"type": "dm", "from": name, "sender": sender, "to": to, "text": text, "ts": ts, "id": msg_id}


def mark(count: int, signature: str) -> str:
    """A large reply's ``mark``: the bytes of large replies sent to the session up to it
    (hex), a dot, and the broker's signature of that count for the session."""
    return f"{count:x}.{signature}"


def mark_count(value: object) -> int:
    """The count a ``mark`` (or a request's ``read``, which says one back) stands for, or
    -1 for anything that is no mark; whether it is genuine is the broker's to check."""
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        return -1
    try:
        return int(value.partition(".")[0], 16)
    except ValueError:
        return -1


def encode_history(room: str, bodies: list[bytes], seq: int, request_id: str | None, mark: str | None = None) -> bytes:
    """A ``history`` reply built around stored event bodies without re-packing them.

    Each body is already one packed event map, so the reply is the map header,
    the scalar fields, an array header and the bodies back to back.
    """
    packer = msgpack.Packer(use_bin_type=True)
    head: dict[str, Any] = {"type": "history", "room": room, "seq": seq}
    if request_id is not None:
        head["id"] = request_id
    if mark is not None:
        head["mark"] = mark
    parts = [packer.pack_map_header(len(head) + 1)]
    for key, value in head.items():
        parts.append(packer.pack(key))
        parts.append(packer.pack(value))
    parts.append(packer.pack("messages"))
    parts.append(packer.pack_array_header(len(bodies)))
    parts.extend(bodies)
    return b"".join(parts)
