"""``bandwidth.schedule``: an upload limit that follows the local time (docs/config.md,
"Bandwidth by the clock"): its entries, the rate in force at any time, a token bucket that
follows it (with a fake clock, then for real across a minute boundary), the config's errors,
reload and a real run."""

from __future__ import annotations

import logging
import os
import re
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.clock import FakeCancel, FakeClock
from helpers import Daemon, WriteConfig, make_file, skyframe, tree_files

from skyframe.bandwidth import (
    BULK_SHARE,
    MIN_BURST,
    Limiter,
    Period,
    Schedule,
    ScheduleEntry,
    TokenBucket,
    parse_schedule_entry,
)
from skyframe.config import load_config, upload_limit
from skyframe.errors import ConfigError
from skyframe.pipeline import load_project
from skyframe.reload import plan_reload

MB = 1_000_000
DAILY = ["08:00 2MB/s", "12:00 512KiB/s", "19:00 off"]
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def local(day: int, hhmm: str) -> time.struct_time:
    """A local time on a weekday (0: Monday): all a schedule reads of it."""
    hours, minutes = map(int, hhmm.split(":"))
    # 2026-01-05 is a Monday
    return time.struct_time((2026, 1, 5 + day, hours, minutes, 0, day, 5 + day, 0))


def epoch(day: int, hhmm: str, seconds: float = 0.0) -> float:
    """The epoch of that local time, in this machine's time zone (January: no DST change)."""
    hours, minutes = map(int, hhmm.split(":"))
    return time.mktime((2026, 1, 5 + day, hours, minutes, 0, 0, 0, -1)) + seconds


# --- entries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "day", "minute", "rate"),
    [
        ("08:00 2MB/s", None, 480, 2 * MB),
        ("8:05 512KiB/s", None, 485, 512 * 1024),
        ("  23:59   2 MB/s ", None, 23 * 60 + 59, 2 * MB),
        ("00:00 10Mbit/s", None, 0, 1.25 * MB),
        ("19:00 off", None, 19 * 60, None),
        ("19:00 OFF", None, 19 * 60, None),
        ("Mon-08:00 1MB/s", MON, 480, MB),
        ("sat-00:00 off", SAT, 0, None),
        ("SUN-12:30 100kB/s", SUN, 750, 100_000),
    ],
)
def test_entries(text: str, day: int | None, minute: int, rate: float | None) -> None:
    entry = parse_schedule_entry(text)
    assert (entry.day, entry.minute, entry.rate, entry.text) == (day, minute, rate, text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("25:00 2MB/s", r"no such time 25:00 \(00:00 to 23:59\)"),
        ("08:60 off", r"no such time 08:60"),
        ("Mnd-08:00 off", r"unknown weekday 'Mnd' \(use Mon, Tue, Wed, Thu, Fri, Sat or Sun\)"),
        ("Monday-08:00 off", r"unknown weekday 'Monday'"),
        ("08:00", r"expected \[Ddd-\]HH:MM RATE, such as '08:00 2MB/s'"),
        ("0800 2MB/s", r"expected \[Ddd-\]HH:MM RATE"),
        ("08:00,2MB/s", r"expected \[Ddd-\]HH:MM RATE"),
        ("Mon 08:00 2MB/s", r"expected \[Ddd-\]HH:MM RATE"),
        ("08:00 2M", r"invalid rate '2M': use a size per second .*, or off for no limit"),
        ("08:00 0MB/s", r"a rate must be positive"),
        ("08:00 10Mb/s", r"invalid rate '10Mb/s'"),
        ("", r"expected \[Ddd-\]HH:MM RATE"),
        (480, r"^schedule entry 480: expected"),
        (None, r"^schedule entry None: expected"),
    ],
)
def test_bad_entries(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_schedule_entry(value)
    assert str(info.value).startswith(f"schedule entry {value!r}: ")


def test_empty_and_duplicate_schedules() -> None:
    with pytest.raises(ValueError, match="the schedule is empty"):
        Schedule.parse([])
    with pytest.raises(ValueError, match="two schedule entries for 08:00: '08:00 2MB/s' and"):
        Schedule.parse(["08:00 2MB/s", "12:00 off", "8:00 1MB/s"])
    with pytest.raises(ValueError, match="two schedule entries for Mon 08:00"):
        Schedule.parse(["Mon-08:00 2MB/s", "mon-08:00 off"])
    # A weekday's entry at the time of a daily one replaces it that day: not a duplicate.
    Schedule.parse(["08:00 2MB/s", "Sat-08:00 off"])


def test_equal_schedules() -> None:
    assert Schedule.parse(DAILY) == Schedule.parse(list(DAILY))
    assert Schedule.parse(DAILY) != Schedule.parse(DAILY[:2])
    assert hash(Schedule.parse(DAILY)) == hash(Schedule.parse(DAILY))
    assert Schedule.parse(DAILY).entries[0] == ScheduleEntry("08:00 2MB/s", None, 480, 2 * MB)


# --- the rate in force ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "hhmm", "rate"),
    [
        (TUE, "08:00", 2 * MB),
        (TUE, "11:59", 2 * MB),
        (TUE, "12:00", 512 * 1024),
        (TUE, "18:59", 512 * 1024),
        (TUE, "19:00", None),
        (TUE, "23:59", None),
        (TUE, "00:00", None),  # the day before's 19:00 goes on
        (TUE, "07:59", None),
        (MON, "00:00", None),  # wrapping around the week: Sunday's 19:00
        (SUN, "10:00", 2 * MB),
    ],
)
def test_rate_in_force_daily(day: int, hhmm: str, rate: float | None) -> None:
    assert Schedule.parse(DAILY).rate_at(local(day, hhmm)) == rate


WEEKLY = ["08:00 2MB/s", "19:00 off", "Sat-08:00 off", "Sun-10:00 1MB/s"]


@pytest.mark.parametrize(
    ("day", "hhmm", "rate"),
    [
        (FRI, "09:00", 2 * MB),
        (SAT, "07:00", None),
        (SAT, "08:00", None),  # Saturday's own 08:00 replaces the daily one
        (SAT, "13:00", None),
        (SUN, "08:00", 2 * MB),  # the daily 08:00 again
        (SUN, "10:00", MB),
        (SUN, "19:00", None),
        (MON, "08:00", 2 * MB),
    ],
)
def test_rate_in_force_with_weekdays(day: int, hhmm: str, rate: float | None) -> None:
    assert Schedule.parse(WEEKLY).rate_at(local(day, hhmm)) == rate


@pytest.mark.parametrize(
    ("day", "hhmm", "rate"),
    [
        (MON, "07:59", None),  # before the first entry of the week: Friday's goes on
        (MON, "08:00", 2 * MB),
        (WED, "03:00", 2 * MB),
        (FRI, "17:59", 2 * MB),
        (FRI, "18:00", None),
        (SUN, "23:59", None),
    ],
)
def test_rate_in_force_with_weekdays_only(day: int, hhmm: str, rate: float | None) -> None:
    schedule = Schedule.parse(["fri-18:00 off", "Mon-08:00 2MB/s"])  # in any order
    assert schedule.rate_at(local(day, hhmm)) == rate


@pytest.mark.parametrize(
    ("entries", "day", "hhmm", "said"),
    [
        (DAILY, TUE, "09:30", "2.0 MB/s until 12:00"),
        (DAILY, TUE, "12:00", "524.3 KB/s until 19:00"),
        (DAILY, TUE, "20:00", "off (no limit) until 08:00"),
        (DAILY, TUE, "03:00", "off (no limit) until 08:00"),
        # the next entry with another rate, not the next entry
        (["08:00 2MB/s", "10:00 2MB/s", "12:00 off"], TUE, "09:00", "2.0 MB/s until 12:00"),
        (["Mon-08:00 2MB/s", "Fri-18:00 off"], FRI, "19:00", "off (no limit) until Mon 08:00"),
        (["Mon-08:00 2MB/s", "Fri-18:00 off"], MON, "07:00", "off (no limit) until 08:00"),
        (["Mon-08:00 2MB/s", "Fri-18:00 off"], TUE, "07:00", "2.0 MB/s until Fri 18:00"),
        (["12:00 1MB/s"], WED, "01:00", "1.0 MB/s at all times"),
        (["12:00 1MB/s", "Sat-12:00 1MB/s"], WED, "01:00", "1.0 MB/s at all times"),
    ],
)
def test_period_describes_rate_and_next_change(
    entries: list[str], day: int, hhmm: str, said: str
) -> None:
    assert Schedule.parse(entries).at(local(day, hhmm)).describe() == said


def test_the_local_time_of_the_machine_counts() -> None:
    """In a time zone 5:45 ahead of UTC, 02:15 UTC is 08:00 there."""
    schedule = Schedule.parse(["08:00 2MB/s", "19:00 off"])
    utc_0215 = 1_767_579_300.0  # Monday 2026-01-05 02:15 UTC
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "XNPT-05:45"  # POSIX: 5 h 45 min east of Greenwich
    time.tzset()
    try:
        fake = FakeClock()
        bucket = TokenBucket(schedule, clock=fake, sleep=fake.sleep, wall=lambda: utc_0215)
        assert bucket.rate == 2 * MB
        bucket = TokenBucket(schedule, clock=fake, sleep=fake.sleep, wall=lambda: utc_0215 - 1)
        assert bucket.rate is None  # 07:59:59 there
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


# --- a bucket that follows the schedule, with a fake clock ---------------------------------


class FakeWall:
    """The wall clock of a fake monotonic one: ``start`` when it reads 1000, moving with it;
    ``shift`` moves the wall clock alone (someone sets the time)."""

    def __init__(self, fake: FakeClock, start: float) -> None:
        self.fake = fake
        self.start = start
        self.shift = 0.0

    def __call__(self) -> float:
        return self.start + self.shift + (self.fake.now - 1000.0)


def scheduled(
    entries: list[str], at: float, burst: float | None = None, name: str = ""
) -> tuple[TokenBucket, FakeClock, FakeWall]:
    fake = FakeClock()
    wall = FakeWall(fake, at)
    bucket = TokenBucket(
        Schedule.parse(entries), burst, clock=fake, sleep=fake.sleep, wall=wall, name=name
    )
    return bucket, fake, wall


def test_the_rate_changes_at_the_minute_boundary() -> None:
    bucket, fake, _ = scheduled(["08:00 1000B/s", "08:01 4000B/s"], epoch(TUE, "08:00", 50), 100)
    done: list[tuple[float, int]] = []
    sent = 0
    while fake.now < 1020:  # 08:00:50 to 08:01:10, pieces of 100 bytes
        bucket.take(100)
        sent += 100
        done.append((fake.now, sent))

    def sent_by(moment: float) -> int:
        return max([n for t, n in done if t <= moment], default=0)

    assert sent_by(1010) == pytest.approx(10 * 1000, abs=100)  # before 08:01:00
    assert sent_by(1020) - sent_by(1010) == pytest.approx(10 * 4000, abs=200)  # after


class CountingSchedule(Schedule):
    """A schedule that counts how often it is read."""

    looks = 0

    def at(self, when: time.struct_time) -> Period:
        self.looks += 1
        return super().at(when)


def test_the_schedule_is_read_once_a_minute_not_at_each_take() -> None:
    fake = FakeClock()
    wall = FakeWall(fake, epoch(TUE, "08:00", 30))
    schedule = CountingSchedule(map(parse_schedule_entry, ["08:00 1MB/s", "09:00 off"]))
    bucket = TokenBucket(schedule, clock=fake, sleep=fake.sleep, wall=wall)
    for _ in range(1000):  # 1,000 pieces of 40 kB: 40 s at 1 MB/s, one minute boundary
        bucket.take(40_000)
    assert fake.now - 1000 == pytest.approx(40.0)
    assert schedule.looks == 2  # at the start, then at 08:01:00


def test_off_does_not_limit_and_the_next_period_starts_empty() -> None:
    bucket, fake, _ = scheduled(["08:00 off", "08:01 1000B/s"], epoch(TUE, "08:00", 30))
    assert bucket.rate is None
    for _ in range(100):
        assert bucket.take(10**9) == 0.0
    assert fake.sleeps == []
    fake.now += 30  # 08:01:00
    assert bucket.take(500) == pytest.approx(0.5)  # from an empty bucket, not after a burst
    assert bucket.rate == 1000


def test_no_burst_of_saved_tokens_at_a_change() -> None:
    bucket, fake, _ = scheduled(["08:00 1MB/s", "08:01 1000B/s"], epoch(TUE, "08:00", 55))
    fake.now += 4  # idle at 1 MB/s: 250,000 bytes saved up (the burst), at 08:00:59
    assert bucket.burst == 250_000
    fake.now += 2  # 08:01:01: the saved bytes are not 250 s at the new rate
    assert bucket.burst == MIN_BURST
    assert bucket.take(1000) == pytest.approx(1.0)


def test_no_burst_of_saved_urgent_tokens_at_a_change() -> None:
    bucket, fake, _ = scheduled(["08:00 1MB/s", "08:01 1000B/s"], epoch(TUE, "08:00", 55))
    fake.now += 6  # idle across the change
    # An urgent piece waits at the bucket's rate at most, at its urgent share at least.
    assert bucket.take(1000, urgent=True) == pytest.approx(1.0)
    assert 1000 / (1000 * (1 - BULK_SHARE)) > 1.0


def test_a_debt_at_a_slow_rate_is_paid_at_the_faster_one_from_the_change() -> None:
    bucket, fake, _ = scheduled(["08:00 1000B/s", "08:01 100000B/s"], epoch(TUE, "08:00", 59), 100)
    # 10 s at 1,000 B/s; but after one second the rest (9,000 bytes) goes at 100,000 B/s.
    assert bucket.take(10_000) == pytest.approx(1.09)
    assert fake.sleeps == pytest.approx([1.0, 0.09])


def test_a_debt_goes_on_at_a_slower_rate_from_the_change() -> None:
    bucket, fake, _ = scheduled(["08:00 1000B/s", "08:01 500B/s"], epoch(TUE, "08:00", 59.5), 100)
    assert bucket.take(1000) == pytest.approx(0.5 + 500 / 500)
    assert fake.sleeps == pytest.approx([0.5, 1.0])


def test_a_debt_ends_when_the_limit_goes_off() -> None:
    bucket, _, _ = scheduled(["08:00 1000B/s", "08:01 off"], epoch(TUE, "08:00", 59), 100)
    assert bucket.take(10_000) == pytest.approx(1.0)
    assert bucket.take(10_000) == 0.0


def test_a_taker_asleep_in_another_thread_wakes_at_the_change() -> None:
    """The first taker owes 5 s at the slow rate, the second queues behind it: the first one
    wakes at the change (2 s), not after its 5 s, and finds its debt paid meanwhile."""
    fake = FakeClock()
    wall = FakeWall(fake, epoch(TUE, "08:00", 58))
    gate = threading.Event()
    first_asleep = threading.Event()
    naps: dict[str, list[float]] = {"first": [], "second": []}

    def sleep(seconds: float) -> None:
        name = threading.current_thread().name
        naps["first" if name == "first" else "second"].append(seconds)
        if name == "first":  # asleep until the second one is done; the time is the second's
            first_asleep.set()
            assert gate.wait(5)
        else:
            fake.now += seconds

    schedule = Schedule.parse(["08:00 1000B/s", "08:01 1MB/s"])
    bucket = TokenBucket(schedule, 100, clock=fake, sleep=sleep, wall=wall)
    waited: list[float] = []
    first = threading.Thread(target=lambda: waited.append(bucket.take(5000)), name="first")
    first.start()
    try:
        assert first_asleep.wait(5)
        # 10,000 bytes owed: 2 s at 1,000 B/s, then the other 8,000 at 1 MB/s
        assert bucket.take(5000) == pytest.approx(2.008)
    finally:
        gate.set()
        first.join(5)
    assert naps == {"first": pytest.approx([2.0]), "second": pytest.approx([2.0, 0.008])}
    assert waited == [pytest.approx(2.008)]


def test_long_waits_look_again_at_each_minute() -> None:
    bucket, fake, _ = scheduled(["08:00 100B/s", "09:00 off"], epoch(TUE, "08:00"), 100)
    assert bucket.take(100 * 150) == pytest.approx(150.0)
    assert fake.sleeps == pytest.approx([60.0, 60.0, 30.0])


def test_a_cancelled_take_gives_its_bytes_back() -> None:
    bucket, fake, _ = scheduled(["08:00 1000B/s", "09:00 off"], epoch(TUE, "08:00"), 500)
    assert bucket.take(100_000, FakeCancel(fake, after=1.0)) == pytest.approx(1.0)
    assert bucket.take(500) == 0.0  # only the first second was used


def test_the_wall_clock_set_back() -> None:
    bucket, _, wall = scheduled(["08:00 1000B/s", "08:01 off"], epoch(TUE, "08:01", 30))
    assert bucket.rate is None
    wall.shift = -60  # 08:00:30
    assert bucket.rate == 1000
    wall.shift = +3600
    assert bucket.rate is None


def test_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skyframe.bandwidth")
    bucket, fake, _ = scheduled(
        ["08:00 1000B/s", "08:01 4000B/s", "08:02 off"], epoch(TUE, "08:00", 50), name="sink nas"
    )
    assert caplog.messages == []  # nothing before the first transfer
    while fake.now < 1000 + 75:  # to 08:02:05
        bucket.take(100)
        fake.now += 0.05  # (off: take does not wait)
    assert caplog.messages == [
        "bandwidth of sink nas: 1.0 KB/s until 08:01",
        "bandwidth of sink nas: 4.0 KB/s until 08:02",
        "bandwidth of sink nas: off (no limit) until 08:00",
    ]
    assert all(record.levelno == logging.INFO for record in caplog.records)


def test_fixed_buckets_have_no_schedule() -> None:
    bucket = TokenBucket(1000)
    assert bucket.schedule is None
    assert bucket.period() is None
    assert bucket.rate == 1000
    scheduled_bucket, _, _ = scheduled(DAILY, epoch(TUE, "09:00"))
    assert scheduled_bucket.schedule == Schedule.parse(DAILY)
    period = scheduled_bucket.period()
    assert period is not None
    assert period.describe() == "2.0 MB/s until 12:00"
    assert repr(Limiter([scheduled_bucket, bucket])) == "Limiter(rates=[2000000.0, 1000.0])"


# --- for real, across a minute boundary -------------------------------------------------------


def _across_the_next_boundary(slow: int, fast: int) -> tuple[float, float, TokenBucket] | None:
    """Rates measured before and after the next minute boundary through a bucket scheduled
    ``slow`` this minute and ``fast`` the next; None when the machine missed the window (a
    stall or a clock step put the start too close to the boundary)."""
    if 60 - time.time() % 60 < 5:  # too close to the boundary: wait for the next minute
        time.sleep(60 - time.time() % 60 + 0.05)
    now = time.localtime()
    this_minute = (now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, 0, 0, 0, -1)
    boundary = time.mktime(this_minute) + 60
    nxt = time.localtime(boundary)
    entries = [
        f"{now.tm_hour:02d}:{now.tm_min:02d} {slow}B/s",
        f"{nxt.tm_hour:02d}:{nxt.tm_min:02d} {fast}B/s",
    ]
    bucket = TokenBucket(Schedule.parse(entries))
    assert bucket.rate == slow
    time.sleep(max(0.0, boundary - 6 - time.time()))  # at most the last 6 s before it
    piece = 16 * 1024
    done: list[tuple[float, int]] = []  # wall clock, bytes allowed so far
    sent = 0
    bucket.take(piece)  # start in step: the bucket starts empty
    begin = time.time()
    if begin > boundary - 2:
        return None
    while time.time() < boundary + 2.5:
        bucket.take(piece)
        sent += piece
        done.append((time.time(), sent))

    def rate(start: float, end: float) -> float | None:
        inside = [(t, n) for t, n in done if start <= t <= end]
        if len(inside) < 2:
            return None
        (t1, n1), (t2, n2) = inside[0], inside[-1]
        return (n2 - n1) / (t2 - t1)

    before = rate(begin + 0.5, boundary - 0.2)  # past the bucket's burst
    after = rate(boundary + 0.3, boundary + 2.5)
    if before is None or after is None:
        return None
    return before, after, bucket


def test_the_measured_rate_changes_across_a_real_minute_boundary() -> None:
    """The real clocks: a schedule of this minute (200 kB/s) and the next one (1 MB/s). Pieces
    go through the bucket for the last seconds before the boundary (5 to 6) and 2.5 s after
    it: the test takes 8 to 68 s (a window the machine missed is tried again, twice at most)."""
    slow, fast = 200_000, 1_000_000
    for _ in range(3):
        measured = _across_the_next_boundary(slow, fast)
        if measured is not None:
            break
    else:
        pytest.fail("the machine missed the minute boundary's window three times")
    before, after, bucket = measured
    assert before == pytest.approx(slow, rel=0.25), (before, after)
    assert after == pytest.approx(fast, rel=0.3), (before, after)
    assert after > 3 * before
    assert bucket.rate == fast


# --- the config ---------------------------------------------------------------------------------

GOOD = """\
state_dir: .state
bandwidth:
  schedule: ["08:00 2MB/s", "Sat-08:00 off", "19:00 off"]
pipelines:
  - name: survey
    source: {path: incoming}
    sinks:
      - url: outbox
        bandwidth:
          schedule:
            - "Mon-07:00 1MB/s"
            - "Sat-00:00 off"
      - url: nas
        bwlimit: 4MB/s
"""


def test_a_schedule_in_the_config(write_config: WriteConfig) -> None:
    project = load_project(write_config(GOOD))
    config = project.config
    assert upload_limit(config) == Schedule.parse(["08:00 2MB/s", "Sat-08:00 off", "19:00 off"])
    outbox, nas = config.pipelines[0].sinks
    assert upload_limit(outbox) == Schedule.parse(["Mon-07:00 1MB/s", "Sat-00:00 off"])
    assert upload_limit(nas) == 4 * MB
    sinks = project.pipelines[0].sinks
    assert [bucket.schedule for bucket in sinks[0].limiter.buckets] == [upload_limit(outbox)]
    assert [bucket.rate for bucket in sinks[1].limiter.buckets] == [4 * MB]


# Each case: a change to GOOD, the (line, column) of the error, a regex for its message (after
# the key).
BAD = [
    pytest.param(
        ('"Sat-08:00 off"', '"Sat-8:00 2M"'),
        (3, 29),
        r"bandwidth\.schedule\[1\]: schedule entry 'Sat-8:00 2M': invalid rate '2M'",
        id="bad-rate",
    ),
    pytest.param(
        ('"19:00 off"', '"25:00 off"'),
        (3, 46),
        r"bandwidth\.schedule\[2\]: schedule entry '25:00 off': no such time 25:00",
        id="no-such-time",
    ),
    pytest.param(
        ('"Sat-08:00 off"', '"Sam-08:00 off"'),
        (3, 29),
        r"bandwidth\.schedule\[1\]: .*unknown weekday 'Sam' \(use Mon, Tue",
        id="unknown-weekday",
    ),
    pytest.param(
        ('"Mon-07:00 1MB/s"', '"Mon 07:00 1MB/s"'),
        (11, 15),
        r"pipelines\[0\]\.sinks\[0\]\.bandwidth\.schedule\[0\]: schedule entry "
        r"'Mon 07:00 1MB/s': expected \[Ddd-\]HH:MM RATE",
        id="malformed",
    ),
    pytest.param(
        ('"19:00 off"', '"8:00 1MB/s"'),
        (3, 3),
        r"bandwidth\.schedule: two schedule entries for 08:00: '08:00 2MB/s' and '8:00 1MB/s'",
        id="duplicate-time",
    ),
    pytest.param(
        ('"Sat-00:00 off"', '"sat-07:00 off"\n            - "SAT-07:00 1MB/s"'),
        (10, 11),
        r"sinks\[0\]\.bandwidth\.schedule: two schedule entries for Sat 07:00",
        id="duplicate-weekday-time",
    ),
    pytest.param(
        ('["08:00 2MB/s", "Sat-08:00 off", "19:00 off"]', "[]"),
        (3, 3),
        r"bandwidth\.schedule: the schedule is empty",
        id="empty",
    ),
    pytest.param(
        ('["08:00 2MB/s", "Sat-08:00 off", "19:00 off"]', '"08:00 2MB/s 19:00 off"'),
        (3, 3),
        r"bandwidth\.schedule: expected a list of entries",
        id="one-string",
    ),
    pytest.param(
        ("state_dir: .state\n", "state_dir: .state\nbwlimit: 1MB/s\n"),
        (3, 1),
        r"bandwidth: set either bwlimit or bandwidth\.schedule here, not both",
        id="both-at-the-top",
    ),
    pytest.param(
        (
            "        bwlimit: 4MB/s\n",
            "        bwlimit: 4MB/s\n        bandwidth: {schedule: [x]}\n",
        ),
        (15, 32),
        r"sinks\[1\]\.bandwidth\.schedule\[0\]: schedule entry 'x'",
        id="bad-entry-beside-bwlimit",
    ),
    pytest.param(
        (
            "        bwlimit: 4MB/s\n",
            "        bwlimit: 4MB/s\n        bandwidth: {schedule: ['8:00 off']}\n",
        ),
        (15, 9),
        r"pipelines\[0\]\.sinks\[1\]\.bandwidth: set either bwlimit or bandwidth\.schedule here",
        id="both-in-a-sink",
    ),
    pytest.param(
        ("          schedule:", "          schedul:"),
        (10, 11),
        r"sinks\[0\]\.bandwidth\.schedul: unknown key 'schedul': did you mean 'schedule'\?",
        id="typo",
    ),
]


@pytest.mark.parametrize(("change", "position", "pattern"), BAD)
def test_config_errors(
    write_config: WriteConfig, change: tuple[str, str], position: tuple[int, int], pattern: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write_config(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{position[0]}:{position[1]}: "), message
    assert re.search(pattern, message), message


# --- reload ------------------------------------------------------------------------------------

RELOAD = """
    state_dir: .state
    shutdown_grace: 1s
    api: {enabled: false}
    TOP
    pipelines:
      - name: survey
        source: {path: incoming, settle: 0, rescan: 1h}
        sinks:
          - url: outbox
            SINK
    """


def reload_config(top: str = "", sink: str = "") -> str:
    return textwrap.dedent(RELOAD.replace("TOP", top).replace("SINK", sink))


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        (
            ("bandwidth: {schedule: ['08:00 1MB/s']}", ""),
            ("bandwidth: {schedule: ['08:00 1MB/s']}", ""),
            False,
        ),
        (("bandwidth: {schedule: ['08:00 1MB/s']}", ""), ("", ""), True),
        (("bandwidth: {schedule: ['08:00 1MB/s']}", ""), ("bwlimit: 1MB/s", ""), True),
        (
            ("bandwidth: {schedule: ['08:00 1MB/s']}", ""),
            ("bandwidth: {schedule: ['08:00 1MB/s', '19:00 off']}", ""),
            True,
        ),
        (
            ("", "bandwidth: {schedule: ['08:00 1MB/s']}"),
            ("", "bandwidth: {schedule: ['08:00 2MB/s']}"),
            True,
        ),
        (("", "bandwidth: {schedule: ['08:00 1MB/s']}"), ("", "bwlimit: 1MB/s"), True),
    ],
)
def test_reload_sees_a_changed_schedule(
    write_config: WriteConfig,
    before: tuple[str, str],
    after: tuple[str, str],
    changed: bool,
) -> None:
    old = load_project(write_config(reload_config(*before)))
    running = {p.name: p for p in old.pipelines}
    new = load_project(write_config(reload_config(*after)))
    plan = plan_reload(old.config, running, new)
    assert plan.changed == (["survey"] if changed else [])
    kept = plan.pipelines["survey"].sinks[0] is running["survey"].sinks[0]
    assert kept is not changed  # a changed limit: a new sink, with its new bucket


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def test_a_reload_puts_the_new_schedule_on_every_sink(
    write_config: WriteConfig, daemons: list[Daemon]
) -> None:
    config = write_config(reload_config("bandwidth: {schedule: ['08:00 1MB/s']}", "bwlimit: 4MB/s"))
    d = Daemon(config)
    daemons.append(d)
    d.__enter__()

    def limits() -> list[float | Schedule | None]:
        (sink,) = d.engine.pipelines["survey"].sinks
        return [bucket.schedule or bucket.rate for bucket in sink.limiter.buckets]

    assert limits() == [Schedule.parse(["08:00 1MB/s"]), 4 * MB]
    d.engine.reload()
    assert limits() == [Schedule.parse(["08:00 1MB/s"]), 4 * MB]
    write_config(reload_config("bandwidth: {schedule: ['08:00 1MB/s', '19:00 off']}"))
    d.engine.reload()
    assert limits() == [Schedule.parse(["08:00 1MB/s", "19:00 off"])]
    write_config(reload_config("bwlimit: 2MB/s", "bandwidth: {schedule: ['Mon-00:00 off']}"))
    d.engine.reload()
    assert limits() == [2 * MB, Schedule.parse(["Mon-00:00 off"])]


# --- a real run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_once_delivers_under_schedules(tmp_path: Path) -> None:
    """A top-level schedule at 1 MB/s whatever the hour (two entries of one rate), a sink's
    own schedule off at all hours: 3 MB take about 3 s, and both limits are logged."""
    files = {f"clip{i}.mp4": os.urandom(1_000_000) for i in range(3)}
    for name, data in files.items():
        make_file(tmp_path / "incoming", name, data)
    (tmp_path / "skyframe.yaml").write_text(
        textwrap.dedent(
            """\
            state_dir: .state
            bandwidth:
              schedule: ["00:00 1MB/s", "Wed-12:00 1MB/s"]
            pipelines:
              - name: survey
                source: {path: incoming, settle: 0}
                sinks:
                  - url: outbox
                    bandwidth: {schedule: ["00:00 off"]}
            """
        )
    )
    started = time.monotonic()
    result = skyframe(tmp_path, "-v", "run", "--once")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree_files(tmp_path / "outbox") == files
    assert took > 2.5, "3 MB went faster than the schedule's 1 MB/s"
    assert "bandwidth of all sinks: 1.0 MB/s at all times" in result.stderr
    assert "bandwidth of sink outbox: off (no limit) at all times" in result.stderr
