"""S3 transfer: straight to the final key, which S3 publishes atomically.

A file smaller than one part goes in a single PUT carrying its sha256 as object metadata
(``x-amz-meta-sha256``). A larger file goes as a multipart upload: parts are read one after
the other (memory stays at ``part_concurrency`` parts) and sent ``part_concurrency`` at a
time; the upload is completed only after the file is checked unchanged, and aborted on any
error, so no partial object is ever visible.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import Future
from typing import Any

from skyframe.backends.s3 import S3Options, direct_put
from skyframe.markers import hookimpl
from skyframe.storage import SourceReader, TransferRequest, TransferResult


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``s3://`` sink."""
    sink = request.sink
    if sink.protocol != "s3":
        return None
    settings = sink.settings
    assert isinstance(settings, S3Options)
    fs = sink.fs
    bucket, _, key = request.remote_path.partition("/")
    part_size = settings.part_size_for(request.size)
    with SourceReader(request.local_path, chunk_size=part_size) as reader:
        if request.size < part_size:
            data = b"".join(reader.chunks())
            reader.check_unchanged(request.size, request.mtime_ns)
            metadata = {"sha256": reader.sha256}
            direct = direct_put(fs, settings)
            if direct is None or not direct.put(bucket, key, data, metadata):
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, Metadata=metadata)
            request.progress(len(data))
        else:
            _multipart(fs, bucket, key, reader, request, width=settings.part_concurrency)
    return TransferResult(reader.bytes_read, reader.sha256)


def _multipart(
    fs: Any, bucket: str, key: str, reader: SourceReader, request: TransferRequest, *, width: int
) -> None:
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]
    in_flight: deque[tuple[int, int, Future[Any]]] = deque()
    parts: list[dict[str, Any]] = []
    sent = 0

    def settle_oldest() -> None:
        nonlocal sent
        number, size, future = in_flight.popleft()
        parts.append({"PartNumber": number, "ETag": future.result()["ETag"]})
        sent += size
        request.progress(sent)

    try:
        for number, chunk in enumerate(reader.chunks(), start=1):
            call = fs._call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
            )
            in_flight.append((number, len(chunk), asyncio.run_coroutine_threadsafe(call, fs.loop)))
            while len(in_flight) >= width:
                settle_oldest()
        while in_flight:
            settle_oldest()
        reader.check_unchanged(request.size, request.mtime_ns)
        fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        for _, _, future in in_flight:
            future.cancel()
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise
