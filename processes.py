"""The example project's own processes, loaded beside skyframe.yaml.

Copy this pattern: decorate ``process_<name>(job, **options)`` with ``@process``. A process may
read the file (``job.open()``), add metadata (``job.meta``), change the remote name
(``job.remote_name``) or add derived files (``job.add_file``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import PurePosixPath

from skyframe import Job, process

#: DJI, Parrot and many phones put the capture time in the file name: 20240517_101502, ...
_STAMP_IN_NAME = re.compile(r"(20\d{2})(\d{2})(\d{2})[_-]?(\d{2})(\d{2})(\d{2})")


def capture_time(job: Job, utc_offset_hours: float) -> datetime:
    """The capture time the photo records (``geotag``, listed before, reads its EXIF), else the
    one in the file name, else the file's mtime. A time without an offset is taken to be
    ``utc_offset_hours`` from UTC, as the camera's clock was."""
    tz = timezone(timedelta(hours=utc_offset_hours)) if utc_offset_hours else UTC
    captured = job.meta.get("photo", {}).get("captured")
    if captured:
        try:
            when = datetime.fromisoformat(captured)
        except ValueError:
            pass  # not a time after all: the file name or the mtime will do
        else:
            return when if when.tzinfo else when.replace(tzinfo=tz)
    match = _STAMP_IN_NAME.search(PurePosixPath(job.relpath).name)
    if match:
        year, month, day, hour, minute, second = map(int, match.groups())
        try:
            return datetime(year, month, day, hour, minute, second, tzinfo=tz)
        except ValueError:
            pass  # digits that only look like a date
    return job.event.mtime.astimezone(tz)


@process
def process_organise_by_flight(
    job: Job, layout: str = "{date}/{flight}/{name}", utc_offset_hours: float = 0.0
) -> None:
    """Name remote files by capture date and flight folder: 2024-05-17/flight-03/DJI_0001.JPG."""
    rel = PurePosixPath(job.relpath)
    flight = rel.parent.name or "unsorted"
    when = capture_time(job, utc_offset_hours)
    job.meta["capture_time"] = when.isoformat()
    job.meta["flight"] = flight
    job.remote_name = layout.format(date=when.strftime("%Y-%m-%d"), flight=flight, name=rel.name)
