"""Groups: files of a pipeline that belong together (a flight), complete once quiet.

A pipeline's ``groups`` say which files belong together: those of one folder (``by:
folder``), or those captured less than ``gap`` apart (``by: time_gap``: the capture time
``geotag`` read, else the file's modification time). A file *arrives* in its group when its
job is done (every sink has it). A group whose last arrival is ``quiet`` old, and every open
group at the end of ``run --once``, is complete:

1. the ``skyframe_group_complete`` hook gets a :class:`Group`: its files, their metadata and
   where each landed; implementations may add files (the built-in flight report does);
2. those files are delivered into the group's folder on every sink;
3. the group is marked reported, then the ``NAME-complete`` event goes out.

A file that arrives after its group was reported reopens it; the report is replaced when it
completes again. The state lives in the state directory (SQLite, ``groups.db``): an arrival is
written before its job leaves the queue, and a group is marked reported only once its files
are delivered, so a crash neither loses a group nor reports it twice (a crash between the
delivery and the mark delivers the same files again; the hook may then run twice).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy

from skyframe.config import GroupConfig
from skyframe.errors import DeliveryError, StateError
from skyframe.events import LifecycleEvent
from skyframe.journal import UploadJournal
from skyframe.pipeline import Pipeline
from skyframe.state import Manifest
from skyframe.storage import Sink, TransferRequest, TransferResult, safe_relative_path

log = logging.getLogger(__name__)

GROUPS_FILE = "groups.db"
#: Seconds before a group whose completion failed (a sink away) is tried again.
RETRY_AFTER = 30.0
#: Seconds between looks for groups that became complete (watch mode).
CHECK_INTERVAL = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    pipeline TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
    state TEXT NOT NULL,            -- open, or reported
    last_arrival REAL NOT NULL,     -- epoch seconds
    first_time REAL, last_time REAL, -- by: time_gap: the capture times it spans
    reports INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, name, key)
);
CREATE TABLE IF NOT EXISTS members (
    pipeline TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, relpath TEXT NOT NULL,
    PRIMARY KEY (pipeline, name, key, relpath)
);
-- by: folder: the files queued for a group, delivered or not (the dashboard's "of N")
CREATE TABLE IF NOT EXISTS seen (
    pipeline TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, relpath TEXT NOT NULL,
    PRIMARY KEY (pipeline, name, key, relpath)
);
"""
#: Positions of one group that the overview gives the dashboard, at most.
MAX_POSITIONS = 500
#: Groups the overview lists, the latest first, at most.
MAX_GROUPS = 50


@dataclass(frozen=True)
class GroupFile:
    """One file of a completed group, as it was delivered."""

    relpath: str  #: relative to the source folder
    remote: str  #: its remote name, relative to each sink's root
    size: int
    sha256: str
    meta: dict[str, Any]  #: what the processes found (``job.meta``), e.g. ``photo``
    #: the full remote path on each sink, by sink key
    landed: dict[str, str] = field(default_factory=dict)


@dataclass
class Group:
    """A completed group, as the ``skyframe_group_complete`` hook receives it."""

    pipeline: str
    name: str  #: the group's name in the config (``flight``)
    key: str  #: which group: the folder (``by: folder``), or NAME-YYYYmmdd-HHMMSS
    by: str  #: ``folder`` or ``time_gap``
    folder: str  #: the remote folder its files share, relative to each sink's root
    files: list[GroupFile]
    reports: int  #: how many times it was reported before (more than 0: it was reopened)
    report: bool  #: whether the config asks for the built-in report
    #: files to deliver into ``folder`` with the group: name -> content
    added: dict[str, bytes] = field(default_factory=dict)

    def add_file(self, name: str, data: bytes) -> None:
        """Deliver ``data`` as ``folder/name`` on every sink (replacing an earlier report)."""
        self.added[safe_relative_path(name)] = data


def _parse_time(text: Any) -> float | None:
    """Epoch seconds of an ISO time; a time without offset is read as UTC (for ordering)."""
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class GroupStore:
    """The durable state of every group: members, last arrival, reported or not."""

    def __init__(self, state_dir: Path) -> None:
        try:
            self._db = sqlite3.connect(
                state_dir / GROUPS_FILE, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open {state_dir / GROUPS_FILE}: {exc}") from exc
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def arrived(
        self, pipeline: str, groups: list[GroupConfig], arrivals: list[tuple[str, float]]
    ) -> None:
        """Files of a pipeline arrived: (relative path, capture or modification time)."""
        now = time.time()
        with self._transaction() as db:
            for spec in groups:
                for relpath, when in arrivals:
                    key = self._key_for(db, pipeline, spec, relpath, when)
                    db.execute(
                        "INSERT INTO groups (pipeline, name, key, state, last_arrival,"
                        " first_time, last_time) VALUES (?, ?, ?, 'open', ?, ?, ?)"
                        " ON CONFLICT (pipeline, name, key) DO UPDATE SET state = 'open',"
                        " last_arrival = excluded.last_arrival,"
                        " first_time = min(coalesce(first_time, excluded.first_time),"
                        " excluded.first_time),"
                        " last_time = max(coalesce(last_time, excluded.last_time),"
                        " excluded.last_time)",
                        (pipeline, spec.name, key, now, when, when),
                    )
                    db.execute(
                        "INSERT OR IGNORE INTO members VALUES (?, ?, ?, ?)",
                        (pipeline, spec.name, key, relpath),
                    )

    def seen(self, pipeline: str, groups: list[GroupConfig], relpaths: list[str]) -> None:
        """Files queued for delivery: counted as seen by their ``by: folder`` groups."""
        rows = [
            (pipeline, spec.name, posixpath.dirname(relpath) or ".", relpath)
            for spec in groups
            if spec.by == "folder"
            for relpath in relpaths
        ]
        if rows:
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", rows)

    @staticmethod
    def _key_for(
        db: sqlite3.Connection, pipeline: str, spec: GroupConfig, relpath: str, when: float
    ) -> str:
        if spec.by == "folder":
            return posixpath.dirname(relpath) or "."
        row = db.execute(
            "SELECT key, first_time, reports FROM groups WHERE pipeline = ? AND name = ?"
            " AND first_time - ? <= ? AND last_time + ? >= ? ORDER BY first_time LIMIT 1",
            (pipeline, spec.name, spec.gap, when, spec.gap, when),
        ).fetchone()
        stamp = datetime.fromtimestamp(when, tz=UTC).strftime("%Y%m%d-%H%M%S")
        new_key = f"{spec.name}-{stamp}"
        if row is None:
            return new_key
        key, first_time, reports = str(row[0]), float(row[1]), int(row[2])
        taken = db.execute(
            "SELECT 1 FROM groups WHERE pipeline = ? AND name = ? AND key = ?",
            (pipeline, spec.name, new_key),
        ).fetchone()
        if when < first_time and not reports and taken is None:
            # Files arrive in any order: a group is named after its earliest capture, as long
            # as it was never reported under its first name.
            for table in ("groups", "members"):
                db.execute(
                    f"UPDATE {table} SET key = ? WHERE pipeline = ? AND name = ? AND key = ?",
                    (new_key, pipeline, spec.name, key),
                )
            return new_key
        return key

    def due(self, pipeline: str, spec: GroupConfig, now: float, *, final: bool) -> list[str]:
        """The keys of this pipeline's open groups named ``spec.name`` that are complete: quiet
        for ``spec.quiet`` (or all of them, ``final``)."""
        before = now if final else now - spec.quiet
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM groups WHERE pipeline = ? AND name = ? AND state = 'open'"
                " AND last_arrival <= ? ORDER BY last_arrival",
                (pipeline, spec.name, before),
            ).fetchall()
        return [str(key) for (key,) in rows]

    def members(self, pipeline: str, name: str, key: str) -> list[str]:
        """The relative paths of a group's files, sorted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT relpath FROM members WHERE pipeline = ? AND name = ? AND key = ?"
                " ORDER BY relpath",
                (pipeline, name, key),
            ).fetchall()
        return [str(relpath) for (relpath,) in rows]

    def reports(self, pipeline: str, name: str, key: str) -> int:
        """How many times the group was reported."""
        with self._lock:
            row = self._db.execute(
                "SELECT reports FROM groups WHERE pipeline = ? AND name = ? AND key = ?",
                (pipeline, name, key),
            ).fetchone()
        return int(row[0]) if row else 0

    def mark_reported(self, pipeline: str, name: str, key: str, arrival_seen: float) -> bool:
        """Mark a group reported, unless a file arrived since ``arrival_seen`` (then it stays
        open, to be reported again with that file). True when marked."""
        with self._transaction() as db:
            done = db.execute(
                "UPDATE groups SET state = 'reported', reports = reports + 1 WHERE pipeline = ?"
                " AND name = ? AND key = ? AND state = 'open' AND last_arrival <= ?",
                (pipeline, name, key, arrival_seen),
            ).rowcount
        return bool(done)

    def last_arrival(self, pipeline: str, name: str, key: str) -> float:
        with self._lock:
            row = self._db.execute(
                "SELECT last_arrival FROM groups WHERE pipeline = ? AND name = ? AND key = ?",
                (pipeline, name, key),
            ).fetchone()
        return float(row[0]) if row else 0.0

    def summary(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Groups, the latest arrival first (at most ``limit``): pipeline, name, key, state,
        files (arrived), seen (queued, ``by: folder``), reports, last arrival."""
        sql = (
            "SELECT g.pipeline, g.name, g.key, g.state, g.reports, g.last_arrival,"
            " (SELECT count(*) FROM members m WHERE m.pipeline = g.pipeline"
            " AND m.name = g.name AND m.key = g.key),"
            " (SELECT count(*) FROM seen s WHERE s.pipeline = g.pipeline"
            " AND s.name = g.name AND s.key = g.key)"
            " FROM groups g ORDER BY g.last_arrival DESC"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return [
            {
                "pipeline": p,
                "name": n,
                "key": k,
                "state": s,
                "reports": r,
                "last_arrival": a,
                "files": c,
                "seen": max(seen, c),
            }
            for p, n, k, s, r, a, c, seen in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Groups:
    """Records arrivals and completes the groups of the pipelines that have some."""

    def __init__(
        self,
        store: GroupStore,
        pipelines: Mapping[str, Pipeline],
        *,
        manifest: Manifest,
        pm: pluggy.PluginManager,
        emit: Callable[[LifecycleEvent], None],
        state_dir: Path,
        journal: UploadJournal | None,
    ) -> None:
        self.store = store
        self._all = pipelines  #: the engine's shared mapping (a reload changes it)
        self.manifest = manifest
        self.pm = pm
        self.emit = emit
        self.state_dir = state_dir
        self.journal = journal
        #: (pipeline, name, key) -> when to try again a group whose completion failed
        self._retry_at: dict[tuple[str, str, str], float] = {}

    @property
    def pipelines(self) -> dict[str, Pipeline]:
        """The configured pipelines that have groups."""
        return {name: p for name, p in self._all.items() if p.groups}

    def arrived(self, pipeline: str, files: list[tuple[str, int, dict[str, Any] | None]]) -> None:
        """Files of ``pipeline`` whose jobs are done: (relative path, mtime_ns, job meta)."""
        spec = self.pipelines.get(pipeline)
        if spec is None or not files:
            return
        arrivals = []
        for relpath, mtime_ns, meta in files:
            photo = (meta or {}).get("photo") or {}
            when = _parse_time(photo.get("captured"))
            arrivals.append((relpath, when if when is not None else mtime_ns / 1e9))
        self.store.arrived(pipeline, spec.groups, arrivals)

    def seen(self, pipeline: str, relpaths: list[str]) -> None:
        """Files of ``pipeline`` were queued (see :meth:`GroupStore.seen`)."""
        spec = self.pipelines.get(pipeline)
        if spec is not None and relpaths:
            self.store.seen(pipeline, spec.groups, relpaths)

    def overview(self) -> list[dict[str, Any]]:
        """The latest groups for the dashboard: their counts, bytes and photo positions."""
        out = []
        for group in self.store.summary(limit=MAX_GROUPS):
            pipeline = self.pipelines.get(group["pipeline"])
            if pipeline is None or not pipeline.sinks:
                continue
            sink = pipeline.sinks[0]
            size = 0
            positions: list[list[float]] = []
            for relpath in self.store.members(group["pipeline"], group["name"], group["key"]):
                entry = self.manifest.get(pipeline.name, sink.key, relpath)
                if entry is None:
                    continue
                size += entry.size
                photo = (entry.meta or {}).get("photo") or {}
                if photo.get("lat") is not None and len(positions) < MAX_POSITIONS:
                    positions.append([photo["lon"], photo["lat"]])
            out.append({**group, "bytes": size, "positions": positions})
        return out

    def complete_due(
        self, *, final: bool = False, now: float | None = None, only: Collection[str] | None = None
    ) -> int:
        """Complete the groups that are due (all open ones, ``final``), of the pipelines in
        ``only`` (all by default); returns how many."""
        now = time.time() if now is None else now
        completed = 0
        for pipeline in self.pipelines.values():
            if only is not None and pipeline.name not in only:
                continue
            for spec in pipeline.groups:
                for key in self.store.due(pipeline.name, spec, now, final=final):
                    if not final and self._retry_at.get((pipeline.name, spec.name, key), 0) > now:
                        continue
                    if self._complete(pipeline, spec, key):
                        completed += 1
        return completed

    def _complete(self, pipeline: Pipeline, spec: GroupConfig, key: str) -> bool:
        ident = (pipeline.name, spec.name, key)
        seen = self.store.last_arrival(*ident)
        try:
            group = self._group(pipeline, spec, key)
            self.pm.hook.skyframe_group_complete(group=group)
            self._deliver(pipeline, group)
        except Exception as exc:
            self._retry_at[ident] = time.time() + RETRY_AFTER
            log.warning(
                "%s: %s %s: cannot complete it yet (%s); trying again in %.0f s",
                pipeline.name,
                spec.name,
                key,
                exc,
                RETRY_AFTER,
            )
            return False
        self._retry_at.pop(ident, None)
        if not self.store.mark_reported(*ident, seen):
            return False  # a file arrived meanwhile: reported again once quiet
        size = sum(f.size for f in group.files)
        positioned = sum(1 for f in group.files if _has_position(f))
        self.emit(
            LifecycleEvent(
                f"{spec.name}-complete",
                pipeline.name,
                key,
                remote=group.folder,
                size=size,
                meta={
                    "files": len(group.files),
                    "bytes": size,
                    "with_position": positioned,
                    "reports": group.reports + 1,
                    "added": sorted(group.added),
                },
            )
        )
        log.info(
            "%s: %s %s complete: %d file(s)%s",
            pipeline.name,
            spec.name,
            key,
            len(group.files),
            f", reported again ({group.reports + 1})" if group.reports else "",
        )
        return True

    def _group(self, pipeline: Pipeline, spec: GroupConfig, key: str) -> Group:
        files = []
        for relpath in self.store.members(pipeline.name, spec.name, key):
            entries = [
                (sink, self.manifest.get(pipeline.name, sink.key, relpath))
                for sink in pipeline.sinks
            ]
            landed = {sink.key: sink.remote_path(e.remote) for sink, e in entries if e is not None}
            first = next((e for _sink, e in entries if e is not None), None)
            if first is None:
                continue  # deleted (and its remote copies) since it arrived
            files.append(
                GroupFile(relpath, first.remote, first.size, first.sha256, first.meta or {}, landed)
            )
        folders = [posixpath.dirname(f.remote) for f in files]
        folder = posixpath.commonpath(folders) if folders and all(folders) else ""
        return Group(
            pipeline.name,
            spec.name,
            key,
            spec.by,
            folder,
            files,
            self.store.reports(pipeline.name, spec.name, key),
            spec.report,
        )

    def _deliver(self, pipeline: Pipeline, group: Group) -> None:
        if not group.added:
            return
        scratch = self.state_dir / "scratch" / f"group-{time.time_ns()}"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            for index, (name, data) in enumerate(sorted(group.added.items())):
                local = scratch / f"{index}"
                local.write_bytes(data)
                st = local.stat()
                remote = posixpath.join(group.folder, name) if group.folder else name
                for sink in pipeline.sinks:
                    self._send(sink, local, sink.remote_path(remote), st.st_size, st.st_mtime_ns)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _send(self, sink: Sink, local: Path, remote: str, size: int, mtime_ns: int) -> None:
        request = TransferRequest(
            sink=sink,
            local_path=local,
            remote_path=remote,
            size=size,
            mtime_ns=mtime_ns,
            state_dir=self.state_dir,
            journal=self.journal,
        )
        with sink.guard():
            result: TransferResult | None = self.pm.hook.skyframe_transfer(request=request)
        if result is None or result.size != size:
            raise DeliveryError(f"{sink.display}: {remote} was not delivered")


def _has_position(file: GroupFile) -> bool:
    photo = file.meta.get("photo") or {}
    return photo.get("lat") is not None and photo.get("lon") is not None
