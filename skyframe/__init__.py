"""skyframe: move field data from landing folders to remote storage, reliably."""

from __future__ import annotations

from skyframe.errors import ConfigError, DeliveryError, PluginError, ProcessError, SkyframeError
from skyframe.events import DerivedFile, FileEvent, Job, LifecycleEvent
from skyframe.markers import hookimpl, process, rule
from skyframe.storage import Sink, SourceReader, TransferRequest, TransferResult
from skyframe.units import Duration, Size

__version__ = "0.1.0"

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
