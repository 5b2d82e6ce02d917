"""The broker's decisions: sessions, names, rooms, ``seq``, who may do what.

Pure: state in, actions out. No sockets, no store, no clock of its own. The
socket loop (``broker.server``) feeds it frames with the time, persists the
events it publishes, and only then performs the actions in order.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

from zchat import protocol as p
from zchat.protocol import Envelope, ErrorCode, ProtocolError

log = logging.getLogger("zchat.broker")

#: How many (name, id) pairs of recent messages are remembered so that a
#: resent message is acknowledged again instead of stored twice.
DEDUP_WINDOW = 100_000
#: ``rooms`` lists at most this many rooms.
MAX_ROOMS_LISTED = 1000
#: ``joined`` and ``who`` list at most this many members (the first by name), some
#: 340 KB: a room's whole list could pass the 2 MiB a client takes in one reply
#: (p.MAX_REPLY_BYTES; ~60,000 names of 32 characters), and ``--max-sessions`` allows more.
MAX_MEMBERS_LISTED = 10_000
#: Hosts whose ended sessions' unread large replies are owed (see Core._owe) before the
#: ones paid off are swept.
MAX_DEBTS = 10_000
#: A DM handed to a connection is kept for a session's expiry and this much (ms), to be
#: sent again if the session is resumed on a new connection (see Core._keep_dm): a dead
#: connection is given up by its client within the expiry, and its reconnect takes a
#: few seconds more at most.
DM_KEPT_EXTRA_MS = 5_000
#: At most this much (each DM's text and DM_KEPT_OVERHEAD) is kept per session for
#: that, and for at most DM_KEPT_MAX_MS (a long --heartbeat-ms would keep them for hours).
DM_KEPT_BYTES = 256 * 1024
DM_KEPT_OVERHEAD = 512
DM_KEPT_MAX_MS = 65_000
#: After a DM to someone was refused (undelivered, or no_such_user to a name that may be
#: on its way back), the author's later DMs to them are refused until it is resent and
#: handed over, or until this long (ms) after its last refusal: clients ask again every
#: second (see Core._dm_held).
DM_HOLD_MS = 3_000
#: Recipients a session's DMs may wait for at once (see DM_HOLD_MS).
DM_HOLDS_MAX = 64
#: A session heard from within a heartbeat and this much is taken to have a client
#: connected now (clients ping every heartbeat; this allows for a late one).
HEARTBEAT_SLACK_MS = 1000


# Actions are NamedTuples, not frozen dataclasses: several are made per
# message on the hot path, and a tuple is several times cheaper to build.


class Reply(NamedTuple):
    """Send ``env`` to one connection over ROUTER."""

    identity: bytes
    env: Envelope


class Publish(NamedTuple):
    """Store ``env`` (a room event with a fresh ``seq``), then fan it out over PUB."""

    room: str
    env: Envelope


class HistoryQuery(NamedTuple):
    """Answer a ``history`` request from the store, once this batch is committed."""

    identity: bytes
    room: str
    after: int
    limit: int
    request_id: str | None
    #: The room's last seq when the request was read: the reply covers up to
    #: there (what came later may not be stored yet when it is answered).
    top: int


class Direct(NamedTuple):
    """A DM: send ``env`` to the recipient's connection over ROUTER, then ``ack`` to its
    author; or, if that connection could not take it, :meth:`Core.undelivered`'s error."""

    identity: bytes
    env: Envelope
    author: bytes
    ack: Envelope


Action = Reply | Publish | HistoryQuery | Direct

#: What resend detection remembers of a message: its id, seq (None for a DM) and
#: ts, where it went (room, or "@" + recipient as spelt: :func:`dm_where`) and the hash of its text (None
#: when reloaded from the store). Only atoms, never the ack dict itself: a tuple
#: of atoms is untracked by the first collection that sees it, so 100k of them cost
#: no GC time (holding dicts, they made full collections pause the loop for ~65 ms).
#: The loop runs that collection after every pass (see Broker._serve).
_Acked = tuple[str, int | None, int, str, int | None]
#: The resend window's dicts (see AckWindow); a power of two.
WINDOW_SHARDS = 64


#: Held by every dict of the resend window under a key no message has (None). A
#: dict that holds a tracked object (a list is one) stays tracked by the garbage
#: collector, so the broker's ``gc.freeze()`` at start (broker.cli) takes it in and
#: no collection walks it again, whatever it comes to hold. Without it, an empty
#: dict is untracked (the full collection before the freeze untracks it), becomes
#: tracked, young, at its first entry, and every full collection walked all
#: 100,000 entries of the window (2-4 ms each).
_PIN: list[None] = []


def _pinned_dict() -> dict[tuple[str, str], _Acked]:
    shard: dict[Any, Any] = {None: _PIN}
    return shard


def dm_where(to: str) -> str:
    """Where a DM to ``to`` went, as resend detection compares it: the window keeps the
    recipient as its owner spells it (``"@" + name``, for the resent ack's ``to``), a
    resend names it as its author typed it, and names that differ only in case are one."""
    return "@" + p.name_key(to)


class AckWindow:
    """What resend detection remembers of the last ``size`` messages, by (name, id).

    Not one dict: a dict that takes an entry and drops its oldest at every
    message rebuilds its whole table every so often, at once. With 100,000
    entries an OrderedDict did so every ~250,000 messages and took 8-12 ms,
    every message of the moment waiting behind it (``python -m bench.micro
    window``). Here the entries are spread over WINDOW_SHARDS dicts by the
    key's hash, so a rebuild is that much shorter, and a ring of the keys keeps
    their order for eviction.
    """

    __slots__ = ("_ring", "_shards", "_stale", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._shards = [_pinned_dict() for _ in range(WINDOW_SHARDS)]
        self._ring: deque[tuple[str, str]] = deque()
        #: Keys forgotten while their place in the ring is still ahead, with how
        #: many such places: an eviction that reaches one has nothing to drop,
        #: above all not the same key remembered again since.
        self._stale: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._ring) - sum(self._stale.values())

    def get(self, key: tuple[str, str]) -> _Acked | None:
        return self._shards[hash(key) & (WINDOW_SHARDS - 1)].get(key)

    def put(self, key: tuple[str, str], acked: _Acked) -> None:
        """Remember ``key``, which :meth:`get` has just not found; past ``size`` keys, forget the oldest."""
        self._shards[hash(key) & (WINDOW_SHARDS - 1)][key] = acked
        ring = self._ring
        ring.append(key)
        if len(ring) > self.size:
            old = ring.popleft()
            stale = self._stale
            if stale and old in stale:
                if stale[old] == 1:
                    del stale[old]
                else:
                    stale[old] -= 1
            else:
                self._shards[hash(old) & (WINDOW_SHARDS - 1)].pop(old, None)

    def forget(self, key: tuple[str, str]) -> None:
        if self._shards[hash(key) & (WINDOW_SHARDS - 1)].pop(key, None) is not None:
            self._stale[key] = self._stale.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class Limits:
    """What one session may do; exceeding a limit costs the abuser only (a coded error).

    The defaults never trip a person typing, or pasting a screenful of lines.
    A rate of 0 turns that bucket off (benchmarks, trusted bots).
    """

    #: Sustained messages + DMs per second, and the burst allowed above it.
    rate: float = 10.0
    burst: int = 50
    #: Sustained joins + leaves per second, and their burst.
    join_rate: float = 2.0
    join_burst: int = 20
    max_sessions: int = 10_000
    #: Live sessions whose hello came from one network address (0: no limit). A session
    #: outlives its connection for 3 heartbeats, so without it one host that says hello
    #: on short connections, ~700 a second, keeps the broker full and everyone else out.
    max_sessions_per_host: int = 100
    max_rooms: int = 100
    #: Longest text accepted (at most the protocol's MAX_TEXT_CHARS).
    max_text: int = p.MAX_TEXT_CHARS
    #: Bytes of ``history`` and ``rooms`` replies, and of member lists (``who``, ``joined``),
    #: per second, and the burst above it: what a session that asks and never reads the
    #: replies can make the broker queue for it. A catch-up of 100 busy rooms fits in the burst.
    history_bytes: float = 1024 * 1024
    history_burst: int = 32 * 1024 * 1024


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    tokens: float
    stamp: int

    def refill(self, now: int, rate: float, burst: int) -> float:
        """The tokens at ``now`` (ms), saved up since the last refill."""
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate / 1000)
        self.stamp = now
        return self.tokens

    def take(self, now: int, rate: float, burst: int) -> bool:
        if rate <= 0:
            return True
        if self.refill(now, rate, burst) < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(slots=True)
class DmHold:
    """A refused DM that its author's later DMs to the same person wait for (Core._dm_held)."""

    held_id: str
    #: Until then (ms): a client that gave it up does not send it again.
    until: int
    #: Sent again, and decided to be handed over in the pass now being decided: the ones
    #: after it in that pass are decided too, and handed over only if it was (the loop asks).
    resent: bool = False


@dataclass(slots=True)
class Session:
    identity: bytes
    name: str
    sender: str
    #: Secret: whoever presents it in a hello takes this session over.
    token: str
    last_seen: int
    sends: Bucket
    joins: Bucket
    #: In bytes of history replies; charged after the reply is built (see charge_history).
    history: Bucket | None = None
    rooms: set[str] = field(default_factory=set)
    #: The id of a message refused by the rate limit: the session's other messages and
    #: DMs are refused until it is accepted, or until ``held_until`` (ms). See _throttle_send.
    #: Or refused ``unavailable`` (the disk alarm): then its other room messages only.
    held_id: str | None = None
    held_until: int = 0
    held_code: ErrorCode = ErrorCode.RATE_LIMITED
    held_dms: bool = True
    #: The network address its hello came from (None: not known, as over ipc).
    host: str | None = None
    #: Of a session restored at start (:meth:`Core.restore`), until its client resumes it:
    #: the SHA-256 of its token, all the store keeps of it (``token`` is empty meanwhile).
    token_sha256: bytes | None = None
    #: Bytes of large replies sent to this session, and of those its client said it has
    #: read (a request's ``read``: the highest ``mark`` it got); see Core._note_read.
    bulk_sent: int = 0
    bulk_read: int = 0
    #: DMs handed to its connection lately, (ts, event), oldest first (see Core._keep_dm):
    #: sent again when the session is resumed on a new connection.
    recent_dms: deque[tuple[int, Envelope]] | None = None
    recent_dm_bytes: int = 0
    #: Recipient (name_key) -> this session's DM to them that was refused, which its
    #: later ones to them wait for. See Core._dm_held.
    dm_holds: dict[str, DmHold] | None = None


def _held_text(to: str, behind: str) -> str:
    return f"not delivered: an earlier DM of yours to {to} (id {behind!r}) was not, and goes first; resend it"


def _token_fits(holder: Session, token: str) -> bool:
    """Whether ``token`` (untrusted) is ``holder``'s resume token."""
    # Bytes, not str: compare_digest refuses non-ASCII str.
    presented = token.encode()
    if holder.token_sha256 is None:
        return secrets.compare_digest(presented, holder.token.encode())
    return secrets.compare_digest(hashlib.sha256(presented).digest(), holder.token_sha256)


def _kept_size(event: Envelope) -> int:
    """What a kept DM is counted as: its text and the objects around it."""
    return len(event["text"]) + DM_KEPT_OVERHEAD


def _bytes_text(count: int) -> str:
    """``300 bytes``, ``12.5 KiB``, ``33.0 MiB``."""
    if count < 1024:
        return f"{count} bytes"
    return f"{count / 1024:.1f} KiB" if count < 1024 * 1024 else f"{count / 1048576:.1f} MiB"


def sessions_text(count: int) -> str:
    """``1 session``, ``3 sessions``: for log lines."""
    return f"{count} session{'' if count == 1 else 's'}"


class SavedSession(NamedTuple):
    """A session as a clean stop leaves it in the store, for the next start to restore."""

    name: str
    sender: str
    token_sha256: bytes
    host: str | None
    rooms: list[str]
    #: With --keys, the z85 public key the name had when it was saved (the broker's, not
    #: the core's concern: a restored user whose key changed or went is not restored).
    key: bytes | None = None


#: The connection of a restored session until its client resumes it: none. A peer may
#: choose any routing id, but not an empty one, so nothing sent to it reaches anyone;
#: and nothing is sent to it (a DM to a restored session is ``no_such_user``), nor is a
#: restored session found by connection (see Core._restored).
NO_CONNECTION: Final = b""


class PeerInfo(Protocol):
    """What the socket loop knows of a message's connection (a ``zmq.Frame``)."""

    def get(self, option: str, /) -> object: ...


def _peer_host(meta: PeerInfo | None) -> str | None:
    """The host a message came from, as ``max_sessions_per_host`` counts it, or None (not
    TCP, or not known): see :func:`host_of`."""
    if meta is None:
        return None
    try:
        host = meta.get("Peer-Address")
    except Exception:  # (zmq.ZMQError, not importable here) no such property: ipc, inproc
        return None
    if not isinstance(host, str) or not host:
        return None
    return host_of(host)


def host_of(address: str) -> str:
    """A peer's host, from its address, as the per-host limits count it: an IPv4 address
    (also one mapped into IPv6), or an IPv6 /64 (one host is usually given a whole /64,
    and may use any address in it)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # (without a zone: fe80::1%eth0)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


def rooms_full(most: int) -> str:
    """The refusal of a join past --max-rooms."""
    return f"already in {most} room{'' if most == 1 else 's'}; leave one first"


def _ident(identity: bytes) -> str:
    """A connection in the log: its routing id, or what a restored session has instead."""
    return identity.hex() if identity != NO_CONNECTION else "restored from the last stop"


#: Most log lines a second of one kind (rejected inputs, connections, dropped
#: replies); the rest are counted in a summary line, so a flood cannot fill the disk.
LOG_LINES_PER_S = 20


#: Refusals a working chat gives every day, logged at info: a DM to someone offline (or
#: reconnecting: the client sends it again), a name in use, a session that expired while
#: its client slept, a room left, a limit doing its job. Every other refusal means a
#: client that breaks the protocol (a bug, or an attack): a warning.
_ROUTINE_REFUSALS: Final = frozenset(
    {
        ErrorCode.NAME_TAKEN,
        ErrorCode.NO_SUCH_USER,
        ErrorCode.NOT_JOINED,
        ErrorCode.NOT_REGISTERED,
        ErrorCode.RATE_LIMITED,
    }
)


class _Refused(ProtocolError):
    """A refusal the broker has already said in its log once for all (the disk alarm's
    WARNING): logged per request at debug only."""


class _HeldBack(ProtocolError):
    """A message refused because an earlier one of its session was (rate_limited) and
    has not come back yet. Said to the client as any refusal, but logged at debug: the
    refusal it follows is the info line, and a client streaming above the limit (a log
    piped into a room) sends a window of them each second, which filled the log at its
    20 lines a second for as long as it streamed."""


class LogBudget:
    """At most :data:`LOG_LINES_PER_S` log lines a second of one kind (``what``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.second = 0
        self.used = 0
        self.dropped = 0
        self.dropped_level = logging.DEBUG

    def allow(self, second: int, level: int = logging.WARNING) -> bool:
        """Whether a line of ``level`` may be logged in ``second``. The count of those
        left out is logged at the highest level among them: a summary of info lines is
        no warning (and is not shown where they would not have been)."""
        if second != self.second:
            if self.dropped:
                log.log(self.dropped_level, "... and %d more %s not logged", self.dropped, self.what)
            self.second, self.used, self.dropped, self.dropped_level = second, 0, 0, logging.DEBUG
        self.used += 1
        if self.used > LOG_LINES_PER_S:
            self.dropped += 1
            self.dropped_level = max(self.dropped_level, level)
            return False
        return True


class Core:
    """All broker state and every rule of DESIGN.md's "Rules the broker enforces"."""

    def __init__(
        self,
        *,
        epoch: str,
        heartbeat_ms: int,
        room_seqs: dict[str, int] | None = None,
        recent_acks: Iterable[Envelope] = (),
        limits: Limits | None = None,
        authenticated: bool = False,
        new_sender: Callable[[], str] = lambda: secrets.token_hex(8),
        new_token: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    ) -> None:
        self.epoch = epoch
        self.heartbeat_ms = heartbeat_ms
        self.expiry_ms = 3 * heartbeat_ms
        self.limits = limits or Limits()
        #: With CURVE on, every request carries the name its key belongs to.
        self.authenticated = authenticated
        self._log_budget = LogBudget("rejected inputs")
        self._refusals_log = LogBudget("refused requests")
        #: Live sessions per network address, and the address of the hello being handled.
        self._hosts: dict[str, int] = {}
        self._hello_host: str | None = None
        self._session_lines = LogBudget("session lines")
        #: Signs the marks of large replies (see _mark): new at each start, as sessions are.
        self._mark_key = secrets.token_bytes(16)
        #: host -> (bytes, ms): large replies its ended or moved sessions were sent and did
        #: not say they read, paid off at the budget's rate from that time (see _owe).
        self._debts: dict[str, tuple[float, int]] = {}
        #: The latest time we were given (ms), for log throttling: no clock of our own.
        self._clock = 0
        self._new_sender = new_sender
        self._new_token = new_token
        #: room -> last seq given out (continues what the store holds).
        self.seqs: dict[str, int] = dict(room_seqs or {})
        self.by_identity: dict[bytes, Session] = {}
        #: Live sessions by their name as spelt: see :meth:`named` for any spelling.
        self.by_name: dict[str, Session] = {}
        #: The same sessions by p.name_key(name) (names are unique regardless of case).
        self._by_key: dict[str, Session] = {}
        #: Sessions restored at start (:meth:`restore`) whose clients have not resumed
        #: them yet, by name: they have no connection, so they are not in ``by_identity``.
        self._restored: dict[str, Session] = {}
        #: room -> name -> session, for membership checks, who and presence.
        self.members: dict[str, dict[str, Session]] = {}
        #: Every room's name, sorted: a ``rooms`` request lists the first ones. Rooms are
        #: never deleted, and a member's room has a seq from its join on: a room is added
        #: here when it gets its first seq, in its place (a flood of ``rooms`` requests,
        #: or of joins and leaves, must not sort 20,000 names again at every request).
        self._room_index: list[str] = sorted(self.seqs)
        #: While set (the server's disk alarm: the store's disk is nearly full), room
        #: messages are refused ``unavailable`` with this text: nothing is given a seq
        #: that could not be stored. Presence events still are (a leave cannot be
        #: refused); they are small, and the alarm's floor leaves room for them.
        self.store_refusal: str | None = None
        #: (name, id) -> the ack first given for that message.
        self._acked = AckWindow(DEDUP_WINDOW)
        #: (name, id) of the DMs decided and not yet handed over by the loop (see _resent),
        #: with the connection that sent one again meanwhile (None until one does): added
        #: as a Direct is made, taken out by delivered() or undelivered().
        self._dms_deciding: dict[tuple[str, str], bytes | None] = {}
        for ack in recent_acks:  # oldest first, as the store hands them over
            # A message stored twice (its resend came after the window had passed the
            # first copy) was acked live with its second copy's ack from then on: so
            # after a restart too. (The window takes no key it holds: forget it first.)
            self._acked.forget((ack["from"], ack["id"]))
            self._remember_ack(ack.pop("from"), ack, ack["room"], None)
        self._handlers: dict[str, Callable[[Session, Envelope, int], list[Action]]] = {
            "join": self._join,
            "leave": self._leave,
            "msg": self._msg,
            "dm": self._dm,
            "history": self._history,
            "who": self._who,
            "rooms": self._rooms,
            "ping": self._ping,
            "bye": self._bye,
        }

    # ------------------------------------------------------------------ input

    def handle(
        self, identity: bytes, frame: bytes, now: int, user: str | None = None, meta: PeerInfo | None = None
    ) -> list[Action]:
        """One envelope frame from ``identity`` at time ``now`` (ms).

        ``user`` is the name the connection's CURVE key belongs to (ZeroMQ's
        ``User-Id``); when the broker runs with keys it is the only name that
        connection may use. ``meta`` tells the connection's address, asked for
        only by a ``hello`` (``max_sessions_per_host``).
        """
        self._clock = now
        try:
            env = p.decode_request(frame)
        except ProtocolError as exc:
            session = self.by_identity.get(identity)
            if session is not None:
                session.last_seen = now  # wrong, but alive
            return self.reject(identity, exc)
        kind: str = env["type"]
        session = self.by_identity.get(identity)
        if self.authenticated and not user:
            return self.reject(identity, ProtocolError(ErrorCode.NOT_REGISTERED, "not authenticated", env.get("id")))
        if kind == "hello":
            if session is not None and (not user or session.name == user):
                session.last_seen = now  # a request of the session's connection, refused or not
            if user and env["name"] != user:
                return self.reject(
                    identity,
                    ProtocolError(
                        ErrorCode.BAD_NAME,
                        f"your key belongs to {user!r}; you cannot be {env['name']!r}",
                        env.get("id"),
                    ),
                )
            self._hello_host = _peer_host(meta)
            return self._hello(identity, session, env, now)
        if session is None and kind == "ping":
            # A liveness probe (the container healthcheck, every 10 s): answered
            # with the usual error, which proves the broker decodes and replies,
            # but not worth a warning line each time.
            log.debug("ping without a session from %s", _ident(identity))
            answer = p.error(ErrorCode.NOT_REGISTERED, "say hello before 'ping'", env.get("id"))
            if self.store_refusal is not None:
                # So that the health check can say it: a broker that answers but takes no
                # room messages. Only the word: its free space and --data are the log's.
                answer["alarm"] = "disk"
            return [Reply(identity, answer)]
        if session is None or (user and session.name != user):
            # (A connection that took over a departed peer's routing id is not that peer.)
            return self.reject(
                identity,
                ProtocolError(ErrorCode.NOT_REGISTERED, f"say hello before {kind!r}", env.get("id")),
            )
        session.last_seen = now
        if session.bulk_sent != session.bulk_read and "read" in env:
            self._note_read(session, env["read"])
        try:
            return self._handlers[kind](session, env, now)
        except ProtocolError as exc:
            exc.request_id = env.get("id")
            return self.reject(identity, exc)

    def several_frames(self, identity: bytes, now: int) -> list[Action]:
        """A request of more than one frame (the loop has read them all): refused, and, as
        any refused request of a session's connection, proof that its client is there."""
        self._clock = now
        session = self.by_identity.get(identity)
        if session is not None:
            session.last_seen = now
        return self.reject(identity, ProtocolError(ErrorCode.BAD_ENVELOPE, "expected exactly one frame"))

    def reject(self, identity: bytes, exc: ProtocolError) -> list[Action]:
        """Answer bad input with a coded error; the one log line per rejected input
        (at most LOG_LINES_PER_S a second, so a flood cannot fill the disk)."""
        # Two budgets: a client that keeps itself rate_limited must not use up the lines
        # that would show another's protocol violations; and a line not shown at this
        # --log-level spends none.
        routine = exc.code in _ROUTINE_REFUSALS
        level, budget = (logging.INFO, self._refusals_log) if routine else (logging.WARNING, self._log_budget)
        if isinstance(exc, (_HeldBack, _Refused)):
            level = logging.DEBUG
        if log.isEnabledFor(level) and budget.allow(self._clock // 1000, level):
            session = self.by_identity.get(identity)
            who = session.name if session else "-"
            what = "rejected input" if level == logging.WARNING and exc.code != ErrorCode.LIMIT_REACHED else "refused"
            log.log(level, "%s from %s (%s): %s: %s", what, _ident(identity), who, exc.code, exc.message)
        return [Reply(identity, exc.to_envelope())]

    def _log_session(self, now: int, line: str, *args: object) -> None:
        """A session's start, resume or end: at most LOG_LINES_PER_S lines a second, or a
        client that says hello and bye in a loop (no limit charges either) fills the disk."""
        if log.isEnabledFor(logging.INFO) and self._session_lines.allow(now // 1000, logging.INFO):
            log.info(line, *args)

    def expire(self, now: int) -> list[Action]:
        """End the sessions that have been silent for 3 x heartbeat."""
        deadline = now - self.expiry_ms
        stale = [s for s in self.by_identity.values() if s.last_seen < deadline]
        if self._restored:
            stale += [s for s in self._restored.values() if s.last_seen < deadline]
        actions: list[Action] = []
        for session in stale:
            self._log_session(now, "session expired: %s (%s)", session.name, _ident(session.identity))
            actions.extend(self._end(session, now, "timeout"))
        return actions

    def clock_stepped(self, step_ms: int) -> None:
        """The clock ``now`` is read from jumped by ``step_ms`` (an NTP step, a VM resumed,
        a hand setting it): every time kept for a timer moves by as much.

        The loop's clock stamps events, so it is the wall clock, and it may jump. Without
        this, a clock set back an hour left every session's rate limit an hour in debt
        (all its messages refused ``rate_limited``) and a dead session holding its name an
        hour longer; set forward, it expired every session at the next tick. Silence, rate
        limits, holds and debts keep their pace instead; events are stamped with the
        clock as it now reads.
        """
        self._clock += step_ms
        for session in itertools.chain(self.by_identity.values(), self._restored.values()):
            session.last_seen += step_ms
            session.sends.stamp += step_ms
            session.joins.stamp += step_ms
            if session.history is not None:
                session.history.stamp += step_ms
            if session.held_until:
                session.held_until += step_ms
            if session.recent_dms:
                session.recent_dms = deque((ts + step_ms, event) for ts, event in session.recent_dms)
            for hold in (session.dm_holds or {}).values():
                hold.until += step_ms
        self._debts = {host: (owed, at + step_ms) for host, (owed, at) in self._debts.items()}

    def unheard(self, gap_ms: int) -> None:
        """The loop read nothing for ``gap_ms`` (its process was stopped, the machine paused
        or starved of CPU): that silence was the broker's, not the sessions'.

        Their pings of the moment wait unread in the sockets, and libzmq reads them
        only once the process runs again, after the loop's first pass. Without this, a
        broker stopped for longer than the expiry period ended every session on waking
        (everyone seen to leave "timed out" and join again, their resumes refused);
        now each session's silence counts only while the broker could hear it.
        """
        for session in itertools.chain(self.by_identity.values(), self._restored.values()):
            session.last_seen += gap_ms

    def room_seq(self, room: str) -> int:
        return self.seqs.get(room, 0)

    def revoke(self, names: Iterable[str], now: int) -> list[Action]:
        """End the live sessions of users whose keys were withdrawn."""
        actions: list[Action] = []
        for name in names:
            session = self.by_name.get(name)
            if session is not None:
                log.warning("session ended, key revoked: %s (%s)", name, _ident(session.identity))
                actions.extend(self._end(session, now, "revoked"))
        return actions

    def restore(self, saved: Iterable[SavedSession], now: int) -> int:
        """Take back the sessions a clean stop saved (``Store.take_saved_sessions``).

        Each is as after a blip: its name held, a member of its rooms, waiting for
        its client to resume it with its token. Its client comes back on its own,
        resumes, and rejoins its rooms, which publishes nothing: to the rooms the
        restart is invisible. One that does not come back within the expiry ends
        as any silent session does, its leave published. Returns how many.
        """
        restored = 0
        for saved_session in saved:
            name = saved_session.name
            if not p.is_name(name) or self.named(name) is not None:
                continue
            limits = self.limits
            session = Session(
                NO_CONNECTION,
                name,
                saved_session.sender,
                "",
                now,
                sends=Bucket(float(limits.burst), now),
                joins=Bucket(float(limits.join_burst), now),
                host=saved_session.host,
                token_sha256=saved_session.token_sha256,
            )
            # A room with no seq (all its events gone, and with them its number) is
            # joined anew by the client's rejoin: its join is published then.
            session.rooms = {room for room in saved_session.rooms if room in self.seqs}
            self._attach(session, connected=False)
            self._restored[name] = session
            for room in session.rooms:
                self.members.setdefault(room, {})[name] = session
            restored += 1
        return restored

    def sessions_to_save(self) -> list[SavedSession]:
        """The sessions, for the store at a clean stop (see :meth:`restore`); not those still
        waiting to be resumed from the last restart: they had their time, and restored
        again they would hold their names through every restart."""
        return [
            SavedSession(s.name, s.sender, hashlib.sha256(s.token.encode()).digest(), s.host, sorted(s.rooms))
            for s in self.by_name.values()
            if s.name not in self._restored
        ]

    # ------------------------------------------------------------- helpers

    def _next_seq(self, room: str) -> int:
        seq = self.seqs.get(room, 0) + 1
        if seq == 1 and room not in self.seqs:  # a new room
            bisect.insort(self._room_index, room)
        self.seqs[room] = seq
        return seq

    def _presence(self, room: str, name: str, event: str, now: int, reason: p.LeaveReason | None = None) -> Publish:
        return Publish(room, p.presence_event(room, self._next_seq(room), now, name, event, reason))

    def _name_taken(self, name: str, rid: str | None, holder: Session | None = None, now: int = 0) -> ProtocolError:
        """Who holds the name, as far as this broker can tell, and for how long: the user
        whose client died without a bye waits; one whose name another client uses now
        should not think it will come free by itself."""
        return ProtocolError(
            ErrorCode.NAME_TAKEN, f"the name {name!r} is taken ({self._why_taken(name, holder, now)})", rid
        )

    def _why_taken(self, name: str, holder: Session | None, now: int) -> str:
        """The reason :meth:`_name_taken` gives; ``holder``: this broker's session of the name."""
        expiry_s = self.expiry_ms / 1000
        if holder is None:
            why = f"a session that ended without a bye holds its name up to {expiry_s:g} s"
        else:
            silent_s = max(0, now - holder.last_seen) / 1000
            left_s = max(1, math.ceil(expiry_s - silent_s))
            if holder.name in self._restored:
                why = f"its session from before the broker restarted waits {left_s} s more for its client to resume it"
            elif silent_s * 1000 <= self.heartbeat_ms + HEARTBEAT_SLACK_MS:
                # Heard from lately, but whether its client still runs the broker cannot
                # tell (a killed one's connection may look alive): both cases are said.
                why = (
                    f"in use by a session heard from {silent_s:.0f} s ago: free once its client quits, or, "
                    f"if that client is gone (killed, say), in {left_s} s; "
                    "the session's resume token takes it back at once"
                )
            else:
                why = f"by a session silent for {silent_s:.0f} s, which ends in {left_s} s unless its client comes back"
            if holder.name != name:  # when it frees matters as much as whose it is
                why = f"{holder.name!r} is in use, and names that differ only in case are one name: {why}"
        return why

    def _full(self, rid: str | None) -> ProtocolError | None:
        """Why a new session cannot start now (the hello being handled), or None."""
        return self._broker_full(rid) or self._host_full(rid)

    def _broker_full(self, rid: str | None) -> ProtocolError | None:
        if len(self.by_name) >= self.limits.max_sessions:
            return ProtocolError(ErrorCode.LIMIT_REACHED, "the broker is full; try again later", rid)
        return None

    def _host_full(self, rid: str | None) -> ProtocolError | None:
        """Why the host of the hello being handled may not start one more session, or None.
        (A resume is never refused for it: it starts no session, it moves one.)"""
        host, most = self._hello_host, self.limits.max_sessions_per_host
        if host is not None and 0 < most <= self._hosts.get(host, 0):
            return ProtocolError(
                ErrorCode.LIMIT_REACHED,
                f"{host} has {most} session(s) here already, the most one address may have; try again later",
                rid,
            )
        return None

    def named(self, name: str) -> Session | None:
        """The live session whose name is ``name`` in any case (``bob`` for ``Bob``), or None."""
        session = self.by_name.get(name)
        if session is None:
            session = self._by_key.get(p.name_key(name))
        return session

    def _attach(self, session: Session, connected: bool = True) -> None:
        """Make ``session`` live: found by its connection (if it has one) and its name, counted for its host."""
        if connected:
            self.by_identity[session.identity] = session
        self.by_name[session.name] = session
        self._by_key[p.name_key(session.name)] = session
        if session.host is not None:
            self._hosts[session.host] = self._hosts.get(session.host, 0) + 1

    def _detach(self, session: Session) -> None:
        """Undo :meth:`_attach` (nothing if ``session`` is not the live one of its name)."""
        if self.by_name.get(session.name) is not session:
            return
        del self.by_name[session.name]
        del self._by_key[p.name_key(session.name)]
        if self._restored.pop(session.name, None) is None:
            self.by_identity.pop(session.identity, None)
        host = session.host
        if host is not None:
            left = self._hosts[host] - 1
            if left:
                self._hosts[host] = left
            else:
                del self._hosts[host]

    def _end(self, session: Session, now: int, reason: p.LeaveReason) -> list[Action]:
        """End ``session``: its leave in each of its rooms says why (``reason``)."""
        self._owe(session, now)
        self._detach(session)
        actions: list[Action] = []
        for room in sorted(session.rooms):
            self._drop_member(room, session.name)
            actions.append(self._presence(room, session.name, "leave", now, reason))
        return actions

    def _drop_member(self, room: str, name: str) -> None:
        members = self.members.get(room)
        if members is not None:
            members.pop(name, None)
            if not members:
                del self.members[room]

    @staticmethod
    def _reply(session: Session, env: Envelope, request: Envelope) -> Reply:
        rid = request.get("id")
        if rid is not None:
            env["id"] = rid
        return Reply(session.identity, env)

    # ------------------------------------------------------------ requests

    def _welcome(self, session: Session, resumed: bool, rid: str | None) -> list[Action]:
        return [
            Reply(
                session.identity,
                p.welcome(
                    session.name,
                    session.sender,
                    self.epoch,
                    self.heartbeat_ms,
                    session.token,
                    resumed,
                    rid,
                    sorted(session.rooms) if resumed else None,
                ),
            )
        ]

    def _hello(self, identity: bytes, session: Session | None, env: Envelope, now: int) -> list[Action]:
        name: str = env["name"]
        rid = env.get("id")
        if session is not None:
            # (Refreshed by handle() already.) A client that lost our welcome may say hello again: same answer.
            if session.name != name:
                return self.reject(
                    identity,
                    ProtocolError(ErrorCode.ALREADY_REGISTERED, f"this connection is already {session.name!r}", rid),
                )
            return self._welcome(session, False, rid)
        holder = self.named(name)
        if holder is not None:
            token = env.get("resume")
            # A session resumes under its own spelling only (a client resumes with the
            # name it said hello with): another spelling is another user's try.
            if token is None or holder.name != name or not _token_fits(holder, token):
                return self.reject(identity, self._name_taken(name, rid, holder, now))
            # The same client on a new connection (a blip, a reconnect) takes its
            # session over. Nobody left or joined, so nothing is published; the
            # old connection is nobody from now on.
            self._log_session(now, "session resumed: %s (%s -> %s)", name, _ident(holder.identity), _ident(identity))
            old = holder.identity
            restored = name in self._restored
            if restored:
                holder.token, holder.token_sha256 = token, None  # known again, as its client holds it
            self._detach(holder)
            # What its client read (its hello says), and what it did not, which its old
            # connection may still hold queued: owed by its host from now on.
            self._note_read(holder, env.get("read"))
            self._owe(holder, now)
            holder.identity, holder.host = identity, self._hello_host
            holder.last_seen = now
            self._attach(holder)
            if restored:
                return self._welcome(holder, True, rid)
            # The old connection hears why it is nobody now. After a blip it is gone and
            # this is dropped; alive, it is a second client with this token, which stops.
            moved = p.error(ErrorCode.SESSION_MOVED, f"{name!r} was resumed on another connection with its token")
            return [Reply(old, moved), *self._welcome(holder, True, rid), *self._dms_again(holder, now)]
        refused = self._full(rid)
        if refused is not None:
            return self.reject(identity, refused)
        limits = self.limits
        session = Session(
            identity,
            name,
            self._new_sender(),
            self._new_token(),
            now,
            sends=Bucket(float(limits.burst), now),
            joins=Bucket(float(limits.join_burst), now),
            host=self._hello_host,
        )
        self._attach(session)
        self._log_session(
            now, "session start: %s (%s) from %s sender=%s", name, _ident(identity), session.host, session.sender
        )
        return self._welcome(session, False, rid)

    def _join(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        # A join's reply is a member list, unless the join said members: false: charged like
        # history. Joining a room again costs no join token (a client that lost the reply
        # asks again), but this it does.
        listed = env.get("members", True)
        if listed:
            self._check_bulk(session, now)
        actions: list[Action] = []
        if room not in session.rooms:
            if len(session.rooms) >= self.limits.max_rooms:
                raise ProtocolError(ErrorCode.LIMIT_REACHED, rooms_full(self.limits.max_rooms))
            self._throttle_join(session, now)
            session.rooms.add(room)
            self.members.setdefault(room, {})[session.name] = session
            actions.append(self._presence(room, session.name, "join", now))
        members = self.members[room]
        actions.append(
            self._joined(session, env, room, self.seqs[room], sorted(members) if listed else len(members), now)
        )
        return actions

    def _joined(
        self, session: Session, env: Envelope, room: str, seq: int, members: list[str] | int, now: int
    ) -> Reply:
        """The ``joined`` reply: with the room's member list, or, for a join that said
        ``members: false``, only how many they are (``members`` is then that count)."""
        if isinstance(members, int):
            return self._reply(session, {"type": "joined", "room": room, "count": members, "seq": seq}, env)
        return self._reply(session, self._listed(session, {"type": "joined", "room": room}, members, now, seq=seq), env)

    def _leave(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        if room not in session.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in #{room}")
        self._throttle_join(session, now)
        session.rooms.discard(room)
        self._drop_member(room, session.name)
        return [
            self._presence(room, session.name, "leave", now),
            self._reply(session, {"type": "left", "room": room}, env),
        ]

    def _msg(self, session: Session, env: Envelope, now: int) -> list[Action]:
        # Every message passes here: one key for the window's lookup and entry, and
        # _remember_ack's and _check_text's work written out.
        room: str = env["room"]
        msg_id: str = env["id"]
        text: str = env["text"]
        key = (session.name, msg_id)
        acked = self._acked
        first = acked.get(key)
        if first is not None:
            # Before the membership check: a stored message whose ack was lost
            # is acknowledged again even if we have left the room since.
            return self._resent(session, first, room, text)
        if room not in session.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join #{room} before writing to it")
        if len(text) > self.limits.max_text:
            self._check_text(text)
        if self.store_refusal is not None:
            # Checked after the message's own faults (which a retry would not mend) and
            # before the rate limit, which a message that is not taken must not spend.
            self.hold_rooms(session, now, msg_id)
            raise _Refused(ErrorCode.UNAVAILABLE, self.store_refusal)
        self._throttle_send(session, now, msg_id)
        seq = self._next_seq(room)
        event = p.msg_event(room, seq, now, session.name, session.sender, text, msg_id, env.get("action", False))
        acked.put(key, (msg_id, seq, now, room, hash(text)))
        return [
            Publish(room, event),
            Reply(session.identity, {"type": "ack", "id": msg_id, "room": room, "seq": seq, "ts": now}),
        ]

    def _resent(self, session: Session, first: _Acked, where: str, text: str) -> list[Action]:
        """A (name, id) seen before: the same message again gets its first ack again
        (nothing stored or delivered twice); another message under a used id is refused."""
        msg_id, seq, ts, first_where, text_hash = first
        # A DM's is "@" and its recipient as spelt (for its ack's ``to``); asked for in any case.
        if p.name_key(first_where) != where or (text_hash is not None and text_hash != hash(text)):
            raise ProtocolError(
                ErrorCode.BAD_ENVELOPE,
                f"id {msg_id!r} was already used for another message: ids must be unique per name",
            )
        if seq is None:
            key = (session.name, msg_id)
            if key in self._dms_deciding:
                # Decided, and not handed over yet (its pass waits for a commit): whether
                # it arrives is not known, and an ack now would be a promise the first
                # copy may break (its "undelivered" then went to the connection it came
                # on, gone if its author resumed since, and the DM was lost). The loop
                # answers it once, here (see answer_to).
                self._dms_deciding[key] = session.identity
                return []
            return [Reply(session.identity, {"type": "ack", "id": msg_id, "to": first_where[1:], "ts": ts})]
        return [Reply(session.identity, {"type": "ack", "id": msg_id, "room": where, "seq": seq, "ts": ts})]

    def _check_text(self, text: str) -> None:
        if len(text) > self.limits.max_text:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"text of {len(text)} characters, the limit is {self.limits.max_text}"
            )

    def hold_rooms(self, session: Session, now: int, msg_id: str) -> None:
        """A room message refused ``unavailable`` (the disk alarm, the backplane away):
        as after a rate refusal, the session's other room messages are refused until it
        is back. Those already on their way could otherwise be taken, the alarm over, and
        stored ahead of it: a CI run saw "during 2" before "during 1". DMs go on."""
        if session.held_id is None or now >= session.held_until:
            session.held_id, session.held_code, session.held_dms = msg_id, ErrorCode.UNAVAILABLE, False
        session.held_until = now + p.RATE_HOLD_MAX_MS

    def _throttle_send(self, session: Session, now: int, msg_id: str, *, dm: bool = False) -> None:
        """The send rate limit, and the order it must not upset: after refusing a message,
        refuse the session's others until that one is back and accepted. Those already on
        their way when the refusal reaches the client (it may not read for a while) must
        not be stored ahead of it; the client resends it first. A client that never
        resends it is held for at most RATE_HOLD_MAX_MS after its last refusal."""
        limits = self.limits
        held = session.held_id
        if held is not None:  # (the hot path, no refusal pending, is this one test)
            if now >= session.held_until:
                session.held_id = held = None
            elif msg_id != held and (session.held_dms or not dm):
                slow = "slow down: " if session.held_code == ErrorCode.RATE_LIMITED else ""
                raise _HeldBack(
                    session.held_code,
                    f"{slow}an earlier message of yours (id {held!r}) was refused; resend it first",
                )
        if not session.sends.take(now, limits.rate, limits.burst):
            if held is None or not session.held_dms:
                # (A rate refusal takes over a hold of room messages: it holds DMs too.)
                session.held_id, session.held_code, session.held_dms = msg_id, ErrorCode.RATE_LIMITED, True
            session.held_until = now + p.RATE_HOLD_MAX_MS
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"slow down: at most {limits.rate:g} messages a second (burst {limits.burst})"
            )
        if held is not None and msg_id == held:
            session.held_id = None  # the refused one is back, and accepted

    def _throttle_join(self, session: Session, now: int) -> None:
        limits = self.limits
        if not session.joins.take(now, limits.join_rate, limits.join_burst):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"slow down: at most {limits.join_rate:g} joins/leaves a second"
            )

    def _remember_ack(self, name: str, ack: Envelope, where: str, text_hash: int | None) -> None:
        msg_id: str = ack["id"]
        self._acked.put((name, msg_id), (msg_id, ack.get("seq"), ack["ts"], where, text_hash))

    def _dm(self, session: Session, env: Envelope, now: int) -> list[Action]:
        to: str = env["to"]
        target = self.named(to)
        first = self._acked.get((session.name, env["id"]))
        if first is not None:
            return self._resent(session, first, dm_where(to), env["text"])
        if target is None:
            self._dm_refused(session, to, env["id"], now)
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {to!r} is online")
        to = target.name  # as its owner spells it, in the event and the ack (the author's echo shows it)
        if to in self._restored:
            # Held for its client since the restart, which has not come back: as after a
            # crash, the recipient is not online yet (a client retries this, for a while).
            self._dm_refused(session, to, env["id"], now)
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"{to!r} is not back yet since the broker restarted")
        hold = session.dm_holds.get(p.name_key(to)) if session.dm_holds else None
        if hold is not None:
            self._refuse_if_held(session, to, env["id"], now, deciding=True)
        self._check_text(env["text"])
        self._throttle_send(session, now, env["id"], dm=True)
        if hold is not None and hold.held_id == env["id"]:
            hold.resent = True
        event = p.dm_event(session.name, session.sender, to, env["text"], now, env["id"])
        ack: Envelope = {"type": "ack", "id": env["id"], "to": to, "ts": now}
        self._remember_ack(session.name, ack, "@" + to, hash(env["text"]))
        self._keep_dm(target, event, now)
        self._dms_deciding[(session.name, env["id"])] = None
        # Private: ROUTER to the recipient only, never PUB, never the store.
        return [Direct(target.identity, event, session.identity, ack)]

    def _keep_dm(self, target: Session, event: Envelope, now: int) -> None:
        """Keep a DM handed to ``target``'s connection for a while (see _dm_kept_since): a connection that went
        dead without closing (a NAT that forgot it) takes DMs, and its author hears they
        were delivered, until the client gives it up and resumes on a new one; then they
        are sent again (clients drop a DM they have, by its author and id). In memory only,
        at most DM_KEPT_BYTES a session.

        Kept when decided, so that a resume later in the same pass sends it again; held to
        DM_KEPT_BYTES only once the loop has handed it over (:meth:`delivered`). One that
        the connection does not take is taken out (:meth:`undelivered`): held to the size
        at once, the DMs of a recipient whose connection is gone, asked again and again
        by their authors, pushed out the ones handed over just before it went, which were
        then lost with it (a soak: 310 DMs acked and never received)."""
        kept = target.recent_dms
        if kept is None:
            kept = target.recent_dms = deque()
        kept.append((now, event))
        target.recent_dm_bytes += _kept_size(event)
        since = self._dm_kept_since(now)
        while kept and kept[0][0] < since:
            target.recent_dm_bytes -= _kept_size(kept.popleft()[1])

    def _dm_kept_since(self, now: int) -> int:
        """The oldest a kept DM may be: a session's expiry and a reconnect's few seconds."""
        return now - min(self.expiry_ms, DM_KEPT_MAX_MS - DM_KEPT_EXTRA_MS) - DM_KEPT_EXTRA_MS

    def _dms_again(self, session: Session, now: int) -> list[Action]:
        """The DMs kept for ``session`` (see _keep_dm), to its new connection."""
        kept, session.recent_dms, session.recent_dm_bytes = session.recent_dms, None, 0
        if not kept:
            return []
        since = self._dm_kept_since(now)
        return [Reply(session.identity, event) for ts, event in kept if ts >= since]

    def _dm_refused(self, author: Session, to: str, msg_id: str, now: int) -> None:
        """A DM of ``author`` to ``to`` was refused, and its client asks again: until it is
        handed over, ``author``'s later DMs to ``to`` are held back (see _dm_held)."""
        holds = author.dm_holds
        if holds is None:
            holds = author.dm_holds = {}
        elif len(holds) >= DM_HOLDS_MAX:
            # (DMs to many names nobody holds: only the recent ones matter.)
            for stale in [k for k, hold in holds.items() if now >= hold.until] or [next(iter(holds))]:
                del holds[stale]
        key = p.name_key(to)
        held = holds.get(key)
        if held is None or held.held_id == msg_id or now >= held.until:
            holds[key] = DmHold(msg_id, now + DM_HOLD_MS)

    def _dm_held(self, author: Session, to: str, msg_id: str, now: int, *, deciding: bool = False) -> str | None:
        """The id of an earlier DM of ``author`` to ``to`` that was refused and that DM
        ``msg_id`` must not overtake, if any.

        A client sends its DMs one after the other without waiting for their acks. When
        the recipient's connection is gone, or it is not back yet after a restart, the
        first ones are refused; if it is back before the later ones arrive, those were
        delivered ahead of the first, resent a second later (a soak with restarts: 700
        DMs shown out of order). A client that gives up on the refused one (it told its
        author) does not resend it: the hold ends DM_HOLD_MS after its last refusal.

        ``deciding``: asked as the DM is decided. The refused one, resent and decided
        earlier in the same pass, is handed over (or not) only after: the ones behind
        it are decided too, and the loop asks again as it hands them over."""
        holds = author.dm_holds
        if not holds:
            return None
        key = p.name_key(to)
        held = holds.get(key)
        if held is None:
            return None
        if now >= held.until:
            del holds[key]
            return None
        if held.held_id == msg_id or (deciding and held.resent):
            return None
        return held.held_id

    def _refuse_if_held(self, author: Session, to: str, msg_id: str, now: int, *, deciding: bool = False) -> None:
        """Refuse DM ``msg_id`` ``undelivered`` if it must not overtake an earlier one (see _dm_held)."""
        behind = self._dm_held(author, to, msg_id, now, deciding=deciding)
        if behind is not None:
            raise _HeldBack(ErrorCode.UNDELIVERED, _held_text(to, behind))

    def dm_held(self, dm: Direct, now: int) -> str | None:
        """For the loop, just before it hands ``dm`` over: the id of an earlier DM to the
        same person that was refused in this pass (see _dm_held), which it must not overtake."""
        author = self.by_name.get(dm.env["from"])
        if author is None or not author.dm_holds:
            return None
        return self._dm_held(author, dm.env["to"], dm.ack["id"], now)

    def _dm_released(self, author: Session, to: str, msg_id: str) -> None:
        """DM ``msg_id`` of ``author`` to ``to`` was handed over: the later ones no longer wait for it."""
        if author.dm_holds:
            key = p.name_key(to)
            held = author.dm_holds.get(key)
            if held is not None and held.held_id == msg_id:
                del author.dm_holds[key]

    def answer_to(self, dm: Direct) -> bytes:
        """The connection that hears whether ``dm`` was handed over (ask before
        :meth:`delivered` or :meth:`undelivered`): the last that sent it again while it
        waited (see _resent), as its author resumed on a new connection meanwhile; else
        the one it came on."""
        return self._dms_deciding.get((dm.env["from"], dm.ack["id"])) or dm.author

    def delivered(self, dm: Direct) -> Envelope:
        """The loop handed ``dm`` to its recipient's connection: its ack, for its author.
        What the recipient's session keeps of its DMs (see _keep_dm) is held to its size,
        and the author's later DMs to them no longer wait for this one (see _dm_held)."""
        self._dms_deciding.pop((dm.env["from"], dm.ack["id"]), None)
        target = self.named(dm.env["to"])
        if target is not None and (kept := target.recent_dms):
            while kept and target.recent_dm_bytes > DM_KEPT_BYTES:
                target.recent_dm_bytes -= _kept_size(kept.popleft()[1])
        author = self.by_name.get(dm.env["from"])
        if author is not None:
            self._dm_released(author, dm.env["to"], dm.ack["id"])
        return dm.ack

    def undelivered(self, dm: Direct, now: int, behind: str | None = None) -> Envelope:
        """The loop could not hand ``dm`` to its recipient's connection at ``now``: gone
        (the recipient is reconnecting and its session does not know yet) or not reading
        (its queue is full); or did not, as it would have overtaken DM ``behind``
        (see dm_held). Forget the ack, so that a resend is delivered, not
        acknowledged again; the error is what its author gets instead."""
        msg_id: str = dm.ack["id"]
        self._acked.forget((dm.env["from"], msg_id))
        self._dms_deciding.pop((dm.env["from"], msg_id), None)
        author = self.by_name.get(dm.env["from"])
        if author is not None and behind is None:
            # From now, not from when it was decided: a pass may wait seconds for a commit.
            self._dm_refused(author, dm.env["to"], msg_id, max(now, dm.env["ts"]))
        target = self.named(dm.env["to"])
        if target is not None and (kept := target.recent_dms):
            # Its author is told, and resends: not sent again on a resume. Searched from
            # the oldest: the loop hands DMs over in the order they were kept, so one it
            # refuses comes after at most DM_KEPT_BYTES of DMs it handed over (from the
            # newest, a backlog of passes waiting for commits made each search long).
            for i, (_ts, event) in enumerate(kept):
                if event is dm.env:
                    target.recent_dm_bytes -= _kept_size(event)
                    del kept[i]
                    break
        if behind is not None:
            return p.error(ErrorCode.UNDELIVERED, _held_text(dm.env["to"], behind), msg_id)
        return p.error(
            ErrorCode.UNDELIVERED,
            f"{dm.env['to']}'s connection could not take it (reconnecting, or not reading); not delivered",
            msg_id,
        )

    def history_refused(self, identity: bytes, now: int) -> Envelope | None:
        """Asked by the loop just before it answers a history query (queries of one
        pass are answered in turn, so each sees the charges of the ones before).

        A session that ended since it asked (a ``bye`` in the same pass, an expiry, a
        resume on another connection) gets no history: its budget went with it, and a
        connection that asks and says bye, again and again, would have the broker
        queue replies that nothing charges.
        """
        session = self.by_identity.get(identity)
        if session is None:
            return p.error(ErrorCode.NOT_REGISTERED, "the session ended before its history was sent")
        spent = self._bulk_spent(session, now)
        return None if spent is None else p.error(ErrorCode.RATE_LIMITED, spent)

    def _bulk_spent(self, session: Session, now: int) -> str | None:
        """Why a request whose reply may be large (``history``, ``rooms``, ``who``, ``join``)
        is refused when the session's budget of such replies (``history_bytes``) is spent,
        else None."""
        limits = self.limits
        if limits.history_bytes <= 0:
            return None
        unread = session.bulk_sent - session.bulk_read
        if session.host is not None and self._debts:
            unread += round(self._owed(session.host, now))
        if unread > limits.history_burst:
            # The rate alone let a session that asks and never reads have the broker queue
            # its replies without end, at the rate: it must read what it was sent first.
            return (
                f"{_bytes_text(unread)} of history, rooms, who and join replies sent to you are not read "
                "yet: read them (and say so: a request's 'read' is the highest 'mark' of the replies read)"
            )
        if session.history is None:
            return None
        self._refill(session.history, now)
        if session.history.tokens >= 0:
            return None
        return (
            f"slow down: history, rooms, who and join replies are limited to {limits.history_bytes / 1048576:g} MiB "
            "a second"
        )

    def charge_history(self, identity: bytes, size: int, now: int) -> str | None:
        """The loop is sending a history reply of ``size`` bytes to ``identity``: charge its
        session; the reply's ``mark`` (None: none)."""
        session = self.by_identity.get(identity)
        return None if session is None else self._charge_bulk(session, size, now)

    def _charge_bulk(self, session: Session, size: int, now: int) -> str | None:
        """Charge a large reply of ``size`` bytes to ``session``'s budget; its ``mark``, which
        the client sends back as ``read`` once it has read it (None: no budget, no mark)."""
        limits = self.limits
        if limits.history_bytes <= 0:
            return None
        if session.history is None:
            session.history = Bucket(float(limits.history_burst), now)
        self._refill(session.history, now)
        session.history.tokens -= size  # may go below zero: later queries wait until it is back above
        session.bulk_sent += size
        return self._mark(session, session.bulk_sent)

    def _charged(self, session: Session, reply: Envelope, size: int, now: int) -> Envelope:
        """``reply``, a large one of about ``size`` bytes, charged to ``session``'s budget and
        marked (see :meth:`_charge_bulk`)."""
        mark = self._charge_bulk(session, size, now)
        if mark is not None:
            reply["mark"] = mark
        return reply

    def _owe(self, session: Session, now: int) -> None:
        """``session`` ends, or moves to a new connection: the large replies it did not say
        it read may still wait in its old connection's queue (libzmq keeps it until the peer
        closes it), and a new session must not start counting from nothing (a client that
        says bye and hello in a loop, never reading, grew the broker by 32 MiB a round).
        Its host owes them, paid off at the budget's rate, and counted with each of its
        sessions' own unread replies (see _bulk_spent)."""
        unread = session.bulk_sent - session.bulk_read
        session.bulk_read = session.bulk_sent
        host = session.host
        if unread <= 0 or host is None or self.limits.history_bytes <= 0:
            return
        if len(self._debts) >= MAX_DEBTS:
            for other in list(self._debts):
                self._owed(other, now)  # (forgets those paid off)
        self._debts[host] = (self._owed(host, now) + unread, now)

    def _owed(self, host: str, now: int) -> float:
        """What ``host`` still owes at ``now`` (see _owe)."""
        debt = self._debts.get(host)
        if debt is None:
            return 0.0
        left = debt[0] - (now - debt[1]) * self.limits.history_bytes / 1000
        if left <= 0:
            del self._debts[host]
            return 0.0
        return left

    def _mark(self, session: Session, upto: int) -> str:
        """A reply's ``mark``: the bytes sent so far, signed (by a key of this process) for
        this session, so that a client cannot say it read what it has not received."""
        mac = hmac.new(self._mark_key, f"{session.sender}:{upto}".encode(), hashlib.sha256).hexdigest()[:16]
        return p.mark(upto, mac)

    def _note_read(self, session: Session, mark: object) -> None:
        """A request's ``read``: the highest mark of the large replies its client has read.
        Not one of ours for this session (another broker's, a forgery, garbage): ignored."""
        count = p.mark_count(mark)
        if (
            isinstance(mark, str)
            and session.bulk_read < count <= session.bulk_sent
            and hmac.compare_digest(mark, self._mark(session, count))
        ):
            session.bulk_read = count

    def _refill(self, bucket: Bucket, now: int) -> None:
        limits = self.limits
        bucket.tokens = min(
            float(limits.history_burst), bucket.tokens + (now - bucket.stamp) * limits.history_bytes / 1000
        )
        bucket.stamp = now

    def _history(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        return [HistoryQuery(session.identity, room, env["after"], env["limit"], env.get("id"), self.seqs.get(room, 0))]

    def _who(self, session: Session, env: Envelope, now: int) -> list[Action]:
        self._check_bulk(session, now)
        room: str = env["room"]
        listed = self._listed(session, {"type": "who", "room": room}, sorted(self.members.get(room, ())), now)
        return [self._reply(session, listed, env)]

    def _check_bulk(self, session: Session, now: int) -> None:
        """``rate_limited`` when the session's budget of large replies is spent."""
        spent = self._bulk_spent(session, now)
        if spent is not None:
            raise ProtocolError(ErrorCode.RATE_LIMITED, spent)

    def _listed(self, session: Session, reply: Envelope, members: list[str], now: int, **more: Any) -> Envelope:
        """``reply`` with ``members``, a member list, and ``more``: charged to the session's
        budget of large replies (with 10,000 members a list is some 300 KB, and a session
        that asks and never reads would otherwise make the broker queue them without end),
        and marked (see :meth:`_mark`). Past MAX_MEMBERS_LISTED members, the first ones,
        with ``truncated`` and the ``count`` of them all."""
        if len(members) > MAX_MEMBERS_LISTED:
            reply["truncated"], reply["count"] = True, len(members)
            members = members[:MAX_MEMBERS_LISTED]
        reply["members"] = members
        reply.update(more)
        return self._charged(session, reply, sum(len(name) + 1 for name in members), now)

    def _rooms(self, session: Session, env: Envelope, now: int) -> list[Action]:
        # Up to 1000 rooms, some 50 KB: charged like history, or a session that asks
        # and never reads could make the broker queue replies without end.
        self._check_bulk(session, now)
        listed, truncated = self._room_list()
        rooms = [{"room": room, "members": members, "seq": seq} for room, members, seq in listed]
        reply: Envelope = {"type": "rooms", "rooms": rooms, "truncated": truncated}
        # About what it encodes to: each entry's name, its three keys and two ints.
        size = 32 + sum(len(room) + 30 for room, _, _ in listed)
        return [self._reply(session, self._charged(session, reply, size, now), env)]

    def _room_list(self) -> tuple[list[tuple[str, int, int]], bool]:
        """(room, members, seq) of at most MAX_ROOMS_LISTED rooms, sorted by name, and whether
        there are more. With more, the rooms someone is in come first: rooms are never
        deleted, and a thousand empty ones (a bot that joined and left a room per line, say)
        must not hide from everyone the rooms people talk in because their names sort later."""
        names = self._room_index
        truncated = len(names) > MAX_ROOMS_LISTED
        chosen: list[str] = names[:MAX_ROOMS_LISTED]
        if truncated:
            occupied = sorted(self.members)[:MAX_ROOMS_LISTED]  # (a room in members has a seq)
            taken = set(occupied)
            rest = (room for room in names if room not in taken)
            chosen = sorted([*occupied, *itertools.islice(rest, MAX_ROOMS_LISTED - len(occupied))])
        listed = [(room, len(self.members.get(room, ())), self.seqs.get(room, 0)) for room in chosen]
        return listed, truncated

    def _ping(self, session: Session, env: Envelope, now: int) -> list[Action]:
        # Each of the session's rooms at its seq: a subscriber whose queue
        # overflowed lost a room's last events with no later one to show the gap;
        # this shows it (within a heartbeat, as idle clients ping).
        seqs = {room: self.seqs.get(room, 0) for room in sorted(session.rooms)}
        return [self._reply(session, {"type": "pong", "seqs": seqs}, env)]

    def _bye(self, session: Session, env: Envelope, now: int) -> list[Action]:
        self._log_session(now, "session end: %s (%s) said bye", session.name, _ident(session.identity))
        return self._end(session, now, "quit")
