"""Watch mode in-process: settling, coalescing, moves, deletes, retries and shutdown."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Daemon,
    WriteConfig,
    make_file,
    outbox_files,
    plugin_module,
    wait_for,
    write_plugin,
)

from skyframe.queue import JobQueue
from skyframe.storage import TEMP_MARKER

CONFIG = """\
state_dir: .state
plugins: [plugins]
retry: {max_attempts: 2, initial: 50ms, max: 100ms}
shutdown_grace: 1s
pipelines:
  - name: survey
    source: {path: incoming, settle: SETTLE, rescan: 1hSOURCE_EXTRA}
    rules: [{ignore: {patterns: ["*.skip"]}}]
    processes: PROCESSES
    priority: PRIORITY
    sinks:
      - url: outbox
        on_delete: ON_DELETE
        concurrency: CONCURRENCY
"""


@pytest.fixture
def start(tmp_path: Path, write_config: WriteConfig) -> Iterator[Callable[..., Daemon]]:
    (tmp_path / "plugins").mkdir(exist_ok=True)
    daemons: list[Daemon] = []

    def start_daemon(
        *,
        settle: str = "0.3s",
        on_delete: str = "keep",
        concurrency: int = 4,
        extra: str = "",
        processes: str = "[]",
        source_extra: str = "",
        priority: str = "{}",
    ) -> Daemon:
        text = (
            CONFIG.replace("SETTLE", settle)
            .replace("SOURCE_EXTRA", source_extra)
            .replace("PROCESSES", processes)
            .replace("PRIORITY", priority)
            .replace("ON_DELETE", on_delete)
            .replace("CONCURRENCY", str(concurrency))
            + extra
        )
        daemon = Daemon(write_config(text))
        daemons.append(daemon)
        return daemon.__enter__()

    yield start_daemon
    for daemon in daemons:
        daemon.stop()


GATE = """
    import threading
    from skyframe import hookimpl

    GATE = threading.Event()

    @hookimpl(tryfirst=True)
    def skyframe_transfer(request):
        if request.local_path.name == "blocker.jpg":
            assert GATE.wait(30)
        return None
"""


def gate_plugin(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "gate.py", GATE)


def open_gate() -> None:
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("_skyframe_user.gate_"):
            module.GATE.set()


SLOW_TRANSFER = """
    import time
    from skyframe import hookimpl
    from skyframe.protocols.generic import plugin as generic_plugin

    @hookimpl(tryfirst=True)
    def skyframe_transfer(request):
        original = request.progress

        def slowed(done):
            time.sleep(DELAY)
            original(done)

        request.progress = slowed
        return generic_plugin.skyframe_transfer(request)
"""


def slow_transfer_plugin(tmp_path: Path, delay: float) -> None:
    """A transfer plugin that sleeps `delay` seconds per 1 MiB chunk, then delivers."""
    write_plugin(tmp_path / "plugins", "slow.py", SLOW_TRANSFER.replace("DELAY", str(delay)))


def test_new_file_is_delivered(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    daemon = start()
    make_file(tmp_path / "incoming", "f1/a.jpg", b"A")
    wait_for(lambda: outbox_files(tmp_path) == {"f1/a.jpg": b"A"}, what="delivery")
    # The event follows the file's arrival (and the manifest record): wait for it.
    wait_for(lambda: daemon.recorder.count("delivered") == 1, what="delivered event")
    time.sleep(0.2)
    assert daemon.recorder.count("delivered") == 1


def test_catch_up_scan_at_start(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    make_file(tmp_path / "incoming", "old.jpg", b"written while skyframe was down", mtime=1e9)
    start()
    wait_for(lambda: "old.jpg" in outbox_files(tmp_path), what="catch-up delivery")


def test_create_and_modify_in_one_session_is_one_upload(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    daemon = start(settle="1s")
    path = tmp_path / "incoming" / "a.jpg"
    with path.open("wb") as f:
        f.write(b"created")
        f.flush()
        time.sleep(0.3)
        f.write(b" and modified")
    wait_for(lambda: outbox_files(tmp_path).get("a.jpg") == b"created and modified")
    time.sleep(0.5)
    assert daemon.recorder.count("delivered", "a.jpg") == 1


def test_growing_file_is_delivered_once_complete(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    daemon = start(settle="1s")
    path = tmp_path / "incoming" / "slow.mp4"
    chunks = [os.urandom(10_000) for _ in range(10)]
    with path.open("wb") as f:
        for chunk in chunks:  # written over about 3 seconds, never idle for `settle`
            f.write(chunk)
            f.flush()
            time.sleep(0.3)
    wait_for(lambda: outbox_files(tmp_path).get("slow.mp4") == b"".join(chunks))
    time.sleep(1.5)
    assert daemon.recorder.count("delivered", "slow.mp4") == 1


@pytest.fixture
def gated(tmp_path: Path, start: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A daemon with one worker and one sink slot, held by blocker.jpg until open_gate() (all
    files of one priority: no express slot lets a small one past it)."""
    gate_plugin(tmp_path)
    daemon = start(settle="0", concurrency=1, extra="workers: 1\n", priority="{small_first: null}")
    make_file(tmp_path / "incoming", "blocker.jpg", b"B")
    wait_for(lambda: daemon.recorder.count("started", "blocker.jpg") == 1, what="blocker")
    yield daemon
    open_gate()


def test_create_then_delete_before_upload_sends_nothing(tmp_path: Path, gated: Daemon) -> None:
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: gated.recorder.count("queued", "a.jpg") >= 1, what="a.jpg queued")
    path.unlink()
    open_gate()
    wait_for(lambda: "blocker.jpg" in outbox_files(tmp_path), what="blocker delivered")
    time.sleep(0.5)
    assert outbox_files(tmp_path) == {"blocker.jpg": b"B"}
    assert gated.recorder.count("delivered", "a.jpg") == 0
    assert gated.recorder.count("dead-lettered") == 0


def test_move_before_delivery_delivers_new_name_only(tmp_path: Path, gated: Daemon) -> None:
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: gated.recorder.count("queued", "a.jpg") >= 1, what="a.jpg queued")
    path.rename(tmp_path / "incoming" / "b.jpg")
    open_gate()
    wait_for(lambda: "b.jpg" in outbox_files(tmp_path), what="b.jpg delivered")
    time.sleep(0.5)
    assert outbox_files(tmp_path) == {"blocker.jpg": b"B", "b.jpg": b"A"}


def test_move_after_delivery_is_a_remote_move(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    # A rename into a folder created a moment ago reaches the watcher as "create" (when the new
    # folder's watch is added) before "delete": settling gives the pair time to meet.
    daemon = start(settle="0.5s")
    path = make_file(tmp_path / "incoming", "f1/a.jpg", os.urandom(100_000))
    # Recorded as delivered (the event follows the manifest record), so a move is recognised.
    wait_for(lambda: daemon.recorder.count("delivered", "f1/a.jpg") == 1)
    data = path.read_bytes()
    (tmp_path / "incoming" / "f2").mkdir()
    path.rename(tmp_path / "incoming" / "f2" / "renamed.jpg")
    wait_for(lambda: outbox_files(tmp_path) == {"f2/renamed.jpg": data}, what="remote move")
    wait_for(lambda: daemon.recorder.count("moved", "f2/renamed.jpg") == 1, what="moved event")
    assert daemon.recorder.count("started", "f2/renamed.jpg") == 0  # not uploaded again
    # A rename within one folder arrives as one move event: no settling needed.
    path = tmp_path / "incoming" / "f2" / "renamed.jpg"
    path.rename(path.with_name("final.jpg"))
    wait_for(lambda: outbox_files(tmp_path) == {"f2/final.jpg": data}, what="second move")
    assert daemon.recorder.count("started") == 1


def test_a_move_onto_a_remote_name_another_file_holds_is_refused(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    # With the remote name the file's name alone, a move of f1/a.jpg to f1/b.jpg would move
    # its copy over f2/b.jpg's: refused, and both copies stay.
    daemon = start(settle="0", processes='[{rename: {template: "{name}"}}]')
    a = make_file(tmp_path / "incoming", "f1/a.jpg", b"A")
    make_file(tmp_path / "incoming", "f2/b.jpg", b"B")
    wait_for(lambda: daemon.recorder.count("delivered") == 2, what="both delivered")
    a.rename(a.with_name("b.jpg"))
    wait_for(lambda: daemon.recorder.count("dead-lettered", "f1/b.jpg") == 1, what="refusal")
    assert outbox_files(tmp_path) == {"a.jpg": b"A", "b.jpg": b"B"}
    assert daemon.recorder.count("moved") == 0


def test_delete_is_kept_remotely_by_default(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    daemon = start(settle="0")
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: "a.jpg" in outbox_files(tmp_path))
    path.unlink()
    time.sleep(0.5)
    assert outbox_files(tmp_path) == {"a.jpg": b"A"}
    assert daemon.recorder.count("deleted") == 0


def test_delete_is_mirrored_when_opted_in(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    daemon = start(settle="0", on_delete="delete")
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: "a.jpg" in outbox_files(tmp_path))
    # The file is renamed into place a moment before its delivery is recorded: delete it
    # once it is (a delete in between finds nothing delivered to mirror).
    wait_for(lambda: daemon.recorder.count("delivered", "a.jpg") == 1, what="delivered event")
    path.unlink()
    wait_for(lambda: outbox_files(tmp_path) == {}, what="remote delete")
    # The event follows the removal (and the manifest update): wait for it, do not race it.
    wait_for(lambda: daemon.recorder.count("deleted", "a.jpg") == 1, what="deleted event")
    time.sleep(0.2)
    assert daemon.recorder.count("deleted", "a.jpg") == 1


def test_deletes_while_down_are_caught_up(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    first = start(settle="0", on_delete="delete")
    path = make_file(tmp_path / "incoming", "a.jpg", b"A")
    make_file(tmp_path / "incoming", "b.jpg", b"B")
    wait_for(lambda: len(outbox_files(tmp_path)) == 2)
    first.stop()
    path.unlink()
    start(settle="0", on_delete="delete")
    wait_for(lambda: outbox_files(tmp_path) == {"b.jpg": b"B"}, what="catch-up delete")


def test_an_emptied_source_never_wipes_the_sink(
    tmp_path: Path, start: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    first = start(settle="0", on_delete="delete")
    for name in ("a.jpg", "b.jpg"):
        make_file(tmp_path / "incoming", name, name.encode())
    wait_for(lambda: len(outbox_files(tmp_path)) == 2)
    first.stop()
    for path in (tmp_path / "incoming").iterdir():  # like an SD card that did not mount
        path.unlink()
    start(settle="0", on_delete="delete")
    time.sleep(0.5)
    assert outbox_files(tmp_path) == {"a.jpg": b"a.jpg", "b.jpg": b"b.jpg"}
    assert "found no files at all: not deleting remote copies" in caplog.text


def test_editor_save_replaces_the_file(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    start(settle="0.3s")
    target = make_file(tmp_path / "incoming", "notes.srt", b"version 1")
    wait_for(lambda: outbox_files(tmp_path).get("notes.srt") == b"version 1")
    # What gedit, VS Code and many tools do: write a temporary file, then rename it over.
    temp = tmp_path / "incoming" / ".goutputstream-K2Z1"
    temp.write_bytes(b"version 2, saved")
    os.replace(temp, target)
    wait_for(
        lambda: outbox_files(tmp_path) == {"notes.srt": b"version 2, saved"},
        what="saved version delivered, temporary name gone",
    )


def test_file_moved_in_from_outside(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    start(settle="5s")  # a rename into place needs no settling
    outside = make_file(tmp_path / "elsewhere", "DJI_9.JPG", b"moved in")
    os.rename(outside, tmp_path / "incoming" / "DJI_9.JPG")
    wait_for(lambda: outbox_files(tmp_path) == {"DJI_9.JPG": b"moved in"}, timeout=3)


def test_rapid_events_on_many_paths_coalesce(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    gate_plugin(tmp_path)
    daemon = start(settle="0", concurrency=1, extra="workers: 1\n", priority="{small_first: null}")
    make_file(tmp_path / "incoming", "blocker.jpg", b"B")
    wait_for(lambda: daemon.recorder.count("started", "blocker.jpg") == 1, what="blocker")
    final = {}
    for round_ in range(100):  # 50 paths x 100 writes = 5,000 write sessions
        for i in range(50):
            data = f"path {i} version {round_}".encode()
            (tmp_path / "incoming" / f"p{i:02}.jpg").write_bytes(data)
            final[f"p{i:02}.jpg"] = data
    open_gate()
    expected = {**final, "blocker.jpg": b"B"}
    wait_for(lambda: outbox_files(tmp_path) == expected, timeout=30, what="final versions")
    time.sleep(0.5)
    uploads = daemon.recorder.count("delivered") - 1
    assert uploads <= 2 * 50, f"{uploads} uploads for 50 paths"
    queue = daemon.engine.queue
    wait_for(
        lambda: queue.counts() == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0},
        what="every job done",
    )


def test_failing_sink_dead_letters_then_cli_retry(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "flaky.py",
        """
        from skyframe import hookimpl

        FAIL = [True]

        @hookimpl(tryfirst=True)
        def skyframe_transfer(request):
            if FAIL[0]:
                raise ConnectionResetError("peer reset")
            return None
        """,
    )
    daemon = start(settle="0")
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: daemon.recorder.count("dead-lettered", "a.jpg") == 1, what="dead letter")
    assert daemon.recorder.kinds("a.jpg").count("failed") == 1  # max_attempts: 2

    from click.testing import CliRunner

    from skyframe.cli import cli

    config = str(tmp_path / "skyframe.yaml")
    listing = CliRunner().invoke(cli, ["queue", "list", "-c", config])
    assert listing.exit_code == 0, listing.output
    assert "dead\tsurvey\ta.jpg\tupload\t2\t\tConnectionResetError: peer reset" in listing.output

    plugin_module(tmp_path, "flaky.py").FAIL[0] = False
    retried = CliRunner().invoke(cli, ["queue", "retry", "--config", config, "a.jpg"])
    assert retried.exit_code == 0, retried.output
    assert "1 job(s) back in the queue" in retried.output
    wait_for(lambda: outbox_files(tmp_path) == {"a.jpg": b"A"}, what="delivery after retry")
    missing = CliRunner().invoke(cli, ["queue", "retry", "-c", config, "nope.jpg"])
    assert missing.exit_code == 1


def test_changed_while_uploading_is_sent_again_complete(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    slow_transfer_plugin(tmp_path, delay=0.05)
    daemon = start(settle="0")
    path = make_file(tmp_path / "incoming", "v.mp4", os.urandom(8 * 1024 * 1024))
    wait_for(lambda: daemon.recorder.count("started", "v.mp4") >= 1)
    final = os.urandom(8 * 1024 * 1024)
    path.write_bytes(final)
    wait_for(lambda: outbox_files(tmp_path).get("v.mp4") == final, timeout=20)
    assert daemon.recorder.count("dead-lettered") == 0


def test_stop_cuts_long_transfers_and_leaves_no_partial_files(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    slow_transfer_plugin(tmp_path, delay=0.2)
    daemon = start(settle="0.2s")  # close-write makes it ready; half-written it is not
    make_file(tmp_path / "incoming", "big.mp4", os.urandom(50 * 1024 * 1024))
    wait_for(lambda: daemon.recorder.count("started", "big.mp4") == 1)
    began = time.monotonic()
    daemon.stop()
    assert time.monotonic() - began < 5  # shutdown_grace is 1s
    assert not any(TEMP_MARKER in name for name in outbox_files(tmp_path))
    assert "big.mp4" not in outbox_files(tmp_path)
    queue = JobQueue(tmp_path / ".state" / "queue")
    (record,) = queue.records()
    assert (record.state, record.attempts) == ("pending", 0)  # back in line, not failed
    queue.close()


def test_polling_mode_for_network_mounts(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    polled = start(settle="0.2s", source_extra=", polling: true, poll_interval: 200ms")
    source = next(iter(polled.engine.intake.sources.values()))
    assert source.watcher is not None
    assert source.watcher.mode == "polling"
    make_file(tmp_path / "incoming", "nfs/DJI_1.JPG", b"polled")
    wait_for(lambda: outbox_files(tmp_path) == {"nfs/DJI_1.JPG": b"polled"}, what="polled")


@pytest.mark.parametrize(
    ("logger", "said"),
    [
        # what watchdog logs when the kernel's inotify queue overflows and events are lost
        ("watchdog.observers.inotify_c", "Inotify queue overflowed; filesystem events were lost"),
        # and when Windows's buffer of directory changes does (ReadDirectoryChangesW)
        (
            "watchdog.observers.read_directory_changes",
            "Some file system events were lost due to a buffer overflow while watching C:\\in",
        ),
    ],
)
def test_lost_events_trigger_a_rescan(
    tmp_path: Path,
    start: Callable[..., Daemon],
    caplog: pytest.LogCaptureFixture,
    logger: str,
    said: str,
) -> None:
    import logging

    daemon = start(settle="0")
    scans: list[str] = []
    original = daemon.engine.intake.scan

    def counting_scan(pipeline: Any, **kwargs: Any) -> None:
        scans.append(pipeline.name)
        original(pipeline, **kwargs)

    daemon.engine.intake.scan = counting_scan  # type: ignore[method-assign]
    logging.getLogger(logger).warning(said)
    wait_for(lambda: scans == ["survey"], what="a rescan")
    assert "overflowed: rescanning" in caplog.text


def test_a_dead_observer_is_restarted(
    tmp_path: Path, start: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start(settle="0")
    watcher = next(iter(daemon.engine.intake.sources.values())).watcher
    assert watcher is not None
    dead = watcher._observer
    assert dead is not None
    dead.stop()
    dead.join()
    wait_for(lambda: "stopped; restarting it" in caplog.text, what="restart", timeout=5)
    make_file(tmp_path / "incoming", "after-restart.jpg", b"R")
    wait_for(lambda: outbox_files(tmp_path) == {"after-restart.jpg": b"R"}, what="delivery")


def test_cpu_heavy_processes_do_not_stall_uploads(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    write_plugin(
        tmp_path,
        "processes.py",
        """
        import time
        from skyframe import process

        @process
        def process_crunch(job):
            if job.path.name.startswith("heavy"):
                end = time.monotonic() + 3
                while time.monotonic() < end:  # pure-Python work, holding the GIL in turns
                    sum(i * i for i in range(1000))
        """,
    )
    busy = start(settle="0", extra="workers: 2\n", processes="[crunch]")
    make_file(tmp_path / "incoming", "heavy.jpg", b"H")
    wait_for(lambda: busy.recorder.count("queued", "heavy.jpg") == 1)
    began = time.monotonic()
    make_file(tmp_path / "incoming", "light.jpg", b"L")
    wait_for(lambda: "light.jpg" in outbox_files(tmp_path), timeout=2, what="light upload")
    assert time.monotonic() - began < 2
    assert "heavy.jpg" not in outbox_files(tmp_path)  # still crunching
    wait_for(lambda: "heavy.jpg" in outbox_files(tmp_path), timeout=10)


def test_watch_limit_falls_back_to_polling(
    tmp_path: Path,
    start: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno

    from watchdog.observers.inotify import InotifyObserver

    def no_more_watches(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyObserver, "schedule", no_more_watches)
    daemon = start(settle="0.2s", source_extra=", poll_interval: 200ms")
    source = next(iter(daemon.engine.intake.sources.values()))
    assert source.watcher is not None
    assert source.watcher.mode == "polling"
    assert "raise fs.inotify.max_user_watches" in caplog.text
    make_file(tmp_path / "incoming", "a.jpg", b"A")
    wait_for(lambda: outbox_files(tmp_path) == {"a.jpg": b"A"}, what="delivery while polling")


def test_a_file_rewritten_after_its_delete_is_not_deleted_remotely(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    daemon = start(settle="0", on_delete="delete")
    path = make_file(tmp_path / "incoming", "a.jpg", b"version 1")
    wait_for(lambda: "a.jpg" in outbox_files(tmp_path))
    path.unlink()
    path.write_bytes(b"version 2, a new file")
    wait_for(lambda: outbox_files(tmp_path) == {"a.jpg": b"version 2, a new file"})
    time.sleep(2.5)  # past the window in which the delete could have been mirrored
    assert outbox_files(tmp_path) == {"a.jpg": b"version 2, a new file"}
    assert daemon.recorder.count("deleted") == 0


def test_another_folder_in_the_source_folders_place_is_watched(
    tmp_path: Path, start: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    """A card mounted on the source folder, or a folder renamed into its place: the old one's
    watch lives on, and only a rescan (an hour here) would find the new one's files."""
    start(settle="0")
    make_file(tmp_path / "incoming", "card1/a.jpg", b"A")
    wait_for(lambda: "card1/a.jpg" in outbox_files(tmp_path))
    (tmp_path / "incoming").rename(tmp_path / "card1-copied")
    (tmp_path / "incoming").mkdir()
    make_file(tmp_path / "incoming", "card2/b.jpg", b"B")
    wait_for(lambda: "card2/b.jpg" in outbox_files(tmp_path), timeout=10, what="the new folder")
    assert "is another folder now (a card mounted on it?); watching it" in caplog.text
    make_file(tmp_path / "incoming", "card2/c.jpg", b"C")  # and its events are seen
    wait_for(lambda: "card2/c.jpg" in outbox_files(tmp_path), timeout=10, what="a new file")


def test_a_sink_folder_emptied_behind_its_back_is_made_again_at_once(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    import shutil

    daemon = start(settle="0")
    make_file(tmp_path / "incoming", "card1/a.jpg", b"A")
    wait_for(lambda: "card1/a.jpg" in outbox_files(tmp_path))
    shutil.rmtree(tmp_path / "outbox")  # the folders this connection made are gone
    make_file(tmp_path / "incoming", "card1/b.jpg", b"B")
    wait_for(lambda: "card1/b.jpg" in outbox_files(tmp_path), what="b.jpg delivered")
    assert daemon.recorder.count("failed") == 0  # in its first attempt


def test_source_folder_removed_and_recreated(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    """Like an SD card's mount point, which comes and goes with the card."""
    import shutil

    start(settle="0")
    make_file(tmp_path / "incoming", "card1/a.jpg", b"A")
    wait_for(lambda: "card1/a.jpg" in outbox_files(tmp_path))
    shutil.rmtree(tmp_path / "incoming")
    time.sleep(0.5)
    (tmp_path / "incoming").mkdir()
    make_file(tmp_path / "incoming", "card2/b.jpg", b"B")
    wait_for(lambda: "card2/b.jpg" in outbox_files(tmp_path), timeout=10, what="after remount")
