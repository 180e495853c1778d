"""Running one claimed job: processes, then every sink on its own pool, then the verdict.

A job's processes run on the processing pool; each sink that still needs the file gets a task
on that sink's pool (``concurrency`` at a time), so a slow sink never holds up another's
uploads. When every sink has answered, the job is completed, retried with backoff, or
dead-lettered. The manifest makes retries cheap: a sink that already has this version of the
file is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pluggy

from skyframe import backoff
from skyframe.control import Control
from skyframe.display import redact
from skyframe.errors import (
    DeliveryError,
    RemoteConflictError,
    SinkUnavailableError,
    SourceChangedError,
    SourceUnreadableError,
    UnsafePathError,
)
from skyframe.events import FileEvent, Job, LifecycleEvent, LifecycleKind
from skyframe.jobs import Delete, Move, QueuedJob, Upload
from skyframe.journal import UploadJournal
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.queue import Claim, JobQueue
from skyframe.sharing import RemoteOwners
from skyframe.state import Manifest, ManifestEntry
from skyframe.storage import (
    BatchTransfer,
    Digests,
    Sink,
    TransferRequest,
    TransferResult,
    file_sha256,
    safe_relative_path,
)

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  #: seconds between progress events for one transfer
BATCH_FILE_LIMIT = 1024 * 1024  #: files up to this size may go in batches
BATCH_SIZE = 32  #: files per batch
BATCH_THREADS = 2  #: batches under way at once (one reads while another is sent)


class TransferCancelled(Exception):
    """Raised inside a transfer when the daemon shuts down; the job goes back to the queue."""


@dataclass
class _Run:
    """One claimed job while its sinks are being served."""

    claim: Claim
    pipeline: Pipeline
    scratch: Path
    job: Job | None = None
    remaining: int = 0
    errors: list[BaseException] = field(default_factory=list)
    #: id of an error -> the sink it came from, for the failure events
    error_sinks: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _sha256: str | None = None

    def sha256(self) -> str:
        """The file's sha256, read at most once per job however many sinks ask."""
        with self.lock:
            if self._sha256 is None:
                assert self.job is not None
                self._sha256 = file_sha256(self.job.path)
            return self._sha256


@dataclass
class _BatchJob:
    """One file in a batch: a plain new file (see ``JobRunner._plain_new_file``)."""

    claim: Claim
    event: FileEvent
    remote: str
    #: None while all goes well; "failed": to send again alone; "cancelled": the run stops;
    #: "unrecorded": the state database failed
    outcome: Literal["failed", "cancelled", "unrecorded"] | None = None


class JobRunner:
    """Turns claims into deliveries, retries and dead letters."""

    def __init__(
        self,
        *,
        pm: pluggy.PluginManager,
        queue: JobQueue,
        manifest: Manifest,
        pipelines: dict[str, Pipeline],
        state_dir: Path,
        journal: UploadJournal | None,
        workers: int,
        emit: Callable[[LifecycleEvent], None],
        on_finished: Callable[[], None],
        cancelled: threading.Event,
        control: Control | None = None,
        stopping: threading.Event | None = None,
        owners: RemoteOwners | None = None,
    ) -> None:
        self.pm = pm
        #: who owns each remote path of storage that several pipelines share
        self.owners = owners
        self.control = control
        #: Set when the engine stops: a transfer held by a pause is cut at once.
        self.stopping = stopping or threading.Event()
        #: Called once a job is settled either way (its transfers are over).
        self.job_ended: Callable[[str, str], None] | None = None
        self.queue = queue
        self.manifest = manifest
        self.pipelines = pipelines
        self.state_dir = state_dir
        self.journal = journal
        self.emit = emit
        self._on_finished = on_finished
        self._cancelled = cancelled
        #: True in the daemon: an unreachable sink keeps files waiting without counting
        #: attempts. False for ``--once``, whose run must end: attempts count as usual.
        self.patient = False
        #: digests computed ahead of large transfers (``run --once`` fills it during its gate)
        self.digests = Digests()
        #: Per pipeline: each sink's batch sender, where every sink of the pipeline has one, the
        #: pipeline has no processes (they may rename files or add derived ones) and no sink a
        #: bandwidth limit (a batch would take its budget file by file, then send in a burst).
        self._batch_senders: dict[str, list[BatchTransfer]] = {}
        for p in pipelines.values():
            senders = [pm.hook.skyframe_transfer_batch(sink=s) for s in p.sinks]
            limited = any(s.limiter for s in p.sinks)
            if p.sinks and not p.processes and not limited and all(senders):
                self._batch_senders[p.name] = senders
        #: How many jobs may be in flight at once: enough to keep every pool busy, no more.
        self.capacity = workers + sum(s.concurrency for p in pipelines.values() for s in p.sinks)
        if self._batch_senders:
            self.capacity += BATCH_SIZE * BATCH_THREADS
        self._processing = ThreadPoolExecutor(workers, thread_name_prefix="skyframe-process")
        self._batches = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="skyframe-batch")
        self._sink_pools: dict[tuple[str, str], ThreadPoolExecutor] = {
            (p.name, s.key): ThreadPoolExecutor(s.concurrency, thread_name_prefix="skyframe-sink")
            for p in pipelines.values()
            for s in p.sinks
        }

    def submit(self, claim: Claim) -> None:
        """Start a claimed job; ``on_finished`` is called once it is settled either way.

        A pipeline without processes has no heavy work before the upload: its jobs start on
        their first sink's pool and serve that sink in the same thread (one hand-over less).
        """
        pipeline = self.pipelines.get(claim.pipeline)
        if pipeline is not None and not pipeline.processes and pipeline.sinks:
            first = pipeline.sinks[0]
            self._sink_pools[(pipeline.name, first.key)].submit(self._start, claim, first)
        else:
            self._processing.submit(self._start, claim)

    def submit_many(self, claims: list[Claim]) -> None:
        """Start claimed jobs: small new files of a pipeline whose sinks all take batches go in
        batches (see :meth:`_run_batch`), the others one by one (:meth:`submit`)."""
        batches: dict[str, list[Claim]] = {}
        for claim in claims:
            if self.batchable(claim.pipeline, claim.job):
                batch = batches.setdefault(claim.pipeline, [])
                batch.append(claim)
                if len(batch) == BATCH_SIZE:
                    self._batches.submit(self._run_batch, batches.pop(claim.pipeline))
            else:
                self.submit(claim)
        for batch in batches.values():
            self._batches.submit(self._run_batch, batch)

    def batchable(self, pipeline: str, job: QueuedJob) -> bool:
        """Whether this job goes in a batch (when its file is new everywhere): a plain upload
        the rules accepted when it was queued, of a small file."""
        return (
            pipeline in self._batch_senders
            and type(job) is Upload
            and job.accepted
            and job.event.size <= BATCH_FILE_LIMIT
        )

    def shutdown(self) -> None:
        """Stop the pools (callers wait for in-flight jobs first)."""
        self._batches.shutdown(wait=False, cancel_futures=True)
        self._processing.shutdown(wait=False, cancel_futures=True)
        for pool in self._sink_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # --- stages ------------------------------------------------------------------------------

    def _start(self, claim: Claim, inline: Sink | None = None) -> None:
        pipeline = self.pipelines.get(claim.pipeline)
        if pipeline is None:
            self._dead(
                claim, f"pipeline {claim.pipeline!r} is no longer configured", error="ConfigError"
            )
            self._on_finished()
            return
        if self.control is not None and self.control.is_held(pipeline.name):
            # Paused after it was claimed: back to the queue before anything runs.
            self.queue.release(claim)
            self._on_finished()
            return
        run = _Run(claim, pipeline, self.state_dir / "scratch" / claim.token)
        offline = [s.health.wait() for s in pipeline.sinks]
        if self.patient and offline and min(offline) > 0:
            # Every sink is away: wait for the next try without running the processes.
            self.queue.retry(claim, pipeline.sinks[0].health.last_error, max(offline), count=False)
            self._on_finished()
            return
        try:
            if isinstance(claim.job, Delete):
                self._delete_remote(run)
                sinks: list[tuple[Sink, ManifestEntry | None]] = []
            else:
                sinks = self._prepare(run)
        except BaseException as exc:
            run.errors.append(exc)
            sinks = []
        if not sinks:
            self._finish(run)
            return
        run.remaining = len(sinks)
        here = None
        for sink, entry in sinks:
            if sink is inline:
                here = (sink, entry)
            else:
                pool = self._sink_pools[(pipeline.name, sink.key)]
                pool.submit(self._serve_sink, run, sink, entry)
        if here is not None:
            self._serve_sink(run, *here)

    def _prepare(self, run: _Run) -> list[tuple[Sink, ManifestEntry | None]]:
        """Run rules again on the file as it is now, then the processes; return the sinks that
        still need this version of the file, with what each one has now."""
        queued_job = run.claim.job
        assert isinstance(queued_job, Upload)
        queued = queued_job.event
        try:
            st = os.stat(queued.path)
        except FileNotFoundError:
            raise SourceUnreadableError(f"{queued.path}: vanished") from None
        # The latest state of the file wins: what is on disk now is what gets delivered.
        event = FileEvent.from_stat(queued.pipeline, queued.path, queued.relpath, st, queued.kind)
        unchanged = (event.size, event.mtime_ns, event.inode) == (
            queued.size,
            queued.mtime_ns,
            queued.inode,
        )
        if unchanged and queued_job.accepted:
            rejection = None  # the rules accepted this very version when it was queued
        else:
            rejection = evaluate_rules(run.pipeline.rules, event)
        if rejection is not None:
            self.emit(
                LifecycleEvent(
                    "rejected",
                    event.pipeline,
                    event.relpath,
                    rule=rejection[0],
                    reason=rejection[1],
                    size=event.size,
                )
            )
            return []
        job = Job(event, scratch_dir=run.scratch)
        for step in run.pipeline.processes:
            if self._cancelled.is_set():
                raise TransferCancelled
            step(job)
        job.remote_name = safe_relative_path(job.remote_name)
        run.job = job
        entries = [
            (sink, self.manifest.get(event.pipeline, sink.key, event.relpath))
            for sink in run.pipeline.sinks
        ]
        return [
            (sink, entry)
            for sink, entry in entries
            if entry is None or not entry.matches(event.size, event.mtime_ns)
        ]

    def _serve_sink(self, run: _Run, sink: Sink, entry: ManifestEntry | None) -> None:
        try:
            assert run.job is not None
            with sink.guard():
                self._deliver(run, run.job, sink, entry)
        except BaseException as exc:
            with run.lock:
                run.errors.append(exc)
                run.error_sinks[id(exc)] = sink.key
        with run.lock:
            run.remaining -= 1
            last = run.remaining == 0
        if last:
            self._finish(run)

    def _finish(self, run: _Run) -> None:
        claim = run.claim
        try:
            if not run.errors:
                self.queue.complete(claim)
            else:
                self._settle_failure(run)
        except Exception:
            log.exception("could not record the outcome of %s", claim.relpath)
        finally:
            if run.scratch.exists():
                shutil.rmtree(run.scratch, ignore_errors=True)
            if self.job_ended is not None:
                self.job_ended(claim.pipeline, claim.relpath)
            self._on_finished()

    def _settle_failure(self, run: _Run) -> None:
        claim = run.claim
        errors = run.errors
        if any(isinstance(e, TransferCancelled) for e in errors):
            self.queue.release(claim)  # shutting down: it starts again at the next run
            return
        first = next((e for e in errors if not isinstance(e, SourceChangedError)), errors[0])
        reason = redact(
            str(first) if isinstance(first, DeliveryError) else f"{type(first).__name__}: {first}"
        )
        if (
            isinstance(first, SourceUnreadableError)
            and isinstance(claim.job, Upload)
            and not claim.job.event.path.exists()
        ):
            self.queue.complete(claim)
            self.emit(
                LifecycleEvent(
                    "skipped", claim.pipeline, claim.relpath, reason="vanished before delivery"
                )
            )
            return
        if all(isinstance(e, SourceChangedError) for e in errors):
            # Still being written: wait for it to settle again, without counting an attempt.
            self.queue.retry(claim, reason, delay=1.0, count=False)
            return
        if self.patient and all(isinstance(e, SinkUnavailableError) for e in errors):
            # The sink is away (link down, server restarting): not this file's fault. Wait
            # for the sink's next try, however long it takes.
            waits = [s.health.wait() for s in run.pipeline.sinks if s.health.state == "offline"]
            delay = max(waits, default=0.0) + backoff.spread(0.5)
            self.queue.retry(claim, reason, delay, count=False)
            return
        retryable = all(not isinstance(e, DeliveryError) or e.retryable for e in errors)
        attempts = claim.attempts + 1
        if retryable and attempts < run.pipeline.retry.max_attempts:
            retry = run.pipeline.retry
            delay = backoff.delay(retry.initial, retry.max, attempts)
            self.queue.retry(claim, reason, delay)
            log.warning(
                "%s: %s: attempt %d failed, retrying in %.1fs: %s",
                claim.pipeline,
                claim.relpath,
                attempts,
                delay,
                reason,
            )
            self.emit(
                LifecycleEvent(
                    "failed",
                    claim.pipeline,
                    claim.relpath,
                    sink=run.error_sinks.get(id(first)),
                    attempt=attempts,
                    reason=reason,
                    error=type(first).__name__,
                )
            )
        else:
            self._dead(claim, reason, run.error_sinks.get(id(first)), type(first).__name__)

    def _dead(
        self, claim: Claim, reason: str, sink: str | None = None, error: str | None = None
    ) -> None:
        self.queue.dead(claim, reason)
        log.error("%s: %s: giving up: %s", claim.pipeline, claim.relpath, reason)
        self.emit(
            LifecycleEvent(
                "dead-lettered",
                claim.pipeline,
                claim.relpath,
                sink=sink,
                attempt=claim.attempts + 1,
                reason=reason,
                error=error,
            )
        )

    # --- batches of small files --------------------------------------------------------------

    def _run_batch(self, claims: list[Claim]) -> None:
        """Deliver small files of one pipeline together: each sink's batch sender sends them
        at once, then the manifest and the queue record the whole batch in one transaction
        each. Only the plain case goes this way: a file first seen (no manifest entry on any
        sink) and unchanged since it was queued. Any other file, and any file that fails in
        the batch, takes the one-by-one path, which has the full logic (touched files, moves,
        error classification, retries, dead letters)."""
        pipeline = self.pipelines[claims[0].pipeline]
        if (self.control is not None and self.control.is_held(pipeline.name)) or any(
            sink.health.wait() > 0 for sink in pipeline.sinks
        ):
            for claim in claims:  # paused, or a sink is away: the one-by-one path knows what
                self.submit(claim)  # to do (release, or wait for the sink)
            return
        jobs: list[_BatchJob] = []
        for claim in claims:
            plain = self._plain_new_file(pipeline, claim)
            if plain is None:
                self.submit(claim)
            else:
                jobs.append(_BatchJob(claim, *plain))
        try:
            for sink, send in zip(pipeline.sinks, self._batch_senders[pipeline.name], strict=True):
                todo = [job for job in jobs if job.outcome is None]
                if todo:
                    self._send_batch(pipeline.name, sink, send, todo)
            self.queue.complete_many([job.claim for job in jobs if job.outcome is None])
        except Exception:  # the state database: as in _finish, the leases return at next start
            log.exception("could not record the outcome of a batch of %d file(s)", len(jobs))
            for job in jobs:
                job.outcome = job.outcome or "unrecorded"
        self._settle_batch(jobs)

    def _settle_batch(self, jobs: list[_BatchJob]) -> None:
        for job in jobs:
            if job.outcome == "failed":
                self.submit(job.claim)  # again, alone: the manifest skips the sinks it reached
                continue
            try:
                if job.outcome == "cancelled":
                    self.queue.release(job.claim)  # stopping: it starts again at the next run
            except Exception:
                log.exception("could not record the outcome of %s", job.claim.relpath)
            finally:
                if self.job_ended is not None:
                    self.job_ended(job.claim.pipeline, job.claim.relpath)
                self._on_finished()

    def _claim_remotes(self, sink: Sink, jobs: list[_BatchJob]) -> list[_BatchJob]:
        """The jobs whose remote path is theirs to write (see RemoteOwners); the others are
        marked failed, to go alone, where the conflict is reported."""
        if self.owners is None or not self.owners.active:
            return jobs
        mine = []
        for job in jobs:
            try:
                self.owners.claim(sink, sink.remote_path(job.remote))
            except RemoteConflictError:
                job.outcome = "failed"
            else:
                mine.append(job)
        return mine

    def _send_batch(
        self, pipeline: str, sink: Sink, send: BatchTransfer, jobs: list[_BatchJob]
    ) -> None:
        """Send a batch to one sink; record and announce what arrived, mark the rest."""

        def announce(kind: LifecycleKind, job: _BatchJob, size: int) -> None:
            self.emit(
                LifecycleEvent(
                    kind,
                    pipeline,
                    job.event.relpath,
                    sink=sink.key,
                    remote=job.remote,
                    size=size,
                    attempt=job.claim.attempts + 1,
                )
            )

        jobs = self._claim_remotes(sink, jobs)
        if not jobs:
            return
        for job in jobs:
            announce("started", job, job.event.size)
        pace = self._pace(sink, pipeline)
        requests = [
            TransferRequest(
                sink=sink,
                local_path=job.event.path,
                remote_path=sink.remote_path(job.remote),
                size=job.event.size,
                mtime_ns=job.event.mtime_ns,
                progress=self._progress(None, None, sink, job.event.size),
                state_dir=self.state_dir,
                journal=self.journal,
                pace=pace,
            )
            for job in jobs
        ]
        outcomes: list[TransferResult | Exception] | None = None
        try:
            # The sink's health follows the batch as it follows a single transfer: a file that
            # arrived means the sink answers (after an outage: "reachable again").
            with sink.guard():
                outcomes = send(requests)
                if not any(isinstance(outcome, TransferResult) for outcome in outcomes):
                    # Nothing arrived: the guard judges whether that was the sink's doing.
                    raise next(
                        (o for o in outcomes if isinstance(o, Exception)),
                        DeliveryError(f"{sink.display}: nothing delivered"),
                    )
        except Exception as exc:
            if outcomes is None:  # not about one file (say, the connection): each goes alone
                log.debug("%s: a batch to %s failed: %s", pipeline, sink.display, exc)
                outcomes = [exc] * len(jobs)
        delivered: list[tuple[_BatchJob, TransferResult]] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, TransferCancelled):
                job.outcome = "cancelled"
            elif isinstance(outcome, TransferResult) and outcome.size == job.event.size:
                delivered.append((job, outcome))
            else:
                log.debug("%s: %s: %s (in a batch)", pipeline, job.event.relpath, outcome)
                job.outcome = "failed"
        self.manifest.record_many(
            [
                (
                    pipeline,
                    sink.key,
                    job.event.relpath,
                    ManifestEntry.now(
                        job.event.size,
                        job.event.mtime_ns,
                        result.sha256,
                        job.remote,
                        inode=job.event.inode,
                    ),
                )
                for job, result in delivered
            ]
        )
        for job, result in delivered:
            announce("delivered", job, result.size)

    def _plain_new_file(self, pipeline: Pipeline, claim: Claim) -> tuple[FileEvent, str] | None:
        """The file's event and remote name when it is as it was queued and no sink has any
        version of it; None otherwise."""
        assert isinstance(claim.job, Upload)
        queued = claim.job.event
        try:
            st = os.stat(queued.path)
            remote = safe_relative_path(queued.relpath)
        except (OSError, UnsafePathError):
            return None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (queued.size, queued.mtime_ns, queued.inode):
            return None
        try:
            known = any(
                self.manifest.get(pipeline.name, s.key, queued.relpath) for s in pipeline.sinks
            )
        except Exception:  # the state database: the one-by-one path reports it
            return None
        return None if known else (queued, remote)

    # --- one sink ----------------------------------------------------------------------------

    def _deliver(self, run: _Run, job: Job, sink: Sink, entry: ManifestEntry | None) -> None:
        event = job.event
        pipeline = event.pipeline
        attempt = run.claim.attempts + 1
        remote = job.remote_name
        if (
            entry is not None
            and entry.size == event.size
            and entry.remote == remote
            and run.sha256() == entry.sha256
        ):
            # Touched, not changed: record the new mtime and send nothing.
            self._record(job, sink, entry.sha256, entry.derived)
            self.emit(LifecycleEvent("unchanged", pipeline, event.relpath, sink=sink.key))
            return
        queued = run.claim.job
        if isinstance(queued, Move) and self._move_remote(job, sink, queued.moved_from):
            return
        self.emit(
            LifecycleEvent(
                "started",
                pipeline,
                event.relpath,
                sink=sink.key,
                remote=remote,
                size=event.size,
                attempt=attempt,
            )
        )
        result = self._transfer(
            TransferRequest(
                sink=sink,
                local_path=event.path,
                remote_path=sink.remote_path(remote),
                size=event.size,
                mtime_ns=event.mtime_ns,
                progress=self._progress(pipeline, event.relpath, sink, event.size),
                state_dir=self.state_dir,
                journal=self.journal,
                pace=self._pace(sink, pipeline),
                digests=self.digests,
            )
        )
        self._record(job, sink, result.sha256, self._send_derived(job, sink))
        self.emit(
            LifecycleEvent(
                "delivered",
                pipeline,
                event.relpath,
                sink=sink.key,
                remote=remote,
                size=result.size,
                attempt=attempt,
            )
        )

    def _move_remote(self, job: Job, sink: Sink, moved_from: str) -> bool:
        """Rename a delivered file remotely instead of sending it again; False to upload."""
        event = job.event
        old = self.manifest.get(event.pipeline, sink.key, moved_from)
        if old is None or not old.matches(event.size, event.mtime_ns):
            return False
        if old.remote != job.remote_name:
            target = sink.remote_path(job.remote_name)
            try:
                sink.ensure_folder(os.path.dirname(target))
                sink.fs.mv(sink.remote_path(old.remote), target)
            except FileNotFoundError:
                # An earlier attempt moved it and stopped before recording that.
                if not (sink.fs.exists(target) and sink.fs.size(target) == old.size):
                    return False
            except (OSError, NotImplementedError) as exc:
                log.info(
                    "%s: cannot move %s remotely (%s); uploading it again",
                    sink.display,
                    old.remote,
                    exc,
                )
                return False
        derived = self._send_derived(job, sink)
        self._remove_remote(sink, [name for name in old.derived if name not in derived])
        self._record(job, sink, old.sha256, derived)
        self.manifest.forget(event.pipeline, sink.key, moved_from)
        self.emit(
            LifecycleEvent(
                "moved",
                event.pipeline,
                event.relpath,
                sink=sink.key,
                remote=job.remote_name,
                size=old.size,
                reason=f"from {moved_from}",
            )
        )
        return True

    def _delete_remote(self, run: _Run) -> None:
        """Remove a deleted file from every sink with ``on_delete: delete``."""
        claim = run.claim
        if (run.pipeline.source_root / claim.relpath).exists():
            return  # it is back: a delete queued earlier must not remove the new version
        for sink in run.pipeline.sinks:
            if sink.on_delete != "delete":
                continue
            entry = self.manifest.get(claim.pipeline, sink.key, claim.relpath)
            if entry is None:
                continue
            with sink.guard():
                self._remove_remote(sink, [entry.remote, *entry.derived])
            self.manifest.forget(claim.pipeline, sink.key, claim.relpath)
            self.emit(
                LifecycleEvent(
                    "deleted", claim.pipeline, claim.relpath, sink=sink.key, remote=entry.remote
                )
            )

    def _record(
        self, job: Job, sink: Sink, sha256: str, derived: tuple[str, ...] | list[str]
    ) -> None:
        """The manifest now holds this version of the job's file at its remote name."""
        event = job.event
        entry = ManifestEntry.now(
            event.size, event.mtime_ns, sha256, job.remote_name, derived=derived, inode=event.inode
        )
        self.manifest.record_many([(event.pipeline, sink.key, event.relpath, entry)])

    def _send_derived(self, job: Job, sink: Sink) -> list[str]:
        """Deliver the job's derived files (sidecars, thumbnails); return their remote names."""
        names = []
        for derived in job.derived:
            name = safe_relative_path(derived.resolve(job.remote_name))
            st = derived.path.stat()
            self._transfer(
                TransferRequest(
                    sink=sink,
                    local_path=derived.path,
                    remote_path=sink.remote_path(name),
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    state_dir=self.state_dir,
                    journal=self.journal,
                    pace=self._pace(sink, job.pipeline),
                )
            )
            names.append(name)
        return names

    @staticmethod
    def _remove_remote(sink: Sink, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                sink.fs.rm(sink.remote_path(name))

    def _transfer(self, request: TransferRequest) -> TransferResult:
        if self.owners is not None:
            self.owners.claim(request.sink, request.remote_path)
        result: TransferResult | None = self.pm.hook.skyframe_transfer(request=request)
        if result is None:
            sink = request.sink
            raise DeliveryError(f"no transfer plugin handles {sink.protocol!r} ({sink.display})")
        if result.size != request.size:  # whatever plugin sent it, the size is checked here
            raise DeliveryError(
                f"{request.sink.display}: {request.remote_path} got {result.size} bytes "
                f"of {request.size}"
            )
        return result

    def _pace(self, sink: Sink, pipeline: str) -> Callable[[int], None]:
        """Before sending so many bytes: wait while the pipeline is paused, and as the sink's
        rate limits require."""
        limiter = sink.limiter
        cancelled = self._cancelled
        control = self.control

        stopping = self.stopping

        def hold() -> None:
            if control is not None and not control.wait_running(pipeline, cancelled, stopping):
                raise TransferCancelled  # stopping while paused: it resumes at the next start

        def pace(size: int) -> None:
            hold()
            if limiter:
                limiter.take(size, cancelled)
                hold()  # a pause that came while waiting for the budget
            if cancelled.is_set():
                raise TransferCancelled

        return pace

    def _progress(
        self, pipeline: str | None, relpath: str | None, sink: Sink, size: int
    ) -> Callable[[int], None]:
        last = [time.monotonic()]
        cancelled = self._cancelled

        def progress(done: int) -> None:
            if cancelled.is_set():
                raise TransferCancelled
            now = time.monotonic()
            if pipeline and relpath and now - last[0] >= PROGRESS_INTERVAL and done < size:
                last[0] = now
                self.emit(
                    LifecycleEvent(
                        "progress", pipeline, relpath, sink=sink.key, size=size, bytes_done=done
                    )
                )

        return progress
