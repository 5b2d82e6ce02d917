"""The plot beside docs/benchmarks.md: capacity by fan-out, the headline step test, latency at 30%, scale-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.plan import Group
from bench.report import LIMITS, PLOT_ORDER, TARGET_P99_30PCT_MS, Report, brokers_of, rate


def plot(report: Report, path: Path) -> bool:
    """Draw the panels into ``path`` (three, four with scale-out results); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scale = report.scale_out_group()
    panels = 3 if scale is None else 4
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5.5))
    _capacity(report, axes[0])
    head = report.headline_group()
    if head is not None:
        _steps(report, axes[1], head)
        _latency(report, axes[2], head)
    if scale is not None:
        _scale_out(report, axes[3], scale)
    fig.suptitle(
        f"zchat benchmarks: {report.meta.machine.get('CPU', '')}, {report.meta.machine.get('cores', '')} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _color(target: str) -> str:
    return f"C{PLOT_ORDER.index(target) % 10}" if target in PLOT_ORDER else "black"


def _capacity(report: Report, ax: Any) -> None:
    ladders = [g for g in report.groups.values() if g.kind == "ladder" and g.size == 100 and not g.series]
    for t in LIMITS:
        pts = [(g.members, c) for g in ladders if (c := report.cap(g.key, t)) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=_color(t), label=report.meta.labels.get(t, t))
    head = report.headline_group()
    if head is not None:
        for t in head.targets:
            if t not in LIMITS and (c := report.cap(head.key, t)) is not None:
                ax.scatter([head.members], [c], marker="s", s=60, color=_color(t), label=report.meta.labels.get(t, t))
    ax.set(xscale="log", yscale="log", xlabel="subscribers in the room", ylabel="capacity, messages/s")
    ax.set_title("Sustained capacity by fan-out\n(100 B texts; squares: peers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _steps(report: Report, ax: Any, head: Group) -> None:
    offered = [r.offered or 0 for r in report.of(head.key, tag="step")]
    for t in head.targets:
        steps = sorted((r.offered or 0, r.delivered) for r in report.of(head.key, t, "step"))
        if steps:
            ax.plot(*zip(*steps, strict=True), marker=".", color=_color(t), label=t)
    if offered:
        ax.plot([min(offered) / 2, max(offered) * 2], [min(offered) / 2, max(offered) * 2], color="grey", linestyle=":")
    ax.set(xscale="log", yscale="log", xlabel="offered msg/s", ylabel="delivered msg/s")
    ax.set_title(f"Step test, {head.title}\n(dotted: delivered = offered)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _latency(report: Report, ax: Any, head: Group) -> None:
    names, p50, p99 = [], [], []
    for t in head.targets:
        r30 = report.lat30(head.key, t)
        if r30 and r30.latency_us.get("p99") is not None:
            names.append(t)
            p50.append((r30.latency_us["p50"] or 0) / 1000)
            p99.append((r30.latency_us["p99"] or 0) / 1000)
    x = list(range(len(names)))
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color="C0")
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color="C3")
    ax.axhline(TARGET_P99_30PCT_MS, color="red", linestyle="--", linewidth=1, label="zchat p99 target")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set(yscale="log", ylabel="delivery latency, ms")
    rate30 = next((r.offered for t in head.targets if (r := report.lat30(head.key, t))), None)
    ax.set_title(f"Delivery latency, {head.title}\nat {rate(rate30)} msg/s (30% of zchat's capacity)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _scale_out(report: Report, ax: Any, g: Group) -> None:
    """CPU per message (brokers + Redis, stacked) at the common rate; capacity written above each bar."""
    names, broker_us, redis_us, caps = [], [], [], []
    for t in g.targets:
        r = report.fixed(g.key, t)
        if r is None or r.server_us_per_message is None:
            continue
        names.append(t if t.startswith("zchat-bp") else f"{t} (embedded)")
        broker_us.append(r.server_us_per_message)
        redis_us.append(r.backplane_us_per_message or 0.0)
        caps.append(report.cap(g.key, t))
    x = list(range(len(names)))
    ax.bar(x, broker_us, width=0.6, color="C0", label="brokers (all N)")
    ax.bar(x, redis_us, width=0.6, bottom=broker_us, color="C3", label="Redis")
    for i, c in enumerate(caps):
        ax.annotate(
            f"{rate(c)} msg/s",
            (i, broker_us[i] + redis_us[i]),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set(ylabel="CPU µs per message (100 deliveries each)")
    rate_ = next((r.offered for t in g.targets if (r := report.fixed(g.key, t))), None)
    n = max((brokers_of(t) for t in g.targets), default=1)
    ax.set_title(
        f"Scale-out: 1 room x 100 on 1..{n} brokers + Redis\nCPU per message at {rate(rate_)} msg/s; "
        f"above: sustained capacity ({report.meta.machine.get('cores', '?')} cores)",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
