"""A station's link to the hub: its lifecycle events and a heartbeat, through a durable outbox.

Every event the hub needs (all but ``queued``, ``started``, ``progress`` and ``unchanged``) is
committed to ``<state_dir>/hub-outbox.db`` (SQLite, WAL) before ``skyframe_event`` returns:
a file's ``delivered`` event is written before its job leaves the queue, so a crash or kill
of skyframe, a restart or a link that is down loses none (a power cut can lose the last
moments, as it can the queue's: neither syncs the disk at every commit). Writes from many
threads are committed together (:class:`skyframe.state.GroupCommit`'s way: one transaction
for whatever waits).

One thread of its own (an asyncio loop, one aiohttp session) sends the oldest events,
``batch_size`` at a time, with the station's status as a heartbeat, every ``interval`` or as
soon as a batch is full, to ``POST {url}/api/v1/ingest`` (docs/hub.md). Each event carries an
id made when it was written: the hub counts one it already has as a duplicate, so sending a
batch again after a lost answer counts nothing twice. A 200 answer removes the events it
carried; anything else keeps them and retries with backoff. The answer's commands (pause or
resume the station or one pipeline) are carried out and confirmed at the next exchange.

The station never waits for the hub: delivery goes on while the hub or the link is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from skyframe import backoff
from skyframe.config import HubLinkConfig
from skyframe.display import shown
from skyframe.errors import StateError
from skyframe.events import LifecycleEvent
from skyframe.markers import hookimpl
from skyframe.webhook import describe_error, display_url

log = logging.getLogger(__name__)

OUTBOX_FILE = "hub-outbox.db"
INGEST_PATH = "/api/v1/ingest"
#: The largest request body the hub takes (``skyframe.hub.ingest.MAX_BODY``).
HUB_MAX_BODY = 1024 * 1024
#: What the hub is not sent: the queue and the transfers' progress show in the heartbeat.
NOT_SENT = frozenset({"queued", "started", "progress", "unchanged"})
RETRY_INITIAL = 1.0  #: seconds before the first retry after a failed exchange
RETRY_MAX = 60.0  #: the longest wait between two tries
START_TIMEOUT = 5.0  #: seconds start() waits for the sender thread's loop to be ready

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    event TEXT NOT NULL
);
"""

#: Carries out one of the hub's commands: (action, pipeline or None) -> what was done.
Command = Callable[[str, str | None], str]


class _Row:
    """One event handed to the outbox, and whether the commit that carried it went well."""

    __slots__ = ("done", "error", "event", "ident")

    def __init__(self, ident: str, event: str) -> None:
        self.ident, self.event = ident, event
        self.done = False
        self.error: Exception | None = None

    def outcome(self) -> None:
        if self.error is not None:
            raise self.error


#: An event in the outbox: its sequence number, its id and the event.
OutboxRow = tuple[int, str, dict[str, Any]]


class Outbox:
    """Events waiting for the hub, in order, on disk."""

    def __init__(self, state_dir: Path, capacity: int) -> None:
        self.path = state_dir / OUTBOX_FILE
        self.capacity = capacity
        try:
            self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses nothing
            self._db.executescript(_SCHEMA)
            self._count = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the hub outbox {self.path}: {exc}") from exc
        self._lock = threading.Lock()  # the connection
        self._pending: list[_Row] = []
        self._pending_lock = threading.Lock()
        self.dropped = 0  #: events pushed out because the outbox was full
        self.refused = 0  #: events set aside because the hub refuses them

    def __len__(self) -> int:
        return self._count

    def add(self, event: dict[str, Any]) -> None:
        """Write one event (with a new id); returns once it is committed, or raises why not."""
        row = _Row(uuid.uuid4().hex, json.dumps(event, separators=(",", ":"), default=str))
        with self._pending_lock:
            self._pending.append(row)
        with self._lock:
            if row.done:
                row.outcome()
                return
            with self._pending_lock:
                group, self._pending = self._pending, []
            try:
                self._insert(group)
            except Exception as exc:  # the commit failed: every write in it did
                for each in group:
                    each.error = exc
            for each in group:
                each.done = True
        row.outcome()

    def _insert(self, group: list[_Row]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO outbox (id, event) VALUES (?, ?)", [(r.ident, r.event) for r in group]
            )
            count = self._count + len(group)
            over = count - self.capacity
            if over > 0:
                self._db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (over,),
                )
        self._count = count - max(over, 0)
        if over > 0:
            self.dropped += over
            log.warning("hub: the outbox is full: %d oldest event(s) dropped", over)

    def oldest(self, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` of the oldest events: (seq, id, event)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, event FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), str(ident), json.loads(event)) for seq, ident, event in rows]

    def remove_through(self, seq: int) -> None:
        """Forget every event up to ``seq`` (the hub has them)."""
        with self._lock, self._db:
            gone = self._db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,)).rowcount
            self._count -= max(gone, 0)

    def remove(self, seq: int) -> None:
        """Forget one event (the hub refuses it)."""
        with self._lock, self._db:
            gone = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
            self._count -= max(gone, 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class HubLink:
    """Sends a station's events and heartbeat to the hub; carries out the hub's commands.

    Register the instance with the plugin manager (it implements ``skyframe_event``), call
    :meth:`start` once, and :meth:`close` at the end.
    """

    def __init__(
        self,
        config: HubLinkConfig,
        state_dir: Path,
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        command: Command | None = None,
    ) -> None:
        self.config = config
        self.url = config.url.rstrip("/") + INGEST_PATH
        self.shown = display_url(self.url)
        self.outbox = Outbox(state_dir, config.outbox)
        self.status = status
        self.command = command
        self._headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {config.token}",
        }
        self._acks: list[dict[str, Any]] = []  # confirmations for the next exchange
        self._done_commands: set[str] = set()  # carried out, not yet confirmed
        self._failures = 0
        self._retry_at = 0.0
        #: events sent at most per request: ``batch_size``, halved while the hub refuses a
        #: body as too large, doubled back with each one it takes
        self._batch_limit = config.batch_size
        self.exchanges = 0  #: exchanges the hub answered
        self.last_error = ""  #: why the last exchange failed ("" once one succeeds)
        self._closing = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<HubLink {self.config.station} -> {self.shown}>"

    @property
    def pending(self) -> int:
        """Events in the outbox, not yet taken by the hub."""
        return len(self.outbox)

    # --- the hook ------------------------------------------------------------------------------

    @hookimpl
    def skyframe_event(self, event: LifecycleEvent) -> None:
        """Write the event to the outbox (committed before this returns); never raises."""
        if event.kind in NOT_SENT:
            return
        try:
            self.outbox.add(event.to_json())
        except Exception as exc:  # a full disk, a removed state directory: delivery goes on
            log.error("hub: cannot keep an event for the hub: %s", exc)
            return
        if len(self.outbox) >= self.config.batch_size:
            self._wake()

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="skyframe-hub", daemon=True)
        self._thread.start()
        self._ready.wait(START_TIMEOUT)
        if self.pending:
            log.info("hub: %d event(s) from before wait for %s", self.pending, self.shown)

    def close(self, timeout: float = 5.0) -> None:
        """Send what waits within ``timeout`` (and a last heartbeat), then stop; what is left
        stays in the outbox for the next start. Safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout + 1.0)
            if thread.is_alive():
                self._cancel()
                thread.join(1.0)
        left = self.pending
        if left:
            log.info("hub: %d event(s) kept in the outbox for the next start", left)
        self.outbox.close()

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the thread is gone
                loop.call_soon_threadsafe(wakeup.set)

    def _cancel(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("hub: the sender thread stopped")
        finally:
            self._ready.set()

    # --- the sender thread ---------------------------------------------------------------------

    async def _run(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        next_heartbeat = 0.0
        async with aiohttp.ClientSession() as session:
            while True:
                self._wakeup.clear()
                now = time.monotonic()
                if self._closing:
                    while now < self._close_deadline and await self._exchange(session, now):
                        if not self.pending:
                            return
                        now = time.monotonic()
                    return
                due = now >= next_heartbeat or len(self.outbox) >= self.config.batch_size
                ready = now >= self._retry_at and (due or bool(self._acks))
                if ready and await self._exchange(session, now):
                    next_heartbeat = now + self.config.interval
                    if self.pending >= self.config.batch_size:
                        continue  # more waits: send it at once
                # Sleep until the next try after a failure, else until the next heartbeat; a
                # full batch or a command's answer wakes the thread sooner.
                until = self._retry_at if self._retry_at > now else next_heartbeat
                wait = max(until - time.monotonic(), 0.05)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)

    async def _exchange(self, session: aiohttp.ClientSession, now: float) -> bool:
        """One request: the oldest events, the heartbeat, the confirmations; True if the hub
        took them."""
        batch = self.outbox.oldest(self._batch_limit)
        acks = list(self._acks)
        status = self._status()

        def encoded(events: list[OutboxRow]) -> bytes:
            body = {
                "station": self.config.station,
                "sent_at": time.time(),
                "events": [{"id": i, "seq": seq, "event": e} for seq, i, e in events],
                "status": status,
                "acks": acks,
            }
            return json.dumps(body, separators=(",", ":"), default=str).encode()

        # The hub takes bodies of HUB_MAX_BODY at most, and may close the connection on a
        # larger one before its answer can be read: fewer events go, or one too large alone
        # is set aside (the hub would refuse it whatever the batch).
        data = encoded(batch)
        while len(data) > HUB_MAX_BODY and len(batch) > 1:
            batch = batch[: len(batch) // 2]
            data = encoded(batch)
        if len(data) > HUB_MAX_BODY and batch:
            error = f"the event alone is larger than the hub's {HUB_MAX_BODY // 1024} KiB"
            return self._set_aside(batch[0], error)
        timeout = self.config.timeout
        if self._closing:
            timeout = max(min(timeout, self._close_deadline - now), 0.05)
        try:
            async with session.post(
                self.url,
                data=data,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                if response.status in (413, 422):
                    return self._refused(batch, response.status, await response.text())
                if response.status != 200:
                    detail = (await response.text())[:200].strip()
                    error = f"HTTP {response.status}" + (f": {detail}" if detail else "")
                    return self._failed(error, permanent=response.status in (401, 403))
                answer = await response.json(content_type=None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(describe_error(exc, timeout))
        if batch:
            self.outbox.remove_through(batch[-1][0])
        self._batch_limit = min(self._batch_limit * 2, self.config.batch_size)
        del self._acks[: len(acks)]
        self._done_commands -= {str(a.get("id")) for a in acks}
        self._recovered()
        self.exchanges += 1
        self._commands(answer.get("commands") if isinstance(answer, dict) else None)
        return True

    def _status(self) -> dict[str, Any] | None:
        if self.status is None:
            return None
        try:
            status = self.status()
        except Exception as exc:  # the heartbeat goes without it
            log.debug("hub: no status for the heartbeat: %s", exc)
            return None
        return {
            **status,
            "outbox": self.pending,
            "outbox_dropped": self.outbox.dropped,
            "outbox_refused": self.outbox.refused,
        }

    def _commands(self, commands: Any) -> None:
        """Carry out the hub's commands; each is confirmed at the next exchange (once: the hub
        sends a command until it is confirmed)."""
        if not isinstance(commands, list):
            return
        for each in commands:
            if not isinstance(each, dict) or not isinstance(each.get("id"), str):
                continue
            ident = each["id"]
            if ident in self._done_commands:
                continue
            action, pipeline = each.get("action"), each.get("pipeline")
            try:
                if action not in ("pause", "resume"):
                    raise ValueError(f"unknown action {action!r}")
                if pipeline is not None and not isinstance(pipeline, str):
                    raise ValueError("pipeline must be a name")
                if self.command is None:
                    raise ValueError("this station takes no commands")
                detail, ok = self.command(action, pipeline), True
            except Exception as exc:
                detail, ok = str(exc), False
            log.info("hub: %s %s: %s", action, pipeline or "the station", detail)
            self._done_commands.add(ident)
            self._acks.append({"id": ident, "ok": ok, "detail": detail})
        if self._acks:
            self._wake()

    def _recovered(self) -> None:
        if self._failures:
            log.info(
                "hub: %s is answering again after %d failed attempt(s); %d event(s) wait",
                self.shown,
                self._failures,
                self.pending,
            )
        self._failures, self._retry_at, self.last_error = 0, 0.0, ""

    def _refused(self, batch: list[OutboxRow], status: int, text: str) -> bool:
        """The hub refuses the request's body (413: too large, 422: not a valid batch).

        Sent again as it is, it would be refused forever, and every event after it would wait
        behind it. An event the hub names (422 with ``where``), or the one event of a body too
        large, is set aside with a warning; a body too large with more events is sent in
        halves. Anything else (the heartbeat refused, a hub that does not say where) is
        retried slowly, as a refused token is."""
        detail, where = _refusal(text)
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        index: int | None = None
        if status == 422 and len(where) > 1 and where[0] == "events":
            index = where[1] if isinstance(where[1], int) else None
        elif status == 413 and len(batch) == 1:
            index = 0
        elif status == 413 and len(batch) > 1:
            self._batch_limit = max(len(batch) // 2, 1)
            log.info("hub: %s: sending %d event(s) at a time", error, self._batch_limit)
            self._retry_at = 0.0
            return False
        if index is None or not 0 <= index < len(batch):
            return self._failed(error, permanent=True)
        return self._set_aside(batch[index], error)

    def _set_aside(self, row: OutboxRow, error: str) -> bool:
        """Drop one event the hub refuses from the outbox, saying which and why; the events
        after it go with the next exchange, with no wait for a retry."""
        seq, ident, event = row
        self.outbox.remove(seq)
        self.outbox.refused += 1
        log.warning(
            "hub: the %s event of %s is set aside, as %s refuses it (%s); %d event(s) wait",
            shown(event.get("kind")),
            shown(f"{event.get('pipeline')}:{event.get('relpath')}"),
            self.shown,
            error,
            self.pending,
        )
        log.debug("hub: the refused event %s: %s", ident, event)
        self._retry_at = 0.0
        return False

    def _failed(self, error: str, *, permanent: bool = False) -> bool:
        self._failures += 1
        self.last_error = error
        delay = backoff.delay(RETRY_INITIAL, RETRY_MAX, self._failures)
        if permanent:
            delay = RETRY_MAX  # a refused token will not change by itself: retry slowly
        self._retry_at = time.monotonic() + delay
        if self._failures == 1 or (permanent and self._failures % 10 == 1):
            log.warning(
                "hub: cannot reach %s (%s); keeping events in the outbox (%d waiting) and retrying",
                self.shown,
                error,
                self.pending,
            )
        else:
            log.debug("hub: attempt %d failed (%s); next in %.1fs", self._failures, error, delay)
        return False


def _refusal(text: str) -> tuple[str, list[Any]]:
    """A refusal's one line and where in the body it points (``{"error": ..., "where":
    [...]}``); a body that is not such JSON is the line itself, pointing nowhere."""
    try:
        answer = json.loads(text)
    except ValueError:
        return text[:200].strip(), []
    if not isinstance(answer, dict):
        return text[:200].strip(), []
    where = answer.get("where")
    return str(answer.get("error", ""))[:200].strip(), where if isinstance(where, list) else []
