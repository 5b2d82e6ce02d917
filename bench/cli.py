"""``python -m bench [--quick]``: install what is missing, run every workload, write the report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from bench import install
from bench.harness import Pinning, Point, Result
from bench.machine import SYNC_KEY, loadavg, machine, python_versions, sync_latency, zchat_revision
from bench.plan import FULL, QUICK, Group, groups
from bench.plot import plot as draw
from bench.proc import raise_fd_limit
from bench.report import Meta, Report
from bench.runner import Run
from bench.targets import FACTORIES, PEERS, get_target
from bench.targets.base import TargetUnavailable

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run every zchat benchmark workload (and the limits and peers) and write docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of every workload (about 2 min)")
    parser.add_argument("--out", type=Path, help="report path (default docs/benchmarks.md; with --quick, a temp dir)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get / pip install missing peers")
    parser.add_argument("--no-peers", action="store_true", help="skip Redis, mosquitto, NATS and ngircd")
    parser.add_argument("--only", default="", help="comma-separated group keys to run (fanout-1, idle, ...)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and the load generators to the other CPUs (default: the scheduler decides)",
    )
    parser.add_argument("--workers", type=int, default=2, help="subscriber worker processes (default 2)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other groups' results from the last run's raw results (bench/results/full.json, or the "
        "quick run's) and replace only the groups run now (with --only); the report covers both",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="do not measure: write the report again from the results a run saved (bench/results/full.json)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        run, plan, meta = load(args.from_json)
        write(run, plan, meta, args.out or REPO / "docs" / "benchmarks.md", None)
        return 0
    out: Path = args.out or (
        Path(tempfile.gettempdir()) / "zchat-bench-quick" / "benchmarks.md"
        if args.quick
        else REPO / "docs" / "benchmarks.md"
    )
    mode = QUICK if args.quick else FULL
    raw = out.with_suffix(".json") if args.quick or args.out else REPO / "bench" / "results" / f"{mode.name}.json"
    if args.merge and not raw.exists():
        print(f"bench: --merge: no earlier results at {raw}", file=sys.stderr)
        return 2
    run, plan, meta = measure(args, argv)
    if args.merge:
        run, plan, meta = merge(load(raw), run, plan, meta)
    write(run, plan, meta, out, raw)
    return 0


def measure(args: argparse.Namespace, argv: list[str] | None) -> tuple[Run, list[Group], Meta]:
    mode = QUICK if args.quick else FULL
    started = time.monotonic()
    load_before = loadavg()
    raise_fd_limit()
    log: list[str] = []
    if not args.no_install:
        install.python_deps(log)
    peers: tuple[str, ...] = () if args.no_peers else PEERS
    unavailable = install.peers(peers, not args.no_install, log)
    for name in peers:
        try:
            get_target(name).check()
        except TargetUnavailable as exc:
            unavailable.setdefault(name, str(exc))
    available = tuple(p for p in peers if p not in unavailable)
    for name, why in unavailable.items():
        print(f"bench: {name} is not measured: {why}", file=sys.stderr)

    plan = groups(mode, available)
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {g.key for g in plan}
        if unknown:
            raise SystemExit(
                f"bench: --only: no group {', '.join(sorted(unknown))} (have {', '.join(g.key for g in plan)})"
            )
        plan = [g for g in plan if g.key in keys]
    plan = _usable(plan, unavailable, not args.no_install, log)
    cpus = sorted(os.sched_getaffinity(0))
    pins = Pinning({cpus[0]}, set(cpus[1:])) if args.pin and len(cpus) > 1 else Pinning()
    pinning = (
        f"server on CPU {cpus[0]}, load generators on CPUs {','.join(map(str, cpus[1:]))} (--pin)"
        if pins.server
        else "none; the kernel schedules the server and the load generators over all cores"
    )
    root = Path(tempfile.mkdtemp(prefix="zchat-bench-"))
    run = Run(mode, pins, args.workers, root)
    # Before any load: what a store's sync costs here bounds zchat's ack and delivery latency.
    sync = sync_latency(root)
    try:
        for g in plan:
            print(f"bench: {g.key}: {g.title}", file=sys.stderr)
            run.group(g)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    versions: dict[str, str] = {"zchat commit": zchat_revision(REPO), **python_versions()}
    commands: dict[str, str] = {}
    used = {r.point.target for r in run.results}
    for name in FACTORIES:
        if name in used:
            versions.update(get_target(name).versions())
            done = next((r for r in run.results if r.point.target == name and r.command), None)
            if done:
                commands[name] = done.command
    shown = "python -m bench" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = Meta(
        command=shown,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        elapsed_s=time.monotonic() - started,
        machine={**machine(), SYNC_KEY: sync},
        versions=versions,
        unavailable=unavailable,
        install_log=log,
        pinning=pinning,
        load_before=load_before,
        load_after=loadavg(),
        labels={name: get_target(name).label for name in FACTORIES if name in used or name in peers},
        server_commands=commands,
    )
    return run, plan, meta


def _usable(plan: list[Group], unavailable: dict[str, str], allow: bool, log: list[str]) -> list[Group]:
    """The plan without the targets that cannot run (the backplane brokers need redis-server)."""
    wanted = {t for g in plan for t in g.targets if t not in PEERS}
    if any(t.startswith("zchat-bp") for t in wanted) and "redis" not in unavailable:
        install.peers(("redis",), allow, log)  # a no-op when it is there
    for name in sorted(wanted):
        try:
            get_target(name).check()
        except TargetUnavailable as exc:
            unavailable.setdefault(name, str(exc))
            print(f"bench: {name} is not measured: {exc}", file=sys.stderr)
    return [replace(g, targets=tuple(t for t in g.targets if t not in unavailable)) for g in plan]


def write(run: Run, plan: list[Group], meta: Meta, out: Path, raw: Path | None) -> None:
    """The report and its plot at ``out`` (and .png beside it); the raw results at ``raw``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(run, plan, meta)
    plot = out.with_suffix(".png")
    has_plot = draw(report, plot)
    out.write_text(report.markdown(plot.name if has_plot else None))
    if raw is not None:
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(
            json.dumps(
                {
                    "mode": run.mode.name,
                    "trials": run.mode.trials,
                    "repeat_ladders": run.mode.repeat_ladders,
                    "repeat_refine": run.mode.repeat_refine,
                    "workers": run.workers,
                    "meta": asdict(meta),
                    "results": [r.to_json() for r in run.results],
                    "capacity": [[*k, v] for k, v in run.capacity.items()],
                    "ladders": [[*k, v] for k, v in run.ladders.items()],
                },
                indent=1,
                default=list,
            )
        )
    print(f"bench: wrote {out}{' and ' + str(plot) if has_plot else ''}", file=sys.stderr)


def load(path: Path) -> tuple[Run, list[Group], Meta]:
    """A run as ``write`` saved it, with the plan it ran."""
    data = json.loads(path.read_text())
    mode = QUICK if data.get("mode") == "quick" else FULL
    # Runs saved before step trials existed ran each step once.
    mode = replace(mode, trials=data.get("trials", 1))
    # ... and before repeated ladders, one ladder of every target.
    mode = replace(mode, repeat_ladders=data.get("repeat_ladders", 1), repeat_refine=data.get("repeat_refine"))
    run = Run(mode, Pinning(), data.get("workers", 2), path.parent)
    run.results = [Result(**{**r, "point": Point(**r["point"])}) for r in data["results"]]
    run.capacity = {(key, target): value for key, target, value in data["capacity"]}
    run.ladders = {(key, target): values for key, target, values in data.get("ladders", [])}
    peers = tuple(p for p in PEERS if any(r.point.target == p for r in run.results))
    plan = [g for g in groups(mode, peers) if _ran(g, run.results)]
    return run, plan, Meta(**data["meta"])


def _ran(g: Group, results: list[Result]) -> bool:
    return any(_owns(g, r) for r in results)


def _owns(g: Group, r: Result) -> bool:
    p = r.point
    if g.kind == "idle":
        return p.idle and p.target in g.targets and p.rooms == g.rooms
    return p.target in g.targets and g.point(p.target, p.rate, p.tag) == p


def merge(
    earlier: tuple[Run, list[Group], Meta], run: Run, plan: list[Group], meta: Meta
) -> tuple[Run, list[Group], Meta]:
    """The earlier run with the groups of ``plan`` replaced by what ``run`` measured now."""
    old, _, old_meta = earlier
    if old.mode.name != run.mode.name:
        raise SystemExit(f"bench: --merge: the earlier run is a {old.mode.name} run, this one {run.mode.name}")
    if old.mode.trials != run.mode.trials:
        raise SystemExit(
            f"bench: --merge: the earlier run ran its bisection steps {old.mode.trials} time(s) at most, this one "
            f"{run.mode.trials}: run every group again rather than mix the two"
        )
    keys = {g.key for g in plan}
    kept_ladders = {k for k in old.ladders if k[0] not in keys}
    settings = (run.mode.repeat_ladders, run.mode.repeat_refine)
    if kept_ladders and (old.mode.repeat_ladders, old.mode.repeat_refine) != settings:
        raise SystemExit(
            "bench: --merge: the earlier run repeated its ladders with other settings than this one: "
            "run every group again rather than mix the two"
        )
    workers, run.workers = run.workers, old.workers
    run.results = [r for r in old.results if not any(_owns(g, r) for g in plan)] + run.results
    run.capacity = {**{k: v for k, v in old.capacity.items() if k[0] not in keys}, **run.capacity}
    run.ladders = {**{k: v for k, v in old.ladders.items() if k[0] not in keys}, **run.ladders}
    peers = tuple(p for p in PEERS if any(r.point.target == p for r in run.results))
    merged_plan = [g for g in groups(run.mode, peers) if _ran(g, run.results)]
    entry = {
        "command": meta.command,
        "date": meta.date,
        "elapsed_s": meta.elapsed_s,
        "groups": sorted(keys),
        "versions": {k: v for k, v in meta.versions.items() if old_meta.versions.get(k) != v},
        "machine": {k: v for k, v in meta.machine.items() if old_meta.machine.get(k) != v},
        "pinning": meta.pinning,
        "load_before": meta.load_before,
        "load_after": meta.load_after,
        "workers": workers,
        "unavailable": meta.unavailable,
    }
    old_meta.merged = [e for e in old_meta.merged if set(e["groups"]) - keys] + [entry]
    old_meta.labels.update(meta.labels)
    old_meta.server_commands.update(meta.server_commands)
    return run, merged_plan, old_meta
