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
* A message is kept until acknowledged and resent with the same ``id`` after
  a timeout or a reconnect; the broker stores a given (name, id) once.
* It pings when quiet; a broker silent for 3 heartbeats, or one that no
  longer knows the session, is lost: the client opens fresh sockets, says
  hello again with its resume token (taking its old session back if the
  broker still has it), rejoins its rooms, fetches what it missed from
  history and resends what was not acknowledged. ``state`` tells where it
  is, and ``status`` events tell the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

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
#: An unacknowledged message is resent after this long (or 2 heartbeats, if longer).
ACK_RESEND_S = 5.0
#: How many ids of our own shown messages are remembered to drop their copies.
SHOWN_WINDOW = 10_000
#: After a ``rate_limited`` refusal, new and refused messages wait this long.
RATE_RETRY_S = 1.0


class ZchatError(Exception):
    """Base of every error this library raises; ``code`` and ``message`` say what went wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


class BrokerUnreachable(ZchatError):
    """The broker did not answer in time (not running, wrong address, gone, or reconnecting)."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)
        self.code = "unreachable"


class RequestError(ZchatError):
    """The broker refused a request (or it was refused before sending, for the same reason)."""


@dataclass(slots=True)
class Event:
    """Something to show: a room message or presence change, a DM, an error, or a
    ``status`` change of the connection (``event`` is "reconnecting" or "connected").

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
        elif self.type == "status":
            fields = ("event", "text")
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


#: Handshake "failures" that are only a connection dropping (ECONNRESET, EPIPE, ...).
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED, errno.ECONNREFUSED})

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
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise RequestError("bad_key", f"cannot read the secret key {secret_file}: {exc}") from None
        if not secret:
            raise RequestError("bad_key", f"{secret_file} holds no secret key (use the .key_secret file)")
        try:
            server, _ = zmq.auth.load_certificate(broker_public_file)
        except (OSError, ValueError) as exc:
            raise RequestError("bad_key", f"cannot read the broker key {broker_public_file}: {exc}") from None
        return cls(public, secret, server)


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
        sub_hwm: int = 10_000,
        curve: CurveKeys | None = None,
    ) -> None:
        """``sub_hwm`` bounds the room events queued locally; beyond it ZeroMQ drops
        them and the client fetches them from history instead (as after any gap).
        """
        if not p.is_name(name):
            raise RequestError(
                ErrorCode.BAD_NAME, f"{name!r} is not a name: use 1-32 of A-Z a-z 0-9 _ . -, not starting with . or -"
            )
        self.name = name
        self.endpoint = endpoint(host, port)
        self.pub_endpoint = endpoint(host, pub_port)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        #: "new", then "connected" / "reconnecting", finally "closed".
        self.state = "new"
        self.sender: str | None = None
        self.epoch: str | None = None
        self.heartbeat_ms = 5000
        self._sub_hwm = sub_hwm
        self._curve = curve
        self._auth_failure: str | None = None
        self._hold_until = 0.0
        self._rooms: dict[str, _Room] = {}
        self._monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}
        self._resume: str | None = None
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._poller = zmq.Poller()
        self._dealer, self._sub = self._open_sockets()
        self._encode = p.Encoder()
        self._id_prefix = secrets.token_hex(4)
        self._id_count = 0
        now = time.monotonic()
        self._last_send = now
        self._last_recv = now
        self._next_hello = now
        self._events: deque[Event] = deque()
        #: id -> reply, for requests someone is waiting on.
        self._replies: dict[str, Envelope | None] = {}
        #: id -> callback, for replies handled in the background.
        self._callbacks: dict[str, Callable[[Envelope], None]] = {}
        #: id -> request, for messages and DMs not yet acknowledged (in send order).
        self._unacked: dict[str, Envelope] = {}
        self._sent_at: dict[str, float] = {}
        #: ids of our own messages already shown, so no copy shows them again.
        self._shown: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Connect both sockets and say hello; raises BrokerUnreachable or RequestError."""
        try:
            welcome = self._request(p.hello(self.name), timeout=self.connect_timeout)
        except BrokerUnreachable:
            raise BrokerUnreachable(
                f"no answer from a zchat broker at {self.endpoint} within {self.connect_timeout:g} s"
            ) from None
        self._welcomed(welcome)

    def close(self, flush_timeout: float = 1.0) -> None:
        """Say bye (so the room sees the leave now, not at expiry) and release the sockets."""
        if self.state == "closed":
            return
        said_bye = False
        if self.state == "connected":
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.send(self._encode({"type": "bye"}), zmq.NOBLOCK)
                said_bye = True
        self.state = "closed"
        if said_bye:
            self._dealer.setsockopt(zmq.LINGER, int(flush_timeout * 1000))
        self._close_sockets()
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
        """Messages and DMs sent and not acknowledged yet (they are resent until they are)."""
        return len(self._unacked)

    # ------------------------------------------------------------- requests

    def join(self, room: str, backlog: int = 0) -> list[str]:
        """Join ``room``; queue its last ``backlog`` events; return its members."""
        room = p.parse_room(room)
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
                got = [m for m in reply["messages"] if _is_event(m) and after < m["seq"] <= top]
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
        """Send a room message without waiting; returns its id.

        The ack arrives as an own ``msg`` event. Until then the message is kept
        and resent (same id, so never stored twice) after a timeout or a
        reconnect. ``action=True`` sends an IRC-style ``/me``.
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

    def send_wait(self, room: str, text: str, timeout: float | None = None, *, action: bool = False) -> Event:
        """Send a room message and wait for its ack; returns the own ``msg`` event."""
        return self._wait_ack(self.send(room, text, action=action), timeout)

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

        Also keeps the session alive: pings when quiet, resends what is not
        acknowledged, notices a lost broker and reconnects (see the module
        docstring). ``fds`` are extra file descriptors to wait on (stdin, say);
        the ready ones are returned, so a program can wait on the chat and its
        own input at once.
        """
        if self.state == "closed":
            raise ZchatError("closed", "this client is closed")
        self._maintain()
        # Never sleep long: we must wake up in time to ping and to notice loss.
        cap = min(self.heartbeat_ms, 1000)
        poll_ms = cap if timeout is None else min(cap, max(0, int(timeout * 1000)))
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
        return [fd for fd in fds if fd in ready]

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
            if self._curve is not None:
                sock.curve_publickey = self._curve.public
                sock.curve_secretkey = self._curve.secret
                sock.curve_serverkey = self._curve.server_public
            self._poller.register(sock, zmq.POLLIN)
            # Handshake outcomes: a refused key must be an error, not a silent hang.
            monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            self._monitors[monitor] = sock
            self._poller.register(monitor, zmq.POLLIN)
        dealer.connect(self.endpoint)
        sub.connect(self.pub_endpoint)
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
            sock.close(linger=0)

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        sock = self._monitors.get(monitor)
        before = self._auth_failure
        try:
            self._read_monitor(monitor, sock)
        finally:
            if self._auth_failure and self._auth_failure != before:
                self._events.append(Event(type="error", code="auth_failed", message=self._auth_failure))
                # Refused on a reconnect (say, our key was revoked): we are not connected.
                self._lost("the broker refused our key")

    def _read_monitor(self, monitor: zmq.Socket[bytes], sock: zmq.Socket[bytes] | None) -> None:
        while sock is not None:
            try:
                message = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = message["event"]
            if (
                self.state != "new"
                and event != zmq.EVENT_HANDSHAKE_FAILED_AUTH
                and message.get("value") in _TRANSIENT_ERRNOS
            ):
                # Once we have been in, a connection dying mid-handshake (a broker
                # restart, a proxy) is not a key problem: the reconnect goes on.
                continue
            where = self.endpoint if sock is self._dealer else self.pub_endpoint
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._auth_failure = None
                if sock is self._sub:
                    # A (re)connected SUB may have missed events while it was away.
                    for state in self._rooms.values():
                        state.confirmed, state.probes, state.next_probe = False, 0, time.monotonic()
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._auth_failure = f"the broker at {where} does not accept our key (is it in its authorized/?)"
            elif self._curve is not None:
                self._auth_failure = (
                    f"the CURVE handshake with {where} failed: is the broker key the broker's public key?"
                )
            else:
                self._auth_failure = f"the broker at {where} requires CURVE keys (--key and --broker-key)"

    def _welcomed(self, welcome: Envelope) -> None:
        restarted = self.epoch is not None and welcome["epoch"] != self.epoch
        self.sender = welcome["sender"]
        self.epoch = welcome["epoch"]
        self.heartbeat_ms = max(100, int(welcome["heartbeat_ms"]))
        token = welcome.get("resume")
        self._resume = token if isinstance(token, str) else None
        self._last_recv = time.monotonic()
        was = self.state
        self.state = "connected"
        if was == "reconnecting":
            how = "broker restarted" if restarted else ("session resumed" if welcome.get("resumed") else "new session")
            self._status("connected", f"reconnected to {self.endpoint} ({how})")

    def _status(self, state: str, text: str) -> None:
        self._events.append(Event(type="status", event=state, text=text))

    def _maintain(self) -> None:
        """Timers: ping when quiet, notice a silent broker, retry hello, resend, probe."""
        now = time.monotonic()
        hb = self.heartbeat_ms / 1000
        if self.state == "connected":
            if now - self._last_recv > 3 * hb:
                self._lost(f"no answer from {self.endpoint} for {now - self._last_recv:.0f} s")
            else:
                if now - self._last_send >= hb:
                    self._send({"type": "ping"})
                self._resend(now - max(ACK_RESEND_S, 2 * hb))
                self._probe_rooms(now)
        if self.state == "reconnecting" and now >= self._next_hello:
            self._next_hello = now + max(1.0, min(self.connect_timeout, 3 * hb))
            rid = self._new_id()
            self._callbacks[rid] = self._on_rehello
            self._send(p.hello(self.name, rid, self._resume))

    def _lost(self, why: str) -> None:
        """The broker is gone or has forgotten us: start over on fresh sockets."""
        if self.state != "connected":
            return
        self.state = "reconnecting"
        self._status("reconnecting", f"connection lost ({why}); reconnecting")
        # Fresh sockets: a half-dead TCP connection could hold our requests for
        # minutes; anything queued on the old ones is resent after the hello.
        self._close_sockets()
        self._dealer, self._sub = self._open_sockets()
        for rid in [r for r in self._replies if self._replies[r] is None]:
            self._replies[rid] = {"type": "error", "code": "unreachable", "message": f"connection lost ({why})"}
        self._callbacks.clear()
        for state in self._rooms.values():
            state.fetching = False
        self._next_hello = time.monotonic()

    def _on_rehello(self, reply: Envelope) -> None:
        if self.state != "reconnecting":
            return
        if reply["type"] != "welcome":
            # name_taken: someone else holds our name now; keep trying (they may leave).
            self._events.append(Event.from_envelope(reply))
            return
        self._welcomed(reply)
        for room in self._rooms:
            rid = self._new_id()
            self._callbacks[rid] = lambda r, room=room: self._on_rejoin(room, r)  # type: ignore[misc]
            self._send({"type": "join", "room": room, "id": rid})
        self._resend(time.monotonic())

    def _on_rejoin(self, room: str, reply: Envelope) -> None:
        state = self._rooms.get(room)
        if state is None or state.last is None:
            return
        if reply["type"] != "joined":
            self._events.append(Event.from_envelope(reply))
            return
        top = reply["seq"]
        if top < state.last:
            # The broker lost its store: its numbering starts again below ours.
            state.last = top
            state.pending.clear()
        elif top > state.last and not state.fetching:
            self._fetch(room, state, state.last, min(top - state.last, p.MAX_HISTORY_LIMIT))

    def _resend(self, sent_before: float) -> None:
        if time.monotonic() < self._hold_until:
            return  # rate limited: wait, then send everything held, in order
        for rid, env in self._unacked.items():
            if self._sent_at.get(rid, 0.0) <= sent_before:
                self._send(env)
                self._sent_at[rid] = time.monotonic()

    # ------------------------------------------------------------ internals

    def _new_id(self) -> str:
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:x}"

    def _send(self, env: Envelope) -> None:
        self._dealer.send(self._encode(env))
        self._last_send = time.monotonic()

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

    def _send_tracked(self, env: Envelope) -> str:
        rid = env["id"] = self._new_id()
        self._unacked[rid] = env
        held = any(at == 0.0 for at in self._sent_at.values()) if self._hold_until else False
        if self.state == "connected" and time.monotonic() >= self._hold_until and not held:
            self._send(env)
            self._sent_at[rid] = time.monotonic()
        else:
            # Goes out with the next resend (after a welcome, or after a rate-limit
            # hold), behind the held ones: a newer line never overtakes an older one.
            self._sent_at[rid] = 0.0
        return rid

    def _acked(self, rid: str) -> Envelope | None:
        self._sent_at.pop(rid, None)
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
            if remaining <= 0:
                raise BrokerUnreachable(f"no ack from {self.endpoint} within the timeout")
            self.pump(remaining)

    def _request(self, env: Envelope, timeout: float | None = None) -> Envelope:
        """Send a request and pump until its reply; other traffic is queued meanwhile."""
        if self.state not in ("new", "connected"):
            raise BrokerUnreachable(f"not connected to {self.endpoint} ({self.state})")
        rid = env["id"] = self._new_id()
        self._replies[rid] = None
        try:
            self._send(env)
            deadline = time.monotonic() + (self.request_timeout if timeout is None else timeout)
            while (reply := self._replies[rid]) is None:
                if self._auth_failure:
                    raise RequestError("auth_failed", self._auth_failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnreachable(f"no reply from {self.endpoint} to {env['type']!r}")
                self.pump(remaining)
        finally:
            self._replies.pop(rid, None)
        if reply["type"] == "error":
            if reply.get("code") == "unreachable":
                raise BrokerUnreachable(str(reply.get("message")))
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
            self._last_recv = time.monotonic()
            self._on_direct(env)

    def _on_direct(self, env: Envelope) -> None:
        kind = env["type"]
        if kind == "dm":
            # Before any id matching: a DM's id is its author's, and must never be
            # mistaken for the reply to one of our requests.
            if env.get("sender") != self.sender:  # a DM to ourselves shows once, on its ack
                self._events.append(Event.from_envelope(env))
            return
        rid = env.get("id")
        if kind == "error" and env.get("code") == ErrorCode.NOT_REGISTERED and self.state == "connected":
            # The broker no longer knows us (it restarted, or expired us while we
            # were stopped): whatever this was, it is redone after a new hello.
            self._lost("the broker has ended our session")
            return
        if isinstance(rid, str):
            if rid in self._replies:
                self._replies[rid] = env
                return
            callback = self._callbacks.pop(rid, None)
            if callback is not None:
                callback(env)
                return
            if kind == "error" and env.get("code") == ErrorCode.RATE_LIMITED and rid in self._unacked:
                # Not lost, only early: hold new sends, then resend in order.
                self._hold_until = time.monotonic() + RATE_RETRY_S
                self._sent_at[rid] = 0.0
                return
            if kind in ("ack", "error") and rid in self._unacked:
                sent = self._acked(rid)
                assert sent is not None
                self._events.append(Event.from_envelope(env) if kind == "error" else self._own_event(sent, env))
                return
        if kind == "error":
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
        if state.pending and not state.fetching and self.state == "connected":
            self._fetch(room, state, state.last, min(min(state.pending) - state.last, p.MAX_HISTORY_LIMIT))

    def _fetch(self, room: str, state: _Room, after: int, limit: int) -> None:
        """Ask history for events after ``after``; the reply goes through the room's pending set."""
        state.fetching = True
        rid = self._new_id()
        self._callbacks[rid] = lambda reply: self._on_fetched(room, reply)
        self._send({"type": "history", "room": room, "after": after, "limit": limit, "id": rid})

    def _on_fetched(self, room: str, reply: Envelope) -> None:
        state = self._rooms.get(room)
        if state is None or state.last is None:
            return
        state.fetching = False
        if reply.get("type") != "history" or not isinstance(reply.get("messages"), list):
            return
        got = False
        for env in reply["messages"]:
            if _is_event(env) and env["seq"] > state.last:
                state.pending.setdefault(env["seq"], env)
                got = True
        top = reply.get("seq")
        top = top if isinstance(top, int) else state.last
        if not got and top > state.last:
            # The broker is past what we have yet gives us nothing for it (only
            # if its store was lost): skip rather than stall the room forever.
            state.last = min([top, *state.pending]) - (1 if state.pending else 0)
        self._flush(room, state)
        if not state.fetching and not state.pending and state.last < top:
            # One page of a longer catch-up (after a reconnect): ask for the next.
            self._fetch(room, state, state.last, min(top - state.last, p.MAX_HISTORY_LIMIT))

    def _deliver(self, env: Envelope) -> None:
        if env["type"] == "msg" and env.get("from") == self.name:
            rid = env.get("id")
            if isinstance(rid, str) and rid in self._unacked:
                # Stored, but the ack was lost (broker crash): this is our ack.
                sent = self._acked(rid)
                assert sent is not None
                self._events.append(self._own_event(sent, env))
                return
            if env.get("sender") == self.sender or rid in self._shown:
                return  # our own, shown once when its ack arrived
        self._events.append(Event.from_envelope(env))


def _is_event(env: object) -> bool:
    return (
        isinstance(env, dict)
        and env.get("type") in ("msg", "presence")
        and isinstance(env.get("seq"), int)
        and isinstance(env.get("room"), str)
    )
