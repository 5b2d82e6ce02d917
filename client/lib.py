"""The zchat client library: what bots import and what the CLI is built on.

A :class:`Client` owns one DEALER (requests, replies, DMs) and one SUB (room
events). It is single-threaded by design: every socket is touched only from
the thread that calls it, so use one ``Client`` per thread. Nothing happens
behind your back; the sockets are read whenever you call :meth:`Client.pump`,
:meth:`Client.next_event`, :meth:`Client.events` or a request method.

Guarantees it gives on top of the wire (DESIGN.md "Client rules"):

* Joining follows the Clone pattern: subscribe, then ask for history, then
  drop live events at or below what history covered.
* Events of a room are delivered in ``seq`` order, each once; a jump in
  ``seq`` is filled from ``history`` before later events are delivered.
* Your own room messages arrive once, as ``msg`` events with ``own=True``,
  when the broker acknowledges them; their copies on the SUB stream (matched
  by ``sender``) are dropped.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from zchat import protocol as p
from zchat.protocol import Envelope, ErrorCode, ProtocolError

#: Longest wait for the broker's ``welcome``.
CONNECT_TIMEOUT_S = 5.0
#: Longest wait for any other reply.
REQUEST_TIMEOUT_S = 10.0
#: Until a room's first event arrives on SUB, history is polled this often
#: (growing linearly), at most PROBE_LIMIT times; see Client._probe_rooms.
PROBE_INTERVAL_S = 0.25
PROBE_LIMIT = 12


class ZchatError(Exception):
    """Base of every error this library raises."""


class BrokerUnreachable(ZchatError):
    """The broker did not answer in time (not running, wrong address, or gone)."""


class RequestError(ZchatError):
    """The broker refused a request (or it was refused before sending, for the same reason)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Event:
    """Something to show: a room message or presence change, a DM, or an error.

    ``name`` is who wrote or joined/left (the wire's ``from`` or ``name``).
    ``own`` marks your own messages (delivered on their ack); ``backlog``
    marks events replayed from history when joining.
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
        )

    def to_dict(self) -> dict[str, Any]:
        """The event in the wire's vocabulary (``from``, not ``name``), without empty fields."""
        out: dict[str, Any] = {"type": self.type}
        fields: tuple[str, ...]
        if self.type == "presence":
            fields = ("room", "seq", "ts", "name", "event")
        elif self.type == "dm":
            fields = ("from", "to", "text", "ts", "id")
        elif self.type == "error":
            fields = ("code", "message", "id")
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
    #: Live events waiting for the ones before them.
    pending: dict[int, Envelope] = field(default_factory=dict)
    fetching: bool = False
    #: Whether the SUB stream has shown this room's events yet (subscription live).
    confirmed: bool = False
    probes: int = 0
    next_probe: float = 0.0


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Client:
    """One chat session. Use it from one thread; see the module docstring."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 5555,
        pub_port: int = 5556,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if not p.is_name(name):
            raise RequestError(
                ErrorCode.BAD_NAME, f"{name!r} is not a name: use 1-32 of A-Z a-z 0-9 _ . -, not starting with . or -"
            )
        self.name = name
        self.endpoint = endpoint(host, port)
        self.pub_endpoint = endpoint(host, pub_port)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.sender: str | None = None
        self.epoch: str | None = None
        self.heartbeat_ms = 5000
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._sub = self._ctx.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * p.MAX_REPLY_BYTES)
        self._poller = zmq.Poller()
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._sub, zmq.POLLIN)
        self._encode = p.Encoder()
        self._id_prefix = secrets.token_hex(4)
        self._id_count = 0
        self._last_send = time.monotonic()
        self._events: deque[Event] = deque()
        self._rooms: dict[str, _Room] = {}
        #: id -> reply, for requests someone is waiting on.
        self._replies: dict[str, Envelope | None] = {}
        #: id -> callback, for replies handled in the background (gap fills).
        self._callbacks: dict[str, Callable[[Envelope], None]] = {}
        #: id -> request, for messages and DMs sent and not yet acknowledged.
        self._unacked: dict[str, Envelope] = {}
        self._connected = False
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Connect both sockets and say hello; raises BrokerUnreachable or RequestError."""
        self._dealer.connect(self.endpoint)
        self._sub.connect(self.pub_endpoint)
        try:
            welcome = self._request(p.hello(self.name), timeout=self.connect_timeout)
        except BrokerUnreachable:
            raise BrokerUnreachable(
                f"no answer from a zchat broker at {self.endpoint} within {self.connect_timeout:g} s"
            ) from None
        self.sender = welcome["sender"]
        self.epoch = welcome["epoch"]
        self.heartbeat_ms = int(welcome["heartbeat_ms"])
        self._connected = True

    def close(self, flush_timeout: float = 1.0) -> None:
        """Say bye (so the room sees the leave now, not at expiry) and release the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._connected:
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.send(self._encode({"type": "bye"}), zmq.NOBLOCK)
        self._dealer.close(linger=int(flush_timeout * 1000) if self._connected else 0)
        self._sub.close(linger=0)
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rooms_joined(self) -> list[str]:
        return list(self._rooms)

    @property
    def unacked(self) -> int:
        """Messages and DMs sent and not acknowledged yet."""
        return len(self._unacked)

    # ------------------------------------------------------------- requests

    def join(self, room: str, backlog: int = 0) -> list[str]:
        """Join ``room``; queue its last ``backlog`` events; return its members."""
        room = p.parse_room(room) if not p.is_room(room) else room
        if room in self._rooms:
            return list(self._request({"type": "join", "room": room})["members"])
        state = self._rooms[room] = _Room()
        # Subscribe before asking, so nothing published after our join is missed.
        self._sub.subscribe(p.room_topic(room))
        try:
            joined = self._request({"type": "join", "room": room})
            top: int = joined["seq"]
            after = max(0, top - max(0, backlog))
            while after < top:
                reply = self._request(
                    {"type": "history", "room": room, "after": after, "limit": min(top - after, p.MAX_HISTORY_LIMIT)}
                )
                got = [m for m in reply["messages"] if isinstance(m, dict) and after < m.get("seq", 0) <= top]
                if not got:
                    break
                for env in got:
                    self._events.append(Event.from_envelope(env, backlog=True))
                after = got[-1]["seq"]
        except BaseException:
            self._forget_room(room)
            raise
        state.last = top
        state.next_probe = time.monotonic() + PROBE_INTERVAL_S
        self._flush(room, state)
        return list(joined["members"])

    def leave(self, room: str) -> None:
        room = p.parse_room(room)
        self._request({"type": "leave", "room": room})
        self._forget_room(room)

    def send(self, room: str, text: str, *, action: bool = False) -> str:
        """Send a room message without waiting; returns its id. The ack arrives as an own ``msg`` event.

        ``action=True`` sends an IRC-style ``/me`` action.
        """
        room = p.parse_room(room)
        self._check_text(text)
        if room not in self._rooms:
            raise RequestError(ErrorCode.NOT_JOINED, f"join #{room} before writing to it")
        env: Envelope = {"type": "msg", "room": room, "text": text}
        if action:
            env["action"] = True
        return self._send_tracked(env)

    def dm(self, to: str, text: str) -> str:
        """Send a direct message without waiting; returns its id. The ack arrives as an own ``dm`` event."""
        if not p.is_name(to):
            raise RequestError(ErrorCode.BAD_NAME, f"{to!r} is not a name")
        self._check_text(text)
        return self._send_tracked({"type": "dm", "to": to, "text": text})

    def send_wait(self, room: str, text: str, timeout: float | None = None) -> Event:
        """Send a room message and wait for its ack; returns the own ``msg`` event."""
        return self._wait_ack(self.send(room, text), timeout)

    def dm_wait(self, to: str, text: str, timeout: float | None = None) -> Event:
        return self._wait_ack(self.dm(to, text), timeout)

    def history(self, room: str, after: int = 0, limit: int = p.DEFAULT_HISTORY_LIMIT) -> tuple[list[Event], int]:
        """Events of ``room`` with seq > ``after`` (oldest first) and the room's current seq."""
        reply = self._request({"type": "history", "room": p.parse_room(room), "after": after, "limit": limit})
        events = [Event.from_envelope(m, backlog=True) for m in reply["messages"] if _is_event(m)]
        return events, int(reply["seq"])

    def who(self, room: str) -> list[str]:
        return list(self._request({"type": "who", "room": p.parse_room(room)})["members"])

    def rooms(self) -> list[dict[str, Any]]:
        return list(self._request({"type": "rooms"})["rooms"])

    def ping(self) -> None:
        self._request({"type": "ping"})

    # --------------------------------------------------------------- events

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            self.pump(wait)
        return self._events.popleft()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come; stops after ``timeout`` seconds without one."""
        while (event := self.next_event(timeout)) is not None:
            yield event

    def drain_events(self) -> list[Event]:
        """Every event queued so far, without waiting."""
        out = list(self._events)
        self._events.clear()
        return out

    def pump(self, timeout: float | None = 0, fds: Sequence[int] = ()) -> list[int]:
        """Read whatever the sockets have, waiting up to ``timeout`` s for something.

        Also pings the broker when we have been quiet for a heartbeat. ``fds``
        are extra file descriptors to wait on (stdin, say); the ready ones are
        returned, so a program can wait on the chat and its own input at once.
        """
        self._keepalive()
        self._probe_rooms()
        # Never sleep past a heartbeat: we must wake up in time to ping.
        poll_ms = self.heartbeat_ms if timeout is None else min(self.heartbeat_ms, max(0, int(timeout * 1000)))
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
        return [fd for fd in fds if fd in ready]

    # ------------------------------------------------------------ internals

    def _new_id(self) -> str:
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:x}"

    def _send(self, env: Envelope) -> None:
        self._dealer.send(self._encode(env))
        self._last_send = time.monotonic()

    def _keepalive(self) -> None:
        if self._connected and time.monotonic() - self._last_send >= self.heartbeat_ms / 1000:
            self._send({"type": "ping"})

    def _probe_rooms(self) -> None:
        """Cover the slow-joiner window of PUB/SUB for quiet rooms.

        A subscription reaches the broker on another connection than our join,
        so events published just after the join can miss us. A busy room shows
        that as a gap at its next event; a quiet room would not show it at all.
        So until the SUB stream has shown a room's event (normally our own
        join, at once), ask history for anything after what we have.
        """
        now = time.monotonic()
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

    def _send_tracked(self, env: Envelope) -> str:
        rid = env["id"] = self._new_id()
        self._unacked[rid] = env
        self._send(env)
        return rid

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
            if remaining <= 0:
                raise BrokerUnreachable(f"no ack from {self.endpoint} within the timeout")
            self.pump(remaining)

    def _request(self, env: Envelope, timeout: float | None = None) -> Envelope:
        """Send a request and pump until its reply; other traffic is queued meanwhile."""
        rid = env["id"] = self._new_id()
        self._replies[rid] = None
        try:
            self._send(env)
            deadline = time.monotonic() + (self.request_timeout if timeout is None else timeout)
            while (reply := self._replies[rid]) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnreachable(f"no reply from {self.endpoint} to {env['type']!r}")
                self.pump(remaining)
        finally:
            self._replies.pop(rid, None)
        if reply["type"] == "error":
            raise RequestError(str(reply.get("code")), str(reply.get("message")))
        return reply

    def _forget_room(self, room: str) -> None:
        if self._rooms.pop(room, None) is not None:
            self._sub.unsubscribe(p.room_topic(room))

    def _read_dealer(self) -> None:
        while True:
            try:
                frame = self._dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                env = p.decode(frame, p.MAX_REPLY_BYTES)
            except ProtocolError:
                continue  # a broker that speaks garbage is not worth crashing for
            self._on_direct(env)

    def _on_direct(self, env: Envelope) -> None:
        kind = env["type"]
        rid = env.get("id")
        if isinstance(rid, str):
            if rid in self._replies:
                self._replies[rid] = env
                return
            callback = self._callbacks.pop(rid, None)
            if callback is not None:
                callback(env)
                return
            sent = self._unacked.pop(rid, None) if kind in ("ack", "error") else None
            if sent is not None:
                if kind == "error":
                    self._events.append(Event.from_envelope(env))
                else:
                    self._events.append(self._own_event(sent, env))
                return
        if kind == "dm":
            if env.get("sender") != self.sender:  # a DM to ourselves shows once, on its ack
                self._events.append(Event.from_envelope(env))
        elif kind == "error":
            self._events.append(Event.from_envelope(env))
        # pong, and acks of requests we no longer track, need nothing.

    def _own_event(self, sent: Envelope, ack: Envelope) -> Event:
        if sent["type"] == "dm":
            return Event(
                type="dm", name=self.name, to=sent["to"], text=sent["text"], ts=ack.get("ts"), id=sent["id"], own=True
            )
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

    def _read_sub(self) -> None:
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                room = p.topic_room(frames[0])
                env = p.decode(frames[1], p.MAX_REPLY_BYTES)
            except ProtocolError:
                continue
            state = self._rooms.get(room)
            if state is None or not _is_event(env) or env.get("room") != room:
                continue
            state.confirmed = True
            seq: int = env["seq"]
            if state.last is None or seq > state.last:
                state.pending[seq] = env
                self._flush(room, state)

    def _flush(self, room: str, state: _Room) -> None:
        """Deliver pending events in seq order; fetch from history across a gap."""
        if state.last is None:
            return
        for seq in [s for s in state.pending if s <= state.last]:
            del state.pending[seq]
        while (env := state.pending.pop(state.last + 1, None)) is not None:
            state.last += 1
            self._deliver(env)
        if state.pending and not state.fetching:
            self._fetch(room, state, state.last, min(min(state.pending) - state.last, p.MAX_HISTORY_LIMIT))

    def _fetch(self, room: str, state: _Room, after: int, limit: int) -> None:
        """Ask history for events after ``after``; the reply goes through the room's pending set."""
        state.fetching = True
        rid = self._new_id()
        self._callbacks[rid] = lambda reply: self._on_gap_fill(room, reply)
        self._send({"type": "history", "room": room, "after": after, "limit": limit, "id": rid})

    def _on_gap_fill(self, room: str, reply: Envelope) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        state.fetching = False
        got = False
        if reply.get("type") == "history" and isinstance(reply.get("messages"), list):
            for env in reply["messages"]:
                if _is_event(env) and state.last is not None and env["seq"] > state.last:
                    state.pending.setdefault(env["seq"], env)
                    got = True
        top = reply.get("seq")
        if not got and state.pending and state.last is not None and isinstance(top, int) and top >= min(state.pending):
            # The broker is past the gap yet has nothing for it (only if its
            # store was lost): skip it rather than stall the room forever.
            state.last = min(state.pending) - 1
        self._flush(room, state)

    def _deliver(self, env: Envelope) -> None:
        if env.get("sender") == self.sender and env["type"] == "msg":
            return  # our own: shown once, when its ack arrived
        self._events.append(Event.from_envelope(env))


def _is_event(env: object) -> bool:
    return (
        isinstance(env, dict)
        and env.get("type") in ("msg", "presence")
        and isinstance(env.get("seq"), int)
        and isinstance(env.get("room"), str)
    )
