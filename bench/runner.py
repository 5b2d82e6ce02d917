"""Runs the plan's groups point by point, with the step-test logic, and keeps every result."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Pinning, Point, Result, run_point
from bench.plan import NAIVE, ZCHAT, Group, Mode, nice, start_rate
from bench.targets import get_target

#: A step the system "kept up with": this little loss, this much of the offered rate delivered.
MAX_LOSS = 0.01
MIN_DELIVERED = 0.95


def saturated(r: Result) -> bool:
    if r.error or r.offered is None:
        return True
    p = r.point
    return (
        r.loss > MAX_LOSS
        or r.sent_rate < MIN_DELIVERED * r.offered
        or r.deliveries < MIN_DELIVERED * r.sent_rate * p.members
        or bool(r.errors)
    )


@dataclass
class Run:
    mode: Mode
    pins: Pinning
    workers: int
    root: Path
    results: list[Result] = field(default_factory=list)
    #: (group key, target) -> capacity in delivered msg/s.
    capacity: dict[tuple[str, str], float] = field(default_factory=dict)
    #: (group key, target) -> each ladder's capacity (None: it kept up with no step), in the
    #: order run, where a group ran more than one (Mode.repeat_ladders).
    ladders: dict[tuple[str, str], list[float | None]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def point(self, point: Point) -> Result:
        r = run_point(point, self.mode.timing, self.pins, self.workers, self.root)
        self.results.append(r)
        self._log(r)
        return r

    def _log(self, r: Result) -> None:
        p = r.point
        lat = r.latency_us.get("p99")
        what = (
            f"rss {r.rss_before_kib}->{r.rss_after_kib} KiB, connect {r.connect_s}"
            if p.idle
            else f"offered {r.offered or 0:>8.0f} sent {r.sent_rate:>8.0f} delivered {r.delivered:>8.0f} msg/s"
            f" loss {r.loss:6.2%} p99 {lat if lat is None else round(lat)} us"
        )
        elapsed = time.monotonic() - self.started
        flag = "  SATURATED" if not p.idle and saturated(r) else ""
        error = f"  ERROR {r.error}" if r.error else ""
        print(
            f"[{elapsed:6.0f}s] {p.target:>12} {p.workload:<16} {p.size:>5}B {p.tag:<6} {what}{flag}{error}",
            file=sys.stderr,
        )

    def group(self, g: Group) -> None:
        if g.kind == "idle":
            for target in g.targets:
                clients = min(g.clients, get_target(target).max_idle_clients)
                rooms = min(g.rooms, clients)
                point = Point(
                    target, rooms, clients // rooms, g.size, None, sessions=True, idle=True, tag="idle", pings=g.pings
                )
                self.point(point)
            return
        if g.kind == "fixed":
            for rate in g.rates:
                self.latency_points([g.point(target, rate, "fixed") for target in g.targets])
            return
        targets = [t for t in g.targets if g.size <= get_target(t).max_text]
        repeated = [t for t in (ZCHAT, NAIVE) if t in targets] if g.repeat and self.mode.repeat_ladders > 1 else []
        # Where it repeats ladders a group bisects finer, every target of it alike (they share its table).
        refine = self.mode.repeat_refine if repeated else None
        # The repeated pair takes turns, so a drift of the machine over the minutes
        # the ladders take falls on both alike.
        for _ in range(self.mode.repeat_ladders if repeated else 0):
            for target in repeated:
                self.ladders.setdefault((g.key, target), []).append(self.ladder(g, target, refine))
        for target in repeated:
            # A ladder that kept up with no step counts as 0 msg/s: it pulls the median down.
            median = statistics.median_low([c or 0.0 for c in self.ladders[(g.key, target)]])
            if median > 0:
                self.capacity[(g.key, target)] = median
        for target in targets:
            if target in repeated:
                continue
            best = self.ladder(g, target, refine)
            if best is not None:
                self.capacity[(g.key, target)] = best
        if g.fixed_rate is not None:
            self.latency_points([g.point(target, g.fixed_rate, "fixed") for target in g.targets])
            return
        base = self.capacity.get((g.key, ZCHAT))
        if base is not None:
            rate = nice(0.3 * base)
            wanted = self.mode.lat30_targets
            self.latency_points([g.point(t, rate, "lat30") for t in g.targets if wanted is None or t in wanted])

    def latency_points(self, points: list[Point]) -> None:
        """Each point ``latency_runs`` times, the targets taking turns; keep each one's median run by p99."""
        runs: dict[Point, list[Result]] = {p: [] for p in points}
        for _ in range(self.mode.latency_runs):
            for p in points:
                r = run_point(p, self.mode.timing, self.pins, self.workers, self.root)
                self._log(r)
                runs[p].append(r)
        for p in points:
            ok = sorted((r for r in runs[p] if r.error is None), key=lambda r: r.latency_us.get("p99") or 0.0)
            chosen = ok[len(ok) // 2] if ok else runs[p][-1]
            chosen.p99_runs_us = [r.latency_us.get("p99") for r in runs[p]]
            self.results.append(chosen)

    def ladder(self, g: Group, target: str, refine: int | None = None) -> float | None:
        """Step test: double while keeping up, halve while not; then bisect the bracket.

        The step that turns the ladder round (the first doubling step it fails, the first
        halving step it keeps up with) bounds the bisection, so it runs to a majority like a
        bisection step: one unlucky run there capped a whole ladder (1 KiB at 1x1 failed its
        60k step once in one full run and settled at 50k; the run before held 60k).
        """
        rate = start_rate(g.members)
        low = high = None
        best: float | None = None
        for _ in range(self.mode.max_steps):
            r = self.point(g.point(target, rate, "step"))
            ok = not saturated(r)
            if (ok and high is not None) or (not ok and low is not None):
                kept = self.trial(g, target, rate, [r])  # it turns the ladder round
            else:
                kept = r.delivered if ok else None
            if kept is None:
                high = rate
                if low is not None:
                    break
                rate = nice(rate / 2)
            else:
                low = rate
                best = max(best or 0.0, kept)
                if high is not None:
                    break
                rate = nice(rate * 2)
        if low is None or high is None:
            return best
        for _ in range(self.mode.refine if refine is None else refine):
            middle = nice(math.sqrt(low * high))
            if not low < middle < high:
                break
            kept = self.trial(g, target, middle)
            if kept is None:
                high = middle
            else:
                low = middle
                best = max(best or 0.0, kept)
        return best

    def trial(self, g: Group, target: str, rate: float, done: Sequence[Result] = ()) -> float | None:
        """A step near capacity, run until a majority of ``mode.trials`` runs agrees.

        ``done``: runs of this step already made. The most a run that kept up delivered, if
        most did; None if most did not.
        """
        need = self.mode.trials // 2 + 1
        runs = list(done)
        while True:
            kept = [r.delivered for r in runs if not saturated(r)]
            if len(kept) >= need:
                return max(kept)
            if len(runs) - len(kept) >= need:
                return None
            runs.append(self.point(g.point(target, rate, "step")))
