"""The connection gate (broker/gate.py): new request connections paced per host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from broker.gate import REQUEST_DOMAIN, Gate
from client.lib import Client
from tests.conftest import HOST, BrokerProcess, wait_for


@pytest.fixture
def gated(ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[tuple[Gate, zmq.Socket[bytes], int]]:
    """A ROUTER whose handshakes ask a gate of 1 connection a second after a burst of 2."""
    gate = Gate(ctx, None, rate=1.0, burst=2)
    gate.start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.zap_domain = REQUEST_DOMAIN
    port = router.bind_to_random_port(f"tcp://{HOST}")
    try:
        yield gate, router, port
    finally:
        router.close(0)
        gate.stop()


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, text: bytes) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(text)
    return sock


@pytest.mark.timeout(30)
def test_connections_past_the_burst_wait_their_turn_and_another_host_does_not(
    ctx: zmq.Context[zmq.Socket[bytes]], gated: tuple[Gate, zmq.Socket[bytes], int]
) -> None:
    """Five connections from one address at once: two come in at once, the other three
    one a second; none is refused. Meanwhile a connection from another address (here
    127.0.0.2) comes in at once: each host has its own pace."""
    gate, router, port = gated
    started = time.monotonic()
    socks = [_dealer(ctx, f"tcp://{HOST}:{port}", b"a%d" % i) for i in range(5)]
    arrived: dict[bytes, float] = {}

    def read() -> None:
        while router.poll(50):
            _, text = router.recv_multipart()
            arrived[text] = time.monotonic() - started

    wait_for(lambda: read() or len(arrived) >= 2, 10, what=lambda: arrived)
    socks.append(_dealer(ctx, f"tcp://127.0.0.2:0;{HOST}:{port}", b"other"))
    wait_for(lambda: read() or len(arrived) >= 7 - 1, 15, what=lambda: arrived)
    for sock in socks:
        sock.close(0)
    assert set(arrived) == {b"a0", b"a1", b"a2", b"a3", b"a4", b"other"}, arrived
    from_one = sorted(t for text, t in arrived.items() if text != b"other")
    # Paced: the fifth came at least ~3 s (three turns at 1 a second) after the start.
    assert from_one[4] >= 2.5, arrived
    # The other host did not wait behind them.
    assert arrived[b"other"] < from_one[4], arrived
    assert gate.paced == 3 and gate.turned_away == 0, (gate.paced, gate.turned_away)


@pytest.mark.timeout(30)
def test_a_host_past_what_can_wait_is_turned_away_and_told(
    ctx: zmq.Context[zmq.Socket[bytes]], gated: tuple[Gate, zmq.Socket[bytes], int]
) -> None:
    """At 1 a second, 30 waiting handshakes are what libzmq's 30 s handshake timeout
    leaves time for: the next is refused (400), which the client's monitor shows."""
    gate, _router, port = gated
    socks = [_dealer(ctx, f"tcp://{HOST}:{port}", b"x") for _ in range(2 + gate.max_waiting)]
    wait_for(lambda: gate.paced == gate.max_waiting, 15, what=lambda: (gate.paced, gate.max_waiting))
    last = ctx.socket(zmq.DEALER)
    last.setsockopt(zmq.LINGER, 0)
    monitor = last.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        last.connect(f"tcp://{HOST}:{port}")
        assert monitor.poll(10_000), "no handshake failure"
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400, event
        assert gate.turned_away == 1
    finally:
        last.disable_monitor()
        monitor.close(0)
        last.close(0)
        for sock in socks:
            sock.close(0)


@pytest.mark.timeout(60)
def test_a_client_past_the_burst_connects_a_little_later_and_chats(tmp_path: Path) -> None:
    """Through the broker at --connect-rate 2: raw connections take the host's burst
    (200) and 4 more wait; a library client that comes after them connects once its turn
    comes (some 2 s later), is served, and the log says the address was paced."""
    broker = BrokerProcess(tmp_path / "d", extra=["--connect-rate", "2"]).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        held = [_dealer(ctx, f"tcp://{HOST}:{broker.port}", b"") for _ in range(204)]
        with Client("alice", HOST, broker.port, broker.pub_port) as alice:
            alice.connect()
            alice.join("general")
            assert alice.who("general") == ["alice"]
        line = f"new connections from {HOST} come faster than --connect-rate 2 a second"
        wait_for(lambda: any(line in logged for logged in broker.log), 10, what=lambda: broker.log[-3:])
        for sock in held:
            sock.close(0)
    finally:
        ctx.destroy(linger=0)
        broker.kill()
