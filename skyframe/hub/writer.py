"""Group commit for the stations' batches: the requests that arrive while a transaction runs
are stored together by the next one.

A request's costs on the database side are mostly per statement (building, sending and
waiting for about eight of them), not per event, so storing the batches that wait in one
transaction (:func:`skyframe.hub.ingest.store_batches`) lets the hub keep up with many more
stations. Nothing waits for a group to fill: a lone request starts a transaction at once, and
groups form only when requests come faster than transactions end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from skyframe.hub.db import describe
from skyframe.hub.ingest import Arrival, IngestResult, store_batches

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], Awaitable[T]]

#: Transactions at once: one gathers the next group while another waits for the database.
WRITERS = 2
#: A group's size at most, in batches and in events.
GROUP_BATCHES = 64
GROUP_EVENTS = 5000

_Waiting = tuple[Arrival, "asyncio.Future[IngestResult | None]"]


class IngestWriter:
    """Stores arrivals in groups, ``writers`` transactions at a time, on ``run``'s threads."""

    def __init__(
        self,
        engine: Engine,
        run: Runner[list[IngestResult | None]],
        writers: int = WRITERS,
        group_batches: int = GROUP_BATCHES,
        group_events: int = GROUP_EVENTS,
    ) -> None:
        self.engine = engine
        self._run = run
        self._writers = writers
        self._group_batches = group_batches
        self._group_events = group_events
        self._waiting: deque[_Waiting] = deque()
        self._active: set[asyncio.Task[None]] = set()
        #: transactions committed, and the batches they stored (logged when the hub stops)
        self.groups = 0
        self.batches = 0

    async def store(self, arrival: Arrival) -> IngestResult | None:
        """The arrival's result once its group is committed (None: its token was revoked);
        the database's error if its transaction failed."""
        future: asyncio.Future[IngestResult | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a request gone meanwhile leaves no warning
        self._waiting.append((arrival, future))
        if len(self._active) < self._writers:
            task = asyncio.create_task(self._write(), name="skyframe-hub-writer")
            self._active.add(task)
            task.add_done_callback(self._active.discard)
        # The group is stored whatever becomes of this request: shield it from cancellation.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Wait for the transactions under way."""
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)

    async def _write(self) -> None:
        while self._waiting:
            group = self._take()
            try:
                results = await self._run(functools.partial(self._store, group))
            except Exception as exc:  # the database's refusal, or a fault of the hub's own
                if len(group) == 1:
                    _settle(group[0][1], exc)
                else:
                    await self._one_by_one(group, exc)
                continue
            for (_, future), result in zip(group, results, strict=True):
                _settle(future, result)

    async def _one_by_one(self, group: list[_Waiting], exc: Exception) -> None:
        """One batch may be what failed (the database refused it, or a value in it): each
        alone, so that it fails alone (the others are stored; a deadlock between two groups
        is gone as well)."""
        log.warning(
            "hub: a group of %d batches was not stored (%s); storing each alone",
            len(group),
            describe(exc) if isinstance(exc, SQLAlchemyError) else f"{type(exc).__name__}: {exc}",
        )
        for waiting in group:
            try:
                alone = await self._run(functools.partial(self._store, [waiting]))
            except Exception as single:
                _settle(waiting[1], single)
            else:
                _settle(waiting[1], alone[0])

    def _take(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        events = 0
        while self._waiting and len(group) < self._group_batches:
            size = len(self._waiting[0][0].batch.events)
            if group and events + size > self._group_events:
                break
            group.append(self._waiting.popleft())
            events += size
        return group

    def _store(self, group: list[_Waiting]) -> list[IngestResult | None]:
        with self.engine.begin() as connection:
            results = store_batches(connection, [arrival for arrival, _ in group])
        self.groups += 1
        self.batches += len(group)
        return results


def _retrieved(future: asyncio.Future[IngestResult | None]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(
    future: asyncio.Future[IngestResult | None], outcome: IngestResult | BaseException | None
) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
