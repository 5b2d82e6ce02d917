"""Threads that listen to the backplane and hand what they hear to the broker loop.

Each thread owns one Redis connection and one inproc PUSH socket (never shared:
one socket per thread); the loop owns the PULL end. Frames sent to the loop:

- ``[b"ev", b"ROOM SEQ BODY"]``: a room event, from any broker (ours included);
- ``[b"sync"]``: the event subscription was (re)made: events may have been missed;
- ``[b"in", kind, name, body, stream, entry id]``: an entry of this broker's inbox
  (a DM for one of our users) or of its notices (a session taken over by another
  broker). The entry stays in Redis until the loop has handled it and deletes it: a
  broker that stops with entries read but not handled leaves them for the broker
  its users resume on (which hands over the DMs it finds in the old inbox).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from broker import backplane as bpmod

log = logging.getLogger("zchat.broker")

FANIN_ENDPOINT = "inproc://zchat-fanin"
#: How long a blocking read waits, so a stop is noticed within this (s).
POLL_S = 0.2
#: Waits before reconnecting after a lost connection: doubling from the first while
#: tries fail, up to the last (s).
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class _Listener(threading.Thread):
    def __init__(self, ctx: zmq.Context[Any], url: str, stop: threading.Event, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self.url = url
        self.stop = stop
        #: Set by listen() (through :meth:`connected`) once its connection works: the next
        #: failure is a new one, retried after BACKOFF_FIRST_S again (listen() only ever ends
        #: by raising).
        self.up = False
        #: A loss was logged and its recovery not yet: said once it is back.
        self._lost = False

    def run(self) -> None:
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(FANIN_ENDPOINT)
        backoff = BACKOFF_FIRST_S
        try:
            while not self.stop.is_set():
                try:
                    self.listen(push.send_multipart)
                except Exception as exc:
                    if self.up:
                        self.up, backoff = False, BACKOFF_FIRST_S
                    if isinstance(exc, bpmod.Errors):
                        self._lost = True  # said below: its recovery will be said too
                        reason = str(exc).rstrip(".")  # redis-py's texts end with one
                        log.warning(
                            "%s: backplane connection lost (%s); retrying in %.1f s", self.name, reason, backoff
                        )
                    else:
                        # Never die: a broker whose listener is gone acks but never publishes.
                        log.exception("%s: unexpected error; restarting in %.1f s", self.name, backoff)
                    self.stop.wait(backoff)
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
        finally:
            push.close()

    def listen(self, send: Callable[[list[bytes]], Any]) -> None:
        raise NotImplementedError

    def connected(self) -> None:
        """listen() has a working connection (cheap: called at every read)."""
        self.up = True
        if self._lost:
            self._lost = False
            # An operator who read "connection lost" must also read that it came back.
            log.warning("%s: backplane connection back", self.name)


class EventListener(_Listener):
    """Every room event of the chat, from Redis pub/sub."""

    def __init__(self, ctx: zmq.Context[Any], url: str, stop: threading.Event) -> None:
        super().__init__(ctx, url, stop, "zchat-events")
        self.channel = bpmod.events_channel(url)

    def listen(self, send: Callable[[list[bytes]], Any]) -> None:
        r: Any = bpmod.connect(self.url)
        pubsub = r.pubsub()
        try:
            pubsub.subscribe(self.channel)
            while not self.stop.is_set():
                m = pubsub.get_message(timeout=POLL_S)
                if m is None:
                    continue
                if m["type"] == "message":
                    send([b"ev", m["data"]])
                elif m["type"] == "subscribe":
                    self.connected()
                    # Pub/sub is at-most-once: whatever was published while we were
                    # not subscribed is recovered from the room logs by the loop.
                    send([b"sync"])
        finally:
            pubsub.close()
            r.close()


class InboxListener(_Listener):
    """This broker's inbox Stream (DMs for its users) and its notices Stream (takeovers)."""

    def __init__(self, ctx: zmq.Context[Any], url: str, stop: threading.Event, broker_id: str) -> None:
        super().__init__(ctx, url, stop, "zchat-inbox")
        # Two Streams of one hash tag (one slot): takeover notices, one per
        # session that moved away, never crowd DMs out of the inbox's trim
        # bound, and a new owner looking for DMs left there scans DMs only.
        self.last = {bpmod.broker_key(broker_id, "inbox"): "0-0", bpmod.broker_key(broker_id, "notices"): "0-0"}

    def listen(self, send: Callable[[list[bytes]], Any]) -> None:
        r: Any = bpmod.connect(self.url, timeout=POLL_S + 2)
        try:
            while not self.stop.is_set():
                res = r.xread(dict(self.last), count=256, block=int(POLL_S * 1000))
                self.connected()
                for raw_key, entries in res or ():
                    key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                    stream = key.encode()
                    for entry_id, fields in entries:
                        entry = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
                        fields_of = (fields.get(b"k", b""), fields.get(b"to", b""), fields.get(b"b", b""))
                        # Not deleted here: read now, it may never be handled (the loop stopping).
                        send([b"in", *fields_of, stream, entry])
                        self.last[key] = entry_id
        finally:
            r.close()
