"""Full scans of a source folder (at start, and as the catch-up behind the watcher)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from skyframe.events import FileEvent

log = logging.getLogger(__name__)

ErrorHandler = Callable[[Path, OSError], None]


def _log_error(path: Path, exc: OSError) -> None:
    log.warning("cannot read %s: %s", path, exc.strerror or exc)


def scan_source(
    pipeline: str, root: Path, *, recursive: bool = True, on_error: ErrorHandler = _log_error
) -> Iterator[FileEvent]:
    """Every regular file under ``root`` (symlinked folders are not followed), sorted by path."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            on_error(folder, exc)
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                continue  # vanished between listing and stat: nothing to do
            except OSError as exc:
                on_error(Path(entry.path), exc)
                continue
            path = Path(entry.path)
            yield FileEvent.from_stat(
                pipeline, path, path.relative_to(root).as_posix(), st, "scanned"
            )
        if recursive:
            stack.extend(reversed(subfolders))
