"""What a system under test provides to the harness: a server, subscribers, a sender.

The harness (``bench.harness``) and the load loops (``bench.loops``) are the same
for every system; a target only knows how to start its server and how its
clients connect, subscribe, publish and receive.
"""

from __future__ import annotations

import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bench.proc import Server

#: Called with (index of the member in this worker, the raw payload received).
PayloadSink = Callable[[int, bytes], None]
#: Called with (message number, accepted?) when the system acknowledges a message.
AckSink = Callable[[int, bool], None]


class TargetUnavailable(RuntimeError):
    """The system is not installed (or its client library is missing)."""


@dataclass(frozen=True, slots=True)
class Member:
    index: int
    room: str


@dataclass(frozen=True, slots=True)
class Msg:
    no: int
    room: str
    text: str

    @property
    def id(self) -> str:
        return str(self.no)


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """What the client side of one run needs to know."""

    endpoints: dict[str, str | int]
    #: Members hold full sessions (zchat: hello + join on a DEALER besides the SUB).
    sessions: bool
    size: int


class Members(ABC):
    """Many subscribers in one worker process."""

    @abstractmethod
    def connect(self, members: list[Member], deadline: float) -> dict[str, float]:
        """Connect and subscribe every member; returns phase -> monotonic time it was done."""

    @abstractmethod
    def pump(self, timeout: float, sink: PayloadSink) -> None:
        """Wait up to ``timeout`` s for traffic and hand every payload received to ``sink``."""

    def roundtrips(self, rounds: int, deadline: float) -> None:
        """Each member's session makes ``rounds`` request/reply round trips (its idle pings, sped up)."""
        raise NotImplementedError(f"{type(self).__name__} has no round trips")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Disconnect (best effort)."""


class Sender(ABC):
    """Publishes to rooms; ``acks`` says whether the system acknowledges each message."""

    acks = False

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()

    @abstractmethod
    def connect(self, rooms: list[str], deadline: float) -> None: ...

    @abstractmethod
    def send(self, batch: list[Msg], ack: AckSink) -> None:
        """Send every message of ``batch`` (blocking only as the system pushes back)."""

    def pump(self, timeout: float, ack: AckSink) -> None:
        """Read acknowledgements for up to ``timeout`` s."""
        if timeout > 0:
            time.sleep(timeout)

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Disconnect (best effort)."""


class Target(ABC):
    """A system under test."""

    name: str
    label: str
    #: Longest text the protocol carries in one message (IRC's 512-byte lines).
    max_text: int = 1 << 20
    #: Whether there is a server process to measure (raw PUB->SUB has none).
    has_server = True
    #: Most clients the idle test connects (a server that accepts slowly gets fewer).
    max_idle_clients = 1_000_000

    @abstractmethod
    def check(self) -> None:
        """Raise TargetUnavailable when the server or the client library is missing."""

    @abstractmethod
    def start(self, workdir: Path, cpus: set[int] | None) -> Server: ...

    @abstractmethod
    def members(self, spec: ClientSpec) -> Members: ...

    @abstractmethod
    def sender(self, spec: ClientSpec) -> Sender: ...

    def versions(self) -> dict[str, str]:
        return {}


def until(deadline: float, what: str) -> float:
    """Seconds left before ``deadline`` (monotonic), or TimeoutError naming ``what``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out: {what}")
    return left


def quietly(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        fn()


class SocketMembers(Members):
    """Members that are one socket each, read when the selector says so (redis, MQTT, IRC).

    ``readable`` reads a bounded amount and returns True when more may be
    buffered in the client library; such members are read again without
    waiting for the socket.
    """

    #: Most messages ``readable`` should hand over per call.
    BURST = 256

    def __init__(self) -> None:
        import selectors

        self.selector = selectors.DefaultSelector()
        self.hot: set[tuple[socket.socket, int]] = set()
        #: Members whose connection the server closed (a slow consumer cut off, say).
        self.dropped = 0

    def watch(self, fileobj: socket.socket, index: int) -> None:
        self.selector.register(fileobj, 1, index)  # EVENT_READ

    def unwatch(self, fileobj: socket.socket) -> None:
        self.selector.unregister(fileobj)
        self.dropped += 1

    def pump(self, timeout: float, sink: PayloadSink) -> None:
        ready = {
            (cast(socket.socket, key.fileobj), key.data) for key, _ in self.selector.select(0 if self.hot else timeout)
        }
        ready |= self.hot
        self.hot = set()
        for fileobj, index in ready:
            if self.readable(fileobj, index, sink):
                self.hot.add((fileobj, index))
        self.tick()

    @abstractmethod
    def readable(self, fileobj: socket.socket, index: int, sink: PayloadSink) -> bool: ...

    def tick(self) -> None:
        """Periodic work (keepalives); called after every pump."""


def program_version(argv: list[str]) -> str:
    """The first line a ``--version``-style command prints, or why it could not run."""
    import subprocess

    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def require(executable: str, module: str) -> str:
    """The path of ``executable``; TargetUnavailable when it or the client ``module`` is missing."""
    import importlib.util
    import shutil

    path = shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise TargetUnavailable(f"{executable} is not installed")
    if importlib.util.find_spec(module) is None:
        raise TargetUnavailable(f"the Python client {module!r} is not installed")
    return path
