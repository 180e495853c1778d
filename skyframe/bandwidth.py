"""Bandwidth limits (``bwlimit``, ``bandwidth.schedule``) shared by concurrent transfers.

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

A bucket may follow a :class:`Schedule` instead of one rate (``bandwidth.schedule``: the limit
changes with the local time of day and weekday). It looks at the wall clock once per minute
boundary, so a ``take`` costs one more clock reading and a comparison; at a change it keeps
the debt (owed bytes, now paid at the new rate) but drops saved-up tokens, and a taker asleep
for a debt wakes at each minute boundary to count what is left at the rate then in force.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from skyframe.units import format_rate, parse_rate

log = logging.getLogger(__name__)

#: The smallest default burst: waking up for less than this costs more than it smooths.
MIN_BURST = 64 * 1024
#: The share of a limit that other transfers keep while urgent ones are sending.
BULK_SHARE = 0.25
#: The shortest nap of a taker waiting for a minute boundary (against a busy loop when the
#: wall clock is read a hair before the boundary).
MIN_NAP = 0.005

# --- schedules ----------------------------------------------------------------------------------

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
_ENTRY = re.compile(r"(?:([A-Za-z]+)-)?(\d{1,2}):(\d{2})\s+(\S.*)")
_ENTRY_HINT = (
    "expected [Ddd-]HH:MM RATE, such as '08:00 2MB/s', 'Mon-08:00 512KiB/s' or '19:00 off'"
)


def _clock_text(day: int | None, minute: int) -> str:
    hhmm = f"{minute // 60:02d}:{minute % 60:02d}"
    return hhmm if day is None else f"{WEEKDAYS[day]} {hhmm}"


@dataclass(frozen=True)
class ScheduleEntry:
    """One entry of a schedule: from this time on (every day, or on one weekday), this rate."""

    text: str  #: as written in the config
    day: int | None  #: 0 (Monday) to 6 (Sunday); None: every day
    minute: int  #: minutes after midnight, local time
    rate: float | None  #: bytes per second; None: ``off``, no limit

    @property
    def when(self) -> str:
        """``08:00``, or ``Mon 08:00`` for an entry of one weekday."""
        return _clock_text(self.day, self.minute)


def parse_schedule_entry(value: object) -> ScheduleEntry:
    """An entry from ``"08:00 2MB/s"``, ``"Mon-08:00 512KiB/s"`` or ``"19:00 off"``.

    The weekday is a three-letter English name in any case; the rate is anything ``bwlimit``
    takes (see :func:`skyframe.units.parse_rate`), or ``off``. Raises ValueError naming the entry.
    """
    if not isinstance(value, str):
        raise ValueError(f"schedule entry {value!r}: {_ENTRY_HINT}")
    match = _ENTRY.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"schedule entry {value!r}: {_ENTRY_HINT}")
    day_name, hours, minutes, rate_text = match.groups()
    day: int | None = None
    if day_name is not None:
        names = [name.lower() for name in WEEKDAYS]
        if day_name.lower() not in names:
            raise ValueError(
                f"schedule entry {value!r}: unknown weekday {day_name!r} "
                f"(use {', '.join(WEEKDAYS[:-1])} or {WEEKDAYS[-1]})"
            )
        day = names.index(day_name.lower())
    if int(hours) > 23 or int(minutes) > 59:
        raise ValueError(
            f"schedule entry {value!r}: no such time {hours}:{minutes} (00:00 to 23:59)"
        )
    rate: float | None = None
    if rate_text.lower() != "off":
        try:
            rate = parse_rate(rate_text)
        except ValueError as exc:
            raise ValueError(f"schedule entry {value!r}: {exc}, or off for no limit") from None
    return ScheduleEntry(value, day, int(hours) * 60 + int(minutes), rate)


@dataclass(frozen=True)
class Period:
    """What a schedule says at some moment: the entry in force, and when the rate changes."""

    entry: ScheduleEntry
    #: the minute of the week (0: Monday 00:00) when an entry with another rate begins next;
    #: None when every entry has the same rate
    change: int | None
    ahead: int  #: minutes from the moment until ``change`` (1 to a week), 0 without one

    @property
    def rate(self) -> float | None:
        """The limit in force, bytes per second; None: no limit."""
        return self.entry.rate

    def describe(self) -> str:
        """``2.0 MB/s until 12:00``, ``off (no limit) until Mon 08:00`` (with the weekday when
        the change is a day or more ahead), ``2.0 MB/s at all times``."""
        limit = "off (no limit)" if self.rate is None else format_rate(self.rate)
        if self.change is None:
            return f"{limit} at all times"
        day = self.change // MINUTES_PER_DAY if self.ahead >= MINUTES_PER_DAY else None
        return f"{limit} until {_clock_text(day, self.change % MINUTES_PER_DAY)}"


class Schedule:
    """A weekly timetable of rates, as rclone's ``--bwlimit`` takes one.

    An entry without a weekday stands for one on each day of the week; one with a weekday
    replaces, on that day, an entry without one at the same time. The entry in force at a
    moment is the latest at or before it in the week, wrapping around: before the first
    entry of the week (Monday morning), the last one (Sunday evening) goes on; with entries
    without weekdays only, before the first entry of a day, the last one of the day before.
    """

    def __init__(self, entries: Iterable[ScheduleEntry]) -> None:
        self.entries = tuple(entries)
        if not self.entries:
            raise ValueError(
                "the schedule is empty: give at least one entry, such as '08:00 2MB/s'"
            )
        seen: dict[tuple[int | None, int], ScheduleEntry] = {}
        for entry in self.entries:
            other = seen.setdefault((entry.day, entry.minute), entry)
            if other is not entry:
                raise ValueError(
                    f"two schedule entries for {entry.when}: {other.text!r} and {entry.text!r}"
                )
        slots: dict[int, ScheduleEntry] = {}
        for entry in sorted(self.entries, key=lambda e: e.day is not None):  # every day first
            for day in range(7) if entry.day is None else (entry.day,):
                slots[day * MINUTES_PER_DAY + entry.minute] = entry
        self._starts = sorted(slots)
        self._slots = [slots[start] for start in self._starts]

    @classmethod
    def parse(cls, values: Iterable[object]) -> Schedule:
        """A schedule from entries such as ``"08:00 2MB/s"`` (see :func:`parse_schedule_entry`);
        raises ValueError."""
        return cls(parse_schedule_entry(value) for value in values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"Schedule({[entry.text for entry in self.entries]!r})"

    def at(self, when: time.struct_time) -> Period:
        """What is in force at the local time ``when`` (its weekday, hour and minute)."""
        now = when.tm_wday * MINUTES_PER_DAY + when.tm_hour * 60 + when.tm_min
        index = bisect_right(self._starts, now) - 1  # -1: the last one of the week goes on
        entry = self._slots[index]
        count = len(self._slots)
        for step in range(1, count):
            following = (index + step) % count
            if self._slots[following].rate != entry.rate:
                change = self._starts[following]
                return Period(entry, change, (change - now) % MINUTES_PER_WEEK)
        return Period(entry, None, 0)

    def rate_at(self, when: time.struct_time) -> float | None:
        """The limit in force at the local time ``when``; None: no limit."""
        return self.at(when).rate


# --- token buckets ------------------------------------------------------------------------------


def _default_burst(rate: float) -> float:
    return max(rate * 0.25, MIN_BURST)


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

    With a :class:`Schedule` for ``rate``, the limit is the one in force at the local time.
    ``wall`` (the epoch) is read at each ``take`` and compared with the next minute boundary;
    the schedule itself is consulted only once a boundary has passed (or the clock went back).
    At a change of rate the debt stays, paid at the new rate from then on (a taker asleep for
    it wakes at every minute boundary to see what is left at the rate then in force), saved-up
    tokens are dropped (no burst at the change), and the default burst follows the rate. In an
    ``off`` period ``take`` never waits and any debt is forgotten; the next limited period
    starts with an empty bucket. The first ``take`` that sees a new rate logs it at INFO
    (``name`` says whose limit it is).
    """

    def __init__(
        self,
        rate: float | Schedule,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        *,
        wall: Callable[[], float] = time.time,
        name: str = "",
    ) -> None:
        if not isinstance(rate, Schedule) and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a rate must be positive, not {rate!r}")
        if burst is not None and not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"a burst must be positive, not {burst!r}")
        self._schedule = rate if isinstance(rate, Schedule) else None
        self._fixed_burst = None if burst is None else float(burst)
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._name = name
        self._lock = threading.Lock()
        self._balance = 0.0  # bytes that may go now; negative: debt still to be waited for
        #: The same for urgent pieces alone, refilled at (1 - BULK_SHARE) of the rate.
        self._urgent = 0.0
        #: Every token ever added to each balance (the burst caps the balance, not these): a
        #: taker waits until they reach its target, whatever the rates on the way.
        self._filled = 0.0
        self._urgent_filled = 0.0
        self._stamp = clock()
        self._rate: float | None = None  # None: no limit now
        self._burst = 0.0
        self._urgent_rate = 0.0
        # With a schedule: what it says now, when it was read (wall clock), when to read it
        # again, and what was last logged.
        self._period: Period | None = None
        self._looked = self._next_look = -math.inf  # look at once
        self._wall_now = 0.0
        self._said: Period | None = None
        if isinstance(rate, Schedule):
            self._look()
        else:
            self._set_rate(float(rate))

    def _set_rate(self, rate: float | None) -> None:
        """Change the limit: the debt stays, saved-up tokens go (all of it for no limit)."""
        if rate is None:
            self._balance = self._urgent = 0.0
        else:
            self._balance = min(self._balance, 0.0)
            self._urgent = min(self._urgent, 0.0)
        self._rate = rate
        limit = rate or 0.0
        self._burst = self._fixed_burst or _default_burst(limit)
        self._urgent_rate = limit * (1 - BULK_SHARE)

    def _look(self) -> None:
        """With a schedule: take the rate in force if a minute boundary has passed since the
        last look, or the wall clock went back (under the lock, after a refill)."""
        if self._schedule is None:
            return
        wall = self._wall_now = self._wall()
        if self._looked <= wall < self._next_look:
            return
        local = time.localtime(wall)
        period = self._schedule.at(local)
        self._looked = wall
        self._next_look = wall - wall % 1.0 - min(local.tm_sec, 59) + 60.0  # the next minute
        first = self._period is None
        self._period = period
        if first or period.rate != self._rate:
            self._set_rate(period.rate)

    def _refresh(self, now: float) -> None:
        self._refill(now)
        self._look()

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        if self._rate is None:
            return
        self._filled += elapsed * self._rate
        self._urgent_filled += elapsed * self._urgent_rate
        self._balance = min(self._burst, self._balance + elapsed * self._rate)
        self._urgent = min(self._burst, self._urgent + elapsed * self._urgent_rate)

    def _news(self) -> str | None:
        """The line to log when the rate in force is not the one last logged (under the lock)."""
        period = self._period
        if period is None or (self._said is not None and self._said.rate == period.rate):
            return None
        self._said = period
        whose = f" of {self._name}" if self._name else ""
        return f"bandwidth{whose}: {period.describe()}"

    @property
    def rate(self) -> float | None:
        """The limit in force, in bytes per second; None: none now (an ``off`` period)."""
        with self._lock:
            self._refresh(self._clock())
            return self._rate

    @property
    def burst(self) -> float:
        """How many bytes may go at once after a pause."""
        with self._lock:
            self._refresh(self._clock())
            return self._burst

    @property
    def schedule(self) -> Schedule | None:
        """The schedule the rate follows; None for a fixed rate."""
        return self._schedule

    def period(self) -> Period | None:
        """With a schedule, what it says now (the rate, and until when); None without."""
        with self._lock:
            self._refresh(self._clock())
            return self._period

    def _wait(self, target: float, urgent_target: float | None) -> tuple[float, float]:
        """Seconds until the balance's tokens reach ``target`` (or the urgent balance's
        ``urgent_target``) at the rate in force, and the longest nap before the rate may
        change (under the lock, after a refresh)."""
        if self._rate is None:
            return 0.0, math.inf
        wait = (target - self._filled) / self._rate
        if urgent_target is not None:
            wait = min(wait, (urgent_target - self._urgent_filled) / self._urgent_rate)
        if self._schedule is None:
            return wait, math.inf
        return wait, max(MIN_NAP, self._next_look - self._wall_now)

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
        target = 0.0
        urgent_target: float | None = None
        with self._lock:
            start = self._clock()
            self._refresh(start)
            news = self._news()
            wait, horizon = 0.0, math.inf
            if self._rate is not None:
                # The urgent budget is owed only for going ahead of the others' debt: never
                # more than the bucket owes (urgent pieces alone, at the full rate, owe it
                # nothing).
                self._urgent = max(self._urgent, min(self._balance, 0.0))
                self._balance -= n
                target = self._filled - self._balance
                if urgent:
                    self._urgent -= n
                    urgent_target = self._urgent_filled - self._urgent
                wait, horizon = self._wait(target, urgent_target)
        if news:
            log.info(news)
        if wait <= 0:
            return 0.0
        while True:
            nap = min(wait, horizon)
            if cancelled is None:
                self._sleep(nap)
            elif cancelled.wait(nap):
                self._give_back(n, urgent)
                break
            if nap >= wait:
                break
            with self._lock:  # a minute boundary: the rate may have changed
                self._refresh(self._clock())
                news = self._news()
                wait, horizon = self._wait(target, urgent_target)
            if news:
                log.info(news)
            if wait <= 0:
                break
        return max(0.0, self._clock() - start)

    def _give_back(self, n: int, urgent: bool) -> None:
        """A cancelled take: its ``n`` bytes are no longer owed."""
        with self._lock:
            self._refresh(self._clock())
            if self._rate is None:
                return
            self._balance = min(self._burst, self._balance + n)
            if urgent:
                self._urgent = min(self._burst, self._urgent + n)


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
