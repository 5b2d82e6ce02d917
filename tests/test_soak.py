"""Short runs of the soak (tests/soak.py, run by hand for longer): messages through
connection resets and broker restarts, every promise checked at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import soak


@pytest.mark.timeout(120)
def test_room_messages_acknowledged_survive_resets_and_killed_brokers(tmp_path: Path) -> None:
    # Stored before they are acknowledged: a SIGKILL loses none of them.
    out = soak("rooms", seconds=10, rate=500, restarts="kill", seed=5, alice_proxy=True, restart_every=2, data=tmp_path)
    print(out.line)
    assert out.resets >= 1 and out.restarts >= 1
    assert out.broken == []
    assert out.got >= out.acked > 0.9 * out.sent  # a soak where nothing got through proves nothing


@pytest.mark.timeout(120)
def test_dms_acknowledged_survive_resets_and_restarted_brokers(tmp_path: Path) -> None:
    # SIGTERM: DMs are not stored, and a killed broker may lose those it held for a resume.
    out = soak("dms", seconds=10, rate=300, restarts="term", seed=13, alice_proxy=True, restart_every=2, data=tmp_path)
    print(out.line)
    assert out.resets >= 1 and out.restarts >= 1
    assert out.broken == []
    assert out.got >= out.acked > 0.5 * out.sent
