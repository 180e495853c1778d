"""Bandwidth limits (``bwlimit``) shared by concurrent transfers.

A :class:`TokenBucket` holds one limit (bytes per second) for every thread that draws from it;
a :class:`Limiter` combines several, e.g. a global limit and a per-sink one. A transfer calls
:func:`pace` with the size of each piece *before* sending it::

    limiter = Limiter([global_bucket, sink_bucket])
    for chunk in chunks:
        pace(limiter, len(chunk), cancelled)
        if cancelled.is_set():
            break
        send(chunk)

An *urgent* piece (``take(n, urgent=True)``: a small file the pipeline's ``priority`` puts
first) does not queue behind the debt of the others: it waits only for the urgent pieces
before it, at up to ``1 - BULK_SHARE`` of the rate while others are sending (all of it when
alone). Its bytes still count against everyone's limit, so the others slow down meanwhile
and the long-run rate stays exact; they keep at least ``BULK_SHARE`` of it, so a big file
makes steady progress however many small ones come.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

#: The smallest default burst: waking up for less than this costs more than it smooths.
MIN_BURST = 64 * 1024
#: The share of a limit that other transfers keep while urgent ones are sending.
BULK_SHARE = 0.25


class TokenBucket:
    """A thread-safe token bucket: at most ``rate`` bytes per second, shared by all callers.

    ``take(n)`` subtracts ``n`` at once, even when that makes the balance negative, then sleeps
    until the balance is back to zero. A piece larger than the burst is fine (its caller just
    waits for the debt), and concurrent callers queue behind each other's debt in the order they
    arrived, so they are served fairly and the long-run rate is exact. Sleeping happens outside
    the lock.

    The bucket starts empty, so the limit holds from the first byte, and it only fills up (to
    ``burst``) while nobody is taking. The default burst is a quarter of a second of traffic, at
    least 64 KiB. Small enough: a busy bucket never holds tokens, so a sustained transfer gets
    exactly ``rate``; only after a pause can ``burst`` extra bytes go out at once, which adds
    0.25 s / T to the rate measured over a window of T seconds (+2.5% over 10 s, +12.5% over
    2 s) and nothing afterwards. Big enough: time a transfer spends between pieces (reading
    the file, opening the next one, a slow write, an oversleep) is credited back, up to a
    quarter of a second, so the limit is reached rather than undershot; and at low rates the
    64 KiB floor lets small pieces go after a pause without a sleep each.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a rate must be positive, not {rate!r}")
        if burst is None:
            burst = max(rate * 0.25, MIN_BURST)
        if not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"a burst must be positive, not {burst!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._balance = 0.0  # bytes that may go now; negative: debt still to be waited for
        #: The same for urgent pieces alone, refilled at (1 - BULK_SHARE) of the rate.
        self._urgent = 0.0
        self._urgent_rate = self._rate * (1 - BULK_SHARE)
        self._stamp = clock()

    @property
    def rate(self) -> float:
        """The limit, in bytes per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """How many bytes may go at once after a pause."""
        return self._burst

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._stamp)
        self._balance = min(self._burst, self._balance + elapsed * self._rate)
        self._urgent = min(self._burst, self._urgent + elapsed * self._urgent_rate)
        self._stamp = now

    def take(
        self, n: int, cancelled: threading.Event | None = None, *, urgent: bool = False
    ) -> float:
        """Wait until ``n`` more bytes are allowed; return the seconds waited.

        With ``cancelled``, the wait is on that event instead of ``sleep``: once it is set,
        ``take`` returns early and gives the ``n`` bytes back (the caller should not send them).
        ``urgent``: see the module's docstring.
        """
        if n < 0:
            raise ValueError(f"cannot take a negative number of bytes ({n})")
        if n == 0 or (cancelled is not None and cancelled.is_set()):
            return 0.0
        with self._lock:
            start = self._clock()
            self._refill(start)
            # The urgent budget is owed only for going ahead of the others' debt: never more
            # than the bucket owes (urgent pieces alone, at the full rate, owe it nothing).
            self._urgent = max(self._urgent, min(self._balance, 0.0))
            self._balance -= n
            wait = -self._balance / self._rate
            if urgent:
                self._urgent -= n
                wait = min(wait, -self._urgent / self._urgent_rate)
        if wait <= 0:
            return 0.0
        if cancelled is None:
            self._sleep(wait)
        elif cancelled.wait(wait):
            with self._lock:
                self._refill(self._clock())
                self._balance = min(self._burst, self._balance + n)
                if urgent:
                    self._urgent = min(self._burst, self._urgent + n)
        return max(0.0, self._clock() - start)


class Limiter:
    """Several buckets at once (e.g. global and per sink): a piece waits for each in turn.

    The buckets keep filling while a taker waits for another one, so in the long run the
    slowest bucket sets the pace. An empty limiter (:meth:`none`) is falsy and costs nothing.
    """

    def __init__(self, buckets: Sequence[TokenBucket] = ()) -> None:
        self._buckets = tuple(buckets)

    @classmethod
    def none(cls) -> Limiter:
        """A limiter that never waits."""
        return cls(())

    @property
    def buckets(self) -> tuple[TokenBucket, ...]:
        return self._buckets

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def __repr__(self) -> str:
        return f"Limiter(rates={[bucket.rate for bucket in self._buckets]})"

    def take(
        self, n: int, cancelled: threading.Event | None = None, *, urgent: bool = False
    ) -> float:
        """Take ``n`` bytes from every bucket (``urgent``: see the module's docstring); return
        the total seconds waited."""
        waited = 0.0
        for bucket in self._buckets:
            if cancelled is not None and cancelled.is_set():
                break
            waited += bucket.take(n, cancelled, urgent=urgent)
        return waited


def pace(
    limiter: Limiter | None,
    n: int,
    cancelled: threading.Event | None = None,
    *,
    urgent: bool = False,
) -> None:
    """Wait until ``n`` bytes may be sent under ``limiter``; no-op for ``None`` or no limit."""
    if limiter:
        limiter.take(n, cancelled, urgent=urgent)
