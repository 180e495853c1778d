"""What the transfers share for small files: read one whole, and send a batch.

A small file goes in one request: it is read whole and hashed, checked unchanged, and paced
(``read_whole``). A batch (``skyframe_transfer_batch``) reads each file that way in the calling
thread and hands it to the backend's upload coroutine on fsspec's event loop as soon as it is
read, ``concurrency`` at a time (``send_batch``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError, Future

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
) -> list[TransferResult | Exception]:
    """Read every file here and ``put`` each on ``loop`` (default: fsspec's, the one s3fs,
    gcsfs and sshfs run on) as soon as it is read, ``width`` at a time (default: the sink's
    concurrency); one outcome per request, in order (a file that could not be read or sent
    gets its exception).

    The first file goes while the others are read: reading and hashing a whole batch first
    held its first request back, and so left the link idle at the start of every batch that
    no other batch overlapped."""
    loop = loop or get_loop()
    outcomes: list[TransferResult | Exception] = []
    sending: list[tuple[int, Future[TransferResult]]] = []
    journal = requests[0].journal if requests else None
    stale = journal is not None and not journal.is_empty()  # one query for the whole batch
    limit = asyncio.Semaphore(width or sink.concurrency)

    async def send(request: TransferRequest, data: bytes, sha256: str) -> TransferResult:
        async with limit:
            await put(request, data, sha256)
        request.progress(len(data))
        return TransferResult(len(data), sha256)

    try:
        for index, request in enumerate(requests):
            try:
                data, sha256 = read_whole(request, stale=stale)
            except Exception as exc:  # this file only: unreadable, changed, or the run stopping
                outcomes.append(exc)
                continue
            outcomes.append(DeliveryError("not sent"))
            future = asyncio.run_coroutine_threadsafe(send(request, data, sha256), loop)
            sending.append((index, future))
        for index, future in sending:
            try:
                outcomes[index] = future.result()
            except CancelledError:
                raise  # the loop is going away: not this file's doing
            except Exception as exc:
                outcomes[index] = exc
    except BaseException:
        for _, future in sending:
            future.cancel()
        raise
    return outcomes
