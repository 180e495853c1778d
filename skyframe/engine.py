"""The engine: scan and watch sources, apply rules, queue, and hand claims to the job runner.

``run_once()`` scans every source, waits for recently written files to settle, delivers until
nothing is left, and returns. ``run_daemon()`` starts the watchers first (so nothing written
during the catch-up scan is missed), scans, then keeps delivering until ``stop()``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from skyframe.bandwidth import Limiter, TokenBucket
from skyframe.config import Config
from skyframe.control import Control
from skyframe.delivery import JobRunner
from skyframe.display import RepeatedLog, is_utf8, shown
from skyframe.errors import PluginError, RuleError, SkyframeError, StateError
from skyframe.events import EventKind, FileEvent, LifecycleEvent, LifecycleKind
from skyframe.history import History
from skyframe.journal import UploadJournal
from skyframe.notifiers import Notifiers
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.queue import Claim, JobQueue
from skyframe.scanner import refusal, scan_source
from skyframe.sharing import RemoteOwners
from skyframe.state import Manifest, StateLock
from skyframe.status import StatusTracker
from skyframe.watcher import Settler, SourceWatcher, WatchCallbacks

if TYPE_CHECKING:
    from skyframe.api import ApiServer
    from skyframe.webhook import WebhookNotifier

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 0.05  #: seconds between settle checks
WATCHER_CHECK_INTERVAL = 2.0  #: seconds between checks that the observers are alive
RESCAN_POLL_INTERVAL = 0.2  #: seconds between checks for due or requested rescans
SCAN_BATCH = 256  #: files a scan queues per transaction
CLAIM_BATCH = 64  #: jobs the dispatcher leases per transaction
#: volatile jobs (run --once) waiting to be handed out at most; the scan queues the others on
#: disk as usual, so a first run over a huge folder keeps its memory bounded
VOLATILE_BACKLOG = 10_000
#: Seconds beyond ``settle`` that a deleted file is remembered, to recognise it if it reappears.
MOVE_SLACK = 2.0
#: files not taken (see scanner.refusal) whose warning is not repeated, at most
MAX_REFUSALS_REMEMBERED = 10_000


@dataclass(frozen=True)
class _Vanished:
    """A delivered file that disappeared: a move (same inode, size, mtime) if it reappears."""

    relpath: str
    size: int
    mtime_ns: int
    expires: float


@dataclass
class RunSummary:
    """Counts for one run, for the CLI's summary and exit code."""

    queued: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    unchanged: int = 0
    skipped: int = 0
    moved: int = 0
    deleted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  #: "pipeline:relpath" -> last error
    scan_errors: int = 0
    #: files not taken from a source: a name that is not UTF-8, a link outside the source
    refused: int = 0
    dead_letters: int = 0  #: jobs in the dead-letter list when a --once run ended
    interrupted: bool = False  #: a --once run was stopped before the queue was empty
    held: int = 0  #: jobs a --once run left in the queue because their pipeline is paused

    @property
    def ok(self) -> bool:
        """True when every accepted file was delivered (or needed no delivery)."""
        return not self.failed and not self.dead_letters and not self.interrupted and not self.held

    def count(self, event: LifecycleEvent) -> None:
        """Add one lifecycle event to the counts."""
        kind = event.kind
        if kind == "queued":
            self.queued += 1
        elif kind == "rejected":
            self.rejected[event.rule or "?"] += 1
        elif kind == "unchanged":
            self.unchanged += 1
        elif kind == "skipped":
            self.skipped += 1
        elif kind == "delivered":
            self.delivered += 1
            self.delivered_bytes += event.size or 0
        elif kind == "moved":
            self.moved += 1
        elif kind == "deleted":
            self.deleted += 1
        elif kind == "dead-lettered":
            self.failed[f"{event.pipeline}:{event.relpath}"] = event.reason or "failed"


class _Source:
    """A pipeline's source as the daemon sees it: settler, watcher and rescan timer."""

    def __init__(self, engine: Engine, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.settler = Settler(
            pipeline.source.settle, lambda path: engine.file_ready(pipeline, path, "modified")
        )
        self.watcher: SourceWatcher | None = None
        self.rescan_requested = threading.Event()
        self.next_rescan = 0.0
        self.caught_up = False  #: a complete scan ran since the start
        self.real_root = pipeline.source_root.resolve()
        self.refused: set[str] = set()  #: files whose refusal was said (see Engine._refused)


class Engine:
    """Runs pipelines against the queue and manifest of a locked state directory."""

    def __init__(self, config: Config, pm: pluggy.PluginManager, pipelines: list[Pipeline]) -> None:
        self.config = config
        self.pm = pm
        self.pipelines = {p.name: p for p in pipelines}
        self.state_dir = config.state_path
        self.summary = RunSummary()
        self._summary_lock = threading.Lock()
        self._lock = StateLock(self.state_dir)
        self._open_state()
        self.queue.add_lanes(list(self.pipelines))
        self.tracker = StatusTracker(pipelines, self.queue.counts_by_pipeline, self.control.state)
        self.notifiers = Notifiers(pm)
        #: Called straight from emit(): they never block, and keep their own buffer.
        self.webhooks: list[WebhookNotifier] = []
        if config.notify:
            from skyframe.webhook import WebhookNotifier  # aiohttp: only when configured

            self.webhooks = [
                WebhookNotifier(entry.webhook, name=f"webhook-{index + 1}")
                for index, entry in enumerate(config.notify)
            ]
        self.api: ApiServer | None = None
        #: Told the API's address once it listens (the CLI prints it).
        self.on_api: Callable[[str], None] | None = None
        #: Called by ``run_once`` before the first job is handed out, while the scans run; what
        #: it raises ends the run (the CLI's check of the sinks, under way since start-up).
        self.gate: Callable[[], None] | None = None
        #: True while run_once waits for the gate (files are hashed ahead: see Digests), and
        #: until its scan is done (small files bound for batches are then handed out without a
        #: queue record: JobQueue.volatile, from the list below)
        self._hashing_ahead = self._volatile_open = False
        self._volatile_claims: deque[Claim] = deque()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        #: a scan was cut short; run_once's scans are under way
        self._scan_cut = self._scanning = False
        self._scan_failure: BaseException | None = None
        #: what ended the run early (the state directory vanished), raised when it ends
        self._fatal: SkyframeError | None = None
        self._errors = RepeatedLog(log)  #: errors of steps retried every tick, said once
        #: Set once the watchers run and the first catch-up scan of every source is done.
        self.ready = threading.Event()
        self._wake = threading.Condition()
        self._in_flight = 0
        self._sources = {p.name: _Source(self, p) for p in pipelines}
        if config.bwlimit:  # one budget for every sink, on top of each sink's own
            shared = TokenBucket(config.bwlimit)
            for sink in (s for p in pipelines for s in p.sinks):
                sink.limiter = Limiter([shared, *sink.limiter.buckets])
        self._vanished: dict[tuple[str, int], _Vanished] = {}
        self._vanished_lock = threading.Lock()
        self.runner = JobRunner(
            pm=pm,
            queue=self.queue,
            manifest=self.manifest,
            pipelines=self.pipelines,
            state_dir=self.state_dir,
            journal=self.journal,
            workers=config.workers,
            emit=self.emit,
            on_finished=self._job_finished,
            cancelled=self._cancel,
            control=self.control,
            stopping=self._stop,
            owners=RemoteOwners((s for p in pipelines for s in p.sinks), self.manifest),
        )
        self.runner.job_ended = self.tracker.job_ended

    def _open_state(self) -> None:
        """Lock the state directory and open its databases (all, or none and unlocked)."""
        self._lock.acquire()
        opened: list[Any] = []
        try:
            self.queue = JobQueue(self.state_dir / "queue")
            opened.append(self.queue)
            self.manifest = Manifest(self.state_dir / "manifest")
            opened.append(self.manifest)
            self.journal = UploadJournal(self.state_dir / "uploads")
            opened.append(self.journal)
            self.history = History(
                self.state_dir,
                retention=self.config.history.retention,
                max_events=self.config.history.max_events,
            )
            opened.append(self.history)
            self.control = Control(self.state_dir, self.pipelines)
        except BaseException:
            for each in reversed(opened):
                each.close()
            self._lock.release()
            raise

    @property
    def abandoned(self) -> int:
        """Jobs still running after the shutdown deadline (their leases return at next start)."""
        with self._wake:
            return self._in_flight

    def close(self) -> None:
        """Stop the pools, close the databases and release the state directory.

        With jobs still running past the deadline, nothing is closed and the lock is kept: the
        process must exit (the queue is durable), so that no second instance can start while
        an old upload is still writing.
        """
        if self.abandoned:
            return
        self.runner.shutdown()
        for pipeline in self.pipelines.values():
            for sink in pipeline.sinks:
                sink.close()
        self.queue.close()
        self.manifest.close()
        self.journal.close()
        self.history.close()
        self._lock.release()

    # --- events ------------------------------------------------------------------------------

    def emit(self, event: LifecycleEvent) -> None:
        """Count the event, record it, and hand it to every notifier (each on its own thread:
        a slow or failing notifier never holds up the caller)."""
        with self._summary_lock:
            self.summary.count(event)
        api = self.api  # it may go away meanwhile (a stop while transfers still run)
        for consume in (
            self.tracker.observe,
            self.history.record,
            *((api.publish,) if api is not None else ()),  # its stream and metrics
            *(webhook.skyframe_event for webhook in self.webhooks),
            self.notifiers.publish,
        ):
            try:
                consume(event)
            except Exception:  # monitoring must never fail a transfer
                log.exception("could not record a %s event", event.kind)

    # --- control (the API's) -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status document of ``GET /api/status`` (docs/api.md)."""
        return self.tracker.snapshot()

    def set_paused(
        self, paused: bool, pipeline: str | None = None, *, reason: str = ""
    ) -> dict[str, Any]:
        """Pause or resume everything or one pipeline (KeyError for an unknown one); the
        switch is saved at once. Returns the pause state after the change."""
        changed = self.control.set(paused, pipeline)
        kind: LifecycleKind = "paused" if paused else "resumed"
        for name in changed:
            log.log(logging.WARNING if paused else logging.INFO, "%s: %s %s", name, kind, reason)
            self.emit(LifecycleEvent(kind, name, "", reason=reason or None))
        self._notify()
        return self.control.state()

    def retry_dead(self, pipeline: str | None = None, relpath: str | None = None) -> int:
        """Move dead-lettered jobs back into the queue; returns how many."""
        moved = self.queue.requeue_dead(pipeline, relpath)
        if moved:
            self._notify()
        return moved

    def history_query(self, **criteria: Any) -> list[dict[str, Any]]:
        """Recorded events, newest first (see :meth:`History.query`)."""
        self.history.flush()
        return self.history.query(**criteria)

    def alive(self) -> bool:
        """True while the engine runs and has not been asked to stop."""
        return not self._stop.is_set()

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether every sink answers, and each sink's health."""
        sinks = [
            {
                "pipeline": p.name,
                "sink": s.key,
                "health": s.health.state,
                "last_error": s.health.last_error or None,
            }
            for p in self.pipelines.values()
            for s in p.sinks
        ]
        ready = self.ready.is_set() and all(s["health"] in ("ok", "unknown") for s in sinks)
        return ready, sinks

    # --- intake: scans and watch events ------------------------------------------------------

    def scan(self, pipeline: Pipeline) -> None:
        """Compare the source with the manifest: queue what is new or changed (and deleted,
        for sinks with ``on_delete: delete``). Recently modified files go through the settler."""
        source = self._sources[pipeline.name]
        settle = source.settler.settle
        mirrors_deletes = any(s.on_delete == "delete" for s in pipeline.sinks)
        # One entry per file found: kept only where it serves, to find the deleted ones.
        seen: set[str] = set()
        found = 0
        errors = [0]
        began = time.time()

        def on_error(path: Path, exc: OSError) -> None:
            errors[0] += 1
            with self._summary_lock:
                self.summary.scan_errors += 1
            log.warning("%s: cannot read %s: %s", pipeline.name, shown(path), exc.strerror or exc)

        batch: list[tuple[FileEvent, str | None]] = []
        for event in scan_source(
            pipeline.name,
            pipeline.source_root,
            recursive=pipeline.recursive,
            follow_symlinks=pipeline.source.follow_symlinks,
            on_error=on_error,
            on_skip=lambda path, reason: self._refused(pipeline, path, reason),
        ):
            if self._stop.is_set():
                self._scan_cut = True
                return
            found += 1
            if mirrors_deletes:
                seen.add(event.relpath)
            if settle > 0 and time.time() - event.mtime_ns / 1e9 < settle:
                source.settler.touch(event.path)
            else:
                batch.append((event, None))
                if len(batch) >= SCAN_BATCH:
                    self.offer_many(pipeline, batch)
                    batch = []
        if batch:
            self.offer_many(pipeline, batch)
        complete = not errors[0] and bool(found) and pipeline.source_root.is_dir()
        if complete and not source.caught_up:
            # Only files that went while skyframe was down can leave such entries behind (a
            # deletion seen by the watcher drops its job), so the first scan is enough.
            self._forget_dead_letters_of_gone_files(pipeline)
            source.caught_up = True
        if not mirrors_deletes:
            return
        # Files delivered after this scan began may sit in folders it had already listed.
        missing = self._delivered_relpaths(pipeline, before=began) - seen
        if missing and not complete:
            # An unmounted card, an empty mount point or an unreadable folder looks exactly
            # like "everything was deleted": never mirror that onto the sink.
            log.warning(
                "%s: %d delivered file(s) missing from %s, but the scan %s: not deleting "
                "remote copies",
                pipeline.name,
                len(missing),
                pipeline.source_root,
                "met errors" if errors[0] else "found no files at all",
            )
            return
        for relpath in missing:
            self._queue_delete(pipeline, relpath)

    def _forget_dead_letters_of_gone_files(self, pipeline: Pipeline) -> None:
        """A dead-lettered upload whose file no longer exists has nothing left to deliver."""
        for record in self.queue.records("dead"):
            relpath = record["relpath"]
            if record["pipeline"] != pipeline.name:
                continue
            if record["payload"].get("action") != "upload":
                continue
            if not (pipeline.source_root / relpath).exists():
                self.queue.discard(pipeline.name, relpath)
                log.info(
                    "%s: %s is gone: dropped from the dead-letter list", pipeline.name, relpath
                )

    def _delivered_relpaths(self, pipeline: Pipeline, before: float) -> set[str]:
        return {
            rel
            for name, _sink, rel, entry in self.manifest.entries()
            if name == pipeline.name and entry.delivered_at < before
        }

    def offer(self, pipeline: Pipeline, event: FileEvent, moved_from: str | None = None) -> None:
        """Apply the rules to one file and queue it unless rejected or already delivered."""
        self.offer_many(pipeline, [(event, moved_from)])

    def offer_many(
        self, pipeline: Pipeline, offers: Sequence[tuple[FileEvent, str | None]]
    ) -> None:
        """Offer files; those to deliver are queued in one transaction, then events go out."""
        events: list[LifecycleEvent] = []
        to_queue: list[tuple[FileEvent, dict[str, Any], str]] = []
        for event, moved_from in offers:
            decision = self._decide(pipeline, event, moved_from)
            if isinstance(decision, LifecycleEvent):
                events.append(decision)
            else:
                to_queue.append((event, *decision))
        if to_queue:
            # In a one-shot run, the files a batch takes need no record on disk (see
            # JobQueue.volatile): the next run's scan finds again whatever this one leaves.
            fast = self._volatile_open and pipeline.name not in self.control.held()
            claims: list[Claim] = []
            queued: list[FileEvent] = []
            with self.queue.batch():
                room = VOLATILE_BACKLOG - len(self._volatile_claims) if fast else 0
                for event, payload, version in to_queue:
                    if len(claims) < room and self.runner.batchable(pipeline.name, payload):
                        claim = self.queue.volatile(pipeline.name, event.relpath, payload, version)
                        if claim is not None:
                            claims.append(claim)
                            queued.append(event)
                            continue
                    if self.queue.put(pipeline.name, event.relpath, payload, version):
                        queued.append(event)
            if claims:
                with self._wake:
                    self._volatile_claims.extend(claims)
            events += [
                LifecycleEvent("queued", pipeline.name, e.relpath, size=e.size) for e in queued
            ]
            if self._hashing_ahead:
                self._hash_ahead(pipeline, queued)
        for lifecycle in events:
            self.emit(lifecycle)
        if to_queue:
            self._notify()

    def _hash_ahead(self, pipeline: Pipeline, events: list[FileEvent]) -> None:
        """Have the files a sink hashes before sending (``Endpoint.hashes_from``) hashed now,
        while the gate is closed and the CPU is otherwise idle."""
        limits = [s.endpoint.hashes_from for s in pipeline.sinks if s.endpoint.hashes_from]
        if not limits:
            return
        smallest = min(limits)
        for event in events:
            if event.size >= smallest:
                self.runner.digests.ahead(event.path, event.size, event.mtime_ns)

    def _decide(
        self, pipeline: Pipeline, event: FileEvent, moved_from: str | None
    ) -> LifecycleEvent | tuple[dict[str, Any], str]:
        """What to do with a file: an event (rejected, unchanged), or a payload to queue."""
        accepted = True
        try:
            rejection = evaluate_rules(pipeline.rules, event)
        except RuleError as exc:
            # Queue it anyway: the worker meets the same error and dead-letters the file, where
            # it stays visible and can be retried once the rule is fixed.
            log.debug("%s: %s: %s", pipeline.name, event.relpath, exc)
            rejection = None
            accepted = False
        if rejection is not None:
            rule_name, reason = rejection
            return LifecycleEvent(
                "rejected",
                pipeline.name,
                event.relpath,
                rule=rule_name,
                reason=reason,
                size=event.size,
            )
        if moved_from is None:
            moved_from = self._moved_origin(pipeline, event)
        if moved_from is None and all(
            self.manifest.is_delivered(
                pipeline.name, sink.key, event.relpath, event.size, event.mtime_ns
            )
            for sink in pipeline.sinks
        ):
            return LifecycleEvent("unchanged", pipeline.name, event.relpath, size=event.size)
        payload: dict[str, Any] = {"action": "upload", "event": event.to_json()}
        if accepted:
            payload["accepted"] = True  # the worker need not run the rules again on this version
        if moved_from is not None:
            payload["moved_from"] = moved_from
        return payload, f"{event.size}:{event.mtime_ns}:{event.inode}:{moved_from or ''}"

    def _refused(self, pipeline: Pipeline, path: Path, reason: str) -> None:
        """A file the source holds but that is not taken: said once per file and run."""
        said = self._sources[pipeline.name].refused
        key = shown(path)
        with self._summary_lock:
            if key in said:
                return
            if len(said) >= MAX_REFUSALS_REMEMBERED:
                said.clear()
            said.add(key)
            self.summary.refused += 1
        log.warning("%s: not sent: %s: %s", pipeline.name, shown(path), reason)

    def file_ready(
        self, pipeline: Pipeline, path: Path, kind: EventKind, moved_from: str | None = None
    ) -> None:
        """A watched file settled (or was renamed into place): stat it and offer it."""
        source = self._sources[pipeline.name]
        reason = refusal(path, source.real_root, pipeline.source.follow_symlinks)
        if reason is not None:
            self._refused(pipeline, path, reason)
            return
        relpath = self._relpath(pipeline, path)
        if relpath is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", pipeline.name, shown(path), exc.strerror)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        self.offer(
            pipeline,
            FileEvent.from_stat(pipeline.name, path, relpath, st, kind),
            moved_from,
        )

    def _relpath(self, pipeline: Pipeline, path: Path) -> str | None:
        """The path relative to the source, or None for a path outside it or one that cannot
        be recorded (a name that is not UTF-8: never queued, so nothing to move or delete)."""
        try:
            rel = path.relative_to(pipeline.source_root)
        except ValueError:
            return None
        if not is_utf8(str(rel)):
            return None
        if not pipeline.recursive and len(rel.parts) > 1:
            return None
        return rel.as_posix()

    def _on_deleted(self, pipeline: Pipeline, path: Path) -> None:
        self._sources[pipeline.name].settler.forget(path)
        relpath = self._relpath(pipeline, path)
        if relpath is None:
            return
        # Created and deleted before delivery: nothing is sent.
        self.queue.discard(pipeline.name, relpath)
        # A "delete" may be half of a move whose other half arrives later (a rename into a
        # folder created a moment ago is reported as delete + create): remember the file for a
        # while; remote deletes wait until it is clear that it did not reappear.
        for sink in pipeline.sinks:
            entry = self.manifest.get(pipeline.name, sink.key, relpath)
            if entry is not None and entry.inode:
                expires = time.monotonic() + pipeline.source.settle + MOVE_SLACK
                with self._vanished_lock:
                    self._vanished[(pipeline.name, entry.inode)] = _Vanished(
                        relpath, entry.size, entry.mtime_ns, expires
                    )
                return
        self._queue_delete(pipeline, relpath)

    def _moved_origin(self, pipeline: Pipeline, event: FileEvent) -> str | None:
        """The old relative path if this file is a delivered one that vanished a moment ago."""
        if not event.inode:
            return None
        with self._vanished_lock:
            gone = self._vanished.get((pipeline.name, event.inode))
            if gone is None or (gone.size, gone.mtime_ns) != (event.size, event.mtime_ns):
                return None
            del self._vanished[(pipeline.name, event.inode)]
        return gone.relpath if gone.relpath != event.relpath else None

    def _expire_vanished(self) -> None:
        """Files that did not reappear in time were deleted: mirror that where configured."""
        now = time.monotonic()
        with self._vanished_lock:
            expired = [(k, v) for k, v in self._vanished.items() if v.expires <= now]
            for key, _ in expired:
                del self._vanished[key]
        for (name, _inode), gone in expired:
            self._queue_delete(self.pipelines[name], gone.relpath)

    def _queue_delete(self, pipeline: Pipeline, relpath: str) -> None:
        if (pipeline.source_root / relpath).exists():
            return  # it came back (rewritten, or moved back): nothing to delete
        if any(
            sink.on_delete == "delete"
            and self.manifest.get(pipeline.name, sink.key, relpath) is not None
            for sink in pipeline.sinks
        ):
            payload = {"action": "delete", "relpath": relpath}
            self.queue.put(pipeline.name, relpath, payload, "deleted")
            self._notify()

    def _on_moved(self, pipeline: Pipeline, src: Path, dest: Path) -> None:
        source = self._sources[pipeline.name]
        source.settler.forget(src)
        src_rel = self._relpath(pipeline, src)
        if src_rel is None:  # moved in from outside the source: complete by construction
            self.file_ready(pipeline, dest, "moved")
            return
        if self._relpath(pipeline, dest) is None:  # moved out: as good as deleted
            self._on_deleted(pipeline, src)
            return
        # A move before delivery delivers under the new name only.
        self.queue.discard(pipeline.name, src_rel)
        delivered = any(self.manifest.get(pipeline.name, s.key, src_rel) for s in pipeline.sinks)
        if delivered and self._relpath(pipeline, dest) is not None:
            # Forget any identity remembered for the old path: this is the move itself.
            with self._vanished_lock:
                for key in [k for k, v in self._vanished.items() if v.relpath == src_rel]:
                    del self._vanished[key]
        self.file_ready(pipeline, dest, "moved", moved_from=src_rel if delivered else None)

    # --- dispatch ----------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _job_finished(self) -> None:
        with self._wake:
            self._in_flight -= 1
            self._wake.notify_all()

    def _idle(self) -> bool:
        return (
            not self._scanning
            and not self._volatile_claims
            and self._in_flight == 0
            and self.queue.next_due() is None
            and not any(len(s.settler) for s in self._sources.values())
        )

    def _dispatch(self, *, until_idle: bool) -> None:
        """Claim jobs and hand them to the runner until stopped (or idle, with until_idle)."""
        while not self._stop.is_set():
            with self._wake:
                if self._in_flight >= self.runner.capacity:
                    self._wake.wait(0.5)
                    continue
            with self._wake:
                room = self.runner.capacity - self._in_flight
            held = self.control.held()
            claims = self._take_volatile(min(room, CLAIM_BATCH), held)
            if not claims:
                claims = self.queue.claim_many(min(room, CLAIM_BATCH), held)
            if not claims:
                with self._wake:
                    if until_idle and self._idle():
                        # Re-check under the lock: a job may have been queued meanwhile.
                        claims = self.queue.claim_many(1, held)
                        if not claims:
                            return
                    else:
                        due = self.queue.next_due()
                        timeout = 0.5 if due is None else min(max(due - time.time(), 0.0), 0.5)
                        self._wake.wait(timeout)
                        continue
            with self._wake:
                self._in_flight += len(claims)
            self.runner.submit_many(claims)

    def _take_volatile(self, limit: int, held: Collection[str]) -> list[Claim]:
        """Up to ``limit`` volatile claims to hand out; those of a held pipeline are written to
        the queue instead (pending, for when it resumes)."""
        with self._wake:
            taken = [
                self._volatile_claims.popleft()
                for _ in range(min(limit, len(self._volatile_claims)))
            ]
        self._release([claim for claim in taken if claim.pipeline in held])
        return [claim for claim in taken if claim.pipeline not in held]

    def _write_volatile(self) -> None:
        """Write the volatile claims not handed out to the queue (pending): at the end of a
        one-shot run that stopped early, they wait there for the next run."""
        with self._wake:
            self._volatile_open = False
            left = list(self._volatile_claims)
            self._volatile_claims.clear()
        self._release(left)

    def _release(self, claims: list[Claim]) -> None:
        """Give claims back to the queue (pending), in one transaction."""
        if claims:
            with self.queue.batch():
                for claim in claims:
                    self.queue.release(claim)

    def _drain_in_flight(self) -> None:
        """On stop: let in-flight jobs finish for ``shutdown_grace``, then cut their transfers."""
        deadline = time.monotonic() + self.config.shutdown_grace
        with self._wake:
            while self._in_flight and time.monotonic() < deadline:
                self._wake.wait(0.1)
            if self._in_flight:
                log.warning(
                    "stopping %d transfer(s) in flight; they resume at the next start",
                    self._in_flight,
                )
                self._cancel.set()
                hard_deadline = time.monotonic() + 30
                while self._in_flight and time.monotonic() < hard_deadline:
                    self._wake.wait(0.1)

    def _housekeeping(self) -> None:
        """Hand settled files over, and revive dead watchers."""
        next_watch_check = time.monotonic() + WATCHER_CHECK_INTERVAL
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            # Each step is guarded: one failure (a database error, a source folder that is
            # away) must not end settling, deletes or watcher restarts for the whole run.
            for source in self._sources.values():
                self._guarded(source.settler.tick, "settling files")
            self._guarded(self._expire_vanished, "mirroring deletes")
            if time.monotonic() >= next_watch_check:
                next_watch_check = time.monotonic() + WATCHER_CHECK_INTERVAL
                self._check_state_dir()
                for source in self._sources.values():
                    if source.watcher is not None:
                        self._guarded(source.watcher.check, "checking the watcher")

    def _guarded(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except Exception as exc:
            self._errors.error(f"error while {what}; trying again shortly", exc)

    def _check_state_dir(self) -> None:
        """Stop when the state directory was removed or replaced under the running daemon:
        its queue and manifest are gone, and another daemon could take the folder."""
        if self._fatal is None and not self._lock.intact():
            self._fatal = StateError(
                f"the state directory {self.state_dir} was removed or replaced while "
                "skyframe ran: stopping (start it again to begin with a fresh state)"
            )
            log.error("%s", self._fatal)
            self.stop()

    def _rescanner(self) -> None:
        """Catch-up scans: at start, every ``rescan`` interval, and whenever events were lost."""
        while not self._stop.is_set():
            now = time.monotonic()
            for source in self._sources.values():
                if source.rescan_requested.is_set() or now >= source.next_rescan:
                    source.rescan_requested.clear()
                    source.next_rescan = now + source.pipeline.source.rescan
                    self._safe_scan(source.pipeline)
            self.ready.set()
            self._stop.wait(RESCAN_POLL_INTERVAL)

    def _safe_scan(self, pipeline: Pipeline) -> None:
        try:
            self.scan(pipeline)
        except Exception as exc:
            self._errors.error(f"{pipeline.name}: the catch-up scan failed; it runs again", exc)

    # --- entry points ------------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new work; in-flight work finishes (or is cut after ``shutdown_grace``;
        at once when it is held by a pause)."""
        self._stop.set()
        self.control.wake()
        self._notify()

    def _startup_hooks(self) -> None:
        try:
            self.pm.hook.skyframe_startup(config=self.config)
        except SkyframeError:
            raise
        except Exception as exc:
            raise PluginError(
                f"a skyframe_startup hook failed: {type(exc).__name__}: {exc}"
            ) from exc

    def run_once(self) -> RunSummary:
        """Scan every source, then deliver until nothing is queued, waiting or settling."""
        housekeeping = threading.Thread(
            target=self._housekeeping, name="skyframe-housekeeping", daemon=True
        )
        # The scans run beside the gate (the sinks' check) and the first deliveries: what they
        # queue is handed out as it comes, and the run is idle only once they are done.
        scans = threading.Thread(target=self._scan_all, name="skyframe-scan", daemon=True)
        try:
            self._start_notifiers()
            self._startup_hooks()
            self._warn_held()
            self._scanning = True
            self._volatile_open = True
            # Files the sinks hash before sending are hashed meanwhile (see Digests).
            self._hashing_ahead = self.gate is not None
            scans.start()
            if self.gate is not None:
                try:
                    self.gate()
                finally:
                    self._hashing_ahead = False
                    self.runner.digests.stop()
            housekeeping.start()
            self._dispatch(until_idle=True)
            self._drain_in_flight()
            scans.join()
            self._write_volatile()
            if self._scan_failure is not None:
                raise self._scan_failure
            per_pipeline = self.queue.counts_by_pipeline()
            counts = self.queue.totals(per_pipeline)
            held = self.control.held()
            self.summary.held = sum(
                c["pending"] + c["waiting"] for name, c in per_pipeline.items() if name in held
            )
            left = counts["pending"] + counts["leased"] + counts["waiting"] - self.summary.held
            settling = sum(len(s.settler) for s in self._sources.values())
            self.summary.interrupted = self._stop.is_set() and bool(
                left or settling or self._scan_cut
            )
            self.summary.dead_letters = counts["dead"]
        finally:
            self._stop.set()
            for thread in (scans, housekeeping):
                if thread.is_alive():
                    thread.join()
            try:
                self._write_volatile()
            except Exception:  # keep the run's own error; the next scan finds these files
                log.exception("could not queue the files this run had not sent")
            self._stop_notifiers()
            self._shutdown_hooks()
        return self.summary

    def _scan_all(self) -> None:
        """Scan every source once (``run_once``); a failure stops the run and is raised there."""
        try:
            for pipeline in self.pipelines.values():
                self.scan(pipeline)
        except BaseException as exc:
            self._scan_failure = exc
            self.stop()
        finally:
            self._scanning = False
            self._notify()

    def run_daemon(self) -> RunSummary:
        """Watch, catch up, and deliver until ``stop()`` is called."""
        threads = [
            threading.Thread(target=self._housekeeping, name="skyframe-housekeeping", daemon=True),
            threading.Thread(target=self._rescanner, name="skyframe-rescan", daemon=True),
        ]
        self.runner.patient = True  # an unreachable sink keeps files waiting, uncounted
        try:
            self._start_notifiers()
            self._startup_hooks()
            self._start_api()
            self._warn_held()
            for source in self._sources.values():
                spec = source.pipeline.source
                source.watcher = SourceWatcher(
                    source.pipeline.source_root,
                    self._callbacks(source),
                    recursive=source.pipeline.recursive,
                    polling=spec.polling,
                    poll_interval=spec.poll_interval,
                )
                source.watcher.start()
                source.next_rescan = 0.0  # the catch-up scan runs at once, after the watch
            for thread in threads:
                thread.start()
            log.info("watching %d source folder(s)", len(self._sources))
            self._dispatch(until_idle=False)
            self._drain_in_flight()
        finally:
            self._stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            for source in self._sources.values():
                if source.watcher is not None:
                    source.watcher.stop()
            if self.api is not None:
                self.api.stop()
                self.api = None
            self._stop_notifiers()
            self._shutdown_hooks()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _start_api(self) -> None:
        """Serve the API and dashboard; a port in use costs the API, never the uploads."""
        from skyframe.api import ApiServer

        settings = self.config.api
        if not settings.enabled:
            return
        server = ApiServer(self, settings, self.state_dir)
        try:
            server.start()
        except OSError as exc:
            log.error(
                "cannot serve the API on %s: %s; running without it "
                "(set api.listen to a free address)",
                settings.listen,
                exc.strerror or exc,
            )
            return
        self.api = server
        if self.on_api is not None:
            self.on_api(server.url)

    def _warn_held(self) -> None:
        held = self.control.held()
        if held:
            log.warning(
                "paused: %s (skyframe resume to go on)",
                "everything" if self.control.paused else ", ".join(sorted(held)),
            )

    def _start_notifiers(self) -> None:
        for webhook in self.webhooks:
            webhook.start()

    def _stop_notifiers(self) -> None:
        """Let the notifiers catch up (a few seconds at most), then let the webhooks flush."""
        if not self.notifiers.close(timeout=10.0):
            log.warning("notifiers still busy after 10 s: the rest of their events are dropped")
        for webhook in self.webhooks:
            webhook.close(timeout=5.0)
        for name, count in self.notifiers.dropped.items():
            log.warning("notifier %s lost %d event(s): it could not keep up", name, count)

    def _callbacks(self, source: _Source) -> WatchCallbacks:
        pipeline = source.pipeline

        def rescan(reason: str) -> None:
            log.warning("%s: %s: rescanning %s", pipeline.name, reason, pipeline.source_root)
            source.rescan_requested.set()

        return WatchCallbacks(
            changed=lambda path, complete: source.settler.touch(path, complete=complete),
            deleted=lambda path: self._on_deleted(pipeline, path),
            moved=lambda src, dest: self._on_moved(pipeline, src, dest),
            rescan=rescan,
        )

    def _shutdown_hooks(self) -> None:
        try:
            self.pm.hook.skyframe_shutdown(config=self.config)
        except Exception:
            log.exception("a shutdown hook failed")
