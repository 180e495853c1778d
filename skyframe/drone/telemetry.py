"""DJI's telemetry files: the subtitles of a video (``.SRT``) and an RTK drone's event file
(``.MRK``).

- An ``.SRT`` holds, per video frame or second, the drone's position: ``[latitude: 47.64]
  [longitude: 16.47] [rel_alt: 75.1 abs_alt: 512.5]`` (recent models), or ``GPS(16.47,
  47.64, 19)`` with ``BAROMETER: 75.1`` (older ones). :func:`read_srt` gives the track;
  :func:`track_geojson` draws it as a GeoJSON LineString.
- An ``.MRK`` (Phantom 4 RTK, Matrice RTK) has one line per photo: its index, the GPS time of
  week, corrections, then ``LAT,Lat LON,Lon HEIGHT,Ellh`` (ellipsoidal height), the standard
  deviations north, east and vertical in metres, and the fix quality (``50,Q``: fixed). Line
  N belongs to the flight's N-th photo. :func:`read_mrk` gives the points.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

_TIME_RANGE = re.compile(r"^(\d+):(\d{2}):(\d{2})[,.](\d{3})\s*-->")
_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?)")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BRACKETED = {
    "lat": re.compile(rf"\[latitude\s*:\s*{_NUMBER}\]"),
    "lon": re.compile(rf"\[longt?itude\s*:\s*{_NUMBER}\]"),  # DJI also writes "longtitude"
    "rel_alt": re.compile(rf"rel_alt\s*:\s*{_NUMBER}"),
    "abs_alt": re.compile(rf"abs_alt\s*:\s*{_NUMBER}"),
    "alt": re.compile(rf"\[altitude\s*:\s*{_NUMBER}\]"),
}
_GPS = re.compile(rf"GPS\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*(?:,\s*{_NUMBER}\s*)?\)")
_BAROMETER = re.compile(rf"BAROMETER\s*:\s*{_NUMBER}")

_MRK_LAT = re.compile(rf"{_NUMBER},Lat")
_MRK_LON = re.compile(rf"{_NUMBER},Lon")
_MRK_HEIGHT = re.compile(rf"{_NUMBER},Ellh")
_MRK_QUALITY = re.compile(r"(\d+),Q")
_MRK_STD = re.compile(rf"{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*(?:\t|$)")


@dataclass(frozen=True)
class TrackPoint:
    """One position of a video's track."""

    seconds: float  #: into the video
    lat: float
    lon: float
    rel_alt: float | None = None  #: metres above the take-off point
    abs_alt: float | None = None  #: metres (the drone's absolute altitude)
    time: str | None = None  #: the wall-clock time the subtitle gives, if any


@dataclass(frozen=True)
class MrkPoint:
    """One photo's RTK position."""

    index: int  #: the photo's number in the flight
    lat: float
    lon: float
    height: float  #: ellipsoidal height, metres
    std_north: float | None = None  #: metres
    std_east: float | None = None
    std_vertical: float | None = None
    quality: int | None = None  #: 50: fixed, 16: single, 34: float

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _valid(lat: float, lon: float) -> bool:
    return abs(lat) <= 90 and abs(lon) <= 180 and not (lat == 0 and lon == 0)


def read_srt(text: str) -> list[TrackPoint]:
    """The positions of a DJI subtitle file; blocks without one (or at 0, 0: no fix) are
    skipped."""
    points = []
    for block in re.split(r"\r?\n\s*\r?\n", text):
        seconds = None
        for line in block.splitlines():
            match = _TIME_RANGE.match(line.strip())
            if match:
                hours, minutes, secs, millis = (int(g) for g in match.groups())
                seconds = hours * 3600 + minutes * 60 + secs + millis / 1000
                break
        if seconds is None:
            continue
        found = {
            key: float(hit.group(1))
            for key, pattern in _BRACKETED.items()
            if (hit := pattern.search(block))
        }
        if "lat" not in found or "lon" not in found:
            gps = _GPS.search(block)
            if gps is None:
                continue
            found["lon"], found["lat"] = float(gps.group(1)), float(gps.group(2))
            barometer = _BAROMETER.search(block)
            if barometer is not None:
                found["rel_alt"] = float(barometer.group(1))
        lat, lon = found["lat"], found["lon"]
        if not (_valid(lat, lon) and math.isfinite(lat) and math.isfinite(lon)):
            continue
        stamp = _STAMP.search(block)
        points.append(
            TrackPoint(
                seconds,
                lat,
                lon,
                found.get("rel_alt", found.get("alt")),
                found.get("abs_alt"),
                stamp.group(1).replace(",", ".") if stamp else None,
            )
        )
    return points


def track_geojson(points: list[TrackPoint], *, name: str) -> dict[str, Any]:
    """A video's track: a LineString ``[lon, lat(, abs_alt)]`` with its start and end."""
    with_altitude = all(p.abs_alt is not None for p in points)
    coordinates = [[p.lon, p.lat, p.abs_alt] if with_altitude else [p.lon, p.lat] for p in points]
    properties: dict[str, Any] = {
        "name": name,
        "points": len(points),
        "start_seconds": points[0].seconds if points else None,
        "end_seconds": points[-1].seconds if points else None,
    }
    if points and points[0].time:
        properties["start"] = points[0].time
        properties["end"] = points[-1].time
    geometry: dict[str, Any]
    if len(points) >= 2:
        geometry = {"type": "LineString", "coordinates": coordinates}
    else:
        geometry = {"type": "Point", "coordinates": coordinates[0]} if points else {}
    return {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": geometry, "properties": properties}]
        if geometry
        else [],
    }


def read_mrk(text: str) -> list[MrkPoint]:
    """The photos' RTK positions of a DJI ``.MRK`` file, in file order; lines without a
    position are skipped."""
    points = []
    for line in text.splitlines():
        columns = line.split("\t")
        lat, lon = _MRK_LAT.search(line), _MRK_LON.search(line)
        height = _MRK_HEIGHT.search(line)
        if lat is None or lon is None or height is None or not columns[0].strip().isdigit():
            continue
        std = _MRK_STD.search(line)
        north, east, vertical = (
            (float(std.group(1)), float(std.group(2)), float(std.group(3)))
            if std
            else (None, None, None)
        )
        quality = _MRK_QUALITY.search(line)
        points.append(
            MrkPoint(
                int(columns[0]),
                float(lat.group(1)),
                float(lon.group(1)),
                float(height.group(1)),
                north,
                east,
                vertical,
                int(quality.group(1)) if quality else None,
            )
        )
    return points
