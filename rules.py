"""The example project's own rules, loaded beside skyframe.yaml (like pytest's conftest.py).

Copy this pattern: decorate a function named ``rule_<name>`` with ``@rule``; its first argument
is the FileEvent, its keyword arguments are the YAML options (type hints are enforced).
"""

from __future__ import annotations

from skyframe import FileEvent, rule

#: Still images, including the raw formats drones and survey cameras write.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".dng", ".tif", ".tiff", ".png", ".raw", ".arw", ".cr2", ".nef", ".heic"}
)
#: Video, as written by DJI, GoPro, Autel and most gimbals.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".insv", ".lrf"})
#: Flight logs and telemetry: DJI subtitles, MAVLink tlogs, PX4 ulogs, ArduPilot dataflash.
LOG_EXTENSIONS = frozenset({".srt", ".tlog", ".ulg", ".bin", ".log", ".csv", ".kml", ".gpx"})


@rule
def rule_drone_media(
    event: FileEvent,
    images: bool = True,
    videos: bool = True,
    logs: bool = True,
    extra_extensions: list[str] | None = None,
) -> bool | str:
    """Accept drone images (JPEG/DNG/TIFF...), videos and flight logs (.srt, .tlog, .ulg...)."""
    accepted: set[str] = set()
    if images:
        accepted |= IMAGE_EXTENSIONS
    if videos:
        accepted |= VIDEO_EXTENSIONS
    if logs:
        accepted |= LOG_EXTENSIONS
    accepted |= {
        e.lower() if e.startswith(".") else f".{e.lower()}" for e in extra_extensions or ()
    }
    return event.suffix in accepted or f"{event.suffix or 'no extension'} is not drone media"
