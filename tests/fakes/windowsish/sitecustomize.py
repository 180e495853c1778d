"""Loaded by every Python process started with this folder on PYTHONPATH: the interpreter then
looks like Windows's to skyframe, as far as a POSIX machine can make it.

- The POSIX-only modules are unavailable (importing one raises ImportError), as on Windows.
- ``msvcrt`` is there (once ``subprocess``, which takes it for a sign of Windows, is
  imported) with what skyframe uses of it, ``locking()``: one region from the file's
  current position, non-blocking or released, on top of POSIX record locks (``os.lockf``),
  which like Windows's are taken on byte ranges and dropped when the process ends.
"""

from __future__ import annotations

import os
import subprocess  # noqa: F401 (first: Python 3.11's subprocess takes msvcrt for Windows)
import sys
import types

POSIX_ONLY = ("fcntl", "termios", "resource", "pwd", "grp")

for name in POSIX_ONLY:
    sys.modules[name] = None  # type: ignore[assignment]  # "import fcntl" raises ImportError

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4


def locking(fd: int, mode: int, nbytes: int) -> None:
    """msvcrt.locking: lock or unlock ``nbytes`` from the current position; OSError when a
    non-blocking lock is held elsewhere."""
    if mode == LK_UNLCK:
        os.lockf(fd, os.F_ULOCK, nbytes)
    elif mode in (LK_NBLCK, LK_NBRLCK):
        os.lockf(fd, os.F_TLOCK, nbytes)
    else:
        os.lockf(fd, os.F_LOCK, nbytes)


msvcrt = types.ModuleType("msvcrt", "The part of Windows's msvcrt that skyframe uses.")
for attribute, value in {
    "locking": locking,
    "LK_UNLCK": LK_UNLCK,
    "LK_LOCK": LK_LOCK,
    "LK_NBLCK": LK_NBLCK,
    "LK_RLCK": LK_RLCK,
    "LK_NBRLCK": LK_NBRLCK,
}.items():
    setattr(msvcrt, attribute, value)
sys.modules["msvcrt"] = msvcrt
