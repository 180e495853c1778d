"""skyframe's own SFTP session on each SSH connection, through asyncssh's public API.

sshfs (fsspec) opens the connection and serves the filesystem calls around a transfer:
listings, sizes, folders, removals. The transfers themselves need what sshfs's file objects
do not offer: writes at explicit offsets with several in flight (the pieces of a large file,
the small files of a batch), and a file that is never closed again by the garbage collector
after its connection died. asyncssh's :class:`SFTPClient` has both as public API: one such
session is started on first use on each connection (sshfs's public ``client``), on sshfs's
event loop, and carries every transfer on that connection. Its requests are pipelined: a
batch of small files costs about one round trip per step for all of them, not per file.

Two sessions, in fact, each its own SFTP channel: one for large files, one for small ones
and batches. Each channel has its own flow-control window, so that the pieces of a large
upload queued on the connection are never more than that window ahead of a photo: within one
channel they would all be (an SSH channel sends its data in order). Both fit within the
connection's ``max_sessions`` beside sshfs's own channels (it keeps two for commands).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import posixpath
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, TypeVar, cast

from fsspec.asyn import sync

from skyframe.deps import import_asyncssh

T = TypeVar("T")

log = logging.getLogger(__name__)

#: How long closing a remote file may take before it is given up (its connection is gone).
CLOSE_TIMEOUT = 10.0
#: Bytes per write request, at most (what ``SourceReader`` hands over at a time).
PIECE = 256 * 1024
#: ... where the session knows no limit at all (the size every SFTP server takes).
SAFE_PIECE = 16 * 1024

Lane = Literal["small", "large"]

#: SSH connection -> its sessions (being) started, by lane; only touched on the event loop.
_SESSIONS: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)


async def session(fs: Any, lane: Lane = "small") -> Any:
    """The SFTP session of ``fs``'s connection for ``lane``, started on first use (on
    ``fs.loop``)."""
    client = fs.client
    lanes = _SESSIONS.setdefault(client, {})
    started = lanes.get(lane)
    if started is None or (started.done() and (started.cancelled() or started.exception())):
        started = asyncio.ensure_future(client.start_sftp_client())
        lanes[lane] = started
    try:
        # A waiter that is cancelled (its transfer stopped) leaves the start to the others.
        return await asyncio.shield(started)
    except import_asyncssh().ChannelOpenError as exc:
        if lane == "small":
            raise
        # A server that allows fewer channels (``MaxSessions``): one session for all.
        if lanes.get(lane) is started:
            log.info(
                "the server opened no second SFTP channel (%s): large files go on the "
                "small files' session",
                exc.reason,
            )
            lanes[lane] = asyncio.ensure_future(session(fs, "small"))
        return await asyncio.shield(lanes[lane])


def run(fs: Any, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``call(*args)`` on ``fs``'s event loop and wait for it (from a worker thread)."""
    return cast(T, sync(fs.loop, call, *args))


def piece_size(sftp: Any) -> int:
    """The most bytes one write request may carry on this session: the server's limit, up to
    :data:`PIECE` (asyncssh's ``limits``: what the server said with ``limits@openssh.com``,
    else asyncssh's own safe size)."""
    return int(min(PIECE, sftp.limits.max_write_len or SAFE_PIECE))


async def open_file(fs: Any, path: str, mode: str, lane: Lane = "small") -> tuple[Any, int]:
    """Open a remote file in ``mode`` (``wb``, ``r+b``...) on the connection's session for
    ``lane``; returns it with the most bytes one write may carry (:func:`piece_size`).

    A write of at most that size is one request: asyncssh splits larger ones into requests in
    parallel, whose errors after a failed one would go unseen (and logged by asyncio)."""
    sftp = await session(fs, lane)
    piece = piece_size(sftp)
    return await sftp.open(path, mode, block_size=piece), piece


async def write_all(
    handle: Any,
    data: bytes,
    piece: int,
    gate: Callable[[int], AbstractAsyncContextManager[Any]] | None = None,
    *,
    start: int = 0,
    confirmed: Callable[[int], None] | None = None,
) -> None:
    """Write ``data`` from offset ``start`` in requests of at most ``piece`` bytes, all in
    flight at once, or each once ``gate`` (given the request's size) lets it through, for as
    long as it is unanswered; every request's outcome is collected, and the first error
    raised. ``confirmed`` is told after every answer how far from 0 every byte has been
    acknowledged."""
    views = memoryview(data)
    offsets = range(start, len(data), piece)
    answered: set[int] = set()
    done = [start]  # every byte before it acknowledged

    async def write(at: int) -> None:
        chunk = views[at : at + piece]
        if gate is None:
            await handle.write(chunk, at)
        else:
            async with gate(len(chunk)):
                await handle.write(chunk, at)
        if confirmed is not None:
            answered.add(at)
            while done[0] in answered:
                answered.discard(done[0])
                done[0] = min(done[0] + piece, len(data))
            confirmed(done[0])

    outcomes = await asyncio.gather(*(write(at) for at in offsets), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def close_file(handle: Any) -> None:
    """Close a remote file; over a connection that stopped answering, give up after
    :data:`CLOSE_TIMEOUT` seconds (the server drops the handle with the connection)."""
    await asyncio.wait_for(handle.close(), CLOSE_TIMEOUT)


async def rename(fs: Any, old: str, new: str) -> None:
    """Rename ``old`` to ``new``, replacing ``new`` atomically (``posix-rename@openssh.com``);
    on a server without that extension, through sshfs (a copy, then a removal)."""
    asyncssh = import_asyncssh()
    sftp = await session(fs)
    try:
        await sftp.posix_rename(old, new)
    except asyncssh.SFTPOpUnsupported:
        await fs._mv(old, new)  # fsspec's async API: its methods are named with a leading _


async def remove(fs: Any, path: str) -> None:
    """Remove a remote file (one round trip)."""
    sftp = await session(fs)
    await sftp.remove(path)


async def remove_quietly(fs: Any, path: str) -> None:
    """Remove a remote file if it is there; a failure is no one's concern (best effort)."""
    try:
        sftp = await session(fs)
        await sftp.remove(path)
    except Exception:  # gone already, or the connection is: the temporary name is reused
        return


def is_missing(exc: BaseException) -> bool:
    """Whether a session's error says the remote file or its folder does not exist."""
    return isinstance(exc, import_asyncssh().SFTPNoSuchFile)


async def make_folder(fs: Any, folder: str, *, missing: bool = False) -> None:
    """Create ``folder`` and its missing parents: one round trip when it exists (asyncssh's
    ``makedirs`` asks two for every part of the path), then one more for each missing level
    and each one created. With ``missing`` (a request just found it missing), it is made at
    once, one round trip where its parent exists."""
    asyncssh = import_asyncssh()
    sftp = await session(fs)
    current = folder.rstrip("/") or "/"
    if missing and current != "/":
        try:
            await sftp.mkdir(current)
            return
        except asyncssh.SFTPError:
            pass  # a parent missing too, or made meanwhile: find out below
    missing_levels = []
    while current not in ("/", "") and not await sftp.isdir(current):
        missing_levels.append(current)
        current = posixpath.dirname(current)
    for path in reversed(missing_levels):
        try:
            await sftp.mkdir(path)
        except Exception:
            if not await sftp.isdir(path):  # not made by someone else meanwhile
                raise


def make_folder_now(fs: Any, folder: str, *, missing: bool = False) -> None:
    """:func:`make_folder`, from a worker thread (an endpoint's ``make_folder``)."""
    run(fs, functools.partial(make_folder, missing=missing), fs, folder)


async def size_of(fs: Any, path: str, lane: Lane = "small") -> int | None:
    """The size of a remote file, None when there is none (one round trip)."""
    asyncssh = import_asyncssh()
    sftp = await session(fs, lane)
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        return None
    return None if attrs.size is None else int(attrs.size)


async def resume_point(fs: Any, path: str, acknowledged: int, lane: Lane = "small") -> int:
    """Where a write of the file at ``path`` goes on from after a cut: the ``acknowledged``
    bytes, as far as the file still holds them (one round trip asks); 0 when none were."""
    if acknowledged <= 0:
        return 0
    return min(acknowledged, await size_of(fs, path, lane) or 0)


async def write_check(
    fs: Any, path: str, payload: bytes, written: Callable[[], None] | None
) -> int | None:
    """The sinks' check on the connection's session: open, write and close ``path`` (then
    ``written`` is called), its size, and its removal; a round trip each. Its folder is made
    only when the opening finds it missing (no round trip asks first). Through sshfs it took
    a channel of its own, and two requests for every level of the folder's path."""
    asyncssh = import_asyncssh()
    try:
        handle, _ = await open_file(fs, path, "wb")
    except asyncssh.SFTPNoSuchFile:
        await make_folder(fs, posixpath.dirname(path), missing=True)
        handle, _ = await open_file(fs, path, "wb")
    try:
        await handle.write(payload, 0)
    finally:
        await close_file(handle)
    if written is not None:
        written()
    try:
        return await size_of(fs, path)
    finally:
        await remove(fs, path)


def write_check_now(
    fs: Any, path: str, payload: bytes, written: Callable[[], None] | None
) -> int | None:
    """:func:`write_check`, from a worker thread (an endpoint's ``write_check``)."""
    return run(fs, write_check, fs, path, payload, written)
