"""When a room's presence events go out: a join storm in a big room batched, a lone join at once.

A room's presence events (joins, leaves) that come within PRESENCE_HOLD_MS of
the last ones it published wait out the rest of that time and then go out
together, as one batch. A lone join goes at once; a storm (the members of a
big room reconnecting after a restart) costs each member one frame per
PRESENCE_HOLD_MS instead of one per join, and the broker as many fewer
messages to queue and write per subscriber. Anything else for a room goes at
once, after what the room held, so a room's events keep their order.

Pure: no sockets, no clock of its own. The loop passes each pass's events
per room in, publishes what comes back, and asks again at :attr:`due`.
"""

from __future__ import annotations

import math

from zchat import protocol as p

PRESENCE_HOLD_MS = 50


class PresenceHold:
    def __init__(self, hold_ms: float = PRESENCE_HOLD_MS) -> None:
        self.hold_ms = hold_ms
        #: room -> its presence events waiting, in order.
        self.held: dict[str, list[bytes]] = {}
        #: room -> when it last published presence (ms); forgotten once older than hold_ms.
        self._sent_at: dict[str, float] = {}
        #: When the first held room's time is up (ms); infinite with nothing held.
        self.due = math.inf

    def pass_on(self, rooms: dict[str, list[bytes]], now: float, release_all: bool = False) -> None:
        """Take out of ``rooms`` (room -> encoded events, in order) what waits; add what is due.

        ``now`` is a monotonic time in ms. ``release_all`` gives back everything
        held (the broker is stopping).
        """
        held, sent_at, hold_ms = self.held, self._sent_at, self.hold_ms
        for room, bodies in list(rooms.items()):
            waiting = held.get(room)
            if not all(map(p.is_presence, bodies)):
                if waiting is not None:
                    rooms[room] = waiting + bodies
                    del held[room]
            elif waiting is not None:
                waiting.extend(bodies)
                del rooms[room]
            elif (at := sent_at.get(room)) is not None and now < at + hold_ms:
                held[room] = bodies
                del rooms[room]
                self.due = min(self.due, at + hold_ms)
            else:
                sent_at[room] = now
        if release_all or now >= self.due:
            for room in [r for r in held if release_all or sent_at[r] + hold_ms <= now]:
                rooms[room] = held.pop(room)
                sent_at[room] = now
            self.due = min((sent_at[r] + hold_ms for r in held), default=math.inf)

    def forget(self, now: float) -> None:
        """Drop the times of rooms quiet for hold_ms (their next presence goes at once anyway):
        what this keeps stays as small as the rooms with recent presence."""
        sent_at, held = self._sent_at, self.held
        if len(sent_at) > len(held):
            for room in [r for r, at in sent_at.items() if at + self.hold_ms <= now and r not in held]:
                del sent_at[room]
