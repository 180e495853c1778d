"""Small new files go in batches (``skyframe_transfer_batch``); everything else, and every file
that fails in a batch, goes one by one through ``skyframe_transfer``.

A test plugin gives local sinks a batch sender that writes through the sink's filesystem and
notes what it was given; another one notes the files that went one by one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WriteConfig, make_file, plugin_module, run_once, write_plugin

from skyframe.engine import Engine, RunSummary
from skyframe.jobs import QueuedJob
from skyframe.pipeline import load_project
from skyframe.queue import JobQueue
from skyframe.state import Manifest

CONFIG = """\
state_dir: .state
plugins: [plugins]
shutdown_grace: 0.2
retry: {max_attempts: 2, initial: 10ms, max: 10ms}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0}
    sinks:
      - url: outbox
"""

TWO_SINKS = CONFIG + "      - url: outbox2\n        name: second\n"

BATCHES = """
    import hashlib, os, threading, time
    from skyframe import TransferResult, hookimpl
    from skyframe.errors import DeliveryError

    BATCHES = []  # (sink key, [remote paths])
    SENDING = []  # (how, files in the call, the sink's count of files being sent then)
    ALONE = []  # (sink key, remote path) sent through skyframe_transfer
    STARTED = threading.Event()

    def send(requests):
        sink = requests[0].sink
        BATCHES.append((sink.key, [r.remote_path for r in requests]))
        SENDING.append(("batch", len(requests), sink.sending))
        STARTED.set()
        if os.environ.get("BATCH_TEST_RAISE"):
            raise ConnectionError("link down")
        if os.environ.get("BATCH_TEST_HOLD"):  # "sending" until the run is cut
            while True:
                try:
                    requests[0].pace(0)
                except Exception as exc:
                    return [exc] * len(requests)
                time.sleep(0.01)
        fail = os.environ.get("BATCH_TEST_FAIL", "").split(",")  # "sink:name,..."
        out = []
        for request in requests:
            if f"{sink.key}:{request.local_path.name}" in fail:
                out.append(DeliveryError("refused in a batch"))
                continue
            data = request.local_path.read_bytes()
            request.pace(len(data))
            sink.ensure_folder(request.remote_path.rpartition("/")[0])
            sink.fs.pipe_file(request.remote_path, data)
            out.append(TransferResult(len(data), hashlib.sha256(data).hexdigest()))
        return out

    @hookimpl
    def skyframe_transfer_batch(sink):
        return send if sink.protocol == "file" else None

    @hookimpl(tryfirst=True)
    def skyframe_transfer(request):
        ALONE.append((request.sink.key, request.remote_path))
        SENDING.append(("alone", 1, request.sink.sending))
        if request.local_path.name == os.environ.get("ALONE_TEST_FAIL"):
            raise DeliveryError("refused alone too")
        return None  # the generic transfer delivers it
"""


@pytest.fixture
def project(tmp_path: Path, write_config: WriteConfig) -> Callable[[str], Path]:
    write_plugin(tmp_path / "plugins", "batches.py", BATCHES)
    return write_config


def incoming(tmp_path: Path, *names: str) -> None:
    """Files in the source folder, each holding its own name."""
    for name in names:
        make_file(tmp_path / "incoming", name, name.encode())


def alone_names(tmp_path: Path, sink: str = "outbox") -> list[str]:
    recorder = plugin_module(tmp_path, "batches.py")
    return sorted(path.rpartition("/")[2] for key, path in recorder.ALONE if key == sink)


def test_small_new_files_go_in_batches_and_are_recorded(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    src = tmp_path / "incoming"
    small = {f"d{i % 3}/img{i:03d}.jpg": os.urandom(100 + i) for i in range(70)}
    for name, data in small.items():
        make_file(src, name, data)
    make_file(src, "video.mp4", os.urandom(2 * 1024 * 1024))  # over the batch limit
    summary = run_once(project(CONFIG))
    assert summary.ok
    assert summary.delivered == 71
    recorder = plugin_module(tmp_path, "batches.py")
    batched = [path for _, paths in recorder.BATCHES for path in paths]
    assert sorted(p.split("outbox/", 1)[1] for p in batched) == sorted(small)
    assert all(len(paths) <= 32 for _, paths in recorder.BATCHES)
    assert alone_names(tmp_path) == ["video.mp4"]
    for name, data in small.items():
        assert (tmp_path / "outbox" / name).read_bytes() == data
    manifest = Manifest(tmp_path / ".state" / "manifest")
    entries = {relpath: entry for _, _, relpath, entry in manifest.entries()}
    manifest.close()
    assert len(entries) == 71
    for name, data in small.items():
        st = (src / name).stat()
        entry = entries[name]
        assert (entry.size, entry.mtime_ns, entry.inode) == (len(data), st.st_mtime_ns, st.st_ino)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.remote == name
    queue = JobQueue(tmp_path / ".state" / "queue")
    assert queue.counts() == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
    queue.close()
    # Nothing is sent again: the scan finds every file in the manifest.
    again = run_once(project(CONFIG))
    assert (again.delivered, again.unchanged) == (0, 71)


def test_the_sink_counts_the_files_being_sent_to_it(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    # What a transfer may learn of the files going beside it (an S3 upload then leaves the
    # round trips of its answers to them): every file of a batch, and a file sent alone.
    incoming(tmp_path, *(f"img{i:02d}.jpg" for i in range(40)))
    make_file(tmp_path / "incoming", "video.mp4", os.urandom(2 * 1024 * 1024))
    assert run_once(project(CONFIG)).delivered == 41
    recorder = plugin_module(tmp_path, "batches.py")
    batches = [(count, sending) for how, count, sending in recorder.SENDING if how == "batch"]
    alone = [sending for how, _, sending in recorder.SENDING if how == "alone"]
    assert batches
    assert all(sending >= count for count, sending in batches), batches
    assert alone
    assert all(sending >= 1 for sending in alone), alone


def test_a_file_failing_in_a_batch_is_sent_again_alone(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    monkeypatch.setenv("BATCH_TEST_FAIL", "outbox:b.jpg")
    summary = run_once(project(CONFIG))
    assert summary.ok
    assert summary.delivered == 3
    assert alone_names(tmp_path) == ["b.jpg"]
    assert (tmp_path / "outbox" / "b.jpg").read_bytes() == b"b.jpg"


def test_a_batch_sender_that_raises_sends_each_file_alone(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming(tmp_path, "a.jpg", "b.jpg")
    monkeypatch.setenv("BATCH_TEST_RAISE", "1")
    summary = run_once(project(CONFIG))
    assert summary.ok
    assert summary.delivered == 2
    assert alone_names(tmp_path) == ["a.jpg", "b.jpg"]


def test_a_file_failing_on_one_sink_is_sent_again_there_only(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming(tmp_path, "a.jpg", "b.jpg")
    monkeypatch.setenv("BATCH_TEST_FAIL", "second:b.jpg")
    summary = run_once(project(TWO_SINKS))
    assert summary.ok
    assert summary.delivered == 4
    assert alone_names(tmp_path, "second") == ["b.jpg"]
    assert alone_names(tmp_path, "outbox") == []  # the first sink had it: not sent again
    assert (tmp_path / "outbox2" / "b.jpg").read_bytes() == b"b.jpg"


def test_touched_and_changed_files_take_the_one_by_one_path(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    src = tmp_path / "incoming"
    touched = make_file(src, "touched.jpg", b"same bytes")
    changed = make_file(src, "changed.jpg", b"old bytes")
    config = project(CONFIG)
    assert run_once(config).delivered == 2
    later = time.time() + 5
    os.utime(touched, (later, later))
    changed.write_bytes(b"new bytes, longer")
    summary = run_once(config)
    assert (summary.delivered, summary.unchanged) == (1, 1)
    recorder = plugin_module(tmp_path, "batches.py")
    assert recorder.BATCHES == []  # the touched one needs no transfer at all
    assert alone_names(tmp_path) == ["changed.jpg"]
    assert (tmp_path / "outbox" / "changed.jpg").read_bytes() == b"new bytes, longer"


def test_a_batch_cut_by_shutdown_goes_back_to_the_queue(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming(tmp_path, "a.jpg", "b.jpg")
    config = project(CONFIG)
    monkeypatch.setenv("BATCH_TEST_HOLD", "1")
    loaded = load_project(config)
    recorder = plugin_module(tmp_path, "batches.py")
    engine = Engine(loaded.config, loaded.pm, loaded.pipelines)
    outcome: dict[str, RunSummary] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", engine.run_once()))
    runner.start()
    try:
        assert recorder.STARTED.wait(10)
        engine.stop()  # the batch is still "sending": it is cut after shutdown_grace
        runner.join(10)
        assert not runner.is_alive()
    finally:
        engine.close()
    summary = outcome["summary"]
    assert summary.interrupted
    assert summary.delivered == 0
    queue = JobQueue(tmp_path / ".state" / "queue")
    assert queue.counts()["pending"] == 2
    assert all(record.attempts == 0 for record in queue.records())
    queue.close()
    monkeypatch.delenv("BATCH_TEST_HOLD")
    assert run_once(config).delivered == 2


def test_a_batch_the_manifest_cannot_record_is_retried_not_lost(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming(tmp_path, "a.jpg", "b.jpg")
    calls: list[int] = []
    original = Manifest.record_many

    def flaky(self: Manifest, entries: list[Any]) -> None:
        calls.append(len(entries))
        if len(calls) == 1:
            raise OSError("database is locked")
        original(self, entries)

    monkeypatch.setattr(Manifest, "record_many", flaky)
    summary = run_once(project(CONFIG))
    assert summary.ok  # the second attempt went through: nothing is left waiting or lost
    assert summary.delivered == 2
    assert calls[0] == 2  # the two files of the batch, recorded together
    recorder = plugin_module(tmp_path, "batches.py")
    sent = sorted(path.rpartition("/")[2] for _, paths in recorder.BATCHES for path in paths)
    assert sent == ["a.jpg", "a.jpg", "b.jpg", "b.jpg"]  # sent again: the first never recorded
    manifest = Manifest(tmp_path / ".state" / "manifest")
    assert sorted(relpath for _, _, relpath, _ in manifest.entries()) == ["a.jpg", "b.jpg"]
    manifest.close()


@pytest.mark.parametrize("where", ["sink", "global"])
def test_a_bandwidth_limit_keeps_files_one_by_one(
    tmp_path: Path, project: Callable[[str], Path], where: str
) -> None:
    # Paced file by file, as they are sent: a batch would take the budget of 32 files, then
    # send them all in one burst.
    incoming(tmp_path, "a.jpg", "b.jpg")
    if where == "sink":
        config = CONFIG.replace(
            "      - url: outbox\n", "      - url: outbox\n        bwlimit: 1MB/s\n"
        )
    else:
        config = "bwlimit: 1MB/s\n" + CONFIG
    summary = run_once(project(config))
    assert summary.delivered == 2
    assert plugin_module(tmp_path, "batches.py").BATCHES == []
    assert alone_names(tmp_path) == ["a.jpg", "b.jpg"]


def test_a_batch_that_arrives_marks_the_sink_reachable_again(
    tmp_path: Path, project: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    # The sink was down, and its wait (10 ms here) is over: the next batch goes out, and once
    # files arrive the sink is healthy again, as after a single transfer.
    from skyframe.errors import SinkUnavailableError

    incoming(tmp_path, "a.jpg", "b.jpg")
    loaded = load_project(project(CONFIG))
    engine = Engine(loaded.config, loaded.pm, loaded.pipelines)
    (sink,) = engine.pipelines["survey"].sinks
    sink.health.failed(SinkUnavailableError("outbox: link down"))
    time.sleep(0.05)
    caplog.set_level(logging.WARNING, logger="skyframe")
    try:
        summary = engine.run_once()
    finally:
        engine.close()
    assert summary.delivered == 2
    assert plugin_module(tmp_path, "batches.py").BATCHES  # it went as a batch
    assert sink.health.state == "ok"
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_a_one_shot_run_spends_no_attempt_before_an_away_sink_is_tried_again(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    # The sink went away (say, its check was cut by the link) and is tried again in 0.5 s:
    # the files' retries (10 ms here, 2 attempts) wait for that instead of being refused at
    # once until their attempts run out.
    from skyframe.errors import SinkUnavailableError
    from skyframe.storage import SinkHealth

    incoming(tmp_path, "a.jpg", "b.jpg")
    loaded = load_project(project(CONFIG))
    engine = Engine(loaded.config, loaded.pm, loaded.pipelines)
    (sink,) = engine.pipelines["survey"].sinks
    sink.health = SinkHealth(initial=0.5, maximum=0.5)
    sink.health.failed(SinkUnavailableError("outbox: link down"))
    try:
        summary = engine.run_once()
    finally:
        engine.close()
    assert (summary.delivered, summary.failed) == (2, {}), summary


# --- one-shot runs: batched files need no queue record (JobQueue.volatile) ------------------


def run_after_the_scan(config: Path, then: Callable[[Engine], object]) -> RunSummary:
    """A one-shot run whose gate opens once the scan is done (so every file it found has
    been handed out or queued), after calling ``then(engine)``."""
    loaded = load_project(config)
    engine = Engine(loaded.config, loaded.pm, loaded.pipelines)

    def gate() -> None:
        deadline = time.monotonic() + 10
        while engine._scanning and time.monotonic() < deadline:
            time.sleep(0.01)
        then(engine)

    engine.gate = gate
    try:
        return engine.run_once()
    finally:
        engine.close()


def counted_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths written to the queue (``JobQueue.put``) from now on."""
    put: list[str] = []
    original = JobQueue.put

    def counting(self: JobQueue, pipeline: str, job: QueuedJob, *args: object) -> bool:
        put.append(job.relpath)
        return original(self, pipeline, job, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(JobQueue, "put", counting)
    return put


def test_a_one_shot_run_writes_no_queue_record_for_the_files_it_batches(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    put = counted_puts(monkeypatch)
    incoming(tmp_path, *(f"img{i:02d}.jpg" for i in range(40)))
    make_file(tmp_path / "incoming", "video.mp4", os.urandom(2 * 1024 * 1024))
    summary = run_once(project(CONFIG))
    assert (summary.delivered, summary.ok) == (41, True)
    assert put == ["video.mp4"]  # over the batch limit: queued as always
    assert len(os.listdir(tmp_path / "outbox")) == 41


def test_a_batched_file_that_keeps_failing_ends_in_the_dead_letters(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_TEST_FAIL", "outbox:bad.jpg")
    monkeypatch.setenv("ALONE_TEST_FAIL", "bad.jpg")
    incoming(tmp_path, "good.jpg", "bad.jpg")
    summary = run_once(project(CONFIG))
    assert summary.delivered == 1
    assert summary.dead_letters == 1
    queue = JobQueue(tmp_path / ".state" / "queue")
    try:
        (record,) = queue.records("dead")
    finally:
        queue.close()
    assert record.relpath == "bad.jpg"
    assert record.attempts == 2  # max_attempts: each attempt alone counted
    assert all("refused alone too" in error for error in record.errors)
    # The next run leaves it with the dead letters, as for any job.
    monkeypatch.delenv("ALONE_TEST_FAIL")
    again = run_once(project(CONFIG))
    assert (again.delivered, again.dead_letters) == (0, 1)


def test_a_pause_before_the_first_batch_leaves_the_scanned_files_queued(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    names = [f"img{i:02d}.jpg" for i in range(10)]
    incoming(tmp_path, *names)
    summary = run_after_the_scan(project(CONFIG), lambda engine: engine.control.set(True, "survey"))
    assert (summary.delivered, summary.held) == (0, 10)
    assert not (tmp_path / "outbox").exists() or not os.listdir(tmp_path / "outbox")
    queue = JobQueue(tmp_path / ".state" / "queue")
    try:
        pending = queue.records("pending")
    finally:
        queue.close()
    assert sorted(r.relpath for r in pending) == names
    assert {r.attempts for r in pending} == {0}
    # Resumed, the next run delivers them from the queue.
    loaded = load_project(project(CONFIG))
    engine = Engine(loaded.config, loaded.pm, loaded.pipelines)
    engine.control.set(False, "survey")
    try:
        assert engine.run_once().delivered == 10
    finally:
        engine.close()


def test_beyond_the_backlog_the_scan_writes_queue_records(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory stays bounded on a first run over a huge folder: the files the scan finds while
    # VOLATILE_BACKLOG of them wait to be handed out are queued on disk as usual.
    import skyframe.dispatch
    import skyframe.intake

    monkeypatch.setattr(skyframe.dispatch, "VOLATILE_BACKLOG", 8)
    monkeypatch.setattr(skyframe.intake, "SCAN_BATCH", 4)
    put = counted_puts(monkeypatch)
    names = [f"img{i:02d}.jpg" for i in range(40)]
    incoming(tmp_path, *names)
    backlog: list[int] = []
    summary = run_after_the_scan(
        project(CONFIG), lambda engine: backlog.append(engine.dispatcher.volatile_waiting)
    )
    assert summary.delivered == 40
    assert backlog == [8]
    assert len(put) == 32
    assert sorted(os.listdir(tmp_path / "outbox")) == names


def test_a_batch_that_cannot_start_sends_each_file_alone(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyframe.delivery import JobRunner

    incoming(tmp_path, "a.jpg", "b.jpg")
    original = JobRunner._claim_remotes
    calls: list[int] = []

    def broken_once(self: JobRunner, sink: Any, runs: list[Any]) -> list[Any]:
        calls.append(len(runs))
        if len(calls) == 1:
            raise OSError("database is locked")
        return original(self, sink, runs)

    monkeypatch.setattr(JobRunner, "_claim_remotes", broken_once)
    summary = run_once(project(CONFIG))
    assert summary.ok  # nothing hangs or is lost: both went alone
    assert summary.delivered == 2
    assert alone_names(tmp_path) == ["a.jpg", "b.jpg"]
