"""Micro-measurements behind three broker fixes, in-process and single-threaded.

    python -m bench.micro window   # resend window: plain-dict eviction vs OrderedDict, us per message
    python -m bench.micro gc       # GC pauses of the core over 300k messages
    python -m bench.micro commit   # store commit latency (p50/p99/p99.9/max) for small batches

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


def window(n: int = 300_000) -> None:
    plain: dict[tuple[str, str], int] = {}
    started = time.process_time()
    for i in range(n):
        plain[("bob", f"m{i}")] = i
        if len(plain) > WINDOW:
            del plain[next(iter(plain))]
    print(f"plain dict, del d[next(iter(d))]: {(time.process_time() - started) / n * 1e6:.2f} us per insert+evict")
    ordered: OrderedDict[tuple[str, str], int] = OrderedDict()
    started = time.process_time()
    for i in range(n):
        ordered[("bob", f"m{i}")] = i
        if len(ordered) > WINDOW:
            ordered.popitem(last=False)
    print(f"OrderedDict.popitem(last=False): {(time.process_time() - started) / n * 1e6:.2f} us per insert+evict")


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


def main(argv: list[str]) -> int:
    what: dict[str, Callable[[], None]] = {"window": window, "gc": gc_pauses, "commit": commit}
    if len(argv) != 1 or argv[0] not in what:
        print(__doc__)
        return 2
    what[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
