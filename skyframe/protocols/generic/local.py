"""Local folders (a mounted disk, a NAS share): writes through fsspec's local filesystem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec

from skyframe.names import check_windows_name
from skyframe.protocols.endpoint import Endpoint

#: Whether the folders are Windows's, whose names follow its rules (skyframe.names).
WINDOWS = os.name == "nt"


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """A folder path (relative to the config file) or a ``file://`` URL."""
    if options:
        raise ValueError("a local folder sink takes no options")
    path = unquote(urlsplit(url).path) if url.startswith("file://") else url
    root = str((base_dir / Path(path).expanduser()).resolve())
    return Endpoint(
        "file",
        root,
        lambda: fsspec.filesystem("file"),
        remote=False,
        check_name=check_windows_name if WINDOWS else None,
    )
