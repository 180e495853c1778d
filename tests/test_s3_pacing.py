"""S3 multipart uploads follow the link: part size and parts in flight by the measured rate.

A cut loses the parts in flight, so on a slow link there are fewer of them and smaller; on a
fast one, up to ``part_concurrency`` of ``part_size``. Checked on the real SeaweedFS, through
the link emulator (32 and 64 Mbit/s) and on loopback, by counting the parts in flight.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
import servers
from fakes.link import LinkEmulator, mbit
from helpers import file_request, s3_sink, write_random

from skyframe.config import SinkConfig
from skyframe.protocols.endpoint import Endpoint
from skyframe.protocols.s3 import backend, transfer
from skyframe.protocols.s3.backend import MIB, S3Options
from skyframe.storage import Sink, open_sink

MB = 1_000_000


# --- the sizes, worked out ------------------------------------------------------------------


def test_part_size_follows_the_rate_within_s3s_limits_and_the_configured_size() -> None:
    options = S3Options(part_size=8 * MIB)
    assert options.part_size_for(100 * MB) == 5 * MIB  # nothing measured yet
    assert options.part_size_for(100 * MB, rate=1 * MB) == 5 * MIB  # S3's smallest part
    assert options.part_size_for(100 * MB, rate=6.5 * MB) == 7 * MIB  # about a second
    assert options.part_size_for(100 * MB, rate=500 * MB) == 8 * MIB  # the configured size
    # Still within 10,000 parts, whatever the link.
    assert options.part_size_for(100_000 * MIB, rate=1 * MB) == 10 * MIB
    assert S3Options(part_size=5 * MIB).part_size_for(100 * MB, rate=500 * MB) == 5 * MIB


def pace(
    rate: float | None, *, part: int = 5 * MIB, most: int = 3, limited: bool = False
) -> transfer._Pace:
    sink = SimpleNamespace(rate=rate, limiter=limited, sending=1, alone_since=0.0)
    return transfer._Pace(part, most, sink)  # type: ignore[arg-type]


def test_parts_in_flight_are_what_the_link_carries_in_two_seconds() -> None:
    assert pace(None).width == 1  # nothing known: one part
    assert pace(4 * MB).width == 1  # 8 MB in 2 s: less than two parts of 5 MiB
    assert pace(6 * MB).width == 2
    assert pace(100 * MB).width == 3  # part_concurrency at most
    assert pace(100 * MB, most=1).width == 1
    # Under a bwlimit, a part waits for its tokens while the one before is sent.
    assert pace(None, limited=True).width == 2
    assert pace(1 * MB, limited=True).width == 2
    assert pace(1 * MB, most=1, limited=True).width == 1


@dataclass
class Clock:
    """The pace's clock (``now[0]``, from 100 s) and the timeouts it waited with."""

    now: list[float] = field(default_factory=lambda: [100.0])
    waited: list[float | None] = field(default_factory=list)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    kept = Clock()
    monkeypatch.setattr(transfer, "time", SimpleNamespace(monotonic=lambda: kept.now[0]))
    monkeypatch.setattr(
        transfer.futures, "wait", lambda fs, timeout=None: kept.waited.append(timeout)
    )
    return kept


def sent_at(p: transfer._Pace, now: list[float], *times: float) -> list[float]:
    """Parts sent at ``times`` (the clock ``now`` set to each in turn), as the upload sends
    them; the clock is left at 100."""
    sent = []
    for when in times:
        now[0] = when
        sent.append(p.sending())
    now[0] = 100.0
    return sent


def test_the_rate_is_measured_over_the_latest_parts_and_sets_the_width(clock: Clock) -> None:
    now = clock.now
    sink = SimpleNamespace(rate=None, limiter=None, sending=1, alone_since=0.0)
    p = transfer._Pace(5 * MIB, 3, sink)  # type: ignore[arg-type]
    assert p.width == 1  # nothing measured

    def one_part(seconds: float) -> None:
        sent = p.sending()
        now[0] += seconds
        p.confirmed(5 * MIB, sent)

    one_part(0.05)  # 5 MiB in 50 ms: a fast link
    assert sink.rate == pytest.approx(5 * MIB / 0.05)
    assert p.width == 3
    for _ in range(transfer.RATE_PARTS):  # then a part every 1.25 s: about 4.2 MB/s
        one_part(1.25)
    # Over the latest parts only: the fast first one no longer counts.
    assert sink.rate == pytest.approx(5 * MIB / 1.25)
    assert p.width == 1  # 8.4 MB in two seconds: one part of 5 MiB
    for _ in range(transfer.RATE_PARTS):  # faster again: a part every 0.8 s
        one_part(0.8)
    assert sink.rate == pytest.approx(5 * MIB / 0.8)
    assert p.width == 2


def test_the_next_part_goes_in_the_last_stretch_of_the_oldest(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    now, waited = clock.now, clock.waited
    answer: Future[Any] = Future()
    quiet = pace(None)
    assert not quiet.lead(5 * MIB, answer, *sent_at(quiet, now, 99.0))  # no rate: awaited
    assert waited == []
    # 5 MiB at 4 MiB/s, one at a time: 1.25 s; sent at 99.5, its last fifth begins at 100.5.
    assert pace(4 * MIB).width == 1
    one = pace(4 * MIB)
    assert one.lead(5 * MIB, answer, *sent_at(one, now, 99.5))
    assert waited == [pytest.approx(0.5)]
    # Two in flight share the link: 5 MiB at half of 6 MiB/s takes 5/3 s, so sent at 99.0
    # (the other one with it) its last fifth begins at 99 + 4/3 s.
    assert pace(6 * MIB).width == 2
    two = pace(6 * MIB)
    oldest, _ = sent_at(two, now, 99.0, 99.0 + 1e-9)
    assert two.lead(5 * MIB, answer, oldest)
    assert waited[-1] == pytest.approx(1 / 3)
    waited.clear()
    late = pace(4 * MIB)
    assert late.lead(5 * MIB, answer, *sent_at(late, now, 98.0))  # its last fifth began
    assert waited == []
    single = pace(4 * MIB, most=1)
    assert not single.lead(5 * MIB, answer, *sent_at(single, now, 98.0))  # part_concurrency 1
    answer.set_result({"ETag": "x"})
    done = pace(4 * MIB)
    assert not done.lead(5 * MIB, answer, *sent_at(done, now, 99.5))  # answered: settle it
    # A file that begins while the part waits for its last stretch: no next part then.
    landing = pace(4 * MIB)
    monkeypatch.setattr(
        transfer.futures,
        "wait",
        lambda fs, timeout=None: setattr(landing.sink, "sending", 2),
    )
    assert not landing.lead(5 * MIB, Future(), *sent_at(landing, now, 99.5))


def test_while_other_files_go_the_next_part_waits_for_them_or_for_the_answer() -> None:
    sink = Sink("t", "memory://x", Endpoint("memory", "/x", lambda: fsspec.filesystem("memory")))
    p = transfer._Pace(5 * MIB, 3, sink)
    answer: Future[Any] = Future()
    photos = sink.sending_files(2)
    with sink.sending_files():  # the video
        photos.__enter__()  # they fill the link during the part's answer: no part beside it
        done = threading.Timer(0.2, photos.__exit__, (None, None, None))
        done.start()
        began = time.monotonic()
        # The photos are done before the part's answer: the link is the video's, the next
        # part goes at once rather than a round trip later.
        assert p.lead(5 * MIB, answer, began)
        assert 0.15 < time.monotonic() - began < 5
        with sink.sending_files():  # a photo lands
            threading.Timer(0.2, answer.set_result, ({"ETag": "x"},)).start()
            assert not p.lead(5 * MIB, answer, began)  # answered first: settle it
    done.join()


def test_parts_in_flight_share_the_link_and_each_is_timed_by_its_share(clock: Clock) -> None:
    """Parts of 5 MiB on a link of 5 MiB/s: a second each with the link to itself."""
    now, waited = clock.now, clock.waited
    sink = SimpleNamespace(rate=None, limiter=None, sending=1, alone_since=0.0)
    p = transfer._Pace(5 * MIB, 3, sink)  # type: ignore[arg-type]
    first = p.sending()
    now[0] = 100.5
    second = p.sending()  # beside the first: each has half the link from here
    now[0] = 101.5
    p.confirmed(5 * MIB, first)  # 0.5 s alone + 1 s at half: a second of the link
    assert p.latest == pytest.approx(1.0 / (5 * MIB))
    assert sink.rate == pytest.approx(5 * MIB)  # the link's, not 5 MiB in 1.5 s
    # The second had half a second of the link: its last fifth (0.8 s of it) begins 0.3 s
    # on, now that it is alone. Timed from its send, it would seem 0.2 s past it.
    assert p.lead(5 * MIB, Future(), second)
    assert waited[-1] == pytest.approx(0.3)
    third = p.sending()
    now[0] = 102.0
    p.confirmed(5 * MIB, second)  # 0.5 + 0.25 (half, with the third)
    assert p.latest == pytest.approx(0.75 / (5 * MIB))
    # Answered half a second after the first: 10 MiB/s from the answers, 5.7 by the shares.
    assert sink.rate == pytest.approx(10 * MIB / 1.75)
    # The third had 0.25 s; its last fifth begins after 0.6 s of the link: 0.35 s on.
    assert p.lead(5 * MIB, Future(), third)
    assert waited[-1] == pytest.approx(0.35)
    fourth = p.sending()  # two in flight again: what the third lacks takes twice as long
    assert p.lead(5 * MIB, Future(), third)
    assert waited[-1] == pytest.approx(0.7)
    assert fourth in p.in_air


def test_a_part_that_shared_the_link_with_other_files_says_nothing_of_it(clock: Clock) -> None:
    now = clock.now
    sink = SimpleNamespace(rate=None, limiter=None, sending=1, alone_since=0.0)
    p = transfer._Pace(5 * MIB, 3, sink)  # type: ignore[arg-type]
    first = p.sending()
    now[0] = 101.0
    p.confirmed(5 * MIB, first)  # alone: a second
    assert p.latest == pytest.approx(1 / (5 * MIB))
    assert not p.shared
    second = p.sending()
    sink.alone_since = 105.0  # photos went from before it was sent until 105
    now[0] = 105.0
    third = p.sending()  # when the photos were done (the lead's wait for that said True)
    now[0] = 106.0
    p.confirmed(5 * MIB, second)  # 4.5 s of "the link": the photos had most of it
    assert p.shared
    assert p.latest is None
    # The third has the link now, and the answer of the oldest comes a round trip after
    # its last byte. Nothing measured says when that is: the part after it goes now.
    assert p.lead(5 * MIB, Future(), third)
    answered: Future[Any] = Future()
    answered.set_result({"ETag": "x"})
    assert not p.lead(5 * MIB, answered, third)
    # Under an upload limit the parts queue for it at the station: nothing goes at once,
    # and nothing beside other files (their tokens).
    sink.limiter = True
    assert p.lead(5 * MIB, Future(), third)  # its estimate says it is near its end
    sink.sending = 2
    assert not p.lead(5 * MIB, Future(), third)


# --- on the real server ----------------------------------------------------------------------


class Parts:
    """Counts the UploadPart requests in flight (the most at once), their sizes, and when each
    was sent and answered."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.sizes: list[int] = []
        self.spans: list[list[float]] = []  #: [sent, answered] per part, in the order sent
        self.lock = threading.Lock()

    def wrap(self, real: Any) -> Any:
        def call(fs: Any, method: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
            inner = real(fs, method, **kwargs)
            if method != "upload_part":
                return inner  # type: ignore[no-any-return]

            async def counted() -> Any:
                with self.lock:
                    self.sizes.append(len(kwargs["Body"]))
                    span = [time.monotonic(), math.inf]
                    self.spans.append(span)
                    self.now += 1
                    self.most = max(self.most, self.now)
                try:
                    return await inner
                finally:
                    with self.lock:
                        span[1] = time.monotonic()
                        self.now -= 1

            return counted()

        return call


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> Parts:
    counter = Parts()
    monkeypatch.setattr(backend, "call", counter.wrap(backend.call))
    return counter


def upload(sink: Sink, local: Path) -> None:
    result = transfer.upload(file_request(sink, local))
    assert result.size == local.stat().st_size


def open_s3(server: servers.S3Server, tmp_path: Path, endpoint: str, **extra: Any) -> Sink:
    entry = s3_sink(server, **extra)
    entry["options"]["endpoint_url"] = endpoint
    return open_sink(SinkConfig(**entry), tmp_path)


def test_a_slow_link_gets_parts_of_5_mib_one_at_a_time_and_the_next_in_the_last_stretch(
    s3_server: servers.S3Server, tmp_path: Path, parts: Parts
) -> None:
    local = tmp_path / "flight.mp4"
    digest = write_random(local, 12 * MB, seed=7)
    with LinkEmulator(servers.LOOPBACK, s3_server.port, up_bps=mbit(24), rtt=0.04).start() as link:
        sink = open_s3(s3_server, tmp_path, f"http://{link.address}")
        try:
            upload(sink, local)
        finally:
            sink.close()
    # 3 MB/s carries less than two parts in two seconds: one at a time, but for the third
    # part, sent in the last fifth of the second's time (about 0.35 s of 1.75 s) while the
    # second one is finishing. The first part's rate was not known: the second waited. The
    # second's time is expected from the first's, so these hold on a busy machine too, whose
    # parts take longer than the link's rate says.
    assert parts.sizes == [5 * MIB, 5 * MIB, 12 * MB - 10 * MIB], parts.sizes
    assert parts.most <= 2, parts.most
    (first_sent, first_answered), (second_sent, second_answered), (third_sent, _) = parts.spans
    first = first_answered - first_sent
    assert first_answered <= second_sent, parts.spans
    assert 0.7 * first < third_sent - second_sent < first, (first, parts.spans)
    # The third overlaps the second unless the second went much faster than the first (a busy
    # moment slowed the first: a fresh-clone CI run): then it was answered before the last
    # stretch the pacing expected, and the third rightly followed it.
    if second_answered - second_sent > 0.85 * first:
        assert third_sent < second_answered, parts.spans
        assert parts.most == 2, parts.most
    assert sink.rate is not None
    assert 2.0 * MB < sink.rate < 3.1 * MB, sink.rate
    assert stored_sha256(s3_server, sink.remote_path(local.name)) == digest


def test_parts_grow_to_a_second_of_a_faster_link(
    s3_server: servers.S3Server, tmp_path: Path, parts: Parts
) -> None:
    local = tmp_path / "flight.mp4"
    write_random(local, 16 * MB, seed=9)
    with LinkEmulator(servers.LOOPBACK, s3_server.port, up_bps=mbit(80), rtt=0.02).start() as link:
        sink = open_s3(s3_server, tmp_path, f"http://{link.address}", part_size="6MiB")
        try:
            upload(sink, local)
            assert parts.sizes[:3] == [5 * MIB] * 3, parts.sizes  # nothing known yet
            # The link carries 10 MB/s; a busy machine measures less. Over 5 MiB/s, a second
            # of it rounded up to whole MiB reaches the configured 6 MiB.
            assert sink.rate is not None
            assert sink.rate > 5 * MIB, sink.rate
            parts.sizes.clear()
            upload(sink, local)  # parts of a second of the rate: the configured 6 MiB at most
        finally:
            sink.close()
    assert parts.sizes[:2] == [6 * MIB] * 2, (parts.sizes, sink.rate)


def stored_sha256(server: servers.S3Server, path: str) -> str:
    fs = server.filesystem()
    try:
        return hashlib.sha256(fs.cat(path)).hexdigest()
    finally:
        servers.close_filesystem(fs)


def test_on_a_fast_link_part_concurrency_parts_are_in_flight(
    s3_server: servers.S3Server, tmp_path: Path, parts: Parts
) -> None:
    local = tmp_path / "flight.mp4"
    write_random(local, 60 * MB, seed=8)
    sink = open_s3(s3_server, tmp_path, s3_server.endpoint_url, part_size="5MiB")
    try:
        upload(sink, local)
    finally:
        sink.close()
    assert parts.most == 3, parts.most  # part_concurrency, once the first part was measured
