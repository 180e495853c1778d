"""skyframe: move field data from landing folders to remote storage, reliably.

The names below are loaded on first use (``from skyframe import hookimpl`` loads the markers),
so that the command line can start, and be interrupted, before the libraries are loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyframe.errors import (
        ConfigError,
        DeliveryError,
        PluginError,
        ProcessError,
        SkyframeError,
    )
    from skyframe.events import DerivedFile, FileEvent, Job, LifecycleEvent
    from skyframe.markers import hookimpl, process, rule
    from skyframe.storage import Sink, SourceReader, TransferRequest, TransferResult
    from skyframe.units import Duration, Size

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "ConfigError": "skyframe.errors",
    "DeliveryError": "skyframe.errors",
    "PluginError": "skyframe.errors",
    "ProcessError": "skyframe.errors",
    "SkyframeError": "skyframe.errors",
    "DerivedFile": "skyframe.events",
    "FileEvent": "skyframe.events",
    "Job": "skyframe.events",
    "LifecycleEvent": "skyframe.events",
    "hookimpl": "skyframe.markers",
    "process": "skyframe.markers",
    "rule": "skyframe.markers",
    "Sink": "skyframe.storage",
    "SourceReader": "skyframe.storage",
    "TransferRequest": "skyframe.storage",
    "TransferResult": "skyframe.storage",
    "Duration": "skyframe.units",
    "Size": "skyframe.units",
}

__all__ = [
    "ConfigError",
    "DeliveryError",
    "DerivedFile",
    "Duration",
    "FileEvent",
    "Job",
    "LifecycleEvent",
    "PluginError",
    "ProcessError",
    "Sink",
    "Size",
    "SkyframeError",
    "SourceReader",
    "TransferRequest",
    "TransferResult",
    "hookimpl",
    "process",
    "rule",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'skyframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
