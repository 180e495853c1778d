"""SFTP transfer: stream into a hidden temporary file beside the target, then rename it into
place with ``posix-rename@openssh.com``, which replaces the target atomically.

Round trips per file: open, write(s), close, rename; folders are created once per connection.
The writes, the close and the rename go through skyframe's own SFTP sessions on the
connection (``session``): large files on one, small files on another. Small new files go in
batches (``batches``), whose files' requests are all in flight at once.

A large upload is journaled as it goes (the offset up to which every write was acknowledged):
after a crash or a dropped link the next try reopens the temporary file without truncating it
and goes on from the lower of that offset and the file's size, re-reading the local prefix
only to finish the hash.

Large files are written in pieces of :data:`PIECE` bytes at explicit offsets, up to
:data:`WINDOW` bytes of them awaiting the server's acknowledgement, so that reading and hashing
overlap with sending and the acknowledged offset trails what was sent by little more than what
is on the wire: a cut costs the bytes in flight, not a whole chunk.

A connection lost during an upload is not the file's failure: the upload reconnects (the
sink's connection is dropped and rebuilt once for all the transfers that shared it) and goes
on from the acknowledged offset (a small file, which has no journal, from what the try before
got acknowledged, as far as its temporary file holds it): at once after a try on which the
server answered, after a growing wait when it did not. Only :data:`RECONNECTS` tries in a
row without an answer (or :data:`TRIES` that got no byte further) give the error to the
caller: the sink is then away (see :class:`skyframe.storage.SinkHealth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import re
import shlex
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from skyframe import backoff
from skyframe.cleanup import drop_stale
from skyframe.deps import import_asyncssh
from skyframe.errors import (
    SinkUnavailableError,
    SourceChangedError,
    SourceUnreadableError,
)
from skyframe.journal import UploadJournal, same_file
from skyframe.protocols.classify import one_line
from skyframe.protocols.sftp import openssh, session
from skyframe.storage import Sink, SourceReader, TransferRequest, TransferResult

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024  #: files up to this size have no journal (a crash sends them again)
PIECE = session.PIECE  #: bytes per write request, at most (less if the server says so)
WINDOW = 8 * 1024 * 1024  #: bytes written and not yet acknowledged, at most (memory bound)
JOURNAL_EVERY = 0.5  #: seconds between journal updates of an upload's acknowledged offset
#: ... or bytes, whichever comes first: on a fast link half a second is a lot to send again
JOURNAL_BYTES = 16 * 1024 * 1024
RECONNECTS = 6  #: tries in a row the server did not answer before a lost connection fails
TRIES = 20  #: tries in a row that got no byte further, before a lost connection fails
RECONNECT_WAIT = 0.25  #: seconds before the second try without progress; doubles each time
RECONNECT_WAIT_MAX = 4.0  #: the longest wait between two tries
_HEX64 = re.compile("[0-9a-f]{64}")


class _Progress:
    """How far one try of an upload got: whether it had a connection (the server answered),
    the end of what the server acknowledged."""

    def __init__(self) -> None:
        self.answered = False
        self.acknowledged = -1


def _write_pipelined(
    fs: Any,
    handle: Any,
    reader: SourceReader,
    request: TransferRequest,
    *,
    offset: int,
    confirmed: Callable[[int], None],
    until: Callable[[int], bool] | None = None,
) -> int | None:
    """Write the rest of the file from ``offset``, keeping up to WINDOW bytes unacknowledged;
    ``confirmed(end)`` is called as the server acknowledges each piece, in file order.

    Each piece is a write at its own offset on the session's file (see ``session``): several
    are in flight while the next piece is read and hashed. With ``until``, asked with the
    acknowledged end after each piece: once it says so, the writes stop, and the offset up
    to which all were acknowledged (and read) is returned; None: the file was written."""
    pending: deque[tuple[Future[Any], int, int]] = deque()  #: (write, its end, its size)
    waiting = 0  #: bytes written and not yet acknowledged
    acknowledged = [offset]

    def note(end: int) -> None:
        acknowledged[0] = end
        confirmed(end)

    try:
        for piece in reader.chunks():
            request.pace(len(piece))
            write = handle.write(piece, offset)
            offset += len(piece)
            waiting += len(piece)
            future = asyncio.run_coroutine_threadsafe(write, fs.loop)
            pending.append((future, offset, len(piece)))
            while waiting >= WINDOW or (pending and pending[0][0].done()):
                waiting -= _acknowledged(pending, note)
            if until is not None and offset < request.size and until(acknowledged[0]):
                while pending:
                    _acknowledged(pending, note)
                return offset
        while pending:
            _acknowledged(pending, note)
    except BaseException:
        for future, _, _ in pending:
            future.cancel()
        raise
    return None


def _acknowledged(
    pending: deque[tuple[Future[Any], int, int]], confirmed: Callable[[int], None]
) -> int:
    """Wait for the oldest write to be acknowledged, and confirm it; returns its size."""
    future, end, size = pending[0]
    future.result()
    pending.popleft()
    confirmed(end)
    return size


def _resume_offset(
    fs: Any,
    journal: UploadJournal | None,
    request: TransferRequest,
    temporary: str,
    lane: session.Lane,
) -> tuple[int, bool]:
    """Where a journaled upload of this file into ``temporary`` can go on from (0: anew), and
    whether it has arrived already.

    The lower of the journaled offset (every byte before it was acknowledged) and the
    temporary file's size (which a write still in flight may have pushed past a hole). It has
    arrived when the last try asked for the rename and the rename took effect although its
    answer was lost: the temporary file is gone, and the target has the file's size.
    """
    if journal is None:
        return 0, False
    record = journal.get(request.journal_key)
    if record is None or record.get("protocol") != "sftp" or record.get("temporary") != temporary:
        return 0, False
    orphan = record.get("handover") not in (None, openssh.RUN_ID)
    if not same_file(record, request.size, request.mtime_ns):
        if orphan:  # anew in a new file: the old one may still be written to
            session.run(fs, session.remove_quietly, fs, temporary)
        return 0, False
    if orphan:
        # An earlier run handed this upload to sftp and ended without stopping it: that sftp
        # may still be sending (the same bytes, where they belong). Go on once it has ended.
        log.info("%s: waiting for an sftp of an earlier run to end", temporary)
        openssh.wait_until_still(lambda: session.run(fs, session.size_of, fs, temporary, lane))
    remote_size = session.run(fs, session.size_of, fs, temporary, lane)
    if remote_size is None:
        if not record.get("renaming"):
            return 0, False
        arrived = session.run(fs, session.size_of, fs, request.remote_path, lane)
        return 0, arrived == request.size
    # After a handover (an OpenSSH server: its writes land in order) the file's size is how
    # far it holds the file; otherwise a write in flight may have pushed it past a hole.
    held = remote_size if record.get("ordered") else int(record.get("offset", 0))
    return max(0, min(held, remote_size, request.size)), False


def cancel_upload(fs: Any, record: dict[str, Any]) -> None:
    """Remove the temporary file of an interrupted upload."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(record["temporary"])


def describe_upload(record: dict[str, Any]) -> str:
    """What the server holds for a journaled upload."""
    return f"SFTP temporary file, {record.get('offset', 0)} byte(s) written"


def upload(request: TransferRequest) -> TransferResult:
    """Upload one file to an ``sftp://`` sink, reconnecting when the connection drops (see the
    module's docstring)."""
    sink = request.sink
    best = -1  #: the furthest any try got acknowledged
    resume = -1  #: what the latest try that opened the file got acknowledged (its content)
    stalls = 0  #: tries in a row whose connection did not answer
    tries = 0  #: tries in a row that got nothing more acknowledged
    handed = 0  #: handovers to OpenSSH's client that did not finish
    while True:
        generation = sink.generation
        progress = _Progress()
        try:
            return _upload_once(request, progress, resume, handovers=handed < openssh.HANDOVERS)
        except (SourceChangedError, SourceUnreadableError):
            raise
        except openssh.HandoverFailed as exc:  # the next try goes on from the journal
            handed += 1
            log.info("%s: %s: %s; going on", sink.display, request.remote_path, one_line(exc))
            continue
        except Exception as exc:
            error = sink.translate(exc)
            if not isinstance(error, SinkUnavailableError):
                raise
            tries = 0 if progress.acknowledged > best else tries + 1
            best = max(best, progress.acknowledged)
            if progress.acknowledged >= 0:  # it began writing: the file holds what it sent
                resume = progress.acknowledged
            stalls = 0 if progress.answered or not tries else stalls + 1
            if stalls >= RECONNECTS or tries >= TRIES:
                raise
            wait = reconnecting(sink, generation, stalls, error)
            log.info(
                "%s: %s: the connection dropped (%s); going on from byte %d in %.1f s",
                sink.display,
                request.remote_path,
                one_line(exc),
                max(progress.acknowledged, 0),
                wait,
            )
            pause(request, wait)


def reconnecting(sink: Sink, generation: int, stalls: int, error: BaseException) -> float:
    """After a lost connection: say once that the sink is away (``stalls``: tries in a row
    the server did not answer), drop the connection, and return the seconds to wait before
    the next try. The connection is dead for every transfer on it: the first to notice drops
    it, and the next use of the sink connects anew (once, for all of them)."""
    if stalls and sink.health.announce():  # no connection: the sink is away for now
        log.warning("%s; files wait until it is back", error)
    sink.reset(generation)
    wait = backoff.delay(RECONNECT_WAIT, RECONNECT_WAIT_MAX, stalls) if stalls else 0.0
    return max(wait, sink.health.wait()) + backoff.spread(0.1)


def pause(request: TransferRequest, seconds: float) -> None:
    """Wait ``seconds`` before the next try; a pause or a stop of the daemon acts at once."""
    deadline = time.monotonic() + seconds
    while True:
        request.pace(0)  # waits while paused, raises when the daemon stops
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def _upload_once(
    request: TransferRequest, progress: _Progress, before: int, *, handovers: bool = True
) -> TransferResult:
    """One try of :func:`upload` on the sink's current connection (``before``: what the
    latest try that began writing got acknowledged, -1 at first; ``handovers``: the rest
    of a large file may go through OpenSSH's client)."""
    sink = request.sink
    fs = sink.fs
    progress.answered = True  # connected (now, or by another transfer)
    # A file of one chunk has no journal (it would cost more than it saves): after a cut it
    # goes on from what an earlier try got acknowledged, after a crash from its start.
    journal = request.journal if request.size > CHUNK else None
    key = request.journal_key
    temporary = sink.temporary_path(request.remote_path)
    # A photo the pipeline puts first never queues behind a video's pieces.
    lane: session.Lane = "large" if request.size > CHUNK and not request.urgent else "small"
    if journal is None:
        drop_stale(request)  # the file shrank since a journaled upload of it began
    with SourceReader(request.local_path, chunk_size=PIECE) as reader:
        # No folder is made first: opening the temporary file makes it if it is missing.
        if journal is None:  # an earlier try's acknowledged bytes, as far as the file has them
            start = session.run(fs, session.resume_point, fs, temporary, before, lane)
            arrived = False
        else:
            start, arrived = _resume_offset(fs, journal, request, temporary, lane)
        if arrived:  # the last try's rename took effect: nothing more to send
            assert journal is not None
            log.info("%s: %s arrived on the last try", sink.display, request.remote_path)
            reader.start_at(request.size)  # hashes the file
            reader.check_unchanged(request.size, request.mtime_ns)
            journal.forget(key)
            return TransferResult(reader.bytes_read, reader.sha256)
        if start:
            log.info("%s: resuming %s at byte %d", sink.display, request.remote_path, start)
            reader.start_at(start)  # hashes what is already there
        elif journal is not None:
            if isinstance(sink.endpoint.extras, openssh.OpenSSH):
                # Anew in a new file: an sftp that a killed run left (see openssh) may still
                # write into the old one, which opening it anew would keep.
                session.run(fs, session.remove_quietly, fs, temporary)
            journal.start(key, _record(request, temporary))
        progress.acknowledged = start
        noted = [time.monotonic(), start]  # when and up to where the journal was updated

        def confirmed(done: int) -> None:
            progress.acknowledged = done
            now = time.monotonic()
            due = now - noted[0] >= JOURNAL_EVERY or done - noted[1] >= JOURNAL_BYTES
            if journal is not None and due:
                noted[:] = [now, done]
                journal.update(key, offset=done)
            request.progress(done)

        try:
            _send(
                request,
                reader,
                temporary=temporary,
                start=start,
                lane=lane,
                confirmed=confirmed,
                handovers=handovers,
            )
            reader.check_unchanged(request.size, request.mtime_ns)
            if journal is not None:  # a cut may lose the answer to a rename that took effect
                journal.update(key, offset=request.size, renaming=True)
            session.run(fs, session.rename, fs, temporary, request.remote_path)
        except BaseException as exc:
            _after_failure(
                exc,
                request,
                fs,
                temporary,
                journal=journal,
                progressed=progress.acknowledged > start,
                acknowledged=progress.acknowledged,
            )
            raise
    if journal is not None:
        journal.forget(key)
    return TransferResult(reader.bytes_read, reader.sha256)


def _send(
    request: TransferRequest,
    reader: SourceReader,
    *,
    temporary: str,
    start: int,
    lane: session.Lane,
    confirmed: Callable[[int], None],
    handovers: bool,
) -> None:
    """Write the file into ``temporary`` from ``start`` and close it; a large file on a fast
    link has its rest sent by OpenSSH's client (see ``openssh``)."""
    sink = request.sink
    fs = sink.fs
    plan = sink.endpoint.extras
    fast = None
    if (
        isinstance(plan, openssh.OpenSSH)
        and handovers
        and openssh.usable(request, temporary)
        and openssh.in_order(fs)  # see openssh: only servers whose writes land in order
    ):
        fast = openssh.Probe(start, plan)
    try:
        handle, reader.chunk_size = _open(sink, fs, temporary, "r+b" if start else "wb", lane)
        stopped = _write_and_close(
            fs, handle, reader, request, start=start, confirmed=confirmed, until=fast
        )
        if stopped is None or fast is None or not isinstance(plan, openssh.OpenSSH):
            return

        def size_of() -> int | None:
            return session.run(fs, session.size_of, fs, temporary, lane)

        # sftp's put -a goes on from the file's end: only where that is where the writes stopped
        # (an earlier try may have left bytes, or a hole, beyond it), else asyncssh goes on.
        if size_of() != stopped:
            handle, _ = _open(sink, fs, temporary, "r+b", lane)
            _write_and_close(fs, handle, reader, request, start=stopped, confirmed=confirmed)
            return
        log.debug("%s: %.0f MB/s acknowledged", request.remote_path, fast.rate / 1e6)
        journal = request.journal
        if journal is not None:  # a run that dies now leaves this mark (see _resume_offset)
            journal.update(request.journal_key, handover=openssh.RUN_ID, ordered=True)
        try:
            openssh.send_rest(
                request,
                plan,
                reader,
                temporary=temporary,
                offset=stopped,
                size_of=size_of,
                confirmed=confirmed,
                process=fast.take(),
            )
        finally:  # sftp has ended, whatever happened
            if journal is not None:
                with contextlib.suppress(Exception):
                    journal.update(request.journal_key, handover=None)
    finally:
        if fast is not None:
            fast.close()  # an sftp started early and not handed the rest


def _record(request: TransferRequest, temporary: str) -> dict[str, Any]:
    """The journal's record of a large upload beginning."""
    return {
        "protocol": "sftp",
        "temporary": temporary,
        "local": str(request.local_path),
        "size": request.size,
        "mtime_ns": request.mtime_ns,
        "offset": 0,
    }


def _after_failure(
    exc: BaseException,
    request: TransferRequest,
    fs: Any,
    temporary: str,
    *,
    journal: UploadJournal | None,
    progressed: bool,
    acknowledged: int,
) -> None:
    """What a failed try of :func:`_upload_once` leaves: the journal's offset (where the next
    try goes on from), or no temporary file."""
    key = request.journal_key
    if isinstance(exc, SourceChangedError | SourceUnreadableError):
        with contextlib.suppress(Exception):
            fs.rm(temporary)
        if journal is not None:
            journal.forget(key)
    elif journal is not None and progressed:
        # What the server acknowledged since the last note: the next try starts there.
        with contextlib.suppress(Exception):
            journal.update(key, offset=acknowledged)
    elif journal is None and not isinstance(request.sink.translate(exc), SinkUnavailableError):
        # The connection still works: no temporary file stays behind. (Over a lost one, the
        # next try goes on in the same temporary file from what the server acknowledged.)
        with contextlib.suppress(Exception):
            fs.rm(temporary)


def _write_and_close(
    fs: Any,
    handle: Any,
    reader: SourceReader,
    request: TransferRequest,
    *,
    start: int,
    confirmed: Callable[[int], None],
    until: Callable[[int], bool] | None = None,
) -> int | None:
    """:func:`_write_pipelined` from ``start``, then close the remote file (once, either way:
    after a failure, quietly and without waiting long on a dead connection). Returns where
    ``until`` stopped the writes (None: the file was written)."""
    try:
        stopped = _write_pipelined(
            fs, handle, reader, request, offset=start, confirmed=confirmed, until=until
        )
    except BaseException:
        with contextlib.suppress(Exception):
            session.run(fs, session.close_file, handle)
        raise
    session.run(fs, session.close_file, handle)
    return stopped


def _open(sink: Sink, fs: Any, temporary: str, mode: str, lane: session.Lane) -> tuple[Any, int]:
    """Open the temporary file on ``fs`` (the sink's connection), making its folder when it
    is missing (a new folder, or one removed behind our back)."""
    try:
        return session.run(fs, session.open_file, fs, temporary, mode, lane)
    except Exception as exc:
        if mode != "wb" or not session.is_missing(exc):
            raise
    sink.forget_folders()  # one may have been removed behind our back
    folder = posixpath.dirname(temporary)
    session.make_folder_now(fs, folder, missing=True)  # no round trip asks whether it is there
    sink.folder_exists(folder)
    return session.run(fs, session.open_file, fs, temporary, mode, lane)


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
