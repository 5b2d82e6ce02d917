"""The broker's socket loop: receive, let the core decide, commit, then send.

One thread owns every socket here. The loop holds no policy: what to answer is
the core's business, what is durable is the store's. Its only rules are about
order: nothing read in a pass is acknowledged, published or answered before
every row of that pass (and of the passes before it) is committed; and what
one pass decided goes out in the order it was decided, after what the passes
before it decided. The loop commits each pass itself while the disk is quick;
when it is slow, the commits go to the store writer's thread (broker/writer.py)
so the loop reads and decides on while the disk syncs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

try:
    import resource
except ImportError:  # Windows: no such limit to fit
    resource = None  # type: ignore[assignment]

from broker.auth import BROKER_CERT, Keys, KeysError, load_keys, load_secret, load_users, secure_server
from broker.backplane import DEFAULT_RETENTION, Backplane
from broker.backplane import Errors as bp_errors
from broker.cluster import UNAVAILABLE_TEXT, BackplaneDown, ClusterCore
from broker.core import (
    DEDUP_WINDOW,
    Action,
    Core,
    Direct,
    HistoryQuery,
    Limits,
    LogBudget,
    Publish,
    Reply,
    SavedSession,
    sessions_text,
)
from broker.fanin import FANIN_ENDPOINT, EventListener, InboxListener
from broker.gate import EVENTS_DOMAIN, REQUEST_DOMAIN, Gate
from broker.hold import PresenceHold
from broker.store import LOW_SPACE_WARN_BYTES, Durability, Row, Store, StoreError, now_ms
from broker.writer import Writer
from zchat import protocol as p
from zchat.protocol import ErrorCode

log = logging.getLogger("zchat.broker")
lifecycle = logging.getLogger("zchat.broker.lifecycle")


def _load_libc() -> ctypes.CDLL | None:
    """The C library this process runs on (its symbols: ``CDLL(None)``), or None (not POSIX)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


_libc = _load_libc()


def _seed_routing_ids() -> None:
    """Make the routing ids libzmq gives a ROUTER's peers unpredictable.

    libzmq names a peer that brings no routing id 0x00 + a 32-bit counter, started
    at ``rand()``, which it never seeds: every broker began at 0x6b8b4567. A peer may
    also choose its routing id. Choosing one the counter will reach makes libzmq 4.3
    abort the process when it gets there (it asserts the name is free); choosing the
    one of a connection that just dropped takes over that session until it expires
    (docs/security.md). A random start leaves nothing to aim at.
    """
    srand = getattr(_libc, "srand", None)
    if srand is None:
        log.warning("cannot seed libzmq's routing ids (no C library to reach): they are predictable")
        return
    srand(ctypes.c_uint(secrets.randbits(32)))


def _tick_ms(heartbeat_ms: int) -> int:
    """How often the loop does its timed chores (expiry, the PUB socket's, ...)."""
    return max(50, heartbeat_ms // 4)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or none to reach)."""
    if _libc is None:
        return None
    try:
        trim = _libc.malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


#: glibc keeps what a burst freed (the messages of a flood, a history burst's replies,
#: the buffers of a join storm) for reuse, in every thread's heap: the broker's RSS
#: stayed at its peak for good. The loop hands it back, at most every TRIM_EVERY_S:
#: once it has been idle for a wake-up (IDLE_WAKE_MS) after some work; or, since a
#: broker with many clients is never idle that long (1,000 of them ping 200 times a
#: second), when its RSS has grown TRIM_GROWTH_KIB since the last trim, or the gate
#: has let go of its handshakes' pipes (broker/gate.py). Measured (scratch runs:
#: 20,000 texts of 2 KB, then idle): 52-55 MB against 60-85 MB without, each trim
#: 2-3 ms, outside the GIL.
_malloc_trim = _find_malloc_trim()
TRIM_EVERY_S = 5.0
TRIM_GROWTH_KIB = 4096


def _rss_kib() -> int:
    """This process's resident set (KiB), 0 if unknown."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


#: Most messages read from ROUTER in one pass (one transaction).
BATCH = 1024
#: A pass also stops reading after this long (seconds), looked at every
#: PASS_CHECK_BYTES of requests read, each request counted as at least
#: PASS_CHECK_EACH (so every 64 or fewer) and each frame of a message of several as
#: 64: every reply and event of a pass waits for its end, and a request can be slow to
#: refuse (64 KiB of tiny values: ~3 ms to unpack; a message of a million empty
#: frames: 2 s to read), so a flood of those must not hold everyone else's answers.
PASS_READ_S = 0.02
PASS_CHECK_BYTES = 64 * 1024
PASS_CHECK_EACH = 1024
#: Passes whose rows may wait for the disk at once; past this the loop stops
#: reading requests until commits catch up, and a disk that stalls holds
#: clients back (in their own queues) instead of growing the broker's memory.
MAX_PASSES_WAITING = 32
#: A pass's rows are committed by the loop itself while the disk is quick: a
#: hand-off to the writer thread and back costs both threads the GIL and
#: wake-ups. Measured on this project's 2-core machine (fsync ~0.3 ms), inline
#: against handed off above 8 rows (the policy before): 1x1 capacity 74.5-75k
#: (not saturated) against 57-67k msg/s, 53.5-58.3k against 49.7-54.2k with
#: 1 KiB texts, and p50 delivery at 20k msg/s 0.58-0.74 against 0.97-1.41 ms
#: (scratch points of bench.harness, 3 runs each). But the loop reads nothing
#: while it waits for the disk: once a commit waited longer than this (a slow
#: or busy disk), the passes of the next SLOW_DISK_HOLD_S go to the writer
#: thread, which commits them while the loop reads on; then the loop tries
#: again. With a simulated 5 ms disk at 60k msg/s offered, 59.5k msg/s were
#: delivered handed off against 55.1k inline. The wait leaves out the time the
#: loop was runnable but not scheduled (see RunQueueClock): at 80k msg/s offered,
#: 4 of 6 commits that waited over 4 ms had waited for a CPU, not the disk.
SLOW_DISK_WAIT_S = 0.004
SLOW_DISK_HOLD_S = 0.1
#: The disk alarm's floor by default: the free space (as ``df`` counts it) on the
#: store's file system below which room messages are refused ``unavailable``, as
#: RabbitMQ's disk_free_limit blocks publishers (its default is 50 MB). Enough for
#: what can be written between two checks (DISK_CHECK_S: at 60k msg/s some 20 MB
#: of WAL and database) and for the WAL's growth to its
#: restart size (WAL_RESTART_FRAMES pages, 32 MiB) after a start. The same figure
#: as the store's low-space warning at start.
MIN_FREE_BYTES = LOW_SPACE_WARN_BYTES
#: The alarm clears once this much more than its floor is free: not flapping on
#: and off (a line each) while the broker's own writes hover at the floor.
MIN_FREE_MARGIN = 0.1
#: How often the loop reads the free space for the disk alarm, in s: a statvfs, some
#: microseconds. Its own pace, not the heartbeat's tick (a quarter of --heartbeat-ms):
#: at --heartbeat-ms 60000 that was 15 s between checks, 300 MB at 60k msg/s, and the
#: disk filled past any floor before the alarm could see it; at 100 ms, 20 a second.
#: On the monotonic clock: a wall clock set back an hour left it an hour unchecked.
DISK_CHECK_S = 1.0
#: What a room message is answered during the disk alarm.
DISK_ALARM_TEXT = "the broker's disk is nearly full; nothing was stored, retry later"
#: File descriptors the broker holds besides its clients' connections (store, sockets,
#: libzmq's own); each client takes 2 more (its request and its room-event connection).
FD_MARGIN = 64
#: Below this open-file limit the broker does not start. Its start takes about 26
#: files, and libzmq does not always fail cleanly when it runs out in the middle: a
#: bind that meets the limit inside getifaddrs() aborts the process (SIGABRT, no log
#: line). 64 leaves room for the start and for what the warning's count of clients
#: leaves out.
MIN_OPEN_FILES = FD_MARGIN


def open_files_limit() -> int | None:
    """This process's soft limit on open files, or None for no limit (or no such notion here)."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def fit_open_files_limit(max_sessions: int) -> tuple[int | None, int]:
    """Raise the soft open-file limit towards what ``max_sessions`` clients need, as far
    as the hard limit allows (shells often start with a soft 1024: about 480 clients).
    Returns (the limit now, the limit wanted); the caller warns if it is short."""
    want = 2 * max_sessions + FD_MARGIN
    if resource is None:
        return None, want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if raised > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    return open_files_limit(), want


#: A failing accept (out of file descriptors) is logged at most this often, in s.
ACCEPT_FAILED_LOG_S = 10.0
#: New request connections a second from one host, and the burst before that pace
#: (--connect-rate; broker/gate.py says why): a host may reconnect 100 sessions (the
#: default --max-sessions-per-host) twice at once.
CONNECT_RATE = 20.0
CONNECT_BURST = 200
#: How often (at most) the loop wakes up with nothing to do, in ms.
IDLE_WAKE_MS = 200
#: The wall clock (which stamps events, and which the core's timers read) moving this
#: much more or less than the monotonic clock between two passes is a jump: an NTP
#: step, a VM resumed, a clock set by hand. NTP's slewing moves it 0.5 ms a second at
#: most; a pass's two readings of the clocks are microseconds apart. A suspended
#: machine shows as a jump forward (the monotonic clock stops while it sleeps).
CLOCK_STEP_MS = 1000
#: The loop's poll returned this much later than it was asked to: the process was
#: stopped (SIGSTOP, a debugger), its machine paused, or it was starved of CPU. That
#: silence is not held against the sessions (Core.unheard). Only the poll is timed,
#: where an idle loop spends its time: a stop that falls in a pass is not seen.
LOOP_STALL_MS = 1000
#: A reading whose two monotonic readings around the wall clock's are further apart
#: than this (the thread was preempted between them) is taken again, up to 3 times.
CLOCK_READ_SLACK_MS = 50
#: Frames larger than this make libzmq drop the connection before we see them;
#: smaller oversize frames reach the protocol and get a coded ``too_large``. Twice the
#: protocol's request limit: libzmq queues up to 1,000 frames of a peer whose routing id
#: another peer has, and never hands them over (at 1 MiB, 1 GiB per such connection).
SOCKET_MAX_MSG_BYTES = 2 * p.MAX_FRAME_BYTES
#: Per-subscriber queue on PUB, in messages (one event, or a batch of at most
#: BATCH_MAX_BYTES, about one large event's size): a subscriber this far behind
#: loses live events (and recovers them with ``history``); the broker's memory
#: stays bounded.
PUB_SNDHWM = 10_000
#: About what a history reply adds to its events' bytes (type, room, seq, id, mark, headers).
HISTORY_ENVELOPE_BYTES = 160
#: Replies queued per client before the broker drops one (a client that does
#: not read its acks); well above any client's window of unacked messages.
ROUTER_SNDHWM = 10_000


#: What makes a backplane call of the loop's own answer ``unavailable``.
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (BackplaneDown, *bp_errors)

# Plain ints: combining pyzmq's IntFlag members per message costs an enum call.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_SNDMORE_NOBLOCK = _SNDMORE | _NOBLOCK
# pyzmq's Cython send/recv without the Python layer over them (which handles
# routing ids, groups and tracking we never use): 0.24 instead of 0.6 us a call.
_send: Callable[..., None] = zmq.backend.Socket.send
_recv: Callable[..., bytes] = zmq.backend.Socket.recv
#: The same, for calls with copy=False: they return a zmq.Frame.
_recv_frame: Callable[..., zmq.Frame] = zmq.backend.Socket.recv
#: Whether a received Frame says if more frames follow. The Cython backend's
#: does; the cffi backend (PyPy) never sets ``Frame.more``, so there the loop
#: asks the socket (RCVMORE), as it must to refuse a multi-frame request.
_FRAME_KNOWS_MORE = zmq.backend.Socket.__module__.startswith("zmq.backend.cython")
_RCVMORE = int(zmq.RCVMORE)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 5555
    pub_port: int = 5556
    data_dir: Path | None = None
    heartbeat_ms: int = 5000
    durability: Durability = "full"
    pub_hwm: int = PUB_SNDHWM
    limits: Limits = field(default_factory=Limits)
    #: Frames larger than this make libzmq drop the sender's connection.
    max_msg_bytes: int = SOCKET_MAX_MSG_BYTES
    #: With a key directory, CURVE on both sockets and only authorized users.
    keys_dir: Path | None = None
    #: ``redis://HOST:PORT/DB``: share the chat with other brokers (no SQLite store).
    backplane: str | None = None
    #: Events kept per room: in the backplane (None: DEFAULT_RETENTION), or in the
    #: embedded store (None: all), which takes it as Store(retention=...).
    retention: int | None = None
    #: New request connections a second from one host, after a burst of
    #: ``connect_burst`` (broker/gate.py); 0: no pacing.
    connect_rate: float = CONNECT_RATE
    connect_burst: int = CONNECT_BURST
    #: The disk alarm: below this many bytes free on the store's file system, room
    #: messages are refused ``unavailable`` (see Broker._check_disk); 0 turns it off.
    min_free_bytes: int = MIN_FREE_BYTES


def _mono_ms() -> int:
    """The monotonic clock in ms: what the loop's own timers run on."""
    return time.monotonic_ns() // 1_000_000


def _free_bytes(path: Path) -> int:
    """Free bytes on ``path``'s file system for an unprivileged user, as ``df`` counts them."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _resume_at(floor: int) -> int:
    return floor + round(floor * MIN_FREE_MARGIN)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _endpoint(host: str, port: int) -> str:
    return p.tcp_endpoint(host, "*" if port == 0 else port)  # (port 0: a free one)


class Broker:
    """Binds on construction; :meth:`run` serves until :meth:`stop` is called.

    ``stop`` is the one method that may be called from another thread (or a
    signal handler): it only sets a flag the loop checks at least every
    ``IDLE_WAKE_MS``.
    """

    def __init__(self, config: Config, store: Store | None) -> None:
        self.config = config
        self.store = store
        self.backplane: Backplane | None = None
        if config.backplane:
            # Connect before binding: a broker that cannot reach its backplane
            # says so and exits, rather than serving clients it cannot serve.
            self.backplane = Backplane(
                config.backplane,
                secrets.token_hex(6),
                retention=DEFAULT_RETENTION if config.retention is None else config.retention,
                alive_ms=6 * config.heartbeat_ms,
            )
        elif store is None:
            raise ValueError("a broker needs a store or a backplane")
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.keys = load_keys(config.keys_dir) if config.keys_dir else None
        self.ctx = zmq.Context()
        # Before anything that can fail: _close_sockets() reads them.
        self._fanin_stop = threading.Event()
        self._dropped_log = LogBudget("dropped replies")
        self._connections_log = LogBudget("connection lines")
        self._accept_failures = 0
        #: Why the last reply that failed to go out failed (an errno).
        self._send_errno = 0
        self._accept_logged_at = -ACCEPT_FAILED_LOG_S
        #: Times the loop gave freed memory back (TRIM_EVERY_S); the RSS after the last
        #: time (KiB), and the gate's recycles it had seen.
        self.trims = 0
        #: Jumps of the wall clock seen (see CLOCK_STEP_MS).
        self.clock_steps = 0
        #: The wall clock as the current pass reads it (already judged for a jump), and
        #: the readings a jump is judged against: everything in a pass uses this one,
        #: never a fresh now_ms() that could see a jump the core has not been told of.
        self._now = now_ms()
        self._clock_base = (self._now, _mono_ms())
        self._trimmed_rss_kib = 0
        self._trimmed_recycles = 0
        #: The connection whose message of several frames a pass's time limit cut short:
        #: the next pass reads its other frames first (ROUTER hands a message out whole).
        self._reading_rest: bytes | None = None
        #: When a subscriber left (libzmq lets its subscriptions go at the PUB socket's next
        #: uses), for a trim once that is done (see _trim_due); 0: none since the last.
        self._subscriber_left_ms = 0
        #: When the last one left: a trim before its subscriptions are let go does not
        #: cover it, so the next is due once they are (a second peer's may be gigabytes too).
        self._last_subscriber_left_ms = 0
        #: By when that is done: two ticks (the loop uses the socket at each), and a margin.
        self._subscriptions_freed_ms = 2 * _tick_ms(config.heartbeat_ms) + 500
        self._fanin: zmq.Socket[bytes] | None = None
        self._listeners: list[threading.Thread] = []
        self.gate: Gate | None = None
        if self.keys is not None or config.connect_rate > 0:
            gate = Gate(
                self.ctx,
                None if self.keys is None else self.keys.users,
                rate=config.connect_rate,
                burst=config.connect_burst,
            )
            gate.start()
            self.gate = gate
        _seed_routing_ids()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 500)
            sock.setsockopt(zmq.MAXMSGSIZE, config.max_msg_bytes)
            if ":" in config.host:  # an IPv6 address ("::" too: IPv6 and IPv4 both)
                sock.setsockopt(zmq.IPV6, 1)
        if self.keys is not None:
            secure_server(self.router, self.keys, REQUEST_DOMAIN)
            secure_server(self.pub, self.keys, EVENTS_DOMAIN)
        elif self.gate is not None:
            self.router.zap_domain = REQUEST_DOMAIN  # paced: NULL security asks the gate too
            # And is refused when no gate answers, rather than let through unpaced.
            self.router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # An unreachable peer raises instead of silently eating the reply.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pub.setsockopt(zmq.SNDHWM, config.pub_hwm)
        self.router.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
        try:
            self.router.bind(_endpoint(config.host, config.port))
            self.pub.bind(_endpoint(config.host, config.pub_port))
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.pub_port = int(self.pub_endpoint.rsplit(":", 1)[1])
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED
        self._monitors = {
            self.router.get_monitor_socket(events): "client",
            self.pub.get_monitor_socket(events): "subscriber",
        }
        self._peers: dict[tuple[str, int], str] = {}
        #: room -> last seq published on our PUB (backplane mode): in order, once.
        self._published: dict[str, int] = {}
        #: Presence of a join storm, waiting to go out in batches (broker/hold.py).
        self._hold = PresenceHold()
        self.core: Core
        if self.backplane is not None:
            bp = self.backplane
            self.core = ClusterCore(
                backplane=bp,
                epoch=bp.register(self._now),
                heartbeat_ms=config.heartbeat_ms,
                limits=config.limits,
                authenticated=self.keys is not None,
            )
            self._fanin = self.ctx.socket(zmq.PULL)
            self._fanin.setsockopt(zmq.LINGER, 0)
            self._fanin.bind(FANIN_ENDPOINT)
            self._listeners = [
                EventListener(self.ctx, bp.url, self._fanin_stop),
                InboxListener(self.ctx, bp.url, self._fanin_stop, bp.id),
            ]
            for listener in self._listeners:
                listener.start()
            log.info("backplane %s: this broker is %s", bp.shown_url, bp.id)
        #: Passes whose actions wait for their rows to be durable, oldest first:
        #: (ticket, actions, their published bodies); ticket 0 for a pass with no rows.
        self._waiting: deque[tuple[int, list[Action], list[tuple[str, bytes]]]] = deque()
        #: Until then (time.monotonic()), passes go to the writer thread: a commit waited for the disk.
        self._handoff_until = 0.0
        self.writer: Writer | None = None
        if self.backplane is None:
            assert store is not None
            self.core = Core(
                epoch=secrets.token_hex(8),
                heartbeat_ms=config.heartbeat_ms,
                room_seqs=store.room_seqs(),
                recent_acks=store.recent_acks(DEDUP_WINDOW),
                limits=config.limits,
                authenticated=self.keys is not None,
            )
            restored = self.core.restore(self._still_authorized(store.take_saved_sessions()), self._now)
            if restored:
                lifecycle.info(
                    "restored %s saved at the last stop: each has %g s to resume",
                    sessions_text(restored),
                    self.core.expiry_ms / 1000,
                )
            # Started once the store has been read: from now on only the writer
            # writes, on its thread or, while nothing is in flight, on the loop's.
            self.writer = Writer(self.ctx, store)
        self._encode = p.Encoder()

    # --------------------------------------------------------------- control

    @property
    def core_id(self) -> str:
        """This broker's id on the backplane ("-" without one)."""
        return self.backplane.id if self.backplane is not None else "-"

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """Ask the loop to re-read the authorized keys (SIGHUP); safe from any thread."""
        self._reload.set()

    def run(self) -> None:
        try:
            self._check_disk()  # a broker started on a nearly full disk refuses from its first message
            self._serve()
        finally:
            # Presence still held goes out, however the loop ended: it is committed.
            with contextlib.suppress(zmq.ZMQError):
                self._publish([], release_all=True)
            self._close_sockets()

    # ------------------------------------------------------------------ loop

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        fanin = self._fanin
        if fanin is not None:
            poller.register(fanin, zmq.POLLIN)
        writer = self.writer
        if writer is not None:
            poller.register(writer.sock, zmq.POLLIN)
        cluster = self.core if isinstance(self.core, ClusterCore) else None
        router = self.router
        tick_every = _tick_ms(self.config.heartbeat_ms)
        # The loop's own timers run on the monotonic clock (ms): a jump of the wall
        # clock neither brings them forward nor holds them back.
        mono_ms = _mono_ms()
        next_tick = mono_ms + tick_every
        next_disk_check = time.monotonic() + DISK_CHECK_S
        reading = True
        hold = self._hold
        worked, trimmed_at, idle = False, mono_ms - int(TRIM_EVERY_S * 1000), 0
        pub = self.pub
        trim_asked_at = mono_ms
        while not self._stop.is_set():
            if writer is not None and reading != (len(self._waiting) < MAX_PASSES_WAITING):
                reading = not reading
                poller.modify(router, zmq.POLLIN if reading else 0)
                if reading:
                    # Pings that waited unread are no one's silence: nobody
                    # expires before a full expiry period of reading again.
                    next_tick = max(next_tick, _mono_ms() + self.core.expiry_ms)
                else:
                    log.debug("the store is %d commits behind: requests wait until it catches up", writer.behind)
            wake_ms = IDLE_WAKE_MS
            if hold.held:
                wake_ms = max(0, min(wake_ms, math.ceil(hold.due - time.monotonic() * 1000)))
            # Only the poll is timed: a long pass of our own (a slow commit) is no stop, and
            # counted as one it would keep a dead session from ever expiring.
            polled_at = _mono_ms()
            ready = dict(poller.poll(wake_ms))
            now, mono_ms = self._read_clocks()
            if (unheard := mono_ms - polled_at - wake_ms) >= LOOP_STALL_MS:
                self._unheard(unheard)
            if ready:
                worked, idle = True, 0
            else:
                # libzmq does the PUB socket's chores (a subscriber's subscriptions in, a
                # gone one's out of its trie, in two steps with its I/O thread between) only
                # when the socket is used: with no publish, the trie of a subscriber that
                # left, up to gigabytes of subscriptions, stayed for good. Also each tick.
                pub.getsockopt(zmq.EVENTS)
                idle += 1
            if mono_ms - trimmed_at >= TRIM_EVERY_S * 1000:
                # The second idle wake-up: after the PUB socket's two steps.
                due = worked and idle >= 2 and wake_ms == IDLE_WAKE_MS
                if not due and mono_ms >= trim_asked_at + TRIM_EVERY_S * 1000:
                    trim_asked_at = mono_ms  # (a read of /proc: not at every pass)
                    due = self._trim_due()
                if due:
                    # (Two idle wake-ups since the last event: a subscriber that left is let go.)
                    self._trim(settled=idle >= 2)
                    worked, trimmed_at = False, mono_ms
            actions: list[Action] = []
            if router in ready:
                actions = self._drain(now)
            for mon in self._monitors:
                if mon in ready:
                    self._log_connections(mon)
            if reading and mono_ms >= next_tick:
                actions.extend(self.core.expire(now))
                if cluster is not None:
                    actions.extend(cluster.tick(now))
                next_tick = mono_ms + tick_every
                pub.getsockopt(zmq.EVENTS)  # (its chores, for a broker never idle: see below)
                self._prune_aged(now)
                hold.forget(time.monotonic() * 1000)
            if (mono := time.monotonic()) >= next_disk_check:
                next_disk_check = mono + DISK_CHECK_S
                self._check_disk()
            if self._reload.is_set():
                self._reload.clear()
                actions.extend(self._reload_keys(now))
            if writer is not None and writer.sock in ready:
                try:
                    durable = writer.read()
                except StoreError:
                    self._release(writer.durable)  # what was committed before the failure goes out
                    raise
                self._release(durable)
            if actions:
                self._perform(actions)
            if fanin is not None and fanin in ready:
                self._fan_in(now)
            if hold.held and time.monotonic() * 1000 >= hold.due:
                self._publish([])
            if actions:
                # The young generation, collected after every pass that did something,
                # while it holds that pass's leftovers only. Left to the automatic
                # collector it grows without bound: every message leaves two tuples
                # in the resend window (Core._acked), and CPython hands them out
                # from its free lists without counting them towards a collection,
                # so one came every few seconds and walked ~150,000 of them in
                # 20-30 ms, with every message of the moment waiting behind it
                # (measured at 25k msg/s, 1 room x 1). Each collection untracks the
                # window's new tuples (they hold only strings and ints): about 0.2 us
                # for each, the work the automatic one did, spread out.
                actions = []  # garbage now, unless waiting for the writer thread: not walked
                gc.collect(0)
        if writer is not None:
            # Stopping: what was decided is committed, then acknowledged and
            # published (the sockets linger briefly for it), as a pass would.
            self._release(writer.wait_all(timeout=10))
            self._save_sessions(writer)

    def _check_disk(self) -> None:
        """The disk alarm (``--min-free``): refuse room messages while the store's file
        system has less than the floor free, and take them again once it has the floor
        and a margin. One line each way. Asked every DISK_CHECK_S (and at start).

        The store's own stop on a failed commit stays the last line of defence (a disk
        filled faster than a check, or by another program): nothing unstored is acked."""
        floor, store = self.config.min_free_bytes, self.store
        if floor <= 0 or store is None:
            return
        try:
            free = _free_bytes(store.path.parent)
        except OSError as exc:
            log.debug("cannot read the free space of %s: %s", store.path.parent, exc)
            return
        core = self.core
        if core.store_refusal is None and free < floor:
            core.store_refusal = DISK_ALARM_TEXT
            log.warning(
                "disk alarm: %s free on the file system of %s, under --min-free %s: room messages are refused "
                "(unavailable; clients hold them and retry) until %s is free; DMs and history go on. "
                "Free some space, set a retention, or lower --min-free (ZCHAT_MIN_FREE)",
                _mib(free),
                store.path.parent,
                _mib(floor),
                _mib(_resume_at(floor)),
            )
        elif core.store_refusal is not None and free >= _resume_at(floor):
            core.store_refusal = None
            log.warning(
                "disk alarm over: %s free on the file system of %s; room messages are taken again",
                _mib(free),
                store.path.parent,
            )

    def _read_clocks(self) -> tuple[int, int]:
        """The pass's wall clock (self._now) and monotonic ms, after telling the core of a
        jump of the wall clock since the last judged pass (see CLOCK_STEP_MS)."""
        for _ in range(3):  # a reading preempted half-way is taken again
            before = _mono_ms()
            now = now_ms()
            mono = _mono_ms()
            if mono - before <= CLOCK_READ_SLACK_MS:
                break
        last_now, last_mono = self._clock_base
        step = (now - last_now) - (mono - last_mono)
        self._clock_base = (now, mono)
        if abs(step) >= CLOCK_STEP_MS:
            self._clock_stepped(step)
        self._now = now
        return now, mono

    def _clock_stepped(self, step_ms: int) -> None:
        """The wall clock jumped (see CLOCK_STEP_MS): timers keep their pace (Core.clock_stepped)."""
        self.clock_steps += 1
        log.warning(
            "the system clock jumped %s %.1f s%s: session expiry, rate limits and holds keep their pace; "
            "events are stamped with the clock as it now reads",
            "back" if step_ms < 0 else "forward",
            abs(step_ms) / 1000,
            "" if step_ms < 0 else " (or the machine slept)",
        )
        self.core.clock_stepped(step_ms)

    def _unheard(self, gap_ms: int) -> None:
        """The loop did not run for ``gap_ms`` (see LOOP_STALL_MS)."""
        log.warning(
            "the broker did not run for %.1f s (stopped, paused or starved of CPU): "
            "that silence is not counted against the sessions",
            gap_ms / 1000,
        )
        self.core.unheard(gap_ms)

    def _trim_due(self) -> bool:
        """A trim for a broker that is never idle (see TRIM_EVERY_S); asked at most every TRIM_EVERY_S."""
        if _malloc_trim is None:
            return False
        gate = self.gate
        if gate is not None and gate.recycles != self._trimmed_recycles:
            return True
        if self._subscriber_left_ms and _mono_ms() - self._subscriber_left_ms >= self._subscriptions_freed_ms:
            return True  # its subscriptions are let go by now (a peer's may be gigabytes)
        return _rss_kib() >= self._trimmed_rss_kib + TRIM_GROWTH_KIB

    def _trim(self, settled: bool = False) -> None:
        """Hand the memory a burst freed back to the system (see TRIM_EVERY_S); ``settled``:
        the PUB socket has let go of every subscriber that left."""
        if _malloc_trim is not None:
            if self.gate is not None:
                self._trimmed_recycles = self.gate.recycles
            if settled or _mono_ms() - self._last_subscriber_left_ms >= self._subscriptions_freed_ms:
                self._subscriber_left_ms = 0
            elif self._subscriber_left_ms:
                self._subscriber_left_ms = self._last_subscriber_left_ms  # due once it is let go
            _malloc_trim(0)
            self.trims += 1
            self._trimmed_rss_kib = _rss_kib()

    def _still_authorized(self, saved: list[SavedSession]) -> list[SavedSession]:
        """With --keys, the saved sessions whose names still have the key they had when saved:
        a user removed, or given a new key (a leaked one replaced), while the broker was
        down is not restored, as a reload would have ended its sessions."""
        if self.keys is None:
            return saved
        users = self.keys.users
        return [s for s in saved if s.key is not None and users.get(s.key) == s.name]

    def _save_sessions(self, writer: Writer) -> None:
        """A clean stop: the sessions go to the store, and the next start takes them back
        (Core.restore): its clients resume, and the rooms see no one leave or join."""
        if self.store is None:
            return
        if writer.behind:
            # A commit still in flight holds the store's connection.
            log.error("the sessions were not saved for the next start: the store did not finish its commits")
            return
        saved = self.core.sessions_to_save()
        if self.keys is not None:
            # The key of each name now: a user whose key changes or goes meanwhile is not restored.
            keys = {name: key for key, name in self.keys.users.items()}
            saved = [s._replace(key=keys.get(s.name)) for s in saved]
        try:
            self.store.save_sessions(saved)
        except StoreError as exc:
            log.error("the sessions could not be saved for the next start: %s", exc)
            return
        if saved:
            lifecycle.info("saved %s for the next start to restore", sessions_text(len(saved)))

    def _prune_aged(self, now: int) -> None:
        """While nobody writes, no commit deletes what ages (--retention-days): a commit of
        no rows does, a step a tick. Not while the disk is slow: the writer thread's
        commits do it then."""
        writer, store = self.writer, self.store
        if writer is None or store is None or self._waiting or time.monotonic() < self._handoff_until:
            return
        if store.aged_due(now) and writer.append_now([]) > SLOW_DISK_WAIT_S:
            self._handoff_until = time.monotonic() + SLOW_DISK_HOLD_S

    def _drain(self, now: int) -> list[Action]:
        """Read every message that is ready (up to BATCH) and let the core decide."""
        router = self.router
        recv, recv_frame = _recv, _recv_frame
        handle = self.core.handle
        secured = self.keys is not None
        actions: list[Action] = []
        unchecked, deadline = 0, time.monotonic() + PASS_READ_S
        if self._reading_rest is not None:  # a message of many frames that the last pass left
            identity, self._reading_rest = self._reading_rest, None
            rest = self._read_rest(identity, deadline, 0)
            if rest is None:
                return actions
            unchecked = rest
            actions.extend(self.core.several_frames(identity, now))
        for _ in range(BATCH):
            if unchecked >= PASS_CHECK_BYTES:
                if time.monotonic() > deadline:
                    break  # the rest waits for the next pass (the poll finds it ready)
                unchecked = 0
            try:
                # Two recv() calls, not recv_multipart(): about twice as fast.
                identity = recv(router, _NOBLOCK)
            except zmq.Again:
                break
            # ROUTER always puts the identity before at least one frame of the
            # peer's. That frame as a zmq.Frame, which knows whether more follow:
            # 0.2 us a message cheaper than a copy and a RCVMORE query.
            part = recv_frame(router, 0, False)
            frame = part.bytes
            unchecked += len(frame) + PASS_CHECK_EACH
            # With keys, the name the connection's key belongs to, set by our ZAP handler.
            user = (str(part.get("User-Id") or "") or None) if secured else None
            if part.more if _FRAME_KNOWS_MORE else router.get(_RCVMORE):
                # The rest of the message is there (ROUTER delivers a message whole): read
                # it all, and refuse it, once read; in the next pass if this one is over.
                rest = self._read_rest(identity, deadline, unchecked)
                if rest is None:
                    break
                unchecked = rest  # (its frames count: 1,023 of them a message doubled a pass)
                actions.extend(self.core.several_frames(identity, now))
                continue
            try:
                actions.extend(handle(identity, frame, now, user, part))
            except Exception:
                # A bug of ours must cost one request, not the broker: log it whole.
                log.exception("internal error handling a request from %s", identity.hex())
                actions.append(
                    Reply(identity, p.error(ErrorCode.INTERNAL, "internal error; it has been logged", _id_of(frame)))
                )
        return actions

    def _read_rest(self, identity: bytes, deadline: float, unchecked: int) -> int | None:
        """Read the frames left of ``identity``'s message; None if the pass's time ran out
        first (the next pass reads on: ``_reading_rest``), else the pass's ``unchecked``
        read (see _drain) with these frames."""
        router, recv_frame = self.router, _recv_frame
        more = bool(router.get(_RCVMORE))
        while more:
            part = recv_frame(router, 0, False)
            more = part.more if _FRAME_KNOWS_MORE else bool(router.get(_RCVMORE))
            unchecked += len(part) + 64  # (a frame costs a call, however small)
            if unchecked >= PASS_CHECK_BYTES and more:
                if time.monotonic() > deadline:
                    self._reading_rest = identity
                    return None
                unchecked = 0
        return unchecked

    def _reload_keys(self, now: int) -> list[Action]:
        """Re-read the authorized users; end the sessions, and cut the connections, of removed ones."""
        if self.keys is None or self.gate is None or self.config.keys_dir is None:
            log.info("reload requested, but the broker runs without keys: nothing to do")
            return []
        before = self.keys.users
        try:
            users = load_users(self.config.keys_dir / "authorized")
        except KeysError as exc:
            log.error("reload failed, keeping the old keys: %s", exc)
            return []
        _warn_if_broker_key_replaced(self.config.keys_dir, self.keys.public)
        names = set(users.values())
        added = names - set(before.values())
        gone = set(before.values()) - names
        # A user whose file now holds another key (the old secret leaked, say): the
        # sessions made with the old key end as a removed user's do.
        rekeyed = {name for key, name in before.items() if name in names and users.get(key) != name}
        removed = gone | rekeyed
        self.keys = Keys(self.keys.public, self.keys.secret, users)
        # Each swapped whole: the ZAP thread only ever reads them.
        self.gate.revoked = {
            **{key: name for key, name in self.gate.revoked.items() if key not in users},
            **{key: name for key, name in before.items() if users.get(key) != name},
        }
        self.gate.users = users
        # A reload is the operator's own doing: said whatever --log-level says, a warning
        # only when it cuts connections (below).
        (log.warning if removed else lifecycle.info)(
            "reloaded %d authorized key%s; added: %s; revoked: %s; new key: %s",
            len(users),
            "" if len(users) == 1 else "s",
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(gone)) or "none",
            ", ".join(sorted(rekeyed)) or "none",
        )
        if not removed:
            return []
        # ZeroMQ cannot close one peer of a bound socket, so rebind both: every
        # client reconnects (and resumes) at once, a revoked key no longer can.
        for sock, endpoint in ((self.router, self.endpoint), (self.pub, self.pub_endpoint)):
            _rebind(sock, endpoint)
        return self.core.revoke(removed, now)

    def _perform(self, actions: list[Action]) -> None:
        if isinstance(self.core, ClusterCore):
            # Room messages of this pass go to the backplane in one round trip;
            # their acks are filled in (or made errors) before anything is sent.
            self.core.flush()
        encode = self._encode
        published: list[tuple[str, bytes]] = []
        rows: list[Row] = []
        for action in actions:
            if isinstance(action, Publish):
                env = action.env
                body = encode(env)
                published.append((action.room, body))
                author = env["from"] if env["type"] == "msg" else None
                rows.append((action.room, env["seq"], env["ts"], author, env.get("id"), body))
        writer = self.writer
        if writer is None:
            self._send_all(actions, published)  # the backplane has what it must already
        elif self._waiting or (rows and time.monotonic() < self._handoff_until):
            # Behind what was decided before it, whatever it holds; or the disk is slow.
            self._waiting.append((writer.submit(rows) if rows else 0, actions, published))
        else:
            # Nothing in flight: the writer's connection is idle and ours for this commit.
            if rows and writer.append_now(rows) > SLOW_DISK_WAIT_S:
                self._handoff_until = time.monotonic() + SLOW_DISK_HOLD_S
                log.debug("a commit waited for the disk: the writer thread commits for %g s", SLOW_DISK_HOLD_S)
            self._send_all(actions, published)

    def _release(self, durable: int) -> None:
        """Send, in order, what waited for commits up to ticket ``durable``."""
        waiting = self._waiting
        while waiting and waiting[0][0] <= durable:
            _ticket, actions, published = waiting.popleft()
            self._send_all(actions, published)

    def _send_all(self, actions: list[Action], published: list[tuple[str, bytes]]) -> None:
        """Publishes, replies and history answers of one pass.

        A pass's events go out per room and its replies per client, each in the
        order the core decided them, several to one frame (a ``batch``) where a
        busy pass has several: one send, and one receive at the other end, per
        room and per client instead of per event. Events go first (the room
        waits on them; their author's ack does not hold anyone up). A history
        answer goes after the replies its client was owed before it.
        """
        encode = self._encode
        if published:
            self._publish(published)
        replies: dict[bytes, list[bytes]] = {}
        for action in actions:
            # Per message: one type test for its ack, two for its event (type() is,
            # not isinstance: this loop runs for every message).
            if type(action) is Reply:
                owed = replies.get(action.identity)
                if owed is None:
                    replies[action.identity] = [encode(action.env)]
                else:
                    owed.append(encode(action.env))
            elif type(action) is Publish:
                continue
            elif isinstance(action, Direct):
                # A DM goes now, behind what its recipient was owed: its author's
                # ack depends on whether the recipient's connection took it.
                self._send_owed(replies, action.identity)
                behind = self.core.dm_held(action, self._now)
                answer_to = self.core.answer_to(action)
                if behind is None and self._send(action.identity, encode(action.env)):
                    answer = self.core.delivered(action)
                else:
                    answer = self.core.undelivered(action, self._now, behind)
                replies.setdefault(answer_to, []).append(encode(answer))
            else:
                assert isinstance(action, HistoryQuery)
                self._send_owed(replies, action.identity)
                self._answer_history(action)
        for identity, owed in replies.items():
            self._send_frames(identity, owed)

    def _publish(self, published: list[tuple[str, bytes]], release_all: bool = False) -> None:
        """Events as (room, body), each room's in order, batched per room (see :meth:`_send_all`).

        Presence may wait (broker/hold.py); what has waited its time goes out
        here too, so the loop calls this with no events when that time is up.
        """
        rooms: dict[str, list[bytes]] = {}
        for room, body in published:
            bodies = rooms.get(room)
            if bodies is None:
                rooms[room] = [body]
            else:
                bodies.append(body)
        # (A room whose first event is not presence holds nothing back: only then is there work.)
        if self._hold.held or any(p.is_presence(bodies[0]) for bodies in rooms.values()):
            self._hold.pass_on(rooms, time.monotonic() * 1000, release_all)
        if not rooms:
            return
        pub = self.pub
        send = _send
        # Make PUB take in the subscriptions that have arrived: libzmq applies
        # them lazily, and a client that subscribed before joining must get
        # what is published right after its join.
        pub.getsockopt(zmq.EVENTS)
        for room, bodies in rooms.items():
            topic = p.room_topic(room)
            for frame in p.batches(bodies):
                send(pub, topic, _SNDMORE)
                send(pub, frame)

    def _answer_history(self, q: HistoryQuery) -> None:
        now = self._now
        refused = self.core.history_refused(q.identity, now)
        if refused is not None:
            if q.request_id is not None:
                refused["id"] = q.request_id
            self._send(q.identity, self._encode(refused))
            return
        if self.backplane is not None:
            assert isinstance(self.core, ClusterCore)
            try:
                if not self.core.backplane_usable(now):
                    raise BackplaneDown
                bodies, seq = self.backplane.history(q.room, q.after, q.limit)
            except _UNAVAILABLE_ERRORS as exc:
                if not isinstance(exc, BackplaneDown):
                    self.core.backplane_failed(exc, now)
                self._send(q.identity, self._encode(p.error(ErrorCode.UNAVAILABLE, UNAVAILABLE_TEXT, q.request_id)))
                return
        else:
            assert self.store is not None
            # Up to the room's seq when it was asked: all of that is committed by now.
            bodies, seq = self.store.history(q.room, q.after, q.limit, upto=q.top), q.top
        size = 0
        for i, body in enumerate(bodies):
            if i and size + len(body) > p.MAX_HISTORY_BYTES:
                # The client sees the last seq it got below the reply's seq and asks again.
                bodies = bodies[:i]
                break
            size += len(body)
        # Charged before it is built, as the charge makes its mark: the bodies and what
        # the envelope around them about costs.
        mark = self.core.charge_history(q.identity, size + HISTORY_ENVELOPE_BYTES, now)
        self._send(q.identity, p.encode_history(q.room, bodies, seq, q.request_id, mark))

    # ------------------------------------------------------- backplane mode

    def _fan_in(self, now: int) -> None:
        """Publish what the listeners heard: each room's events in seq order, once each."""
        assert self._fanin is not None and isinstance(self.core, ClusterCore)
        core = self.core
        out: list[tuple[str, bytes]] = []
        actions: list[Action] = []
        #: Inbox and notice entries handled in this pass, per stream: deleted once done.
        handled: dict[bytes, list[bytes]] = {}
        if core.epoch_changed:
            core.epoch_changed = False
            self._published.clear()  # seq starts over with the new epoch
        for _ in range(BATCH):
            try:
                frames = self._fanin.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                kind = frames[0]
                if kind == b"ev":
                    # Anyone who can PUBLISH on the Redis server can write here: check the shape.
                    room_b, seq_b, body = frames[1].split(b" ", 2)
                    room = room_b.decode()
                    if not p.is_room(room) or not seq_b.isdigit():
                        raise ValueError(f"not ROOM SEQ BODY: {frames[1][:60]!r}")
                    self._sequence(room, int(seq_b), body, out, now)
                elif kind == b"in":
                    acts = core.inbox(frames[1].decode(), frames[2].decode(), frames[3], now)
                    if frames[1] == b"dm" and acts:
                        # Handed to its user's connection here, and now: one that is gone
                        # (its client restarting to resume) cannot take it, and the sender
                        # was acked long ago. It stays in the inbox for the resume.
                        # (One that is not reading, EAGAIN, drops it and says so, as any reply.)
                        for act in acts:
                            if not isinstance(act, Reply):
                                continue
                            sent = self._send(act.identity, self._encode(act.env))
                            if not sent and self._send_errno == errno.EHOSTUNREACH:
                                core.park(frames[2].decode(), act.identity)
                                break
                        else:
                            handled.setdefault(frames[4], []).append(frames[5])
                        continue
                    actions.extend(acts)
                    handled.setdefault(frames[4], []).append(frames[5])
                elif kind == b"sync":
                    self._catch_up(out, now)
            except Exception as exc:
                # One bad frame costs that frame, never the loop.
                log.error("fan-in frame dropped: %s", exc)
        if out:
            self._publish(out)
        if actions:
            self._perform(actions)
        if handled:
            # After the DMs went to their connections: a DM passes through Redis, it is not kept there.
            core.drop_handled({stream.decode(): ids for stream, ids in handled.items()})

    def _sequence(self, room: str, seq: int, body: bytes, out: list[tuple[str, bytes]], now: int) -> None:
        last = self._published.get(room)
        if last is not None:
            if seq <= last:
                return  # heard twice (a catch-up overlapped pub/sub)
            if seq > last + 1:
                self._fill(room, last, seq - 1, out, now)
        out.append((room, body))
        self._published[room] = seq
        if seq > self.core.seqs.get(room, 0):
            self.core.seqs[room] = seq

    def _fill(self, room: str, after: int, upto: int, out: list[tuple[str, bytes]], now: int) -> None:
        """Events pub/sub did not bring (a reconnect): read them from the room's log.

        Best effort: what cannot be read (trimmed away, backplane down) is left
        to the clients, which see the gap and ask history themselves.
        """
        assert self.backplane is not None and isinstance(self.core, ClusterCore)
        if not self.core.backplane_usable(now):
            return
        try:
            while after < upto:
                events, _ = self.backplane.events(room, after, min(upto - after, p.MAX_HISTORY_LIMIT))
                events = [(seq, body) for seq, body in events if after < seq <= upto]
                if not events:
                    break
                for seq, body in events:
                    out.append((room, body))
                    after = seq
        except bp_errors as exc:
            self.core.backplane_failed(exc, now)
            log.warning("cannot fill #%s %d..%d from the backplane: %s", room, after + 1, upto, exc)

    def _catch_up(self, out: list[tuple[str, bytes]], now: int) -> None:
        """After (re)subscribing: publish what each known room got meanwhile."""
        assert self.backplane is not None and isinstance(self.core, ClusterCore)
        if not self._published or not self.core.backplane_usable(now):
            return
        rooms = list(self._published)
        try:
            seqs = self.backplane.room_seqs(rooms)
        except bp_errors as exc:
            self.core.backplane_failed(exc, now)
            return
        for room, seq in zip(rooms, seqs, strict=True):
            last = self._published[room]
            if seq > last:
                self._fill(room, last, seq, out, now)
                self._published[room] = seq

    def _send(self, identity: bytes, frame: bytes) -> bool:
        """Whether the connection took the frame."""
        try:
            _send(self.router, identity, _SNDMORE_NOBLOCK)
            _send(self.router, frame, _NOBLOCK)
        except zmq.ZMQError as exc:
            self._send_errno = exc.errno or 0
            # Gone (EHOSTUNREACH) or not reading (EAGAIN): never block everyone
            # else for one peer. Its requests are safe to resend. A peer that is
            # gone is routine (the session_moved sent after every resume goes to
            # a connection a blip already closed): debug. One not reading: info.
            level = logging.DEBUG if exc.errno == errno.EHOSTUNREACH else logging.INFO
            if log.isEnabledFor(level) and self._dropped_log.allow(int(time.monotonic()), level):
                log.log(level, "reply to %s dropped: %s", identity.hex(), exc.strerror)
            return False
        return True

    def _send_owed(self, replies: dict[bytes, list[bytes]], identity: bytes) -> None:
        """Send now what ``identity`` was owed so far in this pass (what goes next must follow it)."""
        owed = replies.pop(identity, None)
        if owed is not None:
            self._send_frames(identity, owed)

    def _send_frames(self, identity: bytes, bodies: list[bytes]) -> None:
        """Encoded replies to one client, in order, batched (see :meth:`_send_all`)."""
        for frame in p.batches(bodies):
            self._send(identity, frame)

    def _log_connections(self, mon: zmq.Socket[bytes]) -> None:
        kind = self._monitors[mon]
        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            key = (kind, fd)
            # Debug lines: a session's start and end (info) name its address, so at info
            # these only doubled each client's lines, and the container's health check
            # (one connection every 10 s, no session) filled the log with two a check.
            # What a connection does that matters is said apart: refused input, a
            # refused key, connections faster than --connect-rate (warnings).
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers[key] = peer = _peer_name(fd)
                if log.isEnabledFor(logging.DEBUG) and self._connections_log.allow(
                    int(time.monotonic()), logging.DEBUG
                ):
                    log.debug("%s connected from %s (fd %d)", kind, peer, fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                peer = self._peers.pop(key, "an address not known")
                if kind == "subscriber":
                    self._last_subscriber_left_ms = _mono_ms()
                    if not self._subscriber_left_ms:
                        self._subscriber_left_ms = self._last_subscriber_left_ms
                if log.isEnabledFor(logging.DEBUG) and self._connections_log.allow(
                    int(time.monotonic()), logging.DEBUG
                ):
                    log.debug("%s disconnected from %s (fd %d)", kind, peer, fd)
            elif event["event"] == zmq.EVENT_ACCEPT_FAILED:
                # ``value`` is the errno. Out of file descriptors, libzmq retries the
                # accept at once, for ever: without this line the broker would only be
                # seen busy, with new clients unanswered. One line per 10 s, with a count.
                self._accept_failures += 1
                now = time.monotonic()
                if now - self._accept_logged_at >= ACCEPT_FAILED_LOG_S:
                    hint = ""
                    if fd in (errno.EMFILE, errno.ENFILE):
                        limit = open_files_limit()
                        hint = f" (open-file limit {limit}; raise it: ulimit -n, or LimitNOFILE= in a systemd unit)"
                    log.warning(
                        "cannot accept %s connections: %s%s; %d failed accept(s) since the last such line",
                        kind,
                        os.strerror(fd),
                        hint,
                        self._accept_failures,
                    )
                    self._accept_logged_at, self._accept_failures = now, 0

    def _close_sockets(self) -> None:
        self._fanin_stop.set()
        for listener in getattr(self, "_listeners", ()):
            listener.join(timeout=5)
        if getattr(self, "_fanin", None) is not None:
            assert self._fanin is not None
            self._fanin.close()
        if self.backplane is not None:
            with contextlib.suppress(*bp_errors):
                self.backplane.close()
        # Monitors: drain, stop, and only then close our reading end. libzmq's I/O
        # thread sends each event blocking, under the lock disable_monitor takes:
        # with the reading end closed first, an event in flight deadlocked the
        # stop (holding the GIL, so the whole process froze).
        monitors = getattr(self, "_monitors", {})
        for mon in monitors:
            with contextlib.suppress(zmq.ZMQError):
                while mon.poll(0):
                    mon.recv_multipart(zmq.NOBLOCK)
        for sock in (self.router, self.pub):
            if not sock.closed:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
        for mon in monitors:
            mon.close(linger=0)
        writer: Writer | None = getattr(self, "writer", None)  # absent if __init__ failed early
        stuck = writer is not None and not writer.close()
        for sock in (self.router, self.pub):
            if not sock.closed:
                sock.close()
        if self.gate is not None:
            self.gate.stop()
        if stuck:
            # In a commit that does not return (a dead disk): terminating the
            # context would wait for the writer's socket forever. Exit without it.
            log.error("the store writer is stuck in a commit; leaving without it")
            return
        self.ctx.term()


def _id_of(frame: bytes) -> str | None:
    """The request id of a frame, if it has a readable one (for an error reply)."""
    try:
        rid = p.decode(frame).get("id")
    except p.ProtocolError:
        return None
    return rid if isinstance(rid, str) and len(rid) <= p.MAX_ID_CHARS else None


class ListenLost(Exception):
    """The broker could not listen on a port again after letting go of it (to cut the
    connections of a revoked key): it cannot serve, and stops."""


def _warn_if_broker_key_replaced(keys_dir: Path, running: bytes) -> None:
    """A new broker.key_secret (the old one leaked, say) is used from the next start only:
    a reload that said nothing of it left the operator thinking the leaked key was gone."""
    path = keys_dir / f"{BROKER_CERT}.key_secret"
    try:
        # (A FIFO or the like would block the loop until someone wrote to it.)
        public, _ = load_secret(path) if path.is_file() else (running, b"")
    except (KeysError, OSError):
        return  # (unreadable now: the running key stays; nothing to compare)
    if public != running:
        log.warning(
            "%s holds another key than the one this broker runs with (%s): a reload reads only authorized/; "
            "restart the broker to use the new one, and give users the new %s.key",
            path,
            running.decode(),
            BROKER_CERT,
        )


def _rebind(sock: zmq.Socket[bytes], endpoint: str, timeout: float = 5.0) -> None:
    """Unbind and bind again; libzmq closes the listener asynchronously, so retry briefly.

    In that moment another process of this host may take the port: then ListenLost.
    """
    sock.unbind(endpoint)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                took = "; another process took the port?" if exc.errno == zmq.EADDRINUSE else ""
                raise ListenLost(
                    f"cannot listen on {endpoint} again after cutting every connection (a key was revoked): "
                    f"{exc.strerror}{took}"
                ) from exc
            time.sleep(0.01)


def _peer_name(fd: int) -> str:
    """The remote address of a socket libzmq just accepted, for the log only."""
    try:
        # A duplicate of the descriptor, so closing ours leaves libzmq's open;
        # socket() reads the address family from it (IPv4 or IPv6).
        with socket.socket(fileno=os.dup(fd)) as sock:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except OSError:
        # Gone already (a health check, a refused CURVE handshake): libzmq tells of an
        # accept only after it happened.
        return "an address it closed before it could be read"
