"""SFTP transfer: stream into a hidden temporary file beside the target, then rename it into
place with ``posix-rename@openssh.com``, which replaces the target atomically.

Round trips per file: open, write(s), close, rename; folders are created once per connection.
The SFTP server acknowledges every write, so the size is not asked again.
"""

from __future__ import annotations

import contextlib
import posixpath

from skyframe.markers import hookimpl
from skyframe.storage import SourceReader, TransferRequest, TransferResult, temporary_path


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``sftp://`` sink."""
    sink = request.sink
    if sink.protocol != "sftp":
        return None
    fs = sink.fs
    temporary = temporary_path(request.remote_path)
    with SourceReader(request.local_path) as reader:
        sink.ensure_folder(posixpath.dirname(request.remote_path))
        try:
            out = fs.open(temporary, "wb")
        except FileNotFoundError:
            sink.forget_folders()  # removed behind our back since we made it
            sink.ensure_folder(posixpath.dirname(request.remote_path))
            out = fs.open(temporary, "wb")
        try:
            with out:
                for chunk in reader.chunks():
                    out.write(chunk)
                    request.progress(reader.bytes_read)
            reader.check_unchanged(request.size, request.mtime_ns)
            fs.mv(temporary, request.remote_path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(temporary)
            raise
    return TransferResult(reader.bytes_read, reader.sha256)
