"""One contract, every backend: local, memory, and real S3, SFTP, GCS and Azure servers.

Each test runs skyframe end to end (config file, engine, transfer plugins) and checks the
result through a separate client of the storage, never through skyframe's own connection.
One backend's own machinery is tested apart: ``test_s3_client.py``, ``test_gcs_batch.py``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import servers
from helpers import (
    Daemon,
    WriteConfig,
    azure_sink,
    gcs_sink,
    make_file,
    one_sink_config,
    run_once,
    s3_sink,
    sftp_sink,
    wait_for,
)

from skyframe.errors import SourceChangedError
from skyframe.markers import hookimpl
from skyframe.storage import TEMP_MARKER, TransferRequest

KINDS = ["local", "memory", "s3", "sftp", "gcs", "azure"]


@dataclass
class Target:
    """A sink under test, and an independent client to look at what landed there."""

    kind: str
    sink: dict[str, Any]
    fs: Any
    root: str

    def files(self) -> dict[str, bytes]:
        """Every object under the sink root (relative name -> bytes)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        files = {}
        for path in found:
            try:
                files[path.removeprefix(prefix)] = self.fs.cat_file(path)
            except FileNotFoundError:  # a temporary name renamed into place since the listing
                continue
        return files

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(f"{self.root}/{name}"))


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind = request.param
    if kind == "local":
        yield Target(kind, {"url": "outbox"}, fsspec.filesystem("file"), str(tmp_path / "outbox"))
        return
    if kind == "memory":
        name = f"contract-{uuid.uuid4().hex[:8]}"
        fs = fsspec.filesystem("memory")
        yield Target(kind, {"url": f"memory://{name}"}, fs, f"/{name}")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
        return
    if kind == "s3":
        server: Any = request.getfixturevalue("s3_server")
        sink = s3_sink(server)
        fs = server.filesystem()
        root = sink["url"].removeprefix("s3://")
    elif kind == "sftp":
        server = request.getfixturevalue("sftp_server")
        sink = sftp_sink(server)
        fs = server.filesystem()
        root = sink["url"].split(str(server.port), 1)[1]
    elif kind == "azure":
        server = request.getfixturevalue("azurite_server")
        sink = azure_sink(server)
        fs = server.filesystem()
        root = sink["url"].removeprefix("az://")
    else:
        server = request.getfixturevalue("gcs_server")
        sink = gcs_sink(server)
        import gcsfs

        fs = gcsfs.GCSFileSystem(
            token="anon", endpoint_url=server.endpoint_url, skip_instance_cache=True
        )
        root = sink["url"].removeprefix("gcs://")
    try:
        yield Target(kind, sink, fs, root)
    finally:
        servers.close_filesystem(fs)


def config_text(sink: dict[str, Any]) -> str:
    return one_sink_config(
        sink, pipeline="drone", retry="{max_attempts: 2, initial: 0.1, max: 0.2}"
    )


NAMES = {
    "a.jpg": os.urandom(3000),
    "flight 07/IMG 0001.JPG": os.urandom(5000),  # spaces
    "vol/été/Ünïcode-ß-日本.tif": os.urandom(2000),  # non-ASCII
    "deep/er/and/deeper/log.bin": os.urandom(70_000),  # nested
    "empty.txt": b"",  # empty file
}


def test_deliver_nested_unicode_spaces_and_empty(
    tmp_path: Path, write_config: WriteConfig, target: Target
) -> None:
    for name, data in NAMES.items():
        make_file(tmp_path / "incoming", name, data)
    config = write_config(config_text(target.sink))
    summary = run_once(config)
    assert summary.ok, summary
    assert target.files() == NAMES
    # A second run finds everything in the manifest: nothing is sent, nothing is listed.
    again = run_once(config)
    assert again.ok
    assert again.delivered == 0
    assert target.files() == NAMES


def test_overwrite_replaces_the_object(
    tmp_path: Path, write_config: WriteConfig, target: Target
) -> None:
    path = make_file(tmp_path / "incoming", "f/x.bin", b"first version")
    config = write_config(config_text(target.sink))
    assert run_once(config).ok
    path.write_bytes(b"second, longer version")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000))
    summary = run_once(config)
    assert summary.ok
    assert summary.delivered == 1
    assert target.files() == {"f/x.bin": b"second, longer version"}


class VisibilityProbe:
    """Wraps every transfer: at each progress report, the final name must not be visible."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.checks = 0
        self.visible_early: list[str] = []

    @hookimpl(wrapper=True)
    def skyframe_transfer(self, request: TransferRequest) -> Any:
        original = request.progress
        name = request.remote_path.removeprefix(request.sink.root).lstrip("/")

        def progress(done: int) -> None:
            if done < request.size:
                self.checks += 1
                if self.target.exists(name):
                    self.visible_early.append(name)
            original(done)

        request.progress = progress
        return (yield)


def small_parts(target: Target) -> dict[str, Any]:
    """The target's sink with the smallest parts or chunks, so that a file takes several."""
    extra: dict[str, Any] = {}
    if target.kind == "s3":
        extra = {"part_size": "5MiB", "part_concurrency": 1}
    elif target.kind == "gcs":
        extra = {"chunk_size": "1MiB"}
    return {**target.sink, "options": {**target.sink.get("options", {}), **extra}}


def test_no_partial_object_is_ever_visible(
    tmp_path: Path, write_config: WriteConfig, target: Target
) -> None:
    size = 12 * 1024 * 1024 + 123  # several parts (S3), chunks (GCS) and writes (others)
    data = os.urandom(size)
    make_file(tmp_path / "incoming", "big/video.mp4", data)
    sink = small_parts(target)
    probe = VisibilityProbe(Target(target.kind, sink, target.fs, target.root))
    config = write_config(config_text(sink))
    assert run_once(config, probe).ok
    assert probe.checks >= 1, "the transfer reported no progress before the end"
    assert probe.visible_early == []
    assert target.files() == {"big/video.mp4": data}


def test_failed_upload_leaves_nothing(
    tmp_path: Path, write_config: WriteConfig, target: Target
) -> None:
    # The file changes while it is read: the upload is abandoned; no object, no temporary.
    data = os.urandom(11 * 1024 * 1024)
    path = make_file(tmp_path / "incoming", "changing.bin", data)
    sink = small_parts(target)
    changed = threading.Event()
    seen_after_abandon: list[dict[str, bytes]] = []

    class Changer:
        @hookimpl(wrapper=True)
        def skyframe_transfer(self, request: TransferRequest) -> Any:
            original = request.progress

            def progress(done: int) -> None:
                if not changed.is_set():
                    changed.set()
                    with path.open("ab") as f:
                        f.write(b"more")
                original(done)

            request.progress = progress
            try:
                return (yield)
            except SourceChangedError:
                # What the sink holds right after the abandoned attempt.
                seen_after_abandon.append(target.files())
                raise

    config = write_config(config_text(sink))
    run_once(config, Changer())
    assert changed.is_set()
    assert seen_after_abandon == [{}]  # no object (not even a partial one), no temporary
    # Read again once settled: the second attempt delivers the new content in full.
    assert target.files() == {"changing.bin": data + b"more"}
    leftovers = [n for n in target.files() if TEMP_MARKER in n]
    assert leftovers == []


# --- daemon: moves and deletes --------------------------------------------------------------


def test_moves_and_opt_in_deletes(
    tmp_path: Path, write_config: WriteConfig, target: Target
) -> None:
    config = write_config(config_text({**target.sink, "on_delete": "delete"}))
    incoming = tmp_path / "incoming"
    with Daemon(config) as running:
        a = make_file(incoming, "in/a.jpg", b"A" * 1000)
        b = make_file(incoming, "in/b.jpg", b"B" * 1000)
        wait_for(
            lambda: target.files() == {"in/a.jpg": b"A" * 1000, "in/b.jpg": b"B" * 1000},
            what="upload",
            timeout=20,
        )
        # Objects land a moment before the manifest records them: wait for the records.
        manifest = running.engine.manifest
        wait_for(lambda: len(manifest.entries()) == 2, what="manifest records", timeout=20)
        a.rename(incoming / "in" / "a renamed.jpg")
        wait_for(
            lambda: target.files() == {"in/a renamed.jpg": b"A" * 1000, "in/b.jpg": b"B" * 1000},
            what="remote move",
            timeout=20,
        )
        b.unlink()
        wait_for(
            lambda: target.files() == {"in/a renamed.jpg": b"A" * 1000},
            what="remote delete",
            timeout=20,
        )
