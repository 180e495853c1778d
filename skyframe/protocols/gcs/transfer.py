"""GCS transfer: straight to the final object, which GCS publishes atomically.

A file smaller than one chunk goes in a single (multipart-encoded) upload carrying its sha256
as object metadata; new files of up to 1 MiB go in batches of such uploads, sent concurrently
(``skyframe_transfer_batch``). A larger file is hashed first (the metadata is fixed when the session
opens), then goes through a resumable session, one chunk (a multiple of 256 KiB) at a time;
the chunk that reaches the declared size publishes the object, so it is sent only after the
file is checked unchanged.

The session URI and the offset the server confirmed are journaled after every chunk. A later
attempt asks the server how much it holds (the status query; ``status_query: false`` trusts
the journal instead) and sends the rest. An expired session, or a file that changed since,
starts anew; a file that changed while it was read cancels its session.

The object the last chunk publishes must have the file's size. Trusting the journal resends
the chunk that a process killed between the server's answer and the journal's update had
already sent; GCS keeps the bytes it holds once, but an emulator may append them again
(fake-gcs-server does). An object of another size is removed and the file sent again afresh.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

from fsspec.asyn import sync

from skyframe.deps import internal
from skyframe.errors import (
    DeliveryError,
    SinkRefusedError,
    SourceChangedError,
    SourceUnreadableError,
)
from skyframe.journal import same_file
from skyframe.protocols.batching import read_whole, send_batch
from skyframe.protocols.gcs.backend import GCSOptions
from skyframe.storage import (
    BatchTransfer,
    Sink,
    SourceReader,
    TransferRequest,
    TransferResult,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/octet-stream"


def cancel_upload(fs: Any, record: dict[str, Any]) -> None:
    """Cancel the resumable session of an interrupted upload."""
    cancel_session(fs, record["session"])


def describe_upload(record: dict[str, Any]) -> str:
    """What the server holds for a journaled resumable session."""
    return f"GCS resumable session, {record.get('offset', 0)} byte(s) confirmed"


def upload(request: TransferRequest) -> TransferResult:
    """Upload one file to a ``gcs://`` sink."""
    sink = request.sink
    settings = sink.settings
    assert isinstance(settings, GCSOptions)
    fs = sink.fs
    bucket, _, key = request.remote_path.partition("/")
    try:
        if request.size >= settings.chunk_size:
            return _resumable(fs, bucket, key, request, settings)
        data, sha256 = read_whole(request)
        sync(fs.loop, _simple, fs, request, data, sha256)
        request.progress(len(data))
        return TransferResult(len(data), sha256)
    except FileNotFoundError:
        # Uploads name no existing object: a 404 here is the bucket.
        raise SinkRefusedError(f"{sink.display}: bucket {bucket!r} does not exist") from None


def _gcsfs_upload(name: str, fallback: str) -> Any:
    """One of gcsfs's upload functions (``gcsfs.core``: undocumented, but what its own files
    use), or None where this gcsfs lacks it."""
    import gcsfs.core

    return internal(gcsfs.core, name, "gcsfs", fallback)


async def _simple(fs: Any, request: TransferRequest, data: bytes, sha256: str) -> None:
    """One request (multipart-encoded: metadata and bytes) that publishes the object."""
    bucket, _, key = request.remote_path.partition("/")
    simple_upload = _gcsfs_upload("simple_upload", "using pipe_file")
    if simple_upload is None:
        await fs._pipe_file(  # fsspec's async API: the coroutine of pipe_file
            request.remote_path, data, metadata={"sha256": sha256}, content_type=CONTENT_TYPE
        )
        return
    await simple_upload(
        fs, bucket, key, data, metadatain={"sha256": sha256}, content_type=CONTENT_TYPE
    )


def batch(sink: Sink) -> BatchTransfer:
    """Small files to a ``gcs://`` sink: concurrent single-request uploads on the event loop."""
    return lambda requests: send_batch(sink, requests, functools.partial(_simple, sink.fs))


def _resumable(
    fs: Any, bucket: str, key: str, request: TransferRequest, settings: GCSOptions
) -> TransferResult:
    fallback = "streaming through fs.open, without resume"
    if None in (
        _gcsfs_upload("initiate_upload", fallback),
        _gcsfs_upload("upload_chunk", fallback),
    ):
        return _streamed(fs, request, settings)
    journal, journal_key = request.journal, request.journal_key
    session, offset, sha256 = _resume(fs, request, settings)
    if session is None:
        session, sha256 = _open_session(fs, bucket, key, request, settings)
    try:
        with SourceReader(
            request.local_path, chunk_size=settings.chunk_size, hashing=False
        ) as reader:
            reader.start_at(offset)
            for chunk in reader.chunks():
                last = offset + len(chunk) >= request.size
                if last:
                    # The chunk that reaches the declared size publishes the object (even if
                    # the file has grown since): only for a file that did not change.
                    reader.check_unchanged(request.size, request.mtime_ns)
                request.pace(len(chunk))
                published = _send_chunk(fs, session, chunk, offset, request)
                if last:
                    _check_published(fs, f"{bucket}/{key}", published, request)
                offset += len(chunk)
                if journal is not None and offset < request.size:
                    journal.update(journal_key, offset=offset)
                request.progress(offset)
            if offset < request.size:  # the file shrank: the session was never completed
                reader.check_unchanged(request.size, request.mtime_ns)
    except BaseException as exc:
        if journal is None or isinstance(exc, SourceChangedError | SourceUnreadableError):
            _cancel_quietly(fs, session)
            if journal is not None:
                journal.forget(journal_key)
        raise
    if journal is not None:
        journal.forget(journal_key)
    return TransferResult(request.size, sha256)


def _streamed(fs: Any, request: TransferRequest, settings: GCSOptions) -> TransferResult:
    """A large file through gcsfs's public file API: a resumable session that is not
    journaled (an interrupted upload starts again), cancelled if the file changes."""
    sha256 = request.digest()
    out = fs.open(
        request.remote_path,
        "wb",
        block_size=settings.chunk_size,
        metadata={"sha256": sha256},
        content_type=CONTENT_TYPE,
    )
    try:
        with SourceReader(
            request.local_path, chunk_size=settings.chunk_size, hashing=False
        ) as reader:
            done = 0
            for chunk in reader.chunks():
                request.pace(len(chunk))
                out.write(chunk)
                done += len(chunk)
                request.progress(done)
            reader.check_unchanged(request.size, request.mtime_ns)
    except BaseException:
        with contextlib.suppress(Exception):
            out.discard()
        out.closed = True  # never published by a later close
        raise
    out.close()  # the last chunk publishes the object
    return TransferResult(request.size, sha256)


def _open_session(
    fs: Any, bucket: str, key: str, request: TransferRequest, settings: GCSOptions
) -> tuple[str, str]:
    """Hash the file, open a resumable session carrying the digest, journal it."""
    initiate_upload = _gcsfs_upload("initiate_upload", "")
    sha256 = request.digest()
    metadata = {"sha256": sha256}
    session = sync(fs.loop, initiate_upload, fs, bucket, key, CONTENT_TYPE, metadata=metadata)
    if request.journal is not None:
        request.journal.start(
            request.journal_key,
            {
                "protocol": "gcs",
                "session": session,
                "local": str(request.local_path),
                "size": request.size,
                "mtime_ns": request.mtime_ns,
                "chunk_size": settings.chunk_size,
                "sha256": sha256,
                "offset": 0,
            },
        )
    return session, sha256


def _send_chunk(fs: Any, session: str, chunk: bytes, offset: int, request: TransferRequest) -> Any:
    """Send one chunk; returns the server's answer (the object's resource after the last)."""
    upload_chunk = _gcsfs_upload("upload_chunk", "")
    try:
        return sync(fs.loop, upload_chunk, fs, session, chunk, offset, request.size, CONTENT_TYPE)
    except Exception as exc:
        if not session_gone(exc):
            raise
        if request.journal is not None:
            request.journal.forget(request.journal_key)
        raise DeliveryError(
            f"{request.sink.display}: the upload session of {request.remote_path} expired; "
            "it starts again"
        ) from None


def _check_published(fs: Any, path: str, resource: Any, request: TransferRequest) -> None:
    """Raise (after removing the object and the journal record) when the object the last chunk
    published does not have the file's size."""
    size = resource.get("size") if isinstance(resource, dict) else None
    if size is None or int(size) == request.size:
        return
    if request.journal is not None:
        request.journal.forget(request.journal_key)  # the session is spent: start anew
    try:
        fs.rm_file(path)
    except Exception as exc:
        log.warning("%s: could not remove %s: %s", request.sink.display, path, exc)
    raise DeliveryError(
        f"{request.sink.display}: the server assembled {int(size)} bytes of "
        f"{request.size} for {request.remote_path}; it is sent again from the start"
    )


def _resume(fs: Any, request: TransferRequest, settings: GCSOptions) -> tuple[str | None, int, str]:
    """The journaled session of this file and the offset to go on from, or (None, 0, "")."""
    journal = request.journal
    record = journal.get(request.journal_key) if journal is not None else None
    if journal is None or record is None:
        return None, 0, ""
    usable = (
        record.get("protocol") == "gcs"
        and same_file(record, request.size, request.mtime_ns)
        and record.get("chunk_size") == settings.chunk_size
    )
    offset: int | None = int(record.get("offset", 0))
    if usable and settings.status_query:
        offset = session_offset(fs, record["session"], request.size)
    if not usable or offset is None:
        if not usable:
            _cancel_quietly(fs, record["session"])
        journal.forget(request.journal_key)
        return None, 0, ""
    log.info("%s: resuming %s at byte %d", request.sink.display, request.remote_path, offset)
    return record["session"], offset, record["sha256"]


def session_offset(fs: Any, session: str, size: int) -> int | None:
    """How many bytes the server holds for a resumable session (the status query), or None
    when the session expired or is already complete (it starts anew then)."""
    try:
        headers, text = fs.call(
            "PUT",
            session,
            headers={"Content-Range": f"bytes */{size}", "Content-Length": "0"},
            data=b"",
            timeout=30,
        )
    except Exception as exc:
        if not session_gone(exc):
            raise
        log.info("the resumable session is gone (%s); starting anew", exc)
        return None
    if text:  # a resource: the upload completed (e.g. killed before it was recorded)
        return None
    held = headers.get("Range")
    return int(held.rsplit("-", 1)[1]) + 1 if held else 0


def session_gone(exc: BaseException) -> bool:
    """True for the answers of a session that expired (410) or was cancelled (404)."""
    return isinstance(exc, FileNotFoundError) or getattr(exc, "code", None) in (404, 410)


def cancel_session(fs: Any, session: str) -> None:
    """Cancel a resumable session (the server drops what it holds); one gone already is fine."""
    try:
        fs.call("DELETE", session, timeout=10)
    except Exception as exc:
        if not session_gone(exc):
            raise


def _cancel_quietly(fs: Any, session: str) -> None:
    """Cancel a session while another error is on its way; ``skyframe cleanup`` catches what
    this cannot."""
    try:
        cancel_session(fs, session)
    except Exception as exc:
        log.debug("could not cancel resumable session: %s", exc)


def remote_sha256(fs: Any, path: str) -> str:
    """The sha256 an object carries in its custom metadata (every upload of this transfer
    sets it), from the object's description; "" when it has none."""
    value = (fs.info(path).get("metadata") or {}).get("sha256")
    return str(value) if value else ""
