"""The plot beside docs/benchmarks.md: capacity by fan-out, the headline step test, latency at 30%."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.plan import Group
from bench.report import LIMITS, PLOT_ORDER, TARGET_P99_30PCT_MS, Report, rate


def plot(report: Report, path: Path) -> bool:
    """Draw the three panels into ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.5))
    _capacity(report, ax1)
    head = report.headline_group()
    if head is not None:
        _steps(report, ax2, head)
        _latency(report, ax3, head)
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
    ladders = [g for g in report.groups.values() if g.kind == "ladder" and g.size == 100]
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
