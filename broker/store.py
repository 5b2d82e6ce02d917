"""The embedded store: every room event, in SQLite (WAL), keyed by (room, seq).

Each loop pass's rows are committed in one transaction (by the loop, or by the
writer thread, which may merge several passes into one) and only then
acknowledged or published, so "acked" means "committed". The unique
(room, seq) key makes a reused ``seq`` impossible rather than merely
unlikely.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import logging
import os
import pwd
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from broker.core import SavedSession

log = logging.getLogger("zchat.broker")
#: Lines an operator must see whatever --log-level says, and that are no warning (see broker/cli.py).
lifecycle = logging.getLogger("zchat.broker.lifecycle")

DB_NAME = "zchat.sqlite3"
#: How long after a commit the WAL is copied back into the database (seconds).
#: Small and often beats large and rare: a checkpoint's writes and syncs stall the
#: commits running beside it on a real disk (not on tmpfs) for as long as they take.
#: Measured at 30% of capacity, 1 room x 1, five runs each (medians, every 0.1 s vs
#: every 0.5 s): delivery p99 3.1 vs 3.7 ms (durability full), 2.4 vs 3.5 ms (normal),
#: 7.8 vs 13.8 ms with 1 KiB texts; p50 unchanged. Then every 0.01 s against every
#: 0.1 s, 3 runs each (scratch points of bench.harness, durability full): p99 2.4-3.0
#: vs 4.1-5.1 ms at 26k msg/s; with 1 KiB texts, 4.4-6.9 vs 16.6-21.6 ms at 17k, and
#: 58.4-59.7k vs 52.2-56.5k msg/s delivered at 60k offered (fewer long commit stalls);
#: 78-85k vs 80-85k at 85k offered with 100 B texts. To measure again, change this and
#: run ``python -m bench --only fanout-1,fanout-1-1k --merge`` (its 30% points).
CHECKPOINT_S = 0.01
#: Past this many pages of WAL, a checkpoint that makes the WAL start over (see _restart_wal).
WAL_RESTART_FRAMES = 8192
#: At most one warning this often (seconds) that the WAL could not start over.
RESTART_WARN_S = 60.0
SCHEMA_VERSION = 2
#: With a retention, a room's old events are deleted this many at a time: a room
#: holds from ``retention`` to ``retention + PRUNE_STEP - 1`` events.
PRUNE_STEP = 64
#: With a maximum age, a commit (or an idle tick) deletes at most this many aged events,
#: looking at most AGE_SCAN_ROWS rows past the oldest: bounded work, even when a clock
#: set back left newer events before older ones.
AGE_STEP = 256
AGE_SCAN_ROWS = 4096
DAY_MS = 86_400_000

Durability = Literal["full", "normal"]

# A rowid table, its (room, seq) key a separate unique index. Version 1 was a
# WITHOUT ROWID table keyed by (room, seq): its rows live in an index b-tree,
# where a row over ~1,000 bytes spills into an overflow page of its own, so a
# 1 KiB text wrote 4-5 KiB of WAL (measured: 5.1 KB of WAL and 10-18 us per
# row in batches of 100, against 1.6 KB and 4.6 us here; the same at 100 B).
# A rowid table keeps rows of up to ~4 KB in place.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,  -- arrival order; nothing refers to it
    room    TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    name    TEXT,              -- author of a msg (NULL for presence)
    msg_id  TEXT,              -- the author's id of a msg, for resend detection
    body    BLOB    NOT NULL,  -- the envelope exactly as published
    UNIQUE (room, seq)
);
"""

# Where a room's last seq is kept once age retention may delete all its events: else a
# restart would number an emptied room from 1 again. Not part of the versioned schema:
# created by a broker run with --retention-days and read by every broker of this version
# (an older one ignores it, as it ignores any table but ``events``).
_ROOM_TOPS = "CREATE TABLE IF NOT EXISTS room_tops (room TEXT PRIMARY KEY, seq INTEGER NOT NULL)"
# The sessions a clean stop leaves for the next start (broker/core.py: Core.restore),
# read and deleted by that start. Not part of the versioned schema either: an older
# broker ignores it, and a start after a crash finds none. Only a SHA-256 of each
# resume token. A table of another shape is dropped, not read; one older than the
# store's newest event (a broker that ignores it ran since) is stale and not restored.
_SAVED_COLUMNS = ("name", "sender", "token_sha256", "host", "rooms", "key", "saved_at")
_SAVED_SESSIONS = (
    "CREATE TABLE IF NOT EXISTS saved_sessions (name TEXT PRIMARY KEY, sender TEXT NOT NULL, "
    "token_sha256 BLOB NOT NULL, host TEXT, rooms TEXT NOT NULL, key BLOB, saved_at INTEGER NOT NULL)"
)

#: Before aged events are deleted: the last seq of each of their rooms, kept.
_KEEP_TOPS = (
    "INSERT INTO room_tops (room, seq) SELECT room, MAX(seq) FROM events WHERE {where} GROUP BY room "
    "ON CONFLICT (room) DO UPDATE SET seq = MAX(seq, excluded.seq)"
)
#: The aged events one step deletes: the first ones in arrival order, within a bounded scan.
_AGED_STEP = "id IN (SELECT id FROM events WHERE id <= ? AND ts < ? ORDER BY id LIMIT ?)"

#: Version 1 to 2, in one transaction: the same rows, in the order they were stored.
_UPGRADE_FROM_1 = (
    "ALTER TABLE events RENAME TO events_v1",
    _SCHEMA,
    "INSERT INTO events (room, seq, ts, name, msg_id, body) "
    "SELECT room, seq, ts, name, msg_id, body FROM events_v1 ORDER BY ts, room, seq",
    "DROP TABLE events_v1",
)

#: One stored event: (room, seq, ts, name, msg_id, body).
Row = tuple[str, int, int, str | None, str | None, bytes]

#: Rows go in by multi-row INSERTs: one statement step per chunk rather than one
#: per row (executemany). Each step releases the GIL and must win it back from the
#: loop, and each has its own overhead: ``python -m bench.micro append`` measured
#: 1.5 against 2.5 us per row in commits of 300 rows, 2.6 against 3.4 in commits
#: of 30, the same in commits of 3. Chunks are of 1-16 rows or a power of two up
#: to 128, so the distinct statements stay few (19) and all stay prepared; 128 rows
#: are 768 values, under the 999 of the oldest SQLite a Python 3.11 may be built with.
_EXACT_UP_TO = 16
_MAX_CHUNK = 128
_INSERTS = {
    # Built from constants and placeholders only: the values are bound, never formatted in.
    n: "INSERT INTO events (room, seq, ts, name, msg_id, body) VALUES "  # noqa: S608
    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * n)
    for n in [*range(1, _EXACT_UP_TO + 1), *(1 << k for k in range(5, _MAX_CHUNK.bit_length()))]
}


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zchat``, else ``~/.local/share/zchat``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "zchat"


class StoreError(Exception):
    """The store cannot be opened or written; the broker must not go on acking."""


class Store:
    """``retention``: the events kept per room, newest first (None: all of them). Older
    ones are deleted when the store opens and then in each commit that passes them.
    ``max_age_ms``: events older than this (by their ``ts``) are deleted too: at open,
    then in each commit (AGE_STEP more than it stores) and, while nothing is written,
    by a commit of no rows, ``append([])``, which the broker makes when :meth:`aged_due`."""

    def __init__(
        self,
        data_dir: Path,
        durability: Durability = "full",
        retention: int | None = None,
        max_age_ms: int | None = None,
    ) -> None:
        if durability not in ("full", "normal"):  # anything else was once quietly "normal"
            raise ValueError(f"durability {durability!r}: full or normal")
        if retention is not None and retention < 1:
            raise ValueError(f"retention {retention}: at least 1 event per room, or None for all")
        if max_age_ms is not None and max_age_ms < 1:
            raise ValueError(f"max_age_ms {max_age_ms}: at least 1, or None for no limit")
        self.retention = retention
        self.max_age_ms = max_age_ms
        #: The first row in arrival order (``id``, ``ts``), while there is a maximum age.
        self._oldest: tuple[int, int] | None = None
        #: Per room, the seq up to which events have been deleted for the retention.
        self._pruned: dict[str, int] = {}
        lock: int | None = None
        try:
            if data_dir.exists() and not data_dir.is_dir():
                raise StoreError(f"cannot open the store in {data_dir}: it is not a directory")
        except OSError as exc:  # a parent this user may not enter
            raise StoreError(f"cannot open the store in {data_dir}: {exc}{_why(data_dir, exc)}") from exc
        #: Whether this open made the database file and its schema (see :meth:`discard`),
        #: and the files beside it that were there before it (never deleted).
        self._made_file = False
        self._created = False
        self._there_before: set[str] = set()
        try:
            # Room messages are in here: readable by this user only. A directory
            # that exists is not changed, but one others can read is warned about.
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _warn_if_open(data_dir)
            _warn_if_nearly_full(data_dir)
            # One broker per directory: a second would number the same rooms on its
            # own, and the first to commit a seq the other had used would stop.
            self._lock = lock = _lock_dir(data_dir)
            self.path = data_dir / DB_NAME
            self._there_before = {suffix for suffix in ("-wal", "-shm") if Path(f"{self.path}{suffix}").exists()}
            # SQLite would create it 0644 (then its -wal and -shm, which copy its mode).
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                self._made_file = True
            if not self._made_file and _size(self.path) == 0 and not _size(Path(f"{self.path}-wal")):
                # SQLite takes an empty file for a new database: a failed restore, a copy
                # that wrote nothing, would start the chat over with no word said.
                log.warning(
                    "%s is empty (0 bytes): a new store starts in it, with every room's seq from 1; "
                    "if it should hold the chat's history, stop the broker and restore it from a backup",
                    self.path,
                )
            # Autocommit mode: transactions are explicit, one per loop pass.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # full: fsync the WAL at each commit (survives power loss);
            # normal: survives a crash of the broker process, not of the OS.
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self._open_schema()
            # A store that cannot be written (a read-only file or mount, another uid's
            # volume, a full disk) stops the broker here, before "ready", rather than at
            # its first message (and a restart loop under compose). Setting the version
            # to itself writes and syncs a page like any commit.
            with self._immediate() as db:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                if max_age_ms is not None:
                    db.execute(_ROOM_TOPS)
            self._has_tops = bool(
                self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'room_tops'").fetchall()
            )
            if retention is not None:
                self._prune_all(retention)
            if max_age_ms is not None:
                self._prune_aged_all(max_age_ms)
            # Checkpoints (copying the WAL back into the database) run in a thread
            # of their own, on a connection of their own: run by the committing
            # connection, one stalled a commit, and every ack and publish behind
            # it, for ~20 ms every few MB written (measured: commit p99.9 20 ms
            # with automatic checkpoints, 0.4 ms without).
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._busy_timeout_ms = int(self._db.execute("PRAGMA busy_timeout").fetchone()[0])
            # History is read on a connection of its own: the loop's reads never
            # wait for, nor see the inside of, a transaction the writer has open.
            self._read = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            if lock is not None:
                os.close(lock)
            raise StoreError(f"cannot open the store in {data_dir}: {exc}{_why(data_dir, exc)}") from exc
        #: Commits so far.
        self.commits = 0
        #: Set by the checkpointer when the WAL has grown past WAL_RESTART_FRAMES: the next
        #: commit makes it start over (see _restart_wal).
        self._restart_due = False
        #: Seconds the last append waited (wall less CPU time) making the WAL start over:
        #: no sign of a slow disk (see Writer.append_now).
        self.restart_s = 0.0
        #: time.monotonic() of the last warning that the WAL could not start over.
        self._restart_warned = -RESTART_WARN_S
        #: Set by a commit, and to stop: the checkpointer sleeps on it while nothing is committed
        #: (an idle broker does not wake up every CHECKPOINT_S). Set at first, so the first turn
        #: copies back what an earlier run left in the WAL.
        self._dirty = threading.Event()
        self._dirty.set()
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="zchat-checkpoint", daemon=True)
        self._checkpointer.start()

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction at open (BEGIN IMMEDIATE): committed, or rolled back whatever failed."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _open_schema(self) -> None:
        """Create the table in a new store, upgrade an older one, refuse a newer one."""
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
        if version == 0 and has_table:
            # The first release created the table and then set the version, in two
            # steps: a crash between them left a version-1 table at version 0.
            columns = [row[1] for row in db.execute("PRAGMA table_info(events)")]
            if columns != ["room", "seq", "ts", "name", "msg_id", "body"]:
                raise StoreError(f"{self.path}: has an 'events' table but no zchat schema version; not a zchat store?")
            version = 1
        if version in (0, 1):
            # One transaction (user_version is part of it): a crash leaves the old store whole.
            steps = (_SCHEMA,) if version == 0 else _UPGRADE_FROM_1
            with self._immediate():
                for statement in steps:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._created = self._made_file and version == 0
            if version == 1:
                count = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                lifecycle.info("store %s upgraded from schema 1 to %d (%d events)", self.path, SCHEMA_VERSION, count)
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this broker knows {SCHEMA_VERSION}")

    def _prune_all(self, retention: int) -> None:
        """Delete what is past the retention in every room, in one transaction (at open:
        a store kept whole so far, or a retention made smaller, may have much to delete)."""
        deleted = 0
        with self._immediate() as db:
            for room, top in self.room_seqs().items():
                cutoff = top - retention
                if cutoff > 0:
                    deleted += db.execute("DELETE FROM events WHERE room = ? AND seq <= ?", (room, cutoff)).rowcount
                    self._pruned[room] = cutoff
        if deleted:
            lifecycle.info(
                "retention %d events per room: deleted %d older events from %s (the file keeps its size; "
                "the space is reused)",
                retention,
                deleted,
                self.path,
            )

    def _prune_aged_all(self, max_age_ms: int) -> None:
        """At open: delete every event older than ``max_age_ms`` (one scan of the table)."""
        with self._immediate() as db:
            cutoff = now_ms() - max_age_ms
            db.execute(_KEEP_TOPS.format(where="ts < ?"), (cutoff,))
            deleted = db.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
        self._oldest = self._first_row()
        if deleted:
            lifecycle.info(
                "retention %s: deleted %d events older than that from %s (the file keeps its size; "
                "the space is reused)",
                _age(max_age_ms),
                deleted,
                self.path,
            )

    def _first_row(self) -> tuple[int, int] | None:
        """``(id, ts)`` of the first row in arrival order: where deleting by age starts."""
        row: tuple[int, int] | None = self._db.execute("SELECT id, ts FROM events ORDER BY id LIMIT 1").fetchone()
        return row

    def describe(self) -> str:
        """Its path and what it keeps, for the broker's "ready" line."""
        kept = []
        if self.retention is not None:
            kept.append(f"the newest {self.retention} events of each room")
        if self.max_age_ms is not None:
            kept.append(f"events of the last {_age(self.max_age_ms)}")
        return f"{self.path} (keeping {' and '.join(kept) or 'every event'})"

    def aged_due(self, now: int) -> bool:
        """Whether the oldest event has passed the maximum age at ``now`` (ms; a plain read: any thread)."""
        oldest = self._oldest
        return oldest is not None and self.max_age_ms is not None and oldest[1] < now - self.max_age_ms

    def _checkpoint_loop(self) -> None:
        """CHECKPOINT_S after a commit, a PASSIVE checkpoint, which never blocks the writer.

        Under constant writes a passive checkpoint never catches up with the
        last frame, so the WAL is never restarted and would grow without end:
        past WAL_RESTART_FRAMES the writer is asked to make it start over
        (see _restart_wal).
        """
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA cache_size=-256")  # KiB: it copies pages, it need not keep them
        except sqlite3.Error as exc:
            log.error("checkpoints disabled: cannot open %s: %s", self.path, exc)
            return
        dirty, stop = self._dirty, self._stop
        stuck_at = -2  # what the last turn that was held back had copied
        try:
            # Wait for a commit, then CHECKPOINT_S more: the commits of that spell go in one turn.
            while dirty.wait() and not stop.wait(CHECKPOINT_S):
                dirty.clear()  # before copying: a commit from now on makes another turn
                try:
                    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > WAL_RESTART_FRAMES:
                        self._restart_due = True
                    if busy or copied != frames:
                        # Held back (a reader of an older snapshot, another checkpointer): the
                        # next turn goes on; while nothing moves, at most every 0.1 s.
                        dirty.set()
                        if copied == stuck_at:
                            stop.wait(0.1)
                        stuck_at = copied
                except sqlite3.Error as exc:
                    log.warning("checkpoint of %s failed (retried in 1 s): %s", self.path, exc)
                    dirty.set()
                    stop.wait(1.0)
        finally:
            db.close()

    def save_sessions(self, sessions: list[SavedSession]) -> None:
        """At a clean stop, with the writer idle: the live sessions, for the next start.
        They are stamped no earlier than the last event: the next start compares the two to
        tell whether another broker stored events since, and a clock set back while this
        one ran must not make its own events look later than its stop."""
        try:
            with self._immediate() as db:
                last = _last_event_ts(db)
                saved_at = now_ms() if last is None else max(now_ms(), last)
                db.execute("DROP TABLE IF EXISTS saved_sessions")
                db.execute(_SAVED_SESSIONS)
                db.executemany(
                    f"INSERT INTO saved_sessions ({', '.join(_SAVED_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    [(s.name, s.sender, s.token_sha256, s.host, "\n".join(s.rooms), s.key, saved_at) for s in sessions],
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to {self.path}: {exc}{_why(self.path.parent, exc)}") from exc

    def take_saved_sessions(self) -> list[SavedSession]:
        """At start: the sessions the last clean stop saved, deleted from the store as they
        are read (a later start after a crash must not restore them again)."""
        try:
            columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(saved_sessions)"))
            if not columns:
                return []
            with self._immediate() as db:
                rows = []
                if columns == _SAVED_COLUMNS:
                    rows = db.execute(f"SELECT {', '.join(_SAVED_COLUMNS)} FROM saved_sessions").fetchall()  # noqa: S608
                db.execute("DROP TABLE saved_sessions")
                last = _last_event_ts(db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {self.path}: {exc}{_why(self.path.parent, exc)}") from exc
        if columns != _SAVED_COLUMNS:
            log.warning("saved sessions in %s are not in this version's form: not restored", self.path)
            return []
        saved_at = max((row[-1] for row in rows if isinstance(row[-1], int)), default=0)
        if rows and last is not None and last > saved_at:
            log.warning(
                "the sessions saved in %s predate events stored since (another broker ran): not restored", self.path
            )
            return []
        saved = []
        for name, sender, digest, host, rooms, key, _at in rows:
            if not (isinstance(name, str) and isinstance(sender, str) and isinstance(digest, bytes)):
                continue  # not what this broker writes: no session rather than a wrong one
            if not (isinstance(rooms, str) and (host is None or isinstance(host, str))):
                continue
            if key is not None and not isinstance(key, bytes):
                continue
            saved.append(SavedSession(name, sender, digest, host, rooms.split("\n") if rooms else [], key))
        return saved

    def room_seqs(self) -> dict[str, int]:
        """The last ``seq`` of every room, so numbering continues after a restart."""
        try:
            rows = self._db.execute("SELECT room, MAX(seq) FROM events GROUP BY room")
            seqs = {room: seq for room, seq in rows}
            if self._has_tops:  # rooms whose events all aged away keep their numbering
                for room, seq in self._db.execute("SELECT room, seq FROM room_tops"):
                    seqs[room] = max(seq, seqs.get(room, 0))
        except sqlite3.Error as exc:  # a damaged page ("database disk image is malformed")
            raise StoreError(f"cannot read the store {self.path}: {exc}") from exc
        return seqs

    def recent_acks(self, limit: int) -> list[dict[str, Any]]:
        """The acks of the last ``limit`` messages, oldest first, with their author in ``from``.

        They seed the broker's resend detection, so a message resent across a
        broker restart is acknowledged again instead of stored twice.
        """
        try:
            return self._recent_acks(limit)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store {self.path}: {exc}") from exc

    def _recent_acks(self, limit: int) -> list[dict[str, Any]]:

        # Per room along the primary key (no extra index to slow every insert),
        # streamed through a heap of the newest ``limit``: memory stays bounded
        # by ``limit`` however many rooms there are.
        def rows_of(room: str) -> Iterator[tuple[int, int, str, str, str]]:
            for name, msg_id, seq, ts in self._db.execute(
                "SELECT name, msg_id, seq, ts FROM events WHERE room = ? AND msg_id IS NOT NULL "
                "ORDER BY seq DESC LIMIT ?",
                (room, limit),
            ):
                yield ts, seq, room, name, msg_id

        newest = heapq.nlargest(limit, itertools.chain.from_iterable(rows_of(room) for room in self.room_seqs()))
        newest.reverse()
        return [
            {"type": "ack", "from": name, "id": msg_id, "room": room, "seq": seq, "ts": ts}
            for ts, seq, room, name, msg_id in newest
        ]

    def append(self, rows: Iterable[Row]) -> None:
        """Commit rows in one transaction, or raise StoreError."""
        try:
            rows = rows if isinstance(rows, list) else list(rows)
            db, flat, at = self._db, itertools.chain.from_iterable, 0
            db.execute("BEGIN")
            while left := len(rows) - at:
                size = left if left <= _EXACT_UP_TO else min(_MAX_CHUNK, 1 << (left.bit_length() - 1))
                db.execute(_INSERTS[size], list(flat(rows[at : at + size])))
                at += size
            pruned = self._prune(rows) if self.retention is not None else None
            aged = self._prune_aged_step(len(rows)) if self.max_age_ms is not None else False
            db.execute("COMMIT")
            self.commits += 1
            if pruned:
                self._pruned.update(pruned)
            if aged or (self._oldest is None and self.max_age_ms is not None):
                self._oldest = self._first_row()
            if not self._dirty.is_set():  # a plain read; set() takes a lock
                self._dirty.set()
            if self._restart_due:
                self._restart_wal()
            elif self.restart_s:
                self.restart_s = 0.0
        except BaseException as exc:
            # Whatever failed (a bad row too), no transaction is left open for the next commit.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write to {self.path}: {exc}{_why(self.path.parent, exc)}") from exc
            raise

    def _restart_wal(self) -> None:
        """Right after a commit, on the committing connection: copy what the passive
        checkpoints left and make the WAL start over (a RESTART checkpoint).

        Run by the checkpointer, a RESTART holds the writer lock while it copies and
        syncs, and a commit that met it waited in SQLite's busy handler, which sleeps
        1, 2, 5, 10, ... 100 ms between tries. Every 32 MiB of WAL (1 KiB texts at 50k
        msg/s: twice a second) a commit stalled for 35 ms, at times 55 (Store.append
        alone, 50 rows of 1 KiB a commit, 1,000 commits a second; 200 rows a commit as
        fast as it goes: up to 940 ms). Run here, there is no writer to wait for: the
        commit after it waits for the copy and the sync alone, 1-20 ms. Delivery at
        30k msg/s of 1 KiB texts,
        1 room x 1 (scratch points of bench.harness, 3 runs each): p50 1.7-2.0 against
        2.4-2.7 ms, p99 10-16 against 17-22 ms. With no wait allowed, a checkpoint
        under way or a reader of an older snapshot makes it give up at once, and the
        checkpointer's next turn asks again. Not a commit: a failure is no StoreError."""
        self._restart_due = False
        db, started, cpu = self._db, time.perf_counter(), time.thread_time()
        try:
            db.execute("PRAGMA busy_timeout=0")
            try:
                # Held up, it returns (1, ...) rather than raising: only a real error raises.
                db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            if (now := time.monotonic()) - self._restart_warned >= RESTART_WARN_S:
                self._restart_warned = now
                log.warning("the WAL of %s could not start over (it grows until it can): %s", self.path, exc)
        self.restart_s = (time.perf_counter() - started) - (time.thread_time() - cpu)

    def _prune(self, rows: list[Row]) -> dict[str, int]:
        """In the open transaction: delete what these rows push past the retention.

        Per room, in steps of PRUNE_STEP events: one short range delete of adjacent
        rows along the (room, seq) index every PRUNE_STEP events, not one per commit.
        Returns the new cutoffs, to be kept once the transaction commits.
        """
        assert self.retention is not None
        tops: dict[str, int] = {}
        for row in rows:
            room, seq = row[0], row[1]
            if seq > tops.get(room, 0):
                tops[room] = seq
        done: dict[str, int] = {}
        for room, top in tops.items():
            cutoff, pruned = top - self.retention, self._pruned.get(room, 0)
            if cutoff - pruned >= PRUNE_STEP:
                self._db.execute("DELETE FROM events WHERE room = ? AND seq > ? AND seq <= ?", (room, pruned, cutoff))
                done[room] = cutoff
        return done

    def _prune_aged_step(self, stored: int) -> bool:
        """In the open transaction: delete up to AGE_STEP aged events more than the commit
        stores (so deleting keeps up with any rate), oldest first. Rows are in arrival
        order by ``id``, and so (clocks aside) by ``ts``: the aged ones lead."""
        assert self.max_age_ms is not None
        oldest, cutoff = self._oldest, now_ms() - self.max_age_ms
        if oldest is None or oldest[1] >= cutoff:
            return False
        step = (oldest[0] + AGE_SCAN_ROWS + stored, cutoff, AGE_STEP + stored)
        self._db.execute(_KEEP_TOPS.format(where=_AGED_STEP), step)
        self._db.execute(f"DELETE FROM events WHERE {_AGED_STEP}", step)  # noqa: S608 (constants only)
        return True

    def history(self, room: str, after: int, limit: int, upto: int | None = None) -> list[bytes]:
        """Bodies of the committed events of ``room`` with ``after < seq <= upto``, oldest first."""
        try:
            rows = self._read.execute(
                "SELECT body FROM events WHERE room = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (room, after, (1 << 63) - 1 if upto is None else upto, limit),
            )
            return [body for (body,) in rows]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc

    def close(self) -> None:
        self._close_connections(truncate_wal=True)
        os.close(self._lock)  # and with it the lock

    def _close_connections(self, *, truncate_wal: bool) -> None:
        """Stop the checkpointer and close the database connections (not the lock)."""
        self._stop.set()
        self._dirty.set()  # wakes an idle checkpointer to see the stop
        self._checkpointer.join(timeout=10)
        if truncate_wal:
            with contextlib.suppress(sqlite3.Error):
                # Leave a small WAL behind: the next start reads less.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._read.close()
        self._db.close()

    def discard(self) -> None:
        """Close, for a broker that never served (it could not listen): a store whose file
        this open created, and nothing was written to, is deleted; any other is closed as
        it is. The files go while the directory's lock is held, so no other broker can
        have opened them. The directory stays (removing it would race a broker that has
        just opened it to take the lock)."""
        if not self._created or self.commits:
            self.close()
            return
        self._close_connections(truncate_wal=False)
        for suffix in ("", "-wal", "-shm"):
            if suffix not in self._there_before:
                try:
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not delete the empty store's %s%s: %s", self.path, suffix, exc)
        os.close(self._lock)


def _size(path: Path) -> int | None:
    """The size of the file at ``path`` in bytes, or None where there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _last_event_ts(db: sqlite3.Connection) -> int | None:
    """The ``ts`` of the newest event stored (None: none, or not an int)."""
    row = db.execute("SELECT ts FROM events ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row is not None and isinstance(row[0], int) else None


def now_ms() -> int:
    """The wall clock in ms: what events' ``ts`` are stamped with."""
    return time.time_ns() // 1_000_000


def _age(ms: int) -> str:
    """A maximum age as an operator gave it: days, or less."""
    if ms >= DAY_MS:
        days = ms / DAY_MS
        return f"{days:g} day{'' if days == 1 else 's'}"
    if ms >= 3_600_000:
        hours = ms / 3_600_000
        return f"{hours:g} hour{'' if hours == 1 else 's'}"
    return f"{ms / 1000:g} s"


def runs_as() -> str:
    """Who this process is, for a message about a file it may not use: 'zchat (uid 998)'."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


#: Free space under which a failure of the store is said to be likely the disk's being full:
#: SQLite says "disk I/O error" for a file it could not even create on a full file system.
LOW_SPACE_BYTES = 1 << 20


def _why(data_dir: Path, exc: BaseException) -> str:
    """What an operator needs beside SQLite's or the OS's words for a store that failed:
    the user the broker runs as, for a file or directory it may not use, and the free
    space left. Empty when nothing of that applies, or it cannot be found out."""
    hints = []
    denied = isinstance(exc, PermissionError) or "readonly" in str(exc) or "unable to open" in str(exc)
    if _on_read_only_mount(data_dir):
        # Not the modes: access() refuses every write there, and the owner and mode said
        # instead ("owner uid 998, mode 700 ... is not usable by zchat (uid 998)") blamed
        # what was right. Under systemd, ProtectSystem=strict makes such a mount of every
        # directory not in ReadWritePaths= (or StateDirectory=).
        return (
            f" ({data_dir} is on a read-only mount: a disk remounted read-only after errors, say, or under "
            "systemd ProtectSystem=strict without ReadWritePaths= for it)"
        )
    for path in (data_dir, data_dir / DB_NAME, Path(f"{data_dir / DB_NAME}-wal"), Path(f"{data_dir / DB_NAME}-shm")):
        try:
            st = path.stat()
        except OSError:
            continue
        want = os.R_OK | os.W_OK | (os.X_OK if path == data_dir else 0)
        if not os.access(path, want):
            denied = False  # named here: no need for the general hint
            hints.append(f"{path} (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}) is not usable by {runs_as()}")
    if denied and os.geteuid() != 0:  # root is refused by a read-only mount, not by modes
        hints.append(f"the broker runs as {runs_as()}")
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(data_dir).free
        if free < LOW_SPACE_BYTES:
            hints.append(f"{free} bytes free on its file system")
    return f" ({'; '.join(hints)})" if hints else ""


def _on_read_only_mount(path: Path) -> bool:
    """Whether ``path``, or the nearest directory above it that exists, is on a mount that
    is read-only."""
    for candidate in (path, *path.parents):
        try:
            return bool(os.statvfs(candidate).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


#: Free space under which the broker warns at start: it stops when the disk is full.
LOW_SPACE_WARN_BYTES = 64 << 20


def _warn_if_nearly_full(data_dir: Path) -> None:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(data_dir).free
        if free < LOW_SPACE_WARN_BYTES:
            log.warning(
                "only %.1f MiB free on the file system of %s: under --min-free the broker refuses room "
                "messages, and it stops (so that nothing unstored is acknowledged) when the disk is full; "
                "free some space, or set a retention",
                free / (1 << 20),
                data_dir,
            )


def _warn_if_open(data_dir: Path) -> None:
    mode = data_dir.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "data directory %s has mode %o: other users of this machine may read the room messages "
            "stored in it; chmod 700 it (a new one is created 700)",
            data_dir,
            mode,
        )


def _lock_dir(data_dir: Path) -> int:
    """Lock the directory itself, or raise StoreError if another broker has it.

    flock on the directory's own descriptor: no lock file to be owned by another
    user (a container's uid) or left behind, and the OS releases the lock when the
    process ends, however it ends.
    """
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{data_dir} is in use by another zchat-broker; give each broker its own --data") from None
    return fd
