"""The broker's decisions when several brokers share one chat over a backplane.

:class:`ClusterCore` keeps every rule of :class:`broker.core.Core` (validation,
limits, who may do what) and moves what must be shared to the backplane:
``seq`` and the room logs, names and resume tokens, membership, DM routing.
The local state it keeps is only about this broker's own connections.

Unlike ``Core`` it is not pure: hellos, joins, leaves, ``who``, ``rooms`` and
DMs to other brokers ask the backplane synchronously (they are rare), while
room messages, the hot path, are queued and appended in one pipelined round
trip per loop pass by :meth:`flush`, before any reply of that pass is sent.
Any synchronous call first flushes what is queued, so one client's requests
keep their order. When the backplane fails, the request gets ``unavailable``
and the core stops asking for a backoff period; :meth:`tick` reconnects and
re-asserts this broker's sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker import backplane as bpmod
from broker.backplane import Backplane, PendingMsg
from broker.core import (
    MAX_ROOMS_LISTED,
    Action,
    Bucket,
    Core,
    PeerInfo,
    Reply,
    Session,
    dm_where,
    rooms_full,
    sessions_text,
)
from zchat import protocol as p
from zchat.protocol import Envelope, ErrorCode, ProtocolError

log = logging.getLogger("zchat.broker")

#: After a backplane failure, requests are refused at once for this long (ms),
#: doubling up to BACKOFF_MAX_MS until a reconnect succeeds.
BACKOFF_MIN_MS = 250
BACKOFF_MAX_MS = 5000


class BackplaneDown(Exception):
    """The backplane is known to be unreachable (within the backoff period)."""


#: What makes a request fail with ``unavailable``.
_Failures: tuple[type[Exception], ...] = (BackplaneDown, *bpmod.Errors)


class ClusterCore(Core):
    def __init__(self, *, backplane: Backplane, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bp = backplane
        self._pack: Callable[[Any], bytes] = p.Encoder()
        #: Room messages of this pass, appended by flush(): (message, its ack).
        self._pending: list[tuple[PendingMsg, Envelope]] = []
        self.down_until = 0
        self._backoff = BACKOFF_MIN_MS
        self.down = False
        self._presumed_dead = False
        #: Set when the backplane's epoch changed; the loop resets what it published and clears it.
        self.epoch_changed = False
        #: Our sessions with DMs left in our inbox for them (see :meth:`park`): name -> the
        #: connection that could not take them. Handed over once the session is on another.
        self._parked: dict[str, bytes] = {}
        #: Names whose session ended with DMs parked: those are deleted (retried each tick
        #: until the backplane does it), never handed to a later session of the name.
        self._parked_ended: set[str] = set()
        #: Why sessions ended while the backplane was down (their leaves are published once it
        #: is back, by _resync): a bye or a revocation then still reads as such, not as a timeout.
        self._ended_why: dict[str, p.LeaveReason] = {}

    # ------------------------------------------------------------ plumbing

    def handle(
        self, identity: bytes, frame: bytes, now: int, user: str | None = None, meta: PeerInfo | None = None
    ) -> list[Action]:
        try:
            return super().handle(identity, frame, now, user, meta)
        except _Failures as exc:
            if not isinstance(exc, BackplaneDown):
                self._failed(exc, now)
            return [Reply(identity, p.error(ErrorCode.UNAVAILABLE, UNAVAILABLE_TEXT, _request_id(frame)))]

    def backplane_usable(self, now: int) -> bool:
        """False during the backoff after a failure: do not even try."""
        return not (self.down and now < self.down_until)

    def backplane_failed(self, exc: BaseException, now: int) -> None:
        """The loop's own backplane calls (history, fan-in) failed: back off as for requests."""
        self._failed(exc, now)

    def _up(self) -> None:
        """Raise BackplaneDown during the backoff after a failure; flush queued messages first."""
        if self.down and self._clock < self.down_until:
            raise BackplaneDown
        self.flush()

    def _failed(self, exc: BaseException, now: int) -> None:
        if not self.down:
            reason = str(exc).rstrip(".")  # redis-py's texts end with one
            log.error(
                "backplane %s unreachable: %s; answering 'unavailable' until it is back", self.bp.shown_url, reason
            )
        self.down = True
        self.down_until = now + self._backoff
        self._backoff = min(BACKOFF_MAX_MS, self._backoff * 2)

    def _head(self, env: Envelope) -> bytes:
        """The event without its ``seq`` value: the backplane's script appends it.

        ``env`` has no ``seq`` key; the head is a map of one more entry whose last
        key is ``seq``, so head + packed int is the complete envelope.
        """
        body = self._pack(env)
        if body[0] & 0xF0 != 0x80 or body[0] & 0x0F >= 15:
            raise AssertionError("events are small fixmaps")
        return bytes((body[0] + 1,)) + body[1:] + b"\xa3seq"

    def _presence_head(self, room: str, name: str, event: str, now: int, reason: p.LeaveReason | None = None) -> bytes:
        env = p.presence_event(room, 0, now, name, event, reason)
        del env["seq"]
        return self._head(env)

    def flush(self) -> None:
        """Append the queued room messages; fill in their acks (or turn them into errors)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        results: list[bpmod.Appended | Exception]
        try:
            if self.down and self._clock < self.down_until:
                raise BackplaneDown
            results = self.bp.append([m for m, _ in batch])
        except _Failures as exc:
            if not isinstance(exc, BackplaneDown):
                self._failed(exc, self._clock)
            results = [exc] * len(batch)
        failure = next((r for r in results if isinstance(r, bpmod.Errors)), None)
        if failure is not None and not self.down:
            self._failed(failure, self._clock)  # (a Cluster node may fail alone: back off all the same)
        for (m, ack), res in zip(batch, results, strict=True):
            if isinstance(res, Exception):
                if not isinstance(res, _Failures):
                    log.error("append to #%s failed: %s", m.room, res)
                _become(ack, p.error(ErrorCode.UNAVAILABLE, UNAVAILABLE_TEXT, m.msg_id))
                if (session := self.by_name.get(m.name)) is not None:
                    # Its session's later messages wait for it (see hold_rooms): the first
                    # refused is this one, not one refused later at the door while down.
                    self.hold_rooms(session, self._clock, m.msg_id)
            elif res.new or res.digest == m.digest:
                # New, or a resend (maybe to another broker): the first ack again.
                ack["seq"], ack["ts"] = res.seq, res.ts
                if res.seq > self.seqs.get(m.room, 0):
                    self.seqs[m.room] = res.seq
            else:
                _become(
                    ack,
                    p.error(
                        ErrorCode.BAD_ENVELOPE,
                        f"id {m.msg_id!r} was already used for another message: ids must be unique per name",
                        m.msg_id,
                    ),
                )

    def clock_stepped(self, step_ms: int) -> None:
        """As Core's; the backoff before the next try at the backplane keeps its pace too."""
        super().clock_stepped(step_ms)
        if self.down:
            self.down_until += step_ms

    def tick(self, now: int) -> list[Action]:
        """Every few hundred ms: stay alive on the backplane, reap dead brokers, recover."""
        try:
            return self._tick(now)
        except Exception:
            # Whatever goes wrong here must not end the loop: it is retried next tick.
            log.exception("backplane housekeeping failed")
            self._failed(RuntimeError("housekeeping failed"), now)
            return []

    def _tick(self, now: int) -> list[Action]:
        self._clock = now
        if self.down:
            if now < self.down_until:
                return []
            try:
                self.bp.r.ping()
                self._resync(now)
            except bpmod.Errors as exc:
                self._failed(exc, now)
                return []
            log.warning("backplane %s is back; sessions re-asserted", self.bp.shown_url)
            self.down = False
            self._backoff = BACKOFF_MIN_MS
            return []
        try:
            if not self.bp.alive() or self._presumed_dead:
                self._come_back(now)
            for dead in self.bp.dead_brokers():
                ended = self.bp.reap(dead, lambda room, name: self._presence_head(room, name, "leave", now, "timeout"))
                if ended:
                    log.warning("broker %s is gone: ended its %s", dead, sessions_text(ended))
        except bpmod.Errors as exc:
            self._failed(exc, now)
            return []
        return self._hand_over_parked(now) if self._parked or self._parked_ended else []

    def _come_back(self, now: int) -> None:
        """Our alive key had expired (the loop stalled longer than its lifetime):
        survivors may be ending our sessions. Once nobody is (we hold the reaping
        lock ourselves, or a reaper has finished), make our sessions ours again."""
        if not self._presumed_dead:
            log.warning("this broker was presumed dead on the backplane; taking its sessions back")
            self._presumed_dead = True
        me = self.bp.id
        if self.bp.lock_reap(me):
            try:
                self._resync(now)
            finally:
                self.bp.unlock_reap(me)
        elif self.bp.registered(me):
            return  # a survivor is ending our sessions right now: after it is done
        else:
            self._resync(now)  # it is done: start over, joins and all
        self._presumed_dead = False
        log.warning("sessions re-asserted after this broker was presumed dead")

    def _resync(self, now: int) -> None:
        """After an outage: our live sessions are ours again, and the ones that ended meanwhile end there too."""
        epoch = self.bp.register(now)
        if epoch != self.epoch:
            # Redis lost the chat (no persistence?): seq starts over. Every client
            # must start over too: its session ends here without a word, so its
            # next request gets not_registered, it says hello again and learns
            # the new epoch from the welcome.
            log.error(
                "the backplane lost its data (epoch %s -> %s): ending the %s here so clients start over",
                self.epoch,
                epoch,
                sessions_text(len(self.by_name)),
            )
            self.epoch = epoch
            self.seqs.clear()
            self.epoch_changed = True
            for session in list(self.by_name.values()):
                self._drop_local(session)
            self._ended_why.clear()
            return
        for session in list(self.by_name.values()):
            if not self.bp.assert_session(session.name, session.token, session.sender, session.rooms):
                log.info("session %s was taken over elsewhere during the outage", session.name)
                self._drop_local(session)
                continue
            for room in sorted(session.rooms):
                self.bp.presence("join", room, session.name, self._presence_head(room, session.name, "join", now))
        gone = self.bp.listed_names() - set(self.by_name)
        why = self._ended_why
        if gone:
            self.bp.end_sessions(
                self.bp.id,
                gone,
                lambda room, name: self._presence_head(room, name, "leave", now, why.get(name, "timeout")),
            )
        why.clear()

    # --------------------------------------------------- from other brokers

    def inbox(self, kind: str, name: str, body: bytes, now: int) -> list[Action]:
        """A DM for one of our users, or word that another broker took a session over."""
        self._clock = now
        # As spelt: a DM is for the session it was routed to, which a later session of the
        # name in another case (once that one ended) is not; a takeover notice names the
        # session as it spells itself (a session resumes under its own spelling only).
        session = self.by_name.get(name)
        try:
            if kind == "takeover":
                if session is not None and not self.bp.owns(name):
                    log.info("session moved to another broker: %s (%s)", name, session.identity.hex())
                    if name in self._parked:
                        self._forward_parked(name)
                    self._drop_local(session)
                    self.bp.forget_session(name)
                    # No session_moved here, unlike Core._hello: a notice read late may
                    # concern a session that has since come back to this broker on a new
                    # connection (during a backoff, unclaimed), and that client must not
                    # be stopped. A second client with the token on another broker gets
                    # not_registered, as before.
                return []
            if kind == "dm":
                if session is not None:
                    try:
                        event = p.decode(body, p.MAX_REPLY_BYTES)
                    except ProtocolError as exc:
                        log.error("unreadable DM for %s in the inbox dropped: %s", name, exc)
                        return []
                    return [Reply(session.identity, event)]
                owner = self.bp.owner(name)
                if owner is not None and owner != self.bp.id:
                    self.bp.send_to_broker(owner, "dm", name, body)  # moved on meanwhile: follow it
                else:
                    log.info("DM for %s dropped: the session ended before it arrived", name)
        except bpmod.Errors as exc:
            self._failed(exc, now)
        return []

    def _name_taken(
        self, name: str, rid: str | None, holder: Session | None = None, now: int = 0, spelt: str = ""
    ) -> ProtocolError:
        """``spelt``: the holder's spelling, as the backplane says it (a holder on another broker)."""
        if holder is not None:
            # On this broker: its session is known, and so is when it would end, as with one broker.
            held = self._why_taken(name, holder, now)
        elif spelt and spelt != name:
            held = f"{spelt!r} is in use, and names that differ only in case are one name"
        else:
            # The holder may be on another broker: what this one knows of it is not all.
            held = (
                f"a session that ended without a bye holds its name up to {self.expiry_ms / 1000:g} s, "
                f"up to about {self.bp.alive_ms / 1000:g} s when its broker stopped"
            )
        return ProtocolError(ErrorCode.NAME_TAKEN, f"the name {name!r} is taken in this chat ({held})", rid)

    def park(self, name: str, identity: bytes) -> None:
        """A DM in our inbox for ``name`` could not go to its connection ``identity`` (gone:
        the client is about to resume): it stays in the inbox. Handed over once the
        session is on a new connection (:meth:`_hand_over_parked`, at its resume here and
        at each tick until the backplane does it), by the broker it resumes on if that is
        another (its rescue of our inbox), to the new owner if a takeover notice comes
        first; deleted if the session ends."""
        self._parked.setdefault(name, identity)

    def _hand_over_parked(self, now: int) -> list[Action]:
        """DMs parked for sessions now on another connection, and deletion of those of ended ones."""
        actions: list[Action] = []
        if self.down and now < self.down_until:
            return actions
        for name, identity in list(self._parked.items()):
            session = self.by_name.get(name)
            if session is None:
                del self._parked[name]
                self._parked_ended.add(name)
            elif session.identity != identity:
                rescued = self._rescue_dms(session, self.bp.id)
                if rescued is None:
                    return actions  # the backplane failed: next tick
                del self._parked[name]
                actions.extend(rescued)
        for name in list(self._parked_ended):
            try:
                dropped = self.bp.take_dms(self.bp.id, name)
            except bpmod.Errors as exc:
                self._failed(exc, now)
                return actions
            self._parked_ended.discard(name)
            if dropped and name not in self.by_name:
                log.info("%d DM(s) for %s dropped: the session ended before it came back", len(dropped), name)
        return actions

    def drop_handled(self, entries: dict[str, list[bytes]]) -> None:
        """Delete entries of this broker's inbox and notices that :meth:`inbox` has handled.

        Should the backplane fail here, they stay: a resume of their user on another
        broker may hand a DM over a second time, which the client drops (it knows DMs
        by sender and id); nothing is lost.
        """
        try:
            for stream, ids in entries.items():
                self.bp.drop_entries(stream, ids)
        except bpmod.Errors as exc:
            log.warning("handled inbox entries not deleted from the backplane: %s", exc)
            self._failed(exc, self._clock)

    def _drop_local(self, session: Session) -> None:
        """Forget a session here without a word to anyone (it lives on elsewhere)."""
        self._parked.pop(session.name, None)  # (see _forward_parked)
        self._detach(session)
        for room in session.rooms:
            self._drop_member(room, session.name)

    # ------------------------------------------------------------ requests

    def _end(self, session: Session, now: int, reason: p.LeaveReason) -> list[Action]:
        self._owe(session, now)
        if self._parked.pop(session.name, None) is not None:
            # Not kept for a session that ends (as with one broker): nobody resumes it.
            self._parked_ended.add(session.name)
        self._drop_local(session)
        try:
            self._up()
            # Freed only if still ours (atomically): a session resumed elsewhere
            # meanwhile is left alone, and nobody sees it leave.
            rooms = self.bp.release(session.name)
            for room in sorted(rooms or ()):
                head = self._presence_head(room, session.name, "leave", now, reason)
                self.bp.presence("leave", room, session.name, head)
        except BackplaneDown:
            self._ended_why[session.name] = reason  # _resync ends it on the backplane once it is back
        except bpmod.Errors as exc:
            self._ended_why[session.name] = reason
            self._failed(exc, now)
        return []

    def _hello(self, identity: bytes, session: Session | None, env: Envelope, now: int) -> list[Action]:
        name: str = env["name"]
        if session is not None:
            return super()._hello(identity, session, env, now)  # a second hello on this connection
        holder = self.named(name)
        if holder is not None and holder.name != name:
            # Here under another spelling: the same name (Core._hello says so).
            return super()._hello(identity, session, env, now)
        if holder is not None:
            # A resume on this broker: local rules, but the backplane must say
            # we own the name again (it may have moved away and back meanwhile).
            presented = env.get("resume")
            moved_from = None
            if presented is not None and not (self.down and self._clock < self.down_until):
                self.flush()
                claim = self.bp.claim(name, presented, holder.token, holder.sender)
                if claim.outcome == "resumed" and claim.previous and claim.previous != self.bp.id:
                    self.bp.send_to_broker(claim.previous, "takeover", name)
                    moved_from = claim.previous
            actions = super()._hello(identity, session, env, now)
            back = self.by_name.get(name)
            if back is not None and back.identity == identity:
                if moved_from is not None:
                    actions.extend(self._rescue_dms(back, moved_from) or ())
                if name in self._parked:
                    actions.extend(self._hand_over_parked(now))
            return actions
        rid = env.get("id")
        presented = env.get("resume")
        # With a token this may be a resume from another broker (a failover): the
        # per-host limit is for new sessions only, known after the claim.
        refused = self._full(rid) if presented is None else self._broker_full(rid)
        if refused is not None:
            return self.reject(identity, refused)
        self._up()
        token, sender = self._new_token(), self._new_sender()
        claim = self.bp.claim(name, presented, token, sender)
        if claim.outcome == "taken":
            return self.reject(identity, self._name_taken(name, rid, spelt=claim.spelt))
        resumed = claim.outcome == "resumed"
        if not resumed and presented is not None:
            refused = self._host_full(rid)
            if refused is not None:
                self.bp.release(name)
                return self.reject(identity, refused)
        if resumed and presented is not None:
            token, sender = presented, claim.sender
            if claim.previous and claim.previous != self.bp.id:
                self.bp.send_to_broker(claim.previous, "takeover", name)
            self._log_session(
                now, "session resumed from broker %s: %s (%s)", claim.previous or "?", name, identity.hex()
            )
        limits = self.limits
        session = Session(
            identity,
            name,
            sender,
            token,
            now,
            sends=_bucket(limits.burst, now),
            joins=_bucket(limits.join_burst, now),
            host=self._hello_host,
        )
        if resumed:
            session.rooms = set(claim.rooms)
            for room in session.rooms:
                self.members.setdefault(room, {})[name] = session
        self._attach(session)
        if not resumed:
            self._log_session(
                now, "session start: %s (%s) from %s sender=%s", name, identity.hex(), self._hello_host, sender
            )
        actions = self._welcome(session, resumed, rid)
        if resumed and claim.previous and claim.previous != self.bp.id:
            actions.extend(self._rescue_dms(session, claim.previous) or ())
        return actions

    def _forward_parked(self, name: str) -> None:
        """The session of DMs parked here moved to another broker before it took them
        from our inbox: they follow it there, as a DM that comes after the move does."""
        try:
            owner = self.bp.owner(name)
            waiting = self.bp.waiting_dms(self.bp.id, name)
            if owner is not None and owner != self.bp.id:
                for _entry, body in waiting:
                    self.bp.send_to_broker(owner, "dm", name, body)
            # Deleted once sent on: a failure before that leaves them here, not lost.
            self.bp.drop_dms(self.bp.id, [entry for entry, _body in waiting])
        except bpmod.Errors as exc:
            log.warning("DMs for %s left in this broker's inbox not forwarded: %s", name, exc)
            self._failed(exc, self._clock)

    def _rescue_dms(self, session: Session, previous: str) -> list[Action] | None:
        """DMs routed to the broker this session came from, and not handed over there;
        None if the backplane failed.

        After the welcome, whatever happens: a backplane that fails here costs
        the rescue (the DMs stay where they are, and go with the old inbox when
        that broker is reaped), not the resume.
        """
        actions: list[Action] = []
        try:
            for body in self.bp.take_dms(previous, session.name):
                try:
                    actions.append(Reply(session.identity, p.decode(body, p.MAX_REPLY_BYTES)))
                except ProtocolError as exc:
                    log.error("unreadable DM for %s in the inbox of %s dropped: %s", session.name, previous, exc)
        except bpmod.Errors as exc:
            log.warning("DMs for %s in the inbox of broker %s not taken over: %s", session.name, previous, exc)
            self._failed(exc, self._clock)
            return None
        if actions:
            log.info("%d DM(s) for %s taken from the inbox of broker %s", len(actions), session.name, previous)
        return actions

    def _join(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        listed = env.get("members", True)
        if listed:
            self._check_bulk(session, now)  # (as Core._join)
        self._up()
        if room not in session.rooms:
            if len(session.rooms) >= self.limits.max_rooms:
                raise ProtocolError(ErrorCode.LIMIT_REACHED, rooms_full(self.limits.max_rooms))
            self._throttle_join(session, now)
            _, seq, names = self.bp.presence(
                "join", room, session.name, self._presence_head(room, session.name, "join", now)
            )
            session.rooms.add(room)
            self.members.setdefault(room, {})[session.name] = session
            self.bp.set_rooms(session.name, session.rooms)
            members: list[str] | int = names if listed else len(names)
        else:
            seq, members = self.bp.room_seq(room), (self.bp.members(room) if listed else self.bp.member_count(room))
        if seq > self.seqs.get(room, 0):
            self.seqs[room] = seq
        return [self._joined(session, env, room, seq, members, now)]

    def _leave(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        if room not in session.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in #{room}")
        self._up()
        self._throttle_join(session, now)
        self.bp.presence("leave", room, session.name, self._presence_head(room, session.name, "leave", now))
        session.rooms.discard(room)
        self._drop_member(room, session.name)
        self.bp.set_rooms(session.name, session.rooms)
        return [self._reply(session, {"type": "left", "room": room}, env)]

    def _msg(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        if room not in session.rooms:
            # A resend of a message stored before we left gets its first ack again.
            self._up()
            first = self.bp.first_ack(room, session.name, env["id"], now)
            if first is not None and first.digest == bpmod.text_digest(env["text"], env.get("action", False)):
                return [
                    Reply(
                        session.identity,
                        {"type": "ack", "id": env["id"], "room": room, "seq": first.seq, "ts": first.ts},
                    )
                ]
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join #{room} before writing to it")
        if self.down and now < self.down_until:
            self.hold_rooms(session, now, env["id"])
            raise BackplaneDown
        text: str = env["text"]
        self._check_text(text)
        self._throttle_send(session, now, env["id"])
        msg_id: str = env["id"]
        action: bool = env.get("action", False)
        event = p.msg_event(room, 0, now, session.name, session.sender, text, msg_id, action)
        del event["seq"]
        ack: Envelope = {"type": "ack", "id": msg_id, "room": room, "seq": 0, "ts": now}
        pending = PendingMsg(room, session.name, msg_id, bpmod.text_digest(text, action), now, self._head(event))
        self._pending.append((pending, ack))
        # Sent after flush() has filled in the seq (or made it an error).
        return [Reply(session.identity, ack)]

    def _dm(self, session: Session, env: Envelope, now: int) -> list[Action]:
        to: str = env["to"]
        if self.named(to) is not None:
            return super()._dm(session, env, now)
        first = self._acked.get((session.name, env["id"]))
        if first is not None:
            return self._resent(session, first, dm_where(to), env["text"])
        self._up()
        found = self.bp.find(to)
        if found is None:
            self._dm_refused(session, to, env["id"], now)
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {to!r} is online")
        owner, to = found  # as its owner spells it: its broker's inbox knows it so
        # Handed over here and now (to its broker's inbox): an earlier DM to them that
        # was refused goes first, as with a recipient of ours (Core._dm_held).
        self._refuse_if_held(session, to, env["id"], now)
        self._check_text(env["text"])
        self._throttle_send(session, now, env["id"], dm=True)
        event = p.dm_event(session.name, session.sender, to, env["text"], now, env["id"])
        # Private: through the recipient's broker's inbox, never a room log or PUB.
        self.bp.send_to_broker(owner, "dm", to, self._pack(event))
        self._dm_released(session, to, env["id"])
        ack: Envelope = {"type": "ack", "id": env["id"], "to": to, "ts": now}
        self._remember_ack(session.name, ack, "@" + to, hash(env["text"]))
        return [Reply(session.identity, ack)]

    def _who(self, session: Session, env: Envelope, now: int) -> list[Action]:
        room: str = env["room"]
        self._check_bulk(session, now)
        self._up()
        return [
            self._reply(session, self._listed(session, {"type": "who", "room": room}, self.bp.members(room), now), env)
        ]

    def _room_list(self) -> tuple[list[tuple[str, int, int]], bool]:
        self._up()
        rooms, truncated = self.bp.rooms(MAX_ROOMS_LISTED)
        return list(rooms), truncated


UNAVAILABLE_TEXT = "the broker cannot reach its backplane; nothing was stored, retry shortly"


def _bucket(burst: int, now: int) -> Bucket:
    return Bucket(float(burst), now)


def _become(env: Envelope, other: Envelope) -> None:
    """Turn a reply that is already queued into another one (it is encoded only after flush)."""
    env.clear()
    env.update(other)


def _request_id(frame: bytes) -> str | None:
    try:
        rid = p.decode(frame).get("id")
    except ProtocolError:
        return None
    return rid if isinstance(rid, str) and len(rid) <= p.MAX_ID_CHARS else None
