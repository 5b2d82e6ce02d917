"""The two load loops, run in child processes: many subscribers per worker, and one sender.

Both are the same for every target. A message's text starts with its send time
(``~t`` + 19 digits of CLOCK_MONOTONIC ns, shared by all processes on Linux),
so a receiver computes delivery latency with no lookup, and the measurement
window is a window of *send* times: warm-up traffic is simply outside it.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.proc import pin, raise_fd_limit
from bench.stats import Histogram
from bench.targets import get_target
from bench.targets.base import ClientSpec, Member, Msg, Sender

STAMP = "~t{:019d}~"
STAMP_LEN = 22
SYNC = "~sync~"
#: The sender sends what is due at most this often (s): bursts of rate x tick.
TICK = 0.001
MAX_BATCH = 2000


def text_of(size: int, ts: int | None) -> str:
    head = SYNC if ts is None else STAMP.format(ts)
    return head + "x" * max(0, size - len(head))


def stamps_of(data: bytes) -> list[int]:
    """The send times in a payload: one per message (several in a zchat ``batch`` frame).

    Binary framing may contain "~t" by chance, so only ``~t`` + 19 digits + ``~`` counts.
    """
    out = []
    i = data.find(b"~t")
    while i >= 0:
        if data[i + 21 : i + 22] == b"~" and data[i + 2 : i + 21].isdigit():
            out.append(int(data[i + 2 : i + 21]))
            i = data.find(b"~t", i + 22)
        else:
            i = data.find(b"~t", i + 1)
    return out


@dataclass
class Recorder:
    """What one worker saw: deliveries in the window (by send and by receive time), latencies."""

    start: int = 0
    stop: int = 0
    sent_in_window: int = 0
    received_in_window: int = 0
    latency: Histogram = field(default_factory=Histogram)
    synced: set[int] = field(default_factory=set)

    def sink(self, member: int, data: bytes) -> None:
        now = time.monotonic_ns()
        stamps = stamps_of(data)
        if not stamps:
            if b"~sync~" in data:
                self.synced.add(member)
            return
        for ts in stamps:
            if self.start <= now < self.stop:
                self.received_in_window += 1
            if self.start <= ts < self.stop:
                self.sent_in_window += 1
                self.latency.record(now - ts)


def _fail(conn: Connection) -> None:
    conn.send(("error", traceback.format_exc(limit=6)))


def members_main(
    conn: Connection, target: str, spec: ClientSpec, members: list[Member], start_at: float, cpus: set[int] | None
) -> None:
    """A worker: connect its members at ``start_at``, report, then record until told to stop."""
    try:
        pin(cpus)
        raise_fd_limit()
        driver = get_target(target).members(spec)
        time.sleep(max(0.0, start_at - time.monotonic()))
        phases = driver.connect(members, time.monotonic() + 60)
        conn.send(("connected", phases))
        rec = Recorder()
        reported = False
        end = float("inf")
        expected: int | None = None
        while time.monotonic() < end:
            driver.pump(0.005, rec.sink)
            if not reported and len(rec.synced) == len(members):
                conn.send(("synced", None))
                reported = True
            if expected is not None and rec.sent_in_window >= expected:
                break
            while conn.poll():
                cmd, arg = conn.recv()
                if cmd == "roundtrips":
                    driver.roundtrips(arg, time.monotonic() + 120)
                    conn.send(("roundtrips", None))
                elif cmd == "window":
                    rec.start, rec.stop, end_ns = arg
                    end = end_ns / 1e9
                elif cmd == "expect":
                    expected = arg
                elif cmd == "close":
                    end = 0.0
        conn.send(
            (
                "result",
                {
                    "sent_in_window": rec.sent_in_window,
                    "received_in_window": rec.received_in_window,
                    "latency": rec.latency.to_sparse(),
                },
            )
        )
        driver.close()
    except Exception:
        _fail(conn)


def sender_main(
    conn: Connection, target: str, spec: ClientSpec, rooms: list[str], rate: float, cpus: set[int] | None
) -> None:
    """The sender: connect, send sync messages until told to run, then the load, then report."""
    try:
        pin(cpus)
        driver = get_target(target).sender(spec)
        driver.connect(rooms, time.monotonic() + 60)
        conn.send(("connected", None))
        _sync(conn, driver, rooms, spec.size)
        cmd, (t0, start, stop, end) = conn.recv()
        assert cmd == "run"
        conn.send(("result", _load(driver, rooms, spec.size, rate, t0, start, stop, end)))
        driver.close()
    except Exception:
        _fail(conn)


def _sync(conn: Connection, driver: Sender, rooms: list[str], size: int) -> None:
    """Until the harness says "run": one sync message per room every 50 ms (proves subscriptions live)."""
    text = text_of(size, None)
    no = -1

    def ignore(n: int, ok: bool) -> None:
        pass

    cmd = None
    while cmd != "go":
        batch = []
        for room in rooms:
            batch.append(Msg(no, room, text))
            no -= 1
        driver.send(batch, ignore)
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            driver.pump(0.01, ignore)
        if conn.poll():
            cmd, _ = conn.recv()


def _load(
    driver: Sender, rooms: list[str], size: int, rate: float, t0: int, start: int, stop: int, end: int
) -> dict[str, Any]:
    """Open loop: ``rate`` msg/s from t0 to stop (ns), sent when due whatever the replies say."""
    pad = "x" * max(0, size - STAMP_LEN)
    stamp = STAMP.format
    nrooms = len(rooms)
    acks = driver.acks
    pending: dict[int, int] = {}
    ack_latency = Histogram()
    sent = sent_in_window = 0
    sent_per_room = [0] * nrooms

    def on_ack(no: int, ok: bool) -> None:
        # A refusal (ok False) is counted by its error code in driver.errors.
        ts = pending.pop(no, None)
        if ok and ts is not None and start <= ts < stop:
            ack_latency.record(time.monotonic_ns() - ts)

    time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
    mono = time.monotonic_ns
    while (now := mono()) < stop:
        due = min(int((now - t0) * rate / 1e9) - sent, MAX_BATCH)
        if due > 0:
            batch = []
            for _ in range(due):
                ts = mono()
                room = sent % nrooms
                batch.append(Msg(sent, rooms[room], stamp(ts) + pad))
                if acks:
                    pending[sent] = ts
                if start <= ts < stop:
                    sent_in_window += 1
                    sent_per_room[room] += 1
                sent += 1
            driver.send(batch, on_ack)
        next_due = t0 + (sent + 1) * 1e9 / rate
        driver.pump(min(max(TICK, (next_due - mono()) / 1e9), 0.05), on_ack)
    while pending and mono() < end:
        driver.pump(0.01, on_ack)
    return {
        "sent": sent,
        "sent_in_window": sent_in_window,
        "sent_per_room": sent_per_room,
        "elapsed_s": (mono() - t0) / 1e9,
        "unacked": len(pending) if acks else None,
        "ack_latency": ack_latency.to_sparse() if acks else None,
        "errors": dict(driver.errors),
    }
