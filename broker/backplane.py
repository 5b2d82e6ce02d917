"""The Redis backplane: what several brokers share when they serve one chat.

Everything here is I/O against Redis (a single server or a Redis Cluster); the
decisions stay in :mod:`broker.cluster`. Every key of one room shares the hash
tag ``{r.ROOM}``, every key of one user ``{u.NAME}``, every key of one broker
``{b.ID}``, so each script touches one slot and works unchanged on a Cluster.

- ``seq`` is assigned by a Lua script that increments the room's counter,
  appends the event to the room's Stream (entry id ``SEQ-0``) and publishes it
  to every broker, atomically: contiguous, never reused, whichever broker
  accepted the message. A message is acknowledged only after that script ran.
- Resend detection lives in the same script (per room, by ``name id``, for at
  least :data:`DEDUP_WINDOW_S`), so a message resent to another broker after a
  failover is acknowledged again, not stored twice.
- Names are claimed with a script, and each session's secret resume token is
  kept only as a hash; the owner broker is recorded with it, so a resume on
  any broker takes the session over.
- DMs to a user on another broker go through that broker's inbox Stream.
- Every broker refreshes an ``alive`` key; the sessions of a broker whose key
  expired are ended by a survivor (their leaves published, their names freed).
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from zchat.protocol import name_key

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry
except ImportError:  # an optional extra: a broker without --backplane runs without it
    HAVE_REDIS = False
else:
    HAVE_REDIS = True

log = logging.getLogger("zchat.broker")

#: What ``--backplane`` says when redis-py is not installed.
#: (Not ``pip install 'zchat[backplane]'``: the package called zchat on PyPI is another project.)
NO_REDIS = (
    "--backplane needs redis-py, which is not installed: pip install '.[backplane]' in the zchat checkout,"
    " or pip install 'redis>=5', into the environment of zchat-broker"
)

PREFIX = "zchat:"
#: Where every broker of one chat hears its room events (``ROOM SEQ BODY``),
#: followed by the database number: pub/sub ignores databases, and chats on
#: different databases of one server must not hear each other.
EVENTS_CHANNEL = PREFIX + "events:"
#: All rooms that ever had an event (for ``rooms``).
ROOMS_KEY = PREFIX + "rooms"
#: broker id -> when it registered (ms), for the reaper and operators.
BROKERS_KEY = PREFIX + "brokers"
EPOCH_KEY = PREFIX + "epoch"
#: A resend is recognised for at least this long (two buckets of this size).
DEDUP_WINDOW_S = 600
#: A broker's inbox (DMs for its users, takeovers) keeps at most about this many entries.
INBOX_MAXLEN = 10_000
#: Default number of events kept per room (a Stream trimmed approximately).
DEFAULT_RETENTION = 100_000

#: What a failing backplane raises; the broker answers ``unavailable``.
#: (RedisClusterException, raised when no node answers, is not a RedisError.)
Errors: tuple[type[Exception], ...] = (
    (redis.RedisError, redis.exceptions.RedisClusterException, OSError) if HAVE_REDIS else (OSError,)
)
#: Sessions a reaper ends per tick: the loop is blocked meanwhile.
REAP_SLICE = 200


def room_key(room: str, part: str) -> str:
    return f"{PREFIX}{{r.{room}}}:{part}"


def user_key(name: str) -> str:
    """A user's hash, one per name regardless of case (names that differ only in case
    are one name: see zchat.protocol.name_key); the hash's ``name`` is its spelling."""
    return f"{PREFIX}{{u.{name_key(name)}}}"


def older_user_key(name: str) -> str | None:
    """Where a broker from before names were one regardless of case (a rolling upgrade's
    older brokers, or sessions they left) keeps the hash of ``name``: under the name as
    spelt, without a ``name`` field. None for a name in lower case: that is its
    :func:`user_key`."""
    return None if name == name_key(name) else f"{PREFIX}{{u.{name}}}"


def broker_key(broker: str, part: str) -> str:
    return f"{PREFIX}{{b.{broker}}}:{part}"


def token_hash(token: str) -> str:
    """Only a hash of a resume token is stored: whoever reads Redis cannot take sessions over."""
    return hashlib.sha256(token.encode()).hexdigest()


def text_digest(text: str, action: bool) -> str:
    """A digest that is the same on every broker (``hash()`` is salted per process)."""
    return hashlib.blake2b(text.encode(), digest_size=8, person=b"me" if action else b"").hexdigest()


# All the messages one loop pass has for one room, in one call.
# KEYS: seq, log, ids (this bucket), ids (previous bucket)
# ARGV: maxlen, ttl, channel, room, then per message: body without its seq
# value, "name id", "ts digest". Returns per message the new seq (a number),
# or for a resend the "seq ts digest" first recorded for it (a string).
_APPEND = """
local out = {}
for i = 5, #ARGV, 3 do
  local v = redis.call('HGET', KEYS[3], ARGV[i + 1]) or redis.call('HGET', KEYS[4], ARGV[i + 1])
  if v then
    out[#out + 1] = v
  else
    local seq = redis.call('INCR', KEYS[1])
    local body = ARGV[i] .. cmsgpack.pack(seq)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-0', 'b', body)
    redis.call('HSET', KEYS[3], ARGV[i + 1], seq .. ' ' .. ARGV[i + 2])
    redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. seq .. ' ' .. body)
    out[#out + 1] = seq
  end
end
redis.call('EXPIRE', KEYS[3], ARGV[2])
return out
"""

# KEYS: seq, log, members
# ARGV: 'join' | 'leave', name, body without its seq value, maxlen, channel, room
# Returns {changed, seq, members...}: no event when the name already was
# (join) or was not (leave) a member, e.g. a session resumed on another broker.
_PRESENCE = """
local changed
if ARGV[1] == 'join' then
  changed = redis.call('SADD', KEYS[3], ARGV[2])
else
  changed = redis.call('SREM', KEYS[3], ARGV[2])
end
local seq
if changed == 1 then
  seq = redis.call('INCR', KEYS[1])
  local body = ARGV[3] .. cmsgpack.pack(seq)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'b', body)
  redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. seq .. ' ' .. body)
else
  seq = tonumber(redis.call('GET', KEYS[1]) or '0')
end
local out = {changed, seq}
if ARGV[1] == 'join' then
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do out[#out + 1] = m end
end
return out
"""

# KEYS: user ; ARGV: broker, hash of the presented token ('' if none), hash of a new token, new sender,
# the name as spelt, the name in lower case. A session resumes under its own spelling only (as in
# Core._hello). A hash without one was written before names were one regardless of case, when
# the key was the name as spelt: its spelling is the key's, the name in lower case.
_CLAIM = """
local cur = redis.call('HMGET', KEYS[1], 'token', 'broker', 'sender', 'rooms', 'name')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'token', ARGV[3], 'broker', ARGV[1], 'sender', ARGV[4], 'rooms', '', 'name', ARGV[5])
  return {'new', ARGV[4], '', ''}
end
if ARGV[2] ~= '' and ARGV[2] == cur[1] and (cur[5] or ARGV[6]) == ARGV[5] then
  redis.call('HSET', KEYS[1], 'broker', ARGV[1], 'name', ARGV[5])
  return {'resumed', cur[3], cur[2], cur[4] or ''}
end
return {'taken', '', cur[2], '', cur[5] or ARGV[6]}
"""

# KEYS: user ; ARGV: broker, the name as spelt, the name in lower case. Deletes the name only
# if that broker still owns it under that spelling (a stale entry of the broker's names, bob,
# must not free Bob's: see _CLAIM for a hash without one), and returns {1, rooms}, so its
# leaves are published only by whoever actually ended it (not by a reaper racing a resume
# elsewhere).
_RELEASE = """
local user = redis.call('HMGET', KEYS[1], 'broker', 'rooms', 'name')
if user[1] == ARGV[1] and (user[3] or ARGV[3]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return {1, user[2] or ''}
end
return {0, ''}
"""

# KEYS[1] = a broker's inbox; ARGV[1] = a name. The ids and bodies of the DMs for
# that name, filtered inside Redis (only they cross the network). Nothing is
# deleted here: the caller deletes them once their replies are queued, so a call
# that times out on our side loses nothing.
_RESCUE = """
local out = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local fields, kind, to, body = entry[2], nil, nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'k' then kind = fields[i + 1]
    elseif fields[i] == 'to' then to = fields[i + 1]
    elseif fields[i] == 'b' then body = fields[i + 1] end
  end
  if kind == 'dm' and to == ARGV[1] then
    out[#out + 1] = entry[1]
    out[#out + 1] = body
  end
end
return out
"""

# KEYS: the broker's alive key, its reaping lock ; ARGV: reaper id, lease (ms).
# The lock is taken only while the broker is still dead: one that came back
# (its alive key refreshed) cannot be reaped.
_LOCK_DEAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: user ; ARGV: broker, rooms (space-separated). Only the owner writes.
_SET_ROOMS = """
if redis.call('HGET', KEYS[1], 'broker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'rooms', ARGV[2])
  return 1
end
return 0
"""


# KEYS: user ; ARGV: broker, token hash, sender, rooms, name as spelt. After an outage: the
# session is ours again (recreated if Redis lost it), unless another broker has it.
_ASSERT = """
local b = redis.call('HGET', KEYS[1], 'broker')
if not b then
  redis.call('HSET', KEYS[1], 'token', ARGV[2], 'broker', ARGV[1], 'sender', ARGV[3], 'rooms', ARGV[4], 'name', ARGV[5])
  return 1
end
if b == ARGV[1] then
  redis.call('HSET', KEYS[1], 'rooms', ARGV[4])
  return 1
end
return 0
"""


class Claim(NamedTuple):
    """The answer to a ``hello`` on the backplane."""

    #: "new", "resumed" or "taken".
    outcome: str
    sender: str
    #: The broker that held the name before (resumed, taken).
    previous: str
    rooms: list[str]
    #: Taken: the name as the session that holds it spells it, if known.
    spelt: str = ""


class Appended(NamedTuple):
    """What the append script said: a new seq, or the first ack of a resent message."""

    new: bool
    seq: int
    ts: int
    digest: str


@dataclass(frozen=True, slots=True)
class PendingMsg:
    room: str
    name: str
    msg_id: str
    digest: str
    ts: int
    head: bytes


def connect(url: str, timeout: float = 1.0) -> redis.Redis | RedisCluster:
    """A client for ``url``: a Redis Cluster when the server says it is part of one.

    No retries, short timeouts: the broker loop waits for every call, so a
    stuck server must fail fast (the core then answers ``unavailable`` and
    backs off) rather than be retried for tens of seconds.
    """
    opts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
    }
    single = redis.Redis.from_url(url, **opts)
    try:
        clustered = single.info("cluster").get("cluster_enabled") == 1
    except Errors:
        single.close()
        raise
    if not clustered:
        return single
    single.close()
    return RedisCluster.from_url(url, **opts)


def shown_url(url: str) -> str:
    """``url`` for a log line: a password in it (redis://:SECRET@host, or ?password=SECRET,
    which redis-py takes too) shown as ***."""
    parsed = urllib.parse.urlparse(url)
    if parsed.password is not None:
        user, host = parsed.username or "", parsed.netloc.rsplit("@", 1)[1]
        parsed = parsed._replace(netloc=f"{user}:***@{host}")
    query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
    if any(key == "password" for key, _value in query):
        masked = [(key, "***" if key == "password" else value) for key, value in query]
        parsed = parsed._replace(query=urllib.parse.urlencode(masked, safe="*"))
    return urllib.parse.urlunparse(parsed)


def url_problem(url: str) -> str | None:
    """Why ``url`` is no backplane address this broker can use (None if it is one)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        return "it must be redis://HOST[:PORT][/DB] (or rediss:// for TLS)"
    try:
        parsed.port  # noqa: B018 (parsing it is the check: a port that is no number raises)
        events_channel(url)
    except ValueError:
        return "its port must be an integer 1-65535, and its database an integer"
    return None


def events_channel(url: str) -> str:
    """The chat's event channel: one per database of a server (a Cluster has only database 0)."""
    parsed = urllib.parse.urlparse(url)
    db = parse_qs(parsed.query).get("db", [parsed.path.strip("/") or "0"])[0]
    return f"{EVENTS_CHANNEL}{int(db)}"


class Backplane:
    """The broker loop's handle on Redis; used by one thread only (the loop).

    The fan-in threads make their own connections with :func:`connect`.
    """

    def __init__(self, url: str, broker_id: str, *, retention: int = DEFAULT_RETENTION, alive_ms: int = 15_000):
        self.url = url
        #: For log lines: without its password.
        self.shown_url = shown_url(url)
        self.id = broker_id
        self.retention = retention
        self.alive_ms = alive_ms
        self.r = connect(url)
        self.channel = events_channel(url)
        self._lock_dead = self.r.register_script(_LOCK_DEAD)
        self._append = self.r.register_script(_APPEND)
        self._presence = self.r.register_script(_PRESENCE)
        self._claim = self.r.register_script(_CLAIM)
        self._release = self.r.register_script(_RELEASE)
        self._set_rooms = self.r.register_script(_SET_ROOMS)
        self._assert = self.r.register_script(_ASSERT)
        self._rescue = self.r.register_script(_RESCUE)
        self.cluster = isinstance(self.r, RedisCluster)

    # ------------------------------------------------------------ lifecycle

    def register(self, now: int) -> str:
        """Announce this broker; returns the chat's epoch (made by the first broker ever)."""
        self.r.set(EPOCH_KEY, hashlib.sha256(f"{self.id}{time.time_ns()}".encode()).hexdigest()[:16], nx=True)
        self.r.hset(BROKERS_KEY, self.id, now)
        self.alive()
        epoch = self.r.get(EPOCH_KEY)
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    def alive(self) -> bool:
        """Refresh this broker's ``alive`` key; False if it had expired (others may have reaped us)."""
        return self.r.set(broker_key(self.id, "alive"), 1, px=self.alive_ms, get=True) is not None

    def close(self) -> None:
        self.r.close()

    # --------------------------------------------------------------- names

    def claim(self, name: str, presented: str | None, new_token: str, new_sender: str) -> Claim:
        # Listed under this broker before the claim: if we die in between, the
        # reaper finds the entry and sees the name is not ours (harmless).
        self.r.sadd(broker_key(self.id, "names"), name)
        older = self._claim_older(name, presented)
        if older is not None:
            if older.outcome == "taken":
                self.r.srem(broker_key(self.id, "names"), name)
            return older
        res = self._claim(
            keys=[user_key(name)],
            args=[
                self.id,
                token_hash(presented) if presented else "",
                token_hash(new_token),
                new_sender,
                name,
                name_key(name),
            ],
        )
        outcome, sender, previous, rooms, *spelt = (_s(x) for x in res)
        if outcome == "taken":
            self.r.srem(broker_key(self.id, "names"), name)
        return Claim(outcome, sender, previous, rooms.split(), *spelt)

    def _claim_older(self, name: str, presented: str | None) -> Claim | None:
        """The claim of a name whose session an older broker keeps (:func:`older_user_key`),
        or None if none does: taken, unless ``presented`` is its token; then resumed here,
        its hash moved to the name's key (the older broker hears of the takeover, as from
        any broker, and drops it: its hash is gone). Not atomic across the two keys (two
        slots on a Cluster): only a rolling upgrade has such sessions."""
        older = older_user_key(name)
        if older is None:
            return None
        token, owner, sender, rooms = self.r.hmget(older, "token", "broker", "sender", "rooms")
        if token is None or owner is None:
            return None
        if not presented or token_hash(presented) != _s(token):
            return Claim("taken", "", _s(owner), [], name)
        # (The claim script makes a new hash of the presented token and the session's sender.)
        outcome = _s(
            self._claim(
                keys=[user_key(name)], args=[self.id, "", token_hash(presented), _s(sender), name, name_key(name)]
            )[0]
        )
        if outcome != "new":
            return Claim("taken", "", "", [])  # held in another case (a session of this version's)
        self.set_rooms(name, _s(rooms or b"").split())
        self._release(keys=[older], args=[_s(owner), name, name])
        return Claim("resumed", _s(sender), _s(owner), _s(rooms or b"").split())

    def release(self, name: str, broker: str | None = None) -> list[str] | None:
        """Free the name if ``broker`` (this one by default) still owns it, spelt so: its
        rooms, whose leaves the caller publishes; None when another broker or spelling has it."""
        owner = broker or self.id
        owned, rooms = self._release(keys=[user_key(name)], args=[owner, name, name_key(name)])
        older = older_user_key(name)
        if not int(owned) and older is not None:
            # An older broker's session (a reaper ends it): under the name as spelt.
            owned, rooms = self._release(keys=[older], args=[owner, name, name])
        self.r.srem(broker_key(owner, "names"), name)
        return _s(rooms).split() if int(owned) else None

    def owns(self, name: str) -> bool:
        return _s(self.r.hget(user_key(name), "broker")) == self.id

    def set_rooms(self, name: str, rooms: Iterable[str]) -> None:
        self._set_rooms(keys=[user_key(name)], args=[self.id, " ".join(sorted(rooms))])

    def owner(self, name: str) -> str | None:
        """The broker the live session spelt ``name`` is on, or None (also while the name
        is another spelling's: a DM routed to bob follows bob, never Bob)."""
        found = self.find(name)
        return found[0] if found is not None and found[1] == name else None

    def find(self, name: str) -> tuple[str, str] | None:
        """The broker a live user of that name in any case is on, and the name as its session
        spells it; or None."""
        owner, spelt = self.r.hmget(user_key(name), "broker", "name")
        if owner is None:
            older = older_user_key(name)
            owner = None if older is None else self.r.hget(older, "broker")
            return None if owner is None else (_s(owner), name)  # an older broker's session
        # A hash without its spelling was written before names were one regardless of
        # case, under the name as spelt: the key's, the name in lower case.
        return _s(owner), name_key(name) if spelt is None else _s(spelt)

    def assert_session(self, name: str, token: str, sender: str, rooms: Iterable[str]) -> bool:
        """Re-assert a live session after an outage; False if another broker has taken it over."""
        self.r.sadd(broker_key(self.id, "names"), name)
        ok = bool(
            self._assert(
                keys=[user_key(name)], args=[self.id, token_hash(token), sender, " ".join(sorted(rooms)), name]
            )
        )
        if not ok:
            self.r.srem(broker_key(self.id, "names"), name)
        return ok

    def listed_names(self) -> set[str]:
        """The names listed under this broker on the backplane."""
        return {_s(n) for n in self.r.smembers(broker_key(self.id, "names"))}

    def forget_session(self, name: str) -> None:
        """A session taken over elsewhere is no longer listed under this broker."""
        self.r.srem(broker_key(self.id, "names"), name)

    # --------------------------------------------------------------- rooms

    def presence(self, op: str, room: str, name: str, head: bytes) -> tuple[bool, int, list[str]]:
        """Join or leave; the presence event is stored and published only if membership changed."""
        if op == "join":
            self.r.sadd(ROOMS_KEY, room)
        res = self._presence(
            keys=[room_key(room, "seq"), room_key(room, "log"), room_key(room, "members")],
            args=[op, name, head, self.retention, self.channel, room],
        )
        return bool(res[0]), int(res[1]), sorted(_s(m) for m in res[2:])

    def append(self, msgs: Sequence[PendingMsg]) -> list[Appended | Exception]:
        """Append messages (in their order), one script call per room.

        On a single server the calls are pipelined into one round trip; a
        Cluster client cannot pipeline scripts, so there it is one round trip
        per room of the batch.
        """
        by_room: dict[str, list[int]] = {}
        for i, m in enumerate(msgs):
            by_room.setdefault(m.room, []).append(i)
        target: Any = self.r if self.cluster else self.r.pipeline(transaction=False)
        replies: list[Any] = []
        for room, indexes in by_room.items():
            bucket = msgs[indexes[0]].ts // (DEDUP_WINDOW_S * 1000)
            args: list[Any] = [self.retention, 3 * DEDUP_WINDOW_S, self.channel, room]
            for i in indexes:
                m = msgs[i]
                args += [m.head, f"{m.name} {m.msg_id}", f"{m.ts} {m.digest}"]
            keys = [
                room_key(room, "seq"),
                room_key(room, "log"),
                room_key(room, f"ids:{bucket}"),
                room_key(room, f"ids:{bucket - 1}"),
            ]
            if self.cluster:
                try:
                    replies.append(self._append(keys=keys, args=args))
                except Errors as exc:
                    replies.append(exc)
            else:
                self._append(keys=keys, args=args, client=target)
        if not self.cluster:
            replies = target.execute(raise_on_error=False)
        out: list[Appended | Exception] = [RuntimeError("not appended")] * len(msgs)
        for (_room, indexes), reply in zip(by_room.items(), replies, strict=True):
            for i, res in zip(
                indexes, reply if not isinstance(reply, Exception) else [reply] * len(indexes), strict=True
            ):
                m = msgs[i]
                if isinstance(res, Exception):
                    out[i] = res
                elif isinstance(res, int):
                    out[i] = Appended(True, res, m.ts, m.digest)
                else:
                    seq, ts, digest = _s(res).split()
                    out[i] = Appended(False, int(seq), int(ts), digest)
        return out

    def history(self, room: str, after: int, limit: int) -> tuple[list[bytes], int]:
        """Bodies of the events with ``seq > after`` (oldest first), and the room's last seq."""
        events, seq = self.events(room, after, limit)
        return [body for _seq, body in events], seq

    def events(self, room: str, after: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
        """(seq, body) of the events with ``seq > after`` (oldest first; some may
        have been trimmed away), and the room's last seq."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xrange(room_key(room, "log"), min=f"{after + 1}-0", count=limit)
        pipe.get(room_key(room, "seq"))
        entries, seq = pipe.execute()
        return [(int(_s(eid).split("-", 1)[0]), fields[b"b"]) for eid, fields in entries], int(seq or 0)

    def first_ack(self, room: str, name: str, msg_id: str, now: int) -> Appended | None:
        """What the append script recorded for ``(name, id)`` in ``room``, if anything."""
        bucket = now // (DEDUP_WINDOW_S * 1000)
        for b in (bucket, bucket - 1):
            found = self.r.hget(room_key(room, f"ids:{b}"), f"{name} {msg_id}")
            if found is not None:
                seq, ts, digest = _s(found).split()
                return Appended(False, int(seq), int(ts), digest)
        return None

    def members(self, room: str) -> list[str]:
        return sorted(_s(m) for m in self.r.smembers(room_key(room, "members")))

    def member_count(self, room: str) -> int:
        return int(self.r.scard(room_key(room, "members")))

    def rooms(self, most: int) -> tuple[list[tuple[str, int, int]], bool]:
        """(room, members, seq) for up to ``most`` rooms, and whether there were more."""
        names = sorted(_s(r) for r in self.r.smembers(ROOMS_KEY))
        listed = names[:most]
        pipe = self.r.pipeline(transaction=False)
        for room in listed:
            pipe.scard(room_key(room, "members"))
            pipe.get(room_key(room, "seq"))
        res = pipe.execute() if listed else []
        return [(room, int(res[2 * i]), int(res[2 * i + 1] or 0)) for i, room in enumerate(listed)], len(names) > most

    def room_seq(self, room: str) -> int:
        return int(self.r.get(room_key(room, "seq")) or 0)

    def room_seqs(self, rooms: Sequence[str]) -> list[int]:
        """The last seq of each room, in one round trip (a pipeline per node on a Cluster)."""
        pipe = self.r.pipeline(transaction=False)
        for room in rooms:
            pipe.get(room_key(room, "seq"))
        return [int(v or 0) for v in pipe.execute()]

    # ----------------------------------------------------------------- DMs

    def send_to_broker(self, broker: str, kind: str, name: str, body: bytes = b"") -> None:
        """Put a DM (``kind`` "dm", body the event) into a broker's inbox, or a
        takeover notice (``kind`` "takeover") into its notices.

        That broker deletes each entry once its loop has handled it (handed the DM
        to its user, or forwarded it): a DM passes through Redis, it is not kept
        there. Notices have a Stream of their own
        (same slot): a failover of thousands of sessions leaves thousands of
        them with a dead broker, and they must not trim its DMs away.
        """
        self.r.xadd(
            broker_key(broker, "notices" if kind == "takeover" else "inbox"),
            {"k": kind, "to": name, "b": body},
            maxlen=INBOX_MAXLEN,
            approximate=True,
        )

    def waiting_dms(self, broker: str, name: str) -> list[tuple[bytes, bytes]]:
        """The DMs for ``name`` still waiting in ``broker``'s inbox, as (entry id, body), oldest first.

        After a takeover they would wait there for a reader that is gone (a
        broker that died): the new owner hands them over, then calls
        :meth:`drop_dms`. A live old broker also forwards what it reads for a
        session it no longer has; a copy that arrives twice is dropped by the
        client (it knows DMs by sender and id).
        """
        flat: Any = self._rescue(keys=[broker_key(broker, "inbox")], args=[name]) or []
        return [(bytes(flat[i]), bytes(flat[i + 1])) for i in range(0, len(flat), 2)]

    def drop_dms(self, broker: str, ids: Sequence[bytes]) -> None:
        self.drop_entries(broker_key(broker, "inbox"), ids)

    def take_dms(self, broker: str, name: str) -> list[bytes]:
        """The bodies of :meth:`waiting_dms`, deleted from the inbox (whoever calls hands them on)."""
        waiting = self.waiting_dms(broker, name)
        self.drop_dms(broker, [entry for entry, _body in waiting])
        return [body for _entry, body in waiting]

    def drop_entries(self, stream: str, ids: Sequence[bytes]) -> None:
        """Delete entries of a broker's inbox or notices Stream (handed over, or handled)."""
        if ids:
            self.r.xdel(stream, *ids)

    # -------------------------------------------------------------- reaper

    def dead_brokers(self) -> list[str]:
        """Registered brokers whose ``alive`` key has expired."""
        ids = [_s(b) for b in self.r.hkeys(BROKERS_KEY)]
        others = [b for b in ids if b != self.id]
        if not others:
            return []
        pipe = self.r.pipeline(transaction=False)
        for b in others:
            pipe.exists(broker_key(b, "alive"))
        return [b for b, alive in zip(others, pipe.execute(), strict=True) if not alive]

    def lock_reap(self, broker: str) -> bool:
        """Take the lock on ending ``broker``'s sessions (a lease: whoever holds it may go on)."""
        return bool(self.r.set(broker_key(broker, "reaping"), self.id, nx=True, px=60_000))

    def lock_dead(self, broker: str) -> bool:
        """Take that lock only if ``broker`` is (still) dead, or renew it if we hold it."""
        key = broker_key(broker, "reaping")
        if _s(self.r.get(key) or b"") == self.id and not self.r.exists(broker_key(broker, "alive")):
            self.r.pexpire(key, 60_000)
            return True
        return bool(self._lock_dead(keys=[broker_key(broker, "alive"), key], args=[self.id, 60_000]))

    def unlock_reap(self, broker: str) -> None:
        self.r.delete(broker_key(broker, "reaping"))

    def registered(self, broker: str) -> bool:
        """Whether ``broker`` is still listed (a reaper unlists it when done)."""
        return bool(self.r.hexists(BROKERS_KEY, broker))

    def reap(self, dead: str, leave_head: Any) -> int:
        """End up to REAP_SLICE sessions a dead broker left behind (the rest on
        later ticks): publish their leaves, free their names. Unlists the broker
        when none is left.

        ``leave_head(room, name)`` makes the unsequenced presence body. Only one
        survivor reaps a given broker, and only while it stays dead (the lock
        is taken, and renewed each slice, only if its alive key is missing).
        Returns how many sessions were ended.
        """
        if not self.lock_dead(dead):
            return 0
        names = [_s(n) for n in self.r.srandmember(broker_key(dead, "names"), REAP_SLICE) or ()]
        ended = self.end_sessions(dead, names, leave_head)
        if self.r.exists(broker_key(dead, "alive")):
            self.unlock_reap(dead)  # it came back meanwhile: from here on, it takes its sessions back
        elif len(names) < REAP_SLICE and not self.r.scard(broker_key(dead, "names")):
            self.r.delete(broker_key(dead, "names"), broker_key(dead, "inbox"), broker_key(dead, "notices"))
            self.r.hdel(BROKERS_KEY, dead)
            self.unlock_reap(dead)
        return ended

    def end_sessions(self, broker: str, names: Iterable[str], leave_head: Any) -> int:
        """End the named sessions that ``broker`` still owns: leaves published, names freed."""
        ended = 0
        for name in names:
            rooms = self.release(name, broker)
            if rooms is None:
                continue  # resumed elsewhere: alive and well
            for room in rooms:
                self.presence("leave", room, name, leave_head(room, name))
            ended += 1
        return ended


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
