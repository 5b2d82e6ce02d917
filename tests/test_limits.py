"""Abuse limits: each exceeded yields its coded error to the abuser while others keep chatting."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.core import Limits
from broker.server import TRIM_EVERY_S
from client.lib import Client
from tests.conftest import HOST, BrokerProcess, Raw, RunningBroker, wait_for
from zchat import protocol as p


def start(tmp_path: Path, **limits: float) -> RunningBroker:
    return RunningBroker(tmp_path / "data", limits=Limits(**limits)).start()  # type: ignore[arg-type]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    started: list[RunningBroker] = []

    def make(**limits: float) -> RunningBroker:
        b = start(tmp_path, **limits)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def registered(ctx: zmq.Context[zmq.Socket[bytes]], b: RunningBroker, name: str, room: str | None = None) -> Raw:
    raw = Raw(ctx, b.port)
    assert raw.request(p.hello(name))["type"] == "welcome"
    if room:
        assert raw.request({"type": "join", "room": room})["type"] == "joined"
    return raw


def bystander_ok(b: RunningBroker) -> None:
    with Client("bystander", HOST, b.port, b.pub_port) as c:
        c.join("general")
        assert c.send_wait("general", "unaffected").seq is not None


def test_default_limits_let_a_person_paste(limited: Callable[..., RunningBroker]) -> None:
    b = limited()
    with Client("human", HOST, b.port, b.pub_port) as c:
        c.join("general")
        ids = [c.send("general", f"pasted line {i}") for i in range(30)]
        wait_for(lambda: c.pump(0.05) is not None and c.unacked == 0, 10)
        errors = [e for e in c.drain_events() if e.type == "error"]
        assert not errors and len(ids) == 30


def test_message_flood_is_rate_limited(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    b = limited(rate=5, burst=10)
    flooder = registered(ctx, b, "flooder", "general")
    for i in range(40):
        flooder.send({"type": "msg", "room": "general", "text": f"spam {i}", "id": f"s{i}"})
    replies = [flooder.recv() for _ in range(40)]
    codes = [r.get("code") for r in replies if r["type"] == "error"]
    assert len([r for r in replies if r["type"] == "ack"]) in range(10, 13)
    assert codes and set(codes) == {"rate_limited"}
    bystander_ok(b)


def test_library_backs_off_and_loses_nothing(limited: Callable[..., RunningBroker]) -> None:
    b = limited(rate=20, burst=10)
    with Client("bot", HOST, b.port, b.pub_port) as bot:
        bot.join("general")
        for i in range(40):
            bot.send("general", f"m{i}")
        wait_for(lambda: bot.pump(0.05) is not None and bot.unacked == 0, 20)
        assert not [e for e in bot.drain_events() if e.type == "error"]
        events, _ = bot.history("general", 0, 100)
        assert [e.text for e in events if e.type == "msg"] == [f"m{i}" for i in range(40)]


def test_leaving_the_with_block_waits_for_what_the_rate_limit_held(limited: Callable[..., RunningBroker]) -> None:
    """A bot that sends a burst and ends: close() (here the ``with`` block's end) waits
    for every message to be acknowledged; it used to drop what was still held."""
    b = limited(rate=20, burst=10)
    with Client("bot", HOST, b.port, b.pub_port) as bot:
        bot.join("general")
        for i in range(40):
            bot.send("general", f"m{i}")
        assert bot.unacked > 10
    assert bot.state == "closed" and bot.unacked == 0
    with Client("reader", HOST, b.port, b.pub_port) as reader:
        events, _ = reader.history("general", 0, 100)
    assert [e.text for e in events if e.type == "msg"] == [f"m{i}" for i in range(40)]


def test_join_flood_is_rate_limited(limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # A token every 10 s: at 1 a second, the ten joins (one round trip each) had to be
    # made within 1 to 2 s, or one of the last four found a token (a loaded machine's pause).
    b = limited(join_rate=0.1, join_burst=5)
    hopper = registered(ctx, b, "hopper")
    replies = [hopper.request({"type": "join", "room": f"r{i}"}) for i in range(10)]
    assert [r["type"] for r in replies[:5]] == ["joined"] * 5
    assert {r.get("code") for r in replies[6:]} == {"rate_limited"}
    bystander_ok(b)


def test_rooms_per_session(limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    b = limited(rate=0, join_rate=0, max_rooms=3)
    greedy = registered(ctx, b, "greedy")
    replies = [greedy.request({"type": "join", "room": f"r{i}"}) for i in range(4)]
    assert [r["type"] for r in replies] == ["joined", "joined", "joined", "error"]
    assert replies[3]["code"] == "limit_reached"
    assert greedy.request({"type": "leave", "room": "r0"})["type"] == "left"
    assert greedy.request({"type": "join", "room": "r3"})["type"] == "joined"


def test_max_sessions(limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    b = limited(rate=0, join_rate=0, max_sessions=2)
    registered(ctx, b, "one")
    last = registered(ctx, b, "two")
    third = Raw(ctx, b.port).request(p.hello("three"))
    assert (third["type"], third["code"]) == ("error", "limit_reached")
    last.send({"type": "bye"})
    wait_for(lambda: Raw(ctx, b.port).request(p.hello("three"))["type"] == "welcome")


def test_max_text(limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    b = limited(rate=0, join_rate=0, max_text=10)
    talker = registered(ctx, b, "talker", "general")
    long = talker.request({"type": "msg", "room": "general", "text": "x" * 11, "id": "1"})
    assert (long["type"], long["code"], long["id"]) == ("error", "too_large", "1")
    assert talker.request({"type": "msg", "room": "general", "text": "x" * 10, "id": "2"})["type"] == "ack"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


#: The broker's resident memory may not grow by more than this under the abuse below.
RSS_CEILING_KIB = 64 * 1024


@pytest.mark.timeout(60)
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_a_subscribers_subscriptions_are_let_go_when_it_leaves_though_nothing_is_published(
    tmp_path: Path, busy: bool
) -> None:
    """libzmq keeps a PUB subscriber's topics in a trie of some 50 bytes per byte of topic,
    and does its PUB socket's chores (taking them in, letting them go) only when the
    socket is used: a peer's 25 MB of random topics grew a quiet broker by 1.1 GB, and
    with nothing published that stayed after it left. The loop now does them when idle,
    and at each tick for a broker never idle (here: a client's pings every 20 ms), whose
    trim then comes after a subscriber left, not only after its RSS grew (which it does
    not, after a trim at the peak: 131 MB stayed 131 MB)."""
    broker = BrokerProcess(tmp_path / "d", extra=["--log-level", "warning"]).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    pinger = Raw(ctx, broker.port)

    def rss_grown() -> int:
        if busy:
            pinger.send({"type": "ping"})  # (refused without a session: an answer all the same)
            while pinger.sock.poll(0):
                pinger.sock.recv()
        return _rss_kib(pid) - before

    try:
        assert broker.proc is not None
        pid = broker.proc.pid
        before = _rss_kib(pid)
        peer = ctx.socket(zmq.XSUB)
        peer.setsockopt(zmq.SNDHWM, 0)
        peer.connect(f"tcp://{HOST}:{broker.pub_port}")
        for _ in range(1000):
            peer.send(b"\x01" + os.urandom(500).hex().encode())
        grown = 24 * 1024  # of the ~48 MiB these take
        wait_for(lambda: rss_grown() > grown, 15, interval=0.02, what=lambda: f"{rss_grown()} KiB")
        if busy:
            # Long enough for a trim at the peak (its RSS grew): none is due for growth after.
            kept_busy = time.monotonic() + TRIM_EVERY_S + 1
            wait_for(lambda: rss_grown() and time.monotonic() > kept_busy, TRIM_EVERY_S + 5, interval=0.02)
        peer.close()
        wait_for(lambda: rss_grown() < 8 * 1024, 30, interval=0.02, what=lambda: f"{rss_grown()} KiB")
    finally:
        ctx.destroy(0)  # (the peer too, when a wait failed)
        broker.kill()


@pytest.mark.timeout(60)
def test_a_subscriber_that_leaves_while_a_trim_waits_for_another_is_trimmed_for_too(
    broker: RunningBroker, ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a broker never idle, the trim after a subscriber left waits until libzmq has let
    its subscriptions go (three ticks here). A second one that left meanwhile was taken as
    covered by that trim, which came before its own were let go: its 46 MB stayed. Its
    trim now follows (the broker runs in this process: its RSS is ours)."""
    from broker import server

    monkeypatch.setattr(server, "TRIM_EVERY_S", 1.0)
    ctx.setsockopt(zmq.LINGER, 0)  # (for the sockets closed here: nothing of theirs to wait for)
    pinger = Raw(ctx, broker.port)

    def busy_for(seconds: float, until: Callable[[], bool] = lambda: False) -> bool:
        """Ping every 20 ms (under the loop's idle wake-up: never idle) for ``seconds`` or until ``until()``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pinger.send({"type": "ping"})  # (refused without a session: an answer all the same)
            time.sleep(0.02)
            while pinger.sock.poll(0):
                pinger.sock.recv()
            if until():
                return True
        return False

    before = _rss_kib(os.getpid())
    small = ctx.socket(zmq.SUB)
    small.connect(f"tcp://{HOST}:{broker.pub_port}")
    small.subscribe(b"general")
    big = ctx.socket(zmq.XSUB)
    big.setsockopt(zmq.SNDHWM, 0)
    big.connect(f"tcp://{HOST}:{broker.pub_port}")
    for _ in range(1000):
        big.send(b"\x01" + os.urandom(500).hex().encode())

    def grown() -> int:
        return _rss_kib(os.getpid()) - before

    assert busy_for(15, lambda: grown() > 24 * 1024), f"{grown()} KiB"
    trims = broker.broker.trims
    busy_for(3)  # its trims at the peak (its RSS grew): none is due for growth after
    assert broker.broker.trims > trims
    assert broker.broker._subscriptions_freed_ms == 3000  # (the fixture's 5 s heartbeat)
    small.close()
    # Its trim comes at the first check (one a second) from 3 s on: the big one's 0.5-1.5 s old then.
    busy_for(2.5)
    big.close()
    assert busy_for(15, lambda: grown() < 8 * 1024), f"{grown()} KiB still, {broker.broker.trims - trims} trims"


@pytest.mark.timeout(120)
def test_bogus_connections_and_garbage_leave_memory_bounded(tmp_path: Path) -> None:
    # (All from one address: the per-host limits off, so that 1,000 sessions are made at once.)
    extra = ["--log-level", "warning", "--heartbeat-ms", "500", "--max-sessions-per-host", "0", "--connect-rate", "0"]
    broker = BrokerProcess(tmp_path / "d", extra=extra).start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    sockets: list[zmq.Socket[bytes]] = []
    try:
        assert broker.proc is not None
        with Client("warmup", HOST, broker.port, broker.pub_port) as w:
            w.join("general")
            w.send_wait("general", "warm")
        before = _rss_kib(broker.proc.pid)
        # 1,000 ZeroMQ connections that register bogus sessions and send garbage...
        for i in range(1000):
            s = ctx.socket(zmq.DEALER)
            s.connect(f"tcp://{HOST}:{broker.port}")
            s.send(p.encode(p.hello(f"bogus{i}")))
            s.send(os.urandom(200))
            sockets.append(s)
        # ...and 500 raw TCP connections that send junk and hang around.
        raw_tcp = []
        for _ in range(500):
            t = socket.create_connection((HOST, broker.port), timeout=5)
            t.sendall(b"\xff" + os.urandom(64))
            raw_tcp.append(t)
        for s in sockets:
            assert s.poll(10_000), "every bogus client is answered"
        peak = _rss_kib(broker.proc.pid)
        for t in raw_tcp:
            t.close()
        assert peak - before < RSS_CEILING_KIB, f"grew by {(peak - before) // 1024} MiB"
        # The bogus sessions expire (3 x 500 ms) and a real client is served throughout.
        bystander = Client("real", HOST, broker.port, broker.pub_port)
        try:
            bystander.connect()
            bystander.join("general")
            assert bystander.send_wait("general", "served").seq is not None
            wait_for(lambda: bystander.rooms() and len(bystander.who("general")) == 1, 15)
        finally:
            bystander.close(0)
    finally:
        for s in sockets:
            s.close()
        ctx.term()
        broker.kill()


@pytest.mark.timeout(30)
def test_an_idle_broker_gives_back_what_its_work_freed_once(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc kept what a burst freed and the RSS stayed at its peak: the loop now calls
    malloc_trim once idle after some work (here every 0.3 s at most), and not again
    while nothing happens."""
    from broker import server

    assert server._malloc_trim is not None  # glibc, as on every machine this runs on
    monkeypatch.setattr(server, "TRIM_EVERY_S", 0.3)
    with Client("alice", HOST, broker.port, broker.pub_port) as alice:
        alice.join("general")
        for i in range(200):
            alice.send("general", f"m{i}")
        for _ in alice.settling(10):
            pass
        assert not alice.unacked
    wait_for(lambda: broker.broker.trims > 0, 5, what=lambda: broker.broker.trims)
    wait_for(lambda: not broker.broker._peers, 5, what=lambda: broker.broker._peers)  # its closes seen
    time.sleep(2.0)  # the last work (the closes) trimmed for, if it was not yet
    trimmed = broker.broker.trims
    time.sleep(2.0)  # idle: nothing connected, nothing freed since
    assert broker.broker.trims == trimmed


@pytest.mark.timeout(30)
@pytest.mark.parametrize("why", ["the gate let go of its handshakes", "the RSS grew"])
def test_a_broker_that_is_never_idle_gives_memory_back_all_the_same(
    broker: RunningBroker, ctx: zmq.Context[zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """A broker with many clients is never idle for a wake-up (1,000 of them ping 200 times a
    second), so a trim that waited for that never came: it also trims when the gate has let
    go of its handshakes' pipes, or when its RSS has grown (here, a client pings every 20 ms
    throughout, and 20 connections come in)."""
    from broker import gate, server

    monkeypatch.setattr(server, "TRIM_EVERY_S", 0.3)
    monkeypatch.setattr(gate, "RECYCLE_QUIET_MS", 300)
    if why == "the RSS grew":
        monkeypatch.setattr(gate, "RECYCLE_QUIET_MS", 10**9)
        monkeypatch.setattr(server, "TRIM_GROWTH_KIB", 0)  # any size is growth enough
    else:
        monkeypatch.setattr(server, "TRIM_GROWTH_KIB", 10**9)
    the_gate = broker.broker.gate
    assert the_gate is not None, "the gate is on by default"
    busy = ctx.socket(zmq.DEALER)
    busy.setsockopt(zmq.LINGER, 0)
    busy.connect(f"tcp://{HOST}:{broker.port}")
    busy.send(p.encode({"type": "hello", "v": 1, "name": "busy"}))
    assert busy.poll(5000) and p.decode(busy.recv())["type"] == "welcome"
    others: list[zmq.Socket[bytes]] = []
    try:
        deadline = time.monotonic() + 3.0
        started_trims, started_recycles = broker.broker.trims, the_gate.recycles
        while time.monotonic() < deadline:
            busy.send(p.encode({"type": "ping"}))
            assert busy.poll(2000), "no pong"
            busy.recv()
            if len(others) < 20:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://{HOST}:{broker.port}")
                others.append(sock)
            time.sleep(0.02)  # under the loop's idle wake-up (IDLE_WAKE_MS): never idle
        trims = broker.broker.trims - started_trims
        if why == "the RSS grew":
            assert the_gate.recycles == started_recycles
            assert trims >= 3, trims  # one each 0.3 s (+ the time to read /proc), for 3 s
        else:
            assert the_gate.recycles > started_recycles
            assert trims >= 1, (trims, the_gate.recycles)
    finally:
        for sock in (busy, *others):
            sock.close(0)


def test_rate_limited_lines_keep_their_order(limited: Callable[..., RunningBroker]) -> None:
    """Lines trickling in faster than the rate: held, resent, and stored in the order written."""
    b = limited(rate=10, burst=5)
    with Client("piper", HOST, b.port, b.pub_port) as c:
        c.join("general")
        for i in range(40):
            c.send("general", f"{i}")
            c.pump(0.04)  # a line every ~40 ms, 25 a second
        wait_for(lambda: c.pump(0.05) is not None and c.unacked == 0, 20)
        events, _ = c.history("general", 0, 100)
        assert [e.text for e in events if e.type == "msg"] == [f"{i}" for i in range(40)]


def test_lines_sent_after_a_refusal_but_before_it_is_read_do_not_overtake_it(
    limited: Callable[..., RunningBroker],
) -> None:
    """A bot sends a line every 10 ms without reading in between (it is busy), then
    pauses for 1.5 s, still not reading, and sends more: every line after the first
    refusal is on its way before it hears of it. The bucket refills meanwhile (a token
    every 50 ms, full after the pause), but none may be stored ahead of the refused one."""
    b = limited(rate=20, burst=5)
    lines = [f"m{i}" for i in range(30)]
    with Client("bot", HOST, b.port, b.pub_port) as bot:
        bot.join("general")
        for i, line in enumerate(lines):
            bot.send("general", line)
            time.sleep(1.5 if i == 19 else 0.01)
        wait_for(lambda: bot.pump(0.05) is not None and bot.unacked == 0, 30)
        assert not [e for e in bot.drain_events() if e.type == "error"]
        events, _ = bot.history("general", 0, 100)
        assert [e.text for e in events if e.type == "msg"] == lines


def test_a_line_waiting_behind_one_whose_refusal_was_lost_stays_behind_it(
    limited: Callable[..., RunningBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """m1's ``rate_limited`` never reaches the bot; m2, refused behind it, waits. When
    m1's timeout comes, m1 first checks whether it was stored (a ping, a catch-up):
    m2 must not go ahead of it meanwhile, or once the broker stops holding m2 for m1
    (RATE_HOLD_MAX_MS) it would be stored first."""
    monkeypatch.setattr(Client, "_resend_after", property(lambda self: 0.5))
    b = limited(rate=1, burst=1)
    with Client("bot", HOST, b.port, b.pub_port) as bot:
        bot.join("general")
        bot.send_wait("general", "m0")
        sent: list[str] = []
        send, dispatch = bot._send, bot._dispatch

        def record(env: dict[str, Any]) -> None:
            if env["type"] == "msg":
                sent.append(env["text"])
            send(env)

        def lossy(env: dict[str, Any]) -> None:
            if env.get("code") == "rate_limited" and env.get("id") == m1:
                return
            dispatch(env)

        bot._send = record  # type: ignore[method-assign]
        bot._dispatch = lossy  # type: ignore[method-assign]
        m1 = bot.send("general", "m1")
        bot.send("general", "m2")
        wait_for(lambda: bot.pump(0.05) is not None and bot.unacked == 0, 30)
        assert not [e for e in bot.drain_events() if e.type == "error"]
        assert sent[:2] == ["m1", "m2"] and sent[2] == "m1", f"m2 went again ahead of m1: {sent}"
        events, _ = bot.history("general", 0, 100)
        assert [e.text for e in events if e.type == "msg"] == ["m0", "m1", "m2"]


def test_history_a_session_never_reads_is_bounded(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Asking for history without reading the replies cannot make the broker queue without bound."""
    b = limited(rate=0, join_rate=0, history_bytes=64 * 1024, history_burst=256 * 1024)
    writer = registered(ctx, b, "writer", "general")
    for i in range(300):
        writer.send({"type": "msg", "room": "general", "text": f"{i:04d}" + "x" * 1000, "id": f"m{i}"})
    acks = [writer.recv() for _ in range(300)]
    assert all(a["type"] == "ack" for a in acks)
    hog = registered(ctx, b, "hog", "general")
    for i in range(50):  # ~300 KiB each if answered
        hog.send({"type": "history", "room": "general", "after": 0, "limit": 500, "id": f"h{i}"})
    replies = [hog.recv() for _ in range(50)]
    kinds = [r["type"] if r["type"] != "error" else r["code"] for r in replies]
    # The first reply drains the burst; the rest are refused until it refills.
    assert kinds == ["history"] + ["rate_limited"] * 49
    assert len(replies[0]["messages"]) == 302  # 2 joins and 300 messages
    bystander_ok(b)


def test_rooms_a_session_never_reads_is_bounded(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """A ``rooms`` reply lists up to 1000 rooms (about 50 KB): asked for over and over and
    never read, it is charged to the same budget as history, then refused (and logged as
    a refusal, as ``who`` and ``join`` are)."""
    caplog.set_level(logging.INFO, logger="zchat.broker")
    b = limited(rate=0, join_rate=0, max_rooms=1000, history_bytes=1024, history_burst=16 * 1024)
    maker = registered(ctx, b, "maker")
    for i in range(300):
        maker.send({"type": "join", "room": f"room{i:03d}", "id": f"j{i}"})
    assert {maker.recv()["type"] for _ in range(300)} == {"joined"}
    hog = registered(ctx, b, "hog")
    for i in range(20):  # about 10 KB each if answered
        hog.send({"type": "rooms", "id": f"r{i}"})
    replies = [hog.recv() for _ in range(20)]
    kinds = [r["type"] if r["type"] != "error" else r["code"] for r in replies]
    # 16 KiB of burst: two replies, then refusals until it refills at 1 KiB a second.
    assert kinds == ["rooms"] * 2 + ["rate_limited"] * 18
    assert [r["id"] for r in replies[2:]] == [f"r{i}" for i in range(2, 20)]
    assert len(replies[0]["rooms"]) == 300 and not replies[0]["truncated"]
    refused = [r for r in caplog.records if r.getMessage().startswith("refused") and "rate_limited" in r.getMessage()]
    assert len(refused) == 18 and all(r.levelname == "INFO" for r in refused)
    bystander_ok(b)


def test_member_lists_a_session_never_reads_are_bounded(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """``who`` and ``joined`` replies carry the room's member list (some 300 KB with 10,000
    members): asked for over and over and never read (joining a room again costs no join
    token), they are charged to the same budget as history, then refused."""
    b = limited(rate=0, join_rate=0, history_bytes=1024, history_burst=8 * 1024, max_sessions_per_host=0)
    for i in range(100):  # names of 32 characters: a list of some 3.3 KB
        registered(ctx, b, f"member{i:03d}-" + "x" * 22, "big")
    replies = _unread(registered(ctx, b, "asker"), [{"type": "who", "room": "big", "id": f"w{i}"} for i in range(10)])
    # 8 KiB of burst: three lists (the third takes it below zero), then refusals.
    assert _kinds(replies) == ["who"] * 3 + ["rate_limited"] * 7
    assert len(replies[0]["members"]) == 100
    replies = _unread(registered(ctx, b, "joiner"), [{"type": "join", "room": "big", "id": f"j{i}"} for i in range(10)])
    assert _kinds(replies) == ["joined"] * 3 + ["rate_limited"] * 7
    assert len(replies[0]["members"]) == 101
    bystander_ok(b)


def test_a_session_that_never_reads_is_refused_however_fast_its_budget_refills(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The budget's rate alone let a session that asks and never reads have the broker
    queue replies without end, at that rate (1 MiB/s by default, for as long as it
    stays): past the burst of bytes it has not said it read, it is refused. The library
    says what it read (a request's ``read``), so a client that reads is never held back."""
    b = limited(rate=0, join_rate=0, history_bytes=100 * 1024 * 1024, history_burst=8 * 1024, max_sessions_per_host=0)
    for i in range(100):  # names of 32 characters: a list of some 3.3 KB
        registered(ctx, b, f"member{i:03d}-" + "x" * 22, "big")
    replies = _unread(registered(ctx, b, "asker"), [{"type": "who", "room": "big", "id": f"w{i}"} for i in range(6)])
    assert _kinds(replies) == ["who"] * 3 + ["rate_limited"] * 3
    assert "not read yet" in replies[3]["message"]
    with Client("reader", HOST, b.port, b.pub_port) as reader:
        for _ in range(20):  # 66 KB of lists, 8 times the burst
            assert len(reader.who("big")) == 100
        assert [e for e in reader.drain_events() if e.type == "error"] == []
    bystander_ok(b)


def test_joins_without_the_member_list_are_not_charged_for_it(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A join that says ``members: false`` gets the members' count, not their list, and
    is not refused when the budget of large replies would refuse the list."""
    b = limited(rate=0, join_rate=0, history_bytes=1024, history_burst=8 * 1024, max_sessions_per_host=0)
    for i in range(100):
        registered(ctx, b, f"member{i:03d}-" + "x" * 22, "big")
    counter = registered(ctx, b, "counter")
    replies = _unread(counter, [{"type": "join", "room": "big", "members": False, "id": f"j{i}"} for i in range(10)])
    assert _kinds(replies) == ["joined"] * 10
    assert [(r["count"], "members" in r) for r in replies] == [(101, False)] * 10
    # The budget is whole: lists still go to this session, until it is spent.
    replies = _unread(counter, [{"type": "who", "room": "big", "id": f"w{i}"} for i in range(4)])
    assert _kinds(replies) == ["who"] * 3 + ["rate_limited"]
    bystander_ok(b)


def _unread(raw: Raw, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every request before reading any reply (as a client that does not read would)."""
    for request in requests:
        raw.send(request)
    return [raw.recv() for _ in requests]


def _kinds(replies: list[dict[str, Any]]) -> list[str]:
    """Each reply's type, or its error code."""
    return [r["type"] if r["type"] != "error" else r["code"] for r in replies]


def test_one_host_cannot_fill_the_broker_with_sessions(
    limited: Callable[..., RunningBroker], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A session outlives its connection for 3 heartbeats: hellos on short connections
    from one address would keep every slot taken. Past --max-sessions-per-host, that
    address is refused (limit_reached); others get in, and a slot frees when a session ends."""
    b = limited(rate=0, join_rate=0, max_sessions=10, max_sessions_per_host=3)
    for i in range(3):  # say hello and drop the connection at once
        squatter = Raw(ctx, b.port)
        assert squatter.request(p.hello(f"squat{i}"))["type"] == "welcome"
        squatter.sock.close(0)
    fourth = Raw(ctx, b.port)
    refused = fourth.request(p.hello("squat3"))
    assert refused["type"] == "error" and refused["code"] == "limit_reached"
    assert "127.0.0.1 has 3 session(s) here already" in refused["message"]
    # Another address is not held back by the first; and when one of its sessions ends,
    # it has a slot again.
    others = [Raw(ctx, b.port, source="127.0.0.2") for _ in range(4)]
    for i, other in enumerate(others[:3]):
        assert other.request(p.hello(f"other{i}"))["type"] == "welcome"
    assert others[3].request(p.hello("other3"))["code"] == "limit_reached"
    others[0].send({"type": "bye"})  # no reply; the next request shows it was handled
    assert others[0].request({"type": "ping", "id": "p1"})["code"] == "not_registered"
    assert others[3].request(p.hello("other3"))["type"] == "welcome"
    assert fourth.request(p.hello("squat3"))["code"] == "limit_reached"
