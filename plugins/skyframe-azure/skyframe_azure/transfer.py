"""Azure uploads: straight to the final blob, which Azure publishes atomically.

A file smaller than one block goes in one request, with its sha256 as blob metadata. A larger
one is hashed first, then sent as staged blocks, ``block_concurrency`` at a time, and
published by committing the block list (with the sha256) once the file is known unchanged.

Each block's id names its place and its content (index and MD5), so an upload that a crash or
a dropped link interrupted resumes by itself: the next attempt lists the blocks the server
holds uncommitted and stages only those it lacks. The journal records the upload (for
``skyframe cleanup`` and for a file that changes meanwhile); Azure discards uncommitted
blocks that are never committed after a week, so cancelling one only forgets it.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from skyframe.errors import SourceChangedError, SourceUnreadableError
from skyframe.journal import same_file
from skyframe.storage import SourceReader, TransferRequest, TransferResult
from skyframe_azure.backend import AzureOptions, blob_client

CONTENT_TYPE = "application/octet-stream"


def block_id(index: int, chunk: bytes) -> str:
    """A block's id: its place and its content, all ids of one length (as Azure requires)."""
    return f"{index:06d}-{hashlib.md5(chunk, usedforsecurity=False).hexdigest()}"


def upload(request: TransferRequest) -> TransferResult:
    """Deliver one file to an ``az://`` sink."""
    sink = request.sink
    settings = sink.settings
    assert isinstance(settings, AzureOptions)
    container, _, name = request.remote_path.partition("/")
    client = blob_client(sink.fs, settings, container, name)
    from azure.storage.blob import ContentSettings

    content = ContentSettings(content_type=CONTENT_TYPE)
    block_size = settings.block_size_for(request.size)
    if request.size < block_size:
        if request.journal is not None:
            request.journal.forget(request.journal_key)  # a larger version's blocks: unused
        with SourceReader(request.local_path, chunk_size=max(request.size, 1)) as reader:
            data = b"".join(reader.chunks())
            reader.check_unchanged(request.size, request.mtime_ns)
        sha256 = reader.sha256
        request.pace(len(data))
        client.upload_blob(
            data, overwrite=True, metadata={"sha256": sha256}, content_settings=content
        )
        request.progress(len(data))
        return TransferResult(len(data), sha256)
    return _in_blocks(request, client, settings, block_size, content)


def _in_blocks(
    request: TransferRequest,
    client: Any,
    settings: AzureOptions,
    block_size: int,
    content: Any,
) -> TransferResult:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobBlock

    journal, key = request.journal, request.journal_key
    sha256 = request.digest()
    record = journal.get(key) if journal is not None else None
    if journal is not None and (
        record is None or not same_file(record, request.size, request.mtime_ns)
    ):
        journal.start(
            key,
            {
                "protocol": "azure",
                "local": str(request.local_path),
                "size": request.size,
                "mtime_ns": request.mtime_ns,
                "block_size": block_size,
                "sha256": sha256,
            },
        )
    try:
        _, uncommitted = client.get_block_list("uncommitted")
        held = {block.id: block.size for block in uncommitted}
    except ResourceNotFoundError:  # no blob, and no block staged for it yet
        held = {}
    ids: list[str] = []
    done = 0
    in_flight: deque[tuple[Future[Any], int]] = deque()

    def settle_oldest() -> None:
        nonlocal done
        future, size = in_flight.popleft()
        future.result()
        done += size
        request.progress(done)

    with (
        ThreadPoolExecutor(settings.block_concurrency, thread_name_prefix="skyframe-azure") as pool,
        SourceReader(request.local_path, chunk_size=block_size, hashing=False) as reader,
    ):
        try:
            for index, chunk in enumerate(reader.chunks()):
                ident = block_id(index, chunk)
                ids.append(ident)
                if held.get(ident) == len(chunk):
                    done += len(chunk)  # staged by an earlier attempt
                    continue
                request.pace(len(chunk))
                in_flight.append((pool.submit(client.stage_block, ident, chunk), len(chunk)))
                while len(in_flight) >= settings.block_concurrency:
                    settle_oldest()
            while in_flight:
                settle_oldest()
            reader.check_unchanged(request.size, request.mtime_ns)
        except (SourceChangedError, SourceUnreadableError):
            if journal is not None:
                journal.forget(key)  # the blocks staged are of a version that is gone
            raise
        finally:
            for future, _ in in_flight:
                future.cancel()
    client.commit_block_list(
        [BlobBlock(block_id=ident) for ident in ids],
        metadata={"sha256": sha256},
        content_settings=content,
    )
    if journal is not None:
        journal.forget(key)
    return TransferResult(request.size, sha256)
