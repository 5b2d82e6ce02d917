"""Processes: start a server and wait for it, stop it, and read its CPU and memory from /proc."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> dict[str, float]:
    """CPU time of all CPUs since boot, from /proc/stat: tasks (user + system), irq (+ softirq), steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 10
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return {
        "tasks": (user + nice + system) / CLOCK_TICKS,
        "irq": (irq + softirq) / CLOCK_TICKS,
        "steal": steal / CLOCK_TICKS,
    }


def disk_busy_ms() -> dict[str, int]:
    """Milliseconds each block device (not loop, ram or zram) has been busy since boot."""
    out: dict[str, int] = {}
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            name = fields[2]
            if os.path.isdir(f"/sys/block/{name}") and not name.startswith(("loop", "ram", "zram")):
                out[name] = int(fields[12])
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers without port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pin(cpus: set[int] | None) -> None:
    """Pin the calling process to ``cpus`` (None: leave it alone)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    """A server subprocess; ``endpoints`` are what clients need (host:port strings or ports)."""

    name: str
    proc: subprocess.Popen[bytes] | None
    endpoints: dict[str, str | int] = field(default_factory=dict)
    command: str = ""
    log_path: Path | None = None
    #: The system's other processes, with their role: ``server`` (more brokers, measured with
    #: ``proc``) or ``backplane`` (what they share, measured apart). Stopped after ``proc``,
    #: servers before the backplane.
    others: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def pids(self, role: str = "server") -> list[int]:
        """Every process of ``role`` (``server``: ``proc`` first, then the other brokers)."""
        head = [self.proc.pid] if role == "server" and self.proc is not None else []
        return head + [p.pid for r, p in self.others if r == role]

    def stop(self, timeout: float = 5.0) -> None:
        servers = [self.proc] if self.proc is not None else []
        servers += [p for r, p in self.others if r == "server"]
        _stop_all(servers, timeout)
        _stop_all([p for r, p in self.others if r != "server"], timeout)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM to all at once, then wait for each (SIGKILL after ``timeout``)."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in running:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    ready: str | None = None,
    port: int | None = None,
    log_path: Path,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    timeout: float = 15.0,
) -> tuple[subprocess.Popen[bytes], re.Match[str] | None]:
    """Start ``argv``; it is ready when a line matches ``ready`` (stdout or stderr) or ``port`` accepts.

    Output goes to ``log_path``; the match of ``ready`` is returned.
    """
    log = open(log_path, "wb")  # noqa: SIM115 (kept open for the child's lifetime)
    pattern = re.compile(ready) if ready else None
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE if pattern else log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        preexec_fn=(lambda: pin(cpus)) if cpus else None,  # noqa: PLW1509
    )
    deadline = time.monotonic() + timeout
    match: re.Match[str] | None = None
    up = False
    if pattern is not None:
        match = _wait_line(proc, pattern, log, deadline)
        up = match is not None
    elif port is not None:
        up = _wait_port(proc, port, deadline)
    if not up or proc.poll() is not None:
        proc.kill()
        proc.wait()
        log.close()
        tail = log_path.read_bytes()[-600:].decode(errors="replace")
        raise ServerError(f"{name} did not start ({' '.join(argv)}): {tail.strip()}")
    return proc, match


def _wait_line(
    proc: subprocess.Popen[bytes], pattern: re.Pattern[str], log: BinaryIO, deadline: float
) -> re.Match[str] | None:
    assert proc.stdout is not None
    buf = b""
    while time.monotonic() < deadline and proc.poll() is None:
        r, _, _ = select.select([proc.stdout], [], [], 0.1)
        if not r:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        log.write(chunk)
        log.flush()
        buf += chunk
        match = pattern.search(buf.decode(errors="replace"))
        if match is not None:
            _copy_in_background(proc, log)
            return match
    return None


def _wait_port(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _copy_in_background(proc: subprocess.Popen[bytes], log: BinaryIO) -> None:
    """Keep copying the child's pipe to its log, so it never blocks on a full pipe."""
    stdout = proc.stdout
    assert stdout is not None

    def pump() -> None:
        while chunk := os.read(stdout.fileno(), 65536):
            log.write(chunk)
            log.flush()

    threading.Thread(target=pump, daemon=True).start()
