"""File names a target folder cannot hold: Windows's rules, and names that differ only in case.

A name that is fine on Linux and on S3 can be refused by a Windows folder (``CON``, ``a:b``,
a trailing dot) or, worse, silently land on another file on a folder that ignores case
(Windows, macOS, an exFAT card): ``DJI_0001.JPG`` and ``dji_0001.jpg`` are one file there.
Both make a file's delivery fail with a message that says so, rather than lose a file.
"""

from __future__ import annotations

import os
import re

from skyframe.errors import UnsafePathError

#: Device names Windows reserves in every folder, with any extension (``CON.txt`` too).
RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)
_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')


def windows_problem(name: str) -> str | None:
    """Why Windows cannot hold the remote name ``name`` (``/``-separated), or None."""
    for part in name.split("/"):
        bad = _FORBIDDEN.search(part)
        if bad:
            return f"{part!r} contains {bad.group()!r}, which Windows does not allow in a name"
        if part.endswith((".", " ")):
            return f"{part!r} ends with a {'dot' if part.endswith('.') else 'space'}"
        stem = part.split(".", 1)[0].rstrip(" ").upper()
        if stem in RESERVED:
            return f"{part!r} is a device name Windows reserves ({stem})"
    return None


def check_windows_name(name: str) -> None:
    """UnsafePathError (not retried: the name will not change) naming what Windows refuses."""
    problem = windows_problem(name)
    if problem is not None:
        raise UnsafePathError(f"remote name {name!r} cannot be written on Windows: {problem}")


def case_twin(name: str, exists: bool, listing: list[str]) -> str | None:
    """The other name a folder took ``name`` for, when it ignores case: ``exists`` says whether
    the folder finds ``name``, ``listing`` is what the folder holds. None when it holds
    ``name`` itself, or nothing it takes for it."""
    if not exists or name in listing:
        return None
    folded = name.casefold()
    return next((entry for entry in listing if entry.casefold() == folded), None)


def check_no_case_twin(path: str) -> None:
    """UnsafePathError when writing ``path`` would replace a file whose name differs from it
    only in case (a folder that ignores case)."""
    folder, name = os.path.split(path)
    try:
        exists = os.path.lexists(path)
        twin = case_twin(name, exists, os.listdir(folder) if exists else [])
    except OSError:
        return  # the folder is not there yet: nothing to land on
    if twin is not None:
        raise UnsafePathError(
            f"{path}: the folder ignores case and already holds {twin!r}; {name!r} would replace it"
        )
