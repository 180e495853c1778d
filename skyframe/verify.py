"""``skyframe verify``: is what the manifest says was delivered really on the sinks?

For every delivery the manifest records, the sink is asked for the object: it must exist with
the recorded size and, where the protocol can tell without downloading (S3 and GCS keep the
sha256 skyframe's uploads set as metadata), the recorded sha256. With ``deep`` every object is
read back and hashed. The files recorded with it (sidecars, thumbnails) must exist. Objects
under the sink's root that no delivery accounts for are reported as extra (never removed).

``repair`` forgets the record of each missing or different object and queues its file again
(when the source still has it), for the running daemon or the next run to deliver.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skyframe.events import FileEvent
from skyframe.jobs import Upload
from skyframe.pipeline import Pipeline
from skyframe.queue import JobQueue
from skyframe.state import Manifest, ManifestEntry
from skyframe.storage import TEMP_MARKER, Sink

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Finding:
    """One problem found on a sink."""

    kind: str  #: "missing", "different", "extra" or "unreadable"
    pipeline: str
    sink: str
    relpath: str  #: the source file ("" for an extra object)
    remote: str  #: the object, relative to the sink's root
    detail: str = ""
    repaired: str = ""  #: what --repair did about it


@dataclass
class Verified:
    """What a verification looked at and found."""

    checked: int = 0
    hashed: int = 0  #: objects whose sha256 was compared (metadata or read back)
    findings: list[Finding] = field(default_factory=list)


def verify(
    pipelines: list[Pipeline],
    state_dir: Path,
    *,
    deep: bool = False,
    repair: bool = False,
    on_finding: Callable[[Finding], None] | None = None,
) -> Verified:
    """Check every recorded delivery of ``pipelines`` (see the module's docstring)."""
    out = Verified()
    if not (state_dir / "manifest").is_dir():
        return out
    manifest = Manifest(state_dir / "manifest")
    queue = JobQueue(state_dir / "queue", recover=False) if repair else None
    #: every object a delivery accounts for, by protocol: storage several pipelines share
    #: holds the files of all of them
    known: set[tuple[str, str]] = set()
    listed: set[tuple[str, str]] = set()
    try:
        entries = manifest.entries()
        checks = []
        for pipeline in pipelines:
            for sink in pipeline.sinks:
                mine = [
                    (rel, e)
                    for name, key, rel, e in entries
                    if (name, key) == (pipeline.name, sink.key)
                ]
                problems = _check_sink(pipeline, sink, mine, deep=deep, out=out, known=known)
                checks.append((pipeline, sink, problems))
        for pipeline, sink, problems in checks:
            root = (sink.protocol, sink.root or "")
            extras = [] if root in listed else _extras(pipeline, sink, known)
            listed.add(root)  # each storage's extras once, after every delivery is known
            for each in [*problems, *extras]:
                finding = each
                if repair and queue is not None and each.kind in ("missing", "different"):
                    finding = _repair(pipeline, sink, each, manifest, queue)
                out.findings.append(finding)
                if on_finding is not None:
                    on_finding(finding)
    finally:
        if queue is not None:
            queue.close()
        manifest.close()
    return out


def _check_sink(
    pipeline: Pipeline,
    sink: Sink,
    entries: list[tuple[str, ManifestEntry]],
    *,
    deep: bool,
    out: Verified,
    known: set[tuple[str, str]],
) -> list[Finding]:
    """The problems of each recorded object of one sink; adds what it accounts for to
    ``known``."""
    found: list[Finding] = []
    sink.fs.invalidate_cache()  # a listing cached earlier must not answer for the objects
    for relpath, entry in entries:
        out.checked += 1
        known.add((sink.protocol, sink.remote_path(entry.remote)))
        known.update((sink.protocol, sink.remote_path(name)) for name in entry.derived)
        problem = _check_entry(sink, entry, deep, out)
        if problem is not None:
            kind, remote, detail = problem
            found.append(Finding(kind, pipeline.name, sink.key, relpath, remote, detail))
    return found


def _extras(pipeline: Pipeline, sink: Sink, known: set[tuple[str, str]]) -> list[Finding]:
    """The objects under the sink's root that no delivery accounts for (nor is an upload's
    temporary name)."""
    return [
        Finding("extra", pipeline.name, sink.key, "", _relative(sink, path), "no delivery has it")
        for path in _listing(sink)
        if (sink.protocol, path) not in known and TEMP_MARKER not in posixpath.basename(path)
    ]


def _check_entry(
    sink: Sink, entry: ManifestEntry, deep: bool, out: Verified
) -> tuple[str, str, str] | None:
    """What is wrong with one recorded object on ``sink`` (kind, remote name, detail)."""
    fs = sink.fs
    path = sink.remote_path(entry.remote)
    remote_sha256 = sink.spec.remote_sha256 if sink.spec is not None else None
    try:
        size = int(fs.info(path)["size"])
        if size != entry.size:
            return "different", entry.remote, f"{size} bytes, recorded {entry.size}"
        if deep:
            digest: str | None = _read_sha256(sink, path)
        else:
            digest = remote_sha256(fs, path) if remote_sha256 is not None else None
            if digest == "":  # the store keeps none: skyframe's uploads always set one
                return "different", entry.remote, "it has no sha256: another writer replaced it"
    except FileNotFoundError:
        return "missing", entry.remote, ""
    except OSError as exc:
        return "unreadable", entry.remote, str(exc)
    if digest is not None:
        out.hashed += 1
        if digest != entry.sha256:
            return "different", entry.remote, "its sha256 differs from the recorded one"
    for name in entry.derived:
        if not fs.exists(sink.remote_path(name)):
            return "missing", name, f"recorded with {entry.remote}"
    return None


def _read_sha256(sink: Sink, path: str) -> str:
    digest = hashlib.sha256()
    with sink.fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(sink: Sink) -> list[str]:
    """Every object under the sink's root (none when the root does not exist yet)."""
    try:
        sink.fs.invalidate_cache()
        return [str(p) for p in sink.fs.find(sink.root or "")]
    except FileNotFoundError:
        return []


def _relative(sink: Sink, path: str) -> str:
    root = (sink.root or "").rstrip("/")
    return posixpath.relpath(path, root) if root else path


def _repair(
    pipeline: Pipeline, sink: Sink, finding: Finding, manifest: Manifest, queue: JobQueue
) -> Finding:
    """Forget the record and queue the file again; say what was done."""
    source = pipeline.source_root / finding.relpath
    try:
        st = source.stat()
    except OSError:
        return _with(finding, "not repaired: the source file is gone")
    manifest.forget(pipeline.name, sink.key, finding.relpath)
    event = FileEvent.from_stat(pipeline.name, source, finding.relpath, st, "scanned")
    job = Upload(event=event, priority=pipeline.priority_of(event))
    queue.put(pipeline.name, job)
    return _with(finding, "queued again")


def _with(finding: Finding, repaired: str) -> Finding:
    return Finding(
        finding.kind,
        finding.pipeline,
        finding.sink,
        finding.relpath,
        finding.remote,
        finding.detail,
        repaired,
    )
