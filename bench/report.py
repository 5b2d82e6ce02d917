"""docs/benchmarks.md and its plot, from the results of one run."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.harness import GREETING_ROUNDTRIPS, SETTLE_S, Result
from bench.machine import SYNC_KEY
from bench.plan import HEARTBEAT_S, SCALE_OUT, ZCHAT, Group
from bench.runner import MAX_LOSS, MIN_DELIVERED, Run, saturated

#: The targets of issue #7.
TARGET_RATIO_NAIVE = 0.8
TARGET_P99_30PCT_MS = 1.0
TARGET_P99_1000_MS = 5.0
TARGET_IDLE_KIB = 50.0

LIMITS = (ZCHAT, "zchat-normal", "naive", "raw")
#: Colours in the plot follow this order (matplotlib's C0, C1, ...).
PLOT_ORDER = (*LIMITS, "redis", "mosquitto", "nats", "ngircd", "zchat-bp-1", "zchat-bp-2", "zchat-bp-4")


@dataclass
class Meta:
    command: str
    date: str
    elapsed_s: float
    machine: dict[str, str]
    versions: dict[str, str]
    unavailable: dict[str, str]
    install_log: list[str]
    pinning: str
    load_before: str
    load_after: str
    labels: dict[str, str]
    server_commands: dict[str, str]
    #: Later runs of some groups merged into this one (``--merge``): command, date, groups, what differed.
    merged: list[dict[str, Any]] = field(default_factory=list)


def rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}"


def dur(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.1f} ms"
    return f"{us / 1e6:.2f} s"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def bracket(refine: int) -> str:
    """How far above the capacity found a step test's last bracket reaches, after ``refine`` bisections."""
    return f"+{2 ** (1 / 2**refine) - 1:.1%}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def brokers_of(target: str) -> int:
    """How many brokers a target runs (zchat-bp-N: N)."""
    return int(target.rsplit("-", 1)[1]) if target.startswith("zchat-bp-") else 1


def total_us(r: Result) -> float | None:
    """CPU µs per message of the whole system under test: its brokers and its backplane."""
    if r.server_us_per_message is None:
        return None
    return r.server_us_per_message + (r.backplane_us_per_message or 0.0)


def runs_text(r: Result) -> str:
    """For a point run several times: which run this is, and every run's p99."""
    if len(r.p99_runs_us) < 2:
        return ""
    return f"; the median of {len(r.p99_runs_us)} runs, whose p99 were " + ", ".join(dur(v) for v in r.p99_runs_us)


#: Which RSS sample of an idle point: 1 s after the clients joined, SETTLE_S after it,
#: after their first GREETING_ROUNDTRIPS round trips, after all their pings.
Sample = Literal["joined", "settled", "greeted", "pinged"]


def rss_per_client(r: Result, sample: Sample = "joined") -> float | None:
    """Growth of the server's RSS over an idle point, per connected client (KiB), at ``sample``."""
    after = {
        "joined": r.rss_after_kib,
        "settled": r.rss_settled_kib,
        "greeted": r.rss_greeted_kib,
        "pinged": r.rss_pinged_kib,
    }[sample]
    if r.rss_before_kib is None or after is None:
        return None
    return (after - r.rss_before_kib) / r.point.subscribers


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def verdict_min(measured: float | None, goal: float) -> str:
    if measured is None:
        return "not measured"
    if measured >= goal:
        return "met"
    return f"**missed**: {measured:.2f}x is {goal - measured:.2f}x short ({1 - measured / goal:.0%} below the target)"


def verdict_max(measured: float | None, goal: float, unit: str) -> str:
    if measured is None:
        return "not measured"
    if measured < goal:
        return "met"
    return f"**missed** by {measured - goal:.3g} {unit} ({measured / goal:.1f}x the target)"


class Report:
    def __init__(self, run: Run, groups: list[Group], meta: Meta) -> None:
        self.run = run
        self.groups = {g.key: g for g in groups}
        self.meta = meta
        self.results = run.results

    # ------------------------------------------------------------ lookups

    def of(self, key: str, target: str | None = None, tag: str | None = None) -> list[Result]:
        g = self.groups.get(key)
        if g is None:
            return []
        return [
            r
            for r in self.results
            if r.point.target in g.targets
            and (target is None or r.point.target == target)
            and (tag is None or r.point.tag == tag)
            and g.point(r.point.target, r.point.rate, r.point.tag) == r.point
        ]

    def cap(self, key: str, target: str) -> float | None:
        """Sustained capacity: the best delivered rate of a step the system kept up with."""
        return self.run.capacity.get((key, target))

    def peak(self, key: str, target: str) -> float | None:
        """The most messages/s any step delivered, kept up with or not."""
        return max((r.delivered for r in self.of(key, target, "step") if not r.error), default=None)

    def spread_note(self, key: str) -> str:
        """Said beside a verdict the ladders' own spread could turn either way."""
        spread = self.ladders_spread(key)
        if spread is None or not spread[0] <= TARGET_RATIO_NAIVE <= spread[1]:
            return ""
        return (
            f", but not robustly: pairs of these ladders give {spread[0]:.2f}x to {spread[1]:.2f}x, "
            f"either side of {TARGET_RATIO_NAIVE}x"
        )

    def ladders_text(self, key: str) -> str:
        """How the capacities of zchat and naive were found, where they ran several ladders."""
        runs = {t: self.run.ladders.get((key, t), []) for t in (ZCHAT, "naive")}
        n = max(len(caps) for caps in runs.values())
        if n < 2:
            return ""
        each = "; ".join(f"{t} {', '.join(rate(c) for c in caps)}" for t, caps in runs.items() if caps)
        return f"each the median of {n} ladders: {each}"

    def ladders_spread(self, key: str) -> tuple[float, float] | None:
        """The lowest and highest zchat/naive ratio any pair of their ladders gives, where
        each ran several: a target inside that range is met or missed by the draw."""
        z, n = self.run.ladders.get((key, ZCHAT), []), self.run.ladders.get((key, "naive"), [])
        if len(z) < 2 or len(n) < 2 or min(n) <= 0:
            return None
        return min(z) / max(n), max(z) / min(n)

    def lat30(self, key: str, target: str) -> Result | None:
        found = self.of(key, target, "lat30")
        return found[-1] if found else None

    def fixed(self, key: str, target: str) -> Result | None:
        """A ladder group's point at its fixed rate (scale-out)."""
        found = self.of(key, target, "fixed")
        return found[-1] if found else None

    # ------------------------------------------------------------ sections

    def markdown(self, plot_name: str | None) -> str:
        m = self.meta
        out = [
            "# Benchmarks",
            "",
            f"Generated by `bench/` on {m.date} in {m.elapsed_s / 60:.1f} min; regenerate with the command below, "
            "do not edit by hand.",
            "",
            "```sh",
            m.command,
            "```",
            "",
        ]
        for e in m.merged:
            out += [
                f"Then {', '.join(e['groups'])} measured again on {e['date']} in {e['elapsed_s'] / 60:.1f} min "
                "and merged into these results (what differed from the run above is under "
                "[Machine and versions](#machine-and-versions)):",
                "",
                "```sh",
                e["command"],
                "```",
                "",
            ]
        out += self.headline()
        out += self.misses_section()
        if plot_name:
            out += ["", f"![capacity by fan-out, step test and latency]({plot_name})", ""]
        out += self.fanout_section()
        out += self.peer_section()
        out += self.scale_out_section()
        out += self.fixed_section()
        out += self.idle_section()
        out += self.method_section()
        out += self.machine_section()
        out += self.all_points()
        return "\n".join(out) + "\n"

    def headline(self) -> list[str]:
        rows: list[list[str]] = []
        for key, g in self.groups.items():
            if g.kind != "ladder" or "naive" not in g.targets:
                continue
            z, n = self.cap(key, ZCHAT), self.cap(key, "naive")
            r = ratio(z, n)
            pz, pn = self.peak(key, ZCHAT), self.peak(key, "naive")
            pr = ratio(pz, pn)
            rows.append(
                [
                    f"zchat / naive forwarder, sustained capacity, {g.title}",
                    f">= {TARGET_RATIO_NAIVE}x",
                    (
                        "-"
                        if r is None
                        else f"{r:.2f}x ({rate(z)} / {rate(n)} msg/s"
                        + (f"; {lt})" if (lt := self.ladders_text(key)) else ")")
                    )
                    + ("" if pr is None else f"; peak {pr:.2f}x ({rate(pz)} / {rate(pn)})"),
                    verdict_min(r, TARGET_RATIO_NAIVE) + self.spread_note(key),
                ]
            )
        head = self.headline_group()
        # The headline workload, and one subscriber: there the receivers' own latency does not hide the broker's.
        for g in [head, self.groups.get("fanout-1")] if head is not None else []:
            if g is None:
                continue
            r30 = self.lat30(g.key, ZCHAT)
            p99 = None if r30 is None else r30.latency_us.get("p99")
            rows.append(
                [
                    f"p99 delivery latency at 30% of zchat capacity "
                    f"({rate(r30.offered if r30 else None)} msg/s), {g.title}",
                    f"< {TARGET_P99_30PCT_MS:g} ms",
                    dur(p99)
                    + ("" if r30 is None else f" (loss {pct(r30.loss)}{runs_text(r30)})")
                    + self.floors(g.key, "lat30"),
                    verdict_max(None if p99 is None else p99 / 1000, TARGET_P99_30PCT_MS, "ms"),
                ]
            )
        fixed = [r for r in self.of("rooms-100x10", ZCHAT, "fixed") if r.offered == 1000]
        if fixed:
            p99 = fixed[-1].latency_us.get("p99")
            rows.append(
                [
                    "p99 delivery latency, 1,000 clients (100 rooms x 10, sessions) at 1,000 msg/s",
                    f"< {TARGET_P99_1000_MS:g} ms",
                    f"{dur(p99)} (loss {pct(fixed[-1].loss)}{runs_text(fixed[-1])})"
                    + self.floors("rooms-100x10", "fixed", 1000),
                    verdict_max(None if p99 is None else p99 / 1000, TARGET_P99_1000_MS, "ms"),
                ]
            )
        # Settled: what an idle client goes on costing, once the broker has handed back what
        # the connecting freed (results from before SETTLE_S have the 1 s sample only).
        settled = self.idle_per_client(ZCHAT, sample="settled")
        early = self.idle_per_client(ZCHAT)
        per_client = early if settled is None else settled
        spread = self.idle_per_client(ZCHAT, rooms=100, sample="settled" if settled is not None else "joined")
        # (1 s after: the naive forwarder trims nothing and has no gate, and later its clients'
        # pings go out to every subscriber, which is no idling.)
        naive = self.idle_per_client("naive")
        rows.append(
            [
                "broker RSS per idle client (hello + join, DEALER + SUB), all in one room",
                f"< {TARGET_IDLE_KIB:g} KiB",
                ("-" if per_client is None else f"{per_client:.1f} KiB")
                + (
                    ""
                    if settled is None or early is None
                    else f" {SETTLE_S:g} s after the last join ({early:.1f} KiB 1 s after)"
                )
                + ("" if spread is None else f"; the same clients in 100 rooms: {spread:.1f} KiB")
                + (
                    ""
                    if naive is None
                    else f"; the same two ZeroMQ connections without a session (naive forwarder): {naive:.1f} KiB"
                )
                + self.idle_floor_text()
                + self.idle_pinged_text(),
                verdict_max(per_client, TARGET_IDLE_KIB, "KiB"),
            ]
        )
        idle = self.idle(ZCHAT)
        if idle is not None and idle.connect_s:
            rows.append(
                [
                    f"time to connect {idle.point.subscribers:,} clients (hello -> welcome; -> joined)",
                    "-",
                    f"{dur(idle.connect_s.get('welcome', 0) * 1e6)}; {dur(idle.connect_s.get('joined', 0) * 1e6)}",
                    "",
                ]
            )
        if head is not None:
            for peer in head.targets:
                if peer in LIMITS:
                    continue
                z, c = self.cap(head.key, ZCHAT), self.cap(head.key, peer)
                r = ratio(z, c)
                rows.append(
                    [
                        f"zchat / {self.meta.labels.get(peer, peer)}, sustained capacity, {head.title}",
                        "-",
                        "-" if r is None else f"{r:.2f}x ({rate(z)} / {rate(c)} msg/s)",
                        "",
                    ]
                )
        rows += self.scale_out_headline()
        out = ["## Headline", ""]
        out += table(["what", "target", "measured", "verdict"], rows)
        loaded = [r for r in self.results if not r.point.idle and r.other_cpu is not None]
        if loaded:
            other = sorted(r.other_cpu or 0.0 for r in loaded)[len(loaded) // 2]
            disk = sorted(r.disk_busy or 0.0 for r in loaded)[len(loaded) // 2]
            out += [
                "",
                f"During the median point, other processes on this machine used {other:.0%} of a CPU core and "
                f"the busiest disk was {disk:.0%} busy (per point in [Every point](#every-point)); the numbers "
                "are perturbed by that much.",
            ]
        failed = [r for r in self.results if r.error]
        if failed:
            out += ["", f"{len(failed)} point(s) failed:", ""]
            out += [f"- {r.point.target}, {r.point.workload}, {r.point.tag}: {r.error}" for r in failed]
        if self.meta.unavailable:
            out += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in self.meta.unavailable.items()) + "."]
        return out

    def sync_figure(self) -> str | None:
        """The disk's sync latency, from the latest run (merged or not) that measured it."""
        for m in [*(e.get("machine", {}) for e in reversed(self.meta.merged)), self.meta.machine]:
            if (v := m.get(SYNC_KEY)) and not v.startswith("not measured"):
                return str(v)
        return None

    def misses_section(self) -> list[str]:
        """Each missed target, with what this run's own figures say it comes from."""
        items: list[str] = []
        for key, g in self.groups.items():
            if g.kind == "ladder" and "naive" in g.targets:
                r = ratio(self.cap(key, ZCHAT), self.cap(key, "naive"))
                if r is not None and r < TARGET_RATIO_NAIVE:
                    items.append(self.ratio_miss(g, r))
        head = self.headline_group()
        for g in [head, self.groups.get("fanout-1")] if head is not None else []:
            r30 = None if g is None else self.lat30(g.key, ZCHAT)
            p99 = None if r30 is None else r30.latency_us.get("p99")
            if g is not None and r30 is not None and p99 is not None and p99 >= TARGET_P99_30PCT_MS * 1000:
                items.append(self.latency_miss(g, r30, p99))
        settled = self.idle_per_client(ZCHAT, sample="settled")
        per_client = self.idle_per_client(ZCHAT) if settled is None else settled
        if per_client is not None and per_client >= TARGET_IDLE_KIB:
            items.append(self.idle_miss(per_client))
        if not items:
            return []
        return ["", "## The targets missed, and what they come from", "", *items]

    def ratio_miss(self, g: Group, r: float) -> str:
        z, n = self.at_capacity(g.key, ZCHAT), self.at_capacity(g.key, "naive")
        base = next(
            (
                b
                for b in self.groups.values()
                if b.kind == "ladder"
                and not b.series
                and b.size == 100
                and (b.rooms, b.members) == (g.rooms, g.members)
            ),
            None,
        )
        zb = None if base is None or g.size == 100 else self.at_capacity(base.key, ZCHAT)
        nb = None if base is None or g.size == 100 else self.at_capacity(base.key, "naive")

        def us(x: Result | None) -> str:
            return "-" if x is None or x.server_us_per_message is None else f"{x.server_us_per_message:.1f} µs"

        text = (
            f"- **zchat / naive forwarder, {g.title}: {r:.2f}x.** At its capacity zchat's broker spent "
            f"{us(z)} of CPU a message"
            + ("" if z is None else f" (its main thread {pct(z.server_main_cpu)} busy)")
            + ("" if zb is None else f", against {us(zb)} with 100 B texts")
            + f"; the naive forwarder {us(n)}"
            + ("" if nb is None else f" ({us(nb)} with 100 B texts)")
            + ". "
        )
        if g.size > 100:
            text += (
                "A longer text costs zchat more than the forwarder because zchat stores it before it "
                "acknowledges and publishes it: SQLite writes each row into its write-ahead log, syncs the "
                "log, and copies the row again into the database when it checkpoints, where the forwarder "
                "only passes the bytes on. "
            )
        raw = self.cap(g.key, "raw")
        if n is not None and raw:
            text += (
                f"With no broker at all, the same load generators moved {rate(raw)} msg/s (raw PUB->SUB): "
                f"the forwarder's {rate(n.delivered)} is {n.delivered / raw:.0%} of that, so the ratio also "
                "measures zchat against what the load generators can offer on this machine."
            )
        return text.rstrip()

    def latency_miss(self, g: Group, r30: Result, p99: float) -> str:
        cap = self.at_capacity(g.key, ZCHAT)
        naive, raw = self.lat30(g.key, "naive"), self.lat30(g.key, "raw")
        normal = self.lat30(g.key, "zchat-normal")
        text = (
            f"- **p99 at 30% of capacity, {g.title}: {dur(p99)}.** At this rate zchat's broker was "
            f"{pct(r30.server_cpu)} busy (main thread {pct(r30.server_main_cpu)})"
        )
        if r30.server_us_per_message is not None and cap is not None and cap.server_us_per_message is not None:
            text += (
                f", at {r30.server_us_per_message:.1f} µs of CPU a message against "
                f"{cap.server_us_per_message:.1f} at capacity: a loop pass then holds few messages, so the "
                "costs a pass pays however many it holds (the poll, the store's commit and its sync, a send "
                "per room and per acknowledged sender) fall on few, and a message that arrives during a "
                "pass waits for it to end"
            )
        if naive is not None and naive.server_cpu is not None:
            text += f"; the naive forwarder was {pct(naive.server_cpu)} busy at the same rate"
        text += ". "
        if normal is not None and (np99 := normal.latency_us.get("p99")) is not None:
            text += f"Without the sync before each ack (`--durability normal`) the p99 was {dur(np99)}. "
        if (sync := self.sync_figure()) is not None:
            text += f"One sync on this disk: {sync} ([Machine and versions](#machine-and-versions)). "
        floor = [(t, x.latency_us.get("p99")) for t, x in (("raw PUB->SUB", raw), ("naive forwarder", naive)) if x]
        shown = [f"{t} {dur(v)}" for t, v in floor if v is not None]
        if shown:
            text += "Without zchat, the same load generators measured p99: " + ", ".join(shown)
            if any(v is not None and v >= TARGET_P99_30PCT_MS * 1000 for t, v in floor if t.startswith("raw")):
                text += " (raw PUB->SUB, with no broker at all, is itself at or over the target here)"
            text += "."
        return text.rstrip()

    def idle_miss(self, per_client: float) -> str:
        echo = self.idle_per_client("zmq-echo", rooms=100, sample="greeted")
        zchat100 = self.idle_per_client(ZCHAT, rooms=100, sample="settled") or self.idle_per_client(ZCHAT, rooms=100)
        text = f"- **Broker RSS per idle client: {per_client:.1f} KiB.** "
        if echo is not None:
            text += (
                f"libzmq alone (an echo server, no Python state) keeps {echo:.1f} KiB a client after the same "
                f"{GREETING_ROUNDTRIPS} round trips as zchat's hello and join"
                + (f", and zchat in 100 rooms {zchat100 - echo:+.1f} on top of that" if zchat100 is not None else "")
                + (
                    ": the target is below libzmq's own floor for a client's two connections"
                    if echo >= TARGET_IDLE_KIB
                    else ""
                )
                + ". "
            )
        text += (
            "libzmq keeps each connection's messages in pipes of 16 KiB chunks and no socket option of "
            "libzmq 4.3 shrinks them (its batch-size options are draft options, not built into pyzmq's "
            "libzmq). In one room zchat holds more than in 100 because each `joined` reply lists the "
            "room's members so far: the allocator keeps that burst's memory ([Idle clients]"
            "(#idle-clients-memory-and-connect-time))."
        )
        return text

    def floors(self, key: str, tag: str, offered: float | None = None) -> str:
        """p99 of the limits (raw PUB->SUB, naive forwarder) at the same point: what the harness itself shows."""
        parts = []
        for t in ("raw", "naive"):
            found = [r for r in self.of(key, t, tag) if offered is None or r.offered == offered]
            if found and (p99 := found[-1].latency_us.get("p99")) is not None:
                parts.append(f"{t} {dur(p99)}")
        return f"; same load, p99 of {', '.join(parts)}" if parts else ""

    def scale_out_group(self) -> Group | None:
        return self.groups.get(SCALE_OUT)

    def at_capacity(self, key: str, target: str) -> Result | None:
        """The step that set the sustained capacity."""
        cap = self.cap(key, target)
        return next((r for r in self.of(key, target, "step") if not saturated(r) and r.delivered == cap), None)

    def scale_out_section(self) -> list[str]:
        g = self.scale_out_group()
        if g is None:
            return []
        label = self.meta.labels
        lat = {t: r for t in g.targets if (r := self.fixed(g.key, t)) is not None}
        zcap = self.cap(g.key, ZCHAT)
        fixed = next(iter(lat.values())).offered if lat else None
        cap_rows = []
        for t in g.targets:
            r = self.at_capacity(g.key, t)
            c = self.cap(g.key, t)
            cap_rows.append(
                [
                    label.get(t, t),
                    str(brokers_of(t)),
                    f"{rate(c)} / {rate(self.peak(g.key, t))}",
                    "-" if c is None or zcap is None else f"{c / zcap:.2f}x",
                    "-"
                    if r is None
                    else f"{pct(r.server_cpu)} ({pct(r.server_main_cpu)}) / {pct(r.backplane_cpu)} / {pct(r.load_cpu)}",
                    "-" if r is None else self.cost(r),
                ]
            )
        base = lat.get(ZCHAT)
        base_total = None if base is None else total_us(base)
        lat_rows = []
        for t in g.targets:
            r = lat.get(t)
            if r is None:
                lat_rows.append([label.get(t, t), str(brokers_of(t)), *["-"] * 6])
                continue
            la, ack = r.latency_us, r.ack_us
            tot = total_us(r)
            lat_rows.append(
                [
                    label.get(t, t),
                    str(brokers_of(t)),
                    f"{dur(la.get('p50'))} / **{dur(la.get('p99'))}** / {dur(la.get('p999'))}"
                    + (" (saturated)" if saturated(r) else ""),
                    f"{pct(r.loss)}",
                    f"{dur(ack.get('p50'))} / {dur(ack.get('p99'))}" if ack else "-",
                    f"{pct(r.server_cpu)} / {pct(r.backplane_cpu)}",
                    self.cost(r),
                    "-" if tot is None or not base_total else f"{tot / base_total:.2f}x",
                ]
            )
        aof = re.search(r"--appendfsync (\w+)", " ".join(self.meta.server_commands.values()))
        cores = self.meta.machine.get("cores", "?")
        out = [
            "",
            f"## Scale-out: {g.title}",
            "",
            "`zchat-broker --backplane redis://...`: every broker appends the messages it accepts with a Lua "
            "script in Redis (seq per room, the room's Stream) that also publishes them on a Redis channel; "
            "every broker listens to that channel and publishes each room event on its own PUB socket. "
            "`zchat-bp-N` starts one redis-server and N brokers (rate limits off: `--rate-limit 0 --join-rate 0`); "
            "the 100 subscribers are spread round-robin over the brokers (SUB socket and session on broker i mod N), "
            "and the sender has one session on every broker and sends each message to the next one in turn. "
            "The embedded-store zchat (SQLite, one broker) is measured in the same run, on the same workload.",
            "",
            f"- **This machine has {cores} CPU cores.** The brokers, Redis and the load generators (the 100 "
            "subscribers alone take more than a core at these rates) all share them, so more brokers cannot "
            "deliver more here: with 4 brokers, 4 event loops and Redis contend for the same 2 cores as the "
            "load. What this group shows is the cost per message of the backplane and how it grows with N, not "
            "the speed-up of brokers on separate machines.",
            f"- Redis runs with the AOF on, `appendfsync {aof[1] if aof else '?'}` and no RDB snapshots. "
            "That is a weaker promise than the embedded store's `--durability full` (an fsync before every "
            "ack): closer to `zchat-normal`, which is why both are in the table. docs/scaling.md recommends "
            "`appendfsync always` for the same promise as `full`.",
            "- CPU: the brokers' CPU is summed over all N broker processes (all threads: the loop and the "
            "threads that read Redis); Redis's is its own process. µs per message = CPU time over the window "
            "/ messages sent in the window (each delivered to 100 subscribers). It is higher at the fixed rate than "
            "at capacity for every system: at a low rate each event leaves as its own write to each subscriber's "
            "connection, at capacity many go out together.",
            "",
            "Step test (sustained capacity / peak, messages/s, as in [Capacity by fan-out]"
            "(#capacity-by-fan-out-step-tests)):",
            "",
        ]
        out += table(
            [
                "system",
                "brokers",
                "sustained / peak msg/s",
                "sustained vs embedded (full)",
                "at capacity: CPU of brokers (main threads) / Redis / load gen",
                "at capacity: CPU µs per message, brokers + Redis",
            ],
            cap_rows,
        )
        out += [
            "",
            f"Every system at the same fixed offered rate, {rate(fixed)} msg/s ({rate((fixed or 0) * g.members)} "
            "deliveries/s); "
            + (
                "every one kept up with it:"
                if not (behind := [t for t, r in lat.items() if saturated(r)])
                else f"{', '.join(behind)} did not keep up with it:"
            ),
            "",
        ]
        out += table(
            [
                "system",
                "brokers",
                "delivery p50 / p99 / p99.9",
                "loss",
                "ack p50 / p99",
                "CPU of brokers / Redis",
                "CPU µs per message, brokers + Redis",
                "vs embedded (full)",
            ],
            lat_rows,
        )
        out += self.scale_out_summary(g, lat)
        return out

    def scale_out_headline(self) -> list[list[str]]:
        g = self.scale_out_group()
        if g is None:
            return []
        bps = [t for t in g.targets if t.startswith("zchat-bp")]
        cores = self.meta.machine.get("cores", "?")
        rows = []
        caps = [f"{brokers_of(t)}: {rate(self.cap(g.key, t))}" for t in bps]
        if caps:
            rows.append(
                [
                    f"scale-out, sustained capacity with N brokers on one Redis, {g.title.split(',')[0]} "
                    f"({cores} cores shared by all)",
                    "-",
                    "N=" + ", N=".join(caps) + f" msg/s; embedded store {rate(self.cap(g.key, ZCHAT))}",
                    "",
                ]
            )
        base = self.fixed(g.key, ZCHAT)
        lat = {t: r for t in bps if (r := self.fixed(g.key, t)) is not None}
        b = None if base is None else total_us(base)
        if base is not None and b and lat:
            costs = [
                f"N={brokers_of(t)}: {tot:.0f} µs ({tot / b:.2f}x), p99 {dur(r.latency_us.get('p99'))}"
                for t, r in lat.items()
                if (tot := total_us(r)) is not None
            ]
            rows.append(
                [
                    f"scale-out, CPU per message (all brokers + Redis) and p99 delivery latency at "
                    f"{rate(base.offered)} msg/s",
                    "-",
                    "; ".join(costs) + f"; embedded store {b:.0f} µs, p99 {dur(base.latency_us.get('p99'))}",
                    "",
                ]
            )
        return rows

    def cost(self, r: Result) -> str:
        if r.server_us_per_message is None:
            return "-"
        if r.backplane_us_per_message is None:
            return f"{r.server_us_per_message:.0f}"
        return f"{r.server_us_per_message:.0f} + {r.backplane_us_per_message:.0f} = {total_us(r):.0f}"

    def scale_out_summary(self, g: Group, lat: dict[str, Result]) -> list[str]:
        """The sentences the group is for: what a message costs on the backplane against the embedded store."""
        base, normal = lat.get(ZCHAT), lat.get("zchat-normal")
        bps = [(t, lat[t]) for t in g.targets if t.startswith("zchat-bp") and t in lat]
        if base is None or not bps or total_us(base) is None:
            return []
        b = total_us(base) or 0.0
        parts = []
        for t, r in bps:
            tot = total_us(r)
            if tot is None:
                continue
            n = brokers_of(t)
            parts.append(
                f"with {n} broker{'s' * (n > 1)} {tot:.0f} µs ({r.server_us_per_message or 0:.0f} in the "
                f"broker{'s' * (n > 1)}, {r.backplane_us_per_message or 0:.0f} in Redis), {tot / b:.2f}x"
            )
        text = (
            f"At {rate(base.offered)} msg/s a message costs the embedded store {b:.0f} µs of broker CPU"
            + (
                ""
                if normal is None or total_us(normal) is None
                else f" ({total_us(normal) or 0:.0f} µs with `--durability normal`)"
            )
            + "; on the backplane, "
            + "; ".join(parts)
            + ". Every broker hears every event from Redis and publishes it itself, so the per-event work "
            "(reading Redis, the hand-over to the loop, the PUB send) is paid once per broker, while the "
            "fan-out to the room's subscribers is split between them."
        )
        out = ["", text]
        known = [(t, c) for t in g.targets if (c := self.cap(g.key, t)) is not None]
        if known:
            busy = [
                f"{brokers_of(t)} broker{'s' * (brokers_of(t) > 1)} {pct(step.server_cpu)}"
                for t, _ in known
                if t.startswith("zchat-bp") and (step := self.at_capacity(g.key, t)) is not None
            ]
            bp = [c for t, c in known if t.startswith("zchat-bp")]
            shape = (
                "more brokers deliver less here"
                if len(bp) > 1 and bp[-1] < bp[0] / 2**0.25
                else "more brokers deliver no more here"
            )
            out += [
                "",
                "Sustained capacity: "
                + ", ".join(f"{t} {rate(c)}" for t, c in known)
                + f" msg/s (x{g.members} deliveries), on {self.meta.machine.get('cores', '?')} cores. The load "
                "generators bound every row (their CPU at capacity is in the first table), so between the "
                "one-broker rows a difference within the step test's resolution (2^(1/4), +-19%) and the noise of a "
                f"single run is not a result; look at the peak column too. What does show is that {shape}: "
                "the brokers' CPU at capacity grows with N (brokers only: "
                + ", ".join(busy)
                + " of a core), and it comes out of the same cores as the subscribers'.",
            ]
        head = self.headline_group()
        fan = None if head is None else self.cap(head.key, ZCHAT)
        mine = self.cap(g.key, ZCHAT)
        if head is not None and fan is not None and mine is not None and self.meta.merged:
            out += [
                "",
                f"The embedded zchat's capacity on this workload in [Capacity by fan-out]"
                f"(#capacity-by-fan-out-step-tests) ({rate(fan)} msg/s) comes from another run (see the commands at "
                f"the top); here it is {rate(mine)}. Compare the systems within this section, which one run "
                "measured back to back.",
            ]
        return out

    def headline_group(self) -> Group | None:
        return next((g for g in self.groups.values() if g.headline), None)

    def fanout_section(self) -> list[str]:
        ladders = [g for g in self.groups.values() if g.kind == "ladder" and not g.series]
        limits = [t for t in LIMITS if any(t in g.targets for g in ladders)]
        rows = []
        for g in ladders:
            cells = [g.title]
            for t in limits:
                cells.append("-" if t not in g.targets else f"{rate(self.cap(g.key, t))} / {rate(self.peak(g.key, t))}")
            r = ratio(self.cap(g.key, ZCHAT), self.cap(g.key, "naive"))
            pr = ratio(self.peak(g.key, ZCHAT), self.peak(g.key, "naive"))
            cells.append(f"{'-' if r is None else f'{r:.2f}x'} / {'-' if pr is None else f'{pr:.2f}x'}")
            c = self.cap(g.key, ZCHAT)
            cells.append(rate(None if c is None else c * g.members))
            cells.append(self.bottleneck(g.key, ZCHAT))
            rows.append(cells)
        out = [
            "",
            "## Capacity by fan-out (step tests)",
            "",
            "Cells: sustained capacity / peak, in messages/s. Sustained capacity is the highest delivered "
            f"rate of a step the system kept up with (loss <= {MAX_LOSS:.0%}, >= {MIN_DELIVERED:.0%} of the "
            "offered rate sent and delivered); peak is the most any step delivered, overloaded or not. "
            "Each message is delivered to every subscriber of its room (deliveries/s = messages/s x "
            "subscribers). The naive forwarder and raw PUB->SUB are the limit of one ZeroMQ message per "
            "event: what the same load generators reach with almost no broker, and with none. zchat "
            "sends a loop pass's events for a room as one `batch` frame, so where its passes hold several "
            "(at load, and above all with many subscribers) it can pass both. The steps themselves are "
            "in [Every point](#every-point).",
            "",
        ]
        out += table(
            [
                "workload",
                *limits,
                "zchat / naive (sustained / peak)",
                "zchat deliveries/s",
                "zchat at capacity: CPU of broker (main thread) / load gen / other",
            ],
            rows,
        )
        repeated = [(g, text) for g in ladders if (text := self.ladders_text(g.key))]
        if repeated:
            out += [
                "",
                "Where zchat and the naive forwarder ran several ladders (taking turns), their sustained "
                "capacity is the median ladder's and the peak the most any of their steps delivered:",
                "",
            ]
            out += [f"- {g.title}: {text}." for g, text in repeated]
        return out

    def repeat_text(self) -> str:
        keys = [key for key in self.groups if self.ladders_text(key)]
        if not keys:
            return ""
        mode = self.run.mode
        fine = mode.refine if mode.repeat_refine is None else mode.repeat_refine
        ladders = max(len(v) for (key, _), v in self.run.ladders.items() if key in keys)
        return (
            f"In {' and '.join(self.groups[k].title for k in keys)}, zchat and the naive forwarder each ran "
            f"{ladders} ladders, taking turns, and every target there bisects up to {fine} times, to within "
            f"{bracket(fine)} (rates keep 2 significant digits, so above 100k msg/s the steps are 10k apart and "
            f"the bracket stays wider): their ratio is a target, both sit near what the load generators can "
            f"offer on this machine, and with one ladder each and a bracket of {bracket(mode.refine)} it was left "
            "to chance (the naive forwarder's capacity at 1x1 moved between 75k and 101k msg/s from one run "
            "to another). Their capacity is the median ladder's. "
        )

    def bottleneck(self, key: str, target: str) -> str:
        cap = self.cap(key, target)
        best = [r for r in self.of(key, target, "step") if not saturated(r) and r.delivered == cap]
        if not best:
            return "-"
        r = best[0]
        return (
            f"{pct(r.server_cpu)} (main thread {pct(r.server_main_cpu)}) / {pct(r.load_cpu)} / {pct(r.other_cpu)}; "
            f"{r.server_us_per_message or 0:.1f} µs per msg, {r.server_us_per_delivery or 0:.2f} µs per delivery"
        )

    def peer_section(self) -> list[str]:
        g = self.headline_group()
        if g is None:
            return []
        zcap = self.cap(g.key, ZCHAT)
        rows = []
        for t in g.targets:
            c = self.cap(g.key, t)
            r30 = self.lat30(g.key, t)
            lat = r30.latency_us if r30 else {}
            rows.append(
                [
                    self.meta.labels.get(t, t),
                    rate(c),
                    rate(self.peak(g.key, t)),
                    "-" if ratio(zcap, c) is None else f"{ratio(zcap, c):.2f}x",
                    f"{dur(lat.get('p50'))} / {dur(lat.get('p99'))} / {dur(lat.get('p999'))}",
                    pct(r30.loss) if r30 else "-",
                    "-" if r30 is None or r30.server_us_per_delivery is None else f"{r30.server_us_per_delivery:.2f}",
                    "-" if r30 is None else pct(r30.load_cpu),
                ]
            )
        rate30 = next((r.offered for t in g.targets if (r := self.lat30(g.key, t))), None)
        out = [
            "",
            f"## zchat and the brokers people would pick instead: {g.title}",
            "",
            f"Same run, same machine, same 100-byte texts, each through its usual Python client. Latency columns: "
            f"every system at the same offered rate, 30% of zchat's capacity ({rate(rate30)} msg/s).",
            "",
        ]
        out += table(
            [
                "system",
                "sustained capacity msg/s",
                "peak msg/s",
                "zchat / this (sustained)",
                "delivery p50 / p99 / p99.9 at 30%",
                "loss at 30%",
                "server CPU µs per delivery",
                "load gen CPU",
            ],
            rows,
        )
        if self.meta.unavailable:
            out += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in self.meta.unavailable.items()) + "."]
        return out

    def fixed_section(self) -> list[str]:
        g = self.groups.get("rooms-100x10")
        if g is None:
            return []
        rows = []
        for r in sorted(self.of(g.key, tag="fixed"), key=lambda r: (r.offered or 0, g.targets.index(r.point.target))):
            rows.append(self.row(r, with_workload=False))
        out = ["", f"## Open loop at fixed offered rates: {g.title}", ""]
        out += table(self.row_head(with_workload=False), rows)
        return out

    def idle(self, target: str, rooms: int = 1) -> Result | None:
        found = [
            r
            for r in self.results
            if r.point.idle and r.point.target == target and r.point.rooms == rooms and not r.error
        ]
        return found[-1] if found else None

    def idle_per_client(self, target: str, rooms: int = 1, sample: Sample = "joined") -> float | None:
        r = self.idle(target, rooms)
        return None if r is None else rss_per_client(r, sample)

    def idle_floor_text(self) -> str:
        """libzmq alone after as many round trips as a zchat client's start, beside zchat's first sample."""
        echo = self.idle_per_client("zmq-echo", rooms=100, sample="greeted")
        settled = self.idle_per_client(ZCHAT, rooms=100, sample="settled")
        zchat = self.idle_per_client(ZCHAT, rooms=100) if settled is None else settled
        if echo is None or zchat is None:
            return ""
        return (
            f"; libzmq alone after the same {GREETING_ROUNDTRIPS} round trips as hello + join "
            f"(echo server, 100 rooms): {echo:.1f} KiB (zchat in 100 rooms adds {zchat - echo:+.1f}"
            + ("" if settled is None else f" {SETTLE_S:g} s after the last join, its clients a ping or two further")
            + ")"
        )

    def idle_pinged_text(self) -> str:
        """The 100-room clients after their pings, beside libzmq alone after the same round trips."""
        r = self.idle(ZCHAT, rooms=100)
        zchat = self.idle_per_client(ZCHAT, rooms=100, sample="pinged")
        if r is None or zchat is None:
            return ""
        echo = self.idle_per_client("zmq-echo", rooms=100, sample="pinged")
        minutes = r.point.pings * HEARTBEAT_S / 60
        return (
            f"; in 100 rooms after {r.point.pings} pings each "
            f"({minutes:.0f} min of idling at the {HEARTBEAT_S:g} s heartbeat): "
            f"{zchat:.1f} KiB"
            + (
                ""
                if echo is None
                else f", libzmq alone with the same round trips {echo:.1f} KiB (zchat adds {zchat - echo:+.1f})"
            )
        )

    def idle_section(self) -> list[str]:
        rows = []
        for r in self.results:
            if not r.point.idle:
                continue
            per = rss_per_client(r)
            settled = rss_per_client(r, "settled")
            greeted = rss_per_client(r, "greeted")
            pinged = rss_per_client(r, "pinged")
            c = r.connect_s
            rows.append(
                [
                    self.meta.labels.get(r.point.target, r.point.target),
                    f"{r.point.subscribers:,}",
                    f"{r.point.rooms:,}",
                    f"{r.rss_before_kib or 0:,} -> {r.rss_after_kib or 0:,}"
                    + ("" if r.rss_settled_kib is None else f" -> {r.rss_settled_kib:,}"),
                    "-" if per is None else f"{per:.1f}",
                    "-" if settled is None else f"{settled:.1f}",
                    "-"
                    if pinged is None
                    else ("" if greeted is None else f"{GREETING_ROUNDTRIPS}: {greeted:.1f}; ")
                    + f"{r.point.pings}: {pinged:.1f}",
                    dur(c["welcome"] * 1e6)
                    if "welcome" in c
                    else dur(c["connected"] * 1e6)
                    if "connected" in c
                    else "-",
                    dur(c["joined"] * 1e6) if "joined" in c else "-",
                    r.error or "",
                ]
            )
        out = [
            "",
            "## Idle clients: memory and connect time",
            "",
            "Each client connects, says hello (or the peer's equivalent) and joins one room, then idles; "
            f"RSS is the server's VmRSS before, 1 s after the last join, and {SETTLE_S:g} s after it: by "
            "then zchat has handed back to the system what the connecting freed, and its connection gate "
            "(on, as by default) has let go of the pipes libzmq keeps from each handshake to it, about "
            "10 KiB a client (docs/operations.md, Memory). The headline takes the second figure, what an "
            "idle client goes on costing. Connect time runs from a common start in "
            "all worker processes to the last welcome (CONNACK, 001, ...) and the last join confirmation.",
            "",
            "In one room, each `joined` reply lists every member so far (up to 1,000 names, about 5 KiB): "
            "a burst of some 2.5 MB of replies, whose memory the allocator keeps (RSS stays at the peak). "
            "That is what costs one room more than 100 rooms of 10, whose lists are short: with the list "
            "left empty, scratch runs measured one room at 52.4, 48.7 and 41.1 KiB a client against 59.5, "
            "58.7 and 58.1 with it, taking turns (and, on another day, 48.6 and 50.4 with the list cut to "
            "5 names against 56.5 and 58.4). By mapping (/proc/PID/smaps, scratch runs): of the some 55 MB "
            "the 1,000 clients add, about 50 MB is in the heap of libzmq's I/O thread (a glibc arena of its "
            "own) and 2.5 MB in the main heap; with the list left empty the main heap does not grow, and the "
            "I/O thread's grew by 41-51 MB against 50-53. These clients ask for the list, as a bot's "
            "`join()` does by default; a join may leave it out (`members: false`, which zchat's rejoins after "
            "a reconnect and its command-line start use): `python -m bench.storm --members 500 --rejoin` "
            "measured 500 rejoins at once at 0.02 MB of replies against 1.22 MB with the lists. "
            "The clients subscribe after they have joined, so the joins' "
            "presence events reach almost none of them; `python -m bench.storm` measures a join storm "
            "into a room whose members listen. "
            "The session itself is small: about 1 KiB of Python objects (`python -m bench.micro sessions`); "
            "the rest is libzmq's, and it grows with the first messages a connection carries, in any "
            "ZeroMQ server: the naive forwarder's clients connect and say nothing."
            + (
                f" The echo server's clients (below) first make {GREETING_ROUNDTRIPS} round trips, as many as "
                "zchat's hello and join, and RSS is read 1 s after those too (the first figure of the pings "
                "column): compare zchat's first sample with that one."
                if any(r.rss_greeted_kib is not None for r in self.results)
                else ""
            ),
            "",
            "An idle client is not silent: it pings every heartbeat (5 s). The 100-room clients then make "
            "that many ping/pong round trips at once, and RSS is read again 1 s later; the echo server "
            "(`bench/naive.py --echo`: a ROUTER that sends each message back and a PUB, libzmq and nothing "
            "else) gets the same round trips from the same clients. libzmq keeps each connection's messages "
            "in pipes of 16 KiB chunks (256 messages each, a compile-time constant) and, once traffic has "
            "crossed a chunk, keeps a spare one: as the pings pass, every client's DEALER connection grows "
            "by about two chunks in the broker, whichever broker it is. No socket option of libzmq 4.3 "
            "shrinks them, so this is the floor for a client with a DEALER and a SUB connection; compare "
            "zchat after its pings with it, not with zchat before them.",
            "",
        ]
        out += table(
            [
                "server",
                "clients",
                "rooms",
                "RSS KiB",
                "KiB per client, 1 s after",
                f"KiB per client, {SETTLE_S:g} s after",
                "after N pings each: KiB per client",
                "all welcomed",
                "all joined",
                "error",
            ],
            rows,
        )
        return out

    def method_section(self) -> list[str]:
        t = self.run.mode.timing
        return [
            "",
            "## How it is measured",
            "",
            f"- Every point starts a fresh server (fresh store), connects the subscribers, proves every "
            f"subscription live with sync messages, then offers load open loop (sends are scheduled by time, "
            f"not by replies) for {t.warmup:g} s of warm-up and a {t.duration:g} s window; the window is one of "
            f"*send* times stamped into each text, so warm-up traffic is excluded by construction. Receivers "
            f"wait up to {t.grace:g} s more for late messages; what has not arrived is loss.",
            "- Delivery latency: receive time minus the send time in the text (CLOCK_MONOTONIC, one machine). "
            "Ack latency (zchat: ack after the store commit; Redis: the PUBLISH reply) is measured by the sender. "
            "NATS core, MQTT QoS 0 and IRC have no per-message acknowledgement.",
            *(
                [
                    f"- Latency points (fixed offered rates, 30% of capacity) run {self.run.mode.latency_runs} "
                    "times, the systems taking turns, and the run with the median p99 is the one reported (the "
                    "headline gives every run's p99): on 2 shared cores one 4 s window's p99 moved 2-4x from "
                    "one run to the next."
                ]
                if self.run.mode.latency_runs > 1
                else []
            ),
            "- Step tests double the offered rate while the system keeps up and halve it while it does not, "
            f"then bisect the bracket {self.run.mode.refine} times (in log scale). "
            + self.repeat_text()
            + (
                f"Each bisection step, near capacity, and the step that turns the ladder round (the first "
                "doubling step it fails, the first halving step it keeps up with), which bounds the bisection, "
                f"runs until {self.run.mode.trials // 2 + 1} runs agree "
                f"(at most {self.run.mode.trials}) and counts as kept up with if they did: one run there keeps "
                "up or not by chance (zchat 1x1 failed 71k msg/s in one full run and held 85k in a rerun; "
                "1 KiB at 1x1 failed its 60k doubling step once and settled at 50k, where the run before held 60k). "
                "Every run is in [Every point](#every-point)."
                if self.run.mode.trials > 1
                else "Each step runs once."
            ),
            "- Subscribers: zchat, the naive forwarder and raw PUB->SUB deliver to raw pyzmq SUB sockets "
            "(the zchat `Client` adds ordering and gap repair on top, which is not measured here); peers use "
            "their usual Python clients (redis-py with hiredis, paho-mqtt, nats-py, a raw-socket IRC client). "
            "zchat sends the events one loop pass has for a room as one `batch` frame (and a client's replies "
            "likewise; docs/protocol.md), where the naive forwarder and raw PUB->SUB send one ZeroMQ message "
            "per event: receivers hand every payload over as received, undecoded, and each send time stamped "
            "in it counts as one delivery, so a batch counts each of its events. "
            f"Subscribers are spread over up to {self.run.workers} worker processes; senders are one process "
            "(zchat: one DEALER session per room speaking the wire protocol: hello, join, msg with an id; "
            "it reads the acks).",
            "- Server CPU: utime + stime of the server process (all threads) over the window, from /proc/PID/stat; "
            "per message sent and per delivery. `load gen` is the same for the sender and worker processes; "
            "`other` is every other process on the machine (other jobs running at the same time), `irq` the "
            "kernel's interrupt and softirq time (loopback TCP, whoever caused it), `steal` what the hypervisor "
            "took; "
            "`disk busy` is the busiest block device's utilisation (/proc/diskstats), which bounds what an "
            "fsync costs.",
            f"- **Only {self.meta.machine.get('cores', '?')} CPU cores**: the load generators (Python, one process "
            "per worker) compete with the server for them, so above a few hundred thousand deliveries a second "
            "the receivers, not the server, are the bottleneck; the raw PUB->SUB row shows that ceiling for "
            "one ZeroMQ message per event (zchat's batches need fewer receives). Read the server CPU per "
            "delivery as the measure of the server's own cost. "
            f"CPU pinning: {self.meta.pinning}.",
            "- zchat runs with its per-session rate limits off (`ZCHAT_RATE_LIMIT=0 ZCHAT_JOIN_RATE=0`), as for "
            "trusted bots; any `rate_limited` error would show in the errors column. Durability `full` fsyncs "
            "every commit (the loop commits each pass, all it read since the last one, itself; after a commit "
            "that waited over 4 ms for the disk, the store's writer thread commits for 0.1 s, grouping whatever "
            "queued up); `zchat-normal` is `--durability normal`. "
            "Session members ping every 4 s, each on its own phase (as independent clients would).",
            "- Peers run with their defaults except: Redis without persistence; mosquitto with "
            "`set_tcp_nodelay true`; ngircd with `MaxPenaltyTime = 0` (flood penalties off), no per-IP, "
            "join or nick-length limits. IRC lines are at most 512 bytes, so IRC is not in the 1 KiB tests.",
            "",
            "Server commands:",
            "",
            *[f"- {t}: `{c}`" for t, c in self.meta.server_commands.items()],
        ]

    def machine_section(self) -> list[str]:
        m = self.meta
        out = ["", "## Machine and versions", ""]
        out += table(["", ""], [[k, v] for k, v in {**m.machine, **m.versions}.items()])
        out += ["", f"Load average before the run: {m.load_before}; after: {m.load_after}."]
        for e in m.merged:
            out += ["", f"Merged run of {', '.join(e['groups'])} ({e['date']}), where it differed:", ""]
            changed = {**e.get("machine", {}), **e.get("versions", {})}
            if e.get("pinning", m.pinning) != m.pinning:
                changed["CPU pinning"] = e["pinning"]
            if e.get("workers", self.run.workers) != self.run.workers:
                changed["subscriber workers"] = str(e["workers"])
            if e.get("unavailable"):
                changed["not measured"] = "; ".join(f"{k}: {v}" for k, v in e["unavailable"].items())
            out += table(["", ""], [[k, str(v)] for k, v in changed.items()])
            out += ["", f"Load average before: {e.get('load_before', '?')}; after: {e.get('load_after', '?')}."]
        if m.unavailable:
            out += ["", "**Missing or failed:**", ""]
            out += [f"- {k}: {v}" for k, v in m.unavailable.items()]
        if m.install_log:
            out += ["", "Install step:", "", "```", *m.install_log, "```"]
        return out

    def row_head(self, with_workload: bool = True) -> list[str]:
        head = ["target"]
        if with_workload:
            head += ["workload", "text", "kind"]
        return [
            *head,
            "offered msg/s",
            "sent",
            "delivered",
            "loss",
            "ack p50 / p99 / p99.9",
            "delivery p50 / p99 / p99.9",
            "server CPU (main thread)",
            "µs/msg",
            "µs/delivery",
            "load gen / other / irq / steal CPU",
            "disk busy",
            "errors",
        ]

    def row(self, r: Result, with_workload: bool = True) -> list[str]:
        p = r.point
        a, lat = r.ack_us, r.latency_us
        cells = [p.target]
        if with_workload:
            cells += [p.workload, f"{p.size} B", p.tag + (" (saturated)" if saturated(r) else "")]
        err = r.error or ", ".join(f"{k}: {v}" for k, v in r.errors.items())
        return [
            *cells,
            rate(r.offered),
            rate(r.sent_rate),
            rate(r.delivered),
            pct(r.loss),
            f"{dur(a.get('p50'))} / {dur(a.get('p99'))} / {dur(a.get('p999'))}" if a else "-",
            f"{dur(lat.get('p50'))} / {dur(lat.get('p99'))} / {dur(lat.get('p999'))}" if lat else "-",
            f"{pct(r.server_cpu)} ({pct(r.server_main_cpu)})"
            + ("" if r.backplane_cpu is None else f" + Redis {pct(r.backplane_cpu)}"),
            ("-" if r.server_us_per_message is None else f"{r.server_us_per_message:.1f}")
            + ("" if r.backplane_us_per_message is None else f" + Redis {r.backplane_us_per_message:.1f}"),
            "-" if r.server_us_per_delivery is None else f"{r.server_us_per_delivery:.2f}",
            f"{pct(r.load_cpu)} / {pct(r.other_cpu)} / {pct(r.irq_cpu)} / {pct(r.steal_cpu)}",
            pct(r.disk_busy),
            err,
        ]

    def all_points(self) -> list[str]:
        rows = [self.row(r) for r in self.results if not r.point.idle]
        out = ["", "## Every point", ""]
        out += table(self.row_head(), rows)
        return out
