"""The state directory: its single-instance lock and the delivery manifest."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import diskcache

from skyframe import locks
from skyframe.errors import StateError

T = TypeVar("T")

#: What the state databases raise when they are corrupt, full or locked for too long.
STATE_DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, diskcache.Timeout)

#: Never evict: a cache that forgets is a manifest that re-sends, or a queue that loses jobs.
CACHE_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "size_limit": 2**62,
    "cull_limit": 0,
}


class JSONValueDisk(diskcache.Disk):  # type: ignore[misc]
    """Keys are plain strings (stored as text, so they sort and work with push/pull), values
    are JSON. Nothing is ever pickled."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if not isinstance(key, str):
            raise TypeError(f"state keys must be strings, not {type(key).__name__}")
        return super().put(key)  # type: ignore[no-any-return]

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not read:
            value = json.dumps(value, separators=(",", ":")).encode()
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        data = super().fetch(mode, filename, value, read)
        return data if read else json.loads(data)


class GroupCommit:
    """Small writes from many threads, committed together: one SQLite transaction per group.

    A commit costs far more than the statements in it. A thread hands its write over and takes
    ``lock``; the first to get it (the leader) runs every write handed over so far in one
    transaction; the others find theirs done when they get the lock. Each caller returns only
    once its own write is committed, so durability is unchanged, and nothing waits for a
    timer: a lone writer commits at once.
    """

    def __init__(self, cache: diskcache.Cache, lock: threading.Lock | threading.RLock) -> None:
        self._cache = cache
        self._lock = lock
        self._pending: list[_Write[Any]] = []
        self._pending_lock = threading.Lock()

    def __call__(self, write: Callable[[], T]) -> T:
        item = _Write(write)
        with self._pending_lock:
            self._pending.append(item)
        with self._lock:
            if not item.done:
                with self._pending_lock:
                    group, self._pending = self._pending, []
                try:
                    with self._cache.transact(retry=True):
                        for each in group:
                            each.run()
                except BaseException as exc:  # the commit failed: every write in it did
                    for each in group:
                        each.fail(exc)
                for each in group:
                    each.done = True
        return item.outcome()


class _Write(Generic[T]):
    __slots__ = ("done", "error", "result", "write")

    def __init__(self, write: Callable[[], T]) -> None:
        self.write = write
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.write()
        except Exception as exc:
            self.error = exc

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


API_FILE = "api.json"  #: where a running daemon says where its API listens


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a small JSON file so that readers see the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_api_file(state_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote to ``api.json`` (``url``, ``pid``), or None."""
    try:
        data = json.loads((state_dir / API_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("url"), str) else None


def open_cache(directory: Path) -> diskcache.Cache:
    """A diskcache Cache that stores JSON (never pickles) and never evicts."""
    return diskcache.Cache(str(directory), disk=JSONValueDisk, **CACHE_SETTINGS)


#: seconds a start waits for a lock held by someone else before it says so
LOCK_PATIENCE = 0.5


class StateLock:
    """An exclusive lock on a state directory, so two daemons never share a queue."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateError naming the holder's PID."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot use state dir {self.path.parent}: {exc.strerror}") from None
        # `skyframe status`/`pause` hold a shared lock for an instant to see whether a daemon
        # runs: a start at that instant waits it out instead of failing.
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                taken = locks.try_lock(fd)
            except OSError as exc:
                os.close(fd)
                raise StateError(f"cannot lock state dir {self.path.parent}: {exc}") from None
            if taken:
                break
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            holder = locks.read_at_start(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"another skyframe process (pid {holder}) is using state dir {self.path.parent}"
            ) from None
        locks.replace_content(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def intact(self) -> bool:
        """Whether the lock file is still the one this lock holds (the state directory was
        not removed or replaced meanwhile)."""
        if self._fd is None:
            return False
        try:
            on_disk = os.stat(self.path)
        except OSError:
            return False
        held = os.fstat(self._fd)
        return (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev)

    def release(self) -> None:
        """Release the lock (also released by the OS when the process dies)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # closing releases it anyway
                locks.unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass(frozen=True)
class ManifestEntry:
    """What reached a sink: enough to decide that a file need not be sent again."""

    size: int
    mtime_ns: int
    sha256: str
    remote: str
    delivered_at: float
    derived: tuple[str, ...] = ()  #: remote names of files delivered with it (sidecars...)
    inode: int = 0  #: the local file's inode, to recognise it after a rename
    #: what the processes found out about the file (``job.meta``, as JSON), if anything
    meta: dict[str, Any] | None = None

    @classmethod
    def now(
        cls,
        size: int,
        mtime_ns: int,
        sha256: str,
        remote: str,
        *,
        derived: tuple[str, ...] | list[str] = (),
        inode: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> ManifestEntry:
        """An entry for a delivery that just ended."""
        return cls(size, mtime_ns, sha256, remote, time.time(), tuple(derived), inode, meta)

    def matches(self, size: int, mtime_ns: int) -> bool:
        """True when the local file still has the size and mtime that were delivered."""
        return self.size == size and self.mtime_ns == mtime_ns

    def to_json(self) -> dict[str, Any]:
        """The record as stored. Built field by field: ``asdict()`` deep-copies ``meta``, and
        this runs for every delivery (the values are JSON already, and written at once)."""
        return {name: getattr(self, name) for name in _ENTRY_FIELDS}


_ENTRY_FIELDS = tuple(f.name for f in fields(ManifestEntry))


def _entry(data: dict[str, Any]) -> ManifestEntry:
    return ManifestEntry(**{**data, "derived": tuple(data.get("derived", ()))})


#: The first character of the manifest's index keys (never that of a pipeline's name).
_NAMES = "\x01"
#: Set once the manifest's records are all in the index of remote names.
_INDEXED = f"{_NAMES}indexed"


class Manifest:
    """What was delivered where, per (pipeline, sink, relative path)."""

    def __init__(self, directory: Path) -> None:
        self._cache = open_cache(directory)
        # One writer at a time in this process: SQLite's own busy handler backs off in
        # milliseconds, far slower than a lock handing over.
        self._write_lock = threading.Lock()
        self._commit = GroupCommit(self._cache, self._write_lock)

    @staticmethod
    def _key(pipeline: str, sink: str, relpath: str) -> str:
        return f"{pipeline}\x00{sink}\x00{relpath}"

    @staticmethod
    def _name_key(pipeline: str, sink: str, remote: str) -> str:
        """The key of the index of remote names: which file a pipeline's remote name holds."""
        return f"{_NAMES}{pipeline}\x00{sink}\x00{remote}"

    def index_remote_names(self) -> None:
        """Build the index of remote names, once, for a manifest written before it existed
        (its records stay as they are). A reader of the state (a dry run) never calls it."""
        if self._cache.get(_INDEXED):
            return
        # Where two records share a name (written before names were kept apart), the file
        # delivered last is the one the remote holds.
        latest: dict[str, tuple[float, str]] = {}
        for p, s, r, e in self.entries():
            key = self._name_key(p, s, e.remote)
            if key not in latest or e.delivered_at >= latest[key][0]:
                latest[key] = (e.delivered_at, r)

        def write() -> None:
            for key, (_when, relpath) in latest.items():
                self._cache.set(key, relpath)
            self._cache.set(_INDEXED, True)

        self._commit(write)

    def holder(self, pipeline: str, sink: str, remote: str) -> str | None:
        """The relative path of the file the manifest has at ``remote`` on the pipeline's sink,
        if any (an index entry whose file has moved to another name, or was forgotten, is
        none)."""
        relpath = self._cache.get(self._name_key(pipeline, sink, remote))
        if not isinstance(relpath, str):
            return None
        entry = self.get(pipeline, sink, relpath)
        return relpath if entry is not None and entry.remote == remote else None

    def get(self, pipeline: str, sink: str, relpath: str) -> ManifestEntry | None:
        """The delivery record, if any."""
        data = self._cache.get(self._key(pipeline, sink, relpath))
        return _entry(data) if data else None

    def is_delivered(
        self, pipeline: str, sink: str, relpath: str, size: int, mtime_ns: int
    ) -> bool:
        """True when this version of the file (size and mtime) already reached the sink."""
        entry = self.get(pipeline, sink, relpath)
        return entry is not None and entry.matches(size, mtime_ns)

    def record_many(self, entries: list[tuple[str, str, str, ManifestEntry]]) -> None:
        """Store deliveries, given as (pipeline, sink, relpath, entry), in one transaction."""
        if not entries:
            return
        rows: list[tuple[str, Any]] = []
        for p, s, r, entry in entries:
            rows.append((self._key(p, s, r), entry.to_json()))
            rows.append((self._name_key(p, s, entry.remote), r))

        def write() -> None:
            for key, value in rows:
                self._cache.set(key, value)

        self._commit(write)

    def forget(self, pipeline: str, sink: str, relpath: str) -> None:
        """Drop a record (the remote copy is no longer considered delivered)."""
        with self._write_lock:
            self._cache.delete(self._key(pipeline, sink, relpath), retry=True)

    def entries(self) -> list[tuple[str, str, str, ManifestEntry]]:
        """Every record as (pipeline, sink, relpath, entry)."""
        out = []
        for key in self._cache.iterkeys():
            if key.startswith(_NAMES):
                continue
            data = self._cache.get(key)
            if data is not None:
                pipeline, sink, relpath = key.split("\x00", 2)
                out.append((pipeline, sink, relpath, _entry(data)))
        return out

    def close(self) -> None:
        """Close the database."""
        self._cache.close()
