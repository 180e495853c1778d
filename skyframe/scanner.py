"""Full scans of a source folder (at start, and as the catch-up behind the watcher), and what
may be taken from it at all.

A source is often a folder others write to, or an SD card: a name may not be UTF-8, and a
symbolic link may point anywhere on the machine. :func:`refusal` says why an entry is not
taken (the scan and the watcher ask it alike); nothing outside the source is sent unless the
pipeline says ``follow_symlinks: all``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from skyframe.display import is_utf8, shown
from skyframe.events import FileEvent

log = logging.getLogger(__name__)

ErrorHandler = Callable[[Path, OSError], None]
#: an entry not taken, and why
SkipHandler = Callable[[Path, str], None]
#: which symbolic links to files are followed: those whose target is inside the source, all,
#: or none
FollowSymlinks = Literal["inside", "all", "none"]


def _log_error(path: Path, exc: OSError) -> None:
    log.warning("cannot read %s: %s", shown(path), exc.strerror or exc)


def _log_skip(path: Path, reason: str) -> None:
    log.warning("not sent: %s: %s", shown(path), reason)


def refusal(
    path: Path, real_root: Path, follow: FollowSymlinks, *, is_link: bool | None = None
) -> str | None:
    """Why the file at ``path`` (under the source whose resolved path is ``real_root``) may
    not be taken, or None. Only the name and, for a link, its target are looked at;
    ``is_link`` saves the lookup when the caller knows (a directory entry)."""
    if not is_utf8(path.name):
        return "its name is not valid UTF-8 (rename it to have it sent)"
    if follow == "all" or not (path.is_symlink() if is_link is None else is_link):
        return None
    if follow == "none":
        return "a symbolic link (follow_symlinks: none)"
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop
        return "a symbolic link whose target cannot be reached"
    if not target.is_relative_to(real_root):
        return f"a symbolic link to {target}, outside the source (follow_symlinks: inside)"
    return None


def _not_a_file(entry: os.DirEntry[str]) -> str:
    """Why a folder entry that is neither a folder nor a file is not taken."""
    if entry.is_symlink():
        if entry.is_dir(follow_symlinks=True):
            return "a link to a folder (linked folders are not followed)"
        if not os.path.exists(entry.path):
            return "a link to nothing (its target is gone)"
        return "a link to something that is not a regular file"
    return "not a regular file (a FIFO, a socket or a device)"


def scan_source(
    pipeline: str,
    root: Path,
    *,
    recursive: bool = True,
    follow_symlinks: FollowSymlinks = "inside",
    on_error: ErrorHandler = _log_error,
    on_skip: SkipHandler = _log_skip,
) -> Iterator[FileEvent]:
    """Every regular file under ``root`` that may be taken (see :func:`refusal`), sorted by
    path; symlinked folders are not followed, and folders whose name is not UTF-8 are
    skipped whole (one ``on_skip`` for the folder)."""
    real_root = root.resolve()
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
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not is_utf8(entry.name):
                        on_skip(path, "a folder whose name is not valid UTF-8 (rename it)")
                    else:
                        subfolders.append(path)
                    continue
                if not entry.is_file(follow_symlinks=True):
                    on_skip(path, _not_a_file(entry))
                    continue
                reason = refusal(path, real_root, follow_symlinks, is_link=entry.is_symlink())
                if reason is not None:
                    on_skip(path, reason)
                    continue
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                continue  # vanished between listing and stat: nothing to do
            except OSError as exc:
                on_error(path, exc)
                continue
            yield FileEvent.from_stat(
                pipeline, path, path.relative_to(root).as_posix(), st, "scanned"
            )
        if recursive:
            stack.extend(reversed(subfolders))
