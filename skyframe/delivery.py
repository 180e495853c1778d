"""Running claimed jobs: processes, then every sink on its own pool, then the verdict.

One road for every job: begin (rules if the file changed, processes, which sinks still need
this version), serve each sink, settle. A job's processes run on the processing pool; each
sink that still needs the file gets a task on that sink's pool (``concurrency`` at a time),
so a slow sink never holds up another's uploads. When every sink has answered, the job is
completed, retried with backoff, or dead-lettered. The manifest makes retries cheap: a sink
that already has this version of the file is skipped.

Urgent jobs (of priority high: small files, by default) go first on every pool: each pool
has an express thread that runs only them, so a photo is not stuck behind videos, and their
pieces go ahead of the others' in the sinks' bandwidth limits (see skyframe.pools and
skyframe.bandwidth).

Batching is a transfer detail on that road: small new files of a pipeline whose sinks all
have a batch sender (``skyframe_transfer_batch``) are begun together and each sink takes them
in one call; what a batch did not deliver to a sink is served alone on the same road.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from skyframe import backoff
from skyframe.control import Control
from skyframe.display import redact
from skyframe.errors import (
    DeliveryError,
    ProcessError,
    RemoteConflictError,
    SinkUnavailableError,
    SourceChangedError,
    SourceUnreadableError,
)
from skyframe.events import FileEvent, Job, LifecycleEvent, LifecycleKind
from skyframe.jobs import NORMAL, Delete, Move, QueuedJob, Upload
from skyframe.journal import UploadJournal
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.pools import PriorityPool
from skyframe.queue import Claim, JobQueue
from skyframe.sharing import RemoteNames, RemoteOwners
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
    #: the sinks that still need the file, with what each has of it now
    todo: list[tuple[Sink, ManifestEntry | None]] = field(default_factory=list)
    remaining: int = 0  #: sinks not yet served
    errors: list[BaseException] = field(default_factory=list)
    #: id of an error -> the sink it came from, for the failure events
    error_sinks: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _sha256: str | None = None
    _meta: dict[str, Any] | None = None
    _meta_done: bool = False

    def sha256(self) -> str:
        """The file's sha256, read at most once per job however many sinks ask."""
        with self.lock:
            if self._sha256 is None:
                assert self.job is not None
                self._sha256 = file_sha256(self.job.path)
            return self._sha256

    def meta(self) -> dict[str, Any] | None:
        """The job's ``meta`` as JSON (what is not JSON becomes its text; NaN and the
        infinities, which JSON has not, become null), None when empty; converted once however
        many sinks record it."""
        with self.lock:
            if not self._meta_done:
                self._meta_done = True
                if self.job is not None and self.job.meta:
                    text = json.dumps(self.job.meta, default=str)
                    self._meta = json.loads(text, parse_constant=_null)
            return self._meta

    def failed(self, sink: Sink, error: BaseException) -> None:
        """Serving ``sink`` failed with ``error``."""
        with self.lock:
            self.errors.append(error)
            self.error_sinks[id(error)] = sink.key

    def served(self, count: int = 1) -> bool:
        """``count`` more sinks are served (well or not); True for the caller that served the
        last one, which settles the run."""
        with self.lock:
            self.remaining -= count
            return count > 0 and self.remaining == 0

    @property
    def urgent(self) -> bool:
        """Whether the job goes first (a high priority: a small file, by default)."""
        return self.claim.priority > NORMAL

    @property
    def stopped(self) -> bool:
        """A transfer was cut by a stop: the job goes back to the queue, nothing more is sent."""
        with self.lock:
            return any(isinstance(e, TransferCancelled) for e in self.errors)


class JobRunner:
    """Turns claims into deliveries, retries and dead letters."""

    def __init__(
        self,
        *,
        pm: pluggy.PluginManager,
        queue: JobQueue,
        manifest: Manifest,
        pipelines: Mapping[str, Pipeline],
        state_dir: Path,
        journal: UploadJournal | None,
        workers: int,
        emit: Callable[[LifecycleEvent], None],
        on_finished: Callable[[int], None],
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
        #: Told the files whose jobs are done, by pipeline: (relpath, mtime_ns, job meta),
        #: before the queue completes them (the groups: see skyframe.groups).
        self.arrived: Callable[[str, list[tuple[str, int, dict[str, Any] | None]]], None] | None
        self.arrived = None
        self.queue = queue
        self.manifest = manifest
        #: which file each remote name of a pipeline's sink holds (two never share one)
        self.names = RemoteNames(manifest)
        #: the engine's shared mapping; a reload changes it through :meth:`switch`
        self.pipelines = pipelines
        self.state_dir = state_dir
        self.journal = journal
        self.emit = emit
        self._on_finished = on_finished
        self._cancelled = cancelled
        #: the ``executors:`` entries processes may run on, by name (the engine's)
        self.executors: dict[str, Any] = {}
        #: True in the daemon: an unreachable sink keeps files waiting without counting
        #: attempts. False for ``--once``, whose run must end: attempts count as usual.
        self.patient = False
        #: digests computed ahead of large transfers (``run --once`` fills it during its gate)
        self.digests = Digests()
        self._workers = workers
        #: Guards the pipelines' pools, batch senders and users across a reload.
        self._lock = threading.Lock()
        #: Every pipeline object in use, by id: the configured ones, and those a reload replaced
        #: while jobs still ran on them (they finish on the pipeline they began with).
        self._known: dict[int, Pipeline] = {}
        #: Runs (and batches) under way on each pipeline object, by id.
        self._users: dict[int, int] = {}
        #: Per pipeline object: each sink's batch sender, where every sink of the pipeline has
        #: one, the pipeline has no processes (they may rename files or add derived ones) and no
        #: sink a bandwidth limit (a batch would take its budget file by file, then send in a
        #: burst).
        self._batch_senders: dict[int, list[BatchTransfer]] = {}
        #: One pool per sink object (``concurrency`` threads and an express one): a sink a
        #: reload kept keeps it.
        self._sink_pools: dict[Sink, PriorityPool] = {}
        self._processing = PriorityPool(workers, name="skyframe-process")
        self._batches = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="skyframe-batch")
        #: How many jobs may be in flight at once: enough to keep every pool busy, no more.
        self.capacity = workers
        #: How many urgent jobs more may be in flight when ``capacity`` is reached: one per
        #: express thread, so that a photo is claimed even while videos fill the pools.
        self.express_capacity = 1
        with self._lock:
            self._install(pipelines.values())

    # --- the pipelines in use ----------------------------------------------------------------

    def _install(self, pipelines: Iterable[Pipeline]) -> None:
        """Give new pipeline objects their pools and batch senders; recount the capacity
        (under ``_lock``)."""
        for p in pipelines:
            if id(p) in self._known:
                continue
            self._known[id(p)] = p
            for sink in p.sinks:
                if sink not in self._sink_pools:
                    self._sink_pools[sink] = PriorityPool(sink.concurrency, name="skyframe-sink")
            senders = [self.pm.hook.skyframe_transfer_batch(sink=s) for s in p.sinks]
            limited = any(s.limiter for s in p.sinks)
            if p.sinks and not p.processes and not limited and all(senders):
                self._batch_senders[id(p)] = senders
        current = list(self.pipelines.values())
        self.capacity = self._workers + sum(s.concurrency for p in current for s in p.sinks)
        self.express_capacity = 1 + sum(len(p.sinks) for p in current)
        if any(id(p) in self._batch_senders for p in current):
            self.capacity += BATCH_SIZE * BATCH_THREADS

    def switch(self, replace: Callable[[], None]) -> None:
        """Reload: ``replace`` swaps the shared pipelines; the new ones get their pools first,
        and the old ones without jobs left are let go (their other pipelines' sinks closed)."""
        with self._lock:
            replace()
            self._install(self.pipelines.values())
            for p in list(self._known.values()):
                if not self._users.get(id(p)):
                    self._forget_if_retired(p)

    def _lease(self, name: str, pipeline: Pipeline | None = None) -> Pipeline | None:
        """The pipeline a run goes on (``pipeline``, else the configured one named ``name``),
        counted as in use until :meth:`_unlease`; None when it is not configured."""
        with self._lock:
            if pipeline is None:
                pipeline = self.pipelines.get(name)
            if pipeline is None or id(pipeline) not in self._known:
                return None
            self._users[id(pipeline)] = self._users.get(id(pipeline), 0) + 1
            return pipeline

    def _unlease(self, pipeline: Pipeline) -> None:
        with self._lock:
            left = self._users[id(pipeline)] - 1
            if left:
                self._users[id(pipeline)] = left
                return
            del self._users[id(pipeline)]
            self._forget_if_retired(pipeline)

    def _forget_if_retired(self, pipeline: Pipeline) -> None:
        """A pipeline a reload replaced, with no run left on it: close the sinks no other
        pipeline in use has, and stop their pools (under ``_lock``)."""
        if self.pipelines.get(pipeline.name) is pipeline:
            return
        self._known.pop(id(pipeline), None)
        self._batch_senders.pop(id(pipeline), None)
        kept = {s for p in self._known.values() for s in p.sinks}
        for sink in pipeline.sinks:
            if sink in kept:
                continue
            pool = self._sink_pools.pop(sink, None)
            if pool is not None:
                pool.shutdown(wait=False)  # a task it holds still runs
            try:
                sink.close()
            except Exception as exc:  # a connection that would not close: nothing to keep
                log.debug("%s: closing the replaced sink failed: %s", sink.display, exc)

    def sinks(self) -> list[Sink]:
        """Every sink in use: the configured ones and those jobs still finish on."""
        with self._lock:
            return list(self._sink_pools)

    def submit(self, claim: Claim) -> None:
        """Start a claimed job; ``on_finished`` is called once it is settled either way.

        A pipeline without processes has no heavy work before the upload: its jobs start on
        their first sink's pool and serve that sink in the same thread (one hand-over less).
        """
        with self._lock:  # a reload does not stop this pool meanwhile
            pipeline = self.pipelines.get(claim.pipeline)
            urgent = claim.priority > NORMAL
            if pipeline is not None and not pipeline.processes and pipeline.sinks:
                first = pipeline.sinks[0]
                self._sink_pools[first].submit(self._start, claim, first, urgent=urgent)
                return
        self._processing.submit(self._start, claim, urgent=urgent)

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
        configured = self.pipelines.get(pipeline)
        return (
            configured is not None
            and id(configured) in self._batch_senders
            and type(job) is Upload
            and job.accepted
            and job.event.size <= BATCH_FILE_LIMIT
        )

    def shutdown(self) -> None:
        """Stop the pools (callers wait for in-flight jobs first)."""
        self._batches.shutdown(wait=False, cancel_futures=True)
        self._processing.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # a straggler's end may retire a pool meanwhile
            pools = list(self._sink_pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- stages ------------------------------------------------------------------------------

    def _start(self, claim: Claim, inline: Sink | None = None) -> None:
        run = self._begin(claim)
        if run is not None:
            self._serve(run, inline)

    def _begin(self, claim: Claim, pipeline: Pipeline | None = None) -> _Run | None:
        """Everything before the sinks: the pipeline, a pause, sinks that are away, a remote
        delete, the rules and processes. Returns the run with the sinks still to serve, or
        None when the job is settled already.

        The run keeps the pipeline it begins with (``pipeline``, else the configured one) to
        its end, whatever a reload changes meanwhile.
        """
        leased = self._lease(claim.pipeline, pipeline)
        if leased is None:
            # Removed by a reload after it was claimed: it waits in the queue for its pipeline.
            self.queue.release(claim)
            self._on_finished(1)
            return None
        pipeline = leased
        if self.control is not None and self.control.is_held(pipeline.name):
            # Paused after it was claimed: back to the queue before anything runs.
            self._unlease(pipeline)
            self.queue.release(claim)
            self._on_finished(1)
            return None
        offline = [s.health.wait() for s in pipeline.sinks]
        if self.patient and offline and min(offline) > 0:
            # Every sink is away: wait for the next try without running the processes.
            self._unlease(pipeline)
            self.queue.retry(claim, pipeline.sinks[0].health.last_error, max(offline), count=False)
            self._on_finished(1)
            return None
        run = _Run(claim, pipeline, self.state_dir / "scratch" / claim.token)
        try:
            if isinstance(claim.job, Delete):
                self._delete_remote(run)
            else:
                run.todo = self._prepare(run)
        except BaseException as exc:
            run.errors.append(exc)
            run.todo = []
        if not run.todo:
            self._finish(run)
            return None
        run.remaining = len(run.todo)
        return run

    def _serve(self, run: _Run, inline: Sink | None = None) -> None:
        """Serve every sink the run still needs, each on its own pool (``inline`` in this
        thread)."""
        here = None
        for sink, entry in run.todo:
            if sink is inline:
                here = (sink, entry)
            else:
                pool = self._sink_pools[sink]
                pool.submit(self._serve_sink, run, sink, entry, urgent=run.urgent)
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
        unchanged = (event.size, event.mtime_ns) == (queued.size, queued.mtime_ns) and (
            event.inode == queued.inode or not queued.inode  # a Windows scan sees no inode
        )
        if unchanged and queued_job.accepted and run.claim.queued_at >= run.pipeline.accepted_since:
            rejection = None  # these rules accepted this very version when it was queued
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
        for index, step in enumerate(run.pipeline.processes):
            if self._cancelled.is_set():
                raise TransferCancelled
            if step.executor is None:
                step(job)
            else:  # on a cluster (skyframe.executors)
                self.executors[step.executor].run(step, job, index)
        job.remote_name = safe_relative_path(job.remote_name)
        for derived in job.derived:  # before anything is sent: the file itself must not go
            if safe_relative_path(derived.resolve(job.remote_name)) == job.remote_name:
                raise ProcessError(
                    f"a file a process made from it would be delivered as {job.remote_name}, "
                    "in place of the file itself"
                )
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
            run.failed(sink, exc)
        if run.served():
            self._finish(run)

    def _finish(self, run: _Run) -> None:
        self._finish_many([run])

    def _finish_many(self, runs: list[_Run]) -> None:
        """Settle runs whose sinks have all answered: the ones that went well are completed
        in one transaction, the others retried or dead-lettered."""
        done = [run for run in runs if not run.errors]
        try:
            if self.arrived is not None:
                # Before the queue forgets them: a crash in between runs them again.
                arrived: dict[str, list[tuple[str, int, dict[str, Any] | None]]] = {}
                for run in done:
                    if run.job is not None:
                        event = run.job.event
                        entry = (event.relpath, event.mtime_ns, run.meta())
                        arrived.setdefault(event.pipeline, []).append(entry)
                for pipeline, files in arrived.items():
                    self.arrived(pipeline, files)
            self.queue.complete_many([run.claim for run in done])
        except Exception as exc:  # the state database: the leases return at the next start
            # One line (the stack trace at debug level): a removed state directory, for one,
            # fails every job in flight at once, and the engine says why it stops.
            log.error("could not record the outcome of %d job(s): %s", len(done), exc)
            log.debug("the state database failed", exc_info=True)
        try:
            for run in runs:
                try:
                    if run.errors:
                        self._settle_failure(run)
                except Exception as exc:
                    log.error("could not record the outcome of %s: %s", run.claim.relpath, exc)
                    log.debug("the state database failed", exc_info=True)
                # Only processes write to a job's scratch folder.
                if run.pipeline.processes and run.scratch.exists():
                    shutil.rmtree(run.scratch, ignore_errors=True)
        finally:
            # Told together, without a system call between them: the dispatcher then refills
            # the room of a whole batch at once (woken in between, it handed out jobs one by
            # one, and the next batches held one or two files each).
            for run in runs:
                if self.job_ended is not None:
                    self.job_ended(run.claim.pipeline, run.claim.relpath)
                self._unlease(run.pipeline)
            self._on_finished(len(runs))

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
            if all(isinstance(e, SinkUnavailableError) for e in errors):
                # Not before the sink's own next try: until then an attempt would be refused
                # at once, spent without a byte sent (a one-shot run over a link that dropped
                # while the sinks were checked).
                waits = [s.health.wait() for s in run.pipeline.sinks]
                delay = max(delay, max(waits, default=0.0) + backoff.spread(0.2))
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

    # --- several small files to a sink at once -----------------------------------------------

    def _run_batch(self, claims: list[Claim]) -> None:
        """Jobs of one pipeline started together, on the same road as one job: each is begun
        as usual; those that are plain new files (small, no derived files, not a move, no
        sink has any version of them) are sent together, each sink's batch sender taking them
        at once, and recorded in one transaction; anything else, and a file the batch did not
        deliver to a sink, is served alone (the full logic: touched files, moves, error
        classification)."""
        pipeline = self._lease(claims[0].pipeline)
        if pipeline is None:
            for claim in claims:  # removed by a reload since: one by one
                self.submit(claim)
            return
        try:
            if id(pipeline) in self._batch_senders:
                self._send_batch(pipeline, claims)
            else:
                for claim in claims:  # changed by a reload since (no batches): one by one
                    self.submit(claim)
        finally:
            self._unlease(pipeline)

    def _send_batch(self, pipeline: Pipeline, claims: list[Claim]) -> None:
        """:meth:`_run_batch` on the pipeline it leased."""
        if (self.control is not None and self.control.is_held(pipeline.name)) or any(
            sink.health.wait() > 0 for sink in pipeline.sinks
        ):
            for claim in claims:  # paused, or a sink is away: _begin knows what to do
                self.submit(claim)  # (release, or wait for the sink)
            return
        together = self._begin_together(pipeline, claims)
        if not together:
            return
        served = dict.fromkeys(map(id, together), 0)  #: sinks each run was served by here
        alone: list[tuple[_Run, Sink]] = []
        for sink, send in zip(pipeline.sinks, self._batch_senders[id(pipeline)], strict=True):
            try:
                outcomes = self._send_together(sink, send, together)
            except Exception as exc:  # before anything was sent (the state database): alone
                log.error("%s: a batch to %s could not start: %s", pipeline.name, sink.display, exc)
                log.debug("the batch could not start", exc_info=True)
                outcomes = [(run, False) for run in together]
            for run, sent in outcomes:
                if sent:
                    served[id(run)] += 1
                else:
                    alone.append((run, sink))
        for run, sink in alone:  # on the sink's pool; whoever serves a run's last sink settles it
            self._sink_pools[sink].submit(self._serve_sink, run, sink, None, urgent=run.urgent)
        self._finish_many([run for run in together if run.served(served[id(run)])])

    def _begin_together(self, pipeline: Pipeline, claims: list[Claim]) -> list[_Run]:
        """Begin each job on ``pipeline``; serve at once those that do not go in the batch,
        return the rest."""
        together = []
        for claim in claims:
            run = self._begin(claim, pipeline)
            if run is None:
                continue
            if self._goes_together(run):
                together.append(run)
            else:
                self._serve(run)
        return together

    def _goes_together(self, run: _Run) -> bool:
        """Whether a begun run is a plain new file, to send with others."""
        job = run.job
        return (
            job is not None
            and type(run.claim.job) is Upload
            and not job.derived
            and job.event.size <= BATCH_FILE_LIMIT
            and len(run.todo) == len(run.pipeline.sinks)
            and all(entry is None for _sink, entry in run.todo)
        )

    def _claim_remotes(
        self, sink: Sink, runs: list[_Run], held: contextlib.ExitStack
    ) -> list[_Run]:
        """The runs whose remote path is theirs to write (see RemoteOwners and RemoteNames:
        the names stay claimed until ``held`` closes); the others go alone, where the
        conflict is reported."""
        shared = self.owners is not None and self.owners.active
        mine = []
        for run in runs:
            assert run.job is not None
            event, remote = run.job.event, run.job.remote_name
            try:
                if shared:
                    assert self.owners is not None
                    self.owners.claim(sink, sink.remote_path(remote))
                held.enter_context(self.names.claim(event.pipeline, sink, remote, event.relpath))
            except RemoteConflictError:
                continue
            mine.append(run)
        return mine

    def _send_together(
        self, sink: Sink, send: BatchTransfer, runs: list[_Run]
    ) -> list[tuple[_Run, bool]]:
        """Send the runs' files to one sink in one batch; record and announce what arrived.
        Returns each run with whether this sink is served (delivered, or the transfer was
        cut by a stop, recorded as the run's error); False: to send alone."""
        # A run cut by a stop goes back to the queue: nothing more is sent for it.
        outcome = {id(run): True for run in runs if run.stopped}
        with contextlib.ExitStack() as held:
            mine = self._claim_remotes(sink, [run for run in runs if id(run) not in outcome], held)
            self._send_claimed(sink, send, mine, outcome)
        return [(run, outcome.get(id(run), False)) for run in runs]

    def _send_claimed(
        self, sink: Sink, send: BatchTransfer, mine: list[_Run], outcome: dict[int, bool]
    ) -> None:
        """:meth:`_send_together` of the runs whose remote names are claimed; ``outcome``
        takes each run that is served."""
        if mine:
            for run in mine:
                self._announce("started", run, sink)
            requests = [self._request(run, sink, progress=False) for run in mine]
            results: list[TransferResult | Exception] | None = None
            try:
                # The sink's health follows the batch as it follows a single transfer: a file
                # that arrived means the sink answers (after an outage: "reachable again").
                with sink.guard(), sink.sending_files(len(requests)):
                    results = send(requests)
                    if not any(isinstance(result, TransferResult) for result in results):
                        # Nothing arrived: the guard judges whether that was the sink's doing.
                        raise next(
                            (r for r in results if isinstance(r, Exception)),
                            DeliveryError(f"{sink.display}: nothing delivered"),
                        )
            except Exception as exc:
                if results is None:  # not about one file (say, the connection): each alone
                    log.debug("%s: a batch to %s failed: %s", sink.owner, sink.display, exc)
                    results = [exc] * len(mine)
            delivered: list[tuple[_Run, TransferResult]] = []
            for run, result in zip(mine, results, strict=True):
                assert run.job is not None
                if isinstance(result, TransferCancelled):
                    run.failed(sink, result)
                    outcome[id(run)] = True
                elif isinstance(result, TransferResult) and result.size == run.job.event.size:
                    delivered.append((run, result))
                    outcome[id(run)] = True
                else:
                    log.debug("%s: %s: %s (in a batch)", sink.owner, run.claim.relpath, result)
            try:
                self._record([(run, sink, result.sha256, ()) for run, result in delivered])
            except Exception as exc:  # the state database: each run is retried
                log.error("%s: cannot record %d file(s) sent: %s", sink.owner, len(delivered), exc)
                for run, _result in delivered:
                    run.failed(sink, exc)
                delivered = []
            for run, result in delivered:
                self._announce("delivered", run, sink, result.size, result.sha256)

    # --- one sink ----------------------------------------------------------------------------

    def _deliver(self, run: _Run, job: Job, sink: Sink, entry: ManifestEntry | None) -> None:
        event = job.event
        if (
            entry is not None
            and entry.size == event.size
            and entry.remote == job.remote_name
            and run.sha256() == entry.sha256
        ):
            # Touched, not changed: record the new mtime and send nothing.
            self._record([(run, sink, entry.sha256, entry.derived)])
            self.emit(LifecycleEvent("unchanged", event.pipeline, event.relpath, sink=sink.key))
            return
        queued = run.claim.job
        moved_from = queued.moved_from if isinstance(queued, Move) else None
        # A move onto a name another file holds is refused as an upload there would be.
        with self.names.claim(event.pipeline, sink, job.remote_name, event.relpath, moved_from):
            if moved_from is not None and self._move_remote(run, job, sink, moved_from):
                return
            self._announce("started", run, sink)
            result = self._transfer(self._request(run, sink, progress=True))
            derived = self._send_derived(job, sink, urgent=run.urgent)
            self._record([(run, sink, result.sha256, derived)])
        self._announce("delivered", run, sink, result.size, result.sha256)

    def _announce(
        self, kind: LifecycleKind, run: _Run, sink: Sink, size: int = -1, sha256: str = ""
    ) -> None:
        """``started`` or ``delivered`` (``size`` and ``sha256``: what arrived) of a run's
        file to a sink."""
        assert run.job is not None
        event = run.job.event
        self.emit(
            LifecycleEvent(
                kind,
                event.pipeline,
                event.relpath,
                sink=sink.key,
                remote=run.job.remote_name,
                size=event.size if size < 0 else size,
                sha256=sha256 or None,
                attempt=run.claim.attempts + 1,
                meta=run.meta() if kind == "delivered" else None,
            )
        )

    def _request(self, run: _Run, sink: Sink, *, progress: bool) -> TransferRequest:
        """The transfer of a run's file to a sink (``progress``: with progress events)."""
        assert run.job is not None
        event = run.job.event
        return TransferRequest(
            sink=sink,
            local_path=event.path,
            remote_path=sink.remote_path(run.job.remote_name),
            size=event.size,
            mtime_ns=event.mtime_ns,
            progress=self._progress(
                event.pipeline if progress else None, event.relpath, sink, event.size
            ),
            state_dir=self.state_dir,
            journal=self.journal,
            pace=self._pace(sink, event.pipeline, urgent=run.urgent),
            digests=self.digests,
            urgent=run.urgent,
        )

    def _move_remote(self, run: _Run, job: Job, sink: Sink, moved_from: str) -> bool:
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
        derived = self._send_derived(job, sink, urgent=run.urgent)
        self._remove_remote(sink, [name for name in old.derived if name not in derived])
        self._record([(run, sink, old.sha256, derived)])
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
        self, deliveries: list[tuple[_Run, Sink, str, tuple[str, ...] | list[str]]]
    ) -> None:
        """The manifest now holds these versions of the runs' files at their remote names,
        given as (run, sink, sha256, derived names), in one transaction."""
        entries = []
        for run, sink, sha256, derived in deliveries:
            assert run.job is not None
            event, remote = run.job.event, run.job.remote_name
            entry = ManifestEntry.now(
                event.size,
                event.mtime_ns,
                sha256,
                remote,
                derived=derived,
                inode=event.inode,
                meta=run.meta(),
            )
            entries.append((event.pipeline, sink.key, event.relpath, entry))
        self.manifest.record_many(entries)

    def _send_derived(self, job: Job, sink: Sink, *, urgent: bool = False) -> list[str]:
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
                    pace=self._pace(sink, job.pipeline, urgent=urgent),
                    urgent=urgent,
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
        with request.sink.sending_files():
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

    def _pace(self, sink: Sink, pipeline: str, *, urgent: bool = False) -> Callable[[int], None]:
        """Before sending so many bytes: wait while the pipeline is paused, and as the sink's
        rate limits require (``urgent`` pieces first)."""
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
                limiter.take(size, cancelled, urgent=urgent)
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


def _null(_constant: str) -> None:
    """``NaN``, ``Infinity``, ``-Infinity`` read back as null: a hub, a webhook's receiver or
    a browser would refuse the JSON that held them."""
    return None
