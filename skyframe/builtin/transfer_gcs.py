"""GCS transfer: straight to the final object, which GCS publishes atomically.

A file smaller than one chunk goes in a single (multipart-encoded) upload carrying its sha256
as object metadata. A larger file goes through a resumable session, one chunk (a multiple of
256 KiB) at a time; the chunk that reaches the declared size publishes the object, so it is
sent only after the file is checked unchanged, and the session is cancelled on any error.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fsspec.asyn import sync

from skyframe.backends.gcs import GCSOptions
from skyframe.errors import SinkRefusedError
from skyframe.markers import hookimpl
from skyframe.storage import SourceReader, TransferRequest, TransferResult

CONTENT_TYPE = "application/octet-stream"


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to a ``gcs://`` sink."""
    sink = request.sink
    if sink.protocol != "gcs":
        return None
    settings = sink.settings
    assert isinstance(settings, GCSOptions)
    fs = sink.fs
    bucket, _, key = request.remote_path.partition("/")
    try:
        with SourceReader(request.local_path, chunk_size=settings.chunk_size) as reader:
            if request.size < settings.chunk_size:
                _simple(fs, bucket, key, reader, request)
            else:
                _resumable(fs, bucket, key, reader, request)
    except FileNotFoundError:
        # Uploads name no existing object: a 404 here is the bucket.
        raise SinkRefusedError(f"{sink.display}: bucket {bucket!r} does not exist") from None
    return TransferResult(reader.bytes_read, reader.sha256)


def _simple(fs: Any, bucket: str, key: str, reader: SourceReader, request: TransferRequest) -> None:
    from gcsfs.core import simple_upload

    data = b"".join(reader.chunks())
    reader.check_unchanged(request.size, request.mtime_ns)
    sync(
        fs.loop,
        simple_upload,
        fs,
        bucket,
        key,
        data,
        metadatain={"sha256": reader.sha256},
        content_type=CONTENT_TYPE,
    )
    request.progress(len(data))


def _resumable(
    fs: Any, bucket: str, key: str, reader: SourceReader, request: TransferRequest
) -> None:
    from gcsfs.core import initiate_upload, upload_chunk

    location = sync(fs.loop, initiate_upload, fs, bucket, key, CONTENT_TYPE)
    offset = 0
    try:
        for chunk in reader.chunks():
            if offset + len(chunk) >= request.size:
                # The chunk that reaches the declared size publishes the object (even if the
                # file has grown since): only for a file that did not change.
                reader.check_unchanged(request.size, request.mtime_ns)
            sync(fs.loop, upload_chunk, fs, location, chunk, offset, request.size, CONTENT_TYPE)
            offset += len(chunk)
            request.progress(offset)
        if offset < request.size:  # the file shrank: the session was never completed
            reader.check_unchanged(request.size, request.mtime_ns)
    except BaseException:
        with contextlib.suppress(Exception):
            sync(fs.loop, fs._call, "DELETE", location, timeout=10)
        raise
