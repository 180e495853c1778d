"""The objects rules, processes and notifiers receive: FileEvent, Job and LifecycleEvent."""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

from skyframe.errors import ProcessError

EventKind = Literal["created", "modified", "deleted", "moved", "scanned"]


@dataclass(frozen=True)
class FileEvent:
    """A file seen in a source folder, as rules see it."""

    pipeline: str
    path: Path  #: absolute local path
    relpath: str  #: POSIX path relative to the source root
    size: int
    mtime_ns: int
    kind: EventKind = "scanned"
    inode: int = 0  #: the file's inode: a rename keeps it, which is how moves are recognised

    @property
    def name(self) -> str:
        """The file name, e.g. ``DJI_0001.JPG``."""
        return PurePosixPath(self.relpath).name

    @property
    def suffix(self) -> str:
        """The extension in lower case, with its dot: ``.jpg``."""
        return PurePosixPath(self.relpath).suffix.lower()

    @property
    def mtime(self) -> datetime:
        """The modification time, timezone-aware (UTC)."""
        return datetime.fromtimestamp(self.mtime_ns / 1e9, tz=UTC)

    @property
    def age(self) -> float:
        """Seconds since the last modification."""
        return time.time() - self.mtime_ns / 1e9

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict, as stored in the queue."""
        # Built directly: asdict()'s deep copy took a fifth of a scan's time.
        return {
            "pipeline": self.pipeline,
            "path": str(self.path),
            "relpath": self.relpath,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "kind": self.kind,
            "inode": self.inode,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileEvent:
        """The inverse of :meth:`to_json`."""
        return cls(**{**data, "path": Path(data["path"])})

    @classmethod
    def from_stat(
        cls, pipeline: str, path: Path, relpath: str, st: os.stat_result, kind: EventKind
    ) -> FileEvent:
        """An event for a file as ``os.stat`` sees it now."""
        return cls(pipeline, path, relpath, st.st_size, st.st_mtime_ns, kind, st.st_ino)


@dataclass
class DerivedFile:
    """A file a process produced (thumbnail, sidecar) to deliver with the job."""

    path: Path  #: the local file to send
    remote_name: str  #: its remote name, or a suffix when ``beside`` is true
    beside: bool = False  #: if true, the remote name is the job's remote name + ``remote_name``

    def resolve(self, job_remote_name: str) -> str:
        """The final remote name, once every process has run."""
        return job_remote_name + self.remote_name if self.beside else self.remote_name


@dataclass
class Job:
    """One accepted file on its way to the sinks, as processes see it.

    Processes may read the file, add to ``meta``, change ``remote_name`` (a POSIX path relative
    to each sink's root) or add derived files with :meth:`add_file`.
    """

    event: FileEvent
    scratch_dir: Path  #: a private folder for derived files, removed after the job
    remote_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    derived: list[DerivedFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.remote_name:
            self.remote_name = self.event.relpath

    @property
    def path(self) -> Path:
        """The absolute local path of the file."""
        return self.event.path

    @property
    def relpath(self) -> str:
        """The path relative to the source root."""
        return self.event.relpath

    @property
    def pipeline(self) -> str:
        """The name of the pipeline this job belongs to."""
        return self.event.pipeline

    def open(self) -> BinaryIO:
        """Open the source file for reading (binary); see :func:`open_regular`."""
        return open_regular(self.event.path)

    def add_file(self, remote_name: str, data: bytes | Path, *, beside: bool = False) -> Path:
        """Deliver extra content with this job; returns the local file that will be sent.

        With ``beside=True``, ``remote_name`` is a suffix appended to the job's final remote name
        (``".json"`` puts a sidecar next to the file, whatever later processes rename it to).
        A name this job already delivers a file as raises ProcessError: the second would
        replace the first on every sink.
        """
        if any(d.remote_name == remote_name and d.beside == beside for d in self.derived):
            what = f"beside the file as NAME{remote_name}" if beside else f"as {remote_name}"
            raise ProcessError(
                f"two processes add a file {what}: the second would replace the first "
                "(give one of them another suffix or name)"
            )
        if isinstance(data, Path):
            local = data
        else:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
            local = self.scratch_dir / f"derived-{len(self.derived)}"
            local.write_bytes(data)
        self.derived.append(DerivedFile(local, remote_name, beside))
        return local


LifecycleKind = Literal[
    "queued",
    "rejected",
    "unchanged",
    "started",
    "progress",
    "delivered",
    "failed",
    "dead-lettered",
    "skipped",
    "moved",
    "deleted",
    "paused",
    "resumed",
    "reloaded",
    "reload-refused",
]


@dataclass(frozen=True)
class LifecycleEvent:
    """What happened to a file, sent to every ``skyframe_event`` hook implementation.

    ``to_json()`` is the stable, documented shape (docs/hooks.md).
    """

    #: one of LifecycleKind, or NAME-complete for a completed group (flight-complete)
    kind: LifecycleKind | str
    pipeline: str
    relpath: str
    sink: str | None = None
    remote: str | None = None
    size: int | None = None
    sha256: str | None = None  #: the content's sha256, on ``delivered``
    bytes_done: int | None = None
    attempt: int | None = None
    rule: str | None = None
    reason: str | None = None
    error: str | None = None  #: the error's type name, for failed and dead-lettered events
    #: what the processes found out about the file (``job.meta`` as JSON), on ``delivered``
    meta: dict[str, Any] | None = None
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict without the empty fields (in field order)."""
        # Every field is a plain value: no need for asdict()'s deep copy (several times
        # slower, and this runs for every event the history, API and webhooks record).
        return {
            name: value for name in _LIFECYCLE_FIELDS if (value := getattr(self, name)) is not None
        }


_LIFECYCLE_FIELDS = tuple(f.name for f in fields(LifecycleEvent))


def open_regular(path: Path) -> BinaryIO:
    """Open a source file for reading, refusing (OSError EINVAL) anything but a regular file.

    The open never blocks: a file replaced by a FIFO after it was seen would otherwise wait
    for a writer forever.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
