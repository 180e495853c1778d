"""Intake: what comes in from the sources becomes queued jobs.

Scans and watch events end here. A file is stat'ed once per decision, its rules run once
(delivery runs them again only if the file changed since), and the manifest is read once per
sink to tell new and changed files from delivered ones. Renames of delivered files become
moves, deletions become deletes where a sink mirrors them; the rest become uploads, queued in
one transaction per batch (or, in a one-shot run, handed to the dispatcher without a record).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from skyframe.control import Control
from skyframe.delivery import JobRunner
from skyframe.dispatch import Dispatcher
from skyframe.display import is_utf8, shown
from skyframe.errors import RuleError
from skyframe.events import EventKind, FileEvent, LifecycleEvent
from skyframe.jobs import Delete, Move, Upload
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.queue import Claim, JobQueue
from skyframe.scanner import refusal, scan_source
from skyframe.state import Manifest
from skyframe.summary import RunSummary
from skyframe.watcher import Settler, SourceWatcher, WatchCallbacks

log = logging.getLogger(__name__)

SCAN_BATCH = 256  #: files a scan queues per transaction
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


class Source:
    """A pipeline's source as the daemon sees it: settler, watcher and rescan timer."""

    def __init__(self, intake: Intake, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.settler = Settler(
            pipeline.source.settle, lambda path: intake.file_ready(pipeline, path, "modified")
        )
        self.watcher: SourceWatcher | None = None
        self.rescan_requested = threading.Event()
        self.next_rescan = 0.0
        self.caught_up = False  #: a complete scan ran since the start
        self.real_root = pipeline.source_root.resolve()
        self.refused: set[str] = set()  #: files whose refusal was said (see Intake._refused)
        #: A reload replaced or removed its pipeline: its scan stops, its offers are dropped.
        self.retired = False


class Intake:
    """Turns what the sources hold and what the watchers report into queued jobs."""

    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        *,
        queue: JobQueue,
        manifest: Manifest,
        control: Control,
        runner: JobRunner,
        dispatcher: Dispatcher,
        emit: Callable[[LifecycleEvent], None],
        summary: RunSummary,
        summary_lock: threading.Lock,
        stopping: threading.Event,
    ) -> None:
        self.pipelines = pipelines  #: the engine's shared mapping (a reload changes it)
        self.queue = queue
        self.manifest = manifest
        self.control = control
        self.runner = runner
        self.dispatcher = dispatcher
        self.emit = emit
        self.summary = summary
        self.summary_lock = summary_lock
        self.stopping = stopping
        self.sources = {name: Source(self, p) for name, p in pipelines.items()}
        #: a scan was cut short by a stop
        self.scan_cut = False
        #: True while a one-shot run waits for its gate: files are hashed ahead (Digests)
        self.hashing_ahead = False
        self._vanished: dict[tuple[str, int], _Vanished] = {}
        self._vanished_lock = threading.Lock()
        #: told the relative paths a pipeline queued (the groups count them as seen)
        self.on_queued: Callable[[str, list[str]], None] | None = None
        #: Held while files are decided and queued, and while a reload swaps the pipelines: a
        #: file is judged by one set of rules, and queued before or after the swap.
        self._switch_lock = threading.Lock()

    @contextmanager
    def switching(self) -> Iterator[None]:
        """Hold every offer while a reload swaps the pipelines."""
        with self._switch_lock:
            yield

    def renew_sources(self) -> tuple[list[Source], list[Source]]:
        """After a reload changed the pipelines (under :meth:`switching`): each new or changed
        pipeline gets a fresh source, an unchanged one keeps its own. Returns the sources let
        go (to stop watching) and the fresh ones (to watch and scan)."""
        old = self.sources
        new: dict[str, Source] = {}
        for name, pipeline in self.pipelines.items():
            source = old.get(name)
            kept = source is not None and source.pipeline is pipeline
            new[name] = source if source is not None and kept else Source(self, pipeline)
        gone = [source for name, source in old.items() if new.get(name) is not source]
        for source in gone:
            source.retired = True
        self.sources = new  # replaced, never changed: the engine's threads iterate it
        fresh = [source for name, source in new.items() if old.get(name) is not source]
        return gone, fresh

    def _current(self, pipeline: Pipeline) -> Source | None:
        """The pipeline's source, unless a reload replaced or removed the pipeline."""
        source = self.sources.get(pipeline.name)
        return source if source is not None and source.pipeline is pipeline else None

    def settling(self) -> int:
        """Files waiting to settle, in every source."""
        return sum(len(s.settler) for s in self.sources.values())

    def scan(self, pipeline: Pipeline) -> None:
        """Compare the source with the manifest: queue what is new or changed (and deleted,
        for sinks with ``on_delete: delete``). Recently modified files go through the settler."""
        source = self._current(pipeline)
        if source is None:
            return  # a reload replaced it: its new source scans
        settle = source.settler.settle
        mirrors_deletes = any(s.on_delete == "delete" for s in pipeline.sinks)
        # One entry per file found: kept only where it serves, to find the deleted ones.
        seen: set[str] = set()
        found = 0
        errors = [0]
        began = time.time()

        def on_error(path: Path, exc: OSError) -> None:
            errors[0] += 1
            with self.summary_lock:
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
            if self.stopping.is_set() or source.retired:  # retired: its new source scans
                self.scan_cut |= self.stopping.is_set()
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
            relpath = record.relpath
            if record.pipeline != pipeline.name or record.kind not in ("upload", "move"):
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
        with self._switch_lock:
            if self.pipelines.get(pipeline.name) is not pipeline:
                return  # replaced or removed by a reload: a new source's scan takes its files
            events, to_queue = self._queue_offers(pipeline, offers)
        for lifecycle in events:
            self.emit(lifecycle)
        if to_queue:
            self.dispatcher.notify()

    def _queue_offers(
        self, pipeline: Pipeline, offers: Sequence[tuple[FileEvent, str | None]]
    ) -> tuple[list[LifecycleEvent], list[Upload]]:
        """Decide and queue: the events to send, and the jobs that were to be queued."""
        events: list[LifecycleEvent] = []
        to_queue: list[Upload] = []
        for event, moved_from in offers:
            decision = self._decide(pipeline, event, moved_from)
            if isinstance(decision, LifecycleEvent):
                events.append(decision)
            else:
                to_queue.append(decision)
        if to_queue:
            # In a one-shot run, the files a batch takes need no record on disk (see
            # JobQueue.volatile): the next run's scan finds again whatever this one leaves.
            held = pipeline.name in self.control.held()
            # A file of a group must pass through the queue: its arrival is recorded before
            # the queue forgets it (skyframe.groups), which a volatile job never reaches
            # after a crash.
            room = 0 if held or pipeline.groups else self.dispatcher.volatile_room()
            claims: list[Claim] = []
            queued: list[FileEvent] = []
            with self.queue.batch():
                for job in to_queue:
                    if len(claims) < room and self.runner.batchable(pipeline.name, job):
                        claim = self.queue.volatile(pipeline.name, job, job.version)
                        if claim is not None:
                            claims.append(claim)
                            queued.append(job.event)
                            continue
                    if self.queue.put(pipeline.name, job, job.version):
                        queued.append(job.event)
            self.dispatcher.add_volatile(claims)
            events += [
                LifecycleEvent("queued", pipeline.name, e.relpath, size=e.size) for e in queued
            ]
            if self.on_queued is not None and queued:
                self.on_queued(pipeline.name, [e.relpath for e in queued])
            if self.hashing_ahead:
                self._hash_ahead(pipeline, queued)
        return events, to_queue

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
    ) -> LifecycleEvent | Upload:
        """What to do with a file: an event (rejected, unchanged), or the job to queue."""
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
        priority = pipeline.priority_of(event)
        if moved_from is not None:
            return Move(event=event, accepted=accepted, priority=priority, moved_from=moved_from)
        return Upload(event=event, accepted=accepted, priority=priority)

    def _refused(self, pipeline: Pipeline, path: Path, reason: str) -> None:
        """A file the source holds but that is not taken: said once per file and run."""
        source = self.sources.get(pipeline.name)
        if source is None:
            return
        said = source.refused
        key = shown(path)
        with self.summary_lock:
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
        source = self._current(pipeline)
        if source is None:
            return  # a reload replaced or removed the pipeline: a new scan takes the file
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
        source = self._current(pipeline)
        if source is None:
            return  # a reload replaced or removed the pipeline: its new scan decides
        source.settler.forget(path)
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

    def expire_vanished(self) -> None:
        """Files that did not reappear in time were deleted: mirror that where configured."""
        now = time.monotonic()
        with self._vanished_lock:
            expired = [(k, v) for k, v in self._vanished.items() if v.expires <= now]
            for key, _ in expired:
                del self._vanished[key]
        for (name, _inode), gone in expired:
            pipeline = self.pipelines.get(name)
            if pipeline is not None:  # else removed by a reload: its deletes wait for it
                self._queue_delete(pipeline, gone.relpath)

    def _queue_delete(self, pipeline: Pipeline, relpath: str) -> None:
        if (pipeline.source_root / relpath).exists():
            return  # it came back (rewritten, or moved back): nothing to delete
        if any(
            sink.on_delete == "delete"
            and self.manifest.get(pipeline.name, sink.key, relpath) is not None
            for sink in pipeline.sinks
        ):
            job = Delete(relpath=relpath)
            self.queue.put(pipeline.name, job, job.version)
            self.dispatcher.notify()

    def _on_moved(self, pipeline: Pipeline, src: Path, dest: Path) -> None:
        source = self._current(pipeline)
        if source is None:
            return  # a reload replaced or removed the pipeline: its new scan decides
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

    def callbacks(self, source: Source) -> WatchCallbacks:
        """What a source's watcher calls."""
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
