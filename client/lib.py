"""The zchat client library: what bots import and what the CLI is built on.

A :class:`Client` owns one DEALER (requests, replies, DMs) and one SUB (room
events). It is single-threaded by design: every socket is touched only from
the thread that calls it, so use one ``Client`` per thread. Nothing happens
behind your back; the sockets are read whenever you call :meth:`Client.pump`,
:meth:`Client.next_event`, :meth:`Client.events` or a request method.

Guarantees it gives on top of the wire (the design brief's "Client rules"; docs/protocol.md):

* Joining follows the Clone pattern: subscribe, then ask for history, then
  drop live events at or below what history covered.
* Events of a room are delivered in ``seq`` order, each once; a jump in
  ``seq`` is filled from ``history`` before later events are delivered.
* Your own room messages arrive once, as ``msg`` events with ``own=True``,
  once the broker has acknowledged them, in their place in the room's ``seq``
  order (after every earlier event of the room); their copies on the SUB
  stream (matched by ``sender`` or ``id``) are dropped. Your own DMs arrive
  on their ack.
* A message is kept until acknowledged and resent with the same ``id`` after
  a timeout or a reconnect; the broker stores a given (name, id) once while it
  is among its last 100,000. A DM delivered twice (resent across a failover),
  or a room message stored twice (resent after that), is shown once: the last
  :data:`DM_WINDOW` and :data:`MSG_WINDOW` (author, id) pairs are remembered.
* It pings every heartbeat; a broker silent for 2.5 heartbeats, one that closes
  the connection (it stopped or crashed), or one that no longer knows the
  session, is lost: the client opens fresh sockets to the
  next broker address (round-robin over ``hosts``; the same one when there is
  only one), says hello again with its resume token (taking its old session
  back if that broker, or its cluster, still has it), rejoins its rooms
  (retrying a join refused as ``rate_limited``, ``unavailable`` or
  ``internal_error`` after a growing delay, and holding the room's messages
  until it is back in and has caught up; another refusal drops the room, with an ``error``
  event), fetches what
  it missed from history and resends what was not acknowledged. A broker that
  does not answer the hello within the backoff (1 to 5 s) is left for the next
  one. ``state`` tells where it is, ``address`` which broker it uses, and
  ``status`` events tell the user (with the broker in ``Event.broker``).
* A broker that answers ``unavailable`` (it lost its backplane, or its disk is
  nearly full; nothing was stored) is retried, said once by a ``status``
  "unavailable" event (and its end by one "available"): messages and DMs are
  held and resent in order after
  :data:`UNAVAILABLE_RETRY_S`, like ``rate_limited`` ones; hello and join are
  asked again. After :data:`FAILOVER_UNAVAILABLE_COUNT` such answers in a row
  over at least :data:`FAILOVER_UNAVAILABLE_S` seconds the client fails over to
  the next broker address, if it has more than one.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import random
import re
import secrets
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from zchat import protocol as p
from zchat.protocol import Envelope, ErrorCode, ProtocolError

log = logging.getLogger("zchat.client")
log.addHandler(logging.NullHandler())  # a library: the program decides what is shown

#: Longest wait for the broker's ``welcome`` (per broker address).
CONNECT_TIMEOUT_S = 5.0
#: Why an address failed whose port accepts connections and closes them without a word.
_DROPPED = "it closes the connection before any greeting (a proxy with no broker behind it?)"
#: A CURVE handshake that a CURVE broker cut short looks the same whether our broker key is
#: not its key or its gate had no answer for it: the broker's gate moves between two sockets
#: now and then (broker/gate.py), and a handshake that starts in those microseconds is cut
#: (as one during a restart is). Only a wrong key is cut every time: it is blamed once this
#: many handshakes in a row on one socket were cut; before that, libzmq tries again.
CURVE_CUTS_BEFORE_BLAME = 3
#: After the welcome, how long connect() waits for the room event port's handshake (seconds).
SUB_GRACE_S = 1.0
#: Longest wait for any other reply.
REQUEST_TIMEOUT_S = 10.0
#: Until a room's first event arrives on SUB, history is polled this often
#: (growing linearly), at most PROBE_LIMIT times; see Client._probe_rooms.
PROBE_INTERVAL_S = 0.25
PROBE_LIMIT = 12
#: An unacknowledged message is resent after this long (or 2 heartbeats, if longer).
ACK_RESEND_S = 5.0
#: Before closing, give up waiting for acks after this long with none (see Client.settling).
SETTLE_S = 10.0
#: How many ids of our own shown messages are remembered to drop their copies.
SHOWN_WINDOW = 10_000
#: The ``code`` of a message :meth:`Client.unacknowledged` lists that did not arrive: it
#: never left this client (written while the broker was away, or waiting behind another),
#: or the broker refused it (``rate_limited``, ``unavailable``) and it has not gone since.
UNSENT = "unsent"
#: How many (author, id) of received DMs are remembered to drop a second delivery.
DM_WINDOW = 10_000
#: How many (author, id) of others' room messages are remembered to drop a copy
#: stored twice (resent after the broker's resend detection forgot the first).
MSG_WINDOW = 10_000
#: Longest wait for room in the DEALER's queue before the connection is given up.
SEND_WAIT_S = 1.0
#: After a ``rate_limited`` refusal, new and refused messages wait this long, then
#: go again in order, the refused one first (the broker takes no other before it).
RATE_RETRY_S = 1.0
#: After an ``unavailable`` answer, the refused request is asked again after this long.
UNAVAILABLE_RETRY_S = 1.0
#: A refused rejoin is retried after a delay growing by half each time, up to this.
REJOIN_RETRY_MAX_S = 5.0
#: While reconnecting, a hello refused again for the same reason (``name_taken``: another
#: client has our name) is said again at most this often, in s: it is retried every few
#: seconds, and one line each time buried the chat.
REFUSAL_REPEAT_S = 60.0
#: This many ``unavailable`` answers in a row, spread over at least this many
#: seconds, make the client fail over to the next broker (when it has several).
FAILOVER_UNAVAILABLE_COUNT = 3
FAILOVER_UNAVAILABLE_S = 3.0
#: A ``pong`` that shows a room beyond the last event we have is believed this
#: much later, if SUB has not caught up by then (events in flight are not a gap).
TAIL_GRACE_S = 1.0
#: After a reconnect, a DM whose recipient is not online is asked again every DM_RETRY_S
#: for 3 heartbeats and DM_GRACE_EXTRA_S more: the recipient may be reconnecting too.
DM_RETRY_S = 1.0
DM_GRACE_EXTRA_S = 5.0
#: Join refusals that are asked again after a moment (seconds), within the request timeout.
_PATIENT_RETRY_S: dict[str, float] = {ErrorCode.UNAVAILABLE: UNAVAILABLE_RETRY_S, ErrorCode.RATE_LIMITED: RATE_RETRY_S}
#: Pings whose pong we wait for at most (one per heartbeat, and one per resend due).
PINGS_TRACKED = 8
#: Room events a client holds for its reader (its queue, and what waits in rooms for an
#: earlier event): past it, room events are dropped as they come, and fetched from history
#: once the reader has caught up, in order. Held without a bound, a reader slower than its
#: room (a pipe nobody empties, a bot that idles) grew by every event: 80,000 messages of
#: 2 KB cost a ``zchat --json`` 225 MiB.
MAX_QUEUE = 10_000
#: Room events one pump decodes at most; the rest wait in the SUB socket for the next
#: (which comes at once: the socket stays readable). After a stall (a suspended terminal,
#: a long render) the socket holds up to sub_hwm frames: decoded in one pump, 10,000 events
#: kept the terminal's keys waiting 370 ms.
SUB_EVENTS_PER_PUMP = 1000
#: next_event() takes a turn of the client at least this often while it hands out events
#: already queued: a bot working through a long queue still pings, and acks still come.
QUEUED_PUMP_S = 0.2
#: A broker silent for this many heartbeats is taken for lost: fewer than the 3 after which
#: it ends a silent session, so that a client whose connection went dead without closing (a
#: NAT or firewall that forgot it, a Wi-Fi hand-over) still finds its session to resume on a
#: new one. At 3 the broker had always ended it first (it counts from our last ping, we from
#: its pong), and the rooms saw a leave and a join for every such outage.
SILENT_HEARTBEATS = 2.5


class ZchatError(Exception):
    """Base of every error this library raises; ``code`` and ``message`` say what went wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


class BrokerUnreachable(ZchatError):
    """The broker did not answer in time (not running, wrong address, gone, or reconnecting).

    Raised by :meth:`Client.send_wait` and :meth:`Client.dm_wait`, ``msg_id`` is the
    message's id: it is still queued and is resent until the broker acknowledges it
    (an own ``msg`` or ``dm`` event with that id), so it must not be sent again.
    """

    def __init__(self, message: str, msg_id: str | None = None, *, maybe_down: bool = True, held: bool = False) -> None:
        super().__init__("", message)
        self.code = "unreachable"
        self.msg_id = msg_id
        #: The broker answers: the message waits behind its rate limit (or an ``unavailable``).
        self.held = held
        #: False when no address failed for want of an answer: every one named a host
        #: that does not resolve, or something that is not a zchat broker answered.
        self.maybe_down = maybe_down


class RequestError(ZchatError):
    """The broker refused a request (or it was refused before sending, for the same reason)."""


def _room(room: str) -> str:
    """``room`` without its ``#``, checked; a bad name is a :class:`RequestError` like any refusal."""
    if not isinstance(room, str):
        raise RequestError(ErrorCode.BAD_ROOM, f"a room is a name (a str), not {type(room).__name__}")
    try:
        return p.parse_room(room)
    except ProtocolError as exc:
        raise RequestError(exc.code, exc.message) from None


# ------------------------------------------------------------ broker addresses


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where one broker listens: its host, request (ROUTER) port and room-event (PUB) port."""

    host: str
    port: int
    pub_port: int

    def __post_init__(self) -> None:
        for what, number in (("port", self.port), ("room event port", self.pub_port)):
            # libzmq would take 99999 and connect to 34463.
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
                raise ValueError(f"{what} {number!r} is not a port number (an integer 1-65535)")

    @property
    def endpoint(self) -> str:
        return p.tcp_endpoint(self.host, self.port)

    @property
    def pub_endpoint(self) -> str:
        return p.tcp_endpoint(self.host, self.pub_port)

    def __str__(self) -> str:
        """``HOST:PORT:PUBPORT`` (IPv6 in brackets): the form :func:`parse_address` reads back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}:{self.pub_port}"


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ADDRESS_FORMS = "HOST, HOST:PORT or HOST:PORT:PUBPORT (IPv6 in brackets: [::1]:5555:5556)"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _unresolved(host: str) -> str | None:
    """Why ``host`` cannot be connected to by name (None: it resolves, or is an address).

    libzmq would retry a name that does not resolve for ever, each failure looking
    like a refused connection; asked here, the error says what is wrong.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            return None  # no answer from the resolver, for now: libzmq asks again as it retries
        return f"cannot resolve the host name {host!r} ({exc.strerror})"
    except UnicodeError as exc:
        return f"cannot resolve the host name {host!r} ({exc})"
    return None


#: The start of a ZeroMQ 3.0 greeting (signature and version): enough for a peer to send
#: the whole of its own (:func:`_greeting_mechanism`), not enough for it to judge ours
#: (with a whole greeting of another mechanism, a peer hangs up before sending its own).
_GREETING_START = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0])


def _greeting_mechanism(host: str, port: int, timeout: float = 0.5) -> str | None:
    """The security mechanism ("NULL", "CURVE") a ZeroMQ peer at ``host:port`` announces in its greeting.

    "" when what answers is not ZeroMQ: its first bytes are not a ZeroMQ
    signature. None when nothing can be told: nothing answered within
    ``timeout`` (refused, silent, unreachable), or it hung up without a byte,
    as a proxy does while the broker behind it is down or starting.
    """
    data = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(_GREETING_START)
            while len(data) < 32:
                chunk = conn.recv(64 - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:
        pass  # refused, silent, or hung up: what it said before counts
    if data and (data[0] != 0xFF or (len(data) >= 10 and data[9] != 0x7F)):
        return ""
    if len(data) < 32:
        return None
    return data[12:32].rstrip(b"\0").decode("ascii", "replace")


#: A whole ZeroMQ 3.0 greeting with no security, as a client: a NULL peer answers it with
#: its READY command, which names its socket type (:func:`_peer_socket_type`).
_NULL_GREETING = _GREETING_START + b"NULL".ljust(20, b"\0") + bytes(32)


def _wrong_socket(address: BrokerAddress, *, pub: bool) -> str | None:
    """Why the request port (or with ``pub``, the room event port) of ``address`` is the wrong
    one, when a ZeroMQ socket of another type than a broker's answers there.

    A broker's two ports given the wrong way round (or one of them twice) look, to
    libzmq, like a refused or silent port: "is zchat-broker running there?" would send
    the user to look for a broker that is running, and for the room event port, nothing
    would say which port is wrong.
    """
    want, other = ("PUB", "ROUTER") if pub else ("ROUTER", "PUB")
    kind = _peer_socket_type(address.host, address.pub_port if pub else address.port)
    if kind is None or kind == want:
        return None
    if pub:
        hint = " (a broker's request port? give its room event port: 5556 by default)" if kind == other else ""
        return f"what answers there is a ZeroMQ {kind} socket, not a zchat broker's room event port{hint}"
    hint = " (a broker's room event port? give its request port: 5555 by default)" if kind == other else ""
    return f"what answers at {address.endpoint} is a ZeroMQ {kind} socket, not a zchat broker's request port{hint}"


def _peer_socket_type(host: str, port: int, timeout: float = 0.5) -> str | None:
    """The socket type ("ROUTER", "PUB", ...) a ZeroMQ peer without security at ``host:port`` names.

    libzmq hangs up on a peer whose socket type does not fit its own (a DEALER at a
    PUB port: the broker's ports given the wrong way round) without any event that says
    so: to us it looks like a refused connection. A NULL peer sends its READY command as
    soon as it has our greeting (before it has our READY, which we never send), so the
    type can be read here. None when it cannot be told: nothing or not ZeroMQ answered,
    or the peer uses CURVE (its READY is encrypted).
    """
    data = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(_NULL_GREETING)
            # The greeting (64 bytes), then a short command: flags, size, body.
            while len(data) < 66 or len(data) < 66 + data[65]:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        pass
    if len(data) < 66 or data[:1] != b"\xff" or data[12:32].rstrip(b"\0") != b"NULL" or data[64] != 0x04:
        return None  # (0x04: a short command; a READY with the properties libzmq sends is short)
    body = data[66 : 66 + data[65]]
    if body[:6] != b"\x05READY":
        return None
    i = 6
    while i < len(body):
        name_len = body[i]
        name = body[i + 1 : i + 1 + name_len]
        i += 1 + name_len
        value_len = int.from_bytes(body[i : i + 4], "big")
        value = body[i + 4 : i + 4 + value_len]
        i += 4 + value_len
        if name.lower() == b"socket-type":
            return value.decode("ascii", "replace") if value.isalpha() and len(value) <= 16 else None
    return None


def parse_address(text: str, port: int = 5555, pub_port: int = 5556) -> BrokerAddress:
    """One broker address as a person writes it: ``HOST``, ``HOST:PORT`` or ``HOST:PORT:PUBPORT``.

    An IPv6 address goes in brackets when ports follow (``[::1]:5555:5556``);
    alone it may also be written bare (``::1``). Ports that are not given are
    ``port`` and ``pub_port``. Pure (no I/O, no name lookup); raises
    ``ValueError`` with a message saying what is wrong.
    """
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty broker address: expected {_ADDRESS_FORMS}")
    if "://" in spec:
        raise ValueError(f"broker address {text!r}: write {_ADDRESS_FORMS}, without a scheme like tcp://")
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ValueError(f"broker address {text!r}: no ']' after the IPv6 address")
        host, rest = spec[1:close], spec[close + 1 :]
        if not _is_ipv6(host):
            raise ValueError(f"broker address {text!r}: {host!r} (in brackets) is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"broker address {text!r}: expected ':PORT' after ']'")
        ports = rest[1:].split(":") if rest else []
    elif spec.count(":") >= 2 and _is_ipv6(spec):
        host, ports = spec, []
    elif spec.count(":") > 2:
        raise ValueError(
            f"broker address {text!r}: too many ':' (an IPv6 address followed by ports goes in brackets: [::1]:5555)"
        )
    else:
        host, *ports = spec.split(":")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"broker address {text!r}: {host!r} is not a host name or IP address")
    if len(ports) > 2:
        raise ValueError(f"broker address {text!r}: too many ports; expected {_ADDRESS_FORMS}")
    numbers = [port, pub_port]
    for i, value in enumerate(ports):
        what = ("PORT", "PUBPORT")[i]
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
            raise ValueError(f"broker address {text!r}: {what} {value!r} is not a port number (an integer 1-65535)")
        numbers[i] = int(value)
    return BrokerAddress(host, numbers[0], numbers[1])


def parse_hosts(
    hosts: str | Sequence[str | BrokerAddress], port: int = 5555, pub_port: int = 5556
) -> list[BrokerAddress]:
    """Broker addresses from ``"a,b:5555,[::1]:5555:5556"`` or a sequence of such items.

    Each item is read by :func:`parse_address` (missing ports from ``port`` and
    ``pub_port``); a :class:`BrokerAddress` is taken as is. Order is kept: it is
    the order the client tries them in. Raises ``ValueError``.
    """
    items: Sequence[str | BrokerAddress] = hosts.split(",") if isinstance(hosts, str) else hosts
    out = [item if isinstance(item, BrokerAddress) else parse_address(item, port, pub_port) for item in items]
    if not out:
        raise ValueError(f"no broker address given: expected {_ADDRESS_FORMS}, separated by commas")
    return out


class RoomList(list[dict[str, Any]]):
    """What :meth:`Client.rooms` returns: a list, which also says whether it is all."""

    def __init__(self, rooms: Sequence[dict[str, Any]], *, truncated: bool) -> None:
        super().__init__(rooms)
        #: The broker had more rooms than a reply lists (see docs/protocol.md, ``rooms``).
        self.truncated = truncated


class MemberList(list[str]):
    """What :meth:`Client.join` and :meth:`Client.who` return: the names, sorted, and how
    many members there are, ``total``: a room of more than 10,000 lists only the first by
    name (docs/protocol.md, ``joined``), and then ``truncated`` is true."""

    def __init__(self, names: Sequence[str], *, count: int | None = None) -> None:
        super().__init__(names)
        #: How many members the room has (more than listed when ``truncated``). Not
        #: ``count``, which a list has already (list.count).
        self.total = count if count is not None and count > len(names) else len(names)

    @property
    def truncated(self) -> bool:
        return self.total > len(self)


def _members(reply: Envelope) -> MemberList:
    """A reply's member list, with its ``count`` when the broker listed only some (or,
    for a join that said ``members: false``, none)."""
    count = reply.get("count")
    return MemberList(reply.get("members", []), count=count if type(count) is int else None)


def _skipped(room: str, first: int, to: int, why: Literal["retention", "lost"]) -> Event:
    """The status event that says events ``first``-``to`` of ``room`` were passed over."""
    count = to - first + 1
    what = f"{count} events of #{room} (seq {first}-{to}) are" if count > 1 else f"event {first} of #{room} is"
    if why == "retention":
        text = f"{what} no longer kept by the broker (its retention): skipped"
    else:
        text = f"{what} missing from the broker's store (lost, or deleted by its retention): skipped"
    return Event(type="status", event="skipped", room=room, seq=to, text=text)


# ------------------------------------------------------------------ events


@dataclass(slots=True)
class Event:
    """Something to show: a room message or presence change, a DM, an error, or a
    ``status`` change of the connection (``event`` is "reconnecting" or "connected"),
    or a ``status`` "skipped": events of ``room`` up to ``seq`` that the broker no
    longer has (deleted by its retention, or lost from its store) were passed over,
    or a ``status`` "renumbered": after a reconnect, the broker numbers ``room`` from
    ``seq``, below the events seen (its store was lost or replaced: the room's history
    from before is gone), or a ``status`` "no_room_events": right after connect(), the
    broker's room event port refused or did not answer (room events then come late, by
    catch-up), or a ``status`` "unavailable": the broker refused a message as
    ``unavailable`` (its disk nearly full, or its backplane lost; the message is held
    and sent again), said once until a ``status`` "available" says it takes them again.

    ``name`` is who wrote or joined/left (the wire's ``from`` or ``name``).
    ``own`` marks your own messages (delivered on their ack); ``backlog``
    marks events replayed from history when joining, from before the join (the
    join's own presence event is not one of them). A ``status`` event names
    in ``broker`` the broker address (``HOST:PORT:PUBPORT``) it is about: the
    one being tried, or the one now connected.
    """

    type: str
    room: str | None = None
    seq: int | None = None
    ts: int | None = None
    name: str | None = None
    text: str | None = None
    to: str | None = None
    event: str | None = None
    sender: str | None = None
    id: str | None = None
    code: str | None = None
    message: str | None = None
    own: bool = False
    backlog: bool = False
    #: A ``/me`` action ("* bob waves") rather than a plain message.
    action: bool = False
    broker: str | None = None
    #: Of a presence ``leave`` that was no ``leave`` request: "quit" (its client said
    #: bye), "timeout" (it went silent), "revoked" (its key was); None for a plain leave.
    reason: str | None = None

    @classmethod
    def from_envelope(cls, env: Envelope, *, own: bool = False, backlog: bool = False) -> Event:
        def s(key: str) -> str | None:
            v = env.get(key)
            return v if isinstance(v, str) else None

        def i(key: str) -> int | None:
            v = env.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        kind = env["type"]
        return cls(
            type=kind,
            room=s("room"),
            seq=i("seq"),
            ts=i("ts"),
            name=s("name") if kind == "presence" else s("from"),
            text=s("text"),
            to=s("to"),
            event=s("event"),
            sender=s("sender"),
            id=s("id"),
            code=s("code"),
            message=s("message"),
            own=own,
            backlog=backlog,
            action=env.get("action") is True,
            reason=s("reason") if kind == "presence" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The event in the wire's vocabulary (``from``, not ``name``), without empty fields."""
        out: dict[str, Any] = {"type": self.type}
        fields: tuple[str, ...]
        if self.type == "presence":
            fields = ("room", "seq", "ts", "name", "event", "reason")
        elif self.type == "dm":
            fields = ("from", "to", "text", "ts", "id")
        elif self.type == "error":
            fields = ("code", "message", "id")
        elif self.type == "status":
            fields = ("event", "room", "seq", "text", "broker")
        else:
            fields = ("room", "seq", "ts", "from", "text", "id")
        for key in fields:
            value = self.name if key in ("from", "name") else getattr(self, key)
            if value is not None:
                out[key] = value
        if self.action:
            out["action"] = True
        if self.own:
            out["own"] = True
        if self.backlog:
            out["backlog"] = True
        return out


@dataclass(slots=True)
class _Room:
    #: Highest seq delivered (or covered by history); None while joining.
    last: int | None = None
    #: Events waiting for the ones before them: live or fetched envelopes, and
    #: our own acknowledged messages (already made into their ``Event``).
    pending: dict[int, Envelope | Event] = field(default_factory=dict)
    #: No seq in ``pending`` is below this (lowered as they come, raised past ``last`` by
    #: _flush): only then may some be at or below ``last`` and need dropping.
    floor: int = 0
    fetching: bool = False
    #: ``after`` of the history request in flight, its id and when it went.
    fetch_after: int = 0
    fetch_rid: str = ""
    fetch_sent: float = 0.0
    #: Whether the SUB stream has shown this room's events yet (subscription live).
    confirmed: bool = False
    probes: int = 0
    next_probe: float = 0.0
    #: Whether the broker has us in the room in this session (False from a lost
    #: connection until the rejoin is answered; messages to it wait meanwhile).
    joined: bool = False
    #: A leave is in flight: a reconnect meanwhile must not rejoin the room.
    leaving: bool = False
    #: When to retry a refused rejoin (0: none due), and how many were refused.
    rejoin_at: float = 0.0
    rejoin_tries: int = 0
    #: When to ask history again (0: not scheduled): after a refused history
    #: request, or to confirm an empty reply before skipping what the store lost.
    refetch_at: float = 0.0
    #: ``after`` of an empty history reply that showed the room ahead of its store.
    empty_after: int | None = None
    #: The room's seq by the last ``pong``, and when to fetch up to it if SUB
    #: has not brought it by then (0: nothing to check): a lost tail shows no gap.
    tail: int = 0
    tail_at: float = 0.0
    #: ``last`` when the check was (re)armed: SUB still moving means only behind.
    tail_from: int = 0
    #: ``last`` when the connection was lost, until the room is rejoined: what the
    #: rejoin's seq is compared with (SUB may deliver newer events before that reply).
    lost_at: int | None = None
    #: After a rejoin that found the room ahead of us, with a message of ours to it that
    #: went before the connection was lost and is unacknowledged: the seq to catch up to
    #: before our messages to it go again (0: none). An original that was
    #: stored, its ack lost, shows in the catch-up and counts as its ack; resent
    #: first, it could be stored twice once the broker's resend window has passed it.
    catch_up_to: int = 0
    #: The room's highest seq this broker has told us of (joined, pongs, acks, history): a
    #: message sent now cannot be stored at or below it (see Client._floor).
    top: int = 0
    #: A search of history for our own unacknowledged messages, for a program with max_queue
    #: events unread (see Client._search_own): the id of the page in flight ("" none), when
    #: it went, the range it covers (after, to], and the messages it looks for, each with
    #: when it was last sent (one sent again meanwhile may be stored above what was read).
    search_rid: str = ""
    search_sent: float = 0.0
    search_after: int = 0
    search_to: int = 0
    search_ids: dict[str, float] = field(default_factory=dict)
    #: When a refused page of it may be asked again.
    search_retry_at: float = 0.0
    #: Events up to this seq are history, shown with ``backlog`` set (join with ``after``).
    backlog_to: int = 0
    #: Joined by a session that was in the room already (resumed): the join published no
    #: presence, so an own join at the room's top is an earlier run's, from before it.
    stayed: bool = False
    #: (author, id) of the messages that history has shown (a copy stored twice shows once).
    backlog_seen: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)


#: Handshake "failures" that are only a connection dropping (ECONNRESET, EPIPE, ...), or a
#: handshake that timed out (EAGAIN: nothing came within ZMQ_HANDSHAKE_IVL, 30 s, as through
#: a network that vanished without closing anything; no key problem).
_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EAGAIN}
)

#: The handshake failure of two ends whose security differs (CURVE against none).
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """Our CURVE keypair and the broker's public key (all z85, as in ZeroMQ certificates)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: str | os.PathLike[str], broker_public_file: str | os.PathLike[str]) -> CurveKeys:
        """From ``NAME.key_secret`` and the broker's ``broker.key`` (as made by ``zchat-keygen``)."""
        for path, what in ((secret_file, "secret key"), (broker_public_file, "broker key")):
            if not os.path.isfile(path):  # pyzmq would say "Invalid certificate file"
                raise RequestError("bad_key", f"no {what} file {os.fspath(path)!r} (zchat-keygen makes one)")
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise RequestError("bad_key", f"cannot read the secret key {secret_file}: {exc}") from None
        if not secret:
            raise RequestError("bad_key", f"{secret_file} holds no secret key (use the .key_secret file)")
        try:
            server, server_secret = zmq.auth.load_certificate(broker_public_file)
        except (OSError, ValueError) as exc:
            raise RequestError("bad_key", f"cannot read the broker key {broker_public_file}: {exc}") from None
        if server_secret:
            # It would work, but the broker's secret does not belong on a client's machine:
            # whoever holds it can pose as the broker. Said before it spreads further.
            raise RequestError(
                "bad_key",
                f"{broker_public_file} holds the broker's secret key: give clients its public one "
                "(broker.key, not broker.key_secret), and keep the secret on the broker only",
            )
        return cls(public, secret, server)


class Client:
    """One chat session. Use it from one thread; see the module docstring."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 5555,
        pub_port: int = 5556,
        *,
        hosts: str | Sequence[str | BrokerAddress] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        sub_hwm: int = 10_000,
        curve: CurveKeys | None = None,
        resume: str | None = None,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        """``hosts`` lists several brokers of one chat (a cluster sharing a
        backplane, or independent ones): ``"a,b:5555,[::1]:5555:5556"`` or a
        sequence of such items (see :func:`parse_hosts`; missing ports are
        ``port`` and ``pub_port``; a bad one raises ``ValueError``). They are
        tried in order by :meth:`connect`, and the client fails over to the next
        one when it loses the broker it uses. Without ``hosts``, the one broker
        is ``host``, ``port``, ``pub_port``.

        ``sub_hwm`` bounds the room messages (events, or batches of them) queued
        locally; beyond it ZeroMQ drops them and the client fetches them from
        history instead (as after any gap, or a lost tail the next pong shows).

        ``max_queue`` bounds the room events held for the program to read: the
        queue, and events waiting in a room for an earlier one. At the bound, room
        events that come are dropped, and nothing is fetched from history, until
        the program has read some; then what was dropped is fetched from history
        and delivered in order, each once (at the pace of the broker's history
        budget: 1 MiB/s after a burst of 32 MiB by default), as after a gap. Acks,
        replies and DMs are always kept. A message of yours whose ack is lost
        meanwhile is looked for in history, page by page, keeping nothing else:
        found, it is acknowledged; not, it is sent again (see :meth:`send`).

        ``resume`` is the :attr:`resume_token` of an earlier ``Client`` of this name:
        a program restarted after a crash takes its session back at once, where a
        plain hello meets ``name_taken`` until the old one expires. It must
        ``join()`` its rooms again to hear them. Give a token to one running client:
        the one a second client takes the session from gets a ``session_moved``
        error event and is closed.
        """
        if not p.is_name(name):
            raise RequestError(
                ErrorCode.BAD_NAME, f"{name!r} is not a name: use 1-32 of A-Z a-z 0-9 _ . -, not starting with . or -"
            )
        self.name = name
        if hosts is None and isinstance(host, str) and ":" in host and not _is_ipv6(host):
            # ("127.0.0.1:5555" was looked up as a host name, and connect() failed with
            # "cannot resolve the host name": the CLI's --host takes that form, host= does not.)
            raise ValueError(
                f"host {host!r}: a host name or address alone, its ports given as port= and pub_port=; "
                f"for {_ADDRESS_FORMS}, pass hosts="
            )
        #: The brokers to use, in order of preference.
        self.addresses: list[BrokerAddress] = (
            [BrokerAddress(host, port, pub_port)] if hosts is None else parse_hosts(hosts, port, pub_port)
        )
        self._index = 0
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        #: "new", then "connected" / "reconnecting", finally "closed".
        self.state = "new"
        self.sender: str | None = None
        self.epoch: str | None = None
        self.heartbeat_ms = 5000
        self._sub_hwm = sub_hwm
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: at least 1")
        self._max_queue = max_queue
        #: When the program last took a turn of the client (see next_event).
        self._last_pump = 0.0
        self._curve = curve
        self._auth_failure: str | None = None
        #: A key refusal was reported (an ``auth_failed`` event) since the last welcome:
        #: retries refused again (by this broker or the next) do not report it at every try.
        self._auth_said = False
        #: Set by a session_moved error: the pump that read it closes this client.
        self._moved: str | None = None
        #: The DEALER's connection was refused (or dropped) since the sockets were opened.
        self._refused = False
        #: Why what answers at the request port is not a zchat broker (its ZeroMQ handshake failed).
        self._foreign: str | None = None
        #: Whether this connection's request port was asked its socket type (_wrong_socket).
        self._type_probed = False
        #: The request port's peer closed the connection before any greeting (a proxy whose broker is down?).
        self._dropped = False
        #: In connect(), up to its return (handshake failures are looked into until then).
        self._connecting = False
        #: The request connection is down (its last handshake was followed by a close), and
        #: when a session that is connected is taken for lost because of it (see _maintain).
        self._dealer_down = False
        self._lose_at: float | None = None
        #: The request connection closed since the sockets were opened (libzmq made a new one,
        #: which the broker does not know: its not_registered is about that, not the broker).
        self._dealer_cut = False
        #: The SUB's handshake with the room event port succeeded; why it failed, if it did.
        self._sub_up = False
        self._sub_failure: str | None = None
        #: How long the DEALER's last words (a bye) may take to leave when its socket closes (ms).
        self._dealer_linger_ms = 0
        self._hold_until = 0.0
        #: The refusal that set the last hold (rate_limited or unavailable), and when it came.
        self._hold_code: str | None = None
        self._hold_at = float("-inf")
        #: When a message was last refused as rate_limited (time.monotonic()).
        self._rate_limited_at = float("-inf")
        self._rooms: dict[str, _Room] = {}
        self._monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}
        #: CURVE handshakes of each socket cut short in a row (CURVE_CUTS_BEFORE_BLAME).
        self._curve_cuts: dict[zmq.Socket[bytes], int] = {}
        if resume is not None and not (isinstance(resume, str) and len(resume) <= p.MAX_ID_CHARS):
            raise RequestError(ErrorCode.BAD_ENVELOPE, "resume: a token from resume_token, or None")
        self._resume: str | None = resume or None  # ("": none, as from an empty saved file)
        #: Called with the session's token each time it changes (a new session: the first,
        #: or one that replaced a session the broker had lost): a program that keeps the
        #: token across its restarts (``resume``) saves it here, before a crash needs it.
        self.on_resume_token: Callable[[str | None], None] | None = None
        #: The rooms of the session connect() took back with ``resume`` (its welcome says
        #: them): a program restarted after a crash joins them again, or leaves them (until
        #: it does, it is listed there and hears nothing). Empty for a new session.
        self.resumed_rooms: list[str] = []
        #: Of those, the ones not joined or left since: a join of one publishes nothing.
        self._stayed_in: set[str] = set()
        #: The highest ``mark`` of the large replies read, said in each request's ``read`` (see _send).
        self._read_mark: str | None = None
        #: The broker of the last welcome.
        self._welcomed_by: BrokerAddress | None = None
        #: Hellos sent to the current address while reconnecting.
        self._hellos_here = 0
        #: The code of the last hello refused at the address in use (None: no answer yet).
        self._hello_refused: str | None = None
        #: The refusal of a hello last said while reconnecting, and when (see REFUSAL_REPEAT_S).
        self._refusal_said: tuple[object, float] | None = None
        #: ``unavailable`` answers in a row, and when the first of them came.
        self._unavailable = 0
        self._unavailable_since = 0.0
        #: A ``status`` "unavailable" was said (a message of ours refused so) and no
        #: ack of that type of message ("msg" or "dm") has come since: said once a
        #: spell, and its end once ("available"). Of that type: during the disk alarm
        #: DMs go on, and a DM's ack said "available" while room messages still waited.
        self._unavailable_said: str | None = None
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._poller = zmq.Poller()
        self._dealer, self._sub = self._open_sockets()
        self._encode = p.Encoder()
        self._id_prefix = secrets.token_hex(4)
        self._id_count = 0
        now = time.monotonic()
        self._last_ping = now
        #: Our pings whose pong has not come, by id: when each was sent.
        self._pings: dict[str, float] = {}
        #: Unacknowledged room messages sent before a ping whose pong has come, by
        #: id: their room's seq in that pong (the first such). See _caught_up_since.
        self._cover: dict[str, int] = {}
        #: Rooms we left: the last seq we had shown of each (a later join's backlog starts there).
        self._seen_before: dict[str, int] = {}
        #: Until then (after a reconnect), a DM written before it or meanwhile (in _dm_early)
        #: refused as ``no_such_user`` is asked again.
        self._dm_grace_until = 0.0
        self._dm_early: set[str] = set()
        #: Room messages unacknowledged that went out before a lost connection: the broker
        #: may have stored them. Only these make a rejoin catch up first (see _on_rejoin).
        self._went_before_loss: set[str] = set()
        #: Room messages sent at least once and unacknowledged, by id: a seq of their room
        #: at or below which no copy of them is stored (the room's top when one first went,
        #: raised by a search of history that found none; see _search_own).
        self._floor: dict[str, int] = {}
        #: Messages and DMs sent at least once and unacknowledged: the others never left
        #: (what close() and unacknowledged() say of them; see _fate).
        self._went: set[str] = set()
        #: DMs that wait to be asked again (their recipient not back yet: ``undelivered``, or
        #: ``no_such_user`` just after a reconnect), by id: until when they are. A later DM to
        #: the same person waits behind them (see _dm_blocked), so that DMs arrive in order.
        self._dm_waiting: dict[str, float] = {}
        #: Those of them answered ``undelivered`` at least once: their wait is a reconnect's
        #: from the first such answer (one that was ``no_such_user`` before started anew).
        self._dm_undelivered: set[str] = set()
        self._last_recv = now
        self._last_maintain = now
        #: The _last_recv a stall was last excused with (see _maintain).
        self._excused = -1.0
        self._next_hello = now
        self._events: deque[Event] = deque()
        #: id -> reply, for requests someone is waiting on.
        self._replies: dict[str, Envelope | None] = {}
        #: id -> callback, for replies handled in the background.
        self._callbacks: dict[str, Callable[[Envelope], None]] = {}
        #: id -> request, for messages and DMs not yet acknowledged (in send order).
        self._unacked: dict[str, Envelope] = {}
        #: id -> when it was last sent; 0.0 while it waits to be (re)sent.
        self._sent_at: dict[str, float] = {}
        #: ids waiting to be (re)sent (those with ``_sent_at`` 0.0): a newer message waits behind them.
        self._queued: dict[str, None] = {}
        #: ids of our own shown messages, so no copy shows them again.
        self._shown: OrderedDict[str, None] = OrderedDict()
        #: (author, id) of DMs shown, so a second delivery is dropped.
        self._dms_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: (author, id) of others' room messages shown, so a copy stored twice is dropped.
        self._msgs_seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    # ------------------------------------------------------------ lifecycle

    @property
    def address(self) -> BrokerAddress:
        """The broker in use (or being tried)."""
        return self.addresses[self._index]

    @property
    def endpoint(self) -> str:
        return self.address.endpoint

    @property
    def pub_endpoint(self) -> str:
        return self.address.pub_endpoint

    def connect(self) -> None:
        """Say hello to the first broker address that answers; raises BrokerUnreachable or RequestError.

        Each address gets up to ``connect_timeout`` seconds (one whose connection
        is refused is left at once when another follows it); ``unavailable``
        answers are retried after :data:`UNAVAILABLE_RETRY_S`, and, with another
        address to try, given up after :data:`FAILOVER_UNAVAILABLE_COUNT` of them
        over :data:`FAILOVER_UNAVAILABLE_S`. A refusal (``name_taken``, a bad key)
        is an answer: it is raised at once. ``BrokerUnreachable`` names every
        address tried and why it failed.
        """
        if self.state == "closed":
            raise ZchatError("closed", self._moved or "this client is closed")
        self._connecting = True
        try:
            self._connect()
        except BaseException:
            if self.state == "new":
                # Fresh sockets: the hellos queued on these would reach a broker that comes up
                # (or authorizes our key) later and make a session no one sees, its name taken
                # until it expires.
                self._use_address(self._index)
            raise
        finally:
            self._connecting = False

    def _connect(self) -> None:
        tried: list[tuple[BrokerAddress, str]] = []
        #: Whether an address failed for want of an answer (it may be down), not for a
        #: host that does not resolve or an answer from something else.
        silent = False
        for i in range(len(self.addresses)):
            if i != self._index or self._refused or self._sub_failure is not None:
                # Fresh sockets: those refused before (the broker was not up yet) may be
                # backing off for seconds before they try again.
                self._use_address(i)
            unresolved = _unresolved(self.address.host)
            if unresolved is not None:
                tried.append((self.address, unresolved))
                continue
            try:
                welcome = self._hello_here(last=i == len(self.addresses) - 1)
            except BrokerUnreachable as exc:
                tried.append((self.address, exc.message))
                silent = silent or exc.maybe_down
                continue
            except RequestError as exc:
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                tried.append((self.address, f"unavailable: {exc.message}"))
                silent = True
                continue
            self._welcomed(welcome)
            self._await_sub()
            return
        if len(tried) == 1:
            reason = tried[0][1]
            if reason.startswith("no answer"):
                raise BrokerUnreachable(f"no answer from a zchat broker at {self.endpoint} {reason[10:]}")
            if not silent:
                raise BrokerUnreachable(reason, maybe_down=False)
            raise BrokerUnreachable(f"the zchat broker at {self.endpoint}: {reason}")
        raise BrokerUnreachable(
            "no zchat broker answered; tried " + ", ".join(f"{addr} ({reason})" for addr, reason in tried),
            maybe_down=silent,
        )

    def _await_sub(self) -> None:
        """After the welcome: give the SUB's handshake with the room event port up to
        SUB_GRACE_S (on a working broker it is done by then), and if it failed or has not
        happened, say so in a status event. Connected all the same: requests work, and room
        events still come, late, by catch-up; but a wrong ``PUBPORT`` must not go unsaid."""
        where = f"{self.address.pub_endpoint} (the room event port)"
        if self._sub_failure is not None and not self._sub_up:
            # Refused while the broker was not up yet, maybe: a fresh try, not libzmq's backoff.
            self._sub_failure = None
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(self.address.pub_endpoint)
            self._sub.connect(self.address.pub_endpoint)
        deadline = time.monotonic() + SUB_GRACE_S
        while not self._sub_up and self._sub_failure is None and (remaining := deadline - time.monotonic()) > 0:
            self.pump(min(remaining, 0.05))
            if self.state != "connected":
                return  # lost meanwhile: the reconnect says where it goes, and tries the SUB again
        if self._sub_up:
            return
        why = _wrong_socket(self.address, pub=True) or self._sub_failure or f"no answer within {SUB_GRACE_S:g} s"
        self._status(
            "no_room_events",
            f"room events from {where}: {why}; live events will only come late, by catch-up "
            "(is the room event port right, and open?)",
        )

    def _hello_here(self, *, last: bool) -> Envelope:
        """Hello to the current address until it welcomes us, within ``connect_timeout``."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise BrokerUnreachable("")
                hello = p.hello(self.name, resume=self._resume)
                return self._request(hello, timeout=remaining, give_up_if_refused=not last)
            except BrokerUnreachable:
                if self._foreign is not None:
                    raise BrokerUnreachable(self._foreign, maybe_down=False) from None
                if self._dropped:
                    raise BrokerUnreachable(_DROPPED) from None
                if self._refused:
                    raise BrokerUnreachable("connection refused") from None
                raise BrokerUnreachable(f"no answer within {self.connect_timeout:g} s") from None
            except RequestError as exc:
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                if self._unavailable_exhausted() or time.monotonic() + UNAVAILABLE_RETRY_S > deadline:
                    raise
            self.idle(UNAVAILABLE_RETRY_S)

    def close(self, flush_timeout: float = 1.0, *, settle: float = SETTLE_S) -> int:
        """Wait for what was sent to be acknowledged, say bye (so the room sees the
        leave now, not at expiry) and release the sockets.

        The wait is :meth:`settling`: it goes on while acks keep coming, and gives up
        after ``settle`` seconds without one (``settle=0``: close at once); a DM whose
        recipient is reconnecting is waited for until delivered or refused. Returns how
        many messages were still unacknowledged: the broker may have stored some of them
        (their acks had not arrived), so sending them again may post them twice; a DM the
        broker answered ``undelivered`` (its recipient away) did not arrive (see
        :meth:`unacknowledged`). A warning says which were which. Events that arrive
        meanwhile stay queued (:meth:`drain_events`).
        ``flush_timeout``: how long the bye may take to leave.
        """
        if self.state == "closed":
            # Closed already; or under us by a session_moved: what it left unsent is lost.
            return self.unacked if self._moved is not None else 0
        interrupted: KeyboardInterrupt | None = None
        if settle > 0 and self.state != "new":
            try:
                for _ in self.settling(settle):
                    pass
            except KeyboardInterrupt as exc:  # close all the same, then let it go on
                interrupted = exc
            except (ZchatError, zmq.ZMQError):
                pass
            if self.state == "closed":  # a session_moved read meanwhile closed it
                if interrupted is not None:
                    raise interrupted
                return self.unacked
        lost = self.unacked
        if lost:
            log.warning("%s: closed with %d message(s) not acknowledged: %s", self.name, lost, self._unacked_fates())
        said_bye = False
        if self.state == "connected":
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.send(self._encode({"type": "bye"}), zmq.NOBLOCK)
                said_bye = True
        self.state = "closed"
        if said_bye:
            # (Set on the socket alone, it was undone by _close_sockets' close(linger=0).)
            self._dealer_linger_ms = int(flush_timeout * 1000)
        self._close_sockets()
        if self._own_context:
            self._ctx.term()
        if interrupted is not None:
            raise interrupted
        return lost

    def __enter__(self) -> Client:
        try:
            self.connect()
        except BaseException:
            # No __exit__ follows a failed __enter__: a bot that retried `with Client(...)`
            # in a loop leaked a context and its sockets (their files) at every try.
            self.close(settle=0)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving the block waits for the messages sent in it, but not after a Ctrl-C,
        # nor for a broker that is not answering anyway.
        quick = exc_type is not None and (
            issubclass(exc_type, KeyboardInterrupt)
            # (A broker that answers, and holds messages back for its rate limit, is waited for.)
            or (issubclass(exc_type, BrokerUnreachable) and not (exc and getattr(exc[0], "held", False)))
        )
        self.close(settle=0 if quick else SETTLE_S)

    @property
    def rooms_joined(self) -> list[str]:
        return list(self._rooms)

    @property
    def resume_token(self) -> str | None:
        """The session's secret token (once connected): keep it private; see ``resume`` in :meth:`__init__`."""
        return self._resume

    @property
    def unacked(self) -> int:
        """Messages and DMs sent and not acknowledged yet (they are resent until they are)."""
        return len(self._unacked)

    def unacknowledged(self) -> list[Event]:
        """The messages and DMs not acknowledged yet, oldest first, as own events
        without a seq: what :meth:`close` would leave unsent, for a program to show.
        A DM the broker could not deliver so far (its recipient away, and asked again
        until back) has ``code`` ``undelivered``: it did not arrive. One that did not arrive
        (it never left: written while the broker was away, or waiting behind another; or
        the broker refused it, and it has not gone since) has ``code`` :data:`UNSENT`:
        sending it again cannot post it twice. The others (``code`` None)
        went and had no ack: the broker may have them."""
        return [
            Event(
                type=env["type"],
                room=env.get("room"),
                to=env.get("to"),
                name=self.name,
                text=env["text"],
                id=rid,
                # Not "may have arrived" of what surely did not (see UNSENT).
                code=self._fate(rid),
            )
            for rid, env in self._unacked.items()
        ]

    def _fate(self, rid: str) -> str | None:
        """Of a message not acknowledged: ``undelivered`` (a DM the broker said it could not
        deliver so far), UNSENT (it never left, or was refused since it last went), or None
        (it went, and its ack has not come: it may have arrived)."""
        if rid in self._dm_waiting:
            return ErrorCode.UNDELIVERED
        return None if rid in self._went else UNSENT

    def _unacked_fates(self) -> str:
        """What became of the messages not acknowledged, as far as we know, kind by kind."""
        stored = unsent = delivered = undelivered = 0
        for rid, env in self._unacked.items():
            fate = self._fate(rid)
            if fate == ErrorCode.UNDELIVERED:
                undelivered += 1
            elif fate == UNSENT:
                unsent += 1
            elif env["type"] == "msg":
                stored += 1
            else:
                delivered += 1
        parts = [
            f"{stored} room message(s) the broker may have stored (their acks had not come)" if stored else "",
            f"{unsent} never sent (written while the broker was away, or held back)" if unsent else "",
            f"{delivered} DM(s) that may have been delivered (their acks had not come)" if delivered else "",
            f"{undelivered} DM(s) not delivered (the broker said their recipient was away)" if undelivered else "",
        ]
        return "; ".join(part for part in parts if part)

    @property
    def held_back(self) -> str | None:
        """The code the broker holds our messages back with now (``rate_limited``, or
        ``unavailable``: its disk is nearly full, or it lost its backplane), else None.
        A message it refused so was not stored; it is sent again once the hold ends."""
        # Held if we hold for it now, or it refused us lately (a hold it keeps is refused
        # again at each try, every RATE_RETRY_S); queued for another reason (a room
        # catching up after a reconnect) long after a hold, it is not.
        lately = max(self.request_timeout, 2 * max(RATE_RETRY_S, UNAVAILABLE_RETRY_S))
        now = time.monotonic()
        if self.state == "connected" and (now < self._hold_until or now - self._hold_at < lately):
            return self._hold_code
        return None

    @property
    def own_pending(self) -> int:
        """Own messages acknowledged but not shown yet: they wait for earlier events of their room."""
        rooms = self._rooms.values()
        return sum(isinstance(item, Event) and item is not _TAKEN for state in rooms for item in state.pending.values())

    def release_own(self) -> None:
        """Queue now the :attr:`own_pending` messages, ahead of the earlier events they wait
        for: for a program that stops, so that a line the broker stored is still shown."""
        for state in self._rooms.values():
            self._release_own(state)

    # ------------------------------------------------------------- requests

    def join(self, room: str, backlog: int = 0, *, after: int | None = None, members: bool = True) -> MemberList:
        """Join ``room``; queue its last ``backlog`` events from before the join, then the
        join's own presence event (with ``backlog=0``, neither: only what comes after the
        join); return its members, sorted (past 10,000 the first ones; ``total`` says how
        many there are); with ``members=False``, an empty
        list whose ``total`` says how many: the broker leaves the list out, which in a room of thousands is most of the
        reply; :meth:`who` asks for it later. (A session in the room already,
        one resumed say, publishes no join: the room's last ``backlog`` events.)

        Back in a room this client left on the same broker, the backlog starts no
        earlier than where it left: what was already shown is not queued again.
        ``after`` gives every event after that seq instead, however many: a bot that
        logs a room passes the last seq it logged, and after its own restart misses
        nothing and gets nothing twice. They come page by page as the client pumps (as
        a catch-up after a reconnect does: a page refused by the broker's history
        budget is asked again), so join() returns at once. Events the broker no longer
        keeps are said by a ``status`` "skipped" event in their place; an ``after``
        above the room's seq (a broker that lost its store numbers the room anew) gives
        it all. For a room this client is in already, ``after`` is ignored: what came
        since it joined is queued already. A reconnect during such a catch-up, with a
        message to the room sent before it and unacknowledged, holds new messages to the
        room until it is done (as after any reconnect: that one, its ack maybe lost, must
        be found in the room before it may be sent again).
        An ``unavailable`` or ``rate_limited`` answer is asked again after a moment
        (:data:`UNAVAILABLE_RETRY_S`, :data:`RATE_RETRY_S`), within the request timeout:
        a script joining many rooms at once meets the join rate limit. A join that
        raised (a timeout, say) may still have joined on the broker: calling it again
        is safe, and makes this client hear the room too.
        """
        self._check_open()
        room = _room(room)
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ValueError(f"after={after!r}: a seq is an int, 0 or more")
        request: Envelope = (
            {"type": "join", "room": room} if members else {"type": "join", "room": room, "members": False}
        )
        if room in self._rooms:
            reply = self._patient_request(request)
            known = self._rooms.get(room)
            if known is None:
                # Its rejoin was refused for good meanwhile (the room forgotten), yet this join
                # was let in: join it as a new room (a repeated join is answered again).
                return self.join(room, backlog, after=after, members=members)
            if not known.joined:
                self._on_rejoin(room, reply)  # it was waiting for a retry: this was it
            return _members(reply)
        state = self._rooms[room] = _Room(stayed=room in self._stayed_in)
        # Subscribe before asking, so nothing published after our join is missed.
        self._sub.subscribe(p.room_topic(room))
        try:
            joined = self._patient_request(request)
            state.joined = True
            # Of the session that answered: one a failover made meanwhile is in no room, and
            # its join published. (Not at that welcome: a room joined already keeps its mark,
            # for the part of its backlog still to come, _flush.)
            state.stayed = state.stayed and room in self._stayed_in
            top: int = joined["seq"]
            # A join whose reply was lost with the connection (and asked again after
            # the reconnect) was in force from its own presence event on: what
            # happened since then is shown, as it would have been live.
            since = self._own_join_seen(state, top)
            # The backlog is ``backlog`` events from before this join: its own presence
            # (the room's newest event, or the one SUB brought) is not one of them. Whether
            # the newest is that presence (or the join published none: this session was in
            # the room already) shows in the history: one more is read, and dropped after
            # if the newest is not ours (trimmed below).
            wanted = max(0, backlog)
            if not wanted:
                backlog_to = top
            elif since is not None:
                backlog_to = max(0, since - 1 - wanted)
            else:
                backlog_to = max(0, top - 1 - wanted)
            seen = self._seen_before.pop(room, None)
            if after is not None:
                # Not read here: a logger far behind must neither hold it all in memory
                # nor lose the lot to one refused page. The room starts at ``after``, and
                # its gap fetches page up to the top (_on_fetched).
                state.backlog_to = top if since is None else since
            elif seen is not None and seen <= top:
                # Back in a room we left: the backlog starts where we were, not again
                # at what is already on screen. (Above top: the broker numbers the room
                # anew, having lost its store; then it is all new.)
                backlog_to = max(backlog_to, seen)
            cursor = backlog_to if since is None else min(since, backlog_to)
            if after is not None:
                cursor = top
            read: list[Envelope] = []
            while cursor < top:
                # Patient as the join: a catch-up may have spent the budget of large replies.
                reply = self._patient_request(
                    {"type": "history", "room": room, "after": cursor, "limit": min(top - cursor, p.MAX_HISTORY_LIMIT)}
                )
                got = [m for m in reply["messages"] if _is_event(m) and cursor < m["seq"] <= top]
                if not got:
                    break
                read += got
                cursor = got[-1]["seq"]
            if (
                wanted
                and since is None
                and (state.stayed or not (read and read[-1]["seq"] == top and self._is_own_join(read[-1])))
            ):
                # The join published nothing (or its presence was not read): the newest
                # ``backlog`` events, without the one read in case it had.
                read = [env for env in read if env["seq"] > top - wanted]
            #: Messages of this backlog: one the broker stored twice (a resend it had
            #: forgotten) is shown once, as in a catch-up.
            shown: OrderedDict[tuple[str, str], None] = OrderedDict()
            for env in read:
                if env["type"] == "msg" and _seen(shown, (str(env.get("from")), str(env.get("id")))):
                    continue
                # The join this call made (ours, the last event; or, its reply lost and
                # asked again, the one SUB brought) is not from before it.
                this_join = not state.stayed and env["seq"] in (top, since) and self._is_own_join(env)
                before = (since is None or env["seq"] <= since) and not this_join
                sent = self._stored_original(env)
                # One of ours from before we left, its ack lost: stored, so acknowledged.
                event = Event.from_envelope(env, backlog=before) if sent is None else self._own_event(sent, env)
                event.backlog = before
                self._events.append(event)
        except BaseException:
            self._forget_room(room)
            raise
        if self._rooms.get(room) is not state:
            # The connection was lost meanwhile and the broker refused the rejoin for
            # good (the error event says why): we are not in the room.
            raise RequestError(ErrorCode.NOT_JOINED, f"#{room}: the rejoin after a reconnect was refused")
        state.last = top
        state.top = max(state.top, top)
        if after is not None:
            state.last = after if after <= top else 0
            if state.last < top and not state.pending:
                self._fetch(room, state, state.last, min(top - state.last, p.MAX_HISTORY_LIMIT))
        state.next_probe = time.monotonic() + PROBE_INTERVAL_S
        self._stayed_in.discard(room)  # (joined: a later one, after a leave, publishes; one that failed did not)
        self._flush(room, state)
        return _members(joined)

    def _is_own_join(self, item: Envelope | Event) -> bool:
        """Whether ``item`` (a room event as it waits in order) is a join presence of ours."""
        return (
            isinstance(item, dict)
            and item.get("type") == "presence"
            and item.get("event") == "join"
            and item.get("name") == self.name
        )

    def _own_join_seen(self, state: _Room, top: int) -> int | None:
        """The seq of a join presence of ours that SUB brought before ``top``, if any."""
        seqs = [seq for seq, env in state.pending.items() if seq < top and self._is_own_join(env)]
        return min(seqs) if seqs else None

    def _patient_request(self, env: Envelope) -> Envelope:
        """A request answered ``rate_limited`` or ``unavailable`` is asked again after a
        moment, within the request timeout (the broker's budget of large replies is shared
        by join, who, rooms and history: a catch-up may have spent it for a moment)."""
        deadline = time.monotonic() + self.request_timeout
        while True:
            try:
                return self._request(dict(env), timeout=max(0.0, deadline - time.monotonic()))
            except RequestError as exc:
                wait = _PATIENT_RETRY_S.get(exc.code, 0.0)
                if not wait or time.monotonic() + wait > deadline:
                    raise
            self.idle(wait)

    def leave(self, room: str) -> None:
        """Leave ``room``. If the connection is lost meanwhile, the leave is asked again
        after the reconnect (which does not rejoin the room), and a broker that no
        longer has us in it (``not_joined``) counts as done.

        Messages sent to the room before go first: the leave waits until each is
        acknowledged (or refused), however long a rate-limited queue takes, as long as
        acks keep coming. With none for the request timeout it raises
        :class:`BrokerUnreachable` and the client stays in the room (they are kept).
        """
        self._check_open()
        room = _room(room)
        state = self._rooms.get(room)
        if state is not None:
            self._settle_room(room)
            state.leaving = True
        try:
            # A leave counts against the joins' rate limit: refused by it, it was not
            # carried out, and is asked again as a join would be.
            self._patient_request({"type": "leave", "room": room})
        except RequestError as exc:
            if state is None or exc.code != ErrorCode.NOT_JOINED:
                if state is not None:
                    state.leaving = False
                raise
        self._stayed_in.discard(room)  # (left: a later join publishes one)
        self._forget_room(room)

    def unacked_in(self, room: str) -> int:
        """Messages to ``room`` sent and not acknowledged yet (a :meth:`leave` waits for them)."""
        room = _room(room)
        return sum(env.get("room") == room for env in self._unacked.values())

    def _settle_room(self, room: str) -> None:
        """Pump until no message to ``room`` awaits its ack: held by the rate limit, they
        would go out after a leave sent now, and be refused as not_joined. Gives up after
        the request timeout with no ack, unless the broker answers and its rate limit is
        what holds them (however slow, it lets them through)."""
        left = self.unacked_in(room)
        deadline = time.monotonic() + self.request_timeout
        while left:
            if time.monotonic() >= deadline:
                # The broker answers, and its rate limit (met again at each try) is what
                # holds them: however slow, it lets them through.
                limited = time.monotonic() - self._rate_limited_at < self.request_timeout
                if limited and self.state == "connected" and self._room_ready({"type": "msg", "room": room}):
                    deadline = time.monotonic() + self.request_timeout
                else:
                    raise BrokerUnreachable(
                        f"{left} message(s) to #{room} not acknowledged by {self.endpoint} in "
                        f"{self.request_timeout:g} s: still in #{room}, so they can go out"
                    )
            self.pump(0.1)
            if (now_left := self.unacked_in(room)) < left:
                left, deadline = now_left, time.monotonic() + self.request_timeout

    def send(self, room: str, text: str, *, action: bool = False) -> str:
        """Send a room message without waiting; returns its id.

        The ack arrives as an own ``msg`` event. Until then the message is kept
        and resent (same id, so never stored twice) after a timeout or a
        reconnect; refused as ``rate_limited`` or ``unavailable``, it is held and
        resent after a moment, and newer messages wait behind it (order is
        kept). ``action=True`` sends an IRC-style ``/me``.
        """
        self._check_open()
        room = _room(room)
        self._check_text(text)
        if room not in self._rooms:
            raise RequestError(ErrorCode.NOT_JOINED, f"join #{room} before writing to it")
        env: Envelope = {"type": "msg", "room": room, "text": text}
        if action:
            env["action"] = True
        return self._send_tracked(env)

    def dm(self, to: str, text: str) -> str:
        """Send a direct message without waiting; returns its id. The ack arrives as an own ``dm`` event.

        Kept, resent and held like a room message (see :meth:`send`).
        """
        self._check_open()
        if not p.is_name(to):
            raise RequestError(ErrorCode.BAD_NAME, f"{to!r} is not a name")
        self._check_text(text)
        return self._send_tracked({"type": "dm", "to": to, "text": text})

    def send_wait(self, room: str, text: str, timeout: float | None = None, *, action: bool = False) -> Event:
        """Send a room message and wait for its ack; returns the own ``msg`` event.

        Refused, it raises :class:`RequestError`. Not acknowledged within ``timeout``
        (default: the request timeout), it raises :class:`BrokerUnreachable` and the
        message stays queued (see :meth:`send`): its ack comes later as an own ``msg``
        event with the id in the exception's ``msg_id``. Sending it again would post it twice.
        """
        return self._wait_ack(self.send(room, text, action=action), timeout)

    def dm_wait(self, to: str, text: str, timeout: float | None = None) -> Event:
        """Send a direct message and wait for its ack; returns the own ``dm`` event (as :meth:`send_wait`)."""
        return self._wait_ack(self.dm(to, text), timeout)

    def history(self, room: str, after: int = 0, limit: int = p.DEFAULT_HISTORY_LIMIT) -> tuple[list[Event], int]:
        """Events of ``room`` with seq > ``after``, oldest first, at most ``limit`` of them
        (fewer where the broker's retention deleted some), and the room's current seq.
        One reply of the broker holds at most MAX_HISTORY_LIMIT (500) events and 1 MiB:
        a longer read is asked for page by page."""
        self._check_open()
        room = _room(room)
        events: list[Event] = []
        counted = 0  # the events the broker gave (what its limit counts)
        while True:
            want = min(limit - counted, p.MAX_HISTORY_LIMIT) if counted else limit
            reply = self._patient_request({"type": "history", "room": room, "after": after, "limit": want})
            messages = [m for m in reply["messages"] if _is_event(m)]
            top = int(reply["seq"])
            events.extend(Event.from_envelope(m, backlog=True) for m in messages)
            counted += len(messages)
            if not messages or counted >= limit or messages[-1]["seq"] >= top:
                return events, top
            after = messages[-1]["seq"]

    def who(self, room: str) -> MemberList:
        """The names of ``room``'s members, sorted (any room; joining it is not needed);
        past 10,000 the first ones, and ``total`` says how many there are."""
        self._check_open()
        return _members(self._patient_request({"type": "who", "room": _room(room)}))

    def rooms(self) -> RoomList:
        """Every room, by name: ``{"room", "members" (a count), "seq"}`` each; at most 1000
        (the list's ``truncated`` is True when the broker had more)."""
        self._check_open()
        reply = self._patient_request({"type": "rooms"})
        return RoomList(reply["rooms"], truncated=bool(reply.get("truncated")))

    def ping(self) -> None:
        """A round trip to the broker; raises :class:`BrokerUnreachable` if it does not answer in time."""
        self._check_open()
        self._request({"type": "ping"})

    # --------------------------------------------------------------- events

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: forever; 0: not at
        all, only what has arrived)."""
        if self.state == "new" and not self._events:
            # (Nothing would ever come: events() before connect() waited for ever.)
            raise ZchatError("not_connected", "connect() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        pumped = False
        while not self._events:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if pumped:
                    return None
                wait = 0  # no wait, but what the sockets have is read (a bot polling with 0)
            self.pump(wait)
            pumped = True
        if (
            not pumped
            and self.state != "closed"
            and time.monotonic() - self._last_pump >= min(QUEUED_PUMP_S, self.heartbeat_ms / 4000)
        ):
            # A bot slow with each event of a long queue pumped only once it was empty:
            # no ping for as long (10,000 events at 10 ms: 100 s), and the broker ended
            # its session after 3 heartbeats. (Closed, by close() or a session_moved, it
            # has nothing to keep: what is queued is handed out, as drain_events() would.)
            self.pump(0)
        return self._events.popleft()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come; stops after ``timeout`` seconds without one."""
        while (event := self.next_event(timeout)) is not None:
            yield event

    def settling(self, patience: float = SETTLE_S) -> Iterator[int]:
        """Before closing: pump until every message sent is acknowledged and shown in its
        room's order, or until ``patience`` seconds pass in which none was (a rate-limited
        burst drains slowly but surely), and until each DM asked again for its reconnecting
        recipient is delivered or refused (at most 3 heartbeats and 7 s). Yields, after
        each pump of at most 0.1 s, how many are still unacknowledged; events queue up as
        usual for the caller to show."""
        left = self.unacked + self.own_pending
        deadline = time.monotonic() + patience
        # A DM whose recipient is reconnecting is asked again until a set time, then
        # answered with an error: waited for too (up to 3 heartbeats and 5 s), whatever
        # the patience, or a DM that would have arrived was left for "may have arrived".
        while left and time.monotonic() < max(deadline, self._dm_decided_by()):
            self.pump(0.1)
            yield self.unacked
            now_left = self.unacked + self.own_pending
            if now_left < left:
                left, deadline = now_left, time.monotonic() + patience

    def drain_events(self, limit: int | None = None) -> list[Event]:
        """Every event queued so far (at most ``limit``, the oldest), without waiting.

        What is left stays queued, and counts towards ``max_queue``: a program that
        takes its events a slice at a time holds no more than that."""
        if limit is None or limit >= len(self._events):
            out = list(self._events)
            self._events.clear()
            return out
        return [self._events.popleft() for _ in range(max(limit, 0))]

    def pump(self, timeout: float | None = 0, fds: Sequence[int] = ()) -> list[int]:
        """Read whatever the sockets have, waiting up to ``timeout`` s for something.

        Also keeps the session alive: pings when quiet, resends what is not
        acknowledged, notices a lost broker and reconnects (see the module
        docstring). ``fds`` are extra file descriptors to wait on (stdin, say);
        the ready ones are returned, so a program can wait on the chat and its
        own input at once. One pump decodes at most :data:`SUB_EVENTS_PER_PUMP` room
        events (and the rest of the batch the last one came in); the next takes what is
        left, at once (the sockets stay readable).
        """
        if self.state == "closed":
            raise ZchatError("closed", self._moved or "this client is closed")
        self._last_pump = time.monotonic()
        self._maintain()
        # Never sleep long: we must wake up in time to ping and to notice loss.
        cap = min(self.heartbeat_ms, 1000)
        poll_ms = cap if timeout is None else min(cap, max(0, int(timeout * 1000)))
        fds = list(dict.fromkeys(fds))  # one given twice was unregistered twice: a KeyError
        for fd in fds:
            self._poller.register(fd, zmq.POLLIN)
        try:
            ready = dict(self._poller.poll(poll_ms))
        finally:
            for fd in fds:
                self._poller.unregister(fd)
        if self._dealer in ready:
            self._read_dealer()
        if self._sub in ready:
            self._read_sub()
        for monitor in [m for m in self._monitors if m in ready]:
            self._on_monitor(monitor)
        if self._moved is not None and self.state != "closed":
            self._end_moved(self._moved)
        return [fd for fd in fds if fd in ready]

    def _end_moved(self, why: str) -> None:
        """Closed for good, without a bye (the session is the other client's now)."""
        lost = self.unacked
        message = f"{why}: another client has this session (given the same resume token?), so this one is closed" + (
            f"; {lost} message(s) not acknowledged" if lost else ""
        )
        for rid in [r for r in self._replies if self._replies[r] is None]:
            self._replies[rid] = {"type": "error", "code": ErrorCode.SESSION_MOVED, "message": message}
        self._events.append(Event(type="error", code=ErrorCode.SESSION_MOVED, message=message))
        self._moved = message  # what a call on this closed client is told
        self.state = "closed"
        self._close_sockets()
        if self._own_context:
            self._ctx.term()

    def idle(self, seconds: float) -> None:
        """Wait ``seconds`` while keeping the session: pings, acks, resends and reconnects go
        on, and events are queued for later (``drain_events``, ``events``). A bot that waits
        between its own messages waits with this (or :meth:`pump`), not ``time.sleep``: a
        client that does not pump sends no ping, and the broker ends its session after 3
        heartbeats (15 s by default); what it sent after that waits for its next pump."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.pump(left)

    # ------------------------------------------------------- the session

    def _open_sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        dealer = self._ctx.socket(zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._sub_hwm)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
            # Back off up to 5 s, so a broker restart is not met by a reconnect storm.
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * p.MAX_REPLY_BYTES)
            if _is_ipv6(self.address.host):
                # Without it libzmq connects to IPv4 only: "[::1]:5555" would be refused for ever.
                # Not for names: with it, libzmq takes a name's IPv6 address alone when it has
                # one ("localhost" is ::1 too), and a broker on 0.0.0.0 would refuse it.
                sock.setsockopt(zmq.IPV6, 1)
            if self._curve is not None:
                sock.curve_publickey = self._curve.public
                sock.curve_secretkey = self._curve.secret
                sock.curve_serverkey = self._curve.server_public
            self._poller.register(sock, zmq.POLLIN)
            # Handshake outcomes: a refused key must be an error, not a silent hang;
            # and a refused connection lets connect() go on to the next address.
            events = _HANDSHAKE_EVENTS | zmq.EVENT_CONNECT_RETRIED
            if sock is dealer:
                # A broker that stops or crashes closes its connections: known at once,
                # not after 2.5 silent heartbeats (12.5 s with the default), which is what a
                # broker that vanished without closing them (a cable, a dead host) takes.
                events |= zmq.EVENT_DISCONNECTED
            monitor = sock.get_monitor_socket(events)
            self._monitors[monitor] = sock
            self._poller.register(monitor, zmq.POLLIN)
        self._refused = self._sub_up = self._dropped = self._dealer_down = self._dealer_cut = False
        self._curve_cuts = {}
        self._lose_at = None
        self._foreign = self._sub_failure = None
        self._type_probed = False
        address = self.address
        dealer.connect(address.endpoint)
        sub.connect(address.pub_endpoint)
        for room in self._rooms:
            sub.subscribe(p.room_topic(room))
        return dealer, sub

    def _close_sockets(self) -> None:
        for monitor, sock in list(self._monitors.items()):
            self._poller.unregister(monitor)
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in (self._dealer, self._sub):
            self._poller.unregister(sock)
            # A bye just sent may leave (close() sets how long); nothing else lingers.
            sock.close(linger=self._dealer_linger_ms if sock is self._dealer else 0)
        self._dealer_linger_ms = 0

    def _use_address(self, index: int) -> None:
        """Fresh sockets to ``addresses[index]``; what was in flight on the old ones is gone."""
        self._index = index
        self._close_sockets()
        self._dealer, self._sub = self._open_sockets()
        self._auth_failure = None
        self._callbacks.clear()
        self._hellos_here = 0
        self._unavailable = 0
        self._unavailable_said = None  # another broker: its "connected" says the rest
        self._hello_refused = None

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        sock = self._monitors.get(monitor)
        before = self._auth_failure
        try:
            self._read_monitor(monitor, sock)
        finally:
            if self._auth_failure and self._auth_failure != before:
                if not self._auth_said:
                    self._auth_said = True
                    self._events.append(Event(type="error", code="auth_failed", message=self._auth_failure))
                # Refused on a reconnect (our key revoked, or turned away): we are not connected.
                # (What the error event above says is why.)
                self._lost("the broker refused the connection")

    def _read_monitor(self, monitor: zmq.Socket[bytes], sock: zmq.Socket[bytes] | None) -> None:
        while sock is not None:
            try:
                message = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_DISCONNECTED:
                # In order with the handshakes: a close read after the handshake of a later
                # connection (a failed try before it) is not about the connection in use.
                self._dealer_down = self._dealer_down or sock is self._dealer
                self._dealer_cut = self._dealer_cut or sock is self._dealer
                if sock is self._dealer:
                    self._probe_request_port()
                continue
            if event == zmq.EVENT_CONNECT_RETRIED:
                if sock is self._sub:
                    # (After a failed handshake too: that failure says more.)
                    self._sub_failure = self._sub_failure or "connection refused"
                else:
                    self._refused = True
                    self._probe_request_port()
                continue
            if (
                not (self.state == "new" or self._connecting)
                and event != zmq.EVENT_HANDSHAKE_FAILED_AUTH
                and message.get("value") in _TRANSIENT_ERRNOS
            ):
                # Once we have been in, a connection dying mid-handshake (a broker
                # restart, a proxy) is not a key problem: the reconnect goes on.
                continue
            # The broker by the address the user gave (--port), whichever socket it was.
            where = self.endpoint
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._curve_cuts.pop(sock, None)
                if sock is self._sub:
                    self._sub_up, self._sub_failure = True, None
                    # A (re)connected SUB may have missed events while it was away.
                    for state in self._rooms.values():
                        state.confirmed, state.probes, state.next_probe = False, 0, time.monotonic()
                else:
                    # (Not the SUB's: the broker paces new request connections only, and
                    # a SUB let in does not undo the DEALER turned away just before.)
                    self._auth_failure = None
                    self._foreign = None
                    self._dealer_down = False
                    if self._dealer_cut and self.state == "connected":
                        # libzmq made a new connection after a cut (a NAT, a proxy, a
                        # broker restarted at once): the broker knows our session by the
                        # old one, so what it sends us (DMs above all) fails or is lost
                        # until we say who we are. A ping now finds out, not at the next
                        # heartbeat (up to 5 s of DMs refused, or lost with a restart).
                        self._ping_now(time.monotonic())
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and (self._curve is None or message.get("value") == 500):
                # Not our key (400): the broker's pace of new connections from one
                # address (--connect-rate), past what it can queue (ZAP status 500).
                self._auth_failure = (
                    f"the broker at {where} turned our connection away: too many new connections "
                    "from this address at once (its --connect-rate)"
                )
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._auth_failure = f"the broker at {where} does not accept our key (is it in its authorized/?)"
            else:
                self._handshake_failed(sock, message.get("value"))

    def _probe_request_port(self) -> None:
        """While connecting, once a connection: a request port that hung up on us (or
        refused) may be another socket type's, the broker's room event port say, which
        libzmq leaves on us without a word; if so, ``_foreign`` says so and the address is
        given up now rather than after ``connect_timeout``."""
        if (self.state == "new" or self._connecting) and not self._type_probed and self._foreign is None:
            self._type_probed = True
            self._foreign = _wrong_socket(self.address, pub=False)

    def _handshake_failed(self, sock: zmq.Socket[bytes], value: object) -> None:
        """A handshake failed, not for our key: say why, or (``_foreign``) that no zchat broker answers.

        libzmq names a mismatch of security only when it has read the broker's
        greeting; a broker that hangs up first (as a zchat broker with keys often
        does) and any other server that answers and hangs up look alike to it.
        While connecting, a probe of the port tells them apart: it reads the
        greeting itself. A failure it cannot explain (nothing answered, or the
        broker's security is ours) is left to libzmq's retries and the timeout.
        """
        ours = "NULL" if self._curve is None else "CURVE"
        other = "CURVE" if ours == "NULL" else "NULL"
        theirs: str | None = None  # not known
        if self.state == "new" or self._connecting:
            port = self.address.pub_port if sock is self._sub else self.address.port
            told = _greeting_mechanism(self.address.host, port)
            if told is not None and told not in ("NULL", "CURVE"):
                # Not ZeroMQ at all (""), or a ZeroMQ peer with a security no zchat broker has.
                what = "it does not speak ZeroMQ" if told == "" else f"a ZeroMQ peer with {told} security"
                if sock is self._sub:
                    self._sub_failure = f"what answers there is not a zchat broker ({what})"
                else:  # connect() goes on to the next address
                    self._foreign = f"what answers at {self.endpoint} is not a zchat broker ({what})"
                return
            if told is None and value != _MECHANISM_MISMATCH:
                # Gone, not up yet, or a proxy with nothing behind it: libzmq tries again.
                if sock is self._sub:
                    self._sub_failure = _DROPPED
                else:
                    self._dropped = True
                return
            if told == ours and value != _MECHANISM_MISMATCH:
                if ours == "NULL":
                    return  # a zchat broker like us, its handshake cut short (restarting?): tried again
                # CURVE both: the keys do not fit, or the broker cut the handshake short (its
                # gate between two sockets, a restart): which, only a few tries in a row tell.
                cuts = self._curve_cuts[sock] = self._curve_cuts.get(sock, 0) + 1
                if cuts < CURVE_CUTS_BEFORE_BLAME:
                    return  # libzmq tries again
                theirs = told
            else:
                theirs = other if told is None else told
        elif value == _MECHANISM_MISMATCH:
            theirs = other
        where = self.endpoint
        if ours == "NULL":
            why = f"the broker at {where} requires CURVE keys (--key and --broker-key)"
        elif theirs == "NULL":
            why = f"the broker at {where} does not use CURVE keys: connect without them"
        else:
            # A broker that cannot decrypt our hello hangs up without a word.
            why = f"the CURVE handshake with {where} failed: is the broker key the broker's public key?"
        if sock is self._sub:
            self._sub_failure = why  # the request port's handshake says it too, and that one counts
        else:
            self._auth_failure = why

    def _welcomed(self, welcome: Envelope) -> None:
        restarted = self.epoch is not None and welcome["epoch"] != self.epoch
        moved = self._welcomed_by is not None and self._welcomed_by != self.address
        if restarted or moved:
            self._seen_before.clear()  # its seqs may not be the ones we saw
        self.sender = welcome["sender"]
        self.epoch = welcome["epoch"]
        self.heartbeat_ms = max(100, int(welcome["heartbeat_ms"]))
        token = welcome.get("resume")
        token = token if isinstance(token, str) else None
        changed, self._resume = token != self._resume, token
        if changed and self.on_resume_token is not None:
            self.on_resume_token(token)
        self._last_recv = time.monotonic()
        self._welcomed_by = self.address
        self._auth_said = False
        was = self.state
        rooms = welcome.get("in_rooms") if welcome.get("resumed") else None
        in_rooms = [r for r in rooms if p.is_room(r)] if isinstance(rooms, list) else []
        if was != "reconnecting":
            self.resumed_rooms = in_rooms
            self._stayed_in = set(in_rooms)
        else:
            # A new session (the broker lost ours) is in no room: a join of one publishes,
            # a join in flight too (asked again on this session: see join).
            self._stayed_in &= set(in_rooms)
        self.state = "connected"
        if was == "reconnecting":
            # Everyone else lost the broker too, and takes up to 3 heartbeats to notice.
            self._dm_grace_until = time.monotonic() + 3 * self.heartbeat_ms / 1000 + DM_GRACE_EXTRA_S
            resumed = "session resumed" if welcome.get("resumed") else "new session"
            how = f"another broker; {resumed}" if moved else (f"broker restarted; {resumed}" if restarted else resumed)
            self._status("connected", f"reconnected to {self.address} ({how})")

    def _status(self, state: str, text: str) -> None:
        self._events.append(Event(type="status", event=state, text=text, broker=str(self.address)))

    def _maintain(self) -> None:
        """Timers: ping when quiet, notice a silent broker, retry hello, resend, rejoin, probe."""
        now = time.monotonic()
        hb = self.heartbeat_ms / 1000
        if now - self._last_maintain > 2 * hb and self._last_recv != self._excused:
            # We were not listening (the process was stopped, the machine slept, or
            # the program did not pump): the silence is ours, not the broker's.
            # Its answers may be waiting in our sockets; give it a fresh window,
            # once: if nothing arrives, the next gap is not excused again (a
            # program that pumps too rarely must still learn its broker is gone).
            self._last_recv = self._excused = max(self._last_recv, now - hb)
        self._last_maintain = now
        if self.state == "connected" and self._dealer_down:
            if self._lose_at is None:
                # Not at once: every client of a broker that stopped sees the close in the
                # same instant; spread over up to a second, they do not all come back (or
                # fail over) in one burst.
                self._lose_at = now + random.uniform(0.0, min(1.0, hb))  # noqa: S311 (a spread, not a secret)
            elif now >= self._lose_at:
                self._read_dealer()  # the broker's last answers, sent before it closed
                self._lost(f"the connection to {self.endpoint} closed")
        else:
            self._lose_at = None
        if self.state == "connected":
            if now - self._last_recv > SILENT_HEARTBEATS * hb:
                quiet = now - self._last_recv
                # (One decimal below 10 s: at a short heartbeat, 0.5 s read as "for 1 s".)
                self._lost(f"no answer from {self.endpoint} for {quiet:.{1 if quiet < 10 else 0}f} s")
            else:
                if now - self._last_ping >= hb:
                    # Every heartbeat, sending or not: besides keeping the session, a
                    # pong's room seqs show a room whose last events SUB dropped
                    # (its queue overflowed) when nothing after them will show the gap.
                    self._ping_now(now)
                self._resend(now - self._resend_after)
                self._retry_rooms(now)
                self._probe_rooms(now)
        if self.state == "reconnecting" and now >= self._next_hello:
            if self._auth_failure is not None:
                # libzmq never reconnects a socket whose handshake the broker refused:
                # fresh sockets try again (the key may have been authorized again).
                self._use_address((self._index + 1) % len(self.addresses))
            elif self._hellos_here and len(self.addresses) > 1:
                # No welcome from this one within the backoff: on to the next.
                silent, refused = self.address, self._hello_refused
                self._use_address((self._index + 1) % len(self.addresses))
                if refused == ErrorCode.UNAVAILABLE:
                    why = f"{silent} is unavailable (it has lost its backplane)"
                elif refused is not None:
                    why = f"{silent} refused our hello ({refused})"
                else:
                    why = f"no welcome from {silent}"
                self._status("reconnecting", f"{why}; trying {self.address}")
            self._next_hello = now + max(1.0, min(self.connect_timeout, 3 * hb))
            rid = self._new_id()
            self._callbacks[rid] = self._on_rehello
            self._send(p.hello(self.name, rid, self._resume))
            self._hellos_here += 1

    @property
    def _resend_after(self) -> float:
        """Seconds without an answer after which a message or history request is sent again."""
        return max(ACK_RESEND_S, 2 * self.heartbeat_ms / 1000)

    def _lost(self, why: str) -> None:
        """The broker is gone or has forgotten us: start over on fresh sockets, to the next broker."""
        if self.state != "connected":
            return
        self.state = "reconnecting"
        for rid in [r for r in self._replies if self._replies[r] is None]:
            self._replies[rid] = {"type": "error", "code": "unreachable", "message": f"connection lost ({why})"}
        for state in self._rooms.values():
            state.fetching = False
            state.joined = False
            state.rejoin_at = 0.0
            state.rejoin_tries = 0
            state.tail_at = 0.0  # the next broker's pongs say where its rooms are
            state.lost_at = state.last
            state.search_rid = ""  # its reply is lost with the connection
        self._pings.clear()  # their pongs went with the connection
        self._cover.clear()  # all is resent after the rejoins' catch-up (see _on_rejoin)
        # Fresh sockets: a half-dead TCP connection could hold our requests for
        # minutes; anything queued on the old ones is resent after the hello.
        self._use_address((self._index + 1) % len(self.addresses))
        self._status("reconnecting", f"connection lost ({why}); reconnecting to {self.address}")
        self._next_hello = time.monotonic()

    def _on_rehello(self, reply: Envelope) -> None:
        if self.state != "reconnecting":
            return
        if reply["type"] != "welcome":
            code = reply.get("code")
            self._hello_refused = code if isinstance(code, str) else None  # said if we move on
            said, now = self._refusal_said, time.monotonic()
            if code != ErrorCode.UNAVAILABLE and (said is None or said[0] != code or now >= said[1] + REFUSAL_REPEAT_S):
                # name_taken: someone else holds our name now; keep trying (they may leave).
                self._events.append(Event.from_envelope(reply))
                self._refusal_said = (code, now)
            return  # asked again after the backoff (of another broker, if there are several)
        self._refusal_said = None
        if not _reply_fits(reply):
            # Not a zchat broker we can use (a welcome without its session's fields):
            # said, and asked again after the backoff, as a refusal is.
            self._events.append(
                Event.from_envelope(
                    p.error(ErrorCode.BAD_ENVELOPE, f"a malformed 'welcome' reply from {self.endpoint}")
                )
            )
            return
        moved = self._welcomed_by is not None and self._welcomed_by != self.address
        self._welcomed(reply)
        if moved and not reply.get("resumed"):
            # Maybe an independent broker, numbering its rooms its own way: what
            # waited for a gap to fill is fetched again from its history if it
            # is the same chat. Own messages already acknowledged stay.
            for state in self._rooms.values():
                state.pending = {s: e for s, e in state.pending.items() if isinstance(e, Event)}
        for room, state in self._rooms.items():
            if not state.leaving:
                self._rejoin(room)
        # Everything unacknowledged goes again, in order, each once its room is rejoined.
        went, sent_at = self._went_before_loss, self._sent_at
        self._went_before_loss = {
            rid for rid, env in self._unacked.items() if env["type"] == "msg" and (rid in went or sent_at.get(rid, 0.0))
        }
        for rid in self._unacked:
            self._queue(rid)
        self._dm_early = {rid for rid, env in self._unacked.items() if env["type"] == "dm"}
        self._resend(0.0)

    def _rejoin(self, room: str) -> None:
        state = self._rooms[room]
        state.rejoin_at = 0.0
        rid = self._new_id()
        self._callbacks[rid] = lambda r, room=room: self._on_rejoin(room, r)  # type: ignore[misc]
        # Its member list is not wanted here: in a large room, a reconnect of all its
        # members would make it most of the traffic (a broker older than this option
        # sends it all the same).
        self._send({"type": "join", "room": room, "members": False, "id": rid})

    def _on_rejoin(self, room: str, reply: Envelope) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        if reply["type"] != "joined":
            code = reply.get("code")
            if code in (ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL):
                # Many rooms after a restart meet the join rate limit: try again later.
                base = RATE_RETRY_S if code == ErrorCode.RATE_LIMITED else UNAVAILABLE_RETRY_S
                state.rejoin_at = time.monotonic() + min(REJOIN_RETRY_MAX_S, base * 1.5**state.rejoin_tries)
                state.rejoin_tries += 1
                return
            # Refused for good (limit_reached, say): we are not in it any more.
            message = reply.get("message")
            self._events.append(Event(type="error", code=str(code), message=f"cannot rejoin #{room}: {message}"))
            self._forget_room(room)
            self._resend(0.0)  # what waited for the room is sent, and refused (not_joined)
            return
        state.joined = True
        state.rejoin_at, state.rejoin_tries = 0.0, 0
        if state.last is None:
            # join() is still reading the backlog (the connection was lost meanwhile):
            # it sets where the room stands, and the gap, probe and tail checks fetch
            # what the reconnect missed. The room takes our messages again from now.
            self._resend(0.0)
            return
        top = reply["seq"]
        before = state.last if state.lost_at is None else state.lost_at
        state.lost_at = None
        state.catch_up_to = 0
        state.top = top
        for rid, env in self._unacked.items():
            if rid in self._floor and env["type"] == "msg" and env["room"] == room:
                # Below it only if this broker numbers the room lower (it lost its store, or
                # is another chat): what went before is not in its store, what goes now is above.
                self._floor[rid] = min(self._floor[rid], top)
        if top < before:
            # The broker lost its store (or numbers the room its own way): its
            # numbering starts again below ours. (Below what we had when the
            # connection was lost: events the new SUB brought since may be newer
            # than this reply, which travels on the other socket.) Said, as a gap is:
            # what this room had is no longer in the broker's history.
            self._events.append(
                Event(
                    type="status",
                    event="renumbered",
                    room=room,
                    seq=top,
                    text=(
                        f"#{room} starts again at seq {top} on the broker, below the {before} seen here: "
                        "its store was lost or replaced, and the room's history before now with it"
                    ),
                )
            )
            self._release_own(state)
            state.last = top
            state.backlog_to = 0  # the numbers of a join's backlog mean nothing any more
            state.pending.clear()
        elif top > state.last:
            if self._may_be_stored(room, top):
                # Only a message that may be stored already needs the catch-up before it
                # goes again. Others need not wait: a program with max_queue events unread
                # fetches nothing until it reads, and its messages waited for good.
                state.catch_up_to = top
            if not state.fetching:
                self._fetch(room, state, state.last, min(top - state.last, p.MAX_HISTORY_LIMIT))
        self._resend(0.0)

    def _retry_rooms(self, now: float) -> None:
        """Refused rejoins and history requests whose retry is due; history replies that never came."""
        for room, state in list(self._rooms.items()):
            if not state.joined and not state.leaving and state.rejoin_at and now >= state.rejoin_at:
                self._rejoin(room)
            if state.search_rid and now - state.search_sent > self._resend_after:
                self._callbacks.pop(state.search_rid, None)  # its reply was dropped: begin again
                state.search_rid = ""
            if not state.search_rid and now >= state.search_retry_at and state.joined and self._backed_up():
                self._search_own(room, state, now)
            if state.fetching and now - state.fetch_sent > self._resend_after:
                # The reply was dropped on the way (the broker drops what a full queue
                # to us cannot take): every later event of the room waits on it. Ask again.
                self._callbacks.pop(state.fetch_rid, None)
                state.fetching = False
                state.refetch_at = now
            if (
                state.refetch_at
                and now >= state.refetch_at
                and not state.fetching
                and state.last is not None
                and not self._backed_up()
            ):
                state.refetch_at = 0.0
                gap = min(state.pending) - state.last if state.pending else p.MAX_HISTORY_LIMIT
                self._fetch(room, state, state.last, min(gap, p.MAX_HISTORY_LIMIT))
            if state.tail_at and now >= state.tail_at:
                last = state.last
                if last is None or last >= state.tail:
                    state.tail_at = 0.0  # SUB brought it
                elif state.fetching or state.pending or last != state.tail_from:
                    # A repair is under way, or SUB is still delivering (only behind,
                    # not lost): look again a moment later.
                    state.tail_at, state.tail_from = now + TAIL_GRACE_S, last
                else:
                    # No progress: SUB dropped the room's last events (its queue
                    # overflowed), and nothing after them shows the gap. Fetch them.
                    state.tail_at = 0.0
                    self._fetch(room, state, last, min(state.tail - last, p.MAX_HISTORY_LIMIT))

    def _resend(self, sent_before: float) -> None:
        """(Re)send, in order, what was last sent at or before ``sent_before`` (0.0: only what waits)."""
        if self.state != "connected" or time.monotonic() < self._hold_until:
            return  # rate limited or unavailable: wait, then send everything held, in order
        blocked: set[str] = set()  # recipients with an earlier DM waiting
        for rid, env in list(self._unacked.items()):
            sent_at = self._sent_at.get(rid, 0.0)
            if blocked and env["type"] == "dm" and p.name_key(env["to"]) in blocked:
                continue
            if rid in self._dm_waiting and sent_at > sent_before:
                blocked.add(p.name_key(env["to"]))  # not due yet: what follows it to them waits
                continue
            if sent_at <= sent_before and self._room_ready(env):
                if sent_at and not self._caught_up_since(rid, env, sent_at):
                    # What waits behind it (refused, or written meanwhile) waits on:
                    # a newer line never overtakes an older one.
                    break
                self._send(env)
                self._mark_sent(rid)

    def _dm_decided_by(self) -> float:
        """When every DM that waits for its recipient will have been delivered or refused
        (time.monotonic(); 0 if none waits): its last try is due then, and its answer soon after."""
        waits = [until for rid, until in self._dm_waiting.items() if rid in self._unacked]
        return max(waits) + 2 * DM_RETRY_S if waits else 0.0

    def _dm_not_back(self, rid: str) -> str | None:
        """The recipient of DM ``rid`` if it waits for them to be back (itself, or behind one that does)."""
        env = self._unacked.get(rid)
        if env is None or env["type"] != "dm" or not (rid in self._dm_waiting or self._dm_blocked(rid, env)):
            return None
        return str(env["to"])

    def _dm_blocked(self, rid: str, env: Envelope) -> bool:
        """Whether an earlier DM to the same person waits to be asked again: this one
        waits behind it (it would arrive first)."""
        to = p.name_key(env["to"])
        return any(
            r != rid and p.name_key(self._unacked[r]["to"]) == to for r in self._dm_waiting if r in self._unacked
        )

    def _caught_up_since(self, rid: str, env: Envelope, sent_at: float) -> bool:
        """Whether a message sent at ``sent_at`` and not acknowledged may go again:
        we have seen its room up to where the pong to the first ping sent after it
        put it. The broker had read the message by then; if it stored it (the ack was
        lost on the way), the original is among what we have seen, and counted as the
        ack. Without this, a resend that came after the broker's resend window
        (100 000 messages, seconds at full load) had passed the original would be
        stored twice. A message that reached no room (a DM; a room we have left)
        goes as before."""
        state = self._rooms.get(env["room"]) if env["type"] == "msg" else None
        if state is None:
            return True
        cover = self._cover.get(rid)
        if cover is None:
            if max(self._pings.values(), default=0.0) <= sent_at:
                self._ping_now(time.monotonic())  # no ping after it on its way yet: ask now
            return False
        # Not there yet: SUB, the gap fetches or the tail check bring the rest; or, for a
        # program with max_queue events unread, a search of history for it alone (_search_own).
        return (state.last is not None and state.last >= cover) or self._floor.get(rid, -1) >= cover

    def _search_own(self, room: str, state: _Room, now: float) -> None:
        """For a program with max_queue events unread, which fetches no history until it
        reads: learn whether the broker stored the messages of ours to ``room`` that wait on
        that (one due for a resend, its ack maybe lost; one that went before a reconnect),
        without keeping the room's events. History is paged from their floor up to where
        the room stood after them, and only a copy of ours is kept: found, it is the ack
        (shown in its place in the room); not found, their floor is raised, and they go."""
        if state.last is None or not self._unacked:
            return
        due = now - self._resend_after
        to = 0
        wanted: dict[str, float] = {}
        for rid, env in self._unacked.items():
            floor = self._floor.get(rid)
            if floor is None or env["type"] != "msg" or env["room"] != room:
                continue  # (never sent: it cannot be stored)
            sent_at = self._sent_at.get(rid, 0.0)
            if state.catch_up_to and rid in self._went_before_loss:
                need = state.catch_up_to
            elif (cover := self._cover.get(rid)) is not None and 0.0 < sent_at <= due:
                need = cover
            else:
                continue
            if floor < need and state.last < need:
                wanted[rid] = sent_at
                to = max(to, need)
        if wanted:
            state.search_ids = wanted
            self._search_page(room, state, max(state.last, min(self._floor[rid] for rid in wanted)), to)

    def _search_page(self, room: str, state: _Room, after: int, to: int) -> None:
        state.search_after, state.search_to = after, to
        state.search_sent = time.monotonic()
        rid = state.search_rid = self._new_id()
        self._callbacks[rid] = lambda reply: self._on_searched(room, reply, page=rid)
        limit = min(to - after, p.MAX_HISTORY_LIMIT)
        self._send({"type": "history", "room": room, "after": after, "limit": limit, "id": rid})

    def _on_searched(self, room: str, reply: Envelope, *, page: str) -> None:
        """A page of :meth:`_search_own`'s search: our copies in it are acks; read through, the
        messages it looked for (unless sent again since) have no copy up to there."""
        state = self._rooms.get(room)
        if state is None or state.search_rid != page:
            # Not the page this room waits for: one of a search of before a leave and
            # rejoin, whose range and messages are not those of this room's search now.
            return
        state.search_rid = ""
        if reply.get("type") != "history" or not isinstance(reply.get("messages"), list):
            # Refused (the history budget, an unavailable broker): asked again in a moment.
            wait = RATE_RETRY_S if reply.get("code") == ErrorCode.RATE_LIMITED else UNAVAILABLE_RETRY_S
            state.search_retry_at = time.monotonic() + wait
            return
        after, to, wanted = state.search_after, state.search_to, state.search_ids
        through = after
        for env in reply["messages"]:
            if not (_is_event(env) and env["room"] == room and after < env["seq"] <= to):
                continue
            through = max(through, env["seq"])
            if env["type"] == "msg" and env.get("id") in wanted and (sent := self._stored_original(env)) is not None:
                self._show_own(self._own_event(sent, env))
        if through == after:
            through = to  # none of them is kept any more (a retention, a lost store): nothing to find
        for rid, sent_at in wanted.items():
            if rid in self._floor and self._sent_at.get(rid) == sent_at:
                self._floor[rid] = max(self._floor[rid], through)
        if through < to:
            self._search_page(room, state, through, to)
            return
        if state.catch_up_to and not self._may_be_stored(room, state.catch_up_to):
            state.catch_up_to = 0  # what went before the loss is found, or known not stored
        self._resend(time.monotonic() - self._resend_after)

    def _may_be_stored(self, room: str, to: int) -> bool:
        """Whether a message of ours to ``room`` that went before the connection was lost,
        unacknowledged, may be stored at or below ``to`` where we have not looked: its
        floor is below (with none, it never went)."""
        return any(
            self._floor.get(rid, to) < to
            for rid, env in self._unacked.items()
            if rid in self._went_before_loss and env["type"] == "msg" and env["room"] == room
        )

    def _room_ready(self, env: Envelope) -> bool:
        """Whether a message may go now: not to a room we are still rejoining, or still
        catching up on after the rejoin (see ``_Room.catch_up_to``)."""
        state = self._rooms.get(env["room"]) if env["type"] == "msg" else None
        return state is None or (state.joined and not state.catch_up_to)

    def _note_unavailable(self, why: str) -> None:
        """An ``unavailable`` answer: count it; too many in a row make us try the next broker."""
        now = time.monotonic()
        if not self._unavailable:
            self._unavailable_since = now
        self._unavailable += 1
        if self.state == "connected" and self._unavailable_exhausted():
            self._lost(f"{self.address} is unavailable: {why}")

    def _unavailable_exhausted(self) -> bool:
        return (
            len(self.addresses) > 1
            and self._unavailable >= FAILOVER_UNAVAILABLE_COUNT
            and time.monotonic() - self._unavailable_since >= FAILOVER_UNAVAILABLE_S
        )

    # ------------------------------------------------------------ internals

    def _new_id(self) -> str:
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:x}"

    def _send(self, env: Envelope) -> None:
        """Send on the DEALER, waiting at most :data:`SEND_WAIT_S` for room in its queue.

        A DEALER with no peer to take a message (its CURVE handshake refused) blocks
        a plain send for good, and the whole client with it. Connected, a full queue
        is waited for (what comes next must not overtake it), then the connection is
        given up; reconnecting, the hello or request is simply asked again later.
        """
        if self._read_mark is not None and env["type"] not in ("msg", "dm"):
            # Said on every other request (a lost one must not leave it unsaid), not on a
            # message: what is resent must be what was sent.
            env = {**env, "read": self._read_mark}
        frame = self._encode(env)
        try:
            self._dealer.send(frame, zmq.NOBLOCK)
            return
        except zmq.Again:
            if self.state != "connected":
                return
        try:
            if self._dealer.poll(int(SEND_WAIT_S * 1000), zmq.POLLOUT):
                self._dealer.send(frame, zmq.NOBLOCK)
                return
        except zmq.Again:
            pass
        self._lost(f"the broker took nothing from us for {SEND_WAIT_S:g} s")

    def _ping_now(self, now: float) -> None:
        rid = self._new_id()
        self._pings[rid] = now
        if len(self._pings) > PINGS_TRACKED:
            del self._pings[next(iter(self._pings))]  # its pong was lost
        self._send({"type": "ping", "id": rid})
        self._last_ping = now

    def _probe_rooms(self, now: float) -> None:
        """Cover the slow-joiner window of PUB/SUB for quiet rooms.

        A subscription reaches the broker on another connection than our join,
        so events published just after the join can miss us. A busy room shows
        that as a gap at its next event; a quiet room would not show it at all.
        So until the SUB stream has shown a room's event (normally our own
        join, at once), ask history for anything after what we have.
        """
        for room, state in self._rooms.items():
            if state.confirmed or state.fetching or state.last is None or now < state.next_probe:
                continue
            state.probes += 1
            if state.probes >= PROBE_LIMIT:
                state.confirmed = True
            state.next_probe = now + PROBE_INTERVAL_S * (state.probes + 1)
            self._fetch(room, state, state.last, p.MAX_HISTORY_LIMIT)

    @staticmethod
    def _check_text(text: str) -> None:
        try:
            p.check_text(text)
        except ProtocolError as exc:
            raise RequestError(exc.code, exc.message) from None
        try:
            # Checked here, not by the broker: what reaches it was decoded from UTF-8
            # already. A lone surrogate (a line read with errors="surrogateescape")
            # cannot be sent; queued, it would fail every later pump and the close.
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(
                ErrorCode.BAD_ENVELOPE, f"'text' is not valid Unicode ({exc.reason} at character {exc.start})"
            ) from None

    def _check_open(self) -> None:
        """Every call but connect() and close() needs an open client (a message queued
        on one that is not would never go: nothing pumps it)."""
        if self.state == "closed":
            raise ZchatError("closed", self._moved or "this client is closed")
        if self.state == "new":
            raise ZchatError("not_connected", "connect() first")

    def _send_tracked(self, env: Envelope) -> str:
        rid = env["id"] = self._new_id()
        self._unacked[rid] = env
        if env["type"] == "dm" and time.monotonic() < self._dm_grace_until:
            # Written just after a reconnect: its recipient may not be back yet either
            # (after a clean restart the broker even knows it is on its way), as for
            # one written while we were away. A user a moment slower than us is not gone.
            self._dm_early.add(rid)
        if (
            self.state == "connected"
            and time.monotonic() >= self._hold_until
            and not self._queued
            and self._room_ready(env)
            and not (self._dm_waiting and env["type"] == "dm" and self._dm_blocked(rid, env))
        ):
            self._send(env)
            self._mark_sent(rid)
        else:
            # Goes out with the next resend (after a welcome, a rejoin, or a
            # rate-limit hold), behind the held ones: a newer line never overtakes an older one.
            self._queue(rid)
        return rid

    def _queue(self, rid: str) -> None:
        self._sent_at[rid] = 0.0
        self._queued[rid] = None

    def _mark_sent(self, rid: str) -> None:
        self._sent_at[rid] = time.monotonic()
        self._queued.pop(rid, None)
        self._cover.pop(rid, None)  # a resend is covered by a later pong
        env = self._unacked.get(rid)
        if env is not None:
            self._went.add(rid)
        if env is not None and env["type"] == "msg" and rid not in self._floor:
            state = self._rooms.get(env["room"])
            if state is not None:
                # The broker has told us of the room up to here before it reads this: a
                # copy of it can only be stored above (a resend too: the room only grows).
                self._floor[rid] = max(state.last or 0, state.top)

    def _acked(self, rid: str) -> Envelope | None:
        self._dm_early.discard(rid)
        self._dm_waiting.pop(rid, None)
        self._dm_undelivered.discard(rid)
        self._sent_at.pop(rid, None)
        self._queued.pop(rid, None)
        self._cover.pop(rid, None)
        self._floor.pop(rid, None)
        self._went.discard(rid)
        sent = self._unacked.pop(rid, None)
        if sent is not None:
            self._shown[rid] = None
            if len(self._shown) > SHOWN_WINDOW:
                self._shown.popitem(last=False)
        return sent

    def _wait_ack(self, rid: str, timeout: float | None) -> Event:
        deadline = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        while True:
            for i, event in enumerate(self._events):
                if event.id == rid and (event.own or event.type == "error"):
                    del self._events[i]
                    if event.type == "error":
                        raise RequestError(event.code or "error", event.message or "")
                    return event
            remaining = deadline - time.monotonic()
            if (
                rid not in self._unacked
                and (taken := self._take_pending(rid, remaining <= 0 or self._backed_up())) is not None
            ):
                # Acknowledged, and waiting behind earlier events of its room that are still
                # coming (a join with after far behind): it is not lost, so it is answered.
                # With max_queue events unread, the gap before it is fetched only once the
                # program reads, which it does not while it waits here: answered at once.
                return taken
            if remaining <= 0:
                held = rid in self._queued and self.held_back is not None
                if held:
                    # The broker answers, and held messages back: its rate limit, or an unavailable.
                    ahead = list(self._queued).index(rid)
                    reason = (
                        "the broker's rate limit"
                        if self._hold_code == ErrorCode.RATE_LIMITED
                        else "the broker, which answered unavailable"
                    )
                    why = f"it waits, with {ahead} message(s) ahead of it, for {reason}"
                elif self.state == "connected" and (to := self._dm_not_back(rid)) is not None:
                    # The broker answers: the recipient is what is away (see _dm_waiting).
                    why = (
                        f"{to}'s connection could not take it (reconnecting, or not reading): it is asked again "
                        f"for as long as a reconnect takes (3 heartbeats and {DM_GRACE_EXTRA_S:g} s), "
                        "then an error event says it was not delivered"
                    )
                else:
                    why = f"no ack from {self.endpoint} within the timeout"
                raise BrokerUnreachable(
                    f"{why}; the message is still queued and will be sent until it is acknowledged"
                    f" (id {rid}): do not send it again",
                    msg_id=rid,
                    held=held,
                )
            self.pump(remaining)

    def _take_pending(self, rid: str, anyway: bool) -> Event | None:
        """The own message ``rid`` if it is acknowledged and waits for its turn in its room
        behind the history a join with ``after`` asked for (or ``anyway``: behind a gap
        that is being filled); a mark takes its place, so it is not shown again then."""
        for state in self._rooms.values():
            if not anyway and (state.last is None or state.last >= state.backlog_to):
                continue
            for seq, item in state.pending.items():
                if isinstance(item, Event) and item is not _TAKEN and item.id == rid:
                    state.pending[seq] = _TAKEN
                    return item
        return None

    def _request(self, env: Envelope, timeout: float | None = None, *, give_up_if_refused: bool = False) -> Envelope:
        """Send a request and pump until its reply; other traffic is queued meanwhile.

        Every request sent this way is safe to repeat (join, leave, history,
        who, rooms, ping), so a connection lost while it waits costs a
        reconnect, not the call: it is asked again once the client is back,
        within the same timeout. A broker that stays away still raises.
        """
        if self.state not in ("new", "connected"):
            raise BrokerUnreachable(f"not connected to {self.endpoint} ({self.state})")
        deadline = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        while True:
            rid = env["id"] = self._new_id()
            self._replies[rid] = None
            try:
                self._send(env)
                while (reply := self._replies[rid]) is None:
                    if self._auth_failure:
                        raise RequestError("auth_failed", self._auth_failure)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (give_up_if_refused and self._refused) or self._foreign is not None:
                        raise BrokerUnreachable(f"no reply from {self.endpoint} to {env['type']!r}")
                    self.pump(remaining)
            finally:
                self._replies.pop(rid, None)
            if reply["type"] != "error":
                if not _reply_fits(reply, env["type"]):
                    raise RequestError(
                        ErrorCode.BAD_ENVELOPE, f"a malformed {reply['type']!r} reply from {self.endpoint}"
                    )
                return reply
            if reply.get("code") != "unreachable":
                raise RequestError(str(reply.get("code")), str(reply.get("message")))
            # Lost mid-request: wait for the reconnect (hello, resume, rejoin), then ask again.
            while self.state != "connected":
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._auth_failure:
                    raise BrokerUnreachable(str(reply.get("message")))
                self.pump(min(remaining, 0.1))

    def _forget_room(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is not None:
            if state.last is not None:
                self._seen_before[room] = state.last
            self._release_own(state)
            self._sub.unsubscribe(p.room_topic(room))

    def _release_own(self, state: _Room) -> None:
        """Show now the own messages still waiting in ``state`` (the room's order is being given up)."""
        for seq in sorted(s for s, item in state.pending.items() if isinstance(item, Event)):
            item = state.pending.pop(seq)
            assert isinstance(item, Event)
            if item is not _TAKEN:
                self._events.append(item)

    def _read_dealer(self) -> None:
        while True:
            try:
                frame = self._dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                envs = p.decode_many(frame, p.MAX_REPLY_BYTES)
            except ProtocolError:
                continue  # a broker that speaks garbage is not worth crashing for
            self._last_recv = time.monotonic()
            dealer = self._dealer
            for env in envs:
                if self._dealer is not dealer:
                    break  # failed over: the rest of the old broker's batch is moot
                self._on_direct(env)

    def _on_direct(self, env: Envelope) -> None:
        kind = env["type"]
        unavailable = kind == "error" and env.get("code") == ErrorCode.UNAVAILABLE
        if kind in ("ack", "welcome", "joined"):
            self._unavailable = 0
            # (A DM's ack names its recipient. Not looked up in _unacked: a message's own
            # event on the room-event socket may have settled it before its ack comes.)
            said = self._unavailable_said
            if kind == "ack" and said is not None and self._spell_ends(said, env):
                self._unavailable_said = None
                self._status("available", f"{self.address} takes messages again; those that waited are sent")
        self._dispatch(env)
        if unavailable:
            self._note_unavailable(str(env.get("message") or "unavailable"))  # last: it may fail over

    def _spell_ends(self, said: str, ack: Envelope) -> bool:
        """Whether ``ack`` ends a spell of "unavailable" said of a ``said`` ("msg" or "dm"):
        an ack of that type, or any once none of that type waits (the one that began it
        refused for good since, say: a DM whose recipient left). Otherwise the spell would
        never end, and the next outage would go unsaid."""
        if ("dm" if "to" in ack else "msg") == said:
            return True
        acked = ack.get("id")
        return not any(env["type"] == said for rid, env in self._unacked.items() if rid != acked)

    def _dispatch(self, env: Envelope) -> None:
        if self._moved is not None:
            return  # the session is another client's: the rest of this read is not ours
        kind = env["type"]
        if kind == "dm":
            # Before any id matching: a DM's id is its author's, and must never be
            # mistaken for the reply to one of our requests.
            self._on_dm(env)
            return
        rid = env.get("id")
        mark = env.get("mark")
        if type(mark) is str and p.mark_count(mark) > p.mark_count(self._read_mark):
            # A large reply read: the broker hears so with our next request (see _send),
            # or it stops answering such requests once too many are unread. The highest:
            # marks need not come in order (a history answer may overtake a who's).
            self._read_mark = mark
        if kind == "pong":
            self._note_seqs(env.get("seqs"), self._pings.pop(rid, None) if isinstance(rid, str) else None)
        code = env.get("code") if kind == "error" else None
        if code == ErrorCode.SESSION_MOVED:
            # Another client took our session with our resume token: taking it back
            # would start a fight neither could win. We stop (at the end of this pump).
            self._moved = str(env.get("message") or "our session was resumed elsewhere")
            return
        if code == ErrorCode.NOT_REGISTERED and self.state == "connected":
            # The broker no longer knows us on this connection (it restarted, expired
            # us while we were stopped, or cut every connection, as it does when a key
            # is revoked): whatever this was, it is redone after a new hello.
            if self._dealer_cut:
                # (Not "the broker restarted": a NAT or a firewall resets connections too.)
                why = f"the connection to {self.endpoint} dropped and came back; signing in again"
            else:
                why = "the broker no longer knows us: it restarted, timed us out, or cut us off"
            self._lost(why)
            return
        if isinstance(rid, str):
            if rid in self._replies:
                self._replies[rid] = env
                return
            callback = self._callbacks.pop(rid, None)
            if callback is not None:
                callback(env)
                return
            if code in (ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE) and rid in self._unacked:
                # Not lost, only early (or the broker's backplane is away): hold new
                # sends, then resend in order.
                wait = RATE_RETRY_S if code == ErrorCode.RATE_LIMITED else UNAVAILABLE_RETRY_S
                if code == ErrorCode.UNAVAILABLE and self._unavailable_said is None:
                    # Said once, not at every retry: why what the user wrote does not go
                    # (the broker's disk is nearly full, or its backplane is away).
                    self._unavailable_said = self._unacked[rid]["type"]
                    why = str(env.get("message") or "unavailable")
                    self._status(
                        "unavailable",
                        f"{self.address} refuses messages for now ({why}); "
                        "yours wait here and are sent when it takes them again",
                    )
                # Refused after the broker's check for a copy it stored: none is (see _fate).
                self._went.discard(rid)
                self._hold_until = max(self._hold_until, time.monotonic() + wait)
                self._hold_code, self._hold_at = code, time.monotonic()
                if code == ErrorCode.RATE_LIMITED:
                    self._rate_limited_at = time.monotonic()
                self._queue(rid)
                return
            now = time.monotonic()
            if code == ErrorCode.NO_SUCH_USER and rid in self._dm_early and now < self._dm_grace_until:
                # Just back from a lost connection (a broker restart, say): the recipient
                # may still be on its way back too. Ask again in a moment, for a while: to the
                # grace's end, or, after an undelivered (the recipient was reconnecting, and is
                # again, with a new session), to that wait's end if later: the undelivered
                # that may follow keeps it, and the grace's could be all but over.
                self._dm_waiting[rid] = max(self._dm_waiting.get(rid, 0.0), self._dm_grace_until)
                self._sent_at[rid] = now - self._resend_after + DM_RETRY_S
                return
            if code == ErrorCode.UNDELIVERED and rid in self._unacked:
                # The recipient's connection was gone (it is reconnecting, and takes up to
                # 3 heartbeats to notice) or full: asked again in a moment, for as long as
                # a reconnect takes, before its author is told. Shown at once, hundreds of
                # DMs were lost to a one-second reconnect of their recipient.
                until = self._dm_waiting.get(rid)
                if until is None or rid not in self._dm_undelivered:
                    # The first undelivered: the recipient is back, and reconnecting again (or
                    # not reading). The wait for no_such_user after our reconnect may be all
                    # but over: kept, it told the author at once of a DM to someone who is there.
                    until = max(until or 0.0, now + 3 * self.heartbeat_ms / 1000 + DM_GRACE_EXTRA_S)
                    self._dm_waiting[rid] = until
                    self._dm_undelivered.add(rid)
                if now < until:
                    self._sent_at[rid] = now - self._resend_after + DM_RETRY_S
                    return
            if kind == "ack" and rid in self._unacked and not _ack_fits(env, self._unacked[rid]):
                return  # a broker that says nonsense: the message stays unacknowledged, and goes again
            if kind in ("ack", "error") and rid in self._unacked:
                sent = self._acked(rid)
                assert sent is not None
                if kind == "error":
                    # With what it refused: the line may have been typed a while ago.
                    error = Event.from_envelope(env)
                    error.room, error.to, error.text = sent.get("room"), sent.get("to"), sent["text"]
                    self._events.append(error)
                else:
                    self._show_own(self._own_event(sent, env))
                return
        if kind == "error" and code != ErrorCode.UNAVAILABLE:
            self._events.append(Event.from_envelope(env))
        # pong, acks of requests we no longer track, and an ``unavailable`` that
        # answers nothing we track (it is counted) need nothing.

    def _note_seqs(self, seqs: object, ping_at: float | None) -> None:
        """A pong's room seqs: schedule a check of each room it shows beyond our last
        event. ``ping_at``: when the ping it answers was sent, if it was one of ours
        (see ``_caught_up_since``)."""
        if not isinstance(seqs, dict):
            return
        if ping_at is not None:
            # Pongs come in order: those of earlier pings are not coming any more.
            for rid in [r for r, at in self._pings.items() if at < ping_at]:
                del self._pings[rid]
            cover, sent_at = self._cover, self._sent_at
            for rid, env in self._unacked.items():
                if env["type"] == "msg" and rid not in cover and 0.0 < sent_at.get(rid, 0.0) < ping_at:
                    seq = seqs.get(env["room"])
                    # A room the broker does not list has nothing of ours to wait for.
                    cover[rid] = seq if type(seq) is int else 0
        check_at = time.monotonic() + TAIL_GRACE_S
        for room, seq in seqs.items():
            state = self._rooms.get(room)
            if state is None or state.last is None or type(seq) is not int:
                continue
            state.top = max(state.top, seq)
            if seq > state.last and not state.tail_at:
                state.tail, state.tail_at, state.tail_from = seq, check_at, state.last

    def _on_dm(self, env: Envelope) -> None:
        if env.get("sender") == self.sender or env.get("from") == self.name:
            return  # a DM to ourselves shows once, on its ack
        key = (str(env.get("from")), str(env.get("id")))
        if key in self._dms_seen:
            return  # delivered again (resent by its author across a failover): shown already
        self._dms_seen[key] = None
        if len(self._dms_seen) > DM_WINDOW:
            self._dms_seen.popitem(last=False)
        self._events.append(Event.from_envelope(env))

    def _own_event(self, sent: Envelope, ack: Envelope) -> Event:
        if sent["type"] == "dm":
            # The recipient as it spells itself (a /msg BOB reaches bob), when the broker
            # says so (an older one does not): else as we wrote it.
            to = ack.get("to")
            if not (isinstance(to, str) and p.is_name(to) and p.name_key(to) == p.name_key(sent["to"])):
                to = sent["to"]
            return Event(type="dm", name=self.name, to=to, text=sent["text"], ts=ack.get("ts"), id=sent["id"], own=True)
        return Event(
            type="msg",
            room=sent["room"],
            seq=ack.get("seq"),
            ts=ack.get("ts"),
            name=self.name,
            text=sent["text"],
            sender=self.sender,
            id=sent["id"],
            own=True,
            action=sent.get("action") is True,
        )

    def _show_own(self, event: Event) -> None:
        """An own message just acknowledged: into its room's seq order (DMs: at once)."""
        state = self._rooms.get(event.room) if event.type == "msg" and event.room else None
        if state is not None and event.seq is not None:
            state.top = max(state.top, event.seq)
        if state is None or state.last is None or event.seq is None or event.seq <= state.last:
            self._events.append(event)
            return
        # Replaces a copy of it that may be waiting there (it would be dropped as ours).
        state.pending[event.seq] = event
        state.floor = min(state.floor, event.seq)
        assert event.room is not None
        self._flush(event.room, state)

    def _held(self) -> int:
        """Room events held for the program: queued, or waiting in a room for earlier ones."""
        return len(self._events) + sum(len(state.pending) for state in self._rooms.values())

    def _backed_up(self) -> bool:
        """Whether the program has max_queue events to read: no history is fetched until it reads
        (but for our own messages, keeping nothing else: _search_own).

        Not the events waiting in a room for an earlier one (see _held): only history
        brings what they wait for, so once they alone were max_queue, the room stood still
        for good (SUB's events dropped, the gap never asked for). A fetch adds at most a
        page (p.MAX_HISTORY_LIMIT) a room to what is held."""
        return len(self._events) >= self._max_queue

    def _read_sub(self) -> None:
        held = self._held()
        budget = SUB_EVENTS_PER_PUMP
        while budget > 0:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            budget -= 1  # (a frame dropped or refused costs its decoding at most)
            if held >= self._max_queue:
                # The program is behind: dropped unread, as SUB's high-water mark would
                # (left unread, SUB and the broker's PUB would hold sub_hwm and pub_hwm
                # frames of up to 16 KiB for us). History fills the gap once the program
                # has read (see MAX_QUEUE, _fetch, _retry_rooms): asked for then, not
                # when a later event or the next pong shows it (a heartbeat later: a
                # program waiting for events with a timeout took the room for quiet).
                self._dropped_from(frames[0])
                continue
            if len(frames) != 2:
                continue
            try:
                room = p.topic_room(frames[0])
                envs = p.decode_many(frames[1], p.MAX_REPLY_BYTES)
            except ProtocolError:
                continue
            budget -= len(envs) - 1
            state = self._rooms.get(room)
            if state is None:
                continue
            added = False
            for env in envs:
                if held >= self._max_queue:
                    self._dropped_from(frames[0])
                    break  # (the rest of a batch: dropped as above)
                if not _is_event(env) or env.get("room") != room:
                    continue
                state.confirmed = True
                seq: int = env["seq"]
                if state.last is None or seq > state.last:
                    if seq not in state.pending:  # an own acknowledged message there stays
                        state.pending[seq] = env
                        state.floor = min(state.floor, seq)
                        held += 1
                    added = True
            if added:
                self._flush(room, state)

    def _dropped_from(self, topic: bytes) -> None:
        """Room events of ``topic`` were dropped: fetched from history once the program reads."""
        try:
            state = self._rooms.get(p.topic_room(topic))
        except ProtocolError:
            return
        if state is not None and not state.refetch_at:
            state.refetch_at = time.monotonic()

    def _flush(self, room: str, state: _Room) -> None:
        """Deliver pending events in seq order; fetch from history across a gap."""
        if state.last is None:
            return
        if state.floor <= state.last:
            # (A scan of every event waiting: per frame SUB brought, behind a gap of a
            # flood, it was most of the client's work, so only when some may be stale.)
            for seq in [s for s in state.pending if s <= state.last]:
                del state.pending[seq]
        while (item := state.pending.pop(state.last + 1, None)) is not None:
            state.last += 1
            backlog = state.last <= state.backlog_to and not (
                # the join that asked for this backlog: the moment it joined, not before
                state.last == state.backlog_to and not state.stayed and self._is_own_join(item)
            )
            self._deliver(item, state.backlog_seen if backlog else None)
        state.floor = state.last + 1  # (what is left is past it: the loop took each next one)
        if state.catch_up_to and state.last >= state.catch_up_to:
            state.catch_up_to = 0
            self._resend(0.0)  # what waited for the catch-up, in order
        if state.pending and not state.fetching and self.state == "connected":
            self._fetch(room, state, state.last, min(min(state.pending) - state.last, p.MAX_HISTORY_LIMIT))

    def _fetch(self, room: str, state: _Room, after: int, limit: int) -> None:
        """Ask history for events after ``after``; the reply goes through the room's pending set.
        With max_queue events held for the program, only later (see _retry_rooms)."""
        if self._backed_up():
            if not state.refetch_at:
                state.refetch_at = time.monotonic()  # asked again once the program has read
            return
        state.fetching = True
        state.fetch_after = after
        state.fetch_sent = time.monotonic()
        rid = state.fetch_rid = self._new_id()
        self._callbacks[rid] = lambda reply: self._on_fetched(room, reply)
        self._send({"type": "history", "room": room, "after": after, "limit": limit, "id": rid})

    def _on_fetched(self, room: str, reply: Envelope) -> None:
        state = self._rooms.get(room)
        if state is None or state.last is None:
            return
        state.fetching = False
        after = state.fetch_after
        if reply.get("type") != "history" or not isinstance(reply.get("messages"), list):
            # Refused (unavailable, say): ask again in a moment rather than leave a gap open.
            state.refetch_at = time.monotonic() + UNAVAILABLE_RETRY_S
            return
        events = [env for env in reply["messages"] if _is_event(env)]
        for env in events:
            if env["seq"] > state.last:
                state.pending.setdefault(env["seq"], env)
                state.floor = min(state.floor, env["seq"])
        top = reply.get("seq")
        top = top if isinstance(top, int) and not isinstance(top, bool) else state.last
        state.top = max(state.top, top)
        if not events and after <= state.last < top:
            # The room is at ``top`` but the store has nothing after ``after``: the
            # broker lost (part of) its store, or its retention deleted them all. A
            # reply whose events we already have (SUB overtook it) says nothing about
            # the events after them; an empty one does. Asked twice, a moment apart,
            # before skipping them rather than stalling the room forever.
            if state.empty_after != after:
                state.empty_after = after
                state.refetch_at = time.monotonic() + PROBE_INTERVAL_S
                return
            state.empty_after = None
            self._skip(room, state, min(top, min(state.pending) - 1) if state.pending else top, "lost")
        else:
            state.empty_after = None
            # Events are stored with every seq, so a reply that starts past ``after + 1``
            # says the ones before its first are no longer kept (the broker's
            # retention deleted them): skip them, or the room would ask for them forever.
            first = min((env["seq"] for env in events), default=0)
            if first > after + 1 and first > state.last + 1:
                # Only up to what is already here (SUB's events, our acknowledged own):
                # the gap below that is gone too, and those are delivered next.
                self._skip(room, state, min(state.pending, default=first) - 1, "retention")
        self._flush(room, state)
        # A rejoin's catch-up goes at least to the seq its reply gave (a fetch sent
        # before that reply was read may stop short of it).
        top = max(top, state.catch_up_to)
        if not state.fetching and not state.pending and state.last < top:
            # One page of a longer catch-up (after a reconnect): ask for the next.
            self._fetch(room, state, state.last, min(top - state.last, p.MAX_HISTORY_LIMIT))

    def _skip(self, room: str, state: _Room, to: int, why: Literal["retention", "lost"]) -> None:
        """Move the room past events the broker no longer has, saying so in a status event."""
        assert state.last is not None
        if to <= state.last:
            return
        first, state.last = state.last + 1, to
        self._events.append(_skipped(room, first, to, why))

    def _stored_original(self, env: Envelope) -> Envelope | None:
        """If ``env`` is the stored copy of a message of ours still waiting for its ack:
        that message, now acknowledged (ids are this client's own, never reused)."""
        rid = env.get("id")
        if env["type"] == "msg" and env.get("from") == self.name and isinstance(rid, str) and rid in self._unacked:
            return self._acked(rid)
        return None

    def _deliver(self, item: Envelope | Event, backlog_seen: OrderedDict[tuple[str, str], None] | None = None) -> None:
        """Show one event of a room in its turn. With ``backlog_seen`` it is history that a
        join with ``after`` asked for: shown even if this client showed it before (it was
        asked for again), and a copy stored twice once (``backlog_seen`` remembers)."""
        if isinstance(item, Event):
            if item is not _TAKEN:  # (a send_wait took that one already)
                self._events.append(item)  # our own, acknowledged: its turn has come
            return
        env, backlog = item, backlog_seen is not None
        if env["type"] == "msg" and env.get("from") == self.name:
            sent = self._stored_original(env)
            if sent is not None:
                # Stored, but the ack was lost (broker crash) or is still on its way: this is our ack.
                event = self._own_event(sent, env)
                event.backlog = backlog
                self._events.append(event)
                return
            rid = env.get("id")
            if backlog_seen is not None:
                if _seen(backlog_seen, (self.name, str(rid))):
                    return
            elif env.get("sender") == self.sender or rid in self._shown:
                return  # our own, shown once when its ack arrived
        elif env["type"] == "msg":
            key = (str(env.get("from")), str(env.get("id")))
            if backlog_seen is not None and _seen(backlog_seen, key):
                return
            if _seen(self._msgs_seen, key) and backlog_seen is None:
                return  # stored twice (resent after the broker forgot it): shown already
        self._events.append(Event.from_envelope(env, backlog=backlog))


#: Where an own message waited in its room's order before a send_wait took it (_take_pending).
_TAKEN: Final = Event(type="taken")


#: Fields of the replies that calls read, and their types: a reply without them (a broker
#: that speaks nonsense) is an error of the call, not a TypeError in the bot.
_REPLY_FIELDS: Final[dict[str, dict[str, type]]] = {
    "welcome": {"sender": str, "epoch": str, "heartbeat_ms": int},
    "joined": {"seq": int},
    "history": {"seq": int, "messages": list},
    "who": {"members": list},
    "rooms": {"rooms": list},
}


#: The reply each request made with :meth:`Client._request` is answered with (or an error).
_REPLY_TYPES: Final[dict[str, str]] = {
    "hello": "welcome",
    "join": "joined",
    "leave": "left",
    "history": "history",
    "who": "who",
    "rooms": "rooms",
    "ping": "pong",
}


def _reply_fits(reply: Envelope, request: str | None = None) -> bool:
    """Whether ``reply`` (not an error) has what its readers take from it, and answers
    ``request`` (a request type) with the reply it calls for."""
    if request is not None and _REPLY_TYPES.get(request, reply["type"]) != reply["type"]:
        return False
    fields = _REPLY_FIELDS.get(reply["type"], {})
    if not all(type(reply.get(name)) is kind for name, kind in fields.items()):
        return False
    if reply["type"] == "joined" and type(reply.get("members")) is not list and type(reply.get("count")) is not int:
        return False  # a join's reply lists its members, or says how many (the join said members: false)
    members = reply.get("members", [])
    rooms = reply.get("rooms", []) if reply["type"] == "rooms" else []
    return type(members) is list and all(type(m) is str for m in members) and all(_room_item_fits(r) for r in rooms)


def _room_item_fits(item: object) -> bool:
    """One entry of a ``rooms`` reply: its name, member count and last seq."""
    return (
        type(item) is dict
        and type(item.get("room")) is str
        and type(item.get("members")) is int
        and type(item.get("seq")) is int
    )


def _ack_fits(ack: Envelope, sent: Envelope) -> bool:
    """Whether ``ack`` has what the own event made of it needs (a room message's seq)."""
    return type(ack.get("ts")) is int and (sent["type"] != "msg" or type(ack.get("seq")) is int)


def _seen(window: OrderedDict[tuple[str, str], None], key: tuple[str, str]) -> bool:
    """Whether ``key`` is in ``window`` (the last MSG_WINDOW remembered); it is from now on."""
    if key in window:
        return True
    window[key] = None
    if len(window) > MSG_WINDOW:
        window.popitem(last=False)
    return False


def _is_event(env: object) -> bool:
    return (
        isinstance(env, dict)
        and env.get("type") in ("msg", "presence")
        and isinstance(env.get("seq"), int)
        and isinstance(env.get("room"), str)
    )
