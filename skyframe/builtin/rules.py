"""Stock rules: ignore, include, type, size, age."""

from __future__ import annotations

import fnmatch
import functools
import mimetypes
import re
from collections.abc import Iterable, Mapping
from typing import Any

from skyframe.events import FileEvent
from skyframe.markers import rule
from skyframe.storage import TEMP_GLOB
from skyframe.units import Duration, Size, format_size

#: Always ignored unless ``defaults: false``: editor swap and backup files, partial downloads,
#: OS clutter, and the hidden temporary files of skyframe's own uploads.
DEFAULT_IGNORES = (
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    "#*#",
    ".#*",
    "4913",  # vim's write-permission probe
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
    "~$*",  # office lock files
    "._*",  # AppleDouble resource forks
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    ".Trash-*",
    ".Trashes",
    ".Spotlight-V100",
    ".fseventsd",
    TEMP_GLOB,
)


def _match_parts(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":  # any number of folders, none included
        return any(_match_parts(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _match_parts(parts[1:], pattern[1:])
    )


@functools.lru_cache(maxsize=64)
def _name_regex(patterns: tuple[str, ...], case_sensitive: bool) -> tuple[re.Pattern[str], bool]:
    """The patterns without ``/`` (which match any one name along a path) as one regex, and
    whether there are others."""
    simple = [p if case_sensitive else p.lower() for p in patterns if "/" not in p]
    regex = "|".join(f"(?:{fnmatch.translate(p)})" for p in simple) or "(?!)"
    return re.compile(regex), len(simple) < len(patterns)


def matching_pattern(relpath: str, patterns: Iterable[str], case_sensitive: bool) -> str | None:
    """The first glob that matches, gitignore-style.

    A pattern matches a file, or a folder the file is in. Without ``/`` it matches any name
    along the path (``cache``, ``*.tmp``). With ``/`` it matches a run of names ending the
    path or a folder in it (``raw/*.dng``), anchored at the source root when it starts with
    ``/`` (``/DCIM``). ``**`` stands for any number of folders; a trailing ``/`` matches
    folders only.
    """
    path = relpath if case_sensitive else relpath.lower()
    parts = path.split("/")
    patterns = tuple(patterns)
    names, others = _name_regex(patterns, case_sensitive)
    if not others and not any(names.match(part) for part in parts):
        return None  # the usual answer, found in one regex pass; a hit is named below
    for pattern in patterns:
        pat = pattern if case_sensitive else pattern.lower()
        folders_only = pat.endswith(("/", "/**"))  # "raw/**": what is inside raw, not raw
        pat = pat.removesuffix("/**").rstrip("/")
        # Where a match may end: at the file itself, or at any folder holding it.
        ends = range(1, len(parts)) if folders_only else range(1, len(parts) + 1)
        if "/" not in pat:
            if any(fnmatch.fnmatchcase(parts[end - 1], pat) for end in ends):
                return pattern
            continue
        pieces = pat.lstrip("/").split("/")
        starts = [0] if pat.startswith("/") else range(len(parts))
        if any(_match_parts(parts[i:end], pieces) for i in starts for end in ends if end > i):
            return pattern
    return None


@rule
def rule_ignore(
    event: FileEvent,
    patterns: list[str] | None = None,
    defaults: bool = True,
    case_sensitive: bool = False,
) -> bool | str:
    """Reject files matching globs; swap, temp and partial files always, unless defaults: false."""
    all_patterns = [*(DEFAULT_IGNORES if defaults else ()), *(patterns or ())]
    hit = matching_pattern(event.relpath, all_patterns, case_sensitive)
    return hit is None or f"matches {hit!r}"


def _some_patterns(options: Mapping[str, Any]) -> None:
    if not options["patterns"]:
        raise ValueError("patterns is empty: no file would pass")
    if any(not p.strip("/") for p in options["patterns"]):
        raise ValueError("an empty pattern (or only /) matches no file: write a glob, e.g. *.jpg")


@rule(check=_some_patterns)
def rule_include(event: FileEvent, patterns: list[str], case_sensitive: bool = False) -> bool | str:
    """Accept only files matching at least one glob pattern."""
    return matching_pattern(event.relpath, patterns, case_sensitive) is not None or (
        f"matches none of {', '.join(patterns)}"
    )


def _extensions_or_mime(options: Mapping[str, Any]) -> None:
    if not options["extensions"] and not options["mime"]:
        raise ValueError("needs extensions or mime (or both): without them no file would pass")
    for extension in options["extensions"] or ():
        bare = extension.removeprefix(".")
        if not bare or any(c in bare for c in "*?[]/\\"):
            raise ValueError(
                f"extension {extension!r} matches no file: write it as jpg or .jpg, no glob"
            )
        if "." in bare:  # compared with the last extension only
            last = bare.rsplit(".", 1)[1]
            raise ValueError(
                f"extension {extension!r} matches no file: only the last one is compared "
                f"(write {last})"
            )
    for mime in options["mime"] or ():
        kind, slash, sub = mime.partition("/")
        if not (kind and slash and sub):
            raise ValueError(f"MIME type {mime!r} is type/subtype: image/jpeg, image/*")


@rule(check=_extensions_or_mime)
def rule_type(
    event: FileEvent, extensions: list[str] | None = None, mime: list[str] | None = None
) -> bool | str:
    """Accept files by extension (jpg, .dng) or MIME type (image/jpeg, video/*)."""
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions or ()}
    if event.suffix in wanted:
        return True
    guessed, _ = mimetypes.guess_type(event.name, strict=False)
    if guessed and any(fnmatch.fnmatchcase(guessed, m.lower()) for m in mime or ()):
        return True
    return f"type {event.suffix or 'without extension'} ({guessed or 'unknown MIME'}) not accepted"


def _size_range(options: Mapping[str, Any]) -> None:
    low, high = options["min"], options["max"]
    if high is not None and low > high:
        raise ValueError(
            f"min ({format_size(low)}) is above max ({format_size(high)}): no file would pass"
        )


@rule(check=_size_range)
def rule_size(event: FileEvent, min: Size = 0, max: Size | None = None) -> bool | str:
    """Accept files whose size is within [min, max] (e.g. 1B, 100GB)."""
    if event.size < min:
        return f"{format_size(event.size)} is below the minimum of {format_size(min)}"
    if max is not None and event.size > max:
        return f"{format_size(event.size)} is above the maximum of {format_size(max)}"
    return True


def _age_range(options: Mapping[str, Any]) -> None:
    low, high = options["min"], options["max"]
    if high is not None and high <= 0:
        raise ValueError("max must be longer than 0: no file is modified less than 0s ago")
    if high is not None and low > high:
        raise ValueError(f"min ({low:g}s) is above max ({high:g}s): no file would pass")


@rule(check=_age_range)
def rule_age(event: FileEvent, min: Duration = 0.0, max: Duration | None = None) -> bool | str:
    """Accept files last modified between min and max ago (e.g. 30s, 7d)."""
    age = event.age
    if age < min:
        return f"modified {age:.0f}s ago, younger than {min:.0f}s"
    if max is not None and age > max:
        return f"modified {age:.0f}s ago, older than {max:.0f}s"
    return True
