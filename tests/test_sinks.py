"""One contract, every backend: local, memory, and real S3, SFTP and GCS servers.

Each test runs skyframe end to end (config file, engine, transfer plugins) and checks the
result through a separate client of the storage, never through skyframe's own connection.
"""

from __future__ import annotations

import hashlib
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
from conftest import (
    Running,
    WriteConfig,
    azure_sink,
    gcs_sink,
    make_file,
    one_sink_config,
    s3_sink,
    sftp_sink,
    wait_for,
)

from skyframe.engine import Engine, RunSummary
from skyframe.errors import SourceChangedError, SourceUnreadableError
from skyframe.markers import hookimpl
from skyframe.pipeline import load_project
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


def run_once(config: Path, *plugins: object) -> RunSummary:
    project = load_project(config)
    for plugin in plugins:
        project.pm.register(plugin)
    engine = Engine(project.config, project.pm, project.pipelines)
    try:
        return engine.run_once()
    finally:
        engine.close()


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
    project = load_project(config)
    project.pm.register(Changer())
    engine = Engine(project.config, project.pm, project.pipelines)
    try:
        engine.run_once()
    finally:
        engine.close()
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
    with Running(config) as running:
        a = make_file(incoming, "in/a.jpg", b"A" * 1000)
        b = make_file(incoming, "in/b.jpg", b"B" * 1000)
        wait_for(
            lambda: target.files() == {"in/a.jpg": b"A" * 1000, "in/b.jpg": b"B" * 1000}, "upload"
        )
        # Objects land a moment before the manifest records them: wait for the records.
        manifest = running.engine.manifest
        wait_for(lambda: len(manifest.entries()) == 2, "manifest records")
        a.rename(incoming / "in" / "a renamed.jpg")
        wait_for(
            lambda: target.files() == {"in/a renamed.jpg": b"A" * 1000, "in/b.jpg": b"B" * 1000},
            "remote move",
        )
        b.unlink()
        wait_for(lambda: target.files() == {"in/a renamed.jpg": b"A" * 1000}, "remote delete")


def test_s3_small_objects_take_the_direct_put(tmp_path: Path, s3_server: servers.S3Server) -> None:
    from skyframe.backends.s3 import DirectS3
    from skyframe.builtin.transfer_s3 import skyframe_transfer
    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink

    config = SinkConfig.model_validate(s3_sink(s3_server))
    sink = open_sink(config, tmp_path)
    names = ["plain.jpg", "flight 07/IMG 0001.JPG", "été/日本 ~+%&.tif"]
    check = s3_server.filesystem()
    try:
        for name in names:
            path = make_file(tmp_path / "src", name, os.urandom(1000))
            st = path.stat()
            request = TransferRequest(
                sink, path, sink.remote_path(name), st.st_size, st.st_mtime_ns
            )
            result = skyframe_transfer(request)
            assert result is not None
            head = check.call_s3(
                "head_object",
                Bucket=sink.root.split("/")[0],
                Key=request.remote_path.split("/", 1)[1],
            )
            assert head["Metadata"] == {"sha256": result.sha256}
            assert check.cat_file(request.remote_path) == path.read_bytes()
        direct = sink.endpoint.direct
        assert isinstance(direct, DirectS3)
        assert (direct.sent, direct.declined) == (len(names), 0)
    finally:
        servers.close_filesystem(check)
        sink.close()


def batch_requests(sink: Any, root: Path, files: dict[str, bytes]) -> list[TransferRequest]:
    """Files written under root, as requests to send them to the same names on the sink."""
    requests = []
    for name, data in files.items():
        path = make_file(root, name, data)
        st = path.stat()
        requests.append(
            TransferRequest(sink, path, sink.remote_path(name), st.st_size, st.st_mtime_ns)
        )
    return requests


def test_s3_batch_sends_small_files_at_once_and_reports_each(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    from skyframe.backends.s3 import DirectS3
    from skyframe.builtin.transfer_s3 import skyframe_transfer_batch
    from skyframe.config import SinkConfig
    from skyframe.storage import TransferResult, open_sink

    sink = open_sink(SinkConfig.model_validate(s3_sink(s3_server)), tmp_path)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    names = [f"batch/{i:02d} é.jpg" for i in range(40)] + ["batch/gone.jpg"]
    requests = batch_requests(sink, tmp_path / "src", {name: os.urandom(500) for name in names})
    (tmp_path / "src" / "batch" / "gone.jpg").unlink()
    check = s3_server.filesystem()
    try:
        outcomes = send(requests)
        assert isinstance(outcomes[-1], SourceUnreadableError)
        for request, outcome in zip(requests[:-1], outcomes[:-1], strict=True):
            assert isinstance(outcome, TransferResult)
            data = request.local_path.read_bytes()
            assert outcome == TransferResult(len(data), hashlib.sha256(data).hexdigest())
            assert check.cat_file(request.remote_path) == data
            bucket, _, key = request.remote_path.partition("/")
            head = check.call_s3("head_object", Bucket=bucket, Key=key)
            assert head["Metadata"] == {"sha256": outcome.sha256}
        assert not check.exists(requests[-1].remote_path)
        direct = sink.endpoint.direct
        assert isinstance(direct, DirectS3)
        assert (direct.sent, direct.declined) == (40, 0)
        assert sink._fs is None  # credentials from the options: s3fs was never needed
    finally:
        servers.close_filesystem(check)
        sink.close()


def test_s3_batch_to_a_missing_bucket_gives_each_file_the_error(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    # The direct PUT is declined: each file is then tried through s3fs, whose error is the one
    # reported, for the one-by-one path to classify (SeaweedFS answers this identity with
    # AccessDenied, which the sink's check then explains as a missing bucket).
    from skyframe.backends.s3 import DirectS3
    from skyframe.builtin.transfer_s3 import skyframe_transfer_batch
    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink

    options = s3_sink(s3_server, key=s3_server.writer_key, secret=s3_server.writer_secret)
    config = SinkConfig.model_validate({**options, "url": "s3://no-such-bucket-here/drop"})
    sink = open_sink(config, tmp_path)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    requests = batch_requests(sink, tmp_path / "src", {"a.jpg": b"data", "b.jpg": b"data"})
    try:
        outcomes = send(requests)
        assert all(isinstance(outcome, PermissionError) for outcome in outcomes), outcomes
        direct = sink.endpoint.direct
        assert isinstance(direct, DirectS3)
        assert (direct.sent, direct.declined) == (0, 2)
    finally:
        sink.close()


def test_s3_check_with_the_options_credentials_needs_no_s3_library(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink, probe_sink

    sink = open_sink(SinkConfig.model_validate(s3_sink(s3_server)), tmp_path)
    check = s3_server.filesystem()
    try:
        result = probe_sink(sink)
        assert result.connect > 0
        assert result.write > 0
        assert sink._fs is None  # written, checked and deleted by the light client
        assert check.find(sink.root.split("/")[0]) == []  # the probe object is gone
        direct = sink.endpoint.direct
        assert direct is not None
        sink.close()  # `skyframe check` closes right away: the session opened meanwhile too
        assert getattr(direct, "_session", "missing") is None
    finally:
        servers.close_filesystem(check)
        sink.close()


def test_s3_check_the_light_client_cannot_pass_is_reported_by_the_regular_one(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    from skyframe.config import SinkConfig
    from skyframe.errors import SinkRefusedError
    from skyframe.storage import open_sink, probe_sink

    entry = s3_sink(s3_server, secret="not-the-secret")
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    try:
        direct = sink.endpoint.direct
        assert direct is not None
        assert direct.probe(sink.remote_path(".probe"), b"data") is None
        refused = pytest.raises(SinkRefusedError, match=r"access denied \(SignatureDoesNotMatch\)")
        with refused, sink.guard(report=False):
            probe_sink(sink)
        assert sink._fs is not None  # the error came from s3fs, classified as before
    finally:
        sink.close()


def test_s3_check_of_a_server_nothing_answers_is_reported_at_once(tmp_path: Path) -> None:
    # Nothing listens there: the light client says so itself, rather than leaving the regular
    # probe to wait as long again to say the same.
    from skyframe.config import SinkConfig
    from skyframe.errors import SinkUnavailableError
    from skyframe.storage import open_sink, probe_sink

    port = servers.free_port()
    entry = {
        "url": "s3://bucket/drop",
        "options": {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"},
    }
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    began = time.monotonic()
    try:
        unreachable = pytest.raises(
            SinkUnavailableError,
            match=rf"^s3://bucket/drop: cannot reach the server: could not connect to "
            rf"http://127\.0\.0\.1:{port}: Connection refused$",
        )
        with unreachable, sink.guard(report=False):
            probe_sink(sink)
        assert sink._fs is None
        assert sink.health.state == "offline"
        assert time.monotonic() - began < 5
    finally:
        sink.close()


def test_s3_direct_put_takes_the_environments_credentials_from_the_client(
    tmp_path: Path, s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without key and secret in the options, botocore finds the credentials (here in the
    # environment): the direct PUT signs with the connected client's, and the check takes the
    # regular path.
    from skyframe.backends.s3 import DirectS3
    from skyframe.builtin.transfer_s3 import skyframe_transfer_batch
    from skyframe.config import SinkConfig
    from skyframe.storage import TransferResult, open_sink, probe_sink

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    entry = s3_sink(s3_server)
    entry["options"] = {"endpoint_url": s3_server.endpoint_url}
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    direct = sink.endpoint.direct
    assert isinstance(direct, DirectS3)
    assert direct.static is None
    check = s3_server.filesystem()
    try:
        probe_sink(sink)
        assert sink._fs is not None
        send = skyframe_transfer_batch(sink)
        assert send is not None
        files = {f"env/{i}.jpg": os.urandom(300) for i in range(5)}
        outcomes = send(batch_requests(sink, tmp_path / "src", files))
        assert all(isinstance(outcome, TransferResult) for outcome in outcomes), outcomes
        assert (direct.sent, direct.declined) == (5, 0)
        for name, data in files.items():
            assert check.cat_file(sink.remote_path(name)) == data
    finally:
        servers.close_filesystem(check)
        sink.close()


def test_s3_one_shot_run_of_small_files_never_loads_the_s3_library(
    tmp_path: Path, s3_server: servers.S3Server, write_config: WriteConfig
) -> None:
    # `check` and `run --once` in a subprocess, with Python's import log: with the credentials
    # in the options, neither the check nor small files load s3fs, aiobotocore or botocore.
    from test_cli import skyframe

    sink = s3_sink(s3_server)
    retry = "{max_attempts: 1, initial: 0.1, max: 0.1}"
    config = write_config(one_sink_config(sink, pipeline="field", retry=retry, settle="0"))
    for i in range(3):
        make_file(config.parent / "incoming", f"f{i}.jpg", os.urandom(2000))
    heavy = {"s3fs", "aiobotocore", "botocore"}
    for args in (["check"], ["run", "--once"]):
        done = skyframe(tmp_path, *args, str(config), env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0, done.stderr
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in done.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "skyframe.backends.s3" in imported  # the log is the one expected
        assert not heavy & imported, (args, heavy & imported)
    check = s3_server.filesystem()
    try:
        bucket_root = sink["url"].removeprefix("s3://")
        assert sorted(check.find(bucket_root)) == [f"{bucket_root}/f{i}.jpg" for i in range(3)]
    finally:
        servers.close_filesystem(check)


def test_s3_parts_over_plain_http_carry_no_extra_checksum(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    # Each signed request over plain HTTP carries its payload's sha256, which the server
    # checks: botocore's default CRC32 of every part would be computed (and checked) twice.
    from skyframe.builtin.transfer_s3 import skyframe_transfer
    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink

    entry = s3_sink(s3_server, part_size="5MiB", part_concurrency=1)
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    sent: list[dict[str, bytes]] = []

    def note(request: Any, **kwargs: Any) -> None:
        sent.append({name.lower(): value for name, value in request.headers.items()})

    sink.fs.s3.meta.events.register("before-send.s3.UploadPart", note)
    data = os.urandom(6 * 1024 * 1024)
    path = make_file(tmp_path / "src", "big.bin", data)
    st = path.stat()
    request = TransferRequest(sink, path, sink.remote_path("big.bin"), st.st_size, st.st_mtime_ns)
    check = s3_server.filesystem()
    try:
        result = skyframe_transfer(request)
        assert result is not None
        assert check.cat_file(request.remote_path) == data
        assert len(sent) == 2
        for headers in sent:
            assert len(headers["x-amz-content-sha256"]) == 64  # the signed payload
            assert not [name for name in headers if "checksum" in name], headers
    finally:
        servers.close_filesystem(check)
        sink.close()


def test_s3_payload_signing_decides_the_extra_checksum() -> None:
    from skyframe.backends.s3 import S3Options, signs_payload

    assert signs_payload(S3Options(endpoint_url="http://127.0.0.1:9000"))
    assert not signs_payload(S3Options(endpoint_url="http://127.0.0.1:9000", anon=True))
    assert not signs_payload(S3Options(endpoint_url="https://s3.example.org"))
    assert not signs_payload(S3Options())  # AWS, over HTTPS


def test_gcs_batch_sends_small_files_at_once_and_reports_each(
    tmp_path: Path, gcs_server: servers.GCSServer
) -> None:
    from skyframe.builtin.transfer_gcs import skyframe_transfer_batch
    from skyframe.config import SinkConfig
    from skyframe.storage import TransferResult, open_sink

    sink = open_sink(SinkConfig.model_validate(gcs_sink(gcs_server)), tmp_path)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    files = {f"batch/{i:02d} é.jpg": os.urandom(700) for i in range(20)}
    files |= {"batch/gone.jpg": b"gone", "batch/empty.jpg": b""}
    requests = batch_requests(sink, tmp_path / "src", files)
    (tmp_path / "src" / "batch" / "gone.jpg").unlink()
    check = gcs_server.filesystem()
    try:
        outcomes = send(requests)
        assert isinstance(outcomes[-2], SourceUnreadableError)
        assert not check.exists(requests[-2].remote_path)
        for request, outcome in zip(requests, outcomes, strict=True):
            if request is requests[-2]:
                continue
            data = request.local_path.read_bytes()
            assert outcome == TransferResult(len(data), hashlib.sha256(data).hexdigest())
            assert check.cat_file(request.remote_path) == data
            assert check.info(request.remote_path)["metadata"] == {"sha256": outcome.sha256}
    finally:
        servers.close_filesystem(check)
        sink.close()
