"""Remote names that two files would share: each remote path holds one file.

Within a pipeline, a rename template can give two files one remote name (``{name}`` alone,
and a ``DJI_0001.JPG`` in each flight's folder). The second would silently replace the
first: :class:`RemoteNames` refuses it with both names (:class:`RemoteConflictError`, a dead
letter), whether the first is in flight beside it or was delivered on an earlier day (the
manifest's index of remote names). A new version of the same file still replaces its own.

Storage that several pipelines deliver to: each remote path belongs to one pipeline.

Two pipelines may send to the same bucket or folder (``out`` and ``./out``, or a folder and
one inside it). A file of one must never silently replace a file of the other: the first
pipeline to deliver a remote path owns it (as its manifest records), and a delivery of
another pipeline to that path is refused with both names (:class:`RemoteConflictError`, a
dead letter). Pipelines whose sinks share nothing pay nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from skyframe.errors import RemoteConflictError
from skyframe.state import Manifest
from skyframe.storage import Sink

#: (protocol, server): where a sink's root paths are one name space
Namespace = tuple[str, str]


def namespace(sink: Sink) -> Namespace:
    """The storage a sink's root lives in: its protocol and server (endpoint or host)."""
    server = getattr(sink.settings, "endpoint_url", None) or ""
    if not server and "://" in sink.url:
        parts = urlsplit(sink.url)
        server = parts.hostname or ""
        if parts.port:
            server = f"{server}:{parts.port}"
    if sink.protocol in ("s3", "gcs"):
        server = server or "default"
    return sink.protocol, server.rstrip("/")


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(f"{b}/") or b.startswith(f"{a}/")


class RemoteOwners:
    """Which pipeline each remote path of a shared storage belongs to."""

    def __init__(self, sinks: Iterable[Sink], manifest: Manifest) -> None:
        by_space: dict[Namespace, list[Sink]] = {}
        for sink in sinks:
            by_space.setdefault(namespace(sink), []).append(sink)
        self._shared: dict[int, Namespace] = {}
        for space, members in by_space.items():
            for a in members:
                for b in members:
                    if a.owner != b.owner and _overlap(a.root, b.root):
                        self._shared[id(a)] = space
        self._lock = threading.Lock()
        self._owners: dict[tuple[Namespace, str], str] = {}
        if not self._shared:
            return
        shared_sinks = {
            (s.owner, s.key): s
            for members in by_space.values()
            for s in members
            if id(s) in self._shared
        }
        for pipeline, sink_key, _relpath, entry in manifest.entries():
            found = shared_sinks.get((pipeline, sink_key))
            if found is not None:
                remote = found.remote_path(entry.remote)
                self._owners.setdefault((self._shared[id(found)], remote), pipeline)

    @property
    def active(self) -> bool:
        """True when some pipelines' sinks overlap."""
        return bool(self._shared)

    def claim(self, sink: Sink, remote_path: str) -> None:
        """Take ``remote_path`` on ``sink`` for the sink's pipeline; raise
        RemoteConflictError when another pipeline's file is there."""
        space = self._shared.get(id(sink))
        if space is None:
            return
        with self._lock:
            owner = self._owners.setdefault((space, remote_path), sink.owner)
        if owner != sink.owner:
            raise RemoteConflictError(
                f"{sink.display}: {remote_path} holds a file of pipeline {owner!r}; pipeline "
                f"{sink.owner!r} does not replace it (give the pipelines different folders or "
                "remote names)"
            )


class RemoteNameBusyError(RemoteConflictError):
    """The remote name is being written with another file right now: tried again later,
    when the name either holds that file (then refused for good) or is free."""

    retryable = True


class RemoteNames:
    """Which file of a pipeline each remote name on its sink holds (see the module's
    docstring): the files in flight, then the manifest's index."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._lock = threading.Lock()
        #: (pipeline, sink key, remote name) -> (relative path, transfers holding it)
        self._flying: dict[tuple[str, str, str], tuple[str, int]] = {}

    @contextmanager
    def claim(
        self, pipeline: str, sink: Sink, remote: str, relpath: str, moved_from: str | None = None
    ) -> Iterator[None]:
        """Hold ``remote`` on ``sink`` for the file ``relpath`` while it is sent (or moved
        there, from the remote name of ``moved_from``) and recorded; raise
        RemoteConflictError when another file of the pipeline has it."""
        key = (pipeline, sink.key, remote)
        advice = "the remote names of the two are one: tell them apart in the rename template"
        with self._lock:
            flying = self._flying.get(key)
            if flying is not None and flying[0] != relpath:
                # Not refused for good: the other may fail, and leave the name free.
                raise RemoteNameBusyError(
                    f"{sink.display}: {remote} is being written with {flying[0]}; {relpath} of "
                    f"pipeline {pipeline!r} waits for it ({advice})"
                )
            holder = self._manifest.holder(pipeline, sink.key, remote)
            if holder is not None and holder not in (relpath, moved_from):
                raise RemoteConflictError(
                    f"{sink.display}: {remote} holds {holder}; {relpath} of pipeline "
                    f"{pipeline!r} is not written over it ({advice}, with {{parent}} or "
                    "{relpath})"
                )
            self._flying[key] = (relpath, (flying[1] if flying is not None else 0) + 1)
        try:
            yield
        finally:
            with self._lock:
                _holder, count = self._flying[key]
                if count > 1:
                    self._flying[key] = (relpath, count - 1)
                else:
                    del self._flying[key]
