"""Sinks: fsspec filesystems rooted at a URL, safe remote paths, and the transfer contract.

Transfer plugins implement ``skyframe_transfer(request)`` and use :class:`SourceReader` to read
the local file: it hashes while reading and notices a file that changed or vanished.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from skyframe.config import SinkConfig, url_without_password
from skyframe.errors import SourceChangedError, SourceUnreadableError, UnsafePathError

CHUNK_SIZE = 1024 * 1024
TEMP_MARKER = ".skyframe-"
TEMP_SUFFIX = ".part"
#: Glob that matches the temporary names of our own uploads (see :func:`temporary_path`).
TEMP_GLOB = f".*{TEMP_MARKER}*{TEMP_SUFFIX}"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def redact_url(url: str) -> str:
    """The URL without a password, for messages and logs."""
    return url_without_password(url, "***")


def safe_relative_path(name: str) -> str:
    """Normalise a remote name, refusing anything that could leave the sink root."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"empty remote name {name!r}")
    if _CONTROL.search(name):
        raise UnsafePathError(f"remote name {name!r} contains control characters")
    if "\\" in name:
        raise UnsafePathError(f"remote name {name!r} contains a backslash")
    if name.startswith("/"):
        raise UnsafePathError(f"remote name {name!r} is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"remote name {name!r} contains '..'")
    if not parts:
        raise UnsafePathError(f"remote name {name!r} names no file")
    return "/".join(parts)


def temporary_path(remote_path: str) -> str:
    """A hidden name beside ``remote_path`` to upload into before the final rename.

    The name is derived from the target, so an upload cut short (crash, kill -9) is
    overwritten and renamed away by the next attempt instead of being left behind.
    """
    parent, name = posixpath.split(remote_path)
    tag = hashlib.sha256(remote_path.encode()).hexdigest()[:8]
    return posixpath.join(parent, f".{name}{TEMP_MARKER}{tag}{TEMP_SUFFIX}")


@dataclass
class Sink:
    """A configured destination, with its filesystem."""

    key: str  #: the name deliveries are recorded under in the manifest
    url: str  #: as configured (may hold credentials: show :attr:`display` instead)
    protocol: str
    root: str  #: the root path inside ``fs``
    fs: AbstractFileSystem = field(repr=False)
    concurrency: int = 4  #: files sent to this sink at once
    on_delete: str = "keep"  #: ``keep`` or ``delete`` the remote copy of a deleted file

    @property
    def display(self) -> str:
        """The URL for messages, password removed."""
        return redact_url(self.url)

    def remote_path(self, name: str) -> str:
        """The full path on ``fs`` for a remote name, confined to the sink root."""
        relative = safe_relative_path(name)
        return posixpath.join(self.root, relative) if self.root else relative


def _is_url(value: str) -> bool:
    return "://" in value or value.startswith(("s3:", "gs:", "gcs:"))


def open_sink(config: SinkConfig, base_dir: Path) -> Sink:
    """Build the filesystem for a sink. Raises ValueError or ImportError with a clear message."""
    options: dict[str, Any] = dict(config.options)
    if _is_url(config.url):
        try:
            fs, root = fsspec.core.url_to_fs(config.url, **options)
        except ImportError as exc:
            raise ImportError(
                f"the backend for {redact_url(config.url)} is not installed: {exc}"
            ) from None
        except ValueError as exc:
            raise ValueError(f"cannot use {redact_url(config.url)}: {exc}") from None
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        root = str(root).rstrip("/")
    else:
        if options:
            raise ValueError("a local folder sink takes no options")
        fs = fsspec.filesystem("file")
        protocol = "file"
        root = str((base_dir / Path(config.url).expanduser()).resolve())
    return Sink(config.key, config.url, protocol, root, fs, config.concurrency, config.on_delete)


@dataclass
class TransferRequest:
    """One local file to deliver to one sink, as ``skyframe_transfer`` receives it."""

    sink: Sink
    local_path: Path
    remote_path: str  #: full path on ``sink.fs``, already confined to the sink root
    size: int  #: size when the job was queued
    mtime_ns: int
    progress: Callable[[int], None] = lambda done: None  #: called with bytes sent so far
    state_dir: Path | None = None  #: where a plugin may keep resume journals


@dataclass(frozen=True)
class TransferResult:
    """What a transfer plugin delivered."""

    size: int
    sha256: str


class SourceReader:
    """Read a local file in chunks, hashing it, and check it did not change meanwhile."""

    def __init__(self, path: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._hash = hashlib.sha256()
        self._file: Any = None
        self._stat: os.stat_result | None = None

    def __enter__(self) -> SourceReader:
        try:
            self._file = self.path.open("rb")
            self._stat = os.fstat(self._file.fileno())
        except FileNotFoundError:
            raise SourceUnreadableError(f"{self.path}: vanished before it could be read") from None
        except OSError as exc:
            raise SourceUnreadableError(f"{self.path}: cannot read: {exc.strerror}") from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk."""
        while True:
            try:
                data = self._file.read(self.chunk_size)
            except OSError as exc:
                raise SourceUnreadableError(f"{self.path}: read failed: {exc.strerror}") from None
            if not data:
                return
            self._hash.update(data)
            self.bytes_read += len(data)
            yield data

    @property
    def sha256(self) -> str:
        """The hex digest of what was read."""
        return self._hash.hexdigest()

    def check_unchanged(self, expected_size: int, expected_mtime_ns: int) -> None:
        """Raise SourceChangedError if the file differs from what the job expected."""
        assert self._stat is not None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise SourceUnreadableError(f"{self.path}: vanished while it was read") from None
        if (
            self.bytes_read != expected_size
            or now.st_size != expected_size
            or now.st_mtime_ns != expected_mtime_ns
            or now.st_ino != self._stat.st_ino
        ):
            raise SourceChangedError(f"{self.path}: changed while it was read")


def probe_sink(sink: Sink) -> float:
    """Write, check and delete a small hidden object at the sink root; return the seconds taken.

    Raises whatever the backend raises (permission, connection, missing bucket...).
    """
    began = time.monotonic()
    name = sink.remote_path(f".skyframe-check-{os.getpid()}-{int(began * 1000)}")
    payload = b"skyframe write check\n"
    if sink.root:
        sink.fs.makedirs(sink.root, exist_ok=True)
    sink.fs.pipe_file(name, payload)
    try:
        size = sink.fs.size(name)
        if size != len(payload):
            raise OSError(f"wrote {len(payload)} bytes but the sink reports {size}")
    finally:
        sink.fs.rm(name)
    return time.monotonic() - began


def file_sha256(path: Path) -> str:
    """Stream a file through sha256."""
    with SourceReader(path) as reader:
        for _ in reader.chunks():
            pass
        return reader.sha256
