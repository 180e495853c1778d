"""Prometheus metrics for ``GET /metrics``: counters fed by lifecycle events, gauges from status.

:class:`Metrics` owns a private :class:`prometheus_client.CollectorRegistry` (never the global
default one, so several daemons or tests in one process do not collide). The daemon calls
:meth:`Metrics.observe` for every lifecycle event and :meth:`Metrics.set_status_source` once with
a function returning the ``/api/status`` document; :meth:`Metrics.render` gives the body and
content type of a scrape. The metric names and labels are the contract in docs/api.md.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from skyframe.events import LifecycleEvent

log = logging.getLogger(__name__)

#: Upload durations, from a small file on a LAN to a large video over a slow field link.
DELIVERY_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)

#: At most this many transfers are remembered between ``started`` and ``delivered``.
MAX_OPEN_STARTS = 100_000

StatusSource = Callable[[], dict[str, Any]]


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own.

    Counters and the delivery histogram are fed by :meth:`observe`; the gauges are read from
    the status document at scrape time (see :class:`StatusCollector`).
    """

    def __init__(self, *, max_open_starts: int = MAX_OPEN_STARTS) -> None:
        self.registry = CollectorRegistry()
        self.files_delivered = Counter(
            "skyframe_files_delivered",
            "Files delivered, by pipeline and sink.",
            ["pipeline", "sink"],
            registry=self.registry,
        )
        self.bytes_delivered = Counter(
            "skyframe_bytes_delivered",
            "Bytes delivered, by pipeline and sink.",
            ["pipeline", "sink"],
            registry=self.registry,
        )
        self.failures = Counter(
            "skyframe_failures",
            "Failed attempts and dead-lettered files, by pipeline, sink and error type.",
            ["pipeline", "sink", "error"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "skyframe_dead_letters",
            "Files given up on (moved to the dead-letter list), by pipeline.",
            ["pipeline"],
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "skyframe_delivery_seconds",
            "Seconds from a transfer's started event to its delivered event.",
            ["pipeline", "sink"],
            buckets=DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self.status_collector = StatusCollector()
        self.registry.register(self.status_collector)
        self._max_open_starts = max(1, max_open_starts)
        # (pipeline, relpath) -> {sink: start time}; oldest file first. Keyed by file so that a
        # failed or dead-lettered event, which names no sink, drops every sink's start at once.
        self._starts: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self._open = 0  # the number of (pipeline, relpath, sink) starts in ``_starts``
        self._lock = threading.Lock()

    # --- events ------------------------------------------------------------------------------

    def observe(self, event: LifecycleEvent) -> None:
        """Count one lifecycle event. Cheap, thread-safe, and never raises."""
        try:
            self._observe(event)
        except Exception:
            log.exception("metrics: could not count a %r event", getattr(event, "kind", None))

    def _observe(self, event: LifecycleEvent) -> None:
        kind = event.kind
        if kind == "started":
            if event.sink is not None:
                self._start(event.pipeline, event.relpath, event.sink, event.time)
        elif kind == "delivered":
            sink = event.sink or ""
            self.files_delivered.labels(event.pipeline, sink).inc()
            self.bytes_delivered.labels(event.pipeline, sink).inc(max(0, event.size or 0))
            started = self._stop(event.pipeline, event.relpath, event.sink)
            if started is not None:
                self.delivery_seconds.labels(event.pipeline, sink).observe(
                    max(0.0, event.time - started)
                )
        elif kind in ("failed", "dead-lettered"):
            error = getattr(event, "error", None) or "unknown"
            self.failures.labels(event.pipeline, event.sink or "", error).inc()
            if kind == "dead-lettered":
                self.dead_letters.labels(event.pipeline).inc()
            self._stop(event.pipeline, event.relpath, event.sink)
        elif kind == "skipped":
            self._stop(event.pipeline, event.relpath, event.sink)

    def _start(self, pipeline: str, relpath: str, sink: str, when: float) -> None:
        key = (pipeline, relpath)
        with self._lock:
            sinks = self._starts.get(key)
            if sinks is None:
                sinks = self._starts[key] = {}
            else:
                self._starts.move_to_end(key)
            if sink not in sinks:
                self._open += 1
            sinks[sink] = when
            while self._open > self._max_open_starts and self._starts:
                _, dropped = self._starts.popitem(last=False)
                self._open -= len(dropped)

    def _stop(self, pipeline: str, relpath: str, sink: str | None) -> float | None:
        """Forget the start of one sink's transfer (every sink's when ``sink`` is None)."""
        key = (pipeline, relpath)
        with self._lock:
            sinks = self._starts.get(key)
            if sinks is None:
                return None
            if sink is None:
                del self._starts[key]
                self._open -= len(sinks)
                return None
            started = sinks.pop(sink, None)
            if started is not None:
                self._open -= 1
                if not sinks:
                    del self._starts[key]
            return started

    @property
    def open_starts(self) -> int:
        """How many transfers have started and not yet ended (as far as the events tell)."""
        with self._lock:
            return self._open

    # --- gauges and rendering ----------------------------------------------------------------

    def set_status_source(self, fn: StatusSource | None) -> None:
        """Read the gauges from ``fn()`` (the ``/api/status`` document) at every scrape."""
        self.status_collector.source = fn

    def render(self) -> tuple[bytes, str]:
        """The body and ``Content-Type`` of a ``/metrics`` answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StatusCollector:
    """Gauges computed at scrape time from the daemon's status document.

    - ``skyframe_queue_depth{pipeline,state}``: the pipeline's ``queue`` counts, one series per
      state the document lists (pending, leased, waiting, dead).
    - ``skyframe_in_flight{pipeline,sink}``: the sink's ``in_flight``.
    - ``skyframe_sink_up{pipeline,sink}``: 1 only when the sink's ``health`` is ``ok``; 0 for
      ``offline``, ``refused`` and also ``unknown`` (nothing tried yet, so not known reachable).
    - ``skyframe_paused{pipeline}``: 1 when the pipeline is held, by its own ``paused`` flag or
      by the daemon-wide one.

    The ``sink`` label is the sink's ``key``, the same value lifecycle events carry, so the
    gauges join the counters. If the source raises or returns a malformed document, the error
    is logged and none of these gauges are produced; the counters still render.
    """

    def __init__(self, source: StatusSource | None = None) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        """The metric names this collector owns (lets the registry detect clashes)."""
        return list(_empty_families().values())

    def collect(self) -> Iterator[Metric]:
        """One scrape's gauges (nothing without a working status source)."""
        source = self.source
        if source is None:
            return
        try:
            families = self._families(source())
        except Exception:
            log.exception("metrics: could not read the daemon status")
            return
        yield from families

    @staticmethod
    def _families(status: dict[str, Any]) -> list[Metric]:
        fam = _empty_families()
        held = bool(status.get("paused"))
        for pipe in status.get("pipelines") or []:
            name = str(pipe["name"])
            for state, count in (pipe.get("queue") or {}).items():
                fam["queue"].add_metric([name, str(state)], float(count))
            fam["paused"].add_metric([name], 1.0 if held or pipe.get("paused") else 0.0)
            for sink in pipe.get("sinks") or []:
                key = str(sink["key"])
                fam["in_flight"].add_metric([name, key], float(sink.get("in_flight") or 0))
                fam["up"].add_metric([name, key], 1.0 if sink.get("health") == "ok" else 0.0)
        return list(fam.values())


def _empty_families() -> dict[str, GaugeMetricFamily]:
    return {
        "queue": GaugeMetricFamily(
            "skyframe_queue_depth",
            "Queued jobs by pipeline and state.",
            labels=["pipeline", "state"],
        ),
        "in_flight": GaugeMetricFamily(
            "skyframe_in_flight", "Transfers running now, by sink.", labels=["pipeline", "sink"]
        ),
        "up": GaugeMetricFamily(
            "skyframe_sink_up",
            "1 when the sink is reachable (health ok), else 0.",
            labels=["pipeline", "sink"],
        ),
        "paused": GaugeMetricFamily(
            "skyframe_paused",
            "1 when the pipeline is held (its own pause or the daemon's).",
            labels=["pipeline"],
        ),
    }
