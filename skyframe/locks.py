"""Advisory locks on an open file, on every platform skyframe runs on.

Where there is ``fcntl`` (Linux, macOS, the BSDs) a lock is ``flock(2)`` on the whole file,
shared or exclusive. On Windows it is one byte locked with ``msvcrt.locking`` far beyond the
file's contents: Windows locks are mandatory, so locking the bytes a process writes (the state
lock's PID) would stop others from reading them. Windows has no shared lock through msvcrt:
a shared lock there is the exclusive one, held for as long as the caller holds it (the only
shared lock skyframe takes is an instant's look at whether a daemon runs).

Either way the operating system drops a process's locks when it dies, even when killed.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_fcntl = _optional("fcntl")  # POSIX
_msvcrt = _optional("msvcrt")  # Windows

#: Where the Windows lock's byte is: past anything a lock file holds.
BYTE_OFFSET = 0x7FFF_FFF0


class LockingUnavailable(OSError):
    """This platform offers neither flock nor msvcrt's locking."""


def backend() -> str:
    """``flock`` or ``msvcrt``: how this process locks files."""
    if _fcntl is not None:
        return "flock"
    if _msvcrt is not None:
        return "msvcrt"
    raise LockingUnavailable("file locking is not available on this platform")


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the lock on ``fd`` without waiting: True if taken, False if another process
    holds it (OSError for anything else)."""
    if backend() == "flock":
        fcntl = _module(_fcntl)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            return False
        return True
    msvcrt = _module(_msvcrt)
    os.lseek(fd, BYTE_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # EACCES (held), or EDEADLOCK as some versions say it
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return True


def unlock(fd: int) -> None:
    """Release the lock ``try_lock`` took on ``fd`` (closing ``fd`` releases it too, though
    Windows asks for an explicit unlock first)."""
    if backend() == "flock":
        fcntl = _module(_fcntl)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    msvcrt = _module(_msvcrt)
    os.lseek(fd, BYTE_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


def read_at_start(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``fd`` (``os.pread`` is POSIX only)."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, size)


def replace_content(fd: int, data: bytes) -> None:
    """Make ``data`` the whole content of ``fd`` (``os.pwrite`` is POSIX only)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def _module(module: ModuleType | None) -> ModuleType:
    if module is None:  # backend() said it is there: only if the platform changed its mind
        raise LockingUnavailable("file locking is not available on this platform")
    return module
