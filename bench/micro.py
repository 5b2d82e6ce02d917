"""Micro-measurements behind broker fixes and claims, in-process and single-threaded.

    python -m bench.micro window   # resend window: plain dict, OrderedDict, AckWindow: us per message, longest
    python -m bench.micro gc       # GC pauses of the core over 300k messages
    python -m bench.micro commit   # store commit latency (p50/p99/p99.9/max) for small batches
    python -m bench.micro stalls   # commits of 50 rows of 1 KiB at 1,000 a second for 10 s: the long ones
                                   # (the WAL starting over every 32 MiB; on the disk, not /dev/shm)
    python -m bench.micro rows     # WAL bytes per stored row: schema 1 (WITHOUT ROWID) vs 2, 100 B and 1 KiB
    python -m bench.micro sessions # Python heap per session (hello + join), by tracemalloc
    python -m bench.micro append   # store CPU per row, commits of 3, 30 and 300 rows, with and without
                                   # a retention (on /dev/shm: no disk)
    python -m bench.micro growth   # store size on disk per message, 100 B and 1 KiB texts (docs/operations.md)
    python -m bench.micro core     # CPU per room message of decode_request and of Core.handle (which includes it)

They measure one mechanism each, not the broker; the suite (``python -m bench``)
measures the broker.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

WINDOW = 100_000


def window(n: int = 600_000) -> None:
    """The resend window: CPU per message (lookup, insert, evict), and the longest one.

    A dict that takes an entry and drops its oldest at every message rebuilds
    its table now and then, all at once: the longest message is that rebuild,
    and in the broker every message of the moment waits behind it.
    """
    from broker.core import WINDOW_SHARDS, AckWindow

    keys = [("bob", f"m{i}") for i in range(n)]
    acked = ("m", 1, 1, "general", None)

    def plain() -> Callable[[tuple[str, str]], None]:
        d: dict[tuple[str, str], object] = {}

        def one(key: tuple[str, str]) -> None:
            d.get(key)
            d[key] = acked
            if len(d) > WINDOW:
                del d[next(iter(d))]

        return one

    def ordered() -> Callable[[tuple[str, str]], None]:
        d: OrderedDict[tuple[str, str], object] = OrderedDict()

        def one(key: tuple[str, str]) -> None:
            d.get(key)
            d[key] = acked
            if len(d) > WINDOW:
                d.popitem(last=False)

        return one

    def sharded() -> Callable[[tuple[str, str]], None]:
        w = AckWindow(WINDOW)

        def one(key: tuple[str, str]) -> None:
            w.get(key)
            w.put(key, acked)

        return one

    clock = time.perf_counter
    for name, make in (
        ("plain dict, del d[next(iter(d))]", plain),
        ("OrderedDict.popitem(last=False)", ordered),
        (f"AckWindow ({WINDOW_SHARDS} dicts, a ring of keys)", sharded),
    ):
        gc.disable()  # the window's own cost, not the collector's
        try:
            one = make()
            started = time.process_time()
            for key in keys:
                one(key)
            used = time.process_time() - started
            one, longest = make(), 0.0
            for key in keys:
                before = clock()
                one(key)
                longest = max(longest, clock() - before)
        finally:
            gc.enable()
        print(f"{name}: {used / n * 1e6:.2f} us per message, the longest {longest * 1e3:.2f} ms ({n} messages)")


def gc_pauses(n: int = 300_000) -> None:
    from broker.core import Core, Limits
    from zchat import protocol as p

    pauses: list[tuple[float, int]] = []
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - started[0], info["generation"]))

    core = Core(epoch="e", heartbeat_ms=5000, limits=Limits(rate=0, join_rate=0))
    ident = b"\x00abcd"
    core.handle(ident, p.encode(p.hello("bob")), 1)
    core.handle(ident, p.encode({"type": "join", "room": "general"}), 1)
    encode = p.Encoder()
    gc.callbacks.append(callback)
    try:
        for i in range(n):
            for action in core.handle(
                ident, encode({"type": "msg", "room": "general", "text": "x" * 100, "id": f"m{i}"}), 1
            ):
                encode(action.env)  # type: ignore[union-attr]
    finally:
        gc.callbacks.remove(callback)
    for gen in (0, 1, 2):
        times = [d for d, g in pauses if g == gen]
        if times:
            longest, total = max(times) * 1e3, sum(times) * 1e3
            print(f"gen {gen}: {len(times)} collections, longest {longest:.1f} ms, total {total:.0f} ms")


def commit(batches: int = 6000, rows_per_batch: int = 5) -> None:
    from broker.store import Store

    for durability in ("normal", "full"):
        store = Store(Path(tempfile.mkdtemp()), durability)
        times = []
        seq = 0
        for _ in range(batches):
            rows = []
            for _ in range(rows_per_batch):
                seq += 1
                rows.append(("general", seq, 1, "bob", f"m{seq}", b"x" * 150))
            started = time.perf_counter()
            store.append(rows)
            times.append(time.perf_counter() - started)
            time.sleep(0.0005)  # a broker at a few thousand messages a second
        store.close()
        times.sort()
        k = len(times)
        print(
            f"{durability}: commit p50 {times[k // 2] * 1e6:.0f} us, p99 {times[int(k * 0.99)] * 1e6:.0f} us, "
            f"p99.9 {times[int(k * 0.999)] * 1e6:.0f} us, max {times[-1] * 1e3:.1f} ms"
        )


def stalls(seconds: float = 10.0, rows_per_commit: int = 50, per_second: int = 1000) -> None:
    """Commit latency while the WAL grows fast (50k rows of 1 KiB a second: 80 MB of WAL a
    second, so it starts over twice a second), durability full, in a directory on the disk."""
    from broker.store import Store
    from zchat import protocol as p

    body = p.encode(p.msg_event("general", 1, 1_764_550_000_000, "alice", "0" * 16, "x" * 1024, "m1"))
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        store = Store(Path(tmp), "full")
        times: list[float] = []
        seq, commits = 0, int(seconds * per_second)
        began = time.perf_counter()
        for i in range(commits):
            rows = []
            for _ in range(rows_per_commit):
                seq += 1
                rows.append(("general", seq, 1, "alice", f"m{seq}", body))
            started = time.perf_counter()
            store.append(rows)
            times.append(time.perf_counter() - started)
            while time.perf_counter() < began + (i + 1) / per_second:
                pass  # paced: a broker that keeps up, not one that falls behind
        store.close()
    long = sorted(round(t * 1e3, 1) for t in times if t > 0.01)
    times.sort()
    k = len(times)
    print(
        f"{k} commits of {rows_per_commit} rows of 1 KiB: p50 {times[k // 2] * 1e3:.2f} ms, "
        f"p99 {times[int(k * 0.99)] * 1e3:.2f} ms, p99.9 {times[int(k * 0.999)] * 1e3:.2f} ms, "
        f"max {times[-1] * 1e3:.1f} ms; {len(long)} over 10 ms, {sum(long):.0f} ms in all: {long[-10:]}"
    )


_SCHEMA_1 = (
    "CREATE TABLE events (room TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, name TEXT, "
    "msg_id TEXT, body BLOB NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID"
)


def rows(n: int = 20_000, batch: int = 100) -> None:
    """WAL written per row, and time per row, for the old and the current table layout."""
    import sqlite3

    from broker.store import _SCHEMA

    for size in (100, 1100):
        for name, schema in (("schema 1 (WITHOUT ROWID)", _SCHEMA_1), ("schema 2 (rowid + unique)", _SCHEMA)):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "s.db"
                db = sqlite3.connect(path, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")
                db.execute(schema)
                body = b"x" * size
                start = time.perf_counter()
                for first in range(0, n, batch):
                    db.execute("BEGIN")
                    db.executemany(
                        "INSERT INTO events (room, seq, ts, name, msg_id, body) VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            ("general", s, 1_700_000_000_000, "alice", f"id{s}", body)
                            for s in range(first, first + batch)
                        ],
                    )
                    db.execute("COMMIT")
                elapsed = time.perf_counter() - start
                wal = (Path(tmp) / "s.db-wal").stat().st_size
                db.close()
            print(
                f"{size:>5} B rows, batches of {batch}, {name}: "
                f"{wal / n:,.0f} B of WAL, {elapsed / n * 1e6:.1f} us per row"
            )


def sessions(n: int = 1000) -> None:
    """What the core keeps per session (hello + join of its own room): Python objects only."""
    import os
    import tracemalloc

    import msgpack

    from broker.core import Core

    core = Core(epoch="e", heartbeat_ms=5000, room_seqs={}, recent_acks=[])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        identity = os.urandom(5)
        core.handle(identity, msgpack.packb({"type": "hello", "v": 1, "name": f"m{i}"}), 0)
        core.handle(identity, msgpack.packb({"type": "join", "room": f"r{i}"}), 0)
    after = tracemalloc.get_traced_memory()[0]
    print(f"{n} sessions: {(after - before) / n / 1024:.2f} KiB of Python heap per session (hello + join)")


def append(n: int = 120_000) -> None:
    """CPU of Store.append per row, for the commit sizes of a quiet and of a busy broker,
    keeping every event and with a retention (which deletes as many as it stores)."""
    from broker.store import Store

    where = "/dev/shm" if Path("/dev/shm").is_dir() else None  # the CPU, not the disk
    for retention in (None, 1000):
        for batch in (3, 30, 300):
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                store = Store(Path(tmp), "normal", retention)
                rows = [("r", i, i, "ann", f"m{i}", b"x" * 130) for i in range(1, n + 1)]
                started = time.process_time()
                for k in range(0, n, batch):
                    store.append(rows[k : k + batch])
                used = time.process_time() - started
                store.close()
            kept = "every event kept" if retention is None else f"--retention {retention}"
            print(
                f"commits of {batch:>3} rows, {kept}: {used / n * 1e6:.2f} us of CPU per row "
                "(the process: with its checkpoints)"
            )


def growth(n: int = 20_000) -> None:
    """Bytes on disk per stored message (the envelope as published, its row and index), once closed."""
    from broker.store import Store
    from zchat import protocol as p

    for size in (100, 1024):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "data", "normal")
            for start in range(0, n, 500):
                rows = []
                for seq in range(start + 1, start + 501):
                    env = p.msg_event("general", seq, 1_764_550_000_000 + seq, "alice", "0" * 16, "x" * size, f"m{seq}")
                    rows.append(("general", seq, env["ts"], "alice", f"m{seq}", p.encode(env)))
                store.append(rows)
            store.close()  # checkpoints the WAL into the database
            total = sum(f.stat().st_size for f in (Path(tmp) / "data").iterdir())
        print(f"{size:>4} B texts: {total / n:.0f} bytes on disk per message ({n} messages in one room)")


def core(n: int = 100_000, runs: int = 7) -> None:
    """The core's part of a room message: decode_request, and Core.handle with it (decoding,
    checks, seq, event, ack, resend window full), 100 B texts; the fastest of ``runs``."""
    import msgpack

    from broker.core import Core, Limits
    from zchat import protocol as p

    frames = [
        msgpack.packb({"type": "msg", "id": f"{i:08x}", "room": "bench", "text": "x" * 100}) for i in range(2 * n)
    ]
    handle_s = decode_s = float("inf")
    for _ in range(runs):
        core = Core(epoch="e", heartbeat_ms=5000, limits=Limits(rate=0, join_rate=0, max_sessions_per_host=0))
        ident = b"\x00bench"
        core.handle(ident, msgpack.packb({"type": "hello", "v": p.VERSION, "name": "bob"}), 1)
        core.handle(ident, msgpack.packb({"type": "join", "room": "bench"}), 1)
        handle, decode, now = core.handle, p.decode_request, 1_700_000_000_000
        for frame in frames[:n]:  # fills the resend window as a busy broker's is
            handle(ident, frame, now)
        gc.collect()
        gc.disable()
        try:
            started = time.thread_time()
            for frame in frames[n:]:
                handle(ident, frame, now)
            handle_s = min(handle_s, time.thread_time() - started)
            started = time.thread_time()
            for frame in frames[n:]:
                decode(frame)
            decode_s = min(decode_s, time.thread_time() - started)
        finally:
            gc.enable()
    print(
        f"decode_request {decode_s / n * 1e6:.2f} us, Core.handle {handle_s / n * 1e6:.2f} us "
        f"per message (best of {runs})"
    )


def main(argv: list[str]) -> int:
    what: dict[str, Callable[[], None]] = {
        "window": window,
        "gc": gc_pauses,
        "commit": commit,
        "stalls": stalls,
        "rows": rows,
        "sessions": sessions,
        "append": append,
        "growth": growth,
        "core": core,
    }
    if len(argv) != 1 or argv[0] not in what:
        print(__doc__)
        return 2
    what[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
