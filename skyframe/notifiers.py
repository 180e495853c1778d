"""Lifecycle events to ``skyframe_event`` implementations, each on a thread of its own.

A transfer only appends its event to one bounded buffer per notifier and goes on: a notifier
that is slow (a chat webhook timing out) or that raises cannot hold up or fail a transfer, nor
the other notifiers. Each notifier receives its events in order, from one thread. A notifier
that falls more than ``capacity`` events behind loses the oldest ones, with a warning.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import pluggy

from skyframe.events import LifecycleEvent

log = logging.getLogger(__name__)

CAPACITY = 10_000  #: events buffered per notifier before the oldest are dropped
WARN_INTERVAL = 60.0  #: seconds between two warnings about the same notifier dropping events


class _Channel:
    """One notifier's buffer and the thread that feeds it."""

    def __init__(self, impl: Any, capacity: int) -> None:
        self.impl = impl
        self.name = impl.plugin_name
        self._events: collections.deque[LifecycleEvent] = collections.deque()
        self._capacity = capacity
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.dropped = 0
        self._warned_at = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"skyframe-notify-{self.name}", daemon=True
        )
        self._thread.start()

    def put(self, event: LifecycleEvent) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._events) >= self._capacity:
                self._events.popleft()
                self.dropped += 1
                now = time.monotonic()
                if now - self._warned_at >= WARN_INTERVAL:
                    self._warned_at = now
                    log.warning(
                        "notifier %s is falling behind: %d event(s) dropped so far",
                        self.name,
                        self.dropped,
                    )
            self._events.append(event)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._events and not self._closed:
                    self._cond.wait()
                if not self._events:
                    return
                event = self._events.popleft()
                self._busy = True
            self._call(event)

    def _call(self, event: LifecycleEvent) -> None:
        # An implementation may take no argument, as pluggy allows.
        try:
            self.impl.function(**{name: event for name in self.impl.argnames})
        except Exception:
            log.exception("notifier %s failed on a %s event", self.name, event.kind)

    def flush(self, deadline: float) -> bool:
        """Wait until every event handed over so far was handled; False on timeout."""
        with self._cond:
            while self._events or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, deadline: float) -> bool:
        caught_up = self.flush(deadline)
        with self._cond:
            self._closed = True
            self._events.clear()
            self._cond.notify_all()
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        return caught_up


class Notifiers:
    """Hands every event to every ``skyframe_event`` implementation registered now."""

    def __init__(self, pm: pluggy.PluginManager, capacity: int = CAPACITY) -> None:
        self._pm = pm
        self._capacity = capacity
        self._channels: dict[int, _Channel] = {}
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, event: LifecycleEvent) -> None:
        """Queue the event for every notifier, in pluggy's call order; never blocks."""
        impls = reversed(self._pm.hook.skyframe_event.get_hookimpls())
        with self._lock:
            if self._closed:
                return
            channels = []
            for impl in impls:
                channel = self._channels.get(id(impl))
                if channel is None or channel.impl is not impl:
                    channel = self._channels[id(impl)] = _Channel(impl, self._capacity)
                channels.append(channel)
        for channel in channels:
            channel.put(event)

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver what is buffered (within ``timeout``), then stop the threads; False when a
        notifier could not catch up in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
        return all([channel.close(deadline) for channel in channels])

    @property
    def dropped(self) -> dict[str, int]:
        """Events dropped so far, per notifier that dropped any."""
        with self._lock:
            return {c.name: c.dropped for c in self._channels.values() if c.dropped}
