"""Alerts: a silent station, dead letters past a threshold, a sink down for too long.

:func:`evaluate` compares what should be open with what is, in one transaction: an alert is a
row whose ``open_key`` (``kind|station|subject``) is unique while it is open, inserted only if
absent, so that with several hubs on one database exactly one of them opens it (and clears
it), and only that one notifies. :class:`AlertNotifier` POSTs each change to the webhook in
the background, retrying with backoff: neither ingest nor the page ever waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skyframe import backoff
from skyframe.hub.config import AlertsConfig
from skyframe.hub.db import insert
from skyframe.hub.schema import alerts, stations
from skyframe.webhook import describe_error, display_url

log = logging.getLogger(__name__)

POST_TIMEOUT = 10.0  #: seconds one webhook POST may take
MAX_ATTEMPTS = 8  #: POSTs of one alert before it is given up (logged)
RETRY_FIRST, RETRY_LONGEST = 1.0, 60.0


@dataclass(frozen=True)
class Condition:
    """Something that should be an open alert."""

    kind: str  #: silent, dead-letters, sink-offline
    station: str
    subject: str
    message: str

    @property
    def open_key(self) -> str:
        """What makes it one alert: kind, station and subject."""
        return f"{self.kind}|{self.station}|{self.subject}"


@dataclass(frozen=True)
class Change:
    """An alert this hub opened or cleared: what the webhook receives."""

    state: str  #: fired or cleared
    alert_id: int
    kind: str
    station: str
    subject: str
    message: str
    fired_at: float
    cleared_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            "alert": self.kind,
            "state": self.state,
            "station": self.station,
            "subject": self.subject,
            "message": self.message,
            "fired_at": self.fired_at,
            "cleared_at": self.cleared_at,
            "hub": socket.gethostname(),
        }


def conditions(connection: sa.Connection, config: AlertsConfig, now: float) -> list[Condition]:
    """What should be open now, from the stations' rows."""
    rows = connection.execute(
        sa.select(stations).where(stations.c.token_hash.is_not(None)).order_by(stations.c.name)
    ).all()
    found = []
    for row in rows:
        if row.last_seen is not None and now - row.last_seen >= config.silent_after:
            minutes = (now - row.last_seen) / 60
            found.append(
                Condition("silent", row.name, "", f"{row.name}: nothing for {minutes:.0f} min")
            )
        if row.dead_letters > config.dead_letters_above:
            found.append(
                Condition(
                    "dead-letters",
                    row.name,
                    "",
                    f"{row.name}: {row.dead_letters} dead-lettered job(s)",
                )
            )
        down = row.sinks_down if isinstance(row.sinks_down, dict) else {}
        for sink, since in sorted(down.items()):
            if isinstance(since, int | float) and now - since >= config.sink_offline_after:
                minutes = (now - since) / 60
                found.append(
                    Condition(
                        "sink-offline",
                        row.name,
                        sink,
                        f"{row.name}: sink {sink} down for {minutes:.0f} min",
                    )
                )
    return found


def evaluate(engine: Engine, config: AlertsConfig, now: float | None = None) -> list[Change]:
    """Open the alerts that should be, clear those that should not; what this hub changed."""
    now = time.time() if now is None else now
    changes = []
    with engine.begin() as connection:
        wanted = {c.open_key: c for c in conditions(connection, config, now)}
        open_rows = connection.execute(sa.select(alerts).where(alerts.c.open_key.is_not(None)))
        is_open = {row.open_key: row for row in open_rows}
        for key, condition in wanted.items():
            if key in is_open:
                continue
            statement = (
                insert(connection, alerts)
                .values(
                    kind=condition.kind,
                    station=condition.station,
                    subject=condition.subject,
                    message=condition.message,
                    fired_at=now,
                    open_key=key,
                )
                .on_conflict_do_nothing(index_elements=["open_key"])
                .returning(alerts.c.id)
            )
            alert_id = connection.execute(statement).scalar_one_or_none()
            if alert_id is not None:  # None: another hub opened it first
                changes.append(Change("fired", alert_id, *_fields(condition), now))
        for key, row in is_open.items():
            if key in wanted:
                continue
            result = connection.execute(
                sa.update(alerts)
                .where(alerts.c.id == row.id, alerts.c.open_key.is_not(None))
                .values(cleared_at=now, open_key=None)
            )
            if result.rowcount == 1:
                fields = (row.kind, row.station, row.subject, row.message)
                changes.append(Change("cleared", row.id, *fields, row.fired_at, now))
    return changes


def _fields(condition: Condition) -> tuple[str, str, str, str]:
    return condition.kind, condition.station, condition.subject, condition.message


def mark_notified(engine: Engine, change: Change, at: float) -> None:
    """Record that the webhook took the change."""
    column = "notified_at" if change.state == "fired" else "cleared_notified_at"
    with engine.begin() as connection:
        connection.execute(
            sa.update(alerts).where(alerts.c.id == change.alert_id).values({column: at})
        )


class AlertNotifier:
    """Sends changes to the webhook, in order, each retried with backoff (on its own task)."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start the sender (inside the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT), trust_env=True
        )
        self._task = asyncio.create_task(self._send_all(), name="skyframe-hub-alerts")

    def put(self, change: Change) -> None:
        """Queue a change; returns at once."""
        self._queue.put_nowait(change)

    async def close(self) -> None:
        """Stop sending (what is queued is dropped, and logged)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue.qsize():
            log.warning("hub: %d alert(s) not sent to the webhook", self._queue.qsize())
        if self._session is not None:
            await self._session.close()

    async def _send_all(self) -> None:
        while True:
            change = await self._queue.get()
            await self._send(change)

    async def _send(self, change: Change) -> None:
        assert self._session is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._session.post(self.url, json=change.to_json()) as response:
                    if 200 <= response.status < 300:
                        loop = asyncio.get_running_loop()
                        await loop.run_in_executor(
                            None, mark_notified, self.engine, change, time.time()
                        )
                        return
                    reason = f"answered {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = describe_error(exc, POST_TIMEOUT)
            if attempt == MAX_ATTEMPTS:
                break
            wait = backoff.delay(RETRY_FIRST, RETRY_LONGEST, attempt)
            log.info(
                "hub: alert webhook %s: %s; trying again in %.0f s",
                display_url(self.url),
                reason,
                wait,
            )
            await asyncio.sleep(wait)
        log.warning(
            "hub: alert webhook %s: %s; gave up on %s %s after %d attempts",
            display_url(self.url),
            reason,
            change.kind,
            change.state,
            MAX_ATTEMPTS,
        )
