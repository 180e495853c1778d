"""One backoff rule for delivery retries, sink health and webhooks."""

from __future__ import annotations

import pytest

from skyframe import backoff
from skyframe.errors import SinkUnavailableError
from skyframe.storage import SinkHealth


def test_the_ceiling_doubles_from_initial_up_to_the_maximum() -> None:
    assert [backoff.ceiling(1.0, 10.0, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff.ceiling(1.0, 10.0, 0) == 1.0  # before any failure: the initial wait


def test_each_wait_lies_between_half_and_all_of_the_ceiling() -> None:
    waits = [backoff.delay(2.0, 60.0, 3) for _ in range(2000)]
    assert min(waits) >= 4.0
    assert max(waits) <= 8.0
    assert max(waits) - min(waits) > 3.0  # jittered: stations that failed together spread out


def test_sink_health_waits_by_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff.random, "uniform", lambda low, high: high)
    clock = [1000.0]
    monkeypatch.setattr("skyframe.storage.time.monotonic", lambda: clock[0])
    health = SinkHealth(initial=1.0, maximum=5.0)
    waits = []
    for _ in range(5):
        health.failed(SinkUnavailableError("link down"))
        waits.append(health.wait())
        clock[0] += waits[-1]  # the wait is over: the next failure counts
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
