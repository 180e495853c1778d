"""Prometheus metrics: counters from lifecycle events, gauges from the status document."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skyframe.events import LifecycleEvent
from skyframe.metrics import MAX_OPEN_STARTS, Metrics

S3 = "s3://bucket/flights"
NAS = "/mnt/nas/flights"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def lifecycle(kind: Any, relpath: str = "a.jpg", *, pipeline: str = "survey", **fields: Any) -> Any:
    """A real LifecycleEvent; ``error`` is set whether or not the class has that field yet."""
    error = fields.pop("error", None)
    if any(f.name == "error" for f in dataclasses.fields(LifecycleEvent)):
        return LifecycleEvent(kind, pipeline, relpath, **fields, error=error)
    event = LifecycleEvent(kind, pipeline, relpath, **fields)
    if error is not None:
        object.__setattr__(event, "error", error)
    return event


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def run_threads(work: Callable[[int], None], count: int) -> None:
    """Run ``work(n)`` for n in range(count), each on its own thread, and wait for all."""
    workers = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def test_delivered_files_and_bytes_per_sink_from_many_threads() -> None:
    metrics = Metrics()
    threads, per_thread = 8, 200

    def work(n: int) -> None:
        for i in range(per_thread):
            rel = f"t{n}/f{i}.jpg"
            metrics.observe(lifecycle("delivered", rel, sink=S3, size=1000))
            metrics.observe(lifecycle("delivered", rel, sink=NAS, size=7))
            metrics.observe(lifecycle("progress", rel, sink=S3, size=1000, bytes_done=10))
            metrics.observe(lifecycle("queued", rel, size=1000))

    run_threads(work, threads)
    metrics.observe(lifecycle("delivered", "x.log", pipeline="logs", sink=S3, size=5))

    s = scrape(metrics)
    total = threads * per_thread
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=S3) == total
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=NAS) == total
    assert value(s, "skyframe_files_delivered_total", pipeline="logs", sink=S3) == 1
    assert value(s, "skyframe_bytes_delivered_total", pipeline="survey", sink=S3) == total * 1000
    assert value(s, "skyframe_bytes_delivered_total", pipeline="survey", sink=NAS) == total * 7
    assert value(s, "skyframe_bytes_delivered_total", pipeline="logs", sink=S3) == 5
    # Nothing else became a failure or a delivery.
    assert "skyframe_failures_total" not in names(s)
    assert "skyframe_dead_letters_total" not in names(s)


def test_failures_by_error_type_and_dead_letters() -> None:
    metrics = Metrics()
    metrics.observe(
        lifecycle("failed", attempt=1, reason="no answer", error="SinkUnavailableError")
    )
    metrics.observe(
        lifecycle("failed", attempt=2, reason="no answer", error="SinkUnavailableError")
    )
    metrics.observe(lifecycle("failed", "b.jpg", sink=S3, error="TimeoutError"))
    metrics.observe(lifecycle("failed", "c.jpg", reason="?"))  # no error type: "unknown"
    metrics.observe(lifecycle("dead-lettered", attempt=5, error="PermissionError"))
    metrics.observe(lifecycle("dead-lettered", "z.bin", pipeline="logs"))

    s = scrape(metrics)
    failures = {
        dict(labels)["pipeline"] + "|" + dict(labels)["sink"] + "|" + dict(labels)["error"]: v
        for (name, labels), v in s.items()
        if name == "skyframe_failures_total"
    }
    assert failures == {
        "survey||SinkUnavailableError": 2,
        f"survey|{S3}|TimeoutError": 1,
        "survey||unknown": 1,
        "survey||PermissionError": 1,
        "logs||unknown": 1,
    }
    assert value(s, "skyframe_dead_letters_total", pipeline="survey") == 1
    assert value(s, "skyframe_dead_letters_total", pipeline="logs") == 1
    assert "skyframe_files_delivered_total" not in names(s)


def test_delivery_seconds_from_started_to_delivered() -> None:
    metrics = Metrics()
    metrics.observe(lifecycle("started", "a.jpg", sink=S3, size=10, time=100.0))
    metrics.observe(lifecycle("started", "a.jpg", sink=NAS, size=10, time=100.0))
    metrics.observe(lifecycle("progress", "a.jpg", sink=S3, bytes_done=5, time=100.1))
    metrics.observe(lifecycle("delivered", "a.jpg", sink=S3, size=10, time=100.3))
    metrics.observe(lifecycle("delivered", "a.jpg", sink=NAS, size=10, time=102.0))
    # The same path in another pipeline is another transfer.
    metrics.observe(lifecycle("started", "a.jpg", pipeline="logs", sink=S3, time=50.0))
    metrics.observe(lifecycle("started", "big.mp4", sink=S3, time=200.0))
    metrics.observe(lifecycle("delivered", "big.mp4", sink=S3, size=10, time=290.0))
    metrics.observe(lifecycle("delivered", "a.jpg", pipeline="logs", sink=S3, time=4000.0))

    s = scrape(metrics)
    h = "skyframe_delivery_seconds"
    assert value(s, f"{h}_count", pipeline="survey", sink=S3) == 2
    assert value(s, f"{h}_sum", pipeline="survey", sink=S3) == pytest.approx(90.3)
    assert value(s, f"{h}_bucket", pipeline="survey", sink=S3, le="0.25") == 0
    assert value(s, f"{h}_bucket", pipeline="survey", sink=S3, le="0.5") == 1
    assert value(s, f"{h}_bucket", pipeline="survey", sink=S3, le="60.0") == 1
    assert value(s, f"{h}_bucket", pipeline="survey", sink=S3, le="120.0") == 2
    assert value(s, f"{h}_bucket", pipeline="survey", sink=S3, le="+Inf") == 2
    assert value(s, f"{h}_count", pipeline="survey", sink=NAS) == 1
    assert value(s, f"{h}_sum", pipeline="survey", sink=NAS) == pytest.approx(2.0)
    # Buckets run from 0.05 s to one hour; 3950 s is beyond the last one.
    assert value(s, f"{h}_bucket", pipeline="logs", sink=S3, le="0.05") == 0
    assert value(s, f"{h}_bucket", pipeline="logs", sink=S3, le="3600.0") == 0
    assert value(s, f"{h}_bucket", pipeline="logs", sink=S3, le="+Inf") == 1
    assert value(s, f"{h}_sum", pipeline="logs", sink=S3) == pytest.approx(3950.0)
    assert metrics.open_starts == 0


def test_a_retry_restarts_the_clock_and_an_end_without_start_is_not_timed() -> None:
    metrics = Metrics()
    metrics.observe(lifecycle("started", sink=S3, attempt=1, time=10.0))
    metrics.observe(lifecycle("started", sink=S3, attempt=2, time=50.0))
    metrics.observe(lifecycle("delivered", sink=S3, size=1, time=55.0))
    metrics.observe(lifecycle("delivered", "never-started.jpg", sink=S3, size=1, time=99.0))

    s = scrape(metrics)
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=S3) == 1
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 5.0
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=S3) == 2


@pytest.mark.parametrize("end", ["failed", "dead-lettered", "skipped"])
def test_failed_dead_lettered_and_skipped_drop_the_start(end: str) -> None:
    metrics = Metrics()
    metrics.observe(lifecycle("started", sink=S3, time=0.0))
    metrics.observe(lifecycle("started", sink=NAS, time=0.0))
    metrics.observe(lifecycle("started", "other.jpg", sink=S3, time=0.0))
    assert metrics.open_starts == 3
    # Job-level ends name no sink: every sink's start for that file goes.
    metrics.observe(lifecycle(end, time=1.0, error="OSError"))
    assert metrics.open_starts == 1
    # A later delivery of that file without a new start is not timed from the stale start.
    metrics.observe(lifecycle("delivered", sink=S3, size=1, time=7.0))
    metrics.observe(lifecycle("delivered", "other.jpg", sink=S3, size=1, time=3.0))

    s = scrape(metrics)
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=S3) == 1
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 3.0
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=NAS) is None
    assert metrics.open_starts == 0


def test_a_sink_specific_failure_drops_only_that_sinks_start() -> None:
    metrics = Metrics()
    metrics.observe(lifecycle("started", sink=S3, time=0.0))
    metrics.observe(lifecycle("started", sink=NAS, time=0.0))
    metrics.observe(lifecycle("failed", sink=NAS, time=1.0, error="OSError"))
    assert metrics.open_starts == 1
    metrics.observe(lifecycle("delivered", sink=S3, size=1, time=4.0))
    s = scrape(metrics)
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 4.0
    assert metrics.open_starts == 0


def test_timing_from_many_threads() -> None:
    metrics = Metrics()
    threads, per_thread = 8, 150

    def work(n: int) -> None:
        for i in range(per_thread):
            rel = f"t{n}/f{i}.jpg"
            metrics.observe(lifecycle("started", rel, sink=S3, time=1000.0 + i))
            metrics.observe(lifecycle("delivered", rel, sink=S3, size=1, time=1002.0 + i))

    run_threads(work, threads)

    s = scrape(metrics)
    total = threads * per_thread
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=S3) == total
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 2.0 * total
    assert value(s, "skyframe_delivery_seconds_bucket", pipeline="survey", sink=S3, le="1.0") == 0
    assert (
        value(s, "skyframe_delivery_seconds_bucket", pipeline="survey", sink=S3, le="2.5") == total
    )
    assert metrics.open_starts == 0


def test_open_starts_are_bounded_oldest_dropped() -> None:
    metrics = Metrics(max_open_starts=3)
    for i in range(5):
        metrics.observe(lifecycle("started", f"f{i}.jpg", sink=S3, time=float(i)))
    assert metrics.open_starts == 3
    for i in range(5):
        metrics.observe(lifecycle("delivered", f"f{i}.jpg", sink=S3, size=1, time=10.0))
    s = scrape(metrics)
    # f0 and f1 were forgotten; f2, f3 and f4 took 8 + 7 + 6 seconds.
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=S3) == 3
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 21.0
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=S3) == 5
    assert metrics.open_starts == 0


def test_a_restarted_transfer_counts_as_the_newest_start() -> None:
    metrics = Metrics(max_open_starts=2)
    metrics.observe(lifecycle("started", "f0.jpg", sink=S3, time=0.0))
    metrics.observe(lifecycle("started", "f1.jpg", sink=S3, time=1.0))
    metrics.observe(lifecycle("started", "f0.jpg", sink=S3, attempt=2, time=2.0))
    metrics.observe(lifecycle("started", "f2.jpg", sink=S3, time=3.0))  # drops f1, not f0
    assert metrics.open_starts == 2
    for rel in ("f0.jpg", "f1.jpg", "f2.jpg"):
        metrics.observe(lifecycle("delivered", rel, sink=S3, size=1, time=10.0))
    s = scrape(metrics)
    assert value(s, "skyframe_delivery_seconds_count", pipeline="survey", sink=S3) == 2
    assert value(s, "skyframe_delivery_seconds_sum", pipeline="survey", sink=S3) == 15.0


def test_open_starts_default_bound_is_enforced() -> None:
    assert MAX_OPEN_STARTS == 100_000
    metrics = Metrics()
    for i in range(MAX_OPEN_STARTS + 10):
        metrics._start("survey", f"f{i}", S3, 0.0)
    assert metrics.open_starts == MAX_OPEN_STARTS
    assert metrics._stop("survey", "f9", S3) is None  # among the 10 oldest, dropped
    assert metrics._stop("survey", "f10", S3) == 0.0


def status_doc() -> dict[str, Any]:
    return {
        "version": "0.4.0",
        "paused": False,
        "pipelines": [
            {
                "name": "survey",
                "source": "/data/incoming",
                "paused": True,
                "queue": {"pending": 12, "leased": 3, "waiting": 1, "dead": 0},
                "sinks": [
                    {"key": S3, "display": S3, "health": "ok", "in_flight": 3},
                    {"key": NAS, "display": "nas", "health": "offline", "in_flight": 0},
                ],
            },
            {
                "name": "logs",
                "source": "/data/logs",
                "paused": False,
                "queue": {"pending": 0, "leased": 0, "waiting": 0, "dead": 4},
                "sinks": [{"key": S3, "display": S3, "health": "unknown", "in_flight": 0}],
            },
        ],
        "transfers": [],
        "totals": {"delivered": 0, "bytes": 0, "failed": 0, "dead_lettered": 0},
    }


def test_gauges_from_the_status_document() -> None:
    metrics = Metrics()
    doc = status_doc()
    metrics.set_status_source(lambda: doc)
    s = scrape(metrics)

    queue = {
        (dict(lab)["pipeline"], dict(lab)["state"]): v
        for (name, lab), v in s.items()
        if name == "skyframe_queue_depth"
    }
    assert queue == {
        ("survey", "pending"): 12,
        ("survey", "leased"): 3,
        ("survey", "waiting"): 1,
        ("survey", "dead"): 0,
        ("logs", "pending"): 0,
        ("logs", "leased"): 0,
        ("logs", "waiting"): 0,
        ("logs", "dead"): 4,
    }
    assert value(s, "skyframe_in_flight", pipeline="survey", sink=S3) == 3
    assert value(s, "skyframe_in_flight", pipeline="survey", sink=NAS) == 0
    assert value(s, "skyframe_in_flight", pipeline="logs", sink=S3) == 0
    assert value(s, "skyframe_sink_up", pipeline="survey", sink=S3) == 1
    assert value(s, "skyframe_sink_up", pipeline="survey", sink=NAS) == 0
    assert value(s, "skyframe_sink_up", pipeline="logs", sink=S3) == 0  # unknown is not up
    assert value(s, "skyframe_paused", pipeline="survey") == 1
    assert value(s, "skyframe_paused", pipeline="logs") == 0

    # Read at every scrape: a daemon-wide pause holds every pipeline.
    doc["paused"] = True
    doc["pipelines"][0]["queue"]["pending"] = 2
    s = scrape(metrics)
    assert value(s, "skyframe_paused", pipeline="survey") == 1
    assert value(s, "skyframe_paused", pipeline="logs") == 1
    assert value(s, "skyframe_queue_depth", pipeline="survey", state="pending") == 2

    doc["paused"] = False
    doc["pipelines"][0]["paused"] = False
    s = scrape(metrics)
    assert value(s, "skyframe_paused", pipeline="survey") == 0
    assert value(s, "skyframe_paused", pipeline="logs") == 0


def test_a_failing_status_source_still_renders_the_counters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    metrics.observe(lifecycle("delivered", sink=S3, size=42))

    def broken() -> dict[str, Any]:
        raise RuntimeError("status is broken")

    metrics.set_status_source(broken)
    with caplog.at_level(logging.ERROR, logger="skyframe.metrics"):
        s = scrape(metrics)
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=S3) == 1
    assert value(s, "skyframe_bytes_delivered_total", pipeline="survey", sink=S3) == 42
    gauges = {"skyframe_queue_depth", "skyframe_in_flight", "skyframe_sink_up", "skyframe_paused"}
    assert not gauges & names(s)
    assert "status is broken" in caplog.text

    # A malformed document is treated the same way.
    metrics.set_status_source(lambda: {"pipelines": [{"queue": {}}]})
    s = scrape(metrics)
    assert not gauges & names(s)
    assert value(s, "skyframe_files_delivered_total", pipeline="survey", sink=S3) == 1


def test_no_status_source_means_no_gauges() -> None:
    metrics = Metrics()
    s = scrape(metrics)
    assert not {"skyframe_queue_depth", "skyframe_paused"} & names(s)


def test_observe_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.CRITICAL, logger="skyframe.metrics"):
        metrics.observe(object())  # type: ignore[arg-type]
        metrics.observe(lifecycle("delivered", sink=S3, size="lots"))
    metrics.observe(lifecycle("delivered", sink=S3, size=3))
    assert value(scrape(metrics), "skyframe_bytes_delivered_total", pipeline="survey", sink=S3) == 3


def test_each_instance_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.observe(lifecycle("delivered", sink=S3, size=1))
    assert value(scrape(two), "skyframe_files_delivered_total", pipeline="survey", sink=S3) is None
    assert value(scrape(one), "skyframe_files_delivered_total", pipeline="survey", sink=S3) == 1
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "skyframe_" not in default
