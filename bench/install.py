"""Installs what the peers need (Debian packages, Python clients) when it is missing.

Debian may start a packaged daemon on install; any that this step started is
stopped again: every run uses its own instances on its own ports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: peer -> (executable, Debian package, init service, Python module, pip requirement)
PEERS: dict[str, tuple[str, str, str, str, str]] = {
    "redis": ("redis-server", "redis-server", "redis-server", "redis", "redis"),
    "mosquitto": ("mosquitto", "mosquitto", "mosquitto", "paho.mqtt", "paho-mqtt"),
    "nats": ("nats-server", "nats-server", "nats-server", "nats", "nats-py"),
    "ngircd": ("ngircd", "ngircd", "ngircd", "socket", ""),
}
REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def _which(executable: str) -> str | None:
    return shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/usr/bin:/sbin")


def _run(argv: list[str], log: list[str]) -> bool:
    log.append("$ " + " ".join(argv))
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.append(f"  failed: {exc}")
        return False
    if out.returncode != 0:
        log.append(f"  exit {out.returncode}: {(out.stderr or out.stdout).strip()[-400:]}")
    return out.returncode == 0


def _running(name: str) -> set[str]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return set(out.stdout.split())


def python_deps(log: list[str]) -> None:
    """pip install -r bench/requirements.txt when a module it names is missing."""
    modules = ("matplotlib", "redis", "hiredis", "paho.mqtt", "nats")
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return
    _run([sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], log)


def peers(names: tuple[str, ...], allow: bool, log: list[str]) -> dict[str, str]:
    """Install the missing servers (apt-get); returns peer -> problem for those still unusable."""
    missing = [p for p in names if _which(PEERS[p][0]) is None]
    if missing and allow and shutil.which("apt-get"):
        packages = [PEERS[p][1] for p in missing]
        before = {p: _running(PEERS[p][0]) for p in missing}
        if os.geteuid() != 0:
            log.append(f"not root: cannot apt-get install {' '.join(packages)}")
        elif _run(["apt-get", "update", "-qq"], log):
            _run(["apt-get", "install", "-y", "-q", *packages], log)
        for p in missing:
            if _running(PEERS[p][0]) - before[p]:
                # The package started its system daemon: stop it; we run our own.
                _run(["service", PEERS[p][2], "stop"], log)
    problems: dict[str, str] = {}
    for p in names:
        executable, package, _, module, requirement = PEERS[p]
        if _which(executable) is None:
            problems[p] = f"{executable} not installed (apt-get install {package} {'failed' if allow else 'not tried'})"
        elif importlib.util.find_spec(module) is None:
            problems[p] = f"Python client {requirement} not installed"
    return problems
