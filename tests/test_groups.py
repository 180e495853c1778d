"""Groups (flights): files that belong together, completed once quiet, reported to every sink.

The photos are the real ones of ``tests/data/drone`` (see its README); the eBee's own position
table is the truth the flight report is checked against.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
import servers
from fakes.recorder import Recorder
from helpers import (
    DRONE_DATA,
    EBEE,
    NIKON,
    Daemon,
    WriteConfig,
    ebee_positions,
    run_once,
    s3_sink,
    skyframe,
    spawn_daemon,
    wait_for,
)
from PIL import Image

from skyframe.drone.report import ReportFile, convex_hull, feature_collection, geo_txt
from skyframe.events import LifecycleEvent
from skyframe.groups import Group
from skyframe.markers import hookimpl


def two_flights(incoming: Path) -> None:
    """flight-07: the eBee's three photos; flight-08: the Nikon's, one without EXIF."""
    (incoming / "flight-07").mkdir(parents=True, exist_ok=True)
    (incoming / "flight-08").mkdir(parents=True, exist_ok=True)
    for photo in sorted(EBEE.glob("*.JPG")):
        shutil.copy(photo, incoming / "flight-07" / photo.name)
    for photo in sorted(NIKON.glob("*.jpg")):
        shutil.copy(photo, incoming / "flight-08" / photo.name)


CONFIG = """\
state_dir: .state
pipelines:
  - name: survey
    source: {path: incoming, recursive: true, settle: 0}
    processes: [geotag]
    groups:
      - flight: {by: folder, quiet: 10m}
    sinks:
      - url: outbox
"""


def flights_completed(recorder: Recorder) -> list[LifecycleEvent]:
    return [e for e in recorder.events if e.kind == "flight-complete"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_flight_07(read: Any) -> None:
    """The eBee flight's report, read through ``read(name) -> bytes``, against the truth."""
    table = ebee_positions()
    collection = json.loads(read("flight.geojson"))
    points = [f for f in collection["features"] if f["geometry"]["type"] == "Point"]
    assert sorted(f["properties"]["name"] for f in points) == sorted(table)
    for feature in points:
        truth = table[feature["properties"]["name"]]
        lon, lat, alt = feature["geometry"]["coordinates"]
        assert lon == pytest.approx(truth["longitude"], abs=1e-6)
        assert lat == pytest.approx(truth["latitude"], abs=1e-6)
        assert alt == pytest.approx(truth["altitude_wgs84"], abs=1e-3)
    (footprint,) = [f for f in collection["features"] if f["geometry"]["type"] == "Polygon"]
    ring = footprint["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    assert len(ring) == 4  # three photos: a triangle
    geo = read("geo.txt").decode().splitlines()
    assert geo[0] == "EPSG:4326"
    for line in geo[1:]:
        name, lon, lat, _alt, yaw, *_angles_and_accuracy = line.split()
        truth = table[name]
        assert float(lon) == pytest.approx(truth["longitude"], abs=1e-6)
        assert float(lat) == pytest.approx(truth["latitude"], abs=1e-6)
        assert float(yaw) == pytest.approx(truth["heading"], abs=1e-6)
    assert len(geo) == 4
    sums = read("manifest.sha256").decode().splitlines()
    assert sums == [f"{sha256(EBEE / name)}  {name}" for name in sorted(table)]


def test_report_builders() -> None:
    assert convex_hull([(0, 0), (1, 1), (2, 2)]) == [(0, 0), (2, 2)]  # on one line
    hull = convex_hull([(0, 0), (2, 0), (1, 1), (2, 2), (0, 2)])
    assert sorted(hull) == [(0, 0), (0, 2), (2, 0), (2, 2)]  # (1, 1) is inside
    files = [
        ReportFile("a b.jpg", "0" * 64, {"lat": 1.0, "lon": 2.0}),
        ReportFile("c.jpg", "1" * 64, {"lat": 3.0, "lon": 4.0, "altitude": 5.0}),
        ReportFile("d.log", "2" * 64, None),
    ]
    geo = geo_txt(files)
    assert geo == b"EPSG:4326\nc.jpg 4.0 3.0 5.0\n"  # a name with a space cannot be written
    collection = feature_collection(files, flight="f")
    assert [f["geometry"]["coordinates"] for f in collection["features"]] == [
        [2.0, 1.0],
        [4.0, 3.0, 5.0],
    ]  # two positions: no footprint
    assert geo_txt([files[2]]) is None


def test_two_flights_are_reported_then_a_late_photo_reopens_one(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    two_flights(tmp_path / "incoming")
    config = write_config(CONFIG)
    recorder = Recorder()
    summary = run_once(config, recorder)
    assert summary.ok
    assert summary.completed == {"flight": 2}
    outbox = tmp_path / "outbox"
    check_flight_07(lambda name: (outbox / "flight-07" / name).read_bytes())
    geo_08 = (outbox / "flight-08" / "geo.txt").read_text().splitlines()
    assert [line.split()[0] for line in geo_08[1:]] == [
        "DSCN0010.jpg",
        "DSCN0012.jpg",
        "DSCN0021.jpg",
    ]  # no_exif.jpg has no position: in the sha256 list only
    assert "no_exif.jpg" in (outbox / "flight-08" / "manifest.sha256").read_text()
    events = {e.relpath: e for e in flights_completed(recorder)}
    assert set(events) == {"flight-07", "flight-08"}
    assert events["flight-08"].meta == {
        "files": 4,
        "bytes": sum(p.stat().st_size for p in NIKON.glob("*.jpg")),
        "with_position": 3,
        "reports": 1,
        "added": ["flight.geojson", "geo.txt", "manifest.sha256"],
    }
    assert events["flight-07"].remote == "flight-07"

    again = Recorder()
    assert run_once(config, again).completed == {}  # nothing arrived: nothing to report
    shutil.copy(NIKON / "DSCN0010.jpg", tmp_path / "incoming" / "flight-07" / "late.jpg")
    late = Recorder()
    assert run_once(config, late).completed == {"flight": 1}
    (event,) = flights_completed(late)
    assert (event.relpath, event.meta["files"], event.meta["reports"]) == ("flight-07", 4, 2)  # type: ignore[index]
    sums = (outbox / "flight-07" / "manifest.sha256").read_text().splitlines()
    assert len(sums) == 4  # the report was replaced
    history = skyframe(tmp_path, "history")
    assert history.returncode == 0, history.stderr
    lines = [x for x in history.stdout.splitlines() if "flight-complete" in x]
    assert len(lines) == 3
    assert lines[-1].endswith("flight-07 (4 file(s), 4 with a position, reported again)")


def capture_at(path: Path, stamp: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = stamp  # DateTimeOriginal
    Image.new("RGB", (32, 24)).save(path, "JPEG", exif=exif)


def test_flights_by_time_gap(tmp_path: Path, write_config: WriteConfig) -> None:
    incoming = tmp_path / "incoming"
    capture_at(incoming / "a.jpg", "2024:05:17 10:15:02")
    capture_at(incoming / "b.jpg", "2024:05:17 10:17:00")
    capture_at(incoming / "c.jpg", "2024:05:17 12:30:00")  # two hours later: another flight
    (incoming / "notes.txt").write_text("no capture time: its mtime (today) places it")
    config = write_config(CONFIG.replace("by: folder", "by: time_gap, gap: 5m"))
    recorder = Recorder()
    assert run_once(config, recorder).completed == {"flight": 3}
    keys = sorted(e.relpath for e in flights_completed(recorder))
    assert keys[:2] == ["flight-20240517-101502", "flight-20240517-123000"]
    sums = (tmp_path / "outbox" / "flight-20240517-101502-manifest.sha256").read_text()
    assert [line.split()[1] for line in sums.splitlines()] == ["a.jpg", "b.jpg"]
    assert (tmp_path / "outbox" / "flight-20240517-123000-flight.geojson").exists()


class OdmTask:
    """A group plugin: adds a file to every completed group; fails once first."""

    def __init__(self) -> None:
        self.calls: list[Group] = []
        self.fail = True

    @hookimpl
    def skyframe_group_complete(self, group: Group) -> None:
        self.calls.append(group)
        if self.fail:
            self.fail = False
            raise RuntimeError("the processing server is away")
        task = {"flight": group.key, "images": [f.remote for f in group.files]}
        group.add_file("odm-task.json", json.dumps(task).encode())


def test_a_group_plugin_adds_files_and_a_failure_leaves_the_group_open(
    tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("skyframe.groups.RETRY_AFTER", 0.2)
    two_flights(tmp_path / "incoming")
    shutil.rmtree(tmp_path / "incoming" / "flight-08")
    config = write_config(CONFIG.replace("quiet: 10m", "quiet: 0.3s, report: false"))
    plugin = OdmTask()
    with Daemon(config, plugin) as daemon:
        wait_for(lambda: len(plugin.calls) >= 2, what="the group completed after a failure")
        wait_for(
            lambda: any(e.kind == "flight-complete" for e in daemon.recorder.events),
            what="flight-complete",
        )
    first = plugin.calls[-1]
    assert first.files[0].landed == {"outbox": str(tmp_path / "outbox" / first.files[0].remote)}
    assert first.files[0].meta["photo"]["dialect"] == "sensefly"
    task = json.loads((tmp_path / "outbox" / "flight-07" / "odm-task.json").read_text())
    assert task == {
        "flight": "flight-07",
        "images": [f"flight-07/{n}" for n in sorted(ebee_positions())],
    }
    assert not (tmp_path / "outbox" / "flight-07" / "geo.txt").exists()  # report: false


DAEMON_CONFIG = """\
state_dir: .state
shutdown_grace: 1s
api: {enabled: false}
pipelines:
  - name: survey
    source: {path: incoming, recursive: true, settle: 0}
    processes: [geotag]
    groups:
      - flight: {by: folder, quiet: 4s}
    sinks:
      - url: outbox
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_sigkill_while_a_flight_is_open_loses_neither_flight_nor_report(
    tmp_path: Path, write_config: WriteConfig, request: pytest.FixtureRequest, where: str
) -> None:
    if where == "s3":
        sink = s3_sink(request.getfixturevalue("s3_server"))
        fs = fsspec.filesystem("s3", **sink["options"])
        root = sink["url"].removeprefix("s3://") + "/flight-07"

        def read(name: str) -> bytes:
            fs.invalidate_cache()  # the listing delivered() cached may predate the file
            return bytes(fs.cat_file(f"{root}/{name}"))

        def delivered() -> list[str]:
            fs.invalidate_cache()
            return [p.rsplit("/", 1)[1] for p in fs.find(root)] if fs.exists(root) else []

        config = DAEMON_CONFIG.replace(
            "      - url: outbox\n", "      - " + json.dumps(sink) + "\n"
        )
    else:
        folder = tmp_path / "outbox" / "flight-07"

        def read(name: str) -> bytes:
            return (folder / name).read_bytes()

        def delivered() -> list[str]:
            return [p.name for p in folder.iterdir()] if folder.is_dir() else []

        config = DAEMON_CONFIG
    write_config(config)
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(tmp_path, log)
    try:
        two_flights(tmp_path / "incoming")
        shutil.rmtree(tmp_path / "incoming" / "flight-08")
        wait_for(
            lambda: sum(n.startswith("IMG_") for n in delivered()) == 3,
            what="the photos delivered",
            timeout=60,
        )
        assert "geo.txt" not in delivered()  # still quiet for 4 s: the flight is open
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        daemon = spawn_daemon(tmp_path, log)
        wait_for(lambda: "geo.txt" in delivered(), what="the report after a restart", timeout=60)
        time.sleep(2.0)  # a second completion would have come by now
    finally:
        daemon.terminate()
        daemon.wait(30)
    check_flight_07(read)
    history = skyframe(tmp_path, "history")
    assert history.returncode == 0, history.stderr
    assert sum("flight-complete" in line for line in history.stdout.splitlines()) == 1, (
        log.read_text(errors="replace")[-3000:]
    )


def test_flights_reported_on_s3(
    tmp_path: Path, write_config: WriteConfig, s3_server: servers.S3Server
) -> None:
    two_flights(tmp_path / "incoming")
    sink = s3_sink(s3_server)
    config = write_config(
        CONFIG.replace("      - url: outbox\n", "      - " + json.dumps(sink) + "\n")
    )
    assert run_once(config).completed == {"flight": 2}
    fs = fsspec.filesystem("s3", **sink["options"])
    root = sink["url"].removeprefix("s3://")
    check_flight_07(lambda name: fs.cat_file(f"{root}/flight-07/{name}"))
    sums = fs.cat_file(f"{root}/flight-08/manifest.sha256").decode().splitlines()
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256(fs.cat_file(f"{root}/flight-08/{name}")).hexdigest() == digest
    assert len(sums) == 4


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("[{Flight: {}}]", "groups[0].name"),
        ("[{flight: {by: day}}]", "'folder' or 'time_gap'"),
        ("[{flight: {quiet: 0s}}]", "quiet"),
        ("[flight, flight]", "two groups named 'flight'"),
        ("[{flight: {by: folder, extra: 1}}]", "extra"),
    ],
)
def test_bad_groups_are_config_errors(
    tmp_path: Path, write_config: WriteConfig, groups: str, message: str
) -> None:
    write_config(
        CONFIG.replace("groups:\n      - flight: {by: folder, quiet: 10m}", f"groups: {groups}")
    )
    done = skyframe(tmp_path, "run", "--once", "skyframe.yaml")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_rtk_event_file_places_the_flights_photos(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    # The real .MRK of a Phantom 4 RTK flight; its photos are not in the repository, so the
    # flight's 176 photos are stand-ins made here (JPEGs without EXIF), named as DJI does.
    from skyframe.drone.telemetry import read_mrk

    mrk = DRONE_DATA / "dji-rtk" / "101FTASK_Timestamp.mrk"
    points = read_mrk(mrk.read_text())
    assert len(points) == 176
    assert (points[0].index, points[0].lat, points[0].lon) == (2, 47.6436873208, 16.4759271684)
    assert (points[0].height, points[0].std_vertical, points[0].quality) == (512.998, 0.029694, 50)
    flight = tmp_path / "incoming" / "101FTASK"
    flight.mkdir()
    shutil.copy(mrk, flight / mrk.name)
    for i in range(len(points)):
        Image.new("RGB", (8, 8)).save(flight / f"DJI_{i + 2:04d}.JPG", "JPEG")
    assert run_once(write_config(CONFIG)).completed == {"flight": 1}
    geo = (tmp_path / "outbox" / "101FTASK" / "geo.txt").read_text().splitlines()
    assert len(geo) == 1 + len(points)
    for line, point in zip(geo[1:], points, strict=True):
        name, lon, lat, height, _yaw, _pitch, _roll, horizontal, vertical = line.split()
        assert name == f"DJI_{point.index:04d}.JPG"
        assert (float(lat), float(lon), float(height)) == (point.lat, point.lon, point.height)
        assert point.std_north is not None
        assert point.std_east is not None
        assert float(horizontal) == pytest.approx(math.hypot(point.std_north, point.std_east))
        assert float(vertical) == point.std_vertical
    collection = json.loads((tmp_path / "outbox" / "101FTASK" / "flight.geojson").read_text())
    first = collection["features"][0]
    assert first["properties"]["position_source"] == "mrk"
    assert first["geometry"]["coordinates"] == [16.4759271684, 47.6436873208, 512.998]


def test_a_time_gap_group_is_named_after_its_earliest_capture(tmp_path: Path) -> None:
    from skyframe.config import GroupConfig
    from skyframe.groups import GroupStore

    spec = GroupConfig.model_validate({"flight": {"by": "time_gap", "gap": "5m"}})
    store = GroupStore(tmp_path)
    t0 = 1_715_940_902.0  # 2024-05-17 10:15:02 UTC
    store.arrived("p", [spec], [("b.jpg", t0 + 118)])
    store.arrived("p", [spec], [("a.jpg", t0)])  # earlier, arriving later
    store.arrived("p", [spec], [("z.jpg", t0 + 7200)])  # two hours on: another group
    keys = [g["key"] for g in store.summary()]
    assert sorted(keys) == ["flight-20240517-101502", "flight-20240517-121502"]
    assert store.members("p", "flight", "flight-20240517-101502") == ["a.jpg", "b.jpg"]
    (key,) = store.due("p", spec, time.time() + 1, final=True)[:1]
    assert store.mark_reported("p", "flight", key, time.time())
    store.arrived("p", [spec], [("early.jpg", t0 - 60)])  # reported: the name stays
    members = store.members("p", "flight", "flight-20240517-101502")
    assert members == ["a.jpg", "b.jpg", "early.jpg"]
    store.close()
