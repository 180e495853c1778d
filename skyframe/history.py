"""The durable history of what happened to each file: ``<state_dir>/history.db`` (SQLite).

The engine records every lifecycle event except ``progress`` and ``unchanged`` (a rejection is
recorded once per file and rule, not at every rescan nor at every start). Writes are batched by
a thread of their own, so recording costs a transfer nothing but an append. Old events go after
``retention`` and beyond ``max_events``. ``skyframe history`` and ``GET /api/history`` read it,
with or without a daemon running.
"""

from __future__ import annotations

import collections
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from skyframe.errors import StateError
from skyframe.events import LifecycleEvent

log = logging.getLogger(__name__)

HISTORY_FILE = "history.db"
NOT_RECORDED = frozenset({"progress", "unchanged"})
FAILURE_KINDS = ("failed", "dead-lettered")
FLUSH_INTERVAL = 0.5  #: seconds between two batched writes
PRUNE_INTERVAL = 60.0  #: seconds between two prunes
BUFFER_LIMIT = 100_000  #: events waiting for the writer before the oldest are dropped
REJECTIONS_REMEMBERED = 100_000  #: files whose last rejection is remembered (to record it once)
WARN_INTERVAL = 60.0  #: seconds between two warnings about the same trouble

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    relpath TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_file ON events (pipeline, relpath);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, id);
"""


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    else:
        db = sqlite3.connect(path, timeout=10, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
    return db


class History:
    """The history database of one state directory: the daemon writes, anyone reads."""

    def __init__(
        self,
        state_dir: Path,
        *,
        retention: float = 30 * 86400.0,
        max_events: int = 500_000,
        writer: bool = True,
    ) -> None:
        self.path = state_dir / HISTORY_FILE
        self.retention = retention
        self.max_events = max_events
        try:
            self._db = _connect(self.path, read_only=not writer)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the history {self.path}: {exc}") from exc
        self._db_lock = threading.Lock()
        self._buffer: collections.deque[LifecycleEvent] = collections.deque(maxlen=BUFFER_LIMIT)
        self._rejections: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._pruned_at = 0.0
        self.dropped = 0  #: events lost because the database could not keep up
        self._warned_at = -WARN_INTERVAL
        self._thread: threading.Thread | None = None
        if writer:
            self._thread = threading.Thread(
                target=self._writer, name="skyframe-history", daemon=True
            )
            self._thread.start()

    # --- writing -----------------------------------------------------------------------------

    def record(self, event: LifecycleEvent) -> None:
        """Keep the event (written within half a second); never blocks on the database."""
        if event.kind in NOT_RECORDED:
            return
        with self._cond:
            if self._closed:
                return
            key = (event.pipeline, event.relpath)
            if event.kind == "rejected":
                if self._rejections.get(key) == event.rule:
                    return  # rejected again by the same rule at a rescan: nothing new
                self._rejections[key] = event.rule or ""
                if len(self._rejections) > REJECTIONS_REMEMBERED:
                    self._rejections.popitem(last=False)
            elif key in self._rejections:
                del self._rejections[key]
            if len(self._buffer) == self._buffer.maxlen:
                self.dropped += 1  # the deque drops the oldest
                self._warn(f"the history is falling behind: {self.dropped} event(s) lost")
            self._buffer.append(event)

    def _writer(self) -> None:
        while True:
            with self._cond:
                if not self._closed:
                    self._cond.wait(FLUSH_INTERVAL)
                closed = self._closed
            try:
                self.flush()
                if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL:
                    self.prune()
            except sqlite3.Error as exc:
                self._warn(f"cannot write the history in {self.path}: {exc}; trying again")
            if closed:
                return

    def flush(self) -> None:
        """Write every event recorded so far."""
        with self._db_lock:
            with self._cond:
                events = list(self._buffer)
                self._buffer.clear()
            events = [e for e in events if not self._rejected_before(e)]
            if not events:
                return
            rows = [
                (e.time, e.kind, e.pipeline, e.relpath, json.dumps(e.to_json())) for e in events
            ]
            try:
                with self._db:
                    self._db.executemany(
                        "INSERT INTO events (time, kind, pipeline, relpath, data)"
                        " VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
            except sqlite3.Error:
                with self._cond:  # keep them for the next try
                    self._buffer.extendleft(reversed(events))
                raise

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("%s", message)

    def _rejected_before(self, event: LifecycleEvent) -> bool:
        """A rejection the file already has as its latest event (from before a restart)."""
        if event.kind != "rejected":
            return False
        row = self._db.execute(
            "SELECT kind, data FROM events WHERE pipeline = ? AND relpath = ?"
            " ORDER BY id DESC LIMIT 1",
            (event.pipeline, event.relpath),
        ).fetchone()
        return (
            row is not None
            and row[0] == "rejected"
            and json.loads(row[1]).get("rule") == (event.rule)
        )

    def prune(self) -> int:
        """Drop events older than ``retention`` and beyond ``max_events``; how many went."""
        self._pruned_at = time.monotonic()
        with self._db_lock, self._db:
            gone = self._db.execute(
                "DELETE FROM events WHERE time < ?", (time.time() - self.retention,)
            ).rowcount
            gone += self._db.execute(
                "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?",
                (self.max_events,),
            ).rowcount
        return gone

    def close(self) -> None:
        """Write what is left and close the database."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        with self._db_lock:
            self._db.close()

    # --- reading -----------------------------------------------------------------------------

    def query(
        self,
        *,
        failed: bool = False,
        since: float | None = None,
        pipeline: str | None = None,
        relpath: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Events, newest first, as their JSON dicts (docs/hooks.md)."""
        where: list[str] = []
        args: list[Any] = []
        if failed:
            where.append(f"kind IN ({', '.join('?' for _ in FAILURE_KINDS)})")
            args += list(FAILURE_KINDS)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if pipeline is not None:
            where.append("pipeline = ?")
            args.append(pipeline)
        if relpath is not None:
            where.append("relpath = ?")
            args.append(relpath)
        sql = "SELECT data FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._db_lock:
            rows = self._db.execute(sql, args).fetchall()
        return [json.loads(data) for (data,) in rows]
