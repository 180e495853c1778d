"""S3's own machinery against the real S3 server (SeaweedFS): the light client that signs and
sends small objects itself (``DirectS3``), the batch sender, the sinks' check, and the
payload signing that decides botocore's extra checksum.

The contract every sink kind meets is in ``test_sinks.py``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import (
    WriteConfig,
    batch_requests,
    make_file,
    one_sink_config,
    s3_sink,
    skyframe,
)

from skyframe.errors import SourceUnreadableError
from skyframe.storage import TransferRequest


def test_s3_small_objects_take_the_direct_put(tmp_path: Path, s3_server: servers.S3Server) -> None:
    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.protocols.s3.plugin import skyframe_transfer
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


def test_s3_batch_sends_small_files_at_once_and_reports_each(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.protocols.s3.plugin import skyframe_transfer_batch
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
    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.protocols.s3.plugin import skyframe_transfer_batch
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


def test_s3_check_is_ready_once_the_write_is_taken_the_rest_goes_on_beside_the_run(
    tmp_path: Path, s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's first files need not wait two more round trips (the size check and the delete)
    # once the sink took the check's write: the credentials, the bucket and the permission to
    # write are proven. The rest ends before the run does.
    from fakes.link import LinkEmulator

    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.storage import SinkChecks, open_sink

    answered: list[str] = []
    real = DirectS3._request

    def request(self: DirectS3, connection: Any, method: str, *args: Any) -> Any:
        out = real(self, connection, method, *args)
        answered.append(method)
        return out

    monkeypatch.setattr(DirectS3, "_request", request)
    with LinkEmulator(servers.LOOPBACK, s3_server.port, rtt=0.3).start() as link:
        entry = s3_sink(s3_server)
        entry["options"]["endpoint_url"] = f"http://{link.address}"
        sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
        check = s3_server.filesystem()
        try:
            checks = SinkChecks([sink])
            [(_, outcome)] = checks.ready(10)
            assert outcome is None
            assert answered == ["PUT"]  # a round trip of 0.3 s before the HEAD answers
            assert checks.finish(10)
            assert answered == ["PUT", "HEAD", "DELETE"]
            [(_, result)] = checks.results(0)
            assert not isinstance(result, BaseException), result
            assert check.find(sink.root.split("/")[0]) == []  # the probe object is gone
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
    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.protocols.s3.plugin import skyframe_transfer_batch
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
        assert "skyframe.protocols.s3.backend" in imported  # the log is the one expected
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
    from skyframe.config import SinkConfig
    from skyframe.protocols.s3.plugin import skyframe_transfer
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
    from skyframe.protocols.s3.backend import S3Options, signs_payload

    assert signs_payload(S3Options(endpoint_url="http://127.0.0.1:9000"))
    assert not signs_payload(S3Options(endpoint_url="http://127.0.0.1:9000", anon=True))
    assert not signs_payload(S3Options(endpoint_url="https://s3.example.org"))
    assert not signs_payload(S3Options())  # AWS, over HTTPS


def _model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads in which botocore reads one of its JSON models from disk (a cache miss)."""
    from botocore.loaders import JSONFileLoader

    threads: list[str] = []
    load_file = JSONFileLoader.load_file

    def recorded(self: Any, file_path: str) -> Any:
        threads.append(threading.current_thread().name)
        return load_file(self, file_path)

    monkeypatch.setattr(JSONFileLoader, "load_file", recorded)
    return threads


def test_s3_client_is_created_on_the_event_loop_with_its_models_loaded_before(
    tmp_path: Path, s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop carries every transfer in flight: botocore's models, read and parsed there
    # while s3fs created its client, held it for a tenth of a second or more.
    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink

    entry = s3_sink(s3_server)  # (the fixture's own client makes the bucket)
    loads = _model_loads(monkeypatch)
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    try:
        sink.fs.s3  # noqa: B018 - creates the client, on fsspec's event loop
        assert loads, "no model was read"
        assert "fsspecIO" not in loads, loads
        assert set(loads) == {threading.current_thread().name}
        sink.fs.pipe_file(sink.remote_path("a.txt"), b"a")
        assert sink.fs.cat_file(sink.remote_path("a.txt")) == b"a"
    finally:
        sink.close()


def test_s3_client_of_an_aiobotocore_without_the_warm_up_is_created_as_before(
    tmp_path: Path, s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiobotocore.session import AioSession

    from skyframe.config import SinkConfig
    from skyframe.storage import open_sink

    monkeypatch.delattr(AioSession, "warm_up_loader_caches")  # before aiobotocore 3.7
    entry = s3_sink(s3_server)
    loads = _model_loads(monkeypatch)
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    try:
        sink.fs.pipe_file(sink.remote_path("a.txt"), b"a")
        assert sink.fs.cat_file(sink.remote_path("a.txt")) == b"a"
        assert "fsspecIO" in loads  # the models are read where the client is created
    finally:
        sink.close()
