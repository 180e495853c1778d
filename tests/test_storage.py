"""Sinks: path confinement, URL handling, and the generic atomic transfer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import fsspec
import pytest
from helpers import make_file

from skyframe.config import SinkConfig
from skyframe.errors import (
    SkyframeError,
    SourceChangedError,
    SourceUnreadableError,
    UnsafePathError,
)
from skyframe.protocols.generic.plugin import skyframe_transfer
from skyframe.storage import (
    TEMP_MARKER,
    SinkChecks,
    TransferRequest,
    open_sink,
    redact_url,
    safe_relative_path,
    temporary_path,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpg", "a.jpg"),
        ("flight 01/DJI 0001.JPG", "flight 01/DJI 0001.JPG"),
        ("./a/./b//c.jpg", "a/b/c.jpg"),
        ("ünïcødé/航拍.jpg", "ünïcødé/航拍.jpg"),
        ("a/..b/c..", "a/..b/c.."),
    ],
)
def test_safe_relative_path_accepts(name: str, expected: str) -> None:
    assert safe_relative_path(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/..",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a\\..\\b",
        ".",
        "./",
    ],
)
def test_safe_relative_path_rejects(name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relative_path(name)


def test_sink_remote_path_is_confined(tmp_path: Path) -> None:
    sink = open_sink(SinkConfig(url="outbox"), tmp_path)
    assert sink.root == str(tmp_path / "outbox")
    assert sink.remote_path("a/b.jpg") == f"{tmp_path}/outbox/a/b.jpg"
    with pytest.raises(UnsafePathError):
        sink.remote_path("../../etc/passwd")


def test_memory_sink_and_redaction(tmp_path: Path) -> None:
    sink = open_sink(SinkConfig(url="memory://bucket/prefix"), tmp_path)
    assert sink.protocol == "memory"
    assert sink.remote_path("x.jpg") == "/bucket/prefix/x.jpg"
    assert redact_url("sftp://pilot:hunter2@host:2222/data") == "sftp://pilot:***@host:2222/data"
    assert redact_url("s3://bucket/x") == "s3://bucket/x"
    assert redact_url("sftp://u:p@NAS.Local:22/x") == "sftp://u:***@NAS.Local:22/x"
    assert redact_url("sftp://u:p@[::1]:22/x") == "sftp://u:***@[::1]:22/x"


def test_local_sink_takes_no_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes no options"):
        open_sink(SinkConfig(url="outbox", options={"key": "x"}), tmp_path)


def test_temporary_path_is_hidden_beside_target() -> None:
    tmp = temporary_path("root/flight/DJI_0001.JPG")
    assert tmp.startswith("root/flight/.DJI_0001.JPG" + TEMP_MARKER)
    assert tmp.endswith(".part")


def request_for(sink_url: str, base: Path, src: Path, name: str) -> TransferRequest:
    sink = open_sink(SinkConfig(url=sink_url), base)
    st = os.stat(src)
    return TransferRequest(sink, src, sink.remote_path(name), st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("url", ["outbox", "memory://skyframe-test/outbox"])
def test_generic_transfer_streams_and_hashes(tmp_path: Path, url: str, memory_fs: object) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    src = make_file(tmp_path, "src/big.bin", data)
    request = request_for(url, tmp_path, src, "nested/dir/big.bin")
    seen: list[int] = []
    request.progress = seen.append
    result = skyframe_transfer(request)
    fs = request.sink.fs
    assert fs.cat_file(request.remote_path) == data
    assert result.size == len(data)
    assert seen[-1] == len(data)
    assert fs.ls(os.path.dirname(request.remote_path), detail=False) == [request.remote_path]


def test_generic_transfer_is_atomic(tmp_path: Path) -> None:
    """While the upload runs, the final name does not exist; only the hidden temp file does."""
    src = make_file(tmp_path, "src/a.bin", os.urandom(3 * 1024 * 1024))
    request = request_for("outbox", tmp_path, src, "a.bin")
    observed: list[tuple[bool, list[str]]] = []
    folder = tmp_path / "outbox"

    def progress(done: int) -> None:
        observed.append((Path(request.remote_path).exists(), sorted(os.listdir(folder))))

    request.progress = progress
    skyframe_transfer(request)
    assert observed
    for final_exists, listing in observed:
        assert not final_exists
        assert len(listing) == 1
        assert listing[0].startswith(".a.bin" + TEMP_MARKER)
    assert os.listdir(folder) == ["a.bin"]


def test_transfer_detects_a_file_changing_while_read(tmp_path: Path) -> None:
    src = make_file(tmp_path, "src/growing.bin", os.urandom(3 * 1024 * 1024))
    request = request_for("outbox", tmp_path, src, "growing.bin")
    appended = threading.Event()

    def progress(done: int) -> None:
        if not appended.is_set():
            with src.open("ab") as f:
                f.write(b"more")
            appended.set()

    request.progress = progress
    with pytest.raises(SourceChangedError, match="changed while it was read"):
        skyframe_transfer(request)
    assert os.listdir(tmp_path / "outbox") == []  # no partial or temporary file left


def test_transfer_of_vanished_file(tmp_path: Path) -> None:
    src = make_file(tmp_path, "src/gone.bin", b"x")
    request = request_for("outbox", tmp_path, src, "gone.bin")
    src.unlink()
    with pytest.raises(SourceUnreadableError, match="vanished"):
        skyframe_transfer(request)


def test_transfer_of_unreadable_file(tmp_path: Path) -> None:
    src = make_file(tmp_path, "src/locked.bin", b"x")
    request = request_for("outbox", tmp_path, src, "locked.bin")
    # Root can read any file, so make the path unreadable in a way that holds for root too.
    src.unlink()
    src.mkdir()
    with pytest.raises(SourceUnreadableError, match="cannot read: not a regular file"):
        skyframe_transfer(request)


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    src = make_file(tmp_path, "src/a.txt", b"second version, shorter")
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "a.txt").write_bytes(b"first version that was longer" * 10)
    request = request_for("outbox", tmp_path, src, "a.txt")
    skyframe_transfer(request)
    assert (tmp_path / "outbox" / "a.txt").read_bytes() == b"second version, shorter"


def test_overwrite_is_one_rename_where_a_rename_does_not_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows's rename fails onto an existing file; shutil.move (fsspec's local mv) then
    # copies the file over the old one, where a reader or a cut meets it half written.
    real_rename = os.rename

    def windows_rename(src: str, dst: str, *args: object, **kwargs: object) -> None:
        if os.path.exists(dst):
            raise FileExistsError(183, "Cannot create a file when that file already exists", dst)
        real_rename(src, dst)

    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("the new version was copied over the old one")

    monkeypatch.setattr(os, "rename", windows_rename)
    monkeypatch.setattr("shutil.copyfile", no_copy)  # what shutil.move falls back on
    src = make_file(tmp_path, "src/a.txt", b"second version")
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "a.txt").write_bytes(b"first version")
    skyframe_transfer(request_for("outbox", tmp_path, src, "a.txt"))
    assert (tmp_path / "outbox" / "a.txt").read_bytes() == b"second version"
    assert sorted(os.listdir(tmp_path / "outbox")) == ["a.txt"]


def test_fsspec_memory_is_reset(memory_fs: fsspec.AbstractFileSystem) -> None:
    assert memory_fs.ls("/", detail=False) == []


def test_threads_waiting_on_a_failing_connect_fail_at_once() -> None:
    # A server that hangs until the connect timeout: the first thread waits it out; the others,
    # queued behind it, must not each wait the whole timeout again.
    from skyframe.errors import SinkUnavailableError
    from skyframe.protocols.endpoint import Endpoint
    from skyframe.storage import Sink, SinkHealth

    attempts: list[float] = []

    def connect() -> fsspec.AbstractFileSystem:
        attempts.append(0.0)
        threading.Event().wait(0.3)  # the "timeout"
        raise ConnectionRefusedError("refused")

    def classify(exc: BaseException) -> SinkUnavailableError | None:
        return SinkUnavailableError(f"cannot reach: {exc}")

    endpoint = Endpoint("test", "root", connect, classify)
    sink = Sink("t", "test://root", endpoint, health=SinkHealth(initial=30, maximum=60))
    errors: list[BaseException] = []

    def use() -> None:
        try:
            _ = sink.fs
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(attempts) == 1
    assert len(errors) == 6
    assert sink.health.state == "offline"
    assert sum(isinstance(e, SinkUnavailableError) for e in errors) == 5


def test_a_sink_tells_since_when_one_file_has_it_alone_and_wakes_who_waits_for_that() -> None:
    from concurrent.futures import Future

    from skyframe.protocols.endpoint import Endpoint
    from skyframe.storage import Sink

    sink = Sink("t", "memory://x", Endpoint("memory", "/x", lambda: fsspec.filesystem("memory")))
    assert sink.alone_since == 0.0
    answer: Future[None] = Future()
    with sink.sending_files():  # the video
        assert sink.alone_since == 0.0
        photos = sink.sending_files(3)
        photos.__enter__()
        assert sink.alone_since is None
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(sink.wait_alone(answer)))
        waiter.start()
        time.sleep(0.1)
        assert woke == []
        before = time.monotonic()
        photos.__exit__(None, None, None)
        waiter.join(5)
        assert woke == [True]  # the photos are done: the video has the link
        assert sink.alone_since is not None
        assert sink.alone_since >= before
        with sink.sending_files():
            waiter = threading.Thread(target=lambda: woke.append(sink.wait_alone(answer)))
            waiter.start()
            time.sleep(0.1)
            answer.set_result(None)  # the part is answered first
            waiter.join(5)
            assert woke == [True, False]
    assert sink.wait_alone(answer)


def test_failures_within_one_wait_count_once() -> None:
    from skyframe.errors import SinkUnavailableError
    from skyframe.storage import SinkHealth

    health = SinkHealth(initial=10, maximum=300)
    for _ in range(16):  # sixteen transfers in flight when the link drops
        health.failed(SinkUnavailableError("gone"))
    assert health.failures == 1
    assert 5 <= health.wait() <= 10
    with pytest.raises(SinkUnavailableError):
        health.admit()
    assert health.succeeded()
    assert health.state == "ok"
    assert health.wait() == 0


def test_sink_checks_are_ready_once_the_write_is_taken_and_report_a_later_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = open_sink(SinkConfig(url="memory://checks/late"), tmp_path)
    fs = sink.fs
    release = threading.Event()

    def size(path: str) -> int:
        assert release.wait(5)
        return 0  # not what was written

    monkeypatch.setattr(fs, "size", size)
    late: list[tuple[object, BaseException]] = []
    checks = SinkChecks([sink], late=lambda s, exc: late.append((s, exc)))
    [(checked, outcome)] = checks.ready(5)
    assert checked is sink
    assert outcome is None  # the write was taken; the size check still waits
    assert not checks.finish(0.05)
    release.set()
    assert checks.finish(5)
    [(checked, error)] = late
    assert checked is sink
    assert "wrote 21 bytes but the sink reports 0" in str(error)
    assert fs.find("/checks/late") == []  # the check's object is removed all the same
    # Collected in full, the same check gives its error.
    [(_, result)] = checks.results(5)
    assert result is error


def test_sink_checks_give_a_refused_write_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = open_sink(SinkConfig(url="memory://checks/refused"), tmp_path)

    def refuse(path: str, value: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sink.fs, "pipe_file", refuse)
    late: list[tuple[object, BaseException]] = []
    [(_, outcome)] = SinkChecks([sink], late=lambda s, exc: late.append((s, exc))).ready(5)
    assert isinstance(outcome, PermissionError | SkyframeError), outcome
    assert late == []


def test_sink_checks_finish_waits_only_for_checks_that_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sink that never answers the write leaves nothing to remove: the end of a run does not
    # wait for its check (it waited for the first files already).
    sink = open_sink(SinkConfig(url="memory://checks/hung"), tmp_path)
    release = threading.Event()

    def hang(path: str, value: bytes) -> None:
        assert release.wait(10)

    monkeypatch.setattr(sink.fs, "pipe_file", hang)
    checks = SinkChecks([sink])
    try:
        began = time.monotonic()
        assert checks.finish(5)
        assert time.monotonic() - began < 1
    finally:
        release.set()
    assert checks.finish(5)
