"""SFTP transfer: stream into a hidden temporary file beside the target, then rename it into
place with ``posix-rename@openssh.com``, which replaces the target atomically.

Round trips per file: open, write(s), close, rename; folders are created once per connection.
The SFTP server acknowledges every write, so the size is not asked again. Large files are
written in chunks at explicit offsets, two chunks in flight, each split by asyncssh into many
parallel requests: reading and hashing the next chunk overlaps with sending this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections import deque
from concurrent.futures import Future
from typing import Any

from skyframe.markers import hookimpl
from skyframe.storage import SourceReader, TransferRequest, TransferResult, temporary_path

CHUNK = 4 * 1024 * 1024  #: bytes per write call (asyncssh splits it into parallel requests)
IN_FLIGHT = 2  #: write calls outstanding at once (memory: IN_FLIGHT x CHUNK)


def _write_pipelined(out: Any, reader: SourceReader, request: TransferRequest) -> None:
    """Write the file at explicit offsets, keeping IN_FLIGHT chunks on the wire."""
    handle = out._file  # sshfs's file wraps asyncssh's, which takes explicit offsets
    pending: deque[tuple[Future[Any], int]] = deque()
    offset = 0
    try:
        for chunk in reader.chunks():
            write = handle.write(chunk, offset)
            offset += len(chunk)
            pending.append((asyncio.run_coroutine_threadsafe(write, out.loop), offset))
            while len(pending) >= IN_FLIGHT:
                future, done = pending.popleft()
                future.result()
                request.progress(done)
        while pending:
            future, done = pending.popleft()
            future.result()
            request.progress(done)
    except BaseException:
        for future, _ in pending:
            future.cancel()
        raise


@hookimpl
def skyframe_transfer(request: TransferRequest) -> TransferResult | None:
    """Upload to an ``sftp://`` sink."""
    sink = request.sink
    if sink.protocol != "sftp":
        return None
    fs = sink.fs
    temporary = temporary_path(request.remote_path)
    with SourceReader(request.local_path, chunk_size=CHUNK) as reader:
        sink.ensure_folder(posixpath.dirname(request.remote_path))
        try:
            out = fs.open(temporary, "wb")
        except FileNotFoundError:
            sink.forget_folders()  # removed behind our back since we made it
            sink.ensure_folder(posixpath.dirname(request.remote_path))
            out = fs.open(temporary, "wb")
        try:
            with out:
                _write_pipelined(out, reader, request)
            reader.check_unchanged(request.size, request.mtime_ns)
            fs.mv(temporary, request.remote_path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(temporary)
            raise
    return TransferResult(reader.bytes_read, reader.sha256)
