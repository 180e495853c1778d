"""What a photo says about itself: position, altitude, capture time, camera and orientation.

Read from the file's header only: Pillow opens a JPEG or TIFF without decoding its pixels, and
gives its EXIF (the GPS directory, ``DateTimeOriginal`` with ``OffsetTimeOriginal``, ``Make``
and ``Model``) and its XMP packet, parsed here with defusedxml. From the XMP come what the
makers of survey drones and cameras put there:

- DJI (``drone-dji``): position (when EXIF lacks it), ``AbsoluteAltitude``,
  ``RelativeAltitude``, the gimbal's yaw, pitch and roll, the RTK standard deviations;
- senseFly (``sensefly`` and senseFly's ``Camera`` namespaces): ``Yaw``, ``Pitch``, ``Roll``,
  ``GPSXYAccuracy``, ``GPSZAccuracy``;
- Pix4D's ``Camera`` namespace, which MicaSense cameras write: the same names;
- Parrot (``drone-parrot``): the camera's yaw, pitch and roll.

Reading never raises for what a file holds: a file that is no image, a truncated or corrupt
one gives a :class:`PhotoMeta` whose ``error`` says what is wrong, with whatever could be read.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from defusedxml import ElementTree
from PIL import ExifTags, Image, TiffImagePlugin, UnidentifiedImageError

from skyframe.quiet import ignored_warnings

#: How far from the end a JPEG's end-of-image marker is looked for (some cameras pad files).
_TAIL = 64 * 1024

_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
#: XMP namespaces by the dialect they belong to (matched on the namespace URI).
_DIALECTS = (
    ("dji", "www.dji.com/drone-dji/"),
    ("sensefly", "ns.sensefly.com/"),
    ("pix4d", "pix4d.com/camera/"),
    ("parrot", "www.parrot.com/drone-parrot/"),
)
#: Per dialect, the XMP name of each orientation angle (yaw, pitch, roll).
_ORIENTATION = {
    "dji": ("GimbalYawDegree", "GimbalPitchDegree", "GimbalRollDegree"),
    "sensefly": ("Yaw", "Pitch", "Roll"),
    "pix4d": ("Yaw", "Pitch", "Roll"),
    "parrot": ("CameraYawDegree", "CameraPitchDegree", "CameraRollDegree"),
}


@dataclass(frozen=True)
class PhotoMeta:
    """A photo's metadata; every field may be missing (None)."""

    lat: float | None = None  #: degrees, WGS84, north positive
    lon: float | None = None  #: degrees, WGS84, east positive
    #: metres: EXIF's GPS altitude (negative below the reference), else the maker's absolute
    #: altitude (DJI's ``AbsoluteAltitude``)
    altitude: float | None = None
    relative_altitude: float | None = None  #: metres above the take-off point (DJI)
    #: when it was taken, ISO 8601: with its UTC offset when the file records one, else the
    #: camera's local time
    captured: str | None = None
    make: str | None = None
    model: str | None = None
    yaw: float | None = None  #: the camera's heading, degrees
    pitch: float | None = None  #: degrees
    roll: float | None = None  #: degrees
    xy_accuracy: float | None = None  #: horizontal position accuracy, metres
    z_accuracy: float | None = None  #: vertical position accuracy, metres
    dialect: str | None = None  #: the maker XMP read: dji, sensefly, pix4d or parrot
    width: int | None = None  #: pixels
    height: int | None = None  #: pixels
    error: str | None = None  #: what is wrong with the file, if anything

    @property
    def has_position(self) -> bool:
        """True when latitude and longitude are both known."""
        return self.lat is not None and self.lon is not None

    def to_json(self) -> dict[str, Any]:
        """The known fields, as a JSON-safe dict (built directly: every field is a plain value,
        which ``asdict()`` would deep-copy one by one)."""
        return {name: value for name in _PHOTO_FIELDS if (value := getattr(self, name)) is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhotoMeta:
        """The inverse of :meth:`to_json` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_PHOTO_FIELDS = tuple(f.name for f in fields(PhotoMeta))


def read_photo(path: Path | str) -> PhotoMeta:
    """The metadata of the photo at ``path``, from its header (see the module's docstring).

    Raises OSError only when the file cannot be opened at all (gone, no permission)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            # Only the header is read: a huge panorama is no decompression bomb here, and a
            # damaged tag is left out (Pillow warns of both).
            with ignored_warnings(), Image.open(f) as image:
                width, height = image.size
                base, gps, details = _wanted(*_directories(image))
                xmp = image.info.get("xmp")
                kind = image.format
        except UnidentifiedImageError:
            return PhotoMeta(error="not an image format this version reads")
        except (
            OSError,
            SyntaxError,
            ValueError,
            struct.error,
            Image.DecompressionBombError,
        ) as exc:
            return PhotoMeta(error=f"not a readable image: {_one_line(exc)}")
        error = _jpeg_end_missing(f) if kind == "JPEG" else None
    found: dict[str, Any] = {"width": width, "height": height, "error": error}
    found["make"] = _text(base.get(ExifTags.Base.Make))
    found["model"] = _text(base.get(ExifTags.Base.Model))
    found["captured"] = _captured(details)
    found.update(_gps(gps))
    try:
        dialect, values = _maker_xmp(xmp) if xmp else (None, {})
    except (ElementTree.ParseError, ValueError) as exc:  # defusedxml refusals are ValueErrors
        found["error"] = found["error"] or f"unreadable XMP: {_one_line(exc)}"
        dialect, values = None, {}
    if dialect is not None:
        found["dialect"] = dialect
        found.update(
            {k: v for k, v in _from_maker(dialect, values).items() if found.get(k) is None}
        )
    return PhotoMeta(**found)


#: The tags read, per directory: the main one (IFD0), GPS and Exif's own.
_BASE_TAGS = (ExifTags.Base.Make, ExifTags.Base.Model)
_GPS_TAGS = (
    ExifTags.GPS.GPSLatitude,
    ExifTags.GPS.GPSLatitudeRef,
    ExifTags.GPS.GPSLongitude,
    ExifTags.GPS.GPSLongitudeRef,
    ExifTags.GPS.GPSAltitude,
    ExifTags.GPS.GPSAltitudeRef,
)
_DETAIL_TAGS = (ExifTags.Base.DateTimeOriginal, ExifTags.Base.OffsetTimeOriginal)

Directory = Mapping[int, Any]


def _directories(image: Image.Image) -> tuple[Directory, Directory, Directory]:
    """The EXIF directories a reading needs: the main one, GPS and Exif's own.

    A JPEG's EXIF block is read with Pillow's TIFF directory class, whose values are decoded
    when asked for: the dozens of tags a camera writes (a maker note among them) stay
    undecoded. Other formats, and a block that class cannot start on, go through
    :meth:`PIL.Image.Image.getexif`, which decodes every tag.
    """
    exif = image.getexif()  # the main directory; Pillow reads it as it opens a JPEG
    raw = image.info.get("exif")
    if isinstance(raw, bytes) and raw:
        try:
            return exif, *_lazy_directories(exif, raw)
        except (OSError, SyntaxError, ValueError, struct.error):
            pass  # Pillow's own reading says what it makes of the block
    return exif, exif.get_ifd(ExifTags.IFD.GPSInfo), exif.get_ifd(ExifTags.IFD.Exif)


def _lazy_directories(base: Directory, raw: bytes) -> tuple[Directory, Directory]:
    """The GPS and Exif directories of a JPEG's EXIF block, their values decoded when asked."""
    while raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    fp = io.BytesIO(raw)
    head = fp.read(8)
    found: list[Directory] = []
    for pointer in (ExifTags.IFD.GPSInfo, ExifTags.IFD.Exif):
        offset = base.get(pointer)
        directory = TiffImagePlugin.ImageFileDirectory_v2(head, group=pointer)
        if isinstance(offset, int) and 0 < offset < len(raw):
            fp.seek(offset)
            directory.load(fp)  # a damaged tag is left out, with a warning, as getexif() does
        found.append(directory)
    return found[0], found[1]


def _wanted(
    base: Directory, gps: Directory, details: Directory
) -> tuple[dict[int, Any], dict[int, Any], dict[int, Any]]:
    """The tags read (see ``_BASE_TAGS``...), decoded now (a damaged value fails the reading
    here, inside its error handling, not later), a value of one item as that item, as
    :meth:`PIL.Image.Exif.get_ifd` gives it."""

    def pick(directory: Directory, tags: tuple[int, ...]) -> dict[int, Any]:
        out = {}
        for tag in tags:
            if tag in directory:
                value = directory[tag]
                one = isinstance(value, tuple) and len(value) == 1
                out[tag] = value[0] if one else value
        return out

    return pick(base, _BASE_TAGS), pick(gps, _GPS_TAGS), pick(details, _DETAIL_TAGS)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _jpeg_end_missing(f: Any) -> str | None:
    """An error when a JPEG lacks its end-of-image marker near its end (a cut-off copy): its
    last two bytes, else (a padded file) the last :data:`_TAIL` bytes."""
    size = os.fstat(f.fileno()).st_size
    f.seek(max(size - 2, 0))
    if f.read(2) == b"\xff\xd9":
        return None
    f.seek(max(size - _TAIL, 0))
    if b"\xff\xd9" not in f.read(_TAIL):
        return "truncated: the JPEG has no end-of-image marker"
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip("\x00 ")
    return value or None


def _number(value: Any) -> float | None:
    """A finite float from an EXIF rational, a number or an XMP string ("+12.5", "3/2")."""
    try:
        if isinstance(value, str):
            text = value.strip()
            if "/" in text:
                top, bottom = text.split("/", 1)
                number = float(top) / float(bottom)
            else:
                number = float(text)
        else:
            number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


def _degrees(value: Any, ref: Any, negative: str) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) and its N/S or E/W reference."""
    try:
        parts = [_number(v) for v in value]
    except TypeError:
        return None
    if not parts or any(p is None for p in parts):
        return None
    total = 0.0
    for part, scale in zip(parts, (1.0, 60.0, 3600.0), strict=False):
        assert part is not None
        total += part / scale
    return -total if _text(ref) == negative else total


def _gps(gps: Directory) -> dict[str, Any]:
    tags = ExifTags.GPS
    lat = _degrees(gps.get(tags.GPSLatitude), gps.get(tags.GPSLatitudeRef), "S")
    lon = _degrees(gps.get(tags.GPSLongitude), gps.get(tags.GPSLongitudeRef), "W")
    out: dict[str, Any] = {}
    if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
        out.update(lat=lat, lon=lon)
    altitude = _number(gps.get(tags.GPSAltitude))
    if altitude is not None:
        ref = gps.get(tags.GPSAltitudeRef)
        below = ref in (1, b"\x01") or (isinstance(ref, bytes) and ref[:1] == b"\x01")
        out["altitude"] = -altitude if below else altitude
    return out


def _captured(details: Directory) -> str | None:
    """DateTimeOriginal as ISO 8601, with OffsetTimeOriginal when the camera wrote one."""
    text = _text(details.get(ExifTags.Base.DateTimeOriginal))
    if text is None:
        return None
    try:
        when = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    offset = _text(details.get(ExifTags.Base.OffsetTimeOriginal))
    if offset is not None:
        try:
            return datetime.fromisoformat(when.isoformat() + offset).isoformat()
        except ValueError:
            pass
    return when.isoformat()


def _maker_xmp(xmp: bytes | str) -> tuple[str | None, dict[str, str]]:
    """The first maker dialect found in an XMP packet, and its values by name (from the
    attributes and the simple elements of every ``rdf:Description``)."""
    data = xmp.encode() if isinstance(xmp, str) else xmp
    root = ElementTree.fromstring(data.strip(b"\x00 \t\r\n"))
    by_dialect: dict[str, dict[str, str]] = {}
    for description in root.iter(f"{_RDF}Description"):
        items = list(description.attrib.items())
        items += [(child.tag, child.text or "") for child in description if len(child) == 0]
        for tag, value in items:
            if not tag.startswith("{"):
                continue
            namespace, _, name = tag[1:].partition("}")
            for dialect, marker in _DIALECTS:
                if marker in namespace:
                    by_dialect.setdefault(dialect, {})[name] = value.strip()
    for dialect, _marker in _DIALECTS:
        if dialect in by_dialect:
            return dialect, by_dialect[dialect]
    return None, {}


def _from_maker(dialect: str, values: dict[str, str]) -> dict[str, Any]:
    """What a maker's XMP values say, in PhotoMeta's terms."""
    out: dict[str, Any] = {}
    for field, name in zip(("yaw", "pitch", "roll"), _ORIENTATION[dialect], strict=True):
        out[field] = _number(values.get(name))
    if dialect == "dji":
        lat = _number(values.get("GpsLatitude"))
        lon = _number(values.get("GpsLongitude", values.get("GpsLongtitude")))
        if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
            out.update(lat=lat, lon=lon)
        out["altitude"] = _number(values.get("AbsoluteAltitude"))
        out["relative_altitude"] = _number(values.get("RelativeAltitude"))
        lat_std, lon_std = _number(values.get("RtkStdLat")), _number(values.get("RtkStdLon"))
        if lat_std is not None and lon_std is not None:
            out["xy_accuracy"] = math.hypot(lat_std, lon_std)
        out["z_accuracy"] = _number(values.get("RtkStdHgt"))
    elif dialect in ("sensefly", "pix4d"):
        out["xy_accuracy"] = _number(values.get("GPSXYAccuracy"))
        out["z_accuracy"] = _number(values.get("GPSZAccuracy"))
    return {k: v for k, v in out.items() if v is not None}


def make_thumbnail(source: BinaryIO, target: Path, *, max_px: int, quality: int) -> None:
    """Write a JPEG of the image in ``source``, at most ``max_px`` on its longer side and
    turned upright by its EXIF orientation. A JPEG is decoded at a reduced scale (its DCT
    allows 1/2, 1/4 and 1/8), so a 20 MP photo is never decoded whole. Raises OSError when
    the image cannot be decoded (truncated, not an image)."""
    from PIL import ImageOps

    try:
        with ignored_warnings(Image.DecompressionBombWarning):
            image = Image.open(source)  # where Pillow checks the size; decoded at scale below
        with image:
            image.draft("RGB", (max_px, max_px))
            upright = ImageOps.exif_transpose(image)
            upright.thumbnail((max_px, max_px))
            upright.convert("RGB").save(target, "JPEG", quality=quality, optimize=True)
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"cannot decode the image: {_one_line(exc)}") from exc
