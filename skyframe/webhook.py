"""The built-in ``webhook`` notifier: lifecycle events POSTed as JSON, in batches, to a URL.

``skyframe_event`` only appends the event to a bounded buffer and returns: it never blocks on
the network and never raises. One background thread (with its own asyncio loop and one aiohttp
session) sends the buffer in order, ``batch_size`` events per POST at most, as soon as a full
batch is waiting or ``flush_interval`` seconds after the oldest unsent event. A 2xx answer
removes the events it carried; anything else keeps them and retries with exponential backoff and
jitter. Nothing is lost unless more than ``buffer`` events pile up, in which case the oldest go
first and are counted, and the next request body says how many were dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from typing import Any, get_args
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from skyframe import backoff
from skyframe.config import WebhookConfig, url_without_password
from skyframe.events import LifecycleEvent, LifecycleKind
from skyframe.markers import hookimpl

log = logging.getLogger(__name__)

ALL_KINDS: frozenset[str] = frozenset(get_args(LifecycleKind))
DEFAULT_KINDS: frozenset[str] = ALL_KINDS - {"progress"}
START_TIMEOUT = 5.0  #: seconds start() waits for the sender thread's loop to be ready


def display_url(url: str) -> str:
    """The URL as logged: without its password, query string or fragment (they may hold tokens)."""
    parts = urlsplit(url_without_password(url))
    return urlunsplit(parts._replace(query="", fragment=""))


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed POST: the error type and, for a refused connection, why."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        return f"{type(exc).__name__}: {os.strerror(exc.os_error.errno)}"
    return type(exc).__name__


# One buffered event: (sequence number, monotonic time it was buffered, its JSON shape).
_Entry = tuple[int, float, dict[str, Any]]


class WebhookNotifier:
    """POSTs lifecycle events to ``config.url`` in batches, from a thread of its own.

    Register the instance with the plugin manager (it implements ``skyframe_event``), call
    :meth:`start` once, and :meth:`close` at the end.
    """

    def __init__(self, config: WebhookConfig, *, name: str = "webhook") -> None:
        self.config = config
        self.name = name
        self.url = display_url(config.url)
        # The config refuses unknown kinds (a config error naming the line).
        self._kinds = DEFAULT_KINDS if config.events is None else frozenset(config.events)
        self._host = socket.gethostname()
        self._headers = {"Content-Type": "application/json", **config.headers}

        self._lock = threading.Lock()
        self._buffer: collections.deque[_Entry] = collections.deque()
        self._capacity = config.buffer
        self._seq = 0
        self._dropped = 0  # events lost for good
        self._unreported = 0  # of those, not yet announced in a delivered body
        self._delivered = 0
        self._inflight_last: int | None = None  # last sequence number of the POST under way
        self._evicted_inflight = 0  # events of that POST pushed out of the buffer meanwhile
        self._closing = False
        self._close_deadline = 0.0

        # Owned by the sender thread.
        self._failures = 0
        self._dropped_at_failure = 0
        self._retry_at = 0.0

        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._wake_pending = False

    def __repr__(self) -> str:
        return f"<WebhookNotifier {self.name} {self.url}>"

    # --- status --------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events buffered: not yet delivered (including a batch being sent)."""
        with self._lock:
            return len(self._buffer)

    @property
    def dropped(self) -> int:
        """Events lost because the buffer was full (the oldest go first)."""
        with self._lock:
            return self._dropped

    @property
    def delivered(self) -> int:
        """Events POSTed successfully (answered with a 2xx status)."""
        with self._lock:
            return self._delivered

    @property
    def failures(self) -> int:
        """Failed POSTs in a row: 0 while the receiver answers."""
        return self._failures

    # --- the hook ------------------------------------------------------------------------------

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        """Buffer the event for the sender thread; never blocks on the network, never raises."""
        try:
            if event.kind not in self._kinds:
                return
            payload = event.to_json()
            wake = False
            with self._lock:
                if self._closing:
                    return
                if len(self._buffer) >= self._capacity:
                    oldest = self._buffer.popleft()[0]
                    if self._inflight_last is not None and oldest <= self._inflight_last:
                        # Part of the POST under way: lost only if that POST fails.
                        self._evicted_inflight += 1
                    else:
                        self._dropped += 1
                        self._unreported += 1
                self._buffer.append((self._seq, time.monotonic(), payload))
                self._seq += 1
                size = len(self._buffer)
                # The sender sleeps with an empty buffer, or until the oldest event's flush time.
                if size in (1, self.config.batch_size) and not self._wake_pending:
                    wake = self._wake_pending = self._loop is not None
            if wake:
                self._wake()
        except Exception:  # a notifier must not fail a transfer
            with contextlib.suppress(Exception):
                log.debug("%s: could not buffer an event", self.name, exc_info=True)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (once); events buffered before are sent too."""
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self.name}: start() after close()")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._thread_main, name=f"skyframe-{self.name}", daemon=True
            )
        self._thread.start()
        self._ready.wait(START_TIMEOUT)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events, send what is buffered within ``timeout``, stop the thread.

        Safe to call more than once, and without :meth:`start`.
        """
        with self._lock:
            first = not self._closing
            if first:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
            thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout)
            if thread.is_alive():
                # A POST that began before close() may outlast the deadline: cut it short.
                self._cancel()
                thread.join(1.0)
        if first:
            left = self.pending
            if left:
                log.warning(
                    "%s: %d event(s) not delivered to %s at shutdown", self.name, left, self.url
                )

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the thread is gone
            loop.call_soon_threadsafe(wakeup.set)

    def _cancel(self) -> None:
        loop, task = self._loop, self._task
        if loop is None or task is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: the sender thread stopped", self.name)
        finally:
            self._ready.set()

    # --- the sender thread ---------------------------------------------------------------------

    async def _run(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        batch_size = self.config.batch_size
        interval = self.config.flush_interval
        async with aiohttp.ClientSession() as session:
            while True:
                with self._lock:
                    self._wake_pending = False
                    self._wakeup.clear()
                    closing = self._closing
                    count = len(self._buffer)
                    oldest = self._buffer[0][1] if count else 0.0
                now = time.monotonic()
                if closing:
                    if count and now < self._close_deadline and await self._send(session):
                        continue
                    return
                if now < self._retry_at:
                    await self._sleep(self._retry_at - now)
                elif count >= batch_size or (count and now >= oldest + interval):
                    await self._send(session)
                else:
                    await self._sleep(oldest + interval - now if count else None)

    async def _sleep(self, seconds: float | None) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    async def _send(self, session: aiohttp.ClientSession) -> bool:
        """POST the oldest batch; True if the receiver took it."""
        with self._lock:
            batch = list(itertools.islice(self._buffer, self.config.batch_size))
            if not batch:
                return True
            self._inflight_last = batch[-1][0]
            reported = self._unreported
            closing = self._closing
        body = {
            "source": "skyframe",
            "host": self._host,
            "events": [entry[2] for entry in batch],
            "dropped": reported,
        }
        data = json.dumps(body, default=str).encode()
        timeout = self.config.timeout
        if closing:
            timeout = max(min(timeout, self._close_deadline - time.monotonic()), 0.01)
        try:
            try:
                error = await self._post(session, data, timeout)
            except aiohttp.ServerDisconnectedError:
                # Most likely a kept-alive connection the receiver closed just as it was reused:
                # once more at once, on a new connection (the receiver may get the body twice).
                log.debug("%s: %s closed the connection; sending again", self.name, self.url)
                error = await self._post(session, data, timeout)
        except asyncio.CancelledError:
            self._settle(batch, reported, ok=False)
            raise
        except Exception as exc:
            error = describe_error(exc, timeout)
        self._settle(batch, reported, ok=error is None)
        if error is None:
            self._recovered()
            return True
        self._failed(error, len(batch))
        return False

    async def _post(
        self, session: aiohttp.ClientSession, data: bytes, timeout: float
    ) -> str | None:
        """POST one body: None if the receiver took it (2xx), else its status."""
        async with session.post(
            self.config.url,
            data=data,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"

    def _settle(self, batch: list[_Entry], reported: int, *, ok: bool) -> None:
        with self._lock:
            if ok:
                last = batch[-1][0]
                while self._buffer and self._buffer[0][0] <= last:
                    self._buffer.popleft()
                self._delivered += len(batch)
                self._unreported -= reported
            else:
                self._dropped += self._evicted_inflight
                self._unreported += self._evicted_inflight
            self._evicted_inflight = 0
            self._inflight_last = None

    def _recovered(self) -> None:
        if not self._failures:
            return
        with self._lock:
            lost = self._dropped - self._dropped_at_failure
        attempts, self._failures, self._retry_at = self._failures, 0, 0.0
        dropped = f"; {lost} event(s) were dropped meanwhile" if lost else ""
        log.info(
            "%s: %s is answering again after %d failed attempt(s)%s",
            self.name,
            self.url,
            attempts,
            dropped,
        )

    def _failed(self, error: str, count: int) -> None:
        self._failures += 1
        retry = self.config.retry
        delay = backoff.delay(retry.initial, retry.max, self._failures)
        self._retry_at = time.monotonic() + delay
        if self._failures == 1:
            with self._lock:
                self._dropped_at_failure = self._dropped
            log.warning(
                "%s: cannot deliver events to %s (%s); keeping up to %d event(s) and retrying",
                self.name,
                self.url,
                error,
                self._capacity,
            )
        else:
            log.debug(
                "%s: attempt %d to deliver %d event(s) to %s failed (%s); next in %.1fs",
                self.name,
                self._failures,
                count,
                self.url,
                error,
                delay,
            )
