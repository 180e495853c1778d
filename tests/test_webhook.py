"""The webhook notifier against a real HTTP receiver on 127.0.0.1.

The receiver is an aiohttp server on a loop and thread of its own; it records every request,
can answer with chosen status codes, hold requests, and be stopped and started again on the
same port (while stopped, connections are refused).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import servers
from aiohttp import web
from helpers import wait_for

from skyframe.config import RetryConfig, WebhookConfig
from skyframe.events import LifecycleEvent
from skyframe.plugin_manager import get_plugin_manager
from skyframe.webhook import ALL_KINDS, WebhookNotifier

T = TypeVar("T")
WAIT = 5.0  #: the longest any condition below is waited for
FAST_RETRY = RetryConfig(initial=0.02, max=0.1)
DROP = 0  #: in Receiver.statuses: close the connection instead of answering


@dataclass
class Request:
    """One POST the receiver got."""

    body: dict[str, Any]
    headers: dict[str, str]
    status: int
    at: float  #: time.monotonic() when it arrived


class Receiver:
    """An aiohttp server that records POSTs; it runs on a loop in a thread of its own."""

    def __init__(self) -> None:
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[Request] = []
        self.statuses: list[int] = []  #: the answers to the next requests (200 when empty)
        self.release = threading.Event()  #: requests are answered only while this is set
        self.release.set()
        self.arrived = 0  #: requests received, including those still held
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-receiver")
        self._thread.start()
        self._runner: web.AppRunner | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WAIT)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._cond:
            self.arrived += 1
            status = self.statuses.pop(0) if self.statuses else 200
            self._cond.notify_all()
        if status == DROP:  # close the connection without an answer
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        with self._cond:
            self.requests.append(Request(body, dict(request.headers), status, time.monotonic()))
            self._cond.notify_all()
        return web.Response(status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self.release.set()
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()

    # --- what was received ---------------------------------------------------------------------

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """The bodies answered with a 2xx status, in order."""
        with self._cond:
            return [r.body for r in self.requests if 200 <= r.status < 300]

    @property
    def events(self) -> list[str]:
        """The relpaths of every accepted event, in order."""
        return [e["relpath"] for body in self.accepted for e in body["events"]]

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._cond.wait(left)

    def wait_events(self, count: int) -> None:
        self.wait(lambda: len(self.events) >= count, f"{count} events")


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """``wait_for`` at this file's pace: WAIT seconds at most, polled every 5 ms."""
    wait_for(predicate, what=what, timeout=WAIT, interval=0.005)


def event(i: int, kind: str = "delivered") -> LifecycleEvent:
    return LifecycleEvent(kind, "survey", f"f{i:04d}.jpg", sink="nas", size=i)  # type: ignore[arg-type]


def names(numbers: Iterator[int] | range | list[int]) -> list[str]:
    return [f"f{i:04d}.jpg" for i in numbers]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    server.close()


_counter = itertools.count()
MakeNotifier = Callable[..., WebhookNotifier]


@pytest.fixture
def make_notifier() -> Iterator[MakeNotifier]:
    """make(url, start=True, **WebhookConfig fields): a notifier closed after the test."""
    made: list[WebhookNotifier] = []

    def make(url: str, *, start: bool = True, **options: Any) -> WebhookNotifier:
        options.setdefault("retry", FAST_RETRY)
        notifier = WebhookNotifier(
            WebhookConfig(url=url, **options), name=f"webhook-test-{next(_counter)}"
        )
        made.append(notifier)
        if start:
            notifier.start()
        return notifier

    yield make
    for notifier in made:
        notifier.close(timeout=1.0)
    names_left = {f"skyframe-{n.name}" for n in made} & {t.name for t in threading.enumerate()}
    assert not names_left, f"sender threads still running: {names_left}"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections into its backlog and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "skyframe.webhook" and r.levelno == level
    ]


# --- batching ----------------------------------------------------------------------------------


def test_full_batches_are_sent_at_once_in_order(
    receiver: Receiver, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier(receiver.url, batch_size=5, flush_interval=60)
    sent = [event(i) for i in range(20)]
    for e in sent:
        notifier.skyframe_event(e)
    receiver.wait_events(20)  # long before flush_interval: full batches do not wait

    assert receiver.events == names(range(20))
    assert [len(body["events"]) for body in receiver.accepted] == [5, 5, 5, 5]
    first = receiver.accepted[0]
    assert first["source"] == "skyframe"
    assert first["host"] == socket.gethostname()
    assert first["dropped"] == 0
    assert first["events"] == [e.to_json() for e in sent[:5]]
    wait_until(lambda: notifier.delivered == 20, "the last answer")
    assert (notifier.delivered, notifier.pending, notifier.dropped) == (20, 0, 0)

    # Fewer than batch_size events wait for flush_interval.
    notifier.skyframe_event(event(20))
    time.sleep(0.3)
    assert len(receiver.requests) == 4
    assert notifier.pending == 1


def test_batches_never_exceed_batch_size(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    receiver.release.clear()  # the first request is held: everything else piles up behind it
    notifier = make_notifier(receiver.url, batch_size=4, flush_interval=0.01)
    notifier.skyframe_event(event(0))
    receiver.wait(lambda: receiver.arrived == 1, "the first request")
    for i in range(1, 11):
        notifier.skyframe_event(event(i))
    receiver.release.set()
    receiver.wait_events(11)

    assert receiver.events == names(range(11))
    assert [len(body["events"]) for body in receiver.accepted] == [1, 4, 4, 2]


def test_flush_interval_is_honoured(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    interval = 0.3
    notifier = make_notifier(receiver.url, batch_size=100, flush_interval=interval)
    start = time.monotonic()
    notifier.skyframe_event(event(0))
    time.sleep(0.1)
    notifier.skyframe_event(event(1))
    receiver.wait_events(2)

    (request,) = receiver.requests
    assert [e["relpath"] for e in request.body["events"]] == names([0, 1])
    assert interval - 0.02 <= request.at - start < interval + 0.5  # timed from the oldest event


# --- what is sent ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (None, sorted(ALL_KINDS - {"progress"})),
        (["delivered", "dead-lettered"], ["dead-lettered", "delivered"]),
        (["progress"], ["progress"]),
    ],
)
def test_only_the_configured_kinds_are_sent(
    receiver: Receiver,
    make_notifier: MakeNotifier,
    events: list[str] | None,
    expected: list[str],
) -> None:
    notifier = make_notifier(receiver.url, events=events, flush_interval=0.01)
    for i, kind in enumerate(sorted(ALL_KINDS)):
        notifier.skyframe_event(event(i, kind))
    notifier.close()
    kinds = [e["kind"] for body in receiver.accepted for e in body["events"]]
    assert kinds == expected


def test_configured_headers_are_sent(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    headers = {"Authorization": "Bearer tok-123", "X-Skyframe-Site": "site-7"}
    notifier = make_notifier(receiver.url, headers=headers, flush_interval=0.01)
    notifier.skyframe_event(event(0))
    receiver.wait_events(1)

    sent = receiver.requests[0].headers
    assert sent["Authorization"] == "Bearer tok-123"
    assert sent["X-Skyframe-Site"] == "site-7"
    assert sent["Content-Type"] == "application/json"


def test_it_is_a_skyframe_event_hook(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url, flush_interval=0.01)
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(notifier, name=notifier.name)
    pm.hook.skyframe_event(event=event(0))
    receiver.wait_events(1)
    assert receiver.events == names([0])


# --- failures ----------------------------------------------------------------------------------


def test_receiver_down_and_back_loses_nothing(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe.webhook")
    notifier = make_notifier(receiver.url, batch_size=3, flush_interval=0.02)
    for i in range(4):
        notifier.skyframe_event(event(i))
    receiver.wait_events(4)
    wait_until(lambda: notifier.delivered == 4, "the answers")

    receiver.stop()  # connections are refused from now on
    for i in range(4, 14):
        notifier.skyframe_event(event(i))
    wait_until(lambda: notifier.failures >= 4, "several failed attempts")
    for i in range(14, 19):
        notifier.skyframe_event(event(i))
    assert notifier.pending == 15
    assert notifier.delivered == 4

    receiver.start()  # same port
    receiver.wait_events(19)
    assert receiver.events == names(range(19))  # in order, none lost, none twice
    assert all(len(body["events"]) <= 3 for body in receiver.accepted)
    assert all(body["dropped"] == 0 for body in receiver.accepted)
    wait_until(lambda: notifier.delivered == 19, "the last answer")
    assert (notifier.pending, notifier.delivered, notifier.dropped) == (0, 19, 0)
    assert notifier.failures == 0

    (warning,) = records(caplog, logging.WARNING)  # one line for the outage, not one per retry
    assert f"127.0.0.1:{receiver.port}/hook" in warning
    assert "Connection refused" in warning
    (info,) = records(caplog, logging.INFO)
    assert "again" in info
    assert "dropped" not in info


@pytest.mark.parametrize("status", [500, 503, 429, 400])
def test_error_answers_are_retried(
    receiver: Receiver,
    make_notifier: MakeNotifier,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe.webhook")
    receiver.statuses = [status, status]
    notifier = make_notifier(receiver.url, flush_interval=0.01)
    for i in range(3):
        notifier.skyframe_event(event(i))
    receiver.wait_events(3)

    assert [r.status for r in receiver.requests] == [status, status, 200]
    assert all(r.body["events"] == receiver.requests[0].body["events"] for r in receiver.requests)
    assert receiver.events == names(range(3))
    wait_until(lambda: notifier.delivered == 3, "the answer")
    (warning,) = records(caplog, logging.WARNING)
    assert f"HTTP {status}" in warning


def test_a_dropped_connection_is_sent_again_at_once(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that closes a kept-alive connection as it is reused is no outage."""
    caplog.set_level(logging.INFO, logger="skyframe.webhook")
    receiver.statuses = [DROP]
    notifier = make_notifier(receiver.url, flush_interval=0.01)
    notifier.skyframe_event(event(0))
    receiver.wait_events(1)
    wait_until(lambda: notifier.delivered == 1, "the answer")
    assert receiver.arrived == 2
    assert notifier.failures == 0
    assert records(caplog, logging.WARNING) == []

    receiver.statuses = [DROP, DROP]  # twice in a row is a failure
    notifier.skyframe_event(event(1))
    receiver.wait_events(2)
    assert receiver.events == names(range(2))
    assert "ServerDisconnectedError" in records(caplog, logging.WARNING)[0]


def test_overflow_drops_the_oldest_and_reports_it(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make_notifier(receiver.url, start=False, buffer=5, flush_interval=0.01)
    for i in range(12):
        notifier.skyframe_event(event(i))
    assert (notifier.pending, notifier.dropped) == (5, 7)

    notifier.start()
    receiver.wait_events(5)
    (body,) = receiver.accepted
    assert [e["relpath"] for e in body["events"]] == names(range(7, 12))
    assert body["dropped"] == 7

    notifier.skyframe_event(event(12))
    receiver.wait_events(6)
    assert receiver.accepted[1]["dropped"] == 0  # only drops since the previous delivery
    wait_until(lambda: notifier.delivered == 6, "the answer")
    assert notifier.dropped == 7  # the total


@pytest.mark.parametrize(("status", "dropped"), [(200, 0), (503, 3)])
def test_overflow_during_a_post(
    receiver: Receiver, make_notifier: MakeNotifier, status: int, dropped: int
) -> None:
    """Events pushed out of the buffer while their POST is under way are lost only if it fails."""
    receiver.statuses = [status]
    receiver.release.clear()
    notifier = make_notifier(receiver.url, buffer=5, batch_size=5, flush_interval=0.01)
    for i in range(5):
        notifier.skyframe_event(event(i))
    receiver.wait(lambda: receiver.arrived == 1, "the first request")
    for i in range(5, 8):  # push 0, 1 and 2 out of the buffer
        notifier.skyframe_event(event(i))
    assert notifier.pending == 5
    receiver.release.set()

    wait_until(lambda: notifier.pending == 0, "everything delivered")
    survivors = range(5, 8) if status == 200 else range(3, 8)
    assert receiver.events == names(range(5)) * (status == 200) + names(survivors)
    assert receiver.accepted[-1]["dropped"] == dropped
    assert notifier.dropped == dropped
    assert notifier.delivered == len(receiver.events)


def test_skyframe_event_never_blocks_or_raises(
    silent_port: int, make_notifier: MakeNotifier
) -> None:
    # The receiver accepts connections and never answers: every POST hangs until its timeout.
    notifier = make_notifier(
        f"http://127.0.0.1:{silent_port}/hook", buffer=1000, batch_size=10, flush_interval=0.001
    )
    slowest = 0.0
    start = time.monotonic()
    for i in range(20_000):
        before = time.perf_counter()
        notifier.skyframe_event(event(i))
        slowest = max(slowest, time.perf_counter() - before)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0
    # A call that waited for the hung POST would take its timeout (10 s); a busy machine can
    # hold a thread for a tenth of a second now and then.
    assert slowest < 0.5
    assert notifier.pending == 1000
    assert notifier.delivered == 0

    class Broken(LifecycleEvent):
        def to_json(self) -> dict[str, Any]:
            raise RuntimeError("broken")

    notifier.skyframe_event(Broken("delivered", "survey", "x.jpg"))
    notifier.skyframe_event(None)  # type: ignore[arg-type]
    assert notifier.pending == 1000
    notifier.close(timeout=0.1)


# --- close -------------------------------------------------------------------------------------


def test_close_flushes_what_is_buffered(receiver: Receiver, make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(receiver.url, flush_interval=60)
    for i in range(3):
        notifier.skyframe_event(event(i))
    start = time.monotonic()
    notifier.close(timeout=5)
    assert time.monotonic() - start < 1.0
    assert receiver.events == names(range(3))
    assert (notifier.pending, notifier.delivered) == (0, 3)

    notifier.close()  # twice is fine
    notifier.skyframe_event(event(3))  # no longer accepted
    assert notifier.pending == 0


def test_close_without_start(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make_notifier(receiver.url, start=False)
    notifier.close()
    notifier.close()
    notifier = make_notifier(receiver.url, start=False)
    notifier.skyframe_event(event(0))
    with caplog.at_level(logging.WARNING, logger="skyframe.webhook"):
        notifier.close()
    assert any("1 event(s) not delivered" in m for m in records(caplog, logging.WARNING))
    assert receiver.requests == []


def test_close_is_bounded_when_the_receiver_hangs(
    silent_port: int, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = make_notifier(f"http://127.0.0.1:{silent_port}/hook", flush_interval=0.001)
    notifier.skyframe_event(event(0))
    wait_until(lambda: notifier._inflight_last is not None, "a POST under way")  # timeout: 10 s
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="skyframe.webhook"):
        notifier.close(timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 1.5
    assert f"skyframe-{notifier.name}" not in {t.name for t in threading.enumerate()}
    assert any("not delivered" in m for m in records(caplog, logging.WARNING))


# --- secrets -----------------------------------------------------------------------------------


def test_secrets_never_appear_in_the_log(
    receiver: Receiver, make_notifier: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = receiver.url.replace("http://", "http://pilot:pa55word@") + "?token=qs-secret"
    receiver.statuses = [401, 500]
    notifier = make_notifier(url, headers={"X-Api-Key": "TOPSECRET"}, flush_interval=0.01)
    notifier.skyframe_event(event(0))
    receiver.wait_events(1)
    assert receiver.requests[-1].headers["X-Api-Key"] == "TOPSECRET"
    wait_until(lambda: notifier.delivered == 1, "the answer")

    receiver.stop()
    notifier.skyframe_event(event(1))
    wait_until(lambda: notifier.failures >= 2, "failed attempts")
    receiver.start()
    receiver.wait_events(2)
    notifier.close()

    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2  # one per outage
    assert all(f"pilot@127.0.0.1:{receiver.port}/hook" in w for w in warnings)
    assert len(records(caplog, logging.DEBUG)) >= 1  # retries, at debug level
    for secret in ("TOPSECRET", "pa55word", "qs-secret"):
        assert secret not in caplog.text
