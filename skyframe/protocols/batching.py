"""What the transfers share for small files: read one whole, and send a batch.

A small file goes in one request: it is read whole and hashed, checked unchanged, and paced
(``read_whole``). A batch (``skyframe_transfer_batch``) reads each file that way in the calling
thread and hands it to the backend's upload coroutine on fsspec's event loop as soon as it is
read, ``concurrency`` at a time (``send_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any

from fsspec.asyn import get_loop

from skyframe.cleanup import drop_stale
from skyframe.errors import DeliveryError
from skyframe.storage import Sink, SourceReader, TransferRequest, TransferResult

#: Uploads one file's bytes, with its sha256 for the object's metadata.
Put = Callable[[TransferRequest, bytes, str], Awaitable[None]]


def read_whole(request: TransferRequest, *, stale: bool = True) -> tuple[bytes, str]:
    """A file small enough for one request, read and hashed (checked unchanged); then ``pace``.

    ``stale=False``: the journal is known to hold no upload to drop, so it is not looked up.
    """
    if stale:
        drop_stale(request)  # the file shrank since a resumable upload of it began
    with SourceReader(request.local_path, chunk_size=max(request.size, 1)) as reader:
        data = b"".join(reader.chunks())
        reader.check_unchanged(request.size, request.mtime_ns)
    request.pace(len(data))
    return data, reader.sha256


def send_batch(
    sink: Sink,
    requests: list[TransferRequest],
    put: Put,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    width: int | None = None,
    pipelined: bool = True,
) -> list[TransferResult | Exception]:
    """Read every file here and ``put`` each on ``loop`` (default: fsspec's, the one s3fs,
    gcsfs and sshfs run on) as soon as it is read, ``width`` at a time (default: the sink's
    concurrency); one outcome per request, in order (a file that could not be read or sent
    gets its exception).

    The first file goes while the others are read: reading and hashing a whole batch first
    held its first request back, and so left the link idle at the start of every batch that
    no other batch overlapped. The files read while the loop is busy are handed to it
    together (see :class:`_Handover`). ``pipelined=False`` hands the whole batch over once
    it is read, in one turn of the loop: for a protocol whose requests of one turn share
    their packets (SFTP's, on one SSH connection), where a file handed over alone costs
    packets of its own."""
    loop = loop or get_loop()
    outcomes: list[TransferResult | Exception] = []
    journal = requests[0].journal if requests else None
    stale = journal is not None and not journal.is_empty()  # one query for the whole batch
    limit = asyncio.Semaphore(width or sink.concurrency)

    async def send(request: TransferRequest, data: bytes, sha256: str) -> TransferResult:
        async with limit:
            await put(request, data, sha256)
        request.progress(len(data))
        return TransferResult(len(data), sha256)

    handover = _Handover(loop, send, pipelined=pipelined)
    finished: Future[list[tuple[int, TransferResult | BaseException]]] | None = None
    try:
        for index, request in enumerate(requests):
            try:
                data, sha256 = read_whole(request, stale=stale)
            except Exception as exc:  # this file only: unreadable, changed, or the run stopping
                outcomes.append(exc)
                continue
            outcomes.append(DeliveryError("not sent"))
            handover.add(index, request, data, sha256)
        finished = asyncio.run_coroutine_threadsafe(handover.results(), loop)
        answers = finished.result()
    except BaseException:
        if finished is not None:
            finished.cancel()
        handover.stop()
        raise
    for index, outcome in answers:
        if not isinstance(outcome, TransferResult | Exception):
            raise outcome  # the loop is going away (cancelled): not this file's doing
        outcomes[index] = outcome
    return outcomes


class _Handover:
    """Files read in one thread, started as tasks on an event loop: a file read while the
    loop has not yet taken the ones before goes with them, in the same wake-up of the loop,
    rather than in one of its own."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[TransferRequest, bytes, str], Coroutine[Any, Any, TransferResult]],
        *,
        pipelined: bool = True,
    ) -> None:
        self.loop = loop
        self.send = send
        self.pipelined = pipelined  #: False: nothing starts before :meth:`results`
        self._ready: list[tuple[int, TransferRequest, bytes, str]] = []  #: not yet on the loop
        self._lock = threading.Lock()
        self._tasks: dict[int, asyncio.Task[TransferResult]] = {}  #: on the loop only
        self._stopped = False

    def add(self, index: int, request: TransferRequest, data: bytes, sha256: str) -> None:
        """Start sending a file read (from the reading thread)."""
        with self._lock:
            wake = not self._ready  # else a wake-up is on its way, and takes this one too
            self._ready.append((index, request, data, sha256))
        if wake and self.pipelined:
            self.loop.call_soon_threadsafe(self._start_ready)

    def _start_ready(self) -> None:
        with self._lock:
            taken, self._ready = self._ready, []
        if self._stopped:
            return
        for index, request, data, sha256 in taken:
            self._tasks[index] = self.loop.create_task(self.send(request, data, sha256))

    async def results(self) -> list[tuple[int, TransferResult | BaseException]]:
        """Every file's outcome, by its index, once all are settled (on the loop)."""
        self._start_ready()
        done = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        return list(zip(self._tasks, done, strict=True))

    def stop(self) -> None:
        """Cancel what is on its way, and start nothing more (from the reading thread)."""

        def stop() -> None:
            self._stopped = True
            for task in self._tasks.values():
                task.cancel()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs there
            self.loop.call_soon_threadsafe(stop)
