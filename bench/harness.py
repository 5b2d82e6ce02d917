"""One measurement point: start a server, members and a sender, run the window, collect.

Every point gets a fresh server (fresh store), so no backlog or state carries over.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench import loops
from bench.proc import Server, cpu_seconds, disk_busy_ms, machine_cpu_seconds, rss_kib
from bench.stats import Histogram
from bench.targets import get_target
from bench.targets.base import ClientSpec, Member

_mp = mp.get_context("fork")

#: Round trips a zchat session makes to start (hello, join). An idle point with pings samples
#: RSS after this many of them too: for a server that has no sessions (the echo), that is
#: what libzmq alone keeps for the traffic of a zchat client's start.
GREETING_ROUNDTRIPS = 2
#: Idle points read the server's RSS 1 s after the last join, and again this long after
#: it (s): once zchat has handed back what the connecting freed and its connection gate
#: has let go of the handshakes' pipes (docs/operations.md, Memory), which take up to
#: 1 s of quiet, then up to 5 s.
SETTLE_S = 8.0


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    grace: float


@dataclass(frozen=True)
class Pinning:
    """CPUs for the server and for the load generators (None: the scheduler decides)."""

    server: set[int] | None = None
    load: set[int] | None = None


@dataclass(frozen=True)
class Point:
    target: str
    rooms: int
    #: Subscribers per room.
    members: int
    size: int
    #: Offered msg/s over all rooms (None for an idle point).
    rate: float | None
    #: Members hold sessions (zchat: hello + join) rather than being bare subscribers.
    sessions: bool = False
    #: Connect the members, measure memory, send nothing.
    idle: bool = False
    tag: str = ""
    #: Set when a group re-measures another group's workload (scale-out), so their points stay apart.
    series: str = ""
    #: Idle points: after the first RSS sample, each member's session makes this many
    #: request/reply round trips (its heartbeat pings, sped up), then RSS is sampled again.
    pings: int = 0

    @property
    def subscribers(self) -> int:
        return self.rooms * self.members

    @property
    def workload(self) -> str:
        return f"{self.rooms} room{'s' if self.rooms > 1 else ''} x {self.members}"


@dataclass
class Result:
    point: Point
    error: str | None = None
    offered: float | None = None
    sent_rate: float = 0.0
    #: Messages delivered per second (deliveries / subscribers per room), by receive time in the window.
    delivered: float = 0.0
    #: Deliveries per second, all subscribers.
    deliveries: float = 0.0
    #: Fraction of the messages sent in the window that some subscriber did not get.
    loss: float = 0.0
    latency_us: dict[str, float | None] = field(default_factory=dict)
    #: Latency points run several times: every run's delivery p99 (this result is the median run).
    p99_runs_us: list[float | None] = field(default_factory=list)
    ack_us: dict[str, float | None] = field(default_factory=dict)
    unacked: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    #: CPU of the server: summed over every broker process when there are several.
    server_cpu: float | None = None
    #: Idle points with pings: the server's VmRSS after the round trips.
    rss_pinged_kib: int | None = None
    #: Idle points with pings: the server's VmRSS after the first GREETING_ROUNDTRIPS of them.
    rss_greeted_kib: int | None = None
    #: CPU of the server's main thread alone (near 100%: a single-threaded loop is the bottleneck);
    #: with several brokers, their main threads summed.
    server_main_cpu: float | None = None
    server_us_per_delivery: float | None = None
    server_us_per_message: float | None = None
    #: Server processes measured (brokers sharing a backplane), and the backplane's own CPU (Redis).
    server_procs: int | None = None
    backplane_cpu: float | None = None
    backplane_us_per_message: float | None = None
    load_cpu: float | None = None
    #: CPUs used by every other process on the machine during the window (other jobs perturb the numbers).
    other_cpu: float | None = None
    #: CPUs spent in interrupts and softirqs (loopback TCP mostly), and stolen by the hypervisor.
    irq_cpu: float | None = None
    steal_cpu: float | None = None
    #: Busiest disk's utilisation during the window (the store's fsyncs, and other jobs' I/O).
    disk_busy: float | None = None
    rss_before_kib: int | None = None
    #: Idle points: the server's VmRSS 1 s after the last join, and SETTLE_S after it.
    rss_after_kib: int | None = None
    rss_settled_kib: int | None = None
    connect_s: dict[str, float] = field(default_factory=dict)
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PointError(RuntimeError):
    pass


def _expect(conn: Connection, kind: str, deadline: float, who: str) -> Any:
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            raise PointError(f"{who}: no {kind!r} in time")
        got, arg = conn.recv()
        if got == "error":
            raise PointError(f"{who} failed:\n{arg}")
        if got == kind:
            return arg


def _rooms(n: int) -> list[str]:
    return [f"r{i:03d}" for i in range(n)]


def _spread(point: Point, workers: int) -> list[list[Member]]:
    rooms = _rooms(point.rooms)
    members = [Member(i, rooms[i % point.rooms]) for i in range(point.subscribers)]
    n = max(1, min(workers, len(members) // 10 or 1))
    return [members[w::n] for w in range(n)]


def run_point(point: Point, timing: Timing, pins: Pinning, workers: int, root: Path) -> Result:
    target = get_target(point.target)
    result = Result(point, offered=point.rate)
    workdir = Path(tempfile.mkdtemp(prefix=f"{point.target}-", dir=root))
    server: Server | None = None
    procs: list[tuple[BaseProcess, Connection]] = []
    try:
        server = target.start(workdir, pins.server)
        result.command = server.command
        pid = server.pid
        if pid is not None:
            if point.idle:
                time.sleep(0.3)  # let the server finish starting before the baseline
            result.rss_before_kib = rss_kib(pid)
        spec = ClientSpec(server.endpoints, point.sessions or point.idle, point.size)
        chunks = _spread(point, workers)
        start_at = time.monotonic() + 0.1
        for chunk in chunks:
            procs.append(_spawn(loops.members_main, point.target, spec, chunk, start_at, pins.load))
        deadline = time.monotonic() + 90
        phases = [_expect(conn, "connected", deadline, "members") for _, conn in procs]
        for phase in phases[0]:
            result.connect_s[phase] = max(p[phase] for p in phases) - start_at
        if point.idle:
            time.sleep(1.0)
            if pid is not None:
                result.rss_after_kib = rss_kib(pid)
            time.sleep(SETTLE_S - 1.0)
            if pid is not None:
                result.rss_settled_kib = rss_kib(pid)
            if point.pings:
                # First as many round trips as a zchat session's hello and join, sampled
                # alike: what libzmq alone keeps for that much traffic (the echo server's
                # figure to set beside zchat's first sample). Then the rest.
                done = 0
                if point.pings > GREETING_ROUNDTRIPS:
                    _roundtrips(procs, GREETING_ROUNDTRIPS)
                    time.sleep(1.0)
                    done = GREETING_ROUNDTRIPS
                    if pid is not None:
                        result.rss_greeted_kib = rss_kib(pid)
                _roundtrips(procs, point.pings - done)
                time.sleep(1.0)
                if pid is not None:
                    result.rss_pinged_kib = rss_kib(pid)
            for _, conn in procs:
                conn.send(("close", None))
            return result
        _measure(point, timing, result, server, procs, spec, chunks, pins)
    except (PointError, OSError, RuntimeError, TimeoutError) as exc:
        result.error = str(exc).strip().splitlines()[-1][:300]
    finally:
        for proc, _ in procs:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        if server is not None:
            server.stop()
    return result


def _roundtrips(procs: list[tuple[BaseProcess, Connection]], rounds: int) -> None:
    """Every member's DEALER makes ``rounds`` request/reply round trips; back when all have."""
    for _, conn in procs:
        conn.send(("roundtrips", rounds))
    done_by = time.monotonic() + 150
    for _, conn in procs:
        _expect(conn, "roundtrips", done_by, "members")


def _spawn(fn: Any, *args: Any) -> tuple[BaseProcess, Connection]:
    parent, child = _mp.Pipe()
    proc = _mp.Process(target=fn, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _measure(
    point: Point,
    timing: Timing,
    result: Result,
    server: Server,
    members: list[tuple[BaseProcess, Connection]],
    spec: ClientSpec,
    chunks: list[list[Member]],
    pins: Pinning,
) -> None:
    rooms = _rooms(point.rooms)
    assert point.rate is not None
    sender, sconn = _spawn(loops.sender_main, point.target, spec, rooms, point.rate, pins.load)
    members.append((sender, sconn))
    member_conns = [conn for _, conn in members[:-1]]
    _expect(sconn, "connected", time.monotonic() + 90, "sender")
    deadline = time.monotonic() + 30
    for conn in member_conns:
        _expect(conn, "synced", deadline, "members (subscriptions never became live)")
    sconn.send(("go", None))
    now = time.monotonic_ns()
    t0 = now + 50_000_000
    start = t0 + int(timing.warmup * 1e9)
    stop = start + int(timing.duration * 1e9)
    end = stop + int(timing.grace * 1e9)
    sconn.send(("run", (t0, start, stop, end)))
    for conn in member_conns:
        conn.send(("window", (start, stop, end)))
    pids = [p.pid for p, _ in members if p.pid is not None]
    servers, backplane = server.pids("server"), server.pids("backplane")
    _sleep_until(start)
    cpu0 = sum(cpu_seconds(p) for p in servers)
    main0 = sum(cpu_seconds(p, p) for p in servers)
    bp0 = sum(cpu_seconds(p) for p in backplane)
    load0 = sum(cpu_seconds(p) for p in pids)
    busy0 = machine_cpu_seconds()
    disk0 = disk_busy_ms()
    _sleep_until(stop)
    cpu1 = sum(cpu_seconds(p) for p in servers)
    main1 = sum(cpu_seconds(p, p) for p in servers)
    bp1 = sum(cpu_seconds(p) for p in backplane)
    load1 = sum(cpu_seconds(p) for p in pids)
    busy1 = machine_cpu_seconds()
    disk1 = disk_busy_ms()
    if server.pid:
        result.rss_after_kib = rss_kib(server.pid)
    sent = _expect(sconn, "result", time.monotonic() + timing.grace + 30, "sender")
    per_room = sent["sent_per_room"]
    for conn, chunk in zip(member_conns, chunks, strict=True):
        with contextlib.suppress(OSError):  # a worker past its deadline has already reported
            conn.send(("expect", sum(per_room[int(m.room[1:])] for m in chunk)))
    got = [_expect(conn, "result", time.monotonic() + timing.grace + 30, "members") for conn in member_conns]
    window = timing.duration
    received = sum(g["received_in_window"] for g in got)
    in_window = sum(g["sent_in_window"] for g in got)
    expected = sent["sent_in_window"] * point.members
    result.sent_rate = sent["sent_in_window"] / window
    result.deliveries = received / window
    result.delivered = result.deliveries / point.members
    result.loss = 1 - in_window / expected if expected else 1.0
    result.latency_us = Histogram.from_sparse(g["latency"] for g in got).summary_us()
    if sent["ack_latency"] is not None:
        result.ack_us = Histogram.from_sparse([sent["ack_latency"]]).summary_us()
    result.unacked = sent["unacked"]
    result.errors = sent["errors"]
    result.load_cpu = (load1 - load0) / window
    result.disk_busy = max((disk1[d] - disk0.get(d, 0) for d in disk1), default=0) / 1000 / window
    result.other_cpu = (
        max(0.0, (busy1["tasks"] - busy0["tasks"]) - (cpu1 - cpu0) - (bp1 - bp0) - (load1 - load0)) / window
    )
    result.irq_cpu = (busy1["irq"] - busy0["irq"]) / window
    result.steal_cpu = (busy1["steal"] - busy0["steal"]) / window
    if backplane:
        result.backplane_cpu = (bp1 - bp0) / window
        if sent["sent_in_window"]:
            result.backplane_us_per_message = (bp1 - bp0) * 1e6 / sent["sent_in_window"]
    if servers:
        result.server_procs = len(servers)
        used = cpu1 - cpu0
        result.server_cpu = used / window
        result.server_main_cpu = (main1 - main0) / window
        if received:
            result.server_us_per_delivery = used * 1e6 / received
        if sent["sent_in_window"]:
            result.server_us_per_message = used * 1e6 / sent["sent_in_window"]


def _sleep_until(t_ns: int) -> None:
    time.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))
