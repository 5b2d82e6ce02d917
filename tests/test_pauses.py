"""What would hold the broker's loop up for milliseconds at a time, kept from doing so.

Every message the loop waits behind such a pause is late by all of it: these
tests pin the mechanisms that keep the pauses short (their durations are
measured by ``python -m bench.micro window`` and by the benchmark's latency
points, not here: timed tests would be flaky).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

from broker.core import AckWindow
from tests.conftest import Raw, RunningBroker, wait_for

BURST = 500


@pytest.mark.timeout(60)
def test_the_loop_untracks_the_resend_window_as_it_goes(broker: RunningBroker, raw: Callable[[], Raw]) -> None:
    """Each message leaves two tuples in the resend window. Left to CPython's
    automatic collector, which does not count tuples from its free lists, they
    piled up by the hundred thousand and one collection walked them all at once
    (20-30 ms at 25k msg/s). The loop collects the young generation after each
    pass, which untracks them. With automatic collection off, only the loop's
    own collections can have untracked them."""
    alice = raw()
    assert alice.request({"type": "hello", "v": 1, "name": "alice"})["type"] == "welcome"
    assert alice.request({"type": "join", "room": "general"})["type"] == "joined"
    window = broker.broker.core._acked

    def tracked() -> int:
        pairs = [pair for shard in window._shards for pair in shard.items() if pair[0] is not None]
        return sum(gc.is_tracked(key) or gc.is_tracked(acked) for key, acked in pairs)

    gc.disable()
    try:
        for i in range(BURST):
            alice.send({"type": "msg", "room": "general", "text": f"m{i}", "id": f"m{i}"})
        acks = [alice.recv() for _ in range(BURST)]
        assert [(a["type"], a["id"]) for a in acks] == [("ack", f"m{i}") for i in range(BURST)]
        assert len(window) == BURST
        # The acks went out before the pass's collection: give it its moment.
        wait_for(lambda: tracked() == 0, 5, what=lambda: f"{tracked()} of {BURST} messages' tuples still tracked")
    finally:
        gc.enable()


def test_the_resend_window_is_frozen_with_the_broker_at_start() -> None:
    """The broker freezes what exists at its start (gc.freeze() in broker.cli), so
    no collection walks it again. The window's dicts must be tracked to be frozen,
    and stay so through the full collection that comes just before the freeze: an
    empty dict is untracked, and became tracked (young, walked by every full
    collection, 100,000 entries) at its first entry."""
    window = AckWindow(10)
    gc.collect()  # as broker.cli does before gc.freeze(): it untracks what holds nothing tracked
    assert all(gc.is_tracked(shard) for shard in window._shards)
    assert gc.is_tracked(window._ring)
