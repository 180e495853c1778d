"""Drone photos: metadata read from the files themselves (``geotag``), recorded with each
delivery, and the rule ``inside``.

The real photos under ``tests/data/drone`` (see its README) come with their own truth: the
senseFly eBee's position table, and the published position of a Nikon photo. The DJI, Parrot
and Pix4D/MicaSense layouts are built here with Pillow, which writes EXIF and XMP, in the
public layouts of those makers; no such camera's file is in the repository.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from fakes.recorder import Recorder
from helpers import DRONE_DATA, EBEE, NIKON, WriteConfig, ebee_positions, run_once, skyframe
from PIL import Image

from skyframe.drone import metadata, photo_summary
from skyframe.drone.metadata import PhotoMeta, read_photo
from skyframe.state import Manifest, ManifestEntry


@pytest.mark.parametrize("name", ["IMG_2168.JPG", "IMG_2171.JPG", "IMG_2186.JPG"])
def test_ebee_positions_equal_the_drones_own_table(name: str) -> None:
    truth = ebee_positions()[name]
    meta = read_photo(EBEE / name)
    assert meta.error is None
    assert meta.lat == pytest.approx(truth["latitude"], abs=1e-6)
    assert meta.lon == pytest.approx(truth["longitude"], abs=1e-6)
    assert meta.altitude == pytest.approx(truth["altitude_wgs84"], abs=1e-3)
    # senseFly's XMP: the camera's orientation as the drone logged it.
    assert meta.yaw == pytest.approx(truth["heading"], abs=1e-6)
    assert meta.pitch == pytest.approx(truth["pitch"], abs=1e-6)
    assert meta.roll == pytest.approx(truth["roll"], abs=1e-6)
    assert (meta.dialect, meta.make, meta.model) == ("sensefly", "Canon", "Canon IXUS 125 HS")
    assert meta.captured is not None
    assert meta.captured.startswith("2014-07-12T")
    assert meta.xy_accuracy is not None
    assert 0 < meta.xy_accuracy < 20
    assert (meta.width, meta.height) == (4608, 3456)


def test_a_camera_photo_with_gps_and_one_without_exif() -> None:
    meta = read_photo(NIKON / "DSCN0010.jpg")
    assert meta.lat == pytest.approx(43.4674483, abs=1e-6)
    assert meta.lon == pytest.approx(11.8851267, abs=1e-6)
    assert meta.captured == "2008-10-22T16:28:39"  # camera local time: no offset recorded
    assert meta.altitude is None  # the camera wrote none
    bare = read_photo(NIKON / "no_exif.jpg")
    assert not bare.has_position
    assert bare.error is None  # a photo without GPS is not broken
    assert photo_summary(bare.to_json()) == "no position"


def jpeg(path: Path, *, exif: Image.Exif | None = None, xmp: str | None = None) -> Path:
    """A small real JPEG written by Pillow, with the given EXIF and XMP."""
    image = Image.new("RGB", (64, 48), (40, 120, 200))
    options: dict[str, Any] = {}
    if exif is not None:
        options["exif"] = exif
    if xmp is not None:
        options["xmp"] = xmp.encode()
    image.save(path, "JPEG", **options)
    return path


def xmp_packet(namespace: str, prefix: str, values: dict[str, str], *, as_elements: bool) -> str:
    """An XMP packet with one rdf:Description, values as attributes or as elements (both
    are valid XMP; makers write either)."""
    if as_elements:
        body = "".join(f"<{prefix}:{k}>{v}</{prefix}:{k}>" for k, v in values.items())
        attributes = ""
    else:
        body = ""
        attributes = " ".join(f'{prefix}:{k}="{v}"' for k, v in values.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:{prefix}="{namespace}" {attributes}>{body}'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )


def test_dji_xmp_gives_position_altitudes_gimbal_and_rtk_accuracy(tmp_path: Path) -> None:
    # The layout of DJI's drone-dji XMP (attributes), as a Phantom 4 RTK writes it; no EXIF
    # GPS here, so the position comes from the XMP.
    values = {
        "GpsLatitude": "47.6436873208",
        "GpsLongtitude": "16.4759271684",  # sic: DJI's spelling on several models
        "AbsoluteAltitude": "+512.998",
        "RelativeAltitude": "+75.120",
        "GimbalYawDegree": "-12.30",
        "GimbalPitchDegree": "-90.00",
        "GimbalRollDegree": "+0.00",
        "RtkStdLon": "0.013698",
        "RtkStdLat": "0.014391",
        "RtkStdHgt": "0.029694",
    }
    path = jpeg(
        tmp_path / "DJI_0001.JPG",
        xmp=xmp_packet("http://www.dji.com/drone-dji/1.0/", "drone-dji", values, as_elements=False),
    )
    meta = read_photo(path)
    assert meta.dialect == "dji"
    assert (meta.lat, meta.lon) == (47.6436873208, 16.4759271684)
    assert (meta.altitude, meta.relative_altitude) == (512.998, 75.12)
    assert (meta.yaw, meta.pitch, meta.roll) == (-12.3, -90.0, 0.0)
    assert meta.xy_accuracy == pytest.approx((0.013698**2 + 0.014391**2) ** 0.5)
    assert meta.z_accuracy == 0.029694


@pytest.mark.parametrize(
    ("namespace", "prefix", "names", "dialect"),
    [
        (
            "http://www.parrot.com/drone-parrot/1.0/",
            "drone-parrot",
            ("CameraYawDegree", "CameraPitchDegree", "CameraRollDegree"),
            "parrot",
        ),
        ("http://pix4d.com/camera/1.0/", "Camera", ("Yaw", "Pitch", "Roll"), "pix4d"),
        ("http://ns.sensefly.com/Camera/1.0/", "Camera", ("Yaw", "Pitch", "Roll"), "sensefly"),
    ],
)
def test_the_orientation_of_other_makers(
    tmp_path: Path, namespace: str, prefix: str, names: tuple[str, str, str], dialect: str
) -> None:
    values = dict(zip(names, ("271.5", "-89.9", "1.25"), strict=True))
    path = jpeg(tmp_path / "a.jpg", xmp=xmp_packet(namespace, prefix, values, as_elements=True))
    meta = read_photo(path)
    assert (meta.dialect, meta.yaw, meta.pitch, meta.roll) == (dialect, 271.5, -89.9, 1.25)


def gps_exif(
    lat: tuple[tuple[float, float, float], str],
    lon: tuple[tuple[float, float, float], str],
    altitude: float,
) -> Image.Exif:
    """EXIF with a GPS position (degrees, minutes, seconds; and N/S, E/W) and an altitude
    (negative: below sea level), a maker, and a capture time with its UTC offset."""
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: lat[1], 2: lat[0], 3: lon[1], 4: lon[0]})
    gps.update({5: b"\x01" if altitude < 0 else b"\x00", 6: abs(altitude)})
    exif[0x010F] = "TestMaker"
    details = exif.get_ifd(0x8769)
    details[0x9003] = "2026:05:04 10:11:12"  # DateTimeOriginal
    details[0x9011] = "-03:00"  # OffsetTimeOriginal
    return exif


def test_south_west_below_sea_level_and_a_recorded_offset(tmp_path: Path) -> None:
    exif = gps_exif(((33.0, 51.0, 54.0), "S"), ((151.0, 12.0, 36.0), "W"), -12.5)
    meta = read_photo(jpeg(tmp_path / "a.jpg", exif=exif))
    assert meta.lat == pytest.approx(-(33 + 51 / 60 + 54 / 3600))
    assert meta.lon == pytest.approx(-(151 + 12 / 60 + 36 / 3600))
    assert meta.altitude == -12.5
    assert meta.captured == "2026-05-04T10:11:12-03:00"
    assert meta.make == "TestMaker"


def all_photos() -> list[Path]:
    return sorted(p for p in DRONE_DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def test_a_jpegs_directories_read_on_demand_give_what_pillows_full_reading_gives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A JPEG's GPS and Exif directories are decoded tag by tag when asked for; without that
    # path (a block the directory class cannot start on), Pillow's getexif() decodes all.
    made = jpeg(
        tmp_path / "a.jpg",
        exif=gps_exif(((33.0, 51.0, 54.0), "S"), ((151.0, 12.0, 36.0), "W"), -12.5),
    )
    photos = [*all_photos(), made]
    on_demand = [read_photo(p) for p in photos]
    calls = []

    def refuse(*args: object) -> None:
        calls.append(args)
        raise ValueError("not a TIFF header")

    monkeypatch.setattr(metadata, "_lazy_directories", refuse)
    whole = [read_photo(p) for p in photos]
    assert len(calls) == len(photos)  # each has an EXIF block (no_exif.jpg: without GPS)
    assert on_demand == whole
    assert sum(m.has_position for m in whole) == len(photos) - 1  # all but no_exif.jpg


def test_a_tiff_is_read_through_pillows_reading(tmp_path: Path) -> None:
    # A TIFF's tags are its own directory (no EXIF block): the getexif() path.
    exif = Image.Exif()
    exif[0x010F] = "TestMaker"
    exif[0x0110] = "Scanner 9"
    path = tmp_path / "scan.tif"
    Image.new("RGB", (32, 24), (10, 20, 30)).save(path, "TIFF", exif=exif)
    meta = read_photo(path)
    assert (meta.make, meta.model) == ("TestMaker", "Scanner 9")
    assert (meta.width, meta.height, meta.error) == (32, 24, None)


def test_a_damaged_exif_value_is_reported_not_raised(tmp_path: Path) -> None:
    photo = jpeg(
        tmp_path / "a.jpg",
        exif=gps_exif(((33.0, 51.0, 54.0), "S"), ((151.0, 12.0, 36.0), "W"), -12.5),
    )
    data = bytearray(photo.read_bytes())
    exif_at = data.index(b"Exif\x00\x00")
    del data[exif_at + 60 :]  # the EXIF block stops in the middle of its directories
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(bytes(data))
    meta = read_photo(cut)
    assert meta.error is not None
    assert not meta.has_position


def test_broken_files_are_reported_in_their_metadata(tmp_path: Path) -> None:
    whole = (NIKON / "DSCN0010.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    meta = read_photo(cut)
    assert meta.error == "truncated: the JPEG has no end-of-image marker"
    assert meta.lat == pytest.approx(43.4674483, abs=1e-6)  # the header was whole
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(whole + bytes(4096))  # some cameras pad their files after the marker
    assert read_photo(padded).error is None
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo at all")
    assert read_photo(text).error == "not an image format this version reads"
    bad_xmp = jpeg(tmp_path / "x.jpg", xmp="<x:xmpmeta><unclosed>")
    meta = read_photo(bad_xmp)
    assert meta.error is not None
    assert meta.error.startswith("unreadable XMP: ")
    assert (meta.width, meta.height) == (64, 48)
    with pytest.raises(FileNotFoundError):
        read_photo(tmp_path / "gone.jpg")


def test_readings_in_many_threads_leave_the_processs_warning_filters_as_they_were(
    tmp_path: Path,
) -> None:
    # geotag reads in every processing worker at once; each reading ignores Pillow's
    # warnings for a moment. Those moments must not leave the process ignoring warnings.
    photo = jpeg(
        tmp_path / "a.jpg",
        exif=gps_exif(((33.0, 51.0, 54.0), "S"), ((151.0, 12.0, 36.0), "W"), -12.5),
    )
    data = bytearray(photo.read_bytes())
    del data[data.index(b"Exif\x00\x00") + 60 :]
    (tmp_path / "cut.jpg").write_bytes(bytes(data))  # Pillow warns as it reads this one
    photos = [*all_photos(), tmp_path / "cut.jpg"]
    before = list(warnings.filters)
    failures: list[BaseException] = []

    def read_all() -> None:
        try:
            for _ in range(60):
                for path in photos:
                    read_photo(path)
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=read_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert warnings.filters == before


def test_metadata_round_trips_through_json() -> None:
    meta = read_photo(EBEE / "IMG_2168.JPG")
    again = PhotoMeta.from_json(json.loads(json.dumps(meta.to_json())))
    assert again == meta
    summary = photo_summary(meta.to_json())
    assert summary == "at 37.544230,139.040772 259.8 m, taken 2014-07-12T08:25:33"


def test_geotag_records_each_photos_metadata_with_its_delivery(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    flight = tmp_path / "incoming" / "flight-07"
    flight.mkdir(parents=True)
    for name in ("IMG_2168.JPG", "IMG_2171.JPG"):
        shutil.copy(EBEE / name, flight / name)
    shutil.copy(NIKON / "no_exif.jpg", flight / "no_exif.jpg")
    (flight / "flight.log").write_text("not a photo")
    (flight / "broken.jpg").write_bytes(b"\xff\xd8 a cut-off copy")
    config = write_config(
        """
        state_dir: .state
        pipelines:
          - name: survey
            source: {path: incoming, settle: 0}
            processes: [geotag]
            sinks:
              - url: outbox
        """
    )
    recorder = Recorder()
    summary = run_once(config, recorder)
    assert summary.ok
    assert summary.delivered == 5  # geotag never fails a file
    metas = {e.relpath: e.meta for e in recorder.events if e.kind == "delivered"}
    table = ebee_positions()
    photo = metas["flight-07/IMG_2168.JPG"]["photo"]  # type: ignore[index]
    assert photo["lat"] == pytest.approx(table["IMG_2168.JPG"]["latitude"], abs=1e-6)
    assert metas["flight-07/no_exif.jpg"] == {"photo": {"width": 322, "height": 466}}
    assert metas["flight-07/flight.log"] is None  # not a photo: nothing to say
    broken = metas["flight-07/broken.jpg"]["photo"]  # type: ignore[index]
    assert broken["error"].startswith("not a")
    manifest = Manifest(tmp_path / ".state" / "manifest")
    entries = {relpath: entry for _, _, relpath, entry in manifest.entries()}
    manifest.close()
    recorded = entries["flight-07/IMG_2171.JPG"].meta
    assert recorded is not None
    assert recorded["photo"]["lon"] == pytest.approx(table["IMG_2171.JPG"]["longitude"], abs=1e-6)
    history = skyframe(tmp_path, "history")
    assert history.returncode == 0, history.stderr
    delivered = [x for x in history.stdout.splitlines() if " delivered " in x]
    line = next(x for x in delivered if "IMG_2168.JPG" in x)
    assert line.endswith("[at 37.544230,139.040772 259.8 m, taken 2014-07-12T08:25:33]")
    assert next(x for x in delivered if "no_exif" in x).endswith("[no position]")


SITES = """
state_dir: .state
pipelines:
  - name: japan
    source: {path: incoming, settle: 0}
    rules:
      - inside: {box: [139.0, 37.5, 139.1, 37.6]}
    sinks:
      - url: site-japan
  - name: italy
    source: {path: incoming, settle: 0}
    rules:
      - inside:
          area:
            type: Feature
            geometry:
              type: Polygon
              coordinates:
                - [[11.8, 43.4], [12.0, 43.4], [12.0, 43.5], [11.8, 43.5], [11.8, 43.4]]
                # a hole around one of the photos (DSCN0012: 43.46716 N, 11.88539 E)
                - [[11.8852, 43.4670], [11.8856, 43.4670], [11.8856, 43.4673],
                   [11.8852, 43.4673], [11.8852, 43.4670]]
    sinks:
      - url: site-italy
"""


def test_inside_routes_photos_by_where_they_were_taken(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    incoming = tmp_path / "incoming"
    shutil.copy(EBEE / "IMG_2168.JPG", incoming)
    for name in ("DSCN0010.jpg", "DSCN0012.jpg", "no_exif.jpg"):
        shutil.copy(NIKON / name, incoming)
    summary = run_once(write_config(SITES))
    assert sorted(p.name for p in (tmp_path / "site-japan").iterdir()) == ["IMG_2168.JPG"]
    assert sorted(p.name for p in (tmp_path / "site-italy").iterdir()) == ["DSCN0010.jpg"]
    # Each site rejects the other site's photos and no_exif.jpg; Italy also the one in its hole.
    assert summary.rejected["inside"] == 6
    accepting = SITES.replace(
        "- inside: {box: [139.0, 37.5, 139.1, 37.6]}",
        "- inside: {box: [139.0, 37.5, 139.1, 37.6], missing: accept}",
    )
    shutil.rmtree(tmp_path / ".state")
    run_once(write_config(accepting))
    assert sorted(p.name for p in (tmp_path / "site-japan").iterdir()) == [
        "IMG_2168.JPG",
        "no_exif.jpg",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{box: [1, 2, 3]}", "box takes four numbers: [west, south, east, north]"),
        ("{box: [10, 50, 20, 40]}", "south <= north"),
        ("{area: {type: Point, coordinates: [1, 2]}}", "not 'Point'"),
        ("{area: {type: Polygon, coordinates: [[[0, 0], [1, 1]]]}}", "at least four positions"),
    ],
)
def test_bad_areas_are_config_errors(
    tmp_path: Path, write_config: WriteConfig, options: str, message: str
) -> None:
    write_config(
        f"""
        pipelines:
          - name: survey
            source: {{path: incoming}}
            rules:
              - inside: {options}
            sinks:
              - url: outbox
        """
    )
    done = skyframe(tmp_path, "run", "--once", "skyframe.yaml")
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# DJI's subtitle layouts, as their drones write them (recent models, then older ones); no DJI
# video is in the repository.
SRT_RECENT = """\
1
00:00:00,000 --> 00:00:00,033
<font size="28">FrameCnt: 1, DiffTime: 33ms
2024-05-17 10:15:02.123
[iso: 100] [shutter: 1/1000.0] [fnum: 2.8] [ev: 0] [latitude: 47.643687] \
[longtitude: 16.475927] [rel_alt: 75.100 abs_alt: 512.500] </font>

2
00:00:00,033 --> 00:00:00,066
<font size="28">FrameCnt: 2, DiffTime: 33ms
2024-05-17 10:15:02.156
[iso: 100] [latitude: 0.000000] [longitude: 0.000000] [rel_alt: 75.100 abs_alt: 512.500] </font>

3
00:00:01,000 --> 00:00:01,033
<font size="28">FrameCnt: 30, DiffTime: 33ms
2024-05-17 10:15:03.123
[iso: 100] [latitude: 47.643648] [longitude: 16.475895] [rel_alt: 75.200 abs_alt: 512.600] </font>
"""

SRT_OLDER = """\
1
00:00:01,000 --> 00:00:02,000
HOME(16.4759,47.6437) 2018.05.17 10:15:02
GPS(16.475927,47.643687,19) ISO:100 Shutter:60 EV: Fnum:F2.2 BAROMETER:75.1

2
00:00:02,000 --> 00:00:03,000
HOME(16.4759,47.6437) 2018.05.17 10:15:03
GPS(16.475895,47.643648,19) ISO:100 Shutter:60 EV: Fnum:F2.2 BAROMETER:75.3
"""


def test_dji_subtitles_become_a_track() -> None:
    from skyframe.drone.telemetry import read_srt, track_geojson

    recent = read_srt(SRT_RECENT)
    assert [(p.seconds, p.lat, p.lon, p.rel_alt, p.abs_alt) for p in recent] == [
        (0.0, 47.643687, 16.475927, 75.1, 512.5),
        (1.0, 47.643648, 16.475895, 75.2, 512.6),
    ]  # the frame without a fix (0, 0) is left out
    assert recent[0].time == "2024-05-17 10:15:02.123"
    older = read_srt(SRT_OLDER)
    assert [(p.seconds, p.lat, p.lon, p.rel_alt) for p in older] == [
        (1.0, 47.643687, 16.475927, 75.1),
        (2.0, 47.643648, 16.475895, 75.3),
    ]
    (feature,) = track_geojson(recent, name="DJI_0003.SRT")["features"]
    assert feature["geometry"] == {
        "type": "LineString",
        "coordinates": [[16.475927, 47.643687, 512.5], [16.475895, 47.643648, 512.6]],
    }
    assert feature["properties"]["start"] == "2024-05-17 10:15:02.123"
    assert read_srt("not a subtitle file") == []


def test_geotag_turns_a_videos_subtitles_into_a_track_beside_it(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "incoming" / "DJI_0003.SRT").write_text(SRT_RECENT)
    (tmp_path / "incoming" / "empty.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    config = write_config(
        """
        state_dir: .state
        pipelines:
          - name: survey
            source: {path: incoming, settle: 0}
            processes: [geotag]
            sinks:
              - url: outbox
        """
    )
    recorder = Recorder()
    assert run_once(config, recorder).delivered == 2
    track = json.loads((tmp_path / "outbox" / "DJI_0003.SRT.geojson").read_text())
    assert track["features"][0]["properties"]["points"] == 2
    metas = {e.relpath: e.meta for e in recorder.events if e.kind == "delivered"}
    assert metas["DJI_0003.SRT"] == {
        "track": {
            "points": 2,
            "start_seconds": 0.0,
            "end_seconds": 1.0,
            "start": "2024-05-17 10:15:02.123",
            "end": "2024-05-17 10:15:03.123",
        }
    }
    assert metas["empty.srt"] == {"track": {"points": 0}}
    assert not (tmp_path / "outbox" / "empty.srt.geojson").exists()


def test_thumbnails_are_delivered_beside_photos(tmp_path: Path, write_config: WriteConfig) -> None:
    incoming = tmp_path / "incoming"
    shutil.copy(EBEE / "IMG_2168.JPG", incoming)
    whole = (NIKON / "DSCN0010.jpg").read_bytes()
    (incoming / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # cannot be decoded
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; shown rotated 90 degrees
    Image.new("RGB", (400, 200), (200, 30, 30)).save(incoming / "turned.jpg", exif=exif)
    (incoming / "notes.txt").write_text("not a photo")
    config = write_config(
        """
        state_dir: .state
        pipelines:
          - name: survey
            source: {path: incoming, settle: 0}
            processes:
              - thumbnail: {max_px: 256}
            sinks:
              - url: outbox
        """
    )
    assert run_once(config).delivered == 4  # the cut photo is delivered, without a thumbnail
    outbox = tmp_path / "outbox"
    with Image.open(outbox / "IMG_2168.JPG.thumb.jpg") as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (256, 192))
    with Image.open(outbox / "turned.jpg.thumb.jpg") as thumb:
        assert thumb.size == (128, 256)  # upright: taller than wide
    assert sorted(p.name for p in outbox.iterdir()) == [
        "IMG_2168.JPG",
        "IMG_2168.JPG.thumb.jpg",
        "cut.jpg",
        "notes.txt",
        "turned.jpg",
        "turned.jpg.thumb.jpg",
    ]
    write_config(
        """
        pipelines:
          - name: survey
            source: {path: incoming}
            processes:
              - thumbnail: {max_px: 8}
            sinks:
              - url: outbox
        """
    )
    done = skyframe(tmp_path, "validate", "skyframe.yaml")
    assert done.returncode != 0
    assert "max_px" in done.stderr


def test_the_metadata_and_its_manifest_record_are_plain_copies_of_their_fields(
    tmp_path: Path,
) -> None:
    # Built field by field (asdict() deep-copies): the same dicts, and what a manifest keeps.
    meta = read_photo(EBEE / "IMG_2168.JPG")
    photo = meta.to_json()
    assert photo == {k: v for k, v in dataclasses.asdict(meta).items() if v is not None}
    assert list(photo) == [f.name for f in dataclasses.fields(PhotoMeta) if f.name in photo]
    assert PhotoMeta.from_json(photo) == meta
    entry = ManifestEntry.now(
        10, 20, "ab" * 32, "f/IMG.JPG", derived=["f/x"], meta={"photo": photo}
    )
    assert entry.to_json() == dataclasses.asdict(entry)
    manifest = Manifest(tmp_path / "manifest")
    try:
        manifest.record_many([("survey", "s3", "f/IMG.JPG", entry)])
        assert manifest.get("survey", "s3", "f/IMG.JPG") == entry
    finally:
        manifest.close()
