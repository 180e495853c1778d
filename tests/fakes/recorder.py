"""A plugin that collects the lifecycle events of a run, for tests to wait on and count."""

from __future__ import annotations

import threading

from skyframe.events import LifecycleEvent
from skyframe.markers import hookimpl


class Recorder:
    """Collects lifecycle events."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []
        self.lock = threading.Lock()

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self, relpath: str) -> list[str]:
        with self.lock:
            return [e.kind for e in self.events if e.relpath == relpath]

    def count(self, kind: str, relpath: str | None = None) -> int:
        with self.lock:
            return sum(1 for e in self.events if e.kind == kind and relpath in (None, e.relpath))
