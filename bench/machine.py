"""The machine and the versions of everything measured, for the report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    virt = _first("/proc/cpuinfo", "flags")
    return {
        "CPU": _first("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": f"{int(mem_kib) / 1024 / 1024:.1f} GiB" if mem_kib.isdigit() else "?",
        "kernel": f"{platform.system()} {platform.release()}",
        "OS": _os_name(),
        "virtualized": "yes (hypervisor flag)" if "hypervisor" in virt.split() else "no",
    }


def zchat_revision(repo: Path) -> str:
    """The commit measured, and whether the work tree differed from it (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} + {len(changed)} uncommitted changed files" if changed else head


def python_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("matplotlib",):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


#: The key under which machine() results carry the disk's sync latency (the report quotes it).
SYNC_KEY = "fdatasync of a 4 KiB append (the stores' file system)"


def sync_latency(where: Path, n: int = 300) -> str:
    """What one commit's sync costs on the disk the benchmark's stores live on: p50 and p99 of
    ``n`` fdatasyncs, each after appending 4 KiB (as a WAL commit of a few rows does)."""
    import statistics
    import tempfile
    import time

    block = b"\0" * 4096
    times: list[float] = []
    try:
        with tempfile.TemporaryFile(dir=where) as f:
            fd = f.fileno()
            for _ in range(n):
                os.write(fd, block)
                started = time.perf_counter()
                os.fdatasync(fd)
                times.append(time.perf_counter() - started)
    except OSError as exc:
        return f"not measured: {exc}"
    cuts = statistics.quantiles(times, n=100)
    return f"p50 {cuts[49] * 1e6:.0f} µs, p99 {cuts[98] * 1e6:.0f} µs ({n} syncs)"
