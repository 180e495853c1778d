"""How long to wait before trying again: one rule for delivery retries, sink health and
webhooks.

Exponential backoff with full-range jitter in the upper half: the n-th consecutive failure
waits between half and all of ``min(maximum, initial * 2**(n-1))`` seconds, so that stations
and transfers that failed together do not come back together.
"""

from __future__ import annotations

import random


def ceiling(initial: float, maximum: float, failures: int) -> float:
    """The longest wait after ``failures`` consecutive failures (the first waits ``initial``)."""
    return float(min(maximum, initial * 2 ** max(failures - 1, 0)))


def delay(initial: float, maximum: float, failures: int) -> float:
    """A wait after ``failures`` consecutive failures: between half and all of :func:`ceiling`."""
    return ceiling(initial, maximum, failures) * random.uniform(0.5, 1.0)


def spread(seconds: float) -> float:
    """A short random wait of up to ``seconds``, so that jobs released together spread out."""
    return random.uniform(0.0, seconds)
