"""The embedded store: every room event, in SQLite (WAL), keyed by (room, seq).

The loop appends everything one pass produced in a single transaction and only
then acknowledges or publishes it, so "acked" means "committed". The primary
key makes a reused ``seq`` impossible rather than merely unlikely.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

DB_NAME = "zchat.sqlite3"
SCHEMA_VERSION = 1

Durability = Literal["full", "normal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    room    TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    name    TEXT,              -- author of a msg (NULL for presence)
    msg_id  TEXT,              -- the author's id of a msg, for resend detection
    body    BLOB    NOT NULL,  -- the envelope exactly as published
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
"""

#: One stored event: (room, seq, ts, name, msg_id, body).
Row = tuple[str, int, int, str | None, str | None, bytes]


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zchat``, else ``~/.local/share/zchat``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "zchat"


class StoreError(Exception):
    """The store cannot be opened or written; the broker must not go on acking."""


class Store:
    def __init__(self, data_dir: Path, durability: Durability = "full") -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.path = data_dir / DB_NAME
            # Autocommit mode: transactions are explicit, one per loop pass.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # full: fsync the WAL at each commit (survives power loss);
            # normal: survives a crash of the broker process, not of the OS.
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version}, this broker knows {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {data_dir}: {exc}") from exc

    def room_seqs(self) -> dict[str, int]:
        """The last ``seq`` of every room, so numbering continues after a restart."""
        rows = self._db.execute("SELECT room, MAX(seq) FROM events GROUP BY room")
        return {room: seq for room, seq in rows}

    def recent_acks(self, limit: int) -> list[dict[str, Any]]:
        """The acks of the last ``limit`` messages, oldest first, with their author in ``from``.

        They seed the broker's resend detection, so a message resent across a
        broker restart is acknowledged again instead of stored twice.
        """

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
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO events (room, seq, ts, name, msg_id, body) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"cannot write to {self.path}: {exc}") from exc

    def history(self, room: str, after: int, limit: int) -> list[bytes]:
        """Bodies of the events of ``room`` with ``seq > after``, oldest first."""
        rows = self._db.execute(
            "SELECT body FROM events WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?", (room, after, limit)
        )
        return [body for (body,) in rows]

    def close(self) -> None:
        self._db.close()
