from __future__ import annotations

import threading
import time

import pydantic
import pytest
from fakes.clock import FakeCancel, FakeClock

from skyframe.bandwidth import BULK_SHARE, MIN_BURST, Limiter, TokenBucket, pace
from skyframe.units import Rate, format_rate, parse_rate

KiB = 1024


def fake_bucket(rate: float, burst: float | None = None) -> tuple[TokenBucket, FakeClock]:
    fake = FakeClock()
    return TokenBucket(rate, burst, clock=fake, sleep=fake.sleep), fake


# --- TokenBucket with a fake clock ------------------------------------------------------------


def test_starts_empty_and_waits_exactly() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    assert bucket.take(250) == pytest.approx(0.25)
    assert bucket.take(1000) == pytest.approx(1.0)
    assert fake.sleeps == pytest.approx([0.25, 1.0])
    assert fake.now == pytest.approx(1001.25)


def test_burst_after_idle_then_rate() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    fake.now += 60  # idle: fills up to the burst, not to 60 s of traffic
    assert bucket.take(300) == 0.0
    assert bucket.take(200) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)
    assert fake.sleeps == pytest.approx([0.1])


def test_piece_bigger_than_burst_waits_for_its_debt() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    fake.now += 10
    assert bucket.take(3500) == pytest.approx(3.0)  # 500 from the burst, 3000 on credit
    assert bucket.take(100) == pytest.approx(0.1)  # the debt is paid, not forgiven


def test_partial_refill_is_used() -> None:
    bucket, fake = fake_bucket(1000, burst=10_000)
    bucket.take(1000)
    fake.now += 0.4  # e.g. time spent reading the next chunk
    assert bucket.take(1000) == pytest.approx(0.6)


def test_long_run_rate_is_exact() -> None:
    bucket, fake = fake_bucket(4_000_000)
    start = fake.now
    for size in [64 * KiB, 1, 3 * 1024 * KiB, 100_000] * 25:
        bucket.take(size)
    total = (64 * KiB + 1 + 3 * 1024 * KiB + 100_000) * 25
    assert fake.now - start == pytest.approx(total / 4_000_000)


def test_zero_takes_nothing_and_negative_is_refused() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    assert bucket.take(0) == 0.0
    assert fake.sleeps == []
    with pytest.raises(ValueError, match="negative"):
        bucket.take(-1)


def test_default_burst() -> None:
    assert TokenBucket(4_000_000).burst == 1_000_000
    assert TokenBucket(10_000).burst == MIN_BURST == 64 * KiB
    assert TokenBucket(10_000, burst=5).burst == 5
    assert TokenBucket(10_000).rate == 10_000


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-5, None), (float("inf"), None), (1, 0)])
def test_invalid_bucket(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(rate, burst)


def test_sleeps_outside_the_lock_and_queues_behind_debt() -> None:
    """While one taker sleeps, another can take: it waits behind the first one's debt."""
    fake = FakeClock()
    gate = threading.Event()
    first_sleeping = threading.Event()

    def sleep(seconds: float) -> None:
        fake.sleeps.append(seconds)
        if threading.current_thread().name == "first":
            first_sleeping.set()
            gate.wait(5)
        else:
            fake.now += seconds

    bucket = TokenBucket(1000, burst=500, clock=fake, sleep=sleep)
    first = threading.Thread(target=bucket.take, args=(2000,), name="first")
    first.start()
    try:
        assert first_sleeping.wait(5)
        done = threading.Event()
        waits: list[float] = []

        def take_second() -> None:
            waits.append(bucket.take(500))
            done.set()

        second = threading.Thread(target=take_second)
        second.start()
        assert done.wait(2), "take() blocked while another taker was sleeping"
        assert waits == [pytest.approx(2.5)]  # its own 0.5 s after the first one's 2 s
        assert fake.sleeps == pytest.approx([2.0, 2.5])
    finally:
        gate.set()
        first.join(5)


def test_an_urgent_piece_does_not_queue_behind_the_others_debt() -> None:
    bucket, fake = fake_bucket(1000, burst=100)
    assert bucket.take(5000) == pytest.approx(5.0)  # a video's part: 5 s of debt
    fake.now -= 5.0  # ... taken by another thread, which sleeps meanwhile
    # A photo's piece waits only at the urgent share of the rate, not for the video's debt.
    assert bucket.take(300, urgent=True) == pytest.approx(300 / (1000 * (1 - BULK_SHARE)))
    # Its bytes count: the video's next piece waits for them too.
    fake.now = 1005.0
    assert bucket.take(1000) == pytest.approx(1.3)


def test_urgent_pieces_alone_get_the_whole_rate() -> None:
    bucket, fake = fake_bucket(1000, burst=100)
    waits = [bucket.take(500, urgent=True) for _ in range(4)]
    assert sum(waits) == pytest.approx(2.0)  # 2,000 bytes at 1,000 B/s
    assert fake.now == pytest.approx(1002.0)


def test_others_keep_their_share_while_urgent_pieces_flow() -> None:
    bucket, fake = fake_bucket(1000, burst=100)
    ready = [0.0, 0.0]  # when the urgent taker and the other one take their next piece
    sent = [0, 0]
    while min(ready) < 100:  # two threads, each taking its next piece once its wait is over
        who = 0 if ready[0] <= ready[1] else 1
        fake.now = 1000 + ready[who]
        ready[who] += bucket.take(100, urgent=who == 0)
        sent[who] += 100
    assert sent[1] / 100 == pytest.approx(1000 * BULK_SHARE, rel=0.1)
    assert sent[0] / 100 == pytest.approx(1000 * (1 - BULK_SHARE), rel=0.1)


def test_urgent_pieces_alone_for_long_keep_their_place_ahead() -> None:
    bucket, fake = fake_bucket(1000, burst=100)
    for _ in range(200):  # 100 s of photos alone, at the full rate
        bucket.take(500, urgent=True)
    assert bucket.take(2000) == pytest.approx(2.0)  # then a video's part: 2 s of debt
    fake.now -= 2.0  # ... taken by another thread, which sleeps meanwhile
    # The next photo still goes ahead at the urgent share, not behind the 2 s.
    assert bucket.take(100, urgent=True) == pytest.approx(100 / (1000 * (1 - BULK_SHARE)))


def test_a_cancelled_urgent_take_gives_both_budgets_back() -> None:
    bucket, fake = fake_bucket(1000, burst=100)
    bucket.take(10_000, FakeCancel(fake, after=0.1), urgent=True)
    assert bucket.take(100, urgent=True) == 0.0  # not 9.9 s behind the bytes never sent


def test_cancelled_take_returns_early_and_gives_the_bytes_back() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    cancel = FakeCancel(fake, after=1.0)
    assert bucket.take(10_000, cancel) == pytest.approx(1.0)
    assert fake.sleeps == []  # waited on the event, not with sleep()
    # Only the first second was used: the 10,000 bytes are no longer owed.
    assert bucket.take(500) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)


def test_already_cancelled_takes_nothing() -> None:
    bucket, _ = fake_bucket(1000, burst=500)
    cancel = threading.Event()
    cancel.set()
    assert bucket.take(10_000, cancel) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)


def test_uncancelled_event_waits_the_full_time() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    cancel = FakeCancel(fake, after=99)
    assert bucket.take(2000, cancel) == pytest.approx(2.0)
    assert not cancel.is_set()
    assert bucket.take(100) == pytest.approx(0.1)  # the 2000 bytes were kept


# --- Limiter and pace --------------------------------------------------------------------------


@pytest.mark.parametrize("slow_first", [True, False])
def test_limiter_obeys_the_slower_bucket(slow_first: bool) -> None:
    fake = FakeClock()
    fast = TokenBucket(1000, clock=fake, sleep=fake.sleep)
    slow = TokenBucket(250, clock=fake, sleep=fake.sleep)
    limiter = Limiter([slow, fast] if slow_first else [fast, slow])
    start = fake.now
    for _ in range(10):
        limiter.take(500)
    assert fake.now - start == pytest.approx(10 * 500 / 250)
    assert limiter
    assert limiter.buckets == ((slow, fast) if slow_first else (fast, slow))


def test_limiter_returns_total_wait() -> None:
    fake = FakeClock()
    a = TokenBucket(1000, clock=fake, sleep=fake.sleep)
    b = TokenBucket(500, clock=fake, sleep=fake.sleep)
    # a: 0.5 s; b has filled 250 bytes meanwhile, then waits 0.5 s for the other 250
    assert Limiter([a, b]).take(500) == pytest.approx(1.0)


def test_empty_limiter_costs_nothing() -> None:
    assert not Limiter.none()
    assert not Limiter([])
    assert Limiter.none().take(10**12) == 0.0
    pace(None, 10**12)
    pace(Limiter.none(), 10**12)


def test_pace_takes_from_the_limiter() -> None:
    bucket, fake = fake_bucket(1000, burst=500)
    pace(Limiter([bucket]), 1500)
    assert fake.sleeps == pytest.approx([1.5])


# --- TokenBucket in real time -----------------------------------------------------------------


def test_threads_share_the_rate() -> None:
    rate = 4_000_000
    piece = 64 * KiB
    bucket = TokenBucket(rate)
    taken = [0] * 4
    start = time.monotonic()
    deadline = start + 1.5

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            bucket.take(piece)
            taken[i] += piece

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    elapsed = time.monotonic() - start
    measured = sum(taken) / elapsed
    assert measured == pytest.approx(rate, rel=0.10)
    # FIFO-ish: every thread got its turn
    assert min(taken) >= 0.15 * sum(taken), taken


def test_cancel_returns_promptly() -> None:
    bucket = TokenBucket(1000, burst=1000)
    cancel = threading.Event()
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    try:
        start = time.monotonic()
        waited = bucket.take(3000, cancel)  # 3 s without the cancellation
        returned_after = time.monotonic() - start
    finally:
        timer.cancel()
    assert cancel.is_set()
    assert returned_after < 0.2
    assert waited == pytest.approx(returned_after, abs=0.05)


def test_limiter_cancel_returns_promptly() -> None:
    limiter = Limiter([TokenBucket(1e9), TokenBucket(1000)])  # the second one waits
    cancel = threading.Event()
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    try:
        start = time.monotonic()
        pace(limiter, 3000, cancel)  # 3 s without the cancellation
        returned_after = time.monotonic() - start
    finally:
        timer.cancel()
    assert returned_after < 0.2


# --- parse_rate, format_rate, Rate ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2MB/s", 2_000_000),
        ("2 MB/s", 2_000_000),
        ("2 MB / s", 2_000_000),
        ("500KiB/s", 500 * 1024),
        ("1.5GiB/s", 1.5 * 1024**3),
        ("100B/s", 100),
        ("2kB/s", 2000),
        ("10Mbit/s", 1_250_000),
        ("10 mbit/s", 1_250_000),
        ("10Mbps", 1_250_000),
        ("10 mbps", 1_250_000),
        ("512kbit/s", 64_000),
        ("512kbps", 64_000),
        ("1Gbit/s", 125_000_000),
        ("1Gbps", 125_000_000),
        (1000, 1000.0),
        (2.5, 2.5),
    ],
)
def test_parse_rate(value: object, expected: float) -> None:
    assert parse_rate(value) == pytest.approx(expected)
    assert isinstance(parse_rate(value), float)


@pytest.mark.parametrize(
    "bad",
    [
        "2MB",  # a size, not a rate
        "4000000",
        "",
        "/s",
        "MB/s",
        "2XB/s",
        "1.5.5MB/s",
        "2MB/min",
        "10Mb/s",  # megabits or megabytes? say Mbit/s or MB/s
        "10kb/s",
        "10b/s",
        "10MBps",
        "10 Mbit",
        None,
        [2],
        float("nan"),
        float("inf"),
    ],
)
def test_parse_rate_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid rate .*: use a size per second such as"):
        parse_rate(bad)


def test_parse_rate_error_message() -> None:
    with pytest.raises(ValueError, match="invalid rate") as info:
        parse_rate("2MB")
    assert str(info.value) == (
        "invalid rate '2MB': use a size per second such as 2MB/s, 512KiB/s or 10Mbit/s"
    )


@pytest.mark.parametrize("bad", [0, -1, 0.0, -2.5, "0MB/s", "-2MB/s", "0Mbps"])
def test_parse_rate_must_be_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="a rate must be positive"):
        parse_rate(bad)


def test_parse_rate_rejects_booleans() -> None:
    with pytest.raises(ValueError, match=r"rate.*not a boolean"):
        parse_rate(True)


def test_format_rate() -> None:
    assert format_rate(2_000_000) == "2.0 MB/s"
    assert format_rate(12) == "12 B/s"
    assert format_rate(parse_rate("10Mbit/s")) == "1.2 MB/s"


def test_rate_annotated_type() -> None:
    adapter = pydantic.TypeAdapter(Rate)
    assert adapter.validate_python("512KiB/s") == 512 * 1024
    assert adapter.validate_python(100) == 100.0
    with pytest.raises(pydantic.ValidationError, match="invalid rate '2MB'"):
        adapter.validate_python("2MB")
