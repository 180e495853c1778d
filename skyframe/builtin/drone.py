"""Stock steps for drone photos: ``geotag`` (a photo's own metadata into ``job.meta``) and the
rule ``inside`` (only photos taken inside an area)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from skyframe.drone import is_photo
from skyframe.events import FileEvent, Job
from skyframe.markers import process, rule
from skyframe.units import Label

log = logging.getLogger(__name__)

#: One ring of a polygon: (lon, lat) pairs, GeoJSON's order.
Ring = list[tuple[float, float]]


@process
def process_geotag(job: Job) -> None:
    """Read a photo's position, altitude, capture time, camera and orientation from its EXIF
    and XMP (header only) into job.meta["photo"]; never fails a file."""
    suffix = job.event.suffix
    if suffix in (".srt", ".mrk"):
        _telemetry(job, suffix)
        return
    if not is_photo(job.path):
        return
    from skyframe.drone.metadata import PhotoMeta, read_photo  # the imaging library, if used

    try:
        meta = read_photo(job.path)
    except OSError as exc:  # gone or unreadable: delivery meets it and reports it
        meta = PhotoMeta(error=f"cannot read: {exc.strerror or exc}")
    if meta.error:
        log.info("%s: %s: %s", job.pipeline, job.relpath, meta.error)
    job.meta["photo"] = meta.to_json()


#: A thumbnail's longer side, in pixels.
Pixels = Annotated[int, Field(ge=16, le=4096), Label("pixels (16 to 4096)")]
#: JPEG quality, as Pillow takes it.
JpegQuality = Annotated[int, Field(ge=1, le=95), Label("1 to 95")]


@process
def process_thumbnail(job: Job, max_px: Pixels = 512, quality: JpegQuality = 80) -> None:
    """Deliver a JPEG preview of a photo beside it (NAME.thumb.jpg), at most max_px on its
    longer side, upright as the camera meant it; a photo that cannot be decoded gets none."""
    if not is_photo(job.path):
        return
    from skyframe.drone.metadata import make_thumbnail

    target = job.scratch_dir / f"thumb-{len(job.derived)}.jpg"
    job.scratch_dir.mkdir(parents=True, exist_ok=True)
    try:
        with job.open() as f:
            make_thumbnail(f, target, max_px=max_px, quality=quality)
    except OSError as exc:  # not decodable (truncated, not an image): the photo still goes
        log.info("%s: %s: no thumbnail: %s", job.pipeline, job.relpath, exc)
        return
    job.add_file(".thumb.jpg", target, beside=True)


def _telemetry(job: Job, suffix: str) -> None:
    """A DJI video's subtitles become a GeoJSON track beside it (``.SRT.geojson``) and a
    summary in job.meta["track"]; an RTK event file's points go to job.meta["mrk"], for the
    flight report to place the flight's photos by."""
    from skyframe.drone import telemetry

    try:
        with job.open() as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:  # delivery meets it and reports it
        log.info("%s: %s: cannot read: %s", job.pipeline, job.relpath, exc.strerror or exc)
        return
    if suffix == ".mrk":
        points = telemetry.read_mrk(text)
        job.meta["mrk"] = {"points": [p.to_json() for p in points]}
        return
    track = telemetry.read_srt(text)
    summary: dict[str, Any] = {"points": len(track)}
    if track:
        summary.update(start_seconds=track[0].seconds, end_seconds=track[-1].seconds)
        if track[0].time:
            summary.update(start=track[0].time, end=track[-1].time)
        collection = telemetry.track_geojson(track, name=job.event.name)
        job.add_file(".geojson", (json.dumps(collection, indent=1) + "\n").encode(), beside=True)
    job.meta["track"] = summary


def _check_box(box: list[float]) -> list[float]:
    if len(box) != 4:
        raise ValueError("box takes four numbers: [west, south, east, north]")
    west, south, east, north = box
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise ValueError(
            "box is [west, south, east, north] in degrees: longitudes within -180..180, "
            "latitudes within -90..90, south <= north"
        )
    return box


def _polygons(geojson: dict[str, Any]) -> list[list[Ring]]:
    """The polygons (each a list of rings: the outline, then holes) of a GeoJSON Polygon,
    MultiPolygon, Feature or FeatureCollection; ValueError for anything else."""
    kind = geojson.get("type")
    if kind == "FeatureCollection":
        return [p for feature in geojson.get("features") or [] for p in _polygons(feature)]
    if kind == "Feature":
        return _polygons(geojson.get("geometry") or {})
    coordinates = geojson.get("coordinates")
    if kind == "Polygon":
        return [_rings(coordinates)]
    if kind == "MultiPolygon" and isinstance(coordinates, list):
        return [_rings(polygon) for polygon in coordinates]
    raise ValueError(
        f"area must be a GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection, not {kind!r}"
    )


def _rings(coordinates: Any) -> list[Ring]:
    try:
        rings = [[(float(p[0]), float(p[1])) for p in ring] for ring in coordinates]
    except (TypeError, ValueError, IndexError):
        raise ValueError("a polygon's coordinates are rings of [longitude, latitude]") from None
    if not rings or any(len(ring) < 4 for ring in rings):
        raise ValueError("a polygon ring needs at least four positions (the first repeated last)")
    return rings


def _area(value: Any) -> Any:
    """A GeoJSON area as its polygons (checked when the config is loaded)."""
    if not isinstance(value, dict):
        raise ValueError("area must be a GeoJSON object (a Polygon, or a Feature holding one)")
    polygons = _polygons(value)
    if not polygons:
        raise ValueError("area holds no polygon")
    return polygons


Box = Annotated[list[float], AfterValidator(_check_box), Label("[west, south, east, north]")]
#: A GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection, read as its polygons.
Area = Annotated[list[list[Ring]], BeforeValidator(_area), Label("GeoJSON polygon")]


def _in_ring(lon: float, lat: float, ring: Sequence[tuple[float, float]]) -> bool:
    """Even-odd test of a point against one ring (a point on an edge may fall either way)."""
    inside = False
    x1, y1 = ring[-1]
    for x2, y2 in ring:
        if (y1 > lat) != (y2 > lat) and lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
        x1, y1 = x2, y2
    return inside


def in_polygons(lon: float, lat: float, polygons: list[list[Ring]]) -> bool:
    """Whether (lon, lat) is inside one of the polygons (inside its outline, in none of its
    holes)."""
    return any(
        _in_ring(lon, lat, rings[0]) and not any(_in_ring(lon, lat, hole) for hole in rings[1:])
        for rings in polygons
    )


@functools.lru_cache(maxsize=4096)
def _position(path: Path, size: int, mtime_ns: int) -> tuple[float, float] | str:
    """A photo's (lon, lat), or why there is none; cached per version of the file."""
    from skyframe.drone.metadata import read_photo

    try:
        meta = read_photo(path)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if meta.lat is None or meta.lon is None:
        return meta.error or "it records no position"
    return meta.lon, meta.lat


def _area_or_box(options: Mapping[str, Any]) -> None:
    if options["area"] is None and options["box"] is None:
        raise ValueError("needs an area (GeoJSON) or a box [west, south, east, north]")


@rule(check=_area_or_box)
def rule_inside(
    event: FileEvent,
    area: Area | None = None,
    box: Box | None = None,
    missing: Literal["reject", "accept"] = "reject",
) -> bool | str:
    """Accept only photos taken inside an area (a GeoJSON polygon) or a box [west, south, east,
    north], by the position they record; files without one follow missing (reject)."""
    if area is None and box is None:
        return "rule 'inside' needs an area or a box"
    where = (
        _position(event.path, event.size, event.mtime_ns)
        if is_photo(event.path)
        else "it is not a photo"
    )
    if isinstance(where, str):
        return True if missing == "accept" else f"no position: {where}"
    lon, lat = where
    if box is not None:
        west, south, east, north = box
        across = west > east  # a box across the antimeridian
        in_lon = (lon >= west or lon <= east) if across else west <= lon <= east
        if in_lon and south <= lat <= north:
            return True
    if area is not None and in_polygons(lon, lat, area):
        return True
    return f"taken at {lat:.6f}, {lon:.6f}, outside the area"
