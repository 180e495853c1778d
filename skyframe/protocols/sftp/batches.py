"""SFTP batches: small new files sent together on the connection's small-file session.

Each file is read whole, opened under its temporary name, written in as few requests as the
server's limit allows, closed and renamed into place; the requests of many files are in
flight at once, so a batch costs a few round trips in all rather than a few per file. A lost
connection is reconnected within the batch, as a single upload does (``transfer.upload``), and
a file cut on its way goes on from the bytes the server had acknowledged (as far as its
temporary file still holds them): a cut costs the bytes in flight, not the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import weakref
from typing import Any

from skyframe.errors import DeliveryError, SinkUnavailableError
from skyframe.protocols.batching import send_batch
from skyframe.protocols.classify import one_line
from skyframe.protocols.sftp import session
from skyframe.protocols.sftp.transfer import RECONNECTS, TRIES, pause, reconnecting
from skyframe.storage import BatchTransfer, Sink, TransferRequest, TransferResult

log = logging.getLogger(__name__)

#: Small files of one batch in flight at once, at least: their requests are pipelined on the
#: connection's session, so a batch costs a few round trips in all, not a few per file.
BATCH_IN_FLIGHT = 32
#: ... and bytes in flight at once of all the batches on a connection, at most (one write
#: request is always let through): what a cut of the link costs to send again. Counted by
#: write request, from its sending to its answer, so that the next file's bytes follow a
#: file's last ones without waiting for their answer. The files finish in turn rather than
#: all together at the end of the batch, so that a cut loses little (with a larger budget, a
#: few photos sharing a slow link with a video all went at once, and were all cut, cut after
#: cut).
BATCH_BYTES = 1024 * 1024


class _Budget:
    """Bytes in flight on the event loop, up to a limit, let through in about the order they
    ask (the waiters look in turn; a smaller one may pass one that does not fit yet); a piece
    larger than the limit goes when nothing else is in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, size: int) -> Any:
        async with self._changed:
            await self._changed.wait_for(lambda: not self.used or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()


#: SSH connection -> the budget of the batches on it, which are then served in turn: one
#: ends while the next still sends. (With a budget each, two batches went side by side and
#: ended together, and the link stood idle while both closed and renamed their last files.)
#: A cut loses at most BATCH_BYTES of them all. Only touched on the event loop.
_BUDGETS: weakref.WeakKeyDictionary[Any, _Budget] = weakref.WeakKeyDictionary()


def _budget(client: Any) -> _Budget:
    """The budget of the batches on the SSH connection ``client`` (on the event loop)."""
    budget = _BUDGETS.get(client)
    if budget is None:
        budget = _BUDGETS[client] = _Budget(BATCH_BYTES)
    return budget


def batch(sink: Sink) -> BatchTransfer:
    """Small new files to an ``sftp://`` sink, together on the connection's session: each is
    read whole, written into its temporary name (in requests of the server's largest write),
    closed and renamed into place, with the requests of many in flight at once.

    A lost connection is no file's failure, as in ``transfer.upload``: the batch reconnects and
    sends the files that had not arrived, at once while each round gets some through, after a
    growing wait when none did; the files that never arrive are returned with their errors
    (they are then sent alone)."""

    def send(requests: list[TransferRequest]) -> list[TransferResult | Exception]:
        outcomes: list[TransferResult | Exception] = [DeliveryError("not sent")] * len(requests)
        todo = list(range(len(requests)))
        acknowledged: dict[int, int] = {}  #: per request (its id), bytes the server holds
        stalls = 0  #: rounds in a row without a connection
        tries = 0  #: rounds in a row that delivered nothing
        while True:
            generation = sink.generation
            held_before = sum(acknowledged.values())
            connected, results = _send_round(sink, [requests[i] for i in todo], acknowledged)
            lost = []
            for index, result in zip(todo, results, strict=True):
                outcomes[index] = result
                if isinstance(result, Exception) and isinstance(
                    sink.translate(result), SinkUnavailableError
                ):
                    lost.append(index)
            if not lost:
                break
            # A round that delivered a file, or got more of them acknowledged, went further.
            further = len(lost) < len(todo) or sum(acknowledged.values()) > held_before
            tries = 0 if further else tries + 1
            stalls = 0 if connected else stalls + 1
            if stalls >= RECONNECTS or tries >= TRIES:
                break
            error = outcomes[lost[0]]
            assert isinstance(error, Exception)
            wait = reconnecting(sink, generation, stalls, sink.translate(error))
            log.info(
                "%s: the connection dropped (%s); sending %d file(s) of a batch again in %.1f s",
                sink.display,
                one_line(error),
                len(lost),
                wait,
            )
            pause(requests[lost[0]], wait)
            todo = lost
        return outcomes

    return send


def _send_round(
    sink: Sink, requests: list[TransferRequest], acknowledged: dict[int, int]
) -> tuple[bool, list[TransferResult | Exception]]:
    """One try of a batch on the sink's current connection: whether there was one (the server
    answered), and each file's outcome.

    ``acknowledged`` holds, per request (by its id), the bytes of its temporary file the
    server acknowledged on an earlier try: a file cut on its way (or before its close and
    rename) goes on from there, as far as the temporary file still has them."""
    try:
        fs = sink.fs  # connects here, in the calling thread, if needed
    except Exception as exc:
        return False, [exc] * len(requests)
    try:
        for folder in sorted({posixpath.dirname(r.remote_path) for r in requests}):
            sink.ensure_folder(folder)
    except Exception as exc:
        return True, [exc] * len(requests)

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        temporary = sink.temporary_path(request.remote_path)
        key = id(request)
        start = await session.resume_point(fs, temporary, acknowledged.get(key, 0))
        # What this round writes is all there is from here on: the bytes before ``start``,
        # then what the server acknowledges of this round's (not what an earlier round got,
        # which a rewrite from lower down may have left behind a hole).
        acknowledged[key] = start
        handle, piece = await session.open_file(fs, temporary, "r+b" if start else "wb")

        def confirmed(done: int) -> None:
            acknowledged[key] = done

        try:
            try:
                # Only the bytes on their way count against the budget: the open, the close
                # and the rename are round trips during which other files' bytes flow.
                await session.write_all(
                    handle, data, piece, _budget(fs.client).take, start=start, confirmed=confirmed
                )
            finally:
                await session.close_file(handle)
            await session.rename(fs, temporary, request.remote_path)
        except Exception as exc:
            if not isinstance(sink.translate(exc), SinkUnavailableError):
                await session.remove_quietly(fs, temporary)
            raise

    width = max(sink.concurrency, BATCH_IN_FLIGHT)
    # The whole batch at once: its opens (and writes) of one turn of the loop share packets.
    return True, send_batch(sink, requests, put, loop=fs.loop, width=width, pipelined=False)
