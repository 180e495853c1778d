"""Digests computed ahead: while ``run --once`` waits for its sinks' check, files that a sink
hashes before sending (``Endpoint.hashes_from``: S3 multipart, GCS resumable) are hashed in a
thread, and the transfer takes the digest instead of reading the file a second time."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WriteConfig, make_file, plugin_module, write_plugin

import skyframe.storage
from skyframe.engine import Engine
from skyframe.pipeline import load_project
from skyframe.state import Manifest
from skyframe.storage import Digests

CONFIG = """\
state_dir: .state
plugins: [plugins]
pipelines:
  - name: survey
    source: {path: incoming, settle: 0}
    sinks:
      - url: outbox
"""

# A transfer for local sinks that, like the S3 and GCS ones, names the digest before sending.
DIGEST_FIRST = """
    import shutil
    from skyframe import TransferResult, hookimpl

    DIGESTS = {}  # remote path -> the digest the transfer was given

    @hookimpl(tryfirst=True)
    def skyframe_transfer(request):
        digest = request.digest()
        DIGESTS[request.remote_path] = digest
        fs = request.sink.fs
        fs.makedirs(fs._parent(request.remote_path), exist_ok=True)
        fs.put_file(str(request.local_path), request.remote_path)
        return TransferResult(request.size, digest)
"""

MIB = 1024 * 1024


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Path]]:
    """The files read for a digest (``file_sha256``): "ahead" by Digests (which names the
    version it hashes), "transfer" by a transfer that had no digest computed ahead."""
    reads: dict[str, list[Path]] = {"ahead": [], "transfer": []}
    original = skyframe.storage.file_sha256

    def counting(path: Path, *version: int) -> str:
        reads["ahead" if version else "transfer"].append(path)
        return original(path, *version)

    monkeypatch.setattr(skyframe.storage, "file_sha256", counting)
    return reads


def engine_for(tmp_path: Path, write_config: WriteConfig, hashes_from: int) -> Engine:
    write_plugin(tmp_path / "plugins", "digest_first.py", DIGEST_FIRST)
    project = load_project(write_config(CONFIG))
    engine = Engine(project.config, project.pm, project.pipelines)
    for pipeline in engine.pipelines.values():
        for sink in pipeline.sinks:
            sink.endpoint.hashes_from = hashes_from
    return engine


def wait_for_digests(engine: Engine, count: int) -> Callable[[], None]:
    """A gate that opens once ``count`` digests are computed ahead."""

    def gate() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            futures = list(engine.runner.digests._futures.values())
            if len(futures) >= count and all(f.done() for f in futures):
                return
            time.sleep(0.01)
        raise AssertionError("the digests were not computed ahead")

    return gate


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_large_files_are_hashed_while_the_gate_is_closed(
    tmp_path: Path, write_config: WriteConfig, counted_reads: dict[str, list[Path]]
) -> None:
    src = tmp_path / "incoming"
    big = make_file(src, "flight/video.mp4", os.urandom(3 * MIB))
    bigger = make_file(src, "flight/video2.mp4", os.urandom(2 * MIB + 7))
    small = make_file(src, "notes.txt", b"below the threshold")
    engine = engine_for(tmp_path, write_config, hashes_from=MIB)
    engine.gate = wait_for_digests(engine, 2)
    try:
        summary = engine.run_once()
    finally:
        engine.close()
    assert summary.delivered == 3
    assert not summary.failed
    # Only the small file was read by its transfer; the large ones' digests came from ahead.
    assert counted_reads["transfer"] == [small]
    assert sorted(counted_reads["ahead"]) == sorted([big, bigger])
    given = plugin_module(tmp_path, "digest_first.py").DIGESTS
    outbox = tmp_path / "outbox"
    for path in (big, bigger, small):
        relpath = path.relative_to(src).as_posix()
        assert given[str(outbox / relpath)] == sha256_of(path)
        assert (outbox / relpath).read_bytes() == path.read_bytes()
    manifest = Manifest(tmp_path / ".state" / "manifest")
    try:
        entry = manifest.get("survey", "outbox", "flight/video.mp4")
        assert entry is not None
        assert entry.sha256 == sha256_of(big)
    finally:
        manifest.close()


def test_without_a_gate_the_transfer_reads_the_file_itself(
    tmp_path: Path, write_config: WriteConfig, counted_reads: dict[str, list[Path]]
) -> None:
    big = make_file(tmp_path / "incoming", "video.mp4", os.urandom(2 * MIB))
    engine = engine_for(tmp_path, write_config, hashes_from=MIB)
    try:
        assert engine.run_once().delivered == 1
    finally:
        engine.close()
    assert counted_reads == {"ahead": [], "transfer": [big]}
    assert engine.runner.digests._futures == {}


def test_a_digest_is_for_one_version_of_a_file(tmp_path: Path) -> None:
    path = make_file(tmp_path, "a.bin", os.urandom(100_000))
    st = path.stat()
    digests = Digests()
    digests.ahead(path, st.st_size, st.st_mtime_ns)
    assert digests.take(path, st.st_size, st.st_mtime_ns) == sha256_of(path)
    assert digests.take(path, st.st_size, st.st_mtime_ns) is None  # taken once
    # Asked for a version the file no longer is (it changed since it was queued): no digest,
    # the transfer reads the file and meets the change itself.
    digests.ahead(path, st.st_size, st.st_mtime_ns - 1)
    assert digests.take(path, st.st_size, st.st_mtime_ns - 1) is None
    assert digests.take(tmp_path / "never-asked", 1, 1) is None
    gone = tmp_path / "gone.bin"
    digests.ahead(gone, 10, 10)
    assert digests.take(gone, 10, 10) is None


def test_stop_drops_what_has_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_file(tmp_path, "first.bin", b"1" * 1000)
    second = make_file(tmp_path, "second.bin", b"2" * 1000)
    release = threading.Event()
    reading = threading.Event()
    original = skyframe.storage.SourceReader

    class HeldReader(original):  # type: ignore[misc, valid-type]
        def __enter__(self) -> Any:
            if self.path == first:
                reading.set()
                release.wait(10)
            return super().__enter__()

    monkeypatch.setattr(skyframe.storage, "SourceReader", HeldReader)
    digests = Digests()
    versions = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (first, second)}
    digests.ahead(first, *versions[first])
    digests.ahead(second, *versions[second])
    assert reading.wait(10)
    digests.stop()
    digests.ahead(tmp_path / "later.bin", 1, 1)  # nothing starts after stop
    release.set()
    assert digests.take(first, *versions[first]) == sha256_of(first)  # it had started
    assert digests.take(second, *versions[second]) is None  # dropped
    assert digests.take(tmp_path / "later.bin", 1, 1) is None
