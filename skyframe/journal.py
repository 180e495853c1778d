"""The upload journal: what a large upload under way has already put on a sink.

A transfer plugin that can resume (S3 multipart, GCS resumable sessions, SFTP temporary files)
writes a record here before it sends its first byte, and brings it up to date after every
part or chunk the server confirmed. After a crash, a kill or a dropped link, the next attempt
finds the record and sends only what is missing. Records are JSON in the state directory,
one per (sink, remote path), and are removed once the upload is complete or abandoned.

The record names the local file's size and mtime: a file that changed since is uploaded
afresh, and the stale upload is cancelled. ``skyframe cleanup`` cancels uploads whose record
has not moved for a given age (see :func:`stale_uploads`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyframe.state import open_cache


@dataclass(frozen=True)
class JournalKey:
    """Which upload: the sink's key and the full remote path on it."""

    sink: str
    remote: str

    def encode(self) -> str:
        return f"{self.sink}\x00{self.remote}"

    @staticmethod
    def decode(text: str) -> JournalKey:
        sink, _, remote = text.partition("\x00")
        return JournalKey(sink, remote)


class UploadJournal:
    """Resume records, one per (sink, remote path), safe to use from many threads."""

    def __init__(self, directory: Path) -> None:
        self._cache = open_cache(directory)
        self._lock = threading.Lock()

    def is_empty(self) -> bool:
        """True when no upload is under way anywhere (one query, where get() would be one per
        file)."""
        return len(self._cache) == 0

    def get(self, key: JournalKey) -> dict[str, Any] | None:
        """The record of the upload under way to this remote path, if any."""
        record = self._cache.get(key.encode(), retry=True)
        return record if isinstance(record, dict) else None

    def start(self, key: JournalKey, record: dict[str, Any]) -> dict[str, Any]:
        """Store a new record (replacing any), stamped with the time; returns it."""
        now = time.time()
        record = {**record, "started_at": now, "updated_at": now}
        with self._lock:
            self._cache.set(key.encode(), record, retry=True)
        return record

    def update(self, key: JournalKey, **changes: Any) -> None:
        """Merge ``changes`` into the record (no-op when it was removed meanwhile)."""
        with self._edit(key) as record:
            if record is not None:
                record.update(changes)

    def add_part(self, key: JournalKey, number: int, etag: str, size: int) -> None:
        """Note one more part the server confirmed (S3 multipart)."""
        with self._edit(key) as record:
            if record is not None:
                record.setdefault("parts", {})[str(number)] = {"etag": etag, "size": size}

    @contextmanager
    def _edit(self, key: JournalKey) -> Iterator[dict[str, Any] | None]:
        encoded = key.encode()
        with self._lock, self._cache.transact(retry=True):
            record = self._cache.get(encoded)
            yield record
            if record is not None:
                record["updated_at"] = time.time()
                self._cache.set(encoded, record)

    def forget(self, key: JournalKey) -> None:
        """Remove the record: the upload is complete or was cancelled."""
        with self._lock:
            self._cache.delete(key.encode(), retry=True)

    def entries(self) -> list[tuple[JournalKey, dict[str, Any]]]:
        """Every record, oldest update first."""
        out = []
        for encoded in list(self._cache.iterkeys()):
            record = self._cache.get(encoded, retry=True)
            if isinstance(encoded, str) and isinstance(record, dict):
                out.append((JournalKey.decode(encoded), record))
        return sorted(out, key=lambda item: item[1].get("updated_at", 0.0))

    def close(self) -> None:
        """Close the database."""
        self._cache.close()


def same_file(record: dict[str, Any], size: int, mtime_ns: int) -> bool:
    """True when the journaled upload was of this version of the local file."""
    return record.get("size") == size and record.get("mtime_ns") == mtime_ns


def stale_uploads(
    journal: UploadJournal, older_than: float, now: float | None = None
) -> list[tuple[JournalKey, dict[str, Any]]]:
    """Records whose upload has not progressed for ``older_than`` seconds."""
    limit = (time.time() if now is None else now) - older_than
    return [(key, record) for key, record in journal.entries() if record["updated_at"] <= limit]
