"""Photos first: the ``priority`` option, and a photo landing while a video uploads is
delivered within about twice its own transfer time, while the video goes on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, make_file, s3_sink, sftp_sink, wait_for, write_random

from skyframe.errors import ConfigError
from skyframe.events import FileEvent
from skyframe.jobs import HIGH, LOW, NORMAL
from skyframe.pipeline import load_project

MB = 1_000_000
RATE = 2 * MB  #: 16 Mbit/s
VIDEO = 20 * MB  #: about 10 s at RATE
PHOTO = 300_000  #: about 0.15 s at RATE
SETTLE = 0.5
#: What a loaded CI machine adds: connection set-up, a scheduling hiccup, the watcher.
TOLERANCE = 1.0


def write_config(folder: Path, pipeline: dict[str, Any], settle: float = 2.0) -> Path:
    """folder/skyframe.yaml: one pipeline from incoming/ with ``pipeline``'s other keys."""
    (folder / "incoming").mkdir(parents=True, exist_ok=True)
    (folder / "outbox").mkdir(exist_ok=True)
    source = {"path": "incoming", "settle": settle}
    config = {
        "state_dir": "state",
        "shutdown_grace": 1,
        "api": {"enabled": False},
        "pipelines": [{"name": "survey", "source": source, **pipeline}],
    }
    path = folder / "skyframe.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def levels(tmp_path: Path, priority: dict[str, Any] | None) -> dict[str, int]:
    extra = {} if priority is None else {"priority": priority}
    config = write_config(tmp_path, {"sinks": [{"url": "outbox"}], **extra})
    (pipeline,) = load_project(config).pipelines
    sizes = {"DJI_0001.JPG": 8 * MB, "DJI_0002.MP4": 900 * MB, "logs/flight.SRT": 40 * MB}
    return {
        relpath: pipeline.priority_of(FileEvent("survey", Path(relpath), relpath, size, 0))
        for relpath, size in sizes.items()
    }


def test_small_files_first_by_default(tmp_path: Path) -> None:
    assert levels(tmp_path, None) == {
        "DJI_0001.JPG": HIGH,
        "DJI_0002.MP4": NORMAL,
        "logs/flight.SRT": NORMAL,
    }


def test_globs_decide_before_the_size(tmp_path: Path) -> None:
    priority = {"small_first": "10MB", "paths": {"*.srt": "high", "*.jpg": "low"}}
    assert levels(tmp_path, priority) == {
        "DJI_0001.JPG": LOW,
        "DJI_0002.MP4": NORMAL,
        "logs/flight.SRT": HIGH,
    }


def test_small_first_null_puts_every_file_in_arrival_order(tmp_path: Path) -> None:
    assert set(levels(tmp_path, {"small_first": None}).values()) == {NORMAL}


@pytest.mark.parametrize(
    ("priority", "message"),
    [
        ({"paths": {"*.mp4": "urgent"}}, "'high', 'normal' or 'low'"),
        ({"small_first": "big"}, "size"),
        ({"first": "photos"}, "first"),
    ],
)
def test_a_wrong_priority_is_a_config_error(
    tmp_path: Path, priority: dict[str, Any], message: str
) -> None:
    config = write_config(tmp_path, {"sinks": [{"url": "outbox"}], "priority": priority})
    with pytest.raises(ConfigError, match=message):
        load_project(config)


# --- a photo while a video uploads -------------------------------------------------------------


@pytest.fixture(params=["s3", "sftp"])
def slow_sink(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A real server behind the sink's own bwlimit, one file at a time: without the express
    slot and urgent pacing, a photo would wait for the whole video."""
    if request.param == "s3":
        server: Any = request.getfixturevalue("s3_server")
        sink = s3_sink(server, part_size="5MiB")
    else:
        server = request.getfixturevalue("sftp_server")
        sink = sftp_sink(server)
    return {**sink, "name": "field", "concurrency": 1, "bwlimit": "16Mbit/s"}


def test_a_photo_is_not_stuck_behind_a_video(tmp_path: Path, slow_sink: dict[str, Any]) -> None:
    config = write_config(tmp_path, {"sinks": [slow_sink]}, settle=SETTLE)
    incoming = tmp_path / "incoming"
    write_random(tmp_path / "staging" / "DJI_0100.MP4", VIDEO, seed=1)
    with Daemon(config) as daemon:
        recorder = daemon.recorder
        (tmp_path / "staging" / "DJI_0100.MP4").rename(incoming / "DJI_0100.MP4")
        video_landed = time.time()
        wait_for(lambda: recorder.count("started", "DJI_0100.MP4") == 1, what="the video")
        landed = {}
        for n in range(3):  # photos land while the video uploads
            time.sleep(1.5)
            name = f"DJI_{n + 1:04}.JPG"
            make_file(incoming, name, bytes(PHOTO))
            landed[name] = time.time()
        wait_for(lambda: recorder.count("delivered") == 4, what="every file delivered", timeout=40)
        delivered = {e.relpath: e.time for e in recorder.events if e.kind == "delivered"}
    own = PHOTO / RATE
    for name, at in landed.items():
        latency = delivered[name] - at
        assert latency <= 2 * own + SETTLE + TOLERANCE, f"{name}: {latency:.2f} s"
        assert delivered[name] < delivered["DJI_0100.MP4"]
    # The video kept going: it took about its own time, plus the photos' bytes.
    video_time = delivered["DJI_0100.MP4"] - video_landed
    assert video_time <= (VIDEO + 3 * PHOTO) / RATE * 1.25 + 2, video_time
    assert daemon.engine.queue.counts()["dead"] == 0
