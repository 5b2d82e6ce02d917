"""Store commits on a thread of their own, so the loop reads on while a slow disk syncs.

With ``--durability full`` a commit waits for fsync: done in the loop, every
request behind it waits too. On a quick disk that costs less than handing the
rows to another thread and back (see ``SLOW_DISK_WAIT_S`` in broker/server.py),
so the loop commits itself (:meth:`Writer.append_now`, which says how long the
commit waited) until a commit waits too long. Then the loop hands each pass's
rows over with :meth:`Writer.submit` and keeps the pass's replies and publishes
until the thread says its rows are durable; the thread commits everything that
waits in one transaction (a group commit that grows with the load) and reports
the last ticket it made durable on an inproc PAIR socket that the loop polls.

Each socket belongs to one thread: the loop's end of the PAIR is created and
used by the loop, the writer's end is created and used by the writer thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time

import zmq

from broker.store import Row, Store, StoreError

log = logging.getLogger("zchat.broker")

_ids = itertools.count(1)

#: A failed commit is reported as this prefix and the error text.
_FAILED = b"!"

#: Linux's scheduler statistics of the thread that opens it: CPU time, time spent
#: runnable but waiting for a CPU, time slices (nanoseconds, nanoseconds, count).
_SCHEDSTAT = "/proc/thread-self/schedstat"


class RunQueueClock:
    """Seconds the calling thread has waited for a CPU while runnable, where Linux says (else None).

    A commit's wall time less its CPU time is mostly the disk's fsync, but on a
    busy machine it also holds the time the thread was ready and not scheduled:
    that is no reason to think the disk slow. One read is about 1 us. Use it on
    one thread only: the file describes the thread that opened it.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._broken = False

    def __call__(self) -> float | None:
        if self._broken:
            return None
        try:
            if self._fd is None:
                self._fd = os.open(_SCHEDSTAT, os.O_RDONLY)
            return int(os.pread(self._fd, 64, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            self._broken = True  # not Linux, or a kernel without schedstats: wall less CPU it is
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Writer:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], store: Store) -> None:
        self._ctx = ctx
        self._store = store
        self._endpoint = f"inproc://zchat-writer-{next(_ids)}"
        #: The loop's end: readable when a commit is done.
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(self._endpoint)
        self._queue: queue.SimpleQueue[tuple[int, list[Row]] | None] = queue.SimpleQueue()
        #: The last ticket handed out (tickets count up from 1), and the last one known durable.
        self.submitted = 0
        self.durable = 0
        #: Opened by the first append_now, on the loop's thread, which alone calls it.
        self._run_queue = RunQueueClock()
        #: Set by the thread once its end of the PAIR is connected, or it could not be.
        self._started = threading.Event()
        self._start_failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zchat-writer", daemon=True)
        self._thread.start()
        # A thread that cannot make its socket (the open-file limit) would leave a broker
        # that says it is ready and never acknowledges a message: the start fails instead.
        self._started.wait()
        if self._start_failed is not None:
            self._thread.join()
            self.sock.close(linger=0)
            raise StoreError(f"cannot start the store writer: {self._start_failed}")

    # -------------------------------------------------------- loop's side

    def submit(self, rows: list[Row]) -> int:
        """Queue rows for the next commit; their ticket is durable once :attr:`durable` reaches it."""
        self.submitted += 1
        self._queue.put((self.submitted, rows))
        return self.submitted

    def append_now(self, rows: list[Row]) -> float:
        """Commit on the caller's thread; only while nothing submitted is still in flight.

        Returns the seconds the commit waited rather than ran: its wall time
        less the thread's CPU time and less the time it waited for a CPU. What
        is left is mostly the disk's fsync.

        The thread touches the store's connection only inside a commit, and
        reports a ticket after that commit returns: with every ticket durable,
        the connection is the caller's for this call.
        """
        if self.durable != self.submitted:
            raise RuntimeError("append_now while commits are in flight")
        run_queue = self._run_queue
        wall, cpu, queued = time.perf_counter(), time.thread_time(), run_queue()
        self._store.append(rows)
        # Making the WAL start over (every 32 MiB of it) copies and syncs: a wait that
        # says nothing of the disk's pace, and that the writer thread would not spare.
        waited = (time.perf_counter() - wall) - (time.thread_time() - cpu) - self._store.restart_s
        if queued is not None and (queued_after := run_queue()) is not None:
            waited -= queued_after - queued
        return waited

    @property
    def behind(self) -> int:
        """Tickets submitted and not yet known durable."""
        return self.submitted - self.durable

    def read(self) -> int:
        """Take in the thread's reports (call when :attr:`sock` is readable): the last durable ticket.

        Raises StoreError if a commit failed: the broker must stop rather than
        acknowledge what it could not store.
        """
        while True:
            try:
                report = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.durable
            if report.startswith(_FAILED):
                raise StoreError(report[1:].decode("utf-8", "replace"))
            self.durable = max(self.durable, int(report))

    def wait_all(self, timeout: float) -> int:
        """Block until every submitted ticket is durable (shutdown); the last durable ticket."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        remaining_ms = int(timeout * 1000)
        while self.durable < self.submitted and remaining_ms > 0:
            if poller.poll(min(remaining_ms, 100)):
                self.read()
            remaining_ms -= 100
        return self.durable

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread once it has committed what it was given, then close the loop's end.

        False if the thread is still in a commit after ``timeout`` (its socket is then still open).
        """
        self._queue.put(None)
        self._thread.join(timeout)
        self.sock.close(linger=0)
        self._run_queue.close()
        if self._thread.is_alive():
            log.error("the store writer did not stop within %.0f s", timeout)
            return False
        return True

    # ------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.PAIR)
        except zmq.ZMQError as exc:
            self._start_failed = exc
            return
        finally:
            self._started.set()
        sock.setsockopt(zmq.LINGER, 0)
        # Reports are a few bytes, and one must never block this thread.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self._endpoint)
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is None:
                    return
                ticket, rows = item
                batch = list(rows)
                # Everything that queued up while the last commit synced goes in this one.
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    ticket, rows = more
                    batch.extend(rows)
                try:
                    self._store.append(batch)
                except BaseException as exc:
                    # Whatever it is (a StoreError, or a bug of ours), the loop must
                    # hear it and stop: a silent death would wedge the broker.
                    if not isinstance(exc, StoreError):
                        log.exception("store writer failed")
                    sock.send(_FAILED + str(exc).encode())
                    return
                sock.send(str(ticket).encode())
        finally:
            sock.close()
