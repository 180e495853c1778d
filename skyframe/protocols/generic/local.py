"""Local folders (a mounted disk, a NAS share): writes through fsspec's local filesystem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec

from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.names import check_windows_name
from skyframe.protocols.endpoint import Endpoint
from skyframe.units import expand_home, local_url_path

#: Whether the folders are Windows's, whose names follow its rules (skyframe.names).
WINDOWS = os.name == "nt"


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """A folder path (relative to the config file) or a ``file://`` URL."""
    if options:
        raise ValueError("a local folder sink takes no options")
    root = str((base_dir / expand_home(local_url_path(url))).resolve())
    return Endpoint(
        "file",
        root,
        lambda: fsspec.filesystem("file"),
        lambda exc: classify(exc, Path(root)),
        remote=False,
        check_name=check_windows_name if WINDOWS else None,
    )


def classify(exc: BaseException, root: Path) -> SinkUnavailableError | SinkRefusedError | None:
    """The errors that are about the folder itself, not one file: a file where the folder
    (or a folder above it) should be, or a folder skyframe may not write in. Every file
    would meet them: each goes to the dead-letter list at once rather than spending its
    attempts, and the sink is reported refusing until it is mended."""
    filename = getattr(exc, "filename", None)
    if not isinstance(exc, OSError) or not isinstance(filename, str | bytes) or not filename:
        return None
    failed = Path(os.fsdecode(filename))
    if isinstance(exc, FileExistsError | NotADirectoryError):
        for folder in (root, *root.parents):
            if folder.is_file():
                return SinkRefusedError(f"{folder} is a file, where a folder should be")
    if isinstance(exc, PermissionError) and failed.parent == root:
        writable = root.is_dir() and os.access(root, os.W_OK)  # asked for this error only
        if not writable:
            return SinkRefusedError(f"no permission to write in {root}")
    return None
