"""SFTP transfer: stream into a hidden temporary file beside the target, then rename it into
place with ``posix-rename@openssh.com``, which replaces the target atomically.

Round trips per file: open, write(s), close, rename; folders are created once per connection.
A large upload is journaled as it goes (the offset up to which every write was acknowledged):
after a crash or a dropped link the next attempt reopens the temporary file without
truncating it and goes on from the lower of that offset and the file's size, re-reading
the local prefix only to finish the hash.

The SFTP server acknowledges every write, so the size is not asked again. Large files are
written in chunks at explicit offsets, two chunks in flight, each split by asyncssh into many
parallel requests: reading and hashing the next chunk overlaps with sending this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import re
import shlex
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from skyframe.cleanup import drop_stale
from skyframe.deps import import_asyncssh, internal
from skyframe.errors import SourceChangedError, SourceUnreadableError
from skyframe.journal import UploadJournal, same_file
from skyframe.storage import SourceReader, TransferRequest, TransferResult

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024  #: bytes per write call (asyncssh splits it into parallel requests)
IN_FLIGHT = 2  #: write calls outstanding at once (memory: IN_FLIGHT x CHUNK)
_HEX64 = re.compile("[0-9a-f]{64}")


def _write_pipelined(
    out: Any,
    reader: SourceReader,
    request: TransferRequest,
    offset: int,
    confirmed: Callable[[int], None],
) -> None:
    """Write the rest of the file from ``offset``, keeping IN_FLIGHT chunks on the wire;
    ``confirmed(end)`` is called as the server acknowledges each chunk, in file order."""
    # sshfs's file wraps asyncssh's, whose writes take explicit offsets: several can be in
    # flight while the next chunk is read and hashed.
    handle = internal(out, "_file", "sshfs", "writing one chunk at a time")
    if handle is None:
        _write_in_turn(out, reader, request, offset, confirmed)
        return
    pending: deque[tuple[Future[Any], int]] = deque()
    try:
        for chunk in reader.chunks():
            request.pace(len(chunk))
            write = handle.write(chunk, offset)
            offset += len(chunk)
            pending.append((asyncio.run_coroutine_threadsafe(write, out.loop), offset))
            while len(pending) >= IN_FLIGHT:
                future, done = pending.popleft()
                future.result()
                confirmed(done)
        while pending:
            future, done = pending.popleft()
            future.result()
            confirmed(done)
    except BaseException:
        for future, _ in pending:
            future.cancel()
        raise


def _write_in_turn(
    out: Any,
    reader: SourceReader,
    request: TransferRequest,
    offset: int,
    confirmed: Callable[[int], None],
) -> None:
    """:func:`_write_pipelined` through sshfs's public file API: one chunk at a time."""
    out.seek(offset)
    for chunk in reader.chunks():
        request.pace(len(chunk))
        out.write(chunk)
        offset += len(chunk)
        confirmed(offset)


def _resume_offset(
    fs: Any, journal: UploadJournal | None, request: TransferRequest, temporary: str
) -> int:
    """Where a journaled upload of this file into ``temporary`` can go on from (0: anew).

    The lower of the journaled offset (every byte before it was acknowledged) and the
    temporary file's size (which a write still in flight may have pushed past a hole).
    """
    if journal is None:
        return 0
    record = journal.get(request.journal_key)
    if (
        record is None
        or record.get("protocol") != "sftp"
        or record.get("temporary") != temporary
        or not same_file(record, request.size, request.mtime_ns)
    ):
        return 0
    try:
        remote_size = int(fs.info(temporary)["size"])
    except FileNotFoundError:
        return 0
    return max(0, min(int(record.get("offset", 0)), remote_size, request.size))


def cancel_upload(fs: Any, record: dict[str, Any]) -> None:
    """Remove the temporary file of an interrupted upload."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(record["temporary"])


def describe_upload(record: dict[str, Any]) -> str:
    """What the server holds for a journaled upload."""
    return f"SFTP temporary file, {record.get('offset', 0)} byte(s) written"


def upload(request: TransferRequest) -> TransferResult:
    """Upload one file to an ``sftp://`` sink."""
    sink = request.sink
    fs = sink.fs
    # A file of one chunk is sent again whole: a journal would cost more than it saves.
    journal = request.journal if request.size > CHUNK else None
    key = request.journal_key
    temporary = sink.temporary_path(request.remote_path)
    if journal is None:
        drop_stale(request)  # the file shrank since a journaled upload of it began
    with SourceReader(request.local_path, chunk_size=CHUNK) as reader:
        sink.ensure_folder(posixpath.dirname(request.remote_path))
        start = _resume_offset(fs, journal, request, temporary)
        if start:
            log.info("%s: resuming %s at byte %d", sink.display, request.remote_path, start)
            reader.start_at(start)  # hashes what is already there
        elif journal is not None:
            journal.start(
                key,
                {
                    "protocol": "sftp",
                    "temporary": temporary,
                    "local": str(request.local_path),
                    "size": request.size,
                    "mtime_ns": request.mtime_ns,
                    "offset": 0,
                },
            )

        def confirmed(done: int) -> None:
            if journal is not None:
                journal.update(key, offset=done)
            request.progress(done)

        out = _open(sink, temporary, "r+b" if start else "wb")
        try:
            with out:
                _write_pipelined(out, reader, request, start, confirmed)
            reader.check_unchanged(request.size, request.mtime_ns)
            fs.mv(temporary, request.remote_path)
        except BaseException as exc:
            if journal is None or isinstance(exc, SourceChangedError | SourceUnreadableError):
                with contextlib.suppress(Exception):
                    fs.rm(temporary)
                if journal is not None:
                    journal.forget(key)
            raise
    if journal is not None:
        journal.forget(key)
    return TransferResult(reader.bytes_read, reader.sha256)


def _open(sink: Any, temporary: str, mode: str) -> Any:
    """Open the temporary file, making its folder again if it was removed behind our back."""
    try:
        return sink.fs.open(temporary, mode)
    except FileNotFoundError:
        if mode != "wb":
            raise
        sink.forget_folders()
        sink.ensure_folder(posixpath.dirname(temporary))
        return sink.fs.open(temporary, mode)


#: How long the server may take to hash one object (``skyframe verify``).
HASH_TIMEOUT = 600.0
#: Connections whose server runs no commands (an SFTP-only account): not asked again.
_NO_COMMANDS: weakref.WeakSet[Any] = weakref.WeakSet()


def remote_sha256(fs: Any, path: str) -> str | None:
    """The sha256 of a file as the server computes it (``sha256sum`` over the SSH connection,
    nothing downloaded); None when the server cannot tell: an account that runs no commands
    (``ForceCommand internal-sftp``, a restricted shell) or a system without ``sha256sum``.
    Such a server is not asked again on this connection."""
    execute = getattr(fs, "execute", None)
    if execute is None or fs in _NO_COMMANDS:
        return None
    asyncssh = import_asyncssh()
    try:
        done = execute(f"sha256sum -- {shlex.quote(path)}", check=False, timeout=HASH_TIMEOUT)
    except asyncssh.ChannelOpenError as exc:  # the server refuses command sessions
        log.info("%s: the server runs no commands (%s): sizes only", path, exc.reason)
        _NO_COMMANDS.add(fs)
        return None
    except asyncssh.TimeoutError:
        log.info("%s: the server took over %.0f s to hash it: size only", path, HASH_TIMEOUT)
        return None
    except asyncssh.Error as exc:  # the connection: what verify reports as unreadable
        raise OSError(f"the SSH connection failed: {exc.reason}") from exc
    out = done.stdout if isinstance(done.stdout, str) else bytes(done.stdout or b"").decode()
    # sha256sum writes "HASH  NAME", with a backslash first when it escaped the name.
    digest = out.lstrip("\\").split(" ", 1)[0].strip().lower()
    if done.exit_status == 0 and _HEX64.fullmatch(digest):
        return digest
    if done.exit_status == 1:  # sha256sum ran and could not read it: gone, or no permission
        raise FileNotFoundError(path)
    log.info("%s: the server cannot hash files (exit %s): sizes only", path, done.exit_status)
    _NO_COMMANDS.add(fs)
    return None
