"""The generic transfer: any fsspec filesystem, streamed into a temporary name, then renamed.

Its hook runs last (``trylast``), so protocol-specific plugins (S3 and GCS straight to the final
object, SFTP with a hidden temporary file) take precedence where they apply.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Any

from skyframe.errors import DeliveryError
from skyframe.names import check_no_case_twin
from skyframe.storage import Sink, SourceReader, TransferRequest, TransferResult


def upload(request: TransferRequest) -> TransferResult:
    """Stream the file to a hidden temporary name, verify its size, then rename it into place."""
    sink = request.sink
    fs = sink.fs
    if sink.endpoint.protocol == "file":  # a folder that ignores case must not merge two files
        check_no_case_twin(request.remote_path)
    temporary = sink.temporary_path(request.remote_path)
    folder = posixpath.dirname(request.remote_path)
    with SourceReader(request.local_path) as reader:
        sink.ensure_folder(folder)
        try:
            with _create(sink, temporary, folder) as out:
                for chunk in reader.chunks():
                    request.pace(len(chunk))
                    out.write(chunk)
                    request.progress(reader.bytes_read)
            reader.check_unchanged(request.size, request.mtime_ns)
            written = fs.size(temporary)
            if written != reader.bytes_read:
                raise DeliveryError(f"{sink.display}: wrote {written} bytes of {reader.bytes_read}")
            _into_place(sink, temporary, request.remote_path)
        except BaseException as exc:
            if isinstance(exc, FileNotFoundError):
                sink.forget_folders()  # the folder may have been removed behind our back
            with contextlib.suppress(Exception):
                fs.rm(temporary)
            raise
    return TransferResult(reader.bytes_read, reader.sha256)


def _into_place(sink: Sink, temporary: str, final: str) -> None:
    """Rename the temporary file to its final name, replacing an earlier version in one step.

    In a local folder that is ``os.replace``: fsspec's ``mv`` is ``shutil.move``, which on
    Windows, where a rename does not replace, copies the file over the old one, so that a
    reader (or a cut) could meet it half written."""
    if sink.endpoint.protocol == "file":
        os.replace(temporary, final)
    else:
        sink.fs.mv(temporary, final)


def _create(sink: Sink, temporary: str, folder: str) -> Any:
    """The temporary file, open for writing. Its folder, made earlier on this connection, may
    have been removed behind our back (a crew emptying the sink folder): made again, once."""
    try:
        return sink.fs.open(temporary, "wb")
    except FileNotFoundError:
        sink.forget_folders()
        sink.ensure_folder(folder)
        return sink.fs.open(temporary, "wb")
