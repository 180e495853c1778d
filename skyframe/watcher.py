"""Watching source folders with watchdog, and deciding when a file is ready (settled).

A file is ready when it was closed after writing (inotify close-write), renamed into place, or
when its size and mtime have been stable for ``settle`` seconds. Nothing here raises into
watchdog's threads: every callback catches and logs. A dead observer is restarted, and lost
events (inotify queue overflow, watch limit) trigger a full rescan instead of silent loss.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from skyframe.display import shown
from skyframe.errors import StateError
from skyframe.state import STATE_DB_ERRORS

log = logging.getLogger(__name__)

#: What keeps the engine from taking a file now (a full disk under the state directory).
_CANNOT_TAKE_NOW: tuple[type[Exception], ...] = (OSError, StateError, *STATE_DB_ERRORS)

#: Only what matters: not opens and no-write closes (every upload reads its file, and those
#: events would come back to us), nor folder attribute changes.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    stable_since: float


class Settler:
    """Holds paths until they are ready, then hands them to ``on_ready``."""

    def __init__(
        self,
        settle: float,
        on_ready: Callable[[Path], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle = settle
        self._on_ready = on_ready
        self._clock = clock  #: seconds, monotonic (tests give a fake one)
        self._pending: dict[Path, _Pending] = {}
        self._handing_over = 0  #: paths taken out of _pending whose on_ready has not returned
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Paths held, including those being handed over right now."""
        with self._lock:
            return len(self._pending) + self._handing_over

    def _hand_over(self, path: Path, entry: _Pending | None) -> None:
        """Call on_ready; if it fails, keep the path (it is tried again at the next tick)."""
        try:
            self._on_ready(path)
        except BaseException:
            if entry is not None:
                with self._lock:
                    self._pending.setdefault(path, entry)
            raise
        finally:
            with self._lock:
                self._handing_over -= 1

    def touch(self, path: Path, *, complete: bool = False) -> None:
        """A path changed; ``complete`` when it was closed after writing or renamed into place."""
        if complete:
            with self._lock:
                entry = self._pending.pop(path, None)
                self._handing_over += 1
            self._hand_over(path, entry)
            return
        now = self._clock()
        with self._lock:
            entry = self._pending.get(path)
            if entry is not None:
                entry.stable_since = now  # an event means it changed again: no stat needed
                return
        try:
            st = os.stat(path)
        except OSError:
            return
        with self._lock:
            self._pending.setdefault(path, _Pending(st.st_size, st.st_mtime_ns, now))

    def forget(self, path: Path) -> None:
        """Stop tracking a path (deleted or moved away)."""
        with self._lock:
            self._pending.pop(path, None)

    def tick(self) -> None:
        """Hand over every path stable for ``settle`` seconds; drop vanished ones."""
        now = self._clock()
        with self._lock:
            candidates = [
                (p, e) for p, e in self._pending.items() if now - e.stable_since >= self.settle
            ]
        for path, entry in candidates:
            try:
                st = os.stat(path)
            except OSError:
                self.forget(path)
                continue
            with self._lock:
                if self._pending.get(path) is not entry or now - entry.stable_since < self.settle:
                    continue
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    entry.size, entry.mtime_ns, entry.stable_since = st.st_size, st.st_mtime_ns, now
                    continue
                del self._pending[path]
                self._handing_over += 1
            self._hand_over(path, entry)


@dataclass(frozen=True)
class WatchCallbacks:
    """What a SourceWatcher reports to the engine."""

    changed: Callable[[Path, bool], None]  #: (path, complete)
    deleted: Callable[[Path], None]
    moved: Callable[[Path, Path], None]  #: (source, destination)
    rescan: Callable[[str], None]  #: (reason)


class _Handler(FileSystemEventHandler):
    def __init__(self, callbacks: WatchCallbacks) -> None:
        self._cb = callbacks

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except _CANNOT_TAKE_NOW as exc:
            # The state directory's disk is full, say: one line per file, and the next
            # rescan offers the file again.
            log.error(
                "cannot take %s now (%s); the next rescan offers it again",
                shown(os.fsdecode(event.src_path)),
                exc,
            )
        except Exception:  # never let an error kill watchdog's thread
            log.exception("error while handling %s", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, FileClosedEvent):
            self._cb.changed(src, True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._cb.changed(src, False)
        elif isinstance(event, FileDeletedEvent):
            self._cb.deleted(src)
        elif isinstance(event, FileMovedEvent):
            if not event.dest_path:  # moved out to an unwatched place
                self._cb.deleted(src)
            elif not event.src_path:  # moved in from an unwatched place: complete
                self._cb.changed(Path(os.fsdecode(event.dest_path)), True)
            else:
                self._cb.moved(src, Path(os.fsdecode(event.dest_path)))


#: Where watchdog logs that events were lost: inotify's queue (Linux), ReadDirectoryChangesW's
#: buffer (Windows).
_WATCHDOG_LOGGERS = (
    "watchdog.observers.inotify_c",
    "watchdog.observers.inotify",
    "watchdog.observers.read_directory_changes",
)


class _OverflowDetector(logging.Filter):
    """watchdog reports a kernel queue overflow only in its log: turn that into a rescan."""

    def __init__(self, on_overflow: Callable[[str], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self._on_overflow("the system's queue of file events overflowed")
        return True


class SourceWatcher:
    """One watchdog observer for one source folder, restarted if it dies."""

    def __init__(
        self,
        root: Path,
        callbacks: WatchCallbacks,
        *,
        recursive: bool,
        polling: bool,
        poll_interval: float,
    ) -> None:
        self.root = root
        self.recursive = recursive
        self.polling = polling
        self.poll_interval = poll_interval
        self._callbacks = callbacks
        self._observer: BaseObserver | None = None
        self._overflow = _OverflowDetector(callbacks.rescan)
        self._missing_reported = False
        #: (device, inode) of the folder the observer watches: another folder at the same
        #: path (a card mounted on it, a folder renamed into its place) is not watched.
        self._watched: tuple[int, int] | None = None

    @property
    def mode(self) -> str:
        """``inotify`` (or the platform's native API) or ``polling``."""
        return "polling" if self.polling else "native"

    def start(self) -> None:
        """Start watching; falls back to polling when the inotify watch limit is reached."""
        for name in _WATCHDOG_LOGGERS:
            logger = logging.getLogger(name)
            # The overflow warning must be created even under `-q`, for the detector to see it;
            # the handlers decide what is shown.
            logger.setLevel(logging.WARNING)
            logger.addFilter(self._overflow)
        self._observer = self._start_observer()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = self.root.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _start_observer(self) -> BaseObserver:
        self._watched = self._identity()
        observer: BaseObserver
        if self.polling:
            observer = PollingObserver(timeout=self.poll_interval)
        elif sys.platform.startswith("linux"):
            from watchdog.observers.inotify import InotifyObserver

            # Full events report a move in from (or out to) an unwatched place as a move with
            # one side empty, instead of a plain create: a file renamed into place is complete.
            observer = InotifyObserver(generate_full_events=True)
        else:
            observer = Observer()
        try:
            observer.schedule(
                _Handler(self._callbacks),
                str(self.root),
                recursive=self.recursive,
                event_filter=WATCHED_EVENTS,
            )
            observer.start()
        except OSError as exc:
            with contextlib.suppress(Exception):  # release what the observer already holds
                observer.stop()
            if exc.errno in (errno.ENOSPC, errno.EMFILE) and not self.polling:
                log.warning(
                    "cannot watch %s natively (%s; raise fs.inotify.max_user_watches): "
                    "polling every %.0fs instead",
                    self.root,
                    exc.strerror,
                    self.poll_interval,
                )
                self.polling = True
                self._callbacks.rescan("the inotify watch limit was reached")
                return self._start_observer()
            raise
        observer.name = f"skyframe-watch-{self.root.name}"
        return observer

    def check(self) -> None:
        """Restart a dead observer (and ask for a rescan: its events may be lost).

        An observer whose emitter stopped counts as dead: watchdog stops watching a folder
        that was deleted, and an SD card's mount point comes and goes exactly like that. So
        does one that watches a folder no longer at the source's path: a card mounted on the
        folder, or another folder renamed into its place, leaves the watch on the old one.
        """
        observer = self._observer
        if observer is None:
            return
        alive = observer.is_alive() and all(e.is_alive() for e in observer.emitters)
        replaced = self._identity() not in (self._watched, None)
        if alive and not replaced:
            return
        if not self.root.is_dir():
            if not self._missing_reported:
                log.warning(
                    "source folder %s is missing; watching again when it is back", self.root
                )
                self._missing_reported = True
            return
        if alive:
            log.warning("%s is another folder now (a card mounted on it?); watching it", self.root)
        else:
            log.warning("the watcher of %s stopped; restarting it", self.root)
        with contextlib.suppress(Exception):
            observer.stop()
            observer.join(timeout=1)
        self._observer = self._start_observer()
        self._missing_reported = False
        self._callbacks.rescan("the watcher was restarted")

    def stop(self) -> None:
        """Stop the observer and wait for its thread."""
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).removeFilter(self._overflow)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
