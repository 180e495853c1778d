"""Pause switches and the status tracker, without a daemon."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from skyframe.control import Control
from skyframe.events import LifecycleEvent
from skyframe.status import StatusTracker


def test_pause_state_is_saved_and_read_back(tmp_path: Path) -> None:
    control = Control(tmp_path, ["a", "b"])
    assert control.state() == {"paused": False, "pipelines": {"a": False, "b": False}}
    assert control.set(True, "a") == ["a"]
    assert control.set(True, "a") == []  # no change, no event
    assert control.set(True) == ["b"]  # everything: b is newly held
    again = Control(tmp_path, ["a", "b"])
    assert again.state() == {"paused": True, "pipelines": {"a": True, "b": False}}
    assert again.held() == {"a", "b"}
    assert again.set(False, "a") == []  # still held by the whole-daemon pause
    assert again.set(False) == ["a", "b"]  # resuming everything resumes every pipeline
    assert json.loads((tmp_path / "control.json").read_text()) == {
        "paused": False,
        "pipelines": {},
    }
    with pytest.raises(KeyError):
        again.set(True, "nope")


def test_an_unreadable_control_file_starts_unpaused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "control.json").write_text("{not json")
    control = Control(tmp_path, ["a"])
    assert control.held() == set()
    assert "starting unpaused" in caplog.text


def test_wait_running_returns_on_resume_and_on_cancel(tmp_path: Path) -> None:
    control = Control(tmp_path, ["a"])
    control.set(True, "a")
    cancelled = threading.Event()
    done: list[float] = []

    def wait() -> None:
        control.wait_running("a", cancelled)
        done.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    assert not done
    began = time.monotonic()
    control.set(False, "a")
    thread.join(2)
    assert done
    assert done[0] - began < 0.1
    control.set(True)
    thread = threading.Thread(target=wait)
    thread.start()
    cancelled.set()
    thread.join(2)
    assert len(done) == 2


def _tracker() -> StatusTracker:
    return StatusTracker([], dict, lambda: {"paused": False, "pipelines": {}})


def test_tracker_follows_transfers_and_errors() -> None:
    tracker = _tracker()
    now = time.time()
    tracker.observe(LifecycleEvent("started", "p", "big", sink="s", size=100, time=now - 2))
    tracker.observe(LifecycleEvent("started", "p", "small", sink="s", size=5, time=now - 2))
    tracker.observe(LifecycleEvent("progress", "p", "big", sink="s", size=100, bytes_done=40))
    tracker.observe(LifecycleEvent("delivered", "p", "small", sink="s", size=5))
    doc = tracker.snapshot()
    assert [(t["relpath"], t["bytes_done"]) for t in doc["transfers"]] == [("big", 40)]
    assert 15 < doc["transfers"][0]["rate"] < 25  # 40 bytes in about 2 s
    assert doc["totals"] == {"delivered": 1, "bytes": 5, "failed": 0, "dead_lettered": 0}
    assert doc["throughput"]["bytes_per_s"] == pytest.approx(45.0, rel=0.01)  # 1 s floor
    tracker.observe(
        LifecycleEvent("failed", "p", "big", sink="s", attempt=1, reason="r", error="OSError")
    )
    doc = tracker.snapshot()
    assert doc["transfers"] == []
    assert doc["errors"][0]["error"] == "OSError"
    assert doc["errors"][0]["relpath"] == "big"
    tracker.observe(LifecycleEvent("started", "p", "big", sink="s", size=100))
    tracker.job_ended("p", "big")  # e.g. cut by a shutdown: no event, but it is not running
    assert tracker.snapshot()["transfers"] == []
