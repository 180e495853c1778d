"""The generic transfer: any fsspec filesystem, streamed into a temporary name, then renamed.

It runs last (``trylast``), so protocol-specific plugins (resumable S3 multipart, GCS sessions,
SFTP offsets) take precedence where they are installed.
"""

from __future__ import annotations

import contextlib
import posixpath

from skyframe.errors import DeliveryError
from skyframe.markers import hookimpl
from skyframe.storage import SourceReader, TransferRequest, TransferResult, temporary_path


@hookimpl(trylast=True)
def skyframe_transfer(request: TransferRequest) -> TransferResult:
    """Stream the file to a hidden temporary name, verify its size, then rename it into place."""
    fs = request.sink.fs
    parent = posixpath.dirname(request.remote_path)
    temporary = temporary_path(request.remote_path)
    with SourceReader(request.local_path) as reader:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(temporary, "wb") as out:
                for chunk in reader.chunks():
                    out.write(chunk)
                    request.progress(reader.bytes_read)
            reader.check_unchanged(request.size, request.mtime_ns)
            written = fs.size(temporary)
            if written != reader.bytes_read:
                raise DeliveryError(
                    f"{request.sink.display}: wrote {written} bytes of {reader.bytes_read}"
                )
            fs.mv(temporary, request.remote_path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(temporary)
            raise
    return TransferResult(reader.bytes_read, reader.sha256)
