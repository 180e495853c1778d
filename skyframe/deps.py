"""Where skyframe leans on its dependencies beyond their documented API, in one place.

- :func:`import_asyncssh` imports asyncssh (and sshfs) with the one third-party warning that
  is known and harmless filtered at its source, so that it reaches neither users nor tests.
- :func:`internal` hands out an undocumented attribute of a dependency when it is there, and
  None when it is gone (or ``SKYFRAME_NO_INTERNALS`` is set): the caller then takes the public
  path. Each miss is logged once, at debug level, naming the package and its version.

Every use is listed in docs/dependencies.md, with its fallback and the test that watches it.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from importlib import metadata
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: set to anything but "" or "0" to take the public path everywhere (tests, and a field fix)
NO_INTERNALS_ENV = "SKYFRAME_NO_INTERNALS"

_reported: set[str] = set()
_reported_lock = threading.Lock()


def version_of(package: str) -> str:
    """The installed version of a distribution, or "?" when it cannot be told."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def internals_allowed() -> bool:
    """False when ``SKYFRAME_NO_INTERNALS`` asks for the public path everywhere."""
    return os.environ.get(NO_INTERNALS_ENV, "") in ("", "0")


def internal(owner: Any, name: str, package: str, fallback: str) -> Any:
    """``owner.name`` when it exists and internals are allowed, else None.

    ``package`` is the distribution that owns it and ``fallback`` what the caller does
    instead: both go into the debug line logged the first time the internal is missed.
    """
    value = getattr(owner, name, None) if internals_allowed() else None
    if value is None:
        where = getattr(owner, "__name__", type(owner).__name__)
        missed(package, f"{where}.{name}", fallback)
    return value


def missed(package: str, what: str, fallback: str) -> None:
    """Log, once per process, that ``what`` of ``package`` is not used and what is done."""
    key = f"{package}:{what}"
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    reason = "not found" if internals_allowed() else f"not used ({NO_INTERNALS_ENV})"
    log.debug("%s %s: %s %s; %s", package, version_of(package), what, reason, fallback)


def quiet_known_warnings() -> None:
    """Filter the known, harmless third-party warnings at their source.

    cryptography 47 and later deprecates DSA; asyncssh names DSA types in its annotations,
    so importing it warns a dozen times, although skyframe never uses a DSA key. Only that
    message, of that category, raised from asyncssh's own modules, is ignored.
    """
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # an older cryptography, or none: nothing to filter
        return
    warnings.filterwarnings(
        "ignore",
        message=r"DSA is deprecated",
        category=CryptographyDeprecationWarning,
        module=r"asyncssh(\.|$)",
    )


def import_asyncssh() -> ModuleType:
    """asyncssh, imported with its known warning filtered (see :func:`quiet_known_warnings`).

    The filter is added again at every call: a caller that resets the warning filters (as
    pytest does for each test) still gets it before the import that would warn.
    """
    quiet_known_warnings()
    import asyncssh

    return asyncssh


def import_sshfs() -> ModuleType:
    """sshfs, which imports asyncssh (see :func:`import_asyncssh`)."""
    import_asyncssh()
    import sshfs

    module: ModuleType = sshfs
    return module
