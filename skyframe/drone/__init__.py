"""What skyframe knows of drone data: the metadata photos carry about themselves.

This package's ``__init__`` stays light (no imaging library): the CLI and the history's
display use it; :mod:`skyframe.drone.metadata` reads the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: File name extensions of the photos read (others get no metadata, and no error).
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".tif", ".tiff"})


def is_photo(path: Path | str) -> bool:
    """Whether ``path`` has the extension of a photo skyframe reads metadata from."""
    return os.path.splitext(str(path))[1].lower() in PHOTO_SUFFIXES


def photo_summary(photo: dict[str, Any]) -> str:
    """A photo's metadata (``PhotoMeta.to_json()``) in a few words, for one line of history."""
    parts = []
    if photo.get("lat") is not None and photo.get("lon") is not None:
        where = f"at {photo['lat']:.6f},{photo['lon']:.6f}"
        if photo.get("altitude") is not None:
            where += f" {photo['altitude']:.1f} m"
        parts.append(where)
    if photo.get("captured"):
        parts.append(f"taken {photo['captured']}")
    if photo.get("error"):
        parts.append(f"photo: {photo['error']}")
    elif not parts:
        parts.append("no position")
    return ", ".join(parts)
