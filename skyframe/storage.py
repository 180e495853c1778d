"""Sinks: fsspec filesystems rooted at a URL, safe remote paths, and the transfer contract.

Transfer plugins implement ``skyframe_transfer(request)`` and use :class:`SourceReader` to read
the local file: it hashes while reading and notices a file that changed or vanished.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fsspec.spec import AbstractFileSystem

from skyframe import backoff
from skyframe.bandwidth import Limiter, TokenBucket
from skyframe.config import RetryConfig, SinkConfig, upload_limit, url_without_password
from skyframe.display import shown
from skyframe.errors import (
    SinkRefusedError,
    SinkUnavailableError,
    SourceBusyError,
    SourceChangedError,
    SourceUnreadableError,
    UnsafePathError,
)
from skyframe.events import open_regular
from skyframe.journal import JournalKey, UploadJournal
from skyframe.protocols import Protocol, Protocols, builtin_protocols
from skyframe.protocols.endpoint import Endpoint

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
MAX_RETIRED = 8  #: dropped connections kept open for the transfers that may still use them
SWEEP_TIMEOUT = 5.0  #: seconds a closing sink may spend removing what its checks left behind
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


#: bytes in one file name on the file systems and SFTP servers skyframe writes to
NAME_MAX = 255


def temporary_path(remote_path: str, owner: str = "") -> str:
    """A hidden name beside ``remote_path`` to upload into before the final rename.

    The name is derived from the target and ``owner`` (the pipeline sending it), so an upload
    cut short (crash, kill -9) is overwritten and renamed away by the next attempt instead of
    being left behind, and two pipelines never share one. The target's name is shortened as
    needed to keep the temporary one within :data:`NAME_MAX` bytes.
    """
    parent, name = posixpath.split(remote_path)
    tag = hashlib.sha256(f"{owner}\0{remote_path}".encode()).hexdigest()[:8]
    room = NAME_MAX - len(f".{TEMP_MARKER}{tag}{TEMP_SUFFIX}")
    encoded = name.encode()
    if len(encoded) > room:
        name = encoded[:room].decode(errors="ignore")  # whole characters only
    return posixpath.join(parent, f".{name}{TEMP_MARKER}{tag}{TEMP_SUFFIX}")


class SinkHealth:
    """Whether a sink answers, and when to try it again after it stopped answering.

    ``offline`` (unreachable) backs off exponentially with jitter between ``initial`` and
    ``maximum`` seconds; during the wait, deliveries to the sink fail fast without touching
    the network. ``refused`` (credentials, host key, bucket) is reported until a delivery
    succeeds again.
    """

    def __init__(self, initial: float = 1.0, maximum: float = 60.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.state = "unknown"  #: unknown, ok, offline or refused
        self.failures = 0  #: consecutive failures to reach the sink
        self.last_error = ""
        self._retry_at = 0.0
        self._told = False  #: the current outage or refusal was logged
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Raise SinkUnavailableError while the sink is offline and its wait is not over."""
        with self._lock:
            if self.state == "offline" and time.monotonic() < self._retry_at:
                raise SinkUnavailableError(self.last_error)

    def wait(self) -> float:
        """Seconds until the sink is tried again (0 when it is not offline)."""
        with self._lock:
            if self.state != "offline":
                return 0.0
            return max(self._retry_at - time.monotonic(), 0.0)

    def succeeded(self) -> bool:
        """Record an answer; True when the sink was offline or refusing until now."""
        with self._lock:
            back = self.state in ("offline", "refused")
            self.state = "ok"
            self.failures = 0
            self.last_error = ""
            return back

    def announce(self) -> bool:
        """True once per spell offline or refused: whoever gets it logs that the sink is gone
        (a failure recorded without a log line, by a probe or a connection attempt, is told by
        the next transfer that meets it)."""
        with self._lock:
            if self.state in ("offline", "refused") and not self._told:
                self._told = True
                return True
            return False

    def failed(self, error: SinkUnavailableError | SinkRefusedError) -> bool:
        """Record a failure; True when it changes the state (worth one log line)."""
        with self._lock:
            state = "refused" if isinstance(error, SinkRefusedError) else "offline"
            changed = state != self.state
            self.state = state
            if changed:
                self._told = False
            self.last_error = str(error)
            if state == "offline" and (changed or time.monotonic() >= self._retry_at):
                # Transfers that were already under way when the link dropped fail together:
                # they are one failure, not one each (the wait would jump to its maximum).
                self.failures += 1
                wait = backoff.delay(self.initial, self.maximum, self.failures)
                self._retry_at = time.monotonic() + wait
            return changed


class Sink:
    """A configured destination. Its filesystem connects on first use and after a reset."""

    def __init__(
        self,
        key: str,
        url: str,
        endpoint: Endpoint,
        *,
        concurrency: int | None = None,
        on_delete: str = "keep",
        health: SinkHealth | None = None,
        limiter: Limiter | None = None,
        spec: Protocol | None = None,
    ) -> None:
        self.key = key
        #: the registered protocol it takes (how its interrupted uploads are cancelled)
        self.spec = spec  #: the name deliveries are recorded under in the manifest
        self.url = url  #: as configured (may hold credentials: show :attr:`display` instead)
        self.endpoint = endpoint
        self.protocol = endpoint.protocol
        self.root = endpoint.root  #: the root path inside ``fs``
        #: files sent to this sink at once
        self.concurrency = concurrency or endpoint.default_concurrency
        self.on_delete = on_delete  #: ``keep`` or ``delete`` the remote copy of a deleted file
        self.health = health or SinkHealth()
        #: upload rate limits (this sink's ``bwlimit``, and the global one once the engine
        #: adds it): transfers pace every piece they send through it
        self.limiter = limiter or Limiter.none()
        self.generation = 0  #: bumped at every reconnect
        #: the pipeline delivering through this sink (its temporary names are its own)
        self.owner = ""
        self._fs: AbstractFileSystem | None = None
        self._retired: list[AbstractFileSystem] = []  #: dropped after errors, closed at the end
        self._lock = threading.Lock()
        self._folders: set[str] = set()  #: remote folders known to exist on this connection
        #: check files a probe could not remove (its connection dropped): removed at close
        self.litter: set[str] = set()
        #: bytes per second the latest large upload to this sink achieved, or None before one
        #: was measured (an upload sizes what it keeps in flight by it)
        self.rate: float | None = None
        #: files being sent to this sink now (see :meth:`sending_files`)
        self.sending = 0
        #: since when (monotonic) at most one file has been sent to this sink at a time; None
        #: while more are
        self.alone_since: float | None = 0.0
        self._sending_lock = threading.Lock()
        #: notified when :attr:`sending` goes down
        self._sending_changed = threading.Condition(self._sending_lock)

    def __repr__(self) -> str:
        return f"Sink({self.key!r}, {self.display!r})"

    @property
    def display(self) -> str:
        """The URL for messages, password removed."""
        return redact_url(self.url)

    @property
    def remote(self) -> bool:
        """True when the sink is reached over a network."""
        return self.endpoint.remote

    @property
    def settings(self) -> Any:
        """The backend's checked options (None for the generic backend)."""
        return self.endpoint.settings

    @property
    def fs(self) -> AbstractFileSystem:
        """The connected filesystem (connecting now if needed).

        Threads that waited here while another one failed to connect fail at once rather
        than each trying (and timing out) in turn.
        """
        with self._lock:
            if self._fs is None:
                self.health.admit()
                try:
                    self._fs = self.endpoint.connect()
                except Exception as exc:
                    error = self.translate(exc)
                    if isinstance(error, SinkUnavailableError):
                        self.health.failed(error)  # before the next waiting thread gets in
                    raise
                self._folders = set()
            return self._fs

    def reset(self, generation: int | None = None) -> None:
        """Drop the connection (it reconnects on next use), unless another thread already did
        since ``generation``: a dead connection stays dead, a cached instance would keep it."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            self.generation += 1
            if self._fs is not None:
                # Other transfers may still be using it: it is closed later, with the sink,
                # or once it is long out of use.
                self._retired.append(self._fs)
            stale = self._retired[:-MAX_RETIRED]
            del self._retired[:-MAX_RETIRED]
            self._fs = None
            self._folders = set()
        for fs in stale:
            self.endpoint.close(fs)

    def close(self) -> None:
        """Close every connection this sink opened (it reconnects if used again), after
        removing what its checks left behind."""
        self._sweep()
        with self._lock:
            connections = [*self._retired, *([self._fs] if self._fs is not None else [])]
            self._retired = []
            self._fs = None
            self._folders = set()
            self.generation += 1
        for fs in connections:
            self.endpoint.close(fs)
        if self.endpoint.direct is not None:
            self.endpoint.direct.close()

    def _sweep(self) -> None:
        """Remove the check files in :attr:`litter`, on the open connection only, waiting at
        most :data:`SWEEP_TIMEOUT` seconds (a stalled link must not hold up the exit)."""
        fs = self._fs
        if not self.litter or fs is None:
            return
        names = sorted(self.litter)

        def sweep() -> None:
            for name in names:
                try:
                    fs.rm(name)
                except FileNotFoundError:
                    pass
                except Exception:  # the connection: the next close tries again
                    continue
                self.litter.discard(name)

        worker = threading.Thread(target=sweep, name="skyframe-sweep", daemon=True)
        worker.start()
        worker.join(SWEEP_TIMEOUT)

    @contextlib.contextmanager
    def guard(self, *, report: bool = True) -> Iterator[None]:
        """Around any use of the sink: fail fast while it is offline; turn backend errors
        about the sink itself into sink errors; keep its health; drop a connection that
        failed (fsspec would keep a dead one cached). With ``report``, a change of health is
        logged once (the daemon's "gone" and "back" lines)."""
        self.health.admit()
        generation = self.generation
        try:
            yield
        except Exception as exc:
            error = self.translate(exc)
            if isinstance(error, SinkUnavailableError | SinkRefusedError):
                if isinstance(error, SinkUnavailableError):
                    self.reset(generation)
                self.health.failed(error)
                if report and self.health.announce():
                    if isinstance(error, SinkRefusedError):
                        log.error("%s", error)
                    else:
                        log.warning("%s; files wait until it is back", error)
                if error is not exc:
                    raise error from exc
            raise
        else:
            if self.health.succeeded() and report:
                log.warning("%s: reachable again; delivering", self.display)

    def translate(self, exc: BaseException) -> BaseException:
        """A backend error as a sink error when it is about the sink, else ``exc`` itself."""
        if isinstance(exc, SinkUnavailableError | SinkRefusedError):
            return exc
        translated = self.endpoint.classify(exc)
        if translated is None:
            return exc
        if isinstance(translated, SinkRefusedError) and self._fs is not None:
            try:
                translated = self.endpoint.explain(self._fs, translated)
            except Exception:  # the closer look is a courtesy; the refusal stands
                log.debug("could not look closer at %s", translated, exc_info=True)
        return type(translated)(f"{self.display}: {translated}")

    def remote_path(self, name: str) -> str:
        """The full path on ``fs`` for a remote name, confined to the sink root."""
        relative = safe_relative_path(name)
        if self.endpoint.check_name is not None:
            self.endpoint.check_name(relative)
        return posixpath.join(self.root, relative) if self.root else relative

    def temporary_path(self, remote_path: str) -> str:
        """The hidden name to upload ``remote_path`` into, this sink's and pipeline's own
        (see :func:`temporary_path`)."""
        return temporary_path(remote_path, f"{self.owner}\0{self.key}")

    @contextlib.contextmanager
    def sending_files(self, count: int = 1) -> Iterator[None]:
        """Count ``count`` files as being sent to this sink meanwhile (:attr:`sending`): a
        transfer that knows it has the link to itself may keep it busier."""
        with self._sending_lock:
            self.sending += count
            if self.sending > 1:
                self.alone_since = None
        try:
            yield
        finally:
            with self._sending_lock:
                self.sending -= count
                if self.sending <= 1 and self.alone_since is None:
                    self.alone_since = time.monotonic()
                self._sending_changed.notify_all()

    def wait_alone(self, future: Future[Any]) -> bool:
        """Wait until at most one file is being sent to this sink, or ``future`` is done,
        whichever comes first; True in the first case."""

        def wake(_: Future[Any]) -> None:
            with self._sending_changed:
                self._sending_changed.notify_all()

        future.add_done_callback(wake)
        with self._sending_changed:
            self._sending_changed.wait_for(lambda: future.done() or self.sending <= 1)
            return self.sending <= 1

    def ensure_folder(self, folder: str) -> None:
        """Create a remote folder (and its parents) once per connection; object stores have
        no folders (and creating one there could create a bucket)."""
        if not folder or folder in self._folders or self.endpoint.object_store:
            return
        if self.endpoint.make_folder is not None:
            self.endpoint.make_folder(self.fs, folder)
        else:
            self.fs.makedirs(folder, exist_ok=True)
        self._folders.add(folder)

    def folder_exists(self, folder: str) -> None:
        """Note that ``folder`` exists on this connection (made or found by other means):
        :meth:`ensure_folder` asks nothing for it."""
        self._folders.add(folder)

    def forget_folders(self) -> None:
        """Forget which folders exist (one was removed behind our back)."""
        self._folders = set()


def open_sink(
    config: SinkConfig,
    base_dir: Path,
    retry: RetryConfig | None = None,
    protocols: Protocols | None = None,
) -> Sink:
    """Check a sink's URL and options, without connecting, with the protocol its URL takes
    among ``protocols`` (the built-in ones when None).

    Raises ValueError, ImportError or pydantic's ValidationError with a clear message.
    """
    protocol = (protocols or builtin_protocols()).for_url(config.url)
    options: dict[str, Any] = dict(config.options)
    try:
        endpoint = protocol.endpoint(config.url, options, base_dir)
    except ImportError as exc:
        raise ImportError(
            f"the backend for {redact_url(config.url)} is not installed: {exc}"
        ) from None
    health = SinkHealth(retry.initial, retry.max) if retry else SinkHealth()
    limit = upload_limit(config)  # bwlimit, or the schedule of bandwidth
    return Sink(
        config.key,
        config.url,
        endpoint,
        concurrency=config.concurrency,
        on_delete=config.on_delete,
        health=health,
        limiter=None if limit is None else Limiter([TokenBucket(limit, name=f"sink {config.key}")]),
        spec=protocol,
    )


@dataclass
class TransferRequest:
    """One local file to deliver to one sink, as ``skyframe_transfer`` receives it."""

    sink: Sink
    local_path: Path
    remote_path: str  #: full path on ``sink.fs``, already confined to the sink root
    size: int  #: size when the job was queued
    mtime_ns: int
    progress: Callable[[int], None] = lambda done: None  #: called with bytes sent so far
    state_dir: Path | None = None  #: the state directory (scratch space for plugins)
    journal: UploadJournal | None = None  #: resume records; None: no resuming
    pace: Callable[[int], None] = lambda size: None  #: call before sending ``size`` bytes
    digests: Digests | None = None  #: digests computed ahead of the transfer, if any
    #: the pipeline's ``priority`` puts this file first (a photo beside a video): a transfer
    #: may keep it apart from bulk uploads on the same connection
    urgent: bool = False

    def digest(self) -> str:
        """The file's sha256 before anything is sent (object stores name it when an upload
        begins): the one computed ahead (:class:`Digests`) when there is one, else read now."""
        if self.digests is not None:
            ahead = self.digests.take(self.local_path, self.size, self.mtime_ns)
            if ahead is not None:
                return ahead
        return file_sha256(self.local_path)

    @property
    def journal_key(self) -> JournalKey:
        """The key of this upload's resume record in ``journal``."""
        return JournalKey(self.sink.key, self.remote_path)


@dataclass(frozen=True)
class TransferResult:
    """What a transfer plugin delivered."""

    size: int
    sha256: str


#: Delivers several small files to one sink at once (``skyframe_transfer_batch``): one result
#: or exception per request, in order.
BatchTransfer = Callable[[list[TransferRequest]], list[TransferResult | Exception]]


#: Windows' errors for a file another program holds: ERROR_SHARING_VIOLATION (opened without
#: sharing it) and ERROR_LOCK_VIOLATION (a part of it locked).
WINDOWS_BUSY = frozenset({32, 33})


def is_busy(exc: OSError) -> bool:
    """Whether the error says another program holds the file for now (Windows)."""
    return getattr(exc, "winerror", None) in WINDOWS_BUSY


class SourceReader:
    """Read a local file in chunks, hashing it, and check it did not change meanwhile.

    ``hashing=False`` is for a plugin that hashed the file already (a resumable upload names
    the digest when it starts); ``sha256`` is then unavailable.
    """

    def __init__(self, path: Path, chunk_size: int = CHUNK_SIZE, *, hashing: bool = True) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._hash: Any = hashlib.sha256() if hashing else None
        self._file: Any = None
        self._stat: os.stat_result | None = None

    def __enter__(self) -> SourceReader:
        try:
            self._file = open_regular(self.path)
            self._stat = os.fstat(self._file.fileno())
        except FileNotFoundError:
            raise SourceUnreadableError(
                f"{shown(self.path)}: vanished before it could be read"
            ) from None
        except OSError as exc:
            raise self._failed(exc, "cannot read") from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()

    def _read(self, size: int) -> bytes:
        try:
            data: bytes = self._file.read(size)
        except OSError as exc:
            raise self._failed(exc, "read failed") from None
        if self._hash is not None:
            self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def _failed(self, exc: OSError, what: str) -> SourceBusyError | SourceUnreadableError:
        """The error for an open or a read that failed: retried when another program holds
        the file (Windows), else not."""
        where = shown(self.path)
        if is_busy(exc):
            return SourceBusyError(f"{where}: in use by another program ({exc.strerror})")
        return SourceUnreadableError(f"{where}: {what}: {exc.strerror}")

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk (from where ``start_at`` left it)."""
        while data := self._read(self.chunk_size):
            yield data

    def start_at(self, offset: int) -> None:
        """Go on from ``offset`` (an upload resumed there): the bytes before it are hashed,
        not returned; without hashing they are skipped."""
        if self._hash is None:
            self._file.seek(offset)
            self.bytes_read = offset
            return
        while self.bytes_read < offset:
            if not self._read(min(CHUNK_SIZE, offset - self.bytes_read)):
                break  # shorter than the offset: check_unchanged will say so

    @property
    def sha256(self) -> str:
        """The hex digest of what was read."""
        if self._hash is None:
            raise RuntimeError("this reader does not hash")
        return str(self._hash.hexdigest())

    def check_unchanged(self, expected_size: int, expected_mtime_ns: int) -> None:
        """Raise SourceChangedError if the file differs from what the job expected."""
        assert self._stat is not None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise SourceUnreadableError(f"{shown(self.path)}: vanished while it was read") from None
        if (
            self.bytes_read != expected_size
            or now.st_size != expected_size
            or now.st_mtime_ns != expected_mtime_ns
            or now.st_ino != self._stat.st_ino
        ):
            raise SourceChangedError(f"{shown(self.path)}: changed while it was read")


@dataclass(frozen=True)
class ProbeResult:
    """How long a sink took to connect, and to write, check and delete a small object."""

    connect: float
    write: float


def probe_sink(sink: Sink, written: Callable[[], None] | None = None) -> ProbeResult:
    """Connect, write a small hidden object at the sink root, check its size, delete it (with
    the backend's light client when it has one and that succeeds). ``written`` is called as
    soon as the object is stored: the sink takes writes with these credentials.

    Raises what the backend raised; run it inside ``sink.guard()`` to get sink errors.
    """
    began = time.monotonic()
    name = sink.remote_path(f".skyframe-check-{os.getpid()}-{int(began * 1000)}")
    payload = b"skyframe write check\n"
    direct = sink.endpoint.direct
    if direct is not None:
        connecting = direct.probe(name, payload, written)
        if connecting is not None:
            return ProbeResult(connecting, time.monotonic() - began - connecting)
        began = time.monotonic()  # it could not tell: the regular probe says what is wrong
    fs = sink.fs
    connected = time.monotonic()
    sink.litter.add(name)  # until it is removed: the link may drop first
    write_check = sink.endpoint.write_check
    if write_check is not None:  # it makes the root only if it is missing

        def stored() -> None:  # the root is there: the files that go now need not ask
            sink.folder_exists(sink.root)
            if written is not None:
                written()

        size = write_check(fs, name, payload, stored)
        sink.litter.discard(name)
    else:
        sink.ensure_folder(sink.root)
        size = _write_check(sink, fs, name, payload, written)
    if size != len(payload):
        raise OSError(f"wrote {len(payload)} bytes but the sink reports {size}")
    return ProbeResult(connected - began, time.monotonic() - connected)


def _write_check(
    sink: Sink,
    fs: AbstractFileSystem,
    name: str,
    payload: bytes,
    written: Callable[[], None] | None,
) -> int | None:
    """The sinks' check through the filesystem's calls: write, size, remove."""
    try:
        fs.pipe_file(name, payload)
    except FileNotFoundError:
        if not sink.endpoint.object_store:
            raise
        bucket = sink.root.split("/", 1)[0]
        raise SinkRefusedError(f"{sink.display}: bucket {bucket!r} does not exist") from None
    if written is not None:
        written()
    try:
        size = fs.size(name)
        return None if size is None else int(size)
    finally:
        fs.rm(name)
        sink.litter.discard(name)


#: What a check says of a sink: its result, the error it gave, or (:meth:`SinkChecks.ready`)
#: None while the sink has taken the check's write and the rest of the check goes on.
CheckOutcome = ProbeResult | BaseException | None


class SinkChecks:
    """Probes of several sinks (:func:`probe_sink`), each in a daemon thread of its own, started
    at once; :meth:`results` collects them, :meth:`ready` as soon as every sink has answered
    or taken the check's write.

    Sink-level failures are recorded in each sink's health. With ``close``, each probe closes
    its sink's connections when it is done. ``late`` is told of an error that comes after
    :meth:`ready` reported its sink as written (the size check or the delete failed).
    """

    def __init__(
        self,
        sinks: list[Sink],
        *,
        close: bool = False,
        late: Callable[[Sink, BaseException], None] | None = None,
    ) -> None:
        self.sinks = sinks
        self.started = time.monotonic()
        self._results: list[ProbeResult | BaseException | None] = [None] * len(sinks)
        #: answered: took the check's write, or finished the check
        self._answered_sinks = [False] * len(sinks)
        self._reported = [False] * len(sinks)  #: reported by ready() while still checking
        self._done = threading.Event()
        self._answered = threading.Event()
        self._remaining = len(sinks)
        self._unanswered = len(sinks)
        #: guards the lists above; notified when a check ends (what :meth:`finish` waits for)
        self._lock = threading.Condition()
        self._close = close
        self._late = late
        if not sinks:
            self._done.set()
            self._answered.set()
        for index, sink in enumerate(sinks):
            threading.Thread(
                target=self._probe, args=(index, sink), name="skyframe-check", daemon=True
            ).start()

    def _answer(self, index: int) -> None:
        """The sink at ``index`` answered (called under the lock)."""
        if not self._answered_sinks[index]:
            self._answered_sinks[index] = True
            self._unanswered -= 1
            if self._unanswered == 0:
                self._answered.set()

    def _probe(self, index: int, sink: Sink) -> None:
        def written() -> None:
            with self._lock:
                self._answer(index)

        result: ProbeResult | BaseException
        try:
            with sink.guard(report=False):
                result = probe_sink(sink, written)
        except Exception as exc:
            result = exc
        if self._close:
            sink.close()
        with self._lock:
            self._results[index] = result
            late = self._reported[index]
            self._answer(index)
            self._lock.notify_all()
        if late and isinstance(result, BaseException) and self._late is not None:
            self._late(sink, result)
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._done.set()

    def _collect(
        self, timeout: float | None, event: threading.Event
    ) -> list[tuple[Sink, CheckOutcome]]:
        if timeout is None:
            event.wait()
        else:
            event.wait(max(self.started + timeout - time.monotonic(), 0.0))
        out: list[tuple[Sink, CheckOutcome]] = []
        with self._lock:
            for index, sink in enumerate(self.sinks):
                result = self._results[index]
                if result is None and self._answered_sinks[index]:
                    self._reported[index] = True
                    out.append((sink, None))
                elif result is None:
                    silent = SinkUnavailableError(f"{sink.display}: no answer within {timeout:g} s")
                    sink.health.failed(silent)
                    out.append((sink, silent))
                else:
                    out.append((sink, result))
        return out

    def results(
        self, timeout: float | None = None
    ) -> list[tuple[Sink, ProbeResult | BaseException]]:
        """Each sink with its ProbeResult or the error it gave, in order.

        A sink that gave no answer within ``timeout`` seconds of the start gets a
        SinkUnavailableError (its probe is abandoned in its daemon thread); so does one still
        checking, in this call's answer, when it took the check's write but the rest of its
        check did not end in time.
        """
        return [
            (
                sink,
                SinkUnavailableError(
                    f"{sink.display}: took the check's write, then no answer within {timeout:g} s"
                )
                if outcome is None
                else outcome,
            )
            for sink, outcome in self._collect(timeout, self._done)
        ]

    def ready(self, timeout: float | None = None) -> list[tuple[Sink, CheckOutcome]]:
        """Each sink, in order, once every one has either finished its check or taken the
        check's write: its ProbeResult, the error it gave, or None when it took the write and
        the check goes on (an error after that goes to ``late``). A sink that did neither
        within ``timeout`` seconds of the start gets a SinkUnavailableError."""
        return self._collect(timeout, self._answered)

    def finish(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every check that took its write to end (its
        object removed); False when one is still going. A check that wrote nothing (its sink
        does not answer) leaves nothing behind and is not waited for."""

        def ended() -> bool:
            return not any(
                answered and result is None  # took the write, not done
                for answered, result in zip(self._answered_sinks, self._results, strict=True)
            )

        with self._lock:
            return self._lock.wait_for(ended, timeout)


def check_sinks(
    sinks: list[Sink], timeout: float | None = None, *, close: bool = False
) -> list[tuple[Sink, ProbeResult | BaseException]]:
    """Probe sinks concurrently; each gets a ProbeResult or the error it gave, in order (see
    :class:`SinkChecks`)."""
    return SinkChecks(sinks, close=close).results(timeout)


def file_sha256(path: Path, size: int | None = None, mtime_ns: int | None = None) -> str:
    """Stream a file through sha256; with ``size`` and ``mtime_ns``, check it is still that
    version once read (SourceChangedError otherwise)."""
    with SourceReader(path) as reader:
        for _ in reader.chunks():
            pass
        if size is not None and mtime_ns is not None:
            reader.check_unchanged(size, mtime_ns)
        return reader.sha256


class Digests:
    """sha256 digests of files computed ahead of their transfer, in a thread of their own.

    An object store names a large file's digest when its upload begins (S3 and GCS keep the
    object's metadata from then), so the file is read once for the digest before the first
    byte goes out. While ``run --once`` waits for the sinks' check, the engine hands such
    files here (``Endpoint.hashes_from``); the transfer then takes the digest (waiting for it
    if it is under way) instead of reading the file first. A digest is kept for the file's
    size and mtime: a file that changed meanwhile is read again. :meth:`stop` drops what has
    not started. The thread is a daemon: a run that ends early does not wait for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[tuple[Path, int, int], Future[str]] = {}
        self._todo: deque[tuple[tuple[Path, int, int], Future[str]]] = deque()
        self._worker: threading.Thread | None = None
        self._stopped = False

    def ahead(self, path: Path, size: int, mtime_ns: int) -> None:
        """Start hashing this version of a file (once); nothing after :meth:`stop`."""
        key = (path, size, mtime_ns)
        with self._lock:
            if self._stopped or key in self._futures:
                return
            future: Future[str] = Future()
            self._futures[key] = future
            self._todo.append((key, future))
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="skyframe-digests", daemon=True
                )
                self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._todo:
                    self._worker = None
                    return
                (path, size, mtime_ns), future = self._todo.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(file_sha256(path, size, mtime_ns))
            except BaseException as exc:  # handed to the transfer, which then reads the file
                future.set_exception(exc)

    def take(self, path: Path, size: int, mtime_ns: int) -> str | None:
        """The digest of this version, once computed; None if it was not asked for, was
        dropped, or failed (the file changed or could not be read: the caller reads it)."""
        with self._lock:
            future = self._futures.pop((path, size, mtime_ns), None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # a failure or a cancelled hash: the transfer reads the file itself
            return None

    def stop(self) -> None:
        """Start nothing more; drop what has not started (what has, finishes)."""
        with self._lock:
            self._stopped = True
            for _key, future in self._todo:
                future.cancel()
            self._todo.clear()
