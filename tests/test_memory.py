"""What must not grow with the number of files: checked by what is read or held, not by timing
or RSS (docs/benchmarks.md has the measurements)."""

from __future__ import annotations

import dataclasses
import gc
import os
import sqlite3
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WriteConfig, make_file

import skyframe.intake
from skyframe.engine import Engine
from skyframe.events import FileEvent
from skyframe.jobs import Delete
from skyframe.pipeline import load_project
from skyframe.queue import JobQueue
from skyframe.state import ManifestEntry


def sqlite_steps(queue: JobQueue, call: Callable[[], object]) -> int:
    """How many steps of SQLite's virtual machine ``call`` takes on this thread's connection."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    connection = queue._cache._con  # diskcache's connection of this thread
    connection.set_progress_handler(count, 1)
    try:
        call()
    finally:
        connection.set_progress_handler(None, 1)
    return steps


def dead_letter(queue: JobQueue, relpath: str) -> None:
    queue.put("p", Delete(relpath=relpath), "1")
    claim = queue.claim()
    assert claim is not None
    assert claim.relpath == relpath
    queue.dead(claim, "boom")


def tagged_rows(directory: Path) -> int:
    db = sqlite3.connect(directory / "cache.db")
    try:
        (count,) = db.execute("SELECT count(*) FROM Cache WHERE tag IS NOT NULL").fetchone()
    finally:
        db.close()
    return int(count)


def test_dead_letters_are_found_without_reading_every_record(tmp_path: Path) -> None:
    # The daemon's first scan looks for dead letters; a read of every record of a large
    # backlog maps the whole database into memory (SQLite's mmap).
    queue = JobQueue(tmp_path / "queue")
    dead_letter(queue, "dead.jpg")
    few = sqlite_steps(queue, lambda: queue.records("dead"))
    for start in range(0, 3000, 500):
        with queue.batch():
            for i in range(start, start + 500):
                queue.put("p", Delete(relpath=f"f{i:05}.jpg"), "1")
    many = sqlite_steps(queue, lambda: queue.records("dead"))
    every = sqlite_steps(queue, lambda: queue.records("pending"))
    assert [r.relpath for r in queue.records("dead")] == ["dead.jpg"]
    assert many < few + 100  # the same work with 3,000 pending jobs more
    assert every > 10 * many  # (the count does see a read of every record)
    queue.close()


def test_a_dead_letter_loses_its_tag_when_it_leaves_the_list(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "queue")
    dead_letter(queue, "a.jpg")
    dead_letter(queue, "b.jpg")
    assert tagged_rows(tmp_path / "queue") == 2
    assert queue.put("p", Delete(relpath="a.jpg"), "2")  # a new version starts afresh
    assert queue.requeue_dead(relpath="b.jpg") == 1
    assert tagged_rows(tmp_path / "queue") == 0
    assert queue.records("dead") == []
    queue.close()


def test_dead_letters_of_an_earlier_version_are_tagged_at_open(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "queue")
    dead_letter(queue, "a.jpg")
    queue.close()
    db = sqlite3.connect(tmp_path / "queue" / "cache.db")
    with db:  # as a queue written before dead letters were tagged
        db.execute("UPDATE Cache SET tag = NULL")
        db.execute("DROP INDEX Cache_tagged")
    db.close()
    reader = JobQueue(tmp_path / "queue", recover=False)  # `skyframe queue` as well
    assert [r.relpath for r in reader.records("dead")] == ["a.jpg"]
    assert tagged_rows(tmp_path / "queue") == 1
    reader.close()


def test_a_scan_holds_no_entry_per_file_unless_deletes_are_mirrored(
    tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(
        """
        state_dir: .state
        pipelines:
          - name: survey
            source: {path: incoming, settle: 0}
            sinks:
              - url: outbox
        """
    )
    files = 4 * skyframe.intake.SCAN_BATCH  # no partial batch left when the listing ends
    for i in range(files):
        make_file(tmp_path / "incoming", f"d{i // 100}/f{i:04}.jpg", b"x")
    project = load_project(config)
    engine = Engine(project.config, project.pm, project.pipelines)
    pipeline = project.pipelines[0]
    # Every file was delivered already: the scan finds each one unchanged, queues and records
    # nothing, so only the scan itself could keep a file's relpath.
    entries = []
    for path in (tmp_path / "incoming").rglob("*.jpg"):
        st = os.stat(path)
        entry = ManifestEntry.now(st.st_size, st.st_mtime_ns, "0" * 64, path.name)
        relpath = path.relative_to(tmp_path / "incoming").as_posix()
        entries += [(pipeline.name, sink.key, relpath, entry) for sink in pipeline.sinks]
    engine.manifest.record_many(entries)

    class Relpath(str):
        pass

    alive_at_the_end: list[int] = []
    listed = skyframe.intake.scan_source

    def scan_source(*args: Any, **kwargs: Any) -> Iterator[FileEvent]:
        held: list[weakref.ref[Relpath]] = []
        for event in listed(*args, **kwargs):
            relpath = Relpath(event.relpath)
            held.append(weakref.ref(relpath))
            yield dataclasses.replace(event, relpath=relpath)
        del relpath
        gc.collect()
        alive_at_the_end.append(sum(ref() is not None for ref in held))

    monkeypatch.setattr(skyframe.intake, "scan_source", scan_source)
    try:
        engine.intake.scan(pipeline)
    finally:
        engine.close()
    assert engine.summary.unchanged == files
    assert alive_at_the_end[0] <= 2  # the scan's last event, at most
