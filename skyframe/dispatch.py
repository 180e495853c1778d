"""Dispatch: lease queued jobs and hand them to the job runner, as many as it has room for.

The dispatcher keeps count of the jobs in flight, wakes when work arrives (``notify``) or a
job ends, and knows when a one-shot run is idle. When the runner's ``capacity`` is taken (say,
by videos), it still claims urgent jobs (priority high: photos), up to ``express_capacity``
more, for the pools' express threads. It also holds the one-shot run's volatile
claims (see :meth:`JobQueue.volatile`): jobs the scan handed over without a queue record,
written to the queue if the run ends before they are served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Container

from skyframe.control import Control
from skyframe.delivery import JobRunner
from skyframe.jobs import HIGH, LOW
from skyframe.queue import Claim, JobQueue

log = logging.getLogger(__name__)

CLAIM_BATCH = 64  #: jobs the dispatcher leases per transaction
#: volatile jobs (run --once) waiting to be handed out at most; the scan queues the others on
#: disk as usual, so a first run over a huge folder keeps its memory bounded
VOLATILE_BACKLOG = 10_000


class Dispatcher:
    """Leases jobs and hands them to a :class:`JobRunner` (set as ``runner`` before ``run``)."""

    runner: JobRunner

    def __init__(
        self,
        queue: JobQueue,
        control: Control,
        *,
        stopping: threading.Event,
        cancel: threading.Event,
        busy: Callable[[], bool],
        configured: Container[str] | None = None,
    ) -> None:
        self.queue = queue
        self.control = control
        #: The configured pipelines (None: all): jobs of others, say a pipeline a reload
        #: removed, wait in the queue like a paused pipeline's, until it is back.
        self.configured = configured
        self._stopping = stopping
        self._cancel = cancel
        #: True while jobs may still appear without the queue's knowledge (a scan, settling)
        self._busy = busy
        self._wake = threading.Condition()
        self._in_flight = 0
        self._volatile: deque[Claim] = deque()
        #: Set while a one-shot run's scan may hand over volatile claims.
        self.volatile_open = False

    # --- signals -----------------------------------------------------------------------------

    def notify(self) -> None:
        """Work may be waiting: look again now."""
        with self._wake:
            self._wake.notify_all()

    def job_finished(self, count: int = 1) -> None:
        """Jobs handed to the runner are settled either way (``count`` of them at once)."""
        with self._wake:
            self._in_flight -= count
            self._wake.notify_all()

    @property
    def in_flight(self) -> int:
        """Jobs handed to the runner and not yet settled."""
        with self._wake:
            return self._in_flight

    # --- volatile claims (run --once) --------------------------------------------------------

    def volatile_room(self) -> int:
        """How many more volatile claims may wait (0 unless a one-shot scan is under way)."""
        with self._wake:
            return VOLATILE_BACKLOG - len(self._volatile) if self.volatile_open else 0

    def add_volatile(self, claims: list[Claim]) -> None:
        """Claims the scan made without a queue record, to hand out like queued ones."""
        if claims:
            with self._wake:
                self._volatile.extend(claims)
                self._wake.notify_all()

    @property
    def volatile_waiting(self) -> int:
        """Volatile claims not handed out yet."""
        with self._wake:
            return len(self._volatile)

    def close_volatile(self) -> None:
        """No more volatile claims; those not handed out go to the queue (pending): at the end
        of a one-shot run that stopped early, they wait there for the next run."""
        with self._wake:
            self.volatile_open = False
            left = list(self._volatile)
            self._volatile.clear()
        self._release(left)

    def _take_volatile(self, limit: int, held: Collection[str]) -> list[Claim]:
        """Up to ``limit`` volatile claims to hand out; those of a held pipeline are written to
        the queue instead (pending, for when it resumes)."""
        with self._wake:
            taken = [self._volatile.popleft() for _ in range(min(limit, len(self._volatile)))]
        self._release([claim for claim in taken if claim.pipeline in held])
        return [claim for claim in taken if claim.pipeline not in held]

    def _release(self, claims: list[Claim]) -> None:
        """Give claims back to the queue (pending), in one transaction."""
        if claims:
            with self.queue.batch():
                for claim in claims:
                    self.queue.release(claim)

    # --- the loop ----------------------------------------------------------------------------

    def _idle(self) -> bool:
        return (
            not self._volatile
            and self._in_flight == 0
            and self.queue.next_due() is None
            and not self._busy()
        )

    def _held(self) -> set[str]:
        """The pipelines whose jobs are not handed out now: paused, or not configured."""
        held = self.control.held()
        if self.configured is not None:
            configured = self.configured
            held.update(name for name in self.queue.lanes() if name not in configured)
        return held

    def run(self, *, until_idle: bool) -> None:
        """Claim jobs and hand them to the runner until stopped (or idle, with until_idle)."""
        runner = self.runner
        while not self._stopping.is_set():
            with self._wake:
                room = runner.capacity - self._in_flight
                express = room + runner.express_capacity
                if express <= 0:
                    self._wake.wait(0.5)
                    continue
            held = self._held()
            if room > 0:
                claims = self._take_volatile(min(room, CLAIM_BATCH), held)
                if not claims:
                    claims = self.queue.claim_many(min(room, CLAIM_BATCH), held, LOW)
            else:  # the pools are full: only what their express threads take
                claims = self.queue.claim_many(min(express, CLAIM_BATCH), held, HIGH)
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
            runner.submit_many(claims)

    def drain(self, grace: float) -> None:
        """On stop: let in-flight jobs finish for ``grace`` seconds, then cut their transfers."""
        deadline = time.monotonic() + grace
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
