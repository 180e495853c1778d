"""A flight's report, from its files and the metadata ``geotag`` recorded for them.

- :func:`feature_collection`: GeoJSON, one Point per photo with a position (``properties.name``
  the file name, coordinates ``[lon, lat, alt]``) and one Polygon, the footprint: the convex
  hull of the positions (when at least three of them do not lie on one line);
- :func:`geo_txt`: OpenDroneMap's image geolocation file (``EPSG:4326``, then per photo its
  name, longitude, latitude and, when known, altitude, yaw, pitch, roll and accuracies), so a
  flight's folder can go straight into ODM or WebODM;
- :func:`sha256_manifest`: every file of the flight in ``sha256sum`` format.

Names are relative to the report's folder (the folder the flight's files share remotely).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skyframe.drone import is_photo


@dataclass(frozen=True)
class ReportFile:
    """What a report needs of one file."""

    name: str  #: relative to the report's folder
    sha256: str
    photo: dict[str, Any] | None  #: ``PhotoMeta.to_json()``, or None for a file that is no photo


def relative(remote: str, folder: str) -> str:
    """A remote name relative to the report's folder."""
    return posixpath.relpath(remote, folder) if folder else remote


def _position(photo: dict[str, Any] | None) -> tuple[float, float] | None:
    if not photo or photo.get("lat") is None or photo.get("lon") is None:
        return None
    return float(photo["lon"]), float(photo["lat"])


def convex_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The convex hull of (x, y) points, counter-clockwise, first point not repeated; fewer
    than three points when they all lie on one line (Andrew's monotone chain)."""
    unique = sorted(set(points))
    if len(unique) < 3:
        return unique

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in unique:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(unique):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def apply_mrk(files: Sequence[ReportFile], points: Sequence[dict[str, Any]]) -> list[ReportFile]:
    """The files with the flight's photos placed by an RTK ``.MRK`` file: its N-th point is
    the N-th photo by name (position, ellipsoidal height, accuracies); other files unchanged.
    Photos beyond the file's points keep what they record."""
    photos = sorted((f for f in files if is_photo(f.name)), key=lambda f: f.name)
    placed = {}
    for file, point in zip(photos, points, strict=False):
        photo = dict(file.photo or {})
        photo.update(lat=point["lat"], lon=point["lon"], altitude=point["height"])
        north, east = point.get("std_north"), point.get("std_east")
        if north is not None and east is not None:
            photo["xy_accuracy"] = math.hypot(north, east)
        if point.get("std_vertical") is not None:
            photo["z_accuracy"] = point["std_vertical"]
        photo["position_source"] = "mrk"
        placed[file.name] = ReportFile(file.name, file.sha256, photo)
    return [placed.get(f.name, f) for f in files]


def feature_collection(files: Sequence[ReportFile], *, flight: str) -> dict[str, Any]:
    """The flight as GeoJSON: a Point per photo with a position, and the footprint."""
    features: list[dict[str, Any]] = []
    positions = []
    for file in files:
        where = _position(file.photo)
        if where is None:
            continue
        assert file.photo is not None
        positions.append(where)
        coordinates = [where[0], where[1]]
        if file.photo.get("altitude") is not None:
            coordinates.append(float(file.photo["altitude"]))
        properties = {"name": posixpath.basename(file.name), "path": file.name}
        for key in ("captured", "relative_altitude", "yaw", "pitch", "roll", "position_source"):
            if file.photo.get(key) is not None:
                properties[key] = file.photo[key]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": coordinates},
                "properties": properties,
            }
        )
    hull = convex_hull(positions)
    if len(hull) >= 3:
        ring = [[x, y] for x, y in hull] + [[hull[0][0], hull[0][1]]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"name": "footprint", "flight": flight, "photos": len(positions)},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def geojson_bytes(files: Sequence[ReportFile], *, flight: str) -> bytes:
    """:func:`feature_collection` as the bytes of a ``.geojson`` file."""
    return (json.dumps(feature_collection(files, flight=flight), indent=1) + "\n").encode()


def _number(value: Any) -> str:
    return repr(float(value))


def geo_txt(files: Sequence[ReportFile]) -> bytes | None:
    """OpenDroneMap's ``geo.txt`` for the photos with a position; None when there are none."""
    lines = ["EPSG:4326"]
    for file in files:
        where = _position(file.photo)
        if where is None:
            continue
        assert file.photo is not None
        photo = file.photo
        if " " in file.name:
            continue  # ODM's columns are separated by spaces: such a name cannot be written
        columns = [file.name, _number(where[0]), _number(where[1])]
        if photo.get("altitude") is not None:
            columns.append(_number(photo["altitude"]))
            angles = [photo.get(k) for k in ("yaw", "pitch", "roll")]
            accuracy = [photo.get("xy_accuracy"), photo.get("z_accuracy")]
            if any(a is not None for a in angles) or all(a is not None for a in accuracy):
                columns += [_number(a or 0.0) for a in angles]  # ODM: 0 when unknown
                if all(a is not None for a in accuracy):
                    columns += [_number(a) for a in accuracy]
        lines.append(" ".join(columns))
    if len(lines) == 1:
        return None
    return ("\n".join(lines) + "\n").encode()


def sha256_manifest(files: Sequence[ReportFile]) -> bytes:
    """Every file in ``sha256sum`` format (``HASH  NAME``), sorted by name."""
    lines = [f"{file.sha256}  {file.name}" for file in sorted(files, key=lambda f: f.name)]
    return ("\n".join(lines) + "\n").encode()
