"""The one-shot engine on local and memory sinks: delivery, manifest, retries, dead letters."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fakes.recorder import Recorder
from helpers import WriteConfig, make_file, plugin_module, run_once, tree_files, write_plugin

from skyframe.engine import Engine
from skyframe.errors import ConfigError, StateError
from skyframe.events import FileEvent
from skyframe.jobs import Upload
from skyframe.pipeline import load_project
from skyframe.queue import JobQueue
from skyframe.state import Manifest
from skyframe.storage import TEMP_MARKER

CONFIG = """\
state_dir: .state
plugins: [plugins]
retry: {max_attempts: 3, initial: 10ms, max: 50ms}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0}
    rules:
      - ignore: {patterns: ["*.bak"]}
      - type: {extensions: [jpg, mp4, srt]}
    processes: []
    sinks:
      - url: outbox
"""


@pytest.fixture
def project(tmp_path: Path, write_config: WriteConfig) -> Callable[[str], Path]:
    (tmp_path / "plugins").mkdir(exist_ok=True)

    def make(config: str = CONFIG) -> Path:
        return write_config(config)

    return make


def test_once_delivers_accepted_files_identically(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    src = tmp_path / "incoming"
    wanted = {
        "DJI_0001.JPG": os.urandom(5000),
        "flight 2/DJI_0002.MP4": os.urandom(3 * 1024 * 1024),
        "flight 2/sub/航拍.jpg": b"unicode",
        "empty.srt": b"",
    }
    for rel, data in wanted.items():
        make_file(src, rel, data)
    make_file(src, "notes.txt", b"rejected by type")
    make_file(src, "old.jpg.bak", b"rejected by ignore")
    make_file(src, "video.mp4.part", b"rejected by default ignores")

    summary = run_once(project(CONFIG))

    assert summary.ok
    assert summary.delivered == 4
    assert summary.rejected == {"type": 1, "ignore": 2}
    assert tree_files(tmp_path / "outbox") == wanted
    manifest = Manifest(tmp_path / ".state" / "manifest")
    entries = {rel: entry for _, _, rel, entry in manifest.entries()}
    manifest.close()
    assert set(entries) == set(wanted)
    for rel, entry in entries.items():
        st = os.stat(src / rel)
        assert (entry.size, entry.mtime_ns, entry.remote) == (st.st_size, st.st_mtime_ns, rel)
        import hashlib

        assert entry.sha256 == hashlib.sha256(wanted[rel]).hexdigest()


def test_second_run_sends_nothing_unchanged(tmp_path: Path, project: Callable[[str], Path]) -> None:
    src = tmp_path / "incoming"
    make_file(src, "a.jpg", b"one")
    make_file(src, "b.jpg", b"two")
    config = project(CONFIG)
    assert run_once(config).delivered == 2
    out = tmp_path / "outbox" / "a.jpg"
    before = out.stat().st_mtime_ns
    time.sleep(0.01)

    second = run_once(config)
    assert (second.delivered, second.unchanged, second.queued) == (0, 2, 0)
    assert out.stat().st_mtime_ns == before


def test_changed_file_is_sent_again_touched_file_is_not(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    src = tmp_path / "incoming"
    changed = make_file(src, "changed.jpg", b"v1")
    touched = make_file(src, "touched.jpg", b"same")
    config = project(CONFIG)
    run_once(config)
    out_touched = tmp_path / "outbox" / "touched.jpg"
    before = out_touched.stat().st_mtime_ns
    time.sleep(0.01)
    changed.write_bytes(b"version 2")
    os.utime(touched)  # new mtime, same bytes

    summary = run_once(config)
    assert summary.delivered == 1
    assert (tmp_path / "outbox" / "changed.jpg").read_bytes() == b"version 2"
    assert out_touched.stat().st_mtime_ns == before
    manifest = Manifest(tmp_path / ".state" / "manifest")
    assert manifest.is_delivered("survey", "outbox", "touched.jpg", 4, touched.stat().st_mtime_ns)
    manifest.close()


def test_memory_sink(
    tmp_path: Path, project: Callable[[str], Path], memory_fs: fsspec.AbstractFileSystem
) -> None:
    make_file(tmp_path / "incoming", "x/DJI_1.JPG", b"jpeg")
    summary = run_once(project(CONFIG.replace("url: outbox", "url: memory://skyframe-test/out")))
    assert summary.delivered == 1
    assert memory_fs.cat_file("/skyframe-test/out/x/DJI_1.JPG") == b"jpeg"


FAILING_TRANSFER = """
    from skyframe import hookimpl

    CALLS = []

    @hookimpl
    def skyframe_transfer(request):
        if request.sink.key == "broken":
            CALLS.append(request.remote_path)
            raise ConnectionError("link down")
        return None  # let the generic transfer deliver
"""


def test_failing_sink_retries_then_dead_letters_without_repeating_the_other(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(tmp_path / "plugins", "flaky.py", FAILING_TRANSFER)
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    config = project(
        CONFIG.replace(
            "      - url: outbox\n",
            "      - url: outbox\n      - url: outbox2\n        name: broken\n",
        )
    )
    summary = run_once(config)
    assert not summary.ok
    assert summary.failed == {"survey:a.jpg": "ConnectionError: link down"}
    assert (tmp_path / "outbox" / "a.jpg").read_bytes() == b"A"
    good_mtime = (tmp_path / "outbox" / "a.jpg").stat().st_mtime_ns

    queue = JobQueue(tmp_path / ".state" / "queue")
    (record,) = queue.records("dead")
    assert record.attempts == 3
    assert record.errors == ("ConnectionError: link down",) * 3
    assert queue.requeue_dead() == 1
    queue.close()

    # The link is back: the re-queued job reaches the broken sink only; the good one is not resent.
    (tmp_path / "plugins" / "flaky.py").unlink()
    summary = run_once(config)
    assert summary.ok
    assert summary.delivered == 1
    assert (tmp_path / "outbox2" / "a.jpg").read_bytes() == b"A"
    assert (tmp_path / "outbox" / "a.jpg").stat().st_mtime_ns == good_mtime


def test_process_errors_retry_and_report(tmp_path: Path, project: Callable[[str], Path]) -> None:
    write_plugin(
        tmp_path,
        "processes.py",
        """
        from skyframe import process

        @process
        def process_explode(job):
            raise RuntimeError("disk full")
        """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    summary = run_once(project(CONFIG.replace("processes: []", "processes: [explode]")))
    assert summary.failed == {"survey:a.jpg": "RuntimeError: disk full"}
    assert not (tmp_path / "outbox").exists()


def test_crashing_rule_dead_letters_the_file(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path,
        "rules.py",
        """
        from skyframe import rule

        @rule
        def rule_forgetful(event):
            pass  # returns None: a bug
        """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    summary = run_once(
        project(CONFIG.replace("- type: {extensions: [jpg, mp4, srt]}", "- forgetful"))
    )
    (reason,) = summary.failed.values()
    assert "rule 'forgetful' returned None" in reason
    queue = JobQueue(tmp_path / ".state" / "queue")
    (record,) = queue.records("dead")
    assert record.attempts == 1  # not retried: a rule bug does not heal by waiting
    queue.close()


def test_a_rule_that_calls_sys_exit_dead_letters_its_file_only(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path,
        "rules.py",
        """
        import sys
        from skyframe import rule

        @rule
        def rule_quitter(event):
            if event.name == "a.jpg":
                sys.exit(4)  # ended the whole run, silently, with status 4
            return True
        """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    make_file(tmp_path / "incoming", "b.jpg", b"B")
    summary = run_once(
        project(CONFIG.replace("- type: {extensions: [jpg, mp4, srt]}", "- quitter"))
    )
    assert summary.failed == {"survey:a.jpg": "rule 'quitter' raised SystemExit: 4"}
    assert tree_files(tmp_path / "outbox") == {"b.jpg": b"B"}


def test_notifier_errors_never_affect_delivery(
    tmp_path: Path, project: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "noisy.py",
        """
        from skyframe import hookimpl

        @hookimpl
        def skyframe_event(event):
            raise ValueError("notifier down")
    """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    summary = run_once(project(CONFIG))
    assert summary.ok
    assert summary.delivered == 1
    assert "notifier" in caplog.text


def test_sidecar_and_rename_deliver_beside(tmp_path: Path, project: Callable[[str], Path]) -> None:
    make_file(tmp_path / "incoming", "f1/a.jpg", b"A", mtime=1715940902)
    config = CONFIG.replace(
        "processes: []",
        "processes: [checksum, sidecar, {rename: {template: '{mtime:%Y}/{parent}/{name}'}}]",
    )
    assert run_once(project(config)).ok
    assert sorted(tree_files(tmp_path / "outbox")) == ["2024/f1/a.jpg", "2024/f1/a.jpg.json"]


def test_a_sidecar_without_a_suffix_is_refused_in_the_config(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    # Its remote name would be the file's own: the file on the sink replaced by its sidecar.
    config = CONFIG.replace("processes: []", "processes: [{sidecar: {suffix: ''}}]")
    with pytest.raises(ConfigError, match=r"sidecar\.suffix.*at least 1 character"):
        load_project(project(config))


def test_a_derived_file_never_takes_the_place_of_its_file(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "twin.py",
        """
        from skyframe import process

        @process
        def process_twin(job):
            job.add_file("", b"not the photo", beside=True)  # a plugin's empty suffix
    """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"the photo")
    summary = run_once(project(CONFIG.replace("processes: []", "processes: [twin]")))
    assert summary.failed == {
        "survey:a.jpg": "a file a process made from it would be delivered as a.jpg, "
        "in place of the file itself"
    }
    assert summary.dead_letters == 1  # at once: retrying cannot mend it
    assert tree_files(tmp_path / "outbox") == {}  # nothing was sent, the photo stays to mend


def test_vanished_file_is_skipped_not_failed(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "vanish.py",
        """
        from skyframe import hookimpl

        @hookimpl(tryfirst=True)
        def skyframe_transfer(request):
            # simulates a camera tool deleting the file after it was seen, before it is read
            # (a lifecycle hook would race the delivery: notifiers run on threads of their own)
            if request.local_path.name == "gone.jpg":
                request.local_path.unlink(missing_ok=True)
            return None
    """,
    )
    make_file(tmp_path / "incoming", "gone.jpg", b"G")
    make_file(tmp_path / "incoming", "kept.jpg", b"K")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        summary = run_once(project(CONFIG))
    finally:
        os.chdir(cwd)
    assert summary.ok
    assert summary.skipped == 1
    assert tree_files(tmp_path / "outbox") == {"kept.jpg": b"K"}


def test_jobs_left_by_a_crashed_run_are_delivered(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    config = project(CONFIG)
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    # A previous process queued and leased the job, then died before finishing it.
    queue = JobQueue(tmp_path / ".state" / "queue")
    st = path.stat()
    event = {
        "pipeline": "survey",
        "path": str(path),
        "relpath": "a.jpg",
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "kind": "scanned",
    }
    queue.put("survey", Upload(event=FileEvent.from_json(event)))
    assert queue.claim() is not None
    queue.close()
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / f".a.jpg{TEMP_MARKER}dead.part").write_bytes(b"")  # its leftover

    summary = run_once(config)
    assert summary.ok
    assert (tmp_path / "outbox" / "a.jpg").read_bytes() == b"A"


def test_state_dir_is_single_instance(tmp_path: Path, project: Callable[[str], Path]) -> None:
    project_ = load_project(project(CONFIG))
    first = Engine(project_.config, project_.pm, project_.pipelines)
    try:
        with pytest.raises(StateError, match=r"another skyframe process \(pid \d+\)"):
            Engine(project_.config, project_.pm, project_.pipelines)
    finally:
        first.close()
    Engine(project_.config, project_.pm, project_.pipelines).close()


def test_dead_letters_stay_dead_across_runs(tmp_path: Path, project: Callable[[str], Path]) -> None:
    write_plugin(tmp_path / "plugins", "flaky.py", FAILING_TRANSFER)
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    config = project(CONFIG.replace("url: outbox", "url: outbox\n        name: broken"))
    first = run_once(config)
    assert list(first.failed) == ["survey:a.jpg"]
    second = run_once(config)  # same file, same version: not retried by a scan
    assert second.failed == {}
    assert second.dead_letters == 1
    assert not second.ok
    assert (
        plugin_module(tmp_path, "flaky.py").CALLS == []
    )  # the module was loaded afresh for the second run and never called


def test_startup_hook_failure_is_one_clear_error(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "boot.py",
        """
        from skyframe import hookimpl

        @hookimpl
        def skyframe_startup(config):
            raise KeyError("camera id")

        @hookimpl
        def skyframe_shutdown(config):
            (config.state_path / "shutdown-ran").write_text("yes")
    """,
    )
    from skyframe.errors import PluginError

    with pytest.raises(PluginError, match="a skyframe_startup hook failed: KeyError: 'camera id'"):
        run_once(project(CONFIG))
    assert (tmp_path / ".state" / "shutdown-ran").exists()


def test_notifier_without_arguments_is_called(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "tick.py",
        """
        from skyframe import hookimpl

        TICKS = []

        @hookimpl
        def skyframe_event():
            TICKS.append(1)
    """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    assert run_once(project(CONFIG)).ok
    assert len(plugin_module(tmp_path, "tick.py").TICKS) >= 3  # queued, started, delivered


def test_password_never_becomes_a_sink_key() -> None:
    from skyframe.config import SinkConfig

    sink = SinkConfig(url="sftp://pilot:hunter2@host:2222/data")
    assert sink.key == "sftp://pilot@host:2222/data"


def test_a_failure_while_handing_over_a_settled_file_is_retried(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_file(tmp_path / "incoming", "fresh.jpg", b"F")  # modified just now: it must settle
    project_ = load_project(project(CONFIG.replace("settle: 0", "settle: 0.3s")))
    engine = Engine(project_.config, project_.pm, project_.pipelines)
    original = engine.intake.offer
    failures = [1]

    def flaky_offer(*args: Any, **kwargs: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError("database is locked")
        original(*args, **kwargs)

    monkeypatch.setattr(engine.intake, "offer", flaky_offer)
    try:
        summary = engine.run_once()
    finally:
        engine.close()
    assert failures == [0]
    assert summary.ok
    assert tree_files(tmp_path / "outbox") == {"fresh.jpg": b"F"}


def test_a_transfer_that_sends_the_wrong_size_fails(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "short.py",
        """
        from skyframe import TransferResult, hookimpl

        @hookimpl(tryfirst=True)
        def skyframe_transfer(request):
            return TransferResult(size=request.size - 1, sha256="0" * 64)
    """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"ABCDEF")
    summary = run_once(project(CONFIG))
    (reason,) = summary.failed.values()
    assert reason.endswith("got 5 bytes of 6")
    manifest = Manifest(tmp_path / ".state" / "manifest")
    assert manifest.entries() == []  # never recorded as delivered
    manifest.close()


def test_dead_letters_of_files_gone_meanwhile_are_dropped(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(tmp_path / "plugins", "flaky.py", FAILING_TRANSFER)
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    make_file(tmp_path / "incoming", "keep.jpg", b"K")
    config = project(CONFIG.replace("url: outbox", "url: outbox\n        name: broken"))
    assert run_once(config).dead_letters == 2
    path.unlink()  # deleted while skyframe was not running
    second = run_once(config)
    assert second.dead_letters == 1  # keep.jpg still waits for a retry; a.jpg is gone
    queue = JobQueue(tmp_path / ".state" / "queue")
    assert [r.relpath for r in queue.records("dead")] == ["keep.jpg"]
    queue.close()


def test_once_delivers_while_the_scan_goes_on(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    # A slow rule makes the scan take a while: the first files it queued are delivered before
    # it has queued the last ones.
    write_plugin(
        tmp_path / "plugins",
        "order.py",
        """
        import time
        from skyframe import hookimpl, rule

        ORDER = []

        @rule
        def rule_slowly(event):
            time.sleep(0.002)
            return True

        @hookimpl
        def skyframe_event(event):
            if event.kind in ("queued", "delivered"):
                ORDER.append(event.kind)
    """,
    )
    for i in range(600):
        make_file(tmp_path / "incoming", f"f{i:03d}.jpg", b"x")
    config = CONFIG.replace("      - type: {extensions: [jpg, mp4, srt]}\n", "      - slowly: {}\n")
    summary = run_once(project(config))
    assert summary.delivered == 600
    order = plugin_module(tmp_path, "order.py").ORDER
    assert order.count("queued") == order.count("delivered") == 600
    last_queued = len(order) - 1 - order[::-1].index("queued")
    assert order.index("delivered") < last_queued


def test_once_raises_what_failed_in_the_scan(
    tmp_path: Path, project: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyframe.errors import StateError
    from skyframe.intake import Intake

    def broken(self: Intake, pipeline: Any) -> None:
        raise StateError("the queue database is damaged")

    monkeypatch.setattr(Intake, "scan", broken)
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    with pytest.raises(StateError, match="the queue database is damaged"):
        run_once(project(CONFIG))


def test_numbers_json_has_not_are_recorded_as_null(
    tmp_path: Path, project: Callable[[str], Path]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "odd.py",
        """
        from skyframe import process

        @process
        def process_odd(job):
            job.meta.update(nan=float("nan"), far=float("inf"), fine=1.5, deep=[float("-inf")])
        """,
    )
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    recorder = Recorder()
    summary = run_once(project(CONFIG.replace("processes: []", "processes: [odd]")), recorder)
    assert summary.delivered == 1
    [meta] = [e.meta for e in recorder.events if e.kind == "delivered"]
    # What the hub link, the webhooks and the API send is JSON that strict readers take.
    assert meta == {"nan": None, "far": None, "fine": 1.5, "deep": [None]}
