"""The engine: scan sources, apply rules, queue, run processes, deliver to every sink."""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from skyframe.config import (
    Config,
    RetryConfig,
)
from skyframe.errors import DeliveryError, RuleError, SourceUnreadableError
from skyframe.events import FileEvent, Job, LifecycleEvent
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.queue import Claim, JobQueue
from skyframe.scanner import scan_source
from skyframe.state import Manifest, StateLock
from skyframe.storage import (
    Sink,
    TransferRequest,
    TransferResult,
    file_sha256,
    safe_relative_path,
)

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress events for one transfer


def backoff_delay(retry: RetryConfig, attempts: int) -> float:
    """Exponential backoff with jitter: between half and all of initial * 2**(attempts-1)."""
    ceiling: float = min(retry.max, retry.initial * 2 ** max(attempts - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)


@dataclass
class RunSummary:
    """Counts for one run, for the CLI's summary and exit code."""

    queued: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    unchanged: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  #: "pipeline:relpath" -> last error
    scan_errors: int = 0

    @property
    def ok(self) -> bool:
        """True when every accepted file was delivered (or needed no delivery)."""
        return not self.failed


class Engine:
    """Runs pipelines against the queue and manifest in a locked state directory."""

    def __init__(self, config: Config, pm: pluggy.PluginManager, pipelines: list[Pipeline]) -> None:
        self.config = config
        self.pm = pm
        self.pipelines = {p.name: p for p in pipelines}
        self.state_dir = config.state_path
        self.summary = RunSummary()
        self._summary_lock = threading.Lock()
        self._lock = StateLock(self.state_dir)
        self._lock.acquire()
        try:
            self.queue = JobQueue(self.state_dir / "queue")
            self.manifest = Manifest(self.state_dir / "manifest")
        except BaseException:
            self._lock.release()
            raise
        self._stop = threading.Event()

    def close(self) -> None:
        """Close the databases and release the state directory."""
        self.queue.close()
        self.manifest.close()
        self._lock.release()

    # --- events ------------------------------------------------------------------------------

    def emit(self, event: LifecycleEvent) -> None:
        """Update the summary and call every notifier; a failing notifier is only logged."""
        self._count(event)
        for impl in self.pm.hook.skyframe_event.get_hookimpls():
            try:
                impl.function(event=event)
            except Exception:
                log.exception("notifier %s failed on a %s event", impl.plugin_name, event.kind)

    def _count(self, event: LifecycleEvent) -> None:
        key = f"{event.pipeline}:{event.relpath}"
        with self._summary_lock:
            s = self.summary
            if event.kind == "queued":
                s.queued += 1
            elif event.kind == "rejected":
                s.rejected[event.rule or "?"] += 1
            elif event.kind == "unchanged":
                s.unchanged += 1
            elif event.kind == "skipped":
                s.skipped += 1
            elif event.kind == "delivered" and event.sink is not None:
                s.delivered += 1
                s.delivered_bytes += event.size or 0
            elif event.kind == "dead-lettered":
                s.failed[key] = event.reason or "failed"

    # --- scanning ----------------------------------------------------------------------------

    def scan(self, pipeline: Pipeline) -> None:
        """Compare the source with the manifest and queue what is new or changed."""

        def on_error(path: Path, exc: OSError) -> None:
            with self._summary_lock:
                self.summary.scan_errors += 1
            log.warning("%s: cannot read %s: %s", pipeline.name, path, exc.strerror or exc)

        for event in scan_source(
            pipeline.name, pipeline.source_root, recursive=pipeline.recursive, on_error=on_error
        ):
            if self._stop.is_set():
                return
            self.offer(pipeline, event)

    def offer(self, pipeline: Pipeline, event: FileEvent) -> None:
        """Apply the rules to one file and queue it unless rejected or already delivered."""
        try:
            rejection = evaluate_rules(pipeline.rules, event)
        except RuleError as exc:
            # Queue it anyway: the worker meets the same error and dead-letters the file, where
            # it stays visible and can be retried once the rule is fixed.
            log.debug("%s: %s: %s", pipeline.name, event.relpath, exc)
            rejection = None
        if rejection is not None:
            rule_name, reason = rejection
            self.emit(
                LifecycleEvent(
                    "rejected",
                    pipeline.name,
                    event.relpath,
                    rule=rule_name,
                    reason=reason,
                    size=event.size,
                )
            )
            return
        if all(
            self.manifest.is_delivered(
                pipeline.name, sink.key, event.relpath, event.size, event.mtime_ns
            )
            for sink in pipeline.sinks
        ):
            self.emit(LifecycleEvent("unchanged", pipeline.name, event.relpath, size=event.size))
            return
        self.queue.put(pipeline.name, event.relpath, {"event": event.to_json()})
        self.emit(LifecycleEvent("queued", pipeline.name, event.relpath, size=event.size))

    # --- running -----------------------------------------------------------------------------

    def run_once(self) -> RunSummary:
        """Scan every source, then deliver until the queue is empty (retries included)."""
        self.pm.hook.skyframe_startup(config=self.config)
        try:
            for pipeline in self.pipelines.values():
                self.scan(pipeline)
            self.drain()
        finally:
            try:
                self.pm.hook.skyframe_shutdown(config=self.config)
            except Exception:
                log.exception("a shutdown hook failed")
        return self.summary

    def stop(self) -> None:
        """Ask workers to finish their current job and take no more."""
        self._stop.set()

    def drain(self) -> None:
        """Work until no job is ready, waiting or in flight."""
        in_flight = [0]
        cond = threading.Condition()

        def worker() -> None:
            while not self._stop.is_set():
                with cond:
                    claim = self.queue.claim()
                    if claim is None:
                        due = self.queue.next_due()
                        if in_flight[0] == 0 and due is None:
                            cond.notify_all()
                            return
                        wait = 0.5 if due is None else max(0.0, min(due - time.time(), 0.5))
                        cond.wait(wait)
                        continue
                    in_flight[0] += 1
                try:
                    self.handle(claim)
                finally:
                    with cond:
                        in_flight[0] -= 1
                        cond.notify_all()

        threads = [
            threading.Thread(target=worker, name=f"skyframe-worker-{i}", daemon=True)
            for i in range(self.config.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def handle(self, claim: Claim) -> None:
        """Run one job to completion, retry or the dead-letter list."""
        pipeline = self.pipelines.get(claim.pipeline)
        if pipeline is None:
            self._dead(claim, f"pipeline {claim.pipeline!r} is no longer configured")
            return
        scratch = self.state_dir / "scratch" / claim.token
        try:
            self._deliver(pipeline, claim, scratch)
        except SourceUnreadableError as exc:
            if not claim_path_exists(claim):
                self.queue.complete(claim)
                self.emit(
                    LifecycleEvent(
                        "skipped", claim.pipeline, claim.relpath, reason="vanished before delivery"
                    )
                )
            else:
                self._dead(claim, str(exc))
        except Exception as exc:
            retryable = not isinstance(exc, DeliveryError) or exc.retryable
            reason = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
            self._failed(pipeline, claim, reason, retryable)
        else:
            self.queue.complete(claim)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _failed(self, pipeline: Pipeline, claim: Claim, reason: str, retryable: bool) -> None:
        attempts = claim.attempts + 1
        if retryable and attempts < pipeline.retry.max_attempts:
            delay = backoff_delay(pipeline.retry, attempts)
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
                    "failed", claim.pipeline, claim.relpath, attempt=attempts, reason=reason
                )
            )
        else:
            self._dead(claim, reason)

    def _dead(self, claim: Claim, reason: str) -> None:
        self.queue.dead(claim, reason)
        log.error("%s: %s: giving up: %s", claim.pipeline, claim.relpath, reason)
        self.emit(
            LifecycleEvent(
                "dead-lettered",
                claim.pipeline,
                claim.relpath,
                attempt=claim.attempts + 1,
                reason=reason,
            )
        )

    def _deliver(self, pipeline: Pipeline, claim: Claim, scratch: Path) -> None:
        queued = FileEvent.from_json(claim.payload["event"])
        try:
            st = os.stat(queued.path)
        except FileNotFoundError:
            raise SourceUnreadableError(f"{queued.path}: vanished") from None
        # The latest state of the file wins: what is on disk now is what gets delivered.
        event = FileEvent(
            queued.pipeline, queued.path, queued.relpath, st.st_size, st.st_mtime_ns, queued.kind
        )
        rejection = evaluate_rules(pipeline.rules, event)
        if rejection is not None:
            self.emit(
                LifecycleEvent(
                    "rejected",
                    pipeline.name,
                    event.relpath,
                    rule=rejection[0],
                    reason=rejection[1],
                    size=event.size,
                )
            )
            return
        job = Job(event, scratch_dir=scratch)
        for step in pipeline.processes:
            step(job)
        for sink in pipeline.sinks:
            self._deliver_to_sink(pipeline, job, sink, claim.attempts + 1)

    def _deliver_to_sink(self, pipeline: Pipeline, job: Job, sink: Sink, attempt: int) -> None:
        event = job.event
        entry = self.manifest.get(pipeline.name, sink.key, event.relpath)
        if entry is not None and entry.matches(event.size, event.mtime_ns):
            return  # delivered by an earlier attempt of this job
        remote = safe_relative_path(job.remote_name)
        if (
            entry is not None
            and entry.size == event.size
            and entry.remote == remote
            and file_sha256(event.path) == entry.sha256
        ):
            # Touched, not changed: record the new mtime and send nothing.
            self.manifest.record(
                pipeline.name,
                sink.key,
                event.relpath,
                size=event.size,
                mtime_ns=event.mtime_ns,
                sha256=entry.sha256,
                remote=remote,
            )
            self.emit(LifecycleEvent("unchanged", pipeline.name, event.relpath, sink=sink.key))
            return
        self.emit(
            LifecycleEvent(
                "started",
                pipeline.name,
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
                progress=self._progress_callback(pipeline.name, event.relpath, sink, event.size),
                state_dir=self.state_dir,
            )
        )
        for derived in job.derived:
            st = derived.path.stat()
            self._transfer(
                TransferRequest(
                    sink=sink,
                    local_path=derived.path,
                    remote_path=sink.remote_path(derived.resolve(job.remote_name)),
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    state_dir=self.state_dir,
                )
            )
        self.manifest.record(
            pipeline.name,
            sink.key,
            event.relpath,
            size=result.size,
            mtime_ns=event.mtime_ns,
            sha256=result.sha256,
            remote=remote,
        )
        job.meta.setdefault("sha256", result.sha256)
        self.emit(
            LifecycleEvent(
                "delivered",
                pipeline.name,
                event.relpath,
                sink=sink.key,
                remote=remote,
                size=result.size,
                attempt=attempt,
            )
        )

    def _transfer(self, request: TransferRequest) -> TransferResult:
        result: TransferResult | None = self.pm.hook.skyframe_transfer(request=request)
        if result is None:
            sink = request.sink
            raise DeliveryError(f"no transfer plugin handles {sink.protocol!r} ({sink.display})")
        return result

    def _progress_callback(
        self, pipeline: str, relpath: str, sink: Sink, size: int
    ) -> Callable[[int], None]:
        last = [time.monotonic()]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL and done < size:
                last[0] = now
                self.emit(
                    LifecycleEvent(
                        "progress", pipeline, relpath, sink=sink.key, size=size, bytes_done=done
                    )
                )

        return progress


def claim_path_exists(claim: Claim) -> bool:
    """True when the claimed job's file is still on disk."""
    return Path(claim.payload["event"]["path"]).exists()
