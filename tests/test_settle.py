"""When a file is ready: the settle logic, on a fake clock (no sleeping, no watcher)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes.clock import FakeClock

from skyframe.watcher import Settler


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def settler(clock: FakeClock, settle: float = 2.0) -> tuple[Settler, list[Path]]:
    ready: list[Path] = []
    return Settler(settle, ready.append, clock=clock), ready


def grow(path: Path, data: bytes, mtime: float) -> None:
    with path.open("ab") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def test_a_file_unchanged_for_settle_seconds_is_ready(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    s.touch(path)
    clock.advance(1.9)
    s.tick()
    assert ready == []
    clock.advance(0.1)
    s.tick()
    assert ready == [path]
    assert len(s) == 0


def test_a_file_still_growing_waits_until_it_stops(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock)
    path = tmp_path / "video.mov"
    path.write_bytes(b"")
    s.touch(path)
    for second in range(5):  # a camera writing, unseen by the watcher (a network mount)
        clock.advance(2.0)
        grow(path, b"more", 1_700_000_000 + second)
        s.tick()
        assert ready == [], second
    clock.advance(2.0)  # the size and mtime held for a whole settle period
    s.tick()
    assert ready == [path]


def test_every_event_restarts_the_wait(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    s.touch(path)
    clock.advance(1.5)
    s.touch(path)  # modified again
    clock.advance(1.5)
    s.tick()
    assert ready == []
    clock.advance(0.5)
    s.tick()
    assert ready == [path]


def test_closed_after_writing_is_ready_at_once(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    s.touch(path)
    s.touch(path, complete=True)
    assert ready == [path]
    clock.advance(5)
    s.tick()
    assert ready == [path]  # handed over once


def test_a_vanished_or_forgotten_file_is_dropped(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock)
    gone, moved = tmp_path / "gone.jpg", tmp_path / "moved.jpg"
    gone.write_bytes(b"g")
    moved.write_bytes(b"m")
    s.touch(gone)
    s.touch(moved)
    gone.unlink()
    s.forget(moved)
    clock.advance(3)
    s.tick()
    assert ready == []
    assert len(s) == 0


def test_a_failed_hand_over_is_kept_and_tried_at_the_next_tick(
    tmp_path: Path, clock: FakeClock
) -> None:
    calls: list[Path] = []

    def flaky(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError("the state database is busy")

    s = Settler(1.0, flaky, clock=clock)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    s.touch(path)
    clock.advance(1)
    with pytest.raises(OSError, match="busy"):
        s.tick()
    assert len(s) == 1
    s.tick()
    assert calls == [path, path]
    assert len(s) == 0


def test_settle_zero_hands_over_at_the_first_tick(tmp_path: Path, clock: FakeClock) -> None:
    s, ready = settler(clock, settle=0.0)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    s.touch(path)
    s.tick()
    assert ready == [path]
