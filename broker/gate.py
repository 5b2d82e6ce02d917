"""Who may finish a handshake, and how fast: the broker's ZAP handler (RFC 27).

libzmq asks the ZAP handler of its context about each new connection of a socket
that has a ZAP domain. The broker's request socket has one whenever this gate
paces connections (``--connect-rate``, on by default) or checks keys; its
room-event socket only with ``--keys``. The gate:

- with ``--keys``, accepts exactly the authorized CURVE keys and names each
  connection after its user: the ZeroMQ ``User-Id`` of its messages, which the
  broker trusts for who is speaking;
- paces new request connections per host (an IPv4 address, an IPv6 /64): a burst,
  then ``rate`` a second. A handshake over that waits for its turn (its reply is
  held back; the client sees a slower connect, nothing else); one that finds a
  full queue of its host's, more than could be answered before libzmq gives the
  handshake up, is refused.

Why pace: libzmq 4.3 aborts the process when the routing id it makes up for a
peer that brings none (a counter) is one that another peer chose. A peer that
holds K chosen ids and opens anonymous connections, each moving the counter by
one, meets one within 2^32/K of them: minutes at the thousands of handshakes a
second one host can make, hours at 20 a second (docs/security.md).

The gate runs on its own thread with its own ROUTER socket (a REP socket could
not hold one reply back while it answers the next). The loop swaps ``users`` and
``revoked`` whole on a reload; the thread only reads them.

libzmq keeps the pipe a connection asked its ZAP question on for as long as the
connection lives, though it never asks again: about 10 KiB a connection (1,000
idle clients: 57 KiB each without a gate, 67 with it). So once the gate has been
quiet for a while, it binds a new socket and closes the old one, which ends
those pipes (connections stay up; one still waiting for its turn, or a question
still on its way, is answered on the old socket first): see :meth:`Gate._recycle`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import zmq
import zmq.utils.z85

from broker.core import Bucket, LogBudget, host_of

log = logging.getLogger("zchat.broker")

#: Where libzmq sends its ZAP requests (RFC 27); one handler per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: The request socket's ZAP domain: its handshakes are paced.
REQUEST_DOMAIN = b"zchat"
#: The room-event socket's (with --keys only): checked, not paced.
EVENTS_DOMAIN = b"zchat-events"
#: libzmq's handshake timeout (ZMQ_HANDSHAKE_IVL, 30 s by default on both ends):
#: a reply held longer than this finds its connection gone.
HANDSHAKE_S = 30.0
HANDSHAKE_MS = int(HANDSHAKE_S * 1000)
#: A refused client knocks on both ports at each try: the same key from the same
#: address within this many seconds is the same try, logged once.
REFUSAL_REPEAT_S = 1.0
#: Hosts whose buckets are full and who wait for nothing are forgotten this often (ms).
PRUNE_MS = 10_000
#: How long the thread sleeps at most with nothing to do (s): how long a stop waits.
IDLE_S = 0.1
#: The socket is recycled (see the module's docstring) once no question has come for
#: this long (ms) after some did, or once this many were answered on it, whichever first.
RECYCLE_QUIET_MS = 1_000
RECYCLE_AFTER = 1_000
#: A recycled socket is closed once nothing waits on it and this long (ms) has passed:
#: a question libzmq had sent it just before (it picks the socket at the handshake's
#: start) is answered there.
RETIRE_MS = 1_000

#: ZAP status codes (RFC 27): 400 is a failed authentication (a key), 500 the gate's
#: own refusal (its queue, or a failure of its own): a client tells them apart by the
#: code its handshake failure carries. (300, temporary, would leave the handshake
#: hanging until libzmq's timeout: libzmq sends no ERROR for it.)
_OK, _REFUSED, _TURNED_AWAY = b"200", b"400", b"500"


class GateError(Exception):
    """The gate's thread could not make its socket; the message says why."""


#: A waiting handshake: when it came (ms), the ZAP reply's envelope and request id, the
#: User-Id to give, and the socket it asked on (the reply goes there).
_Waiting = tuple[int, list[bytes], bytes, zmq.Socket[bytes]]


def _monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


def _envelope(frames: list[bytes]) -> list[bytes]:
    """The head of the reply to a request: [peer, b"", version, request id]."""
    return [frames[0], b"", frames[2], frames[3]]


class Gate:
    """The ZAP handler thread: keys (optional) and the pace of new connections."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        users: dict[bytes, str] | None,
        rate: float,
        burst: int,
    ) -> None:
        """``users``: z85 public key -> name with --keys, None without (NULL security);
        ``rate``: new request connections a second per host, 0 for no pacing."""
        self.users = users
        #: Keys that reloads took away, and whose they were: a refusal names the user.
        self.revoked: dict[bytes, str] = {}
        self.rate = rate
        self.burst = max(1, burst)
        #: Handshakes one host may have waiting: more could not be answered before libzmq
        #: gives them up (they would time out unanswered, and their clients take that for
        #: a network fault, not for being turned away).
        self.max_waiting = max(1, int(rate * HANDSHAKE_S))
        self._ctx = ctx
        #: Each host's bucket of turns. (Its waiting handshakes are in ``_waiting``: an
        #: empty deque is 760 bytes, and every host that connects gets a bucket.)
        self._hosts: dict[str, Bucket] = {}
        #: The handshakes waiting for their turn, of the hosts that have some.
        self._waiting: dict[str, deque[_Waiting]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_failed: BaseException | None = None
        self._refused_lines = LogBudget("refused CURVE keys")
        self._paced_lines = LogBudget("paced connection lines")
        self._last_refusal: tuple[bytes, str, float] = (b"", "", 0.0)
        self._pruned_at = _monotonic_ms()
        #: How many handshakes waited for their turn, and how many were refused for it.
        self.paced = 0
        self.turned_away = 0
        #: Questions answered on the current socket, when the last one came (ms), and
        #: how many times the socket was recycled.
        self._asked = 0
        self._asked_at = 0
        self.recycles = 0
        #: The socket before the last recycle, while something may still be answered on
        #: it: since when (ms), and how many handshakes wait for their turn on it.
        self._retired: zmq.Socket[bytes] | None = None
        self._retired_at = 0
        self._retired_held = 0
        self._thread = threading.Thread(target=self._run, name="zchat-zap", daemon=True)

    def start(self) -> None:
        """Start the thread; it handles requests once this returns. GateError if it could
        not make its socket (the open-file limit, ``ZAP_ENDPOINT`` taken in this context)."""
        self._thread.start()
        self._ready.wait()
        if self._start_failed is not None:
            self._thread.join()
            raise GateError(f"cannot start the connection gate: {self._start_failed}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    # ------------------------------------------------------------ thread

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A reply to a handshake that is gone fails (EHOSTUNREACH), rather than
        # vanish: a held one whose client went away does not spend its host's turn.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        return sock

    def _run(self) -> None:
        try:
            sock = self._socket()
            try:
                sock.bind(ZAP_ENDPOINT)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
        except zmq.ZMQError as exc:
            self._start_failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            while not self._stop.is_set():
                now = _monotonic_ms()
                wait = self._release(now)
                if self._retired is not None and now - self._retired_at >= RETIRE_MS and not self._retired_held:
                    self._read(self._retired)  # a question that came at the last moment is answered, not dropped
                    if not self._retired_held:
                        poller.unregister(self._retired)
                        self._retired.close(linger=0)
                        self._retired = None
                if self._retired is None and self._recycle_due(now):
                    fresh = self._recycle(sock, now)  # retires sock (self._retired)
                    if fresh is not None:
                        sock = fresh
                        poller.register(sock, zmq.POLLIN)
                ready = dict(poller.poll(int(wait * 1000) + 1))
                for ready_sock in (self._retired, sock):
                    if ready_sock is not None and ready_sock in ready:
                        self._read(ready_sock)
        finally:
            sock.close(linger=0)
            if self._retired is not None:
                self._retired.close(linger=0)

    def _read(self, sock: zmq.Socket[bytes]) -> None:
        """Every request that is there (the waiting ones' turns come after)."""
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = _monotonic_ms()
            self._asked += 1
            self._asked_at = now
            try:
                self._handle(sock, frames, now)
            except Exception:
                # The thread must go on: without it no handshake ends (the
                # sockets enforce their ZAP domain). This one is refused.
                log.exception("the connection gate failed on a handshake; it is refused")
                if len(frames) >= 4:
                    self._reply(sock, _envelope(frames), _TURNED_AWAY, b"internal error")

    def _recycle_due(self, now: int) -> bool:
        return self._asked > 0 and (now - self._asked_at >= RECYCLE_QUIET_MS or self._asked >= RECYCLE_AFTER)

    def _recycle(self, sock: zmq.Socket[bytes], now: int) -> zmq.Socket[bytes] | None:
        """A new socket on ZAP_ENDPOINT in place of ``sock``, which is retired: closed once
        nothing more can be answered on it, which ends the pipes of the connections that
        asked it, and their memory. None if none could be made (the open-file limit):
        ``sock`` serves on, and it is tried again after another quiet spell.

        The endpoint moves from one socket to the other between two calls (an inproc unbind
        and bind take effect when they return; libzmq cannot swap them in one): for those
        microseconds there is none, and a handshake that starts then is cut short (the
        sockets enforce their domain: refused, never let in unchecked). Measured with the
        recycle made continuous: 5.7 us median, 40 us p99; 44 of 31,135 handshakes cut at
        3,000 a second, ~1 in 50 recycles. The client's libzmq tries again, and client.lib
        does not take one cut CURVE handshake for a wrong broker key (CURVE_CUTS_BEFORE_BLAME).
        """
        try:
            fresh = self._socket()
        except zmq.ZMQError as exc:
            log.debug("the connection gate keeps its socket for now: %s", exc)
            self._asked_at = now
            return None
        sock.unbind(ZAP_ENDPOINT)
        try:
            fresh.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.bind(ZAP_ENDPOINT)
            fresh.close(linger=0)
            log.warning("the connection gate keeps its socket: %s", exc)
            self._asked_at = now
            return None
        log.debug("the connection gate answers on a new socket: %d questions' pipes end with the old one", self._asked)
        self._asked = 0
        self.recycles += 1
        self._retired, self._retired_at = sock, now
        self._retired_held = sum(len(waiting) for waiting in self._waiting.values())  # all asked on it
        return fresh

    def _handle(self, sock: zmq.Socket[bytes], frames: list[bytes], now: int) -> None:
        # [peer, b"", version, request id, domain, address, identity, mechanism, credentials...]
        if len(frames) < 8 or frames[1] != b"":
            return  # not from libzmq: nothing to answer
        envelope = _envelope(frames)
        domain, address, mechanism, credentials = frames[4], frames[5].decode("utf-8", "replace"), frames[7], frames[8:]
        user = b""
        if self.users is not None:
            if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
                self._reply(sock, envelope, _REFUSED, b"CURVE keys required")
                return
            key = zmq.utils.z85.encode(credentials[0])
            name = self.users.get(key)
            if name is None:
                self._log_refusal(key, address)
                self._reply(sock, envelope, _REFUSED, b"key not authorized")
                return
            user = name.encode()
        if domain != REQUEST_DOMAIN or self.rate <= 0:
            self._reply(sock, envelope, _OK, b"OK", user)
            return
        host = host_of(address)
        bucket = self._bucket(host, now)
        waiting = self._waiting.get(host)
        if not waiting and bucket.refill(now, self.rate, self.burst) >= 1:
            if self._reply(sock, envelope, _OK, b"OK", user):
                bucket.tokens -= 1
            return
        if waiting is not None and len(waiting) >= self.max_waiting:
            self.turned_away += 1
            if self._paced_lines.allow(int(time.time())):
                log.warning(
                    "turned a connection from %s away: %d of its connections wait for their turn (--connect-rate %g)",
                    address,
                    len(waiting),
                    self.rate,
                )
            self._reply(sock, envelope, _TURNED_AWAY, b"too many new connections from this address")
            return
        if not waiting and self._paced_lines.allow(int(time.time())):
            log.warning(
                "new connections from %s come faster than --connect-rate %g a second: they wait for their turn",
                host,
                self.rate,
            )
        self.paced += 1
        if waiting is None:
            waiting = self._waiting[host] = deque()
        waiting.append((now, envelope, user, sock))
        if sock is self._retired:
            self._retired_held += 1

    def _bucket(self, host: str, now: int) -> Bucket:
        bucket = self._hosts.get(host)
        if bucket is None:
            bucket = self._hosts[host] = Bucket(tokens=float(self.burst), stamp=now)
        return bucket

    def _release(self, now: int) -> float:
        """Answer the waiting handshakes whose turn came; how long until the next one's (s)."""
        wait = IDLE_S
        for host, waiting in list(self._waiting.items()):
            bucket = self._bucket(host, now)
            bucket.refill(now, self.rate, self.burst)
            while waiting:
                came, envelope, user, sock = waiting[0]
                expired = now - came >= HANDSHAKE_MS  # libzmq gave it up: no token spent on it
                if not expired and bucket.tokens < 1:
                    break
                waiting.popleft()
                if sock is self._retired:
                    self._retired_held -= 1
                if not expired and self._reply(sock, envelope, _OK, b"OK", user):
                    bucket.tokens -= 1
            if waiting:
                wait = min(wait, (1 - bucket.tokens) / self.rate)
            else:
                del self._waiting[host]
        if now - self._pruned_at >= PRUNE_MS:
            self._pruned_at = now
            for host in [h for h in self._hosts if h not in self._waiting]:
                if self._hosts[host].refill(now, self.rate, self.burst) >= self.burst:
                    del self._hosts[host]
        return max(0.0, wait)

    @staticmethod
    def _reply(sock: zmq.Socket[bytes], envelope: list[bytes], code: bytes, text: bytes, user: bytes = b"") -> bool:
        """Whether the reply went out: not when the connection that asked is gone."""
        try:
            sock.send_multipart([*envelope, code, text, user, b""], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _log_refusal(self, key: bytes, address: str) -> None:
        now = time.monotonic()
        last_key, last_address, logged_at = self._last_refusal
        if key == last_key and address == last_address and now - logged_at < REFUSAL_REPEAT_S:
            return  # the same try on the other port (a knock repeated later is a line again)
        # Anyone can make a key and knock: at most LOG_LINES_PER_S lines a second of it.
        if not self._refused_lines.allow(int(time.time())):
            return
        self._last_refusal = (key, address, now)
        if (name := self.revoked.get(key)) is not None:
            log.warning("refused the CURVE key of %s from %s: it was revoked", name, address)
        else:
            shown = key.decode("ascii", "replace")
            log.warning("refused a CURVE key that is not authorized, from %s: %s", address, shown)
