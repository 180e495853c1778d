"""The live status of a running engine: what is moving, how fast, what failed.

:class:`StatusTracker` follows the lifecycle events (cheaply, in the emitting thread) and
builds the status document of ``GET /api/status`` (docs/api.md) on demand.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from skyframe import __version__
from skyframe.events import LifecycleEvent
from skyframe.pipeline import Pipeline

THROUGHPUT_WINDOW = 10.0  #: seconds the throughput figures cover
ERRORS_KEPT = 20  #: latest failures shown
QUEUE_COUNTS_MAX_AGE = 1.0  #: seconds the per-pipeline queue counts may be reused


@dataclass
class _Transfer:
    pipeline: str
    relpath: str
    sink: str
    size: int
    started_at: float
    bytes_done: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started_at, 1e-3)
        return {
            "pipeline": self.pipeline,
            "relpath": self.relpath,
            "sink": self.sink,
            "size": self.size,
            "bytes_done": self.bytes_done,
            "started_at": self.started_at,
            "rate": self.bytes_done / elapsed,
        }


@dataclass
class _SinkCounts:
    delivered: int = 0
    bytes: int = 0
    failed: int = 0


class StatusTracker:
    """Counts and in-flight transfers since the start, fed by :meth:`observe`."""

    def __init__(
        self,
        pipelines: Mapping[str, Pipeline] | Iterable[Pipeline],
        queue_counts: Callable[[], dict[str, dict[str, int]]],
        pause_state: Callable[[], dict[str, Any]],
    ) -> None:
        #: the engine's shared mapping: a reload's pipelines show at once
        self._pipelines: Mapping[str, Pipeline] = (
            pipelines if isinstance(pipelines, Mapping) else {p.name: p for p in pipelines}
        )
        self._queue_counts = queue_counts
        self._pause_state = pause_state
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, str, str], _Transfer] = {}
        self._sinks: dict[tuple[str, str], _SinkCounts] = collections.defaultdict(_SinkCounts)
        self._totals = {"delivered": 0, "bytes": 0, "failed": 0, "dead_lettered": 0}
        #: (time, bytes, files) samples of the last THROUGHPUT_WINDOW seconds
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=ERRORS_KEPT)
        self._counts_cache: tuple[float, dict[str, dict[str, int]]] = (0.0, {})

    # --- events ------------------------------------------------------------------------------

    def observe(self, event: LifecycleEvent) -> None:
        """Follow one lifecycle event."""
        kind = event.kind
        if kind not in ("started", "progress", "delivered", "failed", "dead-lettered"):
            return
        with self._lock:
            if kind == "started" and event.sink is not None:
                key = (event.pipeline, event.relpath, event.sink)
                self._transfers[key] = _Transfer(
                    event.pipeline, event.relpath, event.sink, event.size or 0, event.time
                )
            elif kind == "progress" and event.sink is not None:
                transfer = self._transfers.get((event.pipeline, event.relpath, event.sink))
                if transfer is not None and event.bytes_done is not None:
                    self._sample(event.time, event.bytes_done - transfer.bytes_done, 0)
                    transfer.bytes_done = event.bytes_done
            elif kind == "delivered" and event.sink is not None:
                transfer = self._transfers.pop((event.pipeline, event.relpath, event.sink), None)
                size = event.size or 0
                self._sample(event.time, size - (transfer.bytes_done if transfer else 0), 1)
                counts = self._sinks[(event.pipeline, event.sink)]
                counts.delivered += 1
                counts.bytes += size
                self._totals["delivered"] += 1
                self._totals["bytes"] += size
            else:  # failed, dead-lettered
                self._drop_transfers(event.pipeline, event.relpath)
                self._totals["failed" if kind == "failed" else "dead_lettered"] += 1
                if event.sink is not None:
                    self._sinks[(event.pipeline, event.sink)].failed += 1
                self._errors.appendleft(
                    {
                        key: value
                        for key, value in event.to_json().items()
                        if key in ("time", "kind", "pipeline", "relpath", "sink", "error", "reason")
                    }
                )

    def job_ended(self, pipeline: str, relpath: str) -> None:
        """A job is settled either way: none of its transfers runs any more."""
        with self._lock:
            self._drop_transfers(pipeline, relpath)

    def _drop_transfers(self, pipeline: str, relpath: str) -> None:
        for key in [k for k in self._transfers if k[0] == pipeline and k[1] == relpath]:
            del self._transfers[key]

    def _sample(self, at: float, sent: int, files: int) -> None:
        self._samples.append((at, max(sent, 0), files))
        self._trim(time.time())

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - THROUGHPUT_WINDOW:
            self._samples.popleft()

    # --- the document ------------------------------------------------------------------------

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """Jobs per pipeline and state, at most a second old."""
        at, counts = self._counts_cache
        now = time.monotonic()
        if now - at > QUEUE_COUNTS_MAX_AGE:
            counts = self._queue_counts()
            self._counts_cache = (now, counts)
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The status document (docs/api.md)."""
        queue = self.queue_counts()
        pause = self._pause_state()
        now = time.time()
        with self._lock:
            self._trim(now)
            sent = sum(b for _, b, _ in self._samples)
            files = sum(f for _, _, f in self._samples)
            # Just after the start the window is shorter than THROUGHPUT_WINDOW.
            window = min(THROUGHPUT_WINDOW, max(now - self.started_at, 1.0))
            in_flight = collections.Counter((t.pipeline, t.sink) for t in self._transfers.values())
            pipelines = []
            for pipeline in self._pipelines.values():
                sinks = []
                for sink in pipeline.sinks:
                    counts = self._sinks.get((pipeline.name, sink.key), _SinkCounts())
                    health = sink.health
                    sinks.append(
                        {
                            "key": sink.key,
                            "display": sink.display,
                            "health": health.state,
                            "last_error": health.last_error or None,
                            "in_flight": in_flight[(pipeline.name, sink.key)],
                            "delivered": counts.delivered,
                            "bytes": counts.bytes,
                            "failed": counts.failed,
                        }
                    )
                pipelines.append(
                    {
                        "name": pipeline.name,
                        "source": str(pipeline.source_root),
                        "paused": pause["pipelines"].get(pipeline.name, False),
                        "queue": queue.get(
                            pipeline.name, {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
                        ),
                        "sinks": sinks,
                    }
                )
            return {
                "version": __version__,
                "pid": os.getpid(),
                "started_at": self.started_at,
                "paused": pause["paused"],
                "metered": pause.get("metered", False),
                "pipelines": pipelines,
                # Jobs of pipelines a reload removed: they wait until it is configured again.
                "removed": [
                    {"name": name, "queue": counts}
                    for name, counts in sorted(queue.items())
                    if name not in self._pipelines
                    and any(counts.get(state) for state in ("pending", "leased", "waiting"))
                ],
                "transfers": [t.to_json(now) for t in self._transfers.values()],
                "throughput": {
                    "bytes_per_s": sent / window,
                    "files_per_s": files / window,
                },
                "totals": dict(self._totals),
                "errors": list(self._errors),
            }
