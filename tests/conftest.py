"""Shared fixtures: real brokers on 127.0.0.1 with ephemeral ports, real clients.

No mocks of zmq. Every socket a test opens has linger 0 and every context is
terminated; waits are for events with deadlines, never bare sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import zmq

from broker.core import Limits
from broker.server import Broker, Config
from broker.store import Store
from client.lib import Client, Event
from zchat import protocol as p

HOST = "127.0.0.1"

# Property tests draw new examples at every run: here that finds bugs, in CI it would
# fail a landing for one found by chance. .ci/run picks the "ci" profile: the same
# examples every time (derived from each test), and no example database to replay.
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

READY_RE = re.compile(
    r"ready: requests on tcp://(?:\[[^]]*\]|[^:]+):(\d+), room events on tcp://(?:\[[^]]*\]|[^:]+):(\d+)"
)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: Callable[[], object] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline.

    ``what`` describes the state on failure, for the assertion message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f": {what()!r}" if what is not None else ""
            raise AssertionError(f"condition not met within {timeout} s{detail}")
        time.sleep(interval)


@dataclass
class RunningBroker:
    """An in-process broker on its own thread (fast to start; same code as the real one)."""

    data_dir: Path
    heartbeat_ms: int = 5000
    pub_hwm: int = 10_000
    #: Tests that flood turn the per-session limits off; test_limits sets its own.
    limits: Limits = field(default_factory=lambda: Limits(rate=0, join_rate=0))
    keys_dir: Path | None = None
    #: A subclass can make the disk slow (tests of the writer thread).
    store_class: type[Store] = Store
    #: The store's --retention (None: every event kept).
    retention: int | None = None
    #: (request port, room-event port); 0 picks a free one.
    ports: tuple[int, int] = (0, 0)
    broker: Broker = field(init=False)
    thread: threading.Thread = field(init=False)

    def start(self) -> RunningBroker:
        self.store = self.store_class(self.data_dir, "normal", self.retention)
        config = Config(
            host=HOST,
            port=self.ports[0],
            pub_port=self.ports[1],
            heartbeat_ms=self.heartbeat_ms,
            pub_hwm=self.pub_hwm,
            limits=self.limits,
            keys_dir=self.keys_dir,
        )
        self.broker = Broker(config, self.store)
        self.failure: BaseException | None = None

        def run() -> None:
            try:
                self.broker.run()
            except BaseException as exc:
                self.failure = exc
                raise

        self.thread = threading.Thread(target=run, name="broker", daemon=True)
        self.thread.start()
        return self

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def pub_port(self) -> int:
        return self.broker.pub_port

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "broker thread did not stop"
        self.store.close()
        assert self.failure is None, f"the broker loop died: {self.failure!r}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    running = RunningBroker(tmp_path / "data").start()
    yield running
    running.stop()


@pytest.fixture
def short_heartbeat_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    running = RunningBroker(tmp_path / "data", heartbeat_ms=200).start()
    yield running
    running.stop()


@pytest.fixture
def connect_to() -> Iterator[Callable[..., Client]]:
    """``connect_to(broker, name, **kwargs)``: a connected client of any running
    broker, closed at the end of the test (ask for this fixture after the broker's,
    so that the clients close first)."""
    made: list[Client] = []

    def make(broker: RunningBroker, name: str, **kwargs: Any) -> Client:
        client = Client(name, HOST, broker.port, broker.pub_port, **kwargs)
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close(flush_timeout=0.2, settle=0)  # tests end in any state; none waits for acks


@pytest.fixture
def make_client(broker: RunningBroker, connect_to: Callable[..., Client]) -> Callable[..., Client]:
    """Connected clients of the ``broker`` fixture, closed at the end of the test."""
    return functools.partial(connect_to, broker)


def killed_session(port: int, pub_port: int, name: str, room: str) -> str:
    """A run of ``name`` that joined ``room`` and died as a SIGKILL leaves it (no bye: its
    session stays, in the room); its resume token, for a next run to take the session back."""
    doomed: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    killed = Client(name, HOST, port, pub_port, context=doomed)
    killed.connect()
    killed.join(room)
    token = killed.resume_token
    assert token is not None
    doomed.destroy(linger=0)
    return token


class Inbox:
    """Everything one library client has shown, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []

    def pump(self) -> None:
        self.client.pump(0.02)
        self.events.extend(self.client.drain_events())

    def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Pump until ``predicate`` holds (fail at ``timeout``)."""

        def step() -> bool:
            self.pump()
            return predicate()

        wait_for(step, timeout, interval=0, what=lambda: (self.client.state, self.events[-5:]))

    def texts(self, kind: str = "msg") -> list[str | None]:
        return [e.text for e in self.events if e.type == kind]

    def statuses(self) -> list[Event]:
        return [e for e in self.events if e.type == "status"]


class Raw:
    """A bare DEALER (and optionally SUB) speaking the wire protocol by hand."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        port: int,
        routing_id: bytes | None = None,
        source: str | None = None,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:  # one of its own choosing, as any peer may
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        # From another loopback address (127.0.0.2: another host, as the broker sees it).
        self.sock.connect(f"tcp://{source}:0;{HOST}:{port}" if source else f"tcp://{HOST}:{port}")
        #: Replies that came in the same ``batch`` as one already returned.
        self.queued: list[dict[str, Any]] = []

    def send(self, env: dict[str, Any] | bytes) -> None:
        self.sock.send(env if isinstance(env, bytes) else p.encode(env))

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next reply; the items of a ``batch`` one by one, as a client sees them."""
        if not self.queued:
            if not self.sock.poll(int(timeout * 1000)):
                raise AssertionError(f"no reply within {timeout} s")
            self.queued = p.decode_many(self.sock.recv(), p.MAX_REPLY_BYTES)
        return self.queued.pop(0)

    def request(self, env: dict[str, Any] | bytes, timeout: float = 5.0) -> dict[str, Any]:
        self.send(env)
        return self.recv(timeout)

    def silent(self, timeout: float = 0.3) -> bool:
        """True when nothing arrives within ``timeout`` (used sparingly: proving absence needs a wait)."""
        return not self.queued and not self.sock.poll(int(timeout * 1000))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def raw(ctx: zmq.Context[zmq.Socket[bytes]], broker: RunningBroker) -> Callable[[], Raw]:
    return lambda: Raw(ctx, broker.port)


@pytest.fixture
def spy(ctx: zmq.Context[zmq.Socket[bytes]], broker: RunningBroker) -> Iterator[zmq.Socket[bytes]]:
    """A SUB subscribed to every topic: what anyone on the network can see."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{HOST}:{broker.pub_port}")
    yield sub
    sub.close()


def recv_all(sock: zmq.Socket[bytes], quiet: float = 0.3, timeout: float = 5.0) -> list[list[bytes]]:
    """Every multipart message until ``quiet`` seconds pass with none."""
    out: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sock.poll(int(quiet * 1000)):
        out.append(sock.recv_multipart())
    return out


def published(frames: list[list[bytes]]) -> list[dict[str, Any]]:
    """The events in PUB frames ``[topic, body]``: one per body, or a ``batch``'s items."""
    return [env for _, body in frames for env in p.decode_many(body, p.MAX_REPLY_BYTES)]


# ---------------------------------------------------------------- processes


def bin_path(name: str) -> str:
    """A console script of this install, next to the running interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass
class BrokerProcess:
    """``zchat-broker`` as a real subprocess, for CLI and crash tests."""

    data_dir: Path
    extra: list[str] = field(default_factory=list)
    port: int = 0
    pub_port: int = 0
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    #: Environment variables to set for the broker, on top of ours.
    environ: dict[str, str] = field(default_factory=dict)
    #: A command that runs the broker (it must exec it: ``prlimit ...``).
    prefix: list[str] = field(default_factory=list)
    #: The broker's working directory (None: ours).
    cwd: Path | None = None

    def start(self, timeout: float = 10.0) -> BrokerProcess:
        args = [
            *self.prefix,
            bin_path("zchat-broker"),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--pub-port",
            str(self.pub_port),
            "--data",
            str(self.data_dir),
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            args, stderr=subprocess.PIPE, text=True, env={**os.environ, **self.environ}, cwd=self.cwd
        )
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = READY_RE.search(line)
                if match:
                    self.port, self.pub_port = int(match[1]), int(match[2])
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout):
            self.kill()
            raise AssertionError("broker did not start:\n" + "".join(self.log))
        return self

    def again(self, extra: list[str] | None = None) -> BrokerProcess:
        """Another broker on this one's data and ports (stopped first), with its flags or
        ``extra``, started: a restart, as clients that know these ports see it."""
        return BrokerProcess(
            self.data_dir,
            self.extra if extra is None else extra,
            self.port,
            self.pub_port,
            environ=self.environ,
            prefix=self.prefix,
            cwd=self.cwd,
        ).start()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=10)
            # Every line it wrote is in ``log`` before the caller looks: the reader thread
            # may not have had its turn yet (the last lines of a stop come ~15 ms before
            # the exit), and it ends at the end of the pipe.
            self._reader.join(timeout=5)
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()  # no broker left behind
            self.proc.wait(timeout=10)
            tail = "".join(self.log[-120:])  # with the stacks a slow stop logs after 5 s
            raise AssertionError(f"the broker did not exit within 10 s of signal {sig}; its log:\n{tail}") from None

    def env(self) -> dict[str, str]:
        return {**os.environ, "ZCHAT_HOST": HOST, "ZCHAT_PORT": str(self.port), "ZCHAT_PUB_PORT": str(self.pub_port)}


@pytest.fixture
def broker_proc(tmp_path: Path) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path / "data").start()
    yield proc
    proc.kill()


@pytest.fixture(autouse=True)
def _quiet_broker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zchat.broker")


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's ``zchat`` processes keep their resume tokens (client/saved.py) in a
    directory of its own, not in the home directory where another test's, or a user's,
    would be found."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


#: The uid of Debian's (and most systems') "nobody".
NOBODY = 65534


def as_user(fn: Callable[[], str], uid: int = NOBODY) -> str:
    """What ``fn`` returns, or the text of what it raises, run in a forked child as ``uid``:
    as root (as CI runs) nothing is ever refused for its mode, so this is how a test sees
    what a broker run as a service user sees."""
    if os.geteuid() != 0:
        pytest.skip("only root can run a test as another user (CI runs as root)")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no zmq, no pytest, only fn
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, fn_text(fn).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return out


@contextlib.contextmanager
def world_traversable() -> Iterator[Path]:
    """A fresh directory that every user can reach (pytest's tmp_path is under a 0700 one)."""
    top = Path(tempfile.mkdtemp(prefix="zchat-modes-"))
    try:
        top.chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def fn_text(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # the text is what the tests check
        return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def small_file_system(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (made), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("only root can mount a small file system (CI runs as root)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, timeout=10)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=10)


def fill_until(path: Path, leave: int) -> None:
    """Write ``path`` until its file system has ``leave`` bytes free (or a little less)."""
    with path.open("wb") as f:
        while (free := shutil.disk_usage(path.parent).free) > leave:
            f.write(b"\0" * min(free - leave + 4096, 1 << 20))
            f.flush()
