"""The built-in report of a completed group (a flight), delivered with it to every sink:
``NAME.geojson``, ``geo.txt`` (OpenDroneMap) and ``manifest.sha256``; see
:mod:`skyframe.drone.report`. Groups ``by: time_gap`` may share a folder: their report's
names then start with the group's key (``flight-20240517-101502-geo.txt``). A DJI RTK
``.MRK`` file in the flight (read by ``geotag``) places its photos, line N the N-th photo."""

from __future__ import annotations

from typing import TYPE_CHECKING

from skyframe.drone.report import (
    ReportFile,
    apply_mrk,
    geo_txt,
    geojson_bytes,
    relative,
    sha256_manifest,
)
from skyframe.markers import hookimpl

if TYPE_CHECKING:
    from skyframe.groups import Group


@hookimpl
def skyframe_group_complete(group: Group) -> None:
    """Add the flight report to a completed group whose config asks for it (the default)."""
    if not group.report:
        return
    files = [
        ReportFile(relative(f.remote, group.folder), f.sha256, f.meta.get("photo"))
        for f in group.files
    ]
    # An RTK drone's event file places the flight's photos more precisely than their EXIF.
    mrk = next((f.meta["mrk"] for f in group.files if isinstance(f.meta.get("mrk"), dict)), None)
    if mrk and mrk.get("points"):
        files = apply_mrk(files, mrk["points"])
    prefix = f"{group.key}-" if group.by == "time_gap" else ""
    group.add_file(f"{prefix}{group.name}.geojson", geojson_bytes(files, flight=group.key))
    geo = geo_txt(files)
    if geo is not None:
        group.add_file(f"{prefix}geo.txt", geo)
    group.add_file(f"{prefix}manifest.sha256", sha256_manifest(files))
