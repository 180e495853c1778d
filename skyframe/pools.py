"""Thread pools that start urgent work first: each sink's transfers, the processing steps.

A :class:`PriorityPool` runs tasks on up to ``workers`` threads, as a ThreadPoolExecutor does,
plus ``express`` threads that run urgent tasks only. Every thread takes the urgent tasks (a
photo the pipeline's ``priority`` puts first) before the others (a video), each kind in the
order it came. So however many big files fill the pool, a small one starts at once on an
express thread; and a big file under way is never stopped for it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class PriorityPool:
    """``workers`` threads for any task, ``express`` more for urgent ones; started as needed."""

    def __init__(self, workers: int, *, express: int = 1, name: str = "skyframe-pool") -> None:
        if workers < 1 or express < 0:
            raise ValueError(f"a pool needs workers >= 1, express >= 0: not {workers}, {express}")
        self.workers = workers
        self.express = express
        self._name = name
        self._cond = threading.Condition()
        self._urgent: deque[Callable[[], object]] = deque()
        self._normal: deque[Callable[[], object]] = deque()
        self._threads: list[threading.Thread] = []
        self._started = {False: 0, True: 0}  #: threads started, by "express"
        self._idle = {False: 0, True: 0}  #: threads waiting for a task, by "express"
        self._shutdown = False

    def submit(self, fn: Callable[..., object], /, *args: Any, urgent: bool = False) -> None:
        """Run ``fn(*args)`` on a thread of the pool (``urgent``: before the others)."""
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that was shut down")
            (self._urgent if urgent else self._normal).append(lambda: fn(*args))
            waiting = len(self._urgent) + len(self._normal)
            if waiting > self._idle[False] and self._started[False] < self.workers:
                self._start(express=False)
            elif (
                urgent
                and len(self._urgent) > self._idle[False] + self._idle[True]
                and self._started[True] < self.express
            ):
                self._start(express=True)
            self._cond.notify_all()

    def _start(self, *, express: bool) -> None:
        """Start one more thread (under ``_cond``)."""
        self._started[express] += 1
        suffix = "express" if express else str(self._started[False])
        thread = threading.Thread(
            target=self._work, args=(express,), name=f"{self._name}-{suffix}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _next(self, express: bool) -> Callable[[], object] | None:
        """The next task this thread may run, waiting for one; None once the pool is shut down
        and has nothing left for it."""
        with self._cond:
            while True:
                if self._urgent:
                    return self._urgent.popleft()
                if not express and self._normal:
                    return self._normal.popleft()
                if self._shutdown:
                    return None
                self._idle[express] += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle[express] -= 1

    def _work(self, express: bool) -> None:
        while (task := self._next(express)) is not None:
            try:
                task()
            except BaseException:  # a task handles its own errors: this one is a bug
                log.exception("a task of %s failed", self._name)
            del task  # let what it held go while this thread waits

    @property
    def waiting(self) -> int:
        """Tasks submitted and not started yet."""
        with self._cond:
            return len(self._urgent) + len(self._normal)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more tasks; ``cancel_futures`` drops those not started; ``wait`` for the
        threads to end (after the tasks left)."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                self._urgent.clear()
                self._normal.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
