"""What the watcher does with an event the engine cannot take now."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from watchdog.events import FileClosedEvent

from skyframe.watcher import WatchCallbacks, _Handler


def handler(error: BaseException) -> _Handler:
    def changed(path: Path, complete: bool) -> None:
        raise error

    return _Handler(WatchCallbacks(changed, lambda p: None, lambda a, b: None, lambda r: None))


def test_a_full_state_disk_is_one_line_per_file(caplog: pytest.LogCaptureFixture) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    with caplog.at_level(logging.ERROR, logger="skyframe.watcher"):
        handler(full).dispatch(FileClosedEvent("/data/in/new\nname.jpg"))
    [record] = caplog.records
    assert record.getMessage() == (
        "cannot take /data/in/new\\nname.jpg now (database or disk is full); "
        "the next rescan offers it again"
    )
    assert record.exc_info is None


def test_a_fault_of_skyframes_own_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="skyframe.watcher"):
        handler(KeyError("bug")).dispatch(FileClosedEvent("/data/in/a.jpg"))
    [record] = caplog.records
    assert record.getMessage().startswith("error while handling ")
    assert record.exc_info is not None
