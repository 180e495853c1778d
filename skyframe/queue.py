"""The durable job queue: one entry per (pipeline, path), leases, backoff, dead letters.

Records are JSON in a diskcache Cache (SQLite). Every state change is one transaction, so a
crash at any moment leaves each job in exactly one state. At open, leased jobs (their worker
died with the process) return to the queue and waiting jobs get their timers back.

States: ``pending`` (in a ready list of its pipeline) -> ``leased`` (a worker has it) -> deleted
when done; ``waiting`` (backoff until ``not_before``) -> ``pending``; ``dead`` (visible,
re-queueable).

Each pipeline has a ready list per priority level (the job's ``priority``: high, normal, low;
a record of an earlier version has none and is normal). A claim takes the highest level that
has a ready job, pipelines taking turns within it; but one claim in ``FAIR_SHARE`` looks at the
lowest level first, so a steady stream of small files never starves a big one.

A dead record also carries the tag ``dead`` (diskcache's tag column, under an index of its
own), so that the dead letters are found without reading every record: SQLite reads the
database through a memory map, and a read of every record of a large backlog maps it all.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from skyframe.jobs import (
    HIGH,
    LOW,
    NORMAL,
    JobKind,
    QueuedJob,
    job_from_json,
    kind_of,
    priority_level,
)
from skyframe.state import GroupCommit, open_cache

_JOB = "job\x00"
_JOB_END = "job\x01"  #: every job key sorts between _JOB and this
#: The ready list of earlier versions, one for all pipelines: still drained, never filled.
_READY = "ready"
_LANE = "lane\x00"  #: + pipeline name + NUL: one ready list per pipeline, so one can be held
LEVELS = (HIGH, NORMAL, LOW)  #: the priority levels, highest first
FAIR_SHARE = 4  #: one claim in this many looks at the lowest priority level first


def _lane(pipeline: str, level: int = NORMAL) -> str:
    # The NUL ends the name: diskcache's pull(prefix=...) takes every key between
    # ``prefix-000...`` and ``prefix-999...``, which "cam" would share with "cam-2". The
    # normal level keeps the name of earlier versions; the others add "p+1" or "p-1", which
    # sorts after every "-NNN" key of the normal list.
    return f"{_LANE}{pipeline}\x00" if level == NORMAL else f"{_LANE}{pipeline}\x00p{level:+d}"


def _level(record: dict[str, Any]) -> int:
    """The priority level of a stored record (normal for one of an earlier version)."""
    payload = record.get("payload")
    return priority_level(payload.get("priority")) if isinstance(payload, dict) else NORMAL


_MAX_ERRORS_KEPT = 5
_DEAD = "dead"  #: the tag of a dead record


def _new_record(
    pipeline: str, job: QueuedJob, version: str | None, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A job's record before its first state (pending, or leased for a volatile job). The
    job is stored as its JSON (``payload``, when the caller made it already)."""
    return {
        "pipeline": pipeline,
        "relpath": job.relpath,
        "payload": job.to_json() if payload is None else payload,
        "version": version,
        "attempts": 0,
        "errors": [],
        "queued_at": time.time(),
    }


JobState = Literal["pending", "leased", "waiting", "dead"]


@dataclass(frozen=True)
class JobRecord:
    """A queued job as a listing shows it (``skyframe queue``, the API's ``/jobs``)."""

    pipeline: str
    relpath: str
    state: JobState
    kind: JobKind | None  #: None for a record this version cannot read
    attempts: int  #: failed attempts counted so far
    queued_at: float  #: epoch seconds
    errors: tuple[str, ...]  #: the last few errors, oldest first
    not_before: float | None = None  #: when a waiting job is tried again (epoch seconds)
    died_at: float | None = None  #: when a dead job was given up (epoch seconds)

    @classmethod
    def of(cls, record: dict[str, Any]) -> JobRecord:
        """The listing of one stored record."""
        return cls(
            pipeline=record["pipeline"],
            relpath=record["relpath"],
            state=record["state"],
            kind=kind_of(record["payload"]),
            attempts=record["attempts"],
            queued_at=record["queued_at"],
            errors=tuple(record["errors"]),
            not_before=record.get("not_before") if record["state"] == "waiting" else None,
            died_at=record.get("died_at") if record["state"] == "dead" else None,
        )


@dataclass(frozen=True)
class Claim:
    """A leased job: hand it back with complete(), retry(), dead() or release()."""

    key: str
    pipeline: str
    relpath: str
    job: QueuedJob
    attempts: int  #: attempts made before this one
    token: str
    #: Not on disk (see :meth:`JobQueue.volatile`): the version, for the record it gets
    #: if it needs one.
    volatile: bool = False
    version: str | None = None
    #: when the job was first queued (epoch seconds; 0 for a volatile one)
    queued_at: float = 0.0
    priority: int = NORMAL  #: the job's priority level (see skyframe.jobs)


class JobQueue:
    """A durable queue with coalescing per (pipeline, path)."""

    def __init__(self, directory: Path, *, recover: bool = True) -> None:
        """Open the queue; ``recover`` (only for the process holding the state lock) returns
        leased jobs to the queue and restores the backoff timers."""
        self._cache = open_cache(directory)
        self._lock = threading.RLock()
        self._commit = GroupCommit(self._cache, self._lock)
        self._waiting: list[tuple[float, str]] = []
        self._lanes: list[str] = []  #: pipelines with a ready list, in round-robin order
        #: volatile claims still only in memory, by key
        self._volatile: dict[str, Claim] = {}
        self._volatile_ids = itertools.count()
        self._volatile_prefix = uuid.uuid4().hex[:12]
        self._old_list_empty = False
        self._pulls = 0  #: claims looked for, for FAIR_SHARE
        self._index_dead()
        if recover:
            self._recover()

    @staticmethod
    def _key(pipeline: str, relpath: str) -> str:
        return f"{_JOB}{pipeline}\x00{relpath}"

    def _index_dead(self) -> None:
        """Create the index of tagged records, and tag the dead records of a queue written by an
        earlier version (once: this reads every record)."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'Cache_tagged'"
        if self._cache._sql(exists).fetchone():
            return
        with self._lock, self._cache.transact(retry=True):
            if self._cache._sql(exists).fetchone():
                return  # another process was quicker
            for record in self._select(_DEAD):
                key = self._key(record["pipeline"], record["relpath"])
                self._cache.set(key, record, tag=_DEAD)
            self._cache._sql("CREATE INDEX Cache_tagged ON Cache(tag) WHERE tag IS NOT NULL")

    def _recover(self) -> None:
        with self._lock, self._cache.transact(retry=True):
            for key in list(self._cache.iterkeys()):
                if not isinstance(key, str) or not key.startswith(_JOB):
                    continue
                record = self._cache.get(key)
                if record is None:
                    continue
                self.add_lanes([record["pipeline"]])
                if record["state"] == "leased":
                    self._make_pending(key, record, record.get("next_payload"))
                elif record["state"] == "waiting":
                    heapq.heappush(self._waiting, (record["not_before"], key))

    def _make_pending(
        self, key: str, record: dict[str, Any], payload: dict[str, Any] | None = None
    ) -> None:
        if payload is not None:
            record["payload"] = payload
            record["attempts"] = 0
            if record.get("next_payload") is payload:
                record["version"] = record.get("next_version")
        record.update(state="pending", lease=None, next_payload=None, next_version=None)
        self._cache.set(key, record)
        self._cache.push(key, prefix=_lane(record["pipeline"], _level(record)))
        self.add_lanes([record["pipeline"]])

    def add_lanes(self, pipelines: Collection[str]) -> None:
        """Make sure :meth:`claim` looks at these pipelines' ready lists (the engine names the
        configured ones: another process, ``skyframe queue retry``, may fill them)."""
        for name in pipelines:
            if name not in self._lanes:
                self._lanes.append(name)

    def lanes(self) -> list[str]:
        """The pipelines :meth:`claim` looks at (configured or not, e.g. removed by a reload)."""
        return list(self._lanes)

    def put(self, pipeline: str, job: QueuedJob, version: str | None = None) -> bool:
        """Queue the latest state of a path; returns False when that version was queued already.

        ``version`` identifies the state of the file (e.g. size and mtime). Offering the same
        version again changes nothing: a job waiting for its retry keeps its backoff and its
        attempt count, and a dead-lettered one stays dead until the file changes or someone
        retries it. A new version replaces the queued one and starts afresh.
        """
        key = self._key(pipeline, job.relpath)
        payload = job.to_json()
        with self._lock, self._cache.transact(retry=True):
            record = self._adopt(key) if key in self._volatile else self._cache.get(key)
            if record is None:
                self._make_pending(key, _new_record(pipeline, job, version, payload))
                return True
            state = record["state"]
            known = {record.get("version")}
            if state == "leased":
                known.add(record.get("next_version"))
            if version is not None and version in known:
                return False
            if state == "leased":
                # Never run two versions of one path at once: a new one follows when it ends.
                record["next_payload"] = payload
                record["next_version"] = version
                self._cache.set(key, record)
            elif state == "pending":
                before = _level(record)
                record.update(payload=payload, version=version, attempts=0, errors=[])
                self._cache.set(key, record)
                if _level(record) != before:  # the file grew past small_first, say
                    # The old reference goes stale (claim skips a record found elsewhere).
                    self._cache.push(key, prefix=_lane(pipeline, _level(record)))
            else:  # waiting or dead: a new version deserves a fresh start
                record.update(errors=[], version=version)
                self._make_pending(key, record, payload)
            return True

    def claim(self, skip: Collection[str] = (), min_priority: int = LOW) -> Claim | None:
        """Lease the next ready job of a pipeline not in ``skip`` (held ones), of priority
        ``min_priority`` or higher, or return None.

        Higher priority levels first (see the module's docstring); within a level, pipelines
        take turns, one job each, so a busy one cannot starve the others.
        """
        with self._lock:
            self._promote_due()
            while True:
                with self._cache.transact(retry=True):
                    key = self._pull(skip, min_priority)
                    if key is None:
                        return None
                    record = self._cache.get(key)
                    if record is None or record["state"] != "pending":
                        continue  # a stale reference: the job moved on since it was queued
                    if record["pipeline"] in skip:  # never hand out a held pipeline's job
                        self._cache.push(key, prefix=_lane(record["pipeline"], _level(record)))
                        continue
                    if _level(record) < min_priority:
                        continue  # a stale reference: its level changed, its list has it
                    try:
                        job = job_from_json(record["payload"])
                    except ValueError as exc:  # written by hand, or by a newer version
                        self._bury(key, record, f"cannot read the queued job: {exc}")
                        continue
                    token = uuid.uuid4().hex
                    record.update(state="leased", lease=token, claimed_at=time.time())
                    self._cache.set(key, record)
                return Claim(
                    key,
                    record["pipeline"],
                    record["relpath"],
                    job,
                    record["attempts"],
                    token,
                    queued_at=record.get("queued_at", 0.0),
                    priority=job.priority,
                )

    def _pull(self, skip: Collection[str], min_priority: int = LOW) -> str | None:
        """The key of the next ready job outside ``skip`` (of ``min_priority`` or higher),
        taken off its ready list."""
        while not self._old_list_empty and min_priority <= NORMAL:  # to their pipeline's list
            _ready_key, key = self._cache.pull(prefix=_READY, retry=True)
            if key is None:
                self._old_list_empty = True
                break
            record = self._cache.get(key)
            if record is not None and record["pipeline"] in skip:
                self._cache.push(key, prefix=_lane(record["pipeline"], _level(record)))
                self.add_lanes([record["pipeline"]])
                continue
            return str(key)
        levels = [level for level in LEVELS if level >= min_priority]
        self._pulls += 1
        if self._pulls % FAIR_SHARE == 0:
            levels.reverse()  # the lowest level's turn: a big file makes steady progress
        for level in levels:
            for i, name in enumerate(self._lanes):
                if name in skip:
                    continue
                _lane_key, key = self._cache.pull(prefix=_lane(name, level), retry=True)
                if key is not None:
                    # The next claim starts with the next pipeline.
                    self._lanes = self._lanes[i + 1 :] + self._lanes[: i + 1]
                    return str(key)
        return None

    def _promote_due(self) -> None:
        now = time.time()
        while self._waiting and self._waiting[0][0] <= now:
            not_before, key = heapq.heappop(self._waiting)
            with self._cache.transact(retry=True):
                record = self._cache.get(key)
                if record and record["state"] == "waiting" and record["not_before"] == not_before:
                    self._make_pending(key, record)

    def volatile(self, pipeline: str, job: QueuedJob, version: str | None) -> Claim | None:
        """A claim for a job that is not written to disk, or None when the path has a record
        already (then :meth:`put` it).

        For files found by a one-shot run's scan (the engine decides which): if the process
        dies, the next start's scan finds them again, as their delivery is not in the
        manifest. A volatile job that is done leaves no trace here. One that needs a record
        (a retry, a dead letter, a release, or a new version offered meanwhile) gets it then,
        as a leased job with this claim's token, and goes on like any other.
        """
        key = self._key(pipeline, job.relpath)
        with self._lock:
            if key in self._volatile or self._cache.get(key) is not None:
                return None
            token = f"v{self._volatile_prefix}{next(self._volatile_ids)}"
            claim = Claim(
                key,
                pipeline,
                job.relpath,
                job,
                0,
                token,
                volatile=True,
                version=version,
                priority=job.priority,
            )
            self._volatile[key] = claim
            return claim

    def _adopt(self, key: str) -> dict[str, Any] | None:
        """Write the leased record of a volatile job still only in memory (within the
        caller's transaction); None if ``key`` is no such job."""
        claim = self._volatile.pop(key, None)
        if claim is None:
            return None
        record = _new_record(claim.pipeline, claim.job, claim.version)
        record.update(
            state="leased",
            lease=claim.token,
            claimed_at=record["queued_at"],
            next_payload=None,
            next_version=None,
        )
        self._cache.set(key, record)
        return record

    def _leased(self, claim: Claim) -> dict[str, Any] | None:
        if claim.volatile and claim.key in self._volatile:
            return self._adopt(claim.key)
        record = self._cache.get(claim.key)
        if record is None or record.get("lease") != claim.token:
            return None  # the lease was lost (e.g. purged); nothing to update
        return dict(record)

    def complete(self, claim: Claim) -> None:
        """The job is done; a version queued meanwhile becomes pending."""
        self.complete_many([claim])

    def complete_many(self, claims: list[Claim]) -> None:
        """These jobs are done (see :meth:`complete`), in one transaction."""
        if not claims:
            return

        def write() -> None:
            for claim in claims:
                if claim.volatile and self._volatile.pop(claim.key, None) is not None:
                    continue  # it was never written: nothing to remove
                record = self._leased(claim)
                if record is None:
                    continue
                if record.get("next_payload") is not None:
                    record["errors"] = []
                    self._make_pending(claim.key, record, record["next_payload"])
                else:
                    self._cache.delete(claim.key)

        self._commit(write)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group several calls (puts, claims) into one transaction; this thread holds the
        queue meanwhile, so keep the block short."""
        with self._lock, self._cache.transact(retry=True):
            yield

    def claim_many(
        self, limit: int, skip: Collection[str] = (), min_priority: int = LOW
    ) -> list[Claim]:
        """Lease up to ``limit`` ready jobs (of pipelines not in ``skip``, of ``min_priority``
        or higher) in one transaction."""
        claims: list[Claim] = []
        with self.batch():
            while len(claims) < limit:
                claim = self.claim(skip, min_priority)
                if claim is None:
                    break
                claims.append(claim)
        return claims

    def release(self, claim: Claim) -> None:
        """Give the job back untouched (shutdown before it started)."""
        with self._lock, self._cache.transact(retry=True):
            record = self._leased(claim)
            if record is not None:
                self._make_pending(claim.key, record, record.get("next_payload"))

    def retry(self, claim: Claim, error: str, delay: float, *, count: bool = True) -> None:
        """Make the job wait ``delay`` seconds; ``count`` it as a failed attempt."""
        with self._lock, self._cache.transact(retry=True):
            record = self._leased(claim)
            if record is None:
                return
            if record.get("next_payload") is not None:
                self._make_pending(claim.key, record, record["next_payload"])
                return
            not_before = time.time() + delay
            record.update(
                state="waiting",
                lease=None,
                attempts=claim.attempts + (1 if count else 0),
                not_before=not_before,
                errors=[*record["errors"], error][-_MAX_ERRORS_KEPT:],
            )
            self._cache.set(claim.key, record)
            heapq.heappush(self._waiting, (not_before, claim.key))

    def dead(self, claim: Claim, error: str) -> None:
        """Move the job to the dead-letter list (unless a newer version arrived)."""
        with self._lock, self._cache.transact(retry=True):
            record = self._leased(claim)
            if record is None:
                return
            if record.get("next_payload") is not None:
                self._make_pending(claim.key, record, record["next_payload"])
                return
            record["attempts"] = claim.attempts + 1
            self._bury(claim.key, record, error)

    def _bury(self, key: str, record: dict[str, Any], error: str) -> None:
        """Write ``record`` as a dead letter (within the caller's transaction)."""
        record.update(
            state="dead",
            lease=None,
            died_at=time.time(),
            errors=[*record["errors"], error][-_MAX_ERRORS_KEPT:],
        )
        # Tagged: see the module's docstring. Any later write of the record drops the tag.
        self._cache.set(key, record, tag=_DEAD)

    def discard(self, pipeline: str, relpath: str) -> bool:
        """Drop a job that no worker holds (its file was deleted or moved); True if dropped."""
        key = self._key(pipeline, relpath)
        with self._lock, self._cache.transact(retry=True):
            if key in self._volatile:
                return False  # a worker holds it, and it has no next version to drop
            record = self._cache.get(key)
            if record is None:
                return False
            if record["state"] == "leased":
                record["next_payload"] = None
                self._cache.set(key, record)
                return False
            self._cache.delete(key)
            return True

    def next_due(self) -> float | None:
        """When the earliest waiting job becomes ready (epoch seconds), if any."""
        with self._lock:
            return self._waiting[0][0] if self._waiting else None

    def records(self, state: str | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs (optionally of one state, at most ``limit``), oldest first; selected and
        sorted inside SQLite, so a short list stays quick with 100,000 jobs queued. The dead
        ones are found through their tag, without reading the others."""
        return [JobRecord.of(r) for r in self._select(state, limit, tagged=state == _DEAD)]

    def _select(
        self, state: str | None, limit: int | None = None, *, tagged: bool = False
    ) -> list[dict[str, Any]]:
        value = "CAST(value AS TEXT)"
        sql = f"SELECT key, {value} FROM Cache WHERE key >= ? AND key < ?"
        args: list[Any] = [_JOB, _JOB_END]
        if tagged:
            sql += " AND tag = ?"
            args.append(state)
        elif state is not None:
            # A record too large for a row has no value here (it lives in a file): keep it.
            sql += f" AND (value IS NULL OR json_extract({value}, '$.state') = ?)"
            args.append(state)
        sql += f" ORDER BY json_extract({value}, '$.queued_at')"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        out = []
        for key, text in self._cache._sql(sql, args).fetchall():
            record = json.loads(text) if text is not None else self._cache.get(key)
            if record is not None and (state is None or record["state"] == state):
                out.append(record)
        return out

    def counts_by_pipeline(self) -> dict[str, dict[str, int]]:
        """How many jobs each pipeline has in each state, counted inside SQLite (no record is
        decoded in Python, so it stays quick with 100,000 jobs queued)."""
        rows = self._cache._sql(  # diskcache's own connection, used read-only
            "SELECT json_extract(CAST(value AS TEXT), '$.pipeline'),"
            " json_extract(CAST(value AS TEXT), '$.state'), count(*)"
            " FROM Cache WHERE key >= ? AND key < ? AND value IS NOT NULL GROUP BY 1, 2",
            (_JOB, _JOB_END),
        ).fetchall()
        # A record too large for a row lives in a file of its own: decode those few here.
        large = self._cache._sql(
            "SELECT key FROM Cache WHERE key >= ? AND key < ? AND value IS NULL",
            (_JOB, _JOB_END),
        ).fetchall()
        for (key,) in large:
            record = self._cache.get(key)
            if record is not None:
                rows.append((record["pipeline"], record["state"], 1))
        with self._lock:  # volatile jobs are this process's, handed out: counted as leased
            rows += [(claim.pipeline, "leased", 1) for claim in self._volatile.values()]
        out: dict[str, dict[str, int]] = {}
        for pipeline, state, count in rows:
            counts = out.setdefault(pipeline, {"pending": 0, "leased": 0, "waiting": 0, "dead": 0})
            counts[state] = counts.get(state, 0) + count
        return out

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        return self.totals(self.counts_by_pipeline())

    @staticmethod
    def totals(per_pipeline: dict[str, dict[str, int]]) -> dict[str, int]:
        """Counts of :meth:`counts_by_pipeline`, all pipelines together."""
        counts = {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
        for per_state in per_pipeline.values():
            for state, count in per_state.items():
                counts[state] += count
        return counts

    def requeue_dead(self, pipeline: str | None = None, relpath: str | None = None) -> int:
        """Move dead-lettered jobs back to pending with fresh attempts; returns how many."""
        moved = 0
        with self._lock, self._cache.transact(retry=True):
            for record in self._select(_DEAD, tagged=True):
                if pipeline is not None and record["pipeline"] != pipeline:
                    continue
                if relpath is not None and record["relpath"] != relpath:
                    continue
                record["attempts"] = 0
                self._make_pending(self._key(record["pipeline"], record["relpath"]), record)
                moved += 1
        return moved

    def purge_dead(self) -> int:
        """Forget every dead-lettered job; returns how many."""
        with self._lock, self._cache.transact(retry=True):
            dead = self._select(_DEAD, tagged=True)
            for record in dead:
                self._cache.delete(self._key(record["pipeline"], record["relpath"]))
        return len(dead)

    def close(self) -> None:
        """Close the database."""
        self._cache.close()
